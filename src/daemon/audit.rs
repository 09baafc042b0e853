//! The hub's audit log: one JSON line per gateway request (who reached which
//! cluster, what, the outcome, how long, how many bytes), size-bounded and
//! rotated. Records travel to a single writer task over a bounded channel,
//! so the request path never waits on the disk; if the disk cannot keep up,
//! records are dropped and counted rather than slowing kubectl down.
//!
//! What an operator cannot do to it:
//! - *Dodge it with a long stream*: watches, upgraded streams (exec, attach,
//!   port-forward) and CONNECTs get a `phase: "start"` record when they open
//!   and a `phase: "end"` one when they close.
//! - *Hide in the noise*: requests without an accepted token (401) and
//!   calls to `/towerctl/v1/*` are recorded too; paths are cut to
//!   [`MAX_PATH`] bytes and every other field to a bound of its own, so a
//!   record stays under ~2 KiB whatever the client sent (a 60 KB method
//!   name made 60 KB records).
//! - *Push out others' history*: each operator (and all unauthenticated
//!   clients together) has a token bucket, [`Limits`]
//!   (`TOWERCTL_AUDIT_RATE` a second, `TOWERCTL_AUDIT_BURST` at once, read
//!   by the hub at start). An operator's requests over it are refused with
//!   429 before they reach a member ([`Auditor::admit_request`]; the local
//!   admin is exempt), so every request that does reach one is recorded:
//!   dropping the records instead let an operator blind the log for a
//!   write of its choosing. Unauthenticated clients' records over their
//!   budget are dropped (nothing of theirs reaches a member). Either way
//!   the count is written as one `verb: "suppressed"` summary as soon as
//!   the bucket refills. Unauthenticated clients together get a hundredth
//!   of the rate (at least one a second) and a tenth of the burst, and
//!   their paths are cut to a quarter: anyone can send
//!   them, so they must not be able to rotate the history away.
//! - *Kill the hub to lose it*: every record is written to the file (the
//!   page cache) as soon as the writer receives it, with no buffering in
//!   the process, and the writer is woken 5 ms after a record is queued
//!   (and at least once a second); a hub killed with -9 loses only records
//!   still in the channel, those of its last few milliseconds.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Rotate when the current file passes this size, unless
/// [`MAX_BYTES_ENV`] says otherwise ([`max_bytes`]).
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// The rotation size in bytes (at least 64 KiB): how much history the
/// hub keeps is `(KEEP + 1)` times it.
pub const MAX_BYTES_ENV: &str = "TOWERCTL_AUDIT_MAX_BYTES";

/// The least rotation size [`MAX_BYTES_ENV`] may set (64 KiB).
const MIN_BYTES: u64 = 64 * 1024;

/// [`MAX_BYTES`], or what [`MAX_BYTES_ENV`] says (read once).
pub fn max_bytes() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| match std::env::var(MAX_BYTES_ENV) {
        Err(_) => MAX_BYTES,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n < MIN_BYTES => {
                tracing::warn!(
                    "{MAX_BYTES_ENV}={n} is under the least the audit log rotates at: rotating at {MIN_BYTES} bytes"
                );
                MIN_BYTES
            }
            Ok(n) => n,
            Err(_) => {
                tracing::warn!(
                    "ignoring {MAX_BYTES_ENV}='{}': use a size in bytes",
                    crate::tunnel::escape_for_log(&v, 40)
                );
                MAX_BYTES
            }
        },
    })
}
/// Rotated files kept besides the current one (`audit.log.1` … `.3`).
pub const KEEP: usize = 3;

/// Stored paths longer than this are cut (with a marker). The gateway
/// refuses a request to a member whose path and query are longer (414),
/// so that what reached a member is recorded whole: a record cut at 1 KiB
/// left an exec's `command=` out when the client padded the query first.
/// As long as a request's whole head may be (`gateway::MAX_HEAD`): an
/// exec's inline script, percent-encoded, passes 16 KiB.
pub const MAX_PATH: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub operator: String,
    pub cluster: String,
    /// Kubernetes verb (get, list, watch, create, update, patch, delete, …).
    pub verb: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: u64,
    /// Response body bytes sent to the operator.
    pub bytes: u64,
    /// The access rule that let the operator reach the member (or refused
    /// it): `local admin`, `#3 allow group:payments 'team=payments'`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `start` or `end` for long-lived streams (watch, exec, attach,
    /// port-forward, CONNECT); absent for one-shot requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why a request was refused, when the gateway or the agent said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The client's address, for requests without an accepted token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Who the client asked to act as on the member (`kubectl --as`):
    /// user, groups, uid and extra keys, one printable line.
    #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
    pub acting_as: Option<String>,
}

/// The operator name under which requests without an accepted token are
/// recorded (and rate-limited together).
pub const UNAUTHENTICATED: &str = "(unauthenticated)";

/// Per-operator record budget: `rate` records a second, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub rate: f64,
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate: 100.0,
            burst: 1000.0,
        }
    }
}

impl Limits {
    /// The defaults, overridden by `TOWERCTL_AUDIT_RATE` and
    /// `TOWERCTL_AUDIT_BURST` (positive numbers; others are ignored with a
    /// warning).
    pub fn from_env() -> Limits {
        let mut l = Limits::default();
        for (var, slot) in [
            ("TOWERCTL_AUDIT_RATE", &mut l.rate),
            ("TOWERCTL_AUDIT_BURST", &mut l.burst),
        ] {
            if let Ok(v) = std::env::var(var) {
                match v.parse::<f64>() {
                    Ok(n) if n > 0.0 && n.is_finite() => *slot = n,
                    _ => tracing::warn!("ignoring {var}='{v}': use a positive number"),
                }
            }
        }
        l
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// Token buckets by operator.
struct Limiter {
    limits: Limits,
    buckets: HashMap<String, Bucket>,
}

/// The limits of `key`'s bucket.
fn limits_for(base: Limits, key: &str) -> Limits {
    let mut l = base;
    if key == UNAUTHENTICATED {
        // A hundredth of an operator's rate: at ten a second, clients
        // without a token (anyone who reaches the gateway) turned the
        // whole history over in about two hours.
        l.rate = (l.rate / 100.0).max(1.0);
        l.burst = (l.burst / 10.0).max(1.0);
    }
    l
}

impl Limiter {
    fn refill(&mut self, key: &str, now: Instant) -> &mut Bucket {
        let l = limits_for(self.limits, key);
        let b = self.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: l.burst,
            last: now,
            suppressed: 0,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * l.rate).min(l.burst);
        b.last = now;
        b
    }

    /// Whether `key` may write a record now, and the count of suppressed
    /// records to report first.
    fn admit(&mut self, key: &str, now: Instant) -> (bool, u64) {
        let b = self.refill(key, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            (true, std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            (false, 0)
        }
    }

    /// Summaries owed to operators whose buckets refilled since they were
    /// last suppressed.
    fn due(&mut self, now: Instant) -> Vec<(String, u64)> {
        let keys: Vec<String> = self
            .buckets
            .iter()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in keys {
            let b = self.refill(&k, now);
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                out.push((k, std::mem::take(&mut b.suppressed)));
            }
        }
        // A bucket full again with nothing owed is what a new one would
        // be: let go (one was kept for every operator that ever made a
        // request, removed ones too).
        let limits = self.limits;
        self.buckets.retain(|k, b| {
            let l = limits_for(limits, k);
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.suppressed > 0 || b.tokens + dt * l.rate < l.burst
        });
        out
    }
}

fn summary(operator: &str, n: u64) -> Record {
    let path = if operator == UNAUTHENTICATED {
        format!("suppressed {n} records over the audit rate limit")
    } else {
        format!("refused {n} requests over the audit rate limit (429, never sent to a member)")
    };
    Record {
        time: crate::daemon::fmt::fmt_now(),
        operator: operator.to_string(),
        verb: "suppressed".into(),
        path,
        ..Record::default()
    }
}

/// Cuts `s` to `max` bytes (on a character boundary), saying how much.
fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let total = s.len();
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    s.push_str(&format!("…[{} more bytes]", total - at));
}

