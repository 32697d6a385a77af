//! Map keys, values and constants shared by the l3lb XDP program and its agent.
//!
//! This crate is the single source of truth for everything that crosses the kernel/user
//! boundary. Every type is `#[repr(C)]`, has explicit padding, and carries a size
//! assertion so the two sides cannot drift apart silently.
#![cfg_attr(not(test), no_std)]

/// IPv4 address family tag used in map keys.
pub const FAMILY_V4: u8 = 4;
/// IPv6 address family tag used in map keys.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of IPv4-in-IP encapsulation.
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP encapsulation.
pub const PROTO_IPV6: u8 = 41;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Maximum number of 802.1Q/802.1ad tags the parser walks.
pub const MAX_VLAN_DEPTH: usize = 2;

/// Service flag: forward by rewriting the destination MAC (`l2`) instead of IPIP.
pub const SERVICE_F_L2: u32 = 1;
/// Service flag: hash on the client address only (session affinity by client IP).
pub const SERVICE_F_AFFINITY_CLIENT_IP: u32 = 2;

/// Service flag: only sources in the service's ranges (`L3LB_SRC_V4`/`_V6`) may use it.
pub const SERVICE_F_SOURCE_RANGES: u32 = 4;

/// Settings flag: some service is an all-ports VIP (port 0 entries exist), so a VIP
/// lookup that misses on the port must also try port 0.
pub const SETTINGS_F_ALL_PORTS: u32 = 1;

/// Settings flag: the data plane reads the second half of the VIP index (the agent
/// writes the idle half and flips this bit, so a lookup never meets a half-written table).
pub const SETTINGS_F_VIP_INDEX_B: u32 = 2;

/// Settings flag: the VIP index also holds this node's addresses and the host-exact
/// (/32, /128) decap sources as `VIP_INDEX_LOCAL` / `VIP_INDEX_DECAP` keys, so the decap
/// role's checks are index searches; when clear (the entries did not fit), the data plane
/// reads `L3LB_LOCAL_V*` and `L3LB_DECAP_V*` as before.
pub const SETTINGS_F_DECAP_INDEX: u32 = 4;

/// Settings flag: some decap allow entry is a prefix wider than one host, so a source the
/// VIP index does not list must still be looked up in `L3LB_DECAP_V*` (the LPM tries).
pub const SETTINGS_F_DECAP_PREFIXES: u32 = 8;

/// `VipKey::family` bit of a VIP index key naming one of this node's addresses (an outer
/// destination the decap role opens), OR'd with `FAMILY_V4`/`FAMILY_V6`: no VIP key has
/// it, so such keys never meet a VIP's.
pub const VIP_INDEX_LOCAL: u8 = 0x10;
/// `VipKey::family` bit of a VIP index key naming an allowed decap source (a host-exact
/// allow entry), OR'd with `FAMILY_V4`/`FAMILY_V6`.
pub const VIP_INDEX_DECAP: u8 = 0x20;

/// Buckets of the decap role's tunnel pair table (`map_names::DECAP_PAIRS`), a power of
/// two; each holds two pair words (`decap_pair_word`).
pub const DECAP_PAIR_BUCKETS: u32 = 2048;
// `decap_pair_bucket` shifts by 64 − log2 of it: a power of two above 1.
const _: () = assert!(DECAP_PAIR_BUCKETS.is_power_of_two() && DECAP_PAIR_BUCKETS > 1);

/// The word naming the IPv4 tunnel from `src` to `dst` (each address's four bytes read as
/// one word in memory order, as the program loads them) in the tunnel pair table. 0 marks
/// a free place, so the one pair whose word is 0 (0.0.0.0 to 0.0.0.0) is never looked up.
#[inline(always)]
pub fn decap_pair_word(src: u32, dst: u32) -> u64 {
    src as u64 | (dst as u64) << 32
}

/// The bucket of the tunnel pair table that holds pair word `w`: the top bits of one
/// product, which every bit of both addresses reaches. Unkeyed: whoever chooses sources
/// can only crowd a bucket, which sends the crowded-out pairs to the slower searches.
#[inline(always)]
pub fn decap_pair_bucket(w: u64) -> u32 {
    (w.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - DECAP_PAIR_BUCKETS.trailing_zeros())) as u32
}

/// Index of the settings array holding `SETTINGS_F_*` bits.
pub const SETTINGS_FLAGS: u32 = 0;
/// Index of the settings array holding the epoch: the agent advances it every half second
/// and after every change it writes to the maps. Next hops (and the backend entries
/// learnt with them) from an older epoch are looked up again, and a connection-table
/// entry is trusted without its VIP lookup only if it was last checked in an epoch since
/// the agent's last change (`SETTINGS_CHANGED_EPOCH`, see `FlowWay::seen`). The program
/// reads its copy, the global `globals::EPOCH`; this entry keeps it for the next agent.
pub const SETTINGS_NEXTHOP_EPOCH: u32 = 1;
/// Index of the settings array holding the low half of the connection table's hash seed
/// (`flow_buckets_of`): the program has it as a load-time global, the array keeps it for
/// the next agent, which must search a table it takes over with the same seed.
pub const SETTINGS_FLOW_SEED_LO: u32 = 2;
/// Index of the settings array holding the high half of that seed.
pub const SETTINGS_FLOW_SEED_HI: u32 = 3;
/// Index of the settings array saying what `ServiceStats::packets` and `bytes` hold, for
/// the next agent: `SERVICE_COUNTS_RETIRED` (this build), or 0 (agents before it, whose
/// program counted every packet of a service there).
pub const SETTINGS_SERVICE_COUNTS: u32 = 4;
/// `SETTINGS[SETTINGS_SERVICE_COUNTS]`: a service's packets and bytes are its live
/// backends' counters plus, in `ServiceStats`, those of the backends it no longer has.
pub const SERVICE_COUNTS_RETIRED: u32 = 1;
/// Index of the settings array saying how the connection table's tags were made, for the
/// next agent: `FLOW_TAGS_BOUND` (this build), or another value (agents before it): a
/// table of other tags is placed anew.
pub const SETTINGS_FLOW_TAGS: u32 = 5;
/// `SETTINGS[SETTINGS_FLOW_TAGS]`: ways store `FlowWay::bind` of the key's `flow_tag` (each
/// address word's halves folded together) and their backend. Earlier values: 0, tags that
/// took the address words as the bucket hash does; 1, the swapped halves of 2b8da60 (never
/// released); 2, folded tags stored as they are.
pub const FLOW_TAGS_BOUND: u32 = 3;
/// Index of the settings array holding the epoch of the agent's last change to the maps
/// (the first epoch after it; see `globals::EPOCH`): a connection-table entry checked
/// against its VIP in that epoch or later, and confirmed, decides alone until the next
/// change, however many half-second ticks pass (see `FlowWay::seen`). Written by the
/// agent before the epoch it names.
pub const SETTINGS_CHANGED_EPOCH: u32 = 6;

/// Backend flag: the backend is this node; matching packets are passed to the local stack.
pub const BACKEND_F_LOCAL: u8 = 1;
/// Backend flag: its service forwards by MAC rewrite (`SERVICE_F_L2`), copied here so a
/// packet whose flow is known forwards without reading its VIP entry.
pub const BACKEND_F_L2: u8 = 2;

/// `BackendMeta::health`: not checked (no health check has run for it).
pub const HEALTH_UNKNOWN: u8 = 0;
/// `BackendMeta::health`: the last health check passed.
pub const HEALTH_UP: u8 = 1;
/// `BackendMeta::health`: the last health check failed.
pub const HEALTH_DOWN: u8 = 2;

/// Bytes of a service name in `ServiceMeta` (longer names are cut at a character boundary).
pub const SERVICE_NAME_LEN: usize = 128;

