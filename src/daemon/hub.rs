//! The hub daemon: accepts agents' tunnels, keeps the registry of live
//! sessions, serves the gateway and the control socket.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::{
    self, push_bounded, ClusterAdded, ClusterStatus, Event, HubStatus, Request, Response,
    EVENTS_KEPT, RTT_SAMPLES_KEPT,
};
use super::store::{Member, Operator, RedbStore, Store};
use crate::paths;
use crate::tunnel::server::Verdict;
use crate::tunnel::{self, keys, server, AUTH_PREFIX, REVOKED_PREFIX};
use russh::keys::PublicKey;

/// How the hub is started.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Where agents' WebSocket tunnels are accepted.
    pub listen: SocketAddr,
    /// Where the HTTPS gateway for kubectl listens.
    pub gateway: SocketAddr,
    /// URL agents should dial, when the listen address is not what they see
    /// (NAT, ingress, `wss://`).
    pub advertise: Option<String>,
    /// URL operators should use for the gateway.
    pub gateway_url: Option<String>,
    pub keepalive: Duration,
    /// Where `/metrics` is served; `None` disables it.
    pub metrics: Option<SocketAddr>,
}

/// A live agent session as the hub holds it.
pub struct LiveSession {
    /// Distinguishes a session from its replacement under the same name.
    pub id: u64,
    pub name: String,
    pub handle: russh::server::Handle,
    pub peer: Option<SocketAddr>,
    pub connected_at: u64,
    /// The member lets the agent impersonate operators (from the registry).
    pub impersonate: bool,
    /// Last measured round trip, microseconds (0 = not yet measured).
    pub rtt_us: AtomicU64,
    /// Open channels (upstream connections) right now.
    pub streams: AtomicU64,
    /// Bytes from the agent / to the agent over this session's channels.
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
    pub version: String,
    /// Why the hub itself is closing this session, when it is (an operator's
    /// disconnect, a replacement, a removal): russh only reports that the
    /// session closed, and the event log should say why.
    close_reason: Mutex<Option<String>>,
}

impl LiveSession {
    /// Closes the session from the hub's side, recording why.
    async fn close(&self, why: &str) {
        if let Ok(mut r) = self.close_reason.lock() {
            r.get_or_insert_with(|| why.to_string());
        }
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, why.into(), String::new())
            .await;
    }
}

/// What the hub remembers of a cluster across its sessions (since start).
#[derive(Default)]
struct ClusterMeta {
    sessions: u64,
    events: VecDeque<Event>,
    rtt: VecDeque<f64>,
    rtt_histogram: super::metrics::Histogram,
    /// Bytes of ended sessions (live ones are added when reported).
    bytes_in_done: u64,
    bytes_out_done: u64,
}

/// Per-member figures for the metrics page.
pub struct MemberStats {
    pub name: String,
    pub connected: bool,
    pub rtt: super::metrics::Histogram,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub streams: u64,
    pub reconnects: u64,
}

/// Shared hub state. The session map is read once per gateway request to
/// clone an `Arc`; nothing holds its lock across an await.
pub struct Hub {
    pub store: Arc<dyn Store>,
    sessions: RwLock<HashMap<String, Arc<LiveSession>>>,
    /// When each member's last session ended (unix seconds), for messages.
    disconnected_at: Mutex<HashMap<String, u64>>,
    /// Events and RTT history per cluster; touched on connect, disconnect
    /// and once per ping, never per request.
    meta: Mutex<HashMap<String, ClusterMeta>>,
    next_id: AtomicU64,
    pub started_at: u64,
    pub auditor: super::audit::Auditor,
    /// Operators by token hash (cache of the registry).
    operators: RwLock<HashMap<String, Operator>>,
    pub dial_failures: super::metrics::DialFailures,
    /// The gateway CA (PEM), served to `towerctl login`.
    pub ca_pem: String,
}

