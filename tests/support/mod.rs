//! End-to-end test harness: an isolated towerctl installation (HOME and
//! XDG dirs in a temp dir), the real `towerctl` binary and the real
//! `kubectl`. Every wait is bounded; every process started is stopped.

#![allow(dead_code)]

pub mod apiserver;
pub mod tls_front;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOWERCTL: &str = env!("CARGO_BIN_EXE_towerctl");

pub fn kubectl_path() -> &'static str {
    if Path::new("/usr/bin/kubectl").exists() {
        "/usr/bin/kubectl"
    } else {
        "kubectl"
    }
}

/// One isolated installation: hub and agents started from it share its
/// HOME and XDG directories and nothing else.
pub struct Env {
    pub dir: tempfile::TempDir,
}

pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Out {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Env {
    pub fn new() -> Env {
        // Short base path: Unix socket paths are limited to ~104 bytes.
        let dir = tempfile::Builder::new()
            .prefix("tw")
            .tempdir_in("/tmp")
            .unwrap();
        for d in ["home", "config", "data", "state", "run"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("run"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        Env { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn apply_env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_DATA_HOME", self.path("data"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("NO_COLOR", "1");
    }

    pub fn towerctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(TOWERCTL);
        self.apply_env(&mut c);
        c.args(args);
        c
    }

    /// `towerctl hub run` in the foreground, on free loopback ports,
    /// without the metrics listener (as a systemd unit or a container
    /// runs the hub).
    pub fn hub_run_cmd(&self) -> Command {
        self.towerctl_cmd(&[
            "hub",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:0",
            "--metrics",
            "off",
        ])
    }

    pub fn towerctl(&self, args: &[&str]) -> Out {
        run_bounded(self.towerctl_cmd(args), Duration::from_secs(60))
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kubectl_path());
        self.apply_env(&mut c);
        c.args(args);
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Out {
        let mut full = vec!["--request-timeout=20s"];
        full.extend_from_slice(args);
        run_bounded(self.kubectl_cmd(&full), Duration::from_secs(40))
    }

    /// `towerctl up` on loopback ephemeral ports.
    pub fn up(&self) -> Out {
        self.up_on("127.0.0.1:0", "127.0.0.1:0")
    }

    pub fn up_on(&self, listen: &str, gateway: &str) -> Out {
        self.up_on_with(listen, gateway, &[])
    }

    /// `towerctl up` on ephemeral loopback ports, metrics off, under
    /// `ulimit -n nofile` (the hub sizes its admission caps from it), with
    /// the `extra` flags; bounded to 30 s.
    #[allow(dead_code)]
    pub fn up_limited(&self, nofile: u32, extra: &[&str]) -> Out {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "ulimit -n {nofile} && exec {TOWERCTL} up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 --metrics off {}",
            extra.join(" ")
        ));
        self.apply_env(&mut c);
        run_bounded(c, Duration::from_secs(30))
    }

    /// [`Env::up`] with more flags.
    #[allow(dead_code)]
    pub fn up_with(&self, extra: &[&str]) -> Out {
        self.up_on_with("127.0.0.1:0", "127.0.0.1:0", extra)
    }

    pub fn up_on_with(&self, listen: &str, gateway: &str, extra: &[&str]) -> Out {
        let mut args = vec![
            "up",
            "--listen",
            listen,
            "--gateway",
            gateway,
            "--keepalive",
            "1s",
            // Never a fixed port in tests.
            "--metrics",
            "127.0.0.1:0",
        ];
        // A test's own keepalive in place of the 1 s one.
        if extra.contains(&"--keepalive") {
            args.drain(5..7);
        }
        args.extend_from_slice(extra);
        let o = self.towerctl(&args);
        assert!(o.ok(), "towerctl up failed: {o:?}");
        o
    }

    /// `towerctl up` on ephemeral loopback ports, metrics off, that may
    /// fail: its output, unchecked.
    #[allow(dead_code)]
    pub fn up_unchecked(&self) -> Out {
        run_bounded(self.up_cmd(&[], "off"), Duration::from_secs(60))
    }

    /// `towerctl up` on ephemeral loopback ports, metrics on `metrics`,
    /// with extra environment variables.
    fn up_cmd(&self, vars: &[(&str, &str)], metrics: &str) -> Command {
        let mut c = self.towerctl_cmd(&[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:0",
            "--metrics",
            metrics,
        ]);
        c.envs(vars.iter().copied());
        c
    }

    /// `towerctl up` on loopback ephemeral ports, metrics off, with extra
    /// environment variables (limits read by the hub at start).
    pub fn up_with_env(&self, vars: &[(&str, &str)]) -> Out {
        self.up_with_env_metrics(vars, "off")
    }

    /// [`Env::up_with_env`] with metrics on `metrics` (an address or `off`).
    pub fn up_with_env_metrics(&self, vars: &[(&str, &str)], metrics: &str) -> Out {
        let o = run_bounded(self.up_cmd(vars, metrics), Duration::from_secs(60));
        assert!(o.ok(), "towerctl up failed: {o:?}");
        o
    }

    /// Status of the hub and agents as JSON.
    pub fn status(&self) -> serde_json::Value {
        let o = self.towerctl(&["status", "-o", "json"]);
        serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("status -o json: {e}: {o:?}"))
    }

    /// The port of the hub's gateway listener.
    pub fn gateway_port(&self) -> u16 {
        let s = self.status();
        s["hub"]["gatewayAddress"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no gateway address in {s}"))
    }

    /// `cluster add NAME`; returns the printed join command's arguments
    /// (without the leading `towerctl`).
    pub fn cluster_add(&self, name: &str) -> Vec<String> {
        let o = self.towerctl(&["cluster", "add", name]);
        assert!(o.ok(), "cluster add: {o:?}");
        printed_command(&o.stdout, "join")
    }

    /// Runs the join command with extra flags (member kubeconfig, fast keepalive).
    pub fn join(&self, join: &[String], extra: &[&str]) -> Out {
        self.join_with_env(join, extra, &[])
    }

    pub fn join_with_env(&self, join: &[String], extra: &[&str], vars: &[(&str, &str)]) -> Out {
        let mut args: Vec<&str> = join.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let mut cmd = self.towerctl_cmd(&args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        run_bounded(cmd, Duration::from_secs(60))
    }

    pub fn pid_of(&self, daemon: &str) -> Option<i32> {
        std::fs::read_to_string(
            self.path("run")
                .join("towerctl")
                .join(format!("{daemon}.pid")),
        )
        .ok()?
        .trim()
        .parse()
        .ok()
    }

    pub fn kill9(&self, daemon: &str) {
        let pid = self
            .pid_of(daemon)
            .unwrap_or_else(|| panic!("no pid for {daemon}"));
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        wait_for(
            &format!("{daemon} (pid {pid}) to die"),
            Duration::from_secs(10),
            || (!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)).then_some(()),
        );
    }
}

/// Sends SIGCONT to `pid` when dropped (also when the test fails): a
/// process the test stopped must not outlive it stopped.
#[allow(dead_code)]
pub fn scopeguard_cont(pid: i32) -> impl Drop {
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            // SAFETY: a plain signal to a process the test started.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    Cont(pid)
}

pub fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().map(String::as_str) == Some("Z"))
}

