//! Client-side helpers: every socket is created inside the given namespace (normally
//! `lab.client.ns`), so traffic leaves through that namespace's `eth0`.
//!
//! TCP sockets close abortively (RST, no TIME_WAIT), so a test can reuse a source port
//! right away to check that the same 5-tuple lands on the same backend.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    ops::Range,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{netns::Netns, sock};

/// Worker threads a bulk run uses.
const BULK_WORKERS: usize = 8;

/// A bulk run gives up on the connections it has not started after this long.
const BULK_DEADLINE: Duration = Duration::from_secs(20);

/// Payload [`udp_request`] sends.
const UDP_PROBE: &[u8] = b"l3lb-probe";

/// A server's greeting, parsed: who answered and whom it saw.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The server's name (`backend=<name>`).
    pub backend: String,
    /// The peer address the server saw (`peer=<addr>`).
    pub peer: SocketAddr,
    /// The backend address the balancer sent the connection to (`to=<addr>`), where the
    /// backend namespace marks it (see [`crate::servers::reply_line_to`]).
    pub to: Option<IpAddr>,
}

/// Parses `backend=<name> peer=<addr>[ to=<addr>]` (with or without the trailing newline).
pub fn parse_reply(line: &str) -> Result<Reply> {
    let line = line.trim_end();
    let rest = line
        .strip_prefix("backend=")
        .with_context(|| format!("not a server reply: {line:?}"))?;
    let (backend, rest) = rest
        .split_once(" peer=")
        .with_context(|| format!("server reply without peer: {line:?}"))?;
    let (peer, to) = match rest.split_once(" to=") {
        Some((peer, to)) => (peer, Some(to)),
        None => (rest, None),
    };
    let peer = peer
        .parse()
        .with_context(|| format!("server reply with a bad peer address: {line:?}"))?;
    let to = to
        .map(str::parse)
        .transpose()
        .with_context(|| format!("server reply with a bad backend address: {line:?}"))?;
    Ok(Reply {
        backend: backend.to_owned(),
        peer,
        to,
    })
}

/// Connects to `vip:port` from `ns` (from `src_port` if given) and returns the first line.
pub fn tcp_request(
    ns: &Netns,
    vip: IpAddr,
    port: u16,
    src_port: Option<u16>,
    timeout: Duration,
) -> Result<String> {
    let target = SocketAddr::new(vip, port);
    ns.enter(|| tcp_request_here(target, src_port, timeout))?
}

/// Connects from `ns` to `vip:port` from the local address `src` (one of the namespace's
/// own; port 0: any) and returns the first line.
pub fn tcp_request_from(
    ns: &Netns,
    src: SocketAddr,
    vip: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<String> {
    let target = SocketAddr::new(vip, port);
    ns.enter(|| tcp_request_bound(target, Some(src), timeout))?
}

/// Like [`tcp_request`], from the calling thread's own namespace: for worker threads
/// already inside it (see [`Netns::spawn_thread`]), which then skip entering it per call.
pub fn tcp_request_here(
    target: SocketAddr,
    src_port: Option<u16>,
    timeout: Duration,
) -> Result<String> {
    tcp_request_bound(
        target,
        src_port.map(|p| sock::any_addr(target.ip(), p)),
        timeout,
    )
}

fn tcp_request_bound(
    target: SocketAddr,
    local: Option<SocketAddr>,
    timeout: Duration,
) -> Result<String> {
    let stream = sock::tcp_connect_bound(target, local, timeout)
        .with_context(|| bound_context(target, local))?;
    let mut reader = BufReader::new(stream);
    read_first_line(&mut reader, target)
}

fn connect_context(target: SocketAddr, src_port: Option<u16>) -> String {
    match src_port {
        Some(p) => format!("TCP connect to {target} from port {p}"),
        None => format!("TCP connect to {target}"),
    }
}

fn bound_context(target: SocketAddr, local: Option<SocketAddr>) -> String {
    match local {
        Some(l) => format!("TCP connect to {target} from {l}"),
        None => format!("TCP connect to {target}"),
    }
}

fn read_first_line<R: BufRead>(reader: &mut R, target: SocketAddr) -> Result<String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("reading the greeting from {target}"))?;
    if !line.ends_with('\n') {
        bail!("{target} closed the connection before a full line (got {line:?})");
    }
    line.pop();
    Ok(line)
}

