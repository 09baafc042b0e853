//! Bounded memory under stalled uploads: 64 clients each announce a 32 MB
//! request body through the gateway, send 1 MiB and stall. The agent
//! refuses each at once (its per-request bound is 8 MiB), its memory stays
//! bounded, and other requests keep working. Real towerctl and kubectl,
//! raw TLS clients for the attack.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::Env;

fn rss_kib(pid: i32) -> u64 {
    support::status_kib(pid, "VmRSS").unwrap_or(0)
}

/// One stalled upload: the request head announcing 32 MB, 1 MiB of body,
/// then the status line of whatever the gateway answers within 15 s.
fn stalled_upload(
    addr: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    hold: std::sync::mpsc::Receiver<()>,
) -> String {
    stalled_upload_of(
        addr,
        token,
        tls,
        hold,
        33_554_432,
        16,
        Duration::from_secs(15),
    )
}

/// [`stalled_upload`] announcing `announce` bytes, sending `chunks` of
/// 64 KiB, waiting `wait` for an answer.
fn stalled_upload_of(
    addr: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    hold: std::sync::mpsc::Receiver<()>,
    announce: u64,
    chunks: usize,
    wait: Duration,
) -> String {
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(wait)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let head = format!(
        "POST /clusters/alpha/api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {announce}\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).is_err() {
        return "write failed".into();
    }
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..chunks {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = s.flush();
    let mut buf = [0u8; 1024];
    let status = match read_answer(&mut s, &mut buf) {
        Ok(n) if n > 0 => {
            // The status line, and whether the answer says when to retry.
            let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let line = head.lines().next().unwrap_or("").to_string();
            match head.lines().any(|l| l.starts_with("retry-after:")) {
                true => format!("{line} (retry-after)"),
                false => line,
            }
        }
        Ok(_) => "closed".into(),
        Err(e) => format!("no answer: {e}"),
    };
    // Keep the connection open (stalled) until the test says so.
    let _ = hold.recv_timeout(Duration::from_secs(30));
    status
}

/// Reads what the gateway answered without writing first. A refused
/// upload's answer is followed by the gateway closing the connection while
/// the client still has body to send; `StreamOwned::read` first flushes
/// that pending TLS data and fails with a broken pipe (or a reset) before
/// looking at the answer already received. Reads TLS records straight from
/// the socket instead, so the status line is seen whenever it arrived.
fn read_answer(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        match s.conn.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if s.conn.read_tls(&mut s.sock)? == 0 {
            return Ok(0);
        }
        s.conn
            .process_new_packets()
            .map_err(std::io::Error::other)?;
    }
}

/// A hub and member `alpha` joined to it, over the stand-in API server.
fn joined() -> (Env, ApiServer) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    (env, api)
}

#[test]
fn stalled_32mb_uploads_are_refused_and_memory_stays_bounded() {
    let (env, _api) = joined();
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.kubectl(&["get", "ns"]).ok());
    let agent = env.pid_of("agent-alpha").expect("agent pid");
    let idle = rss_kib(agent);

    let gw = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let tls = support::gateway_tls(&env);
    let mut holds = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..64 {
        let (tx, rx) = std::sync::mpsc::channel();
        holds.push(tx);
        let (gw, token, tls) = (gw.clone(), token.clone(), tls.clone());
        clients.push(std::thread::spawn(move || {
            stalled_upload(gw, token, tls, rx)
        }));
    }
    // While all 64 are open: other requests work, the agent's memory is bounded.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let took = t.elapsed();
    let peak = rss_kib(agent);
    eprintln!(
        "agent RSS idle {idle} KiB, with 64 stalled 32 MB uploads {peak} KiB; kubectl took {took:?}"
    );
    // 64 × 32 MB would be 2 GiB; the bound: 64 MiB of buffered bodies at
    // most, plus the per-stream flow windows of what is in flight.
    assert!(
        peak < idle + 96 * 1024,
        "agent RSS grew from {idle} KiB to {peak} KiB"
    );
    drop(holds);
    let statuses: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Each was refused with 413 at once; the gateway then closes the
    // connection, which a client still writing sees as a broken pipe or a
    // reset before it reads the answer. None waited for its 32 MB.
    let refused = statuses.iter().filter(|s| s.contains(" 413")).count();
    let cut = statuses
        .iter()
        .filter(|s| s.contains("Broken pipe") || s.contains("reset") || *s == "closed")
        .count();
    assert_eq!(refused + cut, 64, "{statuses:?}");
    assert!(refused >= 32, "{statuses:?}");
}

/// One operator's unfinished uploads hold at most a quarter of the agent's
/// body budget (16 MiB): three stalled 7 MiB uploads by bob get at least
/// one 503 naming his share, and the admin's writes keep working while
/// bob's uploads hang. Before, 8 of them took the whole 64 MiB and every
/// other operator's writes got 503.
#[test]
fn one_operators_stalled_uploads_do_not_block_the_others_writes() {
    let (env, _api) = joined();
    let o = env.towerctl(&["operator", "add", "bob"]);
    let bob = support::printed_command(&o.stdout, "login")[3].clone();
    assert!(env
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.kubectl(&["get", "ns"]).ok());
    let gw = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let tls = support::gateway_tls(&env);
    let mut holds = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = std::sync::mpsc::channel();
        holds.push(tx);
        let (gw, bob, tls) = (gw.clone(), bob.clone(), tls.clone());
        clients.push(std::thread::spawn(move || {
            // 8 MiB - 1 announced (under the per-request bound), 7 MiB sent.
            stalled_upload_of(
                gw,
                bob,
                tls,
                rx,
                8 * 1024 * 1024 - 1,
                112,
                Duration::from_secs(5),
            )
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    // The admin writes while bob's uploads hang.
    let o = env.kubectl(&["create", "configmap", "during", "--from-literal=a=b"]);
    assert!(o.ok(), "{o:?}");
    drop(holds);
    let statuses: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let refused = statuses.iter().filter(|s| s.contains(" 503")).count();
    assert!((1..=2).contains(&refused), "{statuses:?}");
    // Said when to retry: client-go retries a 503 only then.
    assert!(
        statuses
            .iter()
            .filter(|s| s.contains(" 503"))
            .all(|s| s.ends_with("(retry-after)")),
        "{statuses:?}"
    );
}
