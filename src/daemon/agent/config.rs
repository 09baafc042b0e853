//! What `join` saves for an agent, where it lives, and the agent's options.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::paths;

/// An agent's configuration, as `join` saves it (mode 0600: holds the token).
/// Its `Debug` leaves the token and a proxy's password out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub name: String,
    pub hub: String,
    /// Other hubs of the same group (several hubs on etcd), tried in turn
    /// after `hub` when a session ends or an attempt fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_hubs: Vec<String>,
    /// Join token; only needed until the agent's key is registered.
    #[serde(default)]
    pub token: Option<crate::tunnel::Secret>,
    /// The agent's private key (created at first start when missing).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Add the calling operator's identity as `Impersonate-*` headers.
    #[serde(default)]
    pub impersonate: bool,
    /// Pinned hub host key; `None` only when joined with the insecure flag.
    pub hub_key: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    #[serde(default = "default_cap")]
    pub backoff_cap_secs: u64,
    /// Extra dial-policy rules (`--allow`); Kubernetes objects are always allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Push mode listeners, `NAME=ADDR`.
    #[serde(default)]
    pub exposes: Vec<String>,
    /// `auto`, `direct` or `portforward` (see [`PodNetwork`]).
    #[serde(default = "default_pod_network")]
    pub pod_network: String,
    /// Extra CAs (PEM) for a `wss://` hub behind an ingress (`--hub-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_ca: Option<PathBuf>,
    /// `--insecure-skip-tls-verify`: the WebSocket layer only; the host-key
    /// pin still authenticates the hub.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
    /// Serve `/healthz` and `/readyz` here (see [`crate::daemon::probes`]).
    #[serde(default)]
    pub probe_addr: Option<String>,
    /// In-cluster service account directory (see [`crate::daemon::incluster`]).
    #[serde(default)]
    pub serviceaccount_dir: Option<PathBuf>,
    /// The proxy variables `join` ran with (mode 0600: a proxy URL may
    /// carry a password), used when the agent's own environment sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::tunnel::proxy::ProxyVars>,
    /// `--proxy`: the proxy to reach the hub through, whatever the
    /// environment says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<crate::tunnel::Secret>,
    /// The file this configuration was read from (`agent run --config`),
    /// where the join token is removed once the agent's key is registered.
    #[serde(skip)]
    pub saved_at: Option<PathBuf>,
}

fn default_keepalive() -> u64 {
    crate::tunnel::DEFAULT_KEEPALIVE.as_secs()
}
fn default_pod_network() -> String {
    "auto".into()
}

fn default_cap() -> u64 {
    30
}

/// Default place of an agent's private key.
pub fn default_key_path(name: &str) -> PathBuf {
    paths::config_dir()
        .join("agents")
        .join(format!("{name}.key"))
}

pub fn config_path(name: &str) -> PathBuf {
    paths::config_dir()
        .join("agents")
        .join(format!("{name}.json"))
}

/// Agents configured on this machine.
pub fn list_configs() -> Vec<AgentConfig> {
    list_configs_and_unreadable().0
}

/// Agents configured on this machine, and the config files that cannot be
/// read as one (cut short, edited by hand), each with why.
pub fn list_configs_and_unreadable() -> (Vec<AgentConfig>, Vec<(std::path::PathBuf, String)>) {
    let dir = paths::config_dir().join("agents");
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        serde_json::from_str::<AgentConfig>(&s).map_err(|e| e.to_string())
                    }) {
                    Ok(c) => out.push(c),
                    Err(why) => bad.push((path, why)),
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    bad.sort();
    (out, bad)
}

/// Parses an agent-side `NAME=ADDR`.
pub fn parse_agent_expose(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, a)) if !n.is_empty() && a.parse::<std::net::SocketAddr>().is_ok() => Ok((n.to_string(), a.to_string())),
        _ => Err(format!("invalid --expose '{s}': use NAME=ADDR, like db=127.0.0.1:5432 (NAME as given to 'towerctl cluster add --expose')")),
    }
}

/// How the agent reaches pods: by their IPs, through the API server's
/// `pods/portforward` (agents outside the pod network), or IPs first and
/// port-forward when a pod IP cannot be dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    Direct,
    PortForward,
    Auto,
}

impl PodNetwork {
    pub fn parse(s: &str) -> Result<PodNetwork, String> {
        match s {
            "direct" => Ok(PodNetwork::Direct),
            "portforward" => Ok(PodNetwork::PortForward),
            "auto" => Ok(PodNetwork::Auto),
            _ => Err(format!(
                "invalid --pod-network '{s}': use auto, direct or portforward"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Printed with `{:?}` (a future log line, a panic message), an
    /// agent's configuration shows neither its token nor a proxy password.
    #[test]
    fn debug_leaves_the_token_and_proxy_passwords_out() {
        let cfg: super::AgentConfig = serde_json::from_value(serde_json::json!({
            "name": "alpha",
            "hub": "wss://hub:8080/tunnel",
            "token": "tj_topsecret",
            "hub_key": "sha256:x",
            "kubeconfig": null,
            "proxy": {"https": "http://user:pw-sekrit@proxy:3128"},
            "proxy_url": "http://user:url-sekrit@proxy:3128",
        }))
        .unwrap();
        let shown = format!("{cfg:?}");
        for secret in ["tj_topsecret", "pw-sekrit", "url-sekrit"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("alpha") && shown.contains("proxy:3128"),
            "{shown}"
        );
    }
}
