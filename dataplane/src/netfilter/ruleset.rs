//! How the notrack table is written: its sets and rules as typed nftables objects (the
//! `nftables` crate), one batch per update, applied as one transaction by `nft -j`; and how
//! it is read back to see drift. What goes in it is [`super::notrack::Spec`].

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use nftables::{
    batch::Batch,
    expr::{Expression, SocketAttr},
    schema::{
        Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag,
        SetType, SetTypeValue, Table,
    },
    stmt::Statement,
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::notrack::Spec;

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

/// The sets the agent fills (flushed and refilled at each update).
pub(crate) const FILLED: [&str; 9] = [
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
            Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem, Socket,
            SocketAttr,
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

    /// `meta l4proto { tcp, udp }`.
    pub fn tcp_or_udp() -> Statement<'static> {
        is(
            l4proto(),
            Expression::Named(NamedExpression::Set(vec![
                SetItem::Element(Expression::String("tcp".into())),
                SetItem::Element(Expression::String("udp".into())),
            ])),
        )
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
    vec![
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

/// Every `prerouting` rule after these needs the packet to come from a backend's port or go
/// to one: a packet that does neither (most of what the host receives) leaves the chain
/// after two lookups instead of going through each rule's.
fn backend_gate() -> Vec<Vec<Statement<'static>>> {
    use nf::{concat, field, l4proto, not_in_set};
    [("ip", "4"), ("ip6", "6")]
        .into_iter()
        .map(|(ip, n)| {
            vec![
                not_in_set(
                    concat(vec![field(ip, "saddr"), l4proto(), field("th", "sport")]),
                    &format!("backends{n}"),
                ),
                not_in_set(
                    concat(vec![field(ip, "daddr"), l4proto(), field("th", "dport")]),
                    &format!("backends{n}"),
                ),
                Statement::Return(None),
            ]
        })
        .collect()
}

/// The rules of the `prerouting` and `output` chains, in order.
pub(crate) fn rules(spec: &Spec) -> (Vec<Vec<Statement<'static>>>, Vec<Vec<Statement<'static>>>) {
    use nf::{concat, field, in_set, l4proto, tcp_or_udp};
    let mut pre = Vec::new();
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        let src = || field(ip, "saddr");
        let dst = || field(ip, "daddr");
        // A peer dialling the host on a published port (Docker's NAT path: a client the
        // programs left to Docker, or any while no agent runs) has its client port recorded,
        // so the replies of that connection stay tracked and their NAT is undone.
        // (The published port first: it rules out most packets with one lookup.)
        pre.push(vec![
            tcp_or_udp(),
            in_set(concat(vec![l4proto(), field("th", "dport")]), "published"),
            in_set(src(), &format!("peers{n}")),
            in_set(dst(), &format!("hosts{n}")),
            nf::update(
                &format!("natclients{n}"),
                concat(vec![src(), l4proto(), field("th", "sport")]),
            ),
        ]);
        pre.push(vec![
            tcp_or_udp(),
            in_set(
                concat(vec![src(), l4proto(), field("th", "sport")]),
                &format!("backends{n}"),
            ),
            in_set(
                concat(vec![dst(), l4proto(), field("th", "dport")]),
                &format!("natclients{n}"),
            ),
            Statement::Return(None),
        ]);
        // Replies that Docker's NAT carried before the table knew them.
        pre.push(vec![
            in_set(
                concat(vec![
                    src(),
                    l4proto(),
                    field("th", "sport"),
                    dst(),
                    field("th", "dport"),
                ]),
                &format!("natreplies{n}"),
            ),
            Statement::Return(None),
        ]);
    }
    pre.extend(backend_gate());
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        let src = || field(ip, "saddr");
        let dst = || field(ip, "daddr");
        // Container clients and backends, both ways (bridged through the host).
        pre.push(vec![
            in_set(src(), &format!("peers{n}")),
            in_set(
                concat(vec![dst(), l4proto(), field("th", "dport")]),
                &format!("backends{n}"),
            ),
            Statement::Notrack,
        ]);
        pre.push(vec![
            in_set(dst(), &format!("peers{n}")),
            in_set(
                concat(vec![src(), l4proto(), field("th", "sport")]),
                &format!("backends{n}"),
            ),
            Statement::Notrack,
        ]);
        if !spec.track_host_clients {
            // Replies to a host socket connected straight to the backend (TCP: not a
            // wildcard listener; UDP: a socket bound there).
            for (proto, attr) in [
                ("tcp", SocketAttr::Wildcard),
                ("udp", SocketAttr::Transparent),
            ] {
                pre.push(vec![
                    nf::is(l4proto(), Expression::String(proto.into())),
                    in_set(dst(), &format!("hosts{n}")),
                    in_set(
                        concat(vec![src(), l4proto(), field("th", "sport")]),
                        &format!("backends{n}"),
                    ),
                    nf::socket_not(attr),
                    Statement::Notrack,
                ]);
            }
        }
    }
    let mut out = Vec::new();
    if !spec.track_host_clients {
        for (ip, n) in [("ip", "4"), ("ip6", "6")] {
            out.push(vec![
                in_set(
                    concat(vec![field(ip, "daddr"), l4proto(), field("th", "dport")]),
                    &format!("backends{n}"),
                ),
                Statement::Notrack,
            ]);
        }
    }
    (pre, out)
}

