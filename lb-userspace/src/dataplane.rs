//! The XDP program and its maps: loading, attaching, pinning, and writing desired state.
//!
//! This is the only module that writes maps. A service's Maglev table is never edited
//! while traffic uses it: each service owns two ring slots, the new table is written into
//! the idle one, and the VIP entries are then switched to it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    BACKEND_F_L2, BACKEND_F_LOCAL, Backend, BackendMeta, BackendStats, FAMILY_V4, FAMILY_V6,
    PROTO_IPIP, PROTO_IPV6, SERVICE_F_AFFINITY_CLIENT_IP, SERVICE_F_L2, SERVICE_F_SOURCE_RANGES,
    ServiceMeta, ServiceStats, SrcRangeV4, SrcRangeV6, VipInfo, VipKey, VipSlot, globals,
    map_names,
};
use thiserror::Error;

use crate::{
    flowtable::{Carried, FlowTable, FlowTableError},
    handover::{self, Carry, CarryPlan, PreviousIds},
    maglev,
    program_log::{XdpLogError, XdpLogLevel, XdpLogReader},
};

/// The XDP object built from lb-ebpf by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The system's page size: the unit of ring-buffer sizes.
fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// Marks an unused Maglev entry (a service with no backend that can take new flows).
pub const NO_BACKEND: u32 = u32::MAX;

/// Errors of the data-plane layer.
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// The object could not be loaded or verified.
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("{what}: {source}")]
    Program {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: aya::maps::MapError,
    },
    /// Pinning failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        source: aya::pin::PinError,
    },
    /// A map or program the object should contain is missing.
    #[error("the XDP object has no {0}")]
    Missing(String),
    /// More services or backends than the maps were sized for.
    #[error("{what} table is full ({max} entries): {knob}")]
    Full {
        /// Which table.
        what: &'static str,
        /// Its size.
        max: u32,
        /// What to do about it.
        knob: &'static str,
    },
    /// Taking over an earlier agent's state failed.
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    /// Reading or writing the connection table failed.
    #[error(transparent)]
    FlowTable(#[from] FlowTableError),
    /// The kernel gave no random bytes for the connection table's hash seed.
    #[error("reading random bytes for the connection table's hash seed: {0}")]
    Random(std::io::Error),
    /// A link operation (pin, replace, detach) failed.
    #[error("{what}: {source}")]
    Link {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A memory-mapped map is not the shape this agent writes (an object of another build).
    #[error(
        "{what} holds {found}, where this agent writes {expected}: the XDP object is not this build's"
    )]
    Shape {
        /// The map.
        what: &'static str,
        /// Its entries and value size.
        found: String,
        /// What the agent writes.
        expected: String,
    },
    /// An apply failed midway; `restored` tells what became of the previous state.
    #[error("{cause}; {restored}")]
    Aborted {
        /// What failed.
        cause: Box<DataplaneError>,
        /// Whether the previous state is back.
        restored: Restored,
    },
    /// A backend named by a caller is not in the applied state.
    #[error("service {service} has no backend {address}")]
    UnknownBackend {
        /// The service named.
        service: String,
        /// The backend address named.
        address: IpAddr,
    },
    /// Maglev could not build a table.
    #[error("service {service}: {source}")]
    Maglev {
        /// The service.
        service: String,
        /// The underlying error.
        source: maglev::MaglevError,
    },
}

/// What became of the previous state after a failed apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// It was applied again and is fully in force.
    Yes,
    /// There was none (the first apply failed): the maps hold what was written so far.
    NothingBefore,
    /// Applying it again failed too (the reason): the maps may be partly updated.
    Failed(String),
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restored::Yes => f.write_str("the previous state was restored and stays in force"),
            Restored::NothingBefore => f.write_str("there was no previous state to restore"),
            Restored::Failed(e) => write!(
                f,
                "restoring the previous state failed too ({e}); the maps may be partly updated"
            ),
        }
    }
}

/// Entries of each decap allow-list trie (as in lb-ebpf/src/maps.rs).
const DECAP_ENTRIES: usize = 1024;
/// Entries of each local-address map (as in lb-ebpf/src/maps.rs).
const LOCAL_ENTRIES: usize = 256;

/// The latest of the epochs `seen` (the clock wraps): the one followed by the widest gap
/// on the circle of u32 values, the stretch the clock has not been through.
fn latest_epoch(mut seen: Vec<u32>) -> Option<u32> {
    seen.sort_unstable();
    seen.dedup();
    let last = *seen.last()?;
    // From the last value round to the first, then between neighbours.
    let mut best = (seen[0].wrapping_sub(last), last);
    for w in seen.windows(2) {
        if w[1] - w[0] > best.0 {
            best = (w[1] - w[0], w[0]);
        }
    }
    Some(best.1)
}

/// Whether every byte of `v` is zero (a counter that never counted).
fn all_zero<V: aya::Pod>(v: &V) -> bool {
    // SAFETY: a Pod value read from a map: plain bytes, all of them initialised.
    unsafe { std::slice::from_raw_parts((v as *const V).cast::<u8>(), size_of::<V>()) }
        .iter()
        .all(|b| *b == 0)
}

/// The errno of a failed map system call, if that is what failed.
fn map_errno(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Map { what, source }
}

/// Load-time parameters: map sizes and the program's globals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Entries per Maglev table (prime).
    pub ring_size: u32,
    /// Services the maps can hold.
    pub max_services: u32,
    /// Backends the maps can hold.
    pub max_backends: u32,
    /// Connection-table entries: the table gets `flow_buckets(conntrack_size)` buckets of
    /// `FLOW_WAYS` entries (this many rounded up to a power of two, at least 1024).
    pub conntrack_size: u32,
    /// Source address of IPIP headers.
    pub encap_src_v4: Ipv4Addr,
    /// Source address of IPv6-in-IPv6 headers.
    pub encap_src_v6: Ipv6Addr,
    /// Whether the decap role is on.
    pub decap: bool,
    /// The program's debug logs (`AYA_LOG_LEVEL`); off unless the agent's filter names
    /// them (see [`crate::program_log`]).
    pub log_level: XdpLogLevel,
}

/// How a service forwards and hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceMode {
    /// MAC rewrite instead of IPIP.
    pub l2: bool,
    /// Hash on the client address only.
    pub affinity_client_ip: bool,
}

/// One backend of a desired service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBackend {
    /// Address the backend is reached at.
    pub address: IpAddr,
    /// Maglev weight; 0 takes no new flows.
    pub weight: u32,
    /// The backend is this node: pass to the local stack.
    pub local: bool,
}

/// One service as the maps should express it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// Unique name.
    pub name: String,
    /// (VIP, port or 0, protocol) entries.
    pub vips: Vec<(IpAddr, u16, u8)>,
    /// Forwarding and hashing mode.
    pub mode: ServiceMode,
    /// Backends in any order.
    pub backends: Vec<DesiredBackend>,
    /// Client networks allowed to use the service; empty means everyone.
    pub source_ranges: Vec<ipnet::IpNet>,
}

/// Everything the agent wants in the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Services by name.
    pub services: Vec<DesiredService>,
    /// IPv4 prefixes whose IPIP packets are decapsulated.
    pub decap_v4: Vec<(Ipv4Addr, u8)>,
    /// This node's IPv4 addresses: the outer destinations the decap role accepts.
    pub local_v4: Vec<Ipv4Addr>,
    /// IPv6 prefixes whose IPv6-in-IPv6 packets are decapsulated.
    pub decap_v6: Vec<(Ipv6Addr, u8)>,
    /// This node's IPv6 addresses.
    pub local_v6: Vec<Ipv6Addr>,
}

/// What an apply changed, for the one-line log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// Services that did not exist before.
    pub services_added: usize,
    /// Services whose VIPs, mode or table changed.
    pub services_updated: usize,
    /// Services removed.
    pub services_removed: usize,
    /// Backends (addresses) that got an id.
    pub backends_added: usize,
    /// Backends (addresses) released.
    pub backends_removed: usize,
    /// Maglev tables written (and switched to).
    pub tables_written: usize,
}

impl std::fmt::Display for ApplySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services +{} ~{} -{}, backends +{} -{}, maglev tables written {}",
            self.services_added,
            self.services_updated,
            self.services_removed,
            self.backends_added,
            self.backends_removed,
            self.tables_written
        )
    }
}

#[derive(Debug, Clone)]
struct ServiceState {
    id: u32,
    active_slot: u32,
    vips: Vec<VipKey>,
    info: VipInfo,
    /// Hash of the table last written (tables are large: 10 000 services × 65 537
    /// entries would be gigabytes to keep).
    table_hash: Option<u64>,
    source_ranges: Vec<ipnet::IpNet>,
}

/// Source ranges as the trie keys them: network addresses (host bits cleared), each once.
/// Two spellings of one range (`10.1.2.3/8`, `10.0.0.0/8`) are one trie entry, so the
/// bookkeeping of what was written must see them as one, or dropping either spelling
/// removes the entry the other still needs.
fn canonical_ranges(ranges: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = ranges.iter().map(ipnet::IpNet::trunc).collect();
    out.sort();
    out.dedup();
    out
}

#[derive(Debug, Clone)]
struct BackendState {
    id: u32,
    entry: Backend,
    /// What `L3LB_BE_META` holds for it (weight from the config, health from the checks).
    meta: BackendMeta,
}

/// A backend's health as health checks report it (what `l3lb status` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has run for it (the state after every apply that adds it).
    Unknown,
    /// The last check passed.
    Up,
    /// The last check failed.
    Down,
}

impl Health {
    /// The `HEALTH_*` value stored in `BackendMeta::health`.
    pub fn as_u8(self) -> u8 {
        match self {
            Health::Unknown => lb_common::HEALTH_UNKNOWN,
            Health::Up => lb_common::HEALTH_UP,
            Health::Down => lb_common::HEALTH_DOWN,
        }
    }

    /// The health a `BackendMeta::health` value stands for (unknown values read as unknown).
    pub fn from_u8(v: u8) -> Self {
        match v {
            lb_common::HEALTH_UP => Health::Up,
            lb_common::HEALTH_DOWN => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Stable lower-case name, used in `l3lb status` and its JSON.
    pub fn label(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// The `ServiceMeta` of a service called `name`: the name NUL-padded, cut at a character
/// boundary when longer than the field.
pub fn service_meta(name: &str) -> ServiceMeta {
    let mut meta = ServiceMeta::default();
    let mut end = name.len().min(lb_common::SERVICE_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    meta.name[..end].copy_from_slice(&name.as_bytes()[..end]);
    meta
}

/// The name a `ServiceMeta` holds; `None` for an empty (unwritten) entry.
pub fn service_name(meta: &ServiceMeta) -> Option<String> {
    let len = meta
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(meta.name.len());
    (len > 0).then(|| String::from_utf8_lossy(&meta.name[..len]).into_owned())
}

/// Hands out ids, reusing released ones last so a just-freed id is not reused at once.
#[derive(Debug)]
struct IdPool {
    next: u32,
    max: u32,
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(max: u32) -> Self {
        Self {
            next: 0,
            max,
            free: VecDeque::new(),
        }
    }
    fn take(&mut self) -> Option<u32> {
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }
    fn give(&mut self, id: u32) {
        self.free.push_back(id);
    }
    /// Takes the specific id `id` if it is still available.
    fn claim(&mut self, id: u32) -> bool {
        if id >= self.max {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            return true;
        }
        match self.free.iter().position(|&f| f == id) {
            Some(i) => {
                self.free.remove(i);
                true
            }
            None => false,
        }
    }
}

/// Writes into an array map through a memory mapping (the map is created with
/// `BPF_F_MMAPABLE`): plain stores instead of a system call per entry. Used for the Maglev
/// rings and the VIP index. Only the pages being written are mapped, and only while they
/// are written, so the agent's resident memory does not grow with the maps.
struct MmapArray {
    fd: std::os::fd::OwnedFd,
    entries: usize,
    /// Bytes between elements: the value size rounded up to 8, as array maps store them.
    stride: usize,
    page: usize,
    what: &'static str,
}

impl MmapArray {
    fn new(
        map: &Map,
        entries: usize,
        value_size: usize,
        what: &'static str,
    ) -> Result<Self, DataplaneError> {
        use std::os::fd::AsFd as _;
        let Map::Array(data) = map else {
            return Err(DataplaneError::Missing(what.into()));
        };
        // Another build's object may lay a map out otherwise (`bench --compare` loads
        // them): its words would be read as something else than they were written as.
        let info = data.info().map_err(|e| DataplaneError::Map {
            what: format!("reading the description of {what}"),
            source: e,
        })?;
        if info.value_size() as usize != value_size || (info.max_entries() as usize) < entries {
            return Err(DataplaneError::Shape {
                what,
                found: format!(
                    "{} entries of {} bytes",
                    info.max_entries(),
                    info.value_size()
                ),
                expected: format!("{entries} entries of {value_size} bytes"),
            });
        }
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DataplaneError::Map {
                what: format!("duplicating the descriptor of {what}"),
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }),
            })?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        Ok(Self {
            fd,
            entries,
            stride: value_size.div_ceil(8) * 8,
            page,
            what,
        })
    }

    /// Writes `values` at entries `start..`.
    fn write<T: Copy>(&mut self, start: usize, values: &[T]) -> Result<(), DataplaneError> {
        // SAFETY (the store): `write_with` hands over a place of `size_of::<T>()` bytes,
        // 8-aligned; volatile because the data plane reads the same memory concurrently.
        self.write_with(start, values, |p, v| unsafe {
            std::ptr::write_volatile(p.cast::<T>(), *v)
        })
    }

    /// Writes the tunnel pair table's buckets `values` at entries `start..`, a word at a
    /// time: each word is one aligned 8-byte store, so the program never reads half of a
    /// pair (a source with no destination would name another tunnel).
    fn write_words(&mut self, start: usize, values: &[[u64; 2]]) -> Result<(), DataplaneError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        self.write_with(start, values, |p, v| {
            for (i, w) in v.iter().enumerate() {
                // SAFETY: an 8-aligned word of the entry `write_with` hands over, which
                // this process reads or writes nowhere else.
                unsafe { AtomicU64::from_ptr(p.cast::<u64>().add(i)).store(*w, Ordering::Relaxed) };
            }
        })
    }

    /// Maps entries `start..start + values.len()` (those that exist) and hands each
    /// entry's place and value to `store`.
    fn write_with<T>(
        &mut self,
        start: usize,
        values: &[T],
        store: impl Fn(*mut u8, &T),
    ) -> Result<(), DataplaneError> {
        use std::os::fd::AsRawFd as _;
        debug_assert!(size_of::<T>() <= self.stride);
        let end = (start + values.len()).min(self.entries);
        if end <= start {
            return Ok(());
        }
        let first = start * self.stride / self.page * self.page;
        let len = (end * self.stride).div_ceil(self.page) * self.page - first;
        // SAFETY: a shared read-write mapping of part of the map; the kernel checks the
        // range against the map's size and the flags against how it was created.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                first as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DataplaneError::Map {
                what: format!("mapping {} into memory", self.what),
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: std::io::Error::last_os_error(),
                }),
            });
        }
        for (i, v) in values[..end - start].iter().enumerate() {
            let off = (start + i) * self.stride - first;
            // SAFETY: off + size_of::<T>() ≤ len by construction, and array elements are
            // 8-aligned.
            store(unsafe { base.cast::<u8>().add(off) }, v);
        }
        // What switches traffic to this data (a VIP entry, the index flag) must not be
        // seen before it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(base, len) };
        Ok(())
    }
}

