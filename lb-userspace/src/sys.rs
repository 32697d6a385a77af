//! Host facts and host setup the agent needs: addresses, bpffs, sysctls, neighbours.

use std::{
    collections::HashSet,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
};

use anyhow::{Context as _, bail};

/// Every address configured on any interface of this host (network namespace).
pub fn local_addresses() -> anyhow::Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a valid node of the list until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: sa_family tells which sockaddr variant ifa_addr points to.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push((
                        name,
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                    ));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The set of local addresses (backends at one of them are this node).
pub fn local_address_set() -> anyhow::Result<HashSet<IpAddr>> {
    Ok(local_addresses()?.into_iter().map(|(_, a)| a).collect())
}

/// Names of the interfaces of this network namespace, for error messages.
///
/// Asked of the kernel (`if_nameindex`) rather than read from `/sys/class/net`, which
/// shows the namespace sysfs was mounted in, not necessarily ours.
pub fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut cur = list;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            names.push(
                CStr::from_ptr((*cur).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names
}

/// The index of interface `iface` in this network namespace.
pub fn interface_index(iface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(iface)
        .with_context(|| format!("interface name {iface:?} holds a NUL byte"))?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error())
            .with_context(|| format!("looking up interface {iface}")),
        i => Ok(i),
    }
}

/// The name of the interface with index `index`, if there is one.
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Fails with the list of available interfaces when `iface` does not exist.
pub fn require_interface(iface: &str) -> anyhow::Result<()> {
    if interface_names().iter().any(|n| n == iface) {
        return Ok(());
    }
    bail!(
        "interface {iface} not found; available: {}",
        interface_names().join(", ")
    )
}

/// First IPv4 address of `iface`: the source of the IPIP headers the balancer writes.
pub fn interface_ipv4(iface: &str) -> anyhow::Result<Option<Ipv4Addr>> {
    Ok(local_addresses()?.into_iter().find_map(|(n, a)| match a {
        IpAddr::V4(v4) if n == iface => Some(v4),
        _ => None,
    }))
}

