//! Where operator tokens are kept: the OS credential store when one works,
//! else a 0600 file (said once, on stderr).
//!
//! The store is chosen at run time and verified by reading back what was
//! written: on a headless Linux machine the Secret Service has no D-Bus
//! session bus, and the kernel keyring refuses access outside a session
//! keyring (it works inside `keyctl session`, but keeps nothing across a
//! reboot). `TOWERCTL_KEYRING=auto|secret-service|keyutils|keychain|
//! credential-manager|file` forces a choice.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use keyring_core::api::CredentialStore;
use serde::{Deserialize, Serialize};

use crate::paths;

/// Service name under which towerctl's secrets are filed.
const SERVICE: &str = "towerctl";

/// A credential backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    SecretService,
    Keyutils,
    Keychain,
    CredentialManager,
    File,
}

impl Backend {
    pub fn describe(self) -> &'static str {
        match self {
            Backend::SecretService => "the Secret Service keyring",
            Backend::Keyutils => "the kernel keyring (keyutils)",
            Backend::Keychain => "the macOS Keychain",
            Backend::CredentialManager => "the Windows Credential Manager",
            Backend::File => "a private file (mode 0600)",
        }
    }

    fn parse(s: &str) -> Option<Backend> {
        Some(match s {
            "secret-service" => Backend::SecretService,
            "keyutils" => Backend::Keyutils,
            "keychain" => Backend::Keychain,
            "credential-manager" => Backend::CredentialManager,
            "file" => Backend::File,
            _ => return None,
        })
    }
}

fn os_store(b: Backend) -> Result<Arc<CredentialStore>> {
    let store: Arc<CredentialStore> = match b {
        #[cfg(target_os = "linux")]
        Backend::SecretService => zbus_secret_service_keyring_store::Store::new()?,
        #[cfg(target_os = "linux")]
        Backend::Keyutils => linux_keyutils_keyring_store::Store::new()?,
        #[cfg(target_os = "macos")]
        Backend::Keychain => apple_native_keyring_store::keychain::Store::new()?,
        #[cfg(target_os = "windows")]
        Backend::CredentialManager => windows_native_keyring_store::Store::new()?,
        other => bail!("{} is not available on this platform", other.describe()),
    };
    Ok(store)
}

/// The OS stores worth trying here, best first.
fn candidates() -> Vec<Backend> {
    if cfg!(target_os = "linux") {
        let mut v = Vec::new();
        // Without a session bus the Secret Service cannot answer; don't
        // even try (and don't wait for a timeout).
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
            v.push(Backend::SecretService);
        }
        // Not the kernel keyring unless asked for (TOWERCTL_KEYRING=
        // keyutils): it forgets at reboot (and 3 days after logout), and a
        // token is shown once: an operator whose token it kept could not
        // log in again without the admin issuing a new one. The 0600 file
        // follows.
        v
    } else if cfg!(target_os = "macos") {
        vec![Backend::Keychain]
    } else if cfg!(target_os = "windows") {
        vec![Backend::CredentialManager]
    } else {
        vec![]
    }
}

/// The token file of `account` (a gateway URL): its characters that are
/// safe in a file name, then a hash of the whole URL, so that URLs that
/// differ only in the others (`https://hub:9443` and `https://hub/9443`)
/// never share a file, and one gateway's token is never sent to another.
fn file_path(account: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(account.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut p = legacy_file_path(account).into_os_string();
    p.push(format!("-{hex}"));
    p.into()
}

/// Removes `account`'s token file of the old name ([`legacy_file_path`]),
/// once its token was saved again or logged out of, unless one of `others`
/// (the other logins' accounts) has the same old name: the file may be
/// theirs.
pub fn forget_legacy(account: &str, others: &[&str]) {
    let legacy = legacy_file_path(account);
    if !others.iter().any(|o| legacy_file_path(o) == legacy) {
        let _ = std::fs::remove_file(legacy);
    }
}

/// Where tokens were kept before [`file_path`] named them by hash too:
/// read when the new file is missing, until the next login writes it.
fn legacy_file_path(account: &str) -> PathBuf {
    let safe: String = account
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    paths::config_dir().join("credentials").join(safe)
}

fn try_os(b: Backend, account: &str, secret: &str) -> Result<()> {
    let store = os_store(b)?;
    let entry = store.build(SERVICE, account, None)?;
    entry.set_password(secret)?;
    let back = entry.get_password()?;
    if back != secret {
        bail!("read back a different value");
    }
    Ok(())
}

/// Saves `secret` for `account`; returns where it went.
pub fn save(account: &str, secret: &str) -> Result<Backend> {
    let forced = std::env::var("TOWERCTL_KEYRING")
        .ok()
        .filter(|v| !v.is_empty() && v != "auto");
    let order = match forced.as_deref() {
        Some(v) => vec![Backend::parse(v).with_context(|| {
            format!("invalid TOWERCTL_KEYRING '{v}': use auto, secret-service, keyutils, keychain, credential-manager or file")
        })?],
        None => candidates(),
    };
    let mut why = Vec::new();
    for b in order.iter().copied().filter(|b| *b != Backend::File) {
        match try_os(b, account, secret) {
            Ok(()) => return Ok(b),
            Err(e) => why.push(format!("{}: {e}", b.describe())),
        }
    }
    if forced.is_some() && !order.contains(&Backend::File) {
        bail!(
            "cannot store the token in {}: {}",
            order[0].describe(),
            why.join("; ")
        );
    }
    let path = file_path(account);
    paths::write_atomic(&path, secret.as_bytes(), 0o600)?;
    if forced.is_none() {
        eprintln!(
            "note: no usable OS keyring{}; the token is kept in '{}' (mode 0600)",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            },
            path.display()
        );
    }
    Ok(Backend::File)
}

