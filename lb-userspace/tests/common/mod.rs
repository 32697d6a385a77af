//! Shared by the data-plane test crates (`fixtures.rs`, `malformed.rs`, `contention.rs`): a fresh network
//! namespace per test thread, the real XDP object loaded with maps written by the agent's
//! own map writer, and frame builders that do not share code with the data plane.
//!
//! Each test crate uses a part of this module, so unused items are expected.
#![allow(
    dead_code,
    reason = "each test crate uses a different part of the helpers"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, PerCpuArray};
use l3lb::dataplane::{
    Dataplane, Desired, DesiredBackend, DesiredService, LoadOptions, ServiceMode,
};
use lb_common::{DropReason, PROTO_TCP, PROTO_UDP, map_names};

/// `XDP_DROP` verdict.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS` verdict.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX` verdict.
pub const XDP_TX: u32 = 3;

/// MAC of the balancer's NIC (`fx0`).
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC the client's frames come from.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
/// The balancer's IPv4 address (also the IPIP outer source).
pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// A client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// IPv4 VIP: `web` (TCP 80, ipip, B1) and `multi` (TCP 443, ipip, B1–B3).
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// IPv4 VIP of `dns` (UDP 53, l2, B2).
pub const VIP_L2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
/// IPv4 all-ports VIP of `all` (TCP, ipip, B3).
pub const VIP_ALL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
/// IPv4 VIP of `local`, whose backend is this node.
pub const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
/// IPv4 VIP whose backend has no neighbour entry.
pub const VIP_NONEIGH: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
/// Backend 1.
pub const B1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
/// Backend 2.
pub const B2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 12);
/// Backend 3.
pub const B3: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 13);
/// A backend without a neighbour entry.
pub const B_NONEIGH: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);
/// Neighbour MAC of backend 1 (both families).
pub const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
/// Neighbour MAC of backend 2 (both families).
pub const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
/// Neighbour MAC of backend 3 (both families).
pub const B3_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x13];
/// Another balancer: an IPIP source the decap tests allow.
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
/// The node's IPv6 address (also the ip6ip6 outer source).
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// An IPv6 client.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
/// An IPv6 address that is no VIP.
pub const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x99);
/// IPv6 VIP: `web6` (TCP 80, ipip, B1_6) and `multi6` (TCP 443).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
/// IPv6 VIP of `dns6` (UDP 53, l2, B2_6).
pub const VIP6_L2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x20);
/// IPv6 backend 1.
pub const B1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11);
/// IPv6 backend 2.
pub const B2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x12);
/// IPv6 backend 3.
pub const B3_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x13);
/// Another balancer: an IPv6-in-IPv6 source the decap tests allow.
pub const BALANCER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

/// Moves this thread into a new network namespace with interface `fx0` (the NIC).
pub fn enter_namespace() -> u32 {
    l3lb::testing::enter_test_namespace(&l3lb::testing::TestNet {
        mac: "02:00:00:00:00:01",
        ipv4: "10.1.0.1/24",
        gateway4: "10.1.0.254",
        ipv6: "fd00:1::1/64",
        gateway6: "fd00:1::fe",
        neighbours: &[
            ("10.1.0.11", "02:00:00:00:00:11"),
            ("10.1.0.12", "02:00:00:00:00:12"),
            ("10.1.0.13", "02:00:00:00:00:13"),
            ("fd00:1::11", "02:00:00:00:00:11"),
            ("fd00:1::12", "02:00:00:00:00:12"),
            ("fd00:1::13", "02:00:00:00:00:13"),
        ],
    })
    .expect("test namespace")
}

/// The client's IPv4 TCP segment (ACK, 4 bytes of data, DF) from port 40000 to VIP:80:
/// the inner packet of the tunnel tests.
pub fn client_ack_v4() -> Vec<u8> {
    ipv4(
        CLIENT,
        VIP,
        lb_common::PROTO_TCP,
        &[],
        &tcp(40000, 80, ACK, b"data"),
        true,
    )
}

