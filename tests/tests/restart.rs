//! Hitless restarts and upgrades: the agent exits leaving the data plane on its pins, and
//! the next agent takes over the connection table and switches the pinned XDP link to its
//! own program in one step. Real TCP and UDP traffic flows through the VIP throughout.
//! Needs root.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use l3lb_tests::{
    Lab, LabSpec, Netns, TcpPersistent,
    bulk::Pattern,
    client,
    scenario::{
        Mode, Scenario, TCP_PORT, UDP_PORT, balancer_config_for, maglev_backend, restart_agent,
    },
};
use lb_common::{FlowKey, FlowState, map_names};

const T: Duration = Duration::from_secs(2);

/// The XDP program attached to the balancer's eth0: (id, translated size in bytes).
fn attached_program(s: &Scenario) -> (u32, u64) {
    let link = s.lab.balancers[0]
        .run(["ip", "link", "show", "eth0"])
        .expect("ip link");
    let id: u32 = link
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program on the balancer's eth0: {link}"));
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()
        .expect("bpftool");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let xlated = info["bytes_xlated"].as_u64().expect("bytes_xlated");
    (id, xlated)
}

/// A steady UDP flow from one socket: a numbered datagram every 2 ms until `stop`; returns
/// (sent, sequence numbers answered, backends that answered).
fn udp_flow(
    ns: &Netns,
    vip: IpAddr,
    stop: &AtomicBool,
) -> Result<(u64, BTreeSet<u64>, BTreeSet<String>)> {
    ns.enter(|| -> Result<_> {
        let socket = UdpSocket::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))?;
        socket.connect(SocketAddr::new(vip, UDP_PORT))?;
        socket.set_read_timeout(Some(Duration::from_millis(1)))?;
        let mut sent = 0u64;
        let mut answered = BTreeSet::new();
        let mut backends = BTreeSet::new();
        let mut buf = [0u8; 2048];
        let mut drain = |answered: &mut BTreeSet<u64>, backends: &mut BTreeSet<String>| {
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut lines = text.lines();
                if let (Some(reply), Some(seq)) = (lines.next(), lines.next())
                    && let (Ok(r), Some(Ok(seq))) = (
                        client::parse_reply(reply),
                        seq.strip_prefix("seq ").map(str::parse::<u64>),
                    )
                {
                    answered.insert(seq);
                    backends.insert(r.backend);
                }
            }
        };
        while !stop.load(Ordering::Relaxed) {
            socket.send(format!("seq {sent}\n").as_bytes())?;
            sent += 1;
            let next = Instant::now() + Duration::from_millis(2);
            while Instant::now() < next {
                drain(&mut answered, &mut backends);
            }
        }
        // Late answers.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            drain(&mut answered, &mut backends);
        }
        Ok((sent, answered, backends))
    })?
}

/// One TCP connection echoing 1 KiB of a pseudo-random stream every 5 ms until `stop`:
/// any reset, loss or corruption fails the echo. Returns the bytes echoed and the
/// connection (still open).
fn tcp_stream(mut conn: TcpPersistent, stop: &AtomicBool) -> Result<(u64, TcpPersistent)> {
    let mut pattern = Pattern::new(0x5eed);
    let mut bytes = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let chunk = pattern.take(1024);
        conn.echo(&chunk, Duration::from_secs(3))
            .with_context(|| format!("after {bytes} bytes echoed intact"))?;
        bytes += chunk.len() as u64;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((bytes, conn))
}

fn append_to_config(s: &Scenario, extra: &str) {
    let path = s.config_path();
    let mut text = std::fs::read_to_string(path).expect("config");
    text.push_str(extra);
    std::fs::write(path, text).expect("config");
}

