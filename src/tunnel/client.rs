//! Agent side of the tunnel: dial the hub over WebSocket (optionally through
//! an HTTP proxy), run SSH inside, pin the hub's host key, log in with the
//! join token, and serve the channels the hub opens.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{Handle, Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure};

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::flow::FlowStream;
use super::keys::fingerprint;
use super::tls::HubTls;
use super::ws::WsIo;
use super::{
    Secret, TunnelError, AUTH_PREFIX, MAX_PACKET, REVOKED_PREFIX, TARGET_PING, WINDOW_SIZE,
};

/// What the agent needs to reach its hub.
#[derive(Debug, Clone)]
pub struct DialOptions {
    /// `ws://host:port[/path]` or `wss://…`.
    pub url: String,
    /// Cluster name: the SSH user name.
    pub name: String,
    /// The agent's own key: registered at the first join, then the only
    /// credential needed to reconnect.
    pub key: Arc<PrivateKey>,
    /// Join token, for the first join (or a re-join after rotation).
    pub token: Option<Secret>,
    /// Pinned fingerprint of the hub's host key (`sha256:…`); `None` only
    /// with the explicit insecure flag.
    pub hub_key: Option<String>,
    pub keepalive: Duration,
    /// Bound on TCP connect + WebSocket + SSH handshake.
    pub connect_timeout: Duration,
    /// What `wss://` trusts (built once: loading the system store is not
    /// free).
    pub tls: Arc<HubTls>,
    /// Words the agent declares about itself in its SSH identification
    /// string's comment (RFC 4253 4.2), e.g. `impersonate`; the hub reads
    /// them as [`super::server::ServerSession::features`].
    pub features: Vec<String>,
    /// The hub group's tunnel URLs as a hub last told them
    /// ([`super::TARGET_HUBS`]), for the agent to fail over to.
    pub learned_hubs: Arc<Mutex<Vec<String>>>,
    /// Proxy variables saved with the agent, for when its environment has
    /// none ([`super::proxy::choose`]).
    pub proxy: Option<super::proxy::ProxyVars>,
    /// `--proxy`: the proxy for the hub, whatever the environment says.
    pub proxy_url: Option<String>,
}

/// Serves channels the hub opens. Implemented by the agent daemon.
pub trait ChannelService: Send + Sync + 'static {
    /// Whether the agent serves `target:port` at all; refused otherwise.
    fn accepts(&self, target: &str, port: u32) -> bool;
    /// Serves an accepted channel; must not block (spawn). `originator` is
    /// the channel's originator-address field, opaque here (the hub puts
    /// the operator identity of raw channels there). The channel is
    /// confirmed to the hub when `confirm` says so, before anything is
    /// written on it: at once, or once a raw channel's target is dialed,
    /// so that the confirmation and the answer to the dial reach the hub
    /// together. Dropped unconfirmed, the open is refused.
    fn serve(
        &self,
        target: String,
        port: u32,
        originator: String,
        stream: FlowStream,
        confirm: Confirm,
    );
}

/// Confirms a channel the hub opened ([`ChannelService::serve`]).
pub struct Confirm(russh::client::ChannelOpenHandle);

impl Confirm {
    /// Confirms the channel: what is written on it afterwards follows the
    /// confirmation (the session sends open replies first).
    pub async fn now(self) {
        self.0.accept().await;
    }
}

pub struct AgentHandler {
    expected_key: Option<String>,
    seen_key: Arc<Mutex<Option<String>>>,
    service: Arc<dyn ChannelService>,
    closed: Option<oneshot::Sender<SessionEnd>>,
    learned_hubs: Arc<Mutex<Vec<String>>>,
}

/// The hubs an agent keeps from a hub's [`super::TARGET_HUBS`] list
/// (`pinned`: it checks the hub's host key). Without a pinned key only TLS
/// verifies the hub: plain `ws://` is never dialed on a hub's word then.
fn learned_hubs(list: &str, pinned: bool) -> Vec<String> {
    let mut hubs = super::parse_hub_list(list);
    if !pinned {
        hubs.retain(|u| u.starts_with("wss://"));
    }
    hubs
}

/// Channels the hub opens that this agent does not serve, logged 10 a
/// minute (then at debug): a hostile hub could open them without end.
static REFUSED_CHANNELS: super::LogBudget =
    super::LogBudget::new("refused channels from the hub", 10);

/// Why a session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    /// Human-readable.
    pub reason: String,
    /// The hub said the cluster was revoked: do not reconnect.
    pub revoked: bool,
    /// The hub's own words, when it closed the session.
    pub from_hub: Option<String>,
}

