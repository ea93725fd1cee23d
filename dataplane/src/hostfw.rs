//! What the host's own firewall does that the agent must respect, read from the ruleset
//! (`nft -j list ruleset`, which shows iptables-nft rules too, and `iptables-legacy -S` where
//! legacy tables are in use).
//!
//! - A **stateful `INPUT` policy** (a drop policy, or a drop/reject rule reachable from an
//!   input base chain: ufw, firewalld, `ct state established accept` then drop) would drop
//!   untracked replies to host clients; where one is found, host clients' connections stay
//!   tracked (see `notrack`).
//! - **Operator rules in `DOCKER-USER`** that could apply to traffic between containers
//!   (anything but `RETURN` and rules tied to a non-Docker interface): container clients
//!   are then left to Docker's own path, so those rules see exactly what they see without
//!   the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use nftables::{
    expr::{Expression, Meta, MetaKey, NamedExpression},
    schema::Chain,
    stmt::{Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfHook},
};
use serde::Deserialize;

use crate::netfilter::{
    changes::{ChainId, Changes, is_own_table},
    listing::{ListedRule, Listing, family_name},
    nft,
};

/// What was found; `None` fields mean nothing in the way.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFirewall {
    /// Where a stateful `INPUT` policy was found.
    pub stateful_input: Option<String>,
    /// Where operator rules that may concern container traffic were found.
    pub forward_rules: Option<String>,
    /// Where operator rules that may concern external clients' traffic to containers were
    /// found (as `forward_rules`, rules tied to a non-Docker interface included): the
    /// packet layer, whose packets skip them, stands back while there are any.
    #[serde(default)]
    pub external_rules: Option<String>,
}

/// The live ruleset, as read (blocking: runs `nft` and, where legacy tables are in use,
/// `iptables-legacy`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    nft: Option<Listing>,
    legacy: Vec<(&'static str, String)>,
    /// The chains whose rules the evaluation reads (see [`watched_chains`]).
    watched: BTreeSet<ChainId>,
    /// The agent's own table (family inet), whose changes are not the host's.
    own_table: String,
    /// `nft` was asked and gave no ruleset (a snapshot never taken is not that).
    failed: bool,
}

/// Reads the live ruleset; `own_table` is the agent's table (family inet).
pub fn capture(own_table: &str) -> Snapshot {
    let nft = nft::list_ruleset().ok();
    let mut legacy = Vec::new();
    if legacy_filter_in_use() {
        for tool in ["iptables-legacy", "ip6tables-legacy"] {
            if let Some(text) = Command::new(tool)
                .args(["-w", "-t", "filter", "-S"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            {
                legacy.push((tool, text));
            }
        }
    }
    let watched = nft
        .as_ref()
        .map(|v| watched_chains(v, own_table))
        .unwrap_or_default();
    Snapshot {
        failed: nft.is_none(),
        nft,
        legacy,
        watched,
        own_table: own_table.to_string(),
    }
}

impl Snapshot {
    /// Whether `changes` may change what [`Snapshot::evaluate`] finds: a rule changed in a
    /// chain it reads, or the ruleset's shape changed (or it could not be read).
    pub fn concerned_by(&self, changes: &Changes) -> bool {
        self.nft.is_none() || changes.touches_any(&self.watched, &self.own_table)
    }

    /// `bridges`: Docker's bridge interfaces; `own_table`: the agent's table (family inet),
    /// which is not the operator's.
    pub fn evaluate(&self, bridges: &BTreeSet<String>, own_table: &str) -> HostFirewall {
        // A ruleset that could not be read may hold anything: the agent stands back.
        let unread = || Some("the ruleset could not be read (`nft -j list ruleset`)".to_string());
        let mut fw = if self.failed {
            HostFirewall {
                stateful_input: unread(),
                forward_rules: unread(),
                external_rules: unread(),
            }
        } else {
            self.nft
                .as_ref()
                .map(|v| from_listing(v, bridges, own_table))
                .unwrap_or_default()
        };
        for (tool, text) in &self.legacy {
            let l = from_iptables_save(text, bridges, tool);
            fw.stateful_input = fw.stateful_input.or(l.stateful_input);
            fw.forward_rules = fw.forward_rules.or(l.forward_rules);
            fw.external_rules = fw.external_rules.or(l.external_rules);
        }
        fw
    }
}

/// Whether legacy iptables filter tables exist (then the ruleset is more than nftables).
pub fn legacy_filter_in_use() -> bool {
    ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|s| s.lines().any(|l| l == "filter")))
}

