//! The hub daemon: accepts agents' tunnels, keeps the registry of live
//! sessions, serves the gateway and the control socket.

/// Logs a session line of member `$name` ("agent connected" and the like)
/// at info within the member's budget ([`Hub::log_session_line`]), else at
/// debug.
macro_rules! session_line {
    ($hub:expr, $name:expr, $($line:tt)+) => {
        if $hub.log_session_line($name) {
            tracing::info!($($line)+)
        } else {
            tracing::debug!($($line)+)
        }
    };
}

mod auth;
mod control;
mod forward;
pub mod gateway;
mod h2guard;
mod peer;
mod tunnel;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use russh::keys::PublicKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::{Admission, Caps};
use super::control::{
    self as ctl, push_bounded, ClusterStatus, Event, HubStatus, MemberState, TokenState,
    EVENTS_KEPT,
};
use super::metrics::{self, DialFailure, MemberStats};
use super::store::{Operator, RedbStore, Store, StoreError};
use crate::paths;
use crate::tunnel::flow::{WindowBudget, WindowPermit};
use crate::tunnel::{keys, server};

pub use forward::UNKNOWN_TOKEN as UNKNOWN_FORWARD_TOKEN;

pub use super::names::LOCAL_ADMIN;

/// Connections the kernel holds for each of the hub's two listeners until
/// they are accepted (what `TcpListener::bind` asks for).
const LISTEN_BACKLOG: u32 = 1024;

/// Why access was refused when the member's labels could not be read.
pub(super) const REGISTRY_UNREADABLE: &str = "the registry cannot be read";
/// Why a member was refused when no member of that name exists.
pub(super) const NOT_REGISTERED: &str = "not a registered member";

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
    /// With etcd: the gateway URL other hubs forward to (default:
    /// `gateway_url`, else the gateway's address).
    pub peer_url: Option<String>,
    /// More names and addresses the gateway's certificate covers
    /// (`--tls-san`): others operators reach it by.
    pub tls_sans: Vec<String>,
    /// On SIGTERM or SIGINT, how long both `/readyz` answer 503 while the
    /// hub goes on serving, before it stops: a load balancer (a Kubernetes
    /// Service) stops sending new connections first.
    pub shutdown_delay: Duration,
    pub keepalive: Duration,
    /// Where `/metrics` is served; `None` disables it.
    pub metrics: Option<SocketAddr>,
    /// `etcd://HOST:PORT[,…]`: share the registry with other hubs; `None`:
    /// the embedded store.
    pub store: Option<String>,
    /// Key prefix in etcd.
    pub store_prefix: String,
    /// TLS to etcd (`https://` endpoints).
    pub store_access: super::etcd::StoreAccess,
    /// With etcd: how long this hub serves operators from a copy of the
    /// registry it cannot confirm as current (`--store-max-stale`; `None`:
    /// for as long as etcd is away).
    pub store_max_stale: Option<Duration>,
    /// Ingresses and load balancers whose PROXY protocol header or
    /// `X-Forwarded-For` names the client (`--trusted-proxy`).
    pub trusted_proxies: super::proxied::TrustedProxies,
}

/// A live agent session as the hub holds it.
pub struct LiveSession {
    /// Distinguishes a session from its replacement under the same name.
    pub id: u64,
    pub name: String,
    /// The key the agent proved at login (OpenSSH form), if any.
    pub key: Option<String>,
    pub handle: russh::server::Handle,
    /// Where the agent connected from: `IP:PORT`, or behind a trusted
    /// proxy `CLIENT-IP via PROXY-IP:PORT`.
    pub peer: Option<String>,
    pub connected_at: u64,
    /// The member requires the agent to impersonate operators (from the
    /// registry; `cluster set` changes it live).
    pub impersonate: std::sync::atomic::AtomicBool,
    /// The agent declared at login that it impersonates (`--impersonate`).
    pub agent_impersonates: bool,
    /// The agent declared at login that it takes the hub group's URLs
    /// ([`crate::tunnel::TARGET_HUBS`]).
    pub takes_hub_list: bool,
    /// The agent declared at login that it carries a client's own
    /// impersonation ([`crate::tunnel::FEATURE_CLIENT_AS`]).
    pub takes_client_as: bool,
    /// The agent declared at login that its raw channels' opens may carry
    /// the hub's window and the client's first bytes
    /// ([`crate::tunnel::FEATURE_OPEN_EARLY`]).
    pub takes_early: bool,
    /// The agent declared at login that its API channels' opens may carry
    /// the first bytes of the request
    /// ([`crate::tunnel::FEATURE_REQUEST_IN_OPEN`]).
    pub takes_request_in_open: bool,
    /// Last measured round trip, microseconds (0 = not yet measured).
    pub rtt_us: AtomicU64,
    /// When the keepalive now awaiting its answer went out (`None`
    /// between them): an answer overdue longer than the last round trip
    /// is shown as the round trip so far ([`LiveSession::rtt_ms`]).
    pub ping_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// Open channels (upstream connections) right now.
    pub streams: AtomicU64,
    /// The windows the open channels asked the agent for
    /// ([`MEMBER_WINDOW_BUDGET`]).
    pub windows: Arc<WindowBudget>,
    /// Each operator's share of `windows` ([`OPERATOR_WINDOW_SHARE`]).
    pub shares: crate::tunnel::flow::Shares,
    /// Idle channels client connections keep for their next requests
    /// ([`MAX_KEPT_CHANNELS`]).
    pub kept: Arc<Budget>,
    /// The member's counters since the hub started, shared by its
    /// successive sessions (the metrics' counters never go down).
    pub counters: Counters,
    /// The byte counters when this session connected: its own bytes are
    /// the difference.
    bytes_at_start: (u64, u64),
    pub version: String,
    /// Why the hub itself is closing this session, when it is (an operator's
    /// disconnect, a replacement, a removal): russh only reports that the
    /// session closed, and the event log should say why.
    close_reason: Mutex<Option<String>>,
    /// Cuts the session's transport ([`server::ServerSession::abort`]).
    pub kill: CancellationToken,
}

/// How long a session the hub ends gets to take its DISCONNECT before its
/// transport is cut ([`LiveSession::close`]).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Most idle channels kept for client connections' next requests, per
/// member. Kept channels count against the agent's own cap on open streams
/// (4096): a few hundred HTTP/2 clients each keeping 32 must not leave it
/// none for new work. Past it, a connection's channel is closed after its
/// request, as before channels were kept (one channel open per request).
pub const MAX_KEPT_CHANNELS: usize = 512;

/// Most streams one operator holds open to one member through this hub:
/// requests in flight, watches, exec and port-forward sessions, CONNECT and
/// port-forward connections, whatever path they take (the gateway, a
/// hub-served forward, another hub). A quarter of an agent's streams, so
/// one operator cannot take a member away from everyone else (4,200 idle
/// connections through one `towerctl port-forward` via the gateway took
/// all 4,096; as many watches would too). The local admin is not held to
/// it. `TOWERCTL_MAX_STREAMS_PER_OPERATOR` (read at start) sets another.
pub const MAX_STREAMS_PER_OPERATOR: usize = 1024;

/// The least time between two writes of one member's agent version
/// ([`Hub::record_agent_version`]).
const VERSION_WRITE_GAP: Duration = Duration::from_secs(5);

/// [`MAX_STREAMS_PER_OPERATOR`], or `TOWERCTL_MAX_STREAMS_PER_OPERATOR`.
pub fn max_streams_per_operator() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        crate::tunnel::positive_env(
            "TOWERCTL_MAX_STREAMS_PER_OPERATOR",
            MAX_STREAMS_PER_OPERATOR,
        )
    })
}

/// A count bounded by `max`, taken by [`Budget::try_hold`] and given back
/// when the returned guard is dropped.
/// The last token looked up through [`Hub::operator_memo`] and what it
/// stood for.
#[derive(Default)]
pub struct OperatorMemo(std::sync::Mutex<Option<Known>>);

/// A token, the operator it stood for, and the operators' generation
/// ([`Hub::operators_generation`]) when it was looked up.
struct Known {
    token: Box<str>,
    operator: Arc<Operator>,
    generation: u64,
}

pub struct Budget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// One unit of a [`Budget`], held until dropped.
pub struct Held(Arc<Budget>);

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: Default::default(),
            max,
        })
    }

    /// A unit of the budget, or `None` when all are held.
    pub fn try_hold(self: &Arc<Self>) -> Option<Held> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Held(self.clone()))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open channel of a session: counted in the session's open streams
