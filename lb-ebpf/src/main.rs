//! The l3lb XDP program: parse → classify → select → rewrite → verdict.
//!
//! One program serves both roles: the balancer (VIP traffic to backends, direct server
//! return) and the backend (strip IPIP from allowed balancers). Everything else passes
//! to the stack untouched.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod encap;
mod icmp;
mod maps;
mod parse;
mod stats;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    Action, BACKEND_F_LOCAL, DropReason, FAMILY_V4, FlowKey, FragKey, PROTO_ICMP, PROTO_IPIP,
    PROTO_TCP, PROTO_UDP, SERVICE_F_L2, SERVICE_F_SOURCE_RANGES, SrcRangeV4, VipInfo, VipKey,
};

use crate::{
    encap::Blocked,
    maps::{DECAP_V4, FRAGS, LOCAL_V4, SRC_V4, VIPS},
    parse::{eth, ipv4, l4, ptr_at},
};

/// Non-zero when the decap role is on; set by the agent at load time.
#[unsafe(no_mangle)]
static DECAP_ENABLED: u32 = 0;

/// Entry point: runs the pipeline, counts the outcome and maps it to a verdict.
#[xdp]
pub fn l3lb(ctx: XdpContext) -> u32 {
    match try_l3lb(&ctx) {
        Ok((verdict, action)) => {
            stats::action(action);
            verdict
        }
        Err(reason) => {
            stats::drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_l3lb(ctx: &XdpContext) -> Result<(u32, Action), DropReason> {
    let l2 = eth::parse(ctx)?;
    if l2.ether_type == eth::ETH_P_IP {
        return ipv4_packet(ctx, &l2);
    }
    Ok(PASS)
}

const PASS: (u32, Action) = (xdp_action::XDP_PASS, Action::Pass);

/// The VIP entry for (address, port, protocol), falling back to the all-ports entry.
#[inline(always)]
fn vip_lookup(addr: &[u8; 4], port: u16, proto: u8) -> Option<VipInfo> {
    let mut key = VipKey {
        addr: [0; 16],
        port,
        proto,
        family: FAMILY_V4,
    };
    key.addr[..4].copy_from_slice(addr);
    if let Some(v) = unsafe { VIPS.get(key) } {
        return Some(*v);
    }
    key.port = 0;
    unsafe { VIPS.get(key) }.copied()
}

#[inline(always)]
fn ipv4_packet(ctx: &XdpContext, l2: &eth::L2) -> Result<(u32, Action), DropReason> {
    let ip = ipv4::parse(ctx, l2.l3_off)?;
    let (proto, src, dst) = unsafe { ((*ip.hdr).proto, (*ip.hdr).src_addr, (*ip.hdr).dst_addr) };
    let l4_off = l2.l3_off + ip.hdr_len;

    // Only packets addressed to this node are ours to open; IPIP passing through (or for
    // another host) is left to the stack.
    if proto == PROTO_IPIP
        && !ip.fragment
        && unsafe { core::ptr::read_volatile(&DECAP_ENABLED) } != 0
        && unsafe { LOCAL_V4.get(dst) }.is_some()
    {
        let key = aya_ebpf::maps::lpm_trie::Key::new(32, src);
        if DECAP_V4.get(&key).is_none() {
            return Err(DropReason::DecapNotAllowed);
        }
        encap::decap(ctx, l2.l3_off, l2.vlans, ip.hdr_len, ip.tot_len)?;
        return Ok((xdp_action::XDP_PASS, Action::Decap));
    }
    if proto == PROTO_ICMP {
        return icmp_packet(ctx, l2, &ip, src, dst, l4_off);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(PASS);
    }

    let mut fkey = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    fkey.src[..4].copy_from_slice(&src);
    fkey.dst[..4].copy_from_slice(&dst);
    let frag_key = || FragKey {
        src: fkey.src,
        dst: fkey.dst,
        id: ip.id as u32,
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };

    // Every fragment of a datagram must reach one backend: fragments are hashed on
    // (source, destination, protocol) only, and later fragments (no ports) find their
    // service through the first one's record, else the all-ports entry.
    let (vip, syn) = if ip.later_fragment {
        let vip = match unsafe { FRAGS.get(frag_key()) } {
            Some(v) => *v,
            None => match vip_lookup(&dst, 0, proto) {
                Some(v) => v,
                None if vip_lookup(&dst, 0, PROTO_ICMP).is_some() => {
                    return Err(DropReason::FragmentUnknown);
                }
                None => return Ok(PASS),
            },
        };
        (vip, false)
    } else if ip.fragment {
        let ports: *const [u16; 2] = ptr_at(ctx, l4_off)?;
        let dport = unsafe { (*ports)[1] };
        let Some(vip) = vip_lookup(&dst, dport, proto) else {
            return Ok(PASS);
        };
        let _ = FRAGS.insert(frag_key(), vip, 0);
        (vip, false)
    } else {
        let ports = l4::parse(ctx, l4_off, proto)?;
        let Some(vip) = vip_lookup(&dst, ports.dport, proto) else {
            return Ok(PASS);
        };
        fkey.sport = ports.sport;
        fkey.dport = ports.dport;
        (vip, ports.syn)
    };
    if src == dst {
        return Err(DropReason::SourceIsVip);
    }
    if vip.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SrcRangeV4 {
                service: vip.service.to_be_bytes(),
                addr: src,
            },
        );
        if SRC_V4.get(&key).is_none() {
            return Err(DropReason::SourceNotAllowed);
        }
    }
    let choice = if ip.fragment {
        conntrack::from_table(&fkey, &vip)
    } else {
        conntrack::select(&fkey, &vip, syn)
    }
    .ok_or(DropReason::NoBackend)?;
    stats::service(
        vip.service,
        ip.tot_len as u64,
        choice.new_flow && !ip.fragment,
    );
    stats::backend(choice.id, ip.tot_len as u64);

    match forward_v4(ctx, l2, &ip, src, &vip, &choice) {
        Ok(done) => Ok(done),
        Err(Blocked::Drop(r)) => Err(r),
        // A packet that would not fit once encapsulated: tell the client the size that
        // does, so its next packets fit (TCP lowers its MSS). Sent also without DF, since
        // the balancer cannot fragment; Linux honours it for non-DF traffic too.
        Err(Blocked::TooBig(mtu)) => {
            let overhead = if vip.flags & SERVICE_F_L2 != 0 {
                0
            } else {
                encap::IPIP_OVERHEAD
            };
            let verdict = icmp::frag_needed_v4(
                ctx,
                l2.l3_off,
                l2.vlans,
                ip.hdr_len,
                mtu.saturating_sub(overhead),
            )?;
            Ok((verdict, Action::TooBig))
        }
    }
}

/// Sends a packet of `vip` to the chosen backend: locally, by MAC rewrite, or by IPIP.
#[inline(always)]
fn forward_v4(
    ctx: &XdpContext,
    l2: &eth::L2,
    ip: &ipv4::Ipv4,
    src: [u8; 4],
    vip: &VipInfo,
    choice: &conntrack::Choice,
) -> Result<(u32, Action), Blocked> {
    if choice.backend.flags & BACKEND_F_LOCAL != 0 {
        return Ok((xdp_action::XDP_PASS, Action::Local));
    }
    let b = choice.backend.addr;
    let baddr = [b[0], b[1], b[2], b[3]];
    if vip.flags & SERVICE_F_L2 != 0 {
        Ok((encap::l2_forward(ctx, baddr, src, ip.tot_len)?, Action::L2))
    } else {
        Ok((
            encap::ipip_forward(ctx, baddr, l2.l3_off, ip.tot_len)?,
            Action::Encap,
        ))
    }
}

/// ICMP to a VIP address: echo is answered; errors about a VIP flow go to its backend.
#[inline(always)]
fn icmp_packet(
    ctx: &XdpContext,
    l2: &eth::L2,
    ip: &ipv4::Ipv4,
    src: [u8; 4],
    dst: [u8; 4],
    l4_off: usize,
) -> Result<(u32, Action), DropReason> {
    // The agent marks every VIP address with an ICMP entry; anything else is not ours.
    let Some(marker) = vip_lookup(&dst, 0, PROTO_ICMP) else {
        return Ok(PASS);
    };
    if ip.fragment {
        return Ok(PASS);
    }
    let hdr: *const [u8; 2] = ptr_at(ctx, l4_off)?;
    let kind = unsafe { (*hdr)[0] };
    if kind == icmp::ECHO_REQUEST {
        let _ = marker;
        return Ok((
            icmp::echo_reply_v4(ctx, l2.l3_off, l4_off)?,
            Action::EchoReply,
        ));
    }
    if kind != icmp::DEST_UNREACH {
        return Ok(PASS);
    }
    let key = icmp::quoted_flow_v4(ctx, l4_off, dst)?;
    let vip = vip_lookup(&dst, key.dport, key.proto).ok_or(DropReason::IcmpUnmatched)?;
    let choice = conntrack::owner(&key, &vip).ok_or(DropReason::NoBackend)?;
    stats::service(vip.service, ip.tot_len as u64, false);
    stats::backend(choice.id, ip.tot_len as u64);
    match forward_v4(ctx, l2, ip, src, &vip, &choice) {
        Ok(done) => Ok(done),
        Err(Blocked::Drop(r)) => Err(r),
        Err(Blocked::TooBig(_)) => Err(DropReason::MtuExceeded),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License of the program: GPL, so the kernel lets it call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
