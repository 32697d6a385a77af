//! End-to-end over IPv6: an IPv6 VIP (fd77:100::10) served in both forwarding modes
//! (`ipip` is IPv6-in-IPv6 from the balancer's fd77::2, `l2` rewrites MACs), with real
//! sockets in network namespaces (see `l3lb_tests::scenario`, [`ScenarioSpec::ipv6`]).
//! The IPv6 counterparts of `dsr.rs` and `wire.rs`: client address preserved, replies
//! bypassing the balancer, Maglev placement, removal by SIGHUP, path-MTU discovery through
//! ICMPv6 "packet too big", fragment headers, source ranges, client-IP affinity, echo to
//! the VIP, and a router's "packet too big" reaching the backend owning the connection.
//! Needs root.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use l3lb::config::Affinity;
use l3lb_tests::{
    Capture, Frame,
    bulk::{Pattern, pattern_digest},
    capture::{IPPROTO_ICMPV6, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP},
    client,
    lab::{FAR_CLIENT_IPV6, ROUTER_IPV6},
    scenario::{
        BULK_PORT, Mode, Scenario, ScenarioSpec, TABLE_SIZE, TCP_PORT, UDP_PORT, VIP6,
        backend_name, restart_agent,
    },
};
use lb_common::{FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, flow_hash, maglev_slot};

const T: Duration = Duration::from_secs(2);

/// IPv6 next header of a fragment header.
const NEXTHDR_FRAGMENT: u8 = 44;

fn vip() -> IpAddr {
    IpAddr::V6(VIP6)
}

/// The plain IPv6 scenario of `mode` with `backends` backends.
fn spec(mode: Mode, backends: usize) -> ScenarioSpec {
    ScenarioSpec::new(mode, backends).ipv6()
}

fn client_ip(s: &Scenario) -> IpAddr {
    IpAddr::V6(s.lab.client.ipv6)
}

/// A counter of `l3lb status --json`, 0 when absent.
fn count(map: &BTreeMap<String, u64>, name: &str) -> u64 {
    map.get(name).copied().unwrap_or(0)
}

/// Which backend the balancer must pick for a new flow from `client`:`sport` to the VIP's
/// `dport`/`proto`, computed independently from the agent's Maglev and the shared flow
/// hash; under client-IP affinity the ports are left out of the hash.
fn predicted_backend(
    s: &Scenario,
    client: Ipv6Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    affinity: bool,
) -> String {
    let configured: Vec<(usize, IpAddr, u32)> = s
        .weights
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, IpAddr::V6(s.lab.backends[i].ipv6), w)))
        .collect();
    let input: Vec<(IpAddr, u32)> = configured.iter().map(|(_, a, w)| (*a, *w)).collect();
    let table = l3lb::maglev::build(&input, TABLE_SIZE).expect("maglev");
    let mut key = FlowKey {
        src: client.octets(),
        dst: VIP6.octets(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: FAMILY_V6,
        ..Default::default()
    };
    if affinity {
        key.sport = 0;
        key.dport = 0;
    }
    let pos = table[maglev_slot(flow_hash(&key), TABLE_SIZE) as usize] as usize;
    backend_name(configured[pos].0)
}

fn shares_within(counts: &HashMap<String, usize>, expected: &[(String, f64)], total: usize) {
    for (name, share) in expected {
        let want = share * total as f64;
        let got = *counts.get(name).unwrap_or(&0) as f64;
        assert!(
            (got - want).abs() <= 0.15 * want,
            "{name}: {got} connections, expected {want:.0} ± 15 % (all: {counts:?})"
        );
    }
}

/// Type, code, MTU and quoted bytes of an ICMPv6 "packet too big" (type 2) in a frame;
/// `None` for anything else. The quote is cut where the capture's snap length ends.
fn packet_too_big(frame: &Frame) -> Option<(u8, u8, u32, Vec<u8>)> {
    let info = frame.info()?;
    if !info.src_ip.is_ipv6() || info.protocol != IPPROTO_ICMPV6 {
        return None;
    }
    let packet = frame.ip_packet()?;
    let h = packet.get(40..48)?;
    let mtu = u32::from_be_bytes(h[4..8].try_into().ok()?);
    (h[0] == 2).then(|| (h[0], h[1], mtu, packet[48..].to_vec()))
}

