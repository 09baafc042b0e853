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
    /// `--key-file`'s key (OpenSSH PEM), for the Secret: the key the hub
    /// registered at the first join, kept when the manifest is printed
    /// again. A new one otherwise.
    pub agent_key_pem: Option<String>,
}

/// The names of the member-wide RBAC objects of an install: with its
/// namespace in them (two installs of one member name, for two hub
/// groups, took each other's binding), and one binding name per mode (a
/// binding cannot change its role: applied over the other mode's, the
/// apply failed and the agent kept cluster-admin).
pub fn rbac_names(cluster: &str, ns: &str) -> (String, String) {
    let role = format!("towerctl-agent:{ns}:{cluster}");
    let admin_binding = format!("{role}:cluster-admin");
    (role, admin_binding)
}

/// Where the pod finds `--hub-ca`: its own mount, next to (not inside) the
/// Secret's read-only `/etc/towerctl`.
const HUB_CA_DIR: &str = "/etc/towerctl-hub-ca";
const HUB_CA_KEY: &str = "hub-ca.pem";
/// Where the pod's agent serves `/healthz` and `/readyz` unless
/// `--probe-addr` says otherwise.
pub const POD_PROBE_ADDR: &str = "0.0.0.0:8081";

/// The namespace `--print-manifest` creates when none is named.
pub const DEFAULT_NAMESPACE: &str = "towerctl-system";
/// The only writable path of the pod (an in-memory emptyDir): HOME and the
/// XDG directories (pid file and control socket) point into it.
const SCRATCH: &str = "/tmp";

/// What the agent itself reads (and watches, for its Service cache) with
/// its service account, whatever the impersonation mode: the objects it
/// resolves port-forward targets from (`resolve.rs`, `watchcache.rs`), and
/// `pods/portforward` for `--pod-network portforward` or `auto`'s fallback.
fn agent_own_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["pods", "services", "endpoints"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        // The workloads port-forward reaches a pod of (`deploy/`, `sts/` …).
        {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets", "daemonsets"], "verbs": ["get", "list"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["replicationcontrollers"], "verbs": ["get", "list"]},
        // WebSocket port-forward is a GET the API server authorizes as
        // `create` (and older servers as `get`).
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
    ])
}

