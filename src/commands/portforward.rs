//! `towerctl port-forward CLUSTER TYPE/NAME [LOCAL:]REMOTE…`, with kubectl's
//! syntax and messages. The local ports listen at once; every accepted
//! connection opens its own stream through the gateway (HTTP CONNECT, over
//! one shared HTTP/2 connection: see `mux`) to the agent, which resolves
//! the target anew and dials it from inside the member network. A replaced pod or a reconnected tunnel therefore never
//! leaves the forward dead: the next connection finds the new one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;

use super::exit;
use super::https::{GatewayClient, Trust};
use super::mux::Mux;
use super::usectx::Source;
use crate::daemon::console::{console, Dest};
use crate::daemon::targets::Target;

/// Most connections of one local port carried at once through the gateway
/// (as the hub's own forward: `daemon::hub::forward`).
const MAX_CONNECTIONS: usize = 1024;

/// A `[LOCAL:]REMOTE` pair; local 0 picks a free port.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PortPair {
    pub local: u16,
    pub remote: u16,
}

/// The remote side of a `[LOCAL:]REMOTE` as written: a number, or a port's
/// name (a Service port's, a container port's), as kubectl takes them.
#[derive(Debug, Clone, PartialEq)]
pub enum Remote {
    Number(u16),
    Name(String),
}

/// A `[LOCAL:]REMOTE` as written; `local` `None`: the remote's number
/// (`5432`, `http`), `Some(0)`: a free port (`:80`).
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub local: Option<u16>,
    pub remote: Remote,
}

impl PortSpec {
    /// The pair, with a named remote port's number (`named`).
    fn pair(&self, named: impl Fn(&str) -> Result<u16>) -> Result<PortPair> {
        let remote = match &self.remote {
            Remote::Number(n) => *n,
            Remote::Name(name) => named(name)?,
        };
        Ok(PortPair {
            local: self.local.unwrap_or(remote),
            remote,
        })
    }
}

/// A port name as Kubernetes allows it (IANA_SVC_NAME): 1–15 of
/// `[a-z0-9-]`, at least one letter, no `-` at either end or twice in a row.
fn port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub fn parse_ports(s: &str) -> Result<PortSpec, String> {
    let shown = crate::tunnel::escape_for_log(s, 64);
    let bad = |what: &str| {
        format!(
            "invalid port '{shown}': {what}; use LOCAL:REMOTE, :REMOTE (random local port) or PORT, REMOTE a number or a port's name"
        )
    };
    let (l, r) = match s.split_once(':') {
        Some((l, r)) => (Some(l), r),
        None => (None, s),
    };
    // Digits only (`u16::from_str` takes a leading '+'), and a number too
    // big for a port is told as such.
    let number = |p: &str, which: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("the {which} port must be a number")));
        }
        p.parse()
            .map_err(|_| bad(&format!("the {which} port must be at most 65535")))
    };
    let remote = if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) {
        let n = number(r, "remote")?;
        if n == 0 {
            return Err(bad("the remote port cannot be 0"));
        }
        Remote::Number(n)
    } else if port_name(r) {
        Remote::Name(r.to_string())
    } else {
        return Err(bad(
            "the remote port must be a number or a port's name (up to 15 of a-z, 0-9 and '-')",
        ));
    };
    let local = match l {
        None => None,
        Some("") => Some(0),
        Some(l) => Some(number(l, "local")?),
    };
    Ok(PortSpec { local, remote })
}

