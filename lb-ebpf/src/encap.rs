//! Leaving the balancer: next hop from the FIB, IPIP encapsulation, MAC rewrite, and the
//! backend role's decapsulation.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Action, BACKEND_F_L2, BACKEND_F_LOCAL, Backend, DropReason, FAMILY_V4, PROTO_IPIP,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{csum, parse::ptr_at};

/// Source address of outer IPv4 headers, its four bytes in memory order; set by the agent
/// at load time.
#[unsafe(no_mangle)]
static ENCAP_SRC_V4: u32 = 0;

/// `ENCAP_SRC_V4`'s four bytes in memory order, read as one word.
#[inline(always)]
fn encap_src_v4() -> [u8; 4] {
    unsafe { core::ptr::read_volatile(&ENCAP_SRC_V4) }.to_ne_bytes()
}

/// Source address of outer IPv6 headers; set by the agent at load time (16 bytes, held
/// as two 64-bit words so the header is built from word loads).
#[unsafe(no_mangle)]
static ENCAP_SRC_V6: Addr6 = [0; 2];

/// `ENCAP_SRC_V6`, read once per packet and handed to whoever needs it.
#[inline(always)]
fn encap_src_v6() -> Addr6 {
    unsafe { core::ptr::read_volatile(&ENCAP_SRC_V6) }
}

/// An IPv6 address as two 64-bit words in memory order (network byte order kept): two
/// loads and stores each, where bytes would take sixteen.
pub type Addr6 = [u64; 2];

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a frame goes next: MAC addresses, egress interface and VLAN tag.
pub struct NextHop {
    /// Destination then source MAC, as the Ethernet header's first six 16-bit words.
    macs: [u16; 6],
    ifindex: u32,
    /// The 802.1Q tag the frame carries on `ifindex` (`VlanDev::tag`: TPID, TCI), when the
    /// route leaves by a VLAN device on it; TPID 0: untagged.
    vlan: [u16; 2],
}

/// Where a frame goes next, as a `NextHop` or a next-hop cache entry holds it: sending
/// from the entry itself spares the known-flow path a copy of it on the stack, which the
/// verifier bounds at 512 bytes for the program and the subprogram it calls together.
pub trait Hop {
    /// Destination then source MAC, as the Ethernet header's first six 16-bit words.
    fn macs(&self) -> [u16; 6];
    /// Egress interface.
    fn ifindex(&self) -> u32;
    /// The VLAN tag frames carry on the egress interface (TPID 0: untagged).
    fn vlan(&self) -> [u16; 2];
    /// Whether frames to this hop carry a VLAN tag.
    #[inline(always)]
    fn tagged(&self) -> bool {
        self.vlan()[0] != 0
    }
}

/// `Hop` for a struct with the three fields `macs`, `ifindex` and `vlan`.
macro_rules! hop_by_fields {
    ($t:ty) => {
        impl Hop for $t {
            #[inline(always)]
            fn macs(&self) -> [u16; 6] {
                self.macs
            }
            #[inline(always)]
            fn ifindex(&self) -> u32 {
                self.ifindex
            }
            #[inline(always)]
            fn vlan(&self) -> [u16; 2] {
                self.vlan
            }
        }
    };
}

hop_by_fields!(NextHop);
hop_by_fields!(crate::maps::CachedHop);

/// What the next-hop cache keeps of a backend's entry beside its address: its family and
/// how its packets leave (`BACKEND_F_*`).
#[derive(Clone, Copy)]
pub struct BackendKind {
    family: u8,
    flags: u8,
}

impl BackendKind {
    /// The kind of backend entry `b`.
    #[inline(always)]
    pub fn of(b: &Backend) -> Self {
        BackendKind {
            family: b.family,
            flags: b.flags,
        }
    }
}

/// The next-hop cache entry a packet is sent by: its backend's id and kind, and the epoch
/// the packet read (`Choice::epoch`).
#[derive(Clone, Copy)]
pub struct Slot {
    /// Backend id, the entry's index.
    pub id: u32,
    /// The packet's epoch.
    pub epoch: u32,
    /// What the entry learns of the backend.
    pub kind: BackendKind,
}

/// A MAC address in a struct that places it 2-aligned, as three 16-bit words.
///
/// # Safety
/// `m` must be 2-aligned.
#[inline(always)]
unsafe fn mac_words(m: &[u8; 6]) -> [u16; 3] {
    unsafe { *(m as *const [u8; 6] as *const [u16; 3]) }
}