/// Sends one datagram from `ns` to `vip:port` and returns the reply's first line.
pub fn udp_request(
    ns: &Netns,
    vip: IpAddr,
    port: u16,
    src_port: Option<u16>,
    timeout: Duration,
) -> Result<String> {
    let reply = udp_exchange(ns, SocketAddr::new(vip, port), src_port, UDP_PROBE, timeout)?;
    let text = String::from_utf8_lossy(&reply);
    let (line, _) = text
        .split_once('\n')
        .with_context(|| format!("UDP reply without a line: {text:?}"))?;
    Ok(line.to_owned())
}

/// Sends `payload` from `ns` (from `src_port` if given) and returns the whole reply.
///
/// The socket is connected, so only a reply from `target` itself is accepted.
pub fn udp_exchange(
    ns: &Netns,
    target: SocketAddr,
    src_port: Option<u16>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    ns.enter(|| udp_exchange_here(target, src_port, payload, timeout))?
}

/// Like [`udp_exchange`], from the local address `src` (one of the namespace's own; port
/// 0: any).
pub fn udp_exchange_from(
    ns: &Netns,
    src: SocketAddr,
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    ns.enter(|| udp_exchange_bound(src, target, payload, timeout))?
}

/// Sends one probe datagram from `src` (see [`udp_exchange_from`]) and returns the
/// reply's first line.
pub fn udp_request_from(
    ns: &Netns,
    src: SocketAddr,
    vip: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<String> {
    let reply = udp_exchange_from(ns, src, SocketAddr::new(vip, port), UDP_PROBE, timeout)?;
    let text = String::from_utf8_lossy(&reply);
    let (line, _) = text
        .split_once('\n')
        .with_context(|| format!("UDP reply without a line: {text:?}"))?;
    Ok(line.to_owned())
}

fn udp_exchange_here(
    target: SocketAddr,
    src_port: Option<u16>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let local = sock::any_addr(target.ip(), src_port.unwrap_or(0));
    udp_exchange_bound(local, target, payload, timeout)
}

fn udp_exchange_bound(
    local: SocketAddr,
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let socket = UdpSocket::bind(local).with_context(|| format!("binding UDP to {local}"))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket
        .send(payload)
        .with_context(|| format!("sending UDP to {target}"))?;
    let mut buf = vec![0u8; 65536];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("waiting {timeout:?} for a UDP reply from {target}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// An open TCP connection whose liveness can be checked later with an echo.
#[derive(Debug)]
pub struct TcpPersistent {
    reader: BufReader<TcpStream>,
    first_line: String,
    local: SocketAddr,
    target: SocketAddr,
}

/// Opens a [`TcpPersistent`] from `ns` to `vip:port` and reads the greeting.
pub fn tcp_connect_persistent(
    ns: &Netns,
    vip: IpAddr,
    port: u16,
    src_port: Option<u16>,
    timeout: Duration,
) -> Result<TcpPersistent> {
    TcpPersistent::connect(ns, vip, port, src_port, timeout)
}

impl TcpPersistent {
    /// Connects from `ns` to `vip:port` (from `src_port` if given) and reads the greeting.
    pub fn connect(
        ns: &Netns,
        vip: IpAddr,
        port: u16,
        src_port: Option<u16>,
        timeout: Duration,
    ) -> Result<Self> {
        let target = SocketAddr::new(vip, port);
        let stream = ns
            .enter(|| sock::tcp_connect_from(target, src_port, timeout))?
            .with_context(|| connect_context(target, src_port))?;
        let local = stream.local_addr()?;
        let mut reader = BufReader::new(stream);
        let first_line = read_first_line(&mut reader, target)?;
        Ok(TcpPersistent {
            reader,
            first_line,
            local,
            target,
        })
    }

    /// The greeting line (without newline).
    pub fn first_line(&self) -> &str {
        &self.first_line
    }

    /// The greeting, parsed.
    pub fn reply(&self) -> Result<Reply> {
        parse_reply(&self.first_line)
    }

    /// The client's own address of this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends `payload` and expects it echoed back in full within `timeout`.
    pub fn echo(&mut self, payload: &[u8], timeout: Duration) -> Result<()> {
        let target = self.target;
        let stream = self.reader.get_mut();
        stream.set_write_timeout(Some(timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        stream
            .write_all(payload)
            .with_context(|| format!("sending {} bytes to {target}", payload.len()))?;
        let mut back = vec![0u8; payload.len()];
        self.reader
            .read_exact(&mut back)
            .with_context(|| format!("waiting {timeout:?} for the echo from {target}"))?;
        if back != payload {
            bail!("{target} echoed {back:?}, expected {payload:?}");
        }
        Ok(())
    }

    /// True if an echo round trip works within `timeout`.
    pub fn is_alive(&mut self, timeout: Duration) -> bool {
        self.echo(b"ping\n", timeout).is_ok()
    }
}

/// Results of many connections from distinct source ports.
#[derive(Debug, Default, Clone)]
pub struct Bulk {
    /// Successful connections per backend name.
    pub counts: HashMap<String, usize>,
    /// Every peer address the backends reported.
    pub peers: HashSet<SocketAddr>,
    /// Backend chosen per source port (successes only).
    pub by_src_port: HashMap<u16, String>,
    /// Successful connections.
    pub ok: usize,
    /// Failed or not attempted connections.
    pub failures: usize,
    /// The first few error messages, for assertion output.
    pub errors: Vec<String>,
}

impl Bulk {
    /// Total attempts (successes and failures).
    pub fn total(&self) -> usize {
        self.ok + self.failures
    }
}

/// Makes one TCP connection per source port in `src_ports` to `vip:port` from `ns`.
///
/// Runs 8 in parallel, each with `timeout`; stops starting new ones after 20 s.
pub fn tcp_bulk(
    ns: &Netns,
    vip: IpAddr,
    port: u16,
    src_ports: Range<u16>,
    timeout: Duration,
) -> Result<Bulk> {
    let target = SocketAddr::new(vip, port);
    bulk(ns, src_ports, |src| {
        tcp_request_here(target, Some(src), timeout).map_err(|e| format!("{e:#}"))
    })
}

/// Like [`tcp_bulk`], every connection from the local address `src_ip` (one of the
/// namespace's own).
pub fn tcp_bulk_from(
    ns: &Netns,
    src_ip: IpAddr,
    vip: IpAddr,
    port: u16,
    src_ports: Range<u16>,
    timeout: Duration,
) -> Result<Bulk> {
    let target = SocketAddr::new(vip, port);
    bulk(ns, src_ports, |src| {
        tcp_request_bound(target, Some(SocketAddr::new(src_ip, src)), timeout)
            .map_err(|e| format!("{e:#}"))
    })
}

/// Sends one UDP datagram per source port in `src_ports` to `vip:port` from `ns`.
///
/// Same parallelism and bounds as [`tcp_bulk`].
pub fn udp_bulk(
    ns: &Netns,
    vip: IpAddr,
    port: u16,
    src_ports: Range<u16>,
    timeout: Duration,
) -> Result<Bulk> {
    let target = SocketAddr::new(vip, port);
    bulk(ns, src_ports, |src| {
        let reply = udp_exchange_here(target, Some(src), UDP_PROBE, timeout)
            .map_err(|e| format!("{e:#}"))?;
        let text = String::from_utf8_lossy(&reply);
        text.split_once('\n')
            .map(|(line, _)| line.to_owned())
            .ok_or_else(|| format!("UDP reply without a line: {text:?}"))
    })
}

fn bulk<F>(ns: &Netns, src_ports: Range<u16>, one: F) -> Result<Bulk>
where
    F: Fn(u16) -> std::result::Result<String, String> + Sync,
{
    let ports: Vec<u16> = src_ports.collect();
    let next = AtomicUsize::new(0);
    let deadline = Instant::now() + BULK_DEADLINE;
    let results: Mutex<Vec<(u16, std::result::Result<String, String>)>> = Mutex::new(Vec::new());
    let workers = BULK_WORKERS.min(ports.len());
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    ns.join_current_thread()?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&src) = ports.get(i) else {
                            return Ok(());
                        };
                        let result = if Instant::now() < deadline {
                            one(src)
                        } else {
                            Err(format!(
                                "not attempted: bulk deadline of {BULK_DEADLINE:?} passed"
                            ))
                        };
                        results
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((src, result));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow!("a bulk worker panicked"))??;
        }
        Ok(())
    })?;
    let mut out = Bulk::default();
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(src, _)| *src);
    for (src, result) in results {
        match result.and_then(|line| parse_reply(&line).map_err(|e| format!("{e:#}"))) {
            Ok(reply) => {
                out.ok += 1;
                *out.counts.entry(reply.backend.clone()).or_default() += 1;
                out.peers.insert(reply.peer);
                out.by_src_port.insert(src, reply.backend);
            }
            Err(e) => {
                out.failures += 1;
                if out.errors.len() < 10 {
                    out.errors.push(format!("source port {src}: {e}"));
                }
            }
        }
    }
    Ok(out)
}

