//! The gateway: one HTTPS listener that serves every member by path (or by
//! TLS server name: see `route.rs`),
//! `https://hub:9443/clusters/<name>/<kubernetes path>`.
//!
//! Each request opens one tunnel channel and speaks HTTP/1.1 to the agent
//! over it. Bodies stream both ways as they come (watch, `logs -f`), and
//! HTTP/1.1 upgrades (exec, attach, port-forward; WebSocket or SPDY) are
//! spliced through once both sides have switched protocols.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Hub, LiveSession};
use crate::daemon::admission::{Admission, Ticket};
use crate::daemon::audit::{Audited, EndRecord, Record};
use crate::daemon::clientas::{ClientAs, CARRIED_PREFIX, CLIENT_PREFIX};
use crate::daemon::http::{
    finish_upgrade, full, is_upgrade, json_response, status_response, strip_hop_by_hop,
    strip_identity, text_response, Body, Guarded, KeptConns, OnDrop, GROUPS_HEADER,
    IMPERSONATE_HEADER, OPERATOR_HEADER,
};
use crate::daemon::metrics::DialFailure;
use crate::daemon::proxied::TrustedProxies;
use crate::daemon::store::Operator;
use crate::daemon::targets::Target;
use crate::daemon::wire::RawAnswer;
use crate::tunnel::quiet::Quiet;
use crate::tunnel::{server, TARGET_APISERVER};

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// Most informational (1xx) answers taken before a member's final answer
/// (see `proxy`).
const MAX_INFORMATIONAL: u32 = 8;

/// The tunnel channels a client connection has used and may use again.
/// kubectl keeps its connection to the gateway alive, so a request finds
/// an idle channel to its member instead of paying a channel open (a tunnel
/// round trip) — without any shared pool or lock across connections. An
/// HTTP/1.1 connection needs one (its requests come one after another); an
/// HTTP/2 connection, as kubectl's is, runs many requests at once, each on
/// a channel of its own, and keeps up to [`IDLE_CHANNELS`] of them.
struct ChannelSlot(std::sync::Mutex<KeptConns<Incoming, Kept>>);

/// What a kept channel leads to: member `name` over session `session`,
/// holding a unit of that member's [`super::MAX_KEPT_CHANNELS`].
struct Kept {
    name: String,
    session: u64,
    _held: super::Held,
}

/// Most channels one client connection keeps for its next requests. Each
/// is a channel and an HTTP/1.1 connection at the agent; the member's
/// budget ([`super::MAX_KEPT_CHANNELS`], 512) bounds them all, so 16
/// connections at this cap take all of it. With 16, an HTTP/2 client
/// running 32 requests at a time (a controller, a dashboard) opened a
/// channel for one request in four (h2load -c1 -m32: 488 opens for 2,000
/// requests; -m16: 16).
const IDLE_CHANNELS: usize = 32;

impl Default for ChannelSlot {
    fn default() -> Self {
        ChannelSlot(std::sync::Mutex::new(KeptConns::new(IDLE_CHANNELS)))
    }
}

impl ChannelSlot {
    fn take(&self, name: &str, session: u64) -> Option<Sender> {
        let mut idle = self.0.lock().ok()?;
        // A channel that has ended (agent gone, session replaced) is no
        // use to anyone.
        idle.prune(|_| true);
        idle.take(|k| k.name == name && k.session == session)
    }

    /// Keeps `sender` for the next request, within the connection's
    /// [`IDLE_CHANNELS`] and the member's kept-channel budget; otherwise
    /// drops it (its channel closes once its response is done).
    fn put(&self, name: String, session: &Arc<LiveSession>, sender: Sender) {
        let Ok(mut idle) = self.0.lock() else { return };
        idle.prune(|_| true);
        if let Some(held) = session.kept.try_hold() {
            let kept = Kept {
                name,
                session: session.id,
                _held: held,
            };
            idle.put(sender, kept);
        }
    }
}

/// From accept to the first authenticated request (TLS handshake and
/// request headers included): a connection that has not shown an operator
/// token by then is closed. Stops slow-loris and half-open floods.
pub const PREAUTH_DEADLINE: Duration = Duration::from_secs(10);

/// A kept-alive connection with no request in flight is closed after this
/// (kubectl reconnects transparently); watches and streams in flight keep
/// their connection. `TOWERCTL_GATEWAY_IDLE_TIMEOUT` (seconds) sets another.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a connection closed for being idle has to end by itself (an
/// HTTP/2 client answers the closing PING, and its GOAWAY follows) before
/// it is dropped: a client that never answered held its connection, and a
/// descriptor of the hub, for ever.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// [`IDLE_TIMEOUT`], or `TOWERCTL_GATEWAY_IDLE_TIMEOUT` seconds.
fn idle_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("TOWERCTL_GATEWAY_IDLE_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(IDLE_TIMEOUT, Duration::from_secs)
    })
}

/// Largest request head (line and headers) accepted; hyper's own default
/// is about 400 KiB.
const MAX_HEAD: usize = 64 * 1024;

/// What the requests of one client connection share.
struct Conn {
    slot: ChannelSlot,
    peer: SocketAddr,
    /// The member named by the connection's TLS server name, if any.
    sni: Option<Arc<str>>,
    /// Held until the first authenticated request.
    ticket: std::sync::Mutex<Option<Ticket>>,
    /// One clone per request in flight (its response body holds it).
    active: Arc<()>,
    /// When the last request started or the last response ended.
    last: std::sync::Mutex<std::time::Instant>,
    /// The operator this connection last authenticated as
    /// ([`Hub::operator_memo`]).
    known: super::OperatorMemo,
    /// The client's address as an `X-Forwarded-For` value.
    forwarded: HeaderValue,
    /// The client's address and port, as audit records give it.
    peer_text: String,
    /// Set when the peer is a trusted proxy (`--trusted-proxy`): each
    /// request's client is then the one its `X-Forwarded-For` names (a
    /// proxy's connection carries many clients' requests).
    proxy: Option<Arc<TrustedProxies>>,
    /// Asks the connection to close (gracefully, then dropped a
    /// [`CLOSE_GRACE`] later): its operator holds too many.
    closer: CancellationToken,
    /// Requests refused on it for want of a valid token
    /// ([`MAX_REFUSED_PER_CONNECTION`]).
    refused: std::sync::atomic::AtomicU32,
    /// Public requests before it authenticated ([`MAX_PUBLIC_PER_CONNECTION`]).
    public: std::sync::atomic::AtomicU32,
    /// Requests refused in a row over its operator's audit budget
    /// ([`MAX_THROTTLED_PER_CONNECTION`]).
    throttled: std::sync::atomic::AtomicU32,
    /// Its place among its operator's connections ([`AuthedConns`]), from
    /// its first authenticated request.
    registration: std::sync::Mutex<Option<Registration>>,
    /// `towerctl port-forward`'s multiplexed HTTP/2 ([`MUX_ALPN`]): counted
    /// apart, under [`MAX_MUX_CONNECTIONS_PER_OPERATOR`].
    ///
    /// [`MUX_ALPN`]: crate::daemon::tls::MUX_ALPN
    mux: bool,
}

/// Most gateway connections one operator holds at once, unless
/// `TOWERCTL_MAX_CONNECTIONS_PER_OPERATOR` (read at start) says otherwise.
/// Past it the operator's oldest idle connection is closed for the new
/// one; with none idle the new one is refused. Without it a token holder
/// could hold any number of connections (descriptors and TLS buffers):
/// the pre-authentication caps no longer count a connection once its
/// first request carried a valid token.
pub const MAX_CONNECTIONS_PER_OPERATOR: usize = 4096;

/// Requests a connection may have refused in a row for want of a valid
/// token before the hub closes it: one HTTP/2 connection sent 401-bound
/// requests without end within its pre-authentication deadline (each a
/// task, a record and an answer on the thread that carries the tunnels),
/// and a connection of a removed operator kept sending them for ever.
const MAX_REFUSED_PER_CONNECTION: u32 = 8;

/// Public requests (health checks, the CA) a connection may make before it
/// authenticates, then it is closed: a load balancer's check or a login
/// asks one or two.
const MAX_PUBLIC_PER_CONNECTION: u32 = 16;

/// Requests a connection may have refused in a row over its operator's
/// audit budget (429 with Retry-After) before the hub closes it.
const MAX_THROTTLED_PER_CONNECTION: u32 = 64;

/// Most of an operator's connections that are `towerctl port-forward`'s
/// multiplexed HTTP/2, unless `TOWERCTL_MAX_MUX_CONNECTIONS_PER_OPERATOR`
/// says otherwise; past it, as past [`MAX_CONNECTIONS_PER_OPERATOR`]. Each
/// takes up to [`MUX_CONN_WINDOW`] of uploads its streams' agents have not
/// taken yet, outside the members' window budgets: 4,096 of them were
/// 64 GiB one token could make the hub hold. One per port-forward process.
///
/// [`MUX_CONN_WINDOW`]: crate::daemon::tls::MUX_CONN_WINDOW
pub const MAX_MUX_CONNECTIONS_PER_OPERATOR: usize = 16;

fn max_mux_connections_per_operator() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        crate::tunnel::positive_env(
            "TOWERCTL_MAX_MUX_CONNECTIONS_PER_OPERATOR",
            MAX_MUX_CONNECTIONS_PER_OPERATOR,
        )
    })
}

fn max_connections_per_operator() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        crate::tunnel::positive_env(
            "TOWERCTL_MAX_CONNECTIONS_PER_OPERATOR",
            MAX_CONNECTIONS_PER_OPERATOR,
        )
    })
}

/// The authenticated gateway connections of each operator (the hub's local
/// admin's are not counted), oldest first; port-forward's multiplexed ones
/// apart from the rest.
#[derive(Default)]
pub(super) struct AuthedConns {
    next: AtomicU64,
    by_operator: std::sync::Mutex<HashMap<(String, bool), ConnsByAge>>,
    /// Each operator's requests in flight on its counted connections,
    /// from their start until their answer's body is dropped
    /// ([`MAX_LIVE_PER_OPERATOR`]).
    live: std::sync::Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// [`MAX_LIVE_PER_OPERATOR`], unless `TOWERCTL_MAX_LIVE_PER_OPERATOR`
/// (read at start) says otherwise.
fn max_live_per_operator() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        crate::tunnel::positive_env("TOWERCTL_MAX_LIVE_PER_OPERATOR", MAX_LIVE_PER_OPERATOR)
    })
}

/// One request counted among its operator's in flight, until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }

    /// Whether it is past [`max_live_per_operator`] (itself counted).
    fn over(&self) -> bool {
        self.0.load(Ordering::Relaxed) > max_live_per_operator()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most requests one operator has in flight at once over all its
/// connections, the hub's own answers included (past it, 429): an HTTP/2
/// client that opens windows of 0 keeps every answer the hub made for it,
/// 1,000 streams a connection, 4,096 connections an operator.
pub const MAX_LIVE_PER_OPERATOR: usize = 8192;

/// Connections by registration order.
type ConnsByAge = std::collections::BTreeMap<u64, std::sync::Weak<Conn>>;

/// A connection's place in [`AuthedConns`], given back when it ends.
struct Registration {
    conns: Arc<AuthedConns>,
    /// The operator, and whether the connection is multiplexed.
    key: (String, bool),
    id: u64,
    /// The operator's requests in flight ([`AuthedConns::live`]).
    live: Arc<AtomicUsize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.conns.by_operator.lock() {
            if let Some(list) = m.get_mut(&self.key) {
                list.remove(&self.id);
                if list.is_empty() {
                    m.remove(&self.key);
                }
            }
        }
        // The map's and this one: no other connection of the operator.
        if let Ok(mut m) = self.conns.live.lock() {
            if m.get(&self.key.0)
                .is_some_and(|l| Arc::strong_count(l) <= 2)
            {
                m.remove(&self.key.0);
            }
        }
    }
}

