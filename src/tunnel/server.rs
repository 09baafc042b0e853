//! Hub side of the tunnel: the SSH server that agents log in to.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Handle, Msg, RunningSession, VerifiedPublicKey};
use russh::Channel;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::flow::FlowStream;
use super::{MAX_PACKET, TARGET_PING, WINDOW_SIZE};

/// The answer of an [`Authenticator`].
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Accept,
    /// Refused. With a reason, the session is closed with it, so the agent
    /// can print it (SSH itself only says "failure"). Reasons start with
    /// [`super::AUTH_PREFIX`] or [`super::REVOKED_PREFIX`].
    Reject(Option<String>),
    /// The hub cannot decide now (its registry cannot be read): the
    /// connection is closed unanswered, as at accept, so that the agent
    /// retries with its backoff. A refusal would stop it for good (agents
    /// take every refusal as final), and the fault is the hub's.
    Unavailable(String),
}

/// Decides whether an agent may log in. Implemented by the hub's registry.
pub trait Authenticator: Send + Sync + 'static {
    /// Reconnect path: the agent proved it holds `key`.
    fn check_key(&self, name: &str, key: &PublicKey) -> Verdict;
    /// First-join path: the join token. `proven_key` is the key this
    /// connection proved before (if any): on success it becomes the
    /// cluster's agent key, so later reconnects need no token.
    fn check_token(&self, name: &str, token: &str, proven_key: Option<&PublicKey>) -> Verdict;
    /// Push mode: the `HOST:PORT` on the hub side that cluster `cluster`
    /// exposes to its workloads under `name`, if any. Agent-opened channels
    /// to anything else are refused.
    fn exposed(&self, cluster: &str, name: &str) -> Option<String>;
    /// Changes whenever the registry's members may have changed: each open
    /// push connection then asks [`Authenticator::exposed`] again and ends
    /// when its name is no longer exposed, or now names another target.
    fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// The hub's penalty for refused join tokens, for one connection's source
/// address. Every token presented counts *before* it is checked, an
/// accepted one clears the count, and one the registry could not check is
/// taken back: connections opened in parallel cannot all try before the
/// first refusal counts.
pub trait Penalty: Send + Sync + 'static {
    /// Counts a token about to be checked; false when this source may not
    /// try one now.
    fn try_token(&self) -> bool;
    /// A token from this source was accepted.
    fn accepted(&self);
    /// The token counted by `try_token` could not be checked (the registry
    /// away): not a refusal, so it no longer counts.
    fn unchecked(&self) {}
}

/// The russh server configuration for the hub.
pub fn config(key: PrivateKey, keepalive: Duration) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        keys: vec![key],
        preferred: super::preferred(),
        methods: russh::MethodSet::from(
            &[russh::MethodKind::PublicKey, russh::MethodKind::Password][..],
        ),
        // A wrong token is answered after this delay, which slows guessing
        // without making a legitimate retry wait long.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 3,
        // Dead-peer detection: a keepalive every interval, and the session
        // is closed after two unanswered ones — within three intervals.
        keepalive_interval: Some(keepalive),
        keepalive_max: 2,
        inactivity_timeout: None,
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        nodelay: true,
        ..Default::default()
    })
}

/// russh handler of one agent connection (fields private).
pub struct HubHandler {
    auth: Arc<dyn Authenticator>,
    /// Set once the session runs, so a refusal can close it with a reason.
    handle: Arc<OnceLock<Handle>>,
    /// Key the agent proved ownership of in this connection.
    proven_key: Option<PublicKey>,
    /// The cluster this session authenticated as.
    cluster: Option<String>,
    authed: Option<oneshot::Sender<Authed>>,
    /// Told when a join token was presented and refused in this connection.
    refused_tx: Option<oneshot::Sender<()>>,
    /// Why the agent said it is closing the session, if it did.
    farewell: Arc<Mutex<Option<String>>>,
    penalty: Arc<dyn Penalty>,
    /// Channels this agent opened that were refused or failed, and since
    /// when they are counted: logged up to [`NOTED_PER_MINUTE`] a minute.
    noted: (std::time::Instant, u32),
    /// Public keys offered in this connection ([`MAX_OFFERED_KEYS`]).
    offered: u32,
    /// Push mode's channels open at once ([`MAX_PUSH_STREAMS`]).
    push_slots: Arc<tokio::sync::Semaphore>,
    /// The windows the hub gives them ([`PUSH_WINDOW_BUDGET`]).
    push_windows: Arc<super::flow::WindowBudget>,
    /// Cancelled when the session ends (the handler is dropped with it):
    /// its push connections end with it. They only read the channel's end
    /// as a half-close, and a hub-side service that keeps an idle
    /// connection open held them (and a descriptor each) past a revoke.
    ended: CancellationToken,
}

