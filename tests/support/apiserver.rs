//! A stand-in Kubernetes API server for end-to-end tests driven by the real `kubectl`.
//!
//! It speaks just enough of the wire protocol for kubectl 1.32: legacy discovery, list/get/
//! create/patch/delete/watch of namespaces, nodes, configmaps, pods, services, endpoints,
//! `discovery.k8s.io/v1` endpointslices and `apps/v1` deployments (with label selectors),
//! serviceaccounts, secrets, clusterroles and clusterrolebindings (plain storage),
//! `pods/exec` over WebSocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`) and `pods/portforward`
//! over SPDY/3.1, plain or tunneled through a WebSocket (`SPDY/3.1+portforward.k8s.io`; kubectl)
//! or over the WebSocket channel protocol (`v4.channel.k8s.io` / `v5.channel.k8s.io`; kube-rs).
//! Every request must carry `Authorization: Bearer fake-upstream-token`; all requests are
//! recorded for assertions.
//!
//! The file is self-contained so it can be copied into another crate's `tests/support/`.
#![allow(dead_code)] // each test binary uses a different subset of the helpers

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::{coding::CloseCode, CloseFrame};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The bearer token every request must present.
pub const TOKEN: &str = "fake-upstream-token";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A Service port's `targetPort`: a container port number or name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(&'static str),
}

/// One request as it reached the server (recorded before authentication).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path plus `?query` if any.
    pub path: String,
    /// Lowercase header name -> value (repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A running fake API server; stopped when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts on 127.0.0.1:0 in its own thread with its own tokio runtime; returns once listening.
    pub fn start() -> ApiServer {
        Self::start_on(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// Starts on `ip`:0 (for tests whose agent runs in a network namespace).
    pub fn start_on(ip: std::net::IpAddr) -> ApiServer {
        let shared = Arc::new(Shared::seeded());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake apiserver runtime");
                rt.block_on(serve(server_shared, ip, ready_tx, stop_rx));
                // Dropping the runtime here cancels open connections and watches.
            })
            .expect("spawn fake apiserver thread");
        let addr = ready_rx.recv().expect("fake apiserver failed to bind");
        ApiServer {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// How many SubjectAccessReviews were answered.
    pub fn subject_access_reviews(&self) -> u64 {
        self.shared
            .sar_count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Grants `user` access when a client impersonates it (RBAC stand-in).
    pub fn bind_user(&self, user: &str) {
        self.shared
            .bound_users
            .lock()
            .unwrap()
            .push(user.to_string());
    }

    /// Lets `user` impersonate `resource` (`users`, `groups`,
    /// `serviceaccounts`, `uids`, `userextras/KEY`) named `name` (`*`: any;
    /// a service account as `NAMESPACE/NAME`)
    /// in a SubjectAccessReview, as a ClusterRole with verb `impersonate`
    /// would. Reviews of `impersonate` are refused otherwise.
    pub fn allow_impersonation(&self, user: &str, resource: &str, name: &str) {
        self.shared.impersonators.lock().unwrap().push((
            user.to_string(),
            resource.to_string(),
            name.to_string(),
        ));
    }

    /// Every request's headers seen so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Create a configmap as if another client did it (notifies watchers).
    pub fn create_configmap(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let obj = json!({"metadata": {"name": name}, "data": data});
        let mut store = self.shared.lock();
        if let Err(e) = store.create(&CONFIGMAPS, namespace, obj) {
            panic!("create_configmap {namespace}/{name}: {}", e.message);
        }
    }

    /// Creates (or replaces) a Service with `ports` (name, port, targetPort) and `selector`.
    pub fn add_service(
        &self,
        ns: &str,
        name: &str,
        ports: &[(&str, u16, TargetPort)],
        selector: &[(&str, &str)],
    ) {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port_name, port, target)| {
                let target = match target {
                    TargetPort::Number(n) => json!(n),
                    TargetPort::Name(n) => json!(n),
                };
                let mut port = json!({"port": port, "targetPort": target, "protocol": "TCP"});
                if !port_name.is_empty() {
                    port["name"] = json!(port_name);
                }
                port
            })
            .collect();
        let n = self.shared.lock().rv;
        let ip = Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8).to_string();
        let obj = json!({
            "metadata": {"name": name},
            "spec": {
                "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports,
                "selector": string_map(selector), "sessionAffinity": "None",
            },
            "status": {"loadBalancer": {}},
        });
        self.upsert(&SERVICES, ns, obj);
    }

    /// Sets the ready endpoints of service `service`, as (ip, port name, port): writes both
    /// the core Endpoints object and one EndpointSlice (labelled
    /// `kubernetes.io/service-name`), replacing earlier ones, and notifies watchers.
    pub fn set_endpoints(&self, ns: &str, service: &str, addrs: &[(&str, &str, u16)]) {
        let port_json = |name: &str, port: u16| {
            let mut port = json!({"port": port, "protocol": "TCP"});
            if !name.is_empty() {
                port["name"] = json!(name);
            }
            port
        };
        // Endpoints: one subset per distinct set of ports, listing the addresses having it.
        let mut ports_by_ip: BTreeMap<&str, Vec<(&str, u16)>> = BTreeMap::new();
        for (ip, name, port) in addrs {
            ports_by_ip.entry(ip).or_default().push((name, *port));
        }
        let mut subsets: Vec<(_, Vec<&str>)> = Vec::new();
        for (ip, mut ports) in ports_by_ip {
            ports.sort_unstable();
            ports.dedup();
            match subsets.iter_mut().find(|(p, _)| *p == ports) {
                Some((_, ips)) => ips.push(ip),
                None => subsets.push((ports, vec![ip])),
            }
        }
        let subsets: Vec<Value> = subsets
            .iter()
            .map(|(ports, ips)| {
                let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
                let ports: Vec<Value> = ports.iter().map(|(n, p)| port_json(n, *p)).collect();
                json!({"addresses": addresses, "ports": ports})
            })
            .collect();
        let endpoints = json!({"metadata": {"name": service}, "subsets": subsets});

        // One EndpointSlice with every address and the union of the ports.
        let mut ips: Vec<&str> = addrs.iter().map(|(ip, _, _)| *ip).collect();
        let mut ports: Vec<(&str, u16)> = addrs.iter().map(|(_, n, p)| (*n, *p)).collect();
        ips.sort_unstable();
        ips.dedup();
        ports.sort_unstable();
        ports.dedup();
        let slice_name = format!("{service}-fake");
        let slice = json!({
            "metadata": {"name": slice_name, "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            }},
            "addressType": "IPv4",
            "endpoints": ips.iter().map(|ip| json!({
                "addresses": [ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })).collect::<Vec<_>>(),
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
                .collect::<Vec<_>>(),
        });

        self.upsert(&ENDPOINTS, ns, endpoints);
        let mut store = self.shared.lock();
        let stale: Vec<String> = store
            .objects
            .iter()
            .filter(|((plural, o_ns, o_name), obj)| {
                *plural == ENDPOINTSLICES.plural
                    && o_ns == ns
                    && *o_name != slice_name
                    && obj["metadata"]["labels"][SERVICE_NAME_LABEL] == service
            })
            .map(|((_, _, name), _)| name.clone())
            .collect();
        for name in stale {
            store.remove(&ENDPOINTSLICES, ns, &name);
        }
        drop(store);
        self.upsert(&ENDPOINTSLICES, ns, slice);
    }

    /// Gives the endpoint at `ip` of service `service` a `targetRef` to pod `pod_ns/pod` (in the
    /// Endpoints object and the EndpointSlice [`ApiServer::set_endpoints`] wrote), as the
    /// endpoints controller does, or as anyone who may write endpoints can.
    pub fn set_endpoint_pod(&self, ns: &str, service: &str, ip: &str, pod_ns: &str, pod: &str) {
        let target = json!({"kind": "Pod", "namespace": pod_ns, "name": pod});
        let slice_name = format!("{service}-fake");
        let (mut endpoints, mut slice) = {
            let store = self.shared.lock();
            let get = |res: &Resource, name: &str| {
                store.get(res, ns, name).unwrap_or_else(|_| {
                    panic!("no {} {ns}/{name}: set_endpoints first", res.plural)
                })
            };
            (get(&ENDPOINTS, service), get(&ENDPOINTSLICES, &slice_name))
        };
        for sub in endpoints["subsets"].as_array_mut().into_iter().flatten() {
            for a in sub["addresses"].as_array_mut().into_iter().flatten() {
                if a["ip"] == ip {
                    a["targetRef"] = target.clone();
                }
            }
        }
        for e in slice["endpoints"].as_array_mut().into_iter().flatten() {
            if e["addresses"][0] == ip {
                e["targetRef"] = target.clone();
            }
        }
        self.upsert(&ENDPOINTS, ns, endpoints);
        self.upsert(&ENDPOINTSLICES, ns, slice);
    }

    /// Creates (or replaces) a pod with IP `ip`, `labels` and one container exposing the named
    /// `ports` (name, containerPort). A `ready` pod is `Running` with condition `Ready=True`; an
    /// unready one is `Pending` with `Ready=False`.
    pub fn add_pod(
        &self,
        ns: &str,
        name: &str,
        ip: &str,
        labels: &[(&str, &str)],
        ready: bool,
        ports: &[(&str, u16)],
    ) {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p)| json!({"name": n, "containerPort": p, "protocol": "TCP"}))
            .collect();
        let status = if ready { "True" } else { "False" };
        let state = if ready {
            json!({"running": {"startedAt": now_rfc3339()}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        let obj = json!({
            "metadata": {"name": name, "labels": string_map(labels)},
            "spec": {"nodeName": "fake-node-1", "containers": [
                {"name": "app", "image": "nginx:1.27", "ports": ports},
            ]},
            "status": {
                "phase": if ready { "Running" } else { "Pending" },
                "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                "conditions": [
                    {"type": "Ready", "status": status},
                    {"type": "ContainersReady", "status": status},
                ],
                "containerStatuses": [{
                    "name": "app", "ready": ready, "started": ready, "restartCount": 0,
                    "image": "nginx:1.27", "imageID": "", "state": state,
                }],
            },
        });
        self.upsert(&PODS, ns, obj);
    }

    /// Marks pod `ns/name` as running on its node's network (`spec.hostNetwork: true`).
    pub fn set_host_network(&self, ns: &str, name: &str) {
        let pod = self.shared.lock().get(&PODS, ns, name);
        let mut pod = pod.unwrap_or_else(|e| panic!("set_host_network: {}", e.message));
        pod["spec"]["hostNetwork"] = json!(true);
        self.upsert(&PODS, ns, pod);
    }

    /// Deletes a pod (notifies watchers); panics if there is none.
    pub fn delete_pod(&self, ns: &str, name: &str) {
        let deleted = self.shared.lock().remove(&PODS, ns, name);
        assert!(deleted.is_some(), "delete_pod: no pod {ns}/{name}");
    }

    /// Creates (or replaces) a Deployment whose `spec.selector.matchLabels` (and pod template
    /// labels) are `labels`, with `status.readyReplicas` = `ready_replicas`.
    /// A StatefulSet whose selector is `selector`, with a named container
    /// port (`name`, `port`) in its pod template.
    pub fn add_statefulset(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        port: (&str, u16),
    ) {
        let labels = string_map(selector);
        let obj = json!({
            "metadata": {"name": name, "labels": labels, "generation": 1},
            "spec": {
                "replicas": 1,
                "serviceName": name,
                "selector": {"matchExpressions": labels.as_object().unwrap().iter().map(|(k, v)| json!({"key": k, "operator": "In", "values": [v]})).collect::<Vec<_>>()},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "postgres:17", "ports": [{"name": port.0, "containerPort": port.1}]}]},
                },
            },
            "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1},
        });
        self.upsert(&STATEFULSETS, ns, obj);
    }

    pub fn add_deployment(
        &self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        ready_replicas: i32,
    ) {
        let labels = string_map(labels);
        let replicas = ready_replicas.max(1);
        let obj = json!({
            "metadata": {"name": name, "labels": labels, "generation": 1},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]},
                },
            },
            "status": {
                "observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": ready_replicas, "availableReplicas": ready_replicas,
            },
        });
        self.upsert(&DEPLOYMENTS, ns, obj);
    }

    /// Serves (the default) or hides the `discovery.k8s.io/v1` group, like a server predating
    /// EndpointSlices: hidden, it is not advertised in `/apis` and its paths answer 404.
    pub fn set_endpointslices(&self, enabled: bool) {
        self.shared.endpointslices.store(enabled, Ordering::SeqCst);
    }

    /// Makes every later request wait `d` before it is answered, like an API server that hangs.
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    /// Answers requests for `path` (any method, any query) with `status` and `location` (as `Location` and `Content-Location`).
    pub fn set_redirect(&self, path: &str, status: u16, location: &str) {
        self.shared
            .redirects
            .lock()
            .unwrap()
            .insert(path.to_owned(), (status, location.to_owned()));
    }

    /// Makes the fake kubelet's port-forward to port `port` of pod `ns/name` connect to `to`
    /// (by default, it connects to 127.0.0.1:`port`).
    pub fn set_portforward_target(&self, ns: &str, name: &str, port: u16, to: SocketAddr) {
        let key = (ns.to_owned(), name.to_owned(), port);
        self.shared
            .portforward_targets
            .lock()
            .unwrap()
            .insert(key, to);
    }

    /// Creates or replaces an object; panics (without poisoning the store) on failure.
    fn upsert(&self, res: &Resource, ns: &str, obj: Value) {
        let name = obj["metadata"]["name"].clone();
        let result = self.shared.lock().upsert(res, ns, obj);
        if let Err(e) = result {
            panic!("{} {ns}/{name}: {}", res.plural, e.message);
        }
    }

    /// Writes a kubeconfig (plain http, bearer token, context "fake") to `path`.
    ///
    /// kubectl (client-go) never sends a kubeconfig's credentials to an `http://` server, so
    /// kubectl pointed straight at this file gets 401s; clients such as kube-rs do send them.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, config).expect("write kubeconfig");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
    ready: std::sync::mpsc::Sender<SocketAddr>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .expect("bind fake apiserver");
    let _ = ready.send(listener.local_addr().expect("local addr"));
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        // As kube-apiserver (Go sets TCP_NODELAY on every connection): with
        // Nagle, a watch event written while the response head is still
        // unacknowledged waits for the client's delayed ACK (40 ms).
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Resources and storage
// ---------------------------------------------------------------------------------------------

