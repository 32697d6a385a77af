//! The XDP program's debug log statements cost nothing when off: the shipped object,
//! loaded with `AYA_LOG_LEVEL` = 0 as the agent does by default, against the same program
//! built without lb-ebpf's `log` feature (tests/build.rs), compared by the instructions
//! the kernel runs (deterministic, unlike timing; `cargo xtask bench` times both). And
//! through the real agent: named in its log filter, they reach its log. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use l3lb::{
    dataplane::{Dataplane, LoadOptions},
    handover::CarryPlan,
    program_log::XdpLogLevel,
};
use l3lb_tests::{
    OBJECT_WITHOUT_LOG, client, l3lb_bin,
    scenario::{Mode, Scenario, TCP_PORT},
};

/// Places the level is tested in the translated program: drop and action at the entry
/// point and in `l3lb_log_outcome`, new flow and ICMP error once in each family's path,
/// and the hand-over to `l3lb_log_outcome` at the end of the two IPv6 programs.
const SITES: u32 = 10;
/// With the level at 0 each site keeps four instructions (the global's address, two; its
/// load; the constant compared with), and register allocation around them differs by some
/// more: measured 36 apart (10,889 against 10,853) when this was written, 67 (13,502
/// against 13,435) once the connection table was searched inline, 271 in all (15,534
/// against 15,263; 221 before) once known flows got a forwarding tail of their own, 314
/// (15,758 against 15,444) without the per-packet service counter, 361 (17,451 against
/// 17,090) once known flows were sent from a quick parse of their own (a second forwarding
/// tail in each family, no new statement) — still a twenty-fourth of what the statements add
/// when on. The bench compares the two builds' per-packet times.
const BOUND: u32 = SITES * 4 + 192 + HAND_OVER;
/// The IPv6 programs keep their outcome ready to hand over across the level's test:
/// 123 + 12 instructions more than without it (14,585 against 14,364 in all, 2026-11-26),
/// none of them on the forwarding path — `bench --compare` against a build without the
/// hand-over put IPv6 established at 0.991, pass-through at 0.997.
const HAND_OVER: u32 = 160;

fn options() -> LoadOptions {
    LoadOptions {
        ring_size: 251,
        max_services: 16,
        max_backends: 64,
        conntrack_size: 4096,
        encap_src_v4: Ipv4Addr::new(10, 1, 0, 1),
        encap_src_v6: Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1),
        decap: true,
        log_level: XdpLogLevel::Off,
    }
}

/// (translated, verifier-processed) instructions of a load.
fn counts(dp: &Dataplane) -> (u32, u32) {
    let xlated = dp
        .xlated_instructions()
        .expect("program info")
        .expect("the kernel shows root the translated program");
    let verified = dp
        .verified_instructions()
        .expect("program info")
        .expect("the kernel reports verified instructions");
    (xlated, verified)
}

#[test]
fn disabled_log_statements_leave_the_program_as_without_them() {
    let shipped = Dataplane::load(&options()).expect("load the shipped object");
    let without = Dataplane::load_object(OBJECT_WITHOUT_LOG, &options(), &CarryPlan::default())
        .expect("load the object without the log feature");
    let on = Dataplane::load(&LoadOptions {
        log_level: XdpLogLevel::Debug,
        ..options()
    })
    .expect("load the shipped object with its logs on");
    let (off, none, on) = (counts(&shipped), counts(&without), counts(&on));
    println!(
        "xlated instructions: logs off {}, compiled out {}, on (debug) {}; verifier-processed: {}, {}, {}",
        off.0, none.0, on.0, off.1, none.1, on.1
    );
    assert!(
        off.0.abs_diff(none.0) <= BOUND,
        "logs off: {} instructions, compiled out: {}: more apart than the {BOUND} the level checks explain",
        off.0,
        none.0
    );
    // The other side of the same coin: the statements are there to be removed.
    assert!(
        on.0 > off.0 + 1000,
        "logs on: {} instructions, off: {}: the shipped object has no statements to remove",
        on.0,
        off.0
    );
}

#[test]
fn an_agent_that_names_l3lb_xdp_logs_new_flows_and_one_at_plain_debug_does_not() {
    let mut s = Scenario::start(Mode::Ipip, 2).expect("scenario");
    let vip = s.vip();
    let client_ip = IpAddr::V4(s.lab.client.ipv4);
    let config = s.config_path().to_path_buf();
    let t = Duration::from_secs(2);

    // A restart that asks for the program's logs: it takes over the running program's
    // pins like any restart.
    let status = s.balancer.stop().expect("stop the agent");
    assert!(status.success(), "agent exit: {status}");
    let config_arg = config.to_string_lossy().into_owned();
    s.balancer = s
        .lab
        .spawn_in(
            &s.lab.balancers[0].ns,
            l3lb_bin().expect("binary"),
            [
                "run",
                "--config",
                config_arg.as_str(),
                "--log-level",
                "info,l3lb::xdp=debug",
            ],
            "balancer-0-logs.log",
        )
        .expect("start the agent with the program's logs");
    s.balancer
        .wait_for_log("l3lb ready", Duration::from_secs(30))
        .expect("ready");
    client::tcp_request(&s.lab.client.ns, vip, TCP_PORT, Some(47000), t)
        .expect("TCP answered with the logs on");
    let line = format!("l3lb::xdp: new flow {client_ip}:47000 -> {vip}:{TCP_PORT} proto 6");
    s.balancer
        .wait_for_log(&line, Duration::from_secs(5))
        .expect("the new flow in the agent's log");

    // Restarted with the agent's own debug logs, not naming the target: the program's stay
    // off.
    let status = s.balancer.stop().expect("stop the agent");
    assert!(status.success(), "agent exit: {status}");
    s.balancer = s
        .lab
        .spawn_in(
            &s.lab.balancers[0].ns,
            l3lb_bin().expect("binary"),
            [
                "run",
                "--config",
                config_arg.as_str(),
                "--log-level",
                "debug",
            ],
            "balancer-0-debug.log",
        )
        .expect("start the agent at debug");
    s.balancer
        .wait_for_log("l3lb ready", Duration::from_secs(30))
        .expect("ready");
    client::tcp_request(&s.lab.client.ns, vip, TCP_PORT, Some(47001), t)
        .expect("TCP answered with the logs off");
    std::thread::sleep(Duration::from_millis(500));
    let log = s.balancer.log();
    // Were they on, the new flow above would be in the log at debug, which this filter
    // shows.
    assert!(
        !log.contains("l3lb::xdp") && !log.contains("the XDP program logs"),
        "the program logged with the logs off:\n{log}"
    );
}
