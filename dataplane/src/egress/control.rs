//! `bridge-ctl egress show` and `egress set`: finding a container, changing its policy at runtime, and the views.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    time::Instant,
};

use anyhow::Result;

use super::{
    Allow, Egress, Layer, Name, Target, guard, nft,
    records::{Policies, PoliciesMut, Records},
};

fn join(a: &BTreeSet<IpAddr>) -> String {
    a.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a `bridge-ctl egress` request was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no running container {0:?} known to the agent")]
    NoSuchContainer(String),
    #[error("{0:?} names more than one container")]
    Ambiguous(String),
    #[error("allow: {0}")]
    BadAllow(String),
    /// The change could not be kept for the next agent.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

impl Egress {
    /// The container `key` names: an exact name or ID, else a unique ID prefix.
    pub fn find(&self, containers: Policies<'_>, key: &str) -> Result<String, ControlError> {
        let key = key.trim_start_matches('/');
        if let Some((id, _)) = containers
            .iter()
            .find(|(id, c)| c.name == key || *id == key)
        {
            return Ok(id.to_string());
        }
        let hits: Vec<&str> = containers
            .keys()
            .filter(|id| !key.is_empty() && id.starts_with(key))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).to_string()),
            [] => Err(ControlError::NoSuchContainer(key.to_string())),
            _ => Err(ControlError::Ambiguous(key.to_string())),
        }
    }

    /// Applies a runtime change to container `id`: validated first (a bad entry changes
    /// nothing), stored, then enforced.
    pub fn change(
        &mut self,
        cs: &mut Records,
        id: &str,
        ch: &dataplane_api::EgressChange,
    ) -> Result<(), ControlError> {
        let mut containers = PoliciesMut(cs);
        let c = containers
            .get(id)
            .ok_or_else(|| ControlError::NoSuchContainer(id.to_string()))?;
        let mut layer = if ch.reset {
            Layer::default()
        } else {
            c.runtime.clone().unwrap_or_default()
        };
        if let Some(v) = ch.internet {
            layer.internet = Some(v);
        }
        if let Some(v) = ch.host {
            layer.host = Some(v);
        }
        if let Some(a) = &ch.allow {
            let mut list = Vec::new();
            for e in a.iter().flat_map(|e| e.split(',')) {
                if e.trim().is_empty() {
                    continue;
                }
                let parsed: Allow = e.parse().map_err(ControlError::BadAllow)?;
                list.push(parsed.to_string());
            }
            layer.allow = Some(list);
        }
        let layer = (layer != Layer::default()).then_some(layer);
        self.store_runtime(id, layer.as_ref())
            .map_err(ControlError::Store)?;
        containers.get_mut(id).expect("checked").runtime = layer;
        Ok(())
    }

    /// Each known container's drop-counter key (in the table) and name, for the metrics.
    pub fn counter_names(&self, containers: Policies<'_>) -> BTreeMap<String, String> {
        containers
            .iter()
            .map(|(id, c)| {
                let name = if c.name.is_empty() {
                    id.chars().take(12).collect()
                } else {
                    c.name.trim_start_matches('/').to_string()
                };
                (nft::key_of(id), name)
            })
            .collect()
    }

    /// What `bridge-ctl egress show` shows, with the drop counters read from the kernel.
    pub fn views(
        &self,
        containers: Policies<'_>,
        only: Option<&str>,
    ) -> Vec<dataplane_api::Egress> {
        let at = Instant::now();
        let (counters, l2) = tokio::task::block_in_place(|| {
            (nft::read_back(&self.table), guard::read_back(&self.table))
        });
        self.store_counters(
            at,
            counters.as_ref().map(|(_, c)| c),
            l2.as_ref().map(|(_, c)| c),
        );
        let counters = counters.map(|(_, c)| c).unwrap_or_default();
        let l2 = l2.map(|(_, c)| c).unwrap_or_default();
        let l2_of = |name: String| l2.get(&name).copied().unwrap_or(0);
        let mut out = Vec::new();
        for (id, c) in containers.iter() {
            if only.is_some_and(|o| o != id) {
                continue;
            }
            let p = self.policy(c);
            let mut resolved = BTreeMap::new();
            for a in &p.allow {
                let (key, text) = match &a.target {
                    Target::Net(_) => continue,
                    Target::Name(n) => (
                        n.clone(),
                        match self.names.get(n) {
                            Some(e) if !e.addrs.is_empty() => {
                                let mut t = join(&e.addrs);
                                if let Some(err) = &e.error {
                                    let _ = write!(t, " (stale: {err})");
                                }
                                t
                            }
                            Some(Name {
                                error: Some(err), ..
                            }) => format!("error: {err}"),
                            _ => "resolving".into(),
                        },
                    ),
                    Target::Container(n) => {
                        let addrs = Self::by_name(containers.read(), n);
                        (
                            format!("container:{n}"),
                            if addrs.is_empty() {
                                "error: no such running container".into()
                            } else {
                                join(&addrs)
                            },
                        )
                    }
                };
                resolved.insert(key, text);
            }
            out.push(dataplane_api::Egress {
                container: c.name.clone(),
                container_id: id.chars().take(12).collect(),
                internet: p.internet,
                host: p.host,
                allow: p.allow.iter().map(ToString::to_string).collect(),
                resolved,
                addresses: c.addresses().iter().map(ToString::to_string).collect(),
                runtime_change: c.runtime.is_some(),
                error: p.error.clone(),
                dropped_packets: counters.get(&nft::key_of(id)).copied().unwrap_or(0)
                    + l2_of(guard::l2_counter(&nft::key_of(id))),
                spoofed_packets: l2_of(guard::spoof_counter(&nft::key_of(id))),
                ports: if p.restricts() {
                    c.ports.iter().map(|p| p.host_ifname.clone()).collect()
                } else {
                    Vec::new()
                },
                not_enforceable: c
                    .network_mode
                    .clone()
                    .filter(|m| !m.starts_with("container:")),
                policy_of: c
                    .network_mode
                    .as_deref()
                    .and_then(|m| m.strip_prefix("container:"))
                    .map(|x| match containers.get(x) {
                        Some(o) if !o.name.is_empty() => o.name.clone(),
                        _ => x.to_string(),
                    }),
                enforced_unix_us: c
                    .enforced_at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0)),
            });
        }
        out
    }
}