/// A resource type, served under `/api/v1` (core) or `/apis/GROUP/v1`.
struct Resource {
    /// `v1` for the core group, else `GROUP/v1`.
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Short name, or "" for none.
    short: &'static str,
    /// Member of the `all` category (`kubectl get all`).
    in_all: bool,
}

impl Resource {
    /// `plural.group` (just `plural` for core), as in the server's messages.
    fn qualified(&self) -> String {
        match self.group() {
            "" => self.plural.to_owned(),
            group => format!("{}.{group}", self.plural),
        }
    }

    /// The API group ("" for core).
    fn group(&self) -> &'static str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }
}

const fn resource(
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static str,
    in_all: bool,
) -> Resource {
    Resource {
        api_version,
        plural,
        kind,
        namespaced,
        short,
        in_all,
    }
}

const NAMESPACES: Resource = resource("v1", "namespaces", "Namespace", false, "ns", false);
const NODES: Resource = resource("v1", "nodes", "Node", false, "no", false);
const CONFIGMAPS: Resource = resource("v1", "configmaps", "ConfigMap", true, "cm", false);
const PODS: Resource = resource("v1", "pods", "Pod", true, "po", true);
const SERVICES: Resource = resource("v1", "services", "Service", true, "svc", true);
const ENDPOINTS: Resource = resource("v1", "endpoints", "Endpoints", true, "ep", false);
const ENDPOINTSLICES: Resource = resource(
    "discovery.k8s.io/v1",
    "endpointslices",
    "EndpointSlice",
    true,
    "",
    false,
);
const DEPLOYMENTS: Resource =
    resource("apps/v1", "deployments", "Deployment", true, "deploy", true);
const STATEFULSETS: Resource =
    resource("apps/v1", "statefulsets", "StatefulSet", true, "sts", true);
// What the agent's manifest (`join --print-manifest`) creates, so that
// `kubectl apply --dry-run=client` of it can be checked here.
const SERVICEACCOUNTS: Resource =
    resource("v1", "serviceaccounts", "ServiceAccount", true, "sa", false);
const SECRETS: Resource = resource("v1", "secrets", "Secret", true, "", false);
const CLUSTERROLES: Resource = resource(
    "rbac.authorization.k8s.io/v1",
    "clusterroles",
    "ClusterRole",
    false,
    "",
    false,
);
const CLUSTERROLEBINDINGS: Resource = resource(
    "rbac.authorization.k8s.io/v1",
    "clusterrolebindings",
    "ClusterRoleBinding",
    false,
    "",
    false,
);
const RESOURCES: [&Resource; 13] = [
    &NAMESPACES,
    &NODES,
    &CONFIGMAPS,
    &PODS,
    &SERVICES,
    &ENDPOINTS,
    &ENDPOINTSLICES,
    &DEPLOYMENTS,
    &STATEFULSETS,
    &SERVICEACCOUNTS,
    &SECRETS,
    &CLUSTERROLES,
    &CLUSTERROLEBINDINGS,
];
/// The API groups besides core, in discovery order.
const GROUPS: [&str; 3] = ["apps", "discovery.k8s.io", "rbac.authorization.k8s.io"];
/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Storage key: (plural, namespace or "" for cluster-scoped, name).
type Key = (&'static str, String, String);

struct Event {
    rv: u64,
    key: Key,
    /// The object's `metadata.labels`, for label-selected watches.
    labels: Value,
    line: Bytes, // the serialized `{"type":..,"object":..}\n` watch line
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change ever made, in resourceVersion order, so watches can resume from any RV.
    history: Vec<Event>,
    changed: watch::Sender<u64>,
}

struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Users the stand-in's "RBAC" lets an impersonating client act as.
    bound_users: Mutex<Vec<String>>,
    /// SubjectAccessReviews answered.
    sar_count: std::sync::atomic::AtomicU64,
    /// (user, resource[/subresource], name) an `impersonate` review allows.
    impersonators: Mutex<Vec<(String, String, String)>>,
    /// Whether `discovery.k8s.io/v1` is served.
    endpointslices: AtomicBool,
    /// (namespace, pod, pod port) -> where the fake kubelet's port-forward connects.
    portforward_targets: Mutex<HashMap<(String, String, u16), SocketAddr>>,
    /// How long every request waits before it is answered (a slow or stuck server).
    delay: Mutex<Duration>,
    /// Path -> (status, Location): answered as a redirect (a member whose
    /// API server, or something in front of it, redirects).
    redirects: Mutex<HashMap<String, (u16, String)>>,
}