/// Writes the frame's destination and source MAC addresses: six 16-bit stores instead of
/// twelve byte stores (frames start 2-aligned, see `parse::load16`).
#[inline(always)]
fn write_macs(ctx: &XdpContext, hop: &NextHop) -> Result<(), DropReason> {
    let eth: *mut [u16; 6] = ptr_at(ctx, 0)?;
    unsafe { *eth = hop.macs };
    Ok(())
}

/// Why a packet cannot be sent on: a drop reason, or "too big" with the route's MTU.
pub enum Blocked {
    /// Drop with this reason.
    Drop(DropReason),
    /// The packet exceeds the egress MTU (the value carried).
    TooBig(u16),
}

impl From<DropReason> for Blocked {
    fn from(r: DropReason) -> Self {
        Blocked::Drop(r)
    }
}

/// Asks the kernel's FIB for the next hop described by `p`.
#[inline(always)]
fn fib(ctx: &XdpContext, p: &mut FibParams) -> Result<NextHop, Blocked> {
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // XDP cannot transmit on a VLAN device: the frame leaves by its parent,
            // tagged as the device would tag it. A program on the VLAN device itself
            // (generic mode) sends back out of it, as it would any ingress device.
            let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
            // SAFETY: a value of a map of this program's, copied out at once.
            let (ifindex, vlan) = match unsafe { crate::maps::VLANS.get(p.ifindex) } {
                Some(v) if p.ifindex != ingress => (v.parent, v.tag),
                _ => (p.ifindex, [0, 0]),
            };
            // A redirect to a device without XDP transmit fails after this program has
            // returned, where nothing counts it; the agent lists such devices.
            if ifindex != ingress
                && let Some(n) = crate::maps::NO_XMIT.get_ptr_mut(ifindex)
            {
                // SAFETY: a value of a map of this program's. CPUs bumping it at once
                // may lose counts: it only tells the agent which device to name.
                unsafe { *n = (*n).wrapping_add(1) };
                return Err(Blocked::Drop(DropReason::EgressNoXdp));
            }
            // SAFETY: the kernel's struct places both MACs 2-aligned (offsets 52 and 58
            // of a 4-aligned struct).
            let (d, s) = unsafe { (mac_words(&p.dmac), mac_words(&p.smac)) };
            Ok(NextHop {
                macs: [d[0], d[1], d[2], s[0], s[1], s[2]],
                ifindex,
                vlan,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Blocked::Drop(DropReason::NoNeighbour)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Err(Blocked::TooBig(unsafe { p.__bindgen_anon_1.mtu_result }))
        }
        _ => Err(Blocked::Drop(DropReason::NoRoute)),
    }
}

/// Looks up the next hop toward `dst` for a packet of `tot_len` bytes (L3).
///
/// The kernel checks the route's MTU against `tot_len`, so an encapsulated packet that
/// would not fit is caught here.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    src: [u8; 4],
    dst: [u8; 4],
    tot_len: u16,
) -> Result<NextHop, Blocked> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    fib(ctx, &mut p)
}

/// Looks up the next hop toward IPv6 `dst` for a packet of `tot_len` bytes (L3).
#[inline(always)]
pub fn next_hop_v6(
    ctx: &XdpContext,
    src: &Addr6,
    dst: &Addr6,
    tot_len: u16,
) -> Result<NextHop, Blocked> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: [u64; 2] and [u32; 4] have the same size and every bit pattern is valid.
    let words = |a: &Addr6| -> [u32; 4] { unsafe { core::mem::transmute(*a) } };
    p.__bindgen_anon_3.ipv6_src = words(src);
    p.__bindgen_anon_4.ipv6_dst = words(dst);
    fib(ctx, &mut p)
}

/// Rewrites the Ethernet addresses (and the VLAN tag, see `readdress`) of a frame with
/// `vlans` tags toward an IPv6 backend (`l2`).
#[inline(always)]
pub fn l2_forward_v6(
    ctx: &XdpContext,
    slot: Slot,
    backend: &Addr6,
    src: &[u8; 16],
    tot_len: u16,
    vlans: usize,
) -> Result<u32, Blocked> {
    let hop = cached_hop(slot, *backend, tot_len, || {
        // SAFETY: [u8; 16] and [u64; 2] have the same size and every bit pattern is valid.
        let src: Addr6 = unsafe { core::mem::transmute(*src) };
        next_hop_v6(ctx, &src, backend, tot_len)
    })?;
    Ok(readdress(ctx, &hop, vlans)?)
}

