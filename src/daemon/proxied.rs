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

/// Longest PROXY protocol header read: a v1 line is at most 107 bytes, a
/// v2 header 16 bytes and its addresses (36 for IPv6) and TLVs (cloud load
/// balancers add an endpoint id or two).
const MAX_PROXY_HEADER: usize = 16 + 2048;

/// The PROXY protocol v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the bytes at the start of a connection are.
#[derive(Debug, PartialEq)]
enum Header {
    /// Not a PROXY protocol header: the client's own bytes (TLS, HTTP).
    None,
    /// Too few bytes yet to tell.
    Incomplete,
    /// A header of `len` bytes, naming the client (`None`: the proxy's own
    /// connection, a health check, or an address family without one).
    Proxy {
        len: usize,
        client: Option<std::net::SocketAddr>,
    },
}

/// Reads the PROXY protocol header (v1 or v2, as HAProxy, nginx and cloud
/// load balancers send it) that a trusted proxy put before its client's
/// bytes, and returns the client's address. Returns `None` and consumes
/// nothing when the connection does not start with one (a proxy that does
/// not speak it, or one that speaks HTTP and `X-Forwarded-For`). Only ever
/// called for connections from `--trusted-proxy` addresses: anyone else
/// could name any address. The caller bounds the wait.
pub async fn read_proxy_header(
    tcp: &mut tokio::net::TcpStream,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    use tokio::io::{AsyncReadExt, Interest};
    let mut buf = vec![0u8; MAX_PROXY_HEADER];
    let (mut wait, mut closed) = (true, false);
    loop {
        if wait {
            // Bytes unread, new ones, or the peer's FIN.
            closed = tcp.ready(Interest::READABLE).await?.is_read_closed();
        }
        let n = match peek_now(tcp, &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Woken with nothing to read: forget it and wait again.
                forget_readable(tcp);
                wait = true;
                continue;
            }
            r => r?,
        };
        if n == 0 {
            return Ok(None);
        }
        match parse_header(&buf[..n]).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("invalid PROXY protocol header from a trusted proxy: {e}"),
            )
        })? {
            Header::None => return Ok(None),
            Header::Proxy { len, client } => {
                tcp.read_exact(&mut buf[..len]).await?;
                return Ok(client);
            }
            Header::Incomplete if n == buf.len() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "PROXY protocol header too long",
                ))
            }
            Header::Incomplete if closed => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the trusted proxy closed the connection inside a PROXY protocol header",
                ))
            }
            Header::Incomplete => {
                // A peek leaves the bytes, and so the socket's readiness:
                // waiting again would return at once, a busy loop for as
                // long as the rest does not come (it used to be). Forget
                // the readiness, then look once more, as bytes that came in
                // between would wake nobody; wait only when nothing did.
                forget_readable(tcp);
                wait = peek_now(tcp, &mut buf).map_or(true, |m| m <= n);
            }
        }
    }
}

/// Peeks at what the socket holds now, without waiting (it is non-blocking).
fn peek_now(tcp: &tokio::net::TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    #[cfg(test)]
    tests::PEEKS.with(|p| p.set(p.get() + 1));
    // SAFETY: `buf` is valid for writes of its length; the descriptor is
    // open for as long as `tcp` is borrowed.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Clears the socket's read readiness in tokio (never its closed state).
fn forget_readable(tcp: &tokio::net::TcpStream) {
    let _ = tcp.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
    });
}

fn parse_header(b: &[u8]) -> Result<Header, &'static str> {
    const V1: &[u8] = b"PROXY ";
    let prefix_of = |sig: &[u8]| b.len() < sig.len() && sig.starts_with(b);
    if prefix_of(V2_SIGNATURE) || prefix_of(V1) {
        return Ok(Header::Incomplete);
    }
    if b.starts_with(V2_SIGNATURE) {
        return parse_v2(b);
    }
    if b.starts_with(V1) {
        return parse_v1(b);
    }
    Ok(Header::None)
}

fn parse_v1(b: &[u8]) -> Result<Header, &'static str> {
    const MAX_LINE: usize = 107;
    let Some(end) = b.windows(2).take(MAX_LINE - 1).position(|w| w == b"\r\n") else {
        return if b.len() < MAX_LINE {
            Ok(Header::Incomplete)
        } else {
            Err("a v1 line longer than 107 bytes")
        };
    };
    let line = std::str::from_utf8(&b[..end]).map_err(|_| "a v1 line that is not text")?;
    let parts: Vec<&str> = line.split(' ').collect();
    let client = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| "a v1 source that is not an address")?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err("a v1 source of the other address family");
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| "a v1 source port that is not a port")?;
            Some(std::net::SocketAddr::new(ip.to_canonical(), port))
        }
        _ => return Err("a v1 line of neither TCP4, TCP6 nor UNKNOWN"),
    };
    Ok(Header::Proxy {
        len: end + 2,
        client,
    })
}

