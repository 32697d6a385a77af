//! The l3lb XDP program: parse → classify → select → rewrite → verdict.
//!
//! One program serves both roles: the balancer (VIP traffic to backends, direct server
//! return) and the backend (strip IPIP from allowed balancers). Everything else passes
//! to the stack untouched. The entry point, `l3lb`, runs the IPv4 path inline; IPv6 VIP
//! traffic continues in `l3lb_v6`, a program of its own (its own 512-byte stack) entered
//! by tail call through `L3LB_PATHS`.
#![no_std]
#![no_main]
// Inline assembly for whole-word loads from the frame (see `parse::load32`).
#![feature(asm_experimental_arch)]

mod bench;
mod conntrack;
mod csum;
mod encap;
mod icmp;
mod logs;
mod maps;
mod parse;
mod stats;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use lb_common::{
    Action, BACKEND_F_L2, BACKEND_F_LOCAL, DropReason, FAMILY_V4, FAMILY_V6, FlowKey, FragKey,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP,
    SERVICE_F_SOURCE_RANGES, SETTINGS_F_DECAP_INDEX, SETTINGS_F_DECAP_PREFIXES, SrcRangeV4,
    SrcRangeV6, VIP_INDEX_DECAP, VIP_INDEX_LOCAL, VipInfo, VipKey, VipSlot,
};

use crate::{
    encap::Blocked,
    maps::{
        DECAP_PAIRS, DECAP_V4, DECAP_V6, FRAGS, LOCAL_V4, LOCAL_V6, PATHS, SCRATCH, SETTINGS,
        SRC_V4, SRC_V6, VIP_INDEX,
    },
    parse::{eth, ipv4, ipv6, l4, ptr_at, quick},
};

/// Non-zero when the decap role is on; set by the agent at load time.
#[unsafe(no_mangle)]
static DECAP_ENABLED: u32 = 0;

/// Entry point: runs the pipeline, counts the outcome and maps it to a verdict.
///
/// Written out instead of with `#[xdp]`, whose wrapper calls the body as a function of its
/// own: with the IPv4 path inlined the body is too big for LLVM to inline into the
/// wrapper, and that call (a BPF-to-BPF call and return) would be on every packet.
#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub extern "C" fn l3lb(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = try_l3lb(&ctx);
    finish(&ctx, r)
}

/// The IPv6 balancer path for all but a known flow's packets (which `l3lb` sends itself):
/// a program of its own, entered from `l3lb` by tail call (slot `PATH_V6` of
/// `L3LB_PATHS`), so that its 512-byte stack is its own rather than shared with the IPv4
/// path inlined into the entry point.
#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub extern "C" fn l3lb_v6(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = try_v6(&ctx);
    finish_deep(&ctx, r)
}

/// Answers an IPv6 packet too big for its backend's route with "packet too big": a
/// program of its own, entered from `l3lb` or `l3lb_v6` by tail call (slot
/// `PATH_TOO_BIG_V6`) with the MTU to announce in this CPU's scratch entry (the reply
/// needs more stack than the IPv6 path leaves).
#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub extern "C" fn l3lb_too_big_v6(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = try_too_big_v6(&ctx);
    finish_deep(&ctx, r)
}

/// Counts and logs the outcome an IPv6 program left in this CPU's scratch entry: entered
/// by tail call (slot `PATH_LOG_OUTCOME`), only while debug logs are on (see
/// `finish_deep`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub extern "C" fn l3lb_log_outcome(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let r = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch entry, written before the tail call in this same run.
        Some(s) => unpack(unsafe { (*s).outcome }),
        None => Err(DropReason::ProgramMissing),
    };
    finish(&ctx, r)
}

