//! A client's own impersonation (`kubectl --as`, `--as-group`, `--as-uid`,
//! `--as-user-extra`; Helm's `--kube-as-user`, Flux's and Argo CD's
//! service-account impersonation): the `Impersonate-*` headers a client
//! sends, read and checked once at the gateway, carried to the agent under
//! the hub's own names ([`CARRIED_PREFIX`]: an agent strips every
//! `Impersonate-*` it receives), and put back on the request to the member
//! by the agent, which decides first whether the operator may (see
//! `agent::upstream`).

use http::{HeaderMap, HeaderName, HeaderValue};

/// What clients send (`Impersonate-User`, `-Group`, `-Uid`, `-Extra-KEY`).
pub const CLIENT_PREFIX: &str = "impersonate-";
/// What the hub sends the agent in their place.
pub const CARRIED_PREFIX: &str = "x-towerctl-as-";

/// Most groups, UIDs and extra values one request may name in all (each
/// is a header on the HTTP/1.1 hops to other hubs and to the agent, which
/// take 100 headers, and, under `--impersonate`, a SubjectAccessReview).
const MAX_VALUES: usize = 32;
/// Longest name, group, UID, extra key or value, in bytes.
const MAX_VALUE: usize = 1024;
/// Longest the whole of it may be as the audit record writes it
/// ([`ClientAs::record`]): recorded whole, never cut (a long user name
/// pushed the groups out of a record cut at 512 bytes).
pub const MAX_RECORDED: usize = 4096;

/// Who a client asks to act as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientAs {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    /// Extra keys as sent (percent-encoded, lower case: header names are
    /// case-insensitive, and kube-apiserver lowers them too) with their
    /// values, in the order sent.
    pub extra: Vec<(String, Vec<String>)>,
}

