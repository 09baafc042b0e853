//! Per-stream flow control through the tunnel: a client that stops reading
//! one stream stops only that stream. The real towerctl binary (hub, agent,
//! `towerctl port-forward`), the real kubectl, the stand-in API server.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::apiserver::{ApiServer, TargetPort};
use support::{forwarded_port, metric, metrics_addr, wait_for, Env, Streaming};

/// Byte `n` of the endless stream: a pattern that catches a lost, repeated
/// or reordered byte anywhere.
fn pattern(n: u64) -> u8 {
    (n % 251) as u8
}

/// The pattern from byte 0, long enough for any 64 KiB read at any offset
/// ([`read_checked`]) and a whole number of periods (251 bytes), so that
/// writing its first [`PERIODS`] bytes over and over continues it.
fn pattern_buf() -> &'static [u8] {
    static BUF: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUF.get_or_init(|| (0..PERIODS as u64 + 64 * 1024 + 251).map(pattern).collect())
}

/// 256 periods of the pattern: one write of the endless writers.
const PERIODS: usize = 251 * 256;

/// A TCP server that writes the pattern to every connection until the
/// connection fails. Threads end with their connections.
fn endless_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            endless_writer(conn);
        }
    });
    port
}

/// Service `default/stream` in the stand-in, its endpoint an
/// [`endless_server`].
fn stream_service(api: &ApiServer) {
    let upstream = endless_server();
    api.add_service(
        "default",
        "stream",
        &[("data", 80, TargetPort::Name("data"))],
        &[("app", "stream")],
    );
    api.set_endpoints("default", "stream", &[("127.0.0.1", "data", upstream)]);
}

/// Service `default/sink` in the stand-in, its endpoint a local server on
/// `port` (the upload tests' sinks).
fn sink_service(api: &ApiServer, port: u16) {
    api.add_service(
        "default",
        "sink",
        &[("data", 80, TargetPort::Name("data"))],
        &[("app", "sink")],
    );
    api.set_endpoints("default", "sink", &[("127.0.0.1", "data", port)]);
}

/// Registers member `alpha` and joins it to the stand-in, with `extra`
/// flags and `vars` in the agent's environment.
fn join_alpha(env: &Env, api: &ApiServer, extra: &[&str], vars: &[(&str, &str)]) {
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let mut flags = vec![
        "--kubeconfig",
        member_kc.to_str().unwrap(),
        // The stand-in's endpoints are on loopback: the dial policy needs
        // a rule naming those addresses.
        "--allow",
        "127.0.0.0/8",
    ];
    flags.extend_from_slice(extra);
    let o = env.join_with_env(&join, &flags, vars);
    assert!(o.ok(), "join failed: {o:?}");
}

/// Reads exactly `len` bytes starting at stream offset `*at`, checking each
/// against the pattern.
fn read_checked(s: &mut TcpStream, at: &mut u64, len: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let end = *at + len;
    while *at < end {
        let want = ((end - *at) as usize).min(buf.len());
        let n = s.read(&mut buf[..want]).unwrap_or_else(|e| {
            panic!("read failed at byte {at}: {e}");
        });
        assert!(n > 0, "the stream ended at byte {at}");
        let from = (*at % 251) as usize;
        if buf[..n] != pattern_buf()[from..from + n] {
            let i = (0..n)
                .find(|i| buf[*i] != pattern(*at + *i as u64))
                .unwrap_or(0);
            panic!(
                "byte {} is wrong: a byte was lost or repeated",
                *at + i as u64
            );
        }
        *at += n as u64;
    }
}

/// A TCP server for the upload direction: on its first connection it
/// reads and checks 1 MiB, stops reading until `release` says so, then
/// reads and checks 32 MiB more and reports the total it verified.
fn stalling_sink() -> (
    u16,
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<u64>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = l.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut at = 0u64;
        read_checked(&mut conn, &mut at, 1 << 20);
        if release_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            return;
        }
        read_checked(&mut conn, &mut at, 32 << 20);
        let _ = done_tx.send(at);
    });
    (port, release_tx, done_rx)
}

/// Writes the pattern to `s` until a write fails.
fn endless_writer(mut s: TcpStream) {
    std::thread::spawn(move || {
        let buf = &pattern_buf()[..PERIODS];
        while s.write_all(buf).is_ok() {}
    });
}

