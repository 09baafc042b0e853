//! TLS for `wss://` hubs: what the agent trusts, and a refused certificate
//! explained in words.
//!
//! A hub behind a company's ingress presents the ingress's certificate,
//! often issued by a private CA. The agent trusts the compiled-in web PKI
//! roots, the operating system's store (or `SSL_CERT_FILE`/`SSL_CERT_DIR`,
//! read the way OpenSSL-based tools read them) and `--hub-ca FILE`. When
//! verification fails, the verifier wrapper keeps what was presented so the
//! error can name the certificate, its issuer and the names it covers next
//! to what was expected, instead of rustls' `UnknownIssuer`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Largest `--hub-ca` bundle read: a company bundle is a few hundred KiB at
/// most; the bound stops a wrong path (a disk image, /dev/zero) from being
/// read whole.
const MAX_BUNDLE: u64 = 16 * 1024 * 1024;

/// Said wherever `--insecure-skip-tls-verify` takes effect.
pub const SKIP_VERIFY_WARNING: &str = "--insecure-skip-tls-verify: the hub's TLS certificate is not verified (the WebSocket layer only). \
     The pinned SSH host key (--hub-key) still authenticates the hub inside, so the tunnel stays confidential and cannot be impersonated; \
     prefer --hub-ca FILE with the ingress's CA";

/// Why the agent's TLS trust could not be set up; each names the fix.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read --hub-ca '{path}': {reason}; pass the PEM file of the CA that issued the ingress's certificate")]
    Unreadable { path: PathBuf, reason: String },
    #[error("--hub-ca '{path}' holds no PEM certificate ('-----BEGIN CERTIFICATE-----'); pass the CA certificate in PEM form (convert DER with 'openssl x509 -inform der -in CA.der -out CA.pem')")]
    Empty { path: PathBuf },
    #[error("--hub-ca '{path}': certificate {index} is not a usable CA certificate: {reason}")]
    BadCert {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "--insecure-skip-tls-verify together with --insecure-skip-hub-key would leave the hub unauthenticated: \
         anyone on the path could impersonate it. Keep --hub-key (printed by 'towerctl cluster add'), and pass the \
         ingress's CA with --hub-ca FILE rather than skipping TLS verification"
    )]
    NothingVerified,
    #[error("cannot set up TLS for the hub: {0}")]
    Setup(String),
}

/// The TLS server name for a URL's host: an IPv6 address without its
/// brackets, and an IPv4-mapped one (`::ffff:10.0.0.1`) as the IPv4
/// address it is. Go's clients (kubectl) match such an address against a
/// certificate's IPv4 address; rustls compares the bytes, so the same
/// gateway URL failed its handshake in towerctl alone.
pub fn server_name(
    host: &str,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(ServerName::IpAddress(ip.to_canonical().into()));
    }
    ServerName::try_from(host.to_string())
}

/// Reads a PEM bundle, refusing a file that holds no certificate.
pub fn load_pem_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| TrustError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .map_err(unreadable)?
        .take(MAX_BUNDLE)
        .read_to_end(&mut buf)
        .map_err(unreadable)?;
    let mut certs = Vec::new();
    for (i, c) in rustls_pemfile::certs(&mut buf.as_slice()).enumerate() {
        certs.push(c.map_err(|e| TrustError::BadCert {
            path: path.to_path_buf(),
            index: i + 1,
            reason: e.to_string(),
        })?);
    }
    if certs.is_empty() {
        return Err(TrustError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// What the agent trusts for `wss://`, built once per agent; each dial gets
/// its own verifier wrapper (see [`HubTls::connector`]). `--hub-ca` is read
/// again at a dial when the file changed (an ingress's CA rotated, a
/// mounted ConfigMap or Secret updated): before, the agent kept the CA it
/// started with, and every agent refused the new certificate until it was
/// restarted by hand.
pub struct HubTls {
    provider: Arc<CryptoProvider>,
    /// The web PKI roots and the system store, without `--hub-ca`.
    base: RootCertStore,
    base_words: Vec<String>,
    trust: Mutex<Trust>,
    /// `--insecure-skip-tls-verify`: accept any certificate (the SSH host-key
    /// pin still authenticates the hub).
    skip_verify: bool,
    hub_ca: Option<PathBuf>,
}

/// The verifier in use, and the `--hub-ca` file it was built from.
struct Trust {
    verifier: Arc<WebPkiServerVerifier>,
    /// What is trusted, in words, for error messages.
    trusted: String,
    /// The file as last read (or last found unusable: not read again
    /// until it changes once more, or, when it could not be read at all,
    /// [`UNREADABLE_RETRY`] later).
    stamp: Option<Stamp>,
    unreadable_since: Option<std::time::Instant>,
}

/// How soon a `--hub-ca` that could not be read (out of descriptors, an
/// I/O error) is tried again while it has not changed.
const UNREADABLE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// What tells a file changed: its inode, size, modification time and
/// status change time (a `chmod` that makes it readable).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl std::fmt::Debug for HubTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubTls")
            .field("skip_verify", &self.skip_verify)
            .field("hub_ca", &self.hub_ca)
            .finish()
    }
}