impl Shared {
    fn seeded() -> Shared {
        let mut store = Store {
            rv: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            changed: watch::channel(0).0,
        };
        for ns in ["default", "kube-system"] {
            let obj = json!({"metadata": {"name": ns}});
            store.create(&NAMESPACES, "", obj).unwrap();
        }
        let node = json!({
            "metadata": {"name": "fake-node-1", "labels": {"kubernetes.io/hostname": "fake-node-1"}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Fake OS", "architecture": "amd64"},
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]
            }
        });
        store.create(&NODES, "", node).unwrap();
        let pod = json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {"nodeName": "fake-node-1", "containers": [{"name": "web", "image": "nginx:1.27"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.10",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{
                    "name": "web", "ready": true, "started": true, "restartCount": 0,
                    "image": "nginx:1.27", "state": {"running": {"startedAt": now_rfc3339()}}
                }]
            }
        });
        store.create(&PODS, "default", pod).unwrap();
        Shared {
            store: Mutex::new(store),
            requests: Mutex::new(Vec::new()),
            bound_users: Mutex::new(Vec::new()),
            sar_count: std::sync::atomic::AtomicU64::new(0),
            impersonators: Mutex::new(Vec::new()),
            endpointslices: AtomicBool::new(true),
            delay: Mutex::new(Duration::ZERO),
            redirects: Mutex::new(HashMap::new()),
            portforward_targets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether API group `group` is served (only `discovery.k8s.io` can be switched off).
    fn serves_group(&self, group: &str) -> bool {
        group != "discovery.k8s.io" || self.endpointslices.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap()
    }

    fn record(&self, req: &Request<Incoming>) {
        let mut headers = BTreeMap::<String, String>::new();
        for (name, value) in req.headers() {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            headers
                .entry(name.as_str().to_owned())
                .and_modify(|v| *v = format!("{v}, {value}"))
                .or_insert(value);
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        self.requests.lock().unwrap().push(RecordedRequest {
            method: req.method().to_string(),
            path: path.to_owned(),
            headers,
        });
    }
}

impl Store {
    /// Stores (or for DELETED removes) `obj` under a fresh resourceVersion and wakes watchers.
    fn commit(&mut self, event: &'static str, key: Key, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let line = watch_line(event, &obj);
        let labels = obj["metadata"]["labels"].clone();
        if event == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history.push(Event {
            rv: self.rv,
            key,
            labels,
            line,
        });
        self.changed.send_replace(self.rv);
        obj
    }

    fn create(&mut self, res: &Resource, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("body must be a JSON object"));
        }
        let name = match (&obj["metadata"]["name"], &obj["metadata"]["generateName"]) {
            (Value::String(n), _) if !n.is_empty() => n.clone(),
            (_, Value::String(prefix)) => format!("{prefix}{:05x}", self.rv + 1),
            _ => {
                let msg = format!("{} is invalid: metadata.name: Required value", res.kind);
                return Err(ApiError::new(422, "Invalid", msg));
            }
        };
        if res.namespaced && !self.objects.contains_key(&key(&NAMESPACES, "", ns)) {
            return Err(ApiError::not_found(&NAMESPACES, ns));
        }
        let key = key(res, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.qualified()),
            ));
        }
        obj["kind"] = res.kind.into();
        obj["apiVersion"] = res.api_version.into();
        let meta = &mut obj["metadata"];
        meta["name"] = name.into();
        if res.namespaced {
            meta["namespace"] = ns.into();
        }
        meta["uid"] = format!("00000000-0000-4000-8000-{:012x}", self.rv + 1).into();
        meta["creationTimestamp"] = now_rfc3339().into();
        if res.kind == "Namespace" {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        Ok(self.commit("ADDED", key, obj))
    }

    fn get(&self, res: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Creates `obj`, or replaces the object of that name (keeping its server-owned metadata).
    fn upsert(&mut self, res: &Resource, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Ok(current) = self.get(res, ns, &name) else {
            return self.create(res, ns, obj);
        };
        for field in ["kind", "apiVersion"] {
            obj[field] = current[field].clone();
        }
        for field in ["uid", "creationTimestamp", "namespace", "name"] {
            obj["metadata"][field] = current["metadata"][field].clone();
        }
        Ok(self.commit("MODIFIED", key(res, ns, &name), obj))
    }

    /// Deletes an object if present.
    fn remove(&mut self, res: &Resource, ns: &str, name: &str) -> Option<Value> {
        let obj = self.get(res, ns, name).ok()?;
        Some(self.commit("DELETED", key(res, ns, name), obj))
    }
}

fn key(res: &Resource, ns: &str, name: &str) -> Key {
    let ns = if res.namespaced { ns } else { "" };
    (res.plural, ns.to_owned(), name.to_owned())
}

fn watch_line(event: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": obj})).unwrap();
    line.push(b'\n');
    line.into()
}

/// Which objects a list or watch covers.
struct Filter {
    res: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    labels: Vec<LabelRequirement>,
    /// Other `fieldSelector` terms (`status.podIP=…`, `spec.clusterIP=…`):
    /// a dotted path into the object and the value it must hold; applied
    /// to lists only.
    fields: Vec<(String, String, bool)>,
}

impl Filter {
    /// Whether `obj` holds every field term's value.
    fn fields_match(&self, obj: &Value) -> bool {
        self.fields.iter().all(|(path, want, equal)| {
            let has = path
                .split('.')
                .try_fold(obj, |v, k| v.get(k))
                .and_then(Value::as_str)
                == Some(want.as_str());
            has == *equal
        })
    }

    /// Whether the object stored under `key`, with `metadata.labels` `labels`, is covered.
    fn matches(&self, (plural, ns, name): &Key, labels: &Value) -> bool {
        *plural == self.res.plural
            && self.ns.as_ref().is_none_or(|n| n == ns)
            && self.name.as_ref().is_none_or(|n| n == name)
            && self.labels.iter().all(|r| r.matches(labels))
    }
}

/// One term of a label selector.
#[derive(Debug)]
enum LabelRequirement {
    /// `k=v`, `k==v`, `k in (v1,v2)`
    In(String, Vec<String>),
    /// `k!=v`, `k notin (v1,v2)` (also true when the label is absent)
    NotIn(String, Vec<String>),
    /// `k`
    Exists(String),
    /// `!k`
    DoesNotExist(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &Value) -> bool {
        let value = |key: &str| labels.get(key).and_then(Value::as_str);
        match self {
            Self::In(k, vs) => value(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Self::NotIn(k, vs) => value(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Self::Exists(k) => value(k).is_some(),
            Self::DoesNotExist(k) => value(k).is_none(),
        }
    }
}

/// Parses a `labelSelector` (equality- and set-based syntax).
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let invalid = |term: &str| {
        ApiError::bad_request(format!(
            "unable to parse requirement: invalid label selector term {term:?}"
        ))
    };
    // Split at commas outside parentheses.
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let mut requirements = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::DoesNotExist(key.trim().to_owned())
        } else if let Some((head, values)) = term.split_once('(') {
            let values = values.strip_suffix(')').ok_or_else(|| invalid(term))?;
            let values = values.split(',').map(|v| v.trim().to_owned()).collect();
            match head.split_whitespace().collect::<Vec<_>>()[..] {
                [key, "in"] => LabelRequirement::In(key.to_owned(), values),
                [key, "notin"] => LabelRequirement::NotIn(key.to_owned(), values),
                _ => return Err(invalid(term)),
            }
        } else if let Some((key, value)) = term.split_once("!=") {
            LabelRequirement::NotIn(key.trim().to_owned(), vec![value.trim().to_owned()])
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::In(key.trim().to_owned(), vec![value.trim().to_owned()])
        } else {
            LabelRequirement::Exists(term.to_owned())
        };
        let key = match &requirement {
            LabelRequirement::In(k, _)
            | LabelRequirement::NotIn(k, _)
            | LabelRequirement::Exists(k)
            | LabelRequirement::DoesNotExist(k) => k,
        };
        if !valid_key(key) {
            return Err(invalid(term));
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

/// A Kubernetes `Status` failure.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    fn not_found(res: &Resource, name: &str) -> Self {
        let msg = format!("{} \"{name}\" not found", res.qualified());
        Self::new(404, "NotFound", msg)
    }
    fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    fn into_response(self) -> Response<Body> {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        json_response(StatusCode::from_u16(self.code).unwrap(), &status)
    }
}

type ApiResult = Result<Response<Body>, ApiError>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(serde_json::to_vec(value).unwrap()));
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.boxed_unsync())
        .unwrap()
}

fn ok(value: Value) -> ApiResult {
    Ok(json_response(StatusCode::OK, &value))
}

/// Decoded query string; keys may repeat (`command=echo&command=hi`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Query {
        let pairs = raw.split('&').filter(|p| !p.is_empty()).map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        });
        Query(pairs.collect())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s.as_bytes()[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    shared.record(&req);
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let expected = format!("Bearer {TOKEN}");
    let auth = req.headers().get(header::AUTHORIZATION);
    if auth.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Ok(ApiError::new(401, "Unauthorized", "Unauthorized").into_response());
    }
    let redirect = shared
        .redirects
        .lock()
        .unwrap()
        .get(req.uri().path())
        .cloned();
    if let Some((status, location)) = redirect {
        let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut()
            .insert(header::LOCATION, location.parse().unwrap());
        // And the same as Content-Location, which browsers also read.
        r.headers_mut()
            .insert(header::CONTENT_LOCATION, location.parse().unwrap());
        return Ok(r);
    }
    // SubjectAccessReview, decided from the same RBAC stand-in as
    // impersonated requests: a bound user may do anything, others nothing.
    if req.method() == Method::POST
        && req.uri().path() == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
    {
        return Ok(subject_access_review(&shared, req).await);
    }
    // Impersonation, as the real API server does it: the impersonated user
    // is then subject to RBAC, which here is a list of bound users.
    // Discovery is open to every authenticated user (system:discovery).
    let segments: Vec<&str> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let discovery = matches!(
        segments.as_slice(),
        ["version" | "api" | "apis"]
            | ["api", "v1"]
            | ["apis", _]
            | ["apis", _, _]
            | ["openapi", ..]
    );
    if let Some(user) = req
        .headers()
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .filter(|_| !discovery)
    {
        if !shared.bound_users.lock().unwrap().iter().any(|u| u == user) {
            let msg = format!(
                "{} is forbidden: User \"{user}\" cannot {} the resource (no RBAC binding)",
                req.uri().path(),
                req.method().as_str().to_lowercase()
            );
            return Ok(ApiError::new(403, "Forbidden", msg).into_response());
        }
    }
    Ok(route(shared, req)
        .await
        .unwrap_or_else(ApiError::into_response))
}