/// CPU time `pid` has used so far (user and system), in clock ticks
/// (`/proc/PID/stat`'s utime and stime; 100 a second on Linux).
pub fn cpu_ticks(pid: i32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            f.get(11..13)
                .map_or(0, |t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        })
        .unwrap_or_default()
}

/// The fields of `/proc/PID/stat` after the command name (which may hold
/// spaces and parentheses): `[0]` is the state, `[7]` the minor faults.
/// `None` once the process is gone.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().map(String::from).collect())
}

impl Drop for Env {
    fn drop(&mut self) {
        // Stop every daemon this installation started, by pid.
        let run = self.path("run").join("towerctl");
        if let Ok(rd) = std::fs::read_dir(&run) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Ok(pid) = std::fs::read_to_string(e.path()).map(|s| s.trim().to_string())
                    {
                        if !pid.is_empty() {
                            let _ = Command::new("kill").args(["-9", &pid]).status();
                        }
                    }
                }
            }
        }
    }
}

/// A long-running child (e.g. `kubectl get -w`) whose output is collected
/// in the background; killed on drop.
pub struct Streaming {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Streaming {
    pub fn start(mut cmd: Command) -> Streaming {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Streaming { child, out }
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the child has exited (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("'{needle}' in streamed output"), timeout, || {
            self.output().contains(needle).then_some(())
        });
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP CONNECT proxy on loopback that records the targets it
/// was asked for. Threads end when their connections close; the listener
/// thread ends with the test process.
pub struct ConnectProxy {
    pub addr: std::net::SocketAddr,
    pub targets: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Each CONNECT's `Proxy-Authorization` value, in order.
    pub auths: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = targets.clone();
        let auths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = auths.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                let (t, a) = (t.clone(), a.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(client.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut auth = None;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = h.split_once(':') {
                            if name.eq_ignore_ascii_case("proxy-authorization") {
                                auth = Some(value.trim().to_string());
                            }
                        }
                    }
                    t.lock().unwrap().push(target.clone());
                    a.lock().unwrap().push(auth);
                    let mut client_w = client.try_clone().unwrap();
                    let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                        let _ = client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                        return;
                    };
                    // As proxies do for interactive traffic (HAProxy, Envoy):
                    // no small write waits for the peer's delayed ACK.
                    let _ = client_w.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = client_w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                    let mut up_r = upstream.try_clone().unwrap();
                    let mut up_w = upstream;
                    let mut client_r = reader;
                    let a = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_r, &mut up_w);
                        let _ = up_w.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut up_r, &mut client_w);
                    let _ = client_w.shutdown(std::net::Shutdown::Write);
                    let _ = a.join();
                });
            }
        });
        ConnectProxy {
            addr,
            targets,
            auths,
        }
    }
}