/// A query parameter (or key) read as the server reads it (`%74oken` is
/// `token`). Borrowed unless there is something to decode (the common
/// case: this runs for every recorded request with a query).
fn decoded(x: &str) -> std::borrow::Cow<'_, str> {
    if !x.contains(['%', '+']) {
        return x.into();
    }
    percent_encoding::percent_decode_str(&x.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
        .into()
}

/// The characters of a towerctl token after its prefix (`top_`, `tj_`):
/// 32 random bytes in base64url.
const TOKEN_CHARS: usize = 43;

/// How many token characters `b` starts with, counted up to
/// [`TOKEN_CHARS`] only (counted to the end of the run, a URL of
/// `top_top_top_…` cost the hub seconds per request, every other request
/// waiting).
fn token_run(b: &[u8]) -> usize {
    b.iter()
        .take(TOKEN_CHARS)
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b'_')
        .count()
}

/// Where `s` holds a towerctl token's shape: a prefix (`top_`, `tj_`) and
/// 43 token characters after it, as (start, prefix length), in one pass
/// (a search for each prefix from every position was quadratic on a path
/// of many `tj_` and one `top_` at its end). Prefixes are found one after
/// the other, not past a candidate: `top_` ahead of a real token must not
/// hide it.
fn token_starts(s: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let b = s.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() {
            let p = if b[i..].starts_with(b"top_") {
                4
            } else if b[i..].starts_with(b"tj_") {
                3
            } else {
                i += 1;
                continue;
            };
            let at = i;
            i += p;
            if token_run(&b[i..]) == TOKEN_CHARS {
                return Some((at, p));
            }
        }
        None
    })
}

/// Whether `v` carries a towerctl token: its prefix and 43 base64url
/// characters, anywhere in the value (`Bearer top_…`); `top_tier` is a
/// label, not one.
fn has_token(v: &str) -> bool {
    token_starts(v).next().is_some()
}

/// `s` with every towerctl token in it (a prefix and 43 token characters)
/// replaced by `REDACTED`, as it is otherwise (no decoding), if it had one.
fn without_tokens(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut done = 0;
    for (at, p) in token_starts(s) {
        if at < done {
            continue;
        }
        out.push_str(&s[done..at]);
        out.push_str("REDACTED");
        done = at + p + TOKEN_CHARS;
    }
    if done == 0 {
        return None;
    }
    out.push_str(&s[done..]);
    Some(out)
}

/// The towerctl operator tokens `target` (a request's path and query, or
/// a CONNECT authority) may carry, read as the server reads it
/// (percent-decoded, `+` a space): each `top_` and the 43 token
/// characters after it, all of them (a first version looked at 16, and a
/// real token after 16 decoys went on), for the gateway to look up. The
/// scan is linear in `target`, which the head limit bounds. A request
/// whose URL carries a valid token is refused (`gateway::proxy`): the
/// member, less trusted than the hub, saw `?access_token=top_…` a client
/// added. Refused, not cut out: a first version dropped the parameters of
/// a token's shape, and a label selector `session=laptop_` + 40 hex
/// characters was dropped, `kubectl delete -l` deleting every pod of the
/// namespace; the next dropped only the caller's own token as a whole
/// value, which left it in a key, after `;`, in quotes or behind a tab,
/// and still changed what a request did (`kubectl exec p -- TOKEN` ran no
/// command).
pub fn token_candidates(target: &str) -> Vec<String> {
    let text = decoded(target);
    let mut found: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Operator tokens (`top_`) only: join tokens are not looked up.
    for (at, _) in token_starts(&text).filter(|(_, p)| *p == 4) {
        let t = &text[at..at + 4 + TOKEN_CHARS];
        if seen.insert(t) {
            found.push(t.to_string());
        }
    }
    found
}

/// The values of query parameters that carry credentials, replaced: a
/// parameter named like one (`access_token`, `password`, …) or a value
/// that is a towerctl token. A client that put its token in the URL (no
/// Kubernetes client reads one from there; some tools send one) had it
/// recorded whole, for every reader of the audit log.
fn redact_query(path: &mut String) {
    let Some(at) = path.find('?') else { return };
    let secret = |k: &str, v: &str| {
        let k = decoded(k).to_ascii_lowercase();
        [
            "token", "password", "passwd", "secret", "auth", "apikey", "api_key", "api-key",
        ]
        .iter()
        .any(|w| k.contains(w))
            || has_token(&decoded(v))
    };
    let query = &path[at + 1..];
    if !query.split('&').any(|p| {
        p.split_once('=').map_or(has_token(&decoded(p)), |(k, v)| {
            secret(k, v) || has_token(&decoded(k))
        })
    }) {
        return;
    }
    let redacted: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            // A token as the key (`TOKEN=`): the key is the secret.
            Some((k, _)) if has_token(&decoded(k)) => "REDACTED".to_string(),
            Some((k, v)) if secret(k, v) => format!("{k}=REDACTED"),
            None if has_token(&decoded(p)) => "REDACTED".to_string(),
            _ => p.to_string(),
        })
        .collect();
    let q = redacted.join("&");
    path.truncate(at + 1);
    path.push_str(&q);
}

