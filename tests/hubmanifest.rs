//! `towerctl up --print-manifest` produces manifests that parse back into
//! the Kubernetes types and are wired together: Services to the pods'
//! named ports, the pods' stable names to `--peer-url`, the etcd files to
//! the Secret mounted where the args name them. Running the printed pod is
//! in `tests/scaleout.rs` (`a_hub_runs_as_its_printed_statefulset_runs_it`).

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use support::Env;

fn docs_of(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .split("\n---\n")
        .skip(1)
        .map(|d| {
            serde_saphyr::from_str::<serde_json::Value>(d).unwrap_or_else(|e| panic!("{e}: {d}"))
        })
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

/// A PEM-looking file in `env`.
fn pem(env: &Env, name: &str) -> String {
    let p = env.path(name);
    std::fs::write(
        &p,
        format!("-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n"),
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

const ADVERTISE: [&str; 4] = [
    "--advertise",
    "ws://hub.example.com:8080",
    "--gateway-url",
    "https://hub.example.com:9443",
];

fn print(env: &Env, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["up", "--print-manifest"];
    args.extend_from_slice(extra);
    let o = env.towerctl(&args);
    assert!(o.ok(), "{o:?}");
    assert!(
        env.pid_of("hub").is_none(),
        "--print-manifest must not start a hub"
    );
    docs_of(&o.stdout)
}

fn container(sts: &StatefulSet) -> &Container {
    &sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

#[test]
fn hub_manifests_parse_and_are_wired_together() {
    let env = Env::new();
    let (ca, cert, key) = (
        pem(&env, "ca.pem"),
        pem(&env, "hub.pem"),
        pem(&env, "hub-key.pem"),
    );
    // An etcd user's password, private as the hub wants it.
    let password = env.path("etcd-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    std::fs::set_permissions(
        &password,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let password = password.to_str().unwrap().to_string();
    let mut args = vec![
        "--namespace",
        "hubs",
        "--store-user",
        "hub",
        "--store-password-file",
        &password,
        "--replicas",
        "3",
        "--store",
        "https://etcd-0.etcd:2379,etcd-1.etcd:2379",
        "--store-ca",
        &ca,
        "--store-cert",
        &cert,
        "--store-key",
        &key,
        "--metrics",
        "0.0.0.0:9464",
        "--trusted-proxy",
        "10.0.0.0/8",
        "--storage-class",
        "fast",
    ];
    args.extend(ADVERTISE);
    let docs = print(&env, &args);
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "hubs", "{d}");
        }
    }
    let ns: Namespace = typed(of_kind(&docs, "Namespace")[0]);
    assert_eq!(ns.metadata.name.as_deref(), Some("hubs"));
    let sa: ServiceAccount = typed(of_kind(&docs, "ServiceAccount")[0]);
    assert_eq!(sa.automount_service_account_token, Some(false));
    let secret: Secret = typed(of_kind(&docs, "Secret")[0]);
    let services: Vec<Service> = of_kind(&docs, "Service").into_iter().map(typed).collect();
    let sts: StatefulSet = typed(of_kind(&docs, "StatefulSet")[0]);
    let pdb: PodDisruptionBudget = typed(of_kind(&docs, "PodDisruptionBudget")[0]);

    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.automount_service_account_token, Some(false));
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let matches =
        |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| labels.get(k) == Some(v));
    assert!(matches(spec.selector.match_labels.as_ref().unwrap()));
    assert!(matches(
        pdb.spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
    ));

    let c = container(&sts);
    let ports: BTreeMap<String, i32> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert!(ports.contains_key("metrics"), "{ports:?}");
    // Every Service selects the pods and targets their named ports; the
    // headless one is the StatefulSet's, and publishes pods not ready.
    for s in &services {
        let ss = s.spec.as_ref().unwrap();
        assert!(matches(ss.selector.as_ref().unwrap()), "{s:?}");
        for p in ss.ports.as_ref().unwrap() {
            let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(t) =
                p.target_port.as_ref().unwrap()
            else {
                panic!("target ports by name: {p:?}")
            };
            assert!(ports.contains_key(t), "{t} is not a container port");
        }
    }
    let headless = services
        .iter()
        .find(|s| s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("None"))
        .expect("a headless Service");
    assert_eq!(headless.metadata.name, spec.service_name);
    assert_eq!(
        headless.spec.as_ref().unwrap().publish_not_ready_addresses,
        Some(true)
    );
    // ws:// and two ports: a layer-4 load balancer on the URLs' ports,
    // keeping clients' addresses.
    let public = services
        .iter()
        .find(|s| s.spec.as_ref().unwrap().type_.as_deref() == Some("LoadBalancer"))
        .expect("a LoadBalancer Service");
    let ps = public.spec.as_ref().unwrap();
    assert_eq!(ps.external_traffic_policy.as_deref(), Some("Local"));
    let mut public_ports: Vec<i32> = ps.ports.as_ref().unwrap().iter().map(|p| p.port).collect();
    public_ports.sort();
    assert_eq!(public_ports, [8080, 9443]);

    // Probes on a named port the container has.
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(p) = &get.port else {
            panic!("probe port by name")
        };
        assert!(ports.contains_key(p));
    }

    let args = c.args.as_ref().unwrap();
    assert_eq!(&args[..2], ["hub", "run"]);
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
    };
    // Each pod's own stable name through the headless Service, from
    // POD_NAME (which the kubelet expands in args).
    assert_eq!(
        flag("peer-url"),
        format!(
            "https://$(POD_NAME).{}.hubs.svc:{}",
            headless.metadata.name.as_deref().unwrap(),
            ports["gateway"]
        )
    );
    let env_of: BTreeMap<String, &k8s_openapi::api::core::v1::EnvVar> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    assert_eq!(
        env_of["POD_NAME"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
    for a in args {
        for var in a.split("$(").skip(1).filter_map(|r| r.split(')').next()) {
            assert!(env_of.contains_key(var), "$({var}) in {a} is not in env");
        }
    }
    assert!(flag("listen").ends_with(&format!(":{}", ports["tunnel"])));
    assert!(flag("gateway").ends_with(&format!(":{}", ports["gateway"])));
    assert_eq!(flag("store"), "https://etcd-0.etcd:2379,etcd-1.etcd:2379");
    assert_eq!(flag("trusted-proxy"), "10.0.0.0/8");
    assert_eq!(flag("advertise"), "ws://hub.example.com:8080");
    assert_eq!(flag("gateway-url"), "https://hub.example.com:9443");
    // The readiness grace, within the pod's termination grace: behind a
    // cloud load balancer, as long as its health checks take to notice.
    assert_eq!(flag("shutdown-delay"), "30000ms");
    assert!(pod.termination_grace_period_seconds.unwrap() > 30 + 5);

    // The etcd files: each where its flag says, in the Secret mounted
    // there, with the file's contents; nothing of this machine's paths.
    let mounts = c.volume_mounts.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let sd = secret.string_data.as_ref().unwrap();
    assert_eq!(flag("store-user"), "hub");
    for (f, local) in [
        ("store-ca", &ca),
        ("store-cert", &cert),
        ("store-key", &key),
        ("store-password-file", &password),
    ] {
        let path = flag(f);
        assert!(!path.contains(env.path("").to_str().unwrap()), "{path}");
        let m = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m.mount_path)))
            .unwrap_or_else(|| panic!("{path} is on no mount"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        assert_eq!(v.secret.as_ref().unwrap().secret_name, secret.metadata.name);
        let file = path.rsplit('/').next().unwrap();
        assert_eq!(sd[file], std::fs::read_to_string(local).unwrap(), "{f}");
    }
    // The data directory and the state directory (the audit log, which
    // must outlive a restart) on each pod's own claim, of the class asked
    // for; the other XDG directories writable under a read-only root.
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        claim.spec.as_ref().unwrap().storage_class_name.as_deref(),
        Some("fast")
    );
    for var in ["XDG_DATA_HOME", "XDG_STATE_HOME"] {
        let p = env_of[var].value.as_deref().unwrap();
        let m = mounts
            .iter()
            .find(|m| p.starts_with(&format!("{}/", m.mount_path)))
            .unwrap_or_else(|| panic!("{var}={p} is on no mount"));
        assert_eq!(
            Some(m.name.as_str()),
            claim.metadata.name.as_deref(),
            "{var} on the claim"
        );
    }
    for var in ["HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR"] {
        let p = env_of[var].value.as_deref().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| p == m.mount_path || p.starts_with(&format!("{}/", m.mount_path))),
            "{var}={p} is on no writable mount"
        );
    }
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
}