/// Names of the maps, as pinned under `<pin_path>/maps/` (kernel limit: 15 characters).
pub mod map_names {
    /// `VipKey` → `VipInfo`: which destinations are VIPs and which service owns them (the
    /// catalogue the agent and `l3lb status` read; the data plane reads `VIP_INDEX`).
    pub const VIPS: &str = "L3LB_VIPS";
    /// Two halves of `VipSlot`s: the same entries as `VIPS` in an open-addressing table
    /// the XDP program searches itself (no hash-map helper call per packet).
    pub const VIP_INDEX: &str = "L3LB_VIP_INDEX";
    /// Bucket → two IPv4 tunnel pair words (`decap_pair_word`, 0 when free): the tunnels
    /// the decap role opens from a host-exact allowed source to one of this node's
    /// addresses, which one lookup settles (written by the agent, read by the program).
    pub const DECAP_PAIRS: &str = "L3LB_DECAP_PAIRS";
    /// Ring slot × table size → backend id: the Maglev lookup tables of all services.
    pub const RINGS: &str = "L3LB_RINGS";
    /// Backend id → `Backend`: where a backend lives and how to reach it.
    pub const BACKENDS: &str = "L3LB_BACKENDS";
    /// The connection table: an array of `FlowBucket`s (`flow_buckets_of`), memory-mappable.
    pub const FLOWS: &str = "L3LB_FLOWS";
    /// Service id → `ServiceStats`, per CPU.
    pub const SERVICE_STATS: &str = "L3LB_SVC_STATS";
    /// Backend id → `BackendStats`, per CPU.
    pub const BACKEND_STATS: &str = "L3LB_BE_STATS";
    /// `SETTINGS_FLAGS` → `SETTINGS_F_*` bits, `SETTINGS_NEXTHOP_EPOCH` → epoch (the
    /// program reads the global `globals::EPOCH`); kept current by the agent.
    pub const SETTINGS: &str = "L3LB_SETTINGS";
    /// Backend id → the next hop last learnt from the FIB, per CPU (a short-lived cache).
    pub const NEXTHOPS: &str = "L3LB_NEXTHOPS";
    /// `DropReason` → packet count, per CPU.
    pub const DROPS: &str = "L3LB_DROPS";
    /// Interface index → packets dropped toward it (`DropReason::EgressNoXdp`): the
    /// devices XDP cannot transmit on, listed by the agent (at most `NO_XMIT_MAX`).
    pub const NO_XMIT: &str = "L3LB_NO_XMIT";
    /// Interface index of a VLAN device → `VlanDev`: sent through as tagged frames on its
    /// parent, listed by the agent (at most `VLANS_MAX`).
    pub const VLANS: &str = "L3LB_VLANS";
    /// `Event` → count, per CPU.
    pub const EVENTS: &str = "L3LB_EVENTS";
    /// `Action` → packet count, per CPU.
    pub const ACTIONS: &str = "L3LB_ACTIONS";
    /// IPv4 prefix → 1: sources whose IPIP packets are decapsulated.
    pub const DECAP_V4: &str = "L3LB_DECAP_V4";
    /// IPv6 prefix → 1: sources whose IPv6-in-IPv6 packets are decapsulated.
    pub const DECAP_V6: &str = "L3LB_DECAP_V6";
    /// (service, client prefix) → 1: allowed sources of services with source ranges.
    pub const SRC_V4: &str = "L3LB_SRC_V4";
    /// (service, client prefix) → 1: the IPv6 counterpart of `SRC_V4`.
    pub const SRC_V6: &str = "L3LB_SRC_V6";
    /// `FragKey` → `VipInfo`: the service of each fragmented datagram, from its first fragment.
    pub const FRAGS: &str = "L3LB_FRAGS";
    /// IPv4 address → 1: this node's own addresses (the only outer destinations decapsulated).
    pub const LOCAL_V4: &str = "L3LB_LOCAL_V4";
    /// IPv6 address → 1: this node's own IPv6 addresses.
    pub const LOCAL_V6: &str = "L3LB_LOCAL_V6";
    /// Service id → `ServiceMeta`: names for `l3lb status`; the program never reads it.
    pub const SERVICE_META: &str = "L3LB_SVC_META";
    /// Backend id → `BackendMeta`: weight and health for `l3lb status`; never read by the program.
    pub const BACKEND_META: &str = "L3LB_BE_META";
    /// aya-log's ring buffer of the program's debug records; read by the agent only while
    /// they are on, never pinned (no state: each program has its own).
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// Per CPU: a backend choice the program logs at its end; only with debug logs on.
    pub const LOG_NOTE: &str = "L3LB_LOG_NOTE";
    /// Slot → program: the programs `l3lb` tail-calls (`PATH_PROGRAMS`); filled by the
    /// agent at load time, pinned with the other maps so that a program left attached
    /// between two agents keeps them (the kernel empties a program array no file or pin
    /// refers to).
    pub const PATHS: &str = "L3LB_PATHS";
}

/// Names of the load-time globals in the XDP object.
pub mod globals {
    /// `u32`: entries per Maglev table (a prime).
    pub const RING_SIZE: &str = "RING_SIZE";
    /// `[u8; 4]`: source address of IPv4 encapsulation headers.
    pub const ENCAP_SRC_V4: &str = "ENCAP_SRC_V4";
    /// `[u8; 16]`: source address of IPv6 encapsulation headers.
    pub const ENCAP_SRC_V6: &str = "ENCAP_SRC_V6";
    /// `u32`: non-zero when the decap role is on (IPIP from allowed sources is stripped).
    pub const DECAP_ENABLED: &str = "DECAP_ENABLED";
    /// `u32`: slots per half of the VIP index (a power of two; `vip_index_slots`).
    pub const VIP_INDEX_SIZE: &str = "VIP_INDEX_SIZE";
    /// `u32`: buckets of the connection table (a power of two; `flow_buckets`);
    /// `L3LB_FLOWS` holds `flow_table_values` of that many 64-byte values.
    pub const FLOW_BUCKETS: &str = "FLOW_BUCKETS";
    /// `u64`: the connection table's hash seed (`flow_buckets_of`), random per table.
    pub const FLOW_SEED: &str = "FLOW_SEED";
    /// `u32`: the agent's epoch (`SETTINGS[SETTINGS_NEXTHOP_EPOCH]` keeps it for the next
    /// agent). The program's only writable global: alone in the object's `.bss` map
    /// (`BSS_MAP`), which the agent writes whole.
    pub const EPOCH: &str = "EPOCH";
    /// Name of the map that holds the program's writable globals (`EPOCH`).
    pub const BSS_MAP: &str = ".bss";
    /// `u8`: aya-log's level of the program's debug statements (0: off, removed by the
    /// verifier; 4 debug; 5 trace). Absent from an object built without the `log` feature.
    pub const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "l3lb";
/// Slot in `L3LB_PATHS` of the IPv6 balancer path (tail-called by `l3lb`).
pub const PATH_V6: u32 = 0;
/// Slot in `L3LB_PATHS` of the IPv6 "packet too big" reply (tail-called by the IPv6 path).
pub const PATH_TOO_BIG_V6: u32 = 1;
/// Slot in `L3LB_PATHS` of the program that counts and logs the IPv6 programs' outcome
/// while debug logs are on.
pub const PATH_LOG_OUTCOME: u32 = 2;
/// The programs reached by tail call from `PROGRAM_NAME`, with their `L3LB_PATHS` slots:
/// each has a 512-byte stack of its own, which the IPv4 path inlined into the entry point
/// leaves too little of for them.
pub const PATH_PROGRAMS: [(&str, u32); 3] = [
    ("l3lb_v6", PATH_V6),
    ("l3lb_too_big_v6", PATH_TOO_BIG_V6),
    ("l3lb_log_outcome", PATH_LOG_OUTCOME),
];
/// Name of the benchmark floor program in the object (MAC swap + `XDP_TX`).
pub const FLOOR_PROGRAM_NAME: &str = "l3lb_floor";
/// Name of the benchmark's live-frame generator program in the object.
pub const BENCH_GEN_PROGRAM_NAME: &str = "l3lb_bench_gen";
/// Name of the benchmark's sink program (counts and drops what reaches it).
pub const BENCH_SINK_PROGRAM_NAME: &str = "l3lb_bench_sink";

/// Key of the VIP map: destination address, port and protocol of a service.
///
/// `port` is in network byte order; `port == 0` is the all-ports entry of an L3 VIP.
// Aligned so the XDP program copies and compares it in words, not bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Address bytes; IPv4 uses the first four, the rest are zero.
    pub addr: [u8; 16],
    /// Destination port in network byte order, 0 for all ports.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// One slot of the VIP index (`L3LB_VIP_INDEX`): a VIP key and the service it maps to;
/// `key.family == 0` marks an empty slot, where every search for a key ends.
///
/// Linear probing from `vip_index_hash(key)`: a key sits at most `VIP_INDEX_PROBES − 1`
/// slots past its home, which the agent checks when it builds a table.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    /// The VIP key, as in `L3LB_VIPS`.
    pub key: VipKey,
    /// `VipInfo::service`.
    pub service: u32,
    /// `VipInfo::flags`.
    pub flags: u32,
    /// `VipInfo::ring`.
    pub ring: u32,
}

