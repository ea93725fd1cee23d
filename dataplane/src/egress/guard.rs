//! The port guard: a policed container's frames judged by the bridge port they come in
//! on (the host side of its veth, which it cannot change), before anything else sees
//! them. One `bridge <table>_egress` table, written in the same transaction as the `inet`
//! one:
//!
//! ```text
//! table bridge dataplane_egress {
//!   map ports { type ifname : verdict }       # host-side veth -> jump p_<id>
//!   set known { type ifname }                 # every veth the agent has seen
//!   chain prerouting { hook prerouting priority -300; iifname vmap @ports
//!     (gated) iifname "veth*" iifname != @known counter name gate drop }
//!   counter s_<id>                            # spoofed frames
//!   counter l_<id>                            # link-local and non-IP frames (host=false)
//!   chain p_<id> {
//!     ether saddr != <its MACs> drop          # and ARP's sender, IPv4's and IPv6's source:
//!     arp saddr ether/ip, ip saddr, ip6 saddr # only what Docker gave it
//!     ip6 from fe80::/10 or :: : neighbour/router discovery and MLD only (host=false)
//!     anything but IPv4, IPv6 and ARP: dropped (host=false)
//!   }
//! }
//! ```
//! So the addresses the `inet` table dispatches by are the container's own: whatever it
//! writes as its source, a packet that passes its port carries an address Docker gave it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadBase, PayloadRaw, Prefix},
    schema::{Chain, Counter, Element, FlushObject, Map, NfCmd, NfListObject},
    stmt::{self, Match, Operator, Statement, VerdictMap},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::nft::objects::{anon_set, counter_in, jump, rule_in, s, vmap_in};
use crate::netfilter::ruleset::nf::field;

/// Before the bridge's own filter chains (-200) and anything an operator hooks there.
pub const PRIORITY: i32 = -300;

/// What one policed container may send as, and what its policy denies at layer 2.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sender {
    pub macs: BTreeSet<[u8; 6]>,
    pub addrs: BTreeSet<IpAddr>,
    /// Its own IPv6 link-local addresses (from its namespace, and derived from its MACs).
    pub link_local: BTreeSet<std::net::Ipv6Addr>,
    /// Its policy lets it reach the host (link-local and non-IP frames stay allowed).
    pub host: bool,
}

/// The whole bridge table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// Host-side veth name -> the key of the policed container behind it.
    pub ports: BTreeMap<String, String>,
    pub senders: BTreeMap<String, Sender>,
    /// A policed container exists (or the host default closes): a veth the agent has not
    /// seen yet (a container Docker is starting or connecting) sends nothing until it has.
    pub gated: bool,
    /// The veths it has seen: every container's (policed or not), and those that are not
    /// containers' (on other bridges, Docker's own namespaces).
    pub known: BTreeSet<String>,
}

pub(super) fn port_chain(k: &str) -> String {
    format!("p_{k}")
}
pub fn spoof_counter(k: &str) -> String {
    format!("s_{k}")
}
pub fn l2_counter(k: &str) -> String {
    format!("l_{k}")
}

fn table(t: &str) -> nftables::schema::Table<'static> {
    nftables::schema::Table {
        family: NfFamily::Bridge,
        name: t.to_string().into(),
        handle: None,
    }
}

fn chain(t: &str, name: &str, hook: bool) -> Chain<'static> {
    Chain {
        family: NfFamily::Bridge,
        table: t.to_string().into(),
        name: name.to_string().into(),
        _type: hook.then_some(NfChainType::Filter),
        hook: hook.then_some(NfHook::Prerouting),
        prio: hook.then_some(PRIORITY),
        policy: hook.then_some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn known_set(t: &str) -> nftables::schema::Set<'static> {
    nftables::schema::Set {
        family: NfFamily::Bridge,
        ..crate::netfilter::ruleset::set_of(t, "known", &[nftables::schema::SetType::Ifname])
    }
}

/// The prerouting chain's rules: the dispatch, then (gated) the veths not seen yet.
fn prerouting_rules(gated: bool) -> Vec<Vec<Statement<'static>>> {
    let iifname = || {
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::Iifname,
        }))
    };
    let mut rules = vec![vec![Statement::VerdictMap(VerdictMap {
        key: iifname(),
        data: s("@ports"),
    })]];
    if gated {
        // Docker names the host side of a container's veth `veth<7 hex>`.
        rules.push(vec![
            is(iifname(), s("veth*")),
            Statement::Match(Match {
                left: iifname(),
                right: s("@known"),
                op: Operator::NEQ,
            }),
            Statement::Counter(stmt::Counter::Named("gate".into())),
            Statement::Drop(None),
        ]);
    }
    rules
}

