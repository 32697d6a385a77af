//! `l3lb status`: reads the pinned maps and reports services, VIPs, backends, counters and
//! connection-table usage.
//!
//! Everything comes from the pins under `<pin_path>/v1/maps`, never from the agent, so it
//! works the same whether or not an agent runs (the data plane keeps forwarding, and
//! counting, after the agent exits). Names, weights and health come from the agent-written
//! metadata maps; pins left by an agent that predates them show ids and `-` instead.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    Action, Backend, BackendMeta, BackendStats, DropReason, FlowKey, FlowState, ServiceMeta,
    ServiceStats, SrcRangeV4, SrcRangeV6, VipInfo, VipKey, map_names,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    dataplane::{Health, addr_from_bytes, service_name},
    flowtable::{FlowTable, FlowTableError},
};

/// Errors reading the pinned maps.
#[derive(Debug, Error)]
pub enum ReadError {
    /// A map the report needs is not pinned.
    #[error(
        "no pinned map at {path}: no l3lb has run with this pin_path (pass --pin-path), or \
         `l3lb down` removed it"
    )]
    NotPinned {
        /// The missing pin.
        path: PathBuf,
    },
    /// A pinned map could not be opened or has another type than expected.
    #[error("opening pinned map {path}: {source}")]
    Open {
        /// The pin.
        path: PathBuf,
        /// The underlying error.
        source: MapError,
    },
    /// Reading an entry failed.
    #[error("reading {what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// The underlying error.
        source: MapError,
    },
    /// The pinned connection table could not be read (or has another layout).
    #[error(transparent)]
    FlowTable(#[from] FlowTableError),
}

/// The pinned maps of one agent (`<pin_path>/v1/maps`).
#[derive(Debug, Clone)]
pub struct Pins {
    maps_dir: PathBuf,
}

