//! Packet fixtures through `BPF_PROG_TEST_RUN`: the real XDP object, maps written by the
//! agent's own map writer, input frame → expected verdict and exact output bytes.
//!
//! Each test moves its thread into a fresh network namespace (unshare) holding one veth
//! with permanent neighbour entries for the backends, so `bpf_fib_lookup` answers
//! deterministically; the namespace disappears with the thread. Needs root.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::MapData;
use common::*;
use l3lb::dataplane::{Dataplane, Desired, LoadOptions, tunnel_pair_word};
use lb_common::{DropReason, PROTO_TCP, PROTO_UDP, map_names};

#[test]
fn verifier_accepts_program_and_reports_instruction_count() {
    let f = Fixture::new(true, &standard_desired());
    let n = f.dp.verified_instructions().expect("info");
    println!("verifier processed instructions: {n:?}");
    // The kernel's complexity limit is 1,000,000; keep a wide margin as features grow.
    assert!(
        n.is_some_and(|n| n < 500_000),
        "verifier instruction count {n:?}"
    );
}

#[test]
fn non_vip_traffic_passes_untouched() {
    let f = Fixture::new(false, &standard_desired());
    let other = Ipv4Addr::new(192, 0, 2, 99);
    f.expect_pass_unchanged(
        &client_tcp(other, 1000, 80, SYN),
        "TCP to a non-VIP address",
    );
    f.expect_pass_unchanged(
        &client_tcp(VIP, 1000, 8080, SYN),
        "TCP to a VIP on an unbalanced port",
    );
    let udp_to_tcp_vip = client_udp(VIP, 1, 80, b"x");
    f.expect_pass_unchanged(&udp_to_tcp_vip, "UDP to a TCP-only VIP");
    let arp = eth([0xff; 6], CLIENT_MAC, &[], 0x0806, &[0u8; 28]);
    f.expect_pass_unchanged(&arp, "ARP");
    let icmp = eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x0800,
        &ipv4(CLIENT, NODE, 1, &[], &[8, 0, 0, 0, 0, 1, 0, 1], false),
    );
    f.expect_pass_unchanged(&icmp, "ping to the node");
    let v6 = eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x86dd,
        &ipv6(CLIENT6, OTHER6, PROTO_TCP, &tcp(1, 80, SYN, b"")),
    );
    f.expect_pass_unchanged(&v6, "IPv6 to a non-VIP address");
}

#[test]
fn tcp_to_vip_is_encapsulated_toward_backend() {
    let f = Fixture::new(false, &standard_desired());
    let frame = client_tcp(VIP, 40000, 80, SYN);
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, expected_ipip(&frame[14..], B1, B1_MAC));
}

#[test]
fn ipv4_options_and_vlan_tags_are_handled() {
    let f = Fixture::new(false, &standard_desired());
    let inner = ipv4(
        CLIENT,
        VIP,
        PROTO_TCP,
        &[0x01, 0x01, 0x01, 0x00],
        &tcp(40001, 80, SYN, b""),
        false,
    );
    let (verdict, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &inner));
    assert_eq!(verdict, XDP_TX, "IPv4 with options");
    assert_eq!(
        out,
        expected_ipip_no_df(&inner, B1, B1_MAC, &out).0,
        "IPv4 with options: whole inner header carried"
    );

    let inner = ipv4(
        CLIENT,
        VIP,
        PROTO_TCP,
        &[],
        &tcp(40002, 80, SYN, b"x"),
        true,
    );
    for tags in [&[7u16][..], &[7, 8][..]] {
        let (verdict, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, tags, 0x0800, &inner));
        assert_eq!(verdict, XDP_TX, "{} VLAN tag(s)", tags.len());
        assert_eq!(
            out,
            expected_ipip(&inner, B1, B1_MAC),
            "{} VLAN tag(s)",
            tags.len()
        );
    }
}

#[test]
fn l2_forwarding_rewrites_only_macs() {
    let f = Fixture::new(false, &standard_desired());
    let ip = ipv4(
        CLIENT,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(5353, 53, b"query"),
        false,
    );
    let frame = eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &ip);
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, eth(B2_MAC, NODE_MAC, &[], 0x0800, &ip));
}

#[test]
fn all_ports_vip_and_local_backend() {
    let f = Fixture::new(false, &standard_desired());
    let frame = client_tcp(VIP_ALL, 1234, 8443, SYN);
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX, "all-ports VIP");
    assert_eq!(out, expected_ipip(&frame[14..], B3, B3_MAC));
    f.expect_pass_unchanged(
        &client_tcp(VIP_LOCAL, 1234, 80, SYN),
        "backend is this node",
    );
}

// Malformed and hostile input (truncation, bad headers, spoofed sources, …) is the
// matrix in `malformed.rs`.
#[test]
fn unresolved_neighbours_are_counted_and_oversize_packets_answered() {
    let f = Fixture::new(false, &standard_desired());
    // Packets and bytes counted for backends, summed over backends and CPUs.
    let sent = |f: &Fixture| -> (u64, u64) {
        let map: aya::maps::PerCpuArray<&MapData, lb_common::BackendStats> =
            aya::maps::PerCpuArray::try_from(f.dp.map(map_names::BACKEND_STATS).expect("map"))
                .expect("typed");
        (0..map.len())
            .flat_map(|i| {
                map.get(&i, 0)
                    .expect("get")
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes))
    };
    let before = sent(&f);
    f.expect_drop(
        &client_tcp(VIP_NONEIGH, 1, 80, SYN),
        DropReason::NoNeighbour,
        "backend without neighbour entry",
    );

    let big = client_v4(VIP, PROTO_TCP, &tcp(2, 80, SYN, &[0u8; 1460]), true);
    let (verdict, out) = f.run(&big);
    assert_eq!(
        verdict, XDP_TX,
        "a packet too big for IPIP is answered, not dropped"
    );
    assert_eq!(out, expected_frag_needed(&big[14..], 1480));
    // Neither reached its backend: no backend counts them (the drop and the answer are
    // counted by their reasons).
    assert_eq!(sent(&f), before);
    let ok = client_tcp(VIP, 3, 80, SYN);
    let (verdict, _) = f.run(&ok);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(sent(&f), (before.0 + 1, before.1 + (ok.len() - 14) as u64));
}

#[test]
fn connection_table_keeps_flows_on_their_backend() {
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    let macs = [(B1, B1_MAC), (B2, B2_MAC), (B3, B3_MAC)];
    let backend_of = |out: &[u8]| -> Ipv4Addr {
        let d = &out[14 + 16..14 + 20];
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    };
    // Open 60 flows to the three-backend service and remember where each went.
    let mut placed = Vec::new();
    for port in 0..60u16 {
        let (v, out) = f.run(&client_tcp(VIP, 30000 + port, 443, SYN));
        assert_eq!(v, XDP_TX);
        let b = backend_of(&out);
        let mac = macs.iter().find(|(a, _)| *a == b).expect("known backend").1;
        assert_eq!(
            &out[0..6],
            &mac,
            "destination MAC is the backend's neighbour entry"
        );
        placed.push((30000 + port, b));
    }
    let used: std::collections::HashSet<_> = placed.iter().map(|p| p.1).collect();
    assert_eq!(used.len(), 3, "60 flows use all three backends");

    // Reweight so Maglev would move many flows; established (non-SYN) packets stay put.
    desired.services[5].backends[0].weight = 10;
    let sum = f.dp.apply(&desired).expect("reapply");
    assert_eq!(
        sum.tables_written, 1,
        "only the changed service's table is rewritten: {sum}"
    );
    for (port, b) in &placed {
        let (v, out) = f.run(&client_tcp(VIP, *port, 443, ACK));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            backend_of(&out),
            *b,
            "flow from port {port} stayed on its backend"
        );
    }
    // A removed backend gets no packets, even from flows that were on it.
    desired.services[5]
        .backends
        .retain(|b| b.address != IpAddr::V4(B2));
    f.dp.apply(&desired).expect("remove B2");
    for (port, b) in &placed {
        let (_, out) = f.run(&client_tcp(VIP, *port, 443, ACK));
        assert_ne!(
            backend_of(&out),
            B2,
            "flow from port {port} left the removed backend"
        );
        if *b != B2 {
            assert_eq!(
                backend_of(&out),
                *b,
                "flow from port {port} on a surviving backend stayed"
            );
        }
    }
}

/// The connection-table entry of the client flow from `sport` to `VIP:dport`.
fn flow_entry(f: &Fixture, sport: u16, dport: u16) -> Option<lb_common::FlowEntry> {
    f.dp.flow_table()
        .expect("connection table")
        .get(&client_key(sport, dport))
        .expect("lookup")
}

/// Time between flows whose creation stamps must differ: the stamps are CLOCK_MONOTONIC
/// as of the kernel's last tick (`bpf_ktime_get_coarse_ns`), which lags by up to a tick
/// (10 ms at HZ = 100) and, on an idle system, a little more.
const STAMP_GRAIN: std::time::Duration = std::time::Duration::from_millis(25);

#[test]
fn connection_entries_carry_their_creation_time_written_on_insert_only() {
    let mut f = Fixture::new(false, &standard_desired());
    let before = l3lb::flows::monotonic_ns();
    f.run(&client_tcp(VIP, 31000, 443, SYN));
    let first = flow_entry(&f, 31000, 443).expect("entry for the first flow");
    std::thread::sleep(STAMP_GRAIN);
    f.run(&client_tcp(VIP, 31001, 443, SYN));
    let second = flow_entry(&f, 31001, 443).expect("entry for the second flow");
    let after = l3lb::flows::monotonic_ns();
    let grain = STAMP_GRAIN.as_nanos() as u64;
    assert!(
        before.saturating_sub(grain) <= first.state.created_ns
            && first.state.created_ns < second.state.created_ns,
        "stamps on the agent's clock, in the order the flows began: {before} {} {}",
        first.state.created_ns,
        second.state.created_ns
    );
    assert!(second.state.created_ns <= after);
    assert_eq!(
        (first.seen, first.flags),
        (f.dp.epoch(), 0),
        "a new entry: seen in this epoch, not confirmed"
    );
    // Packets that find their entry leave its state as it was; the first of them
    // confirms it, and a packet in a later epoch marks it seen then.
    f.run(&client_tcp(VIP, 31000, 443, ACK));
    let confirmed = flow_entry(&f, 31000, 443).expect("entry");
    assert_eq!(confirmed.state, first.state, "established packets");
    assert_eq!(
        confirmed.flags & lb_common::FLOW_F_CONFIRMED,
        lb_common::FLOW_F_CONFIRMED
    );
    f.dp.expire_next_hops().expect("next epoch");
    for _ in 0..3 {
        f.run(&client_tcp(VIP, 31000, 443, ACK));
    }
    let later = flow_entry(&f, 31000, 443).expect("entry");
    assert_eq!(later.state, first.state, "established packets");
    assert_eq!(later.seen, f.dp.epoch(), "seen in the new epoch");
    assert_eq!(
        flow_entry(&f, 31001, 443).map(|e| (e.state, e.seen)),
        Some((second.state, second.seen)),
        "an entry no packet found keeps its epoch"
    );
    // A SYN rebalances and so writes the entry anew.
    std::thread::sleep(STAMP_GRAIN);
    f.run(&client_tcp(VIP, 31000, 443, SYN));
    let again = flow_entry(&f, 31000, 443).expect("entry");
    assert!(
        again.state.created_ns > second.state.created_ns,
        "a new SYN restamps"
    );
}

/// A flow whose entry was checked against its VIP since the agent's last change is
/// forwarded from the entry alone (no VIP lookup): every change the agent writes starts a
/// new epoch it names the change's, so the change applies to established flows from their
/// next packet on.
#[test]
fn known_flows_follow_every_config_change_from_their_next_packet() {
    // On one CPU, so known flows' packets meet what the next-hop cache learnt.
    pin_this_thread_to_cpu0();
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    // Re-applying what is there (the agent does on address and neighbour events)
    // changes nothing, and the epoch stays.
    let epoch = f.dp.epoch();
    f.dp.apply(&desired).expect("same again");
    assert_eq!(
        f.dp.epoch(),
        epoch,
        "an apply that changes nothing keeps the epoch"
    );
    let syn = client_tcp(VIP, 32000, 80, SYN);
    let ack = client_tcp(VIP, 32000, 80, ACK);
    f.run(&syn);
    // The first ACK confirms the entry; those after it take the entry's word.
    for _ in 0..3 {
        let (v, out) = f.run(&ack);
        assert_eq!(v, XDP_TX);
        assert_eq!(out, expected_ipip(&ack[14..], B1, B1_MAC));
    }
    // Source ranges that leave this client out: refused from its next packet on.
    desired.services[0].source_ranges = vec!["198.51.100.0/24".parse().expect("net")];
    f.dp.apply(&desired).expect("restrict");
    f.expect_drop(&ack, DropReason::SourceNotAllowed, "an established flow");
    desired.services[0].source_ranges.clear();
    f.dp.apply(&desired).expect("lift");
    for _ in 0..2 {
        let (v, out) = f.run(&ack);
        assert_eq!(v, XDP_TX, "admitted again, on its backend");
        assert_eq!(out, expected_ipip(&ack[14..], B1, B1_MAC));
    }
    // The service moves to another port with the same backend: the flow's packets to
    // the old port are no longer a VIP's.
    desired.services[0].vips = vec![(IpAddr::V4(VIP), 8080, PROTO_TCP)];
    f.dp.apply(&desired).expect("move the port");
    f.expect_pass_unchanged(&ack, "the old port");
    // A service in MAC-rewrite mode keeps it on the entry-only path.
    let query = client_udp(VIP_L2, 5353, 53, b"query");
    for _ in 0..3 {
        let (v, out) = f.run(&query);
        assert_eq!(v, XDP_TX);
        assert_eq!(out[..12], [B2_MAC, NODE_MAC].concat()[..]);
        assert_eq!(out[12..], query[12..], "only the MACs rewritten");
    }
}

