//! The agent's HTTP/1.1 connections to its member API server, kept for
//! the next request: one pool for the agent's own kube client and for
//! every request forwarded from the hub.
//!
//! It replaces hyper-util's general-purpose pool under kube's middleware.
//! That pool is keyed by scheme and authority (SipHash of both, several
//! times per request), puts a connection back through a task of its own
//! and was, with the URI rebuilt as a string by kube's base-URI layer, a
//! sixth of the agent's instructions per forwarded request (callgrind).
//! The agent only ever talks to one API server, so the pool is one list:
//! a connection goes back when its answer has been read to the end, the
//! most recently used is taken first, and one the server has closed is
//! dropped; a request that found its kept connection closed under it
//! before it went out is sent again on a fresh one, and so is a GET, HEAD
//! or OPTIONS without a body (not an upgrade) whose kept connection, idle
//! for a second or more, closed once the request was on it, before a
//! whole answer head (a server's idle timeout crossing it), as Go's HTTP
//! transport does: once, on a fresh connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::daemon::http::KeptConns;

/// Most idle connections kept. More requests at once open more
/// connections; past this many idle, the oldest are let go.
const MAX_IDLE: usize = 64;

/// An idle connection older than this is closed rather than reused (the
/// server, or a middlebox, may have dropped it silently). Under the
/// common load balancers' idle timeouts (60 s), so that a request rarely
/// meets a close on its way out.
const IDLE_FOR: Duration = Duration::from_secs(55);

/// A request on a kept connection idle at least this long is copied, to
/// be sent again should the connection close under it (see
/// [`Pool::send`]). Servers' idle timeouts are seconds or more; a
/// connection in steady use does not meet them.
const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

type Sender = SendRequest<kube::client::Body>;

/// The idle connections, each with the time it was kept.
type Idle = Mutex<KeptConns<kube::client::Body, Instant>>;

/// Connections to one API server (`base`, the kubeconfig's cluster URL,
/// whose path prefixes every request's) over `connector` (TCP, the
/// kubeconfig's proxy, TLS, kube's timeouts).
#[derive(Clone)]
pub(super) struct Pool<C> {
    connector: C,
    base: Uri,
    /// `base`'s path without its trailing `/`, or empty.
    prefix: Arc<str>,
    host: Option<HeaderValue>,
    idle: Arc<Idle>,
}

impl<C> Pool<C> {
    pub(super) fn new(connector: C, base: Uri) -> Self {
        let prefix = base.path().trim_end_matches('/');
        // As hyper-util's client wrote it: the host, and the port when it
        // is not the scheme's default; never the URL's user and password.
        let default_port = match base.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        };
        let host = base.host().and_then(|h| {
            let text = match base.port_u16() {
                Some(p) if Some(p) != default_port => format!("{h}:{p}"),
                _ => h.to_string(),
            };
            HeaderValue::from_str(&text).ok()
        });
        Pool {
            connector,
            prefix: Arc::from(prefix),
            host,
            base,
            idle: Arc::new(Mutex::new(KeptConns::new(MAX_IDLE))),
        }
    }

    /// `uri`'s path and query under the base URL's path, as a request
    /// line carries it (origin form).
    fn origin_form(&self, uri: &Uri) -> Result<Uri, tower::BoxError> {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        // `*` (OPTIONS) joined to a prefix would name a sibling of it.
        if !pq.starts_with('/') {
            return Err(format!("request target '{pq}' is not a path").into());
        }
        if self.prefix.is_empty() {
            if let Some(p) = uri.path_and_query() {
                return Ok(Uri::from(p.clone()));
            }
        }
        format!("{}{pq}", self.prefix)
            .parse()
            .map_err(|e| format!("request path '{pq}' under '{}': {e}", self.base).into())
    }

    /// A kept connection, and how long it sat idle.
    fn take(&self) -> Option<(Sender, Duration)> {
        let mut idle = self.idle.lock().ok()?;
        // One clock read, not one per kept connection (with 16 kept, the
        // reads were 1.3 % of the agent's samples under gateway load).
        let now = Instant::now();
        idle.prune(|kept| now.saturating_duration_since(*kept) < IDLE_FOR);
        idle.take_kept(|_| true)
            .map(|(s, kept)| (s, now.saturating_duration_since(kept)))
    }
}

