//! `towerctl up`, `down`, `hub run`.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio_util::sync::CancellationToken;

use super::{exit, HubArgs, UpArgs};
use crate::daemon::control::{self, HubStatus, Request};
use crate::daemon::{hub, process};
use crate::paths;

/// The message for commands that need the hub on this machine.
pub fn no_hub() -> anyhow::Error {
    // Its process holds the pid file but does not answer yet (waiting for
    // etcd at start): starting another would not help.
    if let Some(pid) = process::running_pid("hub") {
        return super::error::CliError::NotRunning(format!(
            "the hub (pid {pid}) is starting and does not answer yet (opening its registry, or waiting for etcd); \
             see its log ('towerctl logs hub', or the pod's 'kubectl logs') and retry"
        ))
        .into();
    }
    super::error::CliError::NotRunning(
        "no hub is running on this machine: start one with 'towerctl up'".into(),
    )
    .into()
}

/// A request to the hub on this machine, with a clear error when none runs.
pub async fn hub_call(req: Request) -> Result<serde_json::Value> {
    let socket = paths::hub_socket();
    if !control::is_up(&socket).await {
        return Err(no_hub());
    }
    control::call(&socket, req).await
}

pub async fn hub_status() -> Option<HubStatus> {
    hub_status_within(Duration::from_secs(10)).await
}

/// The hub's status, or `None` when no hub answers within `timeout`.
pub async fn hub_status_within(timeout: Duration) -> Option<HubStatus> {
    let v = control::call_timeout(&paths::hub_socket(), Request::Status, timeout)
        .await
        .ok()?;
    serde_json::from_value(v).ok()
}

fn print_ready(s: &HubStatus, already: bool) {
    if already {
        println!("hub already running (pid {})", s.pid);
    } else {
        println!("hub started (pid {})", s.pid);
    }
    println!(
        "  tunnel:   {}  (agents dial {})",
        s.tunnel_addr, s.tunnel_url
    );
    println!("  gateway:  {}  ({})", s.gateway_addr, s.gateway_url);
    println!("  hub key:  {}", s.hub_key);
    if let Some(m) = &s.metrics_addr {
        println!("  metrics:  http://{m}/metrics");
    }
    println!("  logs:     {}", paths::log_file("hub").display());
    if s.clusters.is_empty() {
        println!("next: towerctl cluster add NAME");
    }
}

/// What `a` asks for that the running hub `s` does not have, as flags.
fn differs(a: &HubArgs, s: &HubStatus) -> Vec<String> {
    let addr = |want: std::net::SocketAddr, have: &str| match have.parse::<std::net::SocketAddr>() {
        // Port 0: any port the hub took.
        Ok(h) => h.ip() == want.ip() && (want.port() == 0 || h.port() == want.port()),
        Err(_) => true,
    };
    // URLs as parsed: a trailing slash or the host's case is no change.
    let same_url = |a: &str, b: &str| hub::normalized_url(a) == hub::normalized_url(b);
    // The listeners' defaults are no request: a plain `up` against a hub
    // started on other addresses says nothing.
    let (listen, gateway) = (
        super::DEFAULT_LISTEN.parse::<std::net::SocketAddr>().ok(),
        super::DEFAULT_GATEWAY.parse::<std::net::SocketAddr>().ok(),
    );
    let mut out = Vec::new();
    if Some(a.listen) != listen && !addr(a.listen, &s.tunnel_addr) {
        out.push(format!(
            "--listen {} (running: {})",
            a.listen, s.tunnel_addr
        ));
    }
    if Some(a.gateway) != gateway && !addr(a.gateway, &s.gateway_addr) {
        out.push(format!(
            "--gateway {} (running: {})",
            a.gateway, s.gateway_addr
        ));
    }
    // As the listeners: the default is no request.
    let default_metrics = super::DEFAULT_METRICS.parse::<std::net::SocketAddr>().ok();
    let metrics_differ = match (a.metrics.0, s.metrics_addr.as_deref()) {
        (want, _) if want == default_metrics => false,
        (None, have) => have.is_some(),
        (Some(_), None) => true,
        (Some(want), Some(have)) => !addr(want, have),
    };
    if metrics_differ {
        out.push(format!(
            "--metrics {} (running: {})",
            a.metrics
                .0
                .map_or_else(|| "off".to_string(), |m| m.to_string()),
            s.metrics_addr.as_deref().unwrap_or("off")
        ));
    }
    if let Some(u) = a.advertise.as_ref().filter(|u| !same_url(u, &s.tunnel_url)) {
        out.push(format!("--advertise {u} (running: {})", s.tunnel_url));
    }
    if let Some(u) = a
        .gateway_url
        .as_ref()
        .filter(|u| !same_url(u, &s.gateway_url))
    {
        out.push(format!("--gateway-url {u} (running: {})", s.gateway_url));
    }
    // Given at all: compared whole (who may name clients' addresses).
    let trusted = a.trusted().to_args();
    if !trusted.is_empty() && trusted != s.trusted_proxies {
        let running = if s.trusted_proxies.is_empty() {
            "none".to_string()
        } else {
            s.trusted_proxies.join(" ")
        };
        out.push(format!("{} (running: {running})", trusted.join(" ")));
    }
    out
}

