//! `towerctl credential`: the kubectl exec credential plugin. Kubeconfig
//! entries written by `towerctl use` call it, so no token sits in the
//! kubeconfig itself.

use std::path::Path;

use anyhow::{Context, Result};

use super::exit;

pub fn run(token_file: &Path) -> Result<u8> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read the operator token '{}': is the hub installed on this machine? Run 'towerctl use CLUSTER' again", token_file.display()))?;
    let token = token.trim();
    if token.is_empty() {
        anyhow::bail!(
            "the operator token file '{}' is empty; run 'towerctl use CLUSTER' again",
            token_file.display()
        );
    }
    let cred = serde_json::json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": { "token": token },
    });
    println!("{cred}");
    Ok(exit::OK)
}