impl Drop for HubHandler {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

/// Most push-mode channels (member workloads reaching an exposed hub-side
/// service) one session may have open at once; past it an open is
/// refused. Each is a socket of the hub's to the exposed service: a
/// member's key holder opening them without end took descriptors and
/// memory from every other member. `TOWERCTL_MAX_PUSH_STREAMS` sets it.
pub const MAX_PUSH_STREAMS: usize = 1024;

fn max_push_streams() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| super::positive_env("TOWERCTL_MAX_PUSH_STREAMS", MAX_PUSH_STREAMS))
}

/// What the hub buffers at most, together, for one session's push-mode
/// channels whose hub-side service stops reading: each asks the agent for
/// a window out of it (full windows while it lasts, 32 KiB past it), and
/// the hub holds the agent to it. They took 4 MiB each before, whatever
/// was open.
pub const PUSH_WINDOW_BUDGET: u64 = 64 * 1024 * 1024;

/// Most refused agent-opened channels logged per session and minute: an
/// agent's key holder opening thousands (each name up to 256 KB) rotated
/// the hub's whole log away in seconds.
const NOTED_PER_MINUTE: u32 = 10;

/// Public keys a connection may offer before it logs in, probes and signed
/// requests together (an agent offers one), and the largest offered key
/// taken (an Ed25519 key is 51 bytes, an RSA key of 8,192 bits about 1 KiB).
/// Each accepted probe is answered with the key it offered: a peer that
/// sent 35 KB keys and never read the answers made the hub hold 4 MiB per
/// connection before any login, across thousands of connections.
const MAX_OFFERED_KEYS: u32 = 4;
const MAX_OFFERED_KEY_BYTES: usize = 2048;

/// Whether the `nth` key offered in a connection is taken (see
/// [`MAX_OFFERED_KEYS`]); a refused one is answered after the rejection
/// delay, with a failure that does not echo it.
fn offer_taken(nth: u32, key: &PublicKey) -> bool {
    nth <= MAX_OFFERED_KEYS
        && key
            .to_bytes()
            .is_ok_and(|b| b.len() <= MAX_OFFERED_KEY_BYTES)
}

