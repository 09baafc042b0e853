//! Member labels (`env=prod`) and label selectors (`env in (prod,staging),
//! !canary`), with Kubernetes' syntax and meaning so that operators need
//! learn nothing new. The selector is its own small type so that other
//! features (access rules) can reuse it.

use std::collections::BTreeSet;

/// A member's labels (the registry's type, named here where the rules are).
pub use super::store::Labels;

/// Implicit label holding a member's name (`--names` on the CLI).
pub const NAME_LABEL: &str = "towerctl.io/name";

/// The prefix of towerctl's own label keys: not for `cluster label`.
const RESERVED_PREFIX: &str = "towerctl.io";

/// A member's labels as every selector reads them (access rules,
/// `towerctl kubectl -l`, the dashboard's filter): its own, and
/// [`NAME_LABEL`] holding its name whatever is stored under that key.
pub fn selectable(labels: &Labels, name: &str) -> Labels {
    let mut all = labels.clone();
    all.insert(NAME_LABEL.to_string(), name.to_string());
    all
}

/// A key a member's labels may be given: a valid key outside towerctl's
/// own prefix. `cluster label beta towerctl.io/name=alpha` was taken, and
/// `towerctl kubectl -l towerctl.io/name=alpha -- delete …` then ran on
/// beta while the access rules read the same selector as alpha.
pub fn validate_settable_key(k: &str) -> Result<(), String> {
    validate_key(k)?;
    match k.split_once('/') {
        Some((p, _)) if p == RESERVED_PREFIX || p.ends_with(&format!(".{RESERVED_PREFIX}")) => Err(format!(
            "label key '{k}' is under {RESERVED_PREFIX}/, towerctl's own ({NAME_LABEL} always holds the member's name, for selectors and access rules): choose another prefix, like example.com/{}",
            k.rsplit('/').next().unwrap_or(k)
        )),
        _ => Ok(()),
    }
}

/// A Kubernetes "name" part: 1-63 of `[A-Za-z0-9._-]`, alphanumeric at
/// both ends.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn validate_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    if prefix_ok && is_name(name) {
        Ok(())
    } else {
        Err(format!("invalid label key '{}': use [PREFIX/]NAME, NAME 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit (like env or example.com/tier)", crate::tunnel::escape_for_log(k, 80)))
    }
}

/// A label value: empty, or like a name part.
pub fn validate_value(k: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || is_name(v) {
        Ok(())
    } else {
        Err(format!("invalid value '{}' for label '{}': use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", crate::tunnel::escape_for_log(v, 80), crate::tunnel::escape_for_log(k, 80)))
    }
}

/// `KEY=VALUE`, for `cluster add --label`.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        format!(
            "invalid label '{}': use KEY=VALUE (like env=prod)",
            crate::tunnel::escape_for_log(s, 80)
        )
    })?;
    validate_settable_key(k)?;
    validate_value(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// What `cluster label NAME KEY=VALUE… KEY-…` asks for, as kubectl's
/// `label` reads it: pairs to set and keys to remove.
pub fn parse_changes(args: &[String]) -> Result<(Labels, Vec<String>), String> {
    let (mut set, mut remove) = (Labels::new(), Vec::new());
    for a in args {
        if let Some(k) = a.strip_suffix('-').filter(|_| !a.contains('=')) {
            validate_key(k)?;
            remove.push(k.to_string());
        } else {
            let (k, v) = parse_pair(a)
                .map_err(|e| format!("{e}; to remove a label write KEY- (like env-)"))?;
            set.insert(k, v);
        }
    }
    if let Some(k) = remove.iter().find(|k| set.contains_key(*k)) {
        return Err(format!(
            "label '{k}' is both set and removed; give one of the two"
        ));
    }
    Ok((set, remove))
}

/// `k1=v1,k2=v2`, sorted; `<none>` when empty (kubectl's way).
pub fn display(l: &Labels) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, l: &Labels) -> bool {
        match self {
            Requirement::Eq(k, v) => l.get(k) == Some(v),
            // As in Kubernetes: a member without the key matches `!=` and `notin`.
            Requirement::NotEq(k, v) => l.get(k) != Some(v),
            Requirement::In(k, vs) => l.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => l.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => l.contains_key(k),
            Requirement::NotExists(k) => !l.contains_key(k),
        }
    }
}

