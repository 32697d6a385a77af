//! The standard DSR scenario: one balancer running `l3lb`, backends serving a VIP (TCP 80
//! and UDP 53) with the VIP on `lo`, and a client routed to the balancer. Shared by the
//! end-to-end tests and `cargo xtask demo`.
//!
//! [`Scenario::start`] builds the plain scenario; [`Scenario::start_spec`] takes a
//! [`ScenarioSpec`] with per-service extras (`source_ranges`, `affinity`), a bulk-transfer
//! service on [`BULK_PORT`], a far site behind a router ([`Lab::add_far_site`]), and the
//! address family ([`ScenarioSpec::ipv6`]: VIP [`VIP6`], backends `fd77::11`…, decap allow
//! list and client route in IPv6; IPv4 and [`VIP`] are the default).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use l3lb::{config::Affinity, status::Status};

use crate::{BulkServer, ChildGuard, Lab, LabSpec, TcpServer, UdpServer, l3lb_bin};

/// The VIP every IPv4 scenario serves (outside the lab subnet, routed via the balancer).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 10);
/// The VIP of an IPv6 scenario ([`ScenarioSpec::ipv6`]), routed via the balancer likewise.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x100, 0, 0, 0, 0, 0, 0x10);
/// TCP port of the `web` service.
pub const TCP_PORT: u16 = 80;
/// UDP port of the `dns` service.
pub const UDP_PORT: u16 = 53;
/// TCP port of the `bulk` service ([`ScenarioSpec::with_bulk`]).
pub const BULK_PORT: u16 = 9000;
/// Maglev table size the scenario configures (small prime keeps tests quick to reason about).
pub const TABLE_SIZE: u32 = 4093;

/// Forwarding mode under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// IPIP encapsulation; backends run `l3lb` in the decap role.
    Ipip,
    /// MAC rewrite; backends need nothing but the VIP on `lo`.
    L2,
}

impl Mode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ipip => "ipip",
            Mode::L2 => "l2",
        }
    }
}

/// Address family of a scenario's services: VIP, backend addresses, decap allow list and
/// the client's route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Family {
    /// [`VIP`], backends 10.77.0.11…, balancer 10.77.0.2 (the default).
    #[default]
    V4,
    /// [`VIP6`], backends fd77::11…, balancer fd77::2.
    V6,
}

impl Family {
    /// The scenario VIP of this family.
    pub fn vip(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(VIP),
            Family::V6 => IpAddr::V6(VIP6),
        }
    }

    /// Prefix length of a single host of this family (32 or 128).
    pub fn host_prefix_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// Extras of one service in the balancer's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceOptions {
    /// `source_ranges`: the client networks allowed (CIDRs); empty: everyone (not written).
    pub source_ranges: Vec<String>,
    /// `affinity`; `None` leaves the field out (the default, `none`).
    pub affinity: Option<Affinity>,
}

impl ServiceOptions {
    /// The YAML lines of these extras, indented for a service entry.
    fn yaml(&self) -> String {
        let mut out = String::new();
        if !self.source_ranges.is_empty() {
            out.push_str(&format!(
                "    source_ranges: [{}]\n",
                self.source_ranges.join(", ")
            ));
        }
        if let Some(affinity) = self.affinity {
            let spelled = match affinity {
                Affinity::None => "none",
                Affinity::ClientIp => "client_ip",
            };
            out.push_str(&format!("    affinity: {spelled}\n"));
        }
        out
    }
}

/// What [`Scenario::start_spec`] builds. `ScenarioSpec::new(mode, backends)` is the plain
/// scenario of [`Scenario::start`]; the builder methods add to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioSpec {
    /// Forwarding mode of every service.
    pub mode: Mode,
    /// Number of backends.
    pub backends: usize,
    /// Extras of the `web` service (TCP [`TCP_PORT`]).
    pub web: ServiceOptions,
    /// Extras of the `dns` service (UDP [`UDP_PORT`]).
    pub dns: ServiceOptions,
    /// A `bulk` service on TCP [`BULK_PORT`] served by a [`BulkServer`] on each backend.
    pub bulk: bool,
    /// A far site ([`Lab::add_far_site`]) with this link MTU, its router routing the VIP
    /// via the balancer.
    pub far_site: Option<u32>,
    /// Address family of every service (IPv4 unless [`ScenarioSpec::ipv6`]).
    pub family: Family,
    /// The balancer's `conntrack_size` (the agent's default unless set; load time only).
    pub conntrack_size: Option<u32>,
    /// The balancer's `maglev_table_size` ([`TABLE_SIZE`] unless set; load time only).
    pub table_size: Option<u32>,
    /// The balancer's program in generic XDP (`xdp_mode: generic`) instead of native.
    pub generic: bool,
}

