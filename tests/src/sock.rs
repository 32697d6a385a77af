//! Socket plumbing std does not offer: bind before connect, connect with a timeout from
//! a chosen source port, and an abortive close (no TIME_WAIT, so ports can be reused).

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

/// `addr` as a `sockaddr_storage` and its length.
pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int of the stated size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Makes `close` send RST instead of FIN: no TIME_WAIT, the source port is free at once.
pub(crate) fn set_abortive_close(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value points to a live `linger` of the stated size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The socket's mark (`SO_MARK`); reading it needs no privilege.
pub(crate) fn socket_mark(fd: RawFd) -> io::Result<u32> {
    let mut mark: u32 = 0;
    let mut len = mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: the option buffer points to a live u32 whose size is passed in `len`.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw mut mark).cast(),
            &raw mut len,
        )
    })?;
    Ok(mark)
}

/// Unspecified address of the family of `like`, with `port`.
pub(crate) fn any_addr(like: IpAddr, port: u16) -> SocketAddr {
    match like {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
    }
}

/// Connects to `target` from `src_port` (any if `None`) within `timeout`.
///
/// The socket has SO_REUSEADDR and an abortive close (see [`set_abortive_close`]).
pub(crate) fn tcp_connect_from(
    target: SocketAddr,
    src_port: Option<u16>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    tcp_connect_bound(target, src_port.map(|p| any_addr(target.ip(), p)), timeout)
}

/// Connects to `target` from `local` (address and port; port 0: any) within `timeout`.
///
/// Same socket options as [`tcp_connect_from`].
pub(crate) fn tcp_connect_bound(
    target: SocketAddr,
    local: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_abortive_close(raw)?;
    if let Some(local) = local {
        let (addr, len) = sockaddr(local);
        // SAFETY: `addr` is a valid sockaddr of length `len`.
        check(unsafe { libc::bind(raw, (&raw const addr).cast(), len) })?;
    }
    let (addr, len) = sockaddr(target);
    // SAFETY: `addr` is a valid sockaddr of length `len`.
    let rc = unsafe { libc::connect(raw, (&raw const addr).cast(), len) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        wait_writable(raw, timeout)?;
        let mut so_error: libc::c_int = 0;
        let mut optlen = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the out pointers refer to live values of the stated sizes.
        check(unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut so_error).cast(),
                &raw mut optlen,
            )
        })?;
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    debug_assert_eq!(stream.as_raw_fd(), raw);
    Ok(stream)
}

fn wait_writable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one live pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            ));
        }
        return Ok(());
    }
}

/// A raw IPv4 ICMP socket (needs CAP_NET_RAW); receives whole IP packets.
pub(crate) fn icmp_raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A raw ICMPv6 socket (needs CAP_NET_RAW); receives the ICMPv6 message without the IPv6
/// header, and the kernel fills in the checksum of what it sends (RFC 3542 §3.1).
pub(crate) fn icmpv6_raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = check(unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The Internet checksum (RFC 1071) of `data`, ready to be stored big-endian; over data
/// that already holds a correct checksum it is 0.
pub(crate) fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `bind(2)` of `fd` to `local`.
pub(crate) fn bind(fd: &OwnedFd, local: SocketAddr) -> io::Result<()> {
    let (addr, len) = sockaddr(local);
    // SAFETY: `addr` is a valid sockaddr of length `len`.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) }).map(drop)
}

/// `sendto(2)` of one datagram to `to`.
pub(crate) fn send_to(fd: &OwnedFd, data: &[u8], to: SocketAddr) -> io::Result<()> {
    let (addr, len) = sockaddr(to);
    // SAFETY: buffer and address describe live memory of the given sizes.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            (&raw const addr).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for one datagram; `None` if none came (or a signal interrupted).
pub(crate) fn recv_from_within(
    fd: &OwnedFd,
    buf: &mut [u8],
    timeout: Duration,
) -> io::Result<Option<(usize, IpAddr)>> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one live pollfd.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(err)
        };
    }
    if rc == 0 {
        return Ok(None);
    }
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut from: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut from_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buffer and address pointers refer to live memory of the given sizes.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&raw mut from).cast(),
            &raw mut from_len,
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    let ip = match i32::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for an AF_INET source.
            let sin = unsafe { *(&raw const from).cast::<libc::sockaddr_in>() };
            IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        _ => {
            // SAFETY: any other family on these sockets is AF_INET6.
            let sin6 = unsafe { *(&raw const from).cast::<libc::sockaddr_in6>() };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        }
    };
    Ok(Some((n as usize, ip)))
}