/// The most hyper buffers of an API server's answer ahead of its reader.
pub const UPSTREAM_READ_AHEAD: usize = 16 * 1024;

impl<C> Pool<C>
where
    C: tower::Service<Uri> + Clone + Send + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C::Future: Send + 'static,
    C::Error: Into<tower::BoxError>,
{
    /// A new connection to the API server, driven by a task of its own
    /// until it closes.
    async fn connect(&self) -> Result<Sender, tower::BoxError> {
        use tower::ServiceExt;
        let io = self
            .connector
            .clone()
            .oneshot(self.base.clone())
            .await
            .map_err(Into::into)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(crate::daemon::http::MAX_HEADER_LINES)
            // What hyper reads ahead of an answer's reader: its default
            // (~408 KiB) stayed held for every answer whose stream waits
            // on a client that takes nothing (1,000 of one operator's
            // stalled HTTP/2 streams: +480 MB in the agent, outside the
            // window budgets). A read of 64 KiB costs a list's transfer
            // nothing measurable.
            .max_buf_size(UPSTREAM_READ_AHEAD)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("API server connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn send(
        self,
        req: Request<kube::client::Body>,
    ) -> Result<Response<PooledBody>, tower::BoxError> {
        let (mut parts, body) = req.into_parts();
        parts.uri = self.origin_form(&parts.uri)?;
        parts.version = http::Version::HTTP_11;
        if let Some(host) = &self.host {
            parts.headers.entry(header::HOST).or_insert(host.clone());
        }
        let kept = self.take();
        let was_kept = kept.is_some();
        // A copy to send again if the kept connection turns out closed
        // once the request is on it (see `closed_under`): only a request
        // that is safe to repeat, as Go's transport does, and only on a
        // connection that sat idle long enough to meet a server's idle
        // timeout. (The copy is ~4 % of the agent's instructions for a
        // request; connections in steady use skip it.)
        let again = kept
            .as_ref()
            .is_some_and(|(_, idle)| *idle >= REPLAY_AFTER_IDLE && replayable(&parts, &body))
            .then(|| copy_head(&parts));
        // What was asked, for a redirect's `Location` (a refcount, no copy).
        let asked = parts.uri.clone();
        let req = Request::from_parts(parts, body);
        let mut sender = match kept {
            Some((s, _)) => s,
            None => self.connect().await?,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match (was_kept, e.take_message(), again) {
                // The kept connection closed before the request went out
                // (the server's idle timeout): safe to send it again on a
                // fresh one, whatever its method.
                (true, Some(req), _) => {
                    sender = self.connect().await?;
                    sender.send_request(req).await?
                }
                // It closed once the request was on it, before a whole
                // answer head (an idle close crossing the request): a GET,
                // HEAD or OPTIONS without a body, not an upgrade, goes
                // again, once, on a fresh connection.
                (true, None, Some(req)) if closed_under(e.error()) => {
                    tracing::debug!(
                        "API server closed a kept connection under a request ({}); sending it again",
                        e.error()
                    );
                    sender = self.connect().await?;
                    sender.send_request(req).await?
                }
                _ => return Err(e.into_error().into()),
            },
        };
        let mut resp = resp;
        // `Content-Location` too: the hub keeps both on the member.
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(location) = resp.headers().get(&name) else {
                continue;
            };
            let hub = location
                .to_str()
                .ok()
                .and_then(|l| location_for_hub(&self.base, &asked, l))
                .and_then(|l| HeaderValue::from_str(&l).ok());
            // One that cannot be read is not passed on: the hub would
            // read it under the wrong path.
            match hub {
                Some(l) => resp.headers_mut().insert(name, l),
                None => resp.headers_mut().remove(name),
            };
        }
        // An upgraded connection belongs to its stream from now on.
        let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (sender, Arc::downgrade(&self.idle)));
        Ok(resp.map(|inner| PooledBody { inner, back }))
    }
}

