//! Prometheus metrics (OpenMetrics text) for `GET /metrics` on `metrics_address`.
//!
//! Every value is read at scrape time: counters are summed over CPUs from the pinned
//! per-CPU maps (the data plane pays nothing per packet for metrics), and the agent adds
//! what only it knows (service names, weights, health, config generation) through
//! [`Labels`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::status::{self, Status};

/// What only the agent knows, updated after every apply (names, weights and health come
/// from the pinned metadata maps with the counters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels {
    /// Applies attempted since start (the first is 1).
    pub generation: u64,
    /// Whether the last apply succeeded.
    pub last_apply_ok: bool,
    /// Unix time of the last successful apply (0: none yet).
    pub last_success_unix: f64,
    /// Kubernetes watch state by resource kind (true = established), in Kubernetes mode.
    pub watches: BTreeMap<String, bool>,
}

/// [`Labels`] shared between the agent and the HTTP handler.
pub type SharedLabels = Arc<Mutex<Labels>>;

type L = Vec<(String, String)>;

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<L, Counter> {
    let f = Family::<L, Counter>::default();
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, f.clone()),
        None => reg.register(name, help, f.clone()),
    }
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<L, Gauge> {
    let f = Family::<L, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn label(pairs: &[(&str, String)]) -> L {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Renders `status` (read from the pins) with the agent's `labels` as OpenMetrics text.
pub fn render(status: &Status, labels: &Labels) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    let service_name = |id: u32| {
        status
            .services
            .iter()
            .find(|s| s.service == id)
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    };

    let vip_packets = counter_family(
        &mut reg,
        "l3lb_vip_packets",
        "Packets received for a VIP's service",
        None,
    );
    let vip_bytes = counter_family(
        &mut reg,
        "l3lb_vip_received",
        "Bytes (L3) received for a VIP's service",
        Some(Unit::Bytes),
    );
    let vip_new = counter_family(
        &mut reg,
        "l3lb_vip_new_connections",
        "Flows that took a fresh backend choice (TCP SYN, or a flow not in the connection table)",
        None,
    );
    // One series per service, labelled with its VIP addresses (comma-separated): the
    // program counts a service's packets once, whichever of its addresses and ports
    // they came to, so a series per address would repeat the service's total on each
    // (and a sum over addresses would count it twice).
    let mut addresses: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
    for v in status
        .vips
        .iter()
        .filter(|v| v.protocol == "tcp" || v.protocol == "udp")
    {
        addresses.entry(v.service).or_default().insert(v.address);
    }
    for (service, addrs) in &addresses {
        let Some(c) = status.services.iter().find(|s| s.service == *service) else {
            continue;
        };
        let vips: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
        let l = label(&[("service", service_name(*service)), ("vip", vips.join(","))]);
        vip_packets.get_or_create(&l).inc_by(c.packets);
        vip_bytes.get_or_create(&l).inc_by(c.bytes);
        vip_new.get_or_create(&l).inc_by(c.new_flows);
    }

    let be_packets = counter_family(
        &mut reg,
        "l3lb_backend_packets",
        "Packets sent to a backend",
        None,
    );
    let be_bytes = counter_family(
        &mut reg,
        "l3lb_backend_sent",
        "Bytes (L3, before encapsulation) sent to a backend",
        Some(Unit::Bytes),
    );
    let be_weight = gauge_family(
        &mut reg,
        "l3lb_backend_weight",
        "Weight new connections see (0 while drained or failing its health check)",
    );
    let be_up = gauge_family(
        &mut reg,
        "l3lb_backend_healthy",
        "1 when the backend passes its health check, 0 when it fails (only for checked services)",
    );
    for b in &status.backends {
        let service = b
            .service_name
            .clone()
            .unwrap_or_else(|| service_name(b.service));
        let l = label(&[("service", service), ("backend", b.address.to_string())]);
        be_packets.get_or_create(&l).inc_by(b.packets);
        be_bytes.get_or_create(&l).inc_by(b.bytes);
        if let Some(w) = b.weight {
            be_weight.get_or_create(&l).set(i64::from(w));
        }
        let healthy = match b.health.as_str() {
            "up" => Some(1),
            "down" => Some(0),
            _ => None,
        };
        if let Some(h) = healthy {
            be_up.get_or_create(&l).set(h);
        }
    }

    let drops = counter_family(
        &mut reg,
        "l3lb_dropped_packets",
        "Packets dropped, by reason",
        None,
    );
    for (reason, n) in &status.drops {
        drops
            .get_or_create(&label(&[("reason", reason.clone())]))
            .inc_by(*n);
    }
    let actions = counter_family(
        &mut reg,
        "l3lb_packets",
        "Packets that left the XDP program, by outcome (pass, encap, l2, local, decap, echo_reply, too_big)",
        None,
    );
    for (action, n) in &status.actions {
        actions
            .get_or_create(&label(&[("action", action.clone())]))
            .inc_by(*n);
    }
    let events = counter_family(
        &mut reg,
        "l3lb_events",
        "Events counted besides the outcome",
        None,
    );
    for (event, n) in &status.events {
        events
            .get_or_create(&label(&[("event", event.clone())]))
            .inc_by(*n);
    }

    let flows = Gauge::<i64>::default();
    flows.set(gauge_i64(status.connection_table.entries.max(status.flows)));
    reg.register(
        "l3lb_connection_table_entries",
        "Entries in the connection table now",
        flows,
    );
    let capacity = Gauge::<i64>::default();
    capacity.set(i64::from(status.connection_table.capacity));
    reg.register(
        "l3lb_connection_table_capacity",
        "Entries the connection table can hold",
        capacity,
    );

    let generation = Gauge::<i64>::default();
    generation.set(gauge_i64(labels.generation));
    reg.register(
        "l3lb_config_generation",
        "Config applies attempted since the agent started",
        generation,
    );
    let ok = Gauge::<i64>::default();
    ok.set(i64::from(labels.last_apply_ok));
    reg.register(
        "l3lb_config_last_apply_success",
        "1 when the last config apply succeeded",
        ok,
    );
    let when = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    when.set(labels.last_success_unix);
    reg.register_with_unit(
        "l3lb_config_last_success_timestamp",
        "Unix time of the last successful config apply",
        Unit::Seconds,
        when,
    );
    if !labels.watches.is_empty() {
        let watch = gauge_family(
            &mut reg,
            "l3lb_kubernetes_watch_up",
            "1 while the watch of a Kubernetes resource kind is established",
        );
        for (kind, up) in &labels.watches {
            watch
                .get_or_create(&label(&[("kind", kind.clone())]))
                .set(i64::from(*up));
        }
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

/// Reads the pins in `pin_dir` and renders them with `labels` (what `/metrics` serves).
pub fn scrape(pin_dir: &Path, labels: &SharedLabels) -> anyhow::Result<String> {
    let status = status::read(pin_dir)?;
    let labels = labels
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(render(&status, &labels)?)
}

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ConnectionTable, ServiceCounters, VipStatus};

    #[test]
    fn renders_counters_with_names_and_units() {
        let vip = |port| VipStatus {
            address: "192.0.2.10".parse().expect("addr"),
            port,
            protocol: "tcp".into(),
            service: 0,
            forwarding: "ipip".into(),
            service_name: Some("web".into()),
            affinity: "none".into(),
            source_ranges: vec![],
        };
        let status = Status {
            vips: vec![vip(80), vip(443)],
            services: vec![ServiceCounters {
                service: 0,
                packets: 10,
                bytes: 1000,
                new_flows: 2,
                name: Some("web".into()),
                vips: vec![],
                forwarding: "ipip".into(),
            }],
            backends: vec![BackendStatus {
                id: 3,
                service: 0,
                address: "10.0.0.1".parse().expect("addr"),
                local: false,
                packets: 10,
                bytes: 1000,
                service_name: Some("web".into()),
                weight: Some(2),
                health: "up".into(),
                table_entries: 0,
            }],
            drops: [("no_backend".to_string(), 4)].into_iter().collect(),
            actions: [("encap".to_string(), 10)].into_iter().collect(),
            events: [("fragment".to_string(), 0)].into_iter().collect(),
            flows: 7,
            connection_table: ConnectionTable {
                entries: 7,
                capacity: 1024,
            },
            decap_allow: vec![],
            egress_no_xdp: Default::default(),
        };
        let labels = Labels {
            generation: 3,
            last_apply_ok: true,
            last_success_unix: 1_700_000_000.5,
            watches: [("services".to_string(), true)].into_iter().collect(),
        };
        let text = render(&status, &labels).expect("render");
        for line in [
            "l3lb_vip_packets_total{service=\"web\",vip=\"192.0.2.10\"} 10",
            "l3lb_vip_received_bytes_total{service=\"web\",vip=\"192.0.2.10\"} 1000",
            "l3lb_vip_new_connections_total{service=\"web\",vip=\"192.0.2.10\"} 2",
            "l3lb_backend_packets_total{service=\"web\",backend=\"10.0.0.1\"} 10",
            "l3lb_backend_sent_bytes_total{service=\"web\",backend=\"10.0.0.1\"} 1000",
            "l3lb_backend_weight{service=\"web\",backend=\"10.0.0.1\"} 2",
            "l3lb_backend_healthy{service=\"web\",backend=\"10.0.0.1\"} 1",
            "l3lb_dropped_packets_total{reason=\"no_backend\"} 4",
            "l3lb_packets_total{action=\"encap\"} 10",
            "l3lb_connection_table_entries 7",
            "l3lb_connection_table_capacity 1024",
            "l3lb_config_generation 3",
            "l3lb_config_last_apply_success 1",
            "l3lb_config_last_success_timestamp_seconds 1700000000.5",
            "l3lb_kubernetes_watch_up{kind=\"services\"} 1",
            "# UNIT l3lb_vip_received_bytes bytes",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // Two ports of one VIP are one series.
        assert_eq!(text.matches("l3lb_vip_packets_total{").count(), 1, "{text}");

        // Two addresses of one service (a Kubernetes Service's ingress IPs): still one
        // series, whose value is the service's total once.
        let mut two = status.clone();
        let mut other = two.vips[0].clone();
        other.address = "192.0.2.11".parse().expect("addr");
        two.vips.push(other);
        let text = render(&two, &labels).expect("render");
        assert!(
            text.contains(
                "l3lb_vip_packets_total{service=\"web\",vip=\"192.0.2.10,192.0.2.11\"} 10"
            ),
            "{text}"
        );
        assert_eq!(text.matches("l3lb_vip_packets_total{").count(), 1, "{text}");
    }
}
