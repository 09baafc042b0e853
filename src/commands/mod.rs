//! The command line: one module per subcommand, turning user intent into
//! calls on the daemons.

pub mod access;
pub mod audit;
pub mod cluster;
pub mod credential;
pub mod fanout;
pub mod gen;
pub mod https;
pub mod hub;
pub mod hubmanifest;
pub mod join;
pub mod kubeconfig;
pub mod manifest;
pub mod mux;
pub mod operator;
pub mod portforward;
pub mod progress;
pub mod service;
pub mod status;
pub mod ui;
pub mod usectx;

pub mod error;

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
    /// The hub's TLS certificate (wss://) was refused.
    pub const TLS: u8 = 6;
    /// `towerctl kubectl` was interrupted (SIGINT), like a shell's 128+2.
    pub const INTERRUPTED: u8 = 130;
}

const FOOTER: &str = "\
Exit codes: 0 ok · 1 error · 2 usage · 3 daemon not running · 4 hub refused credentials or wrong hub key · 5 hub unreachable · 6 hub TLS certificate refused · 130 interrupted

Quick start:
  towerctl up                       # on the hub
  towerctl cluster add alpha        # prints the join command for the member
   TOWERCTL_TOKEN=… towerctl join alpha --hub ws://HUB:8080/tunnel --hub-key sha256:…   # in the member, as printed
  towerctl use alpha && kubectl get nodes";

