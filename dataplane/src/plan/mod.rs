//! What the kernel and netfilter should hold, from what the agent knows: one pure function
//! ([`whole`]: the maps ([`plan`]), the egress and own-firewall tables, the pause resets)
//! and what follows once the maps say what they could hold ([`Plan::served`]: the notrack
//! table, the sockets to destroy, the packet layer's endpoints). [`crate::apply`] and the
//! tables' appliers write it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use dataplane_api::Frontend as FrontendView;
use dataplane_common::{
    BACKEND_F_PAUSED, BACKEND_F_RESET_ON_PAUSE, Backend, CFG_F_BINDV6ONLY, CFG_F_PEERS,
    CFG_F_RESERVE_PORTS, Config, FrontendKey, PeerNet, PeerNetKey, PortFamilies, PortKey, is_zero,
    net_id,
};

use crate::{
    addr::Service,
    egress,
    model::desired::{self, Conflict, Frontend},
    model::{ContainerId, Model},
    netfilter::notrack,
    ownfw,
    report::api::FrontendRow,
};

/// Facts of the host the plan depends on.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub host_netns_cookie: u64,
    /// `net.ipv6.bindv6only` is 1.
    pub bindv6only: bool,
    /// The host's resolvers (egress: containers that Docker gives them may ask them).
    pub host_dns: BTreeSet<IpAddr>,
    /// The host's `br-*` interfaces that are not Docker's (own-firewall mode).
    pub other_bridges: BTreeSet<String>,
    /// What the egress policies say for the maps ([`whole`] takes them from the policies):
    /// containers kept from the host and other containers (never translated as clients),
    /// and the addresses of policed containers (none of their packets untracked).
    pub host_denied: BTreeSet<String>,
    pub policed: BTreeSet<IpAddr>,
}

/// Everything the kernel and netfilter should hold.
#[derive(Clone, Debug, Default)]
pub struct Whole {
    /// The maps (and, once written, the notrack table and sockets: [`Plan::served`]).
    pub maps: Plan,
    /// The egress table, and the policies that cannot be read (to be said once).
    pub egress: egress::nft::Spec,
    pub egress_errors: Vec<(String, String)>,
    /// The own-firewall table, in that mode.
    pub own_firewall: Option<ownfw::Spec>,
    /// Backends of paused containers whose connections are reset, and those containers.
    pub paused: BTreeSet<Service>,
    pub paused_ids: BTreeSet<ContainerId>,
}

/// Everything the kernel and netfilter should hold for `model` and its containers'
/// egress policies on a host with `env`; the own-firewall table when `own_firewall`.
pub fn whole(model: &Model, policies: &egress::Egress, env: &Env, own_firewall: bool) -> Whole {
    let records = egress::records::Policies(&model.containers);
    let (egress, egress_errors) = policies.spec(records, &env.host_dns);
    let env = Env {
        host_denied: policies.host_denied(records),
        policed: policies.policed_addrs(records),
        ..env.clone()
    };
    let own_firewall = own_firewall.then(|| {
        let mut spec = ownfw::Spec::new(
            model.networks.values(),
            ownfw::published(model.frontends()),
            env.other_bridges.clone(),
        );
        spec.routed = ownfw::routed_ports(model.inspects().map(|(_, c)| c), &model.networks);
        spec
    });
    let (paused, paused_ids) = paused(model);
    Whole {
        maps: plan(model, &env),
        egress,
        egress_errors,
        own_firewall,
        paused,
        paused_ids,
    }
}

/// The desired model, before the maps are written.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub config: Config,
    /// Which container namespaces are translated to backends on which network.
    pub peer_nets: BTreeMap<PeerNetKey, PeerNet>,
    /// Those containers' addresses there (for the notrack rules).
    pub peer_addrs: BTreeSet<IpAddr>,
    /// Every published binding, one container each.
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Bindings two containers claim (Docker refuses this; one of them is kept).
    pub conflicts: Vec<Conflict>,
    /// Bindings that could not be understood, and conflicts, as `status` says them.
    pub errors: Vec<String>,
    /// Why container clients are left to Docker's own path, when they are.
    pub container_clients_off: Option<String>,
    /// Why host clients' connections stay tracked, when they do.
    pub host_clients_tracked: Option<String>,
    /// Addresses of policed containers (from [`Env::policed`]).
    pub policed: BTreeSet<IpAddr>,
}