/// Bytes IPv6-in-IPv6 encapsulation adds (the outer IPv6 header).
pub const IP6IP6_OVERHEAD: u16 = 40;

/// Encapsulates the IPv6 packet at `l3_off` (of `tot_len` bytes, traffic class `tc`, as
/// parsed) in an outer IPv6 header toward `backend` (next header 41).
#[inline(always)]
pub fn ip6ip6_forward(
    ctx: &XdpContext,
    slot: Slot,
    backend: &Addr6,
    l3_off: usize,
    tot_len: u16,
    tc: u8,
) -> Result<u32, Blocked> {
    let src = encap_src_v6();
    let outer_len = tot_len
        .checked_add(IP6IP6_OVERHEAD)
        .ok_or(Blocked::TooBig(0))?;
    let hop = cached_hop(slot, *backend, outer_len, || {
        next_hop_v6(ctx, &src, backend, outer_len)
    })?;
    Ok(encap_v6(ctx, &hop, &src, backend, l3_off, tot_len, tc)?)
}

/// Puts an outer IPv6 header from `src` toward `backend` (next hop `hop`) in front of the
/// IPv6 packet at `l3_off` (`tot_len` bytes, traffic class `tc`) and sends the frame.
#[inline(always)]
fn encap_v6(
    ctx: &XdpContext,
    hop: &impl Hop,
    src: &Addr6,
    backend: &Addr6,
    l3_off: usize,
    tot_len: u16,
    tc: u8,
) -> Result<u32, DropReason> {
    let tagged = hop.tagged();
    let l2_len = if tagged { EthHdr::LEN + 4 } else { EthHdr::LEN };
    let delta = (l2_len + 40) as i32 - l3_off as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // Version and traffic class (carried over), a zero flow label, payload length, next
    // header and hop limit: the header's first eight bytes as one word in memory order.
    let first = u16::from_ne_bytes([0x60 | (tc >> 4), tc << 4]) as u64
        | (tot_len.to_be() as u64) << 32
        | (u16::from_ne_bytes([lb_common::PROTO_IPV6, 64]) as u64) << 48;
    let m = hop.macs();
    let o = if tagged {
        let v = hop.vlan();
        // Ethernet, tag and outer header, checked at once.
        let head: *mut [u16; 29] = ptr_at(ctx, 0)?;
        unsafe {
            *(head as *mut [u16; 6]) = m;
            *((head as *mut u16).add(6) as *mut [u16; 3]) =
                [v[0], v[1], crate::parse::eth::ETH_P_IPV6];
            (head as *mut u8).add(EthHdr::LEN + 4)
        }
    } else {
        // Ethernet and outer header, checked at once.
        let head: *mut [u16; 27] = ptr_at(ctx, 0)?;
        unsafe {
            *(head as *mut [u16; 6]) = m;
            *(head as *mut u16).add(6) = crate::parse::eth::ETH_P_IPV6;
            (head as *mut u8).add(EthHdr::LEN)
        }
    };
    // SAFETY: the 40 bytes after `o` were checked with the link-layer header; the outer
    // header stored in 64-bit words (2-aligned after the 14- or 18-byte link-layer
    // header, see `parse::store64`), not byte by byte.
    unsafe {
        crate::parse::store64(o, first);
        crate::parse::store64(o.add(8), src[0]);
        crate::parse::store64(o.add(16), src[1]);
        crate::parse::store64(o.add(24), backend[0]);
        crate::parse::store64(o.add(32), backend[1]);
    }
    Ok(transmit(ctx, hop))
}

/// Strips an outer IPv6 header (next header 41, no extension headers) at `l3_off`,
/// keeping the link-layer header in front of the inner IPv6 packet.
#[inline(always)]
pub fn decap_v6(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
    outer_tot_len: u16,
) -> Result<(), DropReason> {
    let saved = SavedL2::save(ctx, vlans)?;

    let inner: *const [u8; 40] =
        ptr_at(ctx, l3_off + 40).map_err(|_| DropReason::DecapMalformed)?;
    // SAFETY: the inner header was checked against the frame above.
    let (v, plen) = unsafe {
        (
            (*inner)[0],
            u16::from_be(crate::parse::load16((inner as *const u8).add(4))),
        )
    };
    if v >> 4 != 6 || plen as usize + 80 != outer_tot_len as usize {
        return Err(DropReason::DecapMalformed);
    }
    saved.move_to(ctx, 40)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, 40) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    Ok(())
}

