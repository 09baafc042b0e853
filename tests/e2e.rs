//! End-to-end: the real towerctl binary (hub and agent daemons on loopback
//! ephemeral ports) and the real kubectl, through the reverse tunnel, to a
//! stand-in API server that only the agent knows about.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServer, TOKEN};
use support::{
    curl_within, forwarded_port, http_get, metric, metrics_addr, wait_for, Env, Streaming,
};

/// Hub up, member `alpha` joined against `api`, kubeconfig context in use.
fn connected(env: &Env, api: &ApiServer, extra: &[&str]) -> Vec<String> {
    connected_with_env(env, api, extra, &[])
}

/// [`connected`], the agent started with `vars` in its environment.
fn connected_with_env(
    env: &Env,
    api: &ApiServer,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> Vec<String> {
    env.up();
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let mut flags = vec![
        "--kubeconfig",
        member_kc.to_str().unwrap(),
        "--keepalive",
        "1s",
    ];
    // The stand-in's pods and endpoints live on loopback, which the dial
    // policy refuses unless a rule names it by address.
    if !extra.contains(&"--allow") {
        flags.extend_from_slice(&["--allow", "127.0.0.0/8"]);
    }
    flags.extend_from_slice(extra);
    let o = env.join_with_env(&join, &flags, vars);
    assert!(o.ok(), "join failed: {o:?}");
    assert!(o.stdout.contains("the tunnel is up"), "{o:?}");
    let o = env.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "use failed: {o:?}");
    join
}

/// `agent run alpha` as a container runs it: against the hub of `join`
/// (the printed join command), with the key and member kubeconfig that
/// `connected` left in `env`, and `extra` flags.
fn agent_run(env: &Env, join: &[String], extra: &[&str]) -> Vec<String> {
    let after = |flag: &str| join[join.iter().position(|a| a == flag).unwrap() + 1].clone();
    let path = |p: &str| env.path(p).to_str().unwrap().to_string();
    let mut args: Vec<String> = ["agent", "run", "alpha", "--hub"].map(String::from).into();
    args.extend([after("--hub"), "--hub-key".into(), after("--hub-key")]);
    args.extend([
        "--key-file".into(),
        path("config/towerctl/agents/alpha.key"),
    ]);
    args.extend(["--kubeconfig".into(), path("member.kubeconfig")]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn kubectl_reaches_the_member_through_the_tunnel() {
    let env = Env::new();
    let api = ApiServer::start();
    let join = connected(&env, &api, &[]);

    // Discovery + list.
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");

    // Watch streams an event caused after it started.
    let watch = Streaming::start(env.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "late-arrival", &[("k", "v")]);
    watch.wait_for("late-arrival", Duration::from_secs(20));
    drop(watch);

    // apply -f creates an object in the member.
    let manifest = env.path("cm.yaml");
    std::fs::write(&manifest, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: default\ndata:\n  color: blue\n").unwrap();
    let o = env.kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        o.ok() && o.stdout.contains("configmap/applied created"),
        "{o:?}"
    );
    let o = env.kubectl(&["get", "cm", "applied", "-o", "jsonpath={.data.color}"]);
    assert_eq!(o.stdout.trim(), "blue", "{o:?}");

    // exec over a WebSocket upgrade through gateway, tunnel and agent.
    let o = env.kubectl(&["exec", "web-0", "--", "echo", "hi"]);
    assert!(o.ok(), "{o:?}");
    assert_eq!(o.stdout.trim(), "hi", "{o:?}");

    // A client's own impersonation reaches the member as sent, where the
    // API server decides (the stand-in's RBAC binds no 'root'); no other
    // request carries one. The operator's token never reaches the member:
    // the agent's own is what the member sees.
    let o = env.kubectl(&["get", "ns", "--as", "root", "--as-group", "system:masters"]);
    assert!(!o.ok() && o.stderr.contains("User \"root\""), "{o:?}");
    let claimed = api
        .requests()
        .iter()
        .filter(|r| r.header("impersonate-user") == Some("root"))
        .count();
    assert!(claimed >= 1, "{:?}", api.requests());
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let reqs = api.requests();
    assert!(reqs.len() > 5, "{reqs:?}");
    for r in &reqs {
        assert!(
            r.header("impersonate-user") == Some("root")
                || r.headers.keys().all(|k| !k.starts_with("impersonate-")),
            "an identity no client asked for reached the member: {r:?}"
        );
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{r:?}"
        );
        assert!(
            !format!("{r:?}").contains(admin.trim()),
            "operator token leaked to the member: {r:?}"
        );
    }

    // The kubeconfig carries no secret: kubectl gets the token from the
    // exec credential plugin.
    let kc = std::fs::read_to_string(env.path("home/.kube/config")).unwrap();
    assert!(
        !kc.contains(admin.trim()),
        "operator token written into the kubeconfig"
    );
    assert!(kc.contains("client.authentication.k8s.io/v1"), "{kc}");
    // An entry set to the older credential version (for clients that know
    // no other) gets its answer in that version: client-go refuses one in
    // another version than the entry names.
    let beta = kc.replace(
        "client.authentication.k8s.io/v1",
        "client.authentication.k8s.io/v1beta1",
    );
    assert_ne!(beta, kc);
    std::fs::write(env.path("home/.kube/config"), beta).unwrap();
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");

    // Status shows the member connected with a measured RTT.
    let s = wait_for("an RTT measurement", Duration::from_secs(10), || {
        let s = env.status();
        s["hub"]["clusters"][0]["rttMs"].is_number().then_some(s)
    });
    assert_eq!(s["hub"]["clusters"][0]["state"], "connected", "{s}");
    assert_eq!(s["agents"][0]["state"], "connected", "{s}");

    // The daemons' logs, and no secret in them.
    let hub_log = env.towerctl(&["logs", "hub"]);
    assert!(
        hub_log.ok() && hub_log.stdout.contains("agent connected"),
        "{hub_log:?}"
    );
    let agent_log = env.towerctl(&["logs", "alpha"]);
    assert!(
        agent_log.ok() && agent_log.stdout.contains("tunnel up"),
        "{agent_log:?}"
    );
    let token = &join[join.iter().position(|a| a == "--token").unwrap() + 1];
    assert!(token.starts_with("tj_"), "{join:?}");
    for log in [&hub_log.stdout, &agent_log.stdout] {
        assert!(
            !log.contains(token) && !log.contains(admin.trim()),
            "a secret reached a log"
        );
    }
    let o = env.towerctl(&["logs", "nope"]);
    assert!(!o.ok() && o.stderr.contains("no log"), "{o:?}");
}

#[test]
fn repeated_use_never_duplicates_entries_and_use_dash_goes_back() {
    let env = Env::new();
    let api = ApiServer::start();
    let kc = env.path("home/.kube/config");
    std::fs::create_dir_all(kc.parent().unwrap()).unwrap();
    std::fs::write(&kc, "apiVersion: v1\nkind: Config\nclusters:\n- name: mine\n  cluster:\n    server: https://10.0.0.1:6443\ncontexts:\n- name: mine\n  context:\n    cluster: mine\n    user: mine\ncurrent-context: mine\nusers:\n- name: mine\n  user:\n    token: keep-me\n").unwrap();
    connected(&env, &api, &[]);
    for _ in 0..2 {
        assert!(env.towerctl(&["use", "alpha"]).ok());
    }
    let o = env.kubectl(&["config", "get-contexts", "-o", "name"]);
    let names: Vec<_> = o.stdout.lines().collect();
    assert_eq!(names, vec!["mine", "tower-alpha"], "{o:?}");
    let o = env.kubectl(&["config", "current-context"]);
    assert_eq!(o.stdout.trim(), "tower-alpha");
    let o = env.towerctl(&["use", "-"]);
    assert!(o.ok(), "{o:?}");
    let o = env.kubectl(&["config", "current-context"]);
    assert_eq!(o.stdout.trim(), "mine");
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(
        text.contains("keep-me"),
        "other users' entries must survive: {text}"
    );
    assert!(env.path("home/.kube/config.towerctl.bak").exists());
    // The namespace set on the context survives another `use`.
    let o = env.kubectl(&[
        "config",
        "set-context",
        "tower-alpha",
        "--namespace=payments",
    ]);
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&[
        "config",
        "view",
        "-o",
        "jsonpath={.contexts[?(@.name==\"tower-alpha\")].context.namespace}",
    ]);
    assert_eq!(o.stdout.trim(), "payments", "{o:?}");
    // So do a cluster's proxy-url and disable-compression set with kubectl
    // (every `use` wiped them); a token set on the user goes (it would
    // fight the exec plugin).
    for args in [
        &[
            "config",
            "set",
            "clusters.tower-alpha.proxy-url",
            "http://proxy.corp.example:3128",
        ][..],
        &[
            "config",
            "set",
            "clusters.tower-alpha.disable-compression",
            "true",
        ][..],
        &["config", "set", "users.tower-alpha.token", "stale-token"][..],
    ] {
        let o = env.kubectl(args);
        assert!(o.ok(), "{o:?}");
    }
    let o = env.towerctl(&["use", "alpha"]);
    assert!(
        o.ok()
            && o.stderr
                .contains("note: removed token from user 'tower-alpha'"),
        "said, not silently: {o:?}"
    );
    let field = |path: &str| {
        env.kubectl(&["config", "view", "-o", &format!("jsonpath={path}")])
            .stdout
            .trim()
            .to_string()
    };
    assert_eq!(
        field("{.clusters[?(@.name==\"tower-alpha\")].cluster.proxy-url}"),
        "http://proxy.corp.example:3128"
    );
    assert_eq!(
        field("{.clusters[?(@.name==\"tower-alpha\")].cluster.disable-compression}"),
        "true"
    );
    assert_eq!(field("{.users[?(@.name==\"tower-alpha\")].user.token}"), "");
    assert!(!field("{.users[?(@.name==\"tower-alpha\")].user.exec.command}").is_empty());
    for args in [
        &["config", "unset", "clusters.tower-alpha.proxy-url"][..],
        &[
            "config",
            "unset",
            "clusters.tower-alpha.disable-compression",
        ][..],
    ] {
        assert!(env.kubectl(args).ok());
    }
    // A `.towerctl.bak` planted as a link is replaced, never written
    // through (the copy used to land in the link's target).
    let bak = env.path("home/.kube/config.towerctl.bak");
    let victim = env.path("home/victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    std::fs::remove_file(&bak).unwrap();
    std::os::unix::fs::symlink(&victim, &bak).unwrap();
    let o = env.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(std::fs::symlink_metadata(&bak).unwrap().is_file());

    // A `tower-alpha` made by hand, straight to an API server with a
    // token: refused, the file untouched (its token was dropped, and the
    // one backup overwritten by the next `use`).
    // Likewise one behind another product's /clusters/ URL, and a user
    // with a cloud's exec plugin.
    let hand = env.path("hand.kubeconfig");
    for (server, user) in [
        ("https://10.1.1.1:6443", "token: my-precious-token"),
        ("https://rancher.example.com/k8s/clusters/c-m-abc", "token: my-precious-token"),
        ("https://10.1.1.1:6443", "exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token, --cluster-name, my-precious-token]"),
    ] {
        let made = format!("apiVersion: v1\nkind: Config\nclusters:\n- name: tower-alpha\n  cluster:\n    server: {server}\ncontexts:\n- name: tower-alpha\n  context:\n    cluster: tower-alpha\n    user: tower-alpha\ncurrent-context: tower-alpha\nusers:\n- name: tower-alpha\n  user:\n    {user}\n");
        std::fs::write(&hand, &made).unwrap();
        let o = env.towerctl(&["use", "alpha", "--kubeconfig", hand.to_str().unwrap()]);
        assert!(
            !o.ok() && o.stderr.contains("did not write") && o.stderr.contains("rename-context"),
            "{server} {user}: {o:?}"
        );
        assert!(!o.all().contains("my-precious-token"), "{o:?}");
        assert_eq!(std::fs::read_to_string(&hand).unwrap(), made);
    }
}

/// The head (lower case) and body of the local admin's `GET path` on the
/// gateway.
fn admin_head(env: &Env, path: &str) -> String {
    let gw = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut c = std::process::Command::new("curl");
    c.args([
        "-sS",
        "-i",
        "--max-time",
        "10",
        "--cacert",
        env.path("data/towerctl/ca.crt").to_str().unwrap(),
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("{gw}{path}"),
    ]);
    support::run_bounded(c, Duration::from_secs(20))
        .stdout
        .to_ascii_lowercase()
}

#[test]
fn disconnected_member_answers_a_status_and_recovers() {
    let env = Env::new();
    let api = ApiServer::start();
    let join = connected(&env, &api, &[]);
    assert!(env.kubectl(&["get", "ns"]).ok());

    env.kill9("agent-alpha");
    let o = wait_for("the 503 Status", Duration::from_secs(15), || {
        let o = env.kubectl(&["get", "ns"]);
        (!o.ok() && o.stderr.contains("not connected")).then_some(o)
    });
    assert!(
        o.stderr.contains("cluster 'alpha' is not connected"),
        "{o:?}"
    );
    assert!(o.stderr.contains("disconnected since"), "{o:?}");
    // Just after the agent left, the 503 says when to retry (client-go,
    // Helm and Argo CD retry only then: an agent restarting is waited for).
    let head = admin_head(&env, "/clusters/alpha/api");
    assert!(
        head.starts_with("http/2 503") || head.starts_with("http/1.1 503"),
        "{head}"
    );
    assert!(head.contains("retry-after: 1\r\n"), "{head}");

    // An unknown cluster is a 404 Status naming it. (kubectl's discovery
    // hides a 404's message, so ask for a raw path.)
    let o = env.kubectl(&[
        "--tls-server-name=localhost",
        "get",
        "--raw",
        "/clusters/nope/api",
    ]);
    assert!(
        o.stderr.contains("NotFound") && o.stderr.contains("cluster 'nope' is not registered"),
        "{o:?}"
    );

    // Restart the agent: traffic resumes with no action on the hub.
    let member_kc = env.path("member.kubeconfig");
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--keepalive",
            "1s",
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "rejoin: {o:?}");
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("default"), "{o:?}");
}

#[test]
fn agent_reconnects_by_itself_after_a_hub_restart() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &["--backoff-cap", "2s"]);
    let s = env.status();
    let tunnel = s["hub"]["tunnelAddress"].as_str().unwrap().to_string();
    let gateway = s["hub"]["gatewayAddress"].as_str().unwrap().to_string();

    env.kill9("hub");
    let s = wait_for("the agent to back off", Duration::from_secs(15), || {
        let s = env.status();
        (s["agents"][0]["state"] == "backing_off").then_some(s)
    });
    assert!(s["agents"][0]["retryInMs"].is_number(), "{s}");
    // No session, no round trip; and down since the hub went, not since
    // the last retry.
    assert!(s["agents"][0]["rttMs"].is_null(), "{s}");
    let down_since = s["agents"][0]["since"].clone();
    let seen = std::time::Instant::now();
    let later = wait_for(
        "another retry, seconds later",
        Duration::from_secs(15),
        || {
            let l = env.status();
            (seen.elapsed() > Duration::from_millis(2200)
                && l["agents"][0]["attempt"].as_u64() > s["agents"][0]["attempt"].as_u64())
            .then_some(l)
        },
    );
    assert_eq!(later["agents"][0]["since"], down_since, "{later}");

    let saved = env.path("config/towerctl/agents/alpha.json");
    let has_token = || {
        std::fs::read_to_string(&saved)
            .unwrap()
            .contains("\"token\"")
    };
    // Gone at the first login (which registered the key), before any
    // reconnection by key.
    assert!(
        !has_token(),
        "the join token stayed after the first login registered the key"
    );
    env.up_on(&tunnel, &gateway);
    wait_for("the agent to reconnect", Duration::from_secs(20), || {
        (env.status()["agents"][0]["state"] == "connected").then_some(())
    });
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
    // Back with its key alone; the rest of the saved settings are kept.
    assert!(!has_token());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(cfg["name"], "alpha", "{cfg}");
    assert!(cfg["hub_key"].is_string(), "{cfg}");
}

/// A hub stopped on purpose says so to its agents: the agent's log tells a
/// hub going away (a rolling update) from a network fault.
#[test]
fn a_stopping_hub_tells_its_agents_why() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &["--backoff-cap", "2s"]);
    assert!(env.towerctl(&["down"]).ok());
    let log = wait_for(
        "the agent to see the tunnel go",
        Duration::from_secs(15),
        || {
            let l = env.towerctl(&["logs", "alpha"]).stdout;
            l.contains("tunnel down after").then_some(l)
        },
    );
    let line = log
        .lines()
        .find(|l| l.contains("tunnel down after"))
        .unwrap();
    assert!(line.contains("the hub is shutting down"), "{log}");
}

/// Something else answering at the hub's address with another SSH host
/// key (anyone on a `ws://` path, an address reused) is never accepted,
/// but does not stop a running agent either: it used to exit with code 4,
/// which systemd does not restart, so one forged handshake took a member
/// off the hub for good. The agent keeps retrying, says why, and is back
/// when the real hub is.
#[test]
fn a_running_agent_outlasts_a_stranger_at_the_hubs_address() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &["--backoff-cap", "1s"]);
    let s = env.status();
    let tunnel = s["hub"]["tunnelAddress"].as_str().unwrap().to_string();
    let gateway = s["hub"]["gatewayAddress"].as_str().unwrap().to_string();
    let agent = env.pid_of("agent-alpha").expect("the agent runs");
    env.kill9("hub");

    let stranger = Env::new();
    let o = stranger.up_on(&tunnel, "127.0.0.1:0");
    assert!(o.ok(), "{o:?}");
    let s = wait_for(
        "the agent to meet the stranger",
        Duration::from_secs(20),
        || {
            let s = env.status();
            s["agents"][0]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("does not match the pinned one"))
                .then_some(s)
        },
    );
    let why = s["agents"][0]["lastError"].as_str().unwrap();
    assert!(why.contains("retrying"), "{why}");
    // Several attempts at the stranger, none accepted, the agent alive.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        env.pid_of("agent-alpha"),
        Some(agent),
        "the agent must not stop"
    );
    assert_ne!(env.status()["agents"][0]["state"], "connected");
    assert!(stranger
        .towerctl(&["cluster", "list"])
        .stdout
        .lines()
        .all(|l| !l.contains("alpha")));
    assert!(stranger.towerctl(&["down"]).ok());

    env.up_on(&tunnel, &gateway);
    wait_for("the agent to reconnect", Duration::from_secs(20), || {
        (env.status()["agents"][0]["state"] == "connected").then_some(())
    });
    assert_eq!(env.pid_of("agent-alpha"), Some(agent));
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
}

