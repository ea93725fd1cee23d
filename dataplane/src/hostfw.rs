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

use serde_json::Value;

use crate::netfilter::changes::{ChainId, Changes, is_own_table};

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
    nft: Option<Value>,
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
    let nft = Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok());
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
                .map(|v| from_nft_json(v, bridges, own_table))
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
pub fn watched_chains(v: &Value, own_table: &str) -> BTreeSet<ChainId> {
    let items = nft_items(v);
    let mut jumps: BTreeMap<ChainId, Vec<String>> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut todo = Vec::new();
    for it in items {
        if let Some(c) = it.get("chain") {
            let cid = chain_id(c, "name");
            if is_own_table(&cid.0, &cid.1, own_table) {
                continue;
            }
            if is_input_base(c) {
                todo.push(cid.clone());
            }
            if is_operator_forward_base(c, own_table) || cid.2 == "DOCKER-USER" {
                out.insert(cid);
            }
        } else if let Some(r) = it.get("rule") {
            jumps
                .entry(chain_id(r, "chain"))
                .or_default()
                .extend(jump_targets(r).map(str::to_string));
        }
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
    let bases: BTreeSet<ChainId> = items
        .iter()
        .filter_map(|it| it.get("chain"))
        .filter(|c| is_operator_forward_base(c, own_table))
        .map(|c| chain_id(c, "name"))
        .collect();
    out.extend(reached_from(items, bases, |_| true));
    out
}

/// An input base chain of filter type: where a stateful INPUT policy is looked for.
fn is_input_base(c: &Value) -> bool {
    c["hook"] == "input" && c["type"].as_str().unwrap_or("filter") == "filter"
}

/// Docker 29's nftables backend's tables (`ip` and `ip6`).
fn is_dockers_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6") && table == "docker-bridges"
}

/// A forward base chain outside Docker's tables and the agent's own: the operator's.
fn is_operator_forward_base(c: &Value, own_table: &str) -> bool {
    let table = c["table"].as_str().unwrap_or("");
    let family = c["family"].as_str().unwrap_or("");
    c["hook"] == "forward"
        && !is_own_table(family, table, own_table)
        && !is_dockers_table(family, table)
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
fn all_jump_targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if (k == "jump" || k == "goto")
                    && let Some(t) = x["target"].as_str()
                {
                    out.push(t.to_string());
                }
                all_jump_targets(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| all_jump_targets(x, out)),
        _ => {}
    }
}

/// `starts` and the chains of their tables they reach through rules that `follow` admits,
/// but for Docker's own chains (`DOCKER-USER` is read on its own).
fn reached_from(
    items: &[Value],
    starts: BTreeSet<ChainId>,
    follow: impl Fn(&[Value]) -> bool,
) -> BTreeSet<ChainId> {
    let mut rules: BTreeMap<ChainId, Vec<&Value>> = BTreeMap::new();
    for r in items.iter().filter_map(|it| it.get("rule")) {
        rules.entry(chain_id(r, "chain")).or_default().push(r);
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<ChainId> = starts.into_iter().collect();
    while let Some(cid) = todo.pop() {
        if !seen.insert(cid.clone()) {
            continue;
        }
        for r in rules.get(&cid).into_iter().flatten() {
            let exprs = r["expr"].as_array().map_or(&[][..], Vec::as_slice);
            if !follow(exprs) {
                continue;
            }
            let mut targets = Vec::new();
            all_jump_targets(&r["expr"], &mut targets);
            for t in targets {
                if !DOCKERS_CHAINS.contains(&t.as_str()) {
                    todo.push((cid.0.clone(), cid.1.clone(), t));
                }
            }
        }
    }
    seen
}

/// The chains a rule jumps or goes to.
fn jump_targets(r: &Value) -> impl Iterator<Item = &str> {
    r["expr"].as_array().into_iter().flatten().flat_map(|e| {
        ["jump", "goto"]
            .into_iter()
            .filter_map(move |k| e[k]["target"].as_str())
    })
}

/// The ruleset's objects (`{"nftables": [...]}`).
fn nft_items(v: &Value) -> &[Value] {
    v["nftables"].as_array().map_or(&[], Vec::as_slice)
}

/// (family, table, the chain named by `chain_key`) of a chain or rule object.
fn chain_id(o: &Value, chain_key: &str) -> ChainId {
    (
        o["family"].as_str().unwrap_or("").to_string(),
        o["table"].as_str().unwrap_or("").to_string(),
        o[chain_key].as_str().unwrap_or("").to_string(),
    )
}

/// From `nft -j list ruleset` output.
pub fn from_nft_json(v: &Value, bridges: &BTreeSet<String>, own_table: &str) -> HostFirewall {
    let items = nft_items(v);
    let mut rules: BTreeMap<ChainId, Vec<&Value>> = BTreeMap::new();
    let mut input_bases = Vec::new();
    for it in items {
        if let Some(c) = it.get("chain") {
            if is_own_table(
                c["family"].as_str().unwrap_or(""),
                c["table"].as_str().unwrap_or(""),
                own_table,
            ) {
                continue;
            }
            if is_input_base(c) {
                let cid = chain_id(c, "name");
                if c["policy"] == "drop" {
                    let (f, t, n) = &cid;
                    return HostFirewall {
                        stateful_input: Some(format!("{f} {t} {n}: policy drop")),
                        forward_rules: forward_rules_nft(items, bridges, true, own_table),
                        external_rules: forward_rules_nft(items, bridges, false, own_table),
                    };
                }
                input_bases.push(cid);
            }
        } else if let Some(r) = it.get("rule") {
            rules.entry(chain_id(r, "chain")).or_default().push(r);
        }
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
                // Native verdicts, and iptables-nft's `xt` targets (`"name": "REJECT"`).
                let text = r["expr"].to_string().to_ascii_lowercase();
                if text.contains("\"drop\"") || text.contains("\"reject\"") {
                    let (f, t, n) = &cid;
                    stateful = Some(format!(
                        "{f} {t} {n}: a drop or reject rule, handle {}",
                        r["handle"]
                    ));
                    break 'bases;
                }
                todo.extend(jump_targets(r).map(str::to_string));
            }
        }
    }
    HostFirewall {
        stateful_input: stateful,
        forward_rules: forward_rules_nft(items, bridges, true, own_table),
        external_rules: forward_rules_nft(items, bridges, false, own_table),
    }
}

