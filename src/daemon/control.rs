//! The control socket: a small, versioned request/response protocol over a
//! Unix socket, one JSON object per line. The CLI and the dashboard
//! (`towerctl ui`) speak it to the hub and agent daemons on this machine;
//! these types are the one definition both sides share.
//!
//! The socket lives in the private runtime dir (0700), so file permissions
//! are the access control: only the user who runs the daemon can talk to it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Protocol version; bumped on incompatible changes.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// State of the daemon.
    Status,
    /// Whether the daemon answers: answered by the control socket itself,
    /// at the same cost whatever the daemon holds (a `Status` lists every
    /// member: 10,000 of them made every CLI command pay for that).
    Ping,
    /// A stream of status snapshots: one response line now, then one every
    /// `interval_ms` (at least 100) until the client hangs up.
    Watch {
        #[serde(default = "default_watch_interval")]
        interval_ms: u64,
    },
    /// Hub: serve a port-forward of this machine. The hub checks the
    /// operator `token` and answers; the client then sends its listening
    /// TCP socket (`SCM_RIGHTS`, see `fdpass`), and the hub accepts on it
    /// and carries every connection to `authority` (a CONNECT authority:
    /// `NAME.NS.svc.CLUSTER:PORT`, …) as that operator, sending one line per
    /// accepted connection or failure, until the client hangs up.
    Forward {
        token: crate::tunnel::Secret,
        authority: String,
    },
    /// Hub: register a member and issue its first join token.
    ClusterAdd {
        name: String,
        /// Token lifetime in seconds; 0 = never expires.
        #[serde(default = "default_ttl")]
        ttl_secs: u64,
        /// Let the token join more than once (e.g. for agent pods that
        /// are recreated without their key).
        #[serde(default)]
        reusable: bool,
        #[serde(default)]
        impersonate: bool,
        /// Push mode: `NAME` → hub-side `HOST:PORT`.
        #[serde(default)]
        exposes: Vec<(String, String)>,
        #[serde(default)]
        labels: super::labels::Labels,
    },
    /// Hub: change a member's settings (only those given).
    ClusterSet {
        name: String,
        /// Require the agent to impersonate operators.
        #[serde(default)]
        impersonate: Option<bool>,
    },
    /// Hub: set and remove labels of a member; answers its labels.
    ClusterLabel {
        name: String,
        #[serde(default)]
        set: super::labels::Labels,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Hub: add (or replace) and remove push-mode exposes of a member.
    ClusterExpose {
        name: String,
        #[serde(default)]
        add: Vec<(String, String)>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Hub: issue a new join token; the old one stops working.
    ClusterRotate {
        name: String,
        #[serde(default = "default_ttl")]
        ttl_secs: u64,
        #[serde(default)]
        reusable: bool,
        /// Also forget the agent's registered key and cut its session: the
        /// agent must join again with the new token.
        #[serde(default)]
        new_key: bool,
    },
    /// Hub: refuse the member's agent from now on and cut its session.
    ClusterRevoke { name: String },
    /// Hub: forget a member and cut its session.
    ClusterRemove { name: String },
    /// Hub: issue an operator token (shown once).
    OperatorAdd {
        name: String,
        #[serde(default)]
        groups: Vec<String>,
    },
    /// Hub: list operators (never their tokens).
    OperatorList,
    /// Hub: add an access rule (`allow`/`deny`); answers the rule.
    AccessAdd {
        effect: super::access::Effect,
        /// `operator:NAME` or `group:NAME`.
        subject: String,
        /// Label selector over members (plus `towerctl.io/name`).
        clusters: String,
    },
    /// Hub: remove access rule `id`.
    AccessRemove { id: u64 },
    /// Hub: the access rules.
    AccessList,
    /// Hub: remove an operator; its tokens stop working at once.
    OperatorRemove { name: String },
    /// Hub: cut a member's live session ("disconnected by an operator").
    /// The member stays registered; its agent reconnects by itself, with
    /// backoff.
    Disconnect { name: String },
    /// Stop the daemon.
    Shutdown,
}

/// Default join token lifetime: 24 hours.
pub const DEFAULT_TOKEN_TTL: u64 = 24 * 3600;

fn default_ttl() -> u64 {
    DEFAULT_TOKEN_TTL
}

fn default_watch_interval() -> u64 {
    500
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub req: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        Response {
            v: VERSION,
            ok: true,
            error: None,
            data: serde_json::to_value(data).ok(),
        }
    }
    /// The refusal's text, or `default` when it gave none.
    pub fn error_or(self, default: &str) -> String {
        self.error.unwrap_or_else(|| default.to_string())
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            v: VERSION,
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }
}

