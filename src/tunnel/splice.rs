//! Copying both ways between two byte streams with buffers that cost
//! nothing while a connection is idle and grow only with throughput.
//!
//! tokio's `copy_bidirectional_with_sizes` allocates its two buffers up
//! front and keeps them for the connection's life: with the 256 KiB that
//! bulk transfers want, every held connection cost half a MiB per hop even
//! when it carried one small request an hour ago. Here a direction's buffer
//! is allocated when there is something to read (starting at
//! [`START`]), doubled each time a read fills it (up to [`MAX`]), and
//! released whenever the source has nothing more to give for now and the
//! buffer is drained. An idle connection therefore holds no copy buffer at
//! all, a request/response exchange uses small ones, and a bulk stream
//! quickly reaches the size that fills whole SSH packets and TLS records.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// First buffer of a direction: one read of a small request or response.
pub const START: usize = 16 * 1024;
/// Largest buffer: lets one read fill several 64 KiB SSH packets and 16 KiB
/// TLS records (tokio's 8 KiB default cuts bulk into small frames, each
/// paying framing, encryption set-up and a wake-up). Four whole packets
/// (just under 256 KiB): a full read goes out as four packets, not four
/// and a few bytes in a fifth (callgrind, 64 MiB each way: 0.5–1 % fewer
/// instructions than 256 KiB once the session's write buffer stopped
/// moving its leftover after every write the stream took).
pub const MAX: usize = 4 * super::MAX_PACKET as usize;

/// One direction of the copy.
struct Half {
    /// Read but not yet written bytes; empty capacity while idle.
    buf: BytesMut,
    /// Size of the next allocation.
    size: usize,
    read_done: bool,
    need_flush: bool,
    amt: u64,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: BytesMut::new(),
            size: START,
            read_done: false,
            need_flush: false,
            amt: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.buf.is_empty() && !self.read_done {
                if self.buf.capacity() < self.size {
                    // Reuses the drained allocation when it is big enough.
                    self.buf.reserve(self.size);
                }
                match tokio_util::io::poll_read_buf(reader.as_mut(), cx, &mut self.buf) {
                    Poll::Ready(Ok(0)) => {
                        self.read_done = true;
                        self.buf = BytesMut::new();
                    }
                    Poll::Ready(Ok(n)) => {
                        // A full read means more was waiting: grow for the next.
                        if n >= self.size && self.size < MAX {
                            self.size = (self.size * 2).min(MAX);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        // Nothing to read for now: an idle connection keeps
                        // no buffer. The size reached is kept, so a bulk
                        // stream that waits briefly resumes at full size.
                        self.buf = BytesMut::new();
                        return Poll::Pending;
                    }
                }
            }
            while !self.buf.is_empty() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero byte into writer",
                    )));
                }
                self.buf.advance(n);
                self.amt += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                self.need_flush = false;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

/// One direction of a splice: carrying (`H`, what it needs while it
/// runs), then shutting the writer down, then done with its byte count.
enum Dir<H> {
    Running(H),
    ShuttingDown(u64),
    Done(u64),
}

impl<H> Dir<H> {
    /// Drives the direction: `run` until it has carried everything
    /// (Ready with the byte count), then the writer's shutdown.
    fn poll<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        mut run: impl FnMut(&mut H, &mut Context<'_>, Pin<&mut W>) -> Poll<io::Result<u64>>,
    ) -> Poll<io::Result<u64>> {
        loop {
            match self {
                Dir::Running(h) => {
                    let n = ready!(run(h, cx, w.as_mut()))?;
                    *self = Dir::ShuttingDown(n);
                }
                Dir::ShuttingDown(n) => {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    *self = Dir::Done(*n);
                }
                Dir::Done(n) => return Poll::Ready(Ok(*n)),
            }
        }
    }
}