#[test]
fn join_fails_fast_with_the_reason() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let kc = member_kc.to_str().unwrap();
    let with = |flag: &str, value: &str| -> Vec<String> {
        let mut j = join.clone();
        let i = j.iter().position(|a| a == flag).unwrap();
        j[i + 1] = value.to_string();
        j
    };

    let o = env.join(&with("--token", "tj_wrong"), &["--kubeconfig", kc]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(
        o.stderr
            .contains("refused the credentials of cluster 'alpha'"),
        "{o:?}"
    );

    let real_key = join[join.iter().position(|a| a == "--hub-key").unwrap() + 1].clone();
    let fake_key = "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let o = env.join(&with("--hub-key", fake_key), &["--kubeconfig", kc]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(
        o.stderr.contains(fake_key) && o.stderr.contains(&real_key),
        "both fingerprints must be shown: {o:?}"
    );
    assert!(!o.stderr.contains("retrying"), "join stopped: {o:?}");

    // Credentials in the hub's URL: never sent, so refused, and not
    // repeated in the error.
    for hub in [
        "ws://agent:s3cret-pw@127.0.0.1:9/tunnel",
        "https://agent:s3cret-pw@127.0.0.1:9/tunnel",
        "ws://agent:s3cret-pw@[::1/tunnel",
    ] {
        let o = env.join(&with("--hub", hub), &["--kubeconfig", kc]);
        assert!(!o.ok() && !o.all().contains("s3cret-pw"), "{hub}: {o:?}");
    }
    let o = env.join(
        &with("--hub", "ws://agent:s3cret-pw@127.0.0.1:9/tunnel"),
        &["--kubeconfig", kc],
    );
    assert!(o.stderr.contains("never sent"), "{o:?}");

    // A hub that is not there: a closed port on loopback.
    let closed = format!("127.0.0.1:{}", support::free_port());
    let o = env.join(
        &with("--hub", &format!("ws://{closed}/tunnel")),
        &["--kubeconfig", kc, "--timeout", "3s"],
    );
    assert_eq!(o.code, Some(5), "{o:?}");
    assert!(
        o.stderr.contains("did not come up") && o.stderr.contains(&closed.to_string()),
        "{o:?}"
    );

    // Something in the hub's place that will answer the same until it is
    // reconfigured (here the gateway's TLS port, dialed with ws://: 400):
    // said at once, not after --timeout with words about a slow link.
    let start = std::time::Instant::now();
    let o = env.join(
        &with(
            "--hub",
            &format!("ws://127.0.0.1:{}/tunnel", env.gateway_port()),
        ),
        &["--kubeconfig", kc, "--timeout", "30s"],
    );
    assert_eq!(o.code, Some(5), "{o:?}");
    assert!(
        start.elapsed() < Duration::from_secs(15)
            && o.stderr.contains("HTTP 400")
            && o.stderr.contains("The agent was stopped")
            && !o.stderr.contains("did not come up"),
        "{:?}: {o:?}",
        start.elapsed()
    );

    // A member kubeconfig that does not parse is told by line and column,
    // without the lines around the error (a token, a key), on the
    // terminal and in the agent's log, by path or in KUBECONFIG.
    let broken = env.path("broken.kubeconfig");
    let good = std::fs::read_to_string(&member_kc).unwrap();
    std::fs::write(
        &broken,
        format!("{good}\nusers-extra:\n- token: eyJSUPERSECRETTOKEN\n  extra: [unclosed\n"),
    )
    .unwrap();
    for how in ["--kubeconfig", "KUBECONFIG"] {
        let o = if how == "KUBECONFIG" {
            env.join_with_env(&join, &[], &[("KUBECONFIG", broken.to_str().unwrap())])
        } else {
            env.join(&join, &["--kubeconfig", broken.to_str().unwrap()])
        };
        assert!(!o.ok() && o.stderr.contains("line"), "{how}: {o:?}");
        let log =
            std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
        assert!(
            !o.all().contains("SUPERSECRET") && !log.contains("SUPERSECRET"),
            "{how}: {o:?}\n{log}"
        );
    }

    // Nothing was left behind by the failed joins.
    let s = env.status();
    assert_eq!(s["agents"].as_array().unwrap().len(), 0, "{s}");
}

/// `--tls-san`: operators reaching the gateway by another name (a DNS
/// alias) or address (a load balancer's IP) than --gateway-url's host get
/// a certificate that covers it; other names still fail verification.
#[test]
fn the_gateway_certificate_covers_the_names_given_with_tls_san() {
    let env = Env::new();
    env.up_with(&[
        "--tls-san",
        "Hub-Alias.example.test",
        "--tls-san",
        "192.0.2.7",
    ]);
    let port = env.gateway_port();
    let ca = env.path("data/towerctl/ca.crt");
    let curl = |name: &str| {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "--cacert",
            ca.to_str().unwrap(),
            "--connect-to",
            &format!("{name}:{port}:127.0.0.1:{port}"),
            &format!(
                "https://{}:{port}/version",
                if name.contains(':') {
                    format!("[{name}]")
                } else {
                    name.to_string()
                }
            ),
        ]);
        support::run_bounded(c, Duration::from_secs(20))
    };
    for name in ["hub-alias.example.test", "192.0.2.7"] {
        let o = curl(name);
        assert!(o.ok() && o.stdout == "401", "{name}: {o:?}");
    }
    let o = curl("other.example.test");
    assert!(!o.ok() && o.code == Some(60), "not covered: {o:?}");
    let o = env.towerctl(&["up", "--tls-san", "not a name"]);
    assert!(
        !o.ok() && o.stderr.contains("neither a DNS name nor an IP address"),
        "{o:?}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let env = Env::new();
    let o = env.towerctl(&["cluster", "add", "Bad_Name"]);
    assert_eq!(o.code, Some(1));
    assert!(
        o.stderr.contains("invalid cluster name 'Bad_Name'"),
        "{o:?}"
    );
    let o = env.towerctl(&["cluster", "add", "alpha"]);
    assert!(
        o.stderr.contains("no hub is running") && o.stderr.contains("towerctl up"),
        "{o:?}"
    );
    // "No hub" is exit 3 for every command (docs/exit-codes.md).
    assert_eq!(o.code, Some(3), "{o:?}");
    let o = env.towerctl(&["join", "alpha", "--token", "x", "--hub", "http://h:1"]);
    assert!(o.stderr.contains("ws:// or wss://"), "{o:?}");
    let o = env.towerctl(&["join", "alpha", "--token", "x", "--hub", "ws://h:1/tunnel"]);
    assert!(o.stderr.contains("missing --hub-key"), "{o:?}");
    let o = env.towerctl(&["status"]);
    assert_eq!(o.code, Some(3), "{o:?}");
    // With ports, `stop` is a member's name, not `port-forward stop ID`.
    let o = env.towerctl(&["port-forward", "stop", "svc/web", ":80"]);
    assert!(
        o.stderr.contains("no hub is running") && !o.stderr.contains("background forward"),
        "{o:?}"
    );
    // A keepalive no member can keep (every member was declared dead
    // about once a second, for good): refused, with the bounds.
    for (k, words) in [("1ms", "at least 1s"), ("2h", "at most 1h")] {
        let o = env.towerctl(&["up", "--listen", "127.0.0.1:0", "--keepalive", k]);
        assert!(o.code == Some(2) && o.stderr.contains(words), "{k}: {o:?}");
    }
}

#[test]
fn registry_survives_kill_9_during_writes() {
    let env = Env::new();
    env.up();
    // One acknowledged before the kill is armed: under load the first add
    // could take the whole 700 ms and nothing was acknowledged.
    let o = env.towerctl(&["cluster", "add", "first"]);
    assert!(o.ok(), "{o:?}");
    let mut added = vec!["first".to_string()];
    let killer = {
        let pid = env.pid_of("hub").unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        })
    };
    for i in 0..200 {
        let name = format!("m{i}");
        let o = env.towerctl(&["cluster", "add", &name]);
        if !o.ok() {
            break;
        }
        added.push(name);
    }
    killer.join().unwrap();
    assert!(!added.is_empty());
    env.up();
    let s = env.status();
    let names: Vec<String> = s["hub"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for n in &added {
        assert!(
            names.contains(n),
            "cluster '{n}' was acknowledged but lost after kill -9 ({} acknowledged, {} listed after the restart: {names:?}); hub log:\n{}",
            added.len(),
            names.len(),
            std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default()
        );
    }

    // `up` is idempotent; `down` stops the hub.
    let o = env.up();
    assert!(o.stdout.contains("already running"), "{o:?}");
    // With members registered, no "next: cluster add".
    assert!(!o.stdout.contains("next: towerctl cluster add"), "{o:?}");
    assert!(!o.stderr.contains("started otherwise"), "{o:?}");
    // Other settings are not applied to the running hub: said, with how.
    let o = env.up_on_with(
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--gateway-url", "https://hub.example:9443"],
    );
    assert!(
        o.ok()
            && o.stdout.contains("already running")
            && o.stderr.contains("the running hub was started otherwise: --gateway-url https://hub.example:9443 (running: https://127.0.0.1:")
            && o.stderr.contains("'towerctl down', then this command again"),
        "{o:?}"
    );
    // A metrics endpoint too (it was ignored without a word).
    let o = env.up_with_env_metrics(&[], "off");
    assert!(
        o.stderr
            .contains("started otherwise: --metrics off (running: 127.0.0.1:"),
        "{o:?}"
    );
    // Who may name clients' addresses too.
    let o = env.up_with(&["--trusted-proxy", "127.0.0.1", "--require-proxy-protocol"]);
    assert!(
        o.ok()
            && o.stderr
                .contains("--trusted-proxy=127.0.0.1/32 --require-proxy-protocol (running: none)"),
        "{o:?}"
    );
    // Managed from a shell with another XDG_RUNTIME_DIR, or none (cron,
    // `sudo -u`, a container's exec; logind removing /run/user/UID at
    // logout): the same hub, found through its anchor in the state
    // directory, never a second one started beside it.
    let elsewhere = |args: &[&str], runtime: Option<&str>| {
        let mut c = env.towerctl_cmd(args);
        match runtime {
            Some(p) => c.env("XDG_RUNTIME_DIR", env.path(p)),
            None => c.env_remove("XDG_RUNTIME_DIR"),
        };
        support::run_bounded(c, Duration::from_secs(60))
    };
    let o = elsewhere(&["status"], None);
    assert!(o.ok(), "{o:?}");
    let o = elsewhere(
        &["up", "--listen", "127.0.0.1:0", "--gateway", "127.0.0.1:0"],
        Some("run2"),
    );
    assert!(o.ok() && o.stdout.contains("already running"), "{o:?}");
    let o = elsewhere(&["down"], None);
    assert!(o.ok(), "{o:?}");
    assert_eq!(env.towerctl(&["status"]).code, Some(3));
    assert_eq!(env.towerctl(&["down"]).code, Some(3));
    assert_eq!(elsewhere(&["down"], Some("run2")).code, Some(3));
}

/// Sends a signal to a pid (SIGSTOP/SIGCONT), for freezing a peer.
fn signal(pid: i32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_silent_peer_is_declared_dead_within_three_keepalives() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &["--backoff-cap", "1s"]);
    let agent = env.pid_of("agent-alpha").unwrap();

    // Each side's own log says when it declared the other dead: read every
    // 50 ms, no process started per look (a `status` poll waits 1.5 s on a
    // frozen hub, and the bounds measured the polling, not the tunnel).
    let declared = |log: &str, line: &str| {
        std::fs::read_to_string(env.path(&format!("state/towerctl/{log}")))
            .unwrap_or_default()
            .matches(line)
            .count()
    };
    let within = |log: &str, line: &str, what: &str| {
        let before = declared(log, line);
        let frozen = std::time::Instant::now();
        while declared(log, line) == before && frozen.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = frozen.elapsed();
        assert!(declared(log, line) > before, "{what} never declared dead");
        took
    };

    // A frozen agent keeps its TCP connection open but answers nothing.
    signal(agent, "-STOP");
    let took = within("hub.log", "declared dead", "the agent");
    signal(agent, "-CONT");
    // keepalive is 1s: within 3 intervals (and the hub's 400 ms to send
    // its reason).
    assert!(
        took < Duration::from_millis(3900),
        "declared dead after {took:?}"
    );

    // Thawed, the agent finds its session gone and reconnects by itself.
    wait_for("the agent to reconnect", Duration::from_secs(15), || {
        (env.status()["hub"]["clusters"][0]["state"] == "connected").then_some(())
    });
    assert!(env.kubectl(&["get", "ns"]).ok());

    // While it is frozen, its round trip shows as the time the keepalive
    // has waited (it showed the last one, a fraction of a millisecond,
    // until the agent was declared dead).
    let agent = env.pid_of("agent-alpha").unwrap();
    signal(agent, "-STOP");
    let t = std::time::Instant::now();
    let mut longest = 0.0f64;
    while t.elapsed() < Duration::from_secs(5) {
        let s = env.status();
        let c = &s["hub"]["clusters"][0];
        if c["state"] != "connected" {
            break;
        }
        longest = longest.max(c["rttMs"].as_f64().unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(agent, "-CONT");
    assert!(
        longest >= 400.0,
        "the frozen agent's RTT stayed at {longest} ms"
    );
    wait_for("the agent to reconnect", Duration::from_secs(15), || {
        (env.status()["hub"]["clusters"][0]["state"] == "connected").then_some(())
    });

    // The same from the other side: a frozen hub is detected by the agent.
    let hub = env.pid_of("hub").unwrap();
    signal(hub, "-STOP");
    // The agent's line for any end of its session (the keepalives' or the
    // session's own, whichever comes first).
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        within("agent-alpha.log", "tunnel down", "the hub")
    }));
    signal(hub, "-CONT");
    let took = r.unwrap();
    assert!(
        took < Duration::from_millis(3900),
        "declared dead after {took:?}"
    );
}

#[test]
fn the_agent_dials_through_an_http_proxy() {
    let env = Env::new();
    let api = ApiServer::start();
    let proxy = support::ConnectProxy::start();
    env.up();
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let proxy_url = format!("http://{}", proxy.addr);
    let o = env.join_with_env(
        &join,
        &["--kubeconfig", member_kc.to_str().unwrap()],
        &[("HTTP_PROXY", &proxy_url)],
    );
    assert!(o.ok(), "{o:?}");
    let tunnel = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        proxy.targets.lock().unwrap().clone(),
        vec![tunnel],
        "the agent must CONNECT through the proxy"
    );
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
}

