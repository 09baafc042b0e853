//! A byte stream over a WebSocket, for russh to run on.
//!
//! tungstenite does the HTTP upgrade; after it, [`WsIo`] reads and writes
//! the frames itself. Writing through tungstenite's message API copied
//! every byte twice (into a `Bytes` message, then into its frame buffer)
//! and allocated per write; reading through it copied every byte from the
//! socket's buffer into tungstenite's, which it zeroed first, and then held
//! whole frames. Here a write goes out as header + the caller's bytes in
//! one `writev` (an agent's with an all-zero mask key: [`AGENT_MASK`]); a
//! read gulps the socket into one buffer (freed when the socket is
//! drained) and hands payload bytes to the caller as they come, unmasked
//! on the way if a key other than zero came, without waiting for a
//! frame's end; on a plain socket, long payloads (an SSH packet's body in
//! a bulk transfer) are read straight into the caller's buffer instead,
//! with the next header in a small buffer of ours ([`ReadPair`]). A
//! tunnel is a byte stream, so message boundaries (fragments) do not
//! matter; pings are answered, a close is answered and ends the stream,
//! and everything RFC 6455 forbids (reserved bits, unknown opcodes, text,
//! a mask from the server or none from a client, long or fragmented
//! control frames, a continuation with nothing to continue) fails the read.
//! [`Gate`] keeps every byte written in order: the rest of a frame the
//! socket did not take whole goes out before a pong or a close.
//!
//! Why not tokio-util's `SinkWriter` or a `split()` sink: russh writes its
//! version banner and then waits to read the peer's without flushing
//! (russh issue #193). Adapters that only flush on `poll_flush` hold the
//! banner back and both peers hang in the handshake. Writes here go out at
//! once; whatever the socket did not take is driven again from the read
//! side, which russh polls all the time.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;

/// Largest single WebSocket message we send; bigger writes are split so one
/// huge write does not become one huge frame buffered whole.
const MAX_MESSAGE: usize = 256 * 1024;

/// Most bytes the gate holds for tungstenite behind an unfinished frame
/// (its handshake; then our pongs and a close, which are small).
const MAX_QUEUED: usize = 64 * 1024;

/// Longest frame accepted (the peer sends at most [`MAX_MESSAGE`]); frames
/// are passed on as they come, never held whole, so this is a sanity bound.
pub const MAX_FRAME: u64 = 1024 * 1024;

/// First read buffer once the socket has more than a read takes.
const READ_START: usize = 16 * 1024;
/// Largest read buffer: a few SSH packets per system call.
const READ_MAX: usize = 256 * 1024;
/// A read after a wait goes to a stack buffer of this size first.
const STACK_READ: usize = 4 * 1024;
/// Payload wanted by a reader from which a read goes straight into its
/// buffer (see [`ReadPair`]): an SSH packet's body in a bulk transfer.
/// Smaller reads (a packet's length, small packets) are served from `rbuf`.
const DIRECT_MIN: usize = 16 * 1024;
/// What such a read takes past the payload into `rbuf`: the next frame's
/// header and the next packet's start (their length), which would
/// otherwise cost a read of their own, and small packets that follow.
const PAIR_TAIL: usize = 2 * 1024;
/// Reads in a row without a long payload after which direct mode ends
/// (see `WsIo::direct`). A bulk stream reads one every two or three reads.
const SMALL_READS: u8 = 16;

/// Which end of the WebSocket this is: a client masks what it sends
/// (RFC 6455, section 5.3), a server must not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The hub.
    Server,
    /// The agent.
    Client,
}

/// The masking key of the frames an agent sends: all zero, so that the
/// payload goes out as it is (header and the caller's bytes in one
/// `writev`, as the hub's) and the hub reads it with a plain copy.
///
/// RFC 6455 (5.3, 10.3) asks a client for an unpredictable key per frame
/// so that a script in a browser cannot choose the bytes a confused
/// intermediary sees on the wire. An agent is no browser, and what it
/// frames is SSH: its version line and key exchange, which no third
/// party chooses, then ciphertext under keys no third party has. The
/// frames stay valid on the wire (mask bit set, a key present), so every
/// server and WebSocket-aware proxy takes them, and one that masks them
/// again on the way is read as before. Masking every byte into a copy was
/// 4.6 % of the sending agent's CPU on a bulk download and unmasking
/// 6.5 % of the receiving hub's (perf, seventeenth session).
const AGENT_MASK: [u8; 4] = [0; 4];

/// The mask of a frame this end sends: none from the hub (RFC 6455 forbids
/// it), [`AGENT_MASK`] from an agent.
fn frame_mask(role: Role) -> Option<[u8; 4]> {
    match role {
        Role::Client => Some(AGENT_MASK),
        Role::Server => None,
    }
}

/// Messages received on a tunnel's transport so far (shared with the
/// stream that counts them).
#[derive(Clone, Default, Debug)]
pub struct Liveness(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Liveness {
    pub fn saw(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn seen(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Copies `src` into `dst` (as long) XORed with `mask`, in one pass, into
/// memory that may not be written yet: a reader's buffer handed over
/// uninitialised (russh reads each packet into a fresh allocation), which
/// would otherwise be zeroed first only to be overwritten.
fn copy_masked_uninit(dst: &mut [std::mem::MaybeUninit<u8>], src: &[u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let mut v = [0u8; 8];
        v.copy_from_slice(s);
        let v = (u64::from_ne_bytes(v) ^ word).to_ne_bytes();
        for (d, b) in d.iter_mut().zip(v) {
            d.write(b);
        }
    }
    for (i, (d, s)) in d.into_remainder().iter_mut().zip(s.remainder()).enumerate() {
        d.write(s ^ mask[i % 4]);
    }
}

/// XORs `buf` with `mask` in place, eight bytes at a time (frames from
/// an agent of an earlier release, or re-masked on the way, have a key
/// other than zero).
fn mask_in_place(buf: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes(w.try_into().unwrap_or([0; 8])) ^ word;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Copies `src` into `dst` (as long) XORed with `mask`, in one pass.
fn copy_masked(dst: &mut [u8], src: &[u8], mask: [u8; 4]) {
    // SAFETY: `MaybeUninit<u8>` has `u8`'s layout, and `copy_masked_uninit`
    // only writes initialised bytes through the view: `dst` stays
    // initialised.
    let dst = unsafe { &mut *(dst as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    copy_masked_uninit(dst, src, mask);
}

/// The header of a final binary frame of `len` bytes, masked with `mask`
/// if given; and its length.
fn binary_header(len: usize, mask: Option<[u8; 4]>) -> ([u8; 14], usize) {
    header(0x82, len, mask) // FIN, binary
}

/// A frame header starting with the byte `first` (FIN, opcode), for `len`
/// bytes masked with `mask` if given; and its length.
fn header(first: u8, len: usize, mask: Option<[u8; 4]>) -> ([u8; 14], usize) {
    let mut h = [0u8; 14];
    h[0] = first;
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        h[1] = m | len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = m | 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = m | 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(k) = mask {
        h[n..n + 4].copy_from_slice(&k);
        n += 4;
    }
    (h, n)
}

/// The stream under tungstenite: reads pass through; writes are the
/// frames [`WsIo`] makes itself and whatever tungstenite writes (the
/// handshake, pongs, a close), kept in order.
pub struct Gate<S> {
    io: S,
    role: Role,
    /// Accepted but not yet written: the rest of a frame the socket did
    /// not take whole, then anything tungstenite wrote behind it.
    out: Vec<u8>,
    out_at: usize,
    /// Read from the socket during the HTTP upgrade and not given to
    /// tungstenite: what follows the blank line ending the head, the
    /// first frames, which [`WsIo`] reads.
    early: BytesMut,
    /// How far tungstenite has been given the head's end (see
    /// [`head_end_after`]).
    head_end: u8,
    /// An agent's: the hub's (or a proxy's) answer to the upgrade was read
    /// whole and its list-valued headers put as tungstenite checks them
    /// (see [`answer_as_tungstenite_reads_it`]).
    answer_ready: bool,
}

/// Most of an upgrade's answer an agent reads ahead to look at its headers
/// (tungstenite's own limit on a head is larger, and still applies).
const ANSWER_HEAD_MAX: usize = 16 * 1024;

/// The answer to an agent's upgrade with `Connection` and `Upgrade` put as
/// tungstenite's client checks them: one `Connection: Upgrade` and one
/// `Upgrade: websocket` line where the answer lists those tokens among
/// others (`Connection: Upgrade, keep-alive`, or `keep-alive` and `upgrade`
/// on two lines), as RFC 6455 (4.1) and 9110 (7.6.1) allow and some
/// proxies answer. tungstenite compared the first line's whole value and
/// refused those with "no Connection: upgrade header". `None` when there
/// is nothing to change.
fn answer_as_tungstenite_reads_it(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let value = |name: &str, line: &str| -> Option<String> {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    };
    let mut changed = false;
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    let mut put: Vec<(&str, &str)> = Vec::new();
    for (name, token, canonical) in [
        ("connection", "upgrade", "Connection: Upgrade\r\n"),
        ("upgrade", "websocket", "Upgrade: websocket\r\n"),
    ] {
        let values: Vec<String> = lines
            .iter()
            .skip(1)
            .filter_map(|l| value(name, l))
            .collect();
        let has = values
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token));
        let plain = values.len() == 1 && values[0].eq_ignore_ascii_case(token);
        if has && !plain {
            put.push((name, canonical));
            changed = true;
        }
    }
    if !changed {
        return None;
    }
    for (i, line) in lines.iter().enumerate() {
        let replaced = (i > 0)
            .then(|| put.iter().find(|(name, _)| value(name, line).is_some()))
            .flatten();
        match replaced {
            // The first line of such a header becomes the canonical one;
            // its other lines go.
            Some((_, canonical)) => {
                if !out.contains(canonical) {
                    out.push(canonical);
                }
            }
            None => out.push(line),
        }
    }
    Some(out.concat().into_bytes())
}

impl<S> Gate<S> {
    pub fn new(io: S, role: Role) -> Self {
        Gate {
            io,
            role,
            out: Vec::new(),
            out_at: 0,
            early: BytesMut::new(),
            head_end: 0,
            answer_ready: role == Role::Server,
        }
    }

    /// Bytes accepted and not yet on the socket.
    fn queued(&self) -> usize {
        self.out.len() - self.out_at
    }
}

impl<S: AsyncWrite + Unpin> Gate<S> {
    /// Writes what is queued; Ready once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        // Needed only when a write came up short: a hub holds thousands of
        // sessions and keeps none; an agent, with one, keeps its capacity
        // (at most a frame and a pong or close) for the next short write of
        // a bulk transfer instead of allocating it again.
        match self.role {
            Role::Server => self.out = Vec::new(),
            Role::Client => self.out.clear(),
        }
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends up to [`MAX_MESSAGE`] bytes of `buf` as one binary frame once
    /// everything accepted before has gone out; returns how many.
    fn poll_frame(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        let n = buf.len().min(MAX_MESSAGE);
        let (h, hn) = binary_header(n, frame_mask(self.role));
        let bufs = [io::IoSlice::new(&h[..hn]), io::IoSlice::new(&buf[..n])];
        // A socket that takes nothing now (full) still gets the frame
        // accepted, as tungstenite did: the next write waits for it, and
        // the read side goes on meanwhile.
        let wrote = match Pin::new(&mut self.io).poll_write_vectored(cx, &bufs) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => 0,
        };
        // A frame is never left half-sent: the rest is kept.
        if wrote < hn {
            self.out.extend_from_slice(&h[wrote..hn]);
            self.out.extend_from_slice(&buf[..n]);
        } else if wrote < hn + n {
            self.out.extend_from_slice(&buf[wrote - hn..n]);
        }
        Poll::Ready(Ok(n))
    }
}

/// [`head_end_after`]'s state once the head's blank line is through.
pub const HEAD_DONE: u8 = 3;

/// Where an HTTP head's end is after byte `b`, from `state`: 0 before the
/// request line (nothing but empty lines so far, which httparse skips), 5
/// after a `\r` there, 4 in a line, 1 after a line's `\n`, 2 after
/// `\n\r`, [`HEAD_DONE`] after the blank line. Ends as httparse (under
/// tungstenite and hyper) ends a head: `\n`, an optional `\r`, `\n`,
/// after the first line that is not empty (`\r\n` or `\n`).
pub fn head_end_after(state: u8, b: u8) -> u8 {
    match (state, b) {
        (HEAD_DONE, _) => HEAD_DONE,
        (0 | 5, b'\n') => 0,
        (0, b'\r') => 5,
        (1 | 2, b'\n') => HEAD_DONE,
        (_, b'\n') => 1,
        (1, b'\r') => 2,
        _ => 4,
    }
}

impl<S: AsyncRead + Unpin> Gate<S> {
    /// Reads what the socket has into `early`; how much (0 at its end).
    fn read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.early.reserve(4096);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.early)
    }

    /// Reads the peer's HTTP head ahead of tungstenite (which is then
    /// given it as if read now) and returns it: up to and with its blank
    /// line, or everything read (`complete` false) when the peer ended
    /// first, `limit` bytes came without one, or `give_up` says what came
    /// so far is no HTTP request (a TLS handshake, say). `give_up` is shown
    /// the first 1 KiB at most, after each read until it has said no with
    /// that much in hand (so a peer dribbling a long head is not looked at
    /// again at every byte, and a big first flight is looked at all the
    /// same). Reads 4 KiB at a time, so at most that much past `limit`;
    /// bytes after the head stay for the frames.
    pub async fn peek_head(
        &mut self,
        limit: usize,
        give_up: impl Fn(&[u8]) -> bool,
    ) -> io::Result<PeekedHead<'_>> {
        use tokio::io::AsyncReadExt;
        const SPAN: usize = 1024;
        let (mut state, mut scanned, mut decided) = (0, 0, false);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = self.early[scanned..].iter().position(|&b| {
                state = head_end_after(state, b);
                state == HEAD_DONE
            }) {
                return Ok(PeekedHead {
                    bytes: &self.early[..scanned + i + 1],
                    complete: true,
                });
            }
            scanned = self.early.len();
            if scanned >= limit {
                break;
            }
            if scanned > 0 && !decided {
                if give_up(&self.early[..scanned.min(SPAN)]) {
                    break;
                }
                decided = scanned >= SPAN;
            }
            let n = match self.io.read(&mut chunk).await {
                Ok(n) => n,
                // A peer that connected and reset before sending anything
                // is a health check that closes so (HAProxy's `check` with
                // `check-send-proxy`: a PROXY header, then a reset), as a
                // bare connect and close is: not a failed login.
                Err(e)
                    if self.role == Role::Server
                        && self.early.is_empty()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                        ) =>
                {
                    0
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            self.early.extend_from_slice(&chunk[..n]);
        }
        Ok(PeekedHead {
            bytes: &self.early,
            complete: false,
        })
    }

    /// The stream under the gate.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// A hub's: the peeked upgrade head (its first `len` bytes read ahead)
    /// with `Connection` and `Upgrade` put as tungstenite's server checks
    /// them ([`answer_as_tungstenite_reads_it`]'s rule): it read the first
    /// `Connection` line alone, and an agent behind a proxy that adds its
    /// own `Connection: keep-alive` line ahead of the agent's was answered
    /// 426. Whether anything changed.
    pub fn normalize_upgrade_head(&mut self, len: usize) -> bool {
        let Some(head) = answer_as_tungstenite_reads_it(&self.early[..len.min(self.early.len())])
        else {
            return false;
        };
        let rest = self.early.split_off(len.min(self.early.len()));
        let mut early = BytesMut::with_capacity(head.len() + rest.len());
        early.extend_from_slice(&head);
        early.extend_from_slice(&rest);
        self.early = early;
        true
    }
}

/// What [`Gate::peek_head`] read.
pub struct PeekedHead<'a> {
    pub bytes: &'a [u8],
    /// Whether `bytes` ends with the head's blank line.
    pub complete: bool,
}