impl ScenarioSpec {
    /// The plain scenario: `web` and `dns` with no extras, no bulk service, no far site.
    pub fn new(mode: Mode, backends: usize) -> ScenarioSpec {
        ScenarioSpec {
            mode,
            backends,
            web: ServiceOptions::default(),
            dns: ServiceOptions::default(),
            bulk: false,
            far_site: None,
            family: Family::V4,
            conntrack_size: None,
            table_size: None,
            generic: false,
        }
    }

    /// Attaches the balancer's program in generic mode.
    pub fn generic(mut self) -> ScenarioSpec {
        self.generic = true;
        self
    }

    /// Sets the balancer's `maglev_table_size` (a prime).
    pub fn table_size(mut self, entries: u32) -> ScenarioSpec {
        self.table_size = Some(entries);
        self
    }

    /// Sizes the balancer's connection table (`conntrack_size`).
    pub fn conntrack_size(mut self, entries: u32) -> ScenarioSpec {
        self.conntrack_size = Some(entries);
        self
    }

    /// Makes every service IPv6: VIP [`VIP6`], backends at their `fd77::…` addresses,
    /// the decap agents allowing the balancer's fd77::2/128, the client's route via
    /// fd77::2 (and a far site's router's likewise).
    pub fn ipv6(mut self) -> ScenarioSpec {
        self.family = Family::V6;
        self
    }

    /// The VIP every service of this scenario uses.
    pub fn vip(&self) -> IpAddr {
        self.family.vip()
    }

    /// Sets `source_ranges` of `web` and `dns`.
    pub fn source_ranges(mut self, ranges: &[&str]) -> ScenarioSpec {
        let ranges: Vec<String> = ranges.iter().map(|r| (*r).to_owned()).collect();
        self.web.source_ranges = ranges.clone();
        self.dns.source_ranges = ranges;
        self
    }

    /// Sets `affinity` of `web` and `dns`.
    pub fn affinity(mut self, affinity: Affinity) -> ScenarioSpec {
        self.web.affinity = Some(affinity);
        self.dns.affinity = Some(affinity);
        self
    }

    /// Adds the `bulk` service and its servers.
    pub fn with_bulk(mut self) -> ScenarioSpec {
        self.bulk = true;
        self
    }

    /// Adds a far site whose router's link toward the far client has MTU `link_mtu`.
    pub fn with_far_site(mut self, link_mtu: u32) -> ScenarioSpec {
        self.far_site = Some(link_mtu);
        self
    }
}

/// A running scenario. Field order matters: guards drop before the lab.
pub struct Scenario {
    /// Balancer agent.
    pub balancer: ChildGuard,
    /// Decap agents on the backends (ipip only).
    pub decap_agents: Vec<ChildGuard>,
    /// Pass-through XDP on the fabric side of each balancer's veth (see `start`).
    pub fabric_agents: Vec<ChildGuard>,
    /// TCP servers, one per backend.
    pub tcp: Vec<TcpServer>,
    /// UDP servers, one per backend.
    pub udp: Vec<UdpServer>,
    /// Bulk servers, one per backend (empty unless [`ScenarioSpec::with_bulk`]).
    pub bulk: Vec<BulkServer>,
    /// Forwarding mode.
    pub mode: Mode,
    /// Current backend weights (index = backend number); `None` = not configured.
    pub weights: Vec<Option<u32>>,
    config_path: PathBuf,
    applies: usize,
    spec: ScenarioSpec,
    /// The lab (dropped last).
    pub lab: Lab,
}

/// Name of backend `i` as its servers report it.
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

/// The connection-table key of a TCP connection from `client`:`sport` to the `web`
/// service's VIP and port.
pub fn vip_flow_key(client: Ipv4Addr, sport: u16) -> lb_common::FlowKey {
    let mut key = lb_common::FlowKey {
        sport: sport.to_be(),
        dport: TCP_PORT.to_be(),
        proto: lb_common::PROTO_TCP,
        family: lb_common::FAMILY_V4,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&client.octets());
    key.dst[..4].copy_from_slice(&VIP.octets());
    key
}

/// Name of the backend Maglev gives that connection when the backends carry `weights`
/// (`None`: not configured), computed apart from the agent from the shared flow hash.
pub fn maglev_backend(
    s: &Scenario,
    weights: &[Option<u32>],
    client: Ipv4Addr,
    sport: u16,
) -> String {
    let configured: Vec<(usize, IpAddr, u32)> = weights
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, IpAddr::V4(s.lab.backends[i].ipv4), w)))
        .collect();
    let input: Vec<(IpAddr, u32)> = configured.iter().map(|(_, a, w)| (*a, *w)).collect();
    let table = l3lb::maglev::build(&input, TABLE_SIZE).expect("maglev");
    let hash = lb_common::flow_hash(&vip_flow_key(client, sport));
    backend_name(configured[table[lb_common::maglev_slot(hash, TABLE_SIZE) as usize] as usize].0)
}