/// Slots the data plane examines for one key before it gives up (the agent refuses a
/// table where some key would sit further from its home).
pub const VIP_INDEX_PROBES: u32 = 16;

/// Slots per half of the VIP index for `max_services`: a power of two with room for 4 VIP
/// entries per service at a quarter full, so searches for other addresses end at once.
pub const fn vip_index_slots(max_services: u32) -> u32 {
    let want = (max_services as u64) * 16;
    let mut n: u64 = 64;
    while n < want && n < (1 << 26) {
        n *= 2;
    }
    n as u32
}

/// Index of the settings array where the VIP address filter starts (`vip_filter_words`
/// words). One filter serves both halves of the VIP index: the agent sets a new
/// address's bit before the index that holds it becomes active, and clears a removed
/// address's bit only after, so the program tests the filter without reading which half
/// is active. Beside the epoch every VIP packet reads anyway.
pub const SETTINGS_FILTER: u32 = 16;

/// Words (32 bits each) of the VIP address filter for a VIP index of `slots`
/// slots (`vip_index_slots`): one bit per slot, at least 2048 bits. The index holds at
/// most 16 slots per service, so the filter is at most about 1/16 set at `max_services`.
pub const fn vip_filter_words(slots: u32) -> u32 {
    if slots / 32 < 64 { 64 } else { slots / 32 }
}

/// Entries of the settings array for a VIP index of `slots` slots: the settings, then
/// the address filter.
pub const fn settings_len(slots: u32) -> u32 {
    SETTINGS_FILTER + vip_filter_words(slots)
}

/// The bit of the address filter that stands for `addr` (its four words in memory order;
/// an IPv4 address in the first, as in `VipKey`), for a VIP index of `slots` slots: bit
/// `b` is bit `b % 32` of word `b / 32` of the filter.
///
/// The agent sets the bit of every address in the index; the XDP program finds the bit
/// clear for nearly every packet to another address and passes it before parsing its
/// upper-layer header or searching the index.
#[inline(always)]
pub fn vip_filter_bit(addr: &[u32; 4], slots: u32) -> u32 {
    // One multiplication, read in its middle bits: every VIP packet pays for this hash
    // before anything else, and the filter needs spread, not strength. The folds bring
    // every address bit below bit 32 first, as the product's bits 32.. depend only on
    // the bits of the factor below them (an IPv4 address is the low word alone). The
    // filter had a five-multiply hash before: 3–5 % of the established paths.
    let x = (addr[0] as u64 | (addr[1] as u64) << 32) ^ (addr[2] as u64 | (addr[3] as u64) << 32);
    let x = x ^ (x >> 32);
    let h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h >> 32) as u32) & (vip_filter_words(slots) * 32).wrapping_sub(1)
}

/// The home slot hash of a VIP key (its five words in memory order), shared by the agent,
/// which places keys, and the XDP program, which looks them up.
#[inline(always)]
pub fn vip_index_hash(words: &[u32; 5]) -> u32 {
    // The words paired into three 64-bit products, which the CPU overlaps, folded and
    // mixed by one more multiplication; the slot comes from the high half, which every
    // key bit reaches. Latency is what counts here: a lookup waits for the hash before it
    // can load its slot. The 32-bit version with a murmur3 finalizer after its products
    // was a chain twice as long (`bench --compare` of a variant that hashes twice in a
    // row: decap 1.096 with that hash).
    let w = |i: usize| u64::from(words[i]);
    let h = (w(0) | w(1) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (w(2) | w(3) << 32).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ w(4).wrapping_mul(0x1656_67b1_9e37_79f9);
    ((h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32) as u32
}

impl VipKey {
    /// The key as the five words `vip_index_hash` and the index's comparisons use.
    #[inline(always)]
    pub fn words(&self) -> [u32; 5] {
        // SAFETY: VipKey is 20 bytes, 4-aligned, without padding; any bit pattern is a
        // valid [u32; 5].
        unsafe { core::mem::transmute(*self) }
    }
}

/// Value of the VIP map: the service behind a VIP and its current Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Service id: index into the per-service stats.
    pub service: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// Ring slot holding this service's active Maglev table.
    pub ring: u32,
    /// Reserved for growth; zero.
    pub _reserved: u32,
}

/// Value of the backend map: one backend of one service (ids are per service, so removing
/// a backend from one service leaves its entries in others untouched).
// Aligned so the XDP program copies and compares it in words, not bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address bytes; IPv4 uses the first four.
    pub addr: [u8; 16],
    /// `FAMILY_V4` or `FAMILY_V6`; 0 marks an unused slot.
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
    /// Service this backend entry belongs to: a connection-table hit is honoured only
    /// while the entry still belongs to the flow's service.
    pub service: u32,
}

/// Key of the connection table: a flow's 5-tuple as the client sent it.
// Aligned so the XDP program copies and compares it in words, not bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address.
    pub src: [u8; 16],
    /// VIP address.
    pub dst: [u8; 16],
    /// Client port, network byte order.
    pub sport: u16,
    /// VIP port, network byte order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

/// What the connection table keeps of a flow: the backend it is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Backend id.
    pub backend: u32,
    /// Service id the flow was balanced for (what `l3lb flows` shows; the data plane
    /// checks the backend's own service instead, which it reads anyway).
    pub service: u32,
    /// `bpf_ktime_get_coarse_ns()` when the entry was written: CLOCK_MONOTONIC as of the
    /// kernel's last tick (1-10 ms before; a precise read costs the new-flow path a
    /// quarter), at the flow's first packet, a TCP SYN, or a packet of a flow the table
    /// had lost. Written only with the entry, never by the packets that find it, so the
    /// established path stays read-only; `l3lb flows` orders by it (flows begun within
    /// one tick by client address and port).
    pub created_ns: u64,
}

/// Most devices `map_names::NO_XMIT` lists: a node's host-side veths of its pods count
/// too (without XDP or GRO on the pod's side they take no XDP frames).
pub const NO_XMIT_MAX: u32 = 4096;

/// Most VLAN devices `map_names::VLANS` lists.
pub const VLANS_MAX: u32 = 4096;

/// A VLAN device as the program sends through it (XDP cannot transmit on a VLAN device
/// itself): the device below it, where the frame leaves, and the tag the frame carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlanDev {
    /// Interface index of the parent device.
    pub parent: u32,
    /// The tag as it lies in the frame after the MAC addresses: TPID (0x8100, or 0x88a8
    /// for 802.1ad), then TCI (the VLAN id; priority 0), each in network byte order.
    pub tag: [u16; 2],
}

impl VlanDev {
    /// The device with VLAN id `vid` (below 4096) and TPID `tpid` on `parent`.
    pub fn new(parent: u32, tpid: u16, vid: u16) -> Self {
        VlanDev {
            parent,
            tag: [tpid.to_be(), (vid & 0x0fff).to_be()],
        }
    }
}

