//! TCP and UDP: ports and the TCP flags the balancer needs.

use aya_ebpf::programs::XdpContext;
use lb_common::{DropReason, PROTO_TCP};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use super::ptr_at;

/// Ports (network byte order) and whether the segment opens a connection.
pub struct Ports {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP SYN without ACK: a new connection that always takes a fresh backend choice.
    pub syn: bool,
}

/// Parses the TCP or UDP header at `off`; `proto` must be TCP or UDP, and `end` is the
/// offset where the IP packet ends by its own length field.
///
/// Headers are checked against `end`, not only against the frame: bytes past the IP
/// length are link padding, and a header found there belongs to no packet.
#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize, end: usize, proto: u8) -> Result<Ports, DropReason> {
    if proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, off)?;
        if off + TcpHdr::LEN > end {
            return Err(DropReason::Truncated);
        }
        // Byte 12 holds the data offset, byte 13 the flags (within the checked header).
        let raw = tcp as *const u8;
        let doff = (unsafe { *raw.add(12) } >> 4) as usize * 4;
        if doff < TcpHdr::LEN || off + doff > end {
            return Err(DropReason::BadL4Header);
        }
        let flags = unsafe { *raw.add(13) };
        Ok(Ports {
            // SAFETY: the header was checked against the frame above.
            sport: unsafe { super::load16(tcp as *const u8) },
            dport: unsafe { super::load16((tcp as *const u8).add(2)) },
            syn: flags & 0x12 == 0x02,
        })
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, off)?;
        if off + UdpHdr::LEN > end {
            return Err(DropReason::Truncated);
        }
        // The UDP length covers header and data: below 8 or past the IP payload, the
        // receiver's stack discards the datagram (a shorter one is trimmed, as Linux does).
        // SAFETY: the header was checked against the frame above.
        let len = u16::from_be(unsafe { super::load16((udp as *const u8).add(4)) }) as usize;
        if len < UdpHdr::LEN || off + len > end {
            return Err(DropReason::BadL4Header);
        }
        Ok(Ports {
            sport: unsafe { super::load16(udp as *const u8) },
            dport: unsafe { super::load16((udp as *const u8).add(2)) },
            syn: false,
        })
    }
}
