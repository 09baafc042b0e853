//! `towerctl operator add|list|rm` (on the hub) and `towerctl login` (on an
//! operator's machine).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::exit;
use super::https::{self, Trust};
use super::hub::hub_call;
use crate::daemon::control::{OperatorAdded, OperatorInfo, Request};
use crate::daemon::fmt::fmt_unix;
use crate::paths;
use crate::secrets::{self, Backend};

pub async fn add(name: &str, groups: Vec<String>) -> Result<u8> {
    // Kubernetes' own groups mean what they mean on every member that acts
    // as the operator (`--impersonate`): `system:masters` is cluster-admin
    // there whatever its RBAC says.
    for g in groups.iter().filter(|g| g.starts_with("system:")) {
        eprintln!(
            "warning: group '{g}' is one of Kubernetes' own: on members with --impersonate the operator acts with it{}",
            if g == "system:masters" { " (cluster-admin, past every RBAC rule)" } else { "" }
        );
    }
    let v = hub_call(Request::OperatorAdd {
        name: name.to_string(),
        groups,
    })
    .await?;
    let a: OperatorAdded = serde_json::from_value(v).context("malformed answer from the hub")?;
    eprintln!(
        "operator '{}' added. On the operator's machine, run (the token is shown once):",
        a.name
    );
    // The token in the environment, not in an argument; the leading space
    // keeps the line out of shell history (see `cluster::join_command`).
    // Every part quoted for the shell (the gateway URL is the hub's
    // `--gateway-url` as given): a line to paste runs nothing else.
    use super::cluster::shell_word;
    println!(
        " TOWERCTL_OPERATOR_TOKEN={} towerctl login {} --ca-hash {}",
        shell_word(a.token.expose()),
        shell_word(&a.gateway_url),
        shell_word(&a.ca_hash)
    );
    match a.reaches.as_deref() {
        Some(names) if !names.is_empty() => {
            const SHOWN: usize = 10;
            let mut list = names[..names.len().min(SHOWN)].join(", ");
            if names.len() > SHOWN {
                list.push_str(&format!(" and {} more", names.len() - SHOWN));
            }
            eprintln!(
                "note: the access rules already there let '{}' reach {} member{}: {list} ('towerctl access list' shows the rules)",
                a.name,
                names.len(),
                if names.len() == 1 { "" } else { "s" }
            );
        }
        Some(_) => eprintln!(
            "note: '{}' reaches no member until a rule allows it, for example:\n  towerctl access allow operator:{} --clusters 'env=dev'",
            a.name, a.name
        ),
        None => eprintln!(
            "note: what '{}' reaches is for the access rules to say ('towerctl access list'); a new operator reaches nothing no rule allows",
            a.name
        ),
    }
    Ok(exit::OK)
}

pub async fn list(output: &str) -> Result<u8> {
    let v = hub_call(Request::OperatorList).await?;
    let mut ops: Vec<OperatorInfo> =
        serde_json::from_value(v).context("malformed answer from the hub")?;
    // By name, as `cluster list` is (the registry's order is its own).
    ops.sort_by(|a, b| a.name.cmp(&b.name));
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&ops)?);
        return Ok(exit::OK);
    }
    println!("{:<20} {:<22} GROUPS", "NAME", "CREATED");
    for o in ops {
        // Registry text: escaped (a record edited by hand in etcd).
        println!(
            "{:<20} {:<22} {}",
            crate::tunnel::shown(&o.name),
            fmt_unix(o.created_at),
            crate::tunnel::shown(&o.groups.join(","))
        );
    }
    Ok(exit::OK)
}

pub async fn remove(name: &str) -> Result<u8> {
    let v = hub_call(Request::OperatorRemove {
        name: name.to_string(),
    })
    .await?;
    println!("operator '{name}' removed: its tokens no longer work");
    let rules: Vec<String> = v["rulesNaming"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i.as_u64())
                .map(|i| i.to_string())
                .collect()
        })
        .unwrap_or_default();
    if !rules.is_empty() {
        eprintln!(
            "note: access rule(s) #{} (allow or deny) still name operator:{name}: an operator added again under this name is under them (as when replacing a token); if '{name}' is gone for good, remove them: towerctl access rm {}",
            rules.join(", #"),
            rules.join("; towerctl access rm ")
        );
    }
    Ok(exit::OK)
}

/// A hub this machine has logged in to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    pub gateway_url: String,
    pub ca_pem: String,
    pub operator: String,
    /// Where the token is kept.
    pub backend: Backend,
}

fn logins_path() -> std::path::PathBuf {
    paths::config_dir().join("logins.json")
}

