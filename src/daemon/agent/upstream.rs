//! The agent's side of its member API server: channels from the hub
//! speak HTTP/1.1; each request goes to the API server through one pooled
//! kube client with the agent's own credentials (and the operator's
//! identity as `Impersonate-*` where the member requires it).

use std::path::PathBuf;

use crate::daemon::http::long_running;
use crate::tunnel::flow::FlowStream;
use anyhow::{Context, Result};
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::raw::{serve_raw, Dialer};
use crate::daemon::clientas::{ClientAs, CARRIED_PREFIX, CLIENT_PREFIX};
use crate::daemon::http::{
    finish_upgrade, is_upgrade, status_response, strip_hop_by_hop, strip_identity, Body,
    GROUPS_HEADER, IMPERSONATE_HEADER, OPERATOR_HEADER,
};
use crate::daemon::targets::Target;
use crate::daemon::wire::RawIdentity;
use crate::tunnel::client::{ChannelService, Confirm};
use crate::tunnel::TARGET_APISERVER;

/// Largest request body the agent buffers (kube-apiserver's own default
/// limit is 3 MiB; exec/attach stdin goes over the upgraded stream).
/// kube-rs takes a whole body, so bodies are buffered; these bounds keep
/// that buffering from becoming a memory attack.
pub(super) const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;

/// Request bytes buffered at once across all requests, in KiB.
pub(super) const BODY_BUDGET_KIB: usize = 64 * 1024;

/// KiB of request bodies buffered, in all and by operator.
pub(super) struct BodyBudget {
    total: Arc<Semaphore>,
    /// Of the total, the most one operator's requests hold at once (a
    /// quarter, and at least one largest body): one operator's stalled
    /// uploads (8 of 8 MiB, never finished) took the whole budget and
    /// every other operator's writes got 503.
    operator_kib: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl BodyBudget {
    /// A budget of `total_kib` KiB.
    pub(super) fn new(total_kib: usize) -> Self {
        BodyBudget {
            total: Arc::new(Semaphore::new(total_kib)),
            operator_kib: (total_kib / 4).max(MAX_REQUEST_BODY / 1024).min(total_kib),
            held: Default::default(),
        }
    }

    /// `kib` more for `operator`'s request, or why not.
    fn take(&self, operator: &str, kib: usize) -> Result<BodyPermit, String> {
        {
            let mut held = self
                .held
                .lock()
                .map_err(|_| "the body budget is unusable".to_string())?;
            let mine = held.entry(operator.to_string()).or_default();
            if *mine + kib > self.operator_kib {
                if *mine == 0 {
                    held.remove(operator);
                }
                return Err(format!("operator '{operator}' has {} MiB of request bodies being received by this towerctl agent already (its share); finish or cancel those uploads and retry", self.operator_kib / 1024));
            }
            *mine += kib;
        }
        // Given back on every path from here, the error's included.
        let mut permit = BodyPermit {
            operator: operator.to_string(),
            kib,
            held: self.held.clone(),
            total: None,
        };
        match self.total.clone().try_acquire_many_owned(kib as u32) {
            Ok(p) => {
                permit.total = Some(p);
                Ok(permit)
            }
            Err(_) => Err(
                "the towerctl agent is buffering too many request bodies right now; retry shortly"
                    .into(),
            ),
        }
    }
}

/// Budget held for one request's body, given back when dropped.
pub(super) struct BodyPermit {
    operator: String,
    kib: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    total: Option<OwnedSemaphorePermit>,
}

impl BodyPermit {
    /// Holds `other`'s budget in this one.
    fn merge(&mut self, mut other: BodyPermit) {
        self.kib += std::mem::take(&mut other.kib);
        match (self.total.as_mut(), other.total.take()) {
            (Some(a), Some(b)) => a.merge(b),
            (None, b) => self.total = b,
            (_, None) => {}
        }
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(mine) = held.get_mut(&self.operator) {
                *mine = mine.saturating_sub(self.kib);
                if *mine == 0 {
                    held.remove(&self.operator);
                }
            }
        }
    }
}

/// A request body may go this long without a byte (a client that stalled
/// holds its share of the body budget no longer).
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// A request body must arrive completely within this: kube-apiserver's own
/// time for a request (`--request-timeout`, 60 s). A whole-body limit of
/// 30 s refused a 3 MiB apply from a client sending under ~100 KB/s (a
/// slow VPN), which the API server itself would have taken.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Streams (channels) the agent serves at once; more are closed at once.
pub(super) const MAX_STREAMS: usize = 4096;

/// Of [`MAX_STREAMS`], most that raw streams (CONNECT, port-forward) take:
/// the rest stay for API requests, so kubectl still reaches the member
/// while port-forward connections fill their share.
pub(super) const MAX_RAW_STREAMS: usize = 3072;

/// How long the member's API server may take to answer (its status and
/// headers) a request that is not long-running, unless the request asks
/// for longer with `?timeout=`. kube-apiserver answers or times out such
/// requests within 60 s itself; a server that says nothing at all on a
/// pooled connection (dead host, dropped packets, hung process) otherwise
/// held kubectl forever while the tunnel looked healthy.
/// `TOWERCTL_API_ANSWER_TIMEOUT` (seconds) sets another.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn answer_timeout() -> std::time::Duration {
    static T: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("TOWERCTL_API_ANSWER_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(ANSWER_TIMEOUT, std::time::Duration::from_secs)
    })
}

/// How long the agent waits for the answer to a request that is not
/// long-running: [`answer_timeout`], or what the request asks for
/// (`?timeout=`) and 30 s for the server's own answer to it, if longer.
fn answer_wait(query: Option<&str>) -> std::time::Duration {
    let asked = crate::daemon::http::asked_timeout(query)
        .map(|t| t.saturating_add(std::time::Duration::from_secs(30)))
        .unwrap_or_default();
    answer_timeout().max(asked)
}

/// The member's API server as the agent forwards requests to it: kube's
/// middleware (credentials, extra headers) over the same connection pool
/// as the agent's kube client ([`super::pool::Pool`]), called directly. `kube::Client`
/// puts a `tower` buffer in front (a worker task and a channel hop for
/// every request: a tenth of the agent's work per request, measured) and
/// retries 429, 503 and 504 by itself, copying every request for that; a
/// proxy leaves retrying to its client (kubectl, client-go), which honours
/// `Retry-After`.
#[derive(Clone)]
pub(super) struct Api(Member);

type ApiService = tower::util::BoxCloneSyncService<
    Request<kube::client::Body>,
    Response<super::pool::PooledBody>,
    tower::BoxError,
>;

/// The member API server's request stack (kube's credentials and extra
/// headers over the connection pool), replaced whole when the member
/// kubeconfig changes ([`follow_kubeconfig`]): the agent's kube client and
/// [`Api`] both go through it. Requests already sent finish on the stack
/// they started on (its pooled connections close as they end).
#[derive(Clone)]
pub(super) struct Member(Arc<std::sync::RwLock<ApiService>>);

impl Member {
    fn new(service: ApiService) -> Self {
        Self(Arc::new(std::sync::RwLock::new(service)))
    }

    fn current(&self) -> ApiService {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, service: ApiService) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = service;
    }
}

