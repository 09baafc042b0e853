//! The agent daemon: keeps one tunnel to the hub up and serves the hub's
//! channels by proxying to the member's API server with the agent's own
//! credentials.

mod config;
mod member_tls;
mod pool;
mod raw;
mod rbac;
mod upstream;

pub use config::{
    config_path, default_key_path, list_configs, list_configs_and_unreadable, parse_agent_expose,
    AgentConfig, PodNetwork,
};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::{
    self, push_bounded, AgentState, AgentStatus, Event, Request as CtlRequest,
    Response as CtlResponse, EVENTS_KEPT, RTT_SAMPLES_KEPT,
};
use super::policy::DialPolicy;
use crate::paths;
use crate::tunnel::backoff::Backoff;
use crate::tunnel::client::{self, ChannelService, DialOptions};
use crate::tunnel::TunnelError;
use upstream::{upstream_client, Upstream};

#[derive(Debug, Clone)]
struct State {
    state: AgentState,
    since: u64,
    rtt: Option<Duration>,
    /// When the keepalive now waiting for its answer went out.
    ping_since: Option<Instant>,
    attempt: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// What kind of failure `last_error` is, where `join` acts on it.
    failure: Option<control::FailureKind>,
    /// Sessions after the first.
    reconnects: u64,
    rtt_history: VecDeque<f64>,
    events: VecDeque<Event>,
    /// The hub dialed now, or connected to (several hubs: not always the
    /// join command's first); empty before the first attempt.
    hub: String,
    /// The member API server, once a changed member kubeconfig was read
    /// again (`upstream::follow_kubeconfig`).
    upstream: Option<String>,
}

/// The round trip to show: the last one measured, or, while a keepalive's
/// answer is overdue past it, the time waited so far (a hub gone silent
/// showed its last fraction of a millisecond until declared dead; the
/// hub's side does the same, `LiveSession::rtt_ms`).
fn shown_rtt(
    last: Option<Duration>,
    ping_since: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let last = last?;
    let waited = ping_since.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
    Some(last.max(waited))
}

