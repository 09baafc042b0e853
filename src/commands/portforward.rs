//! `towerctl port-forward CLUSTER TYPE/NAME [LOCAL:]REMOTE…`, with kubectl's
//! syntax and messages. The local ports listen at once; every accepted
//! connection opens its own stream through the gateway (HTTP CONNECT) to
//! the agent, which resolves the target anew and dials it from inside the
//! member network. A replaced pod or a reconnected tunnel therefore never
//! leaves the forward dead: the next connection finds the new one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;

use super::exit;
use super::usectx::Source;
use crate::daemon::targets::Target;

/// A `[LOCAL:]REMOTE` pair; local 0 picks a free port.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PortPair {
    pub local: u16,
    pub remote: u16,
}

pub fn parse_ports(s: &str) -> Result<PortPair, String> {
    let bad = |what: &str| {
        format!("invalid port '{s}': {what}; use LOCAL:REMOTE, :REMOTE (random local port) or PORT")
    };
    let (l, r) = match s.split_once(':') {
        Some((l, r)) => (l, r),
        None => (s, s),
    };
    let remote: u16 = r
        .parse()
        .map_err(|_| bad("the remote port must be a number (named ports are not supported)"))?;
    if remote == 0 {
        return Err(bad("the remote port cannot be 0"));
    }
    let local: u16 = if l.is_empty() {
        0
    } else {
        l.parse()
            .map_err(|_| bad("the local port must be a number"))?
    };
    Ok(PortPair { local, remote })
}

fn addresses(list: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for a in list.iter().flat_map(|a| a.split(',')) {
        match a.trim() {
            "localhost" => out.extend([IpAddr::from([127, 0, 0, 1]), "::1".parse()?]),
            other => out.push(other.parse().with_context(|| {
                format!("invalid --address '{other}': use an IP address or localhost")
            })?),
        }
    }
    Ok(out)
}

pub async fn run(
    cluster: &str,
    resource: &str,
    ports: &[String],
    namespace: &str,
    address: &[String],
    gateway: Option<&str>,
) -> Result<u8> {
    let target = Target::from_kubectl(resource, namespace).map_err(anyhow::Error::msg)?;
    let pairs: Vec<PortPair> = ports
        .iter()
        .map(|p| parse_ports(p))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if pairs.is_empty() {
        bail!("at least one port is required: towerctl port-forward {cluster} {resource} [LOCAL:]REMOTE");
    }
    let source = Arc::new(Source::find(gateway).await?);
    source.check(cluster)?;
    let addrs = addresses(address)?;

    let mut tasks = tokio::task::JoinSet::new();
    for pair in pairs {
        // One local port for all addresses: the first bind picks it.
        let mut local = pair.local;
        let mut bound = 0;
        let mut last_err = None;
        for ip in &addrs {
            match TcpListener::bind(SocketAddr::new(*ip, local)).await {
                Ok(l) => {
                    let a = l.local_addr()?;
                    local = a.port();
                    println!("Forwarding from {a} -> {}", pair.remote);
                    bound += 1;
                    let (source, target, cluster) =
                        (source.clone(), target.clone(), cluster.to_string());
                    tasks.spawn(accept_loop(l, source, cluster, target, pair.remote));
                }
                Err(e) => last_err = Some(format!("{ip}:{local}: {e}")),
            }
        }
        if bound == 0 {
            bail!(
                "unable to listen on any of the requested addresses: {}",
                last_err.unwrap_or_default()
            );
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(exit::OK),
        _ = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => Ok(exit::OK),
        _ = tasks.join_next() => bail!("a listener failed"),
    }
}

async fn accept_loop(
    l: TcpListener,
    source: Arc<Source>,
    cluster: String,
    target: Target,
    remote: u16,
) {
    let local = l.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let Ok((mut conn, _)) = l.accept().await else {
            continue;
        };
        crate::tunnel::nodelay(&conn);
        println!("Handling connection for {local}");
        let authority = format!("{}:{remote}", target.connect_host(&cluster));
        let source = source.clone();
        tokio::spawn(async move {
            match super::https::connect_tunnel(
                &source.gateway_url,
                &source.ca_pem,
                source.token.expose(),
                &authority,
            )
            .await
            {
                Ok(mut up) => {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
                Err(e) => eprintln!("error: forwarding {local} -> {remote} failed: {e:#}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            parse_ports("8080:80"),
            Ok(PortPair {
                local: 8080,
                remote: 80
            })
        );
        assert_eq!(
            parse_ports(":80"),
            Ok(PortPair {
                local: 0,
                remote: 80
            })
        );
        assert_eq!(
            parse_ports("5432"),
            Ok(PortPair {
                local: 5432,
                remote: 5432
            })
        );
        assert!(parse_ports("8080:http")
            .unwrap_err()
            .contains("named ports"));
        assert!(parse_ports("x").is_err());
    }
}
