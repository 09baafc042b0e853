//! The hub's tunnel listener: WebSocket upgrade, SSH login, one live
//! session per agent, keepalive pings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Hub, LiveSession};
use crate::daemon::admission::{Admission, Ticket};
use crate::daemon::control::{self, push_bounded, RTT_SAMPLES_KEPT};
use crate::daemon::proxied::TrustedProxies;
use crate::tunnel::{self, server};

/// From accept to a finished SSH login (WebSocket upgrade, SSH banner, key
/// exchange and authentication): a connection that has not logged in by
/// then is closed. Stops half-open and silent-connection floods.
pub const LOGIN_DEADLINE: Duration = Duration::from_secs(15);

/// Largest WebSocket message or frame accepted. The tunnel never sends more
/// than 256 KiB in one message (see `tunnel::ws`); tungstenite's default
/// (64 MiB) would let an unauthenticated peer make the hub buffer that much.
pub const MAX_WS_MESSAGE: usize = 1024 * 1024;

use crate::tunnel::WS_READ_BUFFER;

/// Longest HTTP head taken on the tunnel listener: an agent's upgrade is
/// ~300 bytes, an ingress adds a few headers (tungstenite alone would take
/// 64 KiB from every connection before login).
const MAX_UPGRADE_HEAD: usize = 16 * 1024;

/// Paths a load balancer or ingress may check the tunnel listener on
/// (without an upgrade, with GET, HEAD or OPTIONS): answered 200 while the
/// hub accepts tunnels. `/` too, answered as `/readyz` with a word on the
/// port: the AWS Load Balancer Controller, GKE's Gateway, Azure's
/// Application Gateway and HAProxy's `httpchk` (`OPTIONS /`) check `/` by
/// default, and got 426 or 405: every hub unhealthy, and agents told
/// by the balancer that there was no hub.
const HEALTH_PATHS: [&str; 4] = ["/healthz", "/readyz", "/livez", "/"];

/// The answer to a connection on the tunnel listener that is not a
/// WebSocket upgrade.
struct NotAnUpgrade {
    /// Status code and reason; `None`: closed without an answer (the peer
    /// does not speak HTTP at all).
    status: Option<&'static str>,
    /// Header lines of its own, each ending in CRLF.
    headers: &'static str,
    /// The problem, said first in the body.
    problem: &'static str,
    /// For the log: `None` for a health check (answered 200, not logged).
    why: Option<String>,
    /// Whether the answer has a body (not for HEAD).
    body: bool,
    /// A load balancer's readiness check (`/readyz`, `/`): answered 503
    /// while the hub hands its agents to other hubs.
    readiness: bool,
    /// The health answer says what the port is for (`/`).
    explained: bool,
}

/// What the tunnel listener says to what is not an agent's upgrade.
const TUNNEL_ONLY: &str = "This port of the towerctl hub takes member clusters' \
     tunnels: a WebSocket upgrade from `towerctl join`. kubectl and port-forwards go to the \
     hub's gateway (`towerctl status` shows its address); load balancers can check GET \
     /healthz here.\n";

/// Whether the first bytes of a connection on the tunnel listener show it
/// is no HTTP request, so that [`not_an_upgrade`] can answer at once
/// rather than at the login deadline: a TLS handshake (`wss://` dialed
/// straight at the hub), an SSH banner, a PROXY header from an untrusted
/// address, a request line (or first header line) httparse refuses, as
/// tungstenite would. Shown the first 1 KiB at most (`Gate::peek_head`):
/// a request line's start is what tells.
fn not_http(first: &[u8]) -> bool {
    first.first() == Some(&0x16)
        || crate::daemon::proxied::starts_like_proxy_header(first)
        || matches!(
            httparse::Request::new(&mut []).parse(first),
            Err(e) if e != httparse::Error::TooManyHeaders
        )
}

