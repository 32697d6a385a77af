//! Real servers inside a backend namespace that report the peer address they saw.
//!
//! Both answer with one line `backend=<name> peer=<ip>:<port>\n` (IPv6 peers are written
//! `[ip]:port`, i.e. `SocketAddr`'s form); see [`crate::client::parse_reply`].
//! TCP then echoes until EOF; UDP appends the datagram's payload after the line.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How often server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(20);

/// Peer addresses a server saw, shared with the test.
pub type Peers = Arc<Mutex<Vec<SocketAddr>>>;

/// The line a server sends first: `backend=<name> peer=<peer>\n`.
pub fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("backend={name} peer={peer}\n")
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
                move || accept_loop(&listener, &name, &peers, &stop)
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

fn accept_loop(listener: &TcpListener, name: &str, peers: &Peers, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
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
                        let _ = serve_tcp(stream, &name, peer, &stop);
                    });
                if let Ok(handle) = spawned {
                    conns.push(handle);
                }
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => std::thread::sleep(TICK),
        }
    }
    for conn in conns {
        let _ = conn.join();
    }
}

fn serve_tcp(
    mut stream: TcpStream,
    name: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.write_all(reply_line(name, peer).as_bytes())?;
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
