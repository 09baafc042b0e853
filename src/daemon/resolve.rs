//! Turning a Kubernetes target into an address the agent can dial, through
//! the agent's own API server: Service → a ready endpoint (EndpointSlices
//! where the server has `discovery.k8s.io/v1`, core Endpoints otherwise),
//! honouring named `targetPort`s; Deployment → a ready pod; Pod → its IP.
//! Resolved on every new connection, so a replaced pod is picked up by the
//! next connection: Services from the agent's watch-fed cache
//! ([`ServiceCache`]) once it is in sync, with fresh reads otherwise.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

use super::targets::Target;
use super::watchcache::ServiceCache;

/// Why a target could not be resolved; the text is shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0} not found in the member cluster")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the agent's API server failed: {0}")]
    Api(String),
}

/// Where a target leads: an address, and the pod behind it when known (for
/// the `pods/portforward` fallback where pod IPs are not routable).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub addr: SocketAddr,
    /// `(namespace, name)` of the pod.
    pub pod: Option<(String, String)>,
    /// The address is a host's, not a pod's own: an endpoint with no Pod
    /// `targetRef` (hand-made EndpointSlices/Endpoints can point anywhere)
    /// or a host-network pod. The dial policy treats it as a host target.
    pub host: bool,
}

fn api_err(what: &str, e: kube::Error) -> ResolveError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => ResolveError::NotFound(what.to_string()),
        _ => ResolveError::Api(crate::daemon::fmt::kube_error(&e)),
    }
}

fn pod_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pod_ready(p: &Pod) -> bool {
    pod_running(p)
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's address for `port`. A pod named by the operator needs only to
/// be running, as with kubectl (one failing its readiness probe is what an
/// operator port-forwards to in order to see why); `ready` asks more.
fn pod_addr(p: &Pod, port: u16, what: &str, ready: bool) -> Result<SocketAddr, ResolveError> {
    if p.metadata.deletion_timestamp.is_some() {
        return Err(ResolveError::Unavailable(format!(
            "{what} is being deleted"
        )));
    }
    if !pod_running(p) {
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Unknown");
        return Err(ResolveError::Unavailable(format!(
            "{what} is not running (phase {})",
            crate::tunnel::printable(phase, 40)
        )));
    }
    if ready && !pod_ready(p) {
        return Err(ResolveError::Unavailable(format!("{what} is not ready")));
    }
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .ok_or_else(|| ResolveError::Unavailable(format!("{what} has no IP yet")))?;
    let ip = ip
        .parse()
        .map_err(|_| ResolveError::Unavailable(format!("{what} has an invalid IP '{ip}'")))?;
    Ok(SocketAddr::new(ip, port))
}

/// The pod selector of a workload object (the API's JSON): a
/// ReplicationController's `spec.selector` is a plain map, the others'
/// a `LabelSelector`.
fn workload_selector(
    kind: crate::daemon::targets::Workload,
    obj: &serde_json::Value,
) -> Option<String> {
    let sel = &obj["spec"]["selector"];
    let sel: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
        if kind == crate::daemon::targets::Workload::ReplicationController {
            serde_json::from_value(serde_json::json!({ "matchLabels": sel })).ok()?
        } else {
            serde_json::from_value(sel.clone()).ok()?
        };
    selector_text(&sel)
}

/// A label selector as the API's `labelSelector` parameter: every
/// `matchLabels` pair and `matchExpressions` term (In, NotIn, Exists,
/// DoesNotExist). `None` for an empty selector (which would select every
/// pod of the namespace) or an operator this does not know.
fn selector_text(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Option<String> {
    let mut terms: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        terms.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None,
        });
    }
    (!terms.is_empty()).then(|| terms.join(","))
}

