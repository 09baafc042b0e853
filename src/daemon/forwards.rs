//! Background port-forwards (`towerctl port-forward … --background`): each
//! runs as its own detached `towerctl` process and records itself in the
//! runtime dir, where `status`, `port-forward stop` and the dashboard find it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A background forward, as recorded in the runtime dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Background {
    pub id: String,
    pub pid: u32,
    pub cluster: String,
    pub resource: String,
    pub namespace: String,
    /// `ADDR -> REMOTE` lines.
    pub forwarding: Vec<String>,
}

pub fn record_path(id: &str) -> PathBuf {
    crate::paths::runtime_dir().join(format!("pf-{id}.json"))
}

fn lock_path(id: &str) -> PathBuf {
    crate::paths::runtime_dir().join(format!("pf-{id}.lock"))
}

/// Takes forward `id`'s lock, held for as long as the returned file lives
/// (by the forward's own process, from before its record is written).
pub fn hold(id: &str) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let path = lock_path(id);
    crate::paths::ensure_private_dir(path.parent().unwrap_or(std::path::Path::new("/")))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open '{}': {e}", path.display()))?;
    // SAFETY: flock on a valid, open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            anyhow::bail!("background forward '{id}' is already running");
        }
        anyhow::bail!(
            "cannot lock '{}': {err}; the runtime directory must be on a file system with working locks",
            path.display()
        );
    }
    Ok(f)
}

/// Whether a live process holds forward `id`'s lock.
pub fn held(id: &str) -> bool {
    crate::paths::locked_by_someone(&lock_path(id))
}

/// Removes forward `id`'s record and lock.
pub fn remove(id: &str) {
    let _ = std::fs::remove_file(record_path(id));
    let _ = std::fs::remove_file(lock_path(id));
}

/// Background forwards still running (records of dead ones, and of ones no
/// live process holds, are removed).
pub fn list() -> Vec<Background> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(crate::paths::runtime_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("pf-") && name.ends_with(".json") {
                let id = &name["pf-".len()..name.len() - ".json".len()];
                if !held(id) {
                    remove(id);
                    continue;
                }
                if let Some(b) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| serde_json::from_str::<Background>(&s).ok())
                    .filter(|b| b.id == id && super::process::valid_pid(b.pid))
                {
                    v.push(b);
                }
            }
        }
    }
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}
