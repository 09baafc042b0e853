//! The gateway: one HTTPS listener that serves every member by path (or by
//! TLS server name: see `route.rs`),
//! `https://hub:9443/clusters/<name>/<kubernetes path>`.
//!
//! Each request opens one tunnel channel and speaks HTTP/1.1 to the agent
//! over it. Bodies stream both ways as they come (watch, `logs -f`), and
//! HTTP/1.1 upgrades (exec, attach, port-forward; WebSocket or SPDY) are
//! spliced through once both sides have switched protocols.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::audit::{Audited, Record};
use super::hub::{Hub, LiveSession};
use super::store::Operator;
use super::targets::Target;
use crate::tunnel::{server, TARGET_APISERVER};

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Identity headers from the hub to the agent (never forwarded upstream).
pub const OPERATOR_HEADER: &str = "x-towerctl-operator";
pub const GROUPS_HEADER: &str = "x-towerctl-groups";
pub const IMPERSONATE_HEADER: &str = "x-towerctl-impersonate";

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// The tunnel channel a client connection last used, kept for its next
/// request. kubectl keeps its connection to the gateway alive, and HTTP/1.1
/// requests on one connection come one after another, so one channel per
/// client connection (per cluster) saves a tunnel round trip per request
/// without any shared pool or lock in the data path.
#[derive(Default)]
struct ChannelSlot(tokio::sync::Mutex<Option<(String, u64, Sender)>>);

impl ChannelSlot {
    async fn take(&self, name: &str, session: u64) -> Option<Sender> {
        let mut slot = self.0.lock().await;
        match slot.take() {
            Some((n, id, s)) if n == name && id == session && s.is_ready() => Some(s),
            _ => None,
        }
    }

    async fn put(&self, name: String, session: u64, s: Sender) {
        *self.0.lock().await = Some((name, session, s));
    }
}

/// A Kubernetes `Status` object, which kubectl prints as a readable error.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut r = Response::new(full(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
/// `Connection` and `Upgrade` are kept on upgrade requests.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        .unwrap_or(false)
        && headers.contains_key(header::UPGRADE)
}

/// Removes hop-by-hop headers (keeping the upgrade pair when upgrading).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| t != "upgrade")
        .collect();
    for n in named {
        headers.remove(n.as_str());
    }
    for h in HOP_BY_HOP {
        if upgrade && (*h == "connection" || *h == "upgrade") {
            continue;
        }
        headers.remove(*h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
}

/// Removes what an operator must never pass to a member: their own
/// credentials, and any identity they claim for themselves.
pub fn strip_identity(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let forged: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-") || k.as_str().starts_with("x-towerctl-"))
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Some((tcp, peer)) = super::accept_next(&listener, &cancel, "gateway").await {
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "gateway TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let slot = Arc::new(ChannelSlot::default());
            // The member this connection is for, when its TLS server name says so.
            let sni: Option<Arc<str>> =
                super::route::member_of_sni(tls.get_ref().1.server_name()).map(Arc::from);
            let svc = hyper::service::service_fn(move |req| {
                let (hub, slot, sni) = (hub.clone(), slot.clone(), sni.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(hub, &slot, req, peer, sni.as_deref()).await,
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(%peer, "gateway connection: {e}") },
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// The bearer token of a request: `Authorization`, or for CONNECT through
/// the gateway as a proxy, `Proxy-Authorization`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(header::AUTHORIZATION)
        .or_else(|| headers.get(header::PROXY_AUTHORIZATION))?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Splits `/clusters/<name>/<rest>` into the name and the upstream path.
pub fn route(path: &str) -> Option<(&str, String)> {
    let rest = path.strip_prefix("/clusters/")?;
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, format!("/{t}")),
        None => (rest, "/".to_string()),
    };
    (!name.is_empty()).then_some((name, tail))
}

fn ago(since: u64) -> String {
    let secs = super::control::now_unix().saturating_sub(since);
    let when = humanize(secs);
    format!("since {} ({when} ago)", crate::daemon::fmt_unix(since))
}

pub fn humanize(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Opens a new channel to the agent and an HTTP/1.1 connection over it.
async fn open_channel(
    session: &Arc<LiveSession>,
    name: &str,
    peer: SocketAddr,
) -> Result<Sender, Response<Body>> {
    let stream = server::open(&session.handle, TARGET_APISERVER, 443, peer).await.map_err(|e| {
        status_response(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &format!("cluster '{name}': the tunnel to its agent failed to open a stream ({e}); the agent may be reconnecting, retry in a few seconds"))
    })?;
    let stream = crate::tunnel::counted::Counted::new(
        stream,
        session.bytes_in.clone(),
        session.bytes_out.clone(),
    );
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("cluster '{name}': {e}"),
            )
        })?;
    let session = session.clone();
    session.streams.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("tunnel stream: {e}");
        }
        session.streams.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(sender)
}

fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// towerctl's own API on the gateway, for `towerctl login` and `use` on
/// operator machines. Everything but the CA needs an operator token.
const API: &str = "/towerctl/v1/";

async fn handle(
    hub: Arc<Hub>,
    slot: &ChannelSlot,
    req: Request<Incoming>,
    peer: SocketAddr,
    sni: Option<&str>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if sni.is_none() && (path == "/healthz" || path == "/readyz") {
        return Response::new(full(Bytes::from_static(b"ok")));
    }
    if path == "/towerctl/v1/ca.crt" {
        // Public: the client checks it against the hash it was given.
        return Response::new(full(Bytes::from(hub.ca_pem.clone())));
    }
    let Some(token) = bearer(req.headers()) else {
        return status_response(StatusCode::UNAUTHORIZED, "Unauthorized", "the towerctl gateway needs an operator bearer token: run 'towerctl use CLUSTER' to write a kubeconfig context that provides it");
    };
    let Some(operator) = hub.operator(token) else {
        return status_response(StatusCode::UNAUTHORIZED, "Unauthorized", "the operator token was not accepted by the towerctl gateway (unknown or revoked); run 'towerctl use CLUSTER' again on the hub machine");
    };
    if req.method() == http::Method::CONNECT {
        return connect(hub, req, peer, &operator).await;
    }
    if let Some(what) = path.strip_prefix(API) {
        return match what {
            "whoami" => {
                json_response(serde_json::json!({"name": operator.name, "groups": operator.groups}))
            }
            "clusters" => {
                json_response(serde_json::to_value(hub.cluster_statuses()).unwrap_or_default())
            }
            _ => status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no such towerctl API '{path}'"),
            ),
        };
    }
    let (name, upstream_path) = match super::route::pick(sni, &path) {
        Ok(r) => r,
        Err((code, reason, msg)) => return status_response(code, reason, &msg),
    };
    let start = std::time::Instant::now();
    let record = Record {
        time: super::fmt_unix(super::control::now_unix()),
        operator: operator.name.clone(),
        cluster: name.clone(),
        verb: super::audit::verb(req.method().as_str(), &upstream_path, req.uri().query())
            .to_string(),
        method: req.method().to_string(),
        path: match req.uri().query() {
            Some(q) => format!("{upstream_path}?{q}"),
            None => upstream_path.clone(),
        },
        status: 0,
        duration_ms: 0,
        bytes: 0,
    };
    let resp = proxy(&hub, slot, req, peer, &operator, name, upstream_path).await;
    let (parts, body) = resp.into_parts();
    let record = Record {
        status: parts.status.as_u16(),
        ..record
    };
    Response::from_parts(
        parts,
        Audited::new(body, record, start, hub.auditor.clone()).boxed_unsync(),
    )
}

fn text_response(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Reads the agent's one-line answer on a raw channel, byte by byte so
/// that nothing after it is consumed.
async fn read_status_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::with_capacity(64);
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= 4096 {
            return Err(std::io::Error::other("status line too long"));
        }
        line.push(b);
    }
}

