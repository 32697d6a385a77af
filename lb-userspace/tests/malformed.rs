//! The malformed-input matrix: the real XDP object through `BPF_PROG_TEST_RUN`, one table
//! of cases (description, frame, expected verdict and drop reason, or "passed unchanged"),
//! each checked for its verdict, its output bytes and the one counter it must advance.
//!
//! Nothing malformed is ever forwarded: every case here is dropped with a counted reason
//! or passed to the stack untouched, except the few well-formed boundary cases (link
//! padding, the longest extension chain walked), which are forwarded exactly. The README's
//! "Malformed input" table says the same in prose. Needs root.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use common::*;
use lb_common::{
    Action, DROP_REASON_COUNT, DropReason, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

/// What a case must come to.
enum Expect {
    /// `XDP_DROP`, frame untouched, this reason's counter up by one.
    Drop(DropReason),
    /// `XDP_PASS`, frame untouched, the `pass` counter up by one.
    PassUnchanged,
    /// `XDP_TX` with exactly these bytes, this action's counter up by one.
    Tx(Action, Vec<u8>),
}

/// One row of the matrix.
struct Case {
    what: String,
    frame: Vec<u8>,
    expect: Expect,
}

/// The table being built.
#[derive(Default)]
struct Matrix(Vec<Case>);

impl Matrix {
    fn drops(&mut self, what: impl Into<String>, frame: Vec<u8>, reason: DropReason) {
        self.0.push(Case {
            what: what.into(),
            frame,
            expect: Expect::Drop(reason),
        });
    }

    fn passes(&mut self, what: impl Into<String>, frame: Vec<u8>) {
        self.0.push(Case {
            what: what.into(),
            frame,
            expect: Expect::PassUnchanged,
        });
    }

    fn forwards(&mut self, what: impl Into<String>, frame: Vec<u8>, action: Action, out: Vec<u8>) {
        self.0.push(Case {
            what: what.into(),
            frame,
            expect: Expect::Tx(action, out),
        });
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// The fixture every case runs against: the standard services, the decap role on with
/// `BALANCER` (IPv4) and `BALANCER6` (IPv6) allowed.
fn fixture() -> Fixture {
    let mut desired = standard_desired();
    desired.decap_v4 = vec![(BALANCER, 32)];
    desired.decap_v6 = vec![(BALANCER6, 128)];
    Fixture::new(true, &desired)
}

/// Recomputes an IPv4 header checksum after an edit (any IHL, even a bad one).
fn refresh_v4_checksum(ip: &mut [u8]) {
    let hl = (usize::from(ip[0] & 0x0f) * 4).clamp(20, ip.len());
    ip[10] = 0;
    ip[11] = 0;
    let c = csum(&ip[..hl]);
    ip[10..12].copy_from_slice(&c);
}

/// `frame` (L3 at `l3_off`) with its IP length field set to `n` bytes of L3 (IPv4 total
/// length, or IPv6 payload length + 40); the frame is cut there unless `keep_padding`,
/// in which case the bytes after the packet stay as link padding.
fn with_l3_len(frame: &[u8], l3_off: usize, n: usize, keep_padding: bool) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ethertype = u16::from_be_bytes([f[l3_off - 2], f[l3_off - 1]]);
    if ethertype == ETHERTYPE_IPV4 {
        f[l3_off + 2..l3_off + 4].copy_from_slice(&(n as u16).to_be_bytes());
        refresh_v4_checksum(&mut f[l3_off..]);
    } else {
        f[l3_off + 4..l3_off + 6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
    }
    if !keep_padding {
        f.truncate(l3_off + n);
    }
    f
}

/// Truncation of the frame at every length from the Ethernet header to one byte short:
/// inside the link or IP header the frame ends where a header was announced (`truncated`);
/// after it, the IP length field claims more than the frame holds (`bad_ip_header`).
fn frame_cuts(m: &mut Matrix, what: &str, frame: &[u8], l3_off: usize, ip_hdr_len: usize) {
    for len in 14..frame.len() {
        let reason = if len < l3_off + ip_hdr_len {
            DropReason::Truncated
        } else {
            DropReason::BadIpHeader
        };
        m.drops(
            format!("{what}: frame cut at {len} bytes"),
            frame[..len].to_vec(),
            reason,
        );
    }
}

/// Truncation of the IP packet at every L3 length in `lens`, the length field agreeing
/// (so the IP header itself is valid), both with the frame cut there and with the rest of
/// the frame left behind as link padding: the header the packet ends in is what counts,
/// never the padding after it.
fn packet_cuts(
    m: &mut Matrix,
    what: &str,
    frame: &[u8],
    l3_off: usize,
    lens: std::ops::Range<usize>,
    reason: impl Fn(usize) -> DropReason,
) {
    for n in lens {
        for padded in [false, true] {
            m.drops(
                format!(
                    "{what}: IP length {n}{}",
                    if padded {
                        ", rest of frame as padding"
                    } else {
                        ""
                    }
                ),
                with_l3_len(frame, l3_off, n, padded),
                reason(n),
            );
        }
    }
}

fn v4_frame(vlans: &[u16], ip: &[u8]) -> Vec<u8> {
    eth(NODE_MAC, CLIENT_MAC, vlans, ETHERTYPE_IPV4, ip)
}

fn v6_frame_tagged(vlans: &[u16], ip: &[u8]) -> Vec<u8> {
    eth(NODE_MAC, CLIENT_MAC, vlans, ETHERTYPE_IPV6, ip)
}

/// An ICMP message with its checksum filled in.
fn icmp4(msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2] = 0;
    m[3] = 0;
    let c = csum(&m);
    m[2..4].copy_from_slice(&c);
    m
}

/// "Fragmentation needed" from a router to the VIP, quoting `quote`.
fn icmp4_error(quote: &[u8]) -> Vec<u8> {
    let mut msg = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
    msg.extend_from_slice(quote);
    ipv4(
        Ipv4Addr::new(198, 51, 100, 1),
        VIP,
        PROTO_ICMP,
        &[],
        &icmp4(&msg),
        false,
    )
}

/// "Packet too big" from a router to the IPv6 VIP, quoting `quote`.
fn icmp6_error(quote: &[u8]) -> Vec<u8> {
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
    let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    msg.extend_from_slice(quote);
    ipv6(router, VIP6, PROTO_ICMPV6, &icmp6(router, VIP6, &msg))
}

/// The backend's reply that a router on the way back to the client complains about.
fn quoted_reply_v4() -> Vec<u8> {
    ipv4(VIP, CLIENT, PROTO_TCP, &[], &tcp(80, 40000, ACK, b""), true)
}

fn quoted_reply_v6() -> Vec<u8> {
    ipv6(VIP6, CLIENT6, PROTO_TCP, &tcp(80, 40000, ACK, b""))
}

/// Truncation everywhere, in every family and framing the balancer and the decap role
/// accept.
fn truncation_cases(m: &mut Matrix) {
    let tcp4 = ipv4(
        CLIENT,
        VIP,
        PROTO_TCP,
        &[],
        &tcp(40000, 80, SYN, b"hello"),
        true,
    );
    let udp4 = ipv4(
        CLIENT,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(5353, 53, b"query"),
        false,
    );
    let echo4 = ipv4(
        CLIENT,
        VIP,
        PROTO_ICMP,
        &[],
        &icmp4(&[8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g']),
        false,
    );
    let err4 = icmp4_error(&quoted_reply_v4());
    let opts4 = ipv4(
        CLIENT,
        VIP,
        PROTO_TCP,
        &[1, 1, 1, 0, 1, 1, 1, 0],
        &tcp(40000, 80, SYN, b""),
        true,
    );
    for (what, ip, l4_hdr) in [
        ("IPv4 TCP", &tcp4, 20),
        ("IPv4 UDP", &udp4, 8),
        ("IPv4 ICMP echo", &echo4, 8),
        ("IPv4 ICMP error", &err4, 8),
    ] {
        for vlans in [&[][..], &[7][..], &[7, 8][..]] {
            let frame = v4_frame(vlans, ip);
            let what = format!("{what}, {} VLAN tag(s)", vlans.len());
            let l3 = 14 + 4 * vlans.len();
            frame_cuts(m, &what, &frame, l3, 20);
            packet_cuts(m, &what, &frame, l3, 20..20 + l4_hdr, |_| {
                DropReason::Truncated
            });
        }
    }
    let frame = v4_frame(&[], &opts4);
    frame_cuts(m, "IPv4 with 8 bytes of options", &frame, 14, 28);
    packet_cuts(m, "IPv4 with options, TCP", &frame, 14, 28..48, |_| {
        DropReason::Truncated
    });
    // UDP: past the 8-byte header, the UDP length (13) claims more than the packet holds.
    packet_cuts(m, "IPv4 UDP", &v4_frame(&[], &udp4), 14, 28..33, |_| {
        DropReason::BadL4Header
    });
    // ICMP errors: past the ICMP header the quote is cut (it needs a whole IPv4 header
    // and the ports) and no flow can be matched.
    packet_cuts(
        m,
        "IPv4 ICMP error",
        &v4_frame(&[], &err4),
        14,
        28..52,
        |_| DropReason::IcmpUnmatched,
    );

    let tcp6 = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b"hello"));
    let udp6 = ipv6(CLIENT6, VIP6_L2, PROTO_UDP, &udp(5353, 53, b"query"));
    let echo6 = ipv6(
        CLIENT6,
        VIP6,
        PROTO_ICMPV6,
        &icmp6(
            CLIENT6,
            VIP6,
            &[128, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'],
        ),
    );
    let err6 = icmp6_error(&quoted_reply_v6());
    for (what, ip, l4_hdr) in [
        ("IPv6 TCP", &tcp6, 20),
        ("IPv6 UDP", &udp6, 8),
        ("IPv6 ICMPv6 echo", &echo6, 8),
        ("IPv6 ICMPv6 error", &err6, 8),
    ] {
        for vlans in [&[][..], &[7][..]] {
            let frame = v6_frame_tagged(vlans, ip);
            let what = format!("{what}, {} VLAN tag(s)", vlans.len());
            let l3 = 14 + 4 * vlans.len();
            frame_cuts(m, &what, &frame, l3, 40);
            packet_cuts(m, &what, &frame, l3, 40..40 + l4_hdr, |_| {
                DropReason::Truncated
            });
        }
    }
    packet_cuts(m, "IPv6 UDP", &v6_frame(&udp6), 14, 48..53, |_| {
        DropReason::BadL4Header
    });
    packet_cuts(m, "IPv6 ICMPv6 error", &v6_frame(&err6), 14, 48..92, |_| {
        DropReason::IcmpUnmatched
    });
    // The same damage to an address that is no VIP is not ours to judge: passed
    // untouched, as the address's missing ICMP marker says (asked only when a header is
    // bad; IPv6 TCP and UDP skip the marker lookup on the way in).
    let other4 = Ipv4Addr::new(198, 51, 100, 9);
    let udp_other4 = ipv4(
        CLIENT,
        other4,
        PROTO_UDP,
        &[],
        &udp(5353, 53, b"query"),
        false,
    );
    for (what, frame, l3_hdr, l4_hdr) in [
        (
            "IPv4 TCP",
            v4_frame(
                &[],
                &ipv4(
                    CLIENT,
                    other4,
                    PROTO_TCP,
                    &[],
                    &tcp(40000, 80, SYN, b"hello"),
                    true,
                ),
            ),
            20,
            20,
        ),
        ("IPv4 UDP", v4_frame(&[], &udp_other4), 20, 8),
        (
            "IPv6 TCP",
            v6_frame(&ipv6(
                CLIENT6,
                OTHER6,
                PROTO_TCP,
                &tcp(40000, 80, SYN, b"hello"),
            )),
            40,
            20,
        ),
        (
            "IPv6 UDP",
            v6_frame(&ipv6(CLIENT6, OTHER6, PROTO_UDP, &udp(5353, 53, b"query"))),
            40,
            8,
        ),
    ] {
        for n in l3_hdr..l3_hdr + l4_hdr {
            m.passes(
                format!("{what} to a non-VIP address cut to {n} bytes of L3"),
                with_l3_len(&frame, 14, n, false),
            );
        }
        let mut bad = frame.clone();
        let l4 = 14 + l3_hdr;
        if what.ends_with("TCP") {
            bad[l4 + 12] = 4 << 4;
        } else {
            bad[l4 + 4..l4 + 6].copy_from_slice(&7u16.to_be_bytes());
        }
        m.passes(
            format!("{what} to a non-VIP address with a bad L4 header length"),
            bad,
        );
    }
    // A first fragment whose ports are cut, to no VIP.
    let mut frag = udp_other4.clone();
    frag[6] = 0x20;
    refresh_v4_checksum(&mut frag);
    m.passes(
        "IPv4 first fragment to a non-VIP address cut inside its ports",
        with_l3_len(&v4_frame(&[], &frag), 14, 22, false),
    );

    // IPIP and IPv6-in-IPv6 to this node from an allowed source: a cut in the outer header
    // is `truncated`; a cut anywhere in the inner packet leaves an inner header that is
    // missing or disagrees with the outer length (`decap_malformed`).
    let inner4 = client_ack_v4();
    let ipip = eth(
        NODE_MAC,
        B1_MAC,
        &[],
        ETHERTYPE_IPV4,
        &ipv4(BALANCER, NODE, 4, &[], &inner4, true),
    );
    frame_cuts(m, "IPIP", &ipip, 14, 20);
    packet_cuts(m, "IPIP", &ipip, 14, 20..20 + inner4.len(), |_| {
        DropReason::DecapMalformed
    });
    let inner6 = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, ACK, b"data"));
    let ip6ip6 = eth(
        NODE_MAC,
        B1_MAC,
        &[],
        ETHERTYPE_IPV6,
        &ipv6(BALANCER6, NODE6, 41, &inner6),
    );
    frame_cuts(m, "IPv6-in-IPv6", &ip6ip6, 14, 40);
    packet_cuts(
        m,
        "IPv6-in-IPv6",
        &ip6ip6,
        14,
        40..40 + inner6.len(),
        |_| DropReason::DecapMalformed,
    );
    // A first fragment too short to hold the ports.
    let mut first = ipv4(
        CLIENT,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(5353, 53, &[0; 16]),
        false,
    );
    first[6] = 0x20;
    refresh_v4_checksum(&mut first);
    packet_cuts(
        m,
        "IPv4 first fragment",
        &v4_frame(&[], &first),
        14,
        20..24,
        |_| DropReason::Truncated,
    );
}

/// A TCP SYN from the client to `dst`, as an IPv4 packet.
fn syn_v4(dst: Ipv4Addr) -> Vec<u8> {
    ipv4(
        CLIENT,
        dst,
        PROTO_TCP,
        &[],
        &tcp(40000, 80, SYN, b"hello"),
        true,
    )
}

/// The frame of IPv4 packet `ip` after `f` edits it, its header checksum made right again.
fn edited_v4(ip: &[u8], f: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut ip = ip.to_vec();
    f(&mut ip);
    refresh_v4_checksum(&mut ip);
    v4_frame(&[], &ip)
}

/// A TCP segment of 1500 bytes (IPv4, DF) from `src` to "web": too big for its tunnel.
fn big_segment_v4(src: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    ipv4(
        src,
        VIP,
        PROTO_TCP,
        &[],
        &tcp(sport, 80, flags, &[7; 1460]),
        true,
    )
}

/// An ICMP echo request from `src` to `dst`.
fn echo_v4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(
        src,
        dst,
        PROTO_ICMP,
        &[],
        &icmp4(&[8, 0, 0, 0, 0, 1, 0, 1]),
        false,
    )
}

