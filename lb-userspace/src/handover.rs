//! What survives an agent restart or upgrade: the pinned maps that hold traffic state
//! (connection table, fragments, counters), the pinned XDP link that a new program
//! replaces atomically, and the id assignments the connection table refers to.
//!
//! The agent's own maps (VIPs, backends, Maglev rings, ranges) are always created afresh
//! and filled completely before the link is switched to the new program, so a new agent
//! never serves from half-written state. The state maps are taken over from their pins
//! when their layout matches; a map whose size or flags changed is migrated entry by
//! entry (connection-table entries are placed anew, since a flow's bucket depends on the
//! table's size), and so are service counters of an earlier format, converted in the
//! copy; the previous release's connection table (an LRU hash) is converted into
//! the set-associative one; a map whose key or value layout changed otherwise is refused
//! with a message, never silently reset.

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, MapData, MapInfo};
use lb_common::{Backend, VipInfo, VipKey, map_names};
use thiserror::Error;

use crate::dataplane::{LoadOptions, OBJECT, addr_from_bytes};

/// The maps whose contents are traffic state, carried from one agent to the next.
pub const STATE_MAPS: [&str; 7] = [
    map_names::FLOWS,
    map_names::FRAGS,
    map_names::SERVICE_STATS,
    map_names::BACKEND_STATS,
    map_names::DROPS,
    map_names::EVENTS,
    map_names::ACTIONS,
];

/// Errors of the handover.
#[derive(Debug, Error)]
pub enum HandoverError {
    /// A pinned state map has a layout this build cannot use.
    #[error(
        "pinned map {name} at {path} is {found}, but this l3lb needs {expected}: its state \
         cannot be carried over. Keep the running version, or run `l3lb down` (detaches \
         and drops the connection table) and start again"
    )]
    Incompatible {
        /// Map name.
        name: String,
        /// Its pin.
        path: PathBuf,
        /// The pinned map's shape.
        found: Shape,
        /// The shape this build creates.
        expected: Shape,
    },
    /// A pinned object could not be read.
    #[error("reading pinned {what} at {path}: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The pin.
        path: PathBuf,
        /// The underlying error.
        source: aya::maps::MapError,
    },
    /// The XDP object does not parse or lacks a map.
    #[error("the XDP object: {0}")]
    Object(String),
}

/// A map's layout as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// How one state map reaches the new program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carry {
    /// No pin: the new program gets an empty map.
    Fresh,
    /// Same layout: the new program uses the pinned map itself.
    Reuse(PathBuf),
    /// Same key and value, other size or flags (or service counters of the format before
    /// `SERVICE_COUNTS_RETIRED`, converted in the copy): a new map, filled from the
    /// pinned one.
    Migrate(PathBuf),
    /// A connection table of an earlier layout (the LRU hash `LEGACY_FLOWS`, or buckets
    /// of whole entries, `Shape::is_wide_flows`): a new table, filled with its entries.
    Convert(PathBuf),
    /// A connection table of this layout whose tags an earlier build's `flow_tag` made
    /// (`SETTINGS_FLOW_TAGS`), which this build's lookups would not find: a new table,
    /// filled with its entries.
    Retag(PathBuf),
}

/// The shape of the previous release's connection table: an LRU hash of `FlowKey` (40 B)
/// → `FlowState` (16 B); `max_entries` was `conntrack_size` and is not compared.
pub const LEGACY_FLOWS: Shape = Shape {
    map_type: BPF_MAP_TYPE_LRU_HASH,
    key_size: size_of::<lb_common::FlowKey>() as u32,
    value_size: size_of::<lb_common::FlowState>() as u32,
    max_entries: 0,
    flags: 0,
};

/// `BPF_MAP_TYPE_ARRAY`.
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `BPF_MAP_TYPE_LRU_HASH`.
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

impl Shape {
    /// Whether this is the previous release's connection table (any size and flags).
    pub fn is_legacy_flows(&self) -> bool {
        self.map_type == LEGACY_FLOWS.map_type
            && self.key_size == LEGACY_FLOWS.key_size
            && self.value_size == LEGACY_FLOWS.value_size
    }

