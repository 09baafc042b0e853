//! The dial policy judges the address actually dialed: a permitted name
//! that resolves to loopback, a hand-made EndpointSlice with no Pod behind
//! it, and a host-network pod are refused unless an `--allow` rule names the
//! address; the refusal names the address and the rule that would allow it,
//! and never the agent's own rules.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServer, TargetPort};
use support::{Env, Out, Streaming};

/// Hub up, member `alpha` joined with `allow` rules.
fn connected(env: &Env, api: &ApiServer, allow: &[&str]) {
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let mut flags = vec!["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"];
    for a in allow {
        flags.extend(["--allow", a]);
    }
    let o = env.join(&join, &flags);
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
}

fn curl_via_gateway(env: &Env, authority: &str) -> Out {
    let s = env.status();
    let gw = s["hub"]["gatewayURL"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let ca = env.path("data/towerctl/ca.crt");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", "--proxy", &gw, "--proxy-cacert"])
        .arg(ca)
        .args([
            "--proxy-header",
            &format!("Proxy-Authorization: Bearer {}", token.trim()),
        ])
        .args(["-p", &format!("http://{authority}/")]);
    support::run_bounded(cmd, Duration::from_secs(30))
}

/// `towerctl port-forward alpha TARGET :PORT` in the foreground: the first
/// stream's outcome (body or refusal) through the local port.
fn forward_once(env: &Env, target: &str, port: u16) -> (Out, String) {
    let pf =
        Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", target, &format!(":{port}")]));
    pf.wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(20));
    let local: u16 = pf
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("no local port");
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{local}/"),
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let text = pf.output();
    (o, text)
}

#[test]
fn a_permitted_name_resolving_to_loopback_is_refused_unless_its_address_is_allowed() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("the agent's own host");
    connected(&env, &api, &[&format!("localhost:{}", web.port())]);

    // The name is allowed; the address it leads to is not.
    let o = curl_via_gateway(&env, &format!("localhost.alpha:{}", web.port()));
    assert!(!o.ok() && o.stderr.contains("403"), "{o:?}");
    assert!(!o.stdout.contains("the agent's own host"), "{o:?}");
    let audit = env.towerctl(&["audit", "-o", "json"]);
    assert!(
        audit.stdout.contains("\"status\":403") || audit.stdout.contains("\"status\": 403"),
        "{audit:?}"
    );

    // The refusal names the address and the rule, not the agent's rules.
    let o = connect_raw(&env, &format!("localhost.alpha:{}", web.port()));
    let want = format!("--allow 127.0.0.1:{}", web.port());
    assert!(
        o.contains("403")
            && o.contains(&format!("127.0.0.1:{}", web.port()))
            && o.contains(&want)
            && o.contains("loopback"),
        "{o}"
    );
    assert!(
        !o.contains("services, pods"),
        "the agent's rules leaked: {o}"
    );
}

#[test]
fn an_explicit_address_rule_permits_the_host() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("the agent's own host");
    connected(
        &env,
        &api,
        &[
            &format!("localhost:{}", web.port()),
            &format!("127.0.0.1:{}", web.port()),
        ],
    );
    let o = curl_via_gateway(&env, &format!("localhost.alpha:{}", web.port()));
    assert!(o.ok() && o.stdout.contains("the agent's own host"), "{o:?}");
    // An IP-literal target still needs its rule to cover the port.
    let other = support::http_server("other");
    let o = connect_raw(&env, &format!("127.0.0.1.alpha:{}", other.port()));
    assert!(o.contains("403"), "{o}");
}

/// An IPv6 address as a CONNECT target (`ADDR.ip6.CLUSTER`, since an
/// authority cannot hold `[::1].alpha`), allowed by a bracketed rule.
#[test]
fn an_ipv6_address_is_a_connect_target() {
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: nothing to check");
        return;
    };
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut c) = c else { return };
            use std::io::Write;
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nover ipv6\n");
        }
    });
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[&format!("[::1]:{port}")]);
    for host in ["0-0-0-0-0-0-0-1.ip6.alpha", "0--1.ip6.alpha"] {
        let o = curl_via_gateway(&env, &format!("{host}:{port}"));
        assert!(o.ok() && o.stdout.contains("over ipv6"), "{host}: {o:?}");
    }
    // The rule's port bounds it.
    let o = connect_raw(&env, &format!("0-0-0-0-0-0-0-1.ip6.alpha:{}", port ^ 1));
    assert!(o.contains("403"), "{o}");
}

