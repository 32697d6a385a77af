//! End-to-end, on the wire: what a client notices of source ranges, client-IP affinity,
//! fragmented datagrams, path-MTU discovery through an `ipip` balancer, ICMP echo to a
//! VIP, and ICMP errors from a router reaching the backend that owns the connection.
//! Real sockets in network namespaces (see `l3lb_tests::scenario`); needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use l3lb::config::Affinity;
use l3lb_tests::{
    Capture, Frame,
    bulk::{Pattern, pattern_digest},
    capture::IPPROTO_ICMP,
    client,
    lab::{FAR_CLIENT_IPV4, ROUTER_IPV4},
    scenario::{BULK_PORT, Mode, Scenario, ScenarioSpec, TCP_PORT, UDP_PORT, VIP},
};

const T: Duration = Duration::from_secs(2);

fn vip() -> IpAddr {
    IpAddr::V4(VIP)
}

/// A counter of `l3lb status --json`, 0 when absent.
fn count(map: &BTreeMap<String, u64>, name: &str) -> u64 {
    map.get(name).copied().unwrap_or(0)
}

/// Type, code and next-hop MTU of an ICMP "destination unreachable" in an untagged IPv4
/// frame; `None` for anything else.
fn icmp_unreachable(frame: &Frame) -> Option<(u8, u8, u16)> {
    let d = &frame.data;
    if d.get(12..14)? != [0x08, 0x00] || *d.get(23)? != IPPROTO_ICMP {
        return None;
    }
    let icmp = 14 + usize::from(d.get(14)? & 0x0f) * 4;
    let h = d.get(icmp..icmp + 8)?;
    (h[0] == 3).then(|| (h[0], h[1], u16::from_be_bytes([h[6], h[7]])))
}

// ---------------------------------------------------------------------------------------
// Source ranges

fn only_listed_sources_are_served(mode: Mode) {
    let allowed = Ipv4Addr::new(10, 77, 0, 201);
    let s =
        Scenario::start_spec(ScenarioSpec::new(mode, 2).source_ranges(&[&format!("{allowed}/32")]))
            .expect("scenario");
    let ns = &s.lab.client.ns;
    s.lab
        .client_add_ipv4(allowed)
        .expect("second client address");
    let from_allowed = SocketAddr::new(IpAddr::V4(allowed), 0);
    let refused = IpAddr::V4(s.lab.client.ipv4);
    let drops_before = count(&s.status().expect("status").drops, "source_not_allowed");

    // The listed address is answered over TCP and UDP, and the backend sees it.
    let line = client::tcp_request_from(ns, from_allowed, vip(), TCP_PORT, T)
        .expect("TCP from the listed address is answered");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(reply.peer.ip(), IpAddr::V4(allowed), "{line}");
    let line = client::udp_request_from(ns, from_allowed, vip(), UDP_PORT, T)
        .expect("UDP from the listed address is answered");
    assert_eq!(
        client::parse_reply(&line).expect("reply").peer.ip(),
        IpAddr::V4(allowed),
        "{line}"
    );

    // The client's main address is not listed: its connection attempt times out (dropped,
    // not refused) and its datagram gets no answer.
    let err = client::tcp_request(ns, vip(), TCP_PORT, None, T)
        .expect_err("TCP from an unlisted address must not be answered");
    assert!(
        format!("{err:#}").contains("timed out"),
        "the connection attempt times out: {err:#}"
    );
    client::udp_request(ns, vip(), UDP_PORT, None, T)
        .expect_err("UDP from an unlisted address must not be answered");

    for server in &s.tcp {
        assert!(
            server.peers().iter().all(|p| p.ip() != refused),
            "a backend saw the unlisted client over TCP: {:?}",
            server.peers()
        );
    }
    for server in &s.udp {
        assert!(
            server.peers().iter().all(|p| p.ip() != refused),
            "a backend saw the unlisted client over UDP: {:?}",
            server.peers()
        );
    }
    let drops_after = count(&s.status().expect("status").drops, "source_not_allowed");
    assert!(
        drops_after >= drops_before + 2,
        "the SYN and the datagram are counted as source_not_allowed: {drops_before} → {drops_after}"
    );
}

#[test]
fn ipip_source_ranges_answer_listed_clients_and_drop_others() {
    only_listed_sources_are_served(Mode::Ipip);
}

