//! `towerctl join`, `agent run`, `leave`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use super::error::CliError;
use super::{exit, AgentOpts, JoinArgs};
use crate::daemon::agent::{self, AgentConfig};
use crate::daemon::control::{self, AgentState, AgentStatus, FailureKind, Request};
use crate::daemon::names::validate_name;
use crate::daemon::process;
use crate::paths;
use crate::tunnel::keys::normalize_fingerprint;
use crate::tunnel::tls::{load_pem_bundle, TrustError, SKIP_VERIFY_WARNING};
use crate::tunnel::Secret;

/// Turns command-line options into an agent configuration, checking each.
fn config_from_opts(name: &str, o: &AgentOpts) -> Result<AgentConfig> {
    config_for(name, o, false)
}

/// [`config_from_opts`]; `for_pod`: the environment's proxy variables are
/// this machine's, not the pod's, and are not saved (`--proxy` is).
fn config_for(name: &str, o: &AgentOpts, for_pod: bool) -> Result<AgentConfig> {
    config_keyed(name, o, for_pod, false)
}

/// [`config_for`]; `keyed`: the pod gets a registered key (`--key-file`
/// with `--print-manifest`), so no join token is needed.
fn config_keyed(name: &str, o: &AgentOpts, for_pod: bool, keyed: bool) -> Result<AgentConfig> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let hub = o
        .hub
        .first()
        .cloned()
        .context("missing --hub: pass the hub's tunnel URL printed by 'towerctl cluster add' (ws://HOST:PORT/tunnel)")?;
    for hub in &o.hub {
        let u = url::Url::parse(hub).map_err(|e| {
            // What cannot be parsed is not repeated past an '@' (it may
            // hold a password).
            let shown = match hub.rsplit_once('@') {
                Some((_, host)) => format!("…@{host}"),
                None => hub.clone(),
            };
            anyhow::anyhow!(
                "invalid --hub '{shown}': {e}; expected ws://HOST:PORT/tunnel or wss://HOST/tunnel"
            )
        })?;
        if !u.username().is_empty() || u.password().is_some() {
            // Never sent (the WebSocket client drops it), and the URL is
            // shown in every error, status line and event: not repeated.
            let mut shown = u.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            bail!(
                "invalid --hub '{shown}' (credentials left out here): a user or password in the URL is never sent to the hub; \
                 the agent authenticates with its key and join token, and a proxy's credentials go in --proxy"
            );
        }
        if u.scheme() != "ws" && u.scheme() != "wss" {
            bail!(
                "invalid --hub '{hub}': the scheme must be ws:// or wss://, not '{}://'",
                u.scheme()
            );
        }
    }
    let token = match o.token.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(t) => Some(Secret::new(super::token_text(
            "the join token (--token, TOWERCTL_TOKEN)",
            t,
        )?)),
        None => None,
    };
    let key_file = o
        .key_file
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let has_key = key_file
        .as_ref()
        .unwrap_or(&agent::default_key_path(name))
        .exists();
    if token.is_none() && !has_key && !keyed {
        bail!("no join token: run the join command 'towerctl cluster add' printed, which sets it in the environment (' TOWERCTL_TOKEN=… towerctl join …', kept out of the shell history and of 'ps' by the leading space); --token also works, but shows it to every user of this machine in 'ps'");
    }
    let hub_key = match (&o.hub_key, o.insecure_skip_hub_key) {
        (Some(k), _) => Some(normalize_fingerprint(k).with_context(|| format!("invalid --hub-key '{k}': expected 'sha256:' followed by the base64 fingerprint printed by 'towerctl cluster add'"))?),
        (None, true) => None,
        (None, false) => bail!("missing --hub-key: pass the hub key fingerprint printed by 'towerctl cluster add' (sha256:…), or --insecure-skip-hub-key to skip verification (unsafe)"),
    };
    if o.insecure_skip_tls_verify && hub_key.is_none() {
        bail!("{}", TrustError::NothingVerified);
    }
    let hub_ca = match &o.hub_ca {
        Some(p) => {
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            // Checked now, so that a wrong file fails here and not in the
            // agent's log.
            load_pem_bundle(&abs)?;
            Some(abs)
        }
        None => None,
    };
    let kubeconfig = match &o.kubeconfig {
        Some(p) => {
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            if !abs.exists() {
                bail!("the member kubeconfig '{}' does not exist: pass the kubeconfig of the member's API server with --kubeconfig", abs.display());
            }
            Some(abs)
        }
        // The agent would find KUBECONFIG in the environment `join` gives
        // it, but not when started again without it (a service unit,
        // `towerctl service install agent`): the file it names is saved,
        // as the proxy variables are.
        None if !for_pod => kubeconfig_from_env(),
        None => None,
    };
    // Checked now, for each hub, so that a proxy the agent cannot use fails
    // here and not in its log (variables it would not use are not judged).
    let proxy = if for_pod {
        None
    } else {
        crate::tunnel::proxy::ProxyVars::from_env()
    };
    for h in &o.hub {
        let Ok(u) = url::Url::parse(h) else { continue };
        let tls = u.scheme() == "wss";
        let port = u
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        crate::tunnel::proxy::choose(
            tls,
            u.host_str().unwrap_or_default(),
            port,
            o.proxy.as_deref(),
            proxy.as_ref(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(AgentConfig {
        saved_at: None,
        name: name.to_string(),
        hub,
        proxy,
        proxy_url: o.proxy.clone().map(Secret::new),
        more_hubs: o.hub.iter().skip(1).cloned().collect(),
        token,
        key_file,
        impersonate: o.impersonate,
        hub_key,
        kubeconfig,
        keepalive_secs: o.keepalive.as_secs().max(1),
        backoff_cap_secs: o.backoff_cap.as_secs().max(1),
        pod_network: {
            agent::PodNetwork::parse(&o.pod_network).map_err(anyhow::Error::msg)?;
            o.pod_network.clone()
        },
        exposes: {
            for x in &o.expose {
                agent::parse_agent_expose(x).map_err(anyhow::Error::msg)?;
            }
            o.expose.clone()
        },
        probe_addr: match &o.probe_addr {
            Some(a) => {
                a.parse::<std::net::SocketAddr>().map_err(|_| anyhow::anyhow!("invalid --probe-addr '{a}': use IP:PORT, like 127.0.0.1:8081 (or 0.0.0.0:8081 in a pod)"))?;
                Some(a.clone())
            }
            None => None,
        },
        serviceaccount_dir: o
            .serviceaccount_dir
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        allow: {
            for a in &o.allow {
                crate::daemon::policy::Rule::parse(a).map_err(anyhow::Error::msg)?;
            }
            o.allow.clone()
        },
        hub_ca,
        insecure_skip_tls_verify: o.insecure_skip_tls_verify,
    })
}

/// Like [`config_from_opts`], without looking for a local key (the pod gets
/// its own).
fn config_from_opts_for_manifest(name: &str, o: &AgentOpts) -> Result<AgentConfig> {
    let mut o = o.clone();
    let keyed = o.key_file.take().is_some();
    config_keyed(name, &o, true, keyed)
}

async fn agent_status(name: &str) -> Option<AgentStatus> {
    let v = control::call(&paths::agent_socket(name), Request::Status)
        .await
        .ok()?;
    serde_json::from_value(v).ok()
}

pub async fn join(a: JoinArgs) -> Result<u8> {
    if a.print_manifest {
        // With the agent's registered key (`--key-file`: printed again to
        // change a running agent's arguments or image) the pod logs in by
        // key, and the token, shown once and expired since, is not needed.
        if a.opts.token.is_none() && a.opts.key_file.is_none() {
            bail!("--print-manifest needs the join token (TOWERCTL_TOKEN=… in the environment, as 'towerctl cluster add' printed it, or --token), or for an agent that joined already its key with --key-file: the manifests carry them for the agent pod");
        }
        if a.opts.kubeconfig.is_some() {
            bail!("--kubeconfig does not apply to --print-manifest: the agent pod uses its service account");
        }
        crate::daemon::names::validate_name_of("namespace", &a.namespace)
            .map_err(anyhow::Error::msg)?;
        if a.image.trim().is_empty() {
            bail!("--image is empty: pass the agent image, like localhost/towerctl:{} (built by scripts/image.sh)", env!("CARGO_PKG_VERSION"));
        }
        let mut cfg = config_from_opts_for_manifest(&a.name, &a.opts)?;
        cfg.kubeconfig = None;
        if let Some(p) = &cfg.probe_addr {
            let addr: std::net::SocketAddr = p.parse()?;
            if addr.ip().is_loopback() || addr.port() == 0 {
                bail!("--probe-addr {p} cannot be probed in a pod: the kubelet reaches the pod's own IP, not its loopback, on a fixed port; use 0.0.0.0:PORT (the default, 0.0.0.0:8081)");
            }
        }
        if !cfg.exposes.is_empty() {
            bail!("--expose (push mode) is not in the printed manifest: the pod would run without it; run the agent with 'towerctl join' on a machine in the member network, or add '--expose NAME=HOST:PORT' to the Deployment's args and a Service for it yourself");
        }
        let hub_ca_pem = match &cfg.hub_ca {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read --hub-ca '{}'", p.display()))?,
            ),
            None => None,
        };
        // The agent's registered key, when named: printed again with it,
        // the pod is the same agent to the hub (a new key and the spent
        // token were refused, and the pod restarted for ever).
        let agent_key_pem = match &a.opts.key_file {
            Some(p) => {
                let pem = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read --key-file '{}'", p.display()))?;
                russh::keys::PrivateKey::from_openssh(pem.trim()).map_err(|e| {
                    anyhow::anyhow!(
                        "--key-file '{}' is not an OpenSSH private key ({e}): give the agent's key, as the Secret holds it",
                        p.display()
                    )
                })?;
                Some(pem)
            }
            None => None,
        };
        cfg.serviceaccount_dir = None;
        return super::manifest::print(
            &cfg,
            &super::manifest::ManifestOptions {
                namespace: a.namespace.clone(),
                image: a.image.clone(),
                hub_ca_pem,
                agent_key_pem,
            },
        );
    }
    let cfg = config_from_opts(&a.name, &a.opts)?;
    if cfg.hub_key.is_none() {
        eprintln!("warning: --insecure-skip-hub-key: the hub's identity is not verified; anyone who can intercept the connection can impersonate the hub and read the member's API traffic");
    }
    if cfg.insecure_skip_tls_verify {
        if cfg.hub.starts_with("wss://") {
            eprintln!("warning: {SKIP_VERIFY_WARNING}");
        } else {
            eprintln!("warning: --insecure-skip-tls-verify has no effect: --hub '{}' does not use TLS (wss://)", cfg.hub);
        }
    }
    if let Some(s) = agent_status(&a.name).await {
        bail!("an agent for cluster '{}' is already running on this machine (pid {}, {}); run 'towerctl leave {}' first to replace it", a.name, s.pid, s.state, a.name);
    }
    let path = agent::config_path(&a.name);
    let previous = std::fs::read(&path).ok();
    let written = serde_json::to_vec_pretty(&cfg)?;
    paths::write_atomic(&path, &written, 0o600)?;
    // Put back as it was, unless another join of the same name wrote it
    // meanwhile (the one whose agent runs: two joins at once).
    let restore = || {
        if std::fs::read(&path).ok().as_deref() != Some(written.as_slice()) {
            return;
        }
        match &previous {
            Some(p) => {
                let _ = paths::write_atomic(&path, p, 0o600);
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    };

    let args: Vec<OsString> = vec![
        "agent".into(),
        "run".into(),
        a.name.clone().into(),
        "--config".into(),
        path.clone().into_os_string(),
    ];
    let mut spawned = process::spawn(&format!("agent-{}", a.name), &args)?;
    let deadline = Instant::now() + a.timeout;
    let mut last: Option<AgentStatus> = None;
    let spinner =
        super::progress::Spinner::new(format!("starting the agent for '{}'…", a.name), false);
    // Ctrl-C while it comes up stops the agent too (it runs in a session of
    // its own, which the terminal's signal does not reach: it went on
    // retrying with the saved token).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        if let Some(st) = spawned.child.try_wait()? {
            // Said before the settings are put back: that frees the space
            // whose want `failure` looks for.
            let code = st.code();
            let msg = spawned.failure(code);
            // Another join's agent runs under this name (two joins at
            // once, with the same settings): they are its settings now.
            let other = process::running_pid(&format!("agent-{}", a.name))
                .filter(|p| *p != spawned.child.id());
            if other.is_none() {
                restore();
            }
            spinner.done();
            return Err(match code {
                Some(c) if c == i32::from(exit::AUTH) => CliError::Refused(msg).into(),
                _ => anyhow::anyhow!(msg),
            });
        }
        if let Some(s) = agent_status(&a.name).await {
            spinner.set(match (s.state, s.retry_in_ms) {
                (AgentState::BackingOff, Some(ms)) => format!(
                    "hub not reached yet, retrying in {:.1}s (attempt {}){}",
                    ms as f64 / 1000.0,
                    s.attempt,
                    s.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                _ => format!("dialing {} and handshaking…", cfg.hub),
            });
            if s.failure == Some(FailureKind::HostKey) {
                // A first connection to a hub with another key than the
                // join command pins: a wrong key or a wrong address, which
                // waiting cannot fix.
                spawned.kill();
                restore();
                spinner.done();
                // The running agent's words say it retries: not so here.
                let why = s
                    .last_error
                    .as_deref()
                    .unwrap_or("host key mismatch")
                    .split(control::RETRYING_NOTE)
                    .next()
                    .unwrap_or_default();
                return Err(CliError::Refused(format!("{why}. The agent was stopped.")).into());
            }
            // Retrying cannot fix a certificate the agent does not trust,
            // nor a proxy or ingress answering in the hub's place what it
            // will answer until reconfigured: said now, not after
            // --timeout with words about a slow link.
            if let Some(kind @ (FailureKind::Certificate | FailureKind::Misrouted)) = s.failure {
                spawned.kill();
                restore();
                spinner.done();
                let (default, as_error): (_, fn(String) -> CliError) = match kind {
                    FailureKind::Certificate => ("certificate refused", CliError::Tls),
                    _ => ("refused on the way", CliError::Unreachable),
                };
                let why = s.last_error.as_deref().unwrap_or(default);
                return Err(as_error(format!("{why}. The agent was stopped.")).into());
            }
            // Another join's agent for this name (two joins at once): not
            // ours, whose start then fails on the name's lock and is said
            // above.
            let ours = s.pid == spawned.child.id();
            if s.state == AgentState::Connected && ours {
                spinner.done();
                println!(
                    "agent '{}' joined {} (pid {}); the tunnel is up",
                    a.name, cfg.hub, s.pid
                );
                println!("  upstream: {}", s.upstream);
                println!("  logs:     {}", spawned.log.display());
                return Ok(exit::OK);
            }
            last = Some(s);
        }
        if Instant::now() >= deadline {
            spawned.kill();
            restore();
            let why = last
                .and_then(|s| s.last_error)
                .unwrap_or_else(|| "no answer".into());
            spinner.done();
            return Err(CliError::Unreachable(format!("the tunnel to the hub did not come up within {:?}: {why}; check that the hub runs ('towerctl up') and that --hub '{}' is reachable from here (on a slow or far link a login takes some seven round trips: give it longer with --timeout). The agent was stopped.", a.timeout, cfg.hub)).into());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = interrupt.recv() => {
                spawned.kill();
                restore();
                spinner.done();
                eprintln!("interrupted: the agent was stopped");
                return Ok(exit::INTERRUPTED);
            }
        }
    }
}

pub async fn run_foreground(name: String, opts: AgentOpts, config: Option<PathBuf>) -> Result<u8> {
    let cfg = match config {
        Some(p) => {
            let s = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read the agent config '{}'", p.display()))?;
            let mut c: AgentConfig = serde_json::from_str(&s).with_context(|| {
                format!(
                    "the agent config '{}' is malformed; run 'towerctl join' again",
                    p.display()
                )
            })?;
            if c.name != name {
                bail!(
                    "the agent config '{}' is for cluster '{}', not '{name}'",
                    p.display(),
                    c.name
                );
            }
            c.saved_at = Some(p);
            c
        }
        None => config_from_opts(&name, &opts)?,
    };
    let _lock = process::lock_pid_file(&format!("agent-{name}"))?;
    // Read before the lock was ours: a `leave` that ran meanwhile (the
    // agent it stopped held the lock) removed the settings, and this agent
    // would have run on, forgotten, where `status` and `leave` cannot see
    // it.
    if let Some(p) = cfg.saved_at.as_ref().filter(|p| !p.exists()) {
        bail!(
            "the agent settings '{}' were removed ('towerctl leave {name}') while this agent started; not starting",
            p.display()
        );
    }
    let cancel = CancellationToken::new();
    super::hub::cancel_on_signals(cancel.clone());
    agent::run(cfg, cancel).await?;
    Ok(exit::OK)
}

pub async fn leave(name: &str) -> Result<u8> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let path = agent::config_path(name);
    let daemon = format!("agent-{name}");
    let pid = process::running_pid(&daemon);
    let running = control::call(&paths::agent_socket(name), Request::Shutdown)
        .await
        .is_ok();
    if !running && pid.is_none() && !path.exists() {
        bail!("no agent named '{name}' on this machine; 'towerctl status' lists them");
    }
    if let Some(pid) = pid {
        process::await_exit(pid, &format!("the agent '{name}'")).await?;
    }
    // The key stays: the same join command gets in with it again (a
    // single-use token is spent).
    let _ = std::fs::remove_file(&path);
    println!("agent '{name}' stopped and forgotten");
    Ok(exit::OK)
}

/// The one file `KUBECONFIG` names, made absolute, to keep in the agent's
/// settings; with several (kubectl merges them), none, said.
fn kubeconfig_from_env() -> Option<std::path::PathBuf> {
    let v = std::env::var_os("KUBECONFIG")?;
    let files: Vec<_> = std::env::split_paths(&v)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    match files.as_slice() {
        // One that does not exist is left to kube's inference, as before.
        [one] => {
            Some(std::path::absolute(one).unwrap_or_else(|_| one.clone())).filter(|p| p.exists())
        }
        [] => None,
        _ => {
            eprintln!("warning: KUBECONFIG names several files, which the agent merges now but does not keep: started again without this environment (a service unit), it would not find them; pass the member's kubeconfig with --kubeconfig FILE to keep it");
            None
        }
    }
}