/// The desired state for `state` on a host with `env`.
pub fn plan(model: &Model, env: &Env) -> Plan {
    let mut conflicts = Vec::new();
    let mut frontends = desired::merge(model.frontends(), &mut conflicts);
    let unpublished = strip_unpublished_families(&mut frontends, model);
    let mut flags = CFG_F_RESERVE_PORTS;
    let peers_on = model.firewall.forward_rules.is_none();
    if peers_on {
        flags |= CFG_F_PEERS;
    }
    if env.bindv6only {
        flags |= CFG_F_BINDV6ONLY;
    }
    let mut peer_nets = BTreeMap::new();
    let mut peer_addrs = BTreeSet::new();
    // Container clients: only on networks where Docker itself connects containers straight
    // to each other, and only while no operator rule could concern their traffic.
    // A container whose egress policy keeps it from other containers takes Docker's
    // path, where its policy applies.
    for (id, p, cookie) in model.peers().filter(|_| peers_on) {
        let Some(cookie) = cookie else { continue };
        if env.host_denied.contains(id.as_str()) {
            continue;
        }
        for (net, addrs) in &p.endpoints {
            if !model.networks.get(net).is_some_and(|n| n.peers_direct) {
                continue;
            }
            let key = PeerNetKey {
                netns_cookie: cookie,
                net: net_id(net),
                pad: 0,
            };
            peer_nets.insert(key, PeerNet { flags: 0 });
            peer_addrs.extend(addrs.iter().copied());
        }
    }
    let mut errors: Vec<String> = model
        .containers
        .values()
        .flat_map(|c| c.binding_errors.iter().cloned())
        .collect();
    errors.extend(
        conflicts
            .iter()
            .map(|c| format!("{} claimed by {} and {}", c.frontend, c.kept, c.dropped)),
    );
    errors.extend(unpublished);
    Plan {
        config: Config {
            host_netns_cookie: env.host_netns_cookie,
            flags,
        },
        peer_nets,
        peer_addrs,
        frontends,
        conflicts,
        errors,
        container_clients_off: model
            .firewall
            .forward_rules
            .as_ref()
            .map(|w| format!("operator forwarding rules ({w})")),
        host_clients_tracked: model
            .firewall
            .stateful_input
            .as_ref()
            .map(|w| format!("stateful INPUT policy ({w})")),
        policed: env.policed.clone(),
    }
}

/// Keeps, of each frontend's backend, only the families Docker publishes through NAT on
/// the backend's network (its gateway mode, see `engine`); a frontend left with none goes,
/// said in the returned messages (Docker publishes no host port there).
fn strip_unpublished_families(
    frontends: &mut BTreeMap<FrontendKey, Frontend>,
    model: &Model,
) -> Vec<String> {
    let mut off4 = BTreeSet::new();
    let mut off6 = BTreeSet::new();
    for n in model.networks.values() {
        if !n.nat4 {
            off4.insert(net_id(&n.id));
        }
        if !n.nat6 {
            off6.insert(net_id(&n.id));
        }
    }
    if off4.is_empty() && off6.is_empty() {
        return Vec::new();
    }
    let mut said = Vec::new();
    frontends.retain(|_, f| {
        if off4.contains(&f.backend.net) {
            f.backend.addr4 = [0; 16];
        }
        if off6.contains(&f.backend.net) {
            f.backend.addr6 = [0; 16];
        }
        let keep = !is_zero(&f.backend.addr4) || !is_zero(&f.backend.addr6);
        if !keep {
            said.push(format!(
                "{} of {}: its network publishes no NAT (gateway mode routed or isolated); \
                 left to Docker",
                desired::describe_key(&f.key),
                f.container_name
            ));
        }
        keep
    });
    said
}

/// What the maps serve of a plan (all of it, unless a map was too small), and all that
/// follows from it.
#[derive(Clone, Debug, Default)]
pub struct Served {
    pub frontends: BTreeMap<FrontendKey, Backend>,
    /// The notrack table's content.
    pub notrack: notrack::Spec,
    /// `bridge-ctl frontends`.
    pub rows: Vec<FrontendRow>,
    /// Each backend in the maps, with the container it belongs to.
    pub owners: BTreeMap<Service, String>,
}

impl Plan {
    /// Every binding's backend: what the frontends map should hold.
    pub fn wanted(&self) -> BTreeMap<FrontendKey, Backend> {
        self.frontends
            .iter()
            .map(|(k, f)| (*k, f.backend))
            .collect()
    }

    /// The published ports of `frontends`: what the ports map should hold.
    pub fn ports(frontends: &BTreeMap<FrontendKey, Backend>) -> BTreeMap<PortKey, PortFamilies> {
        desired::ports_of(frontends.keys())
    }

