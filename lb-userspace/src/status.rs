//! `l3lb status`: reads the pinned maps and reports VIPs, backends and counters.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use lb_common::{
    Action, Backend, BackendStats, DropReason, FlowKey, FlowState, ServiceStats, SrcRangeV4,
    SrcRangeV6, VipInfo, VipKey, map_names,
};
use serde::{Deserialize, Serialize};

use crate::dataplane::addr_from_bytes;

/// One VIP entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VipStatus {
    /// VIP address.
    pub address: IpAddr,
    /// Port, 0 for all ports.
    pub port: u16,
    /// Protocol name.
    pub protocol: String,
    /// Service id.
    pub service: u32,
    /// `ipip` or `l2`.
    pub forwarding: String,
    /// `none` or `client_ip` (session affinity).
    #[serde(default)]
    pub affinity: String,
    /// Client networks the service admits (from the source-range tries); empty: everyone.
    #[serde(default)]
    pub source_ranges: Vec<String>,
}

/// Counters of one service, summed over CPUs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Service id.
    pub service: u32,
    /// Packets received.
    pub packets: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Flows that took a fresh Maglev choice.
    pub new_flows: u64,
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
    /// Entries of its service's active Maglev table that name it: its share of new flows
    /// (proportional to its weight; 0 for a weight-0 backend that keeps only old flows).
    #[serde(default)]
    pub table_entries: u32,
}

/// Everything `l3lb status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// VIP entries.
    pub vips: Vec<VipStatus>,
    /// Per-service counters (services with traffic or VIPs).
    pub services: Vec<ServiceCounters>,
    /// Backends in use.
    pub backends: Vec<BackendStatus>,
    /// Drops by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Outcomes by action.
    pub actions: std::collections::BTreeMap<String, u64>,
    /// Events (counted besides the outcome), by name.
    pub events: std::collections::BTreeMap<String, u64>,
    /// Entries in the connection table.
    pub flows: u64,
    /// Sources whose encapsulated packets the decap role accepts (CIDRs).
    #[serde(default)]
    pub decap_allow: Vec<String>,
}

fn open_data(dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = dir.join("maps").join(name);
    MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is l3lb running?)", path.display()))
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let data = open_data(dir, name)?;
    Map::from_map_data(data).with_context(|| format!("reading {name}"))
}

fn max_entries(dir: &Path, name: &str) -> anyhow::Result<u32> {
    Ok(open_data(dir, name)?
        .info()
        .with_context(|| format!("map info of {name}"))?
        .max_entries())
}

/// The (key data, prefix length) entries of an LPM trie.
fn trie_entries<K: aya::Pod>(dir: &Path, name: &str) -> anyhow::Result<Vec<(K, u32)>> {
    let trie: LpmTrie<MapData, K, u32> = open(dir, name)?.try_into()?;
    trie.keys()
        .map(|k| {
            let k = k.with_context(|| format!("iterating {name}"))?;
            Ok((k.data(), k.prefix_len()))
        })
        .collect()
}

