//! The standalone configuration file (`l3lb.yaml`): model, parsing and validation.
//!
//! Parsing happens in two steps. The text is first read into a YAML value, so syntax
//! errors carry a line and column. The value is then deserialized into [`Config`] through
//! `serde_path_to_error`, so every error names the field it is about
//! (`services[1].backends[0].address: invalid IP address "10.0.0"`). Deserializing from the
//! value rather than straight from the text keeps the message free of a trailing
//! "at line … column …" that `serde_yaml_ng` would append; the field path is the more
//! useful pointer. [`Config::parse`] then checks everything the types cannot express and
//! reports the first problem, again with its field path.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, de};

use crate::maglev;

/// The whole standalone configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Network interface the XDP program attaches to.
    pub interface: String,
    /// How to attach the XDP program.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// bpffs directory for pinned maps and programs.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Address the Prometheus metrics endpoint listens on.
    #[serde(
        default = "default_metrics_address",
        deserialize_with = "de_socket_addr"
    )]
    pub metrics_address: SocketAddr,
    /// Backend role: which balancers may send encapsulated traffic to this node.
    #[serde(default)]
    pub decap: Decap,
    /// Slots in each service's Maglev table; must be prime.
    #[serde(default = "default_maglev_table_size")]
    pub maglev_table_size: u32,
    /// Capacity of the service maps.
    #[serde(default = "default_max_services")]
    pub max_services: u32,
    /// Capacity of the backend map, summed over all services.
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    /// Entries of the connection table (rounded up to a power of two; buckets of four).
    #[serde(default = "default_conntrack_size")]
    pub conntrack_size: u32,
    /// The balanced services.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Settings of `l3lb run --kubernetes` (ignored by the standalone agent).
    #[serde(default)]
    pub kubernetes: KubernetesSettings,
}

/// Settings of the Kubernetes mode; the node name comes from `--node-name` / `NODE_NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    /// `spec.loadBalancerClass` of the Services l3lb handles.
    #[serde(default = "default_load_balancer_class")]
    pub load_balancer_class: String,
    /// Also handle `type: LoadBalancer` Services with no class (l3lb is the only
    /// load-balancer implementation in the cluster).
    #[serde(default)]
    pub take_unclassed: bool,
    /// Labels of the nodes that act as balancers (their addresses form the decap allow
    /// list); empty: every node.
    #[serde(default)]
    pub balancer_node_labels: std::collections::BTreeMap<String, String>,
    /// Quiet time after an API change before the batch is applied, in milliseconds.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Probes of the target nodes' `healthCheckNodePort` for `externalTrafficPolicy: Local`
    /// Services.
    #[serde(default)]
    pub node_health_check: NodeHealthCheck,
}

/// How the Kubernetes agent probes a `Local` Service's nodes: `GET /healthz` on the
/// Service's `healthCheckNodePort` at each node's address, as cloud load balancers do. The
/// node's service proxy answers 200 while the node has ready endpoints for the Service and
/// 503 when it has none, so a node whose proxy, kubelet or network broke before the
/// EndpointSlices say so stops getting new connections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeHealthCheck {
    /// `false` turns the probes off (a service proxy that does not serve
    /// `healthCheckNodePort`): the EndpointSlices alone then decide.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Time between probes of one node for one Service.
    #[serde(
        default = "default_node_check_interval",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub interval: Duration,
    /// How long one probe may take before it counts as failed.
    #[serde(
        default = "default_node_check_timeout",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub timeout: Duration,
    /// Consecutive successes that bring a failed node back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a node out of new-connection selection.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

impl Default for NodeHealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_node_check_interval(),
            timeout: default_node_check_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

impl NodeHealthCheck {
    /// The check of one Service's nodes: `GET /healthz` on its `healthCheckNodePort`.
    pub fn http_check(&self, port: u16) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Http,
            port: Some(port),
            path: "/healthz".to_string(),
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
        }
    }
}

fn default_true() -> bool {
    true
}

// Slower than the standalone default (2 s): every node probes every target node of every
// `Local` Service, so the probe count grows with the square of the cluster. 5 s with fall 3
// still takes a dead node out within 17 s, about when its Node turns NotReady.
fn default_node_check_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_node_check_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        Self {
            load_balancer_class: default_load_balancer_class(),
            take_unclassed: false,
            balancer_node_labels: Default::default(),
            debounce_ms: default_debounce_ms(),
            node_health_check: NodeHealthCheck::default(),
        }
    }
}

fn default_load_balancer_class() -> String {
    "l3lb.io/xdp".to_string()
}

fn default_debounce_ms() -> u64 {
    200
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode if the driver supports it, else generic with a warning.
    #[default]
    Auto,
    /// Driver mode only; fail if unsupported.
    Native,
    /// Generic (skb) mode; slower, works everywhere.
    Generic,
}

/// Decapsulation settings for the backend role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Decap {
    /// Sources allowed to send IPIP / IPv6-in-IPv6 packets here; empty: decapsulate nothing.
    #[serde(default, deserialize_with = "de_nets")]
    pub allow: Vec<IpNet>,
}

/// One load-balanced service: a VIP, its ports and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// The virtual IP clients connect to.
    #[serde(deserialize_with = "de_addr")]
    pub vip: IpAddr,
    /// Balanced ports; empty means every port (a pure L3 VIP).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// How packets reach the backends.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Client networks allowed to use the service; empty means everyone.
    #[serde(default, deserialize_with = "de_nets")]
    pub source_ranges: Vec<IpNet>,
    /// The backends, in the VIP's address family.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Session affinity: `client_ip` sends every connection of a client to one backend.
    #[serde(default)]
    pub affinity: Affinity,
    /// Active health checks of the backends; without one every backend counts as up.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// How the agent checks a service's backends: from the balancer to each backend's