/// A 64-bit digest of a VIP index image: equal digests are taken as equal tables (a
/// collision, odds 2⁻⁶⁴ per apply, would skip a needed rewrite until the next change).
fn slots_digest(slots: &[VipSlot]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    for s in slots {
        s.key.hash(&mut h);
        (s.service, s.flags, s.ring).hash(&mut h);
    }
    h.finish()
}

/// Whether the VIP entries of `vips` ((address, port, protocol) of every service, port 0
/// for all ports) and their addresses' markers fit the VIP index of a program loaded for
/// `max_services`; the error says why not. The config check asks it too, so that a config
/// `l3lb check` accepts does not fail when it is applied.
pub fn vip_index_fits(
    vips: impl IntoIterator<Item = (IpAddr, u16, u8)>,
    max_services: u32,
) -> Result<(), DataplaneError> {
    let mut wanted: BTreeSet<VipKey> = BTreeSet::new();
    for (addr, port, proto) in vips {
        let (addr, family) = addr_bytes(addr);
        wanted.insert(VipKey {
            addr,
            port: port.to_be(),
            proto,
            family,
        });
        wanted.insert(VipKey {
            addr,
            port: 0,
            proto: icmp_proto(family),
            family,
        });
    }
    let info = VipInfo::default();
    build_vip_index(
        wanted.iter().map(|k| (k, &info)),
        lb_common::vip_index_slots(max_services),
    )
    .map(drop)
}

/// Places VIP entries into one half of the VIP index (`slots` slots, a power of two) by
/// linear probing from `vip_index_hash`, as the data plane searches it.
///
/// Fails when the entries exceed half the slots or some key would sit more than
/// `VIP_INDEX_PROBES − 1` slots from its home (the data plane would not find it).
pub fn build_vip_index<'a>(
    entries: impl IntoIterator<Item = (&'a VipKey, &'a VipInfo)>,
    slots: u32,
) -> Result<Vec<VipSlot>, DataplaneError> {
    let full = || DataplaneError::Full {
        what: "VIP index slot",
        max: slots / 2,
        knob: "raise max_services in the config (the VIP index has room for 8 entries per \
               service it is sized for: one per port of each service, one per VIP address; \
               addresses that crowd one part of it fill it sooner)",
    };
    let mut table = vec![VipSlot::default(); slots as usize];
    let mask = slots.wrapping_sub(1);
    let mut used = 0u32;
    for (key, info) in entries {
        used += 1;
        if used > slots / 2 {
            return Err(full());
        }
        let home = lb_common::vip_index_hash(&key.words());
        let free = (0..lb_common::VIP_INDEX_PROBES)
            .map(|i| (home.wrapping_add(i) & mask) as usize)
            .find(|&i| table[i].key.family == 0)
            .ok_or_else(full)?;
        table[free] = VipSlot {
            key: *key,
            service: info.service,
            flags: info.flags,
            ring: info.ring,
        };
    }
    Ok(table)
}

/// The VIP address filter (`vip_filter_words(slots)` words) for the VIP index
/// entries `keys`: the bit `vip_filter_bit` names is set for the address of every VIP and
/// marker. The node's own addresses and decap sources are left out: the decap role looks
/// them up itself, before the filter is asked, so traffic to the node passes early too.
pub fn build_vip_filter<'a>(keys: impl IntoIterator<Item = &'a VipKey>, slots: u32) -> Vec<u32> {
    let mut words = vec![0u32; lb_common::vip_filter_words(slots) as usize];
    for key in keys {
        if key.family & (lb_common::VIP_INDEX_LOCAL | lb_common::VIP_INDEX_DECAP) != 0 {
            continue;
        }
        let w = key.words();
        let bit = lb_common::vip_filter_bit(&[w[0], w[1], w[2], w[3]], slots);
        words[(bit >> 5) as usize] |= 1 << (bit & 31);
    }
    words
}

/// How [`Dataplane::attach_pinned`] put the program on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// An earlier agent's pinned link now runs this program (no gap in forwarding).
    Replaced,
    /// A new attachment; `pinned` when it is a bpf_link kept across restarts.
    New {
        /// Whether the link could be pinned.
        pinned: bool,
    },
}

/// Which id pool [`Dataplane::new_id`] draws from.
#[derive(Clone, Copy)]
enum IdKind {
    Service,
    Backend,
}

/// A fixed-key hash of a Maglev table, to notice when it changed.
fn table_hash(table: &[u32]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    table.hash(&mut h);
    h.finish()
}

/// The loaded program and its maps, plus what the agent last wrote into them.
pub struct Dataplane {
    ebpf: Ebpf,
    rings: MmapArray,
    /// The VIP index (both halves) and the half the data plane reads.
    vip_index: MmapArray,
    /// The settings array, for writing the VIP address filter.
    settings_map: MmapArray,
    /// The decap role's tunnel pair table, and what it holds (`decap_pair_table`).
    decap_pairs: MmapArray,
    decap_pair_image: Vec<[u64; 2]>,
    /// Source-range entries written to the tries (service id, range), whether or not a
    /// service still lists them: the sweep after each index switch removes the rest, so
    /// a removed service's ranges never pass to the next service given its id.
    src_written: BTreeSet<(u32, ipnet::IpNet)>,
    vip_index_b: bool,
    /// A digest of what the active half holds, so an apply that changes no VIP entry
    /// writes nothing (the table itself is not kept: megabytes at 10 000 services).
    vip_index_digest: Option<u64>,
    /// The address filter as written (`SETTINGS_FILTER` on): a new index's addresses are
    /// added to it before the index is switched to, and the filter is narrowed to them
    /// only after.
    vip_filter: Vec<u32>,
    opts: LoadOptions,
    link: Option<XdpLinkId>,
    /// The attachment when it is a pinned bpf_link (kept across agent restarts).
    pinned_link: Option<PinnedLink>,
    /// State maps the program uses straight from an earlier agent's pins.
    reused: BTreeSet<&'static str>,
    /// Ids an earlier agent gave, offered to the first apply (see `adopt`).
    previous: Option<PreviousIds>,
    /// Ids reserved for services and backends of the first apply after a takeover.
    reserved_services: StdHashMap<String, u32>,
    reserved_backends: StdHashMap<(String, IpAddr), u32>,
    /// Whether the counters of reserved ids came along (then they are not reset).
    carried_stats: bool,
    /// The last state applied in full: what a failed apply restores.
    last_applied: Option<Desired>,
    /// A failed apply could not restore `last_applied` either: the maps hold neither
    /// state, and applying `last_applied` again writes (so it advances the epoch).
    unsettled: bool,
    services: BTreeMap<String, ServiceState>,
    backends: StdHashMap<(String, IpAddr), BackendState>,
    service_ids: IdPool,
    backend_ids: IdPool,
    decap_v4: Vec<(Ipv4Addr, u8)>,
    local_v4: Vec<Ipv4Addr>,
    decap_v6: Vec<(Ipv6Addr, u8)>,
    local_v6: Vec<Ipv6Addr>,
    markers: BTreeMap<VipKey, VipInfo>,
    /// The `SETTINGS_F_*` bits other than the index half last written (`None`: never).
    settings_flags: Option<u32>,
    nexthop_epoch: u32,
    /// A change to the maps whose epoch could not be named (`SETTINGS_CHANGED_EPOCH`):
    /// the next advance, even a tick's, names its own.
    change_unnamed: bool,
    /// The connection table's hash seed (the program's `FLOW_SEED`).
    flow_seed: u64,
    /// The devices listed in `L3LB_NO_XMIT` (only this agent writes its keys).
    no_xmit: BTreeSet<u32>,
    /// The VLAN devices listed in `L3LB_VLANS`.
    vlans: BTreeMap<u32, lb_common::VlanDev>,
}

/// The epoch's clock apart from its [`Dataplane`]: ticks it as the agent's half-second
/// tick does (no change named), from another thread.
pub struct EpochClock {
    settings: Array<MapData, u32>,
    global: Array<MapData, u32>,
    epoch: u32,
}

impl EpochClock {
    /// Advances the epoch by one tick, as `Dataplane::expire_next_hops` does, from the
    /// one the program reads (so a tick never takes it back, should the data plane have
    /// advanced it meanwhile).
    pub fn tick(&mut self) -> Result<(), DataplaneError> {
        let now = self
            .global
            .get(&0, 0)
            .map_err(map_err("epoch (the program's global)"))?;
        self.epoch = now.wrapping_add(1);
        self.settings
            .set(lb_common::SETTINGS_NEXTHOP_EPOCH, self.epoch, 0)
            .map_err(map_err("epoch (settings)"))?;
        self.global
            .set(0, self.epoch, 0)
            .map_err(map_err("epoch (the program's global)"))
    }

    /// The epoch it last wrote.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
}

/// A random connection-table hash seed, from the kernel's generator.
fn random_seed() -> Result<u64, DataplaneError> {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(DataplaneError::Random(std::io::Error::last_os_error()));
    }
    Ok(u64::from_ne_bytes(buf))
}

fn icmp_proto(family: u8) -> u8 {
    if family == FAMILY_V4 {
        lb_common::PROTO_ICMP
    } else {
        lb_common::PROTO_ICMPV6
    }
}

/// Converts an address to the 16-byte form used in keys, with its family tag.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The VIP index keys of the decap role in `desired` (this node's addresses, then the
/// host-exact allowed sources), and whether some allow entry is a wider prefix, which only
/// the LPM tries can match.
pub fn decap_index_keys(desired: &Desired) -> (Vec<VipKey>, bool) {
    let key = |addr: IpAddr, marker: u8, proto: u8| {
        let (addr, family) = addr_bytes(addr);
        VipKey {
            addr,
            port: 0,
            proto,
            family: family | marker,
        }
    };
    let local_v4 = desired
        .local_v4
        .iter()
        .map(|a| key(IpAddr::V4(*a), lb_common::VIP_INDEX_LOCAL, PROTO_IPIP));
    let local_v6 = desired
        .local_v6
        .iter()
        .map(|a| key(IpAddr::V6(*a), lb_common::VIP_INDEX_LOCAL, PROTO_IPV6));
    let allow_v4 = desired
        .decap_v4
        .iter()
        .filter(|(_, len)| *len == 32)
        .map(|(a, _)| key(IpAddr::V4(*a), lb_common::VIP_INDEX_DECAP, PROTO_IPIP));
    let allow_v6 = desired
        .decap_v6
        .iter()
        .filter(|(_, len)| *len == 128)
        .map(|(a, _)| key(IpAddr::V6(*a), lb_common::VIP_INDEX_DECAP, PROTO_IPV6));
    let mut keys: Vec<VipKey> = local_v4
        .chain(local_v6)
        .chain(allow_v4)
        .chain(allow_v6)
        .collect();
    // A repeated address would take two slots and make the image depend on list order.
    keys.sort_by_key(|k| (k.family, k.addr));
    keys.dedup();
    let prefixes =
        desired.decap_v4.iter().any(|e| e.1 < 32) || desired.decap_v6.iter().any(|e| e.1 < 128);
    (keys, prefixes)
}

/// Most IPv4 tunnels (this node's addresses × the host-exact allowed sources) the agent
/// places in the tunnel pair table: beyond that it places none (the program's two index
/// searches answer them all the same).
pub const DECAP_PAIRS_MAX: usize = 2048;

/// The tunnel pair table's word (`lb_common::decap_pair_word`) of the IPv4 tunnel from
/// `src` to `dst`: each address's bytes as the program loads them from the outer header.
pub fn tunnel_pair_word(src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
    lb_common::decap_pair_word(
        u32::from_ne_bytes(src.octets()),
        u32::from_ne_bytes(dst.octets()),
    )
}

/// What of the tunnel pair table `old` may stay while an apply moves it to `new`: each
/// word both hold in the same place; every other place empty. Written before the apply
/// changes anything the decap checks read, so a tunnel that goes is refused from then
/// on, and a tunnel that comes is not opened before the checks would allow it.
fn decap_pairs_kept(old: &[[u64; 2]], new: &[[u64; 2]]) -> Vec<[u64; 2]> {
    old.iter()
        .zip(new)
        .map(|(o, n)| [0, 1].map(|i| if o[i] == n[i] { o[i] } else { 0 }))
        .collect()
}

/// The tunnel pair table's contents for `desired` (`DECAP_PAIR_BUCKETS` buckets of two
/// words, 0 where free): one `decap_pair_word` per (node address, allowed host) in the
/// bucket `decap_pair_bucket` names, in address order; a pair whose bucket is full is left
/// out (the searches decide for it), and there are none when there are more than
/// [`DECAP_PAIRS_MAX`]. The same `desired` always gives the same table.
pub fn decap_pair_table(desired: &Desired) -> Vec<[u64; 2]> {
    let mut table = vec![[0u64; 2]; lb_common::DECAP_PAIR_BUCKETS as usize];
    let mut locals = desired.local_v4.clone();
    locals.sort();
    locals.dedup();
    let mut hosts: Vec<Ipv4Addr> = desired
        .decap_v4
        .iter()
        .filter(|(_, len)| *len == 32)
        .map(|(a, _)| *a)
        .collect();
    hosts.sort();
    hosts.dedup();
    if locals.len().saturating_mul(hosts.len()) > DECAP_PAIRS_MAX {
        return table;
    }
    for dst in &locals {
        for src in &hosts {
            let w = tunnel_pair_word(*src, *dst);
            let bucket = &mut table[lb_common::decap_pair_bucket(w) as usize];
            if let Some(free) = bucket.iter_mut().find(|p| **p == 0) {
                *free = w;
            }
        }
    }
    table
}

/// Inverse of [`addr_bytes`].
pub fn addr_from_bytes(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(bytes.into())
    }
}