/// First global (not link-local) IPv6 address of `iface`: the source of the IPv6-in-IPv6
/// headers the balancer writes.
pub fn interface_ipv6(iface: &str) -> anyhow::Result<Option<Ipv6Addr>> {
    Ok(local_addresses()?.into_iter().find_map(|(n, a)| match a {
        IpAddr::V6(v6) if n == iface && (v6.segments()[0] & 0xffc0) != 0xfe80 => Some(v6),
        _ => None,
    }))
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin_path` is a directory on a bpffs, mounting one at /sys/fs/bpf if that is
/// where the path lives and nothing is mounted there yet.
pub fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    // Where the nearest existing directory is on a bpffs, the pins go there: that is how
    // a container gets only its own directory of the node's bpffs, with no bpffs at
    // /sys/fs/bpf to check (and no right to mount one).
    if pin_path
        .ancestors()
        .find(|a| a.is_dir())
        .is_some_and(is_bpffs)
    {
        return std::fs::create_dir_all(pin_path)
            .with_context(|| format!("creating pin directory {}", pin_path.display()));
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        std::fs::create_dir_all(sys_bpf).context("creating /sys/fs/bpf")?;
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: plain mount(2) with static NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(pin_path)
        .with_context(|| format!("creating pin directory {}", pin_path.display()))?;
    if !is_bpffs(pin_path) {
        bail!(
            "pin_path {} is not on a bpf filesystem; mount one (mount -t bpf bpf {}), use a path under /sys/fs/bpf, or in a container mount a directory of the node's bpffs there (as the DaemonSet does)",
            pin_path.display(),
            pin_path.display()
        );
    }
    Ok(())
}

/// Turns on IPv4 forwarding for `iface`: `bpf_fib_lookup` refuses to answer for
/// interfaces where forwarding is off. Returns whether it had to change the setting.
pub fn enable_ipv4_forwarding(iface: &str) -> anyhow::Result<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let cur = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    if cur.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    Ok(true)
}

/// Turns on IPv6 forwarding for `iface` (`bpf_fib_lookup` needs it). Forwarding makes the
/// kernel ignore router advertisements unless `accept_ra` is 2, so an `accept_ra` of 1 is
/// raised to 2 to keep the node's own autoconfiguration working. Returns what it changed.
pub fn enable_ipv6_forwarding(iface: &str) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    let base = format!("/proc/sys/net/ipv6/conf/{iface}");
    let fwd = format!("{base}/forwarding");
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))
            .map(|v| v.trim().to_owned())
    };
    // Already forwarding (a router, or a Kubernetes node): the node's own choice about
    // router advertisements stands, and nothing is written (in a container /proc/sys is
    // read-only).
    if read(&fwd)? == "1" {
        return Ok(changed);
    }
    let write = |path: &str, value: &str| {
        std::fs::write(path, value).with_context(|| {
            format!(
                "writing {value} to {path} (where /proc/sys is read-only, as in a container, \
                 set net.ipv6.conf.{iface}.forwarding=1 on the node instead)"
            )
        })
    };
    // Forwarding makes the kernel ignore router advertisements at accept_ra=1; 2 keeps
    // the node configuring itself from them as before.
    let ra = format!("{base}/accept_ra");
    if read(&ra)? == "1" {
        write(&ra, "2")?;
        changed.push("set accept_ra to 2".to_string());
    }
    write(&fwd, "1")?;
    changed.push("enabled IPv6 forwarding on the interface".to_string());
    Ok(changed)
}

/// Asks the kernel to resolve the link-layer address of the next hop toward each address,
/// by sending an empty datagram to its discard port. `bpf_fib_lookup` only reads the
/// neighbour table; without an entry the data plane drops with `no_neighbour`.
pub fn prime_neighbours(addrs: impl IntoIterator<Item = IpAddr>) {
    for addr in addrs {
        let bind: SocketAddr = match addr {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let result = UdpSocket::bind(bind).and_then(|s| s.send_to(&[], (addr, 9)));
        if let Err(e) = result {
            tracing::debug!(%addr, error = %e, "neighbour probe not sent");
        }
    }
}

/// The capabilities `l3lb run` needs, with their bit numbers.
const NEEDED_CAPS: [(&str, u32); 3] = [("CAP_BPF", 39), ("CAP_NET_ADMIN", 12), ("CAP_PERFMON", 38)];

/// `CAP_SYS_ADMIN` stands in for `CAP_BPF` and `CAP_PERFMON` (kernels before 5.8 know only it).
const CAP_SYS_ADMIN: u32 = 21;

/// The capabilities of `NEEDED_CAPS` missing from the effective set `cap_eff`.
pub fn missing_capabilities(cap_eff: u64) -> Vec<&'static str> {
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    NEEDED_CAPS
        .iter()
        .filter(|(name, bit)| {
            let covered = *name != "CAP_NET_ADMIN" && has(CAP_SYS_ADMIN);
            !has(*bit) && !covered
        })
        .map(|(name, _)| *name)
        .collect()
}

/// Fails with the names of the capabilities this process lacks for loading and
/// attaching XDP (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_PERFMON`; nothing more is needed).
pub fn require_capabilities() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let missing = missing_capabilities(eff);
    if !missing.is_empty() {
        anyhow::bail!(
            "missing capabilities: {}. l3lb run needs CAP_BPF (maps and programs), \
             CAP_NET_ADMIN (attaching XDP) and CAP_PERFMON (the verifier's pointer checks), \
             and nothing else; grant them (e.g. securityContext.capabilities.add in \
             Kubernetes, AmbientCapabilities= in systemd) or run as root",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability_and_accepts_sys_admin_for_bpf_and_perfmon() {
        let bit = |b: u32| 1u64 << b;
        assert!(missing_capabilities(bit(39) | bit(12) | bit(38)).is_empty());
        assert_eq!(missing_capabilities(bit(12) | bit(38)), vec!["CAP_BPF"]);
        assert_eq!(
            missing_capabilities(bit(39) | bit(38)),
            vec!["CAP_NET_ADMIN"]
        );
        assert_eq!(missing_capabilities(bit(39) | bit(12)), vec!["CAP_PERFMON"]);
        assert!(
            missing_capabilities(bit(21) | bit(12)).is_empty(),
            "SYS_ADMIN covers both"
        );
        assert_eq!(missing_capabilities(bit(21)), vec!["CAP_NET_ADMIN"]);
        assert_eq!(
            missing_capabilities(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }
}
