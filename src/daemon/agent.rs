//! The agent daemon: keeps one tunnel to the hub up and serves the hub's
//! channels by proxying to the member's API server with the agent's own
//! credentials.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use russh::client::Msg;
use russh::ChannelStream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::{
    self, push_bounded, AgentStatus, Event, Request as CtlRequest, Response as CtlResponse,
    EVENTS_KEPT, RTT_SAMPLES_KEPT,
};
use super::gateway::{
    is_upgrade, status_response, strip_hop_by_hop, strip_identity, Body, GROUPS_HEADER,
    IMPERSONATE_HEADER, OPERATOR_HEADER,
};
use super::policy::DialPolicy;
use super::resolve;
use super::targets::Target;
use crate::paths;
use crate::tunnel::backoff::Backoff;
use crate::tunnel::client::{self, ChannelService, DialOptions};
use crate::tunnel::{Secret, TunnelError, TARGET_APISERVER};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest request body the agent buffers (kube-apiserver's own limit for
/// objects is 3 MiB; exec/attach stdin goes over the upgraded stream).
const MAX_REQUEST_BODY: usize = 32 * 1024 * 1024;

/// An agent's configuration, as `join` saves it (mode 0600: holds the token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub name: String,
    pub hub: String,
    /// Join token; only needed until the agent's key is registered.
    #[serde(default)]
    pub token: Option<String>,
    /// The agent's private key (created at first start when missing).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Add the calling operator's identity as `Impersonate-*` headers.
    #[serde(default)]
    pub impersonate: bool,
    /// Pinned hub host key; `None` only when joined with the insecure flag.
    pub hub_key: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    #[serde(default = "default_cap")]
    pub backoff_cap_secs: u64,
    /// Extra dial-policy rules (`--allow`); Kubernetes objects are always allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Push mode listeners, `NAME=ADDR`.
    #[serde(default)]
    pub exposes: Vec<String>,
    /// `auto`, `direct` or `portforward` (see [`PodNetwork`]).
    #[serde(default = "default_pod_network")]
    pub pod_network: String,
    /// Serve `/healthz` and `/readyz` here (see [`super::probes`]).
    #[serde(default)]
    pub probe_addr: Option<String>,
    /// In-cluster service account directory (see [`super::incluster`]).
    #[serde(default)]
    pub serviceaccount_dir: Option<PathBuf>,
}

fn default_keepalive() -> u64 {
    crate::tunnel::DEFAULT_KEEPALIVE.as_secs()
}
fn default_pod_network() -> String {
    "auto".into()
}

fn default_cap() -> u64 {
    30
}

/// Default place of an agent's private key.
pub fn default_key_path(name: &str) -> PathBuf {
    paths::config_dir()
        .join("agents")
        .join(format!("{name}.key"))
}

pub fn config_path(name: &str) -> PathBuf {
    paths::config_dir()
        .join("agents")
        .join(format!("{name}.json"))
}

/// Agents configured on this machine.
pub fn list_configs() -> Vec<AgentConfig> {
    let dir = paths::config_dir().join("agents");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    if let Ok(c) = serde_json::from_str::<AgentConfig>(&s) {
                        out.push(c);
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The agent's side of its member API server: a pooled kube client.
struct Upstream {
    client: kube::Client,
    policy: Arc<DialPolicy>,
    /// Dials refused by the policy, for status.
    denied: Arc<AtomicU64>,
    pod_network: PodNetwork,
    /// This agent agreed to impersonate operators (`--impersonate`).
    impersonate: bool,
}

impl ChannelService for Upstream {
    fn accepts(&self, target: &str, _port: u32) -> bool {
        // Every well-formed target is accepted here; the dial policy is
        // applied in `serve`, which can say in words why it refuses.
        Target::from_channel_address(target).is_some()
    }

    fn serve(&self, target: String, port: u32, stream: ChannelStream<Msg>) {
        if target != TARGET_APISERVER {
            let Some(t) = Target::from_channel_address(&target) else {
                return;
            };
            let (client, policy, denied) = (
                self.client.clone(),
                self.policy.clone(),
                self.denied.clone(),
            );
            tokio::spawn(serve_raw(
                client,
                policy,
                denied,
                self.pod_network,
                t,
                port,
                stream,
            ));
            return;
        }
        let client = self.client.clone();
        let impersonate = self.impersonate;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(client, impersonate, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!("tunnel stream ended: {e}");
            }
        });
    }
}