#[test]
fn several_agents_per_machine_and_a_new_session_replaces_the_old() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let alpha_api = ApiServer::start();
    let beta_api = ApiServer::start();
    let alpha_join = connected(&env, &alpha_api, &[]);
    let beta_join = env.cluster_add("beta");
    let beta_kc = env.path("beta.kubeconfig");
    beta_api.write_kubeconfig(&beta_kc);
    let o = env.join(&beta_join, &["--kubeconfig", beta_kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let s = env.status();
    assert_eq!(s["agents"].as_array().unwrap().len(), 2, "{s}");
    assert!(env.towerctl(&["use", "beta"]).ok());
    assert!(env.kubectl(&["get", "ns"]).ok());
    assert!(beta_api
        .requests()
        .iter()
        .any(|r| r.path.starts_with("/api/v1/namespaces")));

    // Secrets on disk are private.
    for f in [
        "data/towerctl/admin.token",
        "data/towerctl/host_key",
        "data/towerctl/ca.key",
        "config/towerctl/agents/alpha.json",
    ] {
        let mode = std::fs::metadata(env.path(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }

    // The same agent (same key) comes back from elsewhere while the hub
    // still holds its old session (as after a silent network change): the
    // hub replaces the stale session with the new one. The join token is
    // spent by now; the key alone logs in.
    let before = env.status()["hub"]["clusters"][0]["remote"]
        .as_str()
        .unwrap()
        .to_string();
    let other = Env::new();
    let args = agent_run(&env, &alpha_join, &[]);
    let second = Streaming::start(other.towerctl_cmd(&strs(&args)));
    wait_for(
        "the hub to switch to the new session",
        Duration::from_secs(15),
        || {
            let s = env.status();
            let c = &s["hub"]["clusters"][0];
            (c["state"] == "connected" && c["remote"].as_str() != Some(before.as_str()))
                .then_some(())
        },
    );
    drop(second);
}

#[test]
fn join_tokens_expire_are_single_use_and_revoke_cuts_the_session() {
    let env = Env::new();
    let api = ApiServer::start();
    let join = connected(&env, &api, &[]);
    let member_kc = env.path("member.kubeconfig");
    let kc = member_kc.to_str().unwrap();

    // The same join command on another machine: the token is spent.
    let other = Env::new();
    let o = other.join(&join, &["--kubeconfig", kc]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(o.stderr.contains("already used"), "{o:?}");

    // An expired token is refused with its expiry.
    let late = env.towerctl(&["cluster", "add", "late", "--ttl", "1s"]);
    assert!(late.ok(), "{late:?}");
    let late_join = support::printed_command(&late.stdout, "join");
    std::thread::sleep(Duration::from_millis(2100));
    let o = other.join(&late_join, &["--kubeconfig", kc]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(o.stderr.contains("expired at"), "{o:?}");

    // The list shows the agent's key and the token states.
    let o = env.towerctl(&["cluster", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(
        list[0]["keyFingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{list}"
    );
    assert_eq!(list[0]["tokenState"], "used");
    assert_eq!(list[1]["tokenState"], "expired");

    // Revoke cuts the live session at once; the agent stops by itself.
    let agent = env.pid_of("agent-alpha").unwrap();
    let o = env.towerctl(&["cluster", "revoke", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let revoked = std::time::Instant::now();
    wait_for("the revoked agent to exit", Duration::from_secs(5), || {
        (!std::path::Path::new(&format!("/proc/{agent}")).exists()).then_some(())
    });
    // Well under a second on an idle machine; the bound is loose because
    // CI runs the whole suite in parallel on two cores.
    assert!(
        revoked.elapsed() < Duration::from_secs(4),
        "took {:?}",
        revoked.elapsed()
    );
    let log = std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap();
    assert!(log.contains("was revoked on the hub"), "{log}");
    // The member's status says why it stopped, not "start it again with
    // join" (which fails for a revoked member).
    let st = env.status();
    assert_eq!(st["agents"][0]["state"], "stopped", "{st}");
    assert!(
        st["agents"][0]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("was revoked on the hub")),
        "{st}"
    );
    let o = env.towerctl(&["status"]);
    assert!(
        o.stdout.contains("was revoked on the hub") && !o.stdout.contains("start it again"),
        "{o:?}"
    );
    let o = env.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    let o = env.kubectl(&["get", "--raw", "/clusters/alpha/api"]);
    assert!(
        o.stderr.contains("ServiceUnavailable") && o.stderr.contains("revoked"),
        "{o:?}"
    );
    // No retry brings a revoked member back: not told to retry.
    let head = admin_head(&env, "/clusters/alpha/api");
    assert!(
        head.contains(" 503") && !head.contains("retry-after"),
        "{head}"
    );

    // A revoked cluster's key is refused too, with the reason.
    let o = env.towerctl(&[
        "agent",
        "run",
        "alpha",
        "--hub",
        &join[5],
        "--hub-key",
        &join[7],
        "--kubeconfig",
        kc,
    ]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(o.stderr.contains("revoked"), "{o:?}");
}

#[test]
fn an_operator_on_another_machine_logs_in_and_uses_a_member() {
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api, &[]);
    let o = hub.towerctl(&["operator", "add", "alice", "--group", "devs"]);
    assert!(o.ok(), "{o:?}");
    assert!(hub
        .towerctl(&["access", "allow", "group:devs", "--names", "alpha"])
        .ok());
    let login = support::printed_command(&o.stdout, "login");
    assert_eq!(login[0], "login", "{o:?}");

    // The operator's machine: another HOME, no hub, no OS keyring (no
    // session bus, no session keyring): the token goes to a 0600 file.
    let laptop = Env::new();
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let o = laptop.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("as 'alice'"), "{o:?}");
    assert!(
        o.stdout.contains("private file") && o.stderr.contains("note: no usable OS keyring"),
        "{o:?}"
    );

    let o = laptop.towerctl(&["use", "alpha"]);
    assert!(o.ok(), "{o:?}");
    let o = laptop.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let token = &login[login.iter().position(|a| a == "--token").unwrap() + 1];
    let kc = std::fs::read_to_string(laptop.path("home/.kube/config")).unwrap();
    assert!(
        !kc.contains(token.as_str()),
        "the token must not be in the kubeconfig"
    );
    // `use` with no name lists the members and marks the current one.
    let o = laptop.towerctl(&["use"]);
    assert!(o.stdout.contains("* alpha"), "{o:?}");

    // A token pasted with a line end logs in (it failed with "failed to
    // parse header value"); an empty one is refused before any request.
    let token_at = login.iter().position(|a| a == "--token").unwrap() + 1;
    let mut pasted = login.clone();
    pasted[token_at] = format!("{}\r\n", login[token_at]);
    let args: Vec<&str> = pasted.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert!(o.ok(), "{o:?}");
    // Exit codes as the help's footer says: a refused token 4, a gateway
    // that is not there 5.
    pasted[token_at] = "top_not-a-real-token".into();
    let args: Vec<&str> = pasted.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert_eq!(o.code, Some(4), "{o:?}");
    let mut nowhere = pasted.clone();
    nowhere[1] = format!("https://127.0.0.1:{}", support::free_port());
    let args: Vec<&str> = nowhere.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert!(
        o.code == Some(5) && o.stderr.contains("cannot connect"),
        "{o:?}"
    );
    pasted[token_at] = " ".into();
    let args: Vec<&str> = pasted.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert!(
        !o.ok() && o.stderr.contains("operator token") && o.stderr.contains("is empty"),
        "{o:?}"
    );

    // The gateway's address written IPv4-mapped (`[::ffff:127.0.0.1]`)
    // is its IPv4 address, as kubectl (Go) takes it: its certificate
    // names 127.0.0.1, and the handshake failed in towerctl alone.
    let mapped_url = login[1].replacen("https://127.0.0.1:", "https://[::ffff:127.0.0.1]:", 1);
    assert_ne!(mapped_url, login[1], "{login:?}");
    let port = mapped_url.rsplit(':').next().unwrap().trim_end_matches('/');
    if std::net::TcpStream::connect(format!("[::ffff:127.0.0.1]:{port}")).is_ok() {
        let mapped = Env::new();
        let mut args: Vec<&str> = login.iter().map(String::as_str).collect();
        args[1] = &mapped_url;
        let o = mapped.towerctl(&args);
        assert!(o.ok(), "{o:?}");
        assert!(mapped.towerctl(&["use", "alpha"]).ok());
        let o = mapped.kubectl(&["get", "ns"]);
        assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    } else {
        eprintln!("no IPv6 sockets here: the IPv4-mapped gateway URL is not checked");
    }

    // A wrong CA hash is refused with both hashes.
    let mut bad = login.clone();
    let i = bad.iter().position(|a| a == "--ca-hash").unwrap() + 1;
    let real = bad[i].clone();
    // The hub's admin reads it in status (after a CA change, an operator
    // logs in again with the token they have).
    assert_eq!(hub.status()["hub"]["caHash"], real.as_str());
    assert!(hub.towerctl(&["status"]).stdout.contains(&real));
    bad[i] = format!("sha256:{}", "0".repeat(64));
    let args: Vec<&str> = bad.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert_eq!(o.code, Some(6), "a CA other than the pinned one: {o:?}");
    assert!(
        !o.ok() && o.stderr.contains(&real) && o.stderr.contains(&bad[i]),
        "{o:?}"
    );

    // A gateway URL with credentials in it is refused, as --gateway-url
    // is (it was saved, and went into the kubeconfig and the plugin's
    // command line for every local user's `ps`).
    let mut with_password = login.clone();
    assert!(with_password[1].starts_with("https://"), "{login:?}");
    with_password[1] = with_password[1].replacen("https://", "https://u:pw@", 1);
    let args: Vec<&str> = with_password.iter().map(String::as_str).collect();
    let o = Env::new().towerctl(&args);
    assert!(!o.ok() && o.stderr.contains("carries credentials"), "{o:?}");

    // The audit log on the hub names the operator, the cluster and the verb.
    let o = hub.towerctl(&["audit", "--operator", "alice", "-o", "json"]);
    let recs: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        recs.iter().any(|r| r["cluster"] == "alpha"
            && r["verb"] == "list"
            && r["path"]
                .as_str()
                .unwrap()
                .starts_with("/api/v1/namespaces?")
            && r["status"] == 200),
        "{recs:?}"
    );
    assert!(recs.iter().all(|r| r["operator"] == "alice"), "{recs:?}");

    // A second hub with a member of the same name: the laptop logs in to
    // both. Its `use alpha` now reaches the second hub's alpha, and says
    // so (the context was silently pointed elsewhere).
    let hub2 = Env::new();
    let api2 = ApiServer::start();
    connected(&hub2, &api2, &[]);
    let o2 = hub2.towerctl(&["operator", "add", "alice", "--group", "devs"]);
    assert!(hub2
        .towerctl(&["access", "allow", "group:devs", "--names", "alpha"])
        .ok());
    let login2 = support::printed_command(&o2.stdout, "login");
    let args: Vec<&str> = login2.iter().map(String::as_str).collect();
    assert!(laptop.towerctl(&args).ok());
    let gw1 = login[1].clone();
    let gw2 = login2[1].clone();
    // Its status names the hubs it is logged in to (it said only that no
    // hub runs here).
    let o = laptop.towerctl(&["status"]);
    assert!(
        o.stdout.contains(&format!("logged in to {gw1} as 'alice'"))
            && o.stdout.contains(&format!("logged in to {gw2} as 'alice'")),
        "{o:?}"
    );
    let o = laptop.towerctl(&["use", "--gateway", &gw2, "alpha"]);
    assert!(
        o.ok()
            && o.stderr.contains("warning: context 'tower-alpha' reached")
            && o.stderr.contains(&gw2),
        "{o:?}"
    );
    // Each hub's list marks alpha current only where the context goes.
    let o = laptop.towerctl(&["use", "--gateway", &gw2]);
    assert!(o.stdout.contains("* alpha"), "{o:?}");
    let o = laptop.towerctl(&["use", "--gateway", &gw1]);
    assert!(
        o.stdout.contains("alpha") && !o.stdout.contains("* alpha"),
        "{o:?}"
    );
    // A name the second hub does not show points to the other login.
    let o = laptop.towerctl(&["use", "--gateway", &gw2, "beta"]);
    assert!(
        !o.ok() && o.stderr.contains(&format!("--gateway {gw1}")),
        "{o:?}"
    );
    // A login that fails on an unreadable list of logins leaves the saved
    // token as it was (it was replaced before the list was read).
    let bob = hub2.towerctl(&["operator", "add", "bob"]);
    let bob_login = support::printed_command(&bob.stdout, "login");
    let alice2 = &login2[login2.iter().position(|a| a == "--token").unwrap() + 1];
    let logins = laptop.path("config/towerctl/logins.json");
    let kept = std::fs::read(&logins).unwrap();
    let mut broken = kept.clone();
    broken.push(b'[');
    std::fs::write(&logins, &broken).unwrap();
    let args: Vec<&str> = bob_login.iter().map(String::as_str).collect();
    let o = laptop.towerctl(&args);
    assert!(!o.ok() && o.stderr.contains("not valid JSON"), "{o:?}");
    std::fs::write(&logins, &kept).unwrap();
    let o = laptop.towerctl(&["credential", "--gateway", &gw2]);
    assert!(o.ok() && o.stdout.contains(alice2.as_str()), "{o:?}");

    // Removing the operator locks the laptop out.
    assert!(hub.towerctl(&["operator", "rm", "alice"]).ok());
    let o = laptop.kubectl(&["--context", "tower-alpha", "get", "ns"]);
    assert!(o.ok(), "the other hub's alpha is still alice's: {o:?}");
    let o = laptop.towerctl(&["use", "--gateway", &gw1, "alpha"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("ask the hub's admin for a new 'towerctl operator add'"),
        "{o:?}"
    );
    // Logging out of the second hub names the contexts left reaching it
    // (tower-alpha went there last), not the first hub's.
    let o = laptop.towerctl(&["logout", &gw2]);
    assert!(o.ok(), "{o:?}");
    let note = o
        .stderr
        .lines()
        .find(|l| l.starts_with("note: kubeconfig context(s)"))
        .unwrap_or_else(|| panic!("{o:?}"));
    assert!(note.contains("tower-alpha"), "{note}");
    assert!(!note.contains("tower-beta"), "{note}");
}

#[test]
fn the_kernel_keyring_holds_the_token_inside_a_session_keyring() {
    if std::process::Command::new("keyctl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("keyctl (Debian's keyutils) is required; .ci/run installs it");
    }
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api, &[]);
    let o = hub.towerctl(&["operator", "add", "bob"]);
    let login = o.stdout.trim().to_string();
    assert!(hub
        .towerctl(&["access", "allow", "operator:bob", "--names", "alpha"])
        .ok());
    let laptop = Env::new();
    // One session keyring for login, use and kubectl's exec plugin; the
    // login line runs as printed (its token in the environment).
    let script = format!(
        "{} && {bin} use alpha && kubectl get ns",
        login.replacen("towerctl ", &format!("{} ", support::TOWERCTL), 1),
        bin = support::TOWERCTL,
    );
    let mut cmd = laptop.towerctl_cmd(&[]);
    cmd.env("TOWERCTL_KEYRING", "keyutils");
    let mut cmd2 = std::process::Command::new("keyctl");
    cmd2.args(["session", "-", "sh", "-c", &script]).env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            cmd2.env(k, v);
        }
    }
    let o = support::run_bounded(cmd2, Duration::from_secs(60));
    assert!(o.ok(), "{o:?}");
    assert!(o.stdout.contains("kernel keyring"), "{o:?}");
    assert!(o.stdout.contains("kube-system"), "{o:?}");
    assert!(
        !laptop.path("config/towerctl/credentials").exists(),
        "no file fallback expected"
    );
}

/// A keyring that cannot be reached from where kubectl runs (no session
/// bus: cron, CI, tmux, sudo; a locked collection) is said as such, with
/// the way out, and not taken for a lost token (which had admins issue
/// new tokens for tokens that were still there).
#[test]
fn a_keyring_out_of_reach_is_not_taken_for_a_lost_token() {
    let laptop = Env::new();
    let dir = laptop.path("config/towerctl");
    std::fs::create_dir_all(&dir).unwrap();
    let gateway = "https://hub.example:9443";
    let login = serde_json::json!([{
        "gateway_url": gateway,
        "ca_pem": "",
        "operator": "bob",
        "backend": "secret-service",
    }]);
    std::fs::write(dir.join("logins.json"), login.to_string()).unwrap();
    let mut cmd = laptop.towerctl_cmd(&["credential", "--gateway", gateway]);
    cmd.env(
        "DBUS_SESSION_BUS_ADDRESS",
        format!("unix:path={}", laptop.path("no-such-bus").display()),
    );
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(
        !o.ok()
            && o.stderr.contains("cannot reach the Secret Service keyring")
            && o.stderr.contains("TOWERCTL_KEYRING=file")
            && !o.stderr.contains("issues a new token"),
        "{o:?}"
    );
}

/// A token kept in a file by an older towerctl (named without the URL's
/// hash) is still read, and `logout` removes it.
#[test]
fn a_token_file_under_its_old_name_is_still_read() {
    let laptop = Env::new();
    let dir = laptop.path("config/towerctl");
    std::fs::create_dir_all(dir.join("credentials")).unwrap();
    let gateway = "https://hub.example:9443";
    let login = serde_json::json!([{
        "gateway_url": gateway,
        "ca_pem": "",
        "operator": "bob",
        "backend": "file",
    }]);
    std::fs::write(dir.join("logins.json"), login.to_string()).unwrap();
    let old = dir.join("credentials/https___hub.example_9443");
    std::fs::write(&old, "tok_old_name\n").unwrap();
    let o = laptop.towerctl(&["credential", "--gateway", gateway]);
    assert!(o.ok() && o.stdout.contains("\"tok_old_name\""), "{o:?}");
    let o = laptop.towerctl(&["logout"]);
    assert!(o.ok(), "{o:?}");
    assert!(!old.exists());
}

#[test]
fn impersonation_lets_the_member_rbac_decide() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let o = env.towerctl(&["cluster", "add", "alpha", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    let join = support::printed_command(&o.stdout, "join");
    // The printed join command carries the member's mode.
    assert!(join.iter().any(|a| a == "--impersonate"), "{join:?}");
    let kc = env.path("member.kubeconfig");
    // A kubeconfig user that impersonates itself would add its groups to
    // every operator's: refused, naming what to remove.
    api.write_kubeconfig(&kc);
    let own = std::fs::read_to_string(&kc).unwrap().replace(
        "    token:",
        "    as: agent\n    as-groups: [\"system:masters\"]\n    token:",
    );
    std::fs::write(&kc, own).unwrap();
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(
        !o.ok()
            && o.stderr.contains("impersonates (as, as-groups)")
            && o.stderr.contains("--impersonate"),
        "{o:?}"
    );
    api.write_kubeconfig(&kc);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());

    // The local admin has no binding in the member: the member says 403.
    let o = env.kubectl(&["get", "ns"]);
    assert!(
        !o.ok() && o.stderr.contains("Forbidden") && o.stderr.contains("User \"admin\""),
        "{o:?}"
    );
    api.bind_user("admin");
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-user"), Some("admin"), "{last:?}");
    assert_eq!(
        last.header("impersonate-group"),
        Some("system:masters"),
        "{last:?}"
    );
    // A client's own impersonation (`kubectl --as`): the member's RBAC
    // decides whether the operator may impersonate what it names, as
    // kube-apiserver decides for a direct client, and nothing reaches the
    // member before it says yes.
    let before = api.requests().len();
    let o = env.kubectl(&["get", "ns", "--as", "root"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("does not let operator 'admin' impersonate users 'root'"),
        "{o:?}"
    );
    assert!(
        api.requests()[before..]
            .iter()
            .all(|r| r.path.starts_with("/apis/authorization.k8s.io/")
                || !r.path.contains("namespaces")),
        "{:?}",
        &api.requests()[before..]
    );
    api.allow_impersonation("admin", "users", "root");
    api.bind_user("root");
    let o = env.kubectl(&["get", "ns", "--as", "root"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    // As root, not as the operator, and with no group the client did not
    // name (the API server adds system:authenticated itself).
    assert_eq!(last.header("impersonate-user"), Some("root"), "{last:?}");
    assert_eq!(last.header("impersonate-group"), None, "{last:?}");
    // Each group, UID and service account is asked about too.
    let o = env.kubectl(&["get", "ns", "--as", "root", "--as-group", "system:masters"]);
    assert!(
        !o.ok() && o.stderr.contains("impersonate groups 'system:masters'"),
        "{o:?}"
    );
    api.allow_impersonation("admin", "groups", "system:masters");
    let o = env.kubectl(&["get", "ns", "--as", "root", "--as-group", "system:masters"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-group"), Some("system:masters"));
    let sa = "system:serviceaccount:flux-system:kustomize-controller";
    let o = env.kubectl(&["get", "ns", "--as", sa]);
    assert!(
        !o.ok()
            && o.stderr.contains(
                "impersonate serviceaccounts 'kustomize-controller' in namespace 'flux-system'"
            ),
        "{o:?}"
    );
    api.allow_impersonation(
        "admin",
        "serviceaccounts",
        "flux-system/kustomize-controller",
    );
    api.bind_user(sa);
    let o = env.kubectl(&["get", "ns", "--as", sa]);
    assert!(o.ok(), "{o:?}");
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-user"), Some("admin"), "{last:?}");
    // The hub's audit log names both.
    let o = env.towerctl(&["audit", "-o", "json"]);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.contains("\"operator\":\"admin\"")
                && l.contains(r#""as":"\"root\" groups [\"system:masters\"]""#)),
        "{o:?}"
    );
    // The member's audit log lists X-Forwarded-For as the request's
    // sources: the address the hub saw is added after what the client
    // claimed, never left out.
    assert!(
        last.header("x-forwarded-for")
            .is_some_and(|v| v.ends_with("127.0.0.1")),
        "{last:?}"
    );
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let (code, body) = support::gateway_get_with(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces",
        &["X-Forwarded-For: 127.0.0.99"],
    );
    assert_eq!(code, "200", "{body}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("127.0.0.99, 127.0.0.1"),
        "{last:?}"
    );
    // Nor can the client drop it by naming it in Connection, or add an
    // address of its own as X-Real-Ip (the audit log lists that too).
    let (code, body) = support::gateway_get_with(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces",
        &["Connection: x-forwarded-for", "X-Real-Ip: 127.0.0.98"],
    );
    assert_eq!(code, "200", "{body}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{last:?}"
    );
    assert_eq!(last.header("x-real-ip"), None, "{last:?}");
}

/// A client's own impersonation (`kubectl --as`, `--as-group`, `--as-uid`,
/// extras; Helm's, Flux's and Argo CD's) on a member where operators act
/// with the agent's identity: carried to the member as the client sent
/// it, where the API server checks the agent's own right to impersonate
/// (an operator here has the agent's rights already); recorded in the
/// hub's audit log; refused in words when malformed, and by the hub when
/// the agent is too old to carry it (it would strip it, and the request
/// run as the operator).
#[test]
fn a_clients_own_impersonation_reaches_the_member_as_sent() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    // The member's RBAC decides for the user named: not bound, refused
    // by the member itself.
    let o = env.kubectl(&["get", "ns", "--as", "bob"]);
    assert!(!o.ok() && o.stderr.contains("User \"bob\""), "{o:?}");
    api.bind_user("bob");
    let o = env.kubectl(&[
        "get",
        "ns",
        "--as",
        "bob",
        "--as-group",
        "devs",
        "--as-group",
        "ops",
        "--as-uid",
        "42",
    ]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-user"), Some("bob"), "{last:?}");
    assert_eq!(
        last.header("impersonate-group"),
        Some("devs, ops"),
        "{last:?}"
    );
    assert_eq!(last.header("impersonate-uid"), Some("42"), "{last:?}");
    // Extras (client-go percent-encodes their keys) pass as sent.
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let (code, body) = support::gateway_get_with(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces",
        &[
            "Impersonate-User: bob",
            "Impersonate-Extra-example.com%2Fscopes: view",
        ],
    );
    assert_eq!(code, "200", "{body}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(
        last.header("impersonate-extra-example.com%2fscopes"),
        Some("view"),
        "{last:?}"
    );
    // Malformed: refused before the member, naming the fix.
    let before = api.requests().len();
    // (kubectl itself refuses --as-group without --as; other clients may
    // not.)
    let (code, body) = support::gateway_get_with(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces",
        &["Impersonate-Group: devs"],
    );
    assert!(
        code == "400" && body.contains("without 'Impersonate-User'"),
        "{code} {body}"
    );
    let (code, body) = support::gateway_get_with(
        &env,
        token.trim(),
        "/clusters/alpha/api/v1/namespaces",
        &["Impersonate-User: bob", "Impersonate-User: root"],
    );
    assert!(
        code == "400" && body.contains("more than once"),
        "{code} {body}"
    );
    assert_eq!(
        api.requests().len(),
        before,
        "{:?}",
        &api.requests()[before..]
    );
    // Without --as, the agent's identity as before: no impersonation.
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let last = api.requests().into_iter().last().unwrap();
    assert_eq!(last.header("impersonate-user"), None, "{last:?}");
    let o = env.towerctl(&["audit", "-o", "json"]);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.contains(r#""as":"\"bob\" groups [\"devs\", \"ops\"] uid \"42\"""#)),
        "{o:?}"
    );
    let o = env.towerctl(&["audit"]);
    assert!(o.stdout.contains(r#"admin as "bob""#), "{o:?}");

    // An agent that does not say it carries them (an older one) would
    // strip them: the hub refuses instead of running the request as the
    // operator.
    let env2 = Env::new();
    let api2 = ApiServer::start();
    connected_with_env(
        &env2,
        &api2,
        &[],
        &[("TOWERCTL_TEST_AGENT_WITHOUT", "client-as")],
    );
    api2.bind_user("bob");
    // (Discovery first, which kubectl reports as "unknown" when refused.)
    let o = env2.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    let o = env2.kubectl(&["get", "ns", "--as", "bob"]);
    assert!(
        !o.ok()
            && o.stderr.contains("does not carry impersonation")
            && o.stderr.contains("upgrade the agent"),
        "{o:?}"
    );
    assert!(
        api2.requests()
            .iter()
            .all(|r| r.header("impersonate-user").is_none()),
        "{:?}",
        api2.requests()
    );
}

#[test]
fn kubeconfig_lists_symlinks_and_standalone_files() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    assert!(env
        .join(&join, &["--kubeconfig", kc.to_str().unwrap()])
        .ok());

    // KUBECONFIG list whose first file is missing: the entry goes to the
    // first file that exists; relative paths elsewhere stay relative.
    let missing = env.path("missing.yaml");
    let second = env.path("second.yaml");
    std::fs::write(&second, "apiVersion: v1\nkind: Config\nclusters:\n- name: rel\n  cluster:\n    server: https://127.0.0.1:1\n    certificate-authority: certs/ca.crt\ncontexts: []\nusers: []\n").unwrap();
    let list = format!("{}:{}", missing.display(), second.display());
    let mut cmd = env.towerctl_cmd(&["use", "alpha"]);
    cmd.env("KUBECONFIG", &list);
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    assert!(!missing.exists());
    let text = std::fs::read_to_string(&second).unwrap();
    assert!(
        text.contains("tower-alpha") && text.contains("certificate-authority: certs/ca.crt"),
        "{text}"
    );
    let mut k = env.kubectl_cmd(&["get", "ns"]);
    k.env("KUBECONFIG", &list);
    let o = support::run_bounded(k, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");

    // A namespace set on the context where it is, then a first file in
    // the list: `use` updates the entries where they are defined (written
    // into the first file, a second `tower-alpha` without the namespace
    // shadowed the first one) and sets the current context there.
    let kubectl = |args: &[&str]| {
        let mut k = env.kubectl_cmd(args);
        k.env("KUBECONFIG", &list);
        support::run_bounded(k, Duration::from_secs(30))
    };
    let o = kubectl(&["config", "set-context", "tower-alpha", "--namespace=prod"]);
    assert!(o.ok(), "{o:?}");
    std::fs::write(&missing, "apiVersion: v1\nkind: Config\n").unwrap();
    let mut cmd = env.towerctl_cmd(&["use", "alpha"]);
    cmd.env("KUBECONFIG", &list);
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    let first = std::fs::read_to_string(&missing).unwrap();
    assert!(
        !first.contains("name: tower-alpha") && first.contains("current-context: tower-alpha"),
        "{first}"
    );
    let o = kubectl(&["config", "view", "--minify", "-o", "jsonpath={..namespace}"]);
    assert_eq!(o.stdout.trim(), "prod", "{o:?}");
    std::fs::remove_file(&missing).unwrap();

    // A symlinked ~/.kube/config stays a symlink; ten uses, one context.
    let real = env.path("dotfiles-kubeconfig");
    std::fs::write(&real, "").unwrap();
    std::fs::create_dir_all(env.path("home/.kube")).unwrap();
    std::os::unix::fs::symlink(&real, env.path("home/.kube/config")).unwrap();
    for _ in 0..10 {
        assert!(env.towerctl(&["use", "alpha"]).ok());
    }
    assert!(env.path("home/.kube/config").is_symlink());
    let text = std::fs::read_to_string(&real).unwrap();
    assert_eq!(text.matches("name: tower-alpha").count(), 3, "{text}");

    // Run through a link on PATH (a package manager's `bin/towerctl` into
    // its versioned directory), the entries name the link, which the next
    // upgrade keeps, not the versioned file it resolves to.
    let bin = env.path("pkg/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(support::TOWERCTL, bin.join("towerctl")).unwrap();
    let mut cmd = env.towerctl_cmd(&["use", "alpha"]);
    let mut path = std::ffi::OsString::from(bin.as_os_str());
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    // Found on PATH by name, as a shell finds it.
    cmd.env("PATH", &path);
    let cmd = {
        let mut c = std::process::Command::new("towerctl");
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    };
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    let text = std::fs::read_to_string(&real).unwrap();
    let link = bin.join("towerctl").display().to_string();
    assert!(text.contains(&format!("command: {link}")), "{link}: {text}");

    // A standalone kubeconfig works on its own.
    let o = env.towerctl(&["kubeconfig", "alpha"]);
    assert!(o.ok() && !o.stderr.contains("only in this pod"), "{o:?}");
    let standalone = env.path("standalone.yaml");
    std::fs::write(&standalone, &o.stdout).unwrap();
    let o = env.kubectl(&["--kubeconfig", standalone.to_str().unwrap(), "get", "nodes"]);
    assert!(o.ok() && o.stdout.contains("fake-node-1"), "{o:?}");
    // In the hub's pod (`kubectl exec`), the same, with a note that its
    // credential's files are the pod's own.
    let mut cmd = env.towerctl_cmd(&["kubeconfig", "alpha"]);
    cmd.env("KUBERNETES_SERVICE_HOST", "10.96.0.1");
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok() && o.stdout.contains("tower-alpha"), "{o:?}");
    assert!(
        o.stderr.contains("exist only in this pod")
            && o.stderr.contains("'towerctl operator add NAME' here"),
        "{o:?}"
    );
}

/// The shape of a JSON value: every leaf replaced by its type, arrays by
/// their first element's shape. Values change from run to run; the shape
/// of a versioned output must not.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Null => Value::Null,
        Value::Bool(_) => "<bool>".into(),
        Value::Number(_) => "<number>".into(),
        Value::String(_) => "<string>".into(),
        Value::Array(a) => Value::Array(a.first().map(shape).into_iter().collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

#[test]
fn status_json_has_a_stable_shape() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    // Wait for an RTT so that every field is populated.
    let s = wait_for("an RTT on both sides", Duration::from_secs(10), || {
        let s = env.status();
        (s["hub"]["clusters"][0]["rttMs"].is_number() && s["agents"][0]["rttMs"].is_number())
            .then_some(s)
    });
    let got = serde_json::to_string_pretty(&shape(&s)).unwrap();
    let golden =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/status-v1.shape.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want =
        std::fs::read_to_string(&golden).expect("golden file (run with UPDATE_GOLDEN=1 to create)");
    assert_eq!(got, want, "towerctl/v1 status output changed shape; if intended (additions only), run with UPDATE_GOLDEN=1");
    // YAML carries the same document.
    let o = env.towerctl(&["status", "-o", "yaml"]);
    assert!(
        o.ok() && o.stdout.contains("apiVersion: towerctl/v1"),
        "{o:?}"
    );
}

#[test]
fn prometheus_metrics_describe_the_tunnels() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    assert!(env.kubectl(&["get", "ns"]).ok());
    let _ = env.kubectl(&[
        "--tls-server-name=localhost",
        "get",
        "--raw",
        "/clusters/nope/api",
    ]);
    let addr = metrics_addr(&env);
    let page = wait_for(
        "an RTT sample in the metrics",
        Duration::from_secs(10),
        || {
            let p = http_get(&addr, "/metrics");
            let n: u64 = p
                .lines()
                .find_map(|l| {
                    l.strip_prefix("towerctl_tunnel_rtt_seconds_count{cluster=\"alpha\"} ")
                })?
                .trim()
                .parse()
                .ok()?;
            (n > 0).then_some(p)
        },
    );
    assert!(page.contains("towerctl_agents_connected 1"), "{page}");
    assert!(
        page.contains("towerctl_tunnel_up{cluster=\"alpha\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("towerctl_dial_failures_total{reason=\"unknown_cluster\"} 1"),
        "{page}"
    );
    let bytes_in: u64 = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("towerctl_tunnel_bytes_total{cluster=\"alpha\",direction=\"in\"} ")
        })
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(bytes_in > 500, "{page}");
}

#[test]
fn daemons_notify_systemd_and_units_are_written() {
    let env = Env::new();
    let sock_path = env.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = env.hub_run_cmd();
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let hub = Streaming::start(cmd);
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify datagram from the hub");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.starts_with("READY=1"), "{msg}");
    drop(hub);

    let o = env.towerctl(&["service", "install", "hub", "--listen", "0.0.0.0:8443"]);
    assert!(o.ok(), "{o:?}");
    let unit =
        std::fs::read_to_string(env.path("config/systemd/user/towerctl-hub.service")).unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("hub run --listen=0.0.0.0:8443")
            && unit.contains("\nRestartPreventExitStatus=2\n"),
        "{unit}"
    );
    let o = env.towerctl(&["service", "install", "agent", "alpha"]);
    assert!(!o.ok() && o.stderr.contains("towerctl join alpha"), "{o:?}");
}

/// curl through the gateway's CONNECT, as any HTTP client with a proxy would.
fn curl_via_gateway(env: &Env, authority: &str) -> support::Out {
    let s = env.status();
    let gw = s["hub"]["gatewayURL"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let ca = env.path("data/towerctl/ca.crt");
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "15",
        "--proxy",
        &gw,
        "--proxy-cacert",
        ca.to_str().unwrap(),
    ])
    .args([
        "--proxy-header",
        &format!("Proxy-Authorization: Bearer {}", token.trim()),
    ])
    .args(["-p", &format!("http://{authority}/")]);
    support::run_bounded(cmd, Duration::from_secs(30))
}

#[test]
fn connect_through_the_gateway_honours_the_agent_dial_policy() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("hello from the member network");
    let other = support::http_server("should not be reachable");
    connected(
        &env,
        &api,
        &["--allow", &format!("127.0.0.1:{}", web.port())],
    );

    let o = curl_via_gateway(&env, &format!("127.0.0.1.alpha:{}", web.port()));
    assert!(
        o.ok() && o.stdout.contains("hello from the member network"),
        "{o:?}"
    );
    // Without -p, curl sends `GET http://…` to the proxy (plain HTTP
    // through it), with the application's own Authorization: said to be
    // CONNECT-only, not refused as a bad operator token.
    let gw = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", "--proxy", &gw, "--proxy-cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args([
            "--proxy-header",
            &format!("Proxy-Authorization: Bearer {}", token.trim()),
            "-H",
            "Authorization: Bearer the-apps-own-token",
            &format!("http://127.0.0.1.alpha:{}/", web.port()),
        ]);
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(
        o.stdout.contains("a proxy for CONNECT only")
            && !o.stdout.contains("operator token was not accepted"),
        "{o:?}"
    );

    // Not in the allow-list: refused by the agent, with the rule named.
    let o = curl_via_gateway(&env, &format!("127.0.0.1.alpha:{}", other.port()));
    assert!(!o.ok() && o.stderr.contains("403"), "{o:?}");
    let s = env.status();
    assert_eq!(s["agents"][0]["state"], "connected");
    let o = env.towerctl(&["audit", "-o", "json"]);
    let denied: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["verb"] == "connect" && r["status"] == 403)
        .collect();
    assert_eq!(denied.len(), 1, "{o:?}");
    let ok = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["verb"] == "connect" && r["status"] == 200 && r["phase"] == "end")
        .unwrap_or_else(|| panic!("no end record for the CONNECT: {o:?}"));
    assert!(
        ok["bytes"].as_u64().unwrap() > 50,
        "the audit record must count the stream's bytes: {ok}"
    );

    // Unknown cluster in the authority.
    let o = curl_via_gateway(&env, "127.0.0.1.nope:80");
    assert!(!o.ok() && o.stderr.contains("404"), "{o:?}");
}

/// A loopback listener that takes no more connections: backlog 0, never
/// accepting, its queue filled; a connect to it hangs (its SYNs dropped).
/// The address, and what must stay alive meanwhile.
fn full_listener() -> (String, (std::net::TcpListener, Vec<std::net::TcpStream>)) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns.
    let (fd, port) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as u16;
        a.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(
            libc::bind(fd, &a as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut l = len;
        libc::getsockname(fd, &mut got as *mut _ as *mut libc::sockaddr, &mut l);
        (fd, u16::from_be(got.sin_port))
    };
    let addr = format!("127.0.0.1:{port}");
    let mut fill = Vec::new();
    for _ in 0..4 {
        if let Ok(c) =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300))
        {
            fill.push(c);
        }
    }
    // SAFETY: `fd` is a listening socket this function made and owns.
    (
        addr,
        (unsafe { std::net::TcpListener::from_raw_fd(fd) }, fill),
    )
}

#[test]
fn push_mode_lets_member_workloads_reach_only_exposed_hub_services() {
    let env = Env::new();
    let api = ApiServer::start();
    let hub_side = support::http_server("hello from the hub side");
    env.up();
    let o = env.towerctl(&[
        "cluster",
        "add",
        "alpha",
        "--expose",
        &format!("web={hub_side}"),
    ]);
    assert!(o.ok(), "{o:?}");
    let mut join = support::printed_command(&o.stdout, "join");
    // The printed join listens on the target's port in the member; this
    // test's "member" is the same machine, so let the agent pick a port.
    let i = join
        .iter()
        .position(|a| a == "--expose")
        .expect("join command carries --expose");
    assert_eq!(join[i + 1], format!("web=127.0.0.1:{}", hub_side.port()));
    join[i + 1] = "web=127.0.0.1:0".into();
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--expose",
            "other=127.0.0.1:0",
        ],
    );
    assert!(o.ok(), "{o:?}");
    let s = env.status();
    let exposed = s["agents"][0]["exposed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let listen = |n: &str| -> String {
        exposed
            .iter()
            .filter_map(|v| v.as_str())
            .find_map(|v| v.strip_prefix(&format!("{n}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {n} in {s}"))
    };
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{}/", listen("web")),
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(
        o.ok() && o.stdout.contains("hello from the hub side"),
        "{o:?}"
    );

    // 'other' is not exposed to alpha: the hub refuses the channel.
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{}/", listen("other")),
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    assert!(!o.ok(), "{o:?}");
    let log = env.towerctl(&["logs", "hub"]).stdout;
    assert!(log.contains("refused an agent-opened channel"), "{log}");

    // A target that does not answer (its accept queue full: the hub's
    // connect hangs for its 10 s) holds up nothing else on the tunnel:
    // the hub dialed it inside the session's own loop, and every request
    // to the member waited for it.
    let (stuck, _held) = full_listener();
    let o = env.towerctl(&["cluster", "expose", "alpha", &format!("other={stuck}")]);
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "15",
        &format!("http://{}/", listen("other")),
    ]);
    let pending = std::thread::spawn(move || support::run_bounded(cmd, Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    let o = env.kubectl(&["get", "ns"]);
    let took = t.elapsed();
    assert!(o.ok(), "{o:?}");
    assert!(
        took < Duration::from_secs(5),
        "a request to the member waited {took:?} behind a push dial"
    );
    let _ = pending.join();

    // A push connection to a hub-side service that keeps it open and
    // silent ends with the member's session: the hub only half-closed it
    // when the channel ended, and held it (a descriptor each) past a
    // revoke for as long as the service kept its side open.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let o = env.towerctl(&[
        "cluster",
        "expose",
        "alpha",
        &format!("other=127.0.0.1:{silent_port}"),
    ]);
    assert!(o.ok(), "{o:?}");
    let hub_pid = env.pid_of("hub").expect("hub pid");
    let any_state = [
        "01", "02", "03", "04", "05", "06", "07", "08", "09", "0A", "0B",
    ];
    // A workload's connection to `other`, and the service's side of it,
    // once the hub holds its connection to the service.
    let hold = || {
        let service = silent.try_clone().unwrap();
        let accepted = std::thread::spawn(move || service.accept().map(|(s, _)| s));
        let workload = std::net::TcpStream::connect(listen("other")).unwrap();
        let service_side = accepted.join().unwrap().unwrap();
        wait_for(
            "the hub's connection to the service",
            Duration::from_secs(10),
            || (support::sockets_of(hub_pid, silent_port, &any_state) == 1).then_some(()),
        );
        (workload, service_side)
    };
    let (mut workload, service_side) = hold();
    // `cluster expose --remove` ends what is open to the name it takes
    // away (it refused only new connections; this one went on).
    let o = env.towerctl(&["cluster", "expose", "alpha", "--remove", "other"]);
    assert!(o.ok(), "{o:?}");
    wait_for(
        "the hub to end the push connection no longer exposed",
        Duration::from_secs(10),
        || (support::sockets_of(hub_pid, silent_port, &any_state) == 0).then_some(()),
    );
    workload
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        std::io::Read::read(&mut workload, &mut buf).ok(),
        Some(0),
        "the workload's connection ends"
    );
    drop((workload, service_side));
    let o = env.towerctl(&[
        "cluster",
        "expose",
        "alpha",
        &format!("other=127.0.0.1:{silent_port}"),
    ]);
    assert!(o.ok(), "{o:?}");

    let (workload, _service_side) = hold();
    drop(workload);
    assert!(env.towerctl(&["cluster", "revoke", "alpha"]).ok());
    wait_for(
        "the hub to let go of the push connection",
        Duration::from_secs(10),
        || (support::sockets_of(hub_pid, silent_port, &any_state) == 0).then_some(()),
    );

    // Exposes can change later.
    let o = env.towerctl(&[
        "cluster", "expose", "alpha", "--remove", "web", "--remove", "other",
    ]);
    assert!(o.ok() && o.stdout.contains("exposes nothing"), "{o:?}");
}

