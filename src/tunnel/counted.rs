//! A stream wrapper that counts bytes each way into shared counters, for
//! throughput figures. Relaxed atomics: the counters are statistics.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Arc<AtomicU64>, written: Arc<AtomicU64>) -> Self {
        Counted {
            inner,
            read,
            written,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

/// Bytes written out of the inner stream count as read from it.
impl<S: super::WriteInto> super::WriteInto for Counted<S> {
    fn poll_write_into<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
    ) -> Poll<std::io::Result<usize>> {
        let r = self.inner.poll_write_into(cx, w);
        if let Poll::Ready(Ok(n)) = r {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

/// Bytes taken as owned count as written.
impl<S: super::WriteBytes> super::WriteBytes for Counted<S> {
    fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &bytes::Bytes,
    ) -> Poll<std::io::Result<usize>> {
        let r = self.inner.poll_write_bytes(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that holds `G` (a stream slot, a window's share of a budget)
/// for as long as the stream itself lives: past an HTTP upgrade, hyper
/// hands the stream to the upgraded connection and ends the task that
/// drove it, so what that task held was given back while the upgraded
/// stream (exec, attach, port-forward) went on using it.
pub struct Holding<S, G> {
    inner: S,
    _held: G,
}

impl<S, G> Holding<S, G> {
    pub fn new(inner: S, held: G) -> Self {
        Holding { inner, _held: held }
    }
}

impl<S: AsyncRead + Unpin, G: Unpin> AsyncRead for Holding<S, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Holding<S, G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways() {
        let (a, mut b) = tokio::io::duplex(64);
        let (r, w) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut c = Counted::new(a, r.clone(), w.clone());
        c.write_all(b"hello").await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            (r.load(Ordering::Relaxed), w.load(Ordering::Relaxed)),
            (3, 5)
        );
    }
    #[tokio::test]
    async fn vectored_writes_stay_vectored_and_are_counted() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut far, _) = l.accept().await.unwrap();
        let (r, w) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut c = Counted::new(tcp, r, w.clone());
        assert!(
            c.is_write_vectored(),
            "a socket's vectored writes must pass through"
        );
        let bufs = [std::io::IoSlice::new(b"ab"), std::io::IoSlice::new(b"cde")];
        let n = c.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 5, "both slices in one write");
        assert_eq!(w.load(Ordering::Relaxed), 5);
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcde");
    }
}
