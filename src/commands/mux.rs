//! One long-lived connection from `towerctl port-forward` to the gateway,
//! shared by every forwarded connection: HTTP/2 over TLS, one CONNECT
//! stream per accepted local connection.
//!
//! Why: a TLS handshake per accepted connection cost the gateway and
//! port-forward most of a new forwarded connection's time and CPU (and a
//! TCP connection and TLS state per held connection on both). HTTP/2 gives
//! multiplexing with per-stream flow control, and hyper does CONNECT over
//! it on both ends. The stream is negotiated under a private ALPN name
//! ([`MUX_ALPN`]) so that clients offering `h2` (kubectl does) keep the
//! HTTP/1.1 they get today: exec, attach and port-forward upgrades need it.
//! A gateway that does not offer the name (an older hub) is reached with a
//! TLS connection and an HTTP/1.1 CONNECT per forwarded connection, as
//! before.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

pub use crate::daemon::tls::MUX_ALPN;
use crate::daemon::wire::{encode_early, EARLY_HEADER, EARLY_TAKEN_HEADER};

use super::https::{connect_tunnel, GatewayClient};

/// A byte stream to a target in a member.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Flow-control windows of the multiplexed connection (see `daemon::tls`):
/// big enough that one bulk stream is not held back by window updates,
/// bounded so a slow reader cannot make the other end buffer without
/// limit; this side's connection window holds 128 streams' (local clients
/// that stop reading must not freeze the others).
pub use crate::daemon::tls::{MUX_CLIENT_CONN_WINDOW, MUX_FRAME, MUX_STREAM_WINDOW};

/// The shared connection, opened on first use and again after the gateway
/// closed it (idle timeout, restart).
pub struct Mux {
    gw: GatewayClient,
    token: String,
    current: tokio::sync::Mutex<State>,
}

struct State {
    current: Current,
    /// The last attempt to connect failed slowly (no answer: a gateway
    /// that drops packets): connections that come until `until` are told
    /// so at once, instead of each making, one after the other under the
    /// lock, its own attempt of up to 20 s. A quick failure (refused while
    /// the hub restarts) is not remembered: the next connection tries
    /// again, and finds the hub back at once.
    failed: Option<Failed>,
}

/// An attempt that took this long before failing is remembered.
const SLOW_FAILURE: std::time::Duration = std::time::Duration::from_secs(2);

struct Failed {
    why: String,
    until: std::time::Instant,
    /// The next wait after another failure (1 s, doubling to 30 s).
    next: std::time::Duration,
}

/// How long a gateway without `towerctl-h2` is taken to stay so, before
/// the shared connection is tried again (a rolling upgrade's older hub
/// answered one connection, and a background forward went on with a
/// handshake per connection for days).
const PER_CONNECTION_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// Between PINGs on the multiplexed connection, and how long an answer
/// may take before the connection is given up.
const MUX_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
const MUX_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a CONNECT may wait for the gateway's answer (the hub gives the
/// agent 20 s).
const CONNECT_ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(25);

enum Current {
    None,
    H2(SendRequest<Empty<Bytes>>),
    /// The gateway does not multiplex: one connection per stream (seen
    /// then).
    PerConnection(std::time::Instant),
}

impl Mux {
    pub fn new(gw: GatewayClient, token: &str) -> Mux {
        Mux {
            gw,
            token: token.to_string(),
            current: tokio::sync::Mutex::new(State {
                current: Current::None,
                failed: None,
            }),
        }
    }

    /// The live HTTP/2 sender, after connecting if needed; `None` when the
    /// gateway speaks only HTTP/1.1.
    async fn sender(&self) -> Result<Option<SendRequest<Empty<Bytes>>>> {
        let mut st = self.current.lock().await;
        match &st.current {
            Current::H2(s) if !s.is_closed() => return Ok(Some(s.clone())),
            Current::PerConnection(at) if at.elapsed() < PER_CONNECTION_FOR => return Ok(None),
            _ => {}
        }
        if let Some(f) = &st.failed {
            let left = f.until.saturating_duration_since(std::time::Instant::now());
            if !left.is_zero() {
                bail!("{} (tried again in {}s)", f.why, left.as_secs().max(1));
            }
        }
        let started = std::time::Instant::now();
        match self.connect().await {
            Ok(sender) => {
                st.failed = None;
                st.current = match &sender {
                    Some(s) => Current::H2(s.clone()),
                    None => Current::PerConnection(std::time::Instant::now()),
                };
                Ok(sender)
            }
            Err(e) if started.elapsed() < SLOW_FAILURE => {
                st.failed = None;
                Err(e)
            }
            Err(e) => {
                let next = st
                    .failed
                    .as_ref()
                    .map_or(std::time::Duration::from_secs(1), |f| f.next);
                st.failed = Some(Failed {
                    why: format!("{e:#}"),
                    until: std::time::Instant::now() + next,
                    next: (next * 2).min(std::time::Duration::from_secs(30)),
                });
                Err(e)
            }
        }
    }

