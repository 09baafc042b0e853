//! A minimal HTTPS GET for talking to a hub's gateway API from an operator
//! machine (`login`, `use`). One request per connection: these are rare.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// How to trust the gateway.
pub enum Trust<'a> {
    /// Its CA, as PEM.
    Ca(&'a str),
    /// Anything: only to fetch the CA before checking it against a hash.
    FetchCaOnly,
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(trust: &Trust<'_>, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = match trust {
        Trust::Ca(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
                roots.add(c.context("the gateway CA is not valid PEM")?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::FetchCaOnly => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A gateway to talk to: its address and a TLS connector built once (the
/// CA is parsed once, not per connection).
pub struct GatewayClient {
    host: String,
    port: u16,
    connector: tokio_rustls::TlsConnector,
}

impl GatewayClient {
    pub fn new(url: &str, trust: Trust<'_>) -> Result<GatewayClient> {
        Self::with_alpn(url, trust, &[])
    }

    /// A client that offers these ALPN protocols, most preferred first.
    pub fn with_alpn(url: &str, trust: Trust<'_>, alpn: &[&[u8]]) -> Result<GatewayClient> {
        let u = url::Url::parse(url).with_context(|| format!("invalid URL '{url}'"))?;
        if u.scheme() != "https" {
            bail!("the gateway URL '{url}' must start with https://");
        }
        let host = u
            .host_str()
            .context("the gateway URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        Ok(GatewayClient {
            host,
            port: u.port_or_known_default().unwrap_or(443),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config(&trust, alpn)?)),
        })
    }

    /// `host:port`, an IPv6 address in brackets (a Host header, words).
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A TLS connection to the gateway, within [`CONNECT_DEADLINE`]: a hub
    /// gone with its host (or a VPN dropped) left a TCP connect waiting
    /// for minutes, and something that accepts and never answers TLS, for
    /// ever.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let (host, port) = (&self.host, self.port);
        let at = self.authority();
        let connecting = async {
            // A proxy towerctl cannot speak through (SOCKS, or TLS to the
            // proxy, which kubectl takes): dialed directly, as before
            // towerctl read the variables, and said once.
            let proxy = crate::tunnel::proxy::for_gateway(host, port).unwrap_or_else(|e| {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!("warning: {e}; connecting to the gateway at {at} directly");
                });
                None
            });
            let tcp = match &proxy {
                Some(p) => crate::tunnel::proxy::connect(p, host, port)
                    .await
                    .map_err(|e| {
                        super::error::CliError::Unreachable(format!(
                            "cannot connect to the gateway at {at} through the proxy {} (HTTPS_PROXY; NO_PROXY keeps a host off it): {e:#}",
                            p.shown()
                        ))
                    })?,
                // Every address of the name, families in turn: one that
                // drops packets (broken IPv6) took the whole deadline.
                None => crate::tunnel::dial::connect(host, port).await.map_err(|e| {
                    super::error::CliError::Unreachable(format!(
                        "cannot connect to the gateway at {at}: {e}"
                    ))
                })?,
            };
            crate::tunnel::nodelay(&tcp);
            let name = crate::tunnel::tls::server_name(host)
                .with_context(|| format!("invalid server name '{host}'"))?;
            self.connector.connect(name, tcp).await.map_err(|e| {
                let certificate = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                if certificate {
                    super::error::CliError::Tls(format!(
                        "TLS handshake with the gateway at {at} failed: {e} (is the CA right? A certificate the \
                         hub's CA did not issue means something in front of the hub terminates TLS, \
                         an ingress or load balancer: the gateway needs TLS passed through, see \
                         README, ingresses)"
                    ))
                    .into()
                } else {
                    super::error::CliError::Unreachable(format!(
                        "the TLS handshake with the gateway at {at} did not complete: {e} (the hub, or \
                         something in front of it, closed the connection: a load balancer with no \
                         healthy backend, or one sending a PROXY protocol header, which needs \
                         --trusted-proxy on the hub; the hub's log says why it refused)"
                    ))
                    .into()
                }
            })
        };
        tokio::time::timeout(CONNECT_DEADLINE, connecting)
            .await
            .map_err(|_| {
                super::error::CliError::Unreachable(format!(
                    "the gateway at {at} did not answer within {}s (TCP connect and TLS handshake): is the hub up, and reachable from here?",
                    CONNECT_DEADLINE.as_secs()
                ))
            })?
    }
}

/// How long a connection to the gateway may take to set up (TCP and TLS).
pub const CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The most a gateway answer may be (a CA, `whoami`, the member list of a
/// hub with thousands of members).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// GETs `url` (https) with an optional bearer token; returns status and body.
pub async fn get(url: &str, trust: Trust<'_>, token: Option<&str>) -> Result<(u16, Bytes)> {
    let gw = GatewayClient::new(url, trust)?;
    let path = url::Url::parse(url)?.path().to_string();
    let fut = async {
        let tls = gw.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::get(path).header(http::header::HOST, gw.authority());
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await?;
        let status = resp.status().as_u16();
        // Read before the gateway is trusted (its CA), so bounded.
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("the gateway's answer could not be read: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), fut)
        .await
        .map_err(|_| {
            super::error::CliError::Unreachable(format!(
                "the gateway at '{url}' did not answer within 15s"
            ))
        })?
}

/// A raw stream to `authority` in a member through the gateway's CONNECT.
/// The error is the gateway's (or agent's) own words.
pub async fn connect_tunnel(
    gw: &GatewayClient,
    token: &str,
    authority: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = gw.connect().await?;
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {token}\r\n\r\n");
    // The response head, byte by byte: what follows belongs to the stream.
    // Within 25 s (the hub gives the agent 20): a stopped hub is said, not
    // waited on for ever.
    let mut head = Vec::with_capacity(256);
    let asked = async {
        tls.write_all(req.as_bytes()).await?;
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                bail!("the gateway's answer to CONNECT is too long");
            }
            head.push(
                tls.read_u8()
                    .await
                    .context("the gateway closed the connection")?,
            );
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(25), asked)
        .await
        .map_err(|_| {
            super::error::CliError::Unreachable(
                "the gateway did not answer within 25s; is the hub up?".into(),
            )
        })??;
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        return Ok(tls);
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = vec![0u8; len];
    // Bounded: a length announced and never sent held the connection's
    // task for ever.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tls.read_exact(&mut body),
    )
    .await;
    let msg = crate::tunnel::printable(String::from_utf8_lossy(&body).trim(), 500);
    bail!(
        "{}",
        if msg.is_empty() {
            format!("the gateway answered HTTP {status}")
        } else {
            msg
        }
    )
}
