//! A small, fast HTTP/1.1 upstream for `bench/run.sh`: it stands in for a
//! member's kube-apiserver so that the benchmark measures the tunnel, not
//! the API server.
//!
//! - `GET /version`: a small JSON body like kube-apiserver's `/version`.
//! - `GET /bulk?bytes=N`: N zero bytes, streamed in 256 KiB chunks cut from
//!   one static buffer (nothing of size N is ever allocated).
//! - `POST /sink`: reads the request body as it comes, keeps none of it,
//!   and answers how many bytes it read (the upload direction).
//! - `POST /stall`: reads no body and never answers (a target that stops
//!   reading).
//! - The two Kubernetes API reads an agent makes to resolve Service
//!   `default/web` for `towerctl port-forward CLUSTER svc/web :80`:
//!   `GET /api/v1/namespaces/default/services/web` (port 80 named `http`,
//!   targetPort 80) and
//!   `GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name=web`
//!   (one ready endpoint, 127.0.0.1, whose port `http` is this server's own
//!   port). The forwarded connections thus land back on this server, and
//!   `/version` and `/bulk` work through the forward as well.
//!
//! - `GET /api/v1/namespaces/default/configmaps?watch=true`: a watch that
//!   stays open and carries one `ADDED` event per `POST /trigger`; the
//!   event's `data.sentAt` is the trigger's time (Unix nanoseconds), so a
//!   watcher can tell how long the event took to reach it
//!   (`examples/watch_load.rs`, `bench/watches.sh`). `POST /trigger`
//!   answers how many watches the event was handed to.
//!
//! Connections are kept alive. The same answers are served over TLS on a
//! second port, as a kube-apiserver serves them (its only transport): a
//! self-signed ECDSA P-256 certificate made at start, as the hub's gateway
//! has, and ALPN `h2` and `http/1.1`, so that a client measured directly
//! against it pays the TLS (and HTTP/2) costs it pays through the gateway.
//! Usage:
//!
//! ```sh
//! cargo build --release --example bench_upstream
//! target/release/examples/bench_upstream [PORT]
//! # prints "listening on 127.0.0.1:PORT", then "tls on 127.0.0.1:PORT2"
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Size of one body chunk of `/bulk`.
const CHUNK: usize = 256 * 1024;
/// The zeros every `/bulk` chunk is cut from.
static ZEROS: [u8; CHUNK] = [0; CHUNK];

const VERSION: &str = r#"{
  "major": "1",
  "minor": "33",
  "gitVersion": "v1.33.0-bench",
  "gitCommit": "0000000000000000000000000000000000000000",
  "gitTreeState": "clean",
  "buildDate": "2026-11-21T00:00:00Z",
  "goVersion": "go1.24.0",
  "compiler": "gc",
  "platform": "linux/amd64"
}"#;

/// Namespace and name of the Service that stands for this server.
const SERVICE_NS: &str = "default";
const SERVICE_NAME: &str = "web";

/// The Service and EndpointSlice list bodies, made once the port is known.
struct KubeObjects {
    service_path: String,
    services_path: String,
    slices_path: String,
    service: Bytes,
    services: Bytes,
    slices: Bytes,
}

static KUBE: OnceLock<KubeObjects> = OnceLock::new();

/// Where `POST /trigger` sends events to every open configmaps watch.
static EVENTS: OnceLock<tokio::sync::broadcast::Sender<Bytes>> = OnceLock::new();
/// Sequence number of the next triggered event.
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

const CONFIGMAPS_PATH: &str = "/api/v1/namespaces/default/configmaps";

