//! `towerctl ui`: the command glue around the dashboard in `crate::tui`.
//! It owns the real terminal, the subscriptions, the input and signal
//! tasks, and carries out the dashboard's effects (kubeconfig, hub
//! requests) on its behalf.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use ratatui::crossterm::event::{Event, EventStream, KeyEventKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{cluster, exit, usectx, UiArgs};
use crate::daemon::control::{self, ClusterAdded, Request};
use crate::paths;
use crate::tui::app::Outcome;
use crate::tui::{self, feed, term, theme::Theme, Action, App, Effect, Effects};

pub async fn run(a: UiArgs) -> Result<u8> {
    let (mut terminal, guard) = term::enter()?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel(256);
    feed::start(tx.clone(), cancel.clone(), &tracker);
    tracker.spawn(input(tx.clone(), cancel.clone()));
    let signalled = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    tracker.spawn(signals(tx.clone(), cancel.clone(), signalled.clone()));
    let mut app = App::new(Instant::now(), control::now_unix(), Theme::mono_from_env());
    app.logins = super::operator::logins()
        .unwrap_or_default()
        .into_iter()
        .map(|l| {
            format!(
                "{} as '{}'",
                crate::tunnel::printable(&l.gateway_url, 200),
                crate::tunnel::printable(&l.operator, 100)
            )
        })
        .collect();
    let fx = Live {
        kubeconfig: a.kubeconfig,
        tracker: tracker.clone(),
    };
    let result = tui::run(&mut terminal, &mut app, rx, tx, &fx, || {
        (Instant::now(), control::now_unix())
    })
    .await;
    cancel.cancel();
    tracker.close();
    drop(guard);
    // Let an effect in flight (a kubeconfig being written) finish.
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    // Ended by a signal: the shell's 128 + N, as for any program it stops.
    let code = match signalled.load(std::sync::atomic::Ordering::Relaxed) {
        0 => exit::OK,
        n => 128 + n,
    };
    result.map(|()| code)
}

/// Keys and resizes from the terminal.
async fn input(tx: mpsc::Sender<Action>, cancel: CancellationToken) {
    let mut events = EventStream::new();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.next() => ev,
        };
        let action = match ev {
            Some(Ok(Event::Key(k))) if k.kind == KeyEventKind::Press => Action::Key(k),
            Some(Ok(Event::Resize(..))) => Action::Resize,
            Some(Ok(_)) => continue,
            // The terminal is gone.
            Some(Err(_)) | None => Action::Quit,
        };
        let quit = matches!(action, Action::Quit);
        if tx.send(action).await.is_err() || quit {
            return;
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP (an SSH connection that drops) end the
/// dashboard the normal way, so the terminal is restored.
async fn signals(
    tx: mpsc::Sender<Action>,
    cancel: CancellationToken,
    signalled: std::sync::Arc<std::sync::atomic::AtomicU8>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    let n = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
        _ = hup.recv() => libc::SIGHUP,
    };
    signalled.store(n as u8, std::sync::atomic::Ordering::Relaxed);
    let _ = tx.send(Action::Quit).await;
}

/// The dashboard's effects against the real kubeconfig and daemons.
struct Live {
    kubeconfig: Option<PathBuf>,
    tracker: TaskTracker,
}

impl Effects for Live {
    fn start(&self, effect: Effect, done: mpsc::Sender<Action>) {
        let kubeconfig = self.kubeconfig.clone();
        self.tracker.spawn(async move {
            let r = carry_out(effect, kubeconfig).await;
            let _ = done
                .send(Action::Done(r.map_err(|e| format!("{e:#}"))))
                .await;
        });
    }
}

async fn carry_out(effect: Effect, kubeconfig: Option<PathBuf>) -> Result<Outcome> {
    match effect {
        Effect::UseContext { name, hub } => {
            let (ctx, file) = tokio::task::spawn_blocking(move || {
                usectx::switch_to(&hub, &name, kubeconfig.as_deref())
            })
            .await
            .context("the kubeconfig update did not finish")??;
            Ok(Outcome::Message(format!(
                "switched to context \"{ctx}\" (in {})",
                file.display()
            )))
        }
        Effect::PortForward { cluster, spec } => {
            let mut words = spec.split_whitespace();
            let resource = words
                .next()
                .context("type the target and ports, like: svc/web 8080:80")?
                .to_string();
            // As on the command line: the cluster context's namespace
            // unless `-n` says otherwise.
            let (mut ports, mut namespace) =
                (Vec::new(), super::portforward::context_namespace(&cluster));
            while let Some(w) = words.next() {
                match w {
                    "-n" | "--namespace" => {
                        namespace = words.next().context("-n needs a namespace")?.to_string()
                    }
                    p => ports.push(p.to_string()),
                }
            }
            let rec = super::portforward::start_background(super::portforward::Args {
                cluster,
                resource,
                ports,
                namespace,
                address: vec!["localhost".into()],
                gateway: None,
            })
            .await?;
            Ok(Outcome::Message(format!(
                "forwarding {} (forward {}; 'towerctl port-forward stop {}' ends it)",
                rec.forwarding.join(", "),
                rec.id,
                rec.id
            )))
        }
        Effect::Disconnect { name } => {
            control::call(
                &paths::hub_socket(),
                Request::Disconnect { name: name.clone() },
            )
            .await
            .with_context(|| format!("cannot disconnect '{name}'"))?;
            Ok(Outcome::Message(format!(
                "'{name}' disconnected; its agent reconnects by itself, with backoff"
            )))
        }
        Effect::RotateToken { name } => {
            let v = control::call(
                &paths::hub_socket(),
                Request::ClusterRotate {
                    name: name.clone(),
                    ttl_secs: control::DEFAULT_TOKEN_TTL,
                    reusable: false,
                    new_key: false,
                },
            )
            .await
            .with_context(|| format!("cannot rotate the token of '{name}'"))?;
            let added: ClusterAdded =
                serde_json::from_value(v).context("malformed answer from the hub")?;
            Ok(Outcome::Rotated {
                name,
                join_command: cluster::join_command(&added),
            })
        }
    }
}
