//! Raw access under impersonation obeys the member's RBAC: before dialing
//! a pod, service or deployment for a CONNECT or `towerctl port-forward`,
//! an impersonating agent asks the member with a SubjectAccessReview
//! whether the operator could do the same with kubectl.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServer, TargetPort};
use support::{operator_laptop, Env, Out, Streaming};

/// `towerctl port-forward alpha TARGET :PORT` on `env`: one request's
/// outcome through it, and what the forwarder printed.
fn forward_once(env: &Env, target: &str, port: u16) -> (Out, String) {
    let pf =
        Streaming::start(env.towerctl_cmd(&["port-forward", "alpha", target, &format!(":{port}")]));
    pf.wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(20));
    let local: u16 = pf
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("no local port");
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{local}/"),
    ]);
    let o = support::run_bounded(cmd, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    (o, pf.output())
}

#[test]
fn port_forward_under_impersonation_needs_the_operators_own_rbac() {
    let hub = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("the pod answers");
    api.add_pod(
        "default",
        "web-1",
        "127.0.0.1",
        &[("app", "web")],
        true,
        &[("http", web.port())],
    );
    api.add_service(
        "default",
        "web",
        &[("http", 80, TargetPort::Number(web.port()))],
        &[("app", "web")],
    );
    api.add_deployment("default", "web", &[("app", "web")], 1);
    hub.up();
    let o = hub.towerctl(&["cluster", "add", "alpha", "--impersonate"]);
    assert!(o.ok(), "{o:?}");
    let join = support::printed_command(&o.stdout, "join");
    let kc = hub.path("member.kubeconfig");
    api.write_kubeconfig(&kc);
    let o = hub.join(
        &join,
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--allow",
            "127.0.0.0/8",
        ],
    );
    assert!(o.ok(), "{o:?}");

    api.bind_user("alice");
    let alice = operator_laptop(&hub, "alice");
    let bob = operator_laptop(&hub, "bob");

    // alice is bound on the member: she reaches the pod, the deployment.
    for target in ["pod/web-1", "deploy/web"] {
        let (o, out) = forward_once(&alice, target, web.port());
        assert!(
            o.stdout.contains("the pod answers"),
            "{target}: {o:?} {out}"
        );
    }
    let asked = api.subject_access_reviews();
    assert!(asked >= 2, "no SubjectAccessReview was made ({asked})");

    // An endpoint's pod reference counts only when that pod, in the
    // Service's namespace, owns the endpoint's address: anyone who may
    // write endpoints can name a pod the operator may port-forward to on
    // an endpoint leading elsewhere. A reference that does not hold makes
    // the endpoint a host address (allowed here by --allow 127.0.0.0/8),
    // and no pod's port-forward right is asked about.
    api.add_pod("default", "web-2", "127.0.0.1", &[("app", "w2")], true, &[]);
    api.add_pod("default", "web-3", "127.0.0.2", &[("app", "w3")], true, &[]);
    api.add_pod(
        "kube-system",
        "web-4",
        "127.0.0.1",
        &[("app", "w4")],
        true,
        &[],
    );
    // Not running: a finished pod keeps its IP in its status after the
    // network gave it to another pod.
    api.add_pod(
        "default",
        "web-5",
        "127.0.0.1",
        &[("app", "w5")],
        false,
        &[],
    );
    for (svc, pod_ns, pod, pod_asked) in [
        ("honest", "default", "web-2", true),
        ("forged", "default", "web-3", false),
        ("elsewhere", "kube-system", "web-4", false),
        ("finished", "default", "web-5", false),
    ] {
        api.add_service(
            "default",
            svc,
            &[("http", 80, TargetPort::Number(web.port()))],
            &[],
        );
        api.set_endpoints("default", svc, &[("127.0.0.1", "http", web.port())]);
        api.set_endpoint_pod("default", svc, "127.0.0.1", pod_ns, pod);
        let before = api.subject_access_reviews();
        let (o, out) = forward_once(&alice, &format!("svc/{svc}"), 80);
        assert!(o.stdout.contains("the pod answers"), "{svc}: {o:?} {out}");
        let asked = api.subject_access_reviews() - before;
        // get services, then create pods/portforward on a believed pod.
        let want = if pod_asked { 2 } else { 1 };
        assert_eq!(
            asked, want,
            "svc/{svc} naming pod {pod_ns}/{pod}: {asked} SubjectAccessReviews"
        );
    }
    let log = std::fs::read_to_string(hub.path("state/towerctl/agent-alpha.log")).unwrap();
    assert!(
        log.contains("names pod default/web-3 but leads to 127.0.0.1:"),
        "{log}"
    );

    // bob is not: refused with the member's answer, before any dial.
    let (o, out) = forward_once(&bob, "pod/web-1", web.port());
    assert!(!o.stdout.contains("the pod answers"), "{o:?}");
    assert!(
        out.contains("RBAC does not let operator 'bob' create pods/portforward 'web-1'")
            && out.contains("no RBAC binding"),
        "{out}"
    );
    // A pod bob may not port-forward to is refused before it is looked
    // up: whether it exists is none of his business.
    let (_, out) = forward_once(&bob, "pod/ghost", web.port());
    assert!(
        out.contains("RBAC does not let operator 'bob' create pods/portforward 'ghost'"),
        "{out}"
    );
    let (o, out) = forward_once(&bob, "deploy/web", web.port());
    assert!(!o.stdout.contains("the pod answers"), "{o:?}");
    assert!(out.contains("get deployments 'web'"), "{out}");

    // Audited with the member's answer, and counted as a denial.
    let o = hub.towerctl(&["audit", "-o", "json"]);
    let denied: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        // (Port-forward's own check of the object first, a GET the member
        // refused, is recorded as any request.)
        .filter(|r: &serde_json::Value| {
            r["operator"] == "bob" && r["status"] == 403 && r["method"] == "CONNECT"
        })
        .collect();
    assert!(
        denied.len() >= 2
            && denied
                .iter()
                .all(|r| r["error"].as_str().unwrap_or("").contains("RBAC")),
        "{denied:?}"
    );
    let s = hub.status();
    let denied_dials = s["agents"][0]["denied_dials"]
        .as_u64()
        .or_else(|| s["agents"][0]["deniedDials"].as_u64())
        .unwrap_or_else(|| panic!("no denied-dial count: {s}"));
    assert!(denied_dials >= 2, "{s}");

    // A CONNECT naming a Service by its cluster DNS name is checked as
    // svc/NAME: dialed as a host, it went past the member's RBAC with only
    // the dial policy to stop it (a suffix rule like *.svc.cluster.local
    // let every operator of the member reach every Service). Other names
    // in the cluster's DNS name nothing RBAC can be asked about: refused.
    let connect = |authority: &str| {
        use std::io::{Read, Write};
        let (head, mut s) = support::raw_connect(&hub, authority, "");
        if head.starts_with("http/1.1 200") {
            s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                .unwrap();
        }
        // A refusal's body by its length (the connection stays open);
        // the stream's until the target closes it.
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let mut rest = vec![0u8; length.unwrap_or(0)];
        match length {
            Some(_) => s.read_exact(&mut rest).unwrap(),
            None => {
                let _ = s.read_to_end(&mut rest);
            }
        }
        (head, String::from_utf8_lossy(&rest).into_owned())
    };
    // An address is asked about as what it is in the member: a CONNECT to
    // a pod's address (allowed by --allow 127.0.0.0/8) went past RBAC with
    // only the dial policy to stop it. 127.0.0.2 is web-3's, whose
    // port-forward the local admin (impersonated as 'admin', bound to
    // nothing yet) may not create.
    let (head, body) = connect(&format!("127.0.0.2.alpha:{}", web.port()));
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
    assert!(
        body.contains("RBAC does not let operator 'admin' create pods/portforward 'web-3'"),
        "{head}{body}"
    );
    // An address that is no pod's nor Service's is the dial policy's alone.
    let (head, body) = connect(&format!("127.0.0.3.alpha:{}", web.port()));
    assert!(!body.contains("RBAC"), "{head}{body}");
    let (head, body) = connect("10-0-0-1.default.pod.cluster.local.alpha:80");
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
    assert!(body.contains("forward to svc/NAME or pod/NAME"), "{body}");
    // The local admin is impersonated as 'admin', bound to nothing here.
    let before = api.subject_access_reviews();
    let (head, body) = connect("web.default.svc.cluster.local.alpha:80");
    assert!(head.starts_with("http/1.1 403"), "{head}{body}");
    assert!(
        body.contains(
            "RBAC does not let operator 'admin' get services 'web' in namespace 'default'"
        ),
        "{body}"
    );
    assert_eq!(api.subject_access_reviews(), before + 1);
    api.bind_user("admin");
    let (head, body) = connect("honest.default.svc.cluster.local.alpha:80");
    assert!(head.starts_with("http/1.1 200"), "{head}{body}");
    assert!(body.contains("the pod answers"), "{body}");
    // Bound now: the pod's address is the dial policy's again (nothing
    // listens there: the dial fails, RBAC says nothing).
    let (head, body) = connect(&format!("127.0.0.2.alpha:{}", web.port()));
    assert!(!body.contains("RBAC"), "{head}{body}");
}
