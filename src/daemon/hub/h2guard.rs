//! Frame budgets for the gateway's HTTP/2 connections, read beneath hyper.
//!
//! h2 bounds resets, CONTINUATION runs, header lists and windows, but not
//! how often a client may send frames that cost the hub work and bring the
//! client nothing: a SETTINGS frame that changes the initial window walks
//! every open stream (one connection with no token, 1,000 streams open
//! and SETTINGS toggling the window 0 ↔ 65,535, kept the hub's thread busy
//! and other operators' requests waited 8–18 s), and PING, PRIORITY,
//! unknown frame types and empty DATA frames each cost a wake and a parse
//! (40 such connections from one address: 1.4–2.5 s for everyone else).
//! Each connection gets a token bucket per kind, generous for any client
//! (one SETTINGS at start; Go and hyper clients ping once per interval or
//! round trip) and a connection past one is closed, said at info, a few
//! lines a minute. Until its first authenticated request a connection may
//! open [`PREAUTH_STREAMS`] streams, not h2's 1,000: a client without a
//! token had 1,000 requests served 401 on one connection before the
//! refusal count could close it.
//!
//! Reading is unchanged (the bytes pass as they are); only the 9-byte frame
//! headers are looked at, payloads skipped by their length.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Streams a connection may open before one of its requests carried a
/// valid token: above any client's first burst (kubectl's discovery, an
/// operator's informers starting their lists at once), far below h2's
/// 1,000.
pub const PREAUTH_STREAMS: u32 = 256;

/// The client connection preface (RFC 9113 §3.4), before the first frame.
const PREFACE_LEN: usize = 24;

/// A token bucket: `burst` frames at once, `per_sec` a second after.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Option<Instant>,
}

impl Bucket {
    const fn new(burst: f64, per_sec: f64) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
            at: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the budgets count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    Settings,
    Ping,
    /// PRIORITY, unknown frame types, and DATA or HEADERS frames that
    /// carry nothing and end nothing.
    Empty,
    /// RST_STREAM (h2 ignores one for a stream already closed) past any
    /// client's pace, and WINDOW_UPDATE before a valid token.
    Control,
}

impl Flood {
    pub fn words(self) -> &'static str {
        match self {
            Flood::Settings => "a SETTINGS flood (over 10 a second)",
            Flood::Ping => "a PING flood (over 500 a second)",
            Flood::Empty => "a flood of frames that carry nothing (over 500 a second)",
            Flood::Control => "a RST_STREAM or WINDOW_UPDATE flood",
        }
    }
}

/// What [`Budgets::feed`] lets through of what it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    All,
    /// The first this many bytes; the rest starts a new stream that waits
    /// until one of the connection's requests carried a valid token.
    Until(usize),
}

/// The frame budgets of one connection, fed the bytes the client sends.
#[derive(Debug)]
pub struct Budgets {
    preface: usize,
    header: [u8; 9],
    have: usize,
    skip: u64,
    settings: Bucket,
    ping: Bucket,
    empty: Bucket,
    resets: Bucket,
    window_updates: Bucket,
    streams: u32,
    authenticated: bool,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            preface: PREFACE_LEN,
            header: [0; 9],
            have: 0,
            skip: 0,
            settings: Bucket::new(100.0, 10.0),
            ping: Bucket::new(1000.0, 500.0),
            empty: Bucket::new(1000.0, 500.0),
            resets: Bucket::new(1000.0, 500.0),
            window_updates: Bucket::new(1000.0, 500.0),
            streams: 0,
            authenticated: false,
        }
    }
}

