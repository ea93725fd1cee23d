//! How the notrack table is written: its sets and rules as typed nftables objects (the
//! `nftables` crate), one batch per update, applied as one transaction by `nft -j`; and what
//! a read-back must find (its [`TableSpec`]). What goes in it is [`super::notrack::Spec`].

use std::{collections::BTreeSet, net::IpAddr};

use nftables::{
    batch::Batch,
    expr::{Expression, SocketAttr},
    schema::{
        Chain, Element, FlushObject, Map, NfCmd, NfListObject, Rule, Set, SetFlag, SetType,
        SetTypeValue, Table,
    },
    stmt::Statement,
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::{
    listing::Listing,
    notrack::Spec,
    table::{Shape, Start, TableId, TableSpec},
};

/// Each item rendered, IPv4 ones first, IPv6 ones second.
pub(crate) fn split<T, U>(
    items: &BTreeSet<T>,
    is_v4: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> U,
) -> (Vec<U>, Vec<U>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for i in items {
        if is_v4(i) {
            v4.push(show(i));
        } else {
            v6.push(show(i));
        }
    }
    (v4, v6)
}

/// How long a peer's connection through Docker's NAT keeps its replies tracked after its
/// last packet towards the host, in seconds.
pub(crate) const NAT_CLIENT_TIMEOUT_S: u32 = 600;
/// Room for such connections (when full, new ones are not recorded).
pub(crate) const NAT_CLIENTS_MAX: u32 = 65_536;

/// The sets the agent fills (flushed and refilled at each update), as the tests name them.
#[cfg(test)]
pub(crate) const FILLED: [&str; 10] = [
    "ports",
    "published",
    "backends4",
    "backends6",
    "hosts4",
    "hosts6",
    "peers4",
    "peers6",
    "natreplies4",
    "natreplies6",
];

/// Typed pieces of nft expressions and statements.
pub(crate) mod nf {
    use std::borrow::Cow;

    use nftables::{
        expr::{
            Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Socket, SocketAttr,
        },
        stmt::{self, Match, Operator, Statement},
    };

    pub fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.into(),
                field: field.into(),
            },
        )))
    }

    pub fn l4proto() -> Expression<'static> {
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        }))
    }

    pub fn nfproto() -> Expression<'static> {
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::Nfproto,
        }))
    }

    pub fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
        Expression::Named(NamedExpression::Concat(parts))
    }

    /// `left` is in named set `set`.
    pub fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
        Statement::Match(Match {
            left,
            right: Expression::String(format!("@{set}").into()),
            op: Operator::EQ,
        })
    }

    /// `left` is not in named set `set`.
    pub fn not_in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
        Statement::Match(Match {
            left,
            right: Expression::String(format!("@{set}").into()),
            op: Operator::NEQ,
        })
    }

    /// `left == right`.
    pub fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
        Statement::Match(Match {
            left,
            right,
            op: Operator::EQ,
        })
    }

    /// `socket <attr> 0`.
    pub fn socket_not(attr: SocketAttr) -> Statement<'static> {
        is(
            Expression::Named(NamedExpression::Socket(Socket {
                key: Cow::Owned(attr),
            })),
            Expression::Number(0),
        )
    }

    /// `update @set { elem }`.
    pub fn update(set: &str, elem: Expression<'static>) -> Statement<'static> {
        Statement::Set(stmt::Set {
            op: stmt::SetOp::Update,
            elem,
            set: format!("@{set}").into(),
        })
    }
}

