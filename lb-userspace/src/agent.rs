//! The standalone agent: config → desired state → maps, and the signal-driven run loop.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode as AyaXdpMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    config::{Affinity, Config, Forwarding, XdpMode},
    dataplane::{
        ApplySummary, Attached, Dataplane, Desired, DesiredBackend, DesiredService, LoadOptions,
        ServiceMode,
    },
    handover, health, sys,
};

/// Version directory under `pin_path`: pins are an ABI, a layout change bumps it.
pub const PIN_VERSION: &str = "v1";

/// Where the pins of a config live.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(PIN_VERSION)
}

/// Translates a config into the maps' desired state; `local` holds this node's addresses,
/// `down` the backends failing their health checks (they get weight 0: established
/// connections stay, new ones go elsewhere).
pub fn desired_from_config(
    cfg: &Config,
    local: &HashSet<IpAddr>,
    down: &HashSet<health::Key>,
) -> Desired {
    let services = cfg
        .services
        .iter()
        .map(|s| {
            let proto = s.protocol.number();
            let vips = if s.ports.is_empty() {
                vec![(s.vip, 0, proto)]
            } else {
                s.ports.iter().map(|&p| (s.vip, p, proto)).collect()
            };
            DesiredService {
                name: s.name.clone(),
                vips,
                mode: ServiceMode {
                    l2: s.forwarding == Forwarding::L2,
                    affinity_client_ip: s.affinity == Affinity::ClientIp,
                },
                source_ranges: s.source_ranges.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| DesiredBackend {
                        address: b.address,
                        weight: if down.contains(&(s.name.clone(), b.address)) {
                            0
                        } else {
                            b.effective_weight()
                        },
                        local: local.contains(&b.address),
                    })
                    .collect(),
            }
        })
        .collect();
    let mut decap_v4 = Vec::new();
    let mut decap_v6 = Vec::new();
    for n in &cfg.decap.allow {
        match n {
            ipnet::IpNet::V4(v4) => decap_v4.push((v4.network(), v4.prefix_len())),
            ipnet::IpNet::V6(v6) => decap_v6.push((v6.network(), v6.prefix_len())),
        }
    }
    let mut local_v4 = Vec::new();
    let mut local_v6 = Vec::new();
    for a in local {
        match a {
            IpAddr::V4(v4) => local_v4.push(*v4),
            IpAddr::V6(v6) => local_v6.push(*v6),
        }
    }
    local_v4.sort();
    local_v6.sort();
    Desired {
        services,
        decap_v4,
        local_v4,
        decap_v6,
        local_v6,
    }
}

/// Source addresses of the encapsulation headers this node writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapSources {
    /// Outer source of IPIP.
    pub v4: Ipv4Addr,
    /// Outer source of IPv6-in-IPv6.
    pub v6: Ipv6Addr,
}

/// The encapsulation sources of `config`'s interface; an error when a service needs one
/// the interface lacks.
fn encap_sources(config: &Config) -> anyhow::Result<EncapSources> {
    let ipip = |v6: bool| {
        config
            .services
            .iter()
            .any(|s| s.forwarding == Forwarding::Ipip && s.vip.is_ipv6() == v6)
    };
    let v4 = match sys::interface_ipv4(&config.interface)? {
        Some(a) => a,
        None if ipip(false) => bail!(
            "interface {} has no IPv4 address to use as the source of IPIP headers",
            config.interface
        ),
        None => Ipv4Addr::UNSPECIFIED,
    };
    let v6 = match sys::interface_ipv6(&config.interface)? {
        Some(a) => a,
        None if ipip(true) => bail!(
            "interface {} has no global IPv6 address to use as the source of IPv6-in-IPv6 headers",
            config.interface
        ),
        None => Ipv6Addr::UNSPECIFIED,
    };
    Ok(EncapSources { v4, v6 })
}

/// Load-time options of a config (changing any of them needs a restart).
pub fn load_options(cfg: &Config, encap: EncapSources) -> LoadOptions {
    LoadOptions {
        ring_size: cfg.maglev_table_size,
        max_services: cfg.max_services,
        max_backends: cfg.max_backends,
        conntrack_size: cfg.conntrack_size,
        encap_src_v4: encap.v4,
        encap_src_v6: encap.v6,
        decap: !cfg.decap.allow.is_empty(),
    }
}

fn aya_mode(mode: XdpMode) -> AyaXdpMode {
    match mode {
        XdpMode::Native | XdpMode::Auto => AyaXdpMode::Driver,
        XdpMode::Generic => AyaXdpMode::Skb,
    }
}

/// Every backend address a config forwards to (for neighbour resolution).
fn remote_backends(desired: &Desired) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = desired
        .services
        .iter()
        .flat_map(|s| s.backends.iter().filter(|b| !b.local).map(|b| b.address))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A running agent: the data plane plus the config it was built from.