/// A stream that can write what it has received straight into a writer,
/// without a copy through a buffer of the caller's (a tunnel channel holds
/// what arrived as the SSH packets' own buffers).
pub trait WriteInto {
    /// One write of what is buffered into `w`; Ready(0) at the end of the
    /// stream, Pending when nothing is buffered (woken when something is)
    /// or `w` is full.
    fn poll_write_into<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<usize>>;
}

impl WriteInto for crate::tunnel::flow::FlowStream {
    fn poll_write_into<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        crate::tunnel::flow::FlowStream::poll_write_into(self, cx, w)
    }
}

/// A stream that takes owned bytes to send without copying them (a tunnel
/// channel: the bytes become the SSH message as they are).
pub trait WriteBytes {
    /// Like `poll_write`; after `Pending`, call again with the same bytes.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>>;
}

impl WriteBytes for crate::tunnel::flow::FlowStream {
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        crate::tunnel::flow::FlowStream::poll_write_bytes(self, cx, data)
    }
}

/// Reads shorter than this are copied out rather than handed over with
/// their buffer.
const SMALL_READ: usize = 4 * 1024;

/// One direction into a [`WriteBytes`] sink: each read is handed over as
/// owned bytes. A big read's buffer goes with its bytes (the next read gets
/// a new one); a small read is copied out, so that a few bytes never hold
/// a large buffer in the session's send queue, and the buffer is reused.
struct HalfBytes {
    buf: BytesMut,
    /// No buffer is held (nothing came since the last wait): the next read
    /// goes to the stack first, unless the stream is `bulk`.
    idle: bool,
    /// The last read filled what it read into: more than a request or a
    /// response comes at a time, and reads go to the buffer.
    bulk: bool,
    /// Read and not yet taken by the sink.
    pending: Bytes,
    size: usize,
    read_done: bool,
    need_flush: bool,
    amt: u64,
}

impl HalfBytes {
    fn new() -> HalfBytes {
        HalfBytes {
            buf: BytesMut::new(),
            idle: true,
            bulk: false,
            pending: Bytes::new(),
            size: START,
            read_done: false,
            need_flush: false,
            amt: 0,
        }
    }

