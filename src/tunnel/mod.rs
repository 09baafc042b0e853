//! The tunnel: one WebSocket per agent, one SSH connection inside it.
//!
//! The hub is the SSH server, the agent the SSH client. The hub opens one
//! `forwarded-tcpip` channel toward the agent per upstream connection; the
//! agent accepts only the targets it knows. This module knows nothing of
//! the hub's registry, the gateway or Kubernetes: it moves bytes, proves
//! identities and measures the link.

pub mod backoff;
pub mod client;
pub mod counted;
pub mod dial;
pub mod first;
pub mod flow;
pub mod framecap;
pub mod keys;
pub mod proxy;
pub mod quiet;
pub mod server;
pub mod slurp;
pub mod splice;
pub mod tls;
pub mod ws;

use std::borrow::Cow;
use std::time::Duration;

/// Channel target: the member's Kubernetes API server, spoken to as HTTP/1.1.
pub const TARGET_APISERVER: &str = "kube-apiserver";
/// Channel target used as a ping: the agent refuses it at once, and the
/// round trip of the refusal is the hub's RTT measurement (russh's server
/// handle has no ping of its own).
pub const TARGET_PING: &str = "towerctl.ping";
/// Channel target the agent opens toward the hub just before it closes the
/// session on purpose, with the reason as the originator address: russh's
/// server drops the text of a peer's SSH disconnect, so without it the hub
/// could only record "session closed". The hub refuses the channel (the
/// refusal is the acknowledgment) and keeps the reason.
pub const TARGET_FAREWELL: &str = "towerctl.farewell";
/// Longest farewell reason the hub keeps.
pub const FAREWELL_MAX: usize = 200;
/// Channel target the hub opens toward an agent right after its login,
/// with every hub of its group's tunnel URL in the originator address
/// (space-separated): the agent keeps them to dial when its session ends,
/// after the hubs of its join command, so that an agent joined before
/// another hub existed fails over to it too. The agent refuses the channel
/// (the refusal is the acknowledgment). Sent to agents that declare
/// [`FEATURE_HUBS`].
pub const TARGET_HUBS: &str = "towerctl.hubs";
/// The agent's feature word for [`TARGET_HUBS`].
pub const FEATURE_HUBS: &str = "hubs";
/// The agent's feature word for raw channels whose open carries the
/// window the hub asks for and the client's first bytes
/// ([`crate::daemon::wire::RawOpen`]).
pub const FEATURE_OPEN_EARLY: &str = "open-early";
/// The agent's feature word for API channels whose open carries the
/// first bytes of the request on them ([`crate::daemon::wire::FirstRequest`]):
/// a request on a new channel reaches the member one round trip sooner.
pub const FEATURE_REQUEST_IN_OPEN: &str = "request-in-open";
/// The agent's feature word for a client's own impersonation carried
/// under the hub's names ([`crate::daemon::clientas::CARRIED_PREFIX`]):
/// an agent without it would strip them, and the request would run as
/// the operator itself, so the hub refuses such requests to it.
pub const FEATURE_CLIENT_AS: &str = "client-as";

/// Test hook: whether the environment variable `var` (comma-separated
/// feature words) names `feature`, which the daemon then acts as if it did
/// not know, standing in for an older one in the tests of mixed versions
/// (`TOWERCTL_TEST_AGENT_WITHOUT`, `TOWERCTL_TEST_HUB_WITHOUT`).
pub fn left_out_for_tests(var: &str, feature: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v.split(',').any(|w| w.trim() == feature))
}
/// Most hub URLs an agent takes from [`TARGET_HUBS`], and the longest one.
pub const MAX_LEARNED_HUBS: usize = 16;
pub const MAX_HUB_URL: usize = 512;

/// The hub URLs in a [`TARGET_HUBS`] list that an agent may dial: `ws://`
/// or `wss://` with a host, printable ASCII, at most [`MAX_HUB_URL`] bytes
/// each, at most [`MAX_LEARNED_HUBS`], in `url`'s normal form; anything
/// else is dropped.
pub fn parse_hub_list(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for u in list.split_ascii_whitespace() {
        if out.len() == MAX_LEARNED_HUBS {
            break;
        }
        // Printable ASCII only (shown in logs and status), kept in the
        // parser's normal form (`wss://h:443/t` and `wss://h/t` are one).
        let Some(u) = (u.len() <= MAX_HUB_URL && u.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| url::Url::parse(u).ok())
            .flatten()
            .filter(|p| matches!(p.scheme(), "ws" | "wss") && p.host_str().is_some())
            .map(String::from)
        else {
            continue;
        };
        if !out.contains(&u) {
            out.push(u);
        }
    }
    out
}

/// Prefix of a hub's disconnect reason that explains an authentication
/// refusal; the agent prints it and stops.
pub const AUTH_PREFIX: &str = "auth: ";
/// Prefix of a hub's disconnect reason that means the cluster was revoked;
/// the agent stops instead of reconnecting.
pub const REVOKED_PREFIX: &str = "revoked: ";

/// Default interval between keepalives; a peer silent for three of them is
/// declared dead.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