impl tower::Service<Request<kube::client::Body>> for Member {
    type Response = Response<super::pool::PooledBody>;
    type Error = tower::BoxError;
    type Future = tower::util::Oneshot<ApiService, Request<kube::client::Body>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The pool under it is always ready; the call readies the current
        // stack itself.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        use tower::ServiceExt;
        self.current().oneshot(req)
    }
}

impl Api {
    /// Sends `req`; the error is said in words, with its causes.
    async fn send(&self, req: Request<kube::client::Body>) -> Result<Response<Body>, String> {
        use tower::ServiceExt;
        match self.0.current().oneshot(req).await {
            Ok(r) => Ok(r.map(|b| b.map_err(|e| Box::new(e) as _).boxed_unsync())),
            Err(e) => Err(with_causes(&*e)),
        }
    }
}

/// An error and its causes, outermost first ("client error (Connect):
/// tcp connect error: Connection refused").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The agent's side of its member API server: a pooled kube client.
pub(super) struct Upstream {
    pub(super) api: Api,
    /// Raw channels (CONNECT, port-forward) go through this.
    pub(super) dialer: Dialer,
    /// Whose identity requests carry: the agent's `--impersonate`, its
    /// kubeconfig's own impersonation, the SubjectAccessReviews a
    /// client's own impersonation needs.
    pub(super) identity: Arc<Identity>,
    /// Owns every stream the agent serves, so shutdown can wait for them.
    pub(super) tasks: TaskTracker,
    /// One permit per stream served ([`MAX_STREAMS`]).
    pub(super) streams: Arc<Semaphore>,
    /// One permit per raw stream ([`MAX_RAW_STREAMS`], fewer under a
    /// memory limit: [`budgets`]), besides its stream permit; one through
    /// `pods/portforward` takes `raw::PORTFORWARD_PERMITS` more.
    pub(super) raw_streams: Arc<Semaphore>,
    /// How many permits `raw_streams` has in all.
    pub(super) raw_limit: usize,
    /// KiB of request bodies buffered ([`BODY_BUDGET_KIB`]).
    pub(super) body_budget: Arc<BodyBudget>,
    /// The windows this agent's streams ask the hub for ([`WINDOW_BUDGET`]).
    pub(super) windows: Arc<crate::tunnel::flow::WindowBudget>,
    /// Each operator's part of `windows` for raw streams ([`Upstream::raw_window`]).
    pub(super) shares: crate::tunnel::flow::Shares,
}

/// What the hub may have in flight towards this agent on all its streams
/// together, and so what the agent buffers at most when the other end of
/// its streams stops reading (a port-forward target that reads nothing,
/// an upload the API server is slow to take), plus 32 KiB per stream past
/// it. Each stream asks the hub for a window out of what is left: 16 full
/// raw windows (8 MiB), more API ones (1 MiB), before new streams get
/// less. Without it, one operator's 1,024 port-forward connections to a
/// target that never reads held 4 GiB of the agent, well past a pod's
/// memory limit.
pub const WINDOW_BUDGET: u64 = 128 * 1024 * 1024;

/// What the agent buffers at most: windows asked of the hub in all
/// ([`WINDOW_BUDGET`]) and request bodies ([`BODY_BUDGET_KIB`]), in bytes.
#[derive(Debug, PartialEq)]
pub(super) struct Budgets {
    pub windows: u64,
    pub bodies: u64,
    /// Raw streams at once ([`MAX_RAW_STREAMS`]): past the windows'
    /// budget, each still takes a window of
    /// [`crate::tunnel::flow::MIN_WINDOW`].
    pub raw_streams: usize,
}

/// [`Budgets`] for a process with `limit` bytes of memory (its cgroup's,
/// [`crate::daemon::memory::cgroup_limit`]): a quarter for windows, an
/// eighth for bodies and an eighth for the smallest windows of raw streams
/// past the windows' budget, within the defaults, so that all of them full
/// stay within half a limit of 64 MiB or more. At their defaults (128 MiB
/// of windows, 64 MiB of bodies, 3,072 raw streams' 32 KiB: 288 MiB) they
/// were past a pod's 256 MiB limit: the agent could be killed for memory
/// under load instead of slowing its streams down. Bodies keep room for
/// one largest body ([`MAX_REQUEST_BODY`]) and raw streams 256 at least.
pub(super) fn budgets(limit: Option<u64>) -> Budgets {
    let full = Budgets {
        windows: WINDOW_BUDGET,
        bodies: (BODY_BUDGET_KIB * 1024) as u64,
        raw_streams: MAX_RAW_STREAMS,
    };
    let Some(limit) = limit else { return full };
    let min_window = crate::tunnel::flow::MIN_WINDOW;
    Budgets {
        windows: (limit / 4).clamp(4 << 20, full.windows),
        bodies: (limit / 8).clamp(MAX_REQUEST_BODY as u64, full.bodies),
        raw_streams: ((limit / 8 / min_window) as usize).clamp(256, full.raw_streams),
    }
}

impl Upstream {
    /// A raw stream's window, out of the agent's budget and out of its
    /// operator's half of it, as the hub shares a member's windows: 16 of
    /// one operator's port-forward connections, idle ones too, took the
    /// whole budget, and every other operator's streams then got the
    /// least window (32 KiB a round trip for an upload or an `apply`).
    fn raw_window(&self, operator: &str) -> crate::tunnel::flow::WindowPermit {
        self.shares.take(
            &self.windows,
            operator,
            2,
            crate::tunnel::flow::STREAM_WINDOW,
        )
    }

    /// Confirms the channel, writes `reply` (why it is refused) and closes
    /// it, in a task; `held` (permits) is released at the end.
    fn refuse(
        &self,
        confirm: Confirm,
        mut stream: FlowStream,
        reply: String,
        held: impl Send + 'static,
    ) {
        self.tasks.spawn(async move {
            use tokio::io::AsyncWriteExt;
            confirm.now().await;
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
            drop(held);
        });
    }
}

impl ChannelService for Upstream {
    fn accepts(&self, target: &str, _port: u32) -> bool {
        // Every well-formed target is accepted here; the dial policy is
        // applied in `serve`, which can say in words why it refuses.
        Target::from_channel_address(target).is_some()
    }

