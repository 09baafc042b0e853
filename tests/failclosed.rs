//! Authorization fails closed: revoking access reaches what is already
//! open, the local admin cannot be removed by accident, and a possibly
//! compromised agent key can be retired. Real towerctl, real kubectl, the
//! stand-in API server behind the agent.

mod support;

use std::time::{Duration, Instant};

use support::apiserver::ApiServer;
use support::{curl_within, forwarded_port, operator_laptop, wait_for, Env, Streaming};

/// Hub up, member `alpha` joined against `api`, the hub's kubeconfig on alpha.
fn connected(env: &Env, api: &ApiServer) -> Vec<String> {
    env.up();
    let join = env.cluster_add("alpha");
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    let o = env.join(
        &join,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "join failed: {o:?}");
    assert!(env.towerctl(&["use", "alpha"]).ok());
    join
}

#[test]
fn removing_an_operator_cuts_its_open_watch_and_port_forward_at_once() {
    let hub = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("forwarded for bob");
    api.add_pod(
        "default",
        "web-1",
        "10.99.0.1",
        &[("app", "web")],
        true,
        &[("http", 8080)],
    );
    api.set_portforward_target("default", "web-1", 8080, web);
    connected(&hub, &api);
    let laptop = operator_laptop(&hub, "bob");
    assert!(laptop.towerctl(&["use", "alpha"]).ok());
    // Another operator's stream must survive bob's removal.
    let mut admins_watch = Streaming::start(hub.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));

    let mut watch = Streaming::start(laptop.kubectl_cmd(&["get", "configmaps", "-A", "-w"]));
    std::thread::sleep(Duration::from_millis(1500));
    api.create_configmap("default", "seen-by-bob", &[("k", "v")]);
    watch.wait_for("seen-by-bob", Duration::from_secs(20));
    admins_watch.wait_for("seen-by-bob", Duration::from_secs(20));

    let pf = Streaming::start(laptop.kubectl_cmd(&["port-forward", "pod/web-1", ":8080"]));
    let port = forwarded_port(&pf);
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 5);
    assert!(
        o.stdout.contains("forwarded for bob"),
        "{o:?} {}",
        pf.output()
    );

    let t = Instant::now();
    let o = hub.towerctl(&["operator", "rm", "bob"]);
    assert!(o.ok(), "{o:?}");
    wait_for("bob's watch to be cut", Duration::from_secs(10), || {
        watch.has_exited().then_some(())
    });
    let cut_after = t.elapsed();
    eprintln!("bob's watch ended {cut_after:?} after 'operator rm bob'");
    assert!(
        cut_after < Duration::from_secs(3),
        "the watch outlived the removal by {cut_after:?}"
    );
    // The port-forward's upgraded stream is gone too: no new connection
    // gets through it.
    let o = curl_within(&format!("http://127.0.0.1:{port}/"), 5);
    assert!(!o.stdout.contains("forwarded for bob"), "{o:?}");
    // And bob cannot start anything new.
    let o = laptop.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    // The admin's watch is untouched.
    assert!(!admins_watch.has_exited(), "{}", admins_watch.output());
    api.create_configmap("default", "after-bob", &[("k", "v")]);
    admins_watch.wait_for("after-bob", Duration::from_secs(20));
}

#[test]
fn the_local_admin_cannot_be_removed() {
    let hub = Env::new();
    hub.up();
    let o = hub.towerctl(&["operator", "rm", "admin"]);
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("local admin") && o.stderr.contains("operator add"),
        "{o:?}"
    );
    let o = hub.towerctl(&["operator", "list", "-o", "json"]);
    assert!(o.stdout.contains("\"admin\""), "{o:?}");
}