/// The sets of the table with their types and content.
pub(crate) fn sets(spec: &Spec) -> Vec<(&'static str, Vec<SetType>, Vec<Expression<'static>>)> {
    use SetType::{InetProto, InetService, Ipv4Addr, Ipv6Addr};
    let s = |v: String| Expression::String(v.into());
    let n = |v: u16| Expression::Number(u32::from(v));
    let (b4, b6) = split(
        &spec.backends,
        |b| b.addr.is_ipv4(),
        |b| {
            nf::concat(vec![
                s(b.addr.to_string()),
                n(u16::from(b.proto)),
                n(b.port),
            ])
        },
    );
    let (h4, h6) = split(&spec.hosts, IpAddr::is_ipv4, |a| s(a.to_string()));
    let (p4, p6) = split(&spec.peers, IpAddr::is_ipv4, |a| s(a.to_string()));
    let (n4, n6) = split(
        &spec.nat_replies,
        |(b, ..)| b.is_ipv4(),
        |(b, proto, bport, c, cport)| {
            nf::concat(vec![
                s(b.to_string()),
                n(u16::from(*proto)),
                n(*bport),
                s(c.to_string()),
                n(*cport),
            ])
        },
    );
    let published = spec
        .published
        .iter()
        .map(|(proto, port)| nf::concat(vec![n(u16::from(*proto)), n(*port)]))
        .collect();
    // Every port a rule after the first of `prerouting` looks for: backends' and published
    // ones (a bitmap: one bit test per lookup).
    let ports: BTreeSet<u16> = spec
        .backends
        .iter()
        .map(|b| b.port)
        .chain(spec.published.iter().map(|(_, port)| *port))
        .collect();
    vec![
        (
            "ports",
            vec![InetService],
            ports.into_iter().map(n).collect(),
        ),
        ("published", vec![InetProto, InetService], published),
        ("backends4", vec![Ipv4Addr, InetProto, InetService], b4),
        ("backends6", vec![Ipv6Addr, InetProto, InetService], b6),
        ("hosts4", vec![Ipv4Addr], h4),
        ("hosts6", vec![Ipv6Addr], h6),
        ("peers4", vec![Ipv4Addr], p4),
        ("peers6", vec![Ipv6Addr], p6),
        (
            "natreplies4",
            vec![Ipv4Addr, InetProto, InetService, Ipv4Addr, InetService],
            n4,
        ),
        (
            "natreplies6",
            vec![Ipv6Addr, InetProto, InetService, Ipv6Addr, InetService],
            n6,
        ),
    ]
}

/// One chain of the table: its name, its hook (`None`: a regular chain, reached by
/// `jump`/`goto`) and its rules in order.
pub(crate) struct ChainRules {
    pub name: String,
    pub hook: Option<NfHook>,
    pub rules: Vec<Vec<Statement<'static>>>,
}

fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(nftables::stmt::JumpTarget {
        target: chain.to_string().into(),
    })
}

fn goto(chain: &str) -> Statement<'static> {
    Statement::Goto(nftables::stmt::JumpTarget {
        target: chain.to_string().into(),
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// The chains of the table, base chains first, and their rules.
///
/// Every packet the host receives goes through `prerouting`, so it is built for the
/// packets that match nothing (most of them): one rule with two bitmap lookups (neither
/// port is a backend's or a published one: every rule after needs one of the two) ends it.
/// The rest is split by family and by direction, so a packet evaluates only the rules that
/// can apply to it:
/// - `pre4`/`pre6`: a peer dialling a host address on a published port (Docker's NAT path)
///   has its client port recorded; a packet from a backend's port goes on to
///   `from_backend`; a peer's packet to a backend is untracked.
/// - `from_backend`: replies to a host socket connected straight to the backend
///   (`to_host`); replies that Docker's NAT carries stay tracked (recorded client ports,
///   connections made before the agent knew them); replies to a peer are untracked.
///
/// `accept` ends the table's evaluation (its chains' policy is accept too); Docker's and
/// the operator's chains still see every packet.
pub(crate) fn chains(spec: &Spec) -> Vec<ChainRules> {
    use nf::{concat, field, l4proto, not_in_set};
    let th = |f: &'static str| field("th", f);
    let mut out = vec![
        ChainRules {
            name: "prerouting".into(),
            hook: Some(NfHook::Prerouting),
            rules: vec![
                vec![
                    not_in_set(th("dport"), "ports"),
                    not_in_set(th("sport"), "ports"),
                    accept(),
                ],
                vec![
                    nf::is(nf::nfproto(), Expression::String("ipv4".into())),
                    goto("pre4"),
                ],
                vec![
                    nf::is(nf::nfproto(), Expression::String("ipv6".into())),
                    goto("pre6"),
                ],
            ],
        },
        ChainRules {
            name: "output".into(),
            hook: Some(NfHook::Output),
            rules: Vec::new(),
        },
    ];
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        let dst = || field(ip, "daddr");
        let set = |name: &str| format!("{name}{n}");
        if !spec.track_host_clients {
            // The host's packets to a backend's port; replies are matched in `to_host`.
            out[1].rules.push(vec![
                nf::in_set(th("dport"), "ports"),
                nf::in_set(
                    concat(vec![dst(), l4proto(), th("dport")]),
                    &set("backends"),
                ),
                Statement::Notrack,
            ]);
        }
        out.extend(family_chains(spec, ip, n));
    }
    out
}

/// Replies to a host socket connected straight to the backend (TCP: not a wildcard
/// listener; UDP: a socket bound there). None while host clients are tracked (the chain is
/// declared all the same, so that a change either way flushes it).
fn to_host(spec: &Spec) -> Vec<Vec<Statement<'static>>> {
    if spec.track_host_clients {
        return Vec::new();
    }
    [
        ("tcp", SocketAttr::Wildcard),
        ("udp", SocketAttr::Transparent),
    ]
    .into_iter()
    .map(|(proto, attr)| {
        vec![
            nf::is(nf::l4proto(), Expression::String(proto.into())),
            nf::socket_not(attr),
            Statement::Notrack,
            accept(),
        ]
    })
    .collect()
}