    fn serve(
        &self,
        target: String,
        port: u32,
        originator: String,
        stream: FlowStream,
        confirm: Confirm,
    ) {
        let raw = target != TARGET_APISERVER;
        let permits = self.streams.clone().try_acquire_owned().ok().and_then(|p| {
            if !raw {
                return Some((p, None));
            }
            let r = self.raw_streams.clone().try_acquire_owned().ok()?;
            Some((p, Some(r)))
        });
        let Some((permit, raw_permit)) = permits else {
            let msg = if raw {
                format!("the towerctl agent carries as many port-forward and CONNECT streams as its limit allows ({} at once, fewer where they go through the API server's port-forward, which takes {} of them each; the rest of its {MAX_STREAMS} streams are kept for API requests, and its memory limit sets the number); close some (idle port-forward connections) and retry", self.raw_limit, super::raw::PORTFORWARD_PERMITS + 1)
            } else {
                format!("the towerctl agent has {MAX_STREAMS} streams open already (its limit); close some (idle port-forward connections, watches) and retry")
            };
            hub_driven(format_args!("refused a stream: {msg}"));
            // Said in words: a stream closed unanswered reached kubectl as
            // "connection closed before message completed", and a CONNECT
            // waited 20 s for an answer.
            let reply = if raw {
                crate::daemon::wire::RawAnswer::Err(crate::daemon::wire::DialCode::Unavailable, msg)
                    .to_line()
            } else {
                full_limit_answer(&msg)
            };
            self.refuse(confirm, stream, reply, ());
            return;
        };
        if raw {
            let Some(t) = Target::from_channel_address(&target) else {
                return;
            };
            let d = self.dialer.clone();
            let open = match crate::daemon::wire::RawOpen::decode(&originator) {
                Ok(open) => open,
                Err(msg) => {
                    hub_driven(format_args!("refused a stream: {msg}"));
                    let answer = crate::daemon::wire::RawAnswer::Err(
                        crate::daemon::wire::DialCode::DialFailed,
                        format!("{msg}; is the hub of another version?"),
                    );
                    self.refuse(confirm, stream, answer.to_line(), (permit, raw_permit));
                    return;
                }
            };
            let window = self.raw_window(open.as_ref().map_or("", |o| o.who.user.as_str()));
            // A hub that told its window in the open (kept to from the
            // first byte this side sends) hears this side's in the answer
            // to the dial, ahead of which it sends nothing, and the
            // channel is confirmed with that answer, once dialed; an older
            // hub gets the confirmation at once and this side's window in
            // a frame, on the channel before anything this side answers.
            let hub_window = open.as_ref().and_then(|o| o.window);
            let (confirm_now, answer) = match hub_window {
                Some(w) => {
                    stream.peer_window(w);
                    stream.window_told(window.window);
                    (None, Some((confirm, window.window)))
                }
                None => (Some(confirm), None),
            };
            let (early, who) = match open {
                Some(mut o) => (o.take_early(), Some(o.who)),
                None => (Vec::new(), None),
            };
            let own_window = window.window;
            self.tasks.spawn(async move {
                if let Some(c) = confirm_now {
                    c.now().await;
                    stream.advertise_window(own_window).await;
                }
                // Boxed: the dial's future is large, and unboxed it was
                // copied whole at every move on its way into the task (9
                // copies per connection, ~3 % of the agent's instructions
                // per connection).
                Box::pin(serve_raw(d, t, port, who, early, answer, stream)).await;
                drop((permit, raw_permit, window));
            });
            return;
        }
        // The request's first bytes, when the hub sent them with the open.
        let first = match crate::daemon::wire::FirstRequest::decode(&originator) {
            Ok(first) => first,
            Err(msg) => {
                hub_driven(format_args!("refused a stream: {msg}"));
                let reply = full_limit_answer(&format!("{msg}; is the hub of another version?"));
                self.refuse(confirm, stream, reply, permit);
                return;
            }
        };
        let window = self.windows.take(crate::tunnel::flow::API_WINDOW);
        let api = self.api.clone();
        let identity = self.identity.clone();
        let tasks = self.tasks.clone();
        let budget = self.body_budget.clone();
        self.tasks.spawn(async move {
            confirm.now().await;
            // On the channel before anything this side answers.
            stream.advertise_window(window.window).await;
            // Held by the stream itself: past an upgrade (exec, attach,
            // port-forward) hyper ends this task and hands the stream on.
            // Answers are paced by what the stream took of them
            // (`daemon::pace`): hyper's writer would queue up to its head
            // limit (128 KiB) of each one whose reader stopped reading.
            let pace = crate::daemon::pace::Pace::new();
            let stream = crate::tunnel::counted::Holding::new(
                crate::daemon::pace::Drained::new(
                    crate::tunnel::first::Prefixed::new(first, stream),
                    pace.clone(),
                ),
                (permit, window),
            );
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                let tasks = tasks.clone();
                let budget = budget.clone();
                let identity = identity.clone();
                let pace = pace.clone();
                async move {
                    let answer = forward(&tasks, &budget, &api, &identity, req).await;
                    Ok::<_, std::convert::Infallible>(
                        answer.map(|b| crate::daemon::pace::Paced::new(b, pace)),
                    )
                }
            });
            // Bounded as the gateway bounds its clients: a request head of
            // at most 128 KiB (the gateway's 64 KiB and the identity it
            // adds; hyper's default is 408 KiB, held outside the window
            // budget once read off the stream), and a head that takes
            // more than 5 minutes to come (a channel kept idle for a
            // client connection waits at most the gateway's 120 s idle
            // time) ends the stream: without a timer hyper has no head
            // deadline at all, and a hub could hold 4,096 streams with
            // unfinished heads for ever.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_WAIT)
                .max_buf_size(MAX_HEAD)
                // hyper's default is 100 lines; an operator's groups come
                // one line each, and kube-apiserver has no count limit.
                .max_headers(crate::daemon::http::MAX_HEADER_LINES)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!("tunnel stream ended: {e}");
            }
        });
    }
}

