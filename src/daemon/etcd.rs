//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`,
//! `/v3/lease/*`, `/v3/watch`): keys and values base64, 64-bit integers as
//! strings. No gRPC or protoc in the build.
//!
//! Blocking on purpose: the hub's [`Store`](super::store::Store) trait is
//! synchronous, and the etcd-backed store answers every read from a cache
//! kept current by one watch stream, so only writes (rare: joins, registry
//! changes, session ownership) wait on the network, each bounded by
//! [`TIMEOUT`]. The watch and the lease keepalive run on their own threads.
//!
//! TLS (`https://` endpoints) with rustls: etcd's CA from `--store-ca` (or
//! the system store), and a client certificate (`--store-cert`/`--store-key`)
//! for an etcd started with `--client-cert-auth`.
//!
//! For an etcd with authentication enabled, a user and its password
//! (`--store-user`, `--store-password-file`): etcd's JSON gateway does not
//! take a client certificate's name as the user, so a password is the one
//! way in. The token etcd gives for them is held and sent with every
//! request; asked for again when etcd no longer knows it (a simple token
//! left unused past etcd's `--auth-token-ttl`, a JWT past its life,
//! authentication turned off and on).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// Bound on one unary request (connect, send, answer).
pub const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints} did not answer ({reason}); registry changes and new joins fail until it is back (a change sent just now may still apply then: check with 'towerctl cluster list'); established tunnels keep working")]
    Unreachable {
        endpoints: String,
        reason: String,
        /// An endpoint refused the TLS handshake (its certificate is not
        /// trusted, or it wants a client certificate it trusts): a
        /// configuration to fix, not an outage to wait out.
        tls_refused: bool,
    },
    #[error("etcd at {endpoint} refused the request: {reason}")]
    Refused { endpoint: String, reason: String },
}

/// One key-value pair as etcd returns it (key relative to nothing: raw).
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// One watch event.
#[derive(Debug, Clone)]
pub enum Event {
    Put(Kv),
    Delete { key: String, revision: i64 },
}

/// How to reach etcd, as given on the command line: TLS material, and a
/// user for an etcd with authentication enabled.
#[derive(Debug, Clone, Default)]
pub struct StoreAccess {
    /// CA bundle that issued etcd's serving certificate (default: the
    /// system store).
    pub ca: Option<PathBuf>,
    /// Client certificate chain and its key, for `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user, and the file holding its password (read at start and
    /// again at each login).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl StoreAccess {
    /// Whether no TLS flag is given.
    pub fn tls_is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Most a password file may hold.
const MAX_PASSWORD: u64 = 4096;

/// The password in `path`: its first line, without its line end. Refused
/// when anyone may read the file (a password for the whole registry, the
/// group's CA key among it).
pub fn read_password(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let f = std::fs::File::open(path)
        .map_err(|e| format!("cannot read --store-password-file '{shown}': {e}"))?;
    let mode = f
        .metadata()
        .map_err(|e| format!("cannot read --store-password-file '{shown}': {e}"))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "--store-password-file '{shown}' may be read by anyone (mode {:o}): make it private first (chmod 600 '{shown}')",
            mode & 0o777
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_PASSWORD + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read --store-password-file '{shown}': {e}"))?;
    if buf.len() as u64 > MAX_PASSWORD {
        return Err(format!(
            "--store-password-file '{shown}' is larger than {MAX_PASSWORD} bytes: it holds the etcd user's password alone"
        ));
    }
    let text = String::from_utf8(buf).map_err(|_| {
        format!("--store-password-file '{shown}' is not UTF-8 text: it holds the etcd user's password alone")
    })?;
    let password = text.lines().next().unwrap_or("");
    if password.is_empty() {
        return Err(format!(
            "--store-password-file '{shown}' is empty: write the etcd user's password in it"
        ));
    }
    Ok(password.to_string())
}

/// A user of an etcd with authentication enabled, and what etcd gave it.
struct Credentials {
    user: String,
    password_file: PathBuf,
    /// The password last read from `password_file` (read again at each
    /// login: a password rotated in etcd and in the file, or its Secret,
    /// is taken without a restart).
    password: std::sync::Mutex<String>,
    token: std::sync::Mutex<Token>,
    /// Held while logging in: threads that find no token at once (after
    /// etcd forgot it) wait for one login instead of each making theirs
    /// (each a bcrypt and a raft write in etcd), and while logins are
    /// refused (`refused`) they are not tried again.
    login: std::sync::Mutex<Refused>,
}

/// The last login etcd refused (a wrong password, a user removed): its
/// answer stands for every call until `until`, the wait doubling from
/// 1 s to 30 s while refusals go on. Each login tried costs etcd a bcrypt:
/// an idle hub with a stale password made one every call.
#[derive(Default)]
struct Refused {
    answer: Option<(u16, Vec<u8>)>,
    until: Option<std::time::Instant>,
    wait: Duration,
}

#[derive(Clone, PartialEq)]
pub enum Token {
    /// To be asked for.
    Unknown,
    Held(String),
    /// etcd said its authentication is not enabled: requests go without.
    NotNeeded,
}

impl Credentials {
    fn current(&self) -> Token {
        self.token.lock().map_or(Token::Unknown, |t| t.clone())
    }

    /// Forgets `refused` (unless another thread replaced it meanwhile).
    fn forget(&self, refused: &Token) {
        if let Ok(mut t) = self.token.lock() {
            if *t == *refused {
                *t = Token::Unknown;
            }
        }
    }

    fn set(&self, token: Token) {
        if let Ok(mut t) = self.token.lock() {
            *t = token;
        }
    }

