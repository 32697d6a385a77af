//! Every map of the data plane, in one place. Sizes marked "load time" are set by the agent
//! from its config before loading; the value here is a placeholder the verifier never sees.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    ACTION_COUNT, Backend, BackendMeta, BackendStats, DROP_REASON_COUNT, DecapV4, DecapV6,
    EVENT_COUNT, FlowBucket, FlowKey, FragKey, NO_XMIT_MAX, ServiceMeta, ServiceStats, SrcRangeV4,
    SrcRangeV6, VLANS_MAX, VipInfo, VipKey, VipSlot, VlanDev,
};

/// `VipKey` → `VipInfo`; written by the agent (size: load time). The catalogue behind
/// `VIP_INDEX`: this program never reads it.
#[map(name = "L3LB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(1, 0);

/// Two halves of `VIP_INDEX_SIZE` slots, the active one chosen by
/// `SETTINGS_F_VIP_INDEX_B`: the VIP entries as an open-addressing table this program
/// searches with inlined array reads; written by the agent (size: load time).
///
/// Memory-mappable, so the agent writes a whole half with a copy.
#[map(name = "L3LB_VIP_INDEX")]
pub static VIP_INDEX: Array<VipSlot> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Bucket → two words naming IPv4 tunnels the decap role opens (`lb_common::
/// decap_pair_word`, 0 when free): written by the agent through a memory mapping, whole
/// words at a time, so a packet never meets half of one pair and half of another.
#[map(name = "L3LB_DECAP_PAIRS")]
pub static DECAP_PAIRS: Array<[u64; 2]> =
    Array::with_max_entries(lb_common::DECAP_PAIR_BUCKETS, BPF_F_MMAPABLE);

/// (ring slot × RING_SIZE + `maglev_slot(hash, RING_SIZE)`) → backend id; written by the
/// agent, one slot at a time while no VIP points at it, then switched to (size: load
/// time).
///
/// Memory-mappable, so the agent writes a whole table with a copy instead of one system
/// call per entry.
#[map(name = "L3LB_RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;

/// Backend id → `Backend`; written by the agent (size: load time).
#[map(name = "L3LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(1, 0);

/// The connection table: `FLOW_BUCKETS` buckets of `FLOW_WAYS` tagged ways (one cache line
/// each), then a `FlowRecord` per way (`flow_record_index`), all 64-byte values; a flow in
/// its home or its overflow bucket (`flow_buckets_of`) or nowhere; written by this program
/// (size: load time).
///
/// An array searched with inlined reads rather than a hash map: a hash-map lookup costs
/// helper calls (hash, compare) and an LRU insert takes locks and list moves. Memory-
/// mappable, so the agent reads (status, flows) and migrates it without a system call per
/// entry.
#[map(name = "L3LB_FLOWS")]
pub static FLOWS: Array<FlowBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Service id → counters, per CPU: new flows counted by this program, packets and bytes of
/// removed backends added by the agent (see `ServiceStats`) (size: load time).
#[map(name = "L3LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(1, 0);

/// Backend id → counters, per CPU; written by this program (size: load time).
#[map(name = "L3LB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(1, 0);

/// `DropReason` → packets, per CPU; written by this program.
#[map(name = "L3LB_DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_COUNT, 0);

/// `Event` → count, per CPU; written by this program.
#[map(name = "L3LB_EVENTS")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

/// `Action` → packets, per CPU; written by this program.
#[map(name = "L3LB_ACTIONS")]
pub static ACTIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ACTION_COUNT, 0);

/// Interface index → packets dropped toward it: the devices XDP cannot transmit on now,
/// listed by the agent (from the kernel's XDP features, refreshed every second); this
/// program counts here what it drops as `egress_no_xdp`, so the agent can name the
/// device. A device not listed is tried.
#[map(name = "L3LB_NO_XMIT")]
pub static NO_XMIT: HashMap<u32, u64> = HashMap::with_max_entries(NO_XMIT_MAX, 0);

/// Interface index of a VLAN device → its parent and tag: a route that leaves by it sends
/// the frame tagged on the parent (XDP cannot transmit on the VLAN device); listed by the
/// agent (refreshed every second).
#[map(name = "L3LB_VLANS")]
pub static VLANS: HashMap<u32, VlanDev> = HashMap::with_max_entries(VLANS_MAX, 0);

/// IPv4 source prefix → 1: whose IPIP packets the decap role strips; written by the agent.
#[map(name = "L3LB_DECAP_V4")]
pub static DECAP_V4: LpmTrie<DecapV4, u32> = LpmTrie::with_max_entries(1024, 0);

/// This node's IPv4 addresses → 1: decapsulation only for packets addressed here;
/// written by the agent.
#[map(name = "L3LB_LOCAL_V4")]
pub static LOCAL_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(256, 0);

/// This node's IPv6 addresses → 1 (see `LOCAL_V4`); written by the agent.
#[map(name = "L3LB_LOCAL_V6")]
pub static LOCAL_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(256, 0);

/// IPv6 source prefix → 1: reserved for IPv6-in-IPv6 decapsulation; written by the agent.
#[map(name = "L3LB_DECAP_V6")]
pub static DECAP_V6: LpmTrie<DecapV6, u32> = LpmTrie::with_max_entries(1024, 0);