/// Reads the secret of `account` from `backend`.
pub fn load(backend: Backend, account: &str) -> Result<String> {
    if backend == Backend::File {
        let mut path = file_path(account);
        if !path.exists() && legacy_file_path(account).exists() {
            path = legacy_file_path(account);
        }
        let lost = "run the login command again (the admin who ran 'towerctl operator add' gave it; if it is lost, the admin issues a new token with 'towerctl operator rm NAME' and 'towerctl operator add NAME')";
        return match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => bail!(
                "the token file '{}' is empty (cut short, or emptied): {lost}",
                path.display()
            ),
            Ok(s) => Ok(s.trim().to_string()),
            // Still there: its owner or mode is the fix, not a new token.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "cannot read the token file '{}' ({e}): it must be yours and readable by you alone ('chmod 600 {}', and 'chown' it back if another user owns it)",
                path.display(),
                path.display()
            ),
            Err(e) => bail!(
                "cannot read the token file '{}' ({e}): {lost}",
                path.display()
            ),
        };
    }
    // The keyring not reachable from here is not a lost token: said apart,
    // so that nobody reissues a token that is still there.
    let unreachable = |e: &dyn std::fmt::Display| {
        let hint = match backend {
            Backend::SecretService => " (kubectl run outside the desktop session, from cron, CI, tmux or sudo, has no session bus; or the keyring is locked): run it from the session that logged in, unlock the keyring",
            Backend::Keyutils => " (the kernel keyring is per session)",
            _ => " (locked, or access was not granted)",
        };
        anyhow::anyhow!(
            "cannot reach {} to read the token: {e}{hint}, or log in again with TOWERCTL_KEYRING=file to keep the token in a private file",
            backend.describe()
        )
    };
    let store = os_store(backend).map_err(|e| unreachable(&e))?;
    let entry = store
        .build(SERVICE, account, None)
        .map_err(|e| unreachable(&e))?;
    match entry.get_password() {
        Ok(p) => Ok(p),
        Err(keyring_core::Error::NoEntry) => {
            let why = if backend == Backend::Keyutils {
                " (the kernel keyring forgets at reboot and outside its session)"
            } else {
                " (removed from it)"
            };
            bail!("the token is no longer in {}{why}; run the login command again (the admin who ran 'towerctl operator add' gave it; if it is lost, the admin issues a new token with 'towerctl operator rm NAME' and 'towerctl operator add NAME')", backend.describe())
        }
        Err(e) => Err(unreachable(&e)),
    }
}

/// Deletes the secret of `account` (best effort).
pub fn delete(backend: Backend, account: &str) {
    if backend == Backend::File {
        let _ = std::fs::remove_file(file_path(account));
    } else if let Ok(store) = os_store(backend) {
        if let Ok(e) = store.build(SERVICE, account, None) {
            let _ = e.delete_credential();
        }
    }
}

#[cfg(test)]
mod tests {
    /// Gateway URLs that differ only in characters a file name cannot
    /// hold get files of their own.
    #[test]
    fn each_gateway_has_its_own_token_file() {
        let a = super::file_path("https://hub.example:9443");
        let b = super::file_path("https://hub.example/9443");
        assert_eq!(
            super::legacy_file_path("https://hub.example:9443"),
            super::legacy_file_path("https://hub.example/9443")
        );
        assert_ne!(a, b);
        assert_eq!(a, super::file_path("https://hub.example:9443"));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("https___hub.example_9443-"), "{name}");
    }

    /// Left to choose, towerctl never keeps a token where a reboot loses it.
    #[test]
    fn the_kernel_keyring_is_used_only_when_asked_for() {
        assert!(!super::candidates().contains(&super::Backend::Keyutils));
        if cfg!(target_os = "linux") {
            assert_eq!(
                super::Backend::parse("keyutils").unwrap(),
                super::Backend::Keyutils
            );
        }
    }
}
