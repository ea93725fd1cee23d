//! Writing a [`Plan`]: one step per effect, each behind a small trait (the maps, the
//! netfilter table, socket destruction), in an order that never serves a half-written state:
//! the config and client namespaces, then ports reserved before their frontends answer,
//! frontends, ports released after theirs are gone; then the notrack rules and the sockets of
//! backends that went, both following what the maps serve. A failed step fails the apply;
//! the agent retries it with [`crate::retry::Backoff`] (every step is idempotent).

pub mod packets;
pub mod reconcile;
pub mod sockets;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result};
use dataplane_common::{Backend, Config, FrontendKey, PeerNet, PeerNetKey, PortFamilies, PortKey};

use crate::{
    addr::Service,
    apply::reconcile::{Applied, KvStore, reconcile},
    bpf::Loaded,
    model::Model,
    netfilter::notrack,
    plan::{Plan, Served, gone_backends},
};

/// The kernel maps a plan is written to.
pub trait Maps {
    fn write_config(&mut self, config: Config) -> Result<()>;
    fn write_peer_nets(&mut self, want: &BTreeMap<PeerNetKey, PeerNet>) -> Result<Applied>;
    fn ports(&mut self) -> Result<BTreeMap<PortKey, PortFamilies>>;
    fn write_ports(&mut self, want: &BTreeMap<PortKey, PortFamilies>) -> Result<Applied>;
    fn frontends(&mut self) -> Result<BTreeMap<FrontendKey, Backend>>;
    fn write_frontends(&mut self, want: &BTreeMap<FrontendKey, Backend>) -> Result<Applied>;
}

/// The notrack table: applied off the caller's thread, the latest request winning.
pub trait Netfilter {
    fn schedule(&self, spec: notrack::Spec, force: bool);
}

/// Destruction of translated sockets (off the caller's thread).
pub trait Sockets {
    /// Destroys the translated sockets to `gone`, in the host and in `namespaces`.
    fn destroy(&self, gone: Vec<Service>, namespaces: Vec<PathBuf>);
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub served: Served,
    /// The frontends map's changes.
    pub frontends: Applied,
    /// Maps that could not hold everything (what they hold is served; the rest takes
    /// Docker's own path).
    pub map_errors: Vec<String>,
    /// Backends whose translated sockets were handed for destruction.
    pub gone: Vec<Service>,
}

/// Writes `plan` (from `state`); `prev_owners` are the backends the maps served before.
/// `force_netfilter` re-applies the table even if unchanged (repairs drift).
pub fn apply(
    plan: &Plan,
    model: &Model,
    prev_owners: &BTreeMap<Service, String>,
    maps: &mut impl Maps,
    netfilter: &impl Netfilter,
    sockets: &impl Sockets,
    force_netfilter: bool,
) -> Result<Outcome> {
    maps.write_config(plan.config)
        .context("writing the config map")?;
    maps.write_peer_nets(&plan.peer_nets)
        .context("updating the peer-networks map")?;
    let mut want = plan.wanted();
    let mut map_errors = Vec::new();
    // Ports first: a port is reserved before its frontend answers, and stays reserved until
    // its frontend is gone.
    let mut ports = maps.ports()?;
    ports.extend(Plan::ports(&want));
    if let Err(e) = maps.write_ports(&ports) {
        map_errors.push(format!("published-ports map: {e:#}"));
    }
    let frontends = match maps.write_frontends(&want) {
        Ok(a) => a,
        Err(e) => {
            // A full map: what is in it is served, the rest takes Docker's own path, and
            // everything below (notrack rules, status) follows what is in the map.
            let in_map = maps.frontends()?;
            let total = want.len();
            want.retain(|k, v| in_map.get(k) == Some(v));
            map_errors.push(format!(
                "frontends map: {e:#}: {} of {total} published bindings are left to Docker's \
                 own path (`--max-frontends`)",
                total - want.len()
            ));
            Applied::default()
        }
    };
    if let Err(e) = maps.write_ports(&Plan::ports(&want)) {
        map_errors.push(format!("published-ports map: {e:#}"));
    }
    let served = plan.served(want, model);
    netfilter.schedule(served.notrack.clone(), force_netfilter);
    let gone = gone_backends(prev_owners, &served.owners, model);
    if !gone.is_empty() {
        sockets.destroy(gone.clone(), model.client_namespaces());
    }
    Ok(Outcome {
        served,
        frontends,
        map_errors,
        gone,
    })
}