impl Pins {
    /// The pins under `pin_dir` (`<pin_path>/v1`).
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            maps_dir: pin_dir.join("maps"),
        }
    }

    /// Opens the pinned map `name` as `T` (`HashMap<MapData, K, V>`, `Array<…>`, …).
    pub fn open<T>(&self, name: &str) -> Result<T, ReadError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let path = self.maps_dir.join(name);
        if !path.exists() {
            return Err(ReadError::NotPinned { path });
        }
        let open_err = |source| ReadError::Open {
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open_err)?;
        let map = Map::from_map_data(data).map_err(open_err)?;
        T::try_from(map).map_err(open_err)
    }

    /// Like [`Pins::open`], `None` when the map is not pinned (an older agent's pins).
    pub fn open_optional<T>(&self, name: &str) -> Result<Option<T>, ReadError>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        match self.open(name) {
            Ok(m) => Ok(Some(m)),
            Err(ReadError::NotPinned { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The pinned connection table (`L3LB_FLOWS`): this build's, or an earlier build's
    /// (the LRU hash, or buckets of whole entries) while an agent of that build still runs
    /// on these pins.
    pub fn flow_table(&self) -> Result<PinnedFlows, ReadError> {
        let path = self.maps_dir.join(map_names::FLOWS);
        if !path.exists() {
            return Err(ReadError::NotPinned { path });
        }
        if crate::handover::pinned_shape(&path).is_ok_and(|s| s.is_legacy_flows()) {
            let capacity = self.capacity(map_names::FLOWS)?;
            return Ok(PinnedFlows::Legacy {
                map: self.open(map_names::FLOWS)?,
                capacity,
            });
        }
        if crate::handover::pinned_shape(&path).is_ok_and(|s| s.is_wide_flows()) {
            let capacity = self.capacity(map_names::FLOWS)?;
            let data = MapData::from_pin(&path).map_err(|source| ReadError::Open {
                path: path.clone(),
                source,
            })?;
            let entries = crate::flowtable::wide_table_entries(&data, &path.display().to_string())?;
            return Ok(PinnedFlows::Wide {
                entries,
                capacity: capacity.saturating_mul(lb_common::FLOW_WAYS as u32),
            });
        }
        Ok(PinnedFlows::Table(FlowTable::from_pin(&path)?))
    }

    /// The capacity (`max_entries`) of the pinned map `name`.
    pub fn capacity(&self, name: &str) -> Result<u32, ReadError> {
        let path = self.maps_dir.join(name);
        if !path.exists() {
            return Err(ReadError::NotPinned { path });
        }
        aya::maps::MapInfo::from_pin(&path)
            .map(|i| i.max_entries())
            .map_err(|source| ReadError::Open { path, source })
    }
}

/// A pinned connection table, as [`Pins::flow_table`] finds it.
pub enum PinnedFlows {
    /// This build's table.
    Table(FlowTable),
    /// The previous release's LRU hash (read by walking its keys, at most `capacity`: an
    /// entry evicted under the walk makes the kernel restart it from the first key).
    Legacy {
        /// The map.
        map: HashMap<MapData, FlowKey, FlowState>,
        /// Its `max_entries`.
        capacity: u32,
    },
    /// An earlier build's table of whole entries, read at once.
    Wide {
        /// Its live entries.
        entries: Vec<lb_common::FlowEntry>,
        /// Entries it holds when full.
        capacity: u32,
    },
}

impl PinnedFlows {
    /// Entries the table holds when full.
    pub fn capacity(&self) -> u32 {
        match self {
            PinnedFlows::Table(t) => u32::try_from(t.capacity()).unwrap_or(u32::MAX),
            PinnedFlows::Legacy { capacity, .. } | PinnedFlows::Wide { capacity, .. } => *capacity,
        }
    }

    /// Calls `f` with every live entry.
    pub fn for_each(&self, mut f: impl FnMut(&FlowKey, &FlowState)) -> Result<(), ReadError> {
        match self {
            PinnedFlows::Table(t) => Ok(t.for_each(|l| f(&l.entry.key, &l.entry.state))?),
            PinnedFlows::Wide { entries, .. } => {
                entries.iter().for_each(|e| f(&e.key, &e.state));
                Ok(())
            }
            PinnedFlows::Legacy { map, capacity } => {
                for key in map.keys().take(*capacity as usize) {
                    let key = key.map_err(read_err("the connection table's keys"))?;
                    match map.get(&key, 0) {
                        Ok(state) => f(&key, &state),
                        // Evicted between the key and its value: gone, not an error.
                        Err(MapError::KeyNotFound) => {}
                        Err(source) => {
                            return Err(ReadError::Read {
                                what: "a connection-table entry".into(),
                                source,
                            });
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn read_err(what: impl Into<String>) -> impl FnOnce(MapError) -> ReadError {
    let what = what.into();
    move |source| ReadError::Read { what, source }
}

/// Hands `f` the values of entries `start..start + count` of the `u32` array `map`, read
/// through a read-only memory mapping of the map (created `BPF_F_MMAPABLE`, as the Maglev
/// rings are): one system call where reading entry by entry took one per entry, seconds
/// for the rings of hundreds of services on every scrape of `/metrics`. False, with
/// nothing handed over, when the map cannot be mapped (the caller then reads entries).
fn count_through_mapping(
    map: &Array<MapData, u32>,
    start: u32,
    count: u32,
    mut f: impl FnMut(u32),
) -> bool {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let data = aya::maps::IterableMap::map(map);
    let Ok(info) = data.info() else {
        return false;
    };
    if info.map_flags() & crate::flowtable::BPF_F_MMAPABLE == 0
        || info.value_size() != 4
        || u64::from(start) + u64::from(count) > u64::from(info.max_entries())
    {
        return false;
    }
    // Array maps store values 8 bytes apart.
    let stride = 8usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let first = start as usize * stride / page * page;
    let end = (start as usize + count as usize) * stride;
    let len = end.div_ceil(page) * page - first;
    if len == 0 {
        return true;
    }
    // SAFETY: a shared read-only mapping of part of the map; the kernel checks the range
    // against the map's size.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            data.fd().as_fd().as_raw_fd(),
            first as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return false;
    }
    for i in start as usize..start as usize + count as usize {
        // SAFETY: entry i lies within the mapping (checked against the map's size above);
        // the agent writes the rings concurrently, so each value is read once, volatile.
        let v = unsafe {
            std::ptr::read_volatile(base.cast::<u8>().add(i * stride - first).cast::<u32>())
        };
        f(v);
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    true
}

/// Service names from `L3LB_SVC_META`, read on demand and remembered.
pub struct ServiceNames {
    map: Option<Array<MapData, ServiceMeta>>,
    cache: StdHashMap<u32, Option<String>>,
}

impl ServiceNames {
    /// Opens the pinned name map (absent in an older agent's pins: every name is `None`).
    pub fn open(pins: &Pins) -> Result<Self, ReadError> {
        Ok(Self {
            map: pins.open_optional(map_names::SERVICE_META)?,
            cache: StdHashMap::new(),
        })
    }

    /// The name of service `id`, if the agent recorded one.
    pub fn get(&mut self, id: u32) -> Result<Option<String>, ReadError> {
        if let Some(n) = self.cache.get(&id) {
            return Ok(n.clone());
        }
        let name = match &self.map {
            None => None,
            Some(m) if id >= m.len() => None,
            Some(m) => service_name(
                &m.get(&id, 0)
                    .map_err(read_err(format!("name of service {id}")))?,
            ),
        };
        self.cache.insert(id, name.clone());
        Ok(name)
    }
}

/// The protocol's name as status and flows print it.
pub fn protocol_label(proto: u8) -> String {
    match proto {
        lb_common::PROTO_TCP => "tcp".into(),
        lb_common::PROTO_UDP => "udp".into(),
        lb_common::PROTO_ICMP => "icmp".into(),
        lb_common::PROTO_ICMPV6 => "icmpv6".into(),
        p => p.to_string(),
    }
}

/// `addr:port` with IPv6 addresses bracketed, `*` for port 0 (all ports).
pub fn endpoint(address: IpAddr, port: u16) -> String {
    let port = if port == 0 {
        "*".to_string()
    } else {
        port.to_string()
    };
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// One VIP entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VipStatus {
    /// VIP address.
    pub address: IpAddr,
    /// Port, 0 for all ports.
    pub port: u16,
    /// Protocol name (`tcp`, `udp`; `icmp`/`icmpv6` for the entry that marks a VIP address
    /// for echo replies and ICMP errors).
    pub protocol: String,
    /// Service id.
    pub service: u32,
    /// `ipip` or `l2`.
    pub forwarding: String,
    /// Service name (`None` when the pins hold no names).
    #[serde(default)]
    pub service_name: Option<String>,
    /// `none` or `client_ip` (session affinity).
    #[serde(default)]
    pub affinity: String,
    /// Client networks the service admits (from the source-range tries); empty: everyone.
    #[serde(default)]
    pub source_ranges: Vec<String>,
}

/// One service: its name, VIPs and counters (summed over CPUs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Service id.
    pub service: u32,
    /// Packets received and sent on to its backends (removed ones included).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// Flows that took a fresh Maglev choice.
    pub new_flows: u64,
    /// Name (`None` when the pins hold no names).
    #[serde(default)]
    pub name: Option<String>,
    /// Its VIPs as `address:port/protocol` (`*` for all ports).
    #[serde(default)]
    pub vips: Vec<String>,
    /// `ipip` or `l2`.
    #[serde(default)]
    pub forwarding: String,
}

/// One backend and its counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendStatus {
    /// Backend id.
    pub id: u32,
    /// Service the entry belongs to.
    pub service: u32,
    /// Address.
    pub address: IpAddr,
    /// This node (passed locally).
    pub local: bool,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// Name of its service (`None` when the pins hold no names).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Maglev weight (`None` when the pins hold no metadata); 0 takes no new flows.
    #[serde(default)]
    pub weight: Option<u32>,
    /// `unknown` (not checked), `up` or `down`.
    #[serde(default)]
    pub health: String,
    /// Entries of its service's active Maglev table that name it: its share of new flows
    /// (proportional to its weight; 0 for a weight-0 backend that keeps only old flows).
    #[serde(default)]
    pub table_entries: u32,
}

/// Connection-table usage: a count taken when the report was made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionTable {
    /// Live entries found by walking the table now (flows come and go meanwhile).
    pub entries: u64,
    /// Entries the table holds: its buckets × `FLOW_WAYS` (`conntrack_size` rounded up to
    /// a power of two, at least 1024). A new flow takes a free way of its bucket, else
    /// evicts the bucket's unconfirmed entry (a flow that never got a second packet, such
    /// as a lone SYN) seen longest ago, else its entry seen longest ago.
    pub capacity: u32,
}

/// Everything `l3lb status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// VIP entries.
    pub vips: Vec<VipStatus>,
    /// Services (those with VIP entries), by id.
    pub services: Vec<ServiceCounters>,
    /// Backends in use.
    pub backends: Vec<BackendStatus>,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Outcomes by action.
    pub actions: BTreeMap<String, u64>,
    /// Events (counted besides the outcome), by name.
    pub events: BTreeMap<String, u64>,
    /// Entries in the connection table (the same count as `connection_table.entries`).
    pub flows: u64,
    /// Connection-table entries and capacity.
    #[serde(default)]
    pub connection_table: ConnectionTable,
    /// Sources whose encapsulated packets the decap role accepts (CIDRs).
    #[serde(default)]
    pub decap_allow: Vec<String>,
    /// Devices XDP cannot transmit on that packets to backends were routed to, by name
    /// (`#index` once gone), with how many the program dropped toward each
    /// (`egress_no_xdp`).
    #[serde(default)]
    pub egress_no_xdp: BTreeMap<String, u64>,
}

/// The (key data, prefix length) entries of an LPM trie.
fn trie_entries<K: aya::Pod>(pins: &Pins, name: &str) -> Result<Vec<(K, u32)>, ReadError> {
    let trie: LpmTrie<MapData, K, u32> = pins.open(name)?;
    trie.keys()
        .map(|k| {
            let k = k.map_err(read_err(format!("iterating {name}")))?;
            Ok((k.data(), k.prefix_len()))
        })
        .collect()
}

/// Source ranges per service id, from the two source-range tries (whose keys are the
/// service id, 32 bits, then the network).
fn source_ranges(pins: &Pins) -> Result<BTreeMap<u32, Vec<String>>, ReadError> {
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (k, len) in trie_entries::<SrcRangeV4>(pins, map_names::SRC_V4)? {
        let net = format!("{}/{}", Ipv4Addr::from(k.addr), len.saturating_sub(32));
        out.entry(u32::from_be_bytes(k.service))
            .or_default()
            .push(net);
    }
    for (k, len) in trie_entries::<SrcRangeV6>(pins, map_names::SRC_V6)? {
        let net = format!("{}/{}", Ipv6Addr::from(k.addr), len.saturating_sub(32));
        out.entry(u32::from_be_bytes(k.service))
            .or_default()
            .push(net);
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

/// The decap allow list, both families, as CIDRs.
fn decap_allow(pins: &Pins) -> Result<Vec<String>, ReadError> {
    let mut out: Vec<String> = trie_entries::<[u8; 4]>(pins, map_names::DECAP_V4)?
        .into_iter()
        .map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(a)))
        .chain(
            trie_entries::<[u8; 16]>(pins, map_names::DECAP_V6)?
                .into_iter()
                .map(|(a, len)| format!("{}/{len}", Ipv6Addr::from(a))),
        )
        .collect();
    out.sort();
    Ok(out)
}

fn per_cpu_sum(pins: &Pins, name: &str, len: u32) -> Result<Vec<u64>, ReadError> {
    let map: PerCpuArray<MapData, u64> = pins.open(name)?;
    (0..len)
        .map(|i| {
            Ok(map
                .get(&i, 0)
                .map_err(read_err(format!("{name}[{i}]")))?
                .iter()
                .sum())
        })
        .collect()
}

/// Counts the live entries of the connection table: one pass over its memory, so a table
/// under a flood still takes a bounded time.
pub fn count_flows(flows: &PinnedFlows) -> Result<u64, ReadError> {
    if let PinnedFlows::Table(t) = flows {
        return Ok(t.count()?);
    }
    let mut n = 0u64;
    flows.for_each(|_, _| n += 1)?;
    Ok(n)
}

/// Reads the status from the pins in `pin_dir` (`<pin_path>/v1`).
pub fn read(pin_dir: &Path) -> Result<Status, ReadError> {
    let pins = Pins::new(pin_dir);
    let mut names = ServiceNames::open(&pins)?;
    let vip_map: HashMap<MapData, VipKey, VipInfo> = pins.open(map_names::VIPS)?;
    let ranges = source_ranges(&pins)?;
    let mut vips = Vec::new();
    // Service id → its active ring slot (for the table share of each backend).
    let mut rings: BTreeMap<u32, u32> = BTreeMap::new();
    for item in vip_map.iter() {
        let (k, v) = item.map_err(read_err("VIP entries"))?;
        if k.proto == lb_common::PROTO_TCP || k.proto == lb_common::PROTO_UDP {
            rings.insert(v.service, v.ring);
        }
        vips.push(VipStatus {
            address: addr_from_bytes(k.addr, k.family),
            port: u16::from_be(k.port),
            protocol: protocol_label(k.proto),
            service: v.service,
            forwarding: if v.flags & lb_common::SERVICE_F_L2 != 0 {
                "l2".into()
            } else {
                "ipip".into()
            },
            service_name: names.get(v.service)?,
            affinity: if v.flags & lb_common::SERVICE_F_AFFINITY_CLIENT_IP != 0 {
                "client_ip".into()
            } else {
                "none".into()
            },
            source_ranges: if v.flags & lb_common::SERVICE_F_SOURCE_RANGES != 0 {
                ranges.get(&v.service).cloned().unwrap_or_default()
            } else {
                Vec::new()
            },
        });
    }
    vips.sort_by(|a, b| (a.address, a.port, &a.protocol).cmp(&(b.address, b.port, &b.protocol)));

    let svc_stats: PerCpuArray<MapData, ServiceStats> = pins.open(map_names::SERVICE_STATS)?;
    // The ICMP marker of a VIP address carries the id of one of its services; the
    // services are the ids of the port entries.
    let mut by_id: BTreeMap<u32, Vec<&VipStatus>> = BTreeMap::new();
    for v in vips.iter().filter(|v| !v.protocol.starts_with("icmp")) {
        by_id.entry(v.service).or_default().push(v);
    }
    let mut services = Vec::new();
    for (id, entries) in by_id {
        let per_cpu = svc_stats
            .get(&id, 0)
            .map_err(read_err(format!("counters of service {id}")))?;
        services.push(ServiceCounters {
            service: id,
            packets: per_cpu.iter().map(|s| s.packets).sum(),
            bytes: per_cpu.iter().map(|s| s.bytes).sum(),
            new_flows: per_cpu.iter().map(|s| s.new_flows).sum(),
            name: names.get(id)?,
            vips: entries
                .iter()
                .map(|v| format!("{}/{}", endpoint(v.address, v.port), v.protocol))
                .collect(),
            forwarding: entries
                .first()
                .map(|v| v.forwarding.clone())
                .unwrap_or_default(),
        });
    }

    let be_map: Array<MapData, Backend> = pins.open(map_names::BACKENDS)?;
    let be_stats: PerCpuArray<MapData, BackendStats> = pins.open(map_names::BACKEND_STATS)?;
    let be_meta: Option<Array<MapData, BackendMeta>> =
        pins.open_optional(map_names::BACKEND_META)?;
    // Each service owns two ring slots of `ring_size` entries; count, in the active one,
    // how many entries name each backend.
    let ring_entries = pins.capacity(map_names::RINGS)?;
    let max_services = pins.capacity(map_names::SERVICE_STATS)?.max(1);
    let ring_size = ring_entries / (2 * max_services);
    let ring_map: Array<MapData, u32> = pins.open(map_names::RINGS)?;
    let mut table_entries: BTreeMap<u32, u32> = BTreeMap::new();
    for slot in rings.values() {
        let start = slot * ring_size;
        let counted = count_through_mapping(&ring_map, start, ring_size, |id| {
            *table_entries.entry(id).or_default() += 1;
        });
        if !counted {
            for i in start..start + ring_size {
                let id = ring_map
                    .get(&i, 0)
                    .map_err(read_err(format!("ring entry {i}")))?;
                *table_entries.entry(id).or_default() += 1;
            }
        }
    }
    let mut backends = Vec::new();
    for id in 0..be_map.len() {
        let b = be_map
            .get(&id, 0)
            .map_err(read_err(format!("backend {id}")))?;
        if b.family == 0 {
            continue;
        }
        let st = be_stats
            .get(&id, 0)
            .map_err(read_err(format!("counters of backend {id}")))?;
        let meta = match &be_meta {
            Some(m) if id < m.len() => Some(
                m.get(&id, 0)
                    .map_err(read_err(format!("metadata of backend {id}")))?,
            ),
            _ => None,
        };
        backends.push(BackendStatus {
            id,
            service: b.service,
            address: addr_from_bytes(b.addr, b.family),
            local: b.flags & lb_common::BACKEND_F_LOCAL != 0,
            packets: st.iter().map(|s| s.packets).sum(),
            bytes: st.iter().map(|s| s.bytes).sum(),
            service_name: names.get(b.service)?,
            weight: meta.map(|m| m.weight),
            health: Health::from_u8(meta.map_or(lb_common::HEALTH_UNKNOWN, |m| m.health))
                .label()
                .to_string(),
            table_entries: table_entries.get(&id).copied().unwrap_or(0),
        });
    }
    // Grouped by service, then address: the order the tables print.
    backends.sort_by_key(|b| (b.service, b.address));
    // A service's packets are its live backends' plus those its removed backends left
    // (the program counts each packet once, for its backend: see `ServiceStats`).
    let mut live: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for b in &backends {
        let (p, by) = live.entry(b.service).or_default();
        *p = p.saturating_add(b.packets);
        *by = by.saturating_add(b.bytes);
    }
    for svc in &mut services {
        if let Some((p, by)) = live.get(&svc.service) {
            svc.packets = svc.packets.saturating_add(*p);
            svc.bytes = svc.bytes.saturating_add(*by);
        }
    }

    let drops = per_cpu_sum(&pins, map_names::DROPS, lb_common::DROP_REASON_COUNT)?;
    let actions = per_cpu_sum(&pins, map_names::ACTIONS, lb_common::ACTION_COUNT)?;
    let events = per_cpu_sum(&pins, map_names::EVENTS, lb_common::EVENT_COUNT)?;
    let flows_table = pins.flow_table()?;
    let capacity = flows_table.capacity();
    let entries = count_flows(&flows_table)?;
    Ok(Status {
        vips,
        services,
        backends,
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), drops[*r as usize]))
            .collect(),
        actions: Action::ALL
            .iter()
            .map(|a| (a.label().to_string(), actions[*a as usize]))
            .collect(),
        events: lb_common::Event::ALL
            .iter()
            .map(|e| (e.label().to_string(), events[*e as usize]))
            .collect(),
        flows: entries,
        connection_table: ConnectionTable { entries, capacity },
        decap_allow: decap_allow(&pins)?,
        egress_no_xdp: egress_no_xdp(&pins)?,
    })
}

/// The listed devices packets were dropped toward (`L3LB_NO_XMIT`, absent from an older
/// agent's pins), by name in this namespace.
fn egress_no_xdp(pins: &Pins) -> Result<BTreeMap<String, u64>, ReadError> {
    let Some(map) = pins.open_optional::<HashMap<MapData, u32, u64>>(map_names::NO_XMIT)? else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (index, count) = entry.map_err(read_err(map_names::NO_XMIT))?;
        if count > 0 {
            let name = crate::sys::interface_name(index).unwrap_or_else(|| format!("#{index}"));
            out.insert(name, count);
        }
    }
    Ok(out)
}

/// Alignment of a table column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text: padded on the right.
    Left,
    /// Numbers: padded on the left.
    Right,
}

