//! The own-firewall table as typed nftables objects (the `nftables` crate), built from a
//! [`Spec`]: its sets and maps with their elements, its chains and their rules, and the
//! batch that writes it whole; and what a read-back must find ([`TableSpec`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use nftables::{
    batch::Batch,
    expr::{CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Prefix},
    schema::{Chain, Element, FlushObject, Map, NfCmd, NfListObject, Rule, SetType},
    stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::{Gateway, Spec};
use crate::netfilter::{
    ruleset::{self, nf::field, set_of, table},
    table::{Shape, Start, TableId, TableSpec},
};

use SetType::{InetProto, InetService, Ipv4Addr, Ipv6Addr};

/// The sets, with their types.
pub(super) const SETS: &[(&str, &[SetType])] = &[
    ("bridges", &[SetType::Ifname]),
    ("others", &[SetType::Ifname]),
    ("internal", &[SetType::Ifname]),
    ("no_icc", &[SetType::Ifname]),
    ("isolated4", &[SetType::Ifname]),
    ("isolated6", &[SetType::Ifname]),
    ("routed4", &[SetType::Ifname]),
    ("routed6", &[SetType::Ifname]),
    ("unprotected4", &[SetType::Ifname]),
    ("unprotected6", &[SetType::Ifname]),
    ("same", &[SetType::Ifname, SetType::Ifname]),
    ("pub4", &[Ipv4Addr, InetProto, InetService]),
    ("pub6", &[Ipv6Addr, InetProto, InetService]),
];

/// The maps, with their key and value types.
pub(super) const MAPS: &[(&str, &[SetType], &[SetType])] = &[
    (
        "dnat4_any",
        &[InetProto, InetService],
        &[Ipv4Addr, InetService],
    ),
    (
        "dnat4_at",
        &[Ipv4Addr, InetProto, InetService],
        &[Ipv4Addr, InetService],
    ),
    (
        "dnat6_any",
        &[InetProto, InetService],
        &[Ipv6Addr, InetService],
    ),
    (
        "dnat6_at",
        &[Ipv6Addr, InetProto, InetService],
        &[Ipv6Addr, InetService],
    ),
];

/// The operator's chain: declared where missing, never written by the agent.
pub(super) const OPERATOR: &str = "operator";

/// A base chain's type, hook and priority.
type Hook = (NfChainType, NfHook, i32);

/// The chains the agent writes (all but [`OPERATOR`]), with their type, hook and priority
/// (`filter` 0, `dstnat` -100, `srcnat` 100).
const CHAINS: &[(&str, Option<Hook>)] = &[
    ("forward", Some((NfChainType::Filter, NfHook::Forward, 0))),
    ("from_bridge", None),
    ("to_bridge", None),
    (
        "prerouting",
        Some((NfChainType::NAT, NfHook::Prerouting, -100)),
    ),
    ("output", Some((NfChainType::NAT, NfHook::Output, -100))),
    ("publish", None),
    (
        "postrouting",
        Some((NfChainType::NAT, NfHook::Postrouting, 100)),
    ),
];

fn map_of(t: &str, name: &str, key: &[SetType], value: &[SetType]) -> Map<'static> {
    ruleset::map_of(NfFamily::INet, t, name, key, value)
}

fn chain_of(t: &str, name: &str, hook: Option<Hook>) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        _type: hook.map(|h| h.0),
        hook: hook.map(|h| h.1),
        prio: hook.map(|h| h.2),
        policy: hook.map(|_| NfChainPolicy::Accept),
        ..Chain::default()
    }
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "called with references and values alike"
)]
fn s(v: impl ToString) -> Expression<'static> {
    Expression::String(v.to_string().into())
}