#[test]
fn port_forward_follows_the_service_and_survives_a_tunnel_bounce() {
    use support::apiserver::TargetPort;
    let env = Env::new();
    let api = ApiServer::start();
    let one = support::http_server("served by endpoint one");
    let two = support::http_server("served by endpoint two");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Name("http"))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", one.port())]);
    connected(&env, &api, &["--backoff-cap", "1s"]);

    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let port = forwarded_port(&pf);
    assert!(
        pf.output()
            .contains(&format!("Forwarding from [::1]:{port} -> 80")),
        "{}",
        pf.output()
    );
    let url = format!("http://127.0.0.1:{port}/");
    let o = curl_within(&url, 15);
    assert!(
        o.stdout.contains("served by endpoint one"),
        "{o:?} {}",
        pf.output()
    );
    pf.wait_for(
        &format!("Handling connection for {port}"),
        Duration::from_secs(5),
    );

    // The endpoint moves (pod replaced): the next connection follows.
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", two.port())]);
    let o = curl_within(&url, 15);
    assert!(o.stdout.contains("served by endpoint two"), "{o:?}");

    // The tunnel bounces (hub restarted): the same forward works again.
    let s = env.status();
    let (tunnel, gateway) = (
        s["hub"]["tunnelAddress"].as_str().unwrap().to_string(),
        s["hub"]["gatewayAddress"].as_str().unwrap().to_string(),
    );
    let handovers = || {
        std::fs::read_to_string(env.path("state/towerctl/hub.log"))
            .unwrap_or_default()
            .matches("serving a local port-forward")
            .count()
    };
    // Both listeners (127.0.0.1 and ::1) were handed to the hub.
    wait_for(
        "both listeners handed to the hub",
        Duration::from_secs(10),
        || (handovers() == 2).then_some(()),
    );
    let before = 2;
    env.kill9("hub");
    env.up_on(&tunnel, &gateway);
    wait_for("the agent to reconnect", Duration::from_secs(20), || {
        (env.status()["hub"]["clusters"][0]["state"] == "connected").then_some(())
    });
    let o = curl_within(&url, 15);
    assert!(
        o.stdout.contains("served by endpoint two"),
        "{o:?} {}",
        pf.output()
    );
    // On the hub's machine the restarted hub takes the forward over again
    // (the gateway carried it only while the hub was away).
    wait_for(
        "the restarted hub to serve the forward again",
        Duration::from_secs(15),
        || (handovers() == 2 * before).then_some(()),
    );
    let o = curl_within(&url, 15);
    assert!(o.stdout.contains("served by endpoint two"), "{o:?}");

    // A target that does not exist: refused at once, naming it (as
    // kubectl); the running forward lives on.
    let o = env.towerctl(&["port-forward", "alpha", "svc/nope", ":80"]);
    assert!(
        o.code == Some(1) && o.stderr.contains("services \"nope\" not found"),
        "{o:?}"
    );
    let o = curl_within(&url, 15);
    assert!(o.stdout.contains("served by endpoint two"), "{o:?}");
}