    /// Nothing to read for now: idle, with no buffer kept (as in `Half`);
    /// what was written is flushed.
    fn wait<W>(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<u64>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        self.buf = BytesMut::new();
        self.idle = true;
        if self.need_flush {
            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: WriteBytes + AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.pending.is_empty() && !self.read_done && self.idle && !self.bulk {
                // Most reads after a wait are one small request or
                // response: read on the stack, and it costs one allocation
                // of its size instead of a START buffer allocated and freed
                // around it. A full read means more is coming: the buffer,
                // also after the next wait, until a read is small again
                // (a bulk stream waits often, and its reads stay big).
                let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ];
                let mut rb = tokio::io::ReadBuf::uninit(&mut stack);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => self.read_done = true,
                    Poll::Ready(Ok(())) => {
                        self.bulk = rb.filled().len() == SMALL_READ;
                        self.idle = !self.bulk;
                        self.pending = Bytes::copy_from_slice(rb.filled());
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return self.wait(cx, writer),
                }
            } else if self.pending.is_empty() && !self.read_done {
                if self.buf.capacity() < self.size {
                    self.buf.reserve(self.size);
                }
                match tokio_util::io::poll_read_buf(reader.as_mut(), cx, &mut self.buf) {
                    Poll::Ready(Ok(0)) => {
                        self.read_done = true;
                        self.buf = BytesMut::new();
                    }
                    Poll::Ready(Ok(n)) => {
                        self.bulk = n >= SMALL_READ;
                        if n >= self.size && self.size < MAX {
                            self.size = (self.size * 2).min(MAX);
                        }
                        if n < SMALL_READ {
                            self.pending = Bytes::copy_from_slice(&self.buf);
                            self.buf.clear();
                        } else {
                            self.pending = self.buf.split().freeze();
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return self.wait(cx, writer),
                }
            }
            while !self.pending.is_empty() {
                let n = ready!(writer.poll_write_bytes(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.amt += n as u64;
                self.need_flush = true;
            }
            // Sent: the (empty) handle would keep the whole buffer alive.
            self.pending = Bytes::new();
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.need_flush = false;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

/// The direction out of a [`WriteInto`] source while it runs.
#[derive(Default)]
struct OutOf {
    amt: u64,
    need_flush: bool,
}

impl OutOf {
    /// Writes what `a` holds into `w` until `a` ends (then flushed);
    /// flushes whenever `a` has nothing more for now.
    fn poll_copy<A, W>(
        &mut self,
        cx: &mut Context<'_>,
        a: &mut A,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        A: WriteInto + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match a.poll_write_into(cx, w.as_mut()) {
                Poll::Ready(Ok(0)) => {
                    ready!(w.as_mut().poll_flush(cx))?;
                    return Poll::Ready(Ok(self.amt));
                }
                Poll::Ready(Ok(n)) => {
                    self.amt += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// [`splice`] with `a` a tunnel channel: what `a` received goes into `b`
/// from the buffers it arrived in ([`WriteInto`]), and what is read from
/// `b` goes to `a` as owned bytes ([`WriteBytes`]): no copy through a
/// splice buffer either way. Returns bytes a→b and b→a.
pub async fn splice_from<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: WriteInto + WriteBytes + AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Dir::Running(OutOf::default());
    let mut b_to_a = Dir::Running(HalfBytes::new());
    poll_fn(|cx| {
        let ab = a_to_b.poll(cx, Pin::new(&mut *b), |h, cx, w| {
            h.poll_copy(cx, &mut *a, w)
        })?;
        let ba = b_to_a.poll(cx, Pin::new(&mut *a), |h, cx, w| {
            h.poll_copy(cx, Pin::new(&mut *b), w.get_mut())
        })?;
        let ab = ready!(ab);
        let ba = ready!(ba);
        Poll::Ready(Ok((ab, ba)))
    })
    .await
}

/// Copies both ways until both sides are done; returns bytes a→b and b→a.
/// When one side reaches end of file, the other is shut down for writing
/// and the copy goes on the other way, as with tokio's
/// `copy_bidirectional`.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Dir::Running(Half::new());
    let mut b_to_a = Dir::Running(Half::new());
    poll_fn(|cx| {
        let ab = a_to_b.poll(cx, Pin::new(&mut *b), |h, cx, w| {
            h.poll_copy(cx, Pin::new(&mut *a), w)
        })?;
        let ba = b_to_a.poll(cx, Pin::new(&mut *a), |h, cx, w| {
            h.poll_copy(cx, Pin::new(&mut *b), w)
        })?;
        let ab = ready!(ab);
        let ba = ready!(ba);
        Poll::Ready(Ok((ab, ba)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut a, mut a_far) = tokio::io::duplex(64 * 1024);
        let (mut b, mut b_far) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move { splice(&mut a_far, &mut b_far).await });
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let want = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&big).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes changed in transit");
        b.write_all(b"pong").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"pong");
        let (ab, ba) = task.await.unwrap().unwrap();
        assert_eq!((ab, ba), (3_000_000, 4));
    }

    #[tokio::test]
    async fn buffers_grow_with_throughput_and_go_when_idle() {
        let mut h = Half::new();
        let data = vec![7u8; 1024 * 1024];
        let mut reader: &[u8] = &data;
        let mut sink = Vec::new();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let r = h.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(r, Poll::Ready(Ok(n)) if n == 1024 * 1024));
        assert_eq!(h.size, MAX, "a bulk read grows the buffer to the maximum");
        assert_eq!(sink.len(), data.len());

        // A source with nothing to give: the buffer is released.
        let mut h = Half::new();
        let (mut idle, _keep) = tokio::io::duplex(1024);
        let r = h.poll_copy(&mut cx, Pin::new(&mut idle), Pin::new(&mut sink));
        assert!(r.is_pending());
        assert_eq!(h.buf.capacity(), 0, "an idle direction holds no buffer");
        assert_eq!(h.size, START);
    }
    /// A [`WriteInto`] source of fixed bytes (handed out 5,000 at a time),
    /// reading and writing the other way through `back`.
    struct Source {
        data: Vec<u8>,
        at: usize,
        back: tokio::io::DuplexStream,
    }

    impl WriteInto for Source {
        fn poll_write_into<W: AsyncWrite + ?Sized>(
            &mut self,
            cx: &mut Context<'_>,
            w: Pin<&mut W>,
        ) -> Poll<io::Result<usize>> {
            let end = (self.at + 5000).min(self.data.len());
            if self.at == end {
                return Poll::Ready(Ok(0));
            }
            let n = ready!(w.poll_write(cx, &self.data[self.at..end]))?;
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    /// Takes at most 3,000 bytes a call, so that owned bytes are handed
    /// over in pieces.
    impl WriteBytes for Source {
        fn poll_write_bytes(
            &mut self,
            cx: &mut Context<'_>,
            data: &Bytes,
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(3000);
            Pin::new(&mut self.back).poll_write(cx, &data[..n])
        }
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.back).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Source {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.back).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.back).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.back).poll_shutdown(cx)
        }
    }

    /// Polled by hand, outside a runtime: tokio's cooperative budget would
    /// make the pipes return `Pending` after a while.
    #[test]
    fn a_small_read_after_a_wait_takes_no_buffer_and_a_big_one_comes_whole() {
        use futures_util::FutureExt;
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (back, mut back_far) = tokio::io::duplex(1 << 20);
        let mut sink = Source {
            data: Vec::new(),
            at: 0,
            back,
        };
        let (mut far, mut near) = tokio::io::duplex(1 << 20);
        let mut h = HalfBytes::new();
        let mut got = Vec::new();
        let mut expect = Vec::new();
        for round in 0..3u8 {
            // A request, then a burst several reads long, each after a wait.
            for len in [18usize, 3 * SMALL_READ + 123] {
                let msg: Vec<u8> = (0..len).map(|i| (i as u8) ^ round).collect();
                far.write_all(&msg).now_or_never().unwrap().unwrap();
                expect.extend_from_slice(&msg);
                let r = h.poll_copy(&mut cx, Pin::new(&mut near), &mut sink);
                assert!(r.is_pending(), "the direction ended: {r:?}");
                assert!(h.idle, "a direction waiting for bytes is not idle");
                assert_eq!(h.buf.capacity(), 0, "a waiting direction holds a buffer");
                let mut b = vec![0u8; 1 << 16];
                while let Some(Ok(n)) = back_far.read(&mut b).now_or_never() {
                    got.extend_from_slice(&b[..n]);
                    if got.len() == expect.len() {
                        break;
                    }
                }
                assert!(
                    got == expect,
                    "bytes lost or reordered in round {round}, {len} bytes"
                );
            }
        }
        drop(far);
        let r = h.poll_copy(&mut cx, Pin::new(&mut near), &mut sink);
        assert!(matches!(r, Poll::Ready(Ok(n)) if n == expect.len() as u64));
    }

    #[tokio::test]
    async fn a_write_into_source_is_carried_whole_then_ended() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (back, mut back_far) = tokio::io::duplex(1024);
        let mut a = Source {
            data: data.clone(),
            at: 0,
            back,
        };
        let (mut b, mut b_far) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move { splice_from(&mut a, &mut b).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
        let up2 = up.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b_far.read_to_end(&mut got).await.unwrap();
            b_far.write_all(&up2).await.unwrap();
            b_far.shutdown().await.unwrap();
            got
        });
        let back_reader = tokio::spawn(async move {
            let mut back = Vec::new();
            back_far.read_to_end(&mut back).await.unwrap();
            back
        });
        let got = reader.await.unwrap();
        assert!(
            got == data,
            "bytes changed in transit or the end was not passed on"
        );
        let back = back_reader.await.unwrap();
        assert!(
            back == up,
            "bytes the other way changed or the end was lost"
        );
        assert_eq!(task.await.unwrap().unwrap(), (1_000_000, 300_000));
    }
}
