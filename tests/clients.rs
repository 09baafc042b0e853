//! Kubernetes clients other than kubectl's everyday verbs, through the
//! contexts `towerctl use` writes (member named by TLS server name), and
//! `towerctl kubectl` across several members. Each goes through a real agent
//! to the stand-in API server.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::apiserver::ApiServer;
use support::{curl_within, run_bounded, wait_for, Env, Streaming};

/// Hub up (once per env), member `name` joined against `api`.
fn join_member(env: &Env, api: &ApiServer, name: &str, add_flags: &[&str]) {
    let kc = env.path(&format!("member-{name}.kubeconfig"));
    api.write_kubeconfig(&kc);
    join_member_with(env, name, add_flags, &kc);
}

/// `cluster add NAME ADD_FLAGS`, then the join with the member kubeconfig
/// `kc`.
fn join_member_with(env: &Env, name: &str, add_flags: &[&str], kc: &std::path::Path) {
    let mut args = vec!["cluster", "add", name];
    args.extend_from_slice(add_flags);
    let o = env.towerctl(&args);
    assert!(o.ok(), "cluster add: {o:?}");
    let join = support::printed_command(&o.stdout, "join");
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--keepalive",
            "1s",
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
}

/// The first `127.0.0.1:PORT` after `prefix` in a streamed output.
fn port_after(s: &Streaming, prefix: &str) -> u16 {
    s.wait_for(prefix, Duration::from_secs(20));
    let out = s.output();
    let at = out.find(prefix).unwrap() + prefix.len();
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("no port after '{prefix}' in {out:?}: {e}"))
}

#[test]
fn every_kubectl_path_works_through_a_server_name_context() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("forwarded through sni");
    api.add_pod(
        "default",
        "web-1",
        "10.99.0.1",
        &[("app", "web")],
        true,
        &[("http", 8080)],
    );
    api.set_portforward_target("default", "web-1", 8080, web);
    env.up();
    join_member(&env, &api, "alpha", &[]);
    let o = env.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "{o:?}");

    // The context names the member by TLS server name (and by path, for
    // kubectl's discovery cache: see the next test).
    let kc = std::fs::read_to_string(env.path("home/.kube/config")).unwrap();
    assert!(
        kc.contains("tls-server-name: alpha.clusters.towerctl.invalid")
            && kc.contains("/clusters/alpha"),
        "{kc}"
    );

    // Paths client-go builds itself (RequestURI replaces the base path).
    let o = env.kubectl(&["get", "--raw", "/version"]);
    assert!(o.ok() && o.stdout.contains("v1.32.0"), "{o:?}");
    let o = env.kubectl(&["get", "--raw", "/api"]);
    assert!(o.ok() && o.stdout.contains("APIVersions"), "{o:?}");
    let o = env.kubectl(&["get", "--raw", "/openapi/v3"]);
    assert!(o.ok() && o.stdout.contains("serverRelativeURL"), "{o:?}");
    // A member's own /healthz-style paths are the member's, not the hub's.
    let o = env.kubectl(&["get", "--raw", "/api/v1/namespaces/default"]);
    assert!(o.ok() && o.stdout.contains("\"default\""), "{o:?}");

    // kubectl proxy, then a plain HTTP client.
    let proxy = Streaming::start(env.kubectl_cmd(&["proxy", "--port=0"]));
    let port = port_after(&proxy, "Starting to serve on 127.0.0.1:");
    let o = curl_within(&format!("http://127.0.0.1:{port}/api/v1/namespaces"), 15);
    assert!(
        o.ok() && o.stdout.contains("NamespaceList") && o.stdout.contains("kube-system"),
        "{o:?} {}",
        proxy.output()
    );
    drop(proxy);

    // Upgrades: exec and port-forward.
    let o = env.kubectl(&["exec", "web-0", "--", "echo", "hi"]);
    assert!(o.ok() && o.stdout.trim() == "hi", "{o:?}");
    // kubectl cp to a pod: a tar stream on exec's stdin (the stand-in's exec
    // echoes stdin back, so the file's bytes come out on stdout).
    let local = env.path("cp-src.txt");
    std::fs::write(&local, "carried by kubectl cp").unwrap();
    let o = env.kubectl(&["cp", local.to_str().unwrap(), "web-0:/tmp/cp-dst.txt"]);
    assert!(
        o.ok() && o.stdout.contains("carried by kubectl cp"),
        "{o:?}"
    );
    let pf = Streaming::start(env.kubectl_cmd(&["port-forward", "pod/web-1", ":8080"]));
    let port = port_after(&pf, "Forwarding from 127.0.0.1:");
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(
        o.stdout.contains("forwarded through sni"),
        "{o:?} {}",
        pf.output()
    );
    drop(pf);

    // A server name and a path that disagree are refused, naming both.
    let o = env.kubectl(&["get", "--raw", "/clusters/beta/api"]);
    assert!(
        !o.ok()
            && o.stderr.contains("names cluster 'alpha'")
            && o.stderr.contains("names cluster 'beta'"),
        "{o:?}"
    );
    // Path routing still works for older contexts and for curl.
    let server = wait_for("the gateway URL", Duration::from_secs(5), || {
        env.status()["hub"]["gatewayURL"]
            .as_str()
            .map(str::to_string)
    });
    let o = env.kubectl(&[
        "--server",
        &format!("{server}/clusters/alpha"),
        "--tls-server-name",
        "localhost",
        "get",
        "ns",
    ]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    // The server name alone, with no path in the server URL, is enough.
    // (client-go drops the context's tls-server-name when --server is given.)
    let sni = [
        "--server",
        &server,
        "--tls-server-name",
        "alpha.clusters.towerctl.invalid",
    ];
    let o = env.kubectl(&[&sni[..], &["get", "ns"]].concat());
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let o = env.kubectl(&[&sni[..], &["exec", "web-0", "--", "echo", "bare"]].concat());
    assert!(o.ok() && o.stdout.trim() == "bare", "{o:?}");
    // An SNI for an unknown member is a 404 naming it.
    let o = env.kubectl(&[
        "--tls-server-name",
        "nope.clusters.towerctl.invalid",
        "get",
        "--raw",
        "/version",
    ]);
    assert!(
        o.stderr.contains("cluster 'nope' is not registered"),
        "{o:?}"
    );
}