impl russh::server::Handler for HubHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.offered += 1;
        Ok(match offer_taken(self.offered, offer.public_key) {
            true => Auth::Accept,
            false => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.proven_key = Some(key.public_key.clone());
        let v = self.auth.check_key(user, key.public_key);
        self.verdict(user, v)
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        // Spending a token is a registry write (an fsync, or an etcd
        // transaction with several hubs): off the runtime thread that every
        // tunnel and the gateway share, so that 10,000 agents joining at
        // once do not stall each other's logins past the deadline.
        let (auth, u, p, k) = (
            self.auth.clone(),
            user.to_string(),
            password.to_string(),
            self.proven_key.clone(),
        );
        // A source past its refused tokens gets no check at all, even on a
        // connection accepted before the penalty began: the connection is
        // closed unanswered, as at accept, so that a real agent sharing the
        // address retries later instead of taking it as a refusal.
        if !self.penalty.try_token() {
            return Err(russh::Error::Disconnect);
        }
        // The count is settled with the check itself, whether or not the
        // login is still there to hear it (evicted, past its deadline): a
        // token the registry could not check is not counted as a refusal
        // (agents behind one address retrying through an etcd outage had
        // their tokens left unchecked for up to a minute after it), and a
        // refused one counts even if its login was dropped meanwhile.
        let penalty = self.penalty.clone();
        let v = tokio::task::spawn_blocking(move || {
            let v = auth.check_token(&u, &p, k.as_ref());
            match v {
                Verdict::Accept => penalty.accepted(),
                Verdict::Unavailable(_) => penalty.unchecked(),
                Verdict::Reject(_) => {}
            }
            v
        })
        .await
        .unwrap_or(Verdict::Reject(None));
        match v {
            Verdict::Accept | Verdict::Unavailable(_) => {}
            Verdict::Reject(_) => {
                if let Some(r) = self.refused_tx.take() {
                    let _ = r.send(());
                }
            }
        }
        self.verdict(user, v)
    }

    async fn auth_succeeded(
        &mut self,
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        if let (Some(name), Some(tx)) = (self.cluster.clone(), self.authed.take()) {
            let id = String::from_utf8_lossy(session.remote_sshid()).to_string();
            let key = self.proven_key.as_ref().and_then(|k| k.to_openssh().ok());
            let _ = tx.send((name, agent_version(&id), agent_features(&id), key));
        }
        Ok(())
    }

    /// Push mode: a workload in the member reaches a hub-side service the
    /// member was given (`cluster add --expose NAME=HOST:PORT`).
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        _port_to_connect: u32,
        originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        if host_to_connect == super::TARGET_FAREWELL {
            if let Ok(mut f) = self.farewell.lock() {
                *f = Some(farewell_text(originator_address));
            }
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let cluster = self.cluster.clone().unwrap_or_default();
        // Subscribed before the look: a removal between the two is seen.
        let mut changes = self.auth.registry_changes();
        let Some(target) = self.auth.exposed(&cluster, host_to_connect) else {
            let name = super::escape_for_log(host_to_connect, 100);
            if self.note() {
                tracing::warn!(%cluster, %name, "refused an agent-opened channel to something not exposed to it");
            } else {
                tracing::debug!(%cluster, %name, "refused an agent-opened channel to something not exposed to it");
            }
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let name = host_to_connect.to_string();
        let Ok(slot) = self.push_slots.clone().try_acquire_owned() else {
            if self.note() {
                tracing::warn!(%cluster, "refused an agent-opened channel: {} are open already (the limit per session)", max_push_streams());
            } else {
                tracing::debug!(%cluster, "refused an agent-opened channel: {} are open already (the limit per session)", max_push_streams());
            }
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        // The dial (a name lookup, a connect of up to 10 s) in a task of
        // its own, answered from there: awaited here, in the session's own
        // loop, it froze the member's whole tunnel (every operator's exec,
        // watch and port-forward, and the keepalives) for as long as an
        // unreachable target took to time out, once per workload retry.
        let windows = self.push_windows.clone();
        let ended = self.ended.clone();
        let auth = self.auth.clone();
        tokio::spawn(async move {
            let dial =
                tokio::time::timeout(Duration::from_secs(10), super::dial::connect_to(&target));
            let dialed = tokio::select! {
                d = dial => d,
                _ = ended.cancelled() => return,
            };
            match dialed {
                Ok(Ok(tcp)) => {
                    super::nodelay(&tcp);
                    reply.accept().await;
                    let window = windows.take(super::flow::STREAM_WINDOW);
                    let mut tcp = tcp;
                    let mut ch = FlowStream::new(channel);
                    ch.receive_at_most(window.window.max(super::flow::UNTOLD_WINDOW));
                    ch.advertise_window(window.window).await;
                    // `cluster expose --remove` (on any hub) ends the
                    // connections already open to what it took away: it
                    // only refused new ones.
                    let withdrawn = async {
                        while changes.changed().await.is_ok() {
                            if auth.exposed(&cluster, &name).as_deref() != Some(&*target) {
                                return true;
                            }
                        }
                        std::future::pending().await
                    };
                    tokio::select! {
                        _ = super::splice_from(&mut ch, &mut tcp) => {}
                        _ = ended.cancelled() => {}
                        true = withdrawn => {
                            tracing::info!(%cluster, name = %super::escape_for_log(&name, 100), "an open push connection ended: no longer exposed to the member");
                        }
                    }
                    // Held for as long as the channel is open.
                    drop((slot, window));
                }
                failed => {
                    static UNREACHABLE: super::LogBudget =
                        super::LogBudget::new("unreachable exposed targets", NOTED_PER_MINUTE);
                    let name = super::escape_for_log(&name, 100);
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer within 10s".to_string(),
                    };
                    if UNREACHABLE.admit() {
                        tracing::warn!(%cluster, %name, "cannot reach exposed target {target}: {why}");
                    } else {
                        tracing::debug!(%cluster, %name, "cannot reach exposed target {target}: {why}");
                    }
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }
}

impl HubHandler {
    /// Whether one more refused channel of this agent may be logged now;
    /// says once a minute when they start being held back.
    /// The process's budget is shared by every session: one per session
    /// started afresh at each login, and an agent's key holder logging in
    /// and out in a loop wrote ten lines per login. Held back, a line is
    /// logged at debug.
    fn note(&mut self) -> bool {
        static ALL: super::LogBudget =
            super::LogBudget::new("refused agent-opened channels", 6 * NOTED_PER_MINUTE);
        if self.noted.0.elapsed() >= Duration::from_secs(60) {
            self.noted = (std::time::Instant::now(), 0);
        }
        self.noted.1 += 1;
        if self.noted.1 == NOTED_PER_MINUTE + 1 {
            tracing::warn!(
                cluster = %self.cluster.as_deref().unwrap_or_default(),
                "more than {NOTED_PER_MINUTE} refused channels from this agent this minute; the rest are logged at debug"
            );
        }
        self.noted.1 <= NOTED_PER_MINUTE && ALL.admit()
    }

    fn verdict(&mut self, user: &str, v: Verdict) -> Result<Auth, russh::Error> {
        Ok(match v {
            Verdict::Accept => {
                self.cluster = Some(user.to_string());
                Auth::Accept
            }
            Verdict::Unavailable(why) => {
                static UNAVAILABLE: super::LogBudget =
                    super::LogBudget::new("logins the hub could not decide", 10);
                if UNAVAILABLE.admit() {
                    tracing::warn!(
                        cluster = %super::escape_for_log(user, 64),
                        "agent login left undecided (the agent retries): {why}"
                    );
                }
                return Err(russh::Error::Disconnect);
            }
            Verdict::Reject(reason) => {
                if let Some(reason) = reason {
                    // Anyone can cause one per connection (five per
                    // address before its penalty starts, and addresses
                    // are many): a few a minute at warn.
                    static REFUSED: super::LogBudget =
                        super::LogBudget::new("refused agent logins", 10);
                    if REFUSED.admit() {
                        tracing::warn!(
                            cluster = %super::escape_for_log(user, 64),
                            "agent refused: {reason}"
                        );
                    } else {
                        tracing::debug!(
                            cluster = %super::escape_for_log(user, 64),
                            "agent refused: {reason}"
                        );
                    }
                    let handle = self.handle.clone();
                    tokio::spawn(async move {
                        // Let russh send the failure first (it delays
                        // rejections), then close with the reason.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if let Some(h) = handle.get() {
                            let _ = h
                                .disconnect(russh::Disconnect::ByApplication, reason, String::new())
                                .await;
                        }
                    });
                }
                Auth::reject()
            }
        })
    }
}

/// The agent's version from its SSH identification string
/// (`SSH-2.0-towerctl_0.1.0`); the raw software field for other clients.
pub fn agent_version(ssh_id: &str) -> String {
    let software = ssh_id
        .trim()
        .splitn(3, '-')
        .nth(2)
        .unwrap_or(ssh_id)
        .split(' ')
        .next()
        .unwrap_or("");
    // Stored in the registry and printed by `cluster list` and `status`:
    // only what a version is made of, bounded (an agent's key holder could
    // otherwise put terminal escapes on an operator's screen).
    software
        .strip_prefix("towerctl_")
        .unwrap_or(software)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '~'))
        .take(64)
        .collect()
}

/// A farewell reason as the hub keeps it: printable, bounded.
fn farewell_text(raw: &str) -> String {
    super::printable(raw, super::FAREWELL_MAX)
}

/// The words of an agent's identification comment
/// (`SSH-2.0-towerctl_0.2.0 impersonate,foo`), bounded and printable.
pub fn agent_features(ssh_id: &str) -> Vec<String> {
    let Some((_, comment)) = ssh_id.trim().split_once(' ') else {
        return Vec::new();
    };
    comment
        .split(',')
        .map(str::trim)
        .filter(|w| {
            !w.is_empty()
                && w.len() <= 32
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .take(16)
        .map(str::to_string)
        .collect()
}

/// What a login established: the cluster name, the agent's version and
/// features, and the key it proved (OpenSSH form).
type Authed = (String, String, Vec<String>, Option<String>);

/// An authenticated agent session.
pub struct ServerSession {
    /// The cluster name the agent authenticated as.
    pub name: String,
    /// The key the agent proved at login (OpenSSH form), if it proved one:
    /// what the registry must still hold for the session to go on.
    pub key: Option<String>,
    /// The agent's version, from its SSH identification string.
    pub version: String,
    /// What the agent declared about itself (its identification comment).
    pub features: Vec<String>,
    pub handle: Handle,
    /// Resolves when the SSH session ends.
    pub running: RunningSession<HubHandler>,
    farewell: Arc<Mutex<Option<String>>>,
    kill: CancellationToken,
}

impl ServerSession {
    /// Why the agent said it is ending the session (`agent stopped`), once
    /// it has.
    pub fn farewell(&self) -> Option<String> {
        self.farewell.lock().ok()?.clone()
    }

    /// Ends a session whose peer is gone without waiting for it: the
    /// transport fails at once, so the session task ends and every open
    /// channel (every request in flight) sees its end. Needed because after
    /// `disconnect` russh waits for the peer to close its side, with no
    /// deadline when no inactivity timeout is set, and a blackholed peer
    /// never does: requests in flight hung until their clients gave up.
    pub fn abort(&self) -> CancellationToken {
        self.kill.clone()
    }
}

/// The transport under a session, failing every read and write once
/// `kill` is cancelled (see [`ServerSession::abort`]).
///
/// Every packet in and out of a session passes here, so the check is an
/// atomic load, and a waker is registered only when the transport itself
/// has to wait: polling the token's own future on every read and write
/// (a mutex and a waker list each time) was ~3 % of the hub's
/// instructions per forwarded connection (callgrind). A small task per
/// session turns the token's cancellation into the flag and the wake-ups;
/// it ends with the transport.
struct Killable<S> {
    io: S,
    switch: Arc<KillSwitch>,
    /// Dropped with the transport, which ends the watching task.
    _alive: oneshot::Sender<()>,
}

#[derive(Default)]
struct KillSwitch {
    dead: std::sync::atomic::AtomicBool,
    read: futures_util::task::AtomicWaker,
    write: futures_util::task::AtomicWaker,
}

impl KillSwitch {
    fn dead(&self) -> bool {
        self.dead.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the session was declared dead",
    )
}

impl<S> Killable<S> {
    /// Wraps `io`; cancelling `kill` fails its reads and writes from then on
    /// and wakes whoever waits on them. Must run inside a tokio runtime.
    fn new(io: S, kill: CancellationToken) -> Self {
        let switch = Arc::new(KillSwitch::default());
        let (alive, gone) = oneshot::channel();
        let s = switch.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = kill.cancelled() => {
                    s.dead.store(true, std::sync::atomic::Ordering::Release);
                    s.read.wake();
                    s.write.wake();
                }
                _ = gone => {}
            }
        });
        Killable {
            io,
            switch,
            _alive: alive,
        }
    }

    /// After the transport answered `Pending`: registers `cx` to be woken
    /// by a kill, and fails if the kill came first.
    fn pending<T>(
        &self,
        waker: &futures_util::task::AtomicWaker,
        cx: &Context<'_>,
    ) -> Poll<io::Result<T>> {
        waker.register(cx.waker());
        if self.switch.dead() {
            return Poll::Ready(Err(killed()));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.switch.dead() {
            return Poll::Ready(Err(killed()));
        }
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Pending => self.pending(&self.switch.read, cx),
            ready => ready,
        }
    }
}

impl<S: AsyncWrite + Unpin> Killable<S> {
    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.switch.dead() {
            return Poll::Ready(Err(killed()));
        }
        match op(Pin::new(&mut self.io), cx) {
            Poll::Pending => self.pending(&self.switch.write, cx),
            ready => ready,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_with(cx, |io, cx| io.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write_with(cx, |io, cx| io.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write_with(cx, |io, cx| io.poll_shutdown(cx))
    }
}

/// Errors of accepting an agent.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("SSH handshake failed: {0}")]
    Handshake(russh::Error),
    #[error("the agent did not authenticate")]
    NotAuthenticated,
    #[error("the agent's join token was refused")]
    Refused,
    #[error("the agent did not authenticate within {0:?}")]
    Timeout(Duration),
}

/// Runs the SSH server side on an accepted stream and waits for the agent
/// to authenticate.
pub async fn accept<S>(
    config: Arc<russh::server::Config>,
    io: S,
    auth: Arc<dyn Authenticator>,
    penalty: Arc<dyn Penalty>,
    timeout: Duration,
) -> Result<ServerSession, AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let (refused_tx, mut refused_rx) = oneshot::channel();
    let handle_slot = Arc::new(OnceLock::new());
    let farewell = Arc::new(Mutex::new(None));
    let handler = HubHandler {
        farewell: farewell.clone(),
        auth,
        handle: handle_slot.clone(),
        proven_key: None,
        cluster: None,
        authed: Some(tx),
        refused_tx: Some(refused_tx),
        noted: (std::time::Instant::now(), 0),
        offered: 0,
        penalty,
        push_slots: Arc::new(tokio::sync::Semaphore::new(max_push_streams())),
        push_windows: super::flow::WindowBudget::new(PUSH_WINDOW_BUDGET)
            .within(super::flow::process_budget()),
        ended: CancellationToken::new(),
    };
    let kill = CancellationToken::new();
    let io = Killable::new(io, kill.clone());
    // Until the login succeeds, every way out of here cuts the transport: a
    // refusal, the deadline, a handshake error, or this future dropped (the
    // hub's login deadline, an eviction to make room). russh's session task
    // owns the socket and would otherwise go on holding it, past the
    // deadline and outside the admission caps: until its keepalives gave
    // up (30 s) or, once it had sent its close after a malformed packet,
    // for as long as the peer kept its side open.
    let cut_unless_logged_in = kill.clone().drop_guard();
    let mut running = russh::server::run_stream(config, io, handler)
        .await
        .map_err(AcceptError::Handshake)?;
    let handle = running.handle();
    let _ = handle_slot.set(handle.clone());
    let (name, version, features, key) = tokio::select! {
        // The handler is dropped when the login fails, which closes `rx`
        // too: a refused token must still count as refused (the hub's
        // penalty for guessing), whichever branch sees the end first.
        r = rx => r.map_err(|_| {
            if refused_rx.try_recv().is_ok() {
                AcceptError::Refused
            } else {
                AcceptError::NotAuthenticated
            }
        })?,
        r = &mut running => {
            return Err(match r {
                _ if refused_rx.try_recv().is_ok() => AcceptError::Refused,
                Ok(()) => AcceptError::NotAuthenticated,
                Err(e) => AcceptError::Handshake(e),
            })
        }
        _ = tokio::time::sleep(timeout) => {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "authentication timeout".into(), String::new()).await;
            return Err(if refused_rx.try_recv().is_ok() {
                AcceptError::Refused
            } else {
                AcceptError::Timeout(timeout)
            });
        }
    };
    let kill = cut_unless_logged_in.disarm();
    Ok(ServerSession {
        name,
        key,
        version,
        features,
        handle,
        running,
        farewell,
        kill,
    })
}