/// The hub's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HubStatus {
    pub pid: u32,
    pub version: String,
    pub started_at: u64,
    pub tunnel_addr: String,
    pub gateway_addr: String,
    /// What agents dial (`ws://…/tunnel`).
    pub tunnel_url: String,
    /// What kubectl talks to (`https://…`).
    pub gateway_url: String,
    pub hub_key: String,
    pub ca_pem: String,
    /// File holding the local admin operator token (0600).
    pub admin_token_file: String,
    /// Where `/metrics` is served, if anywhere.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    pub clusters: Vec<ClusterStatus>,
    /// Why operators other than the local admin are refused now (a shared
    /// registry this hub cannot confirm as current: `--store-max-stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusing_operators: Option<String>,
    /// `--trusted-proxy` (and `--require-proxy-protocol`) as the hub runs
    /// with them, as flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub name: String,
    pub state: MemberState,
    /// Unix seconds since which the state holds, when known.
    pub since: Option<u64>,
    pub remote: Option<String>,
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub streams: u64,
    pub agent_version: Option<String>,
    /// Bytes received from / sent to the agent in the current session.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// Sessions after the first since the hub started.
    #[serde(default)]
    pub reconnects: u64,
    /// Recent RTT samples, oldest first (about one a keepalive interval).
    #[serde(default)]
    pub rtt_history_ms: Vec<f64>,
    /// Recent events, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// `sha256:` fingerprint of the registered agent key.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
    /// Unix seconds; `None` when the token never expires or is spent.
    #[serde(default)]
    pub token_expires_at: Option<u64>,
    #[serde(default)]
    pub token_state: TokenState,
    /// With several hubs on etcd: the hub holding the member's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default)]
    pub labels: super::labels::Labels,
    /// The member requires its agent to impersonate operators.
    #[serde(default)]
    pub impersonate: bool,
}

impl ClusterStatus {
    /// What an operator other than the local admin is shown on the
    /// gateway's `/towerctl/v1/clusters`: enough to pick a member and write
    /// a context (name, state, since, labels). The agent's address, key
    /// fingerprint, token state and traffic stay with the hub's admin.
    pub fn operator_view(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "state": self.state,
            "since": self.since,
            "labels": self.labels,
        })
    }
}

/// Defines a state enum with its wire names (serde, `Display`, `From<&str>`
/// for tests and older peers); a name it does not know reads as `Unknown`,
/// so a newer daemon never breaks an older dashboard.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $wire)] $variant,)+
            #[default]
            #[serde(other, rename = "unknown")]
            Unknown,
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Unknown => "unknown",
                }
            }
        }

        impl std::fmt::Display for $name {
            // `pad`: a width in the format (`{:<12}`) is kept; `write_str`
            // ignored it and the columns after it slipped.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> $name {
                match s {
                    $($wire => $name::$variant,)+
                    _ => $name::Unknown,
                }
            }
        }
    };
}

wire_enum! {
    /// A member as the hub sees it.
    MemberState {
        Connected = "connected",
        Disconnected = "disconnected",
        NeverConnected = "never_connected",
        Revoked = "revoked",
    }
}

wire_enum! {
    /// An agent as it sees itself.
    AgentState {
        Connecting = "connecting",
        Connected = "connected",
        /// Waiting before the next attempt (`retry_in_ms`).
        BackingOff = "backing_off",
        /// Stopped by the hub: the member was revoked.
        Revoked = "revoked",
        /// Stopped: the hub refused its credentials or key.
        Failed = "failed",
    }
}

wire_enum! {
    /// A member's join token.
    TokenState {
        Unused = "unused",
        Used = "used",
        Expired = "expired",
        Revoked = "revoked",
    }
}

/// Something that happened to a tunnel, for operators.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix seconds.
    pub at: u64,
    pub text: String,
}

/// How many events and RTT samples a daemon keeps per cluster.
pub const EVENTS_KEPT: usize = 20;
pub const RTT_SAMPLES_KEPT: usize = 60;

