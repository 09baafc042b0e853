//! Names the hub accepts for members and operators.

/// Valid cluster names: DNS-label-like, so they are safe in URLs, kubeconfig
/// names and file names.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_name_of("cluster", name)
}

/// [`validate_name`] for other kinds of names (`operator`).
pub fn validate_name_of(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid {kind} name '{name}': use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (like a Kubernetes name)"))
    }
}

#[cfg(test)]
mod tests {
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