/// address and `port`, the path real traffic takes to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` (a connection is accepted) or `http` (a GET of `path` answers 2xx or 3xx).
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to check; default: the service's first port (required for all-ports VIPs).
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP path (`http` only).
    #[serde(default = "default_check_path")]
    pub path: String,
    /// Time between checks of one backend, e.g. `2s` or `500ms`.
    #[serde(
        default = "default_check_interval",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    #[serde(
        default = "default_check_timeout",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub timeout: Duration,
    /// Consecutive successes that bring a failed backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a backend out of new-connection selection.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

/// Kind of health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP/1.1 GET answers with a 2xx or 3xx status.
    Http,
}

impl Service {
    /// The port health checks go to (explicit, else the first service port).
    pub fn health_port(&self) -> Option<u16> {
        self.health_check
            .as_ref()
            .and_then(|h| h.port.or_else(|| self.ports.first().copied()))
    }
}

/// Session affinity of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// Each connection is balanced on its own 5-tuple.
    #[default]
    None,
    /// Balanced on the client address alone: all of a client's connections share a backend.
    ClientIp,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    #[default]
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number (6 for TCP, 17 for UDP).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How the balancer delivers packets to a backend (always direct server return).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Encapsulate in IPIP / IPv6-in-IPv6 to the backend's address; works across L3.
    #[default]
    Ipip,
    /// Rewrite the destination MAC; the backend must be on the same L2 segment.
    L2,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend's address.
    #[serde(deserialize_with = "de_addr")]
    pub address: IpAddr,
    /// Relative share of new flows (0 to 65535); 0 takes no new flows.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Drain: keep this backend's established connections, give it no new ones (as
    /// weight 0, keeping the weight for when the drain ends).
    #[serde(default)]
    pub drain: bool,
}

impl BackendConfig {
    /// The weight new connections see: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        if self.drain { 0 } else { self.weight }
    }
}

/// A configuration problem: the field it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{}{message}", path_prefix(.path))]
pub struct ConfigError {
    /// Field path such as `services[1].backends[0].address`; empty for the whole file.
    pub path: String,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;
/// Smallest accepted Maglev table size.
const MIN_MAGLEV_TABLE_SIZE: u32 = 7;
/// Largest accepted Maglev table size.
const MAX_MAGLEV_TABLE_SIZE: u32 = 1_000_003;
/// Smallest accepted connection-tracking table.
const MIN_CONNTRACK_SIZE: u32 = 1024;
/// Largest backend weight.
const MAX_WEIGHT: u32 = 65535;

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/l3lb")
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9477))
}

fn default_maglev_table_size() -> u32 {
    16381
}

fn default_max_services() -> u32 {
    256
}

fn default_max_backends() -> u32 {
    4096
}

fn default_conntrack_size() -> u32 {
    262_144
}

fn default_check_path() -> String {
    "/".to_string()
}

fn default_check_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

fn default_weight() -> u32 {
    1
}

impl Config {
    /// Parses and validates a YAML configuration.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // Step 1: YAML syntax. These errors carry their line and column.
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| error("", e.to_string()))?;
        if value.is_null() {
            return Err(error(
                "",
                "the configuration is empty; it needs at least `interface`",
            ));
        }
        // Step 2: shape and types, with the path of the offending field.
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // serde_path_to_error prints the root as ".".
            let path = if path == "." { String::new() } else { path };
            error(path, e.into_inner().to_string())
        })?;
        // Step 3: everything the types cannot express.
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| error("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Checks the rules the types cannot express; returns the first violation.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.interface.is_empty() {
            return Err(error("interface", "must not be empty"));
        }
        if self.interface.len() > MAX_INTERFACE_NAME {
            return Err(error(
                "interface",
                format!(
                    "interface name {:?} is longer than {MAX_INTERFACE_NAME} bytes",
                    self.interface
                ),
            ));
        }
        // The kernel's own rule for device names (dev_valid_name).
        if self.interface == "."
            || self.interface == ".."
            || self
                .interface
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(error(
                "interface",
                format!(
                    "{:?} is not a valid interface name (no '/', ':', spaces or control \
                     characters, not . or ..)",
                    self.interface
                ),
            ));
        }
        if !self.pin_path.is_absolute() {
            return Err(error(
                "pin_path",
                format!(
                    "{:?} is not an absolute path (for example /sys/fs/bpf/l3lb)",
                    self.pin_path.display().to_string()
                ),
            ));
        }
        let size = self.maglev_table_size;
        if !(MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE).contains(&size) {
            return Err(error(
                "maglev_table_size",
                format!(
                    "{size} is out of range; use a prime from {MIN_MAGLEV_TABLE_SIZE} to {MAX_MAGLEV_TABLE_SIZE}"
                ),
            ));
        }
        if !maglev::is_prime(size) {
            return Err(error(
                "maglev_table_size",
                format!("{size} is not a prime number; try {}", nearby_prime(size)),
            ));
        }
        if self.conntrack_size < MIN_CONNTRACK_SIZE {
            return Err(error(
                "conntrack_size",
                format!(
                    "{} is below the minimum of {MIN_CONNTRACK_SIZE}",
                    self.conntrack_size
                ),
            ));
        }
        if self.max_services == 0 {
            return Err(error("max_services", "must be at least 1"));
        }
        if self.max_backends == 0 {
            return Err(error("max_backends", "must be at least 1"));
        }
        if self.services.len() > self.max_services as usize {
            return Err(error(
                "services",
                format!(
                    "{} services exceed max_services ({}); raise max_services",
                    self.services.len(),
                    self.max_services
                ),
            ));
        }
        let total_backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if total_backends > self.max_backends as usize {
            return Err(error(
                "services",
                format!(
                    "{total_backends} backends in total exceed max_backends ({}); raise max_backends",
                    self.max_backends
                ),
            ));
        }
        for (j, range) in self.decap.allow.iter().enumerate() {
            network_only(range, &format!("decap.allow[{j}]"))?;
        }
        let total_ranges: usize = self.services.iter().map(|s| s.source_ranges.len()).sum();
        if total_ranges > MAX_SOURCE_RANGES {
            return Err(error(
                "services",
                format!("{total_ranges} source ranges in total; at most {MAX_SOURCE_RANGES}"),
            ));
        }

        let mut names: HashSet<&str> = HashSet::new();
        // (VIP, protocol, port) -> service name; port 0 stands for "all ports".
        let mut claims: HashMap<(IpAddr, Protocol, u16), &str> = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if service.name.is_empty() {
                return Err(error(at("name"), "must not be empty"));
            }
            if !names.insert(&service.name) {
                return Err(error(
                    at("name"),
                    format!("duplicate service name {:?}", service.name),
                ));
            }
            if let Some(why) = not_unicast(service.vip) {
                return Err(error(
                    at("vip"),
                    format!("{} is {why}: a VIP is one unicast address", service.vip),
                ));
            }
            service.validate_ports(i, &mut claims)?;
            service.validate_source_ranges(i)?;
            service.validate_backends(i, size)?;
            service.validate_health_check(i)?;
        }
        // Every port of every service and every VIP address must fit the VIP index the
        // program is sized for (`max_services`), or the config is refused when applied.
        let entries = self.services.iter().flat_map(|s| {
            let proto = s.protocol.number();
            let ports = if s.ports.is_empty() {
                vec![0]
            } else {
                s.ports.clone()
            };
            ports.into_iter().map(move |p| (s.vip, p, proto))
        });
        if let Err(e) = crate::dataplane::vip_index_fits(entries, self.max_services) {
            let ports: usize = self.services.iter().map(|s| s.ports.len().max(1)).sum();
            let addresses = self.services.iter().map(|s| s.vip).collect::<HashSet<_>>();
            return Err(error(
                "services",
                format!(
                    "{ports} VIP entries (ports) on {} VIP addresses do not fit max_services \
                     ({}): {e}",
                    addresses.len(),
                    self.max_services
                ),
            ));
        }
        let n = &self.kubernetes.node_health_check;
        validate_timing(
            &|field| format!("kubernetes.node_health_check.{field}"),
            n.interval,
            n.timeout,
            n.rise,
            n.fall,
        )?;
        Ok(())
    }
}

