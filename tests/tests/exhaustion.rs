//! Connection-table exhaustion (issue 7 item 4): a SYN flood from random sources, as fast
//! as the client namespace can send it, against a balancer whose connection table holds
//! 4096 entries, so new flows arrive at many times its capacity every second. Needs root.
//!
//! The flood lasts `L3LB_FLOOD_SECONDS` seconds (default 8, what CI runs).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use l3lb::flowtable::FlowTable;
use l3lb_tests::{
    Netns, TcpPersistent, client,
    flood::{FloodSpec, SynFlood},
    scenario::{Mode, Scenario, ScenarioSpec, TCP_PORT, VIP, status_of, vip_flow_key},
};
use lb_common::{FLOW_F_CONFIRMED, FlowKey, map_names};

const T: Duration = Duration::from_secs(2);

/// How long an echo on an established connection may take during and after the flood.
/// The lab's veths lose frames under the flood and TCP then waits for its retransmission
/// timer (seconds); what this test is about is a connection sent to another backend,
/// which answers with a reset at once, so a generous wait loses nothing.
const ECHO_WAIT: Duration = Duration::from_secs(15);
/// The balancer's connection-table size.
const CONNTRACK: u32 = 4096;
/// Persistent connections established before the flood: the even ones busy (an echo
/// every 100 ms), the odd ones mostly idle (an echo every 2 s).
const PERSISTENT: u16 = 30;
/// Echo rounds between two echoes of an idle connection.
const IDLE_ROUNDS: u32 = 20;
/// Flood length unless `L3LB_FLOOD_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 8;
/// How long the agent may take to answer (status, a reload) during the flood.
const RESPONSIVE: Duration = Duration::from_secs(5);
/// Resident memory the agent may gain during the flood.
const RSS_GROWTH: u64 = 16 << 20;