/// `finish` for a program whose own frame leaves too little stack for the log statements'
/// functions (`l3lb_v6`, `l3lb_too_big_v6`): with debug logs on, the outcome goes by tail
/// call to `l3lb_log_outcome`, which counts and logs it; with logs off (the verifier
/// knows the level and removes the rest) it is counted here, without logging.
#[inline(always)]
fn finish_deep(ctx: &XdpContext, r: Result<(u32, Action), DropReason>) -> u32 {
    if logs::on()
        && let Some(s) = SCRATCH.get_ptr_mut(0)
    {
        // SAFETY: this CPU's scratch entry; `l3lb_log_outcome` reads it in this same run.
        unsafe {
            (*s).outcome = pack(r.map(Outcome::from));
            PATHS.tail_call(ctx, lb_common::PATH_LOG_OUTCOME);
        }
    }
    match r {
        Ok((verdict, action)) => {
            stats::count_action(action);
            verdict
        }
        Err(reason) => {
            stats::count_drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// Counts a program's outcome and turns it into the verdict.
#[inline(always)]
fn finish(ctx: &XdpContext, r: Result<(u32, Action), DropReason>) -> u32 {
    match r {
        Ok((verdict, action)) => {
            stats::action(ctx, action);
            verdict
        }
        Err(reason) => {
            stats::drop(ctx, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_l3lb(ctx: &XdpContext) -> Result<(u32, Action), DropReason> {
    let l2 = eth::parse(ctx)?;
    if l2.ether_type == eth::ETH_P_IP {
        // The decap role: IPIP is checked and opened here, inline like the IPv4 path (a
        // subprogram call cost the decap path 8 %, `bench --compare`). Other packets pay
        // one load and compare of the protocol byte; with the role off the verifier
        // removes all of it.
        if decap_enabled()
            && is_ipip(ctx, l2.l3_off)
            && let Some(r) = ipv4_decap(ctx, l2.l3_off, l2.vlans)
        {
            return r;
        }
        // Traffic to an address the VIP index does not hold is not ours: passed before any
        // header is parsed (see `may_be_for_a_vip_v4`).
        if !may_be_for_a_vip_v4(ctx, l2.l3_off) {
            return Ok(PASS);
        }
        // The IPv4 path runs inline: on a host with return-thunk mitigations (SRSO) a call
        // into a subprogram and its return cost ~7 % of the established path (`bench
        // --compare`). A packet of a flow checked since the agent's last change is sent
        // from the quick parse; everything else takes the general way.
        let o = match quick::ipv4(ctx, l2.l3_off).and_then(|q| known_flow(ctx, &l2, q, FAMILY_V4)) {
            Some(r) => r?,
            None => ipv4_packet(ctx, &l2)?,
        };
        if o.too_big {
            // The client is told the size that fits, in a subprogram of its own, which
            // keeps the rarely used reply code and its frame out of the path's.
            return unpack(frag_needed_v4_sub(
                XdpContext { ctx: ctx.ctx },
                l2.l3_off,
                l2.vlans,
                o.hdr_len as u64,
                o.mtu as u64,
            ));
        }
        Ok((o.verdict, o.action))
    } else if l2.ether_type == eth::ETH_P_IPV6 {
        // The same for IPv6-in-IPv6 (the fixed header's next header; a tunnel behind
        // extension headers is not opened).
        if decap_enabled()
            && is_ip6ip6(ctx, l2.l3_off)
            && let Some(r) = ipv6_decap(ctx, l2.l3_off, l2.vlans)
        {
            return r;
        }
        if !may_be_for_a_vip_v6(ctx, l2.l3_off) {
            return Ok(PASS);
        }
        // A known flow's packet is sent from here, like IPv4's (`bench --compare`: IPv6
        // established 0.949): its quick parse and send fit this program's stack, and the
        // tail call and second Ethernet parse are saved. Everything else takes the IPv6
        // program, whose general path needs a stack of its own.
        if let Some(r) =
            quick::ipv6(ctx, l2.l3_off).and_then(|q| known_flow(ctx, &l2, q, FAMILY_V6))
        {
            let o = r?;
            if o.too_big {
                return too_big_v6(ctx, o.mtu);
            }
            return Ok((o.verdict, o.action));
        }
        // SAFETY: a tail call does not return when it succeeds; nothing here holds state
        // that must be dropped.
        unsafe { PATHS.tail_call(ctx, lb_common::PATH_V6) };
        Err(DropReason::ProgramMissing)
    } else {
        Ok(PASS)
    }
}

#[inline(always)]
fn try_v6(ctx: &XdpContext) -> Result<(u32, Action), DropReason> {
    let l2 = eth::parse(ctx)?;
    if l2.ether_type != eth::ETH_P_IPV6 {
        return Ok(PASS);
    }
    // `l3lb` has tried the quick parse already (a known flow's packet does not get here).
    let o = ipv6_packet(ctx, &l2)?;
    if o.too_big {
        return too_big_v6(ctx, o.mtu);
    }
    Ok((o.verdict, o.action))
}

/// Hands an IPv6 packet too big for its backend's route to `l3lb_too_big_v6`, which
/// answers it announcing `mtu` (passed in this CPU's scratch entry).
#[inline(always)]
fn too_big_v6(ctx: &XdpContext, mtu: u16) -> Result<(u32, Action), DropReason> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(DropReason::ProgramMissing)?;
    // SAFETY: this CPU's scratch entry; the reply program reads it in this same run, and
    // a tail call does not return when it succeeds.
    unsafe {
        (*scratch).too_big_mtu = mtu as u32;
        PATHS.tail_call(ctx, lb_common::PATH_TOO_BIG_V6);
    }
    Err(DropReason::ProgramMissing)
}

#[inline(always)]
fn try_too_big_v6(ctx: &XdpContext) -> Result<(u32, Action), DropReason> {
    let l2 = eth::parse(ctx)?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(DropReason::ProgramMissing)?;
    // SAFETY: this CPU's scratch entry, written by `l3lb_v6` before the tail call.
    let mtu = unsafe { (*scratch).too_big_mtu } as u16;
    let ip = ipv6::parse(ctx, l2.l3_off)?;
    let verdict = icmp::packet_too_big_v6(ctx, l2.l3_off, l2.vlans, ip.tot_len, mtu)?;
    Ok((verdict, Action::TooBig))
}

/// Whether the IPv4 packet at `l3_off` may be for a VIP: false when its destination
/// address is in the frame and its bit in the VIP address filter is clear. Such traffic (to the node itself, to anything routed through
/// it) goes to the stack at the cost of one read and bit test, before any header is
/// validated: like every packet not for a VIP, it is the kernel's to judge, malformed or
/// not.
#[inline(always)]
fn may_be_for_a_vip_v4(ctx: &XdpContext, l3_off: usize) -> bool {
    let Ok(p) = ptr_at::<[u8; 4]>(ctx, l3_off + 16) else {
        return true;
    };
    // SAFETY: four bytes `ptr_at` checked.
    vip_address_maybe(unsafe { parse::load32(p.cast()) }, 0, 0, 0)
}

/// `may_be_for_a_vip_v4` for IPv6.
#[inline(always)]
fn may_be_for_a_vip_v6(ctx: &XdpContext, l3_off: usize) -> bool {
    let Ok(p) = ptr_at::<[u32; 4]>(ctx, l3_off + 24) else {
        return true;
    };
    let p = p as *const u8;
    // SAFETY: two 8-byte reads within the bounds `ptr_at` checked.
    let (lo, hi) = unsafe { (parse::load64(p), parse::load64(p.add(8))) };
    vip_address_maybe(lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32)
}

/// What the pipeline decided: a verdict, or that the packet is too big for the route to
/// its backend, which the family's reply code then answers (see `try_l3lb`, `try_v6`).
///
/// A plain struct with every field always set: with an enum, LLVM copied the unset
/// fields of one variant as undefined registers, which the verifier rejects.
#[derive(Clone, Copy)]
struct Outcome {
    verdict: u32,
    action: Action,
    too_big: bool,
    /// The MTU to announce when `too_big`.
    mtu: u16,
    /// The IPv4 header's length when `too_big` (the reply quotes it).
    hdr_len: u8,
}

impl Outcome {
    fn too_big(mtu: u16, hdr_len: u8) -> Self {
        Outcome {
            verdict: 0,
            action: Action::TooBig,
            too_big: true,
            mtu,
            hdr_len,
        }
    }
}

impl From<(u32, Action)> for Outcome {
    fn from((verdict, action): (u32, Action)) -> Self {
        Outcome {
            verdict,
            action,
            too_big: false,
            mtu: 0,
            hdr_len: 0,
        }
    }
}

/// Packs a result into one register: what `frag_needed_v4_sub` returns (subprograms return
/// in r0) and what `finish_deep` hands to `l3lb_log_outcome`. Neither carries a "too big"
/// outcome.
#[inline(always)]
fn pack(r: Result<Outcome, DropReason>) -> u64 {
    match r {
        Ok(o) => o.verdict as u64 | (o.action as u64) << 8,
        Err(reason) => 1 << 63 | reason as u64,
    }
}

#[inline(always)]
fn unpack(v: u64) -> Result<(u32, Action), DropReason> {
    if v >> 63 != 0 {
        return Err(DropReason::from_index((v & 0xff) as u32).unwrap_or(DropReason::Truncated));
    }
    let action = Action::from_index(((v >> 8) & 0xff) as u32).unwrap_or(Action::Pass);
    Ok(((v & 0xff) as u32, action))
}

const PASS: (u32, Action) = (xdp_action::XDP_PASS, Action::Pass);

fn decap_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&DECAP_ENABLED) != 0 }
}

/// A parsed IP packet, family-independent from here on.
///
/// Aligned, addresses first: LLVM then fills and copies them in words instead of calling
/// a byte-wise `memset`/`memcpy` subprogram.
#[repr(C, align(8))]
struct Pkt {
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    /// Upper-layer protocol.
    proto: u8,
    /// Offset of the upper-layer header.
    l4_off: usize,
    /// L3 length (header + payload); bytes past it are link padding.
    tot_len: u16,
    /// IPv4 header length (for quoting); 40 for IPv6.
    hdr_len: usize,
    fragment: bool,
    /// IPv6: a fragment that breaks the fragmentation rules, as the walk found it (see
    /// `ipv6::Upper::bad_fragment`); IPv4 reads it where it is checked (`bad_fragment`).
    bad_v6_fragment: bool,
    later_fragment: bool,
    frag_id: u32,
    /// The protocol fragments are keyed on, the same in every fragment of a datagram:
    /// the IP protocol (IPv4), the fragment header's next header (IPv6).
    frag_proto: u8,
    /// The header's TOS (IPv4) or traffic class (IPv6), and (IPv4) its DF bit (see
    /// `ipv4::Ipv4`), for the outer header; `df` is 0 for IPv6.
    tos: u8,
    df: u8,
}

/// Slots per half of the VIP index; set by the agent at load time (a power of two).
#[unsafe(no_mangle)]
static VIP_INDEX_SIZE: u32 = 0;

/// The VIP entry for (address, port, protocol), falling back to the all-ports entry.
///
/// The key's home slot is examined here, inline: it holds the key, or is empty, for
/// nearly every lookup (the index is at most a quarter full), and then the call to the
/// full search (`vip_index_search`) — a BPF-to-BPF call and return, dear under the SRSO
/// mitigation — is saved.
#[inline(always)]
fn vip_lookup(addr: &[u8; 16], port: u16, proto: u8, family: u8) -> Option<VipInfo> {
    let w = VipKey {
        addr: *addr,
        port,
        proto,
        family,
    }
    .words();
    // Read per lookup, after the packet's epoch (see `balance`), never carried in.
    let VipIndex {
        size,
        settings,
        base,
    } = vip_index();
    if size == 0 {
        return None;
    }
    let home = base + (lb_common::vip_index_hash(&w) & size.wrapping_sub(1));
    let slot = VIP_INDEX.get(home)?;
    let k = slot as *const VipSlot as *const u32;
    // SAFETY: a VipSlot starts with the 20-byte, 4-aligned key.
    let (k0, k1, k2, k3, k4) = unsafe { (*k, *k.add(1), *k.add(2), *k.add(3), *k.add(4)) };
    if k4 == w[4] && k0 == w[0] && k1 == w[1] && k2 == w[2] && k3 == w[3] {
        return Some(info_of(slot));
    }
    // An empty home slot ends the search for this key; only the all-ports entry is left.
    if k4 >> 24 == 0 && (w[4] & 0xffff == 0 || settings & lb_common::SETTINGS_F_ALL_PORTS == 0) {
        return None;
    }
    let found = vip_index_search(
        w[0] as u64,
        w[1] as u64,
        w[2] as u64,
        w[3] as u64,
        w[4] as u64,
    );
    if found >> 32 != 0 {
        return None;
    }
    VIP_INDEX.get(found as u32).map(info_of)
}

#[inline(always)]
fn info_of(slot: &VipSlot) -> VipInfo {
    VipInfo {
        service: slot.service,
        flags: slot.flags,
        ring: slot.ring,
        _reserved: 0,
    }
}

/// The VIP index as a packet finds it, read once per packet and handed to its lookups
/// (each read of the settings array is a map lookup).
#[derive(Clone, Copy)]
struct VipIndex {
    /// Slots per half; 0 until the agent has sized the index.
    size: u32,
    /// The `SETTINGS_F_*` bits.
    settings: u32,
    /// First slot of the active half.
    base: u32,
}

/// The VIP index as it stands (`size` 0 until the agent has sized it).
#[inline(always)]
fn vip_index() -> VipIndex {
    let size = unsafe { core::ptr::read_volatile(&VIP_INDEX_SIZE) };
    if size == 0 {
        return VipIndex {
            size: 0,
            settings: 0,
            base: 0,
        };
    }
    let settings = SETTINGS
        .get(lb_common::SETTINGS_FLAGS)
        .copied()
        .unwrap_or(0);
    let base = if settings & lb_common::SETTINGS_F_VIP_INDEX_B != 0 {
        size
    } else {
        0
    };
    VipIndex {
        size,
        settings,
        base,
    }
}

/// Whether the address `a0..a3` (its words in memory order) may be in the
/// VIP index: false when its bit in the address filter (in the settings array from
/// `SETTINGS_FILTER`) is clear — then no VIP or marker has this address — and when the
/// index does not exist yet.
///
/// One filter for both halves of the index (the agent sets a new address's bit before
/// the index holding it becomes active, and clears a removed one's after): the test
/// reads no settings flags, so a packet whose flow is known reads none at all.
#[inline(always)]
fn vip_address_maybe(a0: u32, a1: u32, a2: u32, a3: u32) -> bool {
    let size = unsafe { core::ptr::read_volatile(&VIP_INDEX_SIZE) };
    if size == 0 {
        return false;
    }
    let bit = lb_common::vip_filter_bit(&[a0, a1, a2, a3], size);
    match SETTINGS.get(lb_common::SETTINGS_FILTER + (bit >> 5)) {
        Some(w) => *w & (1 << (bit & 31)) != 0,
        None => true,
    }
}

/// Searches the active half of the VIP index for the key with words `w0..w4`, then (if
/// some all-ports VIP exists) for the same key with port 0: the slot found, or a value
/// ≥ 2³² when there is none.
///
/// Linear probing from the key's hash, ending at an empty slot. Array reads are inlined by
/// the verifier, so a search costs loads and compares where a hash map costs helper calls.
/// A global function (scalar arguments and result): the verifier checks it once on its
/// own instead of once per call site and probe count, which kept the whole program's
/// verification within bounds.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vip_index_search(w0: u64, w1: u64, w2: u64, w3: u64, w4: u64) -> u64 {
    let VipIndex {
        size,
        settings,
        base,
    } = vip_index();
    if size == 0 {
        return NOT_FOUND;
    }
    let mut words = [w0 as u32, w1 as u32, w2 as u32, w3 as u32, w4 as u32];
    let found = vip_index_probe(&words, base, size);
    if found != NOT_FOUND {
        return found;
    }
    // Without any all-ports VIP the second search cannot hit: skip it (the common case
    // for traffic to other destinations). The port is the word's low half in memory
    // order (see `VipKey`), on this little-endian target its low 16 bits.
    if words[4] & 0xffff == 0 || settings & lb_common::SETTINGS_F_ALL_PORTS == 0 {
        return NOT_FOUND;
    }
    words[4] &= !0xffff;
    vip_index_probe(&words, base, size)
}

const NOT_FOUND: u64 = 1 << 32;

#[inline(always)]
fn vip_index_probe(words: &[u32; 5], base: u32, size: u32) -> u64 {
    let home = lb_common::vip_index_hash(words);
    let mask = size.wrapping_sub(1);
    let mut i = 0;
    while i < lb_common::VIP_INDEX_PROBES {
        let idx = base + (home.wrapping_add(i) & mask);
        let Some(slot) = VIP_INDEX.get(idx) else {
            return NOT_FOUND;
        };
        // Word by word: comparing the arrays makes LLVM copy the key and call a
        // byte-wise `bcmp` subprogram.
        let k = slot as *const VipSlot as *const u32;
        // SAFETY: a VipSlot starts with the 20-byte, 4-aligned key.
        let (k0, k1, k2, k3, k4) = unsafe { (*k, *k.add(1), *k.add(2), *k.add(3), *k.add(4)) };
        // The family byte (the fifth word's top byte) is 0 only in empty slots.
        if k4 >> 24 == 0 {
            return NOT_FOUND;
        }
        if k0 == words[0] && k1 == words[1] && k2 == words[2] && k3 == words[3] && k4 == words[4] {
            return idx as u64;
        }
        i += 1;
    }
    NOT_FOUND
}

/// `decap_check`'s answers.
const DECAP_NOT_LOCAL: u64 = 0;
const DECAP_ALLOWED: u64 = 1;
const DECAP_DENIED: u64 = 2;

/// The decap role's checks of a tunnel packet (`family` 4: IPIP, 6: IPv6-in-IPv6) whose
/// outer addresses are `src` and `dst`, each passed as two words in memory order (IPv4:
/// the address in the first word's low half, the rest zero): `DECAP_NOT_LOCAL` when `dst`
/// is not one of this node's addresses (the packet is not ours to open), else
/// `DECAP_ALLOWED` or `DECAP_DENIED` by the allow list.
///
/// Searches of the VIP index, which holds this node's addresses and the host-exact
/// allowed sources under their own family bits (two searches; an IPv4 tunnel in the pair
/// table needs none, see `decap_pair_listed`); the LPM trie is consulted only for a
/// source the index lacks and only when some allow entry is a wider prefix. Without the
/// index flag (the agent found no room) the maps answer, as they hold the same entries.
/// Inlined into the decap paths (one call site each, stack to spare): a call to a
/// global function costs more here than its verification saves.
#[inline(always)]
fn decap_check(src_lo: u64, src_hi: u64, dst_lo: u64, dst_hi: u64, family: u8) -> u64 {
    let tunnel = if family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let src = [
        src_lo as u32,
        (src_lo >> 32) as u32,
        src_hi as u32,
        (src_hi >> 32) as u32,
    ];
    let dst = [
        dst_lo as u32,
        (dst_lo >> 32) as u32,
        dst_hi as u32,
        (dst_hi >> 32) as u32,
    ];
    let VipIndex {
        size,
        settings,
        base,
    } = vip_index();
    if settings & SETTINGS_F_DECAP_INDEX != 0 && size != 0 {
        let tail = |marker: u8| {
            VipKey {
                addr: [0; 16],
                port: 0,
                proto: tunnel,
                family: family | marker,
            }
            .words()[4]
        };
        let local = [dst[0], dst[1], dst[2], dst[3], tail(VIP_INDEX_LOCAL)];
        if vip_index_probe(&local, base, size) == NOT_FOUND {
            return DECAP_NOT_LOCAL;
        }
        let allowed = [src[0], src[1], src[2], src[3], tail(VIP_INDEX_DECAP)];
        if vip_index_probe(&allowed, base, size) != NOT_FOUND {
            return DECAP_ALLOWED;
        }
        if settings & SETTINGS_F_DECAP_PREFIXES == 0 {
            return DECAP_DENIED;
        }
    } else if family == FAMILY_V4 {
        if unsafe { LOCAL_V4.get(dst[0].to_ne_bytes()) }.is_none() {
            return DECAP_NOT_LOCAL;
        }
    } else if unsafe { LOCAL_V6.get(words_to_bytes(dst)) }.is_none() {
        return DECAP_NOT_LOCAL;
    }
    let listed = if family == FAMILY_V4 {
        DECAP_V4.get(Key::new(32, src[0].to_ne_bytes())).is_some()
    } else {
        DECAP_V6.get(Key::new(128, words_to_bytes(src))).is_some()
    };
    if listed { DECAP_ALLOWED } else { DECAP_DENIED }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute(w) }
}

fn icmp_proto(family: u8) -> u8 {
    if family == FAMILY_V4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    }
}

