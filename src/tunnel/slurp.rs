//! A read side that drinks from the socket in big gulps while data streams
//! in, and holds no buffer while the connection is idle.
//!
//! A reader above that asks for little at a time (rustls reads its records
//! in small steps; tungstenite, which read the tunnel's frames until the
//! fourteenth session, read 8 KiB at a time) would cut a bulk stream into
//! small reads, each a system call. [`Slurp`] sits under it: small reads
//! go straight into the caller's buffer; once a read fills that buffer
//! (more is waiting), reads go into a buffer of our own that starts at
//! [`START`], doubles with every read that fills it up to [`MAX`], and is
//! handed out to the caller from memory. The buffer is freed whenever the
//! socket has nothing more to give and it is drained, and a short read
//! switches back to direct reads. [`Slurp::direct`] never gulps, for a
//! reader that reads in big steps itself.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer once reads fill the caller's buffer.
pub const START: usize = 32 * 1024;
/// Largest buffer: a few SSH packets per system call.
pub const MAX: usize = 256 * 1024;

pub struct Slurp<S> {
    inner: S,
    /// Read from the socket, not yet handed out.
    buf: BytesMut,
    /// Size of the next read into `buf`; 0 reads straight into the caller's.
    size: usize,
    /// Never gulps: the reader above reads in big steps itself.
    direct: bool,
}

impl<S> Slurp<S> {
    pub fn new(inner: S) -> Self {
        Slurp {
            inner,
            buf: BytesMut::new(),
            size: 0,
            direct: false,
        }
    }

    /// Reads pass straight through, whatever their size: for a reader that
    /// gulps itself (`WsIo` on a plain socket), where gulping here would
    /// only add a copy. A TLS stream reads its records in small steps and
    /// keeps gulping.
    pub fn direct(inner: S) -> Self {
        Slurp {
            direct: true,
            ..Slurp::new(inner)
        }
    }

    /// Bytes held for the caller plus the allocation behind them.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Slurp<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if this.size == 0 {
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                if out.filled().len() > before && out.remaining() == 0 && !this.direct {
                    // Filled: more is probably waiting; gulp from now on.
                    this.size = START;
                }
                return Poll::Ready(Ok(()));
            }
            if this.buf.capacity() < this.size {
                // Empty here: a new allocation of exactly `size` (reserve
                // could round a growing buffer up past MAX).
                this.buf = BytesMut::with_capacity(this.size);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Idle for now: hold nothing while waiting.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => {
                    if n >= this.size {
                        this.size = (this.size * 2).min(MAX);
                    } else if n < out.remaining() {
                        // Short: the stream slowed down; back to direct reads
                        // once this is handed out.
                        this.size = 0;
                    }
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && this.size == 0 {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// Pairs pass straight through while nothing is held here (a direct
/// `Slurp` never holds anything).
impl<S: super::ws::ReadPair> super::ws::ReadPair for Slurp<S> {
    fn pairs(&self) -> bool {
        self.buf.is_empty() && self.size == 0 && self.inner.pairs()
    }

    fn poll_read_pair(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut ReadBuf<'_>,
        second: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read_pair(cx, first, second)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slurp<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn gulps_while_data_streams_and_holds_nothing_when_idle() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = Slurp::new(rx);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut biggest = 0;
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            biggest = biggest.max(r.held());
        }
        assert_eq!(got, data, "bytes must come out whole and in order");
        assert!(
            biggest > 8192,
            "a bulk stream should be read in gulps, held at most {biggest}"
        );
        // Drained and waiting: nothing held.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut chunk)).await;
        assert!(pending.is_err(), "no data should be there");
        assert_eq!(r.held(), 0, "an idle reader must not hold its buffer");
        // A small message afterwards comes through, then end of stream.
        tx.write_all(b"ping").await.unwrap();
        drop(tx);
        let n = r.read(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..n], b"ping");
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
        assert_eq!(r.held(), 0);
    }

    #[tokio::test]
    async fn a_direct_slurp_never_gulps() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = Slurp::direct(rx);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        tx.write_all(&data).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            assert_eq!(r.held(), 0, "gulped into a buffer of its own");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
    }
}
