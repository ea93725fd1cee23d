//! A ruleset as `nft -j list` prints it, read with the `nftables` crate's schema: tables,
//! chains, sets, maps and every other object it reads as its typed objects; rules with their
//! place typed and each statement read where the schema can; named counters with the
//! kernel's 64-bit values.
//!
//! What the schema cannot read is kept as nft printed it where a reader needs it (a rule's
//! statements), and left out elsewhere (objects of kinds no reader here looks at).

use std::borrow::Cow;

use nftables::{
    expr::{Expression, NamedExpression, SetItem, Verdict},
    schema::{Counter, NfListObject, NfObject, Rule},
    stmt::Statement,
    types::NfFamily,
};
use serde::Deserialize;

/// The objects of a listing.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Tables, chains, sets, maps and the other objects the schema reads, in order (rules
    /// and counters are in [`Listing::rules`] and [`Listing::counters`]).
    pub objects: Vec<NfListObject<'static>>,
    pub rules: Vec<ListedRule>,
    pub counters: Vec<CounterValues>,
}

/// A rule: the schema's [`Rule`] with the statements it reads, in order, and those it
/// cannot read as nft printed them.
#[derive(Clone, Debug)]
pub struct ListedRule {
    pub rule: Rule<'static>,
    pub unread: Vec<serde_json::Value>,
}

/// A named counter's values (the schema's [`Counter`] holds 32 bits, the kernel 64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterValues {
    pub family: NfFamily,
    pub table: String,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The document `nft -j` prints: its objects, each read on its own.
#[derive(Deserialize)]
struct Document {
    nftables: Vec<serde_json::Value>,
}

/// A rule's place, with its statements still as printed.
#[derive(Deserialize)]
struct RulePlace {
    family: NfFamily,
    table: String,
    chain: String,
    handle: Option<u32>,
    comment: Option<String>,
    expr: Vec<serde_json::Value>,
}

/// A named counter whose values pass 32 bits.
#[derive(Deserialize)]
struct WideCounter {
    family: NfFamily,
    table: String,
    name: String,
    #[serde(default)]
    packets: u64,
    #[serde(default)]
    bytes: u64,
}

/// The objects the schema cannot read whole that are read here another way.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Partly {
    Rule(RulePlace),
    Counter(WideCounter),
}

impl Listing {
    /// Reads what `nft -j list ...` printed.
    pub fn parse(json: &[u8]) -> serde_json::Result<Self> {
        let doc: Document = serde_json::from_slice(json)?;
        Ok(Self::of_objects(doc.nftables))
    }

    /// Reads a document already parsed as JSON.
    pub fn from_value(v: serde_json::Value) -> serde_json::Result<Self> {
        let doc: Document = serde_json::from_value(v)?;
        Ok(Self::of_objects(doc.nftables))
    }

    fn of_objects(objects: Vec<serde_json::Value>) -> Self {
        let mut out = Self::default();
        for mut o in objects {
            if let Ok(obj) = serde_json::from_value::<NfObject<'static>>(o.clone()) {
                if let NfObject::ListObject(l) = obj {
                    out.push(l);
                }
                continue;
            }
            match serde_json::from_value::<Partly>(o.clone()) {
                Ok(Partly::Rule(p)) => out.rules.push(ListedRule::read(p)),
                Ok(Partly::Counter(c)) => out.counters.push(CounterValues {
                    family: c.family,
                    table: c.table,
                    name: c.name,
                    packets: c.packets,
                    bytes: c.bytes,
                }),
                Err(_) => {
                    // A map whose values the schema cannot read as nft prints them: a
                    // verdict map (the schema has no `verdict` type, and `mark` stands in
                    // for it where the agent writes one: see `nft::encode`), or values that
                    // are a concatenation (printed `a . b`, read as `["a", "b"]`).
                    if let Some(ty) = o.pointer_mut("/map/map")
                        && let Some(text) = ty.as_str()
                    {
                        *ty = if text == "verdict" {
                            "mark".into()
                        } else {
                            text.split(" . ").collect::<Vec<_>>().into()
                        };
                        if let Ok(NfObject::ListObject(l)) = serde_json::from_value(o) {
                            out.push(l);
                        }
                    }
                }
            }
        }
        out
    }

    fn push(&mut self, o: NfListObject<'static>) {
        match o {
            NfListObject::Rule(rule) => self.rules.push(ListedRule {
                rule,
                unread: Vec::new(),
            }),
            NfListObject::Counter(c) => self.counters.push(CounterValues::of(&c)),
            o => self.objects.push(o),
        }
    }

    /// Adds `other`'s objects (another table's listing).
    pub fn extend(&mut self, other: Self) {
        self.objects.extend(other.objects);
        self.rules.extend(other.rules);
        self.counters.extend(other.counters);
    }

    /// The chains listed.
    pub fn chains(&self) -> impl Iterator<Item = &nftables::schema::Chain<'static>> {
        self.objects.iter().filter_map(|o| match o {
            NfListObject::Chain(c) => Some(c),
            _ => None,
        })
    }
}

impl CounterValues {
    fn of(c: &Counter<'_>) -> Self {
        Self {
            family: c.family,
            table: c.table.to_string(),
            name: c.name.to_string(),
            packets: c.packets.map_or(0, u64::from),
            bytes: c.bytes.map_or(0, u64::from),
        }
    }
}

