//! The agent's dial policy: what the hub may make it connect to. It lives
//! in the agent's own configuration; nothing the hub sends can widen it.

use std::net::{IpAddr, SocketAddr};

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
            // An IPv6 address or network with a port in brackets, as
            // `Rule::parse` reads it back.
            Rule::Host {
                host,
                port: Some(p),
            } if host.contains(':') => write!(f, "--allow [{host}]:{p}"),
            Rule::Host { host, port: p } => write!(f, "--allow {host}{}", port(p)),
            Rule::Cidr {
                net: net @ IpAddr::V6(_),
                prefix,
                port: Some(p),
            } => write!(f, "--allow [{net}/{prefix}]:{p}"),
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
            format!("invalid --allow '{s}': use HOST[:PORT], CIDR[:PORT] (like 10.0.0.0/8:443; an IPv6 address or network with a port in brackets: [fd00::/8]:443, [::1]:8080) or *.SUFFIX[:PORT] (like *.svc)")
        };
        let (body, port) = if let Some(rest) = s.strip_prefix('[') {
            // `[V6]`, `[V6]:PORT`, `[V6/N]:PORT`, and `[V6]/N[:PORT]`.
            let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
            let (prefix, after) = match after.strip_prefix('/') {
                Some(a) => match a.split_once(':') {
                    Some((n, p)) => (Some(n), Some(p)),
                    None => (Some(a), None),
                },
                None => match after {
                    "" => (None, None),
                    a => (None, Some(a.strip_prefix(':').ok_or_else(bad)?)),
                },
            };
            let body = match prefix {
                Some(n) if !inside.contains('/') => format!("{inside}/{n}"),
                Some(_) => return Err(bad()),
                None => inside.to_string(),
            };
            let port = match after {
                Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
                None => None,
            };
            (body, port)
        } else {
            match s.rsplit_once(':') {
                Some((b, p)) if !b.contains(':') => {
                    (b.to_string(), Some(p.parse::<u16>().map_err(|_| bad())?))
                }
                _ => (s.to_string(), None),
            }
        };
        let body = body.as_str();
        if body.is_empty() {
            return Err(bad());
        }
        // A zone (`fe80::1%eth0`) is no part of an address a target
        // resolves to: such a rule matched nothing, silently.
        if body.contains('%') {
            return Err(format!(
                "invalid --allow '{s}': a zone (%…) cannot be matched; name the address without it"
            ));
        }
        if let Some(suffix) = body.strip_prefix("*.") {
            // `*.` alone took every name written with a final dot.
            if suffix.trim_matches('.').is_empty() {
                return Err(bad());
            }
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
        // An address as the target will carry it (`0:0::1` is `::1`).
        let host = match body.parse::<IpAddr>() {
            Ok(a) => a.to_string(),
            Err(_) => body.to_ascii_lowercase(),
        };
        Ok(Rule::Host { host, port })
    }

    fn allows(&self, t: &Target, port: u16) -> bool {
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        match (self, t) {
            (
                Rule::Kubernetes,
                Target::ApiServer
                | Target::Service { .. }
                | Target::Pod { .. }
                | Target::Workload { .. },
            ) => true,
            (Rule::Host { host, port: p }, Target::Host(h)) => {
                port_ok(p)
                    && match (h.parse::<IpAddr>(), host.parse::<IpAddr>()) {
                        (Ok(a), Ok(b)) => a == b,
                        _ => h.eq_ignore_ascii_case(host),
                    }
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

/// Whether `ip` is in `net`/`prefix`; an IPv4-mapped network
/// (`::ffff:10.0.0.0/104`) is the IPv4 network it maps (a debug build
/// stopped on `32 - 104` here).
pub(crate) fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    crate::tunnel::proxy::in_net(ip, net, prefix)
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

    /// The rule that allows the dial by name, or a refusal. The caller is
    /// told what was refused and what would allow it; the agent's rules stay
    /// in its log and are never sent back (they map the member's network).
    pub fn check(&self, t: &Target, port: u16) -> Result<&Rule, Denied> {
        self.rules
            .iter()
            .find(|r| r.allows(t, port))
            .ok_or_else(|| {
                let hint = match t {
                    Target::Host(h) if h.contains(':') => {
                        format!("; the member's admin can permit it with --allow [{h}]:{port}")
                    }
                    Target::Host(h) => {
                        format!("; the member's admin can permit it with --allow {h}:{port}")
                    }
                    _ => String::new(),
                };
                Denied {
                    public: format!(
                        "denied by the member's dial policy: {} port {port} is not allowed{hint}",
                        t.describe()
                    ),
                    rules: self.describe_rules(),
                }
            })
    }

    fn describe_rules(&self) -> String {
        let rules: Vec<String> = self.rules.iter().map(|r| r.to_string()).collect();
        rules.join("; ")
    }

    /// Whether an `--allow` rule names `addr` by IP: a CIDR covering it or
    /// a literal address, port included. A host-name rule is not enough:
    /// DNS could point a permitted name anywhere.
    fn names_addr(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == addr.port());
        self.rules.iter().any(|r| match r {
            Rule::Cidr { net, prefix, port } => port_ok(port) && in_cidr(ip, *net, *prefix),
            Rule::Host { host, port } => {
                port_ok(port) && host.parse::<IpAddr>().is_ok_and(|h| canonical(h) == ip)
            }
            _ => false,
        })
    }

    /// Judges the address a dial is about to use, after resolution: an
    /// address in [`sensitive`] (loopback, link-local, metadata, the
    /// agent's own) and any address of a host target (`host` — an endpoint
    /// with no Pod behind it, a host-network pod) must be named by an IP
    /// `--allow` rule. `what` names the target in the refusal.
    pub fn check_addr(
        &self,
        what: impl std::fmt::Display,
        addr: SocketAddr,
        host: bool,
        own: &[IpAddr],
    ) -> Result<(), Denied> {
        let why = match sensitive(addr.ip(), own) {
            Some(why) => why,
            None if host => "a host address, not a pod's",
            None => return Ok(()),
        };
        if self.names_addr(addr) {
            return Ok(());
        }
        let rule = match canonical(addr.ip()) {
            IpAddr::V6(v6) => format!("[{v6}]:{}", addr.port()),
            v4 => format!("{v4}:{}", addr.port()),
        };
        Err(Denied {
            public: format!(
                "denied by the member's dial policy: {what} leads to {} ({why}); the member's admin can permit it with --allow {rule}",
                SocketAddr::new(canonical(addr.ip()), addr.port())
            ),
            rules: self.describe_rules(),
        })
    }
}

/// A refused dial: what the caller is told, and the agent's rules (for its
/// own log only).
#[derive(Debug, Clone, PartialEq)]
pub struct Denied {
    pub public: String,
    pub rules: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (agent rules: {})", self.public, self.rules)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Why dialing `ip` needs an explicit `--allow` naming it, if it does:
/// addresses that reach the agent's own host or the cloud's metadata
/// service rather than a workload.
pub fn sensitive(ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
    let ip = canonical(ip);
    // An IPv4 address inside the well-known NAT64 prefix (64:ff9b::/96,
    // RFC 6052) or written IPv4-compatible (::a.b.c.d) is judged as that
    // address too: through a translator, 64:ff9b::a9fe:a9fe is the
    // metadata service.
    if let IpAddr::V6(v6) = ip {
        let s = v6.segments();
        let embedded = (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            || (s[..6] == [0, 0, 0, 0, 0, 0] && (s[6] != 0 || s[7] > 1)))
            .then(|| {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    ((s[6] as u32) << 16) | s[7] as u32,
                ))
            });
        if let Some(why) = embedded.and_then(|v4| sensitive(v4, own)) {
            return Some(why);
        }
    }
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    match ip {
        IpAddr::V4(v4) if v4.octets() == [169, 254, 169, 254] => {
            return Some("the cloud metadata address")
        }
        // Alibaba Cloud's metadata service; Azure's WireServer (the
        // platform's agent channel, which hands out its configuration).
        IpAddr::V4(v4)
            if v4.octets() == [100, 100, 100, 200] || v4.octets() == [168, 63, 129, 16] =>
        {
            return Some("the cloud metadata address")
        }
        // Google Cloud's IPv6 metadata address.
        IpAddr::V6(v6) if v6 == std::net::Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254) => {
            return Some("the cloud metadata address")
        }
        IpAddr::V4(v4) if v4.is_link_local() => return Some("a link-local address"),
        IpAddr::V6(v6) if v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => {
            return Some("the cloud metadata address")
        }
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
            return Some("a link-local address")
        }
        _ => {}
    }
    if own.iter().any(|o| canonical(*o) == ip) {
        return Some("one of the agent's own host addresses");
    }
    None
}