/// Appends to a bounded history.
pub fn push_bounded<T>(v: &mut std::collections::VecDeque<T>, item: T, cap: usize) {
    if v.len() == cap {
        v.pop_front();
    }
    v.push_back(item);
}

/// What `cluster add` gets back (its `Debug` leaves the token out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterAdded {
    pub name: String,
    #[serde(default)]
    pub exposes: Vec<(String, String)>,
    pub token: crate::tunnel::Secret,
    pub expires_at: Option<u64>,
    pub tunnel_url: String,
    pub hub_key: String,
    /// With several hubs on etcd: every other live hub's tunnel URL, for
    /// a join command that survives the loss of any one hub.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_hubs: Vec<String>,
    /// The member requires impersonation: the join command says
    /// `--impersonate`.
    #[serde(default)]
    pub impersonate: bool,
}

/// What `operator add` gets back (its `Debug` leaves the token out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorAdded {
    pub name: String,
    pub token: crate::tunnel::Secret,
    pub gateway_url: String,
    /// `sha256:<hex>` of the gateway CA certificate (DER), for `login --ca-hash`.
    pub ca_hash: String,
    /// The members the new operator reaches through the rules already
    /// there (its groups, or a rule left naming it); `None` from an older
    /// hub, or when the registry could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaches: Option<Vec<String>>,
}

/// An operator as listed (no secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorInfo {
    pub name: String,
    pub groups: Vec<String>,
    pub created_at: u64,
}

/// An agent's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub name: String,
    pub pid: u32,
    pub hub: String,
    pub state: AgentState,
    pub since: u64,
    pub rtt_ms: Option<f64>,
    pub attempt: u32,
    /// For `backing_off`: milliseconds until the next attempt.
    pub retry_in_ms: Option<u64>,
    pub last_error: Option<String>,
    /// What kind of failure `last_error` is, where it changes what `join`
    /// does (absent otherwise, and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    pub upstream: String,
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub rtt_history_ms: Vec<f64>,
    #[serde(default)]
    pub events: Vec<Event>,
    /// Dials the agent's policy refused since it started.
    #[serde(default)]
    pub denied_dials: u64,
    /// Push-mode listeners, `NAME=BOUND_ADDR`.
    #[serde(default)]
    pub exposed: Vec<String>,
    /// The agent's own version (absent from agents older than the field).
    #[serde(default)]
    pub version: Option<String>,
}

/// A kind of agent failure that callers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The `wss://` endpoint's TLS certificate was refused: `join` stops at
    /// once instead of waiting out its timeout.
    Certificate,
    /// The hub presented another SSH host key than the pinned one: `join`
    /// stops at once (exit 4); a running agent retries (see the agent loop).
    HostKey,
    /// Something in the hub's place answered what waiting will not change
    /// (a proxy's 407, an ingress's 404): `join` stops at once (exit 5).
    Misrouted,
}

/// What a running agent adds to a host key mismatch it retries after
/// (`join`, which stops, shows the error without it).
pub const RETRYING_NOTE: &str = " (not accepted; retrying";

impl FailureKind {
    pub fn of(e: &crate::tunnel::TunnelError) -> Option<FailureKind> {
        match e {
            crate::tunnel::TunnelError::HostKeyMismatch { .. } => Some(FailureKind::HostKey),
            e if e.is_certificate() => Some(FailureKind::Certificate),
            e if e.is_misrouted() => Some(FailureKind::Misrouted),
            _ => None,
        }
    }
}

/// Why an operator's disconnect cut a session, as the hub's event log and
/// the agent see it.
pub const DISCONNECT_REASON: &str = "disconnected by an operator";

/// Sends one request and reads one response, bounded in time (10s).
pub async fn call(socket: &Path, req: Request) -> Result<serde_json::Value> {
    call_timeout(socket, req, Duration::from_secs(10)).await
}

/// [`call`] with an explicit bound, for callers that must not hang on a
/// frozen daemon (status of many agents).
pub async fn call_timeout(
    socket: &Path,
    req: Request,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let resp = exchange(socket, req, timeout).await?;
    if resp.v != VERSION {
        anyhow::bail!("the daemon speaks control protocol v{} but this towerctl speaks v{VERSION}; restart the daemon with this towerctl", resp.v);
    }
    if !resp.ok {
        anyhow::bail!("{}", resp.error_or("the daemon refused the request"));
    }
    Ok(resp.data.unwrap_or(serde_json::Value::Null))
}

