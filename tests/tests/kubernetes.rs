//! `l3lb run --kubernetes` against the API server stand-in (`l3lb_tests::kube_api`):
//! objects are created, changed and deleted there, and every expectation is read back
//! from the real BPF maps of the running agent (`l3lb status --json` on its pins).
//! Needs root (network namespace, XDP).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use l3lb::status::Status;
use l3lb_tests::{
    ChildGuard, HealthzServer, Lab, LabSpec, Netns,
    kube_api::{ApiServer, Kind},
    l3lb_bin,
    scenario::status_of_pins,
};
use lb_common::map_names;
use serde_json::{Value, json};

/// Maglev table size the agent is started with (prime; small keeps `status` quick).
const TABLE: u32 = 4093;
/// How long the maps may take to follow a change (debounce, backoff, relist).
const CONVERGE: Duration = Duration::from_secs(20);

/// Lab node names and addresses double as Kubernetes Node names and InternalIPs.
const BALANCER: (&str, &str, &str) = ("balancer-0", "10.77.0.2", "fd77::2");
const NODE_A: (&str, &str, &str) = ("backend-0", "10.77.0.11", "fd77::11");
const NODE_B: (&str, &str, &str) = ("backend-1", "10.77.0.12", "fd77::12");

/// The lab's nodes run no service proxy answering `healthCheckNodePort` (the Services
/// have one, as the API server allocates it for `Local`), so tests about anything else
/// turn the node probes off; `local_nodes_are_probed_…` turns them on.
const NO_NODE_PROBES: &str = "{enabled: false}";

/// A lab with the stand-in and an agent in `balancer-0`. Field order is drop order.
struct KubeLab {
    agent: ChildGuard,
    api: ApiServer,
    pin_path: PathBuf,
    lab: Lab,
}

fn node(n: (&str, &str, &str)) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.0, "labels": {"kubernetes.io/hostname": n.0, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": n.1},
                {"type": "InternalIP", "address": n.2},
                {"type": "Hostname", "address": n.0}
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        }
    })
}

/// A LoadBalancer Service of l3lb's class; `spec` fields override the defaults.
fn service(name: &str, ingress: &[&str], spec: Value) -> Value {
    let mut s = json!({
        "type": "LoadBalancer",
        "loadBalancerClass": "l3lb.io/xdp",
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000,
        "sessionAffinity": "None",
        "clusterIP": "10.96.0.50",
        "clusterIPs": ["10.96.0.50"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}],
        "selector": {"app": name}
    });
    if let (Some(s), Some(p)) = (s.as_object_mut(), spec.as_object()) {
        for (k, v) in p {
            s.insert(k.clone(), v.clone());
        }
    }
    let ingress: Vec<Value> = ingress
        .iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": s,
        "status": {"loadBalancer": {"ingress": ingress}}
    })
}

/// An endpoint: (node, ready, serving, terminating).
type Ep<'a> = (&'a str, bool, bool, bool);

fn ready(node: &str) -> Ep<'_> {
    (node, true, true, false)
}