fn n(v: impl Into<u32>) -> Expression<'static> {
    Expression::Number(v.into())
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// The elements of every set and map that has any, by name.
pub(super) fn contents(spec: &Spec) -> BTreeMap<&'static str, Vec<Expression<'static>>> {
    let mut m: BTreeMap<&'static str, Vec<Expression<'static>>> = BTreeMap::new();
    for (br, net) in &spec.nets {
        m.entry("bridges").or_default().push(s(br));
        m.entry("same")
            .or_default()
            .push(concat(vec![s(br), s(br)]));
        let mut add = |set: &'static str, on: bool| {
            if on {
                m.entry(set).or_default().push(s(br));
            }
        };
        add("internal", net.internal);
        add("no_icc", !net.icc);
        add("isolated4", net.gw4 == Gateway::Isolated);
        add("isolated6", net.gw6 == Gateway::Isolated);
        add("routed4", net.gw4 == Gateway::Routed);
        add("routed6", net.gw6 == Gateway::Routed);
        add("unprotected4", net.gw4 == Gateway::NatUnprotected);
        add("unprotected6", net.gw6 == Gateway::NatUnprotected);
    }
    if !spec.others.is_empty() {
        m.insert("others", spec.others.iter().map(s).collect());
    }
    let pub_set = |ip: &IpAddr| if ip.is_ipv4() { "pub4" } else { "pub6" };
    // A container port reachable at its address: one element, whether routed or published.
    let mut reachable: BTreeSet<(IpAddr, u8, u16)> = BTreeSet::new();
    let mut add_reachable = |m: &mut BTreeMap<_, Vec<_>>, key: (IpAddr, u8, u16)| {
        if reachable.insert(key) {
            let (ip, proto, port) = key;
            m.entry(pub_set(&ip))
                .or_default()
                .push(concat(vec![s(ip), n(proto), n(port)]));
        }
    };
    for r in &spec.routed {
        add_reachable(&mut m, *r);
    }
    // One translation per key: the first binding wins (Docker allows no second).
    let mut translated: BTreeSet<(&str, Option<IpAddr>, u8, u16)> = BTreeSet::new();
    for p in &spec.published {
        add_reachable(&mut m, (p.to, p.proto, p.to_port));
        let v4 = p.to.is_ipv4();
        let (map, key) = match p.host {
            None => (
                if v4 { "dnat4_any" } else { "dnat6_any" },
                concat(vec![n(p.proto), n(p.port)]),
            ),
            Some(h) if h.is_ipv4() == v4 => (
                if v4 { "dnat4_at" } else { "dnat6_at" },
                concat(vec![s(h), n(p.proto), n(p.port)]),
            ),
            Some(_) => continue,
        };
        if translated.insert((map, p.host, p.proto, p.port)) {
            let to = concat(vec![s(p.to), n(p.to_port)]);
            m.entry(map)
                .or_default()
                .push(Expression::List(vec![key, to]));
        }
    }
    m
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `left` is `right` (a value, or `@set`: in the set).
fn is(left: Expression<'static>, right: &str) -> Statement<'static> {
    matches(left, Operator::EQ, s(right))
}

fn is_not(left: Expression<'static>, right: &str) -> Statement<'static> {
    matches(left, Operator::NEQ, s(right))
}

fn iif() -> Expression<'static> {
    meta(MetaKey::Iifname)
}

fn oif() -> Expression<'static> {
    meta(MetaKey::Oifname)
}

fn nfproto(family: &str) -> Statement<'static> {
    is(meta(MetaKey::Nfproto), family)
}

fn ct(key: &'static str, op: Operator, right: Expression<'static>) -> Statement<'static> {
    let left = Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }));
    matches(left, op, right)
}

fn ct_dnat() -> Statement<'static> {
    ct("status", Operator::IN, s("dnat"))
}

fn local() -> Statement<'static> {
    let fib = Expression::Named(NamedExpression::Fib(Fib {
        result: FibResult::Type,
        flags: [FibFlag::Daddr].into_iter().collect(),
    }));
    is(fib, "local")
}

fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: chain.to_string().into(),
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn prefix(addr: IpAddr, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len: u32::from(len),
    }))
}

/// `<ip> daddr . meta l4proto . th dport`.
fn service(ip: &'static str) -> Expression<'static> {
    concat(vec![
        field(ip, "daddr"),
        meta(MetaKey::L4proto),
        field("th", "dport"),
    ])
}

/// `dnat <ip> to <key> map @<map>`.
fn dnat(ip: &'static str, key: Expression<'static>, map: &str) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(Expression::Named(NamedExpression::Map(Box::new(
            nftables::expr::Map {
                key,
                data: s(format!("@{map}")),
            },
        )))),
        family: Some(if ip == "ip" {
            NATFamily::IP
        } else {
            NATFamily::IP6
        }),
        port: None,
        flags: None,
    }))
}