/// An open watch on configmaps: one event line per trigger.
fn event_watch() -> Response<Body> {
    let rx = EVENTS.get().expect("events channel").subscribe();
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(b) => return Some((Ok::<_, Infallible>(Frame::data(b)), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let mut r = Response::new(StreamBody::new(events).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Sends one event to every open configmaps watch; answers how many.
fn trigger() -> Response<Body> {
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let line = format!(
        "{{\"type\":\"ADDED\",\"object\":{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"bench-{seq}\",\"namespace\":\"default\",\"resourceVersion\":\"{}\"}},\"data\":{{\"sentAt\":\"{now}\"}}}}}}\n",
        seq + 1
    );
    let n = EVENTS
        .get()
        .and_then(|tx| tx.send(Bytes::from(line)).ok())
        .unwrap_or(0);
    full(StatusCode::OK, "text/plain", Bytes::from(format!("{n}\n")))
}

/// `default/web` as a Service whose port 80 (`http`, targetPort 80) is
/// served by one ready endpoint, 127.0.0.1, on `port` (this server).
fn kube_objects(port: u16) -> KubeObjects {
    let (ns, name) = (SERVICE_NS, SERVICE_NAME);
    let service = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}","uid":"00000000-0000-0000-0000-000000000001","resourceVersion":"1","creationTimestamp":"2026-11-21T00:00:00Z"}},"spec":{{"type":"ClusterIP","clusterIP":"10.96.0.80","clusterIPs":["10.96.0.80"],"ports":[{{"name":"http","protocol":"TCP","port":80,"targetPort":80}}],"selector":{{"app":"{name}"}},"sessionAffinity":"None"}},"status":{{"loadBalancer":{{}}}}}}"#
    );
    let slices = format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSliceList","metadata":{{"resourceVersion":"1"}},"items":[{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-bench","namespace":"{ns}","uid":"00000000-0000-0000-0000-000000000002","resourceVersion":"1","labels":{{"kubernetes.io/service-name":"{name}","endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io"}}}},"addressType":"IPv4","endpoints":[{{"addresses":["127.0.0.1"],"conditions":{{"ready":true,"serving":true,"terminating":false}}}}],"ports":[{{"name":"http","protocol":"TCP","port":{port}}}]}}]}}"#
    );
    let services = format!(
        r#"{{"apiVersion":"v1","kind":"ServiceList","metadata":{{"resourceVersion":"1"}},"items":[{service}]}}"#
    );
    KubeObjects {
        service_path: format!("/api/v1/namespaces/{ns}/services/{name}"),
        services_path: format!("/api/v1/namespaces/{ns}/services"),
        services: Bytes::from(services),
        slices_path: format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
        service: Bytes::from(service),
        slices: Bytes::from(slices),
    }
}

/// Whether a list's `labelSelector` selects this Service's slices (an
/// absent selector selects everything).
fn selects_service(query: Option<&str>) -> bool {
    let Some(q) = query else { return true };
    match q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "labelSelector")
    {
        None => true,
        Some((_, v)) => {
            let v = v
                .replace("%2F", "/")
                .replace("%2f", "/")
                .replace("%3D", "=")
                .replace("%3d", "=");
            v == format!("kubernetes.io/service-name={SERVICE_NAME}")
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Whether a list request is a watch (`watch=true` or `watch=1`).
fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"))
}

/// A watch on objects that never change: an open response with no events
/// that ends after `timeoutSeconds` (default 60), as a real server's does.
fn quiet_watch(query: Option<&str>) -> Response<Body> {
    let secs: u64 = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "timeoutSeconds")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(60);
    let end = futures_util::stream::once(async move {
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        Ok::<_, Infallible>(Frame::data(Bytes::new()))
    });
    let mut r = Response::new(StreamBody::new(end).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads `bytes=N` from a query string.
fn requested_bytes(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "bytes")
        .and_then(|(_, v)| v.parse().ok())
}

/// A body of `n` zero bytes, produced chunk by chunk as the peer reads.
fn bulk(n: u64) -> Response<Body> {
    let chunks = futures_util::stream::unfold(n, |left| async move {
        if left == 0 {
            return None;
        }
        let len = left.min(CHUNK as u64) as usize;
        let frame = Frame::data(Bytes::from_static(&ZEROS[..len]));
        Some((Ok::<_, Infallible>(frame), left - len as u64))
    });
    let mut r = Response::new(StreamBody::new(chunks).boxed());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(n));
    r
}