/// Longest wait for the member's answers on what a request may act as.
const RBAC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Most bytes of a request head from the hub (the gateway's 64 KiB cap
/// and the identity headers it adds).
const MAX_HEAD: usize = 128 * 1024;
/// Longest wait for a request head on an API stream, idle ones included.
const HEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The operator to impersonate, when both the hub (for this member) and
/// this agent allow it: `(user, groups)`.
/// `Ok(None)`: act with the agent's own identity (neither side asks for
/// impersonation). `Err`: the two sides disagree, or the operator's
/// identity is missing where it is required: refused, never a silent
/// fall-back to the agent's (usually broader) identity.
fn impersonation(
    headers: &http::HeaderMap,
    agent_requires: bool,
) -> Result<Option<(String, Vec<String>)>, String> {
    let member_requires = headers.get(IMPERSONATE_HEADER).is_some_and(|v| v == "1");
    match (member_requires, agent_requires) {
        (false, false) => return Ok(None),
        (true, false) => return Err("this member requires impersonation but its towerctl agent runs without --impersonate; start the agent again with --impersonate (on the member: 'towerctl leave NAME', then its join command with --impersonate)".into()),
        (false, true) => return Err("this towerctl agent runs with --impersonate but the hub did not ask for it for this member; run 'towerctl cluster set NAME --impersonate' on the hub".into()),
        (true, true) => {}
    }
    let Some(user) = headers
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
        .map(str::to_string)
    else {
        return Err("the request carries no operator identity to impersonate".into());
    };
    // One value per group (the hub never joins them: a group containing a
    // comma stays one group).
    let groups = headers
        .get_all(GROUPS_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Some((user, groups)))
}

/// Whose identity the agent's requests to its API server carry.
pub(super) struct Identity {
    /// `--impersonate`: each operator acts as itself.
    pub impersonate: bool,
    /// The agent's kubeconfig user impersonates (`as`, `as-groups`, …):
    /// kube adds those headers to every request, and a client's own could
    /// not be layered on them.
    pub own_impersonation: bool,
    /// Under `--impersonate`: asks the member's RBAC whether an operator
    /// may impersonate what its client names.
    pub rbac: Option<Arc<super::rbac::Rbac>>,
}

/// Logs a warning the hub's requests cause: 10 a minute, the rest at
/// debug (each refusal is answered to its client; a hub, or an operator
/// through it, repeating one must not rotate the agent's log away).
fn hub_driven(what: std::fmt::Arguments<'_>) {
    static WARNINGS: crate::tunnel::LogBudget =
        crate::tunnel::LogBudget::new("warnings the hub's requests cause", 10);
    if WARNINGS.admit() {
        tracing::warn!("{what}");
    } else {
        tracing::debug!("{what}");
    }
}

/// A 403 from the agent, in words, logged.
fn refused(why: &str) -> Response<Body> {
    hub_driven(format_args!("refused a request: {why}"));
    status_response(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("refused by the towerctl agent: {why}"),
    )
}

/// The impersonation headers a request to the member carries: the
/// operator's where the member requires impersonation, else none; a
/// client's own (`kubectl --as`, carried by the hub) instead, once the
/// member's RBAC lets the operator impersonate it (under `--impersonate`)
/// or as they are (with the agent's identity, whose own right to
/// impersonate the API server then checks). `Err`: the refusal.
async fn acting_as(
    identity: &Identity,
    operator: Option<(String, Vec<String>)>,
    client: Option<ClientAs>,
    headers: &mut http::HeaderMap,
) -> Result<(), Response<Body>> {
    match (operator, client) {
        (None, None) => {}
        (Some((user, groups)), None) => {
            // Fail closed: a value that cannot be a header went out as no
            // header at all, and the request then ran with the agent's own
            // credentials.
            let unfit = || {
                refused("the operator's identity cannot be written as impersonation headers; refused rather than sent with the agent's own credentials")
            };
            let v = http::HeaderValue::from_str(&user).map_err(|_| unfit())?;
            headers.insert("impersonate-user", v);
            for g in groups {
                let v = http::HeaderValue::from_str(&g).map_err(|_| unfit())?;
                headers.append("impersonate-group", v);
            }
        }
        (None, Some(a)) => {
            if identity.own_impersonation {
                return Err(refused(&format!(
                    "the agent's kubeconfig user impersonates, and a client's own impersonation ({}) cannot be added to it; send the request without --as, or give the agent credentials that do not impersonate",
                    a.describe()
                )));
            }
            a.write(headers, CLIENT_PREFIX);
        }
        (Some((user, groups)), Some(a)) => {
            let Some(rbac) = &identity.rbac else {
                return Err(refused(
                    "no SubjectAccessReview client to check impersonation with",
                ));
            };
            let who = RawIdentity { user, groups };
            if let Err(why) = rbac.may_impersonate(&who, &a).await {
                return Err(refused(&format!("{why} (kubectl --as {})", a.describe())));
            }
            a.write(headers, CLIENT_PREFIX);
        }
    }
    Ok(())
}

async fn forward(
    tasks: &TaskTracker,
    budget: &BodyBudget,
    api: &Api,
    identity: &Identity,
    mut req: Request<Incoming>,
) -> Response<Body> {
    // The hub refuses these already (`route::pick`); checked again here,
    // where the path is joined to the API URL's own path.
    if let Some(why) = crate::daemon::route::unsafe_path(req.uri().path()) {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("refused by the towerctl agent: the request path has {why}"),
        );
    }
    let upgrade = is_upgrade(req.headers());
    let hub_side_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let operator_as = match impersonation(&parts.headers, identity.impersonate) {
        Ok(i) => i,
        Err(why) => return refused(&why),
    };
    let client_as = match ClientAs::read(&parts.headers, CARRIED_PREFIX) {
        Ok(a) => a,
        Err(why) => {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("refused by the towerctl agent: impersonation {why}"),
            )
        }
    };
    // Whose body budget the request uses (the hub always names the
    // operator; read before the identity headers go).
    let operator = parts
        .headers
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // Removes any Impersonate-* and x-towerctl-* header (defence in depth:
    // the hub already strips what clients send), then adds ours.
    strip_identity(&mut parts.headers);
    // The member's RBAC is asked (SubjectAccessReviews, one per value
    // impersonated) before the request has its own deadline: bounded, so
    // that an API server that stopped answering does not hold it for ever.
    let asked = acting_as(identity, operator_as, client_as, &mut parts.headers);
    match tokio::time::timeout(RBAC_WAIT, asked).await {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => return refusal,
        Err(_) => {
            return status_response(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                &format!("the member's API server did not answer the agent's access reviews for this request within {RBAC_WAIT:?}"),
            )
        }
    }
    parts.headers.remove(header::HOST);
    let (body, _reserved) = match read_body(body, budget, &operator).await {
        Ok(b) => b,
        // A budget full (503) is lifted by others' requests ending.
        Err((code, reason, msg)) if code == StatusCode::SERVICE_UNAVAILABLE => {
            return crate::daemon::http::retry_after(status_response(code, reason, &msg), 1)
        }
        Err((code, reason, msg)) => return status_response(code, reason, &msg),
    };
    let wait = (!long_running(parts.uri.path(), parts.uri.query(), upgrade))
        .then(|| answer_wait(parts.uri.query()));
    // A proxied backend's own 401 (a Service's app asking for a password)
    // is its answer, not the member refusing the agent.
    let path = parts.uri.path();
    let proxied = path.contains("/proxy") && path.split('/').any(|s| s == "proxy");
    let up_req = Request::from_parts(parts, kube::client::Body::from(body));
    let sent = api.send(up_req);
    let answer = match wait {
        Some(wait) => match tokio::time::timeout(wait, sent).await {
            Ok(a) => a,
            Err(_) => {
                hub_driven(format_args!(
                    "the member's API server did not answer within {wait:?}"
                ));
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!("the member's API server did not answer within {}s (a hung server, or a connection to it that died silently); the towerctl agent gave up on this request, retry it", wait.as_secs()),
                );
            }
        },
        None => sent.await,
    };
    let mut resp = match answer {
        Ok(r) => r,
        Err(e) => {
            // Said in the agent's log too: with the tunnel up, `status`
            // says "connected", and this was nowhere but in kubectl's
            // error (with no discovery cache, kubectl shows "unknown").
            let e = format!("{}{}", crate::tunnel::printable(&e, 500), tls_hint(&e));
            hub_driven(format_args!("cannot reach the member's API server: {e}"));
            return status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("the towerctl agent cannot reach its API server: {e}"),
            );
        }
    };
    // The member refusing the agent's own credentials (a token expired or
    // revoked, a certificate past its date): a 401 reached kubectl as
    // "You must be logged in to the server", which reads as the operator's
    // token, fine here. Said as the agent's, in the log too.
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if resp.status() == StatusCode::UNAUTHORIZED && !proxied && json {
        hub_driven(format_args!(
            "the member's API server refused the agent's own credentials (401): renew the credentials of the agent's kubeconfig or service account"
        ));
        return status_response(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            "the member's API server refused the towerctl agent's own credentials (401 Unauthorized): the credentials in the agent's kubeconfig (or its pod's service account token) expired or were revoked; renew them on the member and put them in the agent's kubeconfig (the agent reads it again within seconds of a change; no restart)",
        );
    }
    crate::daemon::http::framed_by_transfer_encoding(resp.headers_mut());
    // Answered on in HTTP/1.1 whatever the member spoke: an HTTP/1.0
    // answer was passed on as one, and the hub's connection (and an
    // HTTP/1.1 client's to the gateway) closed after it.
    *resp.version_mut() = hyper::Version::HTTP_11;
    finish_upgrade(
        tasks,
        hub_side_upgrade,
        &mut resp,
        CancellationToken::new(),
        (),
        None,
    );
    resp
}

