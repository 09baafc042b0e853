//! Per-stream flow control over russh channels.
//!
//! russh 0.65 grows a channel's SSH window when data *arrives*, not when it
//! is read, and hands the data to the channel through a bounded queue (100
//! messages) with an awaited send inside the session loop
//! (`server/encrypted.rs` and `client/encrypted.rs`, `CHANNEL_DATA`; russh
//! issue #387, PR #730). One stream whose reader stalls (a paused
//! `kubectl logs -f | less`, a port-forward client that stops reading) fills
//! its queue and parks the whole session: every other stream, the
//! keepalives and re-keying, until the member is declared dead.
//!
//! A [`FlowStream`] wraps a channel so that this cannot happen:
//! - a drain task takes every message off the channel's queue as soon as it
//!   arrives and puts data into this stream's own buffer, so the session
//!   loop never waits on a reader;
//! - the buffer is bounded because the sender never has more than
//!   [`STREAM_WINDOW`] bytes unacknowledged: the receiver returns credit
//!   (the total it has consumed) as its reader consumes, and the sender
//!   waits for credit, not for the SSH window;
//! - credit and end-of-stream travel as `CHANNEL_EXTENDED_DATA` frames
//!   ([`CONTROL_EXT`]), so bulk data goes as plain `CHANNEL_DATA` with no
//!   framing cost, and the order of data and end-of-stream is kept (both go
//!   through the same SSH channel in order).
//!
//! End-of-stream is our own frame, not SSH's `CHANNEL_EOF`: after an SSH EOF
//! a side may send nothing more on the channel, yet a half-closed side must
//! still return credit for what it reads. A stalled stream thus stops only
//! itself, holds at most [`STREAM_WINDOW`] bytes at the receiver, and
//! resumes without loss when its reader resumes. Both ends of every channel
//! must be `FlowStream`s (hub and agent of the same version).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

/// Bytes a sender may have unacknowledged on one stream, and so the most a
/// receiver buffers for it. The window also has to cover what sits in the
/// tunnel's socket buffers, which TCP grows to several MiB under bulk: with
/// 4 MiB a 1 GiB download through the hub-served port-forward left the
/// 2-core machine ~23 % idle (the agent waiting for credit while its last
/// window crossed the socket buffers), with 8 MiB 11 %, with 16 MiB 8–10 %
/// (release build; 930–980 → 1,065–1,330 MB/s). A stalled stream costs at
/// most this much at each end, and the members' window budgets bound the
/// sum (`MEMBER_WINDOW_BUDGET`, the agent's `WINDOW_BUDGET`).
pub const STREAM_WINDOW: u64 = 8 * 1024 * 1024;

/// The window an agent gives itself for answers to API requests (status,
/// headers and body of each response on the hub's HTTP/1.1 channels): what
/// the hub buffers for a client that stops reading one. With
/// [`STREAM_WINDOW`], 100 stalled HTTP/2 streams of one client held
/// 341 MB of hub memory (a red-team run); API answers do not need bulk
/// windows (a 1 MiB window still moves 20 MB/s per stream at 50 ms RTT).
/// The hub holds agents to it on API channels
/// ([`FlowStream::receive_at_most`]): agents have sent their answers with
/// it since it was introduced, and a hostile one ignoring the window the
/// hub asked for used to get [`STREAM_WINDOW`] buffered per stream.
pub const API_WINDOW: u64 = 1024 * 1024;

/// Credit is returned once a reader has consumed this much since the last
/// return: often enough that a sender always has most of its window (also
/// [`API_WINDOW`]), rarely enough that credit frames (9 bytes) cost
/// nothing next to the data.
const CREDIT_STEP: u64 = API_WINDOW / 4;

/// Credit for less than a step is returned once this long has passed since
/// the last: a sender on a slow link hears from its peer at least this
/// often while the peer reads (256 KiB at 1 Mbit/s is 2.1 s, longer than
/// the agent's ping deadline with 1 s keepalives: its pings wait behind its
/// own data, and the peer's credit is what shows the peer is there).
const CREDIT_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// What a sender may have unacknowledged on a stream before the
/// receiver's window ([`FlowStream::advertise_window`]) reaches it: an
/// agent's streams start with it ([`FlowStream::with_windows`]), and the
/// hub holds an agent to the larger of it and the window the hub asked
/// for. Before, an agent could send its full window (4 MiB) whatever the
/// hub asked, and one ignoring the hub's windows had the hub hold ~200 MiB
/// for 200 stalled streams against the 68 MiB it had handed out (a red-team
/// run). A window frame reaches the agent within one round trip of the
/// open, before anything a port-forward target sends has come far; an API
/// answer's window reaches it ahead of the request.
pub const UNTOLD_WINDOW: u64 = CREDIT_STEP;

/// The smallest window a receiver may ask for ([`FlowStream::advertise_window`]):
/// 32 KiB still moves 640 KB/s per stream at 50 ms RTT, and is what a
/// stalled stream costs its receiver under pressure.
pub const MIN_WINDOW: u64 = 32 * 1024;

/// Extended-data type code of control frames (1 is SSH's stderr, unused by
/// forwarded channels).
pub const CONTROL_EXT: u32 = 1;

