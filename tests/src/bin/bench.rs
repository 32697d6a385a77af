//! `cargo xtask bench`: measures l3lb against baselines taken in the same run.
//!
//! Per-packet cost: the real program through `BPF_PROG_TEST_RUN`, one packet per call
//! (`repeat = 1`, because a repeated run feeds the rewritten frame back in), called in a
//! loop on a pinned CPU with `kernel.bpf_stats_enabled` off; the mean of the
//! kernel-reported durations after dropping the first 1 %, the median over rounds, and
//! each path as a ratio to the floor program (MAC swap + `XDP_TX`) measured alike.
//! Control plane: Maglev build times, applying many services, the agent's memory, and
//! how many flows Maglev moves when a backend leaves or joins.
//!
//! Numbers never fail the run: the table says PASS or MISS against each target.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::Xdp;
use l3lb::{
    dataplane::{Dataplane, Desired, DesiredBackend, DesiredService, LoadOptions, ServiceMode},
    maglev,
    testing::{TestNet, add_neighbours, enter_test_namespace, run_xdp},
};
use lb_common::{PROTO_TCP, PROTO_UDP};
use serde_json::{Value, json};

const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const NODE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const BALANCER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

/// Services and backends of the realistic configuration.
const SERVICES: usize = 100;
const BACKENDS_PER_SERVICE: usize = 10;
const TABLE_SIZE: u32 = 16381;

struct Settings {
    quick: bool,
    json: PathBuf,
    calls: usize,
    rounds: usize,
    flows: usize,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut quick = false;
    let mut json = PathBuf::from("target/bench/bench.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => json = PathBuf::from(args.next().context("--json needs a path")?),
            other => bail!("unknown argument {other}; usage: bench [--quick] [--json PATH]"),
        }
    }
    let settings = Settings {
        quick,
        json,
        calls: if quick { 20_000 } else { 200_000 },
        rounds: if quick { 3 } else { 5 },
        flows: if quick { 10_000 } else { 100_000 },
    };
    let stats = StatsOff::new()?;
    pin_to_cpu(0)?;
    let ifindex = enter_test_namespace(&TestNet {
        mac: "02:00:00:00:00:01",
        ipv4: "10.1.0.1/16",
        gateway4: "10.1.255.254",
        ipv6: "fd00:1::1/64",
        gateway6: "fd00:1::fe",
        neighbours: &[],
    })?;
    add_neighbours(
        backend_addrs()
            .into_iter()
            .enumerate()
            .map(|(i, a)| (a.to_string(), mac_of(i)))
            .chain(
                v6_backends()
                    .into_iter()
                    .map(|a| (a.to_string(), mac_of(4000))),
            ),
    )?;

    let started = Instant::now();
    let per_packet = per_packet(&settings, ifindex)?;
    let control = control_plane(&settings)?;
    drop(stats);

    let report = json!({
        "machine": machine(),
        "mode": if settings.quick { "quick" } else { "full" },
        "per_packet": per_packet,
        "control_plane": control,
        "not_measured_yet": ["throughput (live frames through veth, nftables DNAT peer)", "scaling series"],
        "seconds": started.elapsed().as_secs_f64(),
    });
    print_table(&report);
    if let Some(dir) = settings.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&settings.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", settings.json.display()))?;
    println!("\nall figures: {}", settings.json.display());
    Ok(())
}

/// Turns `kernel.bpf_stats_enabled` off for the run (it adds ~100 ns to every test-run
/// duration) and restores it afterwards.
struct StatsOff {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOff {
    fn new() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
        if before.trim() != "0" {
            std::fs::write(BPF_STATS, "0").context("turning bpf_stats_enabled off")?;
        }
        Ok(Self { before })
    }
}

impl Drop for StatsOff {
    fn drop(&mut self) {
        if self.before.trim() != "0" {
            let _ = std::fs::write(BPF_STATS, self.before.trim());
        }
    }
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("pinning to a CPU");
        }
    }
    Ok(())
}

fn machine() -> Value {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
    })
}

fn backend_addrs() -> Vec<Ipv4Addr> {
    (0..SERVICES * BACKENDS_PER_SERVICE)
        .map(|i| Ipv4Addr::new(10, 1, 1 + (i / 250) as u8, 1 + (i % 250) as u8))
        .collect()
}

