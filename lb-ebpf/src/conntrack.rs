//! Backend selection: the connection table first, Maglev on a miss.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, FLOW_F_CONFIRMED, FLOW_WAYS, FlowBucket, FlowKey, FlowRecord, FlowState, FlowWay,
    SERVICE_F_AFFINITY_CLIENT_IP, SETTINGS_CHANGED_EPOCH, VipInfo, flow_hash, flow_home, flow_mix,
    flow_overflow, flow_place, flow_record_index, flow_still_checked, flow_tag, maglev_slot,
};

use crate::{
    logs,
    maps::{BACKENDS, FLOWS, RINGS, SCRATCH, SETTINGS},
};

/// Entries per Maglev table; set by the agent at load time.
#[unsafe(no_mangle)]
static RING_SIZE: u32 = 0;

/// The chosen backend and whether the choice was fresh (not from the connection table).
pub struct Choice {
    /// Backend id.
    pub id: u32,
    /// The backend's entry: its address, `BACKEND_F_*` flags and service are read from
    /// it where the packet is counted and sent.
    pub entry: &'static Backend,
    /// True when Maglev chose (a new flow, or one the table had lost).
    pub new_flow: bool,
    /// The epoch read for this packet (see `epoch`), handed on to the next-hop cache so
    /// one packet reads it once.
    pub epoch: u32,
}

impl Choice {
    /// The next-hop cache entry this choice's packet is sent by.
    #[inline(always)]
    pub fn slot(&self) -> crate::encap::Slot {
        crate::encap::Slot {
            id: self.id,
            epoch: self.epoch,
            kind: crate::encap::BackendKind::of(self.entry),
        }
    }

    /// The choice of backend `id` with entry `b`.
    ///
    /// The entry is kept by reference (copying it made LLVM load and spill it byte by
    /// byte), so sending reads its address without a second lookup.
    #[inline(always)]
    fn of(id: u32, b: &'static Backend, new_flow: bool, epoch: u32) -> Self {
        Choice {
            id,
            entry: b,
            new_flow,
            epoch,
        }
    }
}

/// Buckets of the connection table; set by the agent at load time (a power of two).
#[unsafe(no_mangle)]
static FLOW_BUCKETS: u32 = 0;

/// The connection table's hash seed; set by the agent at load time (random per table).
#[unsafe(no_mangle)]
static FLOW_SEED: u64 = 0;

/// The agent's epoch (advanced every half second and after every change it writes):
/// entries' age for eviction, the next-hop cache's freshness, and, with the epoch of the
/// last change, whether a checked entry decides alone (see `current_id`).
#[inline(always)]
pub fn epoch() -> u32 {
    // SAFETY: a plain aligned read of a global the agent writes whole (see `EPOCH`).
    unsafe { core::ptr::read_volatile(&raw const EPOCH) }
}

/// The epoch as the agent last wrote it (it keeps a copy in `SETTINGS` for the next
/// agent). A global, not a settings entry: every packet of a known flow reads it, and a
/// global is one load where an array entry is a lookup (`bench --compare`, twelve load
/// pairs: established 0.959, UDP 0.954). Written by the agent only, through the object's
/// `.bss` map.
#[unsafe(no_mangle)]
static mut EPOCH: u32 = 0;

/// Where a key's entry may be: its home bucket, what names its overflow bucket, and the
/// tag that identifies it within them.
#[derive(Clone, Copy)]
pub struct Place {
    home: *mut FlowBucket,
    home_index: u32,
    h: u64,
    buckets: u32,
    tag: u64,
}

/// The place of `key`, if the table exists.
#[inline(always)]
pub fn place_of(key: &FlowKey) -> Option<Place> {
    let buckets = unsafe { core::ptr::read_volatile(&FLOW_BUCKETS) };
    if buckets == 0 {
        return None;
    }
    let seed = unsafe { core::ptr::read_volatile(&FLOW_SEED) };
    let w = key.words64();
    let h = flow_mix(&w, seed);
    let home_index = flow_home(h, buckets);
    Some(Place {
        home: FLOWS.get_ptr_mut(home_index)?,
        home_index,
        h,
        buckets,
        tag: flow_tag(&w, seed),
    })
}

