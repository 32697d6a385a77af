//! The XDP program's debug logs (aya-log): off as shipped, where the verifier removes the
//! statements, and on, where drops, new flows, ICMP errors, echo replies and (at trace)
//! decapsulations reach userspace as records through the agent's reader. The real object through `BPF_PROG_TEST_RUN`. Needs root.
//!
//! The comparison with the statements compiled out (the `log` feature off) is in the
//! tests crate (`tests/tests/xdp_log.rs`), which builds that object.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use common::*;
use l3lb::{dataplane::LoadOptions, program_log::XdpLogLevel};
use lb_common::{DropReason, PROTO_TCP};

/// Keeps every record the reader hands over: (level, message).
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .expect("records lock")
            .push((record.level(), record.args().to_string()));
    }

    fn flush(&self) {}
}

impl Collect {
    fn take(&self) -> Vec<(log::Level, String)> {
        std::mem::take(&mut *self.0.lock().expect("records lock"))
    }
}

fn options(level: XdpLogLevel) -> LoadOptions {
    LoadOptions {
        log_level: level,
        ..opts(true)
    }
}

/// A TCP segment to `web` whose IP version nibble is 5.
fn bad_version() -> Vec<u8> {
    let mut frame = client_tcp(VIP, 40000, 80, SYN);
    frame[14] = 0x55;
    frame
}

/// IPIP to this node from the client, which is on no allow list.
fn ipip_from_client() -> Vec<u8> {
    let inner = ipv4(
        CLIENT,
        VIP,
        lb_common::PROTO_TCP,
        &[],
        &tcp(40000, 80, SYN, b""),
        true,
    );
    eth(
        NODE_MAC,
        CLIENT_MAC,
        &[],
        0x0800,
        &ipv4(CLIENT, NODE, lb_common::PROTO_IPIP, &[], &inner, false),
    )
}

#[test]
fn disabled_statements_are_removed_by_the_verifier() {
    let off = Fixture::with_options(&options(XdpLogLevel::Off), &standard_desired());
    let on = Fixture::with_options(&options(XdpLogLevel::Trace), &standard_desired());
    let count = |f: &Fixture| {
        f.dp.xlated_instructions()
            .expect("program info")
            .expect("the kernel shows root the translated program")
    };
    let (off_n, on_n) = (count(&off), count(&on));
    println!("xlated instructions: logs off {off_n}, logs on (trace) {on_n}");
    // Each statement formats a header and its arguments into the ring buffer: hundreds
    // of instructions. A verifier that kept them (the level not a known constant) would
    // leave both loads alike.
    assert!(
        on_n > off_n + 1000,
        "logs off: {off_n} instructions, on: {on_n}: the verifier did not remove the disabled statements"
    );
}

#[test]
fn drops_new_flows_and_echo_replies_reach_userspace_when_on() {
    let mut f = Fixture::with_options(&options(XdpLogLevel::Debug), &standard_desired());
    let records = Collect::default();
    let mut reader = f.dp.log_reader(records.clone()).expect("log reader");

    f.expect_drop(&bad_version(), DropReason::BadIpHeader, "IP version 5");
    f.expect_drop(
        &ipip_from_client(),
        DropReason::DecapNotAllowed,
        "IPIP from a source off the allow list",
    );
    let mut runt = client_tcp(VIP, 40000, 80, SYN);
    runt.truncate(14);
    f.expect_drop(&runt, DropReason::Truncated, "Ethernet header only");
    let (verdict, _) = f.run(&client_tcp(VIP, 40000, 80, SYN));
    assert_eq!(verdict, XDP_TX, "SYN to web");
    let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(b"ping");
    let (verdict, _) = f.run(&icmp_frame(CLIENT, VIP, &echo));
    assert_eq!(verdict, XDP_TX, "echo to a VIP");

    reader.flush();
    let got = records.take();
    let messages: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    let web = f.dp.service_id("web").expect("web's id");
    let b1 =
        f.dp.backend_id("web", std::net::IpAddr::V4(B1))
            .expect("B1's id");
    let expected = [
        "drop 203.0.113.7 -> 192.0.2.10: bad_ip_header".to_string(),
        "drop 203.0.113.7 -> 10.1.0.1: decap_not_allowed".to_string(),
        "drop 14-byte frame without a readable IP header: truncated".to_string(),
        format!("new flow 203.0.113.7:40000 -> 192.0.2.10:80 proto 6: service {web} backend {b1}"),
        "sent 192.0.2.10 -> 203.0.113.7: echo_reply".to_string(),
    ];
    assert_eq!(messages, expected, "records, in order");
    assert!(
        got.iter().all(|(level, _)| *level == log::Level::Debug),
        "every record at debug: {got:?}"
    );
}

