//! Fuzzes the real l3lb XDP program through `BPF_PROG_TEST_RUN` and checks, for every
//! frame, the data plane's promises:
//! - exactly one counter (a drop reason or an action) advances, by exactly one;
//! - the verdict agrees with it (drops drop, pass/local/decap pass, the rest transmit);
//! - passed frames are untouched; a decapsulated one is its input minus the outer header
//!   from an allowed source to this node;
//! - a forwarded frame (`XDP_TX`/`XDP_REDIRECT`) is a well-formed IPIP / IPv6-in-IPv6
//!   encapsulation or MAC rewrite of its input toward a backend of the VIP it was sent to,
//!   an echo reply, or a "too big" answer to the sender — and its input was well formed
//!   by this file's own reading of the headers, independent of the program's.
//!
//! The program is loaded once per process, in a network namespace of its own, with the
//! realistic configuration `fuzz/seeds/config/xdp-harness.yaml` (IPv4 and IPv6 services
//! in both modes, source ranges, client-IP affinity, an all-ports VIP, a local backend,
//! decap on with an allow list). Needs root.
//!
//! libFuzzer cannot see the BPF program's branches, so the harness feeds back what it can
//! observe — the outcome, the input's shape and where it came from — as extra coverage
//! counters. An input is a raw frame (first byte < 0x80) or a template frame (one of a
//! few valid frames for each service and role) followed by 4-byte edits, so mutations
//! start from packets that reach deep into the program.
#![no_main]

#[path = "../../lb-userspace/tests/common/mod.rs"]
mod common;

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU8, Ordering},
};

use aya::maps::{MapData, PerCpuArray};
use common::*;
use l3lb::{
    agent::{self, EncapSources},
    config::{Config, Forwarding},
    dataplane::Dataplane,
};
use lb_common::{
    ACTION_COUNT, Action, DROP_REASON_COUNT, DropReason, PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP,
    PROTO_IPV6, PROTO_TCP, PROTO_UDP, map_names,
};
use libfuzzer_sys::fuzz_target;

/// The configuration under test (also a seed of the `config` target).
const CONFIG: &str = include_str!("../seeds/config/xdp-harness.yaml");

const XDP_REDIRECT: u32 = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// Extra coverage for libFuzzer: one byte per (outcome, input shape) bucket.
#[used]
#[unsafe(link_section = "__libfuzzer_extra_counters")]
static OUTCOME_FEATURES: [AtomicU8; 4096] = [const { AtomicU8::new(0) }; 4096];

/// What the harness knows about one VIP address, from the config.
struct VipFacts {
    /// Its services forward by MAC rewrite.
    l2: bool,
    /// Backends of the services at this address.
    backends: Vec<IpAddr>,
}

/// The loaded program and the facts to check its output against.
struct Harness {
    dp: Dataplane,
    ifindex: u32,
    vips: HashMap<IpAddr, VipFacts>,
    decap_allow: Vec<ipnet::IpNet>,
    /// This node's addresses (the only outer destinations decapsulated).
    local: HashSet<IpAddr>,
    /// Each remote backend's neighbour MAC in the test namespace.
    macs: HashMap<IpAddr, [u8; 6]>,
    templates: Vec<Vec<u8>>,
}