    /// Whether this is the connection table of the builds before tagged ways: an array of
    /// 256-byte buckets of whole entries (`lb_common::WideFlowBucket`), any size.
    pub fn is_wide_flows(&self) -> bool {
        self.map_type == BPF_MAP_TYPE_ARRAY
            && self.key_size == 4
            && self.value_size as usize == size_of::<lb_common::WideFlowBucket>()
    }
}

/// The carry decision for every state map.
#[derive(Debug, Clone, Default)]
pub struct CarryPlan {
    /// (map name, decision).
    pub maps: Vec<(&'static str, Carry)>,
}

impl CarryPlan {
    /// The decision for `name` (`Fresh` if the plan does not mention it).
    pub fn get(&self, name: &str) -> &Carry {
        self.maps
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&Carry::Fresh, |(_, c)| c)
    }

    /// True when any state comes from an earlier agent.
    pub fn carries_anything(&self) -> bool {
        self.maps.iter().any(|(_, c)| *c != Carry::Fresh)
    }
}

/// Capacity the loader gives each map whose size is a load-time setting.
pub fn max_entries_overrides(opts: &LoadOptions) -> Vec<(&'static str, u32)> {
    let rings = opts
        .max_services
        .saturating_mul(2)
        .saturating_mul(opts.ring_size);
    vec![
        (
            map_names::VIPS,
            opts.max_services.saturating_mul(64).max(64),
        ),
        (map_names::RINGS, rings),
        (
            map_names::VIP_INDEX,
            lb_common::vip_index_slots(opts.max_services).saturating_mul(2),
        ),
        (map_names::BACKENDS, opts.max_backends),
        (
            map_names::FLOWS,
            lb_common::flow_table_values(lb_common::flow_buckets(opts.conntrack_size)),
        ),
        (
            map_names::SETTINGS,
            lb_common::settings_len(lb_common::vip_index_slots(opts.max_services)),
        ),
        (map_names::SERVICE_STATS, opts.max_services),
        (map_names::BACKEND_STATS, opts.max_backends),
        (map_names::NEXTHOPS, opts.max_backends),
        (map_names::SERVICE_META, opts.max_services),
        (map_names::BACKEND_META, opts.max_backends),
    ]
}

/// The shape the loader will create for each state map with `opts`.
fn expected_shapes(opts: &LoadOptions) -> Result<StdHashMap<&'static str, Shape>, HandoverError> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| HandoverError::Object(e.to_string()))?;
    let overrides = max_entries_overrides(opts);
    let mut out = StdHashMap::new();
    for name in STATE_MAPS {
        let m = obj
            .maps
            .get(name)
            .ok_or_else(|| HandoverError::Object(format!("no map {name}")))?;
        let max_entries = overrides
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(m.max_entries(), |(_, v)| *v);
        out.insert(
            name,
            Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            },
        );
    }
    Ok(out)
}