impl Hub {
    pub fn session(&self, name: &str) -> Option<Arc<LiveSession>> {
        self.sessions.read().ok()?.get(name).cloned()
    }

    fn record(&self, name: &str, f: impl FnOnce(&mut ClusterMeta)) {
        if let Ok(mut m) = self.meta.lock() {
            f(m.entry(name.to_string()).or_default());
        }
    }

    fn event(&self, name: &str, text: String) {
        self.record(name, |m| {
            push_bounded(
                &mut m.events,
                Event {
                    at: control::now_unix(),
                    text,
                },
                EVENTS_KEPT,
            )
        });
    }

    pub fn disconnected_since(&self, name: &str) -> Option<u64> {
        self.disconnected_at.lock().ok()?.get(name).copied()
    }

    /// Registers a session, replacing (and closing) a stale one of the same name.
    fn register(&self, s: Arc<LiveSession>) {
        self.record(&s.name, |m| m.sessions += 1);
        self.event(
            &s.name,
            format!(
                "connected from {} (agent {})",
                s.peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                s.version
            ),
        );
        if let Ok(Some(mut m)) = self.store.get_member(&s.name) {
            if m.agent_version.as_deref() != Some(s.version.as_str()) {
                m.agent_version = Some(s.version.clone());
                let _ = self.store.put_member(&m);
            }
        }
        let old = self
            .sessions
            .write()
            .ok()
            .and_then(|mut m| m.insert(s.name.clone(), s.clone()));
        if let Some(old) = old {
            tracing::info!(cluster = %s.name, "a new session replaces the previous one");
            tokio::spawn(async move {
                old.close("replaced by a newer session of the same cluster")
                    .await;
            });
        }
    }

    fn unregister(&self, s: &LiveSession, why: &str) {
        self.event(&s.name, format!("disconnected: {why}"));
        let (bi, bo) = (
            s.bytes_in.load(Ordering::Relaxed),
            s.bytes_out.load(Ordering::Relaxed),
        );
        self.record(&s.name, |m| {
            m.bytes_in_done += bi;
            m.bytes_out_done += bo;
        });
        if let Ok(mut m) = self.sessions.write() {
            if m.get(&s.name).map(|cur| cur.id) == Some(s.id) {
                m.remove(&s.name);
            } else {
                return; // already replaced: the cluster is still connected
            }
        }
        let now = control::now_unix();
        if let Ok(mut d) = self.disconnected_at.lock() {
            d.insert(s.name.clone(), now);
        }
        if let Ok(Some(mut m)) = self.store.get_member(&s.name) {
            m.last_seen = Some(now);
            if let Err(e) = self.store.put_member(&m) {
                tracing::warn!("cannot record last_seen of '{}': {e}", s.name);
            }
        }
    }

    /// The operator owning a bearer token, if any.
    /// The operator owning a bearer token. Looked up in memory: the registry
    /// is read once at start and after every operator change, never per
    /// request.
    pub fn operator(&self, token: &str) -> Option<Operator> {
        let hash = keys::token_hash(token);
        self.operators.read().ok()?.get(&hash).cloned()
    }

    /// Reloads the operator cache from the registry.
    fn reload_operators(&self) {
        match self.store.list_operators() {
            Ok(ops) => {
                if let Ok(mut m) = self.operators.write() {
                    *m = ops.into_iter().map(|o| (o.token_hash.clone(), o)).collect();
                }
            }
            Err(e) => tracing::error!("cannot load operators: {e}"),
        }
    }

