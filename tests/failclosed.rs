//! Authorization fails closed: revoking access reaches what is already
//! open, the local admin cannot be removed by accident, and a possibly
//! compromised agent key can be retired. Real towerctl, real kubectl, the
//! stand-in API server behind the agent.

mod support;

use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::{curl_within, forwarded_port, operator_laptop, wait_for, Env, Streaming};

/// Hub up, member `alpha` joined against `api`, the hub's kubeconfig on alpha.
fn connected(env: &Env, api: &ApiServer) -> Vec<String> {
    env.up();
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "join failed: {o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    join
}

#[test]
fn removing_an_operator_cuts_its_open_watch_and_port_forward_at_once() {
    let hub = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("forwarded for bob");
    api.add_pod(
        "default",
        "web-1",
        "10.99.0.1",
        &[("app", "web")],
        true,
        &[("http", 8080)],
    );
    api.set_portforward_target("default", "web-1", 8080, web);
    connected(&hub, &api);
    let laptop = operator_laptop(&hub, "bob");
    assert!(laptop.towerctl(&["use", "alpha"]).ok());
    // Another operator's stream must survive bob's removal.
    let mut admins_watch = Streaming::start(hub.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));

    let mut watch = Streaming::start(laptop.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "seen-by-bob", &[("k", "v")]);
    watch.wait_for("seen-by-bob", Duration::from_secs(20));
    admins_watch.wait_for("seen-by-bob", Duration::from_secs(20));

    let pf = Streaming::start(laptop.kubectl_cmd(&["port-forward", "pod/web-1", ":8080"]));
    let port = forwarded_port(&pf);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 5);
    assert!(
        o.stdout.contains("forwarded for bob"),
        "{o:?} {}",
        pf.output()
    );

    let t = Instant::now();
    let o = hub.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    // bob's rule stays (a token is replaced by rm and add): said, with
    // the command that removes it.
    assert!(
        o.stderr
            .contains("access rule(s) #1 (allow or deny) still name operator:bob")
            && o.stderr.contains("towerctl access rm 1"),
        "{o:?}"
    );
    wait_for("bob's watch to be cut", Duration::from_secs(10), || {
        watch.has_exited().then_some(())
    });
    let cut_after = t.elapsed();
    eprintln!("bob's watch ended {cut_after:?} after 'operator rm bob'");
    assert!(
        cut_after < Duration::from_secs(3),
        "the watch outlived the removal by {cut_after:?}"
    );
    // The port-forward's upgraded stream is gone too: no new connection
    // gets through it.
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 5);
    assert!(!o.stdout.contains("forwarded for bob"), "{o:?}");
    // And bob cannot start anything new.
    let o = laptop.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    // The admin's watch is untouched.
    assert!(!admins_watch.has_exited(), "{}", admins_watch.output());
    api.create_configmap("default", "after-bob", &[("k", "v")]);
    admins_watch.wait_for("after-bob", Duration::from_secs(20));
}

/// `cluster set --impersonate` on a member whose agent acts with its own
/// identity: new requests are refused until the agent declares the mode,
/// and the streams already open (made with the agent's identity, e.g. as
/// cluster-admin) end too; they used to run on until the agent restarted.
#[test]
fn requiring_impersonation_cuts_the_streams_opened_with_the_agents_identity() {
    let hub = Env::new();
    let api = ApiServer::start();
    let join = connected(&hub, &api);
    let mut watch = Streaming::start(hub.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "before", &[("k", "v")]);
    watch.wait_for("before", Duration::from_secs(20));

    let t = Instant::now();
    let o = hub.towerctl(&["cluster", "set", "alpha", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    wait_for("the watch to be cut", Duration::from_secs(10), || {
        watch.has_exited().then_some(())
    });
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the watch outlived the change by {:?}",
        t.elapsed()
    );
    assert!(o.stdout.contains("'towerctl leave alpha'"), "{o:?}");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "no new request with the agent's identity: {o:?}");
    // What the refusal and `cluster set` say to do works: leave, then the
    // join command again with --impersonate (the token is spent; the key
    // is kept).
    assert!(
        o.stderr
            .contains("'towerctl leave alpha', then its join command with --impersonate"),
        "{o:?}"
    );
    assert!(hub.towerctl(&["leave", "alpha"]).ok());
    let member_kc = hub.path("member.kubeconfig");
    let o = hub.join(
        &join,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
            "--impersonate",
        ],
    );
    assert!(o.ok(), "{o:?}");
    api.bind_user("admin");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
}

#[test]
fn the_local_admin_cannot_be_removed() {
    let hub = Env::new();
    hub.up();
    let o = hub.towerctl(&["operator", "rm", "admin"]);
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("local admin") && o.stderr.contains("operator add"),
        "{o:?}"
    );
    let o = hub.towerctl(&["operator", "list", "-o", "json"]);
    assert!(o.stdout.contains("\"admin\""), "{o:?}");
}