/// `None` when `head` (complete: with its blank line) is a WebSocket
/// upgrade tungstenite will accept; else how to answer it. The checks are
/// tungstenite's own (its parser, `create_response`), so that nothing it
/// would take is refused here but heads over [`MAX_UPGRADE_HEAD`];
/// health checks are answered whatever their HTTP/1 version, and to HEAD.
fn not_an_upgrade(head: &[u8], complete: bool) -> Option<NotAnUpgrade> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error, ProtocolError};
    use tokio_tungstenite::tungstenite::handshake::{
        machine::TryParse,
        server::{create_response, Request},
    };
    // The request line as sent (its first 240 bytes), escaped, for the log.
    let line = || {
        let start = head
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(head.len());
        let rest = &head[start..(start + 240).min(head.len())];
        let end = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        tunnel::escape_for_log(&String::from_utf8_lossy(&rest[..end]), 120)
    };
    let refuse = |status, headers, problem, why: String| {
        Some(NotAnUpgrade {
            status: Some(status),
            headers,
            problem,
            why: Some(format!("{why} (\"{}\"): answered {status}", line())),
            body: true,
            readiness: false,
            explained: false,
        })
    };
    let bad = |problem, why: &str| refuse("400 Bad Request", "", problem, why.to_string());
    if crate::daemon::proxied::starts_like_proxy_header(head) {
        return bad(
            "a PROXY protocol header from an address not trusted to send one",
            crate::daemon::proxied::UNTRUSTED_PROXY_HEADER,
        );
    }
    if head.starts_with(b"PRI * HTTP/2.0") {
        return bad(
            "HTTP/2 cannot carry a WebSocket upgrade here",
            "an HTTP/2 connection (a proxy or balancer that speaks HTTP/2 to the hub: a \
             WebSocket upgrade needs HTTP/1.1 to the backend; Istio: a port named http or tcp, \
             not http2 or grpc; an ALB target group: HTTP1)",
        );
    }
    if head.first() == Some(&0x16) {
        // A TLS client would not read an HTTP answer.
        return Some(NotAnUpgrade {
            status: None,
            headers: "",
            problem: "",
            why: Some(
                "a TLS handshake on the tunnel listener, which serves plain ws:// (wss:// \
                 needs a TLS-terminating ingress or load balancer in front of the hub): closed"
                    .to_string(),
            ),
            body: false,
            readiness: false,
            explained: false,
        });
    }
    if complete {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = request.parse(head) {
            let target = request.path.unwrap_or_default();
            // Origin form, or absolute form (`GET http://hub/healthz`).
            let path = match target.split_once("://") {
                Some((_, rest)) if !target.starts_with('/') => {
                    rest.find('/').map_or("/", |i| &rest[i..])
                }
                _ => target,
            };
            let path = path.split('?').next().unwrap_or_default();
            // An upgrade attempt, even one a proxy on the way mangled (nginx
            // left at HTTP/1.0 drops Upgrade and Connection but passes the
            // Sec-WebSocket-* fields): answered as such below (426, 505),
            // not taken for a health check of `/`.
            let upgrade = request.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("upgrade")
                    || h.name.eq_ignore_ascii_case("sec-websocket-key")
                    || h.name.eq_ignore_ascii_case("sec-websocket-version")
                    || (h.name.eq_ignore_ascii_case("connection")
                        && String::from_utf8_lossy(h.value)
                            .split(',')
                            .any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
            });
            let method = request.method.unwrap_or_default();
            if HEALTH_PATHS.contains(&path)
                && !upgrade
                && matches!(method, "GET" | "HEAD" | "OPTIONS")
            {
                return Some(NotAnUpgrade {
                    status: Some("200 OK"),
                    headers: "",
                    problem: "ok",
                    why: None,
                    body: method != "HEAD",
                    readiness: matches!(path, "/readyz" | "/"),
                    explained: path == "/",
                });
            }
        }
    }
    let request = match Request::try_parse(head) {
        Ok(Some((_, request))) => request,
        Ok(None) if complete => return bad("not an HTTP request", "not an HTTP request"),
        Ok(None) if head.len() >= MAX_UPGRADE_HEAD => {
            return refuse(
                "431 Request Header Fields Too Large",
                "",
                "the request's head is longer than 16 KiB",
                format!("an HTTP head longer than {MAX_UPGRADE_HEAD} bytes"),
            )
        }
        Ok(None) => {
            return bad(
                "the request ended before its head did",
                "the connection ended inside an HTTP head",
            )
        }
        Err(Error::Protocol(ProtocolError::WrongHttpMethod)) => {
            return refuse(
                "405 Method Not Allowed",
                "Allow: GET\r\n",
                "only GET (a WebSocket upgrade) is taken here",
                "a method other than GET".to_string(),
            )
        }
        Err(Error::Protocol(ProtocolError::WrongHttpVersion)) => {
            return refuse(
                "505 HTTP Version Not Supported",
                "",
                "a WebSocket upgrade needs HTTP/1.1",
                "HTTP before 1.1".to_string(),
            )
        }
        Err(Error::Capacity(CapacityError::TooManyHeaders)) => {
            return refuse(
                "431 Request Header Fields Too Large",
                "",
                "the request has too many header fields",
                "too many header fields".to_string(),
            )
        }
        Err(_) => return bad("not an HTTP/1.1 request", "not an HTTP/1.1 request"),
    };
    match create_response(&request) {
        Ok(_) => None,
        Err(Error::Protocol(
            ProtocolError::MissingConnectionUpgradeHeader
            | ProtocolError::MissingUpgradeWebSocketHeader,
        )) => refuse(
            "426 Upgrade Required",
            "Upgrade: websocket\r\n",
            "not a WebSocket upgrade",
            "not a WebSocket upgrade".to_string(),
        ),
        Err(Error::Protocol(ProtocolError::MissingSecWebSocketVersionHeader)) => refuse(
            "426 Upgrade Required",
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            "only WebSocket version 13 (RFC 6455) is spoken here",
            "a WebSocket version other than 13".to_string(),
        ),
        Err(e) => bad(
            "not a valid WebSocket upgrade",
            &format!("a WebSocket upgrade tungstenite refuses ({e})"),
        ),
    }
}