/// Words for what rustls refuses and Go's TLS (kubectl's) takes, so that
/// "kubectl works, the agent does not" is explained: a certificate with
/// `CA:TRUE` as the API server's own, issued by the trusted CA (one that
/// is itself the kubeconfig's trusted certificate, what `openssl req
/// -x509` makes by default, is taken: [`super::member_tls`]).
fn tls_hint(error: &str) -> &'static str {
    if error.contains("CaUsedAsEndEntity") {
        "; the API server presents a CA certificate (basicConstraints CA:TRUE) as its own: \
         kubectl accepts that, the towerctl agent only when that certificate is itself the \
         kubeconfig's certificate-authority; give the API server a server certificate with \
         CA:FALSE (openssl … -addext basicConstraints=critical,CA:FALSE), or put its own \
         certificate in the member kubeconfig's certificate-authority-data"
    } else {
        ""
    }
}

/// Where the agent's member API client comes from, to be read again.
#[derive(Clone)]
pub(super) struct MemberSource {
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) sa_dir: Option<PathBuf>,
    pub(super) impersonate: bool,
}

/// The agent's client for its member API server, built by
/// [`upstream_client`].
pub(super) struct MemberClient {
    pub(super) client: kube::Client,
    pub(super) api: Api,
    pub(super) url: String,
    pub(super) own_impersonation: bool,
    /// What [`follow_kubeconfig`] replaces.
    pub(super) member: Member,
    /// The kubeconfig files it was read from (none from a service account).
    pub(super) files: Vec<PathBuf>,
    /// Their `current-context` then: kept by [`follow_kubeconfig`].
    context: Option<String>,
}

/// The `current-context` of the kubeconfig `source` names (`None` from a
/// service account, or when it cannot be read).
fn current_context(source: &MemberSource, files: &[PathBuf]) -> Option<String> {
    if files.is_empty() {
        return None;
    }
    let kc = match &source.kubeconfig {
        Some(p) => kube::config::Kubeconfig::read_from(p).ok()?,
        None => kube::config::Kubeconfig::read().ok()?,
    };
    kc.current_context
}

/// Builds the client for the member's API server: `--kubeconfig`, else
/// what [`crate::daemon::incluster::infer`] finds (the pod's service
/// account, or `KUBECONFIG`/`~/.kube/config`).
pub(super) async fn upstream_client(source: &MemberSource) -> Result<MemberClient> {
    let (config, files) = member_config(source).await?;
    let own_impersonation = !own_impersonation(&config.auth_info).is_empty();
    let url = config.cluster_url.to_string();
    let member = Member::new(member_service(&config)?);
    let (client, api) = clients(&member, config);
    let context = current_context(source, &files);
    Ok(MemberClient {
        client,
        api,
        url,
        own_impersonation,
        member,
        files,
        context,
    })
}

/// The member API configuration `source` names, and the kubeconfig files
/// it was read from.
async fn member_config(source: &MemberSource) -> Result<(kube::Config, Vec<PathBuf>)> {
    let no_proxy_hint = || {
        let set = ["NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
        if set {
            " (with HTTPS_PROXY set, kube also parses NO_PROXY, and refuses entries Go \
             accepts, such as an empty one from a trailing comma: check NO_PROXY)"
        } else {
            ""
        }
    };
    let (mut config, files) = match &source.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(crate::daemon::incluster::without_snippet)
                .with_context(|| format!("cannot read the member kubeconfig '{}'", p.display()))?;
            let named = current_proxy_url(&kc);
            let mut c = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| {
                format!(
                    "the member kubeconfig '{}' is not usable{}",
                    p.display(),
                    no_proxy_hint()
                )
            })?;
            c.proxy_url = member_proxy(&c.cluster_url, named.as_deref())?;
            (c, vec![p.clone()])
        }
        None => {
            let (mut c, service_account) =
                match crate::daemon::incluster::infer(source.sa_dir.as_deref()).await {
                    Ok(x) => x,
                    Err(e) if no_proxy_hint().is_empty() => return Err(e),
                    Err(e) => return Err(e.context(no_proxy_hint().trim().to_string())),
                };
            if service_account {
                // A pod reaches its own cluster's API server directly,
                // whatever proxy variables its environment carries.
                // (kube re-reads the token and CA files itself.)
                c.proxy_url = None;
                (c, Vec::new())
            } else {
                let named = kube::config::Kubeconfig::read()
                    .ok()
                    .and_then(|kc| current_proxy_url(&kc));
                c.proxy_url = member_proxy(&c.cluster_url, named.as_deref())?;
                (c, inferred_kubeconfig_files())
            }
        }
    };
    if source.impersonate {
        own_impersonation_refused(&config.auth_info)?;
    }
    // Watches and `logs -f` stay open for as long as the operator wants.
    config.read_timeout = None;
    Ok((config, files))
}

/// The files kube's inference reads: `KUBECONFIG`'s list, else
/// `~/.kube/config`.
fn inferred_kubeconfig_files() -> Vec<PathBuf> {
    match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(list) => std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        None => dirs::home_dir()
            .map(|h| vec![h.join(".kube").join("config")])
            .unwrap_or_default(),
    }
}

/// How often the agent looks at its member kubeconfig for changes.
const KUBECONFIG_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads the member kubeconfig `client` came from every
/// [`KUBECONFIG_CHECK`] and, when its bytes changed, builds the member
/// API client from it again and puts it in place: as kubectl reads its
/// kubeconfig at each run, a renewed client certificate (`kubeadm certs
/// renew`), a rotated token or CA, or a moved server reach the agent
/// without a restart. What cannot be used (half written, broken, an
/// impersonation that changed) is said once and the client in use is
/// kept. `said` gets each outcome in words, for the log and the agent's
/// events (with the server's URL when the new client is in place). Returns at `cancel`, or at once when there is no file.
pub(super) async fn follow_kubeconfig(
    source: MemberSource,
    client: &MemberClient,
    cancel: CancellationToken,
    said: impl Fn(Result<(String, String), String>),
) {
    if client.files.is_empty() {
        return;
    }
    let files = client.files.clone();
    let member = client.member.clone();
    let own = client.own_impersonation;
    let read = move || {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in &files {
            std::fs::read(f).ok().hash(&mut h);
        }
        h.finish()
    };
    let mut seen = read();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(KUBECONFIG_CHECK) => {}
        }
        let now = read();
        if now == seen {
            continue;
        }
        seen = now;
        let names = client
            .files
            .iter()
            .map(|f| format!("'{}'", f.display()))
            .collect::<Vec<_>>()
            .join(", ");
        let built = async {
            // `kubectl config use-context` on the member machine must not
            // move the member to another cluster behind the operators'
            // backs: the agent keeps the context it started with.
            let context = current_context(&source, &client.files);
            if context != client.context {
                anyhow::bail!(
                    "its current-context is now '{}', and the agent serves context '{}': restart the agent to serve another cluster (or set current-context back)",
                    context.as_deref().unwrap_or(""),
                    client.context.as_deref().unwrap_or("")
                );
            }
            let (config, _) = member_config(&source).await?;
            let own_now = !own_impersonation(&config.auth_info).is_empty();
            if own != own_now {
                anyhow::bail!(
                    "its user's impersonation (as, as-groups, as-uid, as-user-extra) was {}: restart the agent to use it",
                    if own { "removed" } else { "added" }
                );
            }
            let url = config.cluster_url.to_string();
            Ok((member_service(&config)?, url))
        };
        match built.await {
            Ok((service, url)) => {
                member.replace(service);
                let url = crate::tunnel::printable(&url, 300);
                said(Ok((
                    format!(
                        "the member kubeconfig {names} changed: the agent now reaches the member's API server ({url}) with it"
                    ),
                    url,
                )));
            }
            Err(e) => said(Err(format!(
                "the member kubeconfig {names} changed but is not usable ({}): the agent goes on with the one it read before; fix the file (the agent reads it again when it changes)",
                crate::tunnel::printable(&format!("{e:#}"), 1000)
            ))),
        }
    }
}