/// A batch that lets every veth through the bridge table `t` (the gate open): what the
/// agent leaves when it stops, so containers started meanwhile are not held.
pub fn open_gate(t: &str) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(t)));
    b.add(NfListObject::Map(Box::new(ports_map(t))));
    b.add(NfListObject::Chain(chain(t, "prerouting", true)));
    b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(
        t,
        "prerouting",
        false,
    ))));
    for r in prerouting_rules(false) {
        b.add(rule(t, "prerouting", r));
    }
    b
}

fn ports_map(t: &str) -> Map<'static> {
    vmap_in(
        NfFamily::Bridge,
        t,
        "ports",
        nftables::schema::SetType::Ifname,
    )
}

fn counter(t: &str, name: &str) -> Counter<'static> {
    counter_in(NfFamily::Bridge, t, name)
}

fn rule(t: &str, chain: &str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    rule_in(NfFamily::Bridge, t, chain, expr)
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn not_in(left: Expression<'static>, items: Vec<Expression<'static>>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right: anon_set(items),
        op: Operator::NEQ,
    })
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn link_local() -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s("fe80::")),
        len: 10,
    }))
}

fn count_drop(name: String) -> [Statement<'static>; 2] {
    [
        Statement::Counter(stmt::Counter::Named(name.into())),
        Statement::Drop(None),
    ]
}

/// The link-local address the kernel derives from `mac` (EUI-64), which a container has
/// unless it was given another.
pub fn eui64_link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// The rules of container `k`'s port chain.
pub fn sender_rules(k: &str, c: &Sender) -> Vec<Vec<Statement<'static>>> {
    let spoof = || count_drop(spoof_counter(k)).to_vec();
    let l2 = || count_drop(l2_counter(k)).to_vec();
    let with = |mut m: Vec<Statement<'static>>, end: Vec<Statement<'static>>| {
        m.extend(end);
        m
    };
    let macs: Vec<_> = c.macs.iter().map(|m| s(mac(*m))).collect();
    let v4: Vec<_> = c.addrs.iter().filter(|a| a.is_ipv4()).map(s).collect();
    // Its IPv6 addresses: Docker's, and its own link-local ones.
    let own6: BTreeSet<std::net::Ipv6Addr> = c
        .addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
        .chain(c.link_local.iter().copied())
        .collect();
    let mut rules = vec![with(
        vec![not_in(field("ether", "saddr"), macs.clone())],
        spoof(),
    )];
    // Tagged frames, whatever they carry: the checks below see only untagged ones (the
    // host strips a VLAN 0 tag and routes what it holds).
    rules.push(with(
        vec![is(
            field("ether", "type"),
            anon_set(vec![s("8021q"), s("8021ad"), Expression::Number(0x9100)]),
        )],
        spoof(),
    ));
    // ARP: its own MAC and address as the sender (0.0.0.0: a probe for a duplicate).
    let mut arp_ips = v4.clone();
    arp_ips.push(s("0.0.0.0"));
    rules.push(with(
        vec![not_in(field("arp", "saddr ether"), macs)],
        spoof(),
    ));
    rules.push(with(
        vec![not_in(field("arp", "saddr ip"), arp_ips)],
        spoof(),
    ));
    // IPv4: only its own source (none at all without an IPv4 address).
    if v4.is_empty() {
        rules.push(with(vec![is(field("ether", "type"), s("ip"))], spoof()));
    } else {
        rules.push(with(vec![not_in(field("ip", "saddr"), v4)], spoof()));
    }
    // A neighbour advertisement only for its own addresses (the target, 8 bytes into the
    // ICMPv6 header): none naming a neighbour's or the gateway's.
    let target = Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
        base: PayloadBase::TH,
        offset: 64,
        len: 128,
    })));
    let mut advert = vec![is(field("icmpv6", "type"), s("nd-neighbor-advert"))];
    if !own6.is_empty() {
        let hex = own6
            .iter()
            .map(|a| s(format!("0x{:032x}", u128::from(*a))))
            .collect();
        advert.push(not_in(target, hex));
    }
    rules.push(with(advert, spoof()));
    // IPv6: its own link-local and the unspecified source for neighbour and router
    // discovery and multicast listener reports (how a container finds its gateway at all).
    let discovery = || {
        anon_set(
            [
                "nd-router-solicit",
                "nd-neighbor-solicit",
                "nd-neighbor-advert",
                "mld-listener-report",
                "mld-listener-done",
                "mld2-listener-report",
            ]
            .into_iter()
            .map(s)
            .collect(),
        )
    };
    let mut discovery_from: Vec<_> = c.link_local.iter().map(s).collect();
    discovery_from.push(s("::"));
    rules.push(vec![
        is(field("ip6", "saddr"), anon_set(discovery_from)),
        is(field("icmpv6", "type"), discovery()),
        Statement::Accept(None),
    ]);
    if !c.host {
        // Anything else from a link-local address reaches only the host and its neighbours
        // on the bridge: what the policy denies.
        rules.push(with(vec![is(field("ip6", "saddr"), link_local())], l2()));
    }
    if own6.is_empty() {
        rules.push(with(vec![is(field("ether", "type"), s("ip6"))], spoof()));
    } else {
        rules.push(with(
            vec![not_in(field("ip6", "saddr"), own6.iter().map(s).collect())],
            spoof(),
        ));
    }
    if !c.host {
        rules.push(with(
            vec![not_in(
                field("ether", "type"),
                vec![s("ip"), s("ip6"), s("arp")],
            )],
            l2(),
        ));
    }
    rules
}