async fn subject_access_review(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return ApiError::new(400, "BadRequest", "unreadable body").into_response(),
    };
    let Ok(mut review) = serde_json::from_slice::<Value>(&body) else {
        return ApiError::new(400, "BadRequest", "not a SubjectAccessReview").into_response();
    };
    let user = review["spec"]["user"].as_str().unwrap_or("").to_string();
    let attrs = &review["spec"]["resourceAttributes"];
    let allowed = if attrs["verb"] == "impersonate" {
        let text = |k: &str| attrs[k].as_str().unwrap_or("").to_string();
        let resource = match text("subresource").as_str() {
            "" => text("resource"),
            sub => format!("{}/{sub}", text("resource")),
        };
        // The API group must be the one kube-apiserver asks about.
        let group_ok = match resource.split('/').next().unwrap_or("") {
            "users" | "groups" | "serviceaccounts" => text("group").is_empty(),
            _ => text("group") == "authentication.k8s.io",
        };
        let name = match text("namespace").as_str() {
            "" => text("name"),
            ns => format!("{ns}/{}", text("name")),
        };
        group_ok
            && shared
                .impersonators
                .lock()
                .unwrap()
                .iter()
                .any(|(u, r, n)| *u == user && *r == resource && (n == "*" || *n == name))
    } else {
        shared.bound_users.lock().unwrap().contains(&user)
    };
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "bound by the stand-in's RBAC"})
    } else {
        json!({"allowed": false, "reason": format!("User \"{user}\" has no RBAC binding")})
    };
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SubjectAccessReview");
    shared
        .sar_count
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    json_response(StatusCode::CREATED, &review)
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    // A hidden group (an "old" server without discovery.k8s.io) is not there at all.
    if let ["apis", group, ..] | ["openapi", "v3", "apis", group, ..] = segments.as_slice() {
        if !shared.serves_group(group) {
            return Err(ApiError::no_route());
        }
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["version"]) => ok(json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.3", "compiler": "gc",
            "platform": "linux/amd64",
        })),
        // Legacy (non-aggregated) discovery: answering plain `application/json` makes kubectl
        // fall back from the aggregated `apidiscovery.k8s.io/v2` format it asks for first.
        (&Method::GET, ["api"]) => ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        })),
        // Every advertised group must have a non-empty resource list: an empty one would make
        // discovery "fail" (e.g. `kubectl api-resources` exits 1).
        (&Method::GET, ["apis"]) => {
            let groups: Vec<Value> = GROUPS
                .into_iter()
                .filter(|g| shared.serves_group(g))
                .map(api_group)
                .collect();
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        (&Method::GET, ["apis", group]) if GROUPS.contains(group) => ok(api_group(group)),
        (&Method::GET, ["api", "v1"]) => ok(resource_list("v1")),
        (&Method::GET, ["apis", group, "v1"]) if GROUPS.contains(group) => {
            ok(resource_list(&format!("{group}/v1")))
        }
        // kubectl's client-side validation (on by default for create/apply) is skipped only if
        // OpenAPI v3 says the server supports `fieldValidation` on PATCH; with both OpenAPI
        // endpoints missing, kubectl demands `--validate=false`.
        (&Method::GET, ["openapi", "v3"]) => {
            let mut paths = serde_json::Map::new();
            let versions = ["v1".to_owned()].into_iter().chain(
                GROUPS
                    .into_iter()
                    .filter(|g| shared.serves_group(g))
                    .map(|g| format!("{g}/v1")),
            );
            for version in versions {
                let path = openapi_path(&version);
                let url = format!("/openapi/v3/{path}?hash=fake");
                paths.insert(path, json!({"serverRelativeURL": url}));
            }
            ok(json!({"paths": paths}))
        }
        (&Method::GET, ["openapi", "v3", "api", "v1"]) => ok(openapi_v3("v1")),
        (&Method::GET, ["openapi", "v3", "apis", group, "v1"]) if GROUPS.contains(group) => {
            ok(openapi_v3(&format!("{group}/v1")))
        }
        (_, ["api", "v1", "namespaces", ns, "pods", name, "exec"]) => {
            shared.lock().get(&PODS, ns, name)?;
            exec(req, &query)
        }
        (_, ["api", "v1", "namespaces", ns, "pods", name, "portforward"]) => {
            shared.lock().get(&PODS, ns, name)?;
            let target = PortForwardTarget {
                shared: shared.clone(),
                ns: ns.to_string(),
                pod: name.to_string(),
            };
            portforward(req, target)
        }
        (_, ["api", "v1", rest @ ..]) => {
            let (res, ns, name) = parse_target("v1", rest)?;
            let (ns, name) = (ns.map(str::to_owned), name.map(str::to_owned));
            crud(shared, req, &query, res, ns, name).await
        }
        (_, ["apis", group, version, rest @ ..]) => {
            let (res, ns, name) = parse_target(&format!("{group}/{version}"), rest)?;
            let (ns, name) = (ns.map(str::to_owned), name.map(str::to_owned));
            crud(shared, req, &query, res, ns, name).await
        }
        _ => Err(ApiError::no_route()),
    }
}

/// A group's `APIGroup` discovery document (every group has just `v1`).
fn api_group(group: &str) -> Value {
    let version = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": [version], "preferredVersion": version,
    })
}

/// The `APIResourceList` of one group version (`v1` for core).
fn resource_list(api_version: &str) -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.api_version == api_version)
        .map(|r| {
            let mut resource = json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs,
            });
            if !r.short.is_empty() {
                resource["shortNames"] = json!([r.short]);
            }
            if r.in_all {
                resource["categories"] = json!(["all"]);
            }
            resource
        })
        .collect();
    if api_version == "v1" {
        for (name, kind) in [
            ("pods/exec", "PodExecOptions"),
            ("pods/portforward", "PodPortForwardOptions"),
        ] {
            resources.push(json!({
                "name": name, "singularName": "", "namespaced": true,
                "kind": kind, "verbs": ["create", "get"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version, "resources": resources})
}

/// `api/v1` or `apis/GROUP/v1`: a group version's path under `/openapi/v3/`.
fn openapi_path(api_version: &str) -> String {
    if api_version == "v1" {
        "api/v1".to_owned()
    } else {
        format!("apis/{api_version}")
    }
}

/// A minimal OpenAPI v3 document for one group version: one PATCH operation per kind,
/// declaring the `fieldValidation` query parameter (so kubectl leaves validation to the server).
fn openapi_v3(api_version: &str) -> Value {
    let paths: serde_json::Map<String, Value> = RESOURCES
        .iter()
        .filter(|r| r.api_version == api_version)
        .map(|r| {
            let ns = if r.namespaced { "namespaces/{namespace}/" } else { "" };
            let path = format!("/{}/{ns}{}/{{name}}", openapi_path(api_version), r.plural);
            let gvk = json!({"group": r.group(), "version": "v1", "kind": r.kind});
            let patch = json!({"patch": {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }});
            (path, patch)
        })
        .collect();
    json!({
        "openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths, "components": {"schemas": {}},
    })
}

/// Splits the part of a path after `/api/v1/` or `/apis/GROUP/VERSION/` into (resource,
/// namespace, name).
fn parse_target<'a>(
    api_version: &str,
    rest: &[&'a str],
) -> Result<(&'static Resource, Option<&'a str>, Option<&'a str>), ApiError> {
    let (ns, plural, name) = match *rest {
        [plural] => (None, plural, None),
        [plural, name] => (None, plural, Some(name)),
        ["namespaces", ns, plural] => (Some(ns), plural, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name)),
        _ => return Err(ApiError::no_route()),
    };
    let res = RESOURCES
        .into_iter()
        .find(|r| r.plural == plural && r.api_version == api_version);
    let res = res.ok_or_else(ApiError::no_route)?;
    // Cluster-scoped resources never sit under a namespace; namespaced items always do.
    let misplaced = if res.namespaced {
        ns.is_none() && name.is_some()
    } else {
        ns.is_some()
    };
    if misplaced {
        return Err(ApiError::no_route());
    }
    Ok((res, ns, name))
}

/// Reads a JSON body, or the protobuf body of kubectl's typed clients (`kubectl create
/// configmap|namespace` send `application/vnd.kubernetes.protobuf`).
async fn read_body(req: Request<Incoming>) -> Result<Value, ApiError> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let body = req.into_body().collect().await;
    let bytes = body
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .to_bytes();
    if content_type.is_some_and(|ct| {
        ct.as_bytes()
            .starts_with(b"application/vnd.kubernetes.protobuf")
    }) {
        return protobuf_to_json(&bytes).ok_or_else(|| {
            ApiError::new(415, "UnsupportedMediaType", "unsupported protobuf body")
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// Decodes a `k8s\0`-prefixed protobuf envelope (runtime.Unknown) holding a ConfigMap or a
/// Namespace, keeping ObjectMeta's name/generateName/namespace/labels/annotations and a
/// ConfigMap's data.
fn protobuf_to_json(body: &[u8]) -> Option<Value> {
    let unknown = proto_fields(body.strip_prefix(b"k8s\0")?)?;
    fn field<'a>(fields: &[(u64, &'a [u8])], n: u64) -> Option<&'a [u8]> {
        fields.iter().find(|(f, _)| *f == n).map(|(_, v)| *v)
    }
    let type_meta = proto_fields(field(&unknown, 1)?)?;
    let kind = String::from_utf8_lossy(field(&type_meta, 2)?).into_owned();
    let mut obj = json!({"metadata": {}});
    for (number, value) in proto_fields(field(&unknown, 2)?)? {
        match (number, kind.as_str()) {
            (1, _) => {
                for (number, value) in proto_fields(value)? {
                    let meta = &mut obj["metadata"];
                    match number {
                        // gogo-protobuf also encodes empty strings; they mean "unset".
                        1..=3 if value.is_empty() => {}
                        1 => meta["name"] = proto_string(value),
                        2 => meta["generateName"] = proto_string(value),
                        3 => meta["namespace"] = proto_string(value),
                        11 | 12 => {
                            let map = if number == 11 {
                                "labels"
                            } else {
                                "annotations"
                            };
                            let (k, v) = proto_map_entry(value)?;
                            meta[map][k] = v;
                        }
                        _ => {}
                    }
                }
            }
            (2, "ConfigMap") => {
                let (k, v) = proto_map_entry(value)?;
                obj["data"][k] = v;
            }
            (_, "ConfigMap" | "Namespace") => {}
            _ => return None,
        }
    }
    Some(obj)
}

/// The length-delimited fields of a protobuf message, as (field number, bytes); other wire
/// types are skipped.
fn proto_fields(mut buf: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        match tag & 7 {
            0 => drop(varint(&mut buf)?),
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                fields.push((tag >> 3, buf.get(..len)?));
                buf = &buf[len..];
            }
            _ => return None,
        }
    }
    Some(fields)
}