#[test]
fn five_restarts_one_with_a_changed_program_keep_tcp_and_udp_flowing() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    let vip = s.vip();
    let conn = client::tcp_connect_persistent(&s.lab.client.ns, vip, TCP_PORT, None, T)
        .expect("TCP connection through the VIP");
    let stop = AtomicBool::new(false);
    let mut programs = vec![attached_program(&s)];
    let mut logs = Vec::new();

    let (tcp, udp) = std::thread::scope(|scope| {
        let tcp = scope.spawn(|| tcp_stream(conn, &stop));
        let udp = scope.spawn(|| udp_flow(&s.lab.client.ns, vip, &stop));
        std::thread::sleep(Duration::from_millis(500));
        for round in 1..=5 {
            match round {
                // A changed program: the decap role compiled in (the verifier keeps code
                // it pruned before), checked below by its translated size.
                2 => append_to_config(&s, "decap:\n  allow: [192.0.2.0/24]\n"),
                // A changed map size: the connection table is migrated, not reset.
                4 => append_to_config(&s, "conntrack_size: 131072\n"),
                _ => {}
            }
            let log = format!("balancer-0-restart-{round}.log");
            let config = s.config_path().to_path_buf();
            let (lab, balancer) = (&s.lab, &mut s.balancer);
            restart_agent(lab, &lab.balancers[0].ns, balancer, &config, &log)
                .unwrap_or_else(|e| panic!("restart {round}: {e:#}"));
            logs.push(s.balancer.log());
            programs.push(attached_program(&s));
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        (
            tcp.join().expect("tcp thread"),
            udp.join().expect("udp thread"),
        )
    });

    let (bytes, mut conn) = tcp.expect("the TCP stream survived every restart intact");
    assert!(bytes > 100 * 1024, "the stream carried data: {bytes} bytes");
    let (sent, answered, backends) = udp.expect("UDP flow");
    let lost: Vec<u64> = (0..sent).filter(|q| !answered.contains(q)).collect();
    // The program stays attached throughout and the flow keeps its backend, so nothing
    // is lost; the expectation is exact.
    assert!(
        lost.is_empty(),
        "{} of {sent} datagrams unanswered (first: {:?})",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        backends.len(),
        1,
        "the UDP flow stayed on one backend: {backends:?}"
    );

    // Every restart replaced the program (a new id on the same attachment); the second
    // replaced it with a different one.
    let ids: BTreeSet<u32> = programs.iter().map(|p| p.0).collect();
    assert_eq!(ids.len(), 6, "a new program at every restart: {programs:?}");
    assert_ne!(
        programs[1].1, programs[2].1,
        "restart 2 changed the program: {programs:?}"
    );
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.contains("mode=\"kept\""),
            "restart {}: link switched in place\n{log}",
            i + 1
        );
        assert!(
            log.contains("taking over the state"),
            "restart {}: state taken over\n{log}",
            i + 1
        );
    }
    assert!(
        logs[3].contains("migrated to the new size") && logs[3].contains("L3LB_FLOWS"),
        "restart 4 migrated the connection table:\n{}",
        logs[3]
    );
    let counters = s.service_counters(UDP_PORT).expect("counters");
    assert!(
        counters.packets >= sent,
        "service counters carried across restarts: {} packets for {sent} sent",
        counters.packets
    );

    // A pinned connection table of another layout is refused with a message, and the
    // running data plane is left alone.
    let status = s.balancer.stop().expect("stop");
    assert!(status.success(), "{status:?}");
    let flows = s.lab.pin_path("balancer-0").join("v1/maps/L3LB_FLOWS");
    std::fs::remove_file(&flows).expect("unpin");
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&flows)
        .args([
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "1024",
            "name",
            "L3LB_FLOWS",
        ])
        .status()
        .expect("bpftool");
    assert!(made.success(), "bpftool map create");
    let refused = std::process::Command::new("ip")
        .args(["netns", "exec", s.lab.balancers[0].ns.name()])
        .arg(l3lb_tests::l3lb_bin().expect("bin"))
        .args(["run", "--config"])
        .arg(s.config_path())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "refused: {err}");
    assert!(
        err.contains("L3LB_FLOWS")
            && err.contains("cannot be carried over")
            && err.contains("l3lb down"),
        "says which map, why and what to do: {err}"
    );
    conn.echo(b"still here\n", T)
        .expect("the running program kept forwarding after the refused start");
}

