//! `towerctl up … --print-manifest`: Kubernetes manifests that run the hub
//! as a StatefulSet (several replicas sharing one etcd, or one with its
//! embedded registry on a volume), as README's "Running the hubs in
//! Kubernetes" describes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::HubArgs;

pub struct HubManifestOptions {
    pub namespace: String,
    pub image: String,
    /// `None`: two hubs with `--store`, one without.
    pub replicas: Option<u32>,
    /// The volume claims' StorageClass (`None`: the cluster's default).
    pub storage_class: Option<String>,
}

/// The namespace `up --print-manifest` declares when none is named.
pub const DEFAULT_NAMESPACE: &str = "towerctl-hub";
/// The StatefulSet, its headless Service (the pods' stable names, which
/// the hubs forward requests to each other at) and the ServiceAccount.
const NAME: &str = "towerctl-hub";
/// The Service agents and operators reach the hubs through.
const PUBLIC: &str = "towerctl-hub-public";
/// The Secret with etcd's CA and the group's client certificate and key.
const ETCD_SECRET: &str = "towerctl-hub-etcd";
/// Where that Secret is mounted.
const ETCD_DIR: &str = "/etc/towerctl-etcd";
/// Each pod's volume: its data directory (`XDG_DATA_HOME` under it: hub
/// id and admin token, and without etcd the registry, CA and host key)
/// and its state directory (`XDG_STATE_HOME`: the audit log, up to 40 MiB
/// with its rotations, which must outlive a restart).
const VOLUME: &str = "/var/lib/towerctl";
/// The pod's other writable path (in memory): HOME, config and runtime
/// (the control socket `kubectl exec … towerctl` uses).
const SCRATCH: &str = "/tmp";
/// The readiness grace (`--shutdown-delay`) the manifest sets when none is
/// given, behind an ingress: long enough for the endpoints to drop the pod
/// before it stops.
const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// The same behind a cloud load balancer keeping clients' addresses
/// (`externalTrafficPolicy: Local`): it learns that a node lost its hub
/// only from its own health checks, tens of seconds (GKE ~24 s, an AWS
/// classic ELB up to 60 s), and meanwhile sends there.
const LB_SHUTDOWN_DELAY: Duration = Duration::from_secs(30);

/// What `--advertise` (agents) and `--gateway-url` (kubectl) say about how
/// the hubs are reached, for the public Service.
struct Public {
    /// `ws://`: a layer-4 load balancer can pass the tunnel through.
    plain_tunnel: bool,
    tunnel_port: u16,
    gateway_port: u16,
}

fn public(a: &HubArgs) -> Result<Public> {
    let adv = a.advertise.as_deref().context(
        "--print-manifest needs --advertise URL: the ws:// or wss:// address agents dial from their clusters \
         (the load balancer's or ingress's name); inside a pod the hub cannot know it",
    )?;
    let gw = a.gateway_url.as_deref().context(
        "--print-manifest needs --gateway-url https://HOST[:PORT]: the address operators' kubectl reaches the hubs at \
         (the load balancer's name); inside a pod the hub cannot know it",
    )?;
    let adv_url = url::Url::parse(adv)
        .ok()
        .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some());
    let Some(adv_url) = adv_url else {
        bail!("--advertise '{adv}' is not a ws:// or wss:// URL: give the address agents dial, like ws://hub.example.com:8080");
    };
    let gw_url = url::Url::parse(gw).context("--gateway-url")?;
    Ok(Public {
        plain_tunnel: adv_url.scheme() == "ws",
        tunnel_port: adv_url.port_or_known_default().unwrap_or(80),
        gateway_port: gw_url.port_or_known_default().unwrap_or(443),
    })
}

/// A listener the pod's Service and probes can reach: not loopback, a
/// fixed port.
fn reachable_port(flag: &str, addr: std::net::SocketAddr) -> Result<u16> {
    if addr.ip().is_loopback() {
        bail!("--{flag} {addr} cannot be reached in a pod: its Service and the kubelet reach the pod's own IP, not its loopback; use 0.0.0.0:{}", if addr.port() == 0 { "PORT".to_string() } else { addr.port().to_string() });
    }
    if addr.port() == 0 {
        let ip = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        bail!("--{flag} {addr}: port 0 (any free port) cannot be named by the pod's Service and probes, which need a fixed port; use {ip}:PORT");
    }
    Ok(addr.port())
}