fn proto_string(bytes: &[u8]) -> Value {
    String::from_utf8_lossy(bytes).into()
}

/// A `map<string, string>` entry: key is field 1, value field 2.
fn proto_map_entry(entry: &[u8]) -> Option<(String, Value)> {
    let (mut key, mut value) = (String::new(), Value::from(""));
    for (number, bytes) in proto_fields(entry)? {
        match number {
            1 => key = String::from_utf8_lossy(bytes).into_owned(),
            2 => value = proto_string(bytes),
            _ => {}
        }
    }
    Some((key, value))
}

async fn crud(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    query: &Query,
    res: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
) -> ApiResult {
    let ns_str = ns.clone().unwrap_or_default();
    let method = req.method().clone();
    let Some(name) = name else {
        return match method {
            Method::GET => {
                let filter = collection_filter(res, ns, query)?;
                if query.flag("watch") {
                    Ok(watch_response(shared, filter, query))
                } else {
                    ok(list(&shared.lock(), res, &filter))
                }
            }
            Method::POST => {
                let obj = read_body(req).await?;
                let created = shared.lock().create(res, &ns_str, obj)?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
        };
    };
    match method {
        Method::GET => ok(shared.lock().get(res, &ns_str, &name)?),
        Method::DELETE => {
            let mut store = shared.lock();
            let obj = store.get(res, &ns_str, &name)?;
            if res.kind == "Namespace" {
                // Deleting a namespace takes its contents along (immediately, no finalizing).
                let contents: Vec<(Key, Value)> = store
                    .objects
                    .iter()
                    .filter(|((_, ns, _), _)| *ns == name)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (key, obj) in contents {
                    store.commit("DELETED", key, obj);
                }
            }
            ok(store.commit("DELETED", key(res, &ns_str, &name), obj))
        }
        Method::PATCH | Method::PUT => {
            let is_put = method == Method::PUT;
            let content_type = req.headers().get(header::CONTENT_TYPE);
            if content_type.is_some_and(|ct| ct == "application/json-patch+json") {
                let msg = "JSON patch is not supported; use --type=merge or strategic";
                return Err(ApiError::new(415, "UnsupportedMediaType", msg));
            }
            let body = read_body(req).await?;
            let mut store = shared.lock();
            let current = store.get(res, &ns_str, &name)?;
            let updated = if is_put {
                // Replace everything but the server-owned metadata.
                let mut obj = body;
                for field in ["uid", "creationTimestamp", "namespace", "name"] {
                    obj["metadata"][field] = current["metadata"][field].clone();
                }
                obj
            } else {
                // Strategic-merge and JSON-merge patches of maps are the same thing once the
                // `$directive` keys are dropped, which is all a configmap re-apply needs.
                let mut obj = current;
                merge_patch(&mut obj, &body);
                obj
            };
            ok(store.commit("MODIFIED", key(res, &ns_str, &name), updated))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    }
}

/// RFC 7386 merge patch, ignoring strategic-merge `$` directives.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (k, v) in patch.iter().filter(|(k, _)| !k.starts_with('$')) {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Builds the filter for a collection request, honouring `labelSelector` and
/// `fieldSelector=metadata.name=...` (kubectl uses it e.g. to wait for a deletion).
fn collection_filter(
    res: &'static Resource,
    ns: Option<String>,
    query: &Query,
) -> Result<Filter, ApiError> {
    let mut filter = Filter {
        res,
        ns,
        name: None,
        labels: parse_label_selector(query.get("labelSelector").unwrap_or(""))?,
        fields: Vec::new(),
    };
    for term in query.get("fieldSelector").unwrap_or("").split(',') {
        if let Some((field, value)) = term.split_once("!=") {
            filter
                .fields
                .push((field.to_owned(), value.to_owned(), false));
            continue;
        }
        let (field, value) = match term.split_once("==") {
            Some(kv) => kv,
            None => term.split_once('=').unwrap_or((term, "")),
        };
        match field {
            "metadata.name" => filter.name = Some(value.to_owned()),
            "metadata.namespace" => filter.ns = Some(value.to_owned()),
            "" => {}
            other => filter
                .fields
                .push((other.to_owned(), value.to_owned(), true)),
        }
    }
    Ok(filter)
}

fn list(store: &Store, res: &Resource, filter: &Filter) -> Value {
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|(k, v)| filter.matches(k, &v["metadata"]["labels"]) && filter.fields_match(v))
        .map(|(_, v)| v)
        .collect();
    json!({
        "kind": format!("{}List", res.kind), "apiVersion": res.api_version,
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items,
    })
}

/// State of one streaming watch response.
struct WatchState {
    shared: Arc<Shared>,
    filter: Filter,
    changed: watch::Receiver<u64>,
    /// Highest resourceVersion already delivered (or deliberately skipped).
    seen: u64,
    pending: VecDeque<Bytes>,
    deadline: Option<Instant>,
}

/// A chunked response of newline-delimited watch events, open until the client goes away
/// (the body is dropped) or `timeoutSeconds` elapses.
fn watch_response(shared: Arc<Shared>, filter: Filter, query: &Query) -> Response<Body> {
    let store = shared.lock();
    let changed = store.changed.subscribe(); // sees only commits after this point
    let mut pending = VecDeque::new();
    let initial_events = query.flag("sendInitialEvents");
    let seen = match query.get("resourceVersion").and_then(|rv| rv.parse().ok()) {
        // Resume after a list: only changes newer than its resourceVersion.
        Some(rv) if rv > 0 && !initial_events => rv,
        // No (or "0") resourceVersion: start with a synthetic ADDED for every current object.
        _ => {
            let current = store
                .objects
                .iter()
                .filter(|(k, v)| filter.matches(k, &v["metadata"]["labels"]));
            for (_, obj) in current {
                pending.push_back(watch_line("ADDED", obj));
            }
            if initial_events {
                // The WatchList protocol ends the initial state with an annotated bookmark.
                let res = filter.res;
                let bookmark = json!({"kind": res.kind, "apiVersion": res.api_version, "metadata": {
                    "resourceVersion": store.rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                }});
                pending.push_back(watch_line("BOOKMARK", &bookmark));
            }
            store.rv
        }
    };
    drop(store);
    let timeout = query.get("timeoutSeconds").and_then(|s| s.parse().ok());
    let state = WatchState {
        shared,
        filter,
        changed,
        seen,
        pending,
        deadline: timeout.map(|s| Instant::now() + Duration::from_secs(s)),
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.pending.pop_front() {
                return Some((Ok(Frame::data(line)), st));
            }
            // Mark the notification seen *before* scanning so no commit can slip between.
            st.changed.borrow_and_update();
            {
                let store = st.shared.lock();
                let start = store.history.partition_point(|e| e.rv <= st.seen);
                let new = store.history[start..]
                    .iter()
                    .filter(|e| st.filter.matches(&e.key, &e.labels));
                st.pending.extend(new.map(|e| e.line.clone()));
                st.seen = store.rv;
            }
            if !st.pending.is_empty() {
                continue;
            }
            let deadline = st.deadline;
            let expired = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = st.changed.changed() => if changed.is_err() { return None },
                _ = expired => return None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(events).boxed_unsync())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// exec over WebSocket
// ---------------------------------------------------------------------------------------------

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const ERROR: u8 = 3;
/// v5.channel.k8s.io: a message on this channel with payload `[n]` half-closes stream `n`.
const CLOSE: u8 = 255;

/// Accepts the WebSocket upgrade and runs a fake command: without stdin it behaves like `echo`
/// (writes `command[1..]` joined by spaces plus a newline), with stdin like `cat`.
fn exec(mut req: Request<Incoming>, query: &Query) -> ApiResult {
    let get = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (upgrade, key) = (get(header::UPGRADE), get(header::SEC_WEBSOCKET_KEY));
    if !upgrade.eq_ignore_ascii_case("websocket") || key.is_empty() {
        // SPDY is not implemented; kubectl only falls back to it if WebSockets fail.
        return Err(ApiError::bad_request("exec requires a WebSocket upgrade"));
    }
    let accept = derive_accept_key(key.as_bytes());
    let offered: Vec<&str> = get(header::SEC_WEBSOCKET_PROTOCOL)
        .split(',')
        .map(str::trim)
        .collect();
    let Some(protocol) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.contains(p))
    else {
        return Err(ApiError::bad_request(
            "no supported exec subprotocol offered",
        ));
    };
    let command: Vec<String> = query
        .0
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let stdin = query.flag("stdin");
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            let _ = run_exec(ws, command, stdin).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        )
        .body(Full::new(Bytes::new()).boxed_unsync())
        .unwrap())
}