/// A frame's link-layer header (Ethernet and up to two VLAN tags), kept across a resize
/// of the frame's head.
///
/// Held and copied as 16-bit words (frames start 2-aligned, see `parse::load16`): byte
/// copies cost a load and a store per byte.
pub struct SavedL2 {
    /// Destination MAC, source MAC, EtherType.
    eth: [u16; 7],
    tags: [u16; 4],
    vlans: usize,
}

impl SavedL2 {
    /// Copies the link-layer header of a frame with `vlans` tags.
    #[inline(always)]
    pub fn save(ctx: &XdpContext, vlans: usize) -> Result<Self, DropReason> {
        let eth: *const [u16; 7] = ptr_at(ctx, 0)?;
        let tags = if vlans > 0 {
            let t: *const [u16; 4] = ptr_at(ctx, EthHdr::LEN)?;
            unsafe { *t }
        } else {
            [0; 4]
        };
        Ok(Self {
            eth: unsafe { *eth },
            tags,
            vlans,
        })
    }

    /// Writes the header back at the start of the frame; `reply` swaps the MACs so the
    /// frame returns to its sender.
    #[inline(always)]
    pub fn restore(&self, ctx: &XdpContext, reply: bool) -> Result<(), DropReason> {
        self.write_at(ctx, 0, reply)
    }

    /// Writes the header `off` bytes into the frame, where the frame will start once its
    /// head has moved by `off`: then nothing is kept across that helper call nor checked
    /// after it. The header was read whole in `save`, so the copy may overlap it.
    #[inline(always)]
    pub fn move_to(&self, ctx: &XdpContext, off: usize) -> Result<(), DropReason> {
        self.write_at(ctx, off, false)
    }

    #[inline(always)]
    fn write_at(&self, ctx: &XdpContext, off: usize, reply: bool) -> Result<(), DropReason> {
        let eth: *mut [u16; 7] = ptr_at(ctx, off)?;
        let e = self.eth;
        unsafe {
            *eth = if reply {
                [e[3], e[4], e[5], e[0], e[1], e[2], e[6]]
            } else {
                e
            };
        }
        let t = self.tags;
        if self.vlans >= 1 {
            let p: *mut [u16; 2] = ptr_at(ctx, off + EthHdr::LEN)?;
            unsafe { *p = [t[0], t[1]] };
        }
        if self.vlans >= 2 {
            let p: *mut [u16; 2] = ptr_at(ctx, off + EthHdr::LEN + 4)?;
            unsafe { *p = [t[2], t[3]] };
        }
        Ok(())
    }
}

/// Packets one learnt next hop may serve before the FIB is asked again, so a cache that
/// the agent stopped refreshing (its epoch no longer advancing) still follows changes.
const NEXTHOP_MAX_USES: u32 = 1 << 16;

/// The next hop toward the backend of `slot` (address `addr`) for a packet of `len` bytes:
/// from the per-CPU cache while its epoch is the packet's and the packet is known to fit,
/// else from `lookup` (the FIB), remembered with the backend's kind. The agent advances
/// the epoch every half second, so route and neighbour changes reach established flows
/// within that time — without a clock read per packet.
#[inline(always)]
fn cached_hop(
    slot: Slot,
    addr: [u64; 2],
    len: u16,
    lookup: impl FnOnce() -> Result<NextHop, Blocked>,
) -> Result<NextHop, Blocked> {
    let entry = crate::maps::NEXTHOPS.get_ptr_mut(slot.id);
    if let Some(e) = entry {
        let e = unsafe { &mut *e };
        if e.epoch == slot.epoch && e.uses < NEXTHOP_MAX_USES && len <= e.max_len && e.addr == addr
        {
            e.uses += 1;
            return Ok(NextHop {
                macs: e.macs,
                ifindex: e.ifindex,
                vlan: e.vlan,
            });
        }
    }
    let hop = lookup()?;
    if let Some(e) = entry {
        let e = unsafe { &mut *e };
        // The largest length seen holds for one route and one way of leaving (an
        // encapsulated length is the outer packet's).
        let same = e.epoch == slot.epoch
            && e.flags == slot.kind.flags
            && e.addr == addr
            && e.macs[..3] == hop.macs[..3]
            && e.ifindex == hop.ifindex
            && e.vlan == hop.vlan;
        e.max_len = if same && e.max_len > len {
            e.max_len
        } else {
            len
        };
        e.addr = addr;
        e.macs = hop.macs;
        e.ifindex = hop.ifindex;
        e.vlan = hop.vlan;
        e.family = slot.kind.family;
        e.flags = slot.kind.flags;
        e.epoch = slot.epoch;
        e.uses = 0;
    }
    Ok(hop)
}