    pub fn metrics_snapshot(&self) -> Vec<MemberStats> {
        let members = self.store.list_members().unwrap_or_default();
        let meta = self.meta.lock();
        members
            .into_iter()
            .map(|m| {
                let live = self.session(&m.name);
                let cm = meta.as_ref().ok().and_then(|x| x.get(&m.name));
                let (bi, bo, streams) = live
                    .as_ref()
                    .map(|s| {
                        (
                            s.bytes_in.load(Ordering::Relaxed),
                            s.bytes_out.load(Ordering::Relaxed),
                            s.streams.load(Ordering::Relaxed),
                        )
                    })
                    .unwrap_or_default();
                MemberStats {
                    connected: live.is_some(),
                    rtt: cm.map(|c| c.rtt_histogram.clone()).unwrap_or_default(),
                    bytes_in: bi + cm.map(|c| c.bytes_in_done).unwrap_or(0),
                    bytes_out: bo + cm.map(|c| c.bytes_out_done).unwrap_or(0),
                    streams,
                    reconnects: cm.map(|c| c.sessions.saturating_sub(1)).unwrap_or(0),
                    name: m.name,
                }
            })
            .collect()
    }

    pub fn cluster_statuses(&self) -> Vec<ClusterStatus> {
        let members = self.store.list_members().unwrap_or_default();
        let meta = |name: &str| -> (u64, Vec<Event>, Vec<f64>) {
            self.meta
                .lock()
                .ok()
                .and_then(|m| {
                    m.get(name).map(|c| {
                        (
                            c.sessions.saturating_sub(1),
                            c.events.iter().cloned().collect(),
                            c.rtt.iter().copied().collect(),
                        )
                    })
                })
                .unwrap_or_default()
        };
        let now = control::now_unix();
        members
            .into_iter()
            .map(|m| {
                let (reconnects, events, rtt_history_ms) = meta(&m.name);
                let key_fingerprint = m
                    .agent_key
                    .as_deref()
                    .and_then(|k| PublicKey::from_openssh(k).ok())
                    .map(|k| keys::fingerprint(&k));
                let token_state = if m.revoked {
                    "revoked"
                } else if m.single_use && m.token_used {
                    "used"
                } else if m.token_expires_at.is_some_and(|t| now >= t) {
                    "expired"
                } else {
                    "unused"
                };
                let mut st = ClusterStatus {
                    name: m.name.clone(),
                    state: String::new(),
                    since: None,
                    remote: None,
                    rtt_ms: None,
                    streams: 0,
                    agent_version: m.agent_version.clone(),
                    bytes_in: 0,
                    bytes_out: 0,
                    reconnects,
                    rtt_history_ms,
                    events,
                    key_fingerprint,
                    token_expires_at: (token_state == "unused")
                        .then_some(m.token_expires_at)
                        .flatten(),
                    token_state: token_state.into(),
                    labels: m.labels.clone(),
                };
                match self.session(&m.name) {
                    Some(s) => {
                        st.state = "connected".into();
                        st.since = Some(s.connected_at);
                        st.remote = s.peer.map(|p| p.to_string());
                        st.rtt_ms = match s.rtt_us.load(Ordering::Relaxed) {
                            0 => None,
                            us => Some(us as f64 / 1000.0),
                        };
                        st.streams = s.streams.load(Ordering::Relaxed);
                        st.agent_version = Some(s.version.clone());
                        st.bytes_in = s.bytes_in.load(Ordering::Relaxed);
                        st.bytes_out = s.bytes_out.load(Ordering::Relaxed);
                    }
                    None => {
                        let since = self.disconnected_since(&m.name).or(m.last_seen);
                        st.since = since;
                        st.state = if m.revoked {
                            "revoked"
                        } else if since.is_some() {
                            "disconnected"
                        } else {
                            "never_connected"
                        }
                        .into();
                    }
                }
                st
            })
            .collect()
    }
}

impl server::Authenticator for Hub {
    fn exposed(&self, cluster: &str, name: &str) -> Option<String> {
        self.exposed_lookup(cluster, name)
    }

