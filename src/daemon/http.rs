//! HTTP rules shared by both hops of the tunnel (the hub's gateway and the
//! agent's upstream proxy): the body type, Kubernetes `Status` answers,
//! hop-by-hop and identity header rules, and the upgrade splice.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Identity headers from the hub to the agent (never forwarded upstream).
/// Names, not strings: a string is parsed into a name (and copied) each
/// time it is inserted.
pub const OPERATOR_HEADER: HeaderName = HeaderName::from_static("x-towerctl-operator");
pub const GROUPS_HEADER: HeaderName = HeaderName::from_static("x-towerctl-groups");
pub const IMPERSONATE_HEADER: HeaderName = HeaderName::from_static("x-towerctl-impersonate");

/// A Kubernetes `Status` object, which kubectl prints as a readable error.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(status_json(code, reason, message))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `resp` with `Retry-After: SECS`: for refusals of towerctl's own that a
/// moment may lift (the agent reconnecting, a budget full), made before
/// anything reached the member. client-go retries a 5xx only when the
/// answer says when (up to 10 times); without it, Helm or Argo CD failed
/// at once.
pub fn retry_after(mut resp: Response<Body>, secs: u32) -> Response<Body> {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// The JSON of a failed Kubernetes `Status`.
/// `resp`, an error answered as a JSON `Status` of at most 64 KiB, as
/// `text/plain` with the Status's message: client-go's discovery shows
/// an error's words only from a text answer (else "unknown"). Anything
/// else is returned as it is.
pub async fn status_as_text(resp: Response<Body>) -> Response<Body> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let small = resp
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= 64 * 1024);
    if !json || !small {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = body.collect().await.map(|c| c.to_bytes()) else {
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, full(Bytes::new()));
    };
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .filter(|v| v["kind"] == "Status")
        .and_then(|v| v["message"].as_str().map(str::to_string));
    let Some(message) = message else {
        return Response::from_parts(parts, full(bytes));
    };
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, full(Bytes::from(message)))
}

pub fn status_json(code: StatusCode, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
    .to_string()
}

/// Writes `answer` to a connection that is not served further (a refusal
/// before any HTTP server took it) and closes its sending side, then reads
/// what the client still sends for a moment (up to 16 KiB, 1 s), so that
/// closing with it unread does not reset the connection under the answer.
/// Errors are the client's to see; the caller bounds the whole.
pub async fn answer_and_close<S>(io: &mut S, answer: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.write_all(answer).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    let mut rest = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut left = 16 * 1024usize;
        while left > 0 {
            match io.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// `path` followed by `url`'s query and fragment, as written in `url`.
pub fn with_query_and_fragment(mut path: String, url: &url::Url) -> String {
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    if let Some(f) = url.fragment() {
        path.push('#');
        path.push_str(f);
    }
    path
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

/// Whether the request's `Transfer-Encoding`, if any, is `chunked` alone.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .all(|t| t.eq_ignore_ascii_case(b"chunked"))
}

/// Header lines a message may have on the hub–agent and agent–API server
/// legs (hyper's default is 100: an operator with many groups, one line
/// each, got 431 from its own agent, and an answer with many `Warning`
/// lines a 502 after the write was done).
pub const MAX_HEADER_LINES: usize = 512;

/// Every `Connection` line counts (`Connection: keep-alive` and
/// `Connection: Upgrade` on two lines is one upgrade, as Go reads it: read
/// from the first alone, an exec through such a proxy lost its `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && headers.contains_key(header::UPGRADE)
}

/// Removes hop-by-hop headers (keeping the upgrade pair when upgrading).
/// One pass over the names: most requests carry none of these, and then
/// nothing is looked up or removed (this runs twice for every request).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Headers named in `Connection` are hop-by-hop too.
    // Never a header the gateway vouches for: `Connection:
    // x-forwarded-for` dropped the address the hub had appended.
    let named: Vec<String> = connection_tokens(headers)
        .filter(|t| t != "upgrade" && t != X_FORWARDED_FOR.as_str())
        .collect();
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            let kept = upgrade && (k == "connection" || k == "upgrade");
            (HOP_BY_HOP.contains(&k) && !kept) || named.iter().any(|n| n == k)
        })
        .cloned()
        .collect();
    for k in doomed {
        headers.remove(k);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
}