/// What the next-hop cache learnt of a tunnelled backend, enough to send a packet to it
/// without reading its `BACKENDS` entry (see `learnt`): this CPU's entry itself, which
/// nothing else writes while this program runs on it.
pub struct Learnt {
    entry: &'static crate::maps::CachedHop,
}

/// The next hop and backend that this CPU's cache learnt for backend `id` in `epoch`, the
/// epoch a known flow's packet read, if they can send that packet (family `family`, L3
/// length `tot_len`) as `forward` would: a tunnelled backend of that family, a packet
/// whose encapsulation is no longer than the route was seen to take. Counts the use.
///
/// An entry learnt in the packet's epoch read the backend's entry in that epoch, and the
/// agent advances the epoch after every change it writes: within it the cache says what
/// `BACKENDS` says (a packet that read the epoch before a change is sent as one that read
/// the entry just before it). One lookup, where the entry and the cache were two on the
/// established path's chain of dependent loads (`bench --compare`, twelve load pairs:
/// established TCP 0.938, UDP 0.955, IPv6 0.946). Backends reached by MAC rewrite (and
/// local ones, which the cache never learns) are left to the general way: sending them
/// from here as well cost the tunnelled ones most of that gain.
#[inline(always)]
pub fn learnt(id: u32, epoch: u32, family: u8, tot_len: u16) -> Option<Learnt> {
    let e = crate::maps::NEXTHOPS.get_ptr_mut(id)?;
    // SAFETY: this CPU's entry of a map of this program's, which outlives the program's
    // run.
    let e: &'static mut crate::maps::CachedHop = unsafe { &mut *e };
    let overhead = if family == FAMILY_V4 {
        IPIP_OVERHEAD
    } else {
        IP6IP6_OVERHEAD
    };
    // Compared wide: a frame in generic mode may carry nearly 64 KiB, and a length that
    // wrapped past it would pass (the general way answers such a packet "too big").
    if e.epoch != epoch
        || e.uses >= NEXTHOP_MAX_USES
        || e.family != family
        || e.flags & (BACKEND_F_L2 | BACKEND_F_LOCAL) != 0
        || tot_len as u32 + overhead as u32 > e.max_len as u32
    {
        return None;
    }
    e.uses += 1;
    Some(Learnt { entry: e })
}

/// Sends the packet at `l3_off` (family `family`, L3 length `tot_len`, TOS or traffic
/// class `tos`, IPv4 DF bit `df`) in a tunnel as `learnt` says.
#[inline(always)]
pub fn send_learnt(
    ctx: &XdpContext,
    l: &Learnt,
    family: u8,
    l3_off: usize,
    tot_len: u16,
    (tos, df): (u8, u8),
) -> Result<(u32, Action), DropReason> {
    let e = l.entry;
    let verdict = if family == FAMILY_V4 {
        let dst = (e.addr[0] as u32).to_ne_bytes();
        encap_v4(
            ctx,
            e,
            encap_src_v4(),
            dst,
            l3_off,
            // Does not wrap: `learnt` found it within the route's largest length.
            tot_len.wrapping_add(IPIP_OVERHEAD),
            (tos, df),
        )?
    } else {
        encap_v6(ctx, e, &encap_src_v6(), &e.addr, l3_off, tot_len, tos)?
    };
    Ok((verdict, Action::Encap))
}

/// An IPv4 address as the two words the cache keys on (the 16-byte form, first four
/// bytes the address).
#[inline(always)]
fn v4_key(addr: [u8; 4]) -> [u64; 2] {
    [u32::from_ne_bytes(addr) as u64, 0]
}

