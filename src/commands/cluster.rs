//! `towerctl cluster add|list`.

use anyhow::{Context, Result};

use super::exit;
use crate::daemon::control::{self, ClusterAdded, Request};
use crate::daemon::hub::validate_name;
use crate::paths;

fn no_hub() -> anyhow::Error {
    anyhow::anyhow!("no hub is running on this machine: start one with 'towerctl up'")
}

pub async fn add(name: &str, output: &str) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let socket = paths::hub_socket();
    if !control::is_up(&socket).await {
        return Err(no_hub());
    }
    let v = control::call(
        &socket,
        Request::ClusterAdd {
            name: name.to_string(),
        },
    )
    .await?;
    let added: ClusterAdded = serde_json::from_value(v).context("malformed answer from the hub")?;
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": added.name,
                "token": added.token,
                "hub": added.tunnel_url,
                "hubKey": added.hub_key,
            }))?
        );
        return Ok(exit::OK);
    }
    eprintln!("cluster '{}' registered. Run this in the member (the token is shown once; a new 'cluster add' replaces it):", added.name);
    println!("{}", join_command(&added));
    Ok(exit::OK)
}

/// The one command a member runs to join (holds the token: shown once).
pub fn join_command(added: &ClusterAdded) -> String {
    format!(
        "towerctl join {} --token {} --hub {} --hub-key {}",
        added.name, added.token, added.tunnel_url, added.hub_key
    )
}

pub async fn list() -> Result<u8> {
    let Some(s) = super::hub::hub_status().await else {
        return Err(no_hub());
    };
    println!(
        "{:<20} {:<16} {:<22} {:>9}",
        "NAME", "STATE", "REMOTE", "RTT"
    );
    for c in s.clusters {
        println!(
            "{:<20} {:<16} {:<22} {:>9}",
            c.name,
            c.state,
            c.remote.unwrap_or_else(|| "-".into()),
            c.rtt_ms
                .map(|r| format!("{r:.2}ms"))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(exit::OK)
}

pub async fn remove(name: &str) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let socket = paths::hub_socket();
    if !control::is_up(&socket).await {
        return Err(no_hub());
    }
    control::call(
        &socket,
        Request::ClusterRemove {
            name: name.to_string(),
        },
    )
    .await?;
    println!("cluster '{name}' removed");
    Ok(exit::OK)
}
