//! A byte stream over a WebSocket, for russh to run on.
//!
//! The tunnel's WebSocket carries one thing: the SSH byte stream, in binary
//! frames. This module frames it itself once the upgrade is done, instead
//! of going through tungstenite's messages: a message API copies every
//! write into a message, then again into a frame buffer, and every read
//! out of a zeroed frame buffer into a message and then into russh's buffer
//! (a quarter of the tunnel's CPU in bulk, measured with `perf`). Here a
//! write goes out as a frame header and the caller's bytes in one
//! `writev` (the hub, which does not mask), or masked into one reused
//! buffer (the agent: RFC 6455 has clients mask); a read copies a frame's
//! payload once, into the caller's buffer, unmasking it there. A frame is
//! streamed through, never held whole, so a peer announcing a huge frame
//! costs nothing (the length is still capped: [`WsIo::max_frame`]).
//!
//! What the WebSocket protocol still asks for is done here: pings are
//! answered with pongs, a close frame ends the stream (and is answered),
//! text frames and reserved bits fail it, the hub refuses unmasked frames
//! from agents. Fragmented messages are just more bytes of the stream.
//!
//! Writes are flushed eagerly: russh writes its version banner and then
//! waits to read the peer's without flushing (russh issue #193). Any bytes
//! left unwritten (socket full) are driven again from the read side, which
//! russh polls all the time.
//!
//! The handshake: the hub accepts with tungstenite (its header callback
//! decides who the client is) over a [`Lend`], and takes the socket back;
//! the agent speaks its side of it itself ([`client_handshake`]), so bytes
//! the hub sends right after its answer (its SSH banner) are kept.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest single frame we send; bigger writes are split.
const MAX_MESSAGE: usize = 256 * 1024;

/// Largest frame accepted by default (the hub sets its own).
pub const DEFAULT_MAX_FRAME: u64 = 1024 * 1024;

/// Unsent bytes past which pings are no longer answered.
const MAX_PONGS: usize = 64 * 1024;

/// The HTTP answer to the upgrade may be at most this long.
const MAX_HANDSHAKE: usize = 16 * 1024;

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

/// Which end of the WebSocket this is: clients mask what they send,
/// servers require it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The frame being read.
#[derive(Debug)]
enum Reading {
    /// Between frames.
    Header,
    /// Payload bytes left of a data frame, its mask and how far into it.
    Data {
        left: u64,
        mask: Option<[u8; 4]>,
        at: usize,
    },
}

pub struct WsIo<S> {
    io: S,
    role: Role,
    /// Counts every frame received: the peer is alive while it moves.
    alive: Liveness,
    /// Read from the socket, not handed out yet: frame headers, control
    /// frames, and data that came with them.
    rbuf: BytesMut,
    reading: Reading,
    max_frame: u64,
    /// Whole frames accepted and not yet written (headers, masked
    /// payloads, what a short write left, pongs, a close).
    out: Vec<u8>,
    out_at: usize,
    /// The peer sent Close or the stream ended.
    eof: bool,
    /// A close frame was queued (ours or the answer to the peer's).
    close_sent: bool,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("tunnel websocket: {what}"),
    )
}

/// XORs `data` with `mask`, starting `at` bytes into the mask's cycle.
fn apply_mask(data: &mut [u8], mask: [u8; 4], at: usize) {
    let key = [
        mask[at % 4],
        mask[(at + 1) % 4],
        mask[(at + 2) % 4],
        mask[(at + 3) % 4],
    ];
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A frame header: FIN set, `opcode`, `len`, and the mask if any.
fn header(opcode: u8, len: usize, mask: Option<[u8; 4]>) -> ([u8; 14], usize) {
    let mut h = [0u8; 14];
    h[0] = 0x80 | opcode;
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

/// A parsed frame header: FIN, opcode, payload length, mask, and its size.
struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
    size: usize,
}

/// Parses a frame header at the start of `b`; `None` while incomplete.
fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(bad(
            "a frame with reserved bits set (no extension was agreed)",
        ));
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0F;
    let masked = b[1] & 0x80 != 0;
    let (len, mut size) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if b.len() < size + 4 {
            return Ok(None);
        }
        let k = [b[size], b[size + 1], b[size + 2], b[size + 3]];
        size += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        len,
        mask,
        size,
    }))
}