/// Points the frame's Ethernet addresses at `hop` and sends it out: the whole of `l2`
/// forwarding. The frame arrived with `vlans` VLAN tags: toward a VLAN device (`hop`
/// tagged) it leaves with that device's tag alone (pushed onto an untagged frame, in
/// place of one tag, in place of two); otherwise the tags stay as they came.
#[inline(always)]
fn readdress(ctx: &XdpContext, hop: &NextHop, vlans: usize) -> Result<u32, DropReason> {
    if hop.tagged() {
        let tag = hop.vlan[0] as u32 | (hop.vlan[1] as u32) << 16;
        if set_tag(XdpContext { ctx: ctx.ctx }, tag, vlans as u32) != 0 {
            return Err(DropReason::AdjustFailed);
        }
    }
    write_macs(ctx, hop)?;
    Ok(transmit(ctx, hop))
}

/// Leaves a frame that came with `vlans` tags (0 to 2) with the one VLAN tag `tag`
/// (TPID and TCI as they lie in the frame, packed in memory order) behind its MAC
/// addresses, which the caller writes next: four bytes more in front for an untagged
/// frame, four fewer for a doubly tagged one, so that the EtherType ends right behind
/// the tag. 0 when done.
///
/// A subprogram with a frame of its own: the helper call, inlined into the program's
/// body, pushed that body's stack past what the verifier allows the program and a
/// subprogram it calls together (512 bytes).
#[inline(never)]
fn set_tag(ctx: XdpContext, tag: u32, vlans: u32) -> u32 {
    let delta = match vlans {
        0 => -4,
        1 => 0,
        _ => 4,
    };
    if delta != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return 1;
    }
    match ptr_at::<[u16; 2]>(&ctx, 12) {
        Ok(p) => {
            unsafe { *p = [tag as u16, (tag >> 16) as u16] };
            0
        }
        Err(_) => 1,
    }
}

/// Sends the frame out: `XDP_TX` back through the ingress interface, else a redirect.
#[inline(always)]
fn transmit(ctx: &XdpContext, hop: &impl Hop) -> u32 {
    let ifindex = hop.ifindex();
    if ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Rewrites the Ethernet addresses (and the VLAN tag, see `readdress`) of a frame with
/// `vlans` tags for `l2` forwarding.
#[inline(always)]
pub fn l2_forward(
    ctx: &XdpContext,
    slot: Slot,
    backend: [u8; 4],
    ip_src: [u8; 4],
    tot_len: u16,
    vlans: usize,
) -> Result<u32, Blocked> {
    let hop = cached_hop(slot, v4_key(backend), tot_len, || {
        next_hop(ctx, ip_src, backend, tot_len)
    })?;
    Ok(readdress(ctx, &hop, vlans)?)
}

/// The next IPv4 identification for an outer header without DF: a per-CPU counter with
/// the CPU number mixed into the high bits, so CPUs do not hand out the same sequence.
#[inline(always)]
fn next_ip_id() -> u16 {
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() } as u16;
    match crate::maps::ENCAP_ID.get_ptr_mut(0) {
        Some(p) => unsafe {
            *p = (*p).wrapping_add(1);
            (*p as u16) ^ (cpu << 10)
        },
        None => 0,
    }
}

/// Bytes IPIP encapsulation adds (the outer IPv4 header).
pub const IPIP_OVERHEAD: u16 = Ipv4Hdr::LEN as u16;

/// Encapsulates the IPv4 packet at `l3_off` in an outer IPv4 header toward `backend`;
/// `(tos, df)` are the inner header's TOS and DF bit as parsed (see `ipv4::Ipv4`), which
/// the outer header copies.
///
/// The frame becomes Ethernet + outer IPv4 + the original packet; VLAN tags of the
/// ingress frame are not carried over (the egress is chosen by the FIB).
#[inline(always)]
pub fn ipip_forward(
    ctx: &XdpContext,
    slot: Slot,
    backend: [u8; 4],
    l3_off: usize,
    tot_len: u16,
    (tos, df): (u8, u8),
) -> Result<u32, Blocked> {
    let src = encap_src_v4();
    let outer_len = tot_len
        .checked_add(Ipv4Hdr::LEN as u16)
        .ok_or(Blocked::TooBig(0))?;
    let hop = cached_hop(slot, v4_key(backend), outer_len, || {
        next_hop(ctx, src, backend, outer_len)
    })?;
    Ok(encap_v4(
        ctx,
        &hop,
        src,
        backend,
        l3_off,
        outer_len,
        (tos, df),
    )?)
}

