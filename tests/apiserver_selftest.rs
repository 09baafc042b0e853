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

use apiserver::ApiServer;

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