/// An ICMPv6 echo request from `src` to `dst`.
fn echo_v6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    ipv6(
        src,
        dst,
        PROTO_ICMPV6,
        &icmp6(src, dst, &[128, 0, 0, 0, 0, 1, 0, 1]),
    )
}

/// IPv4 and TCP/UDP header fields out of range.
fn header_cases(m: &mut Matrix) {
    let good = syn_v4(VIP);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| edited_v4(&good, f);
    for ihl in 0..5u8 {
        m.drops(
            format!("IPv4 IHL {ihl}"),
            edit(&|ip| ip[0] = 0x40 | ihl),
            DropReason::BadIpHeader,
        );
    }
    for version in [0u8, 5, 6, 15] {
        m.drops(
            format!("IPv4 EtherType, IP version {version}"),
            edit(&|ip| ip[0] = version << 4 | 5),
            DropReason::BadIpHeader,
        );
    }
    // IHL 6..15 on a 20-byte packet in a frame that ends there: the options run off it.
    for ihl in 6..16u8 {
        let mut ip = good[..20].to_vec();
        ip[0] = 0x40 | ihl;
        ip[2..4].copy_from_slice(&20u16.to_be_bytes());
        refresh_v4_checksum(&mut ip);
        m.drops(
            format!("IPv4 IHL {ihl} beyond the frame"),
            v4_frame(&[], &ip),
            DropReason::Truncated,
        );
    }
    m.drops(
        "IPv4 IHL 15 (60 bytes) beyond a total length of 45, inside the frame",
        edit(&|ip| {
            ip[0] = 0x4f;
            ip.extend_from_slice(&[0; 40]);
        }),
        DropReason::BadIpHeader,
    );
    for tot in [0u16, 19] {
        m.drops(
            format!("IPv4 total length {tot}, below the header"),
            edit(&|ip| ip[2..4].copy_from_slice(&tot.to_be_bytes())),
            DropReason::BadIpHeader,
        );
    }
    for tot in [good.len() as u16 + 1, 1500, 65535] {
        m.drops(
            format!(
                "IPv4 total length {tot}, beyond the {}-byte packet",
                good.len()
            ),
            edit(&|ip| ip[2..4].copy_from_slice(&tot.to_be_bytes())),
            DropReason::BadIpHeader,
        );
    }
    // The same header damage to an address that is no VIP's goes to the stack untouched:
    // its bit in the VIP address filter is clear, so nothing past the destination address
    // is read (the kernel judges the header as it does for all its traffic).
    let other = syn_v4(Ipv4Addr::new(198, 51, 100, 9));
    let edit_other = |f: &dyn Fn(&mut Vec<u8>)| edited_v4(&other, f);
    m.passes(
        "IPv4 IHL 3, to a non-VIP address",
        edit_other(&|ip| ip[0] = 0x43),
    );
    m.passes(
        "IPv4 EtherType, IP version 6, to a non-VIP address",
        edit_other(&|ip| ip[0] = 0x65),
    );
    m.passes(
        "IPv4 total length 1500 beyond the packet, to a non-VIP address",
        edit_other(&|ip| ip[2..4].copy_from_slice(&1500u16.to_be_bytes())),
    );
    m.passes(
        "IPv4 cut after the addresses, to a non-VIP address",
        v4_frame(&[], &other)[..14 + 20].to_vec(),
    );
    // A total length shorter than the frame is the normal shape of a padded minimum-size
    // frame: forwarded with its padding, which the receiver trims by the length field.
    let padded = {
        let mut f = v4_frame(&[], &good);
        f.extend_from_slice(&[0xee; 6]);
        f
    };
    let mut out = expected_ipip(&good, B1, B1_MAC);
    out.extend_from_slice(&[0xee; 6]);
    m.forwards(
        "IPv4 total length shorter than the frame (6 bytes of link padding)",
        padded,
        Action::Encap,
        out,
    );

    let tcp_at = 20 + 12;
    for doff in 0..5u8 {
        m.drops(
            format!("TCP data offset {doff}"),
            edit(&|ip| ip[tcp_at] = doff << 4),
            DropReason::BadL4Header,
        );
    }
    m.drops(
        "TCP data offset 15 (60 bytes) beyond the frame",
        edit(&|ip| ip[tcp_at] = 15 << 4),
        DropReason::BadL4Header,
    );
    let mut short = ipv4(CLIENT, VIP, PROTO_TCP, &[], &tcp(40000, 80, SYN, b""), true);
    short[tcp_at] = 6 << 4;
    refresh_v4_checksum(&mut short);
    let mut f = v4_frame(&[], &short);
    f.extend_from_slice(&[0; 4]);
    m.drops(
        "TCP data offset 6 reaching past the IP packet into link padding",
        f,
        DropReason::BadL4Header,
    );

    let udp_good = ipv4(
        CLIENT,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(5353, 53, b"query"),
        false,
    );
    for len in [0u16, 7, 14, 65535] {
        let mut ip = udp_good.clone();
        ip[24..26].copy_from_slice(&len.to_be_bytes());
        m.drops(
            format!("UDP length {len} in a 13-byte datagram"),
            v4_frame(&[], &ip),
            DropReason::BadL4Header,
        );
    }
    // A UDP length below the IP payload is trimmed by the receiver (as Linux does): valid.
    let mut ip = udp_good.clone();
    ip[24..26].copy_from_slice(&8u16.to_be_bytes());
    m.forwards(
        "UDP length 8 in a 13-byte IP payload (trailing bytes trimmed by the receiver)",
        v4_frame(&[], &ip),
        Action::L2,
        eth(B2_MAC, NODE_MAC, &[], ETHERTYPE_IPV4, &ip),
    );
}