/// Puts an outer IPv4 header from `src` toward `backend` (next hop `hop`; the outer packet
/// `outer_len` bytes) in front of the IPv4 packet at `l3_off`, copying the inner header's
/// `(tos, df)`, and sends the frame.
#[inline(always)]
fn encap_v4(
    ctx: &XdpContext,
    hop: &impl Hop,
    src: [u8; 4],
    backend: [u8; 4],
    l3_off: usize,
    outer_len: u16,
    (tos, df): (u8, u8),
) -> Result<u32, DropReason> {
    // Grow the head so that exactly Ethernet (with the hop's tag) + outer IPv4 precede
    // the inner header.
    let tagged = hop.tagged();
    let l2_len = if tagged { EthHdr::LEN + 4 } else { EthHdr::LEN };
    let delta = (l2_len + Ipv4Hdr::LEN) as i32 - l3_off as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // Without DF the outer packet may be fragmented further on, and then its
    // identification must tell datagrams apart (RFC 6864).
    let id = if df == 0 { next_ip_id().to_be() } else { 0 };
    // The header as ten 16-bit words in memory order, summed and stored as such (the
    // Internet checksum does not depend on byte order): whole-word stores and adds instead
    // of building and summing it byte by byte. The frame's link-layer header is 14 bytes,
    // so the words are 2-aligned.
    let src = u32::from_ne_bytes(src);
    let dst = u32::from_ne_bytes(backend);
    let mut h = [
        u16::from_ne_bytes([0x45, tos]),
        outer_len.to_be(),
        id,
        u16::from_ne_bytes([df, 0]),
        u16::from_ne_bytes([64, PROTO_IPIP]),
        0,
        src as u16,
        (src >> 16) as u16,
        dst as u16,
        (dst >> 16) as u16,
    ];
    let sum = h.iter().fold(0u32, |a, w| a + *w as u32);
    h[5] = csum::fold_ne(sum);
    let m = hop.macs();
    // The EtherType and outer header, stored behind the addresses (and tag) in each
    // shape: one array, so the program's stack holds it once.
    let tail = [
        crate::parse::eth::ETH_P_IP,
        h[0],
        h[1],
        h[2],
        h[3],
        h[4],
        h[5],
        h[6],
        h[7],
        h[8],
        h[9],
    ];
    if tagged {
        let v = hop.vlan();
        // Ethernet, tag and outer header as 19 16-bit words, checked at once.
        let head: *mut [u16; 19] = ptr_at(ctx, 0)?;
        unsafe {
            *(head as *mut [u16; 8]) = [m[0], m[1], m[2], m[3], m[4], m[5], v[0], v[1]];
            *((head as *mut u16).add(8) as *mut [u16; 11]) = tail;
        }
    } else {
        // Ethernet and outer header as 17 16-bit words, checked at once.
        let head: *mut [u16; 17] = ptr_at(ctx, 0)?;
        unsafe {
            *(head as *mut [u16; 6]) = m;
            *((head as *mut u16).add(6) as *mut [u16; 11]) = tail;
        }
    }
    Ok(transmit(ctx, hop))
}

/// Strips the outer IPv4 header at `l3_off` (of `outer_hdr_len` bytes) and keeps the
/// link-layer header, VLAN tags included, in front of the inner packet.
#[inline(always)]
pub fn decap(
    ctx: &XdpContext,
    l3_off: usize,
    vlans: usize,
    outer_hdr_len: usize,
    outer_tot_len: u16,
) -> Result<(), DropReason> {
    // Save the link-layer header first: reading it after the larger inner-header check
    // lets LLVM drop its own bounds check, which the verifier then rejects.
    let saved = SavedL2::save(ctx, vlans)?;

    // The inner header must be a whole IPv4 header that fills the outer payload.
    let inner_off = l3_off + outer_hdr_len;
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off).map_err(|_| DropReason::DecapMalformed)?;
    let vihl = unsafe { (*inner).vihl };
    // SAFETY: the inner header was checked against the frame above.
    let inner_tot =
        u16::from_be(unsafe { crate::parse::load16((inner as *const u8).add(2)) }) as usize;
    let inner_hdr_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4
        || inner_hdr_len < Ipv4Hdr::LEN
        || inner_hdr_len > inner_tot
        || inner_tot + outer_hdr_len != outer_tot_len as usize
    {
        return Err(DropReason::DecapMalformed);
    }

    saved.move_to(ctx, outer_hdr_len)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_hdr_len as i32) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    Ok(())
}