/// The connection-table key of the client's TCP flow from `sport` to `VIP:dport`.
pub fn client_key(sport: u16, dport: u16) -> lb_common::FlowKey {
    let mut key = lb_common::FlowKey {
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: lb_common::PROTO_TCP,
        family: lb_common::FAMILY_V4,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&CLIENT.octets());
    key.dst[..4].copy_from_slice(&VIP.octets());
    key
}

/// An IPv4 backend of weight 1 (local when it is the node).
pub fn backend(addr: Ipv4Addr) -> DesiredBackend {
    DesiredBackend {
        address: IpAddr::V4(addr),
        weight: 1,
        local: addr == NODE,
    }
}

/// An IPv6 service with one VIP entry.
pub fn service6(
    name: &str,
    vip: Ipv6Addr,
    port: u16,
    proto: u8,
    l2: bool,
    backends: &[Ipv6Addr],
) -> DesiredService {
    DesiredService {
        name: name.into(),
        vips: vec![(IpAddr::V6(vip), port, proto)],
        mode: ServiceMode {
            l2,
            affinity_client_ip: false,
        },
        backends: backends
            .iter()
            .map(|&b| DesiredBackend {
                address: IpAddr::V6(b),
                weight: 1,
                local: false,
            })
            .collect(),
        source_ranges: vec![],
    }
}

/// An IPv4 service with one VIP entry.
pub fn service(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: u8,
    l2: bool,
    backends: &[Ipv4Addr],
) -> DesiredService {
    DesiredService {
        name: name.into(),
        vips: vec![(IpAddr::V4(vip), port, proto)],
        mode: ServiceMode {
            l2,
            affinity_client_ip: false,
        },
        backends: backends.iter().map(|&b| backend(b)).collect(),
        source_ranges: vec![],
    }
}

/// The services most fixtures run against (see the VIP constants).
pub fn standard_desired() -> Desired {
    Desired {
        services: vec![
            service("web", VIP, 80, PROTO_TCP, false, &[B1]),
            service("dns", VIP_L2, 53, PROTO_UDP, true, &[B2]),
            service("all", VIP_ALL, 0, PROTO_TCP, false, &[B3]),
            service("local", VIP_LOCAL, 80, PROTO_TCP, false, &[NODE]),
            service("noneigh", VIP_NONEIGH, 80, PROTO_TCP, false, &[B_NONEIGH]),
            service("multi", VIP, 443, PROTO_TCP, false, &[B1, B2, B3]),
            service6("web6", VIP6, 80, PROTO_TCP, false, &[B1_6]),
            service6("dns6", VIP6_L2, 53, PROTO_UDP, true, &[B2_6]),
            service6("multi6", VIP6, 443, PROTO_TCP, false, &[B1_6, B2_6, B3_6]),
        ],
        decap_v4: vec![],
        local_v4: vec![NODE],
        decap_v6: vec![],
        local_v6: vec![NODE6],
    }
}

/// Small load-time options; `decap` turns the decap role on.
pub fn opts(decap: bool) -> LoadOptions {
    LoadOptions {
        ring_size: 251,
        max_services: 16,
        max_backends: 64,
        conntrack_size: 4096,
        encap_src_v4: NODE,
        encap_src_v6: NODE6,
        decap,
        // As shipped: the program's debug logs off.
        log_level: l3lb::program_log::XdpLogLevel::Off,
    }
}

/// A loaded program in this thread's own network namespace.
pub struct Fixture {
    /// The loaded program and its maps, filled by `Dataplane::apply`.
    pub dp: Dataplane,
    /// Index of the namespace's NIC, presented as the ingress interface.
    pub ifindex: u32,
}

impl Fixture {
    /// Enters a fresh namespace, loads the program and applies `desired`.
    pub fn new(decap: bool, desired: &Desired) -> Self {
        Self::with_options(&opts(decap), desired)
    }

    /// Like [`Fixture::new`], loaded with `options`.
    pub fn with_options(options: &LoadOptions, desired: &Desired) -> Self {
        let ifindex = enter_namespace();
        let mut dp = Dataplane::load(options).expect("load");
        dp.apply(desired).expect("apply");
        Self { dp, ifindex }
    }