/// Reads `body` to its end, discarding it; answers the byte count.
async fn sink(mut body: Incoming) -> Response<Body> {
    let mut n: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                return full(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    Bytes::from(format!("upload cut after {n} bytes: {e}\n")),
                )
            }
        }
    }
    full(StatusCode::OK, "text/plain", Bytes::from(format!("{n}\n")))
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::POST && req.uri().path() == "/trigger" {
        return Ok(trigger());
    }
    if req.method() == Method::POST && req.uri().path() == "/sink" {
        return Ok(sink(req.into_body()).await);
    }
    if req.method() == Method::POST && req.uri().path() == "/stall" {
        // Reads nothing more and never answers: what the tunnel buffers
        // towards a target that stops reading (`bench/memory.sh`).
        let _body = req.into_body();
        return std::future::pending().await;
    }
    if req.uri().path() == CONFIGMAPS_PATH && is_watch(req.uri().query()) {
        return Ok(event_watch());
    }
    if req.method() != Method::GET {
        return Ok(full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        ));
    }
    if let Some(k) = KUBE.get() {
        let path = req.uri().path();
        if path == k.service_path {
            return Ok(full(StatusCode::OK, "application/json", k.service.clone()));
        }
        if (path == k.services_path || path == k.slices_path) && is_watch(req.uri().query()) {
            return Ok(quiet_watch(req.uri().query()));
        }
        if path == k.services_path {
            return Ok(full(StatusCode::OK, "application/json", k.services.clone()));
        }
        if path == k.slices_path {
            let body = if selects_service(req.uri().query()) {
                k.slices.clone()
            } else {
                Bytes::from_static(br#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSliceList","metadata":{"resourceVersion":"1"},"items":[]}"#)
            };
            return Ok(full(StatusCode::OK, "application/json", body));
        }
    }
    Ok(match req.uri().path() {
        "/version" => full(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(VERSION.as_bytes()),
        ),
        "/bulk" => match requested_bytes(req.uri().query()) {
            Some(n) => bulk(n),
            None => full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"usage: /bulk?bytes=N\n"),
            ),
        },
        _ => full(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid port '{p}'; usage: bench_upstream [PORT]"),
            )
        })?,
        None => 0,
    };
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let _ = KUBE.set(kube_objects(listener.local_addr()?.port()));
    let _ = EVENTS.set(tokio::sync::broadcast::channel(16).0);
    let tls_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let acceptor = tls_acceptor()?;
    {
        // One write: a reader of the first line finds the second too.
        let mut out = std::io::stdout().lock();
        write!(
            out,
            "listening on {}\ntls on {}\n",
            listener.local_addr()?,
            tls_listener.local_addr()?
        )?;
        out.flush()?;
    }
    tokio::spawn(serve_tls(tls_listener, acceptor));
    loop {
        let tcp = accept(&listener).await;
        tokio::spawn(serve(tcp, false));
    }
}

/// The TLS side: a self-signed certificate for `localhost` and 127.0.0.1
/// (clients measuring against it do not verify it), HTTP/2 or HTTP/1.1 by
/// ALPN, the server's preference first.
fn tls_acceptor() -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let bad = |what: &str, e: &dyn std::fmt::Display| std::io::Error::other(format!("{what}: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| bad("key", &e))?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| bad("certificate", &e))?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| bad("key", &e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("TLS", &e))?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der)
    .map_err(|e| bad("TLS", &e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)))
}

/// The next connection, with `TCP_NODELAY` set; failed accepts (out of
/// descriptors) are said and retried.
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_tls(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let tcp = accept(&listener).await;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(_) => return,
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            serve(tls, h2).await;
        });
    }
}

/// One client connection, HTTP/2 or HTTP/1.1 (kept alive), until it ends.
async fn serve<I>(io: I, h2: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(handle);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(1000)
            .serve_connection(TokioIo::new(io), svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), svc)
            .await
    };
    if let Err(e) = result {
        if !e.is_incomplete_message() {
            eprintln!("connection: {e}");
        }
    }
}