/// The XDP program `name` of a loaded object.
fn xdp_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Missing(format!("program {name}")))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("the type of program {name}"),
            source,
        })
}

/// `xdp_program`, shared.
fn xdp_program_ref<'a>(ebpf: &'a aya::Ebpf, name: &str) -> Result<&'a Xdp, DataplaneError> {
    ebpf.program(name)
        .ok_or_else(|| DataplaneError::Missing(format!("program {name}")))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("the type of program {name}"),
            source,
        })
}

/// Loads (verifies) the XDP program `name` of `ebpf` into the kernel.
fn load_xdp(ebpf: &mut aya::Ebpf, name: &str) -> Result<(), DataplaneError> {
    let prog = xdp_program(ebpf, name)?;
    // The kernel abandons a long verification with EAGAIN when a signal arrives
    // meanwhile; like libbpf, try again a few times before giving up.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match prog.load() {
            Ok(()) => return Ok(()),
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < 5 => {}
            Err(source) => {
                return Err(DataplaneError::Program {
                    what: format!("verifying the XDP program {name}"),
                    source,
                });
            }
        }
    }
}

impl Dataplane {
    /// Loads and verifies the XDP programs (the entry point and those it tail-calls) with
    /// maps sized by `opts` (not attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        Self::load_carrying(opts, &CarryPlan::default())
    }

    /// Like [`Dataplane::load`], with the state maps that `plan` reuses taken from an
    /// earlier agent's pins (the others are created empty; see [`Dataplane::migrate`]).
    pub fn load_carrying(opts: &LoadOptions, plan: &CarryPlan) -> Result<Self, DataplaneError> {
        let dp = Self::load_object(OBJECT, opts, plan)?;
        // This build's program reads the epoch from its global (see `write_epoch`): were
        // the global missing, it would never see the epoch advance.
        if dp.ebpf.map(globals::BSS_MAP).is_none() {
            return Err(DataplaneError::Missing(format!(
                "map {} (the program's global {})",
                globals::BSS_MAP,
                globals::EPOCH
            )));
        }
        Ok(dp)
    }

    /// Like [`Dataplane::load_carrying`], from another build of lb-ebpf (the benchmark's
    /// and tests' object without the `log` feature).
    pub fn load_object(
        object: &[u8],
        opts: &LoadOptions,
        plan: &CarryPlan,
    ) -> Result<Self, DataplaneError> {
        let ring_entries = opts
            .max_services
            .checked_mul(2)
            .and_then(|n| n.checked_mul(opts.ring_size))
            .ok_or(DataplaneError::Full {
                what: "maglev ring",
                max: u32::MAX,
                knob: "raise max_services in the config",
            })?;
        let decap: u32 = opts.decap.into();
        let log_level = opts.log_level.as_u8();
        let ring_size = opts.ring_size;
        let index_size = lb_common::vip_index_slots(opts.max_services);
        let flow_buckets = lb_common::flow_buckets(opts.conntrack_size);
        // A connection table taken over as it is keeps the seed it was placed with; a
        // new one (or one re-placed entry by entry) gets a random seed.
        let flow_seed = match plan.maps.iter().find(|(n, _)| *n == map_names::FLOWS) {
            Some((_, Carry::Reuse(path))) => {
                let dir = path.parent().unwrap_or(path.as_path());
                handover::previous_flow_seed(dir).unwrap_or_else(|| {
                    tracing::warn!(
                        "cannot read the hash seed of the connection table at {}: its flows \
                         will be balanced afresh as their packets arrive",
                        path.display()
                    );
                    0
                })
            }
            _ => random_seed()?,
        };
        let src = opts.encap_src_v4.octets();
        let src6 = opts.encap_src_v6.octets();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::RING_SIZE, &ring_size, true)
            .override_global(globals::ENCAP_SRC_V4, &src, true)
            .override_global(globals::ENCAP_SRC_V6, &src6, true)
            .override_global(globals::DECAP_ENABLED, &decap, true)
            .override_global(globals::VIP_INDEX_SIZE, &index_size, true)
            .override_global(globals::FLOW_BUCKETS, &flow_buckets, true)
            .override_global(globals::FLOW_SEED, &flow_seed, true)
            // Absent from an object built without the `log` feature.
            .override_global(globals::AYA_LOG_LEVEL, &log_level, false);
        if opts.log_level == XdpLogLevel::Off {
            // Nothing is ever written to it: the smallest ring buffer the kernel takes.
            loader.map_max_entries(map_names::AYA_LOGS, page_size());
        }
        for (name, size) in handover::max_entries_overrides(opts) {
            loader.map_max_entries(name, size);
        }
        let mut reused = BTreeSet::new();
        for (name, carry) in &plan.maps {
            if let Carry::Reuse(path) = carry {
                // aya opens the pinned map instead of creating one.
                loader.map_pin_path(name, path.as_path());
                reused.insert(*name);
            }
        }
        let mut ebpf = loader.load(object)?;
        load_xdp(&mut ebpf, lb_common::PROGRAM_NAME)?;
        // The programs the entry point tail-calls, each verified on its own, then put in
        // their slots: the entry point is attached only after this, so no packet meets an
        // empty slot.
        for (name, slot) in lb_common::PATH_PROGRAMS {
            load_xdp(&mut ebpf, name)?;
            let fd = xdp_program(&mut ebpf, name)?
                .fd()
                .and_then(|fd| {
                    fd.try_clone().map_err(|io_error| {
                        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                            call: "dup",
                            io_error,
                        })
                    })
                })
                .map_err(|source| DataplaneError::Program {
                    what: format!("the descriptor of program {name}"),
                    source,
                })?;
            let map = ebpf
                .map_mut(map_names::PATHS)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::PATHS)))?;
            aya::maps::ProgramArray::try_from(map)
                .and_then(|mut paths| paths.set(slot, &fd, 0))
                .map_err(map_err(format!(
                    "putting program {name} in slot {slot} of {}",
                    map_names::PATHS
                )))?;
        }
        let rings = MmapArray::new(
            ebpf.map(map_names::RINGS)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::RINGS)))?,
            ring_entries as usize,
            size_of::<u32>(),
            "the Maglev rings",
        )?;
        let vip_index = MmapArray::new(
            ebpf.map(map_names::VIP_INDEX)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::VIP_INDEX)))?,
            2 * lb_common::vip_index_slots(opts.max_services) as usize,
            size_of::<VipSlot>(),
            "the VIP index",
        )?;
        let settings = MmapArray::new(
            ebpf.map(map_names::SETTINGS)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::SETTINGS)))?,
            lb_common::settings_len(lb_common::vip_index_slots(opts.max_services)) as usize,
            size_of::<u32>(),
            "the settings array",
        )?;
        let decap_pairs = MmapArray::new(
            ebpf.map(map_names::DECAP_PAIRS).ok_or_else(|| {
                DataplaneError::Missing(format!("map {}", map_names::DECAP_PAIRS))
            })?,
            lb_common::DECAP_PAIR_BUCKETS as usize,
            size_of::<[u64; 2]>(),
            "the tunnel pair table",
        )?;
        Ok(Self {
            ebpf,
            rings,
            vip_index,
            settings_map: settings,
            decap_pairs,
            decap_pair_image: vec![[0; 2]; lb_common::DECAP_PAIR_BUCKETS as usize],
            src_written: BTreeSet::new(),
            vip_index_b: false,
            vip_index_digest: None,
            vip_filter: vec![
                0;
                lb_common::vip_filter_words(lb_common::vip_index_slots(opts.max_services))
                    as usize
            ],
            opts: opts.clone(),
            link: None,
            pinned_link: None,
            reused,
            previous: None,
            reserved_services: StdHashMap::new(),
            reserved_backends: StdHashMap::new(),
            carried_stats: false,
            last_applied: None,
            unsettled: false,
            services: BTreeMap::new(),
            backends: StdHashMap::new(),
            service_ids: IdPool::new(opts.max_services),
            backend_ids: IdPool::new(opts.max_backends),
            decap_v4: Vec::new(),
            local_v4: Vec::new(),
            decap_v6: Vec::new(),
            local_v6: Vec::new(),
            markers: BTreeMap::new(),
            settings_flags: None,
            nexthop_epoch: 0,
            change_unnamed: false,
            flow_seed,
            no_xmit: BTreeSet::new(),
            vlans: BTreeMap::new(),
        })
        .and_then(|mut dp| {
            // The program's writable globals must be EPOCH alone, which the agent writes
            // whole (see `write_epoch`): another global there would be overwritten.
            if let Some(bss) = dp.ebpf.map_mut(globals::BSS_MAP) {
                Array::<_, u32>::try_from(bss).map_err(map_err(format!(
                    "the program's writable globals ({}): {} (a u32) alone",
                    globals::BSS_MAP,
                    globals::EPOCH
                )))?;
            }
            // For the next agent, which takes the table over with it.
            let mut settings = dp.array::<u32>(map_names::SETTINGS)?;
            settings
                .set(lb_common::SETTINGS_FLOW_SEED_LO, flow_seed as u32, 0)
                .map_err(map_err("writing the hash seed to the settings"))?;
            settings
                .set(
                    lb_common::SETTINGS_FLOW_SEED_HI,
                    (flow_seed >> 32) as u32,
                    0,
                )
                .map_err(map_err("writing the hash seed to the settings"))?;
            // For the next agent, which reads the service counters with it.
            settings
                .set(
                    lb_common::SETTINGS_SERVICE_COUNTS,
                    lb_common::SERVICE_COUNTS_RETIRED,
                    0,
                )
                .map_err(map_err("writing the service counters' format"))?;
            // For the next agent, which reuses the table only if it tags flows alike.
            settings
                .set(lb_common::SETTINGS_FLOW_TAGS, lb_common::FLOW_TAGS_BOUND, 0)
                .map_err(map_err("writing the connection table's tag format"))?;
            Ok(dp)
        })
    }

    /// The load-time parameters.
    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// The loaded program (for test runs and introspection).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        xdp_program_ref(&self.ebpf, lb_common::PROGRAM_NAME)
    }

    /// Starts reading the program's debug log records into `sink` (the ring buffer leaves
    /// the object: call once, after loading with a [`LoadOptions::log_level`] other than off).
    pub fn log_reader<L: log::Log>(&mut self, sink: L) -> Result<XdpLogReader<L>, XdpLogError> {
        XdpLogReader::new(&mut self.ebpf, sink)
    }

    /// Instructions of the data plane's programs (the entry point and those it tail-calls)
    /// as the kernel runs them (after the verifier removed dead code and rewrote helpers):
    /// the sum of `xlated_prog_len` / 8; `None` where the kernel hides it (it shows it to
    /// CAP_SYS_ADMIN only).
    pub fn xlated_instructions(&self) -> Result<Option<u32>, DataplaneError> {
        self.sum_over_programs(|info| info.size_translated().map(|bytes| bytes / 8))
    }

    /// Instructions the verifier processed for the data plane's programs, summed (each
    /// program's own count is what the kernel's complexity limit bounds).
    pub fn verified_instructions(&self) -> Result<Option<u32>, DataplaneError> {
        self.sum_over_programs(|info| info.verified_instruction_count())
    }

    fn sum_over_programs(
        &self,
        of: impl Fn(&aya::programs::ProgramInfo) -> Option<u32>,
    ) -> Result<Option<u32>, DataplaneError> {
        let names = std::iter::once(lb_common::PROGRAM_NAME)
            .chain(lb_common::PATH_PROGRAMS.iter().map(|(name, _)| *name));
        let mut total = 0;
        for name in names {
            let info = xdp_program_ref(&self.ebpf, name)?
                .info()
                .map_err(|source| DataplaneError::Program {
                    what: format!("the info of program {name}"),
                    source,
                })?;
            match of(&info) {
                Some(n) => total += n,
                None => return Ok(None),
            }
        }
        Ok(Some(total))
    }

    fn xdp_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, lb_common::PROGRAM_NAME)
    }

    /// Attaches to `interface` in `mode` (a plain attachment, not kept across restarts).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let link =
            self.xdp_mut()?
                .attach(interface, mode)
                .map_err(|source| DataplaneError::Program {
                    what: format!("attaching to {interface} in {mode:?} mode"),
                    source,
                })?;
        self.link = Some(link);
        Ok(())
    }

    /// Puts this program on `interface`, keeping the attachment across agent restarts:
    /// if an earlier agent left a pinned link there, the link is switched to this program
    /// in one step (`bpf_link_update`: no packet sees no program); otherwise the program
    /// is attached in `mode` and the link pinned in `pin_dir`.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: XdpMode,
        pin_dir: &Path,
    ) -> Result<Attached, DataplaneError> {
        let path = handover::link_pin(pin_dir, interface);
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| DataplaneError::Link {
                what: format!("opening the pinned link {}", path.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            let fd_link: FdLink = pinned.into();
            let link = XdpLink::try_from(fd_link).map_err(|e| DataplaneError::Link {
                what: format!("{} is not an XDP link", path.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            let id =
                self.xdp_mut()?
                    .attach_to_link(link)
                    .map_err(|source| DataplaneError::Program {
                        what: format!("switching the link on {interface} to the new program"),
                        source,
                    })?;
            // The program now holds the link's descriptor; the pin keeps the link
            // itself (and so the attachment) alive after this agent exits.
            self.link = Some(id);
            return Ok(Attached::Replaced);
        }
        let id =
            self.xdp_mut()?
                .attach(interface, mode)
                .map_err(|source| DataplaneError::Program {
                    what: format!("attaching to {interface} in {mode:?} mode"),
                    source,
                })?;
        let link = self
            .xdp_mut()?
            .take_link(id)
            .map_err(|source| DataplaneError::Program {
                what: "taking the new link".into(),
                source,
            })?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                std::fs::create_dir_all(pin_dir).map_err(|source| DataplaneError::Link {
                    what: format!("creating {}", pin_dir.display()),
                    source,
                })?;
                let pinned = fd_link.pin(&path).map_err(|e| DataplaneError::Link {
                    what: format!("pinning the link at {}", path.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
                self.pinned_link = Some(pinned);
                Ok(Attached::New { pinned: true })
            }
            // Netlink attachment (no bpf_link for XDP in this kernel): it cannot be
            // pinned and ends with this agent.
            Err(e) => {
                tracing::debug!("XDP link not pinnable: {e}");
                Ok(Attached::New { pinned: false })
            }
        }
    }

    /// Detaches from the interface, if attached by [`Dataplane::attach`].
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(link) = self.link.take() {
            self.xdp_mut()?
                .detach(link)
                .map_err(|source| DataplaneError::Program {
                    what: "detaching".into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Pins the program and every map under `dir` (`dir/prog`, `dir/maps/NAME`),
    /// replacing an earlier agent's pins; maps taken over from their pins stay as they are.
    pub fn pin(&mut self, dir: &Path) -> Result<(), DataplaneError> {
        let maps_dir = dir.join("maps");
        let pin_io = |path: &Path, call: &'static str, e: std::io::Error| DataplaneError::Pin {
            path: path.to_owned(),
            source: aya::pin::PinError::SyscallError(aya::sys::SyscallError { call, io_error: e }),
        };
        std::fs::create_dir_all(&maps_dir).map_err(|e| pin_io(&maps_dir, "mkdir", e))?;
        // Internal maps (.rodata, .bss) hold the program's globals, which the next agent
        // does not take over (its own program has its own; the epoch goes on from the
        // settings entry); bpffs refuses dot names.
        // The benchmark's maps live in the same object but are no part of the agent's state;
        // nor are the log ring buffer and notes (each program has its own; see `program_log`).
        for (name, map) in self.ebpf.maps().filter(|(n, _)| {
            !n.starts_with('.')
                && !n.starts_with("L3LB_BENCH")
                && *n != map_names::AYA_LOGS
                && *n != map_names::LOG_NOTE
        }) {
            if self.reused.contains(name) {
                continue;
            }
            let path = maps_dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| pin_io(&path, "unlink", e))?;
            }
            map.pin(&path)
                .map_err(|source| DataplaneError::Pin { path, source })?;
        }
        let path = dir.join("prog");
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| pin_io(&path, "unlink", e))?;
        }
        self.xdp_mut()?
            .pin(&path)
            .map_err(|source| DataplaneError::Pin { path, source })?;
        Ok(())
    }

    /// Fills the state maps that `plan` migrates (same layout, other size; service
    /// counters of an earlier format; or the previous release's connection table) from
    /// the earlier agent's pinned maps; returns for each map what was offered and kept.
    pub fn migrate(
        &mut self,
        plan: &CarryPlan,
    ) -> Result<Vec<(&'static str, Carried)>, DataplaneError> {
        let mut done = Vec::new();
        for (name, carry) in &plan.maps {
            let path = match carry {
                Carry::Migrate(path) | Carry::Convert(path) | Carry::Retag(path) => path,
                Carry::Fresh | Carry::Reuse(_) => continue,
            };
            let old =
                MapData::from_pin(path).map_err(map_err(format!("opening {}", path.display())))?;
            let n = match (*name, carry) {
                (map_names::FLOWS, Carry::Convert(path)) => {
                    if crate::handover::pinned_shape(path)?.is_legacy_flows() {
                        self.convert_lru_flows(old)?
                    } else {
                        self.convert_wide_flows(&old, path)?
                    }
                }
                (map_names::FLOWS, _) => {
                    // With the seed and, where its settings say it holds this build's
                    // tags, checked reads (see `FlowTable::verified`).
                    let old = FlowTable::from_pin(path)?;
                    self.replace_flows(&old)?
                }
                (map_names::FRAGS, _) => {
                    self.copy_hash::<lb_common::FragKey, VipInfo>(name, Map::LruHashMap(old))?
                }
                (map_names::SERVICE_STATS, _) => self.copy_per_cpu::<ServiceStats>(name, old)?,
                (map_names::BACKEND_STATS, _) => self.copy_per_cpu::<BackendStats>(name, old)?,
                _ => self.copy_per_cpu::<u64>(name, old)?,
            };
            done.push((*name, n));
        }
        if done.iter().any(|(name, _)| *name == map_names::FLOWS) {
            // Placed entries keep the epoch they were seen in, or (converted from a table
            // that kept none) take this one: a change, so that each is checked against
            // this program's maps before it decides alone (see `write_epoch`).
            self.advance_epoch()?;
        }
        Ok(done)
    }

    /// Copies the earlier agent's connection and fragment tables into this program's
    /// again where `plan` migrates them (entries of a key already copied are replaced):
    /// for an agent that attaches later than it loads (the Kubernetes agent waits for
    /// the API server's state), while the earlier program kept forwarding and recording
    /// flows in its own tables.
    pub fn migrate_again(
        &mut self,
        plan: &CarryPlan,
    ) -> Result<Vec<(&'static str, Carried)>, DataplaneError> {
        let tables = CarryPlan {
            maps: plan
                .maps
                .iter()
                .filter(|(n, _)| *n == map_names::FLOWS || *n == map_names::FRAGS)
                .cloned()
                .collect(),
        };
        self.migrate(&tables)
    }

    /// Places every live entry of `old` (a connection table of another size) into this
    /// program's table as the data plane would, keeping its epoch and flags; returns the
    /// flows offered and kept. Where more of them share a new bucket than it has ways,
    /// the unconfirmed and then the least recently seen give way, as in the data plane.
    fn replace_flows(&mut self, old: &FlowTable) -> Result<Carried, DataplaneError> {
        let entries = old.entries()?;
        Ok(self.flow_table()?.place_all(entries, self.nexthop_epoch)?)
    }

    /// Places the entries of the previous release's connection table (an LRU hash of
    /// `FlowKey` → `FlowState`) into this program's table, as confirmed flows seen now
    /// (that table kept no age); returns the flows offered and kept.
    fn convert_lru_flows(&mut self, old: MapData) -> Result<Carried, DataplaneError> {
        let what = "the previous release's connection table";
        let old: HashMap<MapData, lb_common::FlowKey, lb_common::FlowState> =
            HashMap::try_from(Map::LruHashMap(old)).map_err(map_err(what))?;
        let now = self.nexthop_epoch;
        // Entries evicted by the running program under the walk are skipped.
        let entries: Vec<lb_common::FlowEntry> = old
            .iter()
            .filter_map(Result::ok)
            .map(|(key, state)| lb_common::FlowEntry {
                key,
                state,
                seen: now,
                flags: lb_common::FLOW_F_CONFIRMED,
            })
            .collect();
        Ok(self.flow_table()?.place_all(entries, now)?)
    }

    /// Places the entries of a connection table of the builds before tagged ways (buckets
    /// of whole entries) into this program's table, keeping their epoch and flags;
    /// returns the flows offered and kept.
    fn convert_wide_flows(
        &mut self,
        old: &MapData,
        path: &Path,
    ) -> Result<Carried, DataplaneError> {
        let entries = crate::flowtable::wide_table_entries(old, &path.display().to_string())?;
        Ok(self.flow_table()?.place_all(entries, self.nexthop_epoch)?)
    }

    /// The program's connection table (`L3LB_FLOWS`), for reading and placing entries.
    pub fn flow_table(&self) -> Result<FlowTable, DataplaneError> {
        let map = self
            .ebpf
            .map(map_names::FLOWS)
            .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::FLOWS)))?;
        Ok(FlowTable::from_map(map, map_names::FLOWS)?
            .with_seed(self.flow_seed)
            .verified())
    }

    /// The epoch the data plane reads (its global `EPOCH`): the connection table's clock
    /// (entries record the epoch they were last seen in).
    pub fn epoch(&self) -> u32 {
        self.nexthop_epoch
    }

    /// Continues the epoch from `epoch` (an earlier agent's, read from its pins), so the
    /// ages of the connection-table entries it left keep their meaning.
    pub fn resume_epoch(&mut self, epoch: u32) -> Result<(), DataplaneError> {
        self.nexthop_epoch = epoch;
        // As a change: entries seen before it are checked again. Those seen in it, by the
        // earlier program, are trusted as they were (its VIPs are this program's once its
        // first apply, which names a change of its own, is written before it attaches).
        self.write_epoch(epoch, true)
    }

    /// Continues the epoch past every connection-table entry's last-seen epoch, for a
    /// table carried over from an agent whose own epoch could not be read: restarted at
    /// 0, the clock would make carried entries look older than they are, and, once it
    /// reached their epoch, trusted again without their VIP lookup (see
    /// `conntrack::current` in lb-ebpf), however the maps changed meanwhile. Returns the
    /// epoch it continues from.
    pub fn resume_epoch_past_table(&mut self) -> Result<u32, DataplaneError> {
        let seen = self
            .flow_table()?
            .entries()?
            .iter()
            .map(|e| e.seen)
            .collect();
        let epoch = latest_epoch(seen).map_or(self.nexthop_epoch, |e| e.wrapping_add(1));
        self.resume_epoch(epoch)?;
        Ok(epoch)
    }

    /// Writes `epoch` where the program reads it (its global `EPOCH`, the whole of its
    /// `.bss` map) and where the next agent finds it (`SETTINGS[SETTINGS_NEXTHOP_EPOCH]`);
    /// first, for a `change` (or after one whose epoch could not be named), names it the
    /// first epoch after the last change to the maps (`SETTINGS[SETTINGS_CHANGED_EPOCH]`):
    /// the program, which reads the epoch before that entry, never pairs an epoch this
    /// starts with the change before it.
    fn write_epoch(&mut self, epoch: u32, change: bool) -> Result<(), DataplaneError> {
        // The next epoch may have been named already (`name_change`); naming it again
        // right before it starts costs a write and covers a naming that failed since.
        if change || self.change_unnamed {
            self.change_unnamed = true;
            self.name_change(epoch)?;
            self.change_unnamed = false;
        }
        self.array::<u32>(map_names::SETTINGS)?
            .set(lb_common::SETTINGS_NEXTHOP_EPOCH, epoch, 0)
            .map_err(map_err("epoch (settings)"))?;
        // An object without writable globals is an earlier build (`bench --compare`
        // loads them), whose program reads the settings entry.
        if self.ebpf.map(globals::BSS_MAP).is_none() {
            return Ok(());
        }
        self.array::<u32>(globals::BSS_MAP)?
            .set(0, epoch, 0)
            .map_err(map_err("epoch (the program's global)"))
    }

    /// Names `epoch` the first after the last change to the maps
    /// (`SETTINGS[SETTINGS_CHANGED_EPOCH]`, see `write_epoch`).
    fn name_change(&mut self, epoch: u32) -> Result<(), DataplaneError> {
        self.array::<u32>(map_names::SETTINGS)?
            .set(lb_common::SETTINGS_CHANGED_EPOCH, epoch, 0)
            .map_err(map_err("naming the epoch of a change (settings)"))
    }

    /// A second handle on the epoch's two places, for ticking the clock from another
    /// thread while this one drives the program (the benchmark's throughput run, which
    /// has no agent but should see the agent's ticks). Take the clock's epoch back with
    /// [`Dataplane::adopt_epoch`] before this one ticks or changes anything again.
    pub fn epoch_clock(&self) -> Result<EpochClock, DataplaneError> {
        let open = |name: &'static str| -> Result<Array<MapData, u32>, DataplaneError> {
            let id = match self.ebpf.map(name) {
                Some(Map::Array(m)) => m.info().map_err(map_err(name))?.id(),
                _ => return Err(DataplaneError::Missing(format!("array map {name}"))),
            };
            let data = MapData::from_id(id).map_err(map_err(name))?;
            Array::try_from(Map::Array(data)).map_err(map_err(name))
        };
        Ok(EpochClock {
            settings: open(map_names::SETTINGS)?,
            global: open(globals::BSS_MAP)?,
            epoch: self.nexthop_epoch,
        })
    }

    /// Continues from the epoch `clock` reached (see [`Dataplane::epoch_clock`]).
    pub fn adopt_epoch(&mut self, clock: &EpochClock) {
        self.nexthop_epoch = clock.epoch;
    }

    fn copy_hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        old: Map,
    ) -> Result<Carried, DataplaneError> {
        let old: HashMap<MapData, K, V> = HashMap::try_from(old).map_err(map_err(name))?;
        let mut new: HashMap<&mut MapData, K, V> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let mut carried = Carried::default();
        // Entries that vanish meanwhile (evicted by the running program) are skipped; one
        // that cannot be written is counted as offered and not kept.
        for (k, v) in old.iter().flatten() {
            carried.offered += 1;
            if new.insert(k, v, 0).is_ok() {
                carried.kept += 1;
            }
        }
        Ok(carried)
    }

    fn copy_per_cpu<V: aya::Pod>(
        &mut self,
        name: &'static str,
        old: MapData,
    ) -> Result<Carried, DataplaneError> {
        let old: PerCpuArray<MapData, V> =
            PerCpuArray::try_from(Map::PerCpuArray(old)).map_err(map_err(name))?;
        let mut new: PerCpuArray<&mut MapData, V> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let n = old.len().min(new.len());
        for i in 0..n {
            let v = old.get(&i, 0).map_err(map_err(format!("{name}[{i}]")))?;
            new.set(i, v, 0).map_err(map_err(format!("{name}[{i}]")))?;
        }
        // Counters of ids the new map has no room for are offered and not kept, those
        // that counted anything (a smaller map's unused ids lose nothing).
        let mut beyond = 0;
        for i in n..old.len() {
            let v = old.get(&i, 0).map_err(map_err(format!("{name}[{i}]")))?;
            if v.iter().any(|c| !all_zero(c)) {
                beyond += 1;
            }
        }
        Ok(Carried {
            offered: n as usize + beyond,
            kept: n as usize,
        })
    }

    /// Offers the ids an earlier agent used to the next apply: a service whose VIPs and a
    /// backend whose (service, address) were known before get the same id again, so the
    /// connection table (which stores ids) keeps pointing at the right backends.
    /// `stats_carried` says whether the counters behind those ids came along.
    ///
    /// Counters an agent before `SERVICE_COUNTS_RETIRED` left (its program counted every
    /// packet of a service in `ServiceStats` as well as for its backend) are converted:
    /// each service keeps, as its removed backends' share, its total less what its
    /// backends still hold, so its total reads the same afterwards.
    pub fn adopt(
        &mut self,
        previous: PreviousIds,
        stats_carried: bool,
    ) -> Result<(), DataplaneError> {
        if stats_carried && previous.service_counts != lb_common::SERVICE_COUNTS_RETIRED {
            let mut of_service: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for &service in previous.vips.values() {
                of_service.entry(service).or_default();
            }
            for (&(service, _), &backend) in &previous.backends {
                of_service.entry(service).or_default().push(backend);
            }
            for (service, backends) in of_service {
                self.keep_removed_share(service, &backends)?;
            }
        }
        self.previous = Some(previous);
        self.carried_stats = stats_carried;
        Ok(())
    }

    /// Rewrites service `service`'s packet and byte counters (counted for every packet,
    /// by an earlier build) as its removed backends' share: the total less what
    /// `backends` hold, on the first CPU's copy; new flows stay as they are.
    fn keep_removed_share(&mut self, service: u32, backends: &[u32]) -> Result<(), DataplaneError> {
        let (mut live_packets, mut live_bytes) = (0u64, 0u64);
        for &b in backends {
            for v in self
                .per_cpu::<BackendStats>(map_names::BACKEND_STATS, b)?
                .iter()
            {
                live_packets = live_packets.saturating_add(v.packets);
                live_bytes = live_bytes.saturating_add(v.bytes);
            }
        }
        let mut values: Vec<ServiceStats> = self
            .per_cpu::<ServiceStats>(map_names::SERVICE_STATS, service)?
            .iter()
            .copied()
            .collect();
        let total_packets: u64 = values.iter().map(|v| v.packets).sum();
        let total_bytes: u64 = values.iter().map(|v| v.bytes).sum();
        for (i, v) in values.iter_mut().enumerate() {
            (v.packets, v.bytes) = if i == 0 {
                (
                    total_packets.saturating_sub(live_packets),
                    total_bytes.saturating_sub(live_bytes),
                )
            } else {
                (0, 0)
            };
        }
        self.set_per_cpu(map_names::SERVICE_STATS, service, values)
    }

    /// Adds backend `backend`'s packet and byte counters to the removed backends' share
    /// of service `service` (see `ServiceStats`), CPU by CPU, and zeroes them.
    fn fold_backend_counts(&mut self, backend: u32, service: u32) -> Result<(), DataplaneError> {
        let gone = self.per_cpu::<BackendStats>(map_names::BACKEND_STATS, backend)?;
        let mut values: Vec<ServiceStats> = self
            .per_cpu::<ServiceStats>(map_names::SERVICE_STATS, service)?
            .iter()
            .copied()
            .collect();
        for (v, b) in values.iter_mut().zip(gone.iter()) {
            v.packets = v.packets.saturating_add(b.packets);
            v.bytes = v.bytes.saturating_add(b.bytes);
        }
        self.set_per_cpu(map_names::SERVICE_STATS, service, values)?;
        self.zero_per_cpu::<BackendStats>(map_names::BACKEND_STATS, backend)
    }

    /// Every CPU's copy of entry `index` of the per-CPU array `name`.
    fn per_cpu<V: aya::Pod>(
        &mut self,
        name: &'static str,
        index: u32,
    ) -> Result<PerCpuValues<V>, DataplaneError> {
        let map: PerCpuArray<&mut MapData, V> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.get(&index, 0)
            .map_err(map_err(format!("reading {name}[{index}]")))
    }

    /// Writes every CPU's copy of entry `index` of the per-CPU array `name`.
    fn set_per_cpu<V: aya::Pod>(
        &mut self,
        name: &'static str,
        index: u32,
        values: Vec<V>,
    ) -> Result<(), DataplaneError> {
        let values = PerCpuValues::try_from(values).map_err(|e| DataplaneError::Map {
            what: format!("{name}[{index}] values"),
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "alloc",
                io_error: e,
            }),
        })?;
        let mut map: PerCpuArray<&mut MapData, V> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        map.set(index, values, 0)
            .map_err(map_err(format!("writing {name}[{index}]")))
    }

    /// The id of a new service or backend: the one an earlier agent gave it (`reserved`;
    /// its counters continue when they came along), else a fresh one; counters that did
    /// not come along start at zero.
    fn new_id(&mut self, kind: IdKind, reserved: Option<u32>) -> Result<u32, DataplaneError> {
        let id = match reserved {
            Some(id) => id,
            None => {
                let (pool, what, max, knob) = match kind {
                    IdKind::Service => (
                        &mut self.service_ids,
                        "service",
                        self.opts.max_services,
                        "raise max_services in the config",
                    ),
                    IdKind::Backend => (
                        &mut self.backend_ids,
                        "backend",
                        self.opts.max_backends,
                        "raise max_backends in the config",
                    ),
                };
                pool.take()
                    .ok_or(DataplaneError::Full { what, max, knob })?
            }
        };
        if reserved.is_none() || !self.carried_stats {
            match kind {
                IdKind::Service => {
                    self.zero_per_cpu::<ServiceStats>(map_names::SERVICE_STATS, id)?
                }
                IdKind::Backend => {
                    self.zero_per_cpu::<BackendStats>(map_names::BACKEND_STATS, id)?
                }
            }
        }
        Ok(id)
    }

    /// Reserves the previous ids of `desired`'s services and backends (first apply with
    /// services after `adopt` only).
    fn reserve_previous_ids(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        // An apply without services (a Kubernetes agent's first, before the API server has
        // been listed) leaves them to the first that has some: taken here, they would be
        // lost, and that apply would number services and backends afresh.
        if desired.services.is_empty() {
            return Ok(());
        }
        let Some(prev) = self.previous.take() else {
            return Ok(());
        };
        for svc in &desired.services {
            if self.services.contains_key(&svc.name) {
                continue;
            }
            let old = svc.vips.iter().find_map(|&(addr, port, proto)| {
                let (addr, family) = addr_bytes(addr);
                prev.vips.get(&VipKey {
                    addr,
                    port: port.to_be(),
                    proto,
                    family,
                })
            });
            let Some(&old) = old else { continue };
            if !self.service_ids.claim(old) {
                continue;
            }
            self.reserved_services.insert(svc.name.clone(), old);
            for b in &svc.backends {
                if let Some(&id) = prev.backends.get(&(old, b.address))
                    && self.backend_ids.claim(id)
                {
                    self.reserved_backends
                        .insert((svc.name.clone(), b.address), id);
                }
            }
        }
        // The earlier agent's backends that this config drops leave their packets in
        // their service's total, as a removal by apply does (services that go take
        // their counters with them).
        if self.carried_stats {
            let kept_services: BTreeSet<u32> = self.reserved_services.values().copied().collect();
            let kept_backends: BTreeSet<u32> = self.reserved_backends.values().copied().collect();
            for (&(service, _), &id) in &prev.backends {
                if kept_services.contains(&service) && !kept_backends.contains(&id) {
                    self.fold_backend_counts(id, service)?;
                }
            }
        }
        Ok(())
    }

    /// One half of the VIP index holding every entry of the VIP map as it now stands
    /// (the services' VIPs and the address markers), followed by `decap` keys.
    fn vip_index_entries_image(&self, decap: &[VipKey]) -> Result<Vec<VipSlot>, DataplaneError> {
        let none = VipInfo::default();
        // In key order, as `vip_index_fits` places them: linear probing with a bounded
        // distance fits or not depending on the order, and what the check (and `l3lb
        // check`) found placeable must be placed the same way here.
        let mut entries: Vec<(&VipKey, &VipInfo)> = self
            .services
            .values()
            .flat_map(|s| s.vips.iter().map(move |k| (k, &s.info)))
            .chain(self.markers.iter())
            .collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        build_vip_index(
            entries.into_iter().chain(decap.iter().map(|k| (k, &none))),
            lb_common::vip_index_slots(self.opts.max_services),
        )
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| DataplaneError::Missing(format!("map {name}")))
    }

    fn vips(&mut self) -> Result<HashMap<&mut MapData, VipKey, VipInfo>, DataplaneError> {
        HashMap::try_from(self.map_mut(map_names::VIPS)?).map_err(map_err("VIP map"))
    }

    fn array<V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<Array<&mut MapData, V>, DataplaneError> {
        Array::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    /// Zeroes every CPU's copy of entry `index` of the per-CPU array `name`.
    fn zero_per_cpu<V: aya::Pod + Default>(
        &mut self,
        name: &'static str,
        index: u32,
    ) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            what: "counting CPUs".into(),
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        self.set_per_cpu(name, index, vec![V::default(); cpus])
    }

    /// Makes the maps express `desired`, writing only what differs from the last apply.
    ///
    /// All or nothing: what would not fit (ids, VIP entries, source ranges, allow lists)
    /// is refused before anything is written; an update that fails midway anyway is
    /// undone by applying the previous state again, and the error says so.
    ///
    /// Unless `desired` is what the last apply wrote (then nothing changes), the epoch
    /// advances afterwards, whatever was written: connection-table entries the data plane
    /// checked against the maps before the change are checked again, and what its
    /// next-hop cache learnt of backends is learnt again (see `lb_common::FlowWay::seen`).
    /// Removing backends advances it once more, right after their entries are cleared.
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplySummary, DataplaneError> {
        self.check_capacity(desired)?;
        if !self.unsettled && self.last_applied.as_ref() == Some(desired) {
            return self.apply_written(desired);
        }
        // Named before anything is written (and again with the advance): the program
        // trusts no entry seen before the epoch it names, not even one seen while the
        // maps are half written, and a CPU that reads the new epoch has long seen the name
        // (the two are separate loads, which not every architecture keeps in order).
        self.name_change(self.nexthop_epoch.wrapping_add(1))?;
        let applied = self.apply_written(desired);
        if let Err(e) = self.advance_epoch() {
            // The maps hold what `applied` says; until an advance succeeds (the agent's
            // next tick tries again) entries checked before the change may still skip
            // their VIP lookup, and known flows still go to tunnelled backends as the
            // next-hop cache learnt them (at most 65 536 packets per backend and CPU).
            tracing::warn!(error = %e, "could not advance the epoch after writing the maps");
        }
        applied
    }

    /// `apply` without the epoch's advance.
    fn apply_written(&mut self, desired: &Desired) -> Result<ApplySummary, DataplaneError> {
        match self.apply_inner(desired) {
            Ok(sum) => {
                self.last_applied = Some(desired.clone());
                self.unsettled = false;
                Ok(sum)
            }
            Err(cause) => {
                let restored = match self.last_applied.clone() {
                    Some(previous) => match self.apply_inner(&previous) {
                        Ok(_) => Restored::Yes,
                        Err(e) => {
                            self.unsettled = true;
                            Restored::Failed(e.to_string())
                        }
                    },
                    None => Restored::NothingBefore,
                };
                Err(DataplaneError::Aborted {
                    cause: Box::new(cause),
                    restored,
                })
            }
        }
    }

    /// Refuses `desired` if applying it would overflow a map. Entries being replaced
    /// count twice: new ones go in before old ones leave, so traffic never meets a gap.
    fn check_capacity(&self, desired: &Desired) -> Result<(), DataplaneError> {
        let new_services = desired
            .services
            .iter()
            .filter(|s| !self.services.contains_key(&s.name))
            .count();
        if self.services.len() + new_services > self.opts.max_services as usize {
            return Err(DataplaneError::Full {
                what: "service",
                max: self.opts.max_services,
                knob: "raise max_services in the config (while an apply replaces services, the old and the new ones are held together)",
            });
        }
        let new_backends: std::collections::HashSet<(&str, IpAddr)> = desired
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| (s.name.as_str(), b.address)))
            .filter(|(n, a)| !self.backends.contains_key(&(n.to_string(), *a)))
            .collect();
        if self.backends.len() + new_backends.len() > self.opts.max_backends as usize {
            return Err(DataplaneError::Full {
                what: "backend",
                max: self.opts.max_backends,
                knob: "raise max_backends in the config (while an apply replaces backends, the old and the new ones are held together)",
            });
        }
        // VIP map: current keys and markers plus every new one.
        let mut keys: std::collections::HashSet<VipKey> = self
            .services
            .values()
            .flat_map(|s| s.vips.iter().copied())
            .chain(self.markers.keys().copied())
            .collect();
        for svc in &desired.services {
            for &(addr, port, proto) in &svc.vips {
                let (addr, family) = addr_bytes(addr);
                keys.insert(VipKey {
                    addr,
                    port: port.to_be(),
                    proto,
                    family,
                });
                keys.insert(VipKey {
                    addr,
                    port: 0,
                    proto: icmp_proto(family),
                    family,
                });
            }
        }
        let vip_capacity = handover::max_entries_overrides(&self.opts)
            .into_iter()
            .find(|(n, _)| *n == map_names::VIPS)
            .map_or(u32::MAX, |(_, v)| v);
        if keys.len() > vip_capacity as usize {
            return Err(DataplaneError::Full {
                what: "VIP",
                max: vip_capacity,
                knob: "raise max_services in the config",
            });
        }
        // The VIP index holds the entries of `desired` alone (the data plane switches to
        // them at once): they must all be placeable.
        vip_index_fits(
            desired.services.iter().flat_map(|s| s.vips.iter().copied()),
            self.opts.max_services,
        )?;
        // Source-range tries, per family: entries now plus those this apply adds.
        let (mut v4, mut v6) = (0usize, 0usize);
        let mut count = |r: &ipnet::IpNet| match r {
            ipnet::IpNet::V4(_) => v4 += 1,
            ipnet::IpNet::V6(_) => v6 += 1,
        };
        for state in self.services.values() {
            state.source_ranges.iter().for_each(&mut count);
        }
        for svc in &desired.services {
            let known = self.services.get(&svc.name).map(|s| &s.source_ranges);
            canonical_ranges(&svc.source_ranges)
                .iter()
                .filter(|r| known.is_none_or(|k| !k.contains(r)))
                .for_each(&mut count);
        }
        let trie = crate::config::MAX_SOURCE_RANGES;
        if v4 > trie || v6 > trie {
            return Err(DataplaneError::Full {
                what: "source range",
                max: trie as u32,
                knob: "list fewer source ranges in total",
            });
        }
        // New entries go in before old ones leave (see `sync_trie`, `sync_set`): both are
        // held at once.
        fn held<T: PartialEq>(old: &[T], new: &[T]) -> usize {
            new.len() + old.iter().filter(|o| !new.contains(o)).count()
        }
        for (what, n, max) in [
            (
                "IPv4 decap allow list",
                held(&self.decap_v4, &desired.decap_v4),
                DECAP_ENTRIES,
            ),
            (
                "IPv6 decap allow list",
                held(&self.decap_v6, &desired.decap_v6),
                DECAP_ENTRIES,
            ),
            (
                "local IPv4 address",
                held(&self.local_v4, &desired.local_v4),
                LOCAL_ENTRIES,
            ),
            (
                "local IPv6 address",
                held(&self.local_v6, &desired.local_v6),
                LOCAL_ENTRIES,
            ),
        ] {
            if n > max {
                return Err(DataplaneError::Full {
                    what,
                    max: max as u32,
                    knob: "list fewer networks in decap.allow (or give the node fewer addresses); while an apply replaces a list, its old and new entries are held together",
                });
            }
        }
        Ok(())
    }

    fn apply_inner(&mut self, desired: &Desired) -> Result<ApplySummary, DataplaneError> {
        let mut sum = ApplySummary::default();
        let ring_size = self.opts.ring_size;

        // 2. Services: tables into idle slots, then VIP entries switched over.
        self.reserve_previous_ids(desired)?;
        let mut wanted_names = std::collections::BTreeSet::new();
        // A VIP entry can move between services in one apply (Kubernetes reassigns an
        // ingress IP): the service that gives it up must not delete the entry the other one
        // wrote, whichever of the two is handled first.
        let wanted_vips: std::collections::HashSet<VipKey> = desired
            .services
            .iter()
            .flat_map(|s| s.vips.iter())
            .map(|&(addr, port, proto)| {
                let (addr, family) = addr_bytes(addr);
                VipKey {
                    addr,
                    port: port.to_be(),
                    proto,
                    family,
                }
            })
            .collect();
        for svc in &desired.services {
            wanted_names.insert(svc.name.clone());
            let (mut state, is_new) = match self.services.get(&svc.name) {
                Some(s) => (s.clone(), false),
                None => {
                    let reserved = self.reserved_services.remove(&svc.name);
                    let id = self.new_id(IdKind::Service, reserved)?;
                    // The name goes in with the id, before any VIP entry names the id.
                    self.array::<ServiceMeta>(map_names::SERVICE_META)?
                        .set(id, service_meta(&svc.name), 0)
                        .map_err(map_err(format!("name of service {}", svc.name)))?;
                    let state = ServiceState {
                        id,
                        active_slot: id * 2 + 1,
                        vips: Vec::new(),
                        info: VipInfo::default(),
                        table_hash: None,
                        source_ranges: Vec::new(),
                    };
                    (state, true)
                }
            };
            // Backends that are new get ids and entries before any table can name them.
            for b in &svc.backends {
                let (addr, family) = addr_bytes(b.address);
                // The service's forwarding mode goes into its backends' entries: a packet
                // whose flow is known forwards without reading its VIP entry.
                let mut flags = if b.local { BACKEND_F_LOCAL } else { 0 };
                if svc.mode.l2 {
                    flags |= BACKEND_F_L2;
                }
                let entry = Backend {
                    addr,
                    family,
                    flags,
                    _pad: [0; 2],
                    service: state.id,
                };
                let key = (svc.name.clone(), b.address);
                let existing = self.backends.get(&key).map(|s| (s.id, s.entry, s.meta));
                match existing {
                    Some((id, old, meta)) => {
                        if old != entry {
                            self.array::<Backend>(map_names::BACKENDS)?
                                .set(id, entry, 0)
                                .map_err(map_err(format!("backend {}", b.address)))?;
                        }
                        // A reweight keeps the health the checks last reported.
                        let meta_now = BackendMeta {
                            weight: b.weight,
                            ..meta
                        };
                        if meta_now != meta {
                            self.array::<BackendMeta>(map_names::BACKEND_META)?
                                .set(id, meta_now, 0)
                                .map_err(map_err(format!("weight of backend {}", b.address)))?;
                        }
                        if let Some(s) = self.backends.get_mut(&key) {
                            s.entry = entry;
                            s.meta = meta_now;
                        }
                    }
                    None => {
                        let reserved = self.reserved_backends.remove(&key);
                        let id = self.new_id(IdKind::Backend, reserved)?;
                        let meta = BackendMeta {
                            weight: b.weight,
                            health: lb_common::HEALTH_UNKNOWN,
                            _pad: [0; 3],
                        };
                        self.array::<BackendMeta>(map_names::BACKEND_META)?
                            .set(id, meta, 0)
                            .map_err(map_err(format!("weight of backend {}", b.address)))?;
                        self.array::<Backend>(map_names::BACKENDS)?
                            .set(id, entry, 0)
                            .map_err(map_err(format!("backend {}", b.address)))?;
                        self.backends.insert(key, BackendState { id, entry, meta });
                        sum.backends_added += 1;
                    }
                }
            }
            let weighted: Vec<(IpAddr, u32)> =
                svc.backends.iter().map(|b| (b.address, b.weight)).collect();
            // Ids by position in the service's list, looked up once per backend rather
            // than once per table entry (a table has thousands of entries per backend).
            let ids: Vec<u32> = svc
                .backends
                .iter()
                .map(|b| {
                    self.backends
                        .get(&(svc.name.clone(), b.address))
                        .map_or(NO_BACKEND, |s| s.id)
                })
                .collect();
            let table: Vec<u32> = match maglev::build(&weighted, ring_size) {
                Ok(positions) => positions
                    .iter()
                    .map(|&p| ids.get(p as usize).copied().unwrap_or(NO_BACKEND))
                    .collect(),
                Err(maglev::MaglevError::NoBackends) => vec![NO_BACKEND; ring_size as usize],
                Err(source) => {
                    return Err(DataplaneError::Maglev {
                        service: svc.name.clone(),
                        source,
                    });
                }
            };
            let mut flags = 0;
            if svc.mode.l2 {
                flags |= SERVICE_F_L2;
            }
            if svc.mode.affinity_client_ip {
                flags |= SERVICE_F_AFFINITY_CLIENT_IP;
            }
            if !svc.source_ranges.is_empty() {
                flags |= SERVICE_F_SOURCE_RANGES;
            }
            // New ranges go in before the VIP entries may start checking them. Kept as the
            // trie keys them (see `canonical_ranges`).
            let ranges = canonical_ranges(&svc.source_ranges);
            let new_ranges: Vec<ipnet::IpNet> = ranges
                .iter()
                .filter(|r| !state.source_ranges.contains(r))
                .copied()
                .collect();
            self.write_ranges(state.id, &new_ranges, true)?;
            let vips: Vec<VipKey> = svc
                .vips
                .iter()
                .map(|&(addr, port, proto)| {
                    let (addr, family) = addr_bytes(addr);
                    VipKey {
                        addr,
                        port: port.to_be(),
                        proto,
                        family,
                    }
                })
                .collect();

            let mut changed = is_new;
            let hash = table_hash(&table);
            if state.table_hash != Some(hash) {
                let slot = if state.active_slot == state.id * 2 {
                    state.id * 2 + 1
                } else {
                    state.id * 2
                };
                self.rings
                    .write(slot as usize * ring_size as usize, &table)?;
                state.active_slot = slot;
                state.table_hash = Some(hash);
                sum.tables_written += 1;
                changed = true;
            }
            let info = VipInfo {
                service: state.id,
                flags,
                ring: state.active_slot,
                _reserved: 0,
            };
            if info != state.info || vips != state.vips {
                changed = true;
            }
            {
                let mut map = self.vips()?;
                if changed {
                    for k in &vips {
                        map.insert(k, info, 0)
                            .map_err(map_err(format!("VIP of {}", svc.name)))?;
                    }
                }
                for k in &state.vips {
                    if !vips.contains(k) && !wanted_vips.contains(k) {
                        map.remove(k)
                            .map_err(map_err(format!("old VIP of {}", svc.name)))?;
                    }
                }
            }
            // Ranges no longer listed go after the index switch (see `sweep_ranges`): until
            // then packets still find this service through the old half of the index.
            if state.source_ranges != ranges {
                changed = true;
            }
            state.source_ranges = ranges;
            state.info = info;
            state.vips = vips;
            if is_new {
                sum.services_added += 1;
            } else if changed {
                sum.services_updated += 1;
            }
            self.services.insert(svc.name.clone(), state);
        }

        // 3. Services that are gone: VIP entries first, then their ids.
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted_names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(state) = self.services.remove(&name) {
                let mut map = self.vips()?;
                for k in state.vips.iter().filter(|k| !wanted_vips.contains(*k)) {
                    map.remove(k)
                        .map_err(map_err(format!("VIP of removed service {name}")))?;
                }
                // No stale name for an id until it is given out again.
                self.array::<ServiceMeta>(map_names::SERVICE_META)?
                    .set(state.id, ServiceMeta::default(), 0)
                    .map_err(map_err(format!("name of removed service {name}")))?;
                // The id goes back to the pool only once the apply has switched the index
                // (the unclaimed reserved ids, at its end): until then the live index may
                // still name it, and an apply that fails and is rolled back re-creates the
                // service with this same id instead of handing it to another service, whose
                // Maglev table would then fill the ring the live index gives this one.
                self.reserved_services.insert(name.clone(), state.id);
                sum.services_removed += 1;
            }
        }

        // 5. Every VIP address gets an ICMP marker entry: echo to it is answered, and ICMP
        //    errors to it are matched against its flows.
        let mut markers: BTreeMap<VipKey, VipInfo> = BTreeMap::new();
        for svc in &desired.services {
            if let Some(state) = self.services.get(&svc.name) {
                for k in &state.vips {
                    let marker = VipKey {
                        port: 0,
                        proto: icmp_proto(k.family),
                        ..*k
                    };
                    // The marker keeps the forwarding mode (fragmented ICMP is forwarded
                    // with it) but none of the per-service restrictions.
                    markers.entry(marker).or_insert(VipInfo {
                        flags: state.info.flags & SERVICE_F_L2,
                        ..state.info
                    });
                }
            }
        }
        if markers != self.markers {
            let old = std::mem::take(&mut self.markers);
            let mut map = self.vips()?;
            for (k, v) in &markers {
                if old.get(k) != Some(v) {
                    map.insert(k, v, 0).map_err(map_err("VIP address marker"))?;
                }
            }
            for k in old.keys().filter(|k| !markers.contains_key(*k)) {
                map.remove(k).map_err(map_err("VIP address marker"))?;
            }
            self.markers = markers;
        }

        // Whether any all-ports VIP exists: lets the data plane skip a second lookup.
        let all_ports = desired
            .services
            .iter()
            .any(|s| s.vips.iter().any(|v| v.1 == 0));
        let mut flags = if all_ports {
            lb_common::SETTINGS_F_ALL_PORTS
        } else {
            0
        };
        // The decap role's checks go into the index too (this node's addresses and the
        // host-exact allowed sources), so they cost index searches instead of a hash-map
        // and an LPM-trie lookup. Taken from `desired`: the index must agree with the
        // prefix flag set with it. When they do not fit (the index is sized by
        // max_services), the data plane keeps using the maps, written below either way.
        let (decap_keys, decap_prefixes) = decap_index_keys(desired);
        if decap_prefixes {
            flags |= lb_common::SETTINGS_F_DECAP_PREFIXES;
        }
        let image = match self.vip_index_entries_image(&decap_keys) {
            Ok(image) => {
                flags |= lb_common::SETTINGS_F_DECAP_INDEX;
                image
            }
            Err(DataplaneError::Full { .. }) if !decap_keys.is_empty() => {
                // Said once, when the fast path is lost, not on every apply.
                if self
                    .settings_flags
                    .is_none_or(|f| f & lb_common::SETTINGS_F_DECAP_INDEX != 0)
                {
                    tracing::warn!(
                        "the VIP index has no room for {} decap addresses; decapsulation \
                     checks use the slower maps (raise max_services to make room)",
                        decap_keys.len()
                    );
                }
                self.vip_index_entries_image(&[])?
            }
            Err(e) => return Err(e),
        };
        // The tunnel pair table (a shortcut past the decap checks) holds only tunnels the
        // checks allow as they stand: a pair that goes leaves it now, before the index
        // and the maps change; one that comes is written after them (below).
        let pair_table = decap_pair_table(desired);
        if pair_table != self.decap_pair_image {
            let kept = decap_pairs_kept(&self.decap_pair_image, &pair_table);
            if kept != self.decap_pair_image {
                self.decap_pairs.write_words(0, &kept)?;
                self.decap_pair_image = kept;
            }
        }
        // The VIP index: the entries above, written into the idle half, which then
        // becomes the active one together with the flags (one store).
        let digest = slots_digest(&image);
        let index_changed = self.vip_index_digest != Some(digest);
        let mut narrowed = None;
        if index_changed {
            let slots = lb_common::vip_index_slots(self.opts.max_services);
            let half = slots as usize;
            let idle = if self.vip_index_b { 0 } else { half };
            self.vip_index.write(idle, &image)?;
            // The address filter of the same entries. Until the switch, packets search the
            // old half: the filter lets both halves' addresses through, and is narrowed to
            // the new ones below, once the old half is out of use.
            let filter = build_vip_filter(
                image.iter().map(|s| &s.key).filter(|k| k.family != 0),
                slots,
            );
            let both: Vec<u32> = filter
                .iter()
                .zip(&self.vip_filter)
                .map(|(new, old)| new | old)
                .collect();
            self.write_vip_filter(both)?;
            narrowed = Some(filter);
        }
        if index_changed || Some(flags) != self.settings_flags {
            let b = self.vip_index_b != index_changed;
            let word = flags
                | if b {
                    lb_common::SETTINGS_F_VIP_INDEX_B
                } else {
                    0
                };
            self.array::<u32>(map_names::SETTINGS)?
                .set(lb_common::SETTINGS_FLAGS, word, 0)
                .map_err(map_err("settings"))?;
            self.settings_flags = Some(flags);
            self.vip_index_b = b;
            self.vip_index_digest = Some(digest);
        }
        if let Some(filter) = narrowed {
            self.write_vip_filter(filter)?;
        }
        self.sweep_ranges()?;

        // 4. Backend entries no service names any more: cleared once no VIP (in the index
        //    the data plane reads) uses a table that points at them.
        let wanted: std::collections::HashSet<(String, IpAddr)> = desired
            .services
            .iter()
            .flat_map(|svc| svc.backends.iter().map(|b| (svc.name.clone(), b.address)))
            .collect();
        let unused: Vec<(String, IpAddr)> = self
            .backends
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        let mut cleared = Vec::new();
        for key in unused {
            if let Some(s) = self.backends.remove(&key) {
                self.array::<Backend>(map_names::BACKENDS)?
                    .set(s.id, Backend::default(), 0)
                    .map_err(map_err(format!("clearing backend {} of {}", key.1, key.0)))?;
                cleared.push((key, s));
            }
        }
        if !cleared.is_empty() {
            // Known flows' packets are sent by what the data plane's next-hop cache learnt
            // of their backend in the current epoch (see `lb_common::FlowWay::seen`): a new
            // epoch now, so that from here on none goes to a cleared backend and none is
            // counted for it after its counts are folded below.
            self.advance_epoch()?;
        }
        for (key, s) in cleared {
            // Its packets stay in its service's total (see `ServiceStats`).
            self.fold_backend_counts(s.id, s.entry.service)?;
            self.array::<BackendMeta>(map_names::BACKEND_META)?
                .set(s.id, BackendMeta::default(), 0)
                .map_err(map_err(format!("clearing backend {} of {}", key.1, key.0)))?;
            // Back to the pool at the end of a successful apply; a rollback re-creates
            // the backend with its id (its flows' entries still name it).
            self.reserved_backends.insert(key.clone(), s.id);
            sum.backends_removed += 1;
        }

        // 6. Decap allow lists and this node's addresses (the decap destinations).
        let v4 = |v: &[(Ipv4Addr, u8)]| -> Vec<([u8; 4], u8)> {
            v.iter().map(|(a, l)| (a.octets(), *l)).collect()
        };
        let v6 = |v: &[(Ipv6Addr, u8)]| -> Vec<([u8; 16], u8)> {
            v.iter().map(|(a, l)| (a.octets(), *l)).collect()
        };
        if desired.decap_v4 != self.decap_v4 {
            self.sync_trie(
                map_names::DECAP_V4,
                &v4(&self.decap_v4),
                &v4(&desired.decap_v4),
            )?;
            self.decap_v4 = desired.decap_v4.clone();
        }
        if desired.decap_v6 != self.decap_v6 {
            self.sync_trie(
                map_names::DECAP_V6,
                &v6(&self.decap_v6),
                &v6(&desired.decap_v6),
            )?;
            self.decap_v6 = desired.decap_v6.clone();
        }
        if desired.local_v4 != self.local_v4 {
            let octets =
                |v: &[Ipv4Addr]| -> Vec<[u8; 4]> { v.iter().map(|a| a.octets()).collect() };
            self.sync_set(
                map_names::LOCAL_V4,
                &octets(&self.local_v4),
                &octets(&desired.local_v4),
            )?;
            self.local_v4 = desired.local_v4.clone();
        }
        if desired.local_v6 != self.local_v6 {
            let octets =
                |v: &[Ipv6Addr]| -> Vec<[u8; 16]> { v.iter().map(|a| a.octets()).collect() };
            self.sync_set(
                map_names::LOCAL_V6,
                &octets(&self.local_v6),
                &octets(&desired.local_v6),
            )?;
            self.local_v6 = desired.local_v6.clone();
        }
        if pair_table != self.decap_pair_image {
            self.decap_pairs.write_words(0, &pair_table)?;
            self.decap_pair_image = pair_table;
        }
        // Ids kept for services or backends that this apply did not bring back.
        for (_, id) in self.reserved_services.drain() {
            self.service_ids.give(id);
        }
        for (_, id) in self.reserved_backends.drain() {
            self.backend_ids.give(id);
        }
        Ok(sum)
    }

    /// Backend id currently assigned to `addr` in service `service`, if any.
    pub fn backend_id(&self, service: &str, addr: IpAddr) -> Option<u32> {
        self.backends
            .get(&(service.to_string(), addr))
            .map(|s| s.id)
    }

    /// Records the health a check found for backend `address` of `service`, for `l3lb
    /// status` (the data plane does not act on it). Kept across applies that keep the
    /// backend; a backend added anew starts as [`Health::Unknown`].
    pub fn set_backend_health(
        &mut self,
        service: &str,
        address: IpAddr,
        health: Health,
    ) -> Result<(), DataplaneError> {
        let key = (service.to_string(), address);
        let (id, meta) = self
            .backends
            .get(&key)
            .map(|s| (s.id, s.meta))
            .ok_or_else(|| DataplaneError::UnknownBackend {
                service: service.to_string(),
                address,
            })?;
        let meta = BackendMeta {
            health: health.as_u8(),
            ..meta
        };
        self.array::<BackendMeta>(map_names::BACKEND_META)?
            .set(id, meta, 0)
            .map_err(map_err(format!("health of backend {address} of {service}")))?;
        if let Some(s) = self.backends.get_mut(&key) {
            s.meta = meta;
        }
        Ok(())
    }

    /// Service id currently assigned to `name`, if any.
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(|s| s.id)
    }

    /// Makes the LPM trie `name` hold exactly the prefixes `new` (given it holds `old`).
    fn sync_trie<K: aya::Pod + PartialEq + std::fmt::Debug>(
        &mut self,
        name: &'static str,
        old: &[(K, u8)],
        new: &[(K, u8)],
    ) -> Result<(), DataplaneError> {
        let added: Vec<(K, u32)> = new
            .iter()
            .filter(|e| !old.contains(e))
            .map(|(k, l)| (*k, u32::from(*l)))
            .collect();
        let gone: Vec<(K, u32)> = old
            .iter()
            .filter(|e| !new.contains(e))
            .map(|(k, l)| (*k, u32::from(*l)))
            .collect();
        self.edit_trie(name, &added, true)?;
        self.edit_trie(name, &gone, false)
    }

    /// Makes the hash map `name` hold exactly the keys `new` (value 1), given it holds `old`.
    fn sync_set<K: aya::Pod + PartialEq + std::fmt::Debug>(
        &mut self,
        name: &'static str,
        old: &[K],
        new: &[K],
    ) -> Result<(), DataplaneError> {
        let mut map: HashMap<&mut MapData, K, u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for k in new.iter().filter(|k| !old.contains(k)) {
            map.insert(k, 1, 0)
                .map_err(map_err(format!("{name}: adding {k:?}")))?;
        }
        for k in old.iter().filter(|k| !new.contains(k)) {
            map.remove(k)
                .map_err(map_err(format!("{name}: removing {k:?}")))?;
        }
        Ok(())
    }

    /// Removes every source-range entry no service lists as it stands (a range dropped
    /// from a service's list, every range of a removed service): run once the index the
    /// data plane reads no longer names them, so an allowed client is never refused
    /// while an apply runs, and a service given a freed id starts without ranges.
    fn sweep_ranges(&mut self) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<(u32, ipnet::IpNet)> = self
            .services
            .values()
            .flat_map(|s| s.source_ranges.iter().map(move |r| (s.id, *r)))
            .collect();
        let stale: Vec<(u32, ipnet::IpNet)> =
            self.src_written.difference(&wanted).copied().collect();
        for (id, range) in stale {
            self.write_ranges(id, &[range], false)?;
        }
        Ok(())
    }

    /// Adds (`insert`) or removes the source-range entries of service `id`.
    fn write_ranges(
        &mut self,
        id: u32,
        ranges: &[ipnet::IpNet],
        insert: bool,
    ) -> Result<(), DataplaneError> {
        let service = id.to_be_bytes();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        // The service id is matched whole (32 bits) before the prefix's own bits.
        for r in ranges {
            match r {
                ipnet::IpNet::V4(n) => v4.push((
                    SrcRangeV4 {
                        service,
                        addr: n.network().octets(),
                    },
                    32 + u32::from(n.prefix_len()),
                )),
                ipnet::IpNet::V6(n) => v6.push((
                    SrcRangeV6 {
                        service,
                        addr: n.network().octets(),
                    },
                    32 + u32::from(n.prefix_len()),
                )),
            }
        }
        // Recorded before the write, so that entries of a write that fails part way are
        // swept too.
        if insert {
            self.src_written.extend(ranges.iter().map(|r| (id, *r)));
        }
        self.edit_trie(map_names::SRC_V4, &v4, insert)?;
        self.edit_trie(map_names::SRC_V6, &v6, insert)?;
        if !insert {
            for r in ranges {
                self.src_written.remove(&(id, *r));
            }
        }
        Ok(())
    }

    /// Adds (`insert`) or removes `(data, prefix length)` entries of the LPM trie `name`.
    fn edit_trie<K: aya::Pod + std::fmt::Debug>(
        &mut self,
        name: &'static str,
        entries: &[(K, u32)],
        insert: bool,
    ) -> Result<(), DataplaneError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut trie: LpmTrie<&mut MapData, K, u32> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (k, len) in entries {
            let key = Key::new(*len, *k);
            let res = if insert {
                trie.insert(&key, 1, 0)
            } else {
                // Removing what is not there (an insert that failed) leaves what is wanted.
                match trie.remove(&key) {
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        Ok(())
                    }
                    r => r,
                }
            };
            res.map_err(map_err(format!("{name}: {k:?}/{len}")))?;
        }
        Ok(())
    }

    /// Makes the data plane look every backend's next hop up again and learn its entry
    /// anew (advances the epoch); the agent calls it every half second.
    pub fn expire_next_hops(&mut self) -> Result<(), DataplaneError> {
        // Not a change: entries checked since the last one stay trusted.
        self.nexthop_epoch = self.nexthop_epoch.wrapping_add(1);
        self.write_epoch(self.nexthop_epoch, false)
    }

    /// Writes the VIP address filter (`SETTINGS_FILTER` on) where it differs from what
    /// is there.
    fn write_vip_filter(&mut self, filter: Vec<u32>) -> Result<(), DataplaneError> {
        if filter != self.vip_filter {
            self.settings_map
                .write(lb_common::SETTINGS_FILTER as usize, &filter)?;
            self.vip_filter = filter;
        }
        Ok(())
    }

    /// Advances the epoch after a change to the maps (see `write_epoch`): the clock of
    /// the connection table's ages and of the next-hop cache (a backend as the cache
    /// learnt it is trusted without reading its entry within one epoch), and the start
    /// of the span in which an entry the data plane checks against its VIP is trusted
    /// without the lookup (until the next change).
    fn advance_epoch(&mut self) -> Result<(), DataplaneError> {
        self.nexthop_epoch = self.nexthop_epoch.wrapping_add(1);
        self.write_epoch(self.nexthop_epoch, true)
    }

    /// Packets dropped for `reason` so far, summed over CPUs.
    pub fn drop_count(&self, reason: lb_common::DropReason) -> Result<u64, DataplaneError> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(map_names::DROPS)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::DROPS)))?,
        )
        .map_err(map_err("drop counters"))?;
        let values = map
            .get(&(reason as u32), 0)
            .map_err(map_err("drop counters"))?;
        Ok(values.iter().sum())
    }

    /// Lists `devices` (interface indexes) as the ones XDP cannot transmit on, which the
    /// program then drops toward as `egress_no_xdp` instead of redirecting frames there
    /// to be lost; devices listed before keep their counts. Returns how many devices
    /// found no room (the map holds `NO_XMIT_MAX`; those are tried as before).
    pub fn list_no_xmit(&mut self, devices: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        if *devices == self.no_xmit {
            return Ok(0);
        }
        let before = std::mem::take(&mut self.no_xmit);
        let mut listed = before.clone();
        let result = (|| {
            let mut map: HashMap<&mut MapData, u32, u64> =
                HashMap::try_from(self.map_mut(map_names::NO_XMIT)?)
                    .map_err(map_err(map_names::NO_XMIT))?;
            for &gone in before.difference(devices) {
                match map.remove(&gone) {
                    Ok(()) => {}
                    Err(e) if map_errno(&e) == Some(libc::ENOENT) => {}
                    Err(e) => return Err(map_err(format!("unlisting device {gone}"))(e)),
                }
                listed.remove(&gone);
            }
            let mut left_out = 0;
            for &new in devices.difference(&before) {
                // BPF_NOEXIST (1): a count the program started meanwhile is not reset.
                match map.insert(new, 0, 1) {
                    Ok(()) => {}
                    Err(e) if map_errno(&e) == Some(libc::EEXIST) => {}
                    Err(e)
                        if matches!(
                            map_errno(&e),
                            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
                        ) =>
                    {
                        left_out += 1;
                        continue;
                    }
                    Err(e) => return Err(map_err(format!("listing device {new}"))(e)),
                }
                listed.insert(new);
            }
            Ok(left_out)
        })();
        // What the map holds, whatever failed on the way.
        self.no_xmit = listed;
        result
    }

    /// Lists the VLAN devices `vlans` (index → parent and tag), through which the program
    /// then sends tagged frames on the parent, where a redirect to the VLAN device itself
    /// would be lost. Returns how many found no room (the map holds `VLANS_MAX`).
    pub fn list_vlans(
        &mut self,
        vlans: &BTreeMap<u32, lb_common::VlanDev>,
    ) -> Result<usize, DataplaneError> {
        if *vlans == self.vlans {
            return Ok(0);
        }
        let before = std::mem::take(&mut self.vlans);
        let mut listed = before.clone();
        let result = (|| {
            let mut map: HashMap<&mut MapData, u32, lb_common::VlanDev> =
                HashMap::try_from(self.map_mut(map_names::VLANS)?)
                    .map_err(map_err(map_names::VLANS))?;
            for gone in before.keys().filter(|k| !vlans.contains_key(k)) {
                match map.remove(gone) {
                    Ok(()) => {}
                    Err(e) if map_errno(&e) == Some(libc::ENOENT) => {}
                    Err(e) => return Err(map_err(format!("unlisting VLAN device {gone}"))(e)),
                }
                listed.remove(gone);
            }
            let mut left_out = 0;
            for (&index, dev) in vlans {
                if before.get(&index) == Some(dev) {
                    continue;
                }
                match map.insert(index, *dev, 0) {
                    Ok(()) => {
                        listed.insert(index, *dev);
                    }
                    Err(e)
                        if matches!(
                            map_errno(&e),
                            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
                        ) =>
                    {
                        left_out += 1
                    }
                    Err(e) => return Err(map_err(format!("listing VLAN device {index}"))(e)),
                }
            }
            Ok(left_out)
        })();
        self.vlans = listed;
        result
    }

    /// The listed devices without XDP transmit (`list_no_xmit`) with how many packets the
    /// program dropped toward each.
    pub fn no_xmit_counts(&self) -> Result<BTreeMap<u32, u64>, DataplaneError> {
        let map: HashMap<&MapData, u32, u64> = HashMap::try_from(
            self.ebpf
                .map(map_names::NO_XMIT)
                .ok_or_else(|| DataplaneError::Missing(format!("map {}", map_names::NO_XMIT)))?,
        )
        .map_err(map_err(map_names::NO_XMIT))?;
        map.iter()
            .collect::<Result<BTreeMap<u32, u64>, _>>()
            .map_err(map_err("reading the devices without XDP transmit"))
    }

    /// The kernel's id of the program this data plane attaches (`l3lb`).
    pub fn program_id(&self) -> Result<u32, DataplaneError> {
        let info = self
            .program()?
            .info()
            .map_err(|source| DataplaneError::Program {
                what: "reading the program's id".to_string(),
                source,
            })?;
        Ok(info.id())
    }

    /// Read access to a map by name, for tests and status readers.
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf.map(name)
    }
}