/// The security context of the agent's and the hubs' containers: user
/// 65532 (the image's), nothing to escalate to, a read-only root.
pub fn restricted_container() -> Value {
    json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "privileged": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The documents, in apply order.
pub fn documents(cfg: &AgentConfig, agent_key_pem: &str, o: &ManifestOptions) -> Vec<Value> {
    let name = format!("towerctl-agent-{}", cfg.name);
    let ns = &o.namespace;
    let (role, admin_binding) = rbac_names(&cfg.name, ns);
    let labels =
        json!({"app.kubernetes.io/name": "towerctl-agent", "app.kubernetes.io/instance": cfg.name});
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        // The token is mounted into the agent's pod only (the pod asks for
        // it); nothing else that might use this account gets it.
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}, "automountServiceAccountToken": false}),
    ];
    if cfg.impersonate {
        // The member's RBAC decides per operator: the agent may only
        // impersonate, plus read what it resolves targets from; operators
        // need their own bindings.
        let mut rules = vec![
            json!({"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"], "verbs": ["impersonate"]}),
            // A client's own `kubectl --as-uid`, once the operator's RBAC
            // allows it (`--as-user-extra` needs `userextras/KEY` granted
            // per key: RBAC has no narrower wildcard than every key).
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["uids"], "verbs": ["impersonate"]}),
            // Raw access (CONNECT, port-forward) is checked against the
            // operator's own RBAC with a SubjectAccessReview.
            json!({"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}),
        ];
        rules.extend(agent_own_rules().as_array().cloned().unwrap_or_default());
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role, "labels": labels},
            "rules": rules,
        }));
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        }));
    } else {
        // Without impersonation every operator acts as the agent, which
        // therefore needs the rights operators expect: cluster-admin (see
        // README, "Run the agent as a pod", for when to pick which).
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": admin_binding, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        }));
    }
    // `--proxy` reaches the pod from the Secret (a proxy URL may carry a
    // password), as TOWERCTL_PROXY: not HTTPS_PROXY, which the pod's client
    // for its own API server would take too. This machine's proxy
    // variables are not the pod's and are not carried.
    let mut secret_data =
        json!({"token": cfg.token.as_ref().map_or("", |t| t.expose()), "agent.key": agent_key_pem});
    if let Some(p) = &cfg.proxy_url {
        secret_data["proxy"] = json!(p);
    }
    docs.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "stringData": secret_data,
    }));
    let mut args = vec![
        "agent".to_string(),
        "run".into(),
        cfg.name.clone(),
        "--hub".into(),
        cfg.hub.clone(),
    ];
    for h in &cfg.more_hubs {
        args.push("--hub".into());
        args.push(h.clone());
    }
    args.extend([
        "--key-file".into(),
        "/etc/towerctl/agent.key".into(),
        "--keepalive".into(),
        format!("{}s", cfg.keepalive_secs),
        "--backoff-cap".into(),
        format!("{}s", cfg.backoff_cap_secs),
    ]);
    match &cfg.hub_key {
        Some(k) => args.extend(["--hub-key".to_string(), k.clone()]),
        None => args.push("--insecure-skip-hub-key".into()),
    }
    if cfg.impersonate {
        args.push("--impersonate".into());
    }
    if cfg.pod_network != "auto" {
        args.extend(["--pod-network".to_string(), cfg.pod_network.clone()]);
    }
    for a in &cfg.allow {
        args.extend(["--allow".to_string(), a.clone()]);
    }
    let probe_addr = cfg.probe_addr.as_deref().unwrap_or(POD_PROBE_ADDR);
    let probe_port = probe_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.port())
        .unwrap_or(8081);
    args.extend(["--probe-addr".to_string(), probe_addr.to_string()]);
    let mut env = vec![
        json!({"name": "TOWERCTL_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "token"}}}),
    ];
    for (var, sub) in [
        ("HOME", ""),
        ("XDG_CONFIG_HOME", "/config"),
        ("XDG_DATA_HOME", "/data"),
        ("XDG_STATE_HOME", "/state"),
        ("XDG_RUNTIME_DIR", "/run"),
    ] {
        env.push(json!({"name": var, "value": format!("{SCRATCH}{sub}")}));
    }
    // The node's addresses, which the pod's own interfaces do not show:
    // counted among the agent's own host addresses, which a dial needs a
    // rule naming (a name rule like `*.compute.internal` reached the
    // kubelet of the agent's node).
    env.push(json!({"name": crate::daemon::policy::HOST_IPS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}));
    if cfg.proxy_url.is_some() {
        env.push(json!({"name": "TOWERCTL_PROXY", "valueFrom": {"secretKeyRef": {"name": name, "key": "proxy"}}}));
    }
    let probe = |path: &str, period: u32, failures: u32| json!({"httpGet": {"path": path, "port": "probes"}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": failures});
    let mut mounts = vec![
        json!({"name": "agent-key", "mountPath": "/etc/towerctl", "readOnly": true}),
        json!({"name": "scratch", "mountPath": SCRATCH}),
    ];
    // Secret files are root-owned: group-readable, with fsGroup making the
    // agent's group theirs.
    let mut volumes = vec![
        json!({"name": "agent-key", "secret": {"secretName": name, "defaultMode": 0o440, "items": [{"key": "agent.key", "path": "agent.key"}]}}),
        json!({"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}),
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
                // The key the pod logs in with: a Secret printed with another
                // rolls the pod at apply time (a running agent kept the key
                // it had loaded, and a wrong one showed only at its next
                // restart).
                "metadata": {"labels": labels, "annotations": {"towerctl.io/agent-key": key_fingerprint(agent_key_pem)}},
                "spec": {
                    "serviceAccountName": name,
                    // The agent's own credentials for the member's API server.
                    "automountServiceAccountToken": true,
                    "enableServiceLinks": false,
                    // SIGTERM makes the agent tell the hub "agent stopped"
                    // and exit within a couple of seconds.
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "agent",
                        "image": o.image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": args.iter().map(|a| literal_arg(a)).collect::<Vec<_>>(),
                        "env": env,
                        "ports": [{"name": "probes", "containerPort": probe_port, "protocol": "TCP"}],
                        "livenessProbe": probe("/healthz", 10, 3),
                        "readinessProbe": probe("/readyz", 5, 1),
                        "volumeMounts": mounts,
                        "securityContext": restricted_container(),
                        "resources": {
                            // No ephemeral-storage limit: the kubelet counts
                            // the container's log files against it (50 MiB
                            // rotated logs on OpenShift's defaults), and a
                            // long hub outage's retry lines evicted the
                            // agent. Its only writable path is the
                            // size-limited in-memory scratch.
                            "requests": {"cpu": "10m", "memory": "32Mi", "ephemeral-storage": "16Mi"},
                            "limits": {"cpu": "1", "memory": "256Mi"},
                        },
                    }],
                    "volumes": volumes,
                },
            },
        },
    }));
    docs
}

