//! A background daemon's log, rotated by size like the audit log.
//!
//! `process::spawn` points the daemon's stdout and stderr at its log file
//! (so a panic or an error before logging starts lands there too) and names
//! the file in [`LOG_ENV`]. The daemon then logs through [`Rotating`]:
//! every line goes to stderr, and when the file would pass [`max_bytes`]
//! it is renamed to `.1` (older ones shift up to `.3`, the oldest is
//! removed), a new file is opened and put in place of stdout and stderr
//! (`dup2`), so everything the process writes follows to the new file. A
//! flood of log lines (failed logins, refused connections) thus costs at
//! most `(KEEP + 1) × max_bytes` of disk, never the disk.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Names the log file of a daemon started in the background.
pub const LOG_ENV: &str = "TOWERCTL_LOG_FILE";
/// Test hook: a smaller rotation size, in bytes (at least 4 KiB).
pub const LOG_MAX_ENV: &str = "TOWERCTL_LOG_MAX_BYTES";
/// Rotate when the current file passes this size.
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept besides the current one (`hub.log.1` … `.3`).
pub const KEEP: usize = 3;

/// The rotation size: [`MAX_BYTES`] unless [`LOG_MAX_ENV`] says otherwise.
pub fn max_bytes() -> u64 {
    std::env::var(LOG_MAX_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|v| v.max(4096))
        .unwrap_or(MAX_BYTES)
}

/// `path.N`.
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

struct State {
    path: PathBuf,
    size: u64,
    max: u64,
    /// Lines that could not be written (a full disk) since the last that
    /// could, and why: said in a line of their own once one can be.
    lost: u64,
    why: String,
}

/// A `tracing` writer for a daemon's own log file (see the module doc).
#[derive(Clone)]
pub struct Rotating(Arc<Mutex<State>>);

impl Rotating {
    /// For the file stderr already points at (`path`, from [`LOG_ENV`]).
    /// Also the process's [`daemon_log`], through which its console
    /// output (a port-forward's "Handling connection for" lines) is
    /// written and counted too: counted only in the logger's lines, a
    /// forward that printed but never logged grew its file without end.
    pub fn new(path: PathBuf) -> Rotating {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let r = Rotating(Arc::new(Mutex::new(State {
            path,
            size,
            max: max_bytes(),
            lost: 0,
            why: String::new(),
        })));
        let _ = DAEMON_LOG.set(r.clone());
        r
    }

    fn write_line(&self, buf: &[u8]) -> std::io::Result<()> {
        self.write_counted(buf, false)
    }

    /// `buf` to stderr (or stdout, the same file), rotating first when it
    /// would pass the bound.
    pub fn write_counted(&self, buf: &[u8], stdout: bool) -> std::io::Result<()> {
        // A poisoned lock only means another thread panicked mid-write; the
        // counters are still usable.
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if st.size > 0 && st.size + buf.len() as u64 > st.max {
            match rotate(&st.path) {
                Ok(()) => st.size = 0,
                // Keep logging to the current file rather than lose lines;
                // retry at the next line.
                Err(e) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "cannot rotate the log '{}': {e}",
                        st.path.display()
                    );
                }
            }
        }
        if st.lost > 0 {
            let note = format!(
                "towerctl: {} log lines could not be written ({}): free space on the log's disk\n",
                st.lost, st.why
            );
            if std::io::stderr().write_all(note.as_bytes()).is_ok() {
                st.size += note.len() as u64;
                st.lost = 0;
            }
        }
        let written = if stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(buf).and_then(|()| out.flush())
        } else {
            std::io::stderr().write_all(buf)
        };
        match written {
            Ok(()) => {
                st.size += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                st.lost += 1;
                st.why = e.to_string();
                Err(e)
            }
        }
    }
}

static DAEMON_LOG: std::sync::OnceLock<Rotating> = std::sync::OnceLock::new();

/// The log file a background daemon writes and rotates, once its logging
/// started ([`Rotating::new`]).
pub fn daemon_log() -> Option<&'static Rotating> {
    DAEMON_LOG.get()
}

/// Shifts `path` to `path.1` (and so on) and points stdout and stderr at a
/// new, empty `path`. The new file is made first: when it cannot be (out
/// of descriptors, a full disk), nothing moves, and the line goes on in
/// the current file. (Shifted first, a failure after the shift left the
/// live file at `.1`, the next attempt at `.2`, then deleted, the daemon
/// logging to a deleted file for good.) A `path` removed by hand is made
/// again.
fn rotate(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let next = {
        let mut s = path.as_os_str().to_owned();
        s.push(".next");
        PathBuf::from(s)
    };
    // Append mode, as the first file: emptied in place (`: > hub.log`,
    // logrotate's copytruncate), the log goes on from its start, not at
    // the old offset after a hole.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&next)?;
    f.set_len(0)?;
    let _ = std::fs::remove_file(rotated(path, KEEP));
    for i in (1..KEEP).rev() {
        let _ = std::fs::rename(rotated(path, i), rotated(path, i + 1));
    }
    match std::fs::rename(path, rotated(path, 1)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
    }
    if let Err(e) = std::fs::rename(&next, path) {
        let _ = std::fs::rename(rotated(path, 1), path);
        let _ = std::fs::remove_file(&next);
        return Err(e);
    }
    for fd in [1, 2] {
        // SAFETY: dup2 onto the process's own stdout/stderr from a valid,
        // open descriptor; `f` is closed afterwards, the duplicates stay.
        if unsafe { libc::dup2(f.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One log line being written (tracing's fmt layer writes each event with
/// one `write_all`, so a line never straddles two files). A line that
/// cannot be written (the log's disk full) is counted and said later,
/// never an error: tracing reports a writer's error with `eprintln!`,
/// which panics when stderr (this very file) cannot be written, and the
/// panic took whatever was logging with it (a registration answered as
/// failed after its commit, the audit writer for good, the stop on
/// SIGTERM).
pub struct Line(Rotating);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_line(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Rotating {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(self.clone())
    }
}
