//! systemd readiness notification (`sd_notify`), without libsystemd: one
//! datagram to `$NOTIFY_SOCKET` when it is set (Type=notify units).

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Sends `state` to the socket at `path` (`@name`: an abstract socket),
/// without waiting: it is called on the daemon's runtime thread, and a
/// receiver whose queue is full (ten datagrams by default) would stop the
/// daemon's every connection until it read.
fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
    if let Some(name) = bytes.strip_prefix(b"@") {
        abstract_send(&sock, name, state)
    } else {
        sock.send_to(state.as_bytes(), path).map(|_| ())
    }
}

#[cfg(target_os = "linux")]
fn abstract_send(
    sock: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    state: &str,
) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn abstract_send(_: &std::os::unix::net::UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that reads nothing: once its queue is full the sends
    /// fail at once (and are logged by `notify`), never wait.
    #[test]
    fn a_receiver_that_reads_nothing_never_holds_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let results: Vec<_> = (0..1000)
                .map(|i| notify_to(p.as_os_str(), &format!("STATUS={i}")).is_ok())
                .collect();
            let _ = done.send(results);
        });
        // A bound for a hang, not a timing: each send returns at once.
        let results = finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a send waited for the receiver");
        assert!(results[0], "the first datagram is taken");
        assert!(results.iter().any(|ok| !ok), "the queue never filled");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=0");
    }
}
