//! TLS to the member's API server, verified as kubectl verifies it.
//!
//! kube builds the agent's rustls configuration from the kubeconfig
//! (client certificate, `certificate-authority(-data)`, `tls-server-name`,
//! `insecure-skip-tls-verify`); this module only adds what Go's
//! `crypto/x509` (kubectl's) takes and webpki refuses: an API server whose
//! own certificate *is* one of the kubeconfig's trusted certificates and
//! carries `basicConstraints CA:TRUE` — the self-signed certificate
//! `openssl req -x509` makes by default, used as both CA and server
//! certificate. Go accepts such a leaf because it is itself a root
//! (`Certificate.Verify`: a leaf found in `Roots` is a chain of one);
//! webpki refuses any CA certificate in the end-entity position
//! (`CaUsedAsEndEntity`).
//!
//! So: webpki verifies first, unchanged; only when it refuses a leaf as a
//! CA used as end entity *and* that leaf is byte for byte one of the
//! configured trust anchors is it accepted, after the checks Go makes on a
//! chain of one: the name dialled (or `tls-server-name`) among its subject
//! alternative names, the time within its validity, and its extended key
//! usage (when it has one) allowing server authentication. Its signature is
//! not checked (it is trusted as the operator's configuration names it);
//! the handshake's own signature is checked by webpki as for any leaf.
//! Every other refusal stands.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};

/// kube's HTTPS connector over `connector`, with the verifier of this
/// module where the kubeconfig names its own trusted certificates.
pub(super) fn https_connector<H>(
    config: &kube::Config,
    connector: H,
) -> anyhow::Result<hyper_rustls::HttpsConnector<H>> {
    use kube::client::ConfigExt;
    let mut tls = config.rustls_client_config()?;
    if let Some(roots) = roots_to_verify(config) {
        tls.dangerous()
            .set_certificate_verifier(Arc::new(RootAsLeaf::new(roots)?));
    }
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    // As kube's own builder: `tls-server-name` names the certificate to expect.
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "the member kubeconfig's tls-server-name '{}' is not a host name ({e})",
                    name.escape_debug()
                )
            })?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(builder.enable_http1().wrap_connector(connector))
}

/// The kubeconfig's own trusted certificates, when kube verifies against
/// them as they were read: not with `insecure-skip-tls-verify` (nothing is
/// verified), not in a pod (the service account's CA, which kube re-reads
/// as it rotates, is a cluster CA that signs the API server's certificate),
/// not without any (the system's trust).
fn roots_to_verify(config: &kube::Config) -> Option<&[Vec<u8>]> {
    if config.accept_invalid_certs || config.root_cert_file.is_some() {
        return None;
    }
    config.root_cert.as_deref().filter(|r| !r.is_empty())
}

/// webpki's verifier over the kubeconfig's certificates, taking also a
/// leaf that is one of them (see the module's comment).
#[derive(Debug)]
struct RootAsLeaf {
    webpki: Arc<WebPkiServerVerifier>,
    roots: Vec<Vec<u8>>,
}

impl RootAsLeaf {
    fn new(roots: &[Vec<u8>]) -> anyhow::Result<Self> {
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| anyhow::anyhow!("a certificate of the member kubeconfig's certificate-authority is not usable ({e})"))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| anyhow::anyhow!("cannot verify the member API server's certificate ({e})"))?;
        Ok(Self {
            webpki,
            roots: roots.to_vec(),
        })
    }
}

impl ServerCertVerifier for RootAsLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e)
                if is_ca_used_as_end_entity(&e)
                    && self.roots.iter().any(|r| r[..] == end_entity[..]) =>
            {
                trusted_leaf_is_valid(end_entity, server_name, now)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn is_ca_used_as_end_entity(e: &TlsError) -> bool {
    matches!(
        e,
        TlsError::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::CaUsedAsEndEntity)
    )
}

/// What Go checks of a chain of one trusted certificate: name, time,
/// extended key usage. `der` is one of the operator's own trusted
/// certificates (compared byte for byte before this is called).
fn trusted_leaf_is_valid(
    der: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), TlsError> {
    let cert = webpki::EndEntityCert::try_from(der)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    cert.verify_is_valid_for_subject_name(server_name)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::NotValidForName))?;
    let facts = crate::daemon::x509::leaf_facts(der)
        .ok_or(TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    let now_secs = now.as_secs();
    if now_secs < facts.not_before {
        return Err(TlsError::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now_secs > facts.not_after {
        return Err(TlsError::InvalidCertificate(CertificateError::Expired));
    }
    if !facts.server_auth {
        return Err(TlsError::InvalidCertificate(
            CertificateError::InvalidPurpose,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::x509::tests::self_signed_ca;

    #[test]
    fn a_trusted_self_signed_ca_is_taken_as_its_own_leaf_only_when_valid() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = UnixTime::now();
        let name = ServerName::try_from("api.member.test").unwrap();
        let (good, _) = self_signed_ca(vec!["api.member.test".into()], vec![], (2020, 2099));
        let (other, _) = self_signed_ca(vec!["api.member.test".into()], vec![], (2020, 2099));
        let verifier = RootAsLeaf::new(&[good.to_vec()]).unwrap();
        assert!(verifier
            .verify_server_cert(&good, &[], &name, &[], now)
            .is_ok());
        // Not one of the trusted certificates: webpki's refusal stands.
        let e = verifier
            .verify_server_cert(&other, &[], &name, &[], now)
            .unwrap_err();
        assert!(is_ca_used_as_end_entity(&e), "{e:?}");
        // Trusted, but for another name, expired, not yet valid, or for clients only.
        let wrong = ServerName::try_from("other.test").unwrap();
        let e = verifier
            .verify_server_cert(&good, &[], &wrong, &[], now)
            .unwrap_err();
        assert_eq!(
            e,
            TlsError::InvalidCertificate(CertificateError::NotValidForName)
        );
        // (webpki reads the dates before the CA flag: its own refusal, with
        // the dates, comes first.)
        let expired = |e: &TlsError| {
            matches!(
                e,
                TlsError::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            )
        };
        let not_yet = |e: &TlsError| {
            matches!(
                e,
                TlsError::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
                )
            )
        };
        let client_only =
            |e: &TlsError| *e == TlsError::InvalidCertificate(CertificateError::InvalidPurpose);
        type Refusal = fn(&TlsError) -> bool;
        let cases: [(_, _, Refusal); 3] = [
            ((2001, 2002), vec![], expired),
            ((2098, 2099), vec![], not_yet),
            (
                (2020, 2099),
                vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
                client_only,
            ),
        ];
        for (dates, eku, want) in cases {
            let (der, _) = self_signed_ca(vec!["api.member.test".into()], eku, dates);
            let v = RootAsLeaf::new(&[der.to_vec()]).unwrap();
            let e = v
                .verify_server_cert(&der, &[], &name, &[], now)
                .unwrap_err();
            assert!(want(&e), "{dates:?}: {e:?}");
        }
        // An IP address as the name, as a kubeconfig's server often is.
        let (ip, _) = self_signed_ca(vec!["127.0.0.1".into()], vec![], (2020, 2099));
        let v = RootAsLeaf::new(&[ip.to_vec()]).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        assert!(v.verify_server_cert(&ip, &[], &name, &[], now).is_ok());
    }
}