/// An entry checked against its VIP is trusted without the lookup across the agent's
/// half-second ticks, which change no map (a flow whose packets are further apart keeps
/// the entry-only path), and is checked again after the next change: also when the
/// program reads an epoch before the one the agent has named its change's. Whether a
/// packet took the lookup is shown by the flow's backend entry rewritten behind the
/// agent's back to name another service: the entry alone still sends the packet to it,
/// a lookup refuses it (`no_backend`).
#[test]
fn checked_entries_stay_trusted_across_ticks_until_the_next_change() {
    pin_this_thread_to_cpu0();
    let pins = PinDir::new("ticks");
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    f.dp.pin(&pins.dir).expect("pin");
    let syn = client_tcp(VIP, 42000, 80, SYN);
    let ack = client_tcp(VIP, 42000, 80, ACK);
    f.run(&syn);
    f.run(&ack);
    let entry = |f: &Fixture| flow_entry(f, 42000, 80).expect("entry");
    assert_eq!(
        entry(&f).flags & lb_common::FLOW_F_CONFIRMED,
        lb_common::FLOW_F_CONFIRMED,
        "the first ACK confirms the entry"
    );
    let id = entry(&f).state.backend;
    let mut backends: aya::maps::Array<MapData, lb_common::Backend> = aya::maps::Array::try_from(
        aya::maps::Map::Array(MapData::from_pin(pins.maps.join(map_names::BACKENDS)).expect("pin")),
    )
    .expect("typed");
    let mut settings: aya::maps::Array<MapData, u32> = aya::maps::Array::try_from(
        aya::maps::Map::Array(MapData::from_pin(pins.maps.join(map_names::SETTINGS)).expect("pin")),
    )
    .expect("typed");
    let own = backends.get(&id, 0).expect("backend entry");
    let stale = lb_common::Backend {
        service: own.service + 100,
        ..own
    };
    backends.set(id, stale, 0).expect("rewrite the entry");

    // Ticks: every packet is sent by the entry alone, which marks it seen in each epoch.
    for tick in 0..3 {
        f.dp.expire_next_hops().expect("tick");
        let (v, out) = f.run(&ack);
        assert_eq!(v, XDP_TX, "tick {tick}: no VIP lookup refused the entry");
        assert_eq!(out, expected_ipip(&ack[14..], B1, B1_MAC), "tick {tick}");
        assert_eq!(
            entry(&f).seen,
            f.dp.epoch(),
            "tick {tick}: seen in the new epoch"
        );
    }

    // A change (a source range that admits everyone), then a tick: the entry was seen
    // before the change, so its next packet is looked up.
    backends.set(id, own, 0).expect("restore the entry");
    desired.services[0].source_ranges = vec!["0.0.0.0/0".parse().expect("net")];
    f.dp.apply(&desired).expect("change");
    backends.set(id, stale, 0).expect("rewrite the entry");
    f.dp.expire_next_hops().expect("tick");
    f.expect_drop(
        &ack,
        DropReason::NoBackend,
        "seen before the change: looked up",
    );

    // Looked up (and so seen) after the change, it is trusted again after a tick...
    backends.set(id, own, 0).expect("restore the entry");
    assert_eq!(f.run(&ack).0, XDP_TX, "looked up and sent");
    backends.set(id, stale, 0).expect("rewrite the entry");
    f.dp.expire_next_hops().expect("tick");
    assert_eq!(
        f.run(&ack).0,
        XDP_TX,
        "seen since the change: the entry alone"
    );
    // ...but not while the agent has named the next epoch its change's and not yet
    // started it (a packet reads the epoch before that name).
    f.dp.expire_next_hops().expect("tick");
    settings
        .set(
            lb_common::SETTINGS_CHANGED_EPOCH,
            f.dp.epoch().wrapping_add(1),
            0,
        )
        .expect("name the next epoch");
    f.expect_drop(
        &ack,
        DropReason::NoBackend,
        "a change named for the next epoch: looked up",
    );
}

/// The epoch's clock apart from the data plane (what the benchmark ticks from a thread of
/// its own while it drives the program) advances the program's epoch as the agent's tick
/// does, and the data plane continues from where it got.
#[test]
fn an_epoch_clock_ticks_the_program_from_another_thread() {
    let mut f = Fixture::new(false, &standard_desired());
    let syn = client_tcp(VIP, 43000, 80, SYN);
    let ack = client_tcp(VIP, 43000, 80, ACK);
    f.run(&syn);
    f.run(&ack);
    let start = f.dp.epoch();
    let mut clock = f.dp.epoch_clock().expect("clock");
    std::thread::scope(|s| {
        s.spawn(|| {
            clock.tick().expect("tick");
            clock.tick().expect("tick");
        })
        .join()
        .expect("ticker");
    });
    assert_eq!(clock.epoch(), start.wrapping_add(2));
    assert_eq!(f.run(&ack).0, XDP_TX);
    let seen = |f: &Fixture| flow_entry(f, 43000, 80).expect("entry").seen;
    assert_eq!(
        seen(&f),
        clock.epoch(),
        "seen in the epoch the clock started"
    );
    f.dp.adopt_epoch(&clock);
    assert_eq!(f.dp.epoch(), clock.epoch());
    f.dp.expire_next_hops().expect("tick");
    assert_eq!(f.run(&ack).0, XDP_TX);
    assert_eq!(
        seen(&f),
        start.wrapping_add(3),
        "the agent's tick goes on from there"
    );
}

/// The standard services with the smallest connection table: 256 buckets of 4.
fn smallest_table() -> Fixture {
    let mut options = opts(false);
    options.conntrack_size = 1024;
    Fixture::with_options(&options, &standard_desired())
}

#[test]
fn lone_syns_beyond_the_table_evict_each_other_not_confirmed_flows() {
    let f = smallest_table();
    let table = f.dp.flow_table().expect("connection table");
    assert_eq!(table.capacity(), 1024);
    // Established flows: a SYN, then an ACK that confirms the entry.
    let established: Vec<u16> = (0..40).map(|i| 20000 + i).collect();
    let mut owner = Vec::new();
    for &port in &established {
        let (_, out) = f.run(&client_tcp(VIP, port, 443, SYN));
        f.run(&client_tcp(VIP, port, 443, ACK));
        owner.push(out[14 + 16..14 + 20].to_vec());
    }
    // Then eight times the table in lone SYNs.
    for port in 0..8192u16 {
        f.run(&client_tcp(VIP_ALL, 1024 + port, 8080, SYN));
    }
    let flags: Vec<Option<u32>> = established
        .iter()
        .map(|&p| flow_entry(&f, p, 443).map(|e| e.flags))
        .collect();
    assert!(
        flags
            .iter()
            .all(|f| *f == Some(lb_common::FLOW_F_CONFIRMED)),
        "every established flow kept its entry: {flags:?}"
    );
    let live = table.count().expect("count");
    assert!(
        live > 900 && live <= 1024,
        "the flood filled the table ({live} of 1024 entries live)"
    );
    for (&port, before) in established.iter().zip(&owner) {
        let (_, out) = f.run(&client_tcp(VIP, port, 443, ACK));
        assert_eq!(
            &out[14 + 16..14 + 20],
            &before[..],
            "port {port} kept its backend"
        );
    }
}

#[test]
fn a_flow_whose_home_bucket_is_full_is_kept_in_its_overflow_bucket() {
    let f = smallest_table();
    let table = f.dp.flow_table().expect("connection table");
    // Five flows to VIP:443 sharing a home bucket (client ports found by hashing).
    let home = table.buckets_of(&client_key(40000, 443)).0;
    let ports: Vec<u16> = (40000..60000u16)
        .filter(|&p| table.buckets_of(&client_key(p, 443)).0 == home)
        .take(5)
        .collect();
    assert_eq!(ports.len(), 5);
    let over = table.buckets_of(&client_key(ports[4], 443)).1;
    assert_ne!(over, home, "pick another first port if this ever fails");
    let mut syn_out = Vec::new();
    for &port in &ports {
        syn_out = f.run(&client_tcp(VIP, port, 443, SYN)).1;
    }
    // The program put the fifth where the agent looks, displacing none of the four.
    let mut located = Vec::new();
    table
        .for_each(|l| located.push((l.bucket, l.entry.key.sport)))
        .expect("walk");
    located.sort();
    let mut want: Vec<(u32, u16)> = ports[..4].iter().map(|&p| (home, p.to_be())).collect();
    want.push((over, ports[4].to_be()));
    want.sort();
    assert_eq!(
        located, want,
        "four at home, the fifth in its overflow bucket"
    );
    // Its next packet finds it there: the entry is confirmed, not written anew.
    let first = flow_entry(&f, ports[4], 443).expect("entry");
    assert_eq!(first.flags, 0);
    let (verdict, out) = f.run(&client_tcp(VIP, ports[4], 443, ACK));
    assert_eq!(verdict, XDP_TX);
    let found = flow_entry(&f, ports[4], 443).expect("entry");
    assert_eq!(
        found.flags,
        lb_common::FLOW_F_CONFIRMED,
        "found, not re-recorded"
    );
    assert_eq!(found.state, first.state);
    assert_eq!(
        &out[14 + 16..14 + 20],
        &syn_out[14 + 16..14 + 20],
        "to the backend of its SYN"
    );
}

/// A pin directory on the bpffs for one test (`<dir>/maps` holds the maps, as under an
/// agent's `<pin_path>/v1`), removed on drop.
struct PinDir {
    dir: std::path::PathBuf,
    maps: std::path::PathBuf,
}

impl PinDir {
    fn new(test: &str) -> Self {
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/l3lb-fixture-{}-{test}",
            std::process::id()
        ));
        let maps = dir.join("maps");
        l3lb::sys::ensure_bpffs(&maps).expect("bpffs");
        Self { dir, maps }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (packets, bytes, new flows) of service `name` as `l3lb status` reads them from `pins`.
fn service_counts(pins: &PinDir, name: &str) -> (u64, u64, u64) {
    let status = l3lb::status::read(&pins.dir).expect("status");
    let s = status
        .services
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no service {name}"));
    (s.packets, s.bytes, s.new_flows)
}

/// Counters migrated into a map with room for fewer ids: the ids kept are copied, and
/// only ids beyond the new size that counted something are reported lost (a smaller
/// map's unused ids lose nothing, so a smaller `max_backends` alone warns of nothing).
#[test]
fn counters_migrated_into_fewer_ids_report_only_those_that_counted() {
    let pins = PinDir::new("fewer-ids");
    let desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    f.dp.pin(&pins.dir).expect("pin");
    for port in 0..4u16 {
        let (v, _) = f.run(&client_tcp(VIP, 34000 + port, 443, SYN));
        assert_eq!(v, XDP_TX);
    }
    let mut smaller = opts(false);
    smaller.max_backends = 32;
    let plan = l3lb::handover::plan(&pins.maps, &smaller).expect("plan");
    assert!(matches!(
        plan.get(map_names::BACKEND_STATS),
        l3lb::handover::Carry::Migrate(_)
    ));
    let only = |plan: &l3lb::handover::CarryPlan| l3lb::handover::CarryPlan {
        maps: plan
            .maps
            .iter()
            .filter(|(n, _)| *n == map_names::BACKEND_STATS)
            .cloned()
            .collect(),
    };
    let mut next = Dataplane::load_carrying(&smaller, &plan).expect("load");
    let carried = next.migrate(&only(&plan)).expect("migrate");
    assert_eq!(
        carried,
        vec![(
            map_names::BACKEND_STATS,
            l3lb::flowtable::Carried {
                offered: 32,
                kept: 32
            }
        )],
        "the standard backends' ids are below 32: nothing lost"
    );
    // A count at id 40, beyond the smaller map, is reported lost.
    {
        let mut stats: aya::maps::PerCpuArray<MapData, lb_common::BackendStats> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
                MapData::from_pin(pins.maps.join(map_names::BACKEND_STATS)).expect("pin"),
            ))
            .expect("typed");
        let mut values: Vec<lb_common::BackendStats> =
            stats.get(&40, 0).expect("read").iter().copied().collect();
        values[0].packets = 5;
        stats
            .set(
                40,
                aya::maps::PerCpuValues::try_from(values).expect("values"),
                0,
            )
            .expect("write");
    }
    let mut again = Dataplane::load_carrying(&smaller, &plan).expect("load");
    let carried = again.migrate(&only(&plan)).expect("migrate");
    assert_eq!(carried[0].1.lost(), 1, "{carried:?}");
    drop(f);
}

/// The program counts a packet once, for its backend; a service's total is its backends'
/// counters, and a backend the agent removes leaves its packets in its service's total.
#[test]
fn a_services_packets_are_its_backends_removed_ones_included() {
    let pins = PinDir::new("svc-counts");
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    f.dp.pin(&pins.dir).expect("pin");
    let frame_len = client_tcp(VIP, 1, 443, SYN).len() as u64 - 14;
    for port in 0..30u16 {
        let (v, _) = f.run(&client_tcp(VIP, 33000 + port, 443, SYN));
        assert_eq!(v, XDP_TX);
        f.run(&client_tcp(VIP, 33000 + port, 443, ACK));
    }
    assert_eq!(service_counts(&pins, "multi"), (60, 60 * frame_len, 30));
    let status = l3lb::status::read(&pins.dir).expect("status");
    let on_b2: u64 = status
        .backends
        .iter()
        .filter(|b| b.service_name.as_deref() == Some("multi") && b.address == IpAddr::V4(B2))
        .map(|b| b.packets)
        .sum();
    assert!(on_b2 > 0, "B2 got some of the flows");
    desired.services[5]
        .backends
        .retain(|b| b.address != IpAddr::V4(B2));
    f.dp.apply(&desired).expect("remove B2");
    assert_eq!(
        service_counts(&pins, "multi"),
        (60, 60 * frame_len, 30),
        "B2's packets stay in the total"
    );
    let status = l3lb::status::read(&pins.dir).expect("status");
    let listed: u64 = status
        .backends
        .iter()
        .filter(|b| b.service_name.as_deref() == Some("multi"))
        .map(|b| b.packets)
        .sum();
    assert_eq!(listed, 60 - on_b2, "the backends left hold the rest");
    // Packets after the removal add to the same total.
    f.run(&client_tcp(VIP, 33100, 443, SYN));
    assert_eq!(service_counts(&pins, "multi").0, 61);
}

/// An agent of an earlier build left service counters its program wrote for every
/// packet: the next agent converts them, and each service's total reads the same.
#[test]
fn service_counters_of_an_earlier_build_are_converted_on_takeover() {
    let pins = PinDir::new("svc-convert");
    let options = opts(false);
    let mut f = Fixture::new(false, &standard_desired());
    for port in 0..10u16 {
        f.run(&client_tcp(VIP, 34000 + port, 443, SYN));
    }
    f.dp.pin(&pins.dir).expect("pin");
    let (packets, bytes, new_flows) = service_counts(&pins, "multi");
    assert_eq!((packets, new_flows), (10, 10));
    // As the earlier build left them: every packet counted for the service too, 7 of
    // them for a backend removed since, and no format in the settings.
    let id = f.dp.service_id("multi").expect("multi");
    {
        let mut stats: aya::maps::PerCpuArray<MapData, lb_common::ServiceStats> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
                MapData::from_pin(pins.maps.join(map_names::SERVICE_STATS)).expect("pin"),
            ))
            .expect("typed");
        let mut values: Vec<lb_common::ServiceStats> =
            stats.get(&id, 0).expect("read").iter().copied().collect();
        values[0].packets += packets + 7;
        values[0].bytes += bytes + 7 * 100;
        stats
            .set(
                id,
                aya::maps::PerCpuValues::try_from(values).expect("values"),
                0,
            )
            .expect("write");
        let mut settings: aya::maps::Array<MapData, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(
                MapData::from_pin(pins.maps.join(map_names::SETTINGS)).expect("pin"),
            ))
            .expect("typed");
        settings
            .set(lb_common::SETTINGS_SERVICE_COUNTS, 0, 0)
            .expect("write");
    }
    assert_eq!(
        service_counts(&pins, "multi").0,
        2 * packets + 7,
        "read as this build reads them, the old counters count twice"
    );
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert!(
        matches!(
            plan.get(map_names::SERVICE_STATS),
            l3lb::handover::Carry::Migrate(_)
        ),
        "the old format's counters are converted in a copy"
    );
    // An agent that converts them and fails before pinning leaves the pinned counters
    // as they were, so the next converts them from the same state.
    {
        let previous = l3lb::handover::PreviousIds::read(&pins.maps).expect("ids");
        let mut failed = Dataplane::load_carrying(&options, &plan).expect("load");
        failed.migrate(&plan).expect("migrate");
        failed.adopt(previous, true).expect("adopt");
    }
    assert_eq!(
        service_counts(&pins, "multi").0,
        2 * packets + 7,
        "untouched by the agent that failed"
    );
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    let previous = l3lb::handover::PreviousIds::read(&pins.maps).expect("ids");
    assert_eq!(previous.service_counts, 0);
    let mut next = Dataplane::load_carrying(&options, &plan).expect("load");
    next.migrate(&plan).expect("migrate");
    next.adopt(previous, true).expect("adopt");
    next.apply(&standard_desired()).expect("apply");
    next.pin(&pins.dir).expect("pin");
    assert_eq!(
        service_counts(&pins, "multi"),
        (packets + 7, bytes + 700, new_flows),
        "the total as the earlier build counted it"
    );
    drop(f);
}

