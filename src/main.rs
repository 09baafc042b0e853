//! towerctl: one binary for the hub, the agent and the operator's CLI.
//! `main` parses arguments and dispatches; nothing else.

mod commands;
mod daemon;
mod paths;
mod secrets;
mod tui;
mod tunnel;

use std::process::ExitCode;

fn init_logging(verbose: u8, daemon: bool) {
    let default = match (verbose, daemon) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    // rustls warns once per TLS handshake from a client that sends an IP
    // address as SNI (curl, wrk): an unauthenticated peer must not be able
    // to write a log line per connection, so only its errors show.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("towerctl={default},rustls=error,warn"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && !daemon)
        .try_init();
}

fn main() -> ExitCode {
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
    // The dashboard owns the screen: a log line on stderr would be drawn
    // over it, so it logs nothing.
    if !matches!(cli.command, commands::Command::Ui(_)) {
        init_logging(cli.verbose, is_daemon);
    }
    // One TLS crypto provider for the whole process, chosen explicitly, so a
    // stray feature elsewhere in the tree can never make TLS set-up panic.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(commands::exit::ERROR);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = if daemon::agent::is_fatal(&e) {
                commands::exit::AUTH
            } else {
                commands::exit::ERROR
            };
            ExitCode::from(code)
        }
    }
}
