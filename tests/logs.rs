//! Daemon logs: rotated by size, followed across rotation, and safe from
//! what unauthenticated peers send. The real towerctl binary; a minimal
//! WebSocket + SSH client (tests/support/sshflood.rs) for the login flood.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{Env, Streaming};

/// A hub whose log rotates every 4 KiB: `towerctl logs hub -f`, started
/// before, shows every line written across three rotations exactly once,
/// and no file passes the bound.
#[test]
fn the_hub_log_rotates_by_size_and_logs_follow_crosses_rotations() {
    let env = Env::new();
    env.up_with_env(&[("TOWERCTL_LOG_MAX_BYTES", "4096")]);
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

/// A hub log removed by hand (to free space) is made again at the next
/// rotation, and the history kept: the hub logged to the deleted file for
/// good, and its failed rotations shifted it out of `.3`.
#[test]
fn a_hub_log_removed_by_hand_is_made_again() {
    let env = Env::new();
    env.up_with_env(&[("TOWERCTL_LOG_MAX_BYTES", "4096")]);
    let log = env.path("state/towerctl/hub.log");
    for i in 0..20 {
        assert!(env.towerctl(&["cluster", "add", &format!("a{i}")]).ok());
    }
    std::fs::remove_file(&log).unwrap();
    for i in 0..60 {
        assert!(env.towerctl(&["cluster", "add", &format!("b{i}")]).ok());
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("member registered cluster=b59"),
        "the hub log was not made again: {text:?}"
    );
    let _ = env.towerctl(&["down"]);
}

#[path = "support/sshflood.rs"]
mod sshflood;

/// p99 of a handful of samples: the largest but one per hundred.
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    // Of a handful of samples, the largest but one: a single stall of the
    // other test process sharing the two cores is not the hub's.
    v[(v.len() * 99 / 100).min(v.len() - 1).saturating_sub(1)]
}

fn kubectl_times(env: &Env, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            let o = env.kubectl(&["get", "ns"]);
            assert!(o.ok(), "{o:?}");
            t.elapsed()
        })
        .collect()
}

const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO towerctl::daemon::hub::control: member registered cluster=forged";

/// 200 SSH logins (40 source addresses, 10 at a time) whose user names are
/// 100 KB long and carry a newline and a forged log line: the hub log grows
/// by at most 1 KiB per attempt (the names alone are 20 MB), no forged line
/// appears, and kubectl's p99 during the flood stays within twice its idle
/// p99 (three times beside other tests, see below).
/// `towerctl -vv up` starts a hub that logs at debug: the background
/// daemon gets the verbosity of the command that started it (it used to
/// log at info whatever was asked).
#[test]
fn verbose_up_starts_a_hub_that_logs_at_debug() {
    let env = Env::new();
    // -v is a global flag: after the subcommand's own it counts the same.
    let o = env.up_with(&["-vv"]);
    assert!(o.ok(), "{o:?}");
    // Plain HTTP on the gateway's TLS port is answered 400 and logged at
    // debug only.
    let gateway = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = std::net::TcpStream::connect(&gateway).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    support::wait_for(
        "a debug line in the hub's log",
        Duration::from_secs(10),
        || {
            log()
                .contains("plain HTTP on the gateway's TLS port")
                .then_some(())
        },
    );
    assert!(env.towerctl(&["down"]).ok());
}

