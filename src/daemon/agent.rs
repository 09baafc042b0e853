//! The agent daemon: keeps one tunnel to the hub up and serves the hub's
//! channels by proxying to the member's API server with the agent's own
//! credentials.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use russh::client::Msg;
use russh::ChannelStream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::{
    self, push_bounded, AgentStatus, Event, Request as CtlRequest, Response as CtlResponse,
    EVENTS_KEPT, RTT_SAMPLES_KEPT,
};
use super::gateway::{is_upgrade, status_response, strip_hop_by_hop, strip_identity, Body};
use crate::paths;
use crate::tunnel::backoff::Backoff;
use crate::tunnel::client::{self, ChannelService, DialOptions};
use crate::tunnel::{Secret, TunnelError, TARGET_APISERVER};

/// Largest request body the agent buffers (kube-apiserver's own limit for
/// objects is 3 MiB; exec/attach stdin goes over the upgraded stream).
const MAX_REQUEST_BODY: usize = 32 * 1024 * 1024;

/// An agent's configuration, as `join` saves it (mode 0600: holds the token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub name: String,
    pub hub: String,
    pub token: String,
    /// Pinned hub host key; `None` only when joined with the insecure flag.
    pub hub_key: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    #[serde(default = "default_cap")]
    pub backoff_cap_secs: u64,
}

fn default_keepalive() -> u64 {
    crate::tunnel::DEFAULT_KEEPALIVE.as_secs()
}
fn default_cap() -> u64 {
    30
}

pub fn config_path(name: &str) -> PathBuf {
    paths::config_dir()
        .join("agents")
        .join(format!("{name}.json"))
}

/// Agents configured on this machine.
pub fn list_configs() -> Vec<AgentConfig> {
    let dir = paths::config_dir().join("agents");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    if let Ok(c) = serde_json::from_str::<AgentConfig>(&s) {
                        out.push(c);
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The agent's side of its member API server: a pooled kube client.
struct Upstream {
    client: kube::Client,
}

impl ChannelService for Upstream {
    fn accepts(&self, target: &str, _port: u32) -> bool {
        target == TARGET_APISERVER
    }

    fn serve(&self, _target: String, _port: u32, stream: ChannelStream<Msg>) {
        let client = self.client.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(client, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!("tunnel stream ended: {e}");
            }
        });
    }
}

async fn forward(client: kube::Client, mut req: Request<Incoming>) -> Response<Body> {
    let upgrade = is_upgrade(req.headers());
    let hub_side_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // Defence in depth: the hub already strips these.
    strip_identity(&mut parts.headers);
    parts.headers.remove("x-towerctl-operator");
    parts.headers.remove(header::HOST);
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("request body rejected by the towerctl agent: {e}"),
            )
        }
    };
    let up_req = Request::from_parts(parts, kube::client::Body::from(body));
    let mut resp = match client.send(up_req).await {
        Ok(r) => r,
        Err(e) => {
            return status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("the towerctl agent cannot reach its API server: {e}"),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(hub_side) = hub_side_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(hub_side, upstream) {
                    Ok((a, b)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(a),
                            &mut TokioIo::new(b),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!("upgrade failed: {e}"),
                }
            });
        }
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync())
}

