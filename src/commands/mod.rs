//! The command line: one module per subcommand, turning user intent into
//! calls on the daemons.

pub mod cluster;
pub mod credential;
pub mod hub;
pub mod join;
pub mod kubeconfig;
pub mod status;
pub mod ui;
pub mod usectx;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit codes, documented in one place (also in `docs/exit-codes.md`).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any error not listed below.
    pub const ERROR: u8 = 1;
    /// Invalid command line.
    pub const USAGE: u8 = 2;
    /// The daemon asked about is not running.
    pub const NOT_RUNNING: u8 = 3;
    /// The hub refused the agent's credentials or presented the wrong key.
    pub const AUTH: u8 = 4;
    /// The hub could not be reached in time.
    pub const UNREACHABLE: u8 = 5;
}

const FOOTER: &str = "\
Exit codes: 0 ok · 1 error · 2 usage · 3 daemon not running · 4 hub refused credentials or wrong hub key · 5 hub unreachable

Quick start:
  towerctl up                       # on the hub
  towerctl cluster add alpha        # prints the join command for the member
  towerctl join alpha --token … --hub ws://HUB:8080/tunnel --hub-key sha256:…   # in the member
  towerctl use alpha && kubectl get nodes";

/// Reach every Kubernetes cluster you run through reverse tunnels to one hub.
#[derive(Debug, Parser)]
#[command(name = "towerctl", version, about, after_help = FOOTER, propagate_version = true)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the hub in the background and print where it listens.
    Up(HubArgs),
    /// Stop the hub started with `towerctl up`.
    Down,
    /// Hub daemon commands.
    #[command(subcommand)]
    Hub(HubCommand),
    /// Manage member clusters on the hub.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Join this member to a hub: start an agent daemon in the background.
    Join(JoinArgs),
    /// Agent daemon commands.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Stop an agent on this machine and forget its configuration.
    Leave {
        /// Cluster name the agent joined as.
        name: String,
    },
    /// Point kubectl at a member: write the `tower-NAME` context and make it current.
    Use(UseArgs),
    /// Show the hub, its members and the agents on this machine.
    Status(StatusArgs),
    /// Live dashboard of the hub's members and this machine's agents.
    Ui(UiArgs),
    /// Print an ExecCredential for kubectl (used by kubeconfig entries).
    #[command(hide = true)]
    Credential {
        /// File holding the operator token.
        #[arg(long)]
        token_file: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Address for agents' tunnels (WebSocket).
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address for the HTTPS gateway kubectl talks to.
    #[arg(long, default_value = "0.0.0.0:9443", value_name = "ADDR")]
    pub gateway: SocketAddr,
    /// Tunnel URL printed in join commands, when agents see the hub under
    /// another address (NAT, ingress, wss://).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Gateway URL written into kubeconfigs, when operators see it under
    /// another address.
    #[arg(long, value_name = "URL")]
    pub gateway_url: Option<String>,
    /// Keepalive interval; a peer silent for three intervals is declared dead.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Run the hub in the foreground (for containers and systemd).
    Run(HubArgs),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Register a member (or issue it a new join token) and print the join command.
    Add {
        /// Cluster name (lowercase letters, digits, '-').
        name: String,
        /// Output format.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// List registered members.
    List,
    /// Forget a member: its token stops working and its session is cut.
    Rm {
        /// Cluster name.
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AgentOpts {
    /// Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…).
    #[arg(long, value_name = "URL")]
    pub hub: Option<String>,
    /// Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN).
    #[arg(long, env = "TOWERCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Fingerprint of the hub's host key (sha256:…), printed by `cluster add`.
    #[arg(long, value_name = "FINGERPRINT")]
    pub hub_key: Option<String>,
    /// Do not verify the hub's host key (unsafe: anyone on the path can impersonate the hub).
    #[arg(long)]
    pub insecure_skip_hub_key: bool,
    /// Kubeconfig of the member's API server (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Keepalive interval.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub keepalive: std::time::Duration,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_cap: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct JoinArgs {
    /// Cluster name, as registered on the hub.
    pub name: String,
    #[command(flatten)]
    pub opts: AgentOpts,
    /// How long to wait for the tunnel before giving up.
    #[arg(long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Run an agent in the foreground (for containers and systemd).
    Run {
        /// Cluster name, as registered on the hub.
        name: String,
        #[command(flatten)]
        opts: AgentOpts,
        /// Read the agent's settings from a file saved by `join`.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["hub", "token", "hub_key"])]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UseArgs {
    /// Member cluster name; `-` returns to the previous context.
    pub name: String,
    /// Kubeconfig file to edit (default: KUBECONFIG's first existing file, or ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    /// Kubeconfig file Enter edits (default: KUBECONFIG's first existing file, or ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// Parses `500ms`, `10s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid duration '{s}': use a number with a unit, like 500ms, 10s, 5m or 1h")
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in '{s}': use ms, s, m or h")),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("invalid duration '{s}': must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Up(a) => hub::up(a).await,
        Command::Down => hub::down().await,
        Command::Hub(HubCommand::Run(a)) => hub::run_foreground(a).await,
        Command::Cluster(ClusterCommand::Add { name, output }) => {
            cluster::add(&name, &output).await
        }
        Command::Cluster(ClusterCommand::List) => cluster::list().await,
        Command::Cluster(ClusterCommand::Rm { name }) => cluster::remove(&name).await,
        Command::Join(a) => join::join(a).await,
        Command::Agent(AgentCommand::Run { name, opts, config }) => {
            join::run_foreground(name, opts, config).await
        }
        Command::Leave { name } => join::leave(&name).await,
        Command::Use(a) => usectx::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Ui(a) => ui::run(a).await,
        Command::Credential { token_file } => credential::run(&token_file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10x").unwrap_err().contains("unit"));
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
