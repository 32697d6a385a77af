//! The live-frame generator's program (what `l3lb bench generate` and the benchmark's
//! throughput run load) through `BPF_PROG_TEST_RUN`, one frame at a time: the header it
//! writes for each flow, checksums included. Needs root.

use std::net::Ipv4Addr;

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use l3lb::generate::{GenerateOptions, HEADER_LEN, TCP_FRAME, template};

/// Internet checksum of `bytes` (0 when a stored checksum inside them is right).
fn csum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn options(protocol: u8, size: usize) -> GenerateOptions {
    GenerateOptions {
        interface: "lo".into(),
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_mac: Some([2, 0, 0, 0, 0, 1]),
        src: Ipv4Addr::new(198, 18, 0, 1),
        vip: Ipv4Addr::new(192, 0, 2, 10),
        port: 80,
        protocol,
        src_port: 1024,
        flows: 65536,
        size,
        count: Some(1),
        duration: None,
        rate: None,
    }
}

/// The frames the generator writes for its first `n` flows, from `o`'s template.
fn generated(o: &GenerateOptions, n: usize) -> Vec<Vec<u8>> {
    let frame = template(o, o.src_mac.expect("mac"));
    let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header");
    let mask = o.flows - 1;
    let mut ebpf = EbpfLoader::new()
        .override_global("BENCH_HEADER", &header, true)
        .override_global("BENCH_FLOW_MASK", &mask, true)
        .load(l3lb::dataplane::OBJECT)
        .expect("load");
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::BENCH_GEN_PROGRAM_NAME)
        .expect("generator")
        .try_into()
        .expect("xdp");
    prog.load().expect("verify");
    // The flow sequence is a per-CPU counter: one CPU for every call.
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread"
        );
    }
    (0..n)
        .map(|_| {
            // Whatever an earlier frame left in the page: the header is written whole.
            let junk = vec![0xa5u8; frame.len()];
            let mut out = vec![0u8; frame.len()];
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&junk);
            opts.data_out = Some(&mut out);
            let r = prog.test_run(opts).expect("test run");
            assert_eq!(r.return_value, 3, "XDP_TX");
            out.truncate(r.data_size_out as usize);
            out
        })
        .collect()
}

#[test]
fn tcp_frames_are_acks_of_their_own_flow_with_right_checksums() {
    let o = options(lb_common::PROTO_TCP, TCP_FRAME);
    let frames = generated(&o, 3);
    for (n, f) in frames.iter().enumerate() {
        let ip = &f[14..34];
        assert_eq!(ip[9], lb_common::PROTO_TCP);
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]),
            40,
            "header-only segment"
        );
        assert_eq!(csum(ip), 0, "flow {n}: IPv4 checksum");
        // Flow n: the source port counts up (the address every 256 flows).
        assert_eq!(&ip[12..16], &[198, 18, 0, 1]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1024 + n as u16);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!((f[46], f[47]), (0x50, 0x10), "data offset 5, ACK");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, lb_common::PROTO_TCP, 0, 20]);
        pseudo.extend_from_slice(&f[34..54]);
        assert_eq!(csum(&pseudo), 0, "flow {n}: TCP checksum");
    }
}

#[test]
fn udp_frames_carry_their_flow_and_the_requested_length() {
    let o = options(lb_common::PROTO_UDP, 128);
    let frames = generated(&o, 2);
    for (n, f) in frames.iter().enumerate() {
        let ip = &f[14..34];
        assert_eq!(ip[9], lb_common::PROTO_UDP);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 128 - 14);
        assert_eq!(csum(ip), 0, "flow {n}: IPv4 checksum");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1024 + n as u16);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 128 - 34, "UDP length");
        assert_eq!(&f[42..54], &[0u8; 12], "the template's payload bytes");
    }
}

#[test]
fn tcp_frames_of_other_sizes_are_refused() {
    let err = l3lb::generate::generate(&options(lb_common::PROTO_TCP, 128))
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("--protocol tcp sends 60-byte ACK segments"),
        "{err}"
    );
}