/// Algorithms in our order of preference. AES-256-GCM first: with AES-NI it
/// is roughly twice as fast as chacha20-poly1305 (russh's default) here.
pub fn preferred() -> russh::Preferred {
    use russh::cipher;
    russh::Preferred {
        cipher: Cow::Borrowed(&[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::CHACHA20_POLY1305,
        ]),
        // No compression: none is negotiable before authentication (an
        // unauthenticated peer must not make the hub inflate its data), and
        // after it the CPU is better spent on the cipher.
        compression: Cow::Borrowed(&[russh::compression::NONE]),
        // Elliptic-curve (and post-quantum hybrid) key exchanges only.
        // russh's default list ends with finite-field Diffie-Hellman groups
        // up to 8192 bits, computed on the session's task with a
        // full-length exponent: anyone reaching the tunnel port, before
        // any credential, offered only group18 and a trivial public value,
        // and cost the hub a large share of a CPU-second per connection,
        // on the thread that carries every member's tunnel. Both ends are
        // towerctl, which never needs them.
        kex: Cow::Borrowed(&[
            russh::kex::MLKEM768X25519_SHA256,
            russh::kex::CURVE25519,
            russh::kex::CURVE25519_PRE_RFC_8731,
            russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
            russh::kex::EXTENSION_SUPPORT_AS_SERVER,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        ..russh::Preferred::default()
    }
}

/// Largest window and packet sizes russh handles well: a bigger window keeps
/// a single bulk stream from stalling on window updates over a high-RTT link.
pub const WINDOW_SIZE: u32 = 16 * 1024 * 1024;
/// The largest packet each side takes (and so sends: the smaller of the
/// two ends' sizes). 65,535 bytes, the most russh's client takes without
/// logging an error: half the packets of 32 KiB for bulk (callgrind, 64 MiB
/// each way, sending side, with no masking copy: 3,988 → 3,738
/// instructions per KiB on the agent's download, 3,977 → 3,730 on the
/// hub's upload). An older peer asking for 32 KiB still gets 32 KiB.
pub const MAX_PACKET: u32 = 65_535;

/// tungstenite's read buffer, allocated for the WebSocket upgrade and
/// dropped with tungstenite after it: `ws::WsIo` reads the frames itself.
pub const WS_READ_BUFFER: usize = 8 * 1024;

/// A secret string whose `Debug` prints nothing, so it cannot leak into a
/// log line by accident.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Errors of the tunnel as the agent sees them; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "the hub's host key does not match the pinned one: expected '{expected}', the hub presented '{actual}'; \
         if the hub was reinstalled, read its key on the hub ('towerctl status' shows it, as 'towerctl cluster rotate NAME' prints it in a new join command) and pass it as --hub-key"
    )]
    HostKeyMismatch { expected: String, actual: String },
    #[error("{}", auth_message(name, reason.as_deref()))]
    AuthRejected {
        name: String,
        reason: Option<String>,
    },
    #[error("{reason}")]
    Revoked { reason: String },
    #[error("cannot reach the hub at '{url}': {reason}")]
    Unreachable { url: String, reason: String },
    /// Something on the way answered in the hub's place and will answer
    /// the same until it is reconfigured (a proxy wanting credentials, an
    /// ingress with no route to the hub, a redirect): retried by a running
    /// agent, but `join` reports it at once.
    #[error("cannot reach the hub at '{url}': {reason}")]
    Misrouted { url: String, reason: String },
    #[error("invalid hub URL '{url}': {reason} (expected ws://HOST:PORT or wss://HOST:PORT)")]
    BadUrl { url: String, reason: String },
    #[error("the SSH handshake with the hub failed: {0}")]
    Handshake(String),
    /// The `wss://` endpoint's certificate was refused. Retried (an ingress
    /// certificate may be fixed later), but `join` reports it at once.
    #[error("the TLS certificate of '{url}' was refused: {failure}")]
    Certificate {
        url: String,
        failure: Box<tls::CertFailure>,
    },
}

impl TunnelError {
    /// Errors that retrying cannot fix: the agent stops instead of looping.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            TunnelError::HostKeyMismatch { .. }
                | TunnelError::AuthRejected { .. }
                | TunnelError::Revoked { .. }
                | TunnelError::BadUrl { .. }
        )
    }

    /// A refused TLS certificate: a configuration problem that waiting for
    /// the join timeout cannot fix, though a running agent keeps retrying.
    pub fn is_certificate(&self) -> bool {
        matches!(self, TunnelError::Certificate { .. })
    }

    /// An answer from something in the hub's place that waiting will not
    /// change ([`TunnelError::Misrouted`]).
    pub fn is_misrouted(&self) -> bool {
        matches!(self, TunnelError::Misrouted { .. })
    }
}

/// What the peer of `s` has sent so far, at most `max` bytes, read without
/// waiting: nothing when it has sent nothing yet, has ended or failed (the
/// stream's reader meets those again). It reads the socket itself:
/// tokio's `try_read` answers "would block" until its reactor has seen the
/// socket readable, which for a connection accepted a moment ago it often
/// has not, though the client's first bytes are there.
pub fn sent_so_far(s: &tokio::net::TcpStream, max: usize) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
    let max = max.min(buf.len());
    // SAFETY: `recv` writes at most `max` bytes into `buf`, which has room
    // for them, and returns how many it wrote (or -1); the socket stays
    // non-blocking (MSG_DONTWAIT in any case).
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            max,
            libc::MSG_DONTWAIT,
        )
    };
    if n <= 0 {
        return Vec::new();
    }
    // SAFETY: the first `n` bytes were written by `recv`.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) }.to_vec()
}

/// Bytes a tunnel socket may hold not yet sent before the kernel stops
/// calling it writable (`TCP_NOTSENT_LOWAT`). Every stream of a member
/// shares its one tunnel connection: on a link slower than the sender,
/// what sits unsent in the socket is a queue that every other stream's
/// packets (a kubectl request's answer, a keepalive) wait behind, and TCP
/// grows it to megabytes under a download (1.3 MB measured at 20 Mbit/s:
/// kubectl calls took 2.2–2.7 s instead of 0.1). What was sent but not
/// acknowledged is not bounded by it, so a fast link keeps its pace.
pub const NOTSENT_LOWAT: libc::c_int = 128 * 1024;

/// Sets [`NOTSENT_LOWAT`] on a tunnel socket (either end).
pub fn notsent_lowat(s: &impl std::os::fd::AsRawFd) {
    let v = NOTSENT_LOWAT;
    // SAFETY: a valid descriptor and an int option of its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(
            "cannot set TCP_NOTSENT_LOWAT: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sets TCP_NODELAY: the tunnel carries small interactive writes (kubectl
/// requests, exec keystrokes) and Nagle would hold them for an ACK.
pub fn nodelay(s: &tokio::net::TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::warn!("cannot set TCP_NODELAY: {e}");
    }
}

fn auth_message(name: &str, reason: Option<&str>) -> String {
    auth_words(
        name,
        reason,
        std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    )
}