/// Loads the program with `plan`'s maps carried over, in a fresh namespace, and applies
/// the standard services.
fn carrying(options: &LoadOptions, plan: &l3lb::handover::CarryPlan) -> Fixture {
    let ifindex = enter_namespace();
    let mut dp = Dataplane::load_carrying(options, plan).expect("load");
    dp.apply(&standard_desired()).expect("apply");
    Fixture { dp, ifindex }
}

/// The connection-table entry of client port `port`'s flow to `multi` (VIP:443), on its
/// backend at `b`, created at `created_ns`, seen in epoch `seen`, with `flags`.
fn multi_entry(
    f: &Fixture,
    port: u16,
    b: Ipv4Addr,
    created_ns: u64,
    seen: u32,
    flags: u32,
) -> lb_common::FlowEntry {
    lb_common::FlowEntry {
        key: client_key(port, 443),
        state: lb_common::FlowState {
            backend: f.dp.backend_id("multi", IpAddr::V4(b)).expect("backend"),
            service: f.dp.service_id("multi").expect("multi"),
            created_ns,
        },
        seen,
        flags,
    }
}

/// Flows from ports 32000.. to `multi` (VIP:443) and the backends their entries name,
/// whatever Maglev would pick (`assert_table_decided` checks that it picks otherwise for
/// some of them).
fn pinned_flows() -> Vec<(u16, Ipv4Addr)> {
    vec![
        (32000, B1),
        (32001, B2),
        (32002, B3),
        (32003, B1),
        (32004, B3),
    ]
}

/// Asserts that for some of `flows` Maglev picks another backend than the entry names, so
/// forwarding them there proved the entries were used (a SYN rebalances each flow: call
/// last).
fn assert_table_decided(f: &Fixture, flows: &[(u16, Ipv4Addr)]) {
    let differ = flows
        .iter()
        .filter(|(port, b)| {
            let (_, out) = f.run(&client_tcp(VIP, *port, 443, SYN));
            Ipv4Addr::new(out[30], out[31], out[32], out[33]) != *b
        })
        .count();
    assert!(
        differ > 0,
        "Maglev agrees with every entry: the check proves nothing"
    );
}

/// Asserts each of `flows` (port, backend) is forwarded to its backend by an ACK.
fn assert_forwarded(f: &Fixture, flows: &[(u16, Ipv4Addr)], what: &str) {
    for (port, b) in flows {
        let (v, out) = f.run(&client_tcp(VIP, *port, 443, ACK));
        assert_eq!(v, XDP_TX, "{what}: port {port}");
        assert_eq!(
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            *b,
            "{what}: port {port} kept the backend its entry names"
        );
    }
}

#[test]
fn an_upgrade_converts_the_previous_releases_lru_connection_table() {
    let pins = PinDir::new("upgrade");
    let path = pins.maps.join(map_names::FLOWS);
    // The previous release's table: an LRU hash of FlowKey → FlowState.
    let legacy = MapData::create(
        aya_obj::Map::new_from_params(
            9, // BPF_MAP_TYPE_LRU_HASH
            size_of::<lb_common::FlowKey>() as u32,
            size_of::<lb_common::FlowState>() as u32,
            4096,
            0,
        ),
        map_names::FLOWS,
        None,
    )
    .expect("create the old table");
    legacy.pin(&path).expect("pin");

    let options = opts(false);
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert_eq!(
        plan.get(map_names::FLOWS),
        &l3lb::handover::Carry::Convert(path.clone()),
        "the old layout is converted, not refused"
    );
    let mut f = carrying(&options, &plan);
    f.dp.resume_epoch(77).expect("epoch");
    let service = f.dp.service_id("multi").expect("multi");
    let mut old: aya::maps::HashMap<MapData, lb_common::FlowKey, lb_common::FlowState> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            MapData::from_pin(&path).expect("open the pin"),
        ))
        .expect("typed");
    let flows = pinned_flows();
    for (port, b) in &flows {
        let state = lb_common::FlowState {
            backend: f.dp.backend_id("multi", IpAddr::V4(*b)).expect("backend"),
            service,
            created_ns: 1000 + u64::from(*port),
        };
        old.insert(client_key(*port, 443), state, 0)
            .expect("insert");
    }
    // A newer `l3lb status` or `l3lb flows` still reads the old table meanwhile.
    let pinned = l3lb::status::Pins::new(&pins.dir)
        .flow_table()
        .expect("the old table, read");
    assert!(matches!(pinned, l3lb::status::PinnedFlows::Legacy { .. }));
    assert_eq!(pinned.capacity(), 4096);
    assert_eq!(
        l3lb::status::count_flows(&pinned).expect("count"),
        flows.len() as u64
    );
    let migrated = f.dp.migrate(&plan).expect("migrate");
    let all = l3lb::flowtable::Carried {
        offered: flows.len(),
        kept: flows.len(),
    };
    assert_eq!(migrated, vec![(map_names::FLOWS, all)]);
    for (port, _) in &flows {
        let e = flow_entry(&f, *port, 443).expect("converted entry");
        assert_eq!(
            e.state,
            old.get(&client_key(*port, 443), 0).expect("old entry"),
            "port {port}"
        );
        assert_eq!(
            (e.seen, e.flags),
            (77, lb_common::FLOW_F_CONFIRMED),
            "converted entries count as established and seen now"
        );
    }
    // Placing them is a change: each is checked against this program's VIPs before it
    // decides alone.
    let changed = setting(&f, lb_common::SETTINGS_CHANGED_EPOCH);
    assert_eq!(
        (f.dp.epoch(), changed),
        (78, 78),
        "a change named and started"
    );
    assert!(!lb_common::flow_still_checked(77, f.dp.epoch(), changed));
    assert_forwarded(&f, &flows, "after the upgrade");
    assert_table_decided(&f, &flows);
}

#[test]
fn a_resized_connection_table_is_migrated_entry_by_entry() {
    use lb_common::{FlowBucket, FlowEntry};

    let pins = PinDir::new("resize");
    let path = pins.maps.join(map_names::FLOWS);
    // A table of this layout with 256 buckets (conntrack_size 1024)...
    let small = aya::maps::Array::<MapData, FlowBucket>::create(
        lb_common::flow_table_values(256),
        l3lb::flowtable::BPF_F_MMAPABLE,
    )
    .expect("create");
    let small_table = l3lb::flowtable::FlowTable::from_map_data(
        aya::maps::IterableMap::map(&small),
        "the small table",
    )
    .expect("accessor");
    aya::maps::IterableMap::map(&small).pin(&path).expect("pin");
    // ...taken over by a program with conntrack_size 4096.
    let options = opts(false);
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert_eq!(
        plan.get(map_names::FLOWS),
        &l3lb::handover::Carry::Migrate(path.clone())
    );
    let mut f = carrying(&options, &plan);
    f.dp.resume_epoch(500).expect("epoch");
    let service = f.dp.service_id("multi").expect("multi");
    let flows = pinned_flows();
    let entries: Vec<FlowEntry> = flows
        .iter()
        .zip([498u32, 499, 500, 400, 10])
        .map(|((port, b), seen)| FlowEntry {
            key: client_key(*port, 443),
            state: lb_common::FlowState {
                backend: f.dp.backend_id("multi", IpAddr::V4(*b)).expect("backend"),
                service,
                created_ns: u64::from(*port),
            },
            seen,
            flags: if seen == 500 {
                0
            } else {
                lb_common::FLOW_F_CONFIRMED
            },
        })
        .collect();
    small_table.insert_all(entries.clone(), 500).expect("fill");
    let migrated = f.dp.migrate(&plan).expect("migrate");
    let all = l3lb::flowtable::Carried {
        offered: flows.len(),
        kept: flows.len(),
    };
    assert_eq!(migrated, vec![(map_names::FLOWS, all)]);
    let table = f.dp.flow_table().expect("table");
    assert_eq!(table.buckets(), 1024);
    for e in &entries {
        assert_eq!(
            table.get(&e.key).expect("lookup"),
            Some(*e),
            "moved to its bucket in the larger table, epoch and flags kept"
        );
    }
    assert_forwarded(&f, &flows, "after the resize");
    assert_table_decided(&f, &flows);

    // The next agent with the same size takes this table over as it is.
    std::fs::remove_file(&path).expect("unpin the small table");
    f.dp.map(map_names::FLOWS)
        .expect("flows map")
        .pin(&path)
        .expect("pin");
    // (An agent pins its settings beside the table: the next one reads the table's hash
    // seed and tag format there.)
    f.dp.map(map_names::SETTINGS)
        .expect("settings")
        .pin(pins.maps.join(map_names::SETTINGS))
        .expect("pin settings");
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert_eq!(
        plan.get(map_names::FLOWS),
        &l3lb::handover::Carry::Reuse(path.clone()),
        "same size and flags: reused"
    );
    // It searches the table with the hash seed the table was placed with, which the
    // settings array keeps (the re-placed table got a new seed of its own). The SYNs of
    // `assert_table_decided` re-balanced the flows: pin them to their backends again.
    assert_ne!(flow_seed(&f), 0);
    f.dp.flow_table()
        .expect("table")
        .insert_all(entries.clone(), 500)
        .expect("refill");
    let next = carrying(&options, &plan);
    assert_eq!(flow_seed(&next), flow_seed(&f));
    let table = next.dp.flow_table().expect("table");
    for e in &entries {
        assert_eq!(
            table.get(&e.key).expect("lookup").map(|x| x.state),
            Some(e.state),
            "found by the next agent"
        );
    }
    assert_forwarded(&next, &flows, "by the next agent");
    assert_table_decided(&next, &flows);
    // A reader of the pins (status, tests) finds the seed beside the table too.
    let pinned = l3lb::flowtable::FlowTable::from_pin(&path).expect("pinned table");
    for e in &entries {
        assert!(
            pinned.get(&e.key).expect("lookup").is_some(),
            "looked up through the pin with the seed beside it"
        );
    }
}

#[test]
fn a_table_of_whole_entries_from_an_earlier_build_is_converted() {
    use lb_common::{FlowEntry, WideFlowBucket};

    let pins = PinDir::new("wide");
    let path = pins.maps.join(map_names::FLOWS);
    // The table of the builds before tagged ways: 256-byte buckets of four whole
    // entries, as an agent of such a build left it pinned (with its own seed, which the
    // conversion does not need: every entry carries its key).
    let mut old =
        aya::maps::Array::<MapData, WideFlowBucket>::create(256, l3lb::flowtable::BPF_F_MMAPABLE)
            .expect("create");
    aya::maps::IterableMap::map(&old).pin(&path).expect("pin");
    let options = opts(false);
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert_eq!(
        plan.get(map_names::FLOWS),
        &l3lb::handover::Carry::Convert(path.clone()),
        "the earlier layout is converted, not refused"
    );
    let mut f = carrying(&options, &plan);
    f.dp.resume_epoch(300).expect("epoch");
    let flows = pinned_flows();
    let entries: Vec<FlowEntry> = flows
        .iter()
        .enumerate()
        .map(|(i, (port, b))| {
            let flags = if i % 2 == 0 {
                lb_common::FLOW_F_CONFIRMED
            } else {
                0
            };
            multi_entry(
                &f,
                *port,
                *b,
                5000 + u64::from(*port),
                290 + i as u32,
                flags,
            )
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let mut b = WideFlowBucket::default();
        b.ways[i % 4] = *e;
        old.set(17 * i as u32, b, 0).expect("old bucket");
    }
    // A newer `l3lb status` or `l3lb flows` still reads the old table meanwhile.
    let pinned = l3lb::status::Pins::new(&pins.dir)
        .flow_table()
        .expect("the old table, read");
    assert!(matches!(pinned, l3lb::status::PinnedFlows::Wide { .. }));
    assert_eq!(pinned.capacity(), 1024);
    assert_eq!(
        l3lb::status::count_flows(&pinned).expect("count"),
        flows.len() as u64
    );
    let migrated = f.dp.migrate(&plan).expect("migrate");
    let all = l3lb::flowtable::Carried {
        offered: flows.len(),
        kept: flows.len(),
    };
    assert_eq!(migrated, vec![(map_names::FLOWS, all)]);
    let table = f.dp.flow_table().expect("table");
    for e in &entries {
        assert_eq!(
            table.get(&e.key).expect("lookup"),
            Some(*e),
            "converted with its backend, service, creation time, age and flags"
        );
    }
    assert_forwarded(&f, &flows, "after the conversion");
    assert_table_decided(&f, &flows);
}

/// A connection table carried from an agent whose epoch could not be read: the clock
/// goes on past every entry's last-seen epoch (restarted at 0, it would make them look
/// old and, on reaching their epoch, trust them unchecked), in the agent and in the
/// program, whose next packet of a flow marks the entry seen in the new epoch.
#[test]
fn the_epoch_goes_on_past_a_carried_table_whose_agent_epoch_is_unknown() {
    use lb_common::FlowEntry;

    let options = opts(false);
    let mut f = carrying(&options, &l3lb::handover::CarryPlan::default());
    let flows = pinned_flows();
    let entries: Vec<FlowEntry> = flows
        .iter()
        .enumerate()
        .map(|(i, (port, b))| {
            let seen = 480 + i as u32;
            multi_entry(
                &f,
                *port,
                *b,
                u64::from(*port),
                seen,
                lb_common::FLOW_F_CONFIRMED,
            )
        })
        .collect();
    f.dp.flow_table()
        .expect("table")
        .insert_all(entries, 500)
        .expect("fill");
    let latest = 480 + flows.len() as u32 - 1;
    assert_eq!(f.dp.resume_epoch_past_table().expect("resume"), latest + 1);
    assert_eq!(f.dp.epoch(), latest + 1);
    assert_forwarded(&f, &flows, "after the resume");
    for (port, _) in &flows {
        assert_eq!(
            flow_entry(&f, *port, 443).expect("entry").seen,
            latest + 1,
            "port {port}: seen in the program's epoch"
        );
    }
}

/// The connection table's hash seed as the agent left it in the settings array.
/// Pins a table of this layout and size with flows and its agent's settings, lets
/// `damage` change them as an agent that stopped in some state would have left them
/// (the table's pin, the settings, the table's buckets), and checks that the next agent
/// places every entry anew (its lookups would miss them all, and Maglev would move the
/// flows it disagrees with) and forwards the flows where their entries say.
fn placed_anew_after(
    name: &str,
    damage: impl FnOnce(&std::path::Path, &mut aya::maps::Array<MapData, u32>, u32),
) {
    use lb_common::FlowEntry;

    let pins = PinDir::new(name);
    let path = pins.maps.join(map_names::FLOWS);
    let options = opts(false);
    let f = carrying(&options, &l3lb::handover::CarryPlan::default());
    let flows = pinned_flows();
    let entries: Vec<FlowEntry> = flows
        .iter()
        .map(|(port, b)| {
            multi_entry(
                &f,
                *port,
                *b,
                u64::from(*port),
                0,
                lb_common::FLOW_F_CONFIRMED,
            )
        })
        .collect();
    let table = f.dp.flow_table().expect("table");
    table.insert_all(entries.clone(), 0).expect("fill");
    for name in [map_names::FLOWS, map_names::SETTINGS] {
        f.dp.map(name)
            .expect("map")
            .pin(pins.maps.join(name))
            .expect("pin");
    }
    let mut settings: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            MapData::from_pin(pins.maps.join(map_names::SETTINGS)).expect("open the settings"),
        ))
        .expect("typed");
    assert_eq!(
        settings
            .get(&lb_common::SETTINGS_FLOW_TAGS, 0)
            .expect("format"),
        lb_common::FLOW_TAGS_BOUND,
        "this build records its tag format"
    );
    assert_eq!(
        l3lb::handover::plan(&pins.maps, &options)
            .expect("plan")
            .get(map_names::FLOWS),
        &l3lb::handover::Carry::Reuse(path.clone()),
        "undamaged: reused"
    );
    damage(&path, &mut settings, table.buckets());
    let plan = l3lb::handover::plan(&pins.maps, &options).expect("plan");
    assert_eq!(
        plan.get(map_names::FLOWS),
        &l3lb::handover::Carry::Retag(path.clone())
    );
    let mut next = carrying(&options, &plan);
    let migrated = next.dp.migrate(&plan).expect("migrate");
    let all = l3lb::flowtable::Carried {
        offered: flows.len(),
        kept: flows.len(),
    };
    assert_eq!(migrated, vec![(map_names::FLOWS, all)]);
    let placed = next.dp.flow_table().expect("table");
    for e in &entries {
        assert_eq!(
            placed.get(&e.key).expect("lookup").map(|x| x.state),
            Some(e.state),
            "placed anew with this build's tag"
        );
    }
    assert_forwarded(&next, &flows, "after the retag");
    assert_table_decided(&next, &flows);
}

