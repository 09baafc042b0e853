//! Many agent sessions from one process, for `bench/agents.sh`: each one
//! the real protocol (TCP, WebSocket, SSH with the project's own WebSocket
//! adapter, key or join-token login, SSH keepalives), reconnecting with
//! exponential backoff and jitter like the agent, and never opening a
//! channel (idle agents).
//!
//! ```sh
//! agents_load --hub ws://127.0.0.1:8080/tunnel [--hub URL …] --tokens FILE [--keepalive 10] [--secs 60]
//! ```
//!
//! With several `--hub`s, session i starts at hub i mod n and moves to the
//! next hub in the list after a failed attempt, as the agent walks its
//! `--hub` list. Prints `t=… connected=N` with the count per hub.
//!
//! FILE has one `NAME TOKEN` per line (from `towerctl cluster add NAME -o
//! json`). Prints `t=SECONDS connected=N` every second, and
//! `all N connected after S s` each time every session is up.
//! Connections come from 127.0.0.1 … 127.0.0.250 in turn, so the hub's
//! per-source cap on unauthenticated connections is not what is measured.

#[path = "../src/tunnel/ws.rs"]
#[allow(dead_code)]
mod ws;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::sync::oneshot;

struct Agent {
    closed: Option<oneshot::Sender<()>>,
}