fn auth_words(name: &str, reason: Option<&str>, in_pod: bool) -> String {
    let mut text = match reason {
        Some(r) => format!("the hub refused the credentials of cluster '{name}': {}", r.trim_start_matches(AUTH_PREFIX)),
        None => format!(
            "the hub refused the credentials of cluster '{name}': the join token is wrong, expired or already used, \
             and this agent's key is not registered; run 'towerctl cluster rotate {name}' on the hub for a new join command \
             (or 'towerctl cluster add {name}' if it was removed), then join again"
        ),
    };
    // In a pod, joining again is applying the manifests again: the token
    // is in their Secret, and the pod restarting reads the same one.
    if in_pod {
        text.push_str(&format!(
            " (for this agent's pod: add --print-manifest to that join command and apply what it prints, \
             which replaces the Secret holding the token; then 'kubectl rollout restart deployment/towerctl-agent-{name}' \
             in its namespace if the pod does not restart by itself)"
        ));
    }
    text
}

pub use splice::{splice, splice_from, WriteBytes, WriteInto};

/// Lines allowed per minute for a kind of message any peer can trigger (a
/// failed login, an accept error while out of descriptors): the rest go to
/// debug, so that a flood cannot rotate the log away. Said once a minute
/// when lines start being held back.
pub struct LogBudget {
    what: &'static str,
    per_minute: u32,
    state: std::sync::Mutex<Option<(std::time::Instant, u32)>>,
}

impl LogBudget {
    /// `what` names the lines in the hold-back message ("failed tunnel
    /// logins").
    pub const fn new(what: &'static str, per_minute: u32) -> LogBudget {
        LogBudget {
            what,
            per_minute,
            state: std::sync::Mutex::new(None),
        }
    }

    /// Whether one more line may be logged at its level now.
    pub fn admit(&self) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        match minute_budget(&mut st, self.per_minute) {
            Budgeted::FirstHeld => {
                tracing::info!(
                    "more than {} {} this minute; the rest are logged at debug",
                    self.per_minute,
                    self.what
                );
                false
            }
            b => b == Budgeted::Admitted,
        }
    }
}

/// What [`minute_budget`] decided for one more line.
#[derive(Debug, PartialEq, Eq)]
pub enum Budgeted {
    Admitted,
    /// The first line past the budget this minute: say that the rest are
    /// held back.
    FirstHeld,
    Held,
}

/// Counts one more line against `per_minute` lines a minute, `state`
/// holding the start of the current minute and the lines counted in it.
/// [`LogBudget`] keeps one such state; the hub keeps one per member.
pub fn minute_budget(state: &mut Option<(std::time::Instant, u32)>, per_minute: u32) -> Budgeted {
    let now = std::time::Instant::now();
    let (start, n) = state.get_or_insert((now, 0));
    if now.duration_since(*start) >= std::time::Duration::from_secs(60) {
        (*start, *n) = (now, 0);
    }
    *n = n.saturating_add(1);
    if *n <= per_minute {
        Budgeted::Admitted
    } else if *n == per_minute + 1 {
        Budgeted::FirstHeld
    } else {
        Budgeted::Held
    }
}

/// A positive count from environment variable `name` (read by the
/// caller once, at start), or `default` when it is not set; a value that
/// is not a positive number is said in the log and `default` used.
pub fn positive_env(name: &str, default: usize) -> usize {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => n,
        _ => {
            tracing::warn!(
                "{name}={} is not a positive number; using {default}",
                escape_for_log(&v, 40)
            );
            default
        }
    }
}

/// An untrusted string made safe for one log line: control characters and
/// quotes escaped (no forged lines, no terminal escapes), cut to `max`
/// characters with the original length noted.
pub fn escape_for_log(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str(&format!("…({} bytes)", s.len()));
            return out;
        }
        out.extend(c.escape_debug());
    }
    out
}