/// An EndpointSlice of `service` as the EndpointSlice controller writes it.
fn slice(name: &str, service: &str, family: &str, endpoints: &[Ep<'_>]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (node, ready, serving, terminating))| {
            let addr = if family == "IPv6" {
                format!("fd00:244::{:x}", i + 1)
            } else {
                format!("10.244.1.{}", i + 1)
            };
            json!({
                "addresses": [addr],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("{service}-{i}"),
                              "uid": format!("{service}-pod-{i}")},
                "zone": "zone-a"
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": "owner", "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": family,
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// One VIP entry as the maps express it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vip {
    affinity: String,
    source_ranges: Vec<String>,
    /// (address, Maglev table entries, local), by address.
    backends: Vec<(String, u32, bool)>,
}

/// The maps by VIP (`ADDRESS:PORT/PROTO`), TCP and UDP entries only (the data plane adds
/// an ICMP marker entry per VIP address for echo and errors).
fn view(status: &Status) -> BTreeMap<String, Vip> {
    status
        .vips
        .iter()
        .filter(|v| v.protocol == "tcp" || v.protocol == "udp")
        .map(|v| {
            let mut backends: Vec<(String, u32, bool)> = status
                .backends
                .iter()
                .filter(|b| b.service == v.service)
                .map(|b| (b.address.to_string(), b.table_entries, b.local))
                .collect();
            backends.sort();
            (
                format!("{}:{}/{}", v.address, v.port, v.protocol),
                Vip {
                    affinity: v.affinity.clone(),
                    source_ranges: v.source_ranges.clone(),
                    backends,
                },
            )
        })
        .collect()
}

/// Backends with the table entries an independent Maglev build gives `weights`;
/// `local` marks the balancer's own address.
fn expected(weights: &[(&str, u32)]) -> Vec<(String, u32, bool)> {
    let input: Vec<(IpAddr, u32)> = weights
        .iter()
        .map(|(a, w)| (a.parse().expect("address"), *w))
        .collect();
    let mut counts = vec![0u32; input.len()];
    if input.iter().any(|(_, w)| *w > 0) {
        for pos in l3lb::maglev::build(&input, TABLE).expect("maglev") {
            counts[pos as usize] += 1;
        }
    }
    let mut out: Vec<(String, u32, bool)> = weights
        .iter()
        .zip(counts)
        .map(|((a, _), c)| (a.to_string(), c, *a == BALANCER.1 || *a == BALANCER.2))
        .collect();
    out.sort();
    out
}

fn vip(affinity: &str, ranges: &[&str], backends: Vec<(String, u32, bool)>) -> Vip {
    Vip {
        affinity: affinity.to_string(),
        source_ranges: ranges.iter().map(|r| r.to_string()).collect(),
        backends,
    }
}

/// `GET path` on the agent's metrics address inside `ns`: (status code, body).
fn http_get(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.enter(move || -> Result<(u16, String)> {
        let addr: SocketAddr = "127.0.0.1:9477".parse()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: l3lb\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        Ok((code, body))
    })?
}

/// Starts `l3lb run --kubernetes` in the balancer's namespace with these settings and
/// kubeconfig, and waits until it watches the API.
fn spawn_agent(lab: &Lab, settings: &Path, kubeconfig: &Path, log: &str) -> Result<ChildGuard> {
    spawn_agent_with(lab, settings, kubeconfig, log, &[])
}

/// `spawn_agent` with `extra` arguments.
fn spawn_agent_with(
    lab: &Lab,
    settings: &Path,
    kubeconfig: &Path,
    log: &str,
    extra: &[&str],
) -> Result<ChildGuard> {
    let (settings, kubeconfig) = (settings.to_string_lossy(), kubeconfig.to_string_lossy());
    let mut args = vec![
        "run",
        "--kubernetes",
        "--config",
        &settings,
        "--node-name",
        BALANCER.0,
        "--kubeconfig",
        &kubeconfig,
        "--log-level",
        "info,l3lb=debug",
    ];
    args.extend_from_slice(extra);
    let mut agent = lab.spawn_in(&lab.balancers[0].ns, l3lb_bin()?, args, log)?;
    agent.wait_for_log("watching the Kubernetes API", Duration::from_secs(30))?;
    Ok(agent)
}

impl KubeLab {
    fn start(nodes: &[(&str, &str, &str)]) -> Result<KubeLab> {
        KubeLab::start_with_debounce(nodes, 100)
    }

    fn start_with_debounce(nodes: &[(&str, &str, &str)], debounce_ms: u64) -> Result<KubeLab> {
        KubeLab::start_with(nodes, debounce_ms, NO_NODE_PROBES)
    }

    /// An agent with `debounce_ms` and the `kubernetes.node_health_check` setting given.
    fn start_with(
        nodes: &[(&str, &str, &str)],
        debounce_ms: u64,
        node_health_check: &str,
    ) -> Result<KubeLab> {
        KubeLab::start_with_settings(nodes, debounce_ms, node_health_check, "")
    }

    /// Like `start_with`, with `extra` lines added to the settings file.
    fn start_with_settings(
        nodes: &[(&str, &str, &str)],
        debounce_ms: u64,
        node_health_check: &str,
        extra: &str,
    ) -> Result<KubeLab> {
        let lab = Lab::new(LabSpec {
            backends: 2,
            balancers: 1,
        })?;
        let ns = &lab.balancers[0].ns;
        let api = ApiServer::start_in(ns)?;
        for n in nodes {
            api.apply(node(*n))?;
        }
        let pin_path = lab.pin_path("balancer-0");
        let kubeconfig = lab.write_file("kubeconfig", &api.kubeconfig())?;
        let settings = lab.write_file(
            "balancer-0.yaml",
            &format!(
                "interface: eth0\nxdp_mode: native\npin_path: {}\nmaglev_table_size: {TABLE}\n{extra}\
                 kubernetes:\n  debounce_ms: {debounce_ms}\n  node_health_check: {node_health_check}\n",
                pin_path.display()
            ),
        )?;
        let agent = spawn_agent(&lab, &settings, &kubeconfig, "balancer-0.log")?;
        Ok(KubeLab {
            agent,
            api,
            pin_path,
            lab,
        })
    }

    /// Stops the agent (which leaves the data plane on its pins) and starts it again with
    /// the same settings, logging to `log`.
    fn restart(&mut self, log: &str) -> Result<()> {
        let status = self.agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status}:\n{}", self.agent.log());
        }
        self.agent = spawn_agent(
            &self.lab,
            &self.lab.path("balancer-0.yaml"),
            &self.lab.path("kubeconfig"),
            log,
        )?;
        Ok(())
    }

    fn ns(&self) -> &Netns {
        &self.lab.balancers[0].ns
    }

    fn status(&self) -> Result<Status> {
        status_of_pins(&self.pin_path)
    }

    /// Waits until the maps match `want`; fails with the last difference and the log.
    fn converges(&mut self, what: &str, want: impl Fn(&Status) -> Result<(), String>) -> Status {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let last = match self.status() {
                Ok(s) => match want(&s) {
                    Ok(()) => return s,
                    Err(e) => e,
                },
                Err(e) => format!("{e:#}"),
            };
            if let Ok(Some(exit)) = self.agent.try_status() {
                panic!("{what}: the agent exited ({exit}):\n{}", self.agent.log());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: the maps did not converge within {CONVERGE:?}: {last}\nagent log:\n{}",
                    self.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the VIP entries are exactly `want`.
    fn vips_are(&mut self, what: &str, want: &[(&str, Vip)]) -> Status {
        let want: BTreeMap<String, Vip> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.converges(what, |s| {
            let got = view(s);
            if got == want {
                Ok(())
            } else {
                Err(format!("maps {got:#?}\nwanted {want:#?}"))
            }
        })
    }

    /// Waits until `/readyz` answers `code`.
    fn readyz_becomes(&self, code: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let got = http_get(self.ns(), "/readyz");
            if let Ok((c, body)) = &got
                && *c == code
            {
                return body.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "/readyz did not answer {code} within {within:?} (last {got:?}); log:\n{}",
                    self.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn decap_is(want: &[&str]) -> impl Fn(&Status) -> Result<(), String> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    move |s: &Status| {
        if s.decap_allow == want {
            Ok(())
        } else {
            Err(format!(
                "decap allow list {:?}, wanted {want:?}",
                s.decap_allow
            ))
        }
    }
}

/// `--metrics-host` (the chart's metricsOnNodeIP, from status.hostIP) puts /metrics,
/// /healthz and /readyz on that address of the node, at the settings' port, and on no
/// other: loopback no longer answers.
#[test]
fn metrics_are_served_on_the_node_address_given() -> Result<()> {
    let lab = Lab::new(LabSpec {
        backends: 1,
        balancers: 1,
    })?;
    let ns = &lab.balancers[0].ns;
    let api = ApiServer::start_in(ns)?;
    api.apply(node(BALANCER))?;
    let pin_path = lab.pin_path("balancer-0");
    let kubeconfig = lab.write_file("kubeconfig", &api.kubeconfig())?;
    let settings = lab.write_file(
        "balancer-0.yaml",
        &format!(
            "interface: eth0\nxdp_mode: native\npin_path: {}\nmaglev_table_size: {TABLE}\n\
             metrics_address: 127.0.0.1:9479\nkubernetes:\n  node_health_check: {NO_NODE_PROBES}\n",
            pin_path.display()
        ),
    )?;
    let node_ip = lab.balancers[0].ipv4;
    let agent = spawn_agent_with(
        &lab,
        &settings,
        &kubeconfig,
        "balancer-0.log",
        &["--metrics-host", &node_ip.to_string()],
    )?;
    let answers = |ip: IpAddr| {
        ns.enter(move || {
            TcpStream::connect_timeout(&SocketAddr::new(ip, 9479), Duration::from_secs(2)).is_ok()
        })
    };
    assert!(
        answers(IpAddr::V4(node_ip))?,
        "served on the node's address; log:\n{}",
        agent.log()
    );
    assert!(!answers("127.0.0.1".parse()?)?, "not on loopback");
    Ok(())
}

#[test]
fn services_follow_create_scale_update_and_delete() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A, NODE_B])?;
    k.readyz_becomes(200, CONVERGE);

    // Create: ingress IP × port is a VIP, the nodes with ready endpoints its backends.
    k.api.apply(service("web", &["10.77.100.10"], json!({})))?;
    k.api.apply(slice(
        "web-x1",
        "web",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    let s = k.vips_are(
        "create",
        &[(
            "10.77.100.10:80/tcp",
            vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
        )],
    );
    assert_eq!(s.vips[0].forwarding, "ipip");
    // Every node is a balancer here, so each one's address may send encapsulated packets.
    k.converges(
        "decap allow list from the Nodes",
        decap_is(&[
            "10.77.0.2/32",
            "10.77.0.11/32",
            "10.77.0.12/32",
            "fd77::2/128",
            "fd77::11/128",
            "fd77::12/128",
        ]),
    );

    // Scale: weights follow the count of ready endpoints; this node is passed locally.
    k.api.apply(slice(
        "web-x1",
        "web",
        "IPv4",
        &[
            ready(NODE_A.0),
            ready(NODE_A.0),
            ready(NODE_A.0),
            ready(NODE_B.0),
            ready(BALANCER.0),
            (NODE_B.0, false, false, false),
        ],
    ))?;
    k.vips_are(
        "scale",
        &[(
            "10.77.100.10:80/tcp",
            vip(
                "none",
                &[],
                expected(&[(NODE_A.1, 3), (NODE_B.1, 1), (BALANCER.1, 1)]),
            ),
        )],
    );

    // Update ports, source ranges and affinity in one change.
    k.api.apply(service(
        "web",
        &["10.77.100.10"],
        json!({
            "ports": [
                {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443, "nodePort": 30443},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}
            ],
            "loadBalancerSourceRanges": ["10.77.0.0/24", "198.51.100.0/24"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}
        }),
    ))?;
    let backends = expected(&[(NODE_A.1, 3), (NODE_B.1, 1), (BALANCER.1, 1)]);
    let ranges = ["10.77.0.0/24", "198.51.100.0/24"];
    k.vips_are(
        "update ports, ranges, affinity",
        &[
            (
                "10.77.100.10:443/tcp",
                vip("client_ip", &ranges, backends.clone()),
            ),
            ("10.77.100.10:53/udp", vip("client_ip", &ranges, backends)),
        ],
    );

    // A node whose endpoints all terminate (still serving) keeps its flows, takes no new ones.
    k.api.apply(slice(
        "web-x1",
        "web",
        "IPv4",
        &[ready(NODE_A.0), (NODE_B.0, false, true, true)],
    ))?;
    let backends = expected(&[(NODE_A.1, 1), (NODE_B.1, 0)]);
    assert_eq!(backends[1], (NODE_B.1.to_string(), 0, false));
    k.vips_are(
        "terminating node at weight 0",
        &[
            (
                "10.77.100.10:443/tcp",
                vip("client_ip", &ranges, backends.clone()),
            ),
            ("10.77.100.10:53/udp", vip("client_ip", &ranges, backends)),
        ],
    );

    // Deleting the EndpointSlice leaves the VIPs with no backend; deleting the Service
    // removes them.
    k.api.delete(Kind::EndpointSlice, "shop", "web-x1")?;
    k.vips_are(
        "endpoint slice deleted",
        &[
            ("10.77.100.10:443/tcp", vip("client_ip", &ranges, vec![])),
            ("10.77.100.10:53/udp", vip("client_ip", &ranges, vec![])),
        ],
    );
    k.api.delete(Kind::Service, "shop", "web")?;
    k.vips_are("service deleted", &[]);
    Ok(())
}

#[test]
fn dual_stack_backends_follow_nodes_coming_and_going() -> Result<()> {
    // NODE_B is not a Node yet: its endpoints cannot be placed.
    let mut k = KubeLab::start(&[BALANCER, NODE_A])?;
    k.api.apply(service(
        "dual",
        &["10.77.100.20", "fd77:100::20"],
        json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
    ))?;
    k.api.apply(slice(
        "dual-4",
        "dual",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    k.api.apply(slice(
        "dual-6",
        "dual",
        "IPv6",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    k.vips_are(
        "dual stack, one node known",
        &[
            (
                "10.77.100.20:80/tcp",
                vip("none", &[], expected(&[(NODE_A.1, 1)])),
            ),
            (
                "fd77:100::20:80/tcp",
                vip("none", &[], expected(&[(NODE_A.2, 1)])),
            ),
        ],
    );
    k.converges(
        "decap without the unknown node",
        decap_is(&[
            "10.77.0.2/32",
            "10.77.0.11/32",
            "fd77::2/128",
            "fd77::11/128",
        ]),
    );

    k.api.apply(node(NODE_B))?;
    k.vips_are(
        "node added",
        &[
            (
                "10.77.100.20:80/tcp",
                vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
            ),
            (
                "fd77:100::20:80/tcp",
                vip("none", &[], expected(&[(NODE_A.2, 1), (NODE_B.2, 1)])),
            ),
        ],
    );
    k.converges(
        "decap with the new node",
        decap_is(&[
            "10.77.0.2/32",
            "10.77.0.11/32",
            "10.77.0.12/32",
            "fd77::2/128",
            "fd77::11/128",
            "fd77::12/128",
        ]),
    );

    k.api.delete(Kind::Node, "", NODE_A.0)?;
    k.vips_are(
        "node removed",
        &[
            (
                "10.77.100.20:80/tcp",
                vip("none", &[], expected(&[(NODE_B.1, 1)])),
            ),
            (
                "fd77:100::20:80/tcp",
                vip("none", &[], expected(&[(NODE_B.2, 1)])),
            ),
        ],
    );
    k.converges(
        "decap without the removed node",
        decap_is(&[
            "10.77.0.2/32",
            "10.77.0.12/32",
            "fd77::2/128",
            "fd77::12/128",
        ]),
    );
    Ok(())
}

#[test]
fn an_expired_watch_relists_and_leaves_no_stale_entry() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A, NODE_B])?;
    for (name, ip) in [("a", "10.77.100.30"), ("b", "10.77.100.31")] {
        k.api.apply(service(name, &[ip], json!({})))?;
        k.api.apply(slice(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[ready(NODE_A.0)],
        ))?;
    }
    k.vips_are(
        "before",
        &[
            (
                "10.77.100.30:80/tcp",
                vip("none", &[], expected(&[(NODE_A.1, 1)])),
            ),
            (
                "10.77.100.31:80/tcp",
                vip("none", &[], expected(&[(NODE_A.1, 1)])),
            ),
        ],
    );
    let lists_before = list_requests(&k.api, "/api/v1/services");

    // Changes the agent never sees as watch events: history is compacted and the watches
    // closed, so resuming from the old resourceVersion gets 410 Gone and must relist.
    k.api.expire(|m| {
        m.delete(Kind::Service, "shop", "a")?;
        m.delete(Kind::EndpointSlice, "shop", "a-1")?;
        m.apply(slice(
            "b-1",
            "b",
            "IPv4",
            &[ready(NODE_A.0), ready(NODE_B.0), ready(NODE_B.0)],
        ))?;
        m.apply(service("c", &["10.77.100.32"], json!({})))?;
        m.apply(slice("c-1", "c", "IPv4", &[ready(NODE_B.0)]))?;
        Ok(())
    })?;
    k.vips_are(
        "after the relist",
        &[
            (
                "10.77.100.31:80/tcp",
                vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 2)])),
            ),
            (
                "10.77.100.32:80/tcp",
                vip("none", &[], expected(&[(NODE_B.1, 1)])),
            ),
        ],
    );
    // The agent resumed its watch from the old resourceVersion and got the 410.
    let log = k.agent.log();
    assert!(
        log.contains("too old resource version"),
        "no 410 Gone seen by the agent:\n{log}"
    );
    assert!(
        list_requests(&k.api, "/api/v1/services") > lists_before,
        "the services were listed again: {:?}",
        k.api.requests()
    );
    k.readyz_becomes(200, CONVERGE);
    Ok(())
}