pub struct Agent {
    dataplane: Dataplane,
    config: Config,
    config_path: PathBuf,
    pin_dir: PathBuf,
    no_neighbour_seen: u64,
    health: health::Tracker,
    probes: health::Probes,
    health_tx: mpsc::Sender<health::Outcome>,
    /// Applies logged since start: the first config is 1, every accepted SIGHUP reload
    /// and every re-apply that changed something adds one. Logged with each apply so a
    /// log reader can tell which reload a line belongs to.
    generation: u64,
}

impl Agent {
    /// Loads the program, writes the config's state, then puts the program on the
    /// interface and pins everything.
    ///
    /// An earlier agent's pins are taken over (see [`crate::handover`]): its connection
    /// table and counters are reused (or migrated when only their size changed), its ids
    /// kept, and its pinned link switched to the new program in one step once the new
    /// maps are complete, so forwarding never stops.
    /// Health check outcomes are sent to `health_tx` (see [`Agent::health_outcome`]).
    pub fn start(
        config_path: &Path,
        health_tx: mpsc::Sender<health::Outcome>,
    ) -> anyhow::Result<Self> {
        let config = Config::load(config_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        sys::require_capabilities()?;
        sys::require_interface(&config.interface)?;
        let encap = encap_sources(&config)?;
        sys::ensure_bpffs(&config.pin_path)?;
        let pin_dir = pin_dir(&config.pin_path);
        let maps_dir = pin_dir.join("maps");

        let opts = load_options(&config, encap);
        let plan = if maps_dir.exists() {
            handover::plan(&maps_dir, &opts).context("taking over the earlier agent's state")?
        } else {
            handover::CarryPlan::default()
        };
        let mut dataplane =
            Dataplane::load_carrying(&opts, &plan).context("loading the XDP program")?;
        if plan.carries_anything() {
            for (name, n) in dataplane
                .migrate(&plan)
                .context("migrating the earlier agent's state")?
            {
                info!(map = name, entries = n, "migrated to the new size");
            }
            let previous = handover::PreviousIds::read(&maps_dir)
                .context("reading the earlier agent's ids")?;
            let stats_carried = !matches!(
                plan.get(lb_common::map_names::SERVICE_STATS),
                handover::Carry::Fresh
            );
            dataplane.adopt(previous, stats_carried);
            info!(
                reused = ?plan.maps.iter().filter(|(_, c)| matches!(c, handover::Carry::Reuse(_))).map(|(n, _)| *n).collect::<Vec<_>>(),
                "taking over the state of the earlier agent"
            );
        }
        let local = sys::local_address_set()?;
        let desired = desired_from_config(&config, &local, &HashSet::new());
        let summary = dataplane
            .apply(&desired)
            .context("writing the initial state")?;
        info!(generation = 1, %summary, "applied config");

        if !config.services.is_empty() {
            if sys::enable_ipv4_forwarding(&config.interface)? {
                info!(interface = %config.interface, "enabled IPv4 forwarding on the interface (bpf_fib_lookup needs it)");
            }
            if config.services.iter().any(|s| s.vip.is_ipv6()) {
                for change in sys::enable_ipv6_forwarding(&config.interface)? {
                    info!(interface = %config.interface, "{change} (bpf_fib_lookup needs IPv6 forwarding; router advertisements stay accepted)");
                }
            }
        }
        sys::prime_neighbours(remote_backends(&desired));

        let mode = aya_mode(config.xdp_mode);
        let (attached, generic) = match dataplane.attach_pinned(&config.interface, mode, &pin_dir) {
            Ok(a) => (a, config.xdp_mode == XdpMode::Generic),
            Err(e) if config.xdp_mode == XdpMode::Auto => {
                warn!(error = %e, "native XDP unavailable; falling back to generic mode (slower)");
                let a = dataplane.attach_pinned(&config.interface, AyaXdpMode::Skb, &pin_dir)?;
                (a, true)
            }
            Err(e) => return Err(e.into()),
        };
        let mode_name = match attached {
            // The earlier agent's attachment, in whatever mode it was made.
            Attached::Replaced => "kept",
            Attached::New { .. } if generic => "generic",
            Attached::New { .. } => "native",
        };
        if attached == (Attached::New { pinned: false }) {
            warn!(
                "this kernel attaches XDP without bpf_link: the program cannot stay attached across agent restarts"
            );
        }
        // Links on other interfaces (the config's interface changed) are no longer wanted.
        let own = handover::link_pin(&pin_dir, &config.interface);
        for stale in handover::link_pins(&pin_dir) {
            if stale != own {
                warn!(link = %stale.display(), "detaching the earlier agent's program from an interface no longer configured");
                std::fs::remove_file(&stale)
                    .with_context(|| format!("removing {}", stale.display()))?;
            }
        }
        dataplane
            .pin(&pin_dir)
            .context("pinning maps and program")?;
        info!(
            interface = %config.interface,
            mode = mode_name,
            services = config.services.len(),
            pins = %pin_dir.display(),
            "l3lb ready"
        );
        let mut tracker = health::Tracker::default();
        tracker.follow(&config);
        let probes = health::start(&config, &health_tx);
        Ok(Self {
            dataplane,
            config,
            config_path: config_path.to_path_buf(),
            pin_dir,
            no_neighbour_seen: 0,
            health: tracker,
            probes,
            health_tx,
            generation: 1,
        })
    }

    /// Re-reads the config and applies the difference; an invalid config changes nothing.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let new = Config::load(&self.config_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.config_path.display()))?;
        let current = self.dataplane.options();
        let opts = load_options(
            &new,
            EncapSources {
                v4: current.encap_src_v4,
                v6: current.encap_src_v6,
            },
        );
        if &opts != self.dataplane.options()
            || new.interface != self.config.interface
            || new.pin_path != self.config.pin_path
        {
            bail!(
                "interface, pin_path, maglev_table_size, max_services, max_backends, conntrack_size and decap on/off take effect only on restart; keeping the running config"
            );
        }
        let local = sys::local_address_set()?;
        let mut tracker = std::mem::take(&mut self.health);
        tracker.follow(&new);
        let desired = desired_from_config(&new, &local, &tracker.down());
        let applied = self.dataplane.apply(&desired);
        // Keep the health states of checks that did not change, whatever the outcome.
        self.health = tracker;
        let summary = applied.context("applying the new config")?;
        sys::prime_neighbours(remote_backends(&desired));
        self.generation += 1;
        info!(generation = self.generation, %summary, "applied config");
        self.probes = health::start(&new, &self.health_tx);
        self.config = new;
        Ok(())
    }

