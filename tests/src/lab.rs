//! The lab topology: a fabric bridge, a client, balancers and backends, each in its own
//! namespace with `eth0` plugged into the bridge, plus a bpffs directory for pins.

use std::{
    ffi::OsStr,
    fmt,
    fs::{self, OpenOptions},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::{self, Netns, host},
    prefix::Prefix,
    process::{ChildGuard, spawn_in},
};

/// Root of the lab's shared state on the host (owner locks, bpffs).
pub const LAB_ROOT: &str = "/run/l3lb-lab";

/// How long [`Lab`]'s drop waits for processes after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Most balancers a lab can have (addresses 10.77.0.2 ..= 10.77.0.10).
const MAX_BALANCERS: usize = 9;

/// Most backends a lab can have (addresses 10.77.0.11 ..= 10.77.0.250).
const MAX_BACKENDS: usize = 240;

/// The router of a far site ([`Lab::add_far_site`]) on the fabric.
pub const ROUTER_IPV4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
/// The router's address on the far link.
pub const FAR_ROUTER_IPV4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 254);
/// The far client's address.
pub const FAR_CLIENT_IPV4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The far site's subnet, routed via [`ROUTER_IPV4`] from every node on the fabric.
pub const FAR_SUBNET: &str = "10.78.0.0/24";
/// The router's IPv6 address on the fabric (its `eth0`, like every node's: the host part
/// 254 read as hex).
pub const ROUTER_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x254);
/// The router's IPv6 address on the far link.
pub const FAR_ROUTER_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0x254);
/// The far client's IPv6 address.
pub const FAR_CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 1);
/// The far site's IPv6 subnet, routed via [`ROUTER_IPV6`] from every node on the fabric.
pub const FAR_SUBNET_V6: &str = "fd78::/64";

/// What to build: how many balancer and backend namespaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of backend namespaces (`backend-0` …), at most 240.
    pub backends: usize,
    /// Number of balancer namespaces (`balancer-0` …), at most 9.
    pub balancers: usize,
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Mac> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .with_context(|| format!("MAC address {s:?} is too short"))?;
            *byte = u8::from_str_radix(part, 16)
                .with_context(|| format!("MAC address {s:?} has a bad byte {part:?}"))?;
        }
        if parts.next().is_some() {
            bail!("MAC address {s:?} is too long");
        }
        Ok(Mac(mac))
    }
}

/// One namespace attached to the fabric bridge through its `eth0`.
#[derive(Debug)]
pub struct Node {
    /// Short name: `client`, `balancer-<i>` or `backend-<i>`.
    pub name: String,
    /// The namespace (full name `<prefix>-<short name>`).
    pub ns: Netns,
    /// IPv4 address of `eth0` (/24).
    pub ipv4: Ipv4Addr,
    /// IPv6 address of `eth0` (/64, no DAD).
    pub ipv6: Ipv6Addr,
    /// MAC address of `eth0`.
    pub mac: Mac,
    /// Name of the veth end in the fabric namespace (a `br0` port).
    pub fabric_port: String,
}

impl Node {
    /// This node's address in the family of `like` (IPv4 or IPv6).
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => IpAddr::V4(self.ipv4),
            IpAddr::V6(_) => IpAddr::V6(self.ipv6),
        }
    }

    /// Runs a command inside this node's namespace; see [`Netns::run`].
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ns.run(args)
    }
}

