//! What the agent reports: the status `bridge-ctl` reads through the control socket
//! ([`api`]), the Prometheus endpoint ([`metrics`]), what both answer from ([`status`]),
//! and systemd's readiness protocol ([`notify`]).

pub mod api;
pub mod metrics;
pub mod notify;
pub mod status;
