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
pub struct TrustedProxies(Vec<(IpAddr, u8)>, RequireHeader);

/// `--require-proxy-protocol`: connections from trusted addresses must
/// start with a PROXY protocol header, and `X-Forwarded-For` is not read.
/// Behind a layer-4 balancer that passes its clients' bytes on untouched,
/// a client could otherwise write its own header (or `X-Forwarded-For`)
/// when the balancer sends none, and name any address.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequireHeader(pub bool);

/// Most `X-Forwarded-For` entries read from the right: a chain is as long
/// as the proxies in a row, a handful.
const MAX_HOPS: usize = 16;

impl TrustedProxies {
    pub fn new(nets: Vec<(IpAddr, u8)>) -> TrustedProxies {
        TrustedProxies(nets, RequireHeader(false))
    }

    /// These proxies, required to send a PROXY protocol header
    /// ([`RequireHeader`]).
    pub fn requiring_header(mut self, yes: bool) -> TrustedProxies {
        self.1 = RequireHeader(yes);
        self
    }

    /// Whether a PROXY protocol header is required of them.
    pub fn require_header(&self) -> bool {
        self.1 .0
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

    /// The CIDRs as `--trusted-proxy` values (and
    /// `--require-proxy-protocol`).
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .0
            .iter()
            .map(|(n, p)| format!("--trusted-proxy={n}/{p}"))
            .collect();
        if self.require_header() {
            args.push("--require-proxy-protocol".into());
        }
        args
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
        if !self.trusts(peer) || self.require_header() {
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

/// Whether `first`, the first bytes of a connection (whatever one read
/// got, at least one byte), begin a PROXY protocol header (v1 or v2): on
/// a connection from an address not trusted with `--trusted-proxy`, most
/// likely a load balancer the operator has not named.
pub fn starts_like_proxy_header(first: &[u8]) -> bool {
    let n = first.len().min(V2_SIGNATURE.len());
    first.starts_with(b"PROXY ") || (n >= 6 && first[..n] == V2_SIGNATURE[..n])
}

/// What the tunnel and gateway listeners say to such a connection.
pub const UNTRUSTED_PROXY_HEADER: &str = "a PROXY protocol header from an address not \
    trusted to send one (if a load balancer in front of the hub sends it, name the balancer \
    with --trusted-proxy)";

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
    required: RequireHeader,
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
            Header::None if required.0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a connection from a trusted proxy without a PROXY protocol header \
                     (--require-proxy-protocol): the balancer must send one on every connection",
                ))
            }
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
    // UNKNOWN: "the receiver must ignore anything presented before the
    // CRLF", text or not.
    if let Some(rest) = b[..end].strip_prefix(b"PROXY UNKNOWN") {
        if rest.first().is_none_or(|&c| c == b' ') {
            return Ok(Header::Proxy {
                len: end + 2,
                client: None,
            });
        }
    }
    let line = std::str::from_utf8(&b[..end]).map_err(|_| "a v1 line that is not text")?;
    let parts: Vec<&str> = line.split(' ').collect();
    let client = match parts.as_slice() {
        // Both addresses of the family named and both ports, checked: a
        // line that does not match the protocol exactly is refused.
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let addr = |s: &str| match s.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == (*family == "TCP4") => Ok(ip),
                Ok(_) => Err("a v1 address of the other address family"),
                Err(_) => Err("a v1 address that is not an address"),
            };
            let ip = addr(src)?;
            addr(dst)?;
            let port = v1_port(sport)?;
            v1_port(dport)?;
            Some(std::net::SocketAddr::new(ip.to_canonical(), port))
        }
        _ => return Err("a v1 line of neither TCP4, TCP6 nor UNKNOWN"),
    };
    Ok(Header::Proxy {
        len: end + 2,
        client,
    })
}