impl Budgets {
    /// Reads `bytes` (the next the client sent); `authenticated` is asked
    /// only for new streams, and only until it says yes. A new stream past
    /// [`PREAUTH_STREAMS`] before then is not read: the bytes from its
    /// frame on are to be fed again later (nothing of them was counted).
    pub fn feed(&mut self, bytes: &[u8], authenticated: impl Fn() -> bool) -> Result<Fed, Flood> {
        let mut at = 0;
        while at < bytes.len() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len() - at);
                self.preface -= n;
                at += n;
                continue;
            }
            if self.skip > 0 {
                let n = (self.skip.min((bytes.len() - at) as u64)) as usize;
                self.skip -= n as u64;
                at += n;
                continue;
            }
            let had = self.have;
            let n = (9 - self.have).min(bytes.len() - at);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[at..at + n]);
            self.have += n;
            if self.have < 9 {
                break;
            }
            let h = self.header;
            if h[3] == 0x1 && !self.may_open(&authenticated) {
                // Not read yet: the header as before this chunk.
                self.have = had;
                return Ok(Fed::Until(at));
            }
            at += n;
            self.have = 0;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
            self.skip = u64::from(len);
            self.frame(h[3], h[4], len, &authenticated)?;
        }
        Ok(Fed::All)
    }

    /// Whether a new stream (a HEADERS frame; trailers are counted alike)
    /// may be read now.
    fn may_open(&mut self, authenticated: &impl Fn() -> bool) -> bool {
        if self.authenticated {
            return true;
        }
        self.authenticated = authenticated();
        if self.authenticated {
            return true;
        }
        if self.streams >= PREAUTH_STREAMS {
            return false;
        }
        self.streams += 1;
        true
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        len: u32,
        authenticated: &impl Fn() -> bool,
    ) -> Result<(), Flood> {
        const END_STREAM: u8 = 0x1;
        // WINDOW_UPDATE: a client reading a large answer sends one for
        // every few KiB it reads (Go's every 4 KiB, per stream and for
        // the connection), tens of thousands a second on a fast link: held
        // to a budget only before a valid token.
        if kind == 0x8 && !self.authenticated {
            self.authenticated = authenticated();
        }
        let budget = match kind {
            // An empty DATA frame that ends nothing, PRIORITY, and the
            // types h2 reads and drops.
            0x0 if len == 0 && flags & END_STREAM == 0 => Some((&mut self.empty, Flood::Empty)),
            0x2 => Some((&mut self.empty, Flood::Empty)),
            k if k > 0x9 => Some((&mut self.empty, Flood::Empty)),
            0x3 => Some((&mut self.resets, Flood::Control)),
            // SETTINGS and PING, asked or answered (a client answers the
            // hub's one SETTINGS and one PING each 20 s).
            0x4 => Some((&mut self.settings, Flood::Settings)),
            0x6 => Some((&mut self.ping, Flood::Ping)),
            0x8 if !self.authenticated => Some((&mut self.window_updates, Flood::Control)),
            _ => None,
        };
        if let Some((bucket, flood)) = budget {
            if !bucket.take(Instant::now()) {
                return Err(flood);
            }
        }
        Ok(())
    }
}

/// How often a connection holding back a new stream looks again whether
/// one of its requests authenticated.
const HELD_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// A connection's IO with [`Budgets`] on what it reads: past one, its reads
/// fail (h2 then ends the connection); a stream past [`PREAUTH_STREAMS`]
/// before any valid token waits, unread, until there is one (the
/// pre-authentication deadline ends a connection that never has one).
pub struct H2Guard<T, A> {
    inner: T,
    budgets: Budgets,
    authenticated: A,
    /// Fed and admitted, not handed on yet (a read buffer too small).
    ready: Vec<u8>,
    /// Read but not fed: from a held stream's frame on.
    held: Vec<u8>,
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Said once, by the first read past a budget.
    tripped: Option<Flood>,
    on_trip: Option<Box<dyn FnOnce(Flood) + Send>>,
}

impl<T, A: Fn() -> bool> H2Guard<T, A> {
    pub fn new(inner: T, authenticated: A, on_trip: impl FnOnce(Flood) + Send + 'static) -> Self {
        H2Guard {
            inner,
            budgets: Budgets::default(),
            authenticated,
            ready: Vec::new(),
            held: Vec::new(),
            recheck: None,
            tripped: None,
            on_trip: Some(Box::new(on_trip)),
        }
    }

    /// Feeds `bytes`: how many may be handed on (the caller keeps the rest
    /// in `held`), or the flood that ends the connection.
    fn admit(&mut self, bytes: &[u8]) -> Result<usize, Flood> {
        match self.budgets.feed(bytes, &self.authenticated) {
            Ok(Fed::All) => Ok(bytes.len()),
            Ok(Fed::Until(n)) => Ok(n),
            Err(f) => {
                self.tripped = Some(f);
                if let Some(say) = self.on_trip.take() {
                    say(f);
                }
                Err(f)
            }
        }
    }

    /// Pending until [`HELD_RECHECK`] from now (to look again whether a
    /// request authenticated).
    fn wait_a_moment(&mut self, cx: &mut Context<'_>) {
        let sleep = self
            .recheck
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(HELD_RECHECK)));
        sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + HELD_RECHECK);
        // Polled to register the waker for the new deadline.
        let _ = std::future::Future::poll(sleep.as_mut(), cx);
    }
}

impl<T: AsyncRead + Unpin, A: Fn() -> bool + Unpin> AsyncRead for H2Guard<T, A> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(f) = this.tripped {
                return Poll::Ready(Err(io::Error::other(f.words())));
            }
            if !this.ready.is_empty() {
                let give = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..give]);
                this.ready.drain(..give);
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                // Held back for a token: handed on once a request had one.
                let mut held = std::mem::take(&mut this.held);
                let n = match this.admit(&held) {
                    Ok(n) => n,
                    Err(f) => return Poll::Ready(Err(io::Error::other(f.words()))),
                };
                this.held = held.split_off(n);
                if n == 0 {
                    this.wait_a_moment(cx);
                    return Poll::Pending;
                }
                this.recheck = None;
                this.ready = held;
                continue;
            }
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = r {
                let got = buf.filled().len() - before;
                let n = match this.admit(&buf.filled()[before..]) {
                    Ok(n) => n,
                    Err(f) => {
                        // What was read is not handed on: the connection ends.
                        buf.set_filled(before);
                        return Poll::Ready(Err(io::Error::other(f.words())));
                    }
                };
                if n < got {
                    this.held = buf.filled()[before + n..].to_vec();
                    buf.set_filled(before + n);
                    if n == 0 {
                        this.wait_a_moment(cx);
                        return Poll::Pending;
                    }
                }
            }
            return r;
        }
    }
}

