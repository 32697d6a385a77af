//! End-to-end: a real client, a balancer running `l3lb`, real backends, all in network
//! namespaces on one bridge, for both forwarding modes. Needs root.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use l3lb_tests::{
    Capture, ChildGuard, TcpServer, UdpServer,
    capture::IPPROTO_UDP,
    client, l3lb_bin,
    scenario::{
        Mode, Scenario, ScenarioSpec, TCP_PORT, UDP_PORT, VIP, backend_name, maglev_backend,
        status_of,
    },
};

const T: Duration = Duration::from_secs(2);

fn vip() -> IpAddr {
    IpAddr::V4(VIP)
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

fn answered_with_client_address_and_bypassing_replies(mode: Mode) {
    let s = Scenario::start(mode, 3).expect("scenario");
    let client_ip = s.lab.client.ipv4;

    // TCP and UDP both answered; the backend saw the client's own address and port.
    let line = client::tcp_request(&s.lab.client.ns, vip(), TCP_PORT, Some(41000), T)
        .expect("TCP to the VIP");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(
        reply.peer,
        SocketAddr::new(IpAddr::V4(client_ip), 41000),
        "TCP peer seen by {}",
        reply.backend
    );
    let line = client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(41001), T)
        .expect("UDP to the VIP");
    let reply = client::parse_reply(&line).expect("reply");
    assert_eq!(
        reply.peer,
        SocketAddr::new(IpAddr::V4(client_ip), 41001),
        "UDP peer seen by {}",
        reply.backend
    );

    // Every server that answered saw only the client as its peer.
    let bulk = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 42000..42300, T).expect("bulk");
    assert_eq!(
        bulk.failures, 0,
        "all connections answered: {:?}",
        bulk.errors
    );
    for server in &s.tcp {
        for peer in server.peers() {
            assert_eq!(
                peer.ip(),
                IpAddr::V4(client_ip),
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

    // Replies go from the backend straight to the client: the client receives them from
    // a backend's MAC, and the balancer's counters see only the client→VIP direction.
    let before = s.service_counters(UDP_PORT).expect("counters");
    let mut cap = Capture::open(&s.lab.client.ns, "eth0").expect("capture");
    const N: u64 = 50;
    for i in 0..N {
        client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(43000 + i as u16), T)
            .expect("UDP");
    }
    cap.poll(Duration::from_millis(200)).expect("poll");
    let replies = cap.find_ip(vip(), IpAddr::V4(client_ip), IPPROTO_UDP);
    assert!(
        replies.len() as u64 >= N,
        "captured {} replies",
        replies.len()
    );
    let backend_macs: Vec<_> = s.lab.backends.iter().map(|b| b.mac).collect();
    for r in &replies {
        assert!(
            backend_macs.contains(&r.src_mac),
            "reply from {} is not from a backend",
            r.src_mac
        );
        assert_ne!(
            r.src_mac, s.lab.balancers[0].mac,
            "a reply came through the balancer"
        );
    }
    let requests = cap.find_ip(IpAddr::V4(client_ip), vip(), IPPROTO_UDP);
    assert!(
        requests.iter().all(|r| r.dst_mac == s.lab.balancers[0].mac),
        "requests go to the balancer"
    );
    let after = s.service_counters(UDP_PORT).expect("counters");
    assert_eq!(
        after.packets - before.packets,
        N,
        "the balancer saw exactly the {N} requests, no replies"
    );
}

#[test]
fn ipip_clients_are_answered_backends_see_client_address_replies_bypass_balancer() {
    answered_with_client_address_and_bypassing_replies(Mode::Ipip);
}

#[test]
fn l2_clients_are_answered_backends_see_client_address_replies_bypass_balancer() {
    answered_with_client_address_and_bypassing_replies(Mode::L2);
}

fn connections_follow_maglev_and_weights(mode: Mode) {
    let mut s = Scenario::start(mode, 3).expect("scenario");
    let client_ip = s.lab.client.ipv4;
    let names: Vec<String> = (0..3).map(backend_name).collect();

    let bulk = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 20000..23000, T).expect("bulk");
    assert_eq!(bulk.failures, 0, "{:?}", bulk.errors);
    shares_within(
        &bulk.counts,
        &names
            .iter()
            .map(|n| (n.clone(), 1.0 / 3.0))
            .collect::<Vec<_>>(),
        bulk.ok,
    );
    for (port, got) in &bulk.by_src_port {
        assert_eq!(
            *got,
            maglev_backend(&s, &s.weights, client_ip, *port),
            "flow from port {port}"
        );
    }

    s.set_weights(&[Some(1), Some(2), Some(1)])
        .expect("reweight");
    let bulk = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 30000..33000, T).expect("bulk");
    assert_eq!(bulk.failures, 0, "{:?}", bulk.errors);
    shares_within(
        &bulk.counts,
        &[
            (names[0].clone(), 0.25),
            (names[1].clone(), 0.5),
            (names[2].clone(), 0.25),
        ],
        bulk.ok,
    );
    for (port, got) in &bulk.by_src_port {
        assert_eq!(
            *got,
            maglev_backend(&s, &s.weights, client_ip, *port),
            "flow from port {port} after reweight"
        );
    }
}