/// `whoami` through the gateway with `token`: the HTTP status.
fn whoami(hub: &Env, token: &str) -> String {
    support::gateway_get(hub, token, "/towerctl/v1/whoami").0
}

#[test]
fn replacing_the_admin_token_file_retires_the_old_token() {
    let hub = Env::new();
    hub.up();
    let file = hub.path("data/towerctl/admin.token");
    let old = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(whoami(&hub, &old), "200");
    // How a leaked admin token is replaced: the refusal to remove the
    // admin says so.
    let o = hub.towerctl(&["operator", "rm", "admin"]);
    assert!(o.stderr.contains("admin.token"), "{o:?}");
    assert!(hub.towerctl(&["down"]).ok());
    std::fs::remove_file(&file).unwrap();
    let o = hub.up();
    assert!(o.ok(), "{o:?}");
    let new = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_ne!(new, old);
    assert_eq!(whoami(&hub, &new), "200");
    assert_eq!(
        whoami(&hub, &old),
        "401",
        "the replaced admin token still works"
    );
    let o = hub.towerctl(&["operator", "list", "-o", "json"]);
    let ops: Vec<serde_json::Value> = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        ops.iter().filter(|o| o["name"] == "admin").count(),
        1,
        "{ops:?}"
    );
    // A group that a comma would make two groups on the member is refused.
    let o = hub.towerctl(&["operator", "add", "hank", "--group", "dev,system:masters"]);
    assert!(
        !o.ok() && o.stderr.contains("--group dev --group ops"),
        "{o:?}"
    );
}

