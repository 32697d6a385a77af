//! `l3lb bench generate`: the benchmark's live-frame generator as a user command, to load a
//! real VIP from another host or VM.
//!
//! The kernel runs the generator program (`BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`) over a pool of frames and transmits each one it returns
//! `XDP_TX` for out of the chosen interface, so the NIC's driver must support XDP transmit
//! (veth, mlx5, ice, i40e, virtio-net with XDP, …). The program writes the whole
//! Ethernet + IPv4 + UDP (or TCP) header into every frame, stepping through `flows`
//! distinct (source address, source port) pairs.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};

use crate::{dataplane::OBJECT, sys};

/// Header bytes the generator rewrites in every frame: Ethernet + IPv4 + TCP (a UDP
/// header and 12 bytes of its payload).
pub const HEADER_LEN: usize = 54;

/// Frame size of TCP: segments without payload (an established flow's ACKs), whose
/// checksum the generator can compute from the header alone.
pub const TCP_FRAME: usize = 60;

/// What to send.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Interface to transmit on.
    pub interface: String,
    /// Destination MAC: the balancer's (or the next router's) interface.
    pub dst_mac: [u8; 6],
    /// Source MAC; the interface's own when `None`.
    pub src_mac: Option<[u8; 6]>,
    /// First source address; later flows count up from it.
    pub src: Ipv4Addr,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// Destination port.
    pub port: u16,
    /// `PROTO_UDP` (datagrams of `size`) or `PROTO_TCP` (ACK segments without payload,
    /// `TCP_FRAME` bytes).
    pub protocol: u8,
    /// First source port; later flows count up from it.
    pub src_port: u16,
    /// Distinct flows (a power of two, 1 ..= 2^24).
    pub flows: u32,
    /// Frame size in bytes (Ethernet header included, FCS excluded), 60 ..= 1514.
    pub size: usize,
    /// Frames to send in all (`None`: until `duration`).
    pub count: Option<u64>,
    /// How long to send at most (`None`: until `count` frames are sent).
    pub duration: Option<Duration>,
    /// Frames per second to aim at (`None`: as fast as possible).
    pub rate: Option<u64>,
}

/// What was sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateReport {
    /// Frames handed to the interface.
    pub frames: u64,
    /// Wall time.
    pub seconds: f64,
}

impl GenerateReport {
    /// Achieved frames per second.
    pub fn pps(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("invalid MAC address {s:?} (expected aa:bb:cc:dd:ee:ff)");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("invalid MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// The first frame: the template the program starts from, padded to `size`.
pub fn template(o: &GenerateOptions, src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(o.size);
    f.extend_from_slice(&o.dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let tcp = o.protocol == lb_common::PROTO_TCP;
    let ip_len = if tcp { 40 } else { (o.size - 14) as u16 };
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, o.protocol, 0, 0]);
    f.extend_from_slice(&o.src.octets());
    f.extend_from_slice(&o.vip.octets());
    f.extend_from_slice(&o.src_port.to_be_bytes());
    f.extend_from_slice(&o.port.to_be_bytes());
    if tcp {
        // Sequence and acknowledgement 1, data offset 5, ACK, window 65535, checksum 0
        // (the generator fills it in per frame), no urgent pointer.
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&(ip_len - 20).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.resize(o.size, 0);
    f
}

fn interface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    // SAFETY: a plain socket used only for the SIOCGIFHWADDR ioctl, closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err).with_context(|| format!("reading the MAC address of {iface}"));
        }
        let sa = req.ifr_ifru.ifru_hwaddr.sa_data;
        Ok([
            sa[0] as u8,
            sa[1] as u8,
            sa[2] as u8,
            sa[3] as u8,
            sa[4] as u8,
            sa[5] as u8,
        ])
    }
}

/// Sends frames as `o` says, printing the rate once a second; returns the totals.
pub fn generate(o: &GenerateOptions) -> anyhow::Result<GenerateReport> {
    if !o.flows.is_power_of_two() || o.flows > 1 << 24 {
        bail!(
            "--flows must be a power of two up to 16777216, not {}",
            o.flows
        );
    }
    if !(60..=1514).contains(&o.size) {
        bail!(
            "--size must be 60 to 1514 bytes (Ethernet header included), not {}",
            o.size
        );
    }
    match o.protocol {
        lb_common::PROTO_UDP => {}
        lb_common::PROTO_TCP if o.size == TCP_FRAME => {}
        lb_common::PROTO_TCP => bail!(
            "--protocol tcp sends {TCP_FRAME}-byte ACK segments without payload (their checksum is computed per frame from the header alone); leave out --size or give {TCP_FRAME}, not {}",
            o.size
        ),
        p => bail!("--protocol must be udp or tcp, not IP protocol {p}"),
    }
    sys::require_interface(&o.interface)?;
    let c_name = std::ffi::CString::new(o.interface.as_str()).context("interface name")?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    let src_mac = match o.src_mac {
        Some(m) => m,
        None => interface_mac(&o.interface)?,
    };
    let frame = template(o, src_mac);
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&frame[..HEADER_LEN]);
    let mask = o.flows - 1;
    let mut ebpf = EbpfLoader::new()
        .override_global("BENCH_HEADER", &header, true)
        .override_global("BENCH_FLOW_MASK", &mask, true)
        .load(OBJECT)
        .context("loading the generator")?;
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::BENCH_GEN_PROGRAM_NAME)
        .context("the generator program is missing from the object")?
        .try_into()?;
    prog.load().context("verifying the generator")?;
    let prog: &Xdp = prog;

    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    // Each call pays a fixed setup cost, so calls are large: a tenth of a second's worth
    // at a time, of the rate asked for or (without one) of the rate reached so far, so a
    // duration is overrun by a tenth of a second at most.
    let mut chunk: u64 = o.rate.map_or(100_000, |r| (r / 10).max(1));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut last_print = started;
    let mut sent_at_print = 0u64;
    loop {
        let elapsed = started.elapsed();
        if o.duration.is_some_and(|d| elapsed >= d) || o.count.is_some_and(|c| sent >= c) {
            break;
        }
        let mut n = chunk;
        if let Some(c) = o.count {
            n = n.min(c - sent);
        }
        let call = Instant::now();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = u32::try_from(n).unwrap_or(u32::MAX);
        opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
        prog.test_run(opts)
            .context("BPF_PROG_TEST_RUN with live frames")?;
        sent += n;
        if o.rate.is_none() {
            let pps = n as f64 / call.elapsed().as_secs_f64().max(1e-6);
            chunk = ((pps / 10.0) as u64).clamp(10_000, 10_000_000);
        }
        if let Some(rate) = o.rate {
            // Pace to the rate: wait until the frames sent so far are due.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let secs = last_print.elapsed().as_secs_f64();
            println!("{:>10.0} pps", (sent - sent_at_print) as f64 / secs);
            last_print = Instant::now();
            sent_at_print = sent;
        }
    }
    Ok(GenerateReport {
        frames: sent,
        seconds: started.elapsed().as_secs_f64(),
    })
}
