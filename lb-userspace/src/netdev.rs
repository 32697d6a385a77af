//! What the kernel says about devices and XDP, over netlink: which devices XDP can
//! transmit on (the generic-netlink `netdev` family's XDP features, Linux 6.3 and later),
//! which program is attached to an interface in its driver (rtnetlink's `IFLA_XDP`), and
//! the VLAN devices with their parents and ids (rtnetlink's link info).
//!
//! A natively attached program that redirects a frame to a device without XDP transmit
//! loses it after the program has returned, where no counter of ours sees it: the agent
//! lists such devices for the program (`L3LB_NO_XMIT`), which then drops the packet with
//! a counted reason instead. No crate this project may use defines the `netdev` family;
//! the exchange is two small requests, written here on a plain netlink socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, bail};

/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes frames redirected by XDP.
const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// Set on a dump's messages when the kernel's state changed while it was taken.
const NLM_F_DUMP_INTR: u16 = 0x10;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const RTM_GETLINK: u16 = 18;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VLAN_ID: u16 = 1;
const IFLA_VLAN_PROTOCOL: u16 = 5;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_EXT_MASK: u16 = 29;
/// `RTEXT_FILTER_SKIP_STATS`: links without their counters, most of each message.
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const ETH_P_8021Q: u16 = 0x8100;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
/// `IFLA_XDP_ATTACHED`: the one program is attached in the driver (native mode).
const XDP_ATTACHED_DRV: u8 = 1;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A netlink socket of one protocol, with a sequence number per request.
struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    fn open(protocol: libc::c_int) -> anyhow::Result<Socket> {
        // SAFETY: plain socket call; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a netlink socket");
        }
        // SAFETY: a descriptor this call just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not hold up the agent's loop.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setting a netlink receive timeout");
        }
        Ok(Socket { fd, seq: 0 })
    }

    /// Sends `payload` as a message of `kind` with `flags` (`NLM_F_REQUEST` added);
    /// returns its sequence number.
    fn send(&mut self, kind: u16, flags: u16, payload: &[u8]) -> anyhow::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: an all-zero sockaddr_nl is valid; it addresses the kernel (pid 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buffer and address valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("sending a netlink request");
        }
        Ok(self.seq)
    }

    /// The answer to request `seq`: the payload of every message until the end of a
    /// dump, or the one message of a plain request. A kernel error fails the call with
    /// its errno.
    fn answer(&mut self, seq: u32, dump: bool) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("reading a netlink answer");
            }
            match messages(&buf[..n as usize], seq, &mut out)? {
                Step::Done => return Ok(out),
                Step::More if !dump && !out.is_empty() => return Ok(out),
                Step::More => {}
            }
        }
    }
}

/// Whether a dump goes on after one datagram of it.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    More,
    Done,
}

/// Splits one received datagram into its messages for request `seq`, adding their
/// payloads to `out`; messages of other requests are skipped.
fn messages(mut buf: &[u8], seq: u32, out: &mut Vec<Vec<u8>>) -> anyhow::Result<Step> {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into()?);
        let flags = u16::from_ne_bytes(buf[6..8].try_into()?);
        let msg_seq = u32::from_ne_bytes(buf[8..12].try_into()?);
        if len < 16 || len > buf.len() {
            bail!(
                "netlink message of {len} bytes in a datagram of {}",
                buf.len()
            );
        }
        let payload = &buf[16..len];
        if msg_seq == seq {
            if flags & NLM_F_DUMP_INTR != 0 {
                bail!("the kernel's devices changed while they were listed");
            }
            match kind {
                NLMSG_DONE => {
                    // A dump's end carries the dump's own error, if it failed.
                    let errno = payload
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if errno < 0 {
                        return Err(io::Error::from_raw_os_error(-errno))
                            .context("the kernel ended the netlink dump with an error");
                    }
                    return Ok(Step::Done);
                }
                NLMSG_ERROR => {
                    let errno = payload
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .context("short netlink error message")?;
                    if errno == 0 {
                        // An acknowledgement.
                        return Ok(Step::Done);
                    }
                    return Err(io::Error::from_raw_os_error(-errno))
                        .context("the kernel refused the netlink request");
                }
                _ => out.push(payload.to_vec()),
            }
        }
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(Step::More)
}

/// The attributes in `buf` as (type, value) pairs.
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// An attribute of type `kind` holding `value`, padded.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(4 + value.len() + 3);
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize((a.len() + 3) & !3, 0);
    a
}

