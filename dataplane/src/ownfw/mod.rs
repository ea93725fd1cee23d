//! The own-firewall mode (`dataplane run --own-firewall`): Docker runs with `"iptables":
//! false` and the agent gives what Docker's rules gave, from two tables of its own, written
//! as one `nft -f` transaction whenever what they hold changes:
//!
//! ```text
//! table inet <t>_fw {
//!   sets bridges, internal, no_icc, isolated4/6, routed4/6, unprotected4/6 { type ifname }
//!   set others { type ifname }                 # bridges named br-* that are not Docker's
//!   set same { type ifname . ifname }          # (bridge, bridge): traffic within a network
//!   set pub4 { ipv4_addr . inet_proto . inet_service }   # published container ports
//!   map dnat4_any { inet_proto . inet_service : ipv4_addr . inet_service }  # -p P:C
//!   map dnat4_at  { ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   (and the IPv6 ones)
//!   chain operator { }                          # the operator's: never written by the agent
//!   chain forward { hook forward priority filter
//!     jump operator                             # first: its accept and drop are final
//!     iifname "br-*" iifname != @bridges iifname != @others drop   # fail closed
//!     oifname "br-*" oifname != @bridges oifname != @others drop
//!     iifname . oifname @same: icc off -> drop, else accept
//!     iifname @bridges jump from_bridge         # internal, isolation, isolated gateway
//!     oifname @bridges jump to_bridge }         # replies, published ports, gateway modes
//!   chain prerouting/output { hook nat dstnat: fib daddr type local -> publish }
//!   chain publish { dnat to the maps }
//!   chain postrouting { hook nat srcnat: hairpin, one masquerade rule per network }
//! }
//! ```
//! Traffic between two containers of one network is bridged, not routed: it meets the
//! `forward` chain only through `br_netfilter` (`bridge-nf-call-iptables`), which Docker
//! turns on for the same reason and the agent turns on where a network has
//! inter-container communication off.
//! Rules are per network (masquerade) or fixed; containers and ports are set elements.
//! The tables stay while the agent is stopped: a network Docker creates meanwhile has a
//! `br-*` bridge the sets do not name, and forwards nothing beyond it until an agent has
//! applied its rules.

pub mod daemon_json;
pub mod docker_conf;
pub mod leftovers;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use crate::docker::NetInfo;

/// How a network's gateway publishes (Docker 27+'s gateway modes, per family).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gateway {
    /// Masqueraded out, published ports through NAT, nothing else in.
    #[default]
    Nat,
    /// As `Nat`, and every port of the containers reachable at their addresses.
    NatUnprotected,
    /// No masquerade; published container ports (and ICMP) reachable at their addresses.
    Routed,
    /// Nothing in or out beyond the bridge.
    Isolated,
}

impl Gateway {
    /// From the option's value; an unknown mode is taken as the strictest.
    pub fn of(mode: Option<&str>) -> Self {
        match mode.unwrap_or("nat") {
            "" | "nat" => Self::Nat,
            "nat-unprotected" => Self::NatUnprotected,
            "routed" => Self::Routed,
            _ => Self::Isolated,
        }
    }
}

/// One bridge network, as its rules need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Net {
    pub subnets: BTreeSet<(IpAddr, u8)>,
    pub internal: bool,
    pub icc: bool,
    pub masquerade: bool,
    pub gw4: Gateway,
    pub gw6: Gateway,
}

/// One published binding: host address (`None`: every address of the family of `to`),
/// protocol, port, and the container's address and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Published {
    pub host: Option<IpAddr>,
    pub proto: u8,
    pub port: u16,
    pub to: IpAddr,
    pub to_port: u16,
}

/// Everything the tables hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// Networks by bridge interface.
    pub nets: BTreeMap<String, Net>,
    /// Interfaces named `br-*` that are not Docker's bridges (exempt from failing closed).
    pub others: BTreeSet<String>,
    pub published: BTreeSet<Published>,
    /// Container ports published on networks whose gateway mode is `routed` (address,
    /// protocol, port): reachable at the container's own address, no host port.
    pub routed: BTreeSet<(IpAddr, u8, u16)>,
}

