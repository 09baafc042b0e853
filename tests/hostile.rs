//! The hub under hostile network input: connection floods that never
//! authenticate, and a network that resets the tunnel mid-handshake. The
//! real towerctl binary, the real kubectl, the stand-in API server behind
//! the agent. Heavier variants run in the opt-in fault suite
//! (`TOWERCTL_FAULTS=1`, see docs/faults.md).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::{fd_count, wait_for, Env, Out};

/// Opens `n` connections to `addr`, sends `greeting` on each, then holds
/// them silent. Connections the hub closes are simply dropped.
/// How many of `held` the hub still keeps open (no end read, no reset;
/// what it answered, such as a WebSocket upgrade's 101, may wait unread).
fn still_open(held: &[TcpStream]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).is_ok()
                && match s.peek(&mut [0u8; 1]) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
        })
        .count()
}

fn flood(addr: &str, n: usize, greeting: &[u8]) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(greeting);
            held.push(s);
        }
    }
    held
}

/// A silent WebSocket upgrade: the handshake request, then nothing (no SSH
/// banner ever follows).
fn ws_upgrade(addr: &str) -> Vec<u8> {
    format!(
        "GET /tunnel HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The hub's tunnel address, from `towerctl status`.
fn tunnel_address(env: &Env) -> String {
    env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A connection to the hub's tunnel listener `addr` through its WebSocket
/// upgrade (the 101 read byte by byte, nothing after it), before any login.
fn upgraded(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&ws_upgrade(addr)).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "{head:?}");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    s
}

/// A TLS ClientHello cut short: the record header promises more than comes.
const HALF_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

#[path = "support/sshflood.rs"]
mod sshflood;

#[test]
fn join_tokens_guessed_in_parallel_from_one_address_get_five_checks() {
    // The penalty used to count a refused token when its connection ended,
    // and to close only connections accepted after that: 60 guesses opened
    // at once from one address were all checked.
    let env = Env::new();
    assert!(env.up().ok());
    assert!(env.towerctl(&["cluster", "add", "alpha"]).ok());
    let tunnel: std::net::SocketAddr = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcomes = rt.block_on(async move {
        let from = std::net::IpAddr::from([127, 0, 3, 7]);
        let guesses = (0..40).map(|_| {
            sshflood::login(
                tunnel,
                from,
                "alpha",
                "not-the-token",
                Duration::from_secs(20),
            )
        });
        futures_util::future::join_all(guesses).await
    });
    assert!(
        !outcomes.contains(&sshflood::Login::Accepted),
        "{outcomes:?}"
    );
    // russh's client reports a connection closed during its login as a
    // failed login too, so the hub's log tells the checks: one "agent
    // refused" line per token checked and refused.
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    let checked = log.matches("agent refused: auth:").count();
    assert!(
        (1..=5).contains(&checked),
        "{checked} of 40 parallel guesses from one address had their token checked"
    );
}

#[test]
fn token_guesses_from_an_agents_address_do_not_keep_it_from_logging_in_with_its_key() {
    // Agents behind one NAT or ingress share an address with whoever else
    // is there. Refused tokens used to close every connection from the
    // address at accept, for up to a minute: a guesser next door kept a
    // joined agent from reconnecting, though its key cannot be guessed.
    let env = Env::new();
    let api = ApiServer::start();
    assert!(env.up().ok());
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--keepalive",
            "1s",
            "--backoff-cap",
            "1s",
        ],
    );
    assert!(o.ok(), "{o:?}");
    let tunnel: std::net::SocketAddr = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The agent frozen until the hub drops its session.
    let agent = env.pid_of("agent-alpha").unwrap();
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let thaw = support::scopeguard_cont(agent);
    wait_for(
        "the hub to drop the frozen agent",
        Duration::from_secs(10),
        || {
            env.towerctl(&["cluster", "list"])
                .stdout
                .contains("disconnected")
                .then_some(())
        },
    );
    // Wrong tokens from the agent's own address (loopback), one after
    // another, while it reconnects.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guesser = sshflood::keep_guessing(
        tunnel,
        std::net::IpAddr::from([127, 0, 0, 1]),
        format!("ws://{tunnel}/tunnel"),
        None,
        "beta",
        stop.clone(),
        Duration::from_secs(30),
    );
    // Six refused: the address is held back for a second, longer with
    // every guess after.
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    wait_for("six guesses refused", Duration::from_secs(15), || {
        (log().matches("agent refused: auth:").count() >= 6).then_some(())
    });
    // Thawed, the agent logs in again with its key at once.
    drop(thaw);
    wait_for("the agent to reconnect", Duration::from_secs(10), || {
        (env.status()["hub"]["clusters"][0]["state"] == "connected").then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    guesser.join().unwrap();
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
}

#[test]
fn a_big_websocket_frame_before_login_is_refused_at_its_header() {
    // Before login nothing needs more than an SSH packet (~35 KB); a peer
    // that announces a 1 MB frame used to get 1 MB buffered by the hub
    // while it dribbled the frame (thousands of such peers: gigabytes).
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let mut s = upgraded(&tunnel);
    // A masked binary frame announcing 1,000,000 bytes, and its first KB.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&1_000_000u64.to_be_bytes());
    frame.extend_from_slice(&[7, 7, 7, 7]);
    frame.extend_from_slice(&[0u8; 1024]);
    s.write_all(&frame).unwrap();
    let t = std::time::Instant::now();
    let mut rest = [0u8; 4096];
    loop {
        match s.read(&mut rest) {
            Ok(0) | Err(_) if t.elapsed() < Duration::from_secs(4) => break,
            Ok(0) | Err(_) => panic!("the hub kept the connection for {:?}", t.elapsed()),
            Ok(_) => {} // a close frame, perhaps
        }
    }
}

#[test]
fn connection_floods_neither_exhaust_descriptors_nor_lock_out_kubectl_and_agents() {
    flood_both_listeners(&[], HALF_HELLO, ws_upgrade);
}

/// The same from a `--trusted-proxy` address sending the start of a PROXY
/// protocol header and nothing more: the gateway used to keep such
/// connections open after evicting them, past its caps, until the hub ran
/// out of descriptors.
#[test]
fn proxy_headers_held_open_by_a_trusted_proxy_are_held_to_the_same_caps() {
    flood_both_listeners(&["--trusted-proxy", "127.0.0.1"], b"PROXY ", |_| {
        b"PROXY ".to_vec()
    });
}

/// `cluster add alpha` and its agent joined to the stand-in `api`; returns
/// the member kubeconfig written for it.
fn join_alpha(env: &Env, api: &ApiServer) -> std::path::PathBuf {
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    kc
}

/// Member alpha joined, then its agent killed: the agent's key and the
/// hub's tunnel address, for a key holder to misbehave with.
fn alpha_key_without_its_agent(
    env: &Env,
    api: &ApiServer,
) -> (std::path::PathBuf, std::net::SocketAddr) {
    join_alpha(env, api);
    kill_alphas_agent(env)
}

/// Kills the joined alpha's agent: its key and the hub's tunnel address.
fn kill_alphas_agent(env: &Env) -> (std::path::PathBuf, std::net::SocketAddr) {
    env.kill9("agent-alpha");
    let tunnel = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (env.path("config/towerctl/agents/alpha.key"), tunnel)
}

/// An agent's key holder that keeps sending requests wanting a reply and
/// reads none of the replies. The hub's session loop goes on reading while
/// its writes wait, and counts its backlog being taken as a sign of the
/// peer's life (russh patch nine): neither may keep such a peer's session,
/// or much of the hub's memory. Measured: 400,000 requests, the hub grew by
/// ~5 MiB, the session ended ~4 s after the last request (1 s
/// keepalives). This peer keeps its window small (`sshflood`), so the
/// flood fills the hub's backlog to the 4 MiB past which the hub stops
/// reading it (~250,000 requests here); with a window the kernel let grow,
/// 400,000 requests did not.
#[test]
fn an_agent_that_reads_nothing_costs_the_hub_a_bounded_backlog_and_is_cut() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (key, tunnel) = alpha_key_without_its_agent(&env, &api);
    let hub = env.pid_of("hub").unwrap();
    let rss = || support::status_kib(hub, "VmRSS").unwrap();
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent, grown, cut_after) = rt.block_on(async {
        let h = sshflood::login_with_key_deaf(tunnel, "alpha", &key, 32 * 1024, Some(deaf.clone()))
            .await
            .expect("the agent's key logs in");
        let sessions_before = log().matches("agent disconnected").count();
        let before = rss();
        deaf.store(true, std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let (mut sent, mut peak) = (0u64, before);
        // Bounded: 400,000 requests or 30 s, or until the hub stops
        // taking them (a send waiting 2 s).
        while sent < 400_000 && start.elapsed() < Duration::from_secs(30) {
            match tokio::time::timeout(Duration::from_secs(2), h.send_keepalive(true)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
            if sent % 5_000 == 0 {
                peak = peak.max(rss());
            }
        }
        // The hub's keepalives (1 s) end the session within a few
        // intervals of it no longer reading.
        let stopped = Instant::now();
        let mut cut_after = None;
        while stopped.elapsed() < Duration::from_secs(15) {
            peak = peak.max(rss());
            if log().matches("agent disconnected").count() > sessions_before {
                cut_after = Some(stopped.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (sent, peak.saturating_sub(before), cut_after)
    });
    drop(rt);
    let ended = log()
        .lines()
        .rfind(|l| l.contains("agent disconnected"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("{sent} requests; hub RSS grew by {grown} KiB; cut after {cut_after:?}: {ended}");
    assert!(
        sent > 10_000,
        "the hub stopped taking requests after {sent}"
    );
    assert!(
        grown < 12 * 1024,
        "a peer that reads nothing grew the hub by {grown} KiB"
    );
    assert!(
        cut_after.is_some(),
        "the session of a peer that reads nothing was not ended: {}",
        log()
    );
}

/// The same peer, opening channels among its requests without waiting for
/// the answers. The hub's loop took its answers to channel opens only while
/// less than 1 MiB of its output was unwritten, and went on reading up to
/// 4 MiB: answers held back added no output, so past 1 MiB such a peer was
/// read for ever, each open holding a channel, its queue and its answer in
/// the hub (measured before the fix: 20,304 opens grew the hub by 71 MiB,
/// ~3.5 KiB each, without end, and the session was not cut while they came:
/// the peer's packets count as signs of life). Now the answers are taken
/// whenever the peer is read, and reading stops at 4 MiB of them (after the
/// fix: 19,880 opens, the hub grew by 5.3 MiB).
#[test]
fn an_agent_that_reads_nothing_and_opens_channels_costs_the_hub_a_bounded_backlog() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (key, tunnel) = alpha_key_without_its_agent(&env, &api);
    let hub = env.pid_of("hub").unwrap();
    let rss = || support::status_kib(hub, "VmRSS").unwrap();
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (requests, opens, grown, cut_after) = rt.block_on(async {
        let h = sshflood::login_with_key_deaf(tunnel, "alpha", &key, 32 * 1024, Some(deaf.clone()))
            .await
            .expect("the agent's key logs in");
        let sessions_before = log().matches("agent disconnected").count();
        let before = rss();
        deaf.store(true, std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let (mut requests, mut opens, mut peak) = (0u64, 0u64, before);
        // First requests alone, whose answers fill the kernel's buffers
        // (this peer keeps a small window; the hub's send queue stops
        // growing) and then, 50,000 more, ~1.8 MiB of the hub's backlog:
        // between the 1 MiB past which the hub took no answers to opens and
        // the 4 MiB at which it stops reading. Then a request and eight
        // opens at a time. Bounded: 400,000 requests, 40,000 opens, 18 s in
        // all, or until the hub stops taking them (a send waiting 2 s).
        let (mut queued, mut still, mut full_at) = (0u64, 0u32, None);
        while requests < 400_000 && opens < 40_000 && start.elapsed() < Duration::from_secs(18) {
            match tokio::time::timeout(Duration::from_secs(2), h.send_keepalive(true)).await {
                Ok(Ok(())) => requests += 1,
                _ => break,
            }
            match full_at {
                None => {
                    if requests % 1_000 == 0 {
                        let now = support::send_queue_of(tunnel.port());
                        still = if now > queued { 0 } else { still + 1 };
                        queued = queued.max(now);
                        if still >= 5 {
                            full_at = Some(requests);
                        }
                    }
                    continue;
                }
                Some(at) if requests < at + 50_000 => continue,
                Some(_) => {}
            }
            for _ in 0..8 {
                // Polled once: the open is queued to be sent, its answer
                // (which this peer never reads) not awaited.
                let open = h.channel_open_direct_tcpip("not-exposed", 80, "127.0.0.1", 0);
                let _ = tokio::time::timeout(Duration::ZERO, open).await;
                opens += 1;
            }
            if requests % 250 == 0 {
                peak = peak.max(rss());
            }
        }
        let stopped = Instant::now();
        let mut cut_after = None;
        while stopped.elapsed() < Duration::from_secs(15) {
            peak = peak.max(rss());
            if log().matches("agent disconnected").count() > sessions_before {
                cut_after = Some(stopped.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (requests, opens, peak.saturating_sub(before), cut_after)
    });
    drop(rt);
    eprintln!("{requests} requests and {opens} opens sent; hub RSS grew by {grown} KiB; cut after {cut_after:?}");
    assert!(
        opens > 1_000,
        "no opens were sent after {requests} requests"
    );
    assert!(
        grown < 16 * 1024,
        "a peer that reads nothing and opens channels grew the hub by {grown} KiB"
    );
    assert!(
        cut_after.is_some(),
        "the session of a peer that reads nothing was not ended: {}",
        log()
    );
}

/// An agent's key holder opening thousands of channels the hub refuses
/// (names of kilobytes each) used to get one warning line each: the hub's
/// whole log (four files of 10 MiB) rotated away in seconds, taking the
/// record of what happened before with it. Now a few a minute are logged,
/// each name cut short, and then one line says the rest are not.
#[test]
fn an_agent_opening_refused_channels_cannot_flood_the_hub_log() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (key, tunnel) = alpha_key_without_its_agent(&env, &api);
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    let before = log().len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = "x".repeat(16 * 1024);
    let refused = rt.block_on(async {
        let h = sshflood::login_with_key(tunnel, "alpha", &key, 32 * 1024)
            .await
            .expect("the agent's key logs in");
        let mut refused = 0;
        for i in 0..300 {
            let target = format!("{name}{i}");
            if h.channel_open_direct_tcpip(target, 80, "127.0.0.1", 0)
                .await
                .is_err()
            {
                refused += 1;
            }
        }
        refused
    });
    drop(rt);
    assert_eq!(refused, 300, "the hub opened channels it should refuse");
    let grown = log().len() - before;
    let added = log()[before..].to_string();
    let lines = added
        .lines()
        .filter(|l| l.contains("refused an agent-opened channel"))
        .count();
    assert!(
        (1..=10).contains(&lines) && added.contains("the rest are logged at debug"),
        "{lines} refusal lines: {}",
        &added[..added.len().min(4000)]
    );
    assert!(
        grown < 64 * 1024,
        "300 refusals grew the hub log by {grown} bytes"
    );
}

/// Push mode: an agent's key holder opening channels to an exposed
/// hub-side service without end used to get a socket of the hub's for
/// each (descriptors every member shares). Past the limit per session
/// (`TOWERCTL_MAX_PUSH_STREAMS`, 1,024 by default) an open is refused,
/// and one closed makes room again.
#[test]
fn an_agent_cannot_open_push_channels_without_end() {
    let env = Env::new();
    let api = ApiServer::start();
    // The exposed service: holds each connection until its client's end
    // (as servers do), and counts them.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_addr = service.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for mut c in service.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
    }
    let o = env.up_with_env(&[("TOWERCTL_MAX_PUSH_STREAMS", "20")]);
    assert!(o.ok(), "{o:?}");
    let o = env.towerctl(&[
        "cluster",
        "add",
        "alpha",
        "--expose",
        &format!("web={service_addr}"),
    ]);
    assert!(o.ok(), "{o:?}");
    let mut join = support::printed_command(&o.stdout, "join");
    // The agent would listen on the service's port on this same machine.
    let i = join.iter().position(|a| a == "--expose").unwrap();
    join[i + 1] = "web=127.0.0.1:0".into();
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let (key, tunnel) = kill_alphas_agent(&env);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = sshflood::login_with_key(tunnel, "alpha", &key, 32 * 1024)
            .await
            .expect("the agent's key logs in");
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..30 {
            match h.channel_open_direct_tcpip("web", 0, "127.0.0.1", 0).await {
                Ok(ch) => open.push(ch),
                Err(_) => refused += 1,
            }
        }
        assert_eq!((open.len(), refused), (20, 10), "channels opened / refused");
        // One closed makes room for one more.
        let ch = open.pop().unwrap();
        ch.close().await.unwrap();
        drop(ch);
        let mut reopened = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(ch) = h.channel_open_direct_tcpip("web", 0, "127.0.0.1", 0).await {
                open.push(ch);
                reopened = true;
                break;
            }
        }
        assert!(
            reopened,
            "a closed push channel did not give its place back"
        );
    });
    drop(rt);
    // The service's accept thread counts the 21st connection a moment after
    // the channel was confirmed (under load, after this line was reached:
    // it failed 1 run in 12 with two CPU hogs); then no more come.
    support::wait_for(
        "the hub's connection for the reopened channel",
        Duration::from_secs(10),
        || (accepted.load(Ordering::SeqCst) >= 21).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        21,
        "the hub connected past its limit"
    );
}

/// An agent's key holder accepting the hub's channels with 1-byte packets
/// made every write of the hub a packet per byte (a 300 KB request: 13 s
/// of the hub's CPU) and held requests until the client gave up. Such a
/// channel is now closed at once and the request answered 503.
#[test]
fn an_agent_taking_one_byte_packets_gets_no_channels() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (key, tunnel) = alpha_key_without_its_agent(&env, &api);
    // Polled in the background: the session must answer the hub's opens.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _session = rt
        .block_on(sshflood::login_with_key(tunnel, "alpha", &key, 1))
        .expect("the agent's key logs in");
    // One request (curl: kubectl retries what says Retry-After, as this
    // answer does for an agent that may be reconnecting).
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let started = Instant::now();
    let (code, body) = support::gateway_get(&env, token.trim(), "/clusters/alpha/version");
    assert!(
        code == "503" && body.contains("failed to open a stream"),
        "{code} {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the request waited {:?} on a channel it could never use",
        started.elapsed()
    );
}

/// Behind a load balancer speaking the PROXY protocol, the caps on
/// unauthenticated connections count each client it names, not the
/// balancer: one client's flood evicts its own oldest connections, never
/// another client's handshake (all of them used to count as the
/// balancer's, so the flood pushed out everyone's).
#[test]
fn behind_a_trusted_balancer_one_clients_flood_evicts_only_its_own_connections() {
    let env = Env::new();
    let o = env.up_limited(256, &["--trusted-proxy", "127.0.0.1"]);
    assert!(o.ok(), "{o:?}");
    let st = env.status();
    for listener in ["gatewayAddress", "tunnelAddress"] {
        let addr = st["hub"][listener].as_str().unwrap().to_string();
        let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n");
        // One client's connection, its handshake not finished yet.
        let mut other = TcpStream::connect(&addr).unwrap();
        other.write_all(header("192.0.2.2").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Another client's flood through the same balancer: 100 held
        // connections, past the per-source cap (32 under 256 descriptors).
        let flood_ = flood(&addr, 100, header("192.0.2.1").as_bytes());
        assert!(flood_.len() >= 90, "the flood itself failed");
        std::thread::sleep(Duration::from_millis(500));
        other
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        match other.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            r => panic!("{listener}: the other client's connection was closed by the flood: {r:?}"),
        }
        // The flood itself was held to the cap: most of it was closed.
        let closed = flood_
            .into_iter()
            .filter(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                match s.read(&mut [0u8; 16]) {
                    Ok(n) => n == 0,
                    Err(e) => !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                }
            })
            .count();
        assert!(
            closed >= 60,
            "{listener}: only {closed} of the flood's connections were closed"
        );
    }
    let _ = env.towerctl(&["down"]);
}

/// A hub under 256 descriptors, `extra` flags; 300 connections to its
/// gateway sending `to_gateway` and 300 to its tunnel sending
/// `to_tunnel(address)`, all then silent and held: kubectl and a new agent
/// still work, the hub stays under its limit and closes them all by its
/// deadlines.
fn flood_both_listeners(extra: &[&str], to_gateway: &[u8], to_tunnel: fn(&str) -> Vec<u8>) {
    let env = Env::new();
    let api = ApiServer::start();
    // The hub under a small descriptor limit: 256, so that 600 held
    // connections would exhaust it without the caps (the hub sizes its caps
    // from the limit: 64 unauthenticated connections per listener).
    let o = env.up_limited(256, &[&["--keepalive", "1s"], extra].concat());
    assert!(o.ok(), "{o:?}");
    let hub_pid = env.pid_of("hub").expect("hub pid");
    let limits = std::fs::read_to_string(format!("/proc/{hub_pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "{limits}"
    );
    let member_kc = join_alpha(&env, &api);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    std::thread::sleep(Duration::from_millis(500));
    let idle_fds = fd_count(hub_pid);

    let st = env.status();
    let gateway = st["hub"]["gatewayAddress"].as_str().unwrap().to_string();
    let tunnel = st["hub"]["tunnelAddress"].as_str().unwrap().to_string();
    let started = Instant::now();
    let held_tls = flood(&gateway, 300, to_gateway);
    let held_ws = flood(&tunnel, 300, &to_tunnel(&tunnel));
    assert!(
        held_tls.len() + held_ws.len() >= 500,
        "the flood itself failed"
    );
    // Never more descriptors than the limit allows: the hub is alive and
    // holds well under 256.
    let during = fd_count(hub_pid);
    assert!(during > 0 && during < 240, "hub holds {during} descriptors");

    // During the attack: kubectl through the gateway, and a new agent;
    // each listener's flood still held when its check was done (not let
    // go by its deadline first).
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let tls_open = still_open(&held_tls);
    let join_b = env.cluster_add("beta");
    let o = env.join(&join_b, &["--kubeconfig", member_kc.to_str().unwrap()]);
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    let ws_open = still_open(&held_ws);
    assert!(
        tls_open >= 16 && ws_open >= 16,
        "the floods were let go before the checks: {tls_open} gateway and {ws_open} tunnel connections still held"
    );
    // The checks above ran while the flood was held (before the
    // deadlines closed it): the hub still holds well over its idle count.
    // (A wall-clock bound failed on a loaded machine, not the hub.)
    let still = fd_count(hub_pid);
    assert!(
        still > idle_fds + 60,
        "the flood was no longer held when the checks ended ({still} descriptors, {idle_fds} idle, {:?} after it began)",
        started.elapsed()
    );

    // The attacker keeps its sockets open; the hub closes them by its
    // deadlines (10 s gateway, 15 s tunnel) and returns to its idle count
    // (plus beta's session).
    wait_for("the hub to drop the flood", Duration::from_secs(30), || {
        (fd_count(hub_pid) <= idle_fds + 8).then_some(())
    });
    // Every held connection was closed by the hub: reading gives EOF or a
    // reset, not a timeout.
    for mut s in held_tls.into_iter().chain(held_ws) {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 4096];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = end {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a flood connection is still open after the deadline"
            );
        }
    }
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let _ = env.towerctl(&["down"]);
}

/// A TCP proxy in front of the hub's tunnel port that resets each of the
/// first `resets.len()` connections after the agent has sent that many
/// bytes (mid-handshake: SSH key exchange and login), then forwards
/// faithfully.
///
/// With `reset` false, a clean close (FIN both ways) instead, and nothing
/// of what the agent sent after the cut reaches the hub: what an agent sees
/// when the hub's login deadline cuts a login still waiting for its answer.
fn cutting_proxy(target: String, resets: Vec<usize>, reset: bool) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().enumerate().take(50) {
            let Ok(client) = conn else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let Ok(hub) = TcpStream::connect(&target) else {
                continue;
            };
            let cut = resets.get(i).copied();
            let (mut c_rd, mut h_wr) = (client.try_clone().unwrap(), hub.try_clone().unwrap());
            let (mut h_rd, mut c_wr) = (hub, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut sent = 0;
                loop {
                    let n = match c_rd.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(cut) = cut {
                        if sent + n >= cut {
                            if reset {
                                // RST both ways: linger 0, then close.
                                let _ = socket_reset(&c_rd);
                                let _ = socket_reset(&h_wr);
                            } else {
                                let _ = c_rd.shutdown(std::net::Shutdown::Both);
                                let _ = h_wr.shutdown(std::net::Shutdown::Both);
                            }
                            return;
                        }
                    }
                    sent += n;
                    if h_wr.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = h_wr.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut h_rd, &mut c_wr);
                let _ = c_wr.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}

fn socket_reset(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc_linger();
    // SAFETY: setsockopt on a valid fd with a correctly sized struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.shutdown(std::net::Shutdown::Both)
}

fn libc_linger() -> libc::linger {
    libc::linger {
        l_onoff: 1,
        l_linger: 0,
    }
}

/// A hub with member alpha, and alpha's printed join command run through a
/// [`cutting_proxy`] in front of the tunnel port: the join's output and how
/// many connections the proxy saw (the member's API server is returned to
/// live as long as the test).
fn join_through_cuts(cuts: Vec<usize>, reset: bool, timeout: &str) -> (Env, ApiServer, Out, usize) {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let mut args = env.cluster_add("alpha");
    let tunnel = tunnel_address(&env);
    let (proxy, seen) = cutting_proxy(tunnel, cuts, reset);
    let hub_at = args.iter().position(|a| a == "--hub").unwrap() + 1;
    args[hub_at] = format!("ws://{proxy}/tunnel");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let o = env.join(
        &args,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--timeout",
            timeout,
        ],
    );
    let seen = seen.load(Ordering::SeqCst);
    (env, api, o, seen)
}

#[test]
fn resets_mid_handshake_never_stop_the_agent() {
    // Cut during the WebSocket/SSH set-up, the key exchange, and login.
    let (env, _api, o, seen) = join_through_cuts(vec![400, 1500, 2300], true, "40s");
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    assert!(seen >= 4, "the first three were reset");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
}

/// The hub closing a login before answering it (its login deadline, under
/// a herd of logins) is not a refusal: the agent retries instead of
/// stopping for good as if its token had been refused.
#[test]
fn a_login_closed_before_the_answer_is_retried() {
    // Clean closes as the agent sends its signed public-key request (the
    // agent's bytes reach ~2,750 there), then its join-token request
    // (~2,870): neither request reaches the hub, no answer comes back.
    let (_env, _api, o, seen) = join_through_cuts(vec![2700, 2800], false, "30s");
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    // At least the first was cut and retried. The second cut may come
    // after the login it aims at: the cut points are byte counts measured
    // once (~2,750 and ~2,870), and the second connection logged in before
    // its cut once in CI (not explained; passed alone every time since).
    assert!(seen >= 2, "the cut connection was retried");
}

/// One operator's streams cannot take a member away from everyone: past
/// its per-operator limit (set to 3 here; 1,024 by default) a connection
/// or a request is refused with the reason, while the other connections,
/// the local admin and kubectl go on.
#[test]
fn one_operator_cannot_take_every_stream_of_a_member() {
    use support::apiserver::TargetPort;
    let hub = Env::new();
    let api = ApiServer::start();
    let echo = support::echo_server();
    api.add_service(
        "default",
        "echo",
        &[("tcp", 7, TargetPort::Number(echo))],
        &[],
    );
    api.set_endpoints("default", "echo", &[("127.0.0.1", "tcp", echo)]);
    hub.up_with_env(&[("TOWERCTL_MAX_STREAMS_PER_OPERATOR", "3")]);
    let o = hub.towerctl(&["cluster", "add", "alpha"]);
    let join = support::printed_command(&o.stdout, "join");
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let allow = format!("127.0.0.1:{echo}");
    let o = hub.join(
        &join,
        &["--kubeconfig", kc.to_str().unwrap(), "--allow", &allow],
    );
    assert!(o.ok(), "{o:?}");
    let dev = support::operator_laptop(&hub, "dev");

    let pf =
        support::Streaming::start(dev.towerctl_cmd(&["port-forward", "alpha", "svc/echo", ":7"]));
    let local = support::forwarded_port(&pf);
    let echoes = |c: &mut TcpStream| -> bool {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4];
        c.write_all(b"ping").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"ping"
    };
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", local)).unwrap())
        .collect();
    for c in &mut held {
        assert!(echoes(c), "{}", pf.output());
    }
    // The fourth is refused, and said why.
    let mut fourth = TcpStream::connect(("127.0.0.1", local)).unwrap();
    assert!(!echoes(&mut fourth), "a fourth stream was let through");
    pf.wait_for(
        "operator 'dev' has 3 streams open to cluster 'alpha' already",
        Duration::from_secs(10),
    );
    // Requests count too: dev's kubectl is refused the same way (as a
    // watch or a slow request held open would be), with the reason.
    assert!(dev.towerctl(&["use", "alpha"]).ok());
    let o = dev.kubectl(&["get", "nodes"]);
    assert!(!o.ok() && o.stderr.contains("ServiceUnavailable"), "{o:?}");
    let o = hub.towerctl(&["audit", "-o", "json"]);
    assert!(
        o.stdout.lines().any(|l| l.contains("\"operator\":\"dev\"")
            && l.contains("\"verb\":\"get\"")
            && l.contains("has 3 streams open")),
        "{o:?}"
    );
    // The held ones still work; the admin and kubectl still reach the member.
    assert!(echoes(&mut held[0]));
    assert!(hub.towerctl(&["use", "alpha"]).ok());
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
    // One closed, one more fits.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(500));
    let mut again = TcpStream::connect(("127.0.0.1", local)).unwrap();
    assert!(echoes(&mut again), "{}", pf.output());
}

