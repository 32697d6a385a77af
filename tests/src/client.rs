//! Client-side helpers: every socket is created inside the given namespace (normally
//! `lab.client.ns`), so traffic leaves through that namespace's `eth0`.
//!
//! TCP sockets close abortively (RST, no TIME_WAIT), so a test can reuse a source port
//! right away to check that the same 5-tuple lands on the same backend.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
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
}

/// Parses `backend=<name> peer=<addr>` (with or without the trailing newline).
pub fn parse_reply(line: &str) -> Result<Reply> {
    let line = line.trim_end();
    let rest = line
        .strip_prefix("backend=")
        .with_context(|| format!("not a server reply: {line:?}"))?;
    let (backend, peer) = rest
        .split_once(" peer=")
        .with_context(|| format!("server reply without peer: {line:?}"))?;
    let peer = peer
        .parse()
        .with_context(|| format!("server reply with a bad peer address: {line:?}"))?;
    Ok(Reply {
        backend: backend.to_owned(),
        peer,
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

fn tcp_request_here(
    target: SocketAddr,
    src_port: Option<u16>,
    timeout: Duration,
) -> Result<String> {
    let stream = sock::tcp_connect_from(target, src_port, timeout)
        .with_context(|| connect_context(target, src_port))?;
    let mut reader = BufReader::new(stream);
    read_first_line(&mut reader, target)
}

fn connect_context(target: SocketAddr, src_port: Option<u16>) -> String {
    match src_port {
        Some(p) => format!("TCP connect to {target} from port {p}"),
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

fn udp_exchange_here(
    target: SocketAddr,
    src_port: Option<u16>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let socket = UdpSocket::bind(sock::any_addr(target.ip(), src_port.unwrap_or(0)))
        .with_context(|| format!("binding UDP source port {}", src_port.unwrap_or(0)))?;
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