/// A towerctl token in the path before the query (`/namespaces/top_…`,
/// a CONNECT authority), replaced: the request is refused, but recorded.
/// The path is kept as it came (a first version wrote it decoded, `+` as
/// a space, whenever it held a run of a token's shape); decoded only when
/// the token was percent-encoded.
fn redact_path(path: &mut String) {
    let end = path.find('?').unwrap_or(path.len());
    let redacted = match without_tokens(&path[..end]) {
        Some(r) => r,
        // Something was decoded: a token percent-encoded.
        None => match decoded(&path[..end]) {
            std::borrow::Cow::Owned(d) => match without_tokens(&d) {
                Some(r) => r,
                None => return,
            },
            std::borrow::Cow::Borrowed(_) => return,
        },
    };
    let tail = path[end..].to_string();
    *path = redacted + &tail;
}

/// Bounds every field a client can fill, whatever it sent, and keeps
/// credentials a client put in its URL out.
fn bound(r: &mut Record) {
    redact_query(&mut r.path);
    redact_path(&mut r.path);
    let unauthenticated = r.operator == UNAUTHENTICATED;
    cut(
        &mut r.path,
        if unauthenticated {
            // Never reaches a member: what it tried, kept short.
            256
        } else {
            MAX_PATH
        },
    );
    cut(&mut r.method, 32);
    cut(&mut r.verb, 32);
    cut(&mut r.operator, 128);
    cut(&mut r.cluster, 128);
    // An error may repeat what the client sent (a dial policy naming a
    // CONNECT host): no token in it either.
    if let Some(e) = &mut r.error {
        if let Some(clean) = without_tokens(e) {
            *e = clean;
        }
    }
    for s in [&mut r.rule, &mut r.error, &mut r.peer, &mut r.phase]
        .into_iter()
        .flatten()
    {
        cut(s, 512);
    }
    if let Some(s) = &mut r.acting_as {
        // Bounded where it is read (`ClientAs::read`): recorded whole.
        cut(s, super::clientas::MAX_RECORDED);
    }
}

/// The Kubernetes verb of a request, from its method and path, read as
/// kube-apiserver's RequestInfo reads it: after `/api/v1` or
/// `/apis/GROUP/VERSION`, `namespaces/NS/` (not before `status` or
/// `finalize`, a namespace's own subresources) is put aside, then
/// `RESOURCE` is a collection, `RESOURCE/NAME` an object and
/// `RESOURCE/NAME/SUB…` one of its subresources. `exec`, `attach` and
/// `portforward` are recorded as `create` whichever way they come (a
/// WebSocket upgrade is a GET; kube-apiserver authorizes them as `create`),
/// so that a search for the commands run finds every one.
pub fn verb(method: &str, path: &str, query: Option<&str>) -> &'static str {
    let watch = super::http::query_flag(query, "watch");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let version_at = match segs.first() {
        Some(&"api") => 1,
        Some(&"apis") => 2,
        _ => usize::MAX,
    };
    let mut rest: &[&str] = segs.get(version_at.saturating_add(1)..).unwrap_or(&[]);
    // The old watch paths (`/api/v1/watch/secrets`,
    // `/apis/apps/v1/watch/namespaces/ns/deployments`), which kube-apiserver
    // still serves as watches (read as a `get`, one held for hours had no
    // start record).
    let watch = watch || rest.first() == Some(&"watch");
    if rest.first() == Some(&"watch") {
        rest = &rest[1..];
    }
    if rest.len() > 2 && rest[0] == "namespaces" && !matches!(rest[2], "status" | "finalize") {
        rest = &rest[2..];
    }
    let collection = rest.len() == 1;
    let sub = rest.get(2).copied();
    match method {
        _ if matches!(sub, Some("exec" | "attach" | "portforward")) => "create",
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if collection => "list",
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if collection => "deletecollection",
        "DELETE" => "delete",
        _ => "other",
    }
}

enum Msg {
    Record(Box<Record>),
    /// Once a second: write the summaries that are due.
    Tick,
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    limiter: Arc<Mutex<Limiter>>,
    /// Records lost: the writer fell behind (the channel was full) or the
    /// file could not take them (a full disk). Exported as
    /// `towerctl_audit_dropped_total`.
    pub dropped: Arc<AtomicU64>,
    bell: Arc<Bell>,
    /// Declared after `tx`: dropped with the last `Auditor`, once every
    /// sender is gone, so the writer wakes to write what is left and end.
    _closer: Arc<Closer>,
}

/// How records reach the writer thread without a system call per record.
/// Sending on the channel alone would wake the writer (a futex call and a
/// thread switch) inside every request, before its answer is sent: on the
/// hub's one runtime thread that was a sixth of the gateway's CPU per
/// request at 16 connections (the writer thread switched in for every 1.5
/// requests). Records are queued without waking anyone; `queued` wakes the
/// ringer task on the runtime (no system call), which wakes the writer
/// [`RING_DELAY`] later with whatever was queued by then.
#[derive(Default)]
struct Bell {
    queued: tokio::sync::Notify,
    writer: std::sync::OnceLock<std::thread::Thread>,
}

