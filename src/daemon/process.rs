//! Background daemons: started as a fresh `towerctl` process in its own
//! session (never `fork()` after tokio has started), one instance per name
//! guaranteed by a lock on its pid file.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::paths;

/// Set in a daemon's environment by the process that started it.
pub const DAEMON_ENV: &str = "TOWERCTL_DAEMON";

/// Holds the daemon's anchor and pid file locked for its lifetime.
pub struct PidLock {
    // Dropped in this order: the pid file's lock goes first, so that a
    // starter that gets the anchor finds the pid file free too.
    pid: File,
    anchor: Option<File>,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Emptied, not removed: a starter that opened the old file would
        // lock it while another locked a new one at the same path, and two
        // daemons would run. The locks go with the descriptors.
        let _ = self.pid.set_len(0);
        if let Some(a) = &self.anchor {
            let _ = a.set_len(0);
        }
    }
}

/// Opens `path` (0600, created if missing) and locks it, or says who holds
/// it.
fn lock(path: &Path, daemon: &str) -> Result<File> {
    paths::ensure_private_dir(path.parent().unwrap_or(Path::new("/")))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open '{}'", path.display()))?;
    // A few tries: a CLI looking for the daemon holds a shared lock on
    // the anchor for an instant (`paths::anchored`), which must not pass
    // for a running daemon.
    let deadline = Instant::now() + Duration::from_millis(500);
    let (r, err) = loop {
        // SAFETY: flock on a valid, open descriptor.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let err = std::io::Error::last_os_error();
        if r == 0 || Instant::now() >= deadline || err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            break (r, err);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Only a lock held elsewhere is a running daemon (where locks do not
    // work at all, `ENOLCK`, there is nothing to stop).
    if r != 0 && err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        bail!(
            "cannot lock '{}' to run the {daemon} daemon: {err}; its directory must be on a file system with working locks (not an NFS mount without its lock service)",
            path.display()
        );
    }
    if r != 0 {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        let pid = s.lines().next().unwrap_or("").trim().to_string();
        bail!("the {daemon} daemon is already running (pid {pid}); stop it first");
    }
    Ok(f)
}

fn rewrite(f: &mut File, text: &str) -> Result<()> {
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())?;
    f.flush()?;
    Ok(())
}

/// Whether the file system holding `path` has no space left for its user.
fn disk_full(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs fills the zeroed struct it is given from a valid
    // NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0) && st.f_bavail == 0
}

/// Takes the anchor and the pid file of `daemon` (`hub`, `agent-NAME`),
/// or fails when a live daemon holds them. The anchor, in the state
/// directory, is taken first: one daemon per name whatever
/// `XDG_RUNTIME_DIR` says ([`paths::anchor_file`]).
pub fn lock_pid_file(daemon: &str) -> Result<PidLock> {
    let me = std::process::id();
    let dir = paths::runtime_dir();
    // Not in a Kubernetes pod: the kubelet finds its daemon, and a hub
    // pod's state directory is on a volume whose locks a crashed node can
    // leave held (the pod would then never start again).
    let dir_text = std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str());
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let cannot_write = |p: &Path| {
        format!(
            "cannot write '{}' (free space on its disk, or fix the error)",
            p.display()
        )
    };
    let anchor = if !in_pod && !dir_text.contains(&b'\n') {
        let path = paths::anchor_file(daemon);
        let mut a = lock(&path, daemon)?;
        // Ours before anything reads it (a daemon that died left its own).
        let mut text = format!("{me}\n").into_bytes();
        text.extend_from_slice(dir_text);
        text.push(b'\n');
        a.set_len(0)
            .and_then(|()| a.seek(SeekFrom::Start(0)))
            .and_then(|_| a.write_all(&text))
            .and_then(|()| a.flush())
            .with_context(|| cannot_write(&path))?;
        Some(a)
    } else {
        None
    };
    let path = dir.join(format!("{daemon}.pid"));
    let mut pid = lock(&path, daemon)?;
    rewrite(&mut pid, &format!("{me}\n")).with_context(|| cannot_write(&path))?;
    Ok(PidLock { pid, anchor })
}