/// A TCP relay on loopback that delivers what it reads, each way, `delay`
/// after it read it, in order (a long link where the kernel has no netem):
/// a connection through it has a round trip of twice `delay`. Threads end
/// when their connections close; the listener thread ends with the test
/// process.
pub struct DelayProxy {
    pub addr: std::net::SocketAddr,
}

impl DelayProxy {
    pub fn start(target: std::net::SocketAddr, delay: Duration) -> DelayProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                let Ok(upstream) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for s in [&client, &upstream] {
                    let _ = s.set_nodelay(true);
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    Self::direction(from, to, delay);
                }
            }
        });
        DelayProxy { addr }
    }

    fn direction(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
        use std::io::{Read, Write};
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = from.read(&mut buf).unwrap_or(0);
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                    || n == 0
                {
                    return;
                }
            }
        });
        std::thread::spawn(move || {
            for (due, bytes) in rx {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if bytes.is_empty() || to.write_all(&bytes).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// A tiny HTTP server on loopback answering every request with `body`;
/// it stands for a workload inside a member. Thread-per-connection, ends
/// with the test process.
pub fn http_server(body: &'static str) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut w = c;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// The `towerctl SUB …` line printed on `stdout` (by `cluster add|rotate`,
/// `operator add`), as the arguments after `towerctl`. The printed line
/// passes the token in `TOWERCTL_TOKEN` / `TOWERCTL_OPERATOR_TOKEN` (never
/// as an argument); here it becomes `--token TOKEN` after the first
/// operand, so that tests can swap it. Panics when there is no such line or
/// the token is on the command line.
pub fn printed_command(stdout: &str, sub: &str) -> Vec<String> {
    let needle = format!("towerctl {sub} ");
    let line = stdout
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no '{needle}…' line printed: {stdout}"));
    assert!(
        line.starts_with(' ') && !line.contains("--token"),
        "the token must travel in the environment, on a line shells keep out of history: {line}"
    );
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "towerctl").unwrap();
    let token = words[..at]
        .iter()
        .find_map(|w| {
            w.split_once('=')
                .filter(|(k, _)| k.starts_with("TOWERCTL_"))
        })
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("no token variable in: {line}"));
    let mut args: Vec<String> = words[at + 1..].iter().map(|w| w.to_string()).collect();
    args.splice(2..2, ["--token".to_string(), token]);
    args
}

/// The local port `towerctl port-forward` / `kubectl port-forward` printed
/// (`Forwarding from 127.0.0.1:PORT -> …`).
pub fn forwarded_port(s: &Streaming) -> u16 {
    s.wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(20));
    s.output()
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `curl -sS --max-time MAX URL`, bounded.
pub fn curl_within(url: &str, max_secs: u64) -> Out {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", &max_secs.to_string(), url]);
    run_bounded(cmd, Duration::from_secs(max_secs + 10))
}

/// Open file descriptors of process `pid`.
/// Open descriptors of `pid`. towerctl's processes are not dumpable, so
/// this needs root (or CAP_SYS_PTRACE): said, rather than counted as none.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                panic!("cannot list /proc/{pid}/fd ({e}): run the tests as root")
            }
            _ => panic!("cannot list /proc/{pid}/fd ({e}): has the process ended?"),
        })
}