/// Parses an agent-side `NAME=ADDR`.
pub fn parse_agent_expose(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, a)) if !n.is_empty() && a.parse::<std::net::SocketAddr>().is_ok() => Ok((n.to_string(), a.to_string())),
        _ => Err(format!("invalid --expose '{s}': use NAME=ADDR, like db=127.0.0.1:5432 (NAME as given to 'towerctl cluster add --expose')")),
    }
}

async fn push_listener(
    l: tokio::net::TcpListener,
    name: String,
    current: watch::Receiver<Option<Arc<client::ClientSession>>>,
    cancel: CancellationToken,
) {
    loop {
        let (mut conn, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let Some(sess) = current.borrow().clone() else {
            tracing::warn!(%name, "refused a workload connection from {peer}: the tunnel is down");
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            match sess.open_direct(&name, peer).await {
                Ok(mut ch) => {
                    let _ = crate::tunnel::splice(&mut conn, &mut ch).await;
                }
                Err(e) => {
                    tracing::warn!(%name, "the hub refused to carry a workload connection: {e}")
                }
            }
        });
    }
}

/// First line an agent writes on a raw channel: `OK`, or `ERR <code> <message>`
/// with code `denied`, `not_found`, `unavailable` or `dial_failed`.
pub const RAW_OK: &str = "OK";

/// How the agent reaches pods: by their IPs, through the API server's
/// `pods/portforward` (agents outside the pod network), or IPs first and
/// port-forward when a pod IP cannot be dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    Direct,
    PortForward,
    Auto,
}

impl PodNetwork {
    pub fn parse(s: &str) -> Result<PodNetwork, String> {
        match s {
            "direct" => Ok(PodNetwork::Direct),
            "portforward" => Ok(PodNetwork::PortForward),
            "auto" => Ok(PodNetwork::Auto),
            _ => Err(format!(
                "invalid --pod-network '{s}': use auto, direct or portforward"
            )),
        }
    }
}

/// A byte stream toward the target, whichever way it was reached.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Conn for T {}

