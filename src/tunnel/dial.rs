//! TCP connections to a name that resolves to several addresses, as RFC
//! 8305 ("Happy Eyeballs" v2) makes them: one address after another was
//! tried to its end, and an address that drops what is sent to it (broken
//! IPv6 on a dual-stack name, one dead host of several) took the agent's
//! whole connect timeout at every attempt, the working address never tried.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;

/// How long an attempt has before the next address is tried beside it
/// (RFC 8305's recommended "Connection Attempt Delay").
const STAGGER: Duration = Duration::from_millis(250);

/// Connects to `host:port`: every address it resolves to, families taken
/// in turn, a new attempt every [`STAGGER`] while earlier ones are still
/// pending (at once when one fails); the first connection wins. The
/// caller bounds the whole.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let host = host.trim_matches(|c| c == '[' || c == ']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    connect_first(interleaved(addrs)).await
}

/// [`connect`] to `HOST:PORT` (`[V6]:PORT` too, and an unbracketed IPv6
/// address whose last `:` starts the port).
pub async fn connect_to(target: &str) -> io::Result<TcpStream> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{target}' is not HOST:PORT"),
        )
    };
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    connect(host, port).await
}

/// `addrs` with the two families taking turns, the first address's family
/// first, each family in the resolver's order.
pub fn interleaved(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let v6_first = first.is_ipv6();
    let mut out = Vec::with_capacity(addrs.len());
    let (a, b): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.into_iter().partition(|x| x.is_ipv6() == v6_first);
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// One address; its failure names it (of several, which one said what).
async fn attempt(a: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect(a)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))
}

/// The first of `addrs` to connect, tried as [`connect`] says; the last
/// failure when none does.
pub async fn connect_first(addrs: Vec<SocketAddr>) -> io::Result<TcpStream> {
    let mut rest = addrs.into_iter();
    let mut pending = FuturesUnordered::new();
    let Some(a) = rest.next() else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the name resolved to no address",
        ));
    };
    pending.push(attempt(a));
    let mut last = None;
    loop {
        let more = rest.len() > 0;
        tokio::select! {
            r = pending.next() => match r {
                Some(Ok(s)) => return Ok(s),
                Some(Err(e)) => {
                    last = Some(e);
                    if let Some(a) = rest.next() {
                        pending.push(attempt(a));
                    } else if pending.is_empty() {
                        break;
                    }
                }
                None => break,
            },
            () = tokio::time::sleep(STAGGER), if more => {
                if let Some(a) = rest.next() {
                    pending.push(attempt(a));
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no address answered")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn families_take_turns() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = interleaved(vec![
            a("[::1]:1"),
            a("[::2]:1"),
            a("[::3]:1"),
            a("127.0.0.1:1"),
            a("127.0.0.2:1"),
        ]);
        assert_eq!(
            got,
            vec![
                a("[::1]:1"),
                a("127.0.0.1:1"),
                a("[::2]:1"),
                a("127.0.0.2:1"),
                a("[::3]:1")
            ]
        );
        assert!(interleaved(Vec::new()).is_empty());
    }

    /// A listener on 127.0.0.2 whose accept queue is full: the kernel
    /// drops further SYNs, as a black-holed address does.
    pub(crate) async fn black_hole() -> (tokio::net::TcpListener, SocketAddr, Vec<TcpStream>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => return (l, addr, held),
            }
        }
        panic!("the accept queue never filled")
    }

    /// An address that drops SYNs first, a working one second: connected
    /// within a moment (one after the other, the first held the attempt
    /// for the kernel's SYN retries, minutes).
    #[tokio::test]
    async fn a_black_holed_address_does_not_hold_up_the_next() {
        let (_l, black, _held) = black_hole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let start = std::time::Instant::now();
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            connect_first(vec![black, good_addr]),
        )
        .await
        .expect("still trying the black-holed address after 5 s")
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // A refused address is left at once for the next.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = closed.local_addr().unwrap();
        drop(closed);
        let s = connect_first(vec![refused, good_addr]).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        let e = connect_first(vec![refused]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // The failure names the address that said it.
        assert!(e.to_string().starts_with(&format!("{refused}: ")), "{e}");
    }

    /// `HOST:PORT` as `cluster expose` keeps it: a name, an IPv4 address,
    /// an IPv6 address with or without brackets.
    #[tokio::test]
    async fn exposed_targets_are_read_in_every_spelling() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        for t in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[127.0.0.1]:{port}"),
        ] {
            assert!(connect_to(&t).await.is_ok(), "{t}");
        }
        if let Ok(l6) = tokio::net::TcpListener::bind("[::1]:0").await {
            let port = l6.local_addr().unwrap().port();
            for t in [format!("[::1]:{port}"), format!("::1:{port}")] {
                let s = connect_to(&t).await.unwrap_or_else(|e| panic!("{t}: {e}"));
                assert_eq!(s.peer_addr().unwrap(), l6.local_addr().unwrap());
            }
        }
        for bad in ["no-port", "host:", "host:99999"] {
            let e = connect_to(bad).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