/// The outcome of a bulk transfer (see [`crate::bulk`]): who served it, and the byte count
/// and digest of what arrived at the receiving end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The greeting of the server that handled the connection.
    pub reply: Reply,
    /// Bytes that arrived (at the server for an upload, at the client for a download).
    pub bytes: u64,
    /// [`crate::bulk::Digest`] of those bytes.
    pub digest: u64,
}

/// Opens a bulk connection and reads the greeting; the stream's timeouts are `timeout`.
fn bulk_connect(
    ns: &Netns,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(BufReader<TcpStream>, Reply)> {
    let stream = ns
        .enter(|| sock::tcp_connect_bound(target, None, timeout))?
        .with_context(|| bound_context(target, None))?;
    let mut reader = BufReader::new(stream);
    let line = read_first_line(&mut reader, target)?;
    Ok((reader, parse_reply(&line)?))
}

fn check_deadline(deadline: Instant, what: &str, done: u64, total: u64) -> Result<()> {
    if Instant::now() > deadline {
        bail!("{what}: only {done} of {total} bytes before the deadline");
    }
    Ok(())
}

/// Sends `n` bytes of the pattern of `seed` to a [`crate::BulkServer`] at `target` from
/// `ns`, and returns what the server says it received. Everything within `timeout`.
pub fn upload(
    ns: &Netns,
    target: SocketAddr,
    n: u64,
    seed: u64,
    timeout: Duration,
) -> Result<Transfer> {
    let deadline = Instant::now() + timeout;
    let (mut reader, reply) = bulk_connect(ns, target, timeout)?;
    let what = format!("uploading to {target} ({})", reply.backend);
    reader
        .get_mut()
        .write_all(format!("upload {n}\n").as_bytes())
        .with_context(|| what.clone())?;
    let mut pattern = crate::bulk::Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < n {
        check_deadline(deadline, &what, sent, n)?;
        let chunk = usize::try_from(n - sent)
            .unwrap_or(buf.len())
            .min(buf.len());
        pattern.fill(&mut buf[..chunk]);
        reader
            .get_mut()
            .write_all(&buf[..chunk])
            .with_context(|| format!("{what}: after {sent} of {n} bytes"))?;
        sent += chunk as u64;
    }
    let line = read_first_line(&mut reader, target).with_context(|| what.clone())?;
    let mut words = line.split_whitespace();
    let (Some("received"), Some(bytes), Some(digest), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        bail!("{what}: unexpected answer {line:?}");
    };
    Ok(Transfer {
        reply,
        bytes: bytes
            .parse()
            .with_context(|| format!("{what}: bad count in {line:?}"))?,
        digest: u64::from_str_radix(digest, 16)
            .with_context(|| format!("{what}: bad digest in {line:?}"))?,
    })
}

/// Asks a [`crate::BulkServer`] at `target` for `n` bytes of the pattern of `seed` and
/// reads until it closes (all within `timeout`); returns what arrived.
pub fn download(
    ns: &Netns,
    target: SocketAddr,
    n: u64,
    seed: u64,
    timeout: Duration,
) -> Result<Transfer> {
    let deadline = Instant::now() + timeout;
    let (mut reader, reply) = bulk_connect(ns, target, timeout)?;
    let what = format!("downloading from {target} ({})", reply.backend);
    reader
        .get_mut()
        .write_all(format!("download {n} {seed}\n").as_bytes())
        .with_context(|| what.clone())?;
    let mut digest = crate::bulk::Digest::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        check_deadline(deadline, &what, got, n)?;
        let k = reader
            .read(&mut buf)
            .with_context(|| format!("{what}: after {got} of {n} bytes"))?;
        if k == 0 {
            break;
        }
        digest.update(&buf[..k]);
        got += k as u64;
    }
    Ok(Transfer {
        reply,
        bytes: got,
        digest: digest.value(),
    })
}