/// A member API server that stops answering does not hold kubectl
/// forever: a request that is not long-running gets a 504 from the agent
/// after its answer deadline (`TOWERCTL_API_ANSWER_TIMEOUT`, 2 s here),
/// while a watch may take as long as it likes to answer.
#[test]
fn a_hung_api_server_gets_a_504_but_watches_wait() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join_with_env(
        &join,
        &["--kubeconfig", kc.to_str().unwrap()],
        &[("TOWERCTL_API_ANSWER_TIMEOUT", "2")],
    );
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.kubectl(&["get", "ns"]).ok());
    api.set_delay(Duration::from_secs(5));
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let start = Instant::now();
    let (code, body) = support::gateway_get(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces/default/configmaps?limit=500",
    );
    let took = start.elapsed();
    assert_eq!(code, "504", "{body}");
    assert!(body.contains("did not answer within 2s"), "{body}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // A watch waits out the same delay and gets its answer.
    let (code, body) = support::gateway_get(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1",
    );
    assert_eq!(code, "200", "{body}");
    api.set_delay(Duration::ZERO);
    assert!(env.kubectl(&["get", "ns"]).ok());
}

/// Before login a peer may send any number of small frames, and the hub's
/// WebSocket reader grows its read buffer while they stream in. A burst
/// that ends in one byte of a frame header must not leave that buffer held
/// for the login deadline (it was 256–512 KiB per connection), and pings
/// get one pong per batch read, not one each.
#[test]
fn bursts_of_small_frames_and_pings_before_login_leave_the_hub_holding_little() {
    const HELD: usize = 40;
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let hub = env.pid_of("hub").expect("hub pid");
    // 100,000 empty masked binary frames, an empty ping every 200th, and
    // the first byte of one more header.
    let mut burst = Vec::new();
    for i in 0..100_000u32 {
        burst.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        if i % 200 == 0 {
            burst.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]);
        }
    }
    burst.push(0x82);
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = upgraded(&tunnel);
                s.write_all(&burst).unwrap();
                s
            })
            .collect()
    };
    // A few first, so that the hub's heap has its working size.
    let _warm = open(4);
    std::thread::sleep(Duration::from_millis(500));
    let before = support::status_kib(hub, "RssAnon").unwrap();
    let mut held = open(HELD);
    std::thread::sleep(Duration::from_secs(1));
    let after = support::status_kib(hub, "RssAnon").unwrap();
    let per_conn = after.saturating_sub(before) / HELD as u64;
    eprintln!("hub RssAnon {before} -> {after} KiB with {HELD} held: {per_conn} KiB each");
    assert!(
        per_conn < 64,
        "each connection left the hub holding {per_conn} KiB ({before} -> {after} KiB)"
    );
    // The pongs of one connection: far fewer than its 500 pings.
    let mut got = Vec::new();
    let mut b = [0u8; 65536];
    held[0]
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = held[0].read(&mut b) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&b[..n]);
    }
    let (mut pongs, mut at) = (0, 0);
    while at + 2 <= got.len() {
        if got[at] == 0x8a {
            pongs += 1;
        }
        at += 2 + (got[at + 1] & 0x7f) as usize;
    }
    assert!(
        (1..100).contains(&pongs),
        "{pongs} pongs for 500 pings ({} bytes back)",
        got.len()
    );
    // And the hub serves on.
    assert!(env.towerctl(&["status"]).ok());
}

