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
    /// More streams than [`PREAUTH_STREAMS`] before a valid token.
    Unauthenticated,
}

impl Flood {
    pub fn words(self) -> &'static str {
        match self {
            Flood::Settings => "a SETTINGS flood (over 10 a second)",
            Flood::Ping => "a PING flood (over 500 a second)",
            Flood::Empty => "a flood of frames that carry nothing (over 500 a second)",
            Flood::Unauthenticated => "over 256 streams before any request with a valid token",
        }
    }
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
            streams: 0,
            authenticated: false,
        }
    }
}

impl Budgets {
    /// Reads `bytes` (the next the client sent); `authenticated` is asked
    /// only for new streams, and only until it says yes.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        authenticated: impl Fn() -> bool,
    ) -> Result<(), Flood> {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                break;
            }
            self.have = 0;
            let h = self.header;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
            self.skip = u64::from(len);
            self.frame(h[3], h[4], len, &authenticated)?;
        }
        Ok(())
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        len: u32,
        authenticated: &impl Fn() -> bool,
    ) -> Result<(), Flood> {
        const END_STREAM: u8 = 0x1;
        const ACK: u8 = 0x1;
        let budget = match kind {
            // HEADERS: a new stream (or trailers, counted alike).
            0x1 if !self.authenticated => {
                self.authenticated = authenticated();
                if !self.authenticated {
                    self.streams += 1;
                    if self.streams > PREAUTH_STREAMS {
                        return Err(Flood::Unauthenticated);
                    }
                }
                None
            }
            // An empty DATA frame that ends nothing, PRIORITY, and the
            // types h2 reads and drops.
            0x0 if len == 0 && flags & END_STREAM == 0 => Some((&mut self.empty, Flood::Empty)),
            0x2 => Some((&mut self.empty, Flood::Empty)),
            k if k > 0x9 => Some((&mut self.empty, Flood::Empty)),
            0x4 if flags & ACK == 0 => Some((&mut self.settings, Flood::Settings)),
            0x6 if flags & ACK == 0 => Some((&mut self.ping, Flood::Ping)),
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

/// A connection's IO with [`Budgets`] on what it reads: past one, its reads
/// fail (h2 then ends the connection).
pub struct H2Guard<T, A> {
    inner: T,
    budgets: Budgets,
    authenticated: A,
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
            tripped: None,
            on_trip: Some(Box::new(on_trip)),
        }
    }
}

impl<T: AsyncRead + Unpin, A: Fn() -> bool + Unpin> AsyncRead for H2Guard<T, A> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(f) = this.tripped {
            return Poll::Ready(Err(io::Error::other(f.words())));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if let Err(f) = this.budgets.feed(new, &this.authenticated) {
                this.tripped = Some(f);
                if let Some(say) = this.on_trip.take() {
                    say(f);
                }
                // What was read is not handed on: the connection ends here.
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::other(f.words())));
            }
        }
        r
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
            b.feed(chunk, || true).unwrap();
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
        // ACKs are answers, not asks.
        let mut b = Budgets::default();
        b.feed(&preface(), || true).unwrap();
        for _ in 0..10_000 {
            b.feed(&frame(0x4, 0x1, &[]), || true).unwrap();
            b.feed(&frame(0x6, 0x1, &[0; 8]), || true).unwrap();
        }
    }

    #[test]
    fn pings_empty_frames_and_unknown_types_have_budgets() {
        for (f, want) in [
            (frame(0x6, 0, &[0; 8]), Flood::Ping),
            (frame(0xfa, 0, &[1; 100]), Flood::Empty),
            (frame(0x2, 0, &[0; 5]), Flood::Empty),
            (frame(0x0, 0, &[]), Flood::Empty),
        ] {
            let mut b = Budgets::default();
            b.feed(&preface(), || true).unwrap();
            let stopped = (0..5000).find_map(|_| b.feed(&f, || true).err());
            assert_eq!(stopped, Some(want));
        }
        // An empty DATA frame that ends its stream is a request's end.
        let mut b = Budgets::default();
        b.feed(&preface(), || true).unwrap();
        for _ in 0..5000 {
            b.feed(&frame(0x0, 0x1, &[]), || true).unwrap();
        }
    }

    #[test]
    fn streams_before_a_valid_token_are_counted_until_one() {
        let headers = frame(0x1, 0x4, &[0x82]);
        let mut b = Budgets::default();
        b.feed(&preface(), || false).unwrap();
        for _ in 0..PREAUTH_STREAMS {
            b.feed(&headers, || false).unwrap();
        }
        assert_eq!(b.feed(&headers, || false), Err(Flood::Unauthenticated));
        // Once one request authenticated, no count.
        let mut b = Budgets::default();
        b.feed(&preface(), || false).unwrap();
        b.feed(&headers, || false).unwrap();
        for _ in 0..5000 {
            b.feed(&headers, || true).unwrap();
        }
    }
}