impl SessionEnd {
    /// The hub closed the session saying `message`: its words are kept for
    /// the agent's log and the operator's `status` as plain text, one line,
    /// bounded (a hostile or impostor hub could send escapes and newlines).
    fn by_hub(message: &str) -> SessionEnd {
        let message = super::printable(message, 500);
        SessionEnd {
            reason: format!("the hub closed the session: {message}"),
            revoked: message.starts_with(REVOKED_PREFIX),
            from_hub: Some(message),
        }
    }
}

impl AgentHandler {
    fn refuse(reply: russh::client::ChannelOpenHandle, kind: &str) {
        if REFUSED_CHANNELS.admit() {
            tracing::warn!(
                "refused a '{kind}' channel from the hub: agents only serve forwarded-tcpip"
            );
        }
        drop(reply); // dropping rejects with AdministrativelyProhibited
    }
}

impl russh::client::Handler for AgentHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let fp = fingerprint(key);
        let ok = match &self.expected_key {
            Some(expected) => super::keys::ct_eq(expected, &fp),
            None => true,
        };
        if let Ok(mut seen) = self.seen_key.lock() {
            *seen = Some(fp);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if connected_address == TARGET_PING {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
        } else if connected_address == super::TARGET_HUBS {
            let hubs = learned_hubs(originator_address, self.expected_key.is_some());
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            if let Ok(mut learned) = self.learned_hubs.lock() {
                if *learned != hubs {
                    // A hub that names a new list at each open is said at
                    // most a few times a minute.
                    static HUB_LISTS: super::LogBudget =
                        super::LogBudget::new("changed hub lists", 5);
                    if HUB_LISTS.admit() {
                        tracing::info!(
                        "the hub names {} in its group, dialed after the join command's when a session ends: {}",
                        match hubs.len() {
                            1 => "1 hub".to_string(),
                            n => format!("{n} hubs"),
                        },
                        super::escape_for_log(&hubs.join(" "), 2000)
                    );
                    }
                    *learned = hubs;
                }
            }
        } else if self.service.accepts(connected_address, connected_port) {
            // Answers to API requests get a smaller window than raw
            // streams: it is what the hub buffers for a stalled reader.
            let window = if connected_address == super::TARGET_APISERVER {
                super::flow::API_WINDOW
            } else {
                super::flow::STREAM_WINDOW
            };
            self.service.serve(
                connected_address.to_string(),
                connected_port,
                originator_address.to_string(),
                FlowStream::with_windows(channel, super::flow::UNTOLD_WINDOW, window),
                Confirm(reply),
            );
        } else {
            if REFUSED_CHANNELS.admit() {
                tracing::warn!(
                    target = %super::escape_for_log(connected_address, 100),
                    port = connected_port,
                    "refused a channel to a target this agent does not serve"
                );
            }
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
    }

    // russh's client accepts every other channel type by default; an agent
    // must never give the hub a shell, an agent socket or an X11 display.
    async fn server_channel_open_session(
        &mut self,
        _c: Channel<Msg>,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "session");
        Ok(())
    }
    async fn server_channel_open_direct_tcpip(
        &mut self,
        _c: Channel<Msg>,
        _h: &str,
        _p: u32,
        _oa: &str,
        _op: u32,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "direct-tcpip");
        Ok(())
    }
    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _c: Channel<Msg>,
        _p: &str,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "forwarded-streamlocal");
        Ok(())
    }
    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _c: Channel<Msg>,
        _p: &str,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "direct-streamlocal");
        Ok(())
    }
    async fn server_channel_open_agent_forward(
        &mut self,
        _c: Channel<Msg>,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "auth-agent");
        Ok(())
    }
    async fn server_channel_open_x11(
        &mut self,
        _c: Channel<Msg>,
        _a: &str,
        _p: u32,
        reply: russh::client::ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        Self::refuse(reply, "x11");
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (end, r) = match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => {
                (SessionEnd::by_hub(&info.message), Ok(()))
            }
            russh::client::DisconnectReason::Error(e) => (
                SessionEnd {
                    reason: format!("the tunnel failed: {e}"),
                    revoked: false,
                    from_hub: None,
                },
                Err(e),
            ),
        };
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(end);
        }
        r
    }
}

/// A live, authenticated tunnel session.
pub struct ClientSession {
    handle: Handle<AgentHandler>,
    /// What the hub has sent so far (keepalives count it as a sign of life).
    alive: super::Liveness,
    /// The WebSocket's Close from the other end, if one came
    /// ([`super::ws::WsIo::close_note`]).
    ws_closed: super::ws::CloseNote,
    /// The hub took the agent's key itself (not the join token).
    pub by_key: bool,
    closed: oneshot::Receiver<SessionEnd>,
    pub connected_at: Instant,
}