#[test]
fn port_forward_to_pods_and_deployments_and_bad_input() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("served by the pod");
    api.add_pod(
        "default",
        "api-7d9",
        "127.0.0.1",
        &[("app", "api")],
        true,
        &[("http", web.port())],
    );
    api.add_deployment("default", "api", &[("app", "api")], 1);
    connected(&env, &api, &[]);
    for target in ["pod/api-7d9", "api-7d9", "deploy/api"] {
        let pf = Streaming::start(env.towerctl_cmd(&[
            "port-forward",
            "alpha",
            target,
            &format!(":{}", web.port()),
        ]));
        let port = forwarded_port(&pf);
        let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
        assert!(
            o.stdout.contains("served by the pod"),
            "{target}: {o:?} {}",
            pf.output()
        );
    }
    // A workload's pods are read a page at a time (a DaemonSet's every pod
    // was read whole for each connection).
    let lists: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/api/v1/namespaces/default/pods?"))
        .map(|r| r.path)
        .collect();
    assert!(
        !lists.is_empty() && lists.iter().all(|p| p.contains("limit=100")),
        "{lists:?}"
    );
    // An older server without discovery.k8s.io: core Endpoints, numeric targetPort.
    api.set_endpointslices(false);
    api.add_service(
        "default",
        "legacy",
        &[("", 80, support::apiserver::TargetPort::Number(web.port()))],
        &[("app", "api")],
    );
    api.set_endpoints("default", "legacy", &[("127.0.0.1", "", web.port())]);
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/legacy", ":80"]));
    let port = forwarded_port(&pf);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(
        o.stdout.contains("served by the pod"),
        "{o:?} {}",
        pf.output()
    );

    let o = env.towerctl(&["port-forward", "alpha", "cm/x", "80"]);
    assert!(!o.ok() && o.stderr.contains("pod/NAME"), "{o:?}");
    let o = env.towerctl(&["port-forward", "alpha", "svc/web", "80:HTTP"]);
    assert!(
        !o.ok() && o.stderr.contains("a number or a port's name"),
        "{o:?}"
    );
    let o = env.towerctl(&["port-forward", "nope", "svc/web", "80"]);
    assert!(
        !o.ok() && o.stderr.contains("cluster 'nope' is not registered"),
        "{o:?}"
    );
}

#[test]
fn kubectl_port_forward_passes_through_the_gateway() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("forwarded by kubectl");
    api.add_pod(
        "default",
        "web-1",
        "10.99.0.1",
        &[("app", "web")],
        true,
        &[("http", 8080)],
    );
    api.set_portforward_target("default", "web-1", 8080, web);
    connected(&env, &api, &[]);
    // WebSocket (kubectl's default) and the SPDY fallback.
    for ws in ["true", "false"] {
        let mut cmd = env.kubectl_cmd(&["port-forward", "pod/web-1", ":8080"]);
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", ws);
        let pf = Streaming::start(cmd);
        let port = forwarded_port(&pf);
        for _ in 0..2 {
            let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
            assert!(
                o.stdout.contains("forwarded by kubectl"),
                "websockets={ws}: {o:?} {}",
                pf.output()
            );
        }
    }
}

/// `port-forward alpha svc/web :80 --background` on 127.0.0.1, with
/// `vars` in its environment: the local port and the forward's id.
fn background_forward(env: &Env, vars: &[(&str, &str)]) -> (u16, String) {
    let mut cmd = env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "svc/web",
        ":80",
        "--background",
        "--address",
        "127.0.0.1",
    ]);
    cmd.envs(vars.iter().copied());
    let o = support::run_bounded(cmd, Duration::from_secs(60));
    assert!(o.ok(), "{o:?}");
    let port: u16 = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {o:?}"));
    let id = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("forward "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no forward id in {o:?}"))
        .to_string();
    (port, id)
}

#[test]
fn background_port_forwards_survive_the_shell_and_stop_on_request() {
    use support::apiserver::TargetPort;
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("served in the background");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Number(web.port()))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "", web.port())]);
    connected(&env, &api, &[]);
    let (port, id) = background_forward(&env, &[]);
    let o2 = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(o2.stdout.contains("served in the background"), "{o2:?}");
    let s = env.status();
    assert_eq!(s["forwards"][0]["id"], id.as_str(), "{s}");
    let o = env.towerctl(&["port-forward", "stop", &id]);
    assert!(o.ok(), "{o:?}");
    assert_eq!(env.status()["forwards"].as_array().unwrap().len(), 0);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(!o.ok(), "the forward must be gone: {o:?}");
    let o = env.towerctl(&["port-forward", "stop", &id]);
    assert!(
        o.code == Some(3) && o.stderr.contains("no background forward"),
        "{o:?}"
    );
    // A record no live forward holds (one killed with -9 whose pid another
    // process took since): not listed, and that process never signalled.
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let record = env.path("run/towerctl/pf-stale.json");
    let rec = serde_json::json!({
        "id": "stale", "pid": bystander.id(), "cluster": "alpha",
        "resource": "svc/web", "namespace": "default", "forwarding": [],
    });
    std::fs::write(&record, rec.to_string()).unwrap();
    // Nothing to stop is what --all asks for: a cleanup run twice passes.
    let o = env.towerctl(&["port-forward", "stop", "--all"]);
    assert!(
        o.ok() && o.stderr.contains("no background forward"),
        "{o:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process that took a dead forward's pid was signalled"
    );
    assert!(!record.exists());
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn pods_the_agent_cannot_route_to_are_reached_through_the_api_server() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("reached through pods/portforward");
    // The pod's IP answers nothing on its port (an agent outside the pod
    // network): the agent falls back to the API server's port-forward.
    // Bound but not listening: the port stays ours for the whole test (no
    // other test's listener can take it) and connections to it are refused.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap().port();
    api.add_pod(
        "default",
        "web-2",
        "127.0.0.1",
        &[("app", "web2")],
        true,
        &[("http", closed)],
    );
    api.set_portforward_target("default", "web-2", closed, web);
    connected(&env, &api, &[]);
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "pod/web-2",
        &format!(":{closed}"),
    ]));
    let port = forwarded_port(&pf);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(
        o.stdout.contains("reached through pods/portforward"),
        "{o:?} {}",
        pf.output()
    );
    let log = env.towerctl(&["logs", "alpha"]).stdout;
    assert!(log.contains("trying pods/portforward"), "{log}");
    let portforwards = api
        .requests()
        .iter()
        .filter(|r| r.path.contains("/pods/web-2/portforward"))
        .count();
    assert!(
        portforwards >= 1,
        "the agent must have used the API server's port-forward"
    );
}

/// `towerctl port-forward` through the gateway carries all its forwarded
/// connections as streams of one HTTP/2 connection to it, and a client that offers `h2`
/// itself (curl here, kubectl too) gets HTTP/2 from the gateway as well.
#[test]
fn port_forward_multiplexes_its_connections_over_one_gateway_connection() {
    use std::io::{Read, Write};
    use support::apiserver::TargetPort;
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("served by web");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Name("http"))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "http", web.port())]);
    connected(&env, &api, &[]);
    let s = env.status();
    let gateway_url = s["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let gateway_port = env.gateway_port();

    // Through the gateway, as from a machine without the hub.
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let pf = Streaming::start(cmd);
    let port = forwarded_port(&pf);
    let mut held = Vec::new();
    for i in 0..8 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
        let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
        while !String::from_utf8_lossy(&got).contains("served by web") {
            let n = c.read(&mut buf).unwrap_or(0);
            assert!(
                n > 0,
                "connection {i} ended early: {:?} {}",
                String::from_utf8_lossy(&got),
                pf.output()
            );
            got.extend_from_slice(&buf[..n]);
        }
        held.push(c);
    }
    // Its check of the Service went on a connection of its own, closed
    // once answered (by a task of its own: waited for a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut open = support::established_from(pf.pid(), gateway_port);
    while open != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        open = support::established_from(pf.pid(), gateway_port);
    }
    assert_eq!(
        open, 1,
        "8 forwarded connections should share one connection to the gateway on port {gateway_port}"
    );
    drop(held);

    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version}"])
        .arg(format!("{gateway_url}/healthz"));
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(o.stdout.trim(), "2", "{o:?}");
}

/// On the hub's own machine, `towerctl port-forward` hands its listening
/// socket to the hub, which carries the connections itself (one process and
/// one TLS hop fewer): the bytes are the same, nothing connects to the
/// gateway, each connection is still printed, and when the command ends the
/// port closes and its connections are cut.
#[test]
fn port_forward_on_the_hub_machine_is_carried_by_the_hub_and_ends_with_the_command() {
    let (env, _api) = echo_member();
    let gateway_port = env.gateway_port();

    let metrics = metrics_addr(&env);
    let open = |m: &str| {
        metric(
            &metrics,
            &format!("towerctl_tunnel_streams{m}{{cluster=\"alpha\"}} "),
        )
    };
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let port = forwarded_port(&pf);
    // (After its check of the Service, an API request of its own.)
    let opened_before = open("_opened_total");
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        support::echo(&mut c, &format!("hello {i}\n"))
            .unwrap_or_else(|e| panic!("connection {i}: {e}; {}", pf.output()));
        held.push(c);
    }
    assert_eq!(
        support::established_from(pf.pid(), gateway_port),
        0,
        "the forward should not use the gateway on port {gateway_port}: {}",
        pf.output()
    );
    // Held connections keep carrying bytes, 1 MiB both ways here.
    let big = "x".repeat(1 << 20);
    support::echo(&mut held[0], &big).unwrap();
    support::wait_for(
        "four 'Handling connection' lines",
        Duration::from_secs(10),
        || {
            (pf.output()
                .matches(&format!("Handling connection for {port}"))
                .count()
                == 4)
                .then_some(())
        },
    );
    let out = pf.output();
    assert!(!out.contains("note:") && !out.contains("error"), "{out}");
    // The metrics see the forwarded connections as channels of the member:
    // four open now, four more opened in all.
    assert_eq!(open(""), 4, "open channels while four connections are held");
    assert_eq!(open("_opened_total") - opened_before, 4);

    drop(pf);
    support::wait_for(
        "the forwarded port to close",
        Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        },
    );
    for (i, c) in held.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(
            support::echo(c, "still there?").is_err(),
            "held connection {i} still carried bytes after the forward ended"
        );
    }
    wait_for(
        "the metrics to show no open channel",
        Duration::from_secs(10),
        || (open("") == 0).then_some(()),
    );
}

/// Member `alpha` connected, its Service `web` (port 80) an echo server,
/// and `towerctl port-forward alpha svc/web :80` running on this (the
/// hub's) machine: the command and its local port.
fn forwarding_to_an_echo_service() -> (Env, ApiServer, Streaming, u16) {
    let (env, api) = echo_member();
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    let port = forwarded_port(&pf);
    (env, api, pf, port)
}

/// While the hub carries a forward, the command only waits for the hub's
/// reports: 300 connections wake it a few dozen times (a batch of
/// "Handling connection" lines every 20 ms at most), not once or more per
/// connection as when its own copy of the socket stayed registered for
/// readiness and every report came alone.
#[test]
fn a_forward_carried_by_the_hub_does_not_wake_the_command_per_connection() {
    let (_env, _api, pf, port) = forwarding_to_an_echo_service();
    let handled = || {
        pf.output()
            .matches(&format!("Handling connection for {port}"))
            .count()
    };
    let connect = |i: usize| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        support::echo(&mut c, &format!("hello {i}\n"))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    };
    connect(0);
    wait_for("the first report", Duration::from_secs(10), || {
        (handled() == 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = support::sleeps(pf.pid());
    let t = std::time::Instant::now();
    for i in 1..=300 {
        connect(i);
    }
    wait_for("301 reports", Duration::from_secs(20), || {
        (handled() == 301).then_some(())
    });
    let woke = support::sleeps(pf.pid()) - before;
    // At most one batch of reports per 20 ms, whatever the machine's speed;
    // a wake-up per connection (432 here before) stays well above it.
    let bound = 150 + t.elapsed().as_millis() as u64 / 20;
    assert!(
        woke < bound,
        "port-forward woke {woke} times for 300 connections the hub carried \
         in {:?} (at most {bound})",
        t.elapsed()
    );
}

/// Private memory (RssAnon, KiB) of a process.
fn rss_anon_kib(pid: i32) -> u64 {
    support::status_kib(pid, "RssAnon")
        .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"))
}

/// A forwarded connection leaves nothing behind in the hub or the agent
/// once it is closed. russh kept the sender of every channel this side had
/// closed first until the session ended (vendor/russh/PATCHES.md): ~4 KiB
/// per connection on the hub and ~1.5 KiB on the agent, so a hub carrying
/// short connections grew without bound.
#[test]
fn closed_channels_do_not_stay_in_memory() {
    let (env, _api, _pf, port) = forwarding_to_an_echo_service();
    let hub = env.pid_of("hub").expect("hub pid");
    let agent = env.pid_of("agent-alpha").expect("agent pid");
    let connect = |i: usize| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        support::echo(&mut c, &format!("hello {i}\n"))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    };
    // Warm up first: the allocator's and the runtime's pools, the watch cache.
    for i in 0..300 {
        connect(i);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (hub0, agent0) = (rss_anon_kib(hub), rss_anon_kib(agent));
    const N: u64 = 2000;
    for i in 0..N as usize {
        connect(300 + i);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (hub1, agent1) = (rss_anon_kib(hub), rss_anon_kib(agent));
    for (who, before, after) in [("hub", hub0, hub1), ("agent", agent0, agent1)] {
        let grew = after.saturating_sub(before);
        assert!(
            grew < N,
            "the {who} kept {grew} KiB more after {N} closed connections \
             ({before} -> {after} KiB private; at most 1 KiB per connection)"
        );
    }
}

/// kubectl gets HTTP/2 from the gateway, as from kube-apiserver: a cold
/// discovery (its parallel requests) and a watch after it share one TLS
/// connection instead of one each.
#[test]
fn kubectl_shares_one_http2_connection_to_the_gateway() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let port = env.gateway_port();
    let cache = env.path("kube-cache");
    let watch = Streaming::start(env.kubectl_cmd(&[
        "get",
        "configmaps",
        "-A",
        "-w",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "seen", &[("k", "v")]);
    watch.wait_for("seen", Duration::from_secs(20));
    let open = support::established_from(watch.pid(), port);
    assert_eq!(open, 1, "kubectl holds {open} connections to the gateway");
}

/// An HTTP/2 client (kubectl is one) sends many requests at once on its
/// one connection to the gateway. Each needs a tunnel channel of its own,
/// and the connection keeps them for its next requests: 48 requests, 8 at a
/// time, open about 8 channels, not one per request (the connection used to
/// keep a single channel, so all but one request of every round paid a
/// channel open and a new HTTP connection at the agent).
#[test]
fn parallel_http2_requests_reuse_their_tunnel_channels() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let addr = metrics_addr(&env);
    let series = "towerctl_tunnel_streams_opened_total{cluster=\"alpha\"} ";
    let before = metric(&addr, series);
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let url = format!(
        "https://127.0.0.1:{}/clusters/alpha/version",
        env.gateway_port()
    );
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sk", "--http2", "--parallel", "--parallel-max", "8"])
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .args(["-w", "%{http_code} %{http_version} %{num_connects}\n"]);
    for _ in 0..48 {
        curl.args(["-o", "/dev/null", &url]);
    }
    let out = support::run_bounded(curl, Duration::from_secs(60));
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 48, "{out:?}");
    let mut connects = 0;
    for l in &lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(
            &f[..2],
            ["200", "2"],
            "every request answered over HTTP/2: {l}"
        );
        connects += f[2].parse::<u32>().unwrap();
    }
    assert_eq!(
        connects, 1,
        "curl multiplexed the requests on one connection"
    );
    let opened = metric(&addr, series) - before;
    assert!(
        (1..=16).contains(&opened),
        "48 HTTP/2 requests, 8 at a time, opened {opened} tunnel channels"
    );
}

/// Ending a port-forward the hub carries also cuts a connection whose
/// stream is still being set up: with the agent frozen (SIGSTOP), a new
/// connection waits on its channel; when the command ends, the hub closes
/// it at once instead of when the frozen session finally gives out.
#[test]
fn ending_a_forward_cuts_connections_still_being_set_up() {
    use std::io::Read;
    let (env, _api, pf, port) = forwarding_to_an_echo_service();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    support::echo(&mut c, "warm\n").unwrap();

    let agent = env.pid_of("agent-alpha").expect("agent pid");
    // SAFETY: signals to the agent this test started.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    let mut waiting = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = std::time::Instant::now();
    drop(pf);
    let mut buf = [0u8; 16];
    let r = waiting.read(&mut buf);
    let took = t.elapsed();
    unsafe { libc::kill(agent, libc::SIGCONT) };
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the connection being set up was closed {took:?} after the forward ended"
    );
}