/// Adds to `b` what makes the bridge table `t` exactly `new`, `old` being what it holds
/// (`None`: unknown, written whole; `present`: the port chains it was read back with).
pub fn write(
    b: &mut Batch<'static>,
    t: &str,
    old: Option<&Guard>,
    new: &Guard,
    present: &BTreeSet<String>,
) {
    if old == Some(new) {
        return;
    }
    let full = old.is_none();
    if full {
        b.add(NfListObject::Table(table(t)));
        b.add(NfListObject::Map(Box::new(ports_map(t))));
        b.add(NfListObject::Set(Box::new(known_set(t))));
        b.add(NfListObject::Counter(counter(t, "gate")));
        b.add(NfListObject::Chain(chain(t, "prerouting", true)));
    }
    // Seen veths are added before the gate rule can hold them, and go after it has gone.
    let added: Vec<Expression<'static>> = if let Some(o) = old {
        new.known.difference(&o.known).map(s).collect()
    } else {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(known_set(t)))));
        new.known.iter().map(s).collect()
    };
    if !added.is_empty() {
        b.add(NfListObject::Element(Element {
            family: NfFamily::Bridge,
            table: t.to_string().into(),
            name: "known".into(),
            elem: added.into(),
        }));
    }
    if full || old.is_some_and(|o| o.gated != new.gated) {
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(
            t,
            "prerouting",
            false,
        ))));
        for r in prerouting_rules(new.gated) {
            b.add(rule(t, "prerouting", r));
        }
    }
    if let Some(o) = old {
        let gone: Vec<Expression<'static>> = o.known.difference(&new.known).map(s).collect();
        if !gone.is_empty() {
            b.delete(NfListObject::Element(Element {
                family: NfFamily::Bridge,
                table: t.to_string().into(),
                name: "known".into(),
                elem: gone.into(),
            }));
        }
    }
    if old.is_some_and(|o| (&o.ports, &o.senders) == (&new.ports, &new.senders)) {
        return;
    }
    // The map first (nothing leads to a chain about to change or go), then the chains.
    b.add_cmd(NfCmd::Flush(FlushObject::Map(Box::new(ports_map(t)))));
    let had: BTreeSet<String> = match old {
        Some(o) => o.senders.keys().map(|k| port_chain(k)).collect(),
        None => present.clone(),
    };
    for (k, c) in &new.senders {
        let name = port_chain(k);
        let exists = had.contains(&name);
        if exists && old.and_then(|o| o.senders.get(k)) == Some(c) {
            continue;
        }
        b.add(NfListObject::Counter(counter(t, &spoof_counter(k))));
        b.add(NfListObject::Counter(counter(t, &l2_counter(k))));
        if exists {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, &name, false))));
        } else {
            b.add(NfListObject::Chain(chain(t, &name, false)));
        }
        for r in sender_rules(k, c) {
            b.add(rule(t, &name, r));
        }
    }
    for name in &had {
        let Some(k) = name.strip_prefix("p_") else {
            continue;
        };
        if new.senders.contains_key(k) {
            continue;
        }
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, name, false))));
        b.delete(NfListObject::Chain(chain(t, name, false)));
        b.delete(NfListObject::Counter(counter(t, &spoof_counter(k))));
        b.delete(NfListObject::Counter(counter(t, &l2_counter(k))));
    }
    let elems: Vec<Expression<'static>> = new
        .ports
        .iter()
        .filter(|(_, k)| new.senders.contains_key(*k))
        .map(|(port, k)| Expression::List(vec![s(port), jump(port_chain(k))]))
        .collect();
    if !elems.is_empty() {
        b.add(NfListObject::Element(Element {
            family: NfFamily::Bridge,
            table: t.to_string().into(),
            name: "ports".into(),
            elem: elems.into(),
        }));
    }
}

