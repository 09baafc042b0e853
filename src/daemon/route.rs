//! Which member a gateway request is for: the TLS server name (SNI) of its
//! connection, or its path `/clusters/<name>/…`.
//!
//! Why SNI: client-go replaces a server URL's path for some requests
//! (`Request.RequestURI`: `kubectl get --raw`, `kubectl proxy`), and other
//! clients build absolute paths themselves. A context whose server URL has
//! no path and whose `tls-server-name` is `<name>.clusters.towerctl.invalid`
//! works with every client that honours `tls-server-name` (client-go, the
//! official Python client): the name travels in the TLS handshake, the path
//! is the Kubernetes path, unchanged.
//!
//! `towerctl use` still writes `/clusters/<name>` into the server URL as
//! well: kubectl keys its discovery cache (`~/.kube/cache/discovery/<host>`)
//! by the server URL alone, so members behind one gateway with bare URLs
//! would share one cache and see each other's API groups (measured:
//! tests/clients.rs). Requests that keep the path name the member twice;
//! requests whose path client-go rebuilt carry it in the SNI only.
//!
//! Why that suffix: `.invalid` is reserved (RFC 2606, RFC 6761 §6.4) and can
//! never resolve or be issued by a public CA, so a context can never be sent
//! anywhere but to the URL in `server`, and the name can never collide with
//! a real host. The gateway's serving certificate carries one wildcard SAN,
//! `*.clusters.towerctl.invalid`, so a member added later works without
//! reissuing the certificate or restarting the hub. Checked with Go's
//! crypto/x509 (kubectl), OpenSSL (Python's ssl) and rustls/webpki: all
//! accept the wildcard for a one-label member name.

use http::StatusCode;

/// Why a request names no member, or two.
pub type Refusal = (StatusCode, &'static str, String);

/// The DNS suffix under which each member has a TLS server name.
pub const SNI_SUFFIX: &str = "clusters.towerctl.invalid";

/// The SAN that covers every member's server name.
pub fn sni_wildcard() -> String {
    format!("*.{SNI_SUFFIX}")
}

/// The TLS server name of member `name` (`tls-server-name` in kubeconfigs).
pub fn server_name(name: &str) -> String {
    format!("{name}.{SNI_SUFFIX}")
}

/// The member a TLS server name names, if it is one of ours. Other names
/// (the hub's own host name, an IP-less `localhost`) mean path routing.
pub fn member_of_sni(sni: Option<&str>) -> Option<String> {
    let sni = sni?.trim_end_matches('.').to_ascii_lowercase();
    let name = sni.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
    super::names::validate_name(name).ok()?;
    Some(name.to_string())
}

/// The member and the upstream path of a request with `path`, on a
/// connection whose TLS server name named `sni` (a member, from
/// [`member_of_sni`]). On an SNI connection the path is the Kubernetes path
/// as is; a `/clusters/<other>/` prefix that names another member is
/// refused rather than guessed at (one of the two is a mistake, and either
/// guess could send a write to the wrong cluster); one that names the same
/// member is accepted and stripped.
/// A refusal is a status code, a Kubernetes reason and a message, for
/// [`super::gateway::status_response`].
pub fn pick(sni: Option<&str>, path: &str) -> Result<(String, String), Refusal> {
    // HTTP/2 lets a `:path` not start with '/' through (`-beta/api` on a
    // connection named for `alpha` read as `/clusters/alpha-beta/api` once
    // joined to a prefix, on another hub).
    if !path.starts_with('/') {
        return Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the request path does not begin with '/'".into(),
        ));
    }
    if let Some(why) = unsafe_path(path) {
        return Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the towerctl gateway refuses request paths with {why}: Kubernetes paths never need them, and a member whose API URL has a path prefix would resolve them outside it"),
        ));
    }
    match (sni, path_route(path)) {
        (Some(s), Some((p, _))) if s != p => Err((
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the TLS server name names cluster '{s}' but the path names cluster '{p}': use either a server URL without /clusters/{p} (routing by tls-server-name) or a context for '{p}'; run 'towerctl use {p}' to write one"),
        )),
        (Some(_), Some((p, rest))) => Ok((p.to_string(), rest)),
        (Some(s), None) => Ok((s.to_string(), path.to_string())),
        (None, Some((p, rest))) => Ok((p.to_string(), rest)),
        (None, None) => Err((
            StatusCode::NOT_FOUND,
            "NotFound",
            "the towerctl gateway serves clusters under /clusters/<name>/ or by TLS server name <name>.clusters.towerctl.invalid; run 'towerctl use CLUSTER' to get a kubeconfig context with the right server URL".into(),
        )),
    }
}