fn mac_of(i: usize) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, 1 + (i % 250) as u8)
}

fn v6_backends() -> Vec<Ipv6Addr> {
    (0..BACKENDS_PER_SERVICE)
        .map(|i| Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 1, i as u16 + 1))
        .collect()
}

fn vip6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10)
}

/// 100 IPv4 services with 10 backends each (even ones TCP, odd ones UDP), and one IPv6
/// service with 10 backends: the realistic configuration every path runs against.
fn desired() -> Desired {
    let addrs = backend_addrs();
    let mut services: Vec<DesiredService> = (0..SERVICES)
        .map(|i| DesiredService {
            name: format!("svc{i}"),
            vips: vec![(
                IpAddr::V4(vip(i)),
                if i % 2 == 0 { 80 } else { 53 },
                if i % 2 == 0 { PROTO_TCP } else { PROTO_UDP },
            )],
            mode: ServiceMode {
                l2: false,
                affinity_client_ip: false,
            },
            backends: addrs[i * BACKENDS_PER_SERVICE..(i + 1) * BACKENDS_PER_SERVICE]
                .iter()
                .map(|&a| DesiredBackend {
                    address: IpAddr::V4(a),
                    weight: 1,
                    local: false,
                })
                .collect(),
            source_ranges: vec![],
        })
        .collect();
    services.push(DesiredService {
        name: "v6".into(),
        vips: vec![(IpAddr::V6(vip6()), 80, PROTO_TCP)],
        mode: ServiceMode {
            l2: false,
            affinity_client_ip: false,
        },
        backends: v6_backends()
            .into_iter()
            .map(|a| DesiredBackend {
                address: IpAddr::V6(a),
                weight: 1,
                local: false,
            })
            .collect(),
        source_ranges: vec![],
    });
    Desired {
        services,
        decap_v4: vec![(BALANCER, 32)],
        local_v4: vec![NODE],
        decap_v6: vec![],
        local_v6: vec![NODE6],
    }
}

fn load(decap: bool, flows: usize) -> Result<Dataplane> {
    let opts = LoadOptions {
        ring_size: TABLE_SIZE,
        max_services: 128,
        max_backends: 2048,
        conntrack_size: (flows * 2) as u32,
        encap_src_v4: NODE,
        encap_src_v6: NODE6,
        decap,
    };
    let mut dp = Dataplane::load(&opts).context("loading l3lb")?;
    dp.apply(&desired()).context("applying the bench config")?;
    Ok(dp)
}

// ---- frames ----

fn csum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let tot = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&h);
    h[10..12].copy_from_slice(&c);
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t.extend_from_slice(&[0u8; 6]);
    t
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&18u16.to_be_bytes());
    u.extend_from_slice(&[0u8; 10]);
    u
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

// ---- per-packet cost ----

