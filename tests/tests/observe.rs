//! What an operator sees: `l3lb status` and `l3lb flows --vip` against a balancer that
//! forwards real TCP and UDP, both while its agent runs and after it has exited (the data
//! plane keeps forwarding; both commands read only the pins). Needs root.

use std::{collections::HashMap, net::IpAddr, path::Path, process::Command, time::Duration};

use l3lb::{
    flows::{FlowEntry, FlowList},
    status::Status,
};
use l3lb_tests::{
    client::{self, parse_reply},
    l3lb_bin,
    scenario::{Mode, Scenario, TCP_PORT, UDP_PORT, status_of_pins},
};

const T: Duration = Duration::from_secs(2);

/// L3 length of one `client::udp_request` datagram: IPv4 + UDP headers + "l3lb-probe".
const UDP_REQUEST_BYTES: u64 = 20 + 8 + 10;

/// Runs `l3lb <args>` and returns its standard output, failing on a non-zero exit.
fn l3lb(args: &[&str], pin_path: &Path) -> String {
    let out = Command::new(l3lb_bin().expect("binary"))
        .args(args)
        .arg("--pin-path")
        .arg(pin_path)
        .output()
        .expect("run l3lb");
    assert!(
        out.status.success(),
        "l3lb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `l3lb flows --json --vip <vip> [--limit N]`, parsed.
fn flows(pin_path: &Path, vip: &str, limit: Option<usize>) -> FlowList {
    let limit = limit.map(|l| l.to_string());
    let mut args = vec!["flows", "--json", "--vip", vip];
    if let Some(l) = &limit {
        args.extend(["--limit", l]);
    }
    serde_json::from_str(&l3lb(&args, pin_path)).expect("flows --json parses")
}

/// The entries of `list` from the lab's client, in listed order.
fn from_client(list: &FlowList, client: IpAddr) -> Vec<&FlowEntry> {
    list.flows.iter().filter(|f| f.client == client).collect()
}

/// (packets, bytes, new flows) of the service called `name`.
fn service(status: &Status, name: &str) -> (u64, u64, u64) {
    let s = status
        .services
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no service named {name}: {:?}", status.services));
    (s.packets, s.bytes, s.new_flows)
}

/// Packets of every backend of the service called `name`, summed.
fn backend_packets(status: &Status, name: &str) -> u64 {
    status
        .backends
        .iter()
        .filter(|b| b.service_name.as_deref() == Some(name))
        .map(|b| b.packets)
        .sum()
}

#[test]
fn status_and_flows_show_names_weights_counters_and_connections_with_or_without_the_agent() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    s.set_weights(&[Some(1), Some(2), Some(3)])
        .expect("reweight");
    let pins = s.lab.pin_path("balancer-0");
    let vip = s.vip();
    let client_ip = IpAddr::V4(s.lab.client.ipv4);
    let address_of: HashMap<String, IpAddr> = s
        .lab
        .backends
        .iter()
        .map(|b| (b.name.clone(), IpAddr::V4(b.ipv4)))
        .collect();
    let before = s.status().expect("status");

    // UDP: one datagram per request, each from its own port (a flow each).
    const UDP_N: u16 = 20;
    let mut udp_owner = HashMap::new();
    for i in 0..UDP_N {
        let port = 45000 + i;
        let line = client::udp_request(&s.lab.client.ns, vip, UDP_PORT, Some(port), T)
            .expect("UDP answered");
        let reply = parse_reply(&line).expect("reply");
        udp_owner.insert(port, address_of[&reply.backend]);
    }
    // TCP: connections in a known order, so "newest first" is checkable. Creation
    // stamps have the kernel tick's grain (up to 10 ms): connections begun within one
    // tick would be listed by port instead, so they begin further apart.
    const TCP_N: u16 = 12;
    let mut tcp_owner = HashMap::new();
    for i in 0..TCP_N {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(25));
        }
        let port = 46000 + i;
        let line = client::tcp_request(&s.lab.client.ns, vip, TCP_PORT, Some(port), T)
            .expect("TCP answered");
        let reply = parse_reply(&line).expect("reply");
        tcp_owner.insert(port, address_of[&reply.backend]);
    }

    // ---- status, agent running ----
    let after = s.status().expect("status");
    let (p0, b0, n0) = service(&before, "dns");
    let (p1, b1, n1) = service(&after, "dns");
    let udp_n = u64::from(UDP_N);
    assert_eq!(p1 - p0, udp_n, "dns packets equal the datagrams sent");
    assert_eq!(b1 - b0, udp_n * UDP_REQUEST_BYTES, "dns bytes (L3)");
    assert_eq!(n1 - n0, udp_n, "one new flow per source port");
    assert_eq!(
        backend_packets(&after, "dns") - backend_packets(&before, "dns"),
        udp_n,
        "the dns backends got exactly those datagrams"
    );
    let (w0, _, _) = service(&before, "web");
    let (w1, _, wn1) = service(&after, "web");
    assert!(
        w1 - w0 >= 3 * u64::from(TCP_N),
        "each connection sends at least SYN, ACK and RST: {} packets",
        w1 - w0
    );
    assert_eq!(
        backend_packets(&after, "web") - backend_packets(&before, "web"),
        w1 - w0,
        "every web packet went to a web backend"
    );
    assert!(wn1 >= u64::from(TCP_N), "new flows counted for web");
    let web = after
        .services
        .iter()
        .find(|s| s.name.as_deref() == Some("web"))
        .expect("web");
    assert_eq!(web.vips, [format!("{vip}:{TCP_PORT}/tcp")]);
    assert_eq!(web.forwarding, "ipip");
    for name in ["web", "dns"] {
        let mut weights: Vec<(IpAddr, Option<u32>, &str)> = after
            .backends
            .iter()
            .filter(|b| b.service_name.as_deref() == Some(name))
            .map(|b| (b.address, b.weight, b.health.as_str()))
            .collect();
        weights.sort();
        let expected: Vec<(IpAddr, Option<u32>, &str)> = s
            .lab
            .backends
            .iter()
            .zip(1..)
            .map(|(b, w)| (IpAddr::V4(b.ipv4), Some(w), "unknown"))
            .collect();
        assert_eq!(
            weights, expected,
            "{name}: weights as configured, not checked"
        );
    }
    let table = &after.connection_table;
    assert!(
        table.entries >= u64::from(UDP_N + TCP_N),
        "the connection table holds at least the flows made: {table:?}"
    );
    assert_eq!(table.capacity, 262_144, "the default conntrack_size");
    assert_eq!(after.flows, table.entries, "the old field agrees");
    let text = l3lb(&["status"], &pins);
    // Shown when the test fails (and with --nocapture): what an operator would read.
    eprintln!("{text}");
    for needle in [
        "SERVICES",
        "web",
        "dns",
        "WEIGHT",
        "HEALTH",
        "CONNECTION TABLE",
        "of 262144 entries",
        "counted now",
    ] {
        assert!(text.contains(needle), "status shows {needle:?}:\n{text}");
    }

    // ---- flows, agent running ----
    let web_vip = format!("{vip}:{TCP_PORT}");
    let listed = flows(&pins, &web_vip, None);
    let mine = from_client(&listed, client_ip);
    let ports: Vec<u16> = mine.iter().map(|f| f.client_port).collect();
    let newest_first: Vec<u16> = (46000..46000 + TCP_N).rev().collect();
    assert_eq!(
        ports, newest_first,
        "the client's connections, newest first"
    );
    for f in &mine {
        assert_eq!(f.vip, vip);
        assert_eq!(f.port, TCP_PORT);
        assert_eq!(f.protocol, "tcp");
        assert_eq!(f.service.as_deref(), Some("web"));
        assert_eq!(
            f.backend,
            Some(tcp_owner[&f.client_port]),
            "port {} listed with the backend that answered it",
            f.client_port
        );
    }
    let limited = flows(&pins, &web_vip, Some(5));
    assert_eq!(limited.flows.len(), 5, "--limit is respected");
    assert!(limited.matched >= u64::from(TCP_N), "{limited:?}");
    let ports: Vec<u16> = limited.flows.iter().map(|f| f.client_port).collect();
    assert_eq!(ports, newest_first[..5], "the limit keeps the newest");

    let dns = flows(&pins, &format!("{vip}:{UDP_PORT}"), None);
    let mine = from_client(&dns, client_ip);
    assert_eq!(mine.len(), usize::from(UDP_N), "every UDP flow listed");
    for f in &mine {
        assert_eq!(f.protocol, "udp");
        assert_eq!(f.service.as_deref(), Some("dns"));
        assert_eq!(f.backend, Some(udp_owner[&f.client_port]));
    }
    let whole = flows(&pins, &vip.to_string(), None);
    assert_eq!(
        from_client(&whole, client_ip).len(),
        usize::from(UDP_N + TCP_N),
        "without a port: every flow to the address"
    );
    let text = l3lb(&["flows", "--vip", &web_vip, "--limit", "3"], &pins);
    eprintln!("{text}");
    assert!(
        text.contains(&format!("FLOWS TO {web_vip} (newest first): 3 of"))
            && text.contains(&format!("{client_ip}:{}", 46000 + TCP_N - 1))
            && text.contains("older entries not shown"),
        "{text}"
    );

    // ---- the agent exits; the data plane keeps forwarding and both commands still work ----
    let exit = s.balancer.stop().expect("stop");
    assert!(exit.success(), "agent exits cleanly: {exit:?}");
    const LATE_N: u16 = 5;
    for i in 0..LATE_N {
        client::udp_request(&s.lab.client.ns, vip, UDP_PORT, Some(47000 + i), T)
            .expect("UDP answered with the agent stopped");
    }
    let line = client::tcp_request(&s.lab.client.ns, vip, TCP_PORT, Some(47100), T)
        .expect("TCP answered with the agent stopped");
    let late_tcp_owner = address_of[&parse_reply(&line).expect("reply").backend];

    let stopped = status_of_pins(&pins).expect("status without an agent");
    let (p2, b2, _) = service(&stopped, "dns");
    assert_eq!(p2 - p1, u64::from(LATE_N), "counted while no agent runs");
    assert_eq!(b2 - b1, u64::from(LATE_N) * UDP_REQUEST_BYTES);
    assert_eq!(
        stopped.backends.iter().filter_map(|b| b.weight).count(),
        6,
        "names and weights stay readable from the pins"
    );
    assert!(
        stopped.connection_table.entries > u64::from(UDP_N + TCP_N + LATE_N),
        "the late flows joined the table: {:?}",
        stopped.connection_table
    );
    let listed = flows(&pins, &web_vip, Some(2));
    let ports: Vec<u16> = listed.flows.iter().map(|f| f.client_port).collect();
    assert_eq!(
        ports,
        [47100, 46000 + TCP_N - 1],
        "the connection made after the agent exited comes first"
    );
    assert_eq!(listed.flows[0].backend, Some(late_tcp_owner));
    let dns = flows(&pins, &format!("{vip}:{UDP_PORT}"), None);
    assert_eq!(
        from_client(&dns, client_ip).len(),
        usize::from(UDP_N + LATE_N)
    );
    let text = l3lb(&["status"], &pins);
    assert!(
        text.contains("dns") && text.contains("CONNECTION TABLE"),
        "{text}"
    );
}
