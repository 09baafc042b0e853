//! A byte stream over a WebSocket, for russh to run on.
//!
//! Why not tokio-util's `SinkWriter` or a `split()` sink: russh writes its
//! version banner and then waits to read the peer's without flushing
//! (russh issue #193). Adapters that only flush on `poll_flush` hold the
//! banner back and both peers hang in the handshake. This adapter owns the
//! `WebSocketStream`, sends every write as one binary message and drives the
//! flush eagerly; any flush left pending (socket full) is driven again from
//! the read side, which russh polls all the time.

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

pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// Counts every message received: the peer is alive while it moves.
    alive: Liveness,
    /// Unread rest of the last binary message received.
    read_buf: Bytes,
    /// A flush was started and has not completed yet.
    flush_pending: bool,
    /// The peer sent Close or the stream ended.
    eof: bool,
}

impl<S> WsIo<S> {
    /// What this stream has received so far, for keepalives
    /// (`tunnel::await_keepalive`).
    pub fn liveness(&self) -> Liveness {
        self.alive.clone()
    }

    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsIo {
            ws,
            alive: Liveness::default(),
            read_buf: Bytes::new(),
            flush_pending: false,
            eof: false,
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
        if this.flush_pending {
            // Errors surface on the next write; here we only make progress.
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
                // Pings are answered by tungstenite on the next flush.
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
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_MESSAGE);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        // Eager flush: see the module comment. Pending is fine; the waker
        // is registered and the read side keeps driving it.
        if let Poll::Ready(Err(e)) = this.drive_flush(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().drive_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
