//! Two CPUs writing and reading one connection-table way at once, through the real
//! program (`BPF_PROG_TEST_RUN` from two threads). A test binary of its own: cargo runs
//! test binaries one after another, so the two threads are not starved by the packet
//! fixtures' tests. Needs root.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use aya::maps::MapData;
use common::*;
use l3lb::dataplane::Desired;
use lb_common::{PROTO_TCP, map_names};

#[test]
fn a_way_replaced_on_another_cpu_never_sends_a_known_flow_to_the_new_flows_backend() {
    // A known flow to VIP:80 (service "x", backend B1) and, on another thread (another
    // CPU), new flows to VIP_ALL (service "y", backend B3) whose only place is the way the
    // known flow keeps being found in. A reader that took the known flow's tag, then the
    // backend the writer had just put there, sends the packet to B3.
    //
    // Both services rewrite MACs only (l2), so a frame sent through the program with
    // `repeat` stays the same IP packet pass after pass: each call runs the program that
    // many times at kernel speed, which is what makes the two CPUs meet in one way.
    let mut options = opts(false);
    options.conntrack_size = 1024;
    let f = Fixture::with_options(
        &options,
        &Desired {
            services: vec![
                service("x", VIP, 80, PROTO_TCP, true, &[B1]),
                service("y", VIP_ALL, 0, PROTO_TCP, true, &[B3]),
            ],
            local_v4: vec![NODE],
            ..Desired::default()
        },
    );
    let table = f.dp.flow_table().expect("connection table");
    let key_to = |vip: Ipv4Addr, sport: u16, dport: u16| {
        let mut k = client_key(sport, dport);
        k.dst[..4].copy_from_slice(&vip.octets());
        k
    };
    let established = |vip: Ipv4Addr, sport: u16, dport: u16| {
        f.run(&client_tcp(vip, sport, dport, SYN));
        f.run(&client_tcp(vip, sport, dport, ACK));
    };
    // Fills `bucket` with confirmed flows to VIP_ALL:9090 at home there.
    let mut filler = 1024u16;
    let mut fill = |bucket: u32| {
        let mut n = 0;
        while n < 4 {
            filler += 1;
            if table.buckets_of(&key_to(VIP_ALL, filler, 9090)).0 == bucket {
                established(VIP_ALL, filler, 9090);
                n += 1;
            }
        }
    };
    let (home, over) = table.buckets_of(&key_to(VIP, 30000, 80));
    let others: Vec<u16> = (1024..u16::MAX)
        .filter(|&p| {
            let (h, o) = table.buckets_of(&key_to(VIP_ALL, p, 8080));
            h == home && o != home && o != over
        })
        .take(5)
        .collect();
    assert_eq!(others.len(), 5);
    // The known flow first (way 0 of its home bucket), confirmed; three confirmed flows
    // beside it, and both overflow buckets involved full of confirmed flows: the new
    // flow's victim is way 0 (all are as old; ties go to the first way), and the known
    // flow, written again after it lost its way, takes it back.
    established(VIP, 30000, 80);
    for &p in &others[..3] {
        established(VIP_ALL, p, 8080);
    }
    fill(over);
    let writer_port = others[4];
    fill(table.buckets_of(&key_to(VIP_ALL, writer_port, 8080)).1);

    let prog = f.dp.program().expect("program");
    let run_repeated = |frame: &[u8], repeat: u32| {
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&f.ifindex.to_ne_bytes());
        let mut o = aya::programs::TestRunOptions::new();
        o.data_in = Some(frame);
        o.ctx_in = Some(&ctx);
        o.repeat = repeat;
        let r = aya::programs::TestRun::test_run(prog, o).expect("test run");
        assert_eq!(r.return_value, XDP_TX);
    };
    let packets = |service: &str, backend: Ipv4Addr| -> u64 {
        let id =
            f.dp.backend_id(service, IpAddr::V4(backend))
                .expect("backend id");
        let map: aya::maps::PerCpuArray<&MapData, lb_common::BackendStats> =
            aya::maps::PerCpuArray::try_from(
                f.dp.map(map_names::BACKEND_STATS).expect("backend stats"),
            )
            .expect("typed");
        map.get(&id, 0)
            .expect("get")
            .iter()
            .map(|s| s.packets)
            .sum()
    };
    // Rounds until the two CPUs met often enough to tell (or a generous time is up: on a
    // loaded machine the threads share a CPU and meet less).
    let (calls, repeat) = (10u32, 10_000u32);
    let (mut sent, mut to_b1, mut written) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    while replaced_known(&f) < 10_000 && started.elapsed() < std::time::Duration::from_secs(10) {
        let before = packets("x", B1);
        let stop = std::sync::atomic::AtomicBool::new(false);
        written += std::thread::scope(|s| {
            // The thread is in this test's namespace (threads inherit it).
            let writer = s.spawn(|| {
                let syn = client_tcp(VIP_ALL, writer_port, 8080, SYN);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    run_repeated(&syn, repeat);
                    n += u64::from(repeat);
                }
                n
            });
            let known = client_tcp(VIP, 30000, 80, ACK);
            for _ in 0..calls {
                run_repeated(&known, repeat);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().expect("writer")
        });
        sent += u64::from(calls) * u64::from(repeat);
        to_b1 += packets("x", B1) - before;
    }
    let replaced = replaced_known(&f);
    assert!(
        written > 0 && replaced > 200,
        "the writer ran ({written} packets) and took the known flow's way ({replaced} times)"
    );
    assert_eq!(
        to_b1,
        sent,
        "{} of {sent} packets of the known flow went to another flow's backend ({written} \
         new-flow packets beside them, the known flow placed again {replaced} times)",
        sent - to_b1
    );
}

/// How often the known flow (service "x") was placed anew: each time, a new flow had
/// taken its way.
fn replaced_known(f: &Fixture) -> u64 {
    let id = f.dp.service_id("x").expect("service id");
    let map: aya::maps::PerCpuArray<&MapData, lb_common::ServiceStats> =
        aya::maps::PerCpuArray::try_from(
            f.dp.map(map_names::SERVICE_STATS).expect("service stats"),
        )
        .expect("typed");
    map.get(&id, 0)
        .expect("get")
        .iter()
        .map(|s| s.new_flows)
        .sum()
}
