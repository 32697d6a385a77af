//! Debug-only log statements (aya-log) for operators: each drop with its reason and
//! addresses, the backend a new flow gets, the backend an ICMP error about a flow goes to,
//! echo replies and "too big" answers; at trace also each decapsulated packet.
//!
//! Every statement sits behind a test of `AYA_LOG_LEVEL`, a global in `.rodata` that the
//! agent sets at load time (0 unless its filter names the target `l3lb::xdp`). The map is
//! frozen, so the verifier knows the value, follows only the branch taken and removes the
//! rest: with the level at 0 each call site keeps the level's load and nothing else. The
//! test comes first, at the call site; the work (re-reading the addresses, formatting)
//! lives in global functions, which the verifier checks once each, and only when a call to
//! them is live. Without the `log` feature (the benchmark's comparison object) every
//! function here is empty.
//!
//! Where the statements run, and why:
//! - At the end of a program, after the pipeline: its subprograms use most of the 512-byte
//!   stack that a call chain shares. A backend choice made deep inside is noted in a
//!   per-CPU map (`LOG_NOTE`) and logged there. The IPv6 programs' own frames leave too
//!   little for these functions: with logs on they hand their outcome to
//!   `l3lb_log_outcome` by tail call (see `finish_deep`).
//! - Labels (drop reasons, actions) come from fixed-size tables indexed by the value, not
//!   from a `match`: the verifier would follow every statement once per label, since each
//!   has its own length, and a program with logs on would exceed its complexity limit.
//!   The label is the last argument, so its unknown length forks nothing after it.

#[cfg(feature = "log")]
pub use enabled::*;

#[cfg(not(feature = "log"))]
pub use disabled::*;

#[cfg(feature = "log")]
mod enabled {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
    // The level test the macros use themselves; exposed by aya-log-ebpf for them (hidden
    // from its docs), used here to skip the work that feeds a statement.
    use aya_log_ebpf::{
        debug,
        macro_support::{Level, level_enabled},
        trace,
    };
    use lb_common::{ACTION_COUNT, Action, DROP_REASON_COUNT, DropReason, FAMILY_V4, FlowKey};

    use crate::{
        maps::{LOG_NOTE, LogNote},
        parse::{eth, ptr_at},
    };

    /// Whether the statements are on (the verifier knows, as it knows the level).
    #[inline(always)]
    pub fn on() -> bool {
        level_enabled(Level::Debug)
    }

    /// Room for the longest label (drop reason or action).
    const LABEL_MAX: usize = 24;

    /// Labels padded to `LABEL_MAX` bytes, and their lengths.
    struct Labels<const N: usize> {
        bytes: [[u8; LABEL_MAX]; N],
        lens: [u8; N],
    }

    impl<const N: usize> Labels<N> {
        /// The table of `labels` (each cut to `LABEL_MAX` bytes).
        const fn new(labels: [&str; N]) -> Self {
            let mut t = Labels {
                bytes: [[0; LABEL_MAX]; N],
                lens: [0; N],
            };
            let mut i = 0;
            while i < N {
                let b = labels[i].as_bytes();
                let mut j = 0;
                while j < b.len() && j < LABEL_MAX {
                    t.bytes[i][j] = b[j];
                    j += 1;
                }
                t.lens[i] = j as u8;
                i += 1;
            }
            t
        }

        /// Label `i` (the last one for an index past the end).
        #[inline(always)]
        fn get(&'static self, i: u32) -> &'static str {
            let i = (i as usize).min(N - 1);
            let len = (self.lens[i] as usize).min(LABEL_MAX);
            // SAFETY: the table holds whole labels (ASCII), cut at `len` bytes.
            unsafe { core::str::from_utf8_unchecked(&self.bytes[i][..len]) }
        }
    }

    /// The metrics labels of the drop reasons, by index.
    static DROP_LABELS: Labels<{ DROP_REASON_COUNT as usize }> = {
        let mut l = [""; DROP_REASON_COUNT as usize];
        let mut i = 0;
        while i < l.len() {
            l[i] = DropReason::ALL[i].label();
            i += 1;
        }
        Labels::new(l)
    };

    /// The metrics labels of the actions, by index.
    static ACTION_LABELS: Labels<{ ACTION_COUNT as usize }> = {
        let mut l = [""; ACTION_COUNT as usize];
        let mut i = 0;
        while i < l.len() {
            l[i] = Action::ALL[i].label();
            i += 1;
        }
        Labels::new(l)
    };