/// The shape of the map pinned at `path`.
pub fn pinned_shape(path: &Path) -> Result<Shape, HandoverError> {
    let info = MapInfo::from_pin(path).map_err(|source| HandoverError::Read {
        what: "map",
        path: path.to_owned(),
        source,
    })?;
    // SAFETY-free: the raw type number is what the object file states too.
    let map_type = info
        .map_type()
        .map(|t| t as u32)
        .map_err(|source| HandoverError::Read {
            what: "map type",
            path: path.to_owned(),
            source,
        })?;
    Ok(Shape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Decides, for each state map pinned in `maps_dir` by an earlier agent, whether the new
/// program reuses it, gets a migrated copy, or (layout changed) must not start.
pub fn plan(maps_dir: &Path, opts: &LoadOptions) -> Result<CarryPlan, HandoverError> {
    let expected = expected_shapes(opts)?;
    let mut plan = CarryPlan::default();
    for name in STATE_MAPS {
        let path = maps_dir.join(name);
        let carry = if !path.exists() {
            Carry::Fresh
        } else {
            let found = pinned_shape(&path)?;
            let want = expected[name];
            if found == want {
                if name == map_names::SERVICE_STATS
                    && previous_service_counts(maps_dir) != Some(lb_common::SERVICE_COUNTS_RETIRED)
                {
                    // Counters of the format before: converted (see `Dataplane::adopt`)
                    // in a copy, so the pinned map stays as it was until this agent's
                    // pins replace it. Converted in place, an agent that failed before
                    // pinning would leave them converted under the old format's marker,
                    // and the next would convert them again.
                    Carry::Migrate(path)
                } else if name == map_names::FLOWS
                    && (previous_setting(maps_dir, lb_common::SETTINGS_FLOW_TAGS)
                        != Some(lb_common::FLOW_TAGS_BOUND)
                        || !tags_agree(&path))
                {
                    Carry::Retag(path)
                } else {
                    Carry::Reuse(path)
                }
            } else if found.map_type == want.map_type
                && found.key_size == want.key_size
                && found.value_size == want.value_size
            {
                Carry::Migrate(path)
            } else if name == map_names::FLOWS && (found.is_legacy_flows() || found.is_wide_flows())
            {
                Carry::Convert(path)
            } else {
                return Err(HandoverError::Incompatible {
                    name: name.to_string(),
                    path,
                    found,
                    expected: want,
                });
            }
        };
        plan.maps.push((name, carry));
    }
    Ok(plan)
}

/// Whether the connection table pinned at `path` carries, on a sample of its entries,
/// the tags its settings' seed gives (see `FlowTable::tags_agree`); an unreadable table
/// counts as disagreeing, so it is placed anew rather than reused blind.
fn tags_agree(path: &Path) -> bool {
    crate::flowtable::FlowTable::from_pin(path)
        .and_then(|t| t.tags_agree(64))
        .unwrap_or(false)
}

/// The epoch (`SETTINGS[SETTINGS_NEXTHOP_EPOCH]`) of the agent whose maps are pinned in
/// `maps_dir`: the clock of its connection-table entries, which a new agent continues.
/// `None` when there is no such pin or it cannot be read (the agent then continues past
/// the latest epoch its carried connection table was seen in, see
/// `Dataplane::resume_epoch_past_table`).
pub fn previous_epoch(maps_dir: &Path) -> Option<u32> {
    previous_setting(maps_dir, lb_common::SETTINGS_NEXTHOP_EPOCH)
}

/// What the service counters of the agent whose maps are pinned in `maps_dir` hold
/// (`SETTINGS[SETTINGS_SERVICE_COUNTS]`), if it recorded it.
pub fn previous_service_counts(maps_dir: &Path) -> Option<u32> {
    previous_setting(maps_dir, lb_common::SETTINGS_SERVICE_COUNTS)
}

/// The connection-table tag format (`SETTINGS[SETTINGS_FLOW_TAGS]`) the agent whose maps
/// are pinned in `maps_dir` recorded, if any.
pub fn previous_flow_tags(maps_dir: &Path) -> Option<u32> {
    previous_setting(maps_dir, lb_common::SETTINGS_FLOW_TAGS)
}

/// Entry `index` of the settings array pinned in `maps_dir` by an earlier agent, if there
/// is one of this layout that holds it.
fn previous_setting(maps_dir: &Path, index: u32) -> Option<u32> {
    let path = maps_dir.join(map_names::SETTINGS);
    let shape = pinned_shape(&path).ok()?;
    if shape.value_size as usize != size_of::<u32>() || shape.max_entries <= index {
        return None;
    }
    let data = MapData::from_pin(&path).ok()?;
    let settings: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    settings.get(&index, 0).ok()
}

/// The connection-table hash seed (`SETTINGS[SETTINGS_FLOW_SEED_LO/HI]`) of the agent
/// whose maps are pinned in `maps_dir`, which a table taken over from it must be searched
/// with: 0 for a build before seeds (its settings array is shorter; its table was placed
/// unkeyed), `None` when the pin cannot be read.
pub fn previous_flow_seed(maps_dir: &Path) -> Option<u64> {
    let path = maps_dir.join(map_names::SETTINGS);
    let shape = pinned_shape(&path).ok()?;
    if shape.value_size as usize != size_of::<u32>() {
        return None;
    }
    if shape.max_entries <= lb_common::SETTINGS_FLOW_SEED_HI {
        return Some(0);
    }
    let data = MapData::from_pin(&path).ok()?;
    let settings: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    let lo = settings.get(&lb_common::SETTINGS_FLOW_SEED_LO, 0).ok()?;
    let hi = settings.get(&lb_common::SETTINGS_FLOW_SEED_HI, 0).ok()?;
    Some(u64::from(hi) << 32 | u64::from(lo))
}

/// The ids an earlier agent gave services and backends, read from its pinned maps, so a
/// new agent gives the same ones and connection-table entries stay meaningful.
#[derive(Debug, Clone, Default)]
pub struct PreviousIds {
    /// VIP key → service id.
    pub vips: StdHashMap<VipKey, u32>,
    /// (service id, backend address) → backend id.
    pub backends: StdHashMap<(u32, IpAddr), u32>,
    /// What its service counters hold (`SETTINGS[SETTINGS_SERVICE_COUNTS]`: 0 before
    /// `SERVICE_COUNTS_RETIRED`, or when it cannot be read).
    pub service_counts: u32,
}

impl PreviousIds {
    /// Reads the ids from the VIP and backend maps pinned in `maps_dir` (empty when there
    /// are none, or when their layout is not this build's: then nothing is adopted).
    pub fn read(maps_dir: &Path) -> Result<Self, HandoverError> {
        let mut out = Self {
            service_counts: previous_setting(maps_dir, lb_common::SETTINGS_SERVICE_COUNTS)
                .unwrap_or(0),
            ..Self::default()
        };
        let vips_path = maps_dir.join(map_names::VIPS);
        let backends_path = maps_dir.join(map_names::BACKENDS);
        if !vips_path.exists() || !backends_path.exists() {
            return Ok(out);
        }
        let same_layout = |path: &Path, key: usize, value: usize| {
            pinned_shape(path)
                .map(|s| s.key_size as usize == key && s.value_size as usize == value)
                .unwrap_or(false)
        };
        if !same_layout(&vips_path, size_of::<VipKey>(), size_of::<VipInfo>())
            || !same_layout(&backends_path, size_of::<u32>(), size_of::<Backend>())
        {
            return Ok(out);
        }
        let read = |path: &Path| {
            MapData::from_pin(path).map_err(|source| HandoverError::Read {
                what: "map",
                path: path.to_owned(),
                source,
            })
        };
        let vips: HashMap<MapData, VipKey, VipInfo> =
            HashMap::try_from(aya::maps::Map::HashMap(read(&vips_path)?)).map_err(|source| {
                HandoverError::Read {
                    what: "VIP map",
                    path: vips_path.clone(),
                    source,
                }
            })?;
        for entry in vips.iter() {
            let (key, info) = entry.map_err(|source| HandoverError::Read {
                what: "VIP entry",
                path: vips_path.clone(),
                source,
            })?;
            out.vips.insert(key, info.service);
        }
        let backends: Array<MapData, Backend> =
            Array::try_from(aya::maps::Map::Array(read(&backends_path)?)).map_err(|source| {
                HandoverError::Read {
                    what: "backend map",
                    path: backends_path.clone(),
                    source,
                }
            })?;
        for (id, entry) in backends.iter().enumerate() {
            let b = entry.map_err(|source| HandoverError::Read {
                what: "backend entry",
                path: backends_path.clone(),
                source,
            })?;
            if b.family != 0 {
                let id = u32::try_from(id).unwrap_or(u32::MAX);
                out.backends
                    .insert((b.service, addr_from_bytes(b.addr, b.family)), id);
            }
        }
        Ok(out)
    }
}

/// Name of the pinned XDP link of `interface` inside the pin directory.
pub fn link_pin(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("link-{interface}"))
}

/// Pinned links in `pin_dir` (file names starting with `link-`).
pub fn link_pins(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link-"))
        })
        .collect()
}

/// Detaches every pinned link in `pin_dir` and removes the directory with all its pins:
/// what `l3lb down` does. Returns the links detached.
pub fn down(pin_dir: &Path) -> std::io::Result<usize> {
    let links = link_pins(pin_dir);
    // Removing the last reference to a link (its pin; no agent holds it once stopped)
    // detaches its program from the interface.
    for l in &links {
        std::fs::remove_file(l)?;
    }
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
    }
    Ok(links.len())
}
