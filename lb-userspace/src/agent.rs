//! The standalone agent: config → desired state → maps, and the signal-driven run loop.

use std::{
    collections::{BTreeSet, HashSet},
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
        ApplySummary, Attached, Dataplane, Desired, DesiredBackend, DesiredService, Health,
        LoadOptions, ServiceMode,
    },
    handover, health, http, metrics,
    program_log::{ToTracing, XdpLogLevel, XdpLogReader},
    sys,
};

/// Version directory under `pin_path`: pins are an ABI, a layout change bumps it.
pub const PIN_VERSION: &str = "v1";

/// Where the pins of a config live.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(PIN_VERSION)
}

/// Takes the backends of `service` that fail their health checks (`down`) out of new
/// connections (weight 0: established ones stay), unless every backend that would take
/// them fails: then the service *fails open*, its weights unchanged. Every check failing at
/// once is likelier a wrong check (a port, a path, a firewall between balancer and
/// backends) than every backend dead, and dropping all new connections is the worse
/// answer to either. Returns whether the service fails open.
pub fn apply_health(service: &mut DesiredService, down: &HashSet<health::Key>) -> bool {
    if down.is_empty() {
        return false;
    }
    let name = service.name.clone();
    let mut key = (name, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut is_down = |b: &DesiredBackend| {
        key.1 = b.address;
        down.contains(&key)
    };
    let mut serving = service.backends.iter().filter(|b| b.weight > 0).peekable();
    if serving.peek().is_some() && serving.all(&mut is_down) {
        return true;
    }
    for b in &mut service.backends {
        if is_down(b) {
            b.weight = 0;
        }
    }
    false
}

/// The services of `desired` (made with `down`) that fail open (see `apply_health`): a
/// backend failing its check still has weight.
pub fn failing_open(desired: &Desired, down: &HashSet<health::Key>) -> BTreeSet<String> {
    desired
        .services
        .iter()
        .filter(|s| {
            s.backends
                .iter()
                .any(|b| b.weight > 0 && down.contains(&(s.name.clone(), b.address)))
        })
        .map(|s| s.name.clone())
        .collect()
}

/// Translates a config into the maps' desired state; `local` holds this node's addresses,
/// `down` the backends failing their health checks (see `apply_health`).
pub fn desired_from_config(
    cfg: &Config,
    local: &HashSet<IpAddr>,
    down: &HashSet<health::Key>,
) -> Desired {
    let mut services: Vec<DesiredService> = cfg
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
                        weight: b.effective_weight(),
                        local: local.contains(&b.address),
                    })
                    .collect(),
            }
        })
        .collect();
    for s in &mut services {
        apply_health(s, down);
    }
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

