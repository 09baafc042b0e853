//! Daemons: the hub (tunnel listener, gateway, registry) and the agent
//! (tunnel client, upstream proxy), their control socket and their
//! background life cycle.

pub mod access;
pub mod admission;
pub mod agent;
pub mod audit;
pub mod clientas;
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
pub mod pace;
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
pub mod x509;

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

/// Binds a TCP listener on `addr` with room for `backlog` connections
/// waiting to be accepted. Any IPv4 address (`0.0.0.0:PORT`, the hub's
/// defaults and the manifests') is taken as any address at all, as Go's
/// `net.Listen` and so kube-apiserver and the kubelet take it: both
/// families where the host has IPv6 (`[::]:PORT` with `IPV6_V6ONLY` off,
/// IPv4 clients seen as IPv4-mapped addresses, which [`accept_next`] turns
/// back into IPv4), IPv4 alone where it has not. Bound to IPv4 alone, an
/// IPv6-only or IPv6-first cluster's clients, probes and agents were
/// refused. Returns the listener and the address to report: `addr` with
/// the port the kernel gave.
pub fn listen_tcp(
    addr: std::net::SocketAddr,
    backlog: u32,
) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    use std::os::fd::AsRawFd;
    let any_family = || -> std::io::Result<tokio::net::TcpListener> {
        let s = tokio::net::TcpSocket::new_v6()?;
        set_int_option(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        s.set_reuseaddr(true)?;
        s.bind((std::net::Ipv6Addr::UNSPECIFIED, addr.port()).into())?;
        s.listen(backlog)
    };
    let l = match (addr.ip() == std::net::Ipv4Addr::UNSPECIFIED).then(any_family) {
        Some(Ok(l)) => l,
        _ => {
            let s = match addr {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(backlog)?
        }
    };
    let mut at = addr;
    at.set_port(l.local_addr()?.port());
    Ok((l, at))
}

/// Binds a TCP listener on exactly `addr`, as kubectl's port-forward binds
/// its addresses: an IPv6 address listens for IPv6 alone (`IPV6_V6ONLY`).
/// Bound with the system's default, `::` listened on every IPv4 address
/// too, and `0.0.0.0,::` failed on its second address ("in use").
pub fn listen_exactly(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let s = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => {
            let s = tokio::net::TcpSocket::new_v6()?;
            set_int_option(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
            s
        }
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// The next connection on `listener` (with TCP_NODELAY set), or `None` once
/// `cancel` fires. Accept errors (out of file descriptors, a reset before
/// accept) are logged and retried after a short pause instead of ending
/// the listener. The peer's address is an IPv4 one for an IPv4 client of a
/// listener of both families (see [`listen_tcp`]), so that limits per
/// address, `--trusted-proxy` and the logs see one form of it.
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
                    let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
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