fn host_network(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// An endpoint's pod reference, if it names a pod in the Service's own
/// namespace (the endpoints controller never writes another).
fn pod_ref(r: Option<&ObjectReference>, ns: &str) -> Option<(String, String)> {
    let r = r?;
    if r.kind.as_deref() != Some("Pod") || r.namespace.as_deref().is_some_and(|n| n != ns) {
        return None;
    }
    Some((ns.to_string(), r.name.clone()?))
}

/// Pods read at a time to find a workload's pod, and most pages read.
const WORKLOAD_PAGE: u32 = 100;
const WORKLOAD_PAGES: usize = 50;

/// Where to dial for `target` port `port`.
pub async fn resolve(
    client: &kube::Client,
    cache: Option<&ServiceCache>,
    target: &Target,
    port: u16,
) -> Result<Resolved, ResolveError> {
    match target {
        Target::Pod { ns, name } => {
            let what = format!("pod {ns}/{name}");
            let pod = Api::<Pod>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map_err(|e| api_err(&what, e))?;
            Ok(Resolved {
                addr: pod_addr(&pod, port, &what, false)?,
                pod: Some((ns.clone(), name.clone())),
                host: host_network(&pod),
            })
        }
        Target::Workload { kind, ns, name } => {
            let what = format!("{} {ns}/{name}", kind.singular());
            let req = http::Request::get(kind.api_path(ns, name))
                .body(Vec::new())
                .map_err(|e| ResolveError::Api(e.to_string()))?;
            let obj: serde_json::Value =
                client.request(req).await.map_err(|e| api_err(&what, e))?;
            let selector = workload_selector(*kind, &obj).ok_or_else(|| {
                ResolveError::Unavailable(format!("{what} has no usable pod selector"))
            })?;
            // A ready pod first, else a running one (kubectl's choice);
            // read a page at a time, stopping at the first ready one: a
            // DaemonSet's every pod (tens of MB on a large cluster) was
            // read whole for each connection.
            let api = Api::<Pod>::namespaced(client.clone(), ns);
            let mut params = ListParams::default().labels(&selector).limit(WORKLOAD_PAGE);
            let mut running = None;
            for _ in 0..WORKLOAD_PAGES {
                let pods = api.list(&params).await.map_err(|e| api_err(&what, e))?;
                for ready in [true, false] {
                    if !ready && running.is_some() {
                        break;
                    }
                    let found = pods.items.iter().find_map(|p| {
                        Some(Resolved {
                            addr: pod_addr(p, port, &what, ready).ok()?,
                            pod: Some((ns.clone(), p.metadata.name.clone()?)),
                            host: host_network(p),
                        })
                    });
                    match found {
                        Some(r) if ready => return Ok(r),
                        found => running = running.or(found),
                    }
                }
                match pods.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(next) => params = params.continue_token(&next),
                    None => break,
                }
            }
            running.ok_or_else(|| ResolveError::Unavailable(format!("{what} has no running pod")))
        }
        Target::Service { ns, name } => {
            let cached = cache.and_then(|c| c.get(ns, name));
            if let Some(svc) = cached.as_ref().and_then(|s| s.service.as_ref()) {
                // Written out only in an error: `target` says "service NS/NAME".
                let what = target;
                let snap = cached.as_deref().map(|s| &s.slices[..]).unwrap_or_default();
                // A failure from the cache is confirmed with fresh reads.
                if let Ok((port_name, numeric)) = service_port(svc, port, &what) {
                    if let Some(r) = from_slices(snap, ns, &port_name, numeric)
                        .into_iter()
                        .next()
                    {
                        return Ok(confirm_pod(client, cache, r).await);
                    }
                }
            }
            let r = resolve_service(client, cache, ns, name, port).await?;
            Ok(confirm_pod(client, cache, r).await)
        }
        Target::ApiServer | Target::Host(_) => {
            Err(ResolveError::Api("not a Kubernetes object".into()))
        }
    }
}

