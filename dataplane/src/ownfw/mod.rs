//! The own-firewall mode (`dataplane run --own-firewall`): Docker runs with `"iptables":
//! false` and the agent gives what Docker's rules gave, from a table of its own, written as
//! one transaction whenever what it holds changes ([`rules`]: its typed objects), read back
//! and restored when it drifts:
//!
//! ```text
//! table inet <t>_fw {
//!   sets bridges, internal, no_icc, isolated4/6, routed4/6, unprotected4/6 { type ifname }
//!   set others { type ifname }                 # bridges named br-* that are not Docker's
//!   set same { type ifname . ifname }          # (bridge, bridge): traffic within a network
//!   set pub4 { ipv4_addr . inet_proto . inet_service }   # published container ports
//!   map dnat4_any { inet_proto . inet_service : ipv4_addr . inet_service }  # -p P:C
//!   map dnat4_at  { ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   (and the IPv6 ones)
//!   chain operator { }                          # the operator's: never written by the agent
//!   chain forward { hook forward priority filter
//!     jump operator                             # first: its accept and drop are final
//!     iifname "br-*" iifname != @bridges iifname != @others drop   # fail closed
//!     oifname "br-*" oifname != @bridges oifname != @others drop
//!     iifname . oifname @same: icc off -> drop, else accept
//!     iifname @bridges jump from_bridge         # internal, isolation, isolated gateway
//!     oifname @bridges jump to_bridge }         # replies, published ports, gateway modes
//!   chain prerouting/output { hook nat dstnat: fib daddr type local -> publish }
//!   chain publish { dnat to the maps }
//!   chain postrouting { hook nat srcnat: hairpin, one masquerade rule per network }
//! }
//! ```
//! Traffic between two containers of one network is bridged, not routed: it meets the
//! `forward` chain only through `br_netfilter` (`bridge-nf-call-iptables`), which Docker
//! turns on for the same reason and the agent turns on where a network has
//! inter-container communication off.
//! Rules are per network (masquerade) or fixed; containers and ports are set elements.
//! The tables stay while the agent is stopped: a network Docker creates meanwhile has a
//! `br-*` bridge the sets do not name, and forwards nothing beyond it until an agent has
//! applied its rules.

pub mod daemon_json;
pub mod docker_conf;
pub mod leftovers;
mod rules;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Result, bail};
use nftables::types::NfFamily;

use crate::{
    docker::NetInfo,
    netfilter::{
        nft,
        table::{Applied, Table},
    },
};

/// How a network's gateway publishes (Docker 27+'s gateway modes, per family).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gateway {
    /// Masqueraded out, published ports through NAT, nothing else in.
    #[default]
    Nat,
    /// As `Nat`, and every port of the containers reachable at their addresses.
    NatUnprotected,
    /// No masquerade; published container ports (and ICMP) reachable at their addresses.
    Routed,
    /// Nothing in or out beyond the bridge.
    Isolated,
}

impl Gateway {
    /// From the option's value; an unknown mode is taken as the strictest.
    pub fn of(mode: Option<&str>) -> Self {
        match mode.unwrap_or("nat") {
            "" | "nat" => Self::Nat,
            "nat-unprotected" => Self::NatUnprotected,
            "routed" => Self::Routed,
            _ => Self::Isolated,
        }
    }
}

/// One bridge network, as its rules need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Net {
    pub subnets: BTreeSet<(IpAddr, u8)>,
    pub internal: bool,
    pub icc: bool,
    pub masquerade: bool,
    pub gw4: Gateway,
    pub gw6: Gateway,
}

/// One published binding: host address (`None`: every address of the family of `to`),
/// protocol, port, and the container's address and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Published {
    pub host: Option<IpAddr>,
    pub proto: u8,
    pub port: u16,
    pub to: IpAddr,
    pub to_port: u16,
}

/// Everything the tables hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// Networks by bridge interface.
    pub nets: BTreeMap<String, Net>,
    /// Interfaces named `br-*` that are not Docker's bridges (exempt from failing closed).
    pub others: BTreeSet<String>,
    pub published: BTreeSet<Published>,
    /// Container ports published on networks whose gateway mode is `routed` (address,
    /// protocol, port): reachable at the container's own address, no host port.
    pub routed: BTreeSet<(IpAddr, u8, u16)>,
}

