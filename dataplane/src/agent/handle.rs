//! What each input does: Docker's events (egress first, then early frontends, then
//! inspects), the ruleset, `bridge-ctl`'s requests, timers update the model, reading what
//! they need of Docker and the kernel; each change is then planned and applied
//! ([`super::sync`]).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{debug, info, warn};

use super::parts::Agent;
use crate::{
    agent::start::{Inspected, inspect_all},
    docker,
    egress::records::Policies,
    hostfw,
    input::{DockerEvent, Timer},
    model::ContainerId,
    netns,
    report::api,
    report::metrics,
};

/// A container Docker connected to a network (`network connect`): the network, the
/// container, its addresses there (from the network's inspect).
type Connected = (String, ContainerId, Vec<IpAddr>);

impl Agent {
    pub(super) async fn on_events(&mut self, batch: &[DockerEvent]) {
        // Egress first: a container being started is policed before its process runs.
        let connected = self.egress_events(batch).await;
        // Then its frontends, from what it was created with, before Docker's start ends.
        self.early_events(batch, &connected);
        let mut refresh = BTreeSet::new();
        let mut networks = false;
        for ev in batch {
            let (typ, action) = ev.kind();
            metrics::get().docker_event(typ, action);
            match ev {
                DockerEvent::Paused { id, at_ns } => {
                    if let Some(c) = self.model.containers.get_mut(id) {
                        c.paused_at_ns = Some(at_ns.unwrap_or(0));
                    }
                }
                DockerEvent::Destroyed { id } => {
                    refresh.remove(id.as_str());
                    self.forget(id);
                }
                DockerEvent::Networks { .. } => networks = true,
                _ => {}
            }
            if let Some(id) = ev.refreshes() {
                refresh.insert(id.to_string());
            }
        }
        debug!(
            events = batch.len(),
            refresh = refresh.len(),
            "docker events"
        );
        // A container connected to a network that was just created: list them first.
        let unknown_net = batch
            .iter()
            .filter_map(DockerEvent::network)
            .any(|net| !self.model.networks.contains_key(net));
        if networks || unknown_net {
            self.refresh_networks().await;
        }
        if let Err(e) = self.refresh(refresh).await {
            warn!(error = %format!("{e:#}"), "refresh after events failed; resyncing in full");
            self.full_resync().await;
            return;
        }
        if !self.apply_or_retry("events") {
            return;
        }
        self.record_start_latencies(batch);
        // Then the new containers as clients.
        if self.resolve_pending() {
            self.apply_or_retry("container clients");
        }
    }

    /// Forgets a container Docker removed: its record, and its stored runtime change.
    fn forget(&mut self, id: &ContainerId) {
        self.egress
            .destroyed(&mut self.model.containers, id.as_str());
        self.model.forget(id.as_str());
    }

    /// Containers created: inspected now, in the background (their bindings, for their
    /// frontends at `network connect`). Containers Docker connects to a network while
    /// starting them (`connected`, with their address there, read once for egress and this):
    /// frontends from that inspect and that address, written at once (the container's own
    /// inspect waits until Docker has started it).
    fn early_events(&mut self, batch: &[DockerEvent], connected: &[Connected]) {
        let mut done = Vec::new();
        for ev in batch {
            match ev {
                DockerEvent::Created { id, .. } => {
                    let (docker, tx, id) = (self.docker.clone(), self.early_tx.clone(), id.clone());
                    tokio::spawn(async move {
                        // Answered at once unless the start has begun (then it waits for
                        // the start, and the start event serves).
                        if let Ok(Some(c)) = docker::inspect(&docker, id.as_str()).await
                            && c.state.as_ref().and_then(|s| s.status)
                                == Some(bollard::models::ContainerStateStatusEnum::CREATED)
                        {
                            let _ = tx.send((id, Box::new(c))).await;
                        }
                    });
                }
                DockerEvent::Started { id, .. } => done.push((id, true)),
                DockerEvent::Died { id } | DockerEvent::Destroyed { id } => done.push((id, false)),
                _ => {}
            }
        }
        let mut written = Vec::new();
        for (net, id, addrs) in connected {
            // The create-time inspect not back yet: Docker's own files say the same.
            let known = self
                .model
                .containers
                .get(id)
                .is_some_and(|c| c.created.is_some() || !c.frontends.is_empty());
            if !known
                && let Some(c) = self
                    .docker_root
                    .as_deref()
                    .and_then(|root| docker::created_on_disk(root, id.as_str()))
            {
                self.model.created(id.as_str(), c);
            }
            let Some(info) = self.model.networks.get(net).cloned() else {
                continue;
            };
            if self.model.early(id.as_str(), &info, addrs) {
                written.push(id.clone());
            }
        }
        if !written.is_empty() && self.apply_or_retry("early frontends") {
            for id in written {
                debug!(container = %id.short(), "frontends written before the start completed");
                self.note_written(&id);
                if let Some(c) = self.model.containers.get_mut(&id) {
                    c.early_written = Some(self.frontends_written);
                }
            }
        }
        for (id, started) in done {
            if let Some(c) = self.model.containers.get_mut(id) {
                c.created = None;
                // The start event reads the time written (`record_start_latencies`); a
                // container that died first keeps none.
                if !started {
                    c.early_written = None;
                }
            }
        }
    }