/// The contents of a `--store-…` file, shipped in the Secret: checked to be
/// PEM here, where the file can still be fixed, not in the pod.
fn read_pem(flag: &str, p: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(p).with_context(|| {
        format!(
            "cannot read --{flag} '{}' (the manifest ships its contents in the Secret {ETCD_SECRET})",
            p.display()
        )
    })?;
    if !pem.contains("-----BEGIN ") {
        bail!(
            "--{flag} '{}' is not a PEM file (no '-----BEGIN' line): give the PEM file etcd's TLS uses",
            p.display()
        );
    }
    Ok(pem)
}

/// The documents, in apply order.
pub fn documents(a: &HubArgs, o: &HubManifestOptions) -> Result<Vec<Value>> {
    crate::daemon::names::validate_name_of("namespace", &o.namespace)
        .map_err(anyhow::Error::msg)?;
    if o.image.trim().is_empty() {
        bail!(
            "--image is empty: pass the hub image, like localhost/towerctl:{} (built by scripts/image.sh)",
            env!("CARGO_PKG_VERSION")
        );
    }
    if a.peer_url.is_some() {
        bail!("--peer-url is set per pod by the manifest (https://POD.{NAME}.NAMESPACE.svc:PORT, the pod's stable name): leave it out");
    }
    let shared = a.store.is_some();
    let replicas = o.replicas.unwrap_or(if shared { 2 } else { 1 });
    if replicas == 0 {
        bail!("--replicas 0 runs no hub: give 1 or more");
    }
    if replicas > 1 && !shared {
        bail!("--replicas {replicas} needs --store etcd://HOST:PORT (or https://…): several hubs share their registry in etcd; without it, give --replicas 1");
    }
    if a.require_proxy_protocol {
        bail!("--require-proxy-protocol cannot run in the printed pod: the kubelet's probes and the other hubs reach it without a PROXY header; give --trusted-proxy alone (a proxy's X-Forwarded-For and PROXY headers are still read from it)");
    }
    let tunnel_port = reachable_port("listen", a.listen)?;
    let gateway_port = reachable_port("gateway", a.gateway)?;
    if tunnel_port == gateway_port {
        bail!("--listen and --gateway both use port {tunnel_port}: give them different ports");
    }
    let public = public(a)?;
    let ns = o.namespace.as_str();
    let labels =
        json!({"app.kubernetes.io/name": "towerctl-hub", "app.kubernetes.io/instance": NAME});

    // The daemon's own flags, as `up` would hand them over, with the
    // pod's paths and its stable name.
    let mut pod = a.clone();
    // Kubernetes expands `$(POD_NAME)` in it (the pod's own address): the
    // one argument not taken as written (`manifest::literal_arg`).
    let peer_url = format!("https://$(POD_NAME).{NAME}.{ns}.svc:{gateway_port}");
    if shared {
        pod.peer_url = Some(peer_url.clone());
    }
    let load_balancer = public.plain_tunnel && public.tunnel_port != public.gateway_port;
    // Unless given, 0 included (a hub that stops at once).
    let shutdown_delay = *pod.shutdown_delay.get_or_insert(if load_balancer {
        LB_SHUTDOWN_DELAY
    } else {
        DEFAULT_SHUTDOWN_DELAY
    });
    let mut etcd_files = serde_json::Map::new();
    for (flag, given, file) in [
        ("store-ca", &mut pod.store_ca, "ca.pem"),
        ("store-cert", &mut pod.store_cert, "cert.pem"),
        ("store-key", &mut pod.store_key, "key.pem"),
    ] {
        if let Some(p) = given.take() {
            etcd_files.insert(file.into(), json!(read_pem(flag, &p)?));
            *given = Some(PathBuf::from(ETCD_DIR).join(file));
        }
    }
    if let Some(p) = pod.store_password_file.take() {
        let password = crate::daemon::etcd::read_password(&p).map_err(anyhow::Error::msg)?;
        etcd_files.insert("password".into(), json!(format!("{password}\n")));
        pod.store_password_file = Some(PathBuf::from(ETCD_DIR).join("password"));
    }
    let expanded = format!("--peer-url={peer_url}");
    let args: Vec<String> = pod
        .daemon_args()
        .iter()
        .map(|a| match shared && *a == expanded {
            true => a.clone(),
            false => super::manifest::literal_arg(a),
        })
        .collect();

    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        // The hub needs nothing from the Kubernetes API of the cluster it
        // runs in: no token is mounted.
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": ns, "labels": labels}, "automountServiceAccountToken": false}),
    ];
    let mut mounts = vec![
        json!({"name": "data", "mountPath": VOLUME}),
        json!({"name": "scratch", "mountPath": SCRATCH}),
    ];
    let mut volumes =
        vec![json!({"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})];
    if !etcd_files.is_empty() {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": ETCD_SECRET, "namespace": ns, "labels": labels},
            "stringData": etcd_files,
        }));
        mounts.push(json!({"name": "etcd", "mountPath": ETCD_DIR, "readOnly": true}));
        // Root-owned files: group-readable, with fsGroup making the hub's
        // group theirs.
        volumes.push(
            json!({"name": "etcd", "secret": {"secretName": ETCD_SECRET, "defaultMode": 0o440}}),
        );
    }
    let port = |name: &str, p: u16| json!({"name": name, "port": p, "targetPort": name, "protocol": "TCP"});
    // Each pod by its stable name, ready or not: the other hubs forward a
    // member's requests to the hub holding its tunnel, also while that
    // hub's readiness is down for a hand-off.
    docs.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": labels,
            "ports": [port("tunnel", tunnel_port), port("gateway", gateway_port)],
        },
    }));
    // A layer-4 load balancer where agents dial ws:// and the two URLs
    // name two ports: it passes the tunnel and the gateway's TLS through
    // untouched. `Local` keeps each client's own address (audit, per-source
    // limits and penalties): through a node's SNAT every agent and
    // operator behind it would count as one source. Otherwise (wss://, or
    // one port for both) an ingress in front routes to this Service.
    let public_spec = if load_balancer {
        json!({
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "selector": labels,
            "ports": [
                {"name": "tunnel", "port": public.tunnel_port, "targetPort": "tunnel", "protocol": "TCP"},
                {"name": "gateway", "port": public.gateway_port, "targetPort": "gateway", "protocol": "TCP"},
            ],
        })
    } else {
        json!({
            "type": "ClusterIP",
            "selector": labels,
            "ports": [port("tunnel", tunnel_port), port("gateway", gateway_port)],
        })
    };
    let mut public_meta = json!({"name": PUBLIC, "namespace": ns, "labels": labels});
    if load_balancer {
        // EKS's in-tree default is a classic ELB, which proxies (every
        // client would be its address); a network load balancer passes
        // them through. Other clouds ignore the annotation.
        public_meta["annotations"] =
            json!({"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"});
    }
    docs.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": public_meta,
        "spec": public_spec,
    }));
    if replicas > 1 {
        docs.push(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": NAME, "namespace": ns, "labels": labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        }));
    }

    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "XDG_DATA_HOME", "value": format!("{VOLUME}/data")}),
        json!({"name": "XDG_STATE_HOME", "value": format!("{VOLUME}/state")}),
    ];
    for (var, sub) in [
        ("HOME", ""),
        ("XDG_CONFIG_HOME", "/config"),
        ("XDG_RUNTIME_DIR", "/run"),
    ] {
        env.push(json!({"name": var, "value": format!("{SCRATCH}{sub}")}));
    }
    let mut ports = vec![
        json!({"name": "tunnel", "containerPort": tunnel_port, "protocol": "TCP"}),
        json!({"name": "gateway", "containerPort": gateway_port, "protocol": "TCP"}),
    ];
    if let Some(m) = a.metrics.0.filter(|m| !m.ip().is_loopback()) {
        ports.push(json!({"name": "metrics", "containerPort": m.port(), "protocol": "TCP"}));
    }
    // The tunnel port answers /healthz, /readyz and /livez (also while the
    // hub waits for etcd at start: alive, not ready).
    let probe = |path: &str, period: u32, failures: u32| json!({"httpGet": {"path": path, "port": "tunnel"}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": failures});
    // The readiness grace, then the hub's own goodbye to its agents and
    // streams.
    let grace = shutdown_delay.as_secs() + 15;
    let mut claim = json!({
        "metadata": {"name": "data", "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    });
    if let Some(class) = &o.storage_class {
        claim["spec"]["storageClassName"] = json!(class);
    }
    docs.push(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "serviceName": NAME,
            "replicas": replicas,
            // Hubs need no order among themselves: all start at once.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NAME,
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                        "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    // Hubs on different nodes where there are: a node lost
                    // takes one hub, and its agents reconnect to another.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": labels}},
                    }]}},
                    "containers": [{
                        "name": "hub",
                        "image": o.image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": args,
                        "env": env,
                        "ports": ports,
                        "livenessProbe": probe("/healthz", 10, 3),
                        "readinessProbe": probe("/readyz", 5, 2),
                        "volumeMounts": mounts,
                        "securityContext": super::manifest::restricted_container(),
                        // No CPU limit: throttling would show as latency
                        // on every member's requests.
                        // No ephemeral-storage limit: the root is read-only,
                        // and the kubelet counts the container's log files
                        // against it (50 MiB each on OpenShift's defaults).
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi", "ephemeral-storage": "16Mi"},
                            "limits": {"memory": "1Gi"},
                        },
                    }],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }));
    Ok(docs)
}