impl AuthedConns {
    /// Counts `conn` among `operator`'s (its multiplexed ones, if it is
    /// one); past `max`, the oldest idle one is asked to close. `Err` (in
    /// words) when all of them are busy.
    fn register(
        self: &Arc<Self>,
        operator: &str,
        conn: &Arc<Conn>,
        max: usize,
    ) -> Result<Registration, String> {
        let key = (operator.to_string(), conn.mux);
        // Declared before the guard, so dropped after it: the last `Arc`
        // of a connection that ended meanwhile, dropped under the lock,
        // would run its `Registration`'s drop, which takes the same lock.
        let mut upgraded: Vec<Arc<Conn>> = Vec::new();
        let mut m = self
            .by_operator
            .lock()
            .map_err(|_| "the gateway's connection registry is unavailable".to_string())?;
        let list = m.entry(key.clone()).or_default();
        // Gone ones no longer count (their registrations are on their way
        // out); ones asked to close count until they are gone.
        list.retain(|_, c| c.strong_count() > 0);
        if list.len() >= max {
            let all_busy = |n: usize| {
                match conn.mux {
                false => format!(
                    "operator '{operator}' holds {n} connections to the gateway, all busy or closing (the limit per operator); close some (clients that open a connection per watch: use HTTP/2) and retry"
                ),
                true => format!(
                    "operator '{operator}' holds {n} port-forward connections to the gateway (one per 'towerctl port-forward'), all carrying streams or closing (the limit per operator); stop some port-forwards and retry"
                ),
            }
            };
            // An HTTP/2 client that never acknowledges a close can go on
            // opening streams on a closing connection: past twice the
            // limit, nothing more is taken, whatever is idle.
            if list.len() >= max.saturating_mul(2) {
                return Err(all_busy(list.len()));
            }
            // The one idle longest goes.
            let mut idlest: Option<(u64, Duration)> = None;
            for (id, c) in list.iter() {
                let Some(c) = c.upgrade() else { continue };
                if !c.closer.is_cancelled() {
                    if let Some(d) = c.idle_for() {
                        if idlest.is_none_or(|(_, longest)| d > longest) {
                            idlest = Some((*id, d));
                        }
                    }
                }
                upgraded.push(c);
            }
            let Some((id, _)) = idlest else {
                return Err(all_busy(list.len()));
            };
            if let Some(c) = list.get(&id).and_then(|c| c.upgrade()) {
                c.closer.cancel();
                upgraded.push(c);
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        list.insert(id, Arc::downgrade(conn));
        drop(m);
        let live = match self.live.lock() {
            Ok(mut l) => l.entry(key.0.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        Ok(Registration {
            conns: self.clone(),
            key,
            id,
            live,
        })
    }
}

impl Conn {
    /// The client of `req` as audit records give it: the peer, or behind a
    /// trusted proxy `CLIENT-IP via PROXY-IP:PORT`.
    fn client_text(&self, req: &Request<Incoming>) -> String {
        match &self.proxy {
            None => self.peer_text.clone(),
            Some(t) => {
                let client = t.client(self.peer.ip(), req.headers());
                if client == self.peer.ip().to_canonical() {
                    self.peer_text.clone()
                } else {
                    format!("{client} via {}", self.peer_text)
                }
            }
        }
    }
}

impl Conn {
    /// Leaves the unauthenticated pool for `operator`'s connections; `Err`
    /// (and the connection asked to close) when the operator holds too
    /// many, all busy.
    fn authenticated(self: &Arc<Self>, hub: &Hub, operator: &str) -> Result<(), String> {
        let take_ticket = || {
            if let Ok(mut t) = self.ticket.lock() {
                t.take();
            }
        };
        // Not counted: the local admin's, and a trusted proxy's (an
        // ingress's connection carries many operators' requests). A
        // port-forward connection behind one is one client's (the proxy
        // passed TLS through: the ALPN is the client's) and counts.
        if operator == super::LOCAL_ADMIN || self.proxy.is_some() && !self.mux {
            take_ticket();
            return Ok(());
        }
        let Ok(mut reg) = self.registration.lock() else {
            take_ticket();
            return Ok(());
        };
        // Counted once, under the operator of its first request.
        if reg.is_some() {
            return Ok(());
        }
        let max = match self.mux {
            true => max_mux_connections_per_operator(),
            false => max_connections_per_operator(),
        };
        match hub.authed_conns.register(operator, self, max) {
            Ok(r) => {
                *reg = Some(r);
                take_ticket();
                Ok(())
            }
            // Refused: it keeps its place among the unauthenticated (under
            // their caps) while it closes.
            Err(msg) => {
                self.closer.cancel();
                Err(msg)
            }
        }
    }

    /// Its operator's requests in flight, once the connection is counted.
    fn live(&self) -> Option<Arc<AtomicUsize>> {
        self.registration
            .lock()
            .ok()?
            .as_ref()
            .map(|r| r.live.clone())
    }

    fn is_authenticated(&self) -> bool {
        self.ticket.lock().map(|t| t.is_none()).unwrap_or(true)
    }

    fn touch(&self) {
        if let Ok(mut l) = self.last.lock() {
            *l = std::time::Instant::now();
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        // Only this struct and the watchdog hold `active` when no request is
        // in flight.
        if Arc::strong_count(&self.active) > 1 {
            return None;
        }
        self.last.lock().ok().map(|l| l.elapsed())
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    trusted: Arc<TrustedProxies>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Some((tcp, peer)) = crate::daemon::accept_next(&listener, &cancel, "gateway").await {
        let ticket = admission.admit(peer.ip());
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let cancel = cancel.clone();
        let trusted = trusted.clone();
        tracker.spawn(async move {
            let deadline = tokio::time::Instant::now() + PREAUTH_DEADLINE;
            let evicted = ticket.evicted.clone();
            // A load balancer passing TLS through names its client in a
            // PROXY protocol header, if it is trusted to.
            let mut tcp = tcp;
            let mut client = None;
            if trusted.trusts(peer.ip()) {
                // Under the same eviction as the handshake: a connection
                // from a trusted address holding a header open counts
                // against the caps like any other (it used to be kept to
                // the deadline after eviction, past the caps).
                let required = crate::daemon::proxied::RequireHeader(trusted.require_header());
                let header = crate::daemon::proxied::read_proxy_header(&mut tcp, required);
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, header) => match r {
                        Ok(Ok(c)) => {
                            client = c;
                            if let Some(c) = c {
                                ticket.rekey(c.ip().to_canonical());
                            }
                        }
                        Ok(Err(e)) => {
                            // Anything in the trusted range can cause these:
                            // 10 a minute.
                            static REFUSED: crate::tunnel::LogBudget = crate::tunnel::LogBudget::new(
                                "gateway connections refused for their PROXY header",
                                10,
                            );
                            if REFUSED.admit() {
                                tracing::info!(%peer, "gateway connection refused: {e}");
                            }
                            return;
                        }
                        Err(_) => return,
                    },
                    _ = evicted.cancelled() => return,
                    _ = cancel.cancelled() => return,
                }
            }
            let (peer, peer_text) = match client {
                Some(c) => (c, format!("{c} via {peer}")),
                None => (peer, peer.to_string()),
            };
            let proxy = trusted.trusts(peer.ip()).then(|| trusted.clone());
            let stall = Arc::new(WriteStall::default());
            let handshake = acceptor
                .accept(PlainHttpGuard::new(tcp, stall.clone()))
                .into_fallible();
            let tls = tokio::select! {
                r = tokio::time::timeout_at(deadline, handshake) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err((e, mut io))) => {
                        if io.proxy_header {
                            // Anyone can send one: budgeted.
                            static UNTRUSTED: crate::tunnel::LogBudget =
                                crate::tunnel::LogBudget::new("untrusted PROXY headers", 10);
                            if UNTRUSTED.admit() {
                                tracing::info!(%peer, "gateway connection refused: {}", crate::daemon::proxied::UNTRUSTED_PROXY_HEADER);
                            }
                        } else if io.plain_http {
                            tokio::select! {
                                _ = tokio::time::timeout_at(deadline, io.answer_plain_http()) => {}
                                _ = evicted.cancelled() => {}
                                _ = cancel.cancelled() => {}
                            }
                            tracing::debug!(%peer, "plain HTTP on the gateway's TLS port: answered 400");
                        } else {
                            tracing::debug!(%peer, "gateway TLS handshake failed: {e}");
                        }
                        return;
                    }
                    Err(_) => return,
                },
                _ = evicted.cancelled() => return,
                _ = cancel.cancelled() => return,
            };
            // The member this connection is for, when its TLS server name says so.
            let sni: Option<Arc<str>> =
                crate::daemon::route::member_of_sni(tls.get_ref().1.server_name()).map(Arc::from);
            // `towerctl port-forward` multiplexes its streams over one
            // HTTP/2 connection (see `daemon::tls::MUX_ALPN`); clients that
            // offer `h2` (kubectl) get HTTP/2 with kube-apiserver's stream
            // cap; the rest HTTP/1.1, with upgrades.
            let alpn = tls.get_ref().1.alpn_protocol();
            let mux = alpn == Some(crate::daemon::tls::MUX_ALPN);
            let h2 = alpn == Some(b"h2".as_slice());
            let conn_state = Arc::new(Conn {
                slot: ChannelSlot::default(),
                peer,
                sni,
                ticket: std::sync::Mutex::new(Some(ticket)),
                active: Arc::new(()),
                last: std::sync::Mutex::new(std::time::Instant::now()),
                known: Default::default(),
                forwarded: crate::daemon::http::forwarded_value(peer.ip()),
                peer_text,
                proxy,
                closer: CancellationToken::new(),
                refused: Default::default(),
                public: Default::default(),
                throttled: Default::default(),
                registration: Default::default(),
                mux,
            });
            // Answers counted until the client took them (see
            // `Guarded::kept_to_the_end`): HTTP/2's.
            let held_to_the_end = mux || h2;
            let guard_state = conn_state.clone();
            let svc = {
                let conn_state = conn_state.clone();
                hyper::service::service_fn(move |req| {
                    let hub = hub.clone();
                    let c = conn_state.clone();
                    async move {
                        c.touch();
                        // Counted until the answer's body is dropped (or
                        // the request, when its client gives up first).
                        let mut live = c.live().map(InFlight::new);
                        if let Some(l) = &live {
                            if l.over() {
                                return Ok::<_, std::convert::Infallible>(
                                    status_response(
                                        StatusCode::TOO_MANY_REQUESTS,
                                        "TooManyRequests",
                                        &format!("this operator has {} requests in flight over its connections to the gateway (the limit per operator); let some finish (or read their answers) and retry", max_live_per_operator()),
                                    )
                                    .map(|b| b.boxed_unsync()),
                                );
                            }
                        }
                        let hold = c.active.clone();
                        // Boxed: hyper moves each request's future
                        // several times (into its stream task, and tokio
                        // rewrites a task's whole stage when it ends) and
                        // the handler's state machine is large; a box
                        // moves as a pointer (HTTP/2, h2load -m16: 94.7k
                        // -> 90.2k instructions per request at the hub).
                        // A CONNECT's answer carries no body (its stream is
                        // the tunnel): not held for one.
                        let connect = req.method() == hyper::Method::CONNECT;
                        let discovery = is_discovery(&req);
                        let mut resp = Box::pin(handle(hub, &c, req)).await;
                        if discovery && resp.status().as_u16() >= 400 {
                            resp = crate::daemon::http::status_as_text(resp).await;
                        }
                        // The connection's first authenticated request
                        // counts from its answer on.
                        if live.is_none() {
                            live = c.live().map(InFlight::new);
                        }
                        let (parts, body) = resp.into_parts();
                        let touch = {
                            let c = c.clone();
                            OnDrop(Some(move || {
                                c.touch();
                                drop(live);
                            }))
                        };
                        let mut body = Guarded::new(body, None, (hold, touch));
                        if held_to_the_end && !connect {
                            body = body.kept_to_the_end();
                        }
                        Ok::<_, std::convert::Infallible>(Response::from_parts(
                            parts,
                            body.boxed_unsync(),
                        ))
                    }
                })
            };
            let watch = Watch {
                conn_state,
                evicted,
                deadline,
                cancel,
                peer,
                stall,
            };
            if mux || h2 {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                // The head limit, told to the client in SETTINGS: Go
                // refuses a request past it itself ("request header list
                // larger than peer's advertised limit"). Raised, a :path
                // past 64 KiB (what `http::Uri` holds) is reset by h2 as
                // PROTOCOL_ERROR, and Go sends it again on a new
                // connection every few ms until its timeout (kubectl's
                // default: none).
                b.timer(hyper_util::rt::TokioTimer::new())
                    .max_header_list_size(MAX_HEAD as u32)
                    .max_concurrent_streams(if mux { MUX_MAX_STREAMS } else { H2_MAX_STREAMS });
                if mux {
                    b.initial_stream_window_size(crate::daemon::tls::MUX_STREAM_WINDOW)
                        .initial_connection_window_size(crate::daemon::tls::MUX_CONN_WINDOW)
                        .max_frame_size(crate::daemon::tls::MUX_FRAME)
                        // As for kubectl's (below): hyper's 400 KiB a stream
                        // across 4,096 streams for a client that stopped
                        // reading.
                        .max_send_buf_size(H2_SEND_BUFFER);
                } else {
                    // A PING every 20 s while the connection is up: an idle
                    // watch sent nothing for minutes, and a balancer passing
                    // TLS through with a 30 s idle timeout (HAProxy's
                    // common `timeout client 30s`) cut it; kubectl's own
                    // PING every 30 s raced that timer. Traffic, not a
                    // liveness check: its answer may wait behind megabytes
                    // on a slow link (a 20 s wait cut downloads under ~1.5
                    // Mbit/s), and a client that takes nothing is dropped
                    // by the write-stall limit, so it waits an hour.
                    b.keep_alive_interval(Some(h2_ping_every()))
                        .keep_alive_timeout(Duration::from_secs(3600));
                    // What a client may send ahead of the member taking it,
                    // per connection: hyper's 1 MiB across an operator's
                    // 4,096 connections was 4 GiB held for one token.
                    b.initial_stream_window_size(H2_WINDOW)
                        .initial_connection_window_size(H2_WINDOW)
                        // What the hub queues per stream for a client that
                        // gave large windows and stopped reading: hyper's
                        // 400 KiB across 1,000 streams held ~390 MiB per
                        // connection, outside every stream budget (each
                        // answer's stream slot is released once its body
                        // is handed over).
                        .max_send_buf_size(H2_SEND_BUFFER);
                }
                // Frame budgets beneath hyper (`h2guard`): a connection
                // past one is ended, said at info a few times a minute.
                let authed = guard_state.clone();
                let who = guard_state.peer_text.clone();
                let io = super::h2guard::H2Guard::new(
                    tls,
                    move || authed.is_authenticated(),
                    move |flood| {
                        static FLOODS: crate::tunnel::LogBudget =
                            crate::tunnel::LogBudget::new("HTTP/2 connections closed for floods", 10);
                        if FLOODS.admit() {
                            tracing::info!(peer = %who, "gateway connection closed: {}", flood.words());
                        }
                    },
                );
                let conn = b.serve_connection(TokioIo::new(io), svc);
                watch.drive(conn, |c| c.graceful_shutdown()).await;
            } else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    // hyper's head timer also runs while a kept-alive
                    // connection waits for its next request: at 10 s it
                    // closed every idle connection after 10 s, not the
                    // idle timeout's 120 (a POST crossing the close fails:
                    // clients do not send those again). The first head is
                    // held to the pre-auth deadline (10 s from accept).
                    .header_read_timeout(idle_timeout())
                    .max_buf_size(MAX_HEAD.max(8192))
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades();
                watch.drive(conn, |c| c.graceful_shutdown()).await;
            }
        });
    }
}

/// The gateway's socket under TLS. Its first read tells a TLS client (a
/// handshake record starts with 22) from one speaking plain HTTP to the
/// TLS port (a kubeconfig or curl with `http://`): that read is failed
/// before rustls sees it, so that no TLS alert goes out and the client can
/// be told in HTTP (as Go's servers, kube-apiserver among them, do).
struct PlainHttpGuard {
    tcp: tokio::net::TcpStream,
    first: bool,
    plain_http: bool,
    proxy_header: bool,
    /// Since when its writes wait for a client that takes nothing.
    stall: Arc<WriteStall>,
}

/// When a connection's writes started waiting (the socket full: the client
/// reads nothing), for [`WRITE_STALL_LIMIT`]: milliseconds since
/// [`WriteStall::epoch`], 0 while writes go through.
#[derive(Default)]
struct WriteStall(AtomicU64);

impl WriteStall {
    fn epoch() -> std::time::Instant {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(std::time::Instant::now)
    }