/// A client one router away from the fabric (see [`Lab::add_far_site`]):
///
/// ```text
///   fabric (br0) ── eth0 router far0 ──── eth0 far client
///                   10.77.0.254  10.78.0.254   10.78.0.1
///                   fd77::254    fd78::254     fd78::1
///                                MTU = link_mtu  MTU 1500
/// ```
#[derive(Debug)]
pub struct FarSite {
    /// The router: `eth0` on the fabric ([`ROUTER_IPV4`]), `far0` toward the far client
    /// ([`FAR_ROUTER_IPV4`]); forwards, no rp_filter.
    pub router: Node,
    /// The far client's namespace: `eth0` [`FAR_CLIENT_IPV4`]/24, default route via the
    /// router.
    pub client_ns: Netns,
    /// The far client's address.
    pub client_ipv4: Ipv4Addr,
    /// The far client's IPv6 address ([`FAR_CLIENT_IPV6`]).
    pub client_ipv6: Ipv6Addr,
    /// MTU of the router's `far0`: the bottleneck of the path toward the far client.
    pub link_mtu: u32,
}

/// A running lab; dropping it kills its processes, deletes its namespaces and pins.
///
/// Drop order inside: processes (SIGTERM, 5 s, SIGKILL) → namespaces → pin directory.
/// Declare servers, captures and [`ChildGuard`]s *after* the lab so they drop first.
#[derive(Debug)]
pub struct Lab {
    /// The prefix of every name this lab created.
    pub prefix: Prefix,
    /// The namespace that holds bridge `br0` and the far ends of all veths.
    pub fabric: Netns,
    /// The client: 10.77.0.1 / fd77::1.
    pub client: Node,
    /// Balancers: 10.77.0.2.. / fd77::2.. (`balancer-0` is 10.77.0.2).
    pub balancers: Vec<Node>,
    /// Backends: 10.77.0.11.. / fd77::11.. (`backend-0` is 10.77.0.11).
    pub backends: Vec<Node>,
    /// A routed far site, once [`Lab::add_far_site`] has built it.
    pub far: Option<FarSite>,
    /// This lab's pin directory on the shared bpffs: `/run/l3lb-lab/bpffs/<prefix>`.
    pub pin_root: PathBuf,
    /// Scratch directory for configs and logs: `$TMPDIR/l3lb-lab/<prefix>`. Removed on
    /// drop unless the thread is panicking (a failed test) or `L3LB_LAB_KEEP` is set.
    pub dir: PathBuf,
}