/// The stall lasts 12 s in the regular suite: twelve keepalive intervals
/// (1 s in tests), four times the three intervals after which a silent
/// member is declared dead, so a frozen session cannot survive it; the
/// issue's 30 s adds nothing the shorter stall does not show.
const STALL: Duration = Duration::from_secs(12);

#[test]
fn a_stalled_reader_stops_only_its_own_stream() {
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    let (sink, release, verified) = stalling_sink();
    sink_service(&api, sink);
    env.up();
    join_alpha(&env, &api, &["--keepalive", "1s"], &[]);
    let o = env.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "use failed: {o:?}");
    // kubectl's discovery (a dozen requests) once before the stall, as on
    // any machine that used the context before: the bound below is for
    // one get, not for a cold cache on a loaded test machine.
    assert!(env.kubectl(&["get", "ns"]).ok());

    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let port = forwarded_port(&pf);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut at = 0u64;
    read_checked(&mut client, &mut at, 1 << 20);
    // And an upload whose upstream stops reading after 1 MiB.
    let up = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/sink", ":80"]));
    let up_port = forwarded_port(&up);
    endless_writer(TcpStream::connect(("127.0.0.1", up_port)).unwrap());

    // The client stops reading. Everything else on the member goes on.
    let stalled = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let start = Instant::now();
        let o = env.kubectl(&["get", "ns"]);
        let took = start.elapsed();
        assert!(o.ok(), "kubectl get ns #{i} failed during the stall: {o:?}");
        // A get held behind the stalled stream would wait out the 12 s
        // stall; 3 s tells the two apart on a loaded machine (1 s did not
        // always: 1.003 s once with the rest of the suite running beside).
        assert!(
            took < Duration::from_secs(3),
            "kubectl get ns #{i} took {took:?} during the stall"
        );
        slowest = slowest.max(took);
        let s = env.status();
        let c = &s["hub"]["clusters"][0];
        assert_eq!(c["state"], "connected", "member not connected: {s}");
        assert_eq!(c["reconnects"], 0, "the member was declared dead: {s}");
        let left = STALL.saturating_sub(stalled.elapsed()) / (20 - i);
        std::thread::sleep(left.min(Duration::from_millis(600)));
    }
    wait_for("the stall to last", STALL + Duration::from_secs(5), || {
        (stalled.elapsed() >= STALL).then_some(())
    });
    eprintln!("slowest kubectl get during a {STALL:?} stall: {slowest:?}");

    // The readers resume: not a byte lost, either way.
    read_checked(&mut client, &mut at, 32 << 20);
    release.send(()).unwrap();
    let up_total = verified
        .recv_timeout(Duration::from_secs(30))
        .expect("the upload did not resume intact after the stall");
    assert_eq!(up_total, 33 << 20);
    let s = env.status();
    assert_eq!(s["hub"]["clusters"][0]["reconnects"], 0, "{s}");
}

/// A TCP server that reads every connection to its end, checking the
/// pattern, and reports how much each carried.
fn checking_sink() -> (u16, std::sync::mpsc::Receiver<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let mut at = 0u64;
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let from = (at % 251) as usize;
                            if buf[..n] != pattern_buf()[from..from + n] {
                                return;
                            }
                            at += n as u64;
                        }
                        Err(_) => return,
                    }
                }
                let _ = tx.send(at);
            });
        }
    });
    (port, rx)
}