impl russh::client::Handler for Agent {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn disconnected(
        &mut self,
        _: russh::client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.closed.take() {
            let _ = c.send(());
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.closed.take() {
            let _ = c.send(());
        }
    }
}

struct Opts {
    hubs: Vec<(SocketAddr, String)>,
    keepalive: Duration,
}

async fn session(
    o: &Opts,
    hub: usize,
    src: Ipv4Addr,
    name: &str,
    token: &str,
    key: &Arc<PrivateKey>,
) -> Result<(russh::client::Handle<Agent>, oneshot::Receiver<()>), String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| e.to_string())?;
    let (addr, url) = &o.hubs[hub];
    let tcp = sock.connect(*addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (wsock, _) =
        tokio_tungstenite::client_async(url.as_str(), ws::Gate::new(tcp, ws::Role::Client))
            .await
            .map_err(|e| e.to_string())?;
    let cfg = Arc::new(russh::client::Config {
        client_id: russh::SshId::Standard("SSH-2.0-towerctl_load".into()),
        keepalive_interval: Some(o.keepalive),
        keepalive_max: 2,
        inactivity_timeout: None,
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        nodelay: true,
        ..Default::default()
    });
    let (tx, rx) = oneshot::channel();
    let mut h =
        russh::client::connect_stream(cfg, ws::WsIo::new(wsock), Agent { closed: Some(tx) })
            .await
            .map_err(|e| e.to_string())?;
    // As the agent does: "failure" with no methods left on a closed
    // connection is the hub's login deadline, not a refusal.
    let cut = |r: &russh::client::AuthResult, h: &russh::client::Handle<Agent>| {
        matches!(r, russh::client::AuthResult::Failure { remaining_methods, .. } if remaining_methods.is_empty())
            && h.is_closed()
    };
    let by_key = h
        .authenticate_publickey(name, PrivateKeyWithHashAlg::new(key.clone(), None))
        .await
        .map_err(|e| e.to_string())?;
    if !by_key.success() {
        if cut(&by_key, &h) {
            return Err(format!("{name}: closed during login"));
        }
        let by_token = h
            .authenticate_password(name, token)
            .await
            .map_err(|e| e.to_string())?;
        if cut(&by_token, &h) {
            return Err(format!("{name}: closed during login"));
        }
        if !by_token.success() {
            return Err(format!("{name}: LOGIN REFUSED by the hub"));
        }
    }
    Ok((h, rx))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let urls: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--hub")
        .map(|w| w[1].clone())
        .collect();
    assert!(!urls.is_empty(), "--hub ws://HOST:PORT/tunnel");
    let tokens = std::fs::read_to_string(arg("--tokens").expect("--tokens FILE")).unwrap();
    let keepalive = Duration::from_secs(arg("--keepalive").map_or(10, |s| s.parse().unwrap()));
    let secs: u64 = arg("--secs").map_or(60, |s| s.parse().unwrap());
    let hubs: Vec<(SocketAddr, String)> = urls
        .into_iter()
        .map(|url| {
            let u = url::Url::parse(&url).unwrap();
            let addr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
                .parse()
                .unwrap();
            (addr, url)
        })
        .collect();
    // One descriptor per session: take the hard limit.
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
    let nhubs = hubs.len();
    let o = Arc::new(Opts { hubs, keepalive });
    let connected = Arc::new(AtomicUsize::new(0));
    // Sessions ended so far, and when the first one since every session
    // was last up ended (what "back after" is measured from).
    let drops = Arc::new(AtomicUsize::new(0));
    let first_drop: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let per_hub: Arc<Vec<AtomicUsize>> =
        Arc::new((0..nhubs).map(|_| AtomicUsize::new(0)).collect());
    let mut n = 0;
    for (i, line) in tokens.lines().enumerate() {
        let Some((name, token)) = line.split_once(' ') else {
            continue;
        };
        n += 1;
        let (name, token) = (name.to_string(), token.trim().to_string());
        let (o, connected, per_hub) = (o.clone(), connected.clone(), per_hub.clone());
        let (drops, first_drop) = (drops.clone(), first_drop.clone());
        let src = Ipv4Addr::new(127, 0, 0, 1 + (i % 250) as u8);
        let key = Arc::new(
            PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap(),
        );
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            let mut hub = i % nhubs;
            loop {
                match session(&o, hub, src, &name, &token, &key).await {
                    Ok((h, closed)) => {
                        connected.fetch_add(1, Ordering::Relaxed);
                        per_hub[hub].fetch_add(1, Ordering::Relaxed);
                        let _ = closed.await;
                        drop(h);
                        per_hub[hub].fetch_sub(1, Ordering::Relaxed);
                        connected.fetch_sub(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_drop.lock() {
                            f.get_or_insert_with(Instant::now);
                        }
                        drops.fetch_add(1, Ordering::Relaxed);
                        delay = Duration::from_millis(500);
                    }
                    Err(e) if e.contains("LOGIN REFUSED") => {
                        eprintln!("{e}");
                        return;
                    }
                    // One agent tells why attempts fail.
                    Err(e) if i == 0 => eprintln!("{name}: {e}"),
                    Err(_) => {}
                }
                // The next attempt goes to the next hub in the list.
                hub = (hub + 1) % nhubs;
                // Jitter in [d/2, d], like the agent's backoff.
                let d = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                tokio::time::sleep(d).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
    }
    let start = Instant::now();
    // Sampled every 100 ms (a hub's agents can move to another hub within
    // one second); a line per second.
    let mut drops_seen: Option<usize> = None;
    for tick in 1..=secs * 10 {
        tokio::time::sleep_until((start + Duration::from_millis(100 * tick)).into()).await;
        let c = connected.load(Ordering::Relaxed);
        if tick % 10 == 0 {
            let t = tick / 10;
            if nhubs > 1 {
                let by: Vec<String> = per_hub
                    .iter()
                    .map(|n| n.load(Ordering::Relaxed).to_string())
                    .collect();
                println!("t={t} connected={c} by_hub={}", by.join("/"));
            } else {
                println!("t={t} connected={c}");
            }
        }
        let d = drops.load(Ordering::Relaxed);
        if c == n && drops_seen != Some(d) {
            let since = first_drop
                .lock()
                .ok()
                .and_then(|mut f| f.take())
                .filter(|_| drops_seen.is_some())
                .unwrap_or(start);
            println!(
                "all {n} connected after {:.1} s",
                since.elapsed().as_secs_f64()
            );
            drops_seen = Some(d);
        }
    }
}
