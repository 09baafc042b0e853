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
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "a WebSocket frame of {len} bytes before login (at most {} then)",
                                self.max
                            ),
                        ));
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
}
