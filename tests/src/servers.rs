//! Real servers inside a backend namespace that report the peer address they saw.
//!
//! Both answer with one line `backend=<name> peer=<ip>:<port>\n` (IPv6 peers are written
//! `[ip]:port`, i.e. `SocketAddr`'s form); see [`crate::client::parse_reply`]. A TCP
//! connection whose socket carries a mark adds ` to=<IPv4 address>`: the lab marks the
//! packets of a backend namespace with the backend address they were sent to (see
//! [`crate::Lab::backend_add_l2_addresses`]) and `tcp_fwmark_accept` gives the accepted
//! socket the mark of its SYN, so the server can tell which of the namespace's backend
//! addresses the balancer chose.
//! TCP then echoes until EOF; UDP appends the datagram's payload after the line.
//! [`BulkServer`] (TCP) follows the greeting with one bulk transfer, see [`crate::bulk`].
//! [`HealthzServer`] stands in for a node proxy's `healthCheckNodePort` instead.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    bulk::{Digest, Pattern},
    netns::Netns,
    sock,
};

/// How often server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(20);

/// Peer addresses a server saw, shared with the test.
pub type Peers = Arc<Mutex<Vec<SocketAddr>>>;

/// The line a server sends first: `backend=<name> peer=<peer>\n`.
pub fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("backend={name} peer={peer}\n")
}

/// The line a TCP server sends first: [`reply_line`], with ` to=<address>` before the
/// newline when the connection was marked with the backend address it was sent to.
pub fn reply_line_to(name: &str, peer: SocketAddr, to: Option<Ipv4Addr>) -> String {
    match to {
        Some(to) => format!("backend={name} peer={peer} to={to}\n"),
        None => reply_line(name, peer),
    }
}

/// The backend address an accepted connection was sent to, from its mark (0: unmarked).
fn marked_destination(stream: &TcpStream) -> Option<Ipv4Addr> {
    match sock::socket_mark(stream.as_raw_fd()) {
        Ok(0) | Err(_) => None,
        Ok(mark) => Some(Ipv4Addr::from(mark)),
    }
}