/// One value as text: UTF-8 without control characters or white space
/// at either end, not empty, bounded.
fn value(name: &str, v: &HeaderValue) -> Result<String, String> {
    let s = std::str::from_utf8(v.as_bytes()).map_err(|_| format!("'{name}' is not UTF-8 text"))?;
    if s.trim().is_empty() {
        return Err(format!("'{name}' is empty"));
    }
    // HTTP/2 can carry them (RFC 9113 calls it malformed); an HTTP/1.1 hop
    // trims them: what was checked and recorded would not be what acts.
    if s.trim() != s {
        return Err(format!("'{name}' begins or ends with white space"));
    }
    if s.len() > MAX_VALUE {
        return Err(format!("'{name}' is longer than {MAX_VALUE} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("'{name}' holds a control character"));
    }
    Ok(s.to_string())
}

impl ClientAs {
    /// Reads the headers under `prefix` ([`CLIENT_PREFIX`] or
    /// [`CARRIED_PREFIX`]). `Ok(None)`: none. An error names the header and
    /// what is wrong with it (answered 400: the request is malformed).
    pub fn read(headers: &HeaderMap, prefix: &str) -> Result<Option<ClientAs>, String> {
        let mut found = false;
        let mut user = None;
        let mut groups = Vec::new();
        let mut uid = None;
        let mut extra: Vec<(String, Vec<String>)> = Vec::new();
        for name in headers.keys() {
            let Some(rest) = name.as_str().strip_prefix(prefix) else {
                continue;
            };
            found = true;
            let shown = format!("Impersonate-{rest}");
            let all = headers.get_all(name);
            match rest {
                "user" | "uid" => {
                    let mut values = all.iter();
                    let (Some(v), None) = (values.next(), values.next()) else {
                        return Err(format!("'{shown}' is given more than once"));
                    };
                    let v = value(&shown, v)?;
                    if rest == "user" {
                        user = Some(v);
                    } else {
                        uid = Some(v);
                    }
                }
                "group" => {
                    for v in all.iter() {
                        groups.push(value(&shown, v)?);
                    }
                }
                _ => {
                    let Some(key) = rest.strip_prefix("extra-").filter(|k| !k.is_empty()) else {
                        return Err(format!(
                            "'{shown}' is not an impersonation header Kubernetes knows \
                             (Impersonate-User, -Group, -Uid, -Extra-KEY)"
                        ));
                    };
                    if key.len() > MAX_VALUE {
                        return Err(format!(
                            "an 'Impersonate-Extra-' key is longer than {MAX_VALUE} bytes"
                        ));
                    }
                    // Checked under the key kube-apiserver will apply.
                    if unescape_key(key).is_none() {
                        return Err(format!(
                            "'{shown}': the key is not percent-encoded UTF-8 (client-go \
                             writes 'example.com%2Fscopes' for 'example.com/scopes')"
                        ));
                    }
                    let values = all
                        .iter()
                        .map(|v| value(&shown, v))
                        .collect::<Result<Vec<_>, _>>()?;
                    extra.push((key.to_string(), values));
                }
            }
        }
        if !found {
            return Ok(None);
        }
        let values = groups.len()
            + usize::from(uid.is_some())
            + extra.iter().map(|(_, v)| v.len()).sum::<usize>();
        if values > MAX_VALUES {
            return Err(format!(
                "more than {MAX_VALUES} groups, UIDs and extra values to impersonate in all"
            ));
        }
        let Some(user) = user else {
            return Err(
                "'Impersonate-Group', '-Uid' or '-Extra-' without 'Impersonate-User': name \
                 the user to act as (kubectl --as USER with --as-group, --as-uid, \
                 --as-user-extra)"
                    .into(),
            );
        };
        let as_ = ClientAs {
            user,
            groups,
            uid,
            extra,
        };
        if as_.record().len() > MAX_RECORDED {
            return Err(format!(
                "the user, groups, UID and extra values to impersonate hold more than {MAX_RECORDED} bytes in all"
            ));
        }
        Ok(Some(as_))
    }

    /// Puts these headers on `headers` under `prefix` (every value was
    /// checked by [`ClientAs::read`], so each makes a header).
    pub fn write(&self, headers: &mut HeaderMap, prefix: &str) {
        let mut put = |rest: &str, v: &str| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(format!("{prefix}{rest}").as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                headers.append(n, v);
            }
        };
        put("user", &self.user);
        for g in &self.groups {
            put("group", g);
        }
        if let Some(u) = &self.uid {
            put("uid", u);
        }
        for (k, vs) in &self.extra {
            for v in vs {
                put(&format!("extra-{k}"), v);
            }
        }
    }

    /// As kube-apiserver's `serviceaccount.SplitUsername` reads it: two
    /// parts, the namespace a DNS-1123 label and the name a DNS-1123
    /// subdomain; any other user name is a plain user (checked as `users`
    /// there, and so here).
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.user.strip_prefix("system:serviceaccount:")?;
        let (ns, name) = rest.split_once(':')?;
        (crate::daemon::names::is_dns_label(ns) && !name.contains(':') && dns1123_subdomain(name))
            .then_some((ns, name))
    }

    /// One printable, bounded line for logs and messages.
    pub fn describe(&self) -> String {
        let mut s = format!("'{}'", crate::tunnel::printable(&self.user, 200));
        if !self.groups.is_empty() {
            let g: Vec<String> = self
                .groups
                .iter()
                .take(8)
                .map(|g| crate::tunnel::printable(g, 100))
                .collect();
            let more = if self.groups.len() > 8 { ", …" } else { "" };
            s.push_str(&format!(" groups [{}{more}]", g.join(", ")));
        }
        if let Some(u) = &self.uid {
            s.push_str(&format!(" uid '{}'", crate::tunnel::printable(u, 100)));
        }
        if !self.extra.is_empty() {
            let k: Vec<String> = self
                .extra
                .iter()
                .map(|(k, _)| crate::tunnel::printable(&unescape_key(k).unwrap_or_default(), 100))
                .collect();
            s.push_str(&format!(" extra [{}]", k.join(", ")));
        }
        s
    }

    /// Every value exactly, each quoted and escaped as Rust's `{:?}` does
    /// (so that no two identities read the same), for the audit record.
    pub fn record(&self) -> String {
        let mut s = format!("{:?}", self.user);
        if !self.groups.is_empty() {
            s.push_str(&format!(" groups {:?}", self.groups));
        }
        if let Some(u) = &self.uid {
            s.push_str(&format!(" uid {u:?}"));
        }
        for (k, v) in &self.extra {
            let k = unescape_key(k).unwrap_or_else(|| k.clone());
            s.push_str(&format!(" extra {k:?}={v:?}"));
        }
        s
    }
}