    fn note<T>(&self, poll: &std::task::Poll<T>) {
        match poll {
            std::task::Poll::Pending => {
                if self.0.load(Ordering::Relaxed) == 0 {
                    let now = Self::epoch().elapsed().as_millis() as u64;
                    self.0.store(now.max(1), Ordering::Relaxed);
                }
            }
            std::task::Poll::Ready(_) => {
                if self.0.load(Ordering::Relaxed) != 0 {
                    self.0.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// How long writes have waited, if they do.
    fn stalled_for(&self) -> Option<Duration> {
        let since = self.0.load(Ordering::Relaxed);
        (since != 0).then(|| {
            Duration::from_millis(
                (Self::epoch().elapsed().as_millis() as u64).saturating_sub(since),
            )
        })
    }
}

/// How long a connection's writes may wait on a client that reads nothing
/// before the connection is dropped. What the hub queues for it (answers
/// whose streams ended are out of every stream budget, up to
/// [`H2_SEND_BUFFER`] each) is held no longer than this, whatever the
/// client keeps open. Long enough for a pager paused on a follow.
const WRITE_STALL_LIMIT: Duration = Duration::from_secs(60);

impl PlainHttpGuard {
    fn new(tcp: tokio::net::TcpStream, stall: Arc<WriteStall>) -> Self {
        PlainHttpGuard {
            tcp,
            first: true,
            plain_http: false,
            proxy_header: false,
            stall,
        }
    }

    /// Says what the port speaks, then closes (the caller bounds it with
    /// the connection's deadline and eviction).
    async fn answer_plain_http(&mut self) {
        // A Kubernetes Status, whose message kubectl prints (and curl
        // shows as it is).
        let body = crate::daemon::http::status_json(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Client sent an HTTP request to an HTTPS server: the towerctl hub's gateway speaks \
             HTTPS only; use https:// (the kubeconfig contexts from 'towerctl use' do)",
        );
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            body.len() + 1
        );
        crate::daemon::http::answer_and_close(&mut self.tcp, answer.as_bytes()).await;
    }
}

impl tokio::io::AsyncRead for PlainHttpGuard {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        if self.first {
            let got = &buf.filled()[before..];
            if let Some(&b) = got.first() {
                self.first = false;
                // HTTP methods are upper-case tokens; TLS starts with 22.
                self.proxy_header = crate::daemon::proxied::starts_like_proxy_header(got);
                self.plain_http = !self.proxy_header && b.is_ascii_uppercase();
                if self.proxy_header || self.plain_http {
                    return std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a TLS handshake",
                    )));
                }
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for PlainHttpGuard {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.stall.note(&p);
        p
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.stall.note(&p);
        p
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// [`WRITE_STALL_LIMIT`], or `TOWERCTL_GATEWAY_WRITE_STALL` seconds (read
/// at start; tests).
fn write_stall_limit() -> Duration {
    static LIMIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        Duration::from_secs(crate::tunnel::positive_env(
            "TOWERCTL_GATEWAY_WRITE_STALL",
            WRITE_STALL_LIMIT.as_secs() as usize,
        ) as u64)
    })
}

/// Most CONNECT streams at once on one multiplexed connection.
const MUX_MAX_STREAMS: u32 = 4096;

/// Most requests at once on one HTTP/2 client connection (kube-apiserver's
/// default `--http2-max-streams-per-connection`).
const H2_MAX_STREAMS: u32 = 1000;
/// Bytes of answers the hub queues per HTTP/2 stream to kubectl's
/// connections (see where it is set).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// How often the gateway PINGs a kubectl (HTTP/2) connection, and how long
/// it waits for the answer (`TOWERCTL_GATEWAY_PING_INTERVAL` seconds, read
/// at start, for tests).
const H2_PING_EVERY: Duration = Duration::from_secs(20);

fn h2_ping_every() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("TOWERCTL_GATEWAY_PING_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(H2_PING_EVERY, Duration::from_secs)
    })
}
/// Request body bytes an `h2` connection (kubectl's) may send ahead, for
/// all its streams: request bodies are small (objects of at most 1.5 MB,
/// as etcd stores them), and the window comes back as the member takes
/// them.
const H2_WINDOW: u32 = 256 * 1024;

/// What watches over one client connection while hyper serves it.
struct Watch {
    conn_state: Arc<Conn>,
    evicted: CancellationToken,
    deadline: tokio::time::Instant,
    cancel: CancellationToken,
    peer: SocketAddr,
    stall: Arc<WriteStall>,
}

impl Watch {
    /// Serves `conn` until it ends, is evicted before authenticating,
    /// misses the pre-auth deadline, or is idle for [`IDLE_TIMEOUT`]
    /// (then closed gracefully, and dropped if still open [`CLOSE_GRACE`]
    /// later).
    async fn drive<F, E>(self, conn: F, shutdown: impl Fn(std::pin::Pin<&mut F>))
    where
        F: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let Watch {
            conn_state,
            evicted,
            deadline,
            cancel,
            peer,
            stall,
        } = self;
        tokio::pin!(conn);
        let mut check = tokio::time::interval(Duration::from_secs(1));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = false;
        // When it was asked to close for its operator's newer ones.
        let mut closed_at: Option<tokio::time::Instant> = None;
        let closer = conn_state.closer.clone();
        // Polled only when they fire, not at every wake of the connection
        // (every request's reads and writes; `tunnel::quiet`).
        let (mut evicted, mut cancel, mut closer) = (
            Quiet::new(evicted.cancelled()),
            Quiet::new(cancel.cancelled()),
            Quiet::new(closer.cancelled()),
        );
        loop {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r { tracing::debug!(%peer, "gateway connection: {e}") }
                    break;
                }
                _ = &mut evicted, if !conn_state.is_authenticated() => break,
                _ = check.tick() => {
                    if !conn_state.is_authenticated() && tokio::time::Instant::now() >= deadline {
                        tracing::debug!(%peer, "gateway connection closed: no authenticated request within {PREAUTH_DEADLINE:?}");
                        break;
                    }
                    if stall.stalled_for().is_some_and(|d| d >= write_stall_limit()) {
                        tracing::debug!(%peer, "gateway connection dropped: its client took nothing of what was written for {:?}", write_stall_limit());
                        break;
                    }
                    let idle = conn_state.idle_for();
                    if !closing && idle.is_some_and(|d| d >= idle_timeout()) {
                        closing = true;
                        shutdown(conn.as_mut());
                    }
                    // Still idle a grace after the graceful close: dropped
                    // (an HTTP/2 client that ignores the closing PING).
                    if closing && idle.is_some_and(|d| d >= idle_timeout() + CLOSE_GRACE) {
                        tracing::debug!(%peer, "gateway connection dropped: idle, and not closed within {CLOSE_GRACE:?} of being asked to");
                        break;
                    }
                }
                _ = &mut closer, if closed_at.is_none() => {
                    closed_at = Some(tokio::time::Instant::now());
                    if !closing {
                        closing = true;
                        shutdown(conn.as_mut());
                    }
                }
                _ = &mut cancel => break,
            }
            // Dropped only while still idle: a request that came just
            // before the close (a watch, an exec) runs to its end.
            if closed_at.is_some_and(|t| t.elapsed() >= CLOSE_GRACE)
                && conn_state.idle_for().is_some()
            {
                tracing::debug!(%peer, "gateway connection dropped: asked to close (its operator's connections over the limit, or too many requests without a valid token)");
                break;
            }
        }
    }
}

/// The bearer token of a request: `Authorization`, or for CONNECT through
/// the gateway as a proxy, `Proxy-Authorization`, or for a WebSocket from
/// a client that cannot set headers (a browser) a
/// `base64url.bearer.authorization.k8s.io.TOKEN` subprotocol, as
/// kube-apiserver reads it (removed before the request goes on:
/// `http::strip_identity`).
pub(super) fn bearer(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .or_else(|| headers.get(header::PROXY_AUTHORIZATION))
    {
        let (scheme, token) = v.to_str().ok()?.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().into());
    }
    use base64::Engine;
    let encoded = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix(crate::daemon::http::WS_BEARER_PROTOCOL)
        })?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()?;
    String::from_utf8(token).ok().map(Into::into)
}

/// Longest wait for an agent to accept a stream for an API request (it
/// does so at once; raw streams, which it dials first, have 20 s too).
const OPEN_DEADLINE: Duration = Duration::from_secs(20);