/// The chains whose rules decide the evaluation: input base chains (filter type) and every
/// chain they reach by `jump` or `goto`, forward base chains outside Docker's and the
/// agent's tables, and `DOCKER-USER`. Docker's per-container rules (`DOCKER` in nat and
/// filter, raw `PREROUTING`) are in none of them.
pub fn watched_chains(v: &Listing, own_table: &str) -> BTreeSet<ChainId> {
    let mut jumps: BTreeMap<ChainId, Vec<String>> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut todo = Vec::new();
    for c in v.chains() {
        let cid = chain_id(c);
        if is_own_table(&cid.0, &cid.1, own_table) {
            continue;
        }
        if is_input_base(c) {
            todo.push(cid.clone());
        }
        if is_operator_forward_base(c, own_table) || cid.2 == "DOCKER-USER" {
            out.insert(cid);
        }
    }
    for r in &v.rules {
        jumps
            .entry(rule_chain(r))
            .or_default()
            .extend(jump_targets(r));
    }
    while let Some(cid) = todo.pop() {
        if !out.insert(cid.clone()) {
            continue;
        }
        for t in jumps.get(&cid).into_iter().flatten() {
            todo.push((cid.0.clone(), cid.1.clone(), t.clone()));
        }
    }
    // And the operator's chains its forward base chains reach.
    out.extend(reached_from(
        v,
        operator_forward_bases(v, own_table),
        |_| true,
    ));
    out
}

/// An input base chain of filter type: where a stateful INPUT policy is looked for.
fn is_input_base(c: &Chain<'_>) -> bool {
    c.hook == Some(NfHook::Input) && c._type.unwrap_or(NfChainType::Filter) == NfChainType::Filter
}

/// Docker 29's nftables backend's tables (`ip` and `ip6`).
fn is_dockers_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6") && table == "docker-bridges"
}

/// A forward base chain outside Docker's tables and the agent's own: the operator's.
fn is_operator_forward_base(c: &Chain<'_>, own_table: &str) -> bool {
    let family = family_name(c.family);
    c.hook == Some(NfHook::Forward)
        && !is_own_table(family, &c.table, own_table)
        && !is_dockers_table(family, &c.table)
}

/// The operator's forward base chains.
fn operator_forward_bases(v: &Listing, own_table: &str) -> BTreeSet<ChainId> {
    v.chains()
        .filter(|c| is_operator_forward_base(c, own_table))
        .map(chain_id)
        .collect()
}

/// Docker's own chains (iptables, every engine): what they hold is Docker's.
const DOCKERS_CHAINS: &[&str] = &[
    "DOCKER",
    "DOCKER-USER",
    "DOCKER-FORWARD",
    "DOCKER-BRIDGE",
    "DOCKER-CT",
    "DOCKER-INTERNAL",
    "DOCKER-INGRESS",
    "DOCKER-ISOLATION-STAGE-1",
    "DOCKER-ISOLATION-STAGE-2",
];

/// Every jump or goto target anywhere in a rule (verdict maps included).
fn all_jump_targets(r: &ListedRule) -> Vec<String> {
    let mut out = Vec::new();
    r.walk(&mut |s| {
        if let Statement::Jump(t) | Statement::Goto(t) = s {
            out.push(t.target.to_string());
        }
    });
    out
}

/// `starts` and the chains of their tables they reach through rules that `follow` admits,
/// but for Docker's own chains (`DOCKER-USER` is read on its own).
fn reached_from(
    v: &Listing,
    starts: BTreeSet<ChainId>,
    follow: impl Fn(&ListedRule) -> bool,
) -> BTreeSet<ChainId> {
    let mut rules: BTreeMap<ChainId, Vec<&ListedRule>> = BTreeMap::new();
    for r in &v.rules {
        rules.entry(rule_chain(r)).or_default().push(r);
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<ChainId> = starts.into_iter().collect();
    while let Some(cid) = todo.pop() {
        if !seen.insert(cid.clone()) {
            continue;
        }
        for r in rules.get(&cid).into_iter().flatten() {
            if !follow(r) {
                continue;
            }
            for t in all_jump_targets(r) {
                if !DOCKERS_CHAINS.contains(&t.as_str()) {
                    todo.push((cid.0.clone(), cid.1.clone(), t));
                }
            }
        }
    }
    seen
}

/// The chains a rule jumps or goes to (its own statements, not a verdict map's).
fn jump_targets(r: &ListedRule) -> impl Iterator<Item = String> + '_ {
    r.rule.expr.iter().filter_map(|s| match s {
        Statement::Jump(t) | Statement::Goto(t) => Some(t.target.to_string()),
        _ => None,
    })
}

/// (family, table, name) of a chain.
fn chain_id(c: &Chain<'_>) -> ChainId {
    (
        family_name(c.family).to_string(),
        c.table.to_string(),
        c.name.to_string(),
    )
}

/// (family, table, chain) of a rule.
fn rule_chain(r: &ListedRule) -> ChainId {
    (
        family_name(r.rule.family).to_string(),
        r.rule.table.to_string(),
        r.rule.chain.to_string(),
    )
}

/// A rule's handle as nft prints it (`null` where the listing has none).
fn handle(r: &ListedRule) -> String {
    r.rule
        .handle
        .map_or_else(|| "null".to_string(), |h| h.to_string())
}

/// An iptables-nft `xt` statement's target or match name.
#[derive(Deserialize)]
struct Xt {
    name: String,
}

/// A statement the schema could not read, by its kind only.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Drop(serde::de::IgnoredAny),
    Reject(serde::de::IgnoredAny),
    Queue(serde::de::IgnoredAny),
}