/// A client that speaks first (as HTTP clients do) through a forward the
/// hub carries: its first bytes travel with the channel's open when the
/// agent takes them there (up to 16 KiB; `wire::RawOpen`), the rest on the
/// stream. Whatever the split, every byte reaches the target once and in
/// order, for a first write shorter than the open carries, exactly as long,
/// and far longer.
#[test]
fn a_client_that_speaks_first_gets_every_byte_through_in_order() {
    let (_env, _api, _pf, port) = forwarding_to_an_echo_service();
    first_writes_come_back_whole(port);
}

/// An agent that does not take the client's first bytes in the open (as
/// one older than the hub): they go on the stream after its answer, and
/// its window in a frame, through the hub's own forward and through the
/// gateway's CONNECT alike.
#[test]
fn an_agent_that_takes_no_first_bytes_in_the_open_still_gets_them_whole() {
    let env = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "web", 80);
    connected_with_env(
        &env,
        &api,
        &[],
        &[("TOWERCTL_TEST_AGENT_WITHOUT", "open-early")],
    );
    first_writes_come_back_whole_both_ways(&env);
}

/// A hub that does not put the client's first bytes and its window in the
/// open (as one older than the agent): the agent confirms at once, says
/// its window in a frame and answers a plain `OK` (an older hub would read
/// `OK window=N` as an error), through the hub's own forward and through
/// the gateway's CONNECT alike.
#[test]
fn a_hub_that_sends_no_first_bytes_in_the_open_is_answered_as_before() {
    let (env, _api) = echo_member_of_a_hub_without("open-early");
    first_writes_come_back_whole_both_ways(&env);
}

/// A member whose Service `web` (port 80) echoes, joined to a hub.
fn echo_member() -> (Env, ApiServer) {
    let env = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "web", 80);
    connected(&env, &api, &[]);
    (env, api)
}

/// A member whose Service `web` echoes, joined to a hub started with the
/// test hook `TOWERCTL_TEST_HUB_WITHOUT=feature` (standing in for a hub
/// older than the rest).
fn echo_member_of_a_hub_without(feature: &str) -> (Env, ApiServer) {
    let env = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "web", 80);
    let o = env.up_with_env(&[("TOWERCTL_TEST_HUB_WITHOUT", feature)]);
    assert!(o.ok(), "{o:?}");
    connected(&env, &api, &[]);
    (env, api)
}

/// What `towerctl port-forward` sends with its CONNECT through the
/// gateway: the local client's first bytes, in the `towerctl-early` header.
/// The hub puts them in the channel's open and says in its 200 how many it
/// took; the target has them with nothing written on the stream, which
/// then goes on as any. A value that is not base64 is refused, naming the
/// header.
#[test]
fn first_bytes_sent_with_a_connect_reach_the_target_with_nothing_on_the_stream() {
    use std::io::{Read, Write};
    let (env, _api) = echo_member();
    let connect = |early: &str| {
        support::raw_connect(
            &env,
            "web.default.svc.alpha:80",
            &format!("towerctl-early: {early}\r\n"),
        )
    };
    let mut s = support::connect_with_first_bytes_echoed(&env, "web.default.svc.alpha:80");
    s.write_all(b" and after").unwrap();
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b" and after");

    let (head, mut s) = connect("not base64!");
    assert!(head.starts_with("http/1.1 400"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("towerctl-early header is not base64"),
        "{body}"
    );
}

/// Through the real command: a client whose bytes are there when
/// `towerctl port-forward` takes its connection (the command is stopped
/// while the client connects and writes) has them sent with the CONNECT,
/// and the hub takes them all (said at `-vv`); they come back whole.
#[test]
fn the_port_forwards_connect_carries_what_its_client_sent_first() {
    use std::io::{Read, Write};
    let (env, _api) = echo_member();
    let mut cmd = env.towerctl_cmd(&["-vv", "port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let pf = Streaming::start(cmd);
    let port = forwarded_port(&pf);
    let echo = |c: &mut std::net::TcpStream, what: &[u8]| {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = vec![0u8; what.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, what);
    };
    // The first connection opens the command's connection to the gateway.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"warm").unwrap();
    echo(&mut c, b"warm");
    let signal = |sig: &str| {
        let o = support::run_bounded(
            {
                let mut k = std::process::Command::new("kill");
                k.args([sig, &pf.pid().to_string()]);
                k
            },
            Duration::from_secs(5),
        );
        assert!(o.ok(), "kill {sig}: {o:?}");
    };
    signal("-STOP");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hello first").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal("-CONT");
    echo(&mut c, b"hello first");
    pf.wait_for(
        "11 bytes the client sent first went with the CONNECT; the hub took 11",
        Duration::from_secs(10),
    );
}

/// A hub that ignores the first bytes sent with a CONNECT (as one older
/// than the port-forward) says nothing of them in its 200: the command
/// writes them on the stream itself, and every byte arrives once, in order.
#[test]
fn a_hub_that_ignores_first_bytes_with_a_connect_still_gets_them_whole() {
    let (env, _api) = echo_member_of_a_hub_without("towerctl-early");
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let via_gateway = Streaming::start(cmd);
    first_writes_come_back_whole(forwarded_port(&via_gateway));
}

/// `towerctl port-forward` through the gateway carries bulk in buffers
/// of up to a stream's window at once (HTTP/2 frames read ahead of its
/// client). It keeps the memory they free for the next ones, as the
/// daemons do: with the allocator's defaults it handed the top of its
/// heap back to the system each time and faulted it in again page by
/// page, ~190,000 page faults per GiB (a third of its CPU).
#[test]
fn a_port_forward_through_the_gateway_carries_bulk_without_faulting_its_buffers_in_again() {
    use std::io::{Read, Write};
    let (env, _api) = echo_member();
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let pf = Streaming::start(cmd);
    let port = forwarded_port(&pf);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    const MIB: usize = 1 << 20;
    // Through the echo target and back: `mib` MiB each way, read while
    // it is written.
    let mut echo = |mib: usize| {
        let chunk: Vec<u8> = (0..MIB).map(|j| (j % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let out = chunk.clone();
        let writer = std::thread::spawn(move || {
            for _ in 0..mib {
                w.write_all(&out)?;
            }
            Ok::<_, std::io::Error>(())
        });
        let mut got = vec![0u8; MIB];
        for i in 0..mib {
            c.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("MiB {i} of {mib} back: {e}"));
            assert!(got == chunk, "MiB {i} of {mib} came back changed");
        }
        writer.join().unwrap().unwrap();
    };
    // Its connection to the gateway, threads and buffers first.
    echo(16);
    let before = support::minor_faults(pf.pid());
    echo(128);
    let faults = support::minor_faults(pf.pid()) - before;
    // 256 MiB carried are 65,536 pages; with the defaults it took ~18,000
    // faults here, with its buffers kept 100–200.
    assert!(
        faults < 4_000,
        "the port-forward took {faults} page faults carrying 128 MiB each way"
    );
}

/// A terminal that stops taking the port-forward's output (paused with
/// Ctrl-S, a pipe nobody reads) does not stop the forward: its lines wait
/// or are counted, and connections go on being carried. A `println!` per
/// connection in the accept loop stopped every connection once the pipe
/// was full (here at the 135th connection).
#[test]
fn a_port_forward_whose_terminal_takes_no_output_goes_on_forwarding() {
    use std::io::Read;
    let (env, _api) = echo_member();
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let mut pf = Unread::spawn(cmd, Unread::STDOUT);
    // "Forwarding from 127.0.0.1:PORT -> 80", and nothing read after it.
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while first.last() != Some(&b'\n') {
        assert_eq!(pf.pipe.read(&mut b).unwrap(), 1, "{first:?}");
        first.push(b[0]);
    }
    let first = String::from_utf8(first).unwrap();
    let port: u16 = first
        .split_once("127.0.0.1:")
        .and_then(|(_, r)| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    // Three pipes' worth of its ~30-byte lines.
    echo_connections(
        port,
        400.max(pf.size / 10),
        "the port-forward's output unread",
    );
}

/// An agent run in the foreground (a container, systemd) logs to stderr;
/// when nothing takes that output any more (a container runtime on a full
/// disk), its tunnel goes on: the lines wait or are counted. Logged with
/// writes on stderr, it stopped at the first line past the pipe's room,
/// and every connection of the member with it.
#[test]
fn a_foreground_agent_whose_stderr_takes_no_output_goes_on_carrying() {
    let env = Env::new();
    let api = ApiServer::start();
    support::echo_service(&api, "web", 80);
    let join = connected(&env, &api, &[]);
    env.kill9("agent-alpha");
    let down = |want: &str| {
        wait_for(
            &format!("alpha to be {want}"),
            Duration::from_secs(20),
            || (env.status()["hub"]["clusters"][0]["state"] == want).then_some(()),
        )
    };
    down("disconnected");
    let other = Env::new();
    let args = agent_run(&env, &join, &["--allow", "127.0.0.0/8"]);
    let mut cmd = other.towerctl_cmd(&strs(&args));
    // Every line it can log: the pipe is full within its login.
    cmd.env("RUST_LOG", "trace");
    let agent = Unread::spawn(cmd, Unread::STDERR);
    down("connected");
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    // Each connection logs a few hundred bytes at least.
    echo_connections(
        forwarded_port(&pf),
        200.max(agent.size / 100),
        "the agent's stderr unread",
    );
}

/// A child whose stdout or stderr is a pipe of a page (the smallest there
/// is; its size in `size`), made so before the child starts, that the test
/// does not read beyond what it asks; killed on drop.
struct Unread {
    child: std::process::Child,
    pipe: std::fs::File,
    size: usize,
}

impl Unread {
    const STDOUT: bool = true;
    const STDERR: bool = false;

    fn spawn(mut cmd: std::process::Command, stdout: bool) -> Unread {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::process::Stdio;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, each handed to one
        // owner below; fcntl on a descriptor of that pipe.
        let (read, write, size) = unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let size = libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096);
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
                size,
            )
        };
        assert!(
            size >= 4096,
            "F_SETPIPE_SZ: {}",
            std::io::Error::last_os_error()
        );
        cmd.stdin(Stdio::null());
        if stdout {
            cmd.stdout(Stdio::from(write)).stderr(Stdio::null());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::from(write));
        }
        // The write end is the child's alone once `cmd` is dropped here.
        let child = cmd.spawn().unwrap();
        Unread {
            child,
            pipe: read,
            size: size as usize,
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` connections to the echo target behind local `port`, one after
/// another, each answered within 10 s.
fn echo_connections(port: u16, n: usize, while_: &str) {
    for i in 0..n {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        support::echo(&mut c, &format!("connection {i}\n"))
            .unwrap_or_else(|e| panic!("connection {i} with {while_}: {e}"));
    }
}

/// [`first_writes_come_back_whole`] through `towerctl port-forward alpha
/// svc/web` carried by the hub, then through the gateway's CONNECT.
fn first_writes_come_back_whole_both_ways(env: &Env) {
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]));
    first_writes_come_back_whole(forwarded_port(&pf));
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let via_gateway = Streaming::start(cmd);
    first_writes_come_back_whole(forwarded_port(&via_gateway));
}

/// First writes of 5 bytes to 300 KB through the forward on `port` to an
/// echo target, each written at once before anything is read: every byte
/// comes back once and in order, and the connection goes on after.
fn first_writes_come_back_whole(port: u16) {
    use std::io::{Read, Write};
    for (i, len) in [5usize, 16 * 1024, 16 * 1024 + 1, 300_000]
        .into_iter()
        .enumerate()
    {
        let sent: Vec<u8> = (0..len).map(|j| ((j * 7 + i) % 251) as u8).collect();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut w = c.try_clone().unwrap();
        let out = sent.clone();
        // Written at once, before anything is read: the hub finds it
        // waiting when it opens the channel.
        let writer = std::thread::spawn(move || w.write_all(&out));
        let mut got = vec![0u8; len];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("a first write of {len} bytes: {e}"));
        writer.join().unwrap().unwrap();
        assert!(
            got == sent,
            "a first write of {len} bytes came back changed (first difference at byte {:?})",
            got.iter().zip(&sent).position(|(a, b)| a != b)
        );
        // And the connection goes on carrying bytes after it.
        support::echo(&mut c, "and then\n").unwrap();
    }
}

/// A connection whose forward ends while the agent is still dialing its
/// target: the agent confirms the channel only once it has dialed (with
/// its answer, `wire::RawOpen`), after the hub has stopped waiting. The
/// hub's open still takes that late confirmation and closes the channel,
/// so the agent lets the target go; dropped unawaited, the channel stayed
/// open at both ends, and the target's connection with it, until the
/// agent's session ended.
#[test]
fn a_channel_confirmed_after_its_forward_ended_is_closed_and_its_target_let_go() {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    // A target that takes no new connection for now: a backlog of one,
    // filled, so that the agent's SYN goes unanswered until the queue has
    // room again (its retry comes a second or three later).
    // SAFETY: a fresh socket, bound and listening, handed to std once.
    let target = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let r = libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0);
        assert_eq!(libc::listen(fd, 0), 0);
        std::net::TcpListener::from_raw_fd(fd)
    };
    let port = target.local_addr().unwrap().port();
    let filler = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();

    let env = Env::new();
    let api = ApiServer::start();
    api.add_service(
        "default",
        "slow",
        &[("tcp", 80, support::apiserver::TargetPort::Name("tcp"))],
        &[("app", "slow")],
    );
    api.set_endpoints("default", "slow", &[("127.0.0.1", "tcp", port)]);
    connected(&env, &api, &[]);
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "svc/slow", ":80"]));
    let local = forwarded_port(&pf);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
    c.write_all(b"hello\n").unwrap();
    // The agent is dialing; the forward ends meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    drop(pf);
    drop(c);
    // Room in the queue: the agent's retried SYN gets through.
    target.set_nonblocking(true).unwrap();
    let accept = || {
        wait_for(
            "a connection to the target",
            Duration::from_secs(15),
            || target.accept().ok().map(|(c, _)| c),
        )
    };
    let queued = accept();
    drop((queued, filler));
    let mut from_agent = accept();
    from_agent.set_nonblocking(false).unwrap();
    from_agent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let r = from_agent.read_to_end(&mut got);
    assert!(
        r.is_ok(),
        "the target's connection from the agent was still open 10 s after its dial completed \
         (read {:?} so far): {r:?}",
        String::from_utf8_lossy(&got)
    );
    // The client's first bytes, when the hub found them already there,
    // came with the open and reached the target before the agent knew
    // the client was gone; nothing else did.
    assert!(
        got.is_empty() || got == b"hello\n",
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A port-forward through the gateway whose hub stops answering (its host
/// gone, a VPN dropped; here the hub stopped with SIGSTOP) says so for
/// each new connection within the deadlines (the CONNECT's answer 25 s),
/// instead of holding them with no end; and goes on once the hub answers
/// again.
#[test]
fn a_port_forward_whose_gateway_stops_answering_says_so_and_recovers() {
    use std::io::{Read, Write};
    let (env, _api) = echo_member();
    let mut cmd = env.towerctl_cmd(&["port-forward", "alpha", "svc/web", ":80"]);
    cmd.env("TOWERCTL_FORWARD_VIA", "gateway");
    let pf = support::Streaming::start(cmd);
    let port = support::forwarded_port(&pf);
    let echo_once = |what: &str| -> std::io::Result<()> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(40)))?;
        c.write_all(what.as_bytes())?;
        let mut buf = vec![0u8; what.len()];
        c.read_exact(&mut buf)?;
        (buf == what.as_bytes())
            .then_some(())
            .ok_or_else(|| std::io::Error::other("not echoed"))
    };
    echo_once("before").expect("the forward works");
    let hub = env.pid_of("hub").unwrap();
    // SAFETY: a plain signal to the hub this test started.
    unsafe { libc::kill(hub, libc::SIGSTOP) };
    let resume = support::scopeguard_cont(hub);
    let at = std::time::Instant::now();
    let stalled = echo_once("during");
    let took = at.elapsed();
    drop(resume);
    assert!(stalled.is_err(), "echoed through a stopped hub?");
    assert!(
        took < Duration::from_secs(35),
        "the connection was held {took:?}"
    );
    // Said: the CONNECT's deadline, or the PINGs' (whichever ran out first
    // on a busy machine: both are 25 s).
    wait_for("the forward to say why", Duration::from_secs(5), || {
        let out = pf.output();
        out.contains("did not answer").then_some(())
    });
    wait_for("the forward to work again", Duration::from_secs(30), || {
        echo_once("after").ok()
    });
}