/// Entries per bucket of the connection table.
pub const FLOW_WAYS: usize = 4;

/// Entry flag: a packet after the one that wrote the entry has found it (the flow is
/// more than a lone SYN or datagram). Unconfirmed entries are evicted first, so a flood
/// of one-packet flows displaces its own entries before established connections. In the
/// table it is bit 0 of the way's tag (`FlowWay::tag`).
pub const FLOW_F_CONFIRMED: u32 = 1;

/// A connection-table entry as a whole: what userspace reads, writes and lists (the
/// table keeps it split into a `FlowWay` and a `FlowRecord`), and the way layout of the
/// tables of earlier builds (`WideFlowBucket`), which a new agent converts.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The flow.
    pub key: FlowKey,
    /// Where it goes.
    pub state: FlowState,
    /// The epoch (`globals::EPOCH`) when a packet last found (or wrote) the entry:
    /// the agent advances it every half second (and after each change it writes), so this
    /// is the entry's age for eviction, kept without a clock read or a store per packet.
    pub seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
}

/// A bucket of the connection table of earlier builds: `FLOW_WAYS` whole entries
/// (256 bytes). Kept so that a new agent can read such a table and convert it.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WideFlowBucket {
    /// The entries; `key.family == 0` marks a free one.
    pub ways: [FlowEntry; FLOW_WAYS],
}

/// Tag bit set in every live way, so that a live tag is never 0 (a free way).
pub const FLOW_TAG_LIVE: u64 = 1 << 63;

/// What the established path reads of a flow: 16 bytes, four to a cache line.
///
/// A flow is found by its tag, a second 64-bit hash of its key (`flow_tag`) independent
/// of the one that picks its buckets, so the packets of established flows touch one
/// cache line of a table a quarter the size a whole key per way would take: with tens of
/// thousands of flows, how many pages the working set spans (TLB misses, nested paging
/// in a VM) decides the cost per packet. The full key lives in the way's `FlowRecord`,
/// written with the entry and read only by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWay {
    /// `flow_tag` of the key bound to `backend` (`FlowWay::bind`), with
    /// `FLOW_F_CONFIRMED` in bit 0; 0 when the way is free.
    pub tag: u64,
    /// Backend id.
    pub backend: u32,
    /// Epoch the entry was last found or written in (see `FlowEntry::seen`). The program
    /// writes it only after the flow's VIP lookup agreed with the entry, or when it finds
    /// the entry checked so since the agent's last change (`flow_still_checked`): until
    /// the next change (the agent advances the epoch after each) the entry alone decides.
    pub seen: u32,
}

/// Whether an entry last checked against its VIP in epoch `seen` still decides alone in
/// epoch `now`, the agent's last change to the maps having taken effect in epoch
/// `changed` (`SETTINGS_CHANGED_EPOCH`): `changed <= seen <= now`, on the epoch's wrapping
/// clock. A `changed` ahead of `now` (the agent has named the next epoch and not yet
/// started it) trusts nothing.
#[inline(always)]
pub fn flow_still_checked(seen: u32, now: u32, changed: u32) -> bool {
    let since_change = now.wrapping_sub(changed);
    since_change < 1 << 31 && now.wrapping_sub(seen) <= since_change
}

impl FlowWay {
    /// The tag a way stores for the flow tagged `tag` sent to `backend`: the two bound
    /// together, so that only a matching pair of tag and backend reads as the flow.
    ///
    /// Ways are shared by every CPU without locks: two CPUs writing one way at once (two
    /// new flows of one bucket), or a CPU confirming an entry while another replaces it,
    /// can leave one flow's tag beside the other's backend, and a reader between a
    /// writer's stores can take them so too. Bound, such a pair is nobody's tag (it differs
    /// from the flow's by the two backends' difference), so the flow misses and is placed
    /// again instead of going to another flow's backend, possibly of another service.
    #[inline(always)]
    pub fn bind(tag: u64, backend: u32) -> u64 {
        // Backend ids stay far below 2^62: bit 0 (the flag) and bit 63 (live) are kept.
        tag ^ (backend as u64) << 1
    }

    /// Whether this way holds the flow tagged `tag` (confirmed or not), with the backend
    /// it was written with.
    #[inline(always)]
    pub fn holds(&self, tag: u64) -> bool {
        Self::bind(self.tag, self.backend) & !(FLOW_F_CONFIRMED as u64) == tag
    }

    /// Whether the way is free.
    #[inline(always)]
    pub fn is_free(&self) -> bool {
        self.tag == 0
    }

    /// Whether a packet after the entry's first has found it.
    #[inline(always)]
    pub fn confirmed(&self) -> bool {
        self.tag & FLOW_F_CONFIRMED as u64 != 0
    }
}

/// The hot half of the connection table's unit: `FLOW_WAYS` ways sharing one hash value,
/// one cache line. The table (`L3LB_FLOWS`) is an array of 64-byte values: `buckets`
/// (a power of two, `flow_buckets`) of these, followed by `FLOW_WAYS` `FlowRecord`s per
/// bucket (`flow_record_index`). A flow lives in its home bucket, in its overflow bucket
/// if the home bucket was full (`flow_buckets_of`), or nowhere.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    /// The ways.
    pub ways: [FlowWay; FLOW_WAYS],
}