/// The published bindings of every container the agent knows.
pub fn published<'a>(
    frontends: impl IntoIterator<Item = &'a crate::model::desired::Frontend>,
) -> BTreeSet<Published> {
    use dataplane_common::{WILDCARD4, WILDCARD6, is_zero};
    let mut out = BTreeSet::new();
    for f in frontends {
        let k = &f.key;
        let b = &f.backend;
        let (host, v4) = if k.addr == WILDCARD4 {
            (None, true)
        } else if k.addr == WILDCARD6 {
            (None, false)
        } else {
            let h = crate::addr::addr_to_ip(&k.addr);
            (Some(h), h.is_ipv4())
        };
        let to = if v4 { &b.addr4 } else { &b.addr6 };
        if is_zero(to) {
            continue;
        }
        out.insert(Published {
            host,
            proto: k.proto,
            port: u16::from_be(k.port_be),
            to: crate::addr::addr_to_ip(to),
            to_port: u16::from_be(b.port_be),
        });
    }
    out
}

/// The container ports published (`-p`) by containers on networks whose gateway mode is
/// `routed` for the address's family: Docker publishes no host port there, and the port is
/// reached at the container's own address.
pub fn routed_ports<'a, S: std::hash::BuildHasher>(
    inspected: impl IntoIterator<Item = &'a bollard::models::ContainerInspectResponse>,
    networks: &std::collections::HashMap<String, NetInfo, S>,
) -> BTreeSet<(IpAddr, u8, u16)> {
    let mut out = BTreeSet::new();
    for c in inspected {
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let Some(bindings) = c
            .host_config
            .as_ref()
            .and_then(|h| h.port_bindings.as_ref())
        else {
            continue;
        };
        let eps = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        if !running || bindings.is_empty() {
            continue;
        }
        for ep in eps.into_iter().flat_map(|e| e.values()) {
            let Some(net) = ep.network_id.as_ref().and_then(|id| networks.get(id)) else {
                continue;
            };
            let addrs = [
                (ep.ip_address.as_deref(), net.fw.gw4.as_deref()),
                (ep.global_ipv6_address.as_deref(), net.fw.gw6.as_deref()),
            ];
            for (addr, mode) in addrs {
                let (Some(Ok(ip)), Gateway::Routed) = (
                    addr.filter(|a| !a.is_empty()).map(str::parse::<IpAddr>),
                    Gateway::of(mode),
                ) else {
                    continue;
                };
                for key in bindings.keys() {
                    let Some((port, proto)) = key.split_once('/') else {
                        continue;
                    };
                    let proto = match proto {
                        "tcp" => 6,
                        "udp" => 17,
                        "sctp" => 132,
                        _ => continue,
                    };
                    if let Ok(port) = port.parse::<u16>() {
                        out.insert((ip, proto, port));
                    }
                }
            }
        }
    }
    out
}

/// Whether `name` is one Docker gives a network's bridge (`br-` and 12 hex digits).
pub fn docker_bridge_name(name: &str) -> bool {
    name.strip_prefix("br-")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Interfaces named `br-*` on the host that are not named as Docker names bridges.
pub fn other_br_interfaces() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("br-") && !docker_bridge_name(n))
                .collect()
        })
        .unwrap_or_default()
}

impl Spec {
    /// From Docker's networks, the published bindings and the host's other `br-*`
    /// interfaces ([`other_br_interfaces`]).
    pub fn new<'a>(
        networks: impl IntoIterator<Item = &'a NetInfo>,
        published: BTreeSet<Published>,
        others: BTreeSet<String>,
    ) -> Self {
        let nets = networks
            .into_iter()
            .filter_map(|n| {
                let br = n.bridge.clone()?;
                safe_name(&br).then(|| {
                    let f = &n.fw;
                    (
                        br,
                        Net {
                            subnets: f.subnets.iter().copied().collect(),
                            internal: f.internal,
                            icc: f.icc,
                            masquerade: f.masquerade,
                            gw4: Gateway::of(f.gw4.as_deref()),
                            gw6: Gateway::of(f.gw6.as_deref()),
                        },
                    )
                })
            })
            .collect();
        Self {
            nets,
            others,
            published,
            routed: BTreeSet::new(),
        }
    }
}

