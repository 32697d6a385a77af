//! ICMP at the balancer: echo to a VIP is answered here; "fragmentation needed" goes to a
//! client whose packet would not fit once encapsulated; errors about a VIP flow are
//! matched to the flow (their forwarding is the caller's).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{DropReason, FAMILY_V4, FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use network_types::eth::EthHdr;

use crate::{csum, encap::SavedL2, parse::ptr_at};

/// ICMP type: echo request.
pub const ECHO_REQUEST: u8 = 8;
/// ICMP type: destination unreachable (code 4: fragmentation needed).
pub const DEST_UNREACH: u8 = 3;

/// Whether the balancer may answer the packet at `l3_off` (family `family`) itself: its
/// frame was sent to one station (not a link-layer group address, whose bit would
/// become the reply's source MAC) and its source is an address a reply may go to. A
/// reply to a broadcast, multicast or unspecified source would reach many hosts or
/// none (RFC 1122 3.2.2, RFC 4443 2.4); `Err(BadSource)` otherwise.
#[inline(always)]
pub fn may_answer(ctx: &XdpContext, l3_off: usize, family: u8) -> Result<(), DropReason> {
    // The whole destination MAC is checked (a one-byte check LLVM turns into a form
    // whose range the verifier does not learn), its first byte read.
    let eth: *const [u8; 6] = ptr_at(ctx, 0)?;
    // SAFETY: the bytes `ptr_at` checked.
    let group = unsafe { (*eth)[0] } & 1 != 0;
    let bad = if family == FAMILY_V4 {
        let ip: *const [u8; 16] = ptr_at(ctx, l3_off)?;
        // SAFETY: the header bytes `ptr_at` checked; the source is bytes 12..16.
        let first = unsafe { (*ip)[12] };
        first == 0 || first == 127 || first >= 224
    } else {
        let ip: *const [u8; 24] = ptr_at(ctx, l3_off)?;
        // SAFETY: the header bytes `ptr_at` checked; the source is bytes 8..24.
        let (hi, lo) = unsafe {
            (
                crate::parse::load64((ip as *const u8).add(8)),
                crate::parse::load64((ip as *const u8).add(16)),
            )
        };
        // In memory order: the first byte is `hi`'s lowest, the last `lo`'s highest.
        hi as u8 == 0xff || hi == 0 && (lo == 0 || lo == 1u64.to_be())
    };
    if group || bad {
        return Err(DropReason::BadSource);
    }
    Ok(())
}

/// Answers an ICMP echo request in place: addresses and MACs swapped, type 0, checksums
/// adjusted incrementally; the frame goes back out where it came from.
#[inline(always)]
pub fn echo_reply_v4(ctx: &XdpContext, l3_off: usize, l4_off: usize) -> Result<u32, DropReason> {
    may_answer(ctx, l3_off, FAMILY_V4)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut [u8; 20] = ptr_at(ctx, l3_off)?;
    let icmp: *mut [u8; 4] = ptr_at(ctx, l4_off)?;
    unsafe {
        let e = &mut *eth;
        core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
        let h = &mut *ip;
        // Swapping the addresses leaves the header sum unchanged; the TTL starts afresh.
        let mut src = [0u8; 4];
        src.copy_from_slice(&h[12..16]);
        let mut dst = [0u8; 4];
        dst.copy_from_slice(&h[16..20]);
        h[12..16].copy_from_slice(&dst);
        h[16..20].copy_from_slice(&src);
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] = 64;
        let c = csum::replace16([h[10], h[11]], old, u16::from_be_bytes([h[8], h[9]]));
        h[10] = c[0];
        h[11] = c[1];
        let m = &mut *icmp;
        let old = u16::from_be_bytes([m[0], m[1]]);
        m[0] = 0;
        let c = csum::replace16([m[2], m[3]], old, u16::from_be_bytes([m[0], m[1]]));
        m[2] = c[0];
        m[3] = c[1];
    }
    Ok(xdp_action::XDP_TX)
}

/// The flow an ICMP error quotes, seen from the client: the quoted packet went from the
/// VIP (a backend's reply) to the client, so the flow key is its reverse. The quote must
/// end before `end`, where the ICMP message's IP packet ends.
#[inline(always)]
pub fn quoted_flow_v4(
    ctx: &XdpContext,
    l4_off: usize,
    end: usize,
    vip: [u8; 4],
) -> Result<FlowKey, DropReason> {
    let inner_off = l4_off + 8;
    let inner: *const [u8; 20] = ptr_at(ctx, inner_off).map_err(|_| DropReason::IcmpUnmatched)?;
    let h = unsafe { *inner };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let proto = h[9];
    // A quoted packet that was a later fragment (no ports), or whose length leaves no
    // room for a TCP or UDP header, names no flow: what lies where ports would be is
    // payload, and Maglev would pick a backend for made-up ports.
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if h[0] >> 4 != 4
        || ihl < 20
        || inner_off + ihl + 4 > end
        || (proto != PROTO_TCP && proto != PROTO_UDP)
        || h[12..16] != vip
        || frag_off != 0
        || tot_len < ihl + 8
    {
        return Err(DropReason::IcmpUnmatched);
    }
    let ports: *const [u16; 2] =
        ptr_at(ctx, inner_off + ihl).map_err(|_| DropReason::IcmpUnmatched)?;
    let ports = unsafe { *ports };
    Ok(FlowKey {
        src: crate::parse::v4_in_16([h[16], h[17], h[18], h[19]]),
        dst: crate::parse::v4_in_16(vip),
        sport: ports[1],
        dport: ports[0],
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    })
}