type DialError = (&'static str, String);

async fn dial_tcp(
    addrs: &[std::net::SocketAddr],
    what: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, DialError> {
    let mut last = String::from("no address");
    for a in addrs {
        match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(a)).await
        {
            Ok(Ok(s)) => {
                crate::tunnel::nodelay(&s);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within 10s"),
        }
    }
    Err((
        "dial_failed",
        format!("cannot connect to {what} port {port} ({last})"),
    ))
}

/// Through the API server: `pods/NAME/portforward` (WebSocket).
async fn dial_portforward(
    client: &kube::Client,
    ns: &str,
    name: &str,
    port: u16,
) -> Result<Box<dyn Conn>, DialError> {
    let api = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns);
    let mut pf = api.portforward(name, &[port]).await.map_err(|e| {
        (
            "dial_failed",
            format!("port-forward to pod {ns}/{name} through the API server failed: {e}"),
        )
    })?;
    let stream = pf.take_stream(port).ok_or_else(|| {
        (
            "dial_failed",
            format!("port-forward to pod {ns}/{name} gave no stream"),
        )
    })?;
    // The forwarder's own task lives as long as its stream is in use.
    tokio::spawn(async move {
        let _ = pf.join().await;
    });
    Ok(Box::new(stream))
}

async fn serve_raw(
    client: kube::Client,
    policy: Arc<DialPolicy>,
    denied: Arc<AtomicU64>,
    pod_network: PodNetwork,
    target: Target,
    port: u32,
    mut stream: ChannelStream<Msg>,
) {
    use tokio::io::AsyncWriteExt;
    let dial = async {
        let port =
            u16::try_from(port).map_err(|_| ("not_found", format!("invalid port {port}")))?;
        if let Err(m) = policy.check(&target, port) {
            denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused a dial: {m}");
            return Err(("denied", m));
        }
        match &target {
            Target::Host(h) => {
                let addrs: Vec<_> = tokio::net::lookup_host((h.as_str(), port))
                    .await
                    .map_err(|e| {
                        (
                            "not_found",
                            format!("cannot resolve '{h}' in the member network: {e}"),
                        )
                    })?
                    .collect();
                Ok(Box::new(dial_tcp(&addrs, &target.describe(), port).await?) as Box<dyn Conn>)
            }
            Target::ApiServer => Err((
                "not_found",
                "the API server is reached through the gateway, not CONNECT".to_string(),
            )),
            k8s => {
                let r = resolve::resolve(&client, k8s, port).await.map_err(|e| {
                    let code = match e {
                        resolve::ResolveError::NotFound(_) => "not_found",
                        _ => "unavailable",
                    };
                    (code, e.to_string())
                })?;
                match (pod_network, &r.pod) {
                    (PodNetwork::PortForward, Some((ns, name))) => {
                        dial_portforward(&client, ns, name, r.addr.port()).await
                    }
                    (PodNetwork::PortForward, None) => Err((
                        "unavailable",
                        format!(
                            "{} resolved to {} with no pod reference to port-forward to",
                            target.describe(),
                            r.addr
                        ),
                    )),
                    (PodNetwork::Direct, _) => Ok(Box::new(
                        dial_tcp(&[r.addr], &target.describe(), port).await?,
                    ) as Box<dyn Conn>),
                    (PodNetwork::Auto, pod) => {
                        match dial_tcp(&[r.addr], &target.describe(), port).await {
                            Ok(s) => Ok(Box::new(s) as Box<dyn Conn>),
                            Err(direct) => match pod {
                                Some((ns, name)) => {
                                    tracing::info!(
                                        "{}; trying pods/portforward through the API server",
                                        direct.1
                                    );
                                    dial_portforward(&client, ns, name, r.addr.port()).await
                                }
                                None => Err(direct),
                            },
                        }
                    }
                }
            }
        }
    };
    match dial.await {
        Ok(mut conn) => {
            if stream
                .write_all(format!("{RAW_OK}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let _ = crate::tunnel::splice(&mut stream, &mut conn).await;
        }
        Err((code, msg)) => {
            let _ = stream
                .write_all(format!("ERR {code} {}\n", msg.replace('\n', " ")).as_bytes())
                .await;
            let _ = stream.shutdown().await;
        }
    }
}

/// The operator to impersonate, when both the hub (for this member) and
/// this agent allow it: `(user, groups)`.
fn impersonation(headers: &http::HeaderMap, agent_allows: bool) -> Option<(String, Vec<String>)> {
    let hub_allows = headers.get(IMPERSONATE_HEADER).is_some_and(|v| v == "1");
    if !(agent_allows && hub_allows) {
        return None;
    }
    let user = headers.get(OPERATOR_HEADER)?.to_str().ok()?.to_string();
    let groups = headers
        .get(GROUPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((user, groups))
}

async fn forward(
    client: kube::Client,
    impersonate: bool,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = is_upgrade(req.headers());
    let hub_side_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let identity = impersonation(&parts.headers, impersonate);
    // Removes any Impersonate-* and x-towerctl-* header (defence in depth:
    // the hub already strips what clients send), then adds ours.
    strip_identity(&mut parts.headers);
    if let Some((user, groups)) = identity {
        if let Ok(v) = http::HeaderValue::from_str(&user) {
            parts.headers.insert("impersonate-user", v);
        }
        for g in groups {
            if let Ok(v) = http::HeaderValue::from_str(&g) {
                parts.headers.append("impersonate-group", v);
            }
        }
    }
    parts.headers.remove(header::HOST);
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("request body rejected by the towerctl agent: {e}"),
            )
        }
    };
    let up_req = Request::from_parts(parts, kube::client::Body::from(body));
    let mut resp = match client.send(up_req).await {
        Ok(r) => r,
        Err(e) => {
            return status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("the towerctl agent cannot reach its API server: {e}"),
            );
        }
    };
    super::gateway::finish_upgrade(hub_side_upgrade, &mut resp);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync())
}

/// Builds the client for the member's API server: `--kubeconfig`, else
/// what [`super::incluster::infer`] finds (the pod's service account, or
/// `KUBECONFIG`/`~/.kube/config`).
async fn upstream_client(
    kubeconfig: Option<&PathBuf>,
    sa_dir: Option<&std::path::Path>,
) -> Result<(kube::Client, String)> {
    let mut config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("cannot read the member kubeconfig '{}'", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("the member kubeconfig '{}' is not usable", p.display()))?
        }
        None => super::incluster::infer(sa_dir).await?,
    };
    // Watches and `logs -f` stay open for as long as the operator wants.
    config.read_timeout = None;
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("cannot build the member API client")?;
    Ok((client, url))
}

#[derive(Debug, Clone)]
struct State {
    state: &'static str,
    since: u64,
    rtt: Option<Duration>,
    attempt: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Sessions after the first.
    reconnects: u64,
    rtt_history: VecDeque<f64>,
    events: VecDeque<Event>,
}

impl State {
    fn event(&mut self, text: String) {
        push_bounded(
            &mut self.events,
            Event {
                at: control::now_unix(),
                text,
            },
            EVENTS_KEPT,
        );
    }
}