/// An interface name of the length and characters the kernel and Docker give bridges (any
/// other network is left out of the table).
fn safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b))
}

/// Has bridged traffic meet the `forward` chain (as Docker does where a network turns
/// inter-container communication off). Returns what could not be set.
pub fn bridged_traffic_filtered() -> Result<(), String> {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let p = format!("/proc/sys/net/bridge/{f}");
        if std::fs::read_to_string(&p).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&p, "1").map_err(|e| format!("{p}: {e} (is br_netfilter loaded?)"))?;
    }
    Ok(())
}

/// The agent's table in this mode, written when what it holds changes.
pub struct Firewall {
    table: Table<Spec>,
}

impl Firewall {
    /// `table`: the agent's table name; its table is `inet <table>_fw`.
    pub fn new(table: &str) -> Self {
        Self {
            table: Table::new(&fw_table(table)),
        }
    }

    pub fn table(&self) -> String {
        self.table.name().to_string()
    }

    /// Writes `spec` unless it is what was written last. True when written.
    pub fn apply(&mut self, spec: &Spec) -> Result<bool> {
        if self.table.holds(spec) {
            return Ok(false);
        }
        if spec.nets.values().any(|n| !n.icc)
            && let Err(e) = bridged_traffic_filtered()
        {
            bail!(
                "a network turns inter-container communication off, and bridged traffic cannot be filtered: {e}"
            );
        }
        Ok(self.table.apply(spec, false)? == Applied::Written)
    }

    /// The next apply writes even if nothing changed (repairs changes made by hand).
    pub fn force(&mut self) {
        self.table.forget();
    }

    /// Reads the table back and writes it whole again if it drifted from what was written
    /// (a rule, an element, a chain or the table deleted by hand; the operator's chain may
    /// hold anything). Whether it had drifted.
    pub fn repair(&mut self) -> Result<bool> {
        self.table.repair()
    }

    /// The networks and bindings in force, for `status`.
    pub fn counts(&self) -> (usize, usize) {
        self.table
            .applied()
            .map_or((0, 0), |s| (s.nets.len(), s.published.len()))
    }
}

/// The own-firewall table's name beside the agent's table `table`.
fn fw_table(table: &str) -> String {
    format!("{table}_fw")
}

/// Removes the agent's table (`uninstall`, or an unpinned agent stopping); the operator's
/// chain goes with it.
pub fn remove(table: &str) -> Result<()> {
    Table::<Spec>::new(&fw_table(table)).remove()
}

