//! IPv6 header and the extension-header walk.

use aya_ebpf::programs::XdpContext;
use lb_common::DropReason;

use super::ptr_at;

/// Length of the fixed IPv6 header.
pub const HDR_LEN: usize = 40;
/// Extension headers walked before giving up; a longer chain is dropped for a VIP.
pub const MAX_EXT_HEADERS: usize = 6;

const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
/// Authentication header.
pub const NH_AUTH: u8 = 51;
/// Destination options.
pub const NH_DEST_OPTS: u8 = 60;

/// The fixed IPv6 header's fields the balancer uses.
pub struct Ipv6 {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Next header of the fixed header.
    pub next: u8,
    /// Total length: fixed header + payload.
    pub tot_len: u16,
    /// Traffic class (DSCP and ECN), which an outer header copies.
    pub tc: u8,
}

/// Parses and validates the fixed IPv6 header at `off`.
#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize) -> Result<Ipv6, DropReason> {
    let hp: *const [u8; 40] = ptr_at(ctx, off)?;
    let b = hp as *const u8;
    let h = unsafe { &*hp };
    if h[0] >> 4 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    // SAFETY: the 40 bytes were checked against the frame above.
    let payload = u16::from_be(unsafe { super::load16(b.add(4)) }) as usize;
    let frame_l3 = ctx.data_end() - ctx.data() - off;
    // A zero payload length (jumbogram) or one beyond the frame is not forwarded.
    if (payload == 0 && h[6] == NH_HOP_BY_HOP) || payload + HDR_LEN > frame_l3 {
        return Err(DropReason::BadIpHeader);
    }
    // SAFETY: as above; [u64; 2] and [u8; 16] have the same size and every bit pattern
    // is valid.
    let (src, dst) = unsafe {
        (
            core::mem::transmute::<[u64; 2], [u8; 16]>([
                super::load64(b.add(8)),
                super::load64(b.add(16)),
            ]),
            core::mem::transmute::<[u64; 2], [u8; 16]>([
                super::load64(b.add(24)),
                super::load64(b.add(32)),
            ]),
        )
    };
    Ok(Ipv6 {
        src,
        dst,
        next: h[6],
        tot_len: (payload + HDR_LEN) as u16,
        tc: h[0] << 4 | h[1] >> 4,
    })
}

/// Where the upper-layer header starts, and fragment information.
pub struct Upper {
    /// Upper-layer protocol (TCP, UDP, ICMPv6, …).
    pub proto: u8,
    /// Offset of the upper-layer header in the frame.
    pub off: usize,
    /// A fragment header was present.
    pub fragment: bool,
    /// Fragment offset non-zero: no upper-layer header in this packet.
    pub later_fragment: bool,
    /// Fragment identification.
    pub id: u32,
    /// Where the fragment header's data (the fragmentable part) starts.
    pub frag_data: usize,
    /// The fragment's offset in its datagram's fragmentable part, in bytes.
    pub frag_offset: usize,
    /// The fragment header's M flag: more fragments follow.
    pub more: bool,
    /// The fragment header's next header: the same in every fragment of a datagram (a
    /// later fragment's walk ends there, its data being no headers), so fragments are
    /// keyed on it.
    pub frag_next: u8,
}

impl Upper {
    /// Whether the packet (of `tot_len` bytes from `l3_off`, its headers up to `self.off`
    /// inside them) is a fragment that RFC 8200 4.5 has receivers discard: data not a
    /// multiple of eight bytes with more fragments to follow, or a reassembled payload
    /// past 65 535 bytes; or one without data (Linux discards it).
    #[inline(always)]
    pub fn bad_fragment(&self, l3_off: usize, tot_len: u16) -> bool {
        if !self.fragment {
            return false;
        }
        let end = l3_off + tot_len as usize;
        // The walk put the fragment header's data at or before `off`, and the caller
        // checked `off` against the packet's end.
        let data = end.saturating_sub(self.frag_data);
        let unfragmentable = self.frag_data.saturating_sub(l3_off + HDR_LEN + 8);
        data == 0
            || (self.more && data & 7 != 0)
            || unfragmentable + self.frag_offset + data > u16::MAX as usize
    }
}

/// Walks the extension headers after the fixed header at `l3_off`.
///
/// Returns `BadIpHeader` for a chain longer than `MAX_EXT_HEADERS`, or with a second
/// fragment header.
#[inline(always)]
pub fn walk(ctx: &XdpContext, l3_off: usize, first: u8) -> Result<Upper, DropReason> {
    let mut up = Upper {
        proto: first,
        off: l3_off + HDR_LEN,
        fragment: false,
        later_fragment: false,
        id: 0,
        frag_data: 0,
        frag_offset: 0,
        more: false,
        frag_next: 0,
    };
    for _ in 0..MAX_EXT_HEADERS {
        match up.proto {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let e: *const [u8; 2] = ptr_at(ctx, up.off)?;
                let (next, len) = unsafe { ((*e)[0], (*e)[1]) };
                up.proto = next;
                up.off += (len as usize + 1) * 8;
            }
            NH_AUTH => {
                let e: *const [u8; 2] = ptr_at(ctx, up.off)?;
                let (next, len) = unsafe { ((*e)[0], (*e)[1]) };
                up.proto = next;
                up.off += (len as usize + 2) * 4;
            }
            NH_FRAGMENT => {
                // A second fragment header (RFC 8200 4.1: at most one) leaves which one
                // reassembly goes by to the receiver: the packet is malformed.
                if up.fragment {
                    return Err(DropReason::BadIpHeader);
                }
                let f: *const [u8; 8] = ptr_at(ctx, up.off)?;
                let f = unsafe { *f };
                up.proto = f[0];
                up.frag_next = f[0];
                up.fragment = true;
                let offset = u16::from_be_bytes([f[2], f[3]]);
                up.later_fragment = offset >> 3 != 0;
                up.frag_offset = (offset >> 3) as usize * 8;
                up.more = offset & 1 != 0;
                up.id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                up.off += 8;
                up.frag_data = up.off;
                // What follows a later fragment's header is data, not headers (RFC 8200
                // puts destination options and AH in the fragmentable part).
                if up.later_fragment {
                    return Ok(up);
                }
            }
            _ => return Ok(up),
        }
    }
    match up.proto {
        NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_AUTH | NH_FRAGMENT => {
            Err(DropReason::BadIpHeader)
        }
        _ => Ok(up),
    }
}