/// The published bindings of every container the agent knows.
pub fn published<'a>(
    frontends: impl IntoIterator<Item = &'a crate::desired::Frontend>,
) -> BTreeSet<Published> {
    use dataplane_common::{WILDCARD4, WILDCARD6, is_zero};
    let mut out = BTreeSet::new();
    for f in frontends {
        let k = &f.key;
        let b = &f.backend;
        let (host, v4) = if k.addr == WILDCARD4 {
            (None, true)
        } else if k.addr == WILDCARD6 {
            (None, false)
        } else {
            let h = crate::addr::addr_to_ip(&k.addr);
            (Some(h), h.is_ipv4())
        };
        let to = if v4 { &b.addr4 } else { &b.addr6 };
        if is_zero(to) {
            continue;
        }
        out.insert(Published {
            host,
            proto: k.proto,
            port: u16::from_be(k.port_be),
            to: crate::addr::addr_to_ip(to),
            to_port: u16::from_be(b.port_be),
        });
    }
    out
}

/// The container ports published (`-p`) by containers on networks whose gateway mode is
/// `routed` for the address's family: Docker publishes no host port there, and the port is
/// reached at the container's own address.
pub fn routed_ports<'a, S: std::hash::BuildHasher>(
    inspected: impl IntoIterator<Item = &'a bollard::models::ContainerInspectResponse>,
    networks: &std::collections::HashMap<String, NetInfo, S>,
) -> BTreeSet<(IpAddr, u8, u16)> {
    let mut out = BTreeSet::new();
    for c in inspected {
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let Some(bindings) = c
            .host_config
            .as_ref()
            .and_then(|h| h.port_bindings.as_ref())
        else {
            continue;
        };
        let eps = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        if !running || bindings.is_empty() {
            continue;
        }
        for ep in eps.into_iter().flat_map(|e| e.values()) {
            let Some(net) = ep.network_id.as_ref().and_then(|id| networks.get(id)) else {
                continue;
            };
            let addrs = [
                (ep.ip_address.as_deref(), net.fw.gw4.as_deref()),
                (ep.global_ipv6_address.as_deref(), net.fw.gw6.as_deref()),
            ];
            for (addr, mode) in addrs {
                let (Some(Ok(ip)), Gateway::Routed) = (
                    addr.filter(|a| !a.is_empty()).map(str::parse::<IpAddr>),
                    Gateway::of(mode),
                ) else {
                    continue;
                };
                for key in bindings.keys() {
                    let Some((port, proto)) = key.split_once('/') else {
                        continue;
                    };
                    let proto = match proto {
                        "tcp" => 6,
                        "udp" => 17,
                        "sctp" => 132,
                        _ => continue,
                    };
                    if let Ok(port) = port.parse::<u16>() {
                        out.insert((ip, proto, port));
                    }
                }
            }
        }
    }
    out
}

/// Whether `name` is one Docker gives a network's bridge (`br-` and 12 hex digits).
pub fn docker_bridge_name(name: &str) -> bool {
    name.strip_prefix("br-")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Interfaces named `br-*` on the host that are not named as Docker names bridges.
pub fn other_br_interfaces() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("br-") && !docker_bridge_name(n))
                .collect()
        })
        .unwrap_or_default()
}

impl Spec {
    /// From Docker's networks and the published bindings.
    pub fn new<'a>(
        networks: impl IntoIterator<Item = &'a NetInfo>,
        published: BTreeSet<Published>,
    ) -> Self {
        let nets = networks
            .into_iter()
            .filter_map(|n| {
                let br = n.bridge.clone()?;
                safe_name(&br).then(|| {
                    let f = &n.fw;
                    (
                        br,
                        Net {
                            subnets: f.subnets.iter().copied().collect(),
                            internal: f.internal,
                            icc: f.icc,
                            masquerade: f.masquerade,
                            gw4: Gateway::of(f.gw4.as_deref()),
                            gw6: Gateway::of(f.gw6.as_deref()),
                        },
                    )
                })
            })
            .collect();
        Self {
            nets,
            others: other_br_interfaces(),
            published,
            routed: BTreeSet::new(),
        }
    }
}