/// Control frames are 9 bytes: a kind and a big-endian u64.
const FRAME: usize = 9;
/// Credit: the total bytes the receiver has consumed on this stream.
const KIND_CREDIT: u8 = 1;
/// End of stream: the sender will send no more data (a half-close).
const KIND_EOF: u8 = 2;
/// The receiver's window: send at most this many bytes ahead of what it
/// has consumed (never more than the sender's own window). Ignored by
/// senders that predate it, which keep to their own window.
const KIND_WINDOW: u8 = 3;

#[derive(Default)]
struct State {
    /// Received, not yet read.
    buf: VecDeque<Bytes>,
    /// Small chunks received after `buf` while the reader is behind,
    /// gathered in one buffer (newer than all of `buf`): one-byte packets
    /// to a stalled reader would otherwise cost a queue slot and an
    /// allocation each, ~64 bytes of memory per byte buffered.
    tail: BytesMut,
    /// Bytes in `buf` and `tail`.
    buffered: u64,
    /// Totals on this stream, in bytes.
    received: u64,
    consumed: u64,
    /// `consumed` as last promised to the control task.
    credited: u64,
    /// When credit was last promised (or the reader first consumed).
    credited_at: Option<std::time::Instant>,
    sent: u64,
    /// What the peer has consumed of what we sent.
    peer_consumed: u64,
    /// The peer will send no more data.
    eof: bool,
    /// The channel is gone.
    closed: bool,
    /// The peer broke the protocol (sent past its credit).
    broken: bool,
    /// The local side dropped the stream: incoming data is discarded.
    dropped: bool,
    /// What this side may have unacknowledged: its own window
    /// ([`STREAM_WINDOW`] or [`API_WINDOW`]) or less if the peer asked.
    window: u64,
    /// This side's own window, the most a peer's `KIND_WINDOW` can give.
    own_window: u64,
    /// Credit is returned every this many bytes consumed: a quarter of the
    /// window this side asked the peer to keep to.
    credit_step: u64,
    /// The most this side takes unread from the peer before closing the
    /// stream as broken ([`STREAM_WINDOW`] unless lowered).
    receive_limit: u64,
    /// A window to ask the peer for, and who waits until it was sent.
    window_wanted: Option<(u64, tokio::sync::oneshot::Sender<()>)>,
    /// The local writer half-closed: the control task sends end-of-stream.
    eof_wanted: bool,
    eof_sent: bool,
    /// A control frame cut across two extended-data messages.
    partial: Vec<u8>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    shutdown_waker: Option<Waker>,
}

impl State {
    /// The peer asked for `window` (a window frame, or the channel's open):
    /// this side sends at most that far ahead, within its own window.
    fn peer_window(&mut self, window: u64) {
        self.window = window.clamp(MIN_WINDOW, self.own_window);
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// This side asks the peer for `window` (clamped as the request is):
    /// credit is returned in steps of a quarter of it.
    fn asks_for(&mut self, window: u64) -> u64 {
        let window = window.clamp(MIN_WINDOW, STREAM_WINDOW);
        self.credit_step = (window / 4).min(CREDIT_STEP);
        window
    }

    /// What this side may send now: a window past what the peer consumed.
    fn credit(&self) -> u64 {
        self.peer_consumed
            .saturating_add(self.window)
            .saturating_sub(self.sent)
    }

    fn wake_all(&mut self) {
        for w in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.shutdown_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            w.wake();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the control task: credit or end-of-stream to send, or the end.
    control: Notify,
}

impl State {
    /// Moves what `tail` gathered to the end of `buf`, for a reader.
    fn settle(&mut self) {
        if !self.tail.is_empty() {
            let t = std::mem::take(&mut self.tail).freeze();
            self.buf.push_back(t);
        }
    }

    /// Drops everything received and not read.
    fn discard(&mut self) {
        self.buf.clear();
        self.tail = BytesMut::new();
        self.buffered = 0;
    }
}

/// Received chunks smaller than this are gathered into `State::tail` while
/// the reader is behind.
const GATHER_BELOW: usize = 1024;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind;
        // carrying on with them is safe.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounts for `n` bytes taken out of the buffer by the local reader,
    /// and has credit sent back every credit step.
    fn consumed(&self, mut st: MutexGuard<'_, State>, n: u64) {
        st.buffered -= n;
        st.consumed += n;
        let owed = st.consumed - st.credited;
        let due = owed >= st.credit_step
            || (owed > 0 && {
                let now = std::time::Instant::now();
                let at = *st.credited_at.get_or_insert(now);
                now.duration_since(at) >= CREDIT_AFTER
            });
        if due {
            st.credited = st.consumed;
            st.credited_at = Some(std::time::Instant::now());
            drop(st);
            self.control.notify_one();
        }
    }
}

type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// A channel's data writer: `AsyncWrite`, and owned bytes sent without a
/// copy (russh's `ChannelTx`, patched; see `vendor/russh/PATCHES.md`).
trait DataTx: AsyncWrite + Send {
    fn poll_write_bytes(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<io::Result<usize>>;
}

impl<S> DataTx for russh::ChannelTx<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send + 'static,
{
    fn poll_write_bytes(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<io::Result<usize>> {
        russh::ChannelTx::poll_write_bytes(self.get_mut(), cx, data)
    }
}

/// A channel as an `AsyncRead + AsyncWrite` with per-stream flow control.
/// See the module documentation.
pub struct FlowStream {
    shared: Arc<Shared>,
    data: Pin<Box<dyn DataTx>>,
    /// Sends the channel's close when the stream is dropped.
    close: Option<Box<dyn FnOnce() + Send>>,
    id: ChannelId,
}

impl std::fmt::Debug for FlowStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowStream").field("id", &self.id).finish()
    }
}

impl FlowStream {
    /// Wraps `channel` and starts its drain and control tasks (they end
    /// with the channel). Must run inside a tokio runtime.
    pub fn new<S>(channel: Channel<S>) -> FlowStream
    where
        S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        Self::with_window(channel, STREAM_WINDOW)
    }

