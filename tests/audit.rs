//! The audit log cannot be dodged or wiped by an operator: long-lived
//! streams are recorded when they start and when they end, 401s and
//! `/towerctl/v1/*` calls are recorded, paths are bounded, one operator's
//! flood is rate-limited with a counted summary, and a hub killed with -9
//! keeps what it recorded a second before.

mod support;

use std::time::Duration;

use support::apiserver::ApiServer;
use support::{wait_for, Env, Out, Streaming};

fn connected(env: &Env, api: &ApiServer) {
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "join failed: {o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
}

fn records(env: &Env) -> Vec<serde_json::Value> {
    let o = env.towerctl(&["audit", "-o", "json"]);
    assert!(o.ok(), "{o:?}");
    o.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("bad line {l}")))
        .collect()
}

/// Waits for a record matching `f`.
fn wait_record(env: &Env, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for(what, Duration::from_secs(10), || {
        records(env).into_iter().find(|r| f(r))
    })
}

fn gateway(env: &Env) -> String {
    env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

fn curl(env: &Env, token: Option<&str>, url: &str) -> Out {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd.arg(url);
    support::run_bounded(cmd, Duration::from_secs(20))
}

fn admin_token(env: &Env) -> String {
    std::fs::read_to_string(env.path("data/towerctl/admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_request_the_client_abandons_is_still_recorded() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    connected(&env, &api);
    // The member takes 3 s; the client gives up after 1 s. The request
    // reached the member, so it must be in the audit log (499, nginx's
    // "client closed request"), not vanish with the client.
    api.set_delay(Duration::from_secs(3));
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "1", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args([
            "-H",
            &format!("Authorization: Bearer {}", admin_token(&env)),
        ])
        .arg(format!(
            "{}/clusters/alpha/api/v1/namespaces/abandoned",
            gateway(&env)
        ));
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(!o.ok(), "curl should have timed out: {o:?}");
    let r = wait_record(&env, "the abandoned request's record", |r| {
        r["path"] == "/api/v1/namespaces/abandoned"
    });
    api.set_delay(Duration::ZERO);
    assert_eq!(r["status"], 499, "{r}");
    assert_eq!(r["operator"], "admin", "{r}");
}

#[test]
fn streams_are_recorded_when_they_start_and_when_they_end() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    connected(&env, &api);

    // A watch: "start" while it runs, "end" once it is gone.
    let w = Streaming::start(env.kubectl_cmd(&["get", "configmaps", "-w"]));
    let start = wait_record(&env, "the watch's start record", |r| {
        r["verb"] == "watch" && r["phase"] == "start"
    });
    assert_eq!(start["cluster"], "alpha", "{start}");
    // Who sent it, as the hub saw the connection (a stolen token's use
    // shows where it came from).
    assert!(
        start["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "{start}"
    );
    assert!(!records(&env)
        .iter()
        .any(|r| r["verb"] == "watch" && r["phase"] == "end"));
    drop(w);
    wait_record(&env, "the watch's end record", |r| {
        r["verb"] == "watch" && r["phase"] == "end"
    });
    // The table shows the phase with the verb.
    let o = env.towerctl(&["audit"]);
    assert!(
        o.stdout.contains("watch/start") && o.stdout.contains("watch/end"),
        "{o:?}"
    );

    // exec: an upgraded stream.
    let o = env.kubectl(&["exec", "web-0", "--", "echo", "hi"]);
    assert!(o.ok(), "{o:?}");
    let is_exec = |r: &serde_json::Value| r["path"].as_str().unwrap_or("").contains("/exec");
    wait_record(&env, "exec start", |r| is_exec(r) && r["phase"] == "start");
    let end = wait_record(&env, "exec end", |r| is_exec(r) && r["phase"] == "end");
    assert_eq!(end["status"], 101, "{end}");
    // Recorded as kube-apiserver authorizes it, not as a list.
    assert_eq!(end["verb"], "create", "{end}");
    // What crossed the upgraded stream (the output "hi", the protocol's
    // frames) is counted.
    assert!(end["bytes"].as_u64().unwrap_or(0) > 0, "{end}");

    // A follow (`logs -f`) is long-running: recorded when it starts too.
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args([
            "-H",
            &format!("Authorization: Bearer {}", admin_token(&env)),
        ])
        .arg(format!(
            "{}/clusters/alpha/api/v1/namespaces/default/pods/web-0/log?follow=true",
            gateway(&env)
        ));
    let _ = support::run_bounded(cmd, Duration::from_secs(20));
    let is_log = |r: &serde_json::Value| r["path"].as_str().unwrap_or("").contains("/log?");
    let start = wait_record(&env, "the follow's start", |r| {
        is_log(r) && r["phase"] == "start"
    });
    assert_eq!(start["verb"], "get", "{start}");

    // CONNECT.
    let web = support::http_server("through connect");
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--proxy",
        &gateway(&env),
        "--proxy-cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"))
    .args([
        "--proxy-header",
        &format!("Proxy-Authorization: Bearer {}", admin_token(&env)),
        "-p",
        &format!("http://127.0.0.1.alpha:{}/", web.port()),
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(o.stdout.contains("through connect"), "{o:?}");
    wait_record(&env, "connect start", |r| {
        r["verb"] == "connect" && r["phase"] == "start"
    });
    let end = wait_record(&env, "connect end", |r| {
        r["verb"] == "connect" && r["phase"] == "end"
    });
    assert!(end["bytes"].as_u64().unwrap_or(0) > 0, "{end}");
}

#[test]
fn refusals_and_towerctl_calls_are_recorded_with_bounded_paths() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    connected(&env, &api);
    let gw = gateway(&env);

    let o = curl(&env, None, &format!("{gw}/clusters/alpha/api"));
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    let r = wait_record(&env, "the 401", |r| r["status"] == 401);
    assert_eq!(r["operator"], "(unauthenticated)", "{r}");
    assert!(
        r["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{r}"
    );
    // Without --trusted-proxy, X-Forwarded-For moves nothing.
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args(["-H", "X-Forwarded-For: 203.0.113.9"])
        .arg(format!("{gw}/clusters/alpha/apis"));
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    let r = wait_record(&env, "the second 401", |r| {
        r["status"] == 401 && r["path"].as_str().unwrap_or("").ends_with("/apis")
    });
    assert!(
        r["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{r}"
    );

    let o = curl(
        &env,
        Some(&admin_token(&env)),
        &format!("{gw}/towerctl/v1/whoami"),
    );
    assert!(o.ok() && o.stdout.contains("admin"), "{o:?}");
    wait_record(&env, "the whoami call", |r| {
        r["verb"] == "towerctl" && r["path"] == "/towerctl/v1/whoami" && r["status"] == 200
    });

    // What reaches a member is recorded whole: a query padded ahead of an
    // exec's command pushed the command out of a record cut at 1 KiB (and
    // an inline script, percent-encoded, passes 16 KiB).
    let pad = "x".repeat(60_000);
    let _ = curl(
        &env,
        Some(&admin_token(&env)),
        &format!("{gw}/clusters/alpha/api/v1/namespaces/default/pods/web/exec?pad={pad}&container=c&command=the-command-run"),
    );
    let r = wait_record(&env, "the padded exec", |r| {
        r["path"].as_str().unwrap_or("").contains("xxxx")
    });
    let p = r["path"].as_str().unwrap();
    assert!(
        p.ends_with("&command=the-command-run") && !p.contains("more bytes"),
        "{} bytes: {}…",
        p.len(),
        &p[..200.min(p.len())]
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.path.contains("the-command-run")),
        "the request did not reach the member"
    );
}

#[test]
fn behind_a_trusted_proxy_records_name_the_client_it_forwarded_for() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with(&["--trusted-proxy", "127.0.0.0/8"]);
    connected(&env, &api);
    let gw = gateway(&env);
    // As an ingress sends them: the client's own entry, then the address
    // the ingress appended.
    let via_proxy = |token: Option<&str>, url: &str| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(env.path("data/towerctl/ca.crt"))
            .args(["-H", "X-Forwarded-For: 10.9.9.9, 203.0.113.9"]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        cmd.arg(url);
        support::run_bounded(cmd, Duration::from_secs(20))
    };
    let o = via_proxy(None, &format!("{gw}/clusters/alpha/api"));
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    let r = wait_record(&env, "the 401", |r| r["status"] == 401);
    assert!(
        r["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("203.0.113.9 via 127.0.0.1:"),
        "{r}"
    );
    let o = via_proxy(
        Some(&admin_token(&env)),
        &format!("{gw}/clusters/alpha/version"),
    );
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    let r = wait_record(&env, "the request", |r| r["path"] == "/version");
    assert!(
        r["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("203.0.113.9 via 127.0.0.1:"),
        "{r}"
    );
    // Straight from a client (no header): its own address.
    let o = curl(
        &env,
        Some(&admin_token(&env)),
        &format!("{gw}/clusters/alpha/api"),
    );
    assert!(o.ok(), "{o:?}");
    let r = wait_record(&env, "the direct request", |r| r["path"] == "/api");
    assert!(
        r["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{r}"
    );
}

/// An operator over its audit budget is refused (429) before anything
/// reaches a member, so it cannot blind the log for a request of its
/// choosing; the refusals are counted in a summary, and the admin is not
/// held to another operator's budget.
#[test]
fn one_operators_flood_is_refused_not_hidden_and_cannot_push_out_others() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[("TOWERCTL_AUDIT_RATE", "2"), ("TOWERCTL_AUDIT_BURST", "5")]);
    connected(&env, &api);
    let gw = gateway(&env);
    let o = env.towerctl(&["operator", "add", "bob"]);
    let bob = support::printed_command(&o.stdout, "login")[3].clone();

    // 40 requests in one curl (one connection) within well under a second.
    let url = format!("{gw}/towerctl/v1/whoami");
    let o = whoami_40_times(&env, &bob, &url);
    let codes: Vec<&str> = o.stdout.lines().collect();
    let served = codes.iter().filter(|c| **c == "200").count();
    let refused = codes.iter().filter(|c| **c == "429").count();
    assert_eq!(served + refused, 40, "{codes:?}");
    assert!(served >= 5 && refused > 0, "{codes:?}");
    // The admin is not affected by bob's budget.
    let o = curl(&env, Some(&admin_token(&env)), &url);
    assert!(o.ok(), "{o:?}");
    wait_record(&env, "the admin's call", |r| {
        r["operator"] == "admin" && r["verb"] == "towerctl"
    });
    // Once bob's bucket refills, his next request writes the summary.
    std::thread::sleep(Duration::from_millis(1500));
    let o = curl(&env, Some(&bob), &url);
    assert!(o.ok(), "{o:?}");
    let summary = wait_record(&env, "bob's summary", |r| {
        r["operator"] == "bob" && r["verb"] == "suppressed"
    });
    let text = summary["path"].as_str().unwrap();
    assert!(
        text.starts_with("refused ") && text.contains("429"),
        "{summary}"
    );
    let n: usize = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert_eq!(n, refused, "{summary}");
    // Every request bob got served is in the log.
    let bobs = wait_until_records(&env, served + 1, |r| {
        r["operator"] == "bob" && r["verb"] == "towerctl"
    });
    assert_eq!(bobs, served + 1);
}

/// A token's requests refused for its connection limit are held to its
/// audit budget as any other: each was recorded past it (on every request
/// of a kept-alive connection, every stream of a multiplexed one), enough
/// to rotate the audit history away.
#[test]
fn requests_refused_past_a_tokens_connection_limit_stay_within_its_audit_budget() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[
        ("TOWERCTL_AUDIT_RATE", "1"),
        ("TOWERCTL_AUDIT_BURST", "3"),
        ("TOWERCTL_MAX_CONNECTIONS_PER_OPERATOR", "1"),
    ]);
    connected(&env, &api);
    let gw = gateway(&env);
    let o = env.towerctl(&["operator", "add", "bob"]);
    let bob = support::printed_command(&o.stdout, "login")[3]
        .trim_start_matches("TOWERCTL_OPERATOR_TOKEN=")
        .to_string();
    assert!(env
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());
    // Bob's one connection, busy.
    let mut watch = std::process::Command::new("curl");
    watch
        .args(["-sS", "-N", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {bob}")])
        .arg(format!(
            "{gw}/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true"
        ));
    let _watch = Streaming::start(watch);
    wait_record(&env, "bob's watch", |r| {
        r["operator"] == "bob" && r["phase"] == "start"
    });
    // 40 requests on a second connection: each refused.
    let url = format!("{gw}/towerctl/v1/whoami");
    let started = std::time::Instant::now();
    let o = whoami_40_times(&env, &bob, &url);
    let secs = started.elapsed().as_secs() as usize;
    let codes: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(codes, vec!["429"; 40], "{o:?}");
    // Recorded as far as the budget goes (two of the burst's three left,
    // one a second since), not forty times.
    // (The writer takes them within milliseconds.)
    std::thread::sleep(Duration::from_secs(1));
    let recorded = records(&env)
        .iter()
        .filter(|r| r["operator"] == "bob" && r["status"] == 429 && r["verb"] != "suppressed")
        .count();
    assert!(
        (1..=3 + secs).contains(&recorded),
        "{recorded} refusals recorded in {secs} s"
    );
}

/// `url` asked 40 times with `token` in one curl (one connection, well
/// under a second): a status code a line.
fn whoami_40_times(env: &Env, token: &str, url: &str) -> Out {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-w",
        "%{http_code}\n",
        "--max-time",
        "20",
        "--cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"))
    .args(["-H", &format!("Authorization: Bearer {token}")]);
    for _ in 0..40 {
        cmd.args(["-o", "/dev/null"]).arg(url);
    }
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    o
}

/// Waits (up to 10 s) for `want` records matching `f`; returns how many
/// there are then.
fn wait_until_records(env: &Env, want: usize, f: impl Fn(&serde_json::Value) -> bool) -> usize {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = records(env).iter().filter(|r| f(r)).count();
        if n >= want || std::time::Instant::now() > end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_hub_killed_with_9_keeps_the_records_of_a_second_ago() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    connected(&env, &api);
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    std::thread::sleep(Duration::from_millis(1100));
    env.kill9("hub");
    // `towerctl audit` reads the files; the hub is gone.
    let all = records(&env);
    assert!(
        all.iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/api/v1/namespaces"))
            && r["status"] == 200),
        "{all:?}"
    );
}