/// Mean ns/packet over `calls` single runs, first 1 % dropped.
fn mean_ns(prog: &Xdp, ifindex: u32, frame: &[u8], calls: usize) -> Result<f64> {
    let skip = calls / 100;
    let mut total = 0u128;
    for i in 0..calls {
        let r = run_xdp(prog, ifindex, frame)?;
        if i >= skip {
            total += r.duration.as_nanos();
        }
    }
    Ok(total as f64 / (calls - skip) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Path {
    name: &'static str,
    frame: Vec<u8>,
    expect: u32,
    target_ratio: f64,
}

fn per_packet(s: &Settings, ifindex: u32) -> Result<Value> {
    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    let dp = load(false, s.flows)?;
    let decap = load(true, 16)?;
    let mut floor_obj = aya::Ebpf::load(l3lb::dataplane::OBJECT).context("loading the floor")?;
    let floor: &mut Xdp = floor_obj
        .program_mut(lb_common::FLOOR_PROGRAM_NAME)
        .context("floor program")?
        .try_into()?;
    floor.load().context("verifying the floor")?;
    let floor: &Xdp = floor;
    let prog = dp.program()?;

    // Fill the connection table: SYNs from many clients spread over the services.
    for i in 0..s.flows {
        let svc = (i % (SERVICES / 2)) * 2;
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
        let f = eth(
            0x0800,
            &ipv4(
                client,
                vip(svc),
                PROTO_TCP,
                &tcp(1024 + (i % 50000) as u16, 80, SYN),
            ),
        );
        run_xdp(prog, ifindex, &f)?;
    }
    let v6_syn = eth(
        0x86dd,
        &ipv6(CLIENT6, vip6(), PROTO_TCP, &tcp(40000, 80, SYN)),
    );
    run_xdp(prog, ifindex, &v6_syn)?;
    let est = eth(
        0x0800,
        &ipv4(CLIENT, vip(0), PROTO_TCP, &tcp(40000, 80, ACK)),
    );
    run_xdp(
        prog,
        ifindex,
        &eth(
            0x0800,
            &ipv4(CLIENT, vip(0), PROTO_TCP, &tcp(40000, 80, SYN)),
        ),
    )?;
    let mut inner = ipv4(CLIENT, vip(0), PROTO_TCP, &tcp(40000, 80, ACK));
    inner[6] = 0x40;
    let decap_frame = eth(0x0800, &ipv4(BALANCER, NODE, 4, &inner));

    let paths = [
        Path {
            name: "non_vip_pass",
            frame: eth(
                0x0800,
                &ipv4(
                    CLIENT,
                    Ipv4Addr::new(192, 0, 2, 99),
                    PROTO_TCP,
                    &tcp(1, 80, ACK),
                ),
            ),
            expect: XDP_PASS,
            target_ratio: 1.5,
        },
        Path {
            name: "tcp_new_flow_syn",
            frame: eth(
                0x0800,
                &ipv4(CLIENT, vip(2), PROTO_TCP, &tcp(40001, 80, SYN)),
            ),
            expect: XDP_TX,
            target_ratio: 6.0,
        },
        Path {
            name: "tcp_established",
            frame: est,
            expect: XDP_TX,
            target_ratio: 4.0,
        },
        Path {
            name: "udp",
            frame: eth(0x0800, &ipv4(CLIENT, vip(1), PROTO_UDP, &udp(5353, 53))),
            expect: XDP_TX,
            target_ratio: 4.0,
        },
        Path {
            name: "ipv6_tcp_established",
            frame: eth(
                0x86dd,
                &ipv6(CLIENT6, vip6(), PROTO_TCP, &tcp(40000, 80, ACK)),
            ),
            expect: XDP_TX,
            target_ratio: 5.0,
        },
        Path {
            name: "decap",
            frame: decap_frame,
            expect: XDP_PASS,
            target_ratio: 3.0,
        },
    ];
    for p in &paths {
        let which = if p.name == "decap" {
            decap.program()?
        } else {
            prog
        };
        let r = run_xdp(which, ifindex, &p.frame)?;
        if r.verdict != p.expect {
            bail!(
                "path {} returned verdict {} instead of {}: the bench would measure the wrong path",
                p.name,
                r.verdict,
                p.expect
            );
        }
    }
    let floor_frame = eth(
        0x0800,
        &ipv4(CLIENT, vip(0), PROTO_TCP, &tcp(40000, 80, ACK)),
    );

    let mut floor_rounds = Vec::new();
    let mut path_rounds: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..s.rounds {
        // Interleave so drift on a noisy machine affects floor and paths alike.
        floor_rounds.push(mean_ns(floor, ifindex, &floor_frame, s.calls)?);
        for (i, p) in paths.iter().enumerate() {
            let which = if p.name == "decap" {
                decap.program()?
            } else {
                prog
            };
            path_rounds[i].push(mean_ns(which, ifindex, &p.frame, s.calls)?);
        }
    }
    let floor_ns = median(floor_rounds.clone());
    let mut out = serde_json::Map::new();
    out.insert("calls_per_round".into(), json!(s.calls));
    out.insert("rounds".into(), json!(s.rounds));
    out.insert("connection_table_entries".into(), json!(s.flows));
    out.insert("services".into(), json!(SERVICES + 1));
    out.insert(
        "backends".into(),
        json!((SERVICES + 1) * BACKENDS_PER_SERVICE),
    );
    out.insert(
        "floor_ns".into(),
        json!({ "median": floor_ns, "rounds": floor_rounds }),
    );
    for (p, rounds) in paths.iter().zip(path_rounds) {
        let ns = median(rounds.clone());
        out.insert(
            p.name.into(),
            json!({ "median_ns": ns, "rounds": rounds, "ratio_to_floor": ns / floor_ns, "target_ratio": p.target_ratio }),
        );
    }
    out.insert(
        "verifier_instructions".into(),
        json!(dp.verified_instructions()?),
    );
    Ok(Value::Object(out))
}

// ---- control plane ----

fn control_plane(s: &Settings) -> Result<Value> {
    let mut builds = Vec::new();
    for size in [16381u32, 65537] {
        for n in [10usize, 100, 1000] {
            let backends: Vec<(IpAddr, u32)> = (0..n)
                .map(|i| {
                    (
                        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32)),
                        1 + (i % 3) as u32,
                    )
                })
                .collect();
            let mut times = Vec::new();
            for _ in 0..if s.quick { 3 } else { 7 } {
                let t = Instant::now();
                maglev::build(&backends, size)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            builds.push(json!({ "table_size": size, "backends": n, "ms": median(times), "target_ms": 100.0 }));
        }
    }

    let mut moves = Vec::new();
    for n in [10usize, 100] {
        let all: Vec<(IpAddr, u32)> = (0..=n)
            .map(|i| (IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32)), 1))
            .collect();
        let owner = |set: &[(IpAddr, u32)]| -> Result<Vec<IpAddr>> {
            Ok(maglev::build(set, 65537)?
                .into_iter()
                .map(|p| set[p as usize].0)
                .collect())
        };
        let base = owner(&all[..n])?;
        let removed = owner(&all[1..n])?;
        let added = owner(&all[..=n])?;
        let frac = |a: &[IpAddr], b: &[IpAddr]| {
            a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
        };
        moves.push(json!({
            "backends": n,
            "moved_on_remove": frac(&base, &removed),
            "moved_on_add": frac(&base, &added),
            "ideal": 1.0 / n as f64,
        }));
    }

    let mut applies = Vec::new();
    for n in if s.quick {
        vec![1000usize]
    } else {
        vec![1000usize, 10000]
    } {
        let opts = LoadOptions {
            ring_size: 1021,
            max_services: n as u32,
            max_backends: (n * 4) as u32,
            conntrack_size: 1024,
            encap_src_v4: NODE,
            encap_src_v6: NODE6,
            decap: false,
        };
        let mut dp = Dataplane::load(&opts)?;
        let desired = Desired {
            services: (0..n)
                .map(|i| DesiredService {
                    name: format!("s{i}"),
                    vips: vec![(
                        IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i as u32)),
                        80,
                        PROTO_TCP,
                    )],
                    mode: ServiceMode {
                        l2: false,
                        affinity_client_ip: false,
                    },
                    backends: (0..4)
                        .map(|b| DesiredBackend {
                            address: IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + (i * 4 + b) as u32)),
                            weight: 1,
                            local: false,
                        })
                        .collect(),
                    source_ranges: vec![],
                })
                .collect(),
            ..Desired::default()
        };
        let t = Instant::now();
        dp.apply(&desired)?;
        applies.push(json!({ "services": n, "backends_per_service": 4, "table_size": 1021, "seconds": t.elapsed().as_secs_f64() }));
    }

    let rss = agent_rss(if s.quick { 1000 } else { 10000 })?;
    Ok(json!({ "maglev_build": builds, "maglev_moves": moves, "apply": applies, "agent_rss": rss }))
}

