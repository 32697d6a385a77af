//! Benchmark-only programs: the live-frame generator and the sink that counts what comes
//! back. Only `cargo xtask bench` loads them (from the same object as `l3lb`).
//!
//! The generator runs under `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`: the
//! kernel hands it frames from a page pool it recycles without resetting their bytes, so
//! whatever the far side wrote (an IPIP header, say) is still there when a page comes
//! round again. The generator therefore writes the whole Ethernet + IPv4 + UDP (or TCP)
//! header into every frame, varying the flow per frame, and returns `XDP_TX` (out of the
//! interface given as the run's ingress interface).

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{DropReason, PROTO_IPIP, PROTO_TCP};
use network_types::eth::EthHdr;

use crate::{
    csum,
    parse::{eth::ETH_P_IP, ptr_at},
};

/// Bytes of the header template: Ethernet (14) + IPv4 without options (20) + TCP without
/// options (20); a UDP template holds its 8-byte header and 12 bytes of payload.
pub const HEADER_LEN: usize = 54;
const IP_OFF: usize = EthHdr::LEN;
/// Where the L4 header starts (its source port first, for UDP and TCP alike).
const L4_OFF: usize = IP_OFF + 20;

/// The header every generated frame starts with (IPv4 checksum ignored: it is computed
/// per frame); set by the bench at load time.
#[unsafe(no_mangle)]
static BENCH_HEADER: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// Number of distinct flows minus one (a power of two minus one); set at load time.
/// Flow `n` has source address template + `n >> 8` and source port template + `n & 0xff`.
#[unsafe(no_mangle)]
static BENCH_FLOW_MASK: u32 = 0;

/// Index in `BENCH`: frames the generator has written (its flow sequence).
pub const GENERATED: u32 = 0;
/// Index in `BENCH`: frames the sink saw carrying IPIP (what l3lb sends to a backend).
pub const SINK_IPIP: u32 = 1;
/// Index in `BENCH`: IPv4 frames the sink saw still addressed to the VIP (the floor's).
pub const SINK_TO_VIP: u32 = 2;
/// Index in `BENCH`: other IPv4 frames the sink saw (the VIP translated: the DNAT peer's).
pub const SINK_TRANSLATED: u32 = 3;
/// Index in `BENCH`: frames the sink saw that are not IPv4.
pub const SINK_OTHER: u32 = 4;

/// Generator sequence and sink counters, per CPU (indices above); written by the bench
/// programs, read by the bench. Not used by `l3lb`.
#[map(name = "L3LB_BENCH")]
static BENCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(5, 0);

#[inline(always)]
fn count(index: u32) -> u64 {
    match BENCH.get_ptr_mut(index) {
        Some(c) => unsafe {
            let n = *c;
            *c = n + 1;
            n
        },
        None => 0,
    }
}

/// The live-frame generator: writes the header template with this frame's flow and sends
/// the frame out (`XDP_TX`).
#[xdp]
pub fn l3lb_bench_gen(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Result<(), DropReason> {
    let frame: *mut [u8; HEADER_LEN] = ptr_at(ctx, 0)?;
    let mut h = unsafe { core::ptr::read_volatile(&BENCH_HEADER) };
    let mask = unsafe { core::ptr::read_volatile(&BENCH_FLOW_MASK) };
    let flow = (count(GENERATED) as u32) & mask;

    let src = u32::from_be_bytes([
        h[IP_OFF + 12],
        h[IP_OFF + 13],
        h[IP_OFF + 14],
        h[IP_OFF + 15],
    ])
    .wrapping_add(flow >> 8)
    .to_be_bytes();
    h[IP_OFF + 12..IP_OFF + 16].copy_from_slice(&src);
    let sport = u16::from_be_bytes([h[L4_OFF], h[L4_OFF + 1]])
        .wrapping_add((flow & 0xff) as u16)
        .to_be_bytes();
    h[L4_OFF..L4_OFF + 2].copy_from_slice(&sport);

    let mut ip = [0u8; 20];
    ip.copy_from_slice(&h[IP_OFF..L4_OFF]);
    ip[10] = 0;
    ip[11] = 0;
    let c = csum::ipv4_header(&ip);
    h[IP_OFF + 10] = c[0];
    h[IP_OFF + 11] = c[1];
    // A TCP template is a segment without payload (the IP length covers the header
    // alone; the rest of the frame is padding), so its checksum covers what is written
    // here: the pseudo-header and the 20-byte header, its checksum field zero in the
    // template. UDP goes without one (0 is allowed over IPv4).
    if h[IP_OFF + 9] == PROTO_TCP {
        let mut sum: u32 = u32::from(PROTO_TCP) + 20;
        let mut i = IP_OFF + 12;
        while i < IP_OFF + 20 {
            sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
            i += 2;
        }
        let mut i = L4_OFF;
        while i < L4_OFF + 20 {
            sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
            i += 2;
        }
        let c = csum::fold(sum);
        h[L4_OFF + 16] = c[0];
        h[L4_OFF + 17] = c[1];
    }
    unsafe { *frame = h };
    Ok(())
}

/// The sink: counts each frame by what it looks like, then drops it.
#[xdp]
pub fn l3lb_bench_sink(ctx: XdpContext) -> u32 {
    count(classify(&ctx));
    xdp_action::XDP_DROP
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return SINK_OTHER;
    };
    if unsafe { (*eth).ether_type } != ETH_P_IP {
        return SINK_OTHER;
    }
    let Ok(ip) = ptr_at::<[u8; 20]>(ctx, IP_OFF) else {
        return SINK_OTHER;
    };
    let (proto, dst) = unsafe { ((*ip)[9], [(*ip)[16], (*ip)[17], (*ip)[18], (*ip)[19]]) };
    let h = unsafe { core::ptr::read_volatile(&BENCH_HEADER) };
    let vip = [
        h[IP_OFF + 16],
        h[IP_OFF + 17],
        h[IP_OFF + 18],
        h[IP_OFF + 19],
    ];
    if proto == PROTO_IPIP {
        SINK_IPIP
    } else if dst == vip {
        SINK_TO_VIP
    } else {
        SINK_TRANSLATED
    }
}