/// Most bytes of the offending packet an ICMP error quotes: its header (≤ 60) + 8.
const MAX_QUOTE: usize = 68;

/// Turns the frame into ICMP "fragmentation needed" (type 3, code 4) back to its sender,
/// from the VIP, announcing `mtu` and quoting the offending header plus 8 bytes.
///
/// The link-layer header (VLAN tags included) is kept with its MACs swapped, so the
/// answer leaves the way the packet came.
#[inline(always)]
pub fn frag_needed_v4(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
    hdr_len: usize,
    mtu: u16,
) -> Result<u32, DropReason> {
    may_answer(ctx, l3_off, FAMILY_V4)?;
    // Save what the new frame needs from the old one before resizing it.
    let saved = SavedL2::save(ctx, vlans)?;
    let ip: *const [u8; 20] = ptr_at(ctx, l3_off)?;
    let orig = unsafe { *ip };

    let quote = hdr_len + 8;
    let frame_len = ctx.data_end() - ctx.data();
    let want = l3_off + quote;
    if want > frame_len || quote > MAX_QUOTE {
        return Err(DropReason::MtuExceeded);
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - frame_len as i32) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -28) } != 0 {
        return Err(DropReason::AdjustFailed);
    }

    saved.restore(ctx, true)?;

    let tot = ((20 + 8 + quote) as u16).to_be_bytes();
    let mut h: [u8; 20] = [
        0x45, 0, tot[0], tot[1], 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, orig[16], orig[17], orig[18],
        orig[19], orig[12], orig[13], orig[14], orig[15],
    ];
    let c = csum::ipv4_header(&h);
    h[10] = c[0];
    h[11] = c[1];
    let new_ip: *mut [u8; 20] = ptr_at(ctx, l3_off)?;
    unsafe { *new_ip = h };

    let m = mtu.to_be_bytes();
    let mut icmp: [u8; 8] = [DEST_UNREACH, 4, 0, 0, 0, 0, m[0], m[1]];
    // Checksum over the ICMP header and the quote, word by word with a constant bound.
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 8 {
        sum += u16::from_be_bytes([icmp[i], icmp[i + 1]]) as u32;
        i += 2;
    }
    let quote_off = l3_off + 28;
    let mut w = 0;
    while w < MAX_QUOTE / 2 {
        if w * 2 >= quote {
            break;
        }
        let p: *const [u8; 2] = ptr_at(ctx, quote_off + w * 2)?;
        let b = unsafe { *p };
        sum += u16::from_be_bytes(b) as u32;
        w += 1;
    }
    let c = csum::fold(sum);
    icmp[2] = c[0];
    icmp[3] = c[1];
    let new_icmp: *mut [u8; 8] = ptr_at(ctx, l3_off + 20)?;
    unsafe { *new_icmp = icmp };
    Ok(xdp_action::XDP_TX)
}

/// ICMPv6 type: echo request.
pub const ECHO_REQUEST_V6: u8 = 128;
/// ICMPv6 type: destination unreachable.
pub const DEST_UNREACH_V6: u8 = 1;
/// ICMPv6 type: packet too big.
pub const PACKET_TOO_BIG_V6: u8 = 2;

/// Answers an ICMPv6 echo request in place (type 129, addresses and MACs swapped).
#[inline(always)]
pub fn echo_reply_v6(ctx: &XdpContext, l3_off: usize, l4_off: usize) -> Result<u32, DropReason> {
    may_answer(ctx, l3_off, lb_common::FAMILY_V6)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut [u8; 40] = ptr_at(ctx, l3_off)?;
    let icmp: *mut [u8; 4] = ptr_at(ctx, l4_off)?;
    unsafe {
        let e = &mut *eth;
        core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
        let h = &mut *ip;
        // The pseudo-header sum does not change when the addresses swap places.
        let mut src = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&h[24..40]);
        h[8..24].copy_from_slice(&dst);
        h[24..40].copy_from_slice(&src);
        h[7] = 64;
        let m = &mut *icmp;
        let old = u16::from_be_bytes([m[0], m[1]]);
        m[0] = 129;
        let c = csum::replace16([m[2], m[3]], old, u16::from_be_bytes([m[0], m[1]]));
        m[2] = c[0];
        m[3] = c[1];
    }
    Ok(xdp_action::XDP_TX)
}