/// Whether a rule only matches packets in or out of an interface that is not a Docker
/// bridge (`iifname "eth0"`): such a rule never sees traffic between containers.
fn tied_to_other_interface(exprs: &[Value], bridges: &BTreeSet<String>) -> bool {
    exprs.iter().any(|e| {
        let m = &e["match"];
        let key = m["left"]["meta"]["key"].as_str().unwrap_or("");
        let name = m["right"].as_str().unwrap_or("");
        (key == "iifname" || key == "oifname")
            && m["op"] == "=="
            && !name.is_empty()
            && !name.contains('*')
            && !bridges.contains(name)
    })
}

/// Docker's own rule for a network with inter-container communication off (`enable_icc`
/// false, and Swarm's `docker_gwbridge`): `iifname B oifname B drop` for one of its
/// bridges, in `FORWARD` itself (Docker 20.10 to 27). It only concerns traffic within that
/// network, which the agent leaves to Docker there anyway.
fn dockers_icc_drop(exprs: &[Value], bridges: &BTreeSet<String>) -> bool {
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut drop = false;
    for e in exprs {
        if e.get("counter").is_some() {
            continue;
        }
        if e.get("drop").is_some() {
            drop = true;
            continue;
        }
        let m = &e["match"];
        let key = m["left"]["meta"]["key"].as_str().unwrap_or("");
        match (key, m["op"].as_str(), m["right"].as_str()) {
            ("iifname" | "oifname", Some("=="), Some(name)) => {
                keys.insert(key);
                names.insert(name);
            }
            _ => return false,
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
    items: &[Value],
    docker_bridges: &BTreeSet<String>,
    between: bool,
    own_table: &str,
) -> Option<String> {
    let bridges = between.then_some(docker_bridges);
    if let Some(w) = docker_user_nft(items, bridges) {
        return Some(w);
    }
    let bases: BTreeSet<ChainId> = items
        .iter()
        .filter_map(|it| it.get("chain"))
        .filter(|c| is_operator_forward_base(c, own_table))
        .map(|c| chain_id(c, "name"))
        .collect();
    // The operator's chains those reach (by jump, goto, verdict map); for container
    // clients not through a rule tied to another interface than Docker's.
    let reached = reached_from(items, bases, |exprs| {
        bridges.is_none_or(|b| !tied_to_other_interface(exprs, b))
    });
    for it in items {
        let Some(r) = it.get("rule") else { continue };
        let id = chain_id(r, "chain");
        if !reached.contains(&id) {
            continue;
        }
        let exprs = r["expr"].as_array().map_or(&[][..], Vec::as_slice);
        let text = r["expr"].to_string().to_ascii_lowercase();
        // A queue hands packets to a program that may drop them (an inline IPS).
        let drops =
            text.contains("\"drop\"") || text.contains("\"reject\"") || text.contains("\"queue\"");
        if !drops
            || bridges.is_some_and(|b| tied_to_other_interface(exprs, b))
            || dockers_icc_drop(exprs, docker_bridges)
        {
            continue;
        }
        let (f, t, c) = &id;
        return Some(format!(
            "{f} {t} {c}, rule handle {} (`nft -a list chain {f} {t} {c}`)",
            r["handle"]
        ));
    }
    None
}

/// The first rule of a `DOCKER-USER` chain that may concern container traffic.
fn docker_user_nft(items: &[Value], bridges: Option<&BTreeSet<String>>) -> Option<String> {
    for it in items {
        let Some(r) = it.get("rule") else { continue };
        if r["chain"] != "DOCKER-USER" {
            continue;
        }
        let exprs = r["expr"].as_array().map_or(&[][..], Vec::as_slice);
        let only_return = exprs
            .iter()
            .all(|e| e.get("counter").is_some() || e.get("return").is_some());
        if only_return || bridges.is_some_and(|b| tied_to_other_interface(exprs, b)) {
            continue;
        }
        return Some(format!(
            "{} {} DOCKER-USER, rule handle {} (`nft -a list chain {} {} DOCKER-USER`)",
            r["family"].as_str().unwrap_or(""),
            r["table"].as_str().unwrap_or(""),
            r["handle"],
            r["family"].as_str().unwrap_or(""),
            r["table"].as_str().unwrap_or(""),
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
    use serde_json::json;

    use super::*;

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
        let w = watched_chains(&v, "dataplane");
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
            nft: Some(v),
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
            from_nft_json(&v, &bridges(), "dataplane"),
            HostFirewall::default()
        );
    }

    #[test]
    fn stateful_input_policies_are_found() {
        let policy = json!({"nftables": [chain("inet", "filter", "input", Some("input"), "drop")]});
        assert!(
            from_nft_json(&policy, &bridges(), "dataplane")
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
        let fw = from_nft_json(&jumped, &bridges(), "dataplane");
        assert!(fw.stateful_input.unwrap().contains("ufw-before-input"));
        let xt = json!({"nftables": [
            chain("ip", "filter", "INPUT", Some("input"), "accept"),
            rule("ip", "filter", "INPUT", &json!([{"xt": {"type": "target", "name": "REJECT"}}])),
        ]});
        assert!(
            from_nft_json(&xt, &bridges(), "dataplane")
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
        let fw = from_nft_json(&v, &bridges(), "dataplane");
        assert_eq!(fw.forward_rules, None);
        // External clients' packets come in on eth0: the packet layer must step aside.
        assert!(fw.external_rules.unwrap().contains("DOCKER-USER"));
        let v = json!({"nftables": [
            rule("ip", "filter", "DOCKER-USER",
                 &json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"drop": null}])),
        ]});
        assert!(
            from_nft_json(&v, &bridges(), "dataplane")
                .forward_rules
                .is_some()
        );
        let v = json!({"nftables": [
            rule("ip", "filter", "DOCKER-USER", &json!([{"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"drop": null}])),
        ]});
        assert!(
            from_nft_json(&v, &bridges(), "dataplane")
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
            from_nft_json(&docker, &bridges(), "dataplane").forward_rules,
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
        let fw = from_nft_json(&hardened, &bridges(), "dataplane");
        assert_eq!((fw.forward_rules, fw.external_rules), (None, None));
        // The same shape for an interface that is not Docker's is an operator's.
        let other = json!({"nftables": [base("ip", "filter", "FORWARD"), icc("br-lan")]});
        let fw = from_nft_json(&other, &bridges(), "dataplane");
        assert!(fw.external_rules.is_some());
        // An operator's own table (Docker 29 has no DOCKER-USER).
        let own = json!({"nftables": [
            base("inet", "operator", "fwd"),
            rule("inet", "operator", "fwd", &json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.17.0.5"}}, {"drop": null}])),
        ]});
        let fw = from_nft_json(&own, &bridges(), "dataplane");
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
            let fw = from_nft_json(&v, &bridges, "dataplane");
            assert_eq!(fw, HostFirewall::default(), "{engine}");
            // Where Docker writes its ICC-off drop into `FORWARD` itself, it is read as
            // Docker's only for Docker's bridges (the control: the same rule for bridges
            // not known as Docker's is an operator's).
            if engine == "20.10" {
                let fw = from_nft_json(&v, &BTreeSet::new(), "dataplane");
                assert!(fw.external_rules.is_some(), "{engine}");
            }
            // The same ruleset with one operator drop added is an operator's.
            let mut with = v.clone();
            with["nftables"].as_array_mut().unwrap().extend([
                json!({"table": {"family": "inet", "name": "operator"}}),
                json!({"chain": {"family": "inet", "table": "operator", "name": "fwd", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}),
                rule("inet", "operator", "fwd", &json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.17.0.5"}}, {"drop": null}])),
            ]);
            let fw = from_nft_json(&with, &bridges, "dataplane");
            assert!(fw.forward_rules.is_some(), "{engine}");
            // A table of the operator's is the operator's whatever its name.
            let named = with.to_string().replace("\"operator\"", "\"docker-guard\"");
            let named: Value = serde_json::from_str(&named).unwrap();
            let fw = from_nft_json(&named, &bridges, "dataplane");
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
            let fw = from_nft_json(&v, &bridges(), "dataplane");
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
            from_nft_json(&v, &bridges(), "dataplane")
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
        let fw = from_nft_json(&v, &bridges(), "dataplane");
        assert_eq!(fw.forward_rules, None);
        assert!(fw.external_rules.unwrap().contains("wan"));
        assert!(watched_chains(&v, "dataplane").contains(&(
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
