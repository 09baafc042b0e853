//! The agent's health endpoints for a kubelet (or any supervisor):
//! `/healthz` answers 200 while the process serves requests, `/readyz`
//! answers 200 only while the tunnel to the hub is up (503 otherwise).
//! Off unless `--probe-addr` is given. Bounded: a few connections at a
//! time, a header read timeout and a whole-connection deadline, no bodies
//! read, no keep-alive.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Probes served at once; further connections are closed at accept.
const MAX_CONNECTIONS: usize = 8;
/// Time a client gets to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one probe connection.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Binds `addr` for [`serve`], naming the flag in the error. Any IPv4
/// address (`0.0.0.0:PORT`, the manifest's) is taken as any address at all
/// (see [`super::listen_tcp`]): a kubelet probes the pod's first IP, which
/// is IPv6 on IPv6-only and IPv6-first dual-stack clusters (bound to IPv4
/// only, the probes were refused and the agent restarted every 30 s).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let fail = |e: std::io::Error| {
        anyhow::anyhow!("cannot listen on '{addr}' for the health probes: {e}; choose another address with --probe-addr")
    };
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => super::listen_tcp(a, 64).map(|(l, _)| l).map_err(fail),
        Err(_) => TcpListener::bind(addr).await.map_err(fail),
    }
}

/// The answer to one probe request.
pub fn answer(path: &str, ready: bool) -> (StatusCode, &'static str) {
    match path {
        "/healthz" | "/livez" => (StatusCode::OK, "ok\n"),
        "/readyz" if ready => (StatusCode::OK, "ok: the tunnel to the hub is up\n"),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the tunnel to the hub is down\n",
        ),
        _ => (StatusCode::NOT_FOUND, "see /healthz and /readyz\n"),
    }
}

/// Serves the probes on `listener` until `cancel` fires; `ready` says
/// whether the tunnel is up right now.
pub async fn serve<F>(listener: TcpListener, ready: F, cancel: CancellationToken)
where
    F: Fn() -> bool + Send + Sync + 'static,
{
    serve_with(&listener, move |path| answer(path, ready()), cancel).await
}

/// Serves `answers` (the status and text for a request's path) on
/// `listener` until `cancel` fires or the future is dropped, one request
/// per connection, [`MAX_CONNECTIONS`] at once: the agent's probes, and a
/// hub's tunnel port while it waits for etcd at start.
pub async fn serve_with<F>(listener: &TcpListener, answers: F, cancel: CancellationToken)
where
    F: Fn(&str) -> (StatusCode, &'static str) + Send + Sync + 'static,
{
    let answers = Arc::new(answers);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owns the probe connections, so stopping waits for them (bounded).
    let tasks = tokio_util::task::TaskTracker::new();
    while let Some((tcp, peer)) = super::accept_next(listener, &cancel, "probe").await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("probe connection from {peer} closed: {MAX_CONNECTIONS} already open");
            continue;
        };
        let answers = answers.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (status, text) = answers(req.uri().path());
                    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    std::future::ready(Ok::<_, std::convert::Infallible>(r))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tasks.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest's `0.0.0.0:PORT` answers on IPv6 too (a kubelet probes
    /// the pod's first IP), and on IPv4.
    #[tokio::test]
    async fn any_ipv4_address_listens_on_both_families() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = bind("0.0.0.0:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(l, || true, cancel.clone()));
        let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let mut addrs = vec![format!("127.0.0.1:{port}")];
        if ipv6 {
            addrs.push(format!("[::1]:{port}"));
        }
        for a in addrs {
            let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(head.starts_with("HTTP/1.1 200"), "{a}: {head}");
        }
        cancel.cancel();
    }

    #[test]
    fn readiness_follows_the_tunnel() {
        assert_eq!(answer("/healthz", false).0, StatusCode::OK);
        assert_eq!(answer("/readyz", true).0, StatusCode::OK);
        assert_eq!(answer("/readyz", false).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer("/", true).0, StatusCode::NOT_FOUND);
    }

    /// Idle connections beyond the cap are closed at once; an idle one
    /// inside it is closed when the header timeout passes (paused time).
    #[tokio::test(start_paused = true)]
    async fn connections_are_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(l, || true, cancel.clone()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them all.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf))
            .await
            .expect("the extra connection was not closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The idle ones are dropped after the header timeout.
        let n = tokio::time::timeout(
            HEADER_TIMEOUT + Duration::from_secs(1),
            idle[0].read(&mut buf),
        )
        .await
        .expect("an idle probe connection outlived the header timeout")
        .unwrap_or(0);
        assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"), "{n}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Slots free again: a real probe is answered.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        cancel.cancel();
    }
}