    /// [`FlowStream::new`] sending at most `window` bytes ahead of what
    /// the peer has consumed (at most [`STREAM_WINDOW`]).
    pub fn with_window<S>(channel: Channel<S>, window: u64) -> FlowStream
    where
        S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        Self::with_windows(channel, window, window)
    }

    /// [`FlowStream::with_window`] sending at most `first` bytes ahead
    /// until the peer says its window, then at most what it said, up to
    /// `window` (each at least [`CREDIT_STEP`], at most [`STREAM_WINDOW`]).
    pub fn with_windows<S>(channel: Channel<S>, first: u64, window: u64) -> FlowStream
    where
        S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    {
        let own = window.clamp(CREDIT_STEP, STREAM_WINDOW);
        let id = channel.id();
        let (mut read, write) = channel.split();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                window: first.clamp(CREDIT_STEP, own),
                own_window: own,
                credit_step: CREDIT_STEP,
                receive_limit: STREAM_WINDOW,
                ..State::default()
            }),
            control: Notify::new(),
        });
        let data: Pin<Box<dyn DataTx>> = Box::pin(write.make_tx(None));
        let control: Writer = Box::pin(write.make_writer_ext(Some(CONTROL_EXT)));

        let s = shared.clone();
        tokio::spawn(async move {
            // Never waits on anything but the channel: this is what keeps
            // the session loop from blocking on a slow reader.
            while let Some(msg) = read.wait().await {
                if !on_message(&s, msg) {
                    break;
                }
            }
            let mut st = s.lock();
            st.closed = true;
            st.wake_all();
            drop(st);
            s.control.notify_one();
        });

        let s = shared.clone();
        tokio::spawn(control_task(s, control));

        let close = Box::new(move || {
            // Queued at once when the session's queue has room (nearly
            // always): a task per stream just to send the close was one of
            // the six spawned per forwarded connection.
            if !write.try_close() {
                tokio::spawn(async move {
                    let _ = write.close().await;
                });
            }
        });
        FlowStream {
            shared,
            data,
            close: Some(close),
            id,
        }
    }
}

impl FlowStream {
    /// Takes at most `limit` bytes unread from the peer (at least
    /// [`UNTOLD_WINDOW`]): past it the peer broke the protocol and the
    /// stream is closed. For channels whose peer keeps to `limit` (the
    /// hub's channels to an agent: the window the hub asked for, or
    /// [`UNTOLD_WINDOW`] before the agent can have read it).
    pub fn receive_at_most(&self, limit: u64) {
        self.shared.lock().receive_limit = limit.clamp(UNTOLD_WINDOW, STREAM_WINDOW);
    }

    /// Asks the peer to send at most `window` bytes (at least
    /// [`MIN_WINDOW`]) ahead of what this side has read: what this side
    /// buffers at most for the stream when its reader stalls. Returns once
    /// the request is on the channel, so that whatever is written after it
    /// (a request the peer answers) reaches the peer behind it.
    pub fn advertise_window(&self, window: u64) -> impl std::future::Future<Output = ()> + Send {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.shared.lock();
            let window = st.asks_for(window);
            st.window_wanted = Some((window, tx));
        }
        self.shared.control.notify_one();
        async move {
            // Fails only when the channel is gone; the stream says so itself.
            let _ = rx.await;
        }
    }

    /// [`FlowStream::advertise_window`] for a window the peer learned with
    /// the channel's open ([`crate::daemon::wire::RawOpen`]): nothing is
    /// sent, credit is returned in steps of a quarter of it.
    pub fn window_told(&self, window: u64) {
        self.shared.lock().asks_for(window);
    }

    /// The window the peer asked for another way than a window frame (the
    /// channel's open, the agent's answer to its dial), taken as the frame
    /// would be.
    pub fn peer_window(&self, window: u64) {
        self.shared.lock().peer_window(window);
    }
}

/// Windows handed out to streams out of a fixed total: what one side
/// buffers at most, together, for streams whose readers stall (plus
/// [`MIN_WINDOW`] for each stream past the total). A stream takes what is
/// left, between `MIN_WINDOW` and its full window, and gives it back when
/// its [`WindowPermit`] is dropped.
pub struct WindowBudget {
    total: u64,
    held: std::sync::atomic::AtomicU64,
    /// A budget above this one (a process's, over its members'): what is
    /// taken here is taken there too, and no more than it has left.
    parent: Option<Arc<WindowBudget>>,
}

