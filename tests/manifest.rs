//! `join --print-manifest` produces manifests that parse back into the
//! Kubernetes types and are wired together correctly.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use support::Env;

const KEY: &str = "sha256:6Ct/kfLABP5tHWhCBjBeBOBvX9YhvWTrtkbgFTY1GwM";

fn print(extra: &[&str]) -> Vec<serde_json::Value> {
    print_raw(extra)
        .split("\n---\n")
        .skip(1)
        .map(|d| {
            serde_saphyr::from_str::<serde_json::Value>(d).unwrap_or_else(|e| panic!("{e}: {d}"))
        })
        .collect()
}

fn print_raw(extra: &[&str]) -> String {
    print_with(extra, &[])
}

/// [`print_raw`] with `vars` in `join`'s environment.
fn print_with(extra: &[&str], vars: &[(&str, &str)]) -> String {
    let o = print_out(extra, vars);
    assert!(o.ok(), "{o:?}");
    o.stdout
}

/// `join … --print-manifest` with `extra` flags and `vars`, as it ends.
fn print_out(extra: &[&str], vars: &[(&str, &str)]) -> support::Out {
    let env = Env::new();
    let mut args = vec![
        "join",
        "alpha",
        "--token",
        "tj_secret",
        "--hub",
        "wss://hub.example:443/tunnel",
        "--hub-key",
        KEY,
        "--print-manifest",
    ];
    args.extend_from_slice(extra);
    let mut cmd = env.towerctl_cmd(&args);
    // (`towerctl_cmd` clears the environment: no proxy variables.)
    cmd.envs(vars.iter().copied());
    support::run_bounded(cmd, Duration::from_secs(30))
}

/// `--proxy` reaches the pod from the Secret (a proxy URL may carry a
/// password) as TOWERCTL_PROXY, which the pod's client for its own API
/// server does not read; the proxy variables of the machine printing the
/// manifest are not the pod's and are not carried. An agent behind a
/// company's egress proxy used to lose it in the pod and never reach the
/// hub.
#[test]
fn a_proxy_named_with_proxy_reaches_the_pod_from_the_secret() {
    let proxy = "http://user:p%40ss@proxy.corp:3128";
    let parse = |raw: String| -> Vec<serde_json::Value> {
        raw.split("\n---\n")
            .skip(1)
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect()
    };
    let docs = parse(print_with(
        &["--proxy", proxy],
        &[
            ("HTTPS_PROXY", "http://127.0.0.1:3128"),
            ("NO_PROXY", ".corp"),
        ],
    ));
    let secret = of_kind(&docs, "Secret")[0];
    assert_eq!(secret["stringData"]["proxy"], proxy);
    let deploy = of_kind(&docs, "Deployment")[0];
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    assert_eq!(
        var("TOWERCTL_PROXY").map(|e| e["valueFrom"]["secretKeyRef"]["key"].clone()),
        Some("proxy".into())
    );
    for v in ["HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy"] {
        assert_eq!(var(v), None, "{v} is this machine's, not the pod's");
    }
    let _: Secret = typed(secret);
    let _: Deployment = typed(deploy);
    // This machine's proxy alone: nothing of it in the manifest.
    let docs = parse(print_with(&[], &[("HTTPS_PROXY", "http://127.0.0.1:3128")]));
    let secret = of_kind(&docs, "Secret")[0];
    assert!(secret["stringData"].get("proxy").is_none(), "{secret}");
    assert!(!serde_json::to_string(&docs)
        .unwrap()
        .contains("127.0.0.1:3128"));
    // A proxy the agent could not use is refused, naming the flag and
    // showing no password.
    let o = print_out(&["--proxy", "socks5://u:hidden@proxy.corp:1080"], &[]);
    assert!(
        !o.ok()
            && o.stderr.contains("--proxy")
            && o.stderr.contains("SOCKS proxies are not supported")
            && !o.stderr.contains("hidden"),
        "{o:?}"
    );
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

/// Kubernetes expands `$(NAME)` in a container's args from its environment,
/// which holds the join token: a hub URL (the other hubs' come from the
/// shared registry) written `…/$(TOWERCTL_TOKEN)` reached the agent with
/// the token in it. Every argument is written as taken (`$$`).
#[test]
fn a_dollar_in_an_argument_is_not_expanded_by_kubernetes() {
    let docs = print(&["--hub", "wss://other.example/t$(TOWERCTL_TOKEN)"]);
    let deploy = of_kind(&docs, "Deployment")[0];
    let args: Vec<&str> = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.iter()
            .any(|a| a.contains("other.example") && a.contains("$$(TOWERCTL_TOKEN)")),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.replace("$$", "").contains("$(")),
        "{args:?}"
    );
}