/// A v1 port: decimal, 0 to 65535, without heading zeroes (which
/// `u16::from_str` takes, and a sign).
fn v1_port(s: &str) -> Result<u16, &'static str> {
    let plain = s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    s.parse()
        .ok()
        .filter(|_| plain)
        .ok_or("a v1 port that is not a port")
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
    let (family, protocol) = (b[13] >> 4, b[13] & 0x0f);
    let client = match (b[12] & 0x0f, family) {
        // LOCAL: the proxy's own connection (a health check).
        (0, _) => None,
        // Past AF_UNIX and DGRAM: "must be rejected as invalid by receivers".
        (1, _) if family > 3 || protocol > 2 => {
            return Err("a v2 header of an unknown address family or protocol")
        }
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
            let client = read_proxy_header(&mut hub, RequireHeader(false)).await;
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
            read_proxy_header(&mut hub, RequireHeader(false)),
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
    fn proxy_headers_are_told_from_tls_and_http_by_their_first_bytes() {
        assert!(starts_like_proxy_header(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
        ));
        assert!(starts_like_proxy_header(b"PROXY UNKNOWN\r\n"));
        assert!(starts_like_proxy_header(V2_SIGNATURE));
        assert!(starts_like_proxy_header(b"\r\n\r\n\0\r"));
        assert!(
            !starts_like_proxy_header(b"\r\n\r\n\0"),
            "too short to tell"
        );
        assert!(!starts_like_proxy_header(b"\r\n\r\nGET / HTTP/1.1\r\n"));
        assert!(!starts_like_proxy_header(b"PROXYX"));
        assert!(!starts_like_proxy_header(b"GET / HTTP/1.1\r\n"));
        assert!(!starts_like_proxy_header(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01
        ]));
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

    use crate::testrng::Rng;

    /// The cases to run: `{name}_CASE=n` reruns case n alone,
    /// `{name}_CASES=n` runs n cases instead of `usual`.
    fn cases(name: &str, usual: u64) -> std::ops::Range<u64> {
        let env = |var: String| {
            std::env::var(&var).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{var}={v}: not a number"))
            })
        };
        match env(format!("{name}_CASE")) {
            Some(n) => n..n + 1,
            None => 0..env(format!("{name}_CASES")).unwrap_or(usual),
        }
    }

    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    /// What the PROXY protocol spec (HAProxy's proxy-protocol.txt, v1 and
    /// v2) says of the bytes a connection starts with, as far as they go.
    #[derive(Debug, Clone, PartialEq)]
    enum Spec {
        /// No header: the client's own bytes.
        Own,
        /// A header that is not all there yet.
        More,
        /// A header of `len` bytes naming `client`.
        Header {
            len: usize,
            client: Option<SocketAddr>,
        },
        /// A header the receiver must refuse.
        Malformed,
    }

    /// The v2 signature, as the spec writes it (not taken from the code).
    const SPEC_V2: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];

    /// A plain reading of the spec. Where the code documents a deliberate
    /// difference, this follows the code: bytes that start with neither
    /// signature (the v2 block, or "PROXY" and its space) are the client's
    /// own, handed on (the spec would drop the connection; `read_proxy_header`
    /// serves proxies that do not speak the protocol too); a v2 header over
    /// 2 KiB of addresses and TLVs is refused (`MAX_PROXY_HEADER`; the spec
    /// allows 64 KiB); an IPv4-mapped IPv6 source is taken as the IPv4
    /// address (the hub keys on canonical addresses). Where the spec
    /// leaves the receiver a choice, as the code chooses: TLVs are skipped
    /// unread (so CRC32C is not checked: "if ... supported by the
    /// receiver"); AF_UNIX, which the hub does not use, falls back to
    /// UNSPEC (its block is skipped, whatever its length); an AF_INET or
    /// AF_INET6 source is taken with the DGRAM and UNSPEC protocols too
    /// (for UNSPEC the spec says a receiver "should ignore address
    /// information": a proxy sends it for a client it cannot name, and
    /// then sends no address).
    fn spec_reading(b: &[u8]) -> Spec {
        if (b.len() < 12 && SPEC_V2.starts_with(b)) || (b.len() < 6 && b"PROXY ".starts_with(b)) {
            return Spec::More;
        }
        if let Some(rest) = b.strip_prefix(&SPEC_V2) {
            return spec_v2(rest);
        }
        if b.starts_with(b"PROXY ") {
            return spec_v1(b);
        }
        Spec::Own
    }

    /// Version 1 (spec 2.1): one line of at most 107 bytes with its CRLF;
    /// "PROXY", a space, "UNKNOWN" and anything up to the CRLF (ignored),
    /// or "TCP4"/"TCP6", then the source and destination addresses of that
    /// family and the source and destination ports, each after exactly one
    /// space; "any sequence which does not exactly match the protocol must
    /// be discarded".
    fn spec_v1(b: &[u8]) -> Spec {
        let seen = &b[..b.len().min(107)];
        let Some(cr) = (1..seen.len()).find(|&i| seen[i - 1] == b'\r' && seen[i] == b'\n') else {
            return if b.len() >= 107 {
                Spec::Malformed
            } else {
                Spec::More
            };
        };
        let (line, len) = (&b[6..cr - 1], cr + 1);
        if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
            return Spec::Header { len, client: None };
        }
        let (v6, rest) = match line.split_at(line.len().min(5)) {
            (b"TCP4 ", rest) => (false, rest),
            (b"TCP6 ", rest) => (true, rest),
            _ => return Spec::Malformed,
        };
        let fields: Vec<&[u8]> = rest.split(|&c| c == b' ').collect();
        let [src, dst, sport, dport] = fields[..] else {
            return Spec::Malformed;
        };
        let addr = |t: &[u8]| -> Option<std::net::IpAddr> {
            if v6 {
                // The spec's "sets of 4 hexadecimal digits" as RFC 4291
                // writes them (shorter groups, one "::", an IPv4 tail),
                // as inet_ntop and the proxies using it write them.
                std::str::from_utf8(t)
                    .ok()?
                    .parse::<Ipv6Addr>()
                    .ok()
                    .map(Into::into)
            } else {
                spec_ipv4(t).map(Into::into)
            }
        };
        match (addr(src), addr(dst), spec_port(sport), spec_port(dport)) {
            (Some(ip), Some(_), Some(port), Some(_)) => Spec::Header {
                len,
                client: Some(SocketAddr::new(ip.to_canonical(), port)),
            },
            _ => Spec::Malformed,
        }
    }

    /// "Exactly 4 integers in the range [0..255] inclusive written in
    /// decimal representation separated by exactly one dot", without
    /// heading zeroes.
    fn spec_ipv4(t: &[u8]) -> Option<Ipv4Addr> {
        let parts: Vec<&[u8]> = t.split(|&c| c == b'.').collect();
        let [a, b, c, d] = parts[..] else {
            return None;
        };
        let octet = |p: &[u8]| u8::try_from(spec_decimal(p, 3)?).ok();
        Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
    }

    /// "A decimal integer in the range [0..65535] inclusive", without
    /// heading zeroes.
    fn spec_port(t: &[u8]) -> Option<u16> {
        u16::try_from(spec_decimal(t, 5)?).ok()
    }

    /// Up to `digits` ASCII digits, without heading zeroes (a lone 0 is
    /// fine).
    fn spec_decimal(t: &[u8], digits: usize) -> Option<u32> {
        let ok = !t.is_empty()
            && t.len() <= digits
            && t.iter().all(u8::is_ascii_digit)
            && (t[0] != b'0' || t.len() == 1);
        ok.then(|| t.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    }

    /// Version 2 (spec 2.2), after the signature: the version (2, nothing
    /// else) and command, the family and protocol, the length of what
    /// follows; LOCAL (0): no client, whatever the family byte says ("the
    /// family which is ignored"); PROXY (1): the family must be 0 to 3 and
    /// the protocol 0 to 2 ("other values ... must be rejected as invalid
    /// by receivers"), AF_INET takes 12 bytes of addresses and ports,
    /// AF_INET6 36; any other command is refused.
    fn spec_v2(h: &[u8]) -> Spec {
        if h.len() < 4 {
            return Spec::More;
        }
        if h[0] >> 4 != 2 {
            return Spec::Malformed;
        }
        let len = 16 + usize::from(h[2]) * 256 + usize::from(h[3]);
        if len > 16 + 2048 {
            return Spec::Malformed;
        }
        if h.len() + 12 < len {
            return Spec::More;
        }
        let block = &h[4..len - 12];
        let (family, protocol) = (h[1] >> 4, h[1] & 0x0f);
        let client = match h[0] & 0x0f {
            0 => None,
            1 if family > 3 || protocol > 2 => return Spec::Malformed,
            1 if family == 1 => {
                let [a, b, c, d, _, _, _, _, p, q, _, _, ..] = *block else {
                    return Spec::Malformed;
                };
                Some(SocketAddr::new(
                    Ipv4Addr::new(a, b, c, d).into(),
                    u16::from(p) << 8 | u16::from(q),
                ))
            }
            1 if family == 2 => {
                if block.len() < 36 {
                    return Spec::Malformed;
                }
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&block[..16]).unwrap());
                Some(SocketAddr::new(
                    ip.to_canonical(),
                    u16::from(block[32]) << 8 | u16::from(block[33]),
                ))
            }
            1 => None,
            _ => return Spec::Malformed,
        };
        Spec::Header { len, client }
    }

    /// A header as generated: its bytes, and the client it names unless a
    /// corruption (named) was applied to it.
    struct Made {
        bytes: Vec<u8>,
        client: Option<SocketAddr>,
        corrupt: Option<&'static str>,
    }

    /// An IPv4 address, often at the ends of the range.
    fn random_ipv4(r: &mut Rng) -> Ipv4Addr {
        match r.range(0, 5) {
            0 => Ipv4Addr::UNSPECIFIED,
            1 => Ipv4Addr::BROADCAST,
            _ => Ipv4Addr::from(r.next() as u32),
        }
    }

    /// An IPv6 address: random groups, runs of zeros, or IPv4-mapped.
    fn random_ipv6(r: &mut Rng) -> Ipv6Addr {
        let mut g = [0u16; 8];
        for x in &mut g {
            *x = if r.one_in(3) { 0 } else { r.next() as u16 };
        }
        match r.range(0, 5) {
            0 => Ipv4Addr::from(r.next() as u32).to_ipv6_mapped(),
            1 => Ipv6Addr::LOCALHOST,
            2 => Ipv6Addr::from([0xffff; 8]),
            _ => Ipv6Addr::from(g),
        }
    }

    /// An IPv6 address as text: shortest, or every group written out, in
    /// random case and with heading zeroes to four digits.
    fn ipv6_text(r: &mut Rng, ip: Ipv6Addr) -> String {
        if r.one_in(2) || ip.to_ipv4_mapped().is_some() {
            return ip.to_string();
        }
        let pad = r.one_in(2);
        let upper = r.one_in(2);
        let groups: Vec<String> = ip
            .segments()
            .iter()
            .map(|g| match (pad, upper) {
                (true, true) => format!("{g:04X}"),
                (true, false) => format!("{g:04x}"),
                (false, true) => format!("{g:X}"),
                (false, false) => format!("{g:x}"),
            })
            .collect();
        groups.join(":")
    }

    /// A random port, often at the ends.
    fn random_port(r: &mut Rng) -> u16 {
        let any = r.next() as u16;
        r.pick(&[0, 1, 80, 443, 65_535, any, any / 2])
    }

    /// A random v1 header: TCP4, TCP6 (IPv4-mapped sources among them) or
    /// UNKNOWN, short or with fields (up to the 107-byte line); in half
    /// the cases corrupted in one way: the protocol word, an address or
    /// port written wrong (heading zeroes, out of range, signs, a zone,
    /// brackets, the other family), spaces doubled or tabs, a field
    /// missing or one more, the CRLF missing or half of it, a byte that is
    /// not ASCII (or NUL, CR, LF) anywhere, a line longer than 107 bytes,
    /// any byte replaced.
    fn random_v1(r: &mut Rng) -> Made {
        let v6 = r.one_in(2);
        let (src, dst) = if v6 {
            let (s, d) = (random_ipv6(r), random_ipv6(r));
            (ipv6_text(r, s), ipv6_text(r, d))
        } else {
            (random_ipv4(r).to_string(), random_ipv4(r).to_string())
        };
        let (sport, dport) = (random_port(r), random_port(r));
        let mut fields = vec![
            "PROXY".to_string(),
            if v6 { "TCP6" } else { "TCP4" }.to_string(),
            src.clone(),
            dst,
            sport.to_string(),
            dport.to_string(),
        ];
        let mut client = Some(SocketAddr::new(
            src.parse::<std::net::IpAddr>().unwrap().to_canonical(),
            sport,
        ));
        match r.range(0, 7) {
            0 => {
                fields.truncate(2);
                fields[1] = "UNKNOWN".into();
                client = None;
            }
            1 => {
                fields[1] = "UNKNOWN".into();
                client = None;
            }
            _ => {}
        }
        let mut end = "\r\n".to_string();
        let corrupt = r.one_in(2).then(|| {
            let f = r.range(1, fields.len() - 1);
            match r.range(0, 9) {
                0 => {
                    fields[1] = r
                        .pick(&[
                            "TCP5", "tcp4", "TCP", "UDP4", "TCP4\t", "UNKNOWNX", "TCP4", "TCP6",
                        ])
                        .into();
                    "the protocol word"
                }
                1 => {
                    let a = r.range(2.min(fields.len() - 1), 3.min(fields.len() - 1));
                    let t = fields[a].clone();
                    fields[a] = match r.range(0, 9) {
                        0 => format!("0{t}"),
                        1 => t.replacen('.', ".0", 1),
                        2 => t
                            .rsplit_once(['.', ':'])
                            .map_or(t.clone(), |x| x.0.to_string()),
                        3 => format!("{t}.5"),
                        4 => format!("{t}:1"),
                        5 => t.replacen("::", ":::", 1),
                        6 => format!("{t}%eth0"),
                        7 => format!("[{t}]"),
                        8 => "256.1.1.1".into(),
                        _ => String::new(),
                    };
                    "an address"
                }
                2 => {
                    let p = r.range(4.min(fields.len() - 1), 5.min(fields.len() - 1));
                    fields[p] = r
                        .pick(&[
                            "080", "+80", "65536", "99999", "", "-1", "0x50", "00", "0", "65535",
                            "8 0", "٣",
                        ])
                        .into();
                    "a port"
                }
                3 => {
                    fields[f] = format!("{}{}", r.pick(&[" ", "\t", "  "]), fields[f]);
                    "a separator"
                }
                4 => {
                    if r.one_in(2) {
                        fields.push("1".into());
                    } else {
                        fields.remove(f);
                    }
                    "a field more or less"
                }
                5 => {
                    end = r.pick(&["\n", "\r", "\n\r", "", "\r\r\n", " \r\n"]).into();
                    "the line's end"
                }
                6 => {
                    // Over 107 bytes, or just not: UNKNOWN and padding.
                    let total = r.range(104, 110);
                    fields.truncate(2);
                    fields[1] = "UNKNOWN".into();
                    let pad = total - "PROXY UNKNOWN \r\n".len();
                    fields.push("f".repeat(pad));
                    "the line's length"
                }
                _ => "a byte",
            }
        });
        let mut bytes = fields.join(" ").into_bytes();
        bytes.extend_from_slice(end.as_bytes());
        if corrupt == Some("a byte") {
            let at = r.range(0, bytes.len() - 1);
            let b = r.pick(&[
                0x00, 0x80, 0xff, 0xc3, b'\r', b'\n', b' ', b'0', b'.', b':', b'a',
            ]);
            if r.one_in(2) {
                bytes.insert(at, b);
            } else {
                bytes[at] = b;
            }
        }
        Made {
            bytes,
            client,
            corrupt,
        }
    }

    /// A random v2 header: PROXY or LOCAL, over AF_INET, AF_INET6 (mapped
    /// addresses among them), AF_UNIX or AF_UNSPEC with each protocol, with
    /// random TLVs after the addresses (or random bytes), up to the 2 KiB
    /// bound; in half the cases corrupted in one way: a byte of the
    /// signature, the version, the command, the family, the protocol, a
    /// length too short for the addresses, longer than what was sent (the
    /// client's bytes taken for the header's), or over the bound.
    fn random_v2(r: &mut Rng) -> Made {
        let local = r.one_in(5);
        let fam = if local {
            let any = r.next() as u8;
            r.pick(&[0x00, 0x00, 0x11, any])
        } else {
            r.pick(&[
                0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x10, 0x20, 0x01, 0x02,
            ])
        };
        let mut block = Vec::new();
        let mut client = None;
        match fam >> 4 {
            1 => {
                let (ip, port) = (random_ipv4(r), random_port(r));
                block.extend_from_slice(&ip.octets());
                block.extend_from_slice(&random_ipv4(r).octets());
                block.extend_from_slice(&port.to_be_bytes());
                block.extend_from_slice(&random_port(r).to_be_bytes());
                client = Some(SocketAddr::new(ip.into(), port));
            }
            2 => {
                let (ip, port) = (random_ipv6(r), random_port(r));
                block.extend_from_slice(&ip.octets());
                block.extend_from_slice(&random_ipv6(r).octets());
                block.extend_from_slice(&port.to_be_bytes());
                block.extend_from_slice(&random_port(r).to_be_bytes());
                client = Some(SocketAddr::new(ip.to_canonical(), port));
            }
            3 => {
                for _ in 0..2 {
                    let mut path = b"/run/haproxy.sock".to_vec();
                    path.resize(108, 0);
                    block.extend(path);
                }
            }
            _ => {
                let n = r.range(0, 20);
                block.extend(r.bytes(n));
            }
        }
        if local {
            client = None;
            if r.one_in(2) {
                block.clear();
            }
        }
        // TLVs: registered, custom and unknown types, or just bytes.
        if r.one_in(6) {
            let n = r.range(1, 40);
            block.extend(r.bytes(n));
        } else {
            for _ in 0..r.range(0, 4) {
                let any = r.next() as u8;
                let t = r.pick(&[1, 2, 3, 4, 5, 0x20, 0x30, 0xe0, 0xea, 0xee, 0xf0, any]);
                let n = if r.one_in(10) {
                    r.range(0, 700)
                } else {
                    r.range(0, 40)
                };
                block.push(t);
                block.extend_from_slice(&(n as u16).to_be_bytes());
                block.extend(r.bytes(n));
            }
        }
        let mut over = None;
        if r.one_in(15) {
            // Right at the bound, or one past it (a NOOP TLV of padding).
            let want = r.range(2047, 2049).max(block.len() + 3);
            let n = want - block.len() - 3;
            block.push(4);
            block.extend_from_slice(&(n as u16).to_be_bytes());
            block.resize(want, 0);
            over = (want > 2048).then_some("one byte over the bound");
        }
        let mut len = block.len();
        let mut h = SPEC_V2.to_vec();
        h.push(if local { 0x20 } else { 0x21 });
        h.push(fam);
        let corrupt = over.or_else(|| {
            r.one_in(2).then(|| match r.range(0, 7) {
                0 => {
                    let at = r.range(0, 11);
                    h[at] = r.next() as u8;
                    "a byte of the signature"
                }
                1 => {
                    h[12] = (r.pick(&[0, 1, 3, 4, 15]) << 4) | (h[12] & 0x0f);
                    "the version"
                }
                2 => {
                    h[12] = 0x20 | r.range(2, 15) as u8;
                    "the command"
                }
                3 => {
                    h[13] = (r.range(4, 15) as u8) << 4 | (h[13] & 0x0f);
                    "the family"
                }
                4 => {
                    h[13] = (h[13] & 0xf0) | r.range(3, 15) as u8;
                    "the protocol"
                }
                5 => {
                    len = r.range(0, len.max(1) - 1);
                    "a length too short"
                }
                6 => {
                    len += r.range(1, 100);
                    "a length too long"
                }
                _ => {
                    len = r.range(2049, 65_535);
                    "a length over the bound"
                }
            })
        });
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend(block);
        Made {
            bytes: h,
            client,
            corrupt,
        }
    }

    /// What the client sends after the header: TLS, HTTP, bytes that look
    /// like another header, or anything.
    fn random_payload(r: &mut Rng) -> Vec<u8> {
        let mut p = match r.range(0, 5) {
            0 => b"\x16\x03\x01\x02\x00\x01".to_vec(),
            1 => b"GET /tunnel HTTP/1.1\r\nHost: hub\r\n\r\n".to_vec(),
            2 => b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            3 => [&SPEC_V2[..], b"\x21\x11\x00\x0c"].concat(),
            4 => b"\r\n".to_vec(),
            _ => Vec::new(),
        };
        let n = r.range(0, 40);
        p.extend(r.bytes(n));
        p
    }

    /// A random start of a connection from a trusted proxy: a v1 or v2
    /// header (`random_v1`, `random_v2`), or now and then none, then the
    /// client's bytes.
    fn random_start(r: &mut Rng) -> (Made, Vec<u8>) {
        let made = match r.range(0, 10) {
            0 => Made {
                bytes: r
                    .pick(&[
                        &b"\x16\x03\x01"[..],
                        b"GET / HTTP/1.1\r\n",
                        b"PROXY",
                        b"PROXYTCP4",
                    ])
                    .to_vec(),
                client: None,
                corrupt: Some("no header"),
            },
            1..=5 => random_v1(r),
            _ => random_v2(r),
        };
        let mut stream = made.bytes.clone();
        stream.extend(random_payload(r));
        (made, stream)
    }

    /// Random PROXY protocol headers (`random_v1`, `random_v2`: v1 TCP4,
    /// TCP6 and UNKNOWN lines, v2 PROXY and LOCAL over AF_INET, AF_INET6,
    /// AF_UNIX and AF_UNSPEC with random TLVs; half of them corrupted: bad
    /// signatures, versions, commands, families, protocols, lengths short,
    /// long or huge, bad address and port text, lines over 107 bytes,
    /// missing CRLFs, bytes that are not ASCII), followed by the client's
    /// bytes, and every prefix of the result, read by `parse_header` give
    /// what a plain reading of the spec says (`spec_reading`): the client's
    /// own bytes, more needed, or a header of exactly the spec's length
    /// (so the client's bytes after it are left) naming the spec's
    /// source, or a refusal, for every malformed header (a refusal may
    /// come before the whole header is there, if it is malformed once
    /// whole); never a panic. A header made valid names the address it
    /// was made with and is exactly as long as made. The cases are
    /// deterministic and every message names its case:
    /// `TOWERCTL_PROXY_FUZZ_CASE=n` reruns case n alone,
    /// `TOWERCTL_PROXY_FUZZ_CASES=n` runs n cases instead of 3000.
    #[test]
    fn random_proxy_headers_are_read_as_a_plain_reading_of_the_spec_says() {
        // Found by this test (see `parse_v1`, `v1_port` and `parse_v2`):
        // malformed headers were taken. A v1 line's destination address and
        // port were not read at all, and its source port was read with
        // `u16::from_str`, which takes heading zeroes and a `+`; a v2 PROXY
        // header of an address family past AF_UNIX or a protocol past
        // DGRAM was taken (with the source of an AF_INET or AF_INET6 one).
        // And a v1 UNKNOWN line with bytes that are not UTF-8 after the word
        // was refused, where the spec has them ignored.
        let v2 = |fam: u8, block: &[u8]| {
            let mut h = SPEC_V2.to_vec();
            h.extend_from_slice(&[0x21, fam, 0, block.len() as u8]);
            h.extend_from_slice(block);
            h
        };
        let inet = [192, 0, 2, 7, 10, 0, 0, 1, 0x9c, 0x41, 0x01, 0xbb];
        let found: [(&str, Vec<u8>, Spec); 9] = [
            (
                "a v1 destination that is no address",
                b"PROXY TCP4 192.0.2.7 nowhere 40001 443\r\n".to_vec(),
                Spec::Malformed,
            ),
            (
                "a v1 destination of the other family",
                b"PROXY TCP4 192.0.2.7 2001:db8::1 40001 443\r\n".to_vec(),
                Spec::Malformed,
            ),
            (
                "a v1 destination port over 65535",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 65536\r\n".to_vec(),
                Spec::Malformed,
            ),
            (
                "a v1 destination port that is no number",
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 https\r\n".to_vec(),
                Spec::Malformed,
            ),
            (
                "a v1 source port with a heading zero",
                b"PROXY TCP4 192.0.2.7 10.0.0.1 04000 443\r\n".to_vec(),
                Spec::Malformed,
            ),
            (
                "a v1 source port with a sign",
                b"PROXY TCP4 192.0.2.7 10.0.0.1 +4000 443\r\n".to_vec(),
                Spec::Malformed,
            ),
            ("a v2 family past AF_UNIX", v2(0x41, &inet), Spec::Malformed),
            ("a v2 protocol past DGRAM", v2(0x13, &inet), Spec::Malformed),
            (
                "a v1 UNKNOWN line with bytes that are not text",
                b"PROXY UNKNOWN \xff\xfe 1\r\n".to_vec(),
                Spec::Header {
                    len: 20,
                    client: None,
                },
            ),
        ];
        for (seed, (what, header, want)) in found.into_iter().enumerate() {
            let mut stream = header.clone();
            stream.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(spec_reading(&stream), want, "{what}: the model");
            check_prefixes(what, &stream, header.len(), &mut Rng(seed as u64));
        }
        let (mut taken, mut refused, mut own) = (0, 0, 0);
        for case in cases("TOWERCTL_PROXY_FUZZ", 3000) {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let (made, stream) = random_start(&mut r);
            let verdict = spec_reading(&stream);
            let ctx = format!(
                "case {case} (seed {seed:#018x}, {} corrupted: {:?}, stream {:?}; \
                 TOWERCTL_PROXY_FUZZ_CASE={case} reruns it)",
                if made.bytes.starts_with(b"PROXY") {
                    "v1"
                } else {
                    "v2"
                },
                made.corrupt,
                String::from_utf8_lossy(&stream),
            );
            if made.corrupt.is_none() {
                let want = Spec::Header {
                    len: made.bytes.len(),
                    client: made.client,
                };
                assert_eq!(verdict, want, "{ctx}: the model on a header made valid");
            }
            match verdict {
                Spec::Header { .. } => taken += 1,
                Spec::Malformed => refused += 1,
                _ => own += 1,
            }
            check_prefixes(&ctx, &stream, made.bytes.len(), &mut r);
        }
        if std::env::var_os("TOWERCTL_PROXY_FUZZ_CASE").is_none() {
            assert!(
                taken > 300 && refused > 300 && own > 50,
                "{taken} taken, {refused} refused, {own} other"
            );
        }
    }

    /// Reads every prefix of `stream` up to a few bytes past `made` (the
    /// length of the header as made), and 20 more, with `parse_header`,
    /// and checks each against `spec_reading`: the same answer, except
    /// that a header malformed once whole may be refused before it is.
    /// Also checks that the model itself settles: once it says anything
    /// but "more", it says the same of every longer prefix.
    fn check_prefixes(ctx: &str, stream: &[u8], made: usize, r: &mut Rng) {
        let verdict = spec_reading(stream);
        let edge = made.min(400) + 3;
        let mut lens: Vec<usize> = (0..=edge.min(stream.len())).collect();
        let mut settled = None;
        for _ in 0..20 {
            lens.push(r.range(edge.min(stream.len()), stream.len()));
        }
        lens.sort();
        for k in lens {
            let b = &stream[..k];
            let want = spec_reading(b);
            match &settled {
                Some(s) => assert_eq!(&want, s, "{ctx}: the model changed its mind at {k} bytes"),
                None if want != Spec::More => settled = Some(want.clone()),
                None => {}
            }
            let got = std::panic::catch_unwind(|| parse_header(b))
                .unwrap_or_else(|_| panic!("{ctx}: parse_header panicked on {k} bytes"));
            let agree = match (&want, &got) {
                (Spec::Own, Ok(Header::None)) | (Spec::More, Ok(Header::Incomplete)) => true,
                (Spec::Malformed, Err(_)) => true,
                (Spec::More, Err(_)) => verdict == Spec::Malformed,
                (Spec::Header { len, client }, Ok(Header::Proxy { len: l, client: c })) => {
                    len == l && client == c
                }
                _ => false,
            };
            assert!(
                agree,
                "{ctx}: of the first {k} bytes, the spec says {want:?}, read {got:?}"
            );
        }
    }

    /// A random header, or none, followed by the client's bytes
    /// (`random_start`), sent by a proxy over loopback in one to five
    /// pieces with pauses of up to 3 ms between them, then the end, is
    /// read by `read_proxy_header` as `spec_reading` reads the whole:
    /// the client the header names, with the client's bytes after it left
    /// on the socket, every one; no header and every byte left; a refusal
    /// (`InvalidData`) of a malformed header; the end inside a header
    /// (`UnexpectedEof`). An answer within 5 s, and a few peeks per piece,
    /// no busy loop (the hub's side runs on a thread of its own, so that
    /// one that spins or hangs is reported, not waited for). The cases
    /// are deterministic in what is sent (not in how the pieces meet the
    /// reads): `TOWERCTL_PROXY_LOOPBACK_CASE=n` reruns case n alone,
    /// `TOWERCTL_PROXY_LOOPBACK_CASES=n` runs n cases instead of 40 (each
    /// takes some milliseconds).
    #[test]
    fn random_headers_sent_in_pieces_over_loopback_are_read_as_the_spec_says() {
        use std::io::Write;
        use std::time::Duration;
        for case in cases("TOWERCTL_PROXY_LOOPBACK", 40) {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let (made, stream) = random_start(&mut r);
            let want = spec_reading(&stream);
            let mut cuts: Vec<usize> = (0..r.range(0, 4))
                .map(|_| r.range(1, stream.len().max(2) - 1))
                .collect();
            cuts.extend([0, stream.len()]);
            cuts.sort();
            cuts.dedup();
            let n = cuts.len() - 1;
            let ctx = format!(
                "case {case} (seed {seed:#018x}, corrupted: {:?}, stream {:?} in pieces at \
                 {cuts:?}, the spec says {want:?}; TOWERCTL_PROXY_LOOPBACK_CASE={case} reruns it)",
                made.corrupt,
                String::from_utf8_lossy(&stream),
            );
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut proxy = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let hub = listener.accept().unwrap().0;
            hub.set_nonblocking(true).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let read = async move {
                    use tokio::io::AsyncReadExt;
                    let mut hub = tokio::net::TcpStream::from_std(hub).unwrap();
                    PEEKS.with(|p| p.set(0));
                    let got = read_proxy_header(&mut hub, RequireHeader(false)).await;
                    let peeks = PEEKS.with(|p| p.get());
                    let mut rest = Vec::new();
                    if got.is_ok() {
                        hub.read_to_end(&mut rest).await.unwrap();
                    }
                    (got, rest, peeks)
                };
                let _ = tx.send(rt.block_on(read));
            });
            // The hub may have refused and closed already: errors are fine.
            for w in cuts.windows(2) {
                let _ = proxy.write_all(&stream[w[0]..w[1]]);
                std::thread::sleep(Duration::from_millis(r.range(0, 3) as u64));
            }
            let _ = proxy.shutdown(std::net::Shutdown::Write);
            let (got, rest, peeks) = rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("{ctx}: no answer in 5 s"));
            match (&want, got) {
                (Spec::Own, Ok(None)) => assert!(rest == stream, "{ctx}: bytes were taken"),
                (Spec::Header { len, client }, Ok(c)) => {
                    assert_eq!(&c, client, "{ctx}: the client");
                    assert!(rest == stream[*len..], "{ctx}: the client's bytes after it");
                }
                (Spec::Malformed, Err(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{ctx}: {e}")
                }
                (Spec::More, Err(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{ctx}: {e}")
                }
                (_, got) => panic!("{ctx}: read {got:?}"),
            }
            assert!(peeks <= 4 * n + 4, "{ctx}: {peeks} peeks for {n} pieces");
        }
    }

    /// A plain grammar of an `X-Forwarded-For` entry as proxies write
    /// one, with spaces and tabs around it: an address (IPv4 as
    /// `spec_ipv4` reads it, IPv6 as RFC 4291 writes it); an IPv4 address,
    /// `:` and a port; an IPv6 address in brackets, with a numeric zone or
    /// not, `:` and a port; or an address in brackets without a port. A
    /// port is digits up to 65535 (heading zeroes are harmless here: no
    /// one reads them as octal). Taken as its canonical address.
    fn xff_entry(s: &str) -> Option<std::net::IpAddr> {
        use std::net::IpAddr;
        let s = s.trim_matches([' ', '\t']);
        let v4 = |t: &str| spec_ipv4(t.as_bytes()).map(IpAddr::from);
        let v6 = |t: &str| t.parse::<Ipv6Addr>().ok().map(IpAddr::from);
        // Digits (at least one) of a number up to `max`.
        let number = |t: &str, max: u64| {
            let n = t.trim_start_matches('0');
            !t.is_empty()
                && t.bytes().all(|c| c.is_ascii_digit())
                && n.len() <= 10
                && n.parse::<u64>().map_or(n.is_empty(), |n| n <= max)
        };
        let port = |t: &str| number(t, 65_535);
        let ip = if let Some(ip) = v4(s).or_else(|| v6(s)) {
            ip
        } else if let Some(inside) = s.strip_prefix('[') {
            let (inside, after) = inside.split_once(']')?;
            if after.is_empty() {
                v4(inside).or_else(|| v6(inside))?
            } else {
                let p = after.strip_prefix(':')?;
                let (addr, zone) = match inside.split_once('%') {
                    Some((a, z)) => (a, Some(z)),
                    None => (inside, None),
                };
                let zone_ok = zone.is_none_or(|z| number(z, u64::from(u32::MAX)));
                if !port(p) || !zone_ok {
                    return None;
                }
                v6(addr)?
            }
        } else {
            let (host, p) = s.rsplit_once(':')?;
            if !port(p) {
                return None;
            }
            v4(host)?
        };
        Some(ip.to_canonical())
    }

    /// Random `X-Forwarded-For` entries: an IPv4 or IPv6 address (mapped
    /// ones among them, IPv6 written shortest or in full), plain, with a
    /// port (heading zeroes now and then), in brackets with or without a
    /// port, with a zone, with spaces and tabs around; in half the cases
    /// with one to three characters inserted, removed or replaced (digits,
    /// hex letters, dots, colons, brackets, `%`, signs, spaces). What
    /// `parse_entry` reads is what the plain grammar (`xff_entry`) says:
    /// the address written, canonical, or nothing; an entry made whole
    /// gives the address it was made with. Deterministic:
    /// `TOWERCTL_PROXY_FUZZ_CASE=n` reruns case n alone,
    /// `TOWERCTL_PROXY_FUZZ_CASES=n` runs n cases instead of 5000.
    #[test]
    fn random_forwarded_for_entries_are_read_as_a_plain_grammar_says() {
        let (mut read, mut not) = (0, 0);
        for case in cases("TOWERCTL_PROXY_FUZZ", 5000) {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let ip: std::net::IpAddr = if r.one_in(2) {
                random_ipv4(&mut r).into()
            } else {
                random_ipv6(&mut r).into()
            };
            let text = match ip {
                std::net::IpAddr::V4(a) => a.to_string(),
                std::net::IpAddr::V6(a) => ipv6_text(&mut r, a),
            };
            let port = format!(
                "{}{}",
                "0".repeat(r.pick(&[0, 0, 0, 1, 7])),
                random_port(&mut r)
            );
            let mut entry = match (r.range(0, 3), ip.is_ipv4()) {
                (0, _) => text,
                (1, true) => format!("{text}:{port}"),
                (1, false) => format!("[{text}]:{port}"),
                (2, _) => format!("[{text}]"),
                (_, true) => text,
                (_, false) => format!("[{text}%{}]:{port}", r.pick(&[0, 1, 7, u32::MAX])),
            };
            let pad = |r: &mut Rng| {
                let n = r.range(0, 2);
                String::from_utf8(r.text(n, b" \t")).unwrap()
            };
            entry = format!("{}{entry}{}", pad(&mut r), pad(&mut r));
            let made = entry.clone();
            if r.one_in(2) {
                let mut b = entry.into_bytes();
                for _ in 0..r.range(1, 3) {
                    let c = r.pick(b"0123456789abcdefABCDEFx.:.:[]%+- \t/");
                    let at = r.range(0, b.len());
                    match r.range(0, 2) {
                        0 => b.insert(at, c),
                        _ if at == b.len() => {}
                        1 => drop(b.remove(at)),
                        _ => b[at] = c,
                    }
                }
                entry = String::from_utf8(b).unwrap();
            }
            let ctx = format!(
                "case {case} (seed {seed:#018x}, {entry:?} from {made:?}; \
                 TOWERCTL_PROXY_FUZZ_CASE={case} reruns it)"
            );
            let want = xff_entry(&entry);
            if entry == made {
                assert_eq!(want, Some(ip.to_canonical()), "{ctx}: the model");
            }
            let got = std::panic::catch_unwind(|| parse_entry(&entry))
                .unwrap_or_else(|_| panic!("{ctx}: parse_entry panicked"));
            assert_eq!(got, want, "{ctx}");
            if got.is_some() {
                read += 1;
            } else {
                not += 1;
            }
        }
        if std::env::var_os("TOWERCTL_PROXY_FUZZ_CASE").is_none() {
            assert!(read > 1000 && not > 500, "{read} read, {not} not");
        }
    }
}