fn parse_v2(b: &[u8]) -> Result<Header, &'static str> {
    if b.len() < 16 {
        return Ok(Header::Incomplete);
    }
    if b[12] >> 4 != 2 {
        return Err("a v2 header of another version");
    }
    let len = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
    if len > MAX_PROXY_HEADER {
        return Err("a v2 header over 2 KiB");
    }
    if b.len() < len {
        return Ok(Header::Incomplete);
    }
    let a = &b[16..len];
    let client = match (b[12] & 0x0f, b[13] >> 4) {
        // LOCAL: the proxy's own connection (a health check).
        (0, _) => None,
        (1, 1) if a.len() >= 12 => {
            let ip = std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(std::net::SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[8], a[9]]),
            ))
        }
        (1, 2) if a.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let ip = IpAddr::from(std::net::Ipv6Addr::from(o)).to_canonical();
            Some(std::net::SocketAddr::new(
                ip,
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        (1, 1 | 2) => return Err("a v2 header with its addresses cut short"),
        // UNSPEC or UNIX: no address to take.
        (1, _) => None,
        _ => return Err("a v2 header with an unknown command"),
    };
    Ok(Header::Proxy { len, client })
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

    thread_local! {
        /// Peeks made by `read_proxy_header` on this thread.
        pub(super) static PEEKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A connected pair on loopback: (the hub's side, the proxy's side).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        (l.accept().await.unwrap().0, proxy)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_header_that_comes_in_pieces_is_read_whole_without_spinning() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut hub, mut proxy) = pair().await;
        let line = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\nGET";
        let read = tokio::spawn(async move {
            let client = read_proxy_header(&mut hub).await;
            let mut rest = [0u8; 3];
            hub.read_exact(&mut rest).await.unwrap();
            (client.unwrap(), rest)
        });
        PEEKS.with(|p| p.set(0));
        for piece in [&line[..6], &line[6..20], &line[20..]] {
            proxy.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let (client, rest) = read.await.unwrap();
        assert_eq!(client, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(&rest, b"GET", "the bytes after the header were not left");
        // A few peeks per piece, not one every few milliseconds of the
        // 600 ms it took (the loop used to poll every 5 ms: over 100).
        let peeks = PEEKS.with(|p| p.get());
        assert!(peeks <= 12, "{peeks} peeks for a header in three pieces");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_proxy_that_closes_inside_a_header_ends_it_at_once() {
        use tokio::io::AsyncWriteExt;
        let (mut hub, mut proxy) = pair().await;
        proxy.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        drop(proxy);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_proxy_header(&mut hub),
        )
        .await
        .expect("still waiting for a header whose sender has gone");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }

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
    fn proxy_protocol_headers_are_read_and_nothing_else_is_taken_for_one() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 443\r\n\x16\x03\x01";
        assert_eq!(
            parse_header(v1),
            Ok(Header::Proxy {
                len: 41,
                client: Some("192.0.2.7:40001".parse().unwrap())
            })
        );
        let v1 = b"PROXY TCP6 2001:db8::7 fd00::1 40001 443\r\nGET /";
        assert!(
            matches!(parse_header(v1), Ok(Header::Proxy { client: Some(c), .. }) if c == "[2001:db8::7]:40001".parse().unwrap())
        );
        assert!(matches!(
            parse_header(b"PROXY UNKNOWN\r\n"),
            Ok(Header::Proxy {
                len: 15,
                client: None
            })
        ));
        // v2, PROXY over TCP4, with a TLV after the addresses.
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12 + 4]);
        v2.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x41, 0x01, 0xbb]);
        v2.extend_from_slice(&[0x04, 0, 1, 0xff]);
        v2.extend_from_slice(b"\x16\x03");
        assert_eq!(
            parse_header(&v2),
            Ok(Header::Proxy {
                len: 32,
                client: Some("198.51.100.9:40001".parse().unwrap())
            })
        );
        // Cut anywhere: more is needed, never a guess.
        for cut in 1..32 {
            assert_eq!(parse_header(&v2[..cut]), Ok(Header::Incomplete), "{cut}");
        }
        for cut in 1..41 {
            assert_eq!(
                parse_header(&b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 443\r\n"[..cut]),
                Ok(Header::Incomplete),
                "{cut}"
            );
        }
        // LOCAL (a health check): no client.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse_header(&local),
            Ok(Header::Proxy {
                len: 16,
                client: None
            })
        );
        // The client's own bytes.
        for own in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"GET /tunnel HTTP/1.1\r\n",
            b"POST / HTTP/1.1",
            b"PRI * HTTP/2.0",
        ] {
            assert_eq!(parse_header(own), Ok(Header::None));
        }
        // Malformed: refused, not read past.
        for bad in [
            &b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 99999 2\r\n",
            b"PROXY SCTP x\r\n",
            &[b'P', b'R', b'O', b'X', b'Y', b' ']
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'1', 120))
                .collect::<Vec<u8>>(),
        ] {
            assert!(
                parse_header(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse_header(&short).is_err());
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