/// Starts `l3lb run` with `services` services in this namespace and reads its resident
/// memory once it is ready.
fn agent_rss(services: usize) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("l3lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cfg = format!(
        "interface: fx0\nxdp_mode: generic\npin_path: /sys/fs/bpf/l3lb-bench-{}\nmaglev_table_size: 1021\nmax_services: {services}\nmax_backends: {}\nservices:\n",
        std::process::id(),
        services * 2
    );
    for i in 0..services {
        let v = Ipv4Addr::from(0x0a64_0000 + i as u32);
        let b = Ipv4Addr::from(0x0a01_0000 + (i * 2) as u32);
        let b2 = Ipv4Addr::from(0x0a01_0000 + (i * 2 + 1) as u32);
        let _ = write!(
            cfg,
            "  - name: s{i}\n    vip: {v}\n    ports: [80]\n    backends:\n      - address: {b}\n      - address: {b2}\n"
        );
    }
    let path = dir.join("agent.yaml");
    std::fs::write(&path, cfg)?;
    let log = dir.join("agent.log");
    let bin = l3lb_tests::l3lb_bin()?;
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting l3lb run")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let rss = loop {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("l3lb ready")
        {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
            let kb: u64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .context("VmRSS")?;
            break kb;
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "l3lb run exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("l3lb run not ready after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({ "services": services, "rss_mib": rss as f64 / 1024.0, "target_mib": 256.0 }))
}

