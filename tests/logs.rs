//! Daemon logs: rotated by size, followed across rotation, and safe from
//! what unauthenticated peers send. The real towerctl binary; a minimal
//! WebSocket + SSH client (tests/support/sshflood.rs) for the login flood.

mod support;

use std::time::Duration;

use support::{Env, Streaming};

/// A hub whose log rotates every 4 KiB: `towerctl logs hub -f`, started
/// before, shows every line written across three rotations exactly once,
/// and no file passes the bound.
#[test]
fn the_hub_log_rotates_by_size_and_logs_follow_crosses_rotations() {
    let env = Env::new();
    let o = support::run_bounded(
        {
            let mut c = env.towerctl_cmd(&[
                "up",
                "--listen",
                "127.0.0.1:0",
                "--gateway",
                "127.0.0.1:0",
                "--metrics",
                "off",
            ]);
            c.env("TOWERCTL_LOG_MAX_BYTES", "4096");
            c
        },
        Duration::from_secs(30),
    );
    assert!(o.ok(), "{o:?}");
    let follow = Streaming::start(env.towerctl_cmd(&["logs", "hub", "-f"]));
    std::thread::sleep(Duration::from_millis(500));
    let n = 100;
    for i in 0..n {
        let o = env.towerctl(&["cluster", "add", &format!("m{i}")]);
        assert!(o.ok(), "{o:?}");
    }
    let log = env.path("state/towerctl/hub.log");
    let rotated = |i: usize| std::path::PathBuf::from(format!("{}.{i}", log.display()));
    assert!(
        rotated(1).exists() && rotated(2).exists(),
        "the log never rotated"
    );
    for p in [log.clone(), rotated(1), rotated(2), rotated(3)] {
        if let Ok(m) = std::fs::metadata(&p) {
            assert!(m.len() <= 4096, "{} is {} bytes", p.display(), m.len());
        }
    }
    assert!(!rotated(4).exists(), "more than 3 rotated files kept");
    support::wait_for(
        "logs -f to show every line",
        Duration::from_secs(10),
        || {
            let out = follow.output();
            (0..n)
                .all(|i| out.contains(&format!("member registered cluster=m{i}\n")))
                .then_some(())
        },
    );
    let out = follow.output();
    for i in 0..n {
        let needle = format!("member registered cluster=m{i}\n");
        assert_eq!(out.matches(&needle).count(), 1, "'{needle}' in:\n{out}");
    }
    let _ = env.towerctl(&["down"]);
}
