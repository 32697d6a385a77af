//! The l3lb lab: network namespaces on one bridge, real servers and clients, a packet
//! sniffer, and guards that clean all of it up (also on panic).
//!
//! ```text
//!                       fabric (br0)
//!   client ─ eth0 ──┬── balancer-0 … balancer-N ──┬── backend-0 … backend-M
//!   10.77.0.1       │   10.77.0.2 …               │   10.77.0.11 …
//!   fd77::1         │   fd77::2 …                 │   fd77::11 …
//!                   └── router ── far client        (optional, Lab::add_far_site)
//!                       10.77.0.254   10.78.0.1
//!                       fd77::254     fd78::1
//! ```
//!
//! The client can hold further addresses for source-dependent tests
//! ([`Lab::client_add_ipv4`], 10.77.0.200 ..= 10.77.0.249; [`Lab::client_add_ipv6`],
//! fd77::c9 and other addresses no node uses).
//!
//! A test builds a [`Lab`], starts agents with [`Lab::spawn_in`] (binary from
//! [`l3lb_bin`]), servers with [`TcpServer`] / [`UdpServer`] inside backend namespaces,
//! and talks to a VIP with the helpers in [`client`] from the client namespace.
//!
//! Errors are `anyhow` with context: this crate is test support, at the edge where a
//! precise message matters more than a matchable type.

pub mod bulk;
pub mod capture;
pub mod client;
pub mod flood;
pub mod kube_api;
pub mod lab;
pub mod netns;
pub mod prefix;
pub mod process;
pub mod scenario;
pub mod servers;
mod sock;

pub use capture::{Capture, Frame, FrameInfo};
pub use client::{Bulk, EchoReply, EchoReply6, Reply, TcpPersistent, Transfer};
pub use lab::{FarSite, LAB_ROOT, Lab, LabSpec, Mac, Node};
pub use netns::{Netns, host, run};
pub use prefix::Prefix;
pub use process::{ChildGuard, LogTail, l3lb_bin, spawn_in};
pub use servers::{BulkServer, HealthzServer, TcpServer, UdpServer};

/// The XDP object built without lb-ebpf's `log` feature (tests/build.rs): the shipped
/// program with its log statements compiled out, to compare against.
pub static OBJECT_WITHOUT_LOG: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[cfg(test)]
mod tests;