#[test]
fn manifests_parse_and_are_wired_together() {
    let docs = print(&["--namespace", "edge"]);
    let ns: Namespace = typed(of_kind(&docs, "Namespace")[0]);
    assert_eq!(ns.metadata.name.as_deref(), Some("edge"));
    let sa: ServiceAccount = typed(of_kind(&docs, "ServiceAccount")[0]);
    let secret: Secret = typed(of_kind(&docs, "Secret")[0]);
    let deploy: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let crb: ClusterRoleBinding = typed(of_kind(&docs, "ClusterRoleBinding")[0]);
    assert!(
        of_kind(&docs, "ClusterRole").is_empty(),
        "no impersonation role unless asked"
    );
    assert_eq!(crb.role_ref.name, "cluster-admin");
    assert_eq!(
        crb.subjects.as_ref().unwrap()[0].name,
        sa.metadata.name.clone().unwrap()
    );

    let sd = secret.string_data.as_ref().unwrap();
    assert_eq!(sd["token"], "tj_secret");
    assert!(sd["agent.key"].contains("OPENSSH PRIVATE KEY"));
    // Printed again: a new key, unless --key-file names the registered
    // one (it was dropped, and the pod's new key was refused by the hub).
    let again: Secret = typed(of_kind(&print(&["--namespace", "edge"]), "Secret")[0]);
    assert_ne!(
        again.string_data.as_ref().unwrap()["agent.key"],
        sd["agent.key"]
    );
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("agent.key");
    std::fs::write(&key_file, &sd["agent.key"]).unwrap();
    let kept: Secret = typed(
        of_kind(
            &print(&[
                "--namespace",
                "edge",
                "--key-file",
                key_file.to_str().unwrap(),
            ]),
            "Secret",
        )[0],
    );
    assert_eq!(
        kept.string_data.as_ref().unwrap()["agent.key"],
        sd["agent.key"]
    );
    // With the key, the join token (shown once, expired since) is not
    // needed: the documented way to change a running agent asked for it.
    let env = Env::new();
    let mut cmd = env.towerctl_cmd(&[
        "join",
        "alpha",
        "--hub",
        "wss://hub.example:443/tunnel",
        "--hub-key",
        KEY,
        "--print-manifest",
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    cmd.env_remove("TOWERCTL_TOKEN");
    let o = support::run_bounded(cmd, Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    let tokenless: Vec<serde_json::Value> = o
        .stdout
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let kept_too: Secret = typed(of_kind(&tokenless, "Secret")[0]);
    assert_eq!(
        kept_too.string_data.as_ref().unwrap()["agent.key"],
        sd["agent.key"]
    );
    // The pod template names the key's fingerprint: a Secret printed with
    // another key rolls the pod at apply time (a running agent kept its
    // loaded key, and the refusal came at its next restart); a new key is
    // said on stderr, which `kubectl apply` does not swallow.
    let fingerprint = |docs: &[serde_json::Value]| {
        of_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
            ["towerctl.io/agent-key"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let same = fingerprint(&tokenless);
    assert!(same.starts_with("SHA256:"), "{same}");
    assert_eq!(
        fingerprint(&print(&[
            "--namespace",
            "edge",
            "--key-file",
            key_file.to_str().unwrap()
        ])),
        same
    );
    let o = print_out(&["--namespace", "edge"], &[]);
    assert!(o.stderr.contains("NEW agent key"), "{o:?}");
    std::fs::write(&key_file, "not a key").unwrap();
    let o = print_out(
        &[
            "--namespace",
            "edge",
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !o.ok() && o.stderr.contains("not an OpenSSH private key"),
        "{o:?}"
    );

    let pod = deploy
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let secret_name = secret.metadata.name.clone().unwrap();
    let vol = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(
        vol.secret.as_ref().unwrap().secret_name.as_deref(),
        Some(secret_name.as_str())
    );
    let c = &pod.containers[0];
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.name, vol.name);
    let env = &c.env.as_ref().unwrap()[0];
    assert_eq!(env.name, "TOWERCTL_TOKEN");
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        secret_name
    );
    let args = c.args.as_ref().unwrap();
    assert!(
        args.windows(2).any(|w| w[0] == "--hub-key" && w[1] == KEY),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--key-file" && w[1].starts_with(&mount.mount_path)),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.contains("tj_secret")),
        "the token must not be in the args"
    );
    assert_eq!(
        deploy
            .spec
            .as_ref()
            .unwrap()
            .strategy
            .as_ref()
            .unwrap()
            .type_
            .as_deref(),
        Some("Recreate")
    );
}

#[test]
fn impersonation_grants_only_impersonate() {
    let docs = print(&["--impersonate"]);
    let role: ClusterRole = typed(of_kind(&docs, "ClusterRole")[0]);
    let rules = role.rules.unwrap();
    // Impersonation of users, groups and service accounts; otherwise only
    // reads of what the agent resolves targets from, and port-forwarding.
    assert!(
        rules.iter().any(|r| r.verbs == ["impersonate"]
            && r.resources.as_deref()
                == Some(&["users".into(), "groups".into(), "serviceaccounts".into()][..])),
        "{rules:?}"
    );
    for r in &rules {
        let res = r.resources.clone().unwrap_or_default();
        assert!(
            !res.iter().any(|x| x.contains('*')) && !r.verbs.iter().any(|v| v == "*"),
            "{r:?}"
        );
        if r.verbs != ["impersonate"] {
            for v in &r.verbs {
                let allowed = v == "get"
                    || v == "list"
                    || v == "watch"
                    || (v == "create"
                        && (res == ["pods/portforward"] || res == ["subjectaccessreviews"]));
                assert!(allowed, "the agent's own rights go beyond reading: {r:?}");
            }
        }
    }
    assert!(
        rules.iter().any(|r| r
            .resources
            .as_ref()
            .is_some_and(|x| x.contains(&"endpointslices".to_string()))),
        "{rules:?}"
    );
    let crb: ClusterRoleBinding = typed(of_kind(&docs, "ClusterRoleBinding")[0]);
    assert_eq!(crb.role_ref.name, role.metadata.name.unwrap());
    let deploy: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let args = deploy.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--impersonate".to_string()));
}

#[test]
fn the_pod_is_hardened_and_probed() {
    let docs = print(&[
        "--namespace",
        "edge",
        "--image",
        "registry.test/towerctl:dev",
    ]);
    for d in &docs {
        if d["kind"] != "Namespace" && !d["kind"].as_str().unwrap().starts_with("Cluster") {
            assert_eq!(d["metadata"]["namespace"], "edge", "{d}");
        }
    }
    let sa: ServiceAccount = typed(of_kind(&docs, "ServiceAccount")[0]);
    assert_eq!(sa.automount_service_account_token, Some(false));
    let deploy: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    // Only the agent's own pod gets the token.
    assert_eq!(pod.automount_service_account_token, Some(true));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.test/towerctl:dev"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    let res = c.resources.as_ref().unwrap();
    for k in ["cpu", "memory"] {
        assert!(res.requests.as_ref().unwrap().contains_key(k), "{res:?}");
        assert!(res.limits.as_ref().unwrap().contains_key(k), "{res:?}");
    }

    // Every writable path the agent uses (HOME, XDG dirs) is on an emptyDir.
    let mounts = c.volume_mounts.as_ref().unwrap();
    let vols = pod.volumes.as_ref().unwrap();
    let writable: Vec<&str> = mounts
        .iter()
        .filter(|m| {
            vols.iter()
                .any(|v| v.name == m.name && v.empty_dir.is_some())
        })
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(!writable.is_empty(), "{mounts:?}");
    for var in [
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_RUNTIME_DIR",
    ] {
        let v = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{var} not set"));
        assert!(
            writable.iter().any(|w| v.starts_with(w)),
            "{var}={v} is not on an emptyDir"
        );
    }

    // Probes point at the port the agent serves them on.
    let args = c.args.clone().unwrap();
    let addr = args
        .windows(2)
        .find(|w| w[0] == "--probe-addr")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("no --probe-addr in {args:?}"));
    let port: i32 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let port_name = c.ports.as_ref().unwrap()[0].name.clone().unwrap();
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, port);
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for (p, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let g = p.unwrap().http_get.as_ref().unwrap();
        assert_eq!(g.path.as_deref(), Some(path));
        assert_eq!(g.port, IntOrString::String(port_name.clone()));
    }
}

#[test]
fn the_default_image_is_the_one_the_script_builds() {
    let docs = print(&[]);
    let deploy: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let image = deploy.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone()
        .unwrap();
    assert_eq!(
        image,
        format!("localhost/towerctl:{}", env!("CARGO_PKG_VERSION"))
    );
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/image.sh")).unwrap();
    assert!(script.contains("localhost/towerctl:$version"));
}

/// `kubectl apply --dry-run=client` of the printed manifest, both RBAC modes,
/// against the stand-in API server.
#[test]
fn kubectl_accepts_the_manifest() {
    let api = support::apiserver::ApiServer::start();
    // kubectl sends its token over HTTPS only.
    let front = support::tls_front::TlsFront::start(api.addr);
    let env = Env::new();
    let kc = env.path("member.kubeconfig");
    let ca = env.path("ca.crt");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: m\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: m\n  user:\n    token: {}\ncontexts:\n- name: m\n  context:\n    cluster: m\n    user: m\ncurrent-context: m\n",
            front.addr,
            ca.display(),
            support::apiserver::TOKEN
        ),
    )
    .unwrap();
    for extra in [&[][..], &["--impersonate"][..]] {
        let file = env.path("agent.yaml");
        std::fs::write(&file, print_raw(extra)).unwrap();
        let o = env.kubectl(&[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "apply",
            "--dry-run=client",
            "-f",
            file.to_str().unwrap(),
        ]);
        assert!(o.ok(), "{extra:?}: {o:?}");
        // The member-wide objects name their namespace, and each mode
        // its own binding (a binding cannot change its role).
        let mut kinds = vec![
            "namespace/towerctl-system",
            "serviceaccount/towerctl-agent-alpha",
            "secret/towerctl-agent-alpha",
            "deployment.apps/towerctl-agent-alpha",
        ];
        if extra.is_empty() {
            kinds.push("clusterrolebinding.rbac.authorization.k8s.io/towerctl-agent:towerctl-system:alpha:cluster-admin");
        } else {
            kinds.push(
                "clusterrolebinding.rbac.authorization.k8s.io/towerctl-agent:towerctl-system:alpha",
            );
            kinds
                .push("clusterrole.rbac.authorization.k8s.io/towerctl-agent:towerctl-system:alpha");
        }
        for k in kinds {
            assert!(
                o.stdout.contains(&format!("{k} created (dry run)")),
                "{k} missing: {o:?}"
            );
        }
    }
}