/// `operator add NAME` on `hub`, an access rule letting it reach `alpha`,
/// and `login` on a machine of its own.
pub fn operator_laptop(hub: &Env, name: &str) -> Env {
    let o = hub.towerctl(&["operator", "add", name]);
    assert!(o.ok(), "{o:?}");
    let allow = format!("operator:{name}");
    assert!(hub
        .towerctl(&["access", "allow", &allow, "--names", "alpha"])
        .ok());
    let login = printed_command(&o.stdout, "login");
    let laptop = Env::new();
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let o = laptop.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    laptop
}

/// A TCP echo server on loopback: every connection gets its bytes back
/// until it closes. Threads end with their connections (the listener's
/// with the test process).
pub fn echo_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
            });
        }
    });
    port
}

/// Minor page faults process `pid` has taken so far (`/proc/PID/stat`).
pub fn minor_faults(pid: i32) -> u64 {
    stat_fields(pid).unwrap()[7].parse().unwrap()
}

/// Sends `msg` on `c` and reads it back.
pub fn echo(c: &mut std::net::TcpStream, msg: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    c.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).map_err(|e| e.to_string())?;
    (got == msg.as_bytes())
        .then_some(())
        .ok_or_else(|| format!("got {:?}", String::from_utf8_lossy(&got)))
}

/// A port nothing listens on (loopback and any address), for a process
/// that binds it later. Taken from below the kernel's ephemeral range
/// (32768–60999 by default): a port from that range, released here, may be
/// taken meanwhile by another test's listener on port 0, and then this
/// test's client reaches that test's hub (or this test's process cannot
/// listen). Tests share one network namespace.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Never the same one twice in a process (two picks before either is
    // bound).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-31999 after 1,000 tries")
}

/// Established TCP connections (IPv4 and IPv6) whose remote port is `port`.
pub fn established_to(port: u16) -> usize {
    connections_to(port, &["01"])
}

/// Established TCP connections of process `pid` (IPv4 and IPv6) whose
/// remote port is `port`. Tests run side by side in one network namespace:
/// another test's client that probes a port it took for free (and that a
/// hub of this test took meanwhile) is counted by [`established_to`], not
/// here.
#[allow(dead_code)]
pub fn established_from(pid: i32, port: u16) -> usize {
    sockets_of(pid, port, &["01"])
}

/// TCP sockets of process `pid` whose remote port is `port`, in one of
/// `states` (`/proc/net/tcp` codes: 01 established, 05 FIN-WAIT-2 …).
#[allow(dead_code)]
pub fn sockets_of(pid: i32, port: u16, states: &[&str]) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    tcp_sockets()
        .filter(|t| t.remote_port == port && states.contains(&t.state.as_str()))
        .filter(|t| inodes.contains(&t.inode))
        .count()
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    /// `01` established, `06` time-wait, …
    state: String,
    /// Bytes queued to be sent.
    tx_queue: u64,
    inode: String,
}

/// Every TCP socket of the network namespace, both families.
fn tcp_sockets() -> impl Iterator<Item = TcpSocket> {
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.lines().skip(1).map(str::to_string).collect::<Vec<_>>()
        })
        .filter_map(move |l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(TcpSocket {
                local_port: port(cols.get(1)?)?,
                remote_port: port(cols.get(2)?)?,
                state: cols.get(3)?.to_string(),
                tx_queue: u64::from_str_radix(cols.get(4)?.split(':').next()?, 16).unwrap_or(0),
                inode: cols.get(9)?.to_string(),
            })
        })
}

