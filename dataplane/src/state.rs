//! What the agent knows: Docker's containers (as frontends and as clients) and networks,
//! the host's addresses and what its ruleset means. Docker events, netlink and ruleset
//! changes update it; [`crate::plan::plan`] reads it. No I/O here.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use bollard::models::ContainerInspectResponse;

use crate::{
    desired::{self, DefaultRoutes, Frontend, Peer},
    docker::NetInfo,
    hostfw::HostFirewall,
    netlink::HostAddr,
};

#[derive(Debug, Default)]
pub struct State {
    /// Frontends per container id, from the last inspect of each.
    pub containers: HashMap<String, Vec<Frontend>>,
    /// Bindings that could not be understood, per container id.
    pub binding_errors: BTreeMap<String, Vec<String>>,
    /// Running containers as clients, with their network namespace cookie once read.
    pub peers: HashMap<String, (Peer, Option<u64>)>,
    /// Docker's networks by network ID.
    pub networks: HashMap<String, NetInfo>,
    /// The host's interface addresses.
    pub host_addrs: Vec<HostAddr>,
    /// What the host's ruleset means for the agent.
    pub firewall: HostFirewall,
    /// Containers whose egress policy denies them the host and other containers: never
    /// translated as clients.
    pub host_denied: BTreeSet<String>,
    /// Addresses of containers with an egress policy: none of their packets is untracked.
    pub policed: BTreeSet<std::net::IpAddr>,
    /// What `dataplane.on-pause` means for a container without the label.
    pub on_pause_default: desired::OnPause,
}

impl State {
    /// Forgets a container (destroyed, or no longer running).
    pub fn forget(&mut self, id: &str) {
        self.containers.remove(id);
        self.binding_errors.remove(id);
        self.peers.remove(id);
    }

    /// Forgets every container not in `live`.
    pub fn retain(&mut self, live: &BTreeSet<String>) {
        self.containers.retain(|id, _| live.contains(id));
        self.binding_errors.retain(|id, _| live.contains(id));
        self.peers.retain(|id, _| live.contains(id));
    }

    /// Replaces what is known of container `id` from its inspect (`None`: it is gone), its
    /// frontends through the endpoint its default `routes` name. Returns the binding errors,
    /// and whether its network namespace cookie must be read (a new namespace).
    pub fn ingest(
        &mut self,
        id: &str,
        c: Option<&ContainerInspectResponse>,
        routes: Option<&DefaultRoutes>,
    ) -> (Vec<desired::BindingError>, bool) {
        let Some(c) = c else {
            self.forget(id);
            return (Vec::new(), false);
        };
        let mut new_ns = false;
        match desired::peer_of(c) {
            Some(p) => {
                let cookie = self
                    .peers
                    .get(id)
                    .filter(|(old, _)| old.sandbox == p.sandbox && old.pid == p.pid)
                    .and_then(|(_, cookie)| *cookie);
                new_ns = cookie.is_none();
                self.peers.insert(id.to_string(), (p, cookie));
            }
            None => {
                self.peers.remove(id);
            }
        }
        let mut errs = Vec::new();
        let mut fs = desired::frontends_of(c, routes, &mut errs);
        let on_pause = desired::on_pause_of(c, self.on_pause_default, &mut errs);
        let paused = c.state.as_ref().and_then(|s| s.paused).unwrap_or(false);
        desired::mark_pause(&mut fs, on_pause, paused);
        if errs.is_empty() {
            self.binding_errors.remove(id);
        } else {
            self.binding_errors.insert(
                id.to_string(),
                errs.iter().map(ToString::to_string).collect(),
            );
        }
        if fs.is_empty() {
            self.containers.remove(id);
        } else {
            self.containers.insert(id.to_string(), fs);
        }
        (errs, new_ns)
    }