/// Why a channel's open failed: the answer to give the client, kept by
/// the open (which runs inside the connection's I/O, see [`open_channel`])
/// for the request that found its connection failed.
#[derive(Clone, Default)]
struct OpenFailed(Arc<std::sync::Mutex<Option<Response<Body>>>>);

impl OpenFailed {
    fn set(&self, resp: Response<Body>) -> std::io::Error {
        let msg = "the tunnel stream did not open";
        if let Ok(mut r) = self.0.lock() {
            r.get_or_insert(resp);
        }
        std::io::Error::other(msg)
    }

    /// The answer, when the open is what failed.
    fn take(&self) -> Option<Response<Body>> {
        self.0.lock().ok()?.take()
    }
}

/// Opens a new channel to the agent and an HTTP/1.1 connection over it.
/// With `in_open`, to an agent that takes them
/// ([`LiveSession::takes_request_in_open`]), the channel opens when hyper
/// first flushes, with what hyper wrote by then (the request's head, the
/// start of its body) in the open: the request reaches the member one
/// round trip sooner; a failed open then fails the request, whose answer
/// is in the [`OpenFailed`]. Only for a read (`GET`, `HEAD`, `OPTIONS`, no
/// upgrade): a request in the open has left the hub for good, and the
/// agent runs it whenever it reads the open, also after the hub gave up
/// waiting (504), the client left or its access was withdrawn. Any other
/// request is handed to hyper once the channel is confirmed, as before:
/// not at all when its caller has gone meanwhile.
async fn open_channel(
    hub: &Hub,
    session: &Arc<LiveSession>,
    (name, operator): (&str, &str),
    peer: SocketAddr,
    in_open: bool,
) -> Result<(Sender, OpenFailed), Response<Body>> {
    let window = session.window(operator, crate::tunnel::flow::API_WINDOW);
    let failed = OpenFailed::default();
    let stream = if in_open && session.takes_request_in_open {
        let (session, name, failed) = (session.clone(), name.to_string(), failed.clone());
        crate::tunnel::first::OpenWithFirst::new(
            crate::daemon::wire::EARLY_MAX,
            move |first: Vec<u8>| async move {
                let originator = crate::daemon::wire::FirstRequest::encode(&first);
                opened(
                    &session,
                    &name,
                    (originator, peer.port()),
                    window,
                    first.len(),
                )
                .await
                .map_err(|resp| failed.set(resp))
            },
        )
    } else {
        // Opened, and confirmed, before the request is handed to hyper:
        // once hyper has taken a request it writes it when it can, also
        // after its caller went away (a client gone, a deadline, access
        // withdrawn), and a write then ran at the member.
        let origin = (peer.ip().to_string(), peer.port());
        crate::tunnel::first::OpenWithFirst::opened(opened(session, name, origin, window, 0).await?)
    };
    // An answer of more than hyper's 100 header lines (one `Warning` per
    // unknown field of a write under `fieldValidation=Warn`) is the
    // member's to send.
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_headers(crate::daemon::http::MAX_HEADER_LINES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("cluster '{name}': {e}"),
            )
        })?;
    hub.tasks.spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("tunnel stream: {e}");
        }
    });
    Ok((sender, failed))
}

/// [`open_stream`], counted in the member's figures (with `sent`, the
/// bytes its open carried) and holding its window for as long as the
/// channel lives, past an upgrade too.
async fn opened(
    session: &Arc<LiveSession>,
    name: &str,
    (originator, originator_port): (String, u16),
    window: crate::tunnel::flow::WindowPermit,
    sent: usize,
) -> Result<
    crate::tunnel::counted::Holding<
        crate::tunnel::counted::Counted<crate::tunnel::flow::FlowStream>,
        super::OpenChannel,
    >,
    Response<Body>,
> {
    let stream = open_stream(session, name, originator, originator_port, window.window).await?;
    let counters = &session.counters;
    counters.bytes_out.fetch_add(sent as u64, Ordering::Relaxed);
    let stream = crate::tunnel::counted::Counted::new(
        stream,
        counters.bytes_in.clone(),
        counters.bytes_out.clone(),
    );
    Ok(crate::tunnel::counted::Holding::new(
        stream,
        session.channel_opened(window),
    ))
}

/// Opens an API channel to the agent of `session`, bounded; `Err` is the
/// answer to give the client.
async fn open_stream(
    session: &LiveSession,
    name: &str,
    originator: String,
    originator_port: u16,
    window: u64,
) -> Result<crate::tunnel::flow::FlowStream, Response<Body>> {
    // Its own task, bounded: an agent that confirms nothing (wedged, or a
    // key holder answering only pings) held every request to its member,
    // and the operator's stream slots, for as long as it liked; a
    // confirmation after the limit still finds its waiter, which closes
    // the channel (see `connect`).
    let open = tokio::spawn({
        let handle = session.handle.clone();
        // Given up after a while all the same: against an agent that
        // answers nothing, every request would leave its task waiting.
        async move {
            match tokio::time::timeout(
                OPEN_DEADLINE * 15,
                server::open_as(
                    &handle,
                    TARGET_APISERVER,
                    443,
                    &originator,
                    u32::from(originator_port),
                    window,
                    false,
                ),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(russh::Error::Disconnect),
            }
        }
    });
    let failed = |e: &dyn std::fmt::Display| {
        crate::daemon::http::retry_after(status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &format!("cluster '{name}': the tunnel to its agent failed to open a stream ({e}); the agent may be reconnecting, retry in a few seconds")), 1)
    };
    match tokio::time::timeout(OPEN_DEADLINE, open).await {
        Ok(Ok(Ok(s))) => Ok(s),
        Ok(Ok(Err(e))) => Err(failed(&e)),
        Ok(Err(e)) => Err(failed(&e)),
        Err(_) => Err(status_response(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            &format!(
                "cluster '{name}': its agent did not accept a stream within {}s; it may be overloaded or stuck, see 'towerctl status'",
                OPEN_DEADLINE.as_secs()
            ),
        )),
    }
}

/// towerctl's own API on the gateway, for `towerctl login` and `use` on
/// operator machines. Everything but the CA needs an operator token.
const API: &str = "/towerctl/v1/";

/// Whether `req` is client-go's discovery (`GET …/api`, `…/apis` asking
/// for aggregated discovery, as kubectl does): it reads an error's words
/// only from a `text/*` answer, and showed a refusal of the agent or the
/// member there (a 502) as 'an error on the server ("unknown")', the
/// first request of a kubectl without a discovery cache. Only there: a
/// client asking for JSON (`kubectl get --raw /api`, curl) reads the
/// Status, and client-go shows fixed words for some codes (404, 503)
/// from a text answer.
fn is_discovery(req: &Request<Incoming>) -> bool {
    // The path first (every request passes here): `/api`, or
    // `/clusters/NAME/api`, not an object named `api`.
    let path = req.uri().path().trim_end_matches('/');
    let member_path = match path.strip_prefix("/clusters/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, p)| p),
        None => path.strip_prefix('/').unwrap_or(path),
    };
    req.method() == hyper::Method::GET
        && (member_path == "api" || member_path == "apis")
        && req
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("g=apidiscovery.k8s.io"))
}