/// The budget every window of this process is also taken from, when one
/// is set ([`set_process_budget`]).
static PROCESS_BUDGET: std::sync::OnceLock<Arc<WindowBudget>> = std::sync::OnceLock::new();

/// Sets the budget every window budget of this process made
/// [`WindowBudget::within`] [`process_budget`] is taken from too: a hub
/// under a memory limit, whose budgets are per member. Once.
pub fn set_process_budget(total: u64) {
    let _ = PROCESS_BUDGET.set(WindowBudget::new(total));
}

/// The budget set with [`set_process_budget`], if any.
pub fn process_budget() -> Option<Arc<WindowBudget>> {
    PROCESS_BUDGET.get().cloned()
}

/// A stream's window out of a [`WindowBudget`] (and, taken with
/// [`WindowBudget::take_within`], out of a share of it too).
pub struct WindowPermit {
    budget: Arc<WindowBudget>,
    share: Option<Arc<WindowBudget>>,
    pub window: u64,
}

impl WindowBudget {
    pub fn new(total: u64) -> Arc<WindowBudget> {
        Arc::new(WindowBudget {
            total,
            held: Default::default(),
            parent: None,
        })
    }

    /// This budget's total, within `parent` (when given): a window taken
    /// here is taken there too. For a budget just made (a new one with
    /// the same total is returned: nothing held, no parent of its own).
    pub fn within(self: Arc<Self>, parent: Option<Arc<WindowBudget>>) -> Arc<WindowBudget> {
        debug_assert!(
            self.parent.is_none() && self.held() == 0,
            "within a fresh budget"
        );
        match parent {
            None => self,
            Some(p) => Arc::new(WindowBudget {
                total: self.total,
                held: Default::default(),
                parent: Some(p),
            }),
        }
    }

    /// A budget of `default` bytes, or `TOWERCTL_WINDOW_BUDGET` (bytes)
    /// when set: less for a small pod's memory limit, more for many bulk
    /// streams at once.
    pub fn from_env(default: u64) -> Arc<WindowBudget> {
        // Read once per process: the hub makes a budget per agent session.
        static SET: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let set = SET.get_or_init(|| {
            std::env::var("TOWERCTL_WINDOW_BUDGET")
                .ok()
                .and_then(|v| v.trim().parse().ok())
        });
        WindowBudget::new(set.unwrap_or(default))
    }

    /// A window of at most `full` (at least [`MIN_WINDOW`]).
    pub fn take(self: &Arc<Self>, full: u64) -> WindowPermit {
        WindowPermit {
            budget: self.clone(),
            share: None,
            window: self.reserve(full),
        }
    }

    /// A window of at most `full` (at least [`MIN_WINDOW`]) out of this
    /// budget and out of `share`, a smaller budget of one party (an
    /// operator's part of a member's): what is left of both.
    pub fn take_within(self: &Arc<Self>, share: &Arc<WindowBudget>, full: u64) -> WindowPermit {
        let within = share.reserve(full);
        let window = self.reserve(within);
        // The whole budget had less left than the share: give the rest back.
        share.release(within - window);
        WindowPermit {
            budget: self.clone(),
            share: Some(share.clone()),
            window,
        }
    }

    /// Counts a window of at most `full` (at least [`MIN_WINDOW`]) as held
    /// (here and in the parent) and returns it.
    fn reserve(&self, full: u64) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let mut window = MIN_WINDOW;
        let _ = self.held.fetch_update(Relaxed, Relaxed, |held| {
            window = self
                .total
                .saturating_sub(held)
                .clamp(MIN_WINDOW, full.max(MIN_WINDOW));
            Some(held + window)
        });
        if let Some(p) = &self.parent {
            let granted = p.reserve(window);
            self.held.fetch_sub(window - granted, Relaxed);
            window = granted;
        }
        window
    }

    /// Gives back a window counted by [`WindowBudget::reserve`].
    fn release(&self, window: u64) {
        self.held
            .fetch_sub(window, std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.release(window);
        }
    }

    /// The budget's total.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The windows held now, together.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for WindowPermit {
    fn drop(&mut self) {
        self.budget.release(self.window);
        if let Some(share) = &self.share {
            share.release(self.window);
        }
    }
}