impl Maps for Loaded {
    fn write_config(&mut self, config: Config) -> Result<()> {
        self.set_config(config)
    }

    fn write_peer_nets(&mut self, want: &BTreeMap<PeerNetKey, PeerNet>) -> Result<Applied> {
        Ok(reconcile(&mut self.peer_nets()?, want)?)
    }

    fn ports(&mut self) -> Result<BTreeMap<PortKey, PortFamilies>> {
        Ok(self.ports_map()?.entries()?)
    }

    fn write_ports(&mut self, want: &BTreeMap<PortKey, PortFamilies>) -> Result<Applied> {
        Ok(reconcile(&mut self.ports_map()?, want)?)
    }

    fn frontends(&mut self) -> Result<BTreeMap<FrontendKey, Backend>> {
        Ok(self.frontends_map()?.entries()?)
    }

    fn write_frontends(&mut self, want: &BTreeMap<FrontendKey, Backend>) -> Result<Applied> {
        Ok(reconcile(&mut self.frontends_map()?, want)?)
    }
}

impl Netfilter for crate::netfilter::NetfilterTask {
    fn schedule(&self, spec: notrack::Spec, force: bool) {
        crate::netfilter::NetfilterTask::schedule(self, spec, force);
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeSet, net::IpAddr};

    use dataplane_common::{PROTO_TCP, WILDCARD4, net_id, v4_mapped};

    use super::*;
    use crate::{
        apply::reconcile::FakeStore,
        model::desired::{self, Frontend, Peer},
        plan::{Env, plan},
    };

    /// Maps in memory, with a journal of every write across them.
    #[derive(Default)]
    struct FakeMaps {
        config: Option<Config>,
        peer_nets: FakeStore<PeerNetKey, PeerNet>,
        ports: FakeStore<PortKey, PortFamilies>,
        frontends: FakeStore<FrontendKey, Backend>,
        journal: Vec<String>,
        fail_config: bool,
    }

    impl Maps for FakeMaps {
        fn write_config(&mut self, config: Config) -> Result<()> {
            if self.fail_config {
                anyhow::bail!("the kernel said no");
            }
            self.config = Some(config);
            Ok(())
        }
        fn write_peer_nets(&mut self, want: &BTreeMap<PeerNetKey, PeerNet>) -> Result<Applied> {
            Ok(reconcile(&mut self.peer_nets, want)?)
        }
        fn ports(&mut self) -> Result<BTreeMap<PortKey, PortFamilies>> {
            Ok(self.ports.map.clone())
        }
        fn write_ports(&mut self, want: &BTreeMap<PortKey, PortFamilies>) -> Result<Applied> {
            let a = reconcile(&mut self.ports, want)?;
            if a.changed() {
                self.journal.push(format!("ports {}", self.ports.map.len()));
            }
            Ok(a)
        }
        fn frontends(&mut self) -> Result<BTreeMap<FrontendKey, Backend>> {
            Ok(self.frontends.map.clone())
        }
        fn write_frontends(&mut self, want: &BTreeMap<FrontendKey, Backend>) -> Result<Applied> {
            let r = reconcile(&mut self.frontends, want);
            self.journal
                .push(format!("frontends {}", self.frontends.map.len()));
            Ok(r?)
        }
    }

    #[derive(Default)]
    struct FakeNetfilter(RefCell<Vec<notrack::Spec>>);
    impl Netfilter for FakeNetfilter {
        fn schedule(&self, spec: notrack::Spec, _force: bool) {
            self.0.borrow_mut().push(spec);
        }
    }

    #[derive(Default)]
    struct FakeSockets(RefCell<Vec<Vec<Service>>>);
    impl Sockets for FakeSockets {
        fn destroy(&self, gone: Vec<Service>, _namespaces: Vec<PathBuf>) {
            self.0.borrow_mut().push(gone);
        }
    }

