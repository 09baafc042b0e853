//! A minimal tunnel client for hostile-login tests: WebSocket, then SSH
//! inside (tokio-tungstenite + russh, as the agent does), then one password
//! login with whatever user name the test wants. The WebSocket adapter is a
//! cut-down copy of `src/tunnel/ws.rs` (every write one binary message,
//! flushed at once: russh does not flush its banner).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct WsIo<S> {
    ws: WebSocketStream<S>,
    read_buf: Bytes,
    /// Once set, nothing more is read from the socket (a peer that stops
    /// reading and goes on writing).
    deaf: Option<Arc<std::sync::atomic::AtomicBool>>,
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _ = Pin::new(&mut this.ws).poll_flush(cx);
        if let Some(deaf) = &this.deaf {
            if deaf.load(std::sync::atomic::Ordering::Relaxed) {
                return Poll::Pending;
            }
        }
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(d))) => this.read_buf = d,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        let _ = Pin::new(&mut this.ws).poll_flush(cx);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx));
        Poll::Ready(Ok(()))
    }
}

/// Takes any host key; answers every channel the hub opens with `answer`
/// (written at once, whatever the hub sends), when there is one.
struct AnyHost {
    answer: Option<Arc<Vec<u8>>>,
}

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        if let Some(answer) = self.answer.clone() {
            tokio::spawn(async move {
                // After the request (which may have come in the open,
                // with nothing on the channel to wait for).
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = channel.data(&answer[..]).await;
                // Held open: the answer never ends.
                tokio::time::sleep(Duration::from_secs(120)).await;
                drop(channel);
            });
        }
        Ok(())
    }
}

/// How a login attempt ended.
#[derive(Debug, PartialEq)]
pub enum Login {
    Accepted,
    Refused,
    /// The hub closed the connection before the password was answered
    /// (penalty, deadline) or something failed on the way.
    Cut(String),
}

/// One password login as `user` to the hub's tunnel at `hub`, from source
/// address `from` (any 127.x.y.z), bounded by `timeout`.
#[allow(dead_code)]
pub async fn login(
    hub: SocketAddr,
    from: std::net::IpAddr,
    user: &str,
    password: &str,
    timeout: Duration,
) -> Login {
    let url = format!("ws://{hub}/tunnel");
    login_at(hub, from, &url, None, user, password, timeout).await
}