/// Pid of the running daemon, if one holds its anchor (or, for one started
/// before anchors, its pid file).
pub fn running_pid(daemon: &str) -> Option<u32> {
    if let Some((pid, _)) = paths::anchored(daemon) {
        return valid_pid(pid).then_some(pid);
    }
    let path = paths::pid_file(daemon);
    if !paths::locked_by_someone(&path) {
        return None; // nobody holds it: stale
    }
    let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    valid_pid(pid).then_some(pid)
}

/// Why a daemon that is not running stopped by itself: its log's last
/// line, when that is its last error (`error: …`, what a daemon writes as
/// it exits on one). `None` when it ended otherwise (stopped, killed), or
/// its log cannot be read. Escaped for a terminal.
pub fn last_words(daemon: &str) -> Option<String> {
    last_error_line(&paths::log_file(daemon))
}

fn last_error_line(log: &Path) -> Option<String> {
    const TAIL: u64 = 16 * 1024;
    let mut f = File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut buf = Vec::new();
    f.take(TAIL).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let words = last.strip_prefix("error: ")?.trim();
    (!words.is_empty()).then(|| crate::tunnel::printable(words, 1000))
}

/// A pid towerctl may signal: never 0 or 1 (the process group, init) and
/// never one that would read as negative (`kill(-1)` signals everything).
pub fn valid_pid(pid: u32) -> bool {
    pid > 1 && pid <= i32::MAX as u32
}

/// A daemon being started in the background.
pub struct Spawned {
    pub child: Child,
    pub log: PathBuf,
    offset: u64,
}

/// Starts `towerctl ARGS…` detached, with output appended to the daemon's log.
/// The `-v` count of the command that starts daemons (see [`spawn`]).
static VERBOSITY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Daemons started from now on get `-v` this many times (`towerctl -vv up`
/// starts a hub that logs at debug).
pub fn set_verbosity(n: u8) {
    VERBOSITY.store(n, std::sync::atomic::Ordering::Relaxed);
}

pub fn spawn(daemon: &str, args: &[OsString]) -> Result<Spawned> {
    let exe = std::env::current_exe().context("cannot find the towerctl executable")?;
    let log = paths::log_file(daemon);
    paths::ensure_private_dir(log.parent().unwrap_or(Path::new("/")))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("cannot open the log '{}'", log.display()))?;
    let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    // Secrets given to the foreground command in the environment (the
    // printed join and login lines) are not the daemon's: it has its
    // config and key. Left in, they would also stay readable in
    // /proc/PID/environ for the daemon's whole life.
    // Before the subcommand: a global flag there is never taken for a
    // positional argument.
    for _ in 0..VERBOSITY.load(std::sync::atomic::Ordering::Relaxed).min(2) {
        cmd.arg("-v");
    }
    cmd.args(args)
        .env(DAEMON_ENV, "1")
        // The daemon rotates this file itself (daemon::logfile).
        .env(super::logfile::LOG_ENV, &log)
        .env_remove("TOWERCTL_TOKEN")
        .env_remove("TOWERCTL_OPERATOR_TOKEN")
        // May carry the proxy's password; the agent has it in its config.
        .env_remove("TOWERCTL_PROXY")
        // The caller's systemd notification socket is not the daemon's.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid and close_range are async-signal-safe system calls.
    // setsid detaches the daemon from the terminal's session so a closing
    // shell does not take it down; the descriptors towerctl inherited from
    // its caller (a `flock 9` of a provisioning script, a test harness's
    // pipe) are not the daemon's to hold for its whole life.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            let marked = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            // Kernels before 5.11 (or a seccomp profile without the
            // call): one descriptor at a time, up to the limit.
            if marked != 0 {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(1 << 20) as i32
                } else {
                    1024
                };
                for fd in 3..top {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the daemon")?;
    Ok(Spawned { child, log, offset })
}

impl Spawned {
    /// Polls `check` until it returns `Some`, the daemon exits (its error is
    /// returned), or `timeout` passes.
    pub async fn wait_ready<T, F, Fut>(
        &mut self,
        timeout: Duration,
        mut check: F,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{}", self.failure(status.code()));
            }
            if let Some(v) = check().await {
                return Ok(Some(v));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the daemon logged since it was started (its first 64 KiB).
    fn logged(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(self.offset));
            let _ = f.take(64 * 1024).read_to_string(&mut s);
        }
        s
    }

    /// The message of the last warning the daemon logged since it was
    /// started, without its time and source: why it is not ready yet.
    pub fn last_warning(&self) -> Option<String> {
        let s = self.logged();
        let line = s.lines().rev().find(|l| l.contains(" WARN "))?;
        let (_, rest) = line.split_once(" WARN ")?;
        let msg = rest.split_once(": ").map_or(rest, |(_, m)| m);
        Some(msg.trim().to_string())
    }

    /// The error the daemon printed before exiting, from its log.
    pub fn failure(&self, code: Option<i32>) -> String {
        let s = self.logged();
        // The process's own last words (`error: …` at the start of a
        // line): an "error: " inside them ("I/O error: …") cut off the
        // part naming the file.
        let last = s
            .match_indices("error: ")
            .filter(|(i, _)| *i == 0 || s.as_bytes()[i - 1] == b'\n')
            .last();
        match last {
            Some((i, _)) => s[i + 7..].trim().to_string(),
            // Nothing could be written: a full disk under the log.
            None if disk_full(&self.log) => format!(
                "the daemon exited (code {}) before it was ready, and the disk of its log '{}' is full: free space there, then start it again",
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| "signal".into()),
                self.log.display()
            ),
            None => format!(
                "the daemon exited (code {}) before it was ready; see its log '{}'",
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| "signal".into()),
                self.log.display()
            ),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// As the first process of a container (the hub's pod runs `towerctl hub
/// run` as PID 1), takes the exit of every process orphaned into it: a
/// `towerctl port-forward --background` or a shell's `&` started with
/// `kubectl exec` ends up the hub's child once its parent leaves, and
/// without this stays a zombie for the pod's life, holding a PID of the
/// pod's limit. Taking any child's exit is safe only in a process that
/// waits for no child of its own: the hub starts none (the agent does not
/// call this: kube's exec credential plugins are its children, waited for
/// by kube). Elsewhere (PID not 1) it does nothing.
pub fn reap_orphans_as_init() {
    if std::process::id() != 1 {
        return;
    }
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut child) = signal(SignalKind::child()) else {
            return;
        };
        loop {
            // Every exit so far: signals of several exits coalesce.
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid pointer to an int.
                if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
                    break;
                }
            }
            if child.recv().await.is_none() {
                return;
            }
        }
    });
}

