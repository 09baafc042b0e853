//! Host keys, fingerprints and join tokens.

use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

/// Loads the hub's SSH host key, creating it (ed25519, mode 0600) at first
/// start. The key is the hub's identity: agents pin its fingerprint.
pub fn load_or_create_host_key(
    path: &Path,
    write: impl Fn(&Path, &[u8]) -> Result<()>,
) -> Result<PrivateKey> {
    // A key another user owns could be one they know (planted at a path
    // in a shared directory such as /tmp, given with --key-file): the
    // identity it proves would be theirs too. Root's (a Kubernetes
    // Secret's mounted files) and ours are taken.
    if let Ok(m) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if m.uid() != me && m.uid() != 0 {
            anyhow::bail!(
                "the key file '{}' is owned by uid {}, not by you (uid {me}) or root: whoever owns it may know the key; use a key file of your own (or remove it to have a new one made)",
                path.display(),
                m.uid()
            );
        }
    }
    match std::fs::read_to_string(path) {
        Ok(pem) => PrivateKey::from_openssh(pem.trim())
            .with_context(|| format!("the hub host key '{}' is unreadable; restore it from a backup, or delete it to create a new one (every agent must then be re-joined)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .context("cannot generate the hub host key")?;
            let pem = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .context("cannot encode the hub host key")?;
            write(path, pem.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read '{}'", path.display())),
    }
}

/// `sha256:<base64>` of the public key, like OpenSSH's `SHA256:` form.
pub fn fingerprint(key: &PublicKey) -> String {
    let fp = key.fingerprint(HashAlg::Sha256);
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(fp.as_bytes());
    format!("sha256:{b64}")
}

/// Normalises a user-supplied fingerprint: accepts `sha256:` or `SHA256:`.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let (prefix, rest) = s.split_once(':')?;
    if !prefix.eq_ignore_ascii_case("sha256") || rest.is_empty() {
        return None;
    }
    let rest = rest.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(rest)
        .ok()
        .filter(|b| b.len() == 32)?;
    Some(format!("sha256:{rest}"))
}

/// A new random secret: 32 bytes (256 bits) from the OS CSPRNG, URL-safe.
pub fn new_token(prefix: &str) -> Result<String> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
    ))
}

/// What the hub stores instead of a token. The token is 256 random bits, so
/// a fast hash is enough: there is nothing to brute-force.
/// `sha256:` and the hex digest of `token`: the key operators and join
/// tokens are looked up by (once per gateway request, so it allocates once).
pub fn token_hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(7 + 2 * d.len());
    out.push_str("sha256:");
    push_hex(&mut out, &d);
    out
}

pub fn hex(b: &[u8]) -> String {
    let mut out = String::with_capacity(2 * b.len());
    push_hex(&mut out, b);
    out
}

fn push_hex(out: &mut String, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
}

/// Constant-time comparison of two hashes.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_another_user_owns_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let write = |p: &Path, b: &[u8]| -> Result<()> {
            std::fs::write(p, b)?;
            Ok(())
        };
        let made = load_or_create_host_key(&path, write).unwrap();
        // Ours: taken, the same key.
        let again = load_or_create_host_key(&path, write).unwrap();
        assert_eq!(made.public_key(), again.public_key());
        // Another user's (only root can give a file away).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
        let e = load_or_create_host_key(&path, write).unwrap_err();
        assert!(format!("{e:#}").contains("owned by uid 4242"), "{e:#}");
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        assert!(load_or_create_host_key(&path, write).is_ok());
    }

    #[test]
    fn tokens_are_unique_and_long() {
        let a = new_token("tj_").unwrap();
        let b = new_token("tj_").unwrap();
        assert_ne!(a, b);
        assert!(a.len() >= 3 + 43, "{a}");
        assert_ne!(token_hash(&a), token_hash(&b));
        assert!(ct_eq(&token_hash(&a), &token_hash(&a)));
        assert!(!ct_eq(&token_hash(&a), &token_hash(&b)));
    }

    #[test]
    fn token_hashes_keep_their_stored_form() {
        // Registries hold these: the form must never change.
        assert_eq!(
            token_hash("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn fingerprint_round_trips() {
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let fp = fingerprint(key.public_key());
        assert_eq!(normalize_fingerprint(&fp).as_deref(), Some(fp.as_str()));
        let upper = fp.replacen("sha256", "SHA256", 1);
        assert_eq!(normalize_fingerprint(&upper).as_deref(), Some(fp.as_str()));
        assert_eq!(normalize_fingerprint("sha256:nope"), None);
        assert_eq!(normalize_fingerprint("md5:abc"), None);
    }
}