/// Writes `rows` under `headers` as a table indented by two spaces, each column as wide
/// as its widest cell (names and IPv6 addresses vary too much for fixed widths).
pub fn write_table(out: &mut String, headers: &[(&str, Align)], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for ((cell, (_, align)), w) in cells.zip(headers).zip(&widths) {
            text.push_str("  ");
            let pad = w.saturating_sub(cell.chars().count());
            match align {
                Align::Left => {
                    text.push_str(cell);
                    text.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                }
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(out, &mut headers.iter().map(|(h, _)| *h));
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

fn name_or_id(name: &Option<String>, id: u32) -> String {
    name.clone().unwrap_or_else(|| format!("#{id}"))
}

/// Renders the status as readable tables.
pub fn render(s: &Status) -> String {
    use Align::{Left, Right};
    let mut out = String::from("SERVICES\n");
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|c| {
            vec![
                name_or_id(&c.name, c.service),
                c.service.to_string(),
                c.vips.join(" "),
                c.forwarding.clone(),
                c.packets.to_string(),
                c.bytes.to_string(),
                c.new_flows.to_string(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("NAME", Left),
            ("ID", Right),
            ("VIPS", Left),
            ("MODE", Left),
            ("PACKETS", Right),
            ("BYTES", Right),
            ("NEW FLOWS", Right),
        ],
        &rows,
    );

    out.push_str("BACKENDS\n");
    let rows: Vec<Vec<String>> = s
        .backends
        .iter()
        .map(|b| {
            vec![
                name_or_id(&b.service_name, b.service),
                b.address.to_string(),
                b.weight.map_or("-".into(), |w| w.to_string()),
                b.health.clone(),
                if b.local { "yes" } else { "no" }.into(),
                b.packets.to_string(),
                b.bytes.to_string(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("SERVICE", Left),
            ("ADDRESS", Left),
            ("WEIGHT", Right),
            ("HEALTH", Left),
            ("LOCAL", Left),
            ("PACKETS", Right),
            ("BYTES", Right),
        ],
        &rows,
    );

    out.push_str("VIPS\n");
    let rows: Vec<Vec<String>> = s
        .vips
        .iter()
        .map(|v| {
            // The address marker: echo is answered, errors go to the flow's owner.
            let marker = v.protocol.starts_with("icmp");
            vec![
                if marker {
                    v.address.to_string()
                } else {
                    endpoint(v.address, v.port)
                },
                v.protocol.clone(),
                if marker {
                    "(echo, ICMP errors)".into()
                } else {
                    name_or_id(&v.service_name, v.service)
                },
                v.forwarding.clone(),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("VIP", Left),
            ("PROTO", Left),
            ("SERVICE", Left),
            ("MODE", Left),
        ],
        &rows,
    );

    let t = &s.connection_table;
    let share = if t.capacity == 0 {
        0.0
    } else {
        t.entries as f64 * 100.0 / f64::from(t.capacity)
    };
    out.push_str(&format!(
        "CONNECTION TABLE\n  {} of {} entries ({share:.1} %), counted now by walking the table\n",
        t.entries, t.capacity
    ));
    // Titled name/count lists, headerless; the egress list only when there were such
    // drops.
    let egress = "DROPPED TOWARD DEVICES XDP CANNOT TRANSMIT ON (egress_no_xdp)";
    for (title, counts) in [
        ("ACTIONS", &s.actions),
        ("EVENTS", &s.events),
        ("DROPS", &s.drops),
        (egress, &s.egress_no_xdp),
    ] {
        if title == egress && counts.is_empty() {
            continue;
        }
        out.push_str(title);
        out.push('\n');
        let rows: Vec<Vec<String>> = counts
            .iter()
            .map(|(k, v)| vec![k.clone(), v.to_string()])
            .collect();
        let mut body = String::new();
        write_table(&mut body, &[("", Left), ("", Right)], &rows);
        // Headerless: drop the blank header line.
        out.push_str(body.split_once('\n').map_or("", |(_, rest)| rest));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ring_entries_are_counted_through_the_mapping() {
        let Ok(mut map) =
            Array::<MapData, u32>::create(3 * 16381, crate::flowtable::BPF_F_MMAPABLE)
        else {
            eprintln!("skipped: cannot create a BPF map here");
            return;
        };
        // The second of three tables: entries name backends 0..7 in turn.
        for i in 16381..2 * 16381 {
            map.set(i, (i - 16381) % 7, 0).expect("set");
        }
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        assert!(
            count_through_mapping(&map, 16381, 16381, |id| {
                *counts.entry(id).or_default() += 1
            }),
            "read through one mapping"
        );
        let want: BTreeMap<u32, u32> = (0..7)
            .map(|b| (b, if b < 1 { 2341 } else { 2340 }))
            .collect();
        assert_eq!(counts, want);
        // A map that cannot be mapped is left to the caller.
        let plain = Array::<MapData, u32>::create(16, 0).expect("map");
        assert!(!count_through_mapping(&plain, 0, 16, |_| {}));
    }

    fn sample() -> Status {
        let vip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        Status {
            vips: vec![
                VipStatus {
                    address: vip,
                    port: 0,
                    protocol: "icmp".into(),
                    service: 0,
                    forwarding: "ipip".into(),
                    service_name: Some("web".into()),
                    affinity: "none".into(),
                    source_ranges: vec![],
                },
                VipStatus {
                    address: vip,
                    port: 80,
                    protocol: "tcp".into(),
                    service: 0,
                    forwarding: "ipip".into(),
                    service_name: Some("web".into()),
                    affinity: "none".into(),
                    source_ranges: vec![],
                },
            ],
            services: vec![ServiceCounters {
                service: 0,
                packets: 12,
                bytes: 1234,
                new_flows: 3,
                name: Some("web".into()),
                vips: vec!["192.0.2.10:80/tcp".into()],
                forwarding: "ipip".into(),
            }],
            backends: vec![
                BackendStatus {
                    id: 0,
                    service: 0,
                    address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)),
                    local: false,
                    packets: 7,
                    bytes: 700,
                    service_name: Some("web".into()),
                    weight: Some(2),
                    health: "up".into(),
                    table_entries: 0,
                },
                BackendStatus {
                    id: 1,
                    service: 0,
                    address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x12)),
                    local: true,
                    packets: 5,
                    bytes: 534,
                    service_name: None,
                    weight: None,
                    health: "unknown".into(),
                    table_entries: 0,
                },
            ],
            drops: [("no_backend".to_string(), 4)].into(),
            actions: [("encap".to_string(), 12)].into(),
            events: [("fragment".to_string(), 0)].into(),
            flows: 3,
            connection_table: ConnectionTable {
                entries: 3,
                capacity: 1000,
            },
            decap_allow: vec![],
            egress_no_xdp: [("eth0.100".to_string(), 9)].into(),
        }
    }

    #[test]
    fn tables_show_names_weights_health_and_usage() {
        let text = render(&sample());
        let expected = "\
SERVICES
  NAME  ID  VIPS               MODE  PACKETS  BYTES  NEW FLOWS
  web    0  192.0.2.10:80/tcp  ipip       12   1234          3
BACKENDS
  SERVICE  ADDRESS    WEIGHT  HEALTH   LOCAL  PACKETS  BYTES
  web      10.0.0.11       2  up       no           7    700
  #0       fd00::12        -  unknown  yes          5    534
VIPS
  VIP            PROTO  SERVICE              MODE
  192.0.2.10     icmp   (echo, ICMP errors)  ipip
  192.0.2.10:80  tcp    web                  ipip
CONNECTION TABLE
  3 of 1000 entries (0.3 %), counted now by walking the table
ACTIONS
  encap  12
EVENTS
  fragment  0
DROPS
  no_backend  4
DROPPED TOWARD DEVICES XDP CANNOT TRANSMIT ON (egress_no_xdp)
  eth0.100  9
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn json_keeps_the_fields_tests_and_scripts_parse() {
        let json = serde_json::to_value(sample()).expect("json");
        for field in [
            "vips",
            "services",
            "backends",
            "drops",
            "actions",
            "events",
            "flows",
            "connection_table",
        ] {
            assert!(json.get(field).is_some(), "{field} missing: {json}");
        }
        let b = &json["backends"][0];
        assert_eq!(b["weight"], 2);
        assert_eq!(b["health"], "up");
        assert_eq!(b["service_name"], "web");
        assert_eq!(json["services"][0]["name"], "web");
        assert_eq!(json["connection_table"]["capacity"], 1000);
        let back: Status = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, sample());
    }

    #[test]
    fn json_of_an_older_status_still_parses() {
        let old = r#"{"vips":[],"services":[{"service":1,"packets":2,"bytes":3,"new_flows":1}],
            "backends":[],"drops":{},"actions":{},"events":{},"flows":0}"#;
        let s: Status = serde_json::from_str(old).expect("parses");
        assert_eq!(s.services[0].name, None);
    }

    #[test]
    fn endpoints_bracket_ipv6_and_star_all_ports() {
        assert_eq!(
            endpoint(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 0),
            "192.0.2.1:*"
        );
        assert_eq!(
            endpoint("fd00::1".parse().expect("v6"), 443),
            "[fd00::1]:443"
        );
    }
}