/// A label selector: requirements that must all hold (comma = and).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`
    /// and `!k`, joined by commas.
    pub fn parse(s: &str) -> Result<Selector, String> {
        Self::parse_as(s, true)
    }

    /// [`Selector::parse`] of a stored selector, as it was taken when it
    /// was stored (`KEY in ()` included).
    pub fn parse_stored(s: &str) -> Result<Selector, String> {
        Self::parse_as(s, false)
    }

    fn parse_as(s: &str, strict: bool) -> Result<Selector, String> {
        let bad = |why: &str| {
            format!("invalid selector '{}': {}; use terms like env=prod, env!=dev, 'env in (prod,staging)', 'env notin (dev)', canary or !canary, joined by commas", crate::tunnel::printable(s, 120), crate::tunnel::printable(why, 300))
        };
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if !(0..=1).contains(&depth) {
                return Err(bad("unbalanced parentheses"));
            }
        }
        if depth != 0 {
            return Err(bad("unbalanced parentheses"));
        }
        terms.push(&s[start..]);
        let mut reqs = Vec::new();
        for t in terms {
            let t = t.trim();
            if t.is_empty() {
                return Err(bad("empty term"));
            }
            reqs.push(Self::term(t, strict).map_err(|e| bad(&e))?);
        }
        Ok(Selector(reqs))
    }

    fn term(t: &str, strict: bool) -> Result<Requirement, String> {
        let key = |k: &str| -> Result<String, String> {
            let k = k.trim();
            validate_key(k)?;
            Ok(k.to_string())
        };
        let value = |k: &str, v: &str| -> Result<String, String> {
            let v = v.trim();
            validate_value(k, v)?;
            Ok(v.to_string())
        };
        if let Some(k) = t.strip_prefix('!') {
            return Ok(Requirement::NotExists(key(k)?));
        }
        if let Some((k, v)) = t.split_once("!=") {
            let k = key(k)?;
            let v = value(&k, v)?;
            return Ok(Requirement::NotEq(k, v));
        }
        if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            let k = key(k)?;
            let v = value(&k, v)?;
            return Ok(Requirement::Eq(k, v));
        }
        if let Some(open) = t.find('(') {
            let close = t
                .strip_suffix(')')
                .ok_or_else(|| format!("'{t}' must end with ')'"))?;
            let head = &t[..open];
            let mut words = head.split_whitespace();
            let (k, op) = match (words.next(), words.next(), words.next()) {
                (Some(k), Some(op), None) => (key(k)?, op),
                _ => return Err(format!("'{t}' is not 'KEY in (…)' or 'KEY notin (…)'")),
            };
            // `env in ()` selects nothing (Kubernetes refuses it): a
            // deny rule with it was taken and denied no one. Refused in
            // new selectors only: a rule stored with one before still
            // reads as it did (unreadable, it would deny everything).
            if strict && close[open + 1..].trim().is_empty() {
                return Err(format!(
                    "'{t}' names no value: list at least one, like '{} {op} (a,b)'",
                    k
                ));
            }
            let set: BTreeSet<String> = close[open + 1..]
                .split(',')
                .map(|v| value(&k, v))
                .collect::<Result<_, _>>()?;
            return match op {
                "in" => Ok(Requirement::In(k, set)),
                "notin" => Ok(Requirement::NotIn(k, set)),
                _ => Err(format!("unknown operator '{op}' (use in or notin)")),
            };
        }
        Ok(Requirement::Exists(key(t)?))
    }

    /// Whether labels `l` satisfy every requirement (an empty selector
    /// matches everything).
    pub fn matches(&self, l: &Labels) -> bool {
        self.0.iter().all(|r| r.matches(l))
    }
}