/// The number of the port named `name` on the object port-forward checked
/// (`obj`, the API's JSON): a Service's port (`spec.ports[].name`, then
/// mapped to its target by the agent, as any Service port), a pod's or a
/// deployment's pod template's container port.
fn named_port(target: &Target, obj: Option<&serde_json::Value>, name: &str) -> Result<u16> {
    let Some(obj) = obj else {
        bail!("cannot resolve the named port '{name}': the target could not be read (see above); give the port's number");
    };
    let number = |p: &serde_json::Value, key: &str| {
        (p["name"].as_str() == Some(name))
            .then(|| p[key].as_u64())
            .flatten()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
    };
    let containers = |spec: &serde_json::Value| -> Option<u16> {
        spec["containers"]
            .as_array()?
            .iter()
            .filter_map(|c| c["ports"].as_array())
            .flatten()
            .find_map(|p| number(p, "containerPort"))
    };
    let found = match target {
        Target::Service { .. } => obj["spec"]["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find_map(|p| number(p, "port"))),
        Target::Pod { .. } => containers(&obj["spec"]),
        Target::Workload { .. } => containers(&obj["spec"]["template"]["spec"]),
        Target::ApiServer | Target::Host(_) => None,
    };
    found.ok_or_else(|| {
        let (kind, what) = match target {
            Target::Service { name: n, .. } => ("Service", n.as_str()),
            Target::Pod { name: n, .. } => ("Pod", n.as_str()),
            Target::Workload { kind, name: n, .. } => (kind.singular(), n.as_str()),
            _ => ("target", ""),
        };
        anyhow::anyhow!("{kind} '{what}' does not have a port named '{name}'")
    })
}

/// That a Service read before listening has port `port`, as kubectl
/// checks: without it, "Forwarding from" was printed (and scripts waiting
/// for it went on) while every connection was then refused.
fn service_port(target: &Target, obj: &serde_json::Value, port: u16) -> Result<()> {
    let Target::Service { name, .. } = target else {
        return Ok(());
    };
    let Some(ports) = obj["spec"]["ports"].as_array() else {
        return Ok(());
    };
    if ports
        .iter()
        .any(|p| p["port"].as_u64() == Some(u64::from(port)))
    {
        return Ok(());
    }
    let have: Vec<String> = ports
        .iter()
        .filter_map(|p| p["port"].as_u64().map(|n| n.to_string()))
        .collect();
    bail!(
        "Service {name} does not have a service port {port} (it has {}); forward to one of those, e.g. 8080:{}",
        if have.is_empty() { "none".to_string() } else { have.join(", ") },
        have.first().map(String::as_str).unwrap_or("80")
    )
}

/// The namespace of the cluster's kubeconfig context (`tower-CLUSTER`, as
/// `towerctl use` writes it, keeping one the operator set), as kubectl
/// takes its context's; else `default`.
pub fn context_namespace(cluster: &str) -> String {
    let ctx = format!("tower-{cluster}");
    // The first file that defines the context decides, as with kubectl.
    super::kubeconfig::files(None)
        .iter()
        .filter_map(|f| super::kubeconfig::read(f).ok())
        .find_map(|d| {
            let c = super::kubeconfig::find(&d, "contexts", "context", &ctx)?;
            Some(
                c.get("namespace")
                    .and_then(|n| n.as_str())
                    .filter(|ns| !ns.is_empty())
                    .map(str::to_string),
            )
        })
        .flatten()
        .unwrap_or_else(|| "default".to_string())
}

/// A namespace name as Kubernetes allows it (a DNS-1123 label): it goes
/// into the API path of the check and into the agent's target.
fn check_namespace(ns: &str) -> Result<()> {
    if !crate::daemon::names::is_dns_label(ns) {
        bail!(
            "invalid namespace '{}': a namespace is up to 63 of a-z, 0-9 and '-', starting and ending with a letter or digit",
            crate::tunnel::escape_for_log(ns, 80)
        );
    }
    Ok(())
}

/// What kubectl checks before it listens: that the object exists and that
/// a pod runs. Those refusals (and an unknown cluster) end the command at
/// once, as with kubectl; an object the operator may not read, or a
/// member not reachable right now, is only said (the agent decides each
/// connection, and every connection reaches for the member anew, so the
/// forward works once the tunnel is back).
async fn check_target(
    source: &Source,
    cluster: &str,
    target: &Target,
) -> Result<Option<serde_json::Value>> {
    let (kind, path) = match target {
        Target::Pod { ns, name } => ("pod", format!("/api/v1/namespaces/{ns}/pods/{name}")),
        Target::Service { ns, name } => (
            "service",
            format!("/api/v1/namespaces/{ns}/services/{name}"),
        ),
        Target::Workload { kind, ns, name } => (kind.singular(), kind.api_path(ns, name)),
        Target::ApiServer | Target::Host(_) => return Ok(None),
    };
    let url = format!(
        "{}/clusters/{cluster}{path}",
        source.gateway_url.trim_end_matches('/')
    );
    // Bounded well under a background forward's start-up wait: a hub
    // machine that cannot reach its own public gateway URL (NAT without
    // hairpin) is only told so, its forward carried by the hub itself.
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        super::https::get(&url, Trust::Ca(&source.ca_pem), Some(source.token.expose())),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5s")));
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            console().say(
                Dest::Err,
                format!("warning: could not check the {kind} first: {e:#}\n"),
            );
            return Ok(None);
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let message = || {
        v["message"]
            .as_str()
            .map(|m| crate::tunnel::printable(m, 300))
            .unwrap_or_else(|| format!("HTTP {status}"))
    };
    match status {
        200 => {
            if let Target::Pod { .. } = target {
                let phase = v["status"]["phase"].as_str().unwrap_or("Unknown");
                if phase != "Running" {
                    bail!(
                        "unable to forward port because pod is not running. Current status={}",
                        crate::tunnel::printable(phase, 40)
                    );
                }
            }
            Ok(Some(v))
        }
        401 | 404 => bail!("error from cluster '{cluster}': {}", message()),
        // The operator may not read it (under impersonation, the member's
        // RBAC): said; each connection is decided by the agent, which asks
        // the member whether the operator may port-forward there.
        403 => {
            console().say(
                Dest::Err,
                format!(
                    "warning: cluster '{cluster}': {}; forwarding anyway, the member decides each connection\n",
                    message()
                ),
            );
            Ok(None)
        }
        _ => {
            console().say(
                Dest::Err,
                format!(
                    "warning: cluster '{cluster}' did not confirm the {kind} ({}); forwarding anyway, each connection tries again\n",
                    message()
                ),
            );
            Ok(None)
        }
    }
}

/// The addresses to listen on, each with whether it must be bound: as
/// kubectl, `localhost`'s two addresses need only one to bind (a host
/// without IPv6), an address named explicitly must. Each address once
/// (`localhost,127.0.0.1` binds 127.0.0.1 once, as required), and the
/// wildcards (`0.0.0.0`, `::`) first: bound after `localhost`'s
/// 127.0.0.1 on the same port, `0.0.0.0` failed where kubectl succeeds.
fn addresses(list: &[String]) -> Result<Vec<(IpAddr, bool)>> {
    let mut out: Vec<(IpAddr, bool)> = Vec::new();
    let mut add = |ip: IpAddr, required: bool| match out.iter_mut().find(|(a, _)| *a == ip) {
        Some((_, r)) => *r |= required,
        None => out.push((ip, required)),
    };
    for a in list.iter().flat_map(|a| a.split(',')) {
        match a.trim() {
            "localhost" => {
                add(IpAddr::from([127, 0, 0, 1]), false);
                add(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), false);
            }
            other => add(
                other.parse().with_context(|| {
                    format!("invalid --address '{other}': use an IP address or localhost")
                })?,
                true,
            ),
        }
    }
    out.sort_by_key(|(a, _)| !a.is_unspecified());
    Ok(out)
}