// ---- output ----

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn print_table(r: &Value) {
    let pp = &r["per_packet"];
    let floor = pp["floor_ns"]["median"].as_f64().unwrap_or(0.0);
    println!(
        "l3lb bench ({}), {} on {}",
        r["mode"].as_str().unwrap_or(""),
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["kernel"].as_str().unwrap_or("?")
    );
    println!(
        "\nPER-PACKET COST  ({} services, {} backends, {} connection-table entries; BPF_PROG_TEST_RUN, repeat=1, {} calls x {} rounds, median)",
        pp["services"],
        pp["backends"],
        pp["connection_table_entries"],
        pp["calls_per_round"],
        pp["rounds"]
    );
    println!(
        "  {:<24} {:>9} {:>9} {:>8}  ",
        "PATH", "NS/PKT", "x FLOOR", "TARGET"
    );
    println!(
        "  {:<24} {:>9.1} {:>9} {:>8}",
        "floor (MAC swap, TX)", floor, "1.00", ""
    );
    for name in [
        "non_vip_pass",
        "tcp_new_flow_syn",
        "tcp_established",
        "udp",
        "ipv6_tcp_established",
        "decap",
    ] {
        let p = &pp[name];
        let ratio = p["ratio_to_floor"].as_f64().unwrap_or(f64::NAN);
        let target = p["target_ratio"].as_f64().unwrap_or(0.0);
        println!(
            "  {:<24} {:>9.1} {:>9.2} {:>7.1}x  {}",
            name,
            p["median_ns"].as_f64().unwrap_or(f64::NAN),
            ratio,
            target,
            verdict(ratio <= target)
        );
    }
    println!(
        "  verifier-processed instructions: {}",
        pp["verifier_instructions"]
    );
    let cp = &r["control_plane"];
    println!("\nMAGLEV BUILD");
    for b in cp["maglev_build"].as_array().into_iter().flatten() {
        let ms = b["ms"].as_f64().unwrap_or(f64::NAN);
        let target = b["target_ms"].as_f64().unwrap_or(0.0);
        println!(
            "  table {:>6}, {:>5} backends: {:>8.2} ms  (target ≤ {target} ms) {}",
            b["table_size"],
            b["backends"],
            ms,
            verdict(ms <= target)
        );
    }
    println!("\nFLOWS MOVED BY ONE BACKEND CHANGE (table 65537)");
    for m in cp["maglev_moves"].as_array().into_iter().flatten() {
        let ideal = m["ideal"].as_f64().unwrap_or(0.0);
        let rm = m["moved_on_remove"].as_f64().unwrap_or(1.0);
        let add = m["moved_on_add"].as_f64().unwrap_or(1.0);
        println!(
            "  {:>4} backends: remove {:.2} %, add {:.2} %  (ideal {:.2} %, target ≤ 1.5x) {}",
            m["backends"],
            rm * 100.0,
            add * 100.0,
            ideal * 100.0,
            verdict(rm <= 1.5 * ideal && add <= 1.5 * ideal)
        );
    }
    println!("\nAPPLY FROM CONFIG");
    for a in cp["apply"].as_array().into_iter().flatten() {
        let secs = a["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:>6} services: {:.2} s  (target ≤ 10 s) {}",
            a["services"],
            secs,
            verdict(secs <= 10.0)
        );
    }
    let rss = &cp["agent_rss"];
    let mib = rss["rss_mib"].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nAGENT MEMORY\n  {} services: {:.1} MiB resident  (target ≤ 256 MiB) {}",
        rss["services"],
        mib,
        verdict(mib <= 256.0)
    );
    println!(
        "\nNOT MEASURED YET: throughput through veth with live frames (and the nftables DNAT peer), scaling series"
    );
}