/// Source ranges per service id, from the two source-range tries (whose keys are the
/// service id, 32 bits, then the network).
fn source_ranges(dir: &Path) -> anyhow::Result<BTreeMap<u32, Vec<String>>> {
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (k, len) in trie_entries::<SrcRangeV4>(dir, map_names::SRC_V4)? {
        let net = format!("{}/{}", Ipv4Addr::from(k.addr), len.saturating_sub(32));
        out.entry(u32::from_be_bytes(k.service))
            .or_default()
            .push(net);
    }
    for (k, len) in trie_entries::<SrcRangeV6>(dir, map_names::SRC_V6)? {
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

fn per_cpu_sum(dir: &Path, name: &str, len: u32) -> anyhow::Result<Vec<u64>> {
    let map: PerCpuArray<MapData, u64> = open(dir, name)?.try_into()?;
    (0..len)
        .map(|i| {
            Ok(map
                .get(&i, 0)
                .with_context(|| format!("{name}[{i}]"))?
                .iter()
                .sum())
        })
        .collect()
}

/// Reads the status from the pins in `pin_dir` (`<pin_path>/v1`).
pub fn read(pin_dir: &Path) -> anyhow::Result<Status> {
    let vip_map: HashMap<MapData, VipKey, VipInfo> = open(pin_dir, map_names::VIPS)?.try_into()?;
    let ranges = source_ranges(pin_dir)?;
    let mut vips = Vec::new();
    let mut rings: BTreeMap<u32, u32> = BTreeMap::new();
    for item in vip_map.iter() {
        let (k, v) = item.context("iterating VIPs")?;
        rings.insert(v.service, v.ring);
        vips.push(VipStatus {
            address: addr_from_bytes(k.addr, k.family),
            port: u16::from_be(k.port),
            protocol: match k.proto {
                lb_common::PROTO_TCP => "tcp".into(),
                lb_common::PROTO_UDP => "udp".into(),
                p => p.to_string(),
            },
            service: v.service,
            forwarding: if v.flags & lb_common::SERVICE_F_L2 != 0 {
                "l2".into()
            } else {
                "ipip".into()
            },
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

    let svc_stats: PerCpuArray<MapData, ServiceStats> =
        open(pin_dir, map_names::SERVICE_STATS)?.try_into()?;
    let mut ids: Vec<u32> = vips.iter().map(|v| v.service).collect();
    ids.sort();
    ids.dedup();
    let mut services = Vec::new();
    for id in ids {
        let per_cpu = svc_stats
            .get(&id, 0)
            .with_context(|| format!("service stats {id}"))?;
        services.push(ServiceCounters {
            service: id,
            packets: per_cpu.iter().map(|s| s.packets).sum(),
            bytes: per_cpu.iter().map(|s| s.bytes).sum(),
            new_flows: per_cpu.iter().map(|s| s.new_flows).sum(),
        });
    }

    // Each service owns two ring slots of `ring_size` entries; count, in the active one,
    // how many entries name each backend.
    let ring_entries = max_entries(pin_dir, map_names::RINGS)?;
    let max_services = max_entries(pin_dir, map_names::SERVICE_STATS)?.max(1);
    let ring_size = ring_entries / (2 * max_services);
    let ring_map: Array<MapData, u32> = open(pin_dir, map_names::RINGS)?.try_into()?;
    let mut table_entries: BTreeMap<u32, u32> = BTreeMap::new();
    for slot in rings.values() {
        let start = slot * ring_size;
        for i in start..start + ring_size {
            let id = ring_map
                .get(&i, 0)
                .with_context(|| format!("ring entry {i}"))?;
            *table_entries.entry(id).or_default() += 1;
        }
    }

    let be_map: Array<MapData, Backend> = open(pin_dir, map_names::BACKENDS)?.try_into()?;
    let be_stats: PerCpuArray<MapData, BackendStats> =
        open(pin_dir, map_names::BACKEND_STATS)?.try_into()?;
    let mut backends = Vec::new();
    for id in 0..be_map.len() {
        let b = be_map
            .get(&id, 0)
            .with_context(|| format!("backend {id}"))?;
        if b.family == 0 {
            continue;
        }
        let st = be_stats
            .get(&id, 0)
            .with_context(|| format!("backend stats {id}"))?;
        backends.push(BackendStatus {
            id,
            service: b.service,
            address: addr_from_bytes(b.addr, b.family),
            local: b.flags & lb_common::BACKEND_F_LOCAL != 0,
            packets: st.iter().map(|s| s.packets).sum(),
            bytes: st.iter().map(|s| s.bytes).sum(),
            table_entries: table_entries.get(&id).copied().unwrap_or(0),
        });
    }

    let drops = per_cpu_sum(pin_dir, map_names::DROPS, lb_common::DROP_REASON_COUNT)?;
    let actions = per_cpu_sum(pin_dir, map_names::ACTIONS, lb_common::ACTION_COUNT)?;
    let events = per_cpu_sum(pin_dir, map_names::EVENTS, lb_common::EVENT_COUNT)?;
    let flows_map: HashMap<MapData, FlowKey, FlowState> =
        open(pin_dir, map_names::FLOWS)?.try_into()?;
    let flows = flows_map.keys().count() as u64;
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
        flows,
        decap_allow: decap_allow(pin_dir)?,
    })
}

fn decap_allow(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = trie_entries::<[u8; 4]>(dir, map_names::DECAP_V4)?
        .into_iter()
        .map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(a)))
        .chain(
            trie_entries::<[u8; 16]>(dir, map_names::DECAP_V6)?
                .into_iter()
                .map(|(a, len)| format!("{}/{len}", Ipv6Addr::from(a))),
        )
        .collect();
    out.sort();
    Ok(out)
}

/// Renders the status as readable tables.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VIPS\n  {:<40} {:>5} {:<5} {:>7} {:<5} {:<9} SOURCE RANGES",
        "ADDRESS", "PORT", "PROTO", "SERVICE", "MODE", "AFFINITY"
    );
    for v in &s.vips {
        let port = if v.port == 0 {
            "*".to_string()
        } else {
            v.port.to_string()
        };
        let ranges = if v.source_ranges.is_empty() {
            "*".to_string()
        } else {
            v.source_ranges.join(",")
        };
        let _ = writeln!(
            out,
            "  {:<40} {:>5} {:<5} {:>7} {:<5} {:<9} {ranges}",
            v.address, port, v.protocol, v.service, v.forwarding, v.affinity
        );
    }
    let _ = writeln!(
        out,
        "SERVICES\n  {:>7} {:>12} {:>14} {:>10}",
        "SERVICE", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for c in &s.services {
        let _ = writeln!(
            out,
            "  {:>7} {:>12} {:>14} {:>10}",
            c.service, c.packets, c.bytes, c.new_flows
        );
    }
    let _ = writeln!(
        out,
        "BACKENDS\n  {:>4} {:>7} {:<40} {:>5} {:>8} {:>12} {:>14}",
        "ID", "SERVICE", "ADDRESS", "LOCAL", "TABLE", "PACKETS", "BYTES"
    );
    for b in &s.backends {
        let _ = writeln!(
            out,
            "  {:>4} {:>7} {:<40} {:>5} {:>8} {:>12} {:>14}",
            b.id, b.service, b.address, b.local, b.table_entries, b.packets, b.bytes
        );
    }
    if !s.decap_allow.is_empty() {
        let _ = writeln!(out, "DECAP ALLOWED FROM\n  {}", s.decap_allow.join(", "));
    }
    let _ = writeln!(out, "CONNECTION TABLE\n  {} entries", s.flows);
    let _ = writeln!(out, "ACTIONS");
    for (k, v) in &s.actions {
        let _ = writeln!(out, "  {k:<20} {v}");
    }
    let _ = writeln!(out, "EVENTS");
    for (k, v) in &s.events {
        let _ = writeln!(out, "  {k:<20} {v}");
    }
    let _ = writeln!(out, "DROPS");
    for (k, v) in &s.drops {
        let _ = writeln!(out, "  {k:<20} {v}");
    }
    out
}
