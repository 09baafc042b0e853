//! A channel opened with its first bytes, and the stream that gives them
//! back at the other end.
//!
//! An SSH channel carries no data before its open is confirmed, so a
//! request on a new channel costs two round trips to the peer: the open,
//! then the request. [`OpenWithFirst`] is the stream a client (hyper)
//! writes its request into before the channel exists: it gathers what is
//! written, up to a bound, and opens the channel at the first flush (or
//! once the bound is reached) with those bytes, which the caller puts in
//! the open itself; what follows goes on the channel. [`Prefixed`] is the
//! peer's side: the bytes from the open, read ahead of the channel's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Opening<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;
type Opener<S> = Box<dyn FnOnce(Vec<u8>) -> Opening<S> + Send>;

enum State<S> {
    /// Nothing opened yet: what was written so far, and how to open.
    Gathering {
        first: Vec<u8>,
        open: Opener<S>,
    },
    Opening(Opening<S>),
    Open(S),
    /// The open failed: every later call fails the same way.
    Failed(io::ErrorKind, String),
    /// Between two states (only inside a call).
    Taken,
}

/// A stream opened, with the first bytes written to it, when first
/// flushed (see the module's words). `open` is given the first bytes (at
/// most `max_first`, possibly none: a client that shuts down before
/// writing) and resolves to the opened stream. Polled from one task (as
/// hyper's connection polls its I/O): while the open runs, reads and
/// writes both wait on it, and only the last waker is kept.
pub struct OpenWithFirst<S> {
    state: State<S>,
    max_first: usize,
    /// A read waiting for the open, woken when it starts (a reader that
    /// polled before anything was written has no other wake-up).
    reader: Option<Waker>,
}

impl<S> OpenWithFirst<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new<F, Fut>(max_first: usize, open: F) -> Self
    where
        F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
    {
        OpenWithFirst {
            state: State::Gathering {
                first: Vec::new(),
                open: Box::new(move |first| Box::pin(open(first))),
            },
            max_first,
            reader: None,
        }
    }

    /// A stream opened already (nothing goes in its open).
    pub fn opened(stream: S) -> Self {
        OpenWithFirst {
            state: State::Open(stream),
            max_first: 0,
            reader: None,
        }
    }

    /// Starts the open (with what was gathered) unless it has started.
    fn start(&mut self) {
        if let State::Gathering { .. } = self.state {
            let State::Gathering { first, open } = std::mem::replace(&mut self.state, State::Taken)
            else {
                unreachable!()
            };
            self.state = State::Opening(open(first));
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
    }

    /// The opened stream, once the open has ended (starting it if need be).
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut S>> {
        self.start();
        if let State::Opening(f) = &mut self.state {
            match ready!(f.as_mut().poll(cx)) {
                Ok(s) => self.state = State::Open(s),
                Err(e) => self.state = State::Failed(e.kind(), e.to_string()),
            }
        }
        match &mut self.state {
            State::Open(s) => Poll::Ready(Ok(s)),
            State::Failed(kind, msg) => Poll::Ready(Err(io::Error::new(*kind, msg.clone()))),
            _ => unreachable!("the open has started"),
        }
    }
}

impl<S> AsyncWrite for OpenWithFirst<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Gathering { first, .. } = &mut this.state {
            let room = this.max_first - first.len();
            if room > 0 || buf.is_empty() {
                let n = room.min(buf.len());
                first.extend_from_slice(&buf[..n]);
                return Poll::Ready(Ok(n));
            }
        }
        let s = ready!(this.poll_open(cx))?;
        Pin::new(s).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Gathering { first, .. } = &this.state {
            if first.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        let s = ready!(this.poll_open(cx))?;
        Pin::new(s).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Gathering { first, .. } = &this.state {
            // Nothing to say: no channel is opened for it.
            if first.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        let s = ready!(this.poll_open(cx))?;
        Pin::new(s).poll_shutdown(cx)
    }
}