/// while it lives, and in its opened total.
pub struct OpenChannel(Arc<LiveSession>, #[allow(dead_code)] WindowPermit);

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the open streams of one member may have in flight towards the hub
/// together, and so what the hub buffers for them at most when their
/// clients stop reading (plus [`crate::tunnel::flow::MIN_WINDOW`] for each
/// stream past it). Each stream asks the agent for a window out of what is
/// left, between `MIN_WINDOW` and its full size (1 MiB for API answers,
/// 8 MiB for raw streams): 128 full API windows, or 16 raw ones, before
/// new streams get less. Without it, one operator's 1,024 streams whose
/// reader never reads held 1–4 GiB of the hub.
pub const MEMBER_WINDOW_BUDGET: u64 = 128 * 1024 * 1024;

/// One operator's windows to one member are at most this fraction of the
/// member's budget: an operator whose streams stall (or who opens many
/// bulk streams) leaves the rest to everyone else's new streams, which
/// used to get the smallest windows once one operator had taken it all.
pub const OPERATOR_WINDOW_SHARE: u64 = 2;

/// Whether a session answers a keepalive (asked now) within three of its
/// round trips, 2 s at least (30 s at most): a far member's agents, 2.4 s
/// away, were never said to be two with a fixed 2 s.
async fn still_answers(s: &LiveSession) -> bool {
    let rtt = Duration::from_micros(s.rtt_us.load(Ordering::Relaxed));
    let wait = (rtt * 3).clamp(Duration::from_secs(2), Duration::from_secs(30));
    // The keepalive the pinger sends, with a liveness of its own that
    // nothing moves: only the answer counts, within `wait`.
    let quiet = crate::tunnel::ws::Liveness::default();
    crate::tunnel::server::ping(&s.handle, wait, &quiet)
        .await
        .is_some()
}

impl LiveSession {
    /// The round trip to show, milliseconds: the last one measured, or,
    /// while a keepalive's answer is overdue past it, the time waited so
    /// far (a stalled agent showed its last round trip, a fraction of a
    /// millisecond, until the hub declared it dead). `None` before the
    /// first.
    pub fn rtt_ms(&self) -> Option<f64> {
        let last = self.rtt_us.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        let waited = self
            .ping_since
            .lock()
            .ok()
            .and_then(|s| *s)
            .map_or(0, |at| at.elapsed().as_micros() as u64);
        Some(last.max(waited) as f64 / 1000.0)
    }

    /// Bytes in and out over this session (since it connected).
    pub fn session_bytes(&self) -> (u64, u64) {
        let (i, o) = self.counters.bytes();
        (
            i.saturating_sub(self.bytes_at_start.0),
            o.saturating_sub(self.bytes_at_start.1),
        )
    }

    /// The window for a channel `operator` is about to open, out of
    /// [`MEMBER_WINDOW_BUDGET`] and out of the operator's share of it
    /// ([`OPERATOR_WINDOW_SHARE`]): at most `full`, at least `MIN_WINDOW`;
    /// given back when the permit (or the [`OpenChannel`] holding it) is
    /// dropped.
    pub fn window(&self, operator: &str, full: u64) -> WindowPermit {
        self.shares
            .take(&self.windows, operator, OPERATOR_WINDOW_SHARE, full)
    }

    /// Counts a channel just opened over this session, until the returned
    /// guard (which also holds the channel's window) is dropped.
    pub fn channel_opened(self: &Arc<Self>, window: WindowPermit) -> OpenChannel {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        OpenChannel(self.clone(), window)
    }

    /// Closes the session from the hub's side, recording why. The
    /// DISCONNECT is queued for the session loop, which takes no message
    /// while a key exchange is under way, while a channel has data waiting
    /// for window or while its output backlog is full, and after sending it
    /// waits for the peer to close its side: an agent (or a key holder) that
    /// leaves a key exchange unfinished, stops reading or stops answering
    /// kept a revoked, removed or replaced session, and its connection, for
    /// as long as it liked (a key could so hold any number of connections,
    /// each replaced session left open). So the transport is cut
    /// [`CLOSE_GRACE`] later whatever happened, as the keepalive path did.
    pub(crate) async fn close(&self, why: &str) {
        if let Ok(mut r) = self.close_reason.lock() {
            r.get_or_insert_with(|| why.to_string());
        }
        let kill = self.kill.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            kill.cancel();
        });
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            self.handle
                .disconnect(russh::Disconnect::ByApplication, why.into(), String::new()),
        )
        .await;
    }
}

/// Session lines of one member logged at info per minute
/// ([`Hub::log_session_line`]).
pub const SESSION_LINES_PER_MINUTE: u32 = 20;

/// What the hub remembers of a cluster across its sessions (since start).
#[derive(Default)]
struct ClusterMeta {
    sessions: u64,
    events: VecDeque<Event>,
    rtt: VecDeque<f64>,
    rtt_histogram: metrics::Histogram,
    /// The member's counters since start, over all its sessions.
    counters: Counters,
    /// Start of the minute and session lines ("agent connected" and
    /// "agent disconnected") logged in it ([`Hub::log_session_line`]).
    session_lines: Option<(std::time::Instant, u32)>,
    /// Replacements of a session that still answered its keepalives (two
    /// agents holding the member's key): when the first of the last ones
    /// was, how many since, and when it was last said.
    contention: Option<(std::time::Instant, u32)>,
    contention_said: Option<std::time::Instant>,
}

/// A member's counters since the hub started, shared by its sessions.
#[derive(Default, Clone)]
pub struct Counters {
    /// Channels opened.
    pub opened: Arc<AtomicU64>,
    /// Bytes from the agent / to the agent over the member's channels.
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
}

impl Counters {
    /// Bytes in and out so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// Shared hub state. The session map is read once per gateway request to
/// clone an `Arc`; nothing holds its lock across an await.
pub struct Hub {
    pub store: Arc<dyn Store>,
    /// The gateway's authenticated connections, by operator.
    authed_conns: Arc<gateway::AuthedConns>,
    sessions: RwLock<crate::daemon::fasthash::FastMap<String, Arc<LiveSession>>>,
    /// When each member's last session ended (unix seconds), for messages.
    disconnected_at: Mutex<HashMap<String, u64>>,
    /// Members whose `last_seen` is being written, with the time to write
    /// ([`Hub::record_last_seen`]).
    last_seen_pending: Arc<Mutex<HashMap<String, u64>>>,
    /// Events and RTT history per cluster; touched on connect, disconnect
    /// and once per ping, never per request.
    meta: Mutex<HashMap<String, ClusterMeta>>,
    next_id: AtomicU64,
    pub started_at: u64,
    pub auditor: super::audit::Auditor,
    /// Operators by token hash (cache of the registry).
    operators: RwLock<crate::daemon::fasthash::FastMap<String, Operator>>,
    /// Moves on with every reload of `operators`, after it: what a gateway
    /// connection remembers of a token is good only while this stays.
    operators_generation: std::sync::atomic::AtomicU64,
    pub dial_failures: metrics::DialFailures,
    /// Owns every task that serves a connection or a stream, so shutdown
    /// can wait (bounded) for them and their audit records.
    pub tasks: TaskTracker,
    /// Unauthenticated connections of the tunnel and gateway listeners.
    pub admissions: [Arc<Admission>; 2],
    /// Streams in flight through the gateway, cut when access is revoked.
    pub streams: Arc<super::streams::OpenStreams>,
    /// Who may reach which member (cache of the registry's rules).
    pub access: RwLock<super::access::Policy>,
    /// Serializes this hub's changes to the access rules while they are
    /// written (etcd round trips), without holding [`Hub::access`], which
    /// every request reads.
    pub access_change: Mutex<()>,
    /// The gateway CA (PEM), served to `towerctl login`.
    pub ca_pem: String,
    /// Set when this hub is one of several on etcd.
    cluster: std::sync::OnceLock<Arc<peer::Cluster>>,
    /// See [`HubConfig::store_max_stale`].
    max_stale: Option<Duration>,
    /// When the shared registry was last confirmed current, in
    /// [`boot_ms`](super::store_etcd::boot_ms): set by `peer::run` once it
    /// has applied every change reported before the confirmation
    /// (operators and rules reloaded).
    confirmed_ms: AtomicU64,
    /// Whether the last check found the registry unconfirmed for longer.
    stale_seen: std::sync::atomic::AtomicBool,
    /// Set while this hub, refusing operators, hands its agents to another
    /// hub that reaches etcd (`peer::HandOff`): agents logging in are sent
    /// on, and the tunnel listener's `/readyz` answers 503.
    handing_off: std::sync::atomic::AtomicBool,
    /// Stopping after `--shutdown-delay`: both `/readyz` answer 503.
    draining: std::sync::atomic::AtomicBool,
    /// Members sent on since the hand-off began, and how many times.
    handed_off: Mutex<HashMap<String, u32>>,
    /// The hub group's tunnel URLs as last sent to every agent
    /// (`peer::send_hub_list`).
    hub_list_sent: Mutex<Vec<String>>,
    /// Agent versions waiting to be written, by member
    /// ([`Hub::record_agent_version`]).
    version_pending: Arc<Mutex<HashMap<String, String>>>,
    /// Bumped when the registry's members may have changed, here or on
    /// another hub ([`Hub::registry_changed`]): open push connections look
    /// again at what their member exposes.
    registry_changes: tokio::sync::watch::Sender<u64>,
}

impl Hub {
    /// A hub over `store` with no session yet.
    pub fn new(
        store: Arc<dyn Store>,
        auditor: super::audit::Auditor,
        ca_pem: String,
        caps: Caps,
    ) -> Hub {
        Hub {
            store,
            sessions: RwLock::new(Default::default()),
            disconnected_at: Mutex::new(HashMap::new()),
            last_seen_pending: Default::default(),
            meta: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started_at: ctl::now_unix(),
            auditor,
            dial_failures: Default::default(),
            tasks: TaskTracker::new(),
            admissions: [
                Admission::new("tunnel", caps),
                Admission::new("gateway", caps),
            ],
            operators: RwLock::new(Default::default()),
            operators_generation: std::sync::atomic::AtomicU64::new(0),
            streams: Default::default(),
            access: RwLock::new(Default::default()),
            access_change: Mutex::new(()),
            ca_pem,
            cluster: std::sync::OnceLock::new(),
            max_stale: None,
            confirmed_ms: AtomicU64::new(super::store_etcd::boot_ms()),
            stale_seen: Default::default(),
            handing_off: Default::default(),
            draining: Default::default(),
            handed_off: Default::default(),
            hub_list_sent: Default::default(),
            authed_conns: Default::default(),
            registry_changes: tokio::sync::watch::Sender::new(0),
            version_pending: Default::default(),
        }
    }

    /// Tells what watches the registry's members ([`Hub::registry_changes`])
    /// that they may have changed.
    pub fn registry_changed(&self) {
        self.registry_changes
            .send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.registry_changes.subscribe()
    }

    /// Refuses operators (all but this hub's own local admin) while its
    /// copy of the registry has gone unconfirmed for longer than `max`
    /// (see [`HubConfig::store_max_stale`]).
    pub fn with_max_stale(mut self, max: Option<Duration>) -> Hub {
        self.max_stale = max;
        self
    }

    /// This hub's id in a shared registry (etcd).
    pub(super) fn shared_id(&self) -> &str {
        self.cluster.get().map_or("", |c| c.id.as_str())
    }

    /// The shared registry was current as of `at` (after every change
    /// reported before it was applied).
    pub fn registry_confirmed(&self, at_ms: u64) {
        self.confirmed_ms.fetch_max(at_ms, Ordering::SeqCst);
    }