/// What tungstenite reads: the HTTP head of the upgrade, up to and with
/// its blank line, and not a byte more (tungstenite would keep bytes read
/// past it in a buffer of its own, and they are the first frames). After
/// the head it reads nothing.
impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head_end == HEAD_DONE {
            return Poll::Ready(Ok(()));
        }
        if !this.answer_ready {
            // The whole answer first (or as much as makes no head, or the
            // peer's end), then its headers put as tungstenite reads them.
            loop {
                let mut state = 0;
                let end = this.early.iter().position(|&b| {
                    state = head_end_after(state, b);
                    state == HEAD_DONE
                });
                if let Some(end) = end {
                    if let Some(head) = answer_as_tungstenite_reads_it(&this.early[..=end]) {
                        let rest = this.early.split_off(end + 1);
                        this.early.clear();
                        this.early.extend_from_slice(&head);
                        this.early.unsplit(rest);
                    }
                    // A refusal in HTTP/1.0 (HAProxy's stock error pages,
                    // Go's answer to plain HTTP on a TLS port): tungstenite
                    // refuses the version before it looks at the status,
                    // and the agent said only "HTTP version must be 1.1 or
                    // higher", without the status, the `Server` or the
                    // hint, and retried for ever. Read as HTTP/1.1: the
                    // refusal is then told as any other.
                    if this.early.starts_with(b"HTTP/1.0 ") && !this.early[9..].starts_with(b"101")
                    {
                        this.early[7] = b'1';
                    }
                    break;
                }
                if this.early.len() >= ANSWER_HEAD_MAX {
                    break;
                }
                if ready!(this.read_more(cx))? == 0 {
                    break;
                }
            }
            this.answer_ready = true;
        }
        if this.early.is_empty() && ready!(this.read_more(cx))? == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut n = 0;
        for &b in this.early.iter().take(buf.remaining()) {
            n += 1;
            this.head_end = head_end_after(this.head_end, b);
            if this.head_end == HEAD_DONE {
                break;
            }
        }
        buf.put_slice(&this.early[..n]);
        this.early.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// What tungstenite writes (the handshake, pongs, a close). A write is
/// taken whole or not at all: what the socket does not take is queued, so
/// tungstenite never holds the rest of a frame that is half on the socket
/// while `WsIo` writes one of its own.
impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.queued() > 0 {
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if this.queued() == 0 {
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
            if n > 0 && n < buf.len() {
                this.out.extend_from_slice(&buf[n..]);
                return Poll::Ready(Ok(buf.len()));
            }
            return Poll::Ready(Ok(n));
        }
        // Behind an unfinished frame: queued after it, up to a bound (the
        // waker is registered by the drain above). Past the bound nothing
        // is taken; tungstenite keeps it and tries again.
        if this.queued() >= MAX_QUEUED {
            return Poll::Pending;
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A transport that reads into two buffers with one system call
/// (`readv`): a reader's own buffer first, then what does not fit into a
/// second. [`WsIo`] reads a long payload this way straight into the
/// reader's buffer (russh's packet), with the next frame's start in a
/// small buffer of its own, instead of gulping the socket into one buffer
/// and copying the payload out of it: that copy was 11 % of the hub's
/// samples on a bulk download (perf), the largest item after the kernel's
/// own copies and the cipher.
pub trait ReadPair {
    /// Whether [`ReadPair::poll_read_pair`] reads both buffers now (a
    /// plain socket); if not, [`WsIo`] reads as before.
    fn pairs(&self) -> bool {
        false
    }

    /// Reads into `first`, and what does not fit into it into `second`,
    /// as one read. Called only when [`ReadPair::pairs`] says so.
    fn poll_read_pair(
        &mut self,
        _cx: &mut Context<'_>,
        _first: &mut ReadBuf<'_>,
        _second: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::other("this transport reads no pairs")))
    }
}

impl ReadPair for tokio::net::TcpStream {
    fn pairs(&self) -> bool {
        true
    }

