//! Egress policy per container: what it may initiate ([`policy`]), compiled into the
//! agent's own nftables table ([`nft`]), with allow-list host names resolved by the agent
//! ([`dns`]).
//!
//! The table follows Docker: a container's chains are written as soon as Docker connects it
//! to a network (the `network connect` event, before its process starts; its address comes
//! from the network, which answers while the container is still starting), and removed
//! when it stops, in one transaction each. Runtime changes (`bridge-ctl egress set`) are
//! kept in files under the state directory, so they outlive an agent restart, until the
//! container is removed.
//!
//! The drop counters are read back with the table (when the agent checks it after a
//! change, writes it whole, or shows it) and, while metrics are served, every
//! [`COUNTERS_INTERVAL`]; each reading goes to an [`EgressCountersHandle`] the metrics read.

mod containers;
mod control;
pub mod dns;
pub mod guard;
mod names;
pub mod nft;
mod plan;
pub mod policy;
mod ports;
pub mod records;
mod write;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::netfilter::table::{Applied, Table};
use policy::{Allow, Layer, Policy, Target};

use crate::config::Config;

use crate::report::status::EgressCountersHandle;

pub use crate::model::EgressRecord as Container;

/// A resolved host name.
#[derive(Clone, Debug)]
pub struct Name {
    pub addrs: BTreeSet<IpAddr>,
    pub refresh_at: Instant,
    pub error: Option<String>,
    /// A lookup is running.
    pub in_flight: bool,
}

/// How long a container Docker is starting keeps the addresses its `network connect`
/// gave, before the start completes (a start that takes longer is resynced).
const STARTING_GRACE: Duration = Duration::from_mins(2);

/// How long the veths of a container Docker connected are looked for before the agent
/// waits for its next event (its start).
const PORTS_LOOKUP: Duration = Duration::from_secs(2);

/// How often the agent reads the drop counters back while metrics are served (a scrape
/// reports the latest reading, so they are at most this old, or a table check's age).
pub const COUNTERS_INTERVAL: Duration = Duration::from_secs(10);

/// The egress side of the agent: the config, the table as written, the allow-list names'
/// lookups. What it knows of each container is in the model's records
/// ([`crate::model::EgressRecord`]), which its methods are given.
pub struct Egress {
    table: String,
    pub config: Config,
    state_dir: Option<PathBuf>,
    pub names: BTreeMap<String, Name>,
    /// The table as written.
    written: Table<nft::Spec>,
    /// Docker's bridge interfaces (set by the agent before each apply).
    pub bridges: BTreeSet<String>,
    /// Whether bridged traffic is known to pass the IP hooks (`br_netfilter`).
    bridge_netfilter: bool,
    /// The daemon's own `dns` setting (its command line and config file).
    daemon_dns: Vec<IpAddr>,
    /// Where Docker keeps its containers' network namespaces (`<exec-root>/netns`).
    netns_dir: PathBuf,
    /// Veths that are no container's: on other bridges than Docker's, or Docker's own
    /// (its namespaces not named by a sandbox ID: Swarm's ingress, load balancers).
    outside_ports: BTreeSet<String>,
    /// Where each reading of the drop counters goes.
    counters: EgressCountersHandle,
    /// The reading [`Egress::refresh_counters`] started, while it runs.
    counters_read: Option<tokio::task::JoinHandle<()>>,
}