/// Reach every Kubernetes cluster you run through reverse tunnels to one hub.
#[derive(Debug, Parser)]
#[command(name = "towerctl", version, about, after_help = FOOTER, propagate_version = true)]
pub struct Cli {
    /// More logging (-v info, -vv debug), also in the daemons this command
    /// starts in the background (up, join, port-forward); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the hub in the background and print where it listens.
    Up(UpArgs),
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
    /// Forward local ports to a pod, service or deployment in a member (kubectl syntax).
    #[command(name = "port-forward")]
    ///
    /// On the hub's own machine the hub carries the forwarded connections
    /// itself (this command hands it the listening socket and stays in
    /// charge of it: the forward ends with the command); elsewhere, or with
    /// --gateway or TOWERCTL_FORWARD_VIA=gateway, they go through the
    /// gateway.
    ///
    /// `towerctl port-forward stop ID|--all` ends forwards started with --background.
    PortForward {
        /// Member cluster (or `stop` followed by an ID or --all, without ports).
        cluster: String,
        /// pod/NAME, svc/NAME, a workload's pod (deploy/, rs/, sts/, ds/, job/, rc/NAME), or a
        /// bare pod name (with `stop`: the forward's ID).
        resource: Option<String>,
        /// [LOCAL:]REMOTE port pairs (':REMOTE' picks a free local port).
        ports: Vec<String>,
        /// Keep forwarding in the background after this command returns.
        #[arg(long)]
        background: bool,
        /// With `stop`: end every background forward.
        #[arg(long)]
        all: bool,
        /// Internal: the ID of a background forward this process serves.
        #[arg(long, hide = true)]
        daemon_id: Option<String>,
        /// Namespace of the resource (default: the namespace of the
        /// cluster's kubeconfig context `tower-CLUSTER`, else `default`).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Local addresses to listen on (comma-separated or repeated): IPs or localhost.
        #[arg(long, default_value = "localhost")]
        address: Vec<String>,
        /// Gateway of a hub logged in to (default: the hub on this machine, else the last login).
        #[arg(long, value_name = "URL")]
        gateway: Option<String>,
    },
    /// Print a standalone kubeconfig for some (default: all) members.
    Kubeconfig {
        /// Member names.
        names: Vec<String>,
        /// Gateway of a hub logged in to (default: the hub on this machine, else the last login).
        #[arg(long, value_name = "URL")]
        gateway: Option<String>,
    },
    /// Run kubectl against several members at once, with one merged output.
    #[command(after_help = "\
Examples:
  towerctl kubectl -l env=prod -- get ns
  towerctl kubectl -l 'env in (prod,staging),!canary' --parallel 16 -- get pods -A -o json
  towerctl kubectl alpha beta --timeout 10s -- version

Tables get one header and a leading CLUSTER column; -o json|yaml gives one List whose items
carry the annotation towerctl.io/cluster; other output is prefixed 'NAME | ' (a follow or a watch,
-f or -w, line by line as it comes, every member at once). Failed, down or
timed-out members are listed on stderr at the end; the exit code is 1 if any failed.")]
    Kubectl(FanoutArgs),
    /// Manage operators (people and tools allowed through the gateway).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Which operators may see and reach which members (fail closed: only
    /// what a rule allows).
    #[command(subcommand)]
    Access(AccessCommand),
    /// Use a hub from this machine with an operator token from 'towerctl operator add'.
    Login {
        /// The hub's gateway URL (https://HOST:PORT).
        #[arg(value_parser = parse_gateway_url)]
        gateway: String,
        /// Operator token.
        #[arg(long, env = "TOWERCTL_OPERATOR_TOKEN", hide_env_values = true)]
        token: String,
        /// sha256 of the gateway CA, printed by 'towerctl operator add'.
        #[arg(long, value_name = "sha256:HEX")]
        ca_hash: Option<String>,
        /// Trust the CA the gateway presents without checking it (unsafe).
        #[arg(long)]
        insecure_skip_ca_hash: bool,
    },
    /// Forget a login and its token.
    Logout {
        /// Gateway URL (default: the last login).
        gateway: Option<String>,
    },
    /// Show the hub's audit log: who reached which cluster, how, with what result.
    Audit {
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this operator.
        #[arg(long)]
        operator: Option<String>,
        /// Keep printing new records.
        #[arg(short, long)]
        follow: bool,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Show the hub, its members and the agents on this machine.
    Status(StatusArgs),
    /// Install systemd user units for the daemons.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completion { shell: clap_complete::Shell },
    /// Write completions/ and man/ under DIR (for packagers; the checked-in copies come from it).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
    /// Show a daemon's log: `hub` or an agent's cluster name.
    Logs {
        /// `hub` or the cluster name of an agent on this machine.
        daemon: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end to show first.
        #[arg(long, default_value_t = 200)]
        tail: usize,
    },
    /// Live dashboard of the hub's members and this machine's agents.
    Ui(UiArgs),
    /// Print an ExecCredential for kubectl (used by kubeconfig entries).
    #[command(hide = true)]
    Credential {
        /// File holding the operator token (the hub machine's local admin).
        #[arg(long, conflicts_with = "gateway")]
        token_file: Option<PathBuf>,
        /// Gateway of a hub logged in to: the token comes from the keyring.
        #[arg(long)]
        gateway: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// Print Kubernetes manifests that run the hub (a StatefulSet, with these
    /// flags) instead of starting it here; needs --advertise and --gateway-url.
    #[arg(long)]
    pub print_manifest: bool,
    /// Namespace for --print-manifest.
    #[arg(long, default_value = hubmanifest::DEFAULT_NAMESPACE, requires = "print_manifest")]
    pub namespace: String,
    /// Container image for --print-manifest.
    #[arg(long, default_value = concat!("localhost/towerctl:", env!("CARGO_PKG_VERSION")), requires = "print_manifest")]
    pub image: String,
    /// Hubs to run, for --print-manifest (default: 2 with --store, else 1;
    /// more than one needs --store).
    #[arg(long, value_name = "N", requires = "print_manifest")]
    pub replicas: Option<u32>,
    /// StorageClass of the hubs' volumes, for --print-manifest (default: the
    /// cluster's default class).
    #[arg(long, value_name = "CLASS", requires = "print_manifest")]
    pub storage_class: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Address for agents' tunnels (WebSocket).
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub listen: SocketAddr,
    /// Address for the HTTPS gateway kubectl talks to.
    #[arg(long, default_value = DEFAULT_GATEWAY, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub gateway: SocketAddr,
    /// Tunnel URL printed in join commands, when agents see the hub under
    /// another address (NAT, ingress, wss://).
    #[arg(long, value_name = "URL", value_parser = parse_advertise)]
    pub advertise: Option<String>,
    /// Gateway URL written into kubeconfigs, when operators see it under
    /// another address (https://HOST[:PORT][/PATH]).
    #[arg(long, value_name = "URL", value_parser = parse_gateway_url)]
    pub gateway_url: Option<String>,
    /// With etcd: the gateway URL the other hubs forward requests to this
    /// hub at (default: --gateway-url, else the gateway's address). Give
    /// each hub its own when --gateway-url names a load balancer in front
    /// of several hubs: through it, a request could not reach the hub
    /// holding its member's tunnel.
    #[arg(long, value_name = "URL", requires = "store", value_parser = parse_peer_url)]
    pub peer_url: Option<String>,
    /// Another name or address the gateway's certificate covers (repeatable):
    /// a DNS alias or a load balancer's IP that operators reach it by
    /// besides --gateway-url's host.
    #[arg(long = "tls-san", value_name = "NAME|IP", value_parser = parse_tls_san)]
    pub tls_sans: Vec<String>,
    /// Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead.
    #[arg(long, default_value = "10s", value_parser = parse_hub_keepalive, value_name = "DURATION")]
    pub keepalive: std::time::Duration,
    /// On SIGTERM (a pod being stopped), answer 503 on /readyz for this long,
    /// still serving, before stopping, so that a load balancer or Service
    /// stops sending new connections first (`towerctl down` stops at once).
    /// Default: none (0s); in the pod manifest 5s, 30s behind a load balancer.
    #[arg(long, value_parser = parse_shutdown_delay, value_name = "DURATION")]
    pub shutdown_delay: Option<std::time::Duration>,
    /// Address for Prometheus /metrics (loopback by default), or 'off'.
    #[arg(long, default_value = DEFAULT_METRICS, value_parser = parse_metrics_addr, value_name = "ADDR|off")]
    pub metrics: MetricsAddr,
    /// Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…],
    /// or https://… for TLS); default: the embedded store in the data directory.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Key prefix in etcd, to share one etcd between several hub groups.
    #[arg(long, default_value = "/towerctl/", value_name = "PREFIX")]
    pub store_prefix: String,
    /// With etcd: once this hub's copy of the registry has gone this long
    /// without being confirmed current (etcd or its quorum unreachable
    /// from it), operators other than this hub's local admin are refused
    /// (503), their streams cut and /readyz answers 503, so that a removal
    /// or a narrowed rule made on another hub cannot go unheeded here;
    /// at least 3s; '0' serves from the copy for as long as etcd is away.
    #[arg(long, default_value = "60s", value_parser = parse_max_stale, value_name = "DURATION")]
    pub store_max_stale: MaxStale,
    /// CA bundle (PEM) that issued etcd's serving certificate (https://
    /// endpoints; default: the system store).
    #[arg(long, value_name = "FILE", requires = "store")]
    pub store_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an etcd that requires one
    /// (--client-cert-auth); with --store-key.
    #[arg(long, value_name = "FILE", requires = "store", requires = "store_key")]
    pub store_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "store", requires = "store_cert")]
    pub store_key: Option<std::path::PathBuf>,
    /// User for an etcd with authentication enabled (its role needs
    /// readwrite on the keys under --store-prefix); with
    /// --store-password-file.
    #[arg(
        long,
        value_name = "USER",
        requires = "store",
        requires = "store_password_file"
    )]
    pub store_user: Option<String>,
    /// File holding --store-user's password (its first line; not readable
    /// by others), read at start and again at each login to etcd.
    #[arg(long, value_name = "FILE", requires = "store", requires = "store_user")]
    pub store_password_file: Option<std::path::PathBuf>,
    /// Address or network (CIDR) of an ingress or load balancer in front of
    /// the hub; repeatable. Connections from it count as from the client it
    /// names: in a PROXY protocol header (v1 or v2) or, for HTTP, the
    /// address it appends to X-Forwarded-For.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = crate::daemon::proxied::TrustedProxies::parse_cidr)]
    pub trusted_proxies: Vec<(std::net::IpAddr, u8)>,
    /// With --trusted-proxy: every connection from those addresses must
    /// start with a PROXY protocol header, and X-Forwarded-For is not read.
    /// For a layer-4 load balancer that passes its clients' bytes on
    /// untouched: without it, a client could name any address itself.
    #[arg(long, requires = "trusted_proxies")]
    pub require_proxy_protocol: bool,
}