pub(crate) fn table(t: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: t.to_string().into(),
        handle: None,
    }
}

pub(crate) fn set_of(t: &str, name: &str, types: Vec<SetType>) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: name.to_string().into(),
        handle: None,
        set_type: if types.len() == 1 {
            SetTypeValue::Single(types[0])
        } else {
            SetTypeValue::Concatenated(types.into())
        },
        policy: None,
        flags: None,
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }
}

pub(crate) fn chain_of(t: &str, hook: NfHook) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: t.to_string().into(),
        name: match hook {
            NfHook::Output => "output",
            _ => "prerouting",
        }
        .into(),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(-300),
        policy: Some(NfChainPolicy::Accept),
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
        b.add(NfListObject::Set(Box::new(set_of(t, name, types.clone()))));
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
            vec![addr, SetType::InetProto, SetType::InetService],
        );
        // Dynamic too, implied by the `update` statements that use it.
        s.flags = Some([SetFlag::Timeout].into_iter().collect());
        s.timeout = Some(NAT_CLIENT_TIMEOUT_S);
        s.size = Some(NAT_CLIENTS_MAX);
        b.add(NfListObject::Set(Box::new(s)));
    }
    for hook in [NfHook::Prerouting, NfHook::Output] {
        b.add(NfListObject::Chain(chain_of(t, hook)));
        b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain_of(t, hook))));
    }
    for (name, types, items) in sets {
        b.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set_of(
            t, name, types,
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
    let (pre, out) = rules(spec);
    for (chain, rules) in [("prerouting", pre), ("output", out)] {
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

/// The batch that deletes table `t` (created first if missing, so it never fails for
/// that).
pub fn delete_batch(t: &str) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(t)));
    b.delete(NfListObject::Table(table(t)));
    b
}

/// Rules per chain and elements per set the agent fills, as the kernel has them in table
/// `t` (`nft -j list table`): compared with what was applied, a rule or element deleted by
/// hand shows.
pub(crate) fn shape_of(ruleset: &Nftables<'_>) -> BTreeMap<String, usize> {
    let mut shape = BTreeMap::new();
    for o in ruleset.objects.iter() {
        match o {
            NfObject::ListObject(NfListObject::Rule(r)) => {
                *shape.entry(format!("chain {}", r.chain)).or_insert(0) += 1;
            }
            NfObject::ListObject(NfListObject::Set(s)) if FILLED.contains(&s.name.as_ref()) => {
                shape.insert(
                    format!("set {}", s.name),
                    s.elem.as_ref().map_or(0, |e| e.len()),
                );
            }
            _ => {}
        }
    }
    shape
}

/// What [`shape_of`] reads back when `spec` is in place.
pub(crate) fn expected_shape(spec: &Spec) -> BTreeMap<String, usize> {
    let mut shape = BTreeMap::new();
    let (pre, out) = rules(spec);
    for (chain, n) in [("prerouting", pre.len()), ("output", out.len())] {
        if n > 0 {
            shape.insert(format!("chain {chain}"), n);
        }
    }
    for (name, _, items) in sets(spec) {
        shape.insert(format!("set {name}"), items.len());
    }
    shape
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

/// Applies `batch` as one transaction (`nft -j -f -`, the typed batch as JSON): all or
/// nothing. nft's error output becomes the error.
pub(crate) fn run(batch: Batch<'_>) -> Result<()> {
    let mut value = serde_json::to_value(batch.to_nftables()).context("encoding the batch")?;
    spell_notrack(&mut value);
    run_json(&value)
}

/// Applies a batch already encoded as nft's JSON, as one transaction.
pub(crate) fn run_json(value: &serde_json::Value) -> Result<()> {
    let json = serde_json::to_vec(value).context("encoding the batch")?;
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&json)
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the batch (nothing was changed): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The `nftables` crate writes the `notrack` statement as a bare string; nft reads only
/// the object form (`{"notrack": null}`).
pub(crate) fn spell_notrack(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s == "notrack" => {
            *v = serde_json::json!({ "notrack": null });
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(spell_notrack),
        serde_json::Value::Object(o) => o.values_mut().for_each(spell_notrack),
        _ => {}
    }
}

/// Table `t` as the kernel has it (`nft -j list table`), if it exists.
pub(crate) fn read_back(t: &str) -> Option<Nftables<'static>> {
    let args = ["list", "table", "inet", t];
    nftables::helper::get_current_ruleset_with_args(nftables::helper::DEFAULT_NFT, &args).ok()
}

/// Whether `ruleset` has the dynamic sets (the table was made by this layout).
pub(crate) fn has_dynamic_sets(ruleset: &Nftables<'_>) -> bool {
    ruleset
        .objects
        .iter()
        .any(|o| matches!(o, NfObject::ListObject(NfListObject::Set(s)) if s.name == "natclients4"))
}