impl<S> WsIo<S> {
    /// The tunnel's transport over `io`, an upgraded WebSocket connection;
    /// `leftover` is what was read past the handshake.
    pub fn new(io: S, role: Role, leftover: BytesMut) -> Self {
        WsIo {
            io,
            role,
            alive: Liveness::default(),
            rbuf: leftover,
            reading: Reading::Header,
            max_frame: DEFAULT_MAX_FRAME,
            out: Vec::new(),
            out_at: 0,
            eof: false,
            close_sent: false,
        }
    }

    /// Frames announcing more than `max` bytes fail the stream.
    pub fn max_frame(mut self, max: u64) -> Self {
        self.max_frame = max;
        self
    }

    /// What this stream has received so far, for keepalives
    /// (`tunnel::await_keepalive`).
    pub fn liveness(&self) -> Liveness {
        self.alive.clone()
    }

    fn mask(&self) -> Option<[u8; 4]> {
        (self.role == Role::Client).then(rand::random::<[u8; 4]>)
    }

    /// Queues a whole frame (control frames, and data when masking).
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        let (h, n) = header(opcode, payload.len(), mask);
        self.out.extend_from_slice(&h[..n]);
        let start = self.out.len();
        self.out.extend_from_slice(payload);
        if let Some(k) = mask {
            apply_mask(&mut self.out[start..], k, 0);
        }
    }
}