/// The length of an IPv6 packet's payload as its header states it.
fn ipv6_payload_len(frame: &Frame) -> Option<usize> {
    let p = frame.ip_packet()?;
    Some(usize::from(u16::from_be_bytes(
        p.get(4..6)?.try_into().ok()?,
    )))
}

// ---------------------------------------------------------------------------------------
// Client address, direct server return

fn answered_with_client_address_and_bypassing_replies(mode: Mode) {
    let s = Scenario::start_spec(spec(mode, 3)).expect("scenario");
    let client = client_ip(&s);
    let ns = &s.lab.client.ns;
    let balancer = &s.lab.balancers[0];
    let backend_macs: Vec<_> = s.lab.backends.iter().map(|b| b.mac).collect();
    let mut client_cap = Capture::open(ns, "eth0").expect("capture");

    // TCP and UDP both answered; the backend saw the client's own address and port.
    let line = client::tcp_request(ns, vip(), TCP_PORT, Some(41000), T).expect("TCP to the VIP");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(
        reply.peer,
        SocketAddr::new(client, 41000),
        "TCP peer seen by {}",
        reply.backend
    );
    let line = client::udp_request(ns, vip(), UDP_PORT, Some(41001), T).expect("UDP to the VIP");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(
        reply.peer,
        SocketAddr::new(client, 41001),
        "UDP peer seen by {}",
        reply.backend
    );

    // Many connections: every server saw only the client, all three served.
    let bulk = client::tcp_bulk(ns, vip(), TCP_PORT, 42000..42300, T).expect("bulk");
    assert_eq!(
        bulk.failures, 0,
        "all connections answered: {:?}",
        bulk.errors
    );
    for server in &s.tcp {
        for peer in server.peers() {
            assert_eq!(
                peer.ip(),
                client,
                "a backend saw a peer other than the client"
            );
        }
    }
    assert_eq!(
        bulk.counts.len(),
        3,
        "all three backends served: {:?}",
        bulk.counts
    );
    client_cap.poll(Duration::ZERO).expect("poll");
    let tcp_replies = client_cap.find_ip(vip(), client, IPPROTO_TCP);
    assert!(
        tcp_replies.len() >= 300,
        "captured {} TCP segments from the VIP",
        tcp_replies.len()
    );
    let tcp_sources: BTreeSet<String> = tcp_replies.iter().map(|r| r.src_mac.to_string()).collect();
    assert!(
        tcp_replies
            .iter()
            .all(|r| backend_macs.contains(&r.src_mac)),
        "TCP replies come from the backends' MACs only: {tcp_sources:?}"
    );
    assert_eq!(tcp_sources.len(), 3, "from all three: {tcp_sources:?}");

    // Replies go from the backend straight to the client, and what the balancer sends a
    // backend is what the mode says: seen on the bridge ports toward the backends.
    let before = s.service_counters(UDP_PORT).expect("counters");
    client_cap.clear();
    let mut port_caps: Vec<Capture> = s
        .lab
        .backends
        .iter()
        .map(|b| Capture::open(&s.lab.fabric, &b.fabric_port).expect("capture"))
        .collect();
    const N: u64 = 50;
    for i in 0..N {
        client::udp_request(ns, vip(), UDP_PORT, Some(43000 + i as u16), T).expect("UDP");
    }
    client_cap.poll(Duration::from_millis(200)).expect("poll");
    let replies = client_cap.find_ip(vip(), client, IPPROTO_UDP);
    assert!(
        replies.len() as u64 >= N,
        "captured {} replies",
        replies.len()
    );
    for r in &replies {
        assert!(
            backend_macs.contains(&r.src_mac),
            "reply from {} is not from a backend",
            r.src_mac
        );
        assert_ne!(r.src_mac, balancer.mac, "a reply came through the balancer");
    }
    let requests = client_cap.find_ip(client, vip(), IPPROTO_UDP);
    assert_eq!(requests.len() as u64, N, "{N} requests sent");
    assert!(
        requests.iter().all(|r| r.dst_mac == balancer.mac),
        "requests go to the balancer"
    );

    let mut delivered = 0;
    for (backend, cap) in s.lab.backends.iter().zip(&mut port_caps) {
        cap.poll(Duration::ZERO).expect("poll");
        for frame in cap.frames() {
            let Some(info) = frame.info() else { continue };
            if info.dst_mac != backend.mac || info.src_mac != balancer.mac {
                continue;
            }
            match mode {
                Mode::Ipip => {
                    if frame.inner_ip() != Some((client, vip(), IPPROTO_UDP)) {
                        continue;
                    }
                    assert_eq!(
                        (info.src_ip, info.dst_ip, info.protocol),
                        (
                            IpAddr::V6(balancer.ipv6),
                            IpAddr::V6(backend.ipv6),
                            IPPROTO_IPV6
                        ),
                        "IPv6-in-IPv6 from the balancer's address to {}",
                        backend.name
                    );
                }
                Mode::L2 => {
                    if (info.src_ip, info.dst_ip, info.protocol) != (client, vip(), IPPROTO_UDP) {
                        continue;
                    }
                }
            }
            delivered += 1;
        }
    }
    assert_eq!(
        delivered, N,
        "every request reached a backend from the balancer's MAC, as {mode:?} forwards"
    );
    let after = s.service_counters(UDP_PORT).expect("counters");
    assert_eq!(
        after.packets - before.packets,
        N,
        "the balancer saw exactly the {N} requests, no replies"
    );
}

