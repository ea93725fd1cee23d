//! Keeps translated connections out of `nf_conntrack`: one nftables table of our own,
//! `inet dataplane`, with `notrack` rules at raw priority, replaced as one atomic batch
//! whenever its content changes.
//!
//! Why rules are needed at all: the socket layer translates at `connect()`, so the packets
//! are ordinary host-to-container (or container-to-container) traffic; on a host where
//! Docker's iptables rules keep conntrack active, each would get a conntrack entry.
//!
//! What is untracked, and why nothing else is:
//! - Packets between a container client the socket layer translates (a "peer": a Docker
//!   container on the backend's network) and a published backend `addr.proto.port`, both
//!   ways. Only peers' addresses are in the rule, so routed or external clients of the same
//!   backend (whose connections Docker's DNAT carries) stay tracked.
//! - Packets from the host to a backend `addr.proto.port` (`output`), and their replies,
//!   only when a local socket is connected to exactly that backend (`socket` lookup):
//!   replies of connections Docker's NAT carries (a client bound to `127.0.0.1`, one made
//!   before the agent ran) go to a masqueraded address no such socket has, so they stay
//!   tracked and their NAT is undone.
//! - Nothing to or from the host when it has a stateful `INPUT` policy
//!   (`track_host_clients`): there untracked replies would be dropped, so host clients'
//!   connections stay tracked (one conntrack entry each, as on the direct path).
//!
//! `notrack` never lets a packet through that a rule drops: Docker's and the operator's
//! filter rules see every packet as before.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::Result;
use dataplane_common::{Backend, FrontendKey, is_zero};

use super::table::{Applied, Table};

use crate::{
    addr::{Service, addr_to_ip},
    netlink::HostAddr,
};

/// The default table name (`inet dataplane`).
pub const TABLE: &str = "dataplane";

/// What the rules are built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The backends in the maps.
    pub backends: BTreeSet<Service>,
    /// This host's own addresses (interfaces and bridge gateways, not loopback): where
    /// replies to host clients go.
    pub hosts: BTreeSet<IpAddr>,
    /// Addresses of the container clients the socket layer translates.
    pub peers: BTreeSet<IpAddr>,
    /// Published (protocol number, port) pairs: what a peer dials on a host address to
    /// take Docker's NAT path.
    pub published: BTreeSet<(u8, u16)>,
    /// Host clients' connections stay tracked (a stateful `INPUT` policy was found).
    pub track_host_clients: bool,
    /// Replies of connections that Docker's NAT carries from a peer to a backend (made
    /// before the peer or the backend was known to the agent): they stay tracked, so their
    /// NAT is undone, until they end.
    pub nat_replies: BTreeSet<NatReply>,
}

/// A reply tuple: (backend address, protocol, backend port, client address, client port).
pub type NatReply = (IpAddr, u8, u16, IpAddr, u16);

/// The connections Docker's NAT carries now between a peer and a backend of `spec`, from
/// `conntrack -L --dst-nat` output (both families).
pub fn nat_replies(conntrack: &str, spec: &Spec) -> BTreeSet<NatReply> {
    let mut out = BTreeSet::new();
    for line in conntrack.lines() {
        // A connection that ended (TIME_WAIT, CLOSE) needs nothing any more; keeping its
        // reply tuple would hand a new translated connection that reuses the client port
        // to the old entry's NAT.
        if line.contains(" TIME_WAIT ") || line.contains(" CLOSE ") {
            continue;
        }
        let mut proto = None;
        let mut vals: Vec<(&str, &str)> = Vec::new();
        for (i, w) in line.split_whitespace().enumerate() {
            if i == 1 {
                proto = w.parse::<u8>().ok();
            }
            if let Some((k, v)) = w.split_once('=') {
                vals.push((k, v));
            }
        }
        let get = |key: &str, nth: usize| {
            vals.iter()
                .filter(|(k, _)| *k == key)
                .nth(nth)
                .map(|(_, v)| *v)
        };
        // The second src/dst/sport/dport group is the reply direction.
        let parsed = (|| {
            Some((
                proto?,
                get("src", 1)?.parse::<IpAddr>().ok()?,
                get("sport", 1)?.parse::<u16>().ok()?,
                get("dst", 1)?.parse::<IpAddr>().ok()?,
                get("dport", 1)?.parse::<u16>().ok()?,
            ))
        })();
        let Some((proto, backend, bport, client, cport)) = parsed else {
            continue;
        };
        if spec.backends.contains(&Service::new(backend, proto, bport))
            && spec.peers.contains(&client)
        {
            out.insert((backend, proto, bport, client, cport));
        }
    }
    out
}

