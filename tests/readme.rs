//! README's two commands are a promise: CI must run the test command it
//! shows, and the install command must install this package.

fn code_blocks(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in readme.lines() {
        if line.starts_with("```") {
            match cur.take() {
                Some(b) => out.push(b.trim().to_string()),
                None => cur = Some(String::new()),
            }
        } else if let Some(b) = cur.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    out
}

#[test]
fn ci_runs_the_readme_test_command() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    let blocks = code_blocks(&readme);
    assert!(
        blocks.len() >= 2,
        "README must open with the install and the test command"
    );
    assert!(
        blocks[0].contains("cargo install --locked --path ."),
        "first block: {}",
        blocks[0]
    );
    let test_cmd = &blocks[1];
    assert!(
        ci.lines().any(|l| l.trim() == test_cmd),
        ".ci/run must run README's test command '{test_cmd}' verbatim"
    );
    assert!(
        ci.contains("command -v kubectl"),
        ".ci/run must check for kubectl"
    );
}