/// A member's `Location` in the terms the hub asked in: resolved against
/// the URL that was requested (`base`'s scheme and host, `asked`'s path,
/// which is under `base`'s path) and, when it stays on the API server
/// under `base`'s path, the path after it (`/api/v1/…` for a
/// cluster URL `https://rancher.example/k8s/clusters/c-1` redirecting to
/// `/k8s/clusters/c-1/api/v1/…`, or to its own absolute URL); otherwise
/// the absolute URL it names, which the hub removes
/// (`http::confine_location`). `None` when it cannot be read.
fn location_for_hub(base: &Uri, asked: &Uri, location: &str) -> Option<String> {
    let root = url::Url::parse(&base.to_string()).ok()?;
    // As the url crate writes paths, to compare like with like.
    let prefix = root.path().trim_end_matches('/');
    let requested = root.join(asked.path_and_query()?.as_str()).ok()?;
    let to = requested.join(location).ok()?;
    let rest = match to.path().strip_prefix(prefix) {
        Some(rest)
            if to.origin() == requested.origin()
                && to.username().is_empty()
                && to.password().is_none()
                && (rest.is_empty() || rest.starts_with('/')) =>
        {
            rest
        }
        _ => return Some(to.to_string()),
    };
    let path = if rest.is_empty() { "/" } else { rest }.to_string();
    Some(crate::daemon::http::with_query_and_fragment(path, &to))
}

/// Whether a request may be sent a second time: a safe method (RFC 9110
/// §9.2.1: the server changes nothing for it) without a body, and not an
/// upgrade (exec, attach and port-forward are GETs that do act: a command
/// must not run twice).
fn replayable(parts: &http::request::Parts, body: &kube::client::Body) -> bool {
    matches!(
        parts.method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) && http_body::Body::is_end_stream(body)
        && !crate::daemon::http::is_upgrade(&parts.headers)
}

/// The request again, for [`replayable`] ones: method, target, version
/// and headers (kube's layers have added credentials already).
fn copy_head(parts: &http::request::Parts) -> Request<kube::client::Body> {
    let mut req = Request::new(kube::client::Body::empty());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// Whether `e` says the connection ended under the request before a
/// whole answer head: closed (EOF; over TLS, without close_notify too) or
/// reset by the server. (Errors while reading the answer's body reach its
/// reader, not this.)
fn closed_under(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

impl<C> tower::Service<Request<kube::client::Body>> for Pool<C>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C::Future: Send + 'static,
    C::Error: Into<tower::BoxError>,
{
    type Response = Response<PooledBody>;
    type Error = tower::BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// An answer's body; once read to the end, its connection goes back to
/// the pool. Dropped before its end, the connection is not reused (hyper
/// closes it: the rest of the answer is still on it).
pub(super) struct PooledBody {
    inner: Incoming,
    back: Option<(Sender, Weak<Idle>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        let Some((sender, idle)) = self.back.take() else {
            return;
        };
        if let Some(idle) = idle.upgrade() {
            if let Ok(mut idle) = idle.lock() {
                idle.put(sender, Instant::now());
            }
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    /// An answer whose end was read has given its connection back already
    /// (`poll_frame`); one that hyper knows complete without that last
    /// poll (a length reached, an empty body) gives it back here.
    fn drop(&mut self) {
        if http_body::Body::is_end_stream(&self.inner) {
            self.give_back();
        }
    }
}

/// Most an answer to one of the agent's own API reads (a get, a list
/// page, an access review) may hold: kube reads it whole into memory. A
/// member API server (or whatever answers in its place) could otherwise
/// grow the agent without bound with one answer. Far above what the agent
/// reads: its lists are of one Service's EndpointSlices or pages of at
/// most 500 objects.
pub(super) const MAX_OWN_ANSWER: usize = 64 * 1024 * 1024;

/// Most one event of the agent's own watches (a Service, its
/// EndpointSlices) may hold: kube splits a watch into lines of any length
/// (measured: 1.16 GB after 800 MiB of one line that never ended). An
/// EndpointSlice of 1,000 endpoints is well under 1 MiB.
pub(super) const MAX_WATCH_EVENT: usize = 16 * 1024 * 1024;

/// The agent's own kube client's requests: each answer held to
/// [`MAX_OWN_ANSWER`], a watch's lines each to [`MAX_WATCH_EVENT`] (a
/// watch runs for as long as its server keeps it). Not on forwarded requests: their answers go
/// on to the hub as they come, under the tunnel's flow control.
#[derive(Clone)]
pub(super) struct CapAnswers<S>(pub(super) S);

impl<S, B> tower::Service<Request<kube::client::Body>> for CapAnswers<S>
where
    S: tower::Service<Request<kube::client::Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Response<Capped<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let watch = is_watch(req.uri());
        let answer = self.0.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|inner| Capped {
                inner,
                watch,
                run: 0,
            }))
        })
    }
}