/// The saved logins. A file that cannot be read or parsed is an error,
/// never an empty list: the next login would otherwise replace it and lose
/// every other login (whose tokens `logout` could then not find).
pub fn logins() -> Result<Vec<Login>> {
    let path = logins_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot read '{}': {e}", path.display()),
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "'{}' is not valid JSON: fix it by hand, or move it aside and log in again",
            path.display()
        )
    })
}

/// Held (`flock`) for one read-change-write of the logins: two logins at
/// once each read the old list and wrote it with their own entry alone,
/// and one token stayed in its store with no login naming it.
fn lock_logins() -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let dir = paths::config_dir();
    paths::ensure_private_dir(&dir)?;
    let path = dir.join("logins.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open '{}'", path.display()))?;
    // SAFETY: flock on a valid, open descriptor, released when it closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot lock '{}': {e}", path.display());
    }
    Ok(f)
}

fn save_logins(l: &[Login]) -> Result<()> {
    paths::write_atomic(&logins_path(), &serde_json::to_vec_pretty(l)?, 0o600)
}

/// A gateway URL as a login keeps it: as the URL parser writes it (host
/// in lower case, an IPv6 address shortened, the default port left out),
/// no trailing `/`.
pub fn canonical_gateway(g: &str) -> String {
    match url::Url::parse(g) {
        Ok(u) => u.as_str().trim_end_matches('/').to_string(),
        Err(_) => g.trim_end_matches('/').to_string(),
    }
}

/// Two spellings of one gateway (`https://[0:0::1]:9443/` and
/// `https://[::1]:9443`).
pub fn same_gateway(a: &str, b: &str) -> bool {
    canonical_gateway(a) == canonical_gateway(b)
}

/// The login for `gateway` (or the most recent one).
pub fn find_login(gateway: Option<&str>) -> Result<Option<Login>> {
    let all = logins()?;
    Ok(match gateway {
        Some(g) => all.into_iter().find(|l| same_gateway(&l.gateway_url, g)),
        None => all.into_iter().last(),
    })
}

/// The token of a login, from wherever it was kept.
pub fn login_token(l: &Login) -> Result<String> {
    secrets::load(l.backend, &l.gateway_url)
}

pub async fn login(
    gateway: &str,
    token: &str,
    ca_hash: Option<&str>,
    insecure: bool,
) -> Result<u8> {
    let token = &super::token_text(
        "the operator token (--token, TOWERCTL_OPERATOR_TOKEN)",
        token,
    )?;
    let gateway = canonical_gateway(gateway);
    let (status, body) = https::get(
        &format!("{gateway}/towerctl/v1/ca.crt"),
        Trust::FetchCaOnly,
        None,
    )
    .await?;
    if status != 200 {
        bail!("'{gateway}' did not serve a towerctl CA (HTTP {status}); is it a towerctl gateway URL?");
    }
    let served = String::from_utf8(body.to_vec()).context("the gateway CA is not text")?;
    // Hashed, trusted and kept: the same single certificate, re-encoded.
    let der = crate::daemon::tls::single_certificate(&served).map_err(|e| {
        anyhow::anyhow!(
            "'{gateway}' did not serve one CA certificate ({e}); is it a towerctl gateway URL?"
        )
    })?;
    let actual = crate::daemon::tls::der_hash(&der);
    let ca_pem = crate::daemon::tls::certificate_pem(&der);
    match (ca_hash, insecure) {
        (Some(expected), _) => {
            if !expected.trim().eq_ignore_ascii_case(&actual) {
                return Err(super::error::CliError::Tls(format!("the gateway's CA does not match --ca-hash: expected '{expected}', the gateway presented '{actual}'. Check the URL; if the hub's CA changed, the hub's admin reads the new hash in 'towerctl status' on the hub, and your token still logs in with it")).into());
            }
        }
        (None, true) => eprintln!("warning: --insecure-skip-ca-hash: trusting the CA the gateway presented ({actual}) without checking it"),
        (None, false) => bail!("missing --ca-hash: pass the CA hash printed by 'towerctl operator add' on the hub (the gateway presents {actual}), or --insecure-skip-ca-hash to trust it unchecked"),
    }
    let (status, body) = https::get(
        &format!("{gateway}/towerctl/v1/whoami"),
        Trust::Ca(&ca_pem),
        Some(token),
    )
    .await?;
    if status == 401 {
        return Err(super::error::CliError::Refused("the gateway refused the token (unknown or removed operator); ask the hub operator for a new one with 'towerctl operator add'".into()).into());
    }
    if status != 200 {
        bail!(
            "the gateway answered HTTP {status} to whoami: {}",
            crate::tunnel::printable(String::from_utf8_lossy(&body).trim(), 300)
        );
    }
    let who: serde_json::Value =
        serde_json::from_slice(&body).context("malformed whoami answer")?;
    // The gateway's words (with --insecure-skip-ca-hash, whoever answered):
    // saved and shown, so printable and bounded.
    let operator = crate::tunnel::printable(who["name"].as_str().unwrap_or("?"), 100);
    let _locked = lock_logins()?;
    // Read first: a list that cannot be read fails the login before the
    // token store is touched (the new token replaced the saved one, and
    // the entry still named the operator before).
    let mut all = logins()?;
    let backend = secrets::save(&gateway, token)?;
    // The previous login's token, kept in another store (a file over ssh,
    // the Secret Service on the desktop), goes too: `logout` removes only
    // what the current entry names.
    // So does one saved under another spelling of the URL.
    let previous = all
        .iter()
        .find(|l| same_gateway(&l.gateway_url, &gateway))
        .map(|l| (l.backend, l.gateway_url.clone()))
        .filter(|(b, url)| *b != backend || *url != gateway);
    all.retain(|l| !same_gateway(&l.gateway_url, &gateway));
    all.push(Login {
        gateway_url: gateway.clone(),
        ca_pem,
        operator: operator.clone(),
        backend,
    });
    save_logins(&all)?;
    let others: Vec<&str> = all
        .iter()
        .map(|l| l.gateway_url.as_str())
        .filter(|g| !same_gateway(g, &gateway))
        .collect();
    if let Some((old, url)) = previous {
        secrets::delete(old, &url);
        // And its token file of the old name, kept under that spelling.
        secrets::forget_legacy(&url, &others);
    }
    secrets::forget_legacy(&gateway, &others);
    println!(
        "logged in to {gateway} as '{operator}' (token kept in {})",
        backend.describe()
    );
    println!("next: towerctl use CLUSTER");
    Ok(exit::OK)
}

