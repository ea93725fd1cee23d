//! Builders of the `nftables` crate's objects both egress tables use.

use crate::netfilter::ruleset::map_of;
use nftables::{
    expr::{Expression, NamedExpression, SetItem, Verdict},
    schema::{Counter, Map, NfListObject, Rule, SetType},
    stmt::{JumpTarget, Statement},
    types::NfFamily,
};

#[expect(
    clippy::needless_pass_by_value,
    reason = "called with references and strings alike"
)]
pub(in crate::egress) fn s(v: impl ToString) -> Expression<'static> {
    Expression::String(v.to_string().into())
}

pub(in crate::egress) fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

pub(in crate::egress) fn jump(target: String) -> Expression<'static> {
    Expression::Verdict(Verdict::Jump(JumpTarget {
        target: target.into(),
    }))
}

/// [`vmap`] in a table of `family`.
pub(in crate::egress) fn vmap_in(
    family: NfFamily,
    t: &str,
    name: &str,
    ty: SetType,
) -> Map<'static> {
    map_of(family, t, name, &[ty], &[SetType::Mark])
}

/// A named counter in a table of `family`.
pub(in crate::egress) fn counter_in(family: NfFamily, t: &str, name: &str) -> Counter<'static> {
    Counter {
        family,
        table: t.to_string().into(),
        name: name.to_string().into(),
        handle: None,
        packets: None,
        bytes: None,
    }
}

/// A rule in a table of `family`.
pub(in crate::egress) fn rule_in(
    family: NfFamily,
    t: &str,
    chain: &str,
    expr: Vec<Statement<'static>>,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family,
        table: t.to_string().into(),
        chain: chain.to_string().into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: None,
    })
}