/// The smallest packet (and first window) an agent may accept a channel
/// with.
const MIN_PEER_PACKET: usize = 4096;

/// Opens a channel with an originator-address field of the caller's
/// choosing (an opaque string to the tunnel), and asks the agent to keep
/// what it sends ahead of the hub's reading to `window` bytes (what the
/// hub buffers for the stream at most: see
/// [`FlowStream::advertise_window`]); `window_in_open` when the originator
/// says it already ([`crate::daemon::wire::RawOpen`]).
pub async fn open_as(
    handle: &Handle,
    target: &str,
    port: u32,
    originator: &str,
    originator_port: u32,
    window: u64,
    window_in_open: bool,
) -> Result<FlowStream, russh::Error> {
    let ch: Channel<Msg> = handle
        .channel_open_forwarded_tcpip(target, port, originator, originator_port)
        .await?;
    // The agent names the largest packet it takes. Honoured as it is, a
    // tiny one (1 byte) made every write of the hub a packet per byte: a
    // 300 KB request cost 13 s of the hub's CPU. Ours ask for 64 KiB.
    let packet = ch.writable_packet_size().await;
    if packet < MIN_PEER_PACKET {
        // On every request a hostile agent is sent: 10 a minute.
        static TINY: super::LogBudget = super::LogBudget::new("channels with tiny packets", 10);
        if TINY.admit() {
            tracing::info!("the agent accepted a channel taking packets of {packet} bytes (at least {MIN_PEER_PACKET} expected); closing it");
        }
        let _ = ch.close().await;
        return Err(russh::Error::ChannelOpenFailure(
            russh::ChannelOpenFailure::ResourceShortage,
        ));
    }
    let stream = FlowStream::new(ch);
    // Held to it: an agent that ignored it had the hub buffer its full
    // window (4 MiB) per stream whose client stopped reading, past every
    // member's budget (see `flow::UNTOLD_WINDOW`). Before the first await:
    // data sent right behind the confirmation was held to 8 MiB otherwise.
    stream.receive_at_most(window.max(super::flow::UNTOLD_WINDOW));
    if window_in_open {
        stream.window_told(window);
    } else {
        stream.advertise_window(window).await;
    }
    Ok(stream)
}