#[test]
fn a_table_tagged_by_an_earlier_build_is_placed_anew_with_this_builds_tags() {
    // Tags an earlier `flow_tag` made (other bits than this build's), and a tag format
    // of 0 in the settings (builds before the format was recorded left it so).
    placed_anew_after("retag", |path, settings, buckets| {
        let mut raw: aya::maps::Array<MapData, lb_common::FlowBucket> = aya::maps::Array::try_from(
            aya::maps::Map::Array(MapData::from_pin(path).expect("open the table")),
        )
        .expect("typed");
        let mut older = 0;
        for i in 0..buckets {
            let mut b = raw.get(&i, 0).expect("bucket");
            for w in b.ways.iter_mut().filter(|w| !w.is_free()) {
                w.tag ^= 0x5555_5555_5555_5554;
                older += 1;
            }
            raw.set(i, b, 0).expect("write bucket");
        }
        assert_eq!(older, pinned_flows().len());
        settings
            .set(lb_common::SETTINGS_FLOW_TAGS, 0, 0)
            .expect("an earlier build's format");
    });
}

#[test]
fn a_table_whose_settings_name_another_seed_is_placed_anew() {
    // An agent that stopped after pinning its settings (a new table's seed) but before
    // pinning that table left the earlier table beside another seed: the tag format is
    // this build's, but a sample of the entries shows the tags do not agree.
    placed_anew_after("reseed", |_, settings, _| {
        let lo = settings
            .get(&lb_common::SETTINGS_FLOW_SEED_LO, 0)
            .expect("seed");
        settings
            .set(lb_common::SETTINGS_FLOW_SEED_LO, lo ^ 0x0123_4567, 0)
            .expect("another seed");
    });
}

/// Entry `index` of the program's settings array.
fn setting(f: &Fixture, index: u32) -> u32 {
    let settings: aya::maps::Array<&MapData, u32> =
        aya::maps::Array::try_from(f.dp.map(map_names::SETTINGS).expect("settings"))
            .expect("typed");
    settings.get(&index, 0).expect("settings entry")
}

fn flow_seed(f: &Fixture) -> u64 {
    let lo = setting(f, lb_common::SETTINGS_FLOW_SEED_LO);
    let hi = setting(f, lb_common::SETTINGS_FLOW_SEED_HI);
    u64::from(hi) << 32 | u64::from(lo)
}

#[test]
fn each_new_connection_table_gets_its_own_hash_seed_and_the_program_places_by_it() {
    let a = Fixture::new(false, &standard_desired());
    let b = Fixture::new(false, &standard_desired());
    assert_ne!(flow_seed(&a), 0);
    assert_ne!(flow_seed(&a), flow_seed(&b), "random per table");
    // The program puts a flow where the agent's accessor, which knows the seed, looks.
    for f in [&a, &b] {
        f.run(&client_tcp(VIP, 45000, 443, SYN));
        let table = f.dp.flow_table().expect("table");
        let home = table.buckets_of(&client_key(45000, 443)).0;
        let mut located = Vec::new();
        table
            .for_each(|l| located.push((l.bucket, l.entry.key)))
            .expect("walk");
        assert_eq!(located, vec![(home, client_key(45000, 443))]);
    }
}

#[test]
fn metadata_maps_hold_names_weights_and_health() {
    use l3lb::dataplane::{Health, service_name};
    use lb_common::{BackendMeta, ServiceMeta};

    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    let names = |f: &Fixture, id: u32| -> Option<String> {
        let map: aya::maps::Array<&MapData, ServiceMeta> =
            aya::maps::Array::try_from(f.dp.map(map_names::SERVICE_META).expect("map"))
                .expect("typed");
        service_name(&map.get(&id, 0).expect("get"))
    };
    let meta = |f: &Fixture, id: u32| -> BackendMeta {
        let map: aya::maps::Array<&MapData, BackendMeta> =
            aya::maps::Array::try_from(f.dp.map(map_names::BACKEND_META).expect("map"))
                .expect("typed");
        map.get(&id, 0).expect("get")
    };
    for svc in &desired.services {
        let id = f.dp.service_id(&svc.name).expect("id");
        assert_eq!(names(&f, id).as_deref(), Some(svc.name.as_str()));
    }
    let multi_b1 = f.dp.backend_id("multi", IpAddr::V4(B1)).expect("id");
    assert_eq!(
        meta(&f, multi_b1),
        BackendMeta {
            weight: 1,
            health: lb_common::HEALTH_UNKNOWN,
            _pad: [0; 3]
        },
        "weight written, health not checked yet"
    );

    // Health from the checks survives a reweight; the weight follows the config.
    f.dp.set_backend_health("multi", IpAddr::V4(B1), Health::Down)
        .expect("health");
    assert_eq!(meta(&f, multi_b1).health, lb_common::HEALTH_DOWN);
    desired.services[5].backends[0].weight = 7;
    f.dp.apply(&desired).expect("reweight");
    assert_eq!(meta(&f, multi_b1).weight, 7);
    assert_eq!(meta(&f, multi_b1).health, lb_common::HEALTH_DOWN);
    assert!(
        f.dp.set_backend_health("multi", IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), Health::Up)
            .is_err(),
        "an unknown backend is an error, not a silent no-op"
    );

    // A renamed service carries its new name; a removed one leaves no name behind.
    let old_id = f.dp.service_id("dns").expect("id");
    desired.services[1].name = "resolver".into();
    desired.services.retain(|s| s.name != "noneigh");
    let noneigh_id = f.dp.service_id("noneigh").expect("id");
    let noneigh_backend =
        f.dp.backend_id("noneigh", IpAddr::V4(B_NONEIGH))
            .expect("id");
    f.dp.apply(&desired).expect("rename and remove");
    let new_id = f.dp.service_id("resolver").expect("id");
    assert_eq!(names(&f, new_id).as_deref(), Some("resolver"));
    if new_id != old_id {
        assert_eq!(names(&f, old_id), None, "the old name is gone with its id");
    }
    if Some(noneigh_id) != f.dp.service_id("resolver") {
        assert_eq!(
            names(&f, noneigh_id),
            None,
            "removed service's name cleared"
        );
    }
    assert_eq!(meta(&f, noneigh_backend), BackendMeta::default());

    // Names longer than the field are cut at a character boundary.
    let long = "é".repeat(100);
    let cut = service_name(&l3lb::dataplane::service_meta(&long)).expect("name");
    assert_eq!(cut, "é".repeat(64), "128 bytes of two-byte characters");
}

#[test]
fn decap_role_strips_ipip_from_allowed_sources_only() {
    let mut desired = standard_desired();
    desired.decap_v4 = vec![(Ipv4Addr::new(10, 1, 0, 0), 24)];
    let f = Fixture::new(true, &desired);
    let inner = client_ack_v4();
    let outer_from = |src: Ipv4Addr, vlans: &[u16]| {
        eth(
            NODE_MAC,
            B1_MAC,
            vlans,
            0x0800,
            &ipv4(src, NODE, 4, &[], &inner, true),
        )
    };
    for vlans in [&[][..], &[5][..], &[5, 6][..]] {
        let (verdict, out) = f.run(&outer_from(BALANCER, vlans));
        assert_eq!(verdict, XDP_PASS, "allowed source, {} tags", vlans.len());
        assert_eq!(
            out,
            eth(NODE_MAC, B1_MAC, vlans, 0x0800, &inner),
            "inner packet with the original L2 header"
        );
    }
    f.expect_drop(
        &outer_from(Ipv4Addr::new(198, 51, 100, 1), &[]),
        DropReason::DecapNotAllowed,
        "unlisted source",
    );
    let elsewhere = eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(BALANCER, B3, 4, &[], &inner, true),
    );
    f.expect_pass_unchanged(&elsewhere, "IPIP from an allowed source to another host");
    let mut bad_inner = inner.clone();
    bad_inner[0] = 0x35;
    let frame = eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(BALANCER, NODE, 4, &[], &bad_inner, true),
    );
    f.expect_drop(&frame, DropReason::DecapMalformed, "inner header not IPv4");
    let frame = eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(BALANCER, NODE, 4, &[], &inner[..10], true),
    );
    f.expect_drop(&frame, DropReason::DecapMalformed, "inner header cut");

    // Outer headers of other shapes than the quick parse's (no options, no fragment,
    // length within the frame) go to the general parse, which decides as ever.
    let fix_checksum = |ip: &mut Vec<u8>| {
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = csum(&ip[..20]);
        ip[10..12].copy_from_slice(&c);
    };
    for (what, frags) in [("first fragment", [0x20, 0]), ("later fragment", [0, 1])] {
        let mut outer = ipv4(BALANCER, NODE, 4, &[], &inner, false);
        outer[6..8].copy_from_slice(&frags);
        fix_checksum(&mut outer);
        f.expect_pass_unchanged(
            &eth(NODE_MAC, B1_MAC, &[], 0x0800, &outer),
            &format!("an allowed source's IPIP {what}: the stack reassembles it"),
        );
    }
    let (verdict, out) = f.run(&eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(BALANCER, NODE, 4, &[1, 1, 1, 0], &inner, true),
    ));
    assert_eq!(verdict, XDP_PASS, "outer header with options");
    assert_eq!(
        out,
        eth(NODE_MAC, B1_MAC, &[], 0x0800, &inner),
        "opened past the options"
    );
    let mut long = ipv4(BALANCER, NODE, 4, &[], &inner, true);
    let too_long = long.len() as u16 + 1;
    long[2..4].copy_from_slice(&too_long.to_be_bytes());
    fix_checksum(&mut long);
    f.expect_drop(
        &eth(NODE_MAC, B1_MAC, &[], 0x0800, &long),
        DropReason::BadIpHeader,
        "outer total length beyond the frame",
    );
}

/// The address filter's set bits as the data plane reads them.
fn filter_bits(dp: &Dataplane) -> std::collections::BTreeSet<u32> {
    let settings: aya::maps::Array<&MapData, u32> =
        aya::maps::Array::try_from(dp.map(map_names::SETTINGS).expect("settings")).expect("typed");
    let slots = lb_common::vip_index_slots(opts(false).max_services);
    let mut bits = std::collections::BTreeSet::new();
    for w in 0..lb_common::vip_filter_words(slots) {
        let word = settings
            .get(&(lb_common::SETTINGS_FILTER + w), 0)
            .expect("filter word");
        bits.extend((0..32).filter(|b| word & (1 << b) != 0).map(|b| w * 32 + b));
    }
    bits
}

/// The filter bits the VIP addresses of `desired` should set.
fn vip_address_bits(desired: &Desired) -> std::collections::BTreeSet<u32> {
    let slots = lb_common::vip_index_slots(opts(false).max_services);
    desired
        .services
        .iter()
        .flat_map(|s| s.vips.iter())
        .map(|(addr, _, _)| {
            let bytes = match addr {
                IpAddr::V4(a) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&a.octets());
                    b
                }
                IpAddr::V6(a) => a.octets(),
            };
            let w: [u32; 4] = std::array::from_fn(|i| {
                u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
            });
            lb_common::vip_filter_bit(&w, slots)
        })
        .collect()
}

/// One filter serves both halves of the VIP index: widened to both sets of addresses for
/// the switch, it is narrowed to the new ones after it, so traffic to a removed VIP
/// address passes at the first test again.
#[test]
fn the_address_filter_holds_the_vip_addresses_of_the_last_apply() {
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    assert_eq!(filter_bits(&f.dp), vip_address_bits(&desired));
    let before = vip_address_bits(&desired);
    desired
        .services
        .retain(|s| s.name != "noneigh" && s.name != "web6");
    desired.services[0]
        .vips
        .push((IpAddr::V4(Ipv4Addr::new(192, 0, 2, 60)), 80, PROTO_TCP));
    f.dp.apply(&desired).expect("apply");
    let after = vip_address_bits(&desired);
    assert_ne!(before, after, "the change moves some bits");
    assert_eq!(
        filter_bits(&f.dp),
        after,
        "narrowed to the addresses now served"
    );
    let (v, _) = f.run(&client_tcp(Ipv4Addr::new(192, 0, 2, 60), 1000, 80, SYN));
    assert_eq!(v, XDP_TX, "the new address is served");
    f.expect_pass_unchanged(&client_tcp(VIP_NONEIGH, 1000, 80, SYN), "a removed address");
}

fn settings_flags(dp: &Dataplane) -> u32 {
    let settings: aya::maps::Array<&MapData, u32> =
        aya::maps::Array::try_from(dp.map(map_names::SETTINGS).expect("settings")).expect("typed");
    settings.get(&lb_common::SETTINGS_FLAGS, 0).expect("flags")
}

/// A client's TCP segment to the VIP, as a balancer tunnels it to this node.
fn ipip_inner() -> Vec<u8> {
    client_ack_v4()
}

/// `ipip_inner` in IPIP from `src` to `dst`, as the decap role receives it.
fn ipip_tunnel(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(src, dst, 4, &[], &ipip_inner(), true),
    )
}

/// The frame `ipip_tunnel` leaves as once opened.
fn ipip_opened() -> Vec<u8> {
    eth(NODE_MAC, B1_MAC, &[], 0x0800, &ipip_inner())
}