#[test]
fn l2_source_ranges_answer_listed_clients_and_drop_others() {
    only_listed_sources_are_served(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Affinity

#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend_and_spreads_clients() {
    let s = Scenario::start_spec(ScenarioSpec::new(Mode::Ipip, 3).affinity(Affinity::ClientIp))
        .expect("scenario");
    let ns = &s.lab.client.ns;

    // 200 connections from one address, each from its own source port: one backend.
    let bulk = client::tcp_bulk(ns, vip(), TCP_PORT, 30000..30200, T).expect("bulk");
    assert_eq!(bulk.failures, 0, "{:?}", bulk.errors);
    assert_eq!(
        bulk.counts.len(),
        1,
        "all of one client's connections on one backend: {:?}",
        bulk.counts
    );
    let mut by_client: BTreeMap<IpAddr, String> = BTreeMap::new();
    by_client.insert(
        IpAddr::V4(s.lab.client.ipv4),
        bulk.counts.keys().next().expect("a backend").clone(),
    );

    // Eight more client addresses, 20 connections each: each stays on one backend, and
    // together they use more than one.
    for host in 201..=208u8 {
        let addr = Ipv4Addr::new(10, 77, 0, host);
        s.lab.client_add_ipv4(addr).expect("client address");
        let bulk = client::tcp_bulk_from(ns, IpAddr::V4(addr), vip(), TCP_PORT, 31000..31020, T)
            .expect("bulk");
        assert_eq!(bulk.failures, 0, "from {addr}: {:?}", bulk.errors);
        assert!(
            bulk.peers.iter().all(|p| p.ip() == IpAddr::V4(addr)),
            "the backend saw {addr}: {:?}",
            bulk.peers
        );
        assert_eq!(
            bulk.counts.len(),
            1,
            "all connections from {addr} on one backend: {:?}",
            bulk.counts
        );
        by_client.insert(
            IpAddr::V4(addr),
            bulk.counts.keys().next().expect("a backend").clone(),
        );
    }
    let used: BTreeSet<&String> = by_client.values().collect();
    assert!(
        used.len() > 1,
        "clients spread over more than one backend: {by_client:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Fragments

/// Sends `payload` as one UDP datagram to the VIP's UDP service (a fresh socket and source
/// port per attempt) until a reply echoes it in full; returns the reply line and the
/// number of attempts.
///
/// Why attempts: with `ipip` and a 1500-byte MTU everywhere, the client's 1500-byte
/// fragments would exceed the MTU once encapsulated. The balancer answers them with ICMP
/// "fragmentation needed" (MTU 1480); the client's kernel records the path MTU (and
/// reports EMSGSIZE on the connected socket, so the first attempt fails at once) and
/// fragments smaller from then on, so a later attempt goes through.
fn send_fragmented_until_echoed(s: &Scenario, payload: &[u8]) -> (String, usize) {
    const ATTEMPTS: usize = 5;
    let target = SocketAddr::new(vip(), UDP_PORT);
    let mut errors = Vec::new();
    for attempt in 1..=ATTEMPTS {
        match client::udp_exchange(&s.lab.client.ns, target, None, payload, T) {
            Ok(reply) => {
                let newline = reply
                    .iter()
                    .position(|&b| b == b'\n')
                    .expect("the reply starts with a line");
                let (line, echoed) = reply.split_at(newline + 1);
                assert_eq!(
                    echoed.len(),
                    payload.len(),
                    "the backend received the whole datagram"
                );
                assert!(
                    echoed == payload,
                    "the backend received the datagram's bytes unchanged"
                );
                let line = String::from_utf8_lossy(line).trim_end().to_owned();
                return (line, attempt);
            }
            Err(e) => errors.push(format!("attempt {attempt}: {e:#}")),
        }
    }
    panic!(
        "a {}-byte datagram was never echoed: {errors:#?}",
        payload.len()
    );
}

fn fragmented_datagrams_arrive_whole(mode: Mode) {
    let s = Scenario::start(mode, 3).expect("scenario");
    let mut capture = Capture::open(&s.lab.client.ns, "eth0").expect("capture");
    let before = s.status().expect("status");

    for (size, seed) in [(4000, 4), (8000, 8)] {
        let payload = Pattern::new(seed).take(size);
        let (line, attempts) = send_fragmented_until_echoed(&s, &payload);
        let reply = client::parse_reply(&line).expect("reply");
        assert_eq!(
            reply.peer.ip(),
            IpAddr::V4(s.lab.client.ipv4),
            "{size} bytes: {line}"
        );
        println!(
            "{mode:?}: {size}-byte datagram echoed by {} after {attempts} attempt(s)",
            reply.backend
        );
        if mode == Mode::L2 {
            assert_eq!(
                attempts, 1,
                "l2 adds no header: {size} bytes go through at once"
            );
        }
    }

    let after = s.status().expect("status");
    assert_eq!(
        count(&after.drops, "fragment_unknown"),
        count(&before.drops, "fragment_unknown"),
        "every later fragment found its datagram's service: {:?}",
        after.drops
    );
    if mode == Mode::Ipip {
        assert!(
            count(&after.actions, "too_big") > count(&before.actions, "too_big"),
            "the balancer answered oversized fragments: {:?}",
            after.actions
        );
        capture.poll(Duration::ZERO).expect("poll");
        let announced: BTreeSet<(u8, u8, u16)> = capture
            .frames()
            .iter()
            .filter(|f| {
                f.info()
                    .is_some_and(|i| i.src_ip == vip() && i.protocol == IPPROTO_ICMP && !i.outgoing)
            })
            .filter_map(icmp_unreachable)
            .collect();
        assert_eq!(
            announced,
            BTreeSet::from([(3, 4, 1480)]),
            "the VIP answered with fragmentation needed, MTU 1480"
        );
    }
}

#[test]
fn ipip_fragmented_udp_datagrams_arrive_whole_once_the_client_learns_the_mtu() {
    fragmented_datagrams_arrive_whole(Mode::Ipip);
}

#[test]
fn l2_fragmented_udp_datagrams_arrive_whole_at_one_backend() {
    fragmented_datagrams_arrive_whole(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Path MTU

#[test]
fn ipip_10mb_upload_and_download_complete_through_path_mtu_discovery() {
    const N: u64 = 10 * 1024 * 1024;
    let s = Scenario::start_spec(ScenarioSpec::new(Mode::Ipip, 2).with_bulk()).expect("scenario");
    let target = SocketAddr::new(vip(), BULK_PORT);
    let before = count(&s.status().expect("status").actions, "too_big");

    // Upload: full-size segments do not fit once encapsulated; the balancer answers with
    // "fragmentation needed" and the client's TCP lowers its MSS.
    let up = client::upload(&s.lab.client.ns, target, N, 101, Duration::from_secs(60))
        .expect("10 MB upload completes");
    assert_eq!(up.bytes, N, "the backend received every byte");
    assert_eq!(
        up.digest,
        pattern_digest(101, N),
        "the backend received the bytes sent"
    );

    // Download: the backend sends straight to the client (no encapsulation on the way).
    let down = client::download(&s.lab.client.ns, target, N, 202, Duration::from_secs(60))
        .expect("10 MB download completes");
    assert_eq!(down.bytes, N, "the client received every byte");
    assert_eq!(
        down.digest,
        pattern_digest(202, N),
        "the client received the bytes sent"
    );

    let after = count(&s.status().expect("status").actions, "too_big");
    assert!(
        after > before,
        "the balancer answered oversized segments with fragmentation needed ({before} → {after})"
    );
    let route = s
        .lab
        .client
        .ns
        .ip(["route", "get", &VIP.to_string()])
        .expect("ip route get");
    assert!(
        route.contains("mtu 1480"),
        "the client learned the path MTU 1480: {route}"
    );
}

// ---------------------------------------------------------------------------------------
// ICMP

#[test]
fn ping_to_the_vip_is_answered_by_the_balancer() {
    let s = Scenario::start(Mode::Ipip, 2).expect("scenario");
    let mut capture = Capture::open(&s.lab.client.ns, "eth0").expect("capture");
    let before = count(&s.status().expect("status").actions, "echo_reply");
    for seq in 1..=3u16 {
        let payload = Pattern::new(u64::from(seq)).take(56);
        let reply = client::ping(&s.lab.client.ns, VIP, seq, &payload, T)
            .unwrap_or_else(|e| panic!("echo request {seq} answered: {e:#}"));
        assert_eq!(reply.from, VIP);
        assert_eq!(reply.payload, payload, "echo {seq} returns the payload");
    }
    let after = count(&s.status().expect("status").actions, "echo_reply");
    assert!(
        after >= before + 3,
        "the balancer counted its echo replies ({before} → {after})"
    );
    capture.poll(Duration::ZERO).expect("poll");
    let replies = capture.find_ip(vip(), IpAddr::V4(s.lab.client.ipv4), IPPROTO_ICMP);
    assert!(!replies.is_empty(), "echo replies captured at the client");
    for r in &replies {
        assert_eq!(
            r.src_mac, s.lab.balancers[0].mac,
            "the echo reply comes from the balancer itself"
        );
    }
}

#[test]
fn icmp_errors_from_a_router_reach_the_backend_owning_the_connection() {
    const N: u64 = 2 * 1024 * 1024;
    const LINK_MTU: u32 = 1400;
    // The far client sits behind a router whose link toward it has MTU 1400, while the
    // client advertises a 1460-byte MSS: the backends' full-size replies only get through
    // once the router's "fragmentation needed" (sent to the VIP, their source) reaches
    // the backend that owns the connection, through the balancer.
    let s = Scenario::start_spec(
        ScenarioSpec::new(Mode::Ipip, 3)
            .with_bulk()
            .with_far_site(LINK_MTU),
    )
    .expect("scenario");
    let far = s.lab.far.as_ref().expect("far site");
    let mut captures: Vec<Capture> = s
        .lab
        .backends
        .iter()
        .map(|b| Capture::open(&b.ns, "eth0").expect("capture"))
        .collect();
    let before = s.status().expect("status");

    let down = client::download(
        &far.client_ns,
        SocketAddr::new(vip(), BULK_PORT),
        N,
        303,
        Duration::from_secs(60),
    )
    .expect("2 MB download to the far client completes");
    assert_eq!(down.bytes, N, "the far client received every byte");
    assert_eq!(
        down.digest,
        pattern_digest(303, N),
        "the far client received the bytes sent"
    );
    assert_eq!(
        down.reply.peer.ip(),
        IpAddr::V4(FAR_CLIENT_IPV4),
        "the backend saw the far client's address"
    );

    let owner = s
        .lab
        .backends
        .iter()
        .position(|b| b.name == down.reply.backend)
        .expect("the owner is a backend");
    let balancer_mac = s.lab.balancers[0].mac;
    for (i, capture) in captures.iter_mut().enumerate() {
        capture.poll(Duration::ZERO).expect("poll");
        // XDP decapsulates before the capture point: the router's ICMP shows as it was
        // sent, in a frame from the balancer.
        let errors: Vec<(u8, u8, u16)> = capture
            .frames()
            .iter()
            .filter(|f| {
                f.info().is_some_and(|info| {
                    info.src_ip == IpAddr::V4(ROUTER_IPV4)
                        && info.dst_ip == vip()
                        && info.protocol == IPPROTO_ICMP
                        && info.src_mac == balancer_mac
                })
            })
            .filter_map(icmp_unreachable)
            .collect();
        if i == owner {
            assert!(
                errors.contains(&(3, 4, LINK_MTU as u16)),
                "backend-{i} (the owner) got the router's fragmentation needed: {errors:?}"
            );
        } else {
            assert!(
                errors.is_empty(),
                "backend-{i} does not own the connection and got no ICMP: {errors:?}"
            );
        }
    }
    let route = s.lab.backends[owner]
        .ns
        .ip(["route", "get", &FAR_CLIENT_IPV4.to_string()])
        .expect("ip route get");
    assert!(
        route.contains(&format!("mtu {LINK_MTU}")),
        "the owning backend learned the path MTU: {route}"
    );
    let after = s.status().expect("status");
    assert!(
        count(&after.actions, "encap") > count(&before.actions, "encap"),
        "the balancer forwarded traffic: {:?}",
        after.actions
    );
    assert_eq!(
        count(&after.drops, "icmp_unmatched"),
        count(&before.drops, "icmp_unmatched"),
        "the router's errors matched the connection: {:?}",
        after.drops
    );
}