/// Runs the agent until `cancel` fires or a fatal error (wrong key or
/// token) occurs. `ready` is called when the control socket is up.
pub async fn run(cfg: AgentConfig, cancel: CancellationToken) -> Result<()> {
    let (client, upstream_url) =
        upstream_client(cfg.kubeconfig.as_ref(), cfg.serviceaccount_dir.as_deref()).await?;
    let policy = Arc::new(DialPolicy::new(&cfg.allow).map_err(anyhow::Error::msg)?);
    let denied = Arc::new(AtomicU64::new(0));
    let service: Arc<dyn ChannelService> = Arc::new(Upstream {
        client,
        policy,
        denied: denied.clone(),
        pod_network: PodNetwork::parse(&cfg.pod_network).map_err(anyhow::Error::msg)?,
        impersonate: cfg.impersonate,
    });
    let keepalive = Duration::from_secs(cfg.keepalive_secs.max(1));
    let key_path = cfg
        .key_file
        .clone()
        .unwrap_or_else(|| default_key_path(&cfg.name));
    let key = crate::tunnel::keys::load_or_create_host_key(&key_path, |p, b| {
        paths::write_atomic(p, b, 0o600)
    })
    .with_context(|| format!("the agent key '{}'", key_path.display()))?;
    let opts = DialOptions {
        url: cfg.hub.clone(),
        name: cfg.name.clone(),
        key: Arc::new(key),
        token: cfg.token.clone().filter(|t| !t.is_empty()).map(Secret::new),
        hub_key: cfg.hub_key.clone(),
        keepalive,
        connect_timeout: Duration::from_secs(15),
    };
    if opts.hub_key.is_none() {
        tracing::warn!("the hub's host key is not pinned (--insecure-skip-hub-key): anyone who can intercept the connection can impersonate the hub");
    }

    let (tx, rx) = watch::channel(State {
        state: "connecting",
        since: control::now_unix(),
        rtt: None,
        attempt: 0,
        retry_at: None,
        last_error: None,
        reconnects: 0,
        rtt_history: VecDeque::new(),
        events: VecDeque::new(),
    });
    // Push mode: listeners for the member's workloads, carried to the hub
    // over whatever session is current (refused while there is none).
    let (current, current_rx) = watch::channel::<Option<Arc<client::ClientSession>>>(None);
    let mut exposed = Vec::new();
    for e in &cfg.exposes {
        let (name, addr) = parse_agent_expose(e).map_err(anyhow::Error::msg)?;
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on '{addr}' for the exposed '{name}': choose another address in --expose {name}=ADDR"))?;
        let bound = l.local_addr()?;
        exposed.push(format!("{name}={bound}"));
        tokio::spawn(push_listener(l, name, current_rx.clone(), cancel.clone()));
    }
    if let Some(addr) = &cfg.probe_addr {
        let l = super::probes::bind(addr).await?;
        let rx = rx.clone();
        let ready = move || rx.borrow().state == "connected";
        tokio::spawn(super::probes::serve(l, ready, cancel.clone()));
    }
    let socket = paths::agent_socket(&cfg.name);
    let listener = control::bind(&socket).await?;
    let ctl_cancel = cancel.clone();
    let stop = cancel.clone();
    let name = cfg.name.clone();
    let hub = cfg.hub.clone();
    let ctl = tokio::spawn(control::serve(listener, ctl_cancel, move |req| {
        let rx = rx.clone();
        let stop = stop.clone();
        let name = name.clone();
        let hub = hub.clone();
        let upstream = upstream_url.clone();
        let denied = denied.clone();
        let exposed = exposed.clone();
        async move {
            match req {
                CtlRequest::Status | CtlRequest::Watch { .. } => {
                    let s = rx.borrow().clone();
                    CtlResponse::ok(AgentStatus {
                        name,
                        pid: std::process::id(),
                        hub,
                        state: s.state.to_string(),
                        since: s.since,
                        rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        attempt: s.attempt,
                        retry_in_ms: s.retry_at.map(|t| {
                            t.saturating_duration_since(Instant::now()).as_millis() as u64
                        }),
                        last_error: s.last_error,
                        upstream,
                        reconnects: s.reconnects,
                        rtt_history_ms: s.rtt_history.into_iter().collect(),
                        events: s.events.into_iter().collect(),
                        denied_dials: denied.load(Ordering::Relaxed),
                        exposed: exposed.clone(),
                        version: Some(env!("CARGO_PKG_VERSION").to_string()),
                    })
                }
                CtlRequest::Shutdown => {
                    stop.cancel();
                    CtlResponse::ok(serde_json::json!({}))
                }
                _ => {
                    CtlResponse::err("this is an agent: run 'towerctl cluster add' against the hub")
                }
            }
        }
    }));

    let result = tunnel_loop(
        &opts,
        service,
        &tx,
        &current,
        cfg.backoff_cap_secs,
        cancel.clone(),
    )
    .await;
    cancel.cancel();
    let _ = ctl.await;
    let _ = std::fs::remove_file(&socket);
    result
}