/// An extra key as kube-apiserver reads it (`Impersonate-Extra-` keys are
/// percent-encoded by client-go, so that a key such as
/// `example.com/scopes` fits a header name). `None` where Go's
/// `url.PathUnescape` fails (kube then keeps the key as sent) or gives
/// bytes that are not UTF-8: such keys are refused, so that the key asked
/// about is the key applied.
pub fn unescape_key(k: &str) -> Option<String> {
    let b = k.as_bytes();
    let escape_ok = |i: usize| {
        b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    };
    if !(0..b.len()).all(|i| b[i] != b'%' || escape_ok(i)) {
        return None;
    }
    percent_encoding::percent_decode_str(k)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// A DNS-1123 subdomain: at most 253 bytes of labels joined by dots.
fn dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(crate::daemon::names::is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn what_kubectl_sends_is_read_and_carried_whole() {
        let h = headers(&[
            ("Impersonate-User", "system:serviceaccount:flux:reconciler"),
            ("Impersonate-Group", "devs"),
            ("Impersonate-Group", "a, b"),
            ("Impersonate-Uid", "1234"),
            ("Impersonate-Extra-example.com%2fscopes", "view"),
            ("Impersonate-Extra-example.com%2fscopes", "edit"),
            ("Accept", "application/json"),
        ]);
        let a = ClientAs::read(&h, CLIENT_PREFIX).unwrap().unwrap();
        assert_eq!(a.user, "system:serviceaccount:flux:reconciler");
        // One value per group, never split at a comma.
        assert_eq!(a.groups, ["devs", "a, b"]);
        assert_eq!(a.uid.as_deref(), Some("1234"));
        assert_eq!(
            a.extra,
            [(
                "example.com%2fscopes".to_string(),
                vec!["view".to_string(), "edit".to_string()]
            )]
        );
        assert_eq!(
            unescape_key(&a.extra[0].0).as_deref(),
            Some("example.com/scopes")
        );
        assert_eq!(a.service_account(), Some(("flux", "reconciler")));
        // The audit record: every value exactly, quoted.
        assert_eq!(
            a.record(),
            r#""system:serviceaccount:flux:reconciler" groups ["devs", "a, b"] uid "1234" extra "example.com/scopes"=["view", "edit"]"#
        );
        // Under the hub's names and back: the same.
        let mut carried = HeaderMap::new();
        a.write(&mut carried, CARRIED_PREFIX);
        assert!(carried
            .keys()
            .all(|k| k.as_str().starts_with(CARRIED_PREFIX)));
        assert_eq!(
            ClientAs::read(&carried, CARRIED_PREFIX).unwrap(),
            Some(a.clone())
        );
        assert_eq!(ClientAs::read(&carried, CLIENT_PREFIX).unwrap(), None);
        let mut back = HeaderMap::new();
        a.write(&mut back, CLIENT_PREFIX);
        assert_eq!(back.get_all("impersonate-group").iter().count(), 2);
        assert_eq!(ClientAs::read(&back, CLIENT_PREFIX).unwrap(), Some(a));
        assert_eq!(
            ClientAs::read(&headers(&[("Accept", "x")]), CLIENT_PREFIX),
            Ok(None)
        );
    }

    #[test]
    fn malformed_impersonation_is_refused_in_words() {
        let refused = |list: &[(&str, &str)], says: &str| {
            let e = ClientAs::read(&headers(list), CLIENT_PREFIX).unwrap_err();
            assert!(e.contains(says), "{e}");
        };
        refused(
            &[("Impersonate-Group", "devs")],
            "without 'Impersonate-User'",
        );
        refused(&[("Impersonate-Uid", "1")], "without 'Impersonate-User'");
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-User", "b")],
            "more than once",
        );
        refused(&[("Impersonate-User", " ")], "is empty");
        refused(&[("Impersonate-User", " bob")], "white space");
        refused(&[("Impersonate-User", "a\tb")], "control character");
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-Extra-", "x")],
            "not an impersonation header",
        );
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-Whatever", "x")],
            "not an impersonation header",
        );
        let many: Vec<(&str, &str)> = std::iter::once(("Impersonate-User", "a"))
            .chain(std::iter::repeat_n(("Impersonate-Group", "g"), MAX_VALUES))
            .chain(std::iter::once(("Impersonate-Uid", "u")))
            .collect();
        refused(&many, "more than 32");
        // Each value within its bound, the whole past what a record keeps.
        let big = "g".repeat(MAX_VALUE);
        let heavy: Vec<(&str, &str)> = std::iter::once(("Impersonate-User", big.as_str()))
            .chain(std::iter::repeat_n(("Impersonate-Group", big.as_str()), 4))
            .collect();
        refused(&heavy, "more than 4096 bytes in all");
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-Extra-k%zz", "v")],
            "not percent-encoded",
        );
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-Extra-k%", "v")],
            "not percent-encoded",
        );
        refused(
            &[("Impersonate-User", "a"), ("Impersonate-Extra-k%ff", "v")],
            "not percent-encoded",
        );
        let long = "x".repeat(MAX_VALUE + 1);
        refused(&[("Impersonate-User", &long)], "longer than");
    }

    #[test]
    fn a_service_account_is_one_only_where_kube_apiserver_takes_it_for_one() {
        let sa = |user: &str| {
            ClientAs {
                user: user.into(),
                ..Default::default()
            }
            .service_account()
            .map(|(ns, n)| format!("{ns}/{n}"))
        };
        assert_eq!(
            sa("system:serviceaccount:team-a:web.v2").as_deref(),
            Some("team-a/web.v2")
        );
        // Anything else is a plain user there, checked as `users`.
        for user in [
            "system:serviceaccount:team-a:Admin",
            "system:serviceaccount:team-a:a_b",
            "system:serviceaccount:Team:web",
            "system:serviceaccount:team.a:web",
            "system:serviceaccount:team-a:web:x",
            "system:serviceaccount::web",
            "system:serviceaccount:team-a:",
            "system:serviceaccount:-a:web",
            "system:serviceaccounts:team-a:web",
        ] {
            assert_eq!(sa(user), None, "{user}");
        }
        let long = format!("system:serviceaccount:{}:web", "a".repeat(64));
        assert_eq!(sa(&long), None);
    }

    #[test]
    fn a_description_is_one_printable_line() {
        let a = ClientAs {
            user: "eve\x1b[2J\nFAKE".into(),
            groups: (0..20).map(|i| format!("g{i}")).collect(),
            uid: Some("u\u{202e}1".into()),
            extra: vec![("k%2Fx".into(), vec!["v".into()])],
        };
        let d = a.describe();
        assert!(
            !d.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{d:?}"
        );
        assert!(d.contains("g7, …]") && d.contains("extra [k/x]"), "{d}");
        // The record keeps every value, escaped so that none acts on a
        // terminal or passes for another.
        let r = a.record();
        assert!(
            !r.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{r:?}"
        );
        assert!(r.starts_with(r#""eve\u{1b}[2J\nFAKE" groups ["g0""#), "{r}");
        assert!(r.contains(r#"uid "u\u{202e}1""#), "{r}");
    }
}