/// The cold half of a connection-table entry: the flow's key and what `l3lb flows` shows,
/// written by whoever writes the entry, never read on the packet path.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// The flow.
    pub key: FlowKey,
    /// Service id the flow was balanced for.
    pub service: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` when the entry was written (see
    /// `FlowState::created_ns`).
    pub created_ns: u64,
    /// Reserved; zero.
    pub _reserved: u64,
}

/// 64-byte values in a connection table of `buckets` buckets: the buckets, then a record
/// per way.
pub const fn flow_table_values(buckets: u32) -> u32 {
    buckets * (1 + FLOW_WAYS as u32)
}

/// Buckets of a connection table of `values` 64-byte values (`flow_table_values`), if
/// that is a table's size.
pub const fn flow_table_buckets(values: u32) -> Option<u32> {
    let per = 1 + FLOW_WAYS as u32;
    let b = values / per;
    if b * per == values && b.is_power_of_two() {
        Some(b)
    } else {
        None
    }
}

/// Index, among the table's values, of the record of way `way` of bucket `bucket`.
#[inline(always)]
pub fn flow_record_index(buckets: u32, bucket: u32, way: usize) -> u32 {
    buckets
        .wrapping_add(bucket.wrapping_mul(FLOW_WAYS as u32))
        .wrapping_add(way as u32)
}

impl FlowKey {
    /// The key as the five words `flow_mix` and `flow_tag` hash.
    #[inline(always)]
    pub fn words64(&self) -> [u64; 5] {
        // SAFETY: FlowKey is 40 bytes, 8-aligned, without implicit padding; any bit
        // pattern is a valid [u64; 5].
        unsafe { core::mem::transmute(*self) }
    }
}

/// Largest number of buckets a connection table gets (2^30 entries), so that its values
/// (`flow_table_values`) fit the map's 32-bit size.
pub const FLOW_MAX_BUCKETS: u32 = 1 << 28;

/// Buckets of a connection table meant to hold `entries` flows: the power of two that
/// gives at least that many entries (at least 256 buckets, at most `FLOW_MAX_BUCKETS`).
pub const fn flow_buckets(entries: u32) -> u32 {
    let b = entries.div_ceil(FLOW_WAYS as u32);
    let b = if b < 256 { 256 } else { b };
    match b.checked_next_power_of_two() {
        Some(p) if p <= FLOW_MAX_BUCKETS => p,
        _ => FLOW_MAX_BUCKETS,
    }
}

/// The home bucket of `key` in a table of `buckets` buckets (a power of two) placed
/// unkeyed (seed 0; see `flow_buckets_of`); identical in kernel and agent.
#[inline(always)]
pub fn flow_bucket(key: &FlowKey, buckets: u32) -> u32 {
    flow_buckets_of(key, buckets, 0).0
}

/// The two buckets `key` may live in, in a table of `buckets` buckets (a power of two)
/// hashed with `seed`: its home bucket and its overflow bucket, which takes the flow only
/// when the home bucket is full. Identical in kernel and agent.
///
/// The seed is random per table (kept in `SETTINGS_FLOW_SEED_*` for the next agent), so
/// whoever can choose 5-tuples cannot aim them at the buckets of someone else's flow.
#[inline(always)]
pub fn flow_buckets_of(key: &FlowKey, buckets: u32, seed: u64) -> (u32, u32) {
    let h = flow_mix(&key.words64(), seed);
    (flow_home(h, buckets), flow_overflow(h, buckets))
}

/// The mixed 64-bit hash both buckets of a key come from (`flow_home`, `flow_overflow`):
/// the program computes the overflow bucket from it only when it needs that bucket.
#[inline(always)]
pub fn flow_mix(w: &[u64; 5], seed: u64) -> u64 {
    // Independent products (overlapped by the CPU, see `vip_index_hash`), folded, mixed
    // once more; the home bucket comes from the high half, which every input bit
    // reaches. Changing the home bucket moves every pinned flow: the agent would have to
    // re-place the table it takes over.
    let h = w[0].wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ w[1].wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ w[2].wrapping_mul(0x1656_67b1_9e37_79f9)
        ^ w[3].wrapping_mul(0x85eb_ca77_c2b2_ae63)
        ^ w[4].wrapping_mul(0x27d4_eb2f_1656_67c5)
        ^ seed;
    // The seed enters before the mixing multiply, whose carries spread it (and the key)
    // over the bits the bucket indices take.
    (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// The tag that identifies `key`'s entry within its buckets (`FlowWay::tag`), for a table
/// hashed with `seed`: bit 63 set, bit 0 clear (the way keeps `FLOW_F_CONFIRMED` there).
///
/// Its products use other multipliers than `flow_mix`, and take each address word with
/// its two halves folded into both (`w ^ w.rotate_left(32)`), so two keys that share a
/// bucket still differ in 62 tag bits of their own: a new flow is taken for another with
/// odds of about 2^-59 per lookup (eight candidate ways). The fold is what makes that
/// hold for structured keys. A product by an odd constant changes only at and above the
/// lowest bit its word changed in: with the words taken as `flow_mix` takes them, IPv6
/// addresses that differ only in the high bits of their 8th and 16th bytes (one /56, say
/// `…:10::1` and `…:90::81`) often made up for each other in both hashes at once, the
/// same bucket and tag whatever the seed (about eight such twins per address); with the
/// halves only swapped (2b8da60, never released), an IPv4 address's product reached only
/// the tag's high half, and every client had a twin in its own /24 for each other VIP
/// of the /24 or protocol. Folded, a change in either half reaches the whole product,
/// and an IPv4 word becomes a 32-bit value times another odd constant, as before
/// (`FLOW_TAGS_BOUND` marks tables tagged this way, stored bound to their backend).
#[inline(always)]
pub fn flow_tag(w: &[u64; 5], seed: u64) -> u64 {
    let f = |x: u64| x ^ x.rotate_left(32);
    let t = f(w[0]).wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ f(w[1]).wrapping_mul(0xa076_1d64_78bd_642f)
        ^ f(w[2]).wrapping_mul(0xe703_7ed1_a0b4_28db)
        ^ f(w[3]).wrapping_mul(0x8ebc_6af0_9c88_c6e3)
        ^ w[4].wrapping_mul(0x5899_65cc_7537_4cc3)
        ^ seed.rotate_left(32);
    let t = (t ^ (t >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (t ^ (t >> 29)) & !(FLOW_F_CONFIRMED as u64) | FLOW_TAG_LIVE
}

/// The home bucket of mixed hash `h` (`flow_mix`) in a table of `buckets` buckets.
#[inline(always)]
pub fn flow_home(h: u64, buckets: u32) -> u32 {
    ((h >> 32) as u32) & buckets.wrapping_sub(1)
}

/// The overflow bucket of mixed hash `h`: from the low half, mixed again so that flows
/// sharing a home bucket spread over different overflow buckets.
#[inline(always)]
pub fn flow_overflow(h: u64, buckets: u32) -> u32 {
    let low = (h as u32).wrapping_mul(0x9e37_79b1);
    (low ^ (low >> 15)) & buckets.wrapping_sub(1)
}

/// `flow_slot`'s score of the way holding the key itself.
pub const FLOW_SLOT_OWN: u64 = u64::MAX;
/// `flow_slot`'s score of a free way.
pub const FLOW_SLOT_FREE: u64 = u64::MAX - 1;

/// The way of `bucket` a new entry for the flow tagged `tag` would take, and how good a
/// place it is: the way already holding the flow (`FLOW_SLOT_OWN`), else a free one
/// (`FLOW_SLOT_FREE`), else the unconfirmed entry seen longest ago, else the entry seen
/// longest ago (score: its age by epoch distance from `now`, so the counter may wrap,
/// plus 2^32 when unconfirmed; higher is a better victim).
#[inline(always)]
pub fn flow_slot(bucket: &FlowBucket, tag: u64, now: u32) -> (usize, u64) {
    let mut free = FLOW_WAYS;
    let mut victim = 0;
    let mut victim_rank: u64 = 0;
    let mut i = 0;
    while i < FLOW_WAYS {
        let w = &bucket.ways[i];
        if w.holds(tag) {
            return (i, FLOW_SLOT_OWN);
        }
        if w.is_free() {
            if free == FLOW_WAYS {
                free = i;
            }
        } else {
            // Unconfirmed entries rank above every confirmed one; within each class the
            // older ranks higher.
            let age = now.wrapping_sub(w.seen) as u64;
            let rank = age | if w.confirmed() { 0 } else { 1 << 32 };
            if rank > victim_rank || i == 0 {
                victim = i;
                victim_rank = rank;
            }
        }
        i += 1;
    }
    if free < FLOW_WAYS {
        (free, FLOW_SLOT_FREE)
    } else {
        (victim, victim_rank)
    }
}

/// The way of `bucket` a new entry for the flow tagged `tag` takes when only this bucket
/// is considered (`flow_slot` without the score).
#[inline(always)]
pub fn flow_victim(bucket: &FlowBucket, tag: u64, now: u32) -> usize {
    flow_slot(bucket, tag, now).0
}

/// Where a new entry for the flow tagged `tag` goes, given its home and overflow buckets:
/// `(false, way)` for the home bucket, `(true, way)` for the overflow bucket. The flow's
/// own entry wherever it is; else a free way at home; else a free way in the overflow
/// bucket; else the better victim of the two (home on a tie). Ways are never freed, so a
/// home bucket with a free way means the flow is not in the overflow bucket, which is
/// then not read.
#[inline(always)]
pub fn flow_place(home: &FlowBucket, over: &FlowBucket, tag: u64, now: u32) -> (bool, usize) {
    let (hw, hs) = flow_slot(home, tag, now);
    if hs >= FLOW_SLOT_FREE {
        return (false, hw);
    }
    let (ow, os) = flow_slot(over, tag, now);
    if os > hs { (true, ow) } else { (false, hw) }
}

/// Per-service counters (one instance per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets of the backends the service no longer has: the agent adds a backend's
    /// counters here when it removes it. The service's total is this plus its live
    /// backends' `BackendStats::packets` (the program counts each packet once, for its
    /// backend: a second counter per packet cost the forwarding paths 5–6 %).
    pub packets: u64,
    /// Bytes of those packets (L3 length), kept the same way.
    pub bytes: u64,
    /// Flows that took a fresh Maglev choice.
    pub new_flows: u64,
    /// Reserved for growth; zero.
    pub _reserved: u64,
}

/// Per-backend counters (one instance per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Packets forwarded to the backend.
    pub packets: u64,
    /// Bytes of those packets before encapsulation (L3 length).
    pub bytes: u64,
}

/// Value of the service metadata map: what `l3lb status` shows about a service that the
/// data plane does not need. Written by the agent when it creates a service; never read by
/// the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    /// The service's name, UTF-8, NUL-padded (no terminator when it fills the array).
    pub name: [u8; SERVICE_NAME_LEN],
}

impl Default for ServiceMeta {
    fn default() -> Self {
        Self {
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

/// Value of the backend metadata map: what `l3lb status` shows about a backend that the
/// data plane does not need. Written by the agent; never read by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendMeta {
    /// Maglev weight as configured; 0 takes no new flows (draining).
    pub weight: u32,
    /// `HEALTH_UNKNOWN`, `HEALTH_UP` or `HEALTH_DOWN`.
    pub health: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 3],
}

/// Key of a fragmented datagram: addresses, protocol and IP identification.
// Aligned so the XDP program copies and compares it in words, not bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Client address.
    pub src: [u8; 16],
    /// VIP address.
    pub dst: [u8; 16],
    /// Identification (IPv4: 16 bits, zero-extended; IPv6: the fragment header's 32 bits).
    pub id: u32,
    /// IP protocol number of the fragmented payload.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

/// Data part of an IPv4 source-range key: the service id, then the client prefix.
///
/// The LPM prefix length is 32 (the whole service id) plus the prefix's own length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRangeV4 {
    /// Service id, big-endian so that it is matched as the leading bits.
    pub service: [u8; 4],
    /// Client address bits.
    pub addr: [u8; 4],
}

/// Data part of an IPv6 source-range key (see `SrcRangeV4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRangeV6 {
    /// Service id, big-endian.
    pub service: [u8; 4],
    /// Client address bits.
    pub addr: [u8; 16],
}