async fn handle(hub: Arc<Hub>, conn: &Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
    let (slot, peer, sni) = (&conn.slot, conn.peer, conn.sni.as_deref());
    // The head as the limit means it, however it came: hyper bounds its
    // read buffer, which took one header of 100 KB (HTTP/2's header list
    // limit is the same size, counted its own way).
    let head = req.uri().path().len()
        + req.uri().query().map_or(0, |q| q.len() + 1)
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > MAX_HEAD {
        return status_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            &format!("the request's line and headers are {head} bytes; the towerctl gateway takes at most {MAX_HEAD}"),
        );
    }
    // `GET http://host/… HTTP/1.1` on the TLS port is a client using the
    // gateway as a forward proxy for plain HTTP, which it is only for
    // CONNECT: said so, before its `Authorization` (the application's own,
    // for that host) is read as an operator token and refused as one.
    if req.version() <= hyper::Version::HTTP_11
        && req.method() != hyper::Method::CONNECT
        && req.uri().scheme_str() == Some("http")
    {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the towerctl gateway is a proxy for CONNECT only: a plain request through it (GET http://…) is not carried; tunnel it (curl -p / --proxytunnel, or an https:// URL through HTTPS_PROXY), with the operator token in Proxy-Authorization",
        );
    }
    // `%73ecrets` is `secrets` to the API server: audited, routed and
    // forwarded as such.
    let path = crate::daemon::route::decode_unreserved(req.uri().path());
    // What anyone may ask (health checks, the CA): a few on a connection
    // that has not authenticated, then it is closed (one connection asked
    // for the CA ~1,600 times a second for its whole pre-auth deadline).
    let public = |conn: &Conn| {
        if !conn.is_authenticated() && conn.proxy.is_none() {
            let n = conn
                .public
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n >= MAX_PUBLIC_PER_CONNECTION {
                conn.closer.cancel();
            }
        }
    };
    // Unauthenticated, as kube-apiserver serves them: for load balancers'
    // HTTPS checks.
    if sni.is_none() && matches!(path.as_str(), "/healthz" | "/readyz" | "/livez") {
        // Not ready while it refuses operators (a registry it cannot
        // confirm): a load balancer sends them to another hub.
        let mut resp = if path == "/readyz" && hub.draining() {
            let mut resp = Response::new(full(Bytes::from_static(
                b"not ready: the hub is stopping (--shutdown-delay)",
            )));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp
        } else if path == "/readyz" && hub.stale_refusal().is_some() {
            let mut resp = Response::new(full(Bytes::from_static(
                b"not ready: the shared registry is unconfirmed (--store-max-stale)",
            )));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp
        } else {
            Response::new(full(Bytes::from_static(b"ok")))
        };
        // With several hubs: for a cut-off hub deciding whether this one
        // reaches etcd (`peer::HandOff`).
        if path == "/readyz" && hub.cluster.get().is_some() {
            resp.headers_mut().insert(
                super::peer::REGISTRY_AGE_HEADER,
                HeaderValue::from(hub.etcd_age().as_millis() as u64),
            );
        }
        public(conn);
        return resp;
    }
    if path == "/towerctl/v1/ca.crt" {
        // Public: the client checks it against the hash it was given.
        public(conn);
        return Response::new(full(Bytes::from(hub.ca_pem.clone())));
    }
    // Refused before any routing: a client without a token learns nothing
    // about which members exist. Recorded (rate-limited together).
    let unauthorized = |why: &str| {
        let refused = conn
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // In a row (a valid token resets it), and never a trusted proxy's
        // connection, which carries many clients' requests: one client's
        // bad tokens closed everyone's.
        if refused >= MAX_REFUSED_PER_CONNECTION && conn.proxy.is_none() {
            // Closed gracefully once this answer is out (then dropped).
            conn.closer.cancel();
        }
        hub.auditor.record(Record {
            time: crate::daemon::fmt::fmt_now(),
            operator: crate::daemon::audit::UNAUTHENTICATED.into(),
            verb: "unauthenticated".into(),
            method: req.method().to_string(),
            path: req.uri().to_string(),
            status: 401,
            peer: Some(conn.client_text(&req)),
            ..Record::default()
        });
        status_response(StatusCode::UNAUTHORIZED, "Unauthorized", why)
    };
    let Some(token) = bearer(req.headers()) else {
        return unauthorized("the towerctl gateway needs an operator bearer token: run 'towerctl use CLUSTER' to write a kubeconfig context that provides it");
    };
    let Some(operator) = hub.operator_memo(&conn.known, &token) else {
        return unauthorized("the operator token was not accepted by the towerctl gateway (unknown or revoked): on the hub's machine, run 'towerctl use CLUSTER' again; elsewhere, ask the hub's admin for a new login ('towerctl operator add NAME' on the hub) and run the 'towerctl login' command it prints");
    };
    // Held to the operator's budget first: the refusals below are
    // recorded, and a token's connections past their limit (refused on
    // each of a multiplexed connection's streams) wrote records past it,
    // enough to rotate the audit history away.
    if operator.name != super::LOCAL_ADMIN {
        if let Err(msg) = hub.auditor.admit_request(&operator.name) {
            // A client that goes on regardless of Retry-After: its
            // connection closed after a run of them (each a task and an
            // answer on the thread that carries the tunnels: one
            // connection's 7,700 a second slowed every other operator's
            // answers a hundredfold). Never a trusted proxy's.
            let throttled = conn
                .throttled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if throttled >= MAX_THROTTLED_PER_CONNECTION && conn.proxy.is_none() {
                conn.closer.cancel();
            }
            let mut resp = status_response(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", &msg);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
    }
    conn.refused.store(0, std::sync::atomic::Ordering::Relaxed);
    conn.throttled
        .store(0, std::sync::atomic::Ordering::Relaxed);
    if let Err(msg) = conn.authenticated(&hub, &operator.name) {
        hub.auditor.record(Record {
            time: crate::daemon::fmt::fmt_now(),
            operator: operator.name.clone(),
            method: req.method().to_string(),
            path: path.clone(),
            status: 429,
            error: Some(msg.clone()),
            peer: Some(conn.client_text(&req)),
            ..Record::default()
        });
        return status_response(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", &msg);
    }
    if let Some(msg) = hub.stale_refusal_for(&operator) {
        let mut resp = status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    if req.method() == http::Method::CONNECT {
        // On HTTP/1.1 (one stream per connection), or on port-forward's
        // own connections, counted under their own limit: on an `h2`
        // connection 1,000 of them at once escaped that limit.
        if req.version() == http::Version::HTTP_2 && !conn.mux {
            return status_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "CONNECT is served over HTTP/1.1 here (or by 'towerctl port-forward'); not over HTTP/2",
            );
        }
        let shown = conn.client_text(&req);
        return connect(hub, req, (peer, shown), &operator, conn.active.clone()).await;
    }
    if let Some(what) = path.strip_prefix(API) {
        let resp = match what {
            "whoami" => {
                json_response(serde_json::json!({"name": operator.name, "groups": operator.groups}))
            }
            "clusters" if operator.name == super::LOCAL_ADMIN => {
                json_response(serde_json::to_value(hub.cluster_statuses()).unwrap_or_default())
            }
            // Only the members this operator may reach, and only what it
            // needs of them.
            "clusters" => json_response(serde_json::Value::Array(
                hub.cluster_statuses()
                    .iter()
                    .filter(|c| hub.decide_labeled(&operator, &c.name, &c.labels).allowed)
                    .map(|c| c.operator_view())
                    .collect(),
            )),
            _ => status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "no such towerctl API '{}'",
                    crate::tunnel::printable(&path, 200)
                ),
            ),
        };
        hub.auditor.record(Record {
            time: crate::daemon::fmt::fmt_now(),
            operator: operator.name.clone(),
            verb: "towerctl".into(),
            method: req.method().to_string(),
            path: path.clone(),
            status: resp.status().as_u16(),
            ..Record::default()
        });
        return resp;
    }
    let (name, upstream_path) = match crate::daemon::route::pick(sni, &path) {
        Ok(r) => r,
        Err((code, reason, msg)) => return status_response(code, reason, &msg),
    };
    if let Some(msg) = crate::daemon::route::misdirected(&req, &name) {
        return status_response(StatusCode::MISDIRECTED_REQUEST, "MisdirectedRequest", &msg);
    }
    let start = std::time::Instant::now();
    let record = Record {
        time: crate::daemon::fmt::fmt_now(),
        operator: operator.name.clone(),
        cluster: name.clone(),
        verb: crate::daemon::audit::verb(req.method().as_str(), &upstream_path, req.uri().query())
            .to_string(),
        method: req.method().to_string(),
        path: match req.uri().query() {
            Some(q) => format!("{upstream_path}?{q}"),
            None => upstream_path.clone(),
        },
        peer: Some(conn.client_text(&req)),
        ..Record::default()
    };
    // Recorded whole, or refused: see `audit::MAX_PATH`.
    if record.path.len() > crate::daemon::audit::MAX_PATH {
        let msg = format!(
            "the request's path and query are {} bytes long, more than the {} this hub passes to a member; shorten the query (fewer selector values, fewer parameters)",
            record.path.len(),
            crate::daemon::audit::MAX_PATH
        );
        hub.auditor.record(Record {
            status: StatusCode::URI_TOO_LONG.as_u16(),
            error: Some(msg.clone()),
            ..record
        });
        return status_response(StatusCode::URI_TOO_LONG, "RequestURITooLong", &msg);
    }
    // Access rules: a member the operator may not reach answers exactly
    // like one that does not exist, so names do not leak.
    let (decision, guard) = hub.admit(&operator, &name);
    let record = Record {
        rule: Some(decision.why.clone()),
        ..record
    };
    let Some(guard) = guard else {
        let (code, reason, msg) = refused_member(&hub, &operator, &name, &decision.why);
        hub.auditor.record(Record {
            status: code.as_u16(),
            ..record
        });
        let resp = status_response(code, reason, &msg);
        if code == StatusCode::SERVICE_UNAVAILABLE {
            return crate::daemon::http::retry_after(resp, 2);
        }
        return resp;
    };
    // `kubectl --as` (and Helm's, Flux's, Argo CD's impersonation): read
    // and checked here, carried to the agent under the hub's own names,
    // and decided there (the member's RBAC, for the operator's identity
    // on a member that requires impersonation; the agent's own rights
    // otherwise). Never dropped: dropped, `--as readonly delete …` would
    // run as the operator itself.
    let client_as = if req
        .headers()
        .keys()
        .any(|k| k.as_str().starts_with(CLIENT_PREFIX))
    {
        match ClientAs::read(req.headers(), CLIENT_PREFIX).and_then(|a| {
            // A hop would drop what `Connection` names (another hub's
            // forward does): the request would run as the operator.
            match crate::daemon::http::connection_names(req.headers(), CLIENT_PREFIX) {
                Some(h) => Err(format!("'Connection' names '{h}', which would be removed on the way to the member; send it as an end-to-end header")),
                None => Ok(a),
            }
        }) {
            Ok(a) => a,
            Err(why) => {
                let msg = format!("impersonation refused: {why}");
                hub.auditor.record(Record {
                    status: 400,
                    error: Some(msg.clone()),
                    ..record
                });
                drop(guard);
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", &msg);
            }
        }
    } else {
        None
    };
    let record = Record {
        acting_as: client_as.as_ref().map(ClientAs::record),
        ..record
    };
    if let Some(msg) = hub.over_stream_limit(&operator, &name) {
        hub.auditor.record(Record {
            status: 503,
            error: Some(msg.clone()),
            ..record
        });
        drop(guard);
        // No Retry-After: the operator's own streams hold the limit, for
        // as long as they are open; clients would retry for 10 s in vain.
        return status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg);
    }
    // Long-lived streams are recorded when they open and when they close;
    // a request is recorded even if its client goes away before the member
    // answers (`Pending`).
    let upgrade = is_upgrade(req.headers());
    // Watches, follows (`logs -f`), proxies and upgrades (exec): as long
    // as the hub's answer deadline takes them.
    let long = record.verb == "watch"
        || crate::daemon::http::long_running(&upstream_path, req.uri().query(), upgrade);
    if long {
        hub.auditor.record_start(&record);
    }
    let (end, pending) = if upgrade {
        (
            Some(EndRecord::new(record, start, hub.auditor.clone())),
            None,
        )
    } else {
        let record = Record {
            phase: long.then(|| "end".to_string()),
            ..record
        };
        let pending = crate::daemon::audit::Pending::new(record, start, hub.auditor.clone());
        (None, Some(pending))
    };
    let resp = proxy(
        &hub,
        slot,
        req,
        (peer, &conn.forwarded),
        &operator,
        (name, upstream_path),
        client_as,
        guard,
        end.clone(),
    )
    .await;
    let Some(pending) = pending else {
        if let Some(end) = end {
            end.set_status(resp.status().as_u16());
        }
        return resp;
    };
    let (parts, body) = resp.into_parts();
    let record = Record {
        status: parts.status.as_u16(),
        ..pending.take()
    };
    Response::from_parts(
        parts,
        Audited::new(body, record, start, hub.auditor.clone()).boxed_unsync(),
    )
}

/// Test hook (`TOWERCTL_TEST_HUB_WITHOUT=towerctl-early`): the hub ignores
/// the first bytes sent with a CONNECT, as an older one does. Read once,
/// not on every CONNECT.
fn ignores_early_for_tests() -> bool {
    static IGNORES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IGNORES.get_or_init(|| {
        crate::tunnel::left_out_for_tests(
            "TOWERCTL_TEST_HUB_WITHOUT",
            crate::daemon::wire::EARLY_HEADER,
        )
    })
}

/// Why a request whose URL or CONNECT target carries a valid operator
/// token is refused. Whose it is, is not said.
const TOKEN_IN_URL: &str = "the request's URL (or CONNECT target) carries a towerctl operator token, which the towerctl gateway does not send on to a member: send tokens in the Authorization header only, and take it out of the URL (a label, an argument or a parameter that holds it)";

/// Whether `target` (a request's path and query, a CONNECT authority)
/// carries a valid operator token, anyone's, however encoded
/// (`audit::token_candidates`): the member, less trusted than the hub,
/// saw `?access_token=top_…` a client added. Refused in words, not
/// altered (see there for the two versions that altered requests).
fn carries_a_token(hub: &Hub, target: &str) -> bool {
    crate::daemon::audit::token_candidates(target)
        .iter()
        .any(|t| hub.operator(t).is_some())
}