/// One request line and its answer line, whatever the answer says.
async fn exchange(socket: &Path, req: Request, timeout: Duration) -> Result<Response> {
    let fut = async {
        let stream = UnixStream::connect(socket).await.with_context(|| {
            format!(
                "the daemon's control socket '{}' does not take connections (it stopped or is restarting): see 'towerctl status'",
                socket.display()
            )
        })?;
        served_by_us(&stream, socket)?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(&Envelope { v: VERSION, req })?;
        line.push(b'\n');
        // Once the request may have reached the daemon, a connection it
        // closes (it stopped, was killed, crashed) leaves the change
        // unknown: said so, not as a parse error or a bare reset.
        let gone = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "the daemon closed the connection before it answered ({e}): it stopped or crashed, and what was asked may or may not have been done; see 'towerctl status' and its log ('towerctl logs'), then check before asking again"
            )
        };
        w.write_all(&line).await.map_err(|e| gone(&e))?;
        let mut reader = BufReader::new(r);
        let mut buf = String::new();
        match reader.read_line(&mut buf).await {
            Ok(0) => return Err(gone(&"no answer")),
            Ok(_) => {}
            Err(e) => return Err(gone(&e)),
        }
        let resp: Response =
            serde_json::from_str(&buf).context("malformed answer from the daemon")?;
        anyhow::Ok(resp)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("the daemon did not answer within {timeout:?}"))?
}

/// Whether a daemon answers on `socket`. Any well-formed answer counts
/// (a daemon of another control version still holds the socket).
pub async fn is_up(socket: &Path) -> bool {
    exchange(socket, Request::Ping, Duration::from_secs(10))
        .await
        .is_ok()
}

/// Serves the control socket until `cancel` fires. `handle` answers each
/// request; a `Watch` request is answered by calling it with `Status` once
/// per interval until the client goes away.
pub async fn serve<F, Fut>(
    listener: UnixListener,
    cancel: CancellationToken,
    handle: F,
    takeover: Option<Takeover>,
) where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => {
                tasks.close();
                let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
                return;
            }
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !peer_is_us(&stream) {
            tracing::warn!("control socket: refused a connection from another user");
            continue;
        }
        let handle = handle.clone();
        let cancel = cancel.clone();
        let takeover = takeover.clone();
        tasks.spawn(async move {
            let (r, mut w) = stream.into_split();
            // One request line, bounded: a client cannot make the daemon
            // buffer without limit.
            let mut reader = BufReader::new(r).take(MAX_REQUEST_LINE);
            let mut line = String::new();
            if tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_LINE {
                let mut out = serde_json::to_vec(&Response::err(format!(
                    "request longer than {MAX_REQUEST_LINE} bytes refused"
                )))
                .unwrap_or_default();
                out.push(b'\n');
                let _ = w.write_all(&out).await;
                return;
            }
            let resp = match serde_json::from_str::<Envelope>(&line) {
                Ok(Envelope {
                    v: VERSION,
                    req: Request::Watch { interval_ms },
                }) => {
                    let every = Duration::from_millis(interval_ms.max(100));
                    loop {
                        let mut out = match serde_json::to_vec(&handle(Request::Status).await) {
                            Ok(o) => o,
                            Err(_) => return,
                        };
                        out.push(b'\n');
                        if w.write_all(&out).await.is_err() {
                            return;
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(every) => {}
                        }
                    }
                }
                Ok(Envelope {
                    v: VERSION,
                    req: Request::Ping,
                }) => Response::ok(serde_json::Value::Null),
                Ok(Envelope {
                    v: VERSION,
                    req: req @ Request::Forward { .. },
                }) => {
                    let reader = reader.into_inner();
                    match takeover {
                        // Nothing may follow the request line before the
                        // answer: the descriptor comes after it.
                        Some(t) if reader.buffer().is_empty() => {
                            if let Ok(stream) = reader.into_inner().reunite(w) {
                                t(req, stream).await;
                            }
                            return;
                        }
                        Some(_) => Response::err("bytes after the forward request line refused"),
                        None => Response::err("this daemon does not serve port-forwards"),
                    }
                }
                Ok(env) if env.v == VERSION => handle(env.req).await,
                Ok(env) => Response::err(format!(
                    "control protocol v{} is not supported (this daemon speaks v{VERSION})",
                    env.v
                )),
                Err(e) => Response::err(format!("malformed request: {e}")),
            };
            if let Ok(mut out) = serde_json::to_vec(&resp) {
                out.push(b'\n');
                let _ = w.write_all(&out).await;
            }
        });
    }
}