impl Bell {
    fn ring(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

struct Closer(Arc<Bell>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.ring();
    }
}

/// The writer thread: woken by the [`Bell`] (and at least once a second),
/// it writes everything queued, in batches of [`BATCH`] records per system
/// call, and ends once every sender is gone and the queue is empty.
fn write_until_closed<F: LogFile>(
    rx: &mut mpsc::Receiver<Msg>,
    out: &mut Writer<F>,
    lim: &Mutex<Limiter>,
) {
    let mut lines = Vec::new();
    loop {
        let mut n = 0;
        let closed = loop {
            match rx.try_recv() {
                Ok(Msg::Record(r)) => line(&mut lines, &r),
                Ok(Msg::Tick) => {
                    let due = lim
                        .lock()
                        .map(|mut l| l.due(Instant::now()))
                        .unwrap_or_default();
                    for (op, k) in due {
                        line(&mut lines, &summary(&op, k));
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
            n += 1;
            if n % BATCH == 0 {
                out.write(&lines);
                lines.clear();
            }
        };
        if !lines.is_empty() {
            out.write(&lines);
            lines.clear();
        }
        if lines.capacity() > 64 * 1024 {
            lines = Vec::new();
        }
        if closed {
            return;
        }
        // A ring between the last `try_recv` and here is kept by the
        // thread's token: `park` then returns at once.
        std::thread::park_timeout(std::time::Duration::from_secs(1));
    }
}

impl Auditor {
    /// Starts the writer task for `path`, with limits from the environment.
    pub fn start(path: PathBuf) -> Auditor {
        Auditor::start_with(path, Limits::from_env())
    }

    pub fn start_with(path: PathBuf, limits: Limits) -> Auditor {
        let (tx, rx) = mpsc::channel::<Msg>(4096);
        let limiter = Arc::new(Mutex::new(Limiter {
            limits,
            buckets: HashMap::new(),
        }));
        let bell = Arc::new(Bell::default());
        // The ringer ends when the writer does (its sender is weak).
        let weak = tx.downgrade();
        let ringer = bell.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = ringer.queued.notified() => {
                        // Let the request that queued the record send its
                        // answer first, and gather what the next ones
                        // queue: one wake-up of the writer (a system call
                        // and a thread switch) per few milliseconds under
                        // load, off every request's path.
                        tokio::time::sleep(RING_DELAY).await;
                    }
                    _ = tick.tick() => {
                        let Some(tx) = weak.upgrade() else { return };
                        let _ = tx.try_send(Msg::Tick);
                    }
                }
                ringer.ring();
            }
        });
        let lim = limiter.clone();
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let writer = bell.clone();
        tokio::task::spawn_blocking(move || {
            let _ = writer.writer.set(std::thread::current());
            let (mut rx, mut out) = (rx, Writer::<std::fs::File>::new(path, lost));
            // A panic while writing does not end the audit log for the
            // hub's life (every later record was dropped): the writer
            // starts again on a fresh line, once a second at most.
            while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_until_closed(&mut rx, &mut out, &lim)
            }))
            .is_err()
            {
                out.file = None;
                out.torn = ends_torn(&out.path);
                std::thread::sleep(std::time::Duration::from_secs(1));
                tracing::error!("the audit writer failed and was started again");
            }
        });
        Auditor {
            tx,
            limiter,
            dropped,
            _closer: Arc::new(Closer(bell.clone())),
            bell,
        }
    }

    /// Admits one request of an authenticated operator against its
    /// budget ([`Limits`]), before the request goes anywhere: over it, the
    /// request is refused (the message says why) and counted for a
    /// summary record, so every request that reaches a member is
    /// recorded. Dropping the records instead let an operator blind the
    /// log at a moment of its choosing (a burst of reads, then a write).
    pub fn admit_request(&self, operator: &str) -> Result<(), String> {
        let (ok, owed, limits) = self
            .limiter
            .lock()
            .map(|mut l| {
                let (ok, owed) = l.admit(operator, Instant::now());
                (ok, owed, l.limits)
            })
            .unwrap_or((true, 0, Limits::default()));
        if owed > 0 {
            self.send(summary(operator, owed));
        }
        if ok {
            return Ok(());
        }
        Err(format!(
            "operator '{operator}' is over its audit budget of {} requests a second ({} at once); every request to a member is recorded, so requests over it are refused: retry shortly (the hub's TOWERCTL_AUDIT_RATE and TOWERCTL_AUDIT_BURST set the budget)",
            limits.rate, limits.burst
        ))
    }

    /// Queues `r` for the log (its fields bounded, [`MAX_PATH`]). Records
    /// of unauthenticated clients share one budget and are dropped over
    /// it, counted in a summary; an operator's requests are held to its
    /// budget when they arrive ([`Auditor::admit_request`]) and all of
    /// their records are written.
    pub fn record(&self, mut r: Record) {
        bound(&mut r);
        if r.operator == UNAUTHENTICATED {
            let (ok, owed) = self
                .limiter
                .lock()
                .map(|mut l| l.admit(&r.operator, Instant::now()))
                .unwrap_or((true, 0));
            if !ok {
                return;
            }
            if owed > 0 {
                self.send(summary(&r.operator, owed));
            }
        }
        self.send(r);
    }

    /// The `start` record of a long-lived stream; the matching `end`
    /// record is `r` with `phase: end`, written when the stream closes.
    pub fn record_start(&self, r: &Record) {
        self.record(Record {
            phase: Some("start".into()),
            ..r.clone()
        });
    }

    fn send(&self, r: Record) {
        if self.tx.try_send(Msg::Record(Box::new(r))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.bell.queued.notify_one();
    }
}

/// A request's record while the gateway waits for the member: written
/// with status 499 (nginx's "client closed request") if the request is
/// dropped first, as hyper does when the client resets the stream or
/// closes the connection. Without it such a request reached the member
/// and left no record.
pub struct Pending {
    record: Option<Record>,
    start: Instant,
    auditor: Auditor,
}

impl Pending {
    pub fn new(record: Record, start: Instant, auditor: Auditor) -> Pending {
        Pending {
            record: Some(record),
            start,
            auditor,
        }
    }

    /// The record back, for the caller to complete and write.
    pub fn take(mut self) -> Record {
        self.record.take().unwrap_or_default()
    }

    /// Writes the record as refused with `status` and `error`.
    pub fn refuse(self, status: u16, error: &str) {
        let (start, auditor) = (self.start, self.auditor.clone());
        let mut r = self.take();
        r.status = status;
        r.duration_ms = start.elapsed().as_millis() as u64;
        r.error = Some(error.to_string());
        auditor.record(r);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.status = 499;
            r.duration_ms = self.start.elapsed().as_millis() as u64;
            r.error = Some("the client went away before the member answered".into());
            self.auditor.record(r);
        }
    }
}

/// Writes the `end` record of an upgraded stream when the last holder
/// drops it: the gateway (which learns the status) and the splice task
/// (which lives as long as the stream).
pub struct EndRecord {
    record: Mutex<Record>,
    start: Instant,
    auditor: Auditor,
    /// Bytes of an upgraded stream, counted as they cross.
    bytes: Arc<AtomicU64>,
}