#[test]
fn ipip_connections_spread_evenly_and_by_weight() {
    connections_follow_maglev_and_weights(Mode::Ipip);
}

#[test]
fn l2_connections_spread_evenly_and_by_weight() {
    connections_follow_maglev_and_weights(Mode::L2);
}

fn removing_a_backend(mode: Mode) {
    let mut s = Scenario::start(mode, 3).expect("scenario");
    let client_ip = s.lab.client.ipv4;
    let removed = backend_name(2);

    // Long-lived connections, some on every backend.
    let mut conns = Vec::new();
    for port in 50000..50060u16 {
        let c = client::tcp_connect_persistent(&s.lab.client.ns, vip(), TCP_PORT, Some(port), T)
            .expect("connect");
        let backend = c.reply().expect("reply").backend;
        conns.push((port, backend, c));
    }
    assert!(
        conns.iter().any(|c| c.1 == removed),
        "some connection is on the backend to remove"
    );
    let before =
        client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 20000..21500, T).expect("bulk");

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
    let after = client::tcp_bulk(&s.lab.client.ns, vip(), TCP_PORT, 20000..21500, T).expect("bulk");
    assert_eq!(after.failures, 0, "{:?}", after.errors);
    assert!(
        !after.counts.contains_key(&removed),
        "no new connection reaches the removed backend: {:?}",
        after.counts
    );

    // Maglev moves no flow between survivors beyond what the table change requires: every
    // flow lands exactly where the new table says.
    let mut moved_between_survivors = 0;
    for (port, got) in &after.by_src_port {
        assert_eq!(
            *got,
            maglev_backend(&s, &s.weights, client_ip, *port),
            "flow from port {port}"
        );
        if let Some(old) = before.by_src_port.get(port)
            && *old != removed
            && old != got
        {
            moved_between_survivors += 1;
        }
    }
    let share = moved_between_survivors as f64 / after.ok as f64;
    println!(
        "{mode:?}: flows moved between surviving backends: {moved_between_survivors} of {} ({:.2} %)",
        after.ok,
        share * 100.0
    );
    assert!(
        share < 0.05,
        "Maglev moved {:.1} % of flows between survivors",
        share * 100.0
    );
}

#[test]
fn ipip_removing_a_backend_keeps_established_connections_and_moves_the_minimum() {
    removing_a_backend(Mode::Ipip);
}

#[test]
fn l2_removing_a_backend_keeps_established_connections_and_moves_the_minimum() {
    removing_a_backend(Mode::L2);
}