    /// A created container's inspect (asked for at its `create`): kept for its early
    /// frontends, unless Docker removed it meanwhile.
    pub(super) fn on_created(
        &mut self,
        id: &ContainerId,
        c: bollard::models::ContainerInspectResponse,
    ) {
        if self
            .egress
            .knows(Policies(&self.model.containers), id.as_str())
        {
            self.model.created(id.as_str(), c);
        }
    }

    /// What the events mean for egress: labels at `create`; at `network connect`, the
    /// container's address on that network (asked of the network: the container's own
    /// inspect waits until Docker has started it), and its policy written at once. Returns
    /// the connects read (also those of containers with early frontends to write).
    async fn egress_events(&mut self, batch: &[DockerEvent]) -> Vec<Connected> {
        let mut connects = Vec::new();
        for ev in batch {
            match ev {
                DockerEvent::Created { id, name, labels } => {
                    self.egress.created(
                        &mut self.model.containers,
                        id.as_str(),
                        name,
                        labels.clone(),
                        true,
                    );
                    // Its names are looked up while Docker starts it.
                    self.lookup_due();
                }
                DockerEvent::Connected { network, container } => {
                    let early = self
                        .model
                        .containers
                        .get(container)
                        .is_some_and(|c| c.created.is_some());
                    if self
                        .egress
                        .knows(Policies(&self.model.containers), container.as_str())
                        || early
                    {
                        connects.push((network.clone(), container.clone()));
                    }
                }
                _ => {}
            }
        }
        if connects.is_empty() {
            return Vec::new();
        }
        let t = Instant::now();
        let docker = &self.docker;
        let found = futures_util::future::join_all(connects.iter().map(|(net, id)| async move {
            (
                net,
                id,
                docker::addresses_on(docker, net, id.as_str()).await,
            )
        }))
        .await;
        let inspected_us = t.elapsed().as_micros();
        let mut connected = Vec::new();
        for (net, id, r) in found {
            match r {
                Ok(addrs) => connected.push((net.clone(), id.clone(), addrs)),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "reading a new endpoint's address failed");
                }
            }
        }
        let mut policed = false;
        for (net, id, addrs) in &connected {
            if self
                .egress
                .knows(Policies(&self.model.containers), id.as_str())
            {
                self.egress
                    .connected(&mut self.model.containers, id.as_str(), net, addrs.clone());
                policed = true;
            }
        }
        if !policed {
            return connected;
        }
        let written = self.apply_egress();
        match written {
            Ok(()) => debug!(
                took_us = t.elapsed().as_micros(),
                network_inspect_us = inspected_us,
                "egress applied at network connect"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "writing the egress table failed; retrying"),
        }
        connected
    }

    /// Docker's events were lost: nothing is translated until a full resync has caught up
    /// (the inputs reopen the stream after a backoff, then the resync runs).
    pub(super) fn events_lost(&mut self, why: &str) {
        debug!(why, "translating nothing until Docker's events are back");
        self.events_open = false;
        self.loaded.withdraw();
        self.shared
            .lock()
            .expect("status lock")
            .status
            .translation_off = Some("Docker's events were lost; resyncing".into());
    }

    /// Docker's events stream is open again: a full resync catches up, then the agent
    /// vouches again.
    pub(super) async fn events_back(&mut self) {
        self.events_open = true;
        self.full_resync().await;
    }

    /// The host's addresses changed.
    pub(super) async fn on_addresses(&mut self) {
        if let Err(e) = self.sync_local_addrs().await {
            warn!(error = %format!("{e:#}"), "local address sync failed");
        }
        self.apply_or_retry("local addresses");
    }

    pub(super) async fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::Retry => {
                self.apply_or_retry("retry");
            }
            Timer::Lookups => self.lookup_due(),
            Timer::EgressPorts => {
                self.apply_or_retry("egress: a new container's veths");
            }
            Timer::EgressCheck => {
                self.egress_check_at = None;
                if self.egress.drifted() {
                    warn!(table = %self.egress.table(), "the egress table had been changed by hand: restoring it");
                    self.apply_or_retry("egress table drift");
                }
            }
            Timer::OwnFirewallCheck => {
                self.own_check_at = None;
                let Some(o) = self.own_fw.as_mut() else {
                    return;
                };
                match tokio::task::block_in_place(|| o.fw.repair()) {
                    Ok(true) => {
                        warn!(table = %o.fw.table(), "the own-firewall table had been changed by hand: restored");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        o.fw.force();
                        warn!(error = %format!("{e:#}"), "restoring the own-firewall table failed; writing it whole");
                        self.apply_or_retry("own-firewall table drift");
                    }
                }
            }
            Timer::Resync => self.full_resync().await,
            Timer::Flows => self.age_flows(),
            Timer::EgressCounters => self.egress.refresh_counters(),
        }
    }

    pub(super) async fn full_resync(&mut self) {
        let r = async {
            let all = docker::list_all(&self.docker).await?;
            let live: BTreeSet<String> = all
                .iter()
                .filter(|c| docker::is_running(c))
                .filter_map(|c| c.id.clone())
                .collect();
            // Removed while Docker's events were not seen: forgotten whole.
            let exists: BTreeSet<&str> = all.iter().filter_map(|c| c.id.as_deref()).collect();
            let gone: Vec<ContainerId> = self
                .model
                .containers
                .keys()
                .filter(|id| !exists.contains(id.as_str()))
                .cloned()
                .collect();
            for id in &gone {
                self.forget(id);
            }
            self.egress.retain(&mut self.model.containers, &live);
            self.model.retain(&live);
            if !self.loaded.vouching() {
                // Events were lost: the egress table is written whole again.
                self.egress.force();
            }
            self.check_docker_settings();
            if let Some(o) = &mut self.own_fw {
                o.fw.force();
            }
            self.model.networks = docker::networks(&self.docker).await?;
            let table = self.nft_table.clone();
            self.fw_snapshot = tokio::task::spawn_blocking(move || hostfw::capture(&table)).await?;
            self.evaluate_firewall();
            self.refresh(live).await?;
            self.resolve_pending();
            self.sync_local_addrs().await?;
            self.force_notrack = true;
            self.apply()
        }
        .await;
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), "full resync failed");
            return;
        }
        // Not while Docker's events are lost (a resync timer between the loss and the
        // stream's return): what Docker did meanwhile would go unseen.
        if !self.loaded.vouching() && self.events_open {
            match self.loaded.vouch() {
                Ok(()) => {
                    info!("resynced with Docker: translating again");
                    self.shared
                        .lock()
                        .expect("status lock")
                        .status
                        .translation_off = None;
                }
                Err(e) => warn!(error = %format!("{e:#}"), "cannot vouch for the maps"),
            }
        }
    }

    /// Inspects each container once (a few at a time) and replaces what is known of it.
    pub(super) async fn refresh(&mut self, ids: BTreeSet<String>) -> Result<()> {
        let results = inspect_all(&self.docker, ids).await;
        self.ingest(results)
    }

    /// Replaces each inspected container's frontends (none when it is gone) and its view as
    /// a client; its default routes (which endpoint Docker publishes through) are read from
    /// its namespace.
    pub(super) fn ingest(&mut self, results: Inspected) -> Result<()> {
        for (id, r) in results {
            let c = r?;
            let routes = c
                .as_ref()
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.pid)
                .filter(|p| *p > 0)
                .and_then(netns::default_routes);
            self.egress
                .inspected(&mut self.model.containers, &id, c.as_ref());
            // Networks of a driver other than `bridge` (macvlan, ipvlan): not policed here.
            let unbridged: Vec<String> = c
                .as_ref()
                .and_then(|c| c.network_settings.as_ref())
                .and_then(|n| n.networks.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|(name, ep)| {
                    let net = self.model.networks.get(ep.network_id.as_deref()?)?;
                    net.bridge
                        .is_none()
                        .then(|| format!("{name} (not a bridge network)"))
                })
                .collect();
            self.egress
                .set_drivers(&mut self.model.containers, &id, &unbridged);
            for e in &self.model.ingest(&id, c, routes.as_ref()) {
                warn!(error = %e, "binding skipped");
            }
        }
        Ok(())
    }

    /// Reads the namespace cookies of containers seen since the last call (after the
    /// frontends are written: host clients are served first). Whether there were any.
    pub(super) fn resolve_pending(&mut self) -> bool {
        let ids = self.model.take_pending_cookies();
        if ids.is_empty() {
            return false;
        }
        let paths: Vec<(ContainerId, std::path::PathBuf)> = ids
            .into_iter()
            .filter_map(|id| {
                let p = self.model.netns_path(id.as_str())?;
                Some((id, p))
            })
            .collect();
        let cookies = netns::cookies(paths.iter().map(|(_, p)| p.clone()).collect());
        for ((id, path), r) in paths.into_iter().zip(cookies) {
            match r {
                Ok(c) => self.model.set_cookie(id.as_str(), c),
                // Gone meanwhile, most likely: its clients take Docker's path.
                Err(e) => {
                    debug!(container = %id.short(), path = %path.display(), error = %format!("{e:#}"), "no network namespace cookie");
                }
            }
        }
        true
    }

    pub(super) async fn refresh_networks(&mut self) {
        match docker::networks(&self.docker).await {
            Ok(n) => {
                self.model.networks = n;
                self.evaluate_firewall();
            }
            Err(e) => warn!(error = %format!("{e:#}"), "listing Docker networks failed"),
        }
    }

    /// What the last ruleset snapshot means, logged when it changes.
    pub(super) fn evaluate_firewall(&mut self) {
        let mut fw = self
            .fw_snapshot
            .evaluate(&self.model.bridges(), &self.nft_table);
        // In the own-firewall mode, the operator's chain is where `DOCKER-USER` was: rules
        // there concern container and external clients' forwarded traffic alike.
        if self.own_fw.is_some() {
            let n = crate::ownfw::operator_rules(&self.nft_table).unwrap_or(0);
            if n > 0 {
                let at = format!("inet {}_fw operator ({n} rules)", self.nft_table);
                fw.forward_rules.get_or_insert_with(|| at.clone());
                fw.external_rules.get_or_insert(at);
            }
            let mut st = self.shared.lock().expect("status lock");
            st.status
                .own_firewall
                .get_or_insert_with(Default::default)
                .operator_rules = n;
        }
        if fw != self.model.firewall {
            if let Some(w) = &fw.stateful_input {
                info!(where_ = %w, "stateful INPUT policy: host clients' connections stay tracked");
            } else {
                info!("no stateful INPUT policy: host clients' connections are untracked");
            }
            if self.packet.layer.is_some()
                && let Some(w) = &fw.external_rules
            {
                info!(where_ = %w, "operator forwarding rules: external clients take Docker's DNAT");
            }
            if let Some(w) = &fw.forward_rules {
                info!(where_ = %w, "operator forwarding rules: container clients take Docker's own path");
            } else {
                info!("no operator rules for container traffic: container clients are translated");
            }
            self.model.firewall = fw;
        }
    }

    pub(super) async fn on_ruleset_change(&mut self) {
        let changes = std::mem::take(&mut *self.fw_changes.lock().expect("ruleset changes lock"));
        // Ours among the tables that changed: read back, repaired if it drifted.
        if changes.touches_table("inet", &self.nft_table) {
            self.netfilter.check();
        }
        // The egress table changed (by the agent itself, mostly): read back within a second
        // (at most once a second), and written whole again if it drifted.
        if (changes.touches_table("inet", self.egress.table())
            || changes.touches_table("bridge", self.egress.table()))
            && self.egress_check_at.is_none()
        {
            self.egress_check_at = Some(Instant::now() + Duration::from_secs(1));
        }
        // The own-firewall table: the operator's chain may have changed.
        let own_changed = self.own_fw.is_some()
            && changes.touches_table("inet", &format!("{}_fw", self.nft_table));
        // Read back within a second (at most once a second), restored if it drifted.
        if own_changed && self.own_check_at.is_none() {
            self.own_check_at = Some(Instant::now() + Duration::from_secs(1));
        }
        // Docker's own per-container rules change nothing the evaluation reads; a write to
        // the own-firewall table (the agent's, mostly) only if the operator's chain changed.
        if !self.fw_snapshot.concerned_by(&changes) {
            if own_changed && self.operator_rules_changed() {
                let before = self.model.firewall.clone();
                self.evaluate_firewall();
                if before != self.model.firewall {
                    self.apply_or_retry("operator rules");
                }
            }
            return;
        }
        let table = self.nft_table.clone();
        match tokio::task::spawn_blocking(move || hostfw::capture(&table)).await {
            Ok(snap) => self.fw_snapshot = snap,
            Err(e) => {
                warn!(error = %e, "reading the ruleset failed");
                return;
            }
        }
        let before = self.model.firewall.clone();
        self.evaluate_firewall();
        if before != self.model.firewall {
            self.apply_or_retry("ruleset change");
        }
    }

    /// Whether the operator's chain holds another number of rules than `status` says.
    pub(super) fn operator_rules_changed(&self) -> bool {
        let n = crate::ownfw::operator_rules(&self.nft_table).unwrap_or(0);
        let st = self.shared.lock().expect("status lock");
        st.status.own_firewall.as_ref().map(|o| o.operator_rules) != Some(n)
    }

    /// Every container's labels (created, stopped: not running), so its policy is ready at
    /// its next `network connect`; runtime changes of containers that no longer exist go.
    pub(super) fn learn(&mut self, list: Vec<docker::Named>) {
        let ids = list.iter().map(|(id, _, _)| id.clone()).collect();
        for (id, name, labels) in list {
            if !self.egress.knows(Policies(&self.model.containers), &id) {
                self.egress.created(
                    &mut self.model.containers,
                    &id,
                    &name,
                    labels.into_iter().collect(),
                    false,
                );
            }
        }
        self.egress.sweep_runtime(&ids);
    }

    /// An egress request from `bridge-ctl`, answered as JSON text.
    pub(super) async fn on_request(&mut self, req: dataplane_api::Request) -> String {
        use dataplane_api::Request;
        let json =
            |r: serde_json::Result<String>| r.unwrap_or_else(|e| api::error_reply(e.to_string()));
        match req {
            Request::EgressShow(None) => json(serde_json::to_string(
                &self.egress.views(Policies(&self.model.containers), None),
            )),
            Request::EgressShow(Some(k)) => {
                match self.egress.find(Policies(&self.model.containers), &k) {
                    Ok(id) => json(serde_json::to_string(
                        &self
                            .egress
                            .views(Policies(&self.model.containers), Some(&id)),
                    )),
                    Err(e) => api::error_reply(e.to_string()),
                }
            }
            Request::EgressSet(change) => {
                let id = match self
                    .egress
                    .find(Policies(&self.model.containers), &change.container)
                {
                    Ok(id) => id,
                    Err(e) => return api::error_reply(e.to_string()),
                };
                if let Err(e) = self.egress.change(&mut self.model.containers, &id, &change) {
                    return api::error_reply(e.to_string());
                }
                info!(container = %change.container, "egress policy changed at runtime");
                // Names new to the agent are looked up first (briefly), so the answer
                // describes what the kernel enforces.
                self.resolve_now(Duration::from_millis(1500)).await;
                if let Err(e) = self.apply() {
                    self.retry_at = Some(Instant::now() + self.backoff.failed());
                    return api::error_reply(format!("{e:#}"));
                }
                match self
                    .egress
                    .views(Policies(&self.model.containers), Some(&id))
                    .into_iter()
                    .next()
                {
                    Some(v) => json(serde_json::to_string(&v)),
                    None => api::error_reply("the container went away"),
                }
            }
            _ => api::error_reply("not an egress request"),
        }
    }

    /// Starts the lookups that are due, each in a task of its own; results come back
    /// through `dns_tx`.
    pub(super) fn lookup_due(&mut self) {
        let due = self.egress.due_names(Policies(&self.model.containers));
        for name in due {
            let tx = self.dns_tx.clone();
            let resolver = self.resolver.clone();
            tokio::spawn(async move {
                let r = match resolver {
                    Some(r) => r.resolve(&name).await,
                    None => Err("no resolver configured".into()),
                };
                let _ = tx.send((name, r)).await;
            });
        }
    }

    /// Looks up the names that are due now, waiting at most `limit`; what does not answer
    /// in time is looked up in the background.
    pub(super) async fn resolve_now(&mut self, limit: Duration) {
        let due = self.egress.due_names(Policies(&self.model.containers));
        if due.is_empty() {
            return;
        }
        let Some(resolver) = self.resolver.clone() else {
            for n in due {
                self.egress
                    .resolved(&n, Err("no resolver configured".into()));
            }
            return;
        };
        let lookups = futures_util::future::join_all(due.iter().map(|n| {
            let r = resolver.clone();
            async move { (n.clone(), r.resolve(n).await) }
        }));
        match tokio::time::timeout(limit, lookups).await {
            Ok(results) => {
                for (n, r) in results {
                    self.egress.resolved(&n, r);
                }
            }
            Err(_) => {
                for n in due {
                    self.egress.retry_soon(&n);
                }
            }
        }
    }
}