/// HTTP CONNECT: a raw byte stream to a target in a member, named
/// `NAME.NS.svc.CLUSTER:PORT` (or `.pod.`, `.deploy.`, or `HOST.CLUSTER`),
/// subject to the agent's dial policy.
async fn connect(
    hub: Arc<Hub>,
    req: Request<Incoming>,
    peer: SocketAddr,
    operator: &Operator,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return text_response(StatusCode::BAD_REQUEST, "CONNECT needs HOST:PORT");
    };
    let Some(port) = authority.port_u16() else {
        return text_response(
            StatusCode::BAD_REQUEST,
            &format!("CONNECT '{authority}' has no port"),
        );
    };
    let Some((cluster, target)) = Target::from_connect_host(authority.host()) else {
        return text_response(StatusCode::BAD_REQUEST, &format!("cannot read a target from '{authority}': use NAME.NAMESPACE.svc.CLUSTER:PORT, NAME.NAMESPACE.pod.CLUSTER:PORT, NAME.NAMESPACE.deploy.CLUSTER:PORT or HOST.CLUSTER:PORT"));
    };
    let Some(session) = hub.session(&cluster) else {
        let (code, _, msg) = no_session(&hub, &cluster);
        return text_response(code, &msg);
    };
    let start = std::time::Instant::now();
    let mut stream = match server::open(
        &session.handle,
        &target.channel_address(),
        u32::from(port),
        peer,
    )
    .await
    {
        Ok(s) => crate::tunnel::counted::Counted::new(
            s,
            session.bytes_in.clone(),
            session.bytes_out.clone(),
        ),
        Err(e) => {
            hub.dial_failures
                .channel_refused
                .fetch_add(1, Ordering::Relaxed);
            return text_response(StatusCode::SERVICE_UNAVAILABLE, &format!("cluster '{cluster}': the agent refused the stream ({e}); it may be an older agent or reconnecting"));
        }
    };
    let answer =
        match tokio::time::timeout(Duration::from_secs(20), read_status_line(&mut stream)).await {
            Ok(Ok(l)) => l,
            _ => {
                hub.dial_failures
                    .agent_error
                    .fetch_add(1, Ordering::Relaxed);
                return text_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "cluster '{cluster}': the agent did not answer for {}",
                        target.describe()
                    ),
                );
            }
        };
    let mut record = Record {
        time: super::fmt_unix(super::control::now_unix()),
        operator: operator.name.clone(),
        cluster: cluster.clone(),
        verb: "connect".into(),
        method: "CONNECT".into(),
        path: authority.to_string(),
        status: 200,
        duration_ms: 0,
        bytes: 0,
    };
    if answer != super::agent::RAW_OK {
        let rest = answer.strip_prefix("ERR ").unwrap_or(&answer);
        let (code, msg) = rest.split_once(' ').unwrap_or(("dial_failed", rest));
        let status = match code {
            "denied" => {
                hub.dial_failures.denied.fetch_add(1, Ordering::Relaxed);
                StatusCode::FORBIDDEN
            }
            "not_found" => StatusCode::NOT_FOUND,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        if code != "denied" {
            hub.dial_failures
                .target_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        record.status = status.as_u16();
        record.duration_ms = start.elapsed().as_millis() as u64;
        hub.auditor.record(record);
        return text_response(status, &format!("cluster '{cluster}': {msg}"));
    }
    let auditor = hub.auditor.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => {
                // Counted on the client side: a connection that ends with an
                // error (a reset, as load tools do) still carried its bytes.
                let (rd, wr) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
                let mut client =
                    crate::tunnel::counted::Counted::new(TokioIo::new(up), rd.clone(), wr.clone());
                let _ = crate::tunnel::splice(&mut client, &mut stream).await;
                record.bytes = rd.load(Ordering::Relaxed) + wr.load(Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
        }
        record.duration_ms = start.elapsed().as_millis() as u64;
        auditor.record(record);
    });
    Response::new(full(Bytes::new()))
}

/// Why `name` has no live session — not connected (since when, or revoked)
/// or not registered — as a status code, a Kubernetes reason and a message;
/// counted in the dial-failure metrics. Shared by proxying and CONNECT.
fn no_session(hub: &Hub, name: &str) -> (StatusCode, &'static str, String) {
    match hub.store.get_member(name) {
        Ok(Some(m)) => {
            let msg = match hub.disconnected_since(name).or(m.last_seen) {
                _ if m.revoked => format!("cluster '{name}' is not connected: it was revoked on the hub (register it anew with 'towerctl cluster rm {name}' and 'towerctl cluster add {name}')"),
                Some(t) => format!("cluster '{name}' is not connected: its agent has been disconnected {}; check the agent with 'towerctl status' on the member", ago(t)),
                None => format!("cluster '{name}' is not connected: no agent has joined yet; run the command printed by 'towerctl cluster add {name}' in the member"),
            };
            hub.dial_failures
                .not_connected
                .fetch_add(1, Ordering::Relaxed);
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", msg)
        }
        _ => {
            hub.dial_failures
                .unknown_cluster
                .fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("cluster '{name}' is not registered on this hub; register it with 'towerctl cluster add {name}'"),
            )
        }
    }
}

