//! The hub's tunnel listener: WebSocket upgrade, SSH login, one live
//! session per agent, keepalive pings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Hub, LiveSession};
use crate::daemon::control::{self, push_bounded, RTT_SAMPLES_KEPT};
use crate::tunnel::{self, server};

pub(super) async fn accept_tunnels(
    listener: TcpListener,
    hub: Arc<Hub>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((tcp, peer)) = crate::daemon::accept_next(&listener, &cancel, "tunnel").await {
        let hub = hub.clone();
        let ssh_cfg = ssh_cfg.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = tunnel_session(tcp, peer, hub, ssh_cfg, keepalive, cancel).await {
                tracing::info!(%peer, "tunnel session ended: {e:#}");
            }
        });
    }
}

async fn tunnel_session(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    ssh_cfg: Arc<russh::server::Config>,
    keepalive: Duration,
    cancel: CancellationToken,
) -> Result<()> {
    let ws = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::accept_async(tcp),
    )
    .await
    .context("WebSocket handshake timed out")?
    .context("WebSocket handshake failed")?;
    let io = tunnel::ws::WsIo::new(ws);
    let auth: Arc<dyn server::Authenticator> = hub.clone();
    let mut sess = server::accept(ssh_cfg, io, auth, Duration::from_secs(30)).await?;
    let live = Arc::new(LiveSession {
        id: hub.next_id.fetch_add(1, Ordering::Relaxed),
        name: sess.name.clone(),
        handle: sess.handle.clone(),
        peer: Some(peer),
        connected_at: control::now_unix(),
        impersonate: hub
            .store
            .get_member(&sess.name)
            .ok()
            .flatten()
            .is_some_and(|m| m.impersonate),
        rtt_us: AtomicU64::new(0),
        streams: AtomicU64::new(0),
        bytes_in: Arc::new(AtomicU64::new(0)),
        bytes_out: Arc::new(AtomicU64::new(0)),
        version: sess.version.clone(),
        close_reason: Mutex::new(None),
    });
    tracing::info!(cluster = %live.name, %peer, "agent connected");
    hub.register(live.clone());

    // A ping goes out at most one interval after the last answer and gets
    // two intervals to come back: a silent agent is dead within three.
    let pinger = {
        let live = live.clone();
        let hub = hub.clone();
        async move {
            loop {
                match server::ping(&live.handle, keepalive * 2).await {
                    Some(rtt) => {
                        live.rtt_us
                            .store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
                        hub.record(&live.name, |m| {
                            push_bounded(&mut m.rtt, rtt.as_secs_f64() * 1000.0, RTT_SAMPLES_KEPT);
                            m.rtt_histogram.observe(rtt.as_secs_f64());
                        });
                    }
                    None => return,
                }
                tokio::time::sleep(keepalive).await;
            }
        }
    };
    let why = tokio::select! {
        r = &mut sess.running => match r {
            Ok(()) => "session closed".to_string(),
            Err(e) => format!("session failed: {e}"),
        },
        _ = pinger => {
            let _ = live.handle.disconnect(russh::Disconnect::ByApplication, "no keepalive answer".into(), String::new()).await;
            format!("no answer to keepalives within {:?}: declared dead", keepalive * 2)
        }
        _ = cancel.cancelled() => "hub shutting down".to_string(),
    };
    let why = live
        .close_reason
        .lock()
        .ok()
        .and_then(|mut r| r.take())
        .unwrap_or(why);
    tracing::info!(cluster = %live.name, %peer, "agent disconnected: {why}");
    hub.unregister(&live, &why);
    Ok(())
}