/// What a pod cannot use is refused, not printed: a probe address the
/// kubelet cannot reach (the pod's loopback, port 0: the agent would be
/// restarted for ever), and push mode, which the manifest does not carry
/// (the pod would run without it, silently).
#[test]
fn what_a_pod_cannot_use_is_refused_with_the_fix() {
    let env = Env::new();
    let refused = |extra: &[&str]| {
        let mut args = vec![
            "join",
            "alpha",
            "--token",
            "tj_secret",
            "--hub",
            "ws://hub.example:8080/tunnel",
            "--hub-key",
            KEY,
            "--print-manifest",
        ];
        args.extend_from_slice(extra);
        let o = env.towerctl(&args);
        assert!(!o.ok() && o.stdout.is_empty(), "{extra:?}: {o:?}");
        o.stderr
    };
    for addr in ["127.0.0.1:9090", "[::1]:8081", "0.0.0.0:0"] {
        let e = refused(&["--probe-addr", addr]);
        assert!(
            e.contains("cannot be probed in a pod") && e.contains("0.0.0.0:8081"),
            "{e}"
        );
    }
    let e = refused(&["--expose", "db=10.0.0.5:5432"]);
    assert!(
        e.contains("--expose (push mode) is not in the printed manifest"),
        "{e}"
    );
    // A port of its own on any address is taken.
    let docs = print(&["--probe-addr", "0.0.0.0:9090"]);
    let deploy = of_kind(&docs, "Deployment")[0];
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        9090
    );
}