#[test]
fn balancer_node_traffic_keeps_working_and_bad_reload_keeps_state() {
    let mut s = Scenario::start(Mode::Ipip, 2).expect("scenario");
    let node = &s.lab.balancers[0];
    let node_ip = IpAddr::V4(node.ipv4);
    let tcp = TcpServer::start(&node.ns, "balancer-0", SocketAddr::new(node_ip, 8080))
        .expect("tcp server");
    let udp = UdpServer::start(&node.ns, "balancer-0", SocketAddr::new(node_ip, 5353))
        .expect("udp server");
    let line = client::tcp_request(&s.lab.client.ns, node_ip, 8080, None, T)
        .expect("TCP to the balancer itself");
    assert!(line.starts_with("backend=balancer-0"), "{line}");
    let line = client::udp_request(&s.lab.client.ns, node_ip, 5353, None, T)
        .expect("UDP to the balancer itself");
    assert!(line.starts_with("backend=balancer-0"), "{line}");
    assert!(
        s.status().expect("status").actions["pass"] > 0,
        "non-VIP traffic counted as passed"
    );

    // An invalid config on SIGHUP is rejected with its field path, and forwarding goes on.
    let status_before = s.status().expect("status");
    s.write_raw_config_and_reload("interface: eth0\nservices:\n  - name: web\n    vip: 10.77.100.10\n    backends:\n      - address: 10.0.0\n")
        .expect("reload");
    s.balancer
        .wait_for_log(
            "services[0].backends[0].address: invalid IP address \"10.0.0\"",
            Duration::from_secs(10),
        )
        .expect("rejection logged with the field path");
    assert_eq!(
        s.status().expect("status").vips,
        status_before.vips,
        "VIPs unchanged"
    );
    client::tcp_request(&s.lab.client.ns, vip(), TCP_PORT, None, T).expect("VIP still served");
    drop((tcp, udp));
}

#[test]
fn sigterm_leaves_the_data_plane_running_and_down_removes_it() {
    let mut s = Scenario::start(Mode::L2, 1).expect("scenario");
    let xdp_on_eth0 = |s: &Scenario| {
        s.lab.balancers[0]
            .run(["ip", "link", "show", "eth0"])
            .expect("ip link")
            .contains("prog/xdp")
    };
    assert!(xdp_on_eth0(&s), "attached while running");
    let status = s.balancer.stop().expect("stop");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        s.balancer.log()
    );
    assert!(xdp_on_eth0(&s), "still attached after the agent exited");
    client::tcp_request(&s.lab.client.ns, vip(), TCP_PORT, None, T)
        .expect("the VIP is served with no agent running");
    let pins = s.lab.pin_path("balancer-0");
    assert!(pins.join("v1/link-eth0").exists(), "the link is pinned");

    let out = std::process::Command::new(l3lb_tests::l3lb_bin().expect("bin"))
        .args(["down", "--pin-path"])
        .arg(&pins)
        .output()
        .expect("l3lb down");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached 1 link"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!xdp_on_eth0(&s), "detached by l3lb down");
    assert!(!pins.join("v1").exists(), "pins removed");
    assert!(!pins.exists(), "the emptied pin_path removed");
}

#[test]
fn auto_mode_falls_back_to_generic_and_native_mode_says_why_it_failed() {
    let lab = l3lb_tests::Lab::new(l3lb_tests::LabSpec {
        backends: 0,
        balancers: 1,
    })
    .expect("lab");
    let node = &lab.balancers[0];
    let bin = l3lb_tests::l3lb_bin().expect("binary");
    // Loopback has no native XDP support.
    let cfg = |mode: &str| {
        format!(
            "interface: lo\nxdp_mode: {mode}\npin_path: {}\n",
            lab.pin_path("lo").display()
        )
    };
    let auto = lab.write_file("auto.yaml", &cfg("auto")).expect("config");
    let mut agent = lab
        .spawn_in(
            &node.ns,
            &bin,
            ["run", "--config", &auto.to_string_lossy()],
            "auto.log",
        )
        .expect("spawn");
    agent
        .wait_for_log("l3lb ready", Duration::from_secs(20))
        .expect("ready");
    let log = agent.log();
    assert!(log.contains("falling back to generic mode"), "{log}");
    assert!(log.contains("mode=\"generic\""), "{log}");
    agent.stop().expect("stop");
    // The generic attachment outlives the agent; another mode needs `l3lb down` first.
    let down = std::process::Command::new(&bin)
        .args(["down", "--pin-path"])
        .arg(lab.pin_path("lo"))
        .status()
        .expect("l3lb down");
    assert!(down.success());

    let native = lab
        .write_file("native.yaml", &cfg("native"))
        .expect("config");
    let mut agent = lab
        .spawn_in(
            &node.ns,
            &bin,
            ["run", "--config", &native.to_string_lossy()],
            "native.log",
        )
        .expect("spawn");
    let status = agent.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!status.success());
    assert!(
        agent.log().contains("attaching to lo in Driver mode"),
        "{}",
        agent.log()
    );
}

