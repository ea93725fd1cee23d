//! The egress table, `inet <table>_egress`: what [`Spec`] says, as nftables objects (the
//! `nftables` crate; the chains' rules in [`rules`]), applied as one transaction per change
//! through the agent's table contract ([`TableSpec`]: whole, or only what changed).
//!
//! ```text
//! table inet dataplane_egress {
//!   set bridges { type ifname }              # Docker's bridges: "internet" is any other
//!   set admitted4 / admitted6                 # containers the agent has seen (closed default)
//!   (a policed container's frames pass its bridge port only with its own addresses: the
//!   `bridge` table of the same name, [`super::guard`]; so the dispatch by address is
//!   a dispatch by port)
//!   map fwd4 { ipv4_addr : verdict }          # container address -> jump f_<id>
//!   map in4  { ipv4_addr : verdict }          # host=false only -> jump i_<id>
//!   chain forward { hook forward priority -10   # before Docker's filter rules
//!     ct state established,related,untracked accept   # replies; the agent's translated flows
//!     ip saddr vmap @fwd4; ip6 saddr vmap @fwd6
//!     (closed default) iifname <Docker bridge> ip saddr != @admitted4 drop }
//!   chain input { hook input priority -10 ... @in4 ... }
//!   counter d_<id>                             # the container's drops
//!   chain f_<id> { DNS to its resolvers accept; allow-list accept;
//!                  oifname != @bridges drop (internet off) | oifname @bridges drop (host off) }
//!   chain i_<id> { DNS, allow-list accept; drop }
//! }
//! ```
//! A drop in any base chain is final and an accept is not, so the table can only take away
//! from what Docker and the operator allow, never add to it. Only the first packet of a
//! connection the container initiates reaches its chains (conntrack state `new`); replies to
//! its own clients never do.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use nftables::{
    batch::Batch,
    expr::Expression,
    schema::{Chain, Counter, Element, FlushObject, Map, NfCmd, NfListObject, Set, SetType},
    stmt::Statement,
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

pub(super) mod objects;
pub(super) mod rules;
mod spec;

pub use spec::{Allowed, Chains, Spec, counter_name, key_of};

use crate::netfilter::{
    listing::Listing,
    nft::list_table,
    ruleset::{set_of, table},
    table::{ObjectId, Shape, Start, TableId, TableSpec},
};
use objects::{counter_in, jump, rule_in, s, vmap_in};
use rules::{base_rules, container_rules};

/// Before Docker's filter chains (priority 0) and after its DNAT (-100): the destination
/// is the one the packet will really go to.
pub const PRIORITY: i32 = -10;

fn fwd_chain(k: &str) -> String {
    format!("f_{k}")
}
fn in_chain(k: &str) -> String {
    format!("i_{k}")
}

fn set(t: &str, name: &str, ty: SetType) -> Set<'static> {
    set_of(t, name, &[ty])
}

/// A verdict map (written with type `mark`, spelt `verdict` by
/// [`crate::netfilter::nft::encode`]: the crate has no verdict type).
fn vmap(t: &str, name: &str, ty: SetType) -> Map<'static> {
    vmap_in(NfFamily::INet, t, name, ty)
}

fn chain(t: &str, name: &str, hook: Option<NfHook>) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        _type: hook.map(|_| NfChainType::Filter),
        hook,
        prio: hook.map(|_| PRIORITY),
        policy: hook.map(|_| NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn counter(t: &str, name: &str) -> Counter<'static> {
    counter_in(NfFamily::INet, t, name)
}

fn rule(t: &str, chain: &str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    rule_in(NfFamily::INet, t, chain, expr)
}

fn elements(t: &str, name: &str, elem: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        elem: elem.into(),
    })
}

/// Whether two versions of a container's chains have the same rules.
fn same_rules(a: &Chains, b: &Chains) -> bool {
    (a.internet, a.host, &a.dns, &a.allow) == (b.internet, b.host, &b.dns, &b.allow)
}