thread_local! {
    // Namespaces are per thread: the program runs on the thread that entered the
    // namespace, which is libFuzzer's (it calls the target from one thread).
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

impl Harness {
    fn new() -> Self {
        let ifindex = enter_namespace();
        let cfg = Config::parse(CONFIG).expect("the harness config parses");
        let local: HashSet<IpAddr> = [IpAddr::V4(NODE), IpAddr::V6(NODE6)].into();
        let desired = agent::desired_from_config(&cfg, &local, &HashSet::new());
        let opts = agent::load_options(
            &cfg,
            EncapSources {
                v4: NODE,
                v6: NODE6,
            },
        );
        let mut dp = Dataplane::load(&opts).expect("load the XDP program (are we root?)");
        dp.apply(&desired).expect("apply the harness config");
        let mut vips: HashMap<IpAddr, VipFacts> = HashMap::new();
        for s in &cfg.services {
            let facts = vips.entry(s.vip).or_insert(VipFacts {
                l2: s.forwarding == Forwarding::L2,
                backends: Vec::new(),
            });
            facts.backends.extend(s.backends.iter().map(|b| b.address));
        }
        let macs = [
            (IpAddr::V4(B1), B1_MAC),
            (IpAddr::V4(B2), B2_MAC),
            (IpAddr::V4(B3), B3_MAC),
            (IpAddr::V6(B1_6), B1_MAC),
            (IpAddr::V6(B2_6), B2_MAC),
            (IpAddr::V6(B3_6), B3_MAC),
        ]
        .into();
        Harness {
            dp,
            ifindex,
            vips,
            decap_allow: cfg.decap.allow.clone(),
            local,
            macs,
            templates: templates(),
        }
    }

    /// Every drop reason's count, then every action's, summed over CPUs.
    fn counts(&self) -> Vec<u64> {
        let mut counts = Vec::with_capacity((DROP_REASON_COUNT + ACTION_COUNT) as usize);
        for (name, n) in [
            (map_names::DROPS, DROP_REASON_COUNT),
            (map_names::ACTIONS, ACTION_COUNT),
        ] {
            let map: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(self.dp.map(name).expect("counter map"))
                    .expect("per-CPU u64 array");
            for i in 0..n {
                counts.push(map.get(&i, 0).expect("read counter").iter().sum());
            }
        }
        counts
    }

    /// Runs one frame and checks every invariant; panics (a libFuzzer crash) on a breach.
    fn check(&self, frame: &[u8], origin: usize) {
        let before = self.counts();
        let run = l3lb::testing::run_xdp(self.dp.program().expect("program"), self.ifindex, frame)
            .expect("BPF_PROG_TEST_RUN accepts frames of 14 bytes and more");
        let after = self.counts();
        let moved: Vec<usize> = (0..before.len())
            .filter(|&i| after[i] != before[i])
            .collect();
        let total = |v: &[u64]| v.iter().sum::<u64>();
        assert!(
            moved.len() == 1 && total(&after) == total(&before) + 1,
            "exactly one counter must advance by one; moved {moved:?} (before {before:?}, after {after:?})"
        );
        let index = moved[0];
        let shape = Shape::of(frame);
        feature(index, run.verdict, origin, &shape);
        let out = &run.frame;
        if index < DROP_REASON_COUNT as usize {
            assert_eq!(
                run.verdict,
                XDP_DROP,
                "counted as drop {:?} but the verdict is {}",
                DropReason::ALL[index],
                run.verdict
            );
            return;
        }
        let action = Action::ALL[index - DROP_REASON_COUNT as usize];
        match action {
            Action::Pass => {
                assert_eq!(run.verdict, XDP_PASS, "pass with verdict {}", run.verdict);
                assert_eq!(out, frame, "a passed frame must be untouched");
            }
            Action::Local => {
                assert_eq!(run.verdict, XDP_PASS, "local with verdict {}", run.verdict);
                assert_eq!(out, frame, "a frame for a local backend must be untouched");
                let p = self.well_formed_to_vip(frame, action);
                assert!(
                    self.vips[&p.dst]
                        .backends
                        .iter()
                        .any(|b| self.local.contains(b)),
                    "local delivery for {} which has no local backend",
                    p.dst
                );
            }
            Action::Decap => self.check_decap(frame, run.verdict, out),
            Action::Encap => self.check_encap(frame, run.verdict, out),
            Action::L2 => self.check_l2(frame, run.verdict, out),
            Action::EchoReply => self.check_echo_reply(frame, run.verdict, out),
            Action::TooBig => self.check_too_big(frame, run.verdict, out),
        }
    }

    /// The input of a forwarding action: well formed, to a VIP, not from it.
    fn well_formed_to_vip(&self, frame: &[u8], action: Action) -> Parsed {
        let p = parse(frame)
            .unwrap_or_else(|why| panic!("{action:?} for a malformed frame ({why}): {frame:02x?}"));
        assert!(
            self.vips.contains_key(&p.dst),
            "{action:?} for {}, which is not a VIP",
            p.dst
        );
        assert_ne!(
            p.src, p.dst,
            "{action:?} for a packet from the VIP to itself"
        );
        p
    }

    fn check_encap(&self, frame: &[u8], verdict: u32, out: &[u8]) {
        assert!(
            verdict == XDP_TX || verdict == XDP_REDIRECT,
            "encap with verdict {verdict}"
        );
        let p = self.well_formed_to_vip(frame, Action::Encap);
        let facts = &self.vips[&p.dst];
        assert!(!facts.l2, "IPIP for an l2 VIP {}", p.dst);
        let inner = &frame[p.l3_off..];
        let (outer_len, backend) = if p.v6 {
            assert_eq!(
                &out[12..14],
                &ETHERTYPE_IPV6.to_be_bytes(),
                "outer EtherType"
            );
            let h = &out[14..54];
            assert_eq!(h[0] >> 4, 6, "outer version");
            assert_eq!(
                usize::from(u16::from_be_bytes([h[4], h[5]])),
                p.l3_len,
                "outer payload length = the inner packet's length"
            );
            assert_eq!(h[6], PROTO_IPV6, "outer next header");
            assert_eq!(h[7], 64, "outer hop limit");
            assert_eq!(&h[8..24], &NODE6.octets(), "outer source");
            let dst: [u8; 16] = h[24..40].try_into().expect("16 bytes");
            (40, IpAddr::V6(Ipv6Addr::from(dst)))
        } else {
            assert_eq!(
                &out[12..14],
                &ETHERTYPE_IPV4.to_be_bytes(),
                "outer EtherType"
            );
            let h = &out[14..34];
            assert_eq!(h[0], 0x45, "outer version and IHL");
            assert_eq!(
                usize::from(u16::from_be_bytes([h[2], h[3]])),
                p.l3_len + 20,
                "outer total length"
            );
            assert!(
                h[6] & 0xbf == 0 && h[7] == 0,
                "outer flags: DF at most, never a fragment"
            );
            assert_eq!(h[6] & 0x40, frame[p.l3_off + 6] & 0x40, "DF copied");
            assert_eq!(h[8], 64, "outer TTL");
            assert_eq!(h[9], PROTO_IPIP, "outer protocol");
            assert_eq!(csum(h), [0, 0], "outer header checksum");
            assert_eq!(&h[12..16], &NODE.octets(), "outer source");
            (20, IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])))
        };
        assert!(
            facts.backends.contains(&backend),
            "encapsulated to {backend}, not a backend of {}",
            p.dst
        );
        assert_eq!(
            &out[0..6],
            &self.macs[&backend],
            "destination MAC of {backend}"
        );
        assert_eq!(&out[6..12], &NODE_MAC, "source MAC");
        assert_eq!(
            &out[14 + outer_len..],
            inner,
            "the inner packet is carried unchanged"
        );
    }

    fn check_l2(&self, frame: &[u8], verdict: u32, out: &[u8]) {
        assert!(
            verdict == XDP_TX || verdict == XDP_REDIRECT,
            "l2 with verdict {verdict}"
        );
        let p = self.well_formed_to_vip(frame, Action::L2);
        let facts = &self.vips[&p.dst];
        assert!(facts.l2, "MAC rewrite for an ipip VIP {}", p.dst);
        assert_eq!(out.len(), frame.len(), "MAC rewrite keeps the length");
        assert_eq!(
            &out[12..],
            &frame[12..],
            "MAC rewrite changes only the MACs"
        );
        assert_eq!(&out[6..12], &NODE_MAC, "source MAC");
        assert!(
            facts
                .backends
                .iter()
                .any(|b| self.macs.get(b) == Some(&<[u8; 6]>::try_from(&out[0..6]).expect("6"))),
            "destination MAC {:02x?} is no backend of {}",
            &out[0..6],
            p.dst
        );
    }

    fn check_echo_reply(&self, frame: &[u8], verdict: u32, out: &[u8]) {
        assert_eq!(verdict, XDP_TX, "echo reply with verdict {verdict}");
        let p = self.well_formed_to_vip(frame, Action::EchoReply);
        let (icmp, request, reply) = if p.v6 {
            (PROTO_ICMPV6, 128, 129)
        } else {
            (PROTO_ICMP, 8, 0)
        };
        assert!(
            p.proto == icmp && !p.fragment && frame[p.l4_off] == request,
            "echo reply to something other than an echo request"
        );
        assert_eq!(out.len(), frame.len(), "the reply has the request's length");
        assert_eq!(&out[0..6], &frame[6..12], "reply to the sender's MAC");
        assert_eq!(&out[6..12], &frame[0..6], "reply from our MAC");
        let reread = parse(out).expect("the echo reply is well formed");
        assert_eq!(
            (reread.src, reread.dst),
            (p.dst, p.src),
            "addresses swapped"
        );
        assert_eq!(out[p.l4_off], reply, "echo reply type");
    }

    fn check_too_big(&self, frame: &[u8], verdict: u32, out: &[u8]) {
        assert_eq!(verdict, XDP_TX, "too big with verdict {verdict}");
        let p = self.well_formed_to_vip(frame, Action::TooBig);
        assert_eq!(&out[0..6], &frame[6..12], "answer to the sender's MAC");
        assert_eq!(&out[6..12], &frame[0..6], "answer from our MAC");
        let a = parse(out).expect("the too-big answer is well formed");
        assert_eq!((a.src, a.dst), (p.dst, p.src), "from the VIP to the sender");
        assert_eq!(
            a.l3_off + a.l3_len,
            out.len(),
            "no padding after the answer"
        );
        if p.v6 {
            assert_eq!(
                (a.proto, out[a.l4_off]),
                (PROTO_ICMPV6, 2),
                "packet too big"
            );
        } else {
            assert_eq!(
                (a.proto, out[a.l4_off], out[a.l4_off + 1]),
                (PROTO_ICMP, 3, 4),
                "fragmentation needed"
            );
            assert_eq!(csum(&out[a.l4_off..]), [0, 0], "ICMP checksum");
        }
    }

    fn check_decap(&self, frame: &[u8], verdict: u32, out: &[u8]) {
        assert_eq!(verdict, XDP_PASS, "decap with verdict {verdict}");
        let p = parse(frame)
            .unwrap_or_else(|why| panic!("decapsulated a malformed outer packet ({why})"));
        assert!(
            p.proto == PROTO_IPIP && !p.v6 || p.proto == PROTO_IPV6 && p.v6,
            "decapsulated protocol {}",
            p.proto
        );
        assert!(!p.fragment, "decapsulated a fragment");
        assert!(
            self.local.contains(&p.dst),
            "decapsulated a packet for {}, not this node",
            p.dst
        );
        assert!(
            self.decap_allow.iter().any(|n| n.contains(&p.src)),
            "decapsulated a packet from {}, off the allow list",
            p.src
        );
        let inner = &frame[p.l4_off..p.l3_off + p.l3_len];
        if p.v6 {
            assert!(
                inner.len() >= 40
                    && inner[0] >> 4 == 6
                    && usize::from(u16::from_be_bytes([inner[4], inner[5]])) + 40 == inner.len(),
                "decapsulated a malformed inner IPv6 header"
            );
        } else {
            assert!(inner.len() >= 20, "decapsulated a cut inner header");
            let ihl = usize::from(inner[0] & 0x0f) * 4;
            let tot = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
            assert!(
                inner[0] >> 4 == 4 && ihl >= 20 && ihl <= tot && tot == inner.len(),
                "decapsulated a malformed inner IPv4 header"
            );
        }
        let want = [&frame[..p.l3_off], &frame[p.l4_off..]].concat();
        assert_eq!(out, &want[..], "decap removes exactly the outer header");
    }
}