/// Whether a rule may drop a packet: a drop or a reject anywhere in it (a verdict map's
/// verdicts, iptables-nft's `DROP` and `REJECT` targets included), and with `queue` a
/// queue too (the program it hands packets to may drop them).
fn may_drop(r: &ListedRule, queue: bool) -> bool {
    let named = |n: &str| {
        let n = n.to_ascii_lowercase();
        n == "drop" || n == "reject" || (queue && n == "queue")
    };
    let mut found = false;
    r.walk(&mut |s| {
        found |= match s {
            Statement::Drop(_) | Statement::Reject(_) => true,
            Statement::Queue(_) => queue,
            Statement::XT(Some(v)) => {
                serde_json::from_value::<Xt>(v.clone()).is_ok_and(|x| named(&x.name))
            }
            _ => false,
        };
    });
    found || r.unread.iter().any(|v| unread_drops(v, queue))
}

/// Whether a statement the schema could not read holds a drop, a reject (or a queue).
fn unread_drops(v: &serde_json::Value, queue: bool) -> bool {
    match serde_json::from_value::<Kind>(v.clone()) {
        Ok(Kind::Drop(_) | Kind::Reject(_)) => true,
        Ok(Kind::Queue(_)) => queue,
        Err(_) => match v {
            serde_json::Value::Array(a) => a.iter().any(|x| unread_drops(x, queue)),
            serde_json::Value::Object(o) => o.values().any(|x| unread_drops(x, queue)),
            _ => false,
        },
    }
}

/// The interface a statement matches exactly (`iifname "eth0"`, `oifname "docker0"`), with
/// its key.
fn interface_match<'a>(s: &'a Statement<'_>) -> Option<(MetaKey, &'a str)> {
    let Statement::Match(m) = s else {
        return None;
    };
    let (
        Expression::Named(NamedExpression::Meta(Meta {
            key: key @ (MetaKey::Iifname | MetaKey::Oifname),
        })),
        Operator::EQ,
        Expression::String(name),
    ) = (&m.left, m.op, &m.right)
    else {
        return None;
    };
    Some((*key, name))
}

/// From the ruleset nft lists (`nft -j list ruleset`).
pub fn from_listing(v: &Listing, bridges: &BTreeSet<String>, own_table: &str) -> HostFirewall {
    let mut rules: BTreeMap<ChainId, Vec<&ListedRule>> = BTreeMap::new();
    for r in &v.rules {
        rules.entry(rule_chain(r)).or_default().push(r);
    }
    let mut input_bases = Vec::new();
    for c in v.chains() {
        let cid = chain_id(c);
        if is_own_table(&cid.0, &cid.1, own_table) || !is_input_base(c) {
            continue;
        }
        if c.policy == Some(NfChainPolicy::Drop) {
            let (f, t, n) = &cid;
            return HostFirewall {
                stateful_input: Some(format!("{f} {t} {n}: policy drop")),
                forward_rules: forward_rules_nft(v, bridges, true, own_table),
                external_rules: forward_rules_nft(v, bridges, false, own_table),
            };
        }
        input_bases.push(cid);
    }
    let mut stateful = None;
    'bases: for base in input_bases {
        let mut seen = BTreeSet::new();
        let mut todo = vec![base.2.clone()];
        while let Some(name) = todo.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let cid = (base.0.clone(), base.1.clone(), name);
            for r in rules.get(&cid).into_iter().flatten() {
                // Native verdicts, and iptables-nft's `xt` targets (`REJECT`).
                if may_drop(r, false) {
                    let (f, t, n) = &cid;
                    stateful = Some(format!(
                        "{f} {t} {n}: a drop or reject rule, handle {}",
                        handle(r)
                    ));
                    break 'bases;
                }
                todo.extend(jump_targets(r));
            }
        }
    }
    HostFirewall {
        stateful_input: stateful,
        forward_rules: forward_rules_nft(v, bridges, true, own_table),
        external_rules: forward_rules_nft(v, bridges, false, own_table),
    }
}

/// Whether a rule only matches packets in or out of an interface that is not a Docker
/// bridge (`iifname "eth0"`): such a rule never sees traffic between containers.
fn tied_to_other_interface(r: &ListedRule, bridges: &BTreeSet<String>) -> bool {
    r.rule
        .expr
        .iter()
        .filter_map(interface_match)
        .any(|(_, name)| !name.is_empty() && !name.contains('*') && !bridges.contains(name))
}

/// Docker's own rule for a network with inter-container communication off (`enable_icc`
/// false, and Swarm's `docker_gwbridge`): `iifname B oifname B drop` for one of its
/// bridges, in `FORWARD` itself (Docker 20.10 to 27). It only concerns traffic within that
/// network, which the agent leaves to Docker there anyway.
fn dockers_icc_drop(r: &ListedRule, bridges: &BTreeSet<String>) -> bool {
    if !r.unread.is_empty() {
        return false;
    }
    let mut names = BTreeSet::new();
    let mut keys = Vec::new();
    let mut drop = false;
    for s in r.rule.expr.iter() {
        match s {
            Statement::Counter(_) => {}
            Statement::Drop(_) => drop = true,
            s => match interface_match(s) {
                Some((key, name)) => {
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                    names.insert(name);
                }
                None => return false,
            },
        }
    }
    drop && keys.len() == 2 && names.len() == 1 && names.iter().all(|n| bridges.contains(*n))
}

