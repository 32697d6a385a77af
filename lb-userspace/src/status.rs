//! `l3lb status`: reads the pinned maps and reports VIPs, backends and counters.

use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    Action, Backend, BackendStats, DropReason, FlowKey, FlowState, ServiceStats, VipInfo, VipKey,
    map_names,
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
    /// Entries in the connection table (at most its size; see `count_flows`).
    pub flows: u64,
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is l3lb running?)", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}

/// Entries in the connection table, read key by key.
///
/// The data plane inserts and evicts while this reads, and when the key just read is
/// evicted the kernel's next-key call starts again from the first key: a busy table
/// (say under a SYN flood) would be counted several times over, for as long as the
/// churn lasts. The walk therefore stops after as many keys as the table can hold, and
/// the count never exceeds that size: it is exact on a quiet table, and the table's
/// size when every slot is being recycled.
fn count_flows(pin_dir: &Path) -> anyhow::Result<u64> {
    let path = pin_dir.join("maps").join(map_names::FLOWS);
    let capacity = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is l3lb running?)", path.display()))?
        .max_entries();
    let flows_map: HashMap<MapData, FlowKey, FlowState> =
        open(pin_dir, map_names::FLOWS)?.try_into()?;
    Ok(flows_map.keys().take(capacity as usize).count() as u64)
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
    let mut vips = Vec::new();
    for item in vip_map.iter() {
        let (k, v) = item.context("iterating VIPs")?;
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
        });
    }

    let drops = per_cpu_sum(pin_dir, map_names::DROPS, lb_common::DROP_REASON_COUNT)?;
    let actions = per_cpu_sum(pin_dir, map_names::ACTIONS, lb_common::ACTION_COUNT)?;
    let events = per_cpu_sum(pin_dir, map_names::EVENTS, lb_common::EVENT_COUNT)?;
    let flows = count_flows(pin_dir)?;
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
    })
}

/// Renders the status as readable tables.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VIPS\n  {:<40} {:>5} {:<5} {:>7} {:<5}",
        "ADDRESS", "PORT", "PROTO", "SERVICE", "MODE"
    );
    for v in &s.vips {
        let port = if v.port == 0 {
            "*".to_string()
        } else {
            v.port.to_string()
        };
        let _ = writeln!(
            out,
            "  {:<40} {:>5} {:<5} {:>7} {:<5}",
            v.address, port, v.protocol, v.service, v.forwarding
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
        "BACKENDS\n  {:>4} {:>7} {:<40} {:>5} {:>12} {:>14}",
        "ID", "SERVICE", "ADDRESS", "LOCAL", "PACKETS", "BYTES"
    );
    for b in &s.backends {
        let _ = writeln!(
            out,
            "  {:>4} {:>7} {:<40} {:>5} {:>12} {:>14}",
            b.id, b.service, b.address, b.local, b.packets, b.bytes
        );
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