/// `pre`, `from_backend` and `to_host` for one family (`ip`, suffix `n`).
fn family_chains(spec: &Spec, ip: &'static str, n: &str) -> Vec<ChainRules> {
    use nf::{concat, field, in_set, l4proto};
    let th = |f: &'static str| field("th", f);
    let src = || field(ip, "saddr");
    let dst = || field(ip, "daddr");
    // A set's or chain's name for this family (`backends` -> `backends4`).
    let of = |base: &str| format!("{base}{n}");
    let pre = vec![
        // A peer dialling the host on a published port (Docker's NAT path: a client the
        // programs left to Docker, or any while no agent runs) has its client port
        // recorded, so the replies of that connection stay tracked and their NAT is undone.
        // (The published port first: it rules out most packets with one lookup.)
        vec![
            in_set(concat(vec![l4proto(), th("dport")]), "published"),
            in_set(dst(), &of("hosts")),
            in_set(src(), &of("peers")),
            nf::update(
                &of("natclients"),
                concat(vec![src(), l4proto(), th("sport")]),
            ),
        ],
        vec![
            in_set(concat(vec![src(), l4proto(), th("sport")]), &of("backends")),
            jump(&of("from_backend")),
        ],
        // Container clients to backends (bridged through the host).
        vec![
            in_set(src(), &of("peers")),
            in_set(concat(vec![dst(), l4proto(), th("dport")]), &of("backends")),
            Statement::Notrack,
            accept(),
        ],
    ];
    let from_backend = vec![
        // A host address is never a peer, a recorded NAT client or a NAT reply's client.
        vec![
            in_set(dst(), &of("hosts")),
            if spec.track_host_clients {
                accept()
            } else {
                goto(&of("to_host"))
            },
        ],
        vec![
            in_set(
                concat(vec![dst(), l4proto(), th("dport")]),
                &of("natclients"),
            ),
            accept(),
        ],
        // Replies that Docker's NAT carried before the table knew them.
        vec![
            in_set(
                concat(vec![src(), l4proto(), th("sport"), dst(), th("dport")]),
                &of("natreplies"),
            ),
            accept(),
        ],
        vec![in_set(dst(), &of("peers")), Statement::Notrack, accept()],
    ];
    let mut chains = vec![
        ChainRules {
            name: of("pre"),
            hook: None,
            rules: pre,
        },
        ChainRules {
            name: of("from_backend"),
            hook: None,
            rules: from_backend,
        },
    ];
    chains.push(ChainRules {
        name: of("to_host"),
        hook: None,
        rules: to_host(spec),
    });
    chains
}

pub(crate) fn table(t: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: t.to_string().into(),
        handle: None,
    }
}

/// A set's or map's type: one type, or their concatenation.
pub(crate) fn type_of(types: &[SetType]) -> SetTypeValue<'static> {
    if let [one] = types {
        SetTypeValue::Single(*one)
    } else {
        SetTypeValue::Concatenated(types.to_vec().into())
    }
}

/// An empty map `name` of table `t` in `family`, from `key` to `value` (a verdict map is
/// written with `value` `[SetType::Mark]`: see [`super::nft::encode`]).
pub(crate) fn map_of(
    family: NfFamily,
    t: &str,
    name: &str,
    key: &[SetType],
    value: &[SetType],
) -> Map<'static> {
    Map {
        family,
        table: t.to_string().into(),
        name: name.to_string().into(),
        handle: None,
        set_type: type_of(key),
        map: type_of(value),
        policy: None,
        flags: None,
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }
}

pub(crate) fn set_of(t: &str, name: &str, types: &[SetType]) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        handle: None,
        set_type: type_of(types),
        policy: None,
        flags: None,
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }
}

