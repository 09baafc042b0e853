//! A hub behind what companies run in front of it: nginx terminating TLS
//! with a private CA (the config in `docs/ingress-nginx.conf`, the one
//! README shows), and an HTTP CONNECT proxy between agent and hub.
//!
//! nginx (Debian's `nginx-light`, installed by `.ci/run`) runs as a child of
//! the test with its own prefix, config, pid and logs in a temp dir.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::apiserver::ApiServer;
use support::{wait_for, Env, Out, Streaming};

const SNIPPET: &str = include_str!("../docs/ingress-nginx.conf");

fn nginx_binary() -> &'static str {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!(
        "nginx is not installed: these tests run the real nginx as a TLS ingress. \
         Install Debian's nginx-light (apt-get install nginx-light; .ci/run does) and rerun"
    );
}

/// A CA and a server certificate it issued, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, tag: &str, ca_name: &str, names: &[&str]) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.distinguished_name
        .push(DnType::OrganizationName, "Example Corp");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "hub ingress");
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &Issuer::new(ca, &ca_key)).unwrap();
    let p = Pki {
        ca: dir.join(format!("{tag}-ca.pem")),
        cert: dir.join(format!("{tag}.crt")),
        key: dir.join(format!("{tag}.key")),
    };
    std::fs::write(&p.ca, ca_cert.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

/// README's nginx server block with this test's port, names, files and hub.
/// Each placeholder must be there exactly once, so that the snippet cannot
/// drift from what is tested.
fn site_config(port: u16, cert: &Path, key: &Path, hub_tunnel: &str) -> String {
    let mut s = SNIPPET.to_string();
    for (from, to) in [
        ("listen 443 ssl;", format!("listen 127.0.0.1:{port} ssl;")),
        (
            "server_name hub.example.com;",
            "server_name localhost;".into(),
        ),
        ("/etc/nginx/tls/hub.crt", cert.display().to_string()),
        ("/etc/nginx/tls/hub.key", key.display().to_string()),
        (
            "proxy_pass http://127.0.0.1:8080;",
            format!("proxy_pass http://{hub_tunnel};"),
        ),
    ] {
        assert_eq!(
            s.matches(from).count(),
            1,
            "docs/ingress-nginx.conf must contain '{from}' once"
        );
        s = s.replace(from, &to);
    }
    s
}

/// nginx as a child process; stopped (by its pid) on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Serves `cert`/`key` on a free loopback port in front of `hub_tunnel`.
    fn start(dir: &Path, cert: &Path, key: &Path, hub_tunnel: &str) -> Nginx {
        let bin = nginx_binary();
        let dir = dir.join("nginx");
        std::fs::create_dir_all(&dir).unwrap();
        // nginx cannot report the port it bound, so take a free one and
        // retry on the rare race with another process.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = support::free_port();
            std::fs::write(
                dir.join("site.conf"),
                site_config(port, cert, key, hub_tunnel),
            )
            .unwrap();
            let d = dir.display();
            // As root, nginx would hand its workers to 'nobody', who cannot
            // enter the private temp dir.
            let user = if unsafe { libc::geteuid() } == 0 {
                "user root;"
            } else {
                ""
            };
            std::fs::write(
                dir.join("nginx.conf"),
                format!(
                    "{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
"
                ),
            )
            .unwrap();
            let _ = std::fs::remove_file(dir.join("error.log"));
            let mut child = Command::new(bin)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    last_error = format!(
                        "nginx exited ({st}): {}",
                        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                    );
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx { child, port, dir };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nginx did not listen on 127.0.0.1:{port} within 10s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !last_error.contains("Address already in use") {
                break;
            }
        }
        panic!("{last_error}");
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} nginx");
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM lets the master stop its worker; KILL only if it hangs.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub, a member API server, the CA and nginx in front of the hub.
struct Ingress {
    env: Env,
    _api: ApiServer,
    member_kc: PathBuf,
    join: Vec<String>,
    pki: Pki,
    nginx: Nginx,
}