#[test]
fn a_closed_watch_resumes_without_relisting() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A, NODE_B])?;
    k.api.apply(service("e", &["10.77.100.35"], json!({})))?;
    k.api.apply(slice("e-1", "e", "IPv4", &[ready(NODE_A.0)]))?;
    k.vips_are(
        "before",
        &[(
            "10.77.100.35:80/tcp",
            vip("none", &[], expected(&[(NODE_A.1, 1)])),
        )],
    );
    let lists = list_requests(&k.api, "/apis/discovery.k8s.io/v1/endpointslices");
    let watches = k.api.requests().len();

    // The server ends every watch (as at the end of timeoutSeconds, or an API server
    // restart behind a load balancer): the agent watches again from where it was and
    // sees the next change as an event, with no relist.
    k.api.close_watches();
    k.api.apply(slice("e-1", "e", "IPv4", &[ready(NODE_B.0)]))?;
    k.vips_are(
        "after the watch was closed",
        &[(
            "10.77.100.35:80/tcp",
            vip("none", &[], expected(&[(NODE_B.1, 1)])),
        )],
    );
    assert!(k.api.requests().len() > watches, "watched again");
    assert_eq!(
        list_requests(&k.api, "/apis/discovery.k8s.io/v1/endpointslices"),
        lists,
        "no relist: {:?}",
        k.api.requests()
    );
    k.readyz_becomes(200, CONVERGE);
    Ok(())
}

