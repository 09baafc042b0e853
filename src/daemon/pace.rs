//! Answers held to what their connection has written: a body handed to
//! hyper yields its next piece only while hyper holds fewer than
//! [`PACE`] bytes of it unwritten.
//!
//! hyper's HTTP/1 writer queues an answer's pieces until its buffer limit,
//! which is also its limit on a request's head (one setting for both): the
//! agent's 128 KiB head limit let each answer whose reader stopped reading
//! (an operator's stalled HTTP/2 stream) hold up to 128 KiB in the agent,
//! besides what hyper read ahead of it. [`Paced`] counts what the body
//! gave and what the connection wrote ([`Drained`]) and waits for the
//! writes past `PACE`.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes of an answer hyper holds unwritten before its body is
/// asked for more.
pub const PACE: usize = 32 * 1024;

/// What one connection's answers gave and its writes took.
#[derive(Default)]
pub struct Pace {
    /// Body bytes given to hyper and not yet written (heads and chunk
    /// framing written are taken off too: it errs on the side of less).
    queued: AtomicUsize,
    waker: AtomicWaker,
}

impl Pace {
    pub fn new() -> Arc<Pace> {
        Arc::new(Pace::default())
    }

    fn wrote(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            })
            .unwrap_or(0);
        if before > PACE && before.saturating_sub(n) <= PACE {
            self.waker.wake();
        }
    }
}

/// A connection's stream, counting its writes into a [`Pace`].
pub struct Drained<S> {
    inner: S,
    pace: Arc<Pace>,
}

impl<S> Drained<S> {
    pub fn new(inner: S, pace: Arc<Pace>) -> Self {
        Drained { inner, pace }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Drained<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Drained<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.pace.wrote(n);
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
            self.pace.wrote(n);
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

/// An answer's body that waits while its connection holds more than
/// [`PACE`] bytes of it unwritten.
pub struct Paced<B> {
    inner: B,
    pace: Arc<Pace>,
}

impl<B> Paced<B> {
    pub fn new(inner: B, pace: Arc<Pace>) -> Self {
        Paced { inner, pace }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Paced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.pace.queued.load(Ordering::Acquire) > PACE {
            self.pace.waker.register(cx.waker());
            // Written meanwhile: go on.
            if self.pace.queued.load(Ordering::Acquire) > PACE {
                return Poll::Pending;
            }
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.pace.queued.fetch_add(d.len(), Ordering::AcqRel);
            }
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
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// A body of `n` pieces of 16 KiB.
    fn pieces(n: usize) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames = (0..n).map(|_| Ok(Frame::data(Bytes::from(vec![7u8; 16 * 1024]))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    /// What `body` gives until it waits 50 ms, and whether it ended.
    async fn given(body: &mut (impl Body<Data = Bytes> + Unpin)) -> (usize, bool) {
        let mut n = 0;
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(50), body.frame()).await {
                Ok(Some(f)) => n += f.ok().unwrap().into_data().ok().unwrap().len(),
                Ok(None) => return (n, true),
                Err(_) => return (n, false),
            }
        }
    }

    #[tokio::test]
    async fn a_body_waits_for_its_writes_past_the_pace() {
        let piece = 16 * 1024;
        let pace = Pace::new();
        let mut body = Paced::new(pieces(8), pace.clone());
        let (mut w, mut r) = tokio::io::duplex(1 << 20);
        let mut out = Drained::new(&mut w, pace.clone());
        // Nothing written: the body gives PACE and the piece past it, then waits.
        assert_eq!(given(&mut body).await, (PACE + piece, false));
        assert_eq!(
            given(&mut body).await,
            (0, false),
            "went on with nothing written"
        );
        // A write wakes it; it goes as far again.
        out.write_all(&vec![0u8; PACE + piece]).await.unwrap();
        assert_eq!(given(&mut body).await, (PACE + piece, false));
        out.write_all(&vec![0u8; PACE + piece]).await.unwrap();
        assert_eq!(given(&mut body).await, (2 * piece, true));
        let mut sink = vec![0u8; 2 * (PACE + piece)];
        tokio::io::AsyncReadExt::read_exact(&mut r, &mut sink)
            .await
            .unwrap();
    }

    #[test]
    fn writes_past_what_was_given_do_not_run_ahead() {
        let pace = Pace::default();
        // Heads and chunk framing: written with nothing queued.
        pace.wrote(10_000);
        assert_eq!(pace.queued.load(Ordering::Acquire), 0);
        pace.queued.store(PACE + 5, Ordering::Release);
        pace.wrote(100);
        assert_eq!(pace.queued.load(Ordering::Acquire), PACE - 95);
    }
}