/// Whether the IPv4 tunnel from `src` to `dst` (words in memory order) is in the pair
/// table: then it is addressed to this node from a host-exact allowed source, and no
/// further check is needed (`bench --compare`: decap 0.90, against pairs kept in the VIP
/// index). One lookup whose index depends on the packet alone: no settings are read
/// first. The table is a shortcut the agent fills as room allows (it holds no prefix
/// entry, and a crowded bucket drops pairs): a miss proves nothing, `decap_check`
/// decides.
#[inline(always)]
fn decap_pair_listed(src: u32, dst: u32) -> bool {
    let w = lb_common::decap_pair_word(src, dst);
    match DECAP_PAIRS.get(lb_common::decap_pair_bucket(w)) {
        // A free place holds 0, which names no listed pair.
        Some(b) => w != 0 && (b[0] == w || b[1] == w),
        None => false,
    }
}

/// Whether the IPv4 packet at `l3_off` carries IPIP (a frame too short is not: the IPv4
/// path reports it).
#[inline(always)]
fn is_ipip(ctx: &XdpContext, l3_off: usize) -> bool {
    ptr_at::<network_types::ip::Ipv4Hdr>(ctx, l3_off)
        .is_ok_and(|hdr| unsafe { (*hdr).proto } == PROTO_IPIP)
}

