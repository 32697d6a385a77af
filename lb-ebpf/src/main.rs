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
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    Action, BACKEND_F_LOCAL, DropReason, FAMILY_V4, FlowKey, PROTO_IPIP, PROTO_TCP, PROTO_UDP,
    SERVICE_F_L2, VipKey,
};

use crate::{
    maps::{DECAP_V4, LOCAL_V4, VIPS},
    parse::{eth, ipv4, l4},
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
    const PASS: (u32, Action) = (xdp_action::XDP_PASS, Action::Pass);
    let l2 = eth::parse(ctx)?;
    if l2.ether_type != eth::ETH_P_IP {
        return Ok(PASS);
    }
    let ip = ipv4::parse(ctx, l2.l3_off)?;
    let (proto, src, dst) = unsafe { ((*ip.hdr).proto, (*ip.hdr).src_addr, (*ip.hdr).dst_addr) };

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
    // Fragments carry no ports after the first one; they are handled by the stack until
    // fragment-aware hashing lands.
    if (proto != PROTO_TCP && proto != PROTO_UDP) || ip.fragment {
        return Ok(PASS);
    }
    let ports = l4::parse(ctx, l2.l3_off + ip.hdr_len, proto)?;

    let mut vkey = VipKey {
        addr: [0; 16],
        port: ports.dport,
        proto,
        family: FAMILY_V4,
    };
    vkey.addr[..4].copy_from_slice(&dst);
    let vip = match unsafe { VIPS.get(vkey) } {
        Some(v) => *v,
        None => {
            vkey.port = 0;
            match unsafe { VIPS.get(vkey) } {
                Some(v) => *v,
                None => return Ok(PASS),
            }
        }
    };
    if src == dst {
        return Err(DropReason::SourceIsVip);
    }

    let mut fkey = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: ports.sport,
        dport: ports.dport,
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    fkey.src[..4].copy_from_slice(&src);
    fkey.dst[..4].copy_from_slice(&dst);
    let choice = conntrack::select(&fkey, &vip, ports.syn).ok_or(DropReason::NoBackend)?;
    let bytes = ip.tot_len as u64;
    stats::service(vip.service, bytes, choice.new_flow);
    stats::backend(choice.id, bytes);

    if choice.backend.flags & BACKEND_F_LOCAL != 0 {
        return Ok((xdp_action::XDP_PASS, Action::Local));
    }
    let b = choice.backend.addr;
    let baddr = [b[0], b[1], b[2], b[3]];
    if vip.flags & SERVICE_F_L2 != 0 {
        let verdict = encap::l2_forward(ctx, baddr, src, ip.tot_len)?;
        Ok((verdict, Action::L2))
    } else {
        let verdict = encap::ipip_forward(ctx, baddr, l2.l3_off, ip.tot_len)?;
        Ok((verdict, Action::Encap))
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