#[test]
fn a_bad_namespace_is_refused_with_the_rule() {
    let env = Env::new();
    let o = env.towerctl(&[
        "join",
        "alpha",
        "--token",
        "tj_secret",
        "--hub",
        "ws://hub.example:8080/tunnel",
        "--hub-key",
        KEY,
        "--print-manifest",
        "--namespace",
        "Edge_1",
    ]);
    assert!(!o.ok(), "{o:?}");
    assert!(
        o.stderr.contains("invalid namespace name 'Edge_1'") && o.stderr.contains("lowercase"),
        "{o:?}"
    );
}

#[test]
fn hub_ca_ships_as_a_configmap_the_agent_reads() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = p
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("corp-ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let docs = print(&["--hub-ca", ca.to_str().unwrap()]);
    let cm: ConfigMap = typed(of_kind(&docs, "ConfigMap")[0]);
    let data = cm.data.as_ref().unwrap();
    assert_eq!(data.len(), 1);
    let (key, value) = data.iter().next().unwrap();
    assert_eq!(value, &pem);

    let deploy: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.config_map.is_some())
        .expect("a ConfigMap volume");
    assert_eq!(
        vol.config_map.as_ref().unwrap().name,
        cm.metadata.name.unwrap()
    );
    let c = &pod.containers[0];
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == vol.name)
        .expect("the CA mounted");
    let args = c.args.as_ref().unwrap();
    let path = format!("{}/{key}", mount.mount_path);
    assert!(
        args.windows(2).any(|w| w[0] == "--hub-ca" && w[1] == path),
        "{args:?}"
    );
    // Not inside the Secret's mount, which is read-only and holds the key.
    assert!(!path.starts_with("/etc/towerctl/"), "{path}");

    // Without --hub-ca there is no ConfigMap and no flag.
    let docs = print(&[]);
    assert!(of_kind(&docs, "ConfigMap").is_empty());
}