impl<S: AsyncWrite + Unpin> WsIo<S> {
    /// Writes what is queued; Ready once it is all out.
    fn drive_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out.clear();
        self.out_at = 0;
        // An agent masks every write into this buffer and keeps it; a hub
        // (thousands of sessions) uses it only when a write comes up short.
        let keep = if self.role == Role::Client {
            MAX_MESSAGE + 14
        } else {
            16 * 1024
        };
        if self.out.capacity() > keep {
            self.out = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Reads more of the socket into `rbuf`; Ready(0) at end of stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(4096);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Reads frame headers (and control frames) until a data frame with
    /// payload begins, the stream ends, or the socket has nothing more.
    fn next_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(h) = parse_header(&self.rbuf)? else {
                if self.rbuf.len() > 14 {
                    return Poll::Ready(Err(bad("a malformed frame header")));
                }
                if ready!(self.fill(cx))? == 0 {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                continue;
            };
            if h.len > self.max_frame {
                return Poll::Ready(Err(bad(&format!(
                    "a frame of {} bytes (at most {} are accepted)",
                    h.len, self.max_frame
                ))));
            }
            match (self.role, h.mask) {
                (Role::Server, None) => {
                    return Poll::Ready(Err(bad("an unmasked frame from the client")))
                }
                (Role::Client, Some(_)) => {
                    return Poll::Ready(Err(bad("a masked frame from the server")))
                }
                _ => {}
            }
            match h.opcode {
                OP_BINARY | OP_CONTINUATION => {
                    self.alive.saw();
                    self.rbuf.advance(h.size);
                    if h.len > 0 {
                        self.reading = Reading::Data {
                            left: h.len,
                            mask: h.mask,
                            at: 0,
                        };
                        return Poll::Ready(Ok(()));
                    }
                }
                OP_TEXT => return Poll::Ready(Err(bad("unexpected text message"))),
                OP_CLOSE | OP_PING | OP_PONG => {
                    if h.len > 125 || !h.fin {
                        return Poll::Ready(Err(bad("an oversized or fragmented control frame")));
                    }
                    let whole = h.size + h.len as usize;
                    while self.rbuf.len() < whole {
                        if ready!(self.fill(cx))? == 0 {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    self.alive.saw();
                    let mut payload = self.rbuf.split_to(whole).split_off(h.size);
                    if let Some(k) = h.mask {
                        apply_mask(&mut payload, k, 0);
                    }
                    match h.opcode {
                        // A peer that pings without reading the answers
                        // gets none past a bound (answering only the
                        // latest ping is allowed, RFC 6455 5.5.3).
                        OP_PING if !self.close_sent && self.out.len() - self.out_at < MAX_PONGS => {
                            self.queue(OP_PONG, &payload)
                        }
                        OP_CLOSE => {
                            if !self.close_sent {
                                self.close_sent = true;
                                let code = payload.get(..2).unwrap_or(&[0x03, 0xE8]).to_vec();
                                self.queue(OP_CLOSE, &code);
                            }
                            let _ = self.drive_out(cx);
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        _ => {}
                    }
                }
                other => {
                    return Poll::Ready(Err(bad(&format!("a frame with unknown opcode {other}"))))
                }
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
        if this.out_at < this.out.len() {
            // Errors surface on the next write; here we only make progress.
            if let Poll::Ready(Err(e)) = this.drive_out(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let Reading::Data { left, mask, at } = &mut this.reading else {
                ready!(this.next_data(cx))?;
                // A pong or close answer queued while reading goes out now.
                if this.out_at < this.out.len() {
                    if let Poll::Ready(Err(e)) = this.drive_out(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                continue;
            };
            let want = (*left).min(buf.remaining() as u64) as usize;
            let start = buf.filled().len();
            if !this.rbuf.is_empty() {
                let n = want.min(this.rbuf.len());
                buf.put_slice(&this.rbuf[..n]);
                this.rbuf.advance(n);
            } else {
                let mut part = buf.take(want);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
                let n = part.filled().len();
                if n == 0 {
                    // The stream ended inside a frame.
                    this.eof = true;
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                // SAFETY: `part` is the unfilled part of `buf`, and the
                // inner reader filled (so initialised) its first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
            }
            let got = buf.filled().len() - start;
            if let Some(k) = mask {
                apply_mask(&mut buf.filled_mut()[start..], *k, *at);
            }
            *at = (*at + got) % 4;
            *left -= got as u64;
            if *left == 0 {
                this.reading = Reading::Header;
            }
            return Poll::Ready(Ok(()));
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
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket closed",
            )));
        }
        ready!(this.drive_out(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_MESSAGE);
        if this.role == Role::Client {
            // Masking rewrites the bytes: into the one reused buffer.
            this.queue(OP_BINARY, &buf[..n]);
        } else {
            let (h, hn) = header(OP_BINARY, n, None);
            let bufs = [io::IoSlice::new(&h[..hn]), io::IoSlice::new(&buf[..n])];
            let wrote = match Pin::new(&mut this.io).poll_write_vectored(cx, &bufs) {
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            // What the socket did not take is kept, whole frames only.
            if wrote < hn {
                this.out.extend_from_slice(&h[wrote..hn]);
                this.out.extend_from_slice(&buf[..n]);
            } else if wrote < hn + n {
                this.out.extend_from_slice(&buf[wrote - hn..n]);
            }
            if this.out.is_empty() {
                return Poll::Ready(Ok(n));
            }
        }
        // Eager flush: see the module comment. Pending is fine; the waker
        // is registered and the read side keeps driving it.
        if let Poll::Ready(Err(e)) = this.drive_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drive_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.queue(OP_CLOSE, &1000u16.to_be_bytes());
        }
        match ready!(this.drive_out(cx)) {
            Ok(()) => {}
            // The peer is gone already: nothing more to say.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Poll::Ready(Ok(())),
            Err(e) => return Poll::Ready(Err(e)),
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A stream lent to tungstenite's server handshake and taken back after:
/// the hub keeps tungstenite's request parsing and its header callback.
pub struct Lend<S>(Option<S>);

impl<S> Lend<S> {
    pub fn new(io: S) -> Self {
        Lend(Some(io))
    }

    /// The stream, once the handshake is done.
    pub fn hand_back(&mut self) -> Option<S> {
        self.0.take()
    }

    fn get(&mut self) -> io::Result<&mut S> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream taken"))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lend<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()?).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Lend<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().get()?).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()?).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()?).poll_shutdown(cx)
    }
}

/// What a server said, as one line of plain ASCII (it is shown to
/// operators and logged): anything else becomes a space.
fn plain(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .collect()
}

/// Why the client's side of the upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server answered, but not with an upgrade: its status line (and
    /// the start of its body, made printable).
    #[error("HTTP error: {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused { status: String, body: String },
    #[error("{0}")]
    Protocol(String),
}

/// The client's side of the upgrade on `io`: sends the request for
/// `host_port` and `path_and_query` with `headers`, reads the answer,
/// and returns what was read past it (the server may start talking at
/// once).
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    host_port: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<BytesMut, HandshakeError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(rand::random::<[u8; 16]>());
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;
    let mut got = BytesMut::with_capacity(4096);
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if got.len() >= MAX_HANDSHAKE {
            return Err(HandshakeError::Protocol(format!(
                "the server's answer to the upgrade has no end of headers within {MAX_HANDSHAKE} bytes"
            )));
        }
        if io.read_buf(&mut got).await? == 0 {
            return Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during the WebSocket upgrade",
            )));
        }
    };
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(&got[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(HandshakeError::Protocol(
                "the server's answer to the upgrade is not HTTP".into(),
            ))
        }
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let status = format!("{code} {}", plain(resp.reason.unwrap_or(""), 100));
        let body = plain(
            &String::from_utf8_lossy(&got[end..got.len().min(end + 300)]),
            300,
        )
        .trim()
        .to_string();
        return Err(HandshakeError::Refused { status, body });
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let upgrade_ok = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let expected = {
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
        );
        b64.encode(digest.as_ref())
    };
    if !upgrade_ok || header("sec-websocket-accept").as_deref() != Some(expected.as_str()) {
        return Err(HandshakeError::Protocol(
            "the server answered 101 without a valid WebSocket upgrade (Upgrade, Sec-WebSocket-Accept)".into(),
        ));
    }
    Ok(got.split_off(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Writes `bytes` on one end and reads them whole on the other, both
    /// ways at once, over a pipe small enough to make writes short.
    async fn both_ways(
        a: &mut WsIo<tokio::io::DuplexStream>,
        b: &mut WsIo<tokio::io::DuplexStream>,
    ) {
        let sent = data(700_000);
        let (ra, wa) = (sent.clone(), sent.clone());
        let ((), got_b) = tokio::join!(
            async {
                for c in wa.chunks(33_333) {
                    a.write_all(c).await.unwrap();
                }
                a.flush().await.unwrap();
            },
            async {
                let mut got = vec![0u8; ra.len()];
                b.read_exact(&mut got).await.unwrap();
                got
            }
        );
        assert!(got_b == sent, "bytes must arrive whole and in order");
    }

    #[tokio::test]
    async fn bytes_cross_whole_in_both_directions_through_short_writes() {
        let (x, y) = tokio::io::duplex(1500);
        let mut client = WsIo::new(x, Role::Client, BytesMut::new());
        let mut server = WsIo::new(y, Role::Server, BytesMut::new());
        both_ways(&mut client, &mut server).await;
        both_ways(&mut server, &mut client).await;
    }

    #[tokio::test]
    async fn our_client_and_tungstenites_server_understand_each_other() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            // Talks first, right after its answer: kept by the client.
            ws.send(Message::Binary(b"banner".to_vec().into()))
                .await
                .unwrap();
            ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
            let mut got = Vec::new();
            while got.len() < 300_000 {
                match ws.next().await.unwrap().unwrap() {
                    Message::Binary(b) => got.extend_from_slice(&b),
                    Message::Pong(p) => assert_eq!(&p[..], b"p"),
                    other => panic!("unexpected {other:?}"),
                }
            }
            ws.send(Message::Binary(got.clone().into())).await.unwrap();
            ws.close(None).await.unwrap();
            // Until the client answers the close (its pong may come first).
            while let Some(Ok(_)) = ws.next().await {}
            got
        });
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let left = client_handshake(
            &mut tcp,
            &addr.to_string(),
            "/tunnel",
            &[("User-Agent", "t")],
        )
        .await
        .unwrap();
        let mut io = WsIo::new(tcp, Role::Client, left);
        let mut banner = [0u8; 6];
        io.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"banner");
        let sent = data(300_000);
        io.write_all(&sent).await.unwrap();
        io.flush().await.unwrap();
        let mut back = vec![0u8; sent.len()];
        io.read_exact(&mut back).await.unwrap();
        assert!(back == sent);
        // The server's close ends the stream.
        assert_eq!(io.read(&mut [0u8; 10]).await.unwrap(), 0);
        assert!(server.await.unwrap() == sent);
    }

    #[tokio::test]
    async fn tungstenites_client_and_our_server_understand_each_other() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut lent = Lend::new(tcp);
            let ws = tokio_tungstenite::accept_async(&mut lent).await.unwrap();
            drop(ws);
            let mut io = WsIo::new(lent.hand_back().unwrap(), Role::Server, BytesMut::new());
            let mut got = vec![0u8; 200_000];
            io.read_exact(&mut got).await.unwrap();
            io.write_all(&got).await.unwrap();
            io.shutdown().await.unwrap();
            // Until the client answers the close.
            while io.read(&mut [0u8; 64]).await.unwrap() > 0 {}
            got
        });
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/tunnel"))
            .await
            .unwrap();
        let sent = data(200_000);
        ws.send(Message::Ping(b"x".to_vec().into())).await.unwrap();
        for c in sent.chunks(50_000) {
            ws.send(Message::Binary(c.to_vec().into())).await.unwrap();
        }
        let mut back = Vec::new();
        let mut pong = false;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => back.extend_from_slice(&b),
                Some(Ok(Message::Pong(p))) => pong = &p[..] == b"x",
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(e)) => panic!("{e}"),
            }
        }
        drop(ws);
        assert!(back == sent, "echoed whole");
        assert!(pong, "a ping is answered");
        assert!(server.await.unwrap() == sent);
    }

    #[tokio::test]
    async fn the_server_refuses_what_the_protocol_forbids() {
        for (frame, why) in [
            (vec![0x82u8, 0x03, b'a', b'b', b'c'], "unmasked"),
            (vec![0x81u8, 0x80, 0, 0, 0, 0], "text"),
            (vec![0xC2u8, 0x80, 0, 0, 0, 0], "reserved"),
            (
                vec![0x82u8, 0xFF, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4],
                "bytes (at most",
            ),
        ] {
            let (mut x, y) = tokio::io::duplex(4096);
            let mut server = WsIo::new(y, Role::Server, BytesMut::new());
            x.write_all(&frame).await.unwrap();
            let e = server.read(&mut [0u8; 64]).await.unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }

    #[tokio::test]
    async fn a_peer_pinging_without_reading_the_pongs_holds_them_to_a_bound() {
        let (mut x, y) = tokio::io::duplex(4096);
        let mut server = WsIo::new(y, Role::Server, BytesMut::new());
        let ping = [0x89u8, 0x80 | 100, 9, 9, 9, 9];
        let mut flood = Vec::new();
        for _ in 0..5_000 {
            flood.extend_from_slice(&ping);
            flood.extend_from_slice(&[0u8; 100]);
        }
        // Then one data byte, masked with zeros.
        flood.extend_from_slice(&[0x82, 0x81, 0, 0, 0, 0, b'!']);
        let (_, got) = tokio::join!(async { x.write_all(&flood).await.unwrap() }, async {
            let mut b = [0u8; 8];
            let n = server.read(&mut b).await.unwrap();
            b[..n].to_vec()
        });
        assert_eq!(got, b"!");
        let held = server.out.len() - server.out_at;
        assert!(held <= MAX_PONGS + 200, "{held} bytes of pongs held");
    }

    #[test]
    fn masking_twice_gives_the_bytes_back_from_any_offset() {
        let orig = data(1001);
        let mut d = orig.clone();
        let k = [1, 2, 3, 4];
        apply_mask(&mut d[..13], k, 0);
        apply_mask(&mut d[13..], k, 13);
        for (i, b) in d.iter().enumerate() {
            assert_eq!(*b, orig[i] ^ k[i % 4]);
        }
    }

    #[tokio::test]
    async fn a_refused_upgrade_says_what_the_server_answered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = tcp.read(&mut b).await;
            tcp.write_all(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 9\r\n\r\nslow down")
                .await
                .unwrap();
        });
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let e = client_handshake(&mut tcp, &addr.to_string(), "/tunnel", &[])
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "HTTP error: 429 Too Many Requests: slow down"
        );
    }
}
