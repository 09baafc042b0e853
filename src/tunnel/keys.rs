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
    load_or_create_key(
        path,
        write,
        "the hub host key",
        "restore it from a backup, or delete it to create a new one (every agent must then be re-joined)",
    )
}

/// Whether a key file of `mode` and `group` may be read by anyone but
/// this process's user. Group read is let pass in one case: a pod's
/// Secret volume with `fsGroup`, where kubelet gives the pod's group read
/// whatever `defaultMode` says, on a read-only mount (every agent pod
/// warned, with a fix it could not apply): the process's own group, read
/// only, on a read-only filesystem. Elsewhere a group of one's own may be
/// everyone's (`users`, `staff`), and a first version let 0640 and even
/// 0660 pass there.
fn readable_by_others(mode: u32, group: u32, read_only_fs: bool) -> bool {
    if mode & 0o007 != 0 {
        return true;
    }
    if mode & 0o070 == 0 {
        return false;
    }
    mode & 0o020 != 0 || !read_only_fs || !in_own_groups(group)
}

/// Whether the filesystem `f` is on is mounted read-only.
fn on_read_only_fs(f: &std::fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fstatvfs on a valid, open descriptor, into a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) } == 0) && st.f_flag & libc::ST_RDONLY != 0
}

/// Whether `gid` is this process's effective group or one of its
/// supplementary groups.
fn in_own_groups(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions; getgroups writes at most
    // `len` entries into a buffer of that many.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let mut groups = vec![0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// [`load_or_create_host_key`] for any key: `what` names it and `fix`
/// says what to do when the file is not a key.
pub fn load_or_create_key(
    path: &Path,
    write: impl Fn(&Path, &[u8]) -> Result<()>,
    what: &str,
    fix: &str,
) -> Result<PrivateKey> {
    // Read from the file opened once (its owner checked on the open file,
    // not looked up apart: no window to swap it in between).
    let read = || -> std::io::Result<(String, u32, u32, u32, bool)> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt;
        let mut f = std::fs::File::open(path)?;
        let m = f.metadata()?;
        let mut pem = String::new();
        f.read_to_string(&mut pem)?;
        Ok((pem, m.uid(), m.mode(), m.gid(), on_read_only_fs(&f)))
    };
    match read() {
        Ok((pem, owner, mode, group, read_only)) => {
            if readable_by_others(mode, group, read_only) {
                tracing::warn!(
                    "{what} '{}' may be read by others (mode {:o}): make it private (chmod 600 '{}')",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if planted(owner, me, shared_dir(path)) {
                anyhow::bail!(
                    "the key file '{}' is owned by uid {owner}, not by you (uid {me}) or root, in a directory anyone may write to: whoever put it there may know the key; use a key file of your own in a private directory (or remove it to have a new one made)",
                    path.display()
                );
            }
            PrivateKey::from_openssh(pem.trim()).with_context(|| {
                format!("{what} '{}' cannot be read as a key; {fix}", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .with_context(|| format!("cannot generate {what}"))?;
            let pem = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .with_context(|| format!("cannot encode {what}"))?;
            write(path, pem.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read '{}'", path.display())),
    }
}

/// Whether a key file may have been put there by someone else who knows
/// it: owned by another user than us and root, in a directory anyone may
/// write to (`/tmp`, given with `--key-file`). A file another user owns in
/// a directory that is not shared was put there by whoever administers it
/// (a bind mount, a secrets injector running as its own uid).
fn planted(owner: u32, me: u32, dir_shared: bool) -> bool {
    owner != me && owner != 0 && dir_shared
}

/// Whether the directory holding `path` is writable by everyone.
fn shared_dir(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o002 != 0)
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
    fn a_key_readable_by_its_own_group_on_a_read_only_mount_is_private_enough() {
        // SAFETY: getegid has no preconditions.
        let mine = unsafe { libc::getegid() };
        let not_mine = (1..u32::MAX - 1)
            .map(|g| mine.wrapping_add(g))
            .find(|g| !in_own_groups(*g))
            .unwrap();
        assert!(!readable_by_others(0o100600, mine, false));
        // A pod's Secret volume with fsGroup: 0440, the pod's own group,
        // a read-only mount.
        assert!(!readable_by_others(0o100440, mine, true));
        assert!(readable_by_others(0o100440, not_mine, true));
        // A group of one's own on a writable disk may be everyone's
        // (`users`); group-writable never passes.
        assert!(readable_by_others(0o100640, mine, false));
        assert!(readable_by_others(0o100460, mine, true));
        assert!(readable_by_others(0o100604, mine, true));
    }

    #[test]
    fn a_key_file_another_user_put_in_a_shared_directory_is_refused() {
        // Another user's, in /tmp: refused. Ours, root's, or another user's
        // in a directory only its administrator writes (a bind mount, a
        // secrets injector with its own uid): taken.
        assert!(planted(4242, 1000, true));
        assert!(!planted(4242, 1000, false));
        assert!(!planted(1000, 1000, true));
        assert!(!planted(0, 1000, true));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let write = |p: &Path, b: &[u8]| -> Result<()> {
            std::fs::write(p, b)?;
            Ok(())
        };
        let made = load_or_create_host_key(&path, write).unwrap();
        let again = load_or_create_host_key(&path, write).unwrap();
        assert_eq!(made.public_key(), again.public_key());
        assert!(!shared_dir(&path));
        // As root, the whole path: a file given away in a directory made
        // writable by all.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
        assert!(load_or_create_host_key(&path, write).is_ok());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = load_or_create_host_key(&path, write).unwrap_err();
        assert!(format!("{e:#}").contains("owned by uid 4242"), "{e:#}");
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_named_with_its_callers_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.key");
        std::fs::write(&path, "").unwrap();
        let write = |_: &Path, _: &[u8]| -> Result<()> { unreachable!("the file exists") };
        let e =
            load_or_create_key(&path, write, "the agent key", "run cluster rotate").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("the agent key '") && e.contains("run cluster rotate") && !e.contains("hub"),
            "{e}"
        );
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