#[test]
fn decap_checks_use_the_vip_index_for_hosts_and_the_trie_for_prefixes() {
    use lb_common::{SETTINGS_F_DECAP_INDEX, SETTINGS_F_DECAP_PREFIXES};
    let opened = ipip_opened();
    let expect_opened = |f: &Fixture, src: Ipv4Addr, dst: Ipv4Addr, what: &str| {
        let (verdict, out) = f.run(&ipip_tunnel(src, dst));
        assert_eq!((verdict, out), (XDP_PASS, opened.clone()), "{what}");
    };
    let stranger = Ipv4Addr::new(198, 51, 100, 1);

    // Host entries only (what Kubernetes mode writes): the index answers, no trie.
    let mut desired = standard_desired();
    desired.decap_v4 = vec![(BALANCER, 32)];
    // The web VIP is also this node's address and an allowed tunnel source: its VIP key
    // and its decap-role keys sit side by side in the index without meeting.
    desired.local_v4.push(VIP);
    desired.decap_v4.push((VIP, 32));
    let mut f = Fixture::new(true, &desired);
    let flags = settings_flags(&f.dp);
    assert_ne!(flags & SETTINGS_F_DECAP_INDEX, 0, "decap keys indexed");
    assert_eq!(flags & SETTINGS_F_DECAP_PREFIXES, 0, "no prefix entries");
    expect_opened(&f, BALANCER, NODE, "a /32 entry, through the index");
    expect_opened(&f, VIP, NODE, "a source that is also a VIP");
    expect_opened(&f, BALANCER, VIP, "to a local address that is also a VIP");
    f.expect_drop(
        &ipip_tunnel(stranger, NODE),
        DropReason::DecapNotAllowed,
        "unlisted source",
    );
    f.expect_drop(
        &ipip_tunnel(Ipv4Addr::new(10, 1, 0, 3), NODE),
        DropReason::DecapNotAllowed,
        "a neighbour of the listed host",
    );
    f.expect_drop(
        &ipip_tunnel(CLIENT, VIP),
        DropReason::DecapNotAllowed,
        "unlisted source to the local VIP",
    );
    // The VIP still balances, and VIP keys make no address local or allowed.
    let (verdict, out) = f.run(&client_tcp(VIP, 40000, 80, SYN));
    assert_eq!(verdict, XDP_TX, "TCP to the VIP is forwarded");
    assert_eq!(
        out,
        expected_ipip(&client_tcp(VIP, 40000, 80, SYN)[14..], B1, B1_MAC)
    );
    f.expect_pass_unchanged(
        &ipip_tunnel(BALANCER, VIP_L2),
        "IPIP to a VIP that is not this node's address",
    );
    f.expect_drop(
        &ipip_tunnel(VIP_L2, NODE),
        DropReason::DecapNotAllowed,
        "a VIP that is not on the allow list as a source",
    );

    // A prefix next to the host entry: sources the index lacks go to the trie.
    desired.decap_v4.push((Ipv4Addr::new(10, 9, 0, 0), 16));
    f.dp.apply(&desired).expect("apply");
    let flags = settings_flags(&f.dp);
    assert_ne!(flags & SETTINGS_F_DECAP_INDEX, 0, "decap keys indexed");
    assert_ne!(flags & SETTINGS_F_DECAP_PREFIXES, 0, "prefix flagged");
    expect_opened(&f, BALANCER, NODE, "the /32 entry");
    expect_opened(&f, Ipv4Addr::new(10, 9, 200, 7), NODE, "inside the /16");
    f.expect_drop(
        &ipip_tunnel(stranger, NODE),
        DropReason::DecapNotAllowed,
        "unlisted source with a prefix configured",
    );
    // The same for IPv6-in-IPv6: a /128 through the index, a /32 through the trie.
    desired.decap_v6 = vec![(BALANCER6, 128), ("fd00:9::".parse().expect("addr"), 32)];
    f.dp.apply(&desired).expect("apply");
    let inner6 = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, ACK, b"data"));
    let tunnel6 = |src: Ipv6Addr| {
        eth(
            NODE_MAC,
            B1_MAC,
            &[],
            0x86dd,
            &ipv6(src, NODE6, 41, &inner6),
        )
    };
    for (src, what) in [
        (BALANCER6, "IPv6 /128 entry"),
        ("fd00:9::5".parse().expect("addr"), "inside the IPv6 /32"),
    ] {
        let (verdict, out) = f.run(&tunnel6(src));
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, eth(NODE_MAC, B1_MAC, &[], 0x86dd, &inner6), "{what}");
    }
    f.expect_drop(
        &tunnel6(B3_6),
        DropReason::DecapNotAllowed,
        "unlisted IPv6 source with a prefix configured",
    );
    desired.decap_v6 = vec![];

    // The prefix gone again: its sources are refused at once.
    desired.decap_v4.pop();
    f.dp.apply(&desired).expect("apply");
    assert_eq!(settings_flags(&f.dp) & SETTINGS_F_DECAP_PREFIXES, 0);
    f.expect_drop(
        &ipip_tunnel(Ipv4Addr::new(10, 9, 200, 7), NODE),
        DropReason::DecapNotAllowed,
        "the removed prefix",
    );

    // More host entries than the index has room for (max_services 16: 128 entries): the
    // maps answer instead, with the same result.
    desired.decap_v4 = (0..200u8)
        .map(|i| (Ipv4Addr::new(10, 7, 0, i), 32))
        .chain([(BALANCER, 32)])
        .collect();
    f.dp.apply(&desired).expect("apply");
    assert_eq!(
        settings_flags(&f.dp) & SETTINGS_F_DECAP_INDEX,
        0,
        "decap keys do not fit"
    );
    expect_opened(&f, BALANCER, NODE, "listed, through the maps");
    expect_opened(
        &f,
        Ipv4Addr::new(10, 7, 0, 150),
        NODE,
        "listed, through the maps",
    );
    f.expect_drop(
        &ipip_tunnel(stranger, NODE),
        DropReason::DecapNotAllowed,
        "unlisted, through the maps",
    );
    f.expect_pass_unchanged(
        &ipip_tunnel(BALANCER, B3),
        "to another host, through the maps",
    );
    let (verdict, _) = f.run(&client_tcp(VIP, 40001, 80, SYN));
    assert_eq!(verdict, XDP_TX, "VIPs unaffected");

    // Room again: back to the index.
    desired.decap_v4 = vec![(BALANCER, 32)];
    f.dp.apply(&desired).expect("apply");
    assert_ne!(settings_flags(&f.dp) & SETTINGS_F_DECAP_INDEX, 0);
    expect_opened(&f, BALANCER, NODE, "through the index again");
    f.expect_drop(
        &ipip_tunnel(Ipv4Addr::new(10, 7, 0, 150), NODE),
        DropReason::DecapNotAllowed,
        "no longer listed",
    );
}

/// The words the tunnel pair table holds, sorted.
fn pair_words(dp: &Dataplane) -> Vec<u64> {
    let table: aya::maps::Array<&MapData, [u64; 2]> =
        aya::maps::Array::try_from(dp.map(map_names::DECAP_PAIRS).expect("pair table"))
            .expect("typed");
    let mut words: Vec<u64> = (0..table.len())
        .flat_map(|i| table.get(&i, 0).expect("bucket"))
        .filter(|w| *w != 0)
        .collect();
    words.sort();
    words
}

#[test]
fn a_listed_ipv4_tunnel_is_settled_by_the_pair_table() {
    use lb_common::{FAMILY_V4, SETTINGS_F_VIP_INDEX_B, VIP_INDEX_DECAP, VIP_INDEX_LOCAL, VipSlot};
    let opened = ipip_opened();
    let mut desired = standard_desired();
    // A second host whose pair shares the balancer's bucket: one of the two takes the
    // bucket's second place, which the program must look at too.
    let bucket = |src| lb_common::decap_pair_bucket(tunnel_pair_word(src, NODE));
    let neighbour = (0..1u32 << 16)
        .map(|i| Ipv4Addr::from(0x0a08_0000 + i))
        .find(|a| bucket(*a) == bucket(BALANCER))
        .expect("a host whose pair shares the balancer's bucket");
    desired.decap_v4 = vec![
        (BALANCER, 32),
        (neighbour, 32),
        (Ipv4Addr::new(10, 9, 0, 0), 16),
    ];
    let pins = PinDir::new("decap-pairs");
    let mut f = Fixture::new(true, &desired);
    f.dp.pin(&pins.dir).expect("pin");
    let mut both = vec![
        tunnel_pair_word(BALANCER, NODE),
        tunnel_pair_word(neighbour, NODE),
    ];
    both.sort();
    assert_eq!(
        pair_words(&f.dp),
        both,
        "the listed hosts to this node (prefix entries make none)"
    );
    let mut index: aya::maps::Array<MapData, VipSlot> =
        aya::maps::Array::try_from(aya::maps::Map::Array(
            MapData::from_pin(pins.maps.join(map_names::VIP_INDEX)).expect("pin"),
        ))
        .expect("typed");
    let half = index.len() / 2;
    let base = if settings_flags(&f.dp) & SETTINGS_F_VIP_INDEX_B != 0 {
        half
    } else {
        0
    };
    // Every IPv4 key of the decap role in the index is made unrecognisable (the slot
    // stays taken, so no search ends early at it): what still opens a tunnel is the pair
    // table.
    for i in base..base + half {
        let mut slot = index.get(&i, 0).expect("slot");
        if slot.key.family == FAMILY_V4 | VIP_INDEX_LOCAL
            || slot.key.family == FAMILY_V4 | VIP_INDEX_DECAP
        {
            slot.key.proto = 0xff;
            index.set(i, slot, 0).expect("write slot");
        }
    }
    for host in [BALANCER, neighbour] {
        let (verdict, out) = f.run(&ipip_tunnel(host, NODE));
        assert_eq!(
            (verdict, out),
            (XDP_PASS, opened.clone()),
            "by the pair alone, from {host}"
        );
    }
    // A free place holds 0, which is also the word of a tunnel from 0.0.0.0 to 0.0.0.0:
    // such a packet must not match it.
    f.expect_pass_unchanged(
        &ipip_tunnel(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
        "a tunnel between unspecified addresses, whose word is a free place's",
    );
    // Other tunnels need the index, which no longer answers: to this node is now "not
    // local" (left to the stack).
    f.expect_pass_unchanged(
        &ipip_tunnel(Ipv4Addr::new(10, 9, 1, 1), NODE),
        "the prefix's tunnel, without the node's own key",
    );

    // A host taken off the list leaves the table (and the index is written afresh):
    // its tunnel is refused, the new host's opened.
    let newcomer = Ipv4Addr::new(10, 7, 0, 1);
    desired.decap_v4 = vec![(newcomer, 32)];
    f.dp.apply(&desired).expect("apply");
    assert_eq!(pair_words(&f.dp), vec![tunnel_pair_word(newcomer, NODE)]);
    f.expect_drop(
        &ipip_tunnel(BALANCER, NODE),
        DropReason::DecapNotAllowed,
        "no longer listed",
    );
    let (verdict, out) = f.run(&ipip_tunnel(newcomer, NODE));
    assert_eq!((verdict, out), (XDP_PASS, opened.clone()), "newly listed");

    // More pairs than the table takes (3 addresses × 700 hosts): it is left empty, and
    // the searches (here the maps: the index has no room either) answer.
    desired.decap_v4 = (0..700u32)
        .map(|i| (Ipv4Addr::from(0x0a07_0000 + i), 32))
        .chain([(BALANCER, 32)])
        .collect();
    desired
        .local_v4
        .extend([Ipv4Addr::new(10, 1, 0, 9), Ipv4Addr::new(10, 1, 0, 10)]);
    f.dp.apply(&desired).expect("apply");
    assert!(pair_words(&f.dp).is_empty(), "no pairs over the cap");
    let (verdict, out) = f.run(&ipip_tunnel(BALANCER, NODE));
    assert_eq!(
        (verdict, out),
        (XDP_PASS, opened.clone()),
        "by the searches"
    );
    let (verdict, out) = f.run(&ipip_tunnel(
        Ipv4Addr::new(10, 7, 0, 33),
        Ipv4Addr::new(10, 1, 0, 9),
    ));
    assert_eq!((verdict, out), (XDP_PASS, opened), "to the second address");
    f.expect_drop(
        &ipip_tunnel(Ipv4Addr::new(198, 51, 100, 1), NODE),
        DropReason::DecapNotAllowed,
        "unlisted source",
    );
}

#[test]
fn icmp_echo_to_a_vip_is_answered_by_the_balancer() {
    let f = Fixture::new(false, &standard_desired());
    let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(b"ping payload");
    let frame = icmp_frame(CLIENT, VIP, &echo);
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX);
    let mut reply = echo.clone();
    reply[0] = 0;
    let c = csum(&reply);
    reply[2..4].copy_from_slice(&c);
    let mut ip = ipv4(VIP, CLIENT, 1, &[], &reply, false);
    // Same TOS and identification as the request; TTL starts afresh.
    ip[8] = 64;
    ip[10] = 0;
    ip[11] = 0;
    let c = csum(&ip[..20]);
    ip[10..12].copy_from_slice(&c);
    assert_eq!(
        out,
        eth(CLIENT_MAC, NODE_MAC, &[], 0x0800, &ip),
        "echo reply"
    );
    f.expect_pass_unchanged(
        &icmp_frame(CLIENT, Ipv4Addr::new(192, 0, 2, 99), &echo),
        "ping to a non-VIP address",
    );
}

#[test]
fn icmp_errors_about_a_vip_flow_go_to_the_backend_that_owns_it() {
    let f = Fixture::new(false, &standard_desired());
    // Open flows to the three-backend service; remember each one's backend.
    let mut owners = Vec::new();
    for port in 0..30u16 {
        let (v, out) = f.run(&client_tcp(VIP, 31000 + port, 443, SYN));
        assert_eq!(v, XDP_TX);
        owners.push((
            31000 + port,
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        ));
    }
    let router = Ipv4Addr::new(198, 51, 100, 1);
    for (port, owner) in owners {
        // A router on the return path complains about the backend's reply VIP → client.
        let quoted = ipv4(
            VIP,
            CLIENT,
            PROTO_TCP,
            &[],
            &tcp(443, port, ACK, b"reply data"),
            true,
        );
        let mut err = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
        err.extend_from_slice(&quoted[..28]);
        let frame = icmp_frame(router, VIP, &err);
        let (v, out) = f.run(&frame);
        assert_eq!(v, XDP_TX, "ICMP error about the flow from port {port}");
        let b1 = [(B1, B1_MAC), (B2, B2_MAC), (B3, B3_MAC)];
        let mac = b1.iter().find(|(a, _)| *a == owner).expect("known").1;
        assert_eq!(
            out,
            expected_ipip_no_df(&frame[14..], owner, mac, &out).0,
            "forwarded to {owner}, the flow's backend"
        );
    }
    // An error quoting something that is no flow of a VIP is dropped and counted.
    let stray = ipv4(VIP, CLIENT, PROTO_TCP, &[], &tcp(9999, 1, ACK, b""), true);
    let mut err = vec![3, 1, 0, 0, 0, 0, 0, 0];
    err.extend_from_slice(&stray[..28]);
    f.expect_drop(
        &icmp_frame(router, VIP, &err),
        DropReason::IcmpUnmatched,
        "error about a port the VIP does not serve",
    );
    let mut cut = vec![3, 4, 0, 0, 0, 0, 0, 0];
    cut.extend_from_slice(&stray[..22]);
    f.expect_drop(
        &icmp_frame(router, VIP, &cut),
        DropReason::IcmpUnmatched,
        "error quoting a truncated header",
    );
}