    /// A token fresh from a login refused all the same (a proxy that
    /// drops the header, a clock skewed past a JWT's life): no login for
    /// a while, as after a refused one.
    fn refuse(&self, token: &Token, answer: (u16, Vec<u8>)) {
        let mut r = self.login.lock().unwrap_or_else(|p| p.into_inner());
        r.refused(answer);
        drop(r);
        self.forget(token);
    }
}

impl Refused {
    fn refused(&mut self, answer: (u16, Vec<u8>)) {
        self.wait = (self.wait * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.until = Some(std::time::Instant::now() + self.wait);
        self.answer = Some(answer);
    }
}

/// Whether etcd refused a request for its token (expired, unknown, or
/// issued before a change of users or roles, as a JWT says), or for
/// having none (authentication enabled since).
fn token_refused(status: u16, body: &[u8]) -> bool {
    status == 401 || (status == 400 && names_token_refusal(body))
}

/// Whether etcd's words `text` refuse a request for its token, or for
/// having none: an answer's body, or a watch's cancel reason.
fn names_token_refusal(text: &[u8]) -> bool {
    [
        "invalid auth token",
        "user name is empty",
        "revision of auth store is old",
    ]
    .iter()
    .any(|words| contains(text, words))
}

/// etcd's words in an answer `body` (its `error`, else the body itself),
/// escaped and bounded: they are shown in logs and CLI errors.
fn answer_words(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    crate::tunnel::printable(
        v["error"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or(&String::from_utf8_lossy(body))
            .trim(),
        300,
    )
}

fn contains(body: &[u8], text: &str) -> bool {
    body.windows(text.len()).any(|w| w == text.as_bytes())
}

/// What to do about an etcd refusal `msg` that a flag fixes, appended to it.
fn hint(msg: &str, user: Option<&str>) -> String {
    let fix = if msg.contains("user name is empty") {
        match user {
            None => "etcd has authentication enabled: give --store-user and --store-password-file (a user whose role may read and write the keys under --store-prefix)".to_string(),
            Some(_) => "etcd received the request without the hub's token: something between the hub and etcd drops the Authorization header".to_string(),
        }
    } else if msg.contains("invalid user ID or password") {
        "etcd refused the user or its password: fix --store-user, or the password in --store-password-file (read again at the next login, tried again within 30 s)".to_string()
    } else if msg.contains(NO_SPACE) {
        "etcd is out of space (its --quota-backend-bytes; a NOSPACE alarm): it takes only reads and deletes until its admin compacts, defragments and disarms it (etcdctl compact REV; etcdctl defrag; etcdctl alarm disarm); meanwhile the hubs serve the members they hold, and 'towerctl cluster rm' and 'operator rm' still work".to_string()
    } else if msg.contains("permission denied") {
        match user {
            Some(u) => format!("the etcd user '{}' may not read or write the keys under --store-prefix: grant its role readwrite on them (etcdctl role grant-permission ROLE readwrite --prefix=true PREFIX)", crate::tunnel::printable(u, 100)),
            None => "etcd refused it for want of a user: give --store-user and --store-password-file".to_string(),
        }
    } else {
        return String::new();
    };
    format!(": {fix}")
}

/// Most a PEM file given for etcd may hold.
const MAX_PEM: u64 = 1 << 20;

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM).read_to_end(&mut buf))
        .map_err(|e| format!("cannot read {flag} '{}': {e}", path.display()))?;
    Ok(buf)
}

fn read_certs(
    flag: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let buf = read_pem(flag, path)?;
    let certs = rustls_pemfile::certs(&mut buf.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} '{}' is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} '{}' holds no PEM certificate ('-----BEGIN CERTIFICATE-----')",
            path.display()
        ));
    }
    Ok(certs)
}

/// The rustls client configuration for `tls`.
fn client_config(tls: &StoreAccess) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            for (i, c) in read_certs("--store-ca", path)?.into_iter().enumerate() {
                roots.add(c).map_err(|e| {
                    format!(
                        "--store-ca '{}': certificate {} is not a usable CA certificate: {e}",
                        path.display(),
                        i + 1
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS for etcd: {e}"))?
    .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) | (None, Some(_)) => Err(
            "--store-cert and --store-key go together: pass the client certificate and its key"
                .into(),
        ),
        (Some(cert), Some(key)) => {
            let chain = read_certs("--store-cert", cert)?;
            let buf = read_pem("--store-key", key)?;
            let key_der = rustls_pemfile::private_key(&mut buf.as_slice())
                .map_err(|e| format!("--store-key '{}' is not valid PEM: {e}", key.display()))?
                .ok_or_else(|| {
                    format!(
                        "--store-key '{}' holds no private key ('-----BEGIN PRIVATE KEY-----', RSA or EC)",
                        key.display()
                    )
                })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                format!(
                    "--store-cert '{}' and --store-key '{}' do not make a client certificate: {e}",
                    cert.display(),
                    key.display()
                )
            })
        }
    }
}

/// The TLS configuration for etcd, made again from its files when they
/// change: a client certificate renewed on disk (cert-manager, a short
/// lifetime) is used by the next connection, looked at once every
/// [`TlsFiles::CHECK`] at most. It was read once at start: at its expiry
/// every hub refused operators until restarted, all at the same moment.
/// Files that cannot be used (half written, a key without its
/// certificate yet) are said once and the configuration in use is kept.
struct TlsFiles {
    access: StoreAccess,
    state: std::sync::Mutex<TlsState>,
}

struct TlsState {
    config: Arc<rustls::ClientConfig>,
    /// The files' bytes the configuration was made from (a hash).
    made_from: u64,
    /// The files' bytes last found unusable, said once.
    refused: Option<u64>,
    checked: std::time::Instant,
}

impl TlsFiles {
    const CHECK: Duration = Duration::from_secs(5);

