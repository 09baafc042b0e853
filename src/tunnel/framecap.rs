//! A tighter WebSocket frame limit until the SSH login is done.
//!
//! tungstenite, which read the tunnel's frames until the fourteenth
//! session, buffered a whole frame (and a whole fragmented message) before
//! handing it on, up to the configured maximum: an unauthenticated peer
//! that announced a big frame and sent all but its last byte made the hub
//! hold 1 MiB for it, and the admission caps allow thousands of such peers
//! (+1.9 GB in 4.5 s from one address). `ws::WsIo` now passes frames on as
//! they come and holds none whole, but nothing before login has a reason
//! to come near 1 MiB (SSH packets are at most ~35 KB), so the tighter
//! limit stays: [`FrameCap`] sits under the WebSocket reader, reads the
//! frame headers in the byte stream as they pass, and fails the read on a
//! frame or message longer than its limit, until [`FrameCap::lift`] is
//! called.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The frame and message limit before login.
pub const PRELOGIN_MAX: u64 = 64 * 1024;

#[derive(Debug)]
enum State {
    /// The HTTP upgrade request; how far its end is (`ws::head_end_after`).
    Http(u8),
    /// A frame header being read (2 to 14 bytes).
    Header { buf: [u8; 14], have: usize },
    /// Payload bytes left of the current frame.
    Payload(u64),
    /// A frame of this length, or its message, was over the limit: every
    /// read after it fails too (the header is not read on into `buf`).
    Refused(u64),
}

/// See the module documentation.
pub struct FrameCap<S> {
    inner: S,
    state: State,
    /// Bytes of the data message being assembled (fragments so far).
    message: u64,
    max: u64,
    on: Arc<AtomicBool>,
}

impl<S> FrameCap<S> {
    pub fn new(inner: S, max: u64) -> FrameCap<S> {
        FrameCap {
            inner,
            state: State::Http(0),
            message: 0,
            max,
            on: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Call to stop checking (the peer logged in); frames are then limited
    /// by tungstenite's own configuration only.
    pub fn lift(&self) -> impl Fn() + Send + Sync + 'static {
        let on = self.on.clone();
        move || on.store(false, Ordering::Relaxed)
    }

    /// Runs the bytes read through the state machine.
    fn check(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Http(seen) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    // The head ends as httparse ends it (`\n\n` too).
                    *seen = super::ws::head_end_after(*seen, b);
                    if *seen == super::ws::HEAD_DONE {
                        self.state = State::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                State::Payload(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                State::Refused(len) => return Err(over_limit(*len, self.max)),
                State::Header { buf, have } => {
                    buf[*have] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    let Some((fin, opcode, _, len, _)) = super::ws::header_fields(&buf[..*have])
                    else {
                        continue;
                    };
                    if opcode < 8 {
                        // Text, binary or continuation: part of a message.
                        self.message = self.message.saturating_add(len);
                    }
                    if len > self.max || self.message > self.max {
                        self.state = State::Refused(len);
                        return Err(over_limit(len, self.max));
                    }
                    if opcode < 8 && fin {
                        self.message = 0;
                    }
                    self.state = if len == 0 {
                        State::Header {
                            buf: [0; 14],
                            have: 0,
                        }
                    } else {
                        State::Payload(len)
                    };
                }
            }
        }
        Ok(())
    }
}

fn over_limit(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a WebSocket frame of {len} bytes before login (at most {max} then)"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameCap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if this.on.load(Ordering::Relaxed) {
                this.check(&buf.filled()[before..])?;
            }
        }
        r
    }
}

impl<S: super::ws::ReadPair> super::ws::ReadPair for FrameCap<S> {
    fn pairs(&self) -> bool {
        self.inner.pairs()
    }