/// A known UDP flow to an `l2` VIP whose backend is B2 (IP header `l3_len` bytes, framed
/// by `frame`): three datagrams (the third meets the quick parse), then cuts and bad UDP
/// lengths of the next one.
fn known_udp_flow(
    m: &mut Matrix,
    what: &str,
    dgram: &[u8],
    l3_len: usize,
    frame: fn(&[u8]) -> Vec<u8>,
    ethertype: u16,
) {
    for i in 1..=3 {
        m.forwards(
            format!("{what}: datagram {i}"),
            frame(dgram),
            Action::L2,
            eth(B2_MAC, NODE_MAC, &[], ethertype, dgram),
        );
    }
    packet_cuts(m, what, &frame(dgram), 14, l3_len..l3_len + 8, |_| {
        DropReason::Truncated
    });
    for len in [7u16, 14] {
        let mut ip = dgram.to_vec();
        ip[l3_len + 4..l3_len + 6].copy_from_slice(&len.to_be_bytes());
        m.drops(
            format!("{what}: UDP length {len} in a 13-byte datagram"),
            frame(&ip),
            DropReason::BadL4Header,
        );
    }
}

/// Packets of flows the connection table knows and has checked since the last change,
/// which meet the program's quick parse (`parse::quick`) first: damaged ones must come to exactly
/// what the general parse decides, and well-formed ones of a shape the quick parse leaves
/// alone (IPv4 options, an IPv6 extension header, a fragment, link padding) are still
/// forwarded to the flow's backend. Each flow is opened and its entry checked first (its
/// first two packets take the general way; from the third on the quick one).
fn known_flow_cases(m: &mut Matrix) {
    // IPv4 TCP to "web" (B1, IPIP).
    let seg = |flags: u8| tcp(40100, 80, flags, b"data");
    let syn = ipv4(CLIENT, VIP, PROTO_TCP, &[], &seg(SYN), true);
    let ack = ipv4(CLIENT, VIP, PROTO_TCP, &[], &seg(ACK), true);
    m.forwards(
        "known IPv4 TCP flow: its SYN",
        v4_frame(&[], &syn),
        Action::Encap,
        expected_ipip(&syn, B1, B1_MAC),
    );
    for i in 1..=3 {
        m.forwards(
            format!("known IPv4 TCP flow: segment {i}"),
            v4_frame(&[], &ack),
            Action::Encap,
            expected_ipip(&ack, B1, B1_MAC),
        );
    }
    let what = "known IPv4 TCP flow";
    let frame = v4_frame(&[], &ack);
    frame_cuts(m, what, &frame, 14, 20);
    packet_cuts(m, what, &frame, 14, 20..40, |_| DropReason::Truncated);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| edited_v4(&ack, f);
    for doff in [0u8, 4, 7, 15] {
        m.drops(
            format!("{what}: TCP data offset {doff} in a 24-byte segment"),
            edit(&|ip| ip[32] = doff << 4),
            DropReason::BadL4Header,
        );
    }
    for (v_ihl, why) in [(0x44u8, "IHL 4"), (0x55, "version 5")] {
        m.drops(
            format!("{what}: {why}"),
            edit(&|ip| ip[0] = v_ihl),
            DropReason::BadIpHeader,
        );
    }
    m.drops(
        format!("{what}: total length one beyond the frame"),
        edit(&|ip| ip[2..4].copy_from_slice(&(ack.len() as u16 + 1).to_be_bytes())),
        DropReason::BadIpHeader,
    );
    // Below the header: the quick parse's own length arithmetic must not wrap.
    for tot in [0u16, 19] {
        m.drops(
            format!("{what}: total length {tot}, below the header"),
            edit(&|ip| ip[2..4].copy_from_slice(&tot.to_be_bytes())),
            DropReason::BadIpHeader,
        );
    }
    // A later fragment carries no ports: no flow's, and (yet) no record of its first
    // fragment.
    let later = edit(&|ip| ip[6..8].copy_from_slice(&[0x40, 1]));
    m.drops(
        format!("{what}: a later fragment (offset 8)"),
        later.clone(),
        DropReason::FragmentUnknown,
    );
    m.drops(
        format!("{what}: a later fragment (offset 2048, its high bits in byte 6)"),
        edit(&|ip| ip[6..8].copy_from_slice(&[0x41, 0])),
        DropReason::FragmentUnknown,
    );
    let first_fragment = {
        let mut ip = ack.clone();
        ip[6] |= 0x20;
        refresh_v4_checksum(&mut ip);
        ip
    };
    let with_options = ipv4(CLIENT, VIP, PROTO_TCP, &[1, 1, 1, 0], &seg(ACK), true);
    for (why, ip) in [
        ("a first fragment (more fragments)", first_fragment),
        ("4 bytes of IP options", with_options),
    ] {
        m.forwards(
            format!("{what}: {why}"),
            v4_frame(&[], &ip),
            Action::Encap,
            expected_ipip(&ip, B1, B1_MAC),
        );
    }
    // Now the first fragment's record (which only the general way writes) takes it.
    m.forwards(
        format!("{what}: that later fragment again, after the first"),
        later.clone(),
        Action::Encap,
        expected_ipip(&later[14..], B1, B1_MAC),
    );
    // Too big for the tunnel: the client hears the size that fits.
    let big = big_segment_v4(CLIENT, 40100, ACK);
    m.forwards(
        format!("{what}: a 1500-byte segment, 1520 once encapsulated"),
        v4_frame(&[], &big),
        Action::TooBig,
        expected_frag_needed(&big, 1480),
    );
    for tags in [&[5u16][..], &[5, 6]] {
        m.forwards(
            format!("{what}: a segment with {} VLAN tag(s)", tags.len()),
            v4_frame(tags, &ack),
            Action::Encap,
            expected_ipip(&ack, B1, B1_MAC),
        );
    }
    let mut padded = frame.clone();
    padded.extend_from_slice(&[0xee; 6]);
    let mut out = expected_ipip(&ack, B1, B1_MAC);
    out.extend_from_slice(&[0xee; 6]);
    m.forwards(
        format!("{what}: 6 bytes of link padding"),
        padded,
        Action::Encap,
        out,
    );

    // IPv4 UDP to "dns" (B2, MAC rewrite).
    let dgram = ipv4(
        CLIENT,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(5400, 53, b"query"),
        false,
    );
    known_udp_flow(
        m,
        "known IPv4 UDP flow",
        &dgram,
        20,
        |ip| v4_frame(&[], ip),
        ETHERTYPE_IPV4,
    );

    // IPv6 UDP to "dns6" (B2_6, MAC rewrite).
    let dgram = ipv6(CLIENT6, VIP6_L2, PROTO_UDP, &udp(5400, 53, b"query"));
    known_udp_flow(
        m,
        "known IPv6 UDP flow",
        &dgram,
        40,
        v6_frame,
        ETHERTYPE_IPV6,
    );

    // IPv6 TCP to "web6" (B1_6, IPv6-in-IPv6).
    let seg = |flags: u8| tcp(40100, 80, flags, b"data");
    let syn = ipv6(CLIENT6, VIP6, PROTO_TCP, &seg(SYN));
    let ack = ipv6(CLIENT6, VIP6, PROTO_TCP, &seg(ACK));
    m.forwards(
        "known IPv6 TCP flow: its SYN",
        v6_frame(&syn),
        Action::Encap,
        expected_ip6ip6(&syn, B1_6, B1_MAC),
    );
    for i in 1..=3 {
        m.forwards(
            format!("known IPv6 TCP flow: segment {i}"),
            v6_frame(&ack),
            Action::Encap,
            expected_ip6ip6(&ack, B1_6, B1_MAC),
        );
    }
    let what = "known IPv6 TCP flow";
    let frame = v6_frame(&ack);
    frame_cuts(m, what, &frame, 14, 40);
    packet_cuts(m, what, &frame, 14, 40..60, |_| DropReason::Truncated);
    for doff in [0u8, 4, 7, 15] {
        let mut ip = ack.clone();
        ip[52] = doff << 4;
        m.drops(
            format!("{what}: TCP data offset {doff} in a 24-byte segment"),
            v6_frame(&ip),
            DropReason::BadL4Header,
        );
    }
    let mut v4 = ack.clone();
    v4[0] = 0x40;
    m.drops(
        format!("{what}: IP version 4"),
        v6_frame(&v4),
        DropReason::BadIpHeader,
    );
    let big = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40100, 80, ACK, &[5; 1440]));
    let mut msg = vec![2, 0, 0, 0];
    msg.extend_from_slice(&1460u32.to_be_bytes());
    msg.extend_from_slice(&big[..128]);
    let mut reply = ipv6(VIP6, CLIENT6, 58, &icmp6(VIP6, CLIENT6, &msg));
    reply[7] = 64;
    m.forwards(
        format!("{what}: a 1500-byte packet, 1540 once encapsulated"),
        v6_frame(&big),
        Action::TooBig,
        eth(CLIENT_MAC, NODE_MAC, &[], ETHERTYPE_IPV6, &reply),
    );
    // A destination-options header before the segment: the general walk's to open.
    let mut opts = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    opts.extend_from_slice(&seg(ACK));
    let with_ext = ipv6(CLIENT6, VIP6, 60, &opts);
    m.forwards(
        format!("{what}: a destination-options header"),
        v6_frame(&with_ext),
        Action::Encap,
        expected_ip6ip6(&with_ext, B1_6, B1_MAC),
    );
}

