//! Many concurrent watch streams through the hub's gateway, for
//! `bench/watches.sh`: each one an HTTPS connection to the gateway (the
//! hub's CA, an operator's bearer token, the cluster's server URL and TLS
//! server name as `towerctl use` writes them) carrying
//! `GET …/api/v1/namespaces/default/configmaps?watch=true`, spread over the
//! clusters in turn. Once every watch is open it asks the upstream
//! (`examples/bench_upstream.rs`) for one event with `POST /trigger` and
//! measures how long the event takes to reach every watch.
//!
//! ```sh
//! watch_load --targets FILE --token TOKEN --ca CA.pem --watches 10000 \
//!            --trigger 127.0.0.1:UPSTREAM_PORT [--events 3] [--secs 120]
//! ```
//!
//! FILE has one `SERVER_URL TLS_SERVER_NAME` per line. Connections come from
//! 127.0.0.1 … 127.0.0.250 in turn (the gateway caps unauthenticated
//! connections per source), at most 256 being set up at a time.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Per event sequence number: latencies seen, in microseconds.
    seen: Mutex<std::collections::BTreeMap<u64, Vec<u64>>>,
    first_error: Mutex<Option<String>>,
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// `(seq, sentAt)` of one event line.
fn parse_event(line: &[u8]) -> Option<(u64, u128)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let name = v["object"]["metadata"]["name"].as_str()?;
    let seq = name.strip_prefix("bench-")?.parse().ok()?;
    let sent = v["object"]["data"]["sentAt"].as_str()?.parse().ok()?;
    Some((seq, sent))
}

async fn watch(
    tls: Arc<rustls::ClientConfig>,
    src: Ipv4Addr,
    url: url::Url,
    server_name: String,
    token: Arc<String>,
    gate: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(
        url.host_str()
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|e| format!("{url}: {e}"))?,
        url.port().unwrap_or(443),
    );
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| e.to_string())?;
    let tcp = sock.connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(server_name).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=3600",
        url.path().trim_end_matches('/')
    );
    let req = hyper::Request::get(path)
        .header("host", url.authority())
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body.unwrap_or_default())
        ));
    }
    shared.ready.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let at = now_nanos();
        buf.extend_from_slice(data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let Some((seq, sent)) = parse_event(&line) {
                let us = (at.saturating_sub(sent) / 1000) as u64;
                shared.seen.lock().unwrap().entry(seq).or_default().push(us);
            }
        }
    }
    Err("the watch ended".into())
}

/// `POST /trigger` on the upstream; how many watches it reached there.
fn trigger(addr: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /trigger HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let targets = std::fs::read_to_string(arg("--targets").expect("--targets FILE")).unwrap();
    let token = Arc::new(arg("--token").expect("--token TOKEN"));
    let ca = std::fs::read(arg("--ca").expect("--ca FILE")).unwrap();
    let watches: usize = arg("--watches").map_or(1000, |s| s.parse().unwrap());
    let upstream = arg("--trigger").expect("--trigger HOST:PORT");
    let events: u64 = arg("--events").map_or(3, |s| s.parse().unwrap());
    let secs: u64 = arg("--secs").map_or(120, |s| s.parse().unwrap());
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let targets: Vec<(url::Url, String)> = targets
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(u, n)| (url::Url::parse(u).unwrap(), n.trim().to_string()))
        .collect();
    assert!(!targets.is_empty(), "no targets");
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        seen: Mutex::new(Default::default()),
        first_error: Mutex::new(None),
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let start = Instant::now();
    for i in 0..watches {
        let (url, name) = targets[i % targets.len()].clone();
        let src = Ipv4Addr::new(127, 0, 0, 1 + (i % 250) as u8);
        let (tls, token, gate, shared) = (tls.clone(), token.clone(), gate.clone(), shared.clone());
        tokio::spawn(async move {
            let r = watch(tls, src, url, name, token, gate, shared.clone()).await;
            if let Err(e) = r {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                shared.first_error.lock().unwrap().get_or_insert(e);
            }
        });
    }
    let deadline = start + Duration::from_secs(secs);
    loop {
        let (r, f) = (
            shared.ready.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
        );
        if r + f >= watches || Instant::now() > deadline {
            println!(
                "{r} of {watches} watches open after {:.1} s over {} clusters ({f} failed{})",
                start.elapsed().as_secs_f64(),
                targets.len(),
                shared
                    .first_error
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|e| format!(", first error: {e}"))
                    .unwrap_or_default()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let open = shared.ready.load(Ordering::Relaxed);
    let mut all_ok = open == watches;
    for seq_i in 0..events {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sent = Instant::now();
        let handed = tokio::task::spawn_blocking({
            let u = upstream.clone();
            move || trigger(&u)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| format!("trigger failed: {e}"));
        let seq = {
            // The upstream numbers events from 1 in the order triggered.
            seq_i + 1
        };
        let wait_until = sent + Duration::from_secs(10);
        loop {
            let n = shared.seen.lock().unwrap().get(&seq).map_or(0, Vec::len);
            if n >= open || Instant::now() > wait_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut lat = shared
            .seen
            .lock()
            .unwrap()
            .get(&seq)
            .cloned()
            .unwrap_or_default();
        lat.sort_unstable();
        let ok = lat.len() == watches && pct(&lat, 1.0) <= 2000.0;
        all_ok &= ok;
        println!(
            "event {seq}: handed to {handed} upstream watches; reached {} of {watches} watches: p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms{}",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
            if ok { "" } else { "  (goal: all within 2 s — MISSED)" }
        );
    }
    println!(
        "{}",
        if all_ok {
            "goal met: every event reached every watch within 2 s"
        } else {
            "goal missed"
        }
    );
    std::process::exit(if all_ok { 0 } else { 1 });
}