impl Scenario {
    /// Builds the lab, starts servers and agents, and waits until the balancer is ready.
    pub fn start(mode: Mode, backends: usize) -> Result<Self> {
        Scenario::start_spec(ScenarioSpec::new(mode, backends))
    }

    /// Like [`Scenario::start`], with the extras of `spec`.
    pub fn start_spec(spec: ScenarioSpec) -> Result<Self> {
        let ScenarioSpec { mode, backends, .. } = spec;
        let mut lab = Lab::new(LabSpec {
            backends,
            balancers: 1,
        })?;
        if let Some(link_mtu) = spec.far_site {
            lab.add_far_site(link_mtu)?;
        }
        let vip = spec.vip();
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut bulk = Vec::new();
        for i in 0..backends {
            lab.backend_add_vip(i, vip)?;
            let ns = &lab.backend(i)?.ns;
            tcp.push(TcpServer::start(
                ns,
                &backend_name(i),
                SocketAddr::new(vip, TCP_PORT),
            )?);
            udp.push(UdpServer::start(
                ns,
                &backend_name(i),
                SocketAddr::new(vip, UDP_PORT),
            )?);
            if spec.bulk {
                bulk.push(BulkServer::start(
                    ns,
                    &backend_name(i),
                    SocketAddr::new(vip, BULK_PORT),
                )?);
            }
        }
        let bin = l3lb_bin()?;
        let mut decap_agents = Vec::new();
        if mode == Mode::Ipip {
            let balancer_ip = lab.balancers[0].ip_like(vip);
            let len = spec.family.host_prefix_len();
            for i in 0..backends {
                let node = lab.backend(i)?;
                let cfg = format!(
                    "interface: eth0\nxdp_mode: native\npin_path: {}\ndecap:\n  allow: [{balancer_ip}/{len}]\n",
                    lab.pin_path(&node.name).display()
                );
                let path = lab.write_file(&format!("{}.yaml", node.name), &cfg)?;
                let mut agent = lab.spawn_in(
                    &node.ns,
                    &bin,
                    ["run", "--config", &path.to_string_lossy()],
                    format!("{}.log", node.name),
                )?;
                agent.wait_for_log("l3lb ready", Duration::from_secs(20))?;
                decap_agents.push(agent);
            }
        }
        // A frame that XDP_TX pushes into a veth is only received if the peer end runs
        // XDP itself (GRO alone did not suffice on this kernel). A physical NIC has no
        // such need; in the lab, an l3lb with no services on the fabric-side port of each
        // balancer passes everything and makes the peer receive.
        let mut fabric_agents = Vec::new();
        for node in &lab.balancers {
            let name = format!("fabric-{}", node.fabric_port);
            let cfg = format!(
                "interface: {}\nxdp_mode: native\npin_path: {}\n# Several of these share the fabric namespace: each takes a free port.\nmetrics_address: 127.0.0.1:0\n",
                node.fabric_port,
                lab.pin_path(&name).display()
            );
            let path = lab.write_file(&format!("{name}.yaml"), &cfg)?;
            let mut agent = lab.spawn_in(
                &lab.fabric,
                &bin,
                ["run", "--config", &path.to_string_lossy()],
                format!("{name}.log"),
            )?;
            agent.wait_for_log("l3lb ready", Duration::from_secs(20))?;
            fabric_agents.push(agent);
        }
        let weights = vec![Some(1); backends];
        let config_path = lab.path("balancer-0.yaml");
        std::fs::write(&config_path, balancer_config_for(&lab, &spec, &weights)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut balancer = lab.spawn_in(
            &lab.balancers[0].ns,
            &bin,
            ["run", "--config", &config_path.to_string_lossy()],
            "balancer-0.log",
        )?;
        balancer.wait_for_log("l3lb ready", Duration::from_secs(20))?;
        lab.client_route_vip(vip, 0)?;
        if lab.far.is_some() {
            lab.far_route_vip(vip, 0)?;
        }
        Ok(Self {
            balancer,
            decap_agents,
            fabric_agents,
            tcp,
            udp,
            bulk,
            mode,
            weights,
            config_path,
            applies: 1,
            spec,
            lab,
        })
    }

    /// What the scenario was built from.
    pub fn spec(&self) -> &ScenarioSpec {
        &self.spec
    }

    /// The VIP of every service ([`VIP`], or [`VIP6`] for an IPv6 scenario).
    pub fn vip(&self) -> IpAddr {
        self.spec.vip()
    }

    /// Rewrites the balancer's config with new weights (`None` removes a backend) and
    /// reloads it with SIGHUP, waiting until the agent reports the apply.
    pub fn set_weights(&mut self, weights: &[Option<u32>]) -> Result<()> {
        std::fs::write(
            &self.config_path,
            balancer_config_for(&self.lab, &self.spec, weights)?,
        )
        .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.balancer.signal(libc::SIGHUP)?;
        self.applies += 1;
        self.balancer.wait_for_log_count(
            "applied config",
            self.applies,
            Duration::from_secs(10),
        )?;
        self.weights = weights.to_vec();
        Ok(())
    }

    /// The balancer's config file.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Writes `text` as the balancer's config and sends SIGHUP (for rejection tests).
    pub fn write_raw_config_and_reload(&mut self, text: &str) -> Result<()> {
        std::fs::write(&self.config_path, text)
            .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.balancer.signal(libc::SIGHUP)
    }

    /// `l3lb status --json` of the balancer, read from its pins.
    pub fn status(&self) -> Result<Status> {
        status_of(&self.lab, "balancer-0")
    }

    /// Counters of the service serving `port`, as the balancer's status reports them.
    pub fn service_counters(&self, port: u16) -> Result<l3lb::status::ServiceCounters> {
        let status = self.status()?;
        let id = status
            .vips
            .iter()
            .find(|v| v.port == port)
            .map(|v| v.service)
            .with_context(|| format!("no VIP entry for port {port}"))?;
        status
            .services
            .into_iter()
            .find(|s| s.service == id)
            .with_context(|| format!("no counters for service {id}"))
    }
}

/// Stops `agent` (SIGTERM; it must exit cleanly) and starts a new `l3lb run --config
/// config` in `ns` in its place, logging to `log`; returns once the new one is ready.
///
/// The restarts of a hitless upgrade: the old agent leaves the data plane on its pins,
/// the new one takes it over.
pub fn restart_agent(
    lab: &Lab,
    ns: &crate::Netns,
    agent: &mut ChildGuard,
    config: &std::path::Path,
    log: &str,
) -> Result<()> {
    let status = agent.stop()?;
    if !status.success() {
        bail!("agent exited with {status} on SIGTERM:\n{}", agent.log());
    }
    let mut next = lab.spawn_in(
        ns,
        &l3lb_bin()?,
        ["run", "--config", &config.to_string_lossy()],
        log,
    )?;
    next.wait_for_log("l3lb ready", Duration::from_secs(30))?;
    *agent = next;
    Ok(())
}

/// Runs `l3lb status --json` against a node's pins and parses it.
pub fn status_of(lab: &Lab, node: &str) -> Result<Status> {
    status_of_pins(&lab.pin_path(node))
}

/// Runs `l3lb status --json` against the agent whose `pin_path` is `pin_path`.
pub fn status_of_pins(pin_path: &std::path::Path) -> Result<Status> {
    let out = Command::new(l3lb_bin()?)
        .args(["status", "--json", "--pin-path"])
        .arg(pin_path)
        .output()
        .context("running l3lb status")?;
    if !out.status.success() {
        bail!(
            "l3lb status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing l3lb status --json")
}

/// The balancer's config for `weights` (index = backend number, `None` = absent).
pub fn balancer_config(lab: &Lab, mode: Mode, weights: &[Option<u32>]) -> Result<String> {
    balancer_config_for(lab, &ScenarioSpec::new(mode, weights.len()), weights)
}

/// The balancer's config for `spec` and `weights` (index = backend number, `None` =
/// absent); `spec.backends` is not consulted.
pub fn balancer_config_for(
    lab: &Lab,
    spec: &ScenarioSpec,
    weights: &[Option<u32>],
) -> Result<String> {
    let vip = spec.vip();
    let mut backends = String::new();
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w {
            backends.push_str(&format!(
                "      - address: {}\n        weight: {w}\n",
                lab.backend(i)?.ip_like(vip)
            ));
        }
    }
    let pin = lab.pin_path("balancer-0");
    let mode = spec.mode.as_str();
    let service = |name: &str, port: u16, protocol: &str, options: &ServiceOptions| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{port}]\n    protocol: {protocol}\n    \
             forwarding: {mode}\n{}    backends:\n{backends}",
            options.yaml()
        )
    };
    let mut config = format!(
        "interface: eth0\nxdp_mode: {}\npin_path: {}\nmaglev_table_size: {}\n",
        if spec.generic { "generic" } else { "native" },
        pin.display(),
        spec.table_size.unwrap_or(TABLE_SIZE)
    );
    if let Some(entries) = spec.conntrack_size {
        config.push_str(&format!("conntrack_size: {entries}\n"));
    }
    config.push_str("services:\n");
    config.push_str(&service("web", TCP_PORT, "tcp", &spec.web));
    config.push_str(&service("dns", UDP_PORT, "udp", &spec.dns));
    if spec.bulk {
        config.push_str(&service(
            "bulk",
            BULK_PORT,
            "tcp",
            &ServiceOptions::default(),
        ));
    }
    Ok(config)
}