/// Operator rules that may concern container traffic: in `DOCKER-USER`, or drop/reject
/// rules in a forward base chain of the operator's (iptables `FORWARD` rules that are not
/// Docker's jumps or Docker's own drops, or a table of the operator's own, as with Docker
/// 29's nftables backend, which has no `DOCKER-USER`). With `between` (container clients),
/// rules tied to another interface than Docker's `bridges` do not count (traffic between
/// containers never matches them); without, every rule does (external clients' traffic
/// may).
fn forward_rules_nft(
    v: &Listing,
    docker_bridges: &BTreeSet<String>,
    between: bool,
    own_table: &str,
) -> Option<String> {
    let bridges = between.then_some(docker_bridges);
    if let Some(w) = docker_user_nft(v, bridges) {
        return Some(w);
    }
    // The operator's chains its forward base chains reach (by jump, goto, verdict map);
    // for container clients not through a rule tied to another interface than Docker's.
    let reached = reached_from(v, operator_forward_bases(v, own_table), |r| {
        bridges.is_none_or(|b| !tied_to_other_interface(r, b))
    });
    for r in &v.rules {
        let id = rule_chain(r);
        if !reached.contains(&id) {
            continue;
        }
        // A queue hands packets to a program that may drop them (an inline IPS).
        if !may_drop(r, true)
            || bridges.is_some_and(|b| tied_to_other_interface(r, b))
            || dockers_icc_drop(r, docker_bridges)
        {
            continue;
        }
        let (f, t, c) = &id;
        return Some(format!(
            "{f} {t} {c}, rule handle {} (`nft -a list chain {f} {t} {c}`)",
            handle(r)
        ));
    }
    None
}

/// The first rule of a `DOCKER-USER` chain that may concern container traffic.
fn docker_user_nft(v: &Listing, bridges: Option<&BTreeSet<String>>) -> Option<String> {
    for r in &v.rules {
        if r.rule.chain != "DOCKER-USER" {
            continue;
        }
        let only_return = r.unread.is_empty()
            && r.rule
                .expr
                .iter()
                .all(|s| matches!(s, Statement::Counter(_) | Statement::Return(_)));
        if only_return || bridges.is_some_and(|b| tied_to_other_interface(r, b)) {
            continue;
        }
        let (f, t, _) = rule_chain(r);
        return Some(format!(
            "{f} {t} DOCKER-USER, rule handle {} (`nft -a list chain {f} {t} DOCKER-USER`)",
            handle(r),
        ));
    }
    None
}

/// From `iptables-save`-style `-S` output of one table (legacy iptables).
pub fn from_iptables_save(text: &str, bridges: &BTreeSet<String>, tool: &str) -> HostFirewall {
    let mut rules: BTreeMap<&str, Vec<Vec<&str>>> = BTreeMap::new();
    let mut input_drop = false;
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["-P", "INPUT", "DROP"] => input_drop = true,
            ["-A", chain, rest @ ..] => rules.entry(chain).or_default().push(rest.to_vec()),
            _ => {}
        }
    }
    let mut fw = HostFirewall::default();
    if input_drop {
        fw.stateful_input = Some(format!("{tool} INPUT: policy DROP"));
    } else {
        let mut seen = BTreeSet::new();
        let mut todo = vec!["INPUT"];
        while let Some(c) = todo.pop() {
            if !seen.insert(c) {
                continue;
            }
            for r in rules.get(c).into_iter().flatten() {
                match legacy_target(r) {
                    Some("DROP" | "REJECT") => {
                        fw.stateful_input = Some(format!("{tool} {c}: {}", r.join(" ")));
                    }
                    Some(t) if rules.contains_key(t) => todo.push(t),
                    _ => {}
                }
            }
        }
    }
    let other_iface = |r: &[&str]| {
        r.windows(2).enumerate().any(|(i, w)| {
            (w[0] == "-i" || w[0] == "-o")
                && (i == 0 || r[i - 1] != "!")
                && !w[1].ends_with('+')
                && !bridges.contains(w[1])
        })
    };
    // Docker's own drop for a network with inter-container communication off.
    let icc = |r: &[&str]| matches!(r, ["-i", a, "-o", b, "-j", "DROP"] if a == b && bridges.contains(*a));
    fw.forward_rules = legacy_forward_rules(&rules, tool, |r| other_iface(r) || icc(r));
    fw.external_rules = legacy_forward_rules(&rules, tool, icc);
    fw
}

/// A legacy rule's target (`-j` or `-g`).
fn legacy_target<'a>(r: &[&'a str]) -> Option<&'a str> {
    r.iter()
        .position(|w| *w == "-j" || *w == "-g")
        .and_then(|i| r.get(i + 1))
        .copied()
}