async fn run_exec<S>(
    mut ws: WebSocketStream<S>,
    command: Vec<String>,
    stdin: bool,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = |channel: u8, data: &[u8]| Message::Binary([&[channel], data].concat().into());
    if stdin {
        // Echo stdin until it is half-closed (v5) or the socket closes.
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Binary(b) if b.len() > 1 && b[0] == STDIN => {
                    ws.send(frame(STDOUT, &b[1..])).await?;
                }
                Message::Binary(b) if b[..] == [CLOSE, STDIN] => break,
                Message::Close(_) => return Ok(()),
                _ => {}
            }
        }
    } else {
        // A kubelet starts the process before any output comes (tens of
        // milliseconds at least). Output sent the instant the upgrade is
        // answered can reach kubectl 1.32's WebSocket executor before it
        // has created its stdout stream, and it drops it ("Unknown stream
        // id 1, discarding message": seen once in CI, a client-go race).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let args = command.get(1..).unwrap_or_default();
        let line = format!("{}\n", args.join(" "));
        ws.send(frame(STDOUT, line.as_bytes())).await?;
    }
    let status = json!({"metadata": {}, "status": "Success"});
    ws.send(frame(ERROR, status.to_string().as_bytes())).await?;
    // kubectl treats anything but a 1000 "normal closure" as a failed stream.
    let normal = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    ws.close(Some(normal)).await?;
    // Let the client answer the close handshake, but don't wait forever.
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// port-forward over SPDY/3.1
// ---------------------------------------------------------------------------------------------
//
// kubectl 1.32 first asks for a WebSocket with subprotocol `SPDY/3.1+portforward.k8s.io` and
// speaks SPDY/3.1 inside it (binary messages carry an arbitrary slicing of the SPDY byte
// stream); if that upgrade is refused it POSTs `Upgrade: SPDY/3.1` with
// `X-Stream-Protocol-Version: portforward.k8s.io` and speaks SPDY on the bare connection
// (that is all it does with KUBECTL_PORT_FORWARD_WEBSOCKETS=false). Both are served.
//
// For each local connection kubectl opens two streams whose headers carry `streamtype`
// (`error`, then `data`), `port` and `requestid`, and waits for each one's SYN_REPLY. The fake
// kubelet connects the data stream to the target; when the target has sent everything, it ends
// (FIN) the data stream and then the error stream, which stays empty unless the connection to
// the target failed (kubectl then prints the message and closes the whole session).

/// The WebSocket subprotocol of SPDY tunneled through a WebSocket.
const SPDY_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The only stream protocol of SPDY port-forwarding.
const PORTFORWARD_PROTOCOL: &str = "portforward.k8s.io";

// SPDY/3 control frame types and flags.
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;
const PROTOCOL_ERROR: u32 = 1;

/// The pod whose ports a port-forward session reaches.
struct PortForwardTarget {
    shared: Arc<Shared>,
    ns: String,
    pod: String,
}

impl PortForwardTarget {
    /// Where a connection to the pod's `port` goes (see `ApiServer::set_portforward_target`).
    fn addr(&self, port: u16) -> SocketAddr {
        let key = (self.ns.clone(), self.pod.clone(), port);
        let targets = self.shared.portforward_targets.lock().unwrap();
        let default = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        targets.get(&key).copied().unwrap_or(default)
    }
}

fn portforward(mut req: Request<Incoming>, target: PortForwardTarget) -> ApiResult {
    let header_values = |name: &str| -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    let upgrade = header_values("upgrade").join(",");
    let ws_key = header_values("sec-websocket-key").join(",");
    let ws_protocols = header_values("sec-websocket-protocol");
    let stream_protocols = header_values("x-stream-protocol-version");
    let switching = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade");
    let empty = || Full::new(Bytes::new()).boxed_unsync();
    if upgrade.eq_ignore_ascii_case("websocket") {
        let offered = |protocol: &str| ws_protocols.iter().any(|p| p == protocol);
        // kubectl offers only the SPDY tunnel; kube-rs offers only the channel protocols.
        let channel_protocol = [CHANNEL_V4_PROTOCOL, CHANNEL_V5_PROTOCOL]
            .into_iter()
            .find(|p| offered(p));
        if ws_key.is_empty() || !offered(SPDY_TUNNEL_PROTOCOL) && channel_protocol.is_none() {
            let msg = format!(
                "port-forward over WebSocket needs subprotocol {SPDY_TUNNEL_PROTOCOL}, \
                 {CHANNEL_V4_PROTOCOL} or {CHANNEL_V5_PROTOCOL}"
            );
            return Err(ApiError::bad_request(msg));
        }
        if let Some(protocol) = channel_protocol.filter(|_| !offered(SPDY_TUNNEL_PROTOCOL)) {
            let v5 = protocol == CHANNEL_V5_PROTOCOL;
            let query = Query::parse(req.uri().query().unwrap_or(""));
            let ports = forwarded_ports(&query, v5)?;
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let io = TokioIo::new(upgraded);
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                    channel_session(ws, target, ports, v5).await;
                }
            });
            return Ok(switching
                .header(header::UPGRADE, "websocket")
                .header(
                    header::SEC_WEBSOCKET_ACCEPT,
                    derive_accept_key(ws_key.as_bytes()),
                )
                .header(header::SEC_WEBSOCKET_PROTOCOL, protocol)
                .body(empty())
                .unwrap());
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                let (session_end, tunnel_end) = tokio::io::duplex(64 * 1024);
                tokio::join!(
                    spdy_session(session_end, target),
                    websocket_tunnel(ws, tunnel_end)
                );
            }
        });
        Ok(switching
            .header(header::UPGRADE, "websocket")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(ws_key.as_bytes()),
            )
            .header(header::SEC_WEBSOCKET_PROTOCOL, SPDY_TUNNEL_PROTOCOL)
            .body(empty())
            .unwrap())
    } else if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        if !stream_protocols.iter().any(|p| p == PORTFORWARD_PROTOCOL) {
            let msg =
                format!("port-forward needs X-Stream-Protocol-Version {PORTFORWARD_PROTOCOL}");
            return Err(ApiError::bad_request(msg));
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                spdy_session(TokioIo::new(upgraded), target).await;
            }
        });
        Ok(switching
            .header(header::UPGRADE, "SPDY/3.1")
            .header("X-Stream-Protocol-Version", PORTFORWARD_PROTOCOL)
            .body(empty())
            .unwrap())
    } else {
        Err(ApiError::bad_request(
            "port-forward needs an upgrade to a WebSocket or to SPDY/3.1",
        ))
    }
}

/// Copies between binary WebSocket messages and `pipe` (the SPDY session's byte stream).
async fn websocket_tunnel<S>(ws: WebSocketStream<S>, pipe: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut pipe_rd, mut pipe_wr) = tokio::io::split(pipe);
    let inbound = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            if pipe_wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = pipe_wr.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0; 32 * 1024];
        while let Ok(n @ 1..) = pipe_rd.read(&mut buf).await {
            let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
            if ws_tx.send(msg).await.is_err() {
                break;
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::join!(inbound, outbound);
}

fn control_frame(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80, 3]; // control bit, version 3
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data_frame(stream: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut frame = stream.to_be_bytes().to_vec();
    frame.push(flags);
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(data);
    frame
}

/// A data stream being forwarded.
struct DataStream {
    /// Bytes from the client for the target; dropped when the client half-closes.
    to_target: Option<mpsc::Sender<Bytes>>,
    task: tokio::task::AbortHandle,
}

/// Serves one SPDY/3.1 port-forward connection until the client closes it (or sends GOAWAY).
async fn spdy_session<S>(io: S, target: PortForwardTarget)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    // Frames leave in the order they are queued, so a SYN_REPLY always precedes its data.
    let (out, mut queued) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(frame) = queued.recv().await {
            if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut headers = HeaderCodec::default();
    let mut error_streams: HashMap<String, u32> = HashMap::new(); // by requestid
    let mut data_streams: HashMap<u32, DataStream> = HashMap::new();
    loop {
        let mut head = [0u8; 8];
        if rd.read_exact(&mut head).await.is_err() {
            break;
        }
        let flags = head[4];
        let mut payload = vec![0; u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize];
        if rd.read_exact(&mut payload).await.is_err() {
            break;
        }
        let word = |i: usize| {
            let bytes = payload.get(i..i + 4).unwrap_or(&[0; 4]);
            u32::from_be_bytes(bytes.try_into().unwrap()) & 0x7fff_ffff
        };
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes(head[..4].try_into().unwrap());
            if let Some(stream) = data_streams.get_mut(&id) {
                if let Some(tx) = stream.to_target.as_ref().filter(|_| !payload.is_empty()) {
                    let _ = tx.send(Bytes::from(payload)).await;
                }
                if flags & FLAG_FIN != 0 {
                    stream.to_target = None;
                }
            }
            continue;
        }
        let reply = match u16::from_be_bytes([head[2], head[3]]) {
            SYN_STREAM => {
                let id = word(0);
                // A header block that cannot be read leaves the shared zlib stream unusable.
                let Some(fields) = payload.get(10..).and_then(|b| headers.decode(b)) else {
                    break;
                };
                let field = |name: &str| {
                    let found = fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
                    found.map_or("", |(_, v)| v.as_str())
                };
                let request = field("requestid").to_owned();
                match (field("streamtype"), field("port").parse::<u16>()) {
                    ("error", _) => {
                        error_streams.insert(request, id);
                        Some(headers.syn_reply(id))
                    }
                    ("data", Ok(port)) => {
                        if out.send(headers.syn_reply(id)).await.is_err() {
                            break;
                        }
                        let (tx, rx) = mpsc::channel(16);
                        let error = error_streams.remove(&request);
                        let what = format!("port {port} of pod {}/{}", target.ns, target.pod);
                        let addr = target.addr(port);
                        let forward = forward_port(addr, what, id, error, rx, out.clone());
                        let task = tokio::spawn(forward).abort_handle();
                        let to_target = Some(tx);
                        data_streams.insert(id, DataStream { to_target, task });
                        None
                    }
                    _ => {
                        let status = [id.to_be_bytes(), PROTOCOL_ERROR.to_be_bytes()].concat();
                        Some(control_frame(RST_STREAM, 0, &status))
                    }
                }
            }
            RST_STREAM => {
                if let Some(stream) = data_streams.remove(&word(0)) {
                    stream.task.abort();
                }
                None
            }
            PING => Some(control_frame(PING, 0, &payload)),
            GOAWAY => break,
            _ => None, // SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do
        };
        if let Some(frame) = reply {
            if out.send(frame).await.is_err() {
                break;
            }
        }
    }
    for stream in data_streams.values() {
        stream.task.abort();
    }
    drop(out);
    let _ = writer.await;
}