    fn check_key(&self, name: &str, key: &PublicKey) -> Verdict {
        let Ok(Some(m)) = self.store.get_member(name) else {
            return Verdict::Reject(None);
        };
        if m.revoked {
            return Verdict::Reject(Some(revoked_reason(name)));
        }
        let offered = key.to_openssh().unwrap_or_default();
        match &m.agent_key {
            Some(k) if keys::ct_eq(k.trim(), offered.trim()) => Verdict::Accept,
            // Not (or no longer) registered: the agent may still present a token.
            _ => Verdict::Reject(None),
        }
    }

    fn check_token(&self, name: &str, token: &str, proven_key: Option<&PublicKey>) -> Verdict {
        let hash = keys::token_hash(token);
        let now = control::now_unix();
        let mut verdict = Verdict::Reject(Some(format!(
            "{AUTH_PREFIX}the join token is wrong or cluster '{name}' is not registered; run the join command printed by 'towerctl cluster add {name}' or 'towerctl cluster rotate {name}' on the hub"
        )));
        let r = self.store.update_member(name, &mut |m| {
            if !keys::ct_eq(&m.token_hash, &hash) {
                return false;
            }
            if m.revoked {
                verdict = Verdict::Reject(Some(revoked_reason(name)));
                return false;
            }
            if m.single_use && m.token_used {
                verdict = Verdict::Reject(Some(format!(
                    "{AUTH_PREFIX}the join token of cluster '{name}' was already used (tokens are single-use; a joined agent reconnects with its key); run 'towerctl cluster rotate {name}' on the hub for a new one"
                )));
                return false;
            }
            if let Some(exp) = m.token_expires_at {
                if now >= exp {
                    verdict = Verdict::Reject(Some(format!(
                        "{AUTH_PREFIX}the join token of cluster '{name}' expired at {}; run 'towerctl cluster rotate {name}' on the hub for a new one",
                        crate::daemon::fmt_unix(exp)
                    )));
                    return false;
                }
            }
            m.token_used = true;
            if let Some(k) = proven_key.and_then(|k| k.to_openssh().ok()) {
                m.agent_key = Some(k);
            }
            verdict = Verdict::Accept;
            true
        });
        match r {
            Ok(_) => verdict,
            Err(e) => {
                tracing::error!("registry error while checking a join token: {e}");
                Verdict::Reject(None)
            }
        }
    }
}

impl Hub {
    fn exposed_lookup(&self, cluster: &str, name: &str) -> Option<String> {
        self.store
            .get_member(cluster)
            .ok()
            .flatten()?
            .exposes
            .get(name)
            .cloned()
    }
}

fn revoked_reason(name: &str) -> String {
    format!("{REVOKED_PREFIX}cluster '{name}' was revoked on the hub; to let it back, run 'towerctl cluster rm {name}' and 'towerctl cluster add {name}' there and join again")
}

fn write_secret(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    paths::write_atomic(path, data, mode)
}

/// Valid cluster names: DNS-label-like, so they are safe in URLs, kubeconfig
/// names and file names.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_name_of("cluster", name)
}

/// [`validate_name`] for other kinds of names (`operator`).
pub fn validate_name_of(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid {kind} name '{name}': use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (like a Kubernetes name)"))
    }
}