/// With `--impersonate` the agent names each operator in `Impersonate-*`
/// headers; impersonation set on the kubeconfig's user (`as`, `as-groups`,
/// `as-uid`, `as-user-extra`) would be added to them on every request (kube
/// appends its extra headers), and the API server takes every group and
/// extra: each operator would act with groups the hub never gave it (say
/// `system:masters`), audited and checked as itself. Refused at start.
fn own_impersonation_refused(user: &kube::config::AuthInfo) -> Result<()> {
    let set = own_impersonation(user);
    if set.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the member kubeconfig's user impersonates ({}), and this agent runs with --impersonate, which names each operator itself: the kubeconfig's groups and extras would be added to every operator's. Remove {} from the agent's kubeconfig user (give the agent credentials of its own), or run the agent without --impersonate",
        set.join(", "),
        if set.len() == 1 { "it" } else { "them" }
    )
}

/// Which impersonation fields the kubeconfig's user sets.
fn own_impersonation(user: &kube::config::AuthInfo) -> Vec<&'static str> {
    [
        ("as", user.impersonate.is_some()),
        ("as-groups", user.impersonate_groups.is_some()),
        ("as-uid", user.impersonate_uid.is_some()),
        ("as-user-extra", user.impersonate_user_extra.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// The `proxy-url` of the kubeconfig's current cluster, if it names one.
fn current_proxy_url(kc: &kube::config::Kubeconfig) -> Option<String> {
    let context = kc.current_context.as_deref()?;
    let cluster = kc
        .contexts
        .iter()
        .find(|c| c.name == context)?
        .context
        .as_ref()?
        .cluster
        .clone();
    kc.clusters
        .iter()
        .find(|c| c.name == cluster)?
        .cluster
        .as_ref()?
        .proxy_url
        .clone()
        .filter(|u| !u.is_empty())
}

/// The proxy to the member's API server at `server`, as kubectl picks it:
/// the current cluster's `proxy-url` when it names one (`named`); else,
/// for an `https://` server, `HTTPS_PROXY`, unless the server is a
/// loopback one or `NO_PROXY` names it. A value that is no URL is an
/// error naming where it came from (it was a direct connection). (kube 5 judges
/// `NO_PROXY` against the proxy's own address, and reads `HTTPS_PROXY`
/// only.)
fn member_proxy(server: &http::Uri, named: Option<&str>) -> Result<Option<http::Uri>> {
    member_proxy_with(server, named, |n| std::env::var(n).ok())
}

/// [`member_proxy`] with the environment read through `env`.
fn member_proxy_with(
    server: &http::Uri,
    named: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<http::Uri>> {
    let parse = |p: &str, from: &str| -> Result<Option<http::Uri>> {
        let p = p.trim();
        let with_scheme = if p.contains("://") {
            p.to_string()
        } else {
            format!("http://{p}")
        };
        with_scheme.parse().map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{from} '{}' is not a proxy URL ({e})",
                crate::tunnel::proxy::redact(p)
            )
        })
    };
    if let Some(p) = named {
        return parse(p, "the member kubeconfig's proxy-url");
    }
    // As kube reads it: HTTPS_PROXY only, for an https:// server (an
    // http:// one would need plain forwarding, not CONNECT).
    if server.scheme_str() == Some("http") {
        return Ok(None);
    }
    let get = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
    };
    let Some(proxy) = get(["HTTPS_PROXY", "https_proxy"]) else {
        return Ok(None);
    };
    let host = server.host().unwrap_or_default();
    let port = server.port_u16().unwrap_or(443);
    let no = get(["NO_PROXY", "no_proxy"]).unwrap_or_default();
    if crate::tunnel::proxy::is_loopback_host(host)
        || crate::tunnel::proxy::bypassed(&no, host, port)
    {
        return Ok(None);
    }
    parse(&proxy, "HTTPS_PROXY")
}

/// kube's own client builder leaves Nagle's algorithm on (hyper's
/// `HttpConnector` default), and every request, upgrade and exec or
/// port-forward stream from the hub goes through this client: a stream's
/// second small write then waited for the API server's delayed ACK of the
/// first, 40 ms each time (measured: 44 ms per write-write-read round
/// through the gateway, 2 ms direct). So the same stack as kube's builder
/// (the kubeconfig's `proxy-url` over HTTP CONNECT, TLS from the
/// kubeconfig, connect and write timeouts, kube's retry on 429/503/504, the
/// credentials and extra headers), with `TCP_NODELAY` on. The agent's own
/// API calls go through a `kube::Client` over this stack (with kube's
/// retry); forwarded requests through [`Api`], which shares its connection
/// pool.
fn member_service(config: &kube::Config) -> Result<ApiService> {
    use hyper_util::client::legacy::connect::proxy::Tunnel;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // A connection whose peer vanished (no FIN, no RST) is found by the
    // kernel instead of staying in the pool for good.
    http.set_keepalive(Some(std::time::Duration::from_secs(30)));
    let built = match config.proxy_url.clone() {
        None => over(config, http),
        Some(proxy) if proxy.scheme_str() == Some("http") => {
            let tunnel = with_proxy_auth(&proxy, Tunnel::new(proxy.clone(), http));
            over(config, tunnel)
        }
        // As kube does: TLS to the proxy with the kubeconfig's trust.
        Some(proxy) if proxy.scheme_str() == Some("https") => {
            let tls = super::member_tls::https_connector(config, http);
            tls.and_then(|tls| over(config, with_proxy_auth(&proxy, Tunnel::new(proxy.clone(), tls))))
        }
        Some(proxy) => anyhow::bail!(
            "the member kubeconfig's proxy-url '{}' is not supported: use an http:// or https:// proxy (HTTP CONNECT)",
            redact_userinfo(&proxy)
        ),
    };
    built.context("cannot build the member API client")
}

/// `proxy` without the user and password it may carry.
fn redact_userinfo(proxy: &http::Uri) -> String {
    match proxy.authority().map(|a| a.as_str()) {
        Some(a) if a.contains('@') => {
            let host = a.rsplit_once('@').map(|(_, h)| h).unwrap_or(a);
            format!("{}://…@{host}", proxy.scheme_str().unwrap_or(""))
        }
        _ => proxy.to_string(),
    }
}

