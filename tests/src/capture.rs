//! A small AF_PACKET sniffer: which MAC did a frame really come from?
//!
//! Open it *before* sending the traffic of interest: the socket queues frames from the
//! moment it is bound; [`Capture::poll`] moves them into [`Capture::frames`].

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{lab::Mac, netns::Netns};

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of IPv4-in-IP (IPIP).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP.
pub const IPPROTO_IPV6: u8 = 41;
/// IP protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Bytes kept of each frame (headers are all we look at).
const SNAPLEN: usize = 256;

/// Receive buffer asked for, so bursts between polls are not lost.
const RCVBUF: libc::c_int = 8 << 20;

/// One captured frame (truncated to 256 bytes).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The first bytes of the frame, from the Ethernet header on.
    pub data: Vec<u8>,
    /// Length of the frame on the wire (before truncation).
    pub len: usize,
    /// True if this namespace sent it (PACKET_OUTGOING), false if it arrived.
    pub outgoing: bool,
    /// When it was read from the socket.
    pub seen: Instant,
}

/// The Ethernet and IP header fields of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Ethernet source.
    pub src_mac: Mac,
    /// Ethernet destination.
    pub dst_mac: Mac,
    /// IP source (outer header for tunnelled frames).
    pub src_ip: IpAddr,
    /// IP destination (outer header).
    pub dst_ip: IpAddr,
    /// IPv4 protocol or IPv6 next header (outer header; extension headers not walked).
    pub protocol: u8,
    /// True if this namespace sent it.
    pub outgoing: bool,
}

impl Frame {
    /// Parses Ethernet (up to two VLAN tags) and the IPv4/IPv6 header; `None` otherwise.
    pub fn info(&self) -> Option<FrameInfo> {
        let d = &self.data;
        let mac_at = |at: usize| -> Option<Mac> { Some(Mac(d.get(at..at + 6)?.try_into().ok()?)) };
        let dst_mac = mac_at(0)?;
        let src_mac = mac_at(6)?;
        let (ip, ethertype) = self.l3()?;
        let (src_ip, dst_ip, protocol) = match ethertype {
            0x0800 => {
                let h = d.get(ip..ip + 20)?;
                let src: [u8; 4] = h[12..16].try_into().ok()?;
                let dst: [u8; 4] = h[16..20].try_into().ok()?;
                (
                    IpAddr::V4(Ipv4Addr::from(src)),
                    IpAddr::V4(Ipv4Addr::from(dst)),
                    h[9],
                )
            }
            0x86dd => {
                let h = d.get(ip..ip + 40)?;
                let src: [u8; 16] = h[8..24].try_into().ok()?;
                let dst: [u8; 16] = h[24..40].try_into().ok()?;
                (
                    IpAddr::V6(Ipv6Addr::from(src)),
                    IpAddr::V6(Ipv6Addr::from(dst)),
                    h[6],
                )
            }
            _ => return None,
        };
        Some(FrameInfo {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            protocol,
            outgoing: self.outgoing,
        })
    }
}

impl Frame {
    /// Offset of the IP header (after Ethernet and up to two VLAN tags) and the ethertype.
    fn l3(&self) -> Option<(usize, u16)> {
        let d = &self.data;
        let mut off = 12;
        let mut ethertype = u16::from_be_bytes(d.get(off..off + 2)?.try_into().ok()?);
        for _ in 0..2 {
            if ethertype != 0x8100 && ethertype != 0x88a8 {
                break;
            }
            off += 4;
            ethertype = u16::from_be_bytes(d.get(off..off + 2)?.try_into().ok()?);
        }
        Some((off + 2, ethertype))
    }

    /// The IP packet (from its header on, as far as captured); `None` if not IP.
    pub fn ip_packet(&self) -> Option<&[u8]> {
        let (off, ethertype) = self.l3()?;
        matches!(ethertype, 0x0800 | 0x86dd).then(|| self.data.get(off..))?
    }