impl NotAnUpgrade {
    /// Writes the answer (if any) and closes (`http::answer_and_close`);
    /// the caller's deadline bounds it.
    async fn send<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, io: &mut S) {
        let Some(status) = self.status else {
            return;
        };
        let body = match self.why {
            None if self.explained => format!("ok\n{TUNNEL_ONLY}"),
            None => "ok\n".to_string(),
            Some(_) => format!("towerctl hub: {}.\n{TUNNEL_ONLY}", self.problem),
        };
        let mut answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\n{}Connection: close\r\n\r\n",
            body.len(),
            self.headers,
        );
        if self.body {
            answer.push_str(&body);
        }
        crate::daemon::http::answer_and_close(io, answer.as_bytes()).await;
    }
}

/// The answer to a readiness check (`with_body`: not to HEAD) while the
/// hub hands its agents to other hubs (`peer::HandOff`).
async fn not_ready<S>(io: &mut S, with_body: bool, body: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nRetry-After: 5\r\n\
         Connection: close\r\n\r\n",
        body.len(),
    );
    if with_body {
        answer.push_str(body);
    }
    crate::daemon::http::answer_and_close(io, answer.as_bytes()).await;
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn accept_tunnels(
    listener: TcpListener,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    trusted: Arc<TrustedProxies>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let penalties = Arc::new(Penalties::default());
    let prelogin_logs = Arc::new(tunnel::LogBudget::new("failed tunnel logins", 10));
    while let Some((tcp, peer)) = crate::daemon::accept_next(&listener, &cancel, "tunnel").await {
        // What the hub sends a member waits behind little in the kernel.
        tunnel::notsent_lowat(&tcp);
        // A source past its refused join tokens is not closed here: an
        // agent that has joined logs in with its key, which cannot be
        // guessed, and may share the address (NAT, an ingress) with
        // whoever is guessing. Only its tokens go unchecked
        // (`SourcePenalty`).
        let ticket = admission.admit(peer.ip());
        let hub = hub.clone();
        let ssh_cfg = ssh_cfg.clone();
        let cancel = cancel.clone();
        let penalties = penalties.clone();
        let prelogin_logs = prelogin_logs.clone();
        let trusted = trusted.clone();
        tracker.spawn(async move {
            let conn = Incoming {
                peer,
                trusted,
                penalties,
                ticket,
            };
            if let Err(e) = tunnel_session(tcp, conn, hub, ssh_cfg, keepalive, cancel).await {
                // Only failures before a login end here, and anyone can
                // cause one per connection: a few a minute at info (an
                // agent behind a broken ingress shows why), the rest at
                // debug, so that a flood cannot rotate the log away.
                // Bounded, without control characters: russh's words may
                // hold the peer's own lists (35 KB of algorithm names it
                // offered); the hub's own are escaped already.
                let e = crate::tunnel::printable(&format!("{e:#}"), 500);
                if prelogin_logs.admit() {
                    tracing::info!(%peer, "tunnel session ended before login: {e}");
                } else {
                    tracing::debug!(%peer, "tunnel session ended before login: {e}");
                }
            }
        });
    }
}