    /// Runs the program once on `frame`: verdict and output frame.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dp.program().expect("program");
        let r = l3lb::testing::run_xdp(prog, self.ifindex, frame).expect("test_run");
        (r.verdict, r.frame)
    }

    /// The count of drop `reason`, summed over CPUs.
    pub fn drops(&self, reason: DropReason) -> u64 {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.dp.map(map_names::DROPS).expect("drops map"))
                .expect("typed");
        map.get(&(reason as u32), 0).expect("get").iter().sum()
    }

    /// Every drop reason's count, then every action's, each summed over CPUs.
    pub fn outcome_counts(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        for (name, n) in [
            (map_names::DROPS, lb_common::DROP_REASON_COUNT),
            (map_names::ACTIONS, lb_common::ACTION_COUNT),
        ] {
            let map: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(self.dp.map(name).expect("counter map")).expect("typed");
            for i in 0..n {
                counts.push(map.get(&i, 0).expect("get").iter().sum());
            }
        }
        counts
    }

    /// The `fragment` event count, summed over CPUs.
    pub fn fragments_counted(&self) -> u64 {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.dp.map(map_names::EVENTS).expect("events map"))
                .expect("typed");
        map.get(&(lb_common::Event::Fragment as u32), 0)
            .expect("get")
            .iter()
            .sum()
    }

    /// Asserts `frame` is dropped and counted as `reason`.
    pub fn expect_drop(&self, frame: &[u8], reason: DropReason, what: &str) {
        let before = self.drops(reason);
        let (verdict, _) = self.run(frame);
        assert_eq!(verdict, XDP_DROP, "{what}: verdict");
        assert_eq!(
            self.drops(reason),
            before + 1,
            "{what}: counted as {}",
            reason.label()
        );
    }

    /// Asserts `frame` is passed to the stack untouched.
    pub fn expect_pass_unchanged(&self, frame: &[u8], what: &str) {
        let (verdict, out) = self.run(frame);
        assert_eq!(verdict, XDP_PASS, "{what}: verdict");
        assert_eq!(out, frame, "{what}: frame must be untouched");
    }
}

// ---- packet building (independent of the data plane's own code) ----

/// Internet checksum of `bytes`.
pub fn csum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

/// An IPv4 packet with a correct header checksum.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    payload: &[u8],
    df: bool,
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let hl = 20 + options.len();
    let tot = (hl + payload.len()) as u16;
    let mut h = vec![
        0x40 | (hl / 4) as u8,
        0x10,
        0,
        0,
        0x12,
        0x34,
        if df { 0x40 } else { 0 },
        0,
        63,
        proto,
        0,
        0,
    ];
    h[2..4].copy_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c);
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(63);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// ICMPv6 message with its checksum filled in (pseudo-header included).
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2] = 0;
    m[3] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&m);
    let c = csum(&pseudo);
    m[2..4].copy_from_slice(&c);
    m
}

/// What the balancer must emit for an IPv6-in-IPv6-forwarded packet.
pub fn expected_ip6ip6(inner: &[u8], backend: Ipv6Addr, backend_mac: [u8; 6]) -> Vec<u8> {
    let mut outer = vec![0x60 | (inner[0] & 0x0f), inner[1] & 0xf0, 0, 0];
    outer.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    outer.push(41);
    outer.push(64);
    outer.extend_from_slice(&NODE6.octets());
    outer.extend_from_slice(&backend.octets());
    outer.extend_from_slice(inner);
    eth(backend_mac, NODE_MAC, &[], 0x86dd, &outer)
}

/// A TCP segment (data offset 5, no checksum).
pub fn tcp(sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(data);
    t
}

/// A UDP datagram (no checksum).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(data);
    u
}