/// (service, client prefix) → 1: allowed IPv4 sources of services with source ranges;
/// written by the agent.
#[map(name = "L3LB_SRC_V4")]
pub static SRC_V4: LpmTrie<SrcRangeV4, u32> = LpmTrie::with_max_entries(16384, 0);

/// (service, client prefix) → 1: allowed IPv6 sources; written by the agent.
#[map(name = "L3LB_SRC_V6")]
pub static SRC_V6: LpmTrie<SrcRangeV6, u32> = LpmTrie::with_max_entries(16384, 0);

/// `FragKey` → the service of a fragmented datagram, recorded from its first fragment so
/// later fragments (which carry no ports) reach the same service; written by this program.
#[map(name = "L3LB_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, VipInfo> = LruHashMap::with_max_entries(8192, 0);

/// One counter per CPU: the identification of outer IPv4 headers written without DF;
/// written by this program.
#[map(name = "L3LB_ENCAP_ID")]
pub static ENCAP_ID: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for the keys the pipeline builds: kept off the 512-byte stack,
/// which the IPv6 path would otherwise exhaust.
#[repr(C)]
pub struct Scratch {
    /// The packet's flow.
    pub flow: FlowKey,
    /// The packet's fragment key.
    pub frag: FragKey,
    /// The flow as hashed (ports cleared under client-IP affinity).
    pub hash: FlowKey,
    /// The MTU a "packet too big" reply announces: from the IPv6 path to the reply
    /// program it tail-calls (see `l3lb_too_big_v6`).
    pub too_big_mtu: u32,
    /// A program's outcome handed to `l3lb_log_outcome` (packed as subprograms return it).
    pub outcome: u64,
}

/// One `Scratch` per CPU; only the data plane's programs touch it, one packet at a time.
#[map(name = "L3LB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A next hop learnt from `bpf_fib_lookup` for one backend, reused for a short while.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct CachedHop {
    /// The backend address this entry was learnt for (ids are reused), as the 16-byte
    /// form's two words.
    pub addr: [u64; 2],
    /// MAC of the next hop, then source MAC of the egress interface: the Ethernet
    /// header's first six 16-bit words.
    pub macs: [u16; 6],
    /// Egress interface.
    pub ifindex: u32,
    /// The VLAN tag frames carry on `ifindex` (see `encap::NextHop::vlan`).
    pub vlan: [u16; 2],
    /// Largest L3 length the route was seen to accept.
    pub max_len: u16,
    /// The backend's family as its `BACKENDS` entry had it when the entry was learnt.
    pub family: u8,
    /// The backend's `BACKEND_F_*` flags likewise (how its packets leave).
    pub flags: u8,
    /// The epoch (the global `EPOCH`) the entry was learnt in.
    pub epoch: u32,
    /// Packets sent with this entry since it was learnt.
    pub uses: u32,
}

/// Backend id → `CachedHop`, per CPU: spares forwarded packets a FIB lookup each, and a
/// known flow's packets the read of their backend's entry (see `encap::learnt`) (size:
/// load time); written by this program.
#[map(name = "L3LB_NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<CachedHop> = PerCpuArray::with_max_entries(1, 0);

/// Index 0 → `SETTINGS_F_*` bits, index 1 → the epoch, 2 and 3 → the connection table's
/// hash seed (the two kept for the next agent; this program has them as the globals
/// `EPOCH` and `FLOW_SEED`), from
/// `SETTINGS_FILTER` on → the VIP address filter (`vip_filter_bit`); written by the agent
/// (size: load time, `settings_len`). Memory-mappable, so the agent writes the filter
/// with a copy.
#[map(name = "L3LB_SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(4, BPF_F_MMAPABLE);

/// Service id → `ServiceMeta` (name); written by the agent for `l3lb status`, never read
/// by this program (size: load time).
#[map(name = "L3LB_SVC_META")]
pub static SERVICE_META: Array<ServiceMeta> = Array::with_max_entries(1, 0);

/// Backend id → `BackendMeta` (weight, health); written by the agent for `l3lb status`,
/// never read by this program (size: load time).
#[map(name = "L3LB_BE_META")]
pub static BACKEND_META: Array<BackendMeta> = Array::with_max_entries(1, 0);

/// A backend choice waiting to be logged: noted deep in the pipeline, logged by the entry
/// point (see `logs`). Only with debug logs on.
#[cfg(feature = "log")]
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct LogNote {
    /// The flow (for an ICMP error: the flow it quotes).
    pub flow: FlowKey,
    /// Service id.
    pub service: u32,
    /// Backend id.
    pub backend: u32,
    /// `logs::NOTE_*`: nothing, a new flow, or an ICMP error.
    pub kind: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// One `LogNote` per CPU; written and read by this program only while debug logs are on.
#[cfg(feature = "log")]
#[map(name = "L3LB_LOG_NOTE")]
pub static LOG_NOTE: PerCpuArray<LogNote> = PerCpuArray::with_max_entries(1, 0);

/// The programs `l3lb` and `l3lb_v6` tail-call, by slot (`lb_common::PATH_*`); the agent
/// fills it after loading them (see `lb_common::PATH_PROGRAMS`).
#[map(name = "L3LB_PATHS")]
pub static PATHS: ProgramArray =
    ProgramArray::with_max_entries(lb_common::PATH_PROGRAMS.len() as u32, 0);