pub async fn logout(gateway: Option<&str>) -> Result<u8> {
    let Some(l) = find_login(gateway)? else {
        bail!(
            "not logged in{}",
            gateway.map(|g| format!(" to '{g}'")).unwrap_or_default()
        );
    };
    let _locked = lock_logins()?;
    secrets::delete(l.backend, &l.gateway_url);
    let mut all = logins()?;
    all.retain(|x| x.gateway_url != l.gateway_url);
    save_logins(&all)?;
    let others: Vec<&str> = all.iter().map(|x| x.gateway_url.as_str()).collect();
    secrets::forget_legacy(&l.gateway_url, &others);
    println!("logged out of {}", l.gateway_url);
    let left = contexts_through(&l.gateway_url);
    if !left.is_empty() {
        let shown: Vec<String> = left
            .iter()
            .take(10)
            .map(|c| crate::tunnel::shown(c).into_owned())
            .collect();
        eprintln!(
            "note: kubeconfig context(s) {}{} still reach kubectl through this login: they fail ('not logged in') until you log in again; 'kubectl config delete-context NAME' removes one",
            shown.join(", "),
            if left.len() > 10 { ", …" } else { "" }
        );
    }
    Ok(exit::OK)
}

/// The contexts in the kubeconfig files in effect whose user is towerctl's
/// credential plugin for `gateway`.
fn contexts_through(gateway: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in super::kubeconfig::files(None) {
        let Ok(doc) = super::kubeconfig::read(&f) else {
            continue;
        };
        let list = |key: &str| {
            doc.get(key)
                .and_then(|v| v.as_array())
                .map_or(&[][..], Vec::as_slice)
        };
        let users: Vec<String> = list("users")
            .iter()
            .filter(|u| {
                let args: Vec<&str> = u["user"]["exec"]["args"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                args.first() == Some(&"credential")
                    && args
                        .windows(2)
                        .any(|w| w[0] == "--gateway" && same_gateway(w[1], gateway))
            })
            .filter_map(|u| u["name"].as_str().map(str::to_string))
            .collect();
        for c in list("contexts") {
            let (Some(name), Some(user)) = (c["name"].as_str(), c["context"]["user"].as_str())
            else {
                continue;
            };
            if users.iter().any(|u| u == user) && !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gateway_is_one_login_however_its_url_is_spelled() {
        for (a, b) in [
            ("https://[0:0:0:0:0:0:0:1]:9443/", "https://[::1]:9443"),
            ("https://Hub.Example:9443", "https://hub.example:9443/"),
            ("https://hub.example:443", "https://hub.example"),
        ] {
            assert!(same_gateway(a, b), "{a} {b}");
        }
        assert!(!same_gateway("https://hub:9443", "https://hub:9444"));
        assert!(!same_gateway("https://hub-a:9443", "https://hub-b:9443"));
        assert_eq!(
            canonical_gateway("https://[0:0::1]:32989/"),
            "https://[::1]:32989"
        );
    }
}
