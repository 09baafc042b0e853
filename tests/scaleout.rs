//! Several active hubs on one real etcd (Debian's `etcd-server`, which CI
//! installs): a shared registry, single-use tokens across hubs, the same CA
//! and host key everywhere, any hub reaching any member, a killed hub's
//! agents back through the others, revocation across hubs, and an etcd
//! outage that established tunnels survive.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::{free_port, wait_for, Env};

/// An etcd on loopback ephemeral ports with a temporary data dir, stopped
/// by PID on drop.
struct Etcd {
    child: Child,
    url: String,
    client: String,
    dir: tempfile::TempDir,
}

/// One POST to etcd's JSON gateway; `None` when it does not answer.
fn etcd_post(client: &str, path: &str, body: &str) -> Option<String> {
    etcd_post_as(client, path, body, None)
}

/// [`etcd_post`] with an etcd token (of `/v3/auth/authenticate`); `None`
/// unless etcd answers 200.
fn etcd_post_as(client: &str, path: &str, body: &str, token: Option<&str>) -> Option<String> {
    let mut s = TcpStream::connect(client).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    write!(s, "POST {path} HTTP/1.1\r\nHost: {client}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}", body.len()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// Base64, as etcd's JSON gateway takes keys and values.
fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The JSON value at `key` in `etcd`, if there is one.
fn etcd_json(etcd: &Etcd, key: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let body = format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes()));
    let answer = etcd_post(&etcd.client, "/v3/kv/range", &body)?;
    let (_, json) = answer.split_once("\r\n\r\n")?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let value = base64::engine::general_purpose::STANDARD
        .decode(v["kvs"][0]["value"].as_str()?)
        .ok()?;
    serde_json::from_slice(&value).ok()
}

/// Writes `value` at `key` in `etcd` (no lease).
fn etcd_put_json(etcd: &Etcd, key: &str, value: &serde_json::Value) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64(key.as_bytes()),
        b64(value.to_string().as_bytes())
    );
    assert!(etcd_post(&etcd.client, "/v3/kv/put", &body).is_some());
}