/// An IP packet as this harness reads it, independently of the program.
struct Parsed {
    l3_off: usize,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    /// L3 length from the header's own length field.
    l3_len: usize,
    /// Upper-layer protocol after any IPv6 extension headers.
    proto: u8,
    /// Offset of the upper-layer header (for IPIP: the inner header).
    l4_off: usize,
    fragment: bool,
}

fn be16(f: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([f[at], f[at + 1]]))
}

/// Reads a frame the way RFCs 791, 8200, 793 and 768 describe it: at most two VLAN tags,
/// a valid IP header whose length fits the frame, at most six IPv6 extension headers, and
/// a complete upper-layer header inside the IP length (ICMP errors: a quote holding the
/// quoted header and ports). Errors name the first problem.
fn parse(f: &[u8]) -> Result<Parsed, String> {
    if f.len() < 14 {
        return Err("runt".into());
    }
    let mut ethertype = be16(f, 12) as u16;
    let mut l3 = 14;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        if f.len() < l3 + 4 {
            return Err("VLAN tag cut".into());
        }
        ethertype = be16(f, l3 + 2) as u16;
        l3 += 4;
    }
    let (v6, src, dst, l3_len, mut proto, mut l4, mut fragment, mut later);
    // A fragment's reassembly facts: where its data starts, the bytes of the datagram
    // before its fragmentable part (IPv4: the shortest header; IPv6: the extension
    // headers before the fragment header), its offset in bytes, more to follow.
    let mut reassembly = (0, 0, 0, false);
    match ethertype {
        ETHERTYPE_IPV4 => {
            let ip = f.get(l3..l3 + 20).ok_or("IPv4 header cut")?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err("IPv4 version or IHL".into());
            }
            l3_len = be16(ip, 2);
            if l3_len < ihl || l3 + l3_len > f.len() {
                return Err("IPv4 total length".into());
            }
            v6 = false;
            src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            proto = ip[9];
            l4 = l3 + ihl;
            let frags = be16(ip, 6);
            fragment = frags & 0x3fff != 0;
            later = frags & 0x1fff != 0;
            reassembly = (l4, 20, (frags & 0x1fff) * 8, frags & 0x2000 != 0);
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(l3..l3 + 40).ok_or("IPv6 header cut")?;
            let plen = be16(ip, 4);
            if ip[0] >> 4 != 6 || plen == 0 && ip[6] == 0 || l3 + 40 + plen > f.len() {
                return Err("IPv6 version or payload length".into());
            }
            v6 = true;
            let a = |o: usize| {
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&ip[o..o + 16]).expect("16"),
                ))
            };
            src = a(8);
            dst = a(24);
            l3_len = 40 + plen;
            proto = ip[6];
            l4 = l3 + 40;
            fragment = false;
            later = false;
            let end = l3 + l3_len;
            let mut walked = 0;
            while matches!(proto, 0 | 43 | 44 | 51 | 60) {
                if walked == 6 {
                    return Err("extension chain longer than six".into());
                }
                walked += 1;
                let len = match proto {
                    44 => 8,
                    51 => (usize::from(*f.get(l4 + 1).ok_or("AH cut")?) + 2) * 4,
                    _ => (usize::from(*f.get(l4 + 1).ok_or("extension header cut")?) + 1) * 8,
                };
                if l4 + len.max(8) > end {
                    return Err("extension header past the payload".into());
                }
                if proto == 44 {
                    if fragment {
                        return Err("two fragment headers".into());
                    }
                    fragment = true;
                    let offset = be16(f, l4 + 2);
                    later = offset >> 3 != 0;
                    reassembly = (l4 + 8, l4 - l3 - 40, offset >> 3 << 3, offset & 1 != 0);
                }
                proto = f[l4];
                l4 += len;
                // A later fragment's data is no headers.
                if later {
                    break;
                }
            }
        }
        _ => return Err("not IP".into()),
    }
    let end = l3 + l3_len;
    if fragment {
        // RFC 791, RFC 8200 4.5: data, in multiples of 8 bytes unless the last, inside the
        // largest datagram.
        let (data_at, before, offset, more) = reassembly;
        let data = end.saturating_sub(data_at);
        if data == 0 || more && data & 7 != 0 || before + offset + data > 65535 {
            return Err("fragment length or offset".into());
        }
    }
    let need = |n: usize| -> Result<(), String> {
        if l4 + n > end {
            Err(format!("protocol {proto} header cut"))
        } else {
            Ok(())
        }
    };
    if later {
        // No upper-layer header in a later fragment.
    } else if fragment {
        // A first fragment is balanced on its ports (TCP, UDP), which it must hold.
        if proto == PROTO_TCP || proto == PROTO_UDP {
            need(4)?;
        }
    } else if proto == PROTO_TCP {
        need(20)?;
        let doff = usize::from(f[l4 + 12] >> 4) * 4;
        if doff < 20 || l4 + doff > end {
            return Err("TCP data offset".into());
        }
    } else if proto == PROTO_UDP {
        need(8)?;
        let len = be16(f, l4 + 4);
        if len < 8 || l4 + len > end {
            return Err("UDP length".into());
        }
    } else if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        need(8)?;
        let error = if v6 {
            matches!(f[l4], 1 | 2)
        } else {
            f[l4] == 3
        };
        if error {
            let q = l4 + 8;
            let quoted_len = if v6 {
                40
            } else {
                need(8 + 20)?;
                usize::from(f[q] & 0x0f) * 4
            };
            if quoted_len < 20 || q + quoted_len + 4 > end {
                return Err("ICMP error quote cut".into());
            }
        }
    }
    Ok(Parsed {
        l3_off: l3,
        v6,
        src,
        dst,
        l3_len,
        proto,
        l4_off: l4,
        fragment,
    })
}