pub async fn up(up: UpArgs) -> Result<u8> {
    if up.print_manifest {
        let o = super::hubmanifest::HubManifestOptions {
            namespace: up.namespace,
            image: up.image,
            replicas: up.replicas,
            storage_class: up.storage_class,
        };
        return super::hubmanifest::print(&up.hub, &o);
    }
    let a = up.hub;
    if let Some(s) = hub_status().await {
        print_ready(&s, true);
        let differ = differs(&a, &s);
        if !differ.is_empty() {
            eprintln!(
                "warning: the running hub was started otherwise: {}; to apply these, run \
                 'towerctl down', then this command again",
                differ.join(", ")
            );
        }
        return Ok(exit::OK);
    }
    let args: Vec<OsString> = a.daemon_args().into_iter().map(Into::into).collect();
    let mut spawned = process::spawn("hub", &args)?;
    let spinner = super::progress::Spinner::new("starting the hub…", false);
    let ready = spawned
        .wait_ready(Duration::from_secs(20), hub_status)
        .await;
    spinner.done();
    match ready? {
        Some(s) => {
            print_ready(&s, false);
            Ok(exit::OK)
        }
        None => {
            // Waiting for etcd, say: its last warning says why. Stopped,
            // and said so (its warning alone read as "still waiting").
            let why = spawned
                .last_warning()
                .map(|w| format!(" (its last warning: {w})"))
                .unwrap_or_default();
            spawned.kill();
            bail!(
                "the hub did not become ready within 20s{why}, so it was stopped: fix that and run 'towerctl up' again ('towerctl hub run' in a service waits as long as it takes); see its log '{}'",
                spawned.log.display()
            )
        }
    }
}

pub async fn down() -> Result<u8> {
    let socket = paths::hub_socket();
    let pid = process::running_pid("hub");
    if pid.is_none() && !control::is_up(&socket).await {
        eprintln!("no hub is running on this machine");
        return Ok(exit::NOT_RUNNING);
    }
    let asked = control::call(&socket, Request::Shutdown).await.is_ok();
    if let Some(pid) = pid {
        if !asked {
            // No control socket yet (a hub waiting for etcd at start): the
            // signal stops it at once.
            process::terminate(pid, Duration::from_secs(5)).await;
        }
        process::await_exit(pid, "the hub").await?;
    }
    println!("hub stopped");
    Ok(exit::OK)
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Every daemon (hub, agent, port-forward) stops through here.
        // Stopped first: nothing said after it can keep the daemon up.
        token.cancel();
        tracing::info!(target: "towerctl::daemon", "{which} received, shutting down");
    });
}

pub async fn run_foreground(a: HubArgs) -> Result<u8> {
    let _lock = process::lock_pid_file("hub")?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    process::reap_orphans_as_init();
    let store_access = a.store_access();
    let trusted_proxies = a.trusted();
    let cfg = hub::HubConfig {
        store_access,
        listen: a.listen,
        gateway: a.gateway,
        advertise: a.advertise,
        gateway_url: a.gateway_url,
        peer_url: a.peer_url,
        tls_sans: a.tls_sans,
        shutdown_delay: a.shutdown_delay.unwrap_or_default(),
        keepalive: a.keepalive,
        metrics: a.metrics.0,
        store: a.store.clone(),
        trusted_proxies,
        store_prefix: a.store_prefix,
        store_max_stale: a.store_max_stale.0,
    };
    hub::run(cfg, cancel, |s| {
        crate::daemon::notify::notify(&format!(
            "READY=1\nSTATUS=tunnel {} gateway {}",
            s.tunnel_addr, s.gateway_addr
        ));
        if std::env::var_os(process::DAEMON_ENV).is_none() {
            // Through the console's queue, as the log: a stderr nobody
            // takes must not stop the hub at its readiness.
            crate::daemon::console::console().say(
                crate::daemon::console::Dest::Err,
                format!(
                    "hub ready: tunnel {} ({}), gateway {} ({}), hub key {}\n",
                    s.tunnel_addr, s.tunnel_url, s.gateway_addr, s.gateway_url, s.hub_key
                ),
            );
        }
    })
    .await?;
    Ok(exit::OK)
}
