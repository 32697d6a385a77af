//! The standard DSR scenario: one balancer running `l3lb`, backends serving a VIP (TCP 80
//! and UDP 53) with the VIP on `lo`, and a client routed to the balancer. Shared by the
//! end-to-end tests and `cargo xtask demo`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use l3lb::status::Status;

use crate::{ChildGuard, Lab, LabSpec, TcpServer, UdpServer, l3lb_bin};

/// The VIP every scenario serves (outside the lab subnet, routed via the balancer).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 10);
/// TCP port of the `web` service.
pub const TCP_PORT: u16 = 80;
/// UDP port of the `dns` service.
pub const UDP_PORT: u16 = 53;
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
    /// Forwarding mode.
    pub mode: Mode,
    /// Current backend weights (index = backend number); `None` = not configured.
    pub weights: Vec<Option<u32>>,
    config_path: PathBuf,
    applies: usize,
    /// The lab (dropped last).
    pub lab: Lab,
}

/// Name of backend `i` as its servers report it.
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

impl Scenario {
    /// Builds the lab, starts servers and agents, and waits until the balancer is ready.
    pub fn start(mode: Mode, backends: usize) -> Result<Self> {
        let lab = Lab::new(LabSpec {
            backends,
            balancers: 1,
        })?;
        let vip = IpAddr::V4(VIP);
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
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
        }
        let bin = l3lb_bin()?;
        let mut decap_agents = Vec::new();
        if mode == Mode::Ipip {
            let balancer_ip = lab.balancers[0].ipv4;
            for i in 0..backends {
                let node = lab.backend(i)?;
                let cfg = format!(
                    "interface: eth0\nxdp_mode: native\npin_path: {}\ndecap:\n  allow: [{balancer_ip}/32]\n",
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
                "interface: {}\nxdp_mode: native\npin_path: {}\n",
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
        std::fs::write(&config_path, balancer_config(&lab, mode, &weights)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut balancer = lab.spawn_in(
            &lab.balancers[0].ns,
            &bin,
            ["run", "--config", &config_path.to_string_lossy()],
            "balancer-0.log",
        )?;
        balancer.wait_for_log("l3lb ready", Duration::from_secs(20))?;
        lab.client_route_vip(vip, 0)?;
        Ok(Self {
            balancer,
            decap_agents,
            fabric_agents,
            tcp,
            udp,
            mode,
            weights,
            config_path,
            applies: 1,
            lab,
        })
    }

    /// Rewrites the balancer's config with new weights (`None` removes a backend) and
    /// reloads it with SIGHUP, waiting until the agent reports the apply.
    pub fn set_weights(&mut self, weights: &[Option<u32>]) -> Result<()> {
        std::fs::write(
            &self.config_path,
            balancer_config(&self.lab, self.mode, weights)?,
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

/// Runs `l3lb status --json` against a node's pins and parses it.
pub fn status_of(lab: &Lab, node: &str) -> Result<Status> {
    let out = Command::new(l3lb_bin()?)
        .args(["status", "--json", "--pin-path"])
        .arg(lab.pin_path(node))
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
    let mut backends = String::new();
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w {
            backends.push_str(&format!(
                "      - address: {}\n        weight: {w}\n",
                lab.backend(i)?.ipv4
            ));
        }
    }
    let pin = lab.pin_path("balancer-0");
    let mode = mode.as_str();
    Ok(format!(
        "interface: eth0\nxdp_mode: native\npin_path: {}\nmaglev_table_size: {TABLE_SIZE}\nservices:\n\
         \x20 - name: web\n    vip: {VIP}\n    ports: [{TCP_PORT}]\n    protocol: tcp\n    forwarding: {mode}\n    backends:\n{backends}\
         \x20 - name: dns\n    vip: {VIP}\n    ports: [{UDP_PORT}]\n    protocol: udp\n    forwarding: {mode}\n    backends:\n{backends}",
        pin.display()
    ))
}