/// The decap role for an IPIP packet: `None` unless it is addressed to one of this node's
/// addresses (then the IPv4 path takes it, malformed or not), else what to do with it
/// (opened, left to the stack as a fragment, or dropped: from an unlisted source, or
/// malformed).
#[inline(always)]
fn ipv4_decap(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
) -> Option<Result<(u32, Action), DropReason>> {
    // The common shape from the quick parse (`bench --compare`: decap 0.961), any other
    // from the general one; a malformed header's addresses are read as they lie (its
    // first 20 bytes are in the frame: see `is_ipip`), to tell whose it is.
    let (src, dst, hdr_len, tot_len, fragment, malformed) = match quick::ipv4_tunnel(ctx, l3_off) {
        Some((src, dst, tot_len)) => (
            src,
            dst,
            network_types::ip::Ipv4Hdr::LEN,
            tot_len,
            false,
            None,
        ),
        None => match ipv4::parse(ctx, l3_off) {
            Ok(ip) => (ip.src, ip.dst, ip.hdr_len, ip.tot_len, ip.fragment, None),
            Err(reason) => {
                let Ok(p) = ptr_at::<[u8; 8]>(ctx, l3_off + 12) else {
                    return None;
                };
                // SAFETY: the eight address bytes `ptr_at` checked.
                let (src, dst) = unsafe {
                    (
                        parse::load32(p.cast()),
                        parse::load32(p.cast::<u8>().add(4)),
                    )
                };
                (src, dst, 0, 0, false, Some(reason))
            }
        },
    };
    // Only packets addressed to this node are ours to open; IPIP passing through (or for
    // another host), malformed or not, is left to the balancer path, which passes it to
    // the stack unless it is addressed to a VIP. (A listed pair's destination is one of
    // the node's: a malformed packet found there is the node's to drop, below.)
    let check = if decap_pair_listed(src, dst) {
        DECAP_ALLOWED
    } else {
        decap_check(src as u64, 0, dst as u64, 0, FAMILY_V4)
    };
    if check == DECAP_NOT_LOCAL {
        return None;
    }
    if let Some(reason) = malformed {
        return Some(Err(reason));
    }
    if check != DECAP_ALLOWED {
        return Some(Err(DropReason::DecapNotAllowed));
    }
    // A fragment cannot be opened here; the stack reassembles it. Only fragments from
    // allowed sources get that far, so a kernel tunnel device cannot be used to get round
    // the allow list.
    if fragment {
        return Some(Ok(PASS));
    }
    Some(
        encap::decap(ctx, l3_off, vlans, hdr_len, tot_len)
            .map(|()| (xdp_action::XDP_PASS, Action::Decap)),
    )
}