/// Checks labels that came over the control socket (the CLI checked them
/// too; the hub does not trust that).
pub fn check(l: &Labels) -> Result<(), String> {
    l.iter()
        .try_for_each(|(k, v)| validate_settable_key(k).and_then(|_| validate_value(k, v)))
}

/// The hub's side of `cluster label`: one registry transaction; answers
/// the member's labels after the change.
pub fn apply(
    store: &dyn super::store::Store,
    name: &str,
    set: Labels,
    remove: &[String],
) -> Result<Labels, String> {
    check(&set)?;
    let r = store.update_member(name, &mut |m| {
        for k in remove {
            m.labels.remove(k);
        }
        m.labels.extend(set.clone());
        true
    });
    match r {
        Ok(Some(m)) => Ok(m.labels),
        Ok(None) => Err(format!(
            "cluster '{name}' is not registered on this hub; register it with 'towerctl cluster add {name}'"
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_mean_what_they_mean_in_kubernetes() {
        let prod_eu = labels(&[("env", "prod"), ("region", "eu")]);
        let staging = labels(&[("env", "staging"), ("canary", "")]);
        let bare = Labels::new();
        let cases: &[(&str, [bool; 3])] = &[
            ("env=prod", [true, false, false]),
            ("env==prod", [true, false, false]),
            ("env!=prod", [false, true, true]),
            ("env in (prod, staging)", [true, true, false]),
            ("env notin (prod)", [false, true, true]),
            ("canary", [false, true, false]),
            ("!canary", [true, false, true]),
            ("env=prod,region=eu", [true, false, false]),
            ("env in (prod,staging),!canary", [true, false, false]),
            ("", [true, true, true]),
        ];
        for (sel, want) in cases {
            let s = if sel.is_empty() {
                Selector::default()
            } else {
                Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"))
            };
            let got = [s.matches(&prod_eu), s.matches(&staging), s.matches(&bare)];
            assert_eq!(&got, want, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_say_why() {
        for bad in [
            "env in (prod",
            "env in prod)",
            "=prod",
            "env=a b",
            "env,,x",
            "env within (a)",
            "in (a)",
            "-env",
            "env in ()",
            "env notin ( )",
        ] {
            let e = Selector::parse(bad).expect_err(bad);
            assert!(e.contains("invalid selector"), "{bad}: {e}");
        }
        // `env=` is an empty value, which Kubernetes allows.
        assert_eq!(
            Selector::parse("env="),
            Ok(Selector(vec![Requirement::Eq("env".into(), String::new())]))
        );
    }

    #[test]
    fn label_changes_read_like_kubectl_label() {
        let args: Vec<String> = ["env=staging", "region-", "example.com/tier=gold"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (set, remove) = parse_changes(&args).unwrap();
        assert_eq!(
            set,
            labels(&[("env", "staging"), ("example.com/tier", "gold")])
        );
        assert_eq!(remove, vec!["region".to_string()]);
        assert!(parse_changes(&["env".into()]).is_err());
        assert!(parse_changes(&["env=a".into(), "env-".into()]).is_err());
        for own in [
            "towerctl.io/name=beta",
            "towerctl.io/x=1",
            "eu.towerctl.io/x=1",
        ] {
            let e = parse_pair(own).unwrap_err();
            assert!(e.contains("towerctl's own"), "{own}: {e}");
        }
        assert!(parse_pair("towerctl.io.example.com/x=1").is_ok());
        assert!(parse_pair("mytowerctl.io/x=1").is_ok());
        // A label set before this check can still be removed.
        assert_eq!(
            parse_changes(&["towerctl.io/name-".to_string()]).unwrap().1,
            vec!["towerctl.io/name".to_string()]
        );
        let mut forged = Labels::new();
        forged.insert(NAME_LABEL.into(), "alpha".into());
        assert!(check(&forged).is_err());
        assert_eq!(selectable(&forged, "beta")[NAME_LABEL], "beta");
        assert!(parse_pair("Bad Key=x").is_err());
        assert!(parse_pair("k=-x").is_err());
        assert_eq!(display(&set), "env=staging,example.com/tier=gold");
        assert_eq!(display(&Labels::new()), "<none>");
    }
}
