//! `l3lb flows`: the connection-table entries of one VIP, newest first, from the pins.
//!
//! The connection table is an array of buckets (see [`crate::flowtable`]): its order is
//! the flows' hash, which says nothing about age. Each entry carries the time it was
//! written (`FlowState::created_ns`, set by the program on insert only), so the listing
//! walks the table once (its capacity of entries, through a memory mapping), keeps the
//! entries of the VIP, sorts them by that time and prints the first `limit`. Like
//! `l3lb status`, it reads only pins and works without an agent.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    str::FromStr,
};

use aya::maps::{Array, MapData};
use lb_common::{Backend, FlowKey, FlowState, map_names};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    dataplane::{addr_bytes, addr_from_bytes},
    status::{Align, Pins, ReadError, ServiceNames, endpoint, protocol_label, write_table},
};

/// Entries `l3lb flows` prints unless `--limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;

/// Which connection-table entries to list: those to a VIP address, and port if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipFilter {
    /// The VIP address.
    pub address: IpAddr,
    /// The VIP port; `None` lists every port of the address.
    pub port: Option<u16>,
}

/// Why a `--vip` argument was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VipFilterError {
    /// Neither an address nor an address with a port.
    #[error("{0:?} is not ADDR or ADDR:PORT (an IPv6 address with a port is written [ADDR]:PORT)")]
    Syntax(String),
    /// Port 0, which no flow has.
    #[error("port 0 in {0:?}: leave the port out to list every port of the address")]
    PortZero(String),
}

impl FromStr for VipFilter {
    type Err = VipFilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(VipFilterError::PortZero(s.to_string()));
            }
            return Ok(Self {
                address: sa.ip(),
                port: Some(sa.port()),
            });
        }
        // `[fd00::1]` without a port is accepted too.
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse::<IpAddr>()
            .map(|address| Self {
                address,
                port: None,
            })
            .map_err(|_| VipFilterError::Syntax(s.to_string()))
    }
}

impl std::fmt::Display for VipFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => f.write_str(&endpoint(self.address, p)),
            None => write!(f, "{}", self.address),
        }
    }
}

impl VipFilter {
    /// Whether the connection-table entry `key` is a flow to this VIP.
    pub fn matches(&self, key: &FlowKey) -> bool {
        let (addr, family) = addr_bytes(self.address);
        key.family == family
            && key.dst == addr
            && self.port.is_none_or(|p| u16::from_be(key.dport) == p)
    }
}

/// One connection-table entry, as `l3lb flows` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEntry {
    /// Client address.
    pub client: IpAddr,
    /// Client port.
    pub client_port: u16,
    /// VIP address.
    pub vip: IpAddr,
    /// VIP port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Service id the flow was balanced for.
    pub service_id: u32,
    /// Its name (`None` when the pins hold no names).
    pub service: Option<String>,
    /// Backend id the flow is pinned to.
    pub backend_id: u32,
    /// The backend's address; `None` when that id no longer belongs to the flow's service
    /// (the flow's next packet is balanced afresh).
    pub backend: Option<IpAddr>,
    /// CLOCK_MONOTONIC nanoseconds when the entry was written (its first packet, a SYN,
    /// or a packet of a flow the table had lost).
    pub created_ns: u64,
    /// Milliseconds since then, when the report was made.
    pub age_ms: u64,
}

/// What `l3lb flows` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowList {
    /// The VIP asked about, as given (`ADDR` or `ADDR:PORT`).
    pub vip: String,
    /// Entries to that VIP found in the table (before the limit).
    pub matched: u64,
    /// Live entries walked: the whole table, counted now.
    pub scanned: u64,
    /// The table's capacity (buckets × `FLOW_WAYS`).
    pub capacity: u32,
    /// The most entries listed.
    pub limit: usize,
    /// The newest `limit` of the matched entries, newest first.
    pub flows: Vec<FlowEntry>,
}