/// Handles one message from the channel; false ends the drain.
fn on_message(s: &Shared, msg: ChannelMsg) -> bool {
    let mut st = s.lock();
    match msg {
        ChannelMsg::Data { data } => {
            let n = data.len() as u64;
            st.received += n;
            if st.dropped || n == 0 {
                return true;
            }
            if st.received - st.consumed > st.receive_limit {
                // Past its credit: a peer that breaks the protocol, or
                // one without flow control. Never buffer beyond the bound.
                // A hostile peer can do this on every stream: 10 a minute.
                static PAST_WINDOW: super::LogBudget =
                    super::LogBudget::new("streams the peer sent past their window", 10);
                if PAST_WINDOW.admit() {
                    tracing::warn!("the peer sent past its stream window; closing the stream");
                }
                st.broken = true;
                st.closed = true;
                st.discard();
                st.wake_all();
                drop(st);
                s.control.notify_one();
                return false;
            }
            st.buffered += n;
            if data.len() < GATHER_BELOW && (!st.buf.is_empty() || !st.tail.is_empty()) {
                st.tail.extend_from_slice(&data);
            } else {
                st.settle();
                st.buf.push_back(data);
            }
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
        ChannelMsg::ExtendedData { data, ext } if ext == CONTROL_EXT => {
            st.partial.extend_from_slice(&data);
            let mut frames = std::mem::take(&mut st.partial);
            let whole = frames.len() / FRAME * FRAME;
            for f in frames[..whole].chunks_exact(FRAME) {
                let mut v = [0u8; 8];
                v.copy_from_slice(&f[1..]);
                let v = u64::from_be_bytes(v);
                match f[0] {
                    KIND_CREDIT if v > st.peer_consumed => {
                        // Never more than was sent: a peer claiming more
                        // (up to u64::MAX) would open an endless window.
                        st.peer_consumed = v.min(st.sent);
                        if let Some(w) = st.write_waker.take() {
                            w.wake();
                        }
                    }
                    KIND_EOF => {
                        st.eof = true;
                        if let Some(w) = st.read_waker.take() {
                            w.wake();
                        }
                    }
                    KIND_WINDOW => st.peer_window(v),
                    _ => {}
                }
            }
            frames.drain(..whole);
            st.partial = frames;
        }
        // A peer's SSH end-of-file means no more data as well.
        ChannelMsg::Eof => {
            st.eof = true;
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
        ChannelMsg::Close => {
            st.closed = true;
            st.wake_all();
        }
        _ => {}
    }
    true
}

/// Sends credit and end-of-stream frames. One task per stream, so that a
/// reader returning credit never waits for the channel itself.
async fn control_task(s: Arc<Shared>, mut w: Writer) {
    let mut credit_sent = 0u64;
    loop {
        let (credit, eof, done, window) = {
            let mut st = s.lock();
            (
                st.credited,
                st.eof_wanted && !st.eof_sent,
                st.closed || st.dropped,
                st.window_wanted.take(),
            )
        };
        if done {
            return;
        }
        if let Some((window, sent)) = window {
            if write_frame(&mut w, KIND_WINDOW, window).await.is_err() {
                return;
            }
            let _ = sent.send(());
        }
        if credit > credit_sent {
            if write_frame(&mut w, KIND_CREDIT, credit).await.is_err() {
                return;
            }
            credit_sent = credit;
        }
        if eof {
            let r = write_frame(&mut w, KIND_EOF, 0).await;
            let mut st = s.lock();
            st.eof_sent = true;
            if r.is_err() {
                st.closed = true;
            }
            if let Some(waker) = st.shutdown_waker.take() {
                waker.wake();
            }
            continue;
        }
        let notified = s.control.notified();
        // Re-check after registering, so a notification between the check
        // above and here is not lost (Notify keeps one permit anyway).
        notified.await;
    }
}

async fn write_frame(w: &mut Writer, kind: u8, value: u64) -> io::Result<()> {
    let mut f = [0u8; FRAME];
    f[0] = kind;
    f[1..].copy_from_slice(&value.to_be_bytes());
    w.write_all(&f).await
}

impl AsyncRead for FlowStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if st.broken {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent past its stream window",
            )));
        }
        if st.buffered == 0 {
            if st.eof || st.closed {
                return Poll::Ready(Ok(()));
            }
            st.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        st.settle();
        let mut copied = 0u64;
        while out.remaining() > 0 {
            let Some(front) = st.buf.front_mut() else {
                break;
            };
            let n = front.len().min(out.remaining());
            out.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                st.buf.pop_front();
            }
            copied += n as u64;
        }
        self.shared.consumed(st, copied);
        Poll::Ready(Ok(()))
    }
}

/// Most received chunks (SSH packets, 64 KiB each at most) handed to one
/// vectored write.
const WRITE_INTO_CHUNKS: usize = 16;

impl FlowStream {
    /// Writes what has been received straight into `w`, in one vectored
    /// write of the buffered chunks, instead of copying it out through a
    /// reader's buffer first. Ready(0) at the end of the stream; Pending
    /// when nothing is buffered (woken when something is) or `w` is full.
    pub fn poll_write_into<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        write_into(&self.shared, cx, w)
    }
}

