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

/// Background forwards still running (records of dead ones are removed).
pub fn list() -> Vec<Background> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(crate::paths::runtime_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("pf-") && name.ends_with(".json") {
                match std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| serde_json::from_str::<Background>(&s).ok())
                {
                    Some(b) if super::process::alive(b.pid) => v.push(b),
                    _ => {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}
