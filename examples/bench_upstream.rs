//! A small, fast HTTP/1.1 upstream for `bench/run.sh`: it stands in for a
//! member's kube-apiserver so that the benchmark measures the tunnel, not
//! the API server.
//!
//! - `GET /version`: a small JSON body like kube-apiserver's `/version`.
//! - `GET /bulk?bytes=N`: N zero bytes, streamed in 256 KiB chunks cut from
//!   one static buffer (nothing of size N is ever allocated).
//!
//! Connections are kept alive. Usage:
//!
//! ```sh
//! cargo build --release --example bench_upstream
//! target/release/examples/bench_upstream [PORT]   # prints "listening on 127.0.0.1:PORT"
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

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

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
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

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET {
        return Ok(full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        ));
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
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle));
            if let Err(e) = conn.await {
                if !e.is_incomplete_message() {
                    eprintln!("connection: {e}");
                }
            }
        });
    }
}