/// An Ethernet frame with 802.1Q tags `vlans`.
pub fn eth(dst: [u8; 6], src: [u8; 6], vlans: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for v in vlans {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// TCP SYN flag.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;

/// An IPv4 packet from the client to `dst` carrying `l4` (protocol `proto`; DF set when
/// `df`), in a frame.
pub fn client_v4(dst: Ipv4Addr, proto: u8, l4: &[u8], df: bool) -> Vec<u8> {
    eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x0800,
        &ipv4(CLIENT, dst, proto, &[], l4, df),
    )
}

/// A TCP segment from the client to `dst`, in a frame.
pub fn client_tcp(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    client_v4(dst, PROTO_TCP, &tcp(sport, dport, flags, b"hello"), true)
}

/// A UDP datagram (without DF) from the client to `dst`, in a frame.
pub fn client_udp(dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    client_v4(dst, PROTO_UDP, &udp(sport, dport, payload), false)
}

/// What the balancer must emit for an IPIP-forwarded packet (outer identification 0,
/// as written for inner packets with DF).
pub fn expected_ipip(inner: &[u8], backend: Ipv4Addr, backend_mac: [u8; 6]) -> Vec<u8> {
    expected_ipip_with_id(inner, backend, backend_mac, [0, 0])
}

/// `expected_ipip` for an inner packet without DF: the outer header then carries a
/// per-packet identification, taken from `out`; returns it too.
pub fn expected_ipip_no_df(
    inner: &[u8],
    backend: Ipv4Addr,
    backend_mac: [u8; 6],
    out: &[u8],
) -> (Vec<u8>, u16) {
    assert_eq!(inner[6] & 0x40, 0, "inner packet without DF");
    let id = [out[18], out[19]];
    (
        expected_ipip_with_id(inner, backend, backend_mac, id),
        u16::from_be_bytes(id),
    )
}

/// `expected_ipip` with the outer identification `id`.
pub fn expected_ipip_with_id(
    inner: &[u8],
    backend: Ipv4Addr,
    backend_mac: [u8; 6],
    id: [u8; 2],
) -> Vec<u8> {
    let tos = inner[1];
    let df = inner[6] & 0x40;
    let tot = (inner.len() + 20) as u16;
    let mut outer = vec![0x45, tos, 0, 0, id[0], id[1], df, 0, 64, 4, 0, 0];
    outer[2..4].copy_from_slice(&tot.to_be_bytes());
    outer.extend_from_slice(&NODE.octets());
    outer.extend_from_slice(&backend.octets());
    let c = csum(&outer);
    outer[10..12].copy_from_slice(&c);
    outer.extend_from_slice(inner);
    eth(backend_mac, NODE_MAC, &[], 0x0800, &outer)
}

/// ICMP "fragmentation needed" from the VIP to the client quoting `orig` (an IPv4 packet).
pub fn expected_frag_needed(orig: &[u8], mtu: u16) -> Vec<u8> {
    let ihl = usize::from(orig[0] & 0x0f) * 4;
    let quote = &orig[..ihl + 8];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c);
    let src = Ipv4Addr::new(orig[16], orig[17], orig[18], orig[19]);
    let dst = Ipv4Addr::new(orig[12], orig[13], orig[14], orig[15]);
    let mut ip = ipv4(src, dst, 1, &[], &icmp, false);
    // The balancer writes TOS 0, identification 0 and TTL 64.
    ip[1] = 0;
    ip[4] = 0;
    ip[5] = 0;
    ip[8] = 64;
    ip[10] = 0;
    ip[11] = 0;
    let c = csum(&ip[..20]);
    ip[10..12].copy_from_slice(&c);
    eth(CLIENT_MAC, NODE_MAC, &[], 0x0800, &ip)
}

/// An ICMP message (checksum filled in) from `src` to `dst`, in a frame.
pub fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, icmp: &[u8]) -> Vec<u8> {
    let mut m = icmp.to_vec();
    let c = csum(&m);
    m[2..4].copy_from_slice(&c);
    eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x0800,
        &ipv4(src, dst, 1, &[], &m, false),
    )
}

/// An IPv6 packet in an untagged frame from the client.
pub fn v6_frame(ip: &[u8]) -> Vec<u8> {
    eth(NODE_MAC, CLIENT_MAC, &[], 0x86dd, ip)
}
