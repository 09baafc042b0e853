//! A byte stream over a WebSocket, for russh to run on.
//!
//! Reading goes through tungstenite (frame parsing, pings answered, close,
//! size limits). Writing does not: a write through tungstenite's message
//! API copied every byte twice (into a `Bytes` message, then into its frame
//! buffer) and allocated per write. [`WsIo`] frames its writes itself, under
//! tungstenite, through [`Gate`]: a hub's write (no mask) goes out as
//! header + the caller's bytes in one `writev`, an agent's is masked once
//! into a buffer kept for the session. The gate keeps every byte in order:
//! the rest of a frame the socket did not take whole goes out before
//! anything tungstenite writes after it (a pong, a close).
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

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Largest single WebSocket message we send; bigger writes are split so one
/// huge write does not become one huge frame buffered whole.
const MAX_MESSAGE: usize = 256 * 1024;

/// Most bytes the gate holds for tungstenite behind an unfinished frame
/// (pongs and a close are small; a peer pinging without reading gets
/// tungstenite's own back-pressure past this).
const MAX_QUEUED: usize = 64 * 1024;

/// Which end of the WebSocket this is: a client masks what it sends
/// (RFC 6455, section 5.3), a server must not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The hub.
    Server,
    /// The agent.
    Client,
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

/// Copies `src` into `dst` (as long) XORed with `mask`, in one pass.
fn copy_masked(dst: &mut [u8], src: &[u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let mut v = [0u8; 8];
        v.copy_from_slice(s);
        d.copy_from_slice(&(u64::from_ne_bytes(v) ^ word).to_ne_bytes());
    }
    for (i, (d, s)) in d.into_remainder().iter_mut().zip(s.remainder()).enumerate() {
        *d = s ^ mask[i % 4];
    }
}

/// The header of a final binary frame of `len` bytes, masked with `mask`
/// if given; and its length.
fn binary_header(len: usize, mask: Option<[u8; 4]>) -> ([u8; 14], usize) {
    let mut h = [0u8; 14];
    h[0] = 0x82; // FIN, binary
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
    /// An agent's masked frame, `masked[masked_at..masked_len]` still to
    /// go out. Allocated (and zeroed) once, at the size of the biggest
    /// frame so far, and kept: each frame is masked into it in one pass.
    masked: Vec<u8>,
    masked_len: usize,
    masked_at: usize,
    /// Accepted but not yet written, after the masked frame: the rest of
    /// a hub's frame the socket did not take whole, then anything
    /// tungstenite wrote behind an unfinished frame.
    out: Vec<u8>,
    out_at: usize,
}

impl<S> Gate<S> {
    pub fn new(io: S, role: Role) -> Self {
        Gate {
            io,
            role,
            masked: Vec::new(),
            masked_len: 0,
            masked_at: 0,
            out: Vec::new(),
            out_at: 0,
        }
    }

    /// Bytes accepted and not yet on the socket.
    fn queued(&self) -> usize {
        (self.masked_len - self.masked_at) + (self.out.len() - self.out_at)
    }
}

impl<S: AsyncWrite + Unpin> Gate<S> {
    /// Writes what is queued; Ready once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.masked_at < self.masked_len {
            let n = ready!(Pin::new(&mut self.io)
                .poll_write(cx, &self.masked[self.masked_at..self.masked_len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.masked_at += n;
        }
        self.masked_len = 0;
        self.masked_at = 0;
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        // Needed only when a write came up short (a hub holds thousands
        // of sessions): not kept.
        self.out = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends up to [`MAX_MESSAGE`] bytes of `buf` as one binary frame once
    /// everything accepted before has gone out; returns how many.
    fn poll_frame(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        let n = buf.len().min(MAX_MESSAGE);
        match self.role {
            Role::Client => {
                // Masking rewrites the bytes: once, into the kept buffer.
                let mask = rand::random::<[u8; 4]>();
                let (h, hn) = binary_header(n, Some(mask));
                if self.masked.len() < hn + n {
                    self.masked.resize(hn + n, 0);
                }
                self.masked[..hn].copy_from_slice(&h[..hn]);
                copy_masked(&mut self.masked[hn..hn + n], &buf[..n], mask);
                self.masked_len = hn + n;
                // Accepted whole; what the socket does not take now goes
                // out before anything else.
                if let Poll::Ready(Err(e)) = self.drain(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            Role::Server => {
                let (h, hn) = binary_header(n, None);
                let bufs = [io::IoSlice::new(&h[..hn]), io::IoSlice::new(&buf[..n])];
                // A socket that takes nothing now (full) still gets the
                // frame accepted, as tungstenite did: the next write waits
                // for it, and the read side goes on meanwhile.
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
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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

pub struct WsIo<S> {
    ws: WebSocketStream<Gate<S>>,
    /// Counts every message received: the peer is alive while it moves.
    alive: Liveness,
    /// Unread rest of the last binary message received.
    read_buf: Bytes,
    /// A flush was started and has not completed yet.
    flush_pending: bool,
    /// The peer sent Close or the stream ended.
    eof: bool,
    /// This side closed the WebSocket.
    shut: bool,
}

impl<S> WsIo<S> {
    /// What this stream has received so far, for keepalives
    /// (`tunnel::await_keepalive`).
    pub fn liveness(&self) -> Liveness {
        self.alive.clone()
    }

    pub fn new(ws: WebSocketStream<Gate<S>>) -> Self {
        WsIo {
            ws,
            alive: Liveness::default(),
            read_buf: Bytes::new(),
            flush_pending: false,
            eof: false,
            shut: false,
        }
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Flushes tungstenite's own frames into the gate and the gate onto the
    /// socket.
    fn drive_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(r) => {
                self.flush_pending = false;
                Poll::Ready(r.map_err(to_io))
            }
            Poll::Pending => {
                self.flush_pending = true;
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flush_pending || this.ws.get_ref().queued() > 0 {
            // Whatever is still going out is driven from here too; a
            // failed flush ends the read.
            if let Poll::Ready(Err(e)) = this.drive_flush(cx) {
                return Poll::Ready(Err(e));
            }
        }
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let next = ready!(Pin::new(&mut this.ws).poll_next(cx));
            this.alive.saw();
            match next {
                Some(Ok(Message::Binary(data))) => this.read_buf = data,
                // Pings are answered by tungstenite (through the gate,
                // after any frame of ours still going out).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected text message on the tunnel websocket",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Err(e)) => {
                    let e = to_io(e);
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        this.eof = true;
                    } else {
                        return Poll::Ready(Err(e));
                    }
                }
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
        // tungstenite's own frames (pongs, a close) go out first, whole.
        if this.flush_pending || this.ws.get_ref().queued() > 0 {
            ready!(this.drive_flush(cx))?;
        }
        let n = ready!(this.ws.get_mut().poll_frame(cx, buf))?;
        if this.ws.get_ref().queued() > 0 {
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
        this.shut = true;
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

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
            assert!(
                ours.ws.get_ref().queued() > 0,
                "{role:?}: the pipe took it all"
            );
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
        }
    }
}
