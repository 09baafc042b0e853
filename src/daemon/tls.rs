//! The gateway's certificate authority and serving certificate.
//!
//! A CA is created at the hub's first start and kept in its data dir; the
//! serving certificate is issued anew at every start for the addresses the
//! gateway answers on, so changing `--gateway` never needs a manual step.
//! Kubeconfigs carry the CA, which does not change.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct GatewayTls {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "towerctl hub CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    Ok(p)
}

/// Loads (or creates) the CA in `dir` and issues a serving certificate for
/// `names` (DNS names or IP addresses).
pub fn load(
    dir: &Path,
    names: &[String],
    write_secret: impl Fn(&Path, &[u8], u32) -> Result<()>,
) -> Result<GatewayTls> {
    let key_path = dir.join("ca.key");
    let cert_path = dir.join("ca.crt");
    // A new CA only when neither file is there: any other failure to read
    // them (one of the two gone, a permission, an I/O error) is said, not
    // papered over with a CA no operator's saved CA or --ca-hash matches.
    let read = |p: &Path| {
        match std::fs::read_to_string(p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot read the gateway CA file '{}'; fix its permissions, or restore it from a backup",
            p.display()
        ))),
    }
    };
    let (ca_key, ca_pem) = match (read(&key_path)?, read(&cert_path)?) {
        (Some(k), Some(c)) => (
            KeyPair::from_pem(&k).with_context(|| format!("the gateway CA key '{}' is unreadable; restore it from a backup, or delete ca.key and ca.crt to create a new CA (every operator must then log in again, and kubeconfigs be rewritten with 'towerctl use')", key_path.display()))?,
            c,
        ),
        (None, None) => {
            let key = KeyPair::generate().context("cannot generate the gateway CA key")?;
            let cert = ca_params()?.self_signed(&key).context("cannot create the gateway CA")?;
            write_secret(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_secret(&cert_path, cert.pem().as_bytes(), 0o644)?;
            (key, cert.pem())
        }
        (Some(_), None) | (None, Some(_)) => {
            let (there, gone) = if key_path.exists() {
                (&key_path, &cert_path)
            } else {
                (&cert_path, &key_path)
            };
            anyhow::bail!(
                "the gateway CA is half there: '{}' exists but '{}' does not; restore the missing file from a backup, or delete '{}' too to create a new CA (every operator must then log in again)",
                there.display(),
                gone.display(),
                there.display()
            )
        }
    };
    let issuer = Issuer::new(ca_params()?, ca_key);

    let leaf_key = KeyPair::generate().context("cannot generate the gateway key")?;
    let mut params =
        CertificateParams::new(names.to_vec()).context("invalid gateway certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "towerctl gateway");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let leaf = params
        .signed_by(&leaf_key, &issuer)
        .context("cannot issue the gateway certificate")?;

    let certs = vec![leaf.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("gateway key: {e}"))?;
    // X25519 and P-256 only: ring's default list also takes P-384, which a
    // client offering nothing else (a canned ClientHello replayed without
    // cost) made the hub compute at several times the price, inline on the
    // runtime that carries every tunnel.
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![
            rustls::crypto::ring::kx_group::X25519,
            rustls::crypto::ring::kx_group::SECP256R1,
        ],
        ..rustls::crypto::ring::default_provider()
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("gateway TLS configuration")?;
    // HTTP/2 for clients that offer it (kubectl does: its requests, lists
    // and watches then share one TLS connection, as with kube-apiserver;
    // its exec, attach and port-forward upgrades dial their own HTTP/1.1
    // connections, as they must against kube-apiserver too), HTTP/1.1 for
    // the rest, and towerctl's own name for port-forward's multiplexed
    // connection (server preference: first match in this list).
    cfg.alpn_protocols = vec![MUX_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(GatewayTls {
        ca_pem,
        server_config: Arc::new(cfg),
    })
}

/// ALPN name of the gateway's multiplexed connection: HTTP/2 with one
/// CONNECT stream per forwarded connection (`towerctl port-forward`). A
/// private name rather than `h2`, so that its larger windows and stream cap
/// are only for it.
pub const MUX_ALPN: &[u8] = b"towerctl-h2";
/// Flow-control windows of that connection: a stream may have this much in
/// flight before the reader takes it, on both ends (enough for a bulk
/// stream not to wait on window updates); the hub's connection takes this
/// much over all its streams (what a port-forward's stalled targets can
/// make the hub buffer, at most), the port-forward's
/// [`MUX_CLIENT_CONN_WINDOW`].
pub const MUX_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub const MUX_CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// The port-forward's own connection window, for what the hub sends it:
/// 128 streams' windows. Local clients that stop reading (a paused
/// download, a pager) hold their streams' windows; with eight streams'
/// worth for the connection, eight of them froze every other connection
/// of the process. What it bounds is the operator's own memory, each
/// stream still held to its window.
pub const MUX_CLIENT_CONN_WINDOW: u32 = 256 * 1024 * 1024;
/// Largest HTTP/2 DATA frame: fewer frames (and frame headers) per byte.
pub const MUX_FRAME: u32 = 64 * 1024;

/// `sha256:<hex>` of a PEM certificate's DER bytes, or why the text is not
/// exactly one certificate (which can then match no hash).
pub fn ca_hash(pem: &str) -> String {
    match single_certificate(pem) {
        Ok(der) => der_hash(&der),
        Err(e) => format!("(not a CA certificate: {e})"),
    }
}

/// `sha256:<hex>` of DER bytes.
pub fn der_hash(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        crate::tunnel::keys::hex(&<sha2::Sha256 as sha2::Digest>::digest(der))
    )
}

/// The one certificate in `pem`, as the TLS stack reads it. A CA fetched
/// before it is trusted is checked against a hash: the hash must be of
/// exactly what is then trusted, so anything but a single certificate (a
/// second one, a key, a block of another kind, text a second parser reads
/// differently) is refused rather than hashed one way and trusted another.
pub fn single_certificate(pem: &str) -> Result<Vec<u8>, String> {
    let mut items = Vec::new();
    for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
        items.push(item.map_err(|e| format!("not valid PEM ({e})"))?);
    }
    match items.as_slice() {
        [rustls_pemfile::Item::X509Certificate(der)] => Ok(der.to_vec()),
        [] => Err("no certificate".into()),
        [_] => Err("not a certificate".into()),
        _ => Err(format!("{} PEM items, not one certificate", items.len())),
    }
}

