//! What a tunnel channel can lead to, and how targets are named.
//!
//! - On the channel (hub → agent), the `forwarded-tcpip` address field:
//!   `kube-apiserver`, `svc/NS/NAME`, `pod/NS/NAME`, `deploy/NS/NAME`
//!   (and `rs/`, `sts/`, `ds/`, `job/`, `rc/`), `host/HOST`; the port field
//!   is the port.
//! - In an HTTP `CONNECT` to the gateway, a DNS-like authority whose last
//!   label is the cluster: `NAME.NS.svc.CLUSTER:PORT`,
//!   `NAME.NS.pod.CLUSTER:PORT`, `NAME.NS.deploy.CLUSTER:PORT` (`sts`,
//!   `ds`, `job`, `rc` alike; a ReplicaSet's `replicaset`, since `rs` is a
//!   country's domain), or any other `HOST.CLUSTER:PORT` for a plain
//!   host the agent may dial. A pod's or workload's name may hold dots.
//! - On `towerctl port-forward`, kubectl's syntax: `pod/NAME`, `svc/NAME`,
//!   a workload (`deploy/`, `rs/`, `sts/`, `ds/`, `job/`, `rc/` and their
//!   long forms), or a bare pod name, with `-n NS`.

use crate::daemon::names::{is_dns_label, is_dns_subdomain};
use crate::tunnel::TARGET_APISERVER;