/// Whether `uri` asks for a watch (`watch=true` or `=1`, as kube and
/// client-go write it).
fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    })
}

/// A body held to [`MAX_OWN_ANSWER`] in all, or (a watch) to
/// [`MAX_WATCH_EVENT`] since its last line's end.
pub(super) struct Capped<B> {
    inner: B,
    watch: bool,
    /// Bytes so far, or since the last newline.
    run: usize,
}

impl<B> http_body::Body for Capped<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let last_newline = if self.watch {
                data.iter().rposition(|&b| b == b'\n')
            } else {
                None
            };
            self.run = match last_newline {
                Some(i) => data.len() - i - 1,
                None => self.run.saturating_add(data.len()),
            };
            let (max, what) = if self.watch {
                (MAX_WATCH_EVENT, "one watch event")
            } else {
                (MAX_OWN_ANSWER, "an answer")
            };
            if self.run > max {
                return Poll::Ready(Some(Err(format!(
                    "the member's API server sent {what} longer than {} MiB to the towerctl agent; read no further",
                    max / (1024 * 1024)
                )
                .into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// An answer past the cap, or a watch line past it, is an error; a
    /// watch of many lines each under it is not.
    #[tokio::test]
    async fn own_answers_and_watch_lines_are_held_to_the_cap() {
        let chunk = |n: usize, nl: bool| {
            let mut v = vec![b'x'; n];
            if nl {
                v.push(b'\n');
            }
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(v)))
        };
        let mib = 1024 * 1024;
        let body = |frames: Vec<_>, watch: bool| Capped {
            inner: http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            watch,
            run: 0,
        };
        // 80 lines of 1 MiB: fine as a watch, too much as an answer.
        let lines = || (0..80).map(|_| chunk(mib, true)).collect::<Vec<_>>();
        assert!(body(lines(), true).collect().await.is_ok());
        let e = body(lines(), false).collect().await.unwrap_err();
        assert!(
            e.to_string().contains("an answer longer than 64 MiB"),
            "{e}"
        );
        // One line of 17 MiB in pieces, as a watch.
        let one = (0..17).map(|_| chunk(mib, false)).collect::<Vec<_>>();
        let e = body(one, true).collect().await.unwrap_err();
        assert!(
            e.to_string().contains("one watch event longer than 16 MiB"),
            "{e}"
        );
        assert!(is_watch(
            &"/api/v1/x?labelSelector=a&watch=true".parse().unwrap()
        ));
        assert!(is_watch(&"/api/v1/x?watch=1".parse().unwrap()));
        assert!(!is_watch(&"/api/v1/x?watchy=true".parse().unwrap()));
        assert!(!is_watch(&"/api/v1/x".parse().unwrap()));
    }

    #[test]
    fn a_members_redirect_is_told_to_the_hub_under_the_cluster_urls_path() {
        let base: Uri = "https://rancher.example/k8s/clusters/c-1".parse().unwrap();
        let asked: Uri = "/k8s/clusters/c-1/api/v1/namespaces/x/pods?watch=1"
            .parse()
            .unwrap();
        let hub = |l: &str| location_for_hub(&base, &asked, l);
        let on = |l: &str, want: &str| assert_eq!(hub(l).as_deref(), Some(want), "{l}");
        on("/k8s/clusters/c-1/api/v1/x", "/api/v1/x");
        on(
            "https://rancher.example/k8s/clusters/c-1/api?q=1#f",
            "/api?q=1#f",
        );
        on("/k8s/clusters/c-1", "/");
        on("services", "/api/v1/namespaces/x/services");
        // Off the member (another cluster behind the same proxy, another
        // host): absolute, for the hub to remove.
        on(
            "/k8s/clusters/c-2/api",
            "https://rancher.example/k8s/clusters/c-2/api",
        );
        on(
            "/k8s/clusters/c-10/api",
            "https://rancher.example/k8s/clusters/c-10/api",
        );
        on(
            "/k8s/clusters/c-1/../c-2",
            "https://rancher.example/k8s/clusters/c-2",
        );
        on("https://evil.example/x", "https://evil.example/x");
        on("/api/v1/x", "https://rancher.example/api/v1/x");
        on(
            "http://rancher.example/k8s/clusters/c-1/x",
            "http://rancher.example/k8s/clusters/c-1/x",
        );
        // Without a path in the cluster URL: its own absolute URL becomes a path.
        let base: Uri = "https://10.0.0.1:6443".parse().unwrap();
        let asked: Uri = "/api/v1/pods".parse().unwrap();
        assert_eq!(
            location_for_hub(&base, &asked, "https://10.0.0.1:6443/api/v1/x").as_deref(),
            Some("/api/v1/x")
        );
        assert_eq!(
            location_for_hub(&base, &asked, "/apis/x").as_deref(),
            Some("/apis/x")
        );
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    /// A test API server on loopback, on a thread of its own: counts connections,
    /// remembers each request's head, and answers by path: `/big` 4 MiB,
    /// `/once` a short answer and then closes the connection (without
    /// saying so), `/late` the same but closes 50 ms later, `/cut` on a
    /// connection that has answered before: no answer, the connection
    /// closed under the request (as an idle timeout crossing it), anything
    /// else (and `/cut` on a new connection) a short answer on a kept-alive
    /// connection.
    fn server() -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (conns.clone(), heads.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((s, _)) = l.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(s, h.clone()));
                }
            })
        });
        (format!("http://{addr}"), conns, heads)
    }

    async fn serve(mut s: tokio::net::TcpStream, heads: Arc<Mutex<Vec<String>>>) {
        let mut buf = Vec::new();
        let mut answered = 0;
        loop {
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end);
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            heads.lock().unwrap().push(head);
            if path == "/cut" && answered > 0 {
                return;
            }
            answered += 1;
            if path == "/big" {
                let body = vec![b'x'; 4 << 20];
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&body).await.is_err()
                {
                    return;
                }
                continue;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            match path.as_str() {
                "/once" => return,
                "/late" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return;
                }
                _ => {}
            }
        }
    }

    fn pool(base: &str) -> Pool<hyper_util::client::legacy::connect::HttpConnector> {
        Pool::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            base.parse().unwrap(),
        )
    }

    async fn get(
        p: &Pool<hyper_util::client::legacy::connect::HttpConnector>,
        path: &str,
    ) -> Response<PooledBody> {
        let req = Request::get(path)
            .body(kube::client::Body::empty())
            .unwrap();
        p.clone().oneshot(req).await.unwrap()
    }

    async fn body(resp: Response<PooledBody>) -> bytes::Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    async fn text(resp: Response<PooledBody>) -> String {
        String::from_utf8_lossy(&body(resp).await).to_string()
    }

    #[tokio::test]
    async fn answers_read_to_the_end_reuse_one_connection() {
        let (base, conns, heads) = server();
        let p = pool(&base);
        for _ in 0..5 {
            assert_eq!(text(get(&p, "/version").await).await, "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        // Two at once need two connections; both are kept after.
        let (a, b) = tokio::join!(get(&p, "/a"), get(&p, "/b"));
        assert_eq!((text(a).await, text(b).await), ("ok".into(), "ok".into()));
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        let (a, b) = tokio::join!(get(&p, "/a"), get(&p, "/b"));
        assert_eq!((text(a).await, text(b).await), ("ok".into(), "ok".into()));
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        let host = base.trim_start_matches("http://");
        for head in heads.lock().unwrap().iter() {
            assert!(head.contains(&format!("host: {host}\r\n")), "{head}");
        }
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_does_not_give_its_connection_back() {
        let (base, conns, _) = server();
        let p = pool(&base);
        let mut big = get(&p, "/big").await.into_body();
        let first = big.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(big);
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        // Read to its end, a big answer's connection is reused.
        let n = body(get(&p, "/big").await).await.len();
        assert_eq!(n, 4 << 20);
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_without_an_error() {
        let (base, conns, _) = server();
        let p = pool(&base);
        // Each closed once its answer is out, the close seen before the
        // next request. (A close that crosses a request is the next
        // test's.)
        for _ in 0..3 {
            assert_eq!(text(get(&p, "/once").await).await, "ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
        // Closed a while after its answer, while this side was idle.
        assert_eq!(text(get(&p, "/late").await).await, "ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_safe_request_whose_kept_connection_closes_under_it_goes_again_once() {
        let (base, conns, heads) = server();
        let p = pool(&base);
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        // Cut on the kept connection, idle for a second: answered on a
        // fresh one.
        tokio::time::sleep(REPLAY_AFTER_IDLE).await;
        assert_eq!(text(get(&p, "/cut").await).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        let cuts = |h: &Mutex<Vec<String>>| {
            h.lock()
                .unwrap()
                .iter()
                .filter(|h| h.starts_with("POST /cut") || h.starts_with("GET /cut"))
                .count()
        };
        assert_eq!(cuts(&heads), 2);
        // A POST is not sent twice: its error reaches the caller.
        tokio::time::sleep(REPLAY_AFTER_IDLE).await;
        let post = Request::post("/cut")
            .body(kube::client::Body::from(b"x".to_vec()))
            .unwrap();
        assert!(p.clone().oneshot(post).await.is_err());
        assert_eq!(cuts(&heads), 3);
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        // Nor a GET with a body, nor an upgrade (exec is a GET).
        for req in [
            Request::get("/cut").body(kube::client::Body::from(b"x".to_vec())),
            Request::get("/cut")
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .body(kube::client::Body::empty()),
        ] {
            assert_eq!(text(get(&p, "/version").await).await, "ok");
            tokio::time::sleep(REPLAY_AFTER_IDLE).await;
            assert!(p.clone().oneshot(req.unwrap()).await.is_err());
        }
        assert_eq!(cuts(&heads), 5);
        assert_eq!(conns.load(Ordering::SeqCst), 4);
        // A connection in steady use keeps no copy: cut, the GET fails.
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        let req = Request::get("/cut")
            .body(kube::client::Body::empty())
            .unwrap();
        assert!(p.clone().oneshot(req).await.is_err());
        assert_eq!(cuts(&heads), 6);
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn the_host_header_is_the_host_and_a_port_that_is_not_the_default() {
        let host = |url: &str| pool(url).host.map(|h| h.to_str().unwrap().to_string());
        assert_eq!(
            host("https://api.example:443").as_deref(),
            Some("api.example")
        );
        assert_eq!(
            host("https://u:pw@api.example:6443/k8s").as_deref(),
            Some("api.example:6443")
        );
        assert_eq!(host("http://10.0.0.1:80").as_deref(), Some("10.0.0.1"));
        assert_eq!(host("http://[::1]:8080").as_deref(), Some("[::1]:8080"));
        let p = pool("https://api.example/k8s");
        assert!(p.origin_form(&"*".parse().unwrap()).is_err());
        assert_eq!(
            p.origin_form(&"/api?x=1".parse().unwrap())
                .unwrap()
                .to_string(),
            "/k8s/api?x=1"
        );
    }

    #[tokio::test]
    async fn requests_go_under_the_cluster_urls_path() {
        let (base, _, heads) = server();
        let p = pool(&format!("{base}/k8s/clusters/c-1/"));
        assert_eq!(text(get(&p, "/api/v1/pods?limit=1").await).await, "ok");
        let p = pool(&format!("{base}/k8s"));
        assert_eq!(text(get(&p, "/version").await).await, "ok");
        let heads = heads.lock().unwrap();
        assert!(
            heads[0].starts_with("GET /k8s/clusters/c-1/api/v1/pods?limit=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].starts_with("GET /k8s/version HTTP/1.1\r\n"),
            "{}",
            heads[1]
        );
    }
}