/// As kubectl: an address named with `--address` must be bound, or the
/// command fails naming it (with `localhost`, one of its two addresses
/// will do). It used to forward on the addresses that bound and say
/// nothing of the one that did not.
#[test]
fn a_port_forward_address_that_cannot_be_bound_fails_the_command_naming_it() {
    let (env, _api) = echo_member();
    let held = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let o = support::run_bounded(
        env.towerctl_cmd(&[
            "port-forward",
            "alpha",
            "svc/web",
            &format!("{port}:80"),
            "--address",
            "127.0.0.1,127.0.0.2",
        ]),
        Duration::from_secs(20),
    );
    assert!(
        !o.ok()
            && o.stderr
                .contains(&format!("unable to listen on 127.0.0.2:{port}")),
        "{o:?}"
    );
    assert!(o.stderr.contains("':80' picks a free one"), "{o:?}");
}

/// `--shutdown-delay`: on SIGTERM (a pod being stopped) the hub answers 503
/// on both `/readyz` while it goes on serving, then stops, so that a load
/// balancer stops sending new connections first; it used to close its
/// listeners at once. `towerctl down` stops it at once.
#[test]
fn a_hub_stopped_by_a_signal_answers_503_on_readyz_for_its_shutdown_delay() {
    let env = Env::new();
    let o = env.up_with(&["--shutdown-delay", "3s"]);
    assert!(o.ok(), "{o:?}");
    let s = env.status();
    let tunnel = s["hub"]["tunnelAddress"].as_str().unwrap().to_string();
    let gateway = s["hub"]["gatewayAddress"].as_str().unwrap().to_string();
    let ca = env.path("data/towerctl/ca.crt");
    let gw = |path: &str| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca)
            .arg(format!("https://{gateway}{path}"));
        support::run_bounded(c, Duration::from_secs(15)).stdout
    };
    let tun = |path: &str| support::curl_within(&format!("http://{tunnel}{path}"), 5).stdout;
    assert_eq!(tun("/readyz").trim(), "ok");
    assert!(gw("/readyz").ends_with("\n200"), "{}", gw("/readyz"));
    let pid = env.pid_of("hub").unwrap();
    let sent = std::time::Instant::now();
    // SAFETY: signalling the hub this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        tun("/readyz").contains("stopping (--shutdown-delay)"),
        "{}",
        tun("/readyz")
    );
    let g = gw("/readyz");
    assert!(g.contains("stopping") && g.ends_with("\n503"), "{g}");
    // Still serving meanwhile.
    assert_eq!(tun("/healthz").trim(), "ok");
    assert!(gw("/healthz").ends_with("\n200"));
    wait_for("the hub to stop", Duration::from_secs(15), || {
        // SAFETY: probing a pid this test started.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "stopped after {took:?}"
    );

    // `towerctl down` does not wait for the delay.
    let o = env.up_with(&["--shutdown-delay", "60s"]);
    assert!(o.ok(), "{o:?}");
    let asked = std::time::Instant::now();
    assert!(env.towerctl(&["down"]).ok());
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );

    // Nor does a second signal (Ctrl-C twice).
    let o = env.up_with(&["--shutdown-delay", "60s"]);
    assert!(o.ok(), "{o:?}");
    let pid = env.pid_of("hub").unwrap();
    let tunnel = env.status()["hub"]["tunnelAddress"]
        .as_str()
        .unwrap()
        .to_string();
    // SAFETY: signalling the hub this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("the hub to drain", Duration::from_secs(10), || {
        support::curl_within(&format!("http://{tunnel}/readyz"), 5)
            .stdout
            .contains("stopping")
            .then_some(())
    });
    let again = std::time::Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGINT) };
    wait_for("the hub to stop at once", Duration::from_secs(15), || {
        // SAFETY: probing a pid this test started.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    eprintln!("stopped {:?} after the second signal", again.elapsed());
}

/// As kubectl, `towerctl port-forward` checks its target before it
/// listens (it used to print "Forwarding from …" for anything and fail on
/// every connection, and scripts waiting on its exit never saw one), and
/// takes the namespace of the cluster's kubeconfig context when `-n` is
/// not given (it took `default`, whatever the context said).
#[test]
fn port_forward_checks_its_target_first_and_takes_the_contexts_namespace() {
    let (env, _api) = echo_member();
    for (target, says) in [
        ("svc/nosuch", "services \"nosuch\" not found"),
        ("pod/nosuch", "pods \"nosuch\" not found"),
        ("deploy/nosuch", "\"nosuch\" not found"),
    ] {
        let o = env.towerctl(&["port-forward", "alpha", target, ":80"]);
        assert!(
            o.code == Some(1) && o.stderr.contains(says) && !o.stdout.contains("Forwarding"),
            "{target}: {o:?}"
        );
    }
    let o = env.kubectl(&[
        "config",
        "set-context",
        "tower-alpha",
        "--namespace",
        "other",
    ]);
    assert!(o.ok(), "{o:?}");
    let o = env.towerctl(&["port-forward", "alpha", "svc/web", ":80"]);
    assert!(
        o.code == Some(1) && o.stderr.contains("services \"web\" not found"),
        "the context's namespace was not taken: {o:?}"
    );
    // A port named as the Service names it (kubectl's `:https`); a name
    // it does not have is refused at once.
    let o = env.towerctl(&["port-forward", "alpha", "svc/web", ":nope", "-n", "default"]);
    assert!(
        o.code == Some(1)
            && o.stderr
                .contains("Service 'web' does not have a port named 'nope'"),
        "{o:?}"
    );
    // Both families' any-address, as kubectl binds them: `::` is IPv6
    // alone (it listened on IPv4 too, and the second bind failed "in use").
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "svc/web",
        ":tcp",
        "-n",
        "default",
        "--address",
        "0.0.0.0,::",
    ]));
    pf.wait_for("Forwarding from [::]:", Duration::from_secs(20));
    assert!(
        pf.output().contains("Forwarding from 0.0.0.0:"),
        "{}",
        pf.output()
    );
    drop(pf);
    // -n says otherwise: found, and forwarded.
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "svc/web",
        ":tcp",
        "-n",
        "default",
        "--address",
        "127.0.0.1",
    ]));
    let port = forwarded_port(&pf);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    support::echo(&mut c, "through -n\n").unwrap_or_else(|e| panic!("{e}; {}", pf.output()));
}

/// Every workload kubectl port-forwards to (`sts/`, `rs/`, `ds/`, `job/`,
/// `rc/` besides `deploy/`) is a target: a pod of it, found by its
/// selector (`matchExpressions` here), and its pod template's named
/// container ports.
#[test]
fn port_forward_reaches_a_statefulsets_pod_by_a_named_port() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("served by the statefulset's pod");
    api.add_pod(
        "default",
        "db-0",
        "127.0.0.1",
        &[("app", "db")],
        true,
        &[("pg", web.port())],
    );
    api.add_statefulset("default", "db", &[("app", "db")], ("pg", web.port()));
    connected(&env, &api, &[]);
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "statefulset/db",
        ":pg",
        "--address",
        "127.0.0.1",
    ]));
    let port = forwarded_port(&pf);
    assert!(
        pf.output().contains(&format!("-> {}", web.port())),
        "{}",
        pf.output()
    );
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(
        o.stdout.contains("served by the statefulset's pod"),
        "{o:?} {}",
        pf.output()
    );
    let o = env.towerctl(&["port-forward", "alpha", "sts/nosuch", ":5432"]);
    assert!(
        o.code == Some(1) && o.stderr.contains("\"nosuch\" not found"),
        "{o:?}"
    );
    // A pod whose name holds dots, as Kubernetes allows (kubectl forwards
    // to it; it used to be refused as an invalid name).
    let dotted = support::http_server("served by the dotted pod");
    api.add_pod(
        "default",
        "cache.v2",
        "127.0.0.1",
        &[("app", "cache")],
        true,
        &[("http", dotted.port())],
    );
    drop(pf);
    let remote = format!(":{}", dotted.port());
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "pod/cache.v2",
        &remote,
        "--address",
        "127.0.0.1",
    ]));
    let port = forwarded_port(&pf);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 15);
    assert!(
        o.stdout.contains("served by the dotted pod"),
        "{o:?} {}",
        pf.output()
    );
}

/// A member reached through its API server's `pods/portforward` (an agent
/// outside the pod network) carries as many such connections as its
/// memory budget allows: kube buffers up to 1 MiB each way for each, and
/// the budget counted them as 32 KiB (an agent under a pod's 256 MiB
/// limit took 1,024 of them, 2 GiB). Each takes 64 of the raw streams'
/// 3,072 permits here (no memory limit): 48 at once, the next refused in
/// words, and room again once one ends. (Without the budget, the 49th
/// went through.)
#[test]
fn connections_through_the_members_port_forward_are_held_to_the_agents_budget() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let env = Env::new();
    let api = ApiServer::start();
    // A target that holds every connection until its client closes it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = holder.local_addr().unwrap();
    // Connections open at the target now, and the most at once.
    let live = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    {
        let (live, most) = (live.clone(), most.clone());
        std::thread::spawn(move || {
            // Bounded: 60 connections, each at most a minute.
            for mut c in holder.incoming().take(60).flatten() {
                most.fetch_max(live.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let live = live.clone();
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut b = [0u8; 64];
                    while let Ok(n) = c.read(&mut b) {
                        if n == 0 || c.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    api.add_pod(
        "default",
        "web-1",
        "10.99.0.1",
        &[("app", "web")],
        true,
        &[("echo", 7000)],
    );
    api.set_portforward_target("default", "web-1", 7000, target);
    connected(&env, &api, &["--pod-network", "portforward"]);
    let pf = Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", "pod/web-1", ":7000"]));
    let port = forwarded_port(&pf);
    let open = || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        let echoed = matches!(c.read(&mut b), Ok(1));
        (c, echoed)
    };
    // 3,072 permits, or what a memory limit leaves (the agent says).
    let agent_log =
        std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    let permits: usize = agent_log
        .split("port-forward and CONNECT streams to ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(3072);
    let fit = permits / 64;
    let mut conns = Vec::new();
    for i in 0..fit {
        let (c, echoed) = open();
        assert!(echoed, "connection {i}: {}", pf.output());
        conns.push(c);
    }
    // Three more: refused (one of those ending meanwhile makes room for
    // one), never more than fit at the target at once.
    let extra: Vec<_> = (0..3).map(|_| open()).collect();
    assert!(extra.iter().any(|(_, echoed)| !echoed), "all got through");
    pf.wait_for("which takes 64 of them each", Duration::from_secs(15));
    assert_eq!(most.load(Ordering::SeqCst), fit);
    drop(extra);
    drop(conns.pop());
    wait_for("room again once one ended", Duration::from_secs(15), || {
        let (c, echoed) = open();
        echoed.then_some(c)
    });
}

/// A listener on loopback that takes no connection: its accept queue is
/// full, so a connect to it goes unanswered, as to a pod address on a
/// network the agent does not reach (its packets dropped).
fn black_hole() -> (
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    std::os::fd::OwnedFd,
) {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    assert_eq!(
        unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) },
        0
    );
    assert_eq!(unsafe { libc::listen(raw, 0) }, 0);
    let mut got: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut l = len;
    assert_eq!(
        unsafe { libc::getsockname(raw, &mut got as *mut _ as *mut libc::sockaddr, &mut l) },
        0
    );
    let addr =
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, u16::from_be(got.sin_port)));
    // Fill the queue until a connect goes unanswered (bounded).
    let mut held = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(c) => held.push(c),
            Err(_) => return (addr, held, fd),
        }
    }
    panic!("the listener's queue never filled");
}

/// Under `--pod-network auto` (the default), a pod address that goes
/// unanswered (an agent outside the pod network) is given up on quickly
/// for the API server's port-forward, and for a while the next
/// connections go there at once instead of waiting on the address again.
#[test]
fn auto_pod_network_stops_trying_pod_addresses_that_go_unanswered() {
    use std::io::{Read, Write};
    let env = Env::new();
    let api = ApiServer::start();
    let (hole, _queued, _listener) = black_hole();
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        // Bounded: 4 connections, each at most 30 s.
        for mut c in echo.incoming().take(4).flatten() {
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    api.add_pod(
        "default",
        "web-1",
        "127.0.0.1",
        &[("app", "web")],
        true,
        &[("echo", hole.port())],
    );
    api.set_portforward_target("default", "web-1", hole.port(), target);
    connected(&env, &api, &[]);
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "pod/web-1",
        &format!(":{}", hole.port()),
    ]));
    let port = forwarded_port(&pf);
    for i in 0..2 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(c.read(&mut b), Ok(1)),
            "connection {i}: {}",
            pf.output()
        );
    }
    let log =
        std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    assert_eq!(
        log.matches("no answer within").count(),
        1,
        "the pod's address was tried again: {log}"
    );
    assert!(
        log.contains("through the API server's port-forward for the next"),
        "{log}"
    );
}

/// A background forward's "Handling connection for" lines count toward its
/// log's bound: the log rotates, and no file passes it.
#[test]
fn a_background_forwards_connection_lines_rotate_its_log() {
    use support::apiserver::TargetPort;
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("rotated");
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Number(web.port()))],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "", web.port())]);
    connected(&env, &api, &[]);
    let (port, id) = background_forward(&env, &[("TOWERCTL_LOG_MAX_BYTES", "4096")]);
    // ~30 bytes a connection: 400 of them are three times the bound.
    for _ in 0..400 {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        drop(c);
    }
    let log = env.path(&format!("state/towerctl/pf-{id}.log"));
    let rotated = env.path(&format!("state/towerctl/pf-{id}.log.1"));
    wait_for(
        "the forward's log to rotate",
        Duration::from_secs(20),
        || rotated.exists().then_some(()),
    );
    for p in [&log, &rotated] {
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(len <= 4096, "{} is {len} bytes", p.display());
    }
    let o = env.towerctl(&["port-forward", "stop", &id]);
    assert!(o.ok(), "{o:?}");
}

/// An agent whose hubs are all down says each hub's failure once, not once
/// per attempt (two hubs dialed in turn alternated their messages, and
/// each attempt logged a warning and an event).
#[test]
fn an_agent_says_each_hubs_failure_once() {
    let env = Env::new();
    let api = ApiServer::start();
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    // Two ports nothing listens on: refused at once.
    let closed = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (a, b) = (closed(), closed());
    let agent = Streaming::start(env.towerctl_cmd(&[
        "agent",
        "run",
        "alpha",
        "--hub",
        &format!("ws://127.0.0.1:{a}/tunnel"),
        "--hub",
        &format!("ws://127.0.0.1:{b}/tunnel"),
        "--insecure-skip-hub-key",
        "--token",
        "tj_x",
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--backoff-cap",
        "1s",
    ]));
    wait_for("six attempts", Duration::from_secs(30), || {
        (agent.output().matches("retrying in").count() >= 6).then_some(())
    });
    let out = agent.output();
    for port in [a, b] {
        let said = format!("cannot reach the hub at 'ws://127.0.0.1:{port}/tunnel'");
        assert_eq!(out.matches(&said).count(), 1, "{said} in:\n{out}");
    }
}

/// Under `--pod-network auto`, a port the pod's address refuses is tried
/// through the API server's port-forward, and when the kubelet refuses it
/// too, the operator hears why (the stream used to be taken and ended
/// empty: curl's "Empty reply").
#[test]
fn a_port_refused_through_the_port_forward_too_is_said() {
    let env = Env::new();
    let api = ApiServer::start();
    // A port nothing listens on, at the pod's address and behind the
    // stand-in's port-forward alike.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    api.add_pod(
        "default",
        "web-1",
        "127.0.0.1",
        &[("app", "web")],
        true,
        &[("web", closed)],
    );
    connected(&env, &api, &[]);
    let pf = Streaming::start(env.towerctl_cmd(&[
        "port-forward",
        "alpha",
        "pod/web-1",
        &format!(":{closed}"),
    ]));
    let port = forwarded_port(&pf);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
    pf.wait_for(
        &format!("port-forward to pod default/web-1 port {closed}: error forwarding"),
        Duration::from_secs(15),
    );
}

/// A gateway client that stops reading what it asked for is dropped once
/// the hub's writes to it have waited for the write-stall limit (2 s here):
/// what the hub queued for it is not held for as long as it keeps the
/// connection open.
#[test]
fn a_gateway_client_that_reads_nothing_is_dropped() {
    use std::io::{Read, Write};
    let env = Env::new();
    let api = ApiServer::start();
    env.up_with_env(&[("TOWERCTL_GATEWAY_WRITE_STALL", "2")]);
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join_with_env(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
        &[],
    );
    assert!(o.ok(), "{o:?}");
    // An answer of ~48 MiB, far more than the sockets on the way hold.
    let big = "x".repeat(1 << 20);
    for i in 0..48 {
        api.create_configmap("default", &format!("big-{i}"), &[("data", big.as_str())]);
    }
    let token = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let mut s = support::gateway_stream(&env);
    write!(
        s,
        "GET /clusters/alpha/api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        token.trim()
    )
    .unwrap();
    s.flush().unwrap();
    // Reads nothing for four times the limit, then everything it can.
    std::thread::sleep(Duration::from_secs(8));
    s.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got > 0, "nothing came at all");
    assert!(got < 40 << 20, "{got} bytes came: the connection was kept");
}

/// `up` on a registry file that is damaged (cut short by a full disk or a
/// bad copy, or not a registry at all) says which file and what to do:
/// it said "the daemon exited (code 101)" for the first, and cut the
/// message of the second to "invalid data. Is another hub running with
/// the same data directory?".
#[test]
fn up_on_a_damaged_registry_names_the_file_and_what_to_do() {
    let env = Env::new();
    assert!(env.up().ok());
    assert!(env.towerctl(&["down"]).ok());
    let registry = env.path("data/towerctl/hub.redb");
    let len = std::fs::metadata(&registry).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&registry)
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    for round in ["cut short", "not a registry"] {
        let o = env.up_unchecked();
        assert!(!o.ok(), "{round}: {o:?}");
        let err = o.all();
        assert!(
            err.contains(registry.to_str().unwrap())
                && err.contains("Restore it from a backup")
                && !err.contains("code 101")
                && !err.contains("another hub"),
            "{round}: {o:?}"
        );
        std::fs::write(&registry, vec![0x5a; 3000]).unwrap();
    }
    // Moved away: the hub starts on an empty registry, and says that the
    // data directory had one before.
    std::fs::remove_file(&registry).unwrap();
    assert!(env.up().ok());
    let log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap();
    assert!(
        log.contains("is new, but this data directory holds a host key from before"),
        "{log}"
    );
}

/// `status` says which agent settings it cannot read (cut short, edited by
/// hand) instead of leaving that agent out without a word.
#[test]
fn status_names_agent_settings_it_cannot_read() {
    let env = Env::new();
    let dir = env.path("config/towerctl/agents");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("alpha.json"), "{\"name\":\"alpha\",").unwrap();
    let o = env.towerctl(&["status"]);
    assert!(
        o.stderr.contains("alpha.json' cannot be read") && o.stderr.contains("join' again"),
        "{o:?}"
    );
}