impl HubArgs {
    /// The etcd TLS and user flags, files as absolute paths (the daemon
    /// starts elsewhere).
    pub fn store_access(&self) -> crate::daemon::etcd::StoreAccess {
        let abs = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        };
        crate::daemon::etcd::StoreAccess {
            ca: abs(&self.store_ca),
            cert: abs(&self.store_cert),
            key: abs(&self.store_key),
            user: self.store_user.clone(),
            password_file: abs(&self.store_password_file),
        }
    }

    /// The flags that start this hub's daemon (`hub run`), for `up` and
    /// the service unit alike.
    pub fn daemon_args(&self) -> Vec<String> {
        let mut args = vec![
            "hub".to_string(),
            "run".into(),
            format!("--listen={}", self.listen),
            format!("--gateway={}", self.gateway),
            format!("--keepalive={}ms", self.keepalive.as_millis()),
            match self.metrics.0 {
                Some(m) => format!("--metrics={m}"),
                None => "--metrics=off".into(),
            },
        ];
        if let Some(u) = &self.advertise {
            args.push(format!("--advertise={u}"));
        }
        if let Some(u) = &self.gateway_url {
            args.push(format!("--gateway-url={u}"));
        }
        if let Some(u) = &self.peer_url {
            args.push(format!("--peer-url={u}"));
        }
        for n in &self.tls_sans {
            args.push(format!("--tls-san={n}"));
        }
        if let Some(d) = self.shutdown_delay {
            args.push(format!("--shutdown-delay={}ms", d.as_millis()));
        }
        args.extend(self.store_args());
        args.extend(self.trusted().to_args());
        args
    }

    pub fn trusted(&self) -> crate::daemon::proxied::TrustedProxies {
        crate::daemon::proxied::TrustedProxies::new(self.trusted_proxies.clone())
            .requiring_header(self.require_proxy_protocol)
    }

    /// `--store…` flags to hand to the daemon.
    pub fn store_args(&self) -> Vec<String> {
        let Some(st) = &self.store else {
            return Vec::new();
        };
        let mut args = vec![
            format!("--store={st}"),
            format!("--store-prefix={}", self.store_prefix),
            format!(
                "--store-max-stale={}",
                self.store_max_stale
                    .0
                    .map_or("0".to_string(), |d| format!("{}ms", d.as_millis()))
            ),
        ];
        let access = self.store_access();
        for (flag, p) in [
            ("--store-ca", &access.ca),
            ("--store-cert", &access.cert),
            ("--store-key", &access.key),
            ("--store-password-file", &access.password_file),
        ] {
            if let Some(p) = p {
                args.push(format!("{flag}={}", p.display()));
            }
        }
        if let Some(u) = &access.user {
            args.push(format!("--store-user={u}"));
        }
        args
    }
}

/// `--metrics`: an address, or off.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    parse_listen_addr(s)
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{e}, or 'off'"))
}

/// An address to listen on, `IP:PORT`, with words for what is not one
/// (clap said "invalid socket address syntax" for `::1:0`, `localhost:0`
/// and `127.0.0.1:65536` alike).
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    let hint = match s.rsplit_once(':') {
        // `::1:0`: an IPv6 address and a port, or an address alone.
        Some((h, p))
            if !s.starts_with('[')
                && h.parse::<std::net::Ipv6Addr>().is_ok()
                && p.parse::<u16>().is_ok() =>
        {
            format!("an IPv6 address goes in brackets, like [{h}]:{p}")
        }
        _ if bare.parse::<std::net::IpAddr>().is_ok() => {
            if bare.contains(':') {
                format!("it has no port: like [{bare}]:8080")
            } else {
                format!("it has no port: like {bare}:8080")
            }
        }
        None => "it has no port".to_string(),
        Some((h, _)) if h.contains(':') && !h.starts_with('[') => {
            format!("an IPv6 address goes in brackets, like [{h}]:PORT")
        }
        Some((_, p)) if p.parse::<u16>().is_err() => {
            format!("'{p}' is not a port (0-65535; 0 picks a free one)")
        }
        Some((h, _))
            if h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_err() =>
        {
            format!("'{h}' is not an IP address (a host name is not taken here: give its address, like 127.0.0.1 or 0.0.0.0 for all)")
        }
        _ => "it is not IP:PORT".to_string(),
    };
    Err(format!(
        "invalid address '{}': {hint}; use IP:PORT, like 0.0.0.0:8080 or [::]:8080",
        crate::tunnel::printable(s, 100)
    ))
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Run the hub in the foreground (for containers and systemd).
    Run(HubArgs),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Register a member and print the join command (the token is shown once).
    Add {
        /// Cluster name (lowercase letters, digits, '-').
        name: String,
        /// Lifetime of the join token (0 = never expires).
        #[arg(long, default_value = "24h", value_parser = parse_ttl, value_name = "DURATION")]
        ttl: u64,
        /// Let the join token be used more than once (agent pods recreated without their key).
        #[arg(long)]
        reusable: bool,
        /// The member lets the agent impersonate operators (its RBAC decides per operator).
        #[arg(long)]
        impersonate: bool,
        /// Push mode: let the member's workloads reach HOST:PORT on the hub side as NAME
        /// (repeatable); the agent listens for them.
        #[arg(long, value_name = "NAME=HOST:PORT", value_parser = parse_expose)]
        expose: Vec<(String, String)>,
        /// A label for selecting members, like env=prod (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::daemon::labels::parse_pair)]
        labels: Vec<(String, String)>,
        /// Output format.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Change a member's settings.
    Set {
        /// Cluster name.
        name: String,
        /// Each operator acts as itself on the member (Impersonate-User and
        /// -Group, so the member's RBAC decides); the agent must run with
        /// --impersonate.
        #[arg(long, conflicts_with = "no_impersonate")]
        impersonate: bool,
        /// Operators act with the agent's own identity; the agent must run
        /// without --impersonate.
        #[arg(long)]
        no_impersonate: bool,
    },
    /// Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label.
    Label {
        /// Cluster name.
        name: String,
        /// KEY=VALUE to set or replace, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
    /// Change what a member's workloads may reach on the hub side (push mode).
    Expose {
        /// Cluster name.
        name: String,
        /// NAME=HOST:PORT to add or replace.
        #[arg(value_name = "NAME=HOST:PORT", value_parser = parse_expose)]
        add: Vec<(String, String)>,
        /// Names to stop exposing.
        #[arg(long, value_name = "NAME")]
        remove: Vec<String>,
    },
    /// Issue a new join token; the old one stops working at once.
    ///
    /// The running agent keeps its session. Whoever joins with the new token
    /// becomes the member: its key replaces the registered one, and the
    /// agent running until then is cut off and refused (give the token to the
    /// member's machine only). --new-key cuts the running agent at once.
    Rotate {
        /// Cluster name.
        name: String,
        /// Lifetime of the join token (0 = never expires).
        #[arg(long, default_value = "24h", value_parser = parse_ttl, value_name = "DURATION")]
        ttl: u64,
        /// Let the join token be used more than once.
        #[arg(long)]
        reusable: bool,
        /// Also retire the agent's registered key and cut its session: the
        /// agent must join again with the new token (a possibly compromised
        /// agent machine).
        #[arg(long)]
        new_key: bool,
        /// Output format.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Cut the member's session now and refuse its agent from now on.
    Revoke {
        /// Cluster name.
        name: String,
    },
    /// List registered members with their state, agent version, key and token.
    List {
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "wide", "json", "yaml"])]
        output: String,
    },
    /// Forget a member: its token and key stop working and its session is cut.
    Rm {
        /// Cluster name.
        name: String,
    },
}