/// Runs the hub until `cancel` fires. `ready` is called once every listener is up.
pub async fn run(
    cfg: HubConfig,
    cancel: CancellationToken,
    ready: impl FnOnce(&HubStatus),
) -> Result<()> {
    let data = paths::data_dir();
    paths::ensure_private_dir(&data)?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&data.join("hub.redb"))?);
    let host_key =
        keys::load_or_create_host_key(&data.join("host_key"), |p, b| write_secret(p, b, 0o600))?;
    let hub_key = keys::fingerprint(host_key.public_key());

    // The local admin operator: created at first start so that `towerctl use`
    // on the hub machine just works. The token file is the only copy.
    let admin_file = data.join("admin.token");
    let admin_token = match std::fs::read_to_string(&admin_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = keys::new_token("top_")?;
            write_secret(&admin_file, format!("{t}\n").as_bytes(), 0o600)?;
            t
        }
    };
    let admin_hash = keys::token_hash(&admin_token);
    if store.operator_by_token_hash(&admin_hash)?.is_none() {
        store.put_operator(&Operator {
            name: "admin".into(),
            token_hash: admin_hash,
            groups: vec!["system:masters".into()],
            created_at: control::now_unix(),
        })?;
    }

    let tunnel_listener = TcpListener::bind(cfg.listen).await.with_context(|| {
        format!(
            "cannot listen for tunnels on '{}': choose another address with --listen",
            cfg.listen
        )
    })?;
    let gateway_listener = TcpListener::bind(cfg.gateway).await.with_context(|| {
        format!(
            "cannot listen for the gateway on '{}': choose another address with --gateway",
            cfg.gateway
        )
    })?;
    let tunnel_addr = tunnel_listener.local_addr()?;
    let gateway_addr = gateway_listener.local_addr()?;
    let metrics_listener = match cfg.metrics {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
            format!("cannot serve metrics on '{a}': choose another address with --metrics, or --metrics off")
        })?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !gateway_addr.ip().is_unspecified() && !gateway_addr.ip().is_loopback() {
        names.push(gateway_addr.ip().to_string());
    }
    if let Some(u) = cfg
        .gateway_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
    {
        if let Some(h) = u.host_str() {
            names.push(h.trim_matches(|c| c == '[' || c == ']').to_string());
        }
    }
    if let Some(h) = hostname() {
        names.push(h);
    }
    // Every member's TLS server name, now and later (routing by SNI).
    names.push(super::route::sni_wildcard());
    names.dedup();
    let tls = super::tls::load(&data, &names, write_secret)?;

    let host_for = |a: SocketAddr| -> String {
        if a.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else if a.is_ipv6() {
            format!("[{}]", a.ip())
        } else {
            a.ip().to_string()
        }
    };
    let tunnel_url = cfg.advertise.clone().unwrap_or_else(|| {
        format!(
            "ws://{}:{}/tunnel",
            host_for(tunnel_addr),
            tunnel_addr.port()
        )
    });
    let gateway_url = cfg
        .gateway_url
        .clone()
        .unwrap_or_else(|| format!("https://{}:{}", host_for(gateway_addr), gateway_addr.port()));

    let hub = Arc::new(Hub {
        store,
        sessions: RwLock::new(HashMap::new()),
        disconnected_at: Mutex::new(HashMap::new()),
        meta: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        started_at: control::now_unix(),
        auditor: super::audit::Auditor::start(paths::state_dir().join("audit.log")),
        dial_failures: Default::default(),
        operators: RwLock::new(HashMap::new()),
        ca_pem: tls.ca_pem.clone(),
    });

    let base_status = HubStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: hub.started_at,
        tunnel_addr: tunnel_addr.to_string(),
        gateway_addr: gateway_addr.to_string(),
        tunnel_url: tunnel_url.clone(),
        gateway_url,
        hub_key: hub_key.clone(),
        ca_pem: tls.ca_pem.clone(),
        admin_token_file: admin_file.display().to_string(),
        metrics_addr: metrics_addr.map(|a| a.to_string()),
        clusters: vec![],
    };

    hub.reload_operators();
    let tracker = TaskTracker::new();
    let ssh_cfg = server::config(host_key, cfg.keepalive);
    tracker.spawn(accept_tunnels(
        tunnel_listener,
        hub.clone(),
        ssh_cfg,
        cfg.keepalive,
        cancel.clone(),
        tracker.clone(),
    ));
    tracker.spawn(super::gateway::serve(
        gateway_listener,
        tls.server_config.clone(),
        hub.clone(),
        cancel.clone(),
        tracker.clone(),
    ));
    if let Some(l) = metrics_listener {
        tracker.spawn(super::metrics::serve(l, hub.clone(), cancel.clone()));
    }

    let socket = paths::hub_socket();
    let listener = control::bind(&socket).await?;
    {
        let hub = hub.clone();
        let base = base_status.clone();
        let cancel = cancel.clone();
        tracker.spawn(control::serve(listener, cancel.clone(), move |req| {
            let hub = hub.clone();
            let base = base.clone();
            let cancel = cancel.clone();
            async move { handle_control(&hub, &base, &cancel, req) }
        }));
    }
    tracing::info!(tunnel = %tunnel_addr, gateway = %gateway_addr, hub_key = %hub_key, "hub ready");
    ready(&base_status);

    cancel.cancelled().await;
    tracker.close();
    // Tell agents we are going; they reconnect with backoff.
    let all: Vec<_> = hub
        .sessions
        .read()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    for s in all {
        let _ = s
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                "the hub is shutting down".into(),
                String::new(),
            )
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// `sha256:<hex>` of a PEM certificate's DER bytes.
pub fn ca_hash(pem: &str) -> String {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap_or_default();
    format!(
        "sha256:{}",
        keys::hex(&<sha2::Sha256 as sha2::Digest>::digest(&der))
    )
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // on success when the name fits.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?.to_string();
    (!s.is_empty()).then_some(s)
}

