//! Kubernetes objects → the maps' desired state: a pure function, so the whole mapping is
//! unit-tested on real-format JSON without an API server or a kernel.
//!
//! The mapping (README, "Kubernetes"): a handled Service's ingress IPs × its TCP/UDP ports
//! are VIPs; its backends are the *nodes* with ready endpoints, weighted by their count of
//! ready endpoints (of serving terminating ones while none is ready anywhere), at the
//! node's `InternalIP` of the VIP's family. A Service with ingress
//! IPs of both families becomes two data-plane services (`<ns>/<name>/v4` and `/v6`)
//! because a data-plane service's VIPs and backends share a family.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    config::NodeHealthCheck,
    dataplane::{Desired, DesiredBackend, DesiredService, ServiceMode},
    health,
};

/// l3lb's default `spec.loadBalancerClass`.
pub const DEFAULT_CLASS: &str = "l3lb.io/xdp";

/// Largest weight the data plane takes (the config's limit).
const MAX_WEIGHT: u32 = 65535;

/// Nodes with this label (any value) are never backends.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What decides which Services and nodes count, besides the objects themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `spec.loadBalancerClass` handled by this l3lb.
    pub class: String,
    /// Also handle LoadBalancer Services with no class (l3lb is the only implementation).
    pub take_unclassed: bool,
    /// This node's name (downward API): its backends are passed locally, not encapsulated.
    pub node_name: String,
    /// Labels a node must carry to be a balancer whose encapsulated packets this node
    /// accepts; empty: every node.
    pub balancer_node_labels: BTreeMap<String, String>,
    /// How the nodes of `externalTrafficPolicy: Local` Services are probed.
    pub node_health_check: NodeHealthCheck,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            class: DEFAULT_CLASS.to_string(),
            take_unclassed: false,
            node_name: String::new(),
            balancer_node_labels: BTreeMap::new(),
            node_health_check: NodeHealthCheck::default(),
        }
    }
}

/// Something a user should hear about a handled Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service's uid (to attach an Event and to warn once per Service).
    pub uid: String,
    /// Short CamelCase reason, as Kubernetes Events have.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// The result of a translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// The maps' desired state; its services list the oldest Service first (the agent
    /// leaves out the newest where the maps cannot hold them all).
    pub desired: Desired,
    /// Warnings about handled Services (policy `Cluster`, skipped ports or addresses, …).
    pub warnings: Vec<Warning>,
    /// Node health probes: each backend node of a `Local` Service, on the Service's
    /// `healthCheckNodePort`.
    pub checks: Vec<health::Target>,
}

/// Whether `svc` is a Service this l3lb handles.
pub fn handles(svc: &Service, settings: &Settings) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match &spec.load_balancer_class {
        Some(class) => *class == settings.class,
        None => settings.take_unclassed,
    }
}

fn key_of(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or("default"), name.unwrap_or(""))
}

/// A node's `InternalIP`s, the first of each family.
#[derive(Debug, Clone, Copy, Default)]
struct NodeAddrs {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl NodeAddrs {
    fn of(node: &Node) -> Self {
        let mut out = NodeAddrs::default();
        for a in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
        {
            match a.address.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) if out.v4.is_none() => out.v4 = Some(v4),
                Ok(IpAddr::V6(v6)) if out.v6.is_none() => out.v6 = Some(v6),
                _ => {}
            }
        }
        out
    }

    fn get(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(IpAddr::V6)
        } else {
            self.v4.map(IpAddr::V4)
        }
    }
}

/// Per node: endpoints ready, and endpoints serving while terminating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NodeEndpoints {
    ready: u32,
    serving_terminating: u32,
}