/// Waits (10 s) for a daemon asked to shut down to exit, then sends it
/// SIGTERM (5 s more); fails naming `what` if it is still there.
pub async fn await_exit(pid: u32, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive(pid) && !terminate(pid, Duration::from_secs(5)).await {
        bail!("{what} (pid {pid}) did not stop; stop it with 'kill -9 {pid}'");
    }
    Ok(())
}

/// Sends SIGTERM to `pid` and waits (bounded) for it to go away.
pub async fn terminate(pid: u32, timeout: Duration) -> bool {
    if !valid_pid(pid) {
        return false;
    }
    // SAFETY: plain kill(2) on a pid we read from our own pid file.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}

pub fn alive(pid: u32) -> bool {
    if !valid_pid(pid) {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[cfg(test)]
mod tests {
    /// A log ending in an `error:` line gives it (escaped); one ending
    /// otherwise, or absent, gives nothing.
    #[test]
    fn last_words_are_the_logs_last_error_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent-alpha.log");
        assert_eq!(super::last_error_line(&log), None);
        std::fs::write(
            &log,
            "x INFO tunnel up\nerror: the hub refused \x1b[2Jthe credentials\n\n",
        )
        .unwrap();
        assert_eq!(
            super::last_error_line(&log).as_deref(),
            Some("the hub refused  [2Jthe credentials")
        );
        std::fs::write(&log, "error: old\nx INFO started again\n").unwrap();
        assert_eq!(super::last_error_line(&log), None);
    }

    use super::*;

    #[test]
    fn pids_that_would_signal_more_than_one_process_are_rejected() {
        for bad in [0, 1, u32::MAX, i32::MAX as u32 + 1] {
            assert!(!valid_pid(bad), "{bad}");
            assert!(!alive(bad), "{bad}");
        }
        assert!(valid_pid(std::process::id()));
        assert!(alive(std::process::id()));
    }
}