/// A raw CONNECT with the admin's token: the status line and body.
fn connect_raw(env: &Env, authority: &str) -> String {
    let s = env.status();
    let gw = s["hub"]["gatewayURL"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let ca = env.path("data/towerctl/ca.crt");
    // curl shows the proxy's refusal body only with -v; use openssl instead
    // (`-no_ign_eof`: it ends when its input does, 3 s on, not when the
    // hub closes the kept-alive connection, which is idle for 120 s).
    let hostport = gw
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let req = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {}\r\n\r\n",
        token.trim()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "(printf '%s' \"$REQ\"; sleep 3) | openssl s_client -quiet -no_ign_eof -connect {hostport} -CAfile {} 2>/dev/null",
            ca.display()
        ))
        .env("REQ", req);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    o.stdout
}

#[test]
fn hand_made_endpoints_and_host_network_pods_are_host_targets() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("a host port");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Number(web.port()))],
        &[("app", "web")],
    );
    // No targetRef: a hand-made slice that could point anywhere.
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", web.port())]);
    api.add_pod(
        "default",
        "hostpod",
        "127.0.0.1",
        &[("app", "h")],
        true,
        &[("http", web.port())],
    );
    api.set_host_network("default", "hostpod");
    // A suffix rule for the cluster's names does not make them hosts.
    connected(&env, &api, &["*.svc.cluster.local"]);

    let (o, text) = forward_once(&env, "svc/web", 80);
    assert!(!o.stdout.contains("a host port"), "{o:?}");
    let want = format!("--allow 127.0.0.1:{}", web.port());
    assert!(
        text.contains(&want) && text.contains("dial policy"),
        "{text}"
    );

    let (o, text) = forward_once(&env, "pod/hostpod", web.port());
    assert!(!o.stdout.contains("a host port"), "{o:?}");
    assert!(text.contains(&want), "{text}");

    // Named in the cluster's DNS, they are the same Service and pod (a
    // headless Service's name resolved, as a host, to its endpoints
    // unvetted: a host-network pod's node, a hand-made slice's address).
    let o = connect_raw(&env, "web.default.svc.cluster.local.alpha:80");
    assert!(
        o.contains("403") && o.contains("service default/web") && o.contains(&want),
        "{o}"
    );
    let o = connect_raw(
        &env,
        &format!("hostpod.h.default.svc.cluster.local.alpha:{}", web.port()),
    );
    assert!(
        o.contains("403") && o.contains("pod default/hostpod") && o.contains(&want),
        "{o}"
    );
    // Names the agent cannot vet so (a pod's address name, a Service it
    // does not find: ExternalName, a hostname that is not a pod's name)
    // are dialed as the hosts they are, each address needing a rule that
    // names it; nothing resolves them here.
    // (One that leads nowhere as a host either is answered with what the
    // lookup of the Service found.)
    let o = connect_raw(&env, "ghost.default.svc.cluster.local.alpha:80");
    assert!(
        o.contains("404") && o.contains("service default/ghost not found"),
        "{o}"
    );
    // (A name no rule allows is refused first, as any host.)
    let o = connect_raw(&env, "10-0-0-1.default.pod.cluster.local.alpha:80");
    assert!(o.contains("403") && o.contains("is not allowed"), "{o}");
    let s = env.status();
    assert!(s["agents"].is_array(), "{s}");
}

#[test]
fn host_targets_work_with_an_explicit_address_rule() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("a host port");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Number(web.port()))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", web.port())]);
    api.add_pod(
        "default",
        "hostpod",
        "127.0.0.1",
        &[("app", "h")],
        true,
        &[("http", web.port())],
    );
    api.set_host_network("default", "hostpod");
    connected(&env, &api, &["127.0.0.0/8"]);
    let (o, _) = forward_once(&env, "svc/web", 80);
    assert!(o.stdout.contains("a host port"), "{o:?}");
    let (o, _) = forward_once(&env, "pod/hostpod", web.port());
    assert!(o.stdout.contains("a host port"), "{o:?}");
    // The same through their names in the cluster's DNS (the agent reads
    // them, it does not ask a resolver; none here knows them).
    let o = curl_via_gateway(&env, "web.default.svc.cluster.local.alpha:80");
    assert!(o.stdout.contains("a host port"), "{o:?}");
}