    fn poll_read_pair(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut ReadBuf<'_>,
        second: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (a, b) = (first.filled().len(), second.filled().len());
        let r = self.inner.poll_read_pair(cx, first, second);
        if let Poll::Ready(Ok(())) = r {
            if self.on.load(Ordering::Relaxed) {
                // In the order they came.
                self.check(&first.filled()[a..])?;
                self.check(&second.filled()[b..])?;
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameCap<S> {
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

    fn frame(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&len.to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0u8, len.min(70_000) as usize));
        f
    }

    fn cap() -> FrameCap<()> {
        let mut c = FrameCap::new((), PRELOGIN_MAX);
        c.check(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        c
    }

    #[test]
    fn frames_within_the_limit_pass_in_any_split() {
        let mut c = cap();
        let mut bytes = frame(true, 2, 35_000);
        bytes.extend(frame(true, 9, 4));
        bytes.extend(frame(false, 2, 30_000));
        bytes.extend(frame(true, 0, 30_000));
        bytes.extend(frame(true, 2, 0));
        // Byte by byte, as a slow peer would send it.
        for b in &bytes {
            c.check(std::slice::from_ref(b)).unwrap();
        }
        let mut c = cap();
        c.check(&bytes).unwrap();
    }

    #[test]
    fn a_big_frame_or_message_fails_at_its_header() {
        let mut c = cap();
        let e = c.check(&frame(true, 2, 1_048_000)[..14]).unwrap_err();
        assert!(e.to_string().contains("1048000 bytes before login"), "{e}");
        let mut c = cap();
        assert!(c.check(&frame(true, 2, u64::MAX)[..14]).is_err());
        // Fragments adding up past the limit.
        let mut c = cap();
        c.check(&frame(false, 2, 40_000)).unwrap();
        assert!(c.check(&frame(false, 0, 40_000)[..8]).is_err());
    }

    /// Reads into two buffers at once (the WebSocket reader's straight
    /// reads) are checked as the socket's bytes in order: a frame over the
    /// limit whose header falls in the second buffer fails the read, one
    /// within it passes, and once lifted nothing is checked.
    #[tokio::test]
    async fn reads_into_two_buffers_are_checked_in_order() {
        use crate::tunnel::ws::ReadPair;
        use tokio::io::AsyncWriteExt;
        let head = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
        for (big, lifted) in [(false, false), (true, false), (true, true)] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut raw = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (tcp, _) = l.accept().await.unwrap();
            let mut c = FrameCap::new(tcp, PRELOGIN_MAX);
            let mut bytes = head.to_vec();
            bytes.extend(frame(true, 2, 1_000));
            bytes.extend(frame(true, 2, if big { 70_000 } else { 60_000 }));
            raw.write_all(&bytes).await.unwrap();
            raw.shutdown().await.unwrap();
            if lifted {
                c.lift()();
            }
            // The first buffer ends inside the first frame: the second
            // frame's header is read into the second buffer.
            let (mut a, mut b) = (vec![0u8; head.len() + 500], vec![0u8; 256 * 1024]);
            let mut total = 0;
            let failed = loop {
                let (mut first, mut second) = (ReadBuf::new(&mut a), ReadBuf::new(&mut b));
                let r = std::future::poll_fn(|cx| c.poll_read_pair(cx, &mut first, &mut second));
                match tokio::time::timeout(std::time::Duration::from_secs(5), r)
                    .await
                    .unwrap()
                {
                    Ok(()) if first.filled().is_empty() => break None,
                    Ok(()) => total += first.filled().len() + second.filled().len(),
                    Err(e) => break Some(e),
                }
            };
            match (big && !lifted, failed) {
                (true, Some(e)) => {
                    assert!(e.to_string().contains("70000 bytes before login"), "{e}")
                }
                (true, None) => panic!("a 70,000-byte frame before login passed"),
                (false, Some(e)) => panic!("big {big}, lifted {lifted}: {e}"),
                (false, None) => assert_eq!(total, bytes.len()),
            }
        }
    }

    use crate::testrng::Rng;

    /// The cases to run: `TOWERCTL_FRAMECAP_FUZZ_CASE=n` reruns case n
    /// alone, `TOWERCTL_FRAMECAP_FUZZ_CASES=n` runs n cases instead of
    /// `usual`.
    fn cases(usual: u64) -> std::ops::Range<u64> {
        let env = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
            })
        };
        match env("TOWERCTL_FRAMECAP_FUZZ_CASE") {
            Some(n) => n..n + 1,
            None => 0..env("TOWERCTL_FRAMECAP_FUZZ_CASES").unwrap_or(usual),
        }
    }

    /// Where a plain reading of HTTP/1.1 as httparse does it ends a head:
    /// empty lines (CRLF or bare LF) before the request line are skipped;
    /// then the head ends after the first line feed followed by a line
    /// feed, or by a carriage return and a line feed (an empty line).
    /// `None` when there is none.
    fn model_head_end(s: &[u8]) -> Option<usize> {
        let mut start = 0;
        loop {
            match &s[start..] {
                [b'\r', b'\n', ..] => start += 2,
                [b'\n', ..] => start += 1,
                _ => break,
            }
        }
        (start..s.len()).find_map(|i| match &s[i..] {
            [b'\n', b'\n', ..] => Some(i + 2),
            [b'\n', b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        })
    }

    /// Where `stream` must fail a read through a `FrameCap` of limit
    /// `max` that is never lifted: the offset of the last byte of the
    /// first frame header declaring a frame longer than `max`, or a data
    /// frame taking its message past `max`. Read from the whole stream at
    /// once (the cap goes read by read): the HTTP head (`model_head_end`),
    /// then frame after frame as RFC 6455 5.2 lays them out, lengths taken
    /// as written (also when longer than needed, and 64-bit ones with the
    /// top bit set). A message is the data frames (opcodes 0 to 7, control
    /// frames are 8 to 15) up to and with one with FIN set; frames RFC 6455
    /// forbids in a message (a new one before the last ended, a
    /// continuation with none open) are counted into it all the same, as
    /// the cap documents ("fragments so far"): `WsIo` refuses them anyway.
    fn model_failure(s: &[u8], max: u64) -> Option<usize> {
        let mut at = model_head_end(s)?;
        let mut message: u128 = 0;
        loop {
            let b = s.get(at..)?;
            let short = u64::from(*b.get(1)? & 0x7f);
            let (len, mut hlen) = match short {
                126 => (
                    u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
                    4,
                ),
                127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
                _ => (short, 2),
            };
            if b[1] & 0x80 != 0 {
                hlen += 4;
            }
            if b.len() < hlen {
                return None;
            }
            let (fin, data) = (b[0] & 0x80 != 0, b[0] & 0x08 == 0);
            if data {
                message += u128::from(len);
            }
            if len > max || message > u128::from(max) {
                return Some(at + hlen - 1);
            }
            if data && fin {
                message = 0;
            }
            at = usize::try_from(at as u128 + hlen as u128 + u128::from(len)).ok()?;
        }
    }

    /// Appends a frame header: the first byte `first` (FIN, RSV, opcode),
    /// the length `len` written in `width` (0: as short as it goes, 1: at
    /// least 16 bits, 2: 64 bits), a mask key if `masked`.
    fn put_header(out: &mut Vec<u8>, first: u8, len: u64, width: usize, masked: bool) {
        let key = masked.then_some([0x37, 0xfa, 0x21, 0x3d]);
        crate::testrng::push_ws_header(out, first, len, width, key);
    }

    /// An HTTP upgrade head as a client might write it: a request line and
    /// headers, lines ending in CRLF, or LF, or either, the blank line
    /// either way; now and then empty lines before the request line, which
    /// httparse skips. With `strict`, only what httparse takes in a
    /// request; without, header values with stray carriage returns and
    /// bytes of any kind but a line feed.
    fn random_head(r: &mut Rng, strict: bool) -> Vec<u8> {
        const TOKEN: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$&'*+.^_`|~";
        const PATH: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789/-._~?=&";
        let style = r.range(0, 2);
        let eol = |r: &mut Rng| -> &'static [u8] {
            match style {
                0 => b"\r\n",
                1 => b"\n",
                _ => r.pick(&[&b"\r\n"[..], b"\n"]),
            }
        };
        let mut h = Vec::new();
        if r.one_in(5) {
            for _ in 0..r.range(1, 4) {
                h.extend_from_slice(eol(r));
            }
        }
        h.extend_from_slice(b"GET /");
        let n = r.range(0, 30);
        h.extend(r.text(n, PATH));
        h.extend_from_slice(b" HTTP/1.1");
        h.extend_from_slice(eol(r));
        for _ in 0..r.range(0, 20) {
            let n = r.range(1, 20);
            h.extend(r.text(n, TOKEN));
            h.push(b':');
            let n = r.range(0, 60);
            let value: Vec<u8> = if strict {
                // Visible ASCII, spaces, tabs and obs-text.
                (0..n)
                    .map(|_| match r.range(0, 9) {
                        0 => b' ',
                        1 => b'\t',
                        2 => r.range(0x80, 0xff) as u8,
                        _ => r.range(0x21, 0x7e) as u8,
                    })
                    .collect()
            } else {
                (0..n)
                    .map(|_| match r.range(0, 5) {
                        0 => b'\r',
                        1 => b' ',
                        _ => loop {
                            let b = r.next() as u8;
                            if b != b'\n' {
                                break b;
                            }
                        },
                    })
                    .collect()
            };
            h.extend(value);
            h.extend_from_slice(eol(r));
        }
        h.extend_from_slice(eol(r));
        h
    }

    /// A data frame's length: at the length encodings' edges (125/126/127,
    /// 65535/65536), at the limit, what takes the open message (`message`
    /// bytes so far) to the limit, one byte either side of those, small,
    /// a few KiB, up to twice the limit, or 64-bit lengths up to the
    /// largest.
    fn random_data_len(r: &mut Rng, max: u64, message: u64) -> u64 {
        let near = |r: &mut Rng, x: u64| (x + r.range(0, 2) as u64).saturating_sub(1);
        match r.range(0, 13) {
            0 => 0,
            1 | 2 => r.range(1, 130) as u64,
            3 => r.range(123, 129) as u64,
            4 => r.range(65_533, 65_538) as u64,
            5 => near(r, max),
            6 | 7 => near(r, max.saturating_sub(message)),
            8 => r.range(0, 5_000) as u64,
            9 | 10 => r.range(5_000, 40_000) as u64,
            11 => r.range(0, 2 * max as usize + 2) as u64,
            _ => r.pick(&[1 << 32, (1 << 32) - 1, 1 << 63, u64::MAX, u64::MAX >> 1]),
        }
    }

    /// A random stream from a peer before login, and the limit to read it
    /// with (mostly `PRELOGIN_MAX`, else small and odd ones that sit on the
    /// length encodings' edges): an upgrade head (now and then noise, or
    /// cut short), then frames: data frames whole and in fragments, their
    /// lengths near the limit and the length encodings' edges, written
    /// shortest or longer, masked or not; pings, pongs and closes among
    /// them (now and then longer than 125 bytes or not final); text,
    /// reserved opcodes, a continuation with no message open or a new
    /// message inside one; a frame over the limit has its payload whole
    /// only now and then (it can be huge), else the stream ends inside
    /// it. Now and then noise at the end, or the stream cut anywhere.
    fn random_stream(r: &mut Rng, pattern: &[u8]) -> (Vec<u8>, u64) {
        let max = if r.one_in(4) {
            r.pick(&[0, 1, 124, 125, 126, 127, 1000, 65_535, 65_537])
        } else {
            PRELOGIN_MAX
        };
        let mut s = if r.one_in(10) {
            let n = r.range(0, 40);
            r.text(n, b"\r\n\r\n a:")
        } else {
            random_head(r, false)
        };
        let (mut open, mut message) = (false, 0u64);
        for _ in 0..r.range(0, 12) {
            let masked = r.one_in(2);
            let width = if r.one_in(6) { r.range(1, 2) } else { 0 };
            let (first, len) = match r.range(0, 9) {
                0 | 1 => {
                    let op = r.pick(&[8, 9, 10]) | if r.one_in(10) { 0 } else { 0x80 };
                    let len = if r.one_in(8) {
                        let any = r.range(126, 70_000) as u64;
                        r.pick(&[126, 127, max, max + 1, 65_536, any])
                    } else {
                        r.range(0, 125) as u64
                    };
                    (op, len)
                }
                2 => {
                    // Out of place: a continuation with no message open,
                    // a new message inside one, or a reserved opcode.
                    let op = r.pick(&[0, 1, 2, 3, 7]) | if r.one_in(2) { 0x80 } else { 0 };
                    let len = random_data_len(r, max, message);
                    (op, len)
                }
                _ => {
                    let op = if open { 0 } else { r.pick(&[1, 2, 2]) };
                    let fin = !r.one_in(3);
                    let len = random_data_len(r, max, message);
                    (op | if fin { 0x80 } else { 0 }, len)
                }
            };
            if first & 0x08 == 0 {
                message = message.saturating_add(len);
                open = first & 0x80 == 0;
                if !open {
                    message = 0;
                }
            }
            put_header(&mut s, first, len, width, masked);
            let whole = len <= 2 * PRELOGIN_MAX + 10 && (len <= max || r.one_in(3));
            let n = if whole {
                len as usize
            } else {
                r.range(0, (len as usize).min(3_000))
            };
            let from = r.range(0, pattern.len() - n);
            s.extend_from_slice(&pattern[from..from + n]);
            if !whole {
                break;
            }
        }
        if r.one_in(8) {
            let n = r.range(1, 30);
            s.extend(r.text(n, &[0x82, 0xff, 0x7f, 0x7e, 0, 0x88]));
        }
        if r.one_in(6) && !s.is_empty() {
            let cut = r.range(0, s.len() - 1);
            s.truncate(cut);
        }
        (s, max)
    }

    /// The socket under the cap: hands out the stream in pieces of random
    /// sizes up to `piece` (a read smaller than a piece takes its start),
    /// now and then not ready first.
    struct Pieces {
        stream: Vec<u8>,
        at: usize,
        left: usize,
        piece: usize,
        waited: bool,
        r: Rng,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            if this.at == this.stream.len() {
                return Poll::Ready(Ok(()));
            }
            if !this.waited && this.r.one_in(8) {
                this.waited = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.waited = false;
            if this.left == 0 {
                this.left = this.r.range(1, this.piece);
            }
            let n = this
                .left
                .min(buf.remaining())
                .min(this.stream.len() - this.at);
            buf.put_slice(&this.stream[this.at..this.at + n]);
            this.at += n;
            this.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    /// How a reading through the cap ended.
    #[derive(Debug, PartialEq)]
    enum Ending {
        /// Every byte read, then the end.
        Whole,
        /// A read failed, where the model says.
        Refused,
    }

    /// What the caller's buffer already holds before a read: the start of
    /// a frame header of 2^64 - 1 bytes (the cap must leave it alone).
    const CALLERS: [u8; 4] = [0x82, 0xff, 0xff, 0xff];

    /// One read through the cap; a panic in it names the case.
    fn poll_cap(
        ctx: &str,
        cap: &mut FrameCap<Pieces>,
        cx: &mut Context<'_>,
        rb: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = std::panic::AssertUnwindSafe(|| Pin::new(cap).poll_read(cx, rb));
        std::panic::catch_unwind(read).unwrap_or_else(|_| panic!("{ctx}: the cap panicked"))
    }

    /// Reads `stream` through a `FrameCap` of limit `max` (the socket
    /// under it handing the stream out in pieces of up to `piece` bytes)
    /// with reads of up to `read` bytes into `buf` after up to four bytes
    /// of the caller's, `lift` called before the first read from an offset
    /// past `lift_at`, and checks every read against the model (see the
    /// test below). `r` draws the sizes.
    #[allow(clippy::too_many_arguments)]
    fn read_capped(
        ctx: &str,
        stream: &[u8],
        max: u64,
        lift_at: Option<usize>,
        piece: usize,
        read: usize,
        r: &mut Rng,
        buf: &mut [u8],
    ) -> Ending {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let fail = model_failure(stream, max);
        let pieces = Pieces {
            stream: stream.to_vec(),
            at: 0,
            left: 0,
            piece,
            waited: false,
            r: Rng(r.next()),
        };
        let mut cap = FrameCap::new(pieces, max);
        let lift = cap.lift();
        let (mut at, mut lifted, mut waits) = (0, false, 0);
        loop {
            if !lifted && lift_at.is_some_and(|l| at >= l) {
                lift();
                lifted = true;
            }
            let pre = r.range(0, CALLERS.len());
            let want = r.range(1, read);
            let mut rb = ReadBuf::new(&mut buf[..pre + want]);
            rb.put_slice(&CALLERS[..pre]);
            let Poll::Ready(res) = poll_cap(ctx, &mut cap, &mut cx, &mut rb) else {
                waits += 1;
                assert!(waits < 100_000, "{ctx}: the cap waits for ever");
                continue;
            };
            assert_eq!(
                &rb.filled()[..pre],
                &CALLERS[..pre],
                "{ctx}: the caller's bytes"
            );
            let got = &rb.filled()[pre..];
            let n = got.len();
            assert_eq!(
                got,
                &stream[at..at + n],
                "{ctx}: bytes {at}..{} changed",
                at + n
            );
            let due = !lifted && fail.is_some_and(|f| (at..at + n).contains(&f));
            match res {
                Ok(()) if n == 0 => {
                    assert_eq!(at, stream.len(), "{ctx}: an end before the stream's");
                    assert!(lifted || fail.is_none(), "{ctx}: never failed");
                    return Ending::Whole;
                }
                Ok(()) => {
                    assert!(!due, "{ctx}: the read of bytes {at}..{} passed", at + n);
                    at += n;
                }
                Err(e) => {
                    assert!(due, "{ctx}: the read of bytes {at}..{} failed: {e}", at + n);
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{ctx}: {e}");
                    assert!(e.to_string().contains("before login"), "{ctx}: {e}");
                    at += n;
                    // The read after it: refused again, or the end.
                    let mut again = [0u8; 64];
                    let again = loop {
                        let mut rb = ReadBuf::new(&mut again);
                        if let Poll::Ready(res) = poll_cap(ctx, &mut cap, &mut cx, &mut rb) {
                            break res.map(|()| rb.filled().len());
                        }
                    };
                    match again {
                        Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{ctx}: {e}"),
                        Ok(n) => assert!(
                            n == 0 && at == stream.len(),
                            "{ctx}: {n} bytes handed out after the failure"
                        ),
                    }
                    return Ending::Refused;
                }
            }
        }
    }

    /// Random streams from a peer before login (`random_stream`: upgrade
    /// heads with random headers and line endings, then frames of lengths
    /// near the limit and the length encodings' edges, 125/126/127 and
    /// 65535/65536, written shortest or longer or in 64 bits, fragmented
    /// messages whose total crosses the limit, control frames among them,
    /// masked or not, cut anywhere), handed out by the socket in random
    /// pieces and read through a `FrameCap` with reads of random sizes
    /// (into buffers that already hold bytes of the caller's, which look
    /// like a huge frame's header and must be left alone), `lift` called
    /// before a random read or never: every byte read comes out unchanged,
    /// and the read fails (`InvalidData`) exactly when it holds the last
    /// byte of the header that a plain reading of the whole stream
    /// (`model_failure`) says takes a frame or message past the limit and
    /// the cap was not lifted before it; never before, never after a lift.
    /// A read after the failure fails too (or finds the end), and hands
    /// out nothing. The cases are deterministic and every message names its
    /// case: `TOWERCTL_FRAMECAP_FUZZ_CASE=n` reruns case n alone,
    /// `TOWERCTL_FRAMECAP_FUZZ_CASES=n` runs n cases instead of 1000.
    #[test]
    fn random_streams_fail_exactly_where_a_frame_or_message_passes_the_limit() {
        // The bytes that payloads are cut from: a period of 251 bytes, so
        // that a byte lost, doubled or moved shows.
        let pattern: Vec<u8> = (0..2 * PRELOGIN_MAX as usize + 300)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut buf = vec![0u8; (1 << 20) + CALLERS.len()];
        // Found by this test (see `State::Refused`): a read after a refused
        // frame whose header was 14 bytes long (a 64-bit length and a
        // mask key) panicked, writing its next byte past the header
        // buffer; shorter headers were read on and refused again.
        let mut long_header = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        put_header(&mut long_header, 0x82, 1 << 32, 2, true);
        long_header.extend_from_slice(&pattern[..100]);
        for (seed, piece) in [(0, 1), (1, 14), (2, 18 + 14), (3, 1 << 20)] {
            let ctx = format!("a refused 14-byte header, then more (seed {seed}, pieces {piece})");
            let mut r = Rng(seed);
            let end = read_capped(
                &ctx,
                &long_header,
                PRELOGIN_MAX,
                None,
                piece,
                64,
                &mut r,
                &mut buf,
            );
            assert_eq!(end, Ending::Refused, "{ctx}");
        }
        let (mut failed, mut lifted_past, mut whole) = (0, 0, 0);
        for case in cases(1000) {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let (stream, max) = random_stream(&mut r, &pattern);
            let fail = model_failure(&stream, max);
            // Lifted: never, before the first read, or about where the
            // failure is.
            let lift_at = match (r.range(0, 3), fail) {
                (0, _) => None,
                (1, _) => Some(0),
                (_, Some(f)) => Some((f + r.range(0, 40)).saturating_sub(20)),
                (_, None) => Some(r.range(0, stream.len())),
            };
            // At most a few thousand pieces and reads.
            let least = stream.len() / 1000 + 1;
            let piece = r
                .pick(&[1, 2, 3, 14, 100, 4096, 70_000, 1 << 20])
                .max(least);
            let read = r
                .pick(&[1, 2, 7, 14, 100, 4099, 65_536, 1 << 20])
                .clamp(least, 1 << 20);
            let ctx = format!(
                "case {case} (seed {seed:#018x}, {} bytes, limit {max}, fails at {fail:?}, \
                 lifted at {lift_at:?}, pieces {piece}, reads {read}; \
                 TOWERCTL_FRAMECAP_FUZZ_CASE={case} reruns it)",
                stream.len()
            );
            match read_capped(&ctx, &stream, max, lift_at, piece, read, &mut r, &mut buf) {
                Ending::Refused => failed += 1,
                Ending::Whole => {
                    whole += 1;
                    lifted_past += usize::from(fail.is_some());
                }
            }
        }
        // The cases cover both ends (for the usual number of them).
        if std::env::var_os("TOWERCTL_FRAMECAP_FUZZ_CASE").is_none() {
            assert!(
                failed > 100 && whole > 100 && lifted_past > 20,
                "{failed} failed, {whole} read whole, {lifted_past} of them past a lift"
            );
        }
    }

    /// Random upgrade heads (`random_head`: request lines and headers as a
    /// client may write them, lines ending in CRLF, LF or either, the
    /// blank line either way, now and then empty lines before the request
    /// line), with a frame after them, end for `ws::head_end_after`
    /// exactly where tungstenite's parser (httparse) ends them, and a
    /// `FrameCap` given them in random pieces is in the head until their
    /// last byte and at the start of a frame header right after it. Random
    /// byte soup heavy in CRs and LFs ends for `head_end_after` where the
    /// plain rule (`model_head_end`) says, or nowhere. Deterministic;
    /// `TOWERCTL_FRAMECAP_FUZZ_CASE=n` reruns case n alone,
    /// `TOWERCTL_FRAMECAP_FUZZ_CASES=n` runs n cases instead of 2000.
    #[test]
    fn random_upgrade_heads_end_where_tungstenite_ends_them() {
        use crate::tunnel::ws::{head_end_after, HEAD_DONE};
        use tokio_tungstenite::tungstenite::handshake::{machine::TryParse, server::Request};
        let end = |s: &[u8]| {
            let mut st = 0;
            s.iter()
                .position(|&b| {
                    st = head_end_after(st, b);
                    st == HEAD_DONE
                })
                .map(|i| i + 1)
        };
        for case in cases(2000) {
            let seed = Rng(case).next();
            let mut r = Rng(seed);
            let head = random_head(&mut r, true);
            let mut s = head.clone();
            put_header(&mut s, 0x82, 3, 0, true);
            s.extend_from_slice(b"\r\n\n");
            let ctx = format!(
                "case {case} (seed {seed:#018x}, head {:?}; TOWERCTL_FRAMECAP_FUZZ_CASE={case} \
                 reruns it)",
                String::from_utf8_lossy(&head)
            );
            let parsed = Request::try_parse(&s)
                .unwrap_or_else(|e| panic!("{ctx}: tungstenite refused the head: {e}"));
            assert_eq!(
                parsed.map(|p| p.0),
                Some(head.len()),
                "{ctx}: where tungstenite ends the head"
            );
            assert_eq!(
                end(&s),
                Some(head.len()),
                "{ctx}: where head_end_after ends it"
            );
            let mut cap = FrameCap::new((), PRELOGIN_MAX);
            let mut at = 0;
            while at < head.len() - 1 {
                let n = r.range(1, 20).min(head.len() - 1 - at);
                cap.check(&head[at..at + n]).unwrap();
                at += n;
            }
            assert!(
                matches!(cap.state, State::Http(_)),
                "{ctx}: {:?}",
                cap.state
            );
            cap.check(&head[at..]).unwrap();
            assert!(
                matches!(cap.state, State::Header { have: 0, .. }),
                "{ctx}: {:?} after the head",
                cap.state
            );
            let n = r.range(0, 60);
            let soup = r.text(n, b"\r\n\r\n\r\n a:");
            assert_eq!(
                end(&soup),
                model_head_end(&soup),
                "case {case}: soup {:?}",
                String::from_utf8_lossy(&soup)
            );
        }
    }
}
