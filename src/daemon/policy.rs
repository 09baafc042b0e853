//! The agent's dial policy: what the hub may make it connect to. It lives
//! in the agent's own configuration; nothing the hub sends can widen it.

use std::net::IpAddr;

use super::targets::Target;

#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The member's Services, Pods and Deployments (and its API server).
    Kubernetes,
    /// One host (name or address), optionally one port.
    Host { host: String, port: Option<u16> },
    /// Addresses in a CIDR, optionally one port.
    Cidr {
        net: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    /// Host names ending in `.SUFFIX` (`*.svc`, `*.svc.cluster.local`).
    Suffix { suffix: String, port: Option<u16> },
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let port = |p: &Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
        match self {
            Rule::Kubernetes => write!(f, "the cluster's services, pods and deployments"),
            Rule::Host { host, port: p } => write!(f, "--allow {host}{}", port(p)),
            Rule::Cidr {
                net,
                prefix,
                port: p,
            } => write!(f, "--allow {net}/{prefix}{}", port(p)),
            Rule::Suffix { suffix, port: p } => write!(f, "--allow *.{suffix}{}", port(p)),
        }
    }
}

impl Rule {
    /// Parses `HOST[:PORT]`, `CIDR[:PORT]` or `*.SUFFIX[:PORT]`.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let bad = || {
            format!("invalid --allow '{s}': use HOST[:PORT], CIDR[:PORT] (like 10.0.0.0/8:443) or *.SUFFIX[:PORT] (like *.svc)")
        };
        let (body, port) = match s.rsplit_once(':') {
            Some((b, p)) if !b.contains(':') || b.starts_with('[') => (
                b.trim_matches(|c| c == '[' || c == ']'),
                Some(p.parse::<u16>().map_err(|_| bad())?),
            ),
            _ => (s, None),
        };
        if body.is_empty() {
            return Err(bad());
        }
        if let Some(suffix) = body.strip_prefix("*.") {
            return Ok(Rule::Suffix {
                suffix: suffix.to_ascii_lowercase(),
                port,
            });
        }
        if let Some((net, prefix)) = body.split_once('/') {
            let net: IpAddr = net.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(bad());
            }
            return Ok(Rule::Cidr { net, prefix, port });
        }
        Ok(Rule::Host {
            host: body.to_ascii_lowercase(),
            port,
        })
    }

    fn allows(&self, t: &Target, port: u16) -> bool {
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        match (self, t) {
            (
                Rule::Kubernetes,
                Target::ApiServer
                | Target::Service { .. }
                | Target::Pod { .. }
                | Target::Deployment { .. },
            ) => true,
            (Rule::Host { host, port: p }, Target::Host(h)) => {
                port_ok(p) && h.eq_ignore_ascii_case(host)
            }
            (Rule::Suffix { suffix, port: p }, Target::Host(h)) => {
                port_ok(p) && h.to_ascii_lowercase().ends_with(&format!(".{suffix}"))
            }
            (
                Rule::Cidr {
                    net,
                    prefix,
                    port: p,
                },
                Target::Host(h),
            ) => {
                port_ok(p)
                    && h.parse::<IpAddr>()
                        .is_ok_and(|ip| in_cidr(ip, *net, *prefix))
            }
            _ => false,
        }
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct DialPolicy {
    pub rules: Vec<Rule>,
}

impl DialPolicy {
    /// The default (Kubernetes objects) plus `--allow` rules.
    pub fn new(allow: &[String]) -> Result<DialPolicy, String> {
        let mut rules = vec![Rule::Kubernetes];
        for a in allow {
            rules.push(Rule::parse(a)?);
        }
        Ok(DialPolicy { rules })
    }

    /// The rule that allows the dial, or a message naming the rules.
    pub fn check(&self, t: &Target, port: u16) -> Result<&Rule, String> {
        self.rules
            .iter()
            .find(|r| r.allows(t, port))
            .ok_or_else(|| {
                let rules: Vec<String> = self.rules.iter().map(|r| r.to_string()).collect();
                let hint = match t {
                    Target::Host(h) => {
                        format!("; to permit it, start the agent with --allow {h}:{port}")
                    }
                    _ => String::new(),
                };
                format!(
                    "the agent's dial policy does not allow {} port {port} (rules: {}){hint}",
                    t.describe(),
                    rules.join("; ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> Target {
        Target::Host(h.into())
    }

    #[test]
    fn default_allows_only_kubernetes_objects() {
        let p = DialPolicy::new(&[]).unwrap();
        assert!(p
            .check(
                &Target::Service {
                    ns: "a".into(),
                    name: "b".into()
                },
                80
            )
            .is_ok());
        let e = p.check(&host("db.internal"), 5432).unwrap_err();
        assert!(
            e.contains("--allow db.internal:5432") && e.contains("services, pods"),
            "{e}"
        );
    }

    #[test]
    fn allow_rules() {
        let p = DialPolicy::new(&[
            "10.0.0.0/8:443".into(),
            "*.svc".into(),
            "db.internal".into(),
        ])
        .unwrap();
        assert!(p.check(&host("10.1.2.3"), 443).is_ok());
        assert!(p.check(&host("10.1.2.3"), 80).is_err());
        assert!(p.check(&host("11.1.2.3"), 443).is_err());
        assert!(p.check(&host("web.default.svc"), 8080).is_ok());
        assert!(p.check(&host("DB.internal"), 1).is_ok());
        assert!(Rule::parse("10.0.0.0/33").is_err());
        assert!(Rule::parse("x:notaport").is_err());
        assert_eq!(
            Rule::parse("[::1]:80").unwrap(),
            Rule::Host {
                host: "::1".into(),
                port: Some(80)
            }
        );
    }
}