/// `towerctl audit` reads past a torn or non-UTF-8 line (a hub killed
/// mid-write: the listing stopped there, exit 0), and `audit -f` loses no
/// record when the hub rotates the file (records written to the old file
/// after its last look were never shown).
#[test]
fn audit_reads_past_torn_lines_and_follows_across_a_rotation() {
    use std::io::Write;
    let env = Env::new();
    let dir = env.path("state/towerctl");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = |n: u32| {
        format!(
            r#"{{"time":"2026-12-06T00:00:{n:02}Z","operator":"op{n}","cluster":"alpha","verb":"get","method":"GET","path":"/api/v1/pods/p{n}","status":200,"duration_ms":1,"bytes":1}}"#
        )
    };
    let log = dir.join("audit.log");
    let mut f = std::fs::File::create(&log).unwrap();
    writeln!(f, "{}", rec(1)).unwrap();
    f.write_all(b"{\"time\":\"torn \xff\xfe\n").unwrap();
    writeln!(f, "{}", rec(2)).unwrap();
    drop(f);
    let o = env.towerctl(&["audit", "-o", "json"]);
    assert!(
        o.ok() && o.stdout.contains("\"op1\"") && o.stdout.contains("\"op2\""),
        "{o:?}"
    );
    assert!(
        o.stderr
            .contains("1 line(s) of the audit log are not records"),
        "the line left out is said: {o:?}"
    );

    let follow = Streaming::start(env.towerctl_cmd(&["audit", "-f", "-o", "json"]));
    follow.wait_for("\"op2\"", Duration::from_secs(10));
    // Records appended, then the file rotated at once (within one look
    // of the follower), then records in the new file.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(f, "{}", rec(3)).unwrap();
    drop(f);
    std::fs::rename(&log, dir.join("audit.log.1")).unwrap();
    let mut f = std::fs::File::create(&log).unwrap();
    writeln!(f, "{}", rec(4)).unwrap();
    drop(f);
    follow.wait_for("\"op4\"", Duration::from_secs(10));
    let out = follow.output();
    assert!(
        out.contains("\"op3\""),
        "a record lost at the rotation: {out}"
    );
    assert_eq!(out.matches("\"op1\"").count(), 1, "{out}");
}