    fn read(access: &StoreAccess) -> Result<TlsFiles, String> {
        let made_from = Self::fingerprint(access);
        let config = Arc::new(client_config(access)?);
        Ok(TlsFiles {
            access: access.clone(),
            state: std::sync::Mutex::new(TlsState {
                config,
                made_from,
                refused: None,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// A hash of the CA, certificate and key files' bytes.
    fn fingerprint(access: &StoreAccess) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in [&access.ca, &access.cert, &access.key]
            .into_iter()
            .flatten()
        {
            std::fs::read(p).ok().hash(&mut h);
        }
        h.finish()
    }

    /// Words for a client certificate (`--store-cert`) past its end.
    fn expired(&self) -> Option<String> {
        let path = self.access.cert.as_ref()?;
        let facts = crate::daemon::x509::leaf_facts(&crate::daemon::x509::first_pem_cert(path)?)?;
        let now = rustls::pki_types::UnixTime::now();
        (now.as_secs() > facts.not_after).then(|| {
            format!(
                "the client certificate --store-cert '{}' expired on {}: renew it and its key in place (the hub reads them again within {} s of a change, no restart)",
                path.display(),
                crate::tunnel::tls::utc(&rustls::pki_types::UnixTime::since_unix_epoch(
                    Duration::from_secs(facts.not_after)
                )),
                Self::CHECK.as_secs()
            )
        })
    }

    /// The configuration for a new connection, made again first if its
    /// files changed.
    fn current(&self) -> Arc<rustls::ClientConfig> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= Self::CHECK {
            st.checked = std::time::Instant::now();
            let now = Self::fingerprint(&self.access);
            if now != st.made_from && st.refused != Some(now) {
                match client_config(&self.access) {
                    Ok(c) => {
                        tracing::info!("etcd's TLS files changed (--store-ca, --store-cert, --store-key): new connections to etcd use them");
                        st.config = Arc::new(c);
                        st.made_from = now;
                        st.refused = None;
                    }
                    Err(e) => {
                        tracing::warn!("etcd's TLS files changed but cannot be used ({e}); connections to etcd go on with the ones read before");
                        st.refused = Some(now);
                    }
                }
            }
        }
        st.config.clone()
    }
}

/// One connection to an etcd endpoint.
enum Conn {
    Plain(Timed),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Timed>>),
}

/// The socket of a connection, read under a unary call's deadline: reads
/// fail past it (each waits at most what is left). The socket's read
/// timeout alone bounds each read, and an answer trickled a byte at a time
/// held the call (and the thread: a login's, the lease's) for ever. Under
/// rustls, which reads the socket itself until a record is whole.
struct Timed {
    tcp: TcpStream,
    until: Option<(std::time::Instant, Duration)>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some((until, each)) = self.until {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left.min(each)))?;
        }
        self.tcp.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Longest one answer (a unary call's body, one watch message) may be.
const MAX_ANSWER: usize = 64 << 20;

/// Longest line of an answer's head or a chunk size.
const MAX_LINE: u64 = 16 * 1024;

/// Longest a unary call to one endpoint may take, from its connection to
/// the end of its answer; a listing of the whole registry (at start, after
/// a break) gets [`LIST_DEADLINE`].
const CALL_DEADLINE: Duration = Duration::from_secs(8);
const LIST_DEADLINE: Duration = Duration::from_secs(60);

impl Conn {
    fn timed(&mut self) -> &mut Timed {
        match self {
            Conn::Plain(t) => t,
            Conn::Tls(s) => &mut s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// One line (an answer's status or header line, a chunk size), at most
/// [`MAX_LINE`] bytes: a peer sending a line without end made the hub
/// buffer it without limit.
fn read_line(r: &mut BufReader<Conn>, line: &mut String) -> std::io::Result<usize> {
    let n = r.by_ref().take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(std::io::Error::other("a line of etcd's answer is too long"));
    }
    Ok(n)
}

fn too_large() -> std::io::Error {
    std::io::Error::other(format!(
        "etcd's answer is larger than {} MiB (a registry this large, or not etcd answering)",
        MAX_ANSWER >> 20
    ))
}

/// What a failed TLS exchange most likely needs, appended to its error.
fn explain(e: std::io::Error, tls: Option<&TlsFiles>) -> String {
    use std::io::ErrorKind::*;
    let text = e.to_string();
    // An expired client certificate is the likeliest reason of all.
    let hint = || match tls.and_then(TlsFiles::expired) {
        Some(expired) => expired,
        None => CLIENT_CERT_HINT.to_string(),
    };
    match e.kind() {
        InvalidData if text.contains("peer certificate") => format!(
            "TLS: {text}: etcd's certificate is not trusted: pass the CA that issued it with --store-ca"
        ),
        InvalidData if text.contains("alert") => format!("TLS: {text}: {}", hint()),
        InvalidData if tls.is_some() => format!("TLS: {text}"),
        // A server that wants a client certificate and got none (or one it
        // does not trust) closes the connection after the handshake.
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof if tls.is_some() => {
            format!("{text}: {}", hint())
        }
        // A read or write deadline passed: the socket says "Resource
        // temporarily unavailable", which reads like a local fault.
        WouldBlock | TimedOut => {
            "no answer in time (etcd stopped, overloaded, without its quorum, or out of reach)"
                .to_string()
        }
        _ => text,
    }
}

/// Whether `e`, on a TLS endpoint, is the handshake refused (by either
/// side: a certificate not trusted, an alert, the server closing at once
/// for want of a client certificate), as [`explain`] tells them.
fn refused_tls(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        InvalidData | BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
}

const CLIENT_CERT_HINT: &str = "etcd closed the TLS connection, most likely for want of a client certificate it trusts: pass --store-cert and --store-key, a pair signed by the CA etcd's --trusted-ca-file names";

pub struct Etcd {
    endpoints: Vec<String>,
    /// `Some` for `https://` endpoints.
    tls: Option<TlsFiles>,
    /// `Some` with `--store-user`.
    credentials: Option<Credentials>,
    next: AtomicUsize,
    /// After every endpoint failed: fail at once until then, so callers
    /// do not each wait out [`TIMEOUT`] while etcd is away.
    down_until: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Each endpoint's addresses as last resolved ([`Etcd::addresses`]).
    resolved: std::sync::Mutex<std::collections::HashMap<String, Vec<std::net::SocketAddr>>>,
    /// Endpoints whose name is being looked up now.
    resolving: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Calls failed so far, by [`CallFailure`].
    failures: [AtomicU64; 3],
}

/// How an etcd call failed, for the hub's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    /// No endpoint answered (or each answered it has no leader).
    Unreachable = 0,
    /// etcd is out of space (a NOSPACE alarm): it refuses writes.
    NoSpace = 1,
    /// Any other refusal (credentials, permissions, a bad answer).
    Refused = 2,
}

impl CallFailure {
    pub const ALL: [CallFailure; 3] = [
        CallFailure::Unreachable,
        CallFailure::NoSpace,
        CallFailure::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallFailure::Unreachable => "unreachable",
            CallFailure::NoSpace => "no_space",
            CallFailure::Refused => "refused",
        }
    }

    fn of(e: &EtcdError) -> CallFailure {
        match e {
            EtcdError::Unreachable { .. } => CallFailure::Unreachable,
            EtcdError::Refused { reason, .. } if reason.contains(NO_SPACE) => CallFailure::NoSpace,
            EtcdError::Refused { .. } => CallFailure::Refused,
        }
    }
}

/// etcd's words for a write refused for want of space (NOSPACE).
const NO_SPACE: &str = "database space exceeded";

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// etcd's JSON gateway writes 64-bit integers as strings, and leaves out
/// zero values.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kv(v: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&unb64(&v["key"])).into_owned(),
        value: unb64(&v["value"]),
        mod_revision: int(&v["mod_revision"]),
    }
}