/// An ICMP echo reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// Source address of the reply.
    pub from: Ipv4Addr,
    /// Its TTL as received.
    pub ttl: u8,
    /// The echoed payload.
    pub payload: Vec<u8>,
}

/// Sends one ICMP echo request (`ping`) from `ns` to `target` and waits up to `timeout`
/// for the matching reply (same identifier and sequence number, from `target`).
///
/// Uses a raw ICMP socket (root has CAP_NET_RAW), so no `ping_group_range` is needed.
pub fn ping(
    ns: &Netns,
    target: Ipv4Addr,
    seq: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<EchoReply> {
    ns.enter(|| ping_here(target, seq, payload, timeout))?
}

fn ping_here(target: Ipv4Addr, seq: u16, payload: &[u8], timeout: Duration) -> Result<EchoReply> {
    let fd = sock::icmp_raw_socket().context("opening a raw ICMP socket")?;
    // The identifier only has to tell this request apart from others in the namespace.
    let id = (std::process::id() as u16) ^ seq.rotate_left(8) ^ 0x4c33;
    let mut request = vec![8u8, 0, 0, 0];
    request.extend_from_slice(&id.to_be_bytes());
    request.extend_from_slice(&seq.to_be_bytes());
    request.extend_from_slice(payload);
    let sum = sock::inet_checksum(&request);
    request[2..4].copy_from_slice(&sum.to_be_bytes());
    sock::send_to(&fd, &request, SocketAddr::new(IpAddr::V4(target), 0))
        .with_context(|| format!("sending an echo request to {target}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no echo reply from {target} within {timeout:?}");
        }
        let Some((n, from)) = sock::recv_from_within(&fd, &mut buf, left)? else {
            continue;
        };
        // A raw IPv4 socket delivers the IP header too.
        let packet = &buf[..n];
        let Some(&vihl) = packet.first() else {
            continue;
        };
        let ihl = usize::from(vihl & 0x0f) * 4;
        let (Some(&ttl), Some(icmp)) = (packet.get(8), packet.get(ihl..)) else {
            continue;
        };
        if from != IpAddr::V4(target)
            || icmp.len() < 8
            || icmp[0] != 0
            || icmp[4..6] != id.to_be_bytes()
            || icmp[6..8] != seq.to_be_bytes()
        {
            continue;
        }
        if sock::inet_checksum(icmp) != 0 {
            bail!("echo reply from {target} with a bad ICMP checksum: {icmp:02x?}");
        }
        return Ok(EchoReply {
            from: target,
            ttl,
            payload: icmp[8..].to_vec(),
        });
    }
}