/// An endpoint's pod reference is believed only when that pod, in the
/// Service's namespace, running and not being deleted, has the endpoint's
/// address. EndpointSlices and
/// Endpoints can be written by hand and name any pod: a reference to a pod
/// the operator may port-forward to (or any pod, for the dial policy's
/// "pod address" leniency) on an endpoint pointing elsewhere let a
/// CONNECT reach that elsewhere. An endpoint whose reference does not
/// hold is a host address, judged as such by the dial policy; one of a
/// host-network pod is a host address too. Pods are read at most once per
/// [`crate::daemon::watchcache::POD_TTL`].
async fn confirm_pod(
    client: &kube::Client,
    cache: Option<&ServiceCache>,
    mut r: Resolved,
) -> Resolved {
    let Some((ns, name)) = r.pod.clone() else {
        return r;
    };
    let ip = r.addr.ip().to_canonical();
    let remembered = cache
        .and_then(|c| c.pod(&ns, &name))
        .filter(|p| p.live && p.ips.contains(&ip));
    let addrs = match remembered {
        Some(p) => Some(p),
        None => match Api::<Pod>::namespaced(client.clone(), &ns).get(&name).await {
            Ok(pod) => {
                let p = pod_addrs(&pod);
                if let Some(c) = cache {
                    c.remember_pod(&ns, &name, p.clone());
                }
                Some(p)
            }
            Err(e) => {
                // Names from an EndpointSlice: whoever may write those in
                // the member chose them.
                tracing::debug!(
                    "endpoint {} names pod {}/{}, which cannot be read: {}",
                    r.addr,
                    crate::tunnel::escape_for_log(&ns, 100),
                    crate::tunnel::escape_for_log(&name, 100),
                    crate::daemon::fmt::kube_error(&e)
                );
                None
            }
        },
    };
    match addrs {
        Some(p) if p.live && p.ips.contains(&ip) => r.host |= p.host_network,
        _ => {
            tracing::warn!(
                "an endpoint names pod {}/{} but leads to {}, which is not that pod's address: dialed as a host address",
                crate::tunnel::escape_for_log(&ns, 100),
                crate::tunnel::escape_for_log(&name, 100),
                r.addr
            );
            r.pod = None;
            r.host = true;
        }
    }
    r
}

/// The addresses a pod owns (`status.podIPs`, else `status.podIP`).
fn pod_addrs(pod: &Pod) -> crate::daemon::watchcache::PodAddrs {
    let st = pod.status.as_ref();
    let mut ips: Vec<std::net::IpAddr> = st
        .and_then(|s| s.pod_ips.as_ref())
        .map(|l| l.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(ip) = st
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    let running = st.and_then(|s| s.phase.as_deref()) == Some("Running");
    crate::daemon::watchcache::PodAddrs {
        live: running && pod.metadata.deletion_timestamp.is_none(),
        ips: ips
            .into_iter()
            .map(|i: std::net::IpAddr| i.to_canonical())
            .collect(),
        host_network: host_network(pod),
        read: std::time::Instant::now(),
    }
}

async fn resolve_service(
    client: &kube::Client,
    cache: Option<&ServiceCache>,
    ns: &str,
    name: &str,
    port: u16,
) -> Result<Resolved, ResolveError> {
    let what = format!("service {ns}/{name}");
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| api_err(&what, e))?;
    // It exists: watch it for the next connections.
    if let Some(c) = cache {
        c.watch(ns, name);
    }
    let (port_name, numeric_target) = service_port(&svc, port, &what)?;

    // EndpointSlices first; core Endpoints on servers without them.
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await;
    let mut candidates: Vec<Resolved> = Vec::new();
    match slices {
        Ok(list) => candidates = from_slices(&list.items, ns, &port_name, numeric_target),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let ep = Api::<Endpoints>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map_err(|e| api_err(&what, e))?;
            for sub in ep.subsets.unwrap_or_default() {
                let p = sub
                    .ports
                    .as_ref()
                    .and_then(|ps| {
                        ps.iter()
                            .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    })
                    .map(|p| p.port as u16)
                    .or(numeric_target);
                let Some(p) = p else { continue };
                for a in sub.addresses.unwrap_or_default() {
                    if let Ok(ip) = a.ip.parse() {
                        let pod = pod_ref(a.target_ref.as_ref(), ns);
                        candidates.push(Resolved {
                            addr: SocketAddr::new(ip, p),
                            host: pod.is_none(),
                            pod,
                        });
                    }
                }
            }
        }
        Err(e) => return Err(api_err(&what, e)),
    }
    candidates.into_iter().next().ok_or_else(|| {
        ResolveError::Unavailable(format!("{what} has no ready endpoint for port {port}"))
    })
}