/// Key of the decap allow list for IPv4 sources (LPM trie data part).
pub type DecapV4 = [u8; 4];
/// Key of the decap allow list for IPv6 sources (LPM trie data part).
pub type DecapV6 = [u8; 16];

macro_rules! counted_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:literal => $label:literal,)* } count $count:ident) => {
        $(#[$m])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v = $n,)* }
        impl $name {
            /// Every variant, in index order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// The variant whose index is `i`, if any (a range check, not a search).
            #[inline(always)]
            pub const fn from_index(i: u32) -> Option<Self> {
                match i {
                    $($n => Some($name::$v),)*
                    _ => None,
                }
            }
            /// Stable snake_case name, used as the metrics label.
            pub const fn label(self) -> &'static str {
                match self { $($name::$v => $label,)* }
            }
        }
        /// Number of variants: the size of the per-CPU counter array.
        pub const $count: u32 = $name::ALL.len() as u32;
    };
}

counted_enum! {
    /// Why the XDP program dropped a packet: index of the drop counter and metrics label.
    DropReason {
        /// The frame, or the IP packet by its length field, ends inside a header it
        /// announces.
        Truncated = 0 => "truncated",
        /// IP header invalid: version, IHL or total length (IPv4); version, payload
        /// length, an extension-header chain beyond the walk's bound or with two fragment
        /// headers (IPv6, to a VIP).
        BadIpHeader = 1 => "bad_ip_header",
        /// TCP data offset below 5 or past the IP packet; UDP length below 8 or past it.
        BadL4Header = 2 => "bad_l4_header",
        /// A packet to a VIP claims the VIP as its source.
        SourceIsVip = 3 => "source_is_vip",
        /// The service has no backend able to take the flow.
        NoBackend = 4 => "no_backend",
        /// An encapsulated packet from a source not on the decap allow list.
        DecapNotAllowed = 5 => "decap_not_allowed",
        /// An encapsulated packet whose inner header is malformed.
        DecapMalformed = 6 => "decap_malformed",
        /// The next hop toward a backend has no resolved neighbour entry yet.
        NoNeighbour = 7 => "no_neighbour",
        /// No route toward the backend (FIB lookup failed).
        NoRoute = 8 => "no_route",
        /// Encapsulating would exceed the egress MTU.
        MtuExceeded = 9 => "mtu_exceeded",
        /// The kernel refused to grow or shrink the frame.
        AdjustFailed = 10 => "adjust_failed",
        /// The client is outside the service's source ranges.
        SourceNotAllowed = 11 => "source_not_allowed",
        /// A non-first fragment whose first fragment was not seen, for a VIP address
        /// with port-specific services only.
        FragmentUnknown = 12 => "fragment_unknown",
        /// An ICMP error to a VIP that quotes no flow of a VIP (or quotes it truncated).
        IcmpUnmatched = 13 => "icmp_unmatched",
        /// The program for the packet's path was missing from `L3LB_PATHS` (an agent that
        /// did not finish loading): never expected.
        ProgramMissing = 14 => "program_missing",
        /// A packet the balancer would answer itself (an echo request to a VIP, or one too
        /// big for its backend's tunnel) from a source no reply may go to (RFC 1122
        /// 3.2.2, RFC 4443 2.4): unspecified, loopback, multicast, broadcast or reserved
        /// (IPv4 0/8, 127/8, 224/3; IPv6 ::, ::1, ff00::/8), or in a frame sent to a
        /// link-layer group address.
        BadSource = 15 => "bad_source",
        /// A fragment to a VIP that breaks the fragmentation rules (RFC 791, RFC 8200
        /// 4.5): no data, data not a multiple of eight bytes with more fragments to follow
        /// (IPv6 receivers must discard it; Linux trims such an IPv4 fragment), or data
        /// ending past the largest datagram.
        BadFragment = 16 => "bad_fragment",
        /// The route toward the backend leaves by a device XDP cannot transmit on now (no
        /// `ndo-xmit` among its XDP features: a bridge or tunnel device, a VLAN on a VLAN, a
        /// veth whose peer runs neither XDP nor GRO, a driver that sends XDP frames only
        /// with a program of its own attached; a VLAN device on a NIC is sent through
        /// instead, see `map_names::VLANS`); the agent lists such devices in
        /// `L3LB_NO_XMIT`.
        EgressNoXdp = 17 => "egress_no_xdp",
    }
    count DROP_REASON_COUNT
}

counted_enum! {
    /// What the XDP program did with a packet that it did not drop.
    Action {
        /// Not for a VIP (or not parseable as IP): handed to the stack untouched.
        Pass = 0 => "pass",
        /// Encapsulated toward a backend.
        Encap = 1 => "encap",
        /// MAC-rewritten toward a backend (`l2`).
        L2 = 2 => "l2",
        /// VIP traffic whose backend is this node: handed to the stack.
        Local = 3 => "local",
        /// Decapsulated and handed to the stack (backend role).
        Decap = 4 => "decap",
        /// ICMP echo to a VIP answered by the balancer.
        EchoReply = 5 => "echo_reply",
        /// "Fragmentation needed" / "packet too big" sent to a client instead of an
        /// encapsulated packet that would exceed the MTU.
        TooBig = 6 => "too_big",
    }
    count ACTION_COUNT
}

counted_enum! {
    /// Things worth counting that are not outcomes (a packet may count here and as an
    /// action): index of the event counter and metrics label.
    Event {
        /// A fragment of a datagram to a VIP, balanced on addresses and protocol.
        Fragment = 0 => "fragment",
    }
    count EVENT_COUNT
}

/// Flow hash used for Maglev selection (see `maglev_slot`); unkeyed, so identical in
/// kernel and agent and on every balancer node.
///
/// Independent 64-bit products of the key's five words, folded and mixed once (the shape
/// of `flow_mix`, with other multipliers and no seed): the CPU overlaps the products,
/// where a murmur3-style chain over ten 32-bit words had every step wait for the one
/// before (`bench --compare`: new flows 0.83 with `maglev_slot`). The result is the high
/// half, which every input bit reaches, so Maglev shares hold for sequential client ports
/// and addresses.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let w = key.words64();
    let h = w[0].wrapping_mul(0xa24b_aed4_963e_e407)
        ^ w[1].wrapping_mul(0x9fb2_1c65_1e98_df25)
        ^ w[2].wrapping_mul(0xd1b5_4a32_d192_ed03)
        ^ w[3].wrapping_mul(0xaef1_7502_108e_f2d9)
        ^ w[4].wrapping_mul(0x8cb9_2ba7_2f3d_8dd7);
    ((h ^ (h >> 29)).wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as u32
}

