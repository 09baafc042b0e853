//! `towerctl status`: the hub and the agents on this machine.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::{exit, StatusArgs};
use crate::daemon::agent;
use crate::daemon::control::{self, AgentState, AgentStatus, Request};
use crate::daemon::fmt::humanize;
use crate::paths;

fn time(t: Option<u64>) -> serde_json::Value {
    t.map(|t| json!(crate::daemon::fmt::fmt_unix(t)))
        .unwrap_or(serde_json::Value::Null)
}

/// A member in the stable `towerctl/v1` output (camelCase; new fields may
/// be added, none renamed or removed within v1).
pub fn cluster_out(c: &crate::daemon::control::ClusterStatus) -> serde_json::Value {
    let mut v = json!({
        "name": c.name,
        "state": c.state,
        "since": time(c.since),
        "remote": c.remote,
        "agentVersion": c.agent_version,
        "rttMs": c.rtt_ms,
        "streams": c.streams,
        "bytesIn": c.bytes_in,
        "bytesOut": c.bytes_out,
        "reconnects": c.reconnects,
        "keyFingerprint": c.key_fingerprint,
        "tokenState": c.token_state,
        "tokenExpiresAt": time(c.token_expires_at),
        "labels": c.labels,
        "impersonate": c.impersonate,
        "events": c.events.iter().map(|e| json!({"at": crate::daemon::fmt::fmt_unix(e.at), "text": e.text})).collect::<Vec<_>>(),
    });
    // Several hubs on etcd: which one holds the session (absent with one hub).
    if let Some(h) = &c.hub {
        v["hub"] = json!(h);
    }
    v
}

/// An agent in the stable `towerctl/v1` output.
pub fn agent_out(a: &AgentStatus) -> serde_json::Value {
    json!({
        "name": a.name,
        "state": a.state,
        "since": time(Some(a.since)),
        "pid": a.pid,
        "hub": a.hub,
        "upstream": a.upstream,
        "rttMs": a.rtt_ms,
        "attempt": a.attempt,
        "retryInMs": a.retry_in_ms,
        "lastError": a.last_error,
        "reconnects": a.reconnects,
        "deniedDials": a.denied_dials,
        "exposed": a.exposed,
    })
}

enum Probe {
    Up(Box<AgentStatus>),
    NotResponding,
    /// With its last error, when it stopped on one
    /// ([`crate::daemon::process::last_words`]).
    Stopped(Option<String>),
}

fn age(since: Option<u64>) -> String {
    since
        .map(|s| humanize(control::now_unix().saturating_sub(s)))
        .unwrap_or_else(|| "-".into())
}

fn ms(v: Option<f64>) -> String {
    v.map(|r| format!("{r:.2}ms")).unwrap_or_else(|| "-".into())
}

/// Whether process `pid` is stopped (state `T` or `t` in /proc).
fn process_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c == 'T' || c == 't')
    })
}

