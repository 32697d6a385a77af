//! The quick parse: the headers of a packet that may belong to a known flow, read with a
//! few wide loads and checked at once.
//!
//! It takes only what is common on the established path — TCP that does not open a
//! connection, or UDP, right after an IPv4 header without options or an IPv6 header
//! without extension headers, not a fragment — and only when every check the general
//! parse (`ipv4::parse` or `ipv6::parse`, then `l4::parse`) makes would pass. Anything
//! else is `None` and goes the general way, which then decides as it always did. Kept
//! apart from the general parse because it is the cheaper one: its few live values leave
//! the established path without most of the general path's register spills (`bench
//! --compare`: established TCP and UDP ~10 % faster, IPv6 ~14 %). The decap role reads
//! an IPIP packet's outer header the same way (`ipv4_tunnel`).

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP};

use super::{load16, load32, load64, ptr_at, v4_word_in_16};

/// The fields of a quickly parsed packet that its flow's key and its forwarding need.
pub struct Quick {
    /// Source address (IPv4: the 16-byte form).
    pub src: [u8; 16],
    /// Destination address, likewise.
    pub dst: [u8; 16],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// L3 length (header + payload).
    pub tot_len: u16,
    /// TOS (IPv4) or traffic class (IPv6).
    pub tos: u8,
    /// The DF bit as it lies in the IPv4 flags byte (0x40); 0 for IPv6.
    pub df: u8,
}

/// Bytes of an IPv4 header without options, the only kind the quick parse accepts.
const IPV4_LEN: u16 = 20;
/// Bytes of the fixed IPv6 header.
const IPV6_LEN: u16 = 40;

/// The TCP data offset in bytes, read from the header at `l4_off` (its bytes 12 and
/// 13), or `None` for a SYN (which always takes the general way, to choose afresh) or a
/// frame too short to hold them.
#[inline(always)]
fn tcp_data_offset(ctx: &XdpContext, l4_off: usize) -> Option<u16> {
    let p: *const [u8; 2] = ptr_at(ctx, l4_off + 12).ok()?;
    // SAFETY: the two bytes were checked against the frame above.
    let w = unsafe { load16(p as *const u8) };
    let flags = (w >> 8) as u8;
    if flags & 0x12 == 0x02 {
        return None;
    }
    Some(((w as u8) >> 4) as u16 * 4)
}

/// Whether an L4 header of protocol `proto` (TCP data offset `doff`, or the UDP length
/// field `udp_len`) is whole within `payload` bytes of IP payload, as `l4::parse` demands.
#[inline(always)]
fn l4_fits(proto: u8, doff: u16, udp_len: u16, payload: u16) -> bool {
    if proto == PROTO_TCP {
        doff >= 20 && doff <= payload
    } else {
        udp_len >= 8 && udp_len <= payload
    }
}

/// The quick parse of the IPv4 packet at `l3_off` (see the module's text).
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3_off: usize) -> Option<Quick> {
    // The fixed header and a UDP header; a TCP header's data offset is read apart.
    let p: *const [u8; 28] = ptr_at(ctx, l3_off).ok()?;
    let b = p as *const u8;
    // SAFETY (the loads): 28 bytes checked against the frame above.
    let w1 = unsafe { load64(b.add(8)) };
    let proto = (w1 >> 8) as u8;
    // A SYN is told first: the new-flow path pays least for the try.
    let doff = match proto {
        PROTO_TCP => tcp_data_offset(ctx, l3_off + IPV4_LEN as usize)?,
        PROTO_UDP => 0,
        _ => return None,
    };
    let (w0, dst, ports, udp_len) = unsafe {
        (
            load64(b),
            load32(b.add(16)),
            load32(b.add(20)),
            load16(b.add(24)),
        )
    };
    let tot_len = plain_ipv4_len(ctx, l3_off, w0)?;
    if !l4_fits(proto, doff, u16::from_be(udp_len), tot_len - IPV4_LEN) {
        return None;
    }
    Some(Quick {
        src: v4_word_in_16((w1 >> 32) as u32),
        dst: v4_word_in_16(dst),
        sport: ports as u16,
        dport: (ports >> 16) as u16,
        proto,
        tot_len,
        tos: (w0 >> 8) as u8,
        df: (w0 >> 48) as u8 & 0x40,
    })
}