#[test]
fn a_request_still_waiting_for_its_answer_ends_when_access_is_withdrawn() {
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api);
    let laptop = operator_laptop(&hub, "bob");
    assert!(laptop.towerctl(&["use", "alpha"]).ok());
    assert!(laptop.kubectl(&["get", "ns"]).ok());
    // The member takes 4 s to answer; bob is removed after 1 s. His
    // request must not get its answer (nor, for a stream, open) after that.
    api.set_delay(Duration::from_secs(4));
    let before = api.requests().len();
    let pending = std::thread::spawn(move || {
        let o = laptop.kubectl(&["get", "--raw", "/api/v1/namespaces"]);
        (o, laptop)
    });
    // Once bob's request waits at the member (not a fixed second: under
    // load kubectl may not have reached it yet, and got a 401 instead).
    wait_for(
        "bob's request at the member",
        Duration::from_secs(20),
        || {
            api.requests()
                .iter()
                .skip(before)
                .any(|r| r.path.starts_with("/api/v1/namespaces"))
                .then_some(())
        },
    );
    let t = Instant::now();
    assert!(hub.towerctl(&["operator", "rm", "bob"]).ok());
    let (o, _laptop) = pending.join().unwrap();
    api.set_delay(Duration::ZERO);
    assert!(
        !o.ok() && o.stderr.contains("withdrawn") && !o.stdout.contains("NamespaceList"),
        "{o:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn rotate_new_key_forces_the_agent_to_join_again() {
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api);
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(o.ok(), "{o:?}");
    let agent = hub.pid_of("agent-alpha").expect("agent pid");
    let o = hub.towerctl(&["cluster", "rotate", "alpha", "--new-key"]);
    assert!(o.ok(), "{o:?}");
    let new_join = support::printed_command(&o.stdout, "join");
    // The old agent's key is refused and its spent token too: it stops.
    wait_for(
        "the agent with the retired key to stop",
        Duration::from_secs(20),
        || {
            (!std::path::Path::new(&format!("/proc/{agent}")).exists()
                || std::fs::read_to_string(format!("/proc/{agent}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true))
            .then_some(())
        },
    );
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(!o.ok() && o.stderr.contains("not connected"), "{o:?}");
    let log =
        std::fs::read_to_string(hub.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    assert!(log.contains("retired"), "{log}");
    // Joining again with the new token and the retired key is refused,
    // naming the fix (it registered the retired key again: a copy of it
    // worked again); with the key file removed (a new key), it works.
    let member_kc = hub.path("member.kubeconfig");
    let args = [
        "--kubeconfig",
        member_kc.to_str().unwrap(),
        "--allow",
        "127.0.0.0/8",
    ];
    let o = hub.join(&new_join, &args);
    let key = hub.path("config/towerctl/agents/alpha.key");
    assert!(
        !o.ok() && o.stderr.contains("give the agent a new key"),
        "{o:?}"
    );
    // The file to remove is named as it is on this machine (the hub's
    // words named ~/.config, wrong under XDG_CONFIG_HOME).
    assert!(
        o.stderr
            .contains(&format!("the agent key '{}' was refused", key.display())),
        "{o:?}"
    );
    std::fs::remove_file(&key).unwrap();
    let o = hub.join(&new_join, &args);
    assert!(o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(o.ok(), "{o:?}");
}

fn join_args(o: &support::Out) -> Vec<String> {
    support::printed_command(&o.stdout, "join")
}

#[test]
fn impersonation_cannot_silently_turn_off() {
    let hub = Env::new();
    let api = ApiServer::start();
    hub.up();
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);

    // Member requires impersonation; its agent is started without it.
    let o = hub.towerctl(&["cluster", "add", "beta", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    let join = join_args(&o);
    assert!(join.iter().any(|a| a == "--impersonate"), "{join:?}");
    let without: Vec<String> = join.into_iter().filter(|a| a != "--impersonate").collect();
    let o = hub.join(&without, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(hub.towerctl(&["use", "beta"]).ok());
    let before = api.requests().len();
    let o = hub.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "--raw", "/clusters/beta/api/v1/namespaces"]);
    assert!(
        !o.ok()
            && o.stderr.contains("requires impersonation")
            && o.stderr.contains("--impersonate"),
        "{o:?}"
    );
    assert_eq!(
        api.requests().len(),
        before,
        "no request may reach the member with the agent's own identity"
    );
    let o = hub.towerctl(&["cluster", "list", "-o", "wide"]);
    assert!(
        o.stdout.contains("IDENTITY") && o.stdout.contains("impersonate"),
        "{o:?}"
    );

    // The operator decides: operators act with the agent's identity.
    let o = hub.towerctl(&["cluster", "set", "beta", "--no-impersonate"]);
    assert!(o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let o = hub.towerctl(&["cluster", "set", "beta"]);
    assert!(!o.ok() && o.stderr.contains("nothing to change"), "{o:?}");

    // The reverse mismatch: registered without, agent with --impersonate.
    let o = hub.towerctl(&["cluster", "add", "gamma"]);
    let mut join = join_args(&o);
    join.push("--impersonate".into());
    let o = hub.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(hub.towerctl(&["use", "gamma"]).ok());
    let o = hub.kubectl(&["get", "--raw", "/clusters/gamma/api/v1/namespaces"]);
    assert!(
        !o.ok() && o.stderr.contains("registered without impersonation"),
        "{o:?}"
    );
    // Matching again: the member's RBAC decides (the admin has no binding).
    assert!(hub
        .towerctl(&["cluster", "set", "gamma", "--impersonate"])
        .ok());
    let o = hub.kubectl(&["get", "ns"]);
    assert!(!o.ok() && o.stderr.contains("User \"admin\""), "{o:?}");
    api.bind_user("admin");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
}

/// The hub's `forward` control request, spoken as `towerctl port-forward`
/// speaks it on the hub's machine, but with any operator token: the request
/// line, the hub's answer, then the listening socket (`SCM_RIGHTS`). Returns
/// the control connection (the forward lasts while it is open) or the hub's
/// refusal.
fn hand_over(
    hub: &Env,
    token: &str,
    authority: &str,
    listener: &impl std::os::fd::AsRawFd,
) -> Result<std::io::BufReader<std::os::unix::net::UnixStream>, String> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(hub.path("run/towerctl/hub.sock"))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = serde_json::json!({"v": 1, "op": "forward", "token": token, "authority": authority});
    (&s).write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    if answer["ok"] != true {
        return Err(answer["error"].as_str().unwrap_or_default().to_string());
    }
    // One data byte carrying the descriptor.
    let fd = listener.as_raw_fd();
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: plain C structs, buffers that outlive the call, room for one
    // descriptor in the control buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        assert_eq!(libc::sendmsg(r.get_ref().as_raw_fd(), &msg, 0), 1);
    }
    Ok(r)
}

/// Reads the forward's event lines until one contains `needle`.
fn event_with(events: &mut std::io::BufReader<std::os::unix::net::UnixStream>, needle: &str) {
    use std::io::BufRead;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let mut line = String::new();
        if events.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.contains(needle) {
            return;
        }
        seen.push(line);
    }
    panic!("no forward event with {needle:?}; got {seen:?}");
}

/// A forward the hub carries itself (the socket handed over its control
/// socket, as `towerctl port-forward` does on the hub's machine) runs as
/// the operator whose token came with it, every connection checked again:
/// a token the hub does not know is refused; bob's connections are bob's
/// in the audit log; a rule that denies him the member cuts his open
/// connection and refuses new ones; once he is removed, new connections
/// are refused for that reason. Nothing goes through the gateway.
#[test]
fn a_forward_carried_by_the_hub_is_held_to_its_operators_access() {
    let hub = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "echo", 7);
    connected(&hub, &api);
    let gateway_port = hub.gateway_port();
    let o = hub.towerctl(&["operator", "add", "bob"]);
    assert!(o.ok(), "{o:?}");
    let login = support::printed_command(&o.stdout, "login");
    let token = login
        .iter()
        .position(|a| a == "--token")
        .map(|i| login[i + 1].clone())
        .expect("a --token in the login command");
    assert!(hub
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let authority = "echo.default.svc.alpha:7";
    let refused = hand_over(&hub, "tk_not-a-token", authority, &listener).unwrap_err();
    assert!(refused.contains("not known to this hub"), "{refused}");
    // Any descriptor but a listening TCP socket is refused after the
    // hand-over, with the reason on the control connection.
    let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut answer =
        hand_over(&hub, &token, authority, &not_listening).expect("asked for the socket");
    event_with(
        &mut answer,
        "forward refused: the descriptor is not a stream socket",
    );
    let mut events = hand_over(&hub, &token, authority, &listener).expect("bob's forward");
    let connect = || {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    let mut open = connect();
    support::echo(&mut open, "bob was here\n").unwrap();
    event_with(&mut events, "accepted");
    assert_eq!(support::established_to(gateway_port), 0);
    // Audited as bob's (the hub writes the audit log a few milliseconds later).
    wait_for(
        "bob's connection in the audit log",
        Duration::from_secs(10),
        || {
            let audit = hub.towerctl(&["audit", "--operator", "bob", "-o", "json"]);
            audit
                .stdout
                .lines()
                .any(|l| l.contains("\"verb\":\"connect\"") && l.contains(authority))
                .then_some(())
        },
    );

    let t = Instant::now();
    let o = hub.towerctl(&["access", "deny", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    wait_for(
        "bob's open connection to be cut",
        Duration::from_secs(10),
        || support::echo(&mut open, "still?").is_err().then_some(()),
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        t.elapsed()
    );
    let mut c = connect();
    assert!(support::echo(&mut c, "denied?\n").is_err());
    event_with(&mut events, "may not reach cluster 'alpha'");

    let o = hub.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    let mut c = connect();
    assert!(support::echo(&mut c, "removed?\n").is_err());
    event_with(&mut events, "removed or its token revoked");
}

#[test]
fn a_members_redirect_cannot_send_a_request_to_another_member_or_off_the_hub() {
    // A compromised member answering `307 Location: /clusters/<other>/…`
    // used to have a following client (curl -L; any client that routes by
    // path) repeat the request, body and bearer token included, on another
    // member; an absolute Location took the token off the hub.
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api);
    let moved = "/api/v1/namespaces/default/configmaps/moved";
    api.set_redirect(
        moved,
        307,
        "/clusters/beta/api/v1/namespaces/default/secrets",
    );
    let away = "/api/v1/namespaces/default/configmaps/away";
    api.set_redirect(away, 308, "https://collector.invalid/steal");
    let token = std::fs::read_to_string(hub.path("data/towerctl/admin.token")).unwrap();
    let gw = hub.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let ca = hub.path("data/towerctl/ca.crt");
    let curl = |path: &str, follow: bool| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .args(["-X", "POST", "--data", "{}"]);
        if follow {
            cmd.args(["-L", "--location-trusted"]);
        }
        cmd.arg(format!("{gw}/clusters/alpha{path}"));
        support::run_bounded(cmd, Duration::from_secs(20)).stdout
    };
    let answer = curl(moved, false);
    assert!(answer.starts_with("HTTP/2 307"), "{answer}");
    assert!(
        answer.contains(
            "\r\nlocation: /clusters/alpha/clusters/beta/api/v1/namespaces/default/secrets\r\n"
        ),
        "{answer}"
    );
    assert!(
        answer.contains(
            "\r\ncontent-location: /clusters/alpha/clusters/beta/api/v1/namespaces/default/secrets\r\n"
        ),
        "{answer}"
    );
    // Followed, it stays on alpha (whose API server 404s the path).
    curl(moved, true);
    let seen: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert!(
        seen.iter()
            .any(|p| p == "/clusters/beta/api/v1/namespaces/default/secrets"),
        "{seen:?}"
    );
    // A member switching protocols on a request that asked for no upgrade
    // gets a 502 in words, not a 101 and a closed connection.
    let switch = "/api/v1/namespaces/default/configmaps/switch";
    api.set_redirect(switch, 101, "/x");
    let answer = curl(switch, false);
    assert!(answer.starts_with("HTTP/2 502"), "{answer}");
    assert!(answer.contains("asked for no upgrade"), "{answer}");
    let answer = curl(away, false);
    assert!(answer.starts_with("HTTP/2 308"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("location:"),
        "{answer}"
    );
}