#[test]
fn bulk_both_ways_on_many_streams_keeps_the_tunnel_moving() {
    // Hub and agent each have up to a stream window per stream in flight
    // towards the other. russh's session loops used to wait for each write
    // to end before reading again: once both sent more than the socket
    // buffers between them hold, neither read, so neither write ended, and
    // every stream of the member stopped until the keepalives gave up (the
    // stalled-reader test above caught it now and then once windows were
    // 8 MiB). Four downloads and four uploads at once put up to 32 MiB in
    // flight each way; all of it must arrive intact.
    const EACH: u64 = 32 << 20;
    const STREAMS: usize = 4;
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    let (sink, carried) = checking_sink();
    sink_service(&api, sink);
    env.up();
    join_alpha(&env, &api, &["--keepalive", "1s"], &[]);
    let down = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let down_port = forwarded_port(&down);
    let up = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/sink", ":80"]));
    let up_port = forwarded_port(&up);

    let mut threads = Vec::new();
    for _ in 0..STREAMS {
        let mut w = TcpStream::connect(("127.0.0.1", up_port)).unwrap();
        w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        threads.push(std::thread::spawn(move || {
            let buf = &pattern_buf()[..PERIODS];
            let mut left = EACH;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                w.write_all(&buf[..n]).expect("an upload stopped");
                left -= n as u64;
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
        }));
        let mut c = TcpStream::connect(("127.0.0.1", down_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        threads.push(std::thread::spawn(move || {
            let mut at = 0u64;
            read_checked(&mut c, &mut at, EACH);
        }));
    }
    for t in threads {
        t.join()
            .unwrap_or_else(|_| panic!("a stream stopped or came through wrong"));
    }
    for _ in 0..STREAMS {
        let got = carried
            .recv_timeout(Duration::from_secs(20))
            .expect("an upload did not arrive whole");
        assert_eq!(got, EACH);
    }
    let s = env.status();
    assert_eq!(s["hub"]["clusters"][0]["reconnects"], 0, "{s}");
}

/// Bulk download throughput through `towerctl port-forward`, for comparing
/// builds (docs/ARCHITECTURE.md quotes it). Opt-in: `TOWERCTL_FLOW_BENCH=1`;
/// reads for `TOWERCTL_FLOW_BENCH_SECS` (default 8) seconds, three times.
#[test]
fn bulk_throughput_through_a_port_forward() {
    if std::env::var("TOWERCTL_FLOW_BENCH").as_deref() != Ok("1") {
        eprintln!("skipped: set TOWERCTL_FLOW_BENCH=1");
        return;
    }
    let secs: u64 = std::env::var("TOWERCTL_FLOW_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    env.up();
    join_alpha(&env, &api, &[], &[]);
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let port = forwarded_port(&pf);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let mut total = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended");
            total += n as u64;
        }
        rates.push(total as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "bulk download through port-forward: {rates:.1?} MB/s, median {:.1}",
        rates[1]
    );
    assert!(rates[1] > 0.0);

    // Upload: the client writes, an upstream sink counts what arrives.
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in sink.incoming().take(3) {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    sink_service(&api, sink_port);
    let up = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/sink", ":80"]));
    let up_port = forwarded_port(&up);
    let mut up_rates = Vec::new();
    for _ in 0..3 {
        let mut client = TcpStream::connect(("127.0.0.1", up_port)).unwrap();
        let buf = vec![7u8; 256 * 1024];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            client.write_all(&buf).unwrap();
        }
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let total = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        up_rates.push(total as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    up_rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "bulk upload through port-forward: {up_rates:.1?} MB/s, median {:.1}",
        up_rates[1]
    );
    assert!(up_rates[1] > 0.0);
}

#[test]
fn past_the_window_budget_stalled_streams_cost_the_hub_only_small_windows() {
    // Every stream a member has open may have its window in flight towards
    // the hub, which buffers it while the stream's client does not read:
    // 8 MiB per port-forward connection, so one operator's 1,024 stalled
    // connections held gigabytes. Past a budget per member, the hub asks
    // the agent for 32 KiB windows. Here the budget is 1 byte, so every
    // stream gets 32 KiB.
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    let budget = [("TOWERCTL_WINDOW_BUDGET", "1")];
    env.up_with_env(&budget);
    join_alpha(&env, &api, &[], &budget);
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let port = forwarded_port(&pf);
    let hub = env.pid_of("hub").unwrap();
    let rss = || support::status_kib(hub, "VmRSS").unwrap();

    // One stream read through, so that the hub's buffers and pools are warm.
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut first_at = 0u64;
    read_checked(&mut first, &mut first_at, 4 << 20);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss();

    // 24 clients read 64 KiB each, then stop reading.
    let mut stalled = Vec::new();
    for _ in 0..24 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut at = 0u64;
        read_checked(&mut c, &mut at, 64 << 10);
        stalled.push((c, at));
    }
    // Time for every window to fill.
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss().saturating_sub(before);
    eprintln!("hub RSS grew by {grown} KiB for 24 stalled streams");
    // With full (8 MiB) windows the agent's data alone would be 192 MiB.
    assert!(
        grown < 32 * 1024,
        "the hub grew by {grown} KiB for 24 stalled streams"
    );

    // Small windows still carry everything, in order, when reading resumes.
    for (c, at) in stalled.iter_mut().take(3) {
        read_checked(c, at, 4 << 20);
    }
    read_checked(&mut first, &mut first_at, 4 << 20);
}

/// Operator bob (group `web`, allowed alpha) logged in on a machine of
/// his own.
fn bobs_laptop(hub: &Env) -> Env {
    let o = hub.towerctl(&["operator", "add", "bob", "--group", "web"]);
    assert!(o.ok(), "{o:?}");
    let login = support::printed_command(&o.stdout, "login");
    let o = hub.towerctl(&["access", "allow", "group:web", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let laptop = Env::new();
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let o = laptop.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    laptop
}

/// One operator's stalled streams take at most its share of the member's
/// window budget: another operator's new stream still gets a full window.
/// The budget used to be shared first come, first served, so one
/// operator's stalled port-forward connections left everyone else's new
/// streams with 32 KiB windows (a bulk transfer over a 50 ms link: 640 KB/s).
#[test]
fn one_operators_stalled_streams_leave_the_others_full_windows() {
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    // 8 MiB for the member: two full raw windows, an operator's share one.
    let budget = [("TOWERCTL_WINDOW_BUDGET", "8388608")];
    env.up_with_env_metrics(&budget, "127.0.0.1:0");
    join_alpha(&env, &api, &[], &[]);
    let metrics = metrics_addr(&env);
    let windows = || {
        metric(
            &metrics,
            "towerctl_tunnel_stream_windows_bytes{cluster=\"alpha\"}",
        )
    };

    // The admin's port-forward: six connections read a little, then stall.
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let port = forwarded_port(&pf);
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut at = 0u64;
        read_checked(&mut c, &mut at, 64 << 10);
        stalled.push(c);
    }

    // Another operator's port-forward from its own machine.
    let laptop = bobs_laptop(&env);
    let bobs =
        Streaming::start(laptop.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let bob_port = forwarded_port(&bobs);
    std::thread::sleep(Duration::from_millis(500));
    let before = windows();
    let mut c = TcpStream::connect(("127.0.0.1", bob_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut at = 0u64;
    read_checked(&mut c, &mut at, 64 << 10);
    let grown = windows().saturating_sub(before);
    assert!(
        grown >= 1 << 20,
        "bob's stream got a {grown}-byte window past the admin's stalled streams (held before: {before})"
    );
    // Its data all arrives, in order.
    read_checked(&mut c, &mut at, 4 << 20);
    drop((stalled, pf, bobs));
}

/// One `towerctl port-forward` process carries all its connections on one
/// HTTP/2 connection to the gateway: local clients that stop reading (a
/// paused download, a pager) hold their streams' windows, and they must
/// not hold the connection's. With a connection window of eight stream
/// windows, eight stalled clients froze every other connection of the
/// process until one of them read again.
#[test]
fn stalled_local_clients_of_one_port_forward_leave_its_other_connections_flowing() {
    let env = Env::new();
    let api = ApiServer::start();
    stream_service(&api);
    env.up();
    join_alpha(&env, &api, &[], &[]);
    // From another machine: through the gateway, one multiplexed connection.
    let laptop = bobs_laptop(&env);
    let pf = Streaming::start(laptop.towerctl_cmd(&["port-forward", "alpha", "svc/stream", ":80"]));
    let port = forwarded_port(&pf);
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut at = 0u64;
        read_checked(&mut c, &mut at, 64 << 10);
        stalled.push(c);
    }
    // (Their windows and the sockets' buffers fill within a moment.)
    std::thread::sleep(Duration::from_secs(3));
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut at = 0u64;
    read_checked(&mut c, &mut at, 8 << 20);
    // And the stalled ones resume intact.
    for s in stalled.iter_mut().take(2) {
        let mut at = 64 << 10;
        read_checked(s, &mut at, 4 << 20);
    }
    drop((stalled, pf));
}
