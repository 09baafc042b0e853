//! `towerctl use NAME`: write the `tower-NAME` context and make it current.

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::json;

use std::path::{Path, PathBuf};

use super::{exit, kubeconfig, UseArgs};
use crate::daemon::control::HubStatus;
use crate::paths;

fn previous_file() -> std::path::PathBuf {
    paths::state_dir().join("previous-context")
}

pub async fn run(a: UseArgs) -> Result<u8> {
    let files = kubeconfig::files(a.kubeconfig.as_deref());
    let target = kubeconfig::target(&files);
    let current = kubeconfig::current_context(&files);

    if a.name == "-" {
        let prev = std::fs::read_to_string(previous_file())
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .context("no previous context to return to: 'towerctl use -' works after a 'towerctl use NAME'")?;
        if !kubeconfig::has_context(&files, &prev) {
            bail!("the previous context '{prev}' no longer exists in the kubeconfig");
        }
        let written = kubeconfig::edit(&target, |d| kubeconfig::set_current(d, &prev))?;
        remember(current.as_deref());
        println!("switched to context \"{prev}\" (in {})", written.display());
        return Ok(exit::OK);
    }

    let Some(hub) = super::hub::hub_status().await else {
        bail!("no hub is running on this machine: 'towerctl use' on the hub machine needs 'towerctl up' first");
    };
    if !hub.clusters.iter().any(|c| c.name == a.name) {
        let known: Vec<_> = hub.clusters.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "cluster '{}' is not registered on the hub (known: {}); register it with 'towerctl cluster add {}'",
            a.name,
            if known.is_empty() { "none".to_string() } else { known.join(", ") },
            a.name
        );
    }
    let (name, written) = switch_to(&hub, &a.name, a.kubeconfig.as_deref())?;
    println!("switched to context \"{name}\" (in {})", written.display());
    Ok(exit::OK)
}

/// Writes (merges) the `tower-NAME` context for member `member` of `hub`
/// into the user's kubeconfig and makes it current, remembering the
/// previous context for `towerctl use -`. Returns the context name and the
/// file written. Shared by `towerctl use` and the dashboard's Enter; the
/// caller checks that `member` is registered.
pub fn switch_to(
    hub: &HubStatus,
    member: &str,
    kubeconfig: Option<&Path>,
) -> Result<(String, PathBuf)> {
    let files = kubeconfig::files(kubeconfig);
    let target = kubeconfig::target(&files);
    let current = kubeconfig::current_context(&files);
    let exe = std::env::current_exe().context("cannot find the towerctl executable")?;
    let name = format!("tower-{member}");
    let server = format!(
        "{}/clusters/{}",
        hub.gateway_url.trim_end_matches('/'),
        member
    );
    let ca = base64::engine::general_purpose::STANDARD.encode(hub.ca_pem.as_bytes());
    let written = kubeconfig::edit(&target, |d| {
        kubeconfig::upsert(
            d,
            "clusters",
            "cluster",
            &name,
            json!({
                "server": server,
                "certificate-authority-data": ca,
            }),
        )?;
        kubeconfig::upsert(
            d,
            "users",
            "user",
            &name,
            json!({
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": exe.display().to_string(),
                    "args": ["credential", "--token-file", hub.admin_token_file],
                    "interactiveMode": "Never",
                    "provideClusterInfo": false,
                }
            }),
        )?;
        kubeconfig::upsert(
            d,
            "contexts",
            "context",
            &name,
            json!({
                "cluster": name,
                "user": name,
            }),
        )?;
        kubeconfig::set_current(d, &name)
    })?;
    if current.as_deref() != Some(name.as_str()) {
        remember(current.as_deref());
    }
    Ok((name, written))
}

fn remember(prev: Option<&str>) {
    if let Some(p) = prev {
        let _ = paths::write_atomic(&previous_file(), p.as_bytes(), 0o600);
    }
}