impl EndRecord {
    pub fn new(mut record: Record, start: Instant, auditor: Auditor) -> Arc<EndRecord> {
        record.phase = Some("end".into());
        Arc::new(EndRecord {
            record: Mutex::new(record),
            start,
            auditor,
            bytes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The counter whose total the end record reports as `bytes`.
    pub fn count_bytes(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    pub fn set_status(&self, status: u16) {
        if let Ok(mut r) = self.record.lock() {
            r.status = status;
        }
    }
}

impl Drop for EndRecord {
    fn drop(&mut self) {
        if let Ok(r) = self.record.get_mut() {
            let mut r = std::mem::take(r);
            r.duration_ms = self.start.elapsed().as_millis() as u64;
            r.bytes += self.bytes.load(Ordering::Relaxed);
            self.auditor.record(r);
        }
    }
}

/// Most records written in one go; a batch may take the file past
/// [`max_bytes`] by at most this many records before it rotates.
const BATCH: usize = 256;

/// How long a queued record may wait for the writer to be woken.
const RING_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// Appends `rec` as one JSON line: what `serde_json` writes for it (a
/// unit test holds the two equal), written directly, without escaping the
/// field names each time (serde_json's was a third of the hub's audit work
/// per request).
fn line(out: &mut Vec<u8>, rec: &Record) {
    use std::io::Write as _;
    let strings: [(&[u8], &str); 6] = [
        (b"{\"time\":", &rec.time),
        (b",\"operator\":", &rec.operator),
        (b",\"cluster\":", &rec.cluster),
        (b",\"verb\":", &rec.verb),
        (b",\"method\":", &rec.method),
        (b",\"path\":", &rec.path),
    ];
    for (name, value) in strings {
        out.extend_from_slice(name);
        json_string(out, value);
    }
    let _ = write!(
        out,
        ",\"status\":{},\"duration_ms\":{},\"bytes\":{}",
        rec.status, rec.duration_ms, rec.bytes
    );
    let optional: [(&[u8], &Option<String>); 5] = [
        (b",\"rule\":", &rec.rule),
        (b",\"phase\":", &rec.phase),
        (b",\"error\":", &rec.error),
        (b",\"peer\":", &rec.peer),
        (b",\"as\":", &rec.acting_as),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            out.extend_from_slice(name);
            json_string(out, v);
        }
    }
    out.extend_from_slice(b"}\n");
}

/// `s` as a JSON string, escaped as serde_json escapes it, and besides,
/// as `\uXXXX`, the control characters it leaves raw (DEL, C1: a terminal
/// `tail`ing the log acts on U+009B as on ESC [) and the invisible ones
/// that change how text around them shows (U+202E): the same string to a
/// JSON reader (`tunnel::json_shown`).
fn json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most values need no escape: printable ASCII, found in one
    // branch-free pass.
    let plain = bytes.iter().fold(true, |ok, &b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let start = out.len();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
    if !s.is_ascii() || s.contains('\u{7f}') {
        // Only whole escapes and `s`'s own characters were written: UTF-8.
        if let Ok(escaped) = std::str::from_utf8(&out[start..]) {
            if let std::borrow::Cow::Owned(shown) = crate::tunnel::json_shown(escaped) {
                out.truncate(start);
                out.extend_from_slice(shown.as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// How often a failing audit log is reported in the hub's log: a full disk
/// fails every batch, and a warning per batch would fill the hub's log
/// (on the same disk) in its turn. Records lost in between are counted
/// and named in the next warning.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The audit file as the writer needs it: appended to, and cut back after
/// a write that failed halfway. A trait so that the tests can fill the
/// disk under it.
trait LogFile: Write + Sized {
    fn open(path: &Path) -> std::io::Result<Self>;
    fn len(&self) -> std::io::Result<u64>;
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

impl LogFile for std::fs::File {
    fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        std::fs::File::set_len(self, len)
    }
}

/// The writer task's side of the log: the open file, and what it owes
/// the counter and the hub's log after failed writes.
struct Writer<F> {
    path: PathBuf,
    file: Option<F>,
    dropped: Arc<AtomicU64>,
    /// A failed write left part of a line that could not be cut off: the
    /// next write starts with a newline, so that its first record is a
    /// line of its own and stays readable.
    torn: bool,
    /// When a failure was last reported in the hub's log.
    warned: Option<Instant>,
    /// Records lost since then, and the last error.
    unreported: u64,
    error: String,
}

impl<F: LogFile> Writer<F> {
    fn new(path: PathBuf, dropped: Arc<AtomicU64>) -> Self {
        let mut w = Writer {
            path,
            file: None,
            dropped,
            torn: false,
            warned: None,
            unreported: 0,
            error: String::new(),
        };
        // Said at once, not at the first request; every write tries again.
        match F::open(&w.path) {
            Ok(f) => w.file = Some(f),
            Err(e) => tracing::warn!("cannot open the audit log '{}': {e}", w.path.display()),
        }
        // A line left torn by a crash (or a disk that filled) is ended
        // first: the next record glued onto it was unreadable, and
        // skipped by `towerctl audit`.
        w.torn = ends_torn(&w.path);
        w
    }

    /// Writes whole lines, then rotates the file if it has grown past
    /// [`max_bytes`]. Lines that do not reach the file are counted in
    /// `dropped` and reported in the hub's log.
    fn write(&mut self, lines: &[u8]) {
        if lines.is_empty() {
            return;
        }
        if self.file.is_none() {
            match F::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) => return self.lost(records(lines), "open", e),
            }
        }
        let Some(f) = self.file.as_mut() else { return };
        let result = append(f, lines, &mut self.torn);
        let full = f.len().unwrap_or(0) >= max_bytes();
        match result {
            // Losses not yet reported are, once the minute is up.
            Ok(()) => self.report(),
            Err((n, e)) => self.lost(n, "write", e),
        }
        if full {
            rotate(&self.path);
            // If this fails, the next write tries again and reports it.
            self.file = F::open(&self.path).ok();
        }
    }

    /// Counts `n` records lost because the log could not be opened or
    /// written (`what`), and reports them.
    fn lost(&mut self, n: u64, what: &str, e: std::io::Error) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.unreported += n;
        self.error = format!("cannot {what} the audit log '{}': {e}", self.path.display());
        self.report();
    }

    /// Says in the hub's log how many records were lost and why, at most
    /// once every [`WARN_EVERY`].
    fn report(&mut self) {
        let now = Instant::now();
        if self.unreported == 0
            || self
                .warned
                .is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY)
        {
            return;
        }
        self.warned = Some(now);
        // Taken outside the macro: its arguments are not evaluated when
        // no subscriber listens.
        let n = std::mem::take(&mut self.unreported);
        tracing::warn!(
            "{}; {n} audit records lost (counted in towerctl_audit_dropped_total). \
             Free space on its disk or fix the error: later records are written as soon as it works",
            self.error,
        );
    }
}

/// Whether the file at `path` ends in the middle of a line.
fn ends_torn(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut last = [0u8];
    f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

/// How many records (whole lines) `lines` holds.
fn records(lines: &[u8]) -> u64 {
    lines.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Appends `lines` (whole lines) to `f` whole, or not at all: a write that
/// stops halfway (a full disk) is cut back off, since half a line would
/// glue the next record written onto it and make both unreadable. If the
/// cut fails too, the whole lines written stay and `torn` makes the next
/// append start with a newline. On failure, returns how many records are
/// not in the file, and the error.
fn append<F: LogFile>(
    f: &mut F,
    lines: &[u8],
    torn: &mut bool,
) -> Result<(), (u64, std::io::Error)> {
    let all = records(lines);
    if *torn {
        write_counted(f, b"\n", &mut 0).map_err(|e| (all, e))?;
        *torn = false;
    }
    let before = f.len();
    let mut done = 0;
    let Err(e) = write_counted(f, lines, &mut done) else {
        return Ok(());
    };
    if done == 0 {
        return Err((all, e));
    }
    match before.and_then(|len| f.set_len(len)) {
        Ok(()) => Err((all, e)),
        Err(_) => {
            *torn = lines[done - 1] != b'\n';
            Err((all - records(&lines[..done]), e))
        }
    }
}

/// `write_all` that counts in `done` the bytes written before an error.
fn write_counted(f: &mut impl Write, mut buf: &[u8], done: &mut usize) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *done += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn rotate(path: &Path) {
    let name = |i: usize| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    };
    let _ = std::fs::remove_file(name(KEEP));
    for i in (1..KEEP).rev() {
        let _ = std::fs::rename(name(i), name(i + 1));
    }
    let _ = std::fs::rename(path, name(1));
}

/// The audit log files, oldest first.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=KEEP)
        .rev()
        .map(|i| {
            let mut s = path.as_os_str().to_owned();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        })
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        v.push(path.to_path_buf());
    }
    v
}

/// A response body that writes the request's audit record when it ends
/// (or is dropped: the client went away), so streamed responses are
/// recorded with their real duration and size.
pub struct Audited<B> {
    inner: B,
    record: Option<Record>,
    start: Instant,
    auditor: Auditor,
}

impl<B> Audited<B> {
    pub fn new(inner: B, record: Record, start: Instant, auditor: Auditor) -> Self {
        Audited {
            inner,
            record: Some(record),
            start,
            auditor,
        }
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = self.start.elapsed().as_millis() as u64;
            self.auditor.record(r);
        }
    }
}

impl<B> Drop for Audited<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Audited<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(rec)) = (f.data_ref(), self.record.as_mut()) {
                    rec.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_however_a_url_carries_them() {
        let tok = format!("top_{}", "A".repeat(43));
        for target in [
            format!("/api?access_token={tok}&limit=5"),
            format!("/api?{tok}=&limit=1"),
            format!("/api?limit=5;access_token={tok}"),
            format!("/api?access_token=Bearer%09{tok}"),
            format!("/api?access_token=%22{tok}%22"),
            format!("/api?x=a={}", tok.replace('_', "%5F")),
            format!("/api/v1/namespaces/{tok}"),
        ] {
            assert_eq!(
                super::token_candidates(&target),
                std::slice::from_ref(&tok),
                "{target}"
            );
        }
        // A label value of a token's shape is one candidate, looked up
        // (and found to be no one's token) by the gateway; short runs are
        // none.
        assert_eq!(
            super::token_candidates(
                "/api?labelSelector=session%3Dlaptop_3f786850e387550fdab836ed7e6dc881de23001b"
            )
            .len(),
            0
        );
        assert!(super::token_candidates("/api?labelSelector=tier%3Dtop_tier").is_empty());
    }