/// `Proxy-Authorization: Basic` from the proxy URL's user and password
/// (percent-decoded, as kube and curl read them).
fn with_proxy_auth<C>(
    proxy: &http::Uri,
    tunnel: hyper_util::client::legacy::connect::proxy::Tunnel<C>,
) -> hyper_util::client::legacy::connect::proxy::Tunnel<C> {
    use base64::Engine;
    let Some((userinfo, _)) = proxy.authority().and_then(|a| a.as_str().rsplit_once('@')) else {
        return tunnel;
    };
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(userinfo).collect();
    let value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(decoded)
    );
    match http::HeaderValue::from_str(&value) {
        Ok(v) => tunnel.with_auth(v),
        Err(_) => tunnel,
    }
}

/// kube's client stack over `connector`: credentials and extra headers
/// over the connection pool.
fn over<C>(config: &kube::Config, connector: C) -> Result<ApiService>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper_util::client::legacy::connect::Connection
        + hyper::rt::Read
        + hyper::rt::Write
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: std::error::Error + Send + Sync + 'static,
{
    use kube::client::ConfigExt;
    let https = super::member_tls::https_connector(config, connector)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let client = super::pool::Pool::new(connector, config.cluster_url.clone());
    let service = tower::ServiceBuilder::new()
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(client);
    Ok(ApiService::new(service))
}

/// The agent's kube client (kube's retry on 429/503/504, answers capped)
/// and the forwarding [`Api`], both over `member`.
fn clients(member: &Member, config: kube::Config) -> (kube::Client, Api) {
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let client = kube::Client::new(
        tower::ServiceBuilder::new()
            .option_layer(retry)
            .service(super::pool::CapAnswers(member.clone())),
        config.default_namespace,
    );
    (client, Api(member.clone()))
}