/// A token as pasted (`--token`, `TOWERCTL_TOKEN`, `TOWERCTL_OPERATOR_TOKEN`):
/// spaces and line ends around it go, and what cannot be one is refused
/// in words that name `what` and never repeat it (an empty one was sent
/// and refused by the hub; a pasted CR failed with "failed to parse header
/// value"; 100 KB ended a join with words about a busy hub).
pub fn token_text(what: &str, t: &str) -> anyhow::Result<String> {
    let t = t.trim();
    if t.is_empty() {
        anyhow::bail!("{what} is empty: paste the whole token, as printed on the hub");
    }
    if t.len() > 1024 {
        anyhow::bail!(
            "{what} is {} bytes long, not a towerctl token (some 50 characters): paste the token alone, as printed on the hub",
            t.len()
        );
    }
    if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
        anyhow::bail!(
            "{what} holds a character no token has ({}): paste the token alone, as printed on the hub",
            c.escape_unicode()
        );
    }
    Ok(t.to_string())
}

/// Parses `NAME=HOST:PORT`.
pub fn parse_expose(s: &str) -> Result<(String, String), String> {
    let bad = || format!("invalid expose '{s}': use NAME=HOST:PORT (like db=10.0.0.5:5432)");
    let (name, target) = s.split_once('=').ok_or_else(bad)?;
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    if name.is_empty()
        || host.is_empty()
        || port.parse::<u16>().is_err()
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad());
    }
    // An IPv6 address goes in brackets, as `join --expose` takes it: an
    // unbracketed `::1:5432` was taken here and then read by the agent as
    // another address than the operator meant.
    if host.contains(':') || host.starts_with('[') || host.ends_with(']') {
        // A numeric zone (`fe80::1%2`) as the agent's address parser
        // takes it.
        let inner = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .map(|h| h.split_once('%').map_or(h, |(a, _)| a));
        if inner.is_none_or(|h| h.parse::<std::net::Ipv6Addr>().is_err()) {
            return Err(format!(
                "invalid expose '{s}': an IPv6 address goes in brackets, like db=[fd00::5]:5432"
            ));
        }
    }
    Ok((name.to_string(), target.to_string()))
}

/// Parses a token lifetime in seconds; `0` means no expiry.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_duration(s).map(|d| d.as_secs().max(1))
}

#[derive(Debug, Clone, Args)]
pub struct AgentOpts {
    /// Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…); repeat it for
    /// several hubs of one group: the agent tries them in turn.
    #[arg(long, value_name = "URL")]
    pub hub: Vec<String>,
    /// Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN).
    #[arg(long, env = "TOWERCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The agent's private key (default: created next to its config). With
    /// --print-manifest: the key the Secret gets (a new one if not given).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Add the calling operator's identity as Impersonate-User/Group headers
    /// (the member's RBAC must grant the agent 'impersonate').
    #[arg(long)]
    pub impersonate: bool,
    /// Fingerprint of the hub's host key (sha256:…), printed by `cluster add`.
    #[arg(long, value_name = "FINGERPRINT")]
    pub hub_key: Option<String>,
    /// Do not verify the hub's host key (unsafe: anyone on the path can impersonate the hub).
    #[arg(long)]
    pub insecure_skip_hub_key: bool,
    /// HTTP proxy (CONNECT) to reach the hub through, http://[USER:PASSWORD@]HOST:PORT
    /// (or TOWERCTL_PROXY); without it, HTTPS_PROXY/HTTP_PROXY and NO_PROXY of the
    /// environment, saved with the agent for a later run. Shipped in the Secret with
    /// --print-manifest, which does not take this machine's variables.
    #[arg(
        long,
        env = "TOWERCTL_PROXY",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub proxy: Option<String>,
    /// CA certificates (PEM bundle) to trust for a wss:// hub behind an ingress, besides
    /// the web PKI roots and the system store (SSL_CERT_FILE/SSL_CERT_DIR); read again
    /// when it changes.
    #[arg(long, value_name = "FILE")]
    pub hub_ca: Option<PathBuf>,
    /// Do not verify the wss:// certificate (the WebSocket layer only: the --hub-key pin
    /// still authenticates the hub); refused with --insecure-skip-hub-key.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// Kubeconfig of the member's API server (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Keepalive interval, in whole seconds.
    #[arg(long, default_value = "10s", value_parser = parse_whole_seconds, value_name = "DURATION")]
    pub keepalive: std::time::Duration,
    /// Also let the hub dial HOST[:PORT], CIDR[:PORT] or *.SUFFIX[:PORT] in the member
    /// network (repeatable; the cluster's services, pods and deployments are always allowed;
    /// IPv6 with a port in brackets: [fd00::/8]:443).
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    /// Push mode: listen on ADDR for the member's workloads and carry them to the
    /// hub-side service the hub exposes as NAME (repeatable).
    #[arg(long, value_name = "NAME=ADDR")]
    pub expose: Vec<String>,
    /// How to reach pods: their IPs ('direct'), the API server's pods/portforward
    /// ('portforward', for agents outside the pod network), or IPs first ('auto').
    #[arg(long, default_value = "auto", value_name = "MODE")]
    pub pod_network: String,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_cap: std::time::Duration,
    /// Serve /healthz (alive) and /readyz (tunnel up) over HTTP on ADDR, e.g.
    /// 127.0.0.1:8081 (off by default; the pod manifest turns it on).
    #[arg(long, value_name = "ADDR")]
    pub probe_addr: Option<String>,
    /// In-cluster credentials: directory of the service account's token, ca.crt and
    /// namespace, used with KUBERNETES_SERVICE_HOST/PORT (default:
    /// /var/run/secrets/kubernetes.io/serviceaccount when KUBERNETES_SERVICE_HOST is set
    /// and KUBECONFIG is not).
    #[arg(long, env = "TOWERCTL_SERVICEACCOUNT_DIR", value_name = "DIR")]
    pub serviceaccount_dir: Option<PathBuf>,
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
    /// Print Kubernetes manifests that run the agent in the member instead of starting it here.
    #[arg(long)]
    pub print_manifest: bool,
    /// Namespace for --print-manifest.
    #[arg(long, default_value = "towerctl-system", requires = "print_manifest")]
    pub namespace: String,
    /// Container image for --print-manifest.
    #[arg(long, default_value = concat!("localhost/towerctl:", env!("CARGO_PKG_VERSION")), requires = "print_manifest")]
    pub image: String,
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
        #[arg(long, value_name = "FILE", conflicts_with_all = ["hub", "token", "hub_key", "hub_ca", "insecure_skip_tls_verify"])]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write a systemd user unit (Type=notify) for the hub or an agent.
    #[command(subcommand)]
    Install(ServiceTarget),
}