#[test]
fn a_burst_of_changes_is_applied_as_one_batch() -> Result<()> {
    let mut k = KubeLab::start_with_debounce(&[BALANCER, NODE_A, NODE_B], 1000)?;
    k.readyz_becomes(200, CONVERGE);
    const APPLIED: &str = "applied Kubernetes state";
    let before = k.agent.log().matches(APPLIED).count();
    let mut want = Vec::new();
    for i in 0..5 {
        let name = format!("burst{i}");
        let ip = format!("10.77.100.{}", 70 + i);
        k.api.apply(service(&name, &[&ip], json!({})))?;
        k.api.apply(slice(
            &format!("{name}-1"),
            &name,
            "IPv4",
            &[ready(NODE_A.0), ready(NODE_B.0)],
        ))?;
        want.push((
            format!("{ip}:80/tcp"),
            vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
        ));
    }
    let want: Vec<(&str, Vip)> = want.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    k.vips_are("all five services", &want);
    let applies = k.agent.log().matches(APPLIED).count() - before;
    assert_eq!(
        applies,
        1,
        "ten changes within the debounce window are one apply; log:\n{}",
        k.agent.log()
    );
    Ok(())
}

/// How many list (not watch) requests the stand-in served for `path`.
fn list_requests(api: &ApiServer, path: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            let target = r.split_whitespace().nth(1).unwrap_or("");
            let (p, q) = target.split_once('?').unwrap_or((target, ""));
            p == path && !q.contains("watch=true")
        })
        .count()
}