/// The port chains the bridge table `t` has and its counters (`s_*`, `l_*`, `gate`) by
/// name; `None` when it cannot be read (it does not exist).
pub fn read_back(t: &str) -> Option<(BTreeSet<String>, BTreeMap<String, u64>)> {
    let found = crate::netfilter::nft::list_table(NfFamily::Bridge, t).ok()?;
    let chains = found
        .chains()
        .filter(|c| c.name.starts_with("p_"))
        .map(|c| c.name.to_string())
        .collect();
    let counters = found
        .counters
        .iter()
        .map(|c| (c.name.clone(), c.packets))
        .collect();
    Some((chains, counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: Batch<'static>) -> String {
        crate::netfilter::nft::encode(b).json.to_string()
    }

    fn sender(host: bool) -> Sender {
        Sender {
            macs: [[2, 0x42, 0xac, 0x11, 0, 2]].into(),
            addrs: ["172.17.0.2".parse().unwrap(), "fd00::2".parse().unwrap()].into(),
            link_local: [eui64_link_local([2, 0x42, 0xac, 0x11, 0, 2])].into(),
            host,
        }
    }

    #[test]
    fn only_its_own_addresses_pass_its_port() {
        let r = format!("{:?}", sender_rules("k", &sender(true)));
        for want in [
            "02:42:ac:11:00:02",
            "172.17.0.2",
            "fd00::2",
            "saddr ether",
            "s_k",
        ] {
            assert!(r.contains(want), "{want} in {r}");
        }
        // A container that may reach the host keeps link-local and non-IP frames.
        assert!(!r.contains("l_k"));
        let r = format!("{:?}", sender_rules("k", &sender(false)));
        assert!(r.contains("l_k"));
    }

    #[test]
    fn no_ipv4_address_no_ipv4_at_all() {
        let mut c = sender(true);
        c.addrs.retain(IpAddr::is_ipv6);
        let rules = sender_rules("k", &c);
        let r = format!("{:?}", rules[4]);
        assert!(r.contains("\"type\"") && r.contains("\"ip\""), "{r}");
    }

    #[test]
    fn tagged_frames_and_foreign_advertisements_are_spoofed() {
        let r = sender_rules("k", &sender(true));
        let tagged = format!("{:?}", r[1]);
        assert!(tagged.contains("8021q") && tagged.contains("8021ad") && tagged.contains("s_k"));
        // A neighbour advertisement's target: its own addresses only, link-local included.
        let advert = r
            .iter()
            .map(|x| format!("{x:?}"))
            .find(|x| x.contains("nd-neighbor-advert") && x.contains("s_k"))
            .unwrap();
        assert!(advert.contains(&format!(
            "0x{:032x}",
            u128::from("fd00::2".parse::<std::net::Ipv6Addr>().unwrap())
        )));
        assert!(
            advert.contains("0xfe80000000000000004200fffeac1100") || advert.contains("fe80"),
            "{advert}"
        );
        assert_eq!(
            eui64_link_local([2, 0x42, 0xac, 0x11, 0, 2]),
            "fe80::42:acff:fe11:2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
    }

    #[test]
    fn a_change_rewrites_only_what_changed_and_removes_what_went() {
        let mut g = Guard::default();
        g.ports.insert("veth1".into(), "a".into());
        g.senders.insert("a".into(), sender(true));
        let mut b = Batch::new();
        write(&mut b, "t", None, &g, &BTreeSet::new());
        let full = json(b);
        assert!(full.contains("\"prerouting\"") && full.contains("veth1") && full.contains("p_a"));
        assert!(full.contains("verdict"));
        let mut g2 = g.clone();
        g2.senders.remove("a");
        g2.ports.clear();
        g2.ports.insert("veth2".into(), "b".into());
        g2.senders.insert("b".into(), sender(false));
        let mut b = Batch::new();
        write(&mut b, "t", Some(&g), &g2, &BTreeSet::new());
        let d = json(b);
        assert!(d.contains("\"delete\"") && d.contains("p_a") && d.contains("p_b"));
        assert!(!d.contains("veth1"));
        let mut b = Batch::new();
        write(&mut b, "t", Some(&g2), &g2, &BTreeSet::new());
        assert_eq!(json(b), json(Batch::new()));
    }
}