#[derive(Debug, Subcommand)]
pub enum ServiceTarget {
    /// The hub, with the same flags as 'towerctl up'.
    Hub(Box<HubArgs>),
    /// An agent joined on this machine ('towerctl join' first).
    Agent {
        /// Cluster name the agent joined as.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Issue an operator token and print the 'towerctl login' command for it.
    Add {
        /// Operator name (used as the Kubernetes user when impersonating).
        name: String,
        /// Kubernetes groups of the operator (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// List operators.
    List {
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Remove an operator; its token stops working at once.
    Rm {
        /// Operator name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Let an operator or group see and reach the selected members.
    Allow(AccessRuleArgs),
    /// Refuse an operator or group the selected members (deny wins over allow).
    Deny(AccessRuleArgs),
    /// Remove a rule by its id (open streams it no longer allows are cut).
    Rm {
        /// Rule id, from 'towerctl access list'.
        id: u64,
    },
    /// List the rules.
    List {
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AccessRuleArgs {
    /// operator:NAME or group:NAME (groups from 'towerctl operator add --group').
    #[arg(value_name = "SUBJECT")]
    pub subject: String,
    /// Members by label selector ('team=payments,env in (dev,staging)').
    #[arg(long, value_name = "SELECTOR")]
    pub clusters: Option<String>,
    /// Members by name.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Members whose labels match SELECTOR (env=prod, env!=dev, 'env in (a,b)', 'env notin (a)', canary, !canary; commas join).
    #[arg(short = 'l', long, value_name = "SELECTOR", conflicts_with = "names")]
    pub selector: Option<String>,
    /// Members by name (with neither names nor -l: every member).
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// How many kubectl run at once (default 8; for a follow or a watch, every member).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
    /// Longest one member's kubectl may run; it is then stopped and reported (default 60s; no limit for a follow or a watch: -f, -w).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<std::time::Duration>,
    /// Gateway of a hub logged in to (default: the hub on this machine, else the last login).
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// kubectl's arguments, after '--'.
    #[arg(last = true, required = true, value_name = "KUBECTL_ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct UseArgs {
    /// Member cluster name; `-` returns to the previous context; none lists the members.
    pub name: Option<String>,
    /// Gateway of a hub logged in to (default: the hub on this machine, else the last login).
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
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
    #[arg(short, long, default_value = "table", value_parser = ["table", "wide", "json", "yaml"])]
    pub output: String,
}

/// `--store-max-stale`: a duration, or none (`0`).
#[derive(Clone, Copy, Debug)]
pub struct MaxStale(pub Option<std::time::Duration>);

/// `--store-max-stale`: a duration of three seconds or more, or `0` (also
/// `0s`, `0ms`) for none.
/// `--listen`'s default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// `--gateway`'s default.
pub const DEFAULT_GATEWAY: &str = "0.0.0.0:9443";
/// The hub's Prometheus endpoint unless `--metrics` says otherwise.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// `--advertise`: a `ws://` or `wss://` URL with a host, as join commands,
/// unit files and manifests carry it.
fn parse_advertise(s: &str) -> Result<String, String> {
    let s = s.trim();
    let u = url::Url::parse(s).map_err(|e| {
        format!(
            "'{}' is not a URL ({e}): give ws://HOST:PORT/tunnel or wss://HOST[:PORT]/PATH, the tunnel as agents reach it",
            crate::tunnel::shown(s)
        )
    })?;
    if !matches!(u.scheme(), "ws" | "wss") || u.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "'{}' is not a ws:// or wss:// URL with a host: agents dial the tunnel over WebSocket",
            crate::tunnel::shown(s)
        ));
    }
    plain_url(s, &u, "ws[s]://HOST[:PORT][/PATH]")?;
    Ok(s.to_string())
}

/// What the URL flags refuse besides their scheme: credentials, a query
/// or a fragment, and (the URL parser drops tabs and newlines and keeps
/// spaces and shell characters in a path) white space, control and shell
/// characters: the text goes into printed commands, unit files and
/// manifest comments as given.
fn plain_url(s: &str, u: &url::Url, form: &str) -> Result<(), String> {
    if u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return Err(format!(
            "'{}' carries credentials, a query or a fragment: give {form} only",
            crate::tunnel::shown(s)
        ));
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "$`\"'\\;|&<>(){}".contains(c))
    {
        return Err(format!(
            "'{}' holds white space, a control character or a shell character: give {form}",
            crate::tunnel::shown(s)
        ));
    }
    Ok(())
}

/// `--gateway-url`: an `https://` URL with a host, and no credentials,
/// query or fragment (`HOST:PORT` alone is taken as `https://`, as
/// kubectl takes a server without a scheme). kubectl sends operators'
/// tokens (and the local admin's) to it: `http://` would put them on the
/// wire in the clear.
fn parse_gateway_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let with_scheme;
    let s = if s.contains("://") {
        s
    } else {
        with_scheme = format!("https://{s}");
        &with_scheme
    };
    let shown = crate::tunnel::shown(s);
    let u = url::Url::parse(s).map_err(|e| {
        format!(
            "'{shown}' is not a URL ({e}): give https://HOST[:PORT], the gateway as operators reach it"
        )
    })?;
    if u.scheme() != "https" || u.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "'{shown}' is not an https://HOST[:PORT] URL: the gateway speaks only HTTPS, and kubectl \
             sends operators' tokens to this URL"
        ));
    }
    plain_url(s, &u, "https://HOST[:PORT][/PATH]")?;
    Ok(s.to_string())
}