#[test]
fn ipv6_ipip_clients_are_answered_backends_see_client_address_replies_bypass_balancer() {
    answered_with_client_address_and_bypassing_replies(Mode::Ipip);
}

#[test]
fn ipv6_l2_clients_are_answered_backends_see_client_address_replies_bypass_balancer() {
    answered_with_client_address_and_bypassing_replies(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Maglev placement, removal

/// The IPv6 path is a program of its own that the entry point reaches through a program
/// array (`L3LB_PATHS`), which the kernel empties once no file or pin refers to it: pinned
/// with the maps, it keeps IPv6 VIPs served while no agent runs, and a restart puts the
/// new agent's in place with the new entry point.
#[test]
fn ipv6_keeps_flowing_while_no_agent_runs_and_across_a_restart() {
    let mut s = Scenario::start_spec(spec(Mode::Ipip, 2)).expect("scenario");
    let mut conn = client::tcp_connect_persistent(&s.lab.client.ns, vip(), TCP_PORT, None, T)
        .expect("TCP connection through the IPv6 VIP");
    conn.echo(b"before\n", T)
        .expect("echo with the agent running");
    let status = s.balancer.stop().expect("stop the agent");
    assert!(status.success(), "agent exit: {status:?}");
    conn.echo(b"no agent\n", T)
        .expect("the attached program kept forwarding IPv6 after its agent exited");
    let mut fresh = client::tcp_connect_persistent(&s.lab.client.ns, vip(), TCP_PORT, None, T)
        .expect("a new IPv6 connection while no agent runs");
    fresh.echo(b"new\n", T).expect("echo on the new connection");
    let config = s.config_path().to_path_buf();
    let (lab, balancer) = (&s.lab, &mut s.balancer);
    restart_agent(
        lab,
        &lab.balancers[0].ns,
        balancer,
        &config,
        "balancer-0-restart.log",
    )
    .expect("start the next agent");
    conn.echo(b"after\n", T).expect("echo after the restart");
    fresh
        .echo(b"after\n", T)
        .expect("echo on the second connection after the restart");
}

/// Restarts the balancer's agent with its config cut before `services:`, after `before`
/// (which may change the node); returns the whole config, for a reload.
fn restart_without_services(s: &mut Scenario, before: impl FnOnce(&Scenario)) -> String {
    let full = std::fs::read_to_string(s.config_path()).expect("config");
    let bare = full[..full.find("services:\n").expect("services")].to_string();
    let config = s.config_path().to_path_buf();
    std::fs::write(&config, &bare).expect("bare config");
    before(s);
    let (lab, balancer) = (&s.lab, &mut s.balancer);
    restart_agent(
        lab,
        &lab.balancers[0].ns,
        balancer,
        &config,
        "balancer-0-without-services.log",
    )
    .expect("an agent without services");
    full
}

/// A reload that brings the first services and the first IPv6 VIP turns forwarding on
/// (`bpf_fib_lookup` needs it), as a start with them does.
#[test]
fn a_reload_that_adds_the_first_ipv6_service_turns_forwarding_on() {
    let mut s = Scenario::start_spec(spec(Mode::Ipip, 2)).expect("scenario");
    // An agent started without services...
    let full = restart_without_services(&mut s, |_| {});
    // ...on a node where nothing turned forwarding on.
    let ns = &s.lab.balancers[0].ns;
    let sysctls = [
        "net/ipv4/conf/eth0/forwarding",
        "net/ipv6/conf/eth0/forwarding",
    ];
    ns.sysctl(&[
        ("net.ipv4.conf.eth0.forwarding", "0"),
        ("net.ipv6.conf.eth0.forwarding", "0"),
    ])
    .expect("forwarding off");
    let read = |ns: &l3lb_tests::Netns| -> Vec<String> {
        ns.enter(|| {
            sysctls
                .iter()
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/sys/{p}"))
                        .expect("sysctl")
                        .trim()
                        .to_string()
                })
                .collect()
        })
        .expect("in the balancer's namespace")
    };
    assert_eq!(read(ns), ["0", "0"]);
    s.write_raw_config_and_reload(&full).expect("SIGHUP");
    s.balancer
        .wait_for_log_count("applied config", 2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    assert_eq!(
        read(&s.lab.balancers[0].ns),
        ["1", "1"],
        "{}",
        s.balancer.log()
    );
    let mut conn = client::tcp_connect_persistent(&s.lab.client.ns, vip(), TCP_PORT, None, T)
        .expect("TCP connection through the IPv6 VIP");
    conn.echo(b"served\n", T).expect("echo");
}

/// The outer source of IPv6-in-IPv6 is fixed when the program loads: an agent started
/// where the interface had no global IPv6 address refuses a reload that adds IPv6 `ipip`
/// services (their packets would leave with source `::`), and says why.
#[test]
fn a_reload_adding_ipv6_ipip_services_without_an_ipv6_source_is_rejected() {
    let mut s = Scenario::start_spec(spec(Mode::Ipip, 2)).expect("scenario");
    let full = restart_without_services(&mut s, |s| {
        s.lab.balancers[0]
            .ns
            .run([
                "ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global",
            ])
            .expect("no global IPv6 address");
    });
    s.write_raw_config_and_reload(&full).expect("SIGHUP");
    s.balancer
        .wait_for_log("config reload rejected", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    let log = s.balancer.log();
    assert!(
        log.contains("had no global IPv6 address when the agent started"),
        "{log}"
    );
    assert!(
        s.status().expect("status").services.is_empty(),
        "nothing applied"
    );
}

fn connections_follow_maglev(mode: Mode) {
    let s = Scenario::start_spec(spec(mode, 3)).expect("scenario");
    let client = s.lab.client.ipv6;
    let names: Vec<String> = (0..3).map(backend_name).collect();

    let bulk = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 20000..23000, T).expect("bulk");
    assert_eq!(bulk.failures, 0, "{:?}", bulk.errors);
    assert_eq!(bulk.ok, 3000);
    shares_within(
        &bulk.counts,
        &names
            .iter()
            .map(|n| (n.clone(), 1.0 / 3.0))
            .collect::<Vec<_>>(),
        bulk.ok,
    );
    assert!(
        bulk.peers.iter().all(|p| p.ip() == IpAddr::V6(client)),
        "the backends saw the client"
    );
    for (port, got) in &bulk.by_src_port {
        assert_eq!(
            *got,
            predicted_backend(&s, client, *port, TCP_PORT, PROTO_TCP, false),
            "flow from port {port}"
        );
    }
}

#[test]
fn ipv6_ipip_connections_spread_evenly_where_maglev_puts_them() {
    connections_follow_maglev(Mode::Ipip);
}

#[test]
fn ipv6_l2_connections_spread_evenly_where_maglev_puts_them() {
    connections_follow_maglev(Mode::L2);
}

fn removing_a_backend(mode: Mode) {
    let mut s = Scenario::start_spec(spec(mode, 3)).expect("scenario");
    let client = s.lab.client.ipv6;
    let removed = backend_name(2);

    // Long-lived connections, some on every backend.
    let mut conns = Vec::new();
    for port in 50000..50060u16 {
        let c = client::tcp_connect_persistent(&s.lab.client.ns, vip(), TCP_PORT, Some(port), T)
            .expect("connect");
        let backend = c.reply().expect("reply").backend;
        conns.push((port, backend, c));
    }
    let on_removed = conns.iter().filter(|c| c.1 == removed).count();
    assert!(
        on_removed > 0 && on_removed < conns.len(),
        "connections on the backend to remove and on others: {on_removed} of {}",
        conns.len()
    );

    s.set_weights(&[Some(1), Some(1), None])
        .expect("remove backend-2");

    for (port, backend, c) in conns.iter_mut() {
        if *backend != removed {
            assert!(
                c.is_alive(T),
                "connection from port {port} to {backend} survived the removal"
            );
        }
    }
    let removed_peers_before = s.tcp[2].peers().len();
    let after = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 20000..21500, T).expect("bulk");
    assert_eq!(after.failures, 0, "{:?}", after.errors);
    assert!(
        !after.counts.contains_key(&removed),
        "no new connection reaches the removed backend: {:?}",
        after.counts
    );
    assert_eq!(
        s.tcp[2].peers().len(),
        removed_peers_before,
        "the removed backend accepted nothing new"
    );
    for (port, got) in &after.by_src_port {
        assert_eq!(
            *got,
            predicted_backend(&s, client, *port, TCP_PORT, PROTO_TCP, false),
            "flow from port {port} after the removal"
        );
    }
    // The survivors' old connections are still alive after the new traffic, too.
    for (port, backend, c) in conns.iter_mut() {
        if *backend != removed {
            assert!(c.is_alive(T), "connection from port {port} to {backend}");
        }
    }
}