/// A masked binary WebSocket frame carrying `payload` (under 64 KiB), as
/// an agent sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let key = [9u8, 8, 7, 6];
    let mut f = vec![0x82];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Whether the hub closed `s` before `deadline`: reads (and drops what the
/// hub sends, its banner and key exchange, a close frame) until the end of
/// the stream or a reset.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut b = [0u8; 4096];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
}

/// Tunnel connections whose SSH login goes wrong hold nothing past the
/// login deadline (15 s). After a zero-length SSH packet the hub sent its
/// close and then waited, with no bound, for the peer to close its side:
/// a peer that never did held the socket for ever, after the connection's
/// admission ticket was gone, so it could take every descriptor of the
/// hub. That wait now has 5 s (a vendored russh patch). A banner alone
/// ends when russh's keepalives give up.
#[test]
fn tunnel_connections_whose_login_goes_wrong_are_closed_by_the_deadline() {
    const EACH: usize = 10;
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let hub = env.pid_of("hub").expect("hub pid");
    let fds_before = fd_count(hub);
    let open = |payload: &[u8]| -> Vec<TcpStream> {
        (0..EACH)
            .map(|_| {
                let mut s = upgraded(&tunnel);
                s.write_all(&client_frame(payload)).unwrap();
                s
            })
            .collect()
    };
    let t = Instant::now();
    let mut zero = open(b"SSH-2.0-OpenSSH_9.6\r\n\0\0\0\0\x04");
    let mut banner = open(b"SSH-2.0-OpenSSH_9.6\r\n");
    assert!(fd_count(hub) >= fds_before + 2 * EACH, "the hub holds them");
    let at_once = Instant::now() + Duration::from_secs(5 + 3);
    for (i, s) in zero.iter_mut().enumerate() {
        assert!(
            closed_by(s, at_once),
            "zero-length packet connection {i} still open after {:?}",
            t.elapsed()
        );
    }
    // The login deadline, and a little more for a loaded machine.
    let deadline = t + Duration::from_secs(15 + 5);
    for (i, s) in banner.iter_mut().enumerate() {
        assert!(
            closed_by(s, deadline),
            "banner-only connection {i} still open after {:?}",
            t.elapsed()
        );
    }
    drop((zero, banner));
    wait_for(
        "the hub's descriptors to come back",
        Duration::from_secs(5),
        || (fd_count(hub) <= fds_before + 2).then_some(()),
    );
    assert!(env.towerctl(&["status"]).ok());
}

