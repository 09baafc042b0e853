//! Generated files are generated: completions and man pages must match
//! what the current clap definitions produce. Regenerate with
//! `cargo run -- gen-docs .` when this fails.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{run_bounded, Env, TOWERCTL};

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn completions_and_man_pages_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(TOWERCTL);
    cmd.args(["gen-docs", tmp.path().to_str().unwrap()]);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    for dir in ["completions", "man"] {
        let fresh = tmp.path().join(dir);
        let checked_in = root.join(dir);
        assert_eq!(
            files(&fresh),
            files(&checked_in),
            "{dir}/ differs in its file list: run 'cargo run -- gen-docs .'"
        );
        for f in files(&fresh) {
            let a = std::fs::read(fresh.join(&f)).unwrap();
            let b = std::fs::read(checked_in.join(&f)).unwrap();
            assert!(a == b, "{dir}/{f} is stale: run 'cargo run -- gen-docs .'");
        }
    }
    // `towerctl completion SHELL` prints the same script.
    let mut cmd = std::process::Command::new(TOWERCTL);
    cmd.args(["completion", "bash"]);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(
        o.stdout.as_bytes(),
        std::fs::read(root.join("completions/towerctl.bash"))
            .unwrap()
            .as_slice()
    );
}

#[test]
fn works_as_the_kubectl_plugin_kubectl_tower() {
    let env = Env::new();
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(TOWERCTL, bin.join("kubectl-tower")).unwrap();
    let mut cmd = env.kubectl_cmd(&["tower", "--help"]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", &path);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("Usage: kubectl tower"), "{o:?}");
    let mut cmd = env.kubectl_cmd(&["tower", "status"]);
    cmd.env("PATH", &path);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(o.code, Some(3), "{o:?}");
    assert!(o.stdout.contains("HUB  not running"), "{o:?}");
}