impl ClientSession {
    /// One round trip to the hub; `None` when neither the reply nor
    /// anything else came from the hub within `deadline`
    /// ([`super::await_keepalive`]).
    pub async fn ping(&self, deadline: Duration) -> Option<Duration> {
        let answer = async { self.handle.send_ping().await.is_ok() && !self.handle.is_closed() };
        super::await_keepalive(answer, deadline, &self.alive).await
    }

    /// A future that resolves with a human-readable reason when the session
    /// ends. Taken once, so that it can be awaited while `ping` borrows the
    /// session.
    pub fn take_closed(&mut self) -> impl std::future::Future<Output = SessionEnd> + use<> {
        let rx = std::mem::replace(&mut self.closed, oneshot::channel().1);
        let ws_closed = self.ws_closed.clone();
        async move {
            let mut end = rx.await.unwrap_or_else(|_| SessionEnd {
                reason: "the tunnel closed".to_string(),
                revoked: false,
                from_hub: None,
            });
            // Not the hub's own goodbye (an SSH disconnect): the WebSocket's
            // close, if one came, says who ended it (a proxy's 1001).
            if end.from_hub.is_none() {
                if let Some(c) = ws_closed.lock().ok().and_then(|c| c.clone()) {
                    end.reason = format!("{} (after {c})", end.reason);
                }
            }
            end
        }
    }

    /// Push mode: a channel to what the hub exposes as `name`.
    pub async fn open_direct(
        &self,
        name: &str,
        originator: std::net::SocketAddr,
    ) -> Result<FlowStream, russh::Error> {
        let ch = self
            .handle
            .channel_open_direct_tcpip(
                name,
                0,
                originator.ip().to_string(),
                u32::from(originator.port()),
            )
            .await?;
        // At most what the hub takes before its window reaches us.
        Ok(FlowStream::with_windows(
            ch,
            super::flow::UNTOLD_WINDOW,
            super::flow::STREAM_WINDOW,
        ))
    }

    /// Ends a healthy session on purpose (the agent stops): the hub is told
    /// `why` first (see [`super::TARGET_FAREWELL`]; bounded, so a hub that
    /// stopped answering holds the agent up 2 s at most), then the SSH
    /// disconnect goes out.
    pub async fn farewell(&self, why: &str) {
        if !self.handle.is_closed() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.handle
                    .channel_open_direct_tcpip(super::TARGET_FAREWELL, 0, why, 0),
            )
            .await;
        }
        self.disconnect(why).await;
    }

    pub async fn disconnect(&self, why: &str) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, why, "")
            .await;
    }
}

fn client_config(keepalive: Duration, features: &[String]) -> Arc<russh::client::Config> {
    // The hub reads the agent's version and features from here.
    let mut id = concat!("SSH-2.0-towerctl_", env!("CARGO_PKG_VERSION")).to_string();
    if !features.is_empty() {
        id.push(' ');
        id.push_str(&features.join(","));
    }
    Arc::new(russh::client::Config {
        client_id: russh::SshId::Standard(id.into()),
        preferred: super::preferred(),
        keepalive_interval: Some(keepalive),
        keepalive_max: 2,
        inactivity_timeout: None,
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET,
        nodelay: true,
        ..Default::default()
    })
}

/// Dials the hub and logs in. Fatal errors (wrong key, wrong token) are
/// distinguished from transient ones with [`TunnelError::is_fatal`].
pub async fn connect(
    opts: &DialOptions,
    service: Arc<dyn ChannelService>,
) -> Result<ClientSession, TunnelError> {
    let phase = Phase::default();
    // `connect_timeout` with nothing heard from the hub, once its frames
    // come (see `with_progress`).
    match super::with_progress(
        connect_inner(opts, service, &phase),
        opts.connect_timeout,
        super::LOGIN_CAP.max(opts.connect_timeout),
        || phase.heard(),
    )
    .await
    {
        Ok(r) => r,
        Err(took) => Err(TunnelError::Unreachable {
            url: opts.url.clone(),
            reason: if took <= opts.connect_timeout + Duration::from_secs(2) {
                format!(
                    "no answer within {:?}: {}",
                    opts.connect_timeout,
                    phase.stalled()
                )
            } else if took >= super::LOGIN_CAP {
                format!(
                    "the login went on for {:?} without finishing (a link too slow for it): {}",
                    super::LOGIN_CAP,
                    phase.stalled()
                )
            } else {
                format!(
                    "the hub went quiet for {:?}, {}s into the login: {}",
                    opts.connect_timeout,
                    took.as_secs(),
                    phase.stalled()
                )
            },
        }),
    }
}