/// A TCP server: greets each connection with [`reply_line`], then echoes until EOF.
#[derive(Debug)]
pub struct TcpServer {
    addr: SocketAddr,
    peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `addr` (e.g. VIP:80, which must already be on an interface) inside `ns`.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<TcpServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding TCP {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let peers = Peers::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("tcp-{name}"))
            .spawn({
                let (name, peers, stop) = (name.to_owned(), peers.clone(), stop.clone());
                move || accept_loop(&listener, &name, &peers, &stop, serve_tcp)
            })?;
        Ok(TcpServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer seen so far, in order of acceptance.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The shared list itself (e.g. to clear it between phases of a test).
    pub fn peers_handle(&self) -> Peers {
        self.peers.clone()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panicked server thread has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// Serves one accepted connection until it ends or the stop flag is set.
type Handler = fn(TcpStream, &str, SocketAddr, &AtomicBool) -> io::Result<()>;

fn accept_loop(
    listener: &TcpListener,
    name: &str,
    peers: &Peers,
    stop: &Arc<AtomicBool>,
    handler: Handler,
) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Waiting in poll(2), not a sleep, so a connection is accepted (and greeted) at
        // once: tests time new connections, and a sleep would add up to a tick to each.
        if !readable_within(listener, TICK) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                peers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(peer);
                let (name, stop) = (name.to_owned(), stop.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("tcp-{name}-conn"))
                    .spawn(move || {
                        // A connection error ends that connection only.
                        let _ = handler(stream, &name, peer, &stop);
                    });
                if let Ok(handle) = spawned {
                    conns.push(handle);
                }
                conns.retain(|h| !h.is_finished());
            }
            // Taken by the time accept ran: wait in poll again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
    for conn in conns {
        let _ = conn.join();
    }
}

/// Whether `listener` has a connection to accept within `timeout`.
fn readable_within(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    n > 0
}

fn serve_tcp(
    mut stream: TcpStream,
    name: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    let to = marked_destination(&stream);
    stream.write_all(reply_line_to(name, peer, to).as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TCP server for one bulk transfer per connection: greets like [`TcpServer`], then
/// obeys one `upload` or `download` command (protocol in [`crate::bulk`]).
#[derive(Debug)]
pub struct BulkServer {
    addr: SocketAddr,
    peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BulkServer {
    /// Listens on `addr` (e.g. VIP:9000, which must already be on an interface) inside `ns`.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<BulkServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding TCP {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let peers = Peers::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("bulk-{name}"))
            .spawn({
                let (name, peers, stop) = (name.to_owned(), peers.clone(), stop.clone());
                move || accept_loop(&listener, &name, &peers, &stop, serve_bulk)
            })?;
        Ok(BulkServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer seen so far, in order of acceptance.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "server stopping")
}

/// Reads into `buf` once, retrying read timeouts until data, EOF or the stop flag.
fn read_some(stream: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<usize> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        match stream.read(buf) {
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Writes all of `buf`, retrying write timeouts until done or the stop flag.
fn write_all_stoppable(
    stream: &mut TcpStream,
    mut buf: &[u8],
    stop: &AtomicBool,
) -> io::Result<()> {
    while !buf.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_bulk(
    mut stream: TcpStream,
    name: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(TICK))?;
    write_all_stoppable(&mut stream, reply_line(name, peer).as_bytes(), stop)?;
    // The command line, byte by byte: nothing after it may be consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() > 100 || read_some(&mut stream, &mut byte, stop)? == 0 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad command {line:?}"));
    let number =
        |i: usize| -> io::Result<u64> { words.get(i).and_then(|w| w.parse().ok()).ok_or_else(bad) };
    let mut buf = vec![0u8; 64 * 1024];
    match words.first() {
        Some(&"upload") => {
            let want = number(1)?;
            let mut got = 0u64;
            let mut digest = Digest::new();
            while got < want {
                let room = usize::try_from(want - got)
                    .unwrap_or(buf.len())
                    .min(buf.len());
                let n = read_some(&mut stream, &mut buf[..room], stop)?;
                if n == 0 {
                    break;
                }
                digest.update(&buf[..n]);
                got += n as u64;
            }
            let answer = format!("received {got} {:016x}\n", digest.value());
            write_all_stoppable(&mut stream, answer.as_bytes(), stop)?;
        }
        Some(&"download") => {
            let mut left = number(1)?;
            let mut pattern = Pattern::new(number(2)?);
            while left > 0 {
                let chunk = usize::try_from(left).unwrap_or(buf.len()).min(buf.len());
                pattern.fill(&mut buf[..chunk]);
                write_all_stoppable(&mut stream, &buf[..chunk], stop)?;
                left -= chunk as u64;
            }
        }
        _ => return Err(bad()),
    }
    // Let the peer read everything before the connection goes away.
    stream.shutdown(std::net::Shutdown::Write)?;
    while read_some(&mut stream, &mut buf, stop)? > 0 {}
    Ok(())
}

/// A UDP server: answers each datagram with [`reply_line`] followed by its payload.
#[derive(Debug)]
pub struct UdpServer {
    addr: SocketAddr,
    peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// Binds `addr` (e.g. VIP:53) inside `ns`; replies leave from that address.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<UdpServer> {
        let socket = ns
            .enter(|| UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
        socket.set_read_timeout(Some(TICK))?;
        let addr = socket.local_addr()?;
        let peers = Peers::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn({
                let (name, peers, stop) = (name.to_owned(), peers.clone(), stop.clone());
                move || udp_loop(&socket, &name, &peers, &stop)
            })?;
        Ok(UdpServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer seen so far, one entry per datagram.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The shared list itself (e.g. to clear it between phases of a test).
    pub fn peers_handle(&self) -> Peers {
        self.peers.clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn udp_loop(socket: &UdpSocket, name: &str, peers: &Peers, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                peers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(peer);
                let mut reply = reply_line(name, peer).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                // A failed reply is the client's problem to notice.
                let _ = socket.send_to(&reply, peer);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// A node's service proxy on a Service's `healthCheckNodePort`, as kube-proxy serves it for
/// `externalTrafficPolicy: Local`: `GET /healthz` answers 200 while the node has local
/// endpoints and 503 when it has none. The test sets the status; every request line is
/// recorded.
#[derive(Debug)]
pub struct HealthzServer {
    status: Arc<AtomicU16>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthzServer {
    /// Listens on `addr` (a node address and the Service's `healthCheckNodePort`) inside
    /// `ns`, answering `GET /healthz` with `status`.
    pub fn start(ns: &Netns, addr: SocketAddr, status: u16) -> Result<HealthzServer> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding TCP {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("healthz-{addr}"))
            .spawn({
                let (status, requests, stop) = (status.clone(), requests.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        if !readable_within(&listener, TICK) {
                            continue;
                        }
                        if let Ok((stream, _)) = listener.accept() {
                            // A probe that breaks off affects that probe only.
                            let _ = answer_healthz(stream, &status, &requests);
                        }
                    }
                }
            })?;
        Ok(HealthzServer {
            status,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// Answers `status` from the next request on (200: local endpoints, 503: none).
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// The request lines seen so far (`GET /healthz HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for HealthzServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panicked server thread has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

/// Reads one request head and answers it like kube-proxy's health server (a JSON body
/// naming the local endpoint count); other paths get 404.
fn answer_healthz(
    mut stream: TcpStream,
    status: &AtomicU16,
    requests: &Mutex<Vec<String>>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default().to_string();
    requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(line.clone());
    let code = if line.starts_with("GET /healthz ") {
        status.load(Ordering::Relaxed)
    } else {
        404
    };
    let (reason, endpoints) = match code {
        200 => ("OK", 1),
        503 => ("Service Unavailable", 0),
        _ => ("Not Found", 0),
    };
    let body = format!("{{\"localEndpoints\": {endpoints}}}\n");
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
