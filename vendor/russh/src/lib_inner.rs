use std::convert::TryFrom;
use std::fmt::{Debug, Display, Formatter};
use std::future::{Future, Pending};
use std::pin::Pin;

use futures::future::Either as EitherFuture;
use log::warn;
use parsing::ChannelOpenConfirmation;
pub use russh_cryptovec::CryptoVec;
use ssh_encoding::{Decode, Encode};
use thiserror::Error;
use tokio::io::AsyncWrite;

#[cfg(test)]
mod tests;

mod auth;

mod cert;
/// Cipher names
pub mod cipher;
/// Compression algorithm names
pub mod compression;
/// Key exchange algorithm names
pub mod kex;
/// MAC algorithm names
pub mod mac;

pub mod keys;

mod msg;
mod negotiation;
mod ssh_read;
mod sshbuffer;

pub use negotiation::{Names, Preferred};

mod pty;

pub use pty::Pty;
pub use sshbuffer::SshId;

mod helpers;

pub(crate) use helpers::map_err;

macro_rules! push_packet {
    ( $buffer:expr, $x:expr ) => {{
        use byteorder::{BigEndian, ByteOrder};
        let i0 = $buffer.len();
        $buffer.extend(b"\0\0\0\0");
        let x = $x;
        let i1 = $buffer.len();
        use std::ops::DerefMut;
        let buf = $buffer.deref_mut();
        #[allow(clippy::indexing_slicing)] // length checked
        BigEndian::write_u32(&mut buf[i0..], (i1 - i0 - 4) as u32);
        x
    }};
}

mod channels;
pub use channels::{Channel, ChannelMsg, ChannelReadHalf, ChannelStream, ChannelWriteHalf};
/// towerctl patch: the most channels a server session keeps unsettled
/// (opened by this side and not answered, or closed by this side and not
/// by the peer); past it the session ends. Open channels do not count.
pub const MAX_SESSION_CHANNELS: usize = 8192;

// towerctl patch: the concrete writer of `ChannelWriteHalf::make_tx`.
pub use channels::io::ChannelTx;

mod parsing;
mod session;

/// Server side of this library.
#[cfg(not(target_arch = "wasm32"))]
pub mod server;

/// Client side of this library.
pub mod client;

#[derive(Debug)]
pub enum AlgorithmKind {
    Kex,
    Key,
    Cipher,
    Compression,
    Mac,
}

#[derive(Debug, Error)]
pub enum Error {
    /// The key file could not be parsed.
    #[error("Could not read key")]
    CouldNotReadKey,

    /// Unspecified problem with the beginning of key exchange.
    #[error("Key exchange init failed")]
    KexInit,

    /// Unknown algorithm name.
    #[error("Unknown algorithm")]
    UnknownAlgo,

    /// No common algorithm found during key exchange.
    #[error("No common {kind:?} algorithm - ours: {ours:?}, theirs: {theirs:?}")]
    NoCommonAlgo {
        kind: AlgorithmKind,
        ours: Vec<String>,
        theirs: Vec<String>,
    },

    /// Invalid SSH version string.
    #[error("invalid SSH version string")]
    Version,

    /// Error during key exchange.
    #[error("Key exchange failed")]
    Kex,

    /// Invalid packet authentication code.
    #[error("Wrong packet authentication code")]
    PacketAuth,

    /// The protocol is in an inconsistent state.
    #[error("Inconsistent state of the protocol")]
    Inconsistent,

    /// The client is not yet authenticated.
    #[error("Not yet authenticated")]
    NotAuthenticated,

    /// The client has presented an unsupported authentication method.
    #[error("Unsupported authentication method")]
    UnsupportedAuthMethod,

    /// Index out of bounds.
    #[error("Index out of bounds")]
    IndexOutOfBounds,

    /// Unknown server key.
    #[error("Unknown server key")]
    UnknownKey,

    /// The server provided a wrong signature.
    #[error("Wrong server signature")]
    WrongServerSig,

    /// Excessive packet size.
    #[error("Bad packet size: {0}")]
    PacketSize(usize),

    /// Message received/sent on unopened channel.
    #[error("Channel not open")]
    WrongChannel,

    /// Server refused to open a channel.
    #[error("Failed to open channel ({0:?})")]
    ChannelOpenFailure(ChannelOpenFailure),

    /// Disconnected
    #[error("Disconnected")]
    Disconnect,

    /// No home directory found when trying to learn new host key.
    #[error("No home directory when saving host key")]
    NoHomeDir,

