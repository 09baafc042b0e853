//! The agent as its pod runs it: `towerctl agent run NAME` with the args
//! and environment of the Deployment that `join --print-manifest` prints,
//! in-cluster credentials (`KUBERNETES_SERVICE_HOST`/`_PORT`, a service
//! account directory with a token and the CA of a TLS API server), probes
//! on `--probe-addr`, and SIGTERM ending the session with a reason the hub
//! records.

mod support;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::apiserver::{ApiServer, TOKEN};
use support::tls_front::TlsFront;
use support::{free_port, wait_for, Env};

/// Status code of `GET path` on `addr`, or `None` when nothing answers.
fn probe(addr: &str, path: &str) -> Option<u16> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

fn wait_probe(addr: &str, path: &str, want: u16, timeout: Duration) {
    wait_for(
        &format!("{path} on {addr} to answer {want}"),
        timeout,
        || (probe(addr, path) == Some(want)).then_some(()),
    );
}

/// Kills the process (an agent, the hub's namespace) if the test ends early.
struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A memory cgroup under this process's own with a limit, as a container
/// runtime makes for a pod's `resources.limits.memory`; removed on drop
/// (once the processes in it are gone).
struct MemCgroup(std::path::PathBuf);

impl MemCgroup {
    /// Why not, where this machine lets no cgroup be made.
    fn new(limit: u64) -> Result<MemCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mut tried = Vec::new();
        for line in own.lines() {
            let mut p = line.splitn(3, ':');
            let (Some(_), Some(c), Some(path)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let (base, file) = if c.is_empty() {
                ("/sys/fs/cgroup", "memory.max")
            } else if c.split(',').any(|x| x == "memory") {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            } else {
                continue;
            };
            let dir = std::path::Path::new(base)
                .join(path.trim_start_matches('/'))
                .join(format!("towerctl-test-{}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => match std::fs::write(dir.join(file), limit.to_string()) {
                    Ok(()) => return Ok(MemCgroup(dir)),
                    Err(e) => {
                        tried.push(format!("{}: {e}", dir.join(file).display()));
                        let _ = std::fs::remove_dir(&dir);
                    }
                },
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
        Err(tried.join("; "))
    }

    /// `program` started inside this cgroup (moved in before it runs).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args([
            "-c",
            "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
            "sh",
        ])
        .arg(&self.0)
        .arg(program);
        c
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The memory limit (MiB) a daemon's log says it found in its cgroup.
fn logged_limit_mib(log: &str) -> u64 {
    log.split("memory limit ")
        .nth(1)
        .and_then(|r| r.split(" MiB (cgroup)").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory limit logged: {log}"))
}

/// Bytes of a Kubernetes quantity in Mi or Gi.
fn quantity(q: &str) -> u64 {
    match q.split_at(q.len() - 2) {
        (n, "Mi") => n.parse::<u64>().unwrap() << 20,
        (n, "Gi") => n.parse::<u64>().unwrap() << 30,
        _ => panic!("quantity {q}"),
    }
}

#[test]
fn pod_agent_with_in_cluster_credentials_serves_kubectl_probes_and_stops_cleanly() {
    let api = ApiServer::start();
    let front = TlsFront::start(api.addr);
    let env = Env::new();
    let tunnel = format!("127.0.0.1:{}", free_port());
    env.up_on(&tunnel, "127.0.0.1:0");
    let join = env.cluster_add("alpha");

    // The manifest the operator would apply, with a probe port of its
    // own (any address, as in a pod: probed here over loopback, both
    // families).
    let probe_port = free_port();
    let probe_any = format!("0.0.0.0:{probe_port}");
    let probe_addr = format!("127.0.0.1:{probe_port}");
    let mut args: Vec<&str> = join.iter().map(String::as_str).collect();
    args.extend([
        "--keepalive",
        "1s",
        "--backoff-cap",
        "1s",
        "--probe-addr",
        &probe_any,
        "--print-manifest",
    ]);
    let o = env.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    let docs: Vec<serde_json::Value> = o
        .stdout
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let secret = docs.iter().find(|d| d["kind"] == "Secret").unwrap();
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];

    // The pod's files: the agent key from the Secret, the service account
    // as the kubelet mounts it, and the emptyDir behind the XDG variables.
    let key = env.path("pod-secret/agent.key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::write(&key, secret["stringData"]["agent.key"].as_str().unwrap()).unwrap();
    let sa = env.path("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), TOKEN).unwrap();
    std::fs::write(sa.join("ca.crt"), &front.ca_pem).unwrap();
    std::fs::write(sa.join("namespace"), "towerctl-system").unwrap();
    let scratch = env.path("pod-scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    let pod_args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/towerctl/agent.key", key.to_str().unwrap())
        })
        .collect();
    assert_eq!(&pod_args[..3], ["agent", "run", "alpha"], "{pod_args:?}");
    // In a memory cgroup of the manifest's limit, where one can be made.
    let limit = quantity(container["resources"]["limits"]["memory"].as_str().unwrap());
    let cgroup = MemCgroup::new(limit)
        .map_err(|e| eprintln!("not in a memory cgroup (none can be made here: {e})"))
        .ok();
    let mut cmd = match &cgroup {
        Some(cg) => cg.command(support::TOWERCTL),
        None => Command::new(support::TOWERCTL),
    };
    // What `kubectl exec` into the pod would have: its env.
    let mut pod_env: Vec<(String, String)> = vec![
        ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
    ];
    cmd.env_clear()
        .args(&pod_args)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", front.addr.port().to_string())
        .env("TOWERCTL_SERVICEACCOUNT_DIR", &sa)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "TOWERCTL_TOKEN" {
            cmd.env(name, secret["stringData"]["token"].as_str().unwrap());
        } else if name == "TOWERCTL_HOST_IPS" {
            // The kubelet's downward API: the node's address.
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
            cmd.env(name, "127.0.0.1");
        } else {
            let v = e["value"].as_str().unwrap();
            let rel = v.strip_prefix("/tmp").expect("XDG dirs under the emptyDir");
            cmd.env(name, format!("{}{rel}", scratch.display()));
            pod_env.push((name.to_string(), format!("{}{rel}", scratch.display())));
        }
    }