/// [`login`] to `url` (`ws://` or `wss://`, through what listens at
/// `addr`), trusting the CA in PEM file `ca` for `wss://`.
#[allow(dead_code)]
pub async fn login_at(
    addr: SocketAddr,
    from: std::net::IpAddr,
    url: &str,
    ca: Option<&std::path::Path>,
    user: &str,
    password: &str,
    timeout: Duration,
) -> Login {
    let attempt = async {
        let mut h = connect(addr, from, url, ca).await?;
        let r = h
            .authenticate_password(user, password)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(if r.success() {
            Login::Accepted
        } else {
            Login::Refused
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => Login::Cut(e),
        Err(_) => Login::Cut("timed out".into()),
    }
}

/// A session logged in as member `user` with the agent key in `key_file`
/// (an agent's key holder: it can then do what the real agent would not),
/// accepting the hub's channels with packets of at most `max_packet` bytes
/// (and doing nothing with them).
#[allow(dead_code)]
pub async fn login_with_key(
    hub: SocketAddr,
    user: &str,
    key_file: &std::path::Path,
    max_packet: u32,
) -> Result<russh::client::Handle<impl russh::client::Handler>, String> {
    login_with_key_deaf(hub, user, key_file, max_packet, None).await
}

/// [`login_with_key`], reading nothing more from the hub once `deaf` is
/// set.
#[allow(dead_code)]
pub async fn login_with_key_deaf(
    hub: SocketAddr,
    user: &str,
    key_file: &std::path::Path,
    max_packet: u32,
    deaf: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<russh::client::Handle<impl russh::client::Handler>, String> {
    login_with_key_as(hub, user, key_file, max_packet, deaf, None).await
}

/// [`login_with_key`], answering every channel the hub opens with
/// `answer` (a hostile member's agent).
#[allow(dead_code)]
pub async fn login_with_key_answering(
    hub: SocketAddr,
    user: &str,
    key_file: &std::path::Path,
    answer: Vec<u8>,
) -> Result<russh::client::Handle<impl russh::client::Handler>, String> {
    login_with_key_as(hub, user, key_file, 32 * 1024, None, Some(Arc::new(answer))).await
}

async fn login_with_key_as(
    hub: SocketAddr,
    user: &str,
    key_file: &std::path::Path,
    max_packet: u32,
    deaf: Option<Arc<std::sync::atomic::AtomicBool>>,
    answer: Option<Arc<Vec<u8>>>,
) -> Result<russh::client::Handle<impl russh::client::Handler>, String> {
    let key = russh::keys::load_secret_key(key_file, None).map_err(|e| e.to_string())?;
    let url = format!("ws://{hub}/tunnel");
    let cfg = russh::client::Config {
        maximum_packet_size: max_packet,
        ..Default::default()
    };
    let mut h = connect_with(hub, [127, 0, 0, 1].into(), &url, None, cfg, deaf, answer).await?;
    let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None);
    let r = h
        .authenticate_publickey(user, key)
        .await
        .map_err(|e| e.to_string())?;
    if !r.success() {
        return Err("the key was refused".into());
    }
    Ok(h)
}

/// A session with the hub's tunnel at `hub` through its key exchange, never
/// logging in (it answers the hub's keepalives, as russh does).
#[allow(dead_code)]
pub async fn unauthenticated(
    hub: SocketAddr,
) -> Result<russh::client::Handle<impl russh::client::Handler>, String> {
    let url = format!("ws://{hub}/tunnel");
    connect(hub, [127, 0, 0, 1].into(), &url, None).await
}

/// A WebSocket to `url` (through what listens at `addr`, from `from`) with
/// an SSH client session on it, not logged in yet.
async fn connect(
    addr: SocketAddr,
    from: std::net::IpAddr,
    url: &str,
    ca: Option<&std::path::Path>,
) -> Result<russh::client::Handle<AnyHost>, String> {
    connect_with(
        addr,
        from,
        url,
        ca,
        russh::client::Config::default(),
        None,
        None,
    )
    .await
}

/// [`connect`] with the SSH client configuration `cfg`.
async fn connect_with(
    addr: SocketAddr,
    from: std::net::IpAddr,
    url: &str,
    ca: Option<&std::path::Path>,
    cfg: russh::client::Config,
    deaf: Option<Arc<std::sync::atomic::AtomicBool>>,
    answer: Option<Arc<Vec<u8>>>,
) -> Result<russh::client::Handle<AnyHost>, String> {
    {
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(SocketAddr::new(from, 0))
            .map_err(|e| e.to_string())?;
        if deaf.is_some() {
            // A peer that will stop reading keeps its window small, so that
            // what the hub sends it waits in the hub, not in the kernel.
            sock.set_recv_buffer_size(8 * 1024)
                .map_err(|e| e.to_string())?;
        }
        let tcp = sock.connect(addr).await.map_err(|e| e.to_string())?;
        let connector = ca.map(|ca| {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(ca).unwrap();
            for c in rustls_pemfile::certs(&mut &pem[..]) {
                roots.add(c.unwrap()).unwrap();
            }
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            tokio_tungstenite::Connector::Rustls(Arc::new(cfg))
        });
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(url, tcp, None, connector)
            .await
            .map_err(|e| e.to_string())?;
        russh::client::connect_stream(
            Arc::new(cfg),
            WsIo {
                ws,
                read_buf: Bytes::new(),
                deaf,
            },
            AnyHost { answer },
        )
        .await
        .map_err(|e| e.to_string())
    }
}

/// Wrong tokens as `user`, one after another from `from` to `url` (through
/// `addr`), on a thread of its own until `stop` is set or `limit` passes:
/// an attack going on while the test does something else. Returns the
/// attempts made.
#[allow(dead_code)]
pub fn keep_guessing(
    addr: SocketAddr,
    from: std::net::IpAddr,
    url: String,
    ca: Option<std::path::PathBuf>,
    user: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let start = std::time::Instant::now();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < limit {
            let _ = rt.block_on(login_at(
                addr,
                from,
                &url,
                ca.as_deref(),
                user,
                "not-the-token",
                Duration::from_secs(5),
            ));
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    })
}