/// What to forward.
#[derive(Debug, Clone)]
pub struct Args {
    pub cluster: String,
    pub resource: String,
    pub ports: Vec<String>,
    pub namespace: String,
    pub address: Vec<String>,
    pub gateway: Option<String>,
}

use crate::daemon::forwards::{self, record_path, Background};

/// What to do when a local listener cannot be made.
fn listen_hint(e: &std::io::Error, ip: IpAddr, remote: u16) -> String {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => format!(
            "an IPv4-mapped address cannot be listened on here: give --address {}",
            v6.to_ipv4_mapped().unwrap()
        ),
        _ if e.kind() == std::io::ErrorKind::AddrInUse => {
            format!("choose another local port (':{remote}' picks a free one) or another --address")
        }
        _ => "choose another --address (one of this machine's, or localhost)".to_string(),
    }
}

/// `--background`: the forward runs as its own detached process, survives
/// the shell, shows in `towerctl status`, ends with `port-forward stop`.
pub async fn background(a: Args) -> Result<u8> {
    let rec = start_background(a).await?;
    for f in &rec.forwarding {
        println!("Forwarding from {f}");
    }
    println!(
        "forward {} runs in the background (pid {}); stop it with 'towerctl port-forward stop {}'",
        rec.id, rec.pid, rec.id
    );
    Ok(exit::OK)
}