    // Hub down first: alive, not ready.
    assert!(env.towerctl(&["down"]).ok());
    let mut agent = KillOnDrop(cmd.spawn().unwrap());
    wait_probe(&probe_addr, "/healthz", 200, Duration::from_secs(15));
    assert_eq!(probe(&probe_addr, "/readyz"), Some(503));

    // Hub up: the tunnel comes up, ready, and kubectl reaches the TLS API
    // server with the service account's token.
    env.up_on(&tunnel, "127.0.0.1:0");
    wait_probe(&probe_addr, "/readyz", 200, Duration::from_secs(20));
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    // `towerctl status` in the pod (`kubectl exec`) finds the agent,
    // which `join` saved no settings for: it showed nothing.
    let mut status = Command::new(support::TOWERCTL);
    status
        .env_clear()
        .envs(pod_env.iter().map(|(k, v)| (k, v)))
        .args(["status", "-o", "json"]);
    let o = support::run_bounded(status, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["agents"][0]["name"], "alpha", "{v}");
    assert_eq!(v["agents"][0]["state"], "connected", "{v}");
    let reqs = api.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{r:?}"
        );
    }

    // Hub stops: not ready again, still alive.
    assert!(env.towerctl(&["down"]).ok());
    wait_probe(&probe_addr, "/readyz", 503, Duration::from_secs(15));
    assert_eq!(probe(&probe_addr, "/healthz"), Some(200));
    assert_eq!(probe(&probe_addr, "/nothing"), Some(404));

    // Back up, then SIGTERM: the agent exits 0 and the hub records why.
    env.up_on(&tunnel, "127.0.0.1:0");
    wait_probe(&probe_addr, "/readyz", 200, Duration::from_secs(20));
    let started = Instant::now();
    // SAFETY: signalling a child this test started, by pid.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = wait_for(
        "the agent to exit after SIGTERM",
        Duration::from_secs(10),
        || agent.0.try_wait().unwrap(),
    );
    let mut stderr = String::new();
    let _ = agent.0.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(status.success(), "{status:?}\n{stderr}");
    eprintln!("the agent exited {:?} after SIGTERM", started.elapsed());
    // Its buffering held to half the pod's memory limit, and said so (a
    // tighter limit above this test's own cgroup would win).
    if cgroup.is_some() {
        assert_eq!(limit, 256 << 20);
        let seen = logged_limit_mib(&stderr);
        assert!(seen <= 256, "{stderr}");
        if seen == 256 {
            assert!(
                stderr.contains(
                    "memory limit 256 MiB (cgroup): streams' windows are held to 64 MiB in \
                     all, request bodies being received to 32 MiB, port-forward and CONNECT \
                     streams to 1024 at once"
                ),
                "{stderr}"
            );
        }
    }
    let s = wait_for(
        "the hub to record the disconnect",
        Duration::from_secs(10),
        || {
            let s = env.status();
            (s["hub"]["clusters"][0]["state"] == "disconnected").then_some(s)
        },
    );
    let events: Vec<&str> = s["hub"]["clusters"][0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        events.last().copied(),
        Some("disconnected: agent stopped"),
        "{events:?}"
    );
    assert!(!stderr.contains(TOKEN), "the token leaked into the log");
}