/// The PEM text of a DER certificate, as towerctl writes it.
pub fn certificate_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_ca() -> String {
        let key = KeyPair::generate().unwrap();
        ca_params().unwrap().self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_is_made_only_where_neither_file_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let write = |p: &Path, b: &[u8], _mode: u32| -> Result<()> {
            std::fs::write(p, b)?;
            Ok(())
        };
        let names = ["localhost".to_string()];
        let first = load(dir.path(), &names, write).unwrap().ca_pem;
        // Loaded again: the same CA.
        assert_eq!(load(dir.path(), &names, write).unwrap().ca_pem, first);
        // Half of it gone: refused in words, the key left as it was.
        let key = std::fs::read(dir.path().join("ca.key")).unwrap();
        std::fs::remove_file(dir.path().join("ca.crt")).unwrap();
        let e = format!("{:#}", load(dir.path(), &names, write).err().unwrap());
        assert!(e.contains("half there") && e.contains("ca.crt"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);
        assert!(!dir.path().join("ca.crt").exists());
        // Unreadable (a directory where the file should be): refused too.
        std::fs::create_dir(dir.path().join("ca.crt")).unwrap();
        let e = format!("{:#}", load(dir.path(), &names, write).err().unwrap());
        assert!(e.contains("cannot read the gateway CA file"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key);
    }

    #[test]
    fn the_hash_is_of_exactly_the_certificate_that_is_trusted() {
        let (real, evil) = (new_ca(), new_ca());
        let real_der = single_certificate(&real).unwrap();
        assert_eq!(ca_hash(&real), der_hash(&real_der));
        assert_eq!(certificate_pem(&real_der), real.replace("\r\n", "\n"));
        // A hostile gateway's answer: the real CA's base64 in a block of
        // another kind (skipped by the PEM reader, hashed by the old
        // line-based hash), then its own CA on lines split by '\r' (one line
        // for a '\n' split, three for the PEM reader). The old hash matched
        // the real CA while the evil one was trusted.
        let b64 = |pem: &str| -> String {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let crafted = format!(
            "-----BEGIN TOWERCTL-----\n{}\n-----END TOWERCTL-----\n-----BEGIN CERTIFICATE-----\r{}\r-----END CERTIFICATE-----\n",
            b64(&real),
            b64(&evil).replace('\n', "")
        );
        assert_ne!(ca_hash(&crafted), ca_hash(&real), "{crafted}");
        if let Ok(der) = single_certificate(&crafted) {
            assert_eq!(der, single_certificate(&evil).unwrap());
        }
        // Two certificates, a key, or nothing: refused.
        assert!(single_certificate(&format!("{real}{evil}")).is_err());
        assert!(single_certificate("").is_err());
        let key = KeyPair::generate().unwrap().serialize_pem();
        assert!(single_certificate(&key).is_err());
        assert!(ca_hash(&key).starts_with("(not a CA certificate"));
    }
}