/// IPv6: lengths, versions, extension-header chains and upper layers the walk does not know.
fn ipv6_cases(m: &mut Matrix) {
    let good = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, SYN, b"hello"));
    let mut long = good.clone();
    long[4..6].copy_from_slice(&(good.len() as u16 - 39).to_be_bytes());
    m.drops(
        "IPv6 payload length one beyond the frame",
        v6_frame(&long),
        DropReason::BadIpHeader,
    );
    let mut jumbo = ipv6(CLIENT6, VIP6, 0, &[PROTO_TCP, 0, 0xc2, 4, 0, 1, 0, 0]);
    jumbo[4] = 0;
    jumbo[5] = 0;
    m.drops(
        "IPv6 jumbogram (payload length 0, hop-by-hop)",
        v6_frame(&jumbo),
        DropReason::BadIpHeader,
    );
    let mut v4 = good.clone();
    v4[0] = 0x40;
    m.drops(
        "IPv6 EtherType, IP version 4",
        v6_frame(&v4),
        DropReason::BadIpHeader,
    );
    // To an address that is no VIP's: the stack's to judge.
    let mut other = ipv6(CLIENT6, OTHER6, PROTO_TCP, &tcp(40000, 80, SYN, b"hello"));
    let plen = other.len() as u16 - 39;
    other[4..6].copy_from_slice(&plen.to_be_bytes());
    m.passes(
        "IPv6 payload length one beyond the frame, to a non-VIP address",
        v6_frame(&other),
    );
    other[0] = 0x40;
    m.passes(
        "IPv6 EtherType, IP version 4, to a non-VIP address",
        v6_frame(&other),
    );

    // Extension chains: every kind the walk knows, up to its bound of six.
    let ext = |next: u8, kind: u8| -> Vec<u8> {
        match kind {
            // AH: length in 4-byte units minus 2; 12 bytes.
            51 => vec![next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
            // Fragment header of an unfragmented packet (offset 0, M clear).
            44 => vec![next, 0, 0, 0, 0, 0, 0, 9],
            _ => vec![next, 0, 1, 4, 0, 0, 0, 0],
        }
    };
    let chain = |kinds: &[u8], upper: u8, upper_bytes: &[u8]| -> Vec<u8> {
        let mut payload = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(upper);
            payload.extend_from_slice(&ext(next, *k));
        }
        payload.extend_from_slice(upper_bytes);
        let first = kinds.first().copied().unwrap_or(upper);
        ipv6(CLIENT6, VIP6, first, &payload)
    };
    let seg = tcp(40001, 80, SYN, b"");
    let six = chain(&[0, 60, 43, 51, 44, 60], PROTO_TCP, &seg);
    m.forwards(
        "IPv6 with six extension headers (the walk's bound)",
        v6_frame(&six),
        Action::Encap,
        expected_ip6ip6(&six, B1_6, B1_MAC),
    );
    for kinds in [
        &[60u8; 7][..],
        &[0, 60, 43, 51, 44, 60, 60][..],
        &[60; 12][..],
    ] {
        m.drops(
            format!("IPv6 extension chain of {} headers", kinds.len()),
            v6_frame(&chain(kinds, PROTO_TCP, &seg)),
            DropReason::BadIpHeader,
        );
    }
    // A later fragment carries no upper-layer header to check, so its fragment header
    // must itself lie inside the packet. Rows run in order: the first fragment records
    // the datagram, so its later fragments are forwarded, unless malformed.
    let mut first_frag = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 5];
    first_frag.extend_from_slice(&udp(5353, 53, &[1; 16])[..24]);
    let first = v6_frame(&ipv6(CLIENT6, VIP6_L2, 44, &first_frag));
    let later = v6_frame(&ipv6(
        CLIENT6,
        VIP6_L2,
        44,
        &[PROTO_UDP, 0, 0, 0x18, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8],
    ));
    for (what, frame) in [("first", first), ("later", later.clone())] {
        m.forwards(
            format!("IPv6 {what} fragment to a VIP"),
            frame.clone(),
            Action::L2,
            [&B2_MAC[..], &NODE_MAC[..], &frame[12..]].concat(),
        );
    }
    packet_cuts(m, "IPv6 later fragment", &later, 14, 40..48, |_| {
        DropReason::Truncated
    });
    let mut huge = ext(PROTO_TCP, 60);
    huge[1] = 255;
    m.drops(
        "IPv6 destination options claiming 2048 bytes in a short packet",
        v6_frame(&ipv6(CLIENT6, VIP6, 60, &[&huge[..], &seg[..]].concat())),
        DropReason::Truncated,
    );
    for (next, name) in [
        (59u8, "no next header"),
        (132, "SCTP"),
        (50, "ESP"),
        (135, "mobility header"),
        (253, "experimental"),
    ] {
        m.passes(
            format!("IPv6 to a VIP, next header {next} ({name})"),
            v6_frame(&ipv6(CLIENT6, VIP6, next, &[0u8; 24])),
        );
        m.passes(
            format!("IPv6 to a VIP, destination options then {next} ({name})"),
            v6_frame(&chain(&[60], next, &[0u8; 24])),
        );
    }
}