/// Counts a Service's endpoints per node from the slices of one address family.
///
/// Each endpoint is one pod; a dual-stack Service has an IPv4 and an IPv6 slice listing
/// the same pods, so counting both would double every weight. The VIP's family is counted
/// when the Service has slices of it, else the other family's (an IPv6 VIP in front of
/// IPv4-only pods still reaches the same nodes).
fn endpoints_per_node(slices: &[&EndpointSlice], v6: bool) -> BTreeMap<String, NodeEndpoints> {
    let wanted = if v6 { "IPv6" } else { "IPv4" };
    let has_family = slices.iter().any(|s| s.address_type == wanted);
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut out: BTreeMap<String, NodeEndpoints> = BTreeMap::new();
    for slice in slices {
        let usable = if has_family {
            slice.address_type == wanted
        } else {
            slice.address_type == "IPv4" || slice.address_type == "IPv6"
        };
        if !usable {
            continue;
        }
        for ep in &slice.endpoints {
            let Some(node) = &ep.node_name else { continue };
            // One pod listed in two slices (a slice being split or merged, or both families
            // in the fallback) counts once.
            let id = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.uid.clone())
                .or_else(|| ep.addresses.first().cloned())
                .unwrap_or_default();
            if !seen.insert((node.clone(), id)) {
                continue;
            }
            let cond = ep.conditions.clone().unwrap_or_default();
            // The API: a nil `ready` is an unknown state consumers treat as ready; a nil
            // `serving` means the same as `ready`.
            let ready = cond.ready.unwrap_or(true);
            let serving = cond.serving.unwrap_or(ready);
            let terminating = cond.terminating.unwrap_or(false);
            let entry = out.entry(node.clone()).or_default();
            if ready {
                entry.ready += 1;
            } else if serving && terminating {
                entry.serving_terminating += 1;
            }
        }
    }
    out.retain(|_, e| e.ready > 0 || e.serving_terminating > 0);
    out
}

fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(lb_common::PROTO_TCP),
        "UDP" => Some(lb_common::PROTO_UDP),
        _ => None,
    }
}