/// Connects data stream `data` to `addr` and copies both ways; once the target has sent
/// everything, ends the data stream and then the error stream, as the kubelet does.
async fn forward_port(
    addr: SocketAddr,
    what: String,
    data: u32,
    error: Option<u32>,
    mut from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        // Go's sockets (the kubelet's) have TCP_NODELAY on.
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            tcp
        }
        Err(e) => {
            if let Some(error) = error {
                let msg = format!("error forwarding {what}: dial tcp {addr}: {e}");
                let _ = out.send(data_frame(error, 0, msg.as_bytes())).await;
            }
            return end_streams(&out, data, error).await;
        }
    };
    let (mut from_target, mut to_target) = tcp.into_split();
    let upstream = async move {
        while let Some(chunk) = from_client.recv().await {
            if to_target.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_target.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0; 32 * 1024];
        while let Ok(n @ 1..) = from_target.read(&mut buf).await {
            if out.send(data_frame(data, 0, &buf[..n])).await.is_err() {
                return;
            }
        }
        end_streams(&out, data, error).await;
    };
    tokio::join!(upstream, downstream);
}

/// Half-closes (FIN) the data stream and then the error stream of one forwarded connection.
async fn end_streams(out: &mpsc::Sender<Vec<u8>>, data: u32, error: Option<u32>) {
    let _ = out.send(data_frame(data, FLAG_FIN, &[])).await;
    if let Some(error) = error {
        let _ = out.send(data_frame(error, FLAG_FIN, &[])).await;
    }
}

/// SPDY/3 header blocks: each direction is one zlib stream, spanning all frames, with a preset
/// dictionary. Incoming blocks (sync-flushed by the client, so each ends on a deflate block
/// boundary) are inflated here. Outgoing blocks are always empty and are written as stored
/// (uncompressed) deflate blocks of a zlib stream without a dictionary, which any zlib reader
/// accepts, so no compressor is needed.
#[derive(Default)]
struct HeaderCodec {
    /// The inflate window (dictionary, then everything inflated so far), once the zlib header
    /// has been read.
    window: Option<Vec<u8>>,
    /// Whether the outgoing zlib header has been written.
    replied: bool,
}

impl HeaderCodec {
    /// A SYN_REPLY frame (with no headers) accepting stream `id`. Replies must be sent in the
    /// order they are made: their header blocks continue one zlib stream.
    fn syn_reply(&mut self, id: u32) -> Vec<u8> {
        let payload = [&id.to_be_bytes()[..], &self.empty_block()].concat();
        control_frame(SYN_REPLY, 0, &payload)
    }

    /// The next outgoing header block, holding no headers.
    fn empty_block(&mut self) -> Vec<u8> {
        let mut block = Vec::new();
        if !std::mem::replace(&mut self.replied, true) {
            block.extend_from_slice(&[0x78, 0x01]); // zlib header: deflate, no dictionary
        }
        // A stored block holding the 32-bit header count 0, then an empty stored block (a sync
        // flush: Go's inflater hands out a stored block's bytes only at the next block).
        block.extend_from_slice(&[0x00, 4, 0, !4, !0, 0, 0, 0, 0]);
        block.extend_from_slice(&[0x00, 0, 0, !0, !0]);
        block
    }

    /// Decodes an incoming header block into (lowercase name, value) pairs.
    fn decode(&mut self, mut block: &[u8]) -> Option<Vec<(String, String)>> {
        let window = match &mut self.window {
            Some(window) => window,
            None => {
                let (&[cmf, flg], rest) = block.split_first_chunk()?;
                if cmf & 0x0f != 8 || (u16::from(cmf) << 8 | u16::from(flg)) % 31 != 0 {
                    return None;
                }
                // FDICT: the dictionary's Adler-32 follows; it can only be SPDY's.
                let dict = flg & 0x20 != 0;
                block = if dict { rest.get(4..)? } else { rest };
                self.window
                    .insert(if dict { spdy_dictionary() } else { Vec::new() })
            }
        };
        let raw = inflate(window, block)?;
        let mut rest = raw.as_slice();
        let mut fields = Vec::new();
        for _ in 0..take_len(&mut rest)? {
            let len = take_len(&mut rest)?;
            let name = String::from_utf8_lossy(take(&mut rest, len)?).to_ascii_lowercase();
            let len = take_len(&mut rest)?;
            let value = String::from_utf8_lossy(take(&mut rest, len)?).into_owned();
            fields.push((name, value));
        }
        Some(fields)
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (taken, rest) = buf.split_at_checked(n)?;
    *buf = rest;
    Some(taken)
}

/// A 32-bit big-endian length.
fn take_len(buf: &mut &[u8]) -> Option<usize> {
    Some(u32::from_be_bytes(take(buf, 4)?.try_into().ok()?) as usize)
}

/// LSB-first bit reader over one piece of a deflate stream.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    count: u32,
}

impl Bits<'_> {
    fn get(&mut self, n: u32) -> Option<u32> {
        while self.count < n {
            self.buf |= u32::from(*self.data.get(self.pos)?) << self.count;
            self.pos += 1;
            self.count += 8;
        }
        let value = self.buf & ((1 << n) - 1);
        self.buf >>= n;
        self.count -= n;
        Some(value)
    }

    /// Whether only zero padding is left.
    fn at_end(&self) -> bool {
        self.pos >= self.data.len() && self.buf == 0
    }
}