impl<T: AsyncWrite + Unpin, A: Unpin> AsyncWrite for H2Guard<T, A> {
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

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[test]
    fn a_settings_flood_is_stopped_and_a_client_is_not() {
        let mut b = Budgets::default();
        let mut bytes = preface();
        bytes.extend(frame(0x4, 0, &[0, 4, 0, 0, 0, 0]));
        // A megabyte of DATA, fed a byte at a time, is one frame.
        bytes.extend(frame(0x0, 0, &vec![7; 1 << 20]));
        for chunk in bytes.chunks(1) {
            assert_eq!(b.feed(chunk, || true), Ok(Fed::All));
        }
        let toggle = frame(0x4, 0, &[0, 4, 0, 0, 255, 255]);
        let mut refused = None;
        for i in 0..1000 {
            if let Err(f) = b.feed(&toggle, || true) {
                refused = Some((i, f));
                break;
            }
        }
        let (i, f) = refused.expect("a flood of SETTINGS was taken");
        assert_eq!(f, Flood::Settings);
        assert!((90..=110).contains(&i), "{i}");
    }

    #[test]
    fn every_frame_that_costs_work_has_a_budget() {
        for (f, want, within) in [
            (frame(0x6, 0, &[0; 8]), Flood::Ping, 5_000),
            // Answers the hub never asked for, too.
            (frame(0x6, 0x1, &[0; 8]), Flood::Ping, 5_000),
            (frame(0x4, 0x1, &[]), Flood::Settings, 5_000),
            (frame(0xfa, 0, &[1; 100]), Flood::Empty, 5_000),
            (frame(0x2, 0, &[0; 5]), Flood::Empty, 5_000),
            (frame(0x0, 0, &[]), Flood::Empty, 5_000),
            (frame(0x3, 0, &[0, 0, 0, 8]), Flood::Control, 5_000),
            (frame(0x8, 0, &[0, 0, 0, 1]), Flood::Control, 5_000),
        ] {
            let mut b = Budgets::default();
            b.feed(&preface(), || false).unwrap();
            let stopped = (0..within).find_map(|_| b.feed(&f, || false).err());
            assert_eq!(stopped, Some(want), "{f:?}");
        }
        // A download's WINDOW_UPDATEs once a request had a valid token:
        // no budget.
        let mut b = Budgets::default();
        b.feed(&preface(), || true).unwrap();
        for _ in 0..100_000 {
            b.feed(&frame(0x8, 0, &[0, 0, 16, 0]), || true).unwrap();
        }
        // An empty DATA frame that ends its stream is a request's end.
        let mut b = Budgets::default();
        b.feed(&preface(), || true).unwrap();
        for _ in 0..5000 {
            b.feed(&frame(0x0, 0x1, &[]), || true).unwrap();
        }
    }

    #[test]
    fn streams_past_the_first_ones_wait_for_a_valid_token() {
        let headers = frame(0x1, 0x4, &[0x82]);
        let mut b = Budgets::default();
        b.feed(&preface(), || false).unwrap();
        for _ in 0..PREAUTH_STREAMS {
            assert_eq!(b.feed(&headers, || false), Ok(Fed::All));
        }
        // Held from its first byte, counted once it is read.
        let two = [headers.clone(), headers.clone()].concat();
        assert_eq!(b.feed(&two, || false), Ok(Fed::Until(0)));
        assert_eq!(b.feed(&two, || false), Ok(Fed::Until(0)));
        // Its header split across reads: held where this read's part starts.
        assert_eq!(b.feed(&headers[..4], || false), Ok(Fed::All));
        assert_eq!(b.feed(&headers[4..], || false), Ok(Fed::Until(0)));
        assert_eq!(b.feed(&headers[4..], || true), Ok(Fed::All));
        for _ in 0..5000 {
            assert_eq!(b.feed(&headers, || false), Ok(Fed::All));
        }
    }

    /// Through the IO: what follows the held stream is handed on, whole and
    /// in order, once a request authenticated.
    #[tokio::test]
    async fn held_bytes_go_on_in_order_once_a_request_authenticated() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut sent = preface();
        for i in 0..300u16 {
            sent.extend(frame(0x1, 0x4, &[0x82, i as u8]));
        }
        client.write_all(&sent).await.unwrap();
        let authed = Arc::new(AtomicBool::new(false));
        let a = authed.clone();
        let mut g = H2Guard::new(server, move || a.load(Ordering::Relaxed), |_| {});
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7000];
        let first = PREFACE_LEN + PREAUTH_STREAMS as usize * 11;
        while got.len() < first {
            let n = g.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), first);
        let more =
            tokio::time::timeout(std::time::Duration::from_millis(100), g.read(&mut buf)).await;
        assert!(more.is_err(), "read past the held stream: {more:?}");
        authed.store(true, Ordering::Relaxed);
        while got.len() < sent.len() {
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), g.read(&mut buf))
                .await
                .expect("held bytes never came")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, sent);
    }
}