fn handle_control(
    hub: &Hub,
    base: &HubStatus,
    cancel: &CancellationToken,
    req: Request,
) -> Response {
    match req {
        Request::Status | Request::Watch { .. } => {
            let mut s = base.clone();
            s.clusters = hub.cluster_statuses();
            Response::ok(s)
        }
        Request::ClusterAdd {
            name,
            ttl_secs,
            reusable,
            impersonate,
            exposes,
            labels,
        } => {
            if let Err(e) = validate_name(&name).and_then(|_| super::labels::check(&labels)) {
                return Response::err(e);
            }
            match hub.store.get_member(&name) {
                Ok(Some(m)) if m.revoked => {
                    return Response::err(format!("cluster '{name}' is revoked; run 'towerctl cluster rm {name}' first to register it anew"))
                }
                Ok(Some(_)) => {
                    return Response::err(format!("cluster '{name}' is already registered; 'towerctl cluster rotate {name}' issues a new join token"))
                }
                Ok(None) => {}
                Err(e) => return Response::err(e.to_string()),
            }
            let token = match keys::new_token("tj_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let now = control::now_unix();
            let mut m = Member::new(&name, keys::token_hash(&token), now);
            m.token_expires_at = (ttl_secs > 0).then(|| now + ttl_secs);
            m.single_use = !reusable;
            m.impersonate = impersonate;
            m.exposes = exposes.iter().cloned().collect();
            m.labels = labels;
            if let Err(e) = hub.store.put_member(&m) {
                return Response::err(e.to_string());
            }
            tracing::info!(cluster = %name, "member registered");
            hub.event(&name, "registered".into());
            Response::ok(ClusterAdded {
                name,
                exposes,
                token,
                expires_at: m.token_expires_at,
                tunnel_url: base.tunnel_url.clone(),
                hub_key: base.hub_key.clone(),
            })
        }
        Request::ClusterRotate {
            name,
            ttl_secs,
            reusable,
        } => {
            let token = match keys::new_token("tj_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let now = control::now_unix();
            let hash = keys::token_hash(&token);
            let r = hub.store.update_member(&name, &mut |m| {
                if m.revoked {
                    return false;
                }
                m.token_hash = hash.clone();
                m.token_used = false;
                m.single_use = !reusable;
                m.token_expires_at = (ttl_secs > 0).then(|| now + ttl_secs);
                true
            });
            match r {
                Ok(Some(m)) if m.revoked => Response::err(format!("cluster '{name}' is revoked; run 'towerctl cluster rm {name}' and 'towerctl cluster add {name}' to register it anew")),
                Ok(Some(m)) => {
                    tracing::info!(cluster = %name, "join token rotated");
                    hub.event(&name, "join token rotated".into());
                    Response::ok(ClusterAdded {
                        name,
                        exposes: m.exposes.clone().into_iter().collect(),
                        token,
                        expires_at: m.token_expires_at,
                        tunnel_url: base.tunnel_url.clone(),
                        hub_key: base.hub_key.clone(),
                    })
                }
                Ok(None) => Response::err(format!("cluster '{name}' is not registered on this hub; register it with 'towerctl cluster add {name}'")),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterExpose { name, add, remove } => {
            let r = hub.store.update_member(&name, &mut |m| {
                for n in &remove {
                    m.exposes.remove(n);
                }
                for (n, t) in &add {
                    m.exposes.insert(n.clone(), t.clone());
                }
                true
            });
            match r {
                Ok(Some(m)) => Response::ok(m.exposes),
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterLabel { name, set, remove } => {
            match super::labels::apply(hub.store.as_ref(), &name, set, &remove) {
                Ok(l) => Response::ok(l),
                Err(e) => Response::err(e),
            }
        }
        Request::ClusterRevoke { name } => {
            let r = hub.store.update_member(&name, &mut |m| {
                m.revoked = true;
                m.agent_key = None;
                true
            });
            match r {
                Ok(Some(_)) => {
                    if let Some(s) = hub.session(&name) {
                        let reason = revoked_reason(&name);
                        tokio::spawn(async move {
                            let _ = s
                                .handle
                                .disconnect(russh::Disconnect::ByApplication, reason, String::new())
                                .await;
                        });
                    }
                    tracing::info!(cluster = %name, "member revoked");
                    hub.event(&name, "revoked".into());
                    Response::ok(serde_json::json!({}))
                }
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterRemove { name } => match hub.store.delete_member(&name) {
            Ok(true) => {
                if let Some(s) = hub.session(&name) {
                    tokio::spawn(async move {
                        s.close("the cluster was removed from the hub").await;
                    });
                }
                tracing::info!(cluster = %name, "member removed");
                Response::ok(serde_json::json!({}))
            }
            Ok(false) => Response::err(format!("cluster '{name}' is not registered on this hub")),
            Err(e) => Response::err(e.to_string()),
        },
        Request::OperatorAdd { name, groups } => {
            if let Err(e) = validate_name_of("operator", &name) {
                return Response::err(e);
            }
            if hub
                .store
                .list_operators()
                .unwrap_or_default()
                .iter()
                .any(|o| o.name == name)
            {
                return Response::err(format!("operator '{name}' already exists; remove it first with 'towerctl operator rm {name}'"));
            }
            let token = match keys::new_token("top_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let op = Operator {
                name: name.clone(),
                token_hash: keys::token_hash(&token),
                groups,
                created_at: control::now_unix(),
            };
            if let Err(e) = hub.store.put_operator(&op) {
                return Response::err(e.to_string());
            }
            hub.reload_operators();
            tracing::info!(operator = %name, "operator added");
            Response::ok(control::OperatorAdded {
                name,
                token,
                gateway_url: base.gateway_url.clone(),
                ca_hash: ca_hash(&base.ca_pem),
            })
        }
        Request::OperatorList => match hub.store.list_operators() {
            Ok(ops) => Response::ok(
                ops.into_iter()
                    .map(|o| control::OperatorInfo {
                        name: o.name,
                        groups: o.groups,
                        created_at: o.created_at,
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => Response::err(e.to_string()),
        },
        Request::OperatorRemove { name } => match hub.store.delete_operator(&name) {
            Ok(0) => Response::err(format!(
                "no operator named '{name}'; 'towerctl operator list' shows them"
            )),
            Ok(_) => {
                hub.reload_operators();
                tracing::info!(operator = %name, "operator removed");
                Response::ok(serde_json::json!({}))
            }
            Err(e) => Response::err(e.to_string()),
        },
        Request::Disconnect { name } => match hub.session(&name) {
            Some(s) => {
                tracing::info!(cluster = %name, "session cut by an operator");
                tokio::spawn(async move { s.close(control::DISCONNECT_REASON).await });
                Response::ok(serde_json::json!({}))
            }
            None => match hub.store.get_member(&name) {
                Ok(Some(_)) => Response::err(format!("cluster '{name}' is not connected")),
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            },
        },
        Request::Shutdown => {
            tracing::info!("shutdown requested over the control socket");
            cancel.cancel();
            Response::ok(serde_json::json!({}))
        }
    }
}

async fn accept_tunnels(
    listener: TcpListener,
    hub: Arc<Hub>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((tcp, peer)) = super::accept_next(&listener, &cancel, "tunnel").await {
        let hub = hub.clone();
        let ssh_cfg = ssh_cfg.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = tunnel_session(tcp, peer, hub, ssh_cfg, keepalive, cancel).await {
                tracing::info!(%peer, "tunnel session ended: {e:#}");
            }
        });
    }
}

async fn tunnel_session(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    cancel: CancellationToken,
) -> Result<()> {
    let ws = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::accept_async(tcp),
    )
    .await
    .context("WebSocket handshake timed out")?
    .context("WebSocket handshake failed")?;
    let io = tunnel::ws::WsIo::new(ws);
    let auth: Arc<dyn server::Authenticator> = hub.clone();
    let mut sess = server::accept(ssh_cfg, io, auth, Duration::from_secs(30)).await?;
    let live = Arc::new(LiveSession {
        id: hub.next_id.fetch_add(1, Ordering::Relaxed),
        name: sess.name.clone(),
        handle: sess.handle.clone(),
        peer: Some(peer),
        connected_at: control::now_unix(),
        impersonate: hub
            .store
            .get_member(&sess.name)
            .ok()
            .flatten()
            .is_some_and(|m| m.impersonate),
        rtt_us: AtomicU64::new(0),
        streams: AtomicU64::new(0),
        bytes_in: Arc::new(AtomicU64::new(0)),
        bytes_out: Arc::new(AtomicU64::new(0)),
        version: sess.version.clone(),
        close_reason: Mutex::new(None),
    });
    tracing::info!(cluster = %live.name, %peer, "agent connected");
    hub.register(live.clone());

    // A ping goes out at most one interval after the last answer and gets
    // two intervals to come back: a silent agent is dead within three.
    let pinger = {
        let live = live.clone();
        let hub = hub.clone();
        async move {
            loop {
                match server::ping(&live.handle, keepalive * 2).await {
                    Some(rtt) => {
                        live.rtt_us
                            .store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
                        hub.record(&live.name, |m| {
                            push_bounded(&mut m.rtt, rtt.as_secs_f64() * 1000.0, RTT_SAMPLES_KEPT);
                            m.rtt_histogram.observe(rtt.as_secs_f64());
                        });
                    }
                    None => return,
                }
                tokio::time::sleep(keepalive).await;
            }
        }
    };
    let why = tokio::select! {
        r = &mut sess.running => match r {
            Ok(()) => "session closed".to_string(),
            Err(e) => format!("session failed: {e}"),
        },
        _ = pinger => {
            let _ = live.handle.disconnect(russh::Disconnect::ByApplication, "no keepalive answer".into(), String::new()).await;
            format!("no answer to keepalives within {:?}: declared dead", keepalive * 2)
        }
        _ = cancel.cancelled() => "hub shutting down".to_string(),
    };
    let why = live
        .close_reason
        .lock()
        .ok()
        .and_then(|mut r| r.take())
        .unwrap_or(why);
    tracing::info!(cluster = %live.name, %peer, "agent disconnected: {why}");
    hub.unregister(&live, &why);
    Ok(())
}