/// The total length of the IPv4 header at `l3_off` whose first eight bytes are `w0` (as
/// loaded), when it is version 4 without options, not a fragment, and its total length
/// covers the header and fits the frame; else `None` (the general parse then decides).
#[inline(always)]
fn plain_ipv4_len(ctx: &XdpContext, l3_off: usize, w0: u64) -> Option<u16> {
    // Neither more fragments nor a fragment offset (DF may be set).
    if w0 as u8 != 0x45 || (w0 >> 48) as u16 & 0x3fffu16.to_be() != 0 {
        return None;
    }
    let tot_len = u16::from_be((w0 >> 16) as u16);
    let frame_l3 = ctx.data_end() - ctx.data() - l3_off;
    if tot_len as usize > frame_l3 || tot_len < IPV4_LEN {
        return None;
    }
    Some(tot_len)
}

/// The outer header of an IPIP packet at `l3_off` for the decap role, quickly: source
/// and destination (each a word in memory order) and total length, for the shape
/// `plain_ipv4_len` accepts (`decap` finds the inner header 20 bytes on); else `None`,
/// and the general parse decides.
#[inline(always)]
pub fn ipv4_tunnel(ctx: &XdpContext, l3_off: usize) -> Option<(u32, u32, u16)> {
    let p: *const [u8; 20] = ptr_at(ctx, l3_off).ok()?;
    let b = p as *const u8;
    // SAFETY: 20 bytes checked against the frame above.
    let (w0, src, dst) = unsafe { (load64(b), load32(b.add(12)), load32(b.add(16))) };
    let tot_len = plain_ipv4_len(ctx, l3_off, w0)?;
    Some((src, dst, tot_len))
}

/// The quick parse of the IPv6 packet at `l3_off` (see the module's text).
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l3_off: usize) -> Option<Quick> {
    // The fixed header and a UDP header; a TCP header's data offset is read apart.
    let p: *const [u8; 48] = ptr_at(ctx, l3_off).ok()?;
    let b = p as *const u8;
    // SAFETY (the loads): 48 bytes checked against the frame above.
    let w0 = unsafe { load64(b) };
    // The next header right after the fixed header: no extension headers. A SYN is told
    // first, as for IPv4.
    let proto = (w0 >> 48) as u8;
    let doff = match proto {
        PROTO_TCP => tcp_data_offset(ctx, l3_off + IPV6_LEN as usize)?,
        PROTO_UDP => 0,
        _ => return None,
    };
    let (s0, s1, d0, d1, ports, udp_len) = unsafe {
        (
            load64(b.add(8)),
            load64(b.add(16)),
            load64(b.add(24)),
            load64(b.add(32)),
            load32(b.add(40)),
            load16(b.add(44)),
        )
    };
    let (v_tc, tc_flow) = (w0 as u8, (w0 >> 8) as u8);
    if v_tc >> 4 != 6 {
        return None;
    }
    let payload = u16::from_be((w0 >> 32) as u16);
    let frame_l3 = ctx.data_end() - ctx.data() - l3_off;
    if payload as usize + IPV6_LEN as usize > frame_l3
        || !l4_fits(proto, doff, u16::from_be(udp_len), payload)
    {
        return None;
    }
    // SAFETY (both): [u64; 2] and [u8; 16] have the same size and every bit pattern is
    // valid.
    Some(Quick {
        src: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([s0, s1]) },
        dst: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([d0, d1]) },
        sport: ports as u16,
        dport: (ports >> 16) as u16,
        proto,
        // Does not wrap: payload and header fit the frame (checked above).
        tot_len: payload.wrapping_add(IPV6_LEN),
        tos: v_tc << 4 | tc_flow >> 4,
        df: 0,
    })
}