impl Ingress {
    fn start() -> Ingress {
        Ingress::start_serving(false)
    }

    /// With `untrusted`, nginx first serves a certificate from another CA
    /// ("Some Other CA") until [`Ingress::serve_trusted`].
    fn start_serving(untrusted: bool) -> Ingress {
        Ingress::start_with(untrusted, &[])
    }

    /// With `up` flags for the hub.
    fn start_with(untrusted: bool, up: &[&str]) -> Ingress {
        let env = Env::new();
        let api = ApiServer::start();
        env.up_with(up);
        let join = env.cluster_add("alpha");
        let member_kc = env.path("member.kubeconfig");
        api.write_kubeconfig(&member_kc);
        let tunnel = env.status()["hub"]["tunnelAddress"]
            .as_str()
            .unwrap()
            .to_string();
        let pki = pki(
            env.dir.path(),
            "corp",
            "Example Corp Ingress CA",
            &["localhost"],
        );
        let (cert, key) = if untrusted {
            let other = self::pki(env.dir.path(), "other", "Some Other CA", &["localhost"]);
            (other.cert, other.key)
        } else {
            (pki.cert.clone(), pki.key.clone())
        };
        std::fs::copy(cert, env.path("served.crt")).unwrap();
        std::fs::copy(key, env.path("served.key")).unwrap();
        let nginx = Nginx::start(
            env.dir.path(),
            &env.path("served.crt"),
            &env.path("served.key"),
            &tunnel,
        );
        Ingress {
            env,
            _api: api,
            member_kc,
            join,
            pki,
            nginx,
        }
    }

    /// Has nginx serve the certificate from the CA the tests trust.
    fn serve_trusted(&self) {
        std::fs::copy(&self.pki.cert, self.env.path("served.crt")).unwrap();
        std::fs::copy(&self.pki.key, self.env.path("served.key")).unwrap();
        self.nginx.signal("-HUP");
    }

    fn wss(&self, host: &str) -> String {
        format!("wss://{host}:{}/tunnel", self.nginx.port)
    }