/// Why `req` must not be served as member `name`'s, if its `Host` (or
/// HTTP/2 `:authority`) is another member's server name: a connection
/// reused for another server name (HTTP/2 coalescing by a client or a
/// proxy under the one wildcard certificate) would otherwise send a request
/// meant for one member, a write say, to the member of the connection. 421
/// tells the client to send it again on a connection of its own. Clients
/// that route by `tls-server-name` send the gateway's own host as `Host`,
/// which names no member.
///
/// Every name the request carries is looked at: HTTP/2's `:authority` and
/// a `host` header beside it, and each `Host` line of a request that sent
/// several, in the forms a proxy may read (`user@host`, `[host]`).
pub fn misdirected<B>(req: &http::Request<B>, name: &str) -> Option<String> {
    let headers = req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .map(|h| {
            // `host`, `host:port`, `[v6]:port`, `user@host`: a member name
            // has no colon, `@` or brackets.
            let h = h.rsplit_once('@').map_or(h, |(_, h)| h);
            let h = h.rsplit_once(':').map_or(h, |(h, _)| h);
            h.trim_start_matches('[').trim_end_matches(']')
        });
    req.uri()
        .host()
        .into_iter()
        .chain(headers)
        .find_map(|host| other_member(host, name))
        .map(|other| {
            format!("this request names cluster '{other}' in its Host but came on a connection for cluster '{name}': send it on a connection to {}", server_name(&other))
        })
}

/// The member `host` is the server name of, when it is one and not `name`.
fn other_member(host: &str, name: &str) -> Option<String> {
    // Every request passes here: most name the gateway's own host, told
    // apart without an allocation.
    let bare = host.trim_end_matches('.');
    let tail = bare.len().checked_sub(SNI_SUFFIX.len())?;
    if !bare.get(tail..)?.eq_ignore_ascii_case(SNI_SUFFIX) {
        return None;
    }
    let other = member_of_sni(Some(host))?;
    (other != name).then_some(other)
}