#[test]
fn an_upgrade_from_the_lru_connection_table_keeps_established_connections() {
    const CONNS: u16 = 16;
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    let client_ip = s.lab.client.ipv4;
    let mut conns: Vec<(String, TcpPersistent)> = (0..CONNS)
        .map(|i| {
            let c = client::tcp_connect_persistent(
                &s.lab.client.ns,
                s.vip(),
                TCP_PORT,
                Some(33000 + i),
                T,
            )
            .expect("persistent connection");
            (c.reply().expect("greeting").backend, c)
        })
        .collect();
    let status = s.balancer.stop().expect("stop");
    assert!(status.success(), "{status:?}");

    // What the previous release left: its connection table, an LRU hash of FlowKey →
    // FlowState, holding these flows (the running program keeps its own table; the
    // upgrade reads the pin).
    let flows = s
        .lab
        .pin_path("balancer-0")
        .join("v1/maps")
        .join(map_names::FLOWS);
    let live = l3lb::flowtable::FlowTable::from_pin(&flows)
        .expect("the pinned table")
        .entries()
        .expect("entries");
    std::fs::remove_file(&flows).expect("unpin");
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&flows)
        .args([
            "type",
            "lru_hash",
            "key",
            &size_of::<FlowKey>().to_string(),
            "value",
            &size_of::<FlowState>().to_string(),
            "entries",
            "65536",
            "name",
            "L3LB_FLOWS",
        ])
        .status()
        .expect("bpftool");
    assert!(made.success(), "bpftool map create");
    let mut legacy: aya::maps::HashMap<aya::maps::MapData, FlowKey, FlowState> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(&flows).expect("open the old table"),
        ))
        .expect("typed");
    for e in &live {
        legacy.insert(e.key, e.state, 0).expect("insert");
    }
    drop(legacy);

    // The new agent also gets new weights, so Maglev alone would move some of these
    // connections (to a backend that answers with a reset): only their converted entries
    // keep them where they are.
    let weights = [Some(1), Some(1), Some(20)];
    let moved = conns
        .iter()
        .filter(|(b, c)| maglev_backend(&s, &weights, client_ip, c.local_addr().port()) != *b)
        .count();
    assert!(moved > 0, "the new weights move none of the connections");
    std::fs::write(
        s.config_path(),
        balancer_config_for(&s.lab, s.spec(), &weights).expect("config"),
    )
    .expect("config");
    let config = s.config_path().to_string_lossy().into_owned();
    s.balancer = s
        .lab
        .spawn_in(
            &s.lab.balancers[0].ns,
            l3lb_tests::l3lb_bin().expect("bin"),
            ["run", "--config", &config],
            "balancer-0-upgrade.log",
        )
        .expect("start");
    s.balancer
        .wait_for_log("l3lb ready", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the upgraded agent: {e:#}\n{}", s.balancer.log()));
    let log = s.balancer.log();
    assert!(
        log.contains("converted the previous release's connection table")
            && log.contains(&format!("entries={}", live.len())),
        "the conversion is logged with its entry count ({}):\n{log}",
        live.len()
    );
    for (backend, c) in &mut conns {
        c.echo(b"after the upgrade\n", T)
            .unwrap_or_else(|e| panic!("connection to {backend} after the upgrade: {e:#}"));
    }
    let table = l3lb::flowtable::FlowTable::from_pin(&flows).expect("the new table is pinned");
    assert!(
        table.count().expect("count") >= live.len() as u64,
        "the converted entries are in the new table"
    );
    println!(
        "{} entries converted; {moved} of {CONNS} connections stayed on their backend only \
         through them",
        live.len()
    );
}

/// Host PIDs of the processes whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<i32>().ok())
                })
                == Some(parent)
        })
        .collect()
}

/// Whether process `pid` has a handler for `signal` (its `SigCgt` mask).
fn catches(pid: i32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// As PID 1 (a container's first process) a process receives only the signals it has a
/// handler for. The agent takes its handlers before it loads anything, so a SIGTERM sent
/// while it starts stops it once started, where it used to be lost (the pod then lingered
/// until SIGKILL).
#[test]
fn a_sigterm_while_the_agent_starts_as_pid_1_stops_it() {
    let lab = Lab::new(LabSpec {
        backends: 1,
        balancers: 1,
    })
    .expect("lab");
    let cfg = format!(
        "interface: eth0\nxdp_mode: native\npin_path: {}\n",
        lab.pin_path("balancer-0").display()
    );
    let config = lab.write_file("balancer-0.yaml", &cfg).expect("config");
    let bin = l3lb_tests::l3lb_bin().expect("l3lb binary");
    // unshare's child is PID 1 of a new PID namespace. Should the test fail, the guard's
    // SIGTERM to unshare (which blocks it while it waits) is followed by SIGKILL, and
    // `--kill-child` takes the agent with it; the lab's teardown kills what is left.
    let mut outer = lab
        .spawn_in(
            &lab.balancers[0].ns,
            "unshare",
            [
                std::ffi::OsStr::new("--pid"),
                std::ffi::OsStr::new("--fork"),
                std::ffi::OsStr::new("--kill-child"),
                bin.as_os_str(),
                std::ffi::OsStr::new("run"),
                std::ffi::OsStr::new("--config"),
                config.as_os_str(),
            ],
            "balancer-0.log",
        )
        .expect("spawning the agent as PID 1");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The child once it runs l3lb (before its exec it is unshare, whose handlers say
    // nothing about the agent's).
    let is_agent = |pid: i32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .zip(std::fs::canonicalize(&bin).ok())
            .is_some_and(|(exe, bin)| exe == bin)
    };
    let agent = loop {
        if let Some(&pid) = children_of(outer.pid()).iter().find(|&&p| is_agent(p)) {
            break pid;
        }
        assert!(Instant::now() < deadline, "unshare started no agent");
        std::thread::sleep(Duration::from_millis(1));
    };
    while !catches(agent, libc::SIGTERM) {
        assert!(
            !outer.log().contains("l3lb ready"),
            "the agent was ready before it caught SIGTERM:\n{}",
            outer.log()
        );
        assert!(Instant::now() < deadline, "the agent never caught SIGTERM");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !outer.log().contains("l3lb ready"),
        "SIGTERM is caught from before the program is loaded"
    );
    // SAFETY: a signal to a process of this test's.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGTERM) }, 0, "kill");
    let status = outer
        .wait_exit(Duration::from_secs(60))
        .expect("the agent stops on a SIGTERM sent while it started");
    let log = outer.log();
    assert!(status.success(), "clean exit: {status:?}\n{log}");
    assert!(
        log.contains("l3lb ready") && log.contains("exiting; the data plane keeps forwarding"),
        "it finished starting, then exited as on any SIGTERM:\n{log}"
    );
}