/// A `kB` field of `/proc/PID/status` (VmRSS, RssAnon, …); None if the
/// process or the field is gone.
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// How many times the threads of process `pid` went to sleep waiting
/// (voluntary context switches, summed over its threads).
pub fn sleeps(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Client-side TCP connections to loopback `port` in any of `states`
/// (`/proc/net/tcp` codes: 01 established, 06 time-wait, …).
pub fn connections_to(port: u16, states: &[&str]) -> usize {
    tcp_sockets()
        .filter(|t| t.remote_port == port && states.contains(&t.state.as_str()))
        .count()
}

/// Bytes queued in the kernel to be sent on the established connections
/// accepted at loopback `port` (the listener's side: `tx_queue` in
/// `/proc/net/tcp`), added up.
#[allow(dead_code)]
pub fn send_queue_of(port: u16) -> u64 {
    tcp_sockets()
        .filter(|t| t.local_port == port && t.state == "01")
        .map(|t| t.tx_queue)
        .sum()
}

/// A raw HTTP/1.1 CONNECT to `authority` through `env`'s gateway, as the
/// admin operator, with `extra` header lines (each ending in CRLF): the
/// answer's head (lower case) and the TLS stream, whose next bytes are the
/// raw stream's.
pub fn raw_connect(
    env: &Env,
    authority: &str,
    extra: &str,
) -> (
    String,
    rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
) {
    use std::io::Write;
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut s = gateway_stream(env);
    let head = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {}\r\n{extra}\r\n",
        token.trim()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The answer's head, byte by byte: what follows is the stream's.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .expect("the gateway's answer ended early");
        head.push(b[0]);
    }
    (String::from_utf8_lossy(&head).to_ascii_lowercase(), s)
}

/// A TLS connection to `env`'s gateway (server name `localhost`), reads
/// bounded to 15 s.
pub fn gateway_stream(
    env: &Env,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let gw = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let tcp = std::net::TcpStream::connect(&gw).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(gateway_tls(env), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Everything `s` gives until it ends, fails or times out.
pub fn read_until_closed(s: &mut impl std::io::Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A CONNECT to the echo target at `authority` with "hello early" in its
/// `towerctl-early` header ([`raw_connect`]): the gateway says it took all
/// 11 bytes, and they come back with nothing written on the stream. The
/// stream, to go on with.
pub fn connect_with_first_bytes_echoed(
    env: &Env,
    authority: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let (head, mut s) = raw_connect(env, authority, "towerctl-early: aGVsbG8gZWFybHk=\r\n");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("towerctl-early-taken: 11\r\n"), "{head}");
    let mut got = [0u8; 11];
    s.read_exact(&mut got)
        .expect("the target did not get the bytes sent with the CONNECT");
    assert_eq!(&got, b"hello early");
    s
}

/// A TLS client configuration that trusts the hub's gateway CA.
pub fn gateway_tls(env: &Env) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(env.path("data/towerctl/ca.crt")).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Service `NAME` in namespace `default` of `api`, port `port` (named
/// `tcp`), whose one endpoint is a fresh [`echo_server`] on loopback.
pub fn echo_service(api: &apiserver::ApiServer, name: &str, port: u16) {
    let upstream = echo_server();
    api.add_service(
        "default",
        name,
        &[("tcp", port, apiserver::TargetPort::Name("tcp"))],
        &[("app", name)],
    );
    api.set_endpoints("default", name, &[("127.0.0.1", "tcp", upstream)]);
}

/// GET through the gateway with a bearer token: (status, body).
pub fn gateway_get(hub: &Env, token: &str, path: &str) -> (String, String) {
    gateway_get_with(hub, token, path, &[])
}

/// [`gateway_get`] with extra request headers (`Name: value`).
pub fn gateway_get_with(hub: &Env, token: &str, path: &str, headers: &[&str]) -> (String, String) {
    let gw = hub.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let ca = hub.path("data/towerctl/ca.crt");
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--path-as-is",
        "--max-time",
        "10",
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-w",
        "\n%{http_code}",
        &format!("{gw}{path}"),
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let o = run_bounded(cmd, Duration::from_secs(20));
    let (body, code) = o.stdout.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

/// GET http://ADDR/PATH with a plain TCP client.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The hub's metrics address (`HOST:PORT`), as `towerctl up` prints it for
/// a running hub.
pub fn metrics_addr(env: &Env) -> String {
    let o = env.towerctl(&["up"]);
    o.stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("metrics:"))
        .unwrap_or_else(|| panic!("no metrics address: {o:?}"))
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string()
}

/// The value of the metric line that starts with `series` (name and labels).
pub fn metric(addr: &str, series: &str) -> u64 {
    let page = http_get(addr, "/metrics");
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{page}"))
}
