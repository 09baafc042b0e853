//! The module layering that docs/ARCHITECTURE.md states, checked on the
//! sources: `tunnel` knows nothing above it, `daemon` knows nothing of
//! `commands` or `tui`, and the modules inside `daemon` import each other
//! one way only (no cycle). A change that brings an import circle back
//! fails here, naming the cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach
/// anywhere) and without comments.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level `daemon` module a file belongs to (`hub` for `daemon/hub/x.rs`).
fn daemon_module(p: &Path) -> Option<String> {
    let rel = p.strip_prefix(src().join("daemon")).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    Some(first.trim_end_matches(".rs").to_string())
}

/// Names `X` used as `crate::daemon::X` or, in a top-level daemon file,
/// `super::X`.
fn daemon_refs(p: &Path, code: &str) -> BTreeSet<String> {
    let top_level = p.parent() == Some(src().join("daemon").as_path());
    let mut out = BTreeSet::new();
    let mut scan = |prefix: &str| {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            rest = &rest[i + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            // `use super::{a, b}` / `crate::daemon::{a, b}`
            if rest.starts_with('{') {
                let end = rest.find('}').unwrap_or(rest.len());
                for part in rest[1..end].split(',') {
                    let n: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !n.is_empty() {
                        out.insert(n);
                    }
                }
            }
        }
    };
    scan("crate::daemon::");
    if top_level {
        scan("super::");
    }
    out
}

#[test]
fn lower_layers_know_nothing_above_them() {
    let rules = [
        (
            "tunnel",
            &["crate::daemon", "crate::commands", "crate::tui"][..],
        ),
        ("daemon", &["crate::commands", "crate::tui"][..]),
        ("tui", &["crate::commands"][..]),
    ];
    let mut bad = Vec::new();
    for (layer, forbidden) in rules {
        for f in rust_files(&src().join(layer)) {
            let c = code(&f);
            for word in forbidden {
                if c.contains(word) {
                    bad.push(format!("{} uses {word}", f.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn daemon_modules_import_one_way() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let files = rust_files(&src().join("daemon"));
    let modules: BTreeSet<String> = files.iter().filter_map(|f| daemon_module(f)).collect();
    for f in &files {
        let Some(m) = daemon_module(f) else { continue };
        if m == "mod" {
            continue;
        }
        let refs = daemon_refs(f, &code(f));
        let e = graph.entry(m.clone()).or_default();
        for r in refs {
            if r != m && modules.contains(&r) && r != "mod" {
                e.insert(r);
            }
        }
    }
    // The graph really was read: the hub uses the store, the agent the
    // shared HTTP rules.
    assert!(graph["hub"].contains("store"), "{graph:?}");
    assert!(graph["agent"].contains("http"), "{graph:?}");
    // Depth-first search for a cycle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!(
                "import cycle among src/daemon modules: {}\nfull graph: {graph:#?}",
                c.join(" -> ")
            );
        }
    }
}