/// Every key under `prefix` in `etcd`, with its value read as JSON.
fn etcd_under(etcd: &Etcd, prefix: &str) -> Vec<(String, serde_json::Value)> {
    use base64::Engine;
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(prefix.as_bytes()),
        b64(&end)
    );
    let answer = etcd_post(&etcd.client, "/v3/kv/range", &body).expect("etcd answers");
    let (_, json) = answer.split_once("\r\n\r\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let d = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap_or_default())
            .unwrap_or_default()
    };
    v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = String::from_utf8(d(&kv["key"])).unwrap();
                    (
                        key,
                        serde_json::from_slice(&d(&kv["value"])).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `key` from `etcd`.
fn etcd_delete(etcd: &Etcd, key: &str) {
    let body = format!(r#"{{"key":"{}"}}"#, b64(key.as_bytes()));
    assert!(etcd_post(&etcd.client, "/v3/kv/deleterange", &body).is_some());
}

/// Certificates for an etcd that serves TLS and requires client
/// certificates: a CA, etcd's serving pair (127.0.0.1), a client pair, and
/// a client pair from another CA.
struct EtcdPki {
    dir: tempfile::TempDir,
}

impl EtcdPki {
    fn new() -> EtcdPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.self_signed(&key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            Issuer::new(p, key)
        };
        let leaf = |issuer: &Issuer<KeyPair>, name: &str, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        };
        let good = ca("ca");
        leaf(
            &good,
            "server",
            vec!["127.0.0.1".into(), "localhost".into()],
        );
        leaf(&good, "client", vec!["towerctl-hub".into()]);
        // The client pair's own, past its end.
        {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["towerctl-hub".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, "expired");
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            let cert = p.signed_by(&key, &good).unwrap();
            write("expired.pem", cert.pem());
            write("expired-key.pem", key.serialize_pem());
        }
        let other = ca("other-ca");
        leaf(&other, "stranger", vec!["towerctl-hub".into()]);
        EtcdPki { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// With `pki`: TLS only, and a client certificate from its CA required.
    /// Its ports are picked free just before it starts, so another test's
    /// process can take one first: an etcd that exits while starting is
    /// started again on other ports (three tries), and one that never
    /// answers fails the test with the end of etcd's own log.
    fn start_with(pki: Option<&EtcdPki>) -> Etcd {
        for attempt in 1..=3 {
            let mut e = Etcd::spawn(pki);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if e.answers(pki) {
                    return e;
                }
                if let Ok(Some(status)) = e.child.try_wait() {
                    let log = e.log_tail();
                    assert!(
                        attempt < 3,
                        "etcd exited while starting ({status}), three times; its log ends:\n{log}"
                    );
                    eprintln!("etcd exited while starting ({status}); trying other ports. Its log ends:\n{log}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd did not answer within 30 s; its log ends:\n{}",
                    e.log_tail()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("the third attempt returns or fails")
    }

    fn spawn(pki: Option<&EtcdPki>) -> Etcd {
        let (cp, pp) = (free_port(), free_port());
        Etcd::spawn_member("t", cp, pp, &format!("t=http://127.0.0.1:{pp}"), pki)
    }

    /// Member `name` of the cluster `initial` (etcd's `--initial-cluster`),
    /// serving clients on `cp` and peers on `pp`.
    fn spawn_member(name: &str, cp: u16, pp: u16, initial: &str, pki: Option<&EtcdPki>) -> Etcd {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("etcd is not installed: these tests need a real etcd (Debian package 'etcd-server', which .ci/run installs)");
        let dir = tempfile::tempdir().unwrap();
        let client = format!("127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let scheme = if pki.is_some() { "https" } else { "http" };
        let mut cmd = Command::new(bin);
        if let Some(pki) = pki {
            cmd.args([
                "--cert-file",
                &pki.file("server.pem"),
                "--key-file",
                &pki.file("server-key.pem"),
                "--client-cert-auth",
                "--trusted-ca-file",
                &pki.file("ca.pem"),
            ]);
        }
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = cmd
            .args([
                "--name",
                name,
                "--data-dir",
                dir.path().join("d").to_str().unwrap(),
                "--listen-client-urls",
                &format!("{scheme}://{client}"),
                "--advertise-client-urls",
                &format!("{scheme}://{client}"),
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                initial,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start etcd");
        Etcd {
            child,
            url: match pki {
                Some(_) => format!("https://{client}"),
                None => format!("etcd://{client}"),
            },
            client,
            dir,
        }
    }

    /// One read of the key space answered.
    fn answers(&self, pki: Option<&EtcdPki>) -> bool {
        match pki {
            None => etcd_post(&self.client, "/v3/kv/range", r#"{"key":"AA=="}"#).is_some(),
            Some(pki) => {
                let mut c = Command::new("curl");
                c.args([
                    "-sf",
                    "--cacert",
                    &pki.file("ca.pem"),
                    "--cert",
                    &pki.file("client.pem"),
                    "--key",
                    &pki.file("client-key.pem"),
                    "-XPOST",
                    "--data",
                    r#"{"key":"AA=="}"#,
                    &format!("https://{}/v3/kv/range", self.client),
                ]);
                support::run_bounded(c, Duration::from_secs(5)).ok()
            }
        }
    }

    /// The last lines etcd wrote (it logs to stderr).
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} etcd");
    }
}

/// Three etcd members forming one cluster on loopback: a hub given one
/// member's address can be left with a member that has lost its quorum
/// (stop the other two) while that member still answers.
fn etcd_cluster() -> [Etcd; 3] {
    // Ports are picked free just before etcd starts: another process may
    // take one first, so the whole cluster is started again (three tries).
    for attempt in 1..=3 {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, pp))| format!("m{i}=http://127.0.0.1:{pp}"))
            .collect();
        let members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(cp, pp))| {
                Etcd::spawn_member(&format!("m{i}"), cp, pp, &initial.join(","), None)
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut members = members;
        loop {
            // A linearizable read on every member: a leader is elected.
            if members.iter().all(|m| m.answers(None)) {
                return members.try_into().unwrap_or_else(|_| unreachable!());
            }
            if let Some(i) = (0..3).find(|&i| matches!(members[i].child.try_wait(), Ok(Some(_)))) {
                let log = members[i].log_tail();
                assert!(
                    attempt < 3,
                    "an etcd member exited while starting, three times; its log ends:\n{log}"
                );
                eprintln!("an etcd member exited while starting; trying other ports. Its log ends:\n{log}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster did not answer within 30 s; a member's log ends:\n{}",
                members[0].log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    unreachable!("the third attempt returns or fails")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `towerctl up` on the registry at `store`, with `extra` flags.
fn up_on_store(env: &Env, store: &str, extra: &[&str]) -> support::Out {
    up_on_store_at(env, store, "127.0.0.1:0", extra)
}

/// [`up_on_store`] with the tunnel listening on `listen`.
fn up_on_store_at(env: &Env, store: &str, listen: &str, extra: &[&str]) -> support::Out {
    support::run_bounded(up_cmd(env, store, listen, extra), Duration::from_secs(60))
}

/// The `towerctl up` of [`up_on_store_at`], to run.
fn up_cmd(env: &Env, store: &str, listen: &str, extra: &[&str]) -> Command {
    let mut args = vec![
        "up",
        "--listen",
        listen,
        "--gateway",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--store",
        store,
    ];
    if !extra.iter().any(|a| a.starts_with("--keepalive")) {
        args.extend(["--keepalive", "1s"]);
    }
    args.extend_from_slice(extra);
    env.towerctl_cmd(&args)
}

fn hub_up(env: &Env, etcd: &Etcd) {
    let o = up_on_store(env, &etcd.url, &[]);
    assert!(o.ok(), "towerctl up --store failed: {o:?}");
}

/// N hubs sharing `etcd`.
fn hubs_on<const N: usize>(etcd: &Etcd) -> [Env; N] {
    let hubs: [Env; N] = std::array::from_fn(|_| Env::new());
    for h in &hubs {
        hub_up(h, etcd);
    }
    hubs
}

/// `n` commands at once, command `i` (its arguments `args(i)`) on hub
/// `i % hubs.len()`; their outputs in order.
fn at_once(
    hubs: &[Env],
    n: usize,
    args: impl Fn(usize) -> Vec<String> + Sync,
) -> Vec<support::Out> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let (h, args) = (&hubs[i % hubs.len()], &args);
                s.spawn(move || {
                    let a = args(i);
                    h.towerctl(&a.iter().map(String::as_str).collect::<Vec<_>>())
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// `operator add` of one name on three hubs at once (twice each) gives one
/// operator: one command succeeds, the others say the name exists (over
/// etcd, each hub checked the name and wrote its own token: up to six
/// working tokens of one name, with different groups).
#[test]
fn one_operator_name_added_on_every_hub_at_once_is_added_once() {
    let etcd = Etcd::start();
    let hubs: [Env; 3] = hubs_on(&etcd);
    for round in 0..3 {
        let name = format!("op{round}");
        let outs = at_once(&hubs, 6, |i| {
            ["operator", "add", &name, "--group", &format!("g{i}")]
                .map(String::from)
                .to_vec()
        });
        let won = outs.iter().filter(|o| o.ok()).count();
        assert_eq!(won, 1, "round {round}: {outs:?}");
        for o in outs.iter().filter(|o| !o.ok()) {
            assert!(o.stderr.contains("already exists"), "{o:?}");
        }
        let o = hubs[0].towerctl(&["operator", "list", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let rows = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["name"] == name.as_str())
            .count();
        assert_eq!(rows, 1, "{list}");
    }
    // Different names at once are each added (a check on every operator
    // key failed a third of them).
    let outs = at_once(&hubs, 24, |i| {
        ["operator", "add", &format!("d{i}")]
            .map(String::from)
            .to_vec()
    });
    let failed: Vec<_> = outs.iter().filter(|o| !o.ok()).collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// The same `access allow` on three hubs at once (twice each) adds one
/// rule: one command says "added", the others that it exists already (each
/// said "added" of one rule id, and one `access rm` undid them all).
/// Different rules at once are each added.
#[test]
fn one_rule_allowed_on_every_hub_at_once_is_added_once() {
    let etcd = Etcd::start();
    let hubs: [Env; 3] = hubs_on(&etcd);
    for round in 0..3 {
        let subject = format!("operator:s{round}");
        let outs = at_once(&hubs, 6, |_| {
            ["access", "allow", &subject, "--names", "alpha"]
                .map(String::from)
                .to_vec()
        });
        assert!(outs.iter().all(|o| o.ok()), "{outs:?}");
        let added = outs
            .iter()
            .filter(|o| o.stdout.starts_with("added"))
            .count();
        assert_eq!(added, 1, "round {round}: {outs:?}");
        assert!(
            outs.iter()
                .filter(|o| !o.stdout.starts_with("added"))
                .all(|o| o.stdout.starts_with("exists already:")),
            "{outs:?}"
        );
        let o = hubs[1].towerctl(&["access", "list", "-o", "json"]);
        let rules: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let n = rules
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["subject"].to_string().contains(&format!("s{round}")))
            .count();
        assert_eq!(n, 1, "{rules}");
    }
    // Different rules at once: every one added, under ids of their own.
    let outs = at_once(&hubs, 6, |i| {
        [
            "access",
            "allow",
            &format!("operator:d{i}"),
            "--names",
            "alpha",
        ]
        .map(String::from)
        .to_vec()
    });
    assert!(
        outs.iter().all(|o| o.ok() && o.stdout.starts_with("added")),
        "{outs:?}"
    );
    let ids: std::collections::BTreeSet<&str> = outs
        .iter()
        .filter_map(|o| o.stdout.split_whitespace().nth(1))
        .collect();
    assert_eq!(ids.len(), 6, "{outs:?}");
}

/// Each hub's registry watch stayed open all along (etcd up): a read
/// deadline on it would break it and reload the whole registry every few
/// seconds.
fn assert_watch_never_broke(hubs: &[Env]) {
    for h in hubs {
        let log = std::fs::read_to_string(h.path("state/towerctl/hub.log")).unwrap_or_default();
        assert!(
            !log.contains("registry watch broke"),
            "the etcd watch broke with etcd up: {log}"
        );
    }
}

/// `cluster add` on `hub`, then the printed command run in `member`.
fn join(hub: &Env, member: &Env, name: &str, api: &ApiServer) -> Vec<String> {
    join_with(hub, member, name, api, &[])
}

/// [`join`] with more flags for the agent.
fn join_with(hub: &Env, member: &Env, name: &str, api: &ApiServer, extra: &[&str]) -> Vec<String> {
    let join = hub.cluster_add(name);
    let kc = member.path(&format!("{name}.kubeconfig"));
    api.write_kubeconfig(&kc);
    let mut flags = vec!["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"];
    flags.extend_from_slice(extra);
    let o = member.join(&join, &flags);
    assert!(
        o.ok() && o.stdout.contains("the tunnel is up"),
        "join {name}: {o:?}"
    );
    join
}

fn member<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["hub"]["clusters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Member `alpha` joined to hub `a` (its stand-in API server and machine
/// returned, to keep them up), then reached with kubectl through each hub.
fn alpha_on_a_reached_through_both(a: &Env, b: &Env) -> (ApiServer, Env) {
    let api = ApiServer::start();
    let member = Env::new();
    join(a, &member, "alpha", &api);
    for hub in [a, b] {
        assert!(hub.towerctl(&["use", "alpha"]).ok());
        wait_for(
            "alpha reached through each hub",
            Duration::from_secs(20),
            || reaches(hub, "alpha").then_some(()),
        );
    }
    (api, member)
}

/// `operator add NAME` on `hub`: the operator's token, from the printed
/// login command.
fn operator_token(hub: &Env, name: &str) -> String {
    let o = hub.towerctl(&["operator", "add", name]);
    assert!(o.ok(), "{o:?}");
    support::printed_command(&o.stdout, "login")[3]
        .trim_start_matches("TOWERCTL_OPERATOR_TOKEN=")
        .to_string()
}

fn reaches(env: &Env, name: &str) -> bool {
    let o = env.kubectl(&["--context", &format!("tower-{name}"), "get", "nodes"]);
    o.ok() && o.stdout.contains("fake-node-1")
}

#[test]
fn three_hubs_share_members_tokens_keys_and_reach_every_member() {
    let etcd = Etcd::start();
    let hubs: [Env; 3] = hubs_on(&etcd);
    let st: Vec<serde_json::Value> = hubs.iter().map(|h| h.status()).collect();
    for s in &st[1..] {
        assert_eq!(
            s["hub"]["hubKey"], st[0]["hub"]["hubKey"],
            "every hub serves one host key"
        );
    }
    let ca = |h: &Env| std::fs::read_to_string(h.path("data/towerctl/ca.crt")).unwrap();
    assert_eq!(ca(&hubs[1]), ca(&hubs[0]), "every hub serves one CA");
    assert_eq!(ca(&hubs[2]), ca(&hubs[0]), "every hub serves one CA");
    let api = ApiServer::start();
    // Agents spread over the hubs: each joins with the command its hub
    // printed (that hub first, then the other live hubs).
    let names = ["alpha", "beta", "gamma"];
    let mut joins = Vec::new();
    for (h, name) in hubs.iter().zip(names) {
        let j = join(h, h, name, &api);
        assert_eq!(
            j.iter().filter(|a| *a == "--hub").count(),
            3,
            "the join command lists every live hub: {j:?}"
        );
        joins.push(j);
    }
    // Every hub sees every member connected, and which hub holds it.
    for h in &hubs {
        wait_for(
            "every member connected on every hub",
            Duration::from_secs(10),
            || {
                let s = h.status();
                names
                    .iter()
                    .all(|n| {
                        member(&s, n)["state"] == "connected" && member(&s, n)["hub"].is_string()
                    })
                    .then_some(())
            },
        );
    }
    // Each hub's local admin, through each hub, reaches every member.
    for h in &hubs {
        for n in names {
            let o = h.towerctl(&["use", n]);
            assert!(o.ok(), "use {n}: {o:?}");
            assert!(reaches(h, n), "kubectl via one hub to {n}");
            // A bare path, routed by TLS server name on the first hub,
            // forwarded by path to the owner.
            let o = h.kubectl(&[
                "--context",
                &format!("tower-{n}"),
                "get",
                "--raw",
                "/api/v1/nodes",
            ]);
            assert!(
                o.ok() && o.stdout.contains("fake-node-1"),
                "get --raw via one hub to {n}: {o:?}"
            );
        }
    }

    // A join token spent through hub 1 is refused by hub 2.
    let j = hubs[0].cluster_add("delta");
    let kc = hubs[0].path("delta.kubeconfig");
    api.write_kubeconfig(&kc);
    let hub_url = |j: &[String], i: usize| -> String {
        j.iter()
            .enumerate()
            .filter(|(_, a)| *a == "--hub")
            .nth(i)
            .map(|(k, _)| j[k + 1].clone())
            .unwrap()
    };
    let only = |j: &[String], url: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut it = j.iter();
        while let Some(a) = it.next() {
            if a == "--hub" {
                it.next();
            } else {
                out.push(a.clone());
            }
        }
        out.extend(["--hub".to_string(), url.to_string()]);
        out
    };
    let h1 = hub_url(&j, 0);
    let h2 = hub_url(&joins[1], 0);
    let o = hubs[0].join(
        &only(&j, &h1),
        &["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"],
    );
    assert!(o.ok(), "delta joins through hub 1: {o:?}");
    let other = Env::new();
    let o = other.join(
        &only(&j, &h2),
        &["--kubeconfig", kc.to_str().unwrap(), "--timeout", "10s"],
    );
    assert!(!o.ok(), "the spent token must be refused by hub 2: {o:?}");
    assert!(
        o.all().contains("token"),
        "the refusal names the token: {o:?}"
    );

    // kill -9 the hub holding beta: beta is back through the others within
    // one backoff, with no operator action.
    let owner = member(&hubs[0].status(), "beta")["hub"]
        .as_str()
        .unwrap()
        .to_string();
    let idx = hubs
        .iter()
        .position(|h| {
            std::fs::read_to_string(h.path("data/towerctl/hub.id"))
                .is_ok_and(|id| id.trim() == owner)
        })
        .expect("the owner is one of the three hubs");
    let killed = Instant::now();
    hubs[idx].kill9("hub");
    let others: Vec<&Env> = hubs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, h)| h)
        .collect();
    for h in &others {
        wait_for(
            "beta reachable through a surviving hub",
            Duration::from_secs(15),
            || reaches(h, "beta").then_some(()),
        );
    }
    eprintln!(
        "beta back through the other hubs {:?} after kill -9 of its hub",
        killed.elapsed()
    );
    let new_owner = member(&others[0].status(), "beta")["hub"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_ne!(new_owner, owner, "another hub holds beta now");

    // Revoke on one hub cuts a session another hub holds, within 3 s
    // (about 0.3 s on a quiet machine).
    let alpha_owner = member(&others[0].status(), "alpha")["hub"]
        .as_str()
        .unwrap()
        .to_string();
    let revoker = others
        .iter()
        .find(|h| {
            let a = h.status()["hub"]["gatewayAddress"]
                .as_str()
                .unwrap()
                .to_string();
            !alpha_owner.ends_with(&format!(":{}", a.rsplit(':').next().unwrap()))
        })
        .expect("a hub that does not hold alpha");
    // alpha's agent runs on the first machine.
    let holder_env = &hubs[0];
    let agent_state = |h: &Env| {
        h.status()["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "alpha").cloned())
            .map(|a| a["state"].clone())
    };
    wait_for(
        "alpha's agent connected before the revoke",
        Duration::from_secs(10),
        || (agent_state(holder_env) == Some("connected".into())).then_some(()),
    );
    let t = Instant::now();
    let o = revoker.towerctl(&["cluster", "revoke", "alpha"]);
    assert!(o.ok(), "revoke: {o:?}");
    wait_for(
        "alpha's session cut by its hub",
        Duration::from_secs(5),
        || {
            let s = holder_env.status();
            let a = s["agents"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == "alpha").cloned());
            let gone = a.is_none_or(|a| a["state"] != "connected");
            gone.then_some(())
        },
    );
    let took = t.elapsed();
    eprintln!("revoke on another hub cut alpha's session in {took:?}");
    // Two towerctl processes and an etcd round trip inside: 3 s on a
    // loaded two-core machine (about 0.3 s when quiet).
    assert!(
        took < Duration::from_secs(3),
        "revoke took {took:?} to cut a session held by another hub"
    );
    assert_watch_never_broke(&hubs);
}

#[test]
fn etcd_outage_keeps_tunnels_and_refuses_registry_changes() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    join(&hubs[0], &hubs[0], "alpha", &api);
    join(&hubs[1], &hubs[1], "beta", &api);
    for h in &hubs {
        for n in ["alpha", "beta"] {
            assert!(h.towerctl(&["use", n]).ok());
            wait_for("every member reachable", Duration::from_secs(10), || {
                reaches(h, n).then_some(())
            });
        }
    }

    etcd.signal("-STOP");
    let stopped = Instant::now();
    // Registry changes fail, and say why.
    let o = hubs[0].towerctl(&["cluster", "add", "zeta"]);
    assert!(!o.ok(), "cluster add must fail while etcd is away: {o:?}");
    assert!(o.all().contains("etcd"), "the error names etcd: {o:?}");
    // Established tunnels and requests keep working, forwarded ones too,
    // for the whole outage.
    while stopped.elapsed() < Duration::from_secs(20) {
        for h in &hubs {
            for n in ["alpha", "beta"] {
                assert!(
                    reaches(h, n),
                    "{n} through a hub with etcd away ({:?} in)",
                    stopped.elapsed()
                );
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    etcd.signal("-CONT");
    // Converges: registry changes work again, ownership is claimed again
    // (leases may have expired meanwhile), every member reachable.
    // (The refused `cluster add zeta` may still apply when etcd resumes:
    // its request was in etcd's socket buffer. Either way both hubs agree.)
    wait_for("cluster add to work again", Duration::from_secs(15), || {
        hubs[1]
            .towerctl(&["cluster", "add", "omega"])
            .ok()
            .then_some(())
    });
    let names = |h: &Env| -> Vec<String> {
        let mut v: Vec<String> = h.status()["hub"]["clusters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    wait_for(
        "both hubs to list the same members",
        Duration::from_secs(10),
        || {
            let (a, b) = (names(&hubs[0]), names(&hubs[1]));
            (a == b && a.contains(&"omega".to_string())).then_some(())
        },
    );
    for h in &hubs {
        wait_for("ownership claimed again", Duration::from_secs(15), || {
            let s = h.status();
            ["alpha", "beta"]
                .iter()
                .all(|n| member(&s, n)["hub"].is_string() && member(&s, n)["state"] == "connected")
                .then_some(())
        });
        for n in ["alpha", "beta"] {
            wait_for(
                "member reachable after etcd returned",
                Duration::from_secs(10),
                || reaches(h, n).then_some(()),
            );
        }
    }
}

/// The agent `join` (its printed command) started in `first`, started
/// again in `second` with the same identity (its key copied) and only
/// `second`'s tunnel URL: a member's agent that moved.
/// Its keepalive is `keepalive`.
fn same_agent_through(
    first: &Env,
    second: &Env,
    join: &[String],
    api: &ApiServer,
    keepalive: &str,
) {
    let hub2 = second.status()["hub"]["tunnelURL"]
        .as_str()
        .unwrap()
        .to_string();
    let key = |h: &Env| h.path("config/towerctl/agents/alpha.key");
    std::fs::copy(key(first), second.path("alpha-copy.key")).unwrap();
    let hub_key = join[join.iter().position(|a| a == "--hub-key").unwrap() + 1].clone();
    let kc = second.path("alpha.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = second.towerctl(&[
        "join",
        "alpha",
        "--hub",
        &hub2,
        "--hub-key",
        &hub_key,
        "--key-file",
        second.path("alpha-copy.key").to_str().unwrap(),
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--keepalive",
        keepalive,
    ]);
    assert!(o.ok(), "second agent: {o:?}");
}

/// Whether hub `h`'s events for `name` include one containing `text`.
fn member_event(h: &Env, name: &str, text: &str) -> bool {
    let s = h.status();
    member(&s, name)["events"].as_array().is_some_and(|a| {
        a.iter()
            .any(|e| e["text"].as_str().is_some_and(|t| t.contains(text)))
    })
}

/// A hub frozen past its etcd lease's TTL (its owner key gone with the
/// lease) wakes to find, after that removal in its watch's backlog, the
/// claim another hub made meanwhile for the member's agent, which moved
/// there. Its own session's claim is made again only where the key is free
/// in etcd, not where its copy of the moment shows it free (written under
/// a new lease, it went over the newer claim, and the other hub then cut
/// the healthy session as replaced: a race this test does not force), and
/// a claim made again that is refused (the key held, or the write failing
/// under the expired lease) keeps its earlier revision, so that the newer
/// claim cuts this hub's session at once (before, the failed write left it
/// standing, uncut: this test failed 3 of 3 runs so).
#[test]
fn a_hub_woken_from_a_freeze_leaves_a_newer_claim_on_another_hub_standing() {
    let etcd = Etcd::start();
    // Keepalives every 15 s: the frozen agent's session on hub 0 outlives
    // the wait below for hub 0's cut (its third unanswered keepalive ends
    // it, the first overdue at its wake).
    let hubs: [Env; 2] = std::array::from_fn(|_| Env::new());
    for h in &hubs {
        let o = up_on_store(h, &etcd.url, &["--keepalive", "15s"]);
        assert!(o.ok(), "{o:?}");
    }
    let api = ApiServer::start();
    let j = join(&hubs[0], &hubs[0], "alpha", &api);
    let owner = || etcd_json(&etcd, "/towerctl/owners/alpha");
    let gateway = |h: &Env| h.status()["hub"]["gatewayURL"].clone();
    let (gw0, gw1) = (gateway(&hubs[0]), gateway(&hubs[1]));
    wait_for("hub 0's claim", Duration::from_secs(10), || {
        owner().filter(|o| o["peer"] == gw0)
    });
    // The hub and the agent it holds frozen (the agent's session on it
    // stays open, as with a stalled VM); the lease expires with its key.
    let (hub0, agent0) = (
        hubs[0].pid_of("hub").unwrap(),
        hubs[0].pid_of("agent-alpha").unwrap(),
    );
    for pid in [agent0, hub0] {
        // SAFETY: signals to processes this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }
    let (_agent, _hub) = (Resume(agent0), Resume(hub0));
    wait_for(
        "hub 0's owner key gone with its lease",
        Duration::from_secs(25),
        || owner().is_none().then_some(()),
    );
    same_agent_through(&hubs[0], &hubs[1], &j, &api, "5s");
    wait_for("hub 1's claim", Duration::from_secs(10), || {
        owner().filter(|o| o["peer"] == gw1)
    });
    drop(_hub);
    wait_for(
        "hub 0 to cut its session as replaced on hub 1",
        Duration::from_secs(10),
        || member_event(&hubs[0], "alpha", "replaced by a newer session on hub").then_some(()),
    );
    // Past hub 0's reconciling after its wake (each second): hub 1's claim
    // and session stand.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(owner().map(|o| o["peer"].clone()), Some(gw1.clone()));
    assert!(
        !member_event(&hubs[1], "alpha", "replaced by a newer session"),
        "hub 1 cut the member's healthy session: {}",
        hubs[1].status()
    );
    let admin = std::fs::read_to_string(hubs[1].path("data/towerctl/admin.token")).unwrap();
    let (code, body) = support::gateway_get(&hubs[1], admin.trim(), "/clusters/alpha/version");
    assert_eq!(code, "200", "alpha through hub 1: {body}");
}

#[test]
fn a_newer_session_on_another_hub_replaces_the_old_one() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let j = join(&hubs[0], &hubs[0], "alpha", &api);
    same_agent_through(&hubs[0], &hubs[1], &j, &api, "1s");
    wait_for(
        "hub 1 to cut its copy, naming hub 2",
        Duration::from_secs(10),
        || member_event(&hubs[0], "alpha", "replaced by a newer session on hub").then_some(()),
    );
}

/// Requests for a member held by another hub go over connections the hubs
/// keep between them: 20 kubectl requests through hub 1 to a member on hub
/// 2 leave one connection from hub 1 to hub 2's gateway, not one per
/// request (each a TCP and a TLS handshake).
#[test]
fn requests_forwarded_to_another_hub_reuse_their_connection() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    join(&hubs[1], &hubs[1], "beta", &api);
    wait_for(
        "hub 1 to see beta connected on hub 2",
        Duration::from_secs(10),
        || (member(&hubs[0].status(), "beta")["state"] == "connected").then_some(()),
    );
    let o = hubs[0].towerctl(&["use", "beta"]);
    assert!(o.ok(), "use beta: {o:?}");
    let port = hubs[1].gateway_port();
    // Established or in TIME-WAIT on the connecting side: a connection
    // closed after its request still counts.
    let to_hub2 = || support::connections_to(port, &["01", "06"]);
    let before = to_hub2();
    for i in 0..20 {
        let o = hubs[0].kubectl(&["get", "--raw", "/version"]);
        assert!(
            o.ok() && o.stdout.contains("gitVersion"),
            "request {i}: {o:?}"
        );
    }
    let made = to_hub2().saturating_sub(before);
    assert!(
        (1..=2).contains(&made),
        "20 requests forwarded from hub 1 made {made} connections to hub 2"
    );
    // A client's own impersonation crosses the hop whole: hub 2 checks it
    // again and carries it to beta's agent, and the member sees it as the
    // client sent it.
    api.bind_user("bob");
    let o = hubs[0].kubectl(&["get", "ns", "--as", "bob", "--as-group", "devs"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-user"), Some("bob"), "{last:?}");
    assert_eq!(last.header("impersonate-group"), Some("devs"), "{last:?}");
    // The token hub 1 accepted is the one hub 2 is given, wherever the
    // client put it: in `Proxy-Authorization` (a hop-by-hop header) it was
    // dropped on the way, and hub 2 answered 401.
    let admin = std::fs::read_to_string(hubs[0].path("data/towerctl/admin.token")).unwrap();
    let gw = hubs[0].status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(hubs[0].path("data/towerctl/ca.crt"))
    .args([
        "-H",
        &format!("Proxy-Authorization: Bearer {}", admin.trim()),
    ])
    .arg(format!("{gw}/clusters/beta/version"));
    let o = support::run_bounded(c, Duration::from_secs(20));
    assert!(
        o.stdout.ends_with("\n200") && o.stdout.contains("gitVersion"),
        "{o:?}"
    );
}

/// Waits for this hub's audit record matching `f` and `phase`.
fn wait_audit(env: &Env, phase: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for(
        &format!("a {phase} record"),
        Duration::from_secs(10),
        || {
            audit_records(env)
                .into_iter()
                .find(|r| f(r) && r["phase"] == phase)
        },
    )
}

/// This hub's audit records (`towerctl audit -o json`).
fn audit_records(env: &Env) -> Vec<serde_json::Value> {
    let o = env.towerctl(&["audit", "-o", "json"]);
    assert!(o.ok(), "{o:?}");
    o.stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An exec carried from the hub the operator reached to the hub holding
/// the member is recorded on the first hub when it ends, with its length
/// and bytes: it used to be recorded there as ended at once (101, no
/// bytes) while it ran. A CONNECT carried the same way used to leave no
/// record at all on the first hub.
#[test]
fn streams_carried_to_another_hub_are_recorded_on_both_when_they_end() {
    use std::io::Write as _;
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let _api = beta_on_the_second_hub(&hubs);
    assert!(hubs[0].towerctl(&["use", "beta"]).ok());
    let mut cmd = hubs[0].kubectl_cmd(&["exec", "-i", "web-0", "--", "cat"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut exec = cmd.spawn().unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    stdin.write_all(b"through two hubs\n").unwrap();
    let mut out = exec.stdout.take().unwrap();
    let mut line = [0u8; 17];
    out.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"through two hubs\n");
    let is_exec = |r: &serde_json::Value| r["path"].as_str().unwrap_or("").contains("/exec");
    wait_audit(&hubs[0], "start", is_exec);
    std::thread::sleep(Duration::from_millis(1500));
    let ended: Vec<_> = audit_records(&hubs[0])
        .into_iter()
        .filter(|r| is_exec(r) && r["phase"] == "end")
        .collect();
    assert!(
        ended.is_empty(),
        "recorded as ended while it runs: {ended:?}"
    );
    drop(stdin);
    let status = exec.wait().unwrap();
    assert!(status.success(), "kubectl exec: {status:?}");
    let end = wait_audit(&hubs[0], "end", is_exec);
    assert_eq!(end["status"], 101, "{end}");
    assert_eq!(end["operator"], "admin", "{end}");
    assert!(end["duration_ms"].as_u64().unwrap_or(0) >= 1500, "{end}");
    assert!(end["bytes"].as_u64().unwrap_or(0) > 0, "{end}");

    let token = std::fs::read_to_string(hubs[0].path("data/towerctl/admin.token")).unwrap();
    let url = hubs[0].status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();

    // A CONNECT carried to the other hub is recorded here too, start and
    // end (it was not recorded here at all).
    let web = support::http_server("through two hubs");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--proxy", &url, "--proxy-cacert"])
        .arg(hubs[0].path("data/towerctl/ca.crt"))
        .args([
            "--proxy-header",
            &format!("Proxy-Authorization: Bearer {}", token.trim()),
            "-p",
            &format!("http://127.0.0.1.beta:{}/", web.port()),
        ]);
    let o = support::run_bounded(curl, Duration::from_secs(20));
    assert!(o.stdout.contains("through two hubs"), "{o:?}");
    let is_connect = |r: &serde_json::Value| r["verb"] == "connect";
    wait_audit(&hubs[0], "start", is_connect);
    let end = wait_audit(&hubs[0], "end", is_connect);
    assert_eq!(end["operator"], "admin", "{end}");
    assert!(end["bytes"].as_u64().unwrap_or(0) > 0, "{end}");

    // The client's first bytes sent with a CONNECT (`towerctl-early`, as
    // `towerctl port-forward` sends them) go on with it: the hub holding
    // the member takes them, this one says so, and the target has them
    // with nothing written on the stream.
    let echo = support::echo_server();
    support::connect_with_first_bytes_echoed(&hubs[0], &format!("127.0.0.1.beta:{echo}"));

    // A client sending the hubs' forwarding marker is not carried to the
    // other hub (no loop), and is told why rather than "not connected".
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(hubs[0].path("data/towerctl/ca.crt"))
        .args([
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "-H",
            "x-towerctl-forwarded-by: someone",
            &format!("{url}/clusters/beta/version"),
        ]);
    let o = support::run_bounded(curl, Duration::from_secs(20));
    assert!(
        o.stdout.contains("is connected to hub") && o.stdout.contains("x-towerctl-forwarded-by"),
        "{o:?}"
    );
}

/// Member beta joined to the second of `hubs` (dials allowed to
/// loopback), once the first sees it connected there; its API server.
fn beta_on_the_second_hub(hubs: &[Env; 2]) -> ApiServer {
    let api = ApiServer::start();
    join_with(
        &hubs[1],
        &hubs[1],
        "beta",
        &api,
        &["--allow", "127.0.0.0/8"],
    );
    wait_for(
        "hub 1 to see beta connected on hub 2",
        Duration::from_secs(10),
        || (member(&hubs[0].status(), "beta")["state"] == "connected").then_some(()),
    );
    api
}

/// A hub carrying a CONNECT with the client's first bytes to the hub
/// holding the member, which ignores them (an older one: test hook
/// `TOWERCTL_TEST_HUB_WITHOUT=towerctl-early`), passes on its silence: no
/// count in the 200, and the bytes the client then writes on the stream
/// (as `towerctl port-forward` does) reach the target once.
#[test]
fn first_bytes_carried_to_a_hub_that_ignores_them_are_sent_on_the_stream() {
    use std::io::Write as _;
    let etcd = Etcd::start();
    let hubs = [Env::new(), Env::new()];
    hub_up(&hubs[0], &etcd);
    let mut older = up_cmd(&hubs[1], &etcd.url, "127.0.0.1:0", &[]);
    older.env("TOWERCTL_TEST_HUB_WITHOUT", "towerctl-early");
    let o = support::run_bounded(older, Duration::from_secs(60));
    assert!(o.ok(), "towerctl up --store failed: {o:?}");
    let _api = beta_on_the_second_hub(&hubs);
    let echo = support::echo_server();
    let (head, mut s) = support::raw_connect(
        &hubs[0],
        &format!("127.0.0.1.beta:{echo}"),
        "towerctl-early: aGVsbG8gZWFybHk=\r\n",
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("towerctl-early-taken"), "{head}");
    s.write_all(b"hello early, then more").unwrap();
    let mut got = [0u8; 22];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello early, then more");
}

/// etcd over TLS with client certificates (`--client-cert-auth`): two hubs
/// share the registry through it; a hub without a client certificate, or
/// trusting another CA, or presenting a certificate from another CA, does
/// not start and says which flag to fix.
#[test]
fn hubs_reach_an_etcd_that_requires_client_certificates() {
    let pki = EtcdPki::new();
    let etcd = Etcd::start_with(Some(&pki));
    let up = |env: &Env, extra: &[&str]| up_on_store(env, &etcd.url, extra);
    let (ca, cert, key) = (
        pki.file("ca.pem"),
        pki.file("client.pem"),
        pki.file("client-key.pem"),
    );
    let good = [
        "--store-ca",
        ca.as_str(),
        "--store-cert",
        cert.as_str(),
        "--store-key",
        key.as_str(),
    ];
    let hubs = [Env::new(), Env::new()];
    for h in &hubs {
        let o = up(h, &good);
        assert!(o.ok(), "towerctl up over TLS failed: {o:?}");
    }
    // One registry: a member added on hub 0 is listed and reachable on hub 1.
    let api = ApiServer::start();
    join(&hubs[0], &hubs[0], "alpha", &api);
    let o = hubs[1].towerctl(&["cluster", "list"]);
    assert!(o.ok() && o.stdout.contains("alpha"), "{o:?}");
    assert!(hubs[1].towerctl(&["use", "alpha"]).ok());
    wait_for("alpha through hub 1", Duration::from_secs(10), || {
        reaches(&hubs[1], "alpha").then_some(())
    });
    // The registry watch stays open while nothing changes.
    std::thread::sleep(Duration::from_secs(4));
    assert_watch_never_broke(&hubs);

    // Refusals, each naming what to fix; none of them starts a hub.
    let other = pki.file("other-ca.pem");
    let (s_cert, s_key) = (pki.file("stranger.pem"), pki.file("stranger-key.pem"));
    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "no client certificate",
            vec!["--store-ca", &ca],
            "--store-cert",
        ),
        (
            "etcd's certificate from a CA not trusted",
            vec![
                "--store-ca",
                &other,
                "--store-cert",
                &cert,
                "--store-key",
                &key,
            ],
            "--store-ca",
        ),
        (
            "a client certificate from another CA",
            vec![
                "--store-ca",
                &ca,
                "--store-cert",
                &s_cert,
                "--store-key",
                &s_key,
            ],
            "--store-cert",
        ),
        (
            "a certificate without its key",
            vec!["--store-ca", &ca, "--store-cert", &cert],
            "--store-key",
        ),
    ];
    for (what, flags, names) in cases {
        let env = Env::new();
        let o = up(&env, &flags);
        assert!(!o.ok(), "{what}: the hub must not start: {o:?}");
        assert!(
            o.all().contains(names),
            "{what}: the error names {names}: {o:?}"
        );
        assert!(env.pid_of("hub").is_none(), "{what}: no hub left running");
    }
    // Plain etcd:// with TLS flags is refused before anything is dialed.
    let env = Env::new();
    let plain = format!("etcd://{}", etcd.client);
    let o = up_on_store(&env, &plain, &["--store-ca", &ca]);
    assert!(!o.ok() && o.all().contains("https://"), "{o:?}");
}

/// etcd with authentication enabled (users and roles, as `etcdctl user
/// add` / `role grant-permission` / `auth enable` make them): hubs log in
/// as `--store-user` with the password in `--store-password-file`, share
/// the registry and serve an operator; when etcd forgets every token
/// (authentication turned off and on), they log in again: writes, the
/// registry watch and its confirmations go on (a hub whose copy went
/// unconfirmed past `--store-max-stale` would refuse the operator). A hub
/// without a user, with a wrong password, a password file anyone may read,
/// or a user whose role may not touch the prefix does not start and says
/// what to fix.
#[test]
fn hubs_reach_an_etcd_that_requires_a_user_and_password() {
    let etcd = Etcd::start();
    let post = |path: &str, body: String, token: Option<&str>| {
        etcd_post_as(&etcd.client, path, &body, token)
            .unwrap_or_else(|| panic!("etcd refused {path} {body}"))
    };
    let (prefix, end) = (b64(b"/towerctl/"), b64(b"/towerctl0"));
    for (user, password, role) in [("root", "rootpw", "root"), ("hub", "hubpw", "hub")] {
        post(
            "/v3/auth/user/add",
            format!(r#"{{"name":"{user}","password":"{password}"}}"#),
            None,
        );
        if role != "root" {
            post("/v3/auth/role/add", format!(r#"{{"name":"{role}"}}"#), None);
        }
        post(
            "/v3/auth/user/grant",
            format!(r#"{{"user":"{user}","role":"{role}"}}"#),
            None,
        );
    }
    post(
        "/v3/auth/role/grant",
        format!(
            r#"{{"name":"hub","perm":{{"permType":"READWRITE","key":"{prefix}","range_end":"{end}"}}}}"#
        ),
        None,
    );
    // A user whose role has no permission at all.
    post(
        "/v3/auth/user/add",
        r#"{"name":"nobody","password":"nobodypw"}"#.into(),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = file("good", "hubpw\n", 0o600);
    let login = [
        "--store-user",
        "hub",
        "--store-password-file",
        good.as_str(),
    ];
    // Hub 0 starts while etcd's authentication is still off (its user is
    // not needed yet), and logs in once etcd asks for one.
    let hubs = [Env::new(), Env::new()];
    let mut first = login.to_vec();
    first.extend(["--store-max-stale", "3s", "-vv"]);
    let o = up_on_store(&hubs[0], &etcd.url, &first);
    assert!(o.ok(), "a user given, etcd's authentication off: {o:?}");
    post("/v3/auth/enable", "{}".into(), None);
    let root_token = || {
        let answer = post(
            "/v3/auth/authenticate",
            r#"{"name":"root","password":"rootpw"}"#.into(),
            None,
        );
        let (_, json) = answer.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["token"].as_str().unwrap().to_string()
    };

    let wrong = file("wrong", "hubpw2\n", 0o600);
    let (open, nobody) = (
        file("open", "hubpw\n", 0o644),
        file("nobody", "nobodypw", 0o400),
    );
    let cases: [(&str, Vec<&str>, &str); 4] = [
        ("no user", vec![], "--store-user"),
        (
            "a wrong password",
            vec!["--store-user", "hub", "--store-password-file", &wrong],
            "fix --store-user, or the password in --store-password-file",
        ),
        (
            "a password file anyone may read",
            vec!["--store-user", "hub", "--store-password-file", &open],
            "chmod 600",
        ),
        (
            "a user whose role may not touch the prefix",
            vec!["--store-user", "nobody", "--store-password-file", &nobody],
            "grant its role readwrite",
        ),
    ];
    for (what, flags, names) in cases {
        let env = Env::new();
        let o = up_on_store(&env, &etcd.url, &flags);
        assert!(!o.ok(), "{what}: the hub must not start: {o:?}");
        assert!(
            o.all().contains(names),
            "{what}: the error says {names:?}: {o:?}"
        );
        assert!(
            !o.all().contains("hubpw"),
            "{what}: no password shown: {o:?}"
        );
        assert!(env.pid_of("hub").is_none(), "{what}: no hub left running");
    }

    let o = up_on_store(&hubs[1], &etcd.url, &login);
    assert!(o.ok(), "{o:?}");
    let api = ApiServer::start();
    join(&hubs[1], &hubs[1], "alpha", &api);
    let bob = operator_token(&hubs[1], "bob");
    let o = hubs[1].towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let get = || support::gateway_get(&hubs[0], &bob, "/clusters/alpha/version").0;
    wait_for(
        "bob reaches alpha through hub 0",
        Duration::from_secs(15),
        || (get() == "200").then_some(()),
    );
    let logins = || {
        std::fs::read_to_string(hubs[0].path("state/towerctl/hub.log"))
            .unwrap_or_default()
            .matches("gave a token for user 'hub'")
            .count()
    };
    let before = logins();
    assert!(before >= 1, "hub 0 logged in");

    // Every token forgotten by etcd.
    let root = root_token();
    post("/v3/auth/disable", "{}".into(), Some(&root));
    post("/v3/auth/enable", "{}".into(), None);
    // A registry change on hub 1 reaches hub 0; hub 0 writes too.
    let o = hubs[1].towerctl(&["cluster", "add", "beta"]);
    assert!(o.ok(), "a write after etcd forgot the token: {o:?}");
    wait_for("beta listed on hub 0", Duration::from_secs(10), || {
        let o = hubs[0].towerctl(&["cluster", "list"]);
        o.stdout.contains("beta").then_some(())
    });
    let o = hubs[0].towerctl(&["cluster", "add", "gamma"]);
    assert!(o.ok(), "{o:?}");
    // Past --store-max-stale (3 s): hub 0's copy stayed confirmed.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(get(), "200", "bob is still served by hub 0");
    // Once: its threads that found the token refused wait for one login
    // (each is a bcrypt and a raft write in etcd).
    let again = logins() - before;
    assert!(
        (1..=2).contains(&again),
        "hub 0 logged in again, once (a second at most, for a race): {again}"
    );
    assert_watch_never_broke(&hubs);

    // The hub's password changed in etcd: its logins are refused, and
    // tried again after a pause (each is a bcrypt in etcd), not at every
    // call; the new password written into the file is taken without a
    // restart.
    let refusals = || {
        std::fs::read_to_string(etcd.dir.path().join("etcd.log"))
            .unwrap_or_default()
            .matches("invalid password for user hub")
            .count()
    };
    let root = root_token();
    post(
        "/v3/auth/user/changepw",
        r#"{"name":"hub","password":"hubpw3"}"#.into(),
        Some(&root),
    );
    post("/v3/auth/disable", "{}".into(), Some(&root));
    post("/v3/auth/enable", "{}".into(), None);
    let refused_before = refusals();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let o = hubs[0].towerctl(&["cluster", "add", "delta"]);
        assert!(!o.ok(), "a stale password: {o:?}");
        assert!(o.all().contains("--store-password-file"), "{o:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = refusals() - refused_before;
    assert!(
        (1..=8).contains(&refused),
        "logins refused in 6 s from two hubs, with ~30 calls: {refused}"
    );
    std::fs::write(&good, "hubpw3\n").unwrap();
    wait_for(
        "hub 0 to log in with the new password",
        Duration::from_secs(45),
        || {
            hubs[0]
                .towerctl(&["cluster", "add", "delta"])
                .ok()
                .then_some(())
        },
    );

    // etcd's authentication turned off: the hubs go on without a token.
    let root = root_token();
    post("/v3/auth/disable", "{}".into(), Some(&root));
    for (i, h) in hubs.iter().enumerate() {
        let name = format!("off{i}");
        wait_for(
            "a write with etcd's authentication off",
            Duration::from_secs(45),
            || h.towerctl(&["cluster", "add", &name]).ok().then_some(()),
        );
    }
    for h in &hubs {
        let log = std::fs::read_to_string(h.path("state/towerctl/hub.log")).unwrap_or_default();
        assert!(!log.contains("hubpw"), "the password in a log: {log}");
    }
}

/// `cluster set --impersonate` on one hub reaches the hub that holds the
/// member's session: it stops routing with the agent's own identity within
/// a second or two (fails closed), and routes again once the setting is
/// changed back, with no agent restart.
/// `cluster rotate --new-key` on one hub retires the agent's key for every
/// hub: the hub holding the session hears of it through etcd and cuts it
/// (before, only a session on the hub where the command ran was cut, and a
/// possibly stolen key went on serving the member through the other). The
/// agent, its key and spent token refused, stops; the new join command
/// brings the member back.
#[test]
fn a_key_retired_on_one_hub_cuts_the_session_on_the_hub_holding_it() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let machine = Env::new();
    join(&hubs[0], &machine, "alpha", &api);
    assert!(hubs[0].towerctl(&["use", "alpha"]).ok());
    wait_for("alpha through hub 0", Duration::from_secs(10), || {
        reaches(&hubs[0], "alpha").then_some(())
    });
    let agent = machine.pid_of("agent-alpha").expect("agent pid");
    let o = hubs[1].towerctl(&["cluster", "rotate", "alpha", "--new-key"]);
    assert!(o.ok(), "{o:?}");
    let new_join = support::printed_command(&o.stdout, "join");
    let at = Instant::now();
    wait_for(
        "the agent with the retired key to stop",
        Duration::from_secs(20),
        || support::is_zombie(agent).then_some(()),
    );
    eprintln!(
        "the agent stopped {:?} after the rotate on hub 1",
        at.elapsed()
    );
    let log = std::fs::read_to_string(hubs[0].path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(log.contains("is no longer registered on the hub"), "{log}");
    assert!(!reaches(&hubs[0], "alpha"));
    // With a new key: the retired one is refused with the new token too.
    std::fs::remove_file(machine.path("config/towerctl/agents/alpha.key")).unwrap();
    let kc = machine.path("alpha.kubeconfig");
    let o = machine.join(
        &new_join,
        &["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"],
    );
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    wait_for("alpha back through hub 0", Duration::from_secs(10), || {
        reaches(&hubs[0], "alpha").then_some(())
    });
}

/// An owner key naming a session its hub no longer has (its release failed
/// while etcd was away, or landed before its claim) is removed by that hub:
/// before, other hubs showed the member connected and sent its requests
/// there, to be answered 503, for as long as the hub lived.
#[test]
fn an_owner_key_left_by_a_session_that_ended_is_removed_by_its_hub() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let machine = Env::new();
    join(&hubs[0], &machine, "alpha", &api);
    assert!(hubs[0].towerctl(&["cluster", "add", "ghost"]).ok());
    let range = |key: &str| etcd_json(&etcd, key);
    // Hub 0's owner key for alpha says what such a key looks like.
    let alpha = wait_for("alpha's owner key", Duration::from_secs(10), || {
        range("/towerctl/owners/alpha")
    });
    let mut ghost = alpha.clone();
    ghost["session"] = serde_json::json!(999_999);
    etcd_put_json(&etcd, "/towerctl/owners/ghost", &ghost);
    let at = Instant::now();
    wait_for(
        "hub 0 to remove the stale owner key",
        Duration::from_secs(10),
        || range("/towerctl/owners/ghost").is_none().then_some(()),
    );
    eprintln!("removed {:?} after it was written", at.elapsed());
    // alpha's own key, of a live session, stays.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(range("/towerctl/owners/alpha"), Some(alpha));
}

/// An owner key of a hub naming an ended session of its own, written after
/// the claim of the member's live session on that hub (two claims landing
/// out of order), is claimed back for the live session: the hub used to cut
/// its own live session as "replaced by a newer session on" itself.
#[test]
fn a_hubs_older_claim_landing_last_does_not_cut_its_live_session() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let machine = Env::new();
    join(&hubs[0], &machine, "alpha", &api);
    let range = |key: &str| etcd_json(&etcd, key);
    let live = wait_for("alpha's owner key", Duration::from_secs(10), || {
        range("/towerctl/owners/alpha")
    });
    let mut older = live.clone();
    older["session"] = serde_json::json!(live["session"].as_u64().unwrap().wrapping_sub(1));
    etcd_put_json(&etcd, "/towerctl/owners/alpha", &older);
    // Claimed back for the live session, which goes on.
    wait_for(
        "the live session's claim back",
        Duration::from_secs(10),
        || (range("/towerctl/owners/alpha").as_ref() == Some(&live)).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = std::fs::read_to_string(hubs[0].path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(!log.contains("replaced by a newer session"), "{log}");
    assert_eq!(log.matches("agent connected").count(), 1, "{log}");
}

/// A hub whose record in etcd is gone while its lease lives (a new lease
/// taken whose write then failed, or the key deleted) writes it again: it
/// used to drop out of agents' hub lists, join commands and hand-offs for
/// good.
#[test]
fn a_hub_whose_record_is_gone_writes_it_again() {
    let etcd = Etcd::start();
    let _hubs: [Env; 2] = hubs_on(&etcd);
    let range = format!(
        r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
        b64(b"/towerctl/hubs/"),
        b64(b"/towerctl/hubs0")
    );
    let count = || {
        etcd_post(&etcd.client, "/v3/kv/range", &range)
            .and_then(|r| r.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .map(|v| {
                v["count"]
                    .as_str()
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    wait_for("both hubs' records", Duration::from_secs(10), || {
        (count() == 2).then_some(())
    });
    let delete = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(b"/towerctl/hubs/"),
        b64(b"/towerctl/hubs0")
    );
    assert!(etcd_post(&etcd.client, "/v3/kv/deleterange", &delete).is_some());
    assert_eq!(count(), 0);
    let at = Instant::now();
    wait_for(
        "both hubs' records written again",
        Duration::from_secs(15),
        || (count() == 2).then_some(()),
    );
    eprintln!("written again {:?} after they were deleted", at.elapsed());
}

#[test]
fn an_identity_mode_change_on_one_hub_applies_on_the_hub_holding_the_session() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    join(&hubs[0], &hubs[0], "alpha", &api);
    assert!(hubs[0].towerctl(&["use", "alpha"]).ok());
    wait_for("alpha through hub 0", Duration::from_secs(10), || {
        reaches(&hubs[0], "alpha").then_some(())
    });
    let o = hubs[1].towerctl(&["cluster", "set", "alpha", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    let at = Instant::now();
    let refused = wait_for(
        "hub 0 to refuse alpha's agent identity",
        Duration::from_secs(5),
        || {
            let o = hubs[0].kubectl(&[
                "--context",
                "tower-alpha",
                "get",
                "--raw",
                "/api/v1/namespaces",
            ]);
            (!o.ok()).then_some(o)
        },
    );
    assert!(
        refused.stderr.contains("requires impersonation"),
        "the refusal names the mismatch: {refused:?}"
    );
    eprintln!(
        "refused through hub 0 {:?} after the change on hub 1",
        at.elapsed()
    );
    let before = api.requests().len();
    assert!(!reaches(&hubs[0], "alpha"));
    assert_eq!(
        api.requests().len(),
        before,
        "no request reaches the member with the agent's identity once impersonation is required"
    );
    assert!(hubs[1]
        .towerctl(&["cluster", "set", "alpha", "--no-impersonate"])
        .ok());
    wait_for("alpha through hub 0 again", Duration::from_secs(5), || {
        reaches(&hubs[0], "alpha").then_some(())
    });
}

/// A TCP relay to `to` whose connections open so far can be frozen: they
/// stay open but carry nothing more, as when a NAT or a firewall drops a
/// connection without a FIN or RST. Later connections are relayed.
struct Blackhole {
    port: u16,
    cutoff: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Blackhole {
    fn start(to: String) -> Blackhole {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (cutoff, next) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(1)));
        let (c2, n2) = (cutoff.clone(), next.clone());
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                let Ok(b) = TcpStream::connect(&to) else {
                    continue;
                };
                let id = n2.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut into) in
                    [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let cutoff = c2.clone();
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let mut buf = [0u8; 16384];
                        // Bounded: a relay thread lives at most 5 minutes.
                        let end = Instant::now() + Duration::from_secs(300);
                        while Instant::now() < end {
                            let r = from.read(&mut buf);
                            // Judged after the read: bytes that arrive once
                            // frozen are never passed on.
                            let frozen = id <= cutoff.load(Ordering::SeqCst);
                            match r {
                                Ok(0) => return,
                                Ok(n) if !frozen => {
                                    if into.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Ok(_) => {}
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Blackhole { port, cutoff, next }
    }

    /// Every connection open now carries nothing more.
    fn freeze(&self) {
        use std::sync::atomic::Ordering;
        let last = self.next.load(Ordering::SeqCst) - 1;
        self.cutoff.store(last, Ordering::SeqCst);
    }

    /// Every connection, open now or later, carries nothing (a partition
    /// between the hub and etcd), until [`Blackhole::thaw`].
    fn freeze_all(&self) {
        self.cutoff
            .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections made from now on are relayed again (those made before
    /// stay dead, as after a partition).
    fn thaw(&self) {
        self.freeze();
    }
}

/// Two hubs on one etcd, the second through a [`Blackhole`] relay that can
/// leave it hearing nothing more of the registry.
fn hubs_behind_a_relay() -> (Etcd, Blackhole, Env, Env) {
    let etcd = Etcd::start();
    let relay = Blackhole::start(etcd.client.clone());
    let (a, b) = (Env::new(), Env::new());
    hub_up(&a, &etcd);
    let o = up_on_store(&b, &format!("http://127.0.0.1:{}", relay.port), &[]);
    assert!(o.ok(), "{o:?}");
    (etcd, relay, a, b)
}

/// A hub whose registry watch connection dies silently (no FIN, no RST)
/// still learns of later changes: here, an operator removed on another
/// hub. It used to serve the removed operator until it restarted.
#[test]
fn a_registry_watch_that_dies_silently_is_replaced() {
    let (_etcd, relay, a, b) = hubs_behind_a_relay();
    let bob = operator_token(&a, "bob");
    wait_for("bob known on hub b", Duration::from_secs(10), || {
        (support::gateway_get(&b, &bob, "/towerctl/v1/whoami").0 == "200").then_some(())
    });

    relay.freeze();
    let o = a.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    // Not seen at once: the watch connection carries nothing any more.
    assert_eq!(
        support::gateway_get(&b, &bob, "/towerctl/v1/whoami").0,
        "200"
    );
    wait_for("bob refused on hub b", Duration::from_secs(45), || {
        (support::gateway_get(&b, &bob, "/towerctl/v1/whoami").0 == "401").then_some(())
    });
}

/// A hub cut off from etcd (here by a relay that carries nothing more,
/// as in a partition) can no longer learn of changes made on other hubs.
/// Once its copy of the registry has gone unconfirmed for longer than
/// `--store-max-stale`, it refuses operators (503, naming etcd and the
/// flag) and cuts their open streams; its local admin still gets in. An
/// operator removed on another hub meanwhile is not served there; once
/// etcd is back it is refused as removed. It used to be served for as
/// long as the partition lasted.
#[test]
fn a_hub_cut_off_from_etcd_refuses_operators_past_its_max_stale() {
    let etcd = Etcd::start();
    let relay = Blackhole::start(etcd.client.clone());
    let (a, b) = (Env::new(), Env::new());
    hub_up(&a, &etcd);
    let store = format!("http://127.0.0.1:{}", relay.port);
    let o = up_on_store(&b, &store, &["--store-max-stale", "3s"]);
    assert!(o.ok(), "{o:?}");
    let api = ApiServer::start();
    join(&b, &b, "alpha", &api);
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let admin = std::fs::read_to_string(b.path("data/towerctl/admin.token")).unwrap();
    let admin = admin.trim();
    let get = |token: &str, path: &str| support::gateway_get(&b, token, path);
    wait_for(
        "bob reaches alpha through hub b",
        Duration::from_secs(15),
        || (get(&bob, "/clusters/alpha/version").0 == "200").then_some(()),
    );
    // With etcd reachable a quiet registry stays confirmed (its watch is
    // opened again every second): past the limit, bob is still served.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(get(&bob, "/clusters/alpha/version").0, "200");
    // Its metrics say so too, and then what an alert needs.
    let metrics = support::metrics_addr(&b);
    let refusing = || support::metric(&metrics, "towerctl_registry_refusing_operators");
    assert_eq!(refusing(), 0);
    let gauge = |series: &str| -> f64 {
        let page = support::http_get(&metrics, "/metrics");
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{page}"))
    };
    assert_eq!(gauge("towerctl_registry_max_stale_seconds "), 3.0);
    assert!(gauge("towerctl_registry_age_seconds ") < 3.0);

    let gw = b.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut watch = support::Streaming::start({
        let mut c = Command::new("curl");
        c.args(["-sS", "-N", "--cacert"])
            .arg(b.path("data/towerctl/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {bob}")])
            .arg(format!(
                "{gw}/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true"
            ));
        c
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!watch.has_exited(), "bob's watch: {}", watch.output());

    relay.freeze_all();
    let frozen = Instant::now();
    wait_for(
        "bob's watch through hub b to be cut",
        Duration::from_secs(20),
        || watch.has_exited().then_some(()),
    );
    eprintln!("bob's watch cut {:?} after the partition", frozen.elapsed());
    let (code, body) = get(&bob, "/clusters/alpha/version");
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains("etcd") && body.contains("--store-max-stale"),
        "the refusal names etcd and the flag: {body}"
    );
    assert_eq!(
        get(admin, "/towerctl/v1/whoami").0,
        "200",
        "the local admin"
    );
    // Only its own: hub a's admin token may have been replaced meanwhile.
    let a_admin = std::fs::read_to_string(a.path("data/towerctl/admin.token")).unwrap();
    assert_eq!(get(a_admin.trim(), "/towerctl/v1/whoami").0, "503");
    // A load balancer in front takes it out of rotation.
    assert_eq!(get("", "/readyz").0, "503");
    assert_eq!(refusing(), 1);
    assert!(
        support::metric(
            &metrics,
            "towerctl_registry_errors_total{kind=\"unreachable\"}"
        ) > 0
    );
    let age = gauge("towerctl_registry_age_seconds ");
    assert!(age > 3.0, "registry age {age} s while refusing");
    let s = b.status();
    let why = s["hub"]["refusingOperators"].as_str().unwrap_or_default();
    assert!(why.contains("etcd"), "status says why: {s}");
    assert!(
        b.towerctl(&["status"])
            .stdout
            .contains("REFUSING OPERATORS"),
        "the human status too"
    );
    // Removed on hub a meanwhile: never served by hub b.
    let o = a.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    assert_eq!(
        support::gateway_get(&a, &bob, "/towerctl/v1/whoami").0,
        "401"
    );
    assert_eq!(get(&bob, "/towerctl/v1/whoami").0, "503");

    relay.thaw();
    // Never served in between: the refusal lifts only once the removal
    // learnt on reconnecting is applied.
    wait_for(
        "hub b to refuse bob as removed",
        Duration::from_secs(30),
        || {
            let code = get(&bob, "/towerctl/v1/whoami").0;
            assert_ne!(code, "200", "bob served by hub b after his removal");
            (code == "401").then_some(())
        },
    );
    assert_eq!(get("", "/readyz").0, "200");
    // alpha's agent may be moving: hub b hands its agents to hub a, which
    // reaches etcd (hub a confirmed bob's removal while b was cut off).
    wait_for(
        "hub b's admin to reach alpha",
        Duration::from_secs(15),
        || (get(admin, "/clusters/alpha/version").0 == "200").then_some(()),
    );
    assert!(b.status()["hub"]["refusingOperators"].is_null());
    let log = || std::fs::read_to_string(b.path("state/towerctl/hub.log")).unwrap_or_default();
    // Said at the next check, within a second.
    wait_for(
        "hub b's log to say it serves again",
        Duration::from_secs(10),
        || log().contains("confirmed current again").then_some(()),
    );
    assert!(
        log().contains("refusing operators' requests"),
        "hub b's log says when it refused: {}",
        log()
    );
}

/// Sends SIGCONT to a stopped process when dropped (the test failing
/// midway leaves no hub frozen).
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: a signal to a pid this test started (the hub's).
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A hub frozen (SIGSTOP: a paused VM, a stalled node) past its
/// `--store-max-stale` while the registry changed finds the changes as a
/// backlog in its watch's socket on waking. None of them confirms its copy
/// current (when each was sent is unknown): requests queued meanwhile are
/// refused as stale or judged once the whole backlog is in, never served
/// on a copy that has the backlog's first changes but not yet an
/// operator's removal further on. The first message used to confirm it.
#[test]
fn a_hub_woken_from_a_freeze_is_not_confirmed_by_its_watchs_backlog() {
    let etcd = Etcd::start();
    let (a, b) = (Env::new(), Env::new());
    hub_up(&a, &etcd);
    let o = up_on_store(&b, &etcd.url, &["--store-max-stale", "3s"]);
    assert!(o.ok(), "{o:?}");
    let bob = operator_token(&a, "bob");
    let gw = b.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let ca = b.path("data/towerctl/ca.crt");
    let whoami = |token: &str| {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg("--cacert")
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{gw}/towerctl/v1/whoami"));
        c
    };
    wait_for("bob served by hub b", Duration::from_secs(15), || {
        (support::run_bounded(whoami(&bob), Duration::from_secs(25)).stdout == "200").then_some(())
    });

    let pid = b.pid_of("hub").expect("hub b's pid");
    let port = b.gateway_port();
    // SAFETY: a signal to the hub this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = Resume(pid);
    let frozen = Instant::now();
    // Changes, each its own revision (one watch message each), before and
    // after bob's removal; keys no hub reads, written on one connection.
    let puts = |from: usize| {
        let mut c = Command::new("curl");
        c.arg("-sSf");
        for i in from..from + 400 {
            let body = format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                b64(format!("/towerctl/test-backlog/{i}").as_bytes()),
                b64(&[b'x'; 512])
            );
            c.args(["-o", "/dev/null", "--data", &body])
                .arg(format!("http://{}/v3/kv/put", etcd.client))
                .arg("--next");
        }
        c.args(["-o", "/dev/null", "--data", r#"{"key":"AA=="}"#])
            .arg(format!("http://{}/v3/kv/range", etcd.client));
        let o = support::run_bounded(c, Duration::from_secs(60));
        assert!(o.ok(), "writing the backlog: {o:?}");
    };
    puts(0);
    let o = a.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    puts(400);
    std::thread::sleep(Duration::from_secs(4).saturating_sub(frozen.elapsed()));
    // Requests queued at the frozen hub, then the hub woken.
    let asked: Vec<_> = (0..8)
        .map(|_| {
            let c = whoami(&bob);
            std::thread::spawn(move || support::run_bounded(c, Duration::from_secs(25)).stdout)
        })
        .collect();
    // Each connected (the kernel completes handshakes for the frozen hub).
    let before = support::established_to(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::established_to(port) < before.max(8) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(resume);
    let codes: Vec<String> = asked.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("bob's requests queued at the frozen hub: {codes:?}");
    for c in &codes {
        assert!(
            c == "503" || c == "401",
            "bob's request on waking: {c} (all: {codes:?})"
        );
    }
    wait_for(
        "hub b to refuse bob as removed",
        Duration::from_secs(20),
        || {
            let code = support::run_bounded(whoami(&bob), Duration::from_secs(25)).stdout;
            assert_ne!(code, "200", "bob served by hub b after his removal");
            (code == "401").then_some(())
        },
    );
}

/// A hub cut off from etcd refuses operators, and so every request
/// another hub forwards to it for a member whose agent it holds: such
/// members were out of every operator's reach for as long as the partition
/// lasted. It hands its agents to a hub that reaches etcd (the next hub of
/// their list, including those a hub named at login; not to one that
/// merely answers ready), answers 503 to a load balancer's `/readyz` on its
/// tunnel listener meanwhile, and takes agents as before once it reaches
/// etcd.
#[test]
fn a_hub_cut_off_from_etcd_hands_its_agents_to_a_hub_that_can_reach_it() {
    let etcd = Etcd::start();
    let relay = Blackhole::start(etcd.client.clone());
    let (a, b) = (Env::new(), Env::new());
    // Hub a confirms its quiet registry every second (a sixth of 6 s).
    let o = up_on_store(&a, &etcd.url, &["--store-max-stale", "6s"]);
    assert!(o.ok(), "{o:?}");
    let store = format!("http://127.0.0.1:{}", relay.port);
    let o = up_on_store(&b, &store, &["--store-max-stale", "3s"]);
    assert!(o.ok(), "{o:?}");
    let api = ApiServer::start();
    let machine = Env::new();
    let command = join(&b, &machine, "alpha", &api);
    assert_eq!(
        command.iter().filter(|w| *w == "--hub").count(),
        2,
        "the join command names both hubs, b's first: {command:?}"
    );
    // beta's join command names hub b only (as one made before hub a
    // existed): hub b names hub a to it at login, and it moves there too.
    let mut only_b = b.cluster_add("beta");
    let second = only_b.iter().rposition(|w| w == "--hub").unwrap();
    only_b.drain(second..second + 2);
    let kc = machine.path("beta.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = machine.join(
        &only_b,
        &["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"],
    );
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let through_a = || support::gateway_get(&a, &bob, "/clusters/alpha/version");
    wait_for(
        "bob reaches alpha (on hub b) through hub a",
        Duration::from_secs(15),
        || (through_a().0 == "200").then_some(()),
    );
    // Hub a names the hub holding alpha's session: b's id, for now.
    let b_id = member(&a.status(), "alpha")["hub"].clone();
    assert!(b_id.is_string(), "{}", a.status());
    let tunnel = b.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let ready_b = || support::curl_within(&format!("http://{tunnel}/readyz"), 5).stdout;
    assert_eq!(ready_b().trim(), "ok");
    let log = || std::fs::read_to_string(b.path("state/towerctl/hub.log")).unwrap_or_default();
    let agent_log_of = |name: &str| {
        std::fs::read_to_string(machine.path(&format!("state/towerctl/agent-{name}.log")))
            .unwrap_or_default()
    };
    let agent_log = || agent_log_of("alpha");

    // etcd down for both: hub a still answers ready for a while (its limit
    // is 6 s, b's 3 s), but it last confirmed the registry before b turned
    // stale, so b does not move its agents there (hub a turns stale 3 s
    // later: agents moved to it would have been moved for nothing).
    etcd.signal("-STOP");
    wait_for("hub b to refuse operators", Duration::from_secs(20), || {
        log().contains("refusing operators' requests").then_some(())
    });
    // Asked three times in between.
    std::thread::sleep(Duration::from_secs(7));
    assert!(!log().contains("handing"), "{}", log());
    assert!(!agent_log().contains("tunnel down"), "{}", agent_log());
    assert_eq!(ready_b().trim(), "ok");
    etcd.signal("-CONT");
    wait_for("hub b to serve again", Duration::from_secs(30), || {
        log().contains("confirmed current again").then_some(())
    });
    wait_for(
        "bob reaches alpha through hub a again",
        Duration::from_secs(15),
        || (through_a().0 == "200").then_some(()),
    );
    // Both were past their limits: as etcd came back, neither handed its
    // agents to the other for having been heard from first.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!log().contains("handing"), "{}", log());
    assert!(!agent_log().contains("tunnel down"), "{}", agent_log());

    relay.freeze_all();
    let frozen = Instant::now();
    // Through b meanwhile: 503 (refused there), then 502s while the agent
    // moves; then served by a, which holds the session itself.
    wait_for(
        "alpha's agent to move to hub a",
        Duration::from_secs(30),
        || {
            let alpha = member(&a.status(), "alpha").clone();
            (alpha["state"] == "connected" && alpha["hub"].is_string() && alpha["hub"] != b_id)
                .then_some(())
        },
    );
    eprintln!(
        "alpha's agent moved to hub a {:?} after the partition",
        frozen.elapsed()
    );
    let (code, body) = through_a();
    assert_eq!(code, "200", "bob reaches alpha through hub a: {body}");
    // The agent's status names the hub it is on now.
    let on = machine.status()["agents"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == "alpha").cloned())
        .unwrap_or_default();
    assert_eq!(on["hub"], a.status()["hub"]["tunnelURL"], "{on}");
    // b refuses tunnels, and says so to a load balancer and to agents.
    assert!(ready_b().contains("cannot reach etcd"), "{}", ready_b());
    assert!(
        log().contains("handing 2 agents to the other hubs"),
        "{}",
        log()
    );
    assert!(
        agent_log_of("beta").contains("the hub names 2 hubs in its group"),
        "{}",
        agent_log_of("beta")
    );
    wait_for(
        "beta's agent to move to hub a",
        Duration::from_secs(30),
        || {
            let beta = member(&a.status(), "beta").clone();
            (beta["state"] == "connected" && beta["hub"] == member(&a.status(), "alpha")["hub"])
                .then_some(())
        },
    );
    // Said once each: the reason, not "hub declared dead".
    assert_eq!(
        agent_log_of("beta")
            .matches("cannot reach etcd and refuses operators")
            .count(),
        1,
        "{}",
        agent_log_of("beta")
    );

    relay.thaw();
    wait_for(
        "hub b to take tunnels again",
        Duration::from_secs(30),
        || (ready_b().trim() == "ok").then_some(()),
    );
    assert!(
        log().contains("reaches etcd again: taking agents as before"),
        "{}",
        log()
    );
    // Still served: the agent stays where it is.
    assert_eq!(through_a().0, "200");
    assert_eq!(
        support::gateway_get(&b, &bob, "/clusters/alpha/version").0,
        "200",
        "and through b, forwarded to a"
    );
}

/// A hub cut off from etcd hands its agents to a hub that reaches it as
/// soon as its lease there has expired, taking its owner keys with it: its
/// members were out of reach through every other hub from then (~10 s)
/// until its `--store-max-stale` (60 s by default). An outage of etcd for
/// every hub moves no agent, during it or as etcd comes back.
#[test]
fn a_hub_cut_off_from_etcd_hands_its_agents_off_once_its_lease_is_gone() {
    let etcd = Etcd::start();
    let relay = Blackhole::start(etcd.client.clone());
    let (a, b) = (Env::new(), Env::new());
    // Hub a confirms its quiet registry every 5 s (a sixth of 30 s); hub b
    // keeps the default limit.
    let o = up_on_store(&a, &etcd.url, &["--store-max-stale", "30s"]);
    assert!(o.ok(), "{o:?}");
    let o = up_on_store(&b, &format!("http://127.0.0.1:{}", relay.port), &[]);
    assert!(o.ok(), "{o:?}");
    let api = ApiServer::start();
    let machine = Env::new();
    join(&b, &machine, "alpha", &api);
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let through_a = || support::gateway_get(&a, &bob, "/clusters/alpha/version");
    let reached = |what: &str| {
        wait_for(what, Duration::from_secs(30), || {
            (through_a().0 == "200").then_some(())
        })
    };
    reached("bob reaches alpha (on hub b) through hub a");
    let b_id = member(&a.status(), "alpha")["hub"].clone();
    assert!(b_id.is_string(), "{}", a.status());
    let log = || std::fs::read_to_string(b.path("state/towerctl/hub.log")).unwrap_or_default();
    let agent_log = || {
        std::fs::read_to_string(machine.path("state/towerctl/agent-alpha.log")).unwrap_or_default()
    };

    // etcd away for both, past hub b's lease (and not yet past hub a's
    // limit): hub a last reached etcd before b's lease expired.
    etcd.signal("-STOP");
    std::thread::sleep(Duration::from_secs(20));
    etcd.signal("-CONT");
    reached("bob reaches alpha through hub a after the outage");
    std::thread::sleep(Duration::from_secs(5));
    assert!(!log().contains("handing"), "{}", log());
    assert!(
        !agent_log().contains("reconnect to another hub"),
        "{}",
        agent_log()
    );
    assert_eq!(member(&a.status(), "alpha")["hub"], b_id);

    // Hub b alone cut off: alpha's agent moves to hub a well before b's
    // 60 s limit.
    relay.freeze_all();
    let frozen = Instant::now();
    wait_for(
        "alpha's agent to move to hub a",
        Duration::from_secs(45),
        || {
            let alpha = member(&a.status(), "alpha").clone();
            (alpha["state"] == "connected" && alpha["hub"].is_string() && alpha["hub"] != b_id)
                .then_some(())
        },
    );
    eprintln!(
        "alpha's agent moved to hub a {:?} after the partition",
        frozen.elapsed()
    );
    assert_eq!(through_a().0, "200", "bob reaches alpha through hub a");
    assert!(
        log().contains("its lease there last renewed") && !log().contains("refusing operators"),
        "hub b hands off for its lease, before refusing operators: {}",
        log()
    );
    assert!(
        agent_log().contains("its lease there expired"),
        "{}",
        agent_log()
    );

    relay.thaw();
    wait_for(
        "hub b to take agents again",
        Duration::from_secs(30),
        || {
            log()
                .contains("reaches etcd again: taking agents as before")
                .then_some(())
        },
    );
    assert_eq!(through_a().0, "200");
    // Once hub b hears the registry again (its watch found dead and
    // replaced), through b too, forwarded to a.
    wait_for(
        "bob to reach alpha through hub b, forwarded to a",
        Duration::from_secs(30),
        || {
            let (code, body) = support::gateway_get(&b, &bob, "/clusters/alpha/version");
            eprintln!("through b: {code} {body}");
            (code == "200").then_some(())
        },
    );
}

/// Hubs a and b on `etcd`; member beta joined through hub b while b was
/// alone (its join command names only hub b), then told of hub a by hub b.
/// Returns hub a, hub b, the member's machine and its API server.
fn beta_joined_before_hub_a(etcd: &Etcd) -> (Env, Env, Env, ApiServer) {
    let (a, b) = (Env::new(), Env::new());
    hub_up(&b, etcd);
    let api = ApiServer::start();
    let machine = Env::new();
    let command = join(&b, &machine, "beta", &api);
    assert_eq!(
        command.iter().filter(|w| *w == "--hub").count(),
        1,
        "{command:?}"
    );
    hub_up(&a, etcd);
    wait_for(
        "hub b to name hub a to beta's agent",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(machine.path("state/towerctl/agent-beta.log"))
                .unwrap_or_default()
                .contains("the hub names 2 hubs in its group")
                .then_some(())
        },
    );
    (a, b, machine, api)
}

/// An agent joined while its hub was alone, whose join command names only
/// that hub, learns of a hub started later while it stays connected, and
/// fails over to it when its own hub dies.
#[test]
fn an_agent_joined_before_a_second_hub_existed_fails_over_to_it() {
    let etcd = Etcd::start();
    let (a, b, machine, _api) = beta_joined_before_hub_a(&etcd);
    let agent_log = || {
        std::fs::read_to_string(machine.path("state/towerctl/agent-beta.log")).unwrap_or_default()
    };
    assert!(
        !agent_log().contains("tunnel down"),
        "told while connected: {}",
        agent_log()
    );
    let admin = std::fs::read_to_string(a.path("data/towerctl/admin.token")).unwrap();
    let via_a = || support::gateway_get(&a, admin.trim(), "/clusters/beta/version").0;
    wait_for(
        "beta reached through hub a",
        Duration::from_secs(15),
        || (via_a() == "200").then_some(()),
    );
    let b_id = member(&a.status(), "beta")["hub"].clone();
    assert!(b_id.is_string(), "{}", a.status());
    b.kill9("hub");
    let killed = Instant::now();
    wait_for(
        "beta reached through hub a after hub b died",
        Duration::from_secs(30),
        || (via_a() == "200").then_some(()),
    );
    eprintln!(
        "beta back through hub a {:?} after hub b died",
        killed.elapsed()
    );
    let now = member(&a.status(), "beta")["hub"].clone();
    assert!(
        now.is_string() && now != b_id,
        "beta's session is on hub a: {}",
        a.status()
    );
}

/// The tunnel address a hub listens on, from its log's "hub ready" line.
fn tunnel_addr(hub: &Env) -> String {
    let log = std::fs::read_to_string(hub.path("state/towerctl/hub.log")).unwrap_or_default();
    log.lines()
        .rev()
        .find_map(|l| {
            let rest = l.split("hub ready tunnel=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .unwrap_or_else(|| panic!("no 'hub ready' line in the hub's log: {log}"))
}

/// A hub the agent learned of (not in its join command) whose address now
/// belongs to a hub of another group (another host key) is dropped from
/// the agent's list and the agent goes on: it used to stop, as it does
/// when a hub of its join command refuses for good.
#[test]
fn a_learned_hub_whose_address_went_to_another_group_is_dropped_and_the_agent_goes_on() {
    let etcd = Etcd::start();
    let (a, b, machine, _api) = beta_joined_before_hub_a(&etcd);
    let agent_log = || {
        std::fs::read_to_string(machine.path("state/towerctl/agent-beta.log")).unwrap_or_default()
    };
    let (a_addr, b_addr) = (tunnel_addr(&a), tunnel_addr(&b));
    // Hub a dies and its address goes to a hub of no group (its own host
    // key) before hub b's view of the group drops hub a (the lease of a
    // killed hub runs out only after seconds), then hub b dies: the agent
    // dials hub a's address next.
    let told_one = || agent_log().matches("names 1 hub in").count();
    let before = told_one();
    a.kill9("hub");
    let stranger = Env::new();
    let o = stranger.towerctl(&[
        "up",
        "--listen",
        &a_addr,
        "--gateway",
        "127.0.0.1:0",
        "--metrics",
        "off",
    ]);
    assert!(o.ok(), "a hub on hub a's address: {o:?}");
    // Hub a's lease (10 s, renewed every 3 s) still lists it: if starting
    // the other hub took longer, hub b has told the agent hub a is gone,
    // and what follows tests nothing.
    assert_eq!(
        told_one(),
        before,
        "hub b dropped hub a from the agent's list before hub b was killed: {}",
        agent_log()
    );
    b.kill9("hub");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent_log().contains("not dialed again") {
        assert!(
            Instant::now() < deadline,
            "beta's agent did not drop hub a's address within 20 s: {}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = machine.pid_of("agent-beta").expect("the agent's pid file");
    let dropped = agent_log();
    assert!(
        dropped.contains("host key") && dropped.contains(&a_addr),
        "dropped for the host key, naming the address: {dropped}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists() && !support::is_zombie(pid),
        "the agent stopped: {}",
        agent_log()
    );
    // Hub b back on its address: the agent, still running, is served again.
    let o = up_on_store_at(&b, &etcd.url, &b_addr, &[]);
    assert!(o.ok(), "hub b again: {o:?}");
    let admin = std::fs::read_to_string(b.path("data/towerctl/admin.token")).unwrap();
    wait_for(
        "beta reached through hub b again",
        Duration::from_secs(45),
        || {
            (support::gateway_get(&b, admin.trim(), "/clusters/beta/version").0 == "200")
                .then_some(())
        },
    );
    let after = agent_log();
    assert_eq!(
        after.matches("not dialed again").count(),
        1,
        "hub a's address dialed again: {after}"
    );
}

/// A hub whose etcd member has lost its quorum (the two others stopped)
/// is not confirmed by that member: it still opens watches and answers
/// serializable reads, but nothing that needs the quorum. Past
/// `--store-max-stale` the hub refuses operators; once the quorum is back
/// it serves them again.
#[test]
fn an_etcd_member_without_its_quorum_does_not_keep_a_hub_serving() {
    let etcd = etcd_cluster();
    let hub = Env::new();
    let o = up_on_store(&hub, &etcd[2].url, &["--store-max-stale", "3s"]);
    assert!(o.ok(), "{o:?}");
    let bob = operator_token(&hub, "bob");
    let whoami = || support::gateway_get(&hub, &bob, "/towerctl/v1/whoami").0;
    let wait_answer = |what: &str, code: &str, secs: u64| {
        wait_for(what, Duration::from_secs(secs), || {
            (whoami() == code).then_some(())
        })
    };
    wait_answer("bob served", "200", 10);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        whoami(),
        "200",
        "a quiet registry with its quorum stays confirmed"
    );

    etcd[0].signal("-STOP");
    etcd[1].signal("-STOP");
    let stopped = Instant::now();
    // Member 2 still answers what needs no quorum.
    assert!(etcd_post(
        &etcd[2].client,
        "/v3/kv/range",
        r#"{"key":"AA==","serializable":true}"#
    )
    .is_some());
    wait_answer("bob refused", "503", 20);
    eprintln!(
        "bob refused {:?} after the quorum was lost",
        stopped.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        whoami(),
        "503",
        "still refused: the member alone confirms nothing"
    );

    etcd[0].signal("-CONT");
    etcd[1].signal("-CONT");
    wait_answer("bob served again", "200", 30);
}

/// Access rules this hub cannot read (a newer hub's shape during an
/// upgrade, a hand edit) refuse every operator but the local admin at
/// once: the rules read before stayed in force (a narrowed grant, a new
/// deny rule) until the staleness limit, 60 s by default. Read again, they
/// apply again. An operator record it cannot read is one operator it does
/// not know: the others are read as before, so an operator removed on
/// another hub meanwhile is refused here too (the whole list failed to
/// load, and the removed operator stayed valid until that limit).
#[test]
fn access_rules_or_operators_this_hub_cannot_read_refuse_operators() {
    let etcd = Etcd::start();
    let [a, b]: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    join(&a, &a, "alpha", &api);
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let admin = std::fs::read_to_string(a.path("data/towerctl/admin.token")).unwrap();
    let admin = admin.trim();
    let get = |token: &str| support::gateway_get(&a, token, "/clusters/alpha/version");
    let wait_code = |what: &str, token: &str, code: &str| {
        wait_for(what, Duration::from_secs(10), || {
            let (c, body) = get(token);
            (c == code).then_some(body)
        })
    };
    wait_code("bob reaches alpha", &bob, "200");

    let key = "/towerctl/settings/access";
    let rules = etcd_json(&etcd, key).expect("the access rules in etcd");
    let mut newer = rules.clone();
    newer["rules"]
        .as_array_mut()
        .expect("a list of rules")
        .push(serde_json::json!({"id": 99, "effect": "audit", "subject": {"operator": "bob"}, "clusters": ""}));
    etcd_put_json(&etcd, key, &newer);
    wait_code("bob refused under rules this hub cannot read", &bob, "403");
    let log = std::fs::read_to_string(a.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(
        log.contains("access rules in the registry are unreadable"),
        "the hub's log says why: {log}"
    );
    assert_eq!(get(admin).0, "200", "the local admin");
    let o = a.towerctl(&["access", "list"]);
    assert!(!o.ok() && o.stderr.contains("cannot be read"), "{o:?}");
    etcd_put_json(&etcd, key, &rules);
    wait_code("bob reaches alpha once the rules are read", &bob, "200");

    let corrupt = "/towerctl/operators/zz-unreadable";
    etcd_put_json(&etcd, corrupt, &serde_json::json!("not an operator"));
    let log = || std::fs::read_to_string(a.path("state/towerctl/hub.log")).unwrap_or_default();
    wait_for("hub a to read the record", Duration::from_secs(10), || {
        log()
            .contains("an operator record this hub cannot read is left out")
            .then_some(())
    });
    assert_eq!(get(&bob).0, "200", "bob, whose record reads");
    assert_eq!(get(admin).0, "200", "the local admin");
    // Changes read the whole list: refused on such a record, naming it.
    let o = b.towerctl(&["operator", "rm", "bob"]);
    assert!(!o.ok() && o.stderr.contains("zz-unreadable"), "{o:?}");
    // A hub starts with such a record in the registry (its start removes
    // its own stale admin tokens: it read the whole list, and failed),
    // even its own admin's (written again).
    assert!(b.towerctl(&["down"]).ok());
    let b_admin = std::fs::read_to_string(b.path("data/towerctl/admin.token")).unwrap();
    let own = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b_admin.trim().as_bytes());
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        format!("/towerctl/operators/sha256:{hex}")
    };
    assert!(
        etcd_json(&etcd, &own).is_some(),
        "hub b's admin record at {own}"
    );
    etcd_put_json(&etcd, &own, &serde_json::json!(["not", "an", "operator"]));
    hub_up(&b, &etcd);
    wait_for("hub b's admin served", Duration::from_secs(10), || {
        (support::gateway_get(&b, b_admin.trim(), "/towerctl/v1/whoami").0 == "200").then_some(())
    });
    // Bob removed by a hub that reads every record (a newer one).
    let (bobs, _) = etcd_under(&etcd, "/towerctl/operators/")
        .into_iter()
        .find(|(_, v)| v["name"] == "bob")
        .expect("bob's record");
    etcd_delete(&etcd, &bobs);
    wait_code("bob, removed by another hub, refused on hub a", &bob, "401");
    etcd_delete(&etcd, corrupt);
}

/// A member record a hub cannot read (edited by hand, or a newer hub's
/// with a field this one does not know, such as a new restriction) is one
/// member it refuses: the others are listed and served as before (one such
/// record emptied every list, and each registry change cut every operator's
/// streams), and the record is never written back without its field.
#[test]
fn a_member_record_this_hub_cannot_read_refuses_that_member_alone() {
    let etcd = Etcd::start();
    let [a]: [Env; 1] = hubs_on(&etcd);
    let api = ApiServer::start();
    join(&a, &a, "alpha", &api);
    assert!(a.towerctl(&["cluster", "add", "beta"]).ok());
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha,beta"]);
    assert!(o.ok(), "{o:?}");
    let get = |token: &str, path: &str| support::gateway_get(&a, token, path);
    wait_for("bob reaches alpha", Duration::from_secs(10), || {
        (get(&bob, "/clusters/alpha/version").0 == "200").then_some(())
    });

    // beta's record with a field this hub does not know, and a record that
    // is no member at all.
    let key = "/towerctl/members/beta";
    let mut newer = etcd_json(&etcd, key).expect("beta's record");
    newer["suspended"] = serde_json::json!(true);
    etcd_put_json(&etcd, key, &newer);
    let corrupt = "/towerctl/members/zz-bad";
    etcd_put_json(&etcd, corrupt, &serde_json::json!("not a member"));
    let log = || std::fs::read_to_string(a.path("state/towerctl/hub.log")).unwrap_or_default();
    wait_for("hub a to read the records", Duration::from_secs(10), || {
        log()
            .contains("a member record this hub cannot read is left out")
            .then_some(())
    });
    let o = a.towerctl(&["cluster", "list"]);
    assert!(
        o.ok() && o.stdout.contains("alpha") && !o.stdout.contains("beta"),
        "{o:?}"
    );
    assert_eq!(get(&bob, "/clusters/alpha/version").0, "200", "alpha");
    let (code, body) = get(&bob, "/clusters/beta/version");
    assert!(code != "200" && code != "404", "beta: {code} {body}");
    // A change to it fails, and leaves the record as it was.
    let o = a.towerctl(&["cluster", "label", "beta", "env=dev"]);
    assert!(!o.ok(), "{o:?}");
    assert_eq!(
        etcd_json(&etcd, key).expect("beta's record")["suspended"],
        true,
        "the field this hub does not know was written away"
    );
    etcd_put_json(&etcd, key, &{
        let mut v = newer.clone();
        v.as_object_mut().unwrap().remove("suspended");
        v
    });
    etcd_delete(&etcd, corrupt);
    wait_for("beta listed again", Duration::from_secs(10), || {
        a.towerctl(&["cluster", "list"])
            .stdout
            .contains("beta")
            .then_some(())
    });
}

/// Access rules changed on two hubs keep both changes, even when one hub's
/// copy of the rules is behind (its watch delayed, as above, or two
/// changes at the same moment): a `deny` written on one hub used to be
/// overwritten by the other hub's next change, made on its older copy.
#[test]
fn access_rules_changed_on_two_hubs_keep_both_changes() {
    let (_etcd, relay, a, b) = hubs_behind_a_relay();
    // Hub b hears nothing more of the registry for a while.
    relay.freeze();
    let o = a.towerctl(&["access", "deny", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let o = b.towerctl(&["access", "allow", "group:dev", "--names", "beta"]);
    assert!(o.ok(), "{o:?}");
    let o = a.towerctl(&["access", "list"]);
    assert!(
        o.stdout.contains("bob") && o.stdout.contains("dev"),
        "a change was lost: {o:?}"
    );
    // Both numbered apart.
    let ids: Vec<&str> = o
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.trim_start_matches('#').parse::<u32>().is_ok())
        .collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "{o:?}");
}

/// Two hubs on machines with the same host name and the same gateway port
/// (stock images, the default port; here two loopback addresses) are two
/// hubs: each keeps its admin token, and each reaches a member the other
/// holds. They used to share one id: the second removed the first one's
/// admin token as its own stale one.
#[test]
fn hubs_on_machines_with_the_same_host_name_stay_apart() {
    let etcd = Etcd::start();
    let port = free_port();
    let (a, b) = (Env::new(), Env::new());
    for (env, ip) in [(&a, "127.0.0.1"), (&b, "127.0.0.2")] {
        let gateway = format!("{ip}:{port}");
        let listen = format!("{ip}:0");
        let o = env.towerctl(&[
            "up",
            "--listen",
            &listen,
            "--gateway",
            &gateway,
            "--keepalive",
            "1s",
            "--metrics",
            "off",
            "--store",
            &etcd.url,
        ]);
        assert!(o.ok(), "{o:?}");
    }
    let _api = alpha_on_a_reached_through_both(&a, &b);
    let ids: Vec<String> = [&a, &b]
        .iter()
        .map(|h| std::fs::read_to_string(h.path("data/towerctl/hub.id")).unwrap())
        .collect();
    assert_ne!(ids[0], ids[1]);
}

/// A hub started from a copy of another hub's data directory (a cloned
/// machine or volume) brought the first one's `hub.id` along: the two
/// overwrote each other's record, each took the other's sessions for its
/// own, and a member held by one could not be reached through the other.
#[test]
fn a_hub_started_from_a_copied_data_directory_takes_its_own_id() {
    let etcd = Etcd::start();
    let (a, b) = (Env::new(), Env::new());
    hub_up(&a, &etcd);
    let from = a.path("data/towerctl");
    let to = b.path("data");
    std::fs::create_dir_all(&to).unwrap();
    let o = support::run_bounded(
        {
            let mut c = Command::new("cp");
            c.arg("-a").arg(&from).arg(&to);
            c
        },
        Duration::from_secs(10),
    );
    assert!(o.ok(), "{o:?}");
    let id_of = |h: &Env| std::fs::read_to_string(h.path("data/towerctl/hub.id")).unwrap();
    assert_eq!(id_of(&a), id_of(&b), "the copy did not bring hub.id along");
    hub_up(&b, &etcd);
    assert_ne!(id_of(&a), id_of(&b), "both hubs kept one id");
    let log = std::fs::read_to_string(b.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(
        log.contains("is in use by another live hub")
            && log.contains("this data directory was copied"),
        "the copy did not say why it changed its id: {log}"
    );
    let _api = alpha_on_a_reached_through_both(&a, &b);
    // Alpha's tunnel is up on a only; through both it can be reached.
    let up = "towerctl_tunnel_up{cluster=\"alpha\"}";
    let reachable = "towerctl_member_reachable{cluster=\"alpha\"}";
    let (ma, mb) = (support::metrics_addr(&a), support::metrics_addr(&b));
    assert_eq!(
        (support::metric(&ma, up), support::metric(&ma, reachable)),
        (1, 1)
    );
    assert_eq!(
        (support::metric(&mb, up), support::metric(&mb, reachable)),
        (0, 1)
    );
    // A restart keeps the id it has now (its own record is not another hub's).
    let kept = id_of(&b);
    assert!(b.towerctl(&["down"]).ok());
    hub_up(&b, &etcd);
    assert_eq!(id_of(&b), kept, "a restart changed the hub id");
}

/// A member registered on one hub cannot be registered again on another
/// whose copy of the registry is behind: the second `cluster add` used to
/// succeed and overwrite the first, whose printed join token then failed.
#[test]
fn a_member_is_registered_once_across_hubs() {
    let (_etcd, relay, a, b) = hubs_behind_a_relay();
    relay.freeze();
    let o = a.towerctl(&["cluster", "add", "gamma"]);
    assert!(o.ok(), "{o:?}");
    let o = b.towerctl(&["cluster", "add", "gamma"]);
    assert!(
        !o.ok() && o.all().contains("already registered"),
        "registered twice: {o:?}"
    );
}

/// A TCP load balancer on loopback: each connection goes to the next of
/// `to`, in turn. Its threads end with their connections (or after 5
/// minutes).
fn round_robin(to: Vec<String>) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, a) in l.incoming().enumerate() {
            let Ok(a) = a else { return };
            let Ok(b) = TcpStream::connect(&to[n % to.len()]) else {
                continue;
            };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                std::thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_secs(300)))
                        .unwrap();
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

/// Several hubs behind one load balancer, whose URL each hub writes into
/// kubeconfigs (`--gateway-url`): a request the balancer sends to a hub
/// that does not hold its member's tunnel is forwarded to the hub that
/// does at that hub's own address (`--peer-url`). Before, the other hubs
/// were given the balancer's URL too, so a forwarded request went back
/// through the balancer, half of the time to a hub without the tunnel,
/// and failed. A second hub that would be reached at the same URL as a
/// live one is refused, naming `--peer-url`.
#[test]
fn hubs_behind_one_load_balancer_forward_to_each_others_own_address() {
    let etcd = Etcd::start();
    let (a, b) = (Env::new(), Env::new());
    let (ga, gb) = (free_port(), free_port());
    // Hub b twice in three: a connection hub b makes through the balancer
    // after an operator's (its first forward) goes back to hub b.
    let (to_a, to_b) = (format!("127.0.0.1:{ga}"), format!("127.0.0.1:{gb}"));
    let lb = round_robin(vec![to_a, to_b.clone(), to_b]);
    let lb_url = format!("https://127.0.0.1:{lb}");
    let up = |env: &Env, gw: u16, extra: &[&str]| {
        let gateway = format!("127.0.0.1:{gw}");
        let mut args = vec![
            "up",
            "--listen",
            "127.0.0.1:0",
            "--gateway",
            &gateway,
            "--gateway-url",
            &lb_url,
            "--keepalive",
            "1s",
            "--metrics",
            "off",
            "--store",
            &etcd.url,
        ];
        args.extend_from_slice(extra);
        support::run_bounded(env.towerctl_cmd(&args), Duration::from_secs(60))
    };
    let peer_a = format!("https://127.0.0.1:{ga}");
    let o = up(&a, ga, &["--peer-url", &peer_a]);
    assert!(o.ok(), "{o:?}");
    // Hub b without --peer-url would be reached at the balancer's URL,
    // as hub a is not: taken. With a's own address (written otherwise):
    // said, in so many words.
    let o = up(&b, gb, &["--peer-url", &format!("https://127.0.0.1:{ga}/")]);
    assert!(o.ok(), "{o:?}");
    let log = std::fs::read_to_string(b.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("is reached by the other hubs at {peer_a} too"))
            && log.contains("--peer-url https://HOST:PORT"),
        "{log}"
    );
    assert!(b.towerctl(&["down"]).ok());
    let o = up(&b, gb, &["--peer-url", &format!("https://127.0.0.1:{gb}")]);
    assert!(o.ok(), "{o:?}");
    // A URL with a path is no peer URL.
    let o = b.towerctl(&["up", "--store", &etcd.url, "--peer-url", "https://h:1/x"]);
    assert!(
        !o.ok() && o.stderr.contains("scheme, host and port"),
        "{o:?}"
    );

    let api = ApiServer::start();
    let machine = Env::new();
    join(&a, &machine, "alpha", &api);
    let bob = operator_token(&a, "bob");
    let o = a.towerctl(&["access", "allow", "operator:bob", "--names", "alpha"]);
    assert!(o.ok(), "{o:?}");
    assert_eq!(b.status()["hub"]["gatewayURL"], lb_url.as_str());
    wait_for(
        "hub b to learn where alpha is",
        Duration::from_secs(15),
        || {
            member(&b.status(), "alpha")["hub"]
                .is_string()
                .then_some(())
        },
    );
    // Every request through the balancer: two in three land on hub b.
    for n in 0..12 {
        let (code, body) = support::gateway_get(&a, &bob, "/clusters/alpha/version");
        assert_eq!(code, "200", "request {n} through the balancer: {body}");
    }
}

/// The admin token of a hub that is gone (stopped for good, or restarted
/// with a data directory it did not keep: a new id and a new admin.token)
/// stops working once the hub has had no live record for
/// `TOWERCTL_ADMIN_ORPHAN_AFTER`; it used to stay a valid `system:masters`
/// credential for good, and `operator rm admin` cannot remove it. A hub
/// that comes back writes its own again, and one whose admin row was
/// removed while it ran writes it back.
#[test]
fn a_gone_hubs_admin_token_stops_working_and_a_hub_keeps_its_own() {
    let etcd = Etcd::start();
    let (a, b) = (Env::new(), Env::new());
    let mut up_a = up_cmd(&a, &etcd.url, "127.0.0.1:0", &[]);
    up_a.env("TOWERCTL_ADMIN_ORPHAN_AFTER", "2");
    let o = support::run_bounded(up_a, Duration::from_secs(60));
    assert!(o.ok(), "{o:?}");
    hub_up(&b, &etcd);
    let token_of = |hub: &Env| {
        std::fs::read_to_string(hub.path("data/towerctl/admin.token"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (a_admin, b_admin) = (token_of(&a), token_of(&b));
    // Through hub a: an unknown member is a 404 for a valid admin token,
    // a 401 for one that is not.
    let through_a = |token: &str| support::gateway_get(&a, token, "/clusters/nope/version").0;
    wait_for(
        "hub a to know hub b's admin",
        Duration::from_secs(10),
        || (through_a(&b_admin) == "404").then_some(()),
    );
    assert_eq!(through_a("top_not-a-token"), "401");

    // Hub b stops (its record goes with its lease): past the limit and a
    // round of hub a's, b's admin token is refused everywhere.
    assert!(b.towerctl(&["down"]).ok());
    let gone = Instant::now();
    wait_for(
        "hub b's admin token to stop working",
        Duration::from_secs(30),
        || (through_a(&b_admin) == "401").then_some(()),
    );
    eprintln!(
        "hub b's admin token refused {:?} after it stopped",
        gone.elapsed()
    );
    let log = std::fs::read_to_string(a.path("state/towerctl/hub.log")).unwrap_or_default();
    assert!(log.contains("removed the admin token of hub"), "{log}");
    assert_eq!(through_a(&a_admin), "404", "hub a's own still works");

    // Hub b back with its data directory: its admin token works again.
    hub_up(&b, &etcd);
    wait_for("hub b's admin token back", Duration::from_secs(10), || {
        (through_a(&b_admin) == "404").then_some(())
    });

    // Hub a's own row removed behind its back: written again.
    let a_id = std::fs::read_to_string(a.path("data/towerctl/hub.id"))
        .unwrap()
        .trim()
        .to_string();
    let body = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(b"/towerctl/operators/"),
        b64(b"/towerctl/operators0")
    );
    let answer = etcd_post(&etcd.client, "/v3/kv/range", &body).unwrap();
    let (_, json) = answer.split_once("\r\n\r\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let key = v["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| {
            use base64::Engine;
            let value = base64::engine::general_purpose::STANDARD
                .decode(kv["value"].as_str().unwrap())
                .unwrap();
            let op: serde_json::Value = serde_json::from_slice(&value).unwrap();
            op["name"] == "admin" && op["hub"] == a_id.as_str()
        })
        .map(|kv| kv["key"].as_str().unwrap().to_string())
        .expect("hub a's admin row");
    let del = format!(r#"{{"key":"{key}"}}"#);
    assert!(etcd_post(&etcd.client, "/v3/kv/deleterange", &del).is_some());
    wait_for("hub a's admin row gone", Duration::from_secs(10), || {
        (through_a(&a_admin) == "401").then_some(())
    });
    wait_for(
        "hub a's admin row written again",
        Duration::from_secs(20),
        || (through_a(&a_admin) == "404").then_some(()),
    );
}

/// `N` different loopback ports outside the kernel's ephemeral range (so
/// that no other test's outgoing connection takes one meanwhile), free
/// now.
fn quiet_ports<const N: usize>() -> [u16; N] {
    let mut got: Vec<u16> = Vec::new();
    while got.len() < N {
        let p = 20_000 + (rand_u16() % 10_000);
        if !got.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            got.push(p);
        }
    }
    got.try_into().unwrap()
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

/// One plain HTTP GET on loopback `port`: the status and the body.
fn http_get(port: u16, path: &str, upgrade: bool) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let extra = if upgrade {
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: hub\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// A hub started before its etcd (a pod, a compose file, a boot) waits for
/// it instead of exiting: its tunnel port answers `/healthz` 200 and
/// `/readyz` and agents' upgrades 503, its log says why, and once etcd
/// answers it starts and serves. A signal while it waits stops it at once;
/// `towerctl up` gives up after its 20 s naming etcd.
#[test]
fn a_hub_started_before_its_etcd_waits_for_it_then_serves() {
    let [cp, pp, nowhere_port, tport] = quiet_ports::<4>();
    let store = format!("etcd://127.0.0.1:{cp}");

    // `towerctl up` meanwhile, in its own installation, on an etcd that
    // never comes.
    let up_env = Env::new();
    let up = {
        let nowhere = format!("etcd://127.0.0.1:{nowhere_port}");
        let cmd = up_cmd(&up_env, &nowhere, "127.0.0.1:0", &[]);
        std::thread::spawn(move || {
            let t = Instant::now();
            (
                support::run_bounded(cmd, Duration::from_secs(60)),
                t.elapsed(),
            )
        })
    };

    let hub = Env::new();
    let listen = format!("127.0.0.1:{tport}");
    let mut run = hub.towerctl_cmd(&[
        "hub",
        "run",
        "--listen",
        &listen,
        "--gateway",
        "127.0.0.1:0",
        "--metrics",
        "off",
        "--store",
        &store,
    ]);
    run.env("RUST_LOG", "info");
    let waiting = support::Streaming::start(run);
    waiting.wait_for("waiting for it", Duration::from_secs(15));
    assert!(
        waiting
            .output()
            .contains(&format!("etcd at 127.0.0.1:{cp} did not answer")),
        "{}",
        waiting.output()
    );
    assert_eq!(http_get(tport, "/healthz", false).map(|r| r.0), Some(200));
    let (status, body) = http_get(tport, "/readyz", false).expect("an answer to /readyz");
    assert!(
        status == 503 && body.contains("waits for etcd"),
        "{status} {body}"
    );
    let (status, _) = http_get(tport, "/tunnel", true).expect("an answer to an upgrade");
    assert_eq!(status, 503, "an agent is told to come back");
    let o = hub.towerctl(&["status"]);
    assert!(
        o.stdout.contains("HUB  not answering (pid") && o.stdout.contains("waits for it at start"),
        "{o:?}"
    );
    // A registry command meanwhile says the hub is starting, not that
    // none runs (whose advice, 'towerctl up', would start a second).
    let o = hub.towerctl(&["cluster", "list"]);
    assert!(
        !o.ok() && o.stderr.contains("is starting") && !o.stderr.contains("towerctl up"),
        "{o:?}"
    );

    // Another hub waiting: a signal stops it at once.
    let other = Env::new();
    let mut run_other = other.hub_run_cmd();
    run_other.args(["--store", &store]);
    let mut stopped = support::Streaming::start(run_other);
    stopped.wait_for("waiting for it", Duration::from_secs(15));
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &stopped.pid().to_string()])
        .status()
        .unwrap()
        .success());
    wait_for(
        "the waiting hub to stop on SIGTERM",
        Duration::from_secs(3),
        || stopped.has_exited().then_some(()),
    );
    eprintln!("stopped {:?} after SIGTERM", t.elapsed());

    // One started by `towerctl up` (no control socket yet): `towerctl
    // down` stops it at once too (it waited 10 s for the socket's answer).
    let downed = Env::new();
    let downed_up = {
        let cmd = up_cmd(&downed, &store, "127.0.0.1:0", &[]);
        std::thread::spawn(move || support::run_bounded(cmd, Duration::from_secs(60)))
    };
    wait_for(
        "the hub of 'up' to wait for etcd",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(downed.path("state/towerctl/hub.log"))
                .ok()?
                .contains("waiting for it")
                .then_some(())
        },
    );
    let t = Instant::now();
    let o = downed.towerctl(&["down"]);
    assert!(o.ok() && o.stdout.contains("hub stopped"), "{o:?}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "down took {:?}",
        t.elapsed()
    );
    assert!(!downed_up.join().unwrap().ok(), "up reports the hub gone");

    // etcd comes up on its ports: the hub starts and serves.
    let etcd = Etcd::spawn_member("t", cp, pp, &format!("t=http://127.0.0.1:{pp}"), None);
    wait_for("etcd to answer", Duration::from_secs(30), || {
        etcd.answers(None).then_some(())
    });
    wait_for("the hub to be ready", Duration::from_secs(20), || {
        (http_get(tport, "/readyz", false)?.0 == 200).then_some(())
    });
    assert!(
        waiting.output().contains("etcd answered after"),
        "{}",
        waiting.output()
    );
    let o = hub.towerctl(&["cluster", "add", "alpha"]);
    assert!(o.ok(), "the registry works: {o:?}");

    let (o, took) = up.join().unwrap();
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("did not become ready within 20s")
            && o.stderr.contains("did not answer")
            && o.stderr.contains("so it was stopped"),
        "up names why: {o:?}"
    );
    assert!(took < Duration::from_secs(40), "{took:?}");
}

/// A process started by a test, killed if the test ends early.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Status code of `GET path` on `addr`, or `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut c = TcpStream::connect(addr).ok()?;
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

/// `towerctl up --print-manifest` for a hub on an etcd that requires client
/// certificates, then the printed pod run as the kubelet would run it: its
/// args and env (`$(POD_NAME)` expanded), its volumes as directories (the
/// Secret's files written out, the data claim, the scratch emptyDir), and
/// nothing else of this machine. It must come up ready on the probes'
/// paths, serve `kubectl exec … towerctl` (cluster and operator add, with
/// the pod's env) and a member through it, and on SIGTERM stop within its
/// termination grace, not ready first.
#[test]
fn a_hub_runs_as_its_printed_statefulset_runs_it() {
    let pki = EtcdPki::new();
    let etcd = Etcd::start_with(Some(&pki));
    let (tp, gp) = (free_port(), free_port());
    let (listen, gateway) = (format!("0.0.0.0:{tp}"), format!("0.0.0.0:{gp}"));
    let (advertise, gateway_url) = (
        format!("ws://127.0.0.1:{tp}"),
        format!("https://127.0.0.1:{gp}"),
    );
    let (ca, cert, key) = (
        pki.file("ca.pem"),
        pki.file("client.pem"),
        pki.file("client-key.pem"),
    );
    let printer = Env::new();
    let o = printer.towerctl(&[
        "up",
        "--print-manifest",
        "--replicas",
        "1",
        "--listen",
        &listen,
        "--gateway",
        &gateway,
        "--keepalive",
        "1s",
        "--shutdown-delay",
        "2s",
        "--advertise",
        &advertise,
        "--gateway-url",
        &gateway_url,
        "--store",
        &etcd.url,
        "--store-ca",
        &ca,
        "--store-cert",
        &cert,
        "--store-key",
        &key,
    ]);
    assert!(o.ok(), "{o:?}");
    let docs: Vec<serde_json::Value> = o
        .stdout
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let secret = docs.iter().find(|d| d["kind"] == "Secret").unwrap();
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let pod_name = format!("{}-0", sts["metadata"]["name"].as_str().unwrap());

    // The pod's volumes as directories under one short root (the control
    // socket's path must stay under the limit of Unix socket paths).
    let root = tempfile::Builder::new()
        .prefix("twpod")
        .tempdir_in("/tmp")
        .unwrap();
    let mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_string(),
                m["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let host_path = |p: &str| -> String {
        let (m, _) = mounts
            .iter()
            .find(|(m, _)| p == m || p.starts_with(&format!("{m}/")))
            .unwrap_or_else(|| panic!("{p} is on no volume of the pod"));
        format!("{}{m}{}", root.path().display(), &p[m.len()..])
    };
    for (m, name) in &mounts {
        let dir = host_path(m);
        std::fs::create_dir_all(&dir).unwrap();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name.as_str());
        if let Some(s) = volume.and_then(|v| v["secret"].as_object()) {
            assert_eq!(s["secretName"], secret["metadata"]["name"]);
            for (file, pem) in secret["stringData"].as_object().unwrap() {
                std::fs::write(format!("{dir}/{file}"), pem.as_str().unwrap()).unwrap();
            }
        }
    }
    // As the kubelet does: `$(POD_NAME)` expanded, `$$` a `$`.
    let expand = |s: &str| {
        s.replace("$$", "\u{0}")
            .replace("$(POD_NAME)", &pod_name)
            .replace('\u{0}', "$")
    };
    let pod_env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e["value"].as_str() {
                Some(v) if v.starts_with('/') => host_path(v),
                Some(v) => v.to_string(),
                None => {
                    assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
                    pod_name.clone()
                }
            };
            (name, value)
        })
        .collect();
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = expand(a.as_str().unwrap());
            // Paths in the pod's volumes (not --store-prefix=/towerctl/).
            match a.split_once("=/") {
                Some((flag, path))
                    if mounts
                        .iter()
                        .any(|(m, _)| format!("/{path}").starts_with(m)) =>
                {
                    format!("{flag}={}", host_path(&format!("/{path}")))
                }
                _ => a,
            }
        })
        .collect();
    let in_pod = |args: &[&str]| -> Command {
        let mut cmd = Command::new(support::TOWERCTL);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(pod_env.iter().map(|(k, v)| (k, v)))
            .args(args);
        cmd
    };
    let log = root.path().join("hub.log");
    let mut hub = in_pod(&args.iter().map(String::as_str).collect::<Vec<_>>());
    hub.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut hub = Killed(hub.spawn().unwrap());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The probes, on the named port's path.
    let port_of = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    let probe = |which: &str| {
        let get = &c[which]["httpGet"];
        let addr = format!("127.0.0.1:{}", port_of(get["port"].as_str().unwrap()));
        http_status(&addr, get["path"].as_str().unwrap())
    };
    let started = Instant::now();
    while probe("readinessProbe") != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(30) && hub.0.try_wait().unwrap().is_none(),
            "the pod's hub never became ready; its log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(probe("livenessProbe"), Some(200));

    // `kubectl exec POD -- towerctl …` runs with the container's env.
    let exec = |args: &[&str]| support::run_bounded(in_pod(args), Duration::from_secs(60));
    let o = exec(&["cluster", "add", "alpha"]);
    assert!(o.ok(), "cluster add in the pod: {o:?}\n{}", log_text());
    let join = support::printed_command(&o.stdout, "join");
    assert!(
        join.contains(&advertise),
        "agents dial --advertise: {join:?}"
    );
    let api = ApiServer::start();
    let member = Env::new();
    let kc = member.path("alpha.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = member.join(
        &join,
        &["--kubeconfig", kc.to_str().unwrap(), "--keepalive", "1s"],
    );
    assert!(o.ok() && o.stdout.contains("the tunnel is up"), "{o:?}");
    let o = exec(&["operator", "add", "alice"]);
    assert!(o.ok(), "operator add in the pod: {o:?}");
    assert!(exec(&["access", "allow", "operator:alice", "--names", "alpha"]).ok());
    let login = support::printed_command(&o.stdout, "login");
    assert!(login.contains(&gateway_url), "{login:?}");
    let laptop = Env::new();
    let o = laptop.towerctl(&login.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.ok(), "login: {o:?}");
    assert!(laptop.towerctl(&["use", "alpha"]).ok());
    assert!(reaches(&laptop, "alpha"), "kubectl through the pod's hub");

    // SIGTERM, as the kubelet stops a pod: not ready at once, still alive
    // for the readiness grace, then gone within the termination grace.
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let stopped = Instant::now();
    unsafe { libc::kill(hub.0.id() as i32, libc::SIGTERM) };
    wait_for(
        "readiness to fail after SIGTERM",
        Duration::from_secs(3),
        || (probe("readinessProbe") == Some(503)).then_some(()),
    );
    assert_eq!(probe("livenessProbe"), Some(200), "still alive meanwhile");
    loop {
        if let Some(status) = hub.0.try_wait().unwrap() {
            assert!(status.success(), "{status}; log:\n{}", log_text());
            break;
        }
        assert!(
            stopped.elapsed() < grace,
            "the hub outlived its termination grace ({grace:?}); the kubelet would SIGKILL it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A hub that ran alone before joins a group: the group's CA and host key
/// win (every hub must serve the same), and its own are kept beside them
/// (`F.pre-group`), so that a wrong `--store` loses nothing.
#[test]
fn a_hub_that_ran_alone_keeps_its_own_ca_and_host_key_when_it_joins_a_group() {
    let etcd = Etcd::start();
    let a = Env::new();
    hub_up(&a, &etcd);
    let b = Env::new();
    b.up();
    let file = |env: &Env, f: &str| std::fs::read(env.path(&format!("data/towerctl/{f}"))).unwrap();
    let (own_ca, own_host) = (file(&b, "ca.key"), file(&b, "host_key"));
    assert_ne!(own_ca, file(&a, "ca.key"));
    let o = b.towerctl(&["down"]);
    assert!(o.ok(), "{o:?}");
    hub_up(&b, &etcd);
    assert_eq!(file(&b, "ca.key"), file(&a, "ca.key"));
    assert_eq!(file(&b, "host_key"), file(&a, "host_key"));
    assert_eq!(file(&b, "ca.key.pre-group"), own_ca);
    assert_eq!(file(&b, "host_key.pre-group"), own_host);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(b.path("data/towerctl/ca.key.pre-group"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

/// etcd emptied under a running hub (a fresh etcd where the old one was,
/// or a restore from a backup older than the group): the members' agents
/// are neither cut as "removed" nor refused (each would stop for good,
/// every member to be joined again by hand), and all is as before once
/// the records are back.
#[test]
fn an_emptied_etcd_stops_no_agent_and_its_records_back_are_served() {
    let etcd = Etcd::start();
    let [hub, other]: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let member = Env::new();
    join(&hub, &member, "alpha", &api);
    assert!(hub.towerctl(&["use", "alpha"]).ok());
    wait_for("alpha reached", Duration::from_secs(20), || {
        reaches(&hub, "alpha").then_some(())
    });
    // Every key under the prefix, raw, to put back later.
    let range = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(b"/towerctl/"),
        b64(b"/towerctl0")
    );
    // By curl: an answer this long comes chunked.
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "5", "-X", "POST", "-d", &range])
        .arg(format!("http://{}/v3/kv/range", etcd.client));
    let o = support::run_bounded(c, Duration::from_secs(10));
    let saved: serde_json::Value = serde_json::from_str(&o.stdout).expect("etcd's range");
    let saved = saved["kvs"].as_array().unwrap().clone();
    assert!(saved.len() >= 3, "{saved:?}");
    assert!(etcd_post(&etcd.client, "/v3/kv/deleterange", &range).is_some());

    let log = || std::fs::read_to_string(hub.path("state/towerctl/hub.log")).unwrap_or_default();
    wait_for(
        "the hub to see the registry lost",
        Duration::from_secs(10),
        || {
            log()
                .contains("is not the one this hub joined")
                .then_some(())
        },
    );
    // The other hub restarted meanwhile puts back its copy of the group's
    // CA (the same bytes): still no member listed, still lost.
    assert!(other.towerctl(&["down"]).ok());
    hub_up(&other, &etcd);
    // Keepalives every second: several rounds of reconciling and of the
    // agent's own checks.
    std::thread::sleep(Duration::from_secs(4));
    let st = member.status();
    assert_eq!(st["agents"][0]["state"], "connected", "{st}");
    assert!(
        !log().contains("the cluster was removed from the hub"),
        "{}",
        log()
    );

    for kv in &saved {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            kv["key"].as_str().unwrap(),
            kv["value"].as_str().unwrap()
        );
        assert!(etcd_post(&etcd.client, "/v3/kv/put", &body).is_some());
    }
    wait_for("the records back", Duration::from_secs(10), || {
        log().contains("CA record is back").then_some(())
    });
    wait_for("alpha reached again", Duration::from_secs(20), || {
        reaches(&hub, "alpha").then_some(())
    });
    assert_eq!(member.status()["agents"][0]["state"], "connected");
}

/// A watch and a request carried from one hub to the hub holding their
/// member end when that hub freezes (SIGSTOP: a paused VM) and the
/// member's agent goes to another hub: the connection to a frozen hub
/// stays open and silent (its kernel still answers TCP), so the watch saw
/// nothing, and said nothing, for as long as the freeze lasted, and a
/// request on a kept connection waited up to its deadline (130 s). The
/// request is answered 503 with `Retry-After` (client-go sends it again),
/// the watch ends saying its stream broke on the way.
#[test]
fn streams_carried_to_a_frozen_hub_end_when_its_member_moves() {
    let etcd = Etcd::start();
    let hubs: [Env; 2] = hubs_on(&etcd);
    let api = ApiServer::start();
    let member = Env::new();
    join_with(
        &hubs[0],
        &member,
        "alpha",
        &api,
        &["--allow", "127.0.0.0/8"],
    );
    let owner = || etcd_json(&etcd, "/towerctl/owners/alpha");
    let gateway = |h: &Env| {
        h.status()["hub"]["gatewayURL"]
            .as_str()
            .unwrap()
            .trim_end_matches('/')
            .to_string()
    };
    let (gw0, gw1) = (gateway(&hubs[0]), gateway(&hubs[1]));
    wait_for("hub 0's claim", Duration::from_secs(10), || {
        owner().filter(|o| o["peer"].as_str().map(|p| p.trim_end_matches('/')) == Some(&*gw0))
    });
    let token = std::fs::read_to_string(hubs[1].path("data/towerctl/admin.token")).unwrap();
    let curl = |args: &[&str]| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--cacert"])
            .arg(hubs[1].path("data/towerctl/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .args(args);
        c
    };
    let mut watch = support::Streaming::start(curl(&[
        "-N",
        &format!("{gw1}/clusters/alpha/api/v1/namespaces/default/configmaps?watch=true"),
    ]));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!watch.has_exited(), "the watch: {}", watch.output());
    // A CONNECT carried the same way, open through the freeze.
    let echo = support::echo_server();
    let (head, mut tcp) = support::raw_connect(&hubs[1], &format!("127.0.0.1.alpha:{echo}"), "");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    tcp.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    tcp.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    // Through hub 1 to hub 0, which leaves hub 1 a kept connection to it.
    let (code, body) = support::gateway_get(&hubs[1], token.trim(), "/clusters/alpha/version");
    assert_eq!(code, "200", "{body}");

    let hub0 = hubs[0].pid_of("hub").unwrap();
    // SAFETY: a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(hub0, libc::SIGSTOP) }, 0);
    let _hub0 = Resume(hub0);
    let frozen = Instant::now();
    let mut waiting = curl(&[
        "--max-time",
        "60",
        "-w",
        "\n%{http_code} %header{retry-after}",
        &format!("{gw1}/clusters/alpha/version"),
    ]);
    let o = support::run_bounded(
        {
            waiting.stdin(Stdio::null());
            waiting
        },
        Duration::from_secs(70),
    );
    let took = frozen.elapsed();
    let (body, code) = o.stdout.rsplit_once('\n').unwrap_or(("", ""));
    // Answered by the hub holding alpha now, or told it moved, within the
    // agent's move (keepalives of 1 s): not at the freeze's end.
    assert!(took < Duration::from_secs(40), "took {took:?}: {o:?}");
    // (Sent within milliseconds of the freeze, on the kept connection: the
    // agent needs three keepalives to find its hub gone.)
    assert_eq!(code, "503 1", "{o:?}");
    assert!(body.contains("is no longer held by hub"), "{o:?}");
    wait_for(
        "the watch carried to the frozen hub to end",
        Duration::from_secs(40),
        || watch.has_exited().then_some(()),
    );
    assert!(
        watch.output().contains("broke on its way from the member"),
        "{}",
        watch.output()
    );
    tcp.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let read = tcp.read_to_end(&mut rest);
    assert!(
        !matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the CONNECT carried to the frozen hub stayed open: {read:?}"
    );
    eprintln!(
        "request answered after {took:?}; watch and CONNECT ended after {:?}",
        frozen.elapsed()
    );
    let (code, body) = support::gateway_get(&hubs[1], token.trim(), "/clusters/alpha/version");
    assert_eq!(
        code, "200",
        "alpha through hub 1 while hub 0 is frozen: {body}"
    );
}

/// etcd's client certificate renewed on disk (cert-manager, a short
/// lifetime) is used by the hub's next connections without a restart:
/// it was read once at start, and at its expiry every hub refused
/// operators until restarted. Shown here with an expired certificate put
/// in its place (refused within seconds, the refusal naming the file and
/// its end), then the good one back (taken within seconds).
#[test]
fn a_renewed_etcd_client_certificate_is_used_without_a_restart() {
    let pki = EtcdPki::new();
    let etcd = Etcd::start_with(Some(&pki));
    let hub = Env::new();
    let (cert, key) = (hub.path("etcd-client.pem"), hub.path("etcd-client-key.pem"));
    let put = |c: &str, k: &str| {
        // As a renewal writes them: aside, then renamed over the old ones.
        for (from, to) in [(c, &cert), (k, &key)] {
            let aside = to.with_extension("new");
            std::fs::copy(pki.file(from), &aside).unwrap();
            std::fs::rename(&aside, to).unwrap();
        }
    };
    put("client.pem", "client-key.pem");
    let o = up_on_store(
        &hub,
        &etcd.url,
        &[
            "--store-ca",
            &pki.file("ca.pem"),
            "--store-cert",
            cert.to_str().unwrap(),
            "--store-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(o.ok(), "{o:?}");
    let add = |name: &str| hub.towerctl(&["operator", "add", name]);
    assert!(add("first").ok());

    put("expired.pem", "expired-key.pem");
    let mut n = 0;
    let refused = wait_for(
        "the new certificate to be used",
        Duration::from_secs(30),
        || {
            n += 1;
            let o = add(&format!("refused-{n}"));
            (!o.ok()).then_some(o)
        },
    );
    let log = || std::fs::read_to_string(hub.path("state/towerctl/hub.log")).unwrap_or_default();
    wait_for("the expiry to be said", Duration::from_secs(20), || {
        (refused.all() + &log())
            .contains("etcd-client.pem' expired on 2021-01-01")
            .then_some(())
    });

    put("client.pem", "client-key.pem");
    wait_for(
        "the renewed certificate to be used",
        Duration::from_secs(30),
        || {
            n += 1;
            add(&format!("taken-{n}")).ok().then_some(())
        },
    );
    assert!(log().contains("etcd's TLS files changed"), "{}", log());
}