    /// Frontends of container `id` before Docker's start completes (see
    /// [`desired::early_frontends`]: `c` is its inspect as created, `addrs` its addresses on
    /// `net`, which Docker has just connected it to). Nothing replaces what an inspect said,
    /// and a port another container publishes is left out (Docker refuses the second).
    /// Whether any frontend was added; the inspect after the start replaces them.
    pub fn early(
        &mut self,
        id: &str,
        c: &bollard::models::ContainerInspectResponse,
        net: &NetInfo,
        addrs: &[IpAddr],
    ) -> bool {
        if self.containers.contains_key(id) {
            return false;
        }
        let held: BTreeSet<(u16, u8)> = self
            .containers
            .values()
            .flatten()
            .map(|f| (f.key.port(), f.key.proto))
            .collect();
        let mut fs = desired::early_frontends(c, net, addrs);
        fs.retain(|f| !held.contains(&(f.key.port(), f.key.proto)));
        if fs.is_empty() {
            return false;
        }
        let mut errs = Vec::new();
        let on_pause = desired::on_pause_of(c, self.on_pause_default, &mut errs);
        desired::mark_pause(&mut fs, on_pause, false);
        self.containers.insert(id.to_string(), fs);
        true
    }

    /// Records the network namespace cookie read for container `id`.
    pub fn set_cookie(&mut self, id: &str, cookie: u64) {
        if let Some(e) = self.peers.get_mut(id) {
            e.1 = Some(cookie);
        }
    }

    /// Where container `id`'s network namespace can be entered.
    pub fn netns_path(&self, id: &str) -> Option<PathBuf> {
        let (p, _) = self.peers.get(id)?;
        p.sandbox.clone().map(PathBuf::from).or_else(|| {
            p.pid
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        })
    }

    /// The namespaces of the containers the programs know as clients (their cookie is
    /// read): where translated sockets of containers live.
    pub fn client_namespaces(&self) -> Vec<PathBuf> {
        self.peers
            .iter()
            .filter(|(_, (_, cookie))| cookie.is_some())
            .filter_map(|(id, _)| self.netns_path(id))
            .collect()
    }

    /// Whether container `id` still has address `ip` on one of its networks.
    pub fn has_address(&self, id: &str, ip: &IpAddr) -> bool {
        self.peers
            .get(id)
            .is_some_and(|(p, _)| p.endpoints.iter().any(|(_, addrs)| addrs.contains(ip)))
    }

    /// Docker's bridge interfaces, from its network list (never from interface names).
    pub fn bridges(&self) -> BTreeSet<String> {
        self.networks
            .values()
            .filter_map(|n| n.bridge.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(id: &str, port: &str) -> ContainerInspectResponse {
        serde_json::from_value(serde_json::json!({
            "Id": id,
            "Name": format!("/{id}"),
            "State": {"Status": "created"},
            "HostConfig": {"NetworkMode": "default",
                           "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": port}]}},
            "Config": {"Labels": {"dataplane.on-pause": "reset"}}
        }))
        .unwrap()
    }

    #[test]
    fn early_frontends_never_take_a_port_or_replace_an_inspect() {
        let net = NetInfo {
            id: "n1".into(),
            name: "bridge".into(),
            bridge: Some("docker0".into()),
            peers_direct: true,
            nat4: true,
            nat6: true,
            fw: crate::docker::FwInfo::default(),
        };
        let ip: Vec<IpAddr> = vec!["172.17.0.2".parse().unwrap()];
        let mut st = State::default();
        assert!(st.early("a", &created("a", "8080"), &net, &ip));
        assert_eq!(st.containers["a"].len(), 2);
        assert!(
            st.containers["a"]
                .iter()
                .all(|f| f.backend.flags & dataplane_common::BACKEND_F_RESET_ON_PAUSE != 0),
            "the on-pause label applies"
        );
        // Another container asking for the same port: Docker will refuse its start.
        assert!(!st.early("b", &created("b", "8080"), &net, &ip));
        assert!(!st.containers.contains_key("b"));
        // Known already (inspected): left as the inspect said.
        assert!(!st.early("a", &created("a", "9090"), &net, &ip));
        assert_eq!(st.containers["a"][0].key.port(), 8080);
    }
}