    /// Remote key changed, this could mean a man-in-the-middle attack
    /// is being performed on the connection.
    #[error("Key changed, line {}", line)]
    KeyChanged { line: usize },

    /// Connection closed by the remote side.
    #[error("Connection closed by the remote side")]
    HUP,

    /// Connection timeout.
    #[error("Connection timeout")]
    ConnectionTimeout,

    /// Keepalive timeout.
    #[error("Keepalive timeout")]
    KeepaliveTimeout,

    /// Inactivity timeout.
    #[error("Inactivity timeout")]
    InactivityTimeout,

    /// towerctl patch: a key exchange the peer did not finish in time
    /// ([`KEX_DEADLINE`]).
    #[error("Key exchange not finished within {0:?}")]
    KexTimeout(std::time::Duration),

    /// towerctl patch: the peer left more than this many channels
    /// unanswered or unclosed ([`MAX_SESSION_CHANNELS`]).
    #[error("More than {0} channels unanswered or not closed by the peer")]
    TooManyChannels(usize),

    /// Missing authentication method.
    #[error("No authentication method")]
    NoAuthMethod,

    #[error("Channel send error")]
    SendError,

    #[error("Pending buffer limit reached")]
    Pending,

    #[error("Failed to decrypt a packet")]
    DecryptionError,

    #[error("The request was rejected by the other party")]
    RequestDenied,

