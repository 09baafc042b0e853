//! towerctl: one binary for the hub, the agent and the operator's CLI.
//! `main` parses arguments and dispatches; nothing else.

mod commands;
mod daemon;
mod paths;
mod secrets;
#[cfg(test)]
mod testrng;
mod tui;
mod tunnel;

use std::process::ExitCode;

/// The async runtime. Daemons and port-forwards on small machines run on
/// one thread: every request crosses several tasks (gateway connection,
/// SSH session, channel, upstream pool), and on 2 cores shared with the
/// other processes on the path and the clients, handing those between
/// worker threads costs more than a second worker gains — measured here
/// with wrk through the gateway: 17k → 22k requests/s, p99 2.1 → 1.3 ms;
/// through `towerctl port-forward` via the gateway 22–24k → 25–29k.
/// `TOWERCTL_WORKER_THREADS=N` overrides it (1 = single-threaded); the
/// other commands and the dashboard keep the default pool.
fn runtime(carries_bulk: bool, daemon: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let workers = std::env::var("TOWERCTL_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let single = single_threaded(carries_bulk, cores, workers);
    let mut b = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers {
            b.worker_threads(n);
        }
        b
    };
    if daemon {
        // Blocking work in a daemon is short registry and etcd calls; a
        // burst of them (1,000 agents logging in to a hub on etcd at once)
        // would otherwise start up to 512 threads, each with its stack and
        // malloc arena, and the hub's RSS would keep them (bench/agents.sh
        // with HUBS=3).
        b.max_blocking_threads(16);
    }
    b.enable_all().build()
}

/// Whether the runtime runs on one thread: as `TOWERCTL_WORKER_THREADS`
/// (`workers`) says, else for a process carrying bulk on up to 2 cores.
fn single_threaded(carries_bulk: bool, cores: usize, workers: Option<usize>) -> bool {
    match workers {
        Some(n) => n == 1,
        None => carries_bulk && cores <= 2,
    }
}

/// Logging to the daemon's own file (started in the background), else to
/// stderr: through the console's queue (`daemon::console`) in a process
/// carrying connections (`queued`), whose work must not wait for a reader
/// of stderr that stopped taking output.
///
/// What is logged without `RUST_LOG`: towerctl's own lines at `level`, and
/// of the libraries' only what a peer cannot trigger at will. rustls warns
/// once per TLS handshake from a client that sends an IP address as SNI
/// (curl, wrk), and h2 once per connection that breaks its limits (a reset
/// flood): only their errors show. russh logs peer-chosen strings as they
/// come (an unknown channel request's type, CR and LF included) and an
/// error per unsolicited global request answer (40 bytes each, no budget):
/// an agent's key holder could flood the hub's log and write lines that
/// look like the hub's own; towerctl logs what matters of a session itself,
/// escaped and rate-limited, so russh's lines are off.
fn default_filter(level: &str) -> String {
    format!("towerctl={level},rustls=error,h2=error,russh=off,warn")
}

fn init_logging(verbose: u8, daemon: bool, queued: bool) {
    let default = match (verbose, daemon) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter(default)));
    // A line that cannot be written is not reported with `eprintln!`,
    // which panics when stderr cannot be written (a full disk under a
    // daemon's log, a journal gone) and took the logging task with it.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && !daemon);
    // A daemon started in the background writes its own log file and
    // rotates it by size (daemon::logfile); in the foreground, stderr
    // belongs to whoever started it (a terminal, systemd's journal).
    let log_file = std::env::var_os(crate::daemon::logfile::LOG_ENV).filter(|_| daemon);
    let _ = match log_file {
        Some(path) => fmt
            .with_writer(crate::daemon::logfile::Rotating::new(path.into()))
            .try_init(),
        None if queued => fmt
            .with_writer(crate::daemon::console::QueuedStderr)
            .try_init(),
        None => fmt.with_writer(std::io::stderr).try_init(),
    };
}

/// `towerctl status | head`, `towerctl audit > /dev/full`: the standard
/// library panics when stdout cannot be written (exit 101 and a
/// backtrace). A closed pipe now ends the command quietly (exit 0), as
/// with other tools; any other write error is one line and exit 1. Other
/// panics, and daemons (whose output is their log file), are untouched.
fn quiet_output_errors() {
    if std::env::var_os(daemon::process::DAEMON_ENV).is_some() {
        return;
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            if why.contains("Broken pipe") {
                std::process::exit(0);
            }
            eprintln!("towerctl: cannot write the output: {why}");
            std::process::exit(commands::exit::ERROR.into());
        }
        default(info);
    }));
}

