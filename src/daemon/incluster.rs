//! In-cluster credentials for an agent that runs as a pod: the API server
//! from `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`, the service
//! account's token and CA from its mounted directory
//! (`--serviceaccount-dir` or `TOWERCTL_SERVICEACCOUNT_DIR`, default
//! [`DEFAULT_DIR`]). Like client-go, the token file is re-read as the
//! kubelet rotates it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the kubelet mounts a pod's service account.
pub const DEFAULT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The API server URL from the in-cluster environment, if set.
fn server_from_env() -> Option<Result<String>> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty())?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Some(server_url(&host, &port))
}

fn server_url(host: &str, port: &str) -> Result<String> {
    let port: u16 = port.parse().map_err(|_| {
        anyhow::anyhow!("KUBERNETES_SERVICE_PORT '{port}' is not a port number: unset it or fix the pod's environment")
    })?;
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("https://[{ip}]:{port}"),
        _ => format!("https://{host}:{port}"),
    })
}

/// The member's client configuration when no `--kubeconfig` is given:
/// `KUBECONFIG`/`~/.kube/config` as kubectl finds them, else in-cluster
/// when `KUBERNETES_SERVICE_HOST` is set (or when a service-account
/// directory is given explicitly); and whether it is the pod's service
/// account. As kubectl: in a CI runner's or a dev container's pod whose
/// `~/.kube/config` names the member, the pod's own cluster (and its
/// service account's rights) was served as the member.
pub async fn infer(sa_dir: Option<&Path>) -> Result<(kube::Config, bool)> {
    let explicit = sa_dir.is_some();
    // A `~/.kube/config` that reads as one (an empty or broken file is
    // none, as for kube's own inference).
    let kubeconfig_set = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || dirs::home_dir().is_some_and(|h| {
            kube::config::Kubeconfig::read_from(h.join(".kube").join("config"))
                .is_ok_and(|k| !k.contexts.is_empty())
        });
    match server_from_env() {
        Some(server) if explicit || !kubeconfig_set => {
            let dir = sa_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
            config(&server?, &dir).await.map(|c| (c, true))
        }
        None if explicit => bail!("--serviceaccount-dir is given but KUBERNETES_SERVICE_HOST is not set: set KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT to the member's API server, or pass --kubeconfig instead"),
        _ => kube::Config::infer()
            .await
            .map_err(without_snippet)
            .map(|c| (c, false))
            .context("no member API server credentials found: pass --kubeconfig, set KUBECONFIG, or run the agent in a pod with a service account"),
    }
}

/// A kube configuration error in words, without the YAML parser's snippet
/// of the lines around a syntax error: a kubeconfig holds tokens and keys,
/// and the words go to the terminal and the agent's log. Line and column
/// say where to look.
pub fn without_snippet<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = at {
        if let Some(kube::config::KubeconfigError::Parse(p)) = c.downcast_ref() {
            return anyhow::anyhow!(
                "failed to parse the kubeconfig's YAML: {}",
                crate::tunnel::printable(&p.without_snippet().to_string(), 300)
            );
        }
        at = c.source();
    }
    anyhow::Error::new(e)
}

/// A client configuration for `server` with the service account in `dir`.
pub async fn config(server: &str, dir: &Path) -> Result<kube::Config> {
    let token = dir.join("token");
    let ca = dir.join("ca.crt");
    for (f, what) in [(&token, "token"), (&ca, "CA certificate")] {
        if !f.is_file() {
            bail!("no service-account {what} at '{}': run the agent in a pod whose service account token is mounted (automountServiceAccountToken: true), or pass --kubeconfig", f.display());
        }
    }
    let namespace = std::fs::read_to_string(dir.join("namespace"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "service-account", "user": {"tokenFile": token}}],
        "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "service-account", "namespace": namespace}}],
        "current-context": "in-cluster",
    });
    let kc: kube::config::Kubeconfig =
        serde_json::from_value(kc).context("in-cluster configuration")?;
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| {
            format!(
                "the service account in '{}' is not usable for {server}",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_bracket_ipv6() {
        assert_eq!(
            super::server_url("10.0.0.1", "443").unwrap(),
            "https://10.0.0.1:443"
        );
        assert_eq!(
            super::server_url("fd00::1", "6443").unwrap(),
            "https://[fd00::1]:6443"
        );
        assert!(super::server_url("h", "x").is_err());
    }
}
