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

/// Parses the TCP or UDP header at `off`; `proto` must be TCP or UDP.
#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize, proto: u8) -> Result<Ports, DropReason> {
    if proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, off)?;
        // Byte 12 holds the data offset, byte 13 the flags.
        let raw: *const [u8; 14] = ptr_at(ctx, off)?;
        let doff = (unsafe { (*raw)[12] } >> 4) as usize * 4;
        if doff < TcpHdr::LEN {
            return Err(DropReason::BadL4Header);
        }
        if ctx.data() + off + doff > ctx.data_end() {
            return Err(DropReason::BadL4Header);
        }
        let flags = unsafe { (*raw)[13] };
        Ok(Ports {
            sport: u16::from_ne_bytes(unsafe { (*tcp).source }),
            dport: u16::from_ne_bytes(unsafe { (*tcp).dest }),
            syn: flags & 0x12 == 0x02,
        })
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, off)?;
        Ok(Ports {
            sport: u16::from_ne_bytes(unsafe { (*udp).src }),
            dport: u16::from_ne_bytes(unsafe { (*udp).dst }),
            syn: false,
        })
    }
}
