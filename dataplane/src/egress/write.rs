//! Writing the table (through [`crate::netfilter::table::Table`]), reading it back, and its drop counters.

use std::{collections::BTreeMap, time::Instant};

use anyhow::Result;
use tracing::{info, warn};

use super::{
    Applied, COUNTERS_INTERVAL, Egress, EgressCountersHandle, guard, nft,
    records::{PoliciesMut, Records},
};

/// Makes traffic between containers on one bridge pass the IP netfilter hooks
/// (`br_netfilter`, as Docker itself does for `icc=false` and `userland-proxy=false`):
/// without it, a container denied the host would still reach its neighbours on the same
/// bridge unseen. Whether it is on.
fn enable_bridge_netfilter() -> bool {
    let knobs = [
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    ];
    if !std::path::Path::new(knobs[0]).exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status();
    }
    let mut on = true;
    for k in knobs {
        if std::fs::read_to_string(k).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match std::fs::write(k, "1") {
            Ok(()) => info!(
                knob = k,
                "enabled bridge netfilter: containers denied the host are policed on their own bridge too"
            ),
            Err(e) => {
                warn!(knob = k, error = %e, "cannot enable bridge netfilter: containers denied the host still reach containers on their own bridge");
                on = false;
            }
        }
    }
    on
}

/// The drop counters of one reading of the inet table's (`inet`, by key) and the bridge
/// table's (`bridge`, by counter name): a container's drops of both under its key, its
/// spoofed frames under [`guard::spoof_counter`].
pub(super) fn drop_counters(
    inet: Option<&BTreeMap<String, u64>>,
    bridge: Option<&BTreeMap<String, u64>>,
) -> BTreeMap<String, u64> {
    let mut c = inet.cloned().unwrap_or_default();
    for (name, n) in bridge.into_iter().flatten() {
        if let Some(k) = name.strip_prefix("l_") {
            *c.entry(k.to_string()).or_default() += n;
        } else {
            c.insert(name.clone(), *n);
        }
    }
    c
}

impl Egress {
    /// Writes the table as planned ([`Egress::spec`]): only what changed, or the whole
    /// table in place the first time (and after a failure). Whether anything was written.
    pub fn write(&mut self, cs: &mut Records, spec: &nft::Spec) -> Result<bool> {
        if !self.bridge_netfilter && spec.containers.values().any(|c| !c.host) {
            self.bridge_netfilter = enable_bridge_netfilter();
        }
        match tokio::task::block_in_place(|| self.written.apply(spec, false))? {
            Applied::Unchanged => Ok(false),
            Applied::Written => {
                Self::mark_enforced(cs, spec);
                Ok(true)
            }
        }
    }

    /// Notes when each container's policy came into force for its current addresses.
    pub(super) fn mark_enforced(cs: &mut Records, spec: &nft::Spec) {
        let mut containers = PoliciesMut(cs);
        let now = std::time::SystemTime::now();
        for (id, c) in containers.iter_mut() {
            if spec
                .containers
                .get(&nft::key_of(id))
                .is_some_and(|ch| !ch.addrs.is_empty())
            {
                c.enforced_at.get_or_insert(now);
            } else {
                c.enforced_at = None;
            }
        }
    }

    /// Whether the tables lost or gained a container's chains, or went, since they were
    /// written: then they are written whole again (or, if that fails, at the next apply).
    pub fn drifted(&mut self) -> bool {
        let r = tokio::task::block_in_place(|| self.written.repair());
        // The check follows a change: the drop counters are read with it.
        self.refresh_counters();
        match r {
            Ok(drifted) => drifted,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "restoring the egress table failed");
                self.written.forget();
                true
            }
        }
    }

    /// Forget what was applied: the next apply rewrites the table in place (repair).
    pub fn force(&mut self) {
        self.written.forget();
    }

    /// Lets new veths through while no agent runs (a stop, not a crash).
    pub fn open_gate(&mut self) -> Result<()> {
        if guard::read_back(&self.table).is_none() {
            return Ok(());
        }
        self.written.forget();
        Ok(crate::netfilter::nft::run(guard::open_gate(&self.table))?)
    }

    /// Removes the table.
    pub fn remove(&mut self) -> Result<()> {
        self.written.remove()
    }

    /// Puts each reading of the drop counters into `counters` (the metrics').
    #[must_use]
    pub fn with_counters(mut self, counters: EgressCountersHandle) -> Self {
        self.counters = counters;
        self
    }

    /// Stores the drop counters of a reading of both tables that started at `at` (`None`:
    /// the table was not there, or not readable).
    pub(super) fn store_counters(
        &self,
        at: Instant,
        inet: Option<&BTreeMap<String, u64>>,
        bridge: Option<&BTreeMap<String, u64>>,
    ) {
        self.counters
            .lock()
            .expect("egress counters lock")
            .update(at, drop_counters(inet, bridge));
    }

    /// Reads the drop counters back, off the loop, unless a reading is still running or
    /// started less than half a [`COUNTERS_INTERVAL`] ago, or there is nothing to read:
    /// nothing written yet (the first write reads them), or no container in the table (then
    /// there are no counters, and that is stored without reading).
    pub fn refresh_counters(&mut self) {
        if self
            .counters_read
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            return;
        }
        let last = self
            .counters
            .lock()
            .expect("egress counters lock")
            .read_at();
        if last.is_some_and(|t| t.elapsed() < COUNTERS_INTERVAL / 2) {
            return;
        }
        let Some(applied) = self.written.applied() else {
            return;
        };
        let at = Instant::now();
        if applied.containers.is_empty() && applied.guard.senders.is_empty() {
            self.store_counters(at, None, None);
            return;
        }
        let (table, counters) = (self.table.clone(), self.counters.clone());
        self.counters_read = Some(tokio::task::spawn_blocking(move || {
            let (inet, bridge) = (nft::read_back(&table), guard::read_back(&table));
            let drops = drop_counters(
                inet.as_ref().map(|(_, c)| c),
                bridge.as_ref().map(|(_, c)| c),
            );
            counters
                .lock()
                .expect("egress counters lock")
                .update(at, drops);
        }));
    }
}