/// Whether `e` is a write to a pipe whose reader is gone.
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    // No core dump of a process that holds tokens and keys (a crash wrote
    // them to a core file, or to systemd-coredump's journal entry, which
    // the adm group reads); this also keeps other processes of the same
    // user from tracing it.
    // SAFETY: PR_SET_DUMPABLE takes plain integers and changes only this
    // process's flag.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    quiet_output_errors();
    // Installed as `kubectl-tower` (a symlink), towerctl is the kubectl
    // plugin `kubectl tower …`: same commands, help names it that way.
    let as_plugin = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f == "kubectl-tower")
        })
        .unwrap_or(false);
    let parsed = {
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = commands::Cli::command();
        if as_plugin {
            cmd = cmd.name("kubectl tower").bin_name("kubectl tower");
        }
        cmd.try_get_matches()
            .and_then(|m| commands::Cli::from_arg_matches(&m))
    };
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                commands::exit::USAGE
            } else {
                commands::exit::OK
            });
        }
    };
    let is_daemon = matches!(
        cli.command,
        commands::Command::Hub(_) | commands::Command::Agent(_)
    );
    // Processes that carry connections for their life: the daemons, and a
    // port-forward, which through the gateway is one of the three on the
    // path (it took ~190,000 page faults per GiB downloaded with the
    // allocator's defaults, about a third of its CPU).
    let carries_bulk = is_daemon || matches!(cli.command, commands::Command::PortForward { .. });
    // The dashboard owns the screen: a log line on stderr would be drawn
    // over it, so it logs nothing.
    if !matches!(cli.command, commands::Command::Ui(_)) {
        // A `port-forward --background` (started by
        // `daemon::process::spawn`) logs to its own file, rotated, as the
        // daemons do. Not any command that finds the variable: the
        // daemons' children inherit it (a kube exec credential plugin that
        // is towerctl would log into the agent's file, and a rotation
        // would point its stdout, the credential, there).
        let background = matches!(cli.command, commands::Command::PortForward { .. })
            && std::env::var_os(daemon::process::DAEMON_ENV).is_some();
        init_logging(cli.verbose, is_daemon || background, carries_bulk);
    }
    // Daemons this command starts in the background log as verbosely.
    daemon::process::set_verbosity(cli.verbose);
    // One TLS crypto provider for the whole process, chosen explicitly, so a
    // stray feature elsewhere in the tree can never make TLS set-up panic.
    let _ = rustls::crypto::ring::default_provider().install_default();

    if carries_bulk {
        // Bulk buffers kept while it works, returned when it is quiet.
        daemon::memory::tune();
    }
    let rt = match runtime(carries_bulk, is_daemon) {
        Ok(rt) => rt,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(commands::exit::ERROR);
        }
    };
    if carries_bulk {
        rt.spawn(daemon::memory::trimmer());
    }
    let result = rt.block_on(commands::run(cli));
    // What went through the console last (why it stops) is written before
    // it exits (nothing to wait for if it was never used).
    daemon::console::drain(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        // Output piped into something that stopped reading (`| head`): a
        // quiet end, as the print macros get from the panic hook above.
        Err(e) if !is_daemon && closed_pipe(&e) => ExitCode::from(commands::exit::OK),
        Err(e) => {
            // Errors can quote what others wrote (etcd's answers, registry
            // records, a member's messages): nothing in them may drive the
            // terminal. Line breaks are kept; only a line that holds control
            // or invisible characters is escaped (its backslashes too, so
            // that the escapes read unambiguously).
            let text = format!("{e:#}");
            let shown: Vec<_> = text
                .split('\n')
                .map(|l| {
                    if tunnel::printable(l, usize::MAX) == l {
                        std::borrow::Cow::Borrowed(l)
                    } else {
                        tunnel::shown(l)
                    }
                })
                .collect();
            // Not `eprintln!`: a daemon's stderr is its log, which may
            // sit on a full disk (the panic made exit code 101).
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {}", shown.join("\n"));
            ExitCode::from(commands::error::exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::single_threaded;

    /// The default filter keeps towerctl's warnings and drops what an
    /// agent's key holder can make russh log (its `log` records arrive as
    /// events of their module's target).
    #[test]
    fn the_default_filter_drops_russhs_lines_and_keeps_towerctls() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(super::default_filter(
                "info",
            )))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "russh::server::encrypted", "Received global request failure for unknown request!");
            tracing::warn!(target: "russh::server::encrypted", "unknown channel request forged\nline");
            tracing::warn!(target: "towerctl::daemon::hub", "kept");
            tracing::info!(target: "towerctl::daemon::hub", "kept too");
            tracing::warn!(target: "hyper", "a library's warning");
        });
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains("unknown"), "{out}");
        assert!(out.contains("kept") && out.contains("kept too"), "{out}");
        assert!(out.contains("a library's warning"), "{out}");
    }

    #[test]
    fn processes_carrying_bulk_run_on_one_thread_on_small_machines() {
        assert!(single_threaded(true, 1, None));
        assert!(single_threaded(true, 2, None));
        assert!(!single_threaded(true, 4, None), "more cores: the pool");
        assert!(!single_threaded(false, 2, None), "other commands: the pool");
        assert!(
            single_threaded(false, 8, Some(1)),
            "TOWERCTL_WORKER_THREADS=1"
        );
        assert!(
            !single_threaded(true, 2, Some(2)),
            "TOWERCTL_WORKER_THREADS=2"
        );
    }
}