#[test]
fn packets_too_big_for_ipip_get_fragmentation_needed_also_without_df() {
    let f = Fixture::new(false, &standard_desired());
    for df in [true, false] {
        let frame = eth(
            NODE_MAC,
            CLIENT_MAC,
            &[],
            0x0800,
            &ipv4(
                CLIENT,
                VIP,
                PROTO_TCP,
                &[0x01, 0x01, 0x01, 0x00],
                &tcp(5, 80, ACK, &[7u8; 1450]),
                df,
            ),
        );
        let (verdict, out) = f.run(&frame);
        assert_eq!(verdict, XDP_TX, "df={df}");
        assert_eq!(
            out,
            expected_frag_needed(&frame[14..], 1480),
            "df={df}: quotes header with options + 8 bytes"
        );
    }
    // The largest packet that fits once encapsulated goes through.
    let fits = client_v4(VIP, PROTO_TCP, &tcp(6, 80, ACK, &[7u8; 1440]), true);
    let (verdict, out) = f.run(&fits);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, expected_ipip(&fits[14..], B1, B1_MAC));
}

#[test]
fn source_ranges_admit_listed_clients_only() {
    let mut desired = standard_desired();
    desired.services[0].source_ranges = vec![
        "203.0.113.0/28".parse().expect("net"),
        "198.51.100.7/32".parse().expect("net"),
    ];
    let f = Fixture::new(false, &desired);
    let from = |src: Ipv4Addr| {
        eth(
            NODE_MAC,
            CLIENT_MAC,
            &[],
            0x0800,
            &ipv4(src, VIP, PROTO_TCP, &[], &tcp(4000, 80, SYN, b""), true),
        )
    };
    for ok in [
        CLIENT,
        Ipv4Addr::new(203, 0, 113, 0),
        Ipv4Addr::new(203, 0, 113, 15),
        Ipv4Addr::new(198, 51, 100, 7),
    ] {
        let (v, out) = f.run(&from(ok));
        assert_eq!(v, XDP_TX, "{ok} is listed");
        assert_eq!(out, expected_ipip(&from(ok)[14..], B1, B1_MAC));
    }
    for bad in [
        Ipv4Addr::new(203, 0, 113, 16),
        Ipv4Addr::new(198, 51, 100, 8),
        Ipv4Addr::new(10, 1, 0, 50),
    ] {
        f.expect_drop(
            &from(bad),
            DropReason::SourceNotAllowed,
            &format!("{bad} is not listed"),
        );
    }
    // Other services on the same VIP address are not restricted.
    let (v, _) = f.run(&client_tcp(VIP, 4001, 443, SYN));
    assert_eq!(v, XDP_TX);
}

/// The services (by id) with source-range entries in the IPv4 trie, and each entry's
/// prefix length (the service id's 32 bits included).
fn src_v4_entries(f: &Fixture) -> Vec<(u32, u32)> {
    let trie: aya::maps::LpmTrie<&MapData, lb_common::SrcRangeV4, u32> =
        aya::maps::LpmTrie::try_from(f.dp.map(map_names::SRC_V4).expect("trie")).expect("typed");
    let mut out: Vec<(u32, u32)> = trie
        .keys()
        .map(|k| {
            let k = k.expect("key");
            (u32::from_be_bytes(k.data().service), k.prefix_len())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_services_source_ranges_leave_the_trie_with_the_list_or_the_service() {
    let mut desired = standard_desired();
    desired.services[0].source_ranges = vec![
        "203.0.113.0/28".parse().expect("net"),
        "198.51.100.7/32".parse().expect("net"),
    ];
    let mut f = Fixture::new(false, &desired);
    let name = desired.services[0].name.clone();
    let id = f.dp.service_id(&name).expect("id");
    assert_eq!(src_v4_entries(&f), vec![(id, 32 + 28), (id, 32 + 32)]);
    // A range dropped from the list leaves the trie.
    desired.services[0].source_ranges.truncate(1);
    f.dp.apply(&desired).expect("narrow");
    assert_eq!(src_v4_entries(&f), vec![(id, 32 + 28)]);
    // A removed service's ranges leave with it: the next service given its id (ids are
    // reused once the fresh ones run out) must not inherit them.
    desired.services.remove(0);
    f.dp.apply(&desired).expect("remove");
    assert_eq!(f.dp.service_id(&name), None);
    assert_eq!(src_v4_entries(&f), vec![]);
}

#[test]
fn ipv6_later_fragments_follow_their_first_when_options_sit_in_the_fragmentable_part() {
    let f = Fixture::new(false, &standard_desired());
    // Datagrams to multi6 (VIP6:443, three backends): Fragment (next 60) | Destination
    // Options (next TCP) | TCP …, the options in the fragmentable part as RFC 8200 puts
    // them. The later fragment's data is no header: its walk ends at the fragment header,
    // and both fragments are keyed and hashed on that header's next header, so from every
    // client both reach the same backend.
    let mut fragmentable = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    fragmentable.extend_from_slice(&tcp(40000, 443, ACK, &[0x41u8; 64]));
    let frag = |client: Ipv6Addr, offset_units: u16, more: bool, part: &[u8]| {
        let mut fh = vec![60, 0];
        fh.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
        fh.extend_from_slice(&0xabcd_0002u32.to_be_bytes());
        fh.extend_from_slice(part);
        ipv6(client, VIP6, 44, &fh)
    };
    let outer_dst = |out: &[u8]| out[14 + 24..14 + 40].to_vec();
    let mut backends = std::collections::HashSet::new();
    for c in 1..=32u16 {
        let client = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 1, c);
        let (v, first) = f.run(&v6_frame(&frag(client, 0, true, &fragmentable[..32])));
        assert_eq!(v, XDP_TX, "first fragment forwarded");
        let (v, later) = f.run(&v6_frame(&frag(client, 4, false, &fragmentable[32..])));
        assert_eq!(v, XDP_TX, "later fragment forwarded like its first");
        assert_eq!(
            outer_dst(&later),
            outer_dst(&first),
            "client {client}: one backend"
        );
        backends.insert(outer_dst(&first));
    }
    assert!(backends.len() > 1, "the clients spread over the backends");
    assert_eq!(f.drops(DropReason::Truncated), 0);
}

#[test]
fn an_ipv6_packet_too_big_about_a_backends_fragmented_reply_reaches_the_backend() {
    let f = Fixture::new(false, &standard_desired());
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
    // The backend's 3000-byte UDP reply from dns6 (VIP6_L2:53, one backend, B2) to the
    // client, fragmented by the backend; a router on the way answers its first fragment
    // with "packet too big": the balancer must pass it to the backend, whose path MTU it
    // is, as it does for IPv4's quoted first fragments.
    let quote = |offset_units: u16| {
        let mut fh = vec![PROTO_UDP, 0];
        fh.extend_from_slice(&((offset_units << 3) | 1).to_be_bytes());
        fh.extend_from_slice(&0x0000_4242u32.to_be_bytes());
        fh.extend_from_slice(&udp(53, 5353, &[7u8; 120]));
        fh[8 + 4..8 + 6].copy_from_slice(&3000u16.to_be_bytes());
        let quoted = ipv6(VIP6_L2, CLIENT6, 44, &fh);
        let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
        msg.extend_from_slice(&quoted);
        ipv6(router, VIP6_L2, 58, &icmp6(router, VIP6_L2, &msg))
    };
    let err = quote(0);
    let (v, out) = f.run(&v6_frame(&err));
    assert_eq!(v, XDP_TX, "the error reaches the backend");
    assert_eq!(out, eth(B2_MAC, NODE_MAC, &[], 0x86dd, &err));
    // A later fragment's quote carries no ports: it names no flow.
    f.expect_drop(
        &v6_frame(&quote(20)),
        DropReason::IcmpUnmatched,
        "a quoted later fragment",
    );
}

/// An IPIP packet from `src` to `dst` carrying a client's TCP segment to VIP:80.
fn ipip_from(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let inner = client_ack_v4();
    eth(
        NODE_MAC,
        B1_MAC,
        &[],
        0x0800,
        &ipv4(src, dst, 4, &[], &inner, true),
    )
}

#[test]
fn replacing_a_large_decap_allow_list_is_refused_before_anything_is_written() {
    // Each list fits the 1024-entry trie, both together (new entries go in before the old
    // leave) do not: once, the apply failed midway and its rollback left entries of the
    // rejected list in the trie, decapsulating sources no config allowed.
    let old: Vec<(Ipv4Addr, u8)> = (0..1000u32)
        .map(|i| (Ipv4Addr::from(0x0a07_0000 + i), 32))
        .collect();
    let new: Vec<(Ipv4Addr, u8)> = (0..1000u32)
        .map(|i| (Ipv4Addr::from(0x0a06_0000 + i), 32))
        .collect();
    let mut running = standard_desired();
    running.decap_v4 = old;
    let mut f = Fixture::new(true, &running);
    let newcomer = Ipv4Addr::from(0x0a06_0000);
    f.expect_drop(
        &ipip_from(newcomer, NODE),
        DropReason::DecapNotAllowed,
        "not listed",
    );
    let b2 = f.dp.backend_id("multi", IpAddr::V4(B2));
    let mut next = running.clone();
    next.decap_v4 = new;
    next.services[5] = service("multi", VIP, 443, PROTO_TCP, false, &[B1, B3]);
    let err = f.dp.apply(&next).expect_err("refused").to_string();
    assert!(
        err.contains("IPv4 decap allow list table is full"),
        "refused by the capacity check: {err}"
    );
    f.expect_drop(
        &ipip_from(newcomer, NODE),
        DropReason::DecapNotAllowed,
        "still not listed",
    );
    assert_eq!(
        f.dp.backend_id("multi", IpAddr::V4(B2)),
        b2,
        "the running state untouched"
    );
}

#[test]
fn a_config_the_check_accepts_applies_whatever_the_order_of_its_ports() {
    // Linear probing with a bounded distance fits or not by the order of insertion: the
    // check and the apply must place the VIP index's entries in the same order. These
    // ports (24 on one VIP, max_services 1: 32 slots) once passed `l3lb check` and failed
    // to apply, as listed; sorted they applied.
    let ports = [
        6939u16, 26077, 65398, 49381, 31734, 45247, 33301, 34811, 36209, 57514, 12813, 8989, 43183,
        44947, 34788, 21595, 18956, 18134, 10634, 827, 37697, 43548, 32228, 40161,
    ];
    let text = format!(
        "interface: eth0\nmax_services: 1\nservices:\n  - name: web\n    vip: 192.0.2.10\n    \
         ports: {ports:?}\n    backends:\n      - address: 10.1.0.11\n"
    );
    let cfg = l3lb::config::Config::parse(&text).expect("`l3lb check` accepts it");
    let desired = l3lb::agent::desired_from_config(
        &cfg,
        &std::collections::HashSet::new(),
        &std::collections::HashSet::new(),
    );
    let _ = enter_namespace();
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 1,
        ..opts(false)
    })
    .expect("load");
    dp.apply(&desired).expect("what the check accepts applies");
}

#[test]
fn two_spellings_of_one_source_range_are_one_entry_across_reloads() {
    // `10.1.2.3/8` and `10.0.0.0/8` are one trie entry: dropping either spelling while the
    // other stays listed must keep it (the entry was once swept, refusing every client).
    let net = |s: &str| -> ipnet::IpNet { s.parse().expect("net") };
    let mut desired = standard_desired();
    desired.services[0].source_ranges = vec![net("10.1.2.3/8"), net("10.9.9.9/8")];
    let mut f = Fixture::new(false, &desired);
    let id = f.dp.service_id(&desired.services[0].name).expect("id");
    assert_eq!(src_v4_entries(&f), vec![(id, 32 + 8)]);
    desired.services[0].source_ranges = vec![net("10.0.0.0/8")];
    f.dp.apply(&desired).expect("respelled");
    assert_eq!(src_v4_entries(&f), vec![(id, 32 + 8)], "the entry stays");
    let client = eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x0800,
        &ipv4(
            Ipv4Addr::new(10, 5, 5, 5),
            VIP,
            PROTO_TCP,
            &[],
            &tcp(40000, 80, SYN, b""),
            true,
        ),
    );
    let (verdict, _) = f.run(&client);
    assert_eq!(verdict, XDP_TX, "a client in 10.0.0.0/8 is still admitted");
    assert_eq!(f.drops(DropReason::SourceNotAllowed), 0);
    desired.services[0].source_ranges = vec![];
    f.dp.apply(&desired).expect("no ranges");
    assert_eq!(src_v4_entries(&f), vec![]);
}