/// The interfaces of this network namespace that XDP cannot transmit on now, by index;
/// `None` when the kernel has no `netdev` family (before Linux 6.3: nothing to go by).
pub fn without_xdp_transmit() -> anyhow::Result<Option<BTreeSet<u32>>> {
    let mut s = Socket::open(libc::NETLINK_GENERIC)?;
    let mut get = vec![CTRL_CMD_GETFAMILY, 1, 0, 0];
    get.extend(attribute(CTRL_ATTR_FAMILY_NAME, b"netdev\0"));
    let seq = s.send(GENL_ID_CTRL, 0, &get)?;
    let family = match s.answer(seq, false) {
        Ok(msgs) => msgs
            .first()
            .and_then(|m| m.get(4..))
            .and_then(|attrs| {
                attributes(attrs)
                    .into_iter()
                    .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
                    .and_then(|(_, v)| v.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            })
            .context("the netdev family's id is missing from the kernel's answer")?,
        Err(e)
            if e.downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error)
                == Some(libc::ENOENT) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.context("looking up the netdev netlink family")),
    };
    let seq = s.send(family, NLM_F_DUMP, &[NETDEV_CMD_DEV_GET, 1, 0, 0])?;
    let msgs = s
        .answer(seq, true)
        .context("listing the devices' XDP features")?;
    Ok(Some(incapable(&msgs)))
}

/// The devices of a `netdev` dump (each message a generic-netlink header and the
/// device's attributes) whose XDP features lack `ndo-xmit`.
fn incapable(msgs: &[Vec<u8>]) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for m in msgs {
        let attrs = attributes(m.get(4..).unwrap_or(&[]));
        let value = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        let Some(index) = value(NETDEV_A_DEV_IFINDEX)
            .and_then(|v| v.get(0..4))
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        else {
            continue;
        };
        let features = value(NETDEV_A_DEV_XDP_FEATURES)
            .and_then(|v| v.get(0..8))
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        if features & XDP_ACT_NDO_XMIT == 0 {
            out.insert(index);
        }
    }
    out
}

/// The id of the program attached to interface `ifindex` in its driver (native mode),
/// if any (rtnetlink's `IFLA_XDP`; with programs in several modes at once, the driver's).
pub fn driver_program(ifindex: u32) -> anyhow::Result<Option<u32>> {
    let mut s = Socket::open(libc::NETLINK_ROUTE)?;
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut req = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    let seq = s.send(RTM_GETLINK, 0, &req)?;
    let msgs = s
        .answer(seq, false)
        .with_context(|| format!("asking for interface {ifindex}'s XDP programs"))?;
    Ok(driver_program_of(
        msgs.first().map(Vec::as_slice).unwrap_or(&[]),
    ))
}

