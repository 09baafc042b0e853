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
    let o = support::run_bounded(env.towerctl_cmd(&args), Duration::from_secs(30));
    assert!(o.ok(), "{o:?}");
    o.stdout
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
    assert!(
        rules
            .iter()
            .all(|r| r.verbs == vec!["impersonate".to_string()]),
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