/// The IPv6 programs' frames leave no room for the log functions: their outcome is logged
/// by the program they hand it to (`l3lb_log_outcome`), and counted once.
#[test]
fn ipv6_outcomes_are_logged_and_counted_once() {
    let mut f = Fixture::with_options(&options(XdpLogLevel::Debug), &standard_desired());
    let records = Collect::default();
    let mut reader = f.dp.log_reader(records.clone()).expect("log reader");
    let before = f.outcome_counts();
    let syn = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b""));
    let (verdict, _) = f.run(&v6_frame(&syn));
    assert_eq!(verdict, XDP_TX, "IPv6 SYN to web6");
    let mut bad = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b""));
    // TCP data offset 4: below the minimum.
    bad[40 + 12] = 4 << 4;
    f.expect_drop(
        &v6_frame(&bad),
        DropReason::BadL4Header,
        "IPv6 TCP with data offset 4",
    );
    reader.flush();
    let got = records.take();
    let messages: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    let web6 = f.dp.service_id("web6").expect("web6's id");
    let b1 =
        f.dp.backend_id("web6", std::net::IpAddr::V6(B1_6))
            .expect("B1_6's id");
    let expected = [
        format!(
            "new flow 2001:db8:c::7:40000 -> 2001:db8:f::10:80 proto 6: service {web6} backend {b1}"
        ),
        "drop 2001:db8:c::7 -> 2001:db8:f::10: bad_l4_header".to_string(),
    ];
    assert_eq!(messages, expected, "records, in order");
    let after = f.outcome_counts();
    let encap = lb_common::DROP_REASON_COUNT as usize + lb_common::Action::Encap as usize;
    let bad_l4 = DropReason::BadL4Header as usize;
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        let want = u64::from(i == encap || i == bad_l4);
        assert_eq!(a - b, want, "outcome counter {i} moved by {}", a - b);
    }
}

#[test]
fn nothing_is_written_when_off() {
    let mut f = Fixture::with_options(&options(XdpLogLevel::Off), &standard_desired());
    let records = Collect::default();
    let mut reader = f.dp.log_reader(records.clone()).expect("log reader");
    f.expect_drop(&bad_version(), DropReason::BadIpHeader, "IP version 5");
    let (verdict, _) = f.run(&client_tcp(VIP, 40000, 80, SYN));
    assert_eq!(verdict, XDP_TX, "SYN to web");
    reader.flush();
    assert_eq!(records.take(), Vec::new(), "records with the logs off");
}

#[test]
fn icmp_errors_and_at_trace_decapsulations_are_logged() {
    let mut desired = standard_desired();
    desired.decap_v4 = vec![(BALANCER, 32)];
    let inner = client_ack_v4();
    let ipip = eth(
        NODE_MAC,
        B1_MAC,
        &[5],
        0x0800,
        &ipv4(BALANCER, NODE, lb_common::PROTO_IPIP, &[], &inner, true),
    );
    // A router on the return path complains about web's reply VIP → client.
    let quoted = ipv4(
        VIP,
        CLIENT,
        lb_common::PROTO_TCP,
        &[],
        &tcp(80, 40000, ACK, b"reply data"),
        true,
    );
    let mut err = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
    err.extend_from_slice(&quoted[..28]);
    let icmp_error = icmp_frame(Ipv4Addr::new(198, 51, 100, 1), VIP, &err);

    for level in [XdpLogLevel::Debug, XdpLogLevel::Trace] {
        let mut f = Fixture::with_options(&options(level), &desired);
        let records = Collect::default();
        let mut reader = f.dp.log_reader(records.clone()).expect("log reader");
        let (verdict, _) = f.run(&ipip);
        assert_eq!(
            verdict, XDP_PASS,
            "{level:?}: IPIP from an allowed balancer"
        );
        let (verdict, _) = f.run(&icmp_error);
        assert_eq!(verdict, XDP_TX, "{level:?}: ICMP error about a flow of web");
        reader.flush();
        let web = f.dp.service_id("web").expect("web's id");
        let b1 = f.dp.backend_id("web", IpAddr::V4(B1)).expect("B1's id");
        // The error quotes the reply; the flow it is about is the client's.
        let icmp = (
            log::Level::Debug,
            format!(
                "ICMP error about flow 203.0.113.7:40000 -> 192.0.2.10:80 proto 6: service {web} backend {b1}"
            ),
        );
        let expected = if level == XdpLogLevel::Trace {
            vec![
                (
                    log::Level::Trace,
                    "decapsulated 203.0.113.7 -> 192.0.2.10".to_string(),
                ),
                icmp,
            ]
        } else {
            vec![icmp]
        };
        assert_eq!(records.take(), expected, "{level:?}: records, in order");
    }
}