/// `--tls-san`: a DNS name (lower-cased, a trailing dot dropped; a
/// leading `*.` for one label over at least two) or an IP address, as a
/// certificate can name it and rustls and Go match it.
fn parse_tls_san(s: &str) -> Result<String, String> {
    let t = s.trim();
    if let Ok(ip) = t
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
    {
        // An IPv4-mapped address is matched as the IPv4 one it is.
        return Ok(ip.to_canonical().to_string());
    }
    let name = t.trim_end_matches('.').to_ascii_lowercase();
    let (wild, labels) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    let parts: Vec<&str> = labels.split('.').collect();
    let ok = !labels.is_empty()
        && labels.len() <= 253
        && (!wild || parts.len() >= 2)
        // A last label of digits only is a mistyped address, not a name.
        && !parts
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && parts.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "'{s}' is neither a DNS name nor an IP address: give a name like hub.example.com (or *.example.com) or an address like 203.0.113.10"
        ))
    }
}

/// `--peer-url`: an `https://HOST[:PORT]` URL with nothing after the
/// authority (the other hubs' requests go to its root).
fn parse_peer_url(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s).map_err(|e| {
        format!("'{s}' is not a URL ({e}): give https://HOST:PORT, this hub's gateway as the other hubs reach it")
    })?;
    if u.scheme() != "https" || u.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "'{s}' is not an https://HOST[:PORT] URL: the other hubs reach this hub's gateway over HTTPS"
        ));
    }
    if u.path() != "/"
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return Err(format!(
            "'{s}' has more than a scheme, host and port: give https://HOST:PORT only"
        ));
    }
    Ok(crate::daemon::hub::normalized_url(u.as_str()))
}

fn parse_max_stale(s: &str) -> Result<MaxStale, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(MaxStale(None));
    }
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_secs(3) {
        return Err(format!(
            "'{s}' is too short: a hub confirms its copy of the registry about once \
             a second at best, so a shorter limit would refuse operators of a healthy hub; \
             use 3s or more, or 0 to serve from the copy for as long as etcd is away"
        ));
    }
    Ok(MaxStale(Some(d)))
}

/// `--shutdown-delay`: a [`parse_duration`], or `0` (`0s`) for none, at
/// most 10 minutes.
fn parse_shutdown_delay(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let num = t.strip_suffix("ms").unwrap_or(t);
    let num = num.strip_suffix(['s', 'm', 'h']).unwrap_or(num);
    if num.parse::<f64>() == Ok(0.0) {
        return Ok(std::time::Duration::ZERO);
    }
    let d = parse_duration(s)?;
    if d > std::time::Duration::from_secs(600) {
        return Err(format!(
            "'{s}' is too long: a load balancer takes seconds to stop sending; use at most 10m"
        ));
    }
    Ok(d)
}

/// A [`parse_duration`] of whole seconds (the agent keeps its keepalive
/// in seconds: `1500ms` was taken as 1 s without a word).
fn parse_whole_seconds(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || d.is_zero() {
        return Err(format!(
            "'{s}' is not a whole number of seconds: give at least 1s, in seconds (e.g. 2s)"
        ));
    }
    Ok(d)
}