/// `s` as text that is safe on a terminal and in one line, at most `max`
/// characters: control characters (escape sequences, carriage returns,
/// newlines) and the invisible formatting ones (bidirectional overrides,
/// zero-width characters, line and paragraph separators, the BOM, tag
/// characters) become spaces. For what a peer says that the hub shows
/// operators as words (an agent's dial error, its farewell).
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_control() || is_invisible(c) {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// `s` for a terminal table: as it is when every character shows as
/// itself; otherwise control and invisible formatting characters written
/// as escapes (`\u{202e}`), and backslashes doubled so that no text can
/// pass for an escape, so that what a client sent (a request path in the
/// audit log) can neither move the cursor nor reorder the line, and is
/// still seen for what it was.
pub fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs_escape(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A JSON text (one `towerctl audit -o json` line) with the control and
/// invisible characters that JSON leaves as they are (C1 controls,
/// bidirectional overrides, zero-width characters) written as `\uXXXX`
/// escapes: the same value to a JSON reader, inert on a terminal.
pub fn json_shown(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.chars().any(|c| c.is_control() || is_invisible(c)) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_control() || is_invisible(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `s` with its control and invisible formatting characters written as
/// escapes (`\u{1b}`), everything else as it is: for text already
/// escaped once where it came in (the daemons' log lines, which hold
/// `escape_for_log`'s backslashes), shown again on a terminal.
pub fn controls_escaped(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || is_invisible(c)) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() || is_invisible(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_invisible(c)
}

/// Unicode format characters and separators that change how the text
/// around them shows without showing themselves.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}' | '\u{E0000}'..='\u{E007F}')
}

pub use ws::Liveness;

/// Waits for the answer to one keepalive (`answer`: `true` when it came,
/// `false` when the session ended). The peer is declared dead (`None`)
/// only when a whole `deadline` passes with neither the answer nor any
/// message from it. A ping shares the connection with the data: on a slow
/// link busy with a download, it waits behind megabytes (a stream's window
/// and the socket buffers) for longer than any deadline, while the data
/// itself shows the peer is there. Measured before: a 1 MiB download over
/// 100 kbit/s got the tunnel declared dead after 28 s, cutting every
/// stream of the member. A silent peer is still dead within
/// `interval + deadline`.
pub async fn await_keepalive<F>(
    answer: F,
    deadline: std::time::Duration,
    alive: &Liveness,
) -> Option<std::time::Duration>
where
    F: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    tokio::pin!(answer);
    let mut seen = alive.seen();
    loop {
        match tokio::time::timeout(deadline, &mut answer).await {
            Ok(true) => return Some(start.elapsed()),
            Ok(false) => return None,
            Err(_) => {
                let now = alive.seen();
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

/// Runs `fut` to its end, unless `idle` passes with `progress()` unchanged
/// (nothing more heard from the peer) or `cap` passes in all: `Err` with
/// the time it ran. A login over a long or bufferbloated link takes seven
/// round trips or so: a fixed 15 s locked a member two seconds away out
/// for good, each attempt cut while the handshake was still moving; a
/// peer that stops answering is still cut `idle` after its last message.
pub async fn with_progress<F: std::future::Future>(
    fut: F,
    idle: std::time::Duration,
    cap: std::time::Duration,
    progress: impl Fn() -> u64,
) -> Result<F::Output, std::time::Duration> {
    let start = tokio::time::Instant::now();
    let end = start + cap;
    // Looked at ten times an idle bound: a peer quiet since its last
    // message is cut within a tenth of `idle` past it.
    let step = (idle / 10).max(std::time::Duration::from_millis(10));
    tokio::pin!(fut);
    let mut seen = progress();
    let mut last = start;
    let mut next = start + step;
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep_until(next.min(end)) => {
                let now = tokio::time::Instant::now();
                let heard = progress();
                if heard != seen {
                    (seen, last) = (heard, now);
                }
                if now >= end || now.duration_since(last) >= idle {
                    return Err(now.duration_since(start));
                }
                next = now + step;
            }
        }
    }
}

/// A login's [`with_progress`] bound in all (hub and agent alike).
pub const LOGIN_CAP: std::time::Duration = std::time::Duration::from_secs(60);

/// How long one keepalive ping may take before the peer is declared dead.
/// A ping goes out at most one interval after the last answer, so the
/// peer is dead within `interval + ping_deadline`: 2.8 intervals, inside
/// the three-interval bound with room for scheduling and the check itself
/// (two full intervals measured 3.1 s with a 1 s interval).
pub fn ping_deadline(keepalive: std::time::Duration) -> std::time::Duration {
    keepalive * 9 / 5
}

/// A ping's deadline on a link whose round trip is `rtt` (the last one
/// measured; before any, a seventh of the login's time, which took about
/// seven): [`ping_deadline`], or three round trips where that is longer.
/// A member far away on a short `--keepalive` (2 s round trip, 1 s
/// interval) logged in and was declared dead at its first ping, again and
/// again.
pub fn ping_deadline_for(
    keepalive: std::time::Duration,
    rtt: std::time::Duration,
) -> std::time::Duration {
    ping_deadline(keepalive).max(rtt * 3)
}

#[cfg(test)]
mod progress_tests {
    use super::with_progress;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_moving_login_runs_past_its_idle_bound_and_a_stalled_one_does_not() {
        let moved = Arc::new(AtomicU64::new(0));
        let ticker = {
            let moved = moved.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    moved.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let idle = Duration::from_secs(5);
        let cap = Duration::from_secs(60);
        let long = tokio::time::sleep(Duration::from_secs(30));
        let r = with_progress(long, idle, cap, || moved.load(Ordering::Relaxed)).await;
        assert!(r.is_ok(), "a login still moving at 30 s was cut: {r:?}");
        ticker.abort();
        // Nothing moves: cut `idle` after the start.
        let stalled = tokio::time::sleep(Duration::from_secs(30));
        let r = with_progress(stalled, idle, cap, || 7).await;
        assert_eq!(r.unwrap_err(), idle);
        // Moving for ever: cut at the cap.
        let moving = AtomicU64::new(0);
        let never = std::future::pending::<()>();
        let r = with_progress(never, idle, cap, || moving.fetch_add(1, Ordering::Relaxed)).await;
        assert_eq!(r.unwrap_err(), cap);
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_that_stops_moving_is_cut_an_idle_bound_after_its_last_message() {
        let moved = Arc::new(AtomicU64::new(0));
        {
            let moved = moved.clone();
            tokio::spawn(async move {
                // Messages at 2, 4, … 20 s, then silence.
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    moved.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let idle = Duration::from_secs(5);
        let r = with_progress(
            std::future::pending::<()>(),
            idle,
            Duration::from_secs(60),
            || moved.load(Ordering::Relaxed),
        )
        .await;
        // Seen at the first look after 20 s (a tenth of `idle` apart), cut
        // `idle` later.
        let took = r.unwrap_err();
        assert!(
            took >= Duration::from_secs(25) && took <= Duration::from_millis(25_500),
            "cut after {took:?}"
        );
    }

    #[test]
    fn a_far_peer_gets_three_round_trips_to_answer_a_ping() {
        let s = Duration::from_secs;
        assert_eq!(
            super::ping_deadline_for(s(1), Duration::from_millis(5)),
            Duration::from_millis(1800)
        );
        assert_eq!(super::ping_deadline_for(s(1), s(2)), s(6));
        assert_eq!(super::ping_deadline_for(s(10), s(2)), s(18));
    }
}

#[cfg(test)]
mod hub_list_tests {
    #[test]
    fn a_hub_list_keeps_only_what_an_agent_may_dial() {
        let long = format!("ws://{}.example/", "h".repeat(super::MAX_HUB_URL));
        let list = format!(
            "ws://a:1/tunnel  wss://b.example:443/t\tws://a:1/tunnel http://c/ file:///etc/passwd \
             ws:// {long} not-a-url wss://[::1]:8443/t ws://e/\u{1b}[2J ws://f/\u{202e}x \
             wss://b.example/t"
        );
        assert_eq!(
            super::parse_hub_list(&list),
            ["ws://a:1/tunnel", "wss://b.example/t", "wss://[::1]:8443/t"]
        );
        let many: Vec<String> = (0..40).map(|i| format!("ws://h{i}:1/")).collect();
        assert_eq!(
            super::parse_hub_list(&many.join(" ")).len(),
            super::MAX_LEARNED_HUBS
        );
        assert!(super::parse_hub_list("").is_empty());
    }
}

#[cfg(test)]
mod keepalive_tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_counts_while_the_peer_keeps_sending() {
        let alive = Liveness::default();
        let feeder = {
            let alive = alive.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    alive.saw();
                }
            })
        };
        // Answers after 4 s against a 1 s deadline: the peer sent all along.
        let answer = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            true
        };
        let rtt = await_keepalive(answer, Duration::from_secs(1), &alive).await;
        assert_eq!(rtt.map(|d| d.as_secs()), Some(4));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dead_after_one_deadline() {
        let alive = Liveness::default();
        let start = tokio::time::Instant::now();
        let never = std::future::pending::<bool>();
        assert_eq!(
            await_keepalive(never, Duration::from_secs(1), &alive).await,
            None
        );
        assert_eq!(start.elapsed().as_secs(), 1);
        // A peer that sent for a while, then went silent, is dead one
        // deadline after its last message.
        let feeder = {
            let alive = alive.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    alive.saw();
                }
            })
        };
        let start = tokio::time::Instant::now();
        let never = std::future::pending::<bool>();
        assert_eq!(
            await_keepalive(never, Duration::from_secs(1), &alive).await,
            None
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_secs(4),
            "{waited:?}"
        );
        feeder.abort();
        // A session that ended is no answer.
        assert_eq!(
            await_keepalive(async { false }, Duration::from_secs(1), &alive).await,
            None
        );
    }
}

#[cfg(test)]
mod auth_words_tests {
    #[test]
    fn a_refused_agent_in_a_pod_is_told_to_apply_its_manifests_again() {
        let r = Some("auth: the join token is wrong or cluster 'beta' is not registered");
        let out = super::auth_words("beta", r, false);
        assert!(
            out.contains("is not registered") && !out.contains("--print-manifest"),
            "{out}"
        );
        for reason in [r, None] {
            let pod = super::auth_words("beta", reason, true);
            assert!(
                pod.contains("add --print-manifest to that join command and apply")
                    && pod.contains("deployment/towerctl-agent-beta"),
                "{pod}"
            );
        }
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn shown_text_keeps_words_and_writes_controls_and_bidi_as_escapes() {
        assert!(matches!(
            super::shown("/api/v1/naïve"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            super::shown("/x/\u{9b}2J\u{202e}ateb\u{1b}[1m\n"),
            "/x/\\u{9b}2J\\u{202e}ateb\\u{1b}[1m\\u{a}"
        );
        // Text that looks like an escape is not taken for one.
        assert_eq!(super::shown("/a\\u{202e}b"), "/a\\\\u{202e}b");
        // JSON: the same value, nothing raw on a terminal.
        let json = serde_json::to_string(&"p\u{9b}\u{202e}\u{e0041}é").unwrap();
        let safe = super::json_shown(&json);
        assert_eq!(safe, "\"p\\u009b\\u202e\\udb40\\udc41é\"");
        assert_eq!(
            serde_json::from_str::<String>(&safe).unwrap(),
            "p\u{9b}\u{202e}\u{e0041}é"
        );
    }

    /// The budget lets its lines through, then holds the rest back until
    /// the minute is over.
    #[test]
    fn a_log_budget_lets_its_lines_through_then_holds_the_rest() {
        let b = super::LogBudget::new("test lines", 3);
        let got: Vec<bool> = (0..6).map(|_| b.admit()).collect();
        assert_eq!(got, [true, true, true, false, false, false]);
        // A minute later: a new budget.
        if let Ok(mut st) = b.state.lock() {
            let (start, _) = st.as_mut().unwrap();
            *start -= std::time::Duration::from_secs(61);
        }
        assert!(b.admit());
    }

    #[test]
    fn untrusted_strings_stay_on_one_short_line() {
        let forged = format!(
            "alpha\n2026-12-01T00:00:00Z INFO admin logged in{}",
            "x".repeat(100_000)
        );
        let e = super::escape_for_log(&forged, 64);
        assert!(!e.contains('\n') && e.len() < 200, "{e}");
        assert!(e.starts_with("alpha\\n2026"), "{e}");
        assert!(e.ends_with("bytes)"), "{e}");
        assert_eq!(super::escape_for_log("beta", 64), "beta");
        assert_eq!(super::escape_for_log("\u{1b}[31m", 64), "\\u{1b}[31m");
    }
}

/// The vendored russh's session loops against each other over a real TCP
/// connection (`vendor/russh/PATCHES.md`, change nine).
#[cfg(test)]
mod session_loop_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use russh::keys::{Algorithm, PrivateKey};
    use russh::{server, Channel, ChannelMsg};
    use tokio::io::AsyncWriteExt;

    /// What each side sends the other, on one channel.
    const EACH: usize = 16 << 20;

    /// Writes `EACH` bytes into the channel while reading `EACH` from it;
    /// returns what it read.
    async fn both_ways<S>(mut ch: Channel<S>) -> usize
    where
        S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        let mut w = ch.make_writer();
        let writing = tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            for _ in 0..EACH / chunk.len() {
                w.write_all(&chunk).await.unwrap();
            }
            w.flush().await.unwrap();
            w
        });
        let mut got = 0;
        while got < EACH {
            match ch.wait().await {
                Some(ChannelMsg::Data { data }) => got += data.len(),
                Some(_) => {}
                None => break,
            }
        }
        let _w = writing.await.unwrap();
        got
    }

    /// The hub's side: on a session channel opened to it, sends back what
    /// it received (`BothWays`: [`both_ways`]) or only reads it to its end
    /// (`Sink`), then says how much came.
    struct Srv(tokio::sync::mpsc::UnboundedSender<usize>, Serve);

    #[derive(Clone, Copy)]
    enum Serve {
        BothWays,
        Sink,
    }

    impl server::Handler for Srv {
        type Error = russh::Error;

        async fn auth_none(&mut self, _: &str) -> Result<server::Auth, Self::Error> {
            Ok(server::Auth::Accept)
        }

        async fn channel_open_session(
            &mut self,
            channel: Channel<server::Msg>,
            reply: server::ChannelOpenHandle,
            _: &mut server::Session,
        ) -> Result<(), Self::Error> {
            reply.accept().await;
            let (done, serve) = (self.0.clone(), self.1);
            let mut channel = channel;
            tokio::spawn(async move {
                let got = match serve {
                    Serve::BothWays => both_ways(channel).await,
                    Serve::Sink => read_to_end(&mut channel).await,
                };
                let _ = done.send(got);
            });
            Ok(())
        }
    }

    /// The agent's side. A channel the hub opens is confirmed only when
    /// its first bytes are ready, and they are sent right after (as the
    /// agent answers a raw channel's dial): `OK`, or [`SENT`] bytes
    /// (`Bulk`, as a raw stream's download).
    enum Cli {
        Answer,
        Bulk,
        /// Never answers the hub's opens (holds them unanswered).
        Silent(Arc<std::sync::Mutex<Vec<russh::client::ChannelOpenHandle>>>),
    }

    impl russh::client::Handler for Cli {
        type Error = russh::Error;

        async fn check_server_key(
            &mut self,
            _: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }

        async fn server_channel_open_forwarded_tcpip(
            &mut self,
            channel: Channel<russh::client::Msg>,
            _: &str,
            _: u32,
            _: &str,
            _: u32,
            reply: russh::client::ChannelOpenHandle,
            _: &mut russh::client::Session,
        ) -> Result<(), Self::Error> {
            if let Cli::Silent(held) = self {
                held.lock().unwrap().push(reply);
                drop(channel);
                return Ok(());
            }
            let bulk = matches!(self, Cli::Bulk);
            tokio::spawn(async move {
                reply.accept().await;
                if bulk {
                    write_sent(&channel).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let mut w = channel.make_writer();
                let _ = w.write_all(b"OK\n").await;
                let _ = w.flush().await;
                // Kept open until the hub has read it.
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            Ok(())
        }
    }

    /// A server that lets anyone in, with the tunnel's window and packet
    /// size when `tuned` (russh's defaults otherwise).
    fn server_config(tuned: bool) -> Arc<server::Config> {
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let mut c = server::Config {
            keys: vec![key],
            methods: russh::MethodSet::from(&[russh::MethodKind::None][..]),
            ..Default::default()
        };
        if tuned {
            c.window_size = super::WINDOW_SIZE;
            c.maximum_packet_size = super::MAX_PACKET;
        }
        Arc::new(c)
    }

    /// A socket whose buffers hold 64 KiB (the kernel doubles what is set).
    fn small_socket() -> tokio::net::TcpSocket {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_send_buffer_size(32 * 1024).unwrap();
        s.set_recv_buffer_size(32 * 1024).unwrap();
        s
    }

    /// Counts the writes that carried bytes into the socket under it, and
    /// notes the most bytes one write offered that were new (not left over
    /// from the write before).
    struct CountWrites<S> {
        inner: S,
        writes: Arc<std::sync::atomic::AtomicUsize>,
        left: usize,
        most_new: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S> CountWrites<S> {
        fn new(inner: S) -> CountWrites<S> {
            CountWrites {
                inner,
                writes: Arc::default(),
                left: 0,
                most_new: Arc::default(),
            }
        }

        fn offered(&mut self, total: usize, r: &std::task::Poll<std::io::Result<usize>>) {
            use std::sync::atomic::Ordering::Relaxed;
            self.most_new
                .fetch_max(total.saturating_sub(self.left), Relaxed);
            self.left = match r {
                std::task::Poll::Ready(Ok(n)) => {
                    if *n > 0 {
                        self.writes.fetch_add(1, Relaxed);
                    }
                    total - n
                }
                _ => total,
            };
        }
    }

    impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountWrites<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountWrites<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            self.offered(buf.len(), &r);
            r
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            self.offered(bufs.iter().map(|b| b.len()).sum(), &r);
            r
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A server session (serving its session channels as `serve` says)
    /// and a logged-in client session over loopback, with the tunnel's
    /// window and packet size when `tuned`.
    struct Sessions {
        hub: server::Handle,
        client: russh::client::Handle<Cli>,
        /// The client's writes ([`CountWrites`]).
        writes: Arc<std::sync::atomic::AtomicUsize>,
        most_new: Arc<std::sync::atomic::AtomicUsize>,
        /// What the server's session channels received.
        served: tokio::sync::mpsc::UnboundedReceiver<usize>,
    }

    async fn sessions(tuned: bool, cli: Cli, serve: Serve) -> Sessions {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(tuned);
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (done_tx, served) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let session = server::run_stream(config, stream, Srv(done_tx, serve))
                .await
                .unwrap();
            let _ = handle_tx.send(session.handle());
            let _ = session.await;
        });
        let stream = CountWrites::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (writes, most_new) = (stream.writes.clone(), stream.most_new.clone());
        let mut config = russh::client::Config::default();
        if tuned {
            config.window_size = super::WINDOW_SIZE;
            config.maximum_packet_size = super::MAX_PACKET;
        }
        let mut client = russh::client::connect_stream(Arc::new(config), stream, cli)
            .await
            .unwrap();
        assert!(client.authenticate_none("t").await.unwrap().success());
        Sessions {
            hub: handle_rx.await.unwrap(),
            client,
            writes,
            most_new,
            served,
        }
    }

    #[tokio::test]
    async fn the_hub_takes_no_finite_field_key_exchange() {
        // Offered only 8192-bit Diffie-Hellman (no credential needed to
        // ask), the hub computed it on the tunnels' thread per connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let config = super::server::config(key, Duration::from_secs(10));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let config = config.clone();
                tokio::spawn(async move {
                    let srv = Srv(tokio::sync::mpsc::unbounded_channel().0, Serve::BothWays);
                    if let Ok(s) = server::run_stream(config, stream, srv).await {
                        let _ = s.await;
                    }
                });
            }
        });
        for (kex, taken) in [
            (russh::kex::DH_G18_SHA512, false),
            (russh::kex::DH_G14_SHA256, false),
            (russh::kex::DH_GEX_SHA256, false),
            (russh::kex::CURVE25519, true),
        ] {
            let config = russh::client::Config {
                preferred: russh::Preferred {
                    kex: std::borrow::Cow::Owned(vec![kex]),
                    ..russh::Preferred::default()
                },
                ..Default::default()
            };
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                russh::client::connect(Arc::new(config), addr, Cli::Answer),
            )
            .await
            .expect("the key exchange neither ended nor failed");
            assert_eq!(r.is_ok(), taken, "{kex:?}: {:?}", r.err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_leaving_opens_unanswered_ends_its_session_past_the_cap() {
        // A compromised member's agent that never answers the hub's opens
        // (or never answers its closes) kept ~4 KiB of the hub's per open
        // for the session's life: every request and ping grew the hub.
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let Sessions {
            hub,
            client: _client,
            ..
        } = sessions(false, Cli::Silent(held.clone()), Serve::BothWays).await;
        let opens: Vec<_> = (0..russh::MAX_SESSION_CHANNELS as u32)
            .map(|i| {
                let hub = hub.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        hub.channel_open_forwarded_tcpip("target", i, "origin", 0),
                    )
                    .await;
                })
            })
            .collect();
        // Past the cap the session ends: every open then fails at once
        // (before, each waited for its answer for ever).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let more = tokio::time::timeout(
                Duration::from_millis(500),
                hub.channel_open_forwarded_tcpip("target", 0, "origin", 0),
            )
            .await;
            if matches!(more, Ok(Err(_))) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the session still takes opens with {} left unanswered",
                held.lock().unwrap().len()
            );
        }
        let reached = held.lock().unwrap().len();
        // How many reached the peer before the end depends on the load
        // (the rest were still on their way): not all of them.
        assert!(
            reached < russh::MAX_SESSION_CHANNELS,
            "{reached} opens reached the peer"
        );
        for o in opens {
            let _ = tokio::time::timeout(Duration::from_secs(10), o).await;
        }
    }

    #[tokio::test]
    async fn a_confirmation_and_what_follows_it_leave_in_one_write() {
        // The agent confirms a raw channel once it has dialed, and writes
        // its answer to the dial right after: the client's session loop
        // took the confirmation (a priority message) in one turn and the
        // answer in the next, two writes and two wake-ups of the hub per
        // connection. The loop's branch picked among ready ones is random,
        // so many opens are tried: each had an even chance to split.
        // The client's handle is kept: dropped, it would end its session.
        let Sessions {
            hub,
            client: _client,
            writes,
            ..
        } = sessions(false, Cli::Answer, Serve::BothWays).await;
        let mut split = 0;
        for i in 0..24u32 {
            let before = writes.load(std::sync::atomic::Ordering::Relaxed);
            let mut ch = tokio::time::timeout(
                Duration::from_secs(10),
                hub.channel_open_forwarded_tcpip("target", i, "origin", 0),
            )
            .await
            .expect("no confirmation")
            .unwrap();
            let first = tokio::time::timeout(Duration::from_secs(10), ch.wait())
                .await
                .expect("no answer");
            assert!(
                matches!(&first, Some(ChannelMsg::Data { data }) if &data[..] == b"OK\n"),
                "{first:?}"
            );
            let used = writes.load(std::sync::atomic::Ordering::Relaxed) - before;
            assert!(used >= 1, "the agent wrote nothing");
            if used > 1 {
                split += 1;
            }
        }
        assert_eq!(
            split, 0,
            "the confirmation and the answer after it left in two writes in {split} of 24 opens"
        );
    }

    /// A stream that, once `frozen` is set, takes every write without
    /// passing it on and never reads again: a peer that stopped in the
    /// middle of whatever it was doing.
    struct Freezable<S> {
        inner: S,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    }

    impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Freezable<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.frozen.load(std::sync::atomic::Ordering::Relaxed) {
                return std::task::Poll::Pending;
            }
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Freezable<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.frozen.load(std::sync::atomic::Ordering::Relaxed) {
                return std::task::Poll::Ready(Ok(buf.len()));
            }
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A key exchange the peer leaves unfinished ends the session (russh
    /// patch: `KEX_DEADLINE`). While one is under way the server's loop
    /// takes no message, its DISCONNECT included, and nothing bounded it:
    /// such a session (a key holder sending KEXINIT and then only IGNORE
    /// packets) was held for ever. Here the server rekeys by time and the
    /// client takes nothing from then on; time is paused, so the 30 s pass
    /// at once (the 2 s before the rekey are real).
    #[tokio::test(start_paused = true)]
    async fn a_key_exchange_the_peer_leaves_unfinished_ends_the_session() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let mut config = server::Config {
            keys: vec![key],
            methods: russh::MethodSet::from(&[russh::MethodKind::None][..]),
            ..Default::default()
        };
        config.limits.rekey_time_limit = Duration::from_secs(2);
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let (done_tx, _served) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let session = server::run_stream(Arc::new(config), far, Srv(done_tx, Serve::Sink))
                .await
                .unwrap();
            let _ = ended_tx.send(session.await);
        });
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stream = Freezable {
            inner: near,
            frozen: frozen.clone(),
        };
        let mut client = russh::client::connect_stream(
            Arc::new(russh::client::Config::default()),
            stream,
            Cli::Answer,
        )
        .await
        .unwrap();
        assert!(client.authenticate_none("t").await.unwrap().success());
        let start = tokio::time::Instant::now();
        frozen.store(true, std::sync::atomic::Ordering::Relaxed);
        // russh reads the rekey interval on the real clock (the paused one
        // only moves its timer): 2 s of it pass with nothing else running.
        std::thread::sleep(Duration::from_millis(2100));
        let r = tokio::time::timeout(Duration::from_secs(600), ended)
            .await
            .expect("the session was still there after 600 s")
            .unwrap();
        assert!(
            matches!(r, Err(russh::Error::KexTimeout(_))),
            "{r:?} after {:?}",
            start.elapsed()
        );
        // The rekey at 2 s, then the exchange's 30 s.
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{:?}",
            start.elapsed()
        );
        drop(client);
    }

    /// The agent's side of the same: a peer that sends an SSH banner and
    /// then nothing (anything on the path before the host key is checked)
    /// made `connect` give up at its caller's timeout, but russh's session
    /// task, spawned at the banner, went on waiting for the key exchange
    /// for ever, holding the connection (a socket and a task per attempt,
    /// at every retry). The client's loop now has the deadline too.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_client_whose_first_key_exchange_stalls_lets_go_of_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let (eof_tx, eof) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            far.write_all(b"SSH-2.0-stall\r\n").await.unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = far.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = eof_tx.send(());
        });
        let start = tokio::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            russh::client::connect_stream(
                Arc::new(russh::client::Config::default()),
                near,
                Cli::Answer,
            ),
        )
        .await;
        assert!(r.is_err(), "no session with a peer that only stalls");
        tokio::time::timeout(Duration::from_secs(600), eof)
            .await
            .expect("the abandoned session still held the connection after 600 s")
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{:?}",
            start.elapsed()
        );
    }

    /// How many data bytes come on `ch` before its end.
    async fn read_to_end<S>(ch: &mut Channel<S>) -> usize
    where
        S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        let mut got = 0;
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => got += data.len(),
                ChannelMsg::Eof => break,
                _ => {}
            }
        }
        got
    }

    /// No write offered more than a turn (256 KiB) and one message (at
    /// most a packet here) of bytes new since the write before.
    fn turns_kept(most: &std::sync::atomic::AtomicUsize) {
        let most = most.load(std::sync::atomic::Ordering::Relaxed);
        assert!(most > 0, "nothing was written");
        assert!(
            most <= 256 * 1024 + super::MAX_PACKET as usize + 4096,
            "one write carried {most} bytes encrypted since the one before"
        );
    }

    /// What the agent's side writes into a channel in the turn tests.
    const SENT: usize = 32 << 20;

    /// Writes [`SENT`] bytes into `ch` in 256 KiB writes, then its end.
    async fn write_sent<S>(ch: &Channel<S>)
    where
        S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        let mut w = ch.make_writer();
        let chunk = vec![0x5au8; 256 * 1024];
        for _ in 0..SENT / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w.flush().await.unwrap();
        ch.eof().await.unwrap();
    }

    /// The same on a channel the hub opens (the agent's raw streams: the
    /// client loop's inbound-channel batch).
    #[tokio::test]
    async fn the_agent_writes_in_quarter_mib_turns_on_channels_the_hub_opens_too() {
        let Sessions {
            hub,
            client: _client,
            most_new: most,
            ..
        } = sessions(true, Cli::Bulk, Serve::Sink).await;
        let got = tokio::time::timeout(Duration::from_secs(30), async {
            let mut ch = hub
                .channel_open_forwarded_tcpip("target", 1, "origin", 0)
                .await
                .unwrap();
            read_to_end(&mut ch).await
        })
        .await
        .expect("the transfer stopped");
        assert_eq!(got, SENT);
        turns_kept(&most);
    }

    #[tokio::test]
    async fn the_agent_writes_what_it_encrypted_in_turns_of_a_quarter_mib() {
        // The client's loop (the agent's) encrypts each packet as it takes
        // it from its channels; it took up to 1 MiB before writing, and the
        // kernel's copy of the first packets into the socket read them back
        // from memory (a third of the agent's time on a download). Now a
        // turn stops taking at 256 KiB: at most that plus one message (up
        // to 256 KiB from a splice read; a channel writer's, as here, up to
        // a packet) is new in a write. With a 1 MiB turn this wrote 512 KiB
        // at a time (its queue holds no more).
        let Sessions {
            client,
            most_new: most,
            served: mut done,
            ..
        } = sessions(true, Cli::Answer, Serve::Sink).await;
        let ch = client.channel_open_session().await.unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(30), async {
            write_sent(&ch).await;
            done.recv().await.unwrap()
        })
        .await
        .expect("the transfer stopped");
        assert_eq!(sent, SENT);
        turns_kept(&most);
    }

    #[tokio::test]
    async fn both_sides_sending_more_than_the_socket_holds_keep_reading() {
        // Each session loop used to wait for its whole write before reading
        // again: with more in flight both ways than the socket buffers
        // hold, both waited for ever (the keepalives cannot fire either).
        let listener = small_socket();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(true);
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let session = server::run_stream(config, stream, Srv(done_tx, Serve::BothWays)).await;
            if let Ok(session) = session {
                let _ = session.await;
            }
        });
        let stream = small_socket().connect(addr).await.unwrap();
        let config = Arc::new(russh::client::Config {
            window_size: super::WINDOW_SIZE,
            maximum_packet_size: super::MAX_PACKET,
            ..Default::default()
        });
        let mut client = russh::client::connect_stream(config, stream, Cli::Answer)
            .await
            .unwrap();
        assert!(client.authenticate_none("t").await.unwrap().success());
        let ch = client.channel_open_session().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            let at_client = both_ways(ch).await;
            let at_server = done.recv().await.unwrap();
            (at_client, at_server)
        })
        .await
        .expect("the sessions stopped: both loops waited on their writes");
        assert_eq!(ended, (EACH, EACH));
    }
}