impl Etcd {
    /// `spec`: `etcd://HOST:PORT[,HOST:PORT…]` (or `http://…`), or
    /// `https://HOST:PORT[,…]` with `tls`.
    pub fn new(spec: &str, tls: &StoreAccess) -> Result<Etcd, String> {
        let (secure, rest) = if let Some(r) = spec.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = spec
            .strip_prefix("etcd://")
            .or_else(|| spec.strip_prefix("http://"))
        {
            (false, r)
        } else {
            return Err(format!("invalid --store '{spec}': use etcd://HOST:PORT[,HOST:PORT…] (plain), or https://HOST:PORT[,…] for TLS with --store-ca/--store-cert/--store-key"));
        };
        if !secure && !tls.tls_is_empty() {
            return Err(format!("--store-ca, --store-cert and --store-key need TLS: write the endpoints as https://HOST:PORT instead of '{spec}'"));
        }
        let credentials = match (&tls.user, &tls.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                if user.is_empty() || user.chars().any(char::is_control) {
                    return Err(format!(
                        "invalid --store-user '{}': give the etcd user's name",
                        crate::tunnel::printable(user, 100)
                    ));
                }
                Some(Credentials {
                    user: user.clone(),
                    password: std::sync::Mutex::new(read_password(file)?),
                    password_file: file.clone(),
                    token: std::sync::Mutex::new(Token::Unknown),
                    login: std::sync::Mutex::new(Refused::default()),
                })
            }
            _ => {
                return Err(
                    "--store-user and --store-password-file go together: pass the etcd user and the file holding its password"
                        .into(),
                )
            }
        };
        let tls = if secure {
            Some(TlsFiles::read(tls)?)
        } else {
            None
        };
        // One scheme for all: `etcd://a:2379,https://b:2379` spoke plain
        // text to b as well (the first endpoint's scheme counted).
        let mut mixed = None;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|e| {
                let e = e.trim();
                let (scheme, e) = ["https://", "http://", "etcd://"]
                    .iter()
                    .find_map(|p| e.strip_prefix(p).map(|r| (Some(*p), r)))
                    .unwrap_or((None, e));
                if scheme.is_some_and(|p| (p == "https://") != secure) {
                    mixed = Some(e.to_string());
                }
                e.trim_end_matches('/').to_string()
            })
            .filter(|e| !e.is_empty())
            .collect();
        if let Some(e) = mixed {
            return Err(format!(
                "invalid --store '{spec}': the endpoint '{e}' names another scheme than the first; write every endpoint with one scheme (all https:// for TLS, or all etcd://)"
            ));
        }
        if endpoints.is_empty() || endpoints.iter().any(|e| !e.contains(':')) {
            return Err(format!(
                "invalid --store '{spec}': every etcd endpoint needs HOST:PORT"
            ));
        }
        Ok(Etcd {
            endpoints,
            tls,
            credentials,
            next: AtomicUsize::new(0),
            down_until: std::sync::Mutex::new(None),
            resolved: Default::default(),
            resolving: Default::default(),
            failures: Default::default(),
        })
    }

    /// Calls failed so far, by kind (in [`CallFailure::ALL`]'s order).
    pub fn failures(&self) -> Vec<(CallFailure, u64)> {
        CallFailure::ALL
            .iter()
            .zip(&self.failures)
            .map(|(f, n)| (*f, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Endpoints reached without TLS on another machine: what crosses the
    /// network to them (the group's CA key and SSH host key among it) is
    /// readable on the way.
    pub fn plaintext_remote(&self) -> Vec<&str> {
        if self.tls.is_some() {
            return Vec::new();
        }
        self.endpoints
            .iter()
            .filter(|e| {
                let host = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
                !crate::tunnel::proxy::is_loopback_host(host)
            })
            .map(String::as_str)
            .collect()
    }

    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// `endpoint`'s addresses, its name looked up within [`TIMEOUT`] (one
    /// lookup at a time per endpoint, on a thread of its own), else as
    /// last found: a name lookup had no bound, and a slow resolver (a
    /// cluster's DNS restarting) held the lease thread past the lease's
    /// life while etcd itself answered; the hub's members then became
    /// unreachable through the other hubs.
    fn addresses(&self, endpoint: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
        if let Ok(a) = endpoint.parse::<std::net::SocketAddr>() {
            return Ok(vec![a]);
        }
        let known = || {
            self.resolved
                .lock()
                .ok()
                .and_then(|r| r.get(endpoint).cloned())
        };
        let started = self
            .resolving
            .lock()
            .is_ok_and(|mut r| r.insert(endpoint.to_string()));
        let found = if started {
            let (tx, rx) = std::sync::mpsc::channel();
            let (name, resolving) = (endpoint.to_string(), self.resolving.clone());
            std::thread::Builder::new()
                .name("etcd-resolve".into())
                .spawn(move || {
                    let r = name.to_socket_addrs().map(|a| a.collect::<Vec<_>>());
                    if let Ok(mut g) = resolving.lock() {
                        g.remove(&name);
                    }
                    let _ = tx.send(r);
                })?;
            rx.recv_timeout(TIMEOUT).ok()
        } else {
            None
        };
        match found {
            Some(Ok(a)) if !a.is_empty() => {
                if let Ok(mut r) = self.resolved.lock() {
                    r.insert(endpoint.to_string(), a.clone());
                }
                Ok(a)
            }
            // Failed or slow: the last addresses found, if any.
            Some(Err(e)) => known().ok_or(e),
            _ => known().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("looking up '{endpoint}' took longer than {TIMEOUT:?}"),
                )
            }),
        }
    }

    /// A connection whose reads end by `deadline` from now (until the
    /// answer's head at least: a watch lifts it then), each read waiting
    /// at most `read_timeout`.
    fn open(
        &self,
        endpoint: &str,
        read_timeout: Option<Duration>,
        deadline: Duration,
    ) -> std::io::Result<Conn> {
        let mut last = None;
        for a in self.addresses(endpoint)? {
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(s) => {
                    s.set_write_timeout(Some(TIMEOUT))?;
                    let _ = s.set_nodelay(true);
                    let by = std::time::Instant::now() + deadline;
                    let Some(cfg) = self.tls.as_ref().map(TlsFiles::current) else {
                        s.set_read_timeout(read_timeout)?;
                        return Ok(Conn::Plain(Timed {
                            tcp: s,
                            until: read_timeout.map(|t| (by, t)),
                        }));
                    };
                    // The handshake is bounded even for the watch's
                    // connection (no read timeout once it is up).
                    let s = Timed {
                        tcp: s,
                        until: Some((by, TIMEOUT)),
                    };
                    let host = endpoint
                        .rsplit_once(':')
                        .map_or(endpoint, |(h, _)| h)
                        .trim_start_matches('[')
                        .trim_end_matches(']');
                    let name = crate::tunnel::tls::server_name(host)
                        .map_err(|e| std::io::Error::other(format!("'{host}': {e}")))?;
                    let conn =
                        rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
                    let mut tls = rustls::StreamOwned::new(conn, s);
                    // Handshake now, within the deadline, so that its
                    // failure is told as such.
                    while tls.conn.is_handshaking() {
                        tls.conn.complete_io(&mut tls.sock)?;
                    }
                    tls.sock.tcp.set_read_timeout(read_timeout)?;
                    tls.sock.until = read_timeout.map(|t| (by, t));
                    return Ok(Conn::Tls(Box::new(tls)));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    }

    /// Sends one POST and returns the reader positioned at the body, and
    /// whether the body is chunked (else its length).
    fn send(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        token: &Token,
        read_timeout: Option<Duration>,
        deadline: Duration,
    ) -> std::io::Result<(u16, BufReader<Conn>, Option<usize>)> {
        let mut s = self.open(endpoint, read_timeout, deadline)?;
        let body = body.to_string();
        let auth = match token {
            Token::Held(t) => format!("Authorization: {t}\r\n"),
            _ => String::new(),
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        s.flush()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        read_line(&mut r, &mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))?;
        let mut length = None;
        loop {
            line.clear();
            if read_line(&mut r, &mut line)? == 0 {
                break;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().ok();
                }
            }
        }
        Ok((status, r, length))
    }

    /// Reads a chunk of a chunked body, at most `max` bytes (checked
    /// before anything is allocated: the size is the peer's word); `None`
    /// at its end.
    fn chunk(r: &mut BufReader<Conn>, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if read_line(r, &mut line)? == 0 {
            return Ok(None);
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(
            |_| {
                std::io::Error::other(format!(
                    "bad chunk size {:?}",
                    crate::tunnel::printable(&line, 40)
                ))
            },
        )?;
        if size == 0 {
            return Ok(None);
        }
        if size > max {
            return Err(too_large());
        }
        let mut buf = vec![0; size + 2];
        r.read_exact(&mut buf)?;
        buf.truncate(size);
        Ok(Some(buf))
    }

    fn read_body(r: &mut BufReader<Conn>, length: Option<usize>) -> std::io::Result<Vec<u8>> {
        match length {
            Some(n) if n > MAX_ANSWER => Err(too_large()),
            Some(n) => {
                let mut b = vec![0; n];
                r.read_exact(&mut b)?;
                Ok(b)
            }
            None => {
                let mut out = Vec::new();
                while let Some(c) = Self::chunk(r, MAX_ANSWER - out.len())? {
                    out.extend(c);
                }
                Ok(out)
            }
        }
    }

    /// One request to `ep` and its whole answer, with the token of
    /// `--store-user` when there is one: asked for first when none is
    /// held, and once more when etcd refuses the one held.
    fn exchange(
        &self,
        ep: &str,
        path: &str,
        body: &Value,
        deadline: Duration,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut again = false;
        loop {
            let token = match self.token(ep, deadline)? {
                Ok(t) => t,
                Err(refused) => return Ok(refused),
            };
            let (st, b) = self
                .send(ep, path, body, &token, Some(TIMEOUT), deadline)
                .and_then(|(st, mut r, len)| Self::read_body(&mut r, len).map(|b| (st, b)))?;
            if let Some(c) = self.credentials.as_ref().filter(|_| token_refused(st, &b)) {
                if again {
                    // Refused twice in a row, the second time just after
                    // a login.
                    c.refuse(&token, (st, b.clone()));
                    return Ok((st, b));
                }
                c.forget(&token);
                again = true;
                continue;
            }
            return Ok((st, b));
        }
    }

    /// The token to send (none without `--store-user`), asked of `ep`
    /// when none is held; `Err` holds etcd's refusal to give one (a wrong
    /// password), to be told as the request's answer.
    fn token(
        &self,
        ep: &str,
        deadline: Duration,
    ) -> std::io::Result<Result<Token, (u16, Vec<u8>)>> {
        let Some(c) = &self.credentials else {
            return Ok(Ok(Token::NotNeeded));
        };
        let held = c.current();
        if held != Token::Unknown {
            return Ok(Ok(held));
        }
        let mut refused = c.login.lock().unwrap_or_else(|p| p.into_inner());
        // Another thread may have logged in meanwhile.
        let held = c.current();
        if held != Token::Unknown {
            return Ok(Ok(held));
        }
        let now = std::time::Instant::now();
        if let (Some(until), Some(answer)) = (refused.until, &refused.answer) {
            if now < until {
                return Ok(Err(answer.clone()));
            }
        }
        let password = {
            let mut p = c.password.lock().unwrap_or_else(|p| p.into_inner());
            match read_password(&c.password_file) {
                Ok(fresh) => *p = fresh,
                Err(e) => tracing::warn!("{e}; logging in to etcd with the password read before"),
            }
            p.clone()
        };
        let (st, b) = self
            .send(
                ep,
                "/v3/auth/authenticate",
                &json!({"name": c.user, "password": password}),
                &Token::NotNeeded,
                Some(TIMEOUT),
                deadline,
            )
            .and_then(|(st, mut r, len)| Self::read_body(&mut r, len).map(|b| (st, b)))?;
        if (400..500).contains(&st) && !contains(&b, "authentication is not enabled") {
            // Refused: not asked again for a while (5xx, an etcd without
            // its leader, goes on to the next endpoint at once).
            refused.refused((st, b.clone()));
            return Ok(Err((st, b)));
        }
        *refused = Refused::default();
        // etcd 3.4 answers 412 (FailedPrecondition); matched by its words.
        if contains(&b, "authentication is not enabled") {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "etcd at {ep} has authentication turned off: --store-user is not used (requests go without a user until etcd asks for one)"
                )
            });
            c.set(Token::NotNeeded);
            return Ok(Ok(Token::NotNeeded));
        }
        if st != 200 {
            return Ok(Err((st, b)));
        }
        let v: Value = serde_json::from_slice(&b).unwrap_or_default();
        // Sent back in a header line: printable ASCII only.
        let Some(token) = v["token"].as_str().filter(|t| {
            !t.is_empty() && t.len() <= 4096 && t.bytes().all(|b| b.is_ascii_graphic())
        }) else {
            // Told as such (a 5xx: the next endpoint is tried), not as an
            // etcd that did not answer.
            let why = json!({"error": "etcd answered the login without a usable token"});
            return Ok(Err((502, why.to_string().into_bytes())));
        };
        tracing::debug!(
            "etcd at {ep} gave a token for user '{}'",
            crate::tunnel::printable(&c.user, 100)
        );
        let token = Token::Held(token.to_string());
        c.set(token.clone());
        Ok(Ok(token))
    }

    /// One unary call, trying each endpoint in turn; for [`TIMEOUT`] after
    /// every endpoint failed, failed at once.
    pub fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        self.call_as(path, body, true, CALL_DEADLINE)
    }

    /// Longest a call that tries every endpoint can take.
    pub fn longest_call(&self) -> std::time::Duration {
        TIMEOUT * self.endpoints.len().max(1) as u32
    }

    fn call_as(
        &self,
        path: &str,
        body: &Value,
        fail_fast: bool,
        deadline: Duration,
    ) -> Result<Value, EtcdError> {
        // Failed in advance while every endpoint failed just now: not
        // counted (etcd was not asked).
        if let Some(Ok(d)) = fail_fast.then(|| self.down_until.lock()) {
            if let Some((until, reason)) = d.as_ref() {
                if std::time::Instant::now() < *until {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoints(),
                        reason: reason.clone(),
                        tls_refused: false,
                    });
                }
            }
        }
        let r = self.ask(path, body, deadline);
        if let Err(e) = &r {
            self.failures[CallFailure::of(e) as usize].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Asks each endpoint in turn.
    fn ask(&self, path: &str, body: &Value, deadline: Duration) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed);
        let mut reason = String::new();
        let mut tls_refused = false;
        // Whether every endpoint answered, with a streaming call's error.
        let mut all_answered = true;
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            let attempt = self.exchange(ep, path, body, deadline);
            match attempt {
                Ok((200, b)) => {
                    let v: Value = match serde_json::from_slice(&b) {
                        Ok(v) => v,
                        Err(e) => {
                            return Err(EtcdError::Refused {
                                endpoint: ep.clone(),
                                reason: format!("unreadable answer: {e}"),
                            })
                        }
                    };
                    // A streaming call's error (a lease renewal's "no
                    // leader") comes in a 200 answer's body: as a 5xx, the
                    // next endpoint is tried (this one may be cut off from
                    // its leader; it is not kept as the one to ask first).
                    if let Some(msg) = stream_error(path, &v) {
                        reason = format!("{ep}: {msg}");
                        continue;
                    }
                    self.next.store(idx, Ordering::Relaxed);
                    if let Ok(mut d) = self.down_until.lock() {
                        *d = None;
                    }
                    return Ok(v);
                }
                Ok((st, b)) => {
                    let msg = answer_words(&b);
                    // etcd answers 503 while it has no leader: try another.
                    if st >= 500 {
                        all_answered = false;
                        reason = format!("{ep}: HTTP {st}: {msg}");
                        continue;
                    }
                    let user = self.credentials.as_ref().map(|c| c.user.as_str());
                    return Err(EtcdError::Refused {
                        endpoint: ep.clone(),
                        reason: format!("HTTP {st}: {msg}{}", hint(&msg, user)),
                    });
                }
                Err(e) => {
                    all_answered = false;
                    tls_refused |= self.tls.is_some() && refused_tls(&e);
                    reason = format!("{ep}: {}", explain(e, self.tls.as_ref()));
                }
            }
        }
        // Every endpoint answered (a renewal refused everywhere): etcd is
        // there, other calls are not failed in advance.
        if all_answered && n > 0 {
            return Err(EtcdError::Refused {
                endpoint: self.endpoints(),
                reason,
            });
        }
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some((std::time::Instant::now() + TIMEOUT, reason.clone()));
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            reason,
            tls_refused,
        })
    }

    /// Every key under `prefix` and the store's revision.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), EtcdError> {
        let v = self.call_as(
            "/v3/kv/range",
            &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
            true,
            LIST_DEADLINE,
        )?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(kv).collect())
            .unwrap_or_default();
        Ok((int(&v["header"]["revision"]), kvs))
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self.call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))?;
        Ok(v["kvs"].as_array().and_then(|a| a.first()).map(kv))
    }

    /// Puts `key`; returns the revision it was written at.
    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut req = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            req["lease"] = json!(lease.to_string());
        }
        let v = self.call("/v3/kv/put", &req)?;
        Ok(int(&v["header"]["revision"]))
    }

    /// A transaction; returns whether the comparisons held and the revision.
    pub fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> Result<(bool, i64, Value), EtcdError> {
        let v = self.call(
            "/v3/kv/txn",
            &json!({"compare": compare, "success": success, "failure": failure}),
        )?;
        Ok((
            v["succeeded"].as_bool().unwrap_or(false),
            int(&v["header"]["revision"]),
            v,
        ))
    }

    pub fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", &json!({"TTL": ttl_secs.to_string()}))?;
        Ok(int(&v["ID"]))
    }

    /// Renews a lease; `Ok(false)` when etcd no longer knows it (expired).
    pub fn lease_keepalive(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    /// [`Etcd::lease_keepalive`], asking etcd even within [`TIMEOUT`] of a
    /// call that found it away.
    pub fn lease_keepalive_now(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self.call_as(
            "/v3/lease/keepalive",
            &json!({"ID": id.to_string()}),
            false,
            CALL_DEADLINE,
        )?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .map(|_| ())
    }

    /// Watches every key under `prefix` from revision `from`, calling
    /// `on` for each batch of events with the revision of its last event
    /// (0 for a message without events), until the
    /// stream ends or `on` returns false. Errors when the stream cannot be
    /// opened or breaks; [`WatchError::Silent`] when nothing came for
    /// `silence` (a connection dropped without a FIN or RST by a NAT or a
    /// firewall looks exactly like a quiet registry, forever: the caller
    /// watches again from where it was, which replays what it missed), or
    /// once `left` (asked before each read) says no time is left, however
    /// busy the watch.
    pub fn watch(
        &self,
        prefix: &str,
        from: i64,
        silence: Duration,
        left: impl Fn() -> Duration,
        mut on: impl FnMut(i64, Vec<Event>) -> bool,
    ) -> Result<(), WatchError> {
        // A token etcd no longer knows cancels the watch as it is made:
        // asked for again once (before anything was delivered).
        match self.watch_once(prefix, from, silence, &left, &mut on) {
            Err(WatchError::TokenRefused(token)) => {
                if let Some(c) = &self.credentials {
                    c.forget(&token);
                }
                match self.watch_once(prefix, from, silence, &left, &mut on) {
                    Err(WatchError::TokenRefused(_)) => Err(WatchError::Failed(
                        "etcd refused the watch: the token it gave for --store-user is not valid"
                            .into(),
                    )),
                    r => r,
                }
            }
            r => r,
        }
    }

    fn watch_once(
        &self,
        prefix: &str,
        from: i64,
        silence: Duration,
        left: &impl Fn() -> Duration,
        on: &mut impl FnMut(i64, Vec<Event>) -> bool,
    ) -> Result<(), WatchError> {
        let ep = &self.endpoints[self.next.load(Ordering::Relaxed) % self.endpoints.len()];
        let req = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let user = self.credentials.as_ref().map(|c| c.user.as_str());
        let token = match self.token(ep, CALL_DEADLINE) {
            Ok(Ok(t)) => t,
            Ok(Err((st, b))) => {
                let msg = answer_words(&b);
                let fix = hint(&msg, user);
                return Err(format!("{ep}: etcd refused the login: HTTP {st}: {msg}{fix}").into());
            }
            Err(e) => return Err(format!("{ep}: {}", explain(e, self.tls.as_ref())).into()),
        };
        let (st, mut r, len) = self
            .send(ep, "/v3/watch", &req, &token, Some(silence), CALL_DEADLINE)
            .map_err(|e| format!("{ep}: {}", explain(e, self.tls.as_ref())))?;
        // A stream: each read is bounded by `silence` and `left` below.
        r.get_mut().timed().until = None;
        if st != 200 {
            let b = Self::read_body(&mut r, len).unwrap_or_default();
            return Err(format!(
                "{ep}: HTTP {st}: {}",
                crate::tunnel::printable(String::from_utf8_lossy(&b).trim(), 300)
            )
            .into());
        }
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let wait = left().min(silence);
            if wait.is_zero() {
                return Err(WatchError::Silent);
            }
            r.get_mut()
                .timed()
                .tcp
                .set_read_timeout(Some(wait))
                .map_err(|e| format!("{ep}: {e}"))?;
            let c = match Self::chunk(&mut r, MAX_ANSWER.saturating_sub(buf.len())) {
                Ok(Some(c)) => c,
                Ok(None) => return Err(format!("{ep}: the watch stream ended").into()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(WatchError::Silent)
                }
                Err(e) => return Err(format!("{ep}: {e}").into()),
            };
            buf.extend(c);
            let mut consumed = 0;
            {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                while let Some(Ok(v)) = it.next() {
                    consumed = it.byte_offset();
                    let res = &v["result"];
                    if int(&res["compact_revision"]) > 0 {
                        return Err("the watch fell behind a compaction".to_string().into());
                    }
                    // Canceled by etcd for another reason (its leader
                    // lost, a permission): nothing more comes on it.
                    if res["canceled"].as_bool() == Some(true) {
                        let why = res["cancel_reason"].as_str().unwrap_or("no reason given");
                        if self.credentials.is_some() && token_refused_reason(why) {
                            return Err(WatchError::TokenRefused(token));
                        }
                        let why = crate::tunnel::printable(why, 300);
                        let fix = hint(&why, user);
                        return Err(format!("{ep}: etcd canceled the watch: {why}{fix}").into());
                    }
                    if !v["error"].is_null() {
                        return Err(format!("{ep}: watch error: {}", v["error"]).into());
                    }
                    let events: Vec<Event> = res["events"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|e| {
                                    let k = kv(&e["kv"]);
                                    if e["type"].as_str() == Some("DELETE") {
                                        Event::Delete {
                                            key: k.key,
                                            revision: k.mod_revision,
                                        }
                                    } else {
                                        Event::Put(k)
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    // The revision reached is that of the last event
                    // delivered, never the header's: the "created" message
                    // and each part of a long catch-up carry the store's
                    // current revision, and a watch opened again from it
                    // would skip events still to come.
                    let rev = events
                        .iter()
                        .map(|e| match e {
                            Event::Put(kv) => kv.mod_revision,
                            Event::Delete { revision, .. } => *revision,
                        })
                        .max()
                        .unwrap_or(0);
                    if !on(rev, events) {
                        return Ok(());
                    }
                }
            }
            buf.drain(..consumed);
        }
    }
}

/// Why a watch ended.
pub enum WatchError {
    /// Nothing came for the silence allowed, or the time allowed ran out.
    Silent,
    /// It could not be opened, broke, or fell behind.
    Failed(String),
    /// etcd canceled it for its token (within [`Etcd::watch`] only).
    TokenRefused(Token),
}

impl std::fmt::Debug for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchError::Silent => f.write_str("Silent"),
            WatchError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
            // Never the token itself.
            WatchError::TokenRefused(_) => f.write_str("TokenRefused"),
        }
    }
}