    /// A new shared connection; `None` when the gateway does not offer it.
    async fn connect(&self) -> Result<Option<SendRequest<Empty<Bytes>>>> {
        let tls = self.gw.connect().await?;
        if tls.get_ref().1.alpn_protocol() != Some(MUX_ALPN) {
            return Ok(None);
        }
        // PINGs while the connection lives, idle or not: one that died
        // silently (the hub's host gone, a NAT entry dropped) is found
        // within 25 s and replaced at the next connection, instead of
        // holding every new one until TCP gives up (~15 min).
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(MUX_STREAM_WINDOW)
            .initial_connection_window_size(MUX_CLIENT_CONN_WINDOW)
            .max_frame_size(MUX_FRAME)
            .keep_alive_interval(MUX_PING_EVERY)
            .keep_alive_timeout(MUX_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls));
        let (sender, conn) = tokio::time::timeout(super::https::CONNECT_DEADLINE, handshake)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the gateway did not complete the HTTP/2 handshake within {}s; is the hub up?",
                    super::https::CONNECT_DEADLINE.as_secs()
                )
            })?
            .context("HTTP/2 handshake with the gateway failed")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("gateway connection: {e}");
            }
        });
        Ok(Some(sender))
    }

    /// Forgets the current connection if it is closed. Only then: a
    /// sender's clones share their state, so a dead current one is closed
    /// itself, and asking whether the caller's was closed too threw away
    /// the live one another connection had just made.
    async fn forget_closed(&self) {
        let mut st = self.current.lock().await;
        if matches!(&st.current, Current::H2(s) if s.is_closed()) {
            st.current = Current::None;
        }
    }

    /// A raw stream to `authority` (`NAME.NS.svc.CLUSTER:PORT`…) through the
    /// gateway's CONNECT, with `first` (what the local client has already
    /// sent) ahead of anything else on it. The error is the gateway's (or
    /// agent's) own words.
    ///
    /// On the multiplexed connection `first` goes in the CONNECT itself
    /// ([`EARLY_HEADER`]): the hub puts it in the channel's open, and the
    /// target has it one round trip to the agent sooner. The 200 says how
    /// much the hub took; the rest (all of it, from an older hub) is
    /// written on the stream. Not on a connection per stream, which may
    /// pass through a proxy that terminates TLS and logs headers: there it
    /// is written on the stream.
    pub async fn open(&self, authority: &str, first: &[u8]) -> Result<Box<dyn Stream>> {
        // A second try only when the shared connection turned out dead
        // before the gateway took the stream (closed while idle). Not once
        // a CONNECT with the client's bytes was handed to the connection:
        // it may have reached the hub, whose agent then wrote them to the
        // target (a request carried out), and a second try would write
        // them again; that connection fails as any whose proxy broke.
        for attempt in 0..2 {
            let Some(mut sender) = self.sender().await? else {
                let mut tls = connect_tunnel(&self.gw, &self.token, authority).await?;
                write_first(&mut tls, first).await?;
                return Ok(Box::new(tls));
            };
            let mut req = http::Request::connect(authority).header(
                http::header::PROXY_AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
            if !first.is_empty() {
                // Never indexed by HPACK: the client's bytes may hold its
                // own credentials.
                let mut v = http::HeaderValue::try_from(encode_early(first))?;
                v.set_sensitive(true);
                req = req.header(EARLY_HEADER, v);
            }
            let req = req.body(Empty::<Bytes>::new())?;
            let asked_at = std::time::Instant::now();
            // The hub answers within its 20 s wait for the agent; past
            // that, it is gone (or stopped): said, not waited on for ever.
            let asked = async {
                match sender.ready().await {
                    Ok(()) => (sender.send_request(req).await, true),
                    Err(e) => (Err(e), false),
                }
            };
            let Ok((sent, handed)) = tokio::time::timeout(CONNECT_ANSWER_DEADLINE, asked).await
            else {
                self.forget_closed().await;
                bail!(
                    "the gateway did not answer within {}s; is the hub up?",
                    CONNECT_ANSWER_DEADLINE.as_secs()
                );
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    self.forget_closed().await;
                    // Canceled: the connection ended (a GOAWAY: the hub
                    // closed it as its operator's idle one) before the
                    // request went out, first bytes and all.
                    let unsent = !handed || first.is_empty() || e.is_canceled();
                    // Found closed at once (it died while idle): worth a new
                    // one. Found dead after a wait (its PINGs unanswered: the
                    // hub stopped or gone), a new one would wait again (a
                    // TLS handshake to a stopped hub: 10 s more).
                    let at_once = asked_at.elapsed() < std::time::Duration::from_secs(2);
                    if attempt == 0
                        && unsent
                        && at_once
                        && (e.is_closed() || e.is_canceled() || sender.is_closed())
                    {
                        continue;
                    }
                    return Err(e).context(
                        "the gateway connection failed (the hub did not answer its PINGs, or closed it); is the hub up?",
                    );
                }
            };
            let status = resp.status();
            if status == http::StatusCode::OK {
                let taken = resp
                    .headers()
                    .get(EARLY_TAKEN_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(first.len());
                if !first.is_empty() {
                    tracing::debug!(
                        "{} bytes the client sent first went with the CONNECT; the hub took {taken}",
                        first.len()
                    );
                }
                let mut up = TokioIo::new(
                    hyper::upgrade::on(resp)
                        .await
                        .context("the gateway did not open the stream")?,
                );
                write_first(&mut up, &first[taken..]).await?;
                return Ok(Box::new(up));
            }
            let body = tokio::time::timeout(
                std::time::Duration::from_secs(15),
                http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect(),
            )
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|c| c.to_bytes())
            .unwrap_or_default();
            // Whatever answered (a proxy's error page too): one printable
            // line, bounded.
            let msg = crate::tunnel::printable(String::from_utf8_lossy(&body).trim(), 500);
            if msg.is_empty() {
                bail!("the gateway answered HTTP {}", status.as_u16());
            }
            bail!("{msg}");
        }
        bail!("the gateway closed the connection twice in a row; is the hub restarting?")
    }
}

/// Writes the client's first bytes (those the gateway did not take) on a
/// fresh stream, ahead of anything else.
async fn write_first<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, first: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    if !first.is_empty() {
        s.write_all(first)
            .await
            .context("the stream through the gateway broke at once")?;
    }
    Ok(())
}
