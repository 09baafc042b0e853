//! A stand-in Kubernetes API server for end-to-end tests driven by the real `kubectl`.
//!
//! It speaks just enough of the wire protocol for kubectl 1.32: legacy discovery, list/get/
//! create/patch/delete/watch of namespaces, nodes, configmaps and pods, and `pods/exec` over
//! WebSocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`). Every request must carry
//! `Authorization: Bearer fake-upstream-token`; all requests are recorded for assertions.
//!
//! The file is self-contained so it can be copied into another crate's `tests/support/`.
#![allow(dead_code)] // each test binary uses a different subset of the helpers

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
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
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::{coding::CloseCode, CloseFrame};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The bearer token every request must present.
pub const TOKEN: &str = "fake-upstream-token";

type Body = UnsyncBoxBody<Bytes, Infallible>;

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
                rt.block_on(serve(server_shared, ready_tx, stop_rx));
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

    /// Grants `user` access when a client impersonates it (RBAC stand-in).
    pub fn bind_user(&self, user: &str) {
        self.shared
            .bound_users
            .lock()
            .unwrap()
            .push(user.to_string());
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
    ready: std::sync::mpsc::Sender<SocketAddr>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
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

/// A resource type served under `/api/v1`.
struct Resource {
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static str,
}

const fn resource(
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static str,
) -> Resource {
    Resource {
        plural,
        kind,
        namespaced,
        short,
    }
}

const NAMESPACES: Resource = resource("namespaces", "Namespace", false, "ns");
const NODES: Resource = resource("nodes", "Node", false, "no");
const CONFIGMAPS: Resource = resource("configmaps", "ConfigMap", true, "cm");
const PODS: Resource = resource("pods", "Pod", true, "po");
const RESOURCES: [&Resource; 4] = [&NAMESPACES, &NODES, &CONFIGMAPS, &PODS];

/// Storage key: (plural, namespace or "" for cluster-scoped, name).
type Key = (&'static str, String, String);

struct Event {
    rv: u64,
    key: Key,
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
        }
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
        if event == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.history.push(Event {
            rv: self.rv,
            key,
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
                format!("{} \"{name}\" already exists", res.plural),
            ));
        }
        obj["kind"] = res.kind.into();
        obj["apiVersion"] = "v1".into();
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
    plural: &'static str,
    ns: Option<String>,
    name: Option<String>,
}

impl Filter {
    fn matches(&self, (plural, ns, name): &Key) -> bool {
        *plural == self.plural
            && self.ns.as_ref().is_none_or(|n| n == ns)
            && self.name.as_ref().is_none_or(|n| n == name)
    }
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
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.plural),
        )
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
    let expected = format!("Bearer {TOKEN}");
    let auth = req.headers().get(header::AUTHORIZATION);
    if auth.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Ok(ApiError::new(401, "Unauthorized", "Unauthorized").into_response());
    }
    // Impersonation, as the real API server does it: the impersonated user
    // is then subject to RBAC, which here is a list of bound users.
    // Discovery is open to every authenticated user (system:discovery).
    let discovery = matches!(req.uri().path(), "/version" | "/api" | "/apis" | "/api/v1")
        || req.uri().path().starts_with("/openapi");
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

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
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
        // No API groups at all: an advertised group with an empty resource list would make
        // discovery "fail" (e.g. `kubectl api-resources` exits 1).
        (&Method::GET, ["apis"]) => {
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
        }
        (&Method::GET, ["api", "v1"]) => ok(core_v1_resources()),
        // kubectl's client-side validation (on by default for create/apply) is skipped only if
        // OpenAPI v3 says the server supports `fieldValidation` on PATCH; with both OpenAPI
        // endpoints missing, kubectl demands `--validate=false`.
        (&Method::GET, ["openapi", "v3"]) => ok(json!({"paths": {
            "api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=fake"},
        }})),
        (&Method::GET, ["openapi", "v3", "api", "v1"]) => ok(openapi_v3_core()),
        (_, ["api", "v1", "namespaces", ns, "pods", name, "exec"]) => {
            shared.lock().get(&PODS, ns, name)?;
            exec(req, &query)
        }
        (_, ["api", "v1", rest @ ..]) => {
            let (res, ns, name) = parse_target(rest)?;
            let (ns, name) = (ns.map(str::to_owned), name.map(str::to_owned));
            crud(shared, req, &query, res, ns, name).await
        }
        _ => Err(ApiError::no_route()),
    }
}

fn core_v1_resources() -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut resources: Vec<Value> = RESOURCES
        .iter()
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": verbs, "shortNames": [r.short],
            })
        })
        .collect();
    resources[3]["categories"] = json!(["all"]);
    resources.push(json!({
        "name": "pods/exec", "singularName": "", "namespaced": true,
        "kind": "PodExecOptions", "verbs": ["create", "get"],
    }));
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
}

/// A minimal OpenAPI v3 document for `api/v1`: one PATCH operation per kind, declaring the
/// `fieldValidation` query parameter (so kubectl leaves validation to the server).
fn openapi_v3_core() -> Value {
    let paths: serde_json::Map<String, Value> = RESOURCES
        .iter()
        .map(|r| {
            let ns = if r.namespaced { "namespaces/{namespace}/" } else { "" };
            let path = format!("/api/v1/{ns}{}/{{name}}", r.plural);
            let patch = json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": r.kind},
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

/// Splits `/api/v1/...` into (resource, namespace, name).
fn parse_target<'a>(
    rest: &[&'a str],
) -> Result<(&'static Resource, Option<&'a str>, Option<&'a str>), ApiError> {
    let (ns, plural, name) = match *rest {
        [plural] => (None, plural, None),
        [plural, name] => (None, plural, Some(name)),
        ["namespaces", ns, plural] => (Some(ns), plural, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name)),
        _ => return Err(ApiError::no_route()),
    };
    let res = RESOURCES.into_iter().find(|r| r.plural == plural);
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
                let filter = collection_filter(res, ns, query);
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

/// Builds the filter for a collection request, honouring `fieldSelector=metadata.name=...`
/// (kubectl uses it e.g. to wait for a deletion).
fn collection_filter(res: &'static Resource, ns: Option<String>, query: &Query) -> Filter {
    let mut filter = Filter {
        plural: res.plural,
        ns,
        name: None,
    };
    for term in query.get("fieldSelector").unwrap_or("").split(',') {
        let (field, value) = match term.split_once("==") {
            Some(kv) => kv,
            None => term.split_once('=').unwrap_or((term, "")),
        };
        match field {
            "metadata.name" => filter.name = Some(value.to_owned()),
            "metadata.namespace" => filter.ns = Some(value.to_owned()),
            _ => {}
        }
    }
    filter
}

fn list(store: &Store, res: &Resource, filter: &Filter) -> Value {
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|(k, _)| filter.matches(k))
        .map(|(_, v)| v)
        .collect();
    json!({
        "kind": format!("{}List", res.kind), "apiVersion": "v1",
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
            for (_, obj) in store.objects.iter().filter(|(k, _)| filter.matches(k)) {
                pending.push_back(watch_line("ADDED", obj));
            }
            if initial_events {
                // The WatchList protocol ends the initial state with an annotated bookmark.
                let kind = RESOURCES
                    .iter()
                    .find(|r| r.plural == filter.plural)
                    .unwrap()
                    .kind;
                let bookmark = json!({"kind": kind, "apiVersion": "v1", "metadata": {
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
                    .filter(|e| st.filter.matches(&e.key));
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