/// Measures one round trip to the agent. The agent refuses the ping target
/// at once; a refusal is the pong.
pub async fn ping(
    handle: &Handle,
    deadline: Duration,
    alive: &super::Liveness,
) -> Option<Duration> {
    let answer = async {
        match handle
            .channel_open_forwarded_tcpip(TARGET_PING, 0, "127.0.0.1", 0)
            .await
        {
            Err(russh::Error::ChannelOpenFailure(_)) => true,
            // Agents refuse it; one that accepts gets it closed again (a
            // channel dropped open stays in the session, one a ping).
            Ok(ch) => {
                let _ = ch.close().await;
                true
            }
            Err(_) => false,
        }
    };
    super::await_keepalive(answer, deadline, alive).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_connection_offers_a_few_small_keys() {
        use russh::keys::ssh_key::{public::KeyData, public::RsaPublicKey, Mpint};
        let small =
            russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .unwrap()
                .public_key()
                .clone();
        assert!(super::offer_taken(1, &small));
        assert!(super::offer_taken(super::MAX_OFFERED_KEYS, &small));
        assert!(!super::offer_taken(super::MAX_OFFERED_KEYS + 1, &small));
        // A 30 KB "RSA key" (the packet allows 35 KB before login).
        let modulus = |len: usize| {
            let mut n = vec![0xc3u8; len];
            n[len - 1] |= 1;
            let rsa = RsaPublicKey::new(
                Mpint::from_positive_bytes(&[1, 0, 1]),
                Mpint::from_positive_bytes(&n),
            )
            .unwrap();
            russh::keys::PublicKey::from(KeyData::Rsa(rsa))
        };
        assert!(!super::offer_taken(1, &modulus(30_000)));
        // An 8,192-bit one is taken.
        assert!(super::offer_taken(1, &modulus(1024)));
    }

    #[tokio::test]
    async fn a_kill_fails_a_waiting_read_and_every_later_read_and_write() {
        let (near, mut far) = tokio::io::duplex(64);
        let kill = tokio_util::sync::CancellationToken::new();
        let mut io = super::Killable::new(near, kill.clone());
        // Until the kill, bytes pass both ways.
        far.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 2);
        io.write_all(b"yo").await.unwrap();
        assert_eq!(far.read(&mut buf).await.unwrap(), 2);
        // A read waiting on a silent peer ends when the kill comes.
        let waiting = tokio::spawn(async move {
            let r = io.read(&mut [0u8; 8]).await;
            (io, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the read should wait for the peer");
        kill.cancel();
        let (mut io, r) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the kill must wake the waiting read")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionAborted);
        // Later reads fail even with bytes ready; writes fail too.
        far.write_all(b"more").await.unwrap();
        assert!(io.read(&mut buf).await.is_err());
        assert!(io.write_all(b"x").await.is_err());
        assert!(io.flush().await.is_err());
    }

    #[tokio::test]
    async fn a_kill_wakes_a_write_waiting_for_room() {
        let (near, _far) = tokio::io::duplex(16);
        let kill = tokio_util::sync::CancellationToken::new();
        let mut io = super::Killable::new(near, kill.clone());
        let writing = tokio::spawn(async move { io.write_all(&[7u8; 1024]).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writing.is_finished(), "the write should wait for room");
        kill.cancel();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), writing)
            .await
            .expect("the kill must wake the waiting write")
            .unwrap();
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn the_watching_task_ends_with_the_transport() {
        let (near, _far) = tokio::io::duplex(16);
        let kill = tokio_util::sync::CancellationToken::new();
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let io = super::Killable::new(near, kill.clone());
        assert_eq!(metrics.num_alive_tasks(), before + 1);
        drop(io);
        for _ in 0..100 {
            if metrics.num_alive_tasks() == before {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the task watching the kill outlived its transport");
    }

    #[test]
    fn farewells_keep_words_not_escapes_or_invisible_characters() {
        let f = super::farewell_text("bye\u{1b}[2J\u{202e}dlrow\u{202c}\u{200b}\u{feff}\u{2028}x");
        assert_eq!(f, "bye [2J dlrow    x");
        assert_eq!(
            super::farewell_text(&"é".repeat(10_000)).chars().count(),
            super::super::FAREWELL_MAX
        );
    }

    #[test]
    fn parses_agent_versions() {
        assert_eq!(super::agent_version("SSH-2.0-towerctl_0.1.0"), "0.1.0");
        assert_eq!(
            super::agent_version("SSH-2.0-towerctl_0.1.0 impersonate"),
            "0.1.0"
        );
        assert_eq!(
            super::agent_features("SSH-2.0-towerctl_0.1.0 impersonate,x y"),
            vec!["impersonate".to_string()]
        );
        assert!(super::agent_features("SSH-2.0-towerctl_0.1.0").is_empty());
        assert_eq!(
            super::agent_version("SSH-2.0-OpenSSH_9.2p1 Debian-2"),
            "OpenSSH_9.2p1"
        );
        // Terminal escapes and bell from a hostile identification string.
        assert_eq!(
            super::agent_version("SSH-2.0-towerctl_9.9\x1b[31mRED\x1b]0;pwned\x07\x1b[2J"),
            "9.931mRED0pwned2J"
        );
        assert_eq!(
            super::agent_version(&format!("SSH-2.0-{}", "9".repeat(500))).len(),
            64
        );
    }
}
