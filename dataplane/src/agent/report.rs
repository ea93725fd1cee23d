//! What the loop reports: the status `bridge-ctl` reads (readiness, sync latencies, the
//! kernel's counters) and the metrics, from the model and the apply outcomes.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dataplane_common::STAT_NAMES;
use tracing::{debug, info, warn};

use super::parts::Agent;
use crate::{
    agent::start::Startup, input::DockerEvent, model::ContainerId, report::metrics, report::notify,
};

/// Keeps the last [`dataplane_api::SYNC_LATENCIES_KEPT`] values of a status series.
pub(super) fn push_bounded<T>(v: &mut Vec<T>, x: T) {
    if v.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
        v.remove(0);
    }
    v.push(x);
}

fn ns_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub(super) fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

pub(crate) use crate::report::status::now_ms;

impl Agent {
    pub(super) fn ready(&self, startup: Startup) {
        let s = &mut self.shared.lock().expect("status lock").status;
        s.ready = true;
        s.startup = startup.phases;
        info!(
            took_ms = startup.start.elapsed().as_secs_f64() * 1e3,
            frontends = s.frontends,
            "ready"
        );
        notify::notify("READY=1\nSTATUS=translating");
    }

    /// Records when container `id`'s frontends went into the map (the last write's time).
    pub(super) fn note_written(&self, id: &ContainerId) {
        let at = self
            .frontends_written
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let s = &mut self.shared.lock().expect("status lock").status;
        push_bounded(&mut s.frontends_written_us, (id.to_string(), at));
    }

    /// How long each start event took to become a frontend in the map (in `status`), or
    /// how long before it the frontends were written (early frontends).
    pub(super) fn record_start_latencies(&mut self, batch: &[DockerEvent]) {
        let now_ns = ns_of(self.frontends_written);
        for ev in batch {
            let DockerEvent::Started { id, at_ns: Some(t) } = ev else {
                continue;
            };
            let Some(c) = self
                .model
                .containers
                .get_mut(id)
                .filter(|c| !c.frontends.is_empty())
            else {
                continue;
            };
            if let Some(at) = c.early_written.take() {
                // Written before the start event: how long before.
                let lead_us = (t - ns_of(at)) / 1000;
                metrics::get()
                    .early_lead(Duration::from_micros(u64::try_from(lead_us).unwrap_or(0)));
                debug!(container = %id.short(), lead_us, "frontends were in the map before the start event");
                let s = &mut self.shared.lock().expect("status lock").status;
                push_bounded(&mut s.early_lead_us, lead_us);
                continue;
            }
            let us = u64::try_from((now_ns - t) / 1000).unwrap_or(0);
            self.note_written(id);
            metrics::get().event_to_map(Duration::from_micros(us));
            debug!(container = %id.short(), latency_us = us, "start event synced");
            let s = &mut self.shared.lock().expect("status lock").status;
            push_bounded(&mut s.start_sync_us, us);
        }
    }

    /// Copies the kernel programs' counters into the status.
    pub(super) fn publish_counters(&mut self) {
        let ids: BTreeSet<u32> = self
            .shared
            .lock()
            .expect("status lock")
            .frontends
            .iter()
            .map(|f| f.id)
            .collect();
        let per_frontend = match self.loaded.frontend_counters(&ids) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading frontend counters failed");
                BTreeMap::new()
            }
        };
        let counters = self.loaded.stats().unwrap_or_default();
        let mut state = self.shared.lock().expect("status lock");
        for f in &mut state.frontends {
            f.view.connections = per_frontend.get(&f.id).copied().unwrap_or(0);
        }
        let s = &mut state.status;
        s.counters = STAT_NAMES
            .iter()
            .zip(counters)
            .map(|(n, v)| ((*n).to_string(), v))
            .collect();
        s.counters_unix_ms = now_ms();
    }
}