#[test]
fn a_restarted_agent_keeps_the_ids_and_counters_of_services_and_backends() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A, NODE_B])?;
    k.api.apply(service("r", &["10.77.100.50"], json!({})))?;
    // Node B's endpoints come first, so B gets the first backend id; a fresh agent
    // would number the nodes in address order instead (A first).
    k.api.apply(slice("r-1", "r", "IPv4", &[ready(NODE_B.0)]))?;
    k.vips_are(
        "on B",
        &[(
            "10.77.100.50:80/tcp",
            vip("none", &[], expected(&[(NODE_B.1, 1)])),
        )],
    );
    k.api.apply(slice(
        "r-1",
        "r",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    let both = [(
        "10.77.100.50:80/tcp",
        vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
    )];
    let ids = |s: &Status| -> BTreeMap<String, (u32, u32)> {
        s.backends
            .iter()
            .map(|b| (b.address.to_string(), (b.service, b.id)))
            .collect()
    };
    let before = ids(&k.vips_are("on A and B", &both));
    assert!(
        before[NODE_B.1].1 < before[NODE_A.1].1,
        "B was numbered first: {before:?}"
    );
    // Counters the restarted agent must carry on from (a per-CPU entry written through
    // the pin stands in for forwarded packets).
    let b_id = before[NODE_B.1].1;
    let counters = k.pin_path.join("v1/maps").join(map_names::BACKEND_STATS);
    let mut stats: aya::maps::PerCpuArray<aya::maps::MapData, lb_common::BackendStats> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
            aya::maps::MapData::from_pin(&counters)?,
        ))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let one = lb_common::BackendStats {
        packets: 7,
        bytes: 700,
    };
    stats.set(b_id, aya::maps::PerCpuValues::try_from(vec![one; cpus])?, 0)?;
    drop(stats);

    k.restart("balancer-0-restarted.log")?;
    // The pins are the earlier agent's until the new one has the cluster's state.
    k.agent.wait_for_log(
        "the Kubernetes state is complete: the program now runs on the interface",
        CONVERGE,
    )?;
    let s = k.vips_are("after the restart", &both);
    // Connection-table entries name backends by id: a renumbered node would get the
    // other node's established flows.
    assert_eq!(ids(&s), before, "ids changed across the restart");
    let b = s
        .backends
        .iter()
        .find(|b| b.id == b_id)
        .context("B's entry")?;
    assert_eq!(
        b.packets,
        7 * cpus as u64,
        "B's counters carried on:\n{}",
        k.agent.log()
    );
    Ok(())
}

#[test]
fn services_beyond_the_maps_are_left_out_newest_first_and_the_rest_stay_current() -> Result<()> {
    let mut k = KubeLab::start_with_settings(
        &[BALANCER, NODE_A, NODE_B],
        100,
        NO_NODE_PROBES,
        "max_services: 2\n",
    )?;
    let on_a = vip("none", &[], expected(&[(NODE_A.1, 1)]));
    let on_b = vip("none", &[], expected(&[(NODE_B.1, 1)]));
    for (name, ip) in [("a", "10.77.100.60"), ("b", "10.77.100.61")] {
        k.api.apply(service(name, &[ip], json!({})))?;
        k.api.apply(slice(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[ready(NODE_A.0)],
        ))?;
    }
    let two = [
        ("10.77.100.60:80/tcp", on_a.clone()),
        ("10.77.100.61:80/tcp", on_a.clone()),
    ];
    k.vips_are("two services, two slots", &two);
    // A third Service has no slot: it is left out (and said so), not the whole state.
    k.api.apply(service("c", &["10.77.100.62"], json!({})))?;
    k.api.apply(slice("c-1", "c", "IPv4", &[ready(NODE_B.0)]))?;
    k.agent
        .wait_for_log("the maps have no room for this Service", CONVERGE)?;
    assert!(
        k.agent.log().contains("service=shop/c/v4"),
        "{}",
        k.agent.log()
    );
    // The Services that fit still follow the cluster.
    k.api.apply(slice("a-1", "a", "IPv4", &[ready(NODE_B.0)]))?;
    k.vips_are(
        "a moved to B; c left out",
        &[
            ("10.77.100.60:80/tcp", on_b.clone()),
            ("10.77.100.61:80/tcp", on_a.clone()),
        ],
    );
    // Room again: c is balanced.
    k.api.delete(Kind::Service, "shop", "b")?;
    k.vips_are(
        "b deleted, c in",
        &[
            ("10.77.100.60:80/tcp", on_b.clone()),
            ("10.77.100.62:80/tcp", on_b),
        ],
    );
    k.agent
        .wait_for_log("the maps have room for this Service again", CONVERGE)?;
    Ok(())
}