pub async fn run(a: StatusArgs) -> Result<u8> {
    // Ask every agent at once, each bounded: a frozen agent must not make
    // `status` hang.
    let (configs, unreadable) = agent::list_configs_and_unreadable();
    // Not hidden: an agent whose saved settings cannot be read is an
    // agent that will not start again.
    for (path, why) in &unreadable {
        eprintln!(
            "warning: the agent settings '{}' cannot be read ({}): run the member's 'towerctl join' again, or remove the file",
            path.display(),
            crate::tunnel::printable(why, 200)
        );
    }
    let hub_probe = super::hub::hub_status_within(Duration::from_millis(1500));
    // Agents running with no settings saved (`agent run`, as in a pod)
    // too, after those `join` saved.
    let mut names: Vec<String> = configs.into_iter().map(|c| c.name).collect();
    let saved = names.len();
    paths::add_running_agents(&mut names);
    let agents_probe = futures_util::future::join_all(names.iter().map(|name| async move {
        let socket = paths::agent_socket(name);
        let stopped =
            || Probe::Stopped(crate::daemon::process::last_words(&format!("agent-{name}")));
        if !socket.exists() {
            return stopped();
        }
        match control::call_timeout(&socket, Request::Status, Duration::from_millis(1500)).await {
            Ok(v) => serde_json::from_value(v)
                .map(Probe::Up)
                .unwrap_or(Probe::NotResponding),
            // A socket left by an agent that was killed: nobody holds
            // its name.
            Err(_) if crate::daemon::process::running_pid(&format!("agent-{name}")).is_none() => {
                stopped()
            }
            Err(_) => Probe::NotResponding,
        }
    }));
    let (hub, answers) = tokio::join!(hub_probe, agents_probe);
    // One without settings that stopped meanwhile has nothing to say.
    let agents: Vec<(String, Probe)> = names
        .into_iter()
        .zip(answers)
        .enumerate()
        .filter(|(i, (_, p))| *i < saved || !matches!(p, Probe::Stopped(_)))
        .map(|(_, a)| a)
        .collect();
    let forwards = crate::daemon::forwards::list();
    let anything = hub.is_some()
        || agents.iter().any(|(_, s)| !matches!(s, Probe::Stopped(_)))
        || !forwards.is_empty();

    if a.output == "json" || a.output == "yaml" {
        let mut v = json!({
            "apiVersion": "towerctl/v1",
            "kind": "Status",
            "hub": hub.as_ref().map(|h| {
                let mut v = json!({
                    "pid": h.pid,
                    "version": h.version,
                    "tunnelAddress": h.tunnel_addr,
                    "gatewayAddress": h.gateway_addr,
                    "tunnelURL": h.tunnel_url,
                    "gatewayURL": h.gateway_url,
                    "hubKey": h.hub_key,
                    // For `towerctl login --ca-hash` (an operator's after
                    // the CA changed, with the token they have).
                    "caHash": crate::daemon::tls::ca_hash(&h.ca_pem),
                    "clusters": h.clusters.iter().map(cluster_out).collect::<Vec<_>>(),
                });
                // Additive to towerctl/v1: only while it holds.
                if let Some(why) = &h.refusing_operators {
                    v["refusingOperators"] = json!(why);
                }
                v
            }),
            "agents": agents.iter().map(|(name, s)| match s {
                Probe::Up(s) => agent_out(s),
                Probe::NotResponding => json!({"name": name, "state": "not_responding"}),
                Probe::Stopped(None) => json!({"name": name, "state": "stopped"}),
                Probe::Stopped(Some(why)) => json!({"name": name, "state": "stopped", "lastError": why}),
            }).collect::<Vec<_>>(),
            "forwards": forwards.iter().map(|f| json!({
                "id": f.id,
                "pid": f.pid,
                "cluster": f.cluster,
                "target": f.resource,
                "namespace": f.namespace,
                "forwarding": f.forwarding,
            })).collect::<Vec<_>>(),
        });
        // A hub process that holds the pid file but did not answer: `hub`
        // stays null (nothing it would say is known), this says why.
        if hub.is_none() {
            if let Some(pid) = crate::daemon::process::running_pid("hub") {
                let state = if process_stopped(pid) {
                    "suspended"
                } else {
                    "not_responding"
                };
                v["hubProcess"] = json!({ "pid": pid, "state": state });
            }
        }
        if a.output == "yaml" {
            print!("{}", serde_saphyr::to_string(&v)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    } else {
        match &hub {
            Some(h) => {
                println!(
                    "HUB  running (pid {})  tunnel {}  gateway {}  key {}",
                    h.pid, h.tunnel_addr, h.gateway_addr, h.hub_key
                );
                println!(
                    "  gateway CA {} (operators' 'towerctl login --ca-hash')",
                    crate::daemon::tls::ca_hash(&h.ca_pem)
                );
                if let Some(why) = &h.refusing_operators {
                    println!("  REFUSING OPERATORS: {why}");
                }
                if h.clusters.is_empty() {
                    println!("  no members yet: 'towerctl cluster add NAME'");
                } else {
                    let wide = a.output == "wide";
                    print!(
                        "  {:<20} {:<16} {:<8} {:<22} {:>9} {:>7}",
                        "CLUSTER", "STATE", "FOR", "REMOTE", "RTT", "STREAMS"
                    );
                    if wide {
                        print!(
                            "  {:<10} {:>10} {:>10} {:>5}  KEY",
                            "VERSION", "IN", "OUT", "RECON"
                        );
                    }
                    println!();
                    for c in &h.clusters {
                        print!(
                            "  {:<20} {:<16} {:<8} {:<22} {:>9} {:>7}",
                            c.name,
                            c.state,
                            age(c.since),
                            // Several hubs: a member another hub holds shows it.
                            c.remote
                                .clone()
                                .or_else(|| c.hub.as_ref().map(|h| format!("via hub {h}")))
                                .unwrap_or_else(|| "-".into()),
                            ms(c.rtt_ms),
                            c.streams
                        );
                        if wide {
                            print!(
                                "  {:<10} {:>10} {:>10} {:>5}  {}",
                                c.agent_version.as_deref().unwrap_or("-"),
                                c.bytes_in,
                                c.bytes_out,
                                c.reconnects,
                                c.key_fingerprint.as_deref().unwrap_or("-")
                            );
                        }
                        println!();
                    }
                }
            }
            // Its process holds the pid file but does not answer yet: a
            // hub waiting for etcd at start, say.
            None => match crate::daemon::process::running_pid("hub") {
                // Stopped by a signal (SIGSTOP, a debugger): not starting.
                Some(pid) if process_stopped(pid) => println!(
                    "HUB  stopped (pid {pid}): its process is suspended (SIGSTOP or a debugger); \
                     'kill -CONT {pid}' resumes it"
                ),
                Some(pid) => println!(
                    "HUB  not answering (pid {pid}) within 1.5s: still starting (a hub on etcd \
                     waits for it at start), or busy or hung: see 'towerctl logs hub'"
                ),
                None => {
                    println!("HUB  not running on this machine");
                    // An operator's machine: the hubs it is logged in to.
                    for l in super::operator::logins().unwrap_or_default() {
                        println!(
                            "  logged in to {} as '{}' ('towerctl use' lists its members)",
                            l.gateway_url, l.operator
                        );
                    }
                }
            },
        }
        if !agents.is_empty() {
            println!("AGENTS");
            println!(
                "  {:<20} {:<12} {:<8} {:>9}  DETAIL",
                "CLUSTER", "STATE", "FOR", "RTT"
            );
            for (name, s) in &agents {
                match s {
                    Probe::Up(s) => {
                        let detail = match (s.state, s.retry_in_ms) {
                            (AgentState::BackingOff, Some(ms)) => format!(
                                "retry in {:.1}s (attempt {}){}",
                                ms as f64 / 1000.0,
                                s.attempt,
                                s.last_error
                                    .as_ref()
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            ),
                            _ => format!("hub {}", s.hub),
                        };
                        println!(
                            "  {:<20} {:<12} {:<8} {:>9}  {}",
                            name,
                            s.state,
                            age(Some(s.since)),
                            ms(s.rtt_ms),
                            detail
                        );
                    }
                    Probe::NotResponding => println!(
                        "  {:<20} {:<12} {:<8} {:>9}  its control socket did not answer within 1.5s",
                        name, "unknown", "-", "-"
                    ),
                    Probe::Stopped(None) => println!(
                        "  {:<20} {:<12} {:<8} {:>9}  start it again with 'towerctl join {name} …'",
                        name, "stopped", "-", "-"
                    ),
                    // It stopped on an error, which says what to do.
                    Probe::Stopped(Some(why)) => println!(
                        "  {:<20} {:<12} {:<8} {:>9}  {why}",
                        name, "stopped", "-", "-"
                    ),
                }
            }
        }
        if !forwards.is_empty() {
            println!("FORWARDS (background)");
            println!(
                "  {:<10} {:<20} {:<24} FORWARDING",
                "ID", "CLUSTER", "TARGET"
            );
            for f in &forwards {
                println!(
                    "  {:<10} {:<20} {:<24} {}",
                    f.id,
                    f.cluster,
                    format!("{}/{}", f.namespace, f.resource),
                    f.forwarding.join(", ")
                );
            }
        }
    }
    Ok(if anything {
        exit::OK
    } else {
        exit::NOT_RUNNING
    })
}

/// `towerctl logs hub|NAME [-f]`.
pub async fn logs(daemon: &str, follow: bool, tail: usize) -> Result<u8> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let file = if daemon == "hub" {
        paths::log_file("hub")
    } else {
        crate::daemon::names::validate_name(daemon).map_err(anyhow::Error::msg)?;
        paths::log_file(&format!("agent-{daemon}"))
    };
    let mut f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(_) => anyhow::bail!(
            "no log at '{}': '{daemon}' has not run on this machine in the background ('towerctl status' lists the daemons)",
            file.display()
        ),
    };
    let mut raw = Vec::new();
    f.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    // The last `tail` lines, reaching into the previous (rotated) file
    // when the current one was just started.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() < tail {
        if let Ok(prev) = std::fs::read(crate::daemon::logfile::rotated(&file, 1)) {
            let prev = String::from_utf8_lossy(&prev);
            let mut older: Vec<String> = prev.lines().map(str::to_string).collect();
            older.append(&mut lines);
            lines = older;
        }
    }
    // Each line with its control characters escaped: the daemons escape what others sent
    // before they log it, and a line that still holds a control character
    // (a forged line break, a terminal escape from a member's API server)
    // is shown escaped rather than acted on by the terminal.
    let mut out = std::io::stdout().lock();
    for l in &lines[lines.len().saturating_sub(tail)..] {
        writeln!(out, "{}", crate::tunnel::controls_escaped(l))?;
    }
    drop(out);
    if !follow {
        return Ok(exit::OK);
    }
    // Follow the open file; when the daemon rotates it (a new file under
    // the same name), finish the old one, then go on with the new one from
    // its start, so no line is lost or shown twice.
    use std::os::unix::fs::MetadataExt;
    let mut ino = f.metadata()?.ino();
    let mut pos = raw.len() as u64;
    // The lines added to `f` since `pos`, shown; `pos` moved past them. A
    // line still being written waits for its end unless `all`.
    let show_new = |f: &mut std::fs::File, pos: &mut u64, all: bool| -> Result<()> {
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(*pos))?;
        f.read_to_end(&mut buf)?;
        let whole = if all {
            buf.len()
        } else {
            buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
        };
        *pos += whole as u64;
        if whole > 0 {
            let mut out = std::io::stdout().lock();
            for l in String::from_utf8_lossy(&buf[..whole]).split_inclusive('\n') {
                match l.strip_suffix('\n') {
                    Some(l) => writeln!(out, "{}", crate::tunnel::controls_escaped(l))?,
                    None => write!(out, "{}", crate::tunnel::controls_escaped(l))?,
                }
            }
            out.flush()?;
        }
        Ok(())
    };
    loop {
        show_new(&mut f, &mut pos, false)?;
        match std::fs::metadata(&file) {
            Ok(m) if m.ino() != ino => {
                // Renamed away: what the daemon wrote to it after the read
                // above, before it did, is shown first.
                show_new(&mut f, &mut pos, true)?;
                if let Ok(next) = std::fs::File::open(&file) {
                    ino = next.metadata()?.ino();
                    f = next;
                    pos = 0;
                    continue;
                }
            }
            // Truncated in place (by hand): start again from the top.
            Ok(m) if m.len() < pos => pos = 0,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