/// [`FlowStream::poll_write_into`].
fn write_into<W: AsyncWrite + ?Sized>(
    shared: &Shared,
    cx: &mut Context<'_>,
    w: Pin<&mut W>,
) -> Poll<io::Result<usize>> {
    let mut chunks: [Bytes; WRITE_INTO_CHUNKS] = Default::default();
    let taken = {
        let mut st = shared.lock();
        if st.broken {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent past its stream window",
            )));
        }
        if st.buffered == 0 {
            if st.eof || st.closed {
                return Poll::Ready(Ok(0));
            }
            st.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        st.settle();
        // Reference-counted handles: the lock is not held while writing.
        let mut taken = 0;
        for (slot, b) in chunks.iter_mut().zip(st.buf.iter()) {
            *slot = b.clone();
            taken += 1;
        }
        taken
    };
    let mut slices = [io::IoSlice::new(&[]); WRITE_INTO_CHUNKS];
    for (s, b) in slices.iter_mut().zip(&chunks[..taken]) {
        *s = io::IoSlice::new(b);
    }
    let n = ready!(w.poll_write_vectored(cx, &slices[..taken]))?;
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    let mut st = shared.lock();
    // Cleared meanwhile (the drain task found the peer past its window):
    // nothing left to account for; the next call reports it.
    if st.buffered < n as u64 {
        return Poll::Ready(Ok(n));
    }
    let mut left = n;
    while left > 0 {
        let Some(front) = st.buf.front_mut() else {
            break;
        };
        let k = front.len().min(left);
        front.advance(k);
        if front.is_empty() {
            st.buf.pop_front();
        }
        left -= k;
    }
    shared.consumed(st, n as u64);
    Poll::Ready(Ok(n))
}

impl FlowStream {
    /// [`AsyncWrite::poll_write`] for owned bytes: what goes on the
    /// channel is a slice of `data`, not a copy. Same contract: after
    /// `Pending`, call again with the same bytes.
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<io::Result<usize>> {
        let allowed = ready!(self.poll_credit(cx, data.len()))?;
        let r = self
            .data
            .as_mut()
            .poll_write_bytes(cx, &data.slice(..allowed));
        self.count_sent(&r);
        r
    }

    /// How much of `len` bytes the peer's window takes now: Pending (woken
    /// when credit comes) at none, an error once the stream is closed.
    fn poll_credit(&self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if st.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let credit = st.credit();
        if credit == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(credit.min(len as u64) as usize))
    }

    /// Accounts what a write sent against the window.
    fn count_sent(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.shared.lock().sent += *n as u64;
        }
    }
}

impl AsyncWrite for FlowStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let allowed = ready!(self.poll_credit(cx, buf.len()))?;
        let r = self.data.as_mut().poll_write(cx, &buf[..allowed]);
        self.count_sent(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.data.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.data.as_mut().poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
        let mut st = self.shared.lock();
        if st.eof_sent || st.closed {
            return Poll::Ready(Ok(()));
        }
        st.shutdown_waker = Some(cx.waker().clone());
        if !st.eof_wanted {
            st.eof_wanted = true;
            drop(st);
            self.shared.control.notify_one();
        }
        Poll::Pending
    }
}

impl Drop for FlowStream {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.dropped = true;
            st.discard();
        }
        self.shared.control.notify_one();
        if let Some(close) = self.close.take() {
            close();
        }
    }
}

/// Parties' shares of one [`WindowBudget`] (each operator's part of a
/// member's windows at the hub, of the raw streams' at the agent): a
/// share is `1/divisor` of the whole, made at a party's first window and
/// forgotten once none of its windows is held.
#[derive(Default)]
pub struct Shares(std::sync::Mutex<std::collections::HashMap<String, Arc<WindowBudget>>>);