/// Whether the IPv6 packet at `l3_off` carries IPv6-in-IPv6 in its fixed header.
#[inline(always)]
fn is_ip6ip6(ctx: &XdpContext, l3_off: usize) -> bool {
    ptr_at::<[u8; 8]>(ctx, l3_off).is_ok_and(|h| unsafe { (*h)[6] } == PROTO_IPV6)
}

/// `ipv4_decap` for IPv6-in-IPv6.
#[inline(always)]
fn ipv6_decap(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
) -> Option<Result<(u32, Action), DropReason>> {
    // As for IPv4, a malformed header's addresses are read as they lie (a frame that ends
    // before them is left to the IPv6 path); a parsed header's come from the parse.
    let (src, dst, tot_len, malformed) = match ipv6::parse(ctx, l3_off) {
        Ok(ip) => (ip.src, ip.dst, ip.tot_len, None),
        Err(reason) => {
            let Ok(a) = ptr_at::<[[u8; 16]; 2]>(ctx, l3_off + 8) else {
                return None;
            };
            // SAFETY: the 32 address bytes `ptr_at` checked.
            let [src, dst] = unsafe { *a };
            (src, dst, 0, Some(reason))
        }
    };
    // SAFETY (both): [u8; 16] and [u64; 2] have the same size and every bit pattern is
    // valid.
    let [src_lo, src_hi]: [u64; 2] = unsafe { core::mem::transmute(src) };
    let [dst_lo, dst_hi]: [u64; 2] = unsafe { core::mem::transmute(dst) };
    let check = decap_check(src_lo, src_hi, dst_lo, dst_hi, FAMILY_V6);
    if check == DECAP_NOT_LOCAL {
        return None;
    }
    if let Some(reason) = malformed {
        return Some(Err(reason));
    }
    if check != DECAP_ALLOWED {
        return Some(Err(DropReason::DecapNotAllowed));
    }
    Some(
        encap::decap_v6(ctx, l3_off, vlans, tot_len)
            .map(|()| (xdp_action::XDP_PASS, Action::Decap)),
    )
}

#[inline(always)]
fn ipv4_packet(ctx: &XdpContext, l2: &eth::L2) -> Result<Outcome, DropReason> {
    let ip = ipv4::parse(ctx, l2.l3_off)?;
    let proto = unsafe { (*ip.hdr).proto };

    let pkt = Pkt {
        family: FAMILY_V4,
        src: parse::v4_word_in_16(ip.src),
        dst: parse::v4_word_in_16(ip.dst),
        proto,
        l4_off: l2.l3_off + ip.hdr_len,
        tot_len: ip.tot_len,
        hdr_len: ip.hdr_len,
        fragment: ip.fragment,
        bad_v6_fragment: false,
        later_fragment: ip.later_fragment,
        frag_id: ip.id as u32,
        frag_proto: proto,
        tos: ip.tos,
        df: ip.df,
    };
    balance(ctx, l2, &pkt)
}

#[inline(always)]
fn ipv6_packet(ctx: &XdpContext, l2: &eth::L2) -> Result<Outcome, DropReason> {
    let ip = ipv6::parse(ctx, l2.l3_off)?;
    // Only traffic to VIP addresses is looked at further: neighbour discovery, router
    // advertisements and everything else addressed elsewhere pass untouched. TCP or UDP
    // right after the fixed header skips the address's marker lookup: `balance` looks
    // the VIP up by port anyway, and asks the marker only if the L4 header is bad (so
    // such a packet to another address still passes untouched).
    if ip.next != PROTO_TCP
        && ip.next != PROTO_UDP
        && vip_lookup(&ip.dst, 0, PROTO_ICMPV6, FAMILY_V6).is_none()
    {
        return Ok(PASS.into());
    }
    let up = ipv6::walk(ctx, l2.l3_off, ip.next)?;
    // The walk reads the frame; extension headers past the payload length are padding.
    // Upper-layer headers are checked against the packet's end later, but a later
    // fragment has none, so its chain is checked here.
    if up.off > l2.l3_off + ip.tot_len as usize {
        return Err(DropReason::Truncated);
    }
    let pkt = Pkt {
        family: FAMILY_V6,
        src: ip.src,
        dst: ip.dst,
        proto: up.proto,
        l4_off: up.off,
        tot_len: ip.tot_len,
        hdr_len: ipv6::HDR_LEN,
        fragment: up.fragment,
        bad_v6_fragment: up.bad_fragment(l2.l3_off, ip.tot_len),
        later_fragment: up.later_fragment,
        frag_id: up.id,
        frag_proto: if up.fragment { up.frag_next } else { up.proto },
        tos: ip.tc,
        df: 0,
    };
    balance(ctx, l2, &pkt)
}

