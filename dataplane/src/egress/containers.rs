//! What the agent knows of each container for its policy: its labels at `create`, its addresses at `network connect` and from its inspect, its runtime change (kept under the state directory), until Docker removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context, Result};
use bollard::models::ContainerInspectResponse;
use tracing::warn;

use super::{
    Egress, Layer, STARTING_GRACE,
    records::{Policies, PoliciesMut, Records},
};

/// Why a container on network mode `mode` (or networks of `drivers`) cannot be policed
/// here; `container:X` is kept as it is (X's policy applies).
pub(super) fn unenforceable(mode: &str, drivers: &[String]) -> Option<String> {
    if mode == "host" {
        return Some("--network host: it shares the host's network namespace".into());
    }
    if mode.starts_with("container:") {
        return Some(mode.to_string());
    }
    drivers
        .iter()
        .find(|d| !matches!(d.as_str(), "bridge" | "null"))
        .map(|d| format!("network {d}: its traffic does not pass a bridge of the host's"))
}

impl Egress {
    pub(super) fn runtime_path(&self, id: &str) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("egress").join(format!("{id}.json")))
    }

    pub(super) fn load_runtime(&self, id: &str) -> Option<Layer> {
        let p = self.runtime_path(id)?;
        let text = std::fs::read_to_string(&p).ok()?;
        match serde_json::from_str(&text) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(path = %p.display(), error = %e, "ignoring an unreadable runtime egress change");
                None
            }
        }
    }

    pub(super) fn store_runtime(&self, id: &str, layer: Option<&Layer>) -> Result<()> {
        let Some(p) = self.runtime_path(id) else {
            return Ok(());
        };
        match layer {
            None => match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", p.display()))
                }
                _ => Ok(()),
            },
            Some(l) => {
                let dir = p.parent().expect("a file in a directory");
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(l)?)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
            }
        }
    }

    /// Removes stored runtime changes of containers that no longer exist (`exists` says).
    pub fn sweep_runtime(&self, exists: &BTreeSet<String>) {
        let Some(dir) = self.state_dir.as_ref().map(|d| d.join("egress")) else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".json")
                && !exists.contains(id)
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The container as its `create` event (labels, name) shows it, before it starts
    /// (`starting`: Docker may start it any moment).
    pub fn created(
        &mut self,
        cs: &mut Records,
        id: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        starting: bool,
    ) {
        let mut containers = PoliciesMut(cs);
        let runtime = self.load_runtime(id);
        let c = containers.entry(id);
        if starting {
            c.pending_since = Some(Instant::now());
        }
        c.name = name.trim_start_matches('/').to_string();
        c.labels = labels;
        if c.runtime.is_none() {
            c.runtime = runtime;
        }
    }

    /// Whether the agent knows the container's labels already.
    pub fn knows(&self, containers: Policies<'_>, id: &str) -> bool {
        containers.contains_key(id)
    }

    /// Docker connected the container to network `net` with `addrs` (while starting).
    pub fn connected(&mut self, cs: &mut Records, id: &str, net: &str, addrs: Vec<IpAddr>) {
        let mut containers = PoliciesMut(cs);
        if let Some(c) = containers.get_mut(id) {
            c.addrs.insert(net.to_string(), addrs);
            // A new endpoint: a new veth, found again.
            c.ports_for.clear();
            c.ports_missing_since = None;
            c.starting_since.get_or_insert_with(Instant::now);
            c.pending_since = None;
        }
    }

    /// What the container's inspect says (`None`: it no longer exists).
    pub fn inspected(&mut self, cs: &mut Records, id: &str, c: Option<&ContainerInspectResponse>) {
        use bollard::models::ContainerStateStatusEnum as S;
        let mut containers = PoliciesMut(cs);
        let Some(c) = c else {
            containers.remove(id);
            return;
        };
        let labels: BTreeMap<String, String> = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.labels.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let name = c.name.clone().unwrap_or_default();
        if !self.knows(containers.read(), id) {
            self.created(containers.0, id, &name, labels.clone(), false);
        }
        let status = c.state.as_ref().and_then(|s| s.status);
        let live = crate::model::desired::peer_of(c);
        let entry = containers.get_mut(id).expect("just inserted");
        entry.labels = labels;
        entry.name = name.trim_start_matches('/').to_string();
        match (live, status) {
            (Some(p), _) => {
                entry.addrs = p.endpoints.into_iter().collect();
                entry.starting_since = None;
                entry.pending_since = None;
            }
            // Docker is still starting it: the addresses its network gave stay.
            (None, Some(S::CREATED | S::RESTARTING))
                if entry
                    .starting_since
                    .is_some_and(|t| t.elapsed() < STARTING_GRACE) => {}
            (None, _) => {
                // Stopped: a restart policy may start it again at once.
                if !entry.addrs.is_empty() {
                    entry.pending_since = Some(Instant::now());
                }
                entry.addrs.clear();
                entry.starting_since = None;
                // Its next start makes a namespace and veths anew.
                entry.netns = None;
                entry.ports.clear();
                entry.ports_for.clear();
            }
        }
        // Never from its resolv.conf: the container can write that file.
        entry.dns = c
            .host_config
            .as_ref()
            .and_then(|h| h.dns.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| a.split('%').next()?.parse().ok())
            .collect();
        let netns = c
            .network_settings
            .as_ref()
            .and_then(|n| n.sandbox_key.clone())
            .filter(|k| !k.is_empty())
            .map(PathBuf::from);
        if netns.is_some() && netns != entry.netns {
            // Another namespace (found at `network connect`, or an earlier run's): its
            // veths are found again in Docker's.
            entry.ports_for.clear();
            entry.netns = netns;
        }
        let mode = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        entry.network_mode = unenforceable(&mode, &[]);
    }

    /// The container's networks that cannot be policed here (not of the `bridge` driver).
    pub fn set_drivers(&mut self, cs: &mut Records, id: &str, drivers: &[String]) {
        let mut containers = PoliciesMut(cs);
        if let Some(c) = containers.get_mut(id)
            && c.network_mode.is_none()
        {
            c.network_mode = unenforceable("", drivers);
        }
    }

    /// The container was removed: its runtime change goes too.
    pub fn destroyed(&mut self, cs: &mut Records, id: &str) {
        PoliciesMut(cs).remove(id);
        if let Err(e) = self.store_runtime(id, None) {
            warn!(error = %format!("{e:#}"), "removing a runtime egress change");
        }
    }

    /// Containers not in `live` (running or paused) and not starting have no addresses any
    /// more; their labels stay known for their next start (until Docker removes them).
    pub fn retain(&mut self, cs: &mut Records, live: &BTreeSet<String>) {
        let mut containers = PoliciesMut(cs);
        for (id, c) in containers.iter_mut() {
            let starting = c
                .starting_since
                .is_some_and(|t| t.elapsed() < STARTING_GRACE);
            if !live.contains(id) && !starting {
                c.addrs.clear();
                c.starting_since = None;
                c.netns = None;
                c.ports.clear();
                c.ports_for.clear();
            }
        }
    }
}
