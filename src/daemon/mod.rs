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
/// TCP keepalive on an accepted connection: a probe after 60 s of
/// silence, every 10 s, 6 unanswered end it. A client that vanished (a
/// laptop put to sleep, a NAT entry dropped) during a quiet `exec`, `logs
/// -f` or port-forward otherwise held its stream, its channel to the agent
/// and its place under the operator's stream limit for ever; kube-apiserver
/// probes its clients the same way.
pub fn keepalive(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let r = set_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
        .and_then(|()| set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60))
        .and_then(|()| set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10))
        .and_then(|()| set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6));
    if let Err(e) = r {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}

/// `setsockopt` of an integer option on the open socket `fd`.
pub fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the caller's `fd` is an open socket for the duration of the
    // call, and the option value is a c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

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
                    keepalive(&tcp);
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

#[cfg(test)]
mod accept_tests {
    /// Accepted connections carry TCP keepalive (60 s, then every 10 s, 6
    /// probes).
    #[tokio::test]
    async fn accepted_connections_are_probed_when_silent() {
        use std::os::fd::AsRawFd;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (tcp, _) = super::accept_next(&l, &cancel, "test").await.unwrap();
        let get = |level, name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: an open socket; `v` and `len` describe a c_int.
            let r = unsafe {
                libc::getsockopt(
                    tcp.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 60);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 6);
    }
}