/// A canonical Huffman code: the number of codes of each length, and the symbols ordered by
/// code (as in zlib's `puff.c`).
struct Huffman {
    counts: [u16; 16],
    symbols: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut counts = [0u16; 16];
        for &len in lengths {
            counts[usize::from(len)] += 1;
        }
        counts[0] = 0;
        let mut offsets = [0u16; 16];
        for len in 1..15 {
            offsets[len + 1] = offsets[len] + counts[len];
        }
        let mut symbols = vec![0; lengths.len()];
        for (symbol, &len) in lengths.iter().enumerate().filter(|(_, &len)| len != 0) {
            symbols[usize::from(offsets[usize::from(len)])] = symbol as u16;
            offsets[usize::from(len)] += 1;
        }
        Huffman { counts, symbols }
    }

    fn decode(&self, bits: &mut Bits) -> Option<u16> {
        let (mut code, mut first, mut index) = (0usize, 0usize, 0usize);
        for &count in &self.counts[1..] {
            code |= bits.get(1)? as usize;
            let count = usize::from(count);
            if code < first + count {
                return self.symbols.get(index + code - first).copied();
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }
}

/// Inflates a piece of a raw deflate stream that ends on a block boundary, appending to
/// `window` (whose earlier content back-references may reach); returns the new bytes.
fn inflate(window: &mut Vec<u8>, data: &[u8]) -> Option<Vec<u8>> {
    const LEN_BASE: [u16; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEN_EXTRA: [u8; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    const DIST_BASE: [u16; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DIST_EXTRA: [u8; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
    ];
    const CODE_LENGTH_ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let start = window.len();
    let mut bits = Bits {
        data,
        pos: 0,
        buf: 0,
        count: 0,
    };
    while !bits.at_end() {
        let last = bits.get(1)? == 1;
        let (lit, dist) = match bits.get(2)? {
            0 => {
                // Stored: skip to a byte boundary; LEN, NLEN, then LEN bytes.
                (bits.buf, bits.count) = (0, 0);
                let len = take(&mut &data[bits.pos..], 4)?;
                let (len, nlen) = (
                    u16::from_le_bytes([len[0], len[1]]),
                    u16::from_le_bytes([len[2], len[3]]),
                );
                if len != !nlen {
                    return None;
                }
                let end = bits.pos + 4 + usize::from(len);
                window.extend_from_slice(data.get(bits.pos + 4..end)?);
                bits.pos = end;
                if last {
                    break;
                }
                continue;
            }
            1 => {
                let mut lengths = [8u8; 288];
                lengths[144..256].fill(9);
                lengths[256..280].fill(7);
                (Huffman::new(&lengths), Huffman::new(&[5; 30]))
            }
            2 => {
                let lit_count = bits.get(5)? as usize + 257;
                let dist_count = bits.get(5)? as usize + 1;
                let code_count = bits.get(4)? as usize + 4;
                let mut code_lengths = [0u8; 19];
                for &i in &CODE_LENGTH_ORDER[..code_count] {
                    code_lengths[i] = bits.get(3)? as u8;
                }
                let code = Huffman::new(&code_lengths);
                let mut lengths: Vec<u8> = Vec::with_capacity(lit_count + dist_count);
                while lengths.len() < lit_count + dist_count {
                    let (value, repeat) = match code.decode(&mut bits)? {
                        len @ 0..=15 => (len as u8, 1),
                        16 => (*lengths.last()?, 3 + bits.get(2)?),
                        17 => (0, 3 + bits.get(3)?),
                        18 => (0, 11 + bits.get(7)?),
                        _ => return None,
                    };
                    lengths.extend(std::iter::repeat_n(value, repeat as usize));
                }
                if lengths.len() != lit_count + dist_count {
                    return None;
                }
                let (lit, dist) = lengths.split_at(lit_count);
                (Huffman::new(lit), Huffman::new(dist))
            }
            _ => return None,
        };
        loop {
            let symbol = usize::from(lit.decode(&mut bits)?);
            match symbol {
                0..=255 => window.push(symbol as u8),
                256 => break,
                _ => {
                    let i = symbol - 257;
                    let extra = bits.get(u32::from(*LEN_EXTRA.get(i)?))?;
                    let len = usize::from(LEN_BASE[i]) + extra as usize;
                    let d = usize::from(dist.decode(&mut bits)?);
                    let extra = bits.get(u32::from(*DIST_EXTRA.get(d)?))?;
                    let from = window
                        .len()
                        .checked_sub(usize::from(DIST_BASE[d]) + extra as usize)?;
                    for k in from..from + len {
                        window.push(window[k]);
                    }
                }
            }
        }
        if last {
            break;
        }
    }
    let inflated = window[start..].to_vec();
    if window.len() > 64 * 1024 {
        window.drain(..window.len() - 32 * 1024);
    }
    Some(inflated)
}

/// The SPDY/3 header compression dictionary: length-prefixed words, then a string of common
/// values (1423 bytes, Adler-32 0xe3c6a7c2).
fn spdy_dictionary() -> Vec<u8> {
    const WORDS: [&str; 65] = [
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str =
        concat!(
        "100101201202205206300302303304305306307402405406407408409",
        "410411412413414415416417502504505", "203 Non-Authoritative Information", "204 No Content",
        "301 Moved Permanently", "400 Bad Request", "401 Unauthorized", "403 Forbidden",
        "404 Not Found", "500 Internal Server Error", "501 Not Implemented",
        "503 Service Unavailable", "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec ",
        "00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
        "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
        "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut dict = Vec::with_capacity(1423);
    for word in WORDS {
        dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dict.extend_from_slice(word.as_bytes());
    }
    dict.extend_from_slice(TAIL.as_bytes());
    dict
}

// ---------------------------------------------------------------------------------------------
// port-forward over the WebSocket channel protocol
// ---------------------------------------------------------------------------------------------
//
// kube-rs (`Api::<Pod>::portforward(name, &[p1, p2])`) GETs `pods/NAME/portforward?&ports=p1%2Cp2`
// (one comma-separated `ports` value; repeated values and the kubelet's `port` work too) as a
// WebSocket offering `v5.channel.k8s.io, v4.channel.k8s.io`, and speaks the kubelet's channel
// protocol: each binary message is a channel byte plus payload; the i-th port (in query order)
// has data channel 2i (both ways) and error channel 2i+1 (server to client only).
//
// The server first sends, on *both* channels of every port, the port number as 2 little-endian
// bytes: kube-rs takes the first message of each channel as that header and fails the whole
// session if it is anything else (so an error message must not come first). Then the data
// channel carries the target's bytes; the error channel carries at most one text message,
// e.g. a failed dial. v4 has no half-close: a port is done when its target closes, and once
// every port is done the server closes the WebSocket normally, which is the client's EOF. A
// client ends the session by closing the WebSocket (kube-rs does once all its streams are
// dropped), which half-closes every target connection.
//
// The kubelet speaks only v4 here, and kube-rs's port-forwarder does not understand v5's close
// messages (channel 255; it fails with "invalid channel"), so v4 is chosen whenever it is
// offered. A client offering only v5 gets v5: there `[255, 2i]` half-closes port i, from the
// client (the target connection is shut down for writing) and from the server (the target
// closed its side).

const CHANNEL_V4_PROTOCOL: &str = "v4.channel.k8s.io";
const CHANNEL_V5_PROTOCOL: &str = "v5.channel.k8s.io";

/// The `ports` (or `port`) query values: comma-separated, repeatable, at least one.
fn forwarded_ports(query: &Query, v5: bool) -> Result<Vec<u16>, ApiError> {
    let mut ports = Vec::new();
    for (_, value) in query.0.iter().filter(|(k, _)| k == "ports" || k == "port") {
        for port in value.split(',').map(str::trim) {
            match port.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => {
                    let msg = format!("invalid port {port:?} in query parameter \"ports\"");
                    return Err(ApiError::bad_request(msg));
                }
            }
        }
    }
    // Channel 2i+1 must fit in a byte, and in v5 must not be the close channel.
    let max = if v5 { 127 } else { 128 };
    if ports.is_empty() || ports.len() > max {
        let msg = format!("query parameter \"ports\" must name 1 to {max} ports");
        return Err(ApiError::bad_request(msg));
    }
    Ok(ports)
}

fn channel_message(channel: u8, payload: &[u8]) -> Message {
    Message::Binary([&[channel], payload].concat().into())
}

/// Serves one channel-protocol port-forward session (see above) until every port is done or
/// the client closes the WebSocket.
async fn channel_session<S>(
    ws: WebSocketStream<S>,
    target: PortForwardTarget,
    ports: Vec<u16>,
    v5: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let mut headers = Vec::with_capacity(2 * ports.len());
    for (i, port) in ports.iter().enumerate() {
        let data = 2 * i as u8;
        headers.push(channel_message(data, &port.to_le_bytes()));
        headers.push(channel_message(data + 1, &port.to_le_bytes()));
    }
    // Messages leave in the order they are queued; the port headers go first.
    let (out, mut queued) = mpsc::channel::<Message>(64);
    let mut to_ports = Vec::with_capacity(ports.len());
    let mut forwards = tokio::task::JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let (tx, rx) = mpsc::channel(16);
        to_ports.push(Some(tx));
        let what = format!("port {port} of pod {}/{}", target.ns, target.pod);
        let forward = forward_channel(target.addr(port), what, 2 * i as u8, rx, out.clone(), v5);
        forwards.spawn(forward);
    }
    drop(out);
    // Ends (closing the WebSocket normally) once every port is done, or the client is gone.
    let writer = async move {
        for msg in headers {
            if ws_tx.send(msg).await.is_err() {
                return;
            }
        }
        while let Some(msg) = queued.recv().await {
            if ws_tx.send(msg).await.is_err() {
                break;
            }
        }
        drop(queued);
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        // This also flushes the reply to a close the client sent first.
        let close = async {
            let _ = ws_tx.send(Message::Close(Some(normal))).await;
            let _ = ws_tx.close().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    };
    // Ends when the client closes the WebSocket (or the connection breaks).
    let reader = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(data) if !data.is_empty() => data,
                Message::Close(_) => break,
                _ => continue,
            };
            let (channel, payload) = (data[0], data.slice(1..));
            if v5 && channel == CLOSE {
                // `[255, 2i]`: the client is done sending on port i.
                if let Some(&ch) = payload.first().filter(|&&ch| ch % 2 == 0) {
                    if let Some(tx) = to_ports.get_mut(usize::from(ch / 2)) {
                        *tx = None;
                    }
                }
                continue;
            }
            // Error channels are written by the server only.
            if channel % 2 != 0 || payload.is_empty() {
                continue;
            }
            if let Some(tx) = to_ports.get_mut(usize::from(channel / 2)) {
                if let Some(sender) = tx.as_ref() {
                    if sender.send(payload).await.is_err() {
                        *tx = None; // that port is done
                    }
                }
            }
        }
        // No more data for the targets; let them answer for a moment, then cut them off.
        to_ports.clear();
        let finish = async { while forwards.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), finish).await;
        forwards.abort_all();
    };
    let (mut reader, mut writer) = (std::pin::pin!(reader), std::pin::pin!(writer));
    tokio::select! {
        () = &mut reader => writer.await,
        // Every port is done and the close is sent: wait a little for the client's reply.
        () = &mut writer => {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }
}

/// Connects port `data / 2` to `addr` and copies both ways until the target has sent
/// everything (then, in v5, half-closes the data channel); reports a failed dial on the
/// error channel `data + 1`.
async fn forward_channel(
    addr: SocketAddr,
    what: String,
    data: u8,
    mut from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Message>,
    v5: bool,
) {
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        // Go's sockets (the kubelet's) have TCP_NODELAY on.
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            tcp
        }
        Err(e) => {
            let msg = format!("error forwarding {what}: dial tcp {addr}: {e}");
            let _ = out.send(channel_message(data + 1, msg.as_bytes())).await;
            return;
        }
    };
    let (mut from_target, mut to_target) = tcp.into_split();
    let upstream = async move {
        while let Some(chunk) = from_client.recv().await {
            if to_target.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_target.shutdown().await;
        // The client's side ending does not end the port: the target may still answer.
        std::future::pending::<()>().await;
    };
    let downstream = async move {
        let mut buf = vec![0; 32 * 1024];
        while let Ok(n @ 1..) = from_target.read(&mut buf).await {
            if out.send(channel_message(data, &buf[..n])).await.is_err() {
                return;
            }
        }
        if v5 {
            let _ = out.send(channel_message(CLOSE, &[data])).await;
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    let map: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    Value::Object(map)
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm), proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}