/// The newest `limit` entries of `entries` that match `filter`, newest first, and how
/// many matched. A key seen twice (an entry rewritten by the data plane under the walk)
/// counts once.
pub fn newest(
    entries: impl IntoIterator<Item = (FlowKey, FlowState)>,
    filter: &VipFilter,
    limit: usize,
) -> (u64, Vec<(FlowKey, FlowState)>) {
    let mut n = Newest::new(limit);
    for (k, st) in entries {
        if filter.matches(&k) {
            n.offer(k, st);
        }
    }
    n.finish()
}

/// An entry ranked newer first; ties (entries written within one clock tick) by the
/// client, so the order is stable from one run to the next.
struct Ranked(u64, Reverse<([u8; 16], u16)>, FlowKey, FlowState);

impl Ranked {
    fn rank(&self) -> (u64, Reverse<([u8; 16], u16)>) {
        (self.0, self.1)
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank() == other.rank()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// The newest `limit` of the entries offered, and how many distinct keys were offered,
/// in memory that follows `limit`, not the table: keys are remembered by a 64-bit hash
/// each (16 bytes a key; keeping every matching entry took 234 MB for a million).
struct Newest {
    limit: usize,
    seen: HashSet<u64>,
    /// The oldest kept entry on top, to give way to a newer one.
    kept: BinaryHeap<Reverse<Ranked>>,
}

impl Newest {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            seen: HashSet::new(),
            kept: BinaryHeap::with_capacity(limit.saturating_add(1).min(1 << 16)),
        }
    }

    fn offer(&mut self, k: FlowKey, st: FlowState) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        if !self.seen.insert(h.finish()) {
            return;
        }
        self.kept.push(Reverse(Ranked(
            st.created_ns,
            Reverse((k.src, k.sport)),
            k,
            st,
        )));
        if self.kept.len() > self.limit {
            self.kept.pop();
        }
    }

    /// (distinct keys offered, the newest `limit`, newest first).
    fn finish(self) -> (u64, Vec<(FlowKey, FlowState)>) {
        // Sorted ascending by `Reverse`: the newest first.
        let out = self
            .kept
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(Ranked(_, _, k, st))| (k, st))
            .collect();
        (self.seen.len() as u64, out)
    }
}

/// Now on CLOCK_MONOTONIC, in nanoseconds: the clock of the entries' creation stamps,
/// which the data plane reads as of the kernel's last tick (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given; CLOCK_MONOTONIC always
    // exists, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Lists the connection-table entries to `filter` from the pins in `pin_dir`
/// (`<pin_path>/v1`): at most `limit`, newest first. The walk reads the table's memory
/// once.
pub fn read(pin_dir: &Path, filter: &VipFilter, limit: usize) -> Result<FlowList, ReadError> {
    let pins = Pins::new(pin_dir);
    let table = pins.flow_table()?;
    let capacity = table.capacity();
    // Ages are as of the start of the walk, which takes a while on a large table.
    let now = monotonic_ns();
    let mut scanned = 0u64;
    let mut kept = Newest::new(limit);
    table.for_each(|key, state| {
        scanned += 1;
        if filter.matches(key) {
            kept.offer(*key, *state);
        }
    })?;
    let (matched, newest) = kept.finish();

    let mut names = ServiceNames::open(&pins)?;
    let backends: Array<MapData, Backend> = pins.open(map_names::BACKENDS)?;
    let mut flows = Vec::with_capacity(newest.len());
    for (k, st) in newest {
        let backend = if st.backend < backends.len() {
            let b = backends
                .get(&st.backend, 0)
                .map_err(|source| ReadError::Read {
                    what: format!("backend {}", st.backend),
                    source,
                })?;
            (b.family != 0 && b.service == st.service).then(|| addr_from_bytes(b.addr, b.family))
        } else {
            None
        };
        flows.push(FlowEntry {
            client: addr_from_bytes(k.src, k.family),
            client_port: u16::from_be(k.sport),
            vip: addr_from_bytes(k.dst, k.family),
            port: u16::from_be(k.dport),
            protocol: protocol_label(k.proto),
            service_id: st.service,
            service: names.get(st.service)?,
            backend_id: st.backend,
            backend,
            created_ns: st.created_ns,
            age_ms: now.saturating_sub(st.created_ns) / 1_000_000,
        });
    }
    Ok(FlowList {
        vip: filter.to_string(),
        matched,
        scanned,
        capacity,
        limit,
        flows,
    })
}