/// How far a connection attempt came, for the words of its timeout: a
/// firewall, an ingress that holds the upgrade and a hub that does not
/// answer its login read alike otherwise.
#[derive(Default)]
struct Phase(
    std::sync::Mutex<&'static str>,
    /// The WebSocket's frames from the hub, once upgraded.
    std::sync::OnceLock<super::Liveness>,
);

impl Phase {
    /// Frames heard from the hub so far.
    fn heard(&self) -> u64 {
        self.1.get().map_or(0, |l| l.seen())
    }

    fn set(&self, stalled: &'static str) {
        if let Ok(mut p) = self.0.lock() {
            *p = stalled;
        }
    }

    fn stalled(&self) -> &'static str {
        match self.0.lock().map(|p| *p) {
            Ok(p) if !p.is_empty() => p,
            _ => "no TCP connection to the hub's address (the name not resolving, a firewall dropping the packets, or nothing routing there)",
        }
    }
}

async fn connect_inner(
    opts: &DialOptions,
    service: Arc<dyn ChannelService>,
    phase: &Phase,
) -> Result<ClientSession, TunnelError> {
    let url = url::Url::parse(&opts.url).map_err(|e| TunnelError::BadUrl {
        url: opts.url.clone(),
        reason: e.to_string(),
    })?;
    let tls = match url.scheme() {
        "ws" => false,
        "wss" => true,
        other => {
            return Err(TunnelError::BadUrl {
                url: opts.url.clone(),
                reason: format!("scheme '{other}' is not supported"),
            })
        }
    };
    let host = url.host_str().ok_or_else(|| TunnelError::BadUrl {
        url: opts.url.clone(),
        reason: "no host".into(),
    })?;
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let unreachable = |reason: String| TunnelError::Unreachable {
        url: opts.url.clone(),
        reason,
    };

    let (explicit, saved) = (opts.proxy_url.as_deref(), opts.proxy.as_ref());
    let tcp = match super::proxy::choose(tls, host, port, explicit, saved).map_err(&unreachable)? {
        Some(proxy) => {
            phase.set("no answer from the proxy to its CONNECT (the proxy unreachable, or slow to reach the hub)");
            super::proxy::connect(&proxy, host, port)
                .await
                .map_err(|e| {
                    let reason = format!("through proxy '{}': {e}", proxy.shown());
                    // 403 and 407: the proxy's answer until it is told
                    // otherwise.
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        TunnelError::Misrouted {
                            url: opts.url.clone(),
                            reason,
                        }
                    } else {
                        unreachable(reason)
                    }
                })?
        }
        None => super::dial::connect(host, port)
            .await
            .map_err(|e| unreachable(e.to_string()))?,
    };
    super::nodelay(&tcp);
    super::notsent_lowat(&tcp);
    phase.set(if tls {
        "connected, but the TLS handshake did not finish (does this port serve TLS?)"
    } else {
        "connected, but no answer to the WebSocket upgrade (something other than the hub on this port, or an ingress or proxy holding the upgrade)"
    });

    let mut request = opts
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| TunnelError::BadUrl {
            url: opts.url.clone(),
            reason: e.to_string(),
        })?;
    request.headers_mut().insert(
        "user-agent",
        http::HeaderValue::from_static(concat!("towerctl/", env!("CARGO_PKG_VERSION"))),
    );
    // tungstenite reads only the upgrade's head (`WsIo` reads the frames).
    let ws_cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(super::WS_READ_BUFFER);
    // With --hub-ca, a dial looks at the file (a stat, and a read when it
    // changed): off the runtime's thread, which a hung mount would stop.
    let connector = if opts.tls.reads_a_file() {
        let tls = opts.tls.clone();
        tokio::task::spawn_blocking(move || tls.connector())
            .await
            .map_err(|e| unreachable(format!("reading --hub-ca: {e}")))?
    } else {
        opts.tls.connector()
    };
    let (tls_config, refused) = connector.map_err(|e| unreachable(e.to_string()))?;
    // rustls reads the socket in small steps: gulped underneath. A plain
    // socket is read by `WsIo` in big steps itself.
    let tcp = if tls {
        super::slurp::Slurp::new(tcp)
    } else {
        super::slurp::Slurp::direct(tcp)
    };
    // TLS here rather than inside tokio-tungstenite: the frames `WsIo`
    // writes itself go into the gate, which must sit above TLS.
    let stream = if tls {
        // rustls wants an IPv6 address without its brackets.
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = super::tls::server_name(name).map_err(|e| TunnelError::BadUrl {
            url: opts.url.clone(),
            reason: format!("'{name}' is not a valid TLS server name: {e}"),
        })?;
        match tokio_rustls::TlsConnector::from(tls_config)
            .connect(server_name, tcp)
            .await
        {
            Ok(s) => Transport::Tls(Box::new(s)),
            // rustls' own words ("UnknownIssuer") say little; the verifier
            // kept what was presented.
            Err(e) => {
                return Err(match refused.take() {
                    Some(failure) => TunnelError::Certificate {
                        url: opts.url.clone(),
                        failure: Box::new(failure),
                    },
                    None => {
                        // Closed at the hello, or answered with what is
                        // no TLS record (a plain HTTP server).
                        let not_tls = e.kind() == std::io::ErrorKind::UnexpectedEof
                            || e.get_ref()
                                .and_then(|i| i.downcast_ref::<rustls::Error>())
                                .is_some_and(|r| matches!(r, rustls::Error::InvalidMessage(_)));
                        let hint = if not_tls {
                            " (does this port serve TLS? the hub itself serves plain ws://; \
                             wss:// goes through a TLS-terminating ingress or load balancer)"
                        } else {
                            ""
                        };
                        unreachable(format!("TLS handshake failed: {e}{hint}"))
                    }
                });
            }
        }
    } else {
        Transport::Plain(tcp)
    };
    if tls {
        phase.set("TLS done, but no answer to the WebSocket upgrade (an ingress holding or buffering the upgrade, or not routing this path to the hub)");
    }
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(
        request,
        super::ws::Gate::new(stream, super::ws::Role::Client),
        Some(ws_cfg),
    )
    .await
    .map_err(|e| {
        let reason = handshake_failure(&e);
        if misrouted(&e) {
            TunnelError::Misrouted {
                url: opts.url.clone(),
                reason,
            }
        } else {
            unreachable(reason)
        }
    })?;

    let seen_key = Arc::new(Mutex::new(None));
    let (closed_tx, closed_rx) = oneshot::channel();
    let handler = AgentHandler {
        expected_key: opts.hub_key.clone(),
        seen_key: seen_key.clone(),
        service,
        closed: Some(closed_tx),
        learned_hubs: opts.learned_hubs.clone(),
    };
    phase.set("upgraded, but the SSH handshake did not finish (the hub overloaded, something other than a towerctl hub answering the upgrade, or a path that drops large packets: an MTU black hole, where ICMP 'fragmentation needed' is filtered; try 'ping -M do -s 1400 HUB')");
    let io = WsIo::new(ws);
    let alive = io.liveness();
    let _ = phase.1.set(alive.clone());
    let ws_closed = io.close_note();
    let mut handle = match russh::client::connect_stream(
        client_config(opts.keepalive, &opts.features),
        io,
        handler,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            let seen = seen_key.lock().ok().and_then(|s| s.clone());
            return Err(match (seen, &opts.hub_key) {
                (Some(actual), Some(expected)) if &actual != expected => {
                    TunnelError::HostKeyMismatch {
                        expected: expected.clone(),
                        actual,
                    }
                }
                // russh's text can quote the peer's lists (algorithm
                // names of a KEXINIT, kilobytes of them, from a peer whose
                // key is not checked yet): one short printable line.
                _ => TunnelError::Handshake(super::printable(&e.to_string(), 500)),
            });
        }
    };
    phase.set("the hub took the connection but did not answer the login (its registry or etcd slow, or many agents logging in at once)");
    let mut closed_rx = closed_rx;
    let key = PrivateKeyWithHashAlg::new(opts.key.clone(), None);
    // Only an explicit refusal from the hub is fatal. An error while
    // authenticating (a reset, a hub restarting mid-handshake) is an I/O
    // fault like any other and is retried with backoff.
    let transient = |e: russh::Error| {
        TunnelError::Handshake(super::printable(
            &format!("the connection failed during authentication: {e}"),
            500,
        ))
    };
    // russh also answers "failure" with no methods left when the connection
    // closes before the hub answered (its login deadline cut a login that
    // waited behind thousands of others): that is not a refusal.
    let cut = |r: &russh::client::AuthResult| matches!(r, russh::client::AuthResult::Failure { remaining_methods, .. } if remaining_methods.is_empty());
    let by_key = handle
        .authenticate_publickey(opts.name.clone(), key)
        .await
        .map_err(transient)?;
    let key_taken = by_key.success();
    let last = if by_key.success() {
        by_key
    } else if let Some(token) = &opts.token {
        if cut(&by_key) && handle.is_closed() {
            by_key
        } else {
            handle
                .authenticate_password(opts.name.clone(), token.expose())
                .await
                .map_err(transient)?
        }
    } else {
        by_key
    };
    if !last.success() {
        let refused = refusal(&mut closed_rx, &opts.name).await;
        if matches!(refused, TunnelError::AuthRejected { reason: None, .. })
            && cut(&last)
            && handle.is_closed()
        {
            return Err(TunnelError::Handshake(
                "the hub closed the connection before answering the login (it may be busy with many logins); retrying".into(),
            ));
        }
        return Err(refused);
    }
    Ok(ClientSession {
        alive,
        ws_closed,
        by_key: key_taken,
        handle,
        closed: closed_rx,
        connected_at: Instant::now(),
    })
}