/// A peer quiet after its SSH banner costs the hub no CPU while it waits
/// for the login deadline: the hub's keepalive, not sent before a login,
/// was due at once again and again (a review found it; the timer was left
/// in the past), a core spun for each such peer, up to 15 s.
#[test]
fn a_peer_quiet_before_its_login_costs_the_hub_no_cpu() {
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let hub = env.pid_of("hub").expect("hub pid");
    let quiet: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = upgraded(&tunnel);
            s.write_all(&client_frame(b"SSH-2.0-OpenSSH_9.6\r\n"))
                .unwrap();
            s
        })
        .collect();
    // Past the hub's keepalive interval (1 s in the tests).
    std::thread::sleep(Duration::from_secs(2));
    let before = support::cpu_ticks(hub);
    std::thread::sleep(Duration::from_secs(4));
    let used = support::cpu_ticks(hub) - before;
    eprintln!("measured: the hub used {used} ticks in 4 s with 4 quiet peers");
    // Idle, a hub uses a few ticks in 4 s; spinning for four peers, ~400.
    assert!(used < 100, "the hub used {used} CPU ticks in 4 s");
    drop(quiet);
}

/// Sessions through their key exchange that never log in (they answer the
/// hub's keepalives) are held to the per-source cap: the ones evicted to
/// make room are closed at once. The eviction used to drop only the login's
/// wait; russh's session task went on holding the socket, answered by the
/// peer's keepalives, outside every cap.
#[test]
fn unauthenticated_sessions_evicted_past_the_cap_are_closed() {
    const OPENED: usize = 48;
    let env = Env::new();
    let o = env.up_limited(256, &[]);
    assert!(o.ok(), "{o:?}");
    let tunnel: std::net::SocketAddr = tunnel_address(&env).parse().unwrap();
    let hub = env.pid_of("hub").expect("hub pid");
    let fds_before = fd_count(hub);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (held, fds) = rt.block_on(async move {
        let mut sessions = Vec::new();
        for _ in 0..OPENED {
            if let Ok(h) = sshflood::unauthenticated(tunnel).await {
                sessions.push(h);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = sessions.iter().filter(|h| !h.is_closed()).count();
        (held, fd_count(hub))
    });
    // 32 per source under 256 descriptors.
    assert!(
        held <= 32,
        "{held} of {OPENED} sessions from one address still open 2 s after the flood"
    );
    assert!(
        fds <= fds_before + 32 + 4,
        "the hub holds {fds} descriptors ({fds_before} before)"
    );
    let _ = env.towerctl(&["down"]);
}

/// Before login the hub takes SSH packets of at most 35,000 bytes (RFC
/// 4253 6.1's minimum), not russh's 256 KiB: a peer announcing a bigger one
/// is closed at its length, before the hub holds its bytes. It used to
/// hold all but the last byte of a 256 KiB packet for each such connection
/// (+58 MB for 200 of them in the black-box probe).
#[test]
fn a_long_ssh_packet_before_login_is_refused_at_its_length() {
    const HELD: usize = 40;
    const ANNOUNCED: u32 = 200_000;
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let hub = env.pid_of("hub").expect("hub pid");
    let _warm: Vec<TcpStream> = (0..4).map(|_| upgraded(&tunnel)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = support::status_kib(hub, "RssAnon").unwrap();
    let t = Instant::now();
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|_| {
            let mut s = upgraded(&tunnel);
            let mut first = b"SSH-2.0-OpenSSH_9.6\r\n".to_vec();
            first.extend_from_slice(&ANNOUNCED.to_be_bytes());
            first.push(4);
            s.write_all(&client_frame(&first)).unwrap();
            // All but the last byte of it, in frames under the 64 KiB
            // frame limit (a hub that refused it may have closed already).
            let body = vec![0x5au8; 50_000];
            for _ in 0..3 {
                if s.write_all(&client_frame(&body)).is_err() {
                    break;
                }
            }
            let _ = s.write_all(&client_frame(&body[..(ANNOUNCED as usize - 150_000 - 2)]));
            s
        })
        .collect();
    let after = support::status_kib(hub, "RssAnon").unwrap();
    let per_conn = after.saturating_sub(before) / HELD as u64;
    eprintln!("hub RssAnon {before} -> {after} KiB with {HELD} long packets: {per_conn} KiB each");
    assert!(
        per_conn < 64,
        "each connection left the hub holding {per_conn} KiB ({before} -> {after} KiB)"
    );
    // Closed at once, not at the keepalives' end or the login deadline.
    let by = t + Duration::from_secs(3);
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_by(s, by),
            "connection {i} still open after {:?}",
            t.elapsed()
        );
    }
}