/// `conntrack -L --dst-nat` for both families (empty when conntrack is not there).
pub fn dump_dnat() -> String {
    let mut text = String::new();
    for fam in ["ipv4", "ipv6"] {
        if let Ok(o) = Command::new("conntrack")
            .args(["-L", "-f", fam, "--dst-nat"])
            .stderr(Stdio::null())
            .output()
        {
            text.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    text
}

impl Spec {
    pub fn new<'a>(
        frontends: impl IntoIterator<Item = (&'a FrontendKey, &'a Backend)>,
        addrs: &[HostAddr],
        peers: impl IntoIterator<Item = IpAddr>,
        track_host_clients: bool,
    ) -> Self {
        let mut spec = Self {
            track_host_clients,
            peers: peers.into_iter().collect(),
            ..Self::default()
        };
        for (k, b) in frontends {
            spec.published.insert((k.proto, k.port()));
            for a in [b.addr4, b.addr6] {
                if !is_zero(&a) {
                    spec.backends
                        .insert(Service::new(addr_to_ip(&a), k.proto, b.port()));
                }
            }
        }
        for a in addrs {
            if !a.ip.is_loopback() && !a.ip.is_unspecified() {
                spec.hosts.insert(a.ip);
            }
        }
        spec
    }
}

/// The table as it is applied, so an unchanged spec costs nothing.
pub struct Notrack(Table<Spec>);

impl Notrack {
    pub fn new(table: &str) -> Self {
        Self(Table::new(table))
    }

    /// What was applied last.
    pub fn applied(&self) -> Option<&Spec> {
        self.0.applied()
    }

    /// Applies `spec` when it differs from what was applied last (or `force`). Whether it
    /// was written.
    pub fn apply(&mut self, spec: &Spec, force: bool) -> Result<bool> {
        Ok(self.0.apply(spec, force)? == Applied::Written)
    }

    /// Reads the table back and re-applies what was applied last if it drifted (a rule,
    /// an element or the table deleted by hand). Whether it had drifted.
    pub fn repair(&mut self) -> Result<bool> {
        self.0.repair()
    }

    /// Removes the table (when the agent stops and its programs detach).
    pub fn remove(&mut self) -> Result<()> {
        self.0.remove()
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{PROTO_TCP, PROTO_UDP, v4_mapped};
    use serde_json::Value;

    use super::*;
    use crate::netfilter::{
        listing::Listing,
        nft::encode,
        ruleset::{FILLED, NAT_CLIENT_TIMEOUT_S, batch},
        table::{TableId, TableSpec},
    };

    fn ha(ip: &str, ifname: &str) -> HostAddr {
        HostAddr {
            ip: ip.parse().unwrap(),
            prefix_len: 24,
            ifname: ifname.into(),
        }
    }

    fn spec(track_host_clients: bool) -> Spec {
        let b = Backend {
            addr4: v4_mapped([172, 17, 0, 2]),
            addr6: "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            port_be: 80u16.to_be(),
            flags: 0,
            id: 0,
            net: 1,
            pad: 0,
        };
        let k1 = FrontendKey::new(dataplane_common::WILDCARD4, 8080, PROTO_TCP);
        let k2 = FrontendKey::new(dataplane_common::WILDCARD6, 8080, PROTO_TCP);
        let k3 = FrontendKey::new(dataplane_common::WILDCARD4, 5353, PROTO_UDP);
        Spec::new(
            [(&k1, &b), (&k2, &b), (&k3, &b)],
            &[
                ha("192.0.2.2", "eth0"),
                ha("172.17.0.1", "docker0"),
                ha("127.0.0.1", "lo"),
            ],
            ["172.17.0.3".parse().unwrap()],
            track_host_clients,
        )
    }

    /// The batch as nft reads it.
    fn json(spec: &Spec) -> Vec<Value> {
        let v = encode(batch(TABLE, spec, true)).json;
        v["nftables"].as_array().unwrap().clone()
    }

    use crate::netfilter::ruleset::rules_of;

    fn elements_of(cmds: &[Value], set: &str) -> Option<String> {
        cmds.iter()
            .filter_map(|c| c["add"]["element"].as_object())
            .find(|e| e["name"] == set)
            .map(|e| e["elem"].to_string())
    }

    #[test]
    fn spec_from_frontends_addresses_and_peers() {
        let spec = spec(false);
        let backends: Vec<String> = spec.backends.iter().map(ToString::to_string).collect();
        assert_eq!(
            backends,
            vec![
                "172.17.0.2:80/tcp",
                "172.17.0.2:80/udp",
                "[fd00::2]:80/tcp",
                "[fd00::2]:80/udp"
            ]
        );
        let hosts: Vec<String> = spec.hosts.iter().map(ToString::to_string).collect();
        // Interface addresses, never loopback; no bridge network is a "client" by name.
        assert_eq!(hosts, vec!["172.17.0.1", "192.0.2.2"]);
        assert_eq!(
            spec.published,
            [(PROTO_TCP, 8080), (PROTO_UDP, 5353)].into()
        );
    }

    #[test]
    fn one_transaction_declares_flushes_and_fills() {
        let cmds = json(&spec(false));
        // The table and every set and chain declared first (a no-op where they exist)...
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        let natclients = cmds
            .iter()
            .find(|c| c["add"]["set"]["name"] == "natclients4")
            .unwrap();
        let flags = natclients["add"]["set"]["flags"].to_string();
        assert!(flags.contains("timeout"), "{flags}");
        // Declared with a new table only (the kernel marks them dynamic).
        let again = encode(batch(TABLE, &spec(false), false)).json;
        let declared = |v: &Value| {
            v["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["add"]["set"]["name"] == "natclients4")
        };
        assert!(!declared(&again));
        assert_eq!(natclients["add"]["set"]["timeout"], NAT_CLIENT_TIMEOUT_S);
        // ...then chains and the agent's sets flushed, never what the packet path learnt.
        let flushed: Vec<String> = cmds
            .iter()
            .filter_map(|c| c["flush"]["set"]["name"].as_str().map(String::from))
            .collect();
        assert_eq!(flushed.len(), FILLED.len());
        assert!(!flushed.iter().any(|n| n.starts_with("natclients")));
        assert!(
            cmds.iter()
                .any(|c| c["flush"]["chain"]["name"] == "prerouting")
        );
        let b4 = elements_of(&cmds, "backends4").unwrap();
        assert!(b4.contains("172.17.0.2") && b4.contains("80"), "{b4}");
        assert!(elements_of(&cmds, "peers4").unwrap().contains("172.17.0.3"));
        // An empty set gets no element command.
        assert!(elements_of(&cmds, "peers6").is_none());
        let chain = cmds
            .iter()
            .find(|c| c["add"]["chain"]["name"] == "output")
            .unwrap();
        assert_eq!(chain["add"]["chain"]["hook"], "output");
        assert_eq!(chain["add"]["chain"]["prio"], -300);
    }

    #[test]
    fn which_packets_are_untracked() {
        let cmds = json(&spec(false));
        let pre = rules_of(&cmds, "prerouting");
        // A packet whose ports are neither a backend's nor a published one (most of what
        // the host receives) leaves after the first rule: every rule after needs one.
        assert!(
            pre[0].matches("@ports").count() == 2 && pre[0].contains("\"accept\""),
            "{}",
            pre[0]
        );
        let ports = elements_of(&cmds, "ports").unwrap();
        assert_eq!(ports, "[80,5353,8080]");
        assert!(
            pre[1].contains("ipv4") && pre[1].contains("pre4"),
            "{}",
            pre[1]
        );
        assert!(
            pre[2].contains("ipv6") && pre[2].contains("pre6"),
            "{}",
            pre[2]
        );
        assert!(!pre.iter().any(|r| r.contains("notrack")));
        let pre4 = rules_of(&cmds, "pre4");
        // A peer's connection through Docker's NAT is recorded before anything else.
        assert!(
            pre4[0].contains("\"update\"") && pre4[0].contains("@natclients4"),
            "{}",
            pre4[0]
        );
        assert!(pre4[0].contains("@published") && pre4[0].contains("@peers4"));
        assert!(pre4[1].contains("@backends4") && pre4[1].contains("from_backend4"));
        assert!(pre4[2].contains("@peers4") && pre4[2].contains("notrack"));
        // From a backend: to a host address only the host-socket rules; replies that
        // Docker's NAT carries stay tracked, before the peers' notrack rule.
        let fb = rules_of(&cmds, "from_backend4");
        assert!(
            fb[0].contains("@hosts4") && fb[0].contains("to_host4"),
            "{}",
            fb[0]
        );
        let natclients = fb.iter().position(|r| r.contains("@natclients4")).unwrap();
        let natreplies = fb.iter().position(|r| r.contains("@natreplies4")).unwrap();
        let notrack = fb.iter().position(|r| r.contains("notrack")).unwrap();
        assert!(natclients < notrack && natreplies < notrack);
        assert!(fb[notrack].contains("@peers4"), "{}", fb[notrack]);
        let to_host = rules_of(&cmds, "to_host4");
        assert_eq!(to_host.len(), 2);
        assert!(to_host[0].contains("wildcard") && to_host[0].contains("notrack"));
        // Every notrack rule names a peer or a host socket connected to the backend (or
        // is the host's own packet to a backend): never any other client.
        for chain in ["pre4", "pre6", "from_backend4", "from_backend6"] {
            for r in rules_of(&cmds, chain)
                .iter()
                .filter(|r| r.contains("notrack"))
            {
                assert!(r.contains("@peers"), "{chain}: {r}");
            }
        }
        let out = rules_of(&cmds, "output");
        assert_eq!(out.len(), 2);
        assert!(out[0].contains("@backends4") && out[0].contains("notrack"));
        assert!(out[0].contains("@ports"));
        let shape = spec(false).expected_shape(TABLE);
        let t = TableId::new(nftables::types::NfFamily::INet, TABLE);
        for chain in ["prerouting", "pre4", "from_backend6", "to_host6", "output"] {
            assert_eq!(
                shape.chains[&(t.clone(), chain.to_string())],
                Some(rules_of(&cmds, chain).len()),
                "{chain}"
            );
        }
    }

    #[test]
    fn a_stateful_input_policy_keeps_host_clients_tracked() {
        let cmds = json(&spec(true));
        let all: Vec<String> = [
            "prerouting",
            "pre4",
            "pre6",
            "from_backend4",
            "from_backend6",
        ]
        .into_iter()
        .flat_map(|c| rules_of(&cmds, c))
        .collect();
        assert!(!all.iter().any(|r| r.contains("\"socket\"")));
        assert!(rules_of(&cmds, "to_host4").is_empty());
        // Declared all the same, so that turning tracking off again flushes it.
        assert!(
            cmds.iter()
                .any(|c| c["flush"]["chain"]["name"] == "to_host4")
        );
        assert!(rules_of(&cmds, "output").is_empty());
        // A backend's packet to the host ends the table's evaluation: tracked.
        let fb = rules_of(&cmds, "from_backend4");
        assert!(fb[0].contains("@hosts4") && fb[0].contains("\"accept\""));
        // Container clients stay untracked: their packets are forwarded, not INPUT.
        assert!(
            all.iter()
                .any(|r| r.contains("@peers4") && r.contains("notrack"))
        );
    }

    #[test]
    fn replies_of_nat_carried_connections_stay_tracked() {
        let spec = spec(false);
        let dump = "tcp      6 431999 ESTABLISHED src=172.17.0.3 dst=172.17.0.1 sport=40000 dport=8080 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
                    tcp      6 431999 ESTABLISHED src=10.0.0.9 dst=192.0.2.2 sport=41000 dport=8080 \
                    src=172.17.0.2 dst=10.0.0.9 sport=80 dport=41000 [ASSURED] mark=0 use=1\n\
                    udp      17 29 src=172.17.0.3 dst=172.17.0.1 sport=5000 dport=5353 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=5000 mark=0 use=1\n\
                    tcp      6 119 TIME_WAIT src=172.17.0.3 dst=172.17.0.1 sport=40002 dport=8080 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=40002 [ASSURED] mark=0 use=1\n\
                    conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n";
        let n = nat_replies(dump, &spec);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        // Only peers' connections (the routed client's reply is tracked anyway).
        assert_eq!(
            n,
            [
                (a("172.17.0.2"), 6, 80, a("172.17.0.3"), 40000),
                (a("172.17.0.2"), 17, 80, a("172.17.0.3"), 5000),
            ]
            .into()
        );
        let mut spec = spec;
        spec.nat_replies = n;
        let e = elements_of(&json(&spec), "natreplies4").unwrap();
        assert!(e.contains("40000") && e.contains("5000"), "{e}");
    }

    #[test]
    fn drift_shows_in_the_shape_read_back() {
        let spec = spec(false);
        let want = spec.expected_shape(TABLE);
        // The table as nft lists it, from what was applied: same shape.
        let mut listed = vec![serde_json::json!({ "table": { "family": "inet", "name": TABLE } })];
        for c in json(&spec) {
            if let Some(ch) = c["add"].get("chain") {
                listed.push(serde_json::json!({ "chain": ch }));
            }
        }
        for c in json(&spec) {
            if let Some(r) = c["add"].get("rule") {
                listed.push(serde_json::json!({ "rule": r }));
            }
            if let Some(e) = c["add"].get("element") {
                listed.push(serde_json::json!({ "set": {
                    "family": "inet", "table": TABLE, "name": e["name"],
                    "type": "ipv4_addr", "elem": e["elem"] } }));
            }
        }
        for name in FILLED {
            if !listed.iter().any(|l| l["set"]["name"] == name) {
                listed.push(serde_json::json!({ "set": {
                    "family": "inet", "table": TABLE, "name": name, "type": "ipv4_addr" } }));
            }
        }
        let read = |v: &Vec<Value>| {
            want.found(&Listing::from_value(serde_json::json!({ "nftables": v })).unwrap())
        };
        assert_eq!(read(&listed), want);
        // A rule deleted by hand.
        let i = listed.iter().position(|l| l.get("rule").is_some()).unwrap();
        let mut one_less = listed.clone();
        one_less.remove(i);
        assert_ne!(read(&one_less), want);
        // The table gone.
        assert_ne!(read(&Vec::new()), want);
    }
}