/// Whether kube-apiserver treats the request as long-running (its
/// `LongRunningRequestCheck`): watches, `proxy`, and the `attach`, `exec`,
/// `log` and `portforward` subresources (and any upgrade). Those may take
/// as long as they like to answer.
pub fn long_running(path: &str, query: Option<&str>, upgrade: bool) -> bool {
    if upgrade {
        return true;
    }
    let watch = query_flag(query, "watch") || query_flag(query, "follow");
    watch || long_running_subresource(path)
}

/// Whether `path` names a long-running subresource (`…/pods/NAME/log`,
/// `…/services/NAME/proxy/…`, `…/nodes/NAME/proxy`), read as
/// kube-apiserver reads it: the segment after a resource's name, not any
/// segment of that spelling (a namespace named `log`, a ConfigMap named
/// `exec` lost the answer deadline).
pub fn long_running_subresource(path: &str) -> bool {
    // Read segment by segment (once per API request: no list built).
    let mut segs = path.trim_start_matches('/').split('/');
    // /api/v1/… or /apis/GROUP/VERSION/…
    let version_segments = match segs.next() {
        Some("api") => 1,
        Some("apis") => 2,
        _ => return false,
    };
    for _ in 0..version_segments {
        segs.next();
    }
    // `watch` and `proxy` as verbs, right after the version (the legacy
    // `/api/v1/watch/…`, `/api/v1/proxy/…`); then
    // namespaces/NS/RESOURCE/NAME/SUB, or RESOURCE/NAME/SUB for a
    // cluster-scoped resource (namespaces itself: namespaces/NAME/SUB).
    let sub = match segs.next() {
        Some("watch" | "proxy") => return true,
        Some("namespaces") => match (segs.next(), segs.next(), segs.next(), segs.next()) {
            (Some(_ns), Some(_res), Some(_name), Some(sub)) => Some(sub),
            (Some(_name), Some(sub), None, None) => Some(sub),
            _ => None,
        },
        Some(_res) => segs.nth(1),
        None => None,
    };
    matches!(
        sub,
        Some("proxy" | "attach" | "exec" | "log" | "portforward")
    )
}

/// `fut` within `deadline`, or for as long as it takes without one.
pub async fn within<F: std::future::Future>(
    deadline: Option<std::time::Duration>,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(d) => tokio::time::timeout(d, fut).await,
        None => Ok(fut.await),
    }
}

/// The `timeout` a request asks for (`?timeout=1m30s`, Go's duration
/// syntax in whole units), if it parses.
pub fn asked_timeout(query: Option<&str>) -> Option<std::time::Duration> {
    let v = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))?;
    let mut total = 0u64;
    let mut num = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        // Checked: the query is the client's (`timeout=18446744073709551615s1s`
        // wrapped past zero, and overflowed the wait below into a panic).
        total = total.checked_add(match c {
            'h' => n.checked_mul(3600)?,
            'm' => n.checked_mul(60)?,
            's' => n,
            _ => return None,
        })?;
    }
    (num.is_empty() && total > 0).then(|| std::time::Duration::from_secs(total))
}

/// The first header under `prefix` that `Connection` names (so that a hop
/// removes it), if any.
pub fn connection_names(headers: &HeaderMap, prefix: &str) -> Option<String> {
    connection_tokens(headers).find(|t| t.starts_with(prefix))
}