/// The Service port `port`: its name, and its target port when numeric
/// (a named one is resolved by the endpoints, whose ports carry the
/// service port's name).
fn service_port(
    svc: &Service,
    port: u16,
    what: &dyn std::fmt::Display,
) -> Result<(String, Option<u16>), ResolveError> {
    let sports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let sport = sports
        .iter()
        .find(|p| p.port == i32::from(port))
        .ok_or_else(|| {
            let known: Vec<String> = sports.iter().map(|p| p.port.to_string()).collect();
            ResolveError::NotFound(format!(
                "port {port} of {what} (it has ports {})",
                known.join(", ")
            ))
        })?;
    let numeric_target = match &sport.target_port {
        Some(IntOrString::Int(n)) => Some(*n as u16),
        Some(IntOrString::String(_)) => None,
        None => Some(port),
    };
    Ok((sport.name.clone().unwrap_or_default(), numeric_target))
}

/// Ready addresses of `slices` for the service port named `port_name`.
fn from_slices(
    slices: &[EndpointSlice],
    ns: &str,
    port_name: &str,
    numeric_target: Option<u16>,
) -> Vec<Resolved> {
    let mut candidates = Vec::new();
    for s in slices {
        let p = s
            .ports
            .as_ref()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p.name.as_deref().unwrap_or_default() == port_name)
            })
            .and_then(|p| p.port)
            .map(|p| p as u16)
            .or(numeric_target);
        let Some(p) = p else { continue };
        for e in &s.endpoints {
            if !e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    let pod = pod_ref(e.target_ref.as_ref(), ns);
                    candidates.push(Resolved {
                        addr: SocketAddr::new(ip, p),
                        host: pod.is_none(),
                        pod,
                    });
                }
            }
        }
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kube_error_is_one_printable_bounded_line() {
        // A plain-text error page, as a proxy in front of the member's API
        // server answers, becomes the whole message of kube's error.
        let page = format!(
            "down\r\n2030-01-01 INFO forged \u{1b}]0;title\u{7}\u{202e}{}",
            "x".repeat(100_000)
        );
        let e = kube::Error::Api(kube::core::Status::failure(&page, "InternalError").boxed());
        let t = crate::daemon::fmt::kube_error(&e);
        assert!(t.contains("forged"), "{t}");
        assert!(t.chars().count() <= 500, "{}", t.len());
        assert!(
            !t.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{t:?}"
        );
    }

    fn pod(phase: &str, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0"},
            "status": {
                "phase": phase,
                "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        }))
        .unwrap()
    }

    /// A pod named by the operator needs only to run, as with kubectl (one
    /// failing its readiness probe is what one forwards to, to see why);
    /// a pod picked for a deployment is a ready one where there is one.
    #[test]
    fn a_named_pod_needs_only_to_run() {
        let addr: SocketAddr = "10.0.0.7:80".parse().unwrap();
        assert_eq!(
            pod_addr(&pod("Running", false), 80, "pod a/b", false).unwrap(),
            addr
        );
        assert!(pod_addr(&pod("Running", false), 80, "pod a/b", true).is_err());
        assert_eq!(
            pod_addr(&pod("Running", true), 80, "pod a/b", true).unwrap(),
            addr
        );
        let e = pod_addr(&pod("Pending", false), 80, "pod a/b", false).unwrap_err();
        assert!(
            format!("{e:?}").contains("not running (phase Pending)"),
            "{e:?}"
        );
    }

    #[test]
    fn a_selector_with_expressions_is_written_whole() {
        let sel: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_json::from_value(serde_json::json!({
                "matchLabels": {"app": "web"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["a", "b"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                    {"key": "track", "operator": "NotIn", "values": ["x"]},
                    {"key": "zone", "operator": "Exists"},
                ],
            }))
            .unwrap();
        assert_eq!(
            selector_text(&sel).as_deref(),
            Some("app=web,tier in (a,b),!canary,track notin (x),zone")
        );
        let only: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_json::from_value(serde_json::json!({
                "matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}],
            }))
            .unwrap();
        assert_eq!(selector_text(&only).as_deref(), Some("app in (web)"));
        assert_eq!(selector_text(&Default::default()), None);
        let odd: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_json::from_value(serde_json::json!({
                "matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}],
            }))
            .unwrap();
        assert_eq!(selector_text(&odd), None);
    }
}
