//! Kubernetes mode: watch Services, EndpointSlices and Nodes, translate them into the
//! maps' desired state ([`translate`]), and apply it through the same
//! [`crate::dataplane::Dataplane::apply`] as the standalone agent ([`watch`]).

pub mod translate;
pub mod watch;

pub use translate::{DEFAULT_CLASS, Settings, Translation, Warning, translate};
pub use watch::{Readiness, run};
