//! Daemons: the hub (tunnel listener, gateway, registry) and the agent
//! (tunnel client, upstream proxy), their control socket and their
//! background life cycle.

pub mod access;
pub mod admission;
pub mod agent;
pub mod audit;
pub mod console;
pub mod control;
pub mod etcd;
pub mod fasthash;
pub mod fdpass;
pub mod fmt;
pub mod forwards;
pub mod http;
pub mod hub;
pub mod incluster;
pub mod labels;
pub mod logfile;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod policy;
pub mod probes;
pub mod process;
pub mod proxied;
pub mod resolve;
pub mod route;
pub mod store;
pub mod store_etcd;
pub mod streams;
pub mod targets;
pub mod tls;
pub mod watchcache;
pub mod wire;

/// The next connection on `listener` (with TCP_NODELAY set), or `None` once
/// `cancel` fires. Accept errors (out of file descriptors, a reset before
/// accept) are logged and retried after a short pause instead of ending
/// the listener.
pub async fn accept_next(
    listener: &tokio::net::TcpListener,
    cancel: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    crate::tunnel::nodelay(&tcp);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    // Out of descriptors, this repeats every pause on every
                    // listener: a few lines a minute, the rest at debug.
                    static ACCEPT_ERRORS: crate::tunnel::LogBudget =
                        crate::tunnel::LogBudget::new("accept errors", 10);
                    if ACCEPT_ERRORS.admit() {
                        tracing::warn!("{what} accept failed: {e}");
                    } else {
                        tracing::debug!("{what} accept failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}