    fn state_with(ports: &[u16]) -> Model {
        let mut s = Model::default();
        for (i, port) in ports.iter().enumerate() {
            let id = format!("c{i}");
            let key = FrontendKey::new(WILDCARD4, *port, PROTO_TCP);
            let ip = [172, 17, 0, u8::try_from(i + 2).unwrap()];
            s.set_frontends(
                &id,
                vec![Frontend {
                    key,
                    backend: Backend {
                        addr4: v4_mapped(ip),
                        addr6: [0; 16],
                        port_be: 80u16.to_be(),
                        flags: 0,
                        id: desired::frontend_id(&key),
                        net: net_id("n"),
                        pad: 0,
                    },
                    container_id: id.clone(),
                    container_name: id.clone(),
                }],
            );
            s.set_peer(
                &id,
                Peer {
                    sandbox: None,
                    pid: None,
                    endpoints: vec![("n".into(), vec![IpAddr::from(ip)])],
                },
                None,
            );
        }
        s
    }

    fn run(
        s: &Model,
        maps: &mut FakeMaps,
        prev: &BTreeMap<Service, String>,
    ) -> (Result<Outcome>, FakeNetfilter, FakeSockets) {
        let (nf, socks) = (FakeNetfilter::default(), FakeSockets::default());
        let r = apply(&plan(s, &Env::default()), s, prev, maps, &nf, &socks, false);
        (r, nf, socks)
    }

    #[test]
    fn ports_are_reserved_before_frontends_answer_and_released_after() {
        let mut maps = FakeMaps::default();
        let (r, nf, _) = run(&state_with(&[8080, 8081]), &mut maps, &BTreeMap::new());
        let out = r.unwrap();
        assert_eq!(maps.journal, vec!["ports 2", "frontends 2"]);
        assert_eq!(out.frontends.added, 2);
        assert_eq!(nf.0.borrow()[0].backends.len(), 2);
        assert!(maps.config.is_some());
        // One goes: its frontend first, then its port.
        maps.journal.clear();
        let (r, _, _) = run(&state_with(&[8080]), &mut maps, &out.served.owners);
        r.unwrap();
        assert_eq!(maps.journal, vec!["frontends 1", "ports 1"]);
    }

    #[test]
    fn a_full_map_serves_what_it_holds_and_says_the_rest() {
        let mut maps = FakeMaps::default();
        maps.frontends.capacity = Some(2);
        let (r, nf, _) = run(&state_with(&[1, 2, 3, 4]), &mut maps, &BTreeMap::new());
        let out = r.unwrap();
        assert_eq!(out.served.frontends.len(), 2);
        assert_eq!(out.served.rows.len(), 2);
        assert!(
            out.map_errors[0].contains("2 of 4 published bindings are left to Docker's own path"),
            "{:?}",
            out.map_errors
        );
        // Rules and reserved ports follow what the map serves.
        assert_eq!(nf.0.borrow()[0].backends.len(), 2);
        assert_eq!(maps.ports.map.len(), 2);
    }

    #[test]
    fn backends_that_go_have_their_sockets_destroyed_once() {
        let mut maps = FakeMaps::default();
        let s = state_with(&[8080, 8081]);
        let (r, _, socks) = run(&s, &mut maps, &BTreeMap::new());
        let before = r.unwrap().served.owners;
        assert!(socks.0.borrow().is_empty());
        let mut s2 = s;
        s2.forget("c1");
        let (r, _, socks) = run(&s2, &mut maps, &before);
        let out = r.unwrap();
        let gone: BTreeSet<String> = out.gone.iter().map(ToString::to_string).collect();
        assert_eq!(gone, ["172.17.0.3:80/tcp".to_string()].into());
        assert_eq!(socks.0.borrow().len(), 1);
    }

    #[test]
    fn a_failed_apply_changes_nothing_further_and_a_retry_completes_it() {
        let mut maps = FakeMaps {
            fail_config: true,
            ..FakeMaps::default()
        };
        let s = state_with(&[8080]);
        let (r, nf, _) = run(&s, &mut maps, &BTreeMap::new());
        assert!(r.unwrap_err().to_string().contains("config map"));
        assert!(maps.frontends.map.is_empty() && nf.0.borrow().is_empty());
        // The retry (the agent waits `Backoff::failed()` first) does it all.
        maps.fail_config = false;
        let (r, nf, _) = run(&s, &mut maps, &BTreeMap::new());
        assert_eq!(r.unwrap().served.frontends.len(), 1);
        assert_eq!(nf.0.borrow().len(), 1);
    }
}
