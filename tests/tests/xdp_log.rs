//! The XDP program's debug log statements cost nothing when off: the shipped object,
//! loaded with `AYA_LOG_LEVEL` = 0 as the agent does by default, against the same program
//! built without lb-ebpf's `log` feature (tests/build.rs), compared by the instructions
//! the kernel runs (deterministic, unlike timing; `cargo xtask bench` times both). Needs
//! root.

use std::net::{Ipv4Addr, Ipv6Addr};

use l3lb::{
    dataplane::{Dataplane, LoadOptions},
    handover::CarryPlan,
    program_log::XdpLogLevel,
};
use l3lb_tests::OBJECT_WITHOUT_LOG;

/// Places the level is tested in the translated program: drop and action at the entry
/// point, new flow and ICMP error once in each family's path.
const SITES: u32 = 6;
/// With the level at 0 each site keeps four instructions (the global's address, two; its
/// load; the constant compared with), and register allocation around them differs by a
/// few more: measured 36 apart (10,889 against 10,853) when this was written.
const BOUND: u32 = SITES * 4 + 24;

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
