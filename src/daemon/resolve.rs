//! Turning a Kubernetes target into an address the agent can dial, through
//! the agent's own API server: Service → a ready endpoint (EndpointSlices
//! where the server has `discovery.k8s.io/v1`, core Endpoints otherwise),
//! honouring named `targetPort`s; Deployment → a ready pod; Pod → its IP.
//! Resolved on every new connection, so a replaced pod is picked up by the
//! next connection: Services from the agent's watch-fed cache
//! ([`ServiceCache`]) once it is in sync, with fresh reads otherwise.

use std::net::SocketAddr;

use k8s_openapi::api::apps::v1::Deployment;
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
}

fn api_err(what: &str, e: kube::Error) -> ResolveError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => ResolveError::NotFound(what.to_string()),
        _ => ResolveError::Api(e.to_string()),
    }
}

fn pod_ready(p: &Pod) -> bool {
    let st = p.status.as_ref();
    st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_addr(p: &Pod, port: u16, what: &str) -> Result<SocketAddr, ResolveError> {
    if p.metadata.deletion_timestamp.is_some() || !pod_ready(p) {
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

fn pod_ref(r: Option<&ObjectReference>, ns: &str) -> Option<(String, String)> {
    let r = r?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    Some((
        r.namespace.clone().unwrap_or_else(|| ns.to_string()),
        r.name.clone()?,
    ))
}

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
                addr: pod_addr(&pod, port, &what)?,
                pod: Some((ns.clone(), name.clone())),
            })
        }
        Target::Deployment { ns, name } => {
            let what = format!("deployment {ns}/{name}");
            let d = Api::<Deployment>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map_err(|e| api_err(&what, e))?;
            let labels = d
                .spec
                .and_then(|s| s.selector.match_labels)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    ResolveError::Unavailable(format!("{what} has no matchLabels selector"))
                })?;
            let selector = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let pods = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| api_err(&what, e))?;
            pods.items
                .iter()
                .find_map(|p| {
                    Some(Resolved {
                        addr: pod_addr(p, port, &what).ok()?,
                        pod: Some((ns.clone(), p.metadata.name.clone()?)),
                    })
                })
                .ok_or_else(|| ResolveError::Unavailable(format!("{what} has no ready pod")))
        }
        Target::Service { ns, name } => {
            let cached = cache.and_then(|c| c.get(ns, name));
            if let Some(svc) = cached.as_ref().and_then(|s| s.service.as_ref()) {
                let what = format!("service {ns}/{name}");
                let snap = cached.as_deref().map(|s| &s.slices[..]).unwrap_or_default();
                // A failure from the cache is confirmed with fresh reads.
                if let Ok((port_name, numeric)) = service_port(svc, port, &what) {
                    if let Some(r) = from_slices(snap, ns, &port_name, numeric)
                        .into_iter()
                        .next()
                    {
                        return Ok(r);
                    }
                }
            }
            resolve_service(client, ns, name, port).await
        }
        Target::ApiServer | Target::Host(_) => {
            Err(ResolveError::Api("not a Kubernetes object".into()))
        }
    }
}

async fn resolve_service(
    client: &kube::Client,
    ns: &str,
    name: &str,
    port: u16,
) -> Result<Resolved, ResolveError> {
    let what = format!("service {ns}/{name}");
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| api_err(&what, e))?;
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
                        candidates.push(Resolved {
                            addr: SocketAddr::new(ip, p),
                            pod: pod_ref(a.target_ref.as_ref(), ns),
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
    what: &str,
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
                    candidates.push(Resolved {
                        addr: SocketAddr::new(ip, p),
                        pod: pod_ref(e.target_ref.as_ref(), ns),
                    });
                }
            }
        }
    }
    candidates
}