/// An ICMPv6 echo reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply6 {
    /// Source address of the reply.
    pub from: Ipv6Addr,
    /// The echoed payload.
    pub payload: Vec<u8>,
}

/// Sends one ICMPv6 echo request from `ns` (from its address `src`) to `target` and waits
/// up to `timeout` for the matching reply (same identifier and sequence number, from
/// `target`, with a correct checksum over the pseudo-header `target` → `src`).
///
/// Uses a raw ICMPv6 socket bound to `src`; the kernel computes the request's checksum.
pub fn ping6(
    ns: &Netns,
    src: Ipv6Addr,
    target: Ipv6Addr,
    seq: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<EchoReply6> {
    ns.enter(|| ping6_here(src, target, seq, payload, timeout))?
}

fn ping6_here(
    src: Ipv6Addr,
    target: Ipv6Addr,
    seq: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<EchoReply6> {
    let fd = sock::icmpv6_raw_socket().context("opening a raw ICMPv6 socket")?;
    sock::bind(&fd, SocketAddr::new(IpAddr::V6(src), 0))
        .with_context(|| format!("binding the ICMPv6 socket to {src}"))?;
    let id = (std::process::id() as u16) ^ seq.rotate_left(8) ^ 0x6c33;
    // Type 128 (echo request), code 0, checksum left to the kernel.
    let mut request = vec![128u8, 0, 0, 0];
    request.extend_from_slice(&id.to_be_bytes());
    request.extend_from_slice(&seq.to_be_bytes());
    request.extend_from_slice(payload);
    sock::send_to(&fd, &request, SocketAddr::new(IpAddr::V6(target), 0))
        .with_context(|| format!("sending an ICMPv6 echo request to {target}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no ICMPv6 echo reply from {target} within {timeout:?}");
        }
        let Some((n, from)) = sock::recv_from_within(&fd, &mut buf, left)? else {
            continue;
        };
        // A raw ICMPv6 socket delivers the ICMPv6 message only.
        let icmp = &buf[..n];
        if from != IpAddr::V6(target)
            || icmp.len() < 8
            || icmp[0] != 129
            || icmp[4..6] != id.to_be_bytes()
            || icmp[6..8] != seq.to_be_bytes()
        {
            continue;
        }
        if icmpv6_checksum(target, src, icmp) != 0 {
            bail!("echo reply from {target} with a bad ICMPv6 checksum: {icmp:02x?}");
        }
        return Ok(EchoReply6 {
            from: target,
            payload: icmp[8..].to_vec(),
        });
    }
}

/// The ICMPv6 checksum of `message` from `src` to `dst` (RFC 4443 §2.3): 0 over a message
/// that already holds a correct one.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + message.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    data.extend_from_slice(&[0, 0, 0, crate::capture::IPPROTO_ICMPV6]);
    data.extend_from_slice(message);
    sock::inet_checksum(&data)
}