    /// All that follows from the maps serving `frontends` (a subset of [`Plan::wanted`]).
    pub fn served(&self, frontends: BTreeMap<FrontendKey, Backend>, model: &Model) -> Served {
        let mut notrack = notrack::Spec::new(
            frontends.iter(),
            &model.host_addrs,
            self.peer_addrs.iter().copied(),
            self.host_clients_tracked.is_some(),
        );
        // A policed container's packets stay tracked, both ways: its egress policy judges
        // every connection it opens by conntrack model, and an untracked packet of its own
        // (from its published port, say) would not be judged at all.
        notrack.backends.retain(|b| !self.policed.contains(&b.addr));
        notrack.peers.retain(|a| !self.policed.contains(a));
        let mut rows = Vec::new();
        let mut owners = BTreeMap::new();
        for f in self
            .frontends
            .values()
            .filter(|f| frontends.contains_key(&f.key))
        {
            rows.push(FrontendRow {
                view: FrontendView {
                    frontend: desired::describe_key(&f.key),
                    container: f.container_name.clone(),
                    container_id: f.container_id.chars().take(12).collect(),
                    backend: desired::describe_backend(&f.backend),
                    connections: 0,
                    on_pause: if f.backend.flags & BACKEND_F_RESET_ON_PAUSE != 0 {
                        "reset"
                    } else {
                        "keep"
                    }
                    .into(),
                    paused: f.backend.flags & BACKEND_F_PAUSED != 0,
                },
                id: f.backend.id,
            });
            for a in [f.backend.addr4, f.backend.addr6] {
                if !is_zero(&a) {
                    let s =
                        Service::new(crate::addr::addr_to_ip(&a), f.key.proto, f.backend.port());
                    owners.insert(s, f.container_id.clone());
                }
            }
        }
        Served {
            frontends,
            notrack,
            rows,
            owners,
        }
    }
}

/// The backends of paused containers that asked for `on-pause=reset` (their translated
/// sockets are destroyed when they enter this set), and those containers.
pub fn paused(model: &Model) -> (BTreeSet<Service>, BTreeSet<ContainerId>) {
    let mut backends = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (id, c) in &model.containers {
        for f in c
            .frontends
            .iter()
            .filter(|f| f.backend.flags & BACKEND_F_PAUSED != 0)
        {
            ids.insert(id.clone());
            for a in [f.backend.addr4, f.backend.addr6] {
                if !is_zero(&a) {
                    backends.insert(Service::new(
                        crate::addr::addr_to_ip(&a),
                        f.key.proto,
                        f.backend.port(),
                    ));
                }
            }
        }
    }
    (backends, ids)
}

/// Where the packet layer delivers each backend the maps serve (`owners`, from
/// [`Plan::served`]): the container's network namespace, for the containers that have one.
pub fn packet_endpoints(
    owners: &BTreeMap<Service, String>,
    model: &Model,
) -> BTreeMap<IpAddr, crate::packet::Wanted> {
    owners
        .iter()
        .filter_map(|(svc, id)| {
            let netns = model.netns_path(id)?;
            Some((
                svc.addr,
                crate::packet::Wanted {
                    container: id.clone(),
                    netns,
                },
            ))
        })
        .collect()
}

/// Backends that left the maps (`before` -> `now`) together with their address: their
/// translated sockets are to be destroyed. One that moved to another address of the same
/// container (a frontend that followed Docker to another network) is not gone: its
/// connections still reach the container.
pub fn gone_backends(
    before: &BTreeMap<Service, String>,
    now: &BTreeMap<Service, String>,
    model: &Model,
) -> Vec<Service> {
    before
        .iter()
        .filter(|(b, id)| !now.contains_key(*b) && !model.has_address(id, &b.addr))
        .map(|(b, _)| *b)
        .collect()
}

#[cfg(test)]
mod tests {
    use dataplane_common::{PROTO_TCP, WILDCARD4, v4_mapped};

    use super::*;
    use crate::{docker::NetInfo, model::desired::Peer};

    fn frontend(id: &str, port: u16, ip: [u8; 4]) -> Frontend {
        let key = FrontendKey::new(WILDCARD4, port, PROTO_TCP);
        Frontend {
            key,
            backend: Backend {
                addr4: v4_mapped(ip),
                addr6: [0; 16],
                port_be: 80u16.to_be(),
                flags: 0,
                id: desired::frontend_id(&key),
                net: net_id("net1"),
                pad: 0,
            },
            container_id: id.into(),
            container_name: format!("name-{id}"),
        }
    }