/// Translates the API state into the maps' desired state.
///
/// `local_addresses` are this node's own addresses (outer destinations the decap role
/// accepts); they are passed in so the function stays pure.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    nodes: &[Node],
    local_addresses: &[IpAddr],
    settings: &Settings,
) -> Translation {
    let mut warnings = Vec::new();
    // Backend candidates: every node but those the well-known label excludes from external
    // load balancers (the convention cloud load balancers follow too).
    let node_addrs: HashMap<String, NodeAddrs> = nodes
        .iter()
        .filter(|n| {
            !n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
        })
        .filter_map(|n| Some((n.metadata.name.clone()?, NodeAddrs::of(n))))
        .collect();

    let mut slices_by_service: HashMap<String, Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        slices_by_service
            .entry(key_of(slice.metadata.namespace.as_deref(), Some(svc)))
            .or_default()
            .push(slice);
    }

    // Oldest first, so a VIP two Services claim stays with the one that had it first.
    let mut handled: Vec<&Service> = services.iter().filter(|s| handles(s, settings)).collect();
    handled.sort_by(|a, b| {
        let ka = (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            key_of(a.metadata.namespace.as_deref(), a.metadata.name.as_deref()),
        );
        let kb = (
            b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            key_of(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()),
        );
        ka.cmp(&kb)
    });

    let mut claimed: HashMap<(IpAddr, u16, u8), String> = HashMap::new();
    let mut out_services = Vec::new();
    let mut checks = Vec::new();
    for svc in handled {
        let key = key_of(
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        );
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let mut warn = |reason: &'static str, message: String| {
            warnings.push(Warning {
                service: key.clone(),
                uid: uid.clone(),
                reason,
                message,
            })
        };
        let Some(spec) = &svc.spec else { continue };

        let local_policy = spec.external_traffic_policy.as_deref() == Some("Local");
        // Only with `Local` does the node's proxy answer `healthCheckNodePort` (with its
        // count of local endpoints); the API server allocates the port for such Services,
        // so a missing one is a Service written by hand or a stand-in API.
        let check_port = if local_policy && settings.node_health_check.enabled {
            let port = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
            if port.is_none() {
                tracing::debug!(service = %key, "externalTrafficPolicy Local without a healthCheckNodePort: its nodes are not probed");
            }
            port
        } else {
            None
        };
        if !local_policy {
            warn(
                "ClientAddressLost",
                "externalTrafficPolicy is Cluster: the node's service proxy may forward to \
                 another node and replace the client's address; set \
                 externalTrafficPolicy: Local to keep client IPs"
                    .to_string(),
            );
        }

        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            match (
                protocol_number(p.protocol.as_deref()),
                u16::try_from(p.port),
            ) {
                (Some(proto), Ok(port)) if port != 0 => ports.push((port, proto)),
                _ => warn(
                    "UnsupportedPort",
                    format!(
                        "port {} {} is not balanced: l3lb handles TCP and UDP ports",
                        p.port,
                        p.protocol.as_deref().unwrap_or("TCP")
                    ),
                ),
            }
        }
        ports.sort();
        ports.dedup();

        let mut vips_v4 = Vec::new();
        let mut vips_v6 = Vec::new();
        for ing in svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
        {
            let Some(ip) = &ing.ip else {
                warn(
                    "IngressWithoutIP",
                    format!(
                        "ingress {} has no IP; l3lb balances IP addresses only",
                        ing.hostname.as_deref().unwrap_or("?")
                    ),
                );
                continue;
            };
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => vips_v4.push(IpAddr::V4(v4)),
                Ok(IpAddr::V6(v6)) => vips_v6.push(IpAddr::V6(v6)),
                Err(_) => warn("InvalidIngressIP", format!("ingress IP {ip:?} is invalid")),
            }
            if ing.ip_mode.as_deref() == Some("Proxy") {
                warn(
                    "IngressIPModeProxy",
                    format!(
                        "ingress {ip} has ipMode Proxy: the node's service proxy does not \
                         deliver packets addressed to it; use ipMode VIP (the default)"
                    ),
                );
            }
        }

        let mut source_ranges = Vec::new();
        let listed = spec.load_balancer_source_ranges.as_deref().unwrap_or(&[]);
        for r in listed {
            match r.trim().parse::<ipnet::IpNet>() {
                Ok(net) => source_ranges.push(net.trunc()),
                Err(_) => warn(
                    "InvalidSourceRange",
                    format!("loadBalancerSourceRanges entry {r:?} is not a CIDR; ignored"),
                ),
            }
        }
        source_ranges.sort();
        source_ranges.dedup();
        if !listed.is_empty() && source_ranges.is_empty() {
            // Dropping every listed range would open the Service to everyone: fail closed.
            warn(
                "InvalidSourceRange",
                "no valid loadBalancerSourceRanges entry; the Service is not balanced until \
                 they are fixed"
                    .to_string(),
            );
            continue;
        }
        let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
        let slices = slices_by_service.get(&key).cloned().unwrap_or_default();

        for (v6, vips) in [(false, vips_v4), (true, vips_v6)] {
            if vips.is_empty() || ports.is_empty() {
                continue;
            }
            let mut entries = Vec::new();
            for vip in &vips {
                for &(port, proto) in &ports {
                    let entry = (*vip, port, proto);
                    match claimed.get(&entry) {
                        Some(owner) if *owner != key => warn(
                            "VIPConflict",
                            format!(
                                "{vip} port {port} is already balanced for Service {owner}; \
                                 not balanced for this one"
                            ),
                        ),
                        _ => {
                            claimed.insert(entry, key.clone());
                            entries.push(entry);
                        }
                    }
                }
            }
            entries.sort();
            entries.dedup();
            if entries.is_empty() {
                continue;
            }
            let reachable: Vec<(IpAddr, NodeEndpoints, bool)> = endpoints_per_node(&slices, v6)
                .into_iter()
                .filter_map(|(node, counts)| {
                    // An endpoint on a node not (yet) in the cache, or one without an
                    // InternalIP of this family, cannot be reached.
                    let address = node_addrs.get(&node).and_then(|a| a.get(v6))?;
                    Some((address, counts, node == settings.node_name))
                })
                .collect();
            // With no ready endpoint left anywhere, the serving terminating ones take new
            // connections, as the nodes' proxies fall back to them (kube-proxy since 1.28,
            // KEP-1669): otherwise the Service would drop everything for the pods' grace
            // period (a one-replica rollout, the last node drained).
            let any_ready = reachable.iter().any(|(_, c, _)| c.ready > 0);
            let mut backends: Vec<DesiredBackend> = reachable
                .into_iter()
                .map(|(address, counts, local)| DesiredBackend {
                    address,
                    weight: if any_ready {
                        counts.ready
                    } else {
                        counts.serving_terminating
                    },
                    local,
                })
                .collect();
            // Two nodes reporting one address (a misconfiguration) would make Maglev refuse
            // the table; they are one destination, so their endpoints add up.
            backends.sort_by_key(|b| b.address);
            backends.dedup_by(|later, kept| {
                let same = later.address == kept.address;
                if same {
                    kept.weight += later.weight;
                    kept.local |= later.local;
                }
                same
            });
            for b in &mut backends {
                b.weight = b.weight.min(MAX_WEIGHT);
            }
            let name = format!("{key}/{}", if v6 { "v6" } else { "v4" });
            if let Some(port) = check_port {
                // The probe goes to the node's own address: that is where its proxy
                // answers, and a VIP would be balanced rather than reach this node.
                checks.extend(backends.iter().map(|b| health::Target {
                    key: (name.clone(), b.address),
                    check: settings.node_health_check.http_check(port),
                    addr: SocketAddr::new(b.address, port),
                }));
            }
            out_services.push(DesiredService {
                name,
                vips: entries,
                mode: ServiceMode {
                    l2: false,
                    affinity_client_ip: affinity,
                },
                backends,
                source_ranges: source_ranges.clone(),
            });
        }
    }
    // `out_services` lists the oldest Service first (`handled`'s order): where the maps
    // cannot hold them all, the agent leaves out the newest (`Agent::apply_admitting`).

    // Decapsulate from every balancer node's address: the balancers are cluster nodes, so
    // the allow list follows the Node objects instead of a hand-kept list.
    let mut decap_v4 = BTreeSet::new();
    let mut decap_v6 = BTreeSet::new();
    for n in nodes {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        if !settings
            .balancer_node_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            continue;
        }
        let a = NodeAddrs::of(n);
        if let Some(v4) = a.v4 {
            decap_v4.insert((v4, 32));
        }
        if let Some(v6) = a.v6 {
            decap_v6.insert((v6, 128));
        }
    }
    let mut local_v4: Vec<Ipv4Addr> = Vec::new();
    let mut local_v6: Vec<Ipv6Addr> = Vec::new();
    for a in local_addresses {
        match a {
            IpAddr::V4(v4) => local_v4.push(*v4),
            IpAddr::V6(v6) => local_v6.push(*v6),
        }
    }
    local_v4.sort();
    local_v4.dedup();
    local_v6.sort();
    local_v6.dedup();
    Translation {
        desired: Desired {
            services: out_services,
            decap_v4: decap_v4.into_iter().collect(),
            local_v4,
            decap_v6: decap_v6.into_iter().collect(),
            local_v6,
        },
        warnings,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("a Service")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("an EndpointSlice")
    }

    fn node(name: &str, addrs: &[&str]) -> Node {
        let addresses: Vec<_> = addrs
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .chain(std::iter::once(
                json!({"type": "Hostname", "address": name}),
            ))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "7",
                         "labels": {"kubernetes.io/hostname": name}},
            "status": {"addresses": addresses}
        }))
        .expect("a Node")
    }

    /// A `web` Service as the API server returns it, with `patch` merged into its spec.
    fn web(patch: serde_json::Value, ingress: &[&str]) -> Service {
        let mut spec = json!({
            "type": "LoadBalancer",
            "loadBalancerClass": "l3lb.io/xdp",
            "externalTrafficPolicy": "Local",
            "sessionAffinity": "None",
            "clusterIP": "10.96.0.10",
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 31080}],
            "selector": {"app": "web"}
        });
        if let (Some(s), Some(p)) = (spec.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                s.insert(k.clone(), v.clone());
            }
        }
        let ingress: Vec<_> = ingress
            .iter()
            .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
            .collect();
        service(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web", "resourceVersion": "42",
                         "creationTimestamp": "2026-11-25T10:00:00Z"},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress}}
        }))
    }

    /// A slice of `web` with (node, ready, serving, terminating) endpoints.
    fn web_slice(name: &str, family: &str, eps: &[(&str, bool, bool, bool)]) -> EndpointSlice {
        let endpoints: Vec<_> = eps
            .iter()
            .enumerate()
            .map(|(i, (node, ready, serving, terminating))| {
                json!({
                    "addresses": [if family == "IPv6" { format!("fd00::{}", i + 1) } else { format!("10.244.0.{}", i + 1) }],
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                    "nodeName": node,
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("web-{i}"), "uid": format!("pod-{i}")}
                })
            })
            .collect();
        slice(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "43",
                         "labels": {"kubernetes.io/service-name": "web",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
    }

    fn nodes() -> Vec<Node> {
        vec![
            node("node-a", &["10.0.0.11", "fd00:10::11"]),
            node("node-b", &["10.0.0.12", "fd00:10::12"]),
            node("node-c", &["10.0.0.13"]),
        ]
    }

    fn settings() -> Settings {
        Settings {
            node_name: "node-b".to_string(),
            ..Settings::default()
        }
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> Translation {
        translate(services, slices, &nodes(), &[], &settings())
    }

    fn backends(s: &DesiredService) -> Vec<(String, u32, bool)> {
        s.backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight, b.local))
            .collect()
    }

    #[test]
    fn ingress_ips_times_ports_are_vips_and_nodes_weighted_by_ready_endpoints() {
        let svc = web(
            json!({"ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
            ]}),
            &["192.0.2.10", "192.0.2.11"],
        );
        let eps = web_slice(
            "web-abc",
            "IPv4",
            &[
                ("node-a", true, true, false),
                ("node-a", true, true, false),
                ("node-b", true, true, false),
                ("node-c", false, false, false),
            ],
        );
        let t = run(&[svc], &[eps]);
        assert_eq!(t.warnings, vec![]);
        assert_eq!(t.desired.services.len(), 1);
        let s = &t.desired.services[0];
        assert_eq!(s.name, "shop/web/v4");
        let vips: Vec<String> = s
            .vips
            .iter()
            .map(|(a, p, proto)| format!("{a}:{p}/{proto}"))
            .collect();
        assert_eq!(
            vips,
            [
                "192.0.2.10:53/17",
                "192.0.2.10:80/6",
                "192.0.2.11:53/17",
                "192.0.2.11:80/6"
            ]
        );
        // node-c's only endpoint is not ready: not a backend. node-b is this node: local.
        assert_eq!(
            backends(s),
            [
                ("10.0.0.11".to_string(), 2, false),
                ("10.0.0.12".to_string(), 1, true)
            ]
        );
        assert_eq!(s.source_ranges, vec![]);
        assert!(!s.mode.affinity_client_ip && !s.mode.l2);
    }

    #[test]
    fn only_load_balancers_of_our_class_unless_unclassed_are_taken() {
        let other = web(
            json!({"loadBalancerClass": "example.com/other"}),
            &["192.0.2.10"],
        );
        let unclassed = {
            let mut s = web(json!({}), &["192.0.2.10"]);
            if let Some(spec) = s.spec.as_mut() {
                spec.load_balancer_class = None;
            }
            s
        };
        let cluster_ip = web(json!({"type": "ClusterIP"}), &["192.0.2.10"]);
        let eps = web_slice("web-abc", "IPv4", &[("node-a", true, true, false)]);
        for svc in [&other, &unclassed, &cluster_ip] {
            let t = run(std::slice::from_ref(svc), std::slice::from_ref(&eps));
            assert!(t.desired.services.is_empty(), "{svc:?}");
        }
        let take = Settings {
            take_unclassed: true,
            ..settings()
        };
        let t = translate(
            &[unclassed],
            std::slice::from_ref(&eps),
            &nodes(),
            &[],
            &take,
        );
        assert_eq!(t.desired.services.len(), 1);
        let t = translate(&[other], &[eps], &nodes(), &[], &take);
        assert!(
            t.desired.services.is_empty(),
            "another class is never taken"
        );
    }

    #[test]
    fn terminating_but_serving_nodes_keep_flows_and_take_new_ones_only_when_none_is_ready() {
        let svc = web(json!({}), &["192.0.2.10"]);
        let eps = web_slice(
            "web-abc",
            "IPv4",
            &[
                ("node-a", true, true, false),
                ("node-b", false, true, true),
                ("node-b", false, true, true),
                ("node-c", false, false, true),
            ],
        );
        let t = run(std::slice::from_ref(&svc), &[eps]);
        assert_eq!(
            backends(&t.desired.services[0]),
            [
                ("10.0.0.11".to_string(), 1, false),
                ("10.0.0.12".to_string(), 0, true)
            ]
        );
        // Once no endpoint is ready anywhere (a one-replica rollout, the last node
        // drained), the serving terminating ones take new connections, as the nodes'
        // proxies fall back to them; an endpoint neither ready nor serving never does.
        let eps = web_slice(
            "web-abc",
            "IPv4",
            &[
                ("node-a", false, true, true),
                ("node-b", false, true, true),
                ("node-b", false, true, true),
                ("node-c", false, false, true),
            ],
        );
        let t = run(&[svc], &[eps]);
        assert_eq!(
            backends(&t.desired.services[0]),
            [
                ("10.0.0.11".to_string(), 1, false),
                ("10.0.0.12".to_string(), 2, true)
            ]
        );
    }

    #[test]
    fn ranges_affinity_and_policy_cluster_warning() {
        let svc = web(
            json!({
                "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8::/32", "203.0.113.7/32", "bogus"],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
                "externalTrafficPolicy": "Cluster"
            }),
            &["192.0.2.10"],
        );
        let eps = web_slice("web-abc", "IPv4", &[("node-a", true, true, false)]);
        let t = run(&[svc], &[eps]);
        let s = &t.desired.services[0];
        assert!(s.mode.affinity_client_ip);
        let ranges: Vec<String> = s.source_ranges.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            ranges,
            ["198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"]
        );
        let reasons: Vec<&str> = t.warnings.iter().map(|w| w.reason).collect();
        assert_eq!(reasons, ["ClientAddressLost", "InvalidSourceRange"]);
        assert!(
            t.warnings
                .iter()
                .all(|w| w.service == "shop/web" && w.uid == "uid-web")
        );
    }

    #[test]
    fn only_invalid_source_ranges_fail_closed() {
        let svc = web(
            json!({"loadBalancerSourceRanges": ["nonsense"]}),
            &["192.0.2.10"],
        );
        let eps = web_slice("web-abc", "IPv4", &[("node-a", true, true, false)]);
        let t = run(&[svc], &[eps]);
        assert!(
            t.desired.services.is_empty(),
            "never open to everyone by mistake"
        );
    }

    #[test]
    fn dual_stack_services_get_one_service_per_family_counted_once() {
        let svc = web(
            json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}),
            &["192.0.2.10", "2001:db8::10"],
        );
        let eps4 = web_slice(
            "web-v4",
            "IPv4",
            &[("node-a", true, true, false), ("node-c", true, true, false)],
        );
        let eps6 = web_slice(
            "web-v6",
            "IPv6",
            &[("node-a", true, true, false), ("node-c", true, true, false)],
        );
        let t = run(&[svc], &[eps4, eps6]);
        let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop/web/v4", "shop/web/v6"]);
        assert_eq!(
            backends(&t.desired.services[0]),
            [
                ("10.0.0.11".to_string(), 1, false),
                ("10.0.0.13".to_string(), 1, false)
            ]
        );
        // node-c has no IPv6 InternalIP: unreachable over IPv6, so not a v6 backend.
        assert_eq!(
            backends(&t.desired.services[1]),
            [("fd00:10::11".to_string(), 1, false)]
        );
        assert_eq!(
            t.desired.services[1].vips,
            vec![("2001:db8::10".parse().expect("ip"), 80, 6)]
        );
    }

    #[test]
    fn nodes_excluded_from_external_load_balancers_are_no_backends() {
        let svc = web(json!({}), &["192.0.2.10"]);
        let eps = web_slice("web-abc", "IPv4", &[ready_on("node-a"), ready_on("node-b")]);
        let mut ns = nodes();
        ns[0]
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(EXCLUDE_LABEL.to_string(), String::new());
        let t = translate(&[svc], &[eps], &ns, &[], &settings());
        assert_eq!(
            backends(&t.desired.services[0]),
            [("10.0.0.12".to_string(), 1, true)]
        );
        assert_eq!(t.desired.decap_v4.len(), 3, "it may still be a balancer");
    }

    fn ready_on(node: &str) -> (&str, bool, bool, bool) {
        (node, true, true, false)
    }

    #[test]
    fn no_ingress_or_no_endpoints() {
        let pending = web(json!({}), &[]);
        let t = run(&[pending], &[]);
        assert!(
            t.desired.services.is_empty(),
            "no ingress IP yet: nothing to balance"
        );
        let empty = web(json!({}), &["192.0.2.10"]);
        let t = run(&[empty], &[]);
        assert_eq!(t.desired.services.len(), 1, "VIP kept, with no backend");
        assert!(t.desired.services[0].backends.is_empty());
    }

    #[test]
    fn a_vip_claimed_twice_stays_with_the_older_service() {
        let older = web(json!({}), &["192.0.2.10"]);
        let mut newer = web(json!({}), &["192.0.2.10"]);
        newer.metadata.name = Some("web2".to_string());
        newer.metadata.uid = Some("uid-web2".to_string());
        newer.metadata.creation_timestamp =
            Some(serde_json::from_value(json!("2026-11-25T11:00:00Z")).expect("time"));
        let t = run(&[newer, older], &[]);
        let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop/web/v4"]);
        assert_eq!(t.warnings[0].reason, "VIPConflict");
        assert_eq!(t.warnings[0].service, "shop/web2");
    }

    #[test]
    fn services_are_listed_oldest_first() {
        let older = web(json!({}), &["192.0.2.10"]);
        let mut newer = web(json!({}), &["192.0.2.11"]);
        newer.metadata.name = Some("a-newer".to_string());
        newer.metadata.uid = Some("uid-a-newer".to_string());
        newer.metadata.creation_timestamp =
            Some(serde_json::from_value(json!("2026-11-25T11:00:00Z")).expect("time"));
        let t = run(&[newer, older], &[]);
        let names: Vec<&str> = t.desired.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop/web/v4", "shop/a-newer/v4"]);
    }

    /// (key, probe address, how) of each check.
    fn checks(t: &Translation) -> Vec<(String, String, String)> {
        t.checks
            .iter()
            .map(|c| {
                let h = &c.check;
                (
                    format!("{} {}", c.key.0, c.key.1),
                    c.addr.to_string(),
                    format!(
                        "{:?} {:?} {} {:?} {:?} {}/{}",
                        h.kind, h.port, h.path, h.interval, h.timeout, h.rise, h.fall
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn local_services_probe_each_node_on_its_health_check_node_port() {
        let svc = web(
            json!({"healthCheckNodePort": 32000, "ipFamilies": ["IPv4", "IPv6"]}),
            &["192.0.2.10", "2001:db8::10"],
        );
        let eps = web_slice("web-abc", "IPv4", &[ready_on("node-a"), ready_on("node-b")]);
        let probing = Settings {
            node_health_check: NodeHealthCheck {
                enabled: true,
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(100),
                rise: 4,
                fall: 5,
            },
            ..settings()
        };
        let t = translate(
            std::slice::from_ref(&svc),
            std::slice::from_ref(&eps),
            &nodes(),
            &[],
            &probing,
        );
        let how = "Http Some(32000) /healthz 300ms 100ms 4/5".to_string();
        // The node's own address, not the VIP: that is where its proxy answers. This node
        // (node-b) is probed too: its proxy may fail like any other.
        assert_eq!(
            checks(&t),
            [
                (
                    "shop/web/v4 10.0.0.11".to_string(),
                    "10.0.0.11:32000".to_string(),
                    how.clone()
                ),
                (
                    "shop/web/v4 10.0.0.12".to_string(),
                    "10.0.0.12:32000".to_string(),
                    how.clone()
                ),
                (
                    "shop/web/v6 fd00:10::11".to_string(),
                    "[fd00:10::11]:32000".to_string(),
                    how.clone()
                ),
                (
                    "shop/web/v6 fd00:10::12".to_string(),
                    "[fd00:10::12]:32000".to_string(),
                    how
                ),
            ]
        );

        let off = Settings {
            node_health_check: NodeHealthCheck {
                enabled: false,
                ..NodeHealthCheck::default()
            },
            ..settings()
        };
        let t = translate(
            std::slice::from_ref(&svc),
            std::slice::from_ref(&eps),
            &nodes(),
            &[],
            &off,
        );
        assert!(t.checks.is_empty(), "turned off");
        assert_eq!(
            t.desired.services.len(),
            2,
            "the Service is balanced all the same"
        );
    }

    #[test]
    fn cluster_services_and_local_ones_without_a_port_get_no_probe() {
        let eps = web_slice("web-abc", "IPv4", &[ready_on("node-a")]);
        // kube-proxy answers healthCheckNodePort only for `Local`; with `Cluster` any node
        // forwards, so there is nothing to ask.
        let cluster = web(
            json!({"externalTrafficPolicy": "Cluster", "healthCheckNodePort": 32000}),
            &["192.0.2.10"],
        );
        let t = run(&[cluster], std::slice::from_ref(&eps));
        assert_eq!(t.desired.services.len(), 1);
        assert!(t.checks.is_empty());
        let no_port = web(json!({}), &["192.0.2.10"]);
        let t = run(&[no_port], std::slice::from_ref(&eps));
        assert_eq!(t.desired.services[0].backends.len(), 1);
        assert!(t.checks.is_empty());
        let default = web(json!({"healthCheckNodePort": 32000}), &["192.0.2.10"]);
        let t = run(&[default], &[eps]);
        assert_eq!(
            checks(&t),
            [(
                "shop/web/v4 10.0.0.11".to_string(),
                "10.0.0.11:32000".to_string(),
                "Http Some(32000) /healthz 5s 2s 2/3".to_string()
            )]
        );
    }

    #[test]
    fn decap_allow_list_follows_balancer_nodes_and_unsupported_ports_warn() {
        let svc = web(
            json!({"ports": [{"port": 80, "protocol": "SCTP"}]}),
            &["192.0.2.10"],
        );
        let mut labelled = Settings::default();
        labelled
            .balancer_node_labels
            .insert("kubernetes.io/hostname".into(), "node-a".into());
        let t = translate(
            &[svc],
            &[],
            &nodes(),
            &["10.0.0.12".parse().expect("ip")],
            &labelled,
        );
        assert!(t.desired.services.is_empty());
        assert_eq!(t.warnings[0].reason, "UnsupportedPort");
        assert_eq!(
            t.desired.decap_v4,
            vec![("10.0.0.11".parse().expect("ip"), 32)]
        );
        assert_eq!(
            t.desired.decap_v6,
            vec![("fd00:10::11".parse().expect("ip"), 128)]
        );
        assert_eq!(
            t.desired.local_v4,
            vec!["10.0.0.12".parse::<Ipv4Addr>().expect("ip")]
        );
        let all = translate(&[], &[], &nodes(), &[], &Settings::default());
        assert_eq!(all.desired.decap_v4.len(), 3);
        assert_eq!(all.desired.decap_v6.len(), 2);
    }
}