/// Serves a request that takes its connection over (a forward), for as
/// long as it lasts.
pub type Takeover = std::sync::Arc<
    dyn Fn(Request, UnixStream) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync,
>;

/// One event of a forward served by the hub (see [`Request::Forward`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ForwardEvent {
    /// A connection was accepted on the forwarded port.
    Accepted { port: u16 },
    /// A connection could not be carried; the message names the cause.
    Failed { port: u16, error: String },
}

/// Hands a listening TCP socket to the hub on `socket`, which from then on
/// accepts on it and carries every connection to `authority` as the
/// operator of `token`. The events come on the returned receiver; it ends
/// when the hub goes away. Dropping it ends the forward on the hub (the
/// caller keeps its own copy of the listener). An `Err` on it is the hub's
/// refusal after the hand-over (a socket it would not take), and the last
/// item.
pub async fn forward(
    socket: &Path,
    token: &crate::tunnel::Secret,
    authority: &str,
    listener: &impl std::os::fd::AsRawFd,
) -> Result<tokio::sync::mpsc::Receiver<Result<ForwardEvent, String>>> {
    let stream = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(socket))
        .await
        .context("the hub did not accept within 2s")??;
    served_by_us(&stream, socket)?;
    let mut line = serde_json::to_vec(&Envelope {
        v: VERSION,
        req: Request::Forward {
            token: token.clone(),
            authority: authority.to_string(),
        },
    })?;
    line.push(b'\n');
    let mut stream = BufReader::new(stream);
    let answer = async {
        stream.get_mut().write_all(&line).await?;
        let mut buf = String::new();
        (&mut stream)
            .take(MAX_REQUEST_LINE)
            .read_line(&mut buf)
            .await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .context("the hub did not answer within 5s")??;
    let resp: Response = serde_json::from_str(&buf).context("malformed answer from the hub")?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error_or("the hub refused the forward"));
    }
    let fd = listener.as_raw_fd();
    stream
        .get_ref()
        .async_io(tokio::io::Interest::WRITABLE, || {
            super::fdpass::send_fd(stream.get_ref(), fd)
        })
        .await
        .context("could not hand the listening socket to the hub")?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut l = String::new();
        loop {
            l.clear();
            let mut limited = (&mut stream).take(MAX_REQUEST_LINE);
            tokio::select! {
                _ = tx.closed() => return,
                r = limited.read_line(&mut l) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return;
                    }
                    let Ok(resp) = serde_json::from_str::<Response>(&l) else { return };
                    if !resp.ok {
                        let _ = tx.send(Err(resp.error_or("the hub refused the forward"))).await;
                        return;
                    }
                    let Some(ev) = resp.data.and_then(|d| serde_json::from_value(d).ok()) else { continue };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// Longest request line the control socket reads.
const MAX_REQUEST_LINE: u64 = 1024 * 1024;

/// Whether the peer of a control connection runs as our own user (or
/// root). The socket's directory is already private (0700); this is the
/// second lock, for a directory whose mode was changed under us.
fn peer_is_us(s: &tokio::net::UnixStream) -> bool {
    match s.peer_cred() {
        Ok(c) => {
            // SAFETY: getuid has no preconditions.
            let me = unsafe { libc::getuid() };
            c.uid() == me || c.uid() == 0
        }
        Err(_) => false,
    }
}

/// The client's side of [`peer_is_us`]: the daemon answering on `socket`
/// runs as this user (or root), or this is root. Checked before anything
/// is sent: `port-forward` sends its operator token (perhaps the admin's)
/// and a listening socket, and a socket another user planted in a shared
/// runtime directory (`XDG_RUNTIME_DIR=/tmp`, a `sudo -E`) got them.
fn served_by_us(s: &UnixStream, socket: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match s.peer_cred() {
        Ok(c) if c.uid() == me || c.uid() == 0 || me == 0 => Ok(()),
        Ok(c) => anyhow::bail!(
            "'{}' is served by another user (uid {}), not by a towerctl daemon of yours (uid {me}): nothing was sent to it; check XDG_RUNTIME_DIR",
            socket.display(),
            c.uid()
        ),
        Err(e) => anyhow::bail!("cannot tell who serves '{}': {e}", socket.display()),
    }
}

/// Binds a control socket, replacing a stale one left by a dead daemon.
/// Fails when a live daemon answers on it.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    crate::paths::ensure_private_dir(path.parent().unwrap_or(Path::new("/")))?;
    if path.exists() {
        if is_up(path).await {
            anyhow::bail!("a daemon is already running on '{}'", path.display());
        }
        let _ = std::fs::remove_file(path);
    }
    if path.as_os_str().len() >= 104 {
        anyhow::bail!("the control socket path '{}' is too long for a Unix socket (max ~104 bytes); set XDG_RUNTIME_DIR to a shorter directory", path.display());
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on '{}'", path.display()))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Subscribes to a daemon's status snapshots; each line is one `Response`.
/// The stream ends when the daemon goes away or answers something
/// malformed; dropping the receiver closes the connection (even while the
/// daemon is silent, e.g. stopped with SIGSTOP).
pub async fn watch(
    socket: &Path,
    interval: Duration,
) -> Result<tokio::sync::mpsc::Receiver<serde_json::Value>> {
    let stream = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(socket))
        .await
        .context("the daemon did not accept within 2s")??;
    served_by_us(&stream, socket)?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(&Envelope {
        v: VERSION,
        req: Request::Watch {
            interval_ms: interval.as_millis() as u64,
        },
    })?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let _keep_open = w;
        let mut lines = BufReader::new(r).lines();
        loop {
            let l = tokio::select! {
                _ = tx.closed() => break,
                l = lines.next_line() => match l {
                    Ok(Some(l)) => l,
                    _ => break,
                },
            };
            let Ok(resp) = serde_json::from_str::<Response>(&l) else {
                break;
            };
            if resp.v != VERSION || !resp.ok {
                break;
            }
            if tx.send(resp.data.unwrap_or_default()).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn states_keep_their_wire_names() {
        assert_eq!(
            serde_json::to_string(&MemberState::NeverConnected).unwrap(),
            "\"never_connected\""
        );
        assert_eq!(
            serde_json::from_str::<AgentState>("\"backing_off\"").unwrap(),
            AgentState::BackingOff
        );
        // A state a newer daemon invents reads as unknown, not an error.
        assert_eq!(
            serde_json::from_str::<TokenState>("\"quantum\"").unwrap(),
            TokenState::Unknown
        );
        assert_eq!(AgentState::from("revoked"), AgentState::Revoked);
        assert_eq!(MemberState::Revoked.to_string(), "revoked");
        // Widths in a format are kept (status's columns).
        assert_eq!(format!("{:<12}|", AgentState::Connected), "connected   |");
    }
}

#[cfg(test)]
mod debug_tests {
    /// What `cluster add` and `operator add` get back never prints its
    /// token with `{:?}`.
    #[test]
    fn answers_with_tokens_leave_them_out_of_debug() {
        let c: super::ClusterAdded = serde_json::from_value(serde_json::json!({
            "name": "alpha", "token": "tj_topsecret", "expires_at": null,
            "tunnel_url": "ws://h/tunnel", "hub_key": "sha256:x",
        }))
        .unwrap();
        let o: super::OperatorAdded = serde_json::from_value(serde_json::json!({
            "name": "bob", "token": "top_topsecret", "gateway_url": "https://h",
            "ca_hash": "sha256:y",
        }))
        .unwrap();
        for shown in [format!("{c:?}"), format!("{o:?}")] {
            assert!(!shown.contains("topsecret"), "{shown}");
            assert!(shown.contains("sha256:"), "{shown}");
        }
    }
}

#[cfg(test)]
mod exchange_tests {
    /// A daemon that takes the request and closes without an answer (it
    /// was killed) is said so, with what to check; not as a parse error.
    #[tokio::test]
    async fn a_daemon_that_closes_before_answering_is_said_so() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            let _ = tokio::io::BufReader::new(s).read_line(&mut line).await;
        });
        let e = super::call(&path, super::Request::Status)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("closed the connection before it answered")
                && e.contains("may or may not have been done"),
            "{e}"
        );
    }
}