/// An interface name nft may be given quoted as it is.
fn safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b))
}

fn elements(v: &[String]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", v.join(", "))
    }
}

/// The sets' and maps' declarations (name, type), as `nft` takes them.
const SETS: &[(&str, &str)] = &[
    ("bridges", "type ifname;"),
    ("others", "type ifname;"),
    ("internal", "type ifname;"),
    ("no_icc", "type ifname;"),
    ("isolated4", "type ifname;"),
    ("isolated6", "type ifname;"),
    ("routed4", "type ifname;"),
    ("routed6", "type ifname;"),
    ("unprotected4", "type ifname;"),
    ("unprotected6", "type ifname;"),
    ("same", "type ifname . ifname;"),
    ("pub4", "type ipv4_addr . inet_proto . inet_service;"),
    ("pub6", "type ipv6_addr . inet_proto . inet_service;"),
];
const MAPS: &[(&str, &str)] = &[
    (
        "dnat4_any",
        "type inet_proto . inet_service : ipv4_addr . inet_service;",
    ),
    (
        "dnat4_at",
        "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;",
    ),
    (
        "dnat6_any",
        "type inet_proto . inet_service : ipv6_addr . inet_service;",
    ),
    (
        "dnat6_at",
        "type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service;",
    ),
];
/// The chains the agent writes (all but `operator`), with their hooks.
const CHAINS: &[(&str, &str)] = &[
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
    ),
    ("from_bridge", ""),
    ("to_bridge", ""),
    (
        "prerouting",
        "type nat hook prerouting priority dstnat; policy accept;",
    ),
    (
        "output",
        "type nat hook output priority -100; policy accept;",
    ),
    ("publish", ""),
    (
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
    ),
];

fn v6_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => a.to_string(),
    }
}

/// The elements of every set and map, by name.
fn contents(spec: &Spec) -> BTreeMap<&'static str, Vec<String>> {
    let mut m: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let q = |s: &str| format!("\"{s}\"");
    for (br, n) in &spec.nets {
        m.entry("bridges").or_default().push(q(br));
        m.entry("same")
            .or_default()
            .push(format!("{} . {}", q(br), q(br)));
        let mut add = |set: &'static str, on: bool| {
            if on {
                m.entry(set).or_default().push(q(br));
            }
        };
        add("internal", n.internal);
        add("no_icc", !n.icc);
        add("isolated4", n.gw4 == Gateway::Isolated);
        add("isolated6", n.gw6 == Gateway::Isolated);
        add("routed4", n.gw4 == Gateway::Routed);
        add("routed6", n.gw6 == Gateway::Routed);
        add("unprotected4", n.gw4 == Gateway::NatUnprotected);
        add("unprotected6", n.gw6 == Gateway::NatUnprotected);
    }
    m.insert("others", spec.others.iter().map(|o| q(o)).collect());
    for (ip, proto, port) in &spec.routed {
        let set = if ip.is_ipv4() { "pub4" } else { "pub6" };
        m.entry(set)
            .or_default()
            .push(format!("{} . {proto} . {port}", v6_addr(*ip)));
    }
    let mut seen: BTreeSet<(&str, String)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("pub"))
        .flat_map(|(k, v)| v.iter().map(|e| (*k, e.clone())))
        .map(|(k, e)| (if k == "pub4" { "4" } else { "6" }, e))
        .collect();
    for p in &spec.published {
        let v4 = p.to.is_ipv4();
        let f = if v4 { "4" } else { "6" };
        let to = format!("{} . {}", v6_addr(p.to), p.to_port);
        let pub_el = format!("{} . {} . {}", v6_addr(p.to), p.proto, p.to_port);
        if seen.insert((f, pub_el.clone())) {
            m.entry(if v4 { "pub4" } else { "pub6" })
                .or_default()
                .push(pub_el);
        }
        // One translation per key: the first binding wins (Docker allows no second).
        let (map, key) = match p.host {
            None => (
                if v4 { "dnat4_any" } else { "dnat6_any" },
                format!("{} . {}", p.proto, p.port),
            ),
            Some(h) if h.is_ipv4() == v4 => (
                if v4 { "dnat4_at" } else { "dnat6_at" },
                format!("{} . {} . {}", v6_addr(h), p.proto, p.port),
            ),
            Some(_) => continue,
        };
        if seen.insert((map, key.clone())) {
            m.entry(map).or_default().push(format!("{key} : {to}"));
        }
    }
    m
}

