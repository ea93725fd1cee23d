//! Plans from the model and applies: the maps, the notrack, egress and own-firewall
//! tables, sockets to destroy, pause resets, the packet layer and the local-address map;
//! a failed apply is retried with backoff.

use std::{
    collections::BTreeSet,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tracing::{debug, info, warn};

use super::{
    lifecycle::rules_off_warning,
    parts::Agent,
    report::{now_ms, push_bounded},
};
use crate::{
    addr::Service, apply, apply::reconcile::reconcile, egress::records::Policies, netlink, plan,
    report::metrics,
};

impl Agent {
    /// [`Agent::apply`]; on failure, logged and retried after a backoff. Whether it applied.
    pub(super) fn apply_or_retry(&mut self, after: &str) -> bool {
        let t = Instant::now();
        let r = self.apply();
        metrics::get().reconcile(t.elapsed(), r.is_ok());
        match r {
            Ok(()) => {
                self.backoff.succeeded();
                self.retry_at = None;
                true
            }
            Err(e) => {
                let wait = self.backoff.failed();
                warn!(after, error = %format!("{e:#}"), retry_in_ms = wait.as_millis(), "applying failed; retrying");
                self.retry_at = Some(Instant::now() + wait);
                false
            }
        }
    }

    /// The host's facts the plan reads.
    fn env(&self) -> plan::Env {
        plan::Env {
            host_netns_cookie: self.host_netns_cookie,
            bindv6only: std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
                .is_ok_and(|s| s.trim() == "1"),
            host_dns: crate::egress::dns::host_resolvers(),
            other_bridges: if self.own_fw.is_some() {
                crate::ownfw::other_br_interfaces()
            } else {
                BTreeSet::new()
            },
            // Taken from the egress policies by the plan.
            ..plan::Env::default()
        }
    }

    /// Plans from the model ([`plan::whole`]), applies the plan, reports.
    pub(super) fn apply(&mut self) -> Result<()> {
        // What the egress plan reads of the kernel: the veths of new policed containers
        // (not at the first sync, whose egress table is written after ready).
        self.egress.bridges = self.model.bridges();
        if !self.defer_egress {
            tokio::task::block_in_place(|| self.egress.find_ports(&mut self.model.containers));
        }
        let whole = plan::whole(
            &self.model,
            &self.egress,
            &self.env(),
            self.own_fw.is_some(),
        );
        // The egress table first (a policy never waits for the maps, except at the first
        // sync: see `defer_egress`), then the own-firewall table, then the maps, which
        // leave containers denied the host to Docker's path.
        let egress = if std::mem::take(&mut self.defer_egress) {
            Ok(())
        } else {
            self.write_egress(&whole.egress, whole.egress_errors)
        };
        let egress = egress.and(self.write_own_firewall(whole.own_firewall.as_ref()));
        let plan = whole.maps;
        for c in &plan.conflicts {
            warn!(frontend = %c.frontend, kept = %c.kept, dropped = %c.dropped, "frontend conflict");
        }
        let out = apply::apply(
            &plan,
            &self.model,
            &self.owners,
            &mut self.loaded,
            &self.netfilter,
            &self.sockets,
            self.force_notrack,
        )?;
        self.force_notrack = false;
        self.frontends_written = SystemTime::now();
        for e in &out.map_errors {
            warn!(error = %e, "a map could not hold everything");
        }
        if out.frontends.changed() {
            info!(
                added = out.frontends.added,
                updated = out.frontends.updated,
                removed = out.frontends.removed,
                total = out.served.frontends.len(),
                "frontends updated"
            );
        }
        let mut state = self.shared.lock().expect("status lock");
        let s = &mut state.status;
        s.last_sync_unix_ms = now_ms();
        s.syncs += 1;
        s.containers = self.model.publishing();
        s.frontends = out.served.frontends.len();
        s.errors.clone_from(&plan.errors);
        s.errors.extend(out.map_errors);
        s.container_clients = plan
            .peer_nets
            .keys()
            .map(|k| k.netns_cookie)
            .collect::<BTreeSet<_>>()
            .len();
        s.container_clients_off = plan.container_clients_off;
        s.host_clients_tracked = plan.host_clients_tracked;
        state.frontends = out.served.rows;
        state.egress_counters = self.egress.counter_names(Policies(&self.model.containers));
        drop(state);
        self.owners = out.served.owners;
        self.packet.dirty = self.packet.layer.is_some();
        self.reset_paused(whole.paused, whole.paused_ids);
        self.publish_counters();
        egress
    }

    /// The own-firewall mode's table, written when what it holds changed.
    fn write_own_firewall(&mut self, spec: Option<&crate::ownfw::Spec>) -> Result<()> {
        let (Some(own), Some(spec)) = (self.own_fw.as_mut(), spec) else {
            return Ok(());
        };
        let r = own.fw.apply(spec);
        let (networks, published) = own.fw.counts();
        let mut st = self.shared.lock().expect("status lock");
        let prev = st.status.own_firewall.take().unwrap_or_default();
        st.status.own_firewall = Some(dataplane_api::OwnFirewallStatus {
            table: own.fw.table(),
            networks,
            published,
            // Counted when the ruleset changes (`evaluate_firewall`).
            operator_rules: prev.operator_rules,
            removed_leftovers: own.removed,
            error: r.as_ref().err().map(|e| format!("{e:#}")),
            written_unix_ms: match &r {
                Ok(true) => now_ms(),
                _ => prev.written_unix_ms,
            },
        });
        drop(st);
        if let Ok(true) = r {
            debug!(networks, published, "own-firewall table written");
        }
        r.map(|_| ())
    }

    /// Plans and writes the egress table alone (a container Docker is starting is policed
    /// before its frontends are written), and starts lookups of new host names.
    pub(super) fn apply_egress(&mut self) -> Result<()> {
        self.egress.bridges = self.model.bridges();
        tokio::task::block_in_place(|| self.egress.find_ports(&mut self.model.containers));
        let (spec, errors) = self.egress.spec(
            Policies(&self.model.containers),
            &crate::egress::dns::host_resolvers(),
        );
        self.write_egress(&spec, errors)
    }

    /// Writes the planned egress table if it changed, and starts lookups of new host names.
    fn write_egress(
        &mut self,
        spec: &crate::egress::nft::Spec,
        errors: Vec<(String, String)>,
    ) -> Result<()> {
        self.egress.said(&mut self.model.containers, errors);
        let t = Instant::now();
        let r = self.egress.write(&mut self.model.containers, spec);
        if !matches!(r, Ok(false)) {
            metrics::get().netfilter_apply("egress", t.elapsed(), r.is_ok());
        }
        if let Ok(true) = r {
            debug!(took_us = t.elapsed().as_micros(), "egress table written");
        }
        self.lookup_due();
        r.map(|_| ())
    }

    /// Docker's settings read again (a restarted daemon may have changed them): a
    /// disagreement with the mode is logged and shown by `status`.
    pub(super) fn check_docker_settings(&mut self) {
        let own = self.own_fw.is_some();
        let w = match crate::ownfw::docker_conf::of_daemon(&self.docker_socket) {
            Err(_) => return,
            Ok(s) if own => crate::ownfw::docker_conf::check(true, &s).err(),
            Ok(s) if !s.iptables => Some(rules_off_warning(&s)),
            Ok(_) => None,
        };
        let mut st = self.shared.lock().expect("status lock");
        if w != st.status.docker_settings_warning {
            if let Some(w) = &w {
                warn!("{w}");
            }
            st.status.docker_settings_warning = w;
        }
    }

    /// Destroys the translated sockets of containers just paused that asked for it
    /// (`on-pause=reset`): the maps already refuse new connections to them.
    pub(super) fn reset_paused(
        &mut self,
        now: BTreeSet<Service>,
        paused_ids: BTreeSet<crate::model::ContainerId>,
    ) {
        let fresh: Vec<Service> = now.difference(&self.paused).copied().collect();
        self.paused = now;
        // Pause events of containers that publish nothing are not waited for.
        for c in self.model.containers.values_mut() {
            if c.frontends.is_empty() {
                c.paused_at_ns = None;
            }
        }
        if fresh.is_empty() {
            return;
        }
        let (n, errors) = self
            .sockets
            .destroy_now(&fresh, self.model.client_namespaces());
        for e in &errors {
            warn!(error = %e, "resetting the connections of a paused container");
        }
        metrics::get().pause_resets(n);
        let done_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        for id in paused_ids {
            let Some(t) = self
                .model
                .containers
                .get_mut(&id)
                .and_then(|c| c.paused_at_ns.take())
            else {
                continue;
            };
            let us = u64::try_from((done_ns - t) / 1000).unwrap_or(0);
            info!(container = %id.short(), sockets = n, latency_us = us, "paused (on-pause=reset): its translated connections were reset, new ones are refused");
            let s = &mut self.shared.lock().expect("status lock").status;
            push_bounded(&mut s.pause_resets, (us, n));
        }
    }

    /// The packet layer after an apply: its allow-list, where each served container is
    /// delivered to, and the programs on the uplinks and the containers' veths.
    pub(super) async fn sync_packets(&mut self) {
        self.packet.dirty = false;
        let Some(layer) = self.packet.layer.as_mut() else {
            return;
        };
        let want = plan::packet_endpoints(&self.owners, &self.model);
        let uplinks = crate::packet::uplinks(
            &self.model.host_addrs,
            &self.model.bridges(),
            layer.settings.interfaces.as_deref(),
        );
        let mut kernel = apply::packets::Kernel {
            layer,
            loaded: &mut self.loaded,
        };
        let stand_back = self.model.firewall.external_rules.clone();
        for e in apply::packets::apply(&mut kernel, stand_back, &want, &uplinks).await {
            warn!(error = %e, "the packet layer could not be written");
        }
        let mut status = layer.status(self.packet.flows);
        let mut shared = self.shared.lock().expect("status lock");
        let before = shared.status.packet_layer.as_ref();
        status.flows_counted_unix_ms = before.map_or(0, |p| p.flows_counted_unix_ms);
        shared.status.packet_layer = Some(status);
    }

    /// Removes the packet layer's idle flows, and counts the rest for `status`; endpoints
    /// that could not be read are asked for again once due.
    pub(super) fn age_flows(&mut self) {
        let Some(layer) = self.packet.layer.as_ref() else {
            return;
        };
        if layer.next_retry().is_some_and(|t| t <= Instant::now()) {
            self.packet.dirty = true;
        }
        match layer.age_flows(&mut self.loaded) {
            Ok(n) => {
                self.packet.flows = n;
                if let Some(p) = &mut self.shared.lock().expect("status lock").status.packet_layer {
                    p.flows = n;
                    p.flows_counted_unix_ms = now_ms();
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "aging the packet layer's flows failed"),
        }
    }

    pub(super) async fn sync_local_addrs(&mut self) -> Result<()> {
        let addrs = netlink::dump(&self.nl).await?;
        let want = netlink::local_map(&addrs, &self.model.bridges());
        self.model.host_addrs = addrs;
        let applied = reconcile(&mut self.loaded.local_addrs()?, &want)
            .context("updating the local-address map")?;
        if applied.changed() {
            info!(
                added = applied.added,
                removed = applied.removed,
                total = want.len(),
                "local addresses updated"
            );
        }
        self.shared
            .lock()
            .expect("status lock")
            .status
            .local_addresses = want.len();
        Ok(())
    }
}