/// A restarted agent that must copy the connection table (another size here) does so
/// when it loads, but attaches only once the API server has been listed: the flows the
/// earlier program records meanwhile (here while the API server is away) are copied too.
#[test]
fn flows_recorded_while_a_restarted_agent_waits_for_the_api_are_carried() -> Result<()> {
    let mut k = KubeLab::start_with_settings(
        &[BALANCER, NODE_A, NODE_B],
        100,
        NO_NODE_PROBES,
        "conntrack_size: 2048\n",
    )?;
    k.api.apply(service("m", &["10.77.100.70"], json!({})))?;
    k.api.apply(slice(
        "m-1",
        "m",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    let s = k.vips_are(
        "served",
        &[(
            "10.77.100.70:80/tcp",
            vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
        )],
    );
    let b = s.backends.first().context("a backend")?.clone();

    let settings = k.lab.path("balancer-0.yaml");
    let text = std::fs::read_to_string(&settings)?;
    std::fs::write(
        &settings,
        text.replace("conntrack_size: 2048\n", "conntrack_size: 4096\n"),
    )?;
    k.api.down()?;
    k.restart("balancer-0-resized.log")?;
    k.agent.wait_for_log("migrated to the new size", CONVERGE)?;
    // The earlier program, still attached, records a new flow in its table.
    let flows = k.pin_path.join("v1/maps").join(map_names::FLOWS);
    let mut key = lb_common::FlowKey {
        sport: 41000u16.to_be(),
        dport: 80u16.to_be(),
        proto: lb_common::PROTO_TCP,
        family: lb_common::FAMILY_V4,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&[203, 0, 113, 9]);
    key.dst[..4].copy_from_slice(&[10, 77, 100, 70]);
    let entry = lb_common::FlowEntry {
        key,
        state: lb_common::FlowState {
            backend: b.id,
            service: b.service,
            created_ns: 1,
        },
        seen: 0,
        flags: lb_common::FLOW_F_CONFIRMED,
    };
    let earlier = l3lb::flowtable::FlowTable::from_pin(&flows)?;
    assert_eq!(earlier.capacity(), 2048, "still the earlier table");
    earlier.insert(&entry, 0)?;

    let ns = k.lab.balancers[0].ns.name().to_string();
    k.api.up(&k.lab.balancers[0].ns)?;
    k.agent.wait_for_log(
        "the Kubernetes state is complete: the program now runs on the interface",
        Duration::from_secs(60),
    )?;
    let carried = l3lb::flowtable::FlowTable::from_pin(&flows)?;
    assert_eq!(carried.capacity(), 4096, "the new table, in {ns}");
    assert_eq!(
        carried.get(&key)?.map(|e| e.state),
        Some(entry.state),
        "the flow recorded during the wait was carried:\n{}",
        k.agent.log()
    );
    Ok(())
}

#[test]
fn an_unreachable_api_server_keeps_forwarding_and_turns_not_ready() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A, NODE_B])?;
    k.api.apply(service("d", &["10.77.100.40"], json!({})))?;
    k.api.apply(slice(
        "d-1",
        "d",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    let both = [(
        "10.77.100.40:80/tcp",
        vip("none", &[], expected(&[(NODE_A.1, 1), (NODE_B.1, 1)])),
    )];
    let before = view(&k.vips_are("before the outage", &both));
    assert_eq!(k.readyz_becomes(200, CONVERGE), "ok\n");
    assert_eq!(http_get(k.ns(), "/healthz")?.0, 200);

    k.api.down()?;
    let why = k.readyz_becomes(503, CONVERGE);
    assert!(why.starts_with("not ready:"), "{why}");
    // Liveness is not readiness: the agent is healthy, only out of touch.
    assert_eq!(http_get(k.ns(), "/healthz")?.0, 200);
    // Forwarding stays on the last known state while the server is away.
    for _ in 0..10 {
        assert_eq!(view(&k.status()?), before, "maps changed during the outage");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The cluster moved on meanwhile; once back, the agent catches up.
    k.api.apply(slice(
        "d-1",
        "d",
        "IPv4",
        &[ready(NODE_B.0), ready(NODE_B.0)],
    ))?;
    let ns = k.lab.balancers[0].ns.name().to_string();
    k.api.up(&k.lab.balancers[0].ns)?;
    k.readyz_becomes(200, Duration::from_secs(60));
    k.vips_are(
        "after the outage",
        &[(
            "10.77.100.40:80/tcp",
            vip("none", &[], expected(&[(NODE_B.1, 2)])),
        )],
    );
    if !k.agent.log().contains("keeping the last applied state") {
        bail!("the outage was not logged in {ns}:\n{}", k.agent.log());
    }
    Ok(())
}

#[test]
fn policy_cluster_is_warned_in_the_log_and_an_event() -> Result<()> {
    let mut k = KubeLab::start(&[BALANCER, NODE_A])?;
    let svc = k.api.apply(service(
        "snat",
        &["10.77.100.50"],
        json!({"externalTrafficPolicy": "Cluster"}),
    ))?;
    k.api
        .apply(slice("snat-1", "snat", "IPv4", &[ready(NODE_A.0)]))?;
    // Still balanced: the warning is about lost client addresses, not a refusal.
    k.vips_are(
        "balanced",
        &[(
            "10.77.100.50:80/tcp",
            vip("none", &[], expected(&[(NODE_A.1, 1)])),
        )],
    );
    k.agent
        .wait_for_log("externalTrafficPolicy is Cluster", Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        if let Some(e) = k
            .api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "ClientAddressLost")
        {
            break e;
        }
        if Instant::now() >= deadline {
            bail!("no Event posted; log:\n{}", k.agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "snat");
    assert_eq!(event["regarding"]["uid"], svc["metadata"]["uid"]);
    assert_eq!(event["reportingController"], "l3lb.io/agent");
    // Said once, not on every rebuild.
    k.api.apply(slice(
        "snat-1",
        "snat",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_A.0)],
    ))?;
    std::thread::sleep(Duration::from_secs(1));
    let posted = k
        .api
        .events()
        .iter()
        .filter(|e| e["reason"] == "ClientAddressLost")
        .count();
    assert_eq!(posted, 1);
    Ok(())
}

/// Each backend as the maps show it: (address, Maglev table entries, health), by address.
fn backend_health(status: &Status) -> Vec<(String, u32, String)> {
    let mut out: Vec<(String, u32, String)> = status
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.table_entries, b.health.clone()))
        .collect();
    out.sort();
    out
}