/// The fixed rules of the chains the agent writes.
fn chain_rules(spec: &Spec) -> Vec<(&'static str, Vec<String>)> {
    let mut post = vec!["ct status dnat iifname . oifname @same masquerade".to_string()];
    for (br, n) in &spec.nets {
        if !n.masquerade || n.internal {
            continue;
        }
        for (addr, len) in &n.subnets {
            let (fam, gw) = if addr.is_ipv4() {
                ("ip", n.gw4)
            } else {
                ("ip6", n.gw6)
            };
            if matches!(gw, Gateway::Nat | Gateway::NatUnprotected) {
                post.push(format!(
                    "{fam} saddr {}/{len} oifname != \"{br}\" masquerade",
                    v6_addr(*addr)
                ));
            }
        }
    }
    let r = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    vec![
        (
            "forward",
            r(&[
                "jump operator",
                "iifname \"br-*\" iifname != @bridges iifname != @others drop",
                "oifname \"br-*\" oifname != @bridges oifname != @others drop",
                "iifname . oifname @same iifname @no_icc drop",
                "iifname . oifname @same accept",
                "iifname @bridges jump from_bridge",
                "oifname @bridges jump to_bridge",
            ]),
        ),
        (
            "from_bridge",
            r(&[
                "iifname @internal drop",
                "oifname @bridges drop",
                "meta nfproto ipv4 iifname @isolated4 drop",
                "meta nfproto ipv6 iifname @isolated6 drop",
            ]),
        ),
        (
            "to_bridge",
            r(&[
                "oifname @internal drop",
                "meta nfproto ipv4 oifname @isolated4 drop",
                "meta nfproto ipv6 oifname @isolated6 drop",
                "ct state established,related accept",
                "ct status dnat ip daddr . meta l4proto . th dport @pub4 accept",
                "ct status dnat ip6 daddr . meta l4proto . th dport @pub6 accept",
                "meta nfproto ipv4 oifname @unprotected4 accept",
                "meta nfproto ipv6 oifname @unprotected6 accept",
                "oifname @routed4 ip daddr . meta l4proto . th dport @pub4 accept",
                "oifname @routed6 ip6 daddr . meta l4proto . th dport @pub6 accept",
                "oifname @routed4 meta l4proto icmp accept",
                "oifname @routed6 meta l4proto ipv6-icmp accept",
                "drop",
            ]),
        ),
        ("prerouting", r(&["fib daddr type local jump publish"])),
        (
            "output",
            r(&[
                "meta nfproto ipv4 ip daddr != 127.0.0.0/8 fib daddr type local jump publish",
                "meta nfproto ipv6 ip6 daddr != ::1 fib daddr type local jump publish",
            ]),
        ),
        (
            "publish",
            r(&[
                "meta nfproto ipv4 dnat ip to ip daddr . meta l4proto . th dport map @dnat4_at",
                "meta nfproto ipv4 dnat ip to meta l4proto . th dport map @dnat4_any",
                "meta nfproto ipv6 dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat6_at",
                "meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @dnat6_any",
            ]),
        ),
        ("postrouting", post),
    ]
}