#[cfg(test)]
mod vip_index_tests {
    use super::*;

    /// The data plane's search, as `vip_index_search` in the XDP program does it.
    fn search(table: &[VipSlot], key: &VipKey) -> Option<VipSlot> {
        let mask = table.len() as u32 - 1;
        let home = lb_common::vip_index_hash(&key.words());
        for i in 0..lb_common::VIP_INDEX_PROBES {
            let slot = table[(home.wrapping_add(i) & mask) as usize];
            if slot.key.family == 0 {
                return None;
            }
            if slot.key == *key {
                return Some(slot);
            }
        }
        None
    }

    fn key(i: u32, port: u16) -> VipKey {
        let (addr, family) = addr_bytes(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        VipKey {
            addr,
            port: port.to_be(),
            proto: lb_common::PROTO_TCP,
            family,
        }
    }

    #[test]
    fn every_entry_is_found_where_the_data_plane_looks() {
        // 10 000 services with a port and an address marker each: the bench's largest.
        let slots = lb_common::vip_index_slots(10_000);
        let entries: Vec<(VipKey, VipInfo)> = (0..10_000u32)
            .flat_map(|i| {
                let info = VipInfo {
                    service: i,
                    flags: i % 8,
                    ring: 2 * i,
                    _reserved: 0,
                };
                [(key(i, 80), info), (key(i, 0), info)]
            })
            .collect();
        let table = build_vip_index(entries.iter().map(|(k, v)| (k, v)), slots).expect("fits");
        for (k, v) in &entries {
            let slot = search(&table, k).expect("found");
            assert_eq!(
                (slot.service, slot.flags, slot.ring),
                (v.service, v.flags, v.ring)
            );
        }
        assert_eq!(search(&table, &key(10_001, 80)), None);
        assert_eq!(search(&table, &key(5, 81)), None);
        let filter = build_vip_filter(entries.iter().map(|(k, _)| k), slots);
        assert_eq!(filter.len() as u32, lb_common::vip_filter_words(slots));
        for (k, _) in &entries {
            assert!(may_hold(&filter, slots, k), "the filter lets {k:?} through");
        }
        // 10 000 addresses in 256 Ki bits: about 1 in 26 other addresses gets through.
        let through = (20_000..120_000u32)
            .filter(|i| may_hold(&filter, slots, &key(*i, 80)))
            .count();
        assert!(through < 5_000, "{through} of 100 000 other addresses");
    }

    /// The filter's one-multiply hash still spreads VIP addresses that differ in any one
    /// part (a byte of an IPv4 address, a 16-bit group of an IPv6 one): 200 of them in
    /// the smallest filter (2048 bits) take about as many bits as random ones would.
    #[test]
    fn the_address_filter_spreads_addresses_that_differ_anywhere() {
        let slots = lb_common::vip_index_slots(1);
        assert_eq!(lb_common::vip_filter_words(slots) * 32, 2048);
        let bit = |a: IpAddr| {
            let (addr, family) = addr_bytes(a);
            let w = VipKey {
                addr,
                port: 80,
                proto: lb_common::PROTO_TCP,
                family,
            }
            .words();
            lb_common::vip_filter_bit(&[w[0], w[1], w[2], w[3]], slots)
        };
        let v4 = |f: &dyn Fn(u8) -> [u8; 4]| -> Vec<IpAddr> {
            (1..=200u8).map(|i| IpAddr::from(f(i))).collect()
        };
        let v6 = |group: usize| -> Vec<IpAddr> {
            (1..=200u16)
                .map(|i| {
                    let mut g = [0xfd00, 0, 0, 0, 0, 0, 0, 1];
                    g[group] = i;
                    IpAddr::from(g)
                })
                .collect()
        };
        let mut sets = vec![
            ("IPv4, last byte", v4(&|i| [10, 0, 0, i])),
            ("IPv4, third byte", v4(&|i| [10, 0, i, 1])),
            ("IPv4, second byte", v4(&|i| [10, i, 0, 1])),
            ("IPv4, first byte", v4(&|i| [i, 0, 0, 1])),
        ];
        for group in 1..8 {
            sets.push(("IPv6, one group", v6(group)));
        }
        for (what, addrs) in sets {
            let bits: std::collections::BTreeSet<u32> = addrs.into_iter().map(bit).collect();
            // Random placement would give ~190 distinct bits.
            assert!(bits.len() >= 180, "{what}: {} distinct bits", bits.len());
        }
    }

    /// The data plane's filter test (`vip_address_maybe`) on one filter half.
    fn may_hold(filter: &[u32], slots: u32, key: &VipKey) -> bool {
        let w = key.words();
        let bit = lb_common::vip_filter_bit(&[w[0], w[1], w[2], w[3]], slots);
        filter[(bit >> 5) as usize] & (1 << (bit & 31)) != 0
    }

    #[test]
    fn an_index_more_than_half_full_is_refused() {
        let slots = lb_common::vip_index_slots(1);
        let info = VipInfo::default();
        let keys: Vec<VipKey> = (0..=slots / 2).map(|i| key(i, 80)).collect();
        let err = build_vip_index(keys.iter().map(|k| (k, &info)), slots)
            .expect_err("over half full")
            .to_string();
        assert!(err.contains("VIP index slot table is full"), "{err}");
        build_vip_index(keys[1..].iter().map(|k| (k, &info)), slots).expect("half fits");
    }

    #[test]
    fn decap_keys_are_hosts_only_marked_and_apart_from_vips() {
        let balancer = Ipv4Addr::new(10, 1, 0, 2);
        let node = Ipv4Addr::new(10, 1, 0, 1);
        let desired = Desired {
            decap_v4: vec![
                (balancer, 32),
                (Ipv4Addr::new(10, 9, 0, 0), 16),
                (balancer, 32),
            ],
            local_v4: vec![node],
            decap_v6: vec![("fd00::2".parse().expect("addr"), 128)],
            local_v6: vec![],
            ..Default::default()
        };
        let (keys, prefixes) = decap_index_keys(&desired);
        assert!(prefixes, "the /16 needs the trie");
        let marked = |addr: IpAddr, marker: u8, proto: u8| {
            let (addr, family) = addr_bytes(addr);
            VipKey {
                addr,
                port: 0,
                proto,
                family: family | marker,
            }
        };
        let mut want = vec![
            marked(IpAddr::V4(node), lb_common::VIP_INDEX_LOCAL, PROTO_IPIP),
            marked(IpAddr::V4(balancer), lb_common::VIP_INDEX_DECAP, PROTO_IPIP),
            marked(
                "fd00::2".parse().expect("addr"),
                lb_common::VIP_INDEX_DECAP,
                PROTO_IPV6,
            ),
        ];
        want.sort_by_key(|k| (k.family, k.addr));
        assert_eq!(keys, want, "hosts only, each once");
        // A VIP on the node's address is a different key: both are found in one table.
        let (addr, family) = addr_bytes(IpAddr::V4(node));
        let vip = VipKey {
            addr,
            port: 0,
            proto: PROTO_IPIP,
            family,
        };
        let info = VipInfo {
            service: 7,
            ..Default::default()
        };
        let none = VipInfo::default();
        let table = build_vip_index(
            std::iter::once((&vip, &info)).chain(keys.iter().map(|k| (k, &none))),
            64,
        )
        .expect("fits");
        assert_eq!(search(&table, &vip).map(|s| s.service), Some(7));
        assert_eq!(search(&table, &keys[0]).map(|s| s.service), Some(0));
        // The filter holds the VIP's address, not the decap source's: the IPv4 and IPv6
        // paths pass traffic to it early (the decap role searches the index itself).
        let filter = build_vip_filter(std::iter::once(&vip).chain(keys.iter()), 64);
        assert!(may_hold(&filter, 64, &vip));
        let as_vip = |k: &VipKey| VipKey {
            family: k.family & 0x0f,
            ..*k
        };
        assert!(!may_hold(&filter, 64, &as_vip(&keys[1])), "decap source");
        assert!(
            !may_hold(&filter, 64, &as_vip(&keys[2])),
            "IPv6 decap source"
        );
        let hosts_only = Desired {
            decap_v4: vec![(balancer, 32)],
            ..Default::default()
        };
        assert!(!decap_index_keys(&hosts_only).1, "no prefix");
    }

    // The XDP object is built for little-endian BPF (bpfel) only.
    #[cfg(target_endian = "little")]
    #[test]
    fn a_tunnels_pair_word_is_its_outer_header_bytes_in_memory_order() {
        // The outer header holds the source at bytes 12..16 and the destination at
        // 16..20; the program loads those eight bytes as one little-endian word.
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(192, 168, 1, 2);
        let header_bytes = [10, 0, 0, 1, 192, 168, 1, 2];
        assert_eq!(
            tunnel_pair_word(src, dst),
            u64::from_le_bytes(header_bytes),
            "source in the low half, destination in the high half"
        );
        assert_ne!(tunnel_pair_word(src, dst), tunnel_pair_word(dst, src));
        assert_eq!(
            tunnel_pair_word(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
            0,
            "the one word a free place also holds: the program never matches 0"
        );
    }

    /// A new memory-mappable BPF array map (root only), as another build's object
    /// could have made it.
    fn mappable_array(value_size: u32, max_entries: u32) -> Map {
        use std::os::fd::FromRawFd as _;
        // The first fields of the kernel's `union bpf_attr` for BPF_MAP_CREATE; the
        // kernel reads the rest as zero.
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        const BPF_F_MMAPABLE: u32 = 1 << 10;
        let attr = CreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size,
            max_entries,
            map_flags: BPF_F_MMAPABLE,
        };
        // SAFETY: a bpf(2) call with an attribute of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &attr as *const CreateAttr,
                size_of::<CreateAttr>(),
            )
        };
        assert!(
            fd >= 0,
            "creating a BPF map (needs root): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the descriptor bpf(2) just returned, owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        Map::Array(MapData::from_fd(fd).expect("the new map"))
    }