impl Egress {
    /// `daemon_dns`: the daemon's `dns` setting; `exec_root`: its `exec-root`.
    pub fn new(
        table: &str,
        config: Config,
        state_dir: Option<PathBuf>,
        daemon_dns: Vec<IpAddr>,
        exec_root: &std::path::Path,
    ) -> Self {
        Self {
            table: table.to_string(),
            config,
            state_dir,
            names: BTreeMap::new(),
            written: Table::new(table),
            bridges: BTreeSet::new(),
            bridge_netfilter: false,
            daemon_dns,
            netns_dir: exec_root.join("netns"),
            outside_ports: BTreeSet::new(),
            counters: EgressCountersHandle::default(),
            counters_read: None,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::{
        containers::unenforceable,
        ports::docker_named,
        records::{Policies, Records},
        write::drop_counters,
        *,
    };

    /// The planned table, with the host's resolvers.
    fn planned(e: &Egress, cs: &Records) -> nft::Spec {
        e.spec(Policies(cs), &dns::host_resolvers()).0
    }

    fn egress(config: &str) -> Egress {
        Egress::new(
            "t",
            Config::parse(config).unwrap(),
            None,
            Vec::new(),
            std::path::Path::new("/nonexistent"),
        )
    }

    #[test]
    fn drops_of_both_tables_add_up_by_key_and_spoofed_frames_stay_apart() {
        let inet: BTreeMap<String, u64> = [("k".into(), 3), ("m".into(), 1)].into();
        let bridge: BTreeMap<String, u64> = [
            (guard::l2_counter("k"), 2),
            (guard::spoof_counter("k"), 5),
            (guard::l2_counter("j"), 4),
        ]
        .into();
        let c = drop_counters(Some(&inet), Some(&bridge));
        assert_eq!(c.get("k"), Some(&5));
        assert_eq!(c.get("m"), Some(&1));
        assert_eq!(c.get("j"), Some(&4));
        assert_eq!(c.get(&guard::spoof_counter("k")), Some(&5));
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(drop_counters(None, Some(&bridge)).get("k"), Some(&2));
        assert!(drop_counters(None, None).is_empty());
    }

    #[test]
    fn a_counters_refresh_stores_none_for_an_empty_table_and_waits_after_a_reading() {
        let handle = crate::report::status::EgressCountersHandle::default();
        let old = Instant::now().checked_sub(COUNTERS_INTERVAL).unwrap();
        handle.lock().unwrap().update(old, [("k".into(), 9)].into());
        let mut e = egress("").with_counters(handle.clone());
        // Nothing written yet: the last reading stays.
        e.refresh_counters();
        assert_eq!(handle.lock().unwrap().read_at(), Some(old));
        // Written with no container: no counters, stored without a reading of the kernel.
        e.written.assume_applied(nft::Spec::default());
        e.refresh_counters();
        assert!(handle.lock().unwrap().drops().is_empty());
        assert!(handle.lock().unwrap().read_at() > Some(old));
        // A reading taken just now (a table check): the next refresh waits.
        let now = Instant::now();
        handle
            .lock()
            .unwrap()
            .update(now, [("k".into(), 10)].into());
        e.refresh_counters();
        assert_eq!(handle.lock().unwrap().read_at(), Some(now));
        assert_eq!(handle.lock().unwrap().drops().get("k"), Some(&10));
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_policed_container_is_in_the_table_from_its_network_connect() {
        let mut e = egress("");
        let mut cs = Records::new();
        e.bridges = ["docker0".to_string()].into();
        e.created(
            &mut cs,
            "aaaa1111",
            "/web",
            labels(&[
                ("dataplane.egress.internet", "false"),
                ("dataplane.egress.allow", "container:db:5432,remote.test:80"),
            ]),
            true,
        );
        e.created(&mut cs, "bbbb2222", "db", labels(&[]), true);
        // Known, not connected yet: its chains are ready, reached by no address yet, and
        // the bridges are gated until it is.
        let spec = planned(&e, &cs);
        assert!(spec.containers["aaaa1111"].addrs.is_empty());
        assert!(spec.guard.gated);
        e.connected(&mut cs, "aaaa1111", "net1", vec![ip("172.18.0.2")]);
        e.connected(&mut cs, "bbbb2222", "net1", vec![ip("172.18.0.3")]);
        let spec = planned(&e, &cs);
        // Only the policed one gets chains; the unpoliced one is admitted.
        assert_eq!(spec.containers.len(), 1);
        assert!(
            spec.guard.gated,
            "gated as long as a policed container exists: it may restart or connect anew"
        );
        assert_eq!(spec.admitted.len(), 2);
        let c = &spec.containers["aaaa1111"];
        assert!(!c.internet && c.host);
        // The container name resolves to its address; the host name is not resolved yet
        // (nothing allowed for it, the rest is).
        assert_eq!(c.allow.len(), 1);
        assert!(
            c.allow[0]
                .nets
                .contains(&policy::Net::host(ip("172.18.0.3")))
        );
        assert_eq!(e.due_names(Policies(&cs)), vec!["remote.test".to_string()]);
        assert!(e.due_names(Policies(&cs)).is_empty(), "in flight");
        let at = Instant::now() + Duration::from_secs(8);
        assert!(e.resolved("remote.test", Ok(([ip("198.51.100.2")].into(), at))));
        let c = planned(&e, &cs).containers["aaaa1111"].clone();
        assert_eq!(c.allow.len(), 2);
        // A changed record changes the policy; a failed lookup keeps the last one.
        assert!(e.resolved("remote.test", Ok(([ip("198.51.100.3")].into(), at))));
        assert!(!e.resolved("remote.test", Err("timed out".into())));
        let c = planned(&e, &cs).containers["aaaa1111"].clone();
        assert!(
            c.allow
                .iter()
                .any(|a| a.nets.contains(&policy::Net::host(ip("198.51.100.3"))))
        );
        assert!(e.views(Policies(&cs), None)[0].resolved["remote.test"].contains("stale"));
        // Stopped: gone from the table.
        e.retain(&mut cs, &BTreeSet::new());
        assert_eq!(planned(&e, &cs).containers.len(), 1, "still starting: kept");
        cs.get_mut("aaaa1111")
            .unwrap()
            .egress
            .as_mut()
            .unwrap()
            .starting_since = None;
        e.retain(&mut cs, &BTreeSet::new());
        let spec = planned(&e, &cs);
        assert!(
            spec.containers["aaaa1111"].addrs.is_empty(),
            "no address leads to it"
        );
        assert!(
            e.knows(Policies(&cs), "aaaa1111"),
            "its labels stay known for its next start"
        );
        e.destroyed(&mut cs, "aaaa1111");
        assert!(
            planned(&e, &cs).containers.is_empty(),
            "removed: its chains go"
        );
    }

    #[test]
    fn docker_bridges_by_name_and_what_cannot_be_policed() {
        assert!(docker_named("docker0") && docker_named("br-0123456789ab"));
        assert!(!docker_named("br-lan") && !docker_named("lxcbr0"));
        assert!(unenforceable("host", &[]).is_some_and(|m| m.contains("host")));
        assert_eq!(
            unenforceable("container:db", &[]).as_deref(),
            Some("container:db")
        );
        assert!(unenforceable("", &["macvlan".into()]).is_some_and(|m| m.contains("macvlan")));
        assert_eq!(unenforceable("bridge", &["bridge".into()]), None);
    }

    #[test]
    fn gated_while_any_policed_container_exists_and_not_otherwise() {
        let mut e = egress("");
        let mut cs = Records::new();
        e.created(&mut cs, "aaaa", "a", labels(&[]), false);
        assert!(
            !e.gating(Policies(&cs)) && !planned(&e, &cs).guard.gated,
            "nothing policed: nothing held"
        );
        e.created(
            &mut cs,
            "bbbb",
            "b",
            labels(&[("dataplane.egress.host", "false")]),
            false,
        );
        assert!(
            e.gating(Policies(&cs)),
            "a stopped policed container holds new veths back"
        );
        e.destroyed(&mut cs, "bbbb");
        assert!(!e.gating(Policies(&cs)));
        let closed = egress("[egress]\ninternet = false\n");
        assert!(closed.gating(Policies(&Records::new())));
    }

    #[test]
    fn host_off_keeps_it_from_the_socket_layer_and_a_closed_default_admits() {
        let mut e = egress("[egress]\ninternet = false\n");
        let mut cs = Records::new();
        e.created(
            &mut cs,
            "aaaa",
            "a",
            labels(&[("dataplane.egress.host", "false")]),
            true,
        );
        e.created(
            &mut cs,
            "bbbb",
            "b",
            labels(&[("dataplane.egress.internet", "true")]),
            true,
        );
        e.connected(&mut cs, "aaaa", "n", vec![ip("172.17.0.2")]);
        e.connected(&mut cs, "bbbb", "n", vec![ip("172.17.0.3")]);
        assert_eq!(e.host_denied(Policies(&cs)), ["aaaa".to_string()].into());
        let spec = planned(&e, &cs);
        assert!(spec.closed_internet);
        assert_eq!(spec.admitted.len(), 2);
        assert_eq!(spec.containers.len(), 1, "b is open by its label");
    }

    #[test]
    fn a_malformed_label_fails_closed_and_a_bad_change_changes_nothing() {
        let mut e = egress("");
        let mut cs = Records::new();
        e.created(
            &mut cs,
            "aaaa",
            "a",
            labels(&[("dataplane.egress.allow", "10.0.0.0/99")]),
            true,
        );
        e.connected(&mut cs, "aaaa", "n", vec![ip("172.17.0.2")]);
        let c = planned(&e, &cs).containers["aaaa"].clone();
        assert!(!c.internet && !c.host && c.allow.is_empty());
        assert!(
            e.views(Policies(&cs), None)[0]
                .error
                .as_deref()
                .unwrap()
                .contains("10.0.0.0/99")
        );
        let bad = dataplane_api::EgressChange {
            container: "a".into(),
            internet: Some(true),
            allow: Some(vec!["nope nope".into()]),
            ..Default::default()
        };
        assert!(
            e.change(&mut cs, "aaaa", &bad)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        assert!(cs["aaaa"].egress.as_ref().unwrap().runtime.is_none());
        // A runtime allow-list replaces the malformed label's.
        let good = dataplane_api::EgressChange {
            container: "a".into(),
            internet: Some(false),
            host: Some(true),
            allow: Some(vec!["10.0.0.0/8,192.0.2.1:53/udp".into()]),
            ..Default::default()
        };
        e.change(&mut cs, "aaaa", &good).unwrap();
        let v = &e.views(Policies(&cs), None)[0];
        assert!(v.error.is_none() && v.runtime_change && v.host && !v.internet);
        assert_eq!(v.allow.len(), 2);
        assert_eq!(e.find(Policies(&cs), "a").unwrap(), "aaaa");
        assert_eq!(e.find(Policies(&cs), "aa").unwrap(), "aaaa");
        assert!(e.find(Policies(&cs), "zz").is_err());
    }
}