/// Sends `request` to `addr` and reads the answer to the end (5 s at most).
fn exchange(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn what_is_not_an_upgrade_on_the_tunnel_port_gets_an_http_answer() {
    // A load balancer's health check, curl, a browser or kubectl sent to
    // the wrong port used to get a bare close, which says nothing (and
    // marks the hub unhealthy behind a balancer that checks with HTTP).
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let health = exchange(&tunnel, b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    // HAProxy's httpchk sends HTTP/1.0; some balancers check with HEAD.
    let health = exchange(&tunnel, b"GET /readyz?full=1 HTTP/1.0\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let health = exchange(&tunnel, b"GET http://hub/healthz HTTP/1.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    let health = exchange(&tunnel, b"HEAD /livez HTTP/1.0\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("Connection: close\r\n\r\n"), "{health}");
    // `/` is what most balancers check by default (HAProxy with OPTIONS):
    // healthy, and it says what the port is for.
    let root = exchange(&tunnel, b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n");
    assert!(root.starts_with("HTTP/1.1 200 OK\r\n"), "{root}");
    assert!(
        root.contains("\r\n\r\nok\n") && root.contains("towerctl join"),
        "{root}"
    );
    let root = exchange(&tunnel, b"OPTIONS / HTTP/1.0\r\n\r\n");
    assert!(root.starts_with("HTTP/1.1 200 OK\r\n"), "{root}");

    let plain = exchange(&tunnel, b"GET /tunnel HTTP/1.1\r\nHost: hub\r\n\r\n");
    assert!(
        plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{plain}"
    );
    assert!(plain.contains("\r\nUpgrade: websocket\r\n"), "{plain}");
    assert!(plain.contains("towerctl join"), "{plain}");
    // A proxy speaking HTTP/2 (h2c) to the hub is named as such.
    let h2 = exchange(&tunnel, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(
        h2.starts_with("HTTP/1.1 400 ") && h2.contains("HTTP/2"),
        "{h2}"
    );
    let post = exchange(&tunnel, b"POST /api HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{post}"
    );
    assert!(post.contains("\r\nAllow: GET\r\n"), "{post}");
    let old = ws_upgrade(&tunnel);
    let old = String::from_utf8(old)
        .unwrap()
        .replace("Version: 13", "Version: 8");
    let version = exchange(&tunnel, old.as_bytes());
    assert!(version.starts_with("HTTP/1.1 426 "), "{version}");
    assert!(
        version.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{version}"
    );
    // What is no HTTP at all is answered at once, not at the deadline
    // (no blank line ever comes): an SSH client, a TLS client (wss://
    // dialed straight at the hub: closed, as it would not read HTTP).
    let t = Instant::now();
    // Also in a first flight over 1 KiB: an SSH client's banner and key
    // exchange, a ClientHello with post-quantum key shares (~1.2-1.8 KB).
    let ssh = [b"SSH-2.0-OpenSSH_9.6\r\n".as_slice(), &[7u8; 1500]].concat();
    let ssh = exchange(&tunnel, &ssh);
    assert!(ssh.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{ssh}");
    let hello = [
        b"\x16\x03\x01\x06\x00\x01\x00\x05\xfc\x03\x03".as_slice(),
        &[0x11; 1524],
    ]
    .concat();
    let tls = exchange(&tunnel, &hello);
    assert_eq!(tls, "");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let long = exchange(&tunnel, long.as_bytes());
    assert!(long.starts_with("HTTP/1.1 431 "), "{long}");
    let proxied = [
        b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 80\r\n".as_slice(),
        &ws_upgrade(&tunnel),
    ]
    .concat();
    let proxied = exchange(&tunnel, &proxied);
    assert!(proxied.starts_with("HTTP/1.1 400 "), "{proxied}");
    assert!(proxied.contains("PROXY protocol header"), "{proxied}");
    // Empty lines before the request line are skipped (as httparse does),
    // however many: the upgrade goes through.
    let mut s = TcpStream::connect(&tunnel).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[b"\r\n\r\n\n".as_slice(), &ws_upgrade(&tunnel)].concat())
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // A connection closed at once (a TCP health check) is not logged;
    // the refusals are, escaped, the health check is not.
    drop(TcpStream::connect(&tunnel).unwrap());
    exchange(&tunnel, b"GET /\x1b[2J\nevil HTTP/1.1\r\n\r\n");
    // Pre-login refusals are logged 10 a minute (then at debug): this list
    // and the refusals above must stay within that.
    let expected = [
        "not a WebSocket upgrade (\"GET /tunnel HTTP/1.1\"): answered 426",
        "a method other than GET (\"POST /api HTTP/1.1\"): answered 405",
        "an HTTP/2 connection (a proxy or balancer that speaks HTTP/2 to the hub",
        "a WebSocket version other than 13",
        "not an HTTP/1.1 request (\"SSH-2.0-OpenSSH_9.6\"): answered 400",
        "a TLS handshake on the tunnel listener, which serves plain ws://",
        "an HTTP head longer than 16384 bytes",
        "name the balancer with --trusted-proxy",
        "(\"GET /\\u{1b}[2J\"): answered 400",
    ];
    let log = wait_for(
        "every refusal in the hub log",
        Duration::from_secs(5),
        || {
            let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
            expected.iter().all(|e| log.contains(e)).then_some(log)
        },
    );
    assert!(!log.contains("\x1b[2J"), "{log}");
    assert!(!log.contains("healthz"), "{log}");
    assert!(!log.contains("readyz"), "{log}");
    assert!(!log.contains("WebSocket handshake failed"), "{log}");
}

#[test]
fn plain_http_on_the_gateway_port_is_told_to_use_https() {
    // kubectl or curl with http:// used to get a TLS alert or a bare
    // close ("malformed HTTP response", "EOF"); now an HTTP 400 saying
    // what to do, as Go's servers (kube-apiserver) answer it.
    let env = Env::new();
    assert!(env.up().ok());
    let gateway = format!("127.0.0.1:{}", env.gateway_port());
    let answer = exchange(&gateway, b"GET /version HTTP/1.1\r\nHost: hub\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\"kind\":\"Status\""), "{answer}");
    assert!(
        answer.contains("speaks HTTPS only; use https://"),
        "{answer}"
    );
    let o = env.kubectl(&["--server", &format!("http://{gateway}"), "get", "ns"]);
    assert!(!o.ok());
    assert!(o.all().contains("Error from server (BadRequest)"), "{o:?}");
    // A load balancer's PROXY header, the balancer not named with
    // --trusted-proxy: closed, and the log says what to do.
    let proxied = exchange(
        &gateway,
        b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 443\r\n\x16\x03\x01",
    );
    assert_eq!(proxied, "");
    let log = wait_for(
        "the PROXY header in the hub log",
        Duration::from_secs(5),
        || {
            let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
            log.contains("PROXY protocol header").then_some(log)
        },
    );
    assert!(log.contains("gateway connection refused: a PROXY protocol header from an address not trusted to send one (if a load balancer in front of the hub sends it, name the balancer with --trusted-proxy)"), "{log}");
    // TLS clients are served as before.
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sSk",
        "--max-time",
        "10",
        &format!("https://{gateway}/version"),
    ]);
    let tls = support::run_bounded(curl, Duration::from_secs(20));
    assert!(tls.all().contains("operator bearer token"), "{tls:?}");
    // Health checks need no token, as with kube-apiserver.
    for path in ["/healthz", "/readyz", "/livez"] {
        assert_healthy(&gateway, path);
    }
}

/// `https://GATEWAY/PATH` (no token, the CA not checked) answers `ok`.
fn assert_healthy(gateway: &str, path: &str) {
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sSk",
        "--max-time",
        "10",
        &format!("https://{gateway}{path}"),
    ]);
    let o = support::run_bounded(curl, Duration::from_secs(20));
    assert_eq!(o.stdout, "ok", "{path}: {o:?}");
}

