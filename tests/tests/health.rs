//! Draining and health checks, with real connections through the VIP. Needs root.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use l3lb_tests::{
    TcpPersistent, TcpServer,
    client::{self, Bulk},
    scenario::{Mode, Scenario, TCP_PORT, backend_name, balancer_config_for, restart_agent},
};

const T: Duration = Duration::from_secs(2);

/// `connections` new connections to the web VIP from ports starting at `first_port`.
fn new_connections(s: &Scenario, first_port: u16, connections: u16) -> Bulk {
    client::tcp_bulk(
        &s.lab.client.ns,
        s.vip(),
        TCP_PORT,
        first_port..first_port + connections,
        T,
    )
    .expect("connections")
}

/// Writes `config` and waits until the agent applied it (`applies` counts the log lines).
fn reload(s: &mut Scenario, config: &str, applies: &mut usize) {
    s.write_raw_config_and_reload(config).expect("reload");
    *applies += 1;
    s.balancer
        .wait_for_log_count("applied config", *applies, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
}

fn config(s: &Scenario, edit: impl Fn(String) -> String) -> String {
    edit(balancer_config_for(&s.lab, s.spec(), &[Some(1); 3]).expect("config"))
}

/// `text` with `line` added to backend `i`'s entry of every service.
fn backend_line(s: &Scenario, text: String, i: usize, line: &str) -> String {
    let addr = s.lab.backends[i].ipv4;
    text.replace(
        &format!("      - address: {addr}\n        weight: 1\n"),
        &format!("      - address: {addr}\n        weight: 1\n        {line}\n"),
    )
}

#[test]
fn a_drained_backend_keeps_its_connections_and_takes_no_new_ones() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    let drained = backend_name(1);
    let mut applies = 1;
    // Long-lived connections on every backend, some on the one to drain.
    let mut conns: Vec<TcpPersistent> = (0..30)
        .map(|i| {
            client::tcp_connect_persistent(&s.lab.client.ns, s.vip(), TCP_PORT, Some(41000 + i), T)
                .expect("connection")
        })
        .collect();
    let on_drained = conns
        .iter()
        .filter(|c| c.reply().map(|r| r.backend == drained).unwrap_or(false))
        .count();
    assert!(on_drained > 0, "some connections sit on {drained}");

    for (how, text) in [
        (
            "weight: 0",
            config(&s, |t| {
                let addr = s.lab.backends[1].ipv4;
                t.replace(
                    &format!("      - address: {addr}\n        weight: 1\n"),
                    &format!("      - address: {addr}\n        weight: 0\n"),
                )
            }),
        ),
        (
            "drain: true",
            config(&s, |t| backend_line(&s, t, 1, "drain: true")),
        ),
    ] {
        reload(&mut s, &text, &mut applies);
        for c in &mut conns {
            c.echo(b"still there\n", T)
                .unwrap_or_else(|e| panic!("{how}: an established connection was cut: {e:#}"));
        }
        let fresh = new_connections(&s, 42000, 300);
        assert_eq!(fresh.ok, 300, "{how}: {:?}", fresh.errors);
        assert!(
            !fresh.counts.contains_key(&drained),
            "{how}: no new connection reaches {drained}: {:?}",
            fresh.counts
        );
        // Back in: new connections reach it again.
        let plain = config(&s, |t| t);
        reload(&mut s, &plain, &mut applies);
        let back = new_connections(&s, 43000, 300);
        assert!(
            back.counts.get(&drained).copied().unwrap_or(0) > 50,
            "{how} undone: {drained} takes new connections again: {:?}",
            back.counts
        );
    }
}

/// Replaces every backend's VIP-bound web server with one on all addresses, so the
/// balancer's checks (to the backend's own address and the service port) reach the
/// same server as the traffic.
fn servers_on_all_addresses(s: &mut Scenario) {
    s.tcp.clear();
    for i in 0..3 {
        let ns = &s.lab.backends[i].ns;
        s.tcp.push(
            TcpServer::start(
                ns,
                &backend_name(i),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), TCP_PORT),
            )
            .expect("server"),
        );
    }
}