/// The first rule of `DOCKER-USER`, then the first drop in `FORWARD` or in a chain of the
/// operator's it reaches (Docker's jumps and accepts are not drops; an operator's drop or
/// queue is), that `exempt` does not exempt (a jump it exempts is not followed).
fn legacy_forward_rules(
    rules: &BTreeMap<&str, Vec<Vec<&str>>>,
    tool: &str,
    exempt: impl Fn(&[&str]) -> bool,
) -> Option<String> {
    for r in rules.get("DOCKER-USER").into_iter().flatten() {
        if r.as_slice() == ["-j", "RETURN"] || exempt(r) {
            continue;
        }
        return Some(format!("{tool} DOCKER-USER: {}", r.join(" ")));
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["FORWARD"];
    while let Some(chain) = todo.pop() {
        if !seen.insert(chain) {
            continue;
        }
        for r in rules.get(chain).into_iter().flatten() {
            match legacy_target(r) {
                Some("DROP" | "REJECT" | "NFQUEUE" | "QUEUE") if !exempt(r) => {
                    return Some(format!("{tool} {chain}: {}", r.join(" ")));
                }
                Some(t) if rules.contains_key(t) && !DOCKERS_CHAINS.contains(&t) && !exempt(r) => {
                    todo.push(t);
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// A ruleset as nft lists it, read.
    fn read(v: &Value) -> Listing {
        Listing::from_value(v.clone()).expect("a ruleset")
    }

    fn bridges() -> BTreeSet<String> {
        ["docker0".to_string(), "br-0123456789ab".to_string()].into()
    }

    fn chain(family: &str, table: &str, name: &str, hook: Option<&str>, policy: &str) -> Value {
        let mut c = json!({"family": family, "table": table, "name": name});
        if let Some(h) = hook {
            c["hook"] = json!(h);
            c["type"] = json!("filter");
            c["policy"] = json!(policy);
        }
        json!({ "chain": c })
    }

    fn rule(family: &str, table: &str, chain: &str, expr: &Value) -> Value {
        json!({"rule": {"family": family, "table": table, "chain": chain, "expr": expr}})
    }

    #[test]
    fn the_chains_read_are_watched_and_dockers_per_container_chains_are_not() {
        let v = json!({"nftables": [
            chain("ip", "filter", "INPUT", Some("input"), "accept"),
            rule("ip", "filter", "INPUT", &json!([{"jump": {"target": "ufw-before-input"}}])),
            chain("ip", "filter", "ufw-before-input", None, ""),
            rule("ip", "filter", "ufw-before-input", &json!([{"goto": {"target": "ufw-deny"}}])),
            chain("ip", "filter", "ufw-deny", None, ""),
            chain("ip", "filter", "FORWARD", Some("forward"), "drop"),
            rule("ip", "filter", "FORWARD", &json!([{"jump": {"target": "DOCKER-FORWARD"}}])),
            chain("ip", "filter", "DOCKER-FORWARD", None, ""),
            chain("ip", "filter", "DOCKER", None, ""),
            chain("ip", "filter", "DOCKER-USER", None, ""),
            chain("ip", "nat", "DOCKER", None, ""),
            chain("ip", "docker-bridges", "filter-FORWARD", Some("forward"), "accept"),
            chain("inet", "dataplane", "input", Some("input"), "accept"),
        ]});
        let w = watched_chains(&read(&v), "dataplane");
        let c = |t: &str, n: &str| ("ip".to_string(), t.to_string(), n.to_string());
        let want: BTreeSet<ChainId> = [
            c("filter", "INPUT"),
            c("filter", "ufw-before-input"),
            c("filter", "ufw-deny"),
            c("filter", "FORWARD"),
            c("filter", "DOCKER-USER"),
        ]
        .into();
        assert_eq!(w, want);
        let snap = Snapshot {
            nft: Some(read(&v)),
            legacy: Vec::new(),
            watched: w,
            own_table: "dataplane".into(),
            failed: false,
        };
        // A ruleset that could not be read: everything stands back, said.
        let unread = Snapshot {
            failed: true,
            ..Snapshot::default()
        }
        .evaluate(&bridges(), "dataplane");
        assert!(unread.forward_rules.unwrap().contains("could not be read"));
        assert!(unread.stateful_input.is_some() && unread.external_rules.is_some());
        let mut docker_start = Changes::default();
        docker_start.chains.insert(c("nat", "DOCKER"));
        docker_start.chains.insert(c("filter", "DOCKER"));
        docker_start.chains.insert(c("raw", "PREROUTING"));
        assert!(!snap.concerned_by(&docker_start));
        let mut operator = Changes::default();
        operator.chains.insert(c("filter", "ufw-deny"));
        assert!(snap.concerned_by(&operator));
        // Not read yet: every change counts.
        assert!(Snapshot::default().concerned_by(&docker_start));
    }

    #[test]
    fn docker_alone_is_neither_stateful_nor_operator_rules() {
        let v = json!({"nftables": [
            chain("ip", "filter", "INPUT", Some("input"), "accept"),
            chain("ip", "filter", "FORWARD", Some("forward"), "drop"),
            chain("ip", "filter", "DOCKER-ISOLATION-STAGE-2", None, ""),
            rule("ip", "filter", "DOCKER-ISOLATION-STAGE-2",
                 &json!([{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"drop": null}])),
            chain("ip", "filter", "DOCKER-USER", None, ""),
            rule("ip", "filter", "DOCKER-USER", &json!([{"counter": {"packets": 0, "bytes": 0}}, {"return": null}])),
            // Our own tables never count: the notrack table and the egress table, whose
            // base chains drop what a policy denies.
            chain("inet", "dataplane", "input", Some("input"), "drop"),
            chain("inet", "dataplane_egress", "input", Some("input"), "accept"),
            rule("inet", "dataplane_egress", "input", &json!([{"drop": null}])),
            chain("inet", "dataplane_egress", "forward", Some("forward"), "accept"),
            rule("inet", "dataplane_egress", "forward", &json!([{"drop": null}])),
        ]});
        assert_eq!(
            from_listing(&read(&v), &bridges(), "dataplane"),
            HostFirewall::default()
        );
    }

    #[test]
    fn stateful_input_policies_are_found() {
        let policy = json!({"nftables": [chain("inet", "filter", "input", Some("input"), "drop")]});
        assert!(
            from_listing(&read(&policy), &bridges(), "dataplane")
                .stateful_input
                .is_some()
        );
        // ufw-style: accept policy, a jump to a chain that ends in a drop.
        let jumped = json!({"nftables": [
            chain("ip", "filter", "INPUT", Some("input"), "accept"),
            rule("ip", "filter", "INPUT", &json!([{"jump": {"target": "ufw-before-input"}}])),
            chain("ip", "filter", "ufw-before-input", None, ""),
            rule("ip", "filter", "ufw-before-input", &json!([{"reject": null}])),
        ]});
        let fw = from_listing(&read(&jumped), &bridges(), "dataplane");
        assert!(fw.stateful_input.unwrap().contains("ufw-before-input"));
        let xt = json!({"nftables": [
            chain("ip", "filter", "INPUT", Some("input"), "accept"),
            rule("ip", "filter", "INPUT", &json!([{"xt": {"type": "target", "name": "REJECT"}}])),
        ]});
        assert!(
            from_listing(&read(&xt), &bridges(), "dataplane")
                .stateful_input
                .is_some()
        );
    }

    #[test]
    fn docker_user_rules_on_other_interfaces_do_not_concern_containers() {
        let v = json!({"nftables": [
            rule("ip", "filter", "DOCKER-USER",
                 &json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"drop": null}])),
        ]});
        let fw = from_listing(&read(&v), &bridges(), "dataplane");
        assert_eq!(fw.forward_rules, None);
        // External clients' packets come in on eth0: the packet layer must step aside.
        assert!(fw.external_rules.unwrap().contains("DOCKER-USER"));
        let v = json!({"nftables": [
            rule("ip", "filter", "DOCKER-USER",
                 &json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"drop": null}])),
        ]});
        assert!(
            from_listing(&read(&v), &bridges(), "dataplane")
                .forward_rules
                .is_some()
        );
        let v = json!({"nftables": [
            rule("ip", "filter", "DOCKER-USER", &json!([{"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"drop": null}])),
        ]});
        assert!(
            from_listing(&read(&v), &bridges(), "dataplane")
                .forward_rules
                .is_some()
        );
    }

    #[test]
    fn drops_in_the_operators_forward_chains_concern_containers() {
        let base = |family: &str, table: &str, name: &str| {
            let mut c = chain(family, table, name, Some("forward"), "drop");
            c["chain"]["hook"] = json!("forward");
            c
        };
        // Docker's own FORWARD: jumps to its chains and accepts; the drop policy is Docker's.
        let docker = json!({"nftables": [
            base("ip", "filter", "FORWARD"),
            rule("ip", "filter", "FORWARD", &json!([{"jump": {"target": "DOCKER-USER"}}])),
            rule("ip", "filter", "FORWARD", &json!([{"jump": {"target": "DOCKER-ISOLATION-STAGE-1"}}])),
            rule("ip", "filter", "FORWARD", &json!([{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"accept": null}])),
            // An operator's drop for the uplink only.
            rule("ip", "filter", "FORWARD", &json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"drop": null}])),
        ]});
        assert_eq!(
            from_listing(&read(&docker), &bridges(), "dataplane").forward_rules,
            None
        );
        // Docker's own drop for a network with inter-container communication off (and
        // Swarm's docker_gwbridge): Docker's, not an operator's, for either kind of client.
        let icc = |b: &str| {
            rule(
                "ip",
                "filter",
                "FORWARD",
                &json!([
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": b}},
                    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": b}},
                    {"counter": {"packets": 0, "bytes": 0}},
                    {"drop": null}
                ]),
            )
        };
        let hardened = json!({"nftables": [base("ip", "filter", "FORWARD"), icc("docker0")]});
        let fw = from_listing(&read(&hardened), &bridges(), "dataplane");
        assert_eq!((fw.forward_rules, fw.external_rules), (None, None));
        // The same shape for an interface that is not Docker's is an operator's.
        let other = json!({"nftables": [base("ip", "filter", "FORWARD"), icc("br-lan")]});
        let fw = from_listing(&read(&other), &bridges(), "dataplane");
        assert!(fw.external_rules.is_some());
        // An operator's own table (Docker 29 has no DOCKER-USER).
        let own = json!({"nftables": [
            base("inet", "operator", "fwd"),
            rule("inet", "operator", "fwd", &json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.17.0.5"}}, {"drop": null}])),
        ]});
        let fw = from_listing(&read(&own), &bridges(), "dataplane");
        assert!(fw.forward_rules.unwrap().contains("inet operator fwd"));
    }

    fn walk(v: &Value, f: &mut impl FnMut(&str)) {
        match v {
            Value::String(s) => f(s),
            Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
            Value::Object(o) => o.values().for_each(|x| walk(x, f)),
            _ => {}
        }
    }

    /// Docker's own rulesets as each engine writes them (`nft -j list ruleset` with Docker
    /// alone: a network with ICC off, an internal network, a plain one; the fixtures'
    /// README says how they were taken): nothing in them is an operator's.
    #[test]
    fn dockers_own_rules_on_every_engine_are_not_an_operators() {
        for (engine, text) in [
            (
                "20.10",
                include_str!("../tests/fixtures/ruleset-20.10.json"),
            ),
            ("28.5", include_str!("../tests/fixtures/ruleset-28.5.json")),
            (
                "29 iptables",
                include_str!("../tests/fixtures/ruleset-29-iptables.json"),
            ),
            (
                "29 nftables",
                include_str!("../tests/fixtures/ruleset-29-nft.json"),
            ),
        ] {
            let v: Value = serde_json::from_str(text).expect("a ruleset");
            // Docker's bridges: every interface its rules name.
            let mut bridges = BTreeSet::new();
            let mut find = |s: &str| {
                if s == "docker0" || s.starts_with("br-") {
                    bridges.insert(s.to_string());
                }
            };
            walk(&v, &mut find);
            assert!(bridges.len() >= 4, "{engine}: {bridges:?}");
            let fw = from_listing(&read(&v), &bridges, "dataplane");
            assert_eq!(fw, HostFirewall::default(), "{engine}");
            // Where Docker writes its ICC-off drop into `FORWARD` itself, it is read as
            // Docker's only for Docker's bridges (the control: the same rule for bridges
            // not known as Docker's is an operator's).
            if engine == "20.10" {
                let fw = from_listing(&read(&v), &BTreeSet::new(), "dataplane");
                assert!(fw.external_rules.is_some(), "{engine}");
            }
            // The same ruleset with one operator drop added is an operator's.
            let mut with = v.clone();
            with["nftables"].as_array_mut().unwrap().extend([
                json!({"table": {"family": "inet", "name": "operator"}}),
                json!({"chain": {"family": "inet", "table": "operator", "name": "fwd", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}),
                rule("inet", "operator", "fwd", &json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.17.0.5"}}, {"drop": null}])),
            ]);
            let fw = from_listing(&read(&with), &bridges, "dataplane");
            assert!(fw.forward_rules.is_some(), "{engine}");
            // A table of the operator's is the operator's whatever its name.
            let named = with.to_string().replace("\"operator\"", "\"docker-guard\"");
            let named: Value = serde_json::from_str(&named).unwrap();
            let fw = from_listing(&read(&named), &bridges, "dataplane");
            assert!(
                fw.forward_rules.unwrap().contains("docker-guard"),
                "{engine}"
            );
        }
    }

    #[test]
    fn drops_in_the_operators_chains_reached_from_forward_count() {
        let base = |family: &str, table: &str, name: &str| {
            let mut c = chain(family, table, name, Some("forward"), "accept");
            c["chain"]["type"] = json!("filter");
            c
        };
        let drop_in = |family: &str, table: &str, chain_name: &str| {
            rule(
                family,
                table,
                chain_name,
                &json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "203.0.113.7"}}, {"drop": null}]),
            )
        };
        for how in ["jump", "goto"] {
            let v = json!({"nftables": [
                base("inet", "op", "forward"),
                rule("inet", "op", "forward", &json!([{how: {"target": "blocklist"}}])),
                chain("inet", "op", "blocklist", None, ""),
                drop_in("inet", "op", "blocklist"),
            ]});
            let fw = from_listing(&read(&v), &bridges(), "dataplane");
            assert!(fw.forward_rules.unwrap().contains("blocklist"), "{how}");
        }
        // Through a verdict map; and a queue (an inline IPS may drop).
        let v = json!({"nftables": [
            base("inet", "op", "forward"),
            rule("inet", "op", "forward", &json!([{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": [["docker0", {"jump": {"target": "wan"}}]]}}}])),
            chain("inet", "op", "wan", None, ""),
            rule("inet", "op", "wan", &json!([{"queue": {"num": 0}}])),
        ]});
        assert!(
            from_listing(&read(&v), &bridges(), "dataplane")
                .forward_rules
                .unwrap()
                .contains("wan")
        );
        // Reached only through a rule tied to another interface: external clients only.
        let v = json!({"nftables": [
            base("inet", "op", "forward"),
            rule("inet", "op", "forward", &json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"jump": {"target": "wan"}}])),
            chain("inet", "op", "wan", None, ""),
            drop_in("inet", "op", "wan"),
        ]});
        let fw = from_listing(&read(&v), &bridges(), "dataplane");
        assert_eq!(fw.forward_rules, None);
        assert!(fw.external_rules.unwrap().contains("wan"));
        assert!(watched_chains(&read(&v), "dataplane").contains(&(
            "inet".into(),
            "op".into(),
            "wan".into()
        )));
        // Legacy iptables: FORWARD jumping (or going) to a chain of the operator's.
        for how in ["-j", "-g"] {
            let text = format!(
                "-P FORWARD DROP\n-A FORWARD -p tcp -m multiport --dports 80,443 {how} f2b-web\n\
                 -A FORWARD -j DOCKER-USER\n-A f2b-web -s 203.0.113.7/32 -j REJECT\n"
            );
            let fw = from_iptables_save(&text, &bridges(), "iptables-legacy");
            assert!(fw.forward_rules.unwrap().contains("f2b-web"), "{how}");
        }
    }

    #[test]
    fn statements_the_schema_cannot_read_still_count() {
        let base = json!({"chain": {"family": "inet", "table": "op", "name": "fwd",
                                    "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}});
        for expr in [
            json!([{"last": {"used": 5}}, {"drop": null}]),
            json!([{"reject": {"type": "icmpx", "expr": "no-such-code"}}]),
            json!([{"no such statement": {"x": [{"queue": {"num": 0}}]}}]),
        ] {
            let v = json!({"nftables": [base, rule("inet", "op", "fwd", &expr)]});
            let l = read(&v);
            assert_eq!(l.rules.len(), 1, "{expr}");
            assert!(
                from_listing(&l, &bridges(), "dataplane")
                    .forward_rules
                    .is_some(),
                "{expr}"
            );
        }
        // Nothing that drops: nothing found.
        let v = json!({"nftables": [base, rule("inet", "op", "fwd", &json!([{"last": {"used": 5}}, {"accept": null}]))]});
        assert_eq!(
            from_listing(&read(&v), &bridges(), "dataplane").forward_rules,
            None
        );
    }

    #[test]
    fn legacy_iptables_text() {
        let text = "-P INPUT ACCEPT\n-P FORWARD DROP\n-N DOCKER-USER\n-N ufw-in\n\
                    -A INPUT -j ufw-in\n-A ufw-in -p tcp --dport 22 -j ACCEPT\n-A ufw-in -j DROP\n\
                    -A DOCKER-USER -i eth0 -j DROP\n-A DOCKER-USER -j RETURN\n";
        let fw = from_iptables_save(text, &bridges(), "iptables-legacy");
        assert!(fw.stateful_input.unwrap().contains("ufw-in"));
        assert_eq!(fw.forward_rules, None);
        assert!(fw.external_rules.unwrap().contains("-i eth0 -j DROP"));
        let text = "-P INPUT ACCEPT\n-A FORWARD -j DOCKER-USER\n-A FORWARD -i eth1 -j DROP\n";
        let fw = from_iptables_save(text, &bridges(), "iptables-legacy");
        assert_eq!(fw.forward_rules, None);
        assert!(fw.external_rules.unwrap().contains("FORWARD"));
        let text = "-P INPUT ACCEPT\n-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j RETURN\n";
        assert_eq!(
            from_iptables_save(text, &bridges(), "iptables-legacy"),
            HostFirewall::default()
        );
        let text = "-P INPUT ACCEPT\n-A FORWARD -s 172.17.0.5/32 -j DROP\n";
        let fw = from_iptables_save(text, &bridges(), "iptables-legacy");
        assert!(fw.forward_rules.unwrap().contains("FORWARD"));
        let text = "-P INPUT ACCEPT\n-A FORWARD -i docker0 -o docker0 -j DROP\n";
        assert_eq!(
            from_iptables_save(text, &bridges(), "iptables-legacy"),
            HostFirewall::default(),
            "Docker's own drop for a network with ICC off"
        );
        let text = "-P INPUT ACCEPT\n-A FORWARD -i docker0 -o br-0123456789ab -j DROP\n";
        assert!(
            from_iptables_save(text, &bridges(), "iptables-legacy")
                .forward_rules
                .is_some()
        );
        let text = "-P INPUT ACCEPT\n-A DOCKER-USER ! -i eth0 -j DROP\n";
        let fw = from_iptables_save(text, &bridges(), "iptables-legacy");
        assert_eq!(fw.stateful_input, None);
        assert!(fw.forward_rules.is_some());
    }
}