impl Place {
    /// The overflow bucket and its index, computed only when a miss in a full home
    /// bucket needs it (most lookups never do).
    #[inline(always)]
    fn overflow(self) -> Option<(*mut FlowBucket, u32)> {
        let i = flow_overflow(self.h, self.buckets);
        Some((FLOWS.get_ptr_mut(i)?, i))
    }
}

/// A way found holding a flow, with what was read of it: its stored tag, backend and
/// epoch, read once each and in this order (see `Found::unchanged`).
#[derive(Clone, Copy)]
struct Found {
    way: *mut FlowWay,
    tag: u64,
    backend: u32,
    seen: u32,
}

impl Found {
    /// Whether the way still stores the tag read first: a writer on another CPU clears
    /// the tag before it writes the other fields, so then the backend and epoch read
    /// are the found flow's, not halves of two flows'.
    #[inline(always)]
    fn unchanged(&self) -> bool {
        // SAFETY: a way in a map value.
        unsafe { core::ptr::read_volatile(&raw const (*self.way).tag) == self.tag }
    }
}

/// The way of `bucket` holding the flow tagged `tag` (bound to the backend beside it,
/// see `FlowWay::bind`), and whether the bucket has a free way.
///
/// Volatile reads keep each field read once and in order, so that the checks below are
/// made on the values used.
#[inline(always)]
fn search(bucket: *mut FlowBucket, tag: u64) -> (Option<Found>, bool) {
    let mut free = false;
    let mut i = 0;
    while i < FLOW_WAYS {
        // SAFETY: a map value of this program's; the way index is below FLOW_WAYS.
        let w = unsafe { &raw mut (*bucket).ways[i] };
        let (t, b) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*w).tag),
                core::ptr::read_volatile(&raw const (*w).backend),
            )
        };
        if FlowWay::bind(t, b) & !(FLOW_F_CONFIRMED as u64) == tag {
            let seen = unsafe { core::ptr::read_volatile(&raw const (*w).seen) };
            return (
                Some(Found {
                    way: w,
                    tag: t,
                    backend: b,
                    seen,
                }),
                free,
            );
        }
        free |= t == 0;
        i += 1;
    }
    (None, free)
}

/// The way holding `key`'s flow, if any: in its home bucket, or in its overflow bucket
/// when the home bucket is full (ways are never freed, so a flow that overflowed left a
/// full home bucket behind).
#[inline(always)]
fn find(p: Place) -> Option<Found> {
    let (found, free) = search(p.home, p.tag);
    if found.is_some() || free {
        return found;
    }
    search(p.overflow()?.0, p.tag).0
}

/// The backend id of a flow (whose table place `place_of` gave) whose entry is confirmed
/// and was checked against its VIP since the agent's last change, as of epoch `now`, the
/// epoch this packet read: such an entry decides alone, and the packet needs no VIP
/// lookup.
///
/// The program marks an entry seen only after the flow's VIP lookup agreed with it
/// (`remembered`, `record`) or here, and the agent advances the epoch after every change
/// it writes (VIPs, services, source ranges, backends), naming that epoch its last
/// change's first (`SETTINGS_CHANGED_EPOCH`) before it starts it: an entry seen since
/// was checked against the maps as they stand. Its half-second ticks change no map, so a
/// flow whose packets are further apart than that keeps this path. The backend's entry
/// is the caller's to read (`current`), or what the next-hop cache learnt of it in this
/// epoch (`encap::learnt`).
#[inline(always)]
pub fn current_id(place: Option<Place>, now: u32) -> Option<u32> {
    let f = find(place?)?;
    let fresh = f.seen == now;
    // An entry not yet confirmed (its SYN wrote it) is left to `remembered`, which
    // confirms it.
    if (!fresh && !checked_since_change(f.seen, now))
        || f.tag & FLOW_F_CONFIRMED as u64 == 0
        || !f.unchanged()
    {
        return None;
    }
    if !fresh {
        // The entry's age for eviction: one store per flow and epoch, as `remembered`
        // makes; the path is otherwise free of stores. Should another CPU have replaced
        // the way since `unchanged`, its entry is marked seen now, as `remembered` may
        // mark it: it was checked in an epoch since the last change unless its writer's
        // run spanned that change and the epoch after it (a run of microseconds held up
        // that long by its CPU).
        unsafe { core::ptr::write_volatile(&raw mut (*f.way).seen, now) };
    }
    Some(f.backend)
}