/// The map elements sending `c`'s addresses to its chains.
fn dispatch_elements(
    t: &str,
    k: &str,
    addrs: &BTreeSet<IpAddr>,
    host: bool,
    with_value: bool,
) -> Vec<NfListObject<'static>> {
    let mut out = Vec::new();
    for (n, v4) in [("4", true), ("6", false)] {
        let keys: Vec<&IpAddr> = addrs.iter().filter(|a| a.is_ipv4() == v4).collect();
        if keys.is_empty() {
            continue;
        }
        let mut maps = vec![(format!("fwd{n}"), fwd_chain(k))];
        if !host {
            maps.push((format!("in{n}"), in_chain(k)));
        }
        for (map, target) in maps {
            let elem = keys
                .iter()
                .map(|a| {
                    if with_value {
                        Expression::List(vec![s(a), jump(target.clone())])
                    } else {
                        s(a)
                    }
                })
                .collect();
            out.push(elements(t, &map, elem));
        }
    }
    out
}

fn declare(b: &mut Batch<'static>, t: &str) {
    b.add(NfListObject::Table(table(t)));
    b.add(NfListObject::Set(Box::new(set(
        t,
        "bridges",
        SetType::Ifname,
    ))));
    b.add(NfListObject::Set(Box::new(set(
        t,
        "admitted4",
        SetType::Ipv4Addr,
    ))));
    b.add(NfListObject::Set(Box::new(set(
        t,
        "admitted6",
        SetType::Ipv6Addr,
    ))));
    for (name, ty) in [
        ("fwd4", SetType::Ipv4Addr),
        ("fwd6", SetType::Ipv6Addr),
        ("in4", SetType::Ipv4Addr),
        ("in6", SetType::Ipv6Addr),
    ] {
        b.add(NfListObject::Map(Box::new(vmap(t, name, ty))));
    }
    for (name, hook) in [("forward", NfHook::Forward), ("input", NfHook::Input)] {
        b.add(NfListObject::Chain(chain(t, name, Some(hook))));
    }
}

fn fill_set(b: &mut Batch<'static>, t: &str, name: &str, items: Vec<Expression<'static>>) {
    if !items.is_empty() {
        b.add(elements(t, name, items));
    }
}

/// Writes container `k`'s chains: declared where `old` (what the table has of it) lacks
/// them (re-declaring an existing chain costs the kernel an RCU grace period), flushed
/// where it has them, then filled.
fn write_container(b: &mut Batch<'static>, t: &str, k: &str, c: &Chains, old: Option<&Chains>) {
    if old.is_none() {
        b.add(NfListObject::Counter(counter(t, &counter_name(k))));
    }
    let (fwd, inp) = container_rules(k, c);
    let mut chains = vec![(fwd_chain(k), fwd, old.is_some())];
    if let Some(inp) = inp {
        chains.push((in_chain(k), inp, old.is_some_and(|o| !o.host)));
    }
    for (name, rules, exists) in chains {
        if exists {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, &name, None))));
        } else {
            b.add(NfListObject::Chain(chain(t, &name, None)));
        }
        for r in rules {
            b.add(rule(t, &name, r));
        }
    }
}

fn admitted_elements(addrs: &BTreeSet<IpAddr>, v4: bool) -> Vec<Expression<'static>> {
    addrs
        .iter()
        .filter(|a| a.is_ipv4() == v4)
        .map(|a| s(a))
        .collect()
}