impl HubTls {
    /// Web PKI roots, the system store (or `SSL_CERT_FILE`/`SSL_CERT_DIR`)
    /// and `hub_ca`. `hub_key_pinned` is whether the SSH layer authenticates
    /// the hub; skipping TLS verification is refused without it.
    pub fn new(
        hub_ca: Option<&Path>,
        skip_verify: bool,
        hub_key_pinned: bool,
    ) -> Result<HubTls, TrustError> {
        if skip_verify && !hub_key_pinned {
            return Err(TrustError::NothingVerified);
        }
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut trusted = vec![format!("{} web PKI roots", roots.len())];

        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("system CA certificates: {e}");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let source = match (
            std::env::var_os("SSL_CERT_FILE"),
            std::env::var_os("SSL_CERT_DIR"),
        ) {
            (Some(f), None) => format!("SSL_CERT_FILE '{}'", Path::new(&f).display()),
            (None, Some(d)) => format!("SSL_CERT_DIR '{}'", Path::new(&d).display()),
            (Some(f), Some(d)) => format!(
                "SSL_CERT_FILE '{}' and SSL_CERT_DIR '{}'",
                Path::new(&f).display(),
                Path::new(&d).display()
            ),
            (None, None) => "the system store".to_string(),
        };
        trusted.push(format!("{added} from {source}"));

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = hub_ca.and_then(Stamp::of);
        let (verifier, words) = Self::build(&provider, &roots, &trusted, hub_ca)?;
        Ok(HubTls {
            provider,
            base: roots,
            base_words: trusted,
            trust: Mutex::new(Trust {
                verifier,
                trusted: words,
                stamp,
                unreadable_since: None,
            }),
            skip_verify,
            hub_ca: hub_ca.map(Path::to_path_buf),
        })
    }