/// Link layer: VLAN stacks deeper than two, runts.
fn link_cases(m: &mut Matrix) {
    let ip = ipv4(CLIENT, VIP, PROTO_TCP, &[], &tcp(40000, 80, SYN, b""), true);
    for vlans in [&[1u16, 2, 3][..], &[1, 2, 3, 4][..]] {
        m.passes(
            format!("{} VLAN tags (deeper than two)", vlans.len()),
            v4_frame(vlans, &ip),
        );
    }
    let mut qinq3 = eth(NODE_MAC, CLIENT_MAC, &[], 0x88a8, &[0, 1]);
    qinq3.extend_from_slice(&0x8100u16.to_be_bytes());
    qinq3.extend_from_slice(&[0, 2, 0x88, 0xa8, 0, 3, 0x08, 0x00]);
    qinq3.extend_from_slice(&ip);
    m.passes("802.1ad, 802.1Q, 802.1ad: three tags", qinq3);
    for (ethertype, name) in [(ETHERTYPE_IPV4, "IPv4"), (ETHERTYPE_IPV6, "IPv6")] {
        m.drops(
            format!("14-byte frame: Ethernet header alone, EtherType {name}"),
            eth(NODE_MAC, CLIENT_MAC, &[], ethertype, &[]),
            DropReason::Truncated,
        );
    }
    m.passes(
        "14-byte frame: Ethernet header alone, EtherType ARP",
        eth(NODE_MAC, CLIENT_MAC, &[], 0x0806, &[]),
    );
}