/// Sends the quickly parsed packet `q` of family `family` (see `parse::quick`) if its flow's
/// entry was checked since the agent's last change (`conntrack::current_id`), as `balance`
/// would; `None` leaves the packet to the general way (a flow not in the table, or not
/// checked since).
#[inline(always)]
fn known_flow(
    ctx: &XdpContext,
    l2: &eth::L2,
    q: quick::Quick,
    family: u8,
) -> Option<Result<Outcome, DropReason>> {
    let hdr_len = if family == FAMILY_V4 {
        network_types::ip::Ipv4Hdr::LEN
    } else {
        ipv6::HDR_LEN
    };
    let pkt = Pkt {
        family,
        src: q.src,
        dst: q.dst,
        proto: q.proto,
        l4_off: l2.l3_off + hdr_len,
        tot_len: q.tot_len,
        hdr_len,
        fragment: false,
        bad_v6_fragment: false,
        later_fragment: false,
        frag_id: 0,
        frag_proto: q.proto,
        tos: q.tos,
        df: q.df,
    };
    let now = conntrack::epoch();
    let key = flow_key(&pkt, q.sport, q.dport);
    let id = conntrack::current_id(conntrack::place_of(&key), now)?;
    // What the next-hop cache learnt of a tunnelled backend in this epoch sends the
    // packet without the backend's entry; a backend it has not learnt (or not in this
    // epoch), or one reached otherwise, is read and sent the general way, which teaches
    // the cache.
    if let Some(learnt) = encap::learnt(id, now, family, pkt.tot_len) {
        return Some(send_learnt(ctx, l2, &pkt, id, &learnt));
    }
    let choice = conntrack::current_choice(id, family, now)?;
    Some(send(ctx, l2, &pkt, &choice))
}

/// Whether the fragment `pkt` breaks the fragmentation rules (RFC 791, RFC
/// 8200 4.5): IPv4 reads its header for it here, so that only fragments pay; IPv6 has it
/// from the extension-header walk. Asked in the fragments' own branches of `balance`,
/// once the packet is known to be for a VIP: forwarded, such a fragment would be dropped
/// or trimmed by the backend's reassembly (where an oversized one was once a crash, the
/// "ping of death"). A check shared with the 5-tuple's branch cost new flows ~3 %
/// (`bench --compare`).
#[inline(always)]
fn bad_fragment(ctx: &XdpContext, pkt: &Pkt) -> bool {
    if pkt.family == FAMILY_V4 {
        ipv4::bad_fragment(ctx, pkt.l4_off - pkt.hdr_len, pkt.hdr_len, pkt.tot_len)
    } else {
        pkt.bad_v6_fragment
    }
}

/// The connection-table key of `pkt` with these ports.
#[inline(always)]
fn flow_key(pkt: &Pkt, sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// The key of a packet balanced on its addresses alone (a fragment, an ICMP message): no
/// ports, and for a fragment the protocol every fragment of its datagram names (see
/// `Pkt::frag_proto`), so that all of them hash to one backend.
#[inline(always)]
fn addresses_key(pkt: &Pkt) -> FlowKey {
    let mut key = flow_key(pkt, 0, 0);
    if pkt.fragment {
        key.proto = pkt.frag_proto;
    }
    key
}

/// VIP traffic of either family: classify, check, select, forward.
#[inline(always)]
fn balance(ctx: &XdpContext, l2: &eth::L2, pkt: &Pkt) -> Result<Outcome, DropReason> {
    let icmp = pkt.proto == icmp_proto(pkt.family);
    if icmp && !pkt.fragment {
        return icmp_packet(ctx, l2, pkt);
    }
    // An IPv6 later fragment whose fragment header names destination options or AH
    // carries no word of its upper layer: its first fragment's record decides.
    let upper_unknown = pkt.later_fragment
        && pkt.family == FAMILY_V6
        && (pkt.proto == ipv6::NH_DEST_OPTS || pkt.proto == ipv6::NH_AUTH);
    if !icmp && !upper_unknown && pkt.proto != PROTO_TCP && pkt.proto != PROTO_UDP {
        return Ok(PASS.into());
    }
    // The fragment key lives in per-CPU scratch space, not on the stack (see `Scratch`);
    // the scratch entry is looked up only for fragments.
    let frag_key = || -> Option<&'static FragKey> {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's scratch entry; nothing else holds a reference into it now.
        let k: &mut FragKey = unsafe { &mut (*scratch).frag };
        *k = FragKey {
            src: pkt.src,
            dst: pkt.dst,
            id: pkt.frag_id,
            proto: pkt.frag_proto,
            family: pkt.family,
            _pad: [0; 2],
        };
        Some(k)
    };
    // Read before any VIP lookup: an entry is marked checked in this epoch (see
    // `conntrack::current`), and it must not be an epoch whose maps the lookup missed.
    let now = conntrack::epoch();

    // Every fragment of a datagram must reach one backend: fragments are hashed on
    // (source, destination, protocol) only, and later fragments (no ports) find their
    // service through the first one's record, else the all-ports entry.
    // The 5-tuple's branch finds the flow's place in the connection table (hashed once
    // for lookup and insertion); fragments and ICMP are keyed on addresses and protocol
    // only, and not kept in the table.
    let (vip, syn, place, key) = if icmp {
        // A fragmented ICMP message cannot be answered or matched here; like other
        // fragments it goes, hashed on addresses and protocol, to a backend of the
        // address's marker (its first service), which holds the VIP, reassembles it and
        // answers.
        let Some(marker) = vip_lookup(&pkt.dst, 0, pkt.proto, pkt.family) else {
            return Ok(PASS.into());
        };
        if pkt.fragment && bad_fragment(ctx, pkt) {
            return Err(DropReason::BadFragment);
        }
        (marker, false, None, addresses_key(pkt))
    } else if pkt.later_fragment {
        let Some(by_ref) = frag_key() else {
            return Ok(PASS.into());
        };
        let vip = match unsafe { FRAGS.get(by_ref) } {
            Some(v) => *v,
            None => match vip_lookup(&pkt.dst, 0, pkt.proto, pkt.family) {
                Some(v) => v,
                None if vip_lookup(&pkt.dst, 0, icmp_proto(pkt.family), pkt.family).is_some() => {
                    return Err(DropReason::FragmentUnknown);
                }
                None => return Ok(PASS.into()),
            },
        };
        if bad_fragment(ctx, pkt) {
            return Err(DropReason::BadFragment);
        }
        (vip, false, None, addresses_key(pkt))
    } else if pkt.fragment {
        let Ok(ports) = ptr_at::<[u16; 2]>(ctx, pkt.l4_off) else {
            return not_a_vip_or(pkt, DropReason::Truncated);
        };
        if pkt.l4_off + 4 > l3_end(l2, pkt) {
            return not_a_vip_or(pkt, DropReason::Truncated);
        }
        let dport = unsafe { (*ports)[1] };
        let Some(vip) = vip_lookup(&pkt.dst, dport, pkt.proto, pkt.family) else {
            return Ok(PASS.into());
        };
        if bad_fragment(ctx, pkt) {
            return Err(DropReason::BadFragment);
        }
        (vip, false, None, addresses_key(pkt))
    } else {
        let ports = match l4::parse(ctx, pkt.l4_off, l3_end(l2, pkt), pkt.proto) {
            Ok(p) => p,
            Err(e) => return not_a_vip_or(pkt, e),
        };
        // The key stays a value (no store and reload through memory): LLVM then knows an
        // IPv4 key's zero words and leaves their products out of the hashes.
        let key = flow_key(pkt, ports.sport, ports.dport);
        let place = conntrack::place_of(&key);
        // A flow whose entry was checked since the last change goes on without its VIP lookup
        // (the established path's largest saving); a SYN always chooses afresh below.
        if !ports.syn
            && let Some(choice) = conntrack::current(place, pkt.family, now)
        {
            return send(ctx, l2, pkt, &choice);
        }
        // The lookup reads the index after the epoch (see `now`): had the agent switched
        // halves in between and then advanced the epoch, a lookup in the old half would
        // mark the entry checked in the new epoch.
        let Some(vip) = vip_lookup(&pkt.dst, ports.dport, pkt.proto, pkt.family) else {
            return Ok(PASS.into());
        };
        (vip, ports.syn, place, key)
    };
    // An IPv4 key stays a value; an IPv6 key, whose words would crowd the IPv6 path's
    // stack, is read through this CPU's scratch entry (see `Scratch`).
    let key: &FlowKey = if pkt.family == FAMILY_V4 {
        &key
    } else {
        let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
            return Ok(PASS.into());
        };
        // SAFETY: this CPU's scratch entry; nothing else holds a reference into it now.
        unsafe {
            (*scratch).flow = key;
            &(*scratch).flow
        }
    };
    if pkt.src == pkt.dst {
        return Err(DropReason::SourceIsVip);
    }
    if vip.flags & SERVICE_F_SOURCE_RANGES != 0 && !source_allowed(pkt, vip.service) {
        return Err(DropReason::SourceNotAllowed);
    }
    // Only an admitted first fragment may take a place in the fragment table.
    if pkt.fragment
        && !pkt.later_fragment
        && !icmp
        && let Some(by_ref) = frag_key()
    {
        let _ = FRAGS.insert(by_ref, vip, 0);
    }
    let choice = if pkt.fragment {
        conntrack::from_table(key, &vip, now)
    } else {
        conntrack::select(key, place, &vip, syn, now)
    }
    .ok_or(DropReason::NoBackend)?;
    if pkt.fragment {
        stats::event(lb_common::Event::Fragment);
    }
    send(ctx, l2, pkt, &choice)
}

