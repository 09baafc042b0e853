//! A member network the operator side truly cannot reach: the agent and a
//! web server live in a network namespace of their own (ip netns + veth),
//! the web server only on that namespace's loopback. Only through the
//! tunnel does the operator get its page. Needs root and iproute2 (CI is
//! root; .ci/run installs iproute2); addresses are in namespaces this test
//! creates and removes.

mod support;

use std::process::Command;
use std::time::Duration;

use support::apiserver::{ApiServer, TargetPort};
use support::{run_bounded, wait_for, Env, Streaming};

fn ip(args: &[&str]) {
    let o = run_bounded(
        {
            let mut c = Command::new("ip");
            c.args(args);
            c
        },
        Duration::from_secs(10),
    );
    assert!(
        o.ok(),
        "ip {}: {o:?} (this test needs root and iproute2)",
        args.join(" ")
    );
}

/// A namespace with a veth to the host: host side .1, member side .2.
struct Netns {
    name: String,
    host_if: String,
    member_if: String,
}

impl Netns {
    fn create(subnet: u8) -> Netns {
        let id = format!("{}{}", std::process::id() % 10000, subnet);
        let name = format!("tw{id}");
        let host_if = format!("vh{id}");
        let member_if = format!("vm{id}");
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            member_if: member_if.clone(),
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &member_if,
        ]);
        ip(&["link", "set", &member_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{subnet}.1/24"),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.213.{subnet}.2/24"),
            "dev",
            &member_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &member_if, "up"]);
        ns
    }

    /// Sets the root qdisc of the member's side of the veth (what the
    /// member sends): `tc qdisc add dev IF root ARGS…`.
    fn qdisc(&self, args: &[&str]) {
        // By its path: the namespace's command runs with a cleared
        // environment (no PATH with sbin in it).
        let tc = ["/usr/sbin/tc", "/sbin/tc"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("tc (iproute2) is needed; .ci/run installs it");
        let mut c = Command::new(tc);
        c.args(["qdisc", "add", "dev", &self.member_if, "root"])
            .args(args);
        let o = run_bounded(self.wrap(c), Duration::from_secs(10));
        assert!(
            o.ok(),
            "tc (iproute2) and sch_{} are needed: {o:?} {}",
            args[0],
            o.stderr
        );
    }

    /// `cmd` run inside the namespace.
    fn wrap(&self, cmd: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c.env_clear();
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Member `alpha` inside `ns`: a web server on the namespace's own
/// loopback serving `www` (Service `default/web`), the member's API server
/// (the stand-in) on the host side where the agent reaches it, a hub on the
/// host side, and the agent joined from inside the namespace. Returns the
/// web server and API server (kept up by the caller) and the web port.
fn member_in(
    ns: &Netns,
    subnet: u8,
    env: &Env,
    www: &std::path::Path,
) -> (Streaming, ApiServer, u16) {
    let host_ip = format!("10.213.{subnet}.1");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut py = Command::new("python3");
    py.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
        www.to_str().unwrap(),
    ]);
    let web = Streaming::start(ns.wrap(py));
    let api = ApiServer::start_on(host_ip.parse().unwrap());
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Name("http"))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", port)]);
    env.up_on(&format!("{host_ip}:0"), "127.0.0.1:0");
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let mut args: Vec<&str> = join.iter().map(String::as_str).collect();
    args.extend([
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--allow",
        "127.0.0.0/8",
    ]);
    let o = run_bounded(ns.wrap(env.towerctl_cmd(&args)), Duration::from_secs(60));
    assert!(o.ok(), "join inside the namespace: {o:?}");
    (web, api, port)
}

#[test]
fn only_the_agent_can_reach_the_member_service_and_port_forward_brings_it_here() {
    // Apart from the other tests' subnets: all may run at once.
    let subnet = (std::process::id() % 200) as u8 + 20;
    let ns = Netns::create(subnet);
    let env = Env::new();

    // The member's web server, on the namespace's own loopback.
    let www = env.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(
        www.join("index.html"),
        "page from inside the member network\n",
    )
    .unwrap();
    let (_web, _api, port) = member_in(&ns, subnet, &env, &www);

    // Wait until the web server answers inside the namespace…
    wait_for("the member web server", Duration::from_secs(20), || {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/"),
        ]);
        run_bounded(ns.wrap(c), Duration::from_secs(5))
            .ok()
            .then_some(())
    });
    // …and not from here.
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "2",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let o = run_bounded(c, Duration::from_secs(5));
    assert!(
        !o.stdout.contains("inside the member"),
        "the operator side must not reach it directly: {o:?}"
    );

    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let local = support::forwarded_port(&pf);
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{local}/"),
    ]);
    let o = run_bounded(c, Duration::from_secs(20));
    assert!(
        o.stdout.contains("page from inside the member network"),
        "{o:?} {}",
        pf.output()
    );
    drop(pf);
    // The agent runs in the namespace: stop it before the namespace goes.
    let _ = env.towerctl(&["leave", "alpha"]);
}

/// A member on a slow link (20 Mbit/s from the member, a token bucket on
/// its side of the veth): one download through the tunnel must not hold
/// every other request of the member behind it. Everything shares the one
/// tunnel connection; what the agent queued for it (its SSH output, the
/// socket's unsent bytes) is a queue each other answer waits behind.
/// Before the bounds on both (`NOTSENT_LOWAT`, russh's output high water)
/// a `kubectl get --raw /version` took 2.2 s here during the download
/// (0.1 s idle; 2.3–2.7 s measured with CUBIC), after them ~0.9 s.
#[test]
fn one_download_on_a_slow_member_link_does_not_hold_up_kubectl() {
    // Apart from the other tests' subnets: all may run at once.
    let subnet = (std::process::id() % 30) as u8 + 220;
    let ns = Netns::create(subnet);
    ns.qdisc(&[
        "tbf", "rate", "20mbit", "burst", "32kbit", "latency", "400ms",
    ]);
    let env = Env::new();
    // 48 MB to download: ~20 s at the link's rate.
    let www = env.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("big"), vec![7u8; 48 << 20]).unwrap();
    let (_web, _api, _) = member_in(&ns, subnet, &env, &www);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let timed = || {
        let t = std::time::Instant::now();
        let o = env.kubectl(&["get", "--raw", "/version", "--request-timeout=30s"]);
        assert!(o.ok(), "{o:?}");
        t.elapsed()
    };
    let idle = timed();

    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let local = support::forwarded_port(&pf);
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "--max-time",
        "60",
        &format!("http://127.0.0.1:{local}/big"),
    ]);
    let download = std::thread::spawn(move || run_bounded(c, Duration::from_secs(70)));
    std::thread::sleep(Duration::from_secs(4));
    let mut busy: Vec<Duration> = (0..3).map(|_| timed()).collect();
    busy.sort();
    let o = download.join().unwrap();
    assert!(
        o.ok() && o.stdout.trim() == (48u64 << 20).to_string(),
        "the download: {o:?}"
    );
    eprintln!("kubectl idle {idle:?}, during the download {busy:?}");
    assert!(
        busy[1] < Duration::from_millis(1600),
        "kubectl during one download took {busy:?} (idle {idle:?})"
    );
    drop(pf);
    let _ = env.towerctl(&["leave", "alpha"]);
}
