//! Where towerctl keeps its files.
//!
//! Every location honours the XDG variable first and falls back to `dirs`,
//! so a test (or an operator running two installations side by side) can
//! isolate a whole installation by pointing `HOME` and `XDG_*` at a temp dir.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const APP: &str = "towerctl";

fn xdg(var: &str, fallback: impl FnOnce() -> Option<PathBuf>, rel: &str) -> PathBuf {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        // The XDG spec says relative values are invalid and must be ignored.
        if p.is_absolute() {
            return p.join(APP);
        }
    }
    fallback()
        .or_else(|| dirs::home_dir().map(|h| h.join(rel)))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(APP)
}

/// Configuration: agent definitions, operator credentials.
pub fn config_dir() -> PathBuf {
    xdg("XDG_CONFIG_HOME", dirs::config_dir, ".config")
}

/// Durable data: the hub's store, host key, CA.
pub fn data_dir() -> PathBuf {
    xdg("XDG_DATA_HOME", dirs::data_dir, ".local/share")
}

/// Logs of the background daemons.
pub fn state_dir() -> PathBuf {
    xdg("XDG_STATE_HOME", dirs::state_dir, ".local/state")
}

/// Pid files and control sockets. `XDG_RUNTIME_DIR` when set; otherwise a
/// private directory under the state dir. (Not `/tmp/towerctl-$UID`: a
/// path another user can pre-create is a path another user can own.)
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v).join(APP),
        _ => state_dir().join("run"),
    }
}

/// Creates `dir` (and parents) with mode 0700 when missing.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory '{}'", dir.display()))
}

/// Writes `contents` to `path` atomically (temp file in the same directory,
/// fsync, rename) with the given mode, so a crash never leaves a half-written
/// file and a secret is never briefly world-readable.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_private_dir(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` above is filtered by the umask; make it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("cannot write '{}'", path.display()))
}

/// Path of the hub's control socket.
pub fn hub_socket() -> PathBuf {
    runtime_dir().join("hub.sock")
}

/// Path of an agent's control socket.
pub fn agent_socket(name: &str) -> PathBuf {
    runtime_dir().join(format!("agent-{name}.sock"))
}

/// Path of a daemon's pid file (`hub` or `agent-NAME`).
pub fn pid_file(daemon: &str) -> PathBuf {
    runtime_dir().join(format!("{daemon}.pid"))
}

/// Path of a daemon's log file.
pub fn log_file(daemon: &str) -> PathBuf {
    state_dir().join(format!("{daemon}.log"))
}
