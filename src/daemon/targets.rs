//! What a tunnel channel can lead to, and how targets are named.
//!
//! - On the channel (hub → agent), the `forwarded-tcpip` address field:
//!   `kube-apiserver`, `svc/NS/NAME`, `pod/NS/NAME`, `deploy/NS/NAME`,
//!   `host/HOST`; the port field is the port.
//! - In an HTTP `CONNECT` to the gateway, a DNS-like authority whose last
//!   label is the cluster: `NAME.NS.svc.CLUSTER:PORT`,
//!   `NAME.NS.pod.CLUSTER:PORT`, `NAME.NS.deploy.CLUSTER:PORT`, or any other
//!   `HOST.CLUSTER:PORT` for a plain host the agent may dial.
//! - On `towerctl port-forward`, kubectl's syntax: `pod/NAME`, `svc/NAME`,
//!   `deploy/NAME` (and long forms), or a bare pod name, with `-n NS`.

use crate::tunnel::TARGET_APISERVER;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    ApiServer,
    Service { ns: String, name: String },
    Pod { ns: String, name: String },
    Deployment { ns: String, name: String },
    Host(String),
}

fn dns_label(s: &str) -> bool {
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
            Target::Deployment { ns, name } => format!("deploy/{ns}/{name}"),
            Target::Host(h) => format!("host/{h}"),
        }
    }

    pub fn from_channel_address(s: &str) -> Option<Target> {
        if s == TARGET_APISERVER {
            return Some(Target::ApiServer);
        }
        let (kind, rest) = s.split_once('/')?;
        let two = || {
            let (ns, name) = rest.split_once('/')?;
            (dns_label(ns) && dns_label(name)).then(|| (ns.to_string(), name.to_string()))
        };
        Some(match kind {
            "svc" => two().map(|(ns, name)| Target::Service { ns, name })?,
            "pod" => two().map(|(ns, name)| Target::Pod { ns, name })?,
            "deploy" => two().map(|(ns, name)| Target::Deployment { ns, name })?,
            "host" if dns_label(rest) => Target::Host(rest.to_string()),
            _ => return None,
        })
    }

    /// Parses the host part of a CONNECT authority: `(cluster, target)`.
    pub fn from_connect_host(host: &str) -> Option<(String, Target)> {
        let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
        if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
            return None;
        }
        let cluster = labels[labels.len() - 1].to_string();
        let t = match labels.as_slice() {
            [name, ns, "svc", _] => Target::Service {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            [name, ns, "pod", _] => Target::Pod {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            [name, ns, "deploy", _] => Target::Deployment {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            _ => Target::Host(labels[..labels.len() - 1].join(".")),
        };
        Some((cluster, t))
    }

    /// The CONNECT host naming this target in `cluster`.
    pub fn connect_host(&self, cluster: &str) -> String {
        match self {
            Target::ApiServer => format!("kubernetes.default.svc.{cluster}"),
            Target::Service { ns, name } => format!("{name}.{ns}.svc.{cluster}"),
            Target::Pod { ns, name } => format!("{name}.{ns}.pod.{cluster}"),
            Target::Deployment { ns, name } => format!("{name}.{ns}.deploy.{cluster}"),
            Target::Host(h) => format!("{h}.{cluster}"),
        }
    }

    /// kubectl's `TYPE/NAME` (or a bare pod name) in namespace `ns`.
    pub fn from_kubectl(s: &str, ns: &str) -> Result<Target, String> {
        let (kind, name) = s.split_once('/').unwrap_or(("pod", s));
        if !dns_label(name) || name.contains('.') && kind != "host" {
            return Err(format!("invalid resource name in '{s}'"));
        }
        let (ns, name) = (ns.to_string(), name.to_string());
        Ok(match kind {
            "pod" | "pods" | "po" => Target::Pod { ns, name },
            "svc" | "service" | "services" => Target::Service { ns, name },
            "deploy" | "deployment" | "deployments" => Target::Deployment { ns, name },
            other => {
                return Err(format!(
                    "cannot forward to '{other}/{name}': use pod/NAME, svc/NAME or deploy/NAME (or a bare pod name)"
                ))
            }
        })
    }

    pub fn describe(&self) -> String {
        self.to_string()
    }

    /// This target as an agent that impersonates operators dials it. A
    /// host name in the cluster's DNS names a Kubernetes object, and the
    /// member's RBAC is asked about it as about that object: dialed as a
    /// host, `db.prod.svc.cluster.local` (allowed by a suffix rule) reached
    /// a Service that `svc/db -n prod` would have refused. So
    /// `NAME.NS.svc[.DOMAIN]` is the Service `NS/NAME`; other names in those
    /// zones (a pod's `A-B-C-D.NS.pod.DOMAIN`, a StatefulSet member's
    /// `POD.SVC.NS.svc.DOMAIN`) name nothing RBAC can be asked about and are
    /// refused. Other hosts, and addresses, stay as they are (the dial
    /// policy bounds them).
    pub fn impersonated(self) -> Result<Target, String> {
        let Target::Host(h) = &self else {
            return Ok(self);
        };
        let lower = h.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = lower.split('.').collect();
        if labels.len() >= 3 && labels[2] == "svc" && labels[..2].iter().all(|l| !l.is_empty()) {
            return Ok(Target::Service {
                ns: labels[1].to_string(),
                name: labels[0].to_string(),
            });
        }
        if labels.iter().skip(2).any(|l| matches!(*l, "svc" | "pod")) {
            return Err(format!(
                "'{h}' is a name in the cluster's DNS that the member's RBAC cannot be asked about (this member's agent acts as each operator); forward to svc/NAME or pod/NAME instead"
            ));
        }
        Ok(self)
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
            Target::Deployment { ns, name } => write!(f, "deployment {ns}/{name}"),
            Target::Host(h) => write!(f, "host '{h}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_impersonation_cluster_dns_names_are_what_they_name() {
        let host = |h: &str| Target::Host(h.into()).impersonated();
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
        for unaskable in [
            "10-0-0-5.prod.pod.cluster.local",
            "db-0.db.prod.svc.cluster.local",
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
        assert_eq!(pod.clone().impersonated(), Ok(pod));
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
        assert_eq!(Target::from_channel_address("svc/a"), None);
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