/// The tokens of every `Connection` header, lower case, empty ones left out.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Removes from a member's answer what describes its own hop and what
/// would act on the hub's whole origin, which every member shares (one
/// member's `Set-Cookie` or `Strict-Transport-Security` would apply to
/// the others' requests in a browser; `Alt-Svc`, `Refresh` and `Link`
/// would send clients elsewhere, off the hub too; a `WWW-Authenticate`
/// would have a browser prompt for credentials in the hub's name;
/// `Clear-Site-Data` would wipe what a browser keeps for the whole hub), and
/// the hub's own `x-towerctl-*` names. Kubernetes clients use none of
/// these. (`Location` and `Content-Location` are kept on the member:
/// [`confine_location`].)
pub fn strip_response(headers: &mut HeaderMap, upgrade: bool) {
    framed_by_transfer_encoding(headers);
    strip_hop_by_hop(headers, upgrade);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            matches!(
                k,
                "set-cookie"
                    | "strict-transport-security"
                    | "alt-svc"
                    | "refresh"
                    | "link"
                    | "www-authenticate"
                    | "clear-site-data"
            ) || k.starts_with("x-towerctl-")
        })
        .cloned()
        .collect();
    for k in doomed {
        headers.remove(k);
    }
}

/// An answer with both `Transfer-Encoding` and `Content-Length` is framed
/// by the first (RFC 9112 §6.3), and a proxy drops the second: kept, a
/// member's 17-byte chunked answer claiming 5 bytes was written on with a
/// length its body did not have, and the stream broke ("the agent did
/// not answer").
pub fn framed_by_transfer_encoding(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Keeps a member's redirect on that member. A member's `Location` is
/// resolved against the path the member was asked for, as a client would
/// (dot segments removed: a member cannot climb above its own root), and
/// handed on under the member's prefix, `/clusters/<member>/…`, which
/// routes back to it whether the client names members by path or by TLS
/// server name. A `Location` with another scheme or host is removed (the
/// status stays): a client following it (Go's, client-go's) would carry
/// the operator's hub credentials to wherever a member points, and a
/// member's own address means nothing to a client of the hub. Before, a
/// member answering `307 Location: /clusters/<other>/…` had a following
/// client repeat its request, body and credentials, on another member.
/// `Content-Location` (which a browser may take for the address of what
/// it shows) is kept on the member the same way.
pub fn confine_location(headers: &mut HeaderMap, member: &str, asked: &str) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(location) = headers.get(&name) else {
            continue;
        };
        let confined = location
            .to_str()
            .ok()
            .and_then(|l| confined_location(member, asked, l))
            .and_then(|c| HeaderValue::from_str(&c).ok());
        match confined {
            Some(v) => {
                headers.insert(name, v);
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

/// [`confine_location`]'s rewrite of `location`, from a member asked for
/// `asked` (path and query); `None` when it leaves the member.
fn confined_location(member: &str, asked: &str, location: &str) -> Option<String> {
    // A stand-in origin for the member: what resolves outside it names
    // another place.
    const ORIGIN: &str = "http://member.invalid";
    let base = url::Url::parse(ORIGIN).ok()?.join(asked).ok()?;
    let to = base.join(location).ok()?;
    if to.origin() != base.origin() || !to.username().is_empty() || to.password().is_some() {
        return None;
    }
    Some(with_query_and_fragment(
        format!("/clusters/{member}{}", to.path()),
        &to,
    ))
}

/// Removes what an operator must never pass to a member: their own
/// credentials, and any identity they claim for themselves, including the
/// front-proxy headers (`X-Remote-User`, `-Group`, `-Extra-*`, kube-apiserver's
/// `--requestheader-*` defaults) that an API server believes when the agent
/// authenticates with a front-proxy client certificate.
pub fn strip_identity(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            *k == header::AUTHORIZATION || *k == header::COOKIE || {
                // With `_` for `-` too (`Impersonate_User`): a proxy or
                // gateway that folds one into the other (CGI-style) would
                // read it as the header it resembles.
                let k = k.as_str();
                let claims = |prefix: &str| {
                    k.len() >= prefix.len()
                        && k.bytes()
                            .zip(prefix.bytes())
                            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
                };
                claims("impersonate-") || claims("x-towerctl-") || claims("x-remote-")
            }
        })
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
    // A WebSocket's bearer token named as a subprotocol: the other
    // subprotocols go on, the token never.
    if headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| {
            v.as_bytes()
                .windows(WS_BEARER_PROTOCOL.len())
                .any(|w| w.eq_ignore_ascii_case(WS_BEARER_PROTOCOL.as_bytes()))
        })
    {
        let kept: Vec<String> = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| {
                !p.is_empty()
                    && !p
                        .get(..WS_BEARER_PROTOCOL.len())
                        .is_some_and(|h| h.eq_ignore_ascii_case(WS_BEARER_PROTOCOL))
            })
            .map(str::to_string)
            .collect();
        headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            if !kept.is_empty() {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
    }
}

