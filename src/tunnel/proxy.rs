//! The agent's way out through a company's HTTP proxy: `HTTPS_PROXY` /
//! `HTTP_PROXY` and `NO_PROXY`, read as Go's `net/http` reads them (what
//! kubectl and most of the tools next to it do), and an HTTP `CONNECT`.

use std::net::IpAddr;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP proxy from the environment (its `Debug` is [`Proxy::shown`]).
#[derive(Clone, PartialEq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `user:password`, decoded, for `Proxy-Authorization: Basic`.
    credentials: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({})", self.shown())
    }
}

impl Proxy {
    /// The proxy as logs and errors may show it: no credentials.
    pub fn shown(&self) -> String {
        let auth = if self.credentials.is_some() {
            "***@"
        } else {
            ""
        };
        if self.host.contains(':') {
            format!("http://{auth}[{}]:{}", self.host, self.port)
        } else {
            format!("http://{auth}{}:{}", self.host, self.port)
        }
    }
}

/// The proxy variables an agent goes by: the environment's, as `join`
/// saw them and saved them with the agent (so that an agent run later by
/// systemd, whose environment has none, goes through the same proxy).
#[derive(Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProxyVars {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no: Option<String>,
}

impl std::fmt::Debug for ProxyVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| v.as_deref().map(redact);
        f.debug_struct("ProxyVars")
            .field("https", &shown(&self.https))
            .field("http", &shown(&self.http))
            .field("no", &self.no)
            .finish()
    }
}

impl ProxyVars {
    /// `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or their lower-case
    /// forms, upper case first as Go reads them) from the environment;
    /// `None` when none is set.
    pub fn from_env() -> Option<ProxyVars> {
        let get = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let v = ProxyVars {
            https: get(["HTTPS_PROXY", "https_proxy"]),
            http: get(["HTTP_PROXY", "http_proxy"]),
            no: get(["NO_PROXY", "no_proxy"]),
        };
        (v != ProxyVars::default()).then_some(v)
    }
}

/// The proxy for a hub at `host:port` (`tls`: `wss://`): `explicit`
/// (`--proxy`) when given; else `HTTPS_PROXY` for `wss://`, `HTTP_PROXY`
/// for `ws://`, unless `NO_PROXY` names the host, the environment's when
/// it sets that variable, else those `saved` with the agent (with the
/// saved `NO_PROXY` and the environment's). `Err` for a proxy URL that cannot be used, naming
/// it without its credentials.
pub fn choose(
    tls: bool,
    host: &str,
    port: u16,
    explicit: Option<&str>,
    saved: Option<&ProxyVars>,
) -> Result<Option<Proxy>, String> {
    let env = ProxyVars::from_env().unwrap_or_default();
    choose_with(tls, host, port, explicit, saved, env)
}

/// The proxy the operator's own commands (`login`, `use`, `port-forward`,
/// `towerctl kubectl`'s probes) take to a gateway at `host:port`: the
/// environment's `HTTPS_PROXY` unless `NO_PROXY` names the host, and never
/// for a loopback host, exactly as kubectl (Go) reads them in the same
/// shell. They dialed the gateway directly: behind a corporate proxy,
/// `towerctl login` failed where kubectl worked.
pub fn for_gateway(host: &str, port: u16) -> Result<Option<Proxy>, String> {
    gateway_proxy_with(host, port, ProxyVars::from_env().unwrap_or_default())
}

fn gateway_proxy_with(host: &str, port: u16, env: ProxyVars) -> Result<Option<Proxy>, String> {
    if is_loopback_host(host) {
        return Ok(None);
    }
    choose_with(true, host, port, None, None, env)
}