    /// Re-resolves neighbours when the data plane reported missing ones since the last
    /// call, so a flow waits at most about a second after an entry aged out.
    pub fn refresh_neighbours_if_missing(&mut self) {
        match self
            .dataplane
            .drop_count(lb_common::DropReason::NoNeighbour)
        {
            Ok(n) if n > self.no_neighbour_seen => {
                self.no_neighbour_seen = n;
                tracing::debug!(
                    drops = n,
                    "packets dropped for missing neighbours; resolving again"
                );
                self.resync();
            }
            Ok(_) => {}
            Err(e) => warn!("reading drop counters: {e}"),
        }
    }

    /// Lets the data plane's next-hop cache follow route and neighbour changes.
    pub fn expire_next_hops(&mut self) {
        if let Err(e) = self.dataplane.expire_next_hops() {
            warn!("advancing the next-hop epoch: {e}");
        }
    }

    /// Re-applies the running config against this node's current addresses (they decide
    /// local backends and decap destinations) and re-resolves every backend's neighbour
    /// (entries age out of the kernel's table).
    pub fn resync(&mut self) {
        self.reapply("node addresses changed");
    }

    /// Applies the running config with the current addresses and health; `why` names
    /// what may have changed, for the log.
    fn reapply(&mut self, why: &str) {
        match sys::local_address_set() {
            Ok(local) => {
                let desired = desired_from_config(&self.config, &local, &self.health.down());
                match self.dataplane.apply(&desired) {
                    Ok(summary) if summary != ApplySummary::default() => {
                        self.generation += 1;
                        info!(generation = self.generation, %summary, "{why}; applied")
                    }
                    Ok(_) => {}
                    Err(e) => error!("re-applying ({why}): {e:#}"),
                }
                sys::prime_neighbours(remote_backends(&desired));
            }
            Err(e) => warn!("reading local addresses: {e:#}"),
        }
    }

    /// Takes one health check outcome; a backend that changes state is taken out of (or
    /// put back into) new-connection selection at once.
    pub fn health_outcome(&mut self, outcome: health::Outcome) {
        let Some(t) = self.health.record(outcome) else {
            return;
        };
        let (service, backend) = (&t.key.0, t.key.1);
        if t.up {
            info!(service = %service, %backend, successes = t.streak, "backend passes its health check again; taking new connections");
        } else {
            warn!(service = %service, %backend, failures = t.streak, reason = t.reason.as_deref().unwrap_or(""), "backend fails its health check; no new connections (established ones stay)");
        }
        self.reapply("backend health changed");
    }

    /// Exits and leaves the data plane running on its pins: the next agent (a restart or
    /// an upgrade) takes it over without a gap; `l3lb down` removes it.
    pub fn exit(self) {
        info!(pins = %self.pin_dir.display(), "exiting; the data plane keeps forwarding (`l3lb down` detaches it)");
    }
}

/// Runs the agent until SIGTERM or SIGINT; SIGHUP reloads the config.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let mut agent = Agent::start(config_path, health_tx)?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut refresh = tokio::time::interval(Duration::from_secs(30));
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut nexthops = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading config");
                if let Err(e) = agent.reload() {
                    error!("config reload rejected, keeping the running state: {e:#}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = refresh.tick() => agent.resync(),
            _ = watch.tick() => agent.refresh_neighbours_if_missing(),
            _ = nexthops.tick() => agent.expire_next_hops(),
            Some(outcome) = health_rx.recv() => agent.health_outcome(outcome),
        }
    }
    agent.exit();
    Ok(())
}