    fn state() -> Model {
        let mut s = Model::default();
        s.set_frontends("a", vec![frontend("a", 8080, [172, 17, 0, 2])]);
        s.set_frontends("b", vec![frontend("b", 8080, [172, 17, 0, 3])]);
        s.set_frontends("c", vec![frontend("c", 9090, [172, 17, 0, 4])]);
        s.networks.insert(
            "net1".into(),
            NetInfo {
                id: "net1".into(),
                name: "bridge".into(),
                bridge: Some("docker0".into()),
                peers_direct: true,
                nat4: true,
                nat6: true,
                fw: crate::docker::FwInfo::default(),
            },
        );
        let peer = |ip: &str| Peer {
            sandbox: None,
            pid: Some(1),
            endpoints: vec![("net1".into(), vec![ip.parse().unwrap()])],
        };
        s.set_peer("a", peer("172.17.0.2"), Some(11));
        s.set_peer("b", peer("172.17.0.3"), Some(12));
        // Its cookie is not read yet: not a client the programs know.
        s.set_peer("c", peer("172.17.0.4"), None);
        s
    }

    #[test]
    fn frontends_peers_and_flags_from_the_state() {
        let s = state();
        let p = plan(
            &s,
            &Env {
                host_netns_cookie: 7,
                bindv6only: true,
                ..Env::default()
            },
        );
        assert_eq!(p.config.host_netns_cookie, 7);
        assert_eq!(
            p.config.flags,
            CFG_F_RESERVE_PORTS | CFG_F_PEERS | CFG_F_BINDV6ONLY
        );
        // One container per binding; the other is a conflict, said in the errors.
        assert_eq!(p.frontends.len(), 2);
        assert_eq!(p.conflicts.len(), 1);
        assert!(
            p.errors[0].contains("claimed by name-a and name-b"),
            "{:?}",
            p.errors
        );
        let cookies: BTreeSet<u64> = p.peer_nets.keys().map(|k| k.netns_cookie).collect();
        assert_eq!(cookies, [11, 12].into());
        assert_eq!(p.peer_addrs.len(), 2);
        assert!(p.container_clients_off.is_none() && p.host_clients_tracked.is_none());
        // A container its egress policy keeps from other containers is no client.
        let s = state();
        let env = Env {
            host_denied: ["a".to_string()].into(),
            ..Env::default()
        };
        let p = plan(&s, &env);
        let cookies: BTreeSet<u64> = p.peer_nets.keys().map(|k| k.netns_cookie).collect();
        assert_eq!(cookies, [12].into());
        assert_eq!(p.peer_addrs.len(), 1);
    }

    #[test]
    fn operator_rules_turn_container_clients_off_and_say_why() {
        let mut s = state();
        s.firewall.forward_rules = Some("DOCKER-USER".into());
        s.firewall.stateful_input = Some("inet filter input".into());
        let p = plan(&s, &Env::default());
        assert!(p.peer_nets.is_empty() && p.peer_addrs.is_empty());
        assert_eq!(p.config.flags & CFG_F_PEERS, 0);
        assert!(p.container_clients_off.unwrap().contains("DOCKER-USER"));
        let served = plan(&s, &Env::default()).served(BTreeMap::new(), &s);
        assert!(served.notrack.track_host_clients);
    }

    #[test]
    fn what_the_maps_serve_decides_rules_rows_and_owners() {
        let s = state();
        let p = plan(&s, &Env::default());
        let mut wanted = p.wanted();
        let all = p.served(wanted.clone(), &s);
        assert_eq!(all.rows.len(), 2);
        assert_eq!(all.owners.len(), 2);
        assert_eq!(all.notrack.backends.len(), 2);
        // A map that held only one binding: only it is served, untracked and listed.
        let k = *wanted.keys().next().unwrap();
        wanted.retain(|key, _| *key == k);
        let one = p.served(wanted, &s);
        assert_eq!(one.rows.len(), 1);
        assert_eq!(one.notrack.backends.len(), 1);
        assert_eq!(one.notrack.published, [(PROTO_TCP, k.port())].into());
    }