/// Reads a request body within [`MAX_REQUEST_BODY`], [`BODY_STALL`],
/// [`BODY_DEADLINE`] and the shared [`BODY_BUDGET_KIB`]; the permits
/// returned hold the budget until the request has been sent.
async fn read_body<B>(
    mut body: B,
    budget: &BodyBudget,
    operator: &str,
) -> Result<(bytes::Bytes, Option<BodyPermit>), (StatusCode, &'static str, String)>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!(
                "request body rejected by the towerctl agent: larger than {} MiB",
                MAX_REQUEST_BODY / (1024 * 1024)
            ),
        )
    };
    if http_body::Body::size_hint(&body)
        .upper()
        .or(Some(http_body::Body::size_hint(&body).lower()))
        .is_some_and(|n| n as usize > MAX_REQUEST_BODY)
    {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    let mut buf = bytes::BytesMut::new();
    let mut reserved: Option<BodyPermit> = None;
    loop {
        let until = (tokio::time::Instant::now() + BODY_STALL).min(deadline);
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => {
                let msg = if until == deadline {
                    format!(
                        "request body not received whole within {}s by the towerctl agent",
                        BODY_DEADLINE.as_secs()
                    )
                } else {
                    format!(
                        "request body stalled: nothing of it for {}s at the towerctl agent",
                        BODY_STALL.as_secs()
                    )
                };
                return Err((StatusCode::REQUEST_TIMEOUT, "Timeout", msg));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("request body could not be read: {e}"),
                ))
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > MAX_REQUEST_BODY {
            return Err(too_large());
        }
        let kib = (buf.len() + data.len()).div_ceil(1024) - buf.len().div_ceil(1024);
        if kib > 0 {
            let p = budget
                .take(operator, kib)
                .map_err(|msg| (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", msg))?;
            match reserved.as_mut() {
                Some(r) => r.merge(p),
                None => reserved = Some(p),
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), reserved))
}

/// The agent's answer to an API request past its stream limit: a `Status`
/// (kubectl prints its message; a plain text body read as "the server
/// could not find the requested resource" or was dropped) saying when to
/// retry (client-go, Helm and Argo CD retry a 503 only then).
fn full_limit_answer(msg: &str) -> String {
    let body = crate::daemon::http::status_json(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        msg,
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's own kube client stops reading an answer past its cap
    /// and a watch event past its own, with words naming the member's API
    /// server: kube would read either into memory without end.
    #[tokio::test]
    async fn the_agents_own_reads_are_held_to_their_caps() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Every request: a chunked answer of 1 MiB pieces without a
        // newline, for 80 MiB.
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = s.read(&mut head).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    let piece = vec![b' '; 1024 * 1024];
                    for _ in 0..80 {
                        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                        chunk.extend_from_slice(&piece);
                        chunk.extend_from_slice(b"\r\n");
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let member = Member::new(member_service(&config).unwrap());
        let (client, _) = clients(&member, config);
        let services: kube::Api<k8s_openapi::api::core::v1::Service> =
            kube::Api::namespaced(client, "default");
        let e = services.get("web").await.unwrap_err();
        assert!(
            format!("{e:?}").contains("an answer longer than 64 MiB"),
            "{e:?}"
        );
        use futures_util::StreamExt;
        let mut watch = services
            .watch(&kube::api::WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        let e = match watch.next().await {
            Some(Err(e)) => e,
            Some(Ok(ev)) => panic!("an event from no newline: {ev:?}"),
            None => panic!("the watch ended without an error"),
        };
        assert!(
            format!("{e:?}").contains("one watch event longer than 16 MiB"),
            "{e:?}"
        );
    }

    /// A body that keeps coming, slowly, is taken up to the API server's
    /// own 60 s (a 30 s limit on the whole refused a slow client's apply);
    /// one that stalls for 30 s, or is still coming at 60 s, is not.
    #[tokio::test(start_paused = true)]
    async fn a_slow_body_is_taken_and_a_stalled_one_is_not() {
        use futures_util::StreamExt;
        let body = |gaps: Vec<u64>| {
            let frames = futures_util::stream::iter(gaps).then(|secs| async move {
                tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(
                    vec![b'x'; 1024],
                )))
            });
            http_body_util::StreamBody::new(Box::pin(frames))
        };
        let budget = BodyBudget::new(BODY_BUDGET_KIB);
        // 50 s in all, 10 s between pieces.
        let (got, _) = read_body(body(vec![10; 5]), &budget, "op").await.unwrap();
        assert_eq!(got.len(), 5 * 1024);
        let Err(e) = read_body(body(vec![1, 31]), &budget, "op").await else {
            panic!("a body stalled for 31 s was taken")
        };
        assert_eq!(e.0, StatusCode::REQUEST_TIMEOUT);
        assert!(e.2.contains("stalled"), "{e:?}");
        let Err(e) = read_body(body(vec![20; 4]), &budget, "op").await else {
            panic!("a body still coming at 60 s was taken")
        };
        assert!(e.2.contains("whole within 60s"), "{e:?}");
    }

    #[test]
    fn an_api_request_past_the_stream_limit_gets_a_status_saying_when_to_retry() {
        let a = full_limit_answer("too many \"streams\"");
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(at) = r.parse(a.as_bytes()).unwrap() else {
            panic!("{a}")
        };
        assert_eq!(r.code, Some(503));
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(n))
                .map(|h| h.value)
        };
        assert_eq!(h("retry-after"), Some(&b"1"[..]));
        assert_eq!(h("content-type"), Some(&b"application/json"[..]));
        let body: serde_json::Value = serde_json::from_str(&a[at..]).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["message"], "too many \"streams\"");
        assert_eq!(
            h("content-length").map(|v| std::str::from_utf8(v).unwrap().to_string()),
            Some((a.len() - at).to_string())
        );
    }
    use std::time::Duration;

    #[test]
    fn the_member_api_servers_proxy_is_picked_as_kubectl_picks_it() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                vars.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        let api: http::Uri = "https://api.corp.example:6443".parse().unwrap();
        let vars = &[
            ("HTTPS_PROXY", "proxy.corp.example:3128"),
            ("NO_PROXY", ".internal"),
        ];
        // HTTPS_PROXY, scheme-less taken as http://, even when NO_PROXY
        // names the proxy's own domain (kube dropped it then).
        let p = member_proxy_with(&api, None, env(vars)).unwrap().unwrap();
        assert_eq!(p.to_string(), "http://proxy.corp.example:3128/");
        let vars2 = &[
            ("HTTPS_PROXY", "http://p:3128"),
            ("NO_PROXY", ".corp.example"),
        ];
        let p = member_proxy_with(&api, None, env(vars2)).unwrap();
        assert_eq!(p, None, "NO_PROXY names the API server");
        // The current cluster's proxy-url wins, NO_PROXY or not.
        let p = member_proxy_with(&api, Some("http://named:1"), env(vars2))
            .unwrap()
            .unwrap();
        assert_eq!(p.host(), Some("named"));
        // A loopback API server (kind, k3d, minikube) never goes through one.
        let local: http::Uri = "https://127.0.0.1:34567".parse().unwrap();
        assert_eq!(member_proxy_with(&local, None, env(vars)).unwrap(), None);
        // An http:// server: no proxy from the environment (CONNECT is
        // what the agent speaks; kube reads HTTPS_PROXY only).
        let plain: http::Uri = "http://api.corp.example:8080".parse().unwrap();
        let none = member_proxy_with(&plain, None, env(&[("HTTP_PROXY", "http://p:1")]));
        assert_eq!(none.unwrap(), None);
        // Not a URL: said, naming where it came from, without credentials.
        let e = member_proxy_with(
            &api,
            None,
            env(&[("HTTPS_PROXY", "http://u:pw@bad host:1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn buffering_stays_under_half_a_memory_limit() {
        assert_eq!(
            budgets(None),
            Budgets {
                windows: 128 << 20,
                bodies: 64 << 20,
                raw_streams: 3072,
            }
        );
        // The manifest's 256 MiB: 128 MiB in all where 288 were.
        let pod = budgets(Some(256 << 20));
        assert_eq!(
            pod,
            Budgets {
                windows: 64 << 20,
                bodies: 32 << 20,
                raw_streams: 1024,
            }
        );
        let most = |b: &Budgets| {
            b.windows + b.bodies + b.raw_streams as u64 * crate::tunnel::flow::MIN_WINDOW
        };
        for limit in [64u64 << 20, 256 << 20, 1 << 30, 3 << 30] {
            let b = budgets(Some(limit));
            assert!(most(&b) <= limit / 2, "{limit}: {b:?}");
        }
        assert_eq!(budgets(Some(8 << 30)), budgets(None));
        // Small limits keep room for one largest body and some streams.
        let small = budgets(Some(16 << 20));
        assert_eq!(small.bodies, MAX_REQUEST_BODY as u64);
        assert_eq!(small.windows, 4 << 20);
        assert_eq!(small.raw_streams, 256);
        // A share of a small budget still takes one largest body.
        let b = BodyBudget::new(small.bodies as usize >> 10);
        let one = b.take("alice", MAX_REQUEST_BODY / 1024);
        assert!(one.is_ok());
        assert!(b.take("bob", 1).is_err(), "the total is spent");
        drop(one);
        let b = BodyBudget::new(BODY_BUDGET_KIB);
        let _held = b.take("alice", BODY_BUDGET_KIB / 4).unwrap();
        let e = b.take("alice", 1).err().unwrap();
        assert!(e.contains("16 MiB"), "{e}");
        assert!(b.take("bob", 1).is_ok());
    }

    #[test]
    fn a_proxy_urls_credentials_are_not_shown() {
        let with = "http://us%40er:secret@proxy.internal:3128".parse().unwrap();
        assert_eq!(redact_userinfo(&with), "http://…@proxy.internal:3128");
        let without = "socks5://proxy.internal:1080".parse().unwrap();
        assert_eq!(redact_userinfo(&without), "socks5://proxy.internal:1080/");
    }

    #[test]
    fn only_requests_that_are_not_long_running_get_an_answer_deadline() {
        for (path, query) in [
            (
                "/api/v1/namespaces/a/configmaps",
                Some("watch=true&resourceVersion=1"),
            ),
            ("/api/v1/namespaces/a/pods/p/log", Some("follow=true")),
            ("/api/v1/namespaces/a/pods/p/exec", Some("command=sh")),
            ("/api/v1/namespaces/a/services/web:80/proxy/deep/page", None),
            ("/api/v1/watch/namespaces/a/pods", None),
            ("/api/v1/nodes/n1/proxy/metrics", None),
            ("/api/v1/namespaces/a/pods/p/log", None),
        ] {
            assert!(long_running(path, query, false), "{path}?{query:?}");
        }
        assert!(long_running("/anything", None, true));
        for (path, query) in [
            ("/api/v1/namespaces/a/configmaps", Some("limit=500")),
            ("/api/v1/namespaces/a/configmaps/watchful", None),
            ("/version", None),
            // Names spelled as subresources are names (they lost the
            // answer deadline).
            ("/api/v1/namespaces/log/pods", None),
            ("/api/v1/namespaces/a/configmaps/exec", None),
            ("/api/v1/namespaces/exec", None),
            ("/api/v1/namespaces/watch/configmaps", None),
            ("/apis/example.com/v1/namespaces/a/exec/x", None),
        ] {
            assert!(!long_running(path, query, false), "{path}?{query:?}");
        }
    }

    #[test]
    fn a_requests_own_timeout_is_read_in_gos_syntax() {
        use crate::daemon::http::asked_timeout;
        assert_eq!(
            asked_timeout(Some("timeout=32s")),
            Some(Duration::from_secs(32))
        );
        assert_eq!(
            asked_timeout(Some("limit=1&timeout=1m30s")),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            asked_timeout(Some("timeout=2h")),
            Some(Duration::from_secs(7200))
        );
        for bad in [
            "timeout=",
            "timeout=10",
            "timeout=1.5s",
            "timeout=5ms",
            "limit=1",
        ] {
            assert_eq!(asked_timeout(Some(bad)), None, "{bad}");
        }
        assert_eq!(asked_timeout(None), None);
    }

    #[test]
    fn timeouts_past_what_a_duration_holds_neither_wrap_nor_panic() {
        use crate::daemon::http::asked_timeout;
        let max = format!("timeout={}s", u64::MAX);
        assert_eq!(
            asked_timeout(Some(&max)),
            Some(Duration::from_secs(u64::MAX))
        );
        // The sum of two parts past u64: refused, not wrapped to a second.
        let wrapped = format!("timeout={}s1s", u64::MAX);
        assert_eq!(asked_timeout(Some(&wrapped)), None);
        assert_eq!(asked_timeout(Some("timeout=5124095576030431h1h")), None);
        // The wait adds 30 s to what is asked: saturates instead.
        assert_eq!(answer_wait(Some(&max)), Duration::MAX);
        assert_eq!(answer_wait(Some("timeout=600s")), Duration::from_secs(630));
        assert_eq!(answer_wait(None), answer_timeout());
    }
}
