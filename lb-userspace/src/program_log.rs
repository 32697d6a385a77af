//! The XDP program's debug logs: off unless the agent's log filter names them, and when on,
//! read from the program's ring buffer and passed on as `tracing` events.
//!
//! The program's statements (aya-log) test the global `AYA_LOG_LEVEL`, which the agent
//! sets at load time: 0 unless the filter (`--log-level` / `RUST_LOG`) enables the target
//! [`TARGET`] at debug or trace. A general `debug` does not turn them on: the data plane
//! logs per packet (each drop, each new flow), so it has to be asked for by name, e.g.
//! `--log-level info,l3lb::xdp=debug`.
//!
//! (Filter targets match as string prefixes: this module's name starts neither with `xdp`,
//! which `l3lb::xdp=debug` would then enable, nor with another module's name.)

use std::os::fd::AsRawFd as _;

use aya::Ebpf;
use aya_log::EbpfLogger;
use thiserror::Error;
use tokio::io::{Interest, unix::AsyncFd};

/// The `tracing` target of the XDP program's records (and the name that turns them on).
pub const TARGET: &str = "l3lb::xdp";

/// How much the XDP program logs: the value of its `AYA_LOG_LEVEL` global.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum XdpLogLevel {
    /// Nothing: every statement is removed by the verifier.
    #[default]
    Off,
    /// Drops, new flows' backends, ICMP handling.
    Debug,
    /// Debug, plus one record per decapsulated packet.
    Trace,
}

impl XdpLogLevel {
    /// The value of `AYA_LOG_LEVEL` (aya-log's level numbers: debug 4, trace 5).
    pub fn as_u8(self) -> u8 {
        match self {
            XdpLogLevel::Off => 0,
            XdpLogLevel::Debug => aya_log::Level::Debug as u8,
            XdpLogLevel::Trace => aya_log::Level::Trace as u8,
        }
    }

    /// The level the current `tracing` subscriber enables for [`TARGET`].
    pub fn from_tracing() -> Self {
        if tracing::enabled!(target: "l3lb::xdp", tracing::Level::TRACE) {
            XdpLogLevel::Trace
        } else if tracing::enabled!(target: "l3lb::xdp", tracing::Level::DEBUG) {
            XdpLogLevel::Debug
        } else {
            XdpLogLevel::Off
        }
    }
}

/// The agent's filter directives: `spec` as given, plus `l3lb::xdp=off` unless `spec`
/// names the target itself (so `debug` alone leaves the data plane quiet).
pub fn filter_directives(spec: &str) -> String {
    if spec.contains(TARGET) {
        spec.to_string()
    } else if spec.trim().is_empty() {
        format!("{TARGET}=off")
    } else {
        format!("{spec},{TARGET}=off")
    }
}

/// Errors of starting the log reader.
#[derive(Debug, Error)]
pub enum XdpLogError {
    /// The object has no log ring buffer, or it could not be opened.
    #[error("opening the XDP program's log ring buffer: {0}")]
    Open(#[from] aya_log::Error),
    /// The ring buffer's descriptor could not be watched.
    #[error("watching the XDP program's log ring buffer: {0}")]
    Watch(#[from] std::io::Error),
}

/// Passes the program's records on to `tracing` under [`TARGET`], at their own level.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        // `tracing` needs the target and level as constants at each call site.
        match record.level() {
            log::Level::Error => tracing::error!(target: "l3lb::xdp", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "l3lb::xdp", "{msg}"),
            log::Level::Info => tracing::info!(target: "l3lb::xdp", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "l3lb::xdp", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "l3lb::xdp", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Reads the program's log records as they arrive.
pub struct XdpLogReader<L: log::Log> {
    logger: EbpfLogger<L>,
}

impl<L: log::Log> XdpLogReader<L> {
    /// Takes the log ring buffer out of `ebpf` (it is then no map of the object's: never
    /// pinned) and hands its records to `sink`.
    pub fn new(ebpf: &mut Ebpf, sink: L) -> Result<Self, XdpLogError> {
        Ok(Self {
            logger: EbpfLogger::init_with_logger(ebpf, sink)?,
        })
    }

    /// Passes on every record waiting in the ring buffer.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Passes records on as they arrive, until the runtime ends.
    pub async fn forward(self) -> Result<(), XdpLogError> {
        let fd = self.logger.as_raw_fd();
        tracing::debug!(fd, "forwarding the XDP program's log records");
        // SAFETY: the descriptor is the ring buffer's, owned by `self.logger`, which the
        // AsyncFd owns from here on: it stays open and the same while registered.
        let mut watched = unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        loop {
            let mut ready = watched.readable_mut().await?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

impl<L: log::Log> std::os::fd::AsRawFd for XdpLogReader<L> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.logger.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::{EnvFilter, fmt};

    use super::*;

    /// The level a subscriber built from `spec` (as the binary builds it) enables.
    fn level_under(spec: &str) -> XdpLogLevel {
        let filter = EnvFilter::try_new(filter_directives(spec)).expect("valid directives");
        let subscriber = fmt().with_env_filter(filter).finish();
        tracing::subscriber::with_default(subscriber, XdpLogLevel::from_tracing)
    }

    #[test]
    fn data_plane_logs_only_when_named() {
        assert_eq!(level_under("info"), XdpLogLevel::Off);
        assert_eq!(level_under("debug"), XdpLogLevel::Off);
        assert_eq!(level_under("trace"), XdpLogLevel::Off);
        assert_eq!(level_under("l3lb=trace"), XdpLogLevel::Off);
        assert_eq!(level_under("info,l3lb::xdp=debug"), XdpLogLevel::Debug);
        assert_eq!(level_under("l3lb::xdp=trace"), XdpLogLevel::Trace);
        assert_eq!(level_under("debug,l3lb::xdp=info"), XdpLogLevel::Off);
    }

    #[test]
    fn levels_are_aya_logs() {
        assert_eq!(XdpLogLevel::Off.as_u8(), 0);
        assert_eq!(XdpLogLevel::Debug.as_u8(), 4);
        assert_eq!(XdpLogLevel::Trace.as_u8(), 5);
    }
}