    /// [`Hub::stale_refusal`], unless `op` is this hub's own local admin:
    /// the break-glass token in this hub's data directory. Another hub's
    /// admin token may have been replaced there meanwhile.
    pub fn stale_refusal_for(&self, op: &Operator) -> Option<String> {
        if op.name == LOCAL_ADMIN && op.hub.as_deref() == Some(self.shared_id()) {
            return None;
        }
        self.stale_refusal()
    }

    /// Why operators other than the local admin are refused now: this
    /// hub's copy of a shared registry (etcd) has not been confirmed
    /// current for longer than `--store-max-stale`. An operator removed,
    /// or a rule narrowed, on another hub meanwhile would otherwise still
    /// be served here for as long as this hub cannot reach etcd: the
    /// check fails closed instead.
    pub fn stale_refusal(&self) -> Option<String> {
        let max = self.max_stale?;
        let age = self.registry_age();
        (age > max).then(|| {
            format!(
                "towerctl hub '{}' cannot confirm operators' access: its copy of the shared \
                 registry was last confirmed current {:.1}s ago, over the {}s allowed \
                 (--store-max-stale): it cannot reach etcd or its quorum. Retry through \
                 another hub, or once it reaches etcd again (agents connected to this hub \
                 move to another hub, if one reaches etcd)",
                self.shared_id(),
                age.as_secs_f64(),
                max.as_secs_f64()
            )
        })
    }

    /// With several hubs: how long ago this hub last surely reached etcd,
    /// its registry confirmed current and its lease renewed (the older of
    /// the two; other hubs read it in its `/readyz`, `peer::HandOff`).
    pub fn etcd_age(&self) -> Duration {
        let registry = self.registry_age();
        self.cluster
            .get()
            .map_or(registry, |c| registry.max(c.lease_age()))
    }

    /// How long ago the shared registry was last confirmed current (see
    /// [`Hub::registry_confirmed`]).
    pub fn registry_age(&self) -> Duration {
        let confirmed = self.confirmed_ms.load(Ordering::SeqCst);
        Duration::from_millis(super::store_etcd::boot_ms().saturating_sub(confirmed))
    }

    /// Run every second with a shared registry: on turning stale (see
    /// [`Hub::stale_refusal`]) says so and cuts every operator stream, as
    /// a revocation would (this hub's admin may open new ones); while
    /// stale, cuts any but this hub's admin's that began meanwhile (other
    /// hubs' admins are refused new ones); says when the registry is
    /// confirmed again.
    pub fn check_stale(&self) {
        let refusal = self.stale_refusal();
        let was = self
            .stale_seen
            .swap(refusal.is_some(), std::sync::atomic::Ordering::SeqCst);
        match (was, refusal) {
            (false, Some(why)) => {
                let n = self.streams.cut(|_, _| true);
                tracing::error!(
                    "refusing operators' requests and cutting their {n} open streams: {why}"
                );
            }
            (true, Some(_)) => {
                let own = self.own_admin_hashes();
                self.streams.cut(|token, _| !own.iter().any(|h| h == token));
            }
            (true, None) => tracing::warn!(
                "the shared registry is confirmed current again: serving operators' requests"
            ),
            (false, None) => {}
        }
    }

    /// Whether this hub hands its agents to other hubs now
    /// (`peer::HandOff`).
    pub fn handing_off(&self) -> bool {
        self.handing_off.load(Ordering::Relaxed)
    }

    /// Whether this hub is about to stop (`--shutdown-delay`).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// With several hubs: every live hub's tunnel URL as an agent takes
    /// them ([`crate::tunnel::TARGET_HUBS`]), this one's last (an agent
    /// this hub drops dials another first); empty without.
    pub fn group_tunnel_urls(&self) -> Vec<String> {
        self.cluster
            .get()
            .map(|c| {
                let mut urls = c.tunnel_urls();
                let first = 1.min(urls.len());
                urls.rotate_left(first);
                crate::tunnel::parse_hub_list(&urls.join(" "))
            })
            .unwrap_or_default()
    }