fn flood_length() -> Duration {
    let secs = std::env::var("L3LB_FLOOD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs(secs)
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// A new connection of the legitimate client during the flood.
struct Attempt {
    latency: Duration,
    ok: bool,
}

/// Opens new connections to `target` from `ns`, one after another, for `how_long`, each
/// from the next port of `next_port`; returns the thread that does it.
fn connect_for(
    ns: &Netns,
    target: SocketAddr,
    next_port: &Arc<AtomicU16>,
    how_long: Duration,
) -> JoinHandle<Vec<Attempt>> {
    let next_port = next_port.clone();
    ns.spawn_thread("legitimate", move || {
        let mut out = Vec::new();
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            let port = next_port.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let ok = client::tcp_request_here(target, Some(port), Duration::from_secs(3)).is_ok();
            out.push(Attempt {
                latency: start.elapsed(),
                ok,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
    .expect("legitimate client")
}

/// Median, 99th percentile and maximum of `v` (sorted in place).
fn spread(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    if v.is_empty() {
        return Default::default();
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

#[test]
fn a_syn_flood_beyond_the_connection_table_keeps_established_connections_and_the_agent() {
    let length = flood_length();
    let mut s = Scenario::start_spec(ScenarioSpec::new(Mode::Ipip, 3).conntrack_size(CONNTRACK))
        .expect("scenario");
    let client_ip = s.lab.client.ipv4;
    let agent = s.balancer.pid();

    let mut persistent: Vec<(String, TcpPersistent)> = (0..PERSISTENT)
        .map(|i| {
            let c = client::tcp_connect_persistent(
                &s.lab.client.ns,
                s.vip(),
                TCP_PORT,
                Some(31000 + i),
                T,
            )
            .expect("persistent connection");
            (c.reply().expect("greeting").backend, c)
        })
        .collect();
    let keys: Vec<FlowKey> = persistent
        .iter()
        .map(|(_, c)| vip_flow_key(client_ip, c.local_addr().port()))
        .collect();
    let flows_pin = s
        .lab
        .pin_path("balancer-0")
        .join("v1/maps")
        .join(map_names::FLOWS);
    let flows = FlowTable::from_pin(&flows_pin).expect("pinned connection table");
    assert_eq!(flows.capacity(), u64::from(CONNTRACK));
    let in_table = |k: &FlowKey| flows.get(k).expect("connection-table lookup");
    for k in &keys {
        let e = in_table(k).expect("a persistent flow is in the table");
        assert_eq!(
            e.flags & FLOW_F_CONFIRMED,
            FLOW_F_CONFIRMED,
            "its packets after the SYN confirmed it"
        );
    }

    // New connections of a legitimate client, before and during the flood.
    let target = SocketAddr::new(s.vip(), TCP_PORT);
    let next_port = Arc::new(AtomicU16::new(45000));
    let quiet = connect_for(&s.lab.client.ns, target, &next_port, Duration::from_secs(2))
        .join()
        .expect("legitimate client");
    let rss_before = rss(agent);
    let counters_before = s.service_counters(TCP_PORT).expect("counters");

    // First half: SYNs alone. Second half: each SYN followed by an ACK of its flow.
    let (client_mac, balancer_mac) = (s.lab.client.mac, s.lab.balancers[0].mac);
    let spec = move |ack_after_syn| FloodSpec {
        interface: "eth0",
        src_mac: client_mac,
        dst_mac: balancer_mac,
        target: SocketAddrV4::new(VIP, TCP_PORT),
        sources: Ipv4Addr::new(198, 18, 0, 0),
        source_count: 1 << 17,
        rate: None,
        seed: 0x5359_4e46_4c4f_4f44,
        ack_after_syn,
    };
    let mut flood = Some(SynFlood::start(&s.lab.client.ns, spec(false)).expect("flood"));
    let config_path = s.config_path().to_owned();
    let mut reports = Vec::new();
    let flood_start = Instant::now();
    let legitimate = connect_for(&s.lab.client.ns, target, &next_port, length);

    let stop = AtomicBool::new(false);
    let cuts: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut evicted = [vec![false; keys.len()], vec![false; keys.len()]];
    let mut status_times = Vec::new();
    let mut max_flows = 0u64;
    let mut max_rss = rss_before;
    let mut reload_times = Vec::new();
    persistent = std::thread::scope(|scope| {
        // A busy connection's entry is marked seen in every half-second epoch; an idle
        // one's may be pushed out by the flood, and its next packet must find the same
        // backend through Maglev.
        let echo = scope.spawn(|| {
            let mut persistent = persistent;
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for (i, (backend, c)) in persistent.iter_mut().enumerate() {
                    if i % 2 == 1 && !round.is_multiple_of(IDLE_ROUNDS) {
                        continue;
                    }
                    if let Err(e) = c.echo(b"through the flood\n", ECHO_WAIT) {
                        cuts.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(format!("{backend}: {e:#}"));
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            persistent
        });
        let mut next_status = Instant::now();
        let mut phase = 0;
        while flood_start.elapsed() < length {
            let elapsed = flood_start.elapsed();
            if phase == 0 && elapsed >= length / 2 {
                if let Some(f) = flood.take() {
                    reports.push(f.stop().expect("flood"));
                }
                flood = Some(SynFlood::start(&s.lab.client.ns, spec(true)).expect("flood"));
                phase = 1;
            }
            // Which persistent flows the flood pushed out of the table.
            for (k, seen) in keys.iter().zip(&mut evicted[phase]) {
                if in_table(k).is_none() {
                    *seen = true;
                }
            }
            if Instant::now() >= next_status {
                let asked = Instant::now();
                let status = status_of(&s.lab, "balancer-0").expect("l3lb status");
                status_times.push(asked.elapsed());
                max_flows = max_flows.max(status.flows);
                max_rss = max_rss.max(rss(agent));
                next_status = Instant::now() + Duration::from_secs(1);
            }
            // One reload in each half, of the same config: the agent must apply it
            // (nothing changes, so no flow moves) while the flood goes on.
            if elapsed >= length * (1 + 2 * reload_times.len() as u32) / 4 {
                let config = std::fs::read_to_string(&config_path).expect("config");
                let asked = Instant::now();
                std::fs::write(&config_path, config).expect("config");
                s.balancer.signal(libc::SIGHUP).expect("SIGHUP");
                s.balancer
                    .wait_for_log_count("applied config", 2 + reload_times.len(), RESPONSIVE)
                    .expect("reload applied during the flood");
                reload_times.push(asked.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        echo.join().expect("echo thread")
    });
    if let Some(f) = flood.take() {
        reports.push(f.stop().expect("flood"));
    }
    let during = legitimate.join().expect("legitimate client");
    let counters_after = s.service_counters(TCP_PORT).expect("counters");
    let new_flows = counters_after.new_flows - counters_before.new_flows;
    let flood_seconds: f64 = reports.iter().map(|r| r.seconds).sum();

    // After the flood every established connection still echoes: on its first backend,
    // since any other would answer with a reset.
    for (backend, c) in &mut persistent {
        c.echo(b"after the flood\n", ECHO_WAIT)
            .unwrap_or_else(|e| panic!("connection to {backend} after the flood: {e:#}"));
    }
    let after = connect_for(&s.lab.client.ns, target, &next_port, Duration::from_secs(2))
        .join()
        .expect("legitimate client");

    let describe = |name: &str, attempts: &[Attempt]| {
        let ok = attempts.iter().filter(|a| a.ok).count();
        let mut lat: Vec<Duration> = attempts
            .iter()
            .filter(|a| a.ok)
            .map(|a| a.latency)
            .collect();
        let (median, p99, max) = spread(&mut lat);
        println!(
            "{name}: {ok} of {} new connections answered ({:.1} %), latency median {median:.2?}, \
             p99 {p99:.2?}, max {max:.2?}",
            attempts.len(),
            ok as f64 * 100.0 / attempts.len().max(1) as f64
        );
    };
    let (status_median, _, status_max) = spread(&mut status_times);
    let cuts = cuts.into_inner().unwrap_or_else(PoisonError::into_inner);
    let busy = |phase: usize| evicted[phase].iter().step_by(2).filter(|e| **e).count();
    let idle = |phase: usize| {
        evicted[phase]
            .iter()
            .skip(1)
            .step_by(2)
            .filter(|e| **e)
            .count()
    };
    for (phase, r) in ["SYN", "SYN then ACK"].iter().zip(&reports) {
        println!(
            "flood ({phase}): {} frames in {:.1} s ({:.0}/s)",
            r.frames,
            r.seconds,
            r.rate()
        );
    }
    println!(
        "the balancer counted {new_flows} new flows ({:.0}/s, {:.1}× the {CONNTRACK}-entry table \
         per second)",
        new_flows as f64 / flood_seconds,
        new_flows as f64 / flood_seconds / f64::from(CONNTRACK)
    );
    println!(
        "established: {PERSISTENT} connections, {} echo failures; seen evicted from the table \
         during SYNs: {} of {} busy, {} of {} idle; during SYN then ACK: {} busy, {} idle",
        cuts.len(),
        busy(0),
        PERSISTENT.div_ceil(2),
        idle(0),
        PERSISTENT / 2,
        busy(1),
        idle(1)
    );
    println!(
        "agent: RSS {:.1} MiB before, at most {:.1} MiB during; l3lb status median \
         {status_median:.2?}, max {status_max:.2?}, at most {max_flows} flows; reloads applied \
         in {reload_times:.2?}",
        rss_before as f64 / f64::from(1 << 20),
        max_rss as f64 / f64::from(1 << 20),
    );
    let status = s.status().expect("status");
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| -> Vec<String> {
        m.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect()
    };
    println!(
        "balancer outcomes: {:?}; drops: {:?}",
        nonzero(&status.actions),
        nonzero(&status.drops)
    );
    describe("before the flood", &quiet);
    describe("during the flood", &during);
    describe("after the flood", &after);

    assert!(
        new_flows as f64 >= 2.0 * f64::from(CONNTRACK) * flood_seconds,
        "the flood reached only {new_flows} new flows in {flood_seconds:.1} s: not twice the table \
         per second"
    );
    // SYNs alone never touch their entry again, so it stays unconfirmed, and a new flow
    // evicts its bucket's unconfirmed entries before any confirmed one: the flood
    // recycles its own entries. Flows that answer (the ACKs) are confirmed and compete
    // with established ones by age, and idle established ones (seen seconds ago) are
    // pushed out.
    assert!(
        idle(1) > 0,
        "no idle established flow was evicted by SYN then ACK: the fallback to Maglev was \
         not exercised"
    );
    assert!(
        cuts.is_empty(),
        "established connections failed during the flood: {:?}",
        &cuts[..cuts.len().min(5)]
    );
    assert!(
        max_flows <= u64::from(CONNTRACK),
        "l3lb status counted {max_flows} flows in a {CONNTRACK}-entry table"
    );
    assert!(
        status_max <= RESPONSIVE,
        "l3lb status took {status_max:?} during the flood"
    );
    assert_eq!(reload_times.len(), 2, "a reload in each half of the flood");
    assert!(
        reload_times.iter().all(|t| *t <= RESPONSIVE),
        "reloads during the flood: {reload_times:?}"
    );
    assert!(
        max_rss <= rss_before + RSS_GROWTH,
        "the agent grew from {rss_before} to {max_rss} bytes resident during the flood"
    );
}
