//! What the table should hold, from the containers' policies and Docker's state.

use std::{collections::BTreeSet, net::IpAddr};

use tracing::warn;

use super::{
    Container, Egress, Policy, dns, guard, nft, policy,
    records::{Policies, PoliciesMut, Records},
};

impl Egress {
    /// The table as the policies and Docker's state make it now (`host_dns`: the host's
    /// resolvers, [`dns::host_resolvers`]), and the policies that cannot be read and were
    /// not said yet (container id, error), for [`Egress::said`].
    pub fn spec(
        &self,
        containers: Policies<'_>,
        host_dns: &BTreeSet<IpAddr>,
    ) -> (nft::Spec, Vec<(String, String)>) {
        let mut spec = nft::Spec {
            bridges: self.bridges.clone(),
            closed_internet: self.config.egress.internet == Some(false),
            closed_host: self.config.egress.host == Some(false),
            ..nft::Spec::default()
        };
        let mut errors = Vec::new();
        let mut admit = spec.closed_internet || spec.closed_host;
        spec.guard.gated = self.gating(containers.read());
        spec.guard.known.clone_from(&self.outside_ports);
        for (id, c) in containers.iter() {
            let addrs = c.addresses();
            spec.admitted.extend(addrs.iter().copied());
            if !addrs.is_empty() {
                spec.guard
                    .known
                    .extend(c.ports.iter().map(|p| p.host_ifname.clone()));
            }
            let p = self.policy(c);
            if let Some(e) = &p.error
                && c.logged_error.as_ref() != Some(e)
            {
                errors.push((id.to_string(), e.clone()));
            }
            if !p.restricts() {
                continue;
            }
            // Its chains exist as long as the container does: a start or a stop only
            // changes the map elements that lead to them.
            admit = true;
            let allow = p
                .allow
                .iter()
                .map(|a| nft::Allowed {
                    nets: self.resolve_allow(containers.read(), a),
                    port: a.port,
                    proto: a.proto,
                })
                .filter(|a| !a.nets.is_empty())
                .collect();
            // A policy that cannot be read allows nothing, DNS included.
            let mut dns = BTreeSet::new();
            if p.error.is_none() {
                dns = dns::docker_resolvers(&c.dns, &self.daemon_dns, host_dns);
            }
            if !c.ports.is_empty() && !addrs.is_empty() {
                let k = nft::key_of(id);
                for port in &c.ports {
                    spec.guard.ports.insert(port.host_ifname.clone(), k.clone());
                }
                spec.guard.senders.insert(
                    k,
                    guard::Sender {
                        macs: c.ports.iter().map(|p| p.mac).collect(),
                        addrs: addrs.clone(),
                        link_local: c
                            .ports
                            .iter()
                            .flat_map(|p| {
                                let own = p.addrs.iter().filter_map(|a| match a {
                                    IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(*v6),
                                    _ => None,
                                });
                                own.chain([guard::eui64_link_local(p.mac)])
                            })
                            .collect(),
                        host: p.host,
                    },
                );
            }
            spec.containers.insert(
                nft::key_of(id),
                nft::Chains {
                    addrs,
                    internet: p.internet,
                    host: p.host,
                    dns,
                    allow,
                },
            );
        }
        if !admit {
            spec.admitted.clear();
        }
        (spec, errors)
    }

    /// Says each policy that cannot be read, once per error.
    pub fn said(&mut self, cs: &mut Records, errors: Vec<(String, String)>) {
        let mut containers = PoliciesMut(cs);
        for (id, e) in errors {
            let Some(c) = containers.get_mut(&id) else {
                continue;
            };
            warn!(container = %c.name, id = %nft::key_of(&id), error = %e, "egress policy cannot be read: the container gets no egress at all (fail closed)");
            c.logged_error = Some(e);
        }
    }

    /// Containers that may not reach the host or other containers: the socket layer must
    /// not connect them straight to a backend (Docker's path, where their policy applies).
    pub fn host_denied(&self, containers: Policies<'_>) -> BTreeSet<String> {
        containers
            .iter()
            .filter(|(_, c)| !self.policy(c).host)
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// Addresses of the containers whose policy restricts anything.
    pub fn policed_addrs(&self, containers: Policies<'_>) -> BTreeSet<IpAddr> {
        containers
            .values()
            .filter(|c| self.policy(c).restricts())
            .flat_map(Container::addresses)
            .collect()
    }

    /// Whether new veths wait until the agent has seen them: while a policed container
    /// exists (Docker may start it, restart it or connect it to a network at any time,
    /// however long after its `create`), or the host default closes.
    pub fn gating(&self, containers: Policies<'_>) -> bool {
        self.config.egress.internet == Some(false)
            || self.config.egress.host == Some(false)
            || containers
                .values()
                .any(|c| c.network_mode.is_none() && self.policy(c).restricts())
    }

    pub fn policy(&self, c: &Container) -> Policy {
        policy::policy_of(&self.config.egress, &c.labels, c.runtime.as_ref())
    }
}