/// The join token leaves the agent's saved settings at its first login:
/// the hub accepts a token only once it has written the key it was offered
/// into the member's record, so the key is registered then. It used to
/// stay on disk (and, reusable, able to join the name again) until a
/// second session logged in by key: for as long as the first one lasted.
/// A hub up in `env`, member `alpha` added with a reusable token: its
/// join command and the member kubeconfig (for `api`) to join with.
fn reusable_alpha(env: &Env, api: &ApiServer) -> (Vec<String>, std::path::PathBuf) {
    assert!(env.up().ok());
    let o = env.towerctl(&["cluster", "add", "alpha", "--reusable"]);
    assert!(o.ok(), "{o:?}");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    (support::printed_command(&o.stdout, "join"), kc)
}

#[test]
fn the_join_token_leaves_the_agents_settings_at_its_first_login() {
    let env = Env::new();
    let api = ApiServer::start();
    let (join, kc) = reusable_alpha(&env, &api);
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    let settings = env.path("config/towerctl/agents/alpha.json");
    wait_for(
        "the token to leave the settings",
        Duration::from_secs(10),
        || {
            let s = std::fs::read_to_string(&settings).unwrap_or_default();
            (s.contains("\"hub\"") && !s.contains("\"token\"")).then_some(())
        },
    );
    let agent = &env.status()["agents"][0];
    assert_eq!(agent["state"], "connected", "{agent}");
    assert_eq!(agent["reconnects"], 0, "still the first session: {agent}");
}

/// Two joins of one name at once: one agent runs and its join says so;
/// the other join says the agent is already running (both said "joined"
/// with the first one's pid, and the second agent, still waiting for the
/// name's lock, took it when `leave` stopped the first: it ran on,
/// forgotten, where neither `status` nor `leave` could see it).
#[test]
fn two_joins_of_one_name_at_once_leave_one_agent_and_leave_stops_it() {
    let env = Env::new();
    let api = ApiServer::start();
    let (join, kc) = reusable_alpha(&env, &api);
    let extra = ["--kubeconfig", kc.to_str().unwrap()];
    let (a, b) = std::thread::scope(|s| {
        let one = s.spawn(|| env.join(&join, &extra));
        let two = s.spawn(|| env.join(&join, &extra));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert!(a.ok() != b.ok(), "one join succeeds: {a:?} {b:?}");
    let lost = if a.ok() { &b } else { &a };
    assert!(lost.all().contains("already running"), "{lost:?}");
    // The running agent keeps its settings (the join that lost wrote the
    // same bytes, and put back "nothing" over them).
    assert!(
        env.path("config/towerctl/agents/alpha.json").exists(),
        "the running agent's settings were removed"
    );
    assert_eq!(env.status()["agents"][0]["name"], "alpha");
    let o = env.towerctl(&["leave", "alpha"]);
    assert!(o.ok(), "{o:?}");
    std::thread::sleep(Duration::from_millis(1500));
    if let Some(pid) = env.pid_of("agent-alpha") {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        assert!(
            stat.is_empty() || state.starts_with('Z'),
            "an agent for alpha still runs after leave (pid {pid}): {stat}"
        );
    }
}

/// An agent joined with its kubeconfig from `KUBECONFIG` keeps the file
/// in its settings: started again without that environment (a service
/// unit runs `agent run NAME --config …`), it found no credentials and
/// exited, every 5 s under systemd.
#[test]
fn a_kubeconfig_from_the_environment_is_kept_with_the_agent() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = env.join_with_env(
        &join,
        &["--allow", "127.0.0.0/8"],
        &[("KUBECONFIG", kc.to_str().unwrap())],
    );
    assert!(o.ok(), "{o:?}");
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.path("config/towerctl/agents/alpha.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["kubeconfig"], kc.to_str().unwrap(), "{saved}");
    // Started again as a unit would, without KUBECONFIG: it connects.
    let pid = env.pid_of("agent-alpha").unwrap();
    env.kill9("agent-alpha");
    wait_for("the old agent gone", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let cfg = env.path("config/towerctl/agents/alpha.json");
    let mut cmd = env.towerctl_cmd(&["agent", "run", "alpha", "--config", cfg.to_str().unwrap()]);
    cmd.env_remove("KUBECONFIG");
    let _agent = Streaming::start(cmd);
    assert!(env.towerctl(&["use", "alpha"]).ok());
    wait_for("alpha served again", Duration::from_secs(30), || {
        env.kubectl(&["get", "ns"]).ok().then_some(())
    });
}

/// A member removed and added again under its name is a new one: never
/// connected, with none of the old one's events (it showed
/// "disconnected" since the old session's end, and its history).
#[test]
fn a_member_removed_and_added_again_starts_afresh() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    assert!(env.towerctl(&["cluster", "rm", "alpha"]).ok());
    assert!(env.towerctl(&["cluster", "add", "alpha"]).ok());
    // Switching to it says it is not connected (rather than kubectl's
    // first 503).
    let o = env.towerctl(&["use", "alpha"]);
    assert!(
        o.ok()
            && o.stderr
                .contains("note: cluster 'alpha' is never_connected now"),
        "{o:?}"
    );
    // Whatever the old session's end still records, now or in a moment.
    for _ in 0..3 {
        let s = env.status();
        let c = &s["hub"]["clusters"][0];
        assert_eq!(c["state"], "never_connected", "{s}");
        assert!(c["since"].is_null(), "{s}");
        let events = c["events"].as_array().cloned().unwrap_or_default();
        assert!(
            events
                .iter()
                .all(|e| !e["text"].as_str().unwrap_or("").contains("connected")),
            "an earlier member's events: {s}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A watch whose tunnel goes away (its agent killed) ends with kubectl
/// saying why: the broken stream ended `kubectl get -w` with no word.
/// kubectl prints a watch's ERROR event as a row and exits 0 either way
/// (measured with kubectl 1.32).
#[test]
fn a_watch_whose_agent_goes_away_says_why() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let mut watch = Streaming::start(env.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "before-the-kill", &[("k", "v")]);
    watch.wait_for("before-the-kill", Duration::from_secs(20));
    env.kill9("agent-alpha");
    wait_for("the watch to end", Duration::from_secs(20), || {
        watch.has_exited().then_some(())
    });
    let out = watch.output();
    assert!(
        out.contains("ServiceUnavailable")
            && out.contains("the watch on cluster 'alpha' broke on its way from the member"),
        "{out}"
    );
}

/// The member's API server refusing the agent's own credentials (a token
/// expired) reaches kubectl as that, not as "You must be logged in to the
/// server" (which reads as the operator's token); it and an API server
/// that does not answer are said in the agent's log too (with the tunnel
/// up, `status` says "connected": they were nowhere else).
#[test]
fn the_members_refusals_and_absence_are_said_as_the_agents() {
    let env = Env::new();
    let api = ApiServer::start();
    assert!(env.up().ok());
    let join = env.cluster_add("alpha");
    let kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let text = std::fs::read_to_string(&kc).unwrap();
    std::fs::write(
        &kc,
        text.replace(support::apiserver::TOKEN, "an-expired-token"),
    )
    .unwrap();
    let o = env.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "ns"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("refused the towerctl agent's own credentials")
            && !o.stderr.contains("must be logged in"),
        "{o:?}"
    );
    drop(api);
    let o = env.kubectl(&["get", "ns", "--request-timeout", "20s"]);
    assert!(!o.ok(), "{o:?}");
    let log = env.towerctl(&["logs", "alpha"]).stdout;
    assert!(
        log.contains("refused the agent's own credentials")
            && log.contains("cannot reach the member's API server"),
        "{log}"
    );
}

/// A hub whose process is suspended (SIGSTOP, a debugger) is said to be
/// that by `status`, with the way out; it was "starting … waits for etcd".
#[test]
fn status_says_a_suspended_hub_is_suspended() {
    let env = Env::new();
    assert!(env.up().ok());
    let pid = env.pid_of("hub").expect("the hub's pid");
    // SAFETY: signalling the hub this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let o = env.towerctl(&["status"]);
    let j = env.towerctl(&["status", "-o", "json"]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        o.stdout.contains(&format!("HUB  stopped (pid {pid})"))
            && o.stdout.contains(&format!("kill -CONT {pid}")),
        "{o:?}"
    );
    // A script reading JSON learns it too (`hub` null was "not running").
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("status JSON");
    assert!(v["hub"].is_null(), "{v}");
    assert_eq!(
        v["hubProcess"],
        serde_json::json!({ "pid": pid, "state": "suspended" }),
        "{v}"
    );
}

/// Joins member `alpha` (its API server `api`) to `env`'s running hub
/// through a relay delaying each way by `each_way_ms` (the kernel here has
/// no netem), with `extra` join flags: the relay (kept for as long as the
/// member is used) and the join's output.
fn join_far(
    env: &Env,
    api: &ApiServer,
    each_way_ms: u64,
    extra: &[&str],
) -> (support::DelayProxy, support::Out) {
    let mut join = env.cluster_add("alpha");
    let hub = join.iter().position(|a| a == "--hub").unwrap() + 1;
    let tunnel: std::net::SocketAddr = join[hub]
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a ws:// hub address in {join:?}"));
    let far = support::DelayProxy::start(tunnel, Duration::from_millis(each_way_ms));
    join[hub] = join[hub].replace(&tunnel.to_string(), &far.addr.to_string());
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let mut flags = vec!["--kubeconfig", member_kc.to_str().unwrap()];
    flags.extend_from_slice(extra);
    let o = env.join(&join, &flags);
    (far, o)
}

/// [`join_far`]: the agent logs in at its first attempt, and kubectl
/// reaches the member through it.
fn logs_in_at_its_first_attempt(env: &Env, api: &ApiServer, each_way_ms: u64, extra: &[&str]) {
    let t = std::time::Instant::now();
    let (_far, o) = join_far(env, api, each_way_ms, extra);
    let log =
        std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    eprintln!("join took {:?}", t.elapsed());
    assert!(o.ok(), "join through the relay: {o:?}\n{log}");
    assert!(
        !log.contains("retrying"),
        "the agent's first login did not come through:\n{log}"
    );
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "--raw", "/version", "--request-timeout=30s"]);
    assert!(o.ok() && o.stdout.contains("gitVersion"), "{o:?}");
}

/// A member far away (100 ms each way between hub and agent, through a
/// relay that delays what it carries): the first request of a new kubectl
/// connection reaches the member with its channel's open, one round trip
/// to the member in all. Each kubectl command is a new connection to the
/// gateway, and each of its requests a channel to the member; the open
/// used to be answered before the request went, two round trips.
#[test]
fn a_new_connections_first_request_goes_with_its_channels_open() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (_far, o) = join_far(&env, &api, 100, &[]);
    assert!(o.ok(), "join through the relay: {o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    // client-go's own figure for the request (its connection and TLS to
    // the gateway, the answer), from its log at -v=6.
    let timed = || {
        let o = env.kubectl(&["get", "--raw", "/version", "-v=6", "--request-timeout=30s"]);
        assert!(o.ok(), "{o:?}");
        let ms = o
            .stderr
            .lines()
            .filter(|l| l.contains("/version"))
            .find_map(|l| {
                l.split(" 200 OK in ")
                    .nth(1)?
                    .strip_suffix(" milliseconds")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no timed request in kubectl's log: {o:?}"));
        Duration::from_millis(ms)
    };
    let mut took: Vec<Duration> = (0..3).map(|_| timed()).collect();
    took.sort();
    eprintln!("kubectl's request on a new connection, 200 ms round trip to the member: {took:?}");
    assert!(
        took[1] < Duration::from_millis(300),
        "a request on a new connection took {took:?}: more than one 200 ms round trip to the member"
    );
    // A request that has a channel already goes as before (the open
    // carried only the first).
    let o = env.kubectl(&["get", "pods", "-A", "--request-timeout=30s"]);
    assert!(o.ok(), "{o:?}");
}

/// A read whose first bytes went in its channel's open reaches the
/// member whole, with a head longer than the open carries (the rest
/// follows on the channel), and a write with a 40 KB body, which waits
/// for its channel; and so do requests between a hub and an agent of
/// which one does not know the way (an older one), which open first and
/// send after.
#[test]
fn requests_reach_the_member_whole_with_or_without_the_request_in_the_open() {
    let value: String = (0..40_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for (hub_without, agent_without) in [(false, false), (true, false), (false, true)] {
        let env = Env::new();
        let api = ApiServer::start();
        if hub_without {
            let o = env.up_with_env(&[("TOWERCTL_TEST_HUB_WITHOUT", "request-in-open")]);
            assert!(o.ok(), "{o:?}");
        }
        let agent_env: &[(&str, &str)] = if agent_without {
            &[("TOWERCTL_TEST_AGENT_WITHOUT", "request-in-open")]
        } else {
            &[]
        };
        connected_with_env(&env, &api, &[], agent_env);
        let case = format!("hub without: {hub_without}, agent without: {agent_without}");
        let o = env.kubectl(&["get", "--raw", "/version"]);
        assert!(o.ok() && o.stdout.contains("gitVersion"), "{case}: {o:?}");
        let literal = format!("data={value}");
        let o = env.kubectl(&["create", "configmap", "big", "--from-literal", &literal]);
        assert!(o.ok(), "{case}: {o:?}");
        let o = env.kubectl(&["get", "configmap", "big", "-o", "jsonpath={.data.data}"]);
        assert!(o.ok(), "{case}: {o:?}");
        assert!(
            o.stdout == value,
            "{case}: the value came back as {} bytes",
            o.stdout.len()
        );
        // A read whose head is longer than an open carries (16 KiB): the
        // rest follows on the channel.
        let long = format!(
            "/api/v1/namespaces/default/configmaps/big?pad={}",
            "p".repeat(30_000)
        );
        let o = env.kubectl(&["get", "--raw", &long]);
        assert!(o.ok(), "{case}: {o:?}");
        assert!(
            o.stdout.contains(&value),
            "{case}: the long read's answer: {} bytes",
            o.stdout.len()
        );
    }
}

/// A member a second away (500 ms each way through a relay), on a hub
/// whose keepalive is shorter than that (1 s, as in every test here): its
/// agent logs in at its first attempt. The hub sent keepalives during the
/// login once it had waited an interval for the agent, and russh's client
/// ended the session on a global request before its login ended ("the hub
/// closed the connection before answering the login"): such a member
/// never came through. Now the hub sends none before the login (as the
/// agent did already), and the agent answers one from an older hub.
#[test]
fn a_member_a_second_away_logs_in_at_its_first_attempt() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    logs_in_at_its_first_attempt(&env, &api, 500, &[]);
}

/// A write whose client gave up while its new channel waited for the
/// agent (stopped here, as a wedged or overloaded one is) is never run:
/// it goes once the channel is confirmed, and not at all with nobody
/// waiting for it. Only reads go with a channel's open, which leaves the
/// hub for good: a DELETE in it ran when the agent woke, after the client
/// had been told it failed (or was answered 504, or had its access
/// withdrawn), and a retry ran it twice.
#[test]
fn a_write_whose_client_left_while_its_channel_opened_never_runs() {
    let env = Env::new();
    let api = ApiServer::start();
    connected(&env, &api, &[]);
    let gw = env.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = std::fs::read_to_string(env.path("data/towerctl/admin.token")).unwrap();
    let curl = |method: &str, max: &str, name: &str| {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            max,
        ])
        .args(["-X", method, "--cacert"])
        .arg(env.path("data/towerctl/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", admin.trim())])
        .arg(format!(
            "{gw}/clusters/alpha/api/v1/namespaces/default/configmaps/{name}"
        ));
        support::run_bounded(c, Duration::from_secs(10))
    };
    let agent = env.pid_of("agent-alpha").expect("the agent runs");
    let names = ["keep-0", "keep-1", "keep-2"];
    for name in names {
        let o = env.kubectl(&["create", "configmap", name]);
        assert!(o.ok(), "{o:?}");
    }
    // What the hub has sent on the member's streams: a DELETE written and
    // then cut short at the agent (whether it ran there is a race) still
    // shows here.
    let metrics = metrics_addr(&env);
    let sent = || {
        metric(
            &metrics,
            "towerctl_tunnel_bytes_total{cluster=\"alpha\",direction=\"out\"}",
        )
    };
    let before = sent();
    for name in names {
        signal(agent, "-STOP");
        let cont = support::scopeguard_cont(agent);
        // Gone before the agent reads anything; the agent is woken within
        // the hub's keepalive (1 s a ping, dead after 2.8 s of silence).
        let o = curl("DELETE", "1", name);
        assert!(!o.ok(), "the DELETE timed out: {o:?}");
        signal(agent, "-CONT");
        drop(cont);
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    let written = sent() - before;
    assert!(
        written < 64,
        "the hub wrote {written} bytes of the DELETEs to the member"
    );
    for name in names {
        let o = curl("GET", "10", name);
        assert_eq!(o.stdout, "200", "configmap {name} is still there: {o:?}");
    }
}

/// A member 2.6 s away (1.3 s each way through a relay, as on a
/// bufferbloated satellite or mobile link) logs in: some seven round trips
/// took ~19 s, and a fixed 15 s deadline on each side cut every attempt
/// while its handshake was still moving, for good. The deadlines now count
/// from the last message heard (at most 60 s in all).
#[test]
fn a_member_two_and_a_half_seconds_away_logs_in() {
    let env = Env::new();
    let api = ApiServer::start();
    let o = env.towerctl(&[
        "up",
        "--listen",
        "127.0.0.1:0",
        "--gateway",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--keepalive",
        "10s",
    ]);
    assert!(o.ok(), "{o:?}");
    logs_in_at_its_first_attempt(&env, &api, 1300, &["--timeout", "60s"]);
}

/// A member 2 s away (1 s each way through a relay) with keepalives every
/// second on both sides stays connected once logged in: a ping gets three
/// round trips where 1.8 intervals are less (the first one judged from the
/// login's time). It was declared dead at its first ping after every
/// login, 1.8 s in, again and again.
#[test]
fn a_far_member_on_a_short_keepalive_stays_connected() {
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let (_far, o) = join_far(&env, &api, 1000, &["--keepalive", "1s", "--timeout", "60s"]);
    assert!(o.ok(), "join through the relay: {o:?}");
    // Several pings each way.
    std::thread::sleep(Duration::from_secs(8));
    let hub_log = std::fs::read_to_string(env.path("state/towerctl/hub.log")).unwrap_or_default();
    let agent_log =
        std::fs::read_to_string(env.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    assert!(
        !hub_log.contains("declared dead") && !agent_log.contains("declared dead"),
        "the far member was cut:\n{hub_log}\n{agent_log}"
    );
    let s = env.status();
    let alpha = &s["hub"]["clusters"][0];
    assert_eq!(alpha["state"], "connected", "{s}");
    assert_eq!(alpha["reconnects"], 0, "{s}");
}