    fn poll_read_pair(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut ReadBuf<'_>,
        second: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd;
        loop {
            ready!(self.poll_read_ready(cx))?;
            let (a, b) = (first.remaining(), second.remaining());
            let fd = self.as_raw_fd();
            // SAFETY: the two vectors are the buffers' unfilled parts,
            // which the kernel only writes into, never reads.
            let iov = unsafe {
                [
                    libc::iovec {
                        iov_base: first.unfilled_mut().as_mut_ptr().cast(),
                        iov_len: a,
                    },
                    libc::iovec {
                        iov_base: second.unfilled_mut().as_mut_ptr().cast(),
                        iov_len: b,
                    },
                ]
            };
            let read = self.try_io(tokio::io::Interest::READABLE, || {
                // SAFETY: `fd` is this socket's, open while `self` is; the
                // vectors point into memory borrowed for this call.
                let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match read {
                Ok(n) => {
                    let (x, y) = (n.min(a), n.saturating_sub(a));
                    // SAFETY: the kernel wrote the first n bytes of the two
                    // vectors, in order.
                    unsafe {
                        first.assume_init(x);
                        second.assume_init(y);
                    }
                    first.advance(x);
                    second.advance(y);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Whether a test's pipes read pairs (as a socket does) or not (as
    /// TLS does): the tests of the reader run both ways.
    pub(super) static DUPLEX_PAIRS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A test pipe reads pairs as `readv` does: into the second buffer only
/// what does not fit into the first.
#[cfg(test)]
impl ReadPair for tokio::io::DuplexStream {
    fn pairs(&self) -> bool {
        DUPLEX_PAIRS.with(|p| p.get())
    }

    fn poll_read_pair(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut ReadBuf<'_>,
        second: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut *self).poll_read(cx, first))?;
        if first.remaining() == 0 {
            if let Poll::Ready(r) = Pin::new(&mut *self).poll_read(cx, second) {
                r?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// What the reader is in the middle of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// Between frames: a header comes next.
    Header,
    /// In a data frame's payload: `left` bytes to go, unmasked with `mask`
    /// from `at` (the offset into the payload, for the key's rotation).
    Payload {
        left: u64,
        mask: Option<[u8; 4]>,
        at: usize,
    },
}

impl Frame {
    /// Where the reader is once `n` more bytes of a payload with `left`
    /// to go (from offset `at`, unmasked with `mask`) are handed out.
    fn after_payload(left: u64, mask: Option<[u8; 4]>, at: usize, n: usize) -> Frame {
        if left == n as u64 {
            Frame::Header
        } else {
            Frame::Payload {
                left: left - n as u64,
                mask,
                at: at + n,
            }
        }
    }
}

/// The mask key `k` rotated to start at payload offset `at`.
fn key_from(k: [u8; 4], at: usize) -> [u8; 4] {
    [k[at % 4], k[(at + 1) % 4], k[(at + 2) % 4], k[(at + 3) % 4]]
}

/// A frame header as read: (FIN, opcode, mask key, payload length), and
/// the header's own length.
pub type Header = (bool, u8, Option<[u8; 4]>, u64, usize);

/// The fields of the frame header at the start of `b`, unchecked; `None`
/// until it is all there. Shared with `framecap`, which only needs the
/// lengths.
pub fn header_fields(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
    let (len, n) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => {
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 10)
        }
        126 | 127 => return None,
        l => (u64::from(l), 2),
    };
    if b[1] & 0x80 == 0 {
        return Some((fin, opcode, None, len, n));
    }
    let k = b.get(n..n + 4)?;
    Some((fin, opcode, Some([k[0], k[1], k[2], k[3]]), len, n + 4))
}

/// Parses the frame header at the start of `b`: `Ok(None)` until it is all
/// there; reserved bits set (no extension is negotiated) fail it.
fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    if b.len() >= 2 && b[0] & 0x70 != 0 {
        return Err(invalid("a websocket frame with reserved bits set"));
    }
    Ok(header_fields(b))
}

/// Where a [`WsIo`] notes what the peer's Close frame said.
pub type CloseNote = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// A Close frame's payload in words: its code (and its name when it is a
/// common one) and its reason, escaped and cut.
pub fn close_description(payload: &[u8]) -> String {
    let Some(code) = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])) else {
        return "a WebSocket close without a code".to_string();
    };
    let name = match code {
        1000 => " (normal)",
        1001 => " (going away: a server or proxy shutting down or cutting the connection)",
        1006 => " (abnormal)",
        1008 => " (policy violation)",
        1009 => " (message too big)",
        1011 => " (server error)",
        1012 => " (service restart)",
        1013 => " (try again later)",
        1014 => " (bad gateway)",
        _ => "",
    };
    let reason = String::from_utf8_lossy(&payload[2..]);
    if reason.is_empty() {
        format!("a WebSocket close with code {code}{name}")
    } else {
        // Escaped here (this file is also built into the examples, without
        // the tunnel module's helpers): control characters cannot forge
        // log lines.
        let cut: String = reason.chars().take(120).collect();
        format!(
            "a WebSocket close with code {code}{name}: '{}'",
            cut.escape_debug()
        )
    }
}

/// Whether a peer may send this close status (RFC 6455, 7.4.1 and 7.4.2).
fn close_code_ok(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A whole frame: header (starting with `first`) and `payload`, masked
/// with `mask` if given.
fn frame_bytes(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let (h, hn) = header(first, payload.len(), mask);
    let mut f = Vec::with_capacity(hn + payload.len());
    f.extend_from_slice(&h[..hn]);
    match mask {
        Some(k) => {
            f.resize(hn + payload.len(), 0);
            copy_masked(&mut f[hn..], payload, k);
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A control frame (`opcode` 8 to 10) with `payload` (its first 125
/// bytes), masked if `mask`.
fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    frame_bytes(0x80 | opcode, &payload[..payload.len().min(125)], mask)
}

pub struct WsIo<S> {
    io: Gate<S>,
    /// Counts every frame received: the peer is alive while it moves.
    alive: Liveness,
    /// Read from the socket and not yet handed out or parsed. Allocated
    /// while data comes in, freed when the socket has nothing more.
    rbuf: BytesMut,
    /// Size of the next read into `rbuf`: grows while reads fill it.
    rsize: usize,
    /// The last read found the socket empty (or none was made yet): the
    /// next one goes to the stack first, unless the stream is `bulk`.
    idle: bool,
    /// The last read got more than the stack takes: reads go to `rbuf`,
    /// also after a wait, until one is small again.
    bulk: bool,
    /// A long payload was read straight into the reader's buffer, and
    /// not many reads have gone by without one since: payload is
    /// read that way whatever the reader wants (a packet's length too,
    /// with the rest of the read in `rbuf`), and the socket read into
    /// `rbuf` only in small steps (at most [`PAIR_TAIL`], a header's
    /// rest), so that payload is not gulped into `rbuf` and copied out.
    direct: bool,
    /// Reads in a row in direct mode that took no long payload.
    small_reads: u8,
    /// Reads made straight into the reader's buffer, for tests.
    #[cfg(test)]
    direct_reads: usize,
    frame: Frame,
    /// A data message is unfinished: the next data frame continues it.
    in_message: bool,
    /// Control frames to hand to the gate (a pong, a close).
    ctl: Vec<u8>,
    /// A flush was started and has not completed yet.
    flush_pending: bool,
    /// The peer sent Close or the stream ended.
    eof: bool,
    /// This side closed the WebSocket.
    shut: bool,
    /// What the peer's Close frame said (its code and reason, escaped),
    /// once one came: a proxy's or balancer's close ("1001 going away")
    /// otherwise read as a bare end of the tunnel.
    closed_with: CloseNote,
}

impl<S> WsIo<S> {
    /// What this stream has received so far, for keepalives
    /// (`tunnel::await_keepalive`).
    pub fn liveness(&self) -> Liveness {
        self.alive.clone()
    }

    /// Where the peer's Close frame, when one comes, is described
    /// ([`close_description`]).
    pub fn close_note(&self) -> CloseNote {
        self.closed_with.clone()
    }

    /// Takes the stream over from tungstenite once the upgrade is done
    /// (tungstenite reads nothing past the head, see [`Gate`]; whatever
    /// came after it is read here first).
    pub fn new(ws: WebSocketStream<Gate<S>>) -> Self {
        let mut io = ws.into_inner();
        let rbuf = std::mem::take(&mut io.early);
        WsIo {
            io,
            alive: Liveness::default(),
            rbuf,
            rsize: READ_START,
            idle: true,
            bulk: false,
            direct: false,
            small_reads: 0,
            #[cfg(test)]
            direct_reads: 0,
            frame: Frame::Header,
            in_message: false,
            ctl: Vec::new(),
            flush_pending: false,
            eof: false,
            shut: false,
            closed_with: Default::default(),
        }
    }

    fn mask(&self) -> Option<[u8; 4]> {
        frame_mask(self.io.role)
    }

    /// Takes the frame at the start of `rbuf` if it is all there (a data
    /// frame's header, a control frame whole). `Ok(false)`: more bytes
    /// are needed.
    fn take_frame(&mut self) -> io::Result<bool> {
        let Some((fin, opcode, mask, len, hn)) = parse_header(&self.rbuf)? else {
            return Ok(false);
        };
        match (self.io.role, mask) {
            // A close frame unmasked: a proxy closing on its own behalf as
            // it reloads (Caddy sends its 1001 "going away" upstream so),
            // taken as the close it is rather than logged as the agent
            // breaking the protocol. Any other frame unmasked still ends
            // the session.
            (Role::Server, None) if opcode == 8 && fin => {}
            (Role::Server, None) => {
                return Err(invalid("an unmasked websocket frame from the client"))
            }
            (Role::Client, Some(_)) => {
                return Err(invalid("a masked websocket frame from the server"))
            }
            _ => {}
        }
        match opcode {
            0 | 2 => {
                if (opcode == 0) != self.in_message {
                    return Err(invalid(if opcode == 0 {
                        "a websocket continuation frame with no message to continue"
                    } else {
                        "a websocket message inside an unfinished one"
                    }));
                }
                if len > MAX_FRAME {
                    return Err(invalid(&format!(
                        "a websocket frame of {len} bytes (at most {MAX_FRAME})"
                    )));
                }
                self.rbuf.advance(hn);
                self.alive.saw();
                self.in_message = !fin;
                if len > 0 {
                    self.frame = Frame::Payload {
                        left: len,
                        // An all-zero key changes nothing: a plain copy.
                        mask: mask.filter(|k| *k != [0; 4]),
                        at: 0,
                    };
                }
            }
            1 => return Err(invalid("unexpected text message on the tunnel websocket")),
            8..=10 => {
                if !fin || len > 125 {
                    return Err(invalid("a fragmented or long websocket control frame"));
                }
                // Refused before it is taken, as every frame here: a read
                // after the error fails again instead of going on past it.
                if opcode == 8 && len == 1 {
                    return Err(invalid("a websocket close frame of one byte"));
                }
                let end = hn + len as usize;
                if self.rbuf.len() < end {
                    return Ok(false);
                }
                let mut payload = [0u8; 125];
                let payload = &mut payload[..len as usize];
                match mask {
                    Some(k) => copy_masked(payload, &self.rbuf[hn..end], k),
                    None => payload.copy_from_slice(&self.rbuf[hn..end]),
                }
                self.rbuf.advance(end);
                self.alive.saw();
                match opcode {
                    9 if !self.shut => {
                        // Only the latest ping needs its pong (RFC 6455,
                        // 5.5.3): one waiting is replaced (it is handed to
                        // the gate only once the gate has sent the rest).
                        self.ctl = control_frame(10, payload, self.mask());
                    }
                    8 => {
                        self.eof = true;
                        if let Ok(mut note) = self.closed_with.lock() {
                            note.get_or_insert_with(|| close_description(payload));
                        }
                        if !self.shut {
                            // Answered with its status code if it is one
                            // a peer may send (RFC 6455, 7.4), with 1002
                            // (protocol error) if not; then nothing more
                            // is sent.
                            let code =
                                (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                            let reply = match code {
                                None => Vec::new(),
                                Some(c)
                                    if close_code_ok(c)
                                        && std::str::from_utf8(&payload[2..]).is_ok() =>
                                {
                                    c.to_be_bytes().to_vec()
                                }
                                Some(_) => 1002u16.to_be_bytes().to_vec(),
                            };
                            self.ctl = control_frame(8, &reply, self.mask());
                            self.shut = true;
                        }
                    }
                    _ => {}
                }
            }
            op => {
                return Err(invalid(&format!(
                    "a websocket frame of unknown opcode {op}"
                )))
            }
        }
        Ok(true)
    }

    /// The socket has nothing for now: hold nothing while waiting, or only
    /// the start of a header or control frame (at most 139 bytes) in a
    /// buffer of its size (a burst of small frames ending in one byte must
    /// not keep the buffer it grew). The size of the next read stays: a
    /// bulk stream drains the socket often, and starting again at
    /// READ_START each time cost it more, smaller reads.
    fn wait(&mut self) -> Poll<io::Result<usize>> {
        self.rbuf = if self.rbuf.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&self.rbuf[..])
        };
        self.idle = true;
        Poll::Pending
    }

    /// Counts a read in direct mode that took no long payload: after
    /// [`SMALL_READS`] of them in a row the stream carries small messages
    /// only, and the socket is gulped again.
    fn count_small_read(&mut self) {
        self.small_reads += 1;
        if self.small_reads > SMALL_READS {
            self.direct = false;
            self.small_reads = 0;
        }
    }

    /// Reads more from the socket into `rbuf`; `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>
    where
        S: AsyncRead + Unpin,
    {
        if self.idle && !self.bulk && self.rbuf.is_empty() {
            // After a wait, most reads are a few small frames (a request, a
            // response): read on the stack and keep them in a buffer of
            // their size (a small allocation, cached by malloc) instead of
            // allocating a READ_START buffer and freeing it once drained.
            // A full read means more is coming: reads go to `rbuf` again,
            // also after later waits, until one is small (`bulk`).
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut rb = ReadBuf::uninit(&mut stack);
            if Pin::new(&mut self.io.io)
                .poll_read(cx, &mut rb)?
                .is_pending()
            {
                return self.wait();
            }
            let n = rb.filled().len();
            self.bulk = n == STACK_READ;
            self.idle = !self.bulk;
            self.rbuf = BytesMut::from(rb.filled());
            return Poll::Ready(Ok(n));
        }
        if self.direct {
            // Between reads straight into the reader's buffer: what the
            // tail of the last one did not hold of a header.
            if self.rbuf.capacity() - self.rbuf.len() < PAIR_TAIL {
                self.rbuf.reserve(PAIR_TAIL);
            }
            let mut limited = (&mut self.rbuf).limit(PAIR_TAIL);
            return match tokio_util::io::poll_read_buf(Pin::new(&mut self.io.io), cx, &mut limited)
            {
                Poll::Pending => self.wait(),
                r => {
                    self.count_small_read();
                    r
                }
            };
        }
        if self.rbuf.capacity() - self.rbuf.len() < self.rsize / 2 {
            // What is left here is at most the start of a header (a read
            // hands out all payload first). It moves to the front of this
            // allocation if that holds a whole read, else into a new one:
            // `reserve` would reallocate, copying the bytes already read
            // past as well (perf: ~2 % of the hub's samples on a bulk
            // download, and the buffer doubled each time).
            let need = self
                .rsize
                .saturating_sub(self.rbuf.len())
                .max(self.rsize / 2);
            if !self.rbuf.try_reclaim(need) {
                let mut fresh = BytesMut::with_capacity(self.rbuf.len() + need);
                fresh.extend_from_slice(&self.rbuf);
                self.rbuf = fresh;
            }
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io.io), cx, &mut self.rbuf) {
            Poll::Pending => self.wait(),
            Poll::Ready(Ok(n)) => {
                self.bulk = n >= STACK_READ;
                if n >= room {
                    self.rsize = (self.rsize * 2).min(READ_MAX);
                } else if n < room / 2 {
                    self.rsize = READ_START;
                }
                Poll::Ready(Ok(n))
            }
            r => r,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Hands our control frames to the gate, then flushes the gate onto
    /// the socket.
    fn drive_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = (|| {
            ready!(self.io.drain(cx))?;
            if !self.ctl.is_empty() {
                // The gate is empty: taken whole, what the socket does not
                // take is queued in the gate.
                if ready!(Pin::new(&mut self.io).poll_write(cx, &self.ctl))? == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.ctl = Vec::new();
                ready!(self.io.drain(cx))?;
            }
            Pin::new(&mut self.io.io).poll_flush(cx)
        })();
        self.flush_pending = r.is_pending();
        r
    }

    /// Whether anything is still to go out.
    fn unflushed(&self) -> bool {
        self.flush_pending || !self.ctl.is_empty() || self.io.queued() > 0
    }
}

impl<S: AsyncRead + AsyncWrite + ReadPair + Unpin> WsIo<S> {
    /// Reads the payload the reader wants (at most `left`, the frame's
    /// rest) straight into `buf`, and up to [`PAIR_TAIL`] bytes after it
    /// into `rbuf` (empty when this is called), in one system call.
    /// `Ok(false)`: the socket is at its end.
    fn read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        left: u64,
        mask: Option<[u8; 4]>,
        at: usize,
    ) -> Poll<io::Result<bool>> {
        let want = left.min(buf.remaining() as u64) as usize;
        // What makes `set_len` below and "nothing read: the end" right.
        debug_assert!(self.rbuf.is_empty() && want > 0);
        if self.rbuf.capacity() < PAIR_TAIL {
            self.rbuf = BytesMut::with_capacity(PAIR_TAIL);
        }
        // SAFETY: handed to a read as uninitialised memory, only written.
        let mut first = ReadBuf::uninit(unsafe { &mut buf.unfilled_mut()[..want] });
        let spare = self.rbuf.spare_capacity_mut();
        let tail = spare.len().min(PAIR_TAIL);
        let mut second = ReadBuf::uninit(&mut spare[..tail]);
        match self.io.io.poll_read_pair(cx, &mut first, &mut second) {
            Poll::Pending => return self.wait().map_ok(|_| true),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let (n, m) = (first.filled().len(), second.filled().len());
        if n == 0 {
            return Poll::Ready(Ok(false));
        }
        if let Some(k) = mask {
            // SAFETY: the n bytes were written by the read.
            let got = unsafe { &mut *(&mut buf.unfilled_mut()[..n] as *mut [_] as *mut [u8]) };
            let k = key_from(k, at);
            mask_in_place(got, k);
        }
        // SAFETY: the read wrote the first n bytes of `buf`'s unfilled part
        // and the first m of `rbuf`'s spare capacity (empty before).
        unsafe {
            buf.assume_init(n);
            self.rbuf.set_len(m);
        }
        buf.advance(n);
        self.frame = Frame::after_payload(left, mask, at, n);
        self.idle = false;
        self.bulk = true;
        if n >= DIRECT_MIN {
            self.direct = true;
            self.small_reads = 0;
        } else {
            self.count_small_read();
        }
        #[cfg(test)]
        {
            self.direct_reads += 1;
        }
        Poll::Ready(Ok(true))
    }
}

impl<S: AsyncRead + AsyncWrite + ReadPair + Unpin> AsyncRead for WsIo<S> {
    /// Hands out payload bytes of as many frames as are read and fit;
    /// reads the socket only when nothing was handed out yet.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Whatever is still going out (our frames, a pong, a close) is
        // driven from here too; a failed flush ends the read, unless the
        // peer has closed already (its socket may be gone before our
        // answer to its close).
        if this.unflushed() {
            if let Poll::Ready(Err(e)) = this.drive_flush(cx) {
                if !this.eof {
                    return Poll::Ready(Err(e));
                }
            }
        }
        let start = buf.filled().len();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let frame = this.frame;
            match frame {
                Frame::Payload { left, mask, at } if !this.rbuf.is_empty() => {
                    let n = (this.rbuf.len() as u64).min(left) as usize;
                    let n = n.min(buf.remaining());
                    // Written straight into the reader's buffer, which may
                    // be uninitialised: never zeroed first.
                    match mask {
                        Some(k) => {
                            let k = key_from(k, at);
                            // SAFETY: only bytes are written into it, no
                            // uninitialised value.
                            let dst = unsafe { &mut buf.unfilled_mut()[..n] };
                            copy_masked_uninit(dst, &this.rbuf[..n], k);
                            // SAFETY: the n bytes were all written just above.
                            unsafe { buf.assume_init(n) };
                            buf.advance(n);
                        }
                        None => buf.put_slice(&this.rbuf[..n]),
                    }
                    this.rbuf.advance(n);
                    this.frame = Frame::after_payload(left, mask, at, n);
                    continue;
                }
                // A frame taken whole or its header: on to the next.
                Frame::Header if !this.eof => match this.take_frame() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        // Said to the peer if the socket takes it now
                        // (RFC 6455, 7.1.7), then the read fails.
                        if !this.shut {
                            this.shut = true;
                            this.ctl = control_frame(8, &1002u16.to_be_bytes(), this.mask());
                            let _ = this.drive_flush(cx);
                        }
                        // Payload already in `buf` is handed out first (an
                        // error would drop it): the frame is still at the
                        // start of `rbuf` and fails the next read.
                        if buf.filled().len() > start {
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(e));
                    }
                },
                _ => {}
            }
            if !this.ctl.is_empty() {
                // A pong or our answer to a close, once per batch of
                // frames read.
                if let Poll::Ready(Err(e)) = this.drive_flush(cx) {
                    if !this.eof {
                        return Poll::Ready(Err(e));
                    }
                }
            }
            if this.eof || buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            if let Frame::Payload { left, mask, at } = this.frame {
                if this.rbuf.is_empty()
                    && (this.direct || buf.remaining() >= DIRECT_MIN)
                    && this.io.io.pairs()
                {
                    if ready!(this.read_direct(cx, buf, left, mask, at))? {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the websocket ended inside a frame",
                    )));
                }
            }
            if ready!(this.fill(cx))? == 0 {
                return Poll::Ready(if this.frame == Frame::Header && this.rbuf.is_empty() {
                    // The stream ended with no close: as tungstenite put it.
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "WebSocket protocol error: Connection reset without closing handshake",
                    ))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the websocket ended inside a frame",
                    ))
                });
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.eof || this.shut {
            // Nothing goes after a close (the peer's or ours).
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket closed",
            )));
        }
        // Our control frames (pongs) go out first, whole.
        if this.unflushed() {
            ready!(this.drive_flush(cx))?;
        }
        let n = ready!(this.io.poll_frame(cx, buf))?;
        if this.io.queued() > 0 {
            // The rest goes out from the read side or the next write.
            this.flush_pending = true;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().drive_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            this.ctl = control_frame(8, &[], this.mask());
        }
        match ready!(this.drive_flush(cx)) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_answer_listing_upgrade_among_other_tokens_is_read_as_an_upgrade() {
        let fixed = |head: &str| {
            answer_as_tungstenite_reads_it(head.as_bytes()).map(|h| String::from_utf8(h).unwrap())
        };
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert_eq!(fixed(ok), None, "nothing to change");
        assert_eq!(fixed(&ok.replace("Upgrade\r\nSec", "upgrade\r\nSec")), None);
        let listed = ok.replace("Connection: Upgrade", "Connection: Upgrade, keep-alive");
        assert_eq!(fixed(&listed).as_deref(), Some(ok));
        let two_lines = ok.replace(
            "Connection: Upgrade\r\n",
            "Connection: keep-alive\r\nServer: p\r\nconnection: upgrade\r\n",
        );
        assert_eq!(
            fixed(&two_lines).as_deref(),
            Some(&*ok.replace(
                "Connection: Upgrade\r\n",
                "Connection: Upgrade\r\nServer: p\r\n"
            ))
        );
        let upgrade_listed = ok.replace("Upgrade: websocket", "Upgrade: WebSocket, h2c");
        assert_eq!(fixed(&upgrade_listed).as_deref(), Some(ok));
        // No upgrade token at all: left for tungstenite to refuse.
        let none = ok.replace("Connection: Upgrade", "Connection: keep-alive, close");
        assert_eq!(fixed(&none), None);
    }

    use super::*;
    use futures_util::SinkExt;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
    use tokio_tungstenite::tungstenite::Message;

    fn data(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    /// Our end with `role` and a tungstenite peer with the other role,
    /// over a pipe of `capacity` bytes (small: every write comes up short).
    async fn pair(
        role: Role,
        capacity: usize,
    ) -> (WsIo<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(capacity);
        let (ours, peer_role) = match role {
            Role::Server => (WsRole::Server, WsRole::Client),
            Role::Client => (WsRole::Client, WsRole::Server),
        };
        let ws = WebSocketStream::from_raw_socket(Gate::new(a, role), ours, None).await;
        let peer = WebSocketStream::from_raw_socket(b, peer_role, None).await;
        (WsIo::new(ws), peer)
    }

    async fn read_binary(peer: &mut WebSocketStream<DuplexStream>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            match peer.next().await {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("the peer could not read our frames: {other:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn tungstenite_reads_what_both_roles_write_through_short_writes() {
        for role in [Role::Server, Role::Client] {
            let (mut ours, mut peer) = pair(role, 1000).await;
            let sent = data(700_000, role as u32);
            let want = sent.clone();
            let writer = tokio::spawn(async move {
                ours.write_all(&sent).await.unwrap();
                ours.flush().await.unwrap();
                ours
            });
            let got = read_binary(&mut peer, want.len()).await;
            assert!(got == want, "{role:?}: bytes changed on the way");
            // And the other way, through tungstenite's reading.
            let mut ours = writer.await.unwrap();
            let back = data(300_000, 7);
            let msg = Message::Binary(back.clone().into());
            let sender = tokio::spawn(async move { peer.send(msg).await });
            let mut got = vec![0u8; back.len()];
            ours.read_exact(&mut got).await.unwrap();
            assert!(got == back, "{role:?}: bytes read changed");
            sender.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_pong_waits_for_the_frame_still_going_out() {
        use futures_util::FutureExt;
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for role in [Role::Server, Role::Client] {
            let (mut ours, mut peer) = pair(role, 4096).await;
            // A frame that does not fit the pipe: accepted, mostly queued.
            let sent = data(100_000, 5);
            match Pin::new(&mut ours).poll_write(&mut cx, &sent) {
                Poll::Ready(Ok(n)) => assert_eq!(n, sent.len()),
                other => panic!("{role:?}: the write was not accepted: {other:?}"),
            }
            assert!(ours.io.queued() > 0, "{role:?}: the pipe took it all");
            // A ping arrives; our read side answers it while the frame is
            // still going out.
            peer.send(Message::Ping(b"hi".to_vec().into()))
                .await
                .unwrap();
            let mut b = [0u8; 16];
            assert!(Pin::new(&mut ours)
                .poll_read(&mut cx, &mut ReadBuf::new(&mut b))
                .is_pending());
            // The peer reads what is there (making room), our side goes on.
            let (mut got, mut pongs) = (Vec::new(), 0);
            for _ in 0..10_000 {
                match peer.next().now_or_never() {
                    Some(Some(Ok(Message::Binary(d)))) => got.extend_from_slice(&d),
                    Some(Some(Ok(Message::Pong(_)))) => pongs += 1,
                    Some(Some(Ok(_))) | None => {}
                    Some(other) => panic!(
                        "{role:?}: the stream broke after {} bytes: {other:?}",
                        got.len()
                    ),
                }
                if got.len() >= sent.len() && pongs > 0 {
                    break;
                }
                let _ = Pin::new(&mut ours).poll_read(&mut cx, &mut ReadBuf::new(&mut b));
            }
            assert!(got == sent, "{role:?}: bytes changed on the way");
            assert_eq!(pongs, 1, "{role:?}: the ping was not answered once");
        }
    }

    #[tokio::test]
    async fn a_write_of_tungstenites_the_socket_takes_in_part_goes_out_before_ours() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (a, mut far) = tokio::io::duplex(4);
        let mut gate = Gate::new(a, Role::Server);
        // tungstenite's write: the pipe takes 4 bytes, the rest is kept,
        // and the write counts as whole.
        match Pin::new(&mut gate).poll_write(&mut cx, b"PONG-REST") {
            Poll::Ready(Ok(n)) => assert_eq!(n, 9),
            other => panic!("not taken whole: {other:?}"),
        }
        assert_eq!(gate.queued(), 5);
        // Our frame waits for it.
        let mut got = Vec::new();
        let mut b = [0u8; 64];
        for _ in 0..100 {
            if let Poll::Ready(r) = gate.poll_frame(&mut cx, b"data") {
                assert_eq!(r.unwrap(), 4);
                break;
            }
            let n = far.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
        }
        while got.len() < 9 + 2 + 4 {
            let _ = Pin::new(&mut gate).poll_flush(&mut cx);
            let n = far.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(&got[..9], b"PONG-REST", "tungstenite's bytes were cut into");
        assert_eq!(&got[9..], &[0x82, 4, b'd', b'a', b't', b'a'][..]);
    }

    /// Our end with `role` over a pipe of `capacity` bytes, and the far end
    /// of the pipe, raw.
    fn raw_pair(role: Role, capacity: usize) -> (WsIo<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(capacity);
        let ws = futures_util::FutureExt::now_or_never(WebSocketStream::from_raw_socket(
            Gate::new(a, role),
            match role {
                Role::Server => WsRole::Server,
                Role::Client => WsRole::Client,
            },
            None,
        ))
        .unwrap();
        (WsIo::new(ws), b)
    }

    /// A frame as a peer in the other role would send it.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        frame_bytes(first, payload, mask)
    }

    #[tokio::test]
    async fn fragments_and_pings_from_a_peer_come_through_and_a_close_ends_the_stream() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        for role in [Role::Server, Role::Client] {
            // A small pipe: headers and payloads arrive cut anywhere.
            let (mut ours, mut peer) = pair(role, 7).await;
            let parts = [data(3000, 1), data(1, 2), data(0, 3), data(70_000, 4)];
            let want: Vec<u8> = parts.concat();
            let sender = tokio::spawn(async move {
                for (i, p) in parts.iter().enumerate() {
                    let op = if i == 0 {
                        OpCode::Data(Data::Binary)
                    } else {
                        OpCode::Data(Data::Continue)
                    };
                    let last = i == parts.len() - 1;
                    peer.send(Message::Frame(WsFrame::message(p.clone(), op, last)))
                        .await
                        .unwrap();
                    // A ping between fragments, as RFC 6455 allows.
                    peer.send(Message::Ping(vec![i as u8; 3].into()))
                        .await
                        .unwrap();
                }
                peer.send(Message::Close(None)).await.unwrap();
                // Pongs and the answer to the close come back.
                let mut pongs = Vec::new();
                loop {
                    match peer.next().await {
                        Some(Ok(Message::Pong(p))) => pongs.push(p.to_vec()),
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(other)) => panic!("{role:?}: unexpected {other:?}"),
                        Some(Err(e)) => panic!("{role:?}: {e}"),
                    }
                }
                pongs
            });
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = ours.read(&mut b).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            assert!(
                got == want,
                "{role:?}: bytes changed ({} of {})",
                got.len(),
                want.len()
            );
            ours.flush().await.unwrap();
            let pongs = sender.await.unwrap();
            assert!(!pongs.is_empty(), "{role:?}: no ping was answered");
            assert!(
                pongs.iter().all(|p| p.len() == 3 && p[0] == p[2]),
                "{role:?}: pongs did not echo their pings: {pongs:?}"
            );
            // Nothing goes out after the close.
            assert_eq!(
                ours.write(b"late").await.unwrap_err().kind(),
                io::ErrorKind::BrokenPipe
            );
        }
    }

    #[tokio::test]
    async fn what_rfc_6455_forbids_fails_the_read_with_the_reason() {
        let k = Some([9, 8, 7, 6]);
        let long = vec![0u8; 126];
        let cases: Vec<(Role, Vec<u8>, &str)> = vec![
            (Role::Server, frame(0x81, b"hi", k), "text"),
            (Role::Server, frame(0xc2, b"hi", k), "reserved"),
            (Role::Server, frame(0x82, b"hi", None), "unmasked"),
            (Role::Client, frame(0x82, b"hi", k), "masked"),
            (Role::Client, frame(0x80, b"hi", None), "continuation"),
            (
                Role::Client,
                [frame(0x02, b"a", None), frame(0x82, b"b", None)].concat(),
                "inside an unfinished",
            ),
            (Role::Client, frame(0x89, &long, None), "control"),
            (Role::Client, frame(0x09, b"p", None), "control"),
            (Role::Client, frame(0x83, b"x", None), "opcode 3"),
            (Role::Client, frame(0x88, b"x", None), "one byte"),
            (
                Role::Client,
                [&[0x82u8, 127][..], &(MAX_FRAME + 1).to_be_bytes()].concat(),
                "at most",
            ),
        ];
        for (role, bytes, why) in cases {
            let (mut ours, mut far) = raw_pair(role, 1 << 16);
            far.write_all(&bytes).await.unwrap();
            let mut b = [0u8; 64];
            let mut got = Vec::new();
            let err = loop {
                match ours.read(&mut b).await {
                    Ok(0) => panic!("{why}: ended without an error"),
                    Ok(n) => got.extend_from_slice(&b[..n]),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{why}: {err}");
            assert!(err.to_string().contains(why), "{why}: said {err}");
            assert!(got.len() <= 1, "{why}: passed on {got:?}");
        }
        // A stream ending inside a frame, or with no close, is an error too.
        for (bytes, why) in [
            (frame(0x82, b"hello", None)[..4].to_vec(), "inside a frame"),
            (Vec::new(), "without closing handshake"),
        ] {
            let (mut ours, mut far) = raw_pair(Role::Client, 1 << 16);
            far.write_all(&bytes).await.unwrap();
            drop(far);
            let mut b = [0u8; 64];
            let err = loop {
                match ours.read(&mut b).await {
                    Ok(0) => panic!("{why}: a clean end"),
                    Ok(_) => {}
                    Err(e) => break e,
                }
            };
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{why}: {err}");
            assert!(err.to_string().contains(why), "{why}: said {err}");
        }
    }

    #[tokio::test]
    async fn frames_sent_with_the_upgrade_answer_are_not_lost_and_an_idle_reader_holds_no_buffer() {
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
        // The agent's side: the hub's first frame comes in the same write
        // as its 101 (tungstenite would have kept it in its own buffer),
        // with the usual line ends and with bare `\n` (httparse takes both).
        let first = data(5000, 11);
        let wait = std::time::Duration::from_secs(5);
        let mut b = [0u8; 1024];
        for eol in ["\r\n", "\n"] {
            let (a, mut hub) = tokio::io::duplex(1 << 16);
            let client = tokio::spawn(tokio_tungstenite::client_async(
                "ws://hub.example/tunnel",
                Gate::new(a, Role::Client),
            ));
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let n = hub.read(&mut b).await.unwrap();
                req.extend_from_slice(&b[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            let key = req
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("sec-websocket-key:")
                        .then(|| l[18..].trim().to_string())
                })
                .expect("no key in the request");
            let mut answer = [
                "HTTP/1.1 101 Switching Protocols",
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!(
                    "Sec-WebSocket-Accept: {}",
                    derive_accept_key(key.as_bytes())
                ),
                "",
                "",
            ]
            .join(eol)
            .into_bytes();
            answer.extend_from_slice(&frame(0x82, &first, None));
            hub.write_all(&answer).await.unwrap();
            let (ws, _) = client.await.unwrap().unwrap();
            let mut ours = WsIo::new(ws);
            let mut got = vec![0u8; first.len()];
            tokio::time::timeout(wait, ours.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{eol:?}: the frame sent with the 101 never came"))
                .unwrap();
            assert!(
                got == first,
                "{eol:?}: the frame sent with the 101 was changed"
            );
            // Nothing more to read: the reader holds no buffer while it waits.
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(Pin::new(&mut ours)
                .poll_read(&mut cx, &mut ReadBuf::new(&mut b))
                .is_pending());
            assert_eq!(ours.rbuf.capacity(), 0, "an idle reader kept its buffer");
        }

        // The hub's side: a client that sends its first frame with the
        // upgrade request.
        let (a, mut agent) = tokio::io::duplex(1 << 16);
        let mut hello = b"GET /tunnel HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
        hello.extend_from_slice(&frame(0x82, &first, Some([1, 2, 3, 4])));
        agent.write_all(&hello).await.unwrap();
        let ws = tokio_tungstenite::accept_async(Gate::new(a, Role::Server))
            .await
            .unwrap();
        let mut ours = WsIo::new(ws);
        let mut got = vec![0u8; first.len()];
        tokio::time::timeout(wait, ours.read_exact(&mut got))
            .await
            .expect("the frame sent with the request never came")
            .unwrap();
        assert!(got == first, "the frame sent with the request was changed");
    }

    /// Reads from `ours` until it would wait (nothing more buffered or on
    /// the pipe); returns the bytes read.
    fn read_until_pending(ours: &mut WsIo<DuplexStream>) -> io::Result<Vec<u8>> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut got = Vec::new();
        let mut b = vec![0u8; 64 * 1024];
        loop {
            let mut rb = ReadBuf::new(&mut b);
            match Pin::new(&mut *ours).poll_read(&mut cx, &mut rb) {
                Poll::Pending => return Ok(got),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Ok(got),
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
    }

    /// Control frames the far end of a raw pair received: (opcode, payload).
    async fn control_frames_at(far: &mut DuplexStream) -> Vec<(u8, Vec<u8>)> {
        let mut raw = Vec::new();
        let mut b = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), far.read(&mut b)).await
        {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&b[..n]);
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at + 2 <= raw.len() {
            let (op, masked, len) = (
                raw[at] & 0x0f,
                raw[at + 1] & 0x80 != 0,
                (raw[at + 1] & 0x7f) as usize,
            );
            let hn = if masked { 6 } else { 2 };
            let mut p = raw[at + hn..at + hn + len].to_vec();
            if masked {
                let k = [raw[at + 2], raw[at + 3], raw[at + 4], raw[at + 5]];
                let src = p.clone();
                copy_masked(&mut p, &src, k);
            }
            out.push((op, p));
            at += hn + len;
        }
        out
    }

    #[tokio::test]
    async fn a_small_frame_after_a_wait_is_held_in_a_buffer_of_its_size() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut ours, mut far) = raw_pair(Role::Client, 1 << 20);
        for round in 0..3u8 {
            far.write_all(&frame(0x82, b"hello, hub", None))
                .await
                .unwrap();
            // A reader that takes two bytes: the rest waits in `rbuf`.
            let mut two = [0u8; 2];
            let mut rb = ReadBuf::new(&mut two);
            let r = Pin::new(&mut ours).poll_read(&mut cx, &mut rb);
            assert!(matches!(r, Poll::Ready(Ok(()))), "{r:?}");
            assert_eq!(rb.filled(), b"he");
            assert!(
                ours.rbuf.capacity() < 64,
                "round {round}: a 12-byte frame is held in a buffer of {}",
                ours.rbuf.capacity()
            );
            assert_eq!(read_until_pending(&mut ours).unwrap(), b"llo, hub");
            // Then a burst many stack reads long comes through whole.
            let burst: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 ^ round).collect();
            let mut frames = Vec::new();
            for chunk in burst.chunks(70_000) {
                frames.extend_from_slice(&frame(0x82, chunk, None));
            }
            far.write_all(&frames).await.unwrap();
            assert!(
                read_until_pending(&mut ours).unwrap() == burst,
                "round {round}: burst changed"
            );
            assert_eq!(ours.rbuf.capacity(), 0, "a waiting reader holds a buffer");
            // After a burst the next read goes to the buffer (a bulk stream
            // waits often); a small one ends that.
            assert!(ours.bulk, "round {round}: a burst of big reads is not bulk");
            far.write_all(&frame(0x82, b"ok", None)).await.unwrap();
            assert_eq!(read_until_pending(&mut ours).unwrap(), b"ok");
            assert!(
                !ours.bulk,
                "round {round}: a small read after a burst is still bulk"
            );
            assert_eq!(ours.rbuf.capacity(), 0, "round {round}: the buffer stayed");
        }
    }

    #[tokio::test]
    async fn a_burst_of_small_frames_leaves_no_big_buffer_and_its_pings_one_pong() {
        let (mut ours, mut far) = raw_pair(Role::Client, 1 << 20);
        // 300 KB of empty frames and 1,000 pings, then one byte of a header.
        let mut burst = Vec::new();
        for i in 0..50_000u32 {
            burst.extend_from_slice(&[0x82, 0]);
            if i % 50 == 0 {
                burst.extend_from_slice(&frame(0x89, &i.to_be_bytes(), None));
            }
        }
        burst.extend_from_slice(&[0x82, 0, 0x82, 0, 0x82, 0]);
        let last_ping = (49_950u32).to_be_bytes();
        burst.push(0x82);
        far.write_all(&burst).await.unwrap();
        let got = read_until_pending(&mut ours).unwrap();
        assert!(got.is_empty(), "empty frames gave bytes: {}", got.len());
        assert!(
            ours.rbuf.capacity() < 1024,
            "one byte of a header kept a buffer of {}",
            ours.rbuf.capacity()
        );
        assert_eq!(ours.rbuf.len(), 1);
        let ctl = control_frames_at(&mut far).await;
        assert!(!ctl.is_empty(), "no pong");
        assert!(
            ctl.len() < 100,
            "{} pongs for 1,000 pings read in a few gulps",
            ctl.len()
        );
        assert_eq!(
            ctl.last().unwrap(),
            &(10, last_ping.to_vec()),
            "the last pong is not the last ping's"
        );
        // The rest of the frame still comes through.
        far.write_all(&[3, b'a', b'b', b'c']).await.unwrap();
        assert_eq!(read_until_pending(&mut ours).unwrap(), b"abc");
    }

    #[tokio::test]
    async fn a_close_is_answered_with_its_code_or_1002_and_a_protocol_error_with_1002() {
        let cases: Vec<(Vec<u8>, Option<u16>)> = vec![
            (Vec::new(), None),
            (1000u16.to_be_bytes().to_vec(), Some(1000)),
            ([&4000u16.to_be_bytes()[..], b"bye"].concat(), Some(4000)),
            (1005u16.to_be_bytes().to_vec(), Some(1002)),
            (999u16.to_be_bytes().to_vec(), Some(1002)),
            (
                [&1000u16.to_be_bytes()[..], &[0xff, 0xfe]].concat(),
                Some(1002),
            ),
        ];
        for (payload, want) in cases {
            let (mut ours, mut far) = raw_pair(Role::Server, 1 << 16);
            far.write_all(&frame(0x88, &payload, Some([5, 6, 7, 8])))
                .await
                .unwrap();
            assert_eq!(read_until_pending(&mut ours).unwrap(), b"");
            assert!(ours.eof, "{payload:?}: the close did not end the stream");
            let note = ours
                .close_note()
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_default();
            assert!(note.starts_with("a WebSocket close"), "{note}");
            let ctl = control_frames_at(&mut far).await;
            let code = ctl[0].1.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            assert_eq!((ctl.len(), ctl[0].0, code), (1, 8, want), "{payload:?}");
        }
        // A proxy's own close, unmasked (Caddy reloading): the close it is,
        // not a protocol error; any other unmasked frame still is one.
        let (mut ours, mut far) = raw_pair(Role::Server, 1 << 16);
        far.write_all(&frame(0x88, &1001u16.to_be_bytes(), None))
            .await
            .unwrap();
        assert_eq!(read_until_pending(&mut ours).unwrap(), b"");
        assert!(ours.eof);
        let note = ours
            .close_note()
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default();
        assert!(note.contains("1001 (going away"), "{note}");
        // A frame RFC 6455 forbids: the peer hears 1002 before the read fails.
        let (mut ours, mut far) = raw_pair(Role::Server, 1 << 16);
        far.write_all(&frame(0x81, b"text", Some([1, 1, 1, 1])))
            .await
            .unwrap();
        assert!(read_until_pending(&mut ours).is_err());
        let ctl = control_frames_at(&mut far).await;
        assert_eq!(ctl, vec![(8, 1002u16.to_be_bytes().to_vec())]);
    }

    #[test]
    fn a_close_is_described_with_its_code_and_escaped_reason() {
        let d = |code: u16, reason: &[u8]| {
            close_description(&[&code.to_be_bytes()[..], reason].concat())
        };
        assert_eq!(
            d(1001, b""),
            "a WebSocket close with code 1001 (going away: a server or proxy shutting down or cutting the connection)"
        );
        let forged = d(4000, b"bye\nagent connected cluster=prod");
        assert!(forged.contains("4000: 'bye\\nagent"), "{forged}");
        assert_eq!(close_description(&[]), "a WebSocket close without a code");
    }

    #[tokio::test]
    async fn frames_in_one_read_come_out_in_one_call() {
        let (mut ours, mut far) = raw_pair(Role::Client, 1 << 16);
        let parts = [data(100, 1), data(2000, 2), data(5, 3)];
        for p in &parts {
            far.write_all(&frame(0x82, p, None)).await.unwrap();
        }
        let mut b = vec![0u8; 8192];
        let n = ours.read(&mut b).await.unwrap();
        assert_eq!(&b[..n], &parts.concat()[..]);
    }

    #[test]
    fn a_head_ends_where_httparse_ends_it() {
        let end = |head: &[u8]| {
            let mut st = 0;
            head.iter().position(|&b| {
                st = head_end_after(st, b);
                st == HEAD_DONE
            })
        };
        // The blank line's last byte: just before what follows the head.
        for head in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\nFRAME"[..],
            b"GET / HTTP/1.1\nHost: x\n\nFRAME",
            b"GET / HTTP/1.1\nHost: x\n\r\nFRAME",
            b"GET / HTTP/1.1\r\nHost: x\r\n\nFRAME",
        ] {
            assert_eq!(end(head), Some(head.len() - 6), "{head:?}");
        }
        // Empty lines before the request line are skipped, however many.
        for head in [
            &b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nFRAME"[..],
            b"\n\n\nGET / HTTP/1.1\nHost: x\n\nFRAME",
            b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\nFRAME",
        ] {
            assert_eq!(end(head), Some(head.len() - 6), "{head:?}");
        }
        assert_eq!(end(b"\r\n\r\n\n\n"), None);
        assert_eq!(end(b"GET / HTTP/1.1\r\nHost: x\r\n\r"), None);
        assert_eq!(end(b"GET / HTTP/1.1\r\nHost: x\r\rx\r\n"), None);
    }

    #[test]
    fn masking_twice_gives_the_bytes_back() {
        for len in [0, 1, 7, 8, 9, 1003] {
            let orig = data(len, 1);
            let mut b = vec![0u8; len];
            copy_masked(&mut b, &orig, [1, 2, 3, 4]);
            for (i, (m, o)) in b.iter().zip(&orig).enumerate() {
                assert_eq!(*m, o ^ [1, 2, 3, 4][i % 4], "byte {i} of {len}");
            }
            let mut back = vec![0u8; len];
            copy_masked(&mut back, &b, [1, 2, 3, 4]);
            assert_eq!(back, orig);
            let mut inplace = orig.clone();
            mask_in_place(&mut inplace, [1, 2, 3, 4]);
            assert_eq!(inplace, b, "in place, {len}");
            let mut into = vec![std::mem::MaybeUninit::new(0xaa); len];
            copy_masked_uninit(&mut into, &orig, [1, 2, 3, 4]);
            // SAFETY: every element was initialised when made.
            let into: Vec<u8> = into.iter().map(|m| unsafe { m.assume_init() }).collect();
            assert_eq!(into, b, "{len}");
        }
    }

    /// A read into a buffer handed over uninitialised (as russh's packet
    /// reads are) gets the frames' bytes unmasked, across frame and read
    /// boundaries.
    #[tokio::test]
    async fn frames_read_into_an_uninitialised_buffer_come_out_whole() {
        use tokio::io::AsyncReadExt;
        let payload = data(100_003, 3);
        // A server reads masked frames, a client unmasked ones.
        for role in [Role::Server, Role::Client] {
            let (mut ws, mut raw) = raw_pair(role, 1 << 20);
            let mut wire = Vec::new();
            for (i, chunk) in payload.chunks(7_001).enumerate() {
                // An agent's frames carry an all-zero key (read with a
                // plain copy); one masked again on the way has another.
                let key = if i % 3 == 0 {
                    AGENT_MASK
                } else {
                    [i as u8, 9, 200, 7]
                };
                let mask = matches!(role, Role::Server).then_some(key);
                wire.extend(frame(0x82, chunk, mask));
            }
            tokio::io::AsyncWriteExt::write_all(&mut raw, &wire)
                .await
                .unwrap();
            let mut got: Vec<u8> = Vec::new();
            while got.len() < payload.len() {
                // Reads of odd sizes into spare capacity, as `read_buf` does.
                got.reserve(4_099);
                let mut limited = bytes::BufMut::limit(&mut got, 4_099);
                let read = ws.read_buf(&mut limited);
                let n = tokio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .expect("bytes lost: no read in 5 s")
                    .unwrap();
                assert!(n > 0);
            }
            assert_eq!(got.len(), payload.len());
            assert!(got == payload);
        }
    }

    /// Over a real socket, long payloads are read straight into the
    /// reader's buffer (`ReadPair`): the bytes come out whole and in
    /// order, unmasked where a key other than zero came, whatever the
    /// frames' and the reads' sizes, with headers, lengths and small
    /// frames between them and the socket's bytes arriving cut anywhere.
    #[tokio::test]
    async fn long_payloads_read_straight_into_the_readers_buffer_come_out_whole() {
        use tokio::io::AsyncReadExt;
        let sizes = [
            70_001usize,
            3,
            200_000,
            16_384,
            16_383,
            1,
            65_600,
            100,
            300_007,
        ];
        let payload = data(sizes.iter().sum(), 5);
        for role in [Role::Server, Role::Client] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut raw = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (tcp, _) = l.accept().await.unwrap();
            let ws = WebSocketStream::from_raw_socket(
                Gate::new(tcp, role),
                match role {
                    Role::Server => WsRole::Server,
                    Role::Client => WsRole::Client,
                },
                None,
            )
            .await;
            let mut ws = WsIo::new(ws);
            let mut wire = Vec::new();
            let mut at = 0;
            for (i, n) in sizes.iter().enumerate() {
                let key = if i % 2 == 0 {
                    AGENT_MASK
                } else {
                    [i as u8, 9, 200, 7]
                };
                let mask = matches!(role, Role::Server).then_some(key);
                wire.extend(frame(0x82, &payload[at..at + n], mask));
                at += n;
            }
            let writer = tokio::spawn(async move {
                // Cut at odd places, with pauses: reads find the socket
                // empty, or holding part of a header or payload.
                for (i, chunk) in wire.chunks(50_021).enumerate() {
                    raw.write_all(chunk).await.unwrap();
                    if i % 2 == 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                }
                raw
            });
            let mut got: Vec<u8> = Vec::new();
            let mut i = 0usize;
            while got.len() < payload.len() {
                // As russh reads a packet: its length (4 bytes, whole),
                // then its body into spare capacity until it is all there.
                let body = [65_539, 20_000, 16_384, 131_072, 10][i % 5];
                i += 1;
                for want in [4, body] {
                    let end = (got.len() + want).min(payload.len());
                    while got.len() < end {
                        let want = end - got.len();
                        got.reserve(want);
                        let mut limited = bytes::BufMut::limit(&mut got, want);
                        let read = ws.read_buf(&mut limited);
                        let n = tokio::time::timeout(std::time::Duration::from_secs(5), read)
                            .await
                            .expect("bytes lost: no read in 5 s")
                            .unwrap();
                        assert!(n > 0);
                    }
                }
            }
            let mut raw = writer.await.unwrap();
            assert_eq!(got.len(), payload.len(), "{role:?}");
            assert!(got == payload, "{role:?}: bytes differ");
            assert!(
                ws.direct_reads > 5,
                "{role:?}: {} direct reads",
                ws.direct_reads
            );
            assert!(ws.direct, "{role:?}: direct mode ended inside the bulk");
            // Small messages only, one at a time: direct mode ends, and
            // they come through whole.
            let small = data(100, 9);
            let mask = matches!(role, Role::Server).then_some([1, 2, 3, 4]);
            for i in 0..2 * usize::from(SMALL_READS) {
                raw.write_all(&frame(0x82, &small, mask)).await.unwrap();
                let mut got = vec![0u8; small.len()];
                tokio::time::timeout(std::time::Duration::from_secs(5), ws.read_exact(&mut got))
                    .await
                    .expect("a small message lost")
                    .unwrap();
                assert_eq!(got, small, "{role:?}: small message {i}");
            }
            assert!(
                !ws.direct,
                "{role:?}: still in direct mode after small messages only"
            );
        }
    }

    /// A socket that takes vectored writes and records each one.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let one: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = one.len();
            self.get_mut().writes.push(one);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An agent's frame is the caller's bytes as they are behind a header
    /// with the mask bit and an all-zero key, in one write (nothing
    /// masked into a copy); a hub's has no key. Both go out whole, and
    /// tungstenite (a strict reader) reads them back.
    #[tokio::test]
    async fn an_agents_frame_carries_its_bytes_as_they_are_under_a_zero_key() {
        let payload = data(70_001, 11);
        for role in [Role::Client, Role::Server] {
            let mut gate = Gate::new(Recorder::default(), role);
            let n = std::future::poll_fn(|cx| gate.poll_frame(cx, &payload))
                .await
                .unwrap();
            assert_eq!(n, payload.len());
            assert_eq!(gate.queued(), 0, "{role:?}: the frame went out whole");
            let writes = std::mem::take(&mut gate.io.writes);
            assert_eq!(writes.len(), 1, "{role:?}: one write per frame");
            let w = &writes[0];
            let (fin_op, len7) = (w[0], w[1]);
            assert_eq!(fin_op, 0x82, "{role:?}: a final binary frame");
            assert_eq!(len7 & 0x7f, 127, "{role:?}: a 64-bit length");
            assert_eq!(&w[2..10], &(payload.len() as u64).to_be_bytes());
            let hn = match role {
                Role::Client => {
                    assert_eq!(len7 & 0x80, 0x80, "an agent's frame is masked");
                    assert_eq!(&w[10..14], &[0; 4], "with an all-zero key");
                    14
                }
                Role::Server => {
                    assert_eq!(len7 & 0x80, 0, "a hub's frame is not masked");
                    10
                }
            };
            assert!(w[hn..] == payload[..], "{role:?}: the bytes as they are");
            // The peer's reading of it.
            let peer = match role {
                Role::Client => WsRole::Server,
                Role::Server => WsRole::Client,
            };
            let (mut a, b) = tokio::io::duplex(1 << 20);
            let mut theirs = WebSocketStream::from_raw_socket(b, peer, None).await;
            a.write_all(w).await.unwrap();
            let got = read_binary(&mut theirs, payload.len()).await;
            assert!(got == payload, "{role:?}: tungstenite reads it back");
        }
    }

    use crate::testrng::Rng;

    /// Appends a frame to `out`, written here rather than with the code
    /// under test: the first byte `first` (FIN, RSV, opcode), the declared
    /// length `len` in `width` (0: as short as it goes, 1: at least 16
    /// bits, 2: 64 bits; RFC 6455 asks senders for the shortest, but
    /// neither tungstenite nor `WsIo` holds a receiver to it), the mask key
    /// if any, then `payload` (which may be shorter than `len`) masked.
    fn put_frame(
        out: &mut Vec<u8>,
        first: u8,
        len: u64,
        width: usize,
        key: Option<[u8; 4]>,
        payload: &[u8],
    ) {
        crate::testrng::push_ws_header(out, first, len, width, key);
        let at = out.len();
        out.extend_from_slice(payload);
        if let Some(k) = key {
            xor_key(&mut out[at..], k);
        }
    }

    /// XORs `b` with `key` from the key's first byte on, four bytes at a
    /// time (a test in a debug build goes through megabytes of it).
    fn xor_key(b: &mut [u8], key: [u8; 4]) {
        let k = u32::from_ne_bytes(key);
        let mut words = b.chunks_exact_mut(4);
        for w in &mut words {
            let x = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) ^ k;
            w.copy_from_slice(&x.to_ne_bytes());
        }
        for (b, k) in words.into_remainder().iter_mut().zip(key) {
            *b ^= k;
        }
    }

    /// A data payload's length: often empty or small, often at the edges
    /// of the length encodings (125/126/127, 65535/65536), sometimes a few
    /// KiB, rarely up to 200 KiB.
    fn random_data_len(r: &mut Rng) -> usize {
        match r.range(0, 23) {
            0..=3 => 0,
            4..=9 => r.range(1, 20),
            10..=12 => r.range(123, 129),
            13 => r.range(65_533, 65_538),
            14..=19 => r.range(0, 5_000),
            20..=22 => r.range(5_000, 40_000),
            _ => r.range(40_000, 200_000),
        }
    }

    /// A control frame's payload length: at most 125, often at the edge.
    fn random_control_len(r: &mut Rng) -> usize {
        match r.range(0, 5) {
            0 => 0,
            1 => 125,
            2 => r.range(120, 125),
            _ => r.range(0, 125),
        }
    }

    /// A close frame's payload: none, a status code (allowed or not), or
    /// one with a reason (ASCII, multi-byte UTF-8 maybe cut inside a
    /// character, or random bytes).
    fn random_close_payload(r: &mut Rng) -> Vec<u8> {
        if r.one_in(5) {
            return Vec::new();
        }
        let code: u16 = if r.one_in(8) {
            r.next() as u16
        } else {
            r.pick(&[
                0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1010, 1011, 1012, 1014,
                1015, 1016, 2000, 2999, 3000, 3999, 4000, 4999, 5000, 65535,
            ])
        };
        let mut p = code.to_be_bytes().to_vec();
        let n = r.range(0, 123);
        match r.range(0, 3) {
            0 => {}
            1 => p.extend(std::iter::repeat_n(b'z', n)),
            2 => p.extend_from_slice(&"é€".repeat(40).as_bytes()[..n]),
            _ => p.extend(r.bytes(n)),
        }
        p
    }

    /// A random stream of frames as the peer of our end in `role` might
    /// send them: mostly valid (binary messages whole and in fragments, pings
    /// and pongs among them), in half the cases with one frame RFC 6455
    /// forbids (or the longest one allowed) somewhere and more frames after
    /// it, sometimes a close (and frames after it), sometimes cut short.
    fn random_frames(r: &mut Rng, role: Role) -> Vec<u8> {
        let masks = role == Role::Server;
        let mut out = Vec::new();
        // A fragmented message is unfinished.
        let mut open = false;
        let frames = r.range(0, 10);
        let bad = (frames > 0 && r.one_in(2)).then(|| r.range(0, frames - 1));
        for i in 0..frames {
            let key = masks.then(|| {
                if r.one_in(8) {
                    [0; 4]
                } else {
                    let k = r.next().to_le_bytes();
                    [k[0], k[1], k[2], k[3]]
                }
            });
            let width = if r.one_in(8) { r.range(1, 2) } else { 0 };
            let data_op = if open { 0x00 } else { 0x02 };
            if bad != Some(i) {
                let (first, n) = match r.range(0, 7) {
                    0 => (0x89, random_control_len(r)),
                    1 => (0x8a, random_control_len(r)),
                    _ => {
                        let fin = !r.one_in(3);
                        open = !fin;
                        (if fin { 0x80 } else { 0 } | data_op, random_data_len(r))
                    }
                };
                put_frame(&mut out, first, n as u64, width, key, &r.bytes(n));
                continue;
            }
            let fin = if r.one_in(2) { 0x80 } else { 0 };
            let small = r.range(0, 130);
            match r.range(0, 10) {
                // Reserved bits on any frame.
                0 => {
                    let op = r.pick(&[0x82, 0x02, 0x80, 0x00, 0x88, 0x89, 0x8a]);
                    let rsv = r.pick(&[0x10, 0x20, 0x40, 0x70]);
                    let n = small.min(125);
                    put_frame(&mut out, op | rsv, n as u64, width, key, &r.bytes(n));
                }
                // An unknown opcode.
                1 => {
                    let op = r.pick(&[3, 4, 5, 6, 7, 11, 12, 13, 14, 15]);
                    put_frame(
                        &mut out,
                        fin | op,
                        small as u64,
                        width,
                        key,
                        &r.bytes(small),
                    );
                }
                // Text, which the tunnel does not carry.
                2 => put_frame(&mut out, fin | 1, 2, width, key, b"hi"),
                // A fragmented control frame.
                3 => {
                    let op = r.pick(&[8, 9, 10]);
                    let n = small.min(125);
                    put_frame(&mut out, op, n as u64, width, key, &r.bytes(n));
                }
                // A control frame over 125 bytes, often just over.
                4 => {
                    let op = r.pick(&[0x88, 0x89, 0x8a]);
                    let n = if r.one_in(2) { 126 } else { r.range(127, 300) };
                    put_frame(&mut out, op, n as u64, width, key, &r.bytes(n));
                }
                // A continuation with nothing to continue, or a new
                // message inside an unfinished one.
                5 => {
                    let op = fin | if open { 0x02 } else { 0x00 };
                    put_frame(&mut out, op, small as u64, width, key, &r.bytes(small));
                }
                // A mask from the server, or none from a client.
                6 => {
                    let key = (!masks).then_some([1, 2, 3, 4]);
                    let op = fin | data_op;
                    put_frame(&mut out, op, small as u64, width, key, &r.bytes(small));
                }
                // A length over the bound, up to one with the top bit set.
                7 => {
                    let len = r.pick(&[MAX_FRAME + 1, 1 << 32, 1 << 63, u64::MAX]);
                    put_frame(&mut out, fin | data_op, len, 2, key, &r.bytes(small));
                }
                // A close of one byte.
                8 => put_frame(&mut out, 0x88, 1, width, key, &[3]),
                // Noise.
                9 => {
                    let n = r.range(1, 30);
                    out.extend(r.bytes(n));
                }
                // The longest frame allowed, whole or in part (what follows
                // is then its payload).
                _ => {
                    let n = if r.one_in(8) {
                        MAX_FRAME as usize
                    } else {
                        r.range(0, 3000)
                    };
                    put_frame(&mut out, fin | data_op, MAX_FRAME, 2, key, &r.bytes(n));
                    open = fin == 0;
                }
            }
        }
        if r.one_in(3) {
            let key = masks.then_some([0x5a, 0, 0xff, 7]);
            let p = random_close_payload(r);
            put_frame(&mut out, 0x88, p.len() as u64, 0, key, &p);
            if r.one_in(2) {
                // Never read: nothing comes after a close.
                put_frame(&mut out, 0x82, 3, 0, key, b"end");
            }
        }
        if r.one_in(4) && !out.is_empty() {
            let cut = if r.one_in(2) {
                r.range(0, out.len() - 1)
            } else {
                out.len() - r.range(1, out.len().min(16))
            };
            out.truncate(cut);
        }
        out
    }

    /// How a stream ends for the reader.
    #[derive(Debug)]
    enum End {
        /// The peer closed: the read ends cleanly, and our answer carries
        /// this status (none for a close with none).
        Close(Option<u16>),
        /// A frame RFC 6455 forbids: the read fails with `InvalidData`,
        /// saying one of these (a frame may be wrong in several ways).
        Forbidden(Vec<String>),
        /// The bytes ran out: the read fails with `UnexpectedEof`, saying
        /// this.
        Cut(&'static str),
    }

    /// What reading a stream should give.
    #[derive(Debug)]
    struct Expected {
        /// The payload bytes of the data frames before the end, in order
        /// (of a frame cut short, the part there is).
        payload: Vec<u8>,
        /// The payloads of the pings before the end.
        pings: Vec<Vec<u8>>,
        end: End,
    }

    /// A plain reading of RFC 6455 as `WsIo` documents it, a whole stream
    /// at once (the reader under test goes piece by piece): for the tunnel,
    /// text is forbidden (tungstenite would pass it on), a close ends the
    /// stream (answered with its status if a peer may send it, as the
    /// Autobahn test suite has it, else with 1002), frames over
    /// `MAX_FRAME` are refused, lengths written longer than needed are
    /// taken (as tungstenite takes them), reserved bits fail a frame as
    /// soon as its first two bytes are there and a close of one byte as
    /// soon as its header is.
    fn expected_reading(role: Role, s: &[u8]) -> Expected {
        let (mut payload, mut pings, mut open, mut at) = (Vec::new(), Vec::new(), false, 0);
        let end = loop {
            let b = &s[at..];
            if b.is_empty() {
                break End::Cut("without closing handshake");
            }
            if b.len() >= 2 && b[0] & 0x70 != 0 {
                break End::Forbidden(vec!["reserved".into()]);
            }
            if b.len() < 2 {
                break End::Cut("inside a frame");
            }
            let (fin, op, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
            let ext = match b[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let hn = 2 + ext + if masked { 4 } else { 0 };
            if b.len() < hn {
                break End::Cut("inside a frame");
            }
            let len = match ext {
                0 => u64::from(b[1] & 0x7f),
                _ => b[2..2 + ext].iter().fold(0, |l, &x| l << 8 | u64::from(x)),
            };
            let mut why: Vec<String> = Vec::new();
            if masked != (role == Role::Server) {
                why.push(
                    if masked {
                        "masked websocket frame from the server"
                    } else {
                        "unmasked"
                    }
                    .into(),
                );
            }
            match op {
                0 if !open => why.push("continuation".into()),
                2 if open => why.push("inside an unfinished".into()),
                1 => why.push("text".into()),
                8..=10 if !fin || len > 125 => why.push("control".into()),
                8 if len == 1 => why.push("one byte".into()),
                3..=7 | 11..=15 => why.push(format!("opcode {op}")),
                _ => {}
            }
            if op <= 2 && len > MAX_FRAME {
                why.push("at most".into());
            }
            if !why.is_empty() {
                break End::Forbidden(why);
            }
            // At most MAX_FRAME now.
            let len = len as usize;
            let mut body = b[hn..b.len().min(hn + len)].to_vec();
            if masked {
                xor_key(&mut body, [b[hn - 4], b[hn - 3], b[hn - 2], b[hn - 1]]);
            }
            let whole = body.len() == len;
            if op <= 2 {
                payload.extend_from_slice(&body);
                open = !fin;
            }
            if !whole {
                break End::Cut("inside a frame");
            }
            match op {
                8 if len == 0 => break End::Close(None),
                8 => {
                    let code = u16::from_be_bytes([body[0], body[1]]);
                    let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
                        && std::str::from_utf8(&body[2..]).is_ok();
                    break End::Close(Some(if allowed { code } else { 1002 }));
                }
                9 => pings.push(body),
                _ => {}
            }
            at += hn + len;
        };
        Expected {
            payload,
            pings,
            end,
        }
    }

    /// How a case's bytes move: the pipe's capacity (each way), the
    /// largest piece the peer writes at once and the largest read.
    #[derive(Clone, Copy, Debug)]
    struct Moves {
        pipe: usize,
        write: usize,
        read: usize,
    }

    /// Says which case was running if a panic (in the test or in `WsIo`)
    /// unwinds through it.
    struct Running<'a>(&'a str);

    impl Drop for Running<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("panicked in {}", self.0);
            }
        }
    }

    /// Whatever the far end of the pipe has received, appended to `back`.
    fn drain_into(far: &mut DuplexStream, cx: &mut Context<'_>, back: &mut Vec<u8>) {
        let mut b = [0u8; 4096];
        loop {
            let mut rb = ReadBuf::new(&mut b);
            match Pin::new(&mut *far).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    back.extend_from_slice(rb.filled())
                }
                _ => return,
            }
        }
    }

    /// Read buffers for `read_once`, kept for the whole test: each starts
    /// out as junk, so a byte said to be read but not written shows, and
    /// what a read wrote is made junk again after it (copied from `junk`:
    /// `fill` goes byte by byte in a debug build).
    struct ReadBufs {
        init: Vec<u8>,
        uninit: Box<[std::mem::MaybeUninit<u8>]>,
        junk: Vec<u8>,
        junk_uninit: Box<[std::mem::MaybeUninit<u8>]>,
    }

    impl ReadBufs {
        const JUNK: u8 = 0xa5;
        const BEFORE: &[u8] = b"before";
        /// The largest read.
        const MAX: usize = 300_000;

        fn new() -> Self {
            let junk = vec![Self::JUNK; Self::BEFORE.len() + Self::MAX];
            let junk_uninit: Box<[_]> = junk
                .iter()
                .map(|&b| std::mem::MaybeUninit::new(b))
                .collect();
            ReadBufs {
                init: junk.clone(),
                uninit: junk_uninit.clone(),
                junk,
                junk_uninit,
            }
        }
    }

    /// One read of up to `size` bytes: into a buffer handed over
    /// initialised (`how` 0), handed over uninitialised as russh's are (1),
    /// or holding bytes already (2); the bytes read.
    fn read_once(
        ours: &mut WsIo<DuplexStream>,
        cx: &mut Context<'_>,
        bufs: &mut ReadBufs,
        how: usize,
        size: usize,
        ctx: &str,
    ) -> Poll<io::Result<Vec<u8>>> {
        let before = ReadBufs::BEFORE;
        match how {
            0 => {
                let mut rb = ReadBuf::new(&mut bufs.init[..size]);
                let r = Pin::new(ours).poll_read(cx, &mut rb);
                let read = rb.filled().to_vec();
                bufs.init[..read.len()].copy_from_slice(&bufs.junk[..read.len()]);
                ready!(r)?;
                Poll::Ready(Ok(read))
            }
            1 => {
                // Memory initialised after all (so reading the junk back
                // is sound), but handed over as if not.
                let mut rb = ReadBuf::uninit(&mut bufs.uninit[..size]);
                let r = Pin::new(ours).poll_read(cx, &mut rb);
                let read = rb.filled().to_vec();
                bufs.uninit[..read.len()].copy_from_slice(&bufs.junk_uninit[..read.len()]);
                ready!(r)?;
                Poll::Ready(Ok(read))
            }
            _ => {
                let mut rb = ReadBuf::new(&mut bufs.init[..before.len() + size]);
                rb.put_slice(before);
                let r = Pin::new(ours).poll_read(cx, &mut rb);
                let (was, read) = rb.filled().split_at(before.len());
                assert_eq!(was, before, "{ctx}: the read changed bytes before it");
                let read = read.to_vec();
                let n = before.len() + read.len();
                bufs.init[..n].copy_from_slice(&bufs.junk[..n]);
                ready!(r)?;
                Poll::Ready(Ok(read))
            }
        }
    }

    /// Writes `stream` into the far end of a pipe in random pieces (ending
    /// the pipe once all is in and the reader waits) while `WsIo`, our end
    /// in `role`, reads it in random pieces; then checks what came out and
    /// what went back against `expected_reading`. Every message names
    /// `ctx`.
    fn check_reading(
        ctx: &str,
        role: Role,
        stream: &[u8],
        moves: Moves,
        r: &mut Rng,
        bufs: &mut ReadBufs,
    ) -> usize {
        let _running = Running(ctx);
        let want = expected_reading(role, stream);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // Sometimes the first bytes came with the upgrade, read by the gate
        // before `WsIo` took over (see `Gate::early`; at most one read of
        // 4 KiB there).
        let early = if r.one_in(8) {
            r.range(0, stream.len().min(4096))
        } else {
            0
        };
        let (a, mut far) = tokio::io::duplex(moves.pipe);
        let mut gate = Gate::new(a, role);
        gate.early = BytesMut::from(&stream[..early]);
        let ws_role = match role {
            Role::Server => WsRole::Server,
            Role::Client => WsRole::Client,
        };
        let ws = WebSocketStream::from_raw_socket(gate, ws_role, None);
        let mut ours = WsIo::new(futures_util::FutureExt::now_or_never(ws).unwrap());
        let (mut sent, mut ended, mut got, mut back) = (early, false, Vec::new(), Vec::new());
        let mut polls = 0u64;
        let end = loop {
            polls += 1;
            assert!(polls < 10_000_000, "{ctx}: no end after {polls} polls");
            if sent < stream.len() {
                let n = r.range(1, moves.write).min(stream.len() - sent);
                let piece = &stream[sent..sent + n];
                if let Poll::Ready(w) = Pin::new(&mut far).poll_write(&mut cx, piece) {
                    sent += w.unwrap();
                }
            }
            drain_into(&mut far, &mut cx, &mut back);
            let (how, size) = (r.range(0, 2), r.range(1, moves.read));
            let read = read_once(&mut ours, &mut cx, bufs, how, size, ctx);
            assert!(
                ours.rbuf.capacity() <= READ_MAX + (64 << 10),
                "{ctx}: a read buffer of {} bytes",
                ours.rbuf.capacity()
            );
            match read {
                Poll::Pending if sent == stream.len() => {
                    assert!(!ended, "{ctx}: the read waits after the stream ended");
                    // All of the stream is read: every payload byte in it is
                    // out, and only a stream cut short leaves the reader
                    // waiting for more.
                    assert!(
                        matches!(want.end, End::Cut(_)),
                        "{ctx}: waits for more where the end is {:?}",
                        want.end
                    );
                    assert!(
                        got == want.payload,
                        "{ctx}: waits with {} of {} payload bytes out",
                        got.len(),
                        want.payload.len()
                    );
                    let shut = Pin::new(&mut far).poll_shutdown(&mut cx);
                    assert!(matches!(shut, Poll::Ready(Ok(()))), "{ctx}: {shut:?}");
                    ended = true;
                }
                Poll::Pending => {}
                Poll::Ready(Ok(b)) if b.is_empty() => break Ok(()),
                Poll::Ready(Ok(b)) => {
                    let at = got.len();
                    assert!(
                        want.payload.get(at..at + b.len()) == Some(&b[..]),
                        "{ctx}: {} bytes read at {at} are not the payload's there \
                         ({} payload bytes in all)",
                        b.len(),
                        want.payload.len()
                    );
                    got.extend_from_slice(&b);
                }
                Poll::Ready(Err(e)) => break Err(e),
            }
        };
        assert!(
            got == want.payload,
            "{ctx}: {} of {} payload bytes out before the end ({end:?})",
            got.len(),
            want.payload.len()
        );
        match (&want.end, &end) {
            (End::Close(_), Ok(())) => {}
            (End::Forbidden(why), Err(e))
                if e.kind() == io::ErrorKind::InvalidData
                    && why.iter().any(|w| e.to_string().contains(w.as_str())) => {}
            (End::Cut(why), Err(e))
                if e.kind() == io::ErrorKind::UnexpectedEof && e.to_string().contains(why) => {}
            (want, end) => panic!("{ctx}: the read ended with {end:?}, not {want:?}"),
        }
        // Nothing comes after the end, whatever follows in the stream: the
        // same end again.
        if sent < stream.len() {
            let _ = Pin::new(&mut far).poll_write(&mut cx, &stream[sent..]);
        }
        for _ in 0..3 {
            match read_once(&mut ours, &mut cx, bufs, 0, 1 << 16, ctx) {
                Poll::Ready(Ok(b)) if b.is_empty() => {
                    assert!(end.is_ok(), "{ctx}: a clean end after {end:?}")
                }
                Poll::Ready(Ok(b)) => panic!("{ctx}: {} bytes after {end:?}", b.len()),
                Poll::Ready(Err(e)) => assert!(end.is_err(), "{ctx}: {e} after a clean end"),
                Poll::Pending => panic!("{ctx}: a read waits after {end:?}"),
            }
        }
        if !matches!(want.end, End::Cut(_)) {
            let late = Pin::new(&mut ours).poll_write(&mut cx, b"late");
            assert!(
                matches!(&late, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe),
                "{ctx}: a write after a close: {late:?}"
            );
        }
        // What we sent back: pongs, then a close if the stream ended with
        // one (ours or the peer's), whole and masked as our role masks.
        let mut flushed = false;
        for _ in 0..100_000 {
            let flush = Pin::new(&mut ours).poll_flush(&mut cx);
            drain_into(&mut far, &mut cx, &mut back);
            if let Poll::Ready(f) = flush {
                f.unwrap_or_else(|e| panic!("{ctx}: the flush failed: {e}"));
                flushed = true;
                break;
            }
        }
        assert!(flushed, "{ctx}: the flush never ended");
        let (mut pongs, mut close, mut at) = (Vec::new(), None, 0);
        while at < back.len() {
            let b = &back[at..];
            assert!(close.is_none(), "{ctx}: we sent a frame after our close");
            assert!(
                matches!(b[0], 0x88 | 0x8a) && b.len() >= 2 && b[1] & 0x7f < 126,
                "{ctx}: we sent a frame starting {:x?}",
                &b[..b.len().min(2)]
            );
            let masked = b[1] & 0x80 != 0;
            assert_eq!(masked, role == Role::Client, "{ctx}: our frame's mask bit");
            let (hn, len) = (if masked { 6 } else { 2 }, usize::from(b[1] & 0x7f));
            assert!(b.len() >= hn + len, "{ctx}: our last frame is cut short");
            let p: Vec<u8> = b[hn..hn + len]
                .iter()
                .enumerate()
                .map(|(i, x)| x ^ if masked { b[2 + i % 4] } else { 0 })
                .collect();
            if b[0] == 0x8a {
                pongs.push(p);
            } else {
                close = Some(p);
            }
            at += hn + len;
        }
        // Pongs echo pings in order (only the latest one waiting is
        // answered, RFC 6455 5.5.3: some are skipped).
        let mut pings = want.pings.iter();
        for p in &pongs {
            assert!(
                pings.any(|q| q == p),
                "{ctx}: a pong of {} bytes that echoes no ping after the one before",
                p.len()
            );
        }
        match &want.end {
            End::Close(code) => assert_eq!(
                close,
                Some(code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec())),
                "{ctx}: our answer to the close"
            ),
            End::Forbidden(_) => assert_eq!(
                close,
                Some(1002u16.to_be_bytes().to_vec()),
                "{ctx}: our close after a protocol error"
            ),
            End::Cut(_) => {
                assert_eq!(close, None, "{ctx}: we closed a stream cut short");
                // Nothing ended the stream after the last ping: answered.
                assert_eq!(pongs.last(), want.pings.last(), "{ctx}: the last pong");
            }
        }
        ours.direct_reads
    }

    /// Random frame streams from a peer, valid and not (fragments of every
    /// length encoding's edges up to 200 KiB, pings and pongs, closes with
    /// allowed and forbidden codes, reserved bits, unknown opcodes, text,
    /// long or fragmented control frames, continuations out of place,
    /// lengths written longer than needed or over the bound, the wrong
    /// mask for the role, streams cut short anywhere), written into a pipe
    /// in random pieces and read by `WsIo` in both roles with reads of
    /// random sizes (some into a buffer handed over uninitialised, as
    /// russh's are), give what a plain reading of RFC 6455
    /// (`expected_reading`) says: the same payload bytes, all of them out
    /// before the reader waits or fails, then the same end (a clean one
    /// after a close, `InvalidData` naming the fault, `UnexpectedEof` for a
    /// stream cut short) and nothing after it; no panic, and no read buffer
    /// past its bound. What went back is checked too: pongs echoing pings
    /// in order (the last one answered when nothing ended the stream after
    /// it), then our answer to a close or a 1002 after a fault, last. The
    /// cases are deterministic and every message names its case:
    /// `TOWERCTL_WS_FUZZ_CASE=n` reruns case n alone,
    /// `TOWERCTL_WS_FUZZ_CASES=n` runs n cases instead of the usual number.
    #[test]
    fn random_frame_streams_come_out_as_a_plain_reading_of_rfc_6455_says() {
        let env = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
            })
        };
        let cases = match env("TOWERCTL_WS_FUZZ_CASE") {
            Some(n) => n..n + 1,
            None => 0..env("TOWERCTL_WS_FUZZ_CASES").unwrap_or(1000),
        };
        let mut bufs = ReadBufs::new();
        // Found by this test (see the fixes in `take_frame` and `poll_read`):
        // a close of one byte was taken before it was refused, so a read
        // after the error went on with the frames after it; and payload
        // handed out in the read that met a forbidden frame was dropped
        // with the error.
        let mut one_byte_close = Vec::new();
        put_frame(&mut one_byte_close, 0x88, 1, 0, None, &[3]);
        put_frame(&mut one_byte_close, 0x82, 3, 0, None, b"abc");
        let mut data_then_text = Vec::new();
        put_frame(&mut data_then_text, 0x82, 5, 0, None, b"hello");
        put_frame(&mut data_then_text, 0x81, 2, 0, None, b"hi");
        for (what, stream) in [
            ("a close of one byte", one_byte_close),
            ("data then text", data_then_text),
        ] {
            let moves = Moves {
                pipe: 1 << 16,
                write: 1 << 20,
                read: 1 << 16,
            };
            for seed in 0..4 {
                DUPLEX_PAIRS.with(|p| p.set(seed % 2 == 1));
                let ctx = format!("{what} (seed {seed}, pairs {})", seed % 2 == 1);
                let _ = check_reading(
                    &ctx,
                    Role::Client,
                    &stream,
                    moves,
                    &mut Rng(seed),
                    &mut bufs,
                );
            }
        }
        let (mut direct_reads, cases_run) = (0, cases.end - cases.start);
        for case in cases {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let role = if r.one_in(2) {
                Role::Server
            } else {
                Role::Client
            };
            let stream = random_frames(&mut r, role);
            // At most a few thousand pieces each way.
            let least = stream.len() / 1000 + 1;
            let moves = Moves {
                pipe: r.pick(&[1, 3, 64, 1000, 8192, 1 << 16, 1 << 20]).max(least),
                write: r.pick(&[1, 5, 100, 4096, 70_000, 1 << 20]).max(least),
                read: r
                    .pick(&[1, 2, 7, 100, 4099, 16_384, 1 << 16, ReadBufs::MAX])
                    .clamp(least, ReadBufs::MAX),
            };
            // Every other case reads as a socket does, straight into the
            // reader's buffer where it wants much (`ReadPair`).
            let pairs = case % 2 == 1;
            DUPLEX_PAIRS.with(|p| p.set(pairs));
            let ctx = format!(
                "case {case} (seed {seed:#018x}, {role:?}, {} bytes, {moves:?}, pairs {pairs}; \
                 TOWERCTL_WS_FUZZ_CASE={case} reruns it)",
                stream.len()
            );
            let direct = check_reading(&ctx, role, &stream, moves, &mut r, &mut bufs);
            assert!(
                pairs || direct == 0,
                "{ctx}: {direct} direct reads without pairs"
            );
            direct_reads += direct;
        }
        // Most cases are small; some read long payloads straight.
        assert!(
            direct_reads > 0 || cases_run < 100,
            "no direct read in {cases_run} cases"
        );
    }
}