/// Sends a packet of a flow (or fragment) to the chosen backend, counting it for the
/// backend if it goes (and a new flow for its service); a packet too big for the way
/// there becomes a "too big" outcome.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    l2: &eth::L2,
    pkt: &Pkt,
    choice: &conntrack::Choice,
) -> Result<Outcome, DropReason> {
    if choice.new_flow && !pkt.fragment {
        stats::new_flow(choice.entry.service);
    }
    // Counted before the send, which keeps the id and length out of the send's registers
    // (counting after it cost UDP ~3-6 %, `bench --compare`), and taken back where the
    // packet does not go: one dropped (no route, no neighbour) or answered "too big" is
    // counted by its reason, not as traffic of a backend that may be unreachable.
    stats::backend(choice.id, pkt.tot_len as u64);
    match forward(ctx, l2, pkt, choice) {
        Ok(done) => Ok(done),
        Err(Blocked::Drop(r)) => {
            stats::backend_taken_back(choice.id, pkt.tot_len as u64);
            Err(r)
        }
        // A packet that would not fit once encapsulated: tell the client the size that
        // does, so its next packets fit (TCP lowers its MSS). Sent for IPv4 without DF
        // too, since the balancer cannot fragment; Linux honours it for such traffic.
        Err(Blocked::TooBig(mtu)) => {
            stats::backend_taken_back(choice.id, pkt.tot_len as u64);
            // Never an error about a fragment other than the first (RFC 1122 3.2.2, RFC
            // 4443 2.4): such a packet is dropped unanswered.
            if pkt.later_fragment {
                return Err(DropReason::MtuExceeded);
            }
            let v4 = pkt.family == FAMILY_V4;
            let overhead = if choice.entry.flags & BACKEND_F_L2 != 0 {
                0
            } else if v4 {
                encap::IPIP_OVERHEAD
            } else {
                encap::IP6IP6_OVERHEAD
            };
            let mtu = mtu.saturating_sub(overhead);
            // The program's reply code answers (see `Outcome`); neither family announces
            // less than its minimum MTU.
            Ok(if v4 {
                Outcome::too_big(mtu.max(68), pkt.hdr_len as u8)
            } else {
                Outcome::too_big(mtu.max(1280), 0)
            })
        }
    }
}

/// Sends a known flow's packet to backend `id` as the next-hop cache learnt it
/// (`encap::learnt`), counting it for the backend as `send` does.
#[inline(always)]
fn send_learnt(
    ctx: &XdpContext,
    l2: &eth::L2,
    pkt: &Pkt,
    id: u32,
    learnt: &encap::Learnt,
) -> Result<Outcome, DropReason> {
    stats::backend(id, pkt.tot_len as u64);
    match encap::send_learnt(
        ctx,
        learnt,
        pkt.family,
        l2.l3_off,
        pkt.tot_len,
        (pkt.tos, pkt.df),
    ) {
        Ok(done) => Ok(done.into()),
        Err(r) => {
            stats::backend_taken_back(id, pkt.tot_len as u64);
            Err(r)
        }
    }
}

/// A bad L4 header is ours to drop only when it is addressed to a VIP (the address has
/// its ICMP marker): anything else goes to the stack untouched, as all traffic that is
/// not a VIP's does. Asked only on this error path, so good packets pay no extra lookup
/// (IPv6 TCP and UDP come here without one: see `ipv6_packet`).
#[inline(always)]
fn not_a_vip_or(pkt: &Pkt, reason: DropReason) -> Result<Outcome, DropReason> {
    if vip_lookup(&pkt.dst, 0, icmp_proto(pkt.family), pkt.family).is_none() {
        Ok(PASS.into())
    } else {
        Err(reason)
    }
}

/// Offset where the IP packet ends by its length field (the frame may hold padding after it).
#[inline(always)]
fn l3_end(l2: &eth::L2, pkt: &Pkt) -> usize {
    l2.l3_off + pkt.tot_len as usize
}