    /// A verifier trusting `base` and what `hub_ca` holds now.
    fn build(
        provider: &Arc<CryptoProvider>,
        base: &RootCertStore,
        base_words: &[String],
        hub_ca: Option<&Path>,
    ) -> Result<(Arc<WebPkiServerVerifier>, String), TrustError> {
        let mut roots = base.clone();
        let mut trusted = base_words.to_vec();
        if let Some(path) = hub_ca {
            let certs = load_pem_bundle(path)?;
            let n = certs.len();
            for (i, c) in certs.into_iter().enumerate() {
                roots.add(c).map_err(|e| TrustError::BadCert {
                    path: path.to_path_buf(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
            }
            trusted.push(format!("{n} from --hub-ca '{}'", path.display()));
        } else {
            trusted.push("no --hub-ca".to_string());
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TrustError::Setup(e.to_string()))?;
        Ok((verifier, trusted.join(", ")))
    }

    /// The verifier for a dial now: built again from `--hub-ca` when the
    /// file changed since it was last read. A file that cannot be used
    /// (missing, half written, not PEM) leaves the last good trust in
    /// place, said once per change.
    fn current(&self) -> (Arc<WebPkiServerVerifier>, String) {
        let mut t = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.hub_ca {
            let now = Stamp::of(path);
            let retry = t
                .unreadable_since
                .is_some_and(|at| at.elapsed() >= UNREADABLE_RETRY);
            if now != t.stamp || retry {
                let changed = now != t.stamp;
                t.stamp = now;
                t.unreadable_since = None;
                match Self::build(&self.provider, &self.base, &self.base_words, Some(path)) {
                    Ok((verifier, trusted)) => {
                        tracing::info!(
                            "--hub-ca '{}' changed: read again ({trusted})",
                            path.display()
                        );
                        t.verifier = verifier;
                        t.trusted = trusted;
                    }
                    Err(e) => {
                        // Not read at all (a file that is there): tried
                        // again later even if it does not change.
                        if matches!(e, TrustError::Unreadable { .. }) && now.is_some() {
                            t.unreadable_since = Some(std::time::Instant::now());
                        }
                        if changed {
                            tracing::warn!(
                                "--hub-ca changed but cannot be used ({e}); the CA read before is still trusted"
                            )
                        }
                    }
                }
            }
        }
        (t.verifier.clone(), t.trusted.clone())
    }

    pub fn skips_verification(&self) -> bool {
        self.skip_verify
    }

    /// Whether a dial reads `--hub-ca` (its file is looked at each time).
    pub fn reads_a_file(&self) -> bool {
        self.hub_ca.is_some()
    }

    /// A TLS configuration for one dial, and the slot where its verifier
    /// leaves a refused certificate.
    pub fn connector(&self) -> Result<(Arc<rustls::ClientConfig>, FailureSlot), TrustError> {
        let (verifier, slot) = self.recording();
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok((Arc::new(config), slot))
    }
}

impl HubTls {
    fn recording(&self) -> (Arc<Recording>, FailureSlot) {
        let slot = FailureSlot::default();
        let (inner, trusted) = self.current();
        let verifier = Arc::new(Recording {
            inner,
            slot: slot.clone(),
            skip: self.skip_verify,
            trusted,
            hub_ca: self.hub_ca.clone(),
        });
        (verifier, slot)
    }
}

/// Where a dial's verifier leaves the certificate it refused.
#[derive(Debug, Clone, Default)]
pub struct FailureSlot(Arc<Mutex<Option<CertFailure>>>);

impl FailureSlot {
    pub fn take(&self) -> Option<CertFailure> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

/// Delegates to webpki and records what it refused.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    slot: FailureSlot,
    skip: bool,
    trusted: String,
    hub_ca: Option<PathBuf>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.skip {
            return Ok(ServerCertVerified::assertion());
        }
        let r = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(rustls::Error::InvalidCertificate(e)) = &r {
            let failure = CertFailure {
                dialed: server_name.to_str().into_owned(),
                presented: Presented::decode(end_entity, intermediates, server_name),
                error: e.clone(),
                trusted: self.trusted.clone(),
                hub_ca: self.hub_ca.clone(),
            };
            if let Ok(mut s) = self.slot.0.lock() {
                *s = Some(failure);
            }
        }
        r
    }

    // Handshake signatures are checked even when the certificate is not:
    // the peer must hold the key of what it presented.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The presented chain, decoded as far as the message needs.
#[derive(Debug, Clone)]
pub struct Presented {
    pub subject: String,
    pub issuer: String,
    /// DNS names in the subject alternative names, and the address dialed
    /// when it is an IP address the certificate covers (other IP
    /// addresses come from rustls' own error where it has them).
    pub dns_names: Vec<String>,
    /// Subjects of the intermediates sent along.
    pub intermediates: Vec<String>,
}

impl Presented {
    fn decode(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        dialed: &ServerName<'_>,
    ) -> Presented {
        let (subject, issuer, dns_names) = match webpki::EndEntityCert::try_from(end_entity) {
            Ok(c) => {
                // A certificate may list thousands.
                let mut names: Vec<String> = c.valid_dns_names().take(20).map(clean).collect();
                // An IP address dialed and covered: said too (a refusal
                // for its CA read as a name mismatch when only the DNS
                // names were listed).
                if let ServerName::IpAddress(ip) = dialed {
                    if c.verify_is_valid_for_subject_name(dialed).is_ok() {
                        names.push(std::net::IpAddr::from(*ip).to_string());
                    }
                }
                (render_name(c.subject()), render_name(c.issuer()), names)
            }
            Err(e) => (
                format!("(undecodable: {e})"),
                "(unknown)".into(),
                Vec::new(),
            ),
        };
        let intermediates = intermediates
            .iter()
            .take(5)
            .map(|c| match webpki::EndEntityCert::try_from(c) {
                Ok(c) => render_name(c.subject()),
                Err(_) => "(undecodable)".into(),
            })
            .collect();
        Presented {
            subject,
            issuer,
            dns_names,
            intermediates,
        }
    }
}

/// A certificate the agent refused: what was presented, what was expected.
#[derive(Debug, Clone)]
pub struct CertFailure {
    /// The host name (or address) the agent dialed.
    pub dialed: String,
    pub presented: Presented,
    pub error: CertificateError,
    /// What the agent trusted, in words.
    pub trusted: String,
    pub hub_ca: Option<PathBuf>,
}

impl std::fmt::Display for CertFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.presented;
        let names = match &self.error {
            CertificateError::NotValidForNameContext { presented, .. } => presented
                .iter()
                .filter_map(|n| plain_name(n))
                .collect::<Vec<_>>(),
            _ => p.dns_names.clone(),
        };
        let covers = if names.is_empty() {
            match self.dialed.parse::<std::net::IpAddr>() {
                Ok(_) => format!("no DNS name, nor '{}'", self.dialed),
                Err(_) => "no DNS name".to_string(),
            }
        } else {
            names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut presented = format!(
            "the server presented '{}' issued by '{}', covering {covers}",
            p.subject, p.issuer
        );
        if !p.intermediates.is_empty() {
            let _ = write!(
                presented,
                ", with intermediates {}",
                p.intermediates
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else {
            presented.push_str(", with no intermediate");
        }
        let trust_fix = match &self.hub_ca {
            Some(ca) => format!(
                "check that --hub-ca '{}' holds the CA that issued '{}' (or the root above it) and that the ingress sends its intermediates (the file is read again at the next attempt once it changes)",
                ca.display(),
                p.issuer
            ),
            None => format!(
                "pass the CA that issued '{}' with --hub-ca FILE (PEM), or add it to the system store or SSL_CERT_FILE",
                p.issuer
            ),
        };
        let dialed = &self.dialed;
        match &self.error {
            CertificateError::UnknownIssuer => write!(
                f,
                "{presented}; expected a certificate for '{dialed}' from a trusted CA, but none of those trusted ({}) issued it; {trust_fix}",
                self.trusted
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => write!(
                f,
                "{presented}; expected a certificate covering '{dialed}', the name dialed; dial the hub by a name the certificate covers (--hub wss://NAME/…) or have the ingress serve a certificate for '{dialed}'"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                let when = match &self.error {
                    CertificateError::ExpiredContext { not_after, .. } => {
                        format!(" on {}", utc(not_after))
                    }
                    _ => String::new(),
                };
                write!(
                    f,
                    "{presented}; it expired{when}; renew the ingress's certificate (or check this machine's clock)"
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                let when = match &self.error {
                    CertificateError::NotValidYetContext { not_before, .. } => {
                        format!(" until {}", utc(not_before))
                    }
                    _ => String::new(),
                };
                write!(
                    f,
                    "{presented}; it is not valid yet{when}; check this machine's clock"
                )
            }
            CertificateError::Other(o)
                if matches!(
                    o.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                write!(
                    f,
                    "{presented}; it is a CA certificate (basicConstraints CA:TRUE) served as the server's own, which TLS clients refuse even when it is trusted; \
                     issue a server certificate for '{dialed}' from that CA for the ingress, and pass the CA with --hub-ca FILE"
                )
            }
            other => write!(
                f,
                "{presented}; it was refused ({other}); {trust_fix}"
            ),
        }
    }
}

/// rustls reports the names it found in webpki's `Debug` form
/// (`DnsName("a.example")`, `IpAddress(192.0.2.1)`); keeps the name.
fn plain_name(debug: &str) -> Option<String> {
    if let Some(n) = debug
        .strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
    {
        return Some(clean(n));
    }
    if let Some(ip) = debug
        .strip_prefix("IpAddress(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(format!("IP {}", clean(ip)));
    }
    None
}

/// A date for messages: `2026-12-01 23:59:59 UTC`.
pub(crate) fn utc(t: &UnixTime) -> String {
    let secs = t.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Certificate text comes from the network: keep it printable and short
/// before it reaches a terminal or a log.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_control() || super::is_invisible(c) {
                '?'
            } else {
                c
            }
        })
        .take(200)
        .collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// One DER element: tag, contents, and what follows it.
pub(crate) fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Renders an X.501 Name's contents (the RDN sequence without its outer
/// SEQUENCE) as `CN=…, O=…`, in certificate order, keeping the attributes
/// people recognise.
fn render_name(der: &[u8]) -> String {
    const ATTRS: [(&[u8], &str); 7] = [
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            "emailAddress",
        ),
    ];
    let mut parts = Vec::new();
    let mut rdns = der;
    // Bounded: each step consumes at least two bytes of a finite input.
    while let Some((0x31, set, rest)) = der_next(rdns) {
        rdns = rest;
        let mut atvs = set;
        while let Some((0x30, atv, rest)) = der_next(atvs) {
            atvs = rest;
            let Some((0x06, oid, value)) = der_next(atv) else {
                continue;
            };
            let Some((vtag, v, _)) = der_next(value) else {
                continue;
            };
            let Some((_, label)) = ATTRS.iter().find(|(o, _)| *o == oid) else {
                continue;
            };
            let text = match vtag {
                // BMPString: UTF-16BE.
                0x1e => String::from_utf16_lossy(
                    &v.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                ),
                _ => String::from_utf8_lossy(v).into_owned(),
            };
            parts.push(format!("{label}={}", clean(&text)));
        }
    }
    if parts.is_empty() {
        "(empty name)".to_string()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca() -> (rcgen::Certificate, KeyPair, CertificateParams) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Corp CA");
        p.distinguished_name.push(DnType::OrganizationName, "Corp");
        let k = KeyPair::generate().unwrap();
        (p.clone().self_signed(&k).unwrap(), k, p)
    }

    fn leaf(
        names: &[&str],
        ca_params: CertificateParams,
        ca_key: &KeyPair,
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, "hub.corp");
        let k = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        p.signed_by(&k, &issuer).unwrap().der().clone()
    }

    #[test]
    fn names_subject_issuer_and_sans() {
        let (_, k, p) = ca();
        let cert = leaf(&["hub.corp", "localhost"], p, &k);
        let dialed = ServerName::try_from("hub.corp").unwrap();
        let pr = Presented::decode(&cert, &[], &dialed);
        assert_eq!(pr.subject, "CN=hub.corp");
        assert_eq!(pr.issuer, "CN=Corp CA, O=Corp");
        assert_eq!(pr.dns_names, vec!["hub.corp", "localhost"]);
        // An IP address dialed is named when the certificate covers it:
        // a refusal for its CA read as a name mismatch.
        let (_, k, p) = ca();
        let cert = leaf(&["localhost", "127.0.0.1"], p, &k);
        let at = |ip: &str| ServerName::IpAddress(ip.parse::<std::net::IpAddr>().unwrap().into());
        let pr = Presented::decode(&cert, &[], &at("127.0.0.1"));
        assert_eq!(pr.dns_names, vec!["localhost", "127.0.0.1"]);
        let pr = Presented::decode(&cert, &[], &at("127.0.0.2"));
        assert_eq!(pr.dns_names, vec!["localhost"]);
        // A refused certificate's text is the peer's: no control or
        // invisible characters (a right-to-left override reorders what a
        // terminal shows), bounded in length and in count.
        assert_eq!(clean("a\u{202e}b\u{7}c"), "a?b?c");
        let names: Vec<String> = (0..100).map(|i| format!("n{i}.corp")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, k, p) = ca();
        let pr = Presented::decode(&leaf(&names, p, &k), &[], &dialed);
        assert_eq!(pr.dns_names.len(), 20);
    }

    #[test]
    fn server_names_are_read_as_go_reads_them() {
        let v4 = ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 1]).into());
        assert_eq!(server_name("10.0.0.1").unwrap(), v4);
        assert_eq!(server_name("[::ffff:10.0.0.1]").unwrap(), v4);
        assert_eq!(server_name("::ffff:10.0.0.1").unwrap(), v4);
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            server_name("[2001:db8::1]").unwrap(),
            ServerName::IpAddress(v6.into())
        );
        assert_eq!(
            server_name("hub.example.com").unwrap(),
            ServerName::try_from("hub.example.com").unwrap()
        );
        assert!(server_name("not a name").is_err());
    }

    fn verify(tls: &HubTls, cert: &CertificateDer<'static>, name: &str) -> Option<CertFailure> {
        let (verifier, slot) = tls.recording();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let r = verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now());
        let f = slot.take();
        assert_eq!(r.is_err(), f.is_some(), "{r:?}");
        f
    }

    #[test]
    fn an_unknown_issuer_is_explained_and_hub_ca_fixes_it() {
        let (ca_cert, k, p) = ca();
        let cert = leaf(&["localhost"], p, &k);
        let tls = HubTls::new(None, false, true).unwrap();
        let msg = verify(&tls, &cert, "localhost").unwrap().to_string();
        for want in [
            "'CN=hub.corp'",
            "issued by 'CN=Corp CA, O=Corp'",
            "'localhost'",
            "--hub-ca",
            "web PKI roots",
        ] {
            assert!(msg.contains(want), "{want} missing from: {msg}");
        }
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let tls = HubTls::new(Some(&ca_file), false, true).unwrap();
        assert!(verify(&tls, &cert, "localhost").is_none());
        let msg = verify(&tls, &cert, "other.example").unwrap().to_string();
        assert!(
            msg.contains("covering 'localhost'")
                && msg.contains("'other.example', the name dialed"),
            "{msg}"
        );
    }

    #[test]
    fn a_ca_certificate_served_as_the_servers_own_is_explained() {
        // What `openssl req -x509` makes by default, and what the issue's
        // user served: trusting it does not help, the message must say so.
        let (ca_cert, _, _) = ca();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let tls = HubTls::new(Some(&ca_file), false, true).unwrap();
        let msg = verify(&tls, ca_cert.der(), "localhost")
            .unwrap()
            .to_string();
        assert!(
            msg.contains("it is a CA certificate (basicConstraints CA:TRUE)")
                && msg.contains("issue a server certificate for 'localhost'"),
            "{msg}"
        );
    }

    #[test]
    fn skipping_verification_needs_the_host_key_pin() {
        assert!(matches!(
            HubTls::new(None, true, false),
            Err(TrustError::NothingVerified)
        ));
        let (_, k, p) = ca();
        let cert = leaf(&["localhost"], p, &k);
        let tls = HubTls::new(None, true, true).unwrap();
        assert!(verify(&tls, &cert, "elsewhere").is_none());
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.pem");
        std::fs::write(&f, "not a pem").unwrap();
        assert!(matches!(load_pem_bundle(&f), Err(TrustError::Empty { .. })));
        assert!(matches!(
            load_pem_bundle(&dir.path().join("missing")),
            Err(TrustError::Unreadable { .. })
        ));
    }

    #[test]
    fn dates() {
        assert_eq!(
            utc(&UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                0
            ))),
            "1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            utc(&UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_796_170_443
            ))),
            "2026-12-02 00:14:03 UTC"
        );
    }
}