/// A CONNECT to a Service that does not exist is answered "not found" and
/// starts no watch (the agent watched every name it was asked for, 5
/// minutes each: 300 made-up names, 600 list and watch requests in 30 s);
/// one that exists is watched for the next connections.
#[test]
fn only_services_that_exist_are_watched() {
    let env = Env::new();
    let api = ApiServer::start();
    api.add_service(
        "default",
        "real",
        &[("http", 80, TargetPort::Number(9))],
        &[],
    );
    connected(&env, &api, &[]);
    for name in ["nope1", "nope2", "nope3", "real"] {
        // curl says how the proxy answered the CONNECT.
        let o = curl_via_gateway(&env, &format!("{name}.default.svc.alpha:80"));
        assert!(
            !o.ok() && (o.stderr.contains("404") || o.stderr.contains("503")),
            "{name}: {o:?}"
        );
    }
    // A watch starts with a list of the Service by name (connections read
    // it by GET).
    let watched = |name: &str| {
        api.requests().iter().any(|r| {
            r.path.contains("fieldSelector=")
                && (r.path.contains(&format!("metadata.name%3D{name}"))
                    || r.path.contains(&format!("metadata.name={name}")))
        })
    };
    support::wait_for("a watch of service real", Duration::from_secs(20), || {
        watched("real").then_some(())
    });
    for name in ["nope1", "nope2", "nope3"] {
        assert!(
            !watched(name),
            "service {name} does not exist but is watched"
        );
    }
}

/// A CONNECT to a name longer than the agent takes is refused by the hub
/// as a bad request naming the limit (it was a 503 blaming an older agent
/// or a reconnect).
#[test]
fn an_overlong_target_name_is_a_bad_request() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let long = "a".repeat(260);
    let o = curl_via_gateway(&env, &format!("{long}.default.svc.alpha:80"));
    assert!(!o.ok() && o.stderr.contains("400"), "{o:?}");
    let o = connect_answer(&env, &format!("{long}.default.svc.alpha:80"));
    assert!(
        o.starts_with("HTTP/1.1 400") && o.contains("at most 253 characters"),
        "{o}"
    );
}

/// A path that climbs out of the member's prefix (`/clusters/alpha/../x`,
/// or its percent-encoded form) is refused at the gateway and never
/// reaches the member: joined to an API URL with a path of its own
/// (Rancher's `/k8s/clusters/c-1`) it named another cluster.
#[test]
fn paths_with_dot_segments_never_reach_the_member() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let token = token.trim();
    let (code, _) = support::gateway_get(&env, token, "/clusters/alpha/version");
    assert_eq!(code, "200");
    for path in [
        "/clusters/alpha/../beta/version",
        "/clusters/alpha/%2e%2e/beta/version",
        "/clusters/alpha//version",
    ] {
        let (code, body) = support::gateway_get(&env, token, path);
        assert_eq!(code, "400", "{path}: {body}");
        assert!(body.contains("refuses request paths"), "{path}: {body}");
    }
    let seen: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert!(
        seen.iter()
            .all(|p| !p.contains("..") && !p.contains("%2e") && !p.contains("//")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|p| p == "/version"), "{seen:?}");
}

/// The gateway's answer to one CONNECT (status line, headers and body),
/// read until it stops coming (Python's ssl; curl hides a refused
/// CONNECT's body).
fn connect_answer(env: &Env, authority: &str) -> String {
    let s = env.status();
    let gw = s["hub"]["gatewayURL"].as_str().unwrap().to_string();
    let hostport = gw
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let ca = env.path("data/towerctl/ca.crt");
    let script = r#"
import socket, ssl, sys
host, port, ca, authority, token = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, int(port)), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {token}\r\n\r\n".encode())
        out = b""
        try:
            while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < 20:
                c = s.recv(4096)
                if not c:
                    break
                out += c
        except (socket.timeout, ssl.SSLError):
            pass
        sys.stdout.write(out.decode(errors="replace"))
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script, host, port])
        .arg(ca)
        .args([authority, token.trim()]);
    support::run_bounded(cmd, Duration::from_secs(20)).stdout
}