    /// With several hubs: every other live hub's tunnel URL.
    pub fn other_hubs(&self) -> Vec<String> {
        // Read from etcd, written by any hub of the group: only what reads
        // as one ws:// or wss:// URL of printable ASCII goes into the join
        // commands this hub prints.
        self.cluster
            .get()
            .map(|c| {
                c.tunnel_urls()
                    .into_iter()
                    .skip(1)
                    .filter(|u| u.bytes().all(|b| b.is_ascii_graphic()))
                    .flat_map(|u| crate::tunnel::parse_hub_list(&u))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every session held now (a snapshot: no lock held after it).
    pub fn live_sessions(&self) -> Vec<Arc<LiveSession>> {
        self.sessions
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn session(&self, name: &str) -> Option<Arc<LiveSession>> {
        self.sessions.read().ok()?.get(name).cloned()
    }

    fn record(&self, name: &str, f: impl FnOnce(&mut ClusterMeta)) {
        if let Ok(mut m) = self.meta.lock() {
            f(m.entry(name.to_string()).or_default());
        }
    }

    /// Whether one more "agent connected" / "agent disconnected" / "a new
    /// session replaces the previous one" line of member `name` may be
    /// logged at info this minute: at most
    /// [`SESSION_LINES_PER_MINUTE`] per member, the rest at debug. A
    /// member's agent (or whoever holds its key) reconnecting in a loop
    /// wrote two lines per login, 169 logins a second, and rotated the
    /// hub's log away; one member's storm cannot hide another's lines.
    pub fn log_session_line(&self, name: &str) -> bool {
        use crate::tunnel::{minute_budget, Budgeted};
        let Ok(mut m) = self.meta.lock() else {
            return true;
        };
        let meta = m.entry(name.to_string()).or_default();
        match minute_budget(&mut meta.session_lines, SESSION_LINES_PER_MINUTE) {
            Budgeted::FirstHeld => {
                tracing::info!(
                    cluster = %name,
                    "more than {SESSION_LINES_PER_MINUTE} connects and disconnects of this member this minute; the rest are logged at debug (its events in 'towerctl status' keep counting)"
                );
                false
            }
            b => b == Budgeted::Admitted,
        }
    }

    /// The counters of member `name`, shared by its sessions.
    pub fn counters(&self, name: &str) -> Counters {
        self.meta
            .lock()
            .map(|mut m| m.entry(name.to_string()).or_default().counters.clone())
            .unwrap_or_default()
    }

    fn event(&self, name: &str, text: String) {
        // Events quote what peers said (a session's error can list a
        // KEXINIT's names, kilobytes of them): one printable line, bounded,
        // in every status snapshot.
        let text = crate::tunnel::printable(&text, 500);
        self.record(name, |m| {
            push_bounded(
                &mut m.events,
                Event {
                    at: ctl::now_unix(),
                    text,
                },
                EVENTS_KEPT,
            )
        });
    }

    pub fn disconnected_since(&self, name: &str) -> Option<u64> {
        self.disconnected_at.lock().ok()?.get(name).copied()
    }

    /// Forgets what this hub holds of member `name`'s sessions (when it
    /// ended, events, round trips): it was removed, and a member added
    /// under the name again is another.
    pub fn forget_member(&self, name: &str) {
        if let Ok(mut d) = self.disconnected_at.lock() {
            d.remove(name);
        }
        if let Ok(mut m) = self.meta.lock() {
            m.remove(name);
        }
    }

    /// Registers a session, replacing (and closing) a stale one of the same name.
    fn register(self: &Arc<Self>, s: Arc<LiveSession>) {
        self.record(&s.name, |m| m.sessions += 1);
        self.event(
            &s.name,
            format!(
                "connected from {} (agent {})",
                s.peer.clone().unwrap_or_else(|| "?".into()),
                s.version
            ),
        );
        if let Ok(Some(m)) = self.store.get_member(&s.name) {
            // Also when a write of another version is pending: this one
            // must be the last written.
            let pending = self
                .version_pending
                .lock()
                .is_ok_and(|p| p.contains_key(&s.name));
            if pending || m.agent_version.as_deref() != Some(s.version.as_str()) {
                self.record_agent_version(&s.name, &s.version);
            }
        }
        let old = self
            .sessions
            .write()
            .ok()
            .and_then(|mut m| m.insert(s.name.clone(), s.clone()));
        peer::registered(self, &s);
        if let Some(old) = old {
            session_line!(self, &s.name, cluster = %s.name, "a new session replaces the previous one");
            let hub = self.clone();
            self.tasks.spawn(async move {
                // Asked first whether it still answers (another agent
                // with the key), then closed.
                if still_answers(&old).await {
                    hub.note_contention(&s, &old);
                }
                old.close("replaced by a newer session of the same cluster")
                    .await;
            });
        }
    }

    /// A session replaced while it still answers (a keepalive asked then,
    /// [`still_answers`]) is another agent's with the same key, not the
    /// same agent come back over a path that died. Two of them within ten
    /// minutes are said, at warn and in the member's events, once every
    /// ten minutes: two agents took turns replacing each other (each back
    /// after its backoff), cutting the requests in flight at every turn,
    /// said only as reconnections. (A first version judged by the old
    /// session's last keepalive, and warned for one agent whose path died
    /// between two of the hub's keepalives.)
    fn note_contention(&self, new: &LiveSession, old: &LiveSession) {
        const WINDOW: Duration = Duration::from_secs(600);
        let now = std::time::Instant::now();
        let mut say = false;
        self.record(&new.name, |m| {
            let (first, n) = match m.contention {
                Some((first, n)) if now.duration_since(first) < WINDOW => (first, n + 1),
                _ => (now, 1),
            };
            m.contention = Some((first, n));
            if n >= 2
                && m.contention_said
                    .is_none_or(|t| now.duration_since(t) >= WINDOW)
            {
                m.contention_said = Some(now);
                say = true;
            }
        });
        if say {
            let text = format!(
                "two agents hold cluster '{}''s key and take turns replacing each other (the one at {} replaced the one at {}, which still answered): requests in flight are cut at every turn; stop one of them (an old install, a copied key or config, a second replica)",
                new.name,
                new.peer.as_deref().unwrap_or("?"),
                old.peer.as_deref().unwrap_or("?"),
            );
            tracing::warn!(cluster = %new.name, "{text}");
            self.event(&new.name, text);
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
        let now = ctl::now_unix();
        // Cut because its member was removed (and perhaps added again
        // already: a record no agent logged in to): nothing kept of it for
        // the member under the name now, nor its last sighting written
        // into that one's record.
        let gone = match self.store.get_member(&s.name) {
            Ok(None) => true,
            Ok(Some(m)) => m.never_joined(),
            Err(_) => false,
        };
        if gone {
            self.forget_member(&s.name);
        } else if let Ok(mut d) = self.disconnected_at.lock() {
            d.insert(s.name.clone(), now);
        }
        match self.cluster.get() {
            Some(c) => c.release(self, s, now, !gone),
            None if gone => {}
            None => self.record_last_seen(&s.name, now),
        }
    }

    /// Writes the version member `name`'s agent says it runs into its
    /// record: off the runtime thread (with etcd slow, each such login froze
    /// the hub for the write's timeout), one write at a time per member and
    /// at most one every [`VERSION_WRITE_GAP`], the latest version winning.
    /// An agent's key holder logging in again and again with two versions
    /// in turn made a registry write (an fsync, or an etcd transaction
    /// every hub watches) per login, and took the blocking threads that
    /// logins and the registry share.
    fn record_agent_version(&self, name: &str, version: &str) {
        let Ok(mut pending) = self.version_pending.lock() else {
            return;
        };
        if let Some(v) = pending.get_mut(name) {
            // The task in flight writes it next.
            *v = version.to_string();
            return;
        }
        pending.insert(name.to_string(), version.to_string());
        drop(pending);
        let (store, pending, name) = (
            self.store.clone(),
            self.version_pending.clone(),
            name.to_string(),
        );
        // Not among the tasks a shutdown waits for: it may be sleeping.
        tokio::spawn(async move {
            let mut written: Option<String> = None;
            loop {
                let want = match pending.lock() {
                    Ok(mut p) => match p.get(&name) {
                        Some(v) if written.as_ref() != Some(v) => v.clone(),
                        _ => {
                            p.remove(&name);
                            return;
                        }
                    },
                    Err(_) => return,
                };
                let (store, n, v) = (store.clone(), name.clone(), want.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    store.update_member(&n, &mut |m| {
                        if m.agent_version.as_deref() == Some(v.as_str()) {
                            return false;
                        }
                        m.agent_version = Some(v.clone());
                        true
                    })
                })
                .await;
                written = Some(want);
                tokio::time::sleep(VERSION_WRITE_GAP).await;
            }
        });
    }

    /// Records when member `name` was last seen, off the runtime thread
    /// (etcd may be away; the embedded registry's commit waits on two
    /// fsyncs, which stopped every tunnel and the gateway of a hub on one
    /// runtime thread), one write in flight per member: an agent that logs
    /// in and drops in a loop queued a write per session end on the
    /// blocking threads the control socket and logins need. A later time
    /// arriving meanwhile is written once the one in flight is done.
    pub(super) fn record_last_seen(&self, name: &str, now: u64) {
        let Ok(mut pending) = self.last_seen_pending.lock() else {
            return;
        };
        match pending.entry(name.to_string()) {
            // Written by the task in flight (never an earlier time: the
            // clock may have stepped back).
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let at = e.get_mut();
                *at = (*at).max(now);
                return;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(now);
            }
        }
        drop(pending);
        let (store, pending, name) = (
            self.store.clone(),
            self.last_seen_pending.clone(),
            name.to_string(),
        );
        /// Lets later times be written after a write that panicked.
        struct Unwinding(Arc<Mutex<HashMap<String, u64>>>, String);
        impl Drop for Unwinding {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    if let Ok(mut p) = self.0.lock() {
                        p.remove(&self.1);
                    }
                }
            }
        }
        let unwinding = Unwinding(pending.clone(), name.clone());
        let write = move || {
            let _unwinding = unwinding;
            loop {
                let Some(at) = pending.lock().ok().and_then(|p| p.get(&name).copied()) else {
                    return;
                };
                // One read-modify-write: never writes back a stale copy over
                // another hub's change (a revoke) to the same member.
                // Never an earlier time over a later one another hub wrote.
                if let Err(e) = store.update_member(&name, &mut |m| {
                    m.last_seen = m.last_seen.max(Some(at));
                    true
                }) {
                    tracing::warn!("cannot record last_seen of '{name}': {e}");
                }
                let Ok(mut p) = pending.lock() else { return };
                if p.get(&name) == Some(&at) {
                    p.remove(&name);
                    return;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.tasks.spawn_blocking_on(write, &rt);
            }
            Err(_) => write(),
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

    /// See the `operators_generation` field.
    pub fn operators_generation(&self) -> u64 {
        self.operators_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The operator `token` stands for, remembered in `memo`: a token
    /// presented again (kubectl sends it with every request on a gateway
    /// connection; a hub-served forward has one for all its connections) is
    /// not hashed and looked up again while no operator has changed since:
    /// any change (removal, new token) moves the generation on and the next
    /// use looks it up afresh.
    pub fn operator_memo(&self, memo: &OperatorMemo, token: &str) -> Option<Arc<Operator>> {
        // Read before the lookup: a change in between moves it on again.
        let generation = self.operators_generation();
        if let Ok(known) = memo.0.lock() {
            if let Some(k) = known.as_ref() {
                // Constant time: behind a trusted proxy one memo serves
                // many clients' requests.
                if k.generation == generation && keys::ct_eq(&k.token, token) {
                    return Some(k.operator.clone());
                }
            }
        }
        let operator = Arc::new(self.operator(token)?);
        if let Ok(mut known) = memo.0.lock() {
            *known = Some(Known {
                token: token.into(),
                operator: operator.clone(),
                generation,
            });
        }
        Some(operator)
    }

    /// Whether `op` may reach member `name`, and the rule that decided. The
    /// member's labels are read from the registry. A member that is not
    /// registered is refused like a forbidden one: allowed (a rule that
    /// matches by a label's absence, `env notin (prod)`, or by name), its
    /// request went on to checks that a forbidden member never reaches (a
    /// client's malformed `Impersonate-*` headers: 400) before its 404, so an operator
    /// could tell the members it may not reach from names that do not
    /// exist. A registry that cannot be read refuses: label rules could not
    /// be applied, and one of them may be a deny.
    pub fn decide(&self, op: &Operator, name: &str) -> super::access::Decision {
        let labels = if op.name == LOCAL_ADMIN {
            Default::default()
        } else {
            match self.store.get_member(name) {
                Ok(Some(m)) => m.labels,
                Ok(None) => {
                    return super::access::Decision {
                        allowed: false,
                        why: NOT_REGISTERED.into(),
                    }
                }
                Err(e) => {
                    tracing::error!(cluster = %name, "cannot read the member's labels; refusing: {e}");
                    return super::access::Decision {
                        allowed: false,
                        why: REGISTRY_UNREADABLE.into(),
                    };
                }
            }
        };
        self.decide_labeled(op, name, &labels)
    }

    /// Registers a stream of `op` to `cluster`, then decides whether it may
    /// be: the stream is registered *before* the decision, so a revocation
    /// that lands after it (operator removed, rule or labels changed: each
    /// changes what `decide` reads and then cuts the registered streams)
    /// cuts this one too, even while its request still waits for the
    /// member's answer. The operator must also still exist. The guard comes
    /// back only when allowed.
    pub fn admit(
        &self,
        op: &Operator,
        cluster: &str,
    ) -> (super::access::Decision, Option<super::streams::StreamGuard>) {
        // By the operator's token, not its name: with several hubs each
        // has its own admin (all named alike), and a name can be removed
        // and added again with a new token; streams opened with a token
        // that is gone are cut whatever else bears the name.
        let guard = self.streams.open(&op.token_hash, cluster);
        let present = self
            .operators
            .read()
            .map(|m| m.contains_key(&op.token_hash))
            .unwrap_or(false);
        if !present {
            let why = "the operator was removed".to_string();
            return (
                super::access::Decision {
                    allowed: false,
                    why,
                },
                None,
            );
        }
        let decision = self.decide(op, cluster);
        let guard = decision.allowed.then_some(guard);
        (decision, guard)
    }

    /// Why `op` may not open one more stream to `cluster` (the stream just
    /// registered by [`Hub::admit`] included), if it may not: past
    /// [`max_streams_per_operator`]. Never for the local admin.
    pub fn over_stream_limit(&self, op: &Operator, cluster: &str) -> Option<String> {
        if op.name == LOCAL_ADMIN {
            return None;
        }
        let max = max_streams_per_operator();
        (self.streams.count(&op.token_hash, cluster) > max).then(|| {
            format!(
                "operator '{}' has {max} streams open to cluster '{cluster}' already (requests in flight, watches, exec, port-forward and CONNECT connections; the limit per operator and member); close some and retry",
                op.name
            )
        })
    }

    /// [`Hub::decide`] for a member whose labels the caller already has
    /// (lists: one registry read for all members, not one per member).
    pub fn decide_labeled(
        &self,
        op: &Operator,
        name: &str,
        labels: &super::store::Labels,
    ) -> super::access::Decision {
        let local_admin = op.name == LOCAL_ADMIN;
        match self.access.read() {
            Ok(p) => p.decide(&op.name, &op.groups, local_admin, name, labels),
            Err(_) => super::access::Decision {
                allowed: local_admin,
                why: "access rules unavailable".into(),
            },
        }
    }

    /// Loads the access rules from the registry (at start, and when
    /// another hub changed them). Rules that cannot be read fail closed
    /// (an error all the same): every operator but the local admin is
    /// refused until they are read ([`super::access::Policy::unreadable`]).
    /// A registry that cannot be reached leaves the rules as they were
    /// (the copy's staleness limit refuses operators past it).
    pub(crate) fn load_access(&self) -> Result<()> {
        // Read and installed under the write lock: two loads at once (the
        // watch's and an `access` command's after its write) install in
        // the order they read, so the newer rules are the ones left (the
        // registry's copy only moves forward). An older copy installed
        // last kept another hub's new deny unapplied here until the next
        // change.
        let unreadable = {
            let Ok(mut a) = self.access.write() else {
                anyhow::bail!("the access rules are unavailable");
            };
            match self.store.get_setting(super::access::SETTING)? {
                Some(json) => match serde_json::from_str(&json) {
                    Ok(p) => {
                        *a = p;
                        None
                    }
                    Err(e) => {
                        *a = super::access::Policy::unreadable(&e);
                        Some(e)
                    }
                },
                None => {
                    *a = Default::default();
                    None
                }
            }
        };
        if let Some(e) = unreadable {
            let n = self.recheck_streams();
            return Err(anyhow::anyhow!(
                "the access rules in the registry are unreadable ({}); every operator but the local admin is refused until they are read ({n} open streams cut)",
                crate::tunnel::escape_for_log(&e.to_string(), 500)
            ));
        }
        Ok(())
    }

    /// Sets whether session `s` routes with impersonation; whether that
    /// changed it. Raised, the member's streams opened before (a watch, an
    /// exec, a CONNECT, made with the agent's own identity) end, as new
    /// requests in that mode are refused until the agent declares it.
    pub fn set_impersonation(&self, s: &LiveSession, required: bool) -> bool {
        let was = s.impersonate.swap(required, Ordering::Relaxed);
        if required && !was {
            let n = self.streams.cut(|_, c| c == &*s.name);
            if n > 0 {
                tracing::info!(cluster = %s.name, "impersonation now required: {n} open stream(s) made with the agent's identity cut");
            }
        }
        was != required
    }

    /// Cuts every open stream whose operator may no longer reach its member
    /// (after rules were narrowed or an operator removed); returns how many.
    pub fn recheck_streams(&self) -> usize {
        self.registry_changed();
        // By token hash, as streams are registered (`admit`).
        let ops: HashMap<String, Operator> = self
            .operators
            .read()
            .map(|m| m.iter().map(|(h, o)| (h.clone(), o.clone())).collect())
            .unwrap_or_default();
        let (labels, unreadable): (HashMap<String, super::store::Labels>, Vec<String>) = match self
            .store
            .list_readable_members()
        {
            Ok((ms, unreadable)) => (
                ms.into_iter().map(|m| (m.name, m.labels)).collect(),
                unreadable,
            ),
            Err(e) => {
                // Label rules cannot be applied: fail closed.
                tracing::error!("cannot read the members' labels to recheck open streams; cutting every stream but the local admin's: {e}");
                return self
                    .streams
                    .cut(|op, _| ops.get(op).is_none_or(|o| o.name != LOCAL_ADMIN));
            }
        };
        self.streams.cut(|op, cluster| match ops.get(op) {
            // A member whose record this hub cannot read: its labels (and
            // any restriction a newer hub wrote) unknown, only the local
            // admin's streams stay, as its requests are refused.
            Some(o) if unreadable.iter().any(|n| n == cluster) => o.name != LOCAL_ADMIN,
            // Judged as `decide` judges a request: a member no longer
            // registered is refused to all (taken with no labels, a rule
            // by name or by a label's absence kept its streams).
            Some(o) => match labels.get(cluster) {
                Some(l) => !self.decide_labeled(o, cluster, l).allowed,
                None => true,
            },
            None => true,
        })
    }

    /// Reloads the operator cache from the registry; false (logged) when
    /// it could not, and the cache is as it was.
    fn reload_operators(&self) -> bool {
        match self.store.list_readable_operators() {
            Ok(ops) => match self.operators.write() {
                Ok(mut m) => {
                    *m = ops.into_iter().map(|o| (o.token_hash.clone(), o)).collect();
                    self.operators_generation
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    true
                }
                Err(_) => false,
            },
            Err(e) => {
                tracing::error!("cannot load operators: {e}");
                false
            }
        }
    }

    /// Takes the operators for which `gone` holds out of the cache (their
    /// tokens stop working here at once, whether or not a reload follows);
    /// returns their token hashes.
    fn forget_operators(&self, gone: impl Fn(&Operator) -> bool) -> Vec<String> {
        let Ok(mut m) = self.operators.write() else {
            return Vec::new();
        };
        let hashes: Vec<String> = m
            .iter()
            .filter(|(_, o)| gone(o))
            .map(|(h, _)| h.clone())
            .collect();
        for h in &hashes {
            m.remove(h);
        }
        self.operators_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        hashes
    }

    /// The token hashes of this hub's own admin (`admin.token`), as the
    /// cache has them.
    fn own_admin_hashes(&self) -> Vec<String> {
        let id = self.shared_id();
        self.operators
            .read()
            .map(|m| {
                m.values()
                    .filter(|o| {
                        o.name == LOCAL_ADMIN && (id.is_empty() || o.hub.as_deref() == Some(id))
                    })
                    .map(|o| o.token_hash.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The members whose records this hub can read (none if the registry
    /// cannot be read at all): what lists and metrics show.
    fn readable_members(&self) -> Vec<super::store::Member> {
        self.store
            .list_readable_members()
            .map(|(m, _)| m)
            .unwrap_or_default()
    }

    /// What the metrics page shows, taken at once.
    pub fn metrics_snapshot(&self) -> metrics::Snapshot {
        let members = self.readable_members();
        // Before `meta` is taken (every session's history waits on it).
        let elsewhere: std::collections::HashSet<String> = members
            .iter()
            .filter(|m| self.session(&m.name).is_none())
            .filter(|m| peer::reachable_elsewhere(self, &m.name))
            .map(|m| m.name.clone())
            .collect();
        let meta = self.meta.lock();
        let members = members
            .into_iter()
            .map(|m| {
                let live = self.session(&m.name);
                let cm = meta.as_ref().ok().and_then(|x| x.get(&m.name));
                let streams = live
                    .as_ref()
                    .map(|s| s.streams.load(Ordering::Relaxed))
                    .unwrap_or_default();
                let windows = live.as_ref().map(|s| s.windows.held()).unwrap_or_default();
                let (bytes_in, bytes_out) = cm.map(|m| m.counters.bytes()).unwrap_or_default();
                MemberStats {
                    connected: live.is_some(),
                    reachable: live.is_some() || elsewhere.contains(&m.name),
                    rtt: cm.map(|c| c.rtt_histogram.clone()).unwrap_or_default(),
                    bytes_in,
                    bytes_out,
                    streams,
                    windows,
                    opened: cm
                        .map(|m| m.counters.opened.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    reconnects: cm.map(|c| c.sessions.saturating_sub(1)).unwrap_or(0),
                    name: m.name,
                }
            })
            .collect();
        metrics::Snapshot {
            members,
            dial_failures: DialFailure::ALL
                .iter()
                .map(|f| (*f, self.dial_failures.get(*f)))
                .collect(),
            audit_dropped: self.auditor.dropped.load(Ordering::Relaxed),
            unauthenticated: self
                .admissions
                .iter()
                .map(|a| (a.what(), a.open() as u64))
                .collect(),
            registry: self.cluster.get().map(|c| metrics::RegistryHealth {
                age_seconds: self.registry_age().as_secs_f64(),
                max_stale_seconds: self.max_stale.map(|d| d.as_secs_f64()),
                refusing_operators: self.stale_refusal().is_some(),
                failures: c
                    .store
                    .etcd
                    .failures()
                    .into_iter()
                    .map(|(f, n)| (f.as_str(), n))
                    .collect(),
            }),
        }
    }

    pub fn cluster_statuses(&self) -> Vec<ClusterStatus> {
        let members = self.readable_members();
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
        let now = ctl::now_unix();
        members
            .into_iter()
            // Names only a hand edit of etcd gives (no hub registers one):
            // they go into kubeconfig entries, URLs and terminal lines.
            .filter(|m| {
                let ok = super::names::validate_name(&m.name).is_ok();
                if !ok {
                    static BAD: crate::tunnel::LogBudget =
                        crate::tunnel::LogBudget::new("member records with bad names", 5);
                    if BAD.admit() {
                        tracing::warn!(
                            "a member record named '{}' is left out of lists: no hub registers such a name (edited by hand in the registry?)",
                            crate::tunnel::escape_for_log(&m.name, 80)
                        );
                    }
                }
                ok
            })
            .map(|m| {
                let (reconnects, mut events, rtt_history_ms) = meta(&m.name);
                // Not an earlier member's of the name (removed and added
                // again on another hub: this one kept its events).
                events.retain(|e| e.at >= m.created_at);
                let key_fingerprint = m
                    .agent_key
                    .as_deref()
                    .and_then(|k| PublicKey::from_openssh(k).ok())
                    .map(|k| keys::fingerprint(&k));
                let token_state = if m.revoked {
                    TokenState::Revoked
                } else if m.single_use && m.token_used {
                    TokenState::Used
                } else if m.token_expires_at.is_some_and(|t| now >= t) {
                    TokenState::Expired
                } else {
                    TokenState::Unused
                };
                let mut st = ClusterStatus {
                    name: m.name.clone(),
                    state: MemberState::Unknown,
                    since: None,
                    remote: None,
                    rtt_ms: None,
                    streams: 0,
                    // Registry text (any hub, or a hand edit, wrote it).
                    agent_version: m
                        .agent_version
                        .as_deref()
                        .map(|v| crate::tunnel::printable(v, 64)),
                    bytes_in: 0,
                    bytes_out: 0,
                    reconnects,
                    rtt_history_ms,
                    events,
                    key_fingerprint,
                    token_expires_at: (token_state == TokenState::Unused)
                        .then_some(m.token_expires_at)
                        .flatten(),
                    token_state,
                    hub: peer::holder(self, &m.name).map(|h| crate::tunnel::printable(&h, 200)),
                    labels: m.labels.clone(),
                    impersonate: m.impersonate,
                };
                match self.session(&m.name) {
                    Some(s) => {
                        st.state = MemberState::Connected;
                        st.since = Some(s.connected_at);
                        st.remote = s.peer.clone();
                        st.rtt_ms = s.rtt_ms();
                        st.streams = s.streams.load(Ordering::Relaxed);
                        st.agent_version = Some(s.version.clone());
                        (st.bytes_in, st.bytes_out) = s.session_bytes();
                    }
                    None if st.hub.is_some() && !m.revoked => {
                        // Held by another hub.
                        st.state = MemberState::Connected;
                    }
                    None => {
                        // What this hub holds of the name (a session that
                        // ended) is an earlier member's when no agent ever
                        // logged in to this record.
                        let since = if m.never_joined() {
                            None
                        } else {
                            self.disconnected_since(&m.name).or(m.last_seen)
                        };
                        st.since = since;
                        st.state = if m.revoked {
                            MemberState::Revoked
                        } else if since.is_some() || m.agent_key.is_some() {
                            // Joined: its agent's key is registered.
                            MemberState::Disconnected
                        } else {
                            MemberState::NeverConnected
                        };
                    }
                }
                st
            })
            .collect()
    }
}

/// Makes the token in `admin.token` the local admin's (LOCAL_ADMIN), and
/// removes this hub's older admin tokens: deleting `admin.token` and
/// restarting the hub is how a leaked admin token is replaced, so the old
/// one must stop working (it used to stay valid for good, and `operator rm
/// admin` is refused). A hub alone removes every other admin token; with
/// several hubs, only the rows it wrote itself (`hub_id`), as each hub has
/// its own admin.token.
fn local_admin(store: &dyn Store, token: &str, hub_id: &str, alone: bool) -> Result<()> {
    let hash = keys::token_hash(token);
    // Its own record is this hub's to write: one it cannot read (edited
    // by hand, cut short) is written again, not a reason not to start.
    let current = match store.operator_by_token_hash(&hash) {
        Err(StoreError::Corrupt(e)) => {
            tracing::warn!("this hub's own admin record cannot be read ({e}); writing it again");
            None
        }
        r => r?,
    };
    if current.as_ref().map(|o| o.hub.as_deref()) != Some(Some(hub_id)) {
        store.put_operator(&Operator {
            name: LOCAL_ADMIN.into(),
            token_hash: hash.clone(),
            groups: vec!["system:masters".into()],
            created_at: current.map_or_else(ctl::now_unix, |o| o.created_at),
            hub: Some(hub_id.to_string()),
        })?;
    }
    let stale = |o: &Operator| {
        o.name == LOCAL_ADMIN && o.token_hash != hash && (alone || o.hub.as_deref() == Some(hub_id))
    };
    let n = store.delete_operators(&stale)?;
    if n > 0 {
        tracing::info!(
            "{n} earlier admin token(s) of this hub no longer work (admin.token was replaced)"
        );
    }
    Ok(())
}

fn write_secret(path: &std::path::Path, data: &[u8], mode: u32) -> Result<()> {
    paths::write_atomic(path, data, mode)
}

/// How long a registry watch is kept (quiet or busy) before a quorum read
/// confirms the cache and the watch is opened again: at most [`WATCH_SILENCE`], and a sixth of
/// `--store-max-stale` (at least a second), so that a hub with nothing to
/// hear is confirmed current well within the limit, and an etcd outage
/// of most of the limit (50 s of the default 60) is still served from the
/// cache.
///
/// [`WATCH_SILENCE`]: super::store_etcd::WATCH_SILENCE
fn watch_silence(max_stale: Option<Duration>) -> Duration {
    let most = super::store_etcd::WATCH_SILENCE;
    max_stale.map_or(most, |m| (m / 6).clamp(Duration::from_secs(1), most))
}

/// Opens the shared registry in etcd, waiting while etcd does not answer:
/// a hub started with or before its etcd (a pod, a compose file, a
/// machine's boot) comes up once etcd does, instead of exiting and being
/// started again after longer and longer pauses. Meanwhile the tunnel port
/// answers `/healthz` and `/livez` with 200 and everything else with 503
/// (an agent backs off and tries again; the gateway, whose certificate is
/// in etcd, is not served yet), the log says why every 30 s and whenever
/// the reason changes, and a signal stops the hub at once (`None`). What
/// etcd answers with a refusal (a permission, a bad request) or a bad
/// `--store` is not waited for.
async fn open_shared(
    cfg: &HubConfig,
    spec: &str,
    tunnel: &tokio::net::TcpListener,
    signalled: &CancellationToken,
) -> Result<Option<Arc<super::store_etcd::EtcdStore>>> {
    const LOG_EVERY: Duration = Duration::from_secs(30);
    fn starting(path: &str) -> (http::StatusCode, &'static str) {
        match path {
            "/healthz" | "/livez" => (http::StatusCode::OK, "ok\n"),
            _ => (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "the hub is starting: it waits for etcd (see its log); try again shortly\n",
            ),
        }
    }
    // The tunnel port's answers while `fut` runs.
    async fn serving<T>(
        tunnel: &tokio::net::TcpListener,
        fut: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(fut);
        tokio::select! {
            v = &mut fut => v,
            _ = super::probes::serve_with(tunnel, starting, CancellationToken::new()) => fut.await,
        }
    }
    let started = std::time::Instant::now();
    let mut backoff =
        crate::tunnel::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut said: Option<(std::time::Instant, String)> = None;
    loop {
        let open = {
            let (spec, prefix, tls) = (
                spec.to_string(),
                cfg.store_prefix.clone(),
                cfg.store_access.clone(),
            );
            let silence = watch_silence(cfg.store_max_stale);
            // A thread of its own, not the runtime's blocking pool: the
            // runtime's end waits for those, and a signal must stop a
            // waiting hub at once, not after the attempt (2 s per address).
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("etcd-open".into())
                .spawn(move || {
                    let _ = tx.send(super::store_etcd::EtcdStore::open(
                        &spec, &prefix, &tls, silence,
                    ));
                })
                .context("cannot start a thread to reach etcd")?;
            rx
        };
        let r = tokio::select! {
            r = serving(tunnel, open) => r.context("the registry's opening thread failed")?,
            _ = signalled.cancelled() => return Ok(None),
        };
        match r {
            Ok(s) => {
                if said.is_some() {
                    tracing::info!(
                        "etcd answered after {}s: starting",
                        started.elapsed().as_secs()
                    );
                }
                return Ok(Some(s));
            }
            Err(StoreError::Unreachable(why)) => {
                let due = said
                    .as_ref()
                    .is_none_or(|(at, before)| *before != why || at.elapsed() >= LOG_EVERY);
                // At every attempt (one over several endpoints can take
                // long): a Type=notify unit's start would time out (90 s).
                super::notify::notify("STATUS=waiting for etcd\nEXTEND_TIMEOUT_USEC=60000000");
                if due {
                    tracing::warn!("{why}; waiting for it (the tunnel port answers 503 meanwhile)");
                    said = Some((std::time::Instant::now(), why));
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot use the shared registry '{spec}'"))
            }
        }
        tokio::select! {
            _ = serving(tunnel, tokio::time::sleep(backoff.next_delay())) => {}
            _ = signalled.cancelled() => return Ok(None),
        }
    }
}

/// Runs the hub until `cancel` fires (a signal: after
/// [`HubConfig::shutdown_delay`], answering 503 on both `/readyz`
/// meanwhile) or `towerctl down` asks (at once). `ready` is called once
/// every listener is up.
pub async fn run(
    cfg: HubConfig,
    cancel: CancellationToken,
    ready: impl FnOnce(&HubStatus),
) -> Result<()> {
    let (signalled, cancel) = (cancel, CancellationToken::new());
    // Under a memory limit (a pod's), every member's and session's window
    // budget is also taken from a quarter of it: per member alone (128 MiB
    // each), a few members with stalled readers passed it.
    if let Some(limit) = super::memory::cgroup_limit() {
        let total = (limit / 4).max(16 << 20);
        crate::tunnel::flow::set_process_budget(total);
        tracing::info!(
            "memory limit {} MiB (cgroup): streams' full windows are held to {} MiB in all \
             members together (past it, each stream still gets 32 KiB)",
            limit >> 20,
            total >> 20
        );
    }
    let fd_limit = super::admission::raise_fd_limit();
    let caps = Caps::from_fd_limit(fd_limit);
    tracing::info!(
        fd_limit,
        "unauthenticated connections capped at {} per listener, {} per source",
        caps.total,
        caps.per_source
    );
    let data = paths::data_dir();
    paths::ensure_private_dir(&data)?;
    // The audit log's directory. `towerctl up` made it for the daemon's
    // log file, but a hub run in the foreground (a systemd unit, a
    // container) on a fresh home had none, and wrote no audit record.
    paths::ensure_private_dir(&paths::state_dir())?;
    // 0.0.0.0 (the default) listens on IPv6 too where the host has it.
    let (tunnel_listener, tunnel_addr) = crate::daemon::listen_tcp(cfg.listen, LISTEN_BACKLOG)
        .with_context(|| {
            format!(
                "cannot listen for tunnels on '{}': choose another address with --listen",
                cfg.listen
            )
        })?;
    let shared = match &cfg.store {
        Some(spec) => match open_shared(&cfg, spec, &tunnel_listener, &signalled).await? {
            Some(s) => Some(s),
            // A signal while waiting for etcd: nothing was started.
            None => return Ok(()),
        },
        None => None,
    };
    // Bound once etcd answered: while the hub waits for it, a load
    // balancer's TCP check must not find the gateway up and send kubectl to
    // a hub that cannot serve it (its certificate is in etcd).
    let (gateway_listener, gateway_addr) = crate::daemon::listen_tcp(cfg.gateway, LISTEN_BACKLOG)
        .with_context(|| {
        format!(
            "cannot listen for the gateway on '{}': choose another address with --gateway",
            cfg.gateway
        )
    })?;
    let (metrics_listener, metrics_addr) = match cfg.metrics {
        Some(a) => {
            let (l, at) = crate::daemon::listen_tcp(a, 128).with_context(|| {
                format!("cannot serve metrics on '{a}': choose another address with --metrics, or --metrics off")
            })?;
            (Some(l), Some(at))
        }
        None => (None, None),
    };
    let store: Arc<dyn Store> = match &shared {
        Some(s) => {
            let plain = s.etcd.plaintext_remote();
            if !plain.is_empty() {
                tracing::warn!(
                    "etcd at {} is reached without TLS: the hub group's CA key and SSH host key, \
                     which it keeps there, and its registry cross the network readable; write the \
                     endpoints as https://HOST:PORT (with --store-ca, --store-cert, --store-key)",
                    plain.join(",")
                );
            }
            peer::share_secrets(s, &data, write_secret)?;
            s.clone()
        }
        None => {
            let path = data.join("hub.redb");
            // A registry file gone or emptied (a bad restore, a volume
            // swapped) beside the host key it was made with: every member
            // and operator is missing, which nothing else would say.
            let fresh = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
            if fresh && data.join("host_key").exists() {
                tracing::warn!(
                    "the registry '{}' is new, but this data directory holds a host key from before: members and operators registered earlier are not in it. If the file was lost, stop the hub and restore it from a backup",
                    path.display()
                );
            }
            Arc::new(RedbStore::open(&path)?)
        }
    };
    let host_key =
        keys::load_or_create_host_key(&data.join("host_key"), |p, b| write_secret(p, b, 0o600))?;
    let hub_key = keys::fingerprint(host_key.public_key());

    // The local admin operator: created at first start so that `towerctl use`
    // on the hub machine just works. The token file is the only copy.
    let admin_file = data.join("admin.token");
    let admin_token = match std::fs::read_to_string(&admin_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        // Unreadable (a permission, an I/O error): said, not replaced
        // behind the admin's back. Missing or emptied: a new one.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot read the local admin token '{}'; fix its permissions (0600, owned by the hub's user), or delete it to have a new one made",
                admin_file.display()
            )));
        }
        _ => {
            let t = keys::new_token("top_")?;
            write_secret(&admin_file, format!("{t}\n").as_bytes(), 0o600)?;
            t
        }
    };

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !gateway_addr.ip().is_unspecified() && !gateway_addr.ip().is_loopback() {
        names.push(gateway_addr.ip().to_string());
    }
    for u in [cfg.gateway_url.as_deref(), cfg.peer_url.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|u| url::Url::parse(u).ok())
    {
        if let Some(h) = u.host_str() {
            names.push(h.trim_matches(|c| c == '[' || c == ']').to_string());
        }
    }
    if let Some(h) = hostname() {
        names.push(h);
    }
    names.extend(cfg.tls_sans.iter().cloned());
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

    // With several hubs, each has its own admin.token and so its own admin
    // row in the shared registry, and its own lease, hub record
    // (`hubs/<id>`: where the others reach it) and owner keys: told apart
    // by an id made once and kept in the data directory.
    let shared = match shared {
        Some(s) => {
            let info = peer::HubInfo {
                tunnel_url: for_other_hosts(
                    &tunnel_url,
                    tunnel_addr,
                    cfg.advertise.is_some(),
                    "--advertise",
                ),
                gateway_url: match &cfg.peer_url {
                    Some(u) => u.clone(),
                    None => for_other_hosts(
                        &gateway_url,
                        gateway_addr,
                        cfg.gateway_url.is_some(),
                        "--gateway-url",
                    ),
                },
            };
            let id = shared_hub_id(&data, &s, &info)?;
            // Warned, not refused: a group whose hubs all give one
            // balancer's URL keeps running as it did through a restart.
            match peer::peer_url_taken(&s, &id, &info) {
                Ok(Some(other)) => tracing::error!(
                    "another live hub ('{}') is reached by the other hubs at {} too: requests \
                     for members whose tunnel is on this hub may go there and fail. When \
                     --gateway-url names a load balancer in front of several hubs, give each hub \
                     the address the others reach it at directly with --peer-url https://HOST:PORT",
                    crate::tunnel::escape_for_log(&other, 200),
                    crate::tunnel::escape_for_log(&info.gateway_url, 200)
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot read the other hubs' records in etcd: {e:#}"),
            }
            Some((s, id, info))
        }
        None => None,
    };
    let hub_id = shared.as_ref().map_or("local", |(_, id, _)| id.as_str());
    local_admin(store.as_ref(), &admin_token, hub_id, shared.is_none())?;

    let hub = Arc::new(
        Hub::new(
            store,
            super::audit::Auditor::start(paths::state_dir().join("audit.log")),
            tls.ca_pem.clone(),
            caps,
        )
        .with_max_stale(cfg.store.as_ref().and(cfg.store_max_stale)),
    );
    // Set once every listener is up: a signal before that stops at once.
    let started: Arc<std::sync::atomic::AtomicBool> = Default::default();
    {
        let (hub, cancel, started, delay) = (
            hub.clone(),
            cancel.clone(),
            started.clone(),
            cfg.shutdown_delay,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = signalled.cancelled() => {}
                _ = cancel.cancelled() => return,
            }
            if !delay.is_zero() && started.load(Ordering::SeqCst) {
                // A second SIGTERM or SIGINT (Ctrl-C again) does not wait;
                // listened for before /readyz says so.
                use tokio::signal::unix::{signal, SignalKind};
                let (mut term, mut int) = (
                    signal(SignalKind::terminate()).ok(),
                    signal(SignalKind::interrupt()).ok(),
                );
                hub.draining.store(true, Ordering::SeqCst);
                tracing::info!(
                    "answering 503 on /readyz for {:.1}s (--shutdown-delay) before stopping; \
                     a second signal stops at once",
                    delay.as_secs_f64()
                );
                crate::daemon::notify::notify(&format!(
                    "STOPPING=1\nEXTEND_TIMEOUT_USEC={}",
                    (delay + Duration::from_secs(30)).as_micros()
                ));
                let again = async {
                    match (term.as_mut(), int.as_mut()) {
                        (Some(t), Some(i)) => {
                            tokio::select! {
                                _ = t.recv() => {}
                                _ = i.recv() => {}
                            }
                        }
                        _ => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => {}
                    _ = again => tracing::info!("a second signal: stopping now"),
                }
            }
            cancel.cancel();
        });
    }

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
        refusing_operators: None,
        trusted_proxies: cfg.trusted_proxies.to_args(),
    };

    // Subscribed before the first load: a change that lands between the
    // load and a later subscription (an operator removed, a deny rule) was
    // dropped unheard, and stayed unapplied until the next change of its
    // kind, while confirmations marked the copy current.
    let changes = shared.as_ref().map(|(s, _, _)| s.subscribe());
    hub.reload_operators();
    if let Err(e) = hub.load_access() {
        // Rules it cannot decode refuse every operator but the local
        // admin (who can still see why and act); a registry it cannot
        // read stops the start.
        let unreadable = hub.access.read().is_ok_and(|a| a.unreadable.is_some());
        if !unreadable {
            return Err(e);
        }
        tracing::error!("{e:#}");
    }
    let tracker = hub.tasks.clone();
    if let (Some((shared, id, info)), Some(changes)) = (shared, changes) {
        let cluster = peer::Cluster::start(shared, id.clone(), info, &tls.ca_pem)?;
        cluster.keep_admin(keys::token_hash(&admin_token));
        let _ = hub.cluster.set(cluster.clone());
        tracing::info!(hub_id = %id, "sharing the registry with other hubs");
        tracker.spawn(peer::run(hub.clone(), cluster, changes, cancel.clone()));
    }
    let ssh_cfg = server::config(host_key, cfg.keepalive);
    let trusted = Arc::new(cfg.trusted_proxies.clone());
    if !trusted.is_empty() {
        tracing::info!(
            "connections from {} count as from the address they forward for ({})",
            trusted.describe(),
            if trusted.require_header() {
                "a PROXY protocol header, required"
            } else {
                "a PROXY protocol header or X-Forwarded-For"
            }
        );
    }
    tracker.spawn(tunnel::accept_tunnels(
        tunnel_listener,
        hub.clone(),
        hub.admissions[0].clone(),
        ssh_cfg,
        cfg.keepalive,
        trusted.clone(),
        cancel.clone(),
        tracker.clone(),
    ));
    tracker.spawn(gateway::serve(
        gateway_listener,
        tls.server_config.clone(),
        hub.clone(),
        hub.admissions[1].clone(),
        trusted,
        cancel.clone(),
        tracker.clone(),
    ));
    if let Some(l) = metrics_listener {
        let h = hub.clone();
        tracker.spawn(metrics::serve(
            l,
            move || h.metrics_snapshot(),
            cancel.clone(),
            tracker.clone(),
        ));
    }

    let socket = paths::hub_socket();
    let listener = ctl::bind(&socket).await?;
    {
        let hub = hub.clone();
        let base = base_status.clone();
        let cancel = cancel.clone();
        let forwards: ctl::Takeover = {
            let (hub, cancel) = (hub.clone(), cancel.clone());
            Arc::new(move |req, stream| {
                Box::pin(forward::serve(hub.clone(), cancel.clone(), req, stream))
            })
        };
        tracker.spawn(ctl::serve(
            listener,
            cancel.clone(),
            move |req| {
                let hub = hub.clone();
                let base = base.clone();
                let cancel = cancel.clone();
                async move {
                    if hub.cluster.get().is_none() {
                        return control::handle(&hub, &base, &cancel, req);
                    }
                    // Registry writes wait on etcd: off the runtime thread, so
                    // tunnels and the gateway never stall behind them.
                    tokio::task::spawn_blocking(move || control::handle(&hub, &base, &cancel, req))
                        .await
                        .unwrap_or_else(|e| ctl::Response::err(e.to_string()))
                }
            },
            Some(forwards),
        ));
    }
    tracing::info!(tunnel = %tunnel_addr, gateway = %gateway_addr, hub_key = %hub_key, "hub ready");
    ready(&base_status);
    started.store(true, Ordering::SeqCst);

    cancel.cancelled().await;
    tracker.close();
    // Tell agents we are going; they reconnect with backoff.
    // All at once: one that does not take its DISCONNECT (see
    // `LiveSession::close`) held up every one after it.
    let all: Vec<_> = hub.live_sessions();
    futures_util::future::join_all(all.iter().map(|s| s.close("the hub is shutting down"))).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// `url` as parsed (host case, a default port written or not, a trailing
/// slash), for comparing and keeping; as written when it does not parse.
pub fn normalized_url(url: &str) -> String {
    url::Url::parse(url.trim())
        .map(|u| u.as_str().trim_end_matches('/').to_string())
        .unwrap_or_else(|_| url.to_string())
}

/// The URL other hubs (and the agents they send here) use for a listener
/// of this hub. A wildcard listener without an explicit URL made it
/// `127.0.0.1`, which on another machine is that machine itself: every
/// request forwarded here went to the wrong hub. The host name instead
/// (the serving certificate names it), and a warning naming the flag.
fn for_other_hosts(url: &str, addr: SocketAddr, explicit: bool, flag: &str) -> String {
    if explicit || !addr.ip().is_unspecified() {
        return url.to_string();
    }
    let Some(host) = hostname() else {
        return url.to_string();
    };
    let fixed = replace_host(url, &host);
    tracing::warn!(
        "{flag} is not set and the listener is on every address: other hubs will use {fixed}; set {flag} if they cannot reach this hub under that name"
    );
    fixed
}

/// `url` with its host replaced by `host`.
fn replace_host(url: &str, host: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_string();
    };
    if u.set_host(Some(host)).is_err() {
        return url.to_string();
    }
    let s = u.to_string();
    // `Url` writes an empty path as "/"; keep the URL's own form.
    match s.strip_suffix('/') {
        Some(t) if !url.ends_with('/') => t.to_string(),
        _ => s,
    }
}

/// This hub's id in a shared registry: `HOSTNAME-RANDOM`, made at the
/// first start and kept in `hub.id` in the data directory. It used to be
/// `HOSTNAME:GATEWAYPORT`, which two hubs share when their machines have
/// the same host name (stock images: `ubuntu`, `localhost`) and the default
/// port: the second hub then removed the first one's admin token as its
/// own stale one, overwrote its record, and neither forwarded to the other.
/// It also changed with the port, orphaning the hub's older admin rows.
///
/// A data directory copied to start another hub (a cloned VM or volume, a
/// shared mount) brings the first hub's id along: the two would overwrite
/// each other's record and each take the other's sessions for its own, so
/// requests for members held by one fail on the other. A kept id that
/// another live hub holds (a different record that outlives a lease) is
/// replaced by a new one.
fn shared_hub_id(
    data: &std::path::Path,
    store: &crate::daemon::store_etcd::EtcdStore,
    info: &peer::HubInfo,
) -> Result<String> {
    let path = data.join("hub.id");
    match kept_hub_id(&path)? {
        Some(id) => match peer::held_elsewhere(store, &id, info)? {
            None => Ok(id),
            Some(other) => {
                let new = new_hub_id(&path)?;
                tracing::warn!(
                    "the hub id '{id}' in '{}' is in use by another live hub (tunnel {:?}, gateway {:?}): this data directory was copied from it; this hub takes the new id '{new}'",
                    path.display(),
                    other.tunnel_url,
                    other.gateway_url,
                );
                Ok(new)
            }
        },
        None => new_hub_id(&path),
    }
}

/// The id kept in `path`, if it holds a valid one.
fn kept_hub_id(path: &std::path::Path) -> Result<Option<String>> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 90
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    match std::fs::read_to_string(path) {
        Ok(s) if valid(s.trim()) => Ok(Some(s.trim().to_string())),
        Ok(_) => {
            tracing::warn!(
                "'{}' does not hold a hub id; making a new one",
                path.display()
            );
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot read the hub id '{}'; fix its permissions or remove it",
                path.display()
            )
        }),
    }
}

/// A new `HOSTNAME-RANDOM` id, kept in `path`.
fn new_hub_id(path: &std::path::Path) -> Result<String> {
    let host: String = hostname()
        .unwrap_or_else(|| "hub".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("no randomness for the hub id: {e}"))?;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let id = format!("{}-{hex}", if host.is_empty() { "hub" } else { &host });
    crate::paths::write_atomic(path, format!("{id}\n").as_bytes(), 0o600)?;
    Ok(id)
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

#[cfg(test)]
mod tests {
    #[test]
    fn other_hubs_get_the_host_name_for_a_wildcard_listener() {
        use super::{for_other_hosts, replace_host};
        assert_eq!(
            replace_host("https://127.0.0.1:9443", "hub-a"),
            "https://hub-a:9443"
        );
        assert_eq!(
            replace_host("ws://127.0.0.1:8080/tunnel", "hub-a"),
            "ws://hub-a:8080/tunnel"
        );
        let any: std::net::SocketAddr = "0.0.0.0:9443".parse().unwrap();
        let lo: std::net::SocketAddr = "127.0.0.1:9443".parse().unwrap();
        let url = "https://127.0.0.1:9443";
        // An explicit URL or a specific address is kept as it is.
        assert_eq!(for_other_hosts(url, any, true, "--gateway-url"), url);
        assert_eq!(for_other_hosts(url, lo, false, "--gateway-url"), url);
        if let Some(host) = super::hostname() {
            assert_eq!(
                for_other_hosts(url, any, false, "--gateway-url"),
                format!("https://{host}:9443")
            );
        }
    }

    use super::*;

    #[test]
    fn a_budget_holds_at_most_its_size_and_gets_units_back_on_drop() {
        let b = Budget::new(2);
        let one = b.try_hold().expect("first unit");
        let two = b.try_hold().expect("second unit");
        assert!(b.try_hold().is_none(), "a third unit past the budget");
        drop(one);
        let three = b.try_hold().expect("a unit given back is held again");
        assert!(b.try_hold().is_none());
        drop((two, three));
        assert!(b.try_hold().is_some());
    }

    /// A hub over an in-memory registry (its audit log in the directory
    /// returned, removed when that is dropped).
    fn mem_hub() -> (tempfile::TempDir, Arc<crate::daemon::store::MemStore>, Hub) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::daemon::store::MemStore::default());
        let hub = Hub::new(
            store.clone(),
            crate::daemon::audit::Auditor::start(dir.path().join("audit.log")),
            String::new(),
            Caps::from_fd_limit(1024),
        );
        (dir, store, hub)
    }

    /// An agent's key holder logging in again and again with two versions
    /// in turn made a registry write per login.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_versions_are_written_one_at_a_time_the_latest_winning() {
        let (_dir, store, hub) = mem_hub();
        assert!(store
            .create_member(&crate::daemon::store::Member::new("alpha", "h".into(), 1))
            .unwrap());
        let before = store.writes.load(Ordering::SeqCst);
        let version = || store.get_member("alpha").unwrap().unwrap().agent_version;
        for i in 0..200 {
            hub.record_agent_version("alpha", if i % 2 == 0 { "v1" } else { "v2" });
            tokio::task::yield_now().await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while version().is_none() {
            assert!(std::time::Instant::now() < deadline, "nothing written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One write now; the latest version waits for the gap.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let writes = store.writes.load(Ordering::SeqCst) - before;
        assert_eq!(writes, 1, "{writes} writes for 200 logins");
        assert_eq!(
            hub.version_pending
                .lock()
                .unwrap()
                .get("alpha")
                .map(String::as_str),
            Some("v2")
        );
    }

    /// Streams are registered by the token they were opened with: with
    /// several hubs each has its own admin, all named `admin`, and a name
    /// can be removed and added again with a new token. Registered by name,
    /// a stream opened with a token that was gone stayed open as long as
    /// anything bore its name (another hub's admin; the new alice).
    #[tokio::test]
    async fn streams_opened_with_a_token_that_is_gone_are_cut_whatever_else_bears_its_name() {
        use crate::daemon::access::{names_selector, Effect, Subject};
        let (_dir, store, hub) = mem_hub();
        let op = |name: &str, hash: &str, at: Option<&str>| Operator {
            name: name.into(),
            token_hash: hash.into(),
            groups: vec![],
            created_at: 1,
            hub: at.map(Into::into),
        };
        let admin_a = op(LOCAL_ADMIN, "a1", Some("hub-a"));
        let admin_b = op(LOCAL_ADMIN, "b1", Some("hub-b"));
        let (alice_1, alice_2) = (op("alice", "t1", None), op("alice", "t2", None));
        for o in [&admin_a, &admin_b, &alice_1] {
            store.put_operator(o).unwrap();
        }
        assert!(store
            .create_member(&crate::daemon::store::Member::new("alpha", "h".into(), 1))
            .unwrap());
        hub.access
            .write()
            .unwrap()
            .add(
                Effect::Allow,
                Subject::Operator("alice".into()),
                &names_selector(&["alpha".into()]),
            )
            .unwrap();
        assert!(hub.reload_operators());
        let admitted = |o: &Operator| {
            let (d, g) = hub.admit(o, "alpha");
            assert!(d.allowed, "{}: {}", o.name, d.why);
            g.unwrap()
        };
        let (a, b, one) = (admitted(&admin_a), admitted(&admin_b), admitted(&alice_1));
        // Hub A's admin.token replaced (its row goes), and alice removed and
        // added again with a new token, applied in one reload (as a hub
        // applies what it hears of another's changes in a batch).
        store
            .delete_operators(&|o| o.token_hash == "a1" || o.token_hash == "t1")
            .unwrap();
        store.put_operator(&alice_2).unwrap();
        assert!(hub.reload_operators());
        hub.recheck_streams();
        assert!(
            a.cut.is_cancelled(),
            "a stream of hub A's replaced admin token"
        );
        assert!(one.cut.is_cancelled(), "a stream of alice's removed token");
        assert!(
            !b.cut.is_cancelled(),
            "another hub's admin token is still there"
        );
        let two = admitted(&alice_2);
        assert_eq!(hub.streams.count("t2", "alpha"), 1);
        // `operator rm` takes the token out of the cache itself, whatever
        // the reload after it does.
        assert_eq!(
            hub.forget_operators(|o| o.name == "alice"),
            vec!["t2".to_string()]
        );
        assert!(!hub.operators.read().unwrap().contains_key("t2"));
        let (d, g) = hub.admit(&alice_2, "alpha");
        assert!(!d.allowed && g.is_none(), "{}", d.why);
        hub.recheck_streams();
        assert!(two.cut.is_cancelled());
    }
}
