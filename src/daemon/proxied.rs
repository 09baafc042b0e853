//! The client's own address behind an ingress or load balancer.
//!
//! A hub behind nginx, an ingress controller or a cloud load balancer sees
//! every connection come from the proxy. Everything the hub keys on the
//! source address (refused join tokens, the addresses in `towerctl status`
//! and the audit log) would then lump every client together: a stranger
//! guessing join tokens through the ingress would lock out real agents
//! joining through it. With `towerctl up --trusted-proxy CIDR`, a
//! connection *from* a trusted address is taken to be from the address its
//! proxy appended to `X-Forwarded-For`: the chain is read from the right,
//! skipping addresses that are themselves trusted (proxies in a row), and
//! the first one that is not is the client. Nothing a client writes into
//! the header can move that: its own entries sit to the left of the one
//! its proxy appended. A connection from any other address is taken at its
//! word, headers ignored, as before.

use std::net::IpAddr;

use hyper::header::HeaderValue;
use hyper::HeaderMap;

/// Addresses (CIDRs) of proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

/// Most `X-Forwarded-For` entries read from the right: a chain is as long
/// as the proxies in a row, a handful.
const MAX_HOPS: usize = 16;

impl TrustedProxies {
    pub fn new(nets: Vec<(IpAddr, u8)>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    /// Parses `--trusted-proxy`: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one
    /// address.
    pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
        let bad = || {
            format!(
                "invalid --trusted-proxy '{s}': use the ingress's address or network, \
                 like 10.0.0.7 or 10.0.0.0/8 (fd00::/8 for IPv6)"
            )
        };
        let (net, prefix) = match s.trim().split_once('/') {
            Some((n, p)) => (n, Some(p)),
            None => (s.trim(), None),
        };
        let net: IpAddr = net.parse().map_err(|_| bad())?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok((net, prefix))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The CIDRs, comma-separated.
    pub fn describe(&self) -> String {
        let nets: Vec<String> = self.0.iter().map(|(n, p)| format!("{n}/{p}")).collect();
        nets.join(", ")
    }

    /// The CIDRs as `--trusted-proxy` values.
    pub fn to_args(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(n, p)| format!("--trusted-proxy={n}/{p}"))
            .collect()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0
            .iter()
            .any(|(net, prefix)| super::policy::in_cidr(ip, *net, *prefix))
    }

    /// The client behind `peer`: `peer` itself unless it is trusted, else
    /// the rightmost untrusted address of `X-Forwarded-For`. When every
    /// address there is trusted, the leftmost; when an entry cannot be read,
    /// the trusted hop that passed it on (never anything to its left).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let values: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
        let mut client = peer;
        let entries = values
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("?").rsplit(','))
            .take(MAX_HOPS);
        for entry in entries {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                return ip;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), as proxies write them.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            nets.iter()
                .map(|s| TrustedProxies::parse_cidr(s).unwrap())
                .collect(),
        )
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_taken_at_its_word() {
        let t = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            t.client(ip("192.0.2.9"), &xff(&["198.51.100.1"])),
            ip("192.0.2.9")
        );
        assert_eq!(
            TrustedProxies::default().client(ip("10.0.0.1"), &xff(&["198.51.100.1"])),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_address_the_trusted_proxy_appended_wins_over_what_the_client_wrote() {
        let t = proxies(&["10.0.0.0/8"]);
        // The client wrote "1.2.3.4"; its proxy appended where it really
        // came from.
        let h = xff(&["1.2.3.4, 198.51.100.7"]);
        assert_eq!(t.client(ip("10.1.2.3"), &h), ip("198.51.100.7"));
        // Proxies in a row, each trusted, in one header or several.
        let h = xff(&["1.2.3.4", "198.51.100.7, 10.0.0.5"]);
        assert_eq!(t.client(ip("10.1.2.3"), &h), ip("198.51.100.7"));
        // No header: the proxy itself.
        assert_eq!(t.client(ip("10.1.2.3"), &HeaderMap::new()), ip("10.1.2.3"));
        // Every entry trusted: the leftmost.
        assert_eq!(
            t.client(ip("10.1.2.3"), &xff(&["10.9.9.9, 10.0.0.5"])),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_hop_that_passed_it_on() {
        let t = proxies(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.1, not-an-address, 10.0.0.5"]);
        assert_eq!(t.client(ip("10.1.2.3"), &h), ip("10.0.0.5"));
        let h = xff(&["198.51.100.1, "]);
        assert_eq!(t.client(ip("10.1.2.3"), &h), ip("10.1.2.3"));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_read() {
        let t = proxies(&["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["192.0.2.1:4711"])),
            ip("192.0.2.1")
        );
        assert_eq!(
            t.client(ip("fd00::1"), &xff(&["[2001:db8::1]:4711"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            t.client(ip("fd00::1"), &xff(&["[2001:db8::1]"])),
            ip("2001:db8::1")
        );
        // An IPv4 proxy seen on a dual-stack socket.
        assert_eq!(
            t.client(ip("::ffff:10.0.0.1"), &xff(&["192.0.2.1"])),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(
            TrustedProxies::parse_cidr("10.0.0.7").unwrap(),
            (ip("10.0.0.7"), 32)
        );
        assert_eq!(
            TrustedProxies::parse_cidr("fd00::/8").unwrap(),
            (ip("fd00::"), 8)
        );
        for bad in ["10.0.0.0/33", "nginx", "10.0.0.0/", "/8", "::/129"] {
            let e = TrustedProxies::parse_cidr(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("10.0.0.0/8"), "{e}");
        }
        let t = proxies(&["10.0.0.0/8"]);
        assert!(t.trusts(ip("10.255.0.1")));
        assert!(!t.trusts(ip("11.0.0.1")));
        assert_eq!(t.to_args(), vec!["--trusted-proxy=10.0.0.0/8".to_string()]);
    }
}