/// A container argument taken as written: Kubernetes expands `$(NAME)` in
/// `args` from the container's environment (which holds the join token and
/// the proxy's credentials), and `$$` is its escape. A hub URL from the
/// shared registry written `wss://h/$(TOWERCTL_TOKEN)` handed the token to
/// whoever ran that address.
/// The SHA-256 fingerprint of the key `pem` holds (empty if it holds none).
fn key_fingerprint(pem: &str) -> String {
    russh::keys::PrivateKey::from_openssh(pem.trim())
        .map(|k| {
            k.public_key()
                .fingerprint(russh::keys::HashAlg::Sha256)
                .to_string()
        })
        .unwrap_or_default()
}

pub fn literal_arg(s: &str) -> String {
    s.replace('$', "$$")
}

pub fn print(cfg: &AgentConfig, o: &ManifestOptions) -> Result<u8> {
    let pem = match &o.agent_key_pem {
        Some(pem) => pem.clone(),
        None => russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)?
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)?
            .to_string(),
    };
    let name = &cfg.name;
    let ns = &o.namespace;
    let (role, admin_binding) = rbac_names(name, ns);
    let mut out = String::new();
    out.push_str(&format!(
        "# towerctl agent for cluster '{name}'; apply in the member: kubectl apply -f -\n# The Secret holds the join token and the agent's private key.\n"
    ));
    if o.agent_key_pem.is_some() {
        out.push_str("# The key is the one --key-file names.\n");
    } else {
        // Also on stderr: `kubectl apply` drops the comment, and a running
        // agent keeps the key it loaded, so the refusal came only at the
        // pod's next restart, days later.
        eprintln!(
            "note: this manifest holds a NEW agent key for '{name}': if its agent joined already, the hub refuses it (print with the registered key instead: --key-file, see the manifest's header)"
        );
        out.push_str(&format!(
            "# Printed again, the Secret holds a new key and the same (spent) token,\n# which the hub refuses: to change the arguments of a running agent, print\n# with its key, --key-file FILE, after\n#   (umask 077; kubectl -n {ns} get secret towerctl-agent-{name} -o jsonpath='{{.data.agent\\.key}}' | base64 -d > FILE)\n# (not after 'cluster rotate {name} --new-key': that key is refused), or\n# start over with the command 'towerctl cluster rotate {name}' prints.\n"
        ));
    }
    // The other mode's objects, and those of the names before this one.
    let stale = if cfg.impersonate {
        format!("clusterrolebinding {admin_binding} towerctl-agent-{name}")
    } else {
        format!("clusterrolebinding,clusterrole {role} towerctl-agent-{name}")
    };
    // Also on stderr: the manifest goes into `kubectl apply`, whose user
    // sees no comment, and a binding left from the other mode keeps its
    // rights (cluster-admin) silently.
    eprintln!(
        "note: if this member's agent ran in the other mode (--impersonate or not), or from a manifest of an older towerctl, remove what that granted: kubectl delete {stale} --ignore-not-found"
    );
    out.push_str(&format!(
        "# Switched from the other mode (--impersonate or not), or printed by an\n# older towerctl before: remove what it granted with\n#   kubectl delete {stale} --ignore-not-found\n# OpenShift: its restricted SCC refuses the fixed user 65532; allow it with\n#   oc adm policy add-scc-to-user nonroot-v2 -z towerctl-agent-{name} -n {ns}\n"
    ));
    if o.namespace != DEFAULT_NAMESPACE {
        out.push_str(&format!(
            "# It declares namespace '{}': 'kubectl delete -f' deletes it, with everything in it.\n",
            o.namespace
        ));
    }
    for d in documents(cfg, &pem, o) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&d)?);
    }
    print!("{out}");
    Ok(super::exit::OK)
}