async fn tunnel_loop(
    opts: &DialOptions,
    service: Arc<dyn ChannelService>,
    tx: &watch::Sender<State>,
    current: &watch::Sender<Option<Arc<client::ClientSession>>>,
    cap_secs: u64,
    cancel: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cap_secs.max(1)),
    );
    let set = |f: &dyn Fn(&mut State)| tx.send_modify(|s| f(s));
    let mut connected_before = false;
    loop {
        set(&|s| {
            s.state = "connecting";
            s.retry_at = None;
        });
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = client::connect(opts, service.clone()) => r,
        };
        match attempt {
            Ok(mut sess) => {
                tracing::info!(hub = %opts.url, "tunnel up");
                // systemd: ready once the first attempt is settled.
                crate::daemon::notify::notify(&format!(
                    "READY=1\nSTATUS=connected to {}",
                    opts.url
                ));
                let now = control::now_unix();
                let again = connected_before;
                connected_before = true;
                set(&|s| {
                    s.state = "connected";
                    s.since = now;
                    s.attempt = 0;
                    s.last_error = None;
                    if again {
                        s.reconnects += 1;
                    }
                    s.event(format!("connected to {}", opts.url));
                });
                let closed = sess.take_closed();
                // Shared with the push-mode listeners for as long as it lives.
                let sess = Arc::new(sess);
                current.send_replace(Some(sess.clone()));
                let keepalive = opts.keepalive;
                // Same bound as the hub: dead within three intervals.
                let pinger = async {
                    loop {
                        match sess.ping(keepalive * 2).await {
                            Some(rtt) => tx.send_modify(|s| {
                                s.rtt = Some(rtt);
                                push_bounded(
                                    &mut s.rtt_history,
                                    rtt.as_secs_f64() * 1000.0,
                                    RTT_SAMPLES_KEPT,
                                );
                            }),
                            None => return,
                        }
                        tokio::time::sleep(keepalive).await;
                    }
                };
                let why = tokio::select! {
                    end = closed => {
                        if end.revoked {
                            let reason = end.from_hub.unwrap_or(end.reason);
                            set(&|s| {
                                s.state = "revoked";
                                s.event(format!("stopped: {reason}"));
                                s.last_error = Some(reason.clone());
                            });
                            return Err(anyhow::Error::new(TunnelError::Revoked { reason }));
                        }
                        end.reason
                    }
                    _ = pinger => format!("no answer to keepalives within {:?}: hub declared dead", keepalive * 2),
                    _ = cancel.cancelled() => {
                        current.send_replace(None);
                        sess.farewell("agent stopped").await;
                        return Ok(());
                    }
                };
                current.send_replace(None);
                sess.disconnect("reconnecting").await;
                let uptime = sess.connected_at.elapsed();
                backoff.session_ended(uptime);
                tracing::warn!("tunnel down after {uptime:?}: {why}");
                set(&|s| {
                    s.event(format!("disconnected: {why}"));
                    s.last_error = Some(why.clone());
                });
            }
            Err(e) if e.is_fatal() => {
                let msg = e.to_string();
                let revoked = matches!(e, TunnelError::Revoked { .. });
                set(&|s| {
                    s.state = if revoked { "revoked" } else { "failed" };
                    s.event(format!("stopped: {msg}"));
                    s.last_error = Some(msg.clone());
                });
                return Err(anyhow::Error::new(e));
            }
            Err(e) => {
                tracing::warn!("{e}");
                let msg = e.to_string();
                set(&|s| {
                    // One event per distinct failure, not one per attempt.
                    if s.last_error.as_deref() != Some(msg.as_str()) {
                        s.event(format!("cannot connect: {msg}"));
                    }
                    s.last_error = Some(msg.clone());
                });
            }
        }
        let delay = backoff.next_delay();
        let attempt = backoff.attempt();
        let now = control::now_unix();
        set(&|s| {
            s.state = "backing_off";
            s.since = now;
            s.attempt = attempt;
            s.retry_at = Some(Instant::now() + delay);
        });
        tracing::info!("retrying in {delay:.1?} (attempt {attempt})");
        crate::daemon::notify::notify(&format!(
            "READY=1\nSTATUS=backing off, retry in {delay:.1?} (attempt {attempt})"
        ));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// For `join`: whether a failed agent's error is one that retrying cannot fix.
pub fn is_fatal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<TunnelError>()
        .is_some_and(|t| t.is_fatal())
}
