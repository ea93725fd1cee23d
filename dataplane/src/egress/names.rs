//! Allow-list host names: which are wanted, when each is looked up again, what they resolved to.

use std::{collections::BTreeSet, net::IpAddr, time::Instant};

use anyhow::Result;
use tracing::{info, warn};

use super::{Allow, Container, Egress, Name, Target, dns, policy, records::Policies};

impl Egress {
    /// Host names the policies name.
    pub(super) fn wanted_names(&self, containers: Policies<'_>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for c in containers.values() {
            for a in self.policy(c).allow {
                if let Target::Name(n) = a.target {
                    out.insert(n);
                }
            }
        }
        out
    }

    /// Names to look up now (new ones, or due); marked in flight. Names no policy uses any
    /// more are forgotten.
    pub fn due_names(&mut self, containers: Policies<'_>) -> Vec<String> {
        let wanted = self.wanted_names(containers.read());
        self.names.retain(|n, _| wanted.contains(n));
        let now = Instant::now();
        let mut due = Vec::new();
        for n in wanted {
            let e = self.names.entry(n.clone()).or_insert(Name {
                addrs: BTreeSet::new(),
                refresh_at: now,
                error: None,
                in_flight: false,
            });
            if !e.in_flight && e.refresh_at <= now {
                e.in_flight = true;
                due.push(n);
            }
        }
        due
    }

    /// A lookup given up on: tried again at once, in the background.
    pub fn retry_soon(&mut self, name: &str) {
        if let Some(e) = self.names.get_mut(name) {
            e.in_flight = false;
            e.refresh_at = Instant::now();
        }
    }

    /// When the next lookup is due.
    pub fn next_lookup(&self) -> Option<Instant> {
        self.names
            .values()
            .filter(|n| !n.in_flight)
            .map(|n| n.refresh_at)
            .min()
    }

    /// A lookup's result. Whether the addresses changed. A failure keeps the last addresses
    /// (and says so).
    pub fn resolved(&mut self, name: &str, r: Result<(BTreeSet<IpAddr>, Instant), String>) -> bool {
        let Some(e) = self.names.get_mut(name) else {
            return false;
        };
        e.in_flight = false;
        match r {
            Ok((addrs, at)) => {
                e.refresh_at = at;
                e.error = None;
                if e.addrs != addrs {
                    info!(name, addresses = ?addrs, "allow-list name resolved");
                    e.addrs = addrs;
                    return true;
                }
                false
            }
            Err(err) => {
                if e.error.as_deref() != Some(err.as_str()) {
                    warn!(name, error = %err, "cannot resolve an allow-list name; the rest of the allow-list applies");
                }
                e.error = Some(err);
                e.refresh_at = Instant::now() + dns::RETRY;
                false
            }
        }
    }

    /// Addresses of containers by name (for `container:NAME`).
    pub(super) fn by_name(containers: Policies<'_>, name: &str) -> BTreeSet<IpAddr> {
        containers
            .values()
            .filter(|c| c.name == name)
            .flat_map(Container::addresses)
            .collect()
    }

    pub(super) fn resolve_allow(
        &self,
        containers: Policies<'_>,
        a: &Allow,
    ) -> BTreeSet<policy::Net> {
        match &a.target {
            Target::Net(n) => [*n].into(),
            Target::Name(n) => self
                .names
                .get(n)
                .map(|e| e.addrs.iter().map(|a| policy::Net::host(*a)).collect())
                .unwrap_or_default(),
            Target::Container(n) => Self::by_name(containers.read(), n)
                .into_iter()
                .map(policy::Net::host)
                .collect(),
        }
    }
}