#[test]
fn one_hub_without_etcd_behind_an_ingress() {
    let env = Env::new();
    let docs = print(
        &env,
        &[
            "--advertise",
            "wss://hub.example.com/tunnel",
            "--gateway-url",
            "https://hub.example.com",
        ],
    );
    let sts: StatefulSet = typed(of_kind(&docs, "StatefulSet")[0]);
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(1));
    assert!(
        of_kind(&docs, "Secret").is_empty(),
        "no etcd files, no Secret"
    );
    assert!(
        of_kind(&docs, "PodDisruptionBudget").is_empty(),
        "one hub: no disruption budget to block node drains"
    );
    let args = container(&sts).args.clone().unwrap();
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--peer-url") || a.starts_with("--store")),
        "{args:?}"
    );
    assert!(
        args.contains(&"--shutdown-delay=5000ms".to_string()),
        "{args:?}"
    );
    // An explicit 0 is kept (a hub that stops at once), not taken as unset.
    let docs = print(
        &env,
        &[
            "--advertise",
            "wss://hub.example.com/tunnel",
            "--gateway-url",
            "https://hub.example.com",
            "--shutdown-delay",
            "0",
        ],
    );
    let sts: StatefulSet = typed(of_kind(&docs, "StatefulSet")[0]);
    let args = container(&sts).args.clone().unwrap();
    assert!(
        args.contains(&"--shutdown-delay=0ms".to_string()),
        "{args:?}"
    );
    let spec = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.termination_grace_period_seconds, Some(15));
    // wss:// (TLS ends in front) on one port for both: an ingress routes
    // to a ClusterIP Service.
    for s in of_kind(&docs, "Service") {
        let s: Service = typed(s);
        assert_ne!(
            s.spec.as_ref().unwrap().type_.as_deref(),
            Some("LoadBalancer")
        );
    }
}

