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
use crate::tunnel::{self, keys, server};

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
}

/// A live agent session as the hub holds it.
pub struct LiveSession {
    /// Distinguishes a session from its replacement under the same name.
    pub id: u64,
    pub name: String,
    pub handle: russh::server::Handle,
    pub peer: Option<SocketAddr>,
    pub connected_at: u64,
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
    pub fn operator(&self, token: &str) -> Option<Operator> {
        self.store
            .operator_by_token_hash(&keys::token_hash(token))
            .ok()
            .flatten()
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
        members
            .into_iter()
            .map(|m| {
                let (reconnects, events, rtt_history_ms) = meta(&m.name);
                match self.session(&m.name) {
                    Some(s) => ClusterStatus {
                        name: m.name,
                        state: "connected".into(),
                        since: Some(s.connected_at),
                        remote: s.peer.map(|p| p.to_string()),
                        rtt_ms: match s.rtt_us.load(Ordering::Relaxed) {
                            0 => None,
                            us => Some(us as f64 / 1000.0),
                        },
                        streams: s.streams.load(Ordering::Relaxed),
                        agent_version: Some(s.version.clone()),
                        bytes_in: s.bytes_in.load(Ordering::Relaxed),
                        bytes_out: s.bytes_out.load(Ordering::Relaxed),
                        reconnects,
                        rtt_history_ms,
                        events,
                    },
                    None => {
                        let since = self.disconnected_since(&m.name).or(m.last_seen);
                        ClusterStatus {
                            name: m.name,
                            state: if since.is_some() {
                                "disconnected"
                            } else {
                                "never_connected"
                            }
                            .into(),
                            since,
                            remote: None,
                            rtt_ms: None,
                            streams: 0,
                            agent_version: m.agent_version,
                            bytes_in: 0,
                            bytes_out: 0,
                            reconnects,
                            rtt_history_ms,
                            events,
                        }
                    }
                }
            })
            .collect()
    }
}

impl server::Authenticator for Hub {
    fn authenticate(&self, name: &str, token: &str) -> bool {
        match self.store.get_member(name) {
            Ok(Some(m)) => keys::ct_eq(&m.token_hash, &keys::token_hash(token)),
            _ => false,
        }
    }
}

fn write_secret(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    paths::write_atomic(path, data, mode)
}

/// Valid cluster names: DNS-label-like, so they are safe in URLs, kubeconfig
/// names and file names.
pub fn validate_name(name: &str) -> Result<(), String> {
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
        Err(format!("invalid cluster name '{name}': use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (like a Kubernetes name)"))
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
        clusters: vec![],
    };

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
        Request::ClusterAdd { name } => {
            if let Err(e) = validate_name(&name) {
                return Response::err(e);
            }
            let token = match keys::new_token("tj_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let member = match hub.store.get_member(&name) {
                Ok(Some(mut m)) => {
                    m.token_hash = keys::token_hash(&token);
                    m
                }
                Ok(None) => Member {
                    name: name.clone(),
                    token_hash: keys::token_hash(&token),
                    created_at: control::now_unix(),
                    last_seen: None,
                    agent_version: None,
                },
                Err(e) => return Response::err(e.to_string()),
            };
            if let Err(e) = hub.store.put_member(&member) {
                return Response::err(e.to_string());
            }
            tracing::info!(cluster = %name, "member registered (new join token issued)");
            Response::ok(ClusterAdded {
                name,
                token,
                tunnel_url: base.tunnel_url.clone(),
                hub_key: base.hub_key.clone(),
            })
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
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("tunnel accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tunnel::nodelay(&tcp);
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
                            push_bounded(&mut m.rtt, rtt.as_secs_f64() * 1000.0, RTT_SAMPLES_KEPT)
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