#[test]
fn client_ip_affinity_sends_all_ports_of_a_client_to_one_backend() {
    let mut desired = standard_desired();
    desired.services[5].mode.affinity_client_ip = true;
    let f = Fixture::new(false, &desired);
    let mut used = std::collections::HashMap::new();
    for c in 1..=40u8 {
        let client = Ipv4Addr::new(203, 0, 113, c);
        let mut seen = std::collections::HashSet::new();
        for port in 0..10u16 {
            let frame = eth(
                NODE_MAC,
                CLIENT_MAC,
                &[],
                0x0800,
                &ipv4(
                    client,
                    VIP,
                    PROTO_TCP,
                    &[],
                    &tcp(10000 + port * 7, 443, SYN, b""),
                    true,
                ),
            );
            let (v, out) = f.run(&frame);
            assert_eq!(v, XDP_TX);
            seen.insert(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
        }
        assert_eq!(seen.len(), 1, "all connections of {client} on one backend");
        *used.entry(*seen.iter().next().expect("one")).or_insert(0) += 1;
    }
    assert_eq!(
        used.len(),
        3,
        "clients still spread over the backends: {used:?}"
    );
}

#[test]
fn fragments_of_a_datagram_reach_one_backend() {
    let f = Fixture::new(false, &standard_desired());
    // A UDP datagram to the L2 service (no size growth), in three fragments.
    let payload = udp(5353, 53, &[9u8; 64]);
    let frag = |id: u16, offset_words: u16, more: bool, bytes: &[u8], src: Ipv4Addr| {
        let mut ip = ipv4(src, VIP_L2, PROTO_UDP, &[], bytes, false);
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = offset_words | if more { 0x2000 } else { 0 };
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[10] = 0;
        ip[11] = 0;
        let c = csum(&ip[..20]);
        ip[10..12].copy_from_slice(&c);
        eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &ip)
    };
    let counted_before = f.fragments_counted();
    for (id, src) in [(7u16, CLIENT), (8, Ipv4Addr::new(203, 0, 113, 99))] {
        let parts = [
            frag(id, 0, true, &payload[..24], src),
            frag(id, 3, true, &payload[24..48], src),
            frag(id, 6, false, &payload[48..], src),
        ];
        for p in &parts {
            let (v, out) = f.run(p);
            assert_eq!(v, XDP_TX, "fragment forwarded");
            assert_eq!(
                out,
                eth(B2_MAC, NODE_MAC, &[], 0x0800, &p[14..]),
                "fragment to the service's backend"
            );
        }
    }
    assert_eq!(
        f.fragments_counted() - counted_before,
        6,
        "every forwarded fragment counted"
    );
    // A later fragment whose first was never seen, for a VIP address with port-specific
    // services only: which service it belongs to is unknowable.
    let orphan = frag(99, 3, false, &payload[24..], CLIENT);
    f.expect_drop(
        &orphan,
        DropReason::FragmentUnknown,
        "later fragment without its first",
    );
    // Fragments to an all-ports VIP need no first fragment.
    let mut ip = ipv4(CLIENT, VIP_ALL, PROTO_TCP, &[], &[1u8; 16], false);
    ip[6..8].copy_from_slice(&3u16.to_be_bytes());
    ip[10] = 0;
    ip[11] = 0;
    let c = csum(&ip[..20]);
    ip[10..12].copy_from_slice(&c);
    let (v, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &ip));
    assert_eq!(v, XDP_TX, "later fragment to an all-ports VIP");
    assert_eq!(out, expected_ipip_no_df(&ip, B3, B3_MAC, &out).0);
    // Outer headers without DF carry distinct identifications (RFC 6864).
    let (_, first_id) = expected_ipip_no_df(&ip, B3, B3_MAC, &out);
    let (_, again) = f.run(&eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &ip));
    let (_, second_id) = expected_ipip_no_df(&ip, B3, B3_MAC, &again);
    assert_ne!(
        first_id, second_id,
        "outer identification changes per packet"
    );
    // A fragmented ping to a VIP goes to a backend of the address's first service,
    // which reassembles it and answers.
    let mut ping = vec![8u8, 0, 0, 0, 0, 1, 0, 1];
    ping.extend_from_slice(&[0x55; 16]);
    let mut frag_ping = ipv4(CLIENT, VIP, 1, &[], &ping, false);
    frag_ping[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
    frag_ping[10] = 0;
    frag_ping[11] = 0;
    let c = csum(&frag_ping[..20]);
    frag_ping[10..12].copy_from_slice(&c);
    let (v, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &frag_ping));
    assert_eq!(v, XDP_TX, "fragmented ping forwarded");
    assert_eq!(out, expected_ipip_no_df(&frag_ping, B1, B1_MAC, &out).0);
    // Fragments to non-VIP addresses are the stack's.
    let mut other = frag(5, 3, false, &payload[24..], CLIENT);
    other[14 + 16..14 + 20].copy_from_slice(&[192, 0, 2, 99]);
    other[14 + 10] = 0;
    other[14 + 11] = 0;
    let c = csum(&other[14..34]);
    other[24..26].copy_from_slice(&c);
    f.expect_pass_unchanged(&other, "fragment to a non-VIP address");
}

#[test]
fn fragments_hash_on_addresses_and_protocol_only() {
    // The three-backend service: a first fragment's backend is the one Maglev gives the
    // (source, destination, protocol) tuple with the ports zeroed, whatever its ports.
    let f = Fixture::new(false, &standard_desired());
    let mut by_client = std::collections::HashMap::new();
    for c in 1..=30u8 {
        let client = Ipv4Addr::new(203, 0, 113, c);
        let mut seen = std::collections::HashSet::new();
        for sport in [1000u16, 2000, 3000] {
            let mut ip = ipv4(
                client,
                VIP,
                PROTO_TCP,
                &[],
                &tcp(sport, 443, ACK, &[0u8; 12]),
                false,
            );
            ip[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
            ip[4..6].copy_from_slice(&sport.to_be_bytes());
            ip[10] = 0;
            ip[11] = 0;
            let c = csum(&ip[..20]);
            ip[10..12].copy_from_slice(&c);
            let (v, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, &[], 0x0800, &ip));
            assert_eq!(v, XDP_TX);
            seen.insert(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
        }
        assert_eq!(
            seen.len(),
            1,
            "fragments from {client} share a backend whatever their ports"
        );
        by_client.insert(client, *seen.iter().next().expect("one"));
    }
    let spread: std::collections::HashSet<_> = by_client.values().collect();
    assert!(spread.len() > 1, "different clients still spread");
}

#[test]
fn ipv6_tcp_is_encapsulated_ip6ip6_and_udp_rewritten_in_l2() {
    // On one CPU, so the segments after the first two are sent from the next-hop cache's
    // learnt backend (see `known_flows_are_sent_from_the_learnt_backend_until_the_epoch_advances`).
    pin_this_thread_to_cpu0();
    let f = Fixture::new(false, &standard_desired());
    let ip = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b"hello"));
    let (v, out) = f.run(&v6_frame(&ip));
    assert_eq!(v, XDP_TX);
    assert_eq!(out, expected_ip6ip6(&ip, B1_6, B1_MAC));
    // The traffic class (here DSCP EF, ECN CE) is carried to the outer header, the flow
    // label is not: by the general parse for the segment that confirms the flow's entry,
    // by the quick parse for the ones after it (a known flow's).
    let mut ip = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, ACK, b"more"));
    ip[0] = 0x6b;
    ip[1] = 0xb5;
    ip[2] = 0x12;
    for segment in 1..=3 {
        let (v, out) = f.run(&v6_frame(&ip));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            &out[14..16],
            &[0x6b, 0xb0],
            "segment {segment}: traffic class 0xbb, flow label 0"
        );
        assert_eq!(out, expected_ip6ip6(&ip, B1_6, B1_MAC), "segment {segment}");
    }
    let ip = ipv6(CLIENT6, VIP6_L2, PROTO_UDP, &udp(5353, 53, b"query"));
    for datagram in 1..=3 {
        let (v, out) = f.run(&v6_frame(&ip));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out,
            eth(B2_MAC, NODE_MAC, &[], 0x86dd, &ip),
            "datagram {datagram}"
        );
    }
}

#[test]
fn ipv6_vip_traffic_is_dropped_and_counted_when_its_program_is_missing() {
    let f = Fixture::new(false, &standard_desired());
    // The agent fills the slot before attaching; emptied here as a broken load would leave it.
    let Some(aya::maps::Map::ProgramArray(md)) = f.dp.map(map_names::PATHS) else {
        panic!("{} is a program array", map_names::PATHS);
    };
    let id = md.info().expect("map info").id();
    let mut paths = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(
        MapData::from_id(id).expect("open the map"),
    ))
    .expect("typed");
    paths
        .clear_index(&lb_common::PATH_V6)
        .expect("empty the IPv6 slot");
    let ip = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b""));
    f.expect_drop(
        &v6_frame(&ip),
        DropReason::ProgramMissing,
        "IPv6 to a VIP without the IPv6 program",
    );
    // What the entry point decides itself is unaffected.
    f.expect_pass_unchanged(
        &v6_frame(&ipv6(
            CLIENT6,
            "2001:db8:99::1".parse().expect("addr"),
            PROTO_TCP,
            &tcp(1, 80, SYN, b""),
        )),
        "IPv6 to a non-VIP address",
    );
    let (v, _) = f.run(&client_tcp(VIP, 40000, 80, SYN));
    assert_eq!(v, XDP_TX, "IPv4 to a VIP");
}

#[test]
fn ipv6_extension_headers_are_walked_within_a_bound() {
    let f = Fixture::new(false, &standard_desired());
    // Hop-by-hop options, then destination options, then TCP.
    let mut chain = vec![60, 0, 1, 4, 0, 0, 0, 0];
    chain.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
    chain.extend_from_slice(&tcp(40001, 80, SYN, b"x"));
    let ip = ipv6(CLIENT6, VIP6, 0, &chain);
    let (v, out) = f.run(&v6_frame(&ip));
    assert_eq!(v, XDP_TX, "two extension headers");
    assert_eq!(out, expected_ip6ip6(&ip, B1_6, B1_MAC));
    // An unknown upper-layer protocol to a VIP is the stack's.
    f.expect_pass_unchanged(
        &v6_frame(&ipv6(CLIENT6, VIP6, 132, &[0u8; 16])),
        "SCTP to a VIP",
    );
    // Chains beyond the bound, cut headers and bad lengths: see `malformed.rs`.
}

#[test]
fn ipv6_neighbour_discovery_and_router_advertisements_are_untouched() {
    let f = Fixture::new(false, &standard_desired());
    let snm = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x10);
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&VIP6.octets());
    let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 7);
    f.expect_pass_unchanged(
        &v6_frame(&ipv6(ll, snm, 58, &icmp6(ll, snm, &ns))),
        "NS for a VIP to its solicited-node group",
    );
    f.expect_pass_unchanged(
        &v6_frame(&ipv6(ll, VIP6, 58, &icmp6(ll, VIP6, &ns))),
        "NS unicast to a VIP",
    );
    let ra = vec![134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0];
    let all = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    f.expect_pass_unchanged(
        &v6_frame(&ipv6(ll, all, 58, &icmp6(ll, all, &ra))),
        "router advertisement",
    );
}

#[test]
fn ipv6_echo_is_answered_and_too_big_packets_get_packet_too_big() {
    let f = Fixture::new(false, &standard_desired());
    let echo = icmp6(CLIENT6, VIP6, &[128, 0, 0, 0, 0, 9, 0, 1, b'h', b'i']);
    let (v, out) = f.run(&v6_frame(&ipv6(CLIENT6, VIP6, 58, &echo)));
    assert_eq!(v, XDP_TX);
    let reply = icmp6(VIP6, CLIENT6, &[129, 0, 0, 0, 0, 9, 0, 1, b'h', b'i']);
    let mut ip = ipv6(VIP6, CLIENT6, 58, &reply);
    ip[7] = 64;
    assert_eq!(
        out,
        eth(CLIENT_MAC, NODE_MAC, &[], 0x86dd, &ip),
        "echo reply"
    );

    let big = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(7, 80, ACK, &[5u8; 1440]));
    let (v, out) = f.run(&v6_frame(&big));
    assert_eq!(
        v, XDP_TX,
        "1500-byte packet that ip6ip6 would grow past the MTU"
    );
    let mut msg = vec![2, 0, 0, 0];
    msg.extend_from_slice(&1460u32.to_be_bytes());
    msg.extend_from_slice(&big[..128]);
    let mut ip = ipv6(VIP6, CLIENT6, 58, &icmp6(VIP6, CLIENT6, &msg));
    ip[7] = 64;
    assert_eq!(
        out,
        eth(CLIENT_MAC, NODE_MAC, &[], 0x86dd, &ip),
        "packet too big, MTU 1500 - 40"
    );
}

#[test]
fn ipv6_icmp_errors_go_to_the_flow_owner() {
    let f = Fixture::new(false, &standard_desired());
    let macs = [(B1_6, B1_MAC), (B2_6, B2_MAC), (B3_6, B3_MAC)];
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
    for port in 0..20u16 {
        let (v, out) = f.run(&v6_frame(&ipv6(
            CLIENT6,
            VIP6,
            PROTO_TCP,
            &tcp(32000 + port, 443, SYN, b""),
        )));
        assert_eq!(v, XDP_TX);
        let owner = Ipv6Addr::from(<[u8; 16]>::try_from(&out[14 + 24..14 + 40]).expect("16 bytes"));
        let quoted = ipv6(
            VIP6,
            CLIENT6,
            PROTO_TCP,
            &tcp(443, 32000 + port, ACK, &[1u8; 64]),
        );
        let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
        msg.extend_from_slice(&quoted);
        let err = ipv6(router, VIP6, 58, &icmp6(router, VIP6, &msg));
        let (v, out) = f.run(&v6_frame(&err));
        assert_eq!(v, XDP_TX, "packet too big about port {}", 32000 + port);
        let mac = macs.iter().find(|(a, _)| *a == owner).expect("known").1;
        assert_eq!(
            out,
            expected_ip6ip6(&err, owner, mac),
            "forwarded to {owner}"
        );
    }
}

#[test]
fn ipv6_decap_fragments_and_source_ranges() {
    let mut desired = standard_desired();
    desired.decap_v6 = vec![(BALANCER6, 128)];
    desired.services[6].source_ranges = vec!["2001:db8:c::/48".parse().expect("net")];
    let f = Fixture::new(true, &desired);

    let inner = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, ACK, b"data"));
    let outer = |src: Ipv6Addr| eth(NODE_MAC, B1_MAC, &[], 0x86dd, &ipv6(src, NODE6, 41, &inner));
    let (v, out) = f.run(&outer(BALANCER6));
    assert_eq!(v, XDP_PASS, "decapsulated");
    assert_eq!(out, eth(NODE_MAC, B1_MAC, &[], 0x86dd, &inner));
    f.expect_drop(
        &outer(B3_6),
        DropReason::DecapNotAllowed,
        "IPv6-in-IPv6 from an unlisted source",
    );

    // Source ranges: the web6 service admits 2001:db8:c::/48 only.
    let (v, _) = f.run(&v6_frame(&ipv6(
        CLIENT6,
        VIP6,
        PROTO_TCP,
        &tcp(1, 80, SYN, b""),
    )));
    assert_eq!(v, XDP_TX, "listed client");
    let stranger = Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 1);
    f.expect_drop(
        &v6_frame(&ipv6(stranger, VIP6, PROTO_TCP, &tcp(1, 80, SYN, b""))),
        DropReason::SourceNotAllowed,
        "unlisted client",
    );

    // A datagram in two fragments to the l2 UDP service: both to its backend.
    let dgram = udp(5353, 53, &[3u8; 40]);
    let frag = |offset_units: u16, more: bool, part: &[u8]| {
        let mut fh = vec![PROTO_UDP, 0];
        fh.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
        fh.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
        fh.extend_from_slice(part);
        ipv6(CLIENT6, VIP6_L2, 44, &fh)
    };
    for ip in [frag(0, true, &dgram[..24]), frag(3, false, &dgram[24..])] {
        let (v, out) = f.run(&v6_frame(&ip));
        assert_eq!(v, XDP_TX, "fragment forwarded");
        assert_eq!(out, eth(B2_MAC, NODE_MAC, &[], 0x86dd, &ip));
    }
}

#[test]
fn next_hops_are_reused_until_the_agent_expires_them() {
    // The next-hop cache is per CPU: every run of the program must be on one CPU, or the
    // second run may meet another CPU's empty entry and ask the FIB anyway.
    pin_this_thread_to_cpu0();
    let mut f = Fixture::new(false, &standard_desired());
    let frame = client_tcp(VIP, 40000, 80, SYN);
    let (_, out) = f.run(&frame);
    assert_eq!(&out[0..6], &B1_MAC, "first packet: the FIB's neighbour");
    // The backend's MAC changes (say, a replaced machine at the same address).
    let new_mac = [0x02, 0, 0, 0, 0, 0x99];
    let status = std::process::Command::new("ip")
        .args([
            "neigh",
            "replace",
            "10.1.0.11",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "fx0",
            "nud",
            "permanent",
        ])
        .status()
        .expect("ip");
    assert!(status.success());
    let (_, out) = f.run(&frame);
    assert_eq!(
        &out[0..6],
        &B1_MAC,
        "until the agent expires it, the learnt next hop is reused"
    );
    f.dp.expire_next_hops().expect("advance the epoch");
    let (_, out) = f.run(&frame);
    assert_eq!(&out[0..6], &new_mac, "after it, the FIB is asked again");
}