#[test]
fn balancer_resolves_neighbours_again_after_they_are_flushed() {
    let s = Scenario::start(Mode::Ipip, 2).expect("scenario");
    client::tcp_request(&s.lab.client.ns, vip(), TCP_PORT, None, T).expect("served");
    // Forget every neighbour: the data plane drops (and counts) until the agent notices
    // and resolves them again; TCP's SYN retransmission then gets through.
    s.lab.balancers[0]
        .run(["ip", "neigh", "flush", "dev", "eth0"])
        .expect("flush");
    // The data plane reuses a next hop for up to half a second; wait that out so the
    // flush is what the next packets meet.
    std::thread::sleep(Duration::from_millis(700));
    for port in 44000..44010 {
        client::tcp_request(
            &s.lab.client.ns,
            vip(),
            TCP_PORT,
            Some(port),
            Duration::from_secs(8),
        )
        .expect("served again after the flush");
    }
    let status = s.status().expect("status");
    assert!(
        status.drops["no_neighbour"] > 0,
        "the flush was noticed: {:?}",
        status.drops
    );
}

/// Links balancer-0 and backend-0 by a second veth (`side0` at both ends) and routes the
/// backend's address over it from the balancer; the backend answers the client by eth0.
fn add_side_link(s: &Scenario) {
    let bal = &s.lab.balancers[0];
    let backend = s.lab.backend(0).expect("backend");
    bal.ns
        .ip([
            "link",
            "add",
            "side0",
            "type",
            "veth",
            "peer",
            "name",
            "side0",
            "netns",
            backend.ns.name(),
        ])
        .expect("veth");
    bal.ns.ip(["link", "set", "side0", "up"]).expect("up");
    backend.ns.ip(["link", "set", "side0", "up"]).expect("up");
    backend
        .ns
        .sysctl(&[
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.side0.rp_filter", "0"),
        ])
        .expect("rp_filter");
    let side_mac = backend.ns.mac("side0").expect("mac");
    bal.ns
        .ip_batch(&[
            format!("route replace {}/32 dev side0", backend.ipv4),
            format!(
                "neigh replace {} lladdr {side_mac} dev side0 nud permanent",
                backend.ipv4
            ),
        ])
        .expect("route over the side link");
}

/// A decap agent on backend-0's end of the side link, attached in `xdp_mode`.
fn side_decap_agent(s: &Scenario, xdp_mode: &str) -> ChildGuard {
    let backend = s.lab.backend(0).expect("backend");
    let balancer_ip = s.lab.balancers[0].ipv4;
    let cfg = format!(
        "interface: side0\nxdp_mode: {xdp_mode}\npin_path: {}\nmetrics_address: 127.0.0.1:0\ndecap:\n  allow: [{balancer_ip}/32]\n",
        s.lab.pin_path("backend-0-side0").display()
    );
    let path = s
        .lab
        .write_file("backend-0-side0.yaml", &cfg)
        .expect("config");
    let mut agent = s
        .lab
        .spawn_in(
            &backend.ns,
            l3lb_bin().expect("l3lb"),
            ["run", "--config", &path.to_string_lossy()],
            "backend-0-side0.log",
        )
        .expect("spawn");
    agent
        .wait_for_log("l3lb ready", Duration::from_secs(20))
        .expect("side agent ready");
    agent
}

/// `l3lb status --json` of balancer-0, run in its namespace (device names are its own).
fn balancer_status_in_its_namespace(s: &Scenario) -> l3lb::status::Status {
    let pins = s.lab.pin_path("balancer-0");
    let bin = l3lb_bin().expect("l3lb");
    let json = s.lab.balancers[0]
        .ns
        .run([
            bin.as_os_str(),
            "status".as_ref(),
            "--json".as_ref(),
            "--pin-path".as_ref(),
            pins.as_os_str(),
        ])
        .expect("status in the balancer's namespace");
    serde_json::from_str(&json).expect("status json")
}

