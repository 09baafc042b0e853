//! Operators see and reach only the members access rules allow them (fail
//! closed), a member they may not reach looks exactly like one that does
//! not exist, and narrowing a rule cuts their open streams. Real towerctl,
//! real kubectl, three agents in front of the stand-in API server.

mod support;

use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::{gateway_get as get, gateway_get_with, wait_for, Env, Streaming};

/// The printed `towerctl login …` of `operator add NAME --group GROUP`.
fn add_operator(hub: &Env, name: &str, group: &str) -> Vec<String> {
    let o = hub.towerctl(&["operator", "add", name, "--group", group]);
    assert!(o.ok(), "{o:?}");
    assert!(o.stderr.contains("reaches no member until"), "{o:?}");
    support::printed_command(&o.stdout, "login")
}

fn laptop(login: &[String]) -> Env {
    let env = Env::new();
    let args: Vec<&str> = login.iter().map(String::as_str).collect();
    let o = env.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    env
}

fn token_of(login: &[String]) -> String {
    login[login.iter().position(|a| a == "--token").unwrap() + 1].clone()
}

#[test]
fn operators_see_and_reach_only_the_members_their_rules_allow() {
    let hub = Env::new();
    let api = ApiServer::start();
    hub.up();
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    for (name, team, env) in [
        ("alpha", "payments", "prod"),
        ("beta", "web", "dev"),
        ("gamma", "payments", "dev"),
    ] {
        let o = hub.towerctl(&[
            "cluster",
            "add",
            name,
            "--label",
            &format!("team={team}"),
            "--label",
            &format!("env={env}"),
        ]);
        assert!(o.ok(), "{o:?}");
        let join = support::printed_command(&o.stdout, "join");
        let o = hub.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
        assert!(o.ok(), "{o:?}");
    }
    let alice_login = add_operator(&hub, "alice", "payments");
    let bob_login = add_operator(&hub, "bob", "web");
    let alice = laptop(&alice_login);
    let bob = laptop(&bob_login);
    let alice_token = token_of(&alice_login);

    // Fail closed: no rule, nothing visible or reachable.
    let o = alice.towerctl(&["use"]);
    assert!(!o.stdout.contains("alpha"), "{o:?}");
    let (code, _) = get(&hub, &alice_token, "/clusters/alpha/api/v1/namespaces");
    assert_eq!(code, "403");
    // Answered to her as a member that does not exist; counted apart
    // for the hub's admin.
    let (code, _) = get(&hub, &alice_token, "/clusters/nope/api/v1/namespaces");
    assert_eq!(code, "403");
    let m = support::metrics_addr(&hub);
    let series = |r: &str| format!("towerctl_dial_failures_total{{reason=\"{r}\"}} ");
    assert_eq!(support::metric(&m, &series("forbidden")), 1);
    assert_eq!(support::metric(&m, &series("unknown_cluster")), 1);

    let o = hub.towerctl(&[
        "access",
        "allow",
        "group:payments",
        "--clusters",
        "team=payments",
    ]);
    assert!(o.ok(), "{o:?}");
    let o = hub.towerctl(&["access", "allow", "group:web", "--names", "beta"]);
    assert!(o.ok(), "{o:?}");
    let o = hub.towerctl(&["access", "list"]);
    assert!(
        o.stdout.contains("group:payments") && o.stdout.contains("towerctl.io/name"),
        "{o:?}"
    );
    let o = hub.towerctl(&["access", "allow", "payments", "--clusters", "x=y"]);
    assert!(
        !o.ok() && o.stderr.contains("operator:NAME or group:NAME"),
        "{o:?}"
    );

    // An operator added into a group with rules is told what they give
    // it (it was told it reached nothing).
    let o = hub.towerctl(&["operator", "add", "frank", "--group", "payments"]);
    assert!(
        o.ok()
            && o.stderr
                .contains("let 'frank' reach 2 members: alpha, gamma"),
        "{o:?}"
    );
    assert!(hub.towerctl(&["operator", "rm", "frank"]).ok());

    // Each sees only its own.
    let o = alice.towerctl(&["use"]);
    assert!(
        o.stdout.contains("alpha") && o.stdout.contains("gamma") && !o.stdout.contains("beta"),
        "{o:?}"
    );
    let o = bob.towerctl(&["use"]);
    assert!(
        o.stdout.contains("beta") && !o.stdout.contains("alpha") && !o.stdout.contains("gamma"),
        "{o:?}"
    );
    // She is told a member she may not reach may be hers to ask for, not
    // only to register (which the hub's admin finds already done).
    let o = alice.towerctl(&["use", "beta"]);
    assert!(
        !o.ok()
            && o.stderr
                .contains("not among the members operator 'alice' may reach")
            && o.stderr
                .contains("towerctl access allow operator:alice --names beta"),
        "{o:?}"
    );

    // And reaches only its own, with kubectl.
    assert!(alice.towerctl(&["use", "alpha"]).ok());
    let o = alice.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    assert!(bob.towerctl(&["use", "beta"]).ok());
    let o = bob.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");

    // A member alice may not reach answers exactly like one that does not
    // exist: 403, as RBAC would (a 404 made clients take objects for gone:
    // `kubectl delete --ignore-not-found` succeeded without deleting).
    let (code_b, body_b) = get(&hub, &alice_token, "/clusters/beta/api/v1/namespaces");
    let (code_x, body_x) = get(&hub, &alice_token, "/clusters/nosuch/api/v1/namespaces");
    assert_eq!(code_b, "403", "{body_b}");
    assert!(body_b.contains("\"reason\":\"Forbidden\""), "{body_b}");
    assert_eq!(code_b, code_x);
    assert_eq!(
        body_b.replace("beta", "NAME"),
        body_x.replace("nosuch", "NAME")
    );
    let gw = hub.status()["hub"]["gatewayURL"]
        .as_str()
        .unwrap()
        .to_string();
    let kubectl_to = |name: &str| {
        alice.kubectl(&[
            "get",
            "ns",
            "--server",
            &format!("{gw}/clusters/{name}"),
            "--tls-server-name",
            "localhost",
        ])
    };
    let (ob, ox) = (kubectl_to("beta"), kubectl_to("nosuch"));
    assert!(!ob.ok() && !ox.ok(), "{ob:?} {ox:?}");
    // Not taken for objects that are gone: a delete that tolerates absent
    // objects fails (with a 404 it exited 0, having deleted nothing).
    let o = alice.kubectl(&[
        "delete",
        "configmap",
        "settings",
        "--ignore-not-found",
        "--server",
        &format!("{gw}/clusters/beta"),
        "--tls-server-name",
        "localhost",
    ]);
    assert!(!o.ok() && o.stderr.contains("Forbidden"), "{o:?}");
    // (kubectl's own log lines carry times and pids: compare its verdict.)
    let verdict = |s: &str| s.lines().last().unwrap_or("").to_string();
    assert_eq!(
        verdict(&ob.stderr).replace("beta", "NAME"),
        verdict(&ox.stderr).replace("nosuch", "NAME")
    );
    // Also under a rule that matches by a label's absence (which a name
    // that does not exist matches too) and with a header refused only on
    // the way to a member that may be reached: a name that does not exist
    // used to get that refusal (403), a forbidden member its 404.
    let carol_login = add_operator(&hub, "carol", "ops");
    let carol_token = token_of(&carol_login);
    let o = hub.towerctl(&[
        "access",
        "allow",
        "group:ops",
        "--clusters",
        "team notin (payments)",
    ]);
    assert!(o.ok(), "{o:?}");
    let as_carol = |name: &str| {
        gateway_get_with(
            &hub,
            &carol_token,
            &format!("/clusters/{name}/api/v1/namespaces"),
            // Malformed (a group without a user): refused, but only on
            // the way to a member that may be reached.
            &["Impersonate-Group: someone"],
        )
    };
    let (code_a, body_a) = as_carol("alpha");
    let (code_x, body_x) = as_carol("nosuch");
    assert_eq!(code_a, "403", "{body_a}");
    assert_eq!(
        (code_a, body_a.replace("alpha", "NAME")),
        (code_x, body_x.replace("nosuch", "NAME"))
    );
    // The member it may reach refuses the header, in words.
    let (code_b, body_b) = as_carol("beta");
    assert_eq!(code_b, "400", "{body_b}");
    assert!(body_b.contains("without 'Impersonate-User'"), "{body_b}");

    // The audit record names the rule that decided.
    let o = hub.towerctl(&["audit", "--operator", "alice", "-o", "json"]);
    assert!(
        o.stdout.contains("group:payments") && o.stdout.contains("no rule allows it"),
        "{o:?}"
    );

    // Fan-out from alice's machine selects among her members only.
    let o = alice.towerctl(&["kubectl", "--", "get", "ns"]);
    assert!(
        o.stdout.contains("alpha") && !o.stdout.contains("beta"),
        "{o:?}"
    );

    // Narrowing a rule cuts an open watch within a second.
    let mut watch = Streaming::start(alice.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    let mut bobs = Streaming::start(bob.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "before-deny", &[("k", "v")]);
    watch.wait_for("before-deny", Duration::from_secs(20));
    bobs.wait_for("before-deny", Duration::from_secs(20));
    let t = Instant::now();
    let o = hub.towerctl(&["access", "deny", "group:payments", "--clusters", "env=prod"]);
    assert!(o.ok(), "{o:?}");
    wait_for(
        "alice's watch on alpha to be cut",
        Duration::from_secs(10),
        || watch.has_exited().then_some(()),
    );
    eprintln!("watch cut {:?} after the deny", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // And kubectl says why (a reset stream ended it with no word).
    assert!(
        watch
            .output()
            .contains("access to cluster 'alpha' was withdrawn"),
        "{}",
        watch.output()
    );
    assert!(
        !bobs.has_exited(),
        "bob's watch must stay: {}",
        bobs.output()
    );
    let o = alice.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    // gamma (payments, dev) is still hers.
    assert!(alice.towerctl(&["use", "gamma"]).ok());
    let o = alice.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
    // Relabelling narrows too: gamma turning prod cuts her watch there.
    let mut on_gamma = Streaming::start(alice.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "before-relabel", &[("k", "v")]);
    on_gamma.wait_for("before-relabel", Duration::from_secs(20));
    let t = Instant::now();
    let o = hub.towerctl(&["cluster", "label", "gamma", "env=prod"]);
    assert!(o.ok(), "{o:?}");
    wait_for(
        "alice's watch on gamma to be cut",
        Duration::from_secs(10),
        || on_gamma.has_exited().then_some(()),
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(hub.towerctl(&["cluster", "label", "gamma", "env=dev"]).ok());
    // Removing the allow for web narrows bob to nothing.
    let o = hub.towerctl(&["access", "list", "-o", "json"]);
    let rules: Vec<serde_json::Value> = serde_json::from_str(&o.stdout).unwrap();
    let web = rules
        .iter()
        .find(|r| r["subject"]["group"] == "web")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    assert!(hub.towerctl(&["access", "rm", &web.to_string()]).ok());
    wait_for("bob's watch to be cut", Duration::from_secs(10), || {
        bobs.has_exited().then_some(())
    });
}

/// An operator with many groups (each goes to the agent as a header line
/// of its own) reaches its member: past hyper's 100 lines, its own agent
/// answered 431 to every request. Past 128 groups, `operator add` says so.
#[test]
fn an_operator_with_many_groups_reaches_its_member() {
    let hub = Env::new();
    let api = ApiServer::start();
    hub.up();
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let join = hub.cluster_add("alpha");
    assert!(hub
        .join(&join, &["--kubeconfig", kc.to_str().unwrap()])
        .ok());
    let groups: Vec<String> = (0..120).map(|i| format!("team-{i}")).collect();
    let mut args = vec!["operator".to_string(), "add".into(), "carol".into()];
    for g in &groups {
        args.extend(["--group".to_string(), g.clone()]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = hub.towerctl(&a);
    assert!(o.ok(), "{o:?}");
    let login = support::printed_command(&o.stdout, "login");
    assert!(hub
        .towerctl(&["access", "allow", "group:team-119", "--names", "alpha"])
        .ok());
    let (code, body) = get(&hub, &token_of(&login), "/clusters/alpha/api/v1/namespaces");
    assert_eq!(code, "200", "{body}");
    // Kubernetes' own groups are said for what they are.
    let o = hub.towerctl(&["operator", "add", "sysm", "--group", "system:masters"]);
    assert!(o.ok() && o.stderr.contains("cluster-admin"), "{o:?}");
    // 129 groups: refused, naming the limit.
    let mut args = vec!["operator".to_string(), "add".into(), "dave".into()];
    for i in 0..129 {
        args.extend(["--group".to_string(), format!("g{i}")]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = hub.towerctl(&a);
    assert!(!o.ok() && o.stderr.contains("at most 128"), "{o:?}");
}