/// Starts a background forward and returns its record once it listens.
/// Prints nothing (the dashboard uses it too).
pub async fn start_background(a: Args) -> Result<Background> {
    // Check everything that can be checked before detaching.
    check_namespace(&a.namespace)?;
    Target::from_kubectl(&a.resource, &a.namespace).map_err(anyhow::Error::msg)?;
    if a.ports.is_empty() {
        bail!(
            "at least one port is required: towerctl port-forward {} {} [LOCAL:]REMOTE",
            a.cluster,
            a.resource
        );
    }
    for p in &a.ports {
        parse_ports(p).map_err(anyhow::Error::msg)?;
    }
    Source::find(a.gateway.as_deref())
        .await?
        .check(&a.cluster)?;
    let id: String = crate::tunnel::keys::new_token("")?
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(8)
        .collect();
    let mut argv: Vec<std::ffi::OsString> = vec![
        "port-forward".into(),
        a.cluster.clone().into(),
        a.resource.clone().into(),
    ];
    argv.extend(a.ports.iter().map(Into::into));
    argv.extend([
        format!("--namespace={}", a.namespace).into(),
        "--daemon-id".into(),
        id.clone().into(),
    ]);
    for ad in &a.address {
        argv.extend(["--address".into(), ad.into()]);
    }
    if let Some(g) = &a.gateway {
        argv.extend(["--gateway".into(), g.into()]);
    }
    let mut spawned = crate::daemon::process::spawn(&format!("pf-{id}"), &argv)?;
    let rec = spawned
        .wait_ready(std::time::Duration::from_secs(20), || async {
            std::fs::read_to_string(record_path(&id))
                .ok()
                .and_then(|s| serde_json::from_str::<Background>(&s).ok())
        })
        .await?;
    let Some(rec) = rec else {
        spawned.kill();
        bail!(
            "the background forward did not start within 20s; see '{}'",
            spawned.log.display()
        );
    };
    Ok(rec)
}

/// `port-forward stop ID|--all`.
pub async fn stop(id: Option<&str>, all: bool) -> Result<u8> {
    let running = forwards::list();
    let doomed: Vec<&Background> = match (id, all) {
        (_, true) => running.iter().collect(),
        (Some(id), false) => running.iter().filter(|b| b.id == id).collect(),
        (None, false) => bail!(
            "which forward? 'towerctl port-forward stop ID' (IDs in 'towerctl status') or --all"
        ),
    };
    if doomed.is_empty() {
        eprintln!(
            "no background forward{} is running; 'towerctl status' lists them",
            id.map(|i| format!(" '{i}'")).unwrap_or_default()
        );
        // Nothing left to stop is what `--all` asks for (a cleanup that
        // runs twice); a named one not running is said as a daemon is.
        return Ok(if all { exit::OK } else { exit::NOT_RUNNING });
    }
    let mut failed = 0;
    for b in doomed {
        crate::daemon::process::terminate(b.pid, std::time::Duration::from_secs(5)).await;
        // Gone when its lock is free (a forward that is its caller's
        // unreaped child, `towerctl ui`'s, still answers signal 0); one
        // still holding it keeps its record, and is said so.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while forwards::held(&b.id) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if forwards::held(&b.id) {
            failed += 1;
            eprintln!(
                "forward {} (pid {}) did not stop within 7s; it still listens: 'kill -9 {}'",
                b.id, b.pid, b.pid
            );
            continue;
        }
        forwards::remove(&b.id);
        println!("stopped forward {} ({} {})", b.id, b.cluster, b.resource);
    }
    Ok(if failed == 0 { exit::OK } else { exit::ERROR })
}