impl State {
    fn event(&mut self, text: String) {
        // Shown in terminals (`ui`, `status`): words from elsewhere in it
        // (a hub's reason, a proxy's answer) escaped, as the hub's are.
        let text = crate::tunnel::printable(&text, 2000);
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
    let source = upstream::MemberSource {
        kubeconfig: cfg.kubeconfig.clone(),
        sa_dir: cfg.serviceaccount_dir.clone(),
        impersonate: cfg.impersonate,
    };
    let member = upstream_client(&source).await?;
    let (client, upstream_url, own_impersonation) = (
        member.client.clone(),
        member.url.clone(),
        member.own_impersonation,
    );
    let policy = Arc::new(DialPolicy::new(&cfg.allow).map_err(anyhow::Error::msg)?);
    let denied = Arc::new(AtomicU64::new(0));
    let tasks = TaskTracker::new();
    let limit = crate::daemon::memory::cgroup_limit();
    let budgets = upstream::budgets(limit);
    let windows = crate::tunnel::flow::WindowBudget::from_env(budgets.windows);
    if let Some(limit) = limit {
        tracing::info!(
            "memory limit {} MiB (cgroup): streams' windows are held to {} MiB in all, request \
             bodies being received to {} MiB, port-forward and CONNECT streams to {} at once",
            limit >> 20,
            windows.total() >> 20,
            budgets.bodies >> 20,
            budgets.raw_streams
        );
    }
    let rbac = cfg
        .impersonate
        .then(|| Arc::new(rbac::Rbac::new(client.clone())));
    let raw_streams = Arc::new(tokio::sync::Semaphore::new(budgets.raw_streams));
    let service: Arc<dyn ChannelService> = Arc::new(Upstream {
        dialer: raw::Dialer {
            tasks: tasks.clone(),
            client: client.clone(),
            policy,
            denied: denied.clone(),
            pod_network: PodNetwork::parse(&cfg.pod_network).map_err(anyhow::Error::msg)?,
            services: crate::daemon::watchcache::ServiceCache::new(
                client.clone(),
                cancel.child_token(),
                tasks.clone(),
            ),
            rbac: rbac.clone(),
            raw_streams: raw_streams.clone(),
        },
        api: member.api.clone(),
        identity: Arc::new(upstream::Identity {
            impersonate: cfg.impersonate,
            own_impersonation,
            rbac,
        }),
        tasks: tasks.clone(),
        streams: Arc::new(tokio::sync::Semaphore::new(upstream::MAX_STREAMS)),
        raw_streams,
        raw_limit: budgets.raw_streams,
        body_budget: Arc::new(upstream::BodyBudget::new((budgets.bodies >> 10) as usize)),
        windows,
        shares: Default::default(),
    });
    let keepalive = Duration::from_secs(cfg.keepalive_secs.max(1));
    let key_path = cfg
        .key_file
        .clone()
        .unwrap_or_else(|| default_key_path(&cfg.name));
    let key = crate::tunnel::keys::load_or_create_key(
        &key_path,
        |p, b| {
            paths::write_atomic(p, b, 0o600)
                .with_context(|| format!("cannot write the agent key '{}'", p.display()))
        },
        "the agent key",
        &format!(
            "restore it from a backup; or remove it (a new one is made) and run the join command that 'towerctl cluster rotate {} --new-key' prints on the hub (the hub knows the old key only)",
            cfg.name
        ),
    )?;
    let opts = DialOptions {
        url: cfg.hub.clone(),
        name: cfg.name.clone(),
        key: Arc::new(key),
        token: cfg.token.clone().filter(|t| !t.expose().is_empty()),
        hub_key: cfg.hub_key.clone(),
        keepalive,
        connect_timeout: Duration::from_secs(15),
        // The hub refuses to route to an agent whose impersonation mode
        // differs from the member's: it learns the agent's from here.
        features: features(cfg.impersonate),
        learned_hubs: Default::default(),
        proxy: cfg.proxy.clone(),
        proxy_url: cfg.proxy_url.as_ref().map(|p| p.expose().to_string()),
        tls: Arc::new(crate::tunnel::tls::HubTls::new(
            cfg.hub_ca.as_deref(),
            cfg.insecure_skip_tls_verify,
            cfg.hub_key.is_some(),
        )?),
    };
    if opts.tls.skips_verification() {
        tracing::warn!("{}", crate::tunnel::tls::SKIP_VERIFY_WARNING);
    }
    if opts.hub_key.is_none() {
        tracing::warn!("the hub's host key is not pinned (--insecure-skip-hub-key): anyone who can intercept the connection can impersonate the hub");
    }

    let (tx, rx) = watch::channel(State {
        state: AgentState::Connecting,
        since: control::now_unix(),
        rtt: None,
        ping_since: None,
        attempt: 0,
        retry_at: None,
        last_error: None,
        failure: None,
        reconnects: 0,
        rtt_history: VecDeque::new(),
        events: VecDeque::new(),
        hub: String::new(),
        upstream: None,
    });
    tasks.spawn({
        let tx = tx.clone();
        let cancel = cancel.clone();
        async move {
            upstream::follow_kubeconfig(source, &member, cancel, |said| match said {
                Ok((text, url)) => {
                    tracing::info!("{text}");
                    tx.send_modify(|s| {
                        s.upstream = Some(url);
                        s.event(text);
                    });
                }
                Err(text) => {
                    tracing::warn!("{text}");
                    tx.send_modify(|s| s.event(text));
                }
            })
            .await;
        }
    });
    // Push mode: listeners for the member's workloads, carried to the hub
    // over whatever session is current (refused while there is none).
    let (current, current_rx) = watch::channel::<Option<Arc<client::ClientSession>>>(None);
    let mut exposed = Vec::new();
    for e in &cfg.exposes {
        let (name, addr) = parse_agent_expose(e).map_err(anyhow::Error::msg)?;
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on '{addr}' for the exposed '{name}': choose another address in --expose {name}=ADDR"))?;
        let bound = l.local_addr()?;
        exposed.push(format!("{name}={bound}"));
        tasks.spawn(raw::push_listener(
            l,
            name,
            current_rx.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
    }
    if let Some(addr) = &cfg.probe_addr {
        let l = super::probes::bind(addr).await?;
        let rx = rx.clone();
        let ready = move || rx.borrow().state == AgentState::Connected;
        tasks.spawn(super::probes::serve(l, ready, cancel.clone()));
    }
    let socket = paths::agent_socket(&cfg.name);
    let listener = control::bind(&socket).await?;
    let ctl_cancel = cancel.clone();
    let stop = cancel.clone();
    let name = cfg.name.clone();
    let hub = cfg.hub.clone();
    let ctl = tokio::spawn(control::serve(
        listener,
        ctl_cancel,
        move |req| {
            let rx = rx.clone();
            let stop = stop.clone();
            let name = name.clone();
            let hub = hub.clone();
            let upstream = upstream_url.clone();
            let denied = denied.clone();
            let exposed = exposed.clone();
            async move {
                match req {
                    CtlRequest::Status | CtlRequest::Watch { .. } => {
                        let s = rx.borrow().clone();
                        CtlResponse::ok(AgentStatus {
                            name,
                            pid: std::process::id(),
                            hub: if s.hub.is_empty() { hub } else { s.hub },
                            state: s.state,
                            since: s.since,
                            rtt_ms: shown_rtt(s.rtt, s.ping_since, Instant::now())
                                .map(|d| d.as_secs_f64() * 1000.0),
                            attempt: s.attempt,
                            retry_in_ms: s.retry_at.map(|t| {
                                t.saturating_duration_since(Instant::now()).as_millis() as u64
                            }),
                            last_error: s.last_error,
                            failure: s.failure,
                            upstream: s.upstream.unwrap_or(upstream),
                            reconnects: s.reconnects,
                            rtt_history_ms: s.rtt_history.into_iter().collect(),
                            events: s.events.into_iter().collect(),
                            denied_dials: denied.load(Ordering::Relaxed),
                            exposed: exposed.clone(),
                            version: Some(env!("CARGO_PKG_VERSION").to_string()),
                        })
                    }
                    CtlRequest::Shutdown => {
                        stop.cancel();
                        CtlResponse::ok(serde_json::json!({}))
                    }
                    _ => CtlResponse::err(
                        "this is an agent: run 'towerctl cluster add' against the hub",
                    ),
                }
            }
        },
        None,
    ));

    let hubs: Vec<String> = std::iter::once(cfg.hub.clone())
        .chain(cfg.more_hubs.iter().cloned())
        .collect();
    let result = tunnel_loop(
        &opts,
        &hubs,
        service,
        &tx,
        &current,
        cfg.backoff_cap_secs,
        cfg.saved_at.clone(),
        cancel.clone(),
    )
    .await;
    cancel.cancel();
    let _ = ctl.await;
    // Open streams get a moment to finish; the tunnel is already closed, so
    // they end on their own.
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
    let _ = std::fs::remove_file(&socket);
    // The hub cannot know where this agent keeps its key: a refusal of
    // the key itself names the file to replace.
    result.map_err(|e| {
        if e.to_string().contains("this agent's key was retired") {
            e.context(format!(
                "the agent key '{}' was refused",
                key_path.display()
            ))
        } else {
            e
        }
    })
}

/// Removes the join token from the agent's saved configuration at `path`
/// (everything else kept as written); whether it is gone (removed now, or
/// not there). A file that cannot be rewritten (a Secret mounted read-only
/// in a pod) is left as it is, said once.
fn forget_token(path: &std::path::Path) -> bool {
    let done = (|| -> anyhow::Result<bool> {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let Some(o) = v.as_object_mut() else {
            return Ok(false);
        };
        if o.remove("token").is_none() {
            return Ok(false);
        }
        paths::write_atomic(path, &serde_json::to_vec_pretty(&v)?, 0o600)?;
        Ok(true)
    })();
    match done {
        Ok(true) => {
            tracing::info!(
                "the agent's key is registered: its join token is no longer needed and was removed from '{}'",
                path.display()
            );
            true
        }
        Ok(false) => true,
        Err(e) => {
            // Once: a file mounted read-only fails at every connection.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "cannot remove the join token, no longer needed, from '{}' (tried again at the next connections): {e:#}",
                    path.display()
                );
            }
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn tunnel_loop(
    opts: &DialOptions,
    hubs: &[String],
    service: Arc<dyn ChannelService>,
    tx: &watch::Sender<State>,
    current: &watch::Sender<Option<Arc<client::ClientSession>>>,
    cap_secs: u64,
    // Where the join token is removed from once the key is taken.
    mut token_file: Option<std::path::PathBuf>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(cap_secs.max(1)),
    );
    let set = |f: &dyn Fn(&mut State)| tx.send_modify(|s| f(s));
    let mut connected_before = false;
    // The last sessions' lengths, for `fixed_lifetime`, and the lifetime
    // last said.
    let mut uptimes: std::collections::VecDeque<Duration> = Default::default();
    let mut said_lifetime: Option<Duration> = None;
    // The failures said since the last session, one per hub dialed in
    // turn (each names its URL): several hubs down said each once, not
    // once per attempt.
    let mut said_failures: Vec<String> = Vec::new();
    // Several hubs of one group: the next one after each ended session or
    // failed attempt, so that losing one hub costs one backoff.
    let mut opts = opts.clone();
    let mut last: Option<String> = None;
    let mut token_spent = false;
    // Since when the tunnel is down (the agent's start at first): what
    // `status` and the dashboard show as FOR while it backs off; each
    // retry set it anew ("backing_off 2s" after a minute down).
    let mut down_since = control::now_unix();
    loop {
        if token_spent {
            opts.token = None;
        }
        // The join command's hubs first, then those a hub named since; the
        // one after the last dialed (the list may have changed meanwhile).
        let mut now: Vec<String> = hubs.to_vec();
        if let Ok(learned) = opts.learned_hubs.lock() {
            now.extend(learned.iter().filter(|u| !hubs.contains(u)).cloned());
        }
        let at = last
            .as_ref()
            .and_then(|l| now.iter().position(|u| u == l))
            .map_or(0, |i| i + 1);
        opts.url = now[at % now.len().max(1)].clone();
        last = Some(opts.url.clone());
        let opts = &opts;
        set(&|s| {
            s.state = AgentState::Connecting;
            s.retry_at = None;
            s.hub.clone_from(&opts.url);
        });
        let dialed = Instant::now();
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = client::connect(opts, service.clone()) => r,
        };
        // About seven round trips: the first ping's bound on a far link.
        let login_rtt = dialed.elapsed() / 7;
        match attempt {
            Ok(mut sess) => {
                said_failures.clear();
                tracing::info!(hub = %opts.url, "tunnel up");
                // Logged in, by key or by the token (which the hub accepts
                // only once the key it was offered is written into the
                // member's record, in the same transaction): the key is
                // registered, and the join token (a secret that could join
                // this name again, for as long as it lives when reusable)
                // leaves the disk now; it used to stay until the second
                // session, for as long as the first lasted. It stays in
                // memory until a hub takes the key itself: the next hub
                // dialed (several hubs on etcd) may not have the key in its
                // copy of the registry yet, and refuses the key alone,
                // which an agent takes as final; with the token, that
                // hub's check reads etcd itself and lets it in.
                if sess.by_key {
                    token_spent = true;
                }
                if opts.token.is_some() || token_spent {
                    if let Some(path) = token_file.take() {
                        let done = {
                            let path = path.clone();
                            tokio::task::spawn_blocking(move || forget_token(&path))
                                .await
                                .unwrap_or(false)
                        };
                        if !done {
                            token_file = Some(path);
                        }
                    }
                }
                // systemd: ready once the first attempt is settled.
                crate::daemon::notify::notify(&format!(
                    "READY=1\nSTATUS=connected to {}",
                    opts.url
                ));
                let now = control::now_unix();
                let again = connected_before;
                connected_before = true;
                set(&|s| {
                    s.state = AgentState::Connected;
                    s.since = now;
                    s.attempt = 0;
                    s.last_error = None;
                    s.failure = None;
                    if again {
                        s.reconnects += 1;
                    }
                    s.event(format!("connected to {}", opts.url));
                });
                let mut closed = std::pin::pin!(sess.take_closed());
                // Shared with the push-mode listeners for as long as it lives.
                let sess = Arc::new(sess);
                current.send_replace(Some(sess.clone()));
                let keepalive = opts.keepalive;
                // Same bound as the hub: dead within three intervals (or
                // three round trips on a far link); returns what it waited.
                let pinger = async {
                    let mut rtt = login_rtt;
                    loop {
                        // Marked without waking the watchers (read when
                        // status is asked).
                        tx.send_if_modified(|s| {
                            s.ping_since = Some(Instant::now());
                            false
                        });
                        let deadline = crate::tunnel::ping_deadline_for(keepalive, rtt);
                        match sess.ping(deadline).await {
                            Some(took) => tx.send_modify(|s| {
                                rtt = took;
                                s.rtt = Some(took);
                                s.ping_since = None;
                                push_bounded(
                                    &mut s.rtt_history,
                                    took.as_secs_f64() * 1000.0,
                                    RTT_SAMPLES_KEPT,
                                );
                            }),
                            None => return deadline,
                        }
                        tokio::time::sleep(keepalive).await;
                    }
                };
                let ended = tokio::select! {
                    end = &mut closed => Ok(end),
                    // A ping fails at once on a session the hub closed: its
                    // reason, when it comes right after, says more.
                    waited = pinger => tokio::time::timeout(Duration::from_millis(300), &mut closed)
                        .await
                        .map_err(|_| format!("no answer to keepalives within {waited:.1?}: hub declared dead")),
                    _ = cancel.cancelled() => {
                        current.send_replace(None);
                        // Bounded, as the goodbye below: a stopped hub does
                        // not hold up the agent's own stop.
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            sess.farewell("agent stopped"),
                        )
                        .await;
                        return Ok(());
                    }
                };
                let why = match ended {
                    Err(why) => why,
                    Ok(end) => {
                        if end.revoked {
                            let reason = end.from_hub.unwrap_or(end.reason);
                            set(&|s| {
                                s.state = AgentState::Revoked;
                                s.event(format!("stopped: {reason}"));
                                s.last_error = Some(reason.clone());
                            });
                            return Err(anyhow::Error::new(TunnelError::Revoked { reason }));
                        }
                        end.reason
                    }
                };
                current.send_replace(None);
                down_since = control::now_unix();
                let uptime = sess.connected_at.elapsed();
                tracing::warn!("tunnel down after {uptime:?}: {why}");
                // Bounded: to a hub that stopped reading (frozen, its
                // host gone) the goodbye may never go out, and the agent
                // waited on it instead of dialing again (another hub).
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), sess.disconnect("reconnecting"))
                        .await;
                backoff.session_ended(uptime);
                push_bounded(&mut uptimes, uptime, 3);
                let lifetime = crate::tunnel::backoff::fixed_lifetime(uptimes.make_contiguous());
                if lifetime.is_none() {
                    // Said again if the pattern comes back later.
                    said_lifetime = None;
                }
                if let Some(l) = lifetime.filter(|l| {
                    said_lifetime.is_none_or(|s| s.abs_diff(*l) > Duration::from_secs(2))
                }) {
                    said_lifetime = Some(l);
                    // Ended in silence (no close): as likely a NAT or
                    // firewall that forgets a flow idle for less than the
                    // keepalive interval, then drops its packets.
                    let silent = if why.contains("keepalive") {
                        "; these ended in silence, as when a NAT or firewall forgets a connection idle \
                         for less than the keepalive interval: join again with a shorter --keepalive \
                         (5s, say)"
                    } else {
                        ""
                    };
                    let hint = lifetime_hint(l, opts.keepalive, silent);
                    tracing::warn!("{hint}");
                    set(&|s| s.event(hint.clone()));
                }
                set(&|s| {
                    s.event(format!("disconnected: {why}"));
                    s.last_error = Some(why.clone());
                    s.failure = None;
                    // No session, no round trip: the last one was shown
                    // for as long as the outage lasted.
                    s.rtt = None;
                    s.ping_since = None;
                });
            }
            // A hub another named (not the join command's) that refuses
            // for good: a stale view of the registry, an address reused
            // elsewhere. Not dialed again; the agent goes on.
            Err(e) if e.is_fatal() && !hubs.contains(&opts.url) => {
                let msg = format!(
                    "{e} (at {}, named by a hub of the group, not by the join command: not dialed again)",
                    opts.url
                );
                if let Ok(mut learned) = opts.learned_hubs.lock() {
                    learned.retain(|u| *u != opts.url);
                }
                tracing::warn!("{msg}");
                set(&|s| {
                    s.event(format!("cannot connect: {msg}"));
                    s.last_error = Some(msg.clone());
                    s.failure = None;
                });
            }
            // Another host key than the pinned one, at a hub of the join
            // command: never accepted, but not the end of the agent either.
            // Whoever can answer in the hub's place on the path (`ws://`, a
            // reused address or name) could otherwise stop every agent for
            // good with one forged handshake (exit 4: systemd does not
            // restart it). Retried at the backoff's pace; `join` stops at
            // once on it.
            Err(e @ TunnelError::HostKeyMismatch { .. }) => {
                let msg = format!(
                    "{e}{}: if the hub was not reinstalled, something between this agent and {} answered in its place)",
                    control::RETRYING_NOTE,
                    opts.url
                );
                set(&|s| {
                    if s.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        s.event(format!("cannot connect: {msg}"));
                    }
                    s.last_error = Some(msg.clone());
                    s.failure = Some(control::FailureKind::HostKey);
                });
            }
            Err(e) if e.is_fatal() => {
                let msg = e.to_string();
                let revoked = matches!(e, TunnelError::Revoked { .. });
                set(&|s| {
                    s.state = if revoked {
                        AgentState::Revoked
                    } else {
                        AgentState::Failed
                    };
                    s.event(format!("stopped: {msg}"));
                    s.last_error = Some(msg.clone());
                });
                return Err(anyhow::Error::new(e));
            }
            Err(e) => {
                let msg = e.to_string();
                let kind = control::FailureKind::of(&e);
                // One log line and event per distinct failure, not one per
                // attempt ("retrying in …" still shows each).
                let new = !said_failures.contains(&msg);
                if new {
                    if said_failures.len() == 16 {
                        said_failures.remove(0);
                    }
                    said_failures.push(msg.clone());
                    tracing::warn!("{msg}");
                }
                set(&|s| {
                    if new {
                        s.event(format!("cannot connect: {msg}"));
                    }
                    s.last_error = Some(msg.clone());
                    s.failure = kind;
                });
            }
        }
        let delay = backoff.next_delay();
        let attempt = backoff.attempt();
        let now = control::now_unix();
        set(&|s| {
            s.state = AgentState::BackingOff;
            s.since = down_since.min(now);
            s.attempt = attempt;
            s.retry_at = Some(Instant::now() + delay);
        });
        tracing::info!("retrying in {delay:.1?} (attempt {attempt})");
        crate::daemon::notify::notify(&format!(
            "READY=1\nSTATUS=backing off, retry in {delay:.1?} (attempt {attempt})"
        ));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The feature words the agent declares at login (its SSH identification
/// comment; `tunnel::server::agent_features`).
/// `TOWERCTL_TEST_AGENT_WITHOUT` leaves words out (a test hook:
/// `tunnel::left_out_for_tests`).
fn features(impersonate: bool) -> Vec<String> {
    [
        crate::tunnel::FEATURE_HUBS,
        crate::tunnel::FEATURE_OPEN_EARLY,
        crate::tunnel::FEATURE_CLIENT_AS,
        crate::tunnel::FEATURE_REQUEST_IN_OPEN,
    ]
    .into_iter()
    .chain(impersonate.then_some("impersonate"))
    .filter(|f| !crate::tunnel::left_out_for_tests("TOWERCTL_TEST_AGENT_WITHOUT", f))
    .map(String::from)
    .collect()
}

/// What the agent says when its sessions each end after about `l`.
/// Shorter than its own keepalive interval, the tunnel was idle that
/// long: as likely an idle timeout on the path as a fixed lifetime (a
/// proxy with a 30 s idle timeout and the agent's 45 s keepalive were
/// said to be "a fixed lifetime" and no more).
fn lifetime_hint(l: Duration, keepalive: Duration, silent: &str) -> String {
    // Rounded: sessions of 5.9 s were "about 5s".
    let secs = l.as_secs_f64().round() as u64;
    if l + Duration::from_secs(1) < keepalive {
        let shorter = (secs / 2).max(1);
        return format!(
            "the last three sessions each ended after about {secs}s, shorter than this agent's \
             keepalive interval ({}s): something between this agent and the hub ends connections \
             idle for about {secs}s (a load balancer's, proxy's or NAT's idle timeout; join again \
             with --keepalive {shorter}s, or raise that timeout) or at that lifetime whatever they \
             carry (if the hub's own keepalive is under {secs}s, or sessions still end so with a \
             shorter --keepalive: raise that lifetime there); streams open at that moment are cut",
            keepalive.as_secs()
        );
    }
    format!(
        "the last three sessions each ended after about {secs}s: something between this agent \
         and the hub ends connections at a fixed lifetime, most likely a load balancer or \
         proxy (GCP's backend service timeout is 30s by default: raise its timeoutSec, in a \
         BackendConfig or GCPBackendPolicy; an idle or tunnel timeout elsewhere){silent}; \
         streams open at that moment are cut"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overdue_keepalive_shows_as_the_time_waited() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Answered: the last round trip.
        assert_eq!(shown_rtt(Some(ms(2)), None, t0), Some(ms(2)));
        // Waiting less than that: still the last one.
        assert_eq!(shown_rtt(Some(ms(2)), Some(t0), t0 + ms(1)), Some(ms(2)));
        // Overdue: what it has waited, climbing.
        assert_eq!(
            shown_rtt(Some(ms(2)), Some(t0), t0 + ms(1500)),
            Some(ms(1500))
        );
        // None measured yet (or the session gone): none shown.
        assert_eq!(shown_rtt(None, Some(t0), t0 + ms(1500)), None);
    }

    #[test]
    fn sessions_ending_between_keepalives_are_said_to_be_an_idle_timeout() {
        let s = Duration::from_secs;
        // 30 s sessions with a 45 s keepalive: the tunnel idle that long.
        let h = lifetime_hint(s(30), s(45), "");
        assert!(
            h.contains("shorter than this agent's keepalive interval (45s)"),
            "{h}"
        );
        assert!(h.contains("--keepalive 15s"), "{h}");
        // With a 10 s keepalive the tunnel was never idle 30 s: a lifetime.
        let h = lifetime_hint(s(30), s(10), "");
        assert!(
            h.contains("fixed lifetime") && !h.contains("--keepalive 15s"),
            "{h}"
        );
    }
}