/// Masquerade: the hairpin (a published port reached from its own network), then one rule
/// per network subnet whose gateway mode translates.
fn postrouting(spec: &Spec) -> Vec<Vec<Statement<'static>>> {
    let mut post = vec![vec![
        ct_dnat(),
        is(concat(vec![iif(), oif()]), "@same"),
        Statement::Masquerade(None),
    ]];
    for (br, net) in &spec.nets {
        if !net.masquerade || net.internal {
            continue;
        }
        for (addr, len) in &net.subnets {
            let (ip, gw) = if addr.is_ipv4() {
                ("ip", net.gw4)
            } else {
                ("ip6", net.gw6)
            };
            if matches!(gw, Gateway::Nat | Gateway::NatUnprotected) {
                post.push(vec![
                    matches(field(ip, "saddr"), Operator::EQ, prefix(*addr, *len)),
                    is_not(oif(), br),
                    Statement::Masquerade(None),
                ]);
            }
        }
    }
    post
}

/// `forward`: the operator's chain first (its accept and drop are final), `br-*`
/// interfaces the sets do not name fail closed, traffic within a network, then by
/// direction.
fn forward() -> Vec<Vec<Statement<'static>>> {
    let same = || is(concat(vec![iif(), oif()]), "@same");
    vec![
        vec![jump(OPERATOR)],
        vec![
            is(iif(), "br-*"),
            is_not(iif(), "@bridges"),
            is_not(iif(), "@others"),
            drop(),
        ],
        vec![
            is(oif(), "br-*"),
            is_not(oif(), "@bridges"),
            is_not(oif(), "@others"),
            drop(),
        ],
        vec![same(), is(iif(), "@no_icc"), drop()],
        vec![same(), accept()],
        vec![is(iif(), "@bridges"), jump("from_bridge")],
        vec![is(oif(), "@bridges"), jump("to_bridge")],
    ]
}

/// `from_bridge`: internal networks, isolation between networks, isolated gateways.
fn from_bridge() -> Vec<Vec<Statement<'static>>> {
    vec![
        vec![is(iif(), "@internal"), drop()],
        vec![is(oif(), "@bridges"), drop()],
        vec![nfproto("ipv4"), is(iif(), "@isolated4"), drop()],
        vec![nfproto("ipv6"), is(iif(), "@isolated6"), drop()],
    ]
}

/// `to_bridge`: replies, published ports, the gateway modes; nothing else.
fn to_bridge() -> Vec<Vec<Statement<'static>>> {
    let l4 = || meta(MetaKey::L4proto);
    vec![
        vec![is(oif(), "@internal"), drop()],
        vec![nfproto("ipv4"), is(oif(), "@isolated4"), drop()],
        vec![nfproto("ipv6"), is(oif(), "@isolated6"), drop()],
        vec![
            ct(
                "state",
                Operator::IN,
                Expression::List(vec![s("established"), s("related")]),
            ),
            accept(),
        ],
        vec![ct_dnat(), is(service("ip"), "@pub4"), accept()],
        vec![ct_dnat(), is(service("ip6"), "@pub6"), accept()],
        vec![nfproto("ipv4"), is(oif(), "@unprotected4"), accept()],
        vec![nfproto("ipv6"), is(oif(), "@unprotected6"), accept()],
        vec![is(oif(), "@routed4"), is(service("ip"), "@pub4"), accept()],
        vec![is(oif(), "@routed6"), is(service("ip6"), "@pub6"), accept()],
        vec![is(oif(), "@routed4"), is(l4(), "icmp"), accept()],
        vec![is(oif(), "@routed6"), is(l4(), "ipv6-icmp"), accept()],
        vec![drop()],
    ]
}

/// `output`: the host's own connections to a local address (not loopback) are published
/// too.
fn output() -> Vec<Vec<Statement<'static>>> {
    vec![
        vec![
            nfproto("ipv4"),
            matches(
                field("ip", "daddr"),
                Operator::NEQ,
                prefix(IpAddr::from([127, 0, 0, 0]), 8),
            ),
            local(),
            jump("publish"),
        ],
        vec![
            nfproto("ipv6"),
            is_not(field("ip6", "daddr"), "::1"),
            local(),
            jump("publish"),
        ],
    ]
}