    #[test]
    fn a_token_in_the_path_is_redacted() {
        let tok = format!("top_{}", "A".repeat(43));
        let mut path = format!("/api/v1/namespaces/{tok}/pods?limit=1");
        super::redact_path(&mut path);
        assert_eq!(path, "/api/v1/namespaces/REDACTED/pods?limit=1");
        let mut path = format!("/x/{}", tok.replace('_', "%5F"));
        super::redact_path(&mut path);
        assert_eq!(path, "/x/REDACTED");
        let mut path = "/api/v1/namespaces/top_tier".to_string();
        super::redact_path(&mut path);
        assert_eq!(path, "/api/v1/namespaces/top_tier");
        // Kept as it came: `+` and escapes, and a run of a token's shape
        // that is shorter than one.
        let kept = "/proxy/a+b/c%20d/laptop_3f786850e387550fdab836ed7e6dc881de23001b?q=1";
        let mut path = kept.to_string();
        super::redact_path(&mut path);
        assert_eq!(path, kept);
        // A path of nothing but prefixes (each one and the 43 characters
        // after it have a token's shape): one candidate, looked at in
        // linear time (it took seconds before, every request waiting).
        let mut path = "top_".repeat(15_000);
        super::redact_path(&mut path);
        assert!(path.starts_with("REDACTED"), "{}", &path[..40]);
        assert_eq!(super::token_candidates(&"top_".repeat(15_000)).len(), 1);
    }

    #[test]
    fn a_token_as_a_query_key_is_redacted_whole() {
        let tok = format!("top_{}", "A".repeat(43));
        let mut path = format!("/api?{tok}=&limit=1");
        super::redact_query(&mut path);
        assert_eq!(path, "/api?REDACTED&limit=1");
    }

    #[test]
    fn verbs() {
        assert_eq!(verb("GET", "/api/v1/namespaces", None), "list");
        assert_eq!(verb("GET", "/api/v1/namespaces/default", None), "get");
        assert_eq!(
            verb(
                "GET",
                "/api/v1/namespaces/default/configmaps",
                Some("watch=true")
            ),
            "watch"
        );
        // As kube-apiserver reads the flag: a watch to it is one here.
        let cm = "/api/v1/namespaces/default/configmaps";
        for q in [
            "watch=yes",
            "watch=TRUE",
            "%77atch=1",
            "watch",
            "watch=",
            "limit=1&watch=1&watch=false",
            "resourceVersion=5&watch=on",
        ] {
            assert_eq!(verb("GET", cm, Some(q)), "watch", "{q}");
        }
        for q in [
            "watch=0",
            "watch=False",
            "watch=false&watch=1",
            "watcher=1",
            "xwatch=1",
        ] {
            assert_eq!(verb("GET", cm, Some(q)), "list", "{q}");
        }
        assert_eq!(
            verb("GET", "/apis/apps/v1/namespaces/x/deployments/web", None),
            "get"
        );
        // The old watch paths, still served as watches.
        assert_eq!(verb("GET", "/api/v1/watch/secrets", None), "watch");
        assert_eq!(
            verb("GET", "/apis/apps/v1/watch/namespaces/x/deployments", None),
            "watch"
        );
        assert_eq!(verb("GET", "/api/v1/namespaces/watch", None), "get");
        // Subresources: the object's, never a list; the commands run in
        // a pod are `create` however they come.
        let pod = "/api/v1/namespaces/default/pods/web-0";
        for sub in ["exec", "attach", "portforward"] {
            for m in ["GET", "POST"] {
                assert_eq!(
                    verb(m, &format!("{pod}/{sub}"), Some("command=sh")),
                    "create",
                    "{m} {sub}"
                );
            }
        }
        assert_eq!(
            verb("GET", &format!("{pod}/log"), Some("follow=true")),
            "get"
        );
        assert_eq!(verb("GET", &format!("{pod}/status"), None), "get");
        assert_eq!(verb("PATCH", &format!("{pod}/status"), None), "patch");
        assert_eq!(
            verb("GET", "/api/v1/namespaces/default/status", None),
            "get"
        );
        assert_eq!(
            verb("PUT", "/api/v1/namespaces/default/finalize", None),
            "update"
        );
        assert_eq!(verb("GET", "/api/v1/nodes/n1/proxy/metrics", None), "get");
        assert_eq!(
            verb(
                "GET",
                "/apis/apps/v1/namespaces/x/deployments/web/scale",
                None
            ),
            "get"
        );
        assert_eq!(verb("GET", "/api/v1/namespaces/exec", None), "get");
        assert_eq!(verb("GET", "/api/v1/namespaces/x/pods/exec", None), "get");
        assert_eq!(
            verb("POST", "/api/v1/namespaces/x/configmaps", None),
            "create"
        );
        assert_eq!(
            verb("DELETE", "/api/v1/namespaces/x/configmaps", None),
            "deletecollection"
        );
        assert_eq!(
            verb("PATCH", "/api/v1/namespaces/x/configmaps/a", None),
            "patch"
        );
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        for i in 0..6 {
            std::fs::write(&p, format!("{i}\n")).unwrap();
            rotate(&p);
        }
        std::fs::write(&p, "current\n").unwrap();
        let f = files(&p);
        assert_eq!(f.len(), KEEP + 1, "{f:?}");
        assert_eq!(std::fs::read_to_string(&f[0]).unwrap(), "3\n");
        assert_eq!(
            std::fs::read_to_string(f.last().unwrap()).unwrap(),
            "current\n"
        );
    }