/// Turns an authentication refusal into an error, with the hub's reason
/// when it sent one (it closes the session with it right after refusing).
async fn refusal(closed: &mut oneshot::Receiver<SessionEnd>, name: &str) -> TunnelError {
    // The hub closes the session with its reason right after refusing; a
    // busy hub may take a moment (still within the connect bound).
    let hub_says = tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|end| end.from_hub);
    match hub_says {
        Some(r) if r.starts_with(REVOKED_PREFIX) => TunnelError::Revoked { reason: r },
        Some(r) if r.starts_with(AUTH_PREFIX) => TunnelError::AuthRejected {
            name: name.to_string(),
            reason: Some(r),
        },
        _ => TunnelError::AuthRejected {
            name: name.to_string(),
            reason: None,
        },
    }
}

/// Whether the upgrade was answered by something that will answer the
/// same until it is reconfigured: a success or redirect that is no
/// upgrade, a refusal for credentials, nothing routed at the path, a proxy
/// that drops the upgrade or speaks HTTP/1.0 (502–504 and other answers
/// may pass: a hub restarting behind its ingress).
fn misrouted(e: &tokio_tungstenite::tungstenite::Error) -> bool {
    let tokio_tungstenite::tungstenite::Error::Http(response) = e else {
        return false;
    };
    matches!(
        response.status().as_u16(),
        200..=399 | 400 | 401 | 403 | 404 | 405 | 407 | 426 | 505
    )
}