pub fn print(a: &HubArgs, o: &HubManifestOptions) -> Result<u8> {
    let docs = documents(a, o)?;
    let ns = &o.namespace;
    let public = public(a)?;
    // In comments: one line each, whatever they hold.
    let adv = crate::tunnel::shown(a.advertise.as_deref().unwrap_or_default());
    let gw = crate::tunnel::shown(a.gateway_url.as_deref().unwrap_or_default());
    let mut out = format!(
        "# towerctl hub (StatefulSet {NAME}) in namespace '{ns}'; apply where the hubs run: kubectl apply -f -\n\
         # Agents dial {adv}; kubectl reaches {gw}.\n"
    );
    if public.plain_tunnel && public.tunnel_port != public.gateway_port {
        out.push_str(&format!(
            "# Service {PUBLIC} is a LoadBalancer: point both names at its address\n\
             # (kubectl -n {ns} get service {PUBLIC}).\n"
        ));
    } else {
        out.push_str(&format!(
            "# Service {PUBLIC} is ClusterIP: route to it from your ingress, TLS ending there for\n\
             # the tunnel (port 'tunnel', WebSocket) and passed through untouched to port 'gateway'\n\
             # (README, \"Hub behind an ingress\").\n"
        ));
        if a.trusted_proxies.is_empty() {
            out.push_str(
                "# Without --trusted-proxy (the ingress's addresses), every client counts as the\n\
                 # ingress for audit and per-source limits.\n",
            );
        }
    }
    if o.image.starts_with("localhost/") {
        out.push_str(&format!(
            "# Image {}: built here by scripts/image.sh; push it where the nodes pull from and\n\
             # pass --image.\n",
            crate::tunnel::shown(&o.image)
        ));
    }
    out.push_str(
        "# OpenShift: its restricted SCC refuses the fixed user 65532; allow it with\n\
         # 'oc adm policy add-scc-to-user nonroot-v2 -z towerctl-hub -n NAMESPACE'.\n",
    );
    out.push_str(&format!(
        "# Then: kubectl -n {ns} exec {NAME}-0 -- towerctl cluster add NAME   (prints the join command)\n\
         #       kubectl -n {ns} exec {NAME}-0 -- towerctl operator add NAME  (prints the login command)\n"
    ));
    if a.store_cert.is_some() || a.store_key.is_some() || a.store_user.is_some() {
        out.push_str(&format!(
            "# The Secret {ETCD_SECRET} holds the etcd client key or password: whoever reads it can act as the hubs in etcd.\n"
        ));
    }
    out.push_str(&format!(
        "# It declares namespace '{ns}': 'kubectl delete -f' deletes it with everything in it,\n\
         # the hubs' volumes too (their data{} and audit logs).\n",
        if a.store.is_none() {
            ": the registry, CA and host key, which every join and kubeconfig trusts"
        } else {
            ""
        }
    ));
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&d)?);
    }
    print!("{out}");
    Ok(super::exit::OK)
}