/// The batch that makes table `t` exactly `spec` in place (the table is never deleted, so
/// the drop counters survive): declared, base chains and maps flushed and refilled, every
/// container's chains rewritten, and the chains of containers no longer there (`present`:
/// the chain names read back) removed.
pub fn full_batch(t: &str, spec: &Spec, present: &BTreeSet<String>) -> Batch<'static> {
    let mut b = Batch::new();
    declare(&mut b, t);
    for name in ["forward", "input"] {
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, name, None))));
    }
    for (name, ty) in [
        ("fwd4", SetType::Ipv4Addr),
        ("fwd6", SetType::Ipv6Addr),
        ("in4", SetType::Ipv4Addr),
        ("in6", SetType::Ipv6Addr),
    ] {
        b.add_cmd(NfCmd::Flush(FlushObject::Map(Box::new(vmap(t, name, ty)))));
    }
    for (name, ty) in [
        ("bridges", SetType::Ifname),
        ("admitted4", SetType::Ipv4Addr),
        ("admitted6", SetType::Ipv6Addr),
    ] {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set(t, name, ty)))));
    }
    fill_set(&mut b, t, "bridges", spec.bridges.iter().map(s).collect());
    fill_set(
        &mut b,
        t,
        "admitted4",
        admitted_elements(&spec.admitted, true),
    );
    fill_set(
        &mut b,
        t,
        "admitted6",
        admitted_elements(&spec.admitted, false),
    );
    for (k, c) in &spec.containers {
        // Whether its chains exist is known from what was read back.
        let old = present.contains(&fwd_chain(k)).then_some(Chains {
            host: !present.contains(&in_chain(k)),
            ..Chains::default()
        });
        if old.is_some() {
            b.add(NfListObject::Counter(counter(t, &counter_name(k))));
        }
        write_container(&mut b, t, k, c, old.as_ref());
    }
    // Chains of containers that are gone: their map elements were flushed above.
    let wanted: BTreeSet<String> = spec
        .containers
        .iter()
        .flat_map(|(k, c)| {
            let mut v = vec![fwd_chain(k)];
            if !c.host {
                v.push(in_chain(k));
            }
            v
        })
        .collect();
    let mut gone_counters = BTreeSet::new();
    for name in present {
        let Some(k) = name.strip_prefix("f_").or_else(|| name.strip_prefix("i_")) else {
            continue;
        };
        if !wanted.contains(name) {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, name, None))));
            b.delete(NfListObject::Chain(chain(t, name, None)));
            if !spec.containers.contains_key(k) {
                gone_counters.insert(k.to_string());
            }
        }
    }
    let (fwd, inp) = base_rules(spec);
    for r in fwd {
        b.add(rule(t, "forward", r));
    }
    for r in inp {
        b.add(rule(t, "input", r));
    }
    for (k, c) in &spec.containers {
        for e in dispatch_elements(t, k, &c.addrs, c.host, true) {
            b.add(e);
        }
    }
    for k in gone_counters {
        // Declared first: a chain left without its counter (made by hand) is no error.
        b.add(NfListObject::Counter(counter(t, &counter_name(&k))));
        b.delete(NfListObject::Counter(counter(t, &counter_name(&k))));
    }
    super::guard::write(&mut b, t, None, &spec.guard, present);
    b
}

