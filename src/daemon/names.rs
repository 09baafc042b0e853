//! Names the hub accepts for members and operators.

/// Valid cluster names: DNS-label-like, so they are safe in URLs, kubeconfig
/// names and file names.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_name_of("cluster", name)
}

/// The operator the hub creates at first start for its own machine
/// (`towerctl use` there runs as it); it reaches every member whatever
/// the access rules say.
pub const LOCAL_ADMIN: &str = "admin";

/// A DNS-1123 label, as Kubernetes names namespaces: 1–63 of `[a-z0-9-]`,
/// alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && label_chars(s)
}

/// A DNS-1123 subdomain, as Kubernetes' `IsDNS1123Subdomain` takes a pod's
/// or a workload's name: labels of [`is_dns_label`]'s characters joined by
/// dots, at most 253 characters in all (no limit per label); never `.` or
/// `..`.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(label_chars)
}

/// Lower-case letters, digits and `-`, not at either end, not empty.
fn label_chars(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// [`validate_name`] for other kinds of names (`operator`).
pub fn validate_name_of(kind: &str, name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        // Shown escaped and cut: a 100,000-character name made a 100 KB
        // error, and a control character moved the terminal's cursor.
        Err(format!("invalid {kind} name '{}': use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (like a Kubernetes name)", crate::tunnel::escape_for_log(name, 80)))
    }
}

/// Why `group` cannot be an operator's Kubernetes group, if it cannot.
/// Groups reach the member as `Impersonate-Group` header values and are
/// named in access rules: printable ASCII, and no comma, which
/// `--group dev,ops` would make one group on the hub and two on a member
/// that splits the header.
pub fn group_problem(group: &str) -> Option<String> {
    let shown = crate::tunnel::escape_for_log(group, 80);
    if group.is_empty() || group.len() > 253 {
        return Some(format!("invalid group '{shown}': use 1-253 characters"));
    }
    if group.contains(',') {
        return Some(format!(
            "invalid group '{shown}': it contains ','; give each group its own --group (--group dev --group ops)"
        ));
    }
    if group.trim() != group || !group.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Some(format!(
            "invalid group '{shown}': use printable ASCII without leading or trailing spaces"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    /// A name or group that is refused is shown cut and escaped, never
    /// repeated whole (100,000 characters made a 100 KB error).
    #[test]
    fn refused_names_are_shown_short_and_inert() {
        let long = "a".repeat(100_000);
        let e = super::validate_name(&long).unwrap_err();
        assert!(e.len() < 400 && e.contains("100000 bytes"), "{e}");
        let e = super::validate_name("x\u{1b}]0;t\u{7}").unwrap_err();
        assert!(!e.contains('\u{1b}') && e.contains("\\u{1b}"), "{e}");
        let e = super::group_problem(&format!("{long},b")).unwrap();
        assert!(e.len() < 400, "{e}");
        let e = crate::daemon::labels::Selector::parse(&format!("{long} in (")).unwrap_err();
        assert!(e.len() < 1000, "{e}");
    }

    #[test]
    fn groups_are_one_printable_value_each() {
        assert_eq!(super::group_problem("system:masters"), None);
        assert_eq!(super::group_problem("team ops"), None);
        let e = super::group_problem("dev,system:masters").unwrap();
        assert!(e.contains("--group dev --group ops"), "{e}");
        for bad in ["", " ops", "ops ", "a\nb", "caf\u{e9}", &"g".repeat(254)] {
            assert!(super::group_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(super::validate_name("alpha-1").is_ok());
        for bad in ["", "-a", "a-", "Alpha", "a_b", "a.b", &"x".repeat(64)] {
            let e = super::validate_name(bad).unwrap_err();
            assert!(e.contains("invalid cluster name"), "{e}");
        }
        assert!(super::validate_name_of("operator", "Bob")
            .unwrap_err()
            .contains("operator"));
    }
}