/// The desired state of a config and a source of services, for this node's addresses.
fn desired_for(
    config: &Config,
    source: &Source,
    local: &HashSet<IpAddr>,
    down: &HashSet<health::Key>,
) -> Desired {
    let from_config = desired_from_config(config, local, down);
    match source {
        Source::Config(_) => from_config,
        Source::Kubernetes(kube) => {
            // Services, local backends and the balancers' addresses come from the API; the
            // config may add decap sources (balancers outside the cluster), and this node's
            // addresses are always the current ones.
            let mut desired = kube.clone();
            // Nodes failing their probe keep their established flows and get no new ones,
            // like standalone backends failing their checks.
            for s in &mut desired.services {
                apply_health(s, down);
            }
            desired.decap_v4.extend(from_config.decap_v4);
            desired.decap_v4.sort();
            desired.decap_v4.dedup();
            desired.decap_v6.extend(from_config.decap_v6);
            desired.decap_v6.sort();
            desired.decap_v6.dedup();
            desired.local_v4 = from_config.local_v4;
            desired.local_v6 = from_config.local_v6;
            desired
        }
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
/// the interface lacks. Kubernetes services are not known at start: a missing address is
/// then a warning (those VIPs' packets would carry an unspecified outer source).
fn encap_sources(config: &Config, kubernetes: bool) -> anyhow::Result<EncapSources> {
    let ipip = |v6: bool| {
        config
            .services
            .iter()
            .any(|s| s.forwarding == Forwarding::Ipip && s.vip.is_ipv6() == v6)
    };
    let v4 = match sys::interface_ipv4(&config.interface)? {
        Some(a) => a,
        None if kubernetes => {
            warn!(interface = %config.interface, "no IPv4 address: IPv4 Services cannot be encapsulated");
            Ipv4Addr::UNSPECIFIED
        }
        None if ipip(false) => bail!(
            "interface {} has no IPv4 address to use as the source of IPIP headers",
            config.interface
        ),
        None => Ipv4Addr::UNSPECIFIED,
    };
    let v6 = match sys::interface_ipv6(&config.interface)? {
        Some(a) => a,
        None if kubernetes => Ipv6Addr::UNSPECIFIED,
        None if ipip(true) => bail!(
            "interface {} has no global IPv6 address to use as the source of IPv6-in-IPv6 headers",
            config.interface
        ),
        None => Ipv6Addr::UNSPECIFIED,
    };
    Ok(EncapSources { v4, v6 })
}

/// Turns on the forwarding `bpf_fib_lookup` needs on `config`'s interface: IPv4 where
/// the node balances anything, IPv6 where a service has an IPv6 VIP (Kubernetes mode
/// turns IPv6 on when such a Service arrives).
fn enable_forwarding(config: &Config, kubernetes: bool) -> anyhow::Result<()> {
    if !config.services.is_empty() || kubernetes {
        if sys::enable_ipv4_forwarding(&config.interface)? {
            info!(interface = %config.interface, "enabled IPv4 forwarding on the interface (bpf_fib_lookup needs it)");
        }
        if config.services.iter().any(|s| s.vip.is_ipv6()) {
            for change in sys::enable_ipv6_forwarding(&config.interface)? {
                info!(interface = %config.interface, "{change} (bpf_fib_lookup needs IPv6 forwarding; router advertisements stay accepted)");
            }
        }
    }
    Ok(())
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
        log_level: XdpLogLevel::from_tracing(),
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

/// Logs what a migration carried of the earlier agent's map `name` (`what` it did), and
/// warns when some of it found no place: those flows are balanced afresh by their next
/// packet (a connection that then meets another backend is reset), those counters lost.
fn note_carried(name: &str, carried: crate::flowtable::Carried, what: &str) {
    use lb_common::map_names;
    info!(map = name, entries = carried.kept, "{what}");
    if carried.lost() > 0 {
        let knob = match name {
            map_names::FLOWS => "raise conntrack_size to carry them all",
            map_names::SERVICE_STATS => "max_services is smaller than the ids they counted for",
            map_names::BACKEND_STATS => "max_backends is smaller than the ids they counted for",
            _ => "this build's map holds fewer entries",
        };
        warn!(
            map = name,
            offered = carried.offered,
            kept = carried.kept,
            "{} entries of the earlier agent's map found no place in this one ({knob})",
            carried.lost()
        );
    }
}

/// Puts the program on the configured interface (switching an earlier agent's pinned link
/// to it, or attaching afresh) and pins everything; returns the mode for the log.
fn attach_and_pin(
    dataplane: &mut Dataplane,
    config: &Config,
    pin_dir: &Path,
) -> anyhow::Result<&'static str> {
    let mode = aya_mode(config.xdp_mode);
    let (attached, generic) = match dataplane.attach_pinned(&config.interface, mode, pin_dir) {
        Ok(a) => (a, config.xdp_mode == XdpMode::Generic),
        Err(e) if config.xdp_mode == XdpMode::Auto => {
            warn!(error = %e, "native XDP unavailable; falling back to generic mode (slower)");
            let a = dataplane.attach_pinned(&config.interface, AyaXdpMode::Skb, pin_dir)?;
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
    let own = handover::link_pin(pin_dir, &config.interface);
    for stale in handover::link_pins(pin_dir) {
        if stale != own {
            warn!(link = %stale.display(), "detaching the earlier agent's program from an interface no longer configured");
            std::fs::remove_file(&stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    dataplane.pin(pin_dir).context("pinning maps and program")?;
    Ok(mode_name)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the Kubernetes translation hands the agent: the maps' desired state (before
/// health checks) and the node probes of `externalTrafficPolicy: Local` Services.
#[derive(Debug, Clone, Default)]
pub struct KubernetesState {
    /// The services, decap allow list and local backends.
    pub desired: Desired,
    /// The nodes to probe, per data-plane service.
    pub checks: Vec<health::Target>,
}

/// Where an agent's services come from.
#[derive(Debug)]
enum Source {
    /// The config file's `services` (SIGHUP re-reads it).
    Config(Option<PathBuf>),
    /// The Kubernetes API, translated by [`crate::kubernetes`]: the last desired state it
    /// produced, kept so address changes and resyncs can re-apply it.
    Kubernetes(Desired),
}

/// A running agent: the data plane plus the config it was built from.
pub struct Agent {
    dataplane: Dataplane,
    config: Config,
    source: Source,
    pin_dir: PathBuf,
    no_neighbour_seen: u64,
    health: health::Tracker,
    probes: health::Probes,
    health_tx: mpsc::Sender<health::Outcome>,
    /// The verdict last written to the metadata map per checked backend.
    health_shown: std::collections::HashMap<health::Key, bool>,
    ipv6_forwarding: bool,
    /// What the start copied from the earlier agent's tables, to copy again right before
    /// a deferred attach (see `attach_deferred`).
    deferred_migration: Option<handover::CarryPlan>,
    /// Kubernetes data-plane services the maps had no room for at the last apply (see
    /// `apply_admitting`).
    left_out: BTreeSet<String>,
    /// Services failing open at the last apply (see `apply_health`), to log changes once.
    failing_open: BTreeSet<String>,
    /// The program is not on the interface yet (Kubernetes mode, taking over from an
    /// earlier agent): the first complete Kubernetes apply puts it there.
    attach_deferred: bool,
    /// Health check outcomes, until the run loop takes them.
    health_rx: Option<mpsc::Receiver<health::Outcome>>,
    /// The XDP program's log records (when its logs are on), until the run loop reads them.
    xdp_logs: Option<XdpLogReader<ToTracing>>,
    /// Applies logged since start: the first config is 1, every accepted SIGHUP reload
    /// and every re-apply that changed something adds one. Logged with each apply so a
    /// log reader can tell which reload a line belongs to.
    generation: u64,
    /// What `/metrics` adds to the pinned counters (generation, last apply).
    labels: metrics::SharedLabels,
    /// The devices XDP cannot transmit on, as last listed for the program.
    egress: EgressWatch,
}

/// The devices XDP cannot transmit on, and the VLAN devices by index (see
/// [`Agent::refresh_egress_devices`]).
type EgressLists = (
    BTreeSet<u32>,
    std::collections::BTreeMap<u32, lb_common::VlanDev>,
);

/// What the agent keeps of the devices XDP cannot transmit on between refreshes (see
/// [`Agent::refresh_egress_devices`]).
#[derive(Debug, Default)]
struct EgressWatch {
    /// The program's `egress_no_xdp` count at the last look.
    dropped: u64,
    /// Per listed device: its count of packets dropped toward it at the last look.
    counts: std::collections::BTreeMap<u32, u64>,
    /// Per device: when the log last named it.
    named: std::collections::BTreeMap<u32, std::time::Instant>,
    /// The log said that this kernel reports no XDP features.
    no_features_said: bool,
    /// Devices the program's list had no room for at the last refresh.
    left_out: usize,
    /// VLAN devices the program's list had no room for at the last refresh.
    vlans_left_out: usize,
    /// The last refresh failed (and the log said so).
    failing: bool,
}

impl Agent {
    /// Loads the program, writes the config's state, then puts the program on the
    /// interface and pins everything.
    ///
    /// An earlier agent's pins are taken over (see [`crate::handover`]): its connection
    /// table and counters are reused (or migrated when only their size changed), its ids
    /// kept, and its pinned link switched to the new program in one step once the new
    /// maps are complete, so forwarding never stops.
    /// Health check outcomes reach the run loop (see [`Agent::health_outcome`]).
    pub fn start(config_path: &Path) -> anyhow::Result<Self> {
        let config = Config::load(config_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        Self::start_with(config, Source::Config(Some(config_path.to_path_buf())))
    }

    /// Starts the agent of `l3lb run --kubernetes`: the config gives the node settings
    /// (its `services` must be empty) and the services come through
    /// [`Agent::apply_kubernetes`]. The decap role is always on: every node is a backend.
    pub fn start_kubernetes(config: Config) -> anyhow::Result<Self> {
        if !config.services.is_empty() {
            bail!(
                "the config lists services, but with --kubernetes they come from the API server; remove `services`"
            );
        }
        Self::start_with(config, Source::Kubernetes(Desired::default()))
    }

    fn start_with(config: Config, source: Source) -> anyhow::Result<Self> {
        let kubernetes = matches!(source, Source::Kubernetes(_));
        sys::require_capabilities()?;
        sys::require_interface(&config.interface)?;
        let encap = encap_sources(&config, kubernetes)?;
        sys::ensure_bpffs(&config.pin_path)?;
        let pin_dir = pin_dir(&config.pin_path);
        let maps_dir = pin_dir.join("maps");

        let mut opts = load_options(&config, encap);
        // The decap role is a load-time switch, and in Kubernetes mode its allow list is
        // filled from the Node objects only later: always on.
        opts.decap |= kubernetes;
        let plan = if maps_dir.exists() {
            handover::plan(&maps_dir, &opts).context("taking over the earlier agent's state")?
        } else {
            handover::CarryPlan::default()
        };
        let mut dataplane =
            Dataplane::load_carrying(&opts, &plan).context("loading the XDP program")?;
        let xdp_logs = if opts.log_level == XdpLogLevel::Off {
            None
        } else {
            info!(level = ?opts.log_level, target = crate::program_log::TARGET, "the XDP program logs (every drop and new flow: for debugging only)");
            Some(
                dataplane
                    .log_reader(ToTracing)
                    .context("starting the XDP program's log reader")?,
            )
        };
        if plan.carries_anything() {
            // The connection table's entries record the epoch they were last seen in:
            // the clock goes on where the earlier agent left it.
            let previous_epoch = handover::previous_epoch(&maps_dir);
            let previous_service_counts = handover::previous_service_counts(&maps_dir);
            if let Some(epoch) = previous_epoch {
                dataplane
                    .resume_epoch(epoch)
                    .context("continuing the earlier agent's epoch")?;
            }
            for (name, carried) in dataplane
                .migrate(&plan)
                .context("migrating the earlier agent's state")?
            {
                let what = match plan.get(name) {
                    handover::Carry::Convert(_) => {
                        "converted the previous release's connection table (an LRU hash, or buckets of whole entries) into this build's table; the flows kept keep their backends"
                    }
                    handover::Carry::Retag(_) => {
                        "placed the earlier build's connection table anew with this build's tags; the flows kept keep their backends"
                    }
                    handover::Carry::Migrate(_)
                        if name == lb_common::map_names::SERVICE_STATS
                            && previous_service_counts
                                != Some(lb_common::SERVICE_COUNTS_RETIRED) =>
                    {
                        "copied the earlier build's service counters and converted the copy (packets are counted for backends only)"
                    }
                    _ => "migrated to the new size",
                };
                note_carried(name, carried, what);
            }
            if previous_epoch.is_none()
                && !matches!(
                    plan.get(lb_common::map_names::FLOWS),
                    handover::Carry::Fresh
                )
            {
                let epoch = dataplane
                    .resume_epoch_past_table()
                    .context("continuing the epoch past the carried connection table")?;
                warn!(
                    epoch,
                    "the earlier agent's epoch could not be read (its settings pin is missing or of another layout): the clock goes on past every carried connection-table entry's"
                );
            }
            let previous = handover::PreviousIds::read(&maps_dir)
                .context("reading the earlier agent's ids")?;
            let stats_carried = !matches!(
                plan.get(lb_common::map_names::SERVICE_STATS),
                handover::Carry::Fresh
            );
            dataplane
                .adopt(previous, stats_carried)
                .context("taking over the earlier agent's counters")?;
            info!(
                reused = ?plan.maps.iter().filter(|(_, c)| matches!(c, handover::Carry::Reuse(_))).map(|(n, _)| *n).collect::<Vec<_>>(),
                "taking over the state of the earlier agent"
            );
        }
        let local = sys::local_address_set()?;
        let desired = desired_for(&config, &source, &local, &HashSet::new());
        let summary = dataplane
            .apply(&desired)
            .context("writing the initial state")?;
        info!(generation = 1, %summary, "applied config");

        enable_forwarding(&config, kubernetes)?;
        sys::prime_neighbours(remote_backends(&desired));
        // Before the program takes traffic (an earlier agent's link switches to it at
        // once): routes out of VLAN devices must not wait for the first tick.
        match crate::netdev::vlan_devices() {
            Ok(vlans) => {
                if let Err(e) = dataplane.list_vlans(&vlans) {
                    warn!("listing the VLAN devices: {e}");
                }
            }
            Err(e) => warn!("listing the VLAN devices: {e:#}"),
        }

        // In Kubernetes mode the services arrive only once the API server has been listed;
        // until then an earlier agent's program keeps forwarding with its complete maps
        // (also through an API outage) instead of being switched to empty ones.
        let defer = kubernetes && handover::link_pin(&pin_dir, &config.interface).exists();
        // The earlier program goes on recording flows until the switch: what was copied
        // from its tables is copied again then.
        let deferred_migration = (defer && plan.carries_anything()).then(|| plan.clone());
        let mode_name = if defer {
            "deferred until the Kubernetes state is complete"
        } else {
            attach_and_pin(&mut dataplane, &config, &pin_dir)?
        };
        info!(
            interface = %config.interface,
            mode = mode_name,
            services = config.services.len(),
            pins = %pin_dir.display(),
            "l3lb ready"
        );
        let mut tracker = health::Tracker::default();
        tracker.follow(&config);
        let (health_tx, health_rx) = mpsc::channel(1024);
        let mut probes = health::Probes::default();
        probes.follow(&health::targets(&config), &health_tx);
        let ipv6_forwarding = config.services.iter().any(|s| s.vip.is_ipv6());
        Ok(Self {
            dataplane,
            config,
            source,
            pin_dir,
            no_neighbour_seen: 0,
            health: tracker,
            probes,
            health_tx,
            health_shown: std::collections::HashMap::new(),
            ipv6_forwarding,
            left_out: BTreeSet::new(),
            failing_open: BTreeSet::new(),
            attach_deferred: defer,
            deferred_migration,
            health_rx: Some(health_rx),
            xdp_logs,
            generation: 1,
            labels: std::sync::Arc::new(std::sync::Mutex::new(metrics::Labels {
                generation: 1,
                last_apply_ok: true,
                last_success_unix: unix_now(),
                watches: Default::default(),
            })),
            egress: EgressWatch::default(),
        })
    }

    /// Applies the services, decap allow list and local backends that the Kubernetes
    /// translation produced (this node's addresses are refreshed here), and probes the
    /// nodes it lists; returns what changed.
    pub fn apply_kubernetes(&mut self, state: KubernetesState) -> anyhow::Result<ApplySummary> {
        let KubernetesState { desired, checks } = state;
        // The tracker keeps the verdict of every probe that did not change, so a node
        // failing its probe stays out through unrelated API changes; the probes of
        // unchanged targets keep running in their rhythm.
        let before: Vec<health::Key> = self.health.keys().cloned().collect();
        self.health.follow_targets(&checks);
        self.probes.follow(&checks, &self.health_tx);
        let unchecked: Vec<health::Key> = before
            .into_iter()
            .filter(|k| self.health.state(k).is_none())
            .collect();
        let local = sys::local_address_set()?;
        let wants_v6 = desired
            .services
            .iter()
            .any(|s| s.vips.iter().any(|v| v.0.is_ipv6()));
        if wants_v6 && !self.ipv6_forwarding {
            for change in sys::enable_ipv6_forwarding(&self.config.interface)? {
                info!(interface = %self.config.interface, "{change} (bpf_fib_lookup needs IPv6 forwarding; router advertisements stay accepted)");
            }
            self.ipv6_forwarding = true;
        }
        let source = Source::Kubernetes(desired);
        let down = self.health.down();
        let mut full = desired_for(&self.config, &source, &local, &down);
        let summary = self
            .apply_admitting(&mut full)
            .context("applying the Kubernetes state")?;
        self.note_failing_open(&full, &down);
        if summary != ApplySummary::default() {
            // Backends the apply re-created show `unknown` until their next probe.
            self.health_shown.clear();
        }
        self.source = source;
        self.forget_verdicts(unchecked);
        sys::prime_neighbours(remote_backends(&full));
        if self.attach_deferred {
            if let Some(plan) = self.deferred_migration.take() {
                for (name, carried) in self
                    .dataplane
                    .migrate_again(&plan)
                    .context("copying the earlier agent's tables again")?
                {
                    note_carried(
                        name,
                        carried,
                        "copied again from the earlier program, which forwarded until now",
                    );
                }
            }
            let mode = attach_and_pin(&mut self.dataplane, &self.config, &self.pin_dir)?;
            self.attach_deferred = false;
            info!(
                mode,
                "the Kubernetes state is complete: the program now runs on the interface"
            );
        }
        Ok(summary)
    }

    /// The labels `/metrics` serves with the counters, kept current by [`Agent::note_apply`].
    pub fn metrics_labels(&self) -> metrics::SharedLabels {
        self.labels.clone()
    }

    /// Records the outcome of an apply (or a rejected reload) for `/metrics`.
    pub fn note_apply(&self, ok: bool) {
        let mut l = self
            .labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.generation = self.generation;
        l.last_apply_ok = ok;
        if ok {
            l.last_success_unix = unix_now();
        }
    }

    /// The router of `metrics_address`: `/metrics` (the pinned counters with the agent's
    /// labels) plus `/healthz`; the caller adds `/readyz`.
    pub fn router(&self) -> http::Router {
        let pin_dir = self.pin_dir.clone();
        let labels = self.labels.clone();
        http::Router::new()
            .route("/healthz", || {
                http::Reply::text(hyper::StatusCode::OK, "ok\n")
            })
            .route("/metrics", move || {
                match metrics::scrape(&pin_dir, &labels) {
                    Ok(body) => http::Reply {
                        status: hyper::StatusCode::OK,
                        content_type: metrics::CONTENT_TYPE,
                        body,
                    },
                    Err(e) => http::Reply::text(
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("reading the pinned maps: {e:#}\n"),
                    ),
                }
            })
    }

    /// Re-reads the config and applies the difference; an invalid config changes nothing.
    /// In Kubernetes mode the services come from the API, so this only re-applies them.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let Source::Config(Some(path)) = &self.source else {
            self.resync();
            return Ok(());
        };
        let path = path.clone();
        let new = Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
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
            || new.metrics_address != self.config.metrics_address
        {
            bail!(
                "interface, pin_path, metrics_address, maglev_table_size, max_services, max_backends, conntrack_size and decap on/off take effect only on restart; keeping the running config"
            );
        }
        // The program stays attached across restarts (pinned link): the mode is chosen
        // only when it is attached anew.
        if new.xdp_mode != self.config.xdp_mode {
            bail!(
                "xdp_mode takes effect only when the program is attached anew (`l3lb down`, then `l3lb run`); keeping the running config"
            );
        }
        // The outer sources are fixed when the program loads: one the interface lacked
        // then cannot be had now.
        let ipip = |v6: bool| {
            new.services
                .iter()
                .any(|s| s.forwarding == Forwarding::Ipip && s.vip.is_ipv6() == v6)
        };
        if ipip(false) && current.encap_src_v4.is_unspecified() {
            bail!(
                "interface {} had no IPv4 address when the agent started, so IPIP headers would have no source: restart the agent to add IPv4 ipip services; keeping the running config",
                new.interface
            );
        }
        if ipip(true) && current.encap_src_v6.is_unspecified() {
            bail!(
                "interface {} had no global IPv6 address when the agent started, so IPv6-in-IPv6 headers would have no source: restart the agent to add IPv6 ipip services; keeping the running config",
                new.interface
            );
        }
        let local = sys::local_address_set()?;
        // The new config's checks keep the states of those that did not change; the
        // tracker is taken only with the config, so after a rejected apply the running
        // config's checks keep deciding (its probes go on, and a later re-apply would
        // otherwise put a failing backend back).
        let mut tracker = self.health.clone();
        tracker.follow(&new);
        let down = tracker.down();
        let desired = desired_for(&new, &self.source, &local, &down);
        let summary = self
            .dataplane
            .apply(&desired)
            .context("applying the new config")?;
        self.note_failing_open(&desired, &down);
        let unchecked: Vec<health::Key> = self
            .health
            .keys()
            .filter(|k| tracker.state(k).is_none())
            .cloned()
            .collect();
        self.health = tracker;
        self.forget_verdicts(unchecked);
        // The first services, or the first IPv6 VIP, may come with this reload: the
        // config is applied either way, so a failure here is said, not a rejection.
        if let Err(e) = enable_forwarding(&new, false) {
            error!("the new config is applied, but forwarding could not be turned on: {e:#}");
        }
        sys::prime_neighbours(remote_backends(&desired));
        self.generation += 1;
        info!(generation = self.generation, %summary, "applied config");
        self.probes.follow(&health::targets(&new), &self.health_tx);
        // Backends the apply re-created show `unknown` until their next check.
        self.health_shown.clear();
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

    /// Lists for the program the devices XDP cannot transmit on now (their XDP features
    /// lack `ndo-xmit`; a veth gains it when its peer runs XDP or GRO), so that a packet
    /// whose route to a backend leaves by one is dropped as `egress_no_xdp`, not
    /// redirected there and lost uncounted; and names in the log each device packets were
    /// dropped toward (again at most once a minute while it goes on); only while this
    /// agent's program is attached in the driver (generic XDP sends redirected frames as
    /// packets, which every device takes). And lists the VLAN devices, through which the
    /// program sends tagged frames on the parent instead, in either mode (the start lists
    /// them before the program takes traffic). A refresh that fails leaves the lists as
    /// they were.
    pub fn refresh_egress_devices(&mut self) {
        match self.egress_devices() {
            Ok((devices, vlans)) => match self
                .dataplane
                .list_vlans(&vlans)
                .and_then(|v| Ok((v, self.dataplane.list_no_xmit(&devices)?)))
            {
                Ok((vlans_left_out, left_out)) => {
                    if vlans_left_out > 0 && self.egress.vlans_left_out == 0 {
                        warn!(
                            vlans = vlans.len(),
                            max = lb_common::VLANS_MAX,
                            "more VLAN devices than the program's list holds: packets routed out of those left out are dropped as egress_no_xdp"
                        );
                    }
                    self.egress.vlans_left_out = vlans_left_out;
                    if self.egress.failing {
                        info!("the devices XDP cannot transmit on are listed again");
                    }
                    self.egress.failing = false;
                    if left_out > 0 && self.egress.left_out == 0 {
                        warn!(
                            devices = devices.len(),
                            max = lb_common::NO_XMIT_MAX,
                            "more devices without XDP transmit than the program's list holds: packets routed out of those left out are lost uncounted"
                        );
                    }
                    self.egress.left_out = left_out;
                }
                Err(e) => {
                    self.egress_failed(format!("writing the devices XDP cannot transmit on: {e}"))
                }
            },
            Err(e) => self.egress_failed(format!(
                "listing the devices XDP cannot transmit on (the list stays as it was): {e:#}"
            )),
        }
        self.name_egress_drops();
    }

    /// The devices to list: those without XDP transmit while this agent's program is
    /// attached in the driver (none otherwise), and the VLAN devices.
    fn egress_devices(&mut self) -> anyhow::Result<EgressLists> {
        let vlans = crate::netdev::vlan_devices()?;
        let ifindex = crate::sys::interface_index(&self.config.interface)?;
        let ours = self.dataplane.program_id()?;
        if crate::netdev::driver_program(ifindex)? != Some(ours) {
            return Ok((BTreeSet::new(), vlans));
        }
        let devices = match crate::netdev::without_xdp_transmit()? {
            Some(devices) => devices,
            None => {
                if !self.egress.no_features_said {
                    self.egress.no_features_said = true;
                    info!(
                        "this kernel reports no XDP features (Linux 6.3 and later do): a packet whose route to a backend leaves by a device XDP cannot transmit on is lost without a counted reason"
                    );
                }
                BTreeSet::new()
            }
        };
        Ok((devices, vlans))
    }

    /// Says a failed refresh once, until one succeeds again.
    fn egress_failed(&mut self, what: String) {
        if self.egress.failing {
            tracing::debug!("{what}");
        } else {
            warn!("{what}");
        }
        self.egress.failing = true;
    }

    /// Names in the log each device packets were dropped toward since the last look, at
    /// most once a minute each; reads the devices' counts only when the program's
    /// `egress_no_xdp` count moved.
    fn name_egress_drops(&mut self) {
        const RENAME_AFTER: Duration = Duration::from_secs(60);
        let dropped = match self
            .dataplane
            .drop_count(lb_common::DropReason::EgressNoXdp)
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("reading the egress_no_xdp count: {e}");
                return;
            }
        };
        if dropped == self.egress.dropped {
            return;
        }
        self.egress.dropped = dropped;
        let counts = match self.dataplane.no_xmit_counts() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("reading the devices' egress_no_xdp counts: {e}");
                return;
            }
        };
        let now = std::time::Instant::now();
        for (&device, &count) in &counts {
            let before = self.egress.counts.get(&device).copied().unwrap_or(0);
            let due = self
                .egress
                .named
                .get(&device)
                .is_none_or(|at| now.duration_since(*at) >= RENAME_AFTER);
            if count != before && count > 0 && due {
                let name = crate::sys::interface_name(device)
                    .unwrap_or_else(|| format!("interface {device}"));
                warn!(
                    device = %name,
                    dropped = count,
                    "packets to backends dropped (egress_no_xdp): their route leaves by {name}, where XDP cannot transmit (its XDP features lack ndo-xmit: a bridge or tunnel device, a VLAN on a VLAN, a veth whose peer runs neither XDP nor GRO, a driver that takes XDP frames only with a program of its own); route the backends through {} or let {name} take XDP frames",
                    self.config.interface
                );
                self.egress.named.insert(device, now);
            }
        }
        self.egress
            .named
            .retain(|d, at| counts.contains_key(d) || now.duration_since(*at) < RENAME_AFTER);
        self.egress.counts = counts;
    }

    /// Lets the data plane's next-hop cache follow route and neighbour changes.
    pub fn expire_next_hops(&mut self) {
        if let Err(e) = self.dataplane.expire_next_hops() {
            warn!("advancing the epoch: {e}");
        }
    }

    /// Re-applies the running config against this node's current addresses (they decide
    /// local backends and decap destinations) and re-resolves every backend's neighbour
    /// (entries age out of the kernel's table).
    pub fn resync(&mut self) {
        self.reapply("node addresses changed");
    }

    /// Shows the backends of `keys`, no longer checked, as `unknown` again (status and
    /// the health metric), not with their last check's verdict; backends gone with the
    /// apply are skipped.
    fn forget_verdicts(&mut self, keys: Vec<health::Key>) {
        for key in keys {
            self.health_shown.remove(&key);
            match self
                .dataplane
                .set_backend_health(&key.0, key.1, Health::Unknown)
            {
                Ok(()) | Err(crate::dataplane::DataplaneError::UnknownBackend { .. }) => {}
                Err(e) => {
                    warn!(service = %key.0, backend = %key.1, "recording that the backend is no longer checked: {e}")
                }
            }
        }
    }

    /// Applies `desired`. In Kubernetes mode a state the maps have no room for is not
    /// refused whole, which would freeze every Service because of one: the newest Services
    /// (`desired.services` lists the oldest first) are left out, one at a time, until the
    /// rest fit, and each is named in the log once. A config's state is all or nothing.
    fn apply_admitting(
        &mut self,
        desired: &mut Desired,
    ) -> Result<ApplySummary, crate::dataplane::DataplaneError> {
        if !matches!(self.source, Source::Kubernetes(_)) {
            return self.dataplane.apply(desired);
        }
        let whole = desired.clone();
        let (mut applied, mut left_out) = self.apply_fitting(desired);
        // That apply may have freed ids (a Service deleted) that an apply holds until it
        // is done: those left out may fit now.
        if applied.is_ok() && !left_out.is_empty() {
            let mut again = whole;
            if let (Ok(summary), out) = self.apply_fitting(&mut again) {
                *desired = again;
                left_out = out;
                if summary != ApplySummary::default() {
                    applied = Ok(summary);
                }
            }
        }
        if applied.is_ok() {
            for name in left_out.difference(&self.left_out) {
                warn!(service = %name, "the maps have no room for this Service (the newest of those that do not fit): not balanced; raise max_services or max_backends");
            }
            for name in self.left_out.difference(&left_out) {
                info!(service = %name, "the maps have room for this Service again: balanced");
            }
            self.left_out = left_out;
        }
        applied
    }

    /// Applies `desired`, leaving out its last services while the maps have no room for
    /// them; returns the outcome and the names left out.
    fn apply_fitting(
        &mut self,
        desired: &mut Desired,
    ) -> (
        Result<ApplySummary, crate::dataplane::DataplaneError>,
        BTreeSet<String>,
    ) {
        let mut left_out = BTreeSet::new();
        loop {
            match self.dataplane.apply(desired) {
                Err(crate::dataplane::DataplaneError::Full { .. })
                    if !desired.services.is_empty() =>
                {
                    if let Some(s) = desired.services.pop() {
                        left_out.insert(s.name);
                    }
                }
                r => return (r, left_out),
            }
        }
    }

    /// Logs the services that start or stop failing open with `desired` (made with
    /// `down`), once each time.
    fn note_failing_open(&mut self, desired: &Desired, down: &HashSet<health::Key>) {
        let now = failing_open(desired, down);
        for name in now.difference(&self.failing_open) {
            warn!(service = %name, "every backend of the service fails its health check; failing open: all of them take new connections by their weights (check the health check itself: port, path, firewall)");
        }
        for name in self.failing_open.difference(&now) {
            info!(service = %name, "the service no longer fails open: backends failing their health check take no new connections");
        }
        self.failing_open = now;
    }

    /// Applies the running config with the current addresses and health; `why` names
    /// what may have changed, for the log.
    fn reapply(&mut self, why: &str) {
        match sys::local_address_set() {
            Ok(local) => {
                let down = self.health.down();
                let mut desired = desired_for(&self.config, &self.source, &local, &down);
                let applied = self.apply_admitting(&mut desired);
                if applied.is_ok() {
                    self.note_failing_open(&desired, &down);
                }
                match applied {
                    Ok(summary) if summary != ApplySummary::default() => {
                        self.generation += 1;
                        info!(generation = self.generation, %summary, "{why}; applied");
                        self.note_apply(true);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        error!("re-applying ({why}): {e:#}");
                        self.note_apply(false);
                    }
                }
                sys::prime_neighbours(remote_backends(&desired));
            }
            Err(e) => warn!("reading local addresses: {e:#}"),
        }
    }

    /// Takes one health check outcome; a backend that changes state is taken out of (or
    /// put back into) new-connection selection at once.
    pub fn health_outcome(&mut self, outcome: health::Outcome) {
        let key = outcome.key.clone();
        let transition = self.health.record(outcome);
        // The pinned metadata shows each checked backend's verdict (for status and
        // metrics) from its first check on.
        if let Some(up) = self.health.state(&key)
            && self.health_shown.get(&key) != Some(&up)
        {
            let h = if up { Health::Up } else { Health::Down };
            match self.dataplane.set_backend_health(&key.0, key.1, h) {
                Ok(()) => {
                    self.health_shown.insert(key, up);
                }
                Err(e) => tracing::debug!("recording health: {e}"),
            }
        }
        let Some(t) = transition else {
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
    pub fn exit(mut self) {
        // Nobody keeps the list current from here on: a device that gains XDP transmit
        // would stay refused. Unlisted, they are tried as before this agent.
        if let Err(e) = self.dataplane.list_no_xmit(&BTreeSet::new()) {
            warn!("unlisting the devices XDP cannot transmit on: {e}");
        }
        info!(pins = %self.pin_dir.display(), "exiting; the data plane keeps forwarding (`l3lb down` detaches it)");
    }
}

/// The agent's signals: SIGHUP reloads, SIGTERM and SIGINT stop it.
///
/// Taken before anything slow (loading the program, migrating a large connection table):
/// as PID 1 — a container's first process — a process receives no signal it has no
/// handler for, so a SIGTERM sent while it started would be lost and the pod would linger
/// until its grace period ends in SIGKILL. `l3lb run` starts with the three blocked (see
/// [`mask_signals`]), so one sent even before the handlers exist waits for them; a signal
/// that arrives while the agent starts is answered once it has started (the maps
/// complete, the program attached), as it would be later.
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers, then unblocks the signals for this thread. Must run inside a
    /// Tokio runtime with I/O enabled (the handlers are its signal driver's).
    pub fn install() -> anyhow::Result<Self> {
        let signals = Signals {
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        };
        mask_signals(false);
        Ok(signals)
    }
}

/// Blocks (`true`) or unblocks SIGHUP, SIGTERM and SIGINT for the calling thread (threads
/// started afterwards inherit it). Unblocking matters too: a parent that blocked them
/// (the mask survives exec) would leave the agent unstoppable.
pub fn mask_signals(block: bool) {
    // SAFETY: manipulates a local signal set and this thread's mask. pthread_sigmask fails
    // only for an invalid `how`, which these two are not.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Runs the agent until SIGTERM or SIGINT; SIGHUP reloads the config.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let agent = Agent::start(config_path)?;
    // The standalone agent is ready once it runs: its state is the config's.
    let router = agent.router().route("/readyz", || {
        http::Reply::text(hyper::StatusCode::OK, "ok\n")
    });
    let bound = http::serve(agent.config.metrics_address, router).await?;
    info!(address = %bound, "serving /metrics, /healthz and /readyz");
    run_agent(agent, signals, futures::stream::pending(), |_| {}).await
}

/// The run loop shared by both modes: signals, periodic upkeep, and `updates` (desired
/// states from the Kubernetes translation; a pending stream for the standalone agent),
/// each applied and its outcome reported to `applied`.
pub async fn run_agent(
    mut agent: Agent,
    signals: Signals,
    updates: impl futures::Stream<Item = KubernetesState> + Unpin,
    mut applied: impl FnMut(Result<(), String>),
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut updates = updates.fuse();
    let mut health_rx = agent
        .health_rx
        .take()
        .context("the agent's health channel was taken already")?;
    if let Some(reader) = agent.xdp_logs.take() {
        tokio::spawn(async move {
            if let Err(e) = reader.forward().await {
                warn!("the XDP program's log records are no longer read: {e}");
            }
        });
    }
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut refresh = tokio::time::interval(Duration::from_secs(30));
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut nexthops = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading config");
                match agent.reload() {
                    Ok(()) => agent.note_apply(true),
                    Err(e) => {
                        agent.note_apply(false);
                        error!("config reload rejected, keeping the running state: {e:#}");
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = refresh.tick() => agent.resync(),
            _ = watch.tick() => {
                agent.refresh_neighbours_if_missing();
                agent.refresh_egress_devices();
            }
            _ = nexthops.tick() => agent.expire_next_hops(),
            Some(outcome) = health_rx.recv() => agent.health_outcome(outcome),
            Some(desired) = updates.next() => match agent.apply_kubernetes(desired) {
                Ok(summary) => {
                    if summary == ApplySummary::default() {
                        tracing::debug!("Kubernetes state unchanged");
                    } else {
                        info!(%summary, "applied Kubernetes state");
                    }
                    agent.note_apply(true);
                    applied(Ok(()));
                }
                Err(e) => {
                    agent.note_apply(false);
                    error!("applying the Kubernetes state failed: {e:#}");
                    applied(Err(format!("{e:#}")));
                }
            },
        }
    }
    agent.exit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "interface: eth0\nservices:\n\
             \x20 - name: web\n    vip: 192.0.2.10\n    ports: [80]\n\
             \x20   health_check: {type: tcp}\n    backends:\n\
             \x20     - address: 10.0.0.1\n      - address: 10.0.0.2\n\
             \x20     - {address: 10.0.0.3, weight: 0}\n\
             \x20 - name: dns\n    vip: 192.0.2.11\n    ports: [53]\n    protocol: udp\n\
             \x20   backends:\n      - address: 10.0.0.1\n",
        )
        .expect("config")
    }

    fn weights(d: &Desired, service: &str) -> Vec<u32> {
        d.services
            .iter()
            .find(|s| s.name == service)
            .expect("service")
            .backends
            .iter()
            .map(|b| b.weight)
            .collect()
    }

    fn key(service: &str, last: u8) -> health::Key {
        (service.into(), IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
    }

    #[test]
    fn a_service_whose_every_serving_backend_fails_its_check_fails_open() {
        let cfg = config();
        let local = HashSet::new();
        let one: HashSet<health::Key> = [key("web", 1)].into();
        let d = desired_from_config(&cfg, &local, &one);
        assert_eq!(
            weights(&d, "web"),
            [0, 1, 0],
            "one down: out of new connections"
        );
        assert!(failing_open(&d, &one).is_empty());
        // Both backends that take traffic fail (the drained one does not count): the
        // service keeps its weights instead of dropping every new connection.
        let both: HashSet<health::Key> = [key("web", 1), key("web", 2), key("web", 3)].into();
        let d = desired_from_config(&cfg, &local, &both);
        assert_eq!(weights(&d, "web"), [1, 1, 0], "all down: failing open");
        assert_eq!(weights(&d, "dns"), [1], "another service is not touched");
        assert_eq!(failing_open(&d, &both), BTreeSet::from(["web".to_string()]));
    }
}