#[test]
fn ipv6_ipip_removing_a_backend_keeps_established_connections_and_sends_it_nothing() {
    removing_a_backend(Mode::Ipip);
}

#[test]
fn ipv6_l2_removing_a_backend_keeps_established_connections_and_sends_it_nothing() {
    removing_a_backend(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Path MTU

#[test]
fn ipv6_ipip_10mb_upload_and_download_complete_through_path_mtu_discovery() {
    const N: u64 = 10 * 1024 * 1024;
    let s = Scenario::start_spec(spec(Mode::Ipip, 2).with_bulk()).expect("scenario");
    let target = SocketAddr::new(vip(), BULK_PORT);
    let before = count(&s.status().expect("status").actions, "too_big");

    // Upload: full-size segments (1500 bytes) do not fit once a 40-byte IPv6 header is
    // added; the balancer answers with "packet too big" and the client lowers its MSS.
    let up = client::upload(&s.lab.client.ns, target, N, 101, Duration::from_secs(60))
        .expect("10 MB upload completes");
    assert_eq!(up.bytes, N, "the backend received every byte");
    assert_eq!(
        up.digest,
        pattern_digest(101, N),
        "the backend received the bytes sent"
    );
    assert_eq!(up.reply.peer.ip(), client_ip(&s));

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
        "the balancer answered oversized segments with packet too big ({before} → {after})"
    );
    let route = s
        .lab
        .client
        .ns
        .ip(["-6", "route", "get", &VIP6.to_string()])
        .expect("ip route get");
    assert!(
        route.contains("mtu 1460"),
        "the client learned the path MTU 1460: {route}"
    );
}

// ---------------------------------------------------------------------------------------
// Fragments

/// Sends `payload` as one UDP datagram to the VIP's UDP service (a fresh socket and source
/// port per attempt) until a reply echoes it in full; returns the reply line and the
/// number of attempts.
///
/// Why attempts: with `ipip` and a 1500-byte MTU everywhere, the client's 1500-byte
/// fragments would exceed the MTU once encapsulated. The balancer answers with ICMPv6
/// "packet too big" (MTU 1460); the client's kernel records the path MTU (and reports
/// EMSGSIZE on the connected socket, so that attempt fails at once) and fragments smaller
/// from then on, so a later attempt goes through.
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
    let s = Scenario::start_spec(spec(mode, 3)).expect("scenario");
    let mut capture = Capture::open(&s.lab.client.ns, "eth0").expect("capture");
    let before = s.status().expect("status");

    for (size, seed) in [(4000, 4), (8000, 8)] {
        let payload = Pattern::new(seed).take(size);
        let (line, attempts) = send_fragmented_until_echoed(&s, &payload);
        let reply = client::parse_reply(&line).expect("reply");
        assert_eq!(reply.peer.ip(), client_ip(&s), "{size} bytes: {line}");
        // Fragments are hashed on (source, destination, protocol) alone.
        assert_eq!(
            reply.backend,
            predicted_backend(&s, s.lab.client.ipv6, 0, 0, PROTO_UDP, false),
            "{size} bytes: the backend of the client's fragmented datagrams"
        );
        println!(
            "IPv6 {mode:?}: {size}-byte datagram echoed by {} after {attempts} attempt(s)",
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
    capture.poll(Duration::ZERO).expect("poll");
    // The client really sent fragments (next header 44 after the fixed header).
    let fragments = capture
        .frames()
        .iter()
        .filter(|f| {
            f.info().is_some_and(|i| {
                i.outgoing
                    && i.dst_ip == vip()
                    && i.src_ip == client_ip(&s)
                    && i.protocol == NEXTHDR_FRAGMENT
            })
        })
        .count();
    assert!(fragments >= 9, "the client sent {fragments} fragments");
    if mode == Mode::Ipip {
        assert!(
            count(&after.actions, "too_big") > count(&before.actions, "too_big"),
            "the balancer answered oversized fragments: {:?}",
            after.actions
        );
        let sent: Vec<&[u8]> = capture
            .frames()
            .iter()
            .filter(|f| f.outgoing)
            .filter_map(Frame::ip_packet)
            .collect();
        let mut announced = BTreeSet::new();
        for frame in capture.frames() {
            let Some(info) = frame.info() else { continue };
            if info.outgoing || info.src_ip != vip() || info.dst_ip != client_ip(&s) {
                continue;
            }
            let Some((kind, code, mtu, quote)) = packet_too_big(frame) else {
                continue;
            };
            announced.insert((kind, code, mtu));
            assert_eq!(
                info.src_mac, s.lab.balancers[0].mac,
                "packet too big comes from the balancer"
            );
            assert_eq!(
                ipv6_payload_len(frame),
                Some(8 + 128),
                "the ICMPv6 message quotes 128 bytes"
            );
            assert_eq!(quote.len(), 128, "the whole quote was captured");
            assert!(
                sent.iter().any(|p| p.get(..128) == Some(&quote[..])),
                "the quote is the first 128 bytes of a packet the client sent: {quote:02x?}"
            );
        }
        assert_eq!(
            announced,
            BTreeSet::from([(2, 0, 1460)]),
            "the VIP answered with packet too big, MTU 1460"
        );
    }
}

#[test]
fn ipv6_ipip_fragmented_udp_datagrams_arrive_whole_once_the_client_learns_the_mtu() {
    fragmented_datagrams_arrive_whole(Mode::Ipip);
}

#[test]
fn ipv6_l2_fragmented_udp_datagrams_arrive_whole_at_one_backend() {
    fragmented_datagrams_arrive_whole(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Source ranges

fn only_listed_sources_are_served(mode: Mode) {
    let allowed: Ipv6Addr = "fd77::c9".parse().expect("address");
    let s = Scenario::start_spec(spec(mode, 2).source_ranges(&[&format!("{allowed}/128")]))
        .expect("scenario");
    let ns = &s.lab.client.ns;
    s.lab
        .client_add_ipv6(allowed)
        .expect("second client address");
    let from_allowed = SocketAddr::new(IpAddr::V6(allowed), 0);
    let refused = client_ip(&s);
    let from_refused = SocketAddr::new(refused, 0);
    let drops_before = count(&s.status().expect("status").drops, "source_not_allowed");

    // The listed address is answered over TCP and UDP, and the backend sees it.
    let line = client::tcp_request_from(ns, from_allowed, vip(), TCP_PORT, T)
        .expect("TCP from the listed address is answered");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(reply.peer.ip(), IpAddr::V6(allowed), "{line}");
    let line = client::udp_request_from(ns, from_allowed, vip(), UDP_PORT, T)
        .expect("UDP from the listed address is answered");
    assert_eq!(
        client::parse_reply(&line).expect("reply").peer.ip(),
        IpAddr::V6(allowed),
        "{line}"
    );

    // The client's main address is not listed: its connection attempt times out (dropped,
    // not refused) and its datagram gets no answer.
    let err = client::tcp_request_from(ns, from_refused, vip(), TCP_PORT, T)
        .expect_err("TCP from an unlisted address must not be answered");
    assert!(
        format!("{err:#}").contains("timed out"),
        "the connection attempt times out: {err:#}"
    );
    client::udp_request_from(ns, from_refused, vip(), UDP_PORT, T)
        .expect_err("UDP from an unlisted address must not be answered");
    // An unbound socket picks the main address too (the second one is deprecated).
    client::udp_request(ns, vip(), UDP_PORT, None, T)
        .expect_err("UDP from the default source must not be answered");

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
        drops_after >= drops_before + 3,
        "the SYN and the datagrams are counted as source_not_allowed: {drops_before} → {drops_after}"
    );
}

#[test]
fn ipv6_ipip_source_ranges_answer_listed_clients_and_drop_others() {
    only_listed_sources_are_served(Mode::Ipip);
}

#[test]
fn ipv6_l2_source_ranges_answer_listed_clients_and_drop_others() {
    only_listed_sources_are_served(Mode::L2);
}

// ---------------------------------------------------------------------------------------
// Affinity

#[test]
fn ipv6_client_ip_affinity_keeps_each_client_on_one_backend_and_spreads_clients() {
    let s =
        Scenario::start_spec(spec(Mode::Ipip, 3).affinity(Affinity::ClientIp)).expect("scenario");
    let ns = &s.lab.client.ns;
    let main = s.lab.client.ipv6;

    // 200 connections from one address, each from its own source port: one backend, the
    // one the hash of the address alone picks.
    let bulk = client::tcp_bulk(ns, vip(), TCP_PORT, 30000..30200, T).expect("bulk");
    assert_eq!(bulk.failures, 0, "{:?}", bulk.errors);
    let expected = predicted_backend(&s, main, 0, 0, PROTO_TCP, true);
    assert_eq!(
        bulk.counts,
        HashMap::from([(expected, 200)]),
        "all of one client's connections on its backend"
    );
    let mut by_client: BTreeMap<Ipv6Addr, String> = BTreeMap::new();
    by_client.insert(main, bulk.counts.keys().next().expect("a backend").clone());

    // Eight more client addresses, 20 connections each: each stays on one backend, the
    // predicted one, and together they use more than one.
    for last in 0xc9..=0xd0u16 {
        let addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, last);
        s.lab.client_add_ipv6(addr).expect("client address");
        let bulk = client::tcp_bulk_from(ns, IpAddr::V6(addr), vip(), TCP_PORT, 31000..31020, T)
            .expect("bulk");
        assert_eq!(bulk.failures, 0, "from {addr}: {:?}", bulk.errors);
        assert!(
            bulk.peers.iter().all(|p| p.ip() == IpAddr::V6(addr)),
            "the backend saw {addr}: {:?}",
            bulk.peers
        );
        let expected = predicted_backend(&s, addr, 0, 0, PROTO_TCP, true);
        assert_eq!(
            bulk.counts,
            HashMap::from([(expected, 20)]),
            "all connections from {addr} on its backend"
        );
        by_client.insert(addr, bulk.counts.keys().next().expect("a backend").clone());
    }
    let used: BTreeSet<&String> = by_client.values().collect();
    assert!(
        used.len() > 1,
        "clients spread over more than one backend: {by_client:?}"
    );
}

// ---------------------------------------------------------------------------------------
// ICMPv6

#[test]
fn ipv6_ping_to_the_vip_is_answered_by_the_balancer() {
    let s = Scenario::start_spec(spec(Mode::Ipip, 2)).expect("scenario");
    let mut capture = Capture::open(&s.lab.client.ns, "eth0").expect("capture");
    let before = count(&s.status().expect("status").actions, "echo_reply");
    for seq in 1..=3u16 {
        let payload = Pattern::new(u64::from(seq)).take(56);
        let reply = client::ping6(&s.lab.client.ns, s.lab.client.ipv6, VIP6, seq, &payload, T)
            .unwrap_or_else(|e| panic!("echo request {seq} answered: {e:#}"));
        assert_eq!(reply.from, VIP6);
        assert_eq!(reply.payload, payload, "echo {seq} returns the payload");
    }
    let after = count(&s.status().expect("status").actions, "echo_reply");
    assert!(
        after >= before + 3,
        "the balancer counted its echo replies ({before} → {after})"
    );
    capture.poll(Duration::ZERO).expect("poll");
    let replies = capture.find_ip(vip(), client_ip(&s), IPPROTO_ICMPV6);
    assert!(!replies.is_empty(), "echo replies captured at the client");
    for r in &replies {
        assert_eq!(
            r.src_mac, s.lab.balancers[0].mac,
            "the echo reply comes from the balancer itself"
        );
    }
    for server in &s.tcp {
        assert!(server.peers().is_empty(), "no backend was involved");
    }

    // A fragmented echo request cannot be answered by XDP: its fragments go to one
    // backend, which reassembles and answers (after the client learned the MTU from the
    // balancer's packet too big, as for UDP).
    capture.clear();
    let payload = Pattern::new(9).take(3000);
    let answered = (10..15u16).find_map(|seq| {
        client::ping6(&s.lab.client.ns, s.lab.client.ipv6, VIP6, seq, &payload, T).ok()
    });
    let reply = answered.expect("a 3000-byte echo request is answered within 5 attempts");
    assert_eq!(reply.payload, payload, "the whole payload comes back");
    capture.poll(Duration::ZERO).expect("poll");
    let backend_macs: Vec<_> = s.lab.backends.iter().map(|b| b.mac).collect();
    let fragments_back: Vec<_> = capture
        .find_ip(vip(), client_ip(&s), NEXTHDR_FRAGMENT)
        .into_iter()
        .filter(|r| !r.outgoing)
        .collect();
    assert!(
        !fragments_back.is_empty()
            && fragments_back
                .iter()
                .all(|r| backend_macs.contains(&r.src_mac)),
        "the fragmented reply comes from a backend: {fragments_back:?}"
    );
}

#[test]
fn ipv6_packet_too_big_from_a_router_reaches_the_backend_owning_the_connection() {
    const N: u64 = 2 * 1024 * 1024;
    const LINK_MTU: u32 = 1400;
    // The far client sits behind a router whose link toward it has MTU 1400, while the
    // client advertises a 1440-byte MSS: the backends' full-size replies only get through
    // once the router's "packet too big" (sent to the VIP, their source) reaches the
    // backend that owns the connection, through the balancer.
    let s = Scenario::start_spec(spec(Mode::Ipip, 3).with_bulk().with_far_site(LINK_MTU))
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
        IpAddr::V6(FAR_CLIENT_IPV6),
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
        // XDP decapsulates before the capture point: the router's ICMPv6 shows as it was
        // sent, in a frame from the balancer.
        let errors: Vec<(u8, u8, u32)> = capture
            .frames()
            .iter()
            .filter(|f| {
                f.info().is_some_and(|info| {
                    info.src_ip == IpAddr::V6(ROUTER_IPV6)
                        && info.dst_ip == vip()
                        && info.src_mac == balancer_mac
                })
            })
            .filter_map(packet_too_big)
            .map(|(kind, code, mtu, _)| (kind, code, mtu))
            .collect();
        if i == owner {
            assert!(
                errors.contains(&(2, 0, LINK_MTU)),
                "backend-{i} (the owner) got the router's packet too big: {errors:?}"
            );
        } else {
            assert!(
                errors.is_empty(),
                "backend-{i} does not own the connection and got no ICMPv6: {errors:?}"
            );
        }
    }
    let route = s.lab.backends[owner]
        .ns
        .ip(["-6", "route", "get", &FAR_CLIENT_IPV6.to_string()])
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