impl ListedRule {
    fn read(p: RulePlace) -> Self {
        let mut expr = Vec::new();
        let mut unread = Vec::new();
        for s in p.expr {
            match serde_json::from_value::<Statement<'static>>(s.clone()) {
                Ok(s) => expr.push(s),
                Err(_) => unread.push(s),
            }
        }
        Self {
            rule: Rule {
                family: p.family,
                table: p.table.into(),
                chain: p.chain.into(),
                expr: expr.into(),
                handle: p.handle,
                index: None,
                comment: p.comment.map(Cow::Owned),
            },
            unread,
        }
    }

    /// Every statement in the rule and in what it holds (the verdicts of an anonymous
    /// verdict map, a meter's statement), each statement that could not be read searched
    /// for statements the schema reads; `f` is called on each.
    pub fn walk(&self, f: &mut impl FnMut(&Statement<'_>)) {
        for s in self.rule.expr.iter() {
            walk_statement(s, f);
        }
        for v in &self.unread {
            walk_unread(v, f);
        }
    }
}

/// The verdict a verdict expression stands for, as a statement.
fn verdict_statement<'a>(v: &Verdict<'a>) -> Statement<'a> {
    match v {
        Verdict::Accept => Statement::Accept(None),
        Verdict::Drop => Statement::Drop(None),
        Verdict::Continue => Statement::Continue(None),
        Verdict::Return => Statement::Return(None),
        Verdict::Jump(t) => Statement::Jump(t.clone()),
        Verdict::Goto(t) => Statement::Goto(t.clone()),
    }
}

fn walk_statement(s: &Statement<'_>, f: &mut impl FnMut(&Statement<'_>)) {
    f(s);
    match s {
        Statement::VerdictMap(m) => walk_expression(&m.data, f),
        Statement::Meter(m) => walk_statement(&m.stmt, f),
        _ => {}
    }
}

fn walk_expression(e: &Expression<'_>, f: &mut impl FnMut(&Statement<'_>)) {
    match e {
        Expression::Verdict(v) => f(&verdict_statement(v)),
        Expression::List(items) => items.iter().for_each(|x| walk_expression(x, f)),
        Expression::Named(NamedExpression::Set(items)) => {
            for i in items {
                match i {
                    SetItem::Element(x) => walk_expression(x, f),
                    SetItem::Mapping(k, v) => {
                        walk_expression(k, f);
                        walk_expression(v, f);
                    }
                    SetItem::MappingStatement(k, s) => {
                        walk_expression(k, f);
                        walk_statement(s, f);
                    }
                }
            }
        }
        Expression::Named(NamedExpression::Map(m)) => walk_expression(&m.data, f),
        _ => {}
    }
}

/// A statement the schema could not read: every part of it that reads as a statement.
fn walk_unread(v: &serde_json::Value, f: &mut impl FnMut(&Statement<'_>)) {
    match v {
        serde_json::Value::Object(o) => {
            if let Ok(s) = serde_json::from_value::<Statement<'static>>(v.clone()) {
                walk_statement(&s, f);
                return;
            }
            o.values().for_each(|x| walk_unread(x, f));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk_unread(x, f)),
        _ => {}
    }
}

/// A family as nft names it.
pub fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_schema_cannot_read_is_read_another_way() {
        let text = br#"{"nftables": [
          {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"table": {"family": "inet", "name": "t", "handle": 1}},
          {"chain": {"family": "inet", "table": "t", "name": "c", "handle": 2}},
          {"map": {"family": "inet", "table": "t", "name": "m", "type": "ipv4_addr", "map": "verdict",
                   "elem": [["10.0.0.1", {"jump": {"target": "c"}}]]}},
          {"map": {"family": "inet", "table": "t", "name": "d", "type": ["inet_proto", "inet_service"],
                   "map": "ipv4_addr . inet_service",
                   "elem": [[{"concat": ["tcp", 80]}, {"concat": ["10.0.0.2", 8080]}]]}},
          {"counter": {"family": "inet", "table": "t", "name": "big", "packets": 7, "bytes": 8589934592}},
          {"counter": {"family": "inet", "table": "t", "name": "small", "packets": 3, "bytes": 5}},
          {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 4,
                    "expr": [{"no such statement": {"x": {"drop": null}}}, {"accept": null}]}}
        ]}"#;
        let l = Listing::parse(text).unwrap();
        let maps: Vec<_> = l
            .objects
            .iter()
            .filter_map(|o| match o {
                NfListObject::Map(m) => Some(m.elem.as_ref().map_or(0, |e| e.len())),
                _ => None,
            })
            .collect();
        assert_eq!(maps, vec![1, 1]);
        assert_eq!(l.counters.len(), 2);
        assert_eq!(l.counters[0].bytes, 8_589_934_592);
        assert_eq!(l.counters[1].packets, 3);
        let r = &l.rules[0];
        assert_eq!((r.rule.chain.as_ref(), r.rule.handle), ("c", Some(4)));
        assert_eq!(r.rule.expr.len(), 1);
        assert_eq!(r.unread.len(), 1);
        let (mut drop, mut accept) = (false, false);
        r.walk(&mut |s| {
            drop |= matches!(s, Statement::Drop(_));
            accept |= matches!(s, Statement::Accept(_));
        });
        assert!(drop && accept);
    }
}