pub async fn run(a: &Args, daemon_id: Option<&str>) -> Result<u8> {
    // Each local connection holds a descriptor: the default soft limit of
    // 1,024 ran out well before the forward's own cap (kubectl's runtime
    // raises it as well).
    crate::daemon::admission::raise_fd_limit();
    let (cluster, resource) = (a.cluster.as_str(), a.resource.as_str());
    check_namespace(&a.namespace)?;
    let target = Target::from_kubectl(resource, &a.namespace).map_err(anyhow::Error::msg)?;
    let specs: Vec<PortSpec> = a
        .ports
        .iter()
        .map(|p| parse_ports(p))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if specs.is_empty() {
        bail!("at least one port is required: towerctl port-forward {cluster} {resource} [LOCAL:]REMOTE");
    }
    let source = Arc::new(Source::find(a.gateway.as_deref()).await?);
    source.check(cluster)?;
    let object = check_target(&source, cluster, &target).await?;
    let pairs: Vec<PortPair> = specs
        .iter()
        .map(|p| p.pair(|name| named_port(&target, object.as_ref(), name)))
        .collect::<Result<_>>()?;
    if let Some(obj) = &object {
        for p in &pairs {
            service_port(&target, obj, p.remote)?;
        }
    }
    let gateway = Arc::new(Mux::new(
        GatewayClient::with_alpn(
            &source.gateway_url,
            Trust::Ca(&source.ca_pem),
            &[super::mux::MUX_ALPN, b"http/1.1"],
        )?,
        source.token.expose(),
    ));
    let addrs = addresses(&a.address)?;
    let mut forwarding = Vec::new();
    // The hub on this machine serves the forward itself when it knows the
    // operator: one process and one TLS hop fewer for every byte. Not when
    // a gateway is named, or with TOWERCTL_FORWARD_VIA=gateway.
    let local_hub = (a.gateway.is_none()
        && std::env::var("TOWERCTL_FORWARD_VIA").as_deref() != Ok("gateway"))
    .then(|| (crate::paths::hub_socket(), source.token.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    for pair in pairs {
        // One local port for all addresses: the first bind picks it.
        let mut local = pair.local;
        let mut bound = 0;
        let mut errors: Vec<String> = Vec::new();
        for &(ip, required) in &addrs {
            match crate::daemon::listen_exactly(SocketAddr::new(ip, local)) {
                Ok(l) => {
                    let a = l.local_addr()?;
                    local = a.port();
                    // Not `println!`: a background forward's stdout is its
                    // log, counted with it, perhaps on a full disk (the
                    // panic ended the forward with exit code 101).
                    crate::daemon::console::write_to(
                        crate::daemon::console::Dest::Out,
                        &format!("Forwarding from {a} -> {}\n", pair.remote),
                    );
                    forwarding.push(format!("{a} -> {}", pair.remote));
                    bound += 1;
                    let (gateway, target, cluster) =
                        (gateway.clone(), target.clone(), cluster.to_string());
                    let via_hub = local_hub.clone();
                    let l = l.into_std()?;
                    tasks.spawn(async move {
                        let authority =
                            format!("{}:{}", target.connect_host(&cluster), pair.remote);
                        serve_listener(l, gateway, &authority, pair.remote, via_hub).await
                    });
                }
                Err(e) if required => bail!(
                    "unable to listen on {}: {e}; {}",
                    SocketAddr::new(ip, local),
                    listen_hint(&e, ip, pair.remote)
                ),
                Err(e) => errors.push(format!("{}: {e}", SocketAddr::new(ip, local))),
            }
        }
        if bound == 0 {
            bail!(
                "unable to listen on any of the requested addresses: {}; choose another local port (':{}' picks a free one)",
                errors.join("; "),
                pair.remote
            );
        }
    }
    // Its lock, held while this forward runs and taken before its record
    // appears: the record of one killed with -9 (or left by a reboot) is
    // told from a live one, never signalled through a pid another process
    // took since.
    let _held = match daemon_id {
        Some(id) => Some(forwards::hold(id)?),
        None => None,
    };
    if let Some(id) = daemon_id {
        let rec = Background {
            id: id.to_string(),
            pid: std::process::id(),
            cluster: cluster.to_string(),
            resource: resource.to_string(),
            namespace: a.namespace.clone(),
            forwarding,
        };
        crate::paths::write_atomic(&record_path(id), &serde_json::to_vec(&rec)?, 0o600)?;
    }
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(exit::OK),
        _ = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => Ok(exit::OK),
        _ = tasks.join_next() => Err(anyhow::anyhow!("a listener failed")),
    };
    if let Some(id) = daemon_id {
        forwards::remove(id);
    }
    result
}

/// Serves one listener: through the hub on this machine whenever it takes
/// the forward, through the gateway otherwise. When that hub goes away (a
/// restart), connections go through the gateway until it is back, and then
/// through it again.
async fn serve_listener(
    l: std::net::TcpListener,
    gateway: Arc<Mux>,
    authority: &str,
    remote: u16,
    local_hub: Option<(std::path::PathBuf, crate::tunnel::Secret)>,
) {
    // The socket is in this process's reactor only while this process
    // accepts on it: registered while the hub serves the forward, it would
    // wake this process for every connection the hub accepts.
    let accepting = || {
        l.try_clone().and_then(TcpListener::from_std).map_err(|e| {
            console().say(
                Dest::Err,
                format!("error: cannot serve {authority} any more: {e}\n"),
            );
        })
    };
    let Some((socket, token)) = local_hub else {
        if let Ok(t) = accepting() {
            accept_loop(&t, gateway, authority, remote).await;
        }
        return;
    };
    loop {
        let handover = through_local_hub(&l, &socket, &token, authority, remote).await;
        let Ok(t) = accepting() else { return };
        if let Handover::Refused = handover {
            return accept_loop(&t, gateway, authority, remote).await;
        }
        tokio::select! {
            _ = accept_loop(&t, gateway.clone(), authority, remote) => return,
            _ = hub_back(&socket) => {}
        }
    }
}

/// How a hand-over to the hub on this machine ended.
enum Handover {
    /// No hub answers here (now).
    NoHub,
    /// The hub served the forward and then went away.
    Ended,
    /// The hub will not serve it (the context's token belongs to another
    /// hub, or it refused): the gateway for good.
    Refused,
}

/// Hands the listener to the hub on this machine and reports what it says
/// about each connection, for as long as the hub serves the forward.
async fn through_local_hub(
    l: &std::net::TcpListener,
    socket: &std::path::Path,
    token: &crate::tunnel::Secret,
    authority: &str,
    remote: u16,
) -> Handover {
    use crate::daemon::control;
    if !socket.exists() {
        return Handover::NoHub;
    }
    match control::forward(socket, token, authority, l).await {
        Ok(mut events) => {
            while let Some(first) = events.recv().await {
                if let Err(why) = print_events(first, &mut events, remote) {
                    console().say(Dest::Err, format!("note: the hub on this machine did not take the forward ({why}); forwarding through the gateway\n"));
                    return Handover::Refused;
                }
            }
            console().say(Dest::Err, "the hub on this machine stopped serving this forward; connections go through the gateway until it is back\n".to_string());
            Handover::Ended
        }
        Err(e) if e.to_string() == crate::daemon::hub::UNKNOWN_FORWARD_TOKEN => Handover::Refused,
        Err(e) if !control::is_up(socket).await => {
            tracing::debug!("no hub here to take the forward: {e:#}");
            Handover::NoHub
        }
        Err(e) => {
            console().say(Dest::Err, format!("note: the hub on this machine did not take the forward ({e:#}); forwarding through the gateway\n"));
            Handover::Refused
        }
    }
}

/// Prints `first` and the events queued behind it as kubectl does, the
/// lines that came together in one write; `Err` is the hub's refusal.
fn print_events(
    first: Result<crate::daemon::control::ForwardEvent, String>,
    events: &mut tokio::sync::mpsc::Receiver<Result<crate::daemon::control::ForwardEvent, String>>,
    remote: u16,
) -> Result<(), String> {
    use crate::daemon::control::ForwardEvent;
    use std::fmt::Write as _;
    let (mut out, mut err) = (String::new(), String::new());
    let mut next = Some(first);
    let mut result = Ok(());
    while let Some(ev) = next {
        let _ = match ev {
            Ok(ForwardEvent::Accepted { port }) => writeln!(out, "Handling connection for {port}"),
            Ok(ForwardEvent::Failed { port, error }) => {
                writeln!(err, "error: forwarding {port} -> {remote} failed: {error}")
            }
            Err(why) => {
                result = Err(why);
                break;
            }
        };
        next = (out.len() + err.len() < 64 * 1024)
            .then(|| events.try_recv().ok())
            .flatten();
    }
    if !out.is_empty() {
        console().say(Dest::Out, out);
    }
    if !err.is_empty() {
        console().say(Dest::Err, err);
    }
    result
}

/// Returns once a hub answers on `socket` (checked every second).
async fn hub_back(socket: &std::path::Path) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if socket.exists() && crate::daemon::control::is_up(socket).await {
            return;
        }
    }
}