/// HTTP CONNECT: a raw byte stream to a target in a member, named
/// `NAME.NS.svc.CLUSTER:PORT` (or `.pod.`, `.deploy.`, or `HOST.CLUSTER`),
/// subject to the agent's dial policy.
async fn connect(
    hub: Arc<Hub>,
    req: Request<Incoming>,
    (peer, shown): (SocketAddr, String),
    operator: &Operator,
    active: Arc<()>,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return text_response(StatusCode::BAD_REQUEST, "CONNECT needs HOST:PORT");
    };
    // Nor in a CONNECT target (a host named with one reached the member's
    // dial policy, its log and its resolver).
    if carries_a_token(&hub, authority.as_str()) {
        return text_response(StatusCode::BAD_REQUEST, TOKEN_IN_URL);
    }
    let (cluster, target, port) = match connect_target(&authority) {
        Ok(t) => t,
        Err(msg) => return text_response(StatusCode::BAD_REQUEST, &msg),
    };
    // What the client has already sent, with its CONNECT (`towerctl
    // port-forward`): into the channel's open.
    let mut req = req;
    let given = match req.headers().get(crate::daemon::wire::EARLY_HEADER) {
        None => None,
        // Test hook: a hub that ignores the header, as an older one does
        // (nor does it carry it to the hub holding the member).
        Some(_) if ignores_early_for_tests() => {
            req.headers_mut().remove(crate::daemon::wire::EARLY_HEADER);
            None
        }
        Some(v) => match crate::daemon::wire::decode_early(v.as_bytes()) {
            Ok(bytes) if bytes.is_empty() => None,
            Ok(bytes) => Some(bytes),
            Err(msg) => return text_response(StatusCode::BAD_REQUEST, &msg),
        },
    };
    let given_len = given.as_ref().map_or(0, |b| b.len() as u64);
    let early = given.map_or(Early::None, Early::Given);
    let raw = match open_raw(&hub, operator, &cluster, &target, port, peer, shown, early).await {
        Ok(raw) => raw,
        Err(RawRefusal::Answer(code, msg)) => return text_response(code, &msg),
        Err(RawRefusal::Elsewhere(held)) => {
            // Held by another hub: carried there.
            let held =
                match super::peer::forward_connect(&hub, &cluster, req, *held, active, given_len)
                    .await
                {
                    Ok(resp) => return resp,
                    Err(held) => held,
                };
            let (code, _, msg) = no_session(&hub, &cluster);
            held.finish(Some(code));
            return text_response(code, &msg);
        }
    };
    let taken = raw.early;
    hub.tasks.spawn(async move {
        // A multiplexed connection is not idle while a stream is spliced.
        let _active = active;
        match hyper::upgrade::on(req).await {
            Ok(up) => raw.splice(TokioIo::new(up), CancellationToken::new()).await,
            Err(e) => {
                tracing::debug!("CONNECT upgrade failed: {e}");
                raw.abandon();
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    if taken > 0 {
        resp.headers_mut().insert(
            crate::daemon::wire::EARLY_TAKEN_HEADER,
            http::HeaderValue::from(taken),
        );
    }
    resp
}

/// The member, target and port a CONNECT authority names
/// (`NAME.NS.svc.CLUSTER:PORT`, …), or why it names none. Shared by the
/// gateway's CONNECT and the hub's local forwards.
pub(super) fn connect_target(
    authority: &http::uri::Authority,
) -> Result<(String, Target, u16), String> {
    let Some(port) = authority.port_u16() else {
        return Err(format!("CONNECT '{authority}' has no port"));
    };
    let Some((cluster, target)) = Target::from_connect_host(authority.host()) else {
        return Err(format!("cannot read a target from '{authority}': use NAME.NAMESPACE.svc.CLUSTER:PORT, NAME.NAMESPACE.pod.CLUSTER:PORT, NAME.NAMESPACE.deploy.CLUSTER:PORT (sts, ds, job, rc, replicaset), HOST.CLUSTER:PORT, or for an IPv6 address ADDR.ip6.CLUSTER:PORT with '-' for ':' (fd00--5.ip6.CLUSTER:443)"));
    };
    Ok((cluster, target, port))
}

/// Why a raw stream did not open.
pub(super) enum RawRefusal {
    /// The answer for the client: a status and a message naming the cause.
    Answer(StatusCode, String),
    /// The member's session is on another hub (or on none): what this hub
    /// holds for the stream while it is carried there.
    Elsewhere(Box<Carried>),
}

/// A raw stream's hold on this hub: its stream registration (revoking
/// access cuts it) and its audit record, written when it ends. Held while
/// the stream is carried to this hub's agent ([`RawStream`]) or to the hub
/// that holds its member (which registers and audits it too).
pub(super) struct Carried {
    record: Record,
    guard: crate::daemon::streams::StreamGuard,
    start: std::time::Instant,
    auditor: crate::daemon::audit::Auditor,
}

impl Carried {
    /// The stream's registration.
    pub(super) fn guard_mut(&mut self) -> &mut crate::daemon::streams::StreamGuard {
        &mut self.guard
    }

    /// The stream opened: its start is recorded, its end will be.
    pub(super) fn opened(&mut self) {
        self.auditor.record_start(&self.record);
        self.record.phase = Some("end".into());
    }

    /// Counts `n` bytes of the client's that reached the target ahead of
    /// the stream (with the CONNECT carried to the hub holding the member).
    pub(super) fn sent_ahead(&mut self, n: u64) {
        self.record.bytes += n;
    }

    /// Carries bytes between `client` and `upstream` until either side
    /// ends, the operator loses access or `stop`; then audits the end.
    pub(super) async fn splice<A, B>(self, client: A, mut upstream: B, stop: CancellationToken)
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut client, counts) = counted(client);
        let copy = async {
            let _ = crate::tunnel::splice(&mut client, &mut upstream).await;
        };
        self.carry(copy, counts, stop).await;
    }

    /// Runs `copy` until it ends, the operator loses access or `stop`;
    /// then audits the end with the bytes `counts` saw.
    async fn carry(
        mut self,
        copy: impl std::future::Future<Output = ()>,
        (rd, wr): (Arc<AtomicU64>, Arc<AtomicU64>),
        stop: CancellationToken,
    ) {
        // The two ends are polled only when one of them fires, not at
        // every read and write the stream carries (`tunnel::quiet`).
        let cut = &self.guard.cut;
        let ended = Quiet::new(async move {
            tokio::select! {
                _ = cut.cancelled() => true,
                _ = stop.cancelled() => false,
            }
        });
        tokio::select! {
            _ = copy => {}
            revoked = ended => if revoked {
                tracing::info!(cluster = %self.record.cluster, operator = %self.record.operator, "a raw stream was cut: access revoked");
            }
        }
        // Added to what went ahead of the stream (`sent_ahead`).
        self.record.bytes += rd.load(Ordering::Relaxed) + wr.load(Ordering::Relaxed);
        self.finish(None);
    }

    /// Audits a stream that ended (or never opened: `status`).
    pub(super) fn finish(mut self, status: Option<StatusCode>) {
        if let Some(s) = status {
            self.record.status = s.as_u16();
        }
        self.record.duration_ms = self.start.elapsed().as_millis() as u64;
        self.auditor.record(self.record);
    }
}

/// `client` counting its bytes each way: a connection that ends with an
/// error (a reset, as load tools do) still carried its bytes.
#[allow(clippy::type_complexity)]
fn counted<C>(
    client: C,
) -> (
    crate::tunnel::counted::Counted<C>,
    (Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let (rd, wr) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = crate::tunnel::counted::Counted::new(client, rd.clone(), wr.clone());
    (client, (rd, wr))
}

/// A raw stream to a target in a member: authorized for its operator,
/// opened, and answered by the agent; its start is in the audit log.
pub(super) struct RawStream {
    stream: crate::tunnel::counted::Counted<crate::tunnel::flow::FlowStream>,
    held: Carried,
    _counted: super::OpenChannel,
    /// Bytes of the client's sent ahead of the agent's answer.
    early: u64,
}

use crate::daemon::wire::EARLY_MAX;

/// Where [`open_raw`] finds what the client has already sent.
pub(super) enum Early<'a> {
    /// The client's own socket (a forward the hub serves): read from it
    /// without waiting.
    From(&'a tokio::net::TcpStream),
    /// The bytes that came with its CONNECT ([`wire::EARLY_HEADER`]).
    ///
    /// [`wire::EARLY_HEADER`]: crate::daemon::wire::EARLY_HEADER
    Given(Vec<u8>),
    /// None (a CONNECT without them).
    None,
}

/// Where a client's first bytes go on a raw stream ([`open_raw`]).
enum First {
    /// In the channel's open: this many.
    InOpen(u64),
    /// Taken from the client, on the stream after the agent's answer.
    OnStream(Vec<u8>),
    /// Not read yet: read and sent on the stream after the answer.
    Unread,
}

/// What `client` has already sent, up to [`EARLY_MAX`], without waiting
/// for more: nothing when it has sent nothing yet, has ended, or failed
/// (the splice meets those again).
fn take_early(client: &tokio::net::TcpStream) -> Vec<u8> {
    crate::tunnel::sent_so_far(client, EARLY_MAX)
}

/// Sends on `stream` what the client has already sent ([`take_early`]), so
/// that the agent has it when its dial completes instead of a round trip
/// later: for agents whose opens do not carry it ([`wire::RawOpen`]), or an
/// open it would have made too long. The agent reads nothing from the
/// stream before its dial is allowed and done; on a refusal the bytes are
/// dropped with the stream. Returns how many were sent, or `None` if they
/// could not be (the stream must not go on without them).
///
/// [`wire::RawOpen`]: crate::daemon::wire::RawOpen
async fn send_early(
    first: &[u8],
    stream: &mut crate::tunnel::counted::Counted<crate::tunnel::flow::FlowStream>,
) -> Option<u64> {
    use tokio::io::AsyncWriteExt;
    if first.is_empty() {
        return Some(0);
    }
    // A fresh stream's window takes it at once; bounded all the same, as
    // the answer is.
    match tokio::time::timeout(Duration::from_secs(20), stream.write_all(first)).await {
        Ok(Ok(())) => Some(first.len() as u64),
        _ => None,
    }
}

/// A raw stream whose agent gave no answer to its dial in time: audited,
/// and a 504.
fn agent_silent(
    hub: &Hub,
    pending: crate::daemon::audit::Pending,
    cluster: &str,
    target: &Target,
) -> RawRefusal {
    hub.dial_failures.add(DialFailure::AgentError);
    let msg = format!(
        "cluster '{cluster}': the agent did not answer for {}",
        target.describe()
    );
    pending.refuse(504, &msg);
    RawRefusal::Answer(StatusCode::GATEWAY_TIMEOUT, msg)
}

/// A raw stream cut before it opened: audited, and refused like a request
/// ([`cut_answer`]: 503 naming the mode change when the member now
/// requires impersonation its agent does not do, else [`revoked`]'s 403).
fn raw_revoked(hub: &Hub, mut record: Record, cluster: &str, session: &LiveSession) -> RawRefusal {
    if let Err(msg) = impersonation_agrees(session) {
        record.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
        record.error = Some("the member's identity mode changed before the stream opened".into());
        hub.auditor.record(record);
        return RawRefusal::Answer(StatusCode::SERVICE_UNAVAILABLE, msg);
    }
    record.status = StatusCode::FORBIDDEN.as_u16();
    record.error = Some("access withdrawn before the stream opened".into());
    hub.auditor.record(record);
    RawRefusal::Answer(
        StatusCode::FORBIDDEN,
        format!("access to cluster '{cluster}' was withdrawn while the stream was opening"),
    )
}

/// Opens a raw stream for `operator` to `target:port` in `cluster`: the
/// access rules first (a member the operator may not reach answers like an
/// unknown one), then the channel and the agent's answer to its dial. Shared
/// by the gateway's CONNECT and the hub's local forwards. What the client
/// has already sent ([`Early`]: read from a local forward's socket, or
/// given with a CONNECT) goes ahead of the answer, in the channel's open
/// or on the stream ([`send_early`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn open_raw(
    hub: &Hub,
    operator: &Operator,
    cluster: &str,
    target: &Target,
    port: u16,
    peer: SocketAddr,
    shown: String,
    early: Early<'_>,
) -> Result<RawStream, RawRefusal> {
    // What the agent accepts (names of at most 253 characters); said here
    // rather than as an agent refusing the stream.
    let address = target.channel_address();
    if Target::from_channel_address(&address).is_none() {
        return Err(RawRefusal::Answer(
            StatusCode::BAD_REQUEST,
            format!(
                "cannot open a stream to '{}': a namespace and a Service's name are one DNS label (lower-case letters, digits and '-', at most 63 characters), a pod's or workload's name lower-case letters, digits, '-' and '.' (at most 253 characters), a host name letters, digits, '-', '.' and '_' (at most 253 characters)",
                crate::tunnel::escape_for_log(&target.describe(), 80)
            ),
        ));
    }
    // Registered before the decision: see `Hub::admit`.
    let (decision, guard) = hub.admit(operator, cluster);
    let mut record = Record {
        time: crate::daemon::fmt::fmt_now(),
        operator: operator.name.clone(),
        cluster: cluster.to_string(),
        verb: "connect".into(),
        method: "CONNECT".into(),
        path: format!("{}:{port}", target.connect_host(cluster)),
        status: 200,
        peer: Some(shown),
        rule: Some(decision.why),
        ..Record::default()
    };
    let Some(guard) = guard else {
        let (code, _, msg) =
            refused_member(hub, operator, cluster, record.rule.as_deref().unwrap_or(""));
        record.status = code.as_u16();
        hub.auditor.record(record);
        return Err(RawRefusal::Answer(code, msg));
    };
    let Some(session) = hub.session(cluster) else {
        return Err(RawRefusal::Elsewhere(Box::new(Carried {
            record,
            guard,
            start: std::time::Instant::now(),
            auditor: hub.auditor.clone(),
        })));
    };
    if let Err(msg) = impersonation_agrees(&session) {
        hub.dial_failures.add(DialFailure::AgentError);
        return Err(RawRefusal::Answer(StatusCode::SERVICE_UNAVAILABLE, msg));
    }
    if let Some(msg) = hub.over_stream_limit(operator, cluster) {
        record.status = 503;
        record.error = Some(msg.clone());
        hub.auditor.record(record);
        return Err(RawRefusal::Answer(StatusCode::SERVICE_UNAVAILABLE, msg));
    };
    let start = std::time::Instant::now();
    let window = session.window(&operator.name, crate::tunnel::flow::STREAM_WINDOW);
    // The operator travels in the channel's originator field, so that an
    // impersonating agent can check raw access against the member's RBAC;
    // to an agent that takes them, with the window and what the client has
    // already sent (an HTTP client's request): the target has those one
    // round trip to the agent sooner (`wire::RawOpen`).
    let mut open = crate::daemon::wire::RawOpen::new(crate::daemon::wire::RawIdentity {
        user: operator.name.clone(),
        groups: operator.groups.clone(),
    });
    let (mut first, client) = match early {
        Early::From(c) => (First::Unread, Some(c)),
        Early::Given(bytes) => (First::OnStream(bytes), None),
        Early::None => (First::Unread, None),
    };
    if session.takes_early {
        open.window = Some(window.window);
        // `first` is OnStream (given bytes) or Unread here.
        let bytes = match std::mem::replace(&mut first, First::Unread) {
            First::OnStream(bytes) => Some(bytes),
            _ => client.map(take_early),
        };
        if let Some(bytes) = bytes {
            open.set_early(&bytes);
            first = First::InOpen(bytes.len() as u64);
        }
    }
    let mut originator = open.encode();
    if matches!(first, First::InOpen(_)) && originator.len() > crate::daemon::wire::MAX_OPEN {
        // An operator with very many groups: the bytes go on the stream
        // after the answer instead (`send_early`'s way, below).
        first = First::OnStream(open.take_early());
        open.clear_early();
        originator = open.encode();
    }
    drop(open);
    // Recorded even if the client goes away while the agent dials.
    let pending = crate::daemon::audit::Pending::new(record, start, hub.auditor.clone());
    // Its own task: an agent that takes the window in the open confirms the
    // channel once it has dialed, with its answer, and a confirmation that
    // comes after this side stopped waiting (the time limit, revocation,
    // the client gone) must still find its channel's waiter, which then
    // closes it; dropped unawaited, the channel stayed open at both ends
    // with its target connection until the session ended.
    let open = tokio::spawn({
        let handle = session.handle.clone();
        let (peer_port, window, told) =
            (u32::from(peer.port()), window.window, session.takes_early);
        // Given up after a while all the same (as `open_channel`'s): an
        // agent that answers nothing left one task, and the client's
        // first bytes with it, per attempt for the session's life.
        async move {
            let open = server::open_as(
                &handle,
                &address,
                u32::from(port),
                &originator,
                peer_port,
                window,
                told,
            );
            match tokio::time::timeout(OPEN_DEADLINE * 15, open).await {
                Ok(r) => r,
                Err(_) => Err(russh::Error::Disconnect),
            }
        }
    });
    // A wedged agent answers nothing until its keepalives give up: bounded
    // (the agent bounds its dial at `agent::raw::DIAL_DEADLINE`, within
    // this). Access withdrawn meanwhile ends the wait (the stream never
    // opens).
    let opened = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(20), open) => match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Ok(Err(russh::Error::Disconnect)),
            Err(e) => Err(e),
        },
        () = guard.cut.cancelled() => return Err(raw_revoked(hub, pending.take(), cluster, &session)),
    };
    let mut stream = match opened {
        Ok(Ok(s)) => crate::tunnel::counted::Counted::new(
            s,
            session.counters.bytes_in.clone(),
            session.counters.bytes_out.clone(),
        ),
        Err(_) => return Err(agent_silent(hub, pending, cluster, target)),
        Ok(Err(e)) => {
            hub.dial_failures.add(DialFailure::ChannelRefused);
            let msg = format!("cluster '{cluster}': the agent refused the stream ({e}); it may be an older agent or reconnecting");
            pending.refuse(503, &msg);
            return Err(RawRefusal::Answer(StatusCode::SERVICE_UNAVAILABLE, msg));
        }
    };
    // A client that spoke first (a TCP client through a hub-served
    // port-forward): its bytes went with the open, or go now, ahead of the
    // answer.
    let early = match (first, client) {
        (First::InOpen(n), _) => {
            session
                .counters
                .bytes_out
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Some(n)
        }
        (First::OnStream(bytes), _) => send_early(&bytes, &mut stream).await,
        (First::Unread, Some(c)) => send_early(&take_early(c), &mut stream).await,
        (First::Unread, None) => Some(0),
    };
    let read = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(20), RawAnswer::read(&mut stream)) => r,
        () = guard.cut.cancelled() => return Err(raw_revoked(hub, pending.take(), cluster, &session)),
    };
    let answer = match read {
        Ok(Ok(a)) => a,
        _ => return Err(agent_silent(hub, pending, cluster, target)),
    };
    // The agent's window, said in its answer to a hub whose open told its
    // own (nothing was sent on the stream before it).
    if let RawAnswer::Ok(Some(w)) = answer {
        stream.get_ref().peer_window(w);
    }
    let mut record = pending.take();
    if let RawAnswer::Err(code, msg) = answer {
        hub.dial_failures.add(DialFailure::from(code));
        let status = code.http_status();
        record.status = status.as_u16();
        record.duration_ms = start.elapsed().as_millis() as u64;
        record.error = Some(msg.clone());
        hub.auditor.record(record);
        return Err(RawRefusal::Answer(
            status,
            format!("cluster '{cluster}': {msg}"),
        ));
    }
    if guard.cut.is_cancelled() {
        return Err(raw_revoked(hub, record, cluster, &session));
    }
    let Some(early) = early else {
        // Answered, but the client's first bytes did not get through.
        hub.dial_failures.add(DialFailure::AgentError);
        let msg = format!(
            "cluster '{cluster}': the stream to {} broke before it began",
            target.describe()
        );
        record.status = 502;
        record.error = Some(msg.clone());
        hub.auditor.record(record);
        return Err(RawRefusal::Answer(StatusCode::BAD_GATEWAY, msg));
    };
    let mut held = Carried {
        record,
        guard,
        start,
        auditor: hub.auditor.clone(),
    };
    held.opened();
    Ok(RawStream {
        stream,
        held,
        _counted: session.channel_opened(window),
        early,
    })
}

