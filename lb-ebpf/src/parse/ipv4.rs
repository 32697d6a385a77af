//! IPv4 header (any IHL).

use aya_ebpf::programs::XdpContext;
use lb_common::DropReason;
use network_types::ip::Ipv4Hdr;

use super::ptr_at;

/// The fields of an IPv4 header that the balancer uses.
pub struct Ipv4 {
    /// Pointer to the fixed part of the header.
    pub hdr: *mut Ipv4Hdr,
    /// Header length in bytes (IHL × 4), 20..=60.
    pub hdr_len: usize,
    /// Total length from the header (header + payload).
    pub tot_len: u16,
    /// More-fragments set or fragment offset non-zero.
    pub fragment: bool,
    /// Fragment offset non-zero: a later fragment, which carries no L4 header.
    pub later_fragment: bool,
    /// Identification field (ties fragments of one datagram together).
    pub id: u16,
    /// Type of service (DSCP and ECN), which an outer header copies.
    pub tos: u8,
    /// The flags byte's DF bit (0x40) as it lies in the header, which an outer header
    /// copies.
    pub df: u8,
    /// Source address, its four bytes in memory order as one word.
    pub src: u32,
    /// Destination address, likewise.
    pub dst: u32,
}

/// Parses and validates the IPv4 header at `off`: version, IHL and total length.
#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize) -> Result<Ipv4, DropReason> {
    let hdr: *mut Ipv4Hdr = ptr_at(ctx, off)?;
    let vihl = unsafe { (*hdr).vihl };
    if vihl >> 4 != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let hdr_len = ((vihl & 0x0f) as usize) * 4;
    if hdr_len < Ipv4Hdr::LEN {
        return Err(DropReason::BadIpHeader);
    }
    // The options must be inside the frame too (without options, the check above
    // covered the header).
    if hdr_len > Ipv4Hdr::LEN {
        let _: *const u8 = ptr_at(ctx, off + hdr_len - 1)?;
    }
    let base = hdr as *const u8;
    // SAFETY: the fixed header was checked against the frame above.
    let tot_len = u16::from_be(unsafe { super::load16(base.add(2)) });
    let frame_l3 = ctx.data_end() - ctx.data() - off;
    if (tot_len as usize) < hdr_len || tot_len as usize > frame_l3 {
        return Err(DropReason::BadIpHeader);
    }
    let frags = u16::from_be(unsafe { super::load16(base.add(6)) });
    // SAFETY (the loads below): as above.
    Ok(Ipv4 {
        hdr,
        hdr_len,
        tot_len,
        fragment: frags & 0x3fff != 0,
        later_fragment: frags & 0x1fff != 0,
        id: u16::from_be(unsafe { super::load16(base.add(4)) }),
        tos: unsafe { (*hdr).tos },
        df: (frags >> 8) as u8 & 0x40,
        src: unsafe { super::load32(base.add(12)) },
        dst: unsafe { super::load32(base.add(16)) },
    })
}

/// Whether the fragment whose header (`hdr_len` bytes, the packet `tot_len`, both checked
/// by `parse`) is at `off` breaks the fragmentation rules: no data, data not a multiple
/// of eight bytes with more fragments to follow (RFC 791 has senders cut at multiples of
/// eight; Linux trims the excess), or data ending past the largest datagram (65 535 bytes
/// with the shortest header: a "ping of death").
/// Read here rather than in `parse`, so that only fragments pay for it.
#[inline(always)]
pub fn bad_fragment(ctx: &XdpContext, off: usize, hdr_len: usize, tot_len: u16) -> bool {
    let Ok(f) = ptr_at::<[u8; 2]>(ctx, off + 6) else {
        return true;
    };
    // SAFETY: checked against the frame above.
    let frags = u16::from_be_bytes(unsafe { *f });
    let data = (tot_len as usize).saturating_sub(hdr_len);
    let more = frags & 0x2000 != 0;
    let end = (frags & 0x1fff) as usize * 8 + data;
    data == 0 || (more && data & 7 != 0) || end + Ipv4Hdr::LEN > u16::MAX as usize
}