#[cfg(test)]
mod channel_map_tests {
    use std::collections::HashSet;
    use std::hash::Hasher;

    fn hash(n: u32) -> u64 {
        let mut h = russh::ChannelIdHasher::default();
        h.write_u32(n);
        h.finish()
    }

    /// The vendored russh's channel maps (patch ten): channel numbers in
    /// turn, and numbers a peer kept because they share their low bits
    /// (4,096 apart), both spread over the buckets (low bits) and the
    /// map's tags (top seven bits) as random numbers would (4,096 random
    /// hashes fill ~2,590 of 4,096 buckets); an unkeyed multiplication put
    /// every strided number in one bucket, a folded one alone 1,400-3,800.
    #[test]
    fn channel_numbers_hash_apart_in_turn_and_when_a_peer_picks_them() {
        for (what, numbers) in [
            ("in turn", (0..4096u32).collect::<Vec<_>>()),
            ("4,096 apart", (0..4096u32).map(|i| i * 4096).collect()),
            ("65,536 apart", (0..4096u32).map(|i| i * 65536).collect()),
        ] {
            let buckets: HashSet<u64> = numbers.iter().map(|&n| hash(n) & 0xfff).collect();
            assert!(buckets.len() > 2300, "{what}: {} buckets", buckets.len());
            let tags: HashSet<u64> = numbers.iter().map(|&n| hash(n) >> 57).collect();
            assert!(tags.len() > 120, "{what}: {} of 128 tags", tags.len());
        }
    }
}
