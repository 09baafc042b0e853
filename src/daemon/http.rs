//! HTTP rules shared by both hops of the tunnel (the hub's gateway and the
//! agent's upstream proxy): the body type, Kubernetes `Status` answers,
//! hop-by-hop and identity header rules, and the upgrade splice.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Identity headers from the hub to the agent (never forwarded upstream).
pub const OPERATOR_HEADER: &str = "x-towerctl-operator";
pub const GROUPS_HEADER: &str = "x-towerctl-groups";
pub const IMPERSONATE_HEADER: &str = "x-towerctl-impersonate";

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
        // Never a header the gateway vouches for: `Connection:
        // x-forwarded-for` dropped the address the hub had appended.
        .filter(|t| t != "upgrade" && t != "x-forwarded-for")
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
/// credentials, and any identity they claim for themselves, including the
/// front-proxy headers (`X-Remote-User`, `-Group`, `-Extra-*`, kube-apiserver's
/// `--requestheader-*` defaults) that an API server believes when the agent
/// authenticates with a front-proxy client certificate.
pub fn strip_identity(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let forged: Vec<_> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("impersonate-")
                || k.starts_with("x-towerctl-")
                || k.starts_with("x-remote-")
        })
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
}

/// Adds the client's address to `X-Forwarded-For`, after any addresses
/// the client sent, as proxies do: the member's audit log lists every
/// address in it (`sourceIPs`), so a client could otherwise have its
/// requests logged under an address of its choosing, with nothing to show
/// the one it came from. An oversized chain (over 1 KiB) is replaced by
/// the address alone. A client's own `X-Real-Ip`, which the member's audit
/// log lists too, is removed: nothing vouches for it.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: std::net::IpAddr) {
    const MAX_CHAIN: usize = 1024;
    headers.remove("x-real-ip");
    let sent: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let ip = peer.to_canonical().to_string();
    let mut chain = sent.join(", ");
    if chain.is_empty() || chain.len() > MAX_CHAIN {
        chain = ip;
    } else {
        chain = format!("{chain}, {ip}");
    }
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert("x-forwarded-for", v);
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
pub fn finish_upgrade<B, K: Send + 'static>(
    tasks: &TaskTracker,
    client: Option<hyper::upgrade::OnUpgrade>,
    resp: &mut Response<B>,
    stop: CancellationToken,
    keep: K,
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
                    let _ = crate::tunnel::splice(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
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
    _keep: K,
}

impl<K: Send + Unpin + 'static> Guarded<K> {
    pub fn new(inner: Body, stop: Option<CancellationToken>, keep: K) -> Guarded<K> {
        Guarded {
            inner,
            stop: stop.map(|s| Box::pin(s.cancelled_owned())),
            _keep: keep,
        }
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
                return Poll::Ready(Some(Err("access revoked: the stream was cut".into())));
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
        let i = self
            .conns
            .iter()
            .rposition(|(s, k)| s.is_ready() && wanted(k))?;
        Some(self.conns.remove(i).0)
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

#[cfg(test)]
mod tests {
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