/// The driver's program an `RTM_NEWLINK` payload (ifinfomsg, then attributes) reports.
fn driver_program_of(link: &[u8]) -> Option<u32> {
    let xdp = attributes(link.get(16..).unwrap_or(&[]))
        .into_iter()
        .find(|(k, _)| *k == IFLA_XDP)?
        .1;
    let attrs = attributes(xdp);
    let value = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let id = |v: &[u8]| {
        v.get(0..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    // Several modes at once name each mode's program; the driver's alone names only
    // the one.
    match value(IFLA_XDP_DRV_PROG_ID).and_then(id) {
        Some(p) => Some(p),
        None if value(IFLA_XDP_ATTACHED).and_then(|v| v.first().copied())
            == Some(XDP_ATTACHED_DRV) =>
        {
            value(IFLA_XDP_PROG_ID).and_then(id)
        }
        None => None,
    }
}

/// The VLAN devices of this network namespace whose parent is an interface of it and no
/// VLAN device itself, by index: the parent and the tag (`lb_common::VlanDev`). Stacked
/// tags (802.1ad over 802.1Q) and parents in other namespaces are left out.
pub fn vlan_devices() -> anyhow::Result<BTreeMap<u32, lb_common::VlanDev>> {
    // Without the kernel's 802.1Q code (its /proc/net/vlan, per namespace) there are no
    // VLAN devices, and the kind filter below would be ignored: every link dumped, every
    // second.
    if !std::path::Path::new("/proc/net/vlan").exists() {
        return Ok(BTreeMap::new());
    }
    let mut s = Socket::open(libc::NETLINK_ROUTE)?;
    // struct ifinfomsg, then a link info naming the kind: the kernel dumps only those,
    // without their counters.
    let mut req = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    req.extend_from_slice(&[0; 12]);
    req.extend(attribute(
        IFLA_EXT_MASK,
        &RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    ));
    req.extend(attribute(
        IFLA_LINKINFO,
        &attribute(IFLA_INFO_KIND, b"vlan\0"),
    ));
    let seq = s.send(RTM_GETLINK, NLM_F_DUMP, &req)?;
    let msgs = s.answer(seq, true).context("listing the VLAN devices")?;
    Ok(vlans_of(&msgs))
}

/// The VLAN devices among `RTM_NEWLINK` payloads (see `vlan_devices`).
fn vlans_of(links: &[Vec<u8>]) -> BTreeMap<u32, lb_common::VlanDev> {
    let mut found = BTreeMap::new();
    for link in links {
        let Some(index) = link
            .get(4..8)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .and_then(|i| u32::try_from(i).ok())
        else {
            continue;
        };
        let attrs = attributes(link.get(16..).unwrap_or(&[]));
        let value = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        if value(IFLA_LINK_NETNSID).is_some() {
            continue;
        }
        let Some(parent) = value(IFLA_LINK)
            .and_then(|v| v.get(0..4))
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        else {
            continue;
        };
        let info = attributes(value(IFLA_LINKINFO).unwrap_or(&[]));
        let info_value = |kind: u16| info.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        if info_value(IFLA_INFO_KIND).map(|k| k.split(|&b| b == 0).next()) != Some(Some(b"vlan")) {
            continue;
        }
        let data = attributes(info_value(IFLA_INFO_DATA).unwrap_or(&[]));
        let data_value = |kind: u16| data.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        let Some(vid) = data_value(IFLA_VLAN_ID)
            .and_then(|v| v.get(0..2))
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        else {
            continue;
        };
        let tpid = data_value(IFLA_VLAN_PROTOCOL)
            .and_then(|v| v.get(0..2))
            .map_or(ETH_P_8021Q, |b| u16::from_be_bytes([b[0], b[1]]));
        found.insert(index, lb_common::VlanDev::new(parent, tpid, vid));
    }
    // A VLAN on a VLAN needs two tags: not listed (the device stays one XDP cannot
    // transmit on).
    let stacked: Vec<u32> = found
        .iter()
        .filter(|(_, v)| found.contains_key(&v.parent))
        .map(|(i, _)| *i)
        .collect();
    for i in stacked {
        found.remove(&i);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize((m.len() + 3) & !3, 0);
        m
    }

    fn device(index: u32, features: Option<u64>) -> Vec<u8> {
        let mut p = vec![NETDEV_CMD_DEV_GET, 1, 0, 0];
        p.extend(attribute(NETDEV_A_DEV_IFINDEX, &index.to_ne_bytes()));
        if let Some(f) = features {
            p.extend(attribute(NETDEV_A_DEV_XDP_FEATURES, &f.to_ne_bytes()));
        }
        p
    }

    #[test]
    fn a_dump_lists_the_devices_without_ndo_xmit() {
        // Features as this kernel reports them: a veth whose peer runs GRO (0x67), one
        // whose peer does not (0x23), a bridge (0), a tap (7), one without the attribute.
        let mut dgram = Vec::new();
        for (i, f) in [
            (3, Some(0x67)),
            (4, Some(0x23)),
            (5, Some(0)),
            (6, Some(7)),
            (7, None),
        ] {
            dgram.extend(nlmsg(0x14, 9, &device(i, f)));
        }
        // A message of another request is not ours.
        dgram.extend(nlmsg(0x14, 8, &device(8, Some(0))));
        let mut out = Vec::new();
        assert_eq!(messages(&dgram, 9, &mut out).unwrap(), Step::More);
        assert_eq!(
            messages(&nlmsg(NLMSG_DONE, 9, &[0; 4]), 9, &mut out).unwrap(),
            Step::Done
        );
        assert_eq!(incapable(&out), BTreeSet::from([4, 5, 7]));
    }

    #[test]
    fn a_kernel_error_fails_with_its_errno() {
        let err = messages(
            &nlmsg(NLMSG_ERROR, 1, &(-libc::ENOENT).to_ne_bytes()),
            1,
            &mut Vec::new(),
        )
        .unwrap_err();
        let io = err.downcast_ref::<io::Error>().expect("an io error");
        assert_eq!(io.raw_os_error(), Some(libc::ENOENT));
        // A cut message is refused, not read past.
        let mut cut = nlmsg(0x14, 1, &device(3, Some(0)));
        cut.truncate(20);
        assert!(messages(&cut, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn the_driver_program_is_read_from_the_nested_xdp_attribute() {
        let link = |attrs: &[(u16, &[u8])]| {
            let mut p = vec![0u8; 16];
            p.extend(attribute(3, b"eth0\0"));
            if !attrs.is_empty() {
                let nested: Vec<u8> = attrs.iter().flat_map(|(k, v)| attribute(*k, v)).collect();
                // NLA_F_NESTED set on the outer attribute, as the kernel sends it.
                p.extend(attribute(IFLA_XDP | 0x8000, &nested));
            }
            p
        };
        let id = 7u32.to_ne_bytes();
        // Native alone: the program's id.
        assert_eq!(
            driver_program_of(&link(&[(IFLA_XDP_ATTACHED, &[1]), (IFLA_XDP_PROG_ID, &id)])),
            Some(7)
        );
        // Generic or offloaded alone: none in the driver.
        for mode in [2u8, 3] {
            assert_eq!(
                driver_program_of(&link(&[
                    (IFLA_XDP_ATTACHED, &[mode]),
                    (IFLA_XDP_PROG_ID, &id)
                ])),
                None
            );
        }
        // Several at once: the driver's by its own attribute.
        let generic = 9u32.to_ne_bytes();
        assert_eq!(
            driver_program_of(&link(&[
                (IFLA_XDP_ATTACHED, &[4]),
                (IFLA_XDP_SKB_PROG_ID_FOR_TESTS, &generic),
                (IFLA_XDP_DRV_PROG_ID, &id),
            ])),
            Some(7)
        );
        assert_eq!(
            driver_program_of(&link(&[
                (IFLA_XDP_ATTACHED, &[4]),
                (IFLA_XDP_SKB_PROG_ID_FOR_TESTS, &generic),
            ])),
            None
        );
        assert_eq!(driver_program_of(&link(&[(IFLA_XDP_ATTACHED, &[0])])), None);
        assert_eq!(driver_program_of(&link(&[])), None);
    }

    /// `IFLA_XDP_SKB_PROG_ID`.
    const IFLA_XDP_SKB_PROG_ID_FOR_TESTS: u16 = 6;

    #[test]
    fn an_interrupted_or_failed_dump_is_an_error() {
        let mut m = nlmsg(0x14, 3, &device(3, Some(0)));
        m[6..8].copy_from_slice(&(2 | NLM_F_DUMP_INTR).to_ne_bytes());
        assert!(messages(&m, 3, &mut Vec::new()).is_err());
        let err = messages(
            &nlmsg(NLMSG_DONE, 3, &(-libc::EBUSY).to_ne_bytes()),
            3,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error),
            Some(libc::EBUSY)
        );
    }

    fn vlan_link(
        index: i32,
        parent: Option<u32>,
        kind: &[u8],
        vid: u16,
        tpid: Option<u16>,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&index.to_ne_bytes());
        p.extend(attribute(3, b"eth0.100\0"));
        if let Some(parent) = parent {
            p.extend(attribute(IFLA_LINK, &parent.to_ne_bytes()));
        }
        let mut data = attribute(IFLA_VLAN_ID, &vid.to_ne_bytes());
        data.extend(attribute(2, &[0; 8]));
        if let Some(t) = tpid {
            data.extend(attribute(IFLA_VLAN_PROTOCOL, &t.to_be_bytes()));
        }
        let mut info = attribute(IFLA_INFO_KIND, kind);
        info.extend(attribute(IFLA_INFO_DATA | 0x8000, &data));
        p.extend(attribute(IFLA_LINKINFO | 0x8000, &info));
        p
    }

    #[test]
    fn vlan_devices_are_read_with_parent_id_and_protocol() {
        let links = vec![
            vlan_link(10, Some(2), b"vlan\0", 100, Some(0x8100)),
            // 802.1ad, and a protocol attribute left out (802.1Q then).
            vlan_link(11, Some(2), b"vlan\0", 200, Some(0x88a8)),
            vlan_link(12, Some(3), b"vlan\0", 4095, None),
            // Not a VLAN; no parent; a VLAN on the VLAN 10 (two tags: left out).
            vlan_link(13, Some(2), b"macvlan\0", 7, None),
            vlan_link(14, None, b"vlan\0", 7, None),
            vlan_link(15, Some(10), b"vlan\0", 7, None),
        ];
        let mut netns = vlan_link(16, Some(2), b"vlan\0", 8, None);
        netns.extend(attribute(IFLA_LINK_NETNSID, &1i32.to_ne_bytes()));
        let mut all = links.clone();
        all.push(netns);
        let got = vlans_of(&all);
        assert_eq!(
            got,
            BTreeMap::from([
                (10, lb_common::VlanDev::new(2, 0x8100, 100)),
                (11, lb_common::VlanDev::new(2, 0x88a8, 200)),
                (12, lb_common::VlanDev::new(3, 0x8100, 4095)),
            ])
        );
        // The tag as it lies in the frame.
        let bytes: Vec<u8> = got[&10].tag.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [0x81, 0x00, 0x00, 100]);
    }

    #[test]
    fn this_kernel_answers_both_requests() {
        // The loopback device takes no XDP frames and has no program.
        match without_xdp_transmit().expect("netdev dump") {
            Some(set) => assert!(set.contains(&1), "lo listed: {set:?}"),
            None => eprintln!("no netdev family on this kernel"),
        }
        assert_eq!(driver_program(1).expect("RTM_GETLINK"), None);
        // No VLAN devices here (and a kernel without 802.1Q lists none).
        assert_eq!(vlan_devices().expect("VLAN dump"), BTreeMap::new());
    }
}