/// A known flow's packets to a tunnelled backend are sent from what the next-hop cache
/// learnt of the backend in this epoch, without reading its entry; after the epoch's
/// advance (every change the agent writes, and every half second) the entry is read
/// again. Shown by an entry rewritten behind the agent's back, which moves the flow only
/// once the epoch advances.
#[test]
fn known_flows_are_sent_from_the_learnt_backend_until_the_epoch_advances() {
    // The cache is per CPU (see `next_hops_are_reused_until_the_agent_expires_them`).
    pin_this_thread_to_cpu0();
    let pins = PinDir::new("learnt");
    let mut f = Fixture::new(false, &standard_desired());
    f.dp.pin(&pins.dir).expect("pin");
    let syn = client_tcp(VIP, 41000, 80, SYN);
    let ack = client_tcp(VIP, 41000, 80, ACK);
    f.run(&syn);
    // The first ACK confirms the entry and teaches the cache; the next is a known flow's.
    for _ in 0..2 {
        assert_eq!(f.run(&ack).0, XDP_TX);
    }
    let id = flow_entry(&f, 41000, 80).expect("entry").state.backend;
    let mut backends: aya::maps::Array<MapData, lb_common::Backend> = aya::maps::Array::try_from(
        aya::maps::Map::Array(MapData::from_pin(pins.maps.join(map_names::BACKENDS)).expect("pin")),
    )
    .expect("typed");
    let mut entry = backends.get(&id, 0).expect("backend entry");
    let (was, was_mac, other, other_mac) = if entry.addr[..4] == B1.octets() {
        (B1, B1_MAC, B2, B2_MAC)
    } else {
        (B2, B2_MAC, B1, B1_MAC)
    };
    let (v, out) = f.run(&ack);
    assert_eq!(v, XDP_TX);
    assert_eq!(out, expected_ipip(&ack[14..], was, was_mac));
    entry.addr[..4].copy_from_slice(&other.octets());
    backends.set(id, entry, 0).expect("rewrite the entry");
    let (v, out) = f.run(&ack);
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        expected_ipip(&ack[14..], was, was_mac),
        "within the epoch, the backend as the cache learnt it"
    );
    f.dp.expire_next_hops().expect("advance the epoch");
    for _ in 0..2 {
        let (v, out) = f.run(&ack);
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out,
            expected_ipip(&ack[14..], other, other_mac),
            "after the advance, the backend as its entry says"
        );
    }
}

/// Removing a backend starts a new epoch as soon as its entry is cleared, before its
/// counters are folded into its service's and before the rest of the apply (and once
/// more at the end, as every apply that changes something): from the clear on, no
/// packet that reads the epoch is sent by what the next-hop cache learnt of it.
#[test]
fn removing_a_backend_starts_a_new_epoch_as_soon_as_its_entry_is_cleared() {
    let mut desired = standard_desired();
    let mut f = Fixture::new(false, &desired);
    let multi = desired
        .services
        .iter()
        .position(|s| s.name == "multi")
        .expect("the multi service");
    let before = f.dp.epoch();
    desired.services[multi].backends[0].weight += 1;
    f.dp.apply(&desired).expect("reweight");
    assert_eq!(
        f.dp.epoch(),
        before.wrapping_add(1),
        "a change that removes nothing: one advance, at the end"
    );
    let before = f.dp.epoch();
    desired.services[multi].backends.pop();
    f.dp.apply(&desired).expect("remove a backend");
    assert_eq!(
        f.dp.epoch(),
        before.wrapping_add(2),
        "a removal: one advance right after the clear, one at the end"
    );
}

/// Keeps the calling test thread on CPU 0 (`BPF_PROG_TEST_RUN` runs the program on the
/// caller's CPU), so per-CPU state written by one run is seen by the next.
fn pin_this_thread_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity(0, …) applies to
    // the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU 0"
        );
    }
}

/// Every VIP entry and every used backend entry, to compare the maps before and after.
fn map_snapshot(
    dp: &Dataplane,
) -> (
    Vec<(lb_common::VipKey, lb_common::VipInfo)>,
    Vec<lb_common::Backend>,
) {
    let vips: aya::maps::HashMap<&MapData, lb_common::VipKey, lb_common::VipInfo> =
        aya::maps::HashMap::try_from(dp.map(map_names::VIPS).expect("vips")).expect("typed");
    let mut v: Vec<_> = vips.iter().map(|e| e.expect("entry")).collect();
    v.sort_by_key(|(k, _)| *k);
    let backends: aya::maps::Array<&MapData, lb_common::Backend> =
        aya::maps::Array::try_from(dp.map(map_names::BACKENDS).expect("backends")).expect("typed");
    let b = backends
        .iter()
        .map(|e| e.expect("entry"))
        .filter(|b| b.family != 0)
        .collect();
    (v, b)
}

#[test]
fn an_apply_that_would_not_fit_changes_nothing_and_says_why() {
    let ifindex = enter_namespace();
    let mut dp = Dataplane::load(&LoadOptions {
        max_services: 2,
        max_backends: 4,
        ..opts(false)
    })
    .expect("load");
    let running = Desired {
        services: vec![
            service("a", VIP, 80, PROTO_TCP, false, &[B1, B2]),
            service("b", VIP, 443, PROTO_TCP, false, &[B3]),
        ],
        ..Default::default()
    };
    dp.apply(&running).expect("apply");
    let before = map_snapshot(&dp);
    // Two new services in place of the two running ones: each fits the maps on its own,
    // but the switch holds old and new together, which does not.
    let renamed = Desired {
        services: vec![
            service("c", VIP, 80, PROTO_TCP, false, &[B2]),
            service("d", VIP, 443, PROTO_TCP, false, &[B1]),
        ],
        ..Default::default()
    };
    let err = dp.apply(&renamed).expect_err("does not fit").to_string();
    assert!(
        err.contains("service table is full (2 entries)") && err.contains("raise max_services"),
        "{err}"
    );
    assert_eq!(map_snapshot(&dp), before, "nothing written");
    let too_many_backends = Desired {
        services: vec![
            service("a", VIP, 80, PROTO_TCP, false, &[B1, B2, B3]),
            service("b", VIP, 443, PROTO_TCP, false, &[B1, B2]),
        ],
        ..Default::default()
    };
    let err = dp
        .apply(&too_many_backends)
        .expect_err("does not fit")
        .to_string();
    assert!(err.contains("backend table is full (4 entries)"), "{err}");
    assert_eq!(map_snapshot(&dp), before, "nothing written");
    // More VIP entries than the VIP index the data plane searches can hold (64 slots for
    // two services, at most half of them used): refused, nothing written.
    let mut many_ports = service("a", VIP, 80, PROTO_TCP, false, &[B1]);
    many_ports.vips = (1..=40).map(|p| (IpAddr::V4(VIP), p, PROTO_TCP)).collect();
    let too_many_vips = Desired {
        services: vec![many_ports, service("b", VIP, 443, PROTO_TCP, false, &[B3])],
        ..Default::default()
    };
    let err = dp
        .apply(&too_many_vips)
        .expect_err("does not fit")
        .to_string();
    assert!(
        err.contains("VIP index slot table is full (32 entries)")
            && err.contains("raise max_services"),
        "{err}"
    );
    assert_eq!(map_snapshot(&dp), before, "nothing written");
    // The running state still forwards exactly as before.
    let prog = dp.program().expect("program");
    let frame = client_tcp(VIP, 40000, 443, SYN);
    let r = l3lb::testing::run_xdp(prog, ifindex, &frame).expect("test_run");
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.frame, expected_ipip(&frame[14..], B3, B3_MAC));
    // And an apply that fits goes through.
    let reweighted = Desired {
        services: vec![
            service("a", VIP, 80, PROTO_TCP, false, &[B1]),
            service("b", VIP, 443, PROTO_TCP, false, &[B3, B2]),
        ],
        ..Default::default()
    };
    dp.apply(&reweighted).expect("fits");
    assert_ne!(map_snapshot(&dp), before);
}

#[test]
fn a_next_hop_on_a_device_without_xdp_transmit_is_dropped_and_counted_for_it() {
    let mut f = Fixture::new(false, &standard_desired());
    // A bridge takes no XDP frames; B1 is routed over it from here on.
    ip(&["link", "add", "fxbr", "type", "bridge"]);
    ip(&["link", "set", "fxbr", "up"]);
    let b1 = B1.to_string();
    ip(&["route", "add", &format!("{b1}/32"), "dev", "fxbr"]);
    ip(&[
        "neigh",
        "replace",
        &b1,
        "lladdr",
        "02:00:00:00:00:11",
        "dev",
        "fxbr",
        "nud",
        "permanent",
    ]);
    let bridge = l3lb::sys::interface_index("fxbr").expect("bridge index");
    const XDP_REDIRECT: u32 = 4;
    // Unlisted, the frame goes to the bridge (where the kernel would lose it).
    let (verdict, _) = f.run(&client_tcp(VIP, 40000, 80, SYN));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(f.drops(DropReason::EgressNoXdp), 0);

    // Listed (and the next-hop cache's epoch over, as the agent's tick ends it), it is
    // dropped with its reason and counted for the device.
    let left_out =
        f.dp.list_no_xmit(&[bridge, f.ifindex].into())
            .expect("list");
    assert_eq!(left_out, 0);
    assert_eq!(
        f.dp.no_xmit_counts().expect("counts"),
        [(bridge, 0), (f.ifindex, 0)].into()
    );
    f.dp.expire_next_hops().expect("tick");
    f.expect_drop(
        &client_tcp(VIP, 40001, 80, SYN),
        DropReason::EgressNoXdp,
        "next hop on a bridge",
    );
    f.expect_drop(
        &client_tcp(VIP, 40000, 80, ACK),
        DropReason::EgressNoXdp,
        "a known flow's next hop on a bridge",
    );
    // The ingress device stays usable for XDP_TX, listed or not.
    let (verdict, _) = f.run(&client_tcp(VIP_ALL, 40000, 22, SYN));
    assert_eq!(verdict, XDP_TX, "a backend behind the ingress device");
    // Listing again keeps the counts; unlisting drops them and sends again.
    f.dp.list_no_xmit(&[bridge].into()).expect("relist");
    assert_eq!(f.dp.no_xmit_counts().expect("counts"), [(bridge, 2)].into());
    f.dp.list_no_xmit(&Default::default()).expect("unlist");
    f.dp.expire_next_hops().expect("tick");
    let (verdict, _) = f.run(&client_tcp(VIP, 40002, 80, SYN));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(f.drops(DropReason::EgressNoXdp), 2);
}

/// `frame` with a VLAN tag (TPID `tpid`, VLAN `vid`) inserted after its MAC addresses,
/// its source MAC `src`.
fn tagged_from(frame: &[u8], src: [u8; 6], tpid: u16, vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f[6..12].copy_from_slice(&src);
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

#[test]
fn a_route_out_of_a_vlan_device_leaves_tagged_by_its_parent() {
    let mut f = Fixture::new(false, &standard_desired());
    // A bridge stands in for the VLAN device (this kernel has no 802.1Q): XDP cannot
    // transmit on it, the FIB names it (and its address as the source MAC), and the agent
    // lists it as VLAN 100 on fx0.
    const VLAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    ip(&[
        "link",
        "add",
        "fxvl",
        "address",
        "02:00:00:00:00:99",
        "type",
        "bridge",
    ]);
    ip(&["link", "set", "fxvl", "up"]);
    for (addr, mac) in [
        (B1.to_string(), B1_MAC),
        (B2.to_string(), B2_MAC),
        (B1_6.to_string(), B1_MAC),
        (B2_6.to_string(), B2_MAC),
    ] {
        let host = if addr.contains(':') { "/128" } else { "/32" };
        ip(&["route", "add", &format!("{addr}{host}"), "dev", "fxvl"]);
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            "fxvl",
            "nud",
            "permanent",
        ]);
    }
    let vlan = l3lb::sys::interface_index("fxvl").expect("index");
    f.dp.list_vlans(&[(vlan, lb_common::VlanDev::new(f.ifindex, 0x8100, 100))].into())
        .expect("list");
    // The agent lists the device as one XDP cannot transmit on too: the parent decides.
    f.dp.list_no_xmit(&[vlan].into()).expect("list");
    let tagged = |frame: &[u8]| tagged_from(frame, VLAN_MAC, 0x8100, 100);

    // IPIP: the tag between the addresses and the EtherType, sent back out of fx0.
    let syn = client_tcp(VIP, 40000, 80, SYN);
    let (verdict, out) = f.run(&syn);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, tagged(&expected_ipip(&syn[14..], B1, B1_MAC)));
    // The flow's next packet, sent from the next-hop cache, alike.
    let ack = client_tcp(VIP, 40000, 80, ACK);
    let (verdict, out) = f.run(&ack);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, tagged(&expected_ipip(&ack[14..], B1, B1_MAC)));
    // Frames that came with one or two tags leave with the egress VLAN's alone.
    for tags in [&[7u16][..], &[7, 8][..]] {
        let (verdict, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, tags, 0x0800, &syn[14..]));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            out,
            tagged(&expected_ipip(&syn[14..], B1, B1_MAC)),
            "{tags:?}"
        );
    }

    // IPv6-in-IPv6 likewise, for a new flow and from the cache.
    for flags in [SYN, ACK] {
        let inner6 = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, flags, b"hello"));
        let (verdict, out) = f.run(&v6_frame(&inner6));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, tagged(&expected_ip6ip6(&inner6, B1_6, B1_MAC)));
    }

    // MAC rewrite leaves the frame with the device's tag alone: pushed onto an untagged
    // frame, in place of one tag, in place of two; both families.
    let dns = client_udp(VIP_L2, 40000, 53, b"q");
    let mut want = dns.clone();
    want[..6].copy_from_slice(&B2_MAC);
    for tags in [&[][..], &[7u16][..], &[7, 8][..]] {
        let (verdict, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, tags, 0x0800, &dns[14..]));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, tagged(&want), "{tags:?}");
    }
    let dns6 = ipv6(CLIENT6, VIP6_L2, PROTO_UDP, &udp(40000, 53, b"q"));
    for tags in [&[][..], &[7u16][..]] {
        let (verdict, out) = f.run(&eth(NODE_MAC, CLIENT_MAC, tags, 0x86dd, &dns6));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            out,
            tagged(&eth(B2_MAC, NODE_MAC, &[], 0x86dd, &dns6)),
            "{tags:?}"
        );
    }
    assert_eq!(f.drops(DropReason::EgressNoXdp), 0);

    // 802.1ad, on a parent other than the ingress device: redirected there.
    let other = l3lb::sys::interface_index("fx1").expect("fx1");
    f.dp.list_vlans(&[(vlan, lb_common::VlanDev::new(other, 0x88a8, 200))].into())
        .expect("relist");
    f.dp.expire_next_hops().expect("tick");
    const XDP_REDIRECT: u32 = 4;
    let (verdict, out) = f.run(&syn);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(
        out,
        tagged_from(
            &expected_ipip(&syn[14..], B1, B1_MAC),
            VLAN_MAC,
            0x88a8,
            200
        )
    );

    // Unlisted, the VLAN device is one XDP cannot transmit on: a counted drop.
    f.dp.list_vlans(&Default::default()).expect("unlist");
    f.dp.expire_next_hops().expect("tick");
    f.expect_drop(&syn, DropReason::EgressNoXdp, "VLAN device not listed");
}

/// Runs `ip` with `args` in this thread's namespace; it must succeed.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}
