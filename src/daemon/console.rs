//! Output written from a thread of its own, so that a terminal or pipe
//! that stops taking it never stops the work of a process carrying
//! connections.
//!
//! `towerctl port-forward` printed a line per accepted connection with
//! `println!` in its accept loop: once its stdout stopped taking output (a
//! terminal paused with Ctrl-S, a pipe nobody drains) the print blocked,
//! and with it every forwarded connection (the process runs them on one
//! thread on small machines). A daemon in the foreground (`hub run`,
//! `agent run`: containers, systemd) logs to stderr, whose reader (a
//! container runtime on a full disk) can stop the same way, and the
//! daemon's tunnels with it. Their lines go to a bounded queue instead; a
//! thread writes them. Past [`WAITING`] writes queued (and the one being
//! written), lines are counted and left out, and a note says how many once
//! what waited has been written.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Writes that may wait for output that is not being taken.
pub const WAITING: usize = 1024;

/// Where a line goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dest {
    Out,
    Err,
}

/// The queue and its writing thread.
pub struct Console {
    tx: Option<SyncSender<(Dest, String)>>,
    lost: Arc<AtomicU64>,
    /// Writes queued and not yet written.
    pending: Arc<AtomicUsize>,
}

impl Console {
    fn start() -> Console {
        Console::writing_with(WAITING, write_to)
    }

    /// A console whose thread writes with `write`, up to `waiting` writes
    /// held while it is busy.
    fn writing_with(waiting: usize, mut write: impl FnMut(Dest, &str) + Send + 'static) -> Console {
        let (tx, rx) = sync_channel::<(Dest, String)>(waiting);
        let lost = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicUsize::new(0));
        let (counted, left) = (lost.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                let Ok(mut msg) = rx.recv() else { return };
                loop {
                    write(msg.0, &msg.1);
                    let next = rx.try_recv();
                    if next.is_err() {
                        // All that waited is written: say what was left
                        // out meanwhile.
                        let n = counted.swap(0, Ordering::Relaxed);
                        if n > 0 {
                            write(
                                Dest::Err,
                                &format!("note: {n} lines of output were left out while nothing took them\n"),
                            );
                        }
                    }
                    left.fetch_sub(1, Ordering::Release);
                    msg = match next {
                        Ok(m) => m,
                        Err(TryRecvError::Empty) => match rx.recv() {
                            Ok(m) => m,
                            Err(_) => return,
                        },
                        Err(TryRecvError::Disconnected) => return,
                    };
                }
            });
        Console {
            // Without the thread, lines are written where they are made.
            tx: spawned.ok().map(|_| tx),
            lost,
            pending,
        }
    }

    /// Writes `text` (whole lines) to `dest` without waiting for whoever
    /// reads it.
    pub fn say(&self, dest: Dest, text: String) {
        let Some(tx) = &self.tx else {
            return write_to(dest, &text);
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full((_, text)) | TrySendError::Disconnected((_, text))) =
            tx.try_send((dest, text))
        {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            let lines = text.lines().count().max(1) as u64;
            self.lost.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Waits up to `limit` for what is queued to be written (before the
    /// process exits). Returns whether it all was.
    pub fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// Writes to the process's stdout or stderr. Output piped into something
/// that stopped reading (`towerctl port-forward … | head`) ends the
/// process quietly, as `println!` did with the panic hook in `main`;
/// other errors (and stderr's) are left: the work goes on.
pub fn write_to(dest: Dest, text: &str) {
    use std::io::Write as _;
    // A background daemon's stdout and stderr are its log file: counted
    // and rotated with its log lines.
    if let Some(log) = super::logfile::daemon_log() {
        let _ = log.write_counted(text.as_bytes(), matches!(dest, Dest::Out));
        return;
    }
    match dest {
        Dest::Out => {
            if let Err(e) = std::io::stdout().lock().write_all(text.as_bytes()) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    std::process::exit(0);
                }
            }
        }
        Dest::Err => {
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    }
}

static CONSOLE: OnceLock<Console> = OnceLock::new();

/// The process's [`Console`], started on first use.
pub fn console() -> &'static Console {
    CONSOLE.get_or_init(Console::start)
}

/// [`Console::drain`] for the process's console, if it was started.
pub fn drain(limit: Duration) -> bool {
    CONSOLE.get().is_none_or(|c| c.drain(limit))
}

/// Log output to stderr through the [`console`]: each formatted event is
/// one write, queued whole.
#[derive(Clone, Copy)]
pub struct QueuedStderr;

impl std::io::Write for QueuedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        console().say(Dest::Err, String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = QueuedStderr;
    fn make_writer(&'a self) -> QueuedStderr {
        QueuedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a console cannot take while its output is held are counted,
    /// never waited for, and the count is said when output moves again.
    #[test]
    fn held_output_costs_lines_never_a_wait() {
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let written = Arc::new(std::sync::Mutex::new(Vec::<(Dest, String)>::new()));
        let w = written.clone();
        let mut first = true;
        let console = Console::writing_with(2, move |dest, text| {
            if std::mem::take(&mut first) {
                // The output holds the first write until released.
                entered_tx.send(()).unwrap();
                released.recv().unwrap();
            }
            w.lock().unwrap().push((dest, text.to_string()));
        });
        console.say(Dest::Out, "line 0\n".into());
        entered.recv().unwrap();
        // Two wait; the rest are left out, and say() returned for each.
        for i in 1..9 {
            console.say(Dest::Out, format!("line {i}\n"));
        }
        // Counted by lines, however many a write holds.
        console.say(Dest::Out, "line 9\nline 10\n".into());
        assert_eq!(console.lost.load(Ordering::Relaxed), 8);
        assert!(
            !console.drain(Duration::from_millis(20)),
            "held: not drained"
        );
        release.send(()).unwrap();
        // Drained: what waited and the note are written.
        assert!(console.drain(Duration::from_secs(10)), "released: drained");
        let got = written.lock().unwrap().clone();
        let line = |d: Dest, t: &str| (d, t.to_string());
        assert_eq!(
            got,
            [
                line(Dest::Out, "line 0\n"),
                line(Dest::Out, "line 1\n"),
                line(Dest::Out, "line 2\n"),
                line(
                    Dest::Err,
                    "note: 8 lines of output were left out while nothing took them\n"
                ),
            ]
        );
    }
}
