//! `towerctl join NAME … --print-manifest`: Kubernetes manifests that run
//! the agent inside the member, with in-cluster credentials.

use anyhow::Result;
use serde_json::{json, Value};

use crate::daemon::agent::AgentConfig;

pub struct ManifestOptions {
    pub namespace: String,
    pub image: String,
    /// `--hub-ca` contents, shipped as a ConfigMap mounted into the pod.
    pub hub_ca_pem: Option<String>,
}

/// Where the pod finds `--hub-ca`: its own mount, next to (not inside) the
/// Secret's read-only `/etc/towerctl`.
const HUB_CA_DIR: &str = "/etc/towerctl-hub-ca";
const HUB_CA_KEY: &str = "hub-ca.pem";

/// The documents, in apply order.
pub fn documents(cfg: &AgentConfig, agent_key_pem: &str, o: &ManifestOptions) -> Vec<Value> {
    let name = format!("towerctl-agent-{}", cfg.name);
    let ns = &o.namespace;
    let labels =
        json!({"app.kubernetes.io/name": "towerctl-agent", "app.kubernetes.io/instance": cfg.name});
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}}),
    ];
    if cfg.impersonate {
        // The member's RBAC decides per operator: the agent may only
        // impersonate; operators need their own bindings.
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"], "verbs": ["impersonate"]}],
        }));
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        }));
    } else {
        // Without impersonation every operator acts as the agent, which
        // therefore needs the rights operators expect.
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        }));
    }
    docs.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "stringData": {"token": cfg.token.clone().unwrap_or_default(), "agent.key": agent_key_pem},
    }));
    let mut args = vec![
        "agent".to_string(),
        "run".into(),
        cfg.name.clone(),
        "--hub".into(),
        cfg.hub.clone(),
        "--key-file".into(),
        "/etc/towerctl/agent.key".into(),
        "--keepalive".into(),
        format!("{}s", cfg.keepalive_secs),
        "--backoff-cap".into(),
        format!("{}s", cfg.backoff_cap_secs),
    ];
    match &cfg.hub_key {
        Some(k) => args.extend(["--hub-key".to_string(), k.clone()]),
        None => args.push("--insecure-skip-hub-key".into()),
    }
    if cfg.impersonate {
        args.push("--impersonate".into());
    }
    let mut mounts =
        vec![json!({"name": "agent-key", "mountPath": "/etc/towerctl", "readOnly": true})];
    let mut volumes = vec![
        json!({"name": "agent-key", "secret": {"secretName": name, "defaultMode": 0o400, "items": [{"key": "agent.key", "path": "agent.key"}]}}),
    ];
    if let Some(pem) = &o.hub_ca_pem {
        let cm = format!("{name}-hub-ca");
        docs.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cm, "namespace": ns, "labels": labels},
            "data": {HUB_CA_KEY: pem},
        }));
        args.extend(["--hub-ca".to_string(), format!("{HUB_CA_DIR}/{HUB_CA_KEY}")]);
        mounts.push(json!({"name": "hub-ca", "mountPath": HUB_CA_DIR, "readOnly": true}));
        volumes.push(json!({"name": "hub-ca", "configMap": {"name": cm, "items": [{"key": HUB_CA_KEY, "path": HUB_CA_KEY}]}}));
    }
    if cfg.insecure_skip_tls_verify {
        args.push("--insecure-skip-tls-verify".into());
    }
    docs.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 1,
            // Never two agents of one cluster at once: they would replace
            // each other's session on the hub.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": true,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "agent",
                        "image": o.image,
                        "args": args,
                        "env": [{"name": "TOWERCTL_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}}],
                        "volumeMounts": mounts,
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                    }],
                    "volumes": volumes,
                },
            },
        },
    }));
    docs
}

pub fn print(cfg: &AgentConfig, o: &ManifestOptions) -> Result<u8> {
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)?;
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)?
        .to_string();
    let mut out = String::new();
    out.push_str(&format!(
        "# towerctl agent for cluster '{}'; apply in the member: kubectl apply -f -\n# The Secret holds the join token and the agent's private key.\n",
        cfg.name
    ));
    for d in documents(cfg, &pem, o) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&d)?);
    }
    print!("{out}");
    Ok(super::exit::OK)
}