/// The workloads port-forward reaches a pod of, as kubectl does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    ReplicationController,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::Deployment,
        Workload::ReplicaSet,
        Workload::StatefulSet,
        Workload::DaemonSet,
        Workload::Job,
        Workload::ReplicationController,
    ];

    /// kubectl's short name, used on channels and in CONNECT names.
    pub fn short(self) -> &'static str {
        match self {
            Workload::Deployment => "deploy",
            Workload::ReplicaSet => "rs",
            Workload::StatefulSet => "sts",
            Workload::DaemonSet => "ds",
            Workload::Job => "job",
            Workload::ReplicationController => "rc",
        }
    }

    /// The lower-case kind (`statefulset`).
    pub fn singular(self) -> &'static str {
        match self {
            Workload::Deployment => "deployment",
            Workload::ReplicaSet => "replicaset",
            Workload::StatefulSet => "statefulset",
            Workload::DaemonSet => "daemonset",
            Workload::Job => "job",
            Workload::ReplicationController => "replicationcontroller",
        }
    }

    /// The API group (`""`: core).
    pub fn group(self) -> &'static str {
        match self {
            Workload::Job => "batch",
            Workload::ReplicationController => "",
            _ => "apps",
        }
    }

    /// The resource (`statefulsets`).
    pub fn resource(self) -> &'static str {
        match self {
            Workload::Deployment => "deployments",
            Workload::ReplicaSet => "replicasets",
            Workload::StatefulSet => "statefulsets",
            Workload::DaemonSet => "daemonsets",
            Workload::Job => "jobs",
            Workload::ReplicationController => "replicationcontrollers",
        }
    }

    /// The API path of object `name` in `ns`.
    pub fn api_path(self, ns: &str, name: &str) -> String {
        let base = match self.group() {
            "" => "/api/v1".to_string(),
            g => format!("/apis/{g}/v1"),
        };
        format!("{base}/namespaces/{ns}/{}/{name}", self.resource())
    }

    fn from_short(s: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.short() == s)
    }

    /// The kind's label in a CONNECT name: its short name, but
    /// `replicaset` for a ReplicaSet: `rs` is also a country's domain
    /// (`www.example.rs.CLUSTER` is a host). Hubs before it read `rs`.
    fn connect_label(self) -> &'static str {
        match self {
            Workload::ReplicaSet => "replicaset",
            w => w.short(),
        }
    }

    /// Also the lower-case kind (`statefulset`), never `rs`.
    fn from_connect_label(s: &str) -> Option<Workload> {
        Self::ALL
            .into_iter()
            .find(|w| w.connect_label() == s || w.singular() == s)
    }

    /// kubectl's names for it: short, singular, plural, and `KIND.GROUP`.
    fn from_kubectl(s: &str) -> Option<Workload> {
        let s = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|w| {
            let group = match w.group() {
                "" => String::new(),
                g => format!(".{g}"),
            };
            [w.short(), w.singular(), w.resource()]
                .iter()
                .any(|n| s == *n || s == format!("{n}{group}"))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    ApiServer,
    Service {
        ns: String,
        name: String,
    },
    Pod {
        ns: String,
        name: String,
    },
    /// A pod of a workload (Deployment, ReplicaSet, StatefulSet, …), found
    /// by its selector, as kubectl picks one.
    Workload {
        kind: Workload,
        ns: String,
        name: String,
    },
    Host(String),
}

/// An IPv6 address as one DNS label, `:` written `-`, every group written
/// out (`fd00-0-0-0-0-0-0-5`: no label starts with `-`), as the CONNECT
/// host `ADDR.ip6.CLUSTER` carries it (`fd00--5` is read too).
fn ip6_label(a: std::net::Ipv6Addr) -> String {
    let groups: Vec<String> = a.segments().iter().map(|g| format!("{g:x}")).collect();
    groups.join("-")
}

/// A host a channel may name: a DNS name or IPv4 address, or an IPv6
/// address.
fn host_name(s: &str) -> bool {
    s.parse::<std::net::Ipv6Addr>().is_ok() || plain_host_name(s)
}

/// A host name (or IPv4 address) as a channel may carry it.
fn plain_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl Target {
    pub fn channel_address(&self) -> String {
        match self {
            Target::ApiServer => TARGET_APISERVER.to_string(),
            Target::Service { ns, name } => format!("svc/{ns}/{name}"),
            Target::Pod { ns, name } => format!("pod/{ns}/{name}"),
            Target::Workload { kind, ns, name } => format!("{}/{ns}/{name}", kind.short()),
            Target::Host(h) => format!("host/{h}"),
        }
    }

    pub fn from_channel_address(s: &str) -> Option<Target> {
        if s == TARGET_APISERVER {
            return Some(Target::ApiServer);
        }
        let (kind, rest) = s.split_once('/')?;
        // As Kubernetes names them: a namespace and a Service in one
        // label, a pod or workload in a subdomain.
        let two = |one_label: bool| {
            let (ns, name) = rest.split_once('/')?;
            let named = match one_label {
                true => is_dns_label(name),
                false => is_dns_subdomain(name),
            };
            (is_dns_label(ns) && named).then(|| (ns.to_string(), name.to_string()))
        };
        Some(match kind {
            "svc" => two(true).map(|(ns, name)| Target::Service { ns, name })?,
            "pod" => two(false).map(|(ns, name)| Target::Pod { ns, name })?,
            "host" if host_name(rest) => Target::Host(rest.to_string()),
            other => {
                let kind = Workload::from_short(other)?;
                two(false).map(|(ns, name)| Target::Workload { kind, ns, name })?
            }
        })
    }

    /// Parses the host part of a CONNECT authority: `(cluster, target)`.
    /// A pod's or a workload's name may hold dots (Kubernetes allows them
    /// there, not in a Service's or a namespace's): the labels before the
    /// namespace are its name.
    pub fn from_connect_host(host: &str) -> Option<(String, Target)> {
        let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
        if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
            return None;
        }
        let n = labels.len();
        let cluster = labels[n - 1].to_string();
        let named = |kind_at: usize| {
            (
                labels[..kind_at - 1].join("."),
                labels[kind_at - 1].to_string(),
            )
        };
        let t = match labels.as_slice() {
            // An IPv6 address (a CONNECT authority's host cannot hold one
            // with the member after it).
            [addr, "ip6", _] if addr.replace('-', ":").parse::<std::net::Ipv6Addr>().is_ok() => {
                let a: std::net::Ipv6Addr = addr.replace('-', ":").parse().ok()?;
                Target::Host(a.to_string())
            }
            [name, ns, "svc", _] => Target::Service {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            [.., "pod", _] if n >= 4 => {
                let (name, ns) = named(n - 2);
                Target::Pod { ns, name }
            }
            [.., kind, _] if n >= 4 && Workload::from_connect_label(kind).is_some() => {
                let (name, ns) = named(n - 2);
                Target::Workload {
                    kind: Workload::from_connect_label(kind)?,
                    ns,
                    name,
                }
            }
            _ => Target::Host(labels[..n - 1].join(".")),
        };
        Some((cluster, t))
    }

    /// The CONNECT host naming this target in `cluster`.
    pub fn connect_host(&self, cluster: &str) -> String {
        match self {
            Target::ApiServer => format!("kubernetes.default.svc.{cluster}"),
            Target::Service { ns, name } => format!("{name}.{ns}.svc.{cluster}"),
            Target::Pod { ns, name } => format!("{name}.{ns}.pod.{cluster}"),
            Target::Workload { kind, ns, name } => {
                format!("{name}.{ns}.{}.{cluster}", kind.connect_label())
            }
            Target::Host(h) => match h.parse::<std::net::Ipv6Addr>() {
                Ok(a) => format!("{}.ip6.{cluster}", ip6_label(a)),
                Err(_) => format!("{h}.{cluster}"),
            },
        }
    }

    /// kubectl's `TYPE/NAME` (or a bare pod name) in namespace `ns`.
    pub fn from_kubectl(s: &str, ns: &str) -> Result<Target, String> {
        let (kind, name) = s.split_once('/').unwrap_or(("pod", s));
        // Any case, as kubectl takes kinds (`Pod/x`, `Service/web`).
        let kind = kind.to_ascii_lowercase();
        let kind = kind.as_str();
        // A DNS subdomain name (dots allowed), as Kubernetes names pods and
        // workloads; a Service's is one label.
        let subdomain = is_dns_subdomain(name);
        let service = matches!(kind, "svc" | "service" | "services");
        if !subdomain || service && !is_dns_label(name) {
            return Err(format!(
                "invalid resource name in '{}': {}",
                crate::tunnel::escape_for_log(s, 300),
                if service {
                    "a Service's name is lower-case letters, digits and '-' (a DNS label)"
                } else {
                    "a name is lower-case letters, digits, '-' and '.' (a DNS subdomain)"
                }
            ));
        }
        let (ns, name) = (ns.to_string(), name.to_string());
        Ok(match kind {
            "pod" | "pods" | "po" => Target::Pod { ns, name },
            _ if service => Target::Service { ns, name },
            other => match Workload::from_kubectl(other) {
                Some(kind) => Target::Workload { kind, ns, name },
                None => {
                    return Err(format!(
                        "cannot forward to '{}/{name}': use pod/NAME, svc/NAME, or a workload's TYPE/NAME (deploy, rs, sts, ds, job, rc), or a bare pod name",
                        crate::tunnel::escape_for_log(other, 40)
                    ))
                }
            },
        })
    }

    pub fn describe(&self) -> String {
        self.to_string()
    }

    /// This target as the agent dials it: a host name in the cluster's DNS
    /// is what it names, checked as that object is. `NAME.NS.svc[.DOMAIN]`
    /// is the Service `NS/NAME` (its endpoints vetted as `svc/` vets them),
    /// a StatefulSet member's `POD.SVC.NS.svc[.DOMAIN]` the pod `NS/POD`;
    /// other names in those zones (a pod's `A-B-C-D.NS.pod.DOMAIN`, which
    /// the cluster's DNS answers with any address written in it) are
    /// refused. Dialed as a host (allowed by a suffix rule such as
    /// `*.svc.cluster.local`), a headless Service's name led to its
    /// endpoints' addresses unvetted: a host-network pod's node, any
    /// address of a hand-made EndpointSlice; and under impersonation,
    /// `db.prod.svc.cluster.local` reached a Service that `svc/db -n prod`
    /// would have refused. Other hosts, and addresses, stay as they are
    /// (the dial policy bounds them).
    pub fn in_cluster_dns(self) -> Result<Target, String> {
        let Target::Host(h) = &self else {
            return Ok(self);
        };
        let lower = h.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = lower.split('.').collect();
        let label = |l: &str| crate::daemon::names::is_dns_label(l);
        let refused = || {
            Err(format!(
                "'{h}' is a name in the cluster's DNS that names no Service or pod the agent can check; forward to svc/NAME or pod/NAME instead"
            ))
        };
        match labels.as_slice() {
            [name, ns, "svc", ..] if label(name) && label(ns) => Ok(Target::Service {
                ns: ns.to_string(),
                name: name.to_string(),
            }),
            [pod, svc, ns, "svc", ..] if label(pod) && label(svc) && label(ns) => Ok(Target::Pod {
                ns: ns.to_string(),
                name: pod.to_string(),
            }),
            [_, _, rest @ ..] if rest.iter().any(|l| matches!(*l, "svc" | "pod")) => refused(),
            _ => Ok(self),
        }
    }
}

/// What [`Target::describe`] says, for messages built only when needed:
/// a connection that succeeds formats nothing.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::ApiServer => f.write_str("the API server"),
            Target::Service { ns, name } => write!(f, "service {ns}/{name}"),
            Target::Pod { ns, name } => write!(f, "pod {ns}/{name}"),
            Target::Workload { kind, ns, name } => write!(f, "{} {ns}/{name}", kind.singular()),
            Target::Host(h) => write!(f, "host '{h}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `t` read back the same from its channel address and its CONNECT name.
    fn reads_back(t: Target) {
        assert_eq!(
            Target::from_channel_address(&t.channel_address()),
            Some(t.clone())
        );
        assert_eq!(
            Target::from_connect_host(&t.connect_host("alpha")),
            Some(("alpha".to_string(), t))
        );
    }

    #[test]
    fn every_workload_kubectl_names_is_a_target_both_ways() {
        for (written, kind) in [
            ("deploy/web", Workload::Deployment),
            ("deployments.apps/web", Workload::Deployment),
            ("rs/web", Workload::ReplicaSet),
            ("replicaset/web", Workload::ReplicaSet),
            ("sts/web", Workload::StatefulSet),
            ("StatefulSet/web", Workload::StatefulSet),
            ("statefulsets.apps/web", Workload::StatefulSet),
            ("ds/web", Workload::DaemonSet),
            ("job/web", Workload::Job),
            ("jobs.batch/web", Workload::Job),
            ("rc/web", Workload::ReplicationController),
            (
                "replicationcontrollers/web",
                Workload::ReplicationController,
            ),
        ] {
            let t = Target::from_kubectl(written, "prod").unwrap();
            let want = Target::Workload {
                kind,
                ns: "prod".into(),
                name: "web".into(),
            };
            assert_eq!(t, want, "{written}");
            reads_back(t);
        }
        assert_eq!(
            Workload::StatefulSet.api_path("prod", "db"),
            "/apis/apps/v1/namespaces/prod/statefulsets/db"
        );
        assert_eq!(
            Workload::ReplicationController.api_path("prod", "db"),
            "/api/v1/namespaces/prod/replicationcontrollers/db"
        );
        assert_eq!(
            Workload::Job.api_path("prod", "db"),
            "/apis/batch/v1/namespaces/prod/jobs/db"
        );
        assert!(Target::from_kubectl("cm/web", "prod").is_err());
        for (any_case, want) in [
            ("Pod/web-0", "pod/web-0"),
            ("Service/web", "svc/web"),
            ("SVC/web", "svc/web"),
        ] {
            assert_eq!(
                Target::from_kubectl(any_case, "prod"),
                Target::from_kubectl(want, "prod"),
                "{any_case}"
            );
        }
        assert!(Target::from_kubectl("deployments.batch/web", "prod").is_err());
        // Names with dots (Kubernetes allows them for pods and workloads),
        // through every form.
        for written in [
            "pod/web.v2",
            "web.v2",
            "deploy/api.v1.internal",
            "sts/db.eu",
        ] {
            let t = Target::from_kubectl(written, "prod").unwrap();
            assert!(
                matches!(&t, Target::Pod { name, .. } | Target::Workload { name, .. }
                    if written.ends_with(name.as_str()) && name.contains('.')),
                "{written}: {t:?}"
            );
            reads_back(t);
        }
        for bad in [
            "svc/web.v2",
            "pod/Web",
            "pod/a..b",
            "pod/-a",
            "deploy/a_b",
            "pod/.a",
        ] {
            let e = Target::from_kubectl(bad, "prod").unwrap_err();
            assert!(
                e.contains("invalid resource name") && e.contains(bad),
                "{e}"
            );
        }
        // A country's domain that is also a short name stays a host.
        assert_eq!(
            Target::from_connect_host("www.example.rs.alpha"),
            Some(("alpha".into(), Target::Host("www.example.rs".into())))
        );
        assert_eq!(
            Target::from_connect_host("db.prod.sts.alpha"),
            Some((
                "alpha".into(),
                Target::Workload {
                    kind: Workload::StatefulSet,
                    ns: "prod".into(),
                    name: "db".into()
                }
            ))
        );
    }

    #[test]
    fn cluster_dns_names_are_what_they_name() {
        let host = |h: &str| Target::Host(h.into()).in_cluster_dns();
        let svc = |ns: &str, name: &str| {
            Ok(Target::Service {
                ns: ns.into(),
                name: name.into(),
            })
        };
        assert_eq!(host("db.prod.svc.cluster.local"), svc("prod", "db"));
        assert_eq!(host("db.prod.svc.cluster.local."), svc("prod", "db"));
        assert_eq!(host("DB.Prod.SVC"), svc("prod", "db"));
        assert_eq!(host("db.prod.svc.corp.internal"), svc("prod", "db"));
        // A StatefulSet member's name is its pod.
        let pod = |ns: &str, name: &str| {
            Ok(Target::Pod {
                ns: ns.into(),
                name: name.into(),
            })
        };
        assert_eq!(host("db-0.db.prod.svc.cluster.local"), pod("prod", "db-0"));
        assert_eq!(host("db-0.db.prod.svc"), pod("prod", "db-0"));
        for unaskable in [
            "10-0-0-5.prod.pod.cluster.local",
            "10-0-0-5.prod.pod",
            "a.b.c.d.svc.cluster.local",
            "db_x.prod.svc.cluster.local",
            "x.-y.svc",
        ] {
            let e = host(unaskable).unwrap_err();
            assert!(e.contains(unaskable) && e.contains("svc/NAME"), "{e}");
        }
        // Other hosts and addresses stay hosts (the dial policy bounds
        // them); other targets are unchanged.
        for h in ["10.96.0.10", "db.example.com", "svc.example.com", "a.svc"] {
            assert_eq!(host(h), Ok(Target::Host(h.into())), "{h}");
        }
        let pod = Target::Pod {
            ns: "a".into(),
            name: "b".into(),
        };
        assert_eq!(pod.clone().in_cluster_dns(), Ok(pod));
    }

    #[test]
    fn round_trips() {
        let svc = Target::Service {
            ns: "default".into(),
            name: "web".into(),
        };
        assert_eq!(
            Target::from_channel_address(&svc.channel_address()),
            Some(svc.clone())
        );
        assert_eq!(
            Target::from_connect_host("web.default.svc.alpha"),
            Some(("alpha".into(), svc.clone()))
        );
        assert_eq!(
            Target::from_connect_host(&svc.connect_host("alpha"))
                .unwrap()
                .1,
            svc
        );
        assert_eq!(
            Target::from_connect_host("10.0.0.5.alpha"),
            Some(("alpha".into(), Target::Host("10.0.0.5".into())))
        );
        assert_eq!(Target::from_connect_host("alpha"), None);
        // An IPv6 address: one label, `-` for `:`, under `ip6`; both ways,
        // and through the channel to the agent.
        let v6 = Target::Host("fd00::5".into());
        assert_eq!(v6.connect_host("alpha"), "fd00-0-0-0-0-0-0-5.ip6.alpha");
        for h in ["fd00--5.ip6.alpha", "FD00-0-0-0-0-0-0-5.ip6.alpha"] {
            assert_eq!(
                Target::from_connect_host(h),
                Some(("alpha".into(), v6.clone())),
                "{h}"
            );
        }
        assert_eq!(
            Target::from_channel_address(&v6.channel_address()),
            Some(v6)
        );
        // Not an address: a host of that name, as before.
        assert_eq!(
            Target::from_connect_host("db.ip6.alpha"),
            Some(("alpha".into(), Target::Host("db.ip6".into())))
        );
        assert_eq!(Target::from_channel_address("svc/a"), None);
        // Never a path segment of its own, nor one a Service's name or a
        // namespace cannot be.
        for bad in [
            "pod/prod/..",
            "rc/prod/.",
            "deploy/../x",
            "pod/prod/a..b",
            "pod/Prod/x",
            "svc/prod/a.b",
            "pod/prod/-x",
        ] {
            assert_eq!(Target::from_channel_address(bad), None, "{bad}");
        }
        assert!(Target::from_channel_address("pod/prod/web.v2").is_some());
        // Kubernetes limits a subdomain name as a whole, not per part.
        let long = "a".repeat(100);
        assert!(Target::from_channel_address(&format!("pod/prod/{long}")).is_some());
        assert!(Target::from_channel_address(&format!("svc/prod/{long}")).is_none());
        assert!(Target::from_channel_address(&format!("pod/prod/{}", "a".repeat(254))).is_none());
        assert_eq!(Target::from_channel_address("host/a b"), None);
        assert_eq!(
            Target::from_kubectl("web-0", "ns"),
            Ok(Target::Pod {
                ns: "ns".into(),
                name: "web-0".into()
            })
        );
        assert!(Target::from_kubectl("cm/x", "ns")
            .unwrap_err()
            .contains("pod/NAME"));
    }
}