impl RawStream {
    /// Carries bytes between `client` and the stream until either side
    /// ends or the operator loses access; then audits the end.
    pub(super) async fn splice<C>(self, client: C, stop: CancellationToken)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let RawStream {
            stream,
            held,
            _counted,
            early,
        } = self;
        // What the agent sent goes to the client from the channel's own
        // buffers (no copy through a splice buffer).
        let (mut client, counts) = counted(client);
        counts.0.fetch_add(early, Ordering::Relaxed);
        let mut stream = stream;
        let copy = async {
            let _ = crate::tunnel::splice_from(&mut stream, &mut client).await;
        };
        held.carry(copy, counts, stop).await;
    }

    /// Audits the end of a stream that carried what it carried so far:
    /// the client's first bytes, if they went ahead of the answer.
    pub(super) fn abandon(self) {
        let mut held = self.held;
        held.record.bytes += self.early;
        held.finish(None);
    }
}

/// How long after its agent left a member's refusals say when to retry
/// (`Retry-After: 1`; client-go then retries up to ten times, ~10 s):
/// an agent restarting or handed to another hub is back within it; a
/// member down for longer fails at once again.
const RECONNECTING_FOR: u64 = 30;

/// Why `name` has no live session — not connected (since when, or revoked)
/// or not registered — as a status code, a Kubernetes reason and a message;
/// counted in the dial-failure metrics. Shared by proxying and CONNECT.
pub(super) fn no_session(hub: &Hub, name: &str) -> (StatusCode, &'static str, String) {
    match hub.store.get_member(name) {
        Ok(Some(m)) => {
            let msg = match hub.disconnected_since(name).or(m.last_seen) {
                _ if m.revoked => format!("cluster '{name}' is not connected: it was revoked on the hub (register it anew with 'towerctl cluster rm {name}' and 'towerctl cluster add {name}')"),
                Some(t) => format!("cluster '{name}' is not connected: its agent has been disconnected {}; check the agent with 'towerctl status' on the member", crate::daemon::fmt::ago(t)),
                // Joined (its key registered), but no session is known
                // here: with several hubs, the hub that held it may be down
                // or cut off from etcd while the agent moves.
                None if m.agent_key.is_some() && hub.cluster.get().is_some() => format!("cluster '{name}' is not connected: its agent has joined, but no hub of this group holds its session now (the hub that held it may be down or cut off from etcd; the agent dials the next hub on its own); check the agent with 'towerctl status' on the member"),
                None if m.agent_key.is_some() => format!("cluster '{name}' is not connected: its agent has joined, but holds no session now; check the agent with 'towerctl status' on the member"),
                None => format!("cluster '{name}' is not connected: no agent has joined yet; run the command printed by 'towerctl cluster add {name}' in the member"),
            };
            hub.dial_failures.add(DialFailure::NotConnected);
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", msg)
        }
        Ok(None) => unknown_cluster(hub, name),
        Err(e) => {
            tracing::error!(cluster = %name, "cannot read the member from the registry: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the hub cannot read cluster '{name}' from its registry now; retry in a few seconds"),
            )
        }
    }
}

/// The answer for a member `op` may not reach — and, word for word, for
/// one that is not registered (names do not leak): 403, as kube-apiserver
/// answers what RBAC forbids. A 404 (`NotFound`) made clients believe the
/// objects they asked about were gone: `kubectl delete --ignore-not-found`
/// and `kubectl wait --for=delete` succeeded, and a Terraform provider
/// dropped its resources from state, when only the operator's access had
/// been narrowed. A registry that could not be read is a 503 to retry.
/// (The local admin reaches every member: its unknown names are told as
/// not registered, 404.)
pub(super) fn refused_member(
    hub: &Hub,
    op: &super::Operator,
    name: &str,
    why: &str,
) -> (StatusCode, &'static str, String) {
    if why == super::REGISTRY_UNREADABLE {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!("the hub cannot read its registry to check access to cluster '{name}' now; retry in a few seconds"),
        );
    }
    if op.name == super::LOCAL_ADMIN {
        return unknown_cluster(hub, name);
    }
    // The operator is told nothing more (a member it may not reach reads
    // as one that does not exist); the admin's metrics tell them apart.
    hub.dial_failures.add(if why == super::NOT_REGISTERED {
        DialFailure::UnknownCluster
    } else {
        DialFailure::Forbidden
    });
    (
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("operator '{}' may not reach cluster '{name}', or no cluster of that name is registered on this hub (both are answered alike); the hub's admin grants access with 'towerctl access allow'", op.name),
    )
}

/// The answer for a member that does not exist — and, word for word, for
/// one the operator may not reach.
pub(super) fn unknown_cluster(hub: &Hub, name: &str) -> (StatusCode, &'static str, String) {
    hub.dial_failures.add(DialFailure::UnknownCluster);
    (
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("cluster '{name}' is not registered on this hub; register it with 'towerctl cluster add {name}'"),
    )
}

/// Whether the member's impersonation mode (the hub's registry) and its
/// agent's (declared at login) agree. When they differ, nothing is routed:
/// either operators would silently act with the agent's own identity, or
/// the agent would refuse every request.
fn impersonation_agrees(session: &LiveSession) -> Result<(), String> {
    let member = session.impersonate.load(Ordering::Relaxed);
    let name = &session.name;
    match (member, session.agent_impersonates) {
        (true, false) => Err(format!("cluster '{name}' requires impersonation (each operator acts as itself on the member) but its agent runs without --impersonate; start the agent again with --impersonate (on the member: 'towerctl leave {name}', then its join command with --impersonate), or run 'towerctl cluster set {name} --no-impersonate' on the hub to let operators act with the agent's identity")),
        (false, true) => Err(format!("cluster '{name}' is registered without impersonation but its agent runs with --impersonate; run 'towerctl cluster set {name} --impersonate' on the hub, or start the agent again without --impersonate (on the member: 'towerctl leave {name}', then its join command without it)")),
        _ => Ok(()),
    }
}

/// The answer when a request could not go through the tunnel: the
/// client's fault (a body it broke off or framed wrongly: 400) or the
/// agent's (502, counted as an agent failure).
fn send_failed(hub: &Hub, cluster: &str, e: &hyper::Error) -> Response<Body> {
    if e.is_user() {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the request body could not be read: {e}"),
        );
    }
    hub.dial_failures.add(DialFailure::AgentError);
    status_response(
        StatusCode::BAD_GATEWAY,
        "BadGateway",
        &format!("cluster '{cluster}': the agent did not answer: {e}"),
    )
}

/// The answer to a request whose access was withdrawn while it waited for
/// the member.
fn revoked(cluster: &str) -> Response<Body> {
    status_response(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("access to cluster '{cluster}' was withdrawn while the request was in flight"),
    )
}

/// The answer to a request cut while it waited for the member: 503 naming
/// the mode change when the member now requires impersonation that its
/// agent does not do (nothing was withdrawn from the operator: a 403
/// reads to client-go as final), else [`revoked`].
fn cut_answer(session: &LiveSession, cluster: &str) -> Response<Body> {
    match impersonation_agrees(session) {
        Err(msg) => status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg),
        Ok(()) => revoked(cluster),
    }
}