    /// Source, destination and protocol (IPv4) / next header (IPv6) of the inner header
    /// of a tunnelled frame: IPv4 in IPv4 (protocol 4) or IPv6 in IPv6 (next header 41
    /// right after the fixed header). `None` for anything else.
    pub fn inner_ip(&self) -> Option<(IpAddr, IpAddr, u8)> {
        let info = self.info()?;
        let packet = self.ip_packet()?;
        let inner = match (info.src_ip, info.protocol) {
            (IpAddr::V4(_), IPPROTO_IPIP) => {
                packet.get(usize::from(packet.first()? & 0x0f) * 4..)?
            }
            (IpAddr::V6(_), IPPROTO_IPV6) => packet.get(40..)?,
            _ => return None,
        };
        match inner.first()? >> 4 {
            4 => {
                let h = inner.get(..20)?;
                let src: [u8; 4] = h[12..16].try_into().ok()?;
                let dst: [u8; 4] = h[16..20].try_into().ok()?;
                Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into(), h[9]))
            }
            6 => {
                let h = inner.get(..40)?;
                let src: [u8; 16] = h[8..24].try_into().ok()?;
                let dst: [u8; 16] = h[24..40].try_into().ok()?;
                Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), h[6]))
            }
            _ => None,
        }
    }
}

/// A raw-socket sniffer bound to one interface of one namespace.
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
    frames: Vec<Frame>,
    label: String,
}

impl Capture {
    /// Starts capturing every frame on `ifname` inside `ns`.
    pub fn open(ns: &Netns, ifname: &str) -> Result<Capture> {
        let fd = ns
            .enter(|| open_packet_socket(ifname))?
            .with_context(|| format!("opening an AF_PACKET socket on {ifname} in {}", ns.name()))?;
        Ok(Capture {
            fd,
            frames: Vec::new(),
            label: format!("{ifname} in {}", ns.name()),
        })
    }

    /// Reads frames for `duration` (0: only what is queued now) into [`Capture::frames`].
    pub fn poll(&mut self, duration: Duration) -> Result<()> {
        let deadline = Instant::now() + duration;
        loop {
            self.drain()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.wait_readable(left)?;
        }
    }

    /// Every frame read so far.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Forgets the frames read so far.
    pub fn clear(&mut self) {
        self.frames.clear();
    }

    /// Headers of the frames read so far that carry IP `src` → `dst` with `protocol`.
    pub fn find_ip(&self, src: IpAddr, dst: IpAddr, protocol: u8) -> Vec<FrameInfo> {
        self.frames
            .iter()
            .filter_map(Frame::info)
            .filter(|i| i.src_ip == src && i.dst_ip == dst && i.protocol == protocol)
            .collect()
    }

    /// Polls until a frame `src` → `dst` with `protocol` shows up (or `timeout` passes).
    pub fn wait_for_ip(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        timeout: Duration,
    ) -> Result<FrameInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain()?;
            if let Some(found) = self.find_ip(src, dst, protocol).into_iter().next() {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no frame {src} → {dst} (protocol {protocol}) on {} within {timeout:?}; saw {} frames: {:?}",
                    self.label,
                    self.frames.len(),
                    self.frames
                        .iter()
                        .filter_map(Frame::info)
                        .take(20)
                        .collect::<Vec<_>>()
                );
            }
            self.wait_readable(left)?;
        }
    }

    fn drain(&mut self) -> Result<()> {
        let mut buf = [0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buffer and address pointers refer to live memory of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &raw mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err).with_context(|| format!("reading frames on {}", self.label)),
                };
            }
            // With MSG_TRUNC, recvfrom returns the real length even if it was longer.
            let len = n as usize;
            let kept = len.min(SNAPLEN).min(buf.len());
            self.frames.push(Frame {
                data: buf[..kept].to_vec(),
                len,
                outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
                seen: Instant::now(),
            });
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err).context("poll on the capture socket");
            }
        }
        Ok(())
    }
}

fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
    // SAFETY: `name` is a valid C string; the lookup happens in this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("no interface {ifname}"));
    }
    let rcvbuf = RCVBUF;
    // SAFETY: the option value points to a live c_int. Best effort: a small buffer only
    // risks losing frames in long bursts.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const rcvbuf).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = i32::try_from(ifindex)?;
    // SAFETY: `addr` is a valid sockaddr_ll of the stated size.
    let rc = unsafe {
        libc::bind(
            raw,
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("binding to {ifname}"));
    }
    // Frames from other interfaces may have queued between socket() and bind(): drop them.
    let mut buf = [0u8; 64];
    // SAFETY: buffer pointer and length describe live memory.
    while unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) } >= 0 {}
    Ok(fd)
}