/// Carries one request to the member and its response back.
async fn proxy(
    hub: &Hub,
    slot: &ChannelSlot,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    operator: &Operator,
    name: String,
    upstream_path: String,
) -> Response<Body> {
    let Some(session) = hub.session(&name) else {
        let (code, reason, msg) = no_session(hub, &name);
        return status_response(code, reason, &msg);
    };

    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
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
    if !operator.groups.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&operator.groups.join(",")) {
            parts.headers.insert(GROUPS_HEADER, v);
        }
    }
    if session.impersonate {
        parts
            .headers
            .insert(IMPERSONATE_HEADER, HeaderValue::from_static("1"));
    }
    let up_req = Request::from_parts(parts, body);

    // An upgraded connection is spliced for good: it gets its own channel.
    let reused = if upgrade {
        None
    } else {
        slot.take(&name, session.id).await
    };
    let was_reused = reused.is_some();
    let mut sender = match reused {
        Some(s) => s,
        None => match open_channel(&session, &name, peer).await {
            Ok(s) => s,
            Err(resp) => {
                hub.dial_failures
                    .channel_refused
                    .fetch_add(1, Ordering::Relaxed);
                return resp;
            }
        },
    };
    let mut resp = match sender.try_send_request(up_req).await {
        Ok(r) => r,
        Err(mut e) => match (was_reused, e.take_message()) {
            // The reused channel was closed under us before the request
            // went out: safe to send it again on a fresh one, whatever its
            // method.
            (true, Some(up_req)) => {
                sender = match open_channel(&session, &name, peer).await {
                    Ok(s) => s,
                    Err(resp) => {
                        hub.dial_failures
                            .channel_refused
                            .fetch_add(1, Ordering::Relaxed);
                        return resp;
                    }
                };
                match sender.send_request(up_req).await {
                    Ok(r) => r,
                    Err(e) => {
                        hub.dial_failures
                            .agent_error
                            .fetch_add(1, Ordering::Relaxed);
                        return status_response(
                            StatusCode::BAD_GATEWAY,
                            "BadGateway",
                            &format!("cluster '{name}': the agent did not answer: {e}"),
                        );
                    }
                }
            }
            _ => {
                hub.dial_failures
                    .agent_error
                    .fetch_add(1, Ordering::Relaxed);
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "BadGateway",
                    &format!("cluster '{name}': the agent did not answer: {}", e.error()),
                );
            }
        },
    };
    if !upgrade {
        slot.put(name.clone(), session.id, sender).await;
    }
    finish_upgrade(client_upgrade, &mut resp);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync())
}

/// When the upstream switched protocols (exec, attach, port-forward), splices
/// the client's upgraded connection to the upstream's once both are ready.
/// Shared by the gateway and the agent, the two HTTP hops of the tunnel.
pub fn finish_upgrade<B>(client: Option<hyper::upgrade::OnUpgrade>, resp: &mut Response<B>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let Some(client) = client else { return };
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((a, b)) => {
                let _ = crate::tunnel::splice(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            }
            Err(e) => tracing::debug!("upgrade failed: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path() {
        assert_eq!(
            route("/clusters/alpha/api/v1/nodes"),
            Some(("alpha", "/api/v1/nodes".to_string()))
        );
        assert_eq!(route("/clusters/alpha"), Some(("alpha", "/".to_string())));
        assert_eq!(route("/clusters/"), None);
        assert_eq!(route("/api/v1"), None);
    }

    #[test]
    fn strips_credentials_and_forged_identity() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer op"));
        h.insert("impersonate-user", HeaderValue::from_static("root"));
        h.insert(
            "impersonate-group",
            HeaderValue::from_static("system:masters"),
        );
        h.insert("impersonate-extra-x", HeaderValue::from_static("y"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        strip_identity(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn keeps_upgrade_headers_only_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, X-Hop"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        assert!(is_upgrade(&h));
        let mut up = h.clone();
        strip_hop_by_hop(&mut up, true);
        assert!(
            up.contains_key("upgrade")
                && up.contains_key("connection")
                && !up.contains_key("x-hop")
        );
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }
}