/// [`choose`] with the environment's variables given.
fn choose_with(
    tls: bool,
    host: &str,
    port: u16,
    explicit: Option<&str>,
    saved: Option<&ProxyVars>,
    env: ProxyVars,
) -> Result<Option<Proxy>, String> {
    if let Some(p) = explicit {
        return parse(p).map(Some).map_err(|e| format!("--proxy: {e}"));
    }
    let pick = |v: &ProxyVars| if tls { v.https.clone() } else { v.http.clone() };
    let vars = match (pick(&env), saved) {
        (Some(_), _) => env,
        // The saved proxy, kept off the hosts either NO_PROXY names (a
        // unit's Environment=NO_PROXY=… still counts).
        (None, Some(s)) if pick(s).is_some() => {
            let mut v = s.clone();
            v.no = match (v.no.take(), env.no) {
                (Some(a), Some(b)) => Some(format!("{a},{b}")),
                (a, b) => a.or(b),
            };
            v
        }
        _ => return Ok(None),
    };
    let name = if tls { "HTTPS_PROXY" } else { "HTTP_PROXY" };
    let Some(raw) = pick(&vars) else {
        return Ok(None);
    };
    if bypassed(vars.no.as_deref().unwrap_or_default(), host, port) {
        return Ok(None);
    }
    parse(&raw).map(Some).map_err(|e| format!("{name}: {e}"))
}

/// A proxy URL: `http://[USER[:PASSWORD]@]HOST[:PORT]`, the scheme
/// optional (`HOST:PORT`), the port 80 by default, as Go takes them.
pub fn parse(raw: &str) -> Result<Proxy, String> {
    let raw = raw.trim();
    let with_scheme = if split_scheme(raw).is_some() {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let shown = || redact(&with_scheme);
    let u = url::Url::parse(&with_scheme).map_err(|e| {
        format!(
            "'{}' is not a proxy URL ({e}): give http://HOST:PORT",
            shown()
        )
    })?;
    match u.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "'{}': a proxy reached over TLS (https://) is not supported; give the proxy's \
                 plain HTTP address, http://HOST:PORT (the hub's own TLS still runs end to end \
                 through it)",
                shown()
            ))
        }
        s if s.starts_with("socks") => {
            return Err(format!(
                "'{}': SOCKS proxies are not supported; give an HTTP proxy that allows CONNECT, \
                 http://HOST:PORT",
                shown()
            ))
        }
        s => {
            return Err(format!(
                "'{}': scheme '{s}' is not a proxy's; give http://HOST:PORT",
                shown()
            ))
        }
    }
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("'{}' names no host: give http://HOST:PORT", shown()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = (!u.username().is_empty() || u.password().is_some()).then(|| {
        format!(
            "{}:{}",
            decode(u.username()),
            decode(u.password().unwrap_or(""))
        )
    });
    Ok(Proxy {
        host,
        port: u.port_or_known_default().unwrap_or(80),
        credentials,
    })
}

/// `raw` with whatever lies between its scheme and its last `@` hidden (a
/// password may hold `/`, `?` or `#`, which end an authority).
pub fn redact(raw: &str) -> String {
    let (scheme, rest) = match split_scheme(raw) {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), raw),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => format!("{scheme}{rest}"),
    }
}

/// `raw`'s scheme and the rest after `://`, when what comes before the
/// first `://` can be a scheme (RFC 3986: a letter, then letters, digits,
/// `+`, `-`, `.`); not when it holds more, as in `user:pass://word@host`,
/// where it is a password's part and must not be shown as a scheme.
fn split_scheme(raw: &str) -> Option<(&str, &str)> {
    let (s, rest) = raw.split_once("://")?;
    let mut c = s.chars();
    (c.next()?.is_ascii_alphabetic()
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some((s, rest))
}

/// Whether `no_proxy` keeps `host:port` off the proxy, as Go's
/// `httpproxy` reads it: comma-separated entries; `*`; an IP address or a
/// CIDR (`10.0.0.0/8`); a name, matching itself and its subdomains
/// (`example.com`), or its subdomains only when it starts with `.` or `*.`
/// (`.example.com`); any of the names and addresses with `:PORT`, then
/// for that port only (IPv6 in brackets). Unlike Go, loopback hosts are
/// not kept off the proxy unless named: a hub on this machine reached
/// through a proxy is what the variables say.
pub fn bypassed(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_matches(|c| c == '[' || c == ']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    for entry in no_proxy.split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        // A CIDR first (`fd00::/16` holds colons), then a port.
        if let Some((net, bits)) = cidr(&entry).filter(|_| entry.contains('/')) {
            if ip.is_some_and(|ip| in_net(ip, net, bits)) {
                return true;
            }
            continue;
        }
        let (name, want_port) = split_port(&entry);
        if want_port.is_some_and(|p| p != port) {
            continue;
        }
        if let Ok(want) = name.parse::<IpAddr>() {
            if ip.is_some_and(|ip| ip.to_canonical() == want.to_canonical()) {
                return true;
            }
            continue;
        }
        let (name, subdomains_only) = match name.strip_prefix("*.").or(name.strip_prefix('.')) {
            Some(n) => (n, true),
            None => (name, false),
        };
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            continue;
        }
        if host.ends_with(&format!(".{name}")) || (!subdomains_only && host == name) {
            return true;
        }
    }
    false
}

