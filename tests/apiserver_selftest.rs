//! Drives the real `kubectl` against the stand-in API server.
//!
//! kubectl (client-go) never sends credentials to a plain-http server, so every kubectl here
//! goes through `AuthProxy`, which plays the part of the tunnel agent adding its own token.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, TargetPort};

const KUBECTL: &str = "/usr/bin/kubectl";
const TIMEOUT: Duration = Duration::from_secs(60);

/// A server, an auth-adding proxy in front of it, and a kubeconfig pointing at the proxy.
struct Env {
    server: ApiServer,
    _proxy: AuthProxy,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let server = ApiServer::start();
        let proxy = AuthProxy::start(server.addr, apiserver::TOKEN);
        let dir = tempfile::tempdir().unwrap();
        let direct = dir.path().join("direct.kubeconfig");
        server.write_kubeconfig(&direct);
        let config = std::fs::read_to_string(&direct).unwrap();
        let proxied = config.replace(&server.addr.to_string(), &proxy.addr.to_string());
        std::fs::write(dir.path().join("kubeconfig"), proxied).unwrap();
        Env {
            server,
            _proxy: proxy,
            dir,
        }
    }

    fn kubectl_with(&self, kubeconfig: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(self.dir.path().join(kubeconfig))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args);
        cmd
    }

    fn kubectl(&self, args: &[&str]) -> Command {
        self.kubectl_with("kubeconfig", args)
    }

    /// Runs kubectl to completion and returns its stdout, panicking on failure.
    fn ok(&self, args: &[&str]) -> String {
        let out = run(self.kubectl(args), None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl {args:?} failed: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs a command with a bounded wait, killing it on timeout.
fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kubectl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// A long-running kubectl (e.g. `get -w`) whose stdout lines arrive on a channel.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Streaming {
    fn spawn(mut cmd: Command) -> Streaming {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn kubectl");
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Streaming {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line containing all of `words`.
    fn expect_line(&mut self, words: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line with {words:?}; saw {:?}", self.seen),
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lists_nodes_namespaces_pods() {
    let env = Env::start();
    let nodes = env.ok(&["get", "nodes"]);
    assert!(nodes.contains("fake-node-1"), "{nodes}");
    let namespaces = env.ok(&["get", "ns"]);
    assert!(namespaces.contains("default") && namespaces.contains("kube-system"));
    let pods = env.ok(&["get", "pods", "-A"]);
    assert!(pods.contains("default") && pods.contains("web-0"), "{pods}");
    let phase = env.ok(&["get", "po", "web-0", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Running");
    let version = env.ok(&["version", "-o", "json"]);
    assert!(version.contains("v1.32.0"), "{version}");

    let missing = run(env.kubectl(&["get", "cm", "nope"]), None);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains(r#"configmaps "nope" not found"#),
        "{stderr}"
    );

    // Everything that came through the proxy carried the proxy's (not kubectl's) token.
    let requests = env.server.requests();
    assert!(requests.iter().any(|r| r.path.starts_with("/api/v1/nodes")));
    let bearer = format!("Bearer {}", apiserver::TOKEN);
    assert!(requests
        .iter()
        .all(|r| r.header("authorization") == Some(bearer.as_str())));
}

#[test]
fn watch_all_namespaces_prints_configmap_created_later() {
    let env = Env::start();
    let mut watch = Streaming::spawn(env.kubectl(&["get", "cm", "-A", "-w"]));
    // Make sure the watch is established before creating the configmap.
    wait_for(|| {
        env.server
            .requests()
            .iter()
            .any(|r| r.path.contains("watch=true"))
    });
    env.server
        .create_configmap("kube-system", "late-arrival", &[("k", "v")]);
    let line = watch.expect_line(&["kube-system", "late-arrival"]);
    println!("watch printed: {line}");
}

#[test]
fn watch_namespace_prints_configmap_created_by_kubectl() {
    let env = Env::start();
    env.server.create_configmap("default", "early", &[]);
    let mut watch = Streaming::spawn(env.kubectl(&["get", "cm", "-w"]));
    watch.expect_line(&["early"]);
    env.ok(&["create", "configmap", "by-kubectl", "--from-literal=a=b"]);
    watch.expect_line(&["by-kubectl"]);
    env.ok(&["delete", "cm", "by-kubectl"]);
    let gone = run(env.kubectl(&["get", "cm", "by-kubectl"]), None);
    assert!(!gone.status.success());
}

#[test]
fn apply_creates_then_patches_configmap() {
    let env = Env::start();
    let manifest = env.path("cm.yaml");
    let write = |value: &str| {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  labels:\n    app: demo\n\
             data:\n  greeting: {value}\n"
        );
        std::fs::write(&manifest, yaml).unwrap();
    };
    let manifest_arg = manifest.to_str().unwrap();
    let greeting = || env.ok(&["get", "cm", "settings", "-o", "jsonpath={.data.greeting}"]);

    write("hello");
    let out = env.ok(&["apply", "-f", manifest_arg]);
    assert!(out.contains("configmap/settings created"), "{out}");
    assert_eq!(greeting(), "hello");

    write("bonjour");
    let out = env.ok(&["apply", "-f", manifest_arg]);
    assert!(out.contains("configmap/settings configured"), "{out}");
    assert_eq!(greeting(), "bonjour");
    assert!(env
        .server
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.contains("/configmaps/settings")));
}

#[test]
fn exec_runs_over_websocket() {
    let env = Env::start();
    let out = env.ok(&["exec", "web-0", "--", "echo", "hi"]);
    assert_eq!(out, "hi\n");
    // With -i the fake command echoes stdin back until kubectl half-closes it.
    let out = run(
        env.kubectl(&["exec", "-i", "web-0", "--", "cat"]),
        Some("line one\nline two\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line one\nline two\n");
}

#[test]
fn requests_without_token_get_401() {
    let env = Env::start();
    // kubectl talking straight to the server sends no token over plain http.
    let out = run(env.kubectl_with("direct.kubeconfig", &["get", "ns"]), None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must be logged in"), "{stderr}");

    let response = raw_get(env.server.addr, "/api/v1/namespaces", None);
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains(r#""kind":"Status""#), "{response}");
    let response = raw_get(env.server.addr, "/api/v1/namespaces", Some("wrong"));
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    let response = raw_get(
        env.server.addr,
        "/api/v1/namespaces",
        Some(apiserver::TOKEN),
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let requests = env.server.requests();
    assert!(requests.iter().any(|r| r.header("authorization").is_none()));
}

#[test]
fn services_endpoints_and_endpointslices() {
    let env = Env::start();
    let web_ports = [("http", 80, TargetPort::Name("http"))];
    env.server
        .add_service("default", "web", &web_ports, &[("app", "web")]);
    env.server.add_service(
        "default",
        "db",
        &[("", 5432, TargetPort::Number(5432))],
        &[("app", "db")],
    );
    env.server
        .set_endpoints("default", "web", &[("10.0.0.10", "http", 8080)]);
    env.server
        .set_endpoints("default", "db", &[("10.0.0.30", "", 5432)]);

    let services = env.ok(&["get", "svc", "-o", "name"]);
    assert_eq!(services, "service/db\nservice/web\n");
    let target = env.ok(&[
        "get",
        "services",
        "web",
        "-o",
        "jsonpath={.spec.ports[0].targetPort}",
    ]);
    assert_eq!(target, "http");
    let selector = env.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.selector.app}"]);
    assert_eq!(selector, "web");
    let ep = env.ok(&[
        "get",
        "ep",
        "web",
        "-o",
        "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].name}:{.subsets[0].ports[0].port}",
    ]);
    assert_eq!(ep, "10.0.0.10:http:8080");
    let slices = |selector: &str| {
        env.ok(&[
            "get",
            "endpointslices",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.endpoints[*].addresses[0]} {.ports[0].port}{\"\\n\"}{end}",
        ])
    };
    assert_eq!(
        slices("kubernetes.io/service-name=web"),
        "web-fake 10.0.0.10 8080\n"
    );

    // Replacing the endpoints replaces both objects (still one slice per service).
    env.server.set_endpoints(
        "default",
        "web",
        &[("10.0.0.11", "http", 8080), ("10.0.0.12", "http", 8080)],
    );
    assert_eq!(
        slices("kubernetes.io/service-name=web"),
        "web-fake 10.0.0.11 10.0.0.12 8080\n"
    );
    let ips = env.ok(&[
        "get",
        "endpoints",
        "web",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ]);
    assert_eq!(ips, "10.0.0.11 10.0.0.12");
    let all = env.ok(&["get", "endpointslices.discovery.k8s.io", "-A", "-o", "name"]);
    assert_eq!(
        all,
        "endpointslice.discovery.k8s.io/db-fake\nendpointslice.discovery.k8s.io/web-fake\n"
    );

    // What a kube-rs client asks for (typed objects, label-selected list).
    let token = Some(apiserver::TOKEN);
    let path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices\
                ?labelSelector=kubernetes.io%2Fservice-name%3Ddb";
    let response = raw_get(env.server.addr, path, token);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body: serde_json::Value = serde_json::from_str(body_of(&response)).unwrap();
    assert_eq!(body["kind"], "EndpointSliceList");
    assert_eq!(body["apiVersion"], "discovery.k8s.io/v1");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(items[0]["kind"], "EndpointSlice");
    assert_eq!(items[0]["addressType"], "IPv4");
    assert_eq!(items[0]["endpoints"][0]["addresses"][0], "10.0.0.30");
    assert_eq!(items[0]["endpoints"][0]["conditions"]["ready"], true);
    assert_eq!(items[0]["ports"][0]["port"], 5432);

    // Watchers are told.
    let mut watch = Streaming::spawn(env.kubectl(&["get", "ep", "-w"]));
    wait_for(|| {
        env.server
            .requests()
            .iter()
            .any(|r| r.path.contains("/endpoints?") && r.path.contains("watch=true"))
    });
    env.server
        .set_endpoints("default", "late", &[("10.0.0.40", "", 80)]);
    watch.expect_line(&["late"]);
}

#[test]
fn server_without_discovery_k8s_io() {
    let env = Env::start();
    env.server.set_endpointslices(false);
    env.server
        .add_service("default", "web", &[("", 80, TargetPort::Number(8080))], &[]);
    env.server
        .set_endpoints("default", "web", &[("10.0.0.10", "", 8080)]);

    let out = run(env.kubectl(&["api-resources"]), None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(!stdout.contains("endpointslices"), "{stdout}");
    assert!(stdout.contains("deployments"), "{stdout}");

    let out = run(env.kubectl(&["get", "endpointslices"]), None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("doesn't have a resource type \"endpointslices\""),
        "{stderr}"
    );
    let ip = env.ok(&[
        "get",
        "ep",
        "web",
        "-o",
        "jsonpath={.subsets[0].addresses[0].ip}",
    ]);
    assert_eq!(ip, "10.0.0.10");

    let token = Some(apiserver::TOKEN);
    let addr = env.server.addr;
    let groups = raw_get(addr, "/apis", token);
    assert!(
        groups.contains("\"apps\"") && !groups.contains("discovery.k8s.io"),
        "{groups}"
    );
    let slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    for path in [
        "/apis/discovery.k8s.io/v1",
        "/apis/discovery.k8s.io",
        slices,
    ] {
        let response = raw_get(addr, path, token);
        assert!(response.starts_with("HTTP/1.1 404"), "{path}: {response}");
    }
    // Switched back on, the (still stored) slice is there again.
    env.server.set_endpointslices(true);
    let response = raw_get(addr, slices, token);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("10.0.0.10"), "{response}");
    assert!(raw_get(addr, "/apis", token).contains("discovery.k8s.io"));
}

#[test]
fn label_selectors_filter_lists_and_watches() {
    let env = Env::start();
    let server = &env.server;
    server.add_pod(
        "default",
        "api-0",
        "10.0.1.1",
        &[("app", "api"), ("tier", "x")],
        true,
        &[],
    );
    server.add_pod(
        "default",
        "api-1",
        "10.0.1.2",
        &[("app", "api"), ("tier", "y")],
        false,
        &[],
    );
    server.add_pod(
        "default",
        "db-0",
        "10.0.1.3",
        &[("app", "db")],
        true,
        &[("pg", 5432)],
    );
    let names = |selector: &str| env.ok(&["get", "pods", "-l", selector, "-o", "name"]);
    assert_eq!(names("app=api,tier=x"), "pod/api-0\n");
    assert_eq!(names("app==api"), "pod/api-0\npod/api-1\n");
    assert_eq!(names("app!=api"), "pod/db-0\npod/web-0\n");
    assert_eq!(names("tier in (x, y),app"), "pod/api-0\npod/api-1\n");
    assert_eq!(names("tier notin (x)"), "pod/api-1\npod/db-0\npod/web-0\n");
    assert_eq!(names("!tier"), "pod/db-0\npod/web-0\n");

    let phase = |pod: &str| {
        env.ok(&[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.phase} {.status.conditions[?(@.type==\"Ready\")].status} {.status.podIP}",
        ])
    };
    assert_eq!(phase("api-0"), "Running True 10.0.1.1");
    assert_eq!(phase("api-1"), "Pending False 10.0.1.2");
    let port = env.ok(&[
        "get",
        "pod",
        "db-0",
        "-o",
        "jsonpath={.spec.containers[0].ports[0]}",
    ]);
    assert_eq!(
        port,
        r#"{"containerPort":5432,"name":"pg","protocol":"TCP"}"#
    );

    let response = raw_get(
        server.addr,
        "/api/v1/pods?labelSelector=app%20in%20(api",
        Some(apiserver::TOKEN),
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    // A label-selected watch only sees matching pods.
    let mut watch = Streaming::spawn(env.kubectl(&["get", "pods", "-l", "app=api", "-w"]));
    watch.expect_line(&["api-0"]);
    server.add_pod("default", "db-1", "10.0.1.4", &[("app", "db")], true, &[]);
    server.add_pod("default", "api-2", "10.0.1.5", &[("app", "api")], true, &[]);
    watch.expect_line(&["api-2"]);
    assert!(
        !watch.seen.iter().any(|l| l.contains("db-")),
        "{:?}",
        watch.seen
    );

    server.delete_pod("default", "api-0");
    assert_eq!(names("app=api"), "pod/api-1\npod/api-2\n");
}

#[test]
fn deployments_list_and_get() {
    let env = Env::start();
    env.server
        .add_deployment("default", "web", &[("app", "web")], 2);
    env.server
        .add_deployment("kube-system", "dns", &[("k8s-app", "dns")], 0);
    let names = env.ok(&["get", "deploy", "-A", "-o", "name"]);
    assert_eq!(names, "deployment.apps/web\ndeployment.apps/dns\n");
    let web = env.ok(&[
        "get",
        "deployments.apps",
        "web",
        "-o",
        "jsonpath={.apiVersion} {.spec.selector.matchLabels.app} {.status.readyReplicas}",
    ]);
    assert_eq!(web, "apps/v1 web 2");
    let selected = env.ok(&[
        "get",
        "deployments",
        "-A",
        "-l",
        "k8s-app=dns",
        "-o",
        "name",
    ]);
    assert_eq!(selected, "deployment.apps/dns\n");
    let missing = run(env.kubectl(&["get", "deploy", "nope"]), None);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains(r#"deployments.apps "nope" not found"#),
        "{stderr}"
    );
}

#[test]
fn api_resources_and_get_nodes_have_no_discovery_errors() {
    let env = Env::start();
    for args in [&["api-resources"][..], &["get", "nodes"]] {
        let out = run(env.kubectl(args), None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{args:?}: {stderr}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if args == ["api-resources"] {
            for line in [
                "services  svc  v1  true  Service",
                "endpoints  ep  v1  true  Endpoints",
                "endpointslices  discovery.k8s.io/v1  true  EndpointSlice",
                "deployments  deploy  apps/v1  true  Deployment",
                "pods  po  v1  true  Pod",
            ] {
                let words: Vec<&str> = line.split_whitespace().collect();
                assert!(
                    stdout
                        .lines()
                        .any(|l| l.split_whitespace().collect::<Vec<_>>() == words),
                    "{line} missing in\n{stdout}"
                );
            }
        }
    }
}

#[test]
fn port_forward_pod_over_websocket() {
    let env = Env::start();
    let page = PageServer::start("web-0");
    env.server
        .set_portforward_target("default", "web-0", 8080, page.addr);
    let (_forward, port) = port_forward(&env, &[], "pod/web-0", ":8080", "8080");
    for n in 1..=3 {
        assert_eq!(http_get(port), format!("hello from web-0 #{n}\n"));
    }
    let requests = env.server.requests();
    let upgrade = requests
        .iter()
        .find(|r| r.path.ends_with("/pods/web-0/portforward"))
        .unwrap();
    assert_eq!(upgrade.method, "GET");
    assert_eq!(
        upgrade.header("sec-websocket-protocol"),
        Some("SPDY/3.1+portforward.k8s.io")
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.path.contains("portforward"))
            .count(),
        1
    );
}

#[test]
fn port_forward_pod_over_spdy_fallback() {
    let env = Env::start();
    let page = PageServer::start("web-0");
    env.server
        .set_portforward_target("default", "web-0", 8080, page.addr);
    let no_websockets = [("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")];
    let (_forward, port) = port_forward(&env, &no_websockets, "pod/web-0", "0:8080", "8080");
    for n in 1..=3 {
        assert_eq!(http_get(port), format!("hello from web-0 #{n}\n"));
    }
    let requests = env.server.requests();
    let upgrade = requests
        .iter()
        .find(|r| r.path.ends_with("/pods/web-0/portforward"))
        .unwrap();
    assert_eq!(upgrade.method, "POST");
    assert_eq!(upgrade.header("upgrade"), Some("SPDY/3.1"));
}

#[test]
fn port_forward_service_and_deployment_resolve_to_a_pod() {
    let env = Env::start();
    let page = PageServer::start("api-0");
    let server = &env.server;
    server.add_pod(
        "default",
        "api-0",
        "10.0.2.1",
        &[("app", "api")],
        true,
        &[("http", 9376)],
    );
    server.add_service(
        "default",
        "api",
        &[("web", 80, TargetPort::Name("http"))],
        &[("app", "api")],
    );
    server.set_portforward_target("default", "api-0", 9376, page.addr);
    let (_forward, port) = port_forward(&env, &[], "svc/api", ":80", "9376");
    assert_eq!(http_get(port), "hello from api-0 #1\n");
    assert_eq!(http_get(port), "hello from api-0 #2\n");
    // kubectl picked the pod itself: the session went to api-0.
    let requests = env.server.requests();
    assert!(requests
        .iter()
        .any(|r| r.path.ends_with("/pods/api-0/portforward")));

    // A deployment is resolved the same way, through its selector.
    server.add_deployment("default", "api", &[("app", "api")], 1);
    let (_forward, port) = port_forward(&env, &[], "deploy/api", ":9376", "9376");
    assert_eq!(http_get(port), "hello from api-0 #3\n");
}

#[test]
fn port_forward_carries_large_payloads_and_half_closes() {
    let env = Env::start();
    // An echo "pod": sends back everything until the client half-closes, then closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = stream.try_clone().unwrap();
            let _ = std::io::copy(&mut reader, &mut stream);
        }
    });
    env.server
        .set_portforward_target("default", "web-0", 7, echo);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    // Over the WebSocket tunnel, then over plain SPDY; two connections each.
    let no_websockets = [("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")];
    for envs in [&[][..], &no_websockets] {
        let (_forward, port) = port_forward(&env, envs, "pod/web-0", ":7", "7");
        for _ in 0..2 {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let data = payload.clone();
            let sender = thread::spawn(move || {
                writer.write_all(&data).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).unwrap();
            sender.join().unwrap();
            assert_eq!(echoed.len(), payload.len());
            assert!(echoed == payload, "echoed bytes differ");
        }
    }
}

/// Runs `kubectl port-forward TARGET PORTS` until it reports the local port (which it returns)
/// forwarding to `remote`.
fn port_forward(
    env: &Env,
    envs: &[(&str, &str)],
    target: &str,
    ports: &str,
    remote: &str,
) -> (Streaming, u16) {
    let mut cmd = env.kubectl(&["port-forward", target, ports]);
    cmd.envs(envs.iter().copied());
    let mut forward = Streaming::spawn(cmd);
    let arrow = format!("-> {remote}");
    let line = forward.expect_line(&["Forwarding from 127.0.0.1:", &arrow]);
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (forward, port)
}

/// GET http://127.0.0.1:PORT/ (with curl if installed); returns the body.
fn http_get(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/");
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "20", &url])
        .output();
    match curl {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "curl {url}: {stderr}");
            String::from_utf8(out.stdout).unwrap()
        }
        Err(_) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            body_of(&raw_get(addr, "/", None)).to_owned()
        }
    }
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// A tiny HTTP server standing in for a pod: answers every request with
/// `hello from NAME #N` (N counting connections) and closes the connection.
struct PageServer {
    addr: SocketAddr,
}

impl PageServer {
    fn start(name: &str) -> PageServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_owned();
        thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let body = format!("hello from {name} #{}\n", n + 1);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
        });
        PageServer { addr }
    }
}

fn raw_get(addr: SocketAddr, path: &str, token: Option<&str>) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met in time");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stands in for the tunnel agent: a TCP proxy adding `Authorization: Bearer <token>` to
/// every request head. Responses are copied back verbatim; requests are parsed just enough
/// (head, then a Content-Length body) to rewrite each head; after an Upgrade both ways are raw.
struct AuthProxy {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl AuthProxy {
    fn start(upstream: SocketAddr, token: &str) -> AuthProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = format!("Authorization: Bearer {token}\r\n");
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(proxy_connection(client, upstream, auth.clone()));
            }
        });
        AuthProxy {
            addr,
            runtime: Some(runtime),
        }
    }
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    auth: String,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let server = tokio::net::TcpStream::connect(upstream).await?;
    let (client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut server_rd, &mut client_wr).await });
    let mut client_rd = tokio::io::BufReader::new(client_rd);
    loop {
        let (mut head, mut length, mut upgrade) = (Vec::new(), 0u64, false);
        loop {
            let mut line = String::new();
            if client_rd.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
            upgrade |= lower.starts_with("upgrade:");
            if !lower.starts_with("authorization:") {
                head.extend_from_slice(line.as_bytes());
            }
            if line == "\r\n" {
                break;
            }
        }
        // Insert our header right after the request line.
        let request_line = head.iter().position(|&b| b == b'\n').unwrap() + 1;
        head.splice(request_line..request_line, auth.bytes());
        server_wr.write_all(&head).await?;
        if upgrade {
            tokio::io::copy(&mut client_rd, &mut server_wr).await?;
            return Ok(());
        }
        tokio::io::copy(&mut (&mut client_rd).take(length), &mut server_wr).await?;
    }
}