/// A TCP server that answers "ok" for every two bytes it receives: a peer
/// that only speaks after a write-write pair, the pattern Nagle's algorithm
/// stalls (the second write waits for the ACK of the first, which the
/// receiver delays by 40 ms as it has nothing to send yet).
fn pair_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let (mut buf, mut pending) = ([0u8; 64], 0usize);
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    pending += n;
                    while pending >= 2 {
                        pending -= 2;
                        if c.write_all(b"ok").is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// kubectl port-forward (and exec, attach) go through the agent's client
/// to the member's API server as an upgraded connection. That client used
/// kube's builder, which leaves Nagle's algorithm on: each second small
/// write in a row waited for the API server's delayed ACK, 40 ms per
/// exchange (44 ms measured against 2-3 ms). Rounds of two writes then a
/// read through `kubectl port-forward` must not stall like that.
#[test]
fn interactive_streams_through_kubectl_are_not_held_back_by_nagle() {
    let env = Env::new();
    let api = pair_api();
    env.up();
    join_member(&env, &api, "alpha", &[]);
    assert_no_nagle_stalls(&env);
}

/// The same when the agent reaches its API server through the member
/// kubeconfig's `proxy-url`: that path used kube's own client builder,
/// which leaves Nagle on.
#[test]
fn interactive_streams_through_the_members_proxy_url_are_not_held_back_by_nagle() {
    let env = Env::new();
    let api = pair_api();
    let proxy = support::ConnectProxy::start();
    let kc = env.path("member-alpha.kubeconfig");
    api.write_kubeconfig(&kc);
    let text = std::fs::read_to_string(&kc).unwrap();
    let server = format!("    server: http://{}\n", api.addr);
    assert!(text.contains(&server), "{text}");
    let with_proxy = text.replace(
        &server,
        // Credentials percent-encoded in the URL, as kubectl reads them.
        &format!(
            "{server}    proxy-url: http://us%40er:p%3Ass@{}\n",
            proxy.addr
        ),
    );
    std::fs::write(&kc, with_proxy).unwrap();
    env.up();
    join_member_with(&env, "alpha", &[], &kc);
    assert_no_nagle_stalls(&env);
    let targets = proxy.targets.lock().unwrap().clone();
    assert!(
        targets.contains(&api.addr.to_string()),
        "the agent did not go through the proxy: {targets:?}"
    );
    // base64("us@er:p:ss")
    let auths = proxy.auths.lock().unwrap().clone();
    assert!(
        auths
            .iter()
            .all(|a| a.as_deref() == Some("Basic dXNAZXI6cDpzcw==")),
        "the proxy's credentials were not sent as given: {auths:?}"
    );
}

/// A WebSocket client that cannot set `Authorization` (a browser) names
/// its token in a `base64url.bearer.authorization.k8s.io.` subprotocol, as
/// kube-apiserver accepts: the gateway accepts it too, and neither the
/// token nor the client's cookies reach the member (the subprotocol used
/// to be refused with 401 here, and passed on to the member).
/// `curl -v` asking `env`'s gateway for a WebSocket upgrade at `path`
/// (HTTP/1.1, its CA trusted), with `headers` besides the upgrade's own; it
/// holds the upgraded stream until `max_secs`.
fn websocket_curl(env: &Env, max_secs: u32, headers: &[&str], path: &str) -> Command {
    let gateway = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "-v",
        "--http1.1",
        "--max-time",
        &max_secs.to_string(),
        "--cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"));
    for h in [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    .iter()
    .chain(headers)
    {
        curl.args(["-H", h]);
    }
    curl.arg(format!("{gateway}{path}"));
    curl
}