impl<S> AsyncRead for OpenWithFirst<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Gathering { .. } = this.state {
            // Nothing can come before something was sent.
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let s = ready!(this.poll_open(cx))?;
        Pin::new(s).poll_read(cx, buf)
    }
}

/// A stream read from `first` first: the bytes the channel's open
/// carried.
pub struct Prefixed<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(first: Vec<u8>, inner: S) -> Self {
        Prefixed {
            first,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            if self.at == self.first.len() {
                self.first = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An open recorded in `opens` (the first bytes it carried), giving
    /// one end of a duplex pipe and leaving the other in `far`.
    fn opener(
        opens: Arc<Mutex<Vec<Vec<u8>>>>,
        far: Arc<Mutex<Option<tokio::io::DuplexStream>>>,
        fail: bool,
    ) -> impl FnOnce(Vec<u8>) -> Pin<Box<dyn Future<Output = io::Result<tokio::io::DuplexStream>> + Send>>
    {
        move |first| {
            Box::pin(async move {
                opens.lock().unwrap().push(first);
                if fail {
                    return Err(io::Error::other("the agent refused the channel"));
                }
                let (a, b) = tokio::io::duplex(1 << 16);
                *far.lock().unwrap() = Some(b);
                Ok(a)
            })
        }
    }

    #[tokio::test]
    async fn the_first_flush_opens_with_what_was_written_and_the_rest_follows() {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let far = Arc::new(Mutex::new(None));
        let mut s = OpenWithFirst::new(10, opener(opens.clone(), far.clone(), false));
        s.write_all(b"GET / ").await.unwrap();
        assert!(opens.lock().unwrap().is_empty(), "opened before a flush");
        // Past the bound: the open goes with the first 10 bytes.
        s.write_all(b"HTTP/1.1\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(*opens.lock().unwrap(), vec![b"GET / HTTP".to_vec()]);
        let mut far = far.lock().unwrap().take().unwrap();
        let mut rest = [0u8; 8];
        far.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"/1.1\r\n\r\n");
        far.write_all(b"answer").await.unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer");
    }

    #[tokio::test]
    async fn a_read_before_any_write_waits_for_the_open_that_a_flush_starts() {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let far = Arc::new(Mutex::new(None));
        let s = OpenWithFirst::new(64, opener(opens.clone(), far.clone(), false));
        let (mut r, mut w) = tokio::io::split(s);
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await.map(|_| b)
        });
        tokio::task::yield_now().await;
        w.write_all(b"hi").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(*opens.lock().unwrap(), vec![b"hi".to_vec()]);
        let mut far_end = far.lock().unwrap().take().unwrap();
        far_end.write_all(b"ok").await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read was never woken")
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ok");
    }

    #[tokio::test]
    async fn a_failed_open_fails_every_later_call() {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let far = Arc::new(Mutex::new(None));
        let mut s = OpenWithFirst::new(64, opener(opens.clone(), far, true));
        s.write_all(b"GET").await.unwrap();
        let e = s.flush().await.unwrap_err();
        assert!(e.to_string().contains("refused the channel"), "{e}");
        assert!(s.write_all(b"x").await.is_err());
        assert!(s.read_u8().await.is_err());
        assert_eq!(opens.lock().unwrap().len(), 1, "opened once");
    }

    #[tokio::test]
    async fn nothing_written_opens_nothing() {
        let opens = Arc::new(Mutex::new(Vec::new()));
        let far = Arc::new(Mutex::new(None));
        let mut s = OpenWithFirst::new(64, opener(opens.clone(), far, false));
        s.flush().await.unwrap();
        s.shutdown().await.unwrap();
        assert!(opens.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_first_bytes_are_read_ahead_of_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut p = Prefixed::new(b"hello".to_vec(), a);
        let mut got = String::new();
        p.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
        let (a, _b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b"abc".to_vec(), a);
        let mut one = [0u8; 2];
        p.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"ab");
        p.read_exact(&mut one[..1]).await.unwrap();
        assert_eq!(&one[..1], b"c");
    }
}