/// Why the WebSocket upgrade failed, and for an HTTP answer other than
/// 101 what it most likely means: between an agent and its hub sit
/// ingresses and proxies whose own answers say little by themselves.
fn handshake_failure(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    let Error::Http(response) = e else {
        return format!("WebSocket handshake failed: {e}");
    };
    let status = response.status();
    // Who answered, when it says: an ingress's answer reads as the hub's
    // otherwise.
    let server = response
        .headers()
        .get(http::header::SERVER)
        .and_then(|v| v.to_str().ok())
        .map(|v| super::escape_for_log(v, 80))
        .filter(|v| !v.is_empty());
    let by = server
        .as_deref()
        .map(|s| format!(" (answered by '{s}')"))
        .unwrap_or_default();
    let envoy = server.as_deref().is_some_and(|s| {
        let s = s.to_ascii_lowercase();
        s.contains("envoy") || s.contains("istio")
    });
    let body = response
        .body()
        .as_deref()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(2048)]).into_owned())
        .unwrap_or_default();
    // The hub's own words, when it is the hub that refused (a PROXY header
    // from an address it does not trust, a path it does not serve): they
    // name the problem, where a guess from the status would not.
    if let Some(words) = body.strip_prefix("towerctl hub: ") {
        let first = words.lines().next().unwrap_or_default();
        return format!(
            "WebSocket handshake failed: HTTP {status}: the hub says: {}",
            super::escape_for_log(first, 300)
        );
    }
    // Go's (Caddy, Traefik) and nginx's answer to plain HTTP on a TLS port.
    if body.contains("HTTP request to an HTTPS server")
        || body.contains("plain HTTP request was sent to HTTPS port")
    {
        return format!(
            "WebSocket handshake failed: HTTP {status}{by}: this port speaks TLS: join with wss:// instead of ws://"
        );
    }
    let hint = match status.as_u16() {
        403 if envoy => {
            "Envoy refuses a WebSocket upgrade on a route that does not enable it (Contour: \
             `enableWebsockets: true` on the route; Envoy Gateway or plain Envoy: an \
             `upgrade_configs` entry for websocket), and an authorization policy that denies \
             the agent answers 403 too (Istio: `RBAC: access denied`)"
        }
        505 => {
            "a proxy speaks HTTP/1.0 to the hub, and a WebSocket upgrade needs HTTP/1.1 (nginx: \
             `proxy_http_version 1.1` and pass the Upgrade and Connection headers)"
        }
        300..=399 => {
            let to = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(|l| super::escape_for_log(l, 200))
                .unwrap_or_default();
            return format!(
                "WebSocket handshake failed: HTTP {status}: redirected to '{to}'; join with the \
                 URL it names (wss:// where it is https://), as agents do not follow redirects"
            );
        }
        200..=299 => {
            "a server that does not upgrade to WebSocket answered (an ingress without \
             WebSocket support? another service at this address?)"
        }
        401 | 403 => {
            "refused for want of credentials: the hub's gateway port (an agent dials the \
             tunnel port: `towerctl status` on the hub shows it as tunnelURL), or a proxy or \
             ingress in front of the hub that wants authentication"
        }
        407 => {
            "a proxy wants credentials: one not named in HTTPS_PROXY/HTTP_PROXY (a \
             transparent proxy, or a reverse proxy in front of the hub)"
        }
        404 => "nothing is routed to the hub at this path (check the URL's path and the ingress's rules)",
        400 | 405 | 426 => {
            "the upgrade was refused on the way (ws:// to the hub's TLS gateway port? an \
             ingress or proxy that drops the Upgrade and Connection headers?)"
        }
        502..=504 => {
            "an ingress or proxy answered, but it reaches no hub (is `towerctl up` running, \
             its tunnel port the ingress's backend, and the balancer's health check passing? \
             Check /healthz or / on the tunnel port; a proxy that speaks HTTP/2 to the hub \
             cannot carry a WebSocket upgrade either)"
        }
        _ => "the hub or something in front of it refused the upgrade",
    };
    format!("WebSocket handshake failed: HTTP {status}{by}: {hint}")
}