/// An age as people read it: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Renders the listing as a table with a line saying what it shows.
pub fn render(l: &FlowList) -> String {
    use Align::{Left, Right};
    let mut out = format!(
        "FLOWS TO {} (newest first): {} of {} matching entries; {} entries of {} walked now\n",
        l.vip,
        l.flows.len(),
        l.matched,
        l.scanned,
        l.capacity
    );
    let rows: Vec<Vec<String>> = l
        .flows
        .iter()
        .map(|f| {
            vec![
                endpoint(f.client, f.client_port),
                endpoint(f.vip, f.port),
                f.protocol.clone(),
                f.service
                    .clone()
                    .unwrap_or_else(|| format!("#{}", f.service_id)),
                f.backend
                    .map_or_else(|| "- (gone)".to_string(), |b| b.to_string()),
                age(f.age_ms),
            ]
        })
        .collect();
    write_table(
        &mut out,
        &[
            ("CLIENT", Left),
            ("VIP", Left),
            ("PROTO", Left),
            ("SERVICE", Left),
            ("BACKEND", Left),
            ("AGE", Right),
        ],
        &rows,
    );
    if l.matched > l.flows.len() as u64 {
        out.push_str(&format!(
            "  … {} older entries not shown (--limit)\n",
            l.matched - l.flows.len() as u64
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use lb_common::{FAMILY_V4, PROTO_TCP, PROTO_UDP};

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    fn key(dst: Ipv4Addr, dport: u16, sport: u16, proto: u8) -> FlowKey {
        let mut k = FlowKey {
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[203, 0, 113, 7]);
        k.dst[..4].copy_from_slice(&dst.octets());
        k
    }

    fn state(created_ns: u64) -> FlowState {
        FlowState {
            backend: 1,
            service: 0,
            created_ns,
        }
    }

    #[test]
    fn vip_argument_takes_address_and_optional_port() {
        let v4: VipFilter = "192.0.2.10:80".parse().expect("v4 with port");
        assert_eq!((v4.address, v4.port), (IpAddr::V4(VIP), Some(80)));
        let bare: VipFilter = "192.0.2.10".parse().expect("v4");
        assert_eq!(bare.port, None);
        let v6: VipFilter = "[fd00::10]:443".parse().expect("v6 with port");
        assert_eq!(v6.address, IpAddr::V6("fd00::10".parse().expect("addr")));
        assert_eq!(v6.port, Some(443));
        assert_eq!(
            "fd00::10".parse::<VipFilter>().expect("v6").port,
            None,
            "a bare IPv6 address has no port"
        );
        assert_eq!("[fd00::10]".parse::<VipFilter>().expect("v6").port, None);
        assert_eq!(
            "192.0.2.10:0".parse::<VipFilter>(),
            Err(VipFilterError::PortZero("192.0.2.10:0".into()))
        );
        assert!(matches!(
            "web".parse::<VipFilter>(),
            Err(VipFilterError::Syntax(_))
        ));
        assert_eq!(v6.to_string(), "[fd00::10]:443");
        assert_eq!(bare.to_string(), "192.0.2.10");
    }

    #[test]
    fn filter_matches_address_family_and_port() {
        let with_port = VipFilter {
            address: IpAddr::V4(VIP),
            port: Some(80),
        };
        let any_port = VipFilter {
            address: IpAddr::V4(VIP),
            port: None,
        };
        let k80 = key(VIP, 80, 1000, PROTO_TCP);
        let k53 = key(VIP, 53, 1000, PROTO_UDP);
        let other = key(Ipv4Addr::new(192, 0, 2, 11), 80, 1000, PROTO_TCP);
        assert!(with_port.matches(&k80));
        assert!(!with_port.matches(&k53));
        assert!(any_port.matches(&k53));
        assert!(!any_port.matches(&other));
        // The IPv4 address's bytes in an IPv6 key are another VIP.
        let mut v6 = k80;
        v6.family = lb_common::FAMILY_V6;
        assert!(!any_port.matches(&v6));
        let v6_filter = VipFilter {
            address: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: None,
        };
        assert!(!v6_filter.matches(&k80));
    }

    #[test]
    fn newest_first_bounded_and_deduplicated() {
        let filter = VipFilter {
            address: IpAddr::V4(VIP),
            port: Some(80),
        };
        let entries = vec![
            (key(VIP, 80, 1001, PROTO_TCP), state(10)),
            (key(VIP, 80, 1002, PROTO_TCP), state(30)),
            (key(VIP, 53, 1003, PROTO_UDP), state(99)),
            (key(VIP, 80, 1004, PROTO_TCP), state(20)),
            // Seen again after a restarted walk.
            (key(VIP, 80, 1002, PROTO_TCP), state(30)),
        ];
        let (matched, top) = newest(entries.clone(), &filter, 2);
        assert_eq!(matched, 3, "three distinct flows to port 80");
        let ports: Vec<u16> = top.iter().map(|(k, _)| u16::from_be(k.sport)).collect();
        assert_eq!(ports, [1002, 1004], "newest first, cut at the limit");
        let (_, all) = newest(entries, &filter, 100);
        let ports: Vec<u16> = all.iter().map(|(k, _)| u16::from_be(k.sport)).collect();
        assert_eq!(ports, [1002, 1004, 1001]);
    }

    #[test]
    fn the_newest_are_kept_in_memory_that_follows_the_limit() {
        let mut n = Newest::new(3);
        // 10 000 flows in a scrambled order of creation, one of them met twice.
        for i in 0..10_000u64 {
            let t = (i * 7_919) % 10_000;
            n.offer(key(VIP, 80, (i % 60_000) as u16 + 1, PROTO_TCP), state(t));
            assert!(n.kept.len() <= 3, "more kept than the limit");
        }
        n.offer(key(VIP, 80, 1, PROTO_TCP), state(0));
        let (matched, top) = n.finish();
        assert_eq!(matched, 10_000);
        let stamps: Vec<u64> = top.iter().map(|(_, st)| st.created_ns).collect();
        assert_eq!(stamps, [9_999, 9_998, 9_997]);
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_345), "12.3s");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(7_380_000), "2h03m");
    }

    #[test]
    fn listing_renders_as_a_table_and_says_what_was_left_out() {
        let list = FlowList {
            vip: "192.0.2.10:80".into(),
            matched: 3,
            scanned: 10,
            capacity: 4096,
            limit: 2,
            flows: vec![
                FlowEntry {
                    client: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
                    client_port: 40001,
                    vip: IpAddr::V4(VIP),
                    port: 80,
                    protocol: "tcp".into(),
                    service_id: 0,
                    service: Some("web".into()),
                    backend_id: 1,
                    backend: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11))),
                    created_ns: 5,
                    age_ms: 1500,
                },
                FlowEntry {
                    client: IpAddr::V6("2001:db8::7".parse().expect("addr")),
                    client_port: 40002,
                    vip: IpAddr::V4(VIP),
                    port: 80,
                    protocol: "tcp".into(),
                    service_id: 3,
                    service: None,
                    backend_id: 9,
                    backend: None,
                    created_ns: 4,
                    age_ms: 61_000,
                },
            ],
        };
        let text = render(&list);
        let expected = "\
FLOWS TO 192.0.2.10:80 (newest first): 2 of 3 matching entries; 10 entries of 4096 walked now
  CLIENT               VIP            PROTO  SERVICE  BACKEND      AGE
  203.0.113.7:40001    192.0.2.10:80  tcp    web      10.0.0.11   1.5s
  [2001:db8::7]:40002  192.0.2.10:80  tcp    #3       - (gone)   1m01s
  … 1 older entries not shown (--limit)
";
        assert_eq!(text, expected, "\n{text}");
        let json = serde_json::to_value(&list).expect("json");
        assert_eq!(json["flows"][0]["backend"], "10.0.0.11");
        assert_eq!(json["flows"][0]["client_port"], 40001);
        assert_eq!(json["flows"][1]["backend"], serde_json::Value::Null);
    }
}