/// The decap role: malformed inner headers and sources off the allow list.
fn decap_cases(m: &mut Matrix) {
    let inner = client_ack_v4();
    let ipip = |src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]| {
        eth(
            NODE_MAC,
            B1_MAC,
            &[],
            ETHERTYPE_IPV4,
            &ipv4(src, dst, 4, &[], inner, true),
        )
    };
    let bad = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut i = inner.clone();
        f(&mut i);
        refresh_v4_checksum(&mut i);
        ipip(BALANCER, NODE, &i)
    };
    for version in [0u8, 6, 15] {
        m.drops(
            format!("IPIP, inner IP version {version}"),
            bad(&|i| i[0] = version << 4 | 5),
            DropReason::DecapMalformed,
        );
    }
    for ihl in 0..5u8 {
        m.drops(
            format!("IPIP, inner IHL {ihl}"),
            bad(&|i| i[0] = 0x40 | ihl),
            DropReason::DecapMalformed,
        );
    }
    m.drops(
        "IPIP, inner IHL 15 (60 bytes) beyond its 44-byte total length",
        bad(&|i| i[0] = 0x4f),
        DropReason::DecapMalformed,
    );
    let n = inner.len() as u16;
    for tot in [0, 19, n - 1, n + 1, 65535] {
        m.drops(
            format!("IPIP, inner total length {tot} in a {n}-byte outer payload"),
            bad(&|i| i[2..4].copy_from_slice(&tot.to_be_bytes())),
            DropReason::DecapMalformed,
        );
    }
    let stranger = Ipv4Addr::new(198, 51, 100, 1);
    m.drops(
        "IPIP to this node from a source off the allow list",
        ipip(stranger, NODE, &inner),
        DropReason::DecapNotAllowed,
    );
    m.drops(
        "IPIP to this node from a neighbour of an allowed source (/32 listed)",
        ipip(Ipv4Addr::new(10, 1, 0, 3), NODE, &inner),
        DropReason::DecapNotAllowed,
    );
    let mut frag = ipv4(stranger, NODE, 4, &[], &inner, false);
    frag[6] = 0x20;
    refresh_v4_checksum(&mut frag);
    m.drops(
        "IPIP fragment to this node from a source off the allow list",
        eth(NODE_MAC, B1_MAC, &[], ETHERTYPE_IPV4, &frag),
        DropReason::DecapNotAllowed,
    );
    m.passes(
        "IPIP to another host from a source off the allow list (not ours)",
        ipip(stranger, B3, &inner),
    );
    // A malformed outer header is the node's to drop only when the tunnel is addressed
    // to it (the truncation cases above); passing through, it is the stack's to judge.
    let to_other = ipv4(BALANCER, B3, 4, &[], &inner, true);
    for (why, f) in [
        (
            "outer IHL 4",
            &(|ip: &mut Vec<u8>| ip[0] = 0x44) as &dyn Fn(&mut Vec<u8>),
        ),
        ("outer total length beyond the frame", &|ip: &mut Vec<
            u8,
        >| {
            let n = ip.len() as u16 + 1;
            ip[2..4].copy_from_slice(&n.to_be_bytes());
        }),
    ] {
        let mut ip = to_other.clone();
        f(&mut ip);
        refresh_v4_checksum(&mut ip);
        m.passes(
            format!("IPIP to another host with a malformed header ({why}): not ours"),
            eth(NODE_MAC, B1_MAC, &[], ETHERTYPE_IPV4, &ip),
        );
        let mut ip = ipv4(BALANCER, NODE, 4, &[], &inner, true);
        f(&mut ip);
        refresh_v4_checksum(&mut ip);
        m.drops(
            format!("IPIP to this node with a malformed header ({why})"),
            eth(NODE_MAC, B1_MAC, &[], ETHERTYPE_IPV4, &ip),
            DropReason::BadIpHeader,
        );
    }
    let mut bad_inner = inner.clone();
    bad_inner[0] = 0x35;
    m.drops(
        "IPIP from a source off the allow list with a malformed inner header",
        ipip(stranger, NODE, &bad_inner),
        DropReason::DecapNotAllowed,
    );

    let inner6 = ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(40000, 80, ACK, b"data"));
    let ip6ip6 = |src: Ipv6Addr, inner: &[u8]| {
        eth(
            NODE_MAC,
            B1_MAC,
            &[],
            ETHERTYPE_IPV6,
            &ipv6(src, NODE6, 41, inner),
        )
    };
    let mut v4_inside = inner6.clone();
    v4_inside[0] = 0x45;
    m.drops(
        "IPv6-in-IPv6, inner IP version 4",
        ip6ip6(BALANCER6, &v4_inside),
        DropReason::DecapMalformed,
    );
    let plen = inner6.len() as u16 - 40;
    for p in [0, plen - 1, plen + 1] {
        let mut i = inner6.clone();
        i[4..6].copy_from_slice(&p.to_be_bytes());
        m.drops(
            format!("IPv6-in-IPv6, inner payload length {p} (outer holds {plen})"),
            ip6ip6(BALANCER6, &i),
            DropReason::DecapMalformed,
        );
    }
    m.drops(
        "IPv6-in-IPv6 to this node from a source off the allow list",
        ip6ip6(B3_6, &inner6),
        DropReason::DecapNotAllowed,
    );
    let mut long = ipv6(BALANCER6, B3_6, 41, &inner6);
    let n = inner6.len() as u16 + 1;
    long[4..6].copy_from_slice(&n.to_be_bytes());
    m.passes(
        "IPv6-in-IPv6 to another host with a payload length beyond the frame: not ours",
        eth(NODE_MAC, B1_MAC, &[], ETHERTYPE_IPV6, &long),
    );
    long[24..40].copy_from_slice(&NODE6.octets());
    m.drops(
        "IPv6-in-IPv6 to this node with a payload length beyond the frame",
        eth(NODE_MAC, B1_MAC, &[], ETHERTYPE_IPV6, &long),
        DropReason::BadIpHeader,
    );
}

/// ICMP messages too short for their header, errors quoting malformed headers.
fn icmp_cases(m: &mut Matrix) {
    for len in [0usize, 1, 4, 7] {
        let msg = &[8u8, 0, 0, 0, 0, 1, 0][..len];
        m.drops(
            format!("ICMP echo to a VIP with a {len}-byte ICMP header"),
            v4_frame(&[], &ipv4(CLIENT, VIP, PROTO_ICMP, &[], msg, false)),
            DropReason::Truncated,
        );
        m.drops(
            format!("ICMPv6 echo to a VIP with a {len}-byte ICMPv6 header"),
            v6_frame(&ipv6(
                CLIENT6,
                VIP6,
                PROTO_ICMPV6,
                &[128u8, 0, 0, 0, 0, 1, 0][..len],
            )),
            DropReason::Truncated,
        );
    }
    let reply = quoted_reply_v4();
    let quote_edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut q = reply.clone();
        f(&mut q);
        v4_frame(&[], &icmp4_error(&q))
    };
    for (what, frame) in [
        ("quoted IP version 6", quote_edit(&|q| q[0] = 0x65)),
        ("quoted IHL 4", quote_edit(&|q| q[0] = 0x44)),
        (
            "quoted IHL 15, beyond the quote",
            quote_edit(&|q| q[0] = 0x4f),
        ),
        (
            "quoted source not the VIP",
            quote_edit(&|q| q[12..16].copy_from_slice(&[192, 0, 2, 99])),
        ),
        ("quoted protocol SCTP", quote_edit(&|q| q[9] = 132)),
        (
            "quoted later fragment (offset 8): no ports",
            quote_edit(&|q| q[6..8].copy_from_slice(&[0x40, 1])),
        ),
        (
            "quoted later fragment (offset 2048, in byte 6): no ports",
            quote_edit(&|q| q[6..8].copy_from_slice(&[0x41, 0])),
        ),
        (
            "quoted total length 27, no room for a TCP or UDP header",
            quote_edit(&|q| q[2..4].copy_from_slice(&27u16.to_be_bytes())),
        ),
        ("nothing quoted", v4_frame(&[], &icmp4_error(&[]))),
    ] {
        m.drops(
            format!("ICMP error to a VIP, {what}"),
            frame,
            DropReason::IcmpUnmatched,
        );
    }
    // The quote lies in the link padding, past the ICMP message's IP length.
    let mut in_padding = with_l3_len(&v4_frame(&[], &icmp4_error(&reply)), 14, 28 + 20, true);
    in_padding.truncate(14 + 28 + 40);
    m.drops(
        "ICMP error to a VIP whose quoted ports lie past its IP length",
        in_padding,
        DropReason::IcmpUnmatched,
    );
    let reply6 = quoted_reply_v6();
    let mut q = reply6.clone();
    q[0] = 0x45;
    m.drops(
        "ICMPv6 error to a VIP, quoted IP version 4",
        v6_frame(&icmp6_error(&q)),
        DropReason::IcmpUnmatched,
    );
    let mut q = reply6.clone();
    q[6] = 132;
    m.drops(
        "ICMPv6 error to a VIP, quoted next header SCTP",
        v6_frame(&icmp6_error(&q)),
        DropReason::IcmpUnmatched,
    );
    let mut q = reply6.clone();
    q[4..6].copy_from_slice(&7u16.to_be_bytes());
    m.drops(
        "ICMPv6 error to a VIP, quoted payload length 7: no room for a TCP or UDP header",
        v6_frame(&icmp6_error(&q)),
        DropReason::IcmpUnmatched,
    );
}