#[test]
fn a_websocket_naming_its_token_as_a_subprotocol_is_served_without_passing_it_on() {
    use base64::Engine;
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    join_member(&env, &api, "alpha", &[]);
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.trim());
    let curl = websocket_curl(
        &env,
        3,
        &[
            &format!(
                "Sec-WebSocket-Protocol: v4.channel.k8s.io, base64url.bearer.authorization.k8s.io.{encoded}"
            ),
            "Cookie: session=browser-secret",
        ],
        "/clusters/alpha/api/v1/namespaces/default/pods/web-0/exec?command=echo&command=hi&stdout=true",
    );
    // curl waits on the upgraded stream until --max-time: the answer's
    // head (in its trace) is what counts.
    let o = run_bounded(curl, Duration::from_secs(20));
    assert!(o.stderr.contains("< HTTP/1.1 101"), "{o:?}");
    let exec = api
        .requests()
        .into_iter()
        .rfind(|r| r.path.contains("/exec"))
        .expect("the exec reached the member");
    assert_eq!(
        exec.header("sec-websocket-protocol"),
        Some("v4.channel.k8s.io"),
        "{exec:?}"
    );
    assert!(exec.header("cookie").is_none(), "{exec:?}");
    assert!(!format!("{exec:?}").contains(token.trim()), "{exec:?}");
    assert!(!format!("{exec:?}").contains(&encoded), "{exec:?}");
}

/// An upgraded stream (exec here; attach and port-forward alike) counts
/// among the member's streams, and its window in the member's budget, for
/// as long as it is open: hyper ends the task that drove the channel at
/// the 101, which gave both back while the stream went on (an operator
/// could so hold any number of exec streams' buffers outside every
/// budget).
#[test]
fn an_upgraded_stream_counts_among_the_members_streams_while_it_is_open() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    join_member(&env, &api, "alpha", &[]);
    let metrics = support::metrics_addr(&env);
    let streams = || support::metric(&metrics, "towerctl_tunnel_streams{cluster=\"alpha\"} ");
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    // One request on its own connection, the upgrade: no kept channel.
    let mut curl = websocket_curl(
        &env,
        6,
        &[
            &format!("Authorization: Bearer {}", token.trim()),
            "Sec-WebSocket-Protocol: v5.channel.k8s.io",
        ],
        "/clusters/alpha/api/v1/namespaces/default/pods/web-0/exec?command=cat&stdin=true&stdout=true",
    );
    curl.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut held = curl.spawn().unwrap();
    wait_for(
        "the exec to reach the member",
        Duration::from_secs(5),
        || {
            api.requests()
                .iter()
                .any(|r| r.path.contains("/exec"))
                .then_some(())
        },
    );
    // Well after its 101: still counted.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(streams(), 1, "the open exec stream is not counted");
    let _ = held.wait();
    wait_for(
        "the stream to be given back",
        Duration::from_secs(10),
        || (streams() == 0).then_some(()),
    );
}

/// A stand-in API server with pod `pair-0` whose port 7000 answers "ok"
/// after every two bytes.
fn pair_api() -> ApiServer {
    let api = ApiServer::start();
    api.add_pod(
        "default",
        "pair-0",
        "10.99.0.7",
        &[],
        true,
        &[("pair", 7000)],
    );
    api.set_portforward_target("default", "pair-0", 7000, pair_server());
    api
}