/// How many rules the operator's chain holds (`None`: the table is not there, or cannot
/// be read).
pub fn operator_rules(table: &str) -> Option<usize> {
    nft::list_chain(NfFamily::INet, &fw_table(table), rules::OPERATOR)
        .ok()
        .map(|l| l.rules.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(masq: bool) -> Net {
        Net {
            subnets: [("172.30.0.0".parse().unwrap(), 16)].into(),
            icc: true,
            masquerade: masq,
            ..Default::default()
        }
    }

    #[test]
    fn docker_bridge_names() {
        assert!(docker_bridge_name("br-0123456789ab"));
        assert!(!docker_bridge_name("br-lan"));
        assert!(!docker_bridge_name("br-0123456789abc"));
        assert!(!docker_bridge_name("docker0"));
    }

    #[test]
    fn gateway_modes() {
        assert_eq!(Gateway::of(None), Gateway::Nat);
        assert_eq!(Gateway::of(Some("routed")), Gateway::Routed);
        assert_eq!(
            Gateway::of(Some("nat-unprotected")),
            Gateway::NatUnprotected
        );
        assert_eq!(Gateway::of(Some("isolated")), Gateway::Isolated);
        assert_eq!(Gateway::of(Some("something-new")), Gateway::Isolated);
    }

    /// The batch as nft reads it.
    fn json(spec: &Spec) -> Vec<serde_json::Value> {
        let v = crate::netfilter::nft::encode(rules::batch("dp_fw", spec)).json;
        v["nftables"].as_array().unwrap().clone()
    }

    /// The rules the batch writes to `chain`, each as its JSON text.
    fn rules_of(cmds: &[serde_json::Value], chain: &str) -> Vec<String> {
        crate::netfilter::ruleset::rules_of(cmds, chain)
    }

    fn elements_of(cmds: &[serde_json::Value], set: &str) -> serde_json::Value {
        cmds.iter()
            .find(|c| c["add"]["element"]["name"] == set)
            .map_or(serde_json::Value::Null, |c| {
                c["add"]["element"]["elem"].clone()
            })
    }

    fn addr(a: &str) -> serde_json::Value {
        serde_json::json!(a)
    }

    #[test]
    fn masquerade_per_network_and_ports_as_elements() {
        let mut spec = Spec::default();
        spec.nets.insert("br-aaaaaaaaaaaa".into(), net(true));
        spec.nets.insert("br-bbbbbbbbbbbb".into(), net(false));
        let mut internal = net(true);
        internal.internal = true;
        internal.icc = false;
        spec.nets.insert("br-cccccccccccc".into(), internal);
        for port in 8000..8100 {
            spec.published.insert(Published {
                host: None,
                proto: 6,
                port,
                to: "172.30.0.2".parse().unwrap(),
                to_port: port,
            });
        }
        let cmds = json(&spec);
        // One masquerade rule for the network that asks for it (not internal), and the
        // hairpin one.
        let post = rules_of(&cmds, "postrouting");
        assert_eq!(post.len(), 2, "{post:?}");
        assert!(post.iter().all(|r| r.contains("masquerade")));
        assert!(
            post[1].contains(r#"{"prefix":{"addr":"172.30.0.0","len":16}}"#)
                && post[1].contains(r#""op":"!=""#)
                && post[1].contains(r#""right":"br-aaaaaaaaaaaa""#),
            "{}",
            post[1]
        );
        // Ports are elements, not rules.
        let any = elements_of(&cmds, "dnat4_any");
        assert_eq!(any.as_array().unwrap().len(), 100);
        assert!(any.as_array().unwrap().contains(&serde_json::json!([
            {"concat": [6, 8042]},
            {"concat": ["172.30.0.2", 8042]}
        ])));
        let publish = rules_of(&cmds, "publish");
        assert_eq!(
            publish
                .iter()
                .filter(|r| r.contains(r#""dnat":{"addr""#) && r.contains(r#""family":"ip"}"#))
                .count(),
            2,
            "{publish:?}"
        );
        assert_eq!(
            elements_of(&cmds, "internal"),
            serde_json::json!(["br-cccccccccccc"])
        );
        assert_eq!(
            elements_of(&cmds, "no_icc"),
            serde_json::json!(["br-cccccccccccc"])
        );
        // The operator's chain is declared, never flushed; the agent's are.
        assert!(cmds.iter().any(|c| c["add"]["chain"]["name"] == "operator"));
        assert!(
            !cmds
                .iter()
                .any(|c| c["flush"]["chain"]["name"] == "operator")
        );
        assert!(
            cmds.iter()
                .any(|c| c["flush"]["chain"]["name"] == "forward")
        );
        assert_eq!(
            rules_of(&cmds, "forward")[0],
            r#"[{"jump":{"target":"operator"}}]"#
        );
        assert!(rules_of(&cmds, "operator").is_empty());
    }

    #[test]
    fn bindings_to_one_host_address_and_the_first_wins() {
        let mut spec = Spec::default();
        let p = |host: Option<&str>, to: &str| Published {
            host: host.map(|h| h.parse().unwrap()),
            proto: 17,
            port: 53,
            to: to.parse().unwrap(),
            to_port: 5353,
        };
        spec.published.insert(p(Some("10.0.0.1"), "172.30.0.2"));
        spec.published.insert(p(Some("10.0.0.1"), "172.30.0.3"));
        spec.published.insert(p(Some("fd00::1"), "172.30.0.4"));
        let cmds = json(&spec);
        assert_eq!(
            elements_of(&cmds, "dnat4_at"),
            serde_json::json!([[
                {"concat": ["10.0.0.1", 17, 53]},
                {"concat": ["172.30.0.2", 5353]}
            ]])
        );
        assert!(elements_of(&cmds, "dnat6_at").is_null());
        assert_eq!(elements_of(&cmds, "pub4").as_array().unwrap().len(), 3);
    }

    #[test]
    fn routed_container_ports_are_reachable_at_their_address_only() {
        let mut spec = Spec::default();
        spec.routed.insert(("172.30.0.2".parse().unwrap(), 6, 80));
        spec.published.insert(Published {
            host: None,
            proto: 6,
            port: 8080,
            to: "172.30.0.2".parse().unwrap(),
            to_port: 80,
        });
        let cmds = json(&spec);
        // One element for both: no duplicate in the set.
        assert_eq!(
            elements_of(&cmds, "pub4"),
            serde_json::json!([{"concat": [addr("172.30.0.2"), 6, 80]}])
        );
        assert_eq!(elements_of(&cmds, "dnat4_any").as_array().unwrap().len(), 1);
    }

    fn cmds_elements(cmds: &[serde_json::Value], set: &str) -> Option<serde_json::Value> {
        let e = elements_of(cmds, set);
        (!e.is_null()).then_some(e)
    }

    #[test]
    fn a_rule_or_element_gone_is_drift_and_the_operators_rules_are_not() {
        use crate::netfilter::{listing::Listing, table::TableSpec};
        let mut spec = Spec::default();
        spec.nets.insert("br-aaaaaaaaaaaa".into(), net(true));
        let want = spec.expected_shape("dp_fw");
        // The table as nft lists it after the batch.
        let listed = |drop_rule: Option<&str>, operator_rules: usize| {
            let mut objects = Vec::new();
            for c in json(&spec) {
                let add = &c["add"];
                for kind in ["table", "chain", "rule"] {
                    if let Some(o) = add.get(kind)
                        && !(kind == "rule" && Some(o["chain"].as_str().unwrap()) == drop_rule)
                    {
                        objects.push(serde_json::json!({ kind: o }));
                    }
                }
                for kind in ["set", "map"] {
                    if let Some(o) = add.get(kind) {
                        let mut o = o.clone();
                        if let Some(e) = cmds_elements(&json(&spec), o["name"].as_str().unwrap()) {
                            o["elem"] = e;
                        }
                        objects.push(serde_json::json!({ kind: o }));
                    }
                }
            }
            // Its maps, declared in nft's text, listed as nft prints them.
            for (name, key, value) in rules::MAPS {
                let mut o = serde_json::json!({
                    "family": "inet", "table": "dp_fw", "name": name,
                    "type": key, "map": value.iter()
                        .map(|t| serde_json::to_value(t).unwrap().as_str().unwrap().to_string())
                        .collect::<Vec<_>>().join(" . ") });
                if let Some(e) = cmds_elements(&json(&spec), name) {
                    o["elem"] = e;
                }
                objects.push(serde_json::json!({ "map": o }));
            }
            for _ in 0..operator_rules {
                objects.push(serde_json::json!({ "rule": {
                    "family": "inet", "table": "dp_fw", "chain": "operator",
                    "expr": [{"drop": null}] } }));
            }
            Listing::from_value(serde_json::json!({ "nftables": objects })).unwrap()
        };
        assert_eq!(want.found(&listed(None, 0)), want);
        assert_eq!(want.found(&listed(None, 3)), want);
        assert_ne!(want.found(&listed(Some("postrouting"), 0)), want);
    }

    #[test]
    fn unsafe_bridge_names_are_left_out() {
        assert!(safe_name("br-0123456789ab") && safe_name("docker0"));
        assert!(!safe_name("x\" ; flush ruleset"));
        assert!(!safe_name(""));
    }
}