#[test]
fn a_backend_failing_its_health_check_gets_no_new_connections_until_it_recovers() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    servers_on_all_addresses(&mut s);
    let mut applies = 1;
    let checked = config(&s, |t| {
        t.replacen(
            "    backends:\n",
            "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}\n    backends:\n",
            1,
        )
    });
    assert!(checked.contains("health_check"), "{checked}");
    reload(&mut s, &checked, &mut applies);
    let before = new_connections(&s, 42000, 300);
    assert_eq!(before.ok, 300, "{:?}", before.errors);
    assert_eq!(
        before.counts.len(),
        3,
        "all three serve: {:?}",
        before.counts
    );

    // Backend 1's server stops: its checks fail, and within interval × fall (+ timeout)
    // it leaves new-connection selection.
    let failing = backend_name(1);
    let server = s.tcp.remove(1);
    drop(server);
    s.balancer
        .wait_for_log("fails its health check", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    // The new table is in place once the agent logs the apply that follows.
    s.balancer
        .wait_for_log_count("backend health changed; applied", 1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    let log = s.balancer.log();
    assert!(
        log.contains(&format!("backend={}", s.lab.backends[1].ipv4)),
        "{log}"
    );
    let shown = s.status().expect("status");
    let b = shown
        .backends
        .iter()
        .find(|b| {
            b.address == IpAddr::V4(s.lab.backends[1].ipv4)
                && b.service_name.as_deref() == Some("web")
        })
        .expect("backend in status");
    assert_eq!(
        (b.health.as_str(), b.weight),
        ("down", Some(0)),
        "status shows it failing"
    );
    let during = new_connections(&s, 43000, 300);
    // Without the check, about a third of these would meet a closed port.
    assert_eq!(
        during.ok, 300,
        "every new connection served: {:?}",
        during.errors
    );
    assert!(!during.counts.contains_key(&failing), "{:?}", during.counts);

    // It comes back: after `rise` good checks it takes new connections again.
    s.tcp.insert(
        1,
        TcpServer::start(
            &s.lab.backends[1].ns,
            &failing,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), TCP_PORT),
        )
        .expect("server"),
    );
    s.balancer
        .wait_for_log("passes its health check again", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    s.balancer
        .wait_for_log_count("backend health changed; applied", 2, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    let after = new_connections(&s, 44000, 300);
    assert_eq!(after.ok, 300, "{:?}", after.errors);
    let counts: HashMap<String, usize> = after.counts;
    assert!(
        counts.get(&failing).copied().unwrap_or(0) > 50,
        "{failing} is back: {counts:?}"
    );
}

/// (health, weight) of backend 1 of `web`, as the balancer's status shows them.
fn web_backend_1(s: &Scenario) -> (String, Option<u32>) {
    s.status()
        .expect("status")
        .backends
        .iter()
        .find(|b| {
            b.address == IpAddr::V4(s.lab.backends[1].ipv4)
                && b.service_name.as_deref() == Some("web")
        })
        .map(|b| (b.health.clone(), b.weight))
        .expect("backend 1 of web in status")
}

#[test]
fn a_reload_rejected_when_applied_leaves_the_health_verdicts_as_they_were() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    servers_on_all_addresses(&mut s);
    // `web` and `dns` fill two service slots: a reload that renames `web` needs a third
    // for as long as the old and the new entry coexist, so it passes `l3lb check` and is
    // rejected only when applied.
    let checked = config(&s, |t| {
        t.replacen(
            "    backends:\n",
            "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}\n    backends:\n",
            1,
        ) + "max_services: 2\n"
    });
    assert!(checked.contains("  - name: web\n"), "{checked}");
    let path = s.config_path().to_owned();
    std::fs::write(&path, &checked).expect("config");
    let (lab, ns) = (&s.lab, &s.lab.balancers[0].ns);
    restart_agent(lab, ns, &mut s.balancer, &path, "balancer-0-checked.log")
        .expect("restart with two slots");
    let started = std::time::Instant::now();

    let failing = s.tcp.remove(1);
    drop(failing);
    s.balancer
        .wait_for_log("backend health changed; applied", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    assert_eq!(web_backend_1(&s), ("down".to_string(), Some(0)));

    let renamed = checked.replacen("  - name: web\n", "  - name: web2\n", 1);
    s.write_raw_config_and_reload(&renamed).expect("SIGHUP");
    s.balancer
        .wait_for_log("config reload rejected", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    // The agent re-applies its running config every 30 s from its start (node addresses
    // may have changed), logging only what changed: with the verdicts of the rejected
    // config, that re-apply put backend 1 back ("node addresses changed; applied").
    std::thread::sleep(
        (started + Duration::from_secs(33)).saturating_duration_since(std::time::Instant::now()),
    );
    assert_eq!(
        web_backend_1(&s),
        ("down".to_string(), Some(0)),
        "still failing, still out:\n{}",
        s.balancer.log()
    );
}

#[test]
fn a_backend_whose_check_is_removed_shows_unknown_not_its_last_verdict() {
    let mut s = Scenario::start(Mode::Ipip, 3).expect("scenario");
    servers_on_all_addresses(&mut s);
    let mut applies = 1;
    let plain = config(&s, |t| t);
    let checked = config(&s, |t| {
        t.replacen(
            "    backends:\n",
            "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 2, fall: 2}\n    backends:\n",
            1,
        )
    });
    reload(&mut s, &checked, &mut applies);
    drop(s.tcp.remove(1));
    s.balancer
        .wait_for_log("backend health changed; applied", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.balancer.log()));
    assert_eq!(web_backend_1(&s), ("down".to_string(), Some(0)));
    // The check goes: the backend is balanced again, and nothing checks it any more.
    reload(&mut s, &plain, &mut applies);
    assert_eq!(
        web_backend_1(&s),
        ("unknown".to_string(), Some(1)),
        "{}",
        s.balancer.log()
    );
}
