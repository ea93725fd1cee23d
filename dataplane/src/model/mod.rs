//! What the agent knows: one record per container ([`Container`], keyed by
//! [`ContainerId`]), Docker's networks, the host's addresses and what its ruleset means.
//! Inputs update it; [`crate::plan::plan`] reads it. No I/O here.

pub mod desired;
mod egress;
mod id;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    time::SystemTime,
};

use bollard::models::ContainerInspectResponse;

pub use egress::EgressRecord;
pub use id::ContainerId;

use crate::{
    docker::NetInfo,
    hostfw::HostFirewall,
    model::desired::{DefaultRoutes, Frontend, Peer},
    netlink::HostAddr,
};

/// What the agent knows of one container. Removing the record forgets all of it.
#[derive(Clone, Debug, Default)]
pub struct Container {
    /// Docker's last inspect of it (none until it is inspected after its `create`).
    pub inspect: Option<ContainerInspectResponse>,
    /// Its inspect as created, until its start completes: its frontends are written from it
    /// at `network connect`, before Docker's start ends.
    pub created: Option<ContainerInspectResponse>,
    /// When those early frontends went into the map (until its start event reads it).
    pub early_written: Option<SystemTime>,
    /// Its published bindings, from the inspect (or early, from the created inspect).
    pub frontends: Vec<Frontend>,
    /// Bindings that could not be understood.
    pub binding_errors: Vec<String>,
    /// As a client: its endpoints and network namespace, while it runs.
    pub peer: Option<Peer>,
    /// Its network namespace cookie, once read.
    pub cookie: Option<u64>,
    /// Its namespace cookie is to be read (a new namespace).
    pub cookie_pending: bool,
    /// Docker's `pause` event time (ns) not handled yet.
    pub paused_at_ns: Option<i64>,
    /// What its egress policy needs (from its `create` on, until Docker removes it).
    pub egress: Option<EgressRecord>,
}

#[derive(Debug, Default)]
pub struct Model {
    pub containers: BTreeMap<ContainerId, Container>,
    /// Docker's networks by network ID.
    pub networks: HashMap<String, NetInfo>,
    /// The host's interface addresses.
    pub host_addrs: Vec<HostAddr>,
    /// What the host's ruleset means for the agent.
    pub firewall: HostFirewall,
    /// What `dataplane.on-pause` means for a container without the label.
    pub on_pause_default: desired::OnPause,
}

impl Model {
    /// Forgets a container (destroyed, or gone): all of it.
    pub fn forget(&mut self, id: &str) {
        self.containers.remove(id);
    }

    /// Forgets what runs of containers not in `live` (those Docker runs): their inspect,
    /// frontends (also those written early: a start event writes them again) and view as
    /// clients. A container whose egress policy is known, or one created and not started,
    /// keeps its record for its next start.
    pub fn retain(&mut self, live: &BTreeSet<String>) {
        self.containers.retain(|id, c| {
            if live.contains(id.as_str()) {
                return true;
            }
            c.inspect = None;
            c.frontends.clear();
            c.binding_errors.clear();
            c.peer = None;
            c.cookie = None;
            c.cookie_pending = false;
            c.early_written = None;
            c.created.is_some() || c.egress.is_some()
        });
    }