/// The socket under an agent's WebSocket: plain, or TLS for `wss://`.
/// tokio-tungstenite's own `MaybeTlsStream` writes only the first slice of
/// a vectored write, and every frame the agent sends is one (header and
/// payload, [`super::ws::Gate`]).
enum Transport {
    Plain(super::slurp::Slurp<TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<super::slurp::Slurp<TcpStream>>>),
}

impl tokio::io::AsyncRead for Transport {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// A plain socket reads pairs; rustls reads its records its own way.
impl super::ws::ReadPair for Transport {
    fn pairs(&self) -> bool {
        match self {
            Transport::Plain(s) => s.pairs(),
            Transport::Tls(_) => false,
        }
    }

    fn poll_read_pair(
        &mut self,
        cx: &mut std::task::Context<'_>,
        first: &mut tokio::io::ReadBuf<'_>,
        second: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self {
            Transport::Plain(s) => s.poll_read_pair(cx, first, second),
            Transport::Tls(_) => {
                std::task::Poll::Ready(Err(std::io::Error::other("a TLS transport reads no pairs")))
            }
        }
    }
}

impl tokio::io::AsyncWrite for Transport {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoChannels;
    impl ChannelService for NoChannels {
        fn accepts(&self, _: &str, _: u32) -> bool {
            false
        }
        fn serve(&self, _: String, _: u32, _: String, _: FlowStream, _: Confirm) {}
    }

    /// An agent's options for a fake hub on loopback `port`.
    fn fake_hub_options(port: u16, connect_timeout: Duration) -> DialOptions {
        DialOptions {
            url: format!("ws://127.0.0.1:{port}/tunnel"),
            name: "alpha".into(),
            key: Arc::new(
                PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap(),
            ),
            token: None,
            hub_key: None,
            keepalive: Duration::from_secs(10),
            connect_timeout,
            tls: Arc::new(super::super::tls::HubTls::new(None, false, false).unwrap()),
            features: Vec::new(),
            learned_hubs: Arc::default(),
            proxy: None,
            proxy_url: None,
        }
    }