#[test]
fn rotate_new_key_forces_the_agent_to_join_again() {
    let hub = Env::new();
    let api = ApiServer::start();
    connected(&hub, &api);
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(o.ok(), "{o:?}");
    let agent = hub.pid_of("agent-alpha").expect("agent pid");
    let o = hub.towerctl(&["cluster", "rotate", "alpha", "--new-key"]);
    assert!(o.ok(), "{o:?}");
    let new_join = support::printed_command(&o.stdout, "join");
    // The old agent's key is refused and its spent token too: it stops.
    wait_for(
        "the agent with the retired key to stop",
        Duration::from_secs(20),
        || {
            (!std::path::Path::new(&format!("/proc/{agent}")).exists()
                || std::fs::read_to_string(format!("/proc/{agent}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true))
            .then_some(())
        },
    );
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(!o.ok() && o.stderr.contains("not connected"), "{o:?}");
    let log =
        std::fs::read_to_string(hub.path("state/towerctl/agent-alpha.log")).unwrap_or_default();
    assert!(log.contains("retired"), "{log}");
    // Joining again with the new token works.
    let member_kc = hub.path("member.kubeconfig");
    let o = hub.join(
        &new_join,
        &[
            "--kubeconfig",
            member_kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "nodes"]);
    assert!(o.ok(), "{o:?}");
}

fn join_args(o: &support::Out) -> Vec<String> {
    support::printed_command(&o.stdout, "join")
}

#[test]
fn impersonation_cannot_silently_turn_off() {
    let hub = Env::new();
    let api = ApiServer::start();
    hub.up();
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);

    // Member requires impersonation; its agent is started without it.
    let o = hub.towerctl(&["cluster", "add", "beta", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    let join = join_args(&o);
    assert!(join.iter().any(|a| a == "--impersonate"), "{join:?}");
    let without: Vec<String> = join.into_iter().filter(|a| a != "--impersonate").collect();
    let o = hub.join(&without, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(hub.towerctl(&["use", "beta"]).ok());
    let before = api.requests().len();
    let o = hub.kubectl(&["get", "ns"]);
    assert!(!o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "--raw", "/clusters/beta/api/v1/namespaces"]);
    assert!(
        !o.ok()
            && o.stderr.contains("requires impersonation")
            && o.stderr.contains("--impersonate"),
        "{o:?}"
    );
    assert_eq!(
        api.requests().len(),
        before,
        "no request may reach the member with the agent's own identity"
    );
    let o = hub.towerctl(&["cluster", "list", "-o", "wide"]);
    assert!(
        o.stdout.contains("IDENTITY") && o.stdout.contains("impersonate"),
        "{o:?}"
    );

    // The operator decides: operators act with the agent's identity.
    let o = hub.towerctl(&["cluster", "set", "beta", "--no-impersonate"]);
    assert!(o.ok(), "{o:?}");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("kube-system"), "{o:?}");
    let o = hub.towerctl(&["cluster", "set", "beta"]);
    assert!(!o.ok() && o.stderr.contains("nothing to change"), "{o:?}");

    // The reverse mismatch: registered without, agent with --impersonate.
    let o = hub.towerctl(&["cluster", "add", "gamma"]);
    let mut join = join_args(&o);
    join.push("--impersonate".into());
    let o = hub.join(&join, &["--kubeconfig", kc.to_str().unwrap()]);
    assert!(o.ok(), "{o:?}");
    assert!(hub.towerctl(&["use", "gamma"]).ok());
    let o = hub.kubectl(&["get", "--raw", "/clusters/gamma/api/v1/namespaces"]);
    assert!(
        !o.ok() && o.stderr.contains("registered without impersonation"),
        "{o:?}"
    );
    // Matching again: the member's RBAC decides (the admin has no binding).
    assert!(hub
        .towerctl(&["cluster", "set", "gamma", "--impersonate"])
        .ok());
    let o = hub.kubectl(&["get", "ns"]);
    assert!(!o.ok() && o.stderr.contains("User \"admin\""), "{o:?}");
    api.bind_user("admin");
    let o = hub.kubectl(&["get", "ns"]);
    assert!(o.ok(), "{o:?}");
}
