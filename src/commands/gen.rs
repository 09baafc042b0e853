//! Shell completions and man pages, generated from the clap definitions.
//! The checked-in copies under `completions/` and `man/` are produced by
//! `towerctl gen-docs .` and a test fails when they are stale.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use super::{exit, Cli};

pub const SHELLS: [Shell; 4] = [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::PowerShell];

fn completion_bytes(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "towerctl", &mut out);
    out
}

/// `towerctl completion SHELL`.
pub fn completion(shell: Shell) -> Result<u8> {
    use std::io::Write;
    std::io::stdout().write_all(&completion_bytes(shell))?;
    Ok(exit::OK)
}

fn file_name(shell: Shell) -> &'static str {
    match shell {
        Shell::Bash => "towerctl.bash",
        Shell::Zsh => "_towerctl",
        Shell::Fish => "towerctl.fish",
        Shell::PowerShell => "_towerctl.ps1",
        _ => "towerctl.elvish",
    }
}

/// Writes `completions/` and `man/` under `root`.
pub fn gen_docs(root: &Path) -> Result<u8> {
    let comp = root.join("completions");
    let man = root.join("man");
    std::fs::create_dir_all(&comp)
        .with_context(|| format!("cannot create '{}'", comp.display()))?;
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create '{}'", man.display()))?;
    for shell in SHELLS {
        std::fs::write(comp.join(file_name(shell)), completion_bytes(shell))?;
    }
    let cmd = Cli::command();
    write_man(&cmd, "towerctl", &man)?;
    Ok(exit::OK)
}

/// One page per command and subcommand (`towerctl-cluster-add.1`, …).
fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
    // clap's `help` subcommand gets no page of its own: not listed either.
    let page = cmd
        .clone()
        .name(name.to_string())
        .disable_help_subcommand(true);
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