/// Whether a watch's cancel reason is etcd refusing its token (or its
/// want of one).
fn token_refused_reason(why: &str) -> bool {
    names_token_refusal(why.as_bytes())
}

impl From<String> for WatchError {
    fn from(s: String) -> Self {
        WatchError::Failed(s)
    }
}

/// Comparison: `key` does not exist.
pub fn absent(key: &str) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
}

/// Comparison: `key` was last written at `rev`.
pub fn mod_is(key: &str, rev: i64) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
}

/// Comparison: `key` was not written after revision `rev` (absent, or
/// last written at `rev` or before).
pub fn not_written_since(key: &str, rev: i64) -> Value {
    json!({
        "key": b64(key.as_bytes()),
        "target": "MOD",
        "result": "LESS",
        "mod_revision": rev.saturating_add(1).to_string(),
    })
}

/// Comparison: `key` holds `value`.
pub fn value_is(key: &str, value: &[u8]) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "VALUE", "result": "EQUAL", "value": b64(value)})
}

pub fn op_put(key: &str, value: &[u8], lease: i64) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value)});
    if lease != 0 {
        p["lease"] = json!(lease.to_string());
    }
    json!({"request_put": p})
}

pub fn op_delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key.as_bytes())}})
}

pub fn op_get(key: &str) -> Value {
    json!({"request_range": {"key": b64(key.as_bytes())}})
}