#[test]
fn what_cannot_run_in_a_pod_is_refused_naming_the_fix() {
    let env = Env::new();
    let not_pem = env.path("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let missing = env.path("missing.pem");
    let missing = missing.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--gateway-url", "https://hub.example.com"],
            "--advertise",
        ),
        (
            vec!["--advertise", "ws://hub.example.com:8080"],
            "--gateway-url",
        ),
        ([&ADVERTISE[..], &["--replicas", "2"]].concat(), "--store"),
        ([&ADVERTISE[..], &["--replicas", "0"]].concat(), "1 or more"),
        (
            [&ADVERTISE[..], &["--listen", "127.0.0.1:8080"]].concat(),
            "not its loopback; use 0.0.0.0:8080",
        ),
        (
            // Said as port 0, not as loopback (it was both, in one text).
            [&ADVERTISE[..], &["--gateway", "0.0.0.0:0"]].concat(),
            "port 0 (any free port) cannot be named by the pod's Service and probes, which need a fixed port; use 0.0.0.0:PORT",
        ),
        (
            [
                &ADVERTISE[..],
                &[
                    "--store",
                    "etcd://e:2379",
                    "--peer-url",
                    "https://hub-0:9443",
                ],
            ]
            .concat(),
            "--peer-url is set per pod",
        ),
        (
            [
                &ADVERTISE[..],
                &["--store", "https://e:2379", "--store-ca", not_pem],
            ]
            .concat(),
            "not a PEM file",
        ),
        (
            [
                &ADVERTISE[..],
                &["--store", "https://e:2379", "--store-ca", missing],
            ]
            .concat(),
            "cannot read --store-ca",
        ),
        (
            vec![
                "--advertise",
                "https://hub.example.com",
                "--gateway-url",
                "https://hub.example.com",
            ],
            "ws:// or wss://",
        ),
        (
            [
                &ADVERTISE[..],
                &["--trusted-proxy", "10.0.0.0/8", "--require-proxy-protocol"],
            ]
            .concat(),
            "kubelet's probes",
        ),
    ];
    for (extra, names) in cases {
        let mut args = vec!["up", "--print-manifest"];
        args.extend_from_slice(&extra);
        let o = env.towerctl(&args);
        assert!(!o.ok(), "{extra:?} must be refused: {o:?}");
        assert!(
            o.stderr.contains(names),
            "{extra:?}: the error names {names}: {o:?}"
        );
        assert!(o.stdout.is_empty(), "{extra:?}: nothing printed: {o:?}");
        assert!(env.pid_of("hub").is_none());
    }
    // The manifest's own flags need it.
    let o = env.towerctl(&["up", "--replicas", "2"]);
    assert!(!o.ok() && o.stderr.contains("--print-manifest"), "{o:?}");
}