/// Carries one request to the member and its response back.
#[allow(clippy::too_many_arguments)]
async fn proxy(
    hub: &Hub,
    slot: &ChannelSlot,
    mut req: Request<Incoming>,
    (peer, forwarded): (SocketAddr, &HeaderValue),
    operator: &Operator,
    (name, upstream_path): (String, String),
    client_as: Option<ClientAs>,
    guard: crate::daemon::streams::StreamGuard,
    end: Option<Arc<EndRecord>>,
) -> Response<Body> {
    crate::daemon::http::append_forwarded_for(req.headers_mut(), forwarded);
    // A valid operator token in the URL never goes to the member.
    let target = req.uri().path_and_query().map_or("", |pq| pq.as_str());
    if carries_a_token(hub, target) {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", TOKEN_IN_URL);
    }
    // A coding besides `chunked` (hyper checks only that it ends so):
    // stripped as hop-by-hop, the body went on still gzipped, read as
    // plain by the API server. Refused as Go's server refuses it.
    if !crate::daemon::http::only_chunked(req.headers()) {
        return status_response(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "Transfer-Encoding other than 'chunked' is not supported: send the body as it is, with Content-Encoding if it is compressed",
        );
    }
    let Some(session) = hub.session(&name) else {
        // Held by another hub: carried there.
        let held = (guard, end);
        let req = match super::peer::forward(hub, &name, &upstream_path, req, held).await {
            Ok(resp) => return resp,
            Err(req) => req,
        };
        if let Some(msg) = super::peer::not_forwarded_again(hub, &name, req.headers()) {
            return status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg);
        }
        let (code, reason, msg) = no_session(hub, &name);
        let resp = status_response(code, reason, &msg);
        // An agent that left a moment ago is most likely reconnecting (a
        // restart, a hub hand-off): clients that retry only when told when
        // (client-go, Helm, Argo CD) wait for it instead of failing.
        let recent = hub.disconnected_since(&name).is_some_and(|t| {
            crate::daemon::control::now_unix().saturating_sub(t) < RECONNECTING_FOR
        }) && hub
            .store
            .get_member(&name)
            // Not a revoked member, which no retry brings back.
            .is_ok_and(|m| m.is_some_and(|m| !m.revoked));
        return if recent && code == StatusCode::SERVICE_UNAVAILABLE {
            crate::daemon::http::retry_after(resp, 1)
        } else {
            resp
        };
    };
    if let Err(msg) = impersonation_agrees(&session) {
        hub.dial_failures.add(DialFailure::AgentError);
        return status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg);
    }

    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let watch = crate::daemon::http::query_flag(parts.uri.query(), "watch");
    let pq = match parts.uri.query() {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path,
    };
    parts.uri = match pq.parse() {
        Ok(u) => u,
        Err(_) => {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid request path",
            )
        }
    };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    strip_identity(&mut parts.headers);
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_static(TARGET_APISERVER));
    // Who is asking, for the agent to impersonate where the member allows
    // it (both the hub's registration and the agent must opt in).
    if let Ok(v) = HeaderValue::from_str(&operator.name) {
        parts.headers.insert(OPERATOR_HEADER, v);
    }
    // One header value per group, never joined: a group is one value
    // whatever it contains.
    for g in &operator.groups {
        if let Ok(v) = HeaderValue::from_str(g) {
            parts.headers.append(GROUPS_HEADER, v);
        }
    }
    if session.impersonate.load(Ordering::Relaxed) {
        parts
            .headers
            .insert(IMPERSONATE_HEADER, HeaderValue::from_static("1"));
    }
    if let Some(a) = &client_as {
        // An agent that does not say it takes them would strip them, and
        // the request would run as the operator itself.
        if !session.takes_client_as {
            return status_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "cluster '{name}''s towerctl agent ({}) does not carry impersonation (kubectl --as, --as-group); upgrade the agent, or send the request without it",
                    crate::tunnel::printable(&session.version, 64)
                ),
            );
        }
        a.write(&mut parts.headers, CARRIED_PREFIX);
    }
    // The agent answers within its own deadline (120 s), but an agent
    // that never does (a compromised member's, a stuck one) held the
    // request, and the operator's stream slot, for as long as the session
    // lived: client-go sets no deadline of its own.
    let deadline = super::peer::answer_deadline(parts.uri.path(), parts.uri.query(), upgrade);
    // Only a read goes in a new channel's open (see `open_channel`).
    let in_open = !upgrade
        && matches!(
            parts.method,
            hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
        );
    let mut up_req = Request::from_parts(parts, body);
    // hyper reads past informational (1xx) answers without a bound, each
    // a few bytes to parse: an agent sending `100 Continue` without end,
    // within its window, kept the hub's one thread busy at ~160 ns a byte
    // (bodies cost ~10), slowing every member, for as long as a watch
    // stayed open. A member's API server sends one or two.
    let informational = CancellationToken::new();
    {
        let (seen, past) = (std::sync::atomic::AtomicU32::new(0), informational.clone());
        hyper::ext::on_informational(&mut up_req, move |_| {
            if seen.fetch_add(1, Ordering::Relaxed) + 1 > MAX_INFORMATIONAL {
                past.cancel();
            }
        });
    }

    let exchange = async {
        // An upgraded connection is spliced for good: it gets its own channel.
        let reused = if upgrade {
            None
        } else {
            slot.take(&name, session.id)
        };
        let was_reused = reused.is_some();
        let (mut sender, mut opened) = match reused {
            Some(s) => (s, OpenFailed::default()),
            None => match open_channel(hub, &session, (&name, &operator.name), peer, in_open).await
            {
                Ok(s) => s,
                Err(resp) => {
                    hub.dial_failures.add(DialFailure::ChannelRefused);
                    return Err(resp);
                }
            },
        };
        // A request failed by its channel's open is answered with why.
        let refused = |opened: &OpenFailed| {
            let resp = opened.take()?;
            hub.dial_failures.add(DialFailure::ChannelRefused);
            Some(resp)
        };
        let resp = match sender.try_send_request(up_req).await {
            Ok(r) => r,
            Err(mut e) => match (was_reused, e.take_message()) {
                // The reused channel was closed under us before the request
                // went out: safe to send it again on a fresh one, whatever
                // its method.
                (true, Some(up_req)) => {
                    (sender, opened) =
                        match open_channel(hub, &session, (&name, &operator.name), peer, in_open)
                            .await
                        {
                            Ok(s) => s,
                            Err(resp) => {
                                hub.dial_failures.add(DialFailure::ChannelRefused);
                                return Err(resp);
                            }
                        };
                    match sender.send_request(up_req).await {
                        Ok(r) => r,
                        Err(e) => {
                            return Err(
                                refused(&opened).unwrap_or_else(|| send_failed(hub, &name, &e))
                            )
                        }
                    }
                }
                _ => {
                    return Err(
                        refused(&opened).unwrap_or_else(|| send_failed(hub, &name, e.error()))
                    )
                }
            },
        };
        Ok((resp, sender))
    };
    // The stream was registered before access was decided (`Hub::admit`):
    // access withdrawn while the member has not answered yet ends the
    // request here, and an answer never opens a stream for it.
    let (mut resp, sender) = tokio::select! {
        r = crate::daemon::http::within(deadline, exchange) => match r {
            Ok(Ok(r)) => r,
            Ok(Err(resp)) => return resp,
            Err(_) => {
                hub.dial_failures.add(DialFailure::AgentError);
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!(
                        "cluster '{name}': its agent did not answer within {}s; see 'towerctl status' and the agent's log",
                        deadline.unwrap_or_default().as_secs()
                    ),
                );
            }
        },
        () = guard.cut.cancelled() => return cut_answer(&session, &name),
        () = informational.cancelled() => {
            hub.dial_failures.add(DialFailure::AgentError);
            static TOO_MANY: crate::tunnel::LogBudget =
                crate::tunnel::LogBudget::new("answers with too many informational heads", 10);
            if TOO_MANY.admit() {
                tracing::warn!(
                    cluster = %name,
                    "the agent sent more than {MAX_INFORMATIONAL} informational (1xx) answers to one request; the request's channel is closed"
                );
            }
            return status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!(
                    "cluster '{name}': its agent sent more than {MAX_INFORMATIONAL} informational (1xx) answers to this request; see the agent's log and its member's API server"
                ),
            );
        }
    };
    crate::daemon::http::confine_location(resp.headers_mut(), &name, &pq);
    if guard.cut.is_cancelled() {
        return cut_answer(&session, &name);
    }
    if !upgrade {
        slot.put(name.clone(), &session, sender);
    }
    let watch_of = watch.then_some(name.as_str());
    held_response(hub, client_upgrade, resp, (guard, end), watch_of)
}

/// What the gateway holds for a request while it is answered: its stream
/// registration and, for an upgrade, its end record.
pub(super) type Held = (crate::daemon::streams::StreamGuard, Option<Arc<EndRecord>>);

/// The member's answer for the client, holding the request's stream
/// registration (and an upgrade's end record) for as long as it lasts:
/// every stream is registered under its operator and member, so that
/// revoking access cuts it at once, whatever it is (watch, logs -f, exec,
/// port-forward). Shared by answers from the agent and from another hub.
pub(super) fn held_response<B>(
    hub: &Hub,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut resp: Response<B>,
    (guard, end): Held,
    watch_of: Option<&str>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded && client_upgrade.is_none() {
        // A member switching protocols on a request that asked for no
        // upgrade (a hostile one, or something broken in front of it):
        // passed on, an HTTP/1.1 client got the 101 and then a closed
        // connection, an HTTP/2 client a reset stream.
        hub.dial_failures.add(DialFailure::AgentError);
        return status_response(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            "the member answered 101 Switching Protocols to a request that asked for no upgrade",
        );
    }
    crate::daemon::http::strip_response(resp.headers_mut(), upgraded);
    // The client's protocol, whatever the member (or an agent of an older
    // version) answered in: an HTTP/1.0 answer closed an HTTP/1.1
    // client's connection.
    if resp.version() < hyper::Version::HTTP_11 {
        *resp.version_mut() = hyper::Version::HTTP_11;
    }
    let stop = guard.cut.clone();
    if upgraded {
        let bytes = end.as_ref().map(|e| e.count_bytes());
        finish_upgrade(
            &hub.tasks,
            client_upgrade,
            &mut resp,
            stop,
            (guard, end),
            bytes,
        );
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync());
    }
    let (parts, body) = resp.into_parts();
    let body = body.map_err(|e| Box::new(e) as _).boxed_unsync();
    let mut body = Guarded::new(body, Some(stop), (guard, end));
    // A JSON watch (`watch_of` names its member) cut for access withdrawn
    // says so in its stream.
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if let Some(cluster) = watch_of.filter(|_| json && parts.status == StatusCode::OK) {
        body = body
            .with_farewell(&format!(
                "access to cluster '{cluster}' was withdrawn: the towerctl hub ended this watch (a rule or label changed, the operator was removed, or the hub cannot confirm its registry); run the command again to see why"
            ))
            .with_broken_farewell(&format!(
                "the watch on cluster '{cluster}' broke on its way from the member: its towerctl agent disconnected or left, the member was removed, a towerctl hub on the way stopped, or its API server cut the stream; run the command again to see whether the member is reachable"
            ));
    }
    Response::from_parts(parts, body.boxed_unsync())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::daemon::store::{MemStore, Member, Store};

    #[tokio::test]
    async fn a_member_not_connected_is_told_apart_from_one_never_joined() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MemStore::default());
        let hub = super::Hub::new(
            store.clone(),
            crate::daemon::audit::Auditor::start(dir.path().join("audit.log")),
            String::new(),
            crate::daemon::admission::Caps::from_fd_limit(1024),
        );
        let said = |name: &str| super::no_session(&hub, name).2;
        assert!(store
            .create_member(&Member::new("fresh", "h1".into(), 1))
            .unwrap());
        assert!(said("fresh").contains("no agent has joined yet"));
        // Joined (its key registered) but no session anywhere, and no
        // disconnection recorded: not "no agent has joined yet".
        let mut joined = Member::new("joined", "h2".into(), 1);
        joined.agent_key = Some("ssh-ed25519 AAAA".into());
        assert!(store.create_member(&joined).unwrap());
        let msg = said("joined");
        assert!(msg.contains("its agent has joined"), "{msg}");
        assert!(!msg.contains("no agent has joined yet"), "{msg}");
        let mut seen = Member::new("seen", "h3".into(), 1);
        seen.last_seen = Some(crate::daemon::control::now_unix() - 60);
        assert!(store.create_member(&seen).unwrap());
        assert!(said("seen").contains("has been disconnected"));
    }
}