/// Timing shared by backend and node health checks: `at(field)` names the field in errors.
fn validate_timing(
    at: &dyn Fn(&str) -> String,
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
) -> Result<(), ConfigError> {
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        return Err(error(
            at("interval"),
            format!("{interval:?} is outside 100ms to 1h"),
        ));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(error(
            at("timeout"),
            format!("{timeout:?} must be above 0 and at most the interval ({interval:?})"),
        ));
    }
    for (field, v) in [("rise", rise), ("fall", fall)] {
        if !(1..=100).contains(&v) {
            return Err(error(at(field), format!("{v} is outside 1 to 100")));
        }
    }
    Ok(())
}

/// Source ranges all services together may list (the size of each family's trie).
pub const MAX_SOURCE_RANGES: usize = 16384;

/// Source ranges one service may list (the data plane's tries hold 16384 in all).
pub const MAX_SOURCE_RANGES_PER_SERVICE: usize = 1024;

impl Service {
    /// Ports: non-zero, not repeated, and not claimed by an earlier service on the same VIP.
    fn validate_ports<'a>(
        &'a self,
        i: usize,
        claims: &mut HashMap<(IpAddr, Protocol, u16), &'a str>,
    ) -> Result<(), ConfigError> {
        if self.ports.is_empty() {
            if let Some(other) = claims.insert((self.vip, self.protocol, 0), &self.name) {
                return Err(error(
                    format!("services[{i}].ports"),
                    format!(
                        "all {} ports of {} are already claimed by service {other:?}",
                        self.protocol, self.vip
                    ),
                ));
            }
            return Ok(());
        }
        let mut seen = HashSet::new();
        for (j, &port) in self.ports.iter().enumerate() {
            let path = format!("services[{i}].ports[{j}]");
            if port == 0 {
                return Err(error(
                    path,
                    "port 0 is not allowed; omit `ports` for an all-ports VIP",
                ));
            }
            if !seen.insert(port) {
                return Err(error(path, format!("port {port} is listed twice")));
            }
            if let Some(other) = claims.insert((self.vip, self.protocol, port), &self.name) {
                return Err(error(
                    path,
                    format!(
                        "{}:{port}/{} is already claimed by service {other:?}",
                        self.vip, self.protocol
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Health check: a port to go to, sane timing, a plain HTTP path.
    fn validate_health_check(&self, i: usize) -> Result<(), ConfigError> {
        let Some(h) = &self.health_check else {
            return Ok(());
        };
        let at = |field: &str| format!("services[{i}].health_check.{field}");
        match h.port {
            Some(0) => return Err(error(at("port"), "port 0 is not allowed")),
            None if self.ports.is_empty() => {
                return Err(error(
                    at("port"),
                    "required for an all-ports VIP (there is no service port to default to)",
                ));
            }
            _ => {}
        }
        validate_timing(&at, h.interval, h.timeout, h.rise, h.fall)?;
        if !h.path.starts_with('/') || h.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(error(
                at("path"),
                format!(
                    "{:?} must start with / and contain no spaces or control characters",
                    h.path
                ),
            ));
        }
        Ok(())
    }

    /// Source ranges must be in the VIP's family.
    fn validate_source_ranges(&self, i: usize) -> Result<(), ConfigError> {
        if self.source_ranges.len() > MAX_SOURCE_RANGES_PER_SERVICE {
            return Err(error(
                format!("services[{i}].source_ranges"),
                format!(
                    "{} ranges; at most {MAX_SOURCE_RANGES_PER_SERVICE} per service",
                    self.source_ranges.len()
                ),
            ));
        }
        for (j, range) in self.source_ranges.iter().enumerate() {
            let at = format!("services[{i}].source_ranges[{j}]");
            network_only(range, &at)?;
            if let Some(k) = self.source_ranges[..j].iter().position(|r| r == range) {
                return Err(error(
                    at,
                    format!("{range} is listed twice (also source_ranges[{k}])"),
                ));
            }
            if range.addr().is_ipv4() != self.vip.is_ipv4() {
                return Err(error(
                    at,
                    format!(
                        "{} source range {range} for {} VIP {}",
                        family(range.addr()),
                        family(self.vip),
                        self.vip
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Backends: the VIP's family, unique, weights in range, at least one taking traffic,
    /// and no more of them than Maglev table slots.
    fn validate_backends(&self, i: usize, table_size: u32) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (j, backend) in self.backends.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].backends[{j}].{field}");
            let address = backend.address;
            if address.is_ipv4() != self.vip.is_ipv4() {
                return Err(error(
                    at("address"),
                    format!(
                        "{} backend {address} for {} VIP {}",
                        family(address),
                        family(self.vip),
                        self.vip
                    ),
                ));
            }
            if !seen.insert(address) {
                return Err(error(at("address"), format!("duplicate backend {address}")));
            }
            if let Some(why) = not_unicast(address) {
                return Err(error(
                    at("address"),
                    format!("{address} is {why}: a backend is one unicast address"),
                ));
            }
            if address == self.vip {
                return Err(error(
                    at("address"),
                    format!(
                        "{address} is the VIP itself: its packets would come back here; name \
                         the backend's own address"
                    ),
                ));
            }
            if backend.weight > MAX_WEIGHT {
                return Err(error(
                    at("weight"),
                    format!(
                        "weight {} is above the maximum of {MAX_WEIGHT}",
                        backend.weight
                    ),
                ));
            }
        }
        if !self.backends.is_empty()
            && self.backends.iter().all(|b| b.weight == 0)
            && !self.backends.iter().any(|b| b.drain)
        {
            return Err(error(
                format!("services[{i}].backends"),
                "every backend has weight 0; give at least one a weight above 0",
            ));
        }
        if self.backends.len() > table_size as usize {
            return Err(error(
                format!("services[{i}].backends"),
                format!(
                    "{} backends do not fit in a Maglev table of {table_size} slots; raise maglev_table_size",
                    self.backends.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Rejects a network written with host bits (`10.1.2.3/8`): it stands for `10.0.0.0/8`,
/// and whether that or the one address (`/32`) was meant cannot be told; allowing a whole
/// network by a typo is not a guess to make silently.
fn network_only(range: &IpNet, at: &str) -> Result<(), ConfigError> {
    if range.trunc() == *range {
        return Ok(());
    }
    let host = match range {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    };
    Err(error(
        at,
        format!(
            "{range} has host bits set: write {} for the network, or {}/{host} for the one address",
            range.trunc(),
            range.addr()
        ),
    ))
}

/// Why `address` cannot be one host's address (unspecified, broadcast or multicast), if so.
fn not_unicast(address: IpAddr) -> Option<&'static str> {
    match address {
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        _ => None,
    }
}

fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The smallest prime above `n`, as a suggestion in error messages.
fn nearby_prime(n: u32) -> u32 {
    (n.saturating_add(1)..=u32::MAX)
        .find(|&candidate| maglev::is_prime(candidate))
        .unwrap_or(MAX_MAGLEV_TABLE_SIZE)
}

// Addresses, networks and socket addresses go through our own visitors so errors quote
// the offending text (`invalid IP address "10.0.0"`) instead of serde's generic wording.
// Numbers are accepted by the visitors only to report them the same way: YAML reads
// `address: 10` as an integer.

/// Parses a scalar's text with `parse`, or reports it with `describe`.
struct TextVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> de::Visitor<'_> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid IP address {text:?}"))
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    text.parse()
        .map_err(|_| format!("invalid network {text:?} (expected ADDRESS/PREFIX)"))
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid socket address {text:?} (expected ADDRESS:PORT)"))
}

fn de_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    deserializer.deserialize_any(TextVisitor {
        expecting: "an IP address",
        parse: parse_addr,
    })
}

/// Parses `500ms`, `2s`, `1.5s` or `1m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?} (expected e.g. 500ms, 2s or 1m)");
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(TextVisitor {
        expecting: "a duration such as 500ms or 2s",
        parse: parse_duration,
    })
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn de_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    deserializer.deserialize_any(TextVisitor {
        expecting: "a socket address (ADDRESS:PORT)",
        parse: parse_socket_addr,
    })
}

/// One network in a list; a newtype so the list's element index lands in the error path.
struct Net(IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(TextVisitor {
                expecting: "a network (ADDRESS/PREFIX)",
                parse: parse_net,
            })
            .map(Net)
    }
}

fn de_nets<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let nets = Vec::<Net>::deserialize(deserializer)?;
    Ok(nets.into_iter().map(|Net(net)| net).collect())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The example from DESIGN.md's user contract, verbatim.
    const EXAMPLE: &str = r#"
# l3lb.yaml — standalone example
interface: eth0                # NIC to attach to
xdp_mode: auto                 # auto (native, else generic with a warning) | native | generic
pin_path: /sys/fs/bpf/l3lb     # default
metrics_address: 127.0.0.1:9477
decap:                         # backend role: accept encapsulated traffic from these sources
  allow: [10.0.0.0/24]
services:
  - name: web
    vip: 192.0.2.10
    ports: [80, 443]           # omit for an all-ports (L3) VIP
    protocol: tcp              # tcp | udp
    forwarding: ipip           # ipip | l2
    source_ranges: []          # empty: everyone
    backends:
      - address: 10.0.0.11
        weight: 1
      - address: 10.0.0.12
"#;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn net(text: &str) -> IpNet {
        text.parse().expect("test network")
    }

    /// Parses `text` expecting an error; returns it as displayed.
    fn fails(text: &str) -> String {
        match Config::parse(text) {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A valid base config followed by `services`, for validation tests.
    fn with_services(services: &str) -> String {
        format!("interface: eth0\nservices:\n{services}")
    }

    #[test]
    fn design_example_parses() {
        let config = Config::parse(EXAMPLE).expect("the documented example is valid");
        let expected = Config {
            interface: "eth0".to_owned(),
            xdp_mode: XdpMode::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/l3lb"),
            metrics_address: "127.0.0.1:9477".parse().expect("address"),
            decap: Decap {
                allow: vec![net("10.0.0.0/24")],
            },
            maglev_table_size: 16381,
            max_services: 256,
            max_backends: 4096,
            conntrack_size: 262_144,
            services: vec![Service {
                name: "web".to_owned(),
                vip: v4(192, 0, 2, 10),
                ports: vec![80, 443],
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Ipip,
                source_ranges: vec![],
                backends: vec![
                    BackendConfig {
                        address: v4(10, 0, 0, 11),
                        weight: 1,
                        drain: false,
                    },
                    BackendConfig {
                        address: v4(10, 0, 0, 12),
                        weight: 1,
                        drain: false,
                    },
                ],
                affinity: Affinity::None,
                health_check: None,
            }],
            kubernetes: KubernetesSettings::default(),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn defaults_fill_everything_but_interface() {
        let config = Config::parse("interface: eth1\n").expect("minimal config");
        assert_eq!(config.interface, "eth1");
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert_eq!(config.pin_path, Path::new("/sys/fs/bpf/l3lb"));
        assert_eq!(
            config.metrics_address,
            "127.0.0.1:9477".parse().expect("addr")
        );
        assert_eq!(config.decap, Decap::default());
        assert_eq!(config.maglev_table_size, 16381);
        assert_eq!(config.max_services, 256);
        assert_eq!(config.max_backends, 4096);
        assert_eq!(config.conntrack_size, 262_144);
        assert!(config.services.is_empty());

        let config = Config::parse(&with_services(
            "  - name: dns\n    vip: 192.0.2.53\n    backends:\n      - address: 10.0.0.1\n",
        ))
        .expect("service with defaults");
        let service = &config.services[0];
        assert!(service.ports.is_empty());
        assert_eq!(service.protocol, Protocol::Tcp);
        assert_eq!(service.forwarding, Forwarding::Ipip);
        assert!(service.source_ranges.is_empty());
        assert_eq!(service.backends[0].weight, 1);
    }

    #[test]
    fn enums_and_networks_parse() {
        let config = Config::parse(
            "interface: eth0\n\
             xdp_mode: generic\n\
             decap:\n  allow: [10.0.0.0/8, '2001:db8::/32']\n\
             services:\n\
             \x20 - name: dns\n\
             \x20   vip: 192.0.2.53\n\
             \x20   ports: [53]\n\
             \x20   protocol: udp\n\
             \x20   forwarding: l2\n\
             \x20   source_ranges: [198.51.100.0/24]\n",
        )
        .expect("valid config");
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(
            config.decap.allow,
            [net("10.0.0.0/8"), net("2001:db8::/32")]
        );
        let service = &config.services[0];
        assert_eq!(service.protocol, Protocol::Udp);
        assert_eq!(service.protocol.number(), 17);
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(service.forwarding, Forwarding::L2);
        assert_eq!(service.source_ranges, [net("198.51.100.0/24")]);
        assert_eq!(service.affinity, Affinity::None);
        assert_eq!(
            Config::parse("interface: eth0\nxdp_mode: native\n")
                .expect("native")
                .xdp_mode,
            XdpMode::Native
        );
    }

    #[test]
    fn serializing_round_trips() {
        let config = Config::parse(EXAMPLE).expect("valid");
        let text = serde_yaml_ng::to_string(&config).expect("serializable");
        assert_eq!(Config::parse(&text), Ok(config));
    }

    #[test]
    fn bad_backend_address_names_the_field() {
        let text = with_services(
            "  - name: web\n    vip: 192.0.2.10\n    backends:\n      - address: 10.0.0.11\n\
             \x20 - name: api\n    vip: 192.0.2.11\n    backends:\n      - address: 10.0.0\n",
        );
        assert_eq!(
            fails(&text),
            r#"services[1].backends[0].address: invalid IP address "10.0.0""#
        );
        let error = Config::parse(&text).expect_err("invalid");
        assert_eq!(error.path, "services[1].backends[0].address");
        assert_eq!(error.message, r#"invalid IP address "10.0.0""#);
    }

    #[test]
    fn numeric_address_is_quoted_too() {
        assert_eq!(
            fails(&with_services("  - name: web\n    vip: 10\n")),
            r#"services[0].vip: invalid IP address "10""#
        );
    }

    #[test]
    fn bad_networks_name_the_entry() {
        assert_eq!(
            fails("interface: eth0\ndecap:\n  allow: [10.0.0.0/24, 10.0.0.1]\n"),
            r#"decap.allow[1]: invalid network "10.0.0.1" (expected ADDRESS/PREFIX)"#
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    source_ranges: [10.0.0.0/33]\n"
            )),
            r#"services[0].source_ranges[0]: invalid network "10.0.0.0/33" (expected ADDRESS/PREFIX)"#
        );
    }

    #[test]
    fn bad_metrics_address_is_explained() {
        assert_eq!(
            fails("interface: eth0\nmetrics_address: localhost\n"),
            r#"metrics_address: invalid socket address "localhost" (expected ADDRESS:PORT)"#
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let message = fails(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    backend:\n      - address: 10.0.0.1\n",
        ));
        println!("{message}");
        assert!(
            message.starts_with("services[0].backend: unknown field `backend`"),
            "{message}"
        );
        assert!(
            message.contains("backends"),
            "suggests the real ones: {message}"
        );

        let message = fails("interface: eth0\nxdp_mod: native\n");
        assert!(message.contains("unknown field `xdp_mod`"), "{message}");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let message = fails(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    protocol: sctp\n",
        ));
        assert!(message.starts_with("services[0].protocol: "), "{message}");
        assert!(message.contains("sctp"), "{message}");
    }

    #[test]
    fn missing_interface_is_reported() {
        assert_eq!(fails("xdp_mode: auto\n"), "missing field `interface`");
        assert_eq!(
            fails(""),
            "the configuration is empty; it needs at least `interface`"
        );
    }

    #[test]
    fn yaml_syntax_error_mentions_the_line() {
        let message = fails("interface: eth0\nservices:\n  - name: [web\n    vip: 1.2.3.4\n");
        println!("{message}");
        assert!(message.contains("line "), "{message}");
        assert!(message.contains("column "), "{message}");
    }

    #[test]
    fn port_out_of_range_is_named() {
        let message = fails(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    ports: [80, 70000]\n",
        ));
        assert!(message.starts_with("services[0].ports[1]: "), "{message}");
    }

    #[test]
    fn interface_is_checked() {
        assert_eq!(fails("interface: ''\n"), "interface: must not be empty");
        assert_eq!(
            fails("interface: a-very-long-ifname\n"),
            r#"interface: interface name "a-very-long-ifname" is longer than 15 bytes"#
        );
        assert!(Config::parse("interface: exactly15chars_\n").is_ok());
    }

    #[test]
    fn top_level_limits_are_checked() {
        assert_eq!(
            fails("interface: eth0\npin_path: bpf/l3lb\n"),
            r#"pin_path: "bpf/l3lb" is not an absolute path (for example /sys/fs/bpf/l3lb)"#
        );
        assert_eq!(
            fails("interface: eth0\nmaglev_table_size: 16380\n"),
            "maglev_table_size: 16380 is not a prime number; try 16381"
        );
        assert_eq!(
            fails("interface: eth0\nmaglev_table_size: 5\n"),
            "maglev_table_size: 5 is out of range; use a prime from 7 to 1000003"
        );
        assert_eq!(
            fails("interface: eth0\nmaglev_table_size: 1000033\n"),
            "maglev_table_size: 1000033 is out of range; use a prime from 7 to 1000003"
        );
        assert!(Config::parse("interface: eth0\nmaglev_table_size: 7\n").is_ok());
        assert!(Config::parse("interface: eth0\nmaglev_table_size: 1000003\n").is_ok());
        assert_eq!(
            fails("interface: eth0\nconntrack_size: 1000\n"),
            "conntrack_size: 1000 is below the minimum of 1024"
        );
        assert_eq!(
            fails("interface: eth0\nmax_services: 0\n"),
            "max_services: must be at least 1"
        );
    }

    #[test]
    fn capacities_are_checked() {
        let two = "  - name: a\n    vip: 192.0.2.1\n    backends:\n      - address: 10.0.0.1\n      - address: 10.0.0.2\n\
                   \x20 - name: b\n    vip: 192.0.2.2\n    backends:\n      - address: 10.0.0.1\n";
        assert_eq!(
            fails(&format!("max_services: 1\n{}", with_services(two))),
            "services: 2 services exceed max_services (1); raise max_services"
        );
        assert_eq!(
            fails(&format!("max_backends: 2\n{}", with_services(two))),
            "services: 3 backends in total exceed max_backends (2); raise max_backends"
        );
        let eight: String = (1..=8)
            .map(|i| format!("      - address: 10.0.0.{i}\n"))
            .collect();
        assert_eq!(
            fails(&format!(
                "maglev_table_size: 7\n{}",
                with_services(&format!(
                    "  - name: a\n    vip: 192.0.2.1\n    backends:\n{eight}"
                ))
            )),
            "services[0].backends: 8 backends do not fit in a Maglev table of 7 slots; raise maglev_table_size"
        );
    }

    #[test]
    fn service_names_are_checked() {
        assert_eq!(
            fails(&with_services("  - name: ''\n    vip: 192.0.2.10\n")),
            "services[0].name: must not be empty"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n\
                 \x20 - name: api\n    vip: 192.0.2.11\n\
                 \x20 - name: web\n    vip: 192.0.2.12\n"
            )),
            r#"services[2].name: duplicate service name "web""#
        );
    }

    #[test]
    fn ports_are_checked() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    ports: [80, 0]\n"
            )),
            "services[0].ports[1]: port 0 is not allowed; omit `ports` for an all-ports VIP"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    ports: [80, 443, 80]\n"
            )),
            "services[0].ports[2]: port 80 is listed twice"
        );
    }

    #[test]
    fn vip_claims_do_not_overlap() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    ports: [80, 443]\n\
                 \x20 - name: web2\n    vip: 192.0.2.10\n    ports: [8080, 443]\n"
            )),
            r#"services[1].ports[1]: 192.0.2.10:443/tcp is already claimed by service "web""#
        );
        assert_eq!(
            fails(&with_services(
                "  - name: l3\n    vip: 192.0.2.10\n\
                 \x20 - name: l3b\n    vip: 192.0.2.10\n"
            )),
            r#"services[1].ports: all tcp ports of 192.0.2.10 are already claimed by service "l3""#
        );
        // Same VIP and port with another protocol, or an all-ports entry next to specific
        // ports (specific ports win in the data plane), are fine.
        Config::parse(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    ports: [443]\n\
             \x20 - name: quic\n    vip: 192.0.2.10\n    ports: [443]\n    protocol: udp\n\
             \x20 - name: rest\n    vip: 192.0.2.10\n\
             \x20 - name: rest-udp\n    vip: 192.0.2.10\n    protocol: udp\n",
        ))
        .expect("no overlap");
    }

    #[test]
    fn services_whose_ports_overflow_the_vip_index_are_refused_by_the_check() {
        // 20 services of 8 ports each: 160 entries and 20 markers, where max_services 16
        // sizes the index for 128.
        let services = |n: usize| -> String {
            (0..n)
                .map(|i| {
                    format!(
                        "  - name: s{i}\n    vip: 10.1.{i}.1\n    \
                         ports: [80, 81, 82, 83, 84, 85, 86, 87]\n    \
                         backends: [{{address: 10.2.0.1}}]\n"
                    )
                })
                .collect()
        };
        let text = |n: usize| {
            format!(
                "interface: eth0\nmax_services: 16\nservices:\n{}",
                services(n)
            )
        };
        let err = fails(&text(16));
        assert!(
            err.starts_with(
                "services: 128 VIP entries (ports) on 16 VIP addresses do not fit max_services (16): \
                 VIP index slot table is full"
            ),
            "{err}"
        );
        Config::parse(&text(8)).expect("64 entries and 8 markers fit");
    }

    #[test]
    fn addresses_that_are_no_one_hosts_and_bad_interface_names_are_refused() {
        for (vip, backend, message) in [
            (
                "0.0.0.0",
                "10.0.0.1",
                "services[0].vip: 0.0.0.0 is the unspecified address",
            ),
            (
                "239.1.1.1",
                "10.0.0.1",
                "services[0].vip: 239.1.1.1 is a multicast address",
            ),
            (
                "192.0.2.10",
                "255.255.255.255",
                "services[0].backends[0].address: 255.255.255.255 is the broadcast address",
            ),
            (
                "2001:db8::10",
                "'::'",
                "services[0].backends[0].address: :: is the unspecified address",
            ),
            (
                "192.0.2.10",
                "192.0.2.10",
                "services[0].backends[0].address: 192.0.2.10 is the VIP itself",
            ),
        ] {
            let err = fails(&with_services(&format!(
                "  - name: web\n    vip: {vip}\n    backends: [{{address: {backend}}}]\n"
            )));
            assert!(err.starts_with(message), "{vip} {backend}: {err}");
        }
        for name in ["eth 0", "a/b", "..", "eth0:1"] {
            let err = fails(&format!("interface: '{name}'\n"));
            assert!(
                err.starts_with(&format!(
                    "interface: {name:?} is not a valid interface name"
                )),
                "{err}"
            );
        }
        assert!(
            fails("interface: éééééééé\n").ends_with("is longer than 15 bytes"),
            "16 bytes in 8 characters"
        );
    }

    #[test]
    fn networks_with_host_bits_or_listed_twice_are_refused() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    source_ranges: [10.1.2.3/8]\n"
            )),
            "services[0].source_ranges[0]: 10.1.2.3/8 has host bits set: write 10.0.0.0/8 \
             for the network, or 10.1.2.3/32 for the one address"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 2001:db8::10\n    \
                 source_ranges: ['2001:db8:1::/48', '2001:db8:1::/48']\n    \
                 backends: [{address: '2001:db8::1'}]\n"
            )),
            "services[0].source_ranges[1]: 2001:db8:1::/48 is listed twice (also source_ranges[0])"
        );
        assert_eq!(
            fails("interface: eth0\ndecap:\n  allow: [10.0.0.0/24, '2001:db8::1/64']\n"),
            "decap.allow[1]: 2001:db8::1/64 has host bits set: write 2001:db8::/64 for the \
             network, or 2001:db8::1/128 for the one address"
        );
    }

    #[test]
    fn families_must_match_the_vip() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    backends:\n\
                 \x20     - address: 10.0.0.1\n      - address: 2001:db8::1\n"
            )),
            "services[0].backends[1].address: IPv6 backend 2001:db8::1 for IPv4 VIP 192.0.2.10"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    source_ranges: ['2001:db8::/32']\n"
            )),
            "services[0].source_ranges[0]: IPv6 source range 2001:db8::/32 for IPv4 VIP 192.0.2.10"
        );
    }

    #[test]
    fn ipv6_services_are_accepted() {
        let config = Config::parse(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n\
             \x20 - name: web6\n    vip: 2001:db8::10\n    source_ranges: ['2001:db8:1::/48']\n    backends:\n      - address: 2001:db8::1\n",
        ))
        .expect("IPv6 service");
        assert_eq!(
            config.services[1].vip,
            "2001:db8::10".parse::<IpAddr>().expect("addr")
        );
    }

    #[test]
    fn backends_are_checked() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    backends:\n\
                 \x20     - address: 10.0.0.1\n      - address: 10.0.0.2\n      - address: 10.0.0.1\n"
            )),
            "services[0].backends[2].address: duplicate backend 10.0.0.1"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    backends:\n\
                 \x20     - address: 10.0.0.1\n        weight: 65536\n"
            )),
            "services[0].backends[0].weight: weight 65536 is above the maximum of 65535"
        );
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    backends:\n\
                 \x20     - address: 10.0.0.1\n        weight: 0\n      - address: 10.0.0.2\n        weight: 0\n"
            )),
            "services[0].backends: every backend has weight 0; give at least one a weight above 0"
        );
        // Draining one backend while another takes traffic is fine; so is no backend yet.
        Config::parse(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    backends:\n\
             \x20     - address: 10.0.0.1\n        weight: 0\n      - address: 10.0.0.2\n        weight: 65535\n\
             \x20 - name: empty\n    vip: 192.0.2.11\n",
        ))
        .expect("valid");
    }

    #[test]
    fn drain_keeps_the_weight_and_may_empty_a_service_on_purpose() {
        let config = Config::parse(&with_services(
            "  - name: web\n    vip: 192.0.2.10\n    ports: [80]\n    backends:\n\
             \x20     - address: 10.0.0.1\n        weight: 5\n        drain: true\n",
        ))
        .expect("draining the only backend is a choice, not a mistake");
        let b = &config.services[0].backends[0];
        assert_eq!((b.weight, b.effective_weight()), (5, 0));
    }

    #[test]
    fn health_checks_are_validated_with_their_field_paths() {
        let svc = |check: &str, ports: &str| {
            with_services(&format!(
                "  - name: web\n    vip: 192.0.2.10\n{ports}    health_check: {check}\n    \
                 backends:\n      - address: 10.0.0.1\n"
            ))
        };
        let ok = Config::parse(&svc(
            "{type: http, path: /healthz, interval: 500ms, timeout: 200ms, rise: 1, fall: 2}",
            "    ports: [80]\n",
        ))
        .expect("valid");
        let h = ok.services[0].health_check.as_ref().expect("check");
        assert_eq!(h.interval, Duration::from_millis(500));
        assert_eq!(h.timeout, Duration::from_millis(200));
        assert_eq!(ok.services[0].health_port(), Some(80));
        let defaults = Config::parse(&svc("{type: tcp}", "    ports: [443, 80]\n")).expect("valid");
        let h = defaults.services[0].health_check.as_ref().expect("check");
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall, h.path.as_str()),
            (Duration::from_secs(2), Duration::from_secs(1), 2, 3, "/")
        );
        assert_eq!(defaults.services[0].health_port(), Some(443));
        for (check, ports, message) in [
            (
                "{type: tcp}",
                "",
                "services[0].health_check.port: required for an all-ports VIP",
            ),
            (
                "{type: udp}",
                "    ports: [80]\n",
                "services[0].health_check.type: unknown variant",
            ),
            (
                "{type: tcp, interval: 2}",
                "    ports: [80]\n",
                "services[0].health_check.interval: invalid duration \"2\"",
            ),
            (
                "{type: tcp, interval: 50ms}",
                "    ports: [80]\n",
                "services[0].health_check.interval: 50ms is outside 100ms to 1h",
            ),
            (
                "{type: tcp, interval: 1s, timeout: 2s}",
                "    ports: [80]\n",
                "services[0].health_check.timeout: 2s must be above 0 and at most the interval (1s)",
            ),
            (
                "{type: tcp, fall: 0}",
                "    ports: [80]\n",
                "services[0].health_check.fall: 0 is outside 1 to 100",
            ),
            (
                "{type: http, path: 'x y'}",
                "    ports: [80]\n",
                "services[0].health_check.path: \"x y\" must start with /",
            ),
            (
                "{type: tcp, port: 0}",
                "    ports: [80]\n",
                "services[0].health_check.port: port 0 is not allowed",
            ),
        ] {
            let err = fails(&svc(check, ports));
            assert!(err.starts_with(message), "{check}: {err}");
        }
    }

    #[test]
    fn node_health_checks_default_like_a_cloud_load_balancer_and_are_validated() {
        let defaults = Config::parse("interface: eth0\n").expect("valid");
        let n = &defaults.kubernetes.node_health_check;
        assert_eq!(
            (n.enabled, n.interval, n.timeout, n.rise, n.fall),
            (true, Duration::from_secs(5), Duration::from_secs(2), 2, 3)
        );
        let set = Config::parse(
            "interface: eth0\nkubernetes:\n  node_health_check: \
             {interval: 300ms, timeout: 100ms, rise: 1, fall: 2}\n",
        )
        .expect("valid");
        let check = set.kubernetes.node_health_check.http_check(32000);
        assert_eq!(
            (check.kind, check.port, check.path.as_str()),
            (CheckKind::Http, Some(32000), "/healthz")
        );
        assert_eq!(
            (check.interval, check.timeout, check.rise, check.fall),
            (Duration::from_millis(300), Duration::from_millis(100), 1, 2)
        );
        let off =
            Config::parse("interface: eth0\nkubernetes:\n  node_health_check: {enabled: false}\n")
                .expect("valid");
        assert!(!off.kubernetes.node_health_check.enabled);
        for (check, message) in [
            (
                "{interval: 10ms}",
                "kubernetes.node_health_check.interval: 10ms is outside 100ms to 1h",
            ),
            (
                "{interval: 1s, timeout: 3s}",
                "kubernetes.node_health_check.timeout: 3s must be above 0 and at most the interval (1s)",
            ),
            (
                "{rise: 0}",
                "kubernetes.node_health_check.rise: 0 is outside 1 to 100",
            ),
            (
                "{fall: 101}",
                "kubernetes.node_health_check.fall: 101 is outside 1 to 100",
            ),
            (
                "{interval: soon}",
                "kubernetes.node_health_check.interval: invalid duration",
            ),
            (
                "{port: 32000}",
                "kubernetes.node_health_check.port: unknown field `port`",
            ),
        ] {
            let err = fails(&format!(
                "interface: eth0\nkubernetes:\n  node_health_check: {check}\n"
            ));
            assert!(err.starts_with(message), "{check}: {err}");
        }
    }

    #[test]
    fn first_error_wins() {
        assert_eq!(
            fails(&with_services(
                "  - name: web\n    vip: 192.0.2.10\n    ports: [0]\n\
                 \x20 - name: web\n    vip: 192.0.2.11\n"
            )),
            "services[0].ports[0]: port 0 is not allowed; omit `ports` for an all-ports VIP"
        );
    }

    #[test]
    fn load_reports_unreadable_files() {
        let path = Path::new("/nonexistent/l3lb.yaml");
        let error = Config::load(path).expect_err("missing file");
        assert_eq!(error.path, "");
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/l3lb.yaml: "),
            "{error}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let path =
            std::env::temp_dir().join(format!("l3lb-config-test-{}.yaml", std::process::id()));
        std::fs::write(&path, EXAMPLE).expect("write temp file");
        let loaded = Config::load(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded, Config::parse(EXAMPLE));
    }

    #[test]
    fn error_display_omits_an_empty_path() {
        assert_eq!(error("", "boom").to_string(), "boom");
        assert_eq!(error("a.b", "boom").to_string(), "a.b: boom");
    }
}