/// The coarse shape of an input: what libFuzzer is told besides the outcome.
struct Shape {
    ethertype: u16,
    vlans: u8,
    proto: u8,
    well_formed: bool,
}

impl Shape {
    fn of(f: &[u8]) -> Self {
        let p = parse(f);
        let vlans = (f.len() >= 14 && matches!(be16(f, 12), 0x8100 | 0x88a8)) as u8
            + (f.len() >= 18
                && matches!(be16(f, 12), 0x8100 | 0x88a8)
                && matches!(be16(f, 16), 0x8100 | 0x88a8)) as u8;
        Shape {
            ethertype: if f.len() >= 14 { be16(f, 12) as u16 } else { 0 },
            vlans,
            proto: p.as_ref().map_or(0, |p| p.proto),
            well_formed: p.is_ok(),
        }
    }
}

/// Marks the (outcome, verdict, origin, shape) bucket in libFuzzer's extra counters.
fn feature(outcome: usize, verdict: u32, origin: usize, shape: &Shape) {
    let mut h = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().build_hasher();
    h.write_usize(outcome);
    h.write_u32(verdict);
    h.write_usize(origin);
    h.write_u16(shape.ethertype);
    h.write_u8(shape.vlans);
    h.write_u8(shape.proto);
    h.write_u8(shape.well_formed as u8);
    let i = (h.finish() as usize) % OUTCOME_FEATURES.len();
    OUTCOME_FEATURES[i].fetch_add(1, Ordering::Relaxed);
}