    #[error(transparent)]
    Keys(#[from] crate::keys::Error),

    #[error(transparent)]
    IO(#[from] std::io::Error),

    #[error(transparent)]
    Utf8(#[from] std::str::Utf8Error),

    #[error(transparent)]
    #[cfg(feature = "flate2")]
    Compress(#[from] flate2::CompressError),

    #[error(transparent)]
    #[cfg(feature = "flate2")]
    Decompress(#[from] flate2::DecompressError),

    #[error(transparent)]
    Join(#[from] russh_util::runtime::JoinError),

    #[error(transparent)]
    Elapsed(#[from] tokio::time::error::Elapsed),

    #[error(
        "Violation detected during strict key exchange, message {message_type} at seq no {sequence_number}"
    )]
    StrictKeyExchangeViolation {
        message_type: u8,
        sequence_number: usize,
    },

    #[error("Signature: {0}")]
    Signature(#[from] signature::Error),

    #[error("SshKey: {0}")]
    SshKey(#[from] ssh_key::Error),

    #[error("SshEncoding: {0}")]
    SshEncoding(#[from] ssh_encoding::Error),

    #[error("Invalid config: {0}")]
    InvalidConfig(String),

    /// This error occurs when the channel is closed and there are no remaining messages in the channel buffer.
    /// This is common in SSH-Agent, for example when the Agent client directly rejects an authorization request.
    #[error("Unable to receive more messages from the channel")]
    RecvError,
}

pub(crate) fn strict_kex_violation(message_type: u8, sequence_number: usize) -> crate::Error {
    warn!(
        "strict kex violated at sequence no. {sequence_number:?}, message type: {message_type:?}"
    );
    crate::Error::StrictKeyExchangeViolation {
        message_type,
        sequence_number,
    }
}

#[derive(Debug, Error)]
#[error("Could not reach the event loop")]
pub struct SendError {}

/// The number of bytes read/written, and the number of seconds before a key
/// re-exchange is requested.
#[derive(Debug, Clone)]
pub struct Limits {
    pub rekey_write_limit: usize,
    pub rekey_read_limit: usize,
    pub rekey_time_limit: std::time::Duration,
}

impl Limits {
    /// Create a new `Limits`, checking that the given bounds cannot lead to
    /// nonce reuse.
    pub fn new(write_limit: usize, read_limit: usize, time_limit: std::time::Duration) -> Limits {
        assert!(write_limit <= 1 << 30 && read_limit <= 1 << 30);
        Limits {
            rekey_write_limit: write_limit,
            rekey_read_limit: read_limit,
            rekey_time_limit: time_limit,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        // Following the recommendations of
        // https://tools.ietf.org/html/rfc4253#section-9
        Limits {
            rekey_write_limit: 1 << 30, // 1 Gb
            rekey_read_limit: 1 << 30,  // 1 Gb
            rekey_time_limit: std::time::Duration::from_secs(3600),
        }
    }
}

pub use auth::{
    AgentAuthError, GssapiAuthenticator, GssapiError, GssapiStep, MethodKind, MethodSet, Signer,
};

/// A reason for disconnection.
#[allow(missing_docs)] // This should be relatively self-explanatory.
#[allow(clippy::manual_non_exhaustive)]
#[derive(Debug)]
pub enum Disconnect {
    HostNotAllowedToConnect = 1,
    ProtocolError = 2,
    KeyExchangeFailed = 3,
    #[doc(hidden)]
    Reserved = 4,
    MACError = 5,
    CompressionError = 6,
    ServiceNotAvailable = 7,
    ProtocolVersionNotSupported = 8,
    HostKeyNotVerifiable = 9,
    ConnectionLost = 10,
    ByApplication = 11,
    TooManyConnections = 12,
    AuthCancelledByUser = 13,
    NoMoreAuthMethodsAvailable = 14,
    IllegalUserName = 15,
}

impl TryFrom<u32> for Disconnect {
    type Error = crate::Error;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::HostNotAllowedToConnect,
            2 => Self::ProtocolError,
            3 => Self::KeyExchangeFailed,
            4 => Self::Reserved,
            5 => Self::MACError,
            6 => Self::CompressionError,
            7 => Self::ServiceNotAvailable,
            8 => Self::ProtocolVersionNotSupported,
            9 => Self::HostKeyNotVerifiable,
            10 => Self::ConnectionLost,
            11 => Self::ByApplication,
            12 => Self::TooManyConnections,
            13 => Self::AuthCancelledByUser,
            14 => Self::NoMoreAuthMethodsAvailable,
            15 => Self::IllegalUserName,
            _ => return Err(crate::Error::Inconsistent),
        })
    }
}

/// The type of signals that can be sent to a remote process. If you
/// plan to use custom signals, read [the
/// RFC](https://tools.ietf.org/html/rfc4254#section-6.10) to
/// understand the encoding.
#[allow(missing_docs)]
// This should be relatively self-explanatory.
#[derive(Debug, Clone)]
pub enum Sig {
    ABRT,
    ALRM,
    FPE,
    HUP,
    ILL,
    INT,
    KILL,
    PIPE,
    QUIT,
    SEGV,
    TERM,
    USR1,
    Custom(String),
}

impl Sig {
    fn name(&self) -> &str {
        match *self {
            Sig::ABRT => "ABRT",
            Sig::ALRM => "ALRM",
            Sig::FPE => "FPE",
            Sig::HUP => "HUP",
            Sig::ILL => "ILL",
            Sig::INT => "INT",
            Sig::KILL => "KILL",
            Sig::PIPE => "PIPE",
            Sig::QUIT => "QUIT",
            Sig::SEGV => "SEGV",
            Sig::TERM => "TERM",
            Sig::USR1 => "USR1",
            Sig::Custom(ref c) => c,
        }
    }
    fn from_name(name: &str) -> Sig {
        match name {
            "ABRT" => Sig::ABRT,
            "ALRM" => Sig::ALRM,
            "FPE" => Sig::FPE,
            "HUP" => Sig::HUP,
            "ILL" => Sig::ILL,
            "INT" => Sig::INT,
            "KILL" => Sig::KILL,
            "PIPE" => Sig::PIPE,
            "QUIT" => Sig::QUIT,
            "SEGV" => Sig::SEGV,
            "TERM" => Sig::TERM,
            "USR1" => Sig::USR1,
            x => Sig::Custom(x.to_string()),
        }
    }
}

/// Reason for not being able to open a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ChannelOpenFailure {
    AdministrativelyProhibited,
    ConnectFailed,
    UnknownChannelType,
    ResourceShortage,
    Other { code: u32, reason: String },
}

impl ChannelOpenFailure {
    pub(crate) fn from_u32(x: u32) -> Option<ChannelOpenFailure> {
        match x {
            1 => Some(Self::AdministrativelyProhibited),
            2 => Some(Self::ConnectFailed),
            3 => Some(Self::UnknownChannelType),
            4 => Some(Self::ResourceShortage),
            code => Some(Self::Other {
                code,
                reason: format!("Unknown code {code}"),
            }),
        }
    }

    /// SSH protocol reason code for this failure
    pub fn code(&self) -> u32 {
        match self {
            Self::AdministrativelyProhibited => 1,
            Self::ConnectFailed => 2,
            Self::UnknownChannelType => 3,
            Self::ResourceShortage => 4,
            Self::Other { code, .. } => *code,
        }
    }

    /// A human-readable description of this failure.
    pub fn description(&self) -> &str {
        match self {
            Self::AdministrativelyProhibited => "Administratively prohibited",
            Self::ConnectFailed => "Connect failed",
            Self::UnknownChannelType => "Unknown channel type",
            Self::ResourceShortage => "Resource shortage",
            Self::Other { reason, .. } => reason.as_str(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Ord, PartialOrd)]
/// The identifier of a channel.
pub struct ChannelId(u32);

/// towerctl patch: the sessions' channel maps, hashed with a keyed
/// 64x64->128-bit multiplication ([`ChannelIdHasher`]) instead of SipHash.
/// Every channel packet looks a channel up three or four times; with
/// SipHash that was 2 % of the instructions per forwarded request on each
/// side. The keys are this side's own channel numbers, handed out in turn
/// (`new_channel_id`), but a peer decides which of them stay (it can have
/// its own opens refused and keep only the numbers it likes), so the hash
/// is keyed per process from the OS, as SipHash's was: the peer cannot
/// tell which numbers share a bucket.
#[doc(hidden)]
pub type ChannelMap<V> =
    std::collections::HashMap<ChannelId, V, std::hash::BuildHasherDefault<ChannelIdHasher>>;

/// See [`ChannelMap`]: the folded product of the number (xored with one
/// key) and the other key, as foldhash folds one word, then one
/// multiply-xorshift.
#[doc(hidden)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ChannelIdHasher(u64);

impl ChannelIdHasher {
    /// Two keys drawn once per process (std's `RandomState` takes them
    /// from the OS); the multiplier odd.
    fn keys() -> (u64, u64) {
        use std::hash::BuildHasher;
        static KEYS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        *KEYS.get_or_init(|| {
            let s = std::collections::hash_map::RandomState::new();
            (s.hash_one(1u8), s.hash_one(2u8) | 1)
        })
    }
}

impl std::hash::Hasher for ChannelIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = self.0.rotate_left(32) ^ u64::from(n);
    }

    fn finish(&self) -> u64 {
        let (k0, k1) = Self::keys();
        let full = u128::from(self.0 ^ k0) * u128::from(k1);
        // Folded, then mixed once more: the fold alone left numbers a
        // power of two apart crowded in the low bits (the bucket).
        let h = ((full as u64) ^ ((full >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 32)
    }
}

impl ChannelId {
    // Not public to prevent construction of invalid
    // ChannelIds by the library user
    pub fn number(&self) -> u32 {
        self.0
    }
}

impl Decode for ChannelId {
    type Error = ssh_encoding::Error;

    fn decode(reader: &mut impl ssh_encoding::Reader) -> Result<Self, Self::Error> {
        Ok(Self(u32::decode(reader)?))
    }
}

impl Encode for ChannelId {
    fn encoded_len(&self) -> Result<usize, ssh_encoding::Error> {
        self.0.encoded_len()
    }

    fn encode(&self, writer: &mut impl ssh_encoding::Writer) -> Result<(), ssh_encoding::Error> {
        self.0.encode(writer)
    }
}

impl From<ChannelId> for u32 {
    fn from(c: ChannelId) -> u32 {
        c.0
    }
}

impl Display for ChannelId {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The parameters of a channel.
#[derive(Debug)]
pub(crate) struct ChannelParams {
    recipient_channel: u32,
    sender_channel: ChannelId,
    recipient_window_size: u32,
    sender_window_size: u32,
    recipient_maximum_packet_size: u32,
    sender_maximum_packet_size: u32,
    /// Has the other side confirmed the channel?
    pub confirmed: bool,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    wants_reply: bool,
    /// (buffer, extended stream #, data offset in buffer)
    pending_data: std::collections::VecDeque<(bytes::Bytes, Option<u32>, usize)>,
    pending_eof: bool,
    pending_close: bool,
}

impl ChannelParams {
    pub fn confirm(&mut self, c: &ChannelOpenConfirmation) {
        self.recipient_channel = c.sender_channel; // "sender" is the sender of the confirmation
        self.recipient_window_size = c.initial_window_size;
        self.recipient_maximum_packet_size = c.maximum_packet_size;
        self.confirmed = true;
    }

    pub(crate) fn take_pending_controls(&mut self) -> (bool, bool) {
        (
            std::mem::take(&mut self.pending_eof),
            std::mem::take(&mut self.pending_close),
        )
    }
}

/// towerctl patch: how long a session that ended waits to write what it
/// left unwritten, to shut its stream, and (server) for the peer to close.
pub(crate) const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// towerctl patch: encrypted output left unwritten (the stream full) above
/// which a session loop takes no more messages from its channels: they wait
/// in their bounded queues, as they did while the loop waited for its
/// writes. One batch may go past it (the server's: 64 messages, and no
/// more once [`OUTPUT_BATCH_BYTES`] past it; the client's batch stops at
/// [`OUTPUT_TURN_BYTES`], so it passes it only by one message).
/// Everything a session sends waits behind this much on a link slower
/// than the writer: on a 20 Mbit/s member link with one download through
/// the tunnel, 1 MiB held every other request's answer ~0.4 s more (a
/// kubectl call 1.58 s against 0.92 s with 256 KiB; on loopback the two
/// measured within the rounds' spread).
pub(crate) const OUTPUT_HIGH_WATER: usize = 256 * 1024;

/// towerctl patch: how far past [`OUTPUT_HIGH_WATER`] the server's batch
/// may take output: 64 packets of 32 KiB, whatever the packet size.
pub(crate) const OUTPUT_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// towerctl patch: output (unwritten, counted with what waits to be
/// encrypted) at which the client's eager batch stops taking messages from
/// its channels (as high as [`OUTPUT_HIGH_WATER`] now): each packet is encrypted
/// as it is taken, and a batch of 1 MiB was encrypted whole before its
/// write began, so the kernel's copy of its first packets into the socket
/// read them back from memory. perf on the agent during a download through
/// the hub-served port-forward: `_copy_from_iter` 16–30 % of its samples
/// with 1 MiB batches, 8 % with 256 KiB. The server's batch (the hub's,
/// on an upload) is left as it was: 256 KiB there measured no better.
pub(crate) const OUTPUT_TURN_BYTES: usize = 256 * 1024;

/// towerctl patch: unwritten output above which a session loop stops
/// reading the peer too. The loop's own messages stop at
/// [`OUTPUT_HIGH_WATER`] plus a batch (2.25 MiB at most), and reading yields
/// little output of its own (window adjustments, replies), so only a peer
/// that sends requests and never reads gets here; it is then held as
/// before (the keepalives end it), having cost at most this much. Kept
/// near what one batch could hold before (2 MiB): each member's key
/// holder may be that peer.
pub(crate) const OUTPUT_READ_LIMIT: usize = 4 * 1024 * 1024;

/// towerctl patch: longest a key exchange may go without progress (see the
/// server's session loop) once started, by either side, before the server
/// ends the session. While one is under way the
/// session loop takes no message (no channel data, no DISCONNECT), and
/// nothing bounded it: a peer that sent KEXINIT and never went on, keeping
/// the session alive with IGNORE packets, held it, and its connection,
/// for ever. An exchange takes a round trip or two.
pub const KEX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// towerctl patch: writes what the stream takes now, without waiting for
/// the rest (a `select!` arm of the session loop writes it, while the loop
/// goes on reading).
pub(crate) async fn write_ready<W: AsyncWrite + Unpin>(
    writer: &mut sshbuffer::PacketWriter,
    stream: &mut W,
) -> Result<(), Error> {
    std::future::poll_fn(|cx| match writer.poll_write_out(cx, stream) {
        std::task::Poll::Pending => std::task::Poll::Ready(Ok(())),
        std::task::Poll::Ready(r) => std::task::Poll::Ready(r),
    })
    .await?;
    Ok(())
}

/// towerctl patch: the session loop's write arm: Ready once the stream took
/// more of the output (or failed).
pub(crate) async fn write_some<W: AsyncWrite + Unpin>(
    writer: &mut sshbuffer::PacketWriter,
    stream: &mut W,
) -> Result<(), Error> {
    std::future::poll_fn(|cx| {
        let before = writer.unwritten();
        match writer.poll_write_out(cx, stream) {
            std::task::Poll::Pending if writer.unwritten() == before => std::task::Poll::Pending,
            std::task::Poll::Pending => std::task::Poll::Ready(Ok(())),
            std::task::Poll::Ready(r) => std::task::Poll::Ready(r),
        }
    })
    .await?;
    Ok(())
}

/// towerctl patch: a session's rekey timer, one `Sleep` for the whole
/// session, moved only when its deadline does (a rekey, the write limit
/// reached) instead of a new `Sleep` every turn of the session loop.
#[derive(Default)]
pub(crate) struct RekeyTimer {
    /// The deadline the timer is set for; `None` when there is none, or it
    /// fired and has not been set again.
    at: Option<tokio::time::Instant>,
}

impl RekeyTimer {
    /// What the timer is set to while it has no deadline.
    pub(crate) const FAR: std::time::Duration = std::time::Duration::from_secs(86_400 * 365);

    /// Sets `timer` for `remaining` from now when that is not the deadline
    /// it is set for already (within a second later: the time limit's
    /// deadline, recomputed each turn, moves by what the clock moved).
    pub(crate) fn arm(
        &mut self,
        timer: Pin<&mut tokio::time::Sleep>,
        remaining: Option<std::time::Duration>,
    ) {
        let Some(remaining) = remaining else {
            self.at = None;
            return;
        };
        // A limit too far to add (a rekey by time turned off with a huge
        // limit) is as good as none.
        let Some(at) = tokio::time::Instant::now().checked_add(remaining.min(Self::FAR)) else {
            self.at = None;
            return;
        };
        let set = match self.at {
            None => true,
            Some(current) => {
                at + std::time::Duration::from_millis(10) < current
                    || at > current + std::time::Duration::from_secs(1)
            }
        };
        if set {
            timer.reset(at);
            self.at = Some(at);
        }
    }

    /// Whether the timer is set (its branch may be polled).
    pub(crate) fn armed(&self) -> bool {
        self.at.is_some()
    }

    /// The timer fired: it is set again on the next turn.
    pub(crate) fn fired(&mut self) {
        self.at = None;
    }
}

/// towerctl patch: whether a keepalive is due, a whole `interval` after
/// the last sign of life at `from` (the timer is moved only when it fires).
pub(crate) fn keepalive_due(
    from: tokio::time::Instant,
    interval: Option<std::time::Duration>,
) -> bool {
    interval.is_none_or(|d| from + d <= tokio::time::Instant::now())
}

/// Returns `f(val)` if `val` it is [Some], or a forever pending [Future] if it is [None].
pub(crate) fn future_or_pending<R, F: Future<Output = R>, T>(
    val: Option<T>,
    f: impl FnOnce(T) -> F,
) -> EitherFuture<Pending<R>, F> {
    match val {
        None => EitherFuture::Left(core::future::pending()),
        Some(x) => EitherFuture::Right(f(x)),
    }
}

/// Pending channel-open state, passed through the reply handle to the session loop.
#[derive(Debug)]
#[doc(hidden)]
pub struct PendingChannelOpen {
    pub(crate) recipient_channel: u32,
    pub(crate) sender_channel: ChannelId,
    pub(crate) window_size: u32,
    pub(crate) packet_size: u32,
    pub(crate) channel_ref: channels::ChannelRef,
    pub(crate) channel_params: ChannelParams,
}

/// A handle passed to channel-open callbacks that the handler uses to
/// accept or reject the incoming channel request.
///
/// Dropping the handle without calling [`accept`](ChannelOpenHandle::accept) or
/// [`reject`](ChannelOpenHandle::reject) automatically sends an
/// `AdministrativelyProhibited` rejection.
pub struct ChannelOpenHandleInner<M: Send> {
    sender: tokio::sync::mpsc::UnboundedSender<M>,
    inner: Option<PendingChannelOpen>,
    make_msg: fn(PendingChannelOpen, Result<(), ChannelOpenFailure>) -> M,
}

impl<M: Send> ChannelOpenHandleInner<M> {
    pub(crate) fn new(
        sender: tokio::sync::mpsc::UnboundedSender<M>,
        pending: PendingChannelOpen,
        make_msg: fn(PendingChannelOpen, Result<(), ChannelOpenFailure>) -> M,
    ) -> Self {
        Self {
            sender,
            inner: Some(pending),
            make_msg,
        }
    }

    /// Accept the channel open request.
    pub async fn accept(mut self) {
        if let Some(pending) = self.inner.take() {
            let _ = self.sender.send((self.make_msg)(pending, Ok(())));
        }
    }

    /// Reject the channel open request with a reason.
    pub async fn reject(mut self, reason: ChannelOpenFailure) {
        if let Some(pending) = self.inner.take() {
            let _ = self.sender.send((self.make_msg)(pending, Err(reason)));
        }
    }
}

impl<M: Send> Drop for ChannelOpenHandleInner<M> {
    fn drop(&mut self) {
        if let Some(pending) = self.inner.take() {
            let _ = self.sender.send((self.make_msg)(
                pending,
                Err(ChannelOpenFailure::AdministrativelyProhibited),
            ));
        }
    }
}
