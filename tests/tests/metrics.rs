//! `/metrics` of a running balancer, scraped from its namespace, against the traffic the
//! test sent. Needs root.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    time::Duration,
};

use l3lb_tests::{
    Netns, TcpServer, client,
    scenario::{Mode, Scenario, TCP_PORT, UDP_PORT, backend_name, balancer_config_for},
};

const T: Duration = Duration::from_secs(2);

/// `GET path` on the agent's default metrics address inside `ns`: (status line, body).
fn get(ns: &Netns, path: &str) -> (String, String) {
    ns.enter(|| {
        let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics address listening");
        s.set_read_timeout(Some(T)).expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: l3lb\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    })
    .expect("namespace")
}

/// The value of the series `series` (name and labels exactly) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_count_what_the_client_sent() {
    let s = Scenario::start(Mode::Ipip, 2).expect("scenario");
    let vip = s.vip();
    for port in 0..20 {
        client::udp_request(&s.lab.client.ns, vip, UDP_PORT, Some(45000 + port), T)
            .expect("UDP answered");
    }
    let tcp = client::tcp_bulk(&s.lab.client.ns, vip, TCP_PORT, 46000..46010, T).expect("TCP");
    assert_eq!(tcp.ok, 10);

    let ns = &s.lab.balancers[0].ns;
    assert_eq!(get(ns, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(get(ns, "/readyz").0, "HTTP/1.1 200 OK");
    let (status, text) = get(ns, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text:\n{text}");

    let vip = match vip {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => v.to_string(),
    };
    // One datagram per request, each counted once, at the service and at its backends.
    let dns = format!("{{service=\"dns\",vip=\"{vip}\"}}");
    assert_eq!(value(&text, &format!("l3lb_vip_packets_total{dns}")), 20.0);
    assert_eq!(
        value(&text, &format!("l3lb_vip_new_connections_total{dns}")),
        20.0
    );
    let backend_sum: f64 = s
        .lab
        .backends
        .iter()
        .map(|b| {
            let series = format!(
                "l3lb_backend_packets_total{{service=\"dns\",backend=\"{}\"}}",
                b.ipv4
            );
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(series.as_str())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(backend_sum, 20.0, "{text}");
    // TCP: ten new connections (each SYN a fresh choice), more packets than that.
    let web = format!("{{service=\"web\",vip=\"{vip}\"}}");
    assert_eq!(
        value(&text, &format!("l3lb_vip_new_connections_total{web}")),
        10.0
    );
    assert!(value(&text, &format!("l3lb_vip_packets_total{web}")) >= 30.0);
    for b in &s.lab.backends {
        let series = format!(
            "l3lb_backend_weight{{service=\"web\",backend=\"{}\"}}",
            b.ipv4
        );
        assert_eq!(value(&text, &series), 1.0);
    }
    assert!(value(&text, "l3lb_packets_total{action=\"encap\"}") >= 50.0);
    assert_eq!(
        value(&text, "l3lb_dropped_packets_total{reason=\"no_backend\"}"),
        0.0
    );
    assert!(value(&text, "l3lb_connection_table_entries") >= 30.0);
    assert!(value(&text, "l3lb_connection_table_capacity") >= 1024.0);
    assert_eq!(value(&text, "l3lb_config_generation"), 1.0);
    assert_eq!(value(&text, "l3lb_config_last_apply_success"), 1.0);
    assert!(value(&text, "l3lb_config_last_success_timestamp_seconds") > 1.6e9);
    assert!(
        text.contains("# UNIT l3lb_vip_received_bytes bytes"),
        "{text}"
    );

    // Only loopback: the balancer's own address does not answer.
    let addr = s.lab.balancers[0].ipv4;
    let reachable = ns
        .enter(|| TcpStream::connect_timeout(&(addr, 9477).into(), T).is_ok())
        .expect("namespace");
    assert!(!reachable, "metrics bound to loopback by default");
}

#[test]
fn the_generation_follows_every_apply_and_a_new_metrics_address_or_xdp_mode_is_refused() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    // Backends 0 and 2 answer the health check's port; backend 1 does not.
    let _checked_servers: Vec<TcpServer> = [0, 2]
        .iter()
        .map(|&i| {
            TcpServer::start(
                &s.lab.backends[i].ns,
                &backend_name(i),
                std::net::SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8081),
            )
            .expect("server")
        })
        .collect();
    let checked = balancer_config_for(&s.lab, s.spec(), &[Some(1); 3])
        .expect("config")
        .replacen(
            "    backends:\n",
            "    health_check: {type: tcp, port: 8081, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}\n    backends:\n",
            1,
        );
    s.write_raw_config_and_reload(&checked).expect("reload");
    // Generation 2 is the reload; 3 the re-apply that takes the failing backend out.
    s.balancer
        .wait_for_log(
            "backend health changed; applied generation=3",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    let (_, text) = get(&s.lab.balancers[0].ns, "/metrics");
    assert_eq!(value(&text, "l3lb_config_generation"), 3.0, "{text}");

    let moved = checked.replacen(
        "interface: eth0\n",
        "interface: eth0\nmetrics_address: 127.0.0.1:9478\n",
        1,
    );
    assert_ne!(moved, checked);
    s.write_raw_config_and_reload(&moved).expect("reload");
    s.balancer
        .wait_for_log("config reload rejected", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    assert!(
        s.balancer.log().contains("metrics_address"),
        "the reason names the setting:\n{}",
        s.balancer.log()
    );
    let (status, text) = get(&s.lab.balancers[0].ns, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "still served where it was");
    assert_eq!(value(&text, "l3lb_config_generation"), 3.0);
    assert_eq!(value(&text, "l3lb_config_last_apply_success"), 0.0);

    // So is another XDP mode: the attached program keeps its own until `l3lb down`.
    let generic = checked.replacen("xdp_mode: native\n", "xdp_mode: generic\n", 1);
    assert_ne!(generic, checked);
    s.write_raw_config_and_reload(&generic).expect("reload");
    s.balancer
        .wait_for_log(
            "xdp_mode takes effect only when the program is attached anew",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    let (_, text) = get(&s.lab.balancers[0].ns, "/metrics");
    assert_eq!(value(&text, "l3lb_config_generation"), 3.0, "not applied");
}