/// Write, 2 ms, write, read through `kubectl port-forward` to `pair-0`:
/// no round may wait for a delayed ACK (in most rounds).
fn assert_no_nagle_stalls(env: &Env) {
    use std::io::{Read, Write};
    let o = env.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let pf = Streaming::start(env.kubectl_cmd(&["port-forward", "pod/pair-0", ":7000"]));
    let port = port_after(&pf, "Forwarding from 127.0.0.1:");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rounds = Vec::new();
    for i in 0..21 {
        let t = std::time::Instant::now();
        c.write_all(b"a").unwrap();
        std::thread::sleep(Duration::from_millis(2));
        c.write_all(b"b").unwrap();
        let mut ok = [0u8; 2];
        c.read_exact(&mut ok)
            .unwrap_or_else(|e| panic!("round {i}: {e}; {}", pf.output()));
        assert_eq!(&ok, b"ok");
        if i > 0 {
            // The first round also opens the stream to the pod.
            rounds.push(t.elapsed());
        }
    }
    // A Nagle stall is at least the 40 ms minimum delayed ACK, in every
    // round; without it a round is a few ms. Half the rounds is the bound,
    // so that a busy machine's scheduling hiccups cannot fail the test.
    let stalled = rounds
        .iter()
        .filter(|d| **d >= Duration::from_millis(38))
        .count();
    assert!(
        stalled < rounds.len() / 2,
        "{stalled} of {} write-write-read rounds took 38 ms or more: {rounds:?}",
        rounds.len()
    );
}

/// The Python interpreter with the official `kubernetes` client: the venv
/// `.ci/run` creates under target/, else `TOWERCTL_TEST_PYTHON`, else python3.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TOWERCTL_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python3");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}

const PY_CLIENT: &str = r#"
import sys
from kubernetes import client, config, watch
config.load_kube_config()  # KUBECONFIG / ~/.kube/config, current context
print("version", client.VersionApi().get_code().git_version)
v1 = client.CoreV1Api()
print("namespaces", ",".join(sorted(n.metadata.name for n in v1.list_namespace().items)))
seen = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, "default", timeout_seconds=2, _request_timeout=20):
    seen.append(ev["type"] + ":" + ev["object"].metadata.name)
print("watch", " ".join(seen))
"#;

#[test]
fn the_official_python_client_uses_the_context_towerctl_wrote() {
    let env = Env::new();
    let api = ApiServer::start();
    api.create_configmap("default", "py-watched", &[("k", "v")]);
    env.up();
    join_member(&env, &api, "alpha", &[]);
    assert!(env.towerctl(&["use", "alpha"]).ok());

    let mut cmd = Command::new(python());
    env.apply_env(&mut cmd);
    cmd.args(["-c", PY_CLIENT]);
    let o = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        !o.stderr.contains("No module named 'kubernetes'"),
        "the official Python client is not installed: run .ci/run (it creates target/py), \
         or 'pip install kubernetes', or point TOWERCTL_TEST_PYTHON at a python that has it: {o:?}"
    );
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("version v1.32.0"), "{o:?}");
    assert!(
        o.stdout.contains("namespaces ") && o.stdout.contains("kube-system"),
        "{o:?}"
    );
    assert!(o.stdout.contains("ADDED:py-watched"), "{o:?}");
}

/// Watches a namespace's configmaps until the stream ends; says each
/// event's type (`NONE` for an event that is `None`) and how it ended.
const PY_WATCH_TO_THE_END: &str = r#"
from kubernetes import client, config, watch
config.load_kube_config()
v1 = client.CoreV1Api()
seen = []
try:
    for ev in watch.Watch().stream(v1.list_namespaced_config_map, "default", timeout_seconds=120, _request_timeout=120):
        seen.append("NONE" if ev is None else ev["type"])
        print("event", seen[-1], flush=True)
except client.rest.ApiException as e:
    seen.append("error %s" % e.status)
except Exception as e:
    seen.append("exception %s" % type(e).__name__)
print("ended", " ".join(seen), flush=True)
"#;