/// The agent host's own addresses (`getifaddrs`), cached for a few
/// seconds: dialing them reaches the node, not a workload.
pub fn own_addresses() -> Vec<IpAddr> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CACHE: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, v)) = c.as_ref() {
        if at.elapsed() < Duration::from_secs(5) {
            return v.clone();
        }
    }
    let mut v = getifaddrs();
    // In a pod: its node's (the manifest sets it from the downward API).
    v.extend(
        std::env::var(HOST_IPS_ENV)
            .unwrap_or_default()
            .split([',', ' '])
            .filter_map(|a| a.trim().parse::<IpAddr>().ok()),
    );
    *c = Some((Instant::now(), v.clone()));
    v
}

/// The environment variable holding the node's addresses of an agent pod
/// (`status.hostIP` through the downward API; `status.hostIPs` would fail
/// the pod on servers before 1.28).
pub const HOST_IPS_ENV: &str = "TOWERCTL_HOST_IPS";

fn getifaddrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and
    // free exactly once with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
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
        assert!(e.public.contains("--allow db.internal:5432"), "{e}");
        // The caller is not told the agent's rules; the log is.
        assert!(!e.public.contains("services, pods"), "{e}");
        assert!(e.to_string().contains("services, pods"), "{e}");
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
        // `*.` alone would take every name written with a final dot.
        assert!(Rule::parse("*.").is_err());
        assert!(Rule::parse("*..").is_err());
        assert!(Rule::parse("*.corp.example").is_ok());
        assert_eq!(
            Rule::parse("[::1]:80").unwrap(),
            Rule::Host {
                host: "::1".into(),
                port: Some(80)
            }
        );
    }

    /// IPv6 in every spelling the error names, brackets alone too; what
    /// cannot be read says how to write it.
    #[test]
    fn ipv6_rules_are_read_in_brackets_and_zones_refused() {
        let cidr = |net: &str, prefix, port| Rule::Cidr {
            net: net.parse().unwrap(),
            prefix,
            port,
        };
        for (s, want) in [
            ("[fd00::/8]:443", cidr("fd00::", 8, Some(443))),
            ("[fd00::]/8:443", cidr("fd00::", 8, Some(443))),
            ("[fd00::]/8", cidr("fd00::", 8, None)),
            ("fd00::/8", cidr("fd00::", 8, None)),
            (
                "[::1]",
                Rule::Host {
                    host: "::1".into(),
                    port: None,
                },
            ),
            (
                "::1",
                Rule::Host {
                    host: "::1".into(),
                    port: None,
                },
            ),
        ] {
            assert_eq!(Rule::parse(s), Ok(want), "{s}");
        }
        for s in ["fd00::/8:443", "[fd00::/8]/8", "[::1", "[::1]x", "[::1]:x"] {
            let e = Rule::parse(s).unwrap_err();
            assert!(e.contains("[fd00::/8]:443"), "{s}: {e}");
        }
        for s in ["fe80::1%lo", "[fe80::1%lo]:80"] {
            let e = Rule::parse(s).unwrap_err();
            assert!(e.contains("zone"), "{s}: {e}");
        }
        // Any spelling of an address is the address; what a rule says of
        // itself (the agent's log) and a refusal's hint read back as it.
        let p = DialPolicy::new(&["[0:0:0:0:0:0:0:1]:18081".into()]).unwrap();
        assert!(p.check(&host("::1"), 18081).is_ok());
        assert!(p.check(&host("::1"), 18082).is_err());
        for r in [
            "[::1]:80",
            "[fd00::/8]:443",
            "::1",
            "10.0.0.0/8:443",
            "db:5432",
        ] {
            let rule = Rule::parse(r).unwrap();
            let shown = rule.to_string();
            let again = Rule::parse(shown.trim_start_matches("--allow ")).unwrap();
            assert_eq!(again, rule, "{r} shown as {shown}");
        }
        let e = DialPolicy::new(&[])
            .unwrap()
            .check(&host("::1"), 80)
            .unwrap_err();
        assert!(e.public.contains("--allow [::1]:80"), "{}", e.public);
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A rule written as an IPv4-mapped network is that IPv4 network (a
    /// debug build stopped on `32 - 104`), for targets and dials alike.
    #[test]
    fn an_ipv4_mapped_rule_is_the_network_it_maps() {
        let p = DialPolicy::new(&["::ffff:127.0.0.0/104".into()]).unwrap();
        assert!(p
            .check_addr("host x", sa("127.0.0.5:80"), true, &[])
            .is_ok());
        assert!(p
            .check_addr("host x", sa("[::ffff:127.0.0.5]:80"), true, &[])
            .is_ok());
        assert!(p
            .check_addr("host x", sa("128.0.0.1:80"), true, &[])
            .is_err());
        assert!(p.check(&host("127.1.2.3"), 80).is_ok());
        assert!(p.check(&host("::ffff:127.1.2.3"), 80).is_ok());
        assert!(p.check(&host("10.1.2.3"), 80).is_err());
        assert!(in_cidr(
            "10.1.2.3".parse().unwrap(),
            "::ffff:10.0.0.0".parse().unwrap(),
            100
        ));
        assert!(!in_cidr(
            "10.1.2.3".parse().unwrap(),
            "::ffff:10.0.0.0".parse().unwrap(),
            128
        ));
    }

    #[test]
    fn sensitive_addresses() {
        let own: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        for (a, want) in [
            ("127.0.0.1", Some("a loopback address")),
            ("127.9.9.9", Some("a loopback address")),
            ("::1", Some("a loopback address")),
            ("::ffff:127.0.0.1", Some("a loopback address")),
            ("0.0.0.0", Some("an unspecified address")),
            ("::", Some("an unspecified address")),
            ("169.254.169.254", Some("the cloud metadata address")),
            ("fd00:ec2::254", Some("the cloud metadata address")),
            ("169.254.1.1", Some("a link-local address")),
            ("fe80::1", Some("a link-local address")),
            ("192.0.2.7", Some("one of the agent's own host addresses")),
            ("100.100.100.200", Some("the cloud metadata address")),
            ("168.63.129.16", Some("the cloud metadata address")),
            ("fd20:ce::254", Some("the cloud metadata address")),
            // Through a NAT64 translator, or written IPv4-compatible.
            ("64:ff9b::a9fe:a9fe", Some("the cloud metadata address")),
            ("64:ff9b::127.0.0.1", Some("a loopback address")),
            ("::169.254.169.254", Some("the cloud metadata address")),
            ("64:ff9b::10.1.2.3", None),
            ("10.1.2.3", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(sensitive(a.parse().unwrap(), &own), want, "{a}");
        }
    }

    #[test]
    fn resolved_addresses_need_an_ip_rule() {
        let p = DialPolicy::new(&["web.example".into(), "10.0.0.0/8:443".into()]).unwrap();
        // A name rule does not cover the loopback it resolves to.
        let e = p
            .check_addr("host web.example", sa("127.0.0.1:8080"), false, &[])
            .unwrap_err();
        assert!(
            e.public.contains("127.0.0.1:8080")
                && e.public.contains("--allow 127.0.0.1:8080")
                && e.public.contains("loopback"),
            "{e}"
        );
        assert!(!e.public.contains("web.example:"), "{e}");
        // Pod addresses pass; host targets need an IP rule.
        assert!(p
            .check_addr("pod a/b", sa("10.9.9.9:80"), false, &[])
            .is_ok());
        assert!(p
            .check_addr("svc a/b", sa("10.9.9.9:80"), true, &[])
            .is_err());
        assert!(p
            .check_addr("svc a/b", sa("10.9.9.9:443"), true, &[])
            .is_ok());
        let e = p
            .check_addr("x", sa("[fd00:ec2::254]:80"), false, &[])
            .unwrap_err();
        assert!(e.public.contains("--allow [fd00:ec2::254]:80"), "{e}");

        let p = DialPolicy::new(&["127.0.0.0/8".into(), "169.254.169.254:80".into()]).unwrap();
        assert!(p.check_addr("x", sa("127.0.0.1:8080"), true, &[]).is_ok());
        assert!(p
            .check_addr("x", sa("[::ffff:127.0.0.1]:1"), false, &[])
            .is_ok());
        assert!(p
            .check_addr("x", sa("169.254.169.254:80"), false, &[])
            .is_ok());
        assert!(p
            .check_addr("x", sa("169.254.169.254:81"), false, &[])
            .is_err());
        assert!(p.check_addr("x", sa("[::1]:80"), false, &[]).is_err());
    }

    #[test]
    fn own_addresses_include_loopback() {
        let own = own_addresses();
        assert!(own.iter().any(|a| a.is_loopback()), "{own:?}");
    }
}