/// The hub's `--keepalive`: from 1 s (`1ms` was taken, and every member
/// was declared dead about once a second, for good) to an hour.
fn parse_hub_keepalive(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("'{s}' is too short for a keepalive: give at least 1s (a member that misses three in a row is declared dead; the default is 10s)"));
    }
    if d > std::time::Duration::from_secs(3600) {
        return Err(format!("'{s}' is too long for a keepalive: give at most 1h (a dead member is found only after three intervals; the default is 10s)"));
    }
    Ok(d)
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
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("invalid duration '{s}': must be positive"));
    }
    if secs >= 1e9 {
        return Err(format!(
            "invalid duration '{s}': too long (under 1000000000s, some 31 years)"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Up(a) => hub::up(a).await,
        Command::Down => hub::down().await,
        Command::Hub(HubCommand::Run(a)) => hub::run_foreground(a).await,
        Command::Cluster(ClusterCommand::Add {
            name,
            ttl,
            reusable,
            impersonate,
            expose,
            labels,
            output,
        }) => {
            let labels = labels.into_iter().collect();
            cluster::add(&name, ttl, reusable, impersonate, expose, labels, &output).await
        }
        Command::Cluster(ClusterCommand::Set {
            name,
            impersonate,
            no_impersonate,
        }) => {
            let mode = match (impersonate, no_impersonate) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            cluster::set(&name, mode).await
        }
        Command::Cluster(ClusterCommand::Label { name, changes }) => {
            cluster::label(&name, &changes).await
        }
        Command::Cluster(ClusterCommand::Expose { name, add, remove }) => {
            cluster::expose(&name, add, remove).await
        }
        Command::Cluster(ClusterCommand::Rotate {
            name,
            ttl,
            reusable,
            new_key,
            output,
        }) => cluster::rotate(&name, ttl, reusable, new_key, &output).await,
        Command::Cluster(ClusterCommand::Revoke { name }) => cluster::revoke(&name).await,
        Command::Cluster(ClusterCommand::List { output }) => cluster::list(&output).await,
        Command::Cluster(ClusterCommand::Rm { name }) => cluster::remove(&name).await,
        Command::Join(a) => join::join(a).await,
        Command::Agent(AgentCommand::Run { name, opts, config }) => {
            join::run_foreground(name, opts, config).await
        }
        Command::Leave { name } => join::leave(&name).await,
        Command::Use(a) => usectx::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Credential {
            token_file,
            gateway,
        } => credential::run(token_file.as_deref(), gateway.as_deref()),
        Command::Completion { shell } => gen::completion(shell),
        Command::PortForward {
            cluster,
            resource,
            ports,
            namespace,
            address,
            gateway,
            background,
            all,
            daemon_id,
        } => {
            // `stop ID|--all` takes no ports; with ports, `stop` is a
            // member of that name (which could not be reached before).
            if cluster == "stop" && ports.is_empty() {
                portforward::stop(resource.as_deref(), all).await
            } else {
                let resource = resource.ok_or_else(|| anyhow::anyhow!("missing the target: towerctl port-forward {cluster} TYPE/NAME [LOCAL:]REMOTE"))?;
                let namespace =
                    namespace.unwrap_or_else(|| portforward::context_namespace(&cluster));
                let args = portforward::Args {
                    cluster,
                    resource,
                    ports,
                    namespace,
                    address,
                    gateway,
                };
                match (background, daemon_id) {
                    (true, _) => portforward::background(args).await,
                    (false, id) => portforward::run(&args, id.as_deref()).await,
                }
            }
        }
        Command::Service(ServiceCommand::Install(ServiceTarget::Hub(a))) => {
            service::install_hub(&a)
        }
        Command::Service(ServiceCommand::Install(ServiceTarget::Agent { name })) => {
            service::install_agent(&name)
        }
        Command::GenDocs { dir } => gen::gen_docs(&dir),
        Command::Logs {
            daemon,
            follow,
            tail,
        } => status::logs(&daemon, follow, tail).await,
        Command::Kubeconfig { names, gateway } => {
            usectx::print_kubeconfig(&names, gateway.as_deref()).await
        }
        Command::Kubectl(a) => {
            fanout::run(fanout::Args {
                selector: a.selector,
                names: a.names,
                parallel: a.parallel.map(usize::from),
                timeout: a.timeout,
                gateway: a.gateway,
                args: a.args,
            })
            .await
        }
        Command::Operator(OperatorCommand::Add { name, groups }) => {
            operator::add(&name, groups).await
        }
        Command::Operator(OperatorCommand::List { output }) => operator::list(&output).await,
        Command::Access(AccessCommand::Allow(a)) => {
            access::add(
                crate::daemon::access::Effect::Allow,
                &a.subject,
                a.clusters.as_deref(),
                &a.names,
            )
            .await
        }
        Command::Access(AccessCommand::Deny(a)) => {
            access::add(
                crate::daemon::access::Effect::Deny,
                &a.subject,
                a.clusters.as_deref(),
                &a.names,
            )
            .await
        }
        Command::Access(AccessCommand::Rm { id }) => access::remove(id).await,
        Command::Access(AccessCommand::List { output }) => access::list(&output).await,
        Command::Operator(OperatorCommand::Rm { name }) => operator::remove(&name).await,
        Command::Login {
            gateway,
            token,
            ca_hash,
            insecure_skip_ca_hash,
        } => operator::login(&gateway, &token, ca_hash.as_deref(), insecure_skip_ca_hash).await,
        Command::Logout { gateway } => operator::logout(gateway.as_deref()).await,
        Command::Audit {
            cluster,
            operator,
            follow,
            output,
        } => audit::run(audit::Filter { cluster, operator }, follow, &output).await,
        Command::Ui(a) => ui::run(a).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_say_what_is_wrong() {
        assert_eq!(parse_listen_addr("[::1]:0").unwrap().to_string(), "[::1]:0");
        assert_eq!(
            parse_listen_addr(" 127.0.0.1:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        for (bad, words) in [
            ("::1:0", "in brackets, like [::1]:0"),
            ("localhost:0", "'localhost' is not an IP address"),
            ("127.0.0.1:65536", "'65536' is not a port"),
            ("127.0.0.1", "no port"),
            ("::1", "no port: like [::1]:8080"),
            ("[::1]", "no port: like [::1]:8080"),
        ] {
            let e = parse_listen_addr(bad).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
        assert!(parse_metrics_addr("x").unwrap_err().contains("'off'"));
    }

    #[test]
    fn tokens_are_taken_as_pasted_and_never_repeated() {
        assert_eq!(token_text("t", "  top_abc\r\n").unwrap(), "top_abc");
        for (bad, words) in [
            ("", "is empty"),
            (" \r\n", "is empty"),
            ("top_a\rb", "no token has (\\u{d})"),
            ("top_a b", "no token has"),
        ] {
            let e = token_text("t", bad).unwrap_err().to_string();
            assert!(e.contains(words), "{bad:?}: {e}");
        }
        let long = "x".repeat(100_000);
        let e = token_text("t", &long).unwrap_err().to_string();
        assert!(e.contains("100000 bytes") && e.len() < 300, "{e}");
    }

    #[test]
    fn expose_targets_take_ipv6_addresses_in_brackets_only() {
        assert_eq!(
            parse_expose("db=10.0.0.5:5432").unwrap(),
            ("db".into(), "10.0.0.5:5432".into())
        );
        assert_eq!(
            parse_expose("db=[fd00::5]:5432").unwrap().1,
            "[fd00::5]:5432"
        );
        assert_eq!(
            parse_expose("db=db.internal:5432").unwrap().1,
            "db.internal:5432"
        );
        assert!(parse_expose("db=[fe80::1%2]:5432").is_ok());
        for bad in [
            "db=::1:5432",
            "db=fd00::5:5432",
            "db=[db.internal]:5432",
            "db=[::1:5432",
        ] {
            let e = parse_expose(bad).unwrap_err();
            assert!(e.contains("in brackets"), "{bad}: {e}");
        }
        assert!(parse_expose("db=host:99999").is_err());
    }
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10x").unwrap_err().contains("unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("99999999999999h")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_hub_keepalive("1ms")
            .unwrap_err()
            .contains("at least 1s"));
        assert!(parse_hub_keepalive("2h")
            .unwrap_err()
            .contains("at most 1h"));
        assert_eq!(
            parse_hub_keepalive("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn the_agents_keepalive_is_whole_seconds() {
        assert_eq!(
            parse_whole_seconds("2s").unwrap(),
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            parse_whole_seconds("2000ms").unwrap(),
            std::time::Duration::from_secs(2)
        );
        assert!(parse_whole_seconds("1500ms")
            .unwrap_err()
            .contains("whole number of seconds"));
        assert!(parse_whole_seconds("500ms").is_err());
    }

    #[test]
    fn a_shutdown_delay_may_be_zero_and_is_bounded() {
        for zero in ["0", "0s", "0ms", " 0s ", "00", "0.0s", "0h"] {
            assert_eq!(
                parse_shutdown_delay(zero).unwrap(),
                std::time::Duration::ZERO,
                "{zero}"
            );
        }
        assert_eq!(
            parse_shutdown_delay("5s").unwrap(),
            std::time::Duration::from_secs(5)
        );
        assert!(parse_shutdown_delay("1h").is_err());
        assert!(parse_shutdown_delay("0sss").is_err());
        assert_eq!(
            parse_shutdown_delay("0.5s").unwrap(),
            std::time::Duration::from_millis(500)
        );
        assert!(parse_shutdown_delay("soon").is_err());
        // The default parses (a default clap cannot parse fails every run).
        use clap::Parser;
        let cli = Cli::try_parse_from(["towerctl", "up"]).unwrap();
        let Command::Up(a) = cli.command else {
            panic!("not up")
        };
        assert_eq!(a.hub.shutdown_delay, None);
    }

    #[test]
    fn gateway_and_peer_urls_are_https_without_credentials() {
        assert_eq!(
            parse_gateway_url("https://hub.corp:9443").unwrap(),
            "https://hub.corp:9443"
        );
        assert!(parse_gateway_url("https://hub.corp/towerctl").is_ok());
        assert_eq!(
            parse_gateway_url("hub.corp:9443").unwrap(),
            "https://hub.corp:9443"
        );
        for bad in [
            "http://hub.corp:9443",
            "https://admin:pw@hub.corp",
            "https://hub.corp/?x=1",
            "https://hub.corp/$(curl evil|sh)",
            "https://hub.corp/a b",
            "https://hub.corp\napiVersion: v1",
        ] {
            assert!(parse_gateway_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_advertise("wss://hub.corp/tunnel").unwrap(),
            "wss://hub.corp/tunnel"
        );
        for bad in [
            "https://hub.corp",
            "wss://user:pw@hub.corp/t",
            "wss://hub.corp/t\nExecStart=/bin/sh",
            "wss://hub.corp/$(x)",
            "hub.corp:7443",
        ] {
            assert!(parse_advertise(bad).is_err(), "{bad}");
        }
        assert!(parse_gateway_url("http://hub.corp:9443")
            .unwrap_err()
            .contains("operators' tokens"));
        assert_eq!(
            parse_peer_url("https://Hub-A:443/").unwrap(),
            "https://hub-a"
        );
        assert!(parse_peer_url("https://hub-a:9443/x").is_err());
        assert!(parse_peer_url("http://hub-a:9443").is_err());
    }

    #[test]
    fn tls_sans_are_dns_names_or_addresses() {
        assert_eq!(parse_tls_san("Hub.Example.COM").unwrap(), "hub.example.com");
        assert_eq!(parse_tls_san("*.hubs.example").unwrap(), "*.hubs.example");
        assert_eq!(parse_tls_san("[::1]").unwrap(), "::1");
        assert_eq!(parse_tls_san("203.0.113.10").unwrap(), "203.0.113.10");
        assert_eq!(parse_tls_san("::ffff:192.0.2.7").unwrap(), "192.0.2.7");
        assert_eq!(parse_tls_san("hub.example.").unwrap(), "hub.example");
        for bad in [
            "",
            "a b",
            "-x.example",
            "x..example",
            "*.",
            "*.com",
            "203.0.113.256",
            "https://h",
            "h:443",
        ] {
            assert!(parse_tls_san(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn max_stale_is_three_seconds_or_more_or_none() {
        assert_eq!(parse_max_stale("0").unwrap().0, None);
        assert_eq!(
            parse_max_stale("90s").unwrap().0,
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_max_stale("0s").unwrap().0, None);
        let e = parse_max_stale("2s").unwrap_err();
        assert!(e.contains("3s or more") && e.contains("0 to serve"), "{e}");
        assert!(parse_max_stale("soon").is_err());
    }

    #[test]
    fn store_tls_flags_reach_the_daemon_as_absolute_paths() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "towerctl",
            "up",
            "--store",
            "https://10.0.0.5:2379",
            "--store-ca",
            "etcd-ca.pem",
            "--store-cert",
            "/etc/hub.pem",
            "--store-key",
            "hub-key.pem",
            "--store-user",
            "hub",
            "--store-password-file",
            "etcd-password",
        ])
        .unwrap();
        let Command::Up(a) = cli.command else {
            panic!("not up")
        };
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            a.hub.store_args(),
            vec![
                "--store=https://10.0.0.5:2379".to_string(),
                "--store-prefix=/towerctl/".to_string(),
                "--store-max-stale=60000ms".to_string(),
                format!("--store-ca={}", cwd.join("etcd-ca.pem").display()),
                "--store-cert=/etc/hub.pem".to_string(),
                format!("--store-key={}", cwd.join("hub-key.pem").display()),
                format!(
                    "--store-password-file={}",
                    cwd.join("etcd-password").display()
                ),
                "--store-user=hub".to_string(),
            ]
        );
        // A user without its password file, and the other way round.
        for flags in [
            ["--store-user", "hub"],
            ["--store-password-file", "etcd-password"],
        ] {
            let mut args = vec!["towerctl", "up", "--store", "etcd://h:1"];
            args.extend(flags);
            assert!(Cli::try_parse_from(args).is_err(), "{flags:?}");
        }
        // A certificate without its key, or TLS flags without --store, are
        // refused by the parser.
        assert!(Cli::try_parse_from([
            "towerctl",
            "up",
            "--store",
            "https://h:1",
            "--store-cert",
            "c.pem"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["towerctl", "up", "--store-ca", "ca.pem"]).is_err());
        // Without --store: nothing to hand over.
        let Command::Up(a) = Cli::try_parse_from(["towerctl", "up"]).unwrap().command else {
            panic!("not up")
        };
        assert!(a.hub.store_args().is_empty());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