impl Lab {
    /// Builds the topology; see the crate docs for the picture and addresses.
    ///
    /// Every node gets static neighbour entries for every other node (IPv4 and IPv6), so
    /// `bpf_fib_lookup` on a balancer finds backends without waiting for ARP. VIPs are not
    /// added: they are resolved (or not) by the real ARP/ND behaviour.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the l3lb lab needs root (network namespaces, bpffs)");
        }
        if spec.balancers > MAX_BALANCERS || spec.backends > MAX_BACKENDS {
            bail!(
                "lab spec {spec:?} too large: at most {MAX_BALANCERS} balancers and \
                 {MAX_BACKENDS} backends"
            );
        }
        if let Err(e) = Lab::sweep_stale() {
            eprintln!("l3lb-tests: sweeping stale labs: {e:#}");
        }
        let bpffs = ensure_bpffs()?;
        let prefix = Prefix::fresh();

        let fabric = Netns::with_prefix(&prefix, "fabric")?;
        fabric.sysctl(&[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ])?;
        fabric.ip(["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(["link", "set", "br0", "up"])?;

        let client = add_node(&prefix, &fabric, "client", "client", 1)?;
        client.ns.sysctl(&[("net.ipv4.ip_forward", "0")])?;
        let balancers = (0..spec.balancers)
            .map(|i| {
                let node = add_node(
                    &prefix,
                    &fabric,
                    &format!("balancer-{i}"),
                    &format!("bal{i}"),
                    2 + i,
                )?;
                node.ns.sysctl(&[
                    ("net.ipv4.ip_forward", "0"),
                    ("net.ipv6.conf.all.forwarding", "0"),
                ])?;
                Ok(node)
            })
            .collect::<Result<Vec<_>>>()?;
        let backends = (0..spec.backends)
            .map(|i| {
                let node = add_node(
                    &prefix,
                    &fabric,
                    &format!("backend-{i}"),
                    &format!("be{i}"),
                    11 + i,
                )?;
                node.ns.sysctl(&[
                    ("net.ipv4.conf.all.arp_ignore", "1"),
                    ("net.ipv4.conf.all.arp_announce", "2"),
                    ("net.ipv4.conf.eth0.arp_ignore", "1"),
                    ("net.ipv4.conf.eth0.arp_announce", "2"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.eth0.rp_filter", "0"),
                    ("net.ipv4.conf.lo.rp_filter", "0"),
                ])?;
                Ok(node)
            })
            .collect::<Result<Vec<_>>>()?;

        let pin_root = bpffs.join(prefix.as_str());
        let dir = std::env::temp_dir().join("l3lb-lab").join(prefix.as_str());
        let lab = Lab {
            prefix,
            fabric,
            client,
            balancers,
            backends,
            far: None,
            pin_root,
            dir,
        };
        // From here on, a failure drops `lab`, which cleans up everything.
        fs::create_dir_all(&lab.pin_root)
            .with_context(|| format!("creating {}", lab.pin_root.display()))?;
        fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
        lab.add_static_neighbours()?;
        Ok(lab)
    }

    /// Every node namespace: client, balancers, backends (not the fabric).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.client)
            .chain(&self.balancers)
            .chain(&self.backends)
    }

    /// The node with this short name (`client`, `balancer-0`, `backend-3`, …).
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes()
            .find(|n| n.name == name)
            .with_context(|| format!("lab {} has no node {name}", self.prefix))
    }

    /// Adds `vip` to backend `i`'s `lo` (/32 or /128, no DAD).
    pub fn backend_add_vip(&self, i: usize, vip: IpAddr) -> Result<()> {
        let backend = self.backend(i)?;
        backend.ns.ip(vip_addr_args("add", vip)).map(drop)
    }

    /// Gives backend `i` further backend addresses for `l2` forwarding, each on its own
    /// macvlan of `eth0` (its own MAC, so the balancer's MAC rewrite picks the address),
    /// and marks every packet with the backend address it was sent to: `eth0`'s own
    /// address for packets arriving there, a macvlan's address for packets arriving on
    /// it. With `tcp_fwmark_accept` on, an accepted TCP socket carries the mark of its
    /// SYN, which [`crate::TcpServer`] reports as `to=<address>`.
    ///
    /// Every address must be a free host address of 10.77.0.0/24 (10.77.0.20 ..=
    /// 10.77.0.199 are free in a lab with fewer than 9 backends). The balancer resolves
    /// them by ARP like any backend (each macvlan answers for its own address only).
    pub fn backend_add_l2_addresses(&self, i: usize, addrs: &[Ipv4Addr]) -> Result<()> {
        let backend = self.backend(i)?;
        for addr in addrs {
            let [a, b, c, d] = addr.octets();
            if [a, b, c] != [10, 77, 0] || d == 0 || d == 255 {
                bail!("{addr} is not a host address in the lab subnet 10.77.0.0/24");
            }
            if *addr == ROUTER_IPV4 || self.nodes().any(|n| n.ipv4 == *addr) {
                bail!("{addr} already belongs to a node of the lab");
            }
        }
        // Before the macvlans exist, so they inherit it: a packet from the client on a
        // macvlan would fail a strict reverse-path check (the client is reached via eth0).
        backend.ns.sysctl(&[
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.tcp_fwmark_accept", "1"),
        ])?;
        let mut lines = Vec::new();
        let mut rules = vec![
            "add table ip l3lb_lab".to_owned(),
            // Before anything else sees the packet (conntrack, routing).
            "add chain ip l3lb_lab marks { type filter hook prerouting priority raw; }".to_owned(),
            format!(
                "add rule ip l3lb_lab marks iifname \"eth0\" meta mark set {:#010x}",
                u32::from(backend.ipv4)
            ),
        ];
        for addr in addrs {
            let dev = format!("l2-{}", addr.octets()[3]);
            lines.push(format!("link add {dev} link eth0 type macvlan mode bridge"));
            lines.push(format!("addr add {addr}/32 dev {dev}"));
            lines.push(format!("link set {dev} up"));
            rules.push(format!(
                "add rule ip l3lb_lab marks iifname \"{dev}\" meta mark set {:#010x}",
                u32::from(*addr)
            ));
        }
        backend.ns.ip_batch(&lines)?;
        let path = self.write_file(&format!("{}-marks.nft", backend.name), &rules.join("\n"))?;
        backend
            .ns
            .run(["nft", "-f", &path.to_string_lossy()])
            .context("nft (apt-get install nftables)")?;
        Ok(())
    }

    /// Removes `vip` from backend `i`'s `lo`.
    pub fn backend_del_vip(&self, i: usize, vip: IpAddr) -> Result<()> {
        let backend = self.backend(i)?;
        backend.ns.ip(vip_addr_args("del", vip)).map(drop)
    }

    /// Routes `vip` from the client via balancer `via_balancer` (replacing any route).
    pub fn client_route_vip(&self, vip: IpAddr, via_balancer: usize) -> Result<()> {
        let balancer = self.balancers.get(via_balancer).with_context(|| {
            format!(
                "lab has {} balancers, not {}",
                self.balancers.len(),
                via_balancer + 1
            )
        })?;
        self.client_route_vip_via(vip, balancer.ip_like(vip))
    }

    /// Routes `vip` from the client via any gateway on the fabric (replacing any route).
    pub fn client_route_vip_via(&self, vip: IpAddr, gateway: IpAddr) -> Result<()> {
        let host_route = match vip {
            IpAddr::V4(_) => format!("{vip}/32"),
            IpAddr::V6(_) => format!("{vip}/128"),
        };
        let gw = gateway.to_string();
        self.client
            .ns
            .ip([
                "route",
                "replace",
                host_route.as_str(),
                "via",
                gw.as_str(),
                "dev",
                "eth0",
            ])
            .map(drop)
    }

    /// Adds `addr` to the client's `eth0` as a further /24 address (sockets bound to it
    /// send from it), with static neighbour entries for it on the other non-balancer nodes.
    ///
    /// It must be in 10.77.0.0/24 and used by no node: 10.77.0.200 ..= 10.77.0.249 are
    /// free unless a lab has more than 189 backends.
    pub fn client_add_ipv4(&self, addr: Ipv4Addr) -> Result<()> {
        let [a, b, c, d] = addr.octets();
        if [a, b, c] != [10, 77, 0] || d == 0 || d == 255 {
            bail!("{addr} is not a host address in the lab subnet 10.77.0.0/24");
        }
        if addr == ROUTER_IPV4 || self.nodes().any(|n| n.ipv4 == addr) {
            bail!("{addr} already belongs to a node of the lab");
        }
        let cidr = format!("{addr}/24");
        self.client
            .ns
            .ip(["addr", "add", cidr.as_str(), "dev", "eth0"])?;
        let line = format!(
            "neigh replace {addr} lladdr {} dev eth0 nud permanent",
            self.client.mac
        );
        for node in self
            .fabric_nodes()
            .filter(|n| n.name != self.client.name && !n.name.starts_with("balancer"))
        {
            node.ns.ip_batch(std::slice::from_ref(&line))?;
        }
        Ok(())
    }

    /// Adds `addr` to the client's `eth0` as a further /64 address, *deprecated*
    /// (`preferred_lft 0`, no DAD), with static neighbour entries for it on the other
    /// non-balancer nodes.
    ///
    /// Deprecated so that, like a secondary IPv4 address, it is never picked as the source
    /// of an unbound socket: only sockets bound to it send from it (binding a deprecated
    /// address is allowed). It must be in fd77::/64 and used by no node: any address with
    /// a hex letter in its last group (fd77::c9, fd77::ca, …) is free.
    pub fn client_add_ipv6(&self, addr: Ipv6Addr) -> Result<()> {
        let [a, b, c, d, ..] = addr.segments();
        if [a, b, c, d] != [0xfd77, 0, 0, 0] || addr.segments()[4..] == [0, 0, 0, 0] {
            bail!("{addr} is not a host address in the lab subnet fd77::/64");
        }
        if addr == ROUTER_IPV6 || self.nodes().any(|n| n.ipv6 == addr) {
            bail!("{addr} already belongs to a node of the lab");
        }
        let cidr = format!("{addr}/64");
        self.client.ns.ip([
            "-6",
            "addr",
            "add",
            cidr.as_str(),
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        ])?;
        let line = format!(
            "neigh replace {addr} lladdr {} dev eth0 nud permanent",
            self.client.mac
        );
        for node in self
            .fabric_nodes()
            .filter(|n| n.name != self.client.name && !n.name.starts_with("balancer"))
        {
            node.ns.ip_batch(std::slice::from_ref(&line))?;
        }
        Ok(())
    }

    /// Builds a far site: a `router` namespace on the fabric and a far client behind it on
    /// a link whose router end has MTU `link_mtu` (picture at [`FarSite`]), in IPv4 and
    /// IPv6 alike.
    ///
    /// The far client's own end keeps MTU 1500, so it advertises a 1460-byte MSS: the
    /// bottleneck sits inside the path, where only "fragmentation needed" from the router
    /// can tell a sender about it. (The client can then send no packet larger than
    /// `link_mtu` itself: a veth drops what exceeds its peer's MTU.)
    ///
    /// Every node on the fabric routes [`FAR_SUBNET`] via the router ([`FAR_SUBNET_V6`] via
    /// [`ROUTER_IPV6`]); the router has static neighbour entries for every node and they
    /// for it (balancers excepted, as in [`Lab::new`]). Route VIPs from the router with
    /// [`Lab::far_route_vip`]. The router forwards both families and, being a router,
    /// answers what does not fit `far0` with ICMP "fragmentation needed" / ICMPv6 "packet
    /// too big".
    pub fn add_far_site(&mut self, link_mtu: u32) -> Result<()> {
        if self.far.is_some() {
            bail!("lab {} already has a far site", self.prefix);
        }
        let router = add_node(
            &self.prefix,
            &self.fabric,
            "router",
            "rtr",
            usize::from(ROUTER_IPV4.octets()[3]),
        )?;
        let client_ns = Netns::with_prefix(&self.prefix, "far")?;
        // From here on, the namespaces belong to the lab, whose drop removes them.
        self.far = Some(FarSite {
            router,
            client_ns,
            client_ipv4: FAR_CLIENT_IPV4,
            client_ipv6: FAR_CLIENT_IPV6,
            link_mtu,
        });
        let far = self.far.as_ref().context("far site just added")?;
        let router = &far.router;
        router.ns.sysctl(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ])?;
        router.ns.ip([
            "link",
            "add",
            "far0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            far.client_ns.name(),
        ])?;
        let mtu = link_mtu.to_string();
        let router_cidr = format!("{FAR_ROUTER_IPV4}/24");
        let client_cidr = format!("{FAR_CLIENT_IPV4}/24");
        let gateway = FAR_ROUTER_IPV4.to_string();
        router.ns.ip(["link", "set", "far0", "mtu", mtu.as_str()])?;
        router
            .ns
            .ip(["addr", "add", router_cidr.as_str(), "dev", "far0"])?;
        let router_cidr6 = format!("{FAR_ROUTER_IPV6}/64");
        router.ns.ip([
            "-6",
            "addr",
            "add",
            router_cidr6.as_str(),
            "dev",
            "far0",
            "nodad",
        ])?;
        router.ns.ip(["link", "set", "far0", "up"])?;
        router
            .ns
            .run(["ethtool", "-K", "far0", "gro", "on", "tx", "off"])?;
        let client = &far.client_ns;
        let client_cidr6 = format!("{FAR_CLIENT_IPV6}/64");
        let gateway6 = FAR_ROUTER_IPV6.to_string();
        client.ip(["addr", "add", client_cidr.as_str(), "dev", "eth0"])?;
        client.ip([
            "-6",
            "addr",
            "add",
            client_cidr6.as_str(),
            "dev",
            "eth0",
            "nodad",
        ])?;
        client.ip(["link", "set", "eth0", "up"])?;
        client.run(["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])?;
        client.ip(["route", "add", "default", "via", gateway.as_str()])?;
        client.ip(["-6", "route", "add", "default", "via", gateway6.as_str()])?;
        let client_mac = client.mac("eth0")?;
        let router_far_mac = router.ns.mac("far0")?;
        client.ip_batch(&[
            format!(
                "neigh replace {FAR_ROUTER_IPV4} lladdr {router_far_mac} dev eth0 nud permanent"
            ),
            format!(
                "neigh replace {FAR_ROUTER_IPV6} lladdr {router_far_mac} dev eth0 nud permanent"
            ),
        ])?;
        let mut router_neigh = vec![
            format!("neigh replace {FAR_CLIENT_IPV4} lladdr {client_mac} dev far0 nud permanent"),
            format!("neigh replace {FAR_CLIENT_IPV6} lladdr {client_mac} dev far0 nud permanent"),
        ];
        for node in self.nodes() {
            for ip in [IpAddr::V4(node.ipv4), IpAddr::V6(node.ipv6)] {
                router_neigh.push(format!(
                    "neigh replace {ip} lladdr {} dev eth0 nud permanent",
                    node.mac
                ));
            }
            node.ns.ip([
                "route",
                "replace",
                FAR_SUBNET,
                "via",
                &ROUTER_IPV4.to_string(),
                "dev",
                "eth0",
            ])?;
            node.ns.ip([
                "-6",
                "route",
                "replace",
                FAR_SUBNET_V6,
                "via",
                &ROUTER_IPV6.to_string(),
                "dev",
                "eth0",
            ])?;
            if !node.name.starts_with("balancer") {
                node.ns.ip_batch(&[
                    format!(
                        "neigh replace {ROUTER_IPV4} lladdr {} dev eth0 nud permanent",
                        router.mac
                    ),
                    format!(
                        "neigh replace {ROUTER_IPV6} lladdr {} dev eth0 nud permanent",
                        router.mac
                    ),
                ])?;
            }
        }
        router.ns.ip_batch(&router_neigh)?;
        Ok(())
    }

    /// Routes `vip` from the far site's router via balancer `via_balancer`.
    pub fn far_route_vip(&self, vip: IpAddr, via_balancer: usize) -> Result<()> {
        let far = self
            .far
            .as_ref()
            .with_context(|| format!("lab {} has no far site", self.prefix))?;
        let balancer = self.balancers.get(via_balancer).with_context(|| {
            format!(
                "lab has {} balancers, not {}",
                self.balancers.len(),
                via_balancer + 1
            )
        })?;
        let host_route = match vip {
            IpAddr::V4(_) => format!("{vip}/32"),
            IpAddr::V6(_) => format!("{vip}/128"),
        };
        let gw = balancer.ip_like(vip).to_string();
        far.router
            .ns
            .ip([
                "route",
                "replace",
                host_route.as_str(),
                "via",
                gw.as_str(),
                "dev",
                "eth0",
            ])
            .map(drop)
    }

    /// Every namespace plugged into the fabric: [`Lab::nodes`] and a far site's router.
    fn fabric_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes().chain(self.far.iter().map(|f| &f.router))
    }

    /// Backend `i`, or an error naming how many there are.
    pub fn backend(&self, i: usize) -> Result<&Node> {
        self.backends
            .get(i)
            .with_context(|| format!("lab has {} backends, no backend-{i}", self.backends.len()))
    }

    /// A pin directory for one agent on the shared bpffs: `<pin_root>/<node>` (not created).
    ///
    /// Use it as the agent's `pin_path`: `/sys/fs/bpf` is private to each `ip netns exec`.
    pub fn pin_path(&self, node: &str) -> PathBuf {
        self.pin_root.join(node)
    }

    /// A file in the lab's scratch directory (configs, logs).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes `contents` to a file in the lab's scratch directory and returns its path.
    pub fn write_file(&self, file: &str, contents: &str) -> Result<PathBuf> {
        let path = self.path(file);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts `cmd args…` inside `ns`, stdout and stderr to `log_path` (truncated).
    ///
    /// A relative `log_path` is taken inside [`Lab::dir`].
    pub fn spawn_in<I, S>(
        &self,
        ns: &Netns,
        cmd: impl AsRef<OsStr>,
        args: I,
        log_path: impl AsRef<Path>,
    ) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        spawn_in(ns, cmd, args, &self.dir.join(log_path))
    }

    /// A further namespace with this lab's prefix (e.g. a "pod"); the caller owns it.
    pub fn new_namespace(&self, name: &str) -> Result<Netns> {
        Netns::with_prefix(&self.prefix, name)
    }

    /// Deletes namespaces and pin directories of labs whose process is gone.
    ///
    /// Returns the names removed. Processes still inside a stale namespace are killed.
    pub fn sweep_stale() -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for name in netns::list_netns()? {
            let Some((prefix, _)) = Prefix::parse(&name) else {
                continue;
            };
            if !prefix.is_stale() {
                continue;
            }
            let pids = host(["ip", "netns", "pids", name.as_str()]).unwrap_or_default();
            let pids: Vec<i32> = pids
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            netns::terminate(&pids, Duration::ZERO);
            netns::delete_netns(&name)?;
            removed.push(name);
        }
        let bpffs = Path::new(LAB_ROOT).join("bpffs");
        if let Ok(entries) = fs::read_dir(&bpffs) {
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if Prefix::parse(&name).is_some_and(|(p, _)| p.is_stale()) {
                    fs::remove_dir_all(entry.path())
                        .with_context(|| format!("removing {}", entry.path().display()))?;
                    removed.push(entry.path().display().to_string());
                }
            }
        }
        Ok(removed)
    }

    fn add_static_neighbours(&self) -> Result<()> {
        // Balancers are left to resolve their neighbours themselves: that is the agent's
        // job, and the lab must not hide it when it fails.
        for node in self.nodes().filter(|n| !n.name.starts_with("balancer")) {
            let lines: Vec<String> = self
                .nodes()
                .filter(|other| other.name != node.name)
                .flat_map(|other| {
                    [IpAddr::V4(other.ipv4), IpAddr::V6(other.ipv6)].map(|ip| {
                        format!(
                            "neigh replace {ip} lladdr {} dev eth0 nud permanent",
                            other.mac
                        )
                    })
                })
                .collect();
            node.ns.ip_batch(&lines)?;
        }
        Ok(())
    }

    fn teardown(&mut self) {
        let report = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                eprintln!("l3lb-tests: tearing down {what}: {e:#}");
            }
        };
        // 1. Processes, in every namespace at once so the grace period is shared.
        let own = std::process::id() as i32;
        let pids: Vec<i32> = std::iter::once(&self.fabric)
            .chain(self.fabric_nodes().map(|n| &n.ns))
            .chain(self.far.iter().map(|f| &f.client_ns))
            .flat_map(|ns| ns.pids().unwrap_or_default())
            .filter(|&p| p != own)
            .collect();
        netns::terminate(&pids, KILL_GRACE);
        // 2. Namespaces (their veths go with them).
        let Lab {
            fabric,
            client,
            balancers,
            backends,
            far,
            pin_root,
            ..
        } = self;
        for node in std::iter::once(client).chain(balancers).chain(backends) {
            report("a namespace", node.ns.delete());
        }
        if let Some(far) = far {
            report("the far client's namespace", far.client_ns.delete());
            report("the router's namespace", far.router.ns.delete());
        }
        report("the fabric namespace", fabric.delete());
        // 3. Scratch files, unless someone will want to read the logs.
        if !std::thread::panicking() && std::env::var_os("L3LB_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("l3lb-tests: lab files kept in {}", self.dir.display());
        }
        // 4. Pins.
        if pin_root.exists() {
            report(
                &pin_root.display().to_string(),
                fs::remove_dir_all(&*pin_root)
                    .with_context(|| format!("removing {}", pin_root.display())),
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn add_node(
    prefix: &Prefix,
    fabric: &Netns,
    name: &str,
    port: &str,
    host_part: usize,
) -> Result<Node> {
    let ns = Netns::with_prefix(prefix, name)?;
    // Before the veth exists, so eth0 inherits "default": no DAD, no waiting for IPv6.
    ns.sysctl(&[
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ])?;
    fabric.ip([
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    fabric.ip(["link", "set", port, "master", "br0", "up"])?;
    let ipv4 = Ipv4Addr::new(10, 77, 0, u8::try_from(host_part)?);
    // fd77::11 for 10.77.0.11: the same digits, read as hex.
    let ipv6: Ipv6Addr = format!("fd77::{host_part}").parse()?;
    let v4 = format!("{ipv4}/24");
    let v6 = format!("{ipv6}/64");
    ns.ip(["addr", "add", v4.as_str(), "dev", "eth0"])?;
    ns.ip(["-6", "addr", "add", v6.as_str(), "dev", "eth0", "nodad"])?;
    ns.ip(["link", "set", "eth0", "up"])?;
    // GRO makes the receiving veth run NAPI, without which XDP_TX/REDIRECT frames vanish.
    // Checksum offload off: a CHECKSUM_PARTIAL packet rewritten by XDP would reach the
    // next host with a half-computed checksum.
    ns.run(["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])
        .context("ethtool (apt-get install ethtool)")?;
    fabric.run(["ethtool", "-K", port, "gro", "on", "tx", "off"])?;
    let mac = ns.mac("eth0")?;
    Ok(Node {
        name: name.to_owned(),
        ns,
        ipv4,
        ipv6,
        mac,
        fabric_port: port.to_owned(),
    })
}

fn vip_addr_args(op: &str, vip: IpAddr) -> Vec<String> {
    let mut args = vec!["addr".to_owned(), op.to_owned()];
    match vip {
        IpAddr::V4(_) => args.push(format!("{vip}/32")),
        IpAddr::V6(_) => args.push(format!("{vip}/128")),
    }
    args.extend(["dev", "lo"].map(str::to_owned));
    if vip.is_ipv6() && op == "add" {
        args.push("nodad".to_owned());
    }
    args
}

/// Mounts the shared bpffs at `/run/l3lb-lab/bpffs` once (under a host-wide lock).
fn ensure_bpffs() -> Result<PathBuf> {
    let root = Path::new(LAB_ROOT);
    let mountpoint = root.join("bpffs");
    fs::create_dir_all(&mountpoint)
        .with_context(|| format!("creating {}", mountpoint.display()))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("mount.lock"))
        .context("opening the bpffs mount lock")?;
    // SAFETY: flock on a descriptor we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("locking the bpffs mount lock");
    }
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let wanted = mountpoint.to_string_lossy();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, point, fstype) = (f.next(), f.next(), f.next());
        point == Some(&*wanted) && fstype == Some("bpf")
    });
    if !mounted {
        host(["mount", "-t", "bpf", "bpf", &*wanted])
            .with_context(|| format!("mounting bpffs at {wanted}"))?;
    }
    drop(lock);
    Ok(mountpoint)
}