/// The whole `nft -f` script: declares what is missing (the operator's chain only if
/// missing), empties what the agent writes, and fills it again; one transaction.
pub fn script(table: &str, spec: &Spec) -> String {
    let t = format!("{table}_fw");
    let mut s = String::new();
    let _ = writeln!(s, "table inet {t} {{");
    for (name, ty) in SETS {
        let _ = writeln!(s, "  set {name} {{ {ty} }}");
    }
    for (name, ty) in MAPS {
        let _ = writeln!(s, "  map {name} {{ {ty} }}");
    }
    let _ = writeln!(s, "  chain operator {{ }}");
    for (name, hook) in CHAINS {
        let _ = writeln!(s, "  chain {name} {{ {hook} }}");
    }
    let _ = writeln!(s, "}}");
    for (name, _) in SETS {
        let _ = writeln!(s, "flush set inet {t} {name}");
    }
    for (name, _) in MAPS {
        let _ = writeln!(s, "flush map inet {t} {name}");
    }
    for (name, _) in CHAINS {
        let _ = writeln!(s, "flush chain inet {t} {name}");
    }
    let c = contents(spec);
    let _ = writeln!(s, "table inet {t} {{");
    for (name, ty) in SETS.iter().chain(MAPS) {
        let kind = if MAPS.iter().any(|(m, _)| m == name) {
            "map"
        } else {
            "set"
        };
        if let Some(v) = c.get(name).filter(|v| !v.is_empty()) {
            let _ = writeln!(s, "  {kind} {name} {{ {ty}{} }}", elements(v));
        }
    }
    for (name, rules) in chain_rules(spec) {
        let _ = writeln!(s, "  chain {name} {{");
        for r in rules {
            let _ = writeln!(s, "    {r}");
        }
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// Runs an `nft -f` script as one transaction.
pub fn run_script(script: &str) -> Result<()> {
    crate::netfilter::ruleset::nft_stdin(&["-f", "-"], script.as_bytes())
        .map_err(|e| anyhow::anyhow!("nft refused the own-firewall tables: {e:#}"))
}

/// Has bridged traffic meet the `forward` chain (as Docker does where a network turns
/// inter-container communication off). Returns what could not be set.
pub fn bridged_traffic_filtered() -> Result<(), String> {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let p = format!("/proc/sys/net/bridge/{f}");
        if std::fs::read_to_string(&p).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&p, "1").map_err(|e| format!("{p}: {e} (is br_netfilter loaded?)"))?;
    }
    Ok(())
}

/// The agent's tables in this mode, written when what they hold changes.
pub struct Firewall {
    table: String,
    last: Option<Spec>,
}

impl Firewall {
    /// `table`: the agent's table name; its tables are `inet` and `bridge` `<table>_fw`.
    pub fn new(table: &str) -> Self {
        Self {
            table: table.to_string(),
            last: None,
        }
    }

    pub fn table(&self) -> String {
        format!("{}_fw", self.table)
    }

    /// Writes `spec` unless it is what was written last. True when written.
    pub fn apply(&mut self, spec: Spec) -> Result<bool> {
        if self.last.as_ref() == Some(&spec) {
            return Ok(false);
        }
        if spec.nets.values().any(|n| !n.icc)
            && let Err(e) = bridged_traffic_filtered()
        {
            bail!(
                "a network turns inter-container communication off, and bridged traffic cannot be filtered: {e}"
            );
        }
        run_script(&script(&self.table, &spec))?;
        self.last = Some(spec);
        Ok(true)
    }

    /// The next apply writes even if nothing changed (repairs changes made by hand).
    pub fn force(&mut self) {
        self.last = None;
    }

    /// The networks and bindings in force, for `status`.
    pub fn counts(&self) -> (usize, usize) {
        self.last
            .as_ref()
            .map_or((0, 0), |s| (s.nets.len(), s.published.len()))
    }
}