/// `path` with percent-encoded letters, digits, `-`, `_` and `~` decoded:
/// they mean the same (RFC 3986 6.2.2.2), and the API server decodes them,
/// so a request for `/api/v1/namespaces/x/%73ecrets` acts on secrets; kept
/// encoded, the hub's audit said `%73ecrets` (a search for `secrets`
/// missed it). Encoded dots stay so, for [`unsafe_path`] to refuse; other
/// escapes (`%3A`) stay as written. A `%` that starts no escape is written
/// `%25`: left as it was, `%%373ecrets` became `%73ecrets` here (audited
/// so) and `secrets` at the API server; every `%` of the result starts one
/// of the client's own escapes, so decoding it again changes nothing.
pub fn decode_unreserved(path: &str) -> String {
    if !path.contains('%') {
        return path.to_string();
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = (bytes.get(i + 1).copied().and_then(hex))
                .zip(bytes.get(i + 2).copied().and_then(hex));
            match pair {
                Some((h, l)) => {
                    let c = h << 4 | l;
                    if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~') {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                }
                None => {
                    out.extend_from_slice(b"%25");
                    i += 1;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were put in for escapes: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

/// What makes `path` unsafe to forward, if anything: a `.` or `..`
/// segment, an empty segment (`//`), or a percent-encoded dot, slash or
/// backslash. Kubernetes never needs them (object names cannot be `.` or
/// `..` and cannot hold `/` or `%`), but an upstream URL with a path
/// (`https://rancher.example/k8s/clusters/c-1`) joined with
/// `/../c-2/api` reaches another cluster with the agent's credentials.
pub fn unsafe_path(path: &str) -> Option<&'static str> {
    // One pass over the bytes, no allocation: every request through the
    // gateway is checked, at the hub and again at the agent.
    let bytes = path.as_bytes();
    let encoded = bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    });
    if encoded {
        return Some("percent-encoded dots, slashes or backslashes");
    }
    if bytes.contains(&b'\\') {
        return Some("backslashes");
    }
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    while let Some(seg) = segments.next() {
        // `..;x` too: a Tomcat- or Spring-style proxy in front of an
        // upstream path prefix reads the segment before its `;` as `..`.
        let bare = seg.split_once(';').map_or(seg, |(b, _)| b);
        if bare == "." || bare == ".." {
            return Some("'.' or '..' segments");
        }
        // A trailing slash is one empty last segment; `//` is not.
        if seg.is_empty() && segments.peek().is_some() {
            return Some("empty segments ('//')");
        }
    }
    None
}

/// Splits `/clusters/<name>/<rest>` into the name and the upstream path.
pub fn path_route(path: &str) -> Option<(&str, String)> {
    let rest = path.strip_prefix("/clusters/")?;
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, format!("/{t}")),
        None => (rest, "/".to_string()),
    };
    (!name.is_empty()).then_some((name, tail))
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaped_unreserved_characters_are_decoded_and_nothing_else() {
        use super::decode_unreserved as d;
        assert_eq!(
            d("/api/v1/namespaces/x/%73ecrets"),
            "/api/v1/namespaces/x/secrets"
        );
        assert_eq!(
            d("/clusters/%61lpha/api/%7E%2D%5f"),
            "/clusters/alpha/api/~-_"
        );
        assert_eq!(d("/api/%2e%2e/%2F/%3A/%25"), "/api/%2e%2e/%2F/%3A/%25");
        assert_eq!(d("/a%7"), "/a%257");
        assert_eq!(d("/a%"), "/a%25");
        assert_eq!(d("/a%zz%41"), "/a%25zzA");
        assert_eq!(d("/plain"), "/plain");
        // A stray `%` cannot make an escape of what follows it decoded.
        assert_eq!(
            d("/api/v1/namespaces/x/%%373ecrets"),
            "/api/v1/namespaces/x/%2573ecrets"
        );
        for p in [
            "/x/%%373ecrets",
            "/x/%%%3737%33ecrets",
            "/a%7",
            "/a%zz%41",
            "/%2573",
            "/%%2e%2e",
        ] {
            assert_eq!(d(&d(p)), d(p), "decoding {p} again changes it");
        }
    }

    #[test]
    fn a_host_naming_another_member_is_misdirected() {
        let req = |host: &str| {
            http::Request::builder()
                .uri("/api")
                .header(http::header::HOST, host)
                .body(())
                .unwrap()
        };
        let m = |host: &str| super::misdirected(&req(host), "alpha");
        assert!(m("beta.clusters.towerctl.invalid").is_some());
        assert!(m("BETA.clusters.towerctl.invalid.:9443").is_some());
        assert!(m("alpha.clusters.towerctl.invalid:443").is_none());
        assert!(m("hub.corp:9443").is_none());
        assert!(m("127.0.0.1:9443").is_none());
        assert!(m("[::1]:9443").is_none());
        // HTTP/2: the authority.
        let h2 = http::Request::builder()
            .uri("https://beta.clusters.towerctl.invalid/api")
            .body(())
            .unwrap();
        assert!(super::misdirected(&h2, "alpha").is_some());
        // The forms a proxy may read another way, and each of two Host
        // lines, and a `host` header beside HTTP/2's authority.
        assert!(m("user@beta.clusters.towerctl.invalid").is_some());
        assert!(m("[beta.clusters.towerctl.invalid]").is_some());
        let two = http::Request::builder()
            .uri("/api")
            .header(http::header::HOST, "127.0.0.1")
            .header(http::header::HOST, "beta.clusters.towerctl.invalid")
            .body(())
            .unwrap();
        assert!(super::misdirected(&two, "alpha").is_some());
        let h2_host = http::Request::builder()
            .uri("https://127.0.0.1/api")
            .header(http::header::HOST, "beta.clusters.towerctl.invalid")
            .body(())
            .unwrap();
        assert!(super::misdirected(&h2_host, "alpha").is_some());
    }

    #[test]
    fn routes_by_path() {
        use super::path_route as route;
        assert_eq!(
            route("/clusters/alpha/api/v1/nodes"),
            Some(("alpha", "/api/v1/nodes".to_string()))
        );
        assert_eq!(route("/clusters/alpha"), Some(("alpha", "/".to_string())));
        assert_eq!(route("/clusters/"), None);
        assert_eq!(route("/api/v1"), None);
    }

    use super::*;

    #[test]
    fn member_names_come_only_from_our_suffix() {
        assert_eq!(
            member_of_sni(Some("alpha.clusters.towerctl.invalid")),
            Some("alpha".into())
        );
        assert_eq!(
            member_of_sni(Some("Alpha.Clusters.Towerctl.Invalid.")),
            Some("alpha".into())
        );
        assert_eq!(member_of_sni(Some("localhost")), None);
        assert_eq!(member_of_sni(Some("clusters.towerctl.invalid")), None);
        assert_eq!(member_of_sni(Some("a.b.clusters.towerctl.invalid")), None);
        assert_eq!(member_of_sni(Some("xclusters.towerctl.invalid")), None);
        assert_eq!(member_of_sni(None), None);
        assert_eq!(server_name("beta"), "beta.clusters.towerctl.invalid");
    }

    #[test]
    fn paths_that_climb_out_of_a_prefix_are_refused() {
        for bad in [
            "/clusters/alpha/../beta/api",
            "/clusters/alpha/%2e%2e/beta/api",
            "/clusters/alpha/%2E./beta",
            "/clusters/alpha/api/v1/namespaces/x%2fy",
            "/clusters/alpha//api",
            "/clusters/alpha/./api",
            "/..",
            "/api/..",
            "/api\\..\\x",
            "/api/x%5Cy",
            "/api/x%5c",
            "/api/%2F",
            "/api/v1/%2e",
            "/clusters/alpha/..;/beta",
            "/api/.;x/v1",
        ] {
            assert!(unsafe_path(bad).is_some(), "{bad}");
            assert_eq!(
                pick(None, bad).unwrap_err().0,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
            assert!(pick(Some("alpha"), bad).is_err(), "{bad}");
        }
        // A path that does not begin with '/' (HTTP/2 lets it through).
        for bad in ["-beta/api", "api/v1", "", "*"] {
            let e = pick(Some("alpha"), bad).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.2.contains("begin with '/'"), "{bad}: {}", e.2);
        }
        for good in [
            "/",
            "/clusters/alpha",
            "/clusters/alpha/",
            "/clusters/alpha/api/v1/namespaces/default/configmaps/my.config",
            "/api/v1/namespaces/a/services/web:80/proxy/some%20page/",
            "/apis/apps/v1/",
            "/api/v1/x%2",
            "/api/v1/x%25e",
            "/api/v1/%3e",
            "/api/v1/namespaces/a/pods/x;y",
            "/api/v1/..x;/y",
        ] {
            assert_eq!(unsafe_path(good), None, "{good}");
        }
    }

    #[test]
    fn sni_and_path_must_agree() {
        let ok = |s, p| pick(s, p).ok();
        assert_eq!(
            ok(Some("alpha"), "/version"),
            Some(("alpha".into(), "/version".into()))
        );
        assert_eq!(
            ok(Some("alpha"), "/clusters/alpha/api"),
            Some(("alpha".into(), "/api".into()))
        );
        assert_eq!(
            ok(None, "/clusters/beta/api"),
            Some(("beta".into(), "/api".into()))
        );
        let refused = pick(Some("alpha"), "/clusters/beta/api").unwrap_err();
        assert_eq!(refused.0, StatusCode::BAD_REQUEST);
        assert_eq!(pick(None, "/api").unwrap_err().0, StatusCode::NOT_FOUND);
    }
}