/// The batch that changes table `t` from `old` to `new` (both as applied), touching only
/// what differs; `None` when nothing does.
pub fn delta_batch(t: &str, old: &Spec, new: &Spec) -> Option<Batch<'static>> {
    if old == new {
        return None;
    }
    // The table, its sets, maps and base chains exist (a full batch wrote them).
    let mut b = Batch::new();
    if (old.closed_internet, old.closed_host) != (new.closed_internet, new.closed_host) {
        // Rare (a config change): the base chains are rewritten.
        for name in ["forward", "input"] {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, name, None))));
        }
        let (fwd, inp) = base_rules(new);
        for r in fwd {
            b.add(rule(t, "forward", r));
        }
        for r in inp {
            b.add(rule(t, "input", r));
        }
    }
    if old.bridges != new.bridges {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set(
            t,
            "bridges",
            SetType::Ifname,
        )))));
        fill_set(&mut b, t, "bridges", new.bridges.iter().map(s).collect());
    }
    // Admitted addresses: new ones first (admitted before anything else changes).
    let added: BTreeSet<IpAddr> = new.admitted.difference(&old.admitted).copied().collect();
    let removed: BTreeSet<IpAddr> = old.admitted.difference(&new.admitted).copied().collect();
    for v4 in [true, false] {
        let name = if v4 { "admitted4" } else { "admitted6" };
        fill_set(&mut b, t, name, admitted_elements(&added, v4));
    }
    // Containers that are gone or changed: their elements out first, then chains.
    let mut deleted = Vec::new();
    for (k, o) in &old.containers {
        let n = new.containers.get(k);
        if n == Some(o) {
            continue;
        }
        // Elements whose value changes (an address that moved, the input chain that went)
        // are deleted and added again.
        let keep: BTreeSet<IpAddr> = match n {
            Some(n) if n.host == o.host => o.addrs.intersection(&n.addrs).copied().collect(),
            _ => BTreeSet::new(),
        };
        let gone: BTreeSet<IpAddr> = o.addrs.difference(&keep).copied().collect();
        for e in dispatch_elements(t, k, &gone, o.host, false) {
            b.delete(e);
        }
        if n.is_none() {
            deleted.push(k.clone());
        }
    }
    for (k, n) in &new.containers {
        let o = old.containers.get(k);
        if o == Some(n) {
            continue;
        }
        // Only its addresses changed (it started or stopped): its chains stay as they are,
        // only the map elements change (a rewrite would wait for an RCU grace period).
        if o.is_none_or(|o| !same_rules(o, n)) {
            write_container(&mut b, t, k, n, o);
        }
        if let Some(o) = o
            && !o.host
            && n.host
        {
            let name = in_chain(k);
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, &name, None))));
            b.delete(NfListObject::Chain(chain(t, &name, None)));
        }
        let have: BTreeSet<IpAddr> = match o {
            Some(o) if o.host == n.host => o.addrs.intersection(&n.addrs).copied().collect(),
            _ => BTreeSet::new(),
        };
        let fresh: BTreeSet<IpAddr> = n.addrs.difference(&have).copied().collect();
        for e in dispatch_elements(t, k, &fresh, n.host, true) {
            b.add(e);
        }
    }
    for k in deleted {
        let o = &old.containers[&k];
        let mut names = vec![fwd_chain(&k)];
        if !o.host {
            names.push(in_chain(&k));
        }
        for name in names {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(t, &name, None))));
            b.delete(NfListObject::Chain(chain(t, &name, None)));
        }
        b.delete(NfListObject::Counter(counter(t, &counter_name(&k))));
    }
    for v4 in [true, false] {
        let name = if v4 { "admitted4" } else { "admitted6" };
        let items = admitted_elements(&removed, v4);
        if !items.is_empty() {
            b.delete(elements(t, name, items));
        }
    }
    super::guard::write(&mut b, t, Some(&old.guard), &new.guard, &BTreeSet::new());
    Some(b)
}

impl TableSpec for Spec {
    const ROLE: &'static str = "egress";
    // Its drop counters outlive every write.
    const DISPOSABLE: bool = false;

    /// The `inet` table and the `bridge` one of the same name ([`super::guard`]).
    fn tables(name: &str) -> Vec<TableId> {
        vec![
            TableId::new(NfFamily::INet, name),
            TableId::new(NfFamily::Bridge, name),
        ]
    }