/// An HTTP/2 frame: type, flags, stream and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The GOAWAY error code in `got` (frames as read from the connection),
/// if one came whole.
fn goaway_code(got: &[u8]) -> Option<u32> {
    let mut at = 0;
    while got.len() >= at + 9 {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        if got.len() < at + 9 + len {
            return None;
        }
        if got[at + 3] == 7 && len >= 8 {
            let p = &got[at + 9..];
            return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    None
}

/// The (type, flags) of each whole frame in `got` (as read from a
/// connection).
fn h2_frame_kinds(got: &[u8]) -> Vec<(u8, u8)> {
    let (mut out, mut at) = (Vec::new(), 0);
    while got.len() >= at + 9 {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        if got.len() < at + 9 + len {
            break;
        }
        out.push((got[at + 3], got[at + 4]));
        at += 9 + len;
    }
    out
}

/// A TLS connection to the gateway speaking HTTP/2 (ALPN in `tls`), and
/// the preface and SETTINGS it opens with, not sent yet.
fn h2_client(
    gateway: &str,
    tls: &Arc<rustls::ClientConfig>,
    read_timeout: Duration,
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    Vec<u8>,
) {
    let conn = rustls::ClientConnection::new(tls.clone(), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(gateway).unwrap();
    tcp.set_read_timeout(Some(read_timeout)).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    (rustls::StreamOwned::new(conn, tcp), out)
}

/// What `s` sends until it closes, `done` says so, or `within` passes
/// (its read timeout sets how often `done` is asked).
fn read_h2_until(s: &mut impl Read, within: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    let until = Instant::now() + within;
    while Instant::now() < until && !done(&got) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    got
}

/// HTTP/2 floods on the gateway, before any token (kubectl's protocol, so
/// the one an attacker on the internet meets first): requests opened and
/// cancelled at once (rapid reset, CVE-2023-44487) and one header block
/// continued for ever (CONTINUATION flood) are each cut with a GOAWAY
/// (ENHANCE_YOUR_CALM) long before the attacker is done; SETTINGS and PING
/// floods and more than 256 streams without a token end the connection
/// (the gateway's frame budgets: one connection toggling the initial
/// window over 1,000 open streams held every other operator 8–18 s); the
/// hub's memory stays where it was, and others are served meanwhile.
#[test]
fn http2_floods_before_any_token_are_cut_with_a_goaway() {
    let env = Env::new();
    assert!(env.up().ok());
    let gateway = format!("127.0.0.1:{}", env.gateway_port());
    let hub = std::fs::read_to_string(env.path("run/towerctl/hub.pid"))
        .unwrap()
        .trim()
        .parse::<i32>()
        .unwrap();
    let rss = || {
        let s = std::fs::read_to_string(format!("/proc/{hub}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let mut tls = (*support::gateway_tls(&env)).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    // GET /version with a literal authority (HPACK, no Huffman).
    let mut head = vec![0x82, 0x87, 0x04, 8];
    head.extend(b"/version");
    head.extend([0x01, 9]);
    head.extend(b"localhost");
    // A header field of 110 bytes, repeated in each CONTINUATION.
    let mut field = vec![0x00, 10];
    field.extend(b"x-aaaaaaaa");
    field.push(96);
    field.extend([b'v'; 96]);
    let before = rss();
    for attack in [
        "rapid reset",
        "continuation flood",
        "settings flood",
        "ping flood",
        "streams without a token",
    ] {
        let (mut s, out) = h2_client(&gateway, &tls, Duration::from_millis(50));
        s.write_all(&out).unwrap();
        let (mut got, mut sent, mut code, mut closed) = (Vec::new(), 0usize, None, false);
        let mut buf = vec![0u8; 1 << 16];
        // At most 20,000 frames, 100 per write; read between writes.
        while sent < 20_000 && code.is_none() && !closed {
            let mut batch = Vec::new();
            for i in 0..100 {
                let stream = 2 * (sent + i) as u32 + 1;
                match attack {
                    "rapid reset" => {
                        batch.extend(h2_frame(1, 0x5, stream, &head));
                        batch.extend(h2_frame(3, 0, stream, &8u32.to_be_bytes()));
                    }
                    // The initial window toggled: each walks every open
                    // stream.
                    "settings flood" => {
                        let window = if i % 2 == 0 {
                            [0, 0, 0, 0]
                        } else {
                            [0, 0, 255, 255]
                        };
                        let mut setting = vec![0, 4];
                        setting.extend(window);
                        batch.extend(h2_frame(4, 0, 0, &setting));
                    }
                    "ping flood" => batch.extend(h2_frame(6, 0, 0, &[0; 8])),
                    // Requests whose bodies never come, no token.
                    "streams without a token" => batch.extend(h2_frame(1, 0x4, stream, &head)),
                    _ if sent + i == 0 => batch.extend(h2_frame(1, 0x1, 1, &head)),
                    _ => batch.extend(h2_frame(9, 0, 1, &field)),
                }
            }
            sent += 100;
            if s.write_all(&batch).and_then(|()| s.flush()).is_err() {
                closed = true;
            }
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            code = goaway_code(&got);
        }
        match attack {
            // h2's own limits: a GOAWAY.
            "rapid reset" | "continuation flood" => assert_eq!(
                code,
                Some(11),
                "{attack}: no GOAWAY (ENHANCE_YOUR_CALM) after {sent} frames (closed: {closed}; {} bytes read)",
                got.len()
            ),
            // Refused 401s close it (a GOAWAY) or the count of streams
            // before a token does.
            "streams without a token" => assert!(
                closed || code.is_some(),
                "{attack}: still open after {sent} frames ({} bytes read)",
                got.len()
            ),
            // The gateway's frame budgets (`h2guard`): the connection ends.
            _ => assert!(
                closed,
                "{attack}: still open after {sent} frames ({} bytes read)",
                got.len()
            ),
        }
        let bound = match attack {
            // 1,000 at once, then 500 a second.
            "ping flood" => 4_000,
            _ => 1_000,
        };
        assert!(sent <= bound, "{attack}: cut only after {sent} frames");
    }
    // A thousand requests at once without a token, bodies never sent: at
    // most 256 are taken (h2 allows 1,000 streams; each was served a 401).
    {
        let (mut s, mut out) = h2_client(&gateway, &tls, Duration::from_millis(200));
        for i in 0..1000u32 {
            out.extend(h2_frame(1, 0x4, 2 * i + 1, &head));
        }
        let _ = s.write_all(&out).and_then(|()| s.flush());
        let got = read_h2_until(&mut s, Duration::from_secs(15), |_| false);
        let answers = h2_frame_kinds(&got).iter().filter(|f| f.0 == 1).count();
        assert!(
            answers <= 256,
            "{answers} requests without a token answered on one connection"
        );
    }
    // With a valid token, 300 at once on a new connection are all
    // answered: those past the first 256 wait for one of those to have
    // authenticated (they were cut with the connection).
    {
        let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
        let mut authed = head.clone();
        authed.extend([0x0f, 0x08]);
        authed.extend(hpack_string(format!("Bearer {}", token.trim()).as_bytes()));
        let (mut s, mut out) = h2_client(&gateway, &tls, Duration::from_millis(200));
        for i in 0..300u32 {
            out.extend(h2_frame(1, 0x5, 2 * i + 1, &authed));
        }
        s.write_all(&out).unwrap();
        s.flush().unwrap();
        let answered = |got: &[u8]| h2_frame_kinds(got).iter().filter(|f| f.0 == 1).count();
        let got = read_h2_until(&mut s, Duration::from_secs(15), |g| answered(g) >= 300);
        assert_eq!(answered(&got), 300, "{} bytes read", got.len());
    }
    // The hub serves on, and holds no more than it did.
    assert_healthy(&gateway, "/healthz");
    let after = rss();
    assert!(
        after < before + 8 * 1024,
        "the hub's RSS grew from {before} KiB to {after} KiB"
    );
}

/// An HTTP/2 string literal (no Huffman): its length as an HPACK integer
/// with a 7-bit prefix, then its bytes.
fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if s.len() < 127 {
        out.push(s.len() as u8);
    } else {
        out.push(127);
        let mut rest = s.len() - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(s);
    out
}

/// An operator's HTTP/2 connection, idle past the gateway's idle timeout,
/// that never answers the PING of the graceful close: hyper waits for the
/// answer before its final GOAWAY, and the connection (with a descriptor of
/// the hub) was held for ever, outside the caps on unauthenticated
/// connections and on streams. Now it is dropped `CLOSE_GRACE` (10 s) after
/// the graceful close began. (The idle timeout is 2 s here, 120 s by
/// default.)
#[test]
fn an_idle_http2_connection_that_ignores_the_closing_ping_is_dropped() {
    let env = Env::new();
    assert!(env
        .up_with_env(&[("TOWERCTL_GATEWAY_IDLE_TIMEOUT", "2")])
        .ok());
    let gateway = format!("127.0.0.1:{}", env.gateway_port());
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut tls = (*support::gateway_tls(&env)).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(tls), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(&gateway).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // GET /version as the admin: authenticated (a 404: no member named).
    let mut head = vec![0x82, 0x87, 0x04, 8];
    head.extend(b"/version");
    head.extend([0x01, 9]);
    head.extend(b"localhost");
    head.push(0x00);
    head.extend(hpack_string(b"authorization"));
    head.extend(hpack_string(format!("Bearer {}", token.trim()).as_bytes()));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    out.extend(h2_frame(1, 0x5, 1, &head));
    s.write_all(&out).unwrap();
    s.flush().unwrap();
    // Read everything, answer nothing (not the server's SETTINGS, not its
    // PINGs), until the hub closes the connection. Bounded: 40 s.
    let (start, mut got, mut closed) = (Instant::now(), Vec::new(), None);
    let mut buf = vec![0u8; 1 << 16];
    while closed.is_none() && start.elapsed() < Duration::from_secs(40) {
        match s.read(&mut buf) {
            Ok(0) => closed = Some(start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => closed = Some(start.elapsed()),
        }
    }
    // The request was answered, and the graceful close began (GOAWAY).
    let mut at = 0;
    let (mut headers, mut goaway, mut pings) = (false, false, 0);
    while got.len() >= at + 9 {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        match got[at + 3] {
            1 => headers = true,
            6 => pings += 1,
            7 => goaway = true,
            _ => {}
        }
        at += 9 + len;
    }
    assert!(headers, "no answer to the authenticated request");
    assert!(goaway, "no GOAWAY once idle ({} bytes read)", got.len());
    let closed = closed.unwrap_or_else(|| {
        panic!("the hub kept an idle connection that ignores its PING ({pings} PINGs) for 40 s")
    });
    assert!(
        closed < Duration::from_secs(25),
        "dropped only after {closed:?}"
    );
    eprintln!("dropped after {closed:?}, {pings} PINGs unanswered");
}

/// A kept-alive HTTP/1.1 connection of an operator stays open while idle
/// for less than the idle timeout: hyper's timer for a request's head also
/// ran while the connection waited for its next request, and closed every
/// idle connection after 10 s (a client's request crossing that close
/// fails; a POST is not sent again). The first head is still held to the
/// 10 s pre-auth deadline.
#[test]
fn an_operators_idle_http1_connection_is_kept_to_the_idle_timeout() {
    let env = Env::new();
    assert!(env
        .up_with_env(&[("TOWERCTL_GATEWAY_IDLE_TIMEOUT", "30")])
        .ok());
    let gateway = format!("127.0.0.1:{}", env.gateway_port());
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let conn =
        rustls::ClientConnection::new(support::gateway_tls(&env), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = TcpStream::connect(&gateway).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let ask = |s: &mut rustls::StreamOwned<_, TcpStream>| -> std::io::Result<String> {
        let req = format!(
            "GET /towerctl/v1/clusters HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        );
        s.write_all(req.as_bytes())?;
        s.flush()?;
        let mut buf = vec![0u8; 1 << 16];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let first = ask(&mut s).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Idle for longer than a head may take, less than the idle timeout.
    std::thread::sleep(Duration::from_secs(13));
    let again = ask(&mut s).map_err(|e| e.to_string());
    assert!(
        again
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "the kept-alive connection was closed while idle for 13 s: {again:?}"
    );
}

/// An agent that takes nothing gets its requests answered with 504 after
/// 20 s, and a session the hub ends (a revoke here; a removal, a rotation,
/// a newer session and a hand-off end theirs the same way) ends even so: stopped here, as a key holder that leaves a key
/// exchange unfinished is to the hub. The hub's DISCONNECT waited for the
/// peer, so the revoked session stayed registered, its connection open,
/// until keepalives declared it dead (60 s here, three intervals).
#[test]
fn a_session_the_hub_ends_is_cut_even_when_its_agent_takes_nothing() {
    let env = Env::new();
    let api = ApiServer::start();
    let o = env.up_limited(4096, &["--keepalive", "60s"]);
    assert!(o.ok(), "{o:?}");
    join_alpha(&env, &api);
    let agent = env.pid_of("agent-alpha").unwrap();
    let state = || env.status()["hub"]["clusters"][0]["state"].clone();
    assert_eq!(state(), "connected");
    // SAFETY: a plain signal to a process this test started.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let _cont = support::scopeguard_cont(agent);
    // A request to it meanwhile is answered when the agent accepts no
    // stream (it waited as long as the agent took: for ever for a key
    // holder that answers pings only).
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let gw = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "40",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"))
    .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
    .arg(format!("{}/clusters/alpha/api", gw.trim_end_matches('/')));
    let o = support::run_bounded(curl, Duration::from_secs(60));
    assert!(
        o.stdout.ends_with("\n504") && o.stdout.contains("did not accept a stream within 20s"),
        "{o:?}"
    );
    let o = env.towerctl(&["cluster", "revoke", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let t = Instant::now();
    wait_for(
        "the revoked session to end",
        Duration::from_secs(15),
        || (state() != "connected").then_some(()),
    );
    eprintln!("status says so {:?} after the revoke", t.elapsed());
    // From the hub's own log: the revoke, and the session's end ~1 s
    // later (without the cut, ~8 s here with a stopped agent, and never
    // with a key holder that keeps a key exchange open).
    let log = wait_for("the hub to log the end", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).ok()?;
        log.contains("agent disconnected").then_some(log)
    });
    let at = |needle: &str| -> f64 {
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no '{needle}' in the hub's log:\n{log}"));
        // 2026-12-06T10:25:00.398754Z: seconds of the day.
        let hms: Vec<f64> = line[11..26]
            .split(':')
            .map(|x| x.parse().unwrap())
            .collect();
        hms[0] * 3600.0 + hms[1] * 60.0 + hms[2]
    };
    // Across midnight the day's seconds start again.
    let took = (at("agent disconnected") - at("member revoked")).rem_euclid(86_400.0);
    assert!(
        (0.0..4.0).contains(&took),
        "the session ended {took:.1} s after the revoke:\n{log}"
    );
    assert!(log.contains("was revoked on the hub"), "{log}");
}

/// `/` is a health path on the tunnel port, but an upgrade a proxy mangled
/// on the way (nginx left at HTTP/1.0 drops Upgrade and Connection, and
/// passes the Sec-WebSocket fields) is still answered as an upgrade
/// attempt (426, 505: what the agent's hints explain), and a whole
/// upgrade to `/` goes through.
#[test]
fn an_upgrade_to_the_root_path_is_never_taken_for_a_health_check() {
    let env = Env::new();
    assert!(env.up().ok());
    let tunnel = tunnel_address(&env);
    let mangled = exchange(
        &tunnel,
        b"GET / HTTP/1.1\r\nHost: hub\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(mangled.starts_with("HTTP/1.1 426 "), "{mangled}");
    let mangled = exchange(
        &tunnel,
        b"GET / HTTP/1.0\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(mangled.starts_with("HTTP/1.1 505 "), "{mangled}");
    let connection_only = exchange(
        &tunnel,
        b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n",
    );
    assert!(
        connection_only.starts_with("HTTP/1.1 426 "),
        "{connection_only}"
    );
    let to_root =
        String::from_utf8(ws_upgrade(&tunnel))
            .unwrap()
            .replacen("GET /tunnel ", "GET / ", 1);
    assert!(to_root.starts_with("GET / HTTP/1.1"), "{to_root}");
    let mut s = TcpStream::connect(&tunnel).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(to_root.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // A proxy that puts its own `Connection: keep-alive` line ahead of the
    // agent's `Connection: Upgrade` (or lists both on one line): still an
    // upgrade (tungstenite read the first line alone: 426).
    for split in [
        "Connection: keep-alive\r\nConnection: Upgrade\r\n",
        "Connection: keep-alive, Upgrade\r\n",
    ] {
        let upgrade = String::from_utf8(ws_upgrade(&tunnel)).unwrap().replacen(
            "Connection: Upgrade\r\n",
            split,
            1,
        );
        let mut s = TcpStream::connect(&tunnel).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(upgrade.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101", "{split:?}");
    }
}

/// One HTTP/1.1 request on a fresh TLS connection to `env`'s gateway with
/// `token`: the stream, and the answer's head and as much of its body as
/// the first read brought (lower case).
fn gateway_request(
    env: &Env,
    token: &str,
    path: &str,
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    String,
) {
    let gw = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let tcp = TcpStream::connect(&gw).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(support::gateway_tls(env), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    (s, text)
}

/// The gateway's address and a TLS client for it offering `h2` alone.
fn h2_to_the_gateway(env: &Env) -> (String, rustls::ClientConfig) {
    let gw = env.status()["hub"]["gatewayAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let mut tls = (*support::gateway_tls(env)).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    (gw, tls)
}

/// CONNECT on an `h2` connection (kubectl's kind, not port-forward's own)
/// is refused in words: 1,000 streams at once on one such connection
/// escaped the limit on port-forward connections, whose uploads the hub
/// holds outside the members' budgets.
#[test]
fn connect_over_plain_http2_is_refused() {
    let env = Env::new();
    assert!(env.up().ok());
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let (gw, tls) = h2_to_the_gateway(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(async {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect(&gw).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("web.default.svc.alpha:80")
            .header("authorization", format!("Bearer {}", admin.trim()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).to_string())
    });
    assert_eq!(status.as_u16(), 405, "{body}");
    assert!(body.contains("not over HTTP/2"), "{body}");
}

/// An `h2` connection (kubectl's) may send 256 KiB of request bodies
/// ahead of the member taking them, per stream and for the connection:
/// hyper's 1 MiB, across the 4,096 connections one operator may hold, let
/// one token make the hub hold 4 GiB. Read from the hub's first frames.
#[test]
fn an_http2_connection_may_send_256_kib_ahead() {
    let env = Env::new();
    assert!(env.up().ok());
    let (gw, tls) = h2_to_the_gateway(&env);
    let tcp = TcpStream::connect(&gw).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(tls), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // The client preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let (mut stream_window, mut conn_update) = (None, None);
    let mut head = [0u8; 9];
    // The hub's SETTINGS and WINDOW_UPDATE come first; bounded frames.
    for _ in 0..8 {
        if s.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, stream) = (
            head[3],
            u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
        );
        let mut payload = vec![0u8; len.min(1 << 16)];
        s.read_exact(&mut payload).unwrap();
        match kind {
            0x4 => {
                for e in payload.chunks_exact(6) {
                    if u16::from_be_bytes([e[0], e[1]]) == 0x4 {
                        stream_window = Some(u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
                    }
                }
            }
            0x8 if stream == 0 => {
                conn_update = Some(u32::from_be_bytes([
                    payload[0] & 0x7f,
                    payload[1],
                    payload[2],
                    payload[3],
                ]))
            }
            _ => {}
        }
        if stream_window.is_some() && conn_update.is_some() {
            break;
        }
    }
    assert_eq!(stream_window, Some(256 * 1024), "a stream's window");
    // Raised from HTTP/2's 65,535 to 256 KiB.
    assert_eq!(
        conn_update,
        Some(256 * 1024 - 65_535),
        "the connection's window"
    );
}

/// `towerctl port-forward`'s multiplexed HTTP/2 connections (each can
/// make the hub hold 16 MiB of uploads outside the members' window
/// budgets) are counted apart, under a smaller limit per operator: past
/// it, one not carrying a stream is closed for the new one; with all
/// carrying streams, the new port-forward's connection is refused in
/// words, and gets through once a stream ends.
#[test]
fn one_operators_port_forward_connections_are_bounded() {
    let hub = Env::new();
    let api = ApiServer::start();
    // A target that holds every connection open until its client closes
    // it, counting them.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let holder_port = holder.local_addr().unwrap().port();
    let held = Arc::new(AtomicUsize::new(0));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            // Bounded: a dozen connections, each at most a minute.
            for mut c in holder.incoming().take(12).flatten() {
                held.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = [0u8; 1024];
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
    }
    let o = hub.up_with_env(&[("TOWERCTL_MAX_MUX_CONNECTIONS_PER_OPERATOR", "2")]);
    assert!(o.ok(), "{o:?}");
    let join = hub.cluster_add("alpha");
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let allow = format!("127.0.0.1:{holder_port}");
    let o = hub.join(
        &join,
        &["--kubeconfig", kc.to_str().unwrap(), "--allow", &allow],
    );
    assert!(o.ok(), "{o:?}");
    let o = hub.towerctl(&["operator", "add", "alice"]);
    assert!(o.ok(), "{o:?}");
    assert!(hub
        .towerctl(&["access", "allow", "operator:alice", "--names", "alpha"])
        .ok());
    let laptop = Env::new();
    let login = support::printed_command(&o.stdout, "login");
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let o = laptop.towerctl(&args);
    assert!(o.ok(), "{o:?}");

    api.add_pod(
        "default",
        "holder",
        "127.0.0.1",
        &[("app", "holder")],
        true,
        &[("tcp", holder_port)],
    );
    let forwards: Vec<support::Streaming> = (0..3)
        .map(|_| {
            // A numeric port: forwarded even if the target check times out
            // on a loaded machine.
            let remote = format!(":{holder_port}");
            support::Streaming::start(laptop.towerctl_cmd(&[
                "port-forward",
                "alpha",
                "pod/holder",
                &remote,
                "--address",
                "127.0.0.1",
            ]))
        })
        .collect();
    let ports: Vec<u16> = forwards.iter().map(support::forwarded_port).collect();
    let through = |i: usize| TcpStream::connect(("127.0.0.1", ports[i])).unwrap();
    // Two port-forwards, each carrying a stream: their connections busy.
    let first = through(0);
    let _second = through(1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while held.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        held.load(Ordering::SeqCst),
        2,
        "two streams held: {}\n{}",
        forwards[0].output(),
        forwards[1].output()
    );
    // The third's is refused: the connection through it is closed, and
    // the port-forward says why.
    let mut third = through(2);
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 16];
    let r = third.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || r.is_err() && forwards[2].output().contains("holds"),
        "{r:?}"
    );
    forwards[2].wait_for(
        "holds 2 port-forward connections to the gateway",
        Duration::from_secs(10),
    );
    assert_eq!(
        held.load(Ordering::SeqCst),
        2,
        "the third reached the target"
    );
    // One stream ends: its connection idle, the third's takes its place.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    wait_for(
        "the third port-forward through",
        Duration::from_secs(15),
        || {
            let _c = through(2);
            std::thread::sleep(Duration::from_millis(300));
            (held.load(Ordering::SeqCst) >= 3).then_some(_c)
        },
    );
}

/// A valid operator token holds at most `TOWERCTL_MAX_CONNECTIONS_PER_OPERATOR`
/// gateway connections: past it the operator's oldest idle one is closed
/// for the new one, and with all of them busy (watches) the new one is
/// refused in words (429); the local admin's are not counted. Without it,
/// a token holder could hold any number of connections (descriptors, TLS
/// buffers): the pre-authentication caps stop counting a connection at
/// its first valid token.
#[test]
fn one_operators_gateway_connections_are_bounded() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[("TOWERCTL_MAX_CONNECTIONS_PER_OPERATOR", "3")]);
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let o = env.towerctl(&["operator", "add", "bob"]);
    assert!(o.ok(), "{o:?}");
    let token = support::printed_command(&o.stdout, "login")[3]
        .trim_start_matches("TOWERCTL_OPERATOR_TOKEN=")
        .to_string();
    assert!(env
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());

    // Three idle connections, then a fourth: served, and the oldest idle
    // one is closed.
    let mut idle: Vec<_> = (0..3)
        .map(|_| {
            let (s, head) = gateway_request(&env, &token, "/towerctl/v1/whoami");
            assert!(head.starts_with("http/1.1 200"), "{head}");
            s
        })
        .collect();
    let (_fourth, head) = gateway_request(&env, &token, "/towerctl/v1/whoami");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut rest = Vec::new();
    let closed = idle[0].read_to_end(&mut rest);
    let kind = closed.as_ref().err().map(std::io::Error::kind);
    assert!(
        matches!(closed, Ok(0))
            || matches!(
                kind,
                Some(std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset)
            ),
        "the oldest idle connection was not closed: {closed:?} {rest:?}"
    );
    drop(idle.remove(0));
    drop(idle);
    drop(_fourth);
    // (Their ends reach the hub: none left idle to make room.)
    std::thread::sleep(Duration::from_millis(500));

    // Three busy ones (watches): a fourth connection is refused, in words.
    let watch = "/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true";
    let watches: Vec<_> = (0..3)
        .map(|i| {
            let (s, head) = wait_for("a watch", Duration::from_secs(15), || {
                let (s, head) = gateway_request(&env, &token, watch);
                head.starts_with("http/1.1 200").then_some((s, head))
            });
            assert!(
                head.contains("transfer-encoding: chunked"),
                "watch {i}: {head}"
            );
            s
        })
        .collect();
    let (_, head) = gateway_request(&env, &token, "/towerctl/v1/whoami");
    assert!(
        head.starts_with("http/1.1 429")
            && head.contains("holds 3 connections to the gateway, all busy"),
        "{head}"
    );
    // The local admin is not counted.
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let (_, head) = gateway_request(&env, admin.trim(), "/towerctl/v1/whoami");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // A watch ends: room again.
    drop(watches);
    wait_for("room for a new connection", Duration::from_secs(15), || {
        let (_, head) = gateway_request(&env, &token, "/towerctl/v1/whoami");
        head.starts_with("http/1.1 200").then_some(())
    });
}

/// A connection that has not authenticated gets a few public answers (the
/// CA, health checks), then is closed: one asked for the CA without end
/// for its whole pre-authentication deadline.
#[test]
fn public_requests_before_authenticating_are_few_per_connection() {
    let env = Env::new();
    assert!(env.up().ok());
    let mut s = support::gateway_stream(&env);
    let req = "GET /towerctl/v1/ca.crt HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(40);
    s.write_all(req.as_bytes()).unwrap();
    s.flush().unwrap();
    let got = support::read_until_closed(&mut s);
    let answered = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!((1..40).contains(&answered), "{answered} of 40 answered");
}

/// The gateway PINGs an HTTP/2 connection that carries nothing (an idle
/// watch): a balancer passing TLS through with a 30 s idle timeout cut
/// kubectl's idle watches (20 s by default, 1 s here).
#[test]
fn an_idle_http2_connection_is_pinged() {
    let env = Env::new();
    assert!(env
        .up_with_env(&[("TOWERCTL_GATEWAY_PING_INTERVAL", "1")])
        .ok());
    let (gw, tls) = h2_to_the_gateway(&env);
    let (mut s, out) = h2_client(&gw, &Arc::new(tls), Duration::from_millis(200));
    s.write_all(&out).unwrap();
    s.flush().unwrap();
    let pinged = |got: &[u8]| {
        h2_frame_kinds(got)
            .iter()
            .any(|&(k, f)| k == 6 && f & 1 == 0)
    };
    let got = read_h2_until(&mut s, Duration::from_secs(5), pinged);
    assert!(
        pinged(&got),
        "no PING within 5 s ({} bytes read)",
        got.len()
    );
}

/// kubectl (HTTP/2) with a request line past the head limit is refused
/// once: the gateway's limit is in its SETTINGS, and Go refuses the
/// request itself. Past 64 KiB the path is more than `http::Uri` holds:
/// with a higher limit h2 reset the stream, and Go sent it again on a new
/// connection every few milliseconds until its timeout.
#[test]
fn a_request_line_past_the_head_limit_over_http2_is_refused_once() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    join_alpha(&env, &api);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let long = format!("/version?q={}", "a".repeat(70_000));
    let o = env.kubectl(&["get", "--raw", &long, "--request-timeout=20s"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("request header list larger than peer's advertised limit")
            && !o.stderr.contains("deadline"),
        "{o:?}"
    );
    let o = env.kubectl(&[
        "get",
        "--raw",
        &format!("/version?q={}", "a".repeat(30_000)),
    ]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
}

/// The request head limit (64 KiB) holds for one long header too: hyper's
/// read buffer took a single header of 100 KB.
#[test]
fn one_long_header_is_held_to_the_head_limit() {
    let env = Env::new();
    assert!(env.up().ok());
    let mut s = support::gateway_stream(&env);
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Long: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    // Most of it first (hyper reads it and waits for more, under its
    // buffer's limit), then the rest at once: a head past the limit
    // that its read buffer took whole.
    s.write_all(&req.as_bytes()[..60_000]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&req.as_bytes()[60_000..]).unwrap();
    s.flush().unwrap();
    let got = String::from_utf8_lossy(&support::read_until_closed(&mut s)).to_string();
    assert!(
        got.starts_with("HTTP/1.1 431 "),
        "{}",
        &got[..got.len().min(300)]
    );
}

/// A member API server of its own kind (a hostile or broken one): each
/// connection is answered by `answer(path)`, raw, then closed.
fn raw_member(answer: fn(&str) -> String) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                let _ = c.write_all(answer(&path).as_bytes());
            });
        }
    });
    addr
}

/// Answers a member may send that a proxy must still carry: both
/// `Transfer-Encoding` and `Content-Length` (the first frames it, RFC
/// 9112 §6.3: the stream broke, "the agent did not answer"), and HTTP/1.0
/// (passed on as HTTP/1.0, it closed an HTTP/1.1 client's connection to
/// the gateway, whatever member that connection went to next).
#[test]
fn a_members_odd_but_valid_answers_are_carried_in_http_1_1() {
    let member = raw_member(|path| {
        if path.ends_with("/tecl") {
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
             Transfer-Encoding: chunked\r\n\r\n11\r\nseventeen bytes!!\r\n0\r\n\r\n"
                .to_string()
        } else if path.ends_with("/http10") {
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nan old answer".to_string()
        } else {
            let body = r#"{"major":"1","minor":"32","gitVersion":"v1.32.0"}"#;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
    });
    let env = Env::new();
    env.up();
    let kc = env.path("member.kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: m\n  cluster:\n    server: http://{member}\n\
             users:\n- name: m\n  user:\n    token: t\n\
             contexts:\n- name: m\n  context:\n    cluster: m\n    user: m\n\
             current-context: m\n"
        ),
    )
    .unwrap();
    let join = env.cluster_add("alpha");
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let token = token.trim();
    let (code, body) = support::gateway_get(&env, token, "/clusters/alpha/x/tecl");
    assert_eq!((code.as_str(), body.as_str()), ("200", "seventeen bytes!!"));

    // HTTP/1.1 to the gateway: the HTTP/1.0 answer comes in HTTP/1.1 and
    // the connection stays for the next request.
    let gw = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sSv",
        "--http1.1",
        "--max-time",
        "20",
        "--cacert",
        env.path("data/towerctl/ca.crt").to_str().unwrap(),
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("{gw}/clusters/alpha/x/http10"),
        &format!("{gw}/clusters/alpha/version"),
    ]);
    let o = support::run_bounded(curl, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    assert!(
        o.stdout.contains("an old answer") && o.stdout.contains("gitVersion"),
        "{o:?}"
    );
    assert!(!o.stderr.contains("< HTTP/1.0"), "{}", o.stderr);
    assert!(
        o.stderr.contains("Re-using existing connection"),
        "{}",
        o.stderr
    );
}

/// Two agents with one member's key (a copied config, an old install left
/// running) take turns replacing each other, each back after its
/// backoff, and every turn cuts the requests in flight: the hub says so,
/// at warn and in the member's events, where it said only "a new
/// session replaces the previous one" at info, as for any reconnection.
#[test]
fn two_agents_with_one_key_are_said_to_take_turns() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let kc = join_alpha(&env, &api);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.path("config/towerctl/agents/alpha.json")).unwrap(),
    )
    .unwrap();
    let twin = Env::new();
    let cmd = twin.towerctl_cmd(&[
        "agent",
        "run",
        "alpha",
        "--hub",
        cfg["hub"].as_str().unwrap(),
        "--hub-key",
        cfg["hub_key"].as_str().unwrap(),
        "--key-file",
        env.path("config/towerctl/agents/alpha.key")
            .to_str()
            .unwrap(),
        "--kubeconfig",
        kc.to_str().unwrap(),
    ]);
    let _twin_agent = support::Streaming::start(cmd);
    let log = env.path("state/towerctl/hub.log");
    let said = wait_for(
        "the hub to say two agents take turns",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("two agents hold cluster 'alpha''s key"))
                .map(str::to_string)
        },
    );
    assert!(
        said.contains("WARN") && said.contains("stop one of them"),
        "{said}"
    );
    let s = env.status();
    let events = s["hub"]["clusters"][0]["events"].to_string();
    assert!(
        events.contains("take turns replacing each other"),
        "{events}"
    );
}

/// A relay on loopback between agents and the hub whose connections can
/// be cut on the agent's side alone: the agent sees its connection reset
/// at once (a NAT or balancer resetting it, a Wi-Fi or VPN switch) while
/// the hub's side stays open and silent (what the hub sends is read and
/// dropped). New connections go through.
struct HalfCutRelay {
    addr: std::net::SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<RelayedConn>>>,
}

/// A relayed connection: whether it was cut, and its agent's side.
type RelayedConn = (Arc<std::sync::atomic::AtomicBool>, TcpStream);

impl HalfCutRelay {
    fn start(target: std::net::SocketAddr) -> HalfCutRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<RelayedConn>>> = Default::default();
        let all = conns.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(client) = c else { return };
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
                all.lock()
                    .unwrap()
                    .push((cut.clone(), client.try_clone().unwrap()));
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, client),
                ] {
                    let cut = cut.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        // Bounded: a cut connection's hub side is read for
                        // at most two minutes.
                        let until = Instant::now() + Duration::from_secs(120);
                        let _ = from.set_read_timeout(Some(Duration::from_secs(1)));
                        while Instant::now() < until {
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if !cut.load(Ordering::Relaxed)
                                        && to.write_all(&buf[..n]).is_err()
                                    {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) if cut.load(Ordering::Relaxed) => {
                                    std::thread::sleep(Duration::from_millis(100))
                                }
                                Err(_) => break,
                            }
                        }
                        if !cut.load(Ordering::Relaxed) {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    });
                }
            }
        });
        HalfCutRelay { addr, conns }
    }

    /// Every connection open now is closed on the agent's side and goes
    /// silent on the hub's.
    fn cut_agent_sides(&self) {
        for (cut, client) in self.conns.lock().unwrap().drain(..) {
            cut.store(true, Ordering::Relaxed);
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One agent whose connection is reset on its side twice (it logs in
/// again at once, while the hub still holds the old session, silent) is
/// not said to be two agents: the old session is asked, and does not
/// answer. The first version judged by its last keepalive (none
/// outstanding: taken as answering) and warned.
#[test]
fn one_agent_whose_path_dies_is_not_taken_for_two() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with(&["--keepalive", "5s"]);
    let mut join = env.cluster_add("alpha");
    let hub = join.iter().position(|a| a == "--hub").unwrap() + 1;
    let tunnel: std::net::SocketAddr = join[hub]
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap();
    let relay = HalfCutRelay::start(tunnel);
    join[hub] = join[hub].replace(&tunnel.to_string(), &relay.addr.to_string());
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let sessions = |env: &Env| {
        env.status()["hub"]["clusters"][0]["reconnects"]
            .as_u64()
            .unwrap_or(0)
    };
    for round in 1..=2u64 {
        let before = sessions(&env);
        relay.cut_agent_sides();
        wait_for("the agent to log in again", Duration::from_secs(30), || {
            (sessions(&env) > before).then_some(())
        });
        eprintln!("round {round}: logged in again");
    }
    // The replaced sessions' questions (2 s each) are answered or not by now.
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    assert!(!log.contains("two agents hold"), "{log}");
    assert_eq!(env.status()["hub"]["clusters"][0]["state"], "connected");
}

/// An agent's key holder answering each request with informational heads
/// (`100 Continue`) and never a final answer, within its window. hyper
/// reads past 1xx heads without a bound, each costing the hub far more per
/// byte than a body (measured by a review: ~160 ns against ~10, the hub's
/// one thread busy, every member slowed), for as long as the request
/// lived: 130 s, or a watch's whole life. The hub takes 8
/// (`gateway::MAX_INFORMATIONAL`) and answers 502 in words.
#[test]
fn an_agent_answering_informational_heads_without_end_is_cut_off() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (key, tunnel) = alpha_key_without_its_agent(&env, &api);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let heads = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(4_000);
    let _session = rt
        .block_on(sshflood::login_with_key_answering(
            tunnel, "alpha", &key, heads,
        ))
        .expect("the agent's key logs in");
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    for path in [
        "/clusters/alpha/version",
        "/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true",
    ] {
        let start = Instant::now();
        let (code, body) = support::gateway_get(&env, admin.trim(), path);
        let took = start.elapsed();
        let log =
            || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
        assert_eq!(code, "502", "{path} after {took:?}: {body}");
        assert!(
            body.contains("more than 8 informational (1xx) answers"),
            "{path}: {body}\n{}",
            log()
        );
        assert!(took < Duration::from_secs(8), "{path} took {took:?}");
    }
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(
        log.contains("informational (1xx) answers to one request") && log.contains("alpha"),
        "{log}"
    );
    drop(rt);
}
