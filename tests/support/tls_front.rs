//! A TLS front for the stand-in API server: terminates TLS with a
//! certificate from a CA made here, and passes the bytes to the plain
//! stand-in. Stands for a member's HTTPS kube-apiserver as a pod sees it
//! (`KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's `ca.crt`).
//! Its own thread and runtime; stops with the test process.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct TlsFront {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the front's certificate.
    pub ca_pem: String,
}

impl TlsFront {
    /// Listens on 127.0.0.1:0 with a certificate for 127.0.0.1 and localhost.
    pub fn start(upstream: SocketAddr) -> TlsFront {
        Self::issued(upstream, false)
    }

    /// [`TlsFront::start`] with one self-signed certificate that is also a
    /// CA (`CA:TRUE`, what `openssl req -x509` makes by default), trusted
    /// as itself: `ca_pem` is that certificate.
    #[allow(dead_code)]
    pub fn start_self_signed_ca(upstream: SocketAddr) -> TlsFront {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self::serve(upstream, cert.der().clone(), key, cert.pem())
    }

    /// [`TlsFront::start`] with a leaf that is a CA (`CA:TRUE`) issued by
    /// the trusted CA (Go takes such a leaf; webpki does not).
    #[allow(dead_code)]
    pub fn start_ca_leaf_issued_by_ca(upstream: SocketAddr) -> TlsFront {
        Self::issued(upstream, true)
    }

    /// A fresh CA and a leaf it issues for 127.0.0.1 and localhost (itself
    /// a CA with `leaf_is_ca`), served in front of `upstream`.
    fn issued(upstream: SocketAddr, leaf_is_ca: bool) -> TlsFront {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        if leaf_is_ca {
            leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        Self::serve(upstream, leaf.der().clone(), leaf_key, ca_pem)
    }

    fn serve(
        upstream: SocketAddr,
        leaf: rustls::pki_types::CertificateDer<'static>,
        leaf_key: KeyPair,
        ca_pem: String,
    ) -> TlsFront {
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf], key)
        .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::Builder::new()
            .name("tls-front".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(Ok(mut tls)) = tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                acceptor.accept(tcp),
                            )
                            .await
                            else {
                                return;
                            };
                            let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                });
            })
            .unwrap();
        TlsFront { addr, ca_pem }
    }
}
