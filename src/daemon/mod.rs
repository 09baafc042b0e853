//! Daemons: the hub (tunnel listener, gateway, registry) and the agent
//! (tunnel client, upstream proxy), their control socket and their
//! background life cycle.

pub mod agent;
pub mod audit;
pub mod control;
pub mod forwards;
pub mod gateway;
pub mod hub;
pub mod labels;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod process;
pub mod resolve;
pub mod route;
pub mod store;
pub mod targets;
pub mod tls;

/// Formats unix seconds as an RFC 3339 UTC time, for messages.
pub fn fmt_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

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
                    tracing::warn!("{what} accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times() {
        assert_eq!(super::fmt_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::fmt_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