    #[tokio::test]
    async fn records_queued_together_are_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let a = Auditor::start_with(
            p.clone(),
            Limits {
                rate: 1e6,
                burst: 1e6,
            },
        );
        // Faster than the writer: most go out in batches.
        for i in 0..1000 {
            a.record(Record {
                operator: "bob".into(),
                path: format!("/r/{i}"),
                ..Record::default()
            });
        }
        let lines = lines_within(&p, 1000, std::time::Duration::from_secs(5)).await;
        assert_eq!(lines.len(), 1000, "every record written once");
        assert_eq!(a.dropped.load(Ordering::Relaxed), 0);
        for (i, l) in lines.iter().enumerate() {
            let r: Record =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("line {i}: {e}: {l}"));
            assert_eq!(r.path, format!("/r/{i}"), "in order");
        }
    }

    /// Lines in `p` once `want` of them are there, or after `within`.
    async fn lines_within(p: &Path, want: usize, within: std::time::Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= want || Instant::now() >= deadline {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_record_is_written_at_once_and_the_last_ones_when_the_hub_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let a = Auditor::start_with(p.clone(), Limits::default());
        let rec = |path: &str| Record {
            operator: "bob".into(),
            path: path.into(),
            ..Record::default()
        };
        // Past the ticker's first tick, so only the bell can wake the
        // writer before its once-a-second wake-up.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        a.record(rec("/first"));
        let lines = lines_within(&p, 1, std::time::Duration::from_millis(600)).await;
        assert_eq!(
            lines.len(),
            1,
            "a lone record must not wait for the once-a-second wake-up"
        );
        // Records queued just before the last Auditor goes (the hub
        // stopping) are written, without waiting for a wake-up either.
        let copy = a.clone();
        a.record(rec("/second"));
        drop(a);
        copy.record(rec("/third"));
        drop(copy);
        let lines = lines_within(&p, 3, std::time::Duration::from_millis(600)).await;
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[2].contains("/third"), "{lines:?}");
    }

    #[test]
    fn credentials_in_a_url_are_not_recorded() {
        for (path, want) in [
            (
                "https://hub:9443/clusters/a/version?access_token=top_abc",
                "https://hub:9443/clusters/a/version?access_token=REDACTED",
            ),
            (
                "/api/v1/pods?labelSelector=top_tier&fieldSelector=tj_canary%3Dyes&limit=500",
                "/api/v1/pods?labelSelector=top_tier&fieldSelector=tj_canary%3Dyes&limit=500",
            ),
            (
                "/x?%74oken=abc&x=Bearer%20top_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA&y=1",
                "/x?%74oken=REDACTED&x=REDACTED&y=1",
            ),
            (
                "/api/v1/pods?labelSelector=app%3Dweb&x=tj_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb&Password=p&limit=5",
                "/api/v1/pods?labelSelector=app%3Dweb&x=REDACTED&Password=REDACTED&limit=5",
            ),
            (
                "/api/v1/pods?continue=abc&labelSelector=app%3Ddesktop_top_1",
                "/api/v1/pods?continue=abc&labelSelector=app%3Ddesktop_top_1",
            ),
            ("/api/v1/pods", "/api/v1/pods"),
            ("/version?top_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB&a=1", "/version?REDACTED&a=1"),
        ] {
            let mut r = Record {
                operator: "alice".into(),
                path: path.into(),
                ..Record::default()
            };
            bound(&mut r);
            assert_eq!(r.path, want);
        }
    }

    #[test]
    fn a_record_stays_small_whatever_the_client_sent() {
        let mut r = Record {
            operator: UNAUTHENTICATED.into(),
            method: "X".repeat(60_000),
            cluster: "c".repeat(30_000),
            path: "/p".repeat(30_000),
            error: Some("e".repeat(10_000)),
            ..Record::default()
        };
        bound(&mut r);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.len() < 2048, "{} bytes", line.len());
        assert!(r.method.ends_with("more bytes]"), "{}", r.method);
        // Unauthenticated clients share a tenth of an operator's burst.
        let mut l = Limiter {
            limits: Limits {
                rate: 100.0,
                burst: 1000.0,
            },
            buckets: HashMap::new(),
        };
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| l.admit(UNAUTHENTICATED, t0).0).count();
        assert_eq!(admitted, 100);
        assert_eq!((0..1000).filter(|_| l.admit("bob", t0).0).count(), 1000);
    }

    /// Buckets full again with nothing owed are let go (one stayed for
    /// every operator that ever made a request); one still refilling, or
    /// owing a summary, stays.
    #[test]
    fn full_buckets_are_let_go() {
        let mut l = Limiter {
            limits: Limits {
                rate: 10.0,
                burst: 20.0,
            },
            buckets: HashMap::new(),
        };
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(l.admit(&format!("op{i}"), t0).0);
        }
        // "busy" spends its burst and more: it owes a summary.
        for _ in 0..30 {
            l.admit("busy", t0);
        }
        assert!(l.due(t0).is_empty());
        assert_eq!(l.buckets.len(), 101, "none refilled yet");
        let later = t0 + std::time::Duration::from_secs(3);
        let owed = l.due(later);
        assert_eq!(owed, vec![("busy".to_string(), 10)]);
        // busy took a token for its summary: still refilling.
        assert_eq!(l.buckets.len(), 1);
        assert!(l.due(later + std::time::Duration::from_secs(3)).is_empty());
        assert!(l.buckets.is_empty());
    }

    #[test]
    fn a_record_line_is_what_serde_json_writes() {
        let odd: String = (0u8..0x80).map(char::from).collect::<String>() + "é…\u{2028}\u{10FFFF}";
        let full = Record {
            time: "2026-12-03T22:31:22Z".into(),
            operator: odd.clone(),
            cluster: "alpha".into(),
            verb: "get".into(),
            method: "GET".into(),
            path: format!("/api/v1/{odd}"),
            status: 200,
            duration_ms: u64::MAX,
            bytes: 12345,
            rule: Some("#3 allow group:\"x\"".into()),
            phase: Some("end".into()),
            error: Some(odd.clone()),
            peer: Some("127.0.0.1:1 via [::1]:2".into()),
            acting_as: Some(format!("'{odd}' groups [a]")),
        };
        let bare = Record::default();
        let some = Record {
            phase: Some(String::new()),
            peer: Some("\\".into()),
            ..bare.clone()
        };
        for r in [full, bare, some] {
            let mut ours = Vec::new();
            line(&mut ours, &r);
            let ours = String::from_utf8(ours).unwrap();
            // The same record to a JSON reader; no control or invisible
            // character raw in the line.
            assert_eq!(serde_json::from_str::<Record>(&ours).unwrap(), r);
            assert!(ours.ends_with("}\n"), "{ours}");
            assert_eq!(
                crate::tunnel::json_shown(&ours[..ours.len() - 1]),
                &ours[..ours.len() - 1]
            );
            // Where serde_json leaves nothing raw, the very same bytes.
            let theirs = serde_json::to_string(&r).unwrap() + "\n";
            if theirs.is_ascii() && !theirs.contains('\u{7f}') {
                assert_eq!(ours, theirs);
            }
        }
        let mut c1 = Vec::new();
        json_string(&mut c1, "/a\u{9b}31m\u{202e}é\u{7f}");
        assert_eq!(
            String::from_utf8(c1).unwrap(),
            "\"/a\\u009b31m\\u202eé\\u007f\""
        );
    }

    #[test]
    fn paths_are_cut_on_a_character_boundary() {
        let mut p = "é".repeat(MAX_PATH);
        cut(&mut p, MAX_PATH);
        assert!(p.len() < MAX_PATH + 40, "{}", p.len());
        assert!(
            p.ends_with(&format!("…[{} more bytes]", 2 * MAX_PATH - MAX_PATH)),
            "{p}"
        );
        let mut short = "/api".to_string();
        cut(&mut short, MAX_PATH);
        assert_eq!(short, "/api");
    }

    #[test]
    fn each_operator_has_its_own_budget_and_suppressed_records_are_counted() {
        let mut l = Limiter {
            limits: Limits {
                rate: 1.0,
                burst: 3.0,
            },
            buckets: HashMap::new(),
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit("bob", t0), (true, 0));
        }
        for _ in 0..7 {
            assert_eq!(l.admit("bob", t0), (false, 0));
        }
        // Bob's flood does not touch alice's budget.
        assert_eq!(l.admit("alice", t0), (true, 0));
        // Nothing due until bob's bucket refills.
        assert!(l.due(t0).is_empty());
        let t1 = t0 + std::time::Duration::from_millis(1500);
        assert_eq!(l.due(t1), vec![("bob".to_string(), 7)]);
        assert!(l.due(t1).is_empty());
        // Or the next admitted record carries the count.
        for _ in 0..4 {
            l.admit("bob", t1);
        }
        let t2 = t1 + std::time::Duration::from_secs(2);
        assert_eq!(l.admit("bob", t2), (true, 4));
    }

    /// A file on a disk that fills up: `room` more bytes fit, then writes
    /// fail with ENOSPC, a short write first if a buffer straddles the
    /// end, as on a real disk. With `cut_fails`, cutting the file back
    /// fails as well.
    struct Filling {
        file: std::fs::File,
        room: Arc<AtomicU64>,
        cut_fails: bool,
    }

    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst) as usize;
            if room == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = self.file.write(&buf[..buf.len().min(room)])?;
            self.room.fetch_sub(n as u64, Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogFile for Filling {
        fn open(_: &Path) -> std::io::Result<Self> {
            Err(std::io::Error::other("the test opens its file itself"))
        }
        fn len(&self) -> std::io::Result<u64> {
            LogFile::len(&self.file)
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.cut_fails {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            LogFile::set_len(&mut self.file, len)
        }
    }

    fn filling(path: &Path, cut_fails: bool) -> (Writer<Filling>, Arc<AtomicU64>) {
        let room = Arc::new(AtomicU64::new(u64::MAX));
        let mut w = Writer::<Filling>::new(path.to_path_buf(), Arc::new(AtomicU64::new(0)));
        w.file = Some(Filling {
            file: LogFile::open(path).unwrap(),
            room: room.clone(),
            cut_fails,
        });
        (w, room)
    }

    fn batch(paths: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in paths {
            line(
                &mut out,
                &Record {
                    operator: "bob".into(),
                    path: p.to_string(),
                    ..Record::default()
                },
            );
        }
        out
    }

    /// The records `towerctl audit` can read back, and the lines it cannot.
    fn read_back(path: &Path) -> (Vec<String>, usize) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "half a line at the end: {text:?}"
        );
        let mut bad = 0;
        let mut paths = Vec::new();
        for l in text.lines() {
            match serde_json::from_str::<Record>(l) {
                Ok(r) => paths.push(r.path),
                Err(_) => bad += 1,
            }
        }
        (paths, bad)
    }

    #[test]
    fn a_full_disk_loses_whole_records_counted_and_never_half_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut w, room) = filling(&p, false);
        w.write(&batch(&["/a1", "/a2"]));
        // The disk fills in the middle of the next batch's first record.
        room.store(30, Ordering::SeqCst);
        w.write(&batch(&["/b1", "/b2", "/b3"]));
        assert_eq!(w.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(read_back(&p), (vec!["/a1".into(), "/a2".into()], 0));
        let warned = w.warned.expect("the failure is reported in the hub's log");
        // Still full: counted, but not reported again within the minute.
        w.write(&batch(&["/c1"]));
        assert_eq!(w.dropped.load(Ordering::Relaxed), 4);
        assert_eq!((w.warned, w.unreported), (Some(warned), 1));
        // Space is back: the next records are whole lines of their own.
        room.store(u64::MAX, Ordering::SeqCst);
        w.write(&batch(&["/d1", "/d2"]));
        assert_eq!(
            read_back(&p),
            (
                vec!["/a1".into(), "/a2".into(), "/d1".into(), "/d2".into()],
                0
            )
        );
        assert_eq!(w.dropped.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_half_line_that_cannot_be_cut_off_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut w, room) = filling(&p, true);
        w.write(&batch(&["/a1"]));
        // Room for the first record of the batch and part of the second.
        let first = batch(&["/b1"]).len() as u64;
        room.store(first + 10, Ordering::SeqCst);
        w.write(&batch(&["/b1", "/b2"]));
        assert_eq!(w.dropped.load(Ordering::Relaxed), 1, "/b1 is in the file");
        room.store(u64::MAX, Ordering::SeqCst);
        w.write(&batch(&["/c1"]));
        let (paths, bad) = read_back(&p);
        assert_eq!(paths, ["/a1", "/b1", "/c1"]);
        assert_eq!(bad, 1, "the broken line is a line of its own");
    }
}