/// Whether `host` (a name, an IP address, IPv6 in brackets or not) is this
/// machine's loopback: `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .trim_matches(|c| c == '[' || c == ']')
        .trim_end_matches('.');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `entry` and its port: `host:port`, `[v6]:port`, `[v6]`, a bare IPv6
/// address (no port), or a name.
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        };
    }
    // Two colons or more: an IPv6 address (or CIDR) without brackets.
    if entry.matches(':').count() == 1 {
        if let Some((h, p)) = entry.rsplit_once(':') {
            if let Ok(p) = p.parse() {
                return (h, Some(p));
            }
        }
    }
    (entry, None)
}

/// An IP address or CIDR.
fn cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(max);
    (bits <= max).then_some((addr, bits))
}

/// Whether `ip` (IPv4-mapped addresses as IPv4) is in `net`/`bits`.
pub fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    // An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is the IPv4
    // network it maps, with its prefix counted in IPv4 bits.
    let (net, bits) = match net {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if bits >= 96 => (IpAddr::V4(v4), bits - 96),
            _ => (net, bits),
        },
        IpAddr::V4(_) => (net, bits),
    };
    match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - bits.min(32) as u32).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - bits.min(128) as u32)
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// What a proxy's answer other than 2xx most likely means.
fn refusal_hint(code: u16, head: &str, port: u16, user: Option<&str>) -> String {
    match code {
        // tinyproxy answers its BasicAuth refusals 401 (not 407).
        401 | 407 if user.is_some() => format!(
            ": the proxy refused the credentials in the proxy URL (user '{}'): a changed or \
             expired password? (only Basic is sent; percent-encode special characters)",
            super::printable(user.unwrap_or(""), 60)
        ),
        401 | 407 => {
            let offered: Vec<String> = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(n, _)| n.trim().eq_ignore_ascii_case("proxy-authenticate"))
                .filter_map(|(_, v)| v.split_whitespace().next())
                .map(|s| super::printable(s, 40))
                .collect();
            let offered = if offered.is_empty() {
                String::new()
            } else {
                format!(" (it offers: {})", offered.join(", "))
            };
            format!(
                ": the proxy wants credentials{offered}; put them in the proxy URL, \
                 http://USER:PASSWORD@HOST:PORT, percent-encoded (only Basic is sent)"
            )
        }
        403 if port != 443 => format!(
            ": many proxies allow CONNECT to port 443 only; serve the hub's tunnel on 443 \
             (wss://), or have the proxy allow port {port}, or name the hub in NO_PROXY if it \
             is reachable without the proxy"
        ),
        403 => ": the proxy's policy refuses this host; have it allowed, or name the hub in \
                 NO_PROXY if it is reachable without the proxy"
            .into(),
        // tinyproxy: "500 Unable to connect".
        500 | 502..=504 => {
            // Squid says why in a header of its own.
            let why = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-squid-error"))
                .map(|(_, v)| format!(" ({})", super::printable(v.trim(), 100)))
                .unwrap_or_default();
            format!(
                ": the proxy could not reach the hub's host and port itself{why}; check the \
                 hub's name resolves and its port is open from the proxy"
            )
        }
        _ => String::new(),
    }
}