#[test]
fn a_login_flood_with_hostile_user_names_neither_floods_nor_forges_the_log() {
    use support::apiserver::ApiServer;
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    assert!(env
        .join(&join, &["--kubeconfig", kc.to_str().unwrap()])
        .ok());
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let tunnel: std::net::SocketAddr = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let log = env.path("state/towerctl/hub.log");
    let _ = kubectl_times(&env, 2); // warm up
    let idle = kubectl_times(&env, 20);
    let before = std::fs::metadata(&log).unwrap().len();

    let user = format!("alpha\n{FORGED}\n{}", "x".repeat(100_000));
    let flood = std::thread::spawn(move || {
        // The attacker shares this machine's two cores with the hub and
        // kubectl; at the lowest priority its own key exchanges do not
        // count against the hub (Linux: per-thread nice via the tid).
        // SAFETY: plain syscalls on this thread's own id.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..200u32)
                .map(|i| {
                    let user = user.clone();
                    async move {
                        let from = std::net::IpAddr::from([127, 0, 1, (i % 40 + 1) as u8]);
                        sshflood::login(tunnel, from, &user, "not-a-token", Duration::from_secs(20))
                            .await
                    }
                })
                .buffer_unordered(10)
                .collect::<Vec<_>>()
                .await
        })
    });
    let during = kubectl_times(&env, 20);
    let outcomes = flood.join().unwrap();
    let refused = outcomes
        .iter()
        .filter(|o| **o == sshflood::Login::Refused)
        .count();
    let accepted = outcomes
        .iter()
        .filter(|o| **o == sshflood::Login::Accepted)
        .count();
    let cut: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            sshflood::Login::Cut(e) => Some(e.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(accepted, 0);
    std::thread::sleep(Duration::from_millis(500));
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("2026-01-01T00:00:00")),
        "a forged line made it into the log"
    );
    assert!(
        !text.contains(&"x".repeat(1000)),
        "a user name was logged whole"
    );
    let (idle_p99, during_p99) = (p99(idle), p99(during));
    eprintln!(
        "measured: 200 hostile logins ({refused} refused by the hub, {} cut: {:?}): hub log grew {grown} bytes; \
         kubectl get ns p99 idle {idle_p99:.0?}, during the flood {during_p99:.0?}",
        cut.len(),
        cut.first()
    );
    assert!(
        refused >= 100,
        "the flood did not reach the login step: {cut:?}"
    );
    assert!(grown <= 200 * 1024, "the hub log grew {grown} bytes");
    // The bound, 2x, holds when the test runs alone (the fault
    // suite, TOWERCTL_FAULTS=1, runs it so); beside the regular suite's
    // other tests on two shared cores, kubectl's own start-up varies more
    // than that, so 3x there, which still catches a hub that stalls its
    // runtime per attempt (a registry write per refused login did).
    let factor = if std::env::var("TOWERCTL_FAULTS").as_deref() == Ok("1") {
        2
    } else {
        3
    };
    assert!(
        during_p99 <= idle_p99 * factor,
        "kubectl p99 {during_p99:?} during the flood, {idle_p99:?} idle (bound {factor}x)"
    );
    let _ = env.towerctl(&["down"]);
}

/// A daemon holds none of the descriptors towerctl inherited from its
/// caller (a provisioning script's `flock 9` was held for the hub's whole
/// life, and the script's next run waited for ever).
#[test]
fn daemons_hold_none_of_their_callers_descriptors() {
    use std::os::unix::io::AsRawFd;
    let env = Env::new();
    let marker = env.path("held-by-the-caller");
    let f = std::fs::File::create(&marker).unwrap();
    // Inheritable, as a shell's `9>FILE` is.
    let fd = f.as_raw_fd();
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        assert!(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == 0);
    }
    // A child started as `towerctl up` is holds it (the check below can
    // fail)…
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let holds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .any(|l| l == marker)
            })
            .unwrap_or(false)
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(holds(child.id() as i32), "a child inherits it");
    let _ = child.kill();
    let _ = child.wait();
    // …the hub it starts does not.
    env.up();
    let pid = env.pid_of("hub").expect("the hub's pid");
    assert!(!holds(pid), "the hub holds its caller's descriptor");
    let _ = env.towerctl(&["down"]);
    drop(f);
}

