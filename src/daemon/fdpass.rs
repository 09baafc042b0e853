//! Passing a listening socket between processes of one user over a Unix
//! socket (`SCM_RIGHTS`): `towerctl port-forward` binds its ports and hands
//! them to the hub on the same machine, which then accepts on them itself,
//! so forwarded bytes cross one process less (see `hub/forward.rs`).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Room for one descriptor's control message, 8-byte aligned.
const CMSG_WORDS: usize = 4;

fn header(iov: &mut libc::iovec, cbuf: &mut [u64; CMSG_WORDS]) -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as _;
    msg
}

/// Sends `fd` with one data byte. Non-blocking: `WouldBlock` when the
/// socket buffer is full.
pub fn send_fd(sock: &impl AsRawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; CMSG_WORDS];
    let msg = header(&mut iov, &mut cbuf);
    // SAFETY: msg points at a control buffer with room for one descriptor
    // (CMSG_SPACE(4) = 24 bytes here ≤ 32); CMSG_FIRSTHDR is not null for it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: a valid msghdr; the kernel only reads it.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::ErrorKind::WriteZero.into()),
        _ => Ok(()),
    }
}

/// Receives one descriptor sent by [`send_fd`] (close-on-exec).
/// Non-blocking: `WouldBlock` when nothing is there yet. A message without
/// exactly one descriptor is an error, and any descriptor in it is closed.
pub fn recv_fd(sock: &impl AsRawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut msg = header(&mut iov, &mut cbuf);
    // SAFETY: a valid msghdr whose buffers outlive the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel filled msg_control and set msg_controllen; the
    // CMSG_* walk stays inside it, and every descriptor it carries is now
    // ours to own (and close).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    got.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && got.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || got.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected one socket, got {}", got.len()),
        ));
    }
    Ok(got.remove(0))
}

/// A received descriptor as a TCP listener, refused unless it is one (a
/// listening IPv4/IPv6 stream socket): the peer could send any descriptor.
pub fn tcp_listener(fd: OwnedFd) -> io::Result<std::net::TcpListener> {
    let int_opt = |level, name| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for an int-sized option.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(v)
        }
    };
    let not = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the descriptor is not {what}"),
        )
    };
    if int_opt(libc::SOL_SOCKET, libc::SO_TYPE).map_err(|_| not("a socket"))? != libc::SOCK_STREAM {
        return Err(not("a stream socket"));
    }
    let domain = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(not("a TCP socket"));
    }
    if int_opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP {
        return Err(not("a TCP socket"));
    }
    if int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err(not("a listening socket"));
    }
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_crosses_and_other_descriptors_are_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send_fd(&a, l.as_raw_fd()).unwrap();
        let got = tcp_listener(recv_fd(&b).unwrap()).unwrap();
        assert_eq!(got.local_addr().unwrap(), addr);
        // The received copy accepts what connects to the original.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        got.set_nonblocking(false).unwrap();
        assert!(got.accept().is_ok());

        // A connected socket, a file and a plain byte are all refused.
        let s = std::net::TcpStream::connect(addr).unwrap();
        send_fd(&a, s.as_raw_fd()).unwrap();
        let e = tcp_listener(recv_fd(&b).unwrap()).unwrap_err();
        assert!(e.to_string().contains("listening"), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        send_fd(&a, f.as_raw_fd()).unwrap();
        let e = tcp_listener(recv_fd(&b).unwrap()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        use std::io::Write;
        (&a).write_all(b"x").unwrap();
        let e = recv_fd(&b).unwrap_err();
        assert!(e.to_string().contains("got 0"), "{e}");
        drop(a);
        assert_eq!(
            recv_fd(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