/// Packets to a VIP that claim the VIP as their source: never answered or forwarded.
fn source_is_vip_cases(m: &mut Matrix) {
    let tcp4 = ipv4(VIP, VIP, PROTO_TCP, &[], &tcp(80, 80, SYN, b""), true);
    m.drops(
        "TCP from the VIP to itself",
        v4_frame(&[], &tcp4),
        DropReason::SourceIsVip,
    );
    let udp4 = ipv4(VIP_L2, VIP_L2, PROTO_UDP, &[], &udp(53, 53, b"q"), false);
    m.drops(
        "UDP from the VIP to itself",
        v4_frame(&[], &udp4),
        DropReason::SourceIsVip,
    );
    let echo = echo_v4(VIP, VIP);
    m.drops(
        "ICMP echo from the VIP to itself (would reflect)",
        v4_frame(&[], &echo),
        DropReason::SourceIsVip,
    );
    let mut err = icmp4_error(&quoted_reply_v4());
    err[12..16].copy_from_slice(&VIP.octets());
    refresh_v4_checksum(&mut err);
    m.drops(
        "ICMP error from the VIP to itself",
        v4_frame(&[], &err),
        DropReason::SourceIsVip,
    );
    // Eight bytes of data after the UDP header: a well-formed first fragment.
    let mut frag = ipv4(
        VIP_L2,
        VIP_L2,
        PROTO_UDP,
        &[],
        &udp(53, 53, b"question"),
        false,
    );
    frag[6] = 0x20;
    refresh_v4_checksum(&mut frag);
    m.drops(
        "first fragment from the VIP to itself",
        v4_frame(&[], &frag),
        DropReason::SourceIsVip,
    );
    let tcp6 = ipv6(VIP6, VIP6, PROTO_TCP, &tcp(80, 80, SYN, b""));
    m.drops(
        "IPv6 TCP from the VIP to itself",
        v6_frame(&tcp6),
        DropReason::SourceIsVip,
    );
    let echo6 = echo_v6(VIP6, VIP6);
    m.drops(
        "ICMPv6 echo from the VIP to itself (would reflect)",
        v6_frame(&echo6),
        DropReason::SourceIsVip,
    );
}

/// Packets the balancer would answer itself (an echo request, one too big for its
/// backend's tunnel) from sources no reply may go to, or in frames to a link-layer group
/// address, and later fragments too big for the tunnel: dropped unanswered.
fn reply_source_cases(m: &mut Matrix) {
    let bad_v4 = [
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(240, 0, 0, 1),
        Ipv4Addr::new(0, 1, 2, 3),
    ];
    for src in bad_v4 {
        let echo = echo_v4(src, VIP);
        m.drops(
            format!("ICMP echo to a VIP from {src}"),
            v4_frame(&[], &echo),
            DropReason::BadSource,
        );
        let big = big_segment_v4(src, 40200, SYN);
        m.drops(
            format!("a 1500-byte SYN to an ipip VIP from {src}, too big to forward"),
            v4_frame(&[], &big),
            DropReason::BadSource,
        );
    }
    let bad_v6: [Ipv6Addr; 3] = [
        Ipv6Addr::UNSPECIFIED,
        Ipv6Addr::LOCALHOST,
        "ff02::1".parse().expect("addr"),
    ];
    for src in bad_v6 {
        let echo = echo_v6(src, VIP6);
        m.drops(
            format!("ICMPv6 echo to a VIP from {src}"),
            v6_frame(&echo),
            DropReason::BadSource,
        );
        let big = ipv6(src, VIP6, PROTO_TCP, &tcp(40200, 80, SYN, &[5; 1440]));
        m.drops(
            format!("a 1500-byte IPv6 SYN to an ipip VIP from {src}, too big to forward"),
            v6_frame(&big),
            DropReason::BadSource,
        );
    }
    // A good source in a frame sent to every station (or a multicast group): the reply's
    // source MAC would be the group address.
    let echo = echo_v4(CLIENT, VIP);
    for (what, mac) in [
        ("broadcast", [0xff; 6]),
        ("multicast", [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]),
    ] {
        m.drops(
            format!("ICMP echo to a VIP in a {what} frame"),
            eth(mac, CLIENT_MAC, &[], ETHERTYPE_IPV4, &echo),
            DropReason::BadSource,
        );
    }
    // A later fragment too big for the tunnel (to the all-ports VIP, which takes it
    // without its first fragment): no "fragmentation needed" about it.
    let mut later = ipv4(CLIENT, VIP_ALL, PROTO_TCP, &[], &[9; 1480], false);
    later[6..8].copy_from_slice(&[0x00, 0xb9]);
    refresh_v4_checksum(&mut later);
    m.drops(
        "a 1500-byte later fragment to an ipip VIP, too big to forward",
        v4_frame(&[], &later),
        DropReason::MtuExceeded,
    );
}

/// The largest frames: the program is loaded without `xdp.frags`, so it only ever sees a
/// frame's linear part. `BPF_PROG_TEST_RUN` puts at most 3520 bytes there (a 4 KiB page
/// less headroom and tail room) and the rest in fragments; drivers refuse to attach a
/// program without frags support where the MTU needs more than a page, so on a real NIC
/// such frames never reach it.
fn size_cases(m: &mut Matrix) {
    let tcp_of = |total: usize| {
        ipv4(
            CLIENT,
            VIP,
            PROTO_TCP,
            &[],
            &tcp(40000, 80, ACK, &vec![7u8; total - 14 - 40]),
            true,
        )
    };
    let largest = v4_frame(&[], &tcp_of(LINEAR_MAX));
    m.forwards(
        format!("{LINEAR_MAX}-byte frame (the largest linear one): fragmentation needed"),
        largest.clone(),
        Action::TooBig,
        expected_frag_needed(&largest[14..], 1480),
    );
    for total in [LINEAR_MAX + 1, 9000, 9014] {
        m.drops(
            format!("{total}-byte IPv4 frame: only {LINEAR_MAX} bytes visible"),
            v4_frame(&[], &tcp_of(total)),
            DropReason::BadIpHeader,
        );
        let seg = tcp(40000, 80, ACK, &vec![7u8; total - 14 - 60]);
        m.drops(
            format!("{total}-byte IPv6 frame: only {LINEAR_MAX} bytes visible"),
            v6_frame(&ipv6(CLIENT6, VIP6, PROTO_TCP, &seg)),
            DropReason::BadIpHeader,
        );
    }
}

/// Bytes of a test-run frame the kernel makes linear (4096 − 256 headroom − 320 tail room
/// for `skb_shared_info` on x86_64); the rest goes into fragments.
const LINEAR_MAX: usize = 3520;

/// The whole table.
/// An IPv4 fragment from the client to "web" (one backend, B1, IPIP) carrying `data`,
/// its flags-and-offset field `frag` (MF is 0x2000, the offset in 8-byte units) with DF
/// set too, so that the outer header's identification is fixed (0) where it is forwarded.
fn fragment_v4(data: &[u8], frag: u16) -> Vec<u8> {
    let mut ip = ipv4(CLIENT, VIP, PROTO_TCP, &[], data, true);
    ip[4..6].copy_from_slice(&0x5eedu16.to_be_bytes());
    ip[6..8].copy_from_slice(&(0x4000 | frag).to_be_bytes());
    refresh_v4_checksum(&mut ip);
    ip
}

/// An IPv6 fragment from the client to VIP6's "web" (one backend, B1_6) carrying `data`,
/// after the extension headers `before` (whose first byte this fills in); `frag` is the
/// fragment header's offset-and-flags field (M is 1, the offset in bytes).
fn fragment_v6(before: &[u8], data: &[u8], frag: u16) -> Vec<u8> {
    let mut payload = before.to_vec();
    let first = if before.is_empty() {
        44
    } else {
        payload[0] = 44;
        0
    };
    payload.extend_from_slice(&[PROTO_TCP, 0]);
    payload.extend_from_slice(&frag.to_be_bytes());
    payload.extend_from_slice(&0x5eed_u32.to_be_bytes());
    payload.extend_from_slice(data);
    ipv6(CLIENT6, VIP6, first, &payload)
}