/// Valid frames for every service and role: starting points for the edits.
fn templates() -> Vec<Vec<u8>> {
    let vip = Ipv4Addr::new(192, 0, 2, 10);
    let dns = Ipv4Addr::new(192, 0, 2, 20);
    let all = Ipv4Addr::new(192, 0, 2, 30);
    let local = Ipv4Addr::new(192, 0, 2, 40);
    let vip6 = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
    let dns6 = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x20);
    let v4 = |vlans: &[u16], ip: Vec<u8>| eth(NODE_MAC, CLIENT_MAC, vlans, ETHERTYPE_IPV4, &ip);
    let v6 = |ip: Vec<u8>| eth(NODE_MAC, CLIENT_MAC, &[], ETHERTYPE_IPV6, &ip);
    let icmp = |mut m: Vec<u8>| {
        let c = csum(&m);
        m[2..4].copy_from_slice(&c);
        m
    };
    let reply = ipv4(vip, CLIENT, PROTO_TCP, &[], &tcp(80, 40000, ACK, b""), true);
    let mut err = vec![3, 4, 0, 0, 0, 0, 5, 0];
    err.extend_from_slice(&reply[..28]);
    let reply6 = ipv6(vip6, CLIENT6, PROTO_TCP, &tcp(80, 40000, ACK, b""));
    let mut ptb = vec![2, 0, 0, 0, 0, 0, 5, 0];
    ptb.extend_from_slice(&reply6);
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
    let mut first = ipv4(CLIENT, dns, PROTO_UDP, &[], &udp(5353, 53, &[1; 16]), false);
    first[6] = 0x20;
    let mut later = ipv4(CLIENT, all, PROTO_TCP, &[], &[2; 16], false);
    later[7] = 3;
    for ip in [&mut first, &mut later] {
        ip[10] = 0;
        ip[11] = 0;
        let c = csum(&ip[..20]);
        ip[10..12].copy_from_slice(&c);
    }
    let inner = ipv4(
        CLIENT,
        vip,
        PROTO_TCP,
        &[],
        &tcp(40000, 80, ACK, b"data"),
        true,
    );
    let inner6 = ipv6(CLIENT6, vip6, PROTO_TCP, &tcp(40000, 80, ACK, b"data"));
    let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0, PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&tcp(40001, 443, SYN, b"x"));
    vec![
        v4(
            &[],
            ipv4(
                CLIENT,
                vip,
                PROTO_TCP,
                &[],
                &tcp(40000, 80, SYN, b"hello"),
                true,
            ),
        ),
        v4(
            &[7],
            ipv4(
                CLIENT,
                vip,
                PROTO_TCP,
                &[1, 1, 1, 0],
                &tcp(40000, 443, ACK, b""),
                false,
            ),
        ),
        v4(
            &[],
            ipv4(CLIENT, dns, PROTO_UDP, &[], &udp(5353, 53, b"query"), false),
        ),
        v4(
            &[7, 8],
            ipv4(
                Ipv4Addr::new(198, 51, 100, 200),
                dns,
                PROTO_UDP,
                &[],
                &udp(1, 53, b"q"),
                false,
            ),
        ),
        v4(
            &[],
            ipv4(
                CLIENT,
                all,
                PROTO_TCP,
                &[],
                &tcp(1234, 8080, SYN, b""),
                true,
            ),
        ),
        v4(
            &[],
            ipv4(
                CLIENT,
                local,
                PROTO_TCP,
                &[],
                &tcp(1234, 80, SYN, b""),
                true,
            ),
        ),
        v4(
            &[],
            ipv4(
                CLIENT,
                vip,
                PROTO_ICMP,
                &[],
                &icmp(vec![8, 0, 0, 0, 0, 1, 0, 1, b'p']),
                false,
            ),
        ),
        v4(
            &[],
            ipv4(
                Ipv4Addr::new(198, 51, 100, 1),
                vip,
                PROTO_ICMP,
                &[],
                &icmp(err),
                false,
            ),
        ),
        v4(&[], first),
        v4(&[], later),
        v4(
            &[],
            ipv4(
                CLIENT,
                vip,
                PROTO_TCP,
                &[],
                &tcp(7, 80, ACK, &[0; 1460]),
                true,
            ),
        ),
        v6(ipv6(
            CLIENT6,
            vip6,
            PROTO_TCP,
            &tcp(40000, 80, SYN, b"hello"),
        )),
        v6(ipv6(CLIENT6, vip6, 0, &ext)),
        v6(ipv6(CLIENT6, dns6, PROTO_UDP, &udp(5353, 53, b"query"))),
        v6(ipv6(
            CLIENT6,
            vip6,
            PROTO_ICMPV6,
            &icmp6(CLIENT6, vip6, &[128, 0, 0, 0, 0, 1, 0, 1]),
        )),
        v6(ipv6(
            router6,
            vip6,
            PROTO_ICMPV6,
            &icmp6(router6, vip6, &ptb),
        )),
        v6(ipv6(CLIENT6, vip6, PROTO_TCP, &tcp(7, 80, ACK, &[0; 1440]))),
        eth(
            NODE_MAC,
            B1_MAC,
            &[],
            ETHERTYPE_IPV4,
            &ipv4(BALANCER, NODE, PROTO_IPIP, &[], &inner, true),
        ),
        eth(
            NODE_MAC,
            B1_MAC,
            &[5],
            ETHERTYPE_IPV4,
            &ipv4(
                Ipv4Addr::new(10, 1, 0, 3),
                NODE,
                PROTO_IPIP,
                &[],
                &inner,
                true,
            ),
        ),
        eth(
            NODE_MAC,
            B1_MAC,
            &[],
            ETHERTYPE_IPV6,
            &ipv6(BALANCER6, NODE6, PROTO_IPV6, &inner6),
        ),
        eth([0xff; 6], CLIENT_MAC, &[], 0x0806, &[0; 28]),
    ]
}