/// `expected(weights)` with each backend's health instead of its local flag.
fn with_health(weights: &[(&str, u32)], health: &[&str]) -> Vec<(String, u32, String)> {
    expected(weights)
        .into_iter()
        .map(|(address, entries, _)| {
            let i = weights
                .iter()
                .position(|(a, _)| *a == address)
                .expect("a listed address");
            (address, entries, health[i].to_string())
        })
        .collect()
}

/// Nodes of an `externalTrafficPolicy: Local` Service are probed as cloud load balancers
/// probe them: `GET /healthz` on the Service's `healthCheckNodePort`, at each node's own
/// address. A node whose proxy answers 503 (no local endpoint, whatever the EndpointSlices
/// still say) gets no new connections, also through unrelated API changes, and takes them
/// again once it has answered 200 `rise` times in a row.
#[test]
fn local_nodes_failing_their_health_check_node_port_take_no_new_connections() -> Result<()> {
    let mut k = KubeLab::start_with(
        &[BALANCER, NODE_A, NODE_B],
        100,
        "{interval: 200ms, timeout: 150ms, rise: 2, fall: 2}",
    )?;
    let port = 32000;
    let proxy_a = HealthzServer::start(
        &k.lab.backend(0)?.ns,
        SocketAddr::new(NODE_A.1.parse()?, port),
        200,
    )?;
    let proxy_b = HealthzServer::start(
        &k.lab.backend(1)?.ns,
        SocketAddr::new(NODE_B.1.parse()?, port),
        503,
    )?;
    k.api.apply(service(
        "web",
        &["10.77.100.70"],
        json!({"healthCheckNodePort": port}),
    ))?;
    k.api.apply(slice(
        "web-1",
        "web",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_B.0)],
    ))?;

    // Node B's proxy says it has no local endpoint: B keeps no table entry.
    let want = with_health(&[(NODE_A.1, 1), (NODE_B.1, 0)], &["up", "down"]);
    k.converges("node B fails its probe", |s| {
        let got = backend_health(s);
        if got == want {
            Ok(())
        } else {
            Err(format!("backends {got:?}, wanted {want:?}"))
        }
    });

    // An unrelated change (a second endpoint on A) is applied; B stays out: the health
    // verdict survives the re-apply instead of starting afresh as "up".
    k.api.apply(slice(
        "web-1",
        "web",
        "IPv4",
        &[ready(NODE_A.0), ready(NODE_A.0), ready(NODE_B.0)],
    ))?;
    let s = k.converges("node A weighted 2", |s| {
        let a = s
            .backends
            .iter()
            .find(|b| b.address.to_string() == NODE_A.1);
        match a.and_then(|b| b.weight) {
            Some(2) => Ok(()),
            w => Err(format!("node A's weight is {w:?}")),
        }
    });
    assert_eq!(
        backend_health(&s),
        with_health(&[(NODE_A.1, 2), (NODE_B.1, 0)], &["up", "down"]),
        "node B still failing its probe is still out after the re-apply"
    );

    // B's proxy has a local endpoint again: after `rise` successes B takes new connections.
    proxy_b.set_status(200);
    let want = with_health(&[(NODE_A.1, 2), (NODE_B.1, 1)], &["up", "up"]);
    k.converges("node B passes its probe again", |s| {
        let got = backend_health(s);
        if got == want {
            Ok(())
        } else {
            Err(format!("backends {got:?}, wanted {want:?}"))
        }
    });
    k.agent.wait_for_log(
        "backend passes its health check again",
        Duration::from_secs(5),
    )?;

    // The probes were kube-proxy's kind: GET /healthz at the node's own address (the
    // servers listen there only).
    for (node, proxy) in [(NODE_A.0, &proxy_a), (NODE_B.0, &proxy_b)] {
        let requests = proxy.requests();
        assert!(!requests.is_empty(), "{node} was never probed");
        assert!(
            requests.iter().all(|r| r == "GET /healthz HTTP/1.1"),
            "{node}: {requests:?}"
        );
    }
    Ok(())
}