/// A watch the hub ends (its member's tunnel went away) ends in the
/// official Python client with the hub's error: a blank line ahead of the
/// ERROR event was handed to the caller as a `None` event, and code that
/// reads `ev["object"]` failed with a TypeError instead.
#[test]
fn the_python_clients_watch_ended_by_the_hub_raises_its_error() {
    let env = Env::new();
    let api = ApiServer::start();
    api.create_configmap("default", "py-before", &[("k", "v")]);
    env.up();
    join_member(&env, &api, "alpha", &[]);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let mut cmd = Command::new(python());
    env.apply_env(&mut cmd);
    cmd.args(["-c", PY_WATCH_TO_THE_END]);
    let mut watch = Streaming::start(cmd);
    watch.wait_for("event ADDED", Duration::from_secs(30));
    env.kill9("agent-alpha");
    wait_for("the watch to end", Duration::from_secs(30), || {
        watch.has_exited().then_some(())
    });
    let out = watch.output();
    let ended = out
        .lines()
        .find(|l| l.starts_with("ended"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(ended, "ended ADDED error 503", "{out}");
}

#[test]
fn members_behind_one_gateway_never_share_kubectl_discovery_caches() {
    let env = Env::new();
    let with = ApiServer::start();
    let without = ApiServer::start();
    without.set_endpointslices(false);
    env.up();
    join_member(&env, &with, "alpha", &[]);
    join_member(&env, &without, "beta", &[]);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.towerctl(&["use", "beta"]).ok());
    // alpha's discovery (with discovery.k8s.io) is cached first ...
    let o = env.kubectl(&["--context", "tower-alpha", "get", "endpointslices", "-A"]);
    assert!(o.ok(), "{o:?}");
    // ... and must not be used for beta, whose server predates the group.
    let o = env.kubectl(&["--context", "tower-beta", "get", "endpointslices", "-A"]);
    assert!(
        !o.ok() && o.stderr.contains("doesn't have a resource type"),
        "beta answered with alpha's discovery: {o:?}"
    );
}

/// Pids of the direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state, ppid, …
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(child);
        }
    }
    v
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn towerctl_kubectl_runs_on_selected_members_and_merges_their_output() {
    let env = Env::new();
    let (a, b, c) = (ApiServer::start(), ApiServer::start(), ApiServer::start());
    env.up();
    join_member(
        &env,
        &a,
        "alpha",
        &["--label", "env=prod", "--label", "region=eu"],
    );
    join_member(&env, &b, "beta", &["--label", "env=prod"]);
    join_member(&env, &c, "gamma", &["--label", "env=prod"]);
    // Registered, never joined, not selected by env=prod.
    let o = env.towerctl(&["cluster", "add", "delta", "--label", "env=dev"]);
    assert!(o.ok(), "{o:?}");

    // Labels: shown, changed, removed, checked.
    let o = env.towerctl(&["cluster", "list", "-o", "wide"]);
    assert!(
        o.ok() && o.stdout.contains("LABELS") && o.stdout.contains("env=prod,region=eu"),
        "{o:?}"
    );
    let o = env.towerctl(&["cluster", "label", "beta", "env=staging", "tier=gold"]);
    assert!(
        o.ok() && o.stdout.contains("env=staging,tier=gold"),
        "{o:?}"
    );
    let o = env.towerctl(&["cluster", "label", "beta", "env=prod", "tier-"]);
    assert!(o.ok() && o.stdout.contains("labeled: env=prod"), "{o:?}");
    let o = env.towerctl(&["cluster", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let beta = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "beta")
        .unwrap();
    assert_eq!(beta["labels"], serde_json::json!({"env": "prod"}), "{list}");
    let o = env.towerctl(&["cluster", "label", "nope", "a=b"]);
    assert!(!o.ok() && o.stderr.contains("not registered"), "{o:?}");
    let o = env.towerctl(&["cluster", "label", "beta", "bad key=x"]);
    assert!(!o.ok() && o.stderr.contains("invalid label"), "{o:?}");
    // The member's server and credentials are the context's: another
    // given to kubectl is refused (`-s URL` sent the context's token there).
    for bad in [
        &["-s", "https://127.0.0.1:9", "get", "ns"][..],
        &["-shttps://127.0.0.1:9", "get", "ns"],
        &["--token=abc", "get", "ns"],
        &["get", "ns", "--client-key", "/tmp/k"],
    ] {
        let mut args = vec!["kubectl", "alpha", "--"];
        args.extend_from_slice(bad);
        let o = env.towerctl(&args);
        assert!(
            !o.ok()
                && o.stderr
                    .contains("chooses the context of each member itself"),
            "{bad:?}: {o:?}"
        );
    }
    // towerctl.io/name is the member's own name, for every selector: it
    // cannot be set, and `-l towerctl.io/name=alpha` runs on alpha alone
    // (a label set on beta made it run there).
    for forged in ["towerctl.io/name=alpha", "x.towerctl.io/team=a"] {
        let o = env.towerctl(&["cluster", "label", "beta", forged]);
        assert!(
            !o.ok() && o.stderr.contains("towerctl's own"),
            "{forged}: {o:?}"
        );
        let o = env.towerctl(&["cluster", "add", "epsilon", "--label", forged]);
        assert!(
            !o.ok() && o.stderr.contains("towerctl's own"),
            "{forged}: {o:?}"
        );
    }
    let o = env.towerctl(&[
        "kubectl",
        "-l",
        "towerctl.io/name=alpha",
        "--",
        "get",
        "--raw",
        "/version",
    ]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    assert!(o.stdout.lines().all(|l| !l.starts_with("beta")), "{o:?}");

    // gamma goes down.
    env.kill9("agent-gamma");
    wait_for("gamma disconnected", Duration::from_secs(15), || {
        let o = env.towerctl(&["cluster", "list", "-o", "json"]);
        let l: serde_json::Value = serde_json::from_str(&o.stdout).ok()?;
        l.as_array()?
            .iter()
            .any(|m| m["name"] == "gamma" && m["state"] != "connected")
            .then_some(())
    });

    // A table: one header, a CLUSTER column, the down member in the summary.
    let o = env.towerctl(&["kubectl", "-l", "env=prod", "--", "get", "ns"]);
    assert_eq!(o.code, Some(1), "{o:?}");
    let headers = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("CLUSTER"))
        .count();
    assert_eq!(headers, 1, "{o:?}");
    assert!(o.stdout.lines().next().unwrap().contains("NAME"), "{o:?}");
    for m in ["alpha", "beta"] {
        assert!(
            o.stdout
                .lines()
                .any(|l| l.starts_with(m) && l.contains("kube-system")),
            "{m}: {o:?}"
        );
    }
    assert!(
        !o.stdout.contains("gamma") && !o.all().contains("delta"),
        "{o:?}"
    );
    assert!(
        o.stderr.contains("1 of 3 members failed")
            && o.stderr.lines().any(|l| l.contains("gamma")
                && l.contains("exit 1")
                && l.contains("cluster 'gamma' is not connected")),
        "{o:?}"
    );

    // -o json: one List, items annotated with their member.
    let o = env.towerctl(&["kubectl", "alpha", "beta", "--", "get", "ns", "-o", "json"]);
    assert!(o.ok(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["kind"], "List", "{v}");
    let mut seen: Vec<String> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["metadata"]["annotations"]["towerctl.io/cluster"]
                    .as_str()
                    .unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "alpha/default",
            "alpha/kube-system",
            "beta/default",
            "beta/kube-system"
        ],
        "{v}"
    );
    let o = env.towerctl(&[
        "kubectl",
        "-l",
        "env=prod,region=eu",
        "--",
        "get",
        "ns",
        "-o",
        "yaml",
    ]);
    assert!(
        o.ok()
            && o.stdout.contains("kind: List")
            && o.stdout.contains("towerctl.io/cluster: alpha"),
        "{o:?}"
    );
    assert!(!o.stdout.contains("beta"), "{o:?}");

    // Other output: prefixed line by line. A member named twice runs once
    // (`alpha beta alpha` ran kubectl twice on alpha).
    let o = env.towerctl(&[
        "kubectl", "alpha", "beta", "alpha", "--", "get", "--raw", "/version",
    ]);
    assert!(o.ok(), "{o:?}");
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("alpha | ") && l.contains("gitVersion"))
            && o.stdout.lines().any(|l| l.starts_with("beta  | ")),
        "{o:?}"
    );
    let versions = |m: &str| {
        o.stdout
            .lines()
            .filter(|l| l.starts_with(m) && l.contains("gitVersion"))
            .count()
    };
    assert_eq!(
        (versions("alpha | "), versions("beta  | ")),
        (1, 1),
        "{o:?}"
    );

    // A kubectl that prints without end (a watch, a huge list) is stopped
    // past 64 MiB and said so; what the others print stays. (Kept whole,
    // it ran the machine out of memory, or waited out --timeout.)
    let endless = env.path("endless-kubectl");
    std::fs::write(
        &endless,
        "#!/bin/sh\nexec yes 'a line of a kubectl that prints without end'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &endless,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut cmd = env.towerctl_cmd(&["kubectl", "alpha", "--timeout", "60s", "--", "get", "ns"]);
    cmd.env("TOWERCTL_KUBECTL", &endless);
    let start = std::time::Instant::now();
    let o = support::run_bounded(cmd, Duration::from_secs(90));
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("stopped") && o.stderr.contains("more than 64 MiB"),
        "{o:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(45),
        "{:?}",
        start.elapsed()
    );

    // A follow prints each member's lines as they come, every member at
    // once, with no timeout of its own (all of it came at the end, and
    // `--timeout`'s 60 s stopped every follow). The stand-in kubectl prints
    // a line, then waits for the test's gate before its last one.
    let gate = env.path("follow-gate");
    let follower = env.path("follow-kubectl");
    std::fs::write(
        &follower,
        format!(
            "#!/bin/sh\necho \"first of $4\"\necho \"a warning of $4\" >&2\ni=0\nwhile [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\necho \"last of $4\"\n",
            gate = gate.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &follower,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut cmd = env.towerctl_cmd(&["kubectl", "alpha", "beta", "--", "logs", "-f", "deploy/web"]);
    cmd.env("TOWERCTL_KUBECTL", &follower);
    let mut follow = Streaming::start(cmd);
    follow.wait_for("alpha | first of tower-alpha", Duration::from_secs(30));
    follow.wait_for("beta  | first of tower-beta", Duration::from_secs(30));
    follow.wait_for("beta  | a warning of tower-beta", Duration::from_secs(30));
    assert!(!follow.has_exited(), "{}", follow.output());
    assert!(!follow.output().contains("last of"), "{}", follow.output());
    std::fs::write(&gate, "").unwrap();
    follow.wait_for("alpha | last of tower-alpha", Duration::from_secs(30));
    follow.wait_for("beta  | last of tower-beta", Duration::from_secs(30));
    wait_for("the follow ends", Duration::from_secs(30), || {
        follow.has_exited().then_some(())
    });

    // A failing subcommand fails on every member, each with its code.
    let o = env.towerctl(&["kubectl", "alpha", "beta", "--", "get", "nosuchkind"]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("2 of 2 members failed")
            && o.stderr.matches("exit 1").count() == 2
            && o.stderr.contains("doesn't have a resource type"),
        "{o:?}"
    );

    // A member that hangs is stopped at --timeout and reported; the others answer.
    b.set_delay(Duration::from_secs(60));
    let start = std::time::Instant::now();
    let o = env.towerctl(&[
        "kubectl",
        "alpha",
        "beta",
        "--timeout",
        "3s",
        "--",
        "get",
        "ns",
    ]);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stdout.lines().any(|l| l.starts_with("alpha")), "{o:?}");
    assert!(
        o.stderr
            .lines()
            .any(|l| l.contains("beta") && l.contains("timed out")),
        "{o:?}"
    );

    // Ctrl-C stops every kubectl it started.
    let mut cmd = env.towerctl_cmd(&["kubectl", "beta", "--timeout", "60s", "--", "get", "ns"]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let kubectl = wait_for("kubectl to start", Duration::from_secs(15), || {
        children_of(pid).into_iter().next()
    });
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let code = wait_for("towerctl kubectl to exit", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    assert_eq!(code.code(), Some(130));
    wait_for("kubectl to be killed", Duration::from_secs(5), || {
        (!alive(kubectl)).then_some(())
    });
}

/// A member kubeconfig for an API server behind `front`, trusting
/// `front.ca_pem`.
fn member_kubeconfig_for_front(env: &Env, front: &support::tls_front::TlsFront) -> PathBuf {
    use base64::Engine;
    let kc = env.path("member-tls.kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: m\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\n\
             users:\n- name: m\n  user:\n    token: {}\n\
             contexts:\n- name: m\n  context:\n    cluster: m\n    user: m\n\
             current-context: m\n",
            front.addr.port(),
            base64::engine::general_purpose::STANDARD.encode(&front.ca_pem),
            support::apiserver::TOKEN,
        ),
    )
    .unwrap();
    // kubectl straight to it: taken.
    let mut direct = Command::new(support::kubectl_path());
    direct.args([
        "--kubeconfig",
        kc.to_str().unwrap(),
        "get",
        "--raw",
        "/version",
    ]);
    let o = run_bounded(direct, Duration::from_secs(30));
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    kc
}

/// A member API server whose certificate is a self-signed CA certificate
/// (`CA:TRUE`, `openssl req -x509`'s default), trusted as itself in the
/// member kubeconfig: kubectl takes it directly, and so does the agent
/// (`daemon::agent::member_tls`; webpki alone refused it with
/// "invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))").
#[test]
fn a_member_server_certificate_that_is_its_own_trusted_ca_is_taken() {
    let env = Env::new();
    let api = ApiServer::start();
    let front = support::tls_front::TlsFront::start_self_signed_ca(api.addr);
    let kc = member_kubeconfig_for_front(&env, &front);
    env.up();
    join_member_with(&env, "alpha", &[], &kc);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "--raw", "/version"]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    let o = env.kubectl(&["get", "pods", "-A"]);
    assert!(o.ok(), "{o:?}");
}