/// Whether an entry seen in epoch `seen` (not `now`) is still checked in `now`: no change
/// of the agent's took effect after it (`lb_common::flow_still_checked`).
#[inline(always)]
fn checked_since_change(seen: u32, now: u32) -> bool {
    // Read after the epoch (the caller's `now`), which the agent writes after this: an
    // epoch read that the agent started is never paired with the change before it.
    match SETTINGS.get_ptr(SETTINGS_CHANGED_EPOCH) {
        // SAFETY: an aligned u32 in a map value, written whole by the agent.
        Some(c) => flow_still_checked(seen, now, unsafe { core::ptr::read_volatile(c) }),
        None => false,
    }
}

/// The choice of backend `id` for a flow `current_id` found, read from its entry: the
/// family is checked, so a slot the agent cleared is never used from here (a known
/// flow's packet that `encap::learnt` sends is bound by the epoch instead: the agent
/// advances it right after clearing entries).
#[inline(always)]
pub fn current_choice(id: u32, family: u8, now: u32) -> Option<Choice> {
    let b = BACKENDS.get(id)?;
    if b.family != family {
        return None;
    }
    Some(Choice::of(id, b, false, now))
}

/// `current_id`, then `current_choice`.
#[inline(always)]
pub fn current(place: Option<Place>, family: u8, now: u32) -> Option<Choice> {
    current_choice(current_id(place, now)?, family, now)
}

/// The backend the connection table remembers for `key`, if it still serves this service;
/// `touch` marks the entry confirmed and seen in epoch `now` (a flow's packet, not an ICMP
/// error), the epoch this packet read.
#[inline(always)]
fn remembered(
    key: &FlowKey,
    place: Option<Place>,
    vip: &VipInfo,
    touch: bool,
    now: u32,
) -> Option<Choice> {
    let f = find(place?)?;
    if !f.unchanged() {
        return None;
    }
    let (w, id) = (f.way, f.backend);
    // The backend's own service decides whether the entry still applies: it is read
    // anyway, and the entry's service (in its cold record) is not.
    let b = BACKENDS.get(id)?;
    if b.family != key.family || b.service != vip.service {
        return None;
    }
    if touch {
        // Stores only when something changed: once per flow for the flag, once per epoch
        // (half a second) for the age, so the established path stays read-mostly.
        // Both from what was read and checked: should another CPU have replaced the way
        // meanwhile, the tag written back is bound to this flow's backend, not to the
        // one now beside it, and reads as no flow (see `FlowWay::bind`).
        unsafe {
            if f.seen != now {
                (*w).seen = now;
            }
            if f.tag & FLOW_F_CONFIRMED as u64 == 0 {
                (*w).tag = f.tag | FLOW_F_CONFIRMED as u64;
            }
        }
    }
    Some(Choice::of(id, b, false, now))
}

/// Records `key` → `state` in the way `flow_place` picks (ages counted from epoch `now`),
/// its cold record first.
///
/// Writers on other CPUs may fill the same bucket at once (a flow's packets normally stay
/// on one CPU, different flows do not): the way is freed first and its tag written last,
/// so a concurrent reader sees the old flow, no flow, or the new one.
#[inline(always)]
fn record(key: &FlowKey, place: Option<Place>, state: FlowState, now: u32) {
    let Some(p) = place else {
        return;
    };
    let Some((over, over_index)) = p.overflow() else {
        return;
    };
    // SAFETY: map values of this program's, read as a whole for the choice (the
    // overflow bucket only when the home bucket is full).
    let (overflow, way) = flow_place(unsafe { &*p.home }, unsafe { &*over }, p.tag, now);
    let (bucket, index) = if overflow {
        (over, over_index)
    } else {
        (p.home, p.home_index)
    };
    let way = way & (FLOW_WAYS - 1);
    let Some(rec) = FLOWS.get_ptr_mut(flow_record_index(p.buckets, index, way)) else {
        return;
    };
    let rec = rec.cast::<FlowRecord>();
    unsafe {
        let w = &raw mut (*bucket).ways[way];
        core::ptr::write_volatile(&raw mut (*w).tag, 0);
        (*rec).key = *key;
        (*rec).service = state.service;
        (*rec).created_ns = state.created_ns;
        // Volatile like the tag's stores, so that they stay between them: the compiler
        // may move plain stores across volatile ones, and a reader on another CPU would
        // then find the old flow's tag beside the new flow's backend.
        core::ptr::write_volatile(&raw mut (*w).backend, state.backend);
        core::ptr::write_volatile(&raw mut (*w).seen, now);
        core::ptr::write_volatile(&raw mut (*w).tag, FlowWay::bind(p.tag, state.backend));
    }
}

