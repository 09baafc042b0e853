//! Code layout for release builds on Linux.
//!
//! `link/hot-text.ld` lists the functions an idle hub runs (its start, an
//! agent's connect, a gateway request and a forwarded connection; made by
//! `bench/hot-text.sh`). The linker places them together ahead of the rest
//! of `.text`, so the hub's resident code is the few MiB it uses instead of
//! every page the kernel's fault-around maps next to a function it ran,
//! spread over the whole 17 MiB of code (issue 11: hub idle RSS). The list
//! names functions with their hashes replaced by `*`, so it stays valid
//! across edits; a name that no longer exists is simply not matched, and a
//! function missing from the list is only placed with the cold code.
//!
//! Both GNU ld and LLD read the script as an addition to their default
//! layout (`INSERT BEFORE .text`). Set TOWERCTL_NO_TEXT_ORDER=1 to link
//! without it.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/hot-text.ld");
    println!("cargo:rerun-if-env-changed=TOWERCTL_NO_TEXT_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let wanted = env::var_os("TOWERCTL_NO_TEXT_ORDER").is_none_or(|v| v.is_empty() || v == "0");
    if !(release && linux && wanted) {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = Path::new(&dir).join("link/hot-text.ld");
    if !script.is_file() {
        return;
    }
    // `-Wl,` splits its argument at commas.
    if script.to_string_lossy().contains(',') {
        println!(
            "cargo:warning=not ordering the code: the path {} has a comma",
            script.display()
        );
    } else {
        println!(
            "cargo:rustc-link-arg-bin=towerctl=-Wl,-T,{}",
            script.display()
        );
    }
}