/// A route to a backend that leaves by another device than the balancer's own: while that
/// device cannot take XDP frames (a veth whose peer runs no XDP), its packets are dropped
/// and counted as `egress_no_xdp` and the agent names the device (they used to be
/// redirected there and lost, counted as encapsulated); an agent that stops unlists it
/// (nobody would keep the list current); once it can (the peer runs XDP), they reach the
/// backend over it.
#[test]
fn a_route_out_of_a_device_without_xdp_transmit_is_a_counted_drop_until_it_takes_frames() {
    let mut s = Scenario::start(Mode::Ipip, 1).expect("scenario");
    add_side_link(&s);
    let short = Duration::from_millis(300);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut port = 45000;
    loop {
        assert!(
            client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(port), short).is_err(),
            "answered over a device that takes no XDP frames"
        );
        port += 1;
        if s.status().expect("status").drops["egress_no_xdp"] >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no egress_no_xdp drops counted; balancer log:\n{}",
            s.balancer.log()
        );
    }
    s.balancer
        .wait_for_log("where XDP cannot transmit", Duration::from_secs(5))
        .expect("the agent names the device");
    assert!(
        s.balancer
            .log()
            .contains("their route leaves by side0, where XDP cannot transmit"),
        "{}",
        s.balancer.log()
    );
    let st = balancer_status_in_its_namespace(&s);
    assert!(
        st.egress_no_xdp.get("side0").is_some_and(|&n| n > 0),
        "status names side0: {:?}",
        st.egress_no_xdp
    );

    // An agent that stops leaves the program forwarding with nothing listed.
    let exit = s.balancer.stop().expect("stop");
    assert!(exit.success(), "{}", s.balancer.log());
    assert_eq!(
        balancer_status_in_its_namespace(&s).egress_no_xdp,
        Default::default(),
        "the list left behind"
    );
    let config = s.config_path().to_path_buf();
    s.balancer = s
        .lab
        .spawn_in(
            &s.lab.balancers[0].ns,
            l3lb_bin().expect("l3lb"),
            ["run", "--config", &config.to_string_lossy()],
            "balancer-0-again.log",
        )
        .expect("spawn");
    s.balancer
        .wait_for_log("l3lb ready", Duration::from_secs(30))
        .expect("ready again");

    // XDP on the backend's end: the balancer's end can send to it, the agent unlists it
    // within a second, and the packets get through.
    let side_agent = side_decap_agent(&s, "native");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(port), short).is_err() {
        port += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "never answered once the device takes XDP frames; balancer log:\n{}",
            s.balancer.log()
        );
    }
    let before = s.status().expect("status").drops["egress_no_xdp"];
    const N: u16 = 20;
    for i in 0..N {
        client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(46000 + i), T)
            .expect("answered over the side link");
    }
    assert_eq!(
        s.status().expect("status").drops["egress_no_xdp"],
        before,
        "no more drops once the device takes frames"
    );
    let side = status_of(&s.lab, "backend-0-side0").expect("side agent status");
    assert!(
        side.actions["decap"] >= u64::from(N),
        "the requests came over the side link: {:?}",
        side.actions
    );
    drop(side_agent);
}

/// In generic mode the kernel sends redirected frames as packets, which a device without
/// XDP transmit takes: nothing is listed, and the backend behind it is served.
#[test]
fn in_generic_mode_a_route_out_of_a_device_without_xdp_transmit_is_served() {
    let s = Scenario::start_spec(ScenarioSpec::new(Mode::Ipip, 1).generic()).expect("scenario");
    add_side_link(&s);
    // The backend's end in generic mode too: the balancer's end still has no XDP
    // transmit (only a driver-mode program gives a veth's peer that).
    let side_agent = side_decap_agent(&s, "generic");
    const N: u16 = 20;
    for i in 0..N {
        client::udp_request(&s.lab.client.ns, vip(), UDP_PORT, Some(47000 + i), T)
            .expect("answered over the side link");
    }
    let st = s.status().expect("status");
    assert_eq!(st.drops["egress_no_xdp"], 0, "{:?}", st.drops);
    let side = status_of(&s.lab, "backend-0-side0").expect("side agent status");
    assert!(
        side.actions["decap"] >= u64::from(N),
        "the requests came over the side link: {:?}",
        side.actions
    );
    drop(side_agent);
}