impl Shares {
    /// A window of at most `full` out of `whole` and out of `party`'s
    /// share of it ([`WindowBudget::take_within`]).
    pub fn take(
        &self,
        whole: &Arc<WindowBudget>,
        party: &str,
        divisor: u64,
        full: u64,
    ) -> WindowPermit {
        let share = {
            let mut shares = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if !shares.contains_key(party) {
                // Parties with no window held left nothing to keep.
                shares.retain(|_, s| s.held() > 0);
            }
            shares
                .entry(party.to_string())
                .or_insert_with(|| WindowBudget::new(whole.total() / divisor.max(1)))
                .clone()
        };
        whole.take_within(&share, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's shared state as a receiver with a full receive limit,
    /// returning credit every `credit_step` bytes.
    fn receiving(credit_step: u64) -> Shared {
        Shared {
            state: Mutex::new(State {
                credit_step,
                receive_limit: STREAM_WINDOW,
                ..State::default()
            }),
            control: Notify::new(),
        }
    }

    #[test]
    fn windows_come_out_of_the_budget_and_go_back() {
        let b = WindowBudget::new(3 * API_WINDOW);
        let full: Vec<_> = (0..3).map(|_| b.take(API_WINDOW)).collect();
        assert!(full.iter().all(|p| p.window == API_WINDOW));
        // Past the total: the smallest window, still counted.
        let small = b.take(STREAM_WINDOW);
        assert_eq!(small.window, MIN_WINDOW);
        assert_eq!(b.held(), 3 * API_WINDOW + MIN_WINDOW);
        drop(full);
        // What is left, up to the stream's full window.
        let raw = b.take(STREAM_WINDOW);
        assert_eq!(raw.window, 3 * API_WINDOW - MIN_WINDOW);
        drop((small, raw));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_peer_past_the_receive_limit_breaks_the_stream() {
        let s = Shared {
            state: Mutex::new(State {
                receive_limit: API_WINDOW,
                ..State::default()
            }),
            control: Notify::new(),
        };
        let data = |n: usize| ChannelMsg::Data {
            data: bytes::Bytes::from(vec![0u8; n]),
        };
        assert!(on_message(&s, data(API_WINDOW as usize)));
        assert!(!s.lock().broken);
        // One byte more than it may have unread.
        on_message(&s, data(1));
        let st = s.lock();
        assert!(st.broken && st.closed && st.buf.is_empty());
    }

    #[test]
    fn a_peer_cannot_claim_more_consumed_than_was_sent() {
        let s = Shared {
            state: Mutex::new(State {
                window: API_WINDOW,
                own_window: API_WINDOW,
                sent: 1000,
                ..State::default()
            }),
            control: Notify::new(),
        };
        let frame = |kind: u8, v: u64| {
            let mut f = vec![kind];
            f.extend_from_slice(&v.to_be_bytes());
            ChannelMsg::ExtendedData {
                data: bytes::Bytes::from(f),
                ext: CONTROL_EXT,
            }
        };
        assert!(on_message(&s, frame(KIND_CREDIT, u64::MAX)));
        assert!(on_message(&s, frame(KIND_WINDOW, u64::MAX)));
        let st = s.lock();
        // What the writer may send next: one window past what was sent,
        // computed without overflowing (it used to panic, or wrap).
        assert_eq!(st.peer_consumed, 1000);
        assert_eq!(st.window, API_WINDOW);
        assert_eq!(st.credit(), API_WINDOW);
    }

    #[test]
    fn a_window_told_with_the_open_counts_as_the_frame_would() {
        let fresh = || State {
            window: UNTOLD_WINDOW,
            own_window: STREAM_WINDOW,
            credit_step: CREDIT_STEP,
            ..State::default()
        };
        // Said in a frame or otherwise: the same window, within bounds.
        for asked in [0, 1, MIN_WINDOW + 1, API_WINDOW, u64::MAX] {
            let mut told = fresh();
            let s = Shared {
                state: Mutex::new(fresh()),
                control: Notify::new(),
            };
            let mut f = vec![KIND_WINDOW];
            f.extend_from_slice(&asked.to_be_bytes());
            assert!(on_message(
                &s,
                ChannelMsg::ExtendedData {
                    data: bytes::Bytes::from(f),
                    ext: CONTROL_EXT,
                }
            ));
            told.peer_window(asked);
            assert_eq!(told.window, s.lock().window, "asked {asked}");
            assert_eq!(told.window, asked.clamp(MIN_WINDOW, STREAM_WINDOW));
        }
        // Asking for a window returns credit in quarters of it.
        let mut st = fresh();
        assert_eq!(st.asks_for(API_WINDOW / 2), API_WINDOW / 2);
        assert_eq!(st.credit_step, API_WINDOW / 8);
        assert_eq!(st.asks_for(1), MIN_WINDOW);
        assert_eq!(st.credit_step, MIN_WINDOW / 4);
        assert_eq!(st.asks_for(u64::MAX), STREAM_WINDOW);
        assert_eq!(st.credit_step, CREDIT_STEP);
    }

    #[test]
    fn a_share_holds_one_party_to_its_part_of_the_budget() {
        let member = WindowBudget::new(4 * STREAM_WINDOW);
        let (a, b) = (
            WindowBudget::new(2 * STREAM_WINDOW),
            WindowBudget::new(2 * STREAM_WINDOW),
        );
        // One party's stalled streams: two full windows, then the smallest.
        let mine: Vec<_> = (0..5)
            .map(|_| member.take_within(&a, STREAM_WINDOW))
            .collect();
        let sizes: Vec<u64> = mine.iter().map(|p| p.window).collect();
        assert_eq!(sizes[..2], [STREAM_WINDOW, STREAM_WINDOW]);
        assert!(sizes[2..].iter().all(|w| *w == MIN_WINDOW), "{sizes:?}");
        // The other party still gets what is left of the whole, up to its
        // share: a full window.
        let theirs = member.take_within(&b, STREAM_WINDOW);
        assert_eq!(theirs.window, STREAM_WINDOW);
        // Less left in the whole than in the share: the share gets back
        // what the whole could not give.
        let more = member.take_within(&b, STREAM_WINDOW);
        assert_eq!(more.window, STREAM_WINDOW - 3 * MIN_WINDOW);
        assert_eq!(b.held(), theirs.window + more.window);
        drop((mine, theirs, more));
        assert_eq!((member.held(), a.held(), b.held()), (0, 0, 0));
    }

    #[test]
    fn budgets_within_a_process_budget_take_from_it_too() {
        let process = WindowBudget::new(3 * STREAM_WINDOW);
        let (m1, m2) = (
            WindowBudget::new(2 * STREAM_WINDOW).within(Some(process.clone())),
            WindowBudget::new(2 * STREAM_WINDOW).within(Some(process.clone())),
        );
        let op = WindowBudget::new(2 * STREAM_WINDOW);
        let first: Vec<_> = (0..2).map(|_| m1.take(STREAM_WINDOW)).collect();
        assert!(first.iter().all(|p| p.window == STREAM_WINDOW));
        // The second member has its own budget left, the process one window.
        let a = m2.take_within(&op, STREAM_WINDOW);
        assert_eq!(a.window, STREAM_WINDOW);
        let b = m2.take_within(&op, STREAM_WINDOW);
        assert_eq!(b.window, MIN_WINDOW, "past the process budget");
        assert_eq!(m2.held(), STREAM_WINDOW + MIN_WINDOW);
        assert_eq!(op.held(), STREAM_WINDOW + MIN_WINDOW);
        assert_eq!(process.held(), 3 * STREAM_WINDOW + MIN_WINDOW);
        drop((first, a, b));
        assert_eq!(
            (process.held(), m1.held(), m2.held(), op.held()),
            (0, 0, 0, 0)
        );
        // Without one: as before.
        let alone = WindowBudget::new(STREAM_WINDOW).within(None);
        assert_eq!(alone.take(STREAM_WINDOW).window, STREAM_WINDOW);
    }

    #[test]
    fn tiny_chunks_for_a_stalled_reader_are_gathered_and_come_out_in_order() {
        let s = receiving(1 << 20);
        // 100,000 one-byte chunks with big ones in between, none read.
        let mut sent = Vec::new();
        for i in 0..100_000u32 {
            let chunk = if i % 25_000 == 7 {
                vec![(i % 251) as u8; 32 * 1024]
            } else {
                vec![(i % 251) as u8]
            };
            sent.extend_from_slice(&chunk);
            assert!(on_message(&s, ChannelMsg::Data { data: chunk.into() }));
        }
        {
            let st = s.lock();
            assert_eq!(st.buffered, sent.len() as u64);
            assert!(
                st.buf.len() <= 12,
                "{} queue entries for 100,004 chunks",
                st.buf.len()
            );
        }
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut got: Vec<u8> = Vec::new();
        let mut more = 0;
        loop {
            match write_into(&s, &mut cx, Pin::new(&mut got)) {
                Poll::Ready(Ok(n)) => assert!(n > 0),
                Poll::Pending => break,
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
            // More arrives while the reader reads: still in order.
            if more < 3 {
                more += 1;
                sent.push(0xee);
                assert!(on_message(
                    &s,
                    ChannelMsg::Data {
                        data: Bytes::from_static(&[0xee])
                    }
                ));
            }
        }
        assert!(got == sent, "bytes changed or reordered");
        let st = s.lock();
        assert!(st.buf.is_empty() && st.tail.is_empty() && st.buffered == 0);
    }

    #[test]
    fn credit_for_less_than_a_step_goes_back_once_a_while_has_passed() {
        let s = receiving(1 << 20);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out: Vec<u8> = Vec::new();
        // 1,000 bytes arrive and are read.
        let mut pass = || {
            let data = Bytes::from(vec![1u8; 1000]);
            assert!(on_message(&s, ChannelMsg::Data { data }));
            let r = write_into(&s, &mut cx, Pin::new(&mut out));
            assert!(matches!(r, Poll::Ready(Ok(1000))), "{r:?}");
            s.lock().credited
        };
        // Far below a step, and soon after the reader started: no credit.
        assert_eq!(pass(), 0);
        assert_eq!(pass(), 0);
        std::thread::sleep(CREDIT_AFTER + std::time::Duration::from_millis(50));
        // A while later the next read returns all that is owed.
        assert_eq!(pass(), 3000);
        // And the while starts again.
        assert_eq!(pass(), 3000);
    }

    #[test]
    fn what_is_written_into_a_writer_comes_out_whole_in_order_and_is_credited() {
        let s = receiving(1000);
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        for chunk in sent.chunks(700) {
            assert!(on_message(
                &s,
                ChannelMsg::Data {
                    data: Bytes::copy_from_slice(chunk)
                }
            ));
        }
        // A writer that takes at most 1,500 bytes a call: writes end
        // inside chunks and across them.
        struct Short(Vec<u8>);
        impl AsyncWrite for Short {
            fn poll_write(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                b: &[u8],
            ) -> Poll<io::Result<usize>> {
                let n = b.len().min(1500);
                self.0.extend_from_slice(&b[..n]);
                Poll::Ready(Ok(n))
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let mut n = 0;
                for b in bufs {
                    let k = b.len().min(1500 - n);
                    self.0.extend_from_slice(&b[..k]);
                    n += k;
                    if n == 1500 {
                        break;
                    }
                }
                Poll::Ready(Ok(n))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut w = Short(Vec::new());
        loop {
            match write_into(&s, &mut cx, Pin::new(&mut w)) {
                Poll::Ready(Ok(n)) => assert!(n > 0 && n <= 1500),
                Poll::Pending => break,
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
        }
        assert!(w.0 == sent, "bytes changed or reordered");
        let st = s.lock();
        assert_eq!((st.buffered, st.consumed), (0, sent.len() as u64));
        assert!(st.buf.is_empty());
        // Credit promised up to the last whole step.
        assert_eq!(st.credited, sent.len() as u64);
        drop(st);
        // The end of the stream: Ready(0) once drained.
        s.lock().eof = true;
        assert!(matches!(
            write_into(&s, &mut cx, Pin::new(&mut w)),
            Poll::Ready(Ok(0))
        ));
    }
}