    /// A connection attempt that times out says how far it came.
    #[tokio::test]
    async fn a_stalled_connection_says_where_it_stalled() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (upgrade, says) in [
            (false, "no answer to the WebSocket upgrade"),
            (true, "upgraded, but the SSH handshake did not finish"),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            // Takes the connection, answers the upgrade or not, then says
            // nothing more and keeps the socket open.
            let fake = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                if upgrade {
                    let text = String::from_utf8_lossy(&head).to_string();
                    let key = text
                        .lines()
                        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
                        .or_else(|| {
                            text.lines()
                                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                        })
                        .unwrap()
                        .trim()
                        .to_string();
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                        key.as_bytes(),
                    );
                    let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(s);
            });
            let opts = fake_hub_options(port, Duration::from_secs(2));
            let Err(e) = connect(&opts, Arc::new(NoChannels)).await else {
                panic!("connected to a fake hub");
            };
            let e = e.to_string();
            assert!(e.contains("no answer within") && e.contains(says), "{e}");
            fake.abort();
        }
    }

    #[test]
    fn what_a_hub_says_when_it_closes_the_session_is_kept_as_plain_text() {
        let hostile = format!(
            "auth: \x1b]0;owned\x07\nFAKE LOG LINE \u{202e}{}",
            "x".repeat(100_000)
        );
        let end = SessionEnd::by_hub(&hostile);
        for s in [&end.reason, end.from_hub.as_ref().unwrap()] {
            assert!(
                !s.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{s:?}"
            );
            assert!(s.len() < 1_000, "{} bytes", s.len());
        }
        assert!(end
            .reason
            .starts_with("the hub closed the session: auth:  ]0;owned  FAKE LOG LINE"));
        assert!(!end.revoked);
        let revoked = SessionEnd::by_hub(&format!("{REVOKED_PREFIX} by an operator"));
        assert!(revoked.revoked, "{revoked:?}");
    }

    #[test]
    fn without_a_pinned_host_key_only_wss_hubs_are_learned() {
        let list = "ws://a:1/t wss://b:2/t";
        assert_eq!(learned_hubs(list, true), ["ws://a:1/t", "wss://b:2/t"]);
        assert_eq!(learned_hubs(list, false), ["wss://b:2/t"]);
    }

    /// A refusal in HTTP/1.0 (HAProxy's stock error pages, Go's answer to
    /// plain HTTP on a TLS port) is told by its status, its `Server` and
    /// the hint, as in HTTP/1.1: tungstenite refused the version first
    /// ("HTTP version must be 1.1 or higher") and the agent retried.
    #[tokio::test]
    async fn a_refusal_in_http_1_0_is_told_by_its_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let fake = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.0 403 Forbidden\r\nCache-Control: no-cache\r\nConnection: close\r\n\
                      Content-Type: text/html\r\nServer: haproxy\r\n\r\n\
                      <html><body><h1>403 Forbidden</h1></body></html>\n",
                )
                .await;
        });
        let opts = fake_hub_options(port, Duration::from_secs(5));
        let Err(e) = connect(&opts, Arc::new(NoChannels)).await else {
            panic!("connected to a refusal");
        };
        let e = e.to_string();
        assert!(
            e.contains("HTTP 403 Forbidden (answered by 'haproxy')") && e.contains("credentials"),
            "{e}"
        );
        fake.abort();
    }

    #[test]
    fn an_answer_other_than_101_says_what_it_likely_means() {
        use tokio_tungstenite::tungstenite::Error;
        let said = |status: u16| {
            let mut response = http::Response::new(None);
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            handshake_failure(&Error::Http(Box::new(response)))
        };
        assert!(said(404).contains("HTTP 404 Not Found: nothing is routed to the hub at this path"));
        assert!(said(502)
            .contains("HTTP 502 Bad Gateway: an ingress or proxy answered, but it reaches no hub"));
        assert!(said(200).contains("does not upgrade to WebSocket"));
        assert!(said(401).contains("gateway port"));
        let mut moved = http::Response::new(None);
        *moved.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
        moved.headers_mut().insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("https://hub.example.com/tunnel"),
        );
        let moved = handshake_failure(&Error::Http(Box::new(moved)));
        assert!(
            moved.contains("redirected to 'https://hub.example.com/tunnel'"),
            "{moved}"
        );
        assert!(said(426).contains("Upgrade"));
        assert!(said(505).contains("proxy_http_version 1.1"));
        let mut envoy = http::Response::new(None);
        *envoy.status_mut() = http::StatusCode::FORBIDDEN;
        envoy.headers_mut().insert(
            http::header::SERVER,
            http::HeaderValue::from_static("envoy"),
        );
        let envoy = handshake_failure(&Error::Http(Box::new(envoy)));
        assert!(
            envoy.contains("(answered by 'envoy')") && envoy.contains("enableWebsockets"),
            "{envoy}"
        );
        assert!(!said(403).contains("enableWebsockets"));
        assert!(said(418).contains("refused the upgrade"));
        let with_body = |status: u16, body: &str| {
            let mut response = http::Response::new(Some(body.as_bytes().to_vec()));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            handshake_failure(&Error::Http(Box::new(response)))
        };
        let hub = with_body(
            400,
            "towerctl hub: a PROXY protocol header from an address not trusted to send one.\nmore\n",
        );
        assert!(
            hub.ends_with(
                "the hub says: a PROXY protocol header from an address not trusted to send one."
            ),
            "{hub}"
        );
        assert!(
            with_body(400, "Client sent an HTTP request to an HTTPS server.\n")
                .contains("join with wss://"),
        );
        let other = handshake_failure(&Error::ConnectionClosed);
        assert!(other.starts_with("WebSocket handshake failed: "), "{other}");
        assert!(!other.contains("HTTP"), "{other}");
    }
}
