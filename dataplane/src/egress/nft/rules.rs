//! The egress table's rules: what its base chains and each container's chains hold.

use nftables::{
    expr::{CT, Expression, Meta, MetaKey, NamedExpression, Prefix},
    stmt::{self, Match, Operator, Statement, VerdictMap},
};

use super::{
    objects::{anon_set, s},
    spec::{Chains, Spec, counter_name},
};
use crate::{
    egress::policy::{Net, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP},
    netfilter::ruleset::nf::{field, in_set, is, l4proto},
};

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn net_expr(n: &Net) -> Expression<'static> {
    let full = if n.is_v4() { 32 } else { 128 };
    if n.len == full {
        s(n.addr)
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(s(n.addr)),
            len: u32::from(n.len),
        }))
    }
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        right: Expression::List(states.iter().map(|st| s(st)).collect()),
        op: Operator::IN,
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn count_and_drop(k: &str) -> [Statement<'static>; 2] {
    [
        Statement::Counter(stmt::Counter::Named(counter_name(k).into())),
        Statement::Drop(None),
    ]
}

/// The base chains' rules.
pub(super) fn base_rules(
    spec: &Spec,
) -> (Vec<Vec<Statement<'static>>>, Vec<Vec<Statement<'static>>>) {
    let established = || vec![ct_state(&["established", "related"]), accept()];
    // Untracked: the agent's translated flows, never a policed container's (their packets
    // are never untracked), and only after the dispatch, so a policed container's packet
    // is judged whatever its state.
    let untracked = || vec![ct_state(&["untracked"]), accept()];
    let dispatch = |m4: &str, m6: &str| {
        [("ip", m4), ("ip6", m6)].map(|(ip, m)| {
            vec![Statement::VerdictMap(VerdictMap {
                key: field(ip, "saddr"),
                data: s(format!("@{m}")),
            })]
        })
    };
    // A container the agent has not admitted, on a bridge it knows or one named the way
    // Docker names them (created while the agent was down).
    let unadmitted = |out_of_host: bool| {
        let mut rules = Vec::new();
        let bridge_matches = [
            in_set(meta(MetaKey::Iifname), "bridges"),
            is(meta(MetaKey::Iifname), s("br-*")),
            is(meta(MetaKey::Iifname), s("docker0")),
        ];
        for m in bridge_matches {
            for (ip, n) in [("ip", "4"), ("ip6", "6")] {
                let mut r = vec![m.clone()];
                if out_of_host {
                    r.push(Statement::Match(Match {
                        left: meta(MetaKey::Oifname),
                        right: s("@bridges"),
                        op: Operator::NEQ,
                    }));
                }
                r.push(Statement::Match(Match {
                    left: field(ip, "saddr"),
                    right: s(format!("@admitted{n}")),
                    op: Operator::NEQ,
                }));
                r.push(Statement::Drop(None));
                rules.push(r);
            }
        }
        rules
    };
    let mut fwd = vec![established()];
    fwd.extend(dispatch("fwd4", "fwd6"));
    fwd.push(untracked());
    // IPv6 neighbour discovery to the host is how a container finds its gateway at all.
    let neighbour_discovery = vec![
        is(
            field("icmpv6", "type"),
            anon_set(vec![
                s("nd-router-solicit"),
                s("nd-neighbor-solicit"),
                s("nd-neighbor-advert"),
            ]),
        ),
        accept(),
    ];
    let mut inp = vec![established(), neighbour_discovery];
    inp.extend(dispatch("in4", "in6"));
    inp.push(untracked());
    if spec.closed_host {
        fwd.extend(unadmitted(false));
        inp.extend(unadmitted(false));
    } else if spec.closed_internet {
        fwd.extend(unadmitted(true));
    }
    (fwd, inp)
}

/// What the container may always do first: DNS to its resolvers, its allow-list.
fn allow_rules(c: &Chains) -> Vec<Vec<Statement<'static>>> {
    let mut rules = Vec::new();
    for v4 in [true, false] {
        let ip = if v4 { "ip" } else { "ip6" };
        let dns: Vec<_> = c
            .dns
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(|a| s(a))
            .collect();
        if !dns.is_empty() {
            rules.push(vec![
                is(field(ip, "daddr"), anon_set(dns)),
                is(l4proto(), anon_set(vec![s("tcp"), s("udp")])),
                is(field("th", "dport"), Expression::Number(53)),
                accept(),
            ]);
        }
        for a in &c.allow {
            let nets: Vec<_> = a
                .nets
                .iter()
                .filter(|n| n.is_v4() == v4)
                .map(net_expr)
                .collect();
            if nets.is_empty() {
                continue;
            }
            let mut r = vec![is(field(ip, "daddr"), anon_set(nets))];
            match (a.proto, a.port) {
                (Some(PROTO_ICMP | PROTO_ICMPV6), _) => {
                    r.push(is(l4proto(), s(if v4 { "icmp" } else { "ipv6-icmp" })));
                }
                (Some(p), _) => {
                    r.push(is(l4proto(), s(if p == PROTO_UDP { "udp" } else { "tcp" })));
                }
                (None, Some(_)) => r.push(is(l4proto(), anon_set(vec![s("tcp"), s("udp")]))),
                (None, None) => {}
            }
            if let Some(port) = a.port {
                r.push(is(
                    field("th", "dport"),
                    Expression::Number(u32::from(port)),
                ));
            }
            r.push(accept());
            rules.push(r);
        }
    }
    rules
}

/// The rules of the container's forward chain and (host off only) input chain.
pub(super) fn container_rules(
    k: &str,
    c: &Chains,
) -> (
    Vec<Vec<Statement<'static>>>,
    Option<Vec<Vec<Statement<'static>>>>,
) {
    let first = allow_rules(c);
    let mut fwd = first.clone();
    let [count, drop] = count_and_drop(k);
    match (c.internet, c.host) {
        (false, false) => fwd.push(vec![count, drop]),
        (true, false) => fwd.push(vec![in_set(meta(MetaKey::Oifname), "bridges"), count, drop]),
        (false, true) => fwd.push(vec![
            Statement::Match(Match {
                left: meta(MetaKey::Oifname),
                right: s("@bridges"),
                op: Operator::NEQ,
            }),
            count,
            drop,
        ]),
        (true, true) => {}
    }
    let inp = (!c.host).then(|| {
        let mut r = first;
        r.push(count_and_drop(k).to_vec());
        r
    });
    (fwd, inp)
}