    /// What differs from the spec in place; else the whole table in place, the chains of
    /// containers no longer there (read back) removed.
    fn batch(&self, name: &str, start: Start<'_, Self>) -> Batch<'static> {
        match start {
            Start::Applied(old) => delta_batch(name, old, self).unwrap_or_default(),
            Start::Found(found) => full_batch(name, self, &container_chains(found)),
        }
    }

    /// The tables and their chains: a container's chains gone or left over show.
    fn expected_shape(&self, name: &str) -> Shape {
        let inet = TableId::new(NfFamily::INet, name);
        let bridge = TableId::new(NfFamily::Bridge, name);
        let mut chains: BTreeMap<ObjectId, Option<usize>> = BTreeMap::new();
        let mut add = |t: &TableId, chain: String| {
            chains.insert((t.clone(), chain), None);
        };
        add(&inet, "forward".into());
        add(&inet, "input".into());
        add(&bridge, "prerouting".into());
        for (k, c) in &self.containers {
            add(&inet, fwd_chain(k));
            if !c.host {
                add(&inet, in_chain(k));
            }
        }
        for k in self.guard.senders.keys() {
            add(&bridge, super::guard::port_chain(k));
        }
        Shape {
            tables: [inet, bridge].into(),
            chains,
            sets: BTreeMap::new(),
            owned_prefixes: ["f_", "i_", "p_"].map(String::from).into(),
        }
    }
}

/// The chains written per container (`f_*`, `i_*` in the `inet` table, `p_*` in the
/// `bridge` one) that `found` has.
fn container_chains(found: &Listing) -> BTreeSet<String> {
    found
        .chains()
        .filter(|c| match c.family {
            NfFamily::INet => c.name.starts_with("f_") || c.name.starts_with("i_"),
            NfFamily::Bridge => c.name.starts_with("p_"),
            _ => false,
        })
        .map(|c| c.name.to_string())
        .collect()
}

/// The container chains (`f_*`, `i_*`) table `t` has, and its drop counters by key; `None`
/// when the table cannot be read.
pub fn read_back(t: &str) -> Option<(BTreeSet<String>, BTreeMap<String, u64>)> {
    list_table(NfFamily::INet, t)
        .ok()
        .map(|l| chains_and_counters(&l))
}

fn chains_and_counters(found: &Listing) -> (BTreeSet<String>, BTreeMap<String, u64>) {
    let chains = container_chains(found);
    let counters = found
        .counters
        .iter()
        .filter_map(|c| Some((c.name.strip_prefix("d_")?.to_string(), c.packets)))
        .collect();
    (chains, counters)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::egress::policy::Net;
    use crate::{egress::policy::PROTO_TCP, netfilter::ruleset::rules_of};

    fn net(s: &str) -> Net {
        s.parse().unwrap()
    }

    fn chains(addr: &str, internet: bool, host: bool) -> Chains {
        Chains {
            addrs: [addr.parse().unwrap()].into(),
            internet,
            host,
            dns: ["192.0.2.53".parse().unwrap()].into(),
            allow: vec![
                Allowed {
                    nets: [net("198.51.100.0/24"), net("2001:db8::/32")].into(),
                    port: Some(443),
                    proto: Some(PROTO_TCP),
                },
                Allowed {
                    nets: [net("10.0.0.7")].into(),
                    port: None,
                    proto: None,
                },
            ],
        }
    }

    fn spec() -> Spec {
        Spec {
            bridges: ["docker0".to_string(), "br-0123456789ab".to_string()].into(),
            closed_internet: false,
            closed_host: false,
            admitted: BTreeSet::new(),
            containers: [
                ("aaaa".to_string(), chains("172.17.0.2", false, true)),
                ("bbbb".to_string(), chains("172.17.0.3", true, false)),
            ]
            .into(),
            guard: super::super::guard::Guard::default(),
        }
    }

    fn json(b: Batch<'static>) -> Vec<Value> {
        let v = crate::netfilter::nft::encode(b).json;
        v["nftables"].as_array().unwrap().clone()
    }

    #[test]
    fn base_chains_come_before_dockers_and_let_replies_through() {
        let cmds = json(full_batch("t", &spec(), &BTreeSet::new()));
        let fwd = cmds
            .iter()
            .find(|c| c["add"]["chain"]["name"] == "forward")
            .unwrap();
        assert_eq!(fwd["add"]["chain"]["hook"], "forward");
        assert_eq!(fwd["add"]["chain"]["prio"], PRIORITY);
        let map = cmds
            .iter()
            .find(|c| c["add"]["map"]["name"] == "fwd4")
            .unwrap();
        assert_eq!(map["add"]["map"]["map"], "verdict");
        let rules = rules_of(&cmds, "forward");
        assert!(rules[0].contains("established") && !rules[0].contains("untracked"));
        // The dispatch, and only then untracked packets: a policed container's are judged
        // whatever their state.
        assert!(rules[1].contains("@fwd4") && rules[2].contains("@fwd6"));
        assert!(rules[3].contains("untracked"));
        assert_eq!(rules.len(), 4, "no closed default");
        let input = rules_of(&cmds, "input");
        assert_eq!(input.len(), 5);
        assert!(input[1].contains("nd-neighbor-solicit"), "{}", input[1]);
    }

    #[test]
    fn each_combination_gets_its_chains() {
        let cmds = json(full_batch("t", &spec(), &BTreeSet::new()));
        // Internet off, host on: only leaving through a non-Docker interface is dropped.
        let a = rules_of(&cmds, "f_aaaa");
        assert!(
            a[0].contains("192.0.2.53") && a[0].contains("53"),
            "{}",
            a[0]
        );
        assert!(
            a[1].contains("198.51.100.0") && a[1].contains("443"),
            "{}",
            a[1]
        );
        assert!(a.last().unwrap().contains("!=") && a.last().unwrap().contains("@bridges"));
        assert!(a.last().unwrap().contains("d_aaaa"));
        assert!(rules_of(&cmds, "i_aaaa").is_empty());
        // Host off: other containers (through a bridge) and the host itself.
        let b = rules_of(&cmds, "f_bbbb");
        let last = b.last().unwrap();
        assert!(last.contains("@bridges") && !last.contains("!="), "{last}");
        let i = rules_of(&cmds, "i_bbbb");
        assert!(i.last().unwrap().contains("drop"));
        assert!(i.iter().any(|r| r.contains("10.0.0.7")));
        // IPv6 entries in ip6 rules.
        assert!(
            a.iter()
                .any(|r| r.contains("ip6") && r.contains("2001:db8::"))
        );
        // Addresses dispatched: both to forward, host-off also to input.
        let elems: Vec<String> = cmds
            .iter()
            .filter_map(|c| c["add"]["element"].as_object())
            .map(|e| format!("{} {}", e["name"], e["elem"]))
            .collect();
        assert!(
            elems
                .iter()
                .any(|e| e.contains("fwd4") && e.contains("f_aaaa"))
        );
        assert!(
            elems
                .iter()
                .any(|e| e.contains("in4") && e.contains("i_bbbb"))
        );
        assert!(
            !elems
                .iter()
                .any(|e| e.contains("in4") && e.contains("aaaa"))
        );
    }

    #[test]
    fn a_closed_default_drops_what_the_agent_has_not_admitted() {
        let mut sp = spec();
        sp.closed_internet = true;
        sp.admitted = ["172.17.0.2".parse().unwrap()].into();
        let cmds = json(full_batch("t", &sp, &BTreeSet::new()));
        let f = rules_of(&cmds, "forward");
        assert!(
            f.iter()
                .any(|r| r.contains("br-*") && r.contains("@admitted4"))
        );
        assert!(
            f.iter()
                .all(|r| !r.contains("admitted") || r.contains("@bridges"))
        );
        assert_eq!(rules_of(&cmds, "input").len(), 5);
        sp.closed_host = true;
        let cmds = json(full_batch("t", &sp, &BTreeSet::new()));
        assert!(
            rules_of(&cmds, "input")
                .iter()
                .any(|r| r.contains("@admitted6"))
        );
    }

    #[test]
    fn a_rebuild_removes_chains_of_containers_that_are_gone() {
        let present: BTreeSet<String> = ["f_aaaa", "f_cccc", "i_cccc", "i_aaaa"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let cmds = json(full_batch("t", &spec(), &present));
        let deleted: Vec<String> = cmds
            .iter()
            .filter_map(|c| c["delete"]["chain"]["name"].as_str().map(String::from))
            .collect();
        assert_eq!(deleted, vec!["f_cccc", "i_aaaa", "i_cccc"]);
        let counters: Vec<&Value> = cmds
            .iter()
            .filter_map(|c| c["delete"].get("counter"))
            .collect();
        assert_eq!(counters.len(), 1);
        assert_eq!(counters[0]["name"], "d_cccc");
        // Never the table itself.
        assert!(!cmds.iter().any(|c| c["delete"].get("table").is_some()));
    }

    #[test]
    fn a_change_touches_only_what_differs() {
        let old = spec();
        assert!(delta_batch("t", &old, &old).is_none());
        // One container more: its chain and elements, nothing else rewritten.
        let mut new = old.clone();
        new.containers
            .insert("cccc".into(), chains("172.17.0.4", false, false));
        let cmds = json(delta_batch("t", &old, &new).unwrap());
        assert!(rules_of(&cmds, "f_aaaa").is_empty());
        assert!(!rules_of(&cmds, "f_cccc").is_empty());
        assert!(!rules_of(&cmds, "i_cccc").is_empty());
        assert!(rules_of(&cmds, "forward").is_empty());
        // One gone: elements deleted before its chains and counter.
        let cmds = json(delta_batch("t", &new, &old).unwrap());
        let pos = |f: &dyn Fn(&Value) -> bool| cmds.iter().position(f).unwrap();
        let elem = pos(&|c| c["delete"]["element"]["name"] == "fwd4");
        let ch = pos(&|c| c["delete"]["chain"]["name"] == "f_cccc");
        let ctr = pos(&|c| c["delete"]["counter"]["name"] == "d_cccc");
        assert!(elem < ch && ch < ctr);
        // Host turned on: the input chain goes, its element first.
        let mut on = old.clone();
        on.containers.get_mut("bbbb").unwrap().host = true;
        let cmds = json(delta_batch("t", &old, &on).unwrap());
        let e = pos_of(&cmds, |c| c["delete"]["element"]["name"] == "in4");
        let c = pos_of(&cmds, |c| c["delete"]["chain"]["name"] == "i_bbbb");
        assert!(e < c);
        assert!(cmds.iter().any(|c| c["add"]["element"]["name"] == "fwd4"
            && c["add"]["element"]["elem"].to_string().contains("f_bbbb")));
    }

    fn pos_of(cmds: &[Value], f: impl Fn(&Value) -> bool) -> usize {
        cmds.iter().position(f).unwrap()
    }

    #[test]
    fn a_containers_chain_gone_or_left_over_is_drift() {
        let sp = spec();
        let want = sp.expected_shape("t");
        // The tables as nft lists them after a full write: their tables and chains.
        let listed = |skip: &str, extra: &str| {
            let mut objects = Vec::new();
            for c in json(full_batch("t", &sp, &BTreeSet::new())) {
                for kind in ["table", "chain"] {
                    if let Some(o) = c["add"].get(kind)
                        && o["name"] != skip
                    {
                        objects.push(serde_json::json!({ kind: o }));
                    }
                }
            }
            if !extra.is_empty() {
                objects.push(serde_json::json!({ "chain": {
                    "family": "inet", "table": "t", "name": extra } }));
            }
            Listing::from_value(serde_json::json!({ "nftables": objects })).unwrap()
        };
        assert_eq!(want.found(&listed("", "")), want);
        assert_ne!(want.found(&listed("i_bbbb", "")), want);
        assert_ne!(want.found(&listed("", "f_cccc")), want);
        // A chain of someone else's is not the agent's.
        assert_eq!(want.found(&listed("", "operator")), want);
    }

    #[test]
    fn chains_and_counters_are_read_back() {
        let text = r#"{"nftables": [
          {"table": {"family": "inet", "name": "t", "handle": 1}},
          {"chain": {"family": "inet", "table": "t", "name": "forward", "handle": 2}},
          {"chain": {"family": "inet", "table": "t", "name": "f_aaaa", "handle": 3}},
          {"chain": {"family": "inet", "table": "t", "name": "i_aaaa", "handle": 4}},
          {"map": {"family": "inet", "table": "t", "name": "fwd4", "type": "ipv4_addr", "map": "verdict"}},
          {"counter": {"family": "inet", "table": "t", "name": "d_aaaa", "handle": 5, "packets": 7, "bytes": 420}}
        ]}"#;
        let r = Listing::parse(text.as_bytes()).unwrap();
        let (chains, counters) = chains_and_counters(&r);
        assert_eq!(chains.len(), 2);
        assert_eq!(counters["aaaa"], 7);
    }
}