/// Opens a TCP tunnel to `host:port` with HTTP `CONNECT` through `proxy`.
pub async fn connect(proxy: &Proxy, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut s = super::dial::connect(&proxy.host, proxy.port).await?;
    // IPv6 hosts keep (or get) their brackets in the authority.
    let bare = host.trim_matches(|c| c == '[' || c == ']');
    let authority = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    };
    let mut req = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: towerctl/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(c) = &proxy.credentials {
        let cred = base64::engine::general_purpose::STANDARD.encode(c);
        req.push_str(&format!("Proxy-Authorization: Basic {cred}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    // Read the response head byte by byte: nothing past it may be consumed,
    // it belongs to the WebSocket handshake.
    // Its end as httparse finds one (`\n\n` too: some proxies end lines
    // with a bare LF).
    let mut head = Vec::with_capacity(256);
    let mut state = 0;
    while state != super::ws::HEAD_DONE {
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("proxy response head too large"));
        }
        let b = s.read_u8().await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::other(
                    "the proxy closed the connection without answering the CONNECT (not an HTTP proxy, or one that refuses this client)",
                )
            } else {
                e
            }
        })?;
        state = super::ws::head_end_after(state, b);
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if !(200..300).contains(&code) {
        // A refusal (credentials, a port not allowed) stays one until the
        // proxy or its URL changes: told apart for `join`.
        let kind = if matches!(code, 401 | 403 | 407) {
            std::io::ErrorKind::PermissionDenied
        } else {
            std::io::ErrorKind::Other
        };
        return Err(std::io::Error::new(
            kind,
            format!(
                "proxy answered '{}'{}",
                super::printable(status_line, 200),
                refusal_hint(
                    code,
                    &head,
                    port,
                    proxy
                        .credentials
                        .as_deref()
                        .map(|c| c.split_once(':').map_or(c, |(u, _)| u))
                )
            ),
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_commands_take_the_proxy_kubectl_takes() {
        let env = ProxyVars {
            https: Some("http://u:pw@proxy.corp:3128".into()),
            http: Some("http://plain.corp:3128".into()),
            no: Some(".internal,10.0.0.0/8".into()),
        };
        let p = gateway_proxy_with("hub.example.com", 9443, env.clone()).unwrap();
        assert_eq!(p.unwrap().shown(), "http://***@proxy.corp:3128");
        for direct in [
            "hub.internal",
            "10.1.2.3",
            "localhost",
            "127.0.0.1",
            "127.0.0.2",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(
                gateway_proxy_with(direct, 9443, env.clone()).unwrap(),
                None,
                "{direct}"
            );
        }
        assert_eq!(
            gateway_proxy_with("hub.example.com", 9443, ProxyVars::default()).unwrap(),
            None
        );
    }

    #[test]
    fn saved_proxy_variables_are_used_when_the_environment_has_none() {
        let saved = ProxyVars {
            https: Some("http://u:secret@proxy.corp:3128".into()),
            http: None,
            no: Some(".internal".into()),
        };
        assert!(!format!("{saved:?}").contains("secret"));
        // --proxy wins over everything.
        let p = choose(false, "h.internal", 80, Some("http://p:1"), Some(&saved));
        assert_eq!(p.unwrap().unwrap().shown(), "http://p:1");
        let e = choose(true, "h", 443, Some("socks5://p:1"), None).unwrap_err();
        assert!(e.starts_with("--proxy: "), "{e}");
        // Only meaningful where the tests' own environment sets none.
        if ProxyVars::from_env().is_none() {
            let wss = choose(true, "hub.example.com", 443, None, Some(&saved)).unwrap();
            assert_eq!(wss.unwrap().shown(), "http://***@proxy.corp:3128");
            let inside = choose(true, "hub.internal", 443, None, Some(&saved)).unwrap();
            assert_eq!(inside, None);
            let ws = choose(false, "hub.example.com", 80, None, Some(&saved)).unwrap();
            assert_eq!(ws, None);
            let none = choose(true, "hub.example.com", 443, None, None).unwrap();
            assert_eq!(none, None);
        } else {
            eprintln!("proxy variables set in this environment: the saved ones are not used");
        }
    }

    #[test]
    fn the_environment_wins_per_scheme_and_both_no_proxy_lists_count() {
        let saved = ProxyVars {
            https: Some("http://saved:1".into()),
            http: None,
            no: Some(".internal".into()),
        };
        let env = |https: Option<&str>, no: Option<&str>| ProxyVars {
            https: https.map(String::from),
            http: None,
            no: no.map(String::from),
        };
        let pick = |host: &str, e: ProxyVars| {
            choose_with(true, host, 443, None, Some(&saved), e)
                .unwrap()
                .map(|p| p.shown())
        };
        // Only NO_PROXY in the environment: the saved proxy, both lists.
        let e = env(None, Some("hub.example.com"));
        assert_eq!(pick("hub.example.com", e.clone()), None);
        assert_eq!(pick("hub.internal", e.clone()), None);
        assert_eq!(pick("other.example", e).as_deref(), Some("http://saved:1"));
        // The environment's HTTPS_PROXY: it, with its own NO_PROXY only.
        let e = env(Some("http://env:2"), None);
        assert_eq!(pick("hub.internal", e).as_deref(), Some("http://env:2"));
    }

    #[test]
    fn no_proxy_is_read_as_go_reads_it() {
        let no =
            "10.0.0.0/8, .svc,*.corp.example,internal.example:8080,[fd00::1],192.168.1.5,fd01::/16";
        for (host, port, want) in [
            ("10.1.2.3", 8080, true),
            ("11.1.2.3", 8080, false),
            ("hub.ns.svc", 80, true),
            // A leading dot or "*.": subdomains only, as Go.
            ("svc", 80, false),
            ("a.b.corp.example", 443, true),
            ("corp.example", 443, false),
            ("xcorp.example", 443, false),
            ("internal.example", 8080, true),
            ("sub.internal.example", 8080, true),
            ("internal.example", 443, false),
            ("[fd00::1]", 443, true),
            ("fd00::2", 443, false),
            ("[fd01:ab::5]", 443, true),
            ("192.168.1.5", 1, true),
            ("hub.example.com", 443, false),
            ("localhost", 8080, false),
            ("127.0.0.1", 8080, false),
        ] {
            assert_eq!(bypassed(no, host, port), want, "{host}:{port}");
        }
        assert!(bypassed("*", "hub.example.com", 443));
        assert!(!bypassed("", "hub.example.com", 443));
        assert!(bypassed("HUB.Example.com.", "hub.example.com", 443));
        assert!(bypassed("example.com", "hub.example.com", 443));
        assert!(!bypassed("10.0.0.0/8", "hub10.example", 443));
        // Commas only: a space is part of no entry's name.
        assert!(!bypassed("a.example b.example", "b.example", 443));
        assert!(bypassed("a.example, b.example,", "b.example", 443));
        // IPv4-mapped entries mean their IPv4 addresses, no more.
        assert!(bypassed("::ffff:10.0.0.0/104", "10.1.2.3", 443));
        assert!(!bypassed("::ffff:10.0.0.0/104", "11.1.2.3", 443));
        assert!(bypassed("::ffff:192.168.1.5", "192.168.1.5", 443));
        assert!(!bypassed("::ffff:192.168.1.5", "192.168.1.6", 443));
        assert!(!bypassed("10.0.0.0/0", "fd00::1", 443));
        assert!(bypassed("0.0.0.0/0", "8.8.8.8", 443));
    }

    #[test]
    fn proxy_urls_take_credentials_as_written_and_show_none() {
        let p = parse("http://us%40er:p+ss&w%3Ard@proxy.corp:3128").unwrap();
        assert_eq!(p.credentials.as_deref(), Some("us@er:p+ss&w:rd"));
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.shown(), "http://***@proxy.corp:3128");
        // No scheme: http, and the credentials are still hidden.
        let p = parse("user:secret@proxy.corp:3128").unwrap();
        assert_eq!(p.credentials.as_deref(), Some("user:secret"));
        assert!(!p.shown().contains("secret"));
        assert!(!format!("{p:?}").contains("secret"), "{p:?}");
        // A password alone is sent too.
        let p = parse("http://:tok@proxy").unwrap();
        assert_eq!(p.credentials.as_deref(), Some(":tok"));
        assert_eq!(p.port, 80);
        assert_eq!(
            parse("http://[fd00::9]:3128").unwrap().shown(),
            "http://[fd00::9]:3128"
        );
        for (bad, says) in [
            (
                "https://u:secret@proxy:443",
                "over TLS (https://) is not supported",
            ),
            (
                "socks5://u:secret@proxy:1080",
                "SOCKS proxies are not supported",
            ),
            ("ftp://proxy", "is not a proxy's"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says) && !e.contains("secret"), "{e}");
        }
        assert_eq!(redact("user:secret@proxy.corp:3128"), "***@proxy.corp:3128");
        assert_eq!(
            redact("http://user:pa/ss@proxy:3128"),
            "http://***@proxy:3128"
        );
        let e = parse("http://user:pa/ss@proxy:3128").unwrap_err();
        assert!(!e.contains("pa/ss"), "{e}");
        // A password holding `://` is no scheme: neither the user nor any
        // of the password is shown.
        for raw in [
            "puser:se://cret@127.0.0.1:3128",
            "http://puser:se://cret@proxy:3128",
        ] {
            let r = redact(raw);
            assert!(!r.contains("puser") && !r.contains("se:"), "{r}");
            if let Err(e) = parse(raw) {
                assert!(!e.contains("puser") && !e.contains("cret"), "{e}");
            }
        }
    }

    /// A one-shot proxy on loopback that answers `answer` to a CONNECT,
    /// and hands back what it was sent.
    async fn proxy_answering(answer: &'static str) -> (Proxy, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let p = parse(&format!("http://us%2Ber:p+w@127.0.0.1:{port}")).unwrap();
        (p, seen)
    }

    #[tokio::test]
    async fn a_connect_sends_credentials_and_takes_any_2xx() {
        let (p, seen) = proxy_answering("HTTP/1.1 204 Connection Established\r\n\r\n").await;
        connect(&p, "[fd00::1]", 443).await.unwrap();
        let req = seen.await.unwrap();
        let cred = base64::engine::general_purpose::STANDARD.encode("us+er:p+w");
        assert!(
            req.starts_with("CONNECT [fd00::1]:443 HTTP/1.1\r\n")
                && req.contains(&format!("Proxy-Authorization: Basic {cred}\r\n"))
                && req.contains("User-Agent: towerctl/"),
            "{req}"
        );
        // A head whose lines end with a bare LF (httparse and Go take it)
        // ends at its blank line: it used to be waited on until the
        // connect timeout.
        let (p, _) = proxy_answering("HTTP/1.0 200 Connection established\n\n").await;
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connect(&p, "hub.example.com", 443),
        )
        .await
        .expect("the head's end was not seen")
        .unwrap();
    }

    #[tokio::test]
    async fn a_proxys_refusal_says_what_it_likely_means() {
        let (p, _) = proxy_answering(
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\n\
             Proxy-Authenticate: NTLM\r\n\r\n",
        )
        .await;
        let anonymous = Proxy {
            credentials: None,
            ..p
        };
        let e = connect(&anonymous, "hub.example.com", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("407") && e.contains("it offers: Negotiate, NTLM"),
            "{e}"
        );
        // Credentials sent and refused: a changed password, most likely.
        let (p, _) = proxy_answering("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let e = connect(&p, "hub.example.com", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused the credentials in the proxy URL (user 'us+er')")
                && !e.contains("p+w"),
            "{e}"
        );
        // tinyproxy's BasicAuth refusal is a 401, told the same way, and
        // stops `join` as one (not retried as if the hub were away).
        let (p, _) = proxy_answering("HTTP/1.0 401 Unauthorized\r\n\r\n").await;
        let e = connect(&p, "hub.example.com", 443).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        let e = e.to_string();
        assert!(
            e.contains("refused the credentials in the proxy URL (user 'us+er')"),
            "{e}"
        );
        // tinyproxy's answer for a hub it cannot reach.
        let (p, _) = proxy_answering("HTTP/1.1 500 Unable to connect\r\n\r\n").await;
        let e = connect(&p, "hub.example.com", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not reach the hub's host and port itself"),
            "{e}"
        );
        let (p, _) = proxy_answering("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let e = connect(&p, "hub.example.com", 8080)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONNECT to port 443 only"), "{e}");
        let (p, _) = proxy_answering(
            "HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_DNS_FAIL 0\r\n\r\n",
        )
        .await;
        let e = connect(&p, "hub.example.com", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not reach the hub's host and port itself (ERR_DNS_FAIL 0)"),
            "{e}"
        );
        let (p, _) = proxy_answering("").await;
        let e = connect(&p, "hub.example.com", 443)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("closed the connection without answering"), "{e}");
    }
}