    #[test]
    fn a_network_that_publishes_no_nat_gets_no_frontends() {
        let mut s = state();
        s.networks.get_mut("net1").unwrap().nat4 = false;
        let p = plan(&s, &Env::default());
        // IPv4-only backends on a routed network: nothing, and status says why.
        assert!(p.frontends.is_empty());
        assert!(
            p.errors.iter().any(|e| e.contains("publishes no NAT")),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn a_backend_is_gone_only_with_its_address() {
        let mut s = state();
        let p = plan(&s, &Env::default());
        let before = p.served(p.wanted(), &s).owners;
        // Container c's frontend goes, but c still has its address: not gone.
        s.containers.get_mut("c").unwrap().frontends.clear();
        let p2 = plan(&s, &Env::default());
        let now = p2.served(p2.wanted(), &s).owners;
        assert!(gone_backends(&before, &now, &s).is_empty());
        // c goes altogether: its backend is gone.
        s.forget("c");
        let gone = gone_backends(&before, &now, &s);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].addr, "172.17.0.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_whole_plan_holds_every_table_and_the_pause_resets() {
        let mut s = state();
        // `a` paused, asking for its connections to be reset.
        for f in &mut s.containers.get_mut("a").unwrap().frontends {
            f.backend.flags |= BACKEND_F_PAUSED | BACKEND_F_RESET_ON_PAUSE;
        }
        let mut policies = egress::Egress::new(
            "t",
            crate::config::Config::parse("").unwrap(),
            None,
            Vec::new(),
            std::path::Path::new("/nonexistent"),
        );
        policies.created(
            &mut s.containers,
            "d",
            "/d",
            [("dataplane.egress.internet".to_string(), "false".to_string())].into(),
            true,
        );
        policies.connected(
            &mut s.containers,
            "d",
            "net1",
            vec!["172.17.0.9".parse().unwrap()],
        );
        let env = Env {
            other_bridges: ["br-other".to_string()].into(),
            ..Env::default()
        };
        let w = whole(&s, &policies, &env, false);
        assert_eq!(w.maps.frontends.len(), 2, "the maps' plan is `plan`'s");
        assert!(w.own_firewall.is_none(), "not in that mode");
        assert_eq!(
            w.egress.containers.len(),
            1,
            "the policed container's chains"
        );
        assert!(w.egress.admitted.contains(&"172.17.0.9".parse().unwrap()));
        assert_eq!(
            w.paused_ids
                .iter()
                .map(ContainerId::as_str)
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(w.paused.len(), 1);
        let w = whole(&s, &policies, &env, true);
        let fw = w.own_firewall.expect("in that mode");
        assert_eq!(fw.others, env.other_bridges);
        assert!(fw.nets.contains_key("docker0"));
        // Planning twice gives the same (nothing in it reads the host).
        assert_eq!(whole(&s, &policies, &env, true).own_firewall, Some(fw));
        // A policy that keeps `b` from the host and other containers: `b` is no client of
        // the maps' plan, and its address stays tracked, from this very plan on.
        let b_ip: IpAddr = "172.17.0.3".parse().unwrap();
        policies.created(
            &mut s.containers,
            "b",
            "/b",
            [("dataplane.egress.host".to_string(), "false".to_string())].into(),
            true,
        );
        policies.connected(&mut s.containers, "b", "net1", vec![b_ip]);
        let w = whole(&s, &policies, &env, false);
        let cookies: BTreeSet<u64> = w.maps.peer_nets.keys().map(|k| k.netns_cookie).collect();
        assert_eq!(
            cookies,
            [11].into(),
            "b (cookie 12) is left to Docker's path"
        );
        let served = w.maps.served(w.maps.wanted(), &s);
        assert!(!served.notrack.peers.contains(&b_ip));
    }

    #[test]
    fn the_packet_layer_delivers_served_backends_into_their_containers_namespaces() {
        let mut s = state();
        s.containers
            .get_mut("b")
            .unwrap()
            .peer
            .as_mut()
            .unwrap()
            .pid = Some(42);
        let owners: BTreeMap<Service, String> = [
            (
                Service::new("172.17.0.2".parse().unwrap(), PROTO_TCP, 80),
                "a".to_string(),
            ),
            (
                Service::new("172.17.0.3".parse().unwrap(), PROTO_TCP, 80),
                "b".to_string(),
            ),
            // Gone from the model meanwhile: nowhere to deliver it.
            (
                Service::new("172.17.0.9".parse().unwrap(), PROTO_TCP, 80),
                "z".to_string(),
            ),
        ]
        .into();
        let want = packet_endpoints(&owners, &s);
        assert_eq!(want.len(), 2);
        let b = &want[&"172.17.0.3".parse::<IpAddr>().unwrap()];
        assert_eq!(b.container, "b");
        assert_eq!(b.netns, std::path::PathBuf::from("/proc/42/ns/net"));
    }
}