/// The first key-value of a transaction's `i`-th range answer.
pub fn txn_range(v: &Value, i: usize) -> Option<Kv> {
    v["responses"][i]["response_range"]["kvs"]
        .as_array()
        .and_then(|a| a.first())
        .map(kv)
}

/// The error a lease renewal's answer carries in its body (a streaming
/// call: etcd's gateway has sent its 200 head already), in words. It used
/// to read as the lease expired: the hub took a new lease and claimed its
/// sessions again under it, while the old one, still alive, went
/// unrenewed. Other calls' answers are not read for one (a lease grant's
/// answer has a string field of that name).
fn stream_error(path: &str, v: &Value) -> Option<String> {
    let e = &v["error"];
    if path != "/v3/lease/keepalive" || !e.is_object() {
        return None;
    }
    let msg = e["message"]
        .as_str()
        .map_or_else(|| e.to_string(), str::to_string);
    Some(format!(
        "answered with an error: {}",
        crate::tunnel::printable(msg.trim(), 300)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_calls_are_told_apart_for_the_metrics() {
        let refused = |reason: &str| EtcdError::Refused {
            endpoint: "127.0.0.1:2379".into(),
            reason: reason.into(),
        };
        assert_eq!(
            CallFailure::of(&refused(&format!(
                "HTTP 400: etcdserver: mvcc: database space exceeded{}",
                hint("etcdserver: mvcc: database space exceeded", None)
            ))),
            CallFailure::NoSpace
        );
        assert_eq!(
            CallFailure::of(&refused("HTTP 401: etcdserver: permission denied")),
            CallFailure::Refused
        );
        let away = EtcdError::Unreachable {
            endpoints: "127.0.0.1:2379".into(),
            reason: "connection refused".into(),
            tls_refused: false,
        };
        assert_eq!(CallFailure::of(&away), CallFailure::Unreachable);
    }

    /// An endpoint that answers each connection with `answer`, then
    /// trickles `trickle` a byte every 500 ms (for at most 30 s).
    fn hostile_endpoint(answer: &'static [u8], trickle: bool) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(4) {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut req = [0u8; 4096];
                    let _ = c.read(&mut req);
                    let _ = c.write_all(answer);
                    if trickle {
                        for _ in 0..60 {
                            std::thread::sleep(Duration::from_millis(500));
                            if c.write_all(b"x").is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        format!("etcd://{addr}")
    }

    /// What an endpoint says about its answer's size is checked before
    /// anything is allocated, a line has an end within 16 KiB, and a call
    /// ends within its deadline however slowly its answer comes.
    #[test]
    fn hostile_answers_are_refused_within_bounds() {
        let none = StoreAccess::default();
        // A huge chunk, a huge length.
        for answer in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffff\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            let endpoint = hostile_endpoint(answer, false);
            let e = Etcd::new(&endpoint, &none).unwrap().get("/k").unwrap_err();
            assert!(e.to_string().contains("larger than 64 MiB"), "{e}");
        }
        // A header line that never ends.
        let endless = hostile_endpoint(b"HTTP/1.1 200 OK\r\nX: ", true);
        let started = std::time::Instant::now();
        let e = Etcd::new(&endless, &none).unwrap().get("/k").unwrap_err();
        let took = started.elapsed();
        assert!(
            took < CALL_DEADLINE + Duration::from_secs(4),
            "a trickled answer held the call {took:?}: {e}"
        );
        assert!(
            took >= CALL_DEADLINE - Duration::from_secs(1),
            "{took:?}: {e}"
        );
    }

    #[test]
    fn a_streaming_calls_error_is_an_error() {
        let live = json!({"result": {"header": {"revision": "9"}, "ID": "7", "TTL": "10"}});
        let path = "/v3/lease/keepalive";
        assert_eq!(stream_error(path, &live), None);
        let expired = json!({"result": {"header": {"revision": "9"}, "ID": "7"}});
        assert_eq!(stream_error(path, &expired), None);
        let failed = json!({"error": {"grpc_code": 14, "http_code": 503,
            "message": "etcdserver: no leader", "http_status": "Service Unavailable"}});
        let e = stream_error(path, &failed).unwrap();
        assert!(e.contains("etcdserver: no leader"), "{e}");
        // Not a renewal: not read for one.
        assert_eq!(stream_error("/v3/lease/grant", &failed), None);
        assert_eq!(stream_error(path, &json!({"error": ""})), None);
    }

    #[test]
    fn a_password_file_is_private_and_holds_one_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &[u8], mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let read = |p: &Path| read_password(p);
        assert_eq!(read(&file("a", b"pw\r\n", 0o600)).unwrap(), "pw");
        assert_eq!(read(&file("b", b"p w", 0o440)).unwrap(), "p w");
        let e = read(&file("c", b"pw\n", 0o604)).unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("pw\n"), "{e}");
        let e = read(&file("d", b"\n", 0o600)).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = read(&file("e", &[b'x'; 5000], 0o600)).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        let e = read(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot read --store-password-file"), "{e}");
        // A user without its password file, or the other way round.
        let access = StoreAccess {
            user: Some("hub".into()),
            ..Default::default()
        };
        let e = Etcd::new("etcd://127.0.0.1:2379", &access).err().unwrap();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn refusals_say_which_flag_fixes_them() {
        assert!(hint("etcdserver: user name is empty", None).contains("give --store-user"));
        assert!(hint(
            "etcdserver: authentication failed, invalid user ID or password",
            Some("hub")
        )
        .contains("--store-password-file"));
        assert!(hint("etcdserver: permission denied", Some("hub")).contains("'hub' may not"));
        assert_eq!(hint("etcdserver: no leader", Some("hub")), "");
        let h = hint("etcdserver: mvcc: database space exceeded", None);
        assert!(
            h.contains("alarm disarm") && h.contains("operator rm"),
            "{h}"
        );
        assert!(token_refused(401, b"invalid auth token"));
        assert!(token_refused(400, b"etcdserver: user name is empty"));
        assert!(!token_refused(
            400,
            b"etcdserver: invalid user ID or password"
        ));
        assert!(token_refused_reason(
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        ));
        // A JWT issued before a change of users or roles.
        assert!(token_refused(
            400,
            b"etcdserver: revision of auth store is old"
        ));
        assert!(token_refused_reason(
            "etcdserver: revision of auth store is old"
        ));
        // With a user given, the want of one is a header lost on the way.
        assert!(hint("etcdserver: user name is empty", Some("hub")).contains("Authorization"));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&Value::Null), 0);
        let none = StoreAccess::default();
        assert!(Etcd::new("etcd://127.0.0.1:2379,h:1", &none).is_ok());
        assert!(Etcd::new("https://127.0.0.1:2379", &none).is_ok());
        let two = Etcd::new("https://a:1,https://b:2/", &none).unwrap();
        assert_eq!(two.endpoints(), "a:1,b:2");
        assert!(two.plaintext_remote().is_empty());
        let plain = Etcd::new(
            "etcd://127.0.0.1:2379,localhost:1,[::1]:2,10.0.0.5:2379",
            &none,
        );
        assert_eq!(plain.unwrap().plaintext_remote(), ["10.0.0.5:2379"]);
        assert!(Etcd::new("127.0.0.1:2379", &none).is_err());
        // One scheme for all endpoints.
        let e = Etcd::new("etcd://a:1,https://b:2", &none).err().unwrap();
        assert!(e.contains("'b:2' names another scheme"), "{e}");
        assert!(Etcd::new("https://a:1,etcd://b:2", &none).is_err());
        assert!(Etcd::new("etcd://a:1,http://b:2", &none).is_ok());
        // Names are looked up within the call's bound and remembered; an
        // address is taken as it is.
        let e = Etcd::new("etcd://localhost:2379", &none).unwrap();
        let found = e.addresses("localhost:2379").unwrap();
        assert!(
            found
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 2379),
            "{found:?}"
        );
        assert_eq!(e.resolved.lock().unwrap()["localhost:2379"], found);
        assert_eq!(
            e.addresses("127.0.0.1:2379").unwrap(),
            ["127.0.0.1:2379".parse().unwrap()]
        );
        assert!(e.addresses("no-such-host.invalid:2379").is_err());
        assert!(Etcd::new("etcd://nohostport", &none).is_err());
        let ca = StoreAccess {
            ca: Some("/nonexistent/ca.pem".into()),
            ..StoreAccess::default()
        };
        let e = Etcd::new("etcd://127.0.0.1:2379", &ca).err().unwrap();
        assert!(e.contains("https://"), "{e}");
        let e = Etcd::new("https://127.0.0.1:2379", &ca).err().unwrap();
        assert!(
            e.contains("cannot read --store-ca '/nonexistent/ca.pem'"),
            "{e}"
        );
        let half = StoreAccess {
            cert: Some("/x".into()),
            ..StoreAccess::default()
        };
        let e = Etcd::new("https://127.0.0.1:2379", &half).err().unwrap();
        assert!(e.contains("go together"), "{e}");
    }
}
