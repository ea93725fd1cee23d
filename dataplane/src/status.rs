//! What the agent publishes for its readers: the status the agent loop writes, which the
//! control socket ([`crate::api`]) and the metrics endpoint ([`crate::metrics`]) both answer
//! from. Both readers import this module; neither imports the other, and this module
//! imports neither.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

/// One frontend as the agent keeps it: what `bridge-ctl frontends` shows, and the id of
/// its counter (internal, never on the wire).
#[derive(Clone, Debug)]
pub struct FrontendRow {
    pub view: dataplane_api::Frontend,
    pub id: u32,
}

/// What the API and the metrics answer from; written by the agent loop.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub status: dataplane_api::Status,
    pub frontends: Vec<FrontendRow>,
    /// Egress drop counters' keys (in the egress table) to their containers' names.
    pub egress_counters: BTreeMap<String, String>,
    /// Whether the last config reload was rejected (the running config stays).
    pub config_rejected: bool,
    /// The programs' maps, read when asked (counters are never stale).
    pub kernel: Option<Arc<dyn KernelCounters>>,
}

pub type Shared = Arc<Mutex<State>>;

/// Now, in milliseconds since the Unix epoch (the status's `*_unix_ms` fields).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The programs' counters, read from the kernel when asked.
pub trait KernelCounters: std::fmt::Debug + Send + Sync {
    /// The programs' counters summed over CPUs, by `STAT_*` index (empty if unreadable).
    fn stats(&self) -> Vec<u64>;

    /// Each frontend id's translated sockets, summed over CPUs.
    fn frontend_counters(&self) -> BTreeMap<u32, u64>;
}