/// The slot of a Maglev table of `size` entries that flow hash `hash` selects: the hash
/// scaled onto the table (multiply, keep the high half), which spreads a uniform hash as
/// evenly as a remainder does, without a division (table sizes are primes).
#[inline(always)]
pub fn maglev_slot(hash: u32, size: u32) -> u32 {
    ((u64::from(hash) * u64::from(size)) >> 32) as u32
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipInfo>() == 16);
    assert!(core::mem::size_of::<VipSlot>() == 32);
    assert!(core::mem::size_of::<Backend>() == 24);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowState>() == 16);
    assert!(core::mem::size_of::<FlowEntry>() == 64);
    assert!(core::mem::size_of::<WideFlowBucket>() == 64 * FLOW_WAYS);
    assert!(core::mem::size_of::<FlowWay>() == 16);
    assert!(core::mem::size_of::<FlowBucket>() == 64);
    assert!(core::mem::size_of::<FlowRecord>() == 64);
    assert!(core::mem::offset_of!(FlowState, created_ns) == 8);
    assert!(core::mem::size_of::<ServiceMeta>() == SERVICE_NAME_LEN);
    assert!(core::mem::size_of::<BackendMeta>() == 8);
    assert!(core::mem::size_of::<ServiceStats>() == 32);
    assert!(core::mem::size_of::<BackendStats>() == 16);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<SrcRangeV4>() == 8);
    assert!(core::mem::size_of::<SrcRangeV6>() == 20);
    assert!(core::mem::offset_of!(VipKey, port) == 16);
    assert!(core::mem::offset_of!(FlowKey, sport) == 32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, contain only integers and have no implicit padding
    // (checked by the size assertions above).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for FlowBucket {}
    unsafe impl aya::Pod for WideFlowBucket {}
    unsafe impl aya::Pod for FlowRecord {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for SrcRangeV4 {}
    unsafe impl aya::Pod for SrcRangeV6 {}
    unsafe impl aya::Pod for ServiceMeta {}
    unsafe impl aya::Pod for BackendMeta {}
    unsafe impl aya::Pod for VlanDev {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_still_checked_from_the_last_change_to_now_across_the_wrap() {
        // (seen, now, changed)
        for (seen, now, changed, want) in [
            (10, 10, 10, true),
            (10, 14, 10, true),
            (12, 14, 10, true),
            (9, 14, 10, false),
            (14, 14, 14, true),
            (13, 14, 14, false),
            // The agent has named the next epoch as its change and not yet started it.
            (14, 14, 15, false),
            (13, 14, 15, false),
            // Seen "after" now: a carried entry of another clock.
            (15, 14, 10, false),
            (u32::MAX, 1, u32::MAX - 1, true),
            (u32::MAX - 2, 1, u32::MAX - 1, false),
            (0, 1, u32::MAX, true),
            // A change long ago still bounds entries.
            (5, 1 << 31, 6, false),
            (7, 1 << 31, 6, true),
        ] {
            assert_eq!(
                flow_still_checked(seen, now, changed),
                want,
                "seen {seen}, now {now}, changed {changed}"
            );
        }
    }

    fn key(src: u8, sport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[198, 51, 100, src]);
        k.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        k
    }

    #[test]
    fn the_flow_hash_seed_moves_flows_and_seed_zero_is_the_unkeyed_hash() {
        let keys: Vec<FlowKey> = (0..1000u32).map(|i| key((i / 7) as u8, i as u16)).collect();
        for k in &keys {
            assert_eq!(flow_buckets_of(k, 1024, 0).0, flow_bucket(k, 1024));
        }
        let moved = |a: u64, b: u64| {
            keys.iter()
                .filter(|k| flow_buckets_of(k, 1024, a).0 != flow_buckets_of(k, 1024, b).0)
                .count()
        };
        // Another seed places nearly every key elsewhere (a chance 1 in 1024 each).
        assert!(moved(0, 1) > 980, "{}", moved(0, 1));
        assert!(moved(0x1234_5678_9abc_def0, 0x1234_5678_9abc_def1) > 980);
        assert!(moved(1 << 63, 0) > 980);
    }

    #[test]
    fn flow_buckets_round_up_to_a_power_of_two_with_a_floor() {
        assert_eq!(flow_buckets(1024), 256);
        assert_eq!(flow_buckets(4096), 1024);
        assert_eq!(flow_buckets(4097), 2048);
        assert_eq!(flow_buckets(262_144), 65_536);
        assert_eq!(flow_buckets(u32::MAX), FLOW_MAX_BUCKETS);
    }

    #[test]
    fn sequential_ports_and_addresses_spread_over_the_buckets() {
        let buckets = 1024u32;
        let mut count = [0u32; 1024];
        for src in 0..16u8 {
            for port in 0..4096u16 {
                count[flow_bucket(&key(src, 30_000 + port), buckets) as usize] += 1;
            }
        }
        // 65 536 flows, 64 per bucket on average: a fair hash keeps every bucket near it.
        let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        assert!(*min >= 32 && *max <= 110, "min {min}, max {max}");
        // IPv6 interface identifiers (the high half of the address words) spread too.
        let mut count = [0u32; 1024];
        for i in 0..65_536u32 {
            let mut k = key(1, 443);
            k.family = FAMILY_V6;
            k.src[12..16].copy_from_slice(&i.to_be_bytes());
            count[flow_bucket(&k, buckets) as usize] += 1;
        }
        let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        assert!(*min >= 32 && *max <= 110, "IPv6: min {min}, max {max}");
    }

    /// Counts per Maglev slot class of `keys`' flows in a table of `size` slots: by slot
    /// range (tenths of the table) and by slot residue (Maglev interleaves backends).
    fn slot_spread(keys: impl Iterator<Item = FlowKey>, size: u32) -> (Vec<u32>, Vec<u32>) {
        let (mut ranges, mut residues) = (vec![0u32; 10], vec![0u32; 97]);
        for k in keys {
            let slot = maglev_slot(flow_hash(&k), size);
            assert!(slot < size);
            ranges[(u64::from(slot) * 10 / u64::from(size)) as usize] += 1;
            residues[(slot % 97) as usize] += 1;
        }
        (ranges, residues)
    }

    /// Fails unless `counts` look like a fair hash's: every class within five standard
    /// deviations of the mean, and the chi-square statistic per degree of freedom (about 1
    /// for a random hash) below 2.5.
    fn assert_even(counts: &[u32], what: &str) {
        let mean = counts.iter().sum::<u32>() as f64 / counts.len() as f64;
        let mut chi2 = 0.0;
        for (i, c) in counts.iter().enumerate() {
            let d = f64::from(*c) - mean;
            assert!(
                d.abs() < 5.0 * mean.sqrt(),
                "{what}: class {i} has {c}, mean {mean:.0}"
            );
            chi2 += d * d / mean;
        }
        let per_df = chi2 / (counts.len() - 1) as f64;
        assert!(
            per_df < 2.5,
            "{what}: chi-square per degree of freedom {per_df:.2}"
        );
    }

    #[test]
    fn sequential_ports_and_clients_spread_over_the_maglev_table() {
        for size in [16_381u32, 65_537] {
            // One client, every source port.
            let (r, m) = slot_spread((0..=u16::MAX).map(|p| key(1, p)), size);
            assert_even(&r, "ports by range");
            assert_even(&m, "ports by residue");
            // Client-IP affinity hashes the address alone: consecutive clients of a /16.
            let clients = (0..65_536u32).map(|i| {
                let mut k = key(0, 0);
                k.dport = 0;
                k.src[..4].copy_from_slice(&(0xc633_0000 | i).to_be_bytes());
                k
            });
            let (r, m) = slot_spread(clients, size);
            assert_even(&r, "clients by range");
            assert_even(&m, "clients by residue");
            // IPv6 interface identifiers, as above.
            let v6 = (0..65_536u32).map(|i| {
                let mut k = key(1, 443);
                k.family = FAMILY_V6;
                k.src[12..16].copy_from_slice(&i.to_be_bytes());
                k
            });
            let (r, m) = slot_spread(v6, size);
            assert_even(&r, "IPv6 by range");
            assert_even(&m, "IPv6 by residue");
        }
        // The scaling reaches both ends of the table and never past it.
        assert_eq!(maglev_slot(0, 65_537), 0);
        assert_eq!(maglev_slot(u32::MAX, 65_537), 65_536);
        assert_eq!(maglev_slot(u32::MAX, 1), 0);
    }

    #[test]
    fn the_victim_is_the_same_flow_then_a_free_way_then_the_oldest_unconfirmed() {
        let tag = |src: u8, sport: u16| flow_tag(&key(src, sport).words64(), 7);
        let mut b = FlowBucket::default();
        let fill = |b: &mut FlowBucket, i: usize, tag: u64, seen: u32, flags: u32| {
            b.ways[i] = FlowWay {
                tag: FlowWay::bind(tag, 1) | u64::from(flags),
                backend: 1,
                seen,
            };
        };
        assert_eq!(
            flow_victim(&b, tag(1, 1), 10),
            0,
            "empty bucket: the first way"
        );
        fill(&mut b, 0, tag(1, 1), 9, FLOW_F_CONFIRMED);
        fill(&mut b, 1, tag(1, 2), 9, 0);
        assert_eq!(flow_victim(&b, tag(1, 2), 10), 1, "the flow's own way");
        assert_eq!(flow_victim(&b, tag(1, 1), 10), 0, "its own way, confirmed");
        assert_eq!(flow_victim(&b, tag(1, 3), 10), 2, "a free way");
        fill(&mut b, 2, tag(1, 3), 5, FLOW_F_CONFIRMED);
        fill(&mut b, 3, tag(1, 4), 8, 0);
        assert_eq!(
            flow_victim(&b, tag(1, 5), 10),
            3,
            "the oldest unconfirmed, though a confirmed one is older"
        );
        b.ways[1].tag |= u64::from(FLOW_F_CONFIRMED);
        b.ways[3].tag |= u64::from(FLOW_F_CONFIRMED);
        assert_eq!(
            flow_victim(&b, tag(1, 5), 10),
            2,
            "all confirmed: the oldest"
        );
        // Ages are distances: an epoch counter that wrapped still ranks correctly.
        b.ways[2].seen = u32::MAX - 2;
        for i in [0, 1, 3] {
            b.ways[i].seen = 1;
        }
        assert_eq!(
            flow_victim(&b, tag(1, 5), 2),
            2,
            "the pre-wrap entry is the oldest"
        );
    }

    #[test]
    fn a_tag_beside_another_flows_backend_reads_as_no_flow() {
        let x = flow_tag(&key(1, 1).words64(), 7);
        let y = flow_tag(&key(1, 2).words64(), 7);
        let way = |tag: u64, written_for: u32, beside: u32| FlowWay {
            tag: FlowWay::bind(tag, written_for) | u64::from(FLOW_F_CONFIRMED),
            backend: beside,
            seen: 0,
        };
        let whole = way(x, 3, 3);
        assert!(whole.holds(x) && whole.confirmed() && !whole.is_free());
        assert_eq!(
            whole.tag & FLOW_TAG_LIVE,
            FLOW_TAG_LIVE,
            "bound tags stay live"
        );
        // Halves of two writes (two CPUs writing the way at once, or a confirmation
        // written back over a replaced entry): neither flow's.
        for (tag, written_for, beside) in [(x, 3, 4), (y, 4, 3), (x, 0, 1 << 20)] {
            let torn = way(tag, written_for, beside);
            assert!(!torn.holds(x) && !torn.holds(y) && !torn.is_free());
        }
    }

    #[test]
    fn tags_are_live_leave_the_flag_bit_free_and_differ_between_keys_and_seeds() {
        let mut seen = std::collections::HashSet::new();
        for src in 0..=255u8 {
            for sport in 0..256u16 {
                let t = flow_tag(&key(src, sport).words64(), 0x1234);
                assert_eq!(t & FLOW_TAG_LIVE, FLOW_TAG_LIVE);
                assert_eq!(t & u64::from(FLOW_F_CONFIRMED), 0);
                assert!(seen.insert(t), "two of 65536 keys share a tag");
                let way = FlowWay {
                    tag: t | u64::from(FLOW_F_CONFIRMED),
                    backend: 0,
                    seen: 0,
                };
                assert!(way.holds(t) && way.confirmed() && !way.is_free());
            }
        }
        let k = key(9, 9).words64();
        assert_ne!(flow_tag(&k, 1), flow_tag(&k, 2), "the seed changes the tag");
        // Keys of one bucket are told apart by the tag: it must not be a function of the
        // bucket hash.
        let same_home: Vec<FlowKey> = (0..20_000u16)
            .map(|p| key(1, p))
            .filter(|k| flow_buckets_of(k, 256, 5).0 == 3)
            .collect();
        assert!(same_home.len() > 40);
        let tags: std::collections::HashSet<u64> = same_home
            .iter()
            .map(|k| flow_tag(&k.words64(), 5))
            .collect();
        assert_eq!(tags.len(), same_home.len());
    }

    #[test]
    fn ipv6_addresses_that_differ_in_high_bits_only_never_share_bucket_and_tag() {
        // Keys whose address words differ only in their top bytes (an address's 8th and
        // 16th bytes) often share a bucket; such twins must still get different tags. With
        // the tag's words taken as the bucket's, about eight twins per address shared both.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut same_bucket = 0;
        for _ in 0..24 {
            let v: [u64; 5] = core::array::from_fn(|_| next());
            let seed = next();
            for first in [0, 2] {
                for d0 in 0..=255u64 {
                    for d1 in 0..=255u64 {
                        if d0 == 0 && d1 == 0 {
                            continue;
                        }
                        let mut w = v;
                        w[first] ^= d0 << 56;
                        w[first + 1] ^= d1 << 56;
                        if flow_mix(&w, seed) == flow_mix(&v, seed) {
                            same_bucket += 1;
                            assert_ne!(
                                flow_tag(&w, seed),
                                flow_tag(&v, seed),
                                "words {w:x?} and {v:x?} share bucket and tag"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            same_bucket > 1000,
            "only {same_bucket} twins shared a bucket"
        );
    }

    #[test]
    fn ipv4_clients_of_a_slash_24_to_the_vips_of_a_slash_24_all_get_their_own_tag() {
        // A tag function in which an IPv4 address reached only half the tag gave every
        // client a twin in its own /24 for each other VIP of the /24 and each protocol.
        for (base, seed) in [(7u8, 1u64), (200, 0x5eed_5eed_5eed_5eed)] {
            let mut tags = std::collections::HashSet::new();
            for proto in [PROTO_TCP, PROTO_UDP] {
                for client in 0..=255u8 {
                    for vip in 0..=255u8 {
                        let mut k = key(client, 40000 + u16::from(base));
                        k.proto = proto;
                        k.dst[3] = vip;
                        assert!(
                            tags.insert(flow_tag(&k.words64(), seed)),
                            "{k:?} shares a tag"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_table_of_values_is_its_buckets_then_a_record_per_way() {
        assert_eq!(flow_table_values(256), 1280);
        assert_eq!(flow_table_buckets(1280), Some(256));
        assert_eq!(flow_table_buckets(1281), None);
        assert_eq!(
            flow_table_buckets(5 * 3),
            None,
            "3 buckets is not a power of two"
        );
        assert_eq!(flow_record_index(256, 0, 0), 256);
        assert_eq!(flow_record_index(256, 255, 3), 1279);
        assert!(flow_table_values(flow_buckets(u32::MAX)) > 0);
    }
}