/// A hub started on an audit log whose last line a crash (or a full disk)
/// left unfinished ends that line first: its first record was glued onto
/// it, unreadable, and left out by `towerctl audit`.
#[test]
fn a_hub_started_on_a_torn_audit_log_ends_that_line_first() {
    let env = Env::new();
    let dir = env.path("state/towerctl");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("audit.log"),
        b"{\"time\":\"2026-12-06T00:00:01Z\",\"oper",
    )
    .unwrap();
    let o = env.up();
    assert!(o.ok(), "{o:?}");
    let gw = gateway(&env);
    let o = curl(&env, None, &format!("{gw}/clusters/alpha/api"));
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    wait_record(&env, "the 401 in the audit log", |r| r["status"] == 401);
}

/// Output that cannot be written is one line and exit 1 (a full disk), or
/// a quiet end (a closed pipe, `towerctl audit | head`), never a panic
/// with a backtrace and exit 101.
#[test]
fn output_that_cannot_be_written_is_an_error_not_a_panic() {
    let env = Env::new();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = env
        .towerctl_cmd(&["audit"])
        .stdin(std::process::Stdio::null())
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write the output: No space left on device"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // A reader that has gone away.
    let into_closed_pipe = |args: &[&str]| {
        let mut child = env
            .towerctl_cmd(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = into_closed_pipe(&["audit"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The same for output written in one piece (completions, man pages),
    // which used to end with "error: Broken pipe" and exit 1.
    let (code, err) = into_closed_pipe(&["completion", "bash"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn a_forwarded_connection_whose_client_speaks_first_is_carried_whole_and_counted() {
    let env = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "web", 80);
    env.up();
    connected(&env, &api);
    // Carried by the hub (this is its machine).
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let port = support::forwarded_port(&pf);
    // Written right after connect(): it is on the hub's socket when the
    // channel opens, and goes ahead of the agent's answer to its dial.
    let msg = "x".repeat(5000) + "\n";
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    support::echo(&mut c, &msg).unwrap_or_else(|e| panic!("{e}; {}", pf.output()));
    drop(c);
    let end = wait_record(&env, "the forwarded connection's end", |r| {
        r["verb"] == "connect" && r["phase"] == "end"
    });
    // Both ways, the bytes sent ahead of the answer included.
    assert_eq!(end["bytes"].as_u64(), Some(2 * msg.len() as u64), "{end}");
    assert_eq!(end["status"], 200, "{end}");
}

/// A hub run in the foreground (a systemd unit, a container) on a fresh
/// home makes its state directory and keeps its audit log there: it used
/// to find no directory and write no record at all.
#[test]
fn a_hub_run_in_the_foreground_on_a_fresh_home_keeps_its_audit_log() {
    let env = Env::new();
    let state = env.path("state/towerctl");
    assert!(!state.exists(), "a fresh home has no state directory yet");
    let hub = Streaming::start(env.hub_run_cmd());
    hub.wait_for("hub ready", Duration::from_secs(30));
    let gw = gateway(&env);
    let o = curl(&env, None, &format!("{gw}/clusters/alpha/api"));
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    let r = wait_record(&env, "the 401 in the audit log", |r| r["status"] == 401);
    assert_eq!(r["operator"], "(unauthenticated)", "{r}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the state directory is private");
    assert!(
        !hub.output().contains("cannot open the audit log"),
        "{}",
        hub.output()
    );
}

/// A hub on the any address (`0.0.0.0`, the defaults) answers IPv6
/// clients too where the host has IPv6, as Go's servers do, and an IPv4
/// client of that listener is recorded as the IPv4 address it is (not
/// `::ffff:127.0.0.1`, which `--trusted-proxy` ranges and per-address
/// limits would not match).
#[test]
fn a_hub_on_the_any_address_serves_ipv6_clients_and_records_ipv4_ones_as_ipv4() {
    let env = Env::new();
    let o = env.up_on("0.0.0.0:0", "0.0.0.0:0");
    assert!(o.ok(), "{o:?}");
    let s = env.status();
    let port = |key: &str| -> u16 {
        let a = s["hub"][key].as_str().unwrap_or_default();
        assert!(
            a.starts_with("0.0.0.0:"),
            "{key} reported as the address given: {s}"
        );
        a.rsplit(':').next().unwrap().parse().unwrap()
    };
    let (gw, tunnel) = (port("gatewayAddress"), port("tunnelAddress"));

    let o = curl(
        &env,
        None,
        &format!("https://127.0.0.1:{gw}/clusters/v4/api"),
    );
    assert!(o.stdout.contains("Unauthorized"), "{o:?}");
    let r = wait_record(&env, "the IPv4 401", |r| {
        r["path"].as_str().unwrap_or("").contains("/clusters/v4/")
    });
    assert!(
        r["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{r}"
    );

    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: the IPv6 half is not checked");
        return;
    }
    let o = curl(&env, None, &format!("https://[::1]:{gw}/clusters/v6/api"));
    assert!(o.stdout.contains("Unauthorized"), "over IPv6: {o:?}");
    let r = wait_record(&env, "the IPv6 401", |r| {
        r["path"].as_str().unwrap_or("").contains("/clusters/v6/")
    });
    assert!(
        r["peer"].as_str().unwrap_or("").starts_with("[::1]:"),
        "{r}"
    );
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg(format!("http://[::1]:{tunnel}/readyz"));
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert_eq!(o.stdout, "200", "the tunnel listener over IPv6: {o:?}");
}

/// What the API server acts on is what is recorded: an escaped letter in
/// the path is recorded (and forwarded) decoded, and a watch flag spelled
/// as kube-apiserver still takes it (`watch=yes`) is recorded as a watch
/// when it starts.
#[test]
fn escaped_paths_and_watch_flags_are_recorded_as_the_api_server_reads_them() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    connected(&env, &api);
    let gw = gateway(&env);
    let admin = admin_token(&env);
    let o = curl(
        &env,
        Some(&admin),
        &format!("{gw}/clusters/alpha/api/v1/%6eamespaces"),
    );
    assert!(o.stdout.contains("NamespaceList"), "{o:?}");
    let r = wait_record(&env, "the escaped list", |r| r["verb"] == "list");
    assert_eq!(r["path"], "/api/v1/namespaces", "{r}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.path, "/api/v1/namespaces", "{last:?}");

    let watch = std::thread::spawn({
        let (gw, admin, ca) = (gw.clone(), admin.clone(), env.path("data/towerctl/ca.crt"));
        move || {
            let mut cmd = std::process::Command::new("curl");
            cmd.args(["-sS", "--max-time", "3", "--cacert"])
                .arg(ca)
                .args(["-H", &format!("Authorization: Bearer {admin}")])
                .arg(format!("{gw}/clusters/alpha/api/v1/namespaces?watch=yes"));
            support::run_bounded(cmd, Duration::from_secs(20))
        }
    });
    let r = wait_record(&env, "the watch's start", |r| {
        r["verb"] == "watch" && r["phase"] == "start"
    });
    assert!(
        r["path"].as_str().unwrap_or("").contains("watch=yes"),
        "{r}"
    );
    let _ = watch.join();
}

/// An operator's requests in flight over all its connections are held to
/// a bound (3 here; 8,192 by default), the hub's own answers included:
/// past it, 429 in words. An HTTP/2 client that reads no answer kept every
/// one the hub made for it.
#[test]
fn an_operators_requests_in_flight_are_bounded() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[("TOWERCTL_MAX_LIVE_PER_OPERATOR", "3")]);
    connected(&env, &api);
    let o = env.towerctl(&["operator", "add", "bob"]);
    let bob = support::printed_command(&o.stdout, "login")[3]
        .trim_start_matches("TOWERCTL_OPERATOR_TOKEN=")
        .to_string();
    assert!(env
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());
    let gw = gateway(&env);
    let watch = format!("{gw}/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true");
    // Eight watches at once on one HTTP/2 connection.
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-N",
        "--http2",
        "--parallel",
        "--parallel-max",
        "8",
        "--max-time",
        "6",
        "--cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"))
    .args(["-H", &format!("Authorization: Bearer {bob}")]);
    for _ in 0..8 {
        cmd.arg(&watch);
    }
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(
        o.stdout
            .contains("requests in flight over its connections to the gateway"),
        "{o:?}"
    );
    // Once they are done, bob is served again.
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {bob}")])
        .arg(format!("{gw}/clusters/alpha/api/v1/namespaces"));
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(o.stdout.contains("kube-system"), "{o:?}");
}

/// A client that goes on past its audit budget regardless of Retry-After
/// has its connection closed after a run of 429s (64), not answered
/// without end.
#[test]
fn a_connection_that_ignores_its_429s_is_closed() {
    use std::io::Write;
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[("TOWERCTL_AUDIT_RATE", "1"), ("TOWERCTL_AUDIT_BURST", "1")]);
    connected(&env, &api);
    let o = env.towerctl(&["operator", "add", "bob"]);
    let bob = support::printed_command(&o.stdout, "login")[3]
        .trim_start_matches("TOWERCTL_OPERATOR_TOKEN=")
        .to_string();
    let mut s = support::gateway_stream(&env);
    let one = format!(
        "GET /towerctl/v1/whoami HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bob}\r\n\r\n"
    );
    s.write_all(one.repeat(200).as_bytes()).unwrap();
    s.flush().unwrap();
    let got = support::read_until_closed(&mut s);
    let text = String::from_utf8_lossy(&got);
    let answered = text.matches("HTTP/1.1 ").count();
    assert!(text.contains("HTTP/1.1 429"), "{text}");
    assert!((2..200).contains(&answered), "{answered} of 200 answered");
}