/// The whole path as in a cluster: the client's packets reach the balancer node, which
/// encapsulates them to a node with ready endpoints; that node's l3lb (also in Kubernetes
/// mode, its decap allow list taken from the Node objects) strips the outer header, and
/// the node's "kube-proxy" (an nftables DNAT of the LoadBalancer IP to a local "pod"
/// port) delivers to the server, which sees the client's own address and answers it
/// directly — also while the API server is unreachable.
#[test]
fn pods_see_the_client_address_through_the_node_proxy() -> Result<()> {
    const VIP: &str = "10.77.100.60";
    let lab = Lab::new(LabSpec {
        backends: 2,
        balancers: 1,
    })?;
    let balancer_ns = &lab.balancers[0].ns;
    // On the balancer's fabric address, so the agents on the backend nodes reach it too.
    let mut api = ApiServer::start_on(balancer_ns, "0.0.0.0:0".parse()?)?;
    for n in [BALANCER, NODE_A, NODE_B] {
        api.apply(node(n))?;
    }
    api.apply(service("web", &[VIP], json!({})))?;
    // One ready endpoint on node A, three on node B: new connections should split 1:3.
    api.apply(slice(
        "web-1",
        "web",
        "IPv4",
        &[
            ready(NODE_A.0),
            ready(NODE_B.0),
            ready(NODE_B.0),
            ready(NODE_B.0),
        ],
    ))?;

    let mut pods = Vec::new();
    for (i, n) in [NODE_A, NODE_B].into_iter().enumerate() {
        let ns = &lab.backend(i)?.ns;
        let rules = lab.write_file(
            &format!("{}-kube-proxy.nft", n.0),
            &format!(
                "table ip kube-proxy {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP} tcp dport 80 dnat to {}:8080\n  }}\n}}\n",
                n.1
            ),
        )?;
        ns.run(["nft", "-f", &rules.to_string_lossy()])?;
        pods.push(l3lb_tests::TcpServer::start(
            ns,
            n.0,
            SocketAddr::new(n.1.parse()?, 8080),
        )?);
    }

    let bin = l3lb_bin()?;
    let kubeconfig = lab.write_file("kubeconfig", &api.kubeconfig_via(BALANCER.1.parse()?))?;
    let mut agents = Vec::new();
    // As in the other lab tests: a frame XDP_TX'ed into a veth is received only if the peer
    // end runs XDP, so a service-less l3lb sits on the fabric side of the balancer's veth.
    let fabric_port = lab.balancers[0].fabric_port.clone();
    let fabric_cfg = lab.write_file(
        "fabric.yaml",
        &format!(
            "interface: {fabric_port}\nxdp_mode: native\npin_path: {}\n",
            lab.pin_path("fabric").display()
        ),
    )?;
    let mut fabric = lab.spawn_in(
        &lab.fabric,
        &bin,
        ["run", "--config", &fabric_cfg.to_string_lossy()],
        "fabric.log",
    )?;
    fabric.wait_for_log("l3lb ready", Duration::from_secs(20))?;
    agents.push(fabric);
    let nodes = [
        (balancer_ns, BALANCER.0),
        (&lab.backend(0)?.ns, NODE_A.0),
        (&lab.backend(1)?.ns, NODE_B.0),
    ];
    for (ns, name) in nodes {
        let settings = lab.write_file(
            &format!("{name}.yaml"),
            &format!(
                "interface: eth0\nxdp_mode: native\npin_path: {}\nmaglev_table_size: {TABLE}\n\
                 kubernetes:\n  debounce_ms: 100\n  node_health_check: {NO_NODE_PROBES}\n",
                lab.pin_path(name).display()
            ),
        )?;
        let mut agent = lab.spawn_in(
            ns,
            &bin,
            [
                "run",
                "--kubernetes",
                "--config",
                &settings.to_string_lossy(),
                "--node-name",
                name,
                "--kubeconfig",
                &kubeconfig.to_string_lossy(),
            ],
            format!("{name}.log"),
        )?;
        agent.wait_for_log("watching the Kubernetes API", Duration::from_secs(30))?;
        agents.push(agent);
    }
    // Every agent has applied the API state: the balancer has both nodes as backends, the
    // nodes accept encapsulated packets from the balancer.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let bal = status_of_pins(&lab.pin_path(BALANCER.0))?;
        let a = status_of_pins(&lab.pin_path(NODE_A.0))?;
        let b = status_of_pins(&lab.pin_path(NODE_B.0))?;
        let balanced = view(&bal)
            .get(&format!("{VIP}:80/tcp"))
            .is_some_and(|v| v.backends.len() == 2);
        let from_balancer = "10.77.0.2/32".to_string();
        if balanced
            && a.decap_allow.contains(&from_balancer)
            && b.decap_allow.contains(&from_balancer)
        {
            break;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            bail!(
                "the agents did not converge: {:?} {:?} {:?}\n{}",
                view(&bal),
                a.decap_allow,
                b.decap_allow,
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.client_route_vip(VIP.parse()?, 0)?;

    let client = lab.client.ipv4;
    let mut served = BTreeMap::new();
    const REQUESTS: u16 = 400;
    for i in 0..REQUESTS {
        let sport = 45000 + i;
        let line = l3lb_tests::client::tcp_request(
            &lab.client.ns,
            VIP.parse()?,
            80,
            Some(sport),
            Duration::from_secs(2),
        )
        .with_context(|| format!("request {i} to {VIP}:80"))?;
        let reply = l3lb_tests::client::parse_reply(&line)?;
        assert_eq!(
            reply.peer,
            SocketAddr::new(IpAddr::V4(client), sport),
            "the pod on {} saw another address than the client's",
            reply.backend
        );
        *served.entry(reply.backend).or_insert(0) += 1;
    }
    assert_eq!(served.len(), 2, "both nodes served: {served:?}");
    // 1:3 by ready endpoints: node A expects 100 of 400 (binomial sd ≈ 8.7); the bounds
    // are more than four deviations wide, while an even split (200) is far outside.
    let on_a = served.get(NODE_A.0).copied().unwrap_or(0);
    assert!(
        (60..=140).contains(&on_a),
        "node A (1 ready endpoint of 4) took {on_a} of {REQUESTS} new connections: {served:?}"
    );
    let bal = status_of_pins(&lab.pin_path(BALANCER.0))?;
    assert!(
        bal.actions.get("encap").copied().unwrap_or(0) >= 40,
        "the balancer encapsulated the requests: {:?}",
        bal.actions
    );

    // With the API server gone, every node keeps forwarding on the last known state.
    api.down()?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..10u16 {
        let line = l3lb_tests::client::tcp_request(
            &lab.client.ns,
            VIP.parse()?,
            80,
            Some(46000 + i),
            Duration::from_secs(2),
        )
        .with_context(|| format!("request {i} during the outage"))?;
        let reply = l3lb_tests::client::parse_reply(&line)?;
        assert_eq!(reply.peer.ip(), IpAddr::V4(client));
    }
    drop(agents);
    drop(pods);
    drop(api);
    Ok(())
}