    /// The printed join command with `--hub` replaced, plus `extra`.
    fn args(&self, hub: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.join.clone();
        let i = args
            .iter()
            .position(|a| a == "--hub")
            .expect("--hub in the join command");
        args[i + 1] = hub.to_string();
        args.extend(
            [
                "--kubeconfig",
                self.member_kc.to_str().unwrap(),
                "--keepalive",
                "1s",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn join(&self, hub: &str, extra: &[&str], vars: &[(&str, &str)]) -> (Out, Duration) {
        let args = self.args(hub, extra);
        let mut cmd = self
            .env
            .towerctl_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let start = Instant::now();
        let o = support::run_bounded(cmd, Duration::from_secs(60));
        (o, start.elapsed())
    }

    fn kubectl_reaches_the_member(&self) {
        let o = self.env.towerctl(&["use", "alpha"]);
        assert!(o.ok(), "{o:?}");
        let o = self.env.kubectl(&["get", "nodes"]);
        assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
    }
}

#[test]
fn join_through_a_tls_ingress_fails_fast_without_its_ca_and_works_with_hub_ca() {
    let ing = Ingress::start();

    // Untrusted CA: reported at once, not after --timeout, with what was
    // presented and the fix.
    let (o, took) = ing.join(&ing.wss("localhost"), &["--timeout", "30s"], &[]);
    assert_eq!(o.code, Some(6), "{o:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {o:?}");
    for want in [
        "'CN=hub ingress'",
        "issued by 'CN=Example Corp Ingress CA, O=Example Corp'",
        "covering 'localhost'",
        "--hub-ca",
        "The agent was stopped",
    ] {
        assert!(o.stderr.contains(want), "'{want}' missing: {o:?}");
    }
    assert!(!o.stderr.contains("did not come up"), "{o:?}");

    // Trusted CA, but a name the certificate does not cover.
    let ca = ing.pki.ca.to_str().unwrap();
    let (o, took) = ing.join(
        &ing.wss("127.0.0.1"),
        &["--hub-ca", ca, "--timeout", "30s"],
        &[],
    );
    assert_eq!(o.code, Some(6), "{o:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {o:?}");
    assert!(
        o.stderr.contains("'127.0.0.1', the name dialed")
            && o.stderr.contains("covering 'localhost'"),
        "{o:?}"
    );

    // A missing --hub-ca file is refused before anything starts.
    let (o, _) = ing.join(
        &ing.wss("localhost"),
        &["--hub-ca", "/nonexistent/ca.pem"],
        &[],
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr
            .contains("cannot read --hub-ca '/nonexistent/ca.pem'"),
        "{o:?}"
    );

    // With the CA: through nginx to the hub, and kubectl to the member.
    let (o, _) = ing.join(&ing.wss("localhost"), &["--hub-ca", ca], &[]);
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    ing.kubectl_reaches_the_member();

    // The CA is part of the saved agent config, for reconnects.
    let saved = std::fs::read_to_string(ing.env.path("config/towerctl/agents/alpha.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved["hub_ca"], ca, "{saved}");

    // nginx logs an upgraded request when it ends: the tunnel went through it.
    assert!(ing.env.towerctl(&["leave", "alpha"]).ok());
    wait_for(
        "nginx's access log line for the tunnel",
        Duration::from_secs(10),
        || {
            ing.nginx
                .access_log()
                .contains("\"GET /tunnel HTTP/1.1\" 101")
                .then_some(())
        },
    );
}

#[path = "support/sshflood.rs"]
mod sshflood;

#[test]
fn behind_a_trusted_ingress_token_guesses_hold_back_the_guesser_not_the_agents() {
    // Through nginx every connection comes from nginx's address. With
    // --trusted-proxy, the hub counts refused tokens against the address
    // nginx forwards for: a stranger guessing through the ingress used to
    // hold back every agent joining through it.
    let ing = Ingress::start_with(false, &["--trusted-proxy", "127.0.0.1"]);
    let ca = ing.pki.ca.clone();
    let nginx: std::net::SocketAddr = ([127, 0, 0, 1], ing.nginx.port).into();
    let url = ing.wss("localhost");
    // Wrong tokens from 127.0.0.5 through nginx, one after another, while
    // a real agent joins through it from 127.0.0.1.
    let stop = Arc::new(AtomicBool::new(false));
    let guesser = sshflood::keep_guessing(
        nginx,
        std::net::IpAddr::from([127, 0, 0, 5]),
        url.clone(),
        Some(ca.clone()),
        "alpha",
        stop.clone(),
        Duration::from_secs(60),
    );
    // Six refused: the guesser is held back for a second, longer with
    // every guess after.
    let log = || std::fs::read_to_string(ing.env.path("state/towerctl/hub.log")).unwrap();
    wait_for("six guesses refused", Duration::from_secs(15), || {
        (log().matches("agent refused: auth:").count() >= 6).then_some(())
    });
    // The hub's log names the guesser, with the ingress it came through.
    assert!(
        log().contains("client 127.0.0.5 via 127.0.0.1:"),
        "{}",
        log()
    );
    let ca = ca.to_str().unwrap();
    let (o, took) = ing.join(&url, &["--hub-ca", ca, "--timeout", "30s"], &[]);
    stop.store(true, Ordering::Relaxed);
    guesser.join().unwrap();
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    ing.kubectl_reaches_the_member();
}

/// HAProxy in TCP mode in front of both of the hub's listeners, as an L4
/// load balancer: the gateway's TLS passes through, and HAProxy names each
/// client in a PROXY protocol header (v2 before the gateway, v1 before the
/// tunnel). A child process, stopped by its pid on drop.
struct Haproxy {
    child: Child,
    gateway_port: u16,
    tunnel_port: u16,
}

impl Haproxy {
    fn start(dir: &Path, gateway: &str, tunnel: &str) -> Haproxy {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "haproxy is not installed: this test runs the real HAProxy as a load \
                     balancer speaking the PROXY protocol. Install Debian's haproxy \
                     (apt-get install haproxy; .ci/run does) and rerun"
                )
            });
        let (gateway_port, tunnel_port) = (support::free_port(), support::free_port());
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend gateway
    bind 127.0.0.1:{gateway_port}
    default_backend gateway
backend gateway
    server hub {gateway} send-proxy-v2 check check-send-proxy inter 200
frontend tunnel
    bind 127.0.0.1:{tunnel_port}
    default_backend tunnel
backend tunnel
    server hub {tunnel} send-proxy check check-send-proxy inter 200
"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let h = Haproxy {
            child,
            gateway_port,
            tunnel_port,
        };
        wait_for("haproxy to listen", Duration::from_secs(10), || {
            (std::net::TcpStream::connect(("127.0.0.1", gateway_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", tunnel_port)).is_ok())
            .then_some(())
        });
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn behind_a_load_balancer_speaking_the_proxy_protocol_clients_keep_their_addresses() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with(&["--trusted-proxy", "127.0.0.1"]);
    let s = env.status();
    let (gateway, tunnel) = (
        s["hub"]["gatewayAddress"].as_str().unwrap().to_string(),
        s["hub"]["tunnelAddress"].as_str().unwrap().to_string(),
    );
    let lb = Haproxy::start(env.dir.path(), &gateway, &tunnel);

    // An agent joins through the load balancer (PROXY v1 before its
    // WebSocket), and kubectl reaches the member.
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let mut args = join.clone();
    let i = args.iter().position(|a| a == "--hub").unwrap();
    args[i + 1] = format!("ws://127.0.0.1:{}/tunnel", lb.tunnel_port);
    let o = env.join(&args, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    assert!(env.kubectl(&["get", "ns"]).ok());

    // A guess from 127.0.0.5 through it is logged under 127.0.0.5.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lb_tunnel: std::net::SocketAddr = ([127, 0, 0, 1], lb.tunnel_port).into();
    let guess = rt.block_on(sshflood::login_at(
        lb_tunnel,
        std::net::IpAddr::from([127, 0, 0, 5]),
        &format!("ws://{lb_tunnel}/tunnel"),
        None,
        "alpha",
        "not-the-token",
        Duration::from_secs(20),
    ));
    assert_ne!(guess, sshflood::Login::Accepted);
    // The hub logs the refused login with its client when the connection
    // ends; russh's session task lives on `rt` and is polled only inside
    // `block_on`, so the guess's socket closes when the runtime goes
    // (otherwise only at the hub's 15 s login deadline, past the wait).
    drop(rt);
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    wait_for(
        "the guess in the hub's log",
        Duration::from_secs(10),
        || {
            log()
                .contains("client 127.0.0.5 via 127.0.0.1:")
                .then_some(())
        },
    );

    // A request from 127.0.0.7 through it, TLS passed through (PROXY v2):
    // the audit record names 127.0.0.7, and the member's X-Forwarded-For
    // too.
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "10",
        "--interface",
        "127.0.0.7",
        "--cacert",
    ])
    .arg(env.path("data/towerctl/ca.crt"))
    .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
    .arg(format!(
        "https://127.0.0.1:{}/clusters/alpha/version",
        lb.gateway_port
    ));
    let o = support::run_bounded(curl, Duration::from_secs(20));
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    let r = wait_for(
        "the request's audit record",
        Duration::from_secs(10),
        || {
            let o = env.towerctl(&["audit", "-o", "json"]);
            o.stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| r["path"] == "/version")
        },
    );
    let peer = r["peer"].as_str().unwrap_or("");
    assert!(
        peer.starts_with("127.0.0.7:") && peer.contains(" via 127.0.0.1:"),
        "{r}"
    );
    let last = api
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/version")
        .unwrap();
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("127.0.0.7"),
        "{last:?}"
    );
}

#[test]
fn ssl_cert_file_is_trusted_like_other_tools_on_the_machine() {
    let ing = Ingress::start();
    let ca = ing.pki.ca.to_str().unwrap();
    let (o, _) = ing.join(&ing.wss("localhost"), &[], &[("SSL_CERT_FILE", ca)]);
    assert!(o.ok(), "{o:?}");
    ing.kubectl_reaches_the_member();
}

#[test]
fn insecure_skip_tls_verify_keeps_the_host_key_pin() {
    let ing = Ingress::start();
    // Skipping both checks would authenticate nothing: refused up front.
    let mut args = ing.args(
        &ing.wss("localhost"),
        &["--insecure-skip-tls-verify", "--insecure-skip-hub-key"],
    );
    let i = args.iter().position(|a| a == "--hub-key").unwrap();
    args.drain(i..i + 2);
    let o = ing
        .env
        .towerctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("would leave the hub unauthenticated") && o.stderr.contains("--hub-ca"),
        "{o:?}"
    );

    let (o, _) = ing.join(&ing.wss("localhost"), &["--insecure-skip-tls-verify"], &[]);
    assert!(o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("warning: --insecure-skip-tls-verify")
            && o.stderr
                .contains("pinned SSH host key (--hub-key) still authenticates the hub"),
        "{o:?}"
    );
    ing.kubectl_reaches_the_member();
}

#[test]
fn agents_reach_the_hub_through_a_connect_proxy_over_ws_and_wss() {
    let ing = Ingress::start();
    let proxy = support::ConnectProxy::start();
    let proxy_url = format!("http://{}", proxy.addr);
    let ca = ing.pki.ca.to_str().unwrap();

    // wss:// through the proxy, then nginx, then the hub.
    let (o, _) = ing.join(
        &ing.wss("localhost"),
        &["--hub-ca", ca],
        &[("HTTPS_PROXY", &proxy_url)],
    );
    assert!(o.ok(), "{o:?}");
    assert_eq!(
        proxy.targets.lock().unwrap().clone(),
        vec![format!("localhost:{}", ing.nginx.port)],
        "the agent must CONNECT through the proxy"
    );
    ing.kubectl_reaches_the_member();

    // As systemd runs it (`service install agent`): from its saved
    // settings, in an environment without the proxy variables. It goes
    // through the proxy `join` ran with; it used to dial the hub directly.
    let config = ing.env.path("config/towerctl/agents/alpha.json");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(&proxy_url), "{saved}");
    let pid = ing.env.pid_of("agent-alpha").expect("the agent's pid");
    // SAFETY: signalling the agent this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    support::wait_for("the agent to stop", Duration::from_secs(10), || {
        // SAFETY: probing a pid this test started.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    let mut cmd = ing.env.towerctl_cmd(&[
        "agent",
        "run",
        "alpha",
        "--config",
        config.to_str().unwrap(),
    ]);
    // (`towerctl_cmd` clears the environment: no proxy variables.)
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut run = cmd.spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let mut back = false;
    while !back && Instant::now() < until {
        back = ing.env.kubectl(&["get", "nodes"]).ok();
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = run.kill();
    let _ = run.wait();
    assert!(back, "the agent run from its settings reaches the hub");
    // (The first agent's client for its member API server took the proxy
    // variables of its environment too: those targets are the API server.)
    let targets = proxy.targets.lock().unwrap().clone();
    let hub = format!("localhost:{}", ing.nginx.port);
    assert_eq!(
        targets.iter().filter(|t| **t == hub).count(),
        2,
        "the agent run from its settings must CONNECT to the hub through the saved proxy: \
         {targets:?}"
    );

    // ws:// straight to the hub's listener through the same proxy: plain
    // URLs take HTTP_PROXY, as curl and Go do for http://.
    let beta = ing.env.cluster_add("beta");
    let hub = beta[beta.iter().position(|a| a == "--hub").unwrap() + 1].clone();
    assert!(hub.starts_with("ws://"), "{hub}");
    let mut args: Vec<String> = beta.clone();
    args.extend(["--kubeconfig", ing.member_kc.to_str().unwrap()].map(String::from));
    let mut cmd = ing
        .env
        .towerctl_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.env("HTTP_PROXY", &proxy_url)
        .env("HTTPS_PROXY", &proxy_url);
    let o = support::run_bounded(cmd, Duration::from_secs(60));
    assert!(o.ok(), "{o:?}");
    // (The agent's client for its member API server honours the proxy
    // variables too, so the list may hold that address as well.)
    let targets = proxy.targets.lock().unwrap().clone();
    assert!(
        targets.iter().any(|t| format!("ws://{t}/tunnel") == hub),
        "the ws:// agent must CONNECT through the proxy: {targets:?}"
    );
    assert!(ing.env.towerctl(&["use", "beta"]).ok());
    let o = ing.env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
}