/// A tunnel connection before its login.
struct Incoming {
    /// The TCP peer (an ingress, when the hub is behind one).
    peer: SocketAddr,
    trusted: Arc<TrustedProxies>,
    penalties: Arc<Penalties>,
    ticket: Ticket,
}

/// [`Penalties`] as seen by one connection's login.
struct SourcePenalty {
    penalties: Arc<Penalties>,
    /// The source as limits count it (`admission::source_key`: an IPv6
    /// address's /64, a NAT64 address's IPv4 one).
    ip: std::net::IpAddr,
}

impl server::Penalty for SourcePenalty {
    fn try_token(&self) -> bool {
        if self.penalties.blocked(self.ip).is_some() {
            return false;
        }
        self.penalties.failed(self.ip);
        true
    }

    fn accepted(&self) {
        self.penalties.succeeded(self.ip);
    }

    fn unchecked(&self) {
        self.penalties.uncount(self.ip);
    }
}

/// Refused join tokens per client address (behind a trusted proxy, the
/// address it forwarded for), with exponential backoff: after
/// [`Penalties::FREE`] refusals in a row, tokens from that address are not
/// checked for 0.5 s, doubling up to 60 s ([`SourcePenalty`]): the
/// connection is closed unanswered. Logins with a key are not held back.
/// An accepted token from the address clears it. Bounded: the oldest
/// entries go past [`Penalties::MAX_SOURCES`].
#[derive(Default)]
struct Penalties(Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>);

impl Penalties {
    const FREE: u32 = 5;
    const MAX_SOURCES: usize = 10_000;

    fn delay(failures: u32) -> Duration {
        if failures < Self::FREE {
            return Duration::ZERO;
        }
        let exp = (failures - Self::FREE).min(7);
        Duration::from_millis(500 << exp).min(Duration::from_secs(60))
    }

    fn blocked(&self, ip: std::net::IpAddr) -> Option<Duration> {
        let m = self.0.lock().ok()?;
        let (n, at) = m.get(&ip)?;
        let until = *at + Self::delay(*n);
        until.checked_duration_since(std::time::Instant::now())
    }

    fn failed(&self, ip: std::net::IpAddr) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= Self::MAX_SOURCES && !m.contains_key(&ip) {
                if let Some(oldest) = m.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                    m.remove(&oldest);
                }
            }
            let e = m.entry(ip).or_insert((0, std::time::Instant::now()));
            e.0 += 1;
            e.1 = std::time::Instant::now();
        }
    }

    fn uncount(&self, ip: std::net::IpAddr) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(e) = m.get_mut(&ip) {
                e.0 = e.0.saturating_sub(1);
            }
        }
    }

    fn succeeded(&self, ip: std::net::IpAddr) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&ip);
        }
    }
}