    #[test]
    fn a_mapped_array_of_another_shape_is_refused() {
        let pairs = lb_common::DECAP_PAIR_BUCKETS as usize;
        // Single words where this agent writes pairs: each pair would be read as two
        // tunnels.
        let narrow = mappable_array(8, lb_common::DECAP_PAIR_BUCKETS * 2);
        let e = MmapArray::new(&narrow, pairs, 16, "the tunnel pair table")
            .err()
            .expect("refused");
        assert!(matches!(e, DataplaneError::Shape { .. }), "{e}");
        assert!(e.to_string().contains("4096 entries of 8 bytes"), "{e}");
        let short = mappable_array(16, lb_common::DECAP_PAIR_BUCKETS / 2);
        assert!(matches!(
            MmapArray::new(&short, pairs, 16, "the tunnel pair table"),
            Err(DataplaneError::Shape { .. })
        ));
        let right = mappable_array(16, lb_common::DECAP_PAIR_BUCKETS);
        let mut table =
            MmapArray::new(&right, pairs, 16, "the tunnel pair table").expect("this shape");
        table.write_words(0, &[[1, 2], [3, 4]]).expect("written");
    }

    #[test]
    fn an_apply_keeps_only_the_pair_words_it_does_not_move() {
        let old = vec![[5, 6], [7, 0], [0, 0], [9, 10]];
        let new = vec![[5, 0], [0, 7], [8, 0], [9, 11]];
        assert_eq!(
            decap_pairs_kept(&old, &new),
            vec![[5, 0], [0, 0], [0, 0], [9, 0]],
            "a word stays only where both tables hold it: one going (6, 10) leaves now, \
             one coming (8, 11) waits for the end of the apply, one moving (7) is off the \
             table meanwhile"
        );
        assert_eq!(decap_pairs_kept(&old, &old), old, "nothing changes");
    }

