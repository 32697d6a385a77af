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
    assert!(out.contains("sent 200000 frames of 128 bytes"), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    let after = status_of_pins(&pins).expect("status").actions["pass"];
    assert!(
        after - before >= 200_000,
        "the peer received {} of 200000 frames",
        after - before
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
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir(&pins);
}