#[test]
fn in_cluster_without_a_service_account_names_the_fix() {
    let env = Env::new();
    let mut cmd = env.towerctl_cmd(&[
        "agent",
        "run",
        "alpha",
        "--hub",
        "ws://127.0.0.1:9/tunnel",
        "--insecure-skip-hub-key",
        "--token",
        "tj_x",
    ]);
    cmd.env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "6443")
        .env("TOWERCTL_SERVICEACCOUNT_DIR", env.path("missing"));
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("no service-account token") && o.stderr.contains("--kubeconfig"),
        "{o:?}"
    );
}

/// In a pod whose `~/.kube/config` names the member (a CI runner, a dev
/// container), the agent fronts that member, as kubectl would reach it,
/// not the pod's own cluster with the pod's service account.
#[test]
fn a_kubeconfig_in_home_wins_over_the_pods_own_cluster() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let home_kc = env.path("home/.kube/config");
    std::fs::create_dir_all(home_kc.parent().unwrap()).unwrap();
    api.write_kubeconfig(&home_kc);
    let o = env.join_with_env(
        &join,
        &["--allow", "127.0.0.0/8"],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "9"),
        ],
    );
    assert!(o.ok(), "{o:?}");
    assert!(
        o.stdout.contains(&format!("upstream: http://{}", api.addr)),
        "{o:?}"
    );
}

/// A hub under a memory limit (a pod's) holds the windows of all its
/// members together to a quarter of it, and says so; per member alone
/// (128 MiB each), a few members with stalled readers passed the limit.
#[test]
fn a_hub_in_a_memory_cgroup_holds_its_members_windows_together() {
    let Ok(cgroup) = MemCgroup::new(512 << 20)
        .map_err(|e| eprintln!("not in a memory cgroup (none can be made here: {e})"))
    else {
        return;
    };
    let env = Env::new();
    let mut cmd = cgroup.command(support::TOWERCTL);
    env.apply_env(&mut cmd);
    cmd.args([
        "up",
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        "127.0.0.1:0",
        "--metrics",
        "off",
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(60));
    assert!(o.ok(), "{o:?}");
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    let down = env.towerctl(&["down"]);
    assert!(down.ok(), "{down:?}");
    let seen = logged_limit_mib(&log);
    assert!(seen <= 512, "{log}");
    if seen == 512 {
        assert!(
            log.contains("streams' full windows are held to 128 MiB in all members together"),
            "{log}"
        );
    }
}

/// Host PIDs of the processes whose parent is `parent`, with their state
/// letter (`Z` for a zombie) and command name.
fn children_of(parent: u32) -> Vec<(u32, char, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == parent {
            out.push((pid, state, comm));
        }
    }
    out
}

/// The hub's pod runs `towerctl hub run` as PID 1: a process orphaned into
/// it (a shell's `&` under `kubectl exec`) is its child once its parent
/// leaves, and must not stay a zombie when it ends. A PID namespace of the
/// test's own stands for the pod's.
#[test]
fn a_hub_as_pid_1_takes_the_exit_of_orphans() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a PID namespace needs root here");
        return;
    }
    let env = Env::new();
    let log = env.path("hub.stderr");
    let mut cmd = Command::new("unshare");
    env.apply_env(&mut cmd);
    cmd.args(["--pid", "--fork", "--kill-child", support::TOWERCTL])
        .args(env.hub_run_cmd().get_args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut unshare = KillOnDrop(cmd.spawn().expect("unshare (util-linux) is needed"));
    let outer = unshare.0.id();
    let hub = wait_for("the hub as PID 1", Duration::from_secs(20), || {
        children_of(outer).first().map(|c| c.0)
    });
    wait_for("the hub ready", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("hub ready")
            .then_some(())
    });
    // `sh` leaves its `sleep` behind; the sleep becomes the hub's child.
    let o = support::run_bounded(
        {
            let mut c = Command::new("nsenter");
            c.args([
                "-t",
                &hub.to_string(),
                "-p",
                "--",
                "sh",
                "-c",
                "sleep 60 </dev/null >/dev/null 2>&1 & exit 0",
            ]);
            c
        },
        Duration::from_secs(10),
    );
    assert!(o.ok(), "{o:?}");
    let orphan = wait_for("the orphan under the hub", Duration::from_secs(5), || {
        children_of(hub)
            .into_iter()
            .find(|c| c.2 == "sleep")
            .map(|c| c.0)
    });
    // It ends (as a test's kill); its exit is the hub's to take.
    unsafe { libc::kill(orphan as i32, libc::SIGKILL) };
    wait_for("the orphan's exit taken", Duration::from_secs(15), || {
        (!children_of(hub).iter().any(|c| c.0 == orphan)).then_some(())
    });
    // The hub is still there, and stops on SIGTERM as a pod's PID 1 does.
    assert!(children_of(outer).iter().any(|c| c.0 == hub));
    unsafe { libc::kill(hub as i32, libc::SIGTERM) };
    let status = wait_for("the hub stopped", Duration::from_secs(20), || {
        unshare.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
}