/// Fragments to a VIP that break the fragmentation rules (RFC 791, RFC 8200 4.5):
/// no data, data not a multiple of 8 bytes with more to follow, data ending past the
/// largest datagram. Dropped as `bad_fragment`; the boundary cases beside them (a last
/// fragment of any length, one ending at exactly 65 535 bytes) are forwarded. Rows run in
/// order: each family's first fragment records the datagram for its later fragments.
fn fragment_length_cases(m: &mut Matrix) {
    let seg = |data: &[u8]| tcp(40200, 80, ACK, data);
    let first = fragment_v4(&seg(b"data"), 0x2000);
    m.forwards(
        "IPv4 first fragment, 24 bytes of data",
        v4_frame(&[], &first),
        Action::Encap,
        expected_ipip(&first, B1, B1_MAC),
    );
    let bad_v4: [(&str, Vec<u8>); 5] = [
        (
            "IPv4 first fragment, 21 bytes of data (not a multiple of 8), more to follow",
            fragment_v4(&seg(b"d"), 0x2000),
        ),
        (
            "IPv4 later fragment, 7 bytes of data, more to follow",
            fragment_v4(&[7; 7], 0x2003),
        ),
        (
            "IPv4 later fragment without data, more to follow",
            fragment_v4(&[], 0x2003),
        ),
        ("IPv4 last fragment without data", fragment_v4(&[], 0x0003)),
        (
            "IPv4 last fragment at offset 65 504 with 12 bytes (the datagram past 65 535)",
            fragment_v4(&[12; 12], 8188),
        ),
    ];
    for (what, ip) in bad_v4 {
        m.drops(what, v4_frame(&[], &ip), DropReason::BadFragment);
    }
    for (what, ip) in [
        (
            "IPv4 last fragment, 7 bytes of data",
            fragment_v4(&[7; 7], 0x0003),
        ),
        (
            "IPv4 last fragment at offset 65 504 with 11 bytes (the datagram 65 535)",
            fragment_v4(&[11; 11], 8188),
        ),
    ] {
        m.forwards(
            what,
            v4_frame(&[], &ip),
            Action::Encap,
            expected_ipip(&ip, B1, B1_MAC),
        );
    }
    let mut other = fragment_v4(&[7; 7], 0x2003);
    other[16..20].copy_from_slice(&[198, 51, 100, 9]);
    refresh_v4_checksum(&mut other);
    m.passes(
        "IPv4 later fragment, 7 bytes of data, more to follow, to a non-VIP address",
        v4_frame(&[], &other),
    );

    let first6 = fragment_v6(&[], &seg(b"data"), 1);
    m.forwards(
        "IPv6 first fragment, 24 bytes of data",
        v6_frame(&first6),
        Action::Encap,
        expected_ip6ip6(&first6, B1_6, B1_MAC),
    );
    // Hop-by-hop options (PadN): 8 bytes of the unfragmentable part.
    let hop = [0u8, 0, 1, 4, 0, 0, 0, 0];
    let bad_v6: [(&str, Vec<u8>); 6] = [
        (
            "IPv6 first fragment, 21 bytes of data (not a multiple of 8), M set",
            fragment_v6(&[], &seg(b"d"), 1),
        ),
        (
            "IPv6 later fragment, 7 bytes of data, M set",
            fragment_v6(&[], &[7; 7], 24 | 1),
        ),
        (
            "IPv6 later fragment without data, M set",
            fragment_v6(&[], &[], 24 | 1),
        ),
        ("IPv6 last fragment without data", fragment_v6(&[], &[], 24)),
        (
            "IPv6 last fragment at offset 65 520 with 16 bytes (the payload past 65 535)",
            fragment_v6(&[], &[16; 16], 65520),
        ),
        (
            "IPv6 last fragment at offset 65 520 with 8 bytes after 8 of hop-by-hop options (the payload past 65 535)",
            fragment_v6(&hop, &[8; 8], 65520),
        ),
    ];
    for (what, ip) in bad_v6 {
        m.drops(what, v6_frame(&ip), DropReason::BadFragment);
    }
    for (what, ip) in [
        (
            "IPv6 last fragment, 7 bytes of data",
            fragment_v6(&[], &[7; 7], 24),
        ),
        (
            "IPv6 last fragment at offset 65 520 with 15 bytes (the payload 65 535)",
            fragment_v6(&[], &[15; 15], 65520),
        ),
        (
            "IPv6 last fragment at offset 65 520 with 7 bytes after 8 of hop-by-hop options (the payload 65 535)",
            fragment_v6(&hop, &[7; 7], 65520),
        ),
    ] {
        m.forwards(
            what,
            v6_frame(&ip),
            Action::Encap,
            expected_ip6ip6(&ip, B1_6, B1_MAC),
        );
    }
    // A second fragment header: which one reassembly goes by is the receiver's guess.
    let atomic = [PROTO_TCP, 0, 0, 0, 0, 0, 0, 9];
    let mut twice = fragment_v6(&[], &[&atomic[..], &seg(b"data")[..]].concat(), 1);
    twice[40] = 44;
    m.drops(
        "IPv6 with two fragment headers (a first fragment, then an atomic one)",
        v6_frame(&twice),
        DropReason::BadIpHeader,
    );
    let mut other6 = fragment_v6(&[], &[7; 7], 24 | 1);
    other6[24..40].copy_from_slice(&OTHER6.octets());
    m.passes(
        "IPv6 later fragment, 7 bytes of data, M set, to a non-VIP address",
        v6_frame(&other6),
    );
}

fn matrix() -> Matrix {
    let mut m = Matrix::default();
    fragment_length_cases(&mut m);
    truncation_cases(&mut m);
    header_cases(&mut m);
    known_flow_cases(&mut m);
    ipv6_cases(&mut m);
    link_cases(&mut m);
    decap_cases(&mut m);
    icmp_cases(&mut m);
    source_is_vip_cases(&mut m);
    reply_source_cases(&mut m);
    size_cases(&mut m);
    m
}

/// Runs one case; describes every way it went wrong.
fn check(f: &Fixture, c: &Case) -> Result<(), String> {
    let before = f.outcome_counts();
    let (verdict, out) = f.run(&c.frame);
    let after = f.outcome_counts();
    let moved: Vec<usize> = (0..before.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    let label = |i: usize| {
        if i < DROP_REASON_COUNT as usize {
            DropReason::ALL[i].label()
        } else {
            Action::ALL[i - DROP_REASON_COUNT as usize].label()
        }
    };
    let total = |v: &[u64]| v.iter().sum::<u64>();
    let (want_verdict, want_counter, want_out) = match &c.expect {
        Expect::Drop(r) => (XDP_DROP, *r as usize, &c.frame),
        Expect::PassUnchanged => (
            XDP_PASS,
            DROP_REASON_COUNT as usize + Action::Pass as usize,
            &c.frame,
        ),
        Expect::Tx(a, bytes) => (XDP_TX, DROP_REASON_COUNT as usize + *a as usize, bytes),
    };
    let mut problems = Vec::new();
    if verdict != want_verdict {
        problems.push(format!("verdict {verdict}, want {want_verdict}"));
    }
    if total(&after) != total(&before) + 1 || after[want_counter] != before[want_counter] + 1 {
        problems.push(format!(
            "counted as {:?}, want exactly one {}",
            moved.iter().map(|&i| label(i)).collect::<Vec<_>>(),
            label(want_counter)
        ));
    }
    if &out != want_out {
        problems.push(format!(
            "output differs ({} bytes, want {})",
            out.len(),
            want_out.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", c.what, problems.join("; ")))
    }
}

#[test]
fn malformed_input_is_dropped_with_its_reason_or_passed_unchanged() {
    let f = fixture();
    let m = matrix();
    let mut failures = Vec::new();
    let mut per_expectation = std::collections::BTreeMap::<String, usize>::new();
    for c in &m.0 {
        let key = match &c.expect {
            Expect::Drop(r) => format!("drop {}", r.label()),
            Expect::PassUnchanged => "pass unchanged".to_string(),
            Expect::Tx(a, _) => format!("forwarded ({})", a.label()),
        };
        *per_expectation.entry(key).or_default() += 1;
        if let Err(e) = check(&f, c) {
            failures.push(e);
        }
    }
    println!("{} cases: {per_expectation:?}", m.0.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        m.0.len(),
        failures.join("\n")
    );
}

#[test]
fn runt_frames_below_the_ethernet_header_never_reach_the_program() {
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header (EINVAL), as
    // NICs discard runts before XDP; 14 bytes is the shortest frame the program sees.
    let f = fixture();
    let prog = f.dp.program().expect("program");
    for len in 0..14 {
        let frame = vec![0u8; len];
        assert!(
            l3lb::testing::run_xdp(prog, f.ifindex, &frame).is_err(),
            "{len}-byte frame refused by the kernel"
        );
    }
}