/// Builds the client for the member's API server the way the kube crate
/// does: `--kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the
/// in-cluster service account.
async fn upstream_client(kubeconfig: Option<&PathBuf>) -> Result<(kube::Client, String)> {
    let mut config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("cannot read the member kubeconfig '{}'", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("the member kubeconfig '{}' is not usable", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no member API server credentials found: pass --kubeconfig, set KUBECONFIG, or run the agent in a pod with a service account")?,
    };
    // Watches and `logs -f` stay open for as long as the operator wants.
    config.read_timeout = None;
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("cannot build the member API client")?;
    Ok((client, url))
}

#[derive(Debug, Clone)]
struct State {
    state: &'static str,
    since: u64,
    rtt: Option<Duration>,
    attempt: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Sessions after the first.
    reconnects: u64,
    rtt_history: VecDeque<f64>,
    events: VecDeque<Event>,
}

impl State {
    fn event(&mut self, text: String) {
        push_bounded(
            &mut self.events,
            Event {
                at: control::now_unix(),
                text,
            },
            EVENTS_KEPT,
        );
    }
}

/// Runs the agent until `cancel` fires or a fatal error (wrong key or
/// token) occurs. `ready` is called when the control socket is up.
pub async fn run(cfg: AgentConfig, cancel: CancellationToken) -> Result<()> {
    let (client, upstream_url) = upstream_client(cfg.kubeconfig.as_ref()).await?;
    let service: Arc<dyn ChannelService> = Arc::new(Upstream { client });
    let keepalive = Duration::from_secs(cfg.keepalive_secs.max(1));
    let opts = DialOptions {
        url: cfg.hub.clone(),
        name: cfg.name.clone(),
        token: Secret::new(cfg.token.clone()),
        hub_key: cfg.hub_key.clone(),
        keepalive,
        connect_timeout: Duration::from_secs(15),
    };
    if opts.hub_key.is_none() {
        tracing::warn!("the hub's host key is not pinned (--insecure-skip-hub-key): anyone who can intercept the connection can impersonate the hub");
    }

    let (tx, rx) = watch::channel(State {
        state: "connecting",
        since: control::now_unix(),
        rtt: None,
        attempt: 0,
        retry_at: None,
        last_error: None,
        reconnects: 0,
        rtt_history: VecDeque::new(),
        events: VecDeque::new(),
    });
    let socket = paths::agent_socket(&cfg.name);
    let listener = control::bind(&socket).await?;
    let ctl_cancel = cancel.clone();
    let stop = cancel.clone();
    let name = cfg.name.clone();
    let hub = cfg.hub.clone();
    let ctl = tokio::spawn(control::serve(listener, ctl_cancel, move |req| {
        let rx = rx.clone();
        let stop = stop.clone();
        let name = name.clone();
        let hub = hub.clone();
        let upstream = upstream_url.clone();
        async move {
            match req {
                CtlRequest::Status | CtlRequest::Watch { .. } => {
                    let s = rx.borrow().clone();
                    CtlResponse::ok(AgentStatus {
                        name,
                        pid: std::process::id(),
                        hub,
                        state: s.state.to_string(),
                        since: s.since,
                        rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        attempt: s.attempt,
                        retry_in_ms: s.retry_at.map(|t| {
                            t.saturating_duration_since(Instant::now()).as_millis() as u64
                        }),
                        last_error: s.last_error,
                        upstream,
                        reconnects: s.reconnects,
                        rtt_history_ms: s.rtt_history.into_iter().collect(),
                        events: s.events.into_iter().collect(),
                        version: Some(env!("CARGO_PKG_VERSION").to_string()),
                    })
                }
                CtlRequest::Shutdown => {
                    stop.cancel();
                    CtlResponse::ok(serde_json::json!({}))
                }
                CtlRequest::ClusterAdd { .. }
                | CtlRequest::ClusterRemove { .. }
                | CtlRequest::Disconnect { .. } => {
                    CtlResponse::err("this is an agent: run 'towerctl cluster add' against the hub")
                }
            }
        }
    }));

    let result = tunnel_loop(&opts, service, &tx, cfg.backoff_cap_secs, cancel.clone()).await;
    cancel.cancel();
    let _ = ctl.await;
    let _ = std::fs::remove_file(&socket);
    result
}

async fn tunnel_loop(
    opts: &DialOptions,
    service: Arc<dyn ChannelService>,
    tx: &watch::Sender<State>,
    cap_secs: u64,
    cancel: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cap_secs.max(1)),
    );
    let set = |f: &dyn Fn(&mut State)| tx.send_modify(|s| f(s));
    let mut connected_before = false;
    loop {
        set(&|s| {
            s.state = "connecting";
            s.retry_at = None;
        });
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = client::connect(opts, service.clone()) => r,
        };
        match attempt {
            Ok(mut sess) => {
                tracing::info!(hub = %opts.url, "tunnel up");
                let now = control::now_unix();
                let again = connected_before;
                connected_before = true;
                set(&|s| {
                    s.state = "connected";
                    s.since = now;
                    s.attempt = 0;
                    s.last_error = None;
                    if again {
                        s.reconnects += 1;
                    }
                    s.event(format!("connected to {}", opts.url));
                });
                let closed = sess.take_closed();
                let keepalive = opts.keepalive;
                // Same bound as the hub: dead within three intervals.
                let pinger = async {
                    loop {
                        match sess.ping(keepalive * 2).await {
                            Some(rtt) => tx.send_modify(|s| {
                                s.rtt = Some(rtt);
                                push_bounded(
                                    &mut s.rtt_history,
                                    rtt.as_secs_f64() * 1000.0,
                                    RTT_SAMPLES_KEPT,
                                );
                            }),
                            None => return,
                        }
                        tokio::time::sleep(keepalive).await;
                    }
                };
                let why = tokio::select! {
                    w = closed => w,
                    _ = pinger => format!("no answer to keepalives within {:?}: hub declared dead", keepalive * 2),
                    _ = cancel.cancelled() => {
                        sess.disconnect("agent stopping").await;
                        return Ok(());
                    }
                };
                sess.disconnect("reconnecting").await;
                let uptime = sess.connected_at.elapsed();
                backoff.session_ended(uptime);
                tracing::warn!("tunnel down after {uptime:?}: {why}");
                set(&|s| {
                    s.event(format!("disconnected: {why}"));
                    s.last_error = Some(why.clone());
                });
            }
            Err(e) if e.is_fatal() => {
                let msg = e.to_string();
                set(&|s| {
                    s.state = "failed";
                    s.event(format!("stopped: {msg}"));
                    s.last_error = Some(msg.clone());
                });
                return Err(anyhow::Error::new(e));
            }
            Err(e) => {
                tracing::warn!("{e}");
                let msg = e.to_string();
                set(&|s| {
                    // One event per distinct failure, not one per attempt.
                    if s.last_error.as_deref() != Some(msg.as_str()) {
                        s.event(format!("cannot connect: {msg}"));
                    }
                    s.last_error = Some(msg.clone());
                });
            }
        }
        let delay = backoff.next_delay();
        let attempt = backoff.attempt();
        let now = control::now_unix();
        set(&|s| {
            s.state = "backing_off";
            s.since = now;
            s.attempt = attempt;
            s.retry_at = Some(Instant::now() + delay);
        });
        tracing::info!("retrying in {delay:.1?} (attempt {attempt})");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// For `join`: whether a failed agent's error is one that retrying cannot fix.
pub fn is_fatal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<TunnelError>()
        .is_some_and(|t| t.is_fatal())
}
