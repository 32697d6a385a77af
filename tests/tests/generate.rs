//! `l3lb bench generate` sends the frames it is asked for, out of a real interface, with
//! the flows and size requested. Needs root.

use std::time::Duration;

use l3lb_tests::{Netns, l3lb_bin, scenario::status_of_pins, spawn_in};

#[test]
fn generate_sends_the_requested_frames_to_the_peer() {
    let gen_ns = Netns::new("gen").expect("namespace");
    let sink_ns = Netns::new("sink").expect("namespace");
    gen_ns
        .ip([
            "link",
            "add",
            "g0",
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "netns",
            sink_ns.name(),
        ])
        .expect("veth");
    gen_ns.ip(["link", "set", "g0", "up"]).expect("up");
    sink_ns.ip(["link", "set", "s0", "up"]).expect("up");
    let sink_mac = sink_ns.mac("s0").expect("mac");

    // The receiving end runs XDP (a service-less l3lb: it passes and counts every frame),
    // which is also what lets a veth receive frames transmitted with XDP_TX.
    let dir = std::env::temp_dir().join(format!("l3lb-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pins = std::path::PathBuf::from("/run/l3lb-lab/bpffs")
        .join(format!("generate-{}", std::process::id()));
    std::fs::create_dir_all(&pins).expect("pin dir");
    // Dropped after the sink agent and before the namespaces, also when an assertion fails.
    let _cleanup = RemoveOnDrop(vec![dir.clone(), pins.clone()]);
    let cfg = dir.join("sink.yaml");
    std::fs::write(
        &cfg,
        format!(
            "interface: s0\nxdp_mode: native\npin_path: {}\n",
            pins.display()
        ),
    )
    .expect("config");
    let bin = l3lb_bin().expect("binary");
    let mut sink = spawn_in(
        &sink_ns,
        &bin,
        ["run", "--config", &cfg.to_string_lossy()],
        &dir.join("sink.log"),
    )
    .expect("sink");
    sink.wait_for_log("l3lb ready", Duration::from_secs(20))
        .expect("sink ready");
    let before = status_of_pins(&pins).expect("status").actions["pass"];

    let out = gen_ns
        .run([
            bin.to_string_lossy().as_ref(),
            "bench",
            "generate",
            "--interface",
            "g0",
            "--dst-mac",
            &sink_mac.to_string(),
            "--vip",
            "10.99.0.1",
            "--port",
            "53",
            "--flows",
            "1024",
            "--size",
            "128",
            "--count",
            "200000",
        ])
        .expect("generate");
    assert!(out.contains("sent 200000 UDP frames of 128 bytes"), "{out}");
    // Every frame the generator sent went into the veth: the frames the peer's ring
    // took, plus those it refused when full (which happens when the host stalls the
    // receiving softirq: a veth has no backpressure for XDP transmit).
    let ethtool = gen_ns.run(["ethtool", "-S", "g0"]).expect("ethtool");
    let counter = |name: &str| -> u64 {
        ethtool
            .lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in {ethtool}"))
            .trim()
            .parse()
            .expect("counter")
    };
    let (taken, refused) = (
        counter("tx_queue_0_xdp_xmit"),
        counter("tx_queue_0_xdp_xmit_errors"),
    );
    assert_eq!(taken + refused, 200_000, "{ethtool}");
    assert!(
        refused <= 20_000,
        "the veth refused {refused} of 200000 frames"
    );
    // And every frame it took reached the peer's program.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let received = loop {
        let after = status_of_pins(&pins).expect("status").actions["pass"];
        if after - before >= taken || std::time::Instant::now() > deadline {
            break after - before;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        received >= taken,
        "the peer received {received} of the {taken} frames the veth took (of 200000)"
    );
    let stats = sink_ns.ip(["-s", "link", "show", "s0"]).expect("stats");
    assert!(stats.contains("RX:"), "{stats}");
    sink.stop().expect("stop");
    // The sink's program stays attached after the agent exits; take it down.
    let down = std::process::Command::new(&bin)
        .args(["down", "--pin-path"])
        .arg(&pins)
        .status()
        .expect("l3lb down");
    assert!(down.success());
}

/// Directories removed when dropped (pins on bpffs go with them), on failure too.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