    /// The address in the 16-byte form of map keys, as an address of its family.
    #[inline(always)]
    fn ip(addr: &[u8; 16], family: u8) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*addr))
        }
    }

    /// Source and destination of the IP packet in the frame as it is now, if it has one.
    #[inline(always)]
    fn addresses(ctx: &XdpContext) -> Option<(IpAddr, IpAddr)> {
        let l2 = eth::parse(ctx).ok()?;
        if l2.ether_type == eth::ETH_P_IP {
            let a: *const [[u8; 4]; 5] = ptr_at(ctx, l2.l3_off).ok()?;
            // Bytes 12..20 of the IPv4 header: source, then destination.
            let (s, d) = unsafe { ((*a)[3], (*a)[4]) };
            Some((IpAddr::V4(s.into()), IpAddr::V4(d.into())))
        } else if l2.ether_type == eth::ETH_P_IPV6 {
            let a: *const [[u8; 16]; 3] = ptr_at(ctx, l2.l3_off + 8).ok()?;
            // Bytes 8..40 of the IPv6 header: source, then destination.
            let (s, d) = unsafe { ((*a)[0], (*a)[1]) };
            Some((IpAddr::V6(s.into()), IpAddr::V6(d.into())))
        } else {
            None
        }
    }

    /// No choice waiting to be logged.
    const NOTE_NONE: u32 = 0;
    /// A new flow's backend.
    const NOTE_NEW_FLOW: u32 = 1;
    /// The backend of the flow an ICMP error quotes.
    const NOTE_ICMP_ERROR: u32 = 2;

    /// Logs a dropped packet (debug): the packet's addresses and the reason.
    #[inline(always)]
    pub fn drop(ctx: &XdpContext, reason: DropReason) {
        if level_enabled(Level::Debug) {
            l3lb_log_note();
            l3lb_log_drop(ctx.ctx, reason as u32);
        }
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    extern "C" fn l3lb_log_drop(ctx: *mut xdp_md, reason: u32) -> u32 {
        let ctx = XdpContext::new(ctx);
        let label = DROP_LABELS.get(reason);
        match addresses(&ctx) {
            Some((src, dst)) => debug!(&ctx, "drop {} -> {}: {}", src, dst, label),
            None => debug!(
                &ctx,
                "drop {}-byte frame without a readable IP header: {}",
                ctx.data_end() - ctx.data(),
                label
            ),
        }
        0
    }

    /// Logs what the program did with a packet it answered or opened: echo replies and
    /// "too big" answers (debug), decapsulations (trace, one per packet); and the backend
    /// choice noted on the way (a new flow, an ICMP error), whatever the action. Packets
    /// of known flows are not logged.
    #[inline(always)]
    pub fn action(ctx: &XdpContext, action: Action) {
        if level_enabled(Level::Debug) {
            l3lb_log_note();
            if matches!(action, Action::EchoReply | Action::TooBig | Action::Decap) {
                l3lb_log_action(ctx.ctx, action as u32);
            }
        }
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    extern "C" fn l3lb_log_action(ctx: *mut xdp_md, action: u32) -> u32 {
        let ctx = XdpContext::new(ctx);
        // The frame has been rewritten: these are the addresses of what leaves.
        let Some((src, dst)) = addresses(&ctx) else {
            return 0;
        };
        if action == Action::Decap as u32 {
            trace!(&ctx, "decapsulated {} -> {}", src, dst);
        } else {
            let label = ACTION_LABELS.get(action);
            debug!(&ctx, "sent {} -> {}: {}", src, dst, label);
        }
        0
    }

    /// Notes the backend Maglev gave a new flow, logged (debug) when the packet leaves.
    #[inline(always)]
    pub fn new_flow(key: &FlowKey, service: u32, backend: u32) {
        if level_enabled(Level::Debug) {
            note(key, service, backend, NOTE_NEW_FLOW);
        }
    }

    /// Notes the backend an ICMP error about a flow is handed to, logged (debug) when the
    /// packet leaves.
    #[inline(always)]
    pub fn icmp_error(key: &FlowKey, service: u32, backend: u32) {
        if level_enabled(Level::Debug) {
            note(key, service, backend, NOTE_ICMP_ERROR);
        }
    }

    #[inline(always)]
    fn note(key: &FlowKey, service: u32, backend: u32, kind: u32) {
        if let Some(n) = LOG_NOTE.get_ptr_mut(0) {
            // SAFETY: this CPU's entry; only this program, on this CPU, touches it.
            unsafe {
                *n = LogNote {
                    flow: *key,
                    service,
                    backend,
                    kind,
                    _pad: 0,
                }
            };
        }
    }

    /// Logs the choice noted for this packet, if any, and clears the note.
    #[unsafe(no_mangle)]
    #[inline(never)]
    extern "C" fn l3lb_log_note() -> u32 {
        let Some(n) = LOG_NOTE.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: as in `note`.
        let n = unsafe { &mut *n };
        if n.kind == NOTE_NONE {
            return 0;
        }
        let key = &n.flow;
        let (src, dst) = (ip(&key.src, key.family), ip(&key.dst, key.family));
        let (sport, dport) = (u16::from_be(key.sport), u16::from_be(key.dport));
        // No context to read: the statements only need a value to discard.
        let ctx = &();
        if n.kind == NOTE_NEW_FLOW {
            debug!(
                ctx,
                "new flow {}:{} -> {}:{} proto {}: service {} backend {}",
                src,
                sport,
                dst,
                dport,
                key.proto,
                n.service,
                n.backend
            );
        } else {
            debug!(
                ctx,
                "ICMP error about flow {}:{} -> {}:{} proto {}: service {} backend {}",
                src,
                sport,
                dst,
                dport,
                key.proto,
                n.service,
                n.backend
            );
        }
        n.kind = NOTE_NONE;
        0
    }
}

#[cfg(not(feature = "log"))]
mod disabled {
    use aya_ebpf::programs::XdpContext;
    use lb_common::{Action, DropReason, FlowKey};

    /// Compiled out (no `log` feature).
    #[inline(always)]
    pub fn on() -> bool {
        false
    }

    /// Compiled out (no `log` feature).
    #[inline(always)]
    pub fn drop(_: &XdpContext, _: DropReason) {}

    /// Compiled out (no `log` feature).
    #[inline(always)]
    pub fn action(_: &XdpContext, _: Action) {}

    /// Compiled out (no `log` feature).
    #[inline(always)]
    pub fn new_flow(_: &FlowKey, _: u32, _: u32) {}

    /// Compiled out (no `log` feature).
    #[inline(always)]
    pub fn icmp_error(_: &FlowKey, _: u32, _: u32) {}
}