/// Recomputes the length fields (and the IPv4 header checksum) of the frame's IP header so
/// the packet fills the frame: reaches inputs that are consistent but unusual.
fn fit_lengths(f: &mut [u8]) {
    if f.len() < 14 {
        return;
    }
    let mut l3 = 14;
    let mut ethertype = be16(f, 12);
    for _ in 0..2 {
        if !matches!(ethertype, 0x8100 | 0x88a8) || f.len() < l3 + 4 {
            break;
        }
        ethertype = be16(f, l3 + 2);
        l3 += 4;
    }
    let n = f.len() - l3;
    if ethertype == usize::from(ETHERTYPE_IPV4) && n >= 20 {
        f[l3 + 2..l3 + 4].copy_from_slice(&(n.min(65535) as u16).to_be_bytes());
        let hl = (usize::from(f[l3] & 0x0f) * 4).clamp(20, n);
        f[l3 + 10] = 0;
        f[l3 + 11] = 0;
        let c = csum(&f[l3..l3 + hl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c);
    } else if ethertype == usize::from(ETHERTYPE_IPV6) && n >= 40 {
        f[l3 + 4..l3 + 6].copy_from_slice(&((n - 40).min(65535) as u16).to_be_bytes());
    }
}

/// Applies 4-byte edits `[op, position (2 bytes), value]` to a template.
fn edit(f: &mut Vec<u8>, edits: &[u8]) {
    for e in edits.chunks_exact(4) {
        let pos = usize::from(u16::from_be_bytes([e[1], e[2]]));
        let len = f.len();
        let at = pos % (len + 1);
        match e[0] % 5 {
            0 if len > 0 => f[at % len] = e[3],
            1 => f.truncate(at),
            2 => f.insert(at, e[3]),
            3 => fit_lengths(f),
            4 if len > 0 => f[at % len] ^= e[3],
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        let h = slot.get_or_insert_with(Harness::new);
        let (frame, origin) = if mode < 0x80 {
            (rest.to_vec(), 0)
        } else {
            let i = usize::from(mode & 0x7f) % h.templates.len();
            let mut f = h.templates[i].clone();
            edit(&mut f, rest);
            (f, 1 + i)
        };
        // The kernel refuses shorter input (malformed.rs tests that), as NICs drop runts.
        if frame.len() < 14 {
            return;
        }
        h.check(&frame, origin);
    });
});