#[test]
fn a_running_agent_logs_a_refused_certificate_once_and_connects_once_it_is_fixed() {
    // nginx first serves a certificate from a CA the agent does not trust.
    let ing = Ingress::start_serving(true);
    let mut args = ing.args(
        &ing.wss("localhost"),
        &[
            "--hub-ca",
            ing.pki.ca.to_str().unwrap(),
            "--backoff-cap",
            "1s",
        ],
    );
    args[0] = "run".into(); // `join alpha …` becomes `agent run alpha …`
    args.insert(0, "agent".into());
    let agent = Streaming::start(
        ing.env
            .towerctl_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.output().matches("retrying in").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no three attempts within 20s: {}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = agent.output();
    assert_eq!(
        out.matches("was refused").count(),
        1,
        "logged once per distinct error: {out}"
    );
    assert!(out.contains("issued by 'CN=Some Other CA"), "{out}");
    // Whoever fixes the file learns that no restart is needed.
    assert!(
        out.contains("read again at the next attempt once it changes"),
        "{out}"
    );

    // The ingress gets a certificate from the trusted CA: the next attempt
    // connects, without restarting the agent.
    ing.serve_trusted();
    agent.wait_for("tunnel up", Duration::from_secs(20));
    ing.kubectl_reaches_the_member();
}

/// The ingress's CA rotated: the operator puts the new CA into the running
/// agent's `--hub-ca` file (as a ConfigMap update does, by renaming a new
/// file into place). The agent reads it again at its next attempt and
/// connects, without a restart; a file caught half written (not PEM) is
/// said and leaves the CA read before in place.
#[test]
fn a_running_agent_reads_its_changed_hub_ca_again() {
    // nginx serves a certificate from "Some Other CA"; the agent's file
    // holds the CA it served before.
    let ing = Ingress::start_serving(true);
    let ca_file = ing.env.path("agent-ca.pem");
    std::fs::copy(&ing.pki.ca, &ca_file).unwrap();
    let mut args = ing.args(
        &ing.wss("localhost"),
        &["--hub-ca", ca_file.to_str().unwrap(), "--backoff-cap", "1s"],
    );
    args[0] = "run".into();
    args.insert(0, "agent".into());
    let agent = Streaming::start(
        ing.env
            .towerctl_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let attempts = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.output().matches("retrying in").count() < n {
            assert!(
                Instant::now() < deadline,
                "no {n} attempts within 20s: {}",
                agent.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    attempts(2);
    assert!(agent.output().contains("was refused"), "{}", agent.output());

    let replace = |text: &[u8]| {
        let tmp = ing.env.path("agent-ca.pem.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &ca_file).unwrap();
    };
    replace(b"half a file");
    attempts(4);
    let out = agent.output();
    assert!(
        out.contains("--hub-ca changed but cannot be used") && !out.contains("tunnel up"),
        "{out}"
    );

    replace(&std::fs::read(ing.env.path("other-ca.pem")).unwrap());
    agent.wait_for("tunnel up", Duration::from_secs(20));
    assert!(
        agent.output().contains("changed: read again"),
        "{}",
        agent.output()
    );
    ing.kubectl_reaches_the_member();
}

#[test]
fn readme_shows_the_nginx_config_the_tests_run() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = SNIPPET
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        readme.contains(&block),
        "README's 'hub behind an ingress' section must show docs/ingress-nginx.conf's server block verbatim:\n{block}"
    );
    assert!(
        SNIPPET.contains("proxy_set_header Upgrade $http_upgrade;")
            && SNIPPET.contains("proxy_read_timeout")
    );
}

/// `--require-proxy-protocol`: behind a layer-4 balancer that passes its
/// clients' bytes on untouched, every connection from the trusted address
/// must start with the balancer's PROXY protocol header; one without (a
/// client's own bytes, in which it could write any header or
/// `X-Forwarded-For`) is refused on both ports, with a log line naming the
/// flag. Through the balancer, agents and kubectl work as before, and
/// connections from other addresses are taken at their word.
#[test]
fn with_a_required_proxy_protocol_a_trusted_address_without_a_header_is_refused() {
    let env = Env::new();
    let api = ApiServer::start();
    let o = env.up_with(&["--trusted-proxy", "127.0.0.1", "--require-proxy-protocol"]);
    assert!(o.ok(), "{o:?}");
    let s = env.status();
    let (gateway, tunnel) = (
        s["hub"]["gatewayAddress"].as_str().unwrap().to_string(),
        s["hub"]["tunnelAddress"].as_str().unwrap().to_string(),
    );
    let lb = Haproxy::start(env.dir.path(), &gateway, &tunnel);
    // Its health checks (`check check-send-proxy`, as README says, every
    // 200 ms: a PROXY header, then a reset) are not failed logins: each
    // was logged as one, and past ten a minute the real failures below
    // went to debug.
    std::thread::sleep(Duration::from_secs(3));
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let mut args = join.clone();
    let i = args.iter().position(|a| a == "--hub").unwrap();
    args[i + 1] = format!("ws://127.0.0.1:{}/tunnel", lb.tunnel_port);
    let o = env.join(&args, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");

    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let get = |from: &str, url: &str| {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "--interface", from, "--cacert"])
            .arg(env.path("data/towerctl/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .arg(url);
        support::run_bounded(curl, Duration::from_secs(20))
    };
    // Through the balancer: served.
    let o = get(
        "127.0.0.1",
        &format!(
            "https://127.0.0.1:{}/clusters/alpha/version",
            lb.gateway_port
        ),
    );
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
    // Straight from the trusted address, no header: refused on both ports.
    let o = get(
        "127.0.0.1",
        &format!("https://{gateway}/clusters/alpha/version"),
    );
    assert!(!o.stdout.contains("gitVersion"), "{o:?}");
    let o = get("127.0.0.1", &format!("http://{tunnel}/healthz"));
    assert!(!o.stdout.contains("ok"), "{o:?}");
    let log = || std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    wait_for(
        "the refusal in the hub's log",
        Duration::from_secs(10),
        || {
            log()
                .contains("without a PROXY protocol header (--require-proxy-protocol)")
                .then_some(())
        },
    );
    assert!(
        !log().contains("reset by peer"),
        "health checks logged as failed logins: {}",
        log()
    );
    // From an address not trusted: taken at its word, as before.
    let o = get("127.0.0.2", &format!("http://{tunnel}/healthz"));
    assert!(o.ok() && o.stdout.trim() == "ok", "{o:?}");
    // The flag means nothing without a trusted proxy: refused.
    let o = Env::new().towerctl(&["up", "--require-proxy-protocol"]);
    assert!(!o.ok() && o.stderr.contains("--trusted-proxy"), "{o:?}");
}

/// A proxy between agent and hub that answers the upgrade with
/// `Connection` listing more than `Upgrade` (as some proxies and servers
/// do; RFC 6455 asks only that it contain the token), then carries the
/// bytes both ways. The agent's WebSocket client refused such an answer
/// ("no Connection: upgrade header") and never connected through it.
#[test]
fn an_upgrade_answered_with_a_listed_connection_header_is_taken() {
    use std::io::{Read, Write};
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let hub_tunnel = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let rewrote = Arc::new(AtomicBool::new(false));
    let seen = rewrote.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().take(20) {
            let Ok(mut client) = client else { return };
            let Ok(mut hub) = std::net::TcpStream::connect(&hub_tunnel) else {
                return;
            };
            let (mut c2, mut h2) = (client.try_clone().unwrap(), hub.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut h2);
                let _ = h2.shutdown(std::net::Shutdown::Write);
            });
            let seen = seen.clone();
            std::thread::spawn(move || {
                // The head, byte by byte, then the rest as it comes.
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && hub.read_exact(&mut b).is_ok() {
                    head.push(b[0]);
                }
                let text: String = String::from_utf8_lossy(&head)
                    .split_inclusive("\r\n")
                    .map(|l| {
                        if l.to_ascii_lowercase().starts_with("connection:") {
                            seen.store(true, Ordering::SeqCst);
                            "Connection: keep-alive\r\nConnection: Upgrade, keep-alive\r\n"
                                .to_string()
                        } else {
                            l.to_string()
                        }
                    })
                    .collect();
                if client.write_all(text.as_bytes()).is_ok() {
                    let _ = std::io::copy(&mut hub, &mut client);
                }
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let mut join = env.cluster_add("alpha");
    let i = join.iter().position(|a| a == "--hub").unwrap();
    join[i + 1] = format!("ws://{proxy}/tunnel");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(
        &join,
        &["--kubeconfig", kc.to_str().unwrap(), "--timeout", "10s"],
    );
    assert!(
        rewrote.load(Ordering::SeqCst),
        "the proxy never rewrote an answer"
    );
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
}

/// An ingress whose idle timeout (nginx's `proxy_read_timeout`, 3 s here)
/// is shorter than the agent's keepalive interval (12 s) ends every
/// session idle that long. The agent says so with the fix (a shorter
/// `--keepalive`); it said "a fixed lifetime" and named GCP's backend
/// timeout.
#[test]
fn an_ingress_idle_timeout_shorter_than_the_keepalive_is_named_with_the_fix() {
    // The hub's own keepalive (1 s in tests) would keep the tunnel busy.
    let ing = Ingress::start_with(false, &["--keepalive", "30s"]);
    let conf = ing.nginx.dir.join("site.conf");
    let site = std::fs::read_to_string(&conf).unwrap();
    assert_eq!(site.matches("proxy_read_timeout 1h;").count(), 1, "{site}");
    std::fs::write(
        &conf,
        site.replace("proxy_read_timeout 1h;", "proxy_read_timeout 5s;"),
    )
    .unwrap();
    ing.nginx.signal("-HUP");
    std::thread::sleep(Duration::from_secs(1));

    let ca = ing.pki.ca.to_str().unwrap();
    let mut args = ing.args(&ing.wss("localhost"), &["--hub-ca", ca]);
    let k = args.iter().position(|a| a == "--keepalive").unwrap();
    args[k + 1] = "12s".into();
    let o = support::run_bounded(
        ing.env
            .towerctl_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        Duration::from_secs(60),
    );
    assert!(o.ok(), "{o:?}");
    let log = ing.env.path("state/towerctl/agent-alpha.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    let said = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("the last three sessions each ended"))
        {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no hint on sessions ending between keepalives within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for want in [
        "shorter than this agent's keepalive interval (12s)",
        "idle for about",
        "--keepalive",
    ] {
        assert!(said.contains(want), "'{want}' missing: {said}");
    }
    assert!(!said.contains("GCP"), "{said}");
}