    /// Every container's frontends.
    pub fn frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.containers.values().flat_map(|c| &c.frontends)
    }

    /// How many containers publish something.
    pub fn publishing(&self) -> usize {
        self.containers
            .values()
            .filter(|c| !c.frontends.is_empty())
            .count()
    }

    /// Running containers as clients, with their namespace cookie once read.
    pub fn peers(&self) -> impl Iterator<Item = (&ContainerId, &Peer, Option<u64>)> {
        self.containers
            .iter()
            .filter_map(|(id, c)| Some((id, c.peer.as_ref()?, c.cookie)))
    }

    /// Docker's inspects of the containers (left for the next start).
    pub fn inspects(&self) -> impl Iterator<Item = (&ContainerId, &ContainerInspectResponse)> {
        self.containers
            .iter()
            .filter_map(|(id, c)| Some((id, c.inspect.as_ref()?)))
    }

    /// Replaces what is known of container `id` from its inspect (`None`: it is gone), its
    /// frontends through the endpoint its default `routes` name. Returns the binding errors;
    /// the container's cookie is marked to be read when its namespace is new.
    pub fn ingest(
        &mut self,
        id: &str,
        c: Option<ContainerInspectResponse>,
        routes: Option<&DefaultRoutes>,
    ) -> Vec<desired::BindingError> {
        let Some(c) = c else {
            self.forget(id);
            return Vec::new();
        };
        let on_pause_default = self.on_pause_default;
        let rec = self.containers.entry(ContainerId::from(id)).or_default();
        if let Some(p) = desired::peer_of(&c) {
            let same = rec
                .peer
                .as_ref()
                .is_some_and(|old| old.sandbox == p.sandbox && old.pid == p.pid);
            if !same {
                rec.cookie = None;
            }
            rec.cookie_pending = rec.cookie.is_none();
            rec.peer = Some(p);
        } else {
            rec.peer = None;
            rec.cookie = None;
            rec.cookie_pending = false;
        }
        let mut errs = Vec::new();
        let mut fs = desired::frontends_of(&c, routes, &mut errs);
        let on_pause = desired::on_pause_of(&c, on_pause_default, &mut errs);
        let paused = c.state.as_ref().and_then(|s| s.paused).unwrap_or(false);
        desired::mark_pause(&mut fs, on_pause, paused);
        rec.binding_errors = errs.iter().map(ToString::to_string).collect();
        rec.frontends = fs;
        rec.inspect = Some(c);
        errs
    }

    /// Frontends of container `id` before Docker's start completes (see
    /// [`desired::early_frontends`]: its inspect as created, `addrs` its addresses on
    /// `net`, which Docker has just connected it to). Nothing replaces what an inspect said,
    /// and a port another container publishes is left out (Docker refuses the second).
    /// Whether any frontend was added; the inspect after the start replaces them.
    pub fn early(&mut self, id: &str, net: &NetInfo, addrs: &[IpAddr]) -> bool {
        let Some(rec) = self.containers.get(id) else {
            return false;
        };
        let Some(c) = rec.created.as_ref() else {
            return false;
        };
        if !rec.frontends.is_empty() {
            return false;
        }
        let held: BTreeSet<(u16, u8)> = self
            .frontends()
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
        if let Some(rec) = self.containers.get_mut(id) {
            rec.frontends = fs;
        }
        true
    }

    /// Records container `id`'s inspect as created (for its early frontends), also when
    /// an earlier run of it was inspected (a restart).
    pub fn created(&mut self, id: &str, c: ContainerInspectResponse) {
        self.containers
            .entry(ContainerId::from(id))
            .or_default()
            .created = Some(c);
    }

    /// Records the network namespace cookie read for container `id`.
    pub fn set_cookie(&mut self, id: &str, cookie: u64) {
        if let Some(c) = self.containers.get_mut(id).filter(|c| c.peer.is_some()) {
            c.cookie = Some(cookie);
        }
    }

    /// Containers whose namespace cookie is to be read (taken: asked for once).
    pub fn take_pending_cookies(&mut self) -> Vec<ContainerId> {
        self.containers
            .iter_mut()
            .filter_map(|(id, c)| std::mem::take(&mut c.cookie_pending).then(|| id.clone()))
            .collect()
    }

    /// Where container `id`'s network namespace can be entered.
    pub fn netns_path(&self, id: &str) -> Option<PathBuf> {
        let p = self.containers.get(id)?.peer.as_ref()?;
        p.sandbox.clone().map(PathBuf::from).or_else(|| {
            p.pid
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        })
    }

    /// The namespaces of the containers the programs know as clients (their cookie is
    /// read): where translated sockets of containers live.
    pub fn client_namespaces(&self) -> Vec<PathBuf> {
        self.peers()
            .filter(|(_, _, cookie)| cookie.is_some())
            .filter_map(|(id, _, _)| self.netns_path(id.as_str()))
            .collect()
    }

    /// Whether container `id` still has address `ip` on one of its networks.
    pub fn has_address(&self, id: &str, ip: &IpAddr) -> bool {
        self.containers
            .get(id)
            .and_then(|c| c.peer.as_ref())
            .is_some_and(|p| p.endpoints.iter().any(|(_, addrs)| addrs.contains(ip)))
    }

    /// Sets a container's frontends (tests of the layers above build models this way).
    #[cfg(test)]
    pub fn set_frontends(&mut self, id: &str, fs: Vec<Frontend>) {
        self.containers.entry(id.into()).or_default().frontends = fs;
    }

    /// Sets a container's view as a client (tests).
    #[cfg(test)]
    pub fn set_peer(&mut self, id: &str, p: Peer, cookie: Option<u64>) {
        let c = self.containers.entry(id.into()).or_default();
        c.peer = Some(p);
        c.cookie = cookie;
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
        let mut m = Model::default();
        assert!(!m.early("a", &net, &ip), "no inspect as created: nothing");
        m.created("a", created("a", "8080"));
        assert!(m.early("a", &net, &ip));
        assert_eq!(m.containers["a"].frontends.len(), 2);
        assert!(
            m.containers["a"]
                .frontends
                .iter()
                .all(|f| f.backend.flags & dataplane_common::BACKEND_F_RESET_ON_PAUSE != 0),
            "the on-pause label applies"
        );
        // Another container asking for the same port: Docker will refuse its start.
        m.created("b", created("b", "8080"));
        assert!(!m.early("b", &net, &ip));
        assert!(m.containers["b"].frontends.is_empty());
        // Frontends known already: left as they are.
        m.created("a", created("a", "7070"));
        assert!(!m.early("a", &net, &ip));
        assert_eq!(m.containers["a"].frontends[0].key.port(), 8080);
        // Stopped (its inspect says so), then started again: its frontends are written
        // early again from what it was created with.
        let mut stopped = created("a", "8080");
        stopped.state = None;
        m.ingest("a", Some(stopped), None);
        assert!(m.containers["a"].frontends.is_empty());
        m.created("a", created("a", "8080"));
        assert!(m.early("a", &net, &ip));
        // A resync keeps a container being started (without early frontends: its start
        // writes them), forgets one gone.
        m.containers.get_mut("a").unwrap().created = None;
        m.retain(&BTreeSet::new());
        assert!(m.containers.contains_key("b") && !m.containers.contains_key("a"));
        assert!(m.containers["b"].frontends.is_empty());
        // Removing forgets all of it.
        m.forget("b");
        assert!(m.containers.is_empty());
    }

    #[test]
    fn a_new_namespace_has_its_cookie_read_once() {
        let running = |sandbox: &str| -> ContainerInspectResponse {
            serde_json::from_value(serde_json::json!({
                "Id": "a", "Name": "/a",
                "State": {"Status": "running", "Running": true, "Pid": 42},
                "HostConfig": {"NetworkMode": "default"},
                "NetworkSettings": {"SandboxKey": sandbox, "Networks": {"bridge": {
                    "NetworkID": "n1", "IPAddress": "172.17.0.2", "IPPrefixLen": 16}}}
            }))
            .unwrap()
        };
        let mut m = Model::default();
        m.ingest("a", Some(running("/run/docker/netns/x")), None);
        assert_eq!(m.take_pending_cookies(), vec![ContainerId::from("a")]);
        assert!(m.take_pending_cookies().is_empty(), "asked for once");
        m.set_cookie("a", 7);
        m.ingest("a", Some(running("/run/docker/netns/x")), None);
        assert!(
            m.take_pending_cookies().is_empty(),
            "same namespace: cookie kept"
        );
        assert_eq!(m.peers().next().map(|p| p.2), Some(Some(7)));
        m.ingest("a", Some(running("/run/docker/netns/y")), None);
        assert_eq!(m.take_pending_cookies().len(), 1, "a new namespace");
        assert_eq!(m.peers().next().map(|p| p.2), Some(None));
        m.ingest("a", None, None);
        assert!(m.containers.is_empty(), "gone: all of it");
    }

    /// A frontend as `early` writes them (port 8080 of a container on `n1`).
    fn early_frontend() -> Frontend {
        let net = NetInfo {
            id: "n1".into(),
            name: "bridge".into(),
            bridge: Some("docker0".into()),
            peers_direct: true,
            nat4: true,
            nat6: true,
            fw: crate::docker::FwInfo::default(),
        };
        let c = created("a", "8080");
        desired::early_frontends(&c, &net, &["172.17.0.2".parse().unwrap()]).remove(0)
    }

    #[test]
    fn a_record_holds_the_policy_too_and_goes_whole() {
        let mut m = Model::default();
        let rec = m.containers.entry("a".into()).or_default();
        rec.egress = Some(EgressRecord {
            name: "web".into(),
            ..EgressRecord::default()
        });
        m.set_peer(
            "a",
            Peer {
                sandbox: None,
                pid: Some(1),
                endpoints: vec![("n1".into(), vec!["172.17.0.2".parse().unwrap()])],
            },
            Some(7),
        );
        m.set_frontends("a", vec![early_frontend()]);
        m.containers.get_mut("a").unwrap().binding_errors = vec!["x".into()];
        // Not running at a resync: what its run held goes, its policy stays for its next
        // start.
        m.retain(&BTreeSet::new());
        let a = &m.containers["a"];
        assert!(a.frontends.is_empty() && a.peer.is_none() && a.cookie.is_none());
        assert!(a.binding_errors.is_empty() && a.inspect.is_none());
        assert_eq!(a.egress.as_ref().map(|e| e.name.as_str()), Some("web"));
        assert_eq!(m.publishing(), 0);
        assert!(m.client_namespaces().is_empty());
        // Removed by Docker: nothing of it stays.
        m.forget("a");
        assert!(m.containers.is_empty());
    }
}