/// Removes the agent's table (`uninstall`, or an unpinned agent stopping); the operator's
/// chain goes with them.
pub fn remove(table: &str) -> Result<()> {
    let t = format!("{table}_fw");
    let exists = |fam: &str| {
        Command::new("nft")
            .args(["list", "table", fam, &t])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut script = String::new();
    if exists("inet") {
        let _ = writeln!(script, "delete table inet {t}");
    }
    if script.is_empty() {
        return Ok(());
    }
    run_script(&script)
}

/// How many rules the operator's chain holds (`None`: the table is not there).
pub fn operator_rules(table: &str) -> Option<usize> {
    let out = Command::new("nft")
        .args([
            "-j",
            "list",
            "chain",
            "inet",
            &format!("{table}_fw"),
            "operator",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.get("nftables")?
            .as_array()?
            .iter()
            .filter(|i| i.get("rule").is_some())
            .count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(masq: bool) -> Net {
        Net {
            subnets: [("172.30.0.0".parse().unwrap(), 16)].into(),
            icc: true,
            masquerade: masq,
            ..Default::default()
        }
    }

    #[test]
    fn docker_bridge_names() {
        assert!(docker_bridge_name("br-0123456789ab"));
        assert!(!docker_bridge_name("br-lan"));
        assert!(!docker_bridge_name("br-0123456789abc"));
        assert!(!docker_bridge_name("docker0"));
    }

    #[test]
    fn gateway_modes() {
        assert_eq!(Gateway::of(None), Gateway::Nat);
        assert_eq!(Gateway::of(Some("routed")), Gateway::Routed);
        assert_eq!(
            Gateway::of(Some("nat-unprotected")),
            Gateway::NatUnprotected
        );
        assert_eq!(Gateway::of(Some("isolated")), Gateway::Isolated);
        assert_eq!(Gateway::of(Some("something-new")), Gateway::Isolated);
    }

    #[test]
    fn masquerade_per_network_and_ports_as_elements() {
        let mut spec = Spec::default();
        spec.nets.insert("br-aaaaaaaaaaaa".into(), net(true));
        spec.nets.insert("br-bbbbbbbbbbbb".into(), net(false));
        let mut internal = net(true);
        internal.internal = true;
        internal.icc = false;
        spec.nets.insert("br-cccccccccccc".into(), internal);
        for port in 8000..8100 {
            spec.published.insert(Published {
                host: None,
                proto: 6,
                port,
                to: "172.30.0.2".parse().unwrap(),
                to_port: port,
            });
        }
        let s = script("dp", &spec);
        // One masquerade rule: for the network that asks for it (not internal).
        assert_eq!(s.matches("masquerade").count(), 2, "{s}");
        assert!(s.contains("ip saddr 172.30.0.0/16 oifname != \"br-aaaaaaaaaaaa\" masquerade"));
        // Ports are elements, not rules.
        assert!(s.contains("6 . 8042 : 172.30.0.2 . 8042"));
        assert_eq!(s.matches("dnat ip to").count(), 2);
        assert!(s.contains("set internal { type ifname; elements = { \"br-cccccccccccc\" }; }"));
        assert!(s.contains("set no_icc { type ifname; elements = { \"br-cccccccccccc\" }; }"));
        // The operator's chain is declared, never flushed.
        assert!(s.contains("chain operator { }"));
        assert!(!s.contains("flush chain inet dp_fw operator"));
    }

    #[test]
    fn bindings_to_one_host_address_and_the_first_wins() {
        let mut spec = Spec::default();
        let p = |host: Option<&str>, to: &str| Published {
            host: host.map(|h| h.parse().unwrap()),
            proto: 17,
            port: 53,
            to: to.parse().unwrap(),
            to_port: 5353,
        };
        spec.published.insert(p(Some("10.0.0.1"), "172.30.0.2"));
        spec.published.insert(p(Some("10.0.0.1"), "172.30.0.3"));
        spec.published.insert(p(Some("fd00::1"), "172.30.0.4"));
        let c = contents(&spec);
        assert_eq!(
            c["dnat4_at"],
            vec!["10.0.0.1 . 17 . 53 : 172.30.0.2 . 5353"]
        );
        assert!(!c.contains_key("dnat6_at"));
        assert_eq!(c["pub4"].len(), 3);
    }

    #[test]
    fn routed_container_ports_are_reachable_at_their_address_only() {
        let mut spec = Spec::default();
        spec.routed.insert(("172.30.0.2".parse().unwrap(), 6, 80));
        spec.published.insert(Published {
            host: None,
            proto: 6,
            port: 8080,
            to: "172.30.0.2".parse().unwrap(),
            to_port: 80,
        });
        let c = contents(&spec);
        // One element for both: no duplicate in the set.
        assert_eq!(c["pub4"], vec!["172.30.0.2 . 6 . 80"]);
        assert_eq!(c["dnat4_any"].len(), 1);
    }

    #[test]
    fn unsafe_bridge_names_are_left_out() {
        assert!(safe_name("br-0123456789ab") && safe_name("docker0"));
        assert!(!safe_name("x\" ; flush ruleset"));
        assert!(!safe_name(""));
    }
}