/// Whether the packet's source is in the service's source ranges.
#[inline(always)]
fn source_allowed(pkt: &Pkt, service: u32) -> bool {
    let service = service.to_be_bytes();
    if pkt.family == FAMILY_V4 {
        let key = Key::new(
            64,
            SrcRangeV4 {
                service,
                addr: [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]],
            },
        );
        SRC_V4.get(&key).is_some()
    } else {
        let key = Key::new(
            160,
            SrcRangeV6 {
                service,
                addr: pkt.src,
            },
        );
        SRC_V6.get(&key).is_some()
    }
}

/// Sends a packet to the chosen backend: locally, by MAC rewrite (its service's mode,
/// copied into the backend's flags), or in a tunnel (IPIP, IPv6-in-IPv6).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l2: &eth::L2,
    pkt: &Pkt,
    choice: &conntrack::Choice,
) -> Result<Outcome, Blocked> {
    if choice.entry.flags & BACKEND_F_LOCAL != 0 {
        return Ok((xdp_action::XDP_PASS, Action::Local).into());
    }
    let l2_mode = choice.entry.flags & BACKEND_F_L2 != 0;
    let action = if l2_mode { Action::L2 } else { Action::Encap };
    if pkt.family != FAMILY_V4 {
        return Ok((tx6(ctx, l2, pkt, choice, l2_mode)?, action).into());
    }
    let slot = choice.slot();
    // SAFETY: a Backend is 4-aligned and starts with its address bytes (IPv4: the first
    // four), read as one word.
    let baddr = unsafe { *(choice.entry as *const lb_common::Backend as *const u32) }.to_ne_bytes();
    let src = [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]];
    if l2_mode {
        Ok((
            encap::l2_forward(ctx, slot, baddr, src, pkt.tot_len, l2.vlans)?,
            Action::L2,
        )
            .into())
    } else {
        Ok((
            encap::ipip_forward(ctx, slot, baddr, l2.l3_off, pkt.tot_len, (pkt.tos, pkt.df))?,
            Action::Encap,
        )
            .into())
    }
}

/// Transmits the IPv6 packet `pkt` behind link-layer header `link` to the chosen backend
/// (MAC rewrite when `l2`, else IPv6-in-IPv6).
#[inline(always)]
fn tx6(
    ctx: &XdpContext,
    link: &eth::L2,
    pkt: &Pkt,
    choice: &conntrack::Choice,
    l2: bool,
) -> Result<u32, Blocked> {
    let b = choice.entry;
    let slot = choice.slot();
    // SAFETY: a Backend starts with its 16 address bytes; one load per word (the entry
    // is only 4-aligned).
    let addr: encap::Addr6 = unsafe {
        let p = b as *const lb_common::Backend as *const u8;
        [parse::load64(p), parse::load64(p.add(8))]
    };
    if l2 {
        encap::l2_forward_v6(ctx, slot, &addr, &pkt.src, pkt.tot_len, link.vlans)
    } else {
        encap::ip6ip6_forward(ctx, slot, &addr, link.l3_off, pkt.tot_len, pkt.tos)
    }
}

/// Answers the IPv4 packet at `l3_off` (header `hdr_len` bytes) with "fragmentation
/// needed" announcing `mtu`.
#[inline(never)]
fn frag_needed_v4_sub(ctx: XdpContext, l3_off: usize, vlans: usize, hdr_len: u64, mtu: u64) -> u64 {
    let r = icmp::frag_needed_v4(&ctx, l3_off, vlans, hdr_len as usize, mtu as u16);
    pack(r.map(|v| (v, Action::TooBig).into()))
}

/// ICMP to a VIP address: echo is answered; errors about a VIP flow go to its backend.
#[inline(always)]
fn icmp_packet(ctx: &XdpContext, l2: &eth::L2, pkt: &Pkt) -> Result<Outcome, DropReason> {
    // The agent marks every VIP address with an ICMP entry; anything else is not ours.
    if vip_lookup(&pkt.dst, 0, pkt.proto, pkt.family).is_none() {
        return Ok(PASS.into());
    }
    let hdr: *const [u8; 2] = ptr_at(ctx, pkt.l4_off)?;
    // Every ICMP message starts with 8 header bytes (type, code, checksum, 4 more).
    let end = l3_end(l2, pkt);
    if pkt.l4_off + 8 > end {
        return Err(DropReason::Truncated);
    }
    // Echo would be answered to, and errors forwarded for, the VIP itself: a reflection.
    if pkt.src == pkt.dst {
        return Err(DropReason::SourceIsVip);
    }
    let kind = unsafe { (*hdr)[0] };
    let v4 = pkt.family == FAMILY_V4;
    let key = if v4 {
        if kind == icmp::ECHO_REQUEST {
            return Ok((
                icmp::echo_reply_v4(ctx, l2.l3_off, pkt.l4_off)?,
                Action::EchoReply,
            )
                .into());
        }
        if kind != icmp::DEST_UNREACH {
            return Ok(PASS.into());
        }
        icmp::quoted_flow_v4(
            ctx,
            pkt.l4_off,
            end,
            [pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]],
        )?
    } else {
        if kind == icmp::ECHO_REQUEST_V6 {
            return Ok((
                icmp::echo_reply_v6(ctx, l2.l3_off, pkt.l4_off)?,
                Action::EchoReply,
            )
                .into());
        }
        if kind != icmp::DEST_UNREACH_V6 && kind != icmp::PACKET_TOO_BIG_V6 {
            return Ok(PASS.into());
        }
        icmp::quoted_flow_v6(ctx, pkt.l4_off, end, &pkt.dst)?
    };
    let vip =
        vip_lookup(&pkt.dst, key.dport, key.proto, pkt.family).ok_or(DropReason::IcmpUnmatched)?;
    let choice = conntrack::owner(&key, &vip).ok_or(DropReason::NoBackend)?;
    match forward(ctx, l2, pkt, &choice) {
        Ok(done) => {
            stats::backend(choice.id, pkt.tot_len as u64);
            Ok(done)
        }
        Err(Blocked::Drop(r)) => Err(r),
        Err(Blocked::TooBig(_)) => Err(DropReason::MtuExceeded),
    }
}

/// The benchmark's floor: the least an XDP forwarder does — swap the MAC addresses and
/// send the frame back out. Only `cargo xtask bench` loads it.
#[aya_ebpf::macros::xdp]
pub fn l3lb_floor(ctx: XdpContext) -> u32 {
    match ptr_at::<network_types::eth::EthHdr>(&ctx, 0) {
        Ok(eth) => {
            let e = unsafe { &mut *eth };
            core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
            xdp_action::XDP_TX
        }
        Err(_) => xdp_action::XDP_DROP,
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