/// A line in a daemon's log that still holds control characters (a forged
/// line break, a terminal's title or clipboard escape, a carriage return
/// that writes over the line) is shown with them escaped, by `logs` and by
/// `logs -f`; lines without any are shown as written, backslashes
/// included; a log that is not UTF-8 throughout is still shown.
#[test]
fn logs_escape_control_characters_left_in_a_log() {
    let env = Env::new();
    let dir = env.path("state/towerctl");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("hub.log");
    let hostile = "WARN refused a dial: down\r2030-01-01 INFO forged \u{1b}]52;c;ZXZpbA==\u{7} \u{202e}lave\n";
    let plain = "INFO kept as written: \\u{1b} \"quoted\"\n";
    let mut first = hostile.as_bytes().to_vec();
    first.extend_from_slice(plain.as_bytes());
    first.extend_from_slice(b"INFO \xff not utf-8\n");
    std::fs::write(&log, &first).unwrap();
    let o = env.towerctl(&["logs", "hub"]);
    assert!(o.ok(), "{o:?}");
    for bad in ['\r', '\u{1b}', '\u{7}', '\u{202e}'] {
        assert!(
            !o.stdout.contains(bad),
            "{bad:?} reached the terminal: {o:?}"
        );
    }
    assert!(
        o.stdout.contains(
            "down\\u{d}2030-01-01 INFO forged \\u{1b}]52;c;ZXZpbA==\\u{7} \\u{202e}lave\n"
        ),
        "{o:?}"
    );
    assert!(o.stdout.contains(plain), "{o:?}");
    assert!(o.stdout.contains("not utf-8"), "{o:?}");
    let follow = Streaming::start(env.towerctl_cmd(&["logs", "hub", "-f"]));
    std::thread::sleep(Duration::from_millis(500));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(b"WARN later\x1b[2J line\n").unwrap();
    follow.wait_for("later\\u{1b}[2J line\n", Duration::from_secs(10));
    assert!(!follow.output().contains('\u{1b}'), "{}", follow.output());
}

/// A tmpfs of `size` mounted at `at`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Fills the file system: a file `filler` as large as it will go.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&block[..1]);
        let _ = f.write_all(&block[..1]);
        drop(f);
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The hub's state directory (its log and audit log) on a disk that fills
/// up: the hub goes on registering members (each join token printed),
/// answering the gateway, and stops on `towerctl down`; once space is
/// freed, the audit log takes records again and the log says how many of
/// its lines were lost. Before, a log line that could not be written
/// panicked whatever was logging it (tracing reports a failed write with
/// `eprintln!`, to that same full file): a registration committed but
/// answered as failed (its token never shown), the audit writer dead for
/// the hub's life, the stop on `down` or SIGTERM never reached.
#[test]
fn a_hub_whose_disk_fills_keeps_serving_and_stops() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root here");
        return;
    }
    let env = Env::new();
    let disk = Tmpfs::mount(&env.path("state"), "2m");
    let o = env.up();
    assert!(o.ok(), "{o:?}");
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let admin = admin.trim();
    let audit_rows = || {
        let o = env.towerctl(&["audit"]);
        o.stdout.lines().filter(|l| l.contains("/version")).count()
    };

    disk.fill();
    // The log's last page takes a few lines more: enough to pass it.
    for i in 0..80 {
        let o = env.towerctl(&["cluster", "add", &format!("full{i}")]);
        assert!(
            o.ok() && o.stdout.contains("TOWERCTL_TOKEN="),
            "a registration with the log's disk full: {o:?}"
        );
    }
    for _ in 0..5 {
        let (status, _) = support::gateway_get(&env, admin, "/clusters/full0/version");
        assert_eq!(status, "503", "the gateway answers with its disk full");
    }
    // Given the audit writer's time to fail on each of them.
    std::thread::sleep(Duration::from_millis(1500));

    disk.free();
    let before = audit_rows();
    support::wait_for(
        "the audit log to take records again",
        Duration::from_secs(15),
        || {
            let _ = support::gateway_get(&env, admin, "/clusters/full0/version");
            (audit_rows() > before).then_some(())
        },
    );
    let o = env.towerctl(&["cluster", "add", "after"]);
    assert!(o.ok(), "{o:?}");
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(
        log.contains("log lines could not be written"),
        "the log says lines were lost: {log}"
    );

    disk.fill();
    let o = env.towerctl(&["down"]);
    assert!(o.ok(), "down with the log's disk full: {o:?}");
    assert!(env.pid_of("hub").is_none(), "the hub stopped");
    disk.free();

    // A hub started on a full disk says so, not "exited (code 101)".
    let env = Env::new();
    let disk = Tmpfs::mount(&env.path("state"), "1m");
    disk.fill();
    let o = env.up_unchecked();
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.all().contains("is full: free space there") && !o.all().contains("code 101"),
        "{o:?}"
    );
    disk.free();
}
