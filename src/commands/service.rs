//! `towerctl service install hub|agent NAME`: a systemd user unit that runs
//! the daemon in the foreground with readiness notification.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::{exit, HubArgs};
use crate::daemon::agent;
use crate::paths;

fn unit_dir() -> PathBuf {
    // systemd's user units live in $XDG_CONFIG_HOME/systemd/user.
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v).join("systemd").join("user"),
        None => dirs::home_dir()
            .unwrap_or_default()
            .join(".config/systemd/user"),
    }
}

/// One word of a unit's `ExecStart=`, taken as written: systemd expands
/// `%` specifiers in every word and `$VAR`/`${VAR}` in the arguments (not
/// in the executable's path), even inside quotes (`%%` and `$$` are its
/// escapes); a control character (a newline would start a directive of its
/// own) is refused.
fn quote(s: &str) -> Result<String> {
    quote_word(s, true)
}

fn quote_word(s: &str, argument: bool) -> Result<String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        bail!(
            "'{}' holds a control character ({c:?}), which a systemd unit cannot carry: fix the value",
            crate::tunnel::shown(s)
        );
    }
    let s = s.replace('%', "%%");
    let s = match argument {
        true => s.replace('$', "$$"),
        false => s,
    };
    Ok(
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,%".contains(c))
        {
            s
        } else {
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        },
    )
}

fn write_unit(
    name: &str,
    description: &str,
    args: &[String],
    prevent_restart_on_auth: bool,
) -> Result<u8> {
    let exe = crate::paths::stable_exe().context("cannot find the towerctl executable")?;
    let exec = std::iter::once(quote_word(&exe.display().to_string(), false))
        .chain(args.iter().map(|a| quote(a)))
        .collect::<Result<Vec<_>>>()?
        .join(" ");
    let mut unit = format!(
        "# Written by 'towerctl service install'.\n[Unit]\nDescription={description}\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nType=notify\nExecStart={exec}\nRestart=on-failure\nRestartSec=5\n"
    );
    // Exit 2: the command line itself is wrong (a flag an older towerctl
    // does not know after a downgrade, say): every restart fails the same
    // way, so the unit stops and `systemctl status` shows clap's message.
    // Exit 4: the hub refused the agent (revoked, bad key): restarting
    // cannot help either. Other failures (a port still taken, etcd not up
    // yet at boot) may pass, and are retried every 5 s.
    unit.push_str(if prevent_restart_on_auth {
        "RestartPreventExitStatus=2 4\n"
    } else {
        "RestartPreventExitStatus=2\n"
    });
    unit.push_str("\n[Install]\nWantedBy=default.target\n");
    let path = unit_dir().join(format!("{name}.service"));
    paths::write_atomic(&path, unit.as_bytes(), 0o644)?;
    println!("wrote {}", path.display());
    println!("next: systemctl --user daemon-reload && systemctl --user enable --now {name}");
    Ok(exit::OK)
}

pub fn install_hub(a: &HubArgs) -> Result<u8> {
    let args = a.daemon_args();
    write_unit(
        "towerctl-hub",
        "towerctl hub (tunnels and gateway)",
        &args,
        false,
    )
}

pub fn install_agent(name: &str) -> Result<u8> {
    crate::daemon::names::validate_name(name).map_err(anyhow::Error::msg)?;
    let cfg = agent::config_path(name);
    if !cfg.exists() {
        bail!("no agent configuration for '{name}' at '{}': run 'towerctl join {name} …' first (then 'towerctl leave'-free: the unit reuses its settings)", cfg.display());
    }
    let args = vec![
        "agent".to_string(),
        "run".into(),
        name.to_string(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    write_unit(
        &format!("towerctl-agent-{name}"),
        &format!("towerctl agent for cluster {name}"),
        &args,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn a_units_words_are_taken_as_written() {
        assert_eq!(
            quote("--listen=0.0.0.0:7443").unwrap(),
            "--listen=0.0.0.0:7443"
        );
        // systemd's specifiers and variables, escaped.
        assert_eq!(quote("wss://h/t%2Fx").unwrap(), "wss://h/t%%2Fx");
        assert_eq!(quote("/t${HOME}/").unwrap(), "\"/t$${HOME}/\"");
        assert_eq!(quote("a b\"c\\").unwrap(), "\"a b\\\"c\\\\\"");
        // The executable's path: no variables expanded there.
        assert_eq!(
            super::quote_word("/opt/a$b%/towerctl", false).unwrap(),
            "\"/opt/a$b%%/towerctl\""
        );
        // A newline would start a directive of its own.
        let e = quote("wss://h\nExecStartPre=/bin/touch /tmp/p")
            .unwrap_err()
            .to_string();
        assert!(e.contains("control character"), "{e}");
    }
}