/// The WebSocket subprotocol prefix a client names its bearer token in
/// when it cannot set `Authorization` (kube-apiserver's convention).
pub const WS_BEARER_PROTOCOL: &str = "base64url.bearer.authorization.k8s.io.";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// A client's address as an `X-Forwarded-For` value, made once per
/// connection for [`append_forwarded_for`].
pub fn forwarded_value(peer: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds the client's address (`ip`, from [`forwarded_value`]) to
/// `X-Forwarded-For`, after any addresses the client sent, as proxies do:
/// the member's audit log lists every address in it (`sourceIPs`), so a
/// client could otherwise have its requests logged under an address of its
/// choosing, with nothing to show the one it came from. An oversized chain
/// (over 1 KiB) is replaced by the address alone. A client's own
/// `X-Real-Ip`, which the member's audit log lists too, is removed:
/// nothing vouches for it.
pub fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    const MAX_CHAIN: usize = 1024;
    if headers.contains_key(X_REAL_IP) {
        headers.remove(X_REAL_IP);
    }
    if !headers.contains_key(X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR, ip.clone());
        return;
    }
    let sent: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let ip_str = ip.to_str().unwrap_or("unknown");
    let mut chain = sent.join(", ");
    if chain.is_empty() || chain.len() > MAX_CHAIN {
        chain = ip_str.to_string();
    } else {
        chain = format!("{chain}, {ip_str}");
    }
    headers.remove(X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

pub fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn text_response(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// When the upstream switched protocols (exec, attach, port-forward), splices
/// the client's upgraded connection to the upstream's once both are ready.
/// Shared by the gateway and the agent, the two HTTP hops of the tunnel. The
/// splice is owned by `tasks`, so shutdown waits for it.
///
/// `keep` lives as long as the splice (the gateway's stream registration),
/// and the splice ends when `stop` fires (access revoked).
/// `bytes`, if given, counts what crosses the splice in both directions
/// as it goes (the audit's end record of an exec or port-forward reads
/// it, also when the stream is cut).
pub fn finish_upgrade<B, K: Send + 'static>(
    tasks: &TaskTracker,
    client: Option<hyper::upgrade::OnUpgrade>,
    resp: &mut Response<B>,
    stop: CancellationToken,
    keep: K,
    bytes: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let Some(client) = client else { return };
    let upstream = hyper::upgrade::on(resp);
    tasks.spawn(async move {
        let _keep = keep;
        let splice = async {
            match tokio::try_join!(client, upstream) {
                Ok((a, b)) => {
                    let mut b = TokioIo::new(b);
                    match bytes {
                        Some(n) => {
                            let mut a =
                                crate::tunnel::counted::Counted::new(TokioIo::new(a), n.clone(), n);
                            let _ = crate::tunnel::splice(&mut a, &mut b).await;
                        }
                        None => {
                            let _ = crate::tunnel::splice(&mut TokioIo::new(a), &mut b).await;
                        }
                    }
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        };
        tokio::select! {
            _ = splice => {}
            _ = stop.cancelled() => tracing::info!("an upgraded stream was cut: access revoked"),
        }
    });
}

/// A response body that keeps `keep` alive as long as it lives (a stream
/// registration, an in-flight token, an [`OnDrop`]) and, given `stop`,
/// ends with an error as soon as it fires (its operator lost access).
pub struct Guarded<K: Send + Unpin + 'static> {
    inner: Body,
    stop: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    /// For a JSON watch: the `ERROR` event sent when `stop` fires, after
    /// which the stream ends cleanly ([`Self::with_farewell`]).
    farewell: Option<Bytes>,
    /// For a JSON watch: the `ERROR` event sent in place of the inner
    /// body's error, after which the stream ends cleanly
    /// ([`Self::with_broken_farewell`]).
    broken: Option<Bytes>,
    _keep: K,
    /// Never says it ended before it was polled to its end ([`Self::kept_to_the_end`]).
    kept_to_the_end: bool,
    /// Whether the data passed on so far ends a line (or there is none):
    /// a farewell goes only there. In the middle of an event, client-go's
    /// decoder read it as part of that event (a syntax error, or nothing
    /// said).
    at_line_end: bool,
}

impl<K: Send + Unpin + 'static> Guarded<K> {
    pub fn new(inner: Body, stop: Option<CancellationToken>, keep: K) -> Guarded<K> {
        Guarded {
            inner,
            stop: stop.map(|s| Box::pin(s.cancelled_owned())),
            farewell: None,
            broken: None,
            _keep: keep,
            kept_to_the_end: false,
            at_line_end: true,
        }
    }

    /// A JSON watch cut by `stop` ends with an `ERROR` event carrying a
    /// Status with `message` (reason Forbidden), as kube-apiserver ends a
    /// watch it cannot go on with: `kubectl get -w` prints it (and exits
    /// 0, as for any watch that ends). A reset stream ended it with no
    /// word.
    pub fn with_farewell(mut self, message: &str) -> Self {
        self.farewell = Some(watch_error_event(
            StatusCode::FORBIDDEN,
            "Forbidden",
            message,
        ));
        self
    }

    /// A JSON watch whose inner body fails (the tunnel under it closed:
    /// the agent disconnected or left, the member was removed, or the
    /// member's end broke) ends with an `ERROR` event carrying a
    /// ServiceUnavailable Status with `message`, then cleanly: `kubectl
    /// get -w` prints it, where a broken stream ended it with no word. A
    /// watch its member ends (a server's `timeoutSeconds`) ends as before.
    pub fn with_broken_farewell(mut self, message: &str) -> Self {
        self.broken = Some(watch_error_event(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        ));
        self
    }

    /// Keeps `keep` until the client's flow control took the last data:
    /// HTTP/2 (hyper over h2) drops a body as soon as its last chunk is
    /// queued with the end of the stream, however long the client's window
    /// keeps that chunk in the hub; said not ended, the body is polled
    /// once more, for its end, only when the stream has room again.
    pub fn kept_to_the_end(mut self) -> Self {
        self.kept_to_the_end = true;
        self
    }
}

impl<K: Send + Unpin + 'static> http_body::Body for Guarded<K> {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(stop) = self.stop.as_mut() {
            if stop.as_mut().poll(cx).is_ready() {
                let boundary = self.at_line_end;
                if let Some(last) = self.farewell.take().filter(|_| boundary) {
                    // Said once, then the end: the inner body is not read
                    // again.
                    self.inner = full(Bytes::new());
                    self.stop = None;
                    return Poll::Ready(Some(Ok(http_body::Frame::data(last))));
                }
                return Poll::Ready(Some(Err("access revoked: the stream was cut".into())));
            }
        }
        let boundary = self.at_line_end;
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Only a body with a farewell to say looks (every proxied
                // answer is one of these).
                if self.farewell.is_some() || self.broken.is_some() {
                    if let Some(last) = frame.data_ref().and_then(|d| d.last()) {
                        self.at_line_end = *last == b'\n';
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => match self.broken.take().filter(|_| boundary) {
                Some(last) => {
                    tracing::debug!("a watch's stream broke, ended with an ERROR event: {e}");
                    self.inner = full(Bytes::new());
                    self.stop = None;
                    self.farewell = None;
                    Poll::Ready(Some(Ok(http_body::Frame::data(last))))
                }
                None => Poll::Ready(Some(Err(e))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.kept_to_the_end && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A watch event of type `ERROR` carrying a Status, as a line (sent only
/// where one ended: [`Guarded`]'s `at_line_end`).
fn watch_error_event(code: StatusCode, reason: &str, message: &str) -> Bytes {
    let event = serde_json::json!({
        "type": "ERROR",
        "object": serde_json::from_str::<serde_json::Value>(&status_json(code, reason, message))
            .unwrap_or_default(),
    });
    Bytes::from(format!("{event}\n"))
}

/// Calls its function once, when dropped.
pub struct OnDrop<F: FnOnce() + Send + Unpin>(pub Option<F>);

impl<F: FnOnce() + Send + Unpin> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Idle HTTP/1.1 client connections kept for their next requests, each
/// with what it was kept for (`K`). Shared by the gateway's per-connection
/// tunnel channels and the connections between hubs: closed ones are
/// dropped, busy ones (still carrying a response) are skipped, the most
/// recently kept is taken first, and past `max` a busy one is let go before
/// a ready one (it closes once its response is done).
pub struct KeptConns<B, K> {
    conns: Vec<(hyper::client::conn::http1::SendRequest<B>, K)>,
    max: usize,
}

impl<B, K> KeptConns<B, K> {
    pub fn new(max: usize) -> Self {
        KeptConns {
            conns: Vec::new(),
            max,
        }
    }

    /// Drops the closed connections and those whose `K` says they are no
    /// longer worth keeping.
    pub fn prune(&mut self, worth: impl Fn(&K) -> bool) {
        self.conns.retain(|(s, k)| !s.is_closed() && worth(k));
    }

    /// A ready connection kept for what `wanted` accepts, taken out.
    pub fn take(
        &mut self,
        wanted: impl Fn(&K) -> bool,
    ) -> Option<hyper::client::conn::http1::SendRequest<B>> {
        self.take_kept(wanted).map(|(s, _)| s)
    }

    /// [`KeptConns::take`], with what the connection was kept for.
    pub fn take_kept(
        &mut self,
        wanted: impl Fn(&K) -> bool,
    ) -> Option<(hyper::client::conn::http1::SendRequest<B>, K)> {
        let i = self
            .conns
            .iter()
            .rposition(|(s, k)| s.is_ready() && wanted(k))?;
        Some(self.conns.remove(i))
    }

    /// Keeps `s` (unless it has closed already).
    pub fn put(&mut self, s: hyper::client::conn::http1::SendRequest<B>, k: K) {
        if s.is_closed() {
            return;
        }
        if self.conns.len() >= self.max {
            let i = self
                .conns
                .iter()
                .position(|(s, _)| !s.is_ready())
                .unwrap_or(0);
            self.conns.remove(i);
        }
        self.conns.push((s, k));
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Whether the boolean query parameter `name` is on, as kube-apiserver
/// reads it (`url.Values` then `Convert_Slice_string_To_bool`): keys and
/// values percent-decoded, the first value counts, and anything but `0`
/// or `false` (any case) is true, an empty value too. So `?watch=yes`,
/// `?watch=TRUE`, `?%77atch=1` and `?watch` are watches to the API server;
/// read any other way, the hub recorded such a watch as a `list`, written
/// only when it ended (review finding).
pub fn query_flag(query: Option<&str>, name: &str) -> bool {
    let Some(q) = query else { return false };
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .is_some_and(|(_, v)| v != "0" && !v.eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    /// A watch whose inner body breaks ends with one ServiceUnavailable
    /// `ERROR` event and then cleanly; one that ends cleanly gets none.
    #[tokio::test]
    async fn a_broken_watch_ends_with_an_error_event_and_a_clean_one_without() {
        use http_body_util::BodyExt;
        let body = |broken: bool| -> super::Body {
            let frames: Vec<
                Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
            > = if broken {
                vec![
                    Ok(http_body::Frame::data(Bytes::from_static(
                        b"{\"type\":\"ADDED\"}\n",
                    ))),
                    Err("connection closed before message completed".into()),
                ]
            } else {
                vec![Ok(http_body::Frame::data(Bytes::from_static(
                    b"{\"type\":\"ADDED\"}\n",
                )))]
            };
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
        };
        for broken in [true, false] {
            let g = super::Guarded::new(body(broken), None, ()).with_broken_farewell("gone away");
            let all = g.collect().await.expect("ends cleanly").to_bytes();
            let text = String::from_utf8_lossy(&all).to_string();
            // No blank line: the Python client hands one to its caller as a
            // `None` event (kube-apiserver never sends one).
            let lines: Vec<&str> = text.lines().collect();
            assert!(!lines.contains(&""), "a blank line in {text:?}");
            if broken {
                assert_eq!(lines.len(), 2, "{text}");
                let ev: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
                assert_eq!(ev["type"], "ERROR");
                assert_eq!(ev["object"]["code"], 503);
                assert_eq!(ev["object"]["reason"], "ServiceUnavailable");
                assert_eq!(ev["object"]["message"], "gone away");
            } else {
                assert_eq!(lines, ["{\"type\":\"ADDED\"}"], "{text}");
            }
        }
        // Without the farewell, the error is passed on.
        let g = super::Guarded::new(body(true), None, ());
        assert!(g.collect().await.is_err());
        // So it is when the stream broke inside an event: the farewell
        // would have been read as part of it.
        let frames: Vec<Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(
                b"{\"type\":\"ADDED\",\"obj",
            ))),
            Err("connection closed before message completed".into()),
        ];
        let cut =
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let g = super::Guarded::new(cut, None, ()).with_broken_farewell("gone away");
        assert!(g.collect().await.is_err());
    }

    /// `Connection` on two lines is read whole; a coding besides `chunked`
    /// is told apart.
    #[test]
    fn upgrades_on_several_connection_lines_and_codings() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(super::is_upgrade(&h));
        h.remove(header::UPGRADE);
        assert!(!super::is_upgrade(&h));
        let te = |v: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in v {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            super::only_chunked(&h)
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["gzip", "chunked"]));
    }

    #[test]
    fn a_members_redirects_stay_on_that_member() {
        let at = |location: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
            confine_location(&mut h, "alpha", "/api/v1/namespaces/default/pods?watch=1");
            h.get(header::LOCATION)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let within = |l: &str, want: &str| assert_eq!(at(l).as_deref(), Some(want), "{l}");
        within("/api/v1/pods", "/clusters/alpha/api/v1/pods");
        within(
            "/clusters/beta/api/v1/secrets",
            "/clusters/alpha/clusters/beta/api/v1/secrets",
        );
        within(
            "services?x=1#f",
            "/clusters/alpha/api/v1/namespaces/default/services?x=1#f",
        );
        within(
            "../../../../../clusters/beta/api",
            "/clusters/alpha/clusters/beta/api",
        );
        within("/%2e%2e/clusters/beta", "/clusters/alpha/clusters/beta");
        within("", "/clusters/alpha/api/v1/namespaces/default/pods?watch=1");
        within("http://member.invalid/x", "/clusters/alpha/x");
        for gone in [
            "https://evil.example/steal",
            "//evil.example/steal",
            "/\\evil.example/steal",
            "http://member.invalid:8080/x",
            "https://member.invalid/x",
            "http://user@member.invalid/x",
            "javascript:alert(1)",
        ] {
            assert_eq!(at(gone), None, "{gone}");
        }
        let mut none = HeaderMap::new();
        confine_location(&mut none, "alpha", "/api");
        assert!(none.is_empty());
        // Content-Location too.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_LOCATION,
            HeaderValue::from_static("/clusters/beta/x"),
        );
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("https://evil.example/"),
        );
        confine_location(&mut h, "alpha", "/api");
        assert_eq!(h.get(header::LOCATION), None);
        assert_eq!(
            h.get(header::CONTENT_LOCATION).unwrap(),
            "/clusters/alpha/clusters/beta/x"
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_LOCATION,
            HeaderValue::from_static("//evil.example/x"),
        );
        confine_location(&mut h, "alpha", "/api");
        assert!(h.is_empty());
    }

    #[test]
    fn a_members_answer_loses_its_hop_and_origin_wide_headers() {
        use super::*;
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("set-cookie", "s=1; Domain=127.0.0.1; Path=/"),
            ("strict-transport-security", "max-age=1; includeSubDomains"),
            ("alt-svc", "h3=\":443\""),
            ("refresh", "0; url=https://evil.example/"),
            ("clear-site-data", "\"*\""),
            ("link", "<https://evil.example/>; rel=preload"),
            (
                "www-authenticate",
                "Basic realm=\"towerctl hub: enter your token\"",
            ),
            ("x-towerctl-operator", "admin"),
            ("content-type", "application/json"),
            ("audit-id", "abc"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_response(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["audit-id", "content-type"]);
        // An upgrade's answer keeps what makes it one.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-accept", HeaderValue::from_static("x"));
        strip_response(&mut h, true);
        assert_eq!(h.len(), 3);
    }

    use super::*;

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
        h.insert("x-remote-user", HeaderValue::from_static("root"));
        h.insert("x-remote-group", HeaderValue::from_static("system:masters"));
        h.insert("x-remote-extra-scopes", HeaderValue::from_static("all"));
        // Underscores for dashes: what a CGI-style hop would fold.
        h.insert("impersonate_user", HeaderValue::from_static("root"));
        h.insert("x_remote_group", HeaderValue::from_static("system:masters"));
        h.insert("x-remote_user", HeaderValue::from_static("root"));
        h.insert("x_towerctl_operator", HeaderValue::from_static("admin"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        h.insert("x-request_id", HeaderValue::from_static("kept"));
        strip_identity(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-request_id"));
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn the_client_address_is_appended_to_what_the_client_sent() {
        let ip = forwarded_value("192.0.2.7".parse().unwrap());
        // Nothing sent: the address alone; a client's X-Real-Ip goes.
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["192.0.2.7"]
        );
        assert!(!h.contains_key("x-real-ip"));
        // A chain sent in two header lines: kept, in order, ours last.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.1, 10.0.0.2"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static(" 10.0.0.3 "));
        append_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"]
        );
        // Oversized or empty: the address alone.
        for sent in ["1".repeat(2000), String::new()] {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_str(&sent).unwrap());
            append_forwarded_for(&mut h, &ip);
            assert_eq!(
                h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
                ["192.0.2.7"]
            );
        }
        // An IPv4-mapped IPv6 peer is written as IPv4.
        let v = forwarded_value("::ffff:192.0.2.9".parse().unwrap());
        assert_eq!(v, "192.0.2.9");
    }

    #[test]
    fn hop_by_hop_headers_go_and_others_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Named, x-forwarded-for"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-named", HeaderValue::from_static("1"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "x-forwarded-for"]);
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

    #[test]
    fn a_header_named_in_connection_is_found_whatever_its_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert_eq!(super::connection_names(&h, "impersonate-"), None);
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close,  Impersonate-User"),
        );
        assert_eq!(
            super::connection_names(&h, "impersonate-").as_deref(),
            Some("impersonate-user")
        );
    }
}