/// Carries every connection accepted on `l` through the gateway: one
/// CONNECT stream to `authority` each.
async fn accept_loop(l: &TcpListener, gateway: Arc<Mux>, authority: &str, remote: u16) {
    let local = l.local_addr().map(|a| a.port()).unwrap_or(0);
    // Connections carried at once, as the hub's own forward bounds them:
    // past it a new one is closed at once and said (local clients piling
    // up while the gateway is unreachable held a task and a descriptor
    // each, without end).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut conn, _)) = l.accept().await else {
            // Out of descriptors and the like: wait, do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            console().say(
                Dest::Err,
                format!("error: {local}: more than {MAX_CONNECTIONS} connections at once; this one was closed\n"),
            );
            continue;
        };
        crate::tunnel::nodelay(&conn);
        console().say(Dest::Out, format!("Handling connection for {local}\n"));
        let gateway = gateway.clone();
        let authority = authority.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            // What the client has sent by now goes with the CONNECT.
            let first = crate::tunnel::sent_so_far(&conn, crate::daemon::wire::EARLY_MAX);
            match gateway.open(&authority, &first).await {
                Ok(mut up) => {
                    let _ = crate::tunnel::splice(&mut conn, &mut up).await;
                }
                Err(e) => console().say(
                    Dest::Err,
                    format!("error: forwarding {local} -> {remote} failed: {e:#}\n"),
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_port_it_does_not_have_is_refused() {
        let svc = serde_json::json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}});
        let t = Target::from_kubectl("svc/web", "default").unwrap();
        assert!(service_port(&t, &svc, 80).is_ok());
        let e = service_port(&t, &svc, 8080).unwrap_err().to_string();
        assert!(
            e.contains("does not have a service port 8080") && e.contains("80, 443"),
            "{e}"
        );
        let pod = Target::from_kubectl("pod/web-0", "default").unwrap();
        assert!(service_port(&pod, &svc, 8080).is_ok());
    }

    #[test]
    fn addresses_are_bound_once_each_wildcards_first() {
        let of =
            |l: &[&str]| addresses(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let v4 = IpAddr::from([127, 0, 0, 1]);
        let v6 = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        let any = IpAddr::from([0, 0, 0, 0]);
        assert_eq!(of(&["localhost"]), [(v4, false), (v6, false)]);
        assert_eq!(of(&["localhost,127.0.0.1"]), [(v4, true), (v6, false)]);
        assert_eq!(of(&["127.0.0.1", "127.0.0.1"]), [(v4, true)]);
        assert_eq!(
            of(&["localhost,0.0.0.0"]),
            [(any, true), (v4, false), (v6, false)]
        );
        assert!(addresses(&["nowhere".to_string()]).is_err());
    }

    #[test]
    fn ports() {
        let spec = |local, remote: Remote| Ok(PortSpec { local, remote });
        assert_eq!(parse_ports("8080:80"), spec(Some(8080), Remote::Number(80)));
        assert_eq!(parse_ports(":80"), spec(Some(0), Remote::Number(80)));
        assert_eq!(parse_ports("5432"), spec(None, Remote::Number(5432)));
        assert_eq!(
            parse_ports("8443:https"),
            spec(Some(8443), Remote::Name("https".into()))
        );
        assert_eq!(parse_ports("http"), spec(None, Remote::Name("http".into())));
        assert!(parse_ports("x_y").is_err());
        assert!(parse_ports("8080:HTTP").is_err());
        assert!(parse_ports("8080:-web").is_err());
        assert!(parse_ports("8080:0").is_err());
        assert!(parse_ports("+80:80").is_err());
        assert!(parse_ports("99999:80")
            .unwrap_err()
            .contains("the local port must be at most 65535"));
        let long = parse_ports(&"x".repeat(5000)).unwrap_err();
        assert!(long.len() < 400, "{}", long.len());
    }

    /// Named ports as kubectl takes them: a Service's port name, a pod's
    /// (or a deployment's pod template's) container port name.
    #[test]
    fn named_ports_are_looked_up_on_the_object() {
        let svc = serde_json::json!({"spec": {"ports": [
            {"name": "metrics", "port": 9090, "targetPort": 9091},
            {"name": "https", "port": 443, "targetPort": "web"},
        ]}});
        let pod_spec = serde_json::json!({"containers": [
            {"name": "a"},
            {"name": "b", "ports": [{"name": "web", "containerPort": 8443}]},
        ]});
        let pod = serde_json::json!({"spec": pod_spec});
        let deploy = serde_json::json!({"spec": {"template": {"spec": pod_spec}}});
        let t = |kind: &str| Target::from_kubectl(&format!("{kind}/x"), "default").unwrap();
        let spec = parse_ports("8443:https").unwrap();
        assert_eq!(
            spec.pair(|n| named_port(&t("svc"), Some(&svc), n)).unwrap(),
            PortPair {
                local: 8443,
                remote: 443
            }
        );
        let bare = parse_ports("web").unwrap();
        for (kind, obj) in [("pod", &pod), ("deploy", &deploy)] {
            assert_eq!(
                bare.pair(|n| named_port(&t(kind), Some(obj), n)).unwrap(),
                PortPair {
                    local: 8443,
                    remote: 8443
                },
                "{kind}"
            );
        }
        let e = named_port(&t("svc"), Some(&svc), "web").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service 'x' does not have a port named 'web'"
        );
        assert!(named_port(&t("pod"), None, "web").is_err());
    }
}

#[cfg(test)]
mod listen_hints {
    use super::*;

    #[test]
    fn the_hint_fits_why_the_listener_failed() {
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let invalid = std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let h = listen_hint(&in_use, "127.0.0.1".parse().unwrap(), 80);
        assert!(h.contains("':80' picks a free one"), "{h}");
        let h = listen_hint(&invalid, "::ffff:127.0.0.1".parse().unwrap(), 80);
        assert!(h.contains("--address 127.0.0.1"), "{h}");
        let h = listen_hint(&invalid, "192.0.2.1".parse().unwrap(), 80);
        assert!(!h.contains("free one"), "{h}");
    }
}