/// The backend the service's Maglev table gives `key` (ports ignored under client-IP
/// affinity); no state is read or written. `now`, the epoch this packet read, rides along
/// in the choice.
#[inline(always)]
pub fn from_table(key: &FlowKey, vip: &VipInfo, now: u32) -> Option<Choice> {
    let size = unsafe { core::ptr::read_volatile(&RING_SIZE) };
    if size == 0 {
        return None;
    }
    let hash = if vip.flags & SERVICE_F_AFFINITY_CLIENT_IP != 0 {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's scratch entry; only its `hash` field is used here.
        let hkey: &mut FlowKey = unsafe { &mut (*scratch).hash };
        *hkey = *key;
        hkey.sport = 0;
        hkey.dport = 0;
        flow_hash(hkey)
    } else {
        flow_hash(key)
    };
    let slot = vip.ring.wrapping_mul(size) + maglev_slot(hash, size);
    let id = *RINGS.get(slot)?;
    let backend = BACKENDS.get(id)?;
    if backend.family != key.family || backend.service != vip.service {
        return None;
    }
    Some(Choice::of(id, backend, true, now))
}

/// Picks the backend of a flow (whose table place `place_of` gave) and records it.
///
/// A connection-table hit keeps the flow where it is as long as that backend still
/// exists for this service; a TCP SYN always chooses afresh so a reused 5-tuple is
/// balanced by the current table. A miss consults the service's active Maglev table and
/// records the choice. `now` is the epoch this packet read before its VIP lookup (see
/// `current`: read after it, an entry could be marked checked in an epoch whose maps
/// the lookup did not see).
#[inline(always)]
pub fn select(
    key: &FlowKey,
    place: Option<Place>,
    vip: &VipInfo,
    syn: bool,
    now: u32,
) -> Option<Choice> {
    if !syn && let Some(c) = remembered(key, place, vip, true, now) {
        return Some(c);
    }
    // From here on the key is read through memory: a copy in this CPU's scratch entry
    // keeps it off the stack (see `Scratch`), and the established path above never
    // pays for the copy. (An IPv6 key is there already.)
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; nothing else holds a reference into it now.
    let key: &FlowKey = unsafe {
        let own = &raw mut (*scratch).flow;
        if !core::ptr::eq(own, key) {
            *own = *key;
        }
        &*own
    };
    let choice = from_table(key, vip, now)?;
    // The creation stamp costs one clock read per new entry only; packets that find their
    // entry never write it (no per-packet stores on the established path). The coarse
    // clock (the kernel's time as of its last tick) is a load where the precise one reads
    // the TSC: a quarter of the new-flow path on a VM (`bench --compare`: SYN 1.24).
    // SAFETY: bpf_ktime_get_coarse_ns takes no arguments and cannot fail.
    let created_ns = unsafe { bpf_ktime_get_coarse_ns() };
    record(
        key,
        place,
        FlowState {
            backend: choice.id,
            service: vip.service,
            created_ns,
        },
        now,
    );
    logs::new_flow(key, vip.service, choice.id);
    Some(choice)
}

/// The backend that owns a flow, without recording anything (for ICMP errors about it).
#[inline(always)]
pub fn owner(key: &FlowKey, vip: &VipInfo) -> Option<Choice> {
    let now = epoch();
    let choice = match remembered(key, place_of(key), vip, false, now) {
        Some(c) => c,
        None => from_table(key, vip, now)?,
    };
    logs::icmp_error(key, vip.service, choice.id);
    Some(choice)
}