pub(crate) fn chain_of(t: &str, name: &str, hook: Option<NfHook>) -> Chain<'static> {
    let base = hook.is_some();
    Chain {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        _type: base.then_some(NfChainType::Filter),
        hook,
        prio: base.then_some(-300),
        policy: base.then_some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

/// The batch that makes table `t` exactly `spec`, as one transaction: the table, its sets
/// and chains declared (`add`: created where missing), then the chains and the agent's
/// sets flushed and filled. The connections recorded in `natclients` (learnt by the packet
/// path) survive every update.
pub fn batch(t: &str, spec: &Spec, new_table: bool) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(t)));
    let sets = sets(spec);
    for (name, types, _) in &sets {
        b.add(NfListObject::Set(Box::new(set_of(t, name, types))));
    }
    // Once they exist the kernel has marked them dynamic, which nft's JSON cannot say, so
    // declaring them again would not match: declared with a new table only.
    let dynamic = if new_table {
        &[("4", SetType::Ipv4Addr), ("6", SetType::Ipv6Addr)][..]
    } else {
        &[]
    };
    for (n, addr) in dynamic.iter().copied() {
        let mut s = set_of(
            t,
            &format!("natclients{n}"),
            &[addr, SetType::InetProto, SetType::InetService],
        );
        // Dynamic too, implied by the `update` statements that use it.
        s.flags = Some([SetFlag::Timeout].into_iter().collect());
        s.timeout = Some(NAT_CLIENT_TIMEOUT_S);
        s.size = Some(NAT_CLIENTS_MAX);
        b.add(NfListObject::Set(Box::new(s)));
    }
    let chains = chains(spec);
    for c in &chains {
        b.add(NfListObject::Chain(chain_of(t, &c.name, c.hook)));
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain_of(
            t, &c.name, c.hook,
        ))));
    }
    for (name, types, items) in sets {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set_of(
            t, name, &types,
        )))));
        if !items.is_empty() {
            b.add(NfListObject::Element(Element {
                family: NfFamily::INet,
                table: t.to_string().into(),
                name: name.into(),
                elem: items.into(),
            }));
        }
    }
    for c in chains {
        for expr in c.rules {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: t.to_string().into(),
                chain: c.name.clone().into(),
                expr: expr.into(),
                handle: None,
                index: None,
                comment: None,
            }));
        }
    }
    b
}

/// Whether `found` has the dynamic sets (the table was made by this layout).
fn has_dynamic_sets(found: &Listing) -> bool {
    found
        .objects
        .iter()
        .any(|o| matches!(o, NfListObject::Set(s) if s.name == "natclients4"))
}

impl TableSpec for Spec {
    const ROLE: &'static str = "notrack";
    // What it holds besides the spec (connections the packet path recorded) is relearnt.
    const DISPOSABLE: bool = true;

    fn tables(name: &str) -> Vec<TableId> {
        vec![TableId::new(NfFamily::INet, name)]
    }

    /// Always the whole table (a flush and refill of each chain and set); its dynamic sets
    /// declared only with a new table.
    fn batch(&self, name: &str, start: Start<'_, Self>) -> Batch<'static> {
        let new_table = match start {
            Start::Applied(_) => false,
            Start::Found(found) => !has_dynamic_sets(found),
        };
        batch(name, self, new_table)
    }

    /// Rules per chain and elements per set the agent fills: compared with what was
    /// applied, a rule or element deleted by hand shows.
    fn expected_shape(&self, name: &str) -> Shape {
        let t = TableId::new(NfFamily::INet, name);
        Shape {
            tables: [t.clone()].into(),
            chains: chains(self)
                .into_iter()
                .map(|c| ((t.clone(), c.name), Some(c.rules.len())))
                .collect(),
            sets: sets(self)
                .into_iter()
                .map(|(set, _, items)| ((t.clone(), set.to_string()), items.len()))
                .collect(),
            owned_prefixes: BTreeSet::new(),
        }
    }
}

/// The rules a batch (as nft's JSON commands) adds to `chain`, each as its JSON text.
#[cfg(test)]
pub(crate) fn rules_of(cmds: &[serde_json::Value], chain: &str) -> Vec<String> {
    cmds.iter()
        .filter_map(|c| c["add"]["rule"].as_object())
        .filter(|r| r["chain"] == chain)
        .map(|r| r["expr"].to_string())
        .collect()
}
