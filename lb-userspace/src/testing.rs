//! Support for packet fixtures and benchmarks that run the real program through
//! `BPF_PROG_TEST_RUN`: a private network namespace holding one NIC with known
//! neighbours (so `bpf_fib_lookup` answers deterministically), and a test-run call that
//! presents a frame as received on that NIC.

use std::process::Command;

use anyhow::{Context as _, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// The NIC and neighbours of a test namespace.
#[derive(Debug, Clone)]
pub struct TestNet<'a> {
    /// MAC address of the NIC (`fx0`).
    pub mac: &'a str,
    /// IPv4 address with prefix length.
    pub ipv4: &'a str,
    /// IPv4 default gateway (need not exist).
    pub gateway4: &'a str,
    /// IPv6 address with prefix length.
    pub ipv6: &'a str,
    /// IPv6 default gateway (need not exist).
    pub gateway6: &'a str,
    /// Permanent neighbour entries: (address, MAC).
    pub neighbours: &'a [(&'a str, &'a str)],
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Moves the calling thread into a new network namespace holding `net` on a veth named
/// `fx0`, and returns its ifindex. The namespace disappears when the thread ends (or
/// with the process, for a single-threaded program). Needs CAP_SYS_ADMIN.
pub fn enter_test_namespace(net: &TestNet<'_>) -> anyhow::Result<u32> {
    // SAFETY: unshare affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET): are we root?");
    }
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "add", "fx0", "type", "veth", "peer", "name", "fx1"])?;
    ip(&[
        "link", "set", "fx0", "address", net.mac, "mtu", "1500", "up",
    ])?;
    ip(&["link", "set", "fx1", "up"])?;
    ip(&["addr", "add", net.ipv4, "dev", "fx0"])?;
    ip(&["route", "add", "default", "via", net.gateway4, "dev", "fx0"])?;
    ip(&["-6", "addr", "add", net.ipv6, "dev", "fx0", "nodad"])?;
    ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        net.gateway6,
        "dev",
        "fx0",
    ])?;
    add_neighbours(
        net.neighbours
            .iter()
            .map(|(a, m)| (a.to_string(), m.to_string())),
    )?;
    // bpf_fib_lookup answers only for interfaces that forward.
    for f in [
        "/proc/sys/net/ipv4/conf/fx0/forwarding",
        "/proc/sys/net/ipv6/conf/fx0/forwarding",
    ] {
        std::fs::write(f, "1").with_context(|| format!("writing {f}"))?;
    }
    // /sys shows the namespace it was mounted in, so ask the kernel by name.
    // SAFETY: a NUL-terminated literal.
    let ifindex = unsafe { libc::if_nametoindex(c"fx0".as_ptr()) };
    if ifindex == 0 {
        bail!("fx0 has no ifindex");
    }
    Ok(ifindex)
}

/// Adds permanent neighbour entries on `fx0` in one `ip -batch` (thousands are quick).
pub fn add_neighbours(entries: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut batch = String::new();
    for (addr, mac) in entries {
        batch.push_str(&format!(
            "neigh replace {addr} lladdr {mac} dev fx0 nud permanent\n"
        ));
    }
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(batch.as_bytes())
        .context("writing neighbours to ip -batch")?;
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One test run's result.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The program's return value (the XDP verdict).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Run time the kernel reported.
    pub duration: std::time::Duration,
}

/// Runs `prog` once on `frame` as if received on interface `ifindex`.
pub fn run_xdp(prog: &Xdp, ifindex: u32, frame: &[u8]) -> anyhow::Result<RunResult> {
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok(RunResult {
        verdict: res.return_value,
        frame: out,
        duration: res.duration,
    })
}