/// IPv6 next header of a fragment header.
const NH_FRAGMENT: u8 = 44;

/// The client-side flow an ICMPv6 error quotes (see `quoted_flow_v4`).
#[inline(always)]
pub fn quoted_flow_v6(
    ctx: &XdpContext,
    l4_off: usize,
    end: usize,
    vip: &[u8; 16],
) -> Result<FlowKey, DropReason> {
    let inner_off = l4_off + 8;
    let inner: *const [u8; 40] = ptr_at(ctx, inner_off).map_err(|_| DropReason::IcmpUnmatched)?;
    let h = unsafe { &*inner };
    // A backend's reply too large for the path is fragmented by the backend, and the error
    // quotes its first fragment: behind the fragment header, the ports (as IPv4 takes a
    // quoted first fragment). A later fragment's quote holds none.
    let (proto, l4) = if h[6] == NH_FRAGMENT {
        let f: *const [u8; 8] =
            ptr_at(ctx, inner_off + 40).map_err(|_| DropReason::IcmpUnmatched)?;
        let f = unsafe { *f };
        if u16::from_be_bytes([f[2], f[3]]) >> 3 != 0 {
            return Err(DropReason::IcmpUnmatched);
        }
        (f[0], inner_off + 48)
    } else {
        (h[6], inner_off + 40)
    };
    // As for IPv4: a payload too short for a TCP or UDP header names no flow.
    if h[0] >> 4 != 6
        || l4 + 4 > end
        || (proto != PROTO_TCP && proto != PROTO_UDP)
        || h[8..24] != vip[..]
        || u16::from_be_bytes([h[4], h[5]]) < 8
    {
        return Err(DropReason::IcmpUnmatched);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4).map_err(|_| DropReason::IcmpUnmatched)?;
    let ports = unsafe { *ports };
    let mut key = FlowKey {
        src: [0; 16],
        dst: *vip,
        sport: ports[1],
        dport: ports[0],
        proto,
        family: lb_common::FAMILY_V6,
        _pad: [0; 2],
    };
    key.src.copy_from_slice(&h[24..40]);
    Ok(key)
}

/// Bytes of the offending packet a "packet too big" quotes (enough for every header the
/// sender needs to find its flow, well inside the 1280-byte minimum MTU).
const MAX_QUOTE_V6: usize = 128;

/// Turns the frame into ICMPv6 "packet too big" back to its sender, from the VIP,
/// announcing `mtu` and quoting the start of the offending packet.
#[inline(always)]
pub fn packet_too_big_v6(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
    tot_len: u16,
    mtu: u16,
) -> Result<u32, DropReason> {
    may_answer(ctx, l3_off, lb_common::FAMILY_V6)?;
    let saved = SavedL2::save(ctx, vlans)?;
    let ip: *const [u8; 40] = ptr_at(ctx, l3_off)?;
    let orig = unsafe { *ip };

    let quote = if (tot_len as usize) < MAX_QUOTE_V6 {
        (tot_len as usize) & !1
    } else {
        MAX_QUOTE_V6
    };
    let frame_len = ctx.data_end() - ctx.data();
    let want = l3_off + quote;
    if want > frame_len {
        return Err(DropReason::MtuExceeded);
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - frame_len as i32) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -48) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    saved.restore(ctx, true)?;

    let plen = ((8 + quote) as u16).to_be_bytes();
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4] = plen[0];
    h[5] = plen[1];
    h[6] = lb_common::PROTO_ICMPV6;
    h[7] = 64;
    h[8..24].copy_from_slice(&orig[24..40]);
    h[24..40].copy_from_slice(&orig[8..24]);

    let m = (mtu as u32).to_be_bytes();
    let mut icmp: [u8; 8] = [PACKET_TOO_BIG_V6, 0, 0, 0, m[0], m[1], m[2], m[3]];
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum: u32 = 0;
    let mut i = 8;
    while i < 40 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum += (8 + quote) as u32 + lb_common::PROTO_ICMPV6 as u32;
    let mut i = 0;
    while i < 8 {
        sum += u16::from_be_bytes([icmp[i], icmp[i + 1]]) as u32;
        i += 2;
    }
    let new_ip: *mut [u8; 40] = ptr_at(ctx, l3_off)?;
    unsafe { *new_ip = h };
    let quote_off = l3_off + 48;
    let mut w = 0;
    while w < MAX_QUOTE_V6 / 2 {
        if w * 2 >= quote {
            break;
        }
        let p: *const [u8; 2] = ptr_at(ctx, quote_off + w * 2)?;
        sum += u16::from_be_bytes(unsafe { *p }) as u32;
        w += 1;
    }
    let c = csum::fold(sum);
    icmp[2] = c[0];
    icmp[3] = c[1];
    let new_icmp: *mut [u8; 8] = ptr_at(ctx, l3_off + 40)?;
    unsafe { *new_icmp = icmp };
    Ok(xdp_action::XDP_TX)
}