async fn tunnel_session(
    tcp: tokio::net::TcpStream,
    conn: Incoming,
    hub: Arc<Hub>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    cancel: CancellationToken,
) -> Result<()> {
    let Incoming {
        peer,
        trusted,
        penalties,
        ticket,
    } = conn;
    // LOGIN_DEADLINE with nothing heard from the agent, once its
    // WebSocket frames come (`tunnel::with_progress`): a login over a
    // long link takes longer.
    let heard: std::sync::OnceLock<tunnel::Liveness> = std::sync::OnceLock::new();
    let accepted = tokio::time::Instant::now();
    let login = async {
        // A load balancer in front names its client in a PROXY protocol
        // header, if it is trusted to; an HTTP ingress in X-Forwarded-For
        // (below).
        let mut tcp = tcp;
        let proxied = trusted.trusts(peer.ip());
        let from = if proxied {
            let required = crate::daemon::proxied::RequireHeader(trusted.require_header());
            let from = crate::daemon::proxied::read_proxy_header(&mut tcp, required)
                .await?
                .unwrap_or(peer);
            ticket.rekey(from.ip().to_canonical());
            from
        } else {
            peer
        };
        let ws_cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE))
            // tungstenite reads only the upgrade's head (`WsIo` reads the
            // frames); its buffer is dropped with it after the upgrade.
            .read_buffer_size(WS_READ_BUFFER);
        // Frames before login are held to 64 KiB (tunnel::framecap).
        let tcp = tunnel::framecap::FrameCap::new(tcp, tunnel::framecap::PRELOGIN_MAX);
        let lift = tcp.lift();
        // What is not a WebSocket upgrade (a health check, a browser, curl,
        // kubectl pointed at the wrong port) gets an HTTP answer that says
        // so, rather than the bare close tungstenite gives it.
        let mut gate = tunnel::ws::Gate::new(tcp, tunnel::ws::Role::Server);
        let peeked = gate
            .peek_head(MAX_UPGRADE_HEAD, not_http)
            .await
            .context("reading the WebSocket upgrade")?;
        let (len, complete) = (peeked.bytes.len(), peeked.complete);
        // Read again from what is in hand (nothing more is read): the
        // head whole, and as tungstenite will read it.
        let limit = if complete && gate.normalize_upgrade_head(len) {
            MAX_UPGRADE_HEAD + 1024
        } else {
            MAX_UPGRADE_HEAD
        };
        let head = gate
            .peek_head(limit, not_http)
            .await
            .context("reading the WebSocket upgrade")?;
        if head.bytes.is_empty() {
            // Connected and closed: a TCP health check.
            return Ok(None);
        }
        let answer = not_an_upgrade(head.bytes, head.complete);
        // Handing agents to other hubs: a load balancer's readiness check
        // is told to send them elsewhere.
        if let Some(a) = answer
            .as_ref()
            .filter(|a| a.readiness && (hub.handing_off() || hub.draining()))
        {
            lift();
            let why = if hub.draining() {
                "not ready: this towerctl hub is stopping (--shutdown-delay)\n"
            } else {
                "not ready: this towerctl hub cannot reach etcd and hands its agents to \
                 another hub of the group\n"
            };
            not_ready(gate.get_mut(), a.body, why).await;
            return Ok(None);
        }
        if let Some(answer) = answer {
            // What the client still sends is read (and dropped) unchecked.
            lift();
            answer.send(gate.get_mut()).await;
            return match answer.why {
                // Behind a trusted balancer, the client it named.
                Some(why) if from != peer => Err(anyhow::anyhow!("{why} (client {from})")),
                Some(why) => Err(anyhow::anyhow!(why)),
                None => Ok(None),
            };
        }
        // The client's own address: the peer's, or behind a trusted proxy
        // the one it forwarded for.
        let mut client = from.ip().to_canonical();
        // The callback's error type is tungstenite's (a whole response).
        #[allow(clippy::result_large_err)]
        let ws = tokio_tungstenite::accept_hdr_async_with_config(
            gate,
            |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
                client = trusted.client(from.ip(), req.headers());
                Ok(res)
            },
            Some(ws_cfg),
        )
        .await
        .context("WebSocket handshake failed")?;
        if proxied {
            ticket.rekey(client);
        }
        let io = tunnel::ws::WsIo::new(ws);
        let alive = (io.liveness(), io.close_note());
        let _ = heard.set(io.liveness());
        let auth: Arc<dyn server::Authenticator> = hub.clone();
        // Bounded outside (`with_progress`), within its cap.
        let left = tunnel::LOGIN_CAP;
        let penalty = Arc::new(SourcePenalty {
            penalties: penalties.clone(),
            ip: crate::daemon::admission::source_key(client),
        });
        // The session's address as shown: behind a proxy, the client's
        // and the proxy's.
        let proxied = client != peer.ip().to_canonical();
        let shown = if proxied {
            format!("{client} via {peer}")
        } else {
            peer.to_string()
        };
        let sess = server::accept(ssh_cfg, io, auth, penalty, left)
            .await
            .map_err(|e| {
                let e = anyhow::Error::from(e);
                if proxied {
                    e.context(format!("client {shown}"))
                } else {
                    e
                }
            })?;
        lift();
        anyhow::Ok(Some((sess, alive, shown)))
    };
    let (mut sess, (alive, ws_closed), peer) = tokio::select! {
        r = tunnel::with_progress(login, LOGIN_DEADLINE, tunnel::LOGIN_CAP, || heard.get().map_or(0, |l| l.seen())) => match r {
            Ok(r) => match r? {
                Some(logged_in) => logged_in,
                None => return Ok(()),
            },
            Err(took) if took >= tunnel::LOGIN_CAP => anyhow::bail!("no SSH login within {:?}", tunnel::LOGIN_CAP),
            Err(_) => anyhow::bail!("no SSH login: no WebSocket upgrade, or no frame from the peer since, for {LOGIN_DEADLINE:?}"),
        },
        _ = ticket.evicted.cancelled() => anyhow::bail!("closed before login to make room (too many unauthenticated connections)"),
        _ = cancel.cancelled() => return Ok(()),
    };
    // Logged in: no longer counted among the unauthenticated.
    drop(ticket);
    let counters = hub.counters(&sess.name);
    let mode_at_login = impersonation_at_login(hub.store.as_ref(), &sess.name);
    let live = Arc::new(LiveSession {
        id: hub.next_id.fetch_add(1, Ordering::Relaxed),
        name: sess.name.clone(),
        key: sess.key.clone(),
        handle: sess.handle.clone(),
        peer: Some(peer.clone()),
        connected_at: control::now_unix(),
        impersonate: std::sync::atomic::AtomicBool::new(mode_at_login.unwrap_or(true)),
        agent_impersonates: sess.features.iter().any(|f| f == "impersonate"),
        takes_hub_list: sess.features.iter().any(|f| f == tunnel::FEATURE_HUBS),
        takes_client_as: sess.features.iter().any(|f| f == tunnel::FEATURE_CLIENT_AS),
        takes_early: sess
            .features
            .iter()
            .any(|f| f == tunnel::FEATURE_OPEN_EARLY)
            && !tunnel::left_out_for_tests("TOWERCTL_TEST_HUB_WITHOUT", tunnel::FEATURE_OPEN_EARLY),
        takes_request_in_open: sess
            .features
            .iter()
            .any(|f| f == tunnel::FEATURE_REQUEST_IN_OPEN)
            && !tunnel::left_out_for_tests(
                "TOWERCTL_TEST_HUB_WITHOUT",
                tunnel::FEATURE_REQUEST_IN_OPEN,
            ),
        rtt_us: AtomicU64::new(0),
        ping_since: Default::default(),
        streams: AtomicU64::new(0),
        windows: crate::tunnel::flow::WindowBudget::from_env(super::MEMBER_WINDOW_BUDGET)
            .within(crate::tunnel::flow::process_budget()),
        shares: Default::default(),
        kept: super::Budget::new(super::MAX_KEPT_CHANNELS),
        bytes_at_start: counters.bytes(),
        counters,
        version: sess.version.clone(),
        close_reason: Mutex::new(None),
        kill: sess.abort(),
    });
    session_line!(hub, &live.name, cluster = %live.name, %peer, "agent connected");
    hub.register(live.clone());
    // A revoke or removal that raced this login (the check passed just
    // before it) must not leave a session registered: look again now that
    // the session is visible to the revoke's cut.
    match hub.store.get_member(&live.name) {
        Ok(Some(m)) if !m.revoked => {
            // The mode as the registry has it now. Raised when a `cluster
            // set --impersonate` raced the login (and what the session
            // opened meanwhile cut); lowered only when the first read
            // failed, never over a `cluster set` that lands between this
            // read and the store.
            if m.impersonate || mode_at_login.is_none() {
                hub.set_impersonation(&live, m.impersonate);
            }
            if let Some(why) = super::auth::key_retired(&m, &live) {
                live.close(&why).await;
            }
        }
        // Cannot be confirmed now: closed, but not as a revocation, which
        // would stop the agent for good; it reconnects.
        Err(e) => {
            let why = format!(
                "the hub cannot read its registry to confirm the login now ({e}); reconnect later"
            );
            live.close(&why).await;
        }
        _ => {
            let why = super::auth::revoked_reason(&live.name);
            live.close(&why).await;
        }
    }
    // Handing agents to other hubs (after registering: a hand-off that
    // began meanwhile sees this session, or this sees it).
    if let Some(why) = super::peer::hand_off_refusal(&hub, &live.name) {
        live.close(&why).await;
    } else if hub.stale_refusal().is_none() {
        // Several hubs: every one of them, for the agent to fail over to
        // (its join command may predate some); not from an unconfirmed
        // view of the group.
        super::peer::send_hub_list(&hub, &live, hub.group_tunnel_urls());
    }

    // A ping goes out at most one interval after the last answer and gets
    // 1.8 intervals to come back (tunnel::ping_deadline): a silent agent is
    // dead within three; on a far link, three round trips
    // (`ping_deadline_for`; before any answer, from the login's time).
    // Returns what the unanswered ping waited.
    let login_rtt = accepted.elapsed() / 7;
    let pinger = {
        let live = live.clone();
        let hub = hub.clone();
        async move {
            let mut last_rtt = login_rtt;
            let since = |at: Option<std::time::Instant>| {
                if let Ok(mut s) = live.ping_since.lock() {
                    *s = at;
                }
            };
            loop {
                since(Some(std::time::Instant::now()));
                let deadline = crate::tunnel::ping_deadline_for(keepalive, last_rtt);
                match server::ping(&live.handle, deadline, &alive).await {
                    Some(rtt) => {
                        last_rtt = rtt;
                        live.rtt_us
                            .store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
                        since(None);
                        hub.record(&live.name, |m| {
                            push_bounded(&mut m.rtt, rtt.as_secs_f64() * 1000.0, RTT_SAMPLES_KEPT);
                            m.rtt_histogram.observe(rtt.as_secs_f64());
                        });
                    }
                    None => return deadline,
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
        waited = pinger => {
            // A moment for the reason to go out, then the transport is
            // cut: requests in flight on a dead peer fail now, not never.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                live.handle.disconnect(russh::Disconnect::ByApplication, "no keepalive answer".into(), String::new()),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            live.kill.cancel();
            format!("no answer to keepalives within {waited:.1?}: declared dead")
        }
        _ = cancel.cancelled() => {
            // Said to the agent, which reports a hub going away, not a
            // connection reset; its answer to the DISCONNECT, or the cut
            // within a second, ends the session.
            live.close("the hub is shutting down").await;
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut sess.running).await;
            "hub shutting down".to_string()
        }
    };
    // What the agent said when it stopped on purpose ("agent stopped").
    // Without the agent's goodbye, what the WebSocket's Close said, if
    // one came (a proxy in front of the hub ending it: 1001).
    let why = match (
        sess.farewell(),
        ws_closed.lock().ok().and_then(|c| c.clone()),
    ) {
        (Some(farewell), _) => farewell,
        (None, Some(closed)) => format!("{why} (after {closed})"),
        (None, None) => why,
    };
    let why = live
        .close_reason
        .lock()
        .ok()
        .and_then(|mut r| r.take())
        .unwrap_or(why);
    // The reason may hold the agent's own words (its farewell): a quoted,
    // escaped field, so that it cannot pass for other fields of the line.
    // Bounded too: russh's words after a failed key exchange hold the
    // agent's lists (up to a 256 KiB packet).
    let shown = crate::tunnel::printable(&why, 500);
    session_line!(hub, &live.name, cluster = %live.name, %peer, reason = ?shown, "agent disconnected");
    hub.unregister(&live, &why);
    Ok(())
}

/// Whether a member's new session must route with impersonation, from the
/// registry. A registry that cannot be read says "required" (requests are
/// refused until it is confirmed), never "agent identity": that would let
/// an agent without `--impersonate` act with its own rights for every
/// operator of a member that requires impersonation.
/// `None` when the registry could not be read: the session then starts as
/// "required" (`unwrap_or(true)`).
fn impersonation_at_login(store: &dyn crate::daemon::store::Store, name: &str) -> Option<bool> {
    store
        .get_member(name)
        .ok()
        .map(|m| m.is_some_and(|m| m.impersonate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_that_cannot_be_read_at_login_requires_impersonation() {
        use crate::daemon::store::{MemStore, Member, Store};
        let store = MemStore::default();
        let mut m = Member::new("alpha", "h".into(), 0);
        m.impersonate = true;
        assert!(store.create_member(&m).unwrap());
        assert!(store
            .create_member(&Member::new("beta", "h".into(), 0))
            .unwrap());
        assert_eq!(impersonation_at_login(&store, "alpha"), Some(true));
        assert_eq!(impersonation_at_login(&store, "beta"), Some(false));
        store
            .failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = impersonation_at_login(&store, "beta");
        assert_eq!(failed, None);
        assert!(failed.unwrap_or(true), "fails closed");
    }

    #[test]
    fn health_paths_are_told_from_other_requests() {
        let status = |head: &[u8]| not_an_upgrade(head, true).and_then(|a| a.status);
        assert_eq!(status(b"GET /healthz HTTP/1.1\r\n\r\n"), Some("200 OK"));
        assert_eq!(
            status(b"GET http://hub:80/readyz?x HTTP/1.1\r\n\r\n"),
            Some("200 OK")
        );
        assert_eq!(status(b"HEAD /livez HTTP/1.0\r\n\r\n"), Some("200 OK"));
        // A health path in a query is not one.
        assert_eq!(
            status(b"GET /x?u=http://h/healthz HTTP/1.1\r\n\r\n"),
            Some("426 Upgrade Required")
        );
        assert_eq!(
            status(b"GET /healthzz HTTP/1.1\r\n\r\n"),
            Some("426 Upgrade Required")
        );
        assert_eq!(
            status(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Some("405 Method Not Allowed")
        );
        let upgrade = b"GET /healthz HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n";
        assert!(not_an_upgrade(upgrade, true).is_none());
    }

    /// A token that could not be checked (the registry away) does not
    /// count toward its source's penalty: agents behind one address
    /// retrying through an outage were left unchecked for up to a minute.
    #[test]
    fn tokens_the_registry_could_not_check_are_not_counted_against_their_source() {
        use crate::tunnel::server::Penalty;
        let p = SourcePenalty {
            penalties: Arc::new(Penalties::default()),
            ip: "192.0.2.1".parse().unwrap(),
        };
        for _ in 0..20 {
            assert!(p.try_token());
            p.unchecked();
        }
        assert_eq!(p.penalties.blocked(p.ip), None);
        // Refusals still count.
        for _ in 0..Penalties::FREE + 1 {
            p.try_token();
        }
        assert!(p.penalties.blocked(p.ip).is_some());
    }
}