    #[test]
    fn decap_pairs_are_the_node_addresses_times_the_listed_hosts() {
        let word =
            |dst: [u8; 4], src: [u8; 4]| tunnel_pair_word(Ipv4Addr::from(src), Ipv4Addr::from(dst));
        let listed = |table: &[[u64; 2]]| -> Vec<u64> {
            let mut w: Vec<u64> = table
                .iter()
                .flatten()
                .copied()
                .filter(|w| *w != 0)
                .collect();
            w.sort();
            w
        };
        let desired = Desired {
            decap_v4: vec![
                (Ipv4Addr::new(10, 0, 0, 2), 32),
                (Ipv4Addr::new(10, 9, 0, 0), 16),
                (Ipv4Addr::new(10, 0, 0, 3), 32),
                (Ipv4Addr::new(10, 0, 0, 2), 32),
            ],
            local_v4: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 1)],
            decap_v6: vec![("fd00::2".parse().expect("addr"), 128)],
            local_v6: vec!["fd00::1".parse().expect("addr")],
            ..Default::default()
        };
        let table = decap_pair_table(&desired);
        assert_eq!(table.len(), lb_common::DECAP_PAIR_BUCKETS as usize);
        let mut want = vec![
            word([10, 0, 0, 1], [10, 0, 0, 2]),
            word([10, 0, 0, 1], [10, 0, 0, 3]),
            word([192, 0, 2, 1], [10, 0, 0, 2]),
            word([192, 0, 2, 1], [10, 0, 0, 3]),
        ];
        want.sort();
        assert_eq!(
            listed(&table),
            want,
            "hosts only, each pair once, IPv4 only"
        );
        // Each where the program looks for it.
        for w in want {
            assert!(table[lb_common::decap_pair_bucket(w) as usize].contains(&w));
        }
        assert_eq!(
            decap_pair_table(&desired),
            table,
            "the same table every time"
        );

        // At the cap (2 addresses × 1024 hosts, one pair per bucket on average) most
        // pairs are placed: a bucket has two places, and the hash spreads consecutive
        // hosts and addresses.
        let at_cap = Desired {
            decap_v4: (0..1024u32)
                .map(|i| (Ipv4Addr::from(0x0a07_0000 + i), 32))
                .collect(),
            local_v4: (1..=2).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
            ..Default::default()
        };
        let placed = listed(&decap_pair_table(&at_cap)).len();
        assert!(
            placed > DECAP_PAIRS_MAX * 4 / 5 && placed <= DECAP_PAIRS_MAX,
            "{placed} of {DECAP_PAIRS_MAX} placed"
        );
        let over = Desired {
            local_v4: (1..=3).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
            ..at_cap
        };
        assert!(
            listed(&decap_pair_table(&over)).is_empty(),
            "too many: none"
        );
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::latest_epoch;

    /// The latest epoch carried entries were seen in, with the clock's wrap: the one
    /// before the stretch of values it has not been through.
    #[test]
    fn the_latest_epoch_is_found_across_the_wrap() {
        assert_eq!(latest_epoch(vec![]), None);
        assert_eq!(latest_epoch(vec![7]), Some(7));
        assert_eq!(latest_epoch(vec![480, 484, 481, 484]), Some(484));
        assert_eq!(latest_epoch(vec![u32::MAX - 1, 0, 1]), Some(1));
        assert_eq!(latest_epoch(vec![u32::MAX]), Some(u32::MAX));
        // Past u32::MAX the clock goes on at 0, as the agent's wrapping advance does.
        assert_eq!(
            latest_epoch(vec![u32::MAX - 3, u32::MAX]).map(|e| e.wrapping_add(1)),
            Some(0)
        );
    }
}
