//! `cargo xtask demo`: a balancer and three backends in network namespaces, real traffic,
//! and what a new user wants to see: the split, the client addresses the backends saw,
//! and proof that replies bypass the balancer. Leaves nothing behind, also on Ctrl-C.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use l3lb_tests::{
    Capture,
    capture::IPPROTO_UDP,
    client, l3lb_bin,
    scenario::{Mode, Scenario, TCP_PORT, UDP_PORT, VIP, backend_name},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    // Ctrl-C and SIGTERM are taken by a thread that sets a flag; the demo checks it between
    // steps and returns normally, so every guard (agents, servers, namespaces, pins) drops.
    if let Err(e) = install_signal_thread() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = demo();
    match result {
        Ok(()) if INTERRUPTED.load(Ordering::SeqCst) => {
            println!("\ninterrupted: lab torn down");
            ExitCode::from(130)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_signal_thread() -> Result<()> {
    // SAFETY: signal-set manipulation on a local set, before any other thread exists, so
    // every thread spawned later inherits the mask and only the waiter receives them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGINT/SIGTERM");
        }
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    INTERRUPTED.store(true, Ordering::SeqCst);
                }
            })
            .context("starting the signal thread")?;
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn demo() -> Result<()> {
    let t = Duration::from_secs(2);
    let vip = IpAddr::V4(VIP);
    println!("== l3lb demo: client → balancer (XDP, ipip) → 3 backends, replies straight back\n");
    println!("building the lab: namespaces client, balancer-0, backend-0..2 on one bridge …");
    let s = Scenario::start(Mode::Ipip, 3)?;
    println!(
        "  client {}   balancer {}   backends {}",
        s.lab.client.ipv4,
        s.lab.balancers[0].ipv4,
        s.lab
            .backends
            .iter()
            .map(|b| b.ipv4.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  VIP {vip}: TCP {TCP_PORT} and UDP {UDP_PORT}, routed by the client to the balancer"
    );
    println!("  each backend holds the VIP on lo and runs `l3lb` in the decap role\n");
    println!(
        "balancer config ({}):",
        s.lab.path("balancer-0.yaml").display()
    );
    let cfg =
        std::fs::read_to_string(s.lab.path("balancer-0.yaml")).context("reading the config")?;
    for line in cfg.lines() {
        println!("  | {line}");
    }
    if interrupted() {
        return Ok(());
    }

    const CONNS: u16 = 300;
    println!("\nopening {CONNS} TCP connections to {vip}:{TCP_PORT} from distinct source ports …");
    // In chunks, so a Ctrl-C is noticed within a moment.
    let mut bulk = l3lb_tests::Bulk::default();
    for start in (20000..20000 + CONNS).step_by(50) {
        if interrupted() {
            return Ok(());
        }
        let part = client::tcp_bulk(&s.lab.client.ns, vip, TCP_PORT, start..start + 50, t)?;
        for (k, v) in part.counts {
            *bulk.counts.entry(k).or_default() += v;
        }
        bulk.ok += part.ok;
        bulk.failures += part.failures;
    }
    println!("  answered: {} of {}", bulk.ok, bulk.total());
    println!(
        "\n  {:<10} {:>11}   client addresses the backend saw",
        "BACKEND", "CONNECTIONS"
    );
    for (i, server) in s.tcp.iter().enumerate() {
        let name = backend_name(i);
        let seen: BTreeSet<IpAddr> = server.peers().iter().map(|p| p.ip()).collect();
        let seen: Vec<String> = seen.iter().map(ToString::to_string).collect();
        println!(
            "  {name:<10} {:>11}   {}",
            bulk.counts.get(&name).copied().unwrap_or(0),
            seen.join(", ")
        );
    }
    println!(
        "  (the client is {}: no proxy address, no PROXY protocol)",
        s.lab.client.ipv4
    );
    if interrupted() {
        return Ok(());
    }

    const N: u16 = 20;
    println!("\nsending {N} UDP requests to {vip}:{UDP_PORT} while capturing on the client …");
    let before = s.service_counters(UDP_PORT)?;
    let mut cap = Capture::open(&s.lab.client.ns, "eth0")?;
    for i in 0..N {
        client::udp_request(&s.lab.client.ns, vip, UDP_PORT, Some(30000 + i), t)?;
    }
    cap.poll(Duration::from_millis(200))?;
    let after = s.service_counters(UDP_PORT)?;
    let replies = cap.find_ip(vip, IpAddr::V4(s.lab.client.ipv4), IPPROTO_UDP);
    let macs: BTreeSet<String> = replies.iter().map(|r| r.src_mac.to_string()).collect();
    println!("  replies captured at the client: {}", replies.len());
    for mac in &macs {
        let owner = s
            .lab
            .nodes()
            .find(|n| n.mac.to_string() == *mac)
            .map_or("unknown".to_string(), |n| n.name.clone());
        println!("    from MAC {mac} = {owner}");
    }
    println!(
        "  balancer's counter for the UDP service: {} packets for {N} requests and {} replies",
        after.packets - before.packets,
        replies.len()
    );
    let bypassed = replies.iter().all(|r| r.src_mac != s.lab.balancers[0].mac)
        && after.packets - before.packets == u64::from(N);
    println!(
        "  => replies {} the balancer",
        if bypassed {
            "bypassed"
        } else {
            "did NOT bypass"
        }
    );

    println!("\n`l3lb status` on the balancer:");
    let out = Command::new(l3lb_bin()?)
        .args(["status", "--pin-path"])
        .arg(s.lab.pin_path("balancer-0"))
        .output()
        .context("running l3lb status")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    let prefix = s.lab.prefix.to_string();
    drop(s);
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    let left = String::from_utf8_lossy(&left.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count();
    println!("\nlab torn down: agents stopped, pins removed, {left} namespaces left");
    if !bypassed || bulk.failures > 0 || left > 0 {
        bail!("the demo did not show what it should (see above)");
    }
    Ok(())
}
