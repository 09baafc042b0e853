//! What the dashboard sees: a `watch` subscription to the hub's control
//! socket (when this machine runs a hub) and one to each agent configured
//! here. Each snapshot becomes an [`Action`]; a daemon that goes away is
//! reported once and subscribed to again every second, so a stopped hub
//! never freezes the screen and its return is noticed within a second or so.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::app::{Action, AgentDown, HubDown};
use crate::daemon::agent;
use crate::daemon::control::{self, AgentStatus, HubStatus, Request};
use crate::paths;

/// How often daemons send a snapshot. With the redraw throttle, a change
/// reaches the screen within `INTERVAL + MIN_FRAME`.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// Pause between attempts to subscribe to a daemon that is not answering.
const RETRY: Duration = Duration::from_secs(1);
/// A subscription silent for this long is treated as lost (a frozen
/// daemon keeps its socket open but says nothing).
const SILENCE: Duration = Duration::from_secs(3);
/// How often the list of configured agents is read again, to notice a
/// `join` or `leave` made while the dashboard runs.
const RESCAN: Duration = Duration::from_secs(2);

/// Starts the subscriptions; they stop when `cancel` fires.
pub fn start(tx: mpsc::Sender<Action>, cancel: CancellationToken, tracker: &TaskTracker) {
    tracker.spawn(watch_hub(tx.clone(), cancel.clone()));
    tracker.spawn(watch_agents(tx, cancel, tracker.clone()));
}

/// Why a subscription ended (or never started).
enum Lost {
    NoSocket,
    Refused,
    Other(String),
}

/// Follows one daemon's snapshots until it stops answering or `cancel`
/// fires (`None`).
async fn follow<T: DeserializeOwned>(
    socket: &Path,
    tx: &mpsc::Sender<Action>,
    cancel: &CancellationToken,
    wrap: impl Fn(T) -> Action,
) -> Option<Lost> {
    if !socket.exists() {
        return Some(Lost::NoSocket);
    }
    let mut rx = match control::watch(socket, INTERVAL).await {
        Ok(rx) => rx,
        Err(e) => {
            let refused = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
            // A socket file nobody listens on: the daemon died (kill -9).
            return Some(if refused {
                Lost::Refused
            } else {
                Lost::Other(format!("{e:#}"))
            });
        }
    };
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return None,
            n = tokio::time::timeout(SILENCE, rx.recv()) => n,
        };
        match next {
            Ok(Some(v)) => match serde_json::from_value::<T>(v) {
                Ok(s) => {
                    if tx.send(wrap(s)).await.is_err() {
                        return None;
                    }
                }
                Err(e) => return Some(Lost::Other(format!("malformed status: {e}"))),
            },
            Ok(None) => {
                // Ask once, for a reason worth showing (a daemon of another
                // protocol version says so); otherwise it went away.
                let why = match control::call_timeout(socket, Request::Status, RETRY).await {
                    Err(e) => format!("{e:#}"),
                    Ok(_) => "the status stream ended".to_string(),
                };
                return Some(if socket.exists() {
                    Lost::Other(why)
                } else {
                    Lost::NoSocket
                });
            }
            Err(_) => return Some(Lost::Other(format!("no status for {SILENCE:?}"))),
        }
    }
}

async fn watch_hub(tx: mpsc::Sender<Action>, cancel: CancellationToken) {
    let socket = paths::hub_socket();
    loop {
        let down = match follow(&socket, &tx, &cancel, |s: HubStatus| {
            Action::Hub(Box::new(s))
        })
        .await
        {
            None => return,
            Some(Lost::NoSocket) => HubDown::Absent,
            Some(Lost::Refused) => HubDown::Unreachable("not answering: connection refused".into()),
            Some(Lost::Other(e)) => HubDown::Unreachable(e),
        };
        if tx.send(Action::HubDown(down)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn watch_agent(name: String, tx: mpsc::Sender<Action>, cancel: CancellationToken) {
    let socket = paths::agent_socket(&name);
    loop {
        let why = match follow(&socket, &tx, &cancel, |s: AgentStatus| {
            Action::Agent(Box::new(s))
        })
        .await
        {
            None => return,
            Some(Lost::NoSocket | Lost::Refused) => {
                AgentDown::Stopped(crate::daemon::process::last_words(&format!("agent-{name}")))
            }
            Some(Lost::Other(e)) => AgentDown::NotResponding(e),
        };
        let down = Action::AgentDown {
            name: name.clone(),
            why,
        };
        if tx.send(down).await.is_err() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Keeps one subscription per configured agent, following `join` and
/// `leave` while the dashboard runs.
async fn watch_agents(tx: mpsc::Sender<Action>, cancel: CancellationToken, tracker: TaskTracker) {
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut known: Option<Vec<String>> = None;
    let mut known_forwards: Option<Vec<crate::daemon::forwards::Background>> = None;
    loop {
        // Background port-forwards: a handful of small files, re-read with
        // the agent list.
        let forwards = crate::daemon::forwards::list();
        if known_forwards.as_ref() != Some(&forwards) {
            if tx.send(Action::Forwards(forwards.clone())).await.is_err() {
                return;
            }
            known_forwards = Some(forwards);
        }
        // Agents running with no settings saved (`agent run`, as in a
        // pod) too, as `status` lists them.
        let mut names: Vec<String> = agent::list_configs().into_iter().map(|c| c.name).collect();
        crate::paths::add_running_agents(&mut names);
        // The list goes first: the dashboard ignores news of agents not on it.
        if known.as_ref() != Some(&names) {
            if tx.send(Action::Agents(names.clone())).await.is_err() {
                return;
            }
            known = Some(names.clone());
        }
        running.retain(|n, stop| {
            let keep = names.contains(n);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for n in &names {
            if !running.contains_key(n) {
                let stop = cancel.child_token();
                tracker.spawn(watch_agent(n.clone(), tx.clone(), stop.clone()));
                running.insert(n.clone(), stop);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RESCAN) => {}
        }
    }
}
