//! l3lb agent library: config model, Maglev, the data-plane map writer and the agent loop.
//! The `l3lb` binary is a thin CLI over these modules, so tests can drive them directly.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod flows;
pub mod flowtable;
pub mod generate;
pub mod handover;
pub mod health;
pub mod http;
pub mod kubernetes;
pub mod maglev;
pub mod metrics;
pub mod netdev;
pub mod program_log;
pub mod status;
pub mod sys;
pub mod testing;
