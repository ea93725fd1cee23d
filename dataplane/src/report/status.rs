//! What the agent publishes for its readers: the status the agent loop writes, which the
//! control socket ([`crate::report::api`]) and the metrics endpoint ([`crate::report::metrics`]) both answer
//! from, and the egress drop counters as the agent last read them back. Both readers import
//! this module; neither imports the other, and this module imports neither.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
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

/// The egress table's drop counters as the agent last read them back from the kernel. The
/// egress side writes each reading it takes; a metrics scrape reads the latest one and runs
/// nothing.
#[derive(Clone, Debug, Default)]
pub struct EgressCounters {
    drops: BTreeMap<String, u64>,
    read_at: Option<Instant>,
}

impl EgressCounters {
    /// Takes `drops` from a reading that started at `at`, unless a reading that started
    /// later is already in (readings can finish out of order, and counters must not go
    /// back). Whether they were taken.
    pub fn update(&mut self, at: Instant, drops: BTreeMap<String, u64>) -> bool {
        if self.read_at.is_some_and(|last| last > at) {
            return false;
        }
        self.drops = drops;
        self.read_at = Some(at);
        true
    }

    /// Packets dropped, by counter name: a container's policy drops (both tables) under its
    /// key, its spoofed frames under the key's spoof counter name.
    pub fn drops(&self) -> &BTreeMap<String, u64> {
        &self.drops
    }

    /// When the latest reading started; `None` before the first.
    pub fn read_at(&self) -> Option<Instant> {
        self.read_at
    }
}

/// [`EgressCounters`] shared between the egress side, which writes, and the metrics, which
/// read.
pub type EgressCountersHandle = Arc<Mutex<EgressCounters>>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_earlier_reading_finishing_last_does_not_replace_a_later_one() {
        let t0 = Instant::now();
        let mut c = EgressCounters::default();
        assert!(c.read_at().is_none());
        assert!(c.update(t0 + Duration::from_millis(10), [("k".into(), 7)].into()));
        assert!(!c.update(t0, [("k".into(), 5)].into()));
        assert_eq!(c.drops().get("k"), Some(&7));
        assert_eq!(c.read_at(), Some(t0 + Duration::from_millis(10)));
        assert!(c.update(t0 + Duration::from_millis(20), BTreeMap::new()));
        assert!(c.drops().is_empty());
    }
}