/// `publish`: the translation to a container, by host address first, then by port.
fn publish() -> Vec<Vec<Statement<'static>>> {
    let port = || concat(vec![meta(MetaKey::L4proto), field("th", "dport")]);
    vec![
        vec![nfproto("ipv4"), dnat("ip", service("ip"), "dnat4_at")],
        vec![nfproto("ipv4"), dnat("ip", port(), "dnat4_any")],
        vec![nfproto("ipv6"), dnat("ip6", service("ip6"), "dnat6_at")],
        vec![nfproto("ipv6"), dnat("ip6", port(), "dnat6_any")],
    ]
}

/// The rules of the chains the agent writes.
pub(super) fn chain_rules(spec: &Spec) -> Vec<(&'static str, Vec<Vec<Statement<'static>>>)> {
    vec![
        ("forward", forward()),
        ("from_bridge", from_bridge()),
        ("to_bridge", to_bridge()),
        ("prerouting", vec![vec![local(), jump("publish")]]),
        ("output", output()),
        ("publish", publish()),
        ("postrouting", postrouting(spec)),
    ]
}

/// The batch that makes table `t` hold `spec`, as one transaction: the table, its sets,
/// maps and chains declared (the operator's chain only where missing: `add` leaves an
/// existing chain and its rules as they are), what the agent writes emptied, and filled
/// again.
pub(super) fn batch(t: &str, spec: &Spec) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(t)));
    for (name, ty) in SETS {
        b.add(NfListObject::Set(Box::new(set_of(t, name, ty))));
    }
    for (name, key, value) in MAPS {
        b.add(NfListObject::Map(Box::new(map_of(t, name, key, value))));
    }
    b.add(NfListObject::Chain(chain_of(t, OPERATOR, None)));
    for (name, hook) in CHAINS {
        b.add(NfListObject::Chain(chain_of(t, name, *hook)));
    }
    for (name, ty) in SETS {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set_of(
            t, name, ty,
        )))));
    }
    for (name, key, value) in MAPS {
        b.add_cmd(NfCmd::Flush(FlushObject::Map(Box::new(map_of(
            t, name, key, value,
        )))));
    }
    for (name, hook) in CHAINS {
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain_of(t, name, *hook))));
    }
    for (name, elem) in contents(spec) {
        b.add(NfListObject::Element(Element {
            family: NfFamily::INet,
            table: t.to_string().into(),
            name: name.into(),
            elem: elem.into(),
        }));
    }
    for (chain, rules) in chain_rules(spec) {
        for expr in rules {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: t.to_string().into(),
                chain: chain.into(),
                expr: expr.into(),
                handle: None,
                index: None,
                comment: None,
            }));
        }
    }
    b
}

impl TableSpec for Spec {
    const ROLE: &'static str = "own-firewall";
    // The operator's chain and its rules outlive every write.
    const DISPOSABLE: bool = false;

    fn tables(name: &str) -> Vec<TableId> {
        vec![TableId::new(NfFamily::INet, name)]
    }

    /// Always the whole table.
    fn batch(&self, name: &str, _start: Start<'_, Self>) -> Batch<'static> {
        batch(name, self)
    }

    /// Rules per chain the agent writes, the operator's chain with any rules, elements per
    /// set and map.
    fn expected_shape(&self, name: &str) -> Shape {
        let t = TableId::new(NfFamily::INet, name);
        let mut chains: BTreeMap<_, _> = chain_rules(self)
            .into_iter()
            .map(|(c, rules)| ((t.clone(), c.to_string()), Some(rules.len())))
            .collect();
        chains.insert((t.clone(), OPERATOR.to_string()), None);
        let filled = contents(self);
        let sets = SETS
            .iter()
            .map(|(set, _)| *set)
            .chain(MAPS.iter().map(|(map, ..)| *map))
            .map(|set| {
                (
                    (t.clone(), set.to_string()),
                    filled.get(set).map_or(0, Vec::len),
                )
            })
            .collect();
        Shape {
            tables: [t].into(),
            chains,
            sets,
            owned_prefixes: BTreeSet::new(),
        }
    }
}