/// A member API server whose certificate is a CA certificate issued by the
/// trusted CA: Go takes any leaf, the agent's webpki does not. The operator
/// gets that in words, with the fix.
#[test]
fn a_member_server_certificate_that_is_a_ca_issued_by_the_ca_is_explained() {
    let env = Env::new();
    let api = ApiServer::start();
    let front = support::tls_front::TlsFront::start_ca_leaf_issued_by_ca(api.addr);
    let kc = member_kubeconfig_for_front(&env, &front);
    env.up();
    join_member_with(&env, "alpha", &[], &kc);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "--raw", "/version"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("presents a CA certificate (basicConstraints CA:TRUE) as its own")
            && o.stderr.contains("CA:FALSE"),
        "{o:?}"
    );
}

/// A member kubeconfig renewed while the agent runs (a rotated token, a
/// renewed client certificate) is used without a restart, as kubectl reads
/// its kubeconfig at each run; one that cannot be used (half written) is
/// said, and the one in use is kept.
#[test]
fn a_changed_member_kubeconfig_is_used_without_a_restart() {
    let env = Env::new();
    let api = ApiServer::start();
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let good = std::fs::read_to_string(&kc).unwrap();
    // As tools replace a file: written aside, renamed over it.
    let replace = |text: &str| {
        let aside = env.path("member.kubeconfig.new");
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, &kc).unwrap();
    };
    env.up();
    join_member_with(&env, "alpha", &[], &kc);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.kubectl(&["get", "--raw", "/version"]).ok());
    let events =
        || std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();

    // Half written: said, and the agent goes on with what it had.
    replace(&good[..good.len() / 2]);
    wait_for(
        "the unusable kubeconfig to be said",
        Duration::from_secs(30),
        || events().contains("changed but is not usable").then_some(()),
    );
    let o = env.kubectl(&["get", "--raw", "/version"]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");

    // Another context made current (`kubectl config use-context`): not
    // followed, the member stays the cluster the agent serves.
    let other = good
        .replace("current-context: fake", "current-context: other")
        .replace(
            "contexts:\n",
            "contexts:\n- name: other\n  context:\n    cluster: elsewhere\n    user: fake\n",
        )
        .replace(
            "clusters:\n",
            "clusters:\n- name: elsewhere\n  cluster:\n    server: http://127.0.0.1:9\n",
        );
    replace(&other);
    wait_for(
        "the switched context to be refused",
        Duration::from_secs(30),
        || {
            events()
                .contains("current-context is now 'other'")
                .then_some(())
        },
    );
    let o = env.kubectl(&["get", "--raw", "/version"]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    // A token the member refuses: taken (the member says no) ...
    replace(&good.replace(support::apiserver::TOKEN, "a-revoked-token"));
    let refused = wait_for("the new token to be used", Duration::from_secs(30), || {
        let o = env.kubectl(&["get", "--raw", "/version"]);
        (!o.ok()).then_some(o)
    });
    assert!(
        refused
            .stderr
            .contains("refused the towerctl agent's own credentials"),
        "{refused:?}"
    );
    // ... and the renewed one, without a restart.
    replace(&good);
    wait_for(
        "the renewed token to be used",
        Duration::from_secs(30),
        || {
            env.kubectl(&["get", "--raw", "/version"])
                .ok()
                .then_some(())
        },
    );
    assert!(
        events().contains("now reaches the member's API server"),
        "{}",
        events()
    );
}
