//! Keeps translated connections out of `nf_conntrack`: one nftables table of our own,
//! `inet dataplane`, with `notrack` rules at raw priority, replaced as one atomic batch
//! whenever its content changes.
//!
//! Why rules are needed at all: the socket layer translates at `connect()`, so the packets
//! are ordinary host-to-container (or container-to-container) traffic; on a host where
//! Docker's iptables rules keep conntrack active, each would get a conntrack entry.
//!
//! What is untracked, and why nothing else is:
//! - Packets between a container client the socket layer translates (a "peer": a Docker
//!   container on the backend's network) and a published backend `addr.proto.port`, both
//!   ways. Only peers' addresses are in the rule, so routed or external clients of the same
//!   backend (whose connections Docker's DNAT carries) stay tracked.
//! - Packets from the host to a backend `addr.proto.port` (`output`), and their replies,
//!   only when a local socket is connected to exactly that backend (`socket` lookup):
//!   replies of connections Docker's NAT carries (a client bound to `127.0.0.1`, one made
//!   before the agent ran) go to a masqueraded address no such socket has, so they stay
//!   tracked and their NAT is undone.
//! - Nothing to or from the host when it has a stateful `INPUT` policy
//!   (`track_host_clients`): there untracked replies would be dropped, so host clients'
//!   connections stay tracked (one conntrack entry each, as on the direct path).
//!
//! `notrack` never lets a packet through that a rule drops: Docker's and the operator's
//! filter rules see every packet as before.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use dataplane_common::{Backend, FrontendKey, is_zero};

use crate::{
    addr::{Service, addr_to_ip},
    netlink::HostAddr,
};

/// The default table name (`inet dataplane`).
pub const TABLE: &str = "dataplane";

/// What the rules are built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The backends in the maps.
    pub backends: BTreeSet<Service>,
    /// This host's own addresses (interfaces and bridge gateways, not loopback): where
    /// replies to host clients go.
    pub hosts: BTreeSet<IpAddr>,
    /// Addresses of the container clients the socket layer translates.
    pub peers: BTreeSet<IpAddr>,
    /// Published (protocol number, port) pairs: what a peer dials on a host address to
    /// take Docker's NAT path.
    pub published: BTreeSet<(u8, u16)>,
    /// Host clients' connections stay tracked (a stateful `INPUT` policy was found).
    pub track_host_clients: bool,
    /// Replies of connections that Docker's NAT carries from a peer to a backend (made
    /// before the peer or the backend was known to the agent): they stay tracked, so their
    /// NAT is undone, until they end.
    pub nat_replies: BTreeSet<NatReply>,
}

/// A reply tuple: (backend address, protocol, backend port, client address, client port).
pub type NatReply = (IpAddr, u8, u16, IpAddr, u16);

/// The connections Docker's NAT carries now between a peer and a backend of `spec`, from
/// `conntrack -L --dst-nat` output (both families).
pub fn nat_replies(conntrack: &str, spec: &Spec) -> BTreeSet<NatReply> {
    let mut out = BTreeSet::new();
    for line in conntrack.lines() {
        // A connection that ended (TIME_WAIT, CLOSE) needs nothing any more; keeping its
        // reply tuple would hand a new translated connection that reuses the client port
        // to the old entry's NAT.
        if line.contains(" TIME_WAIT ") || line.contains(" CLOSE ") {
            continue;
        }
        let mut proto = None;
        let mut vals: Vec<(&str, &str)> = Vec::new();
        for (i, w) in line.split_whitespace().enumerate() {
            if i == 1 {
                proto = w.parse::<u8>().ok();
            }
            if let Some((k, v)) = w.split_once('=') {
                vals.push((k, v));
            }
        }
        let get = |key: &str, nth: usize| {
            vals.iter()
                .filter(|(k, _)| *k == key)
                .nth(nth)
                .map(|(_, v)| *v)
        };
        // The second src/dst/sport/dport group is the reply direction.
        let parsed = (|| {
            Some((
                proto?,
                get("src", 1)?.parse::<IpAddr>().ok()?,
                get("sport", 1)?.parse::<u16>().ok()?,
                get("dst", 1)?.parse::<IpAddr>().ok()?,
                get("dport", 1)?.parse::<u16>().ok()?,
            ))
        })();
        let Some((proto, backend, bport, client, cport)) = parsed else {
            continue;
        };
        if spec.backends.contains(&Service::new(backend, proto, bport))
            && spec.peers.contains(&client)
        {
            out.insert((backend, proto, bport, client, cport));
        }
    }
    out
}

/// `conntrack -L --dst-nat` for both families (empty when conntrack is not there).
pub fn dump_dnat() -> String {
    let mut text = String::new();
    for fam in ["ipv4", "ipv6"] {
        if let Ok(o) = Command::new("conntrack")
            .args(["-L", "-f", fam, "--dst-nat"])
            .stderr(Stdio::null())
            .output()
        {
            text.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    text
}

impl Spec {
    pub fn new<'a>(
        frontends: impl IntoIterator<Item = (&'a FrontendKey, &'a Backend)>,
        addrs: &[HostAddr],
        peers: impl IntoIterator<Item = IpAddr>,
        track_host_clients: bool,
    ) -> Self {
        let mut spec = Self {
            track_host_clients,
            peers: peers.into_iter().collect(),
            ..Self::default()
        };
        for (k, b) in frontends {
            spec.published.insert((k.proto, k.port()));
            for a in [b.addr4, b.addr6] {
                if !is_zero(&a) {
                    spec.backends
                        .insert(Service::new(addr_to_ip(&a), k.proto, b.port()));
                }
            }
        }
        for a in addrs {
            if !a.ip.is_loopback() && !a.ip.is_unspecified() {
                spec.hosts.insert(a.ip);
            }
        }
        spec
    }
}

/// Each item as nft text, IPv4 ones first, IPv6 ones second.
fn split<T>(
    items: &BTreeSet<T>,
    is_v4: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> String,
) -> (Vec<String>, Vec<String>) {
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
/// last packet towards the host.
const NAT_CLIENT_TIMEOUT: &str = "10m";
/// Room for such connections (the oldest are not evicted: new ones are not recorded).
const NAT_CLIENTS_MAX: u32 = 65_536;

/// The sets of the table: name, type, content.
fn sets(spec: &Spec) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let (b4, b6) = split(
        &spec.backends,
        |b| b.addr.is_ipv4(),
        |b| format!("{} . {} . {}", b.addr, b.proto, b.port),
    );
    let (h4, h6) = split(&spec.hosts, IpAddr::is_ipv4, ToString::to_string);
    let (p4, p6) = split(&spec.peers, IpAddr::is_ipv4, ToString::to_string);
    let (n4, n6) = split(
        &spec.nat_replies,
        |(b, ..)| b.is_ipv4(),
        |(b, proto, bport, c, cport)| format!("{b} . {proto} . {bport} . {c} . {cport}"),
    );
    let published = spec
        .published
        .iter()
        .map(|(proto, port)| format!("{proto} . {port}"))
        .collect();
    vec![
        ("published", "inet_proto . inet_service", published),
        ("backends4", "ipv4_addr . inet_proto . inet_service", b4),
        ("backends6", "ipv6_addr . inet_proto . inet_service", b6),
        ("hosts4", "ipv4_addr", h4),
        ("hosts6", "ipv6_addr", h6),
        ("peers4", "ipv4_addr", p4),
        ("peers6", "ipv6_addr", p6),
        (
            "natreplies4",
            "ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service",
            n4,
        ),
        (
            "natreplies6",
            "ipv6_addr . inet_proto . inet_service . ipv6_addr . inet_service",
            n6,
        ),
    ]
}

/// The rules of the `prerouting` and `output` chains, in order.
fn rules(spec: &Spec) -> (Vec<String>, Vec<String>) {
    let mut pre = Vec::new();
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        // A peer dialling the host (a published port through Docker's NAT: a client the
        // programs left to Docker, or any while no agent runs) has its client port
        // recorded, so the replies of that connection stay tracked and their NAT is undone.
        pre.push(format!(
            "meta l4proto {{ tcp, udp }} {ip} saddr @peers{n} {ip} daddr @hosts{n} meta l4proto . th dport @published update @natclients{n} {{ {ip} saddr . meta l4proto . th sport }}"
        ));
        pre.push(format!(
            "meta l4proto {{ tcp, udp }} {ip} saddr . meta l4proto . th sport @backends{n} {ip} daddr . meta l4proto . th dport @natclients{n} return"
        ));
        // Replies that Docker's NAT carried before the table knew them.
        pre.push(format!(
            "{ip} saddr . meta l4proto . th sport . {ip} daddr . th dport @natreplies{n} return"
        ));
    }
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        // Container clients and backends, both ways (bridged through the host).
        pre.push(format!(
            "{ip} saddr @peers{n} {ip} daddr . meta l4proto . th dport @backends{n} notrack"
        ));
        pre.push(format!(
            "{ip} daddr @peers{n} {ip} saddr . meta l4proto . th sport @backends{n} notrack"
        ));
        if !spec.track_host_clients {
            // Replies to a host socket connected straight to the backend (TCP: not a
            // wildcard listener; UDP: a socket bound there).
            pre.push(format!(
                "meta l4proto tcp {ip} daddr @hosts{n} {ip} saddr . meta l4proto . th sport @backends{n} socket wildcard 0 notrack"
            ));
            pre.push(format!(
                "meta l4proto udp {ip} daddr @hosts{n} {ip} saddr . meta l4proto . th sport @backends{n} socket transparent 0 notrack"
            ));
        }
    }
    let mut out = Vec::new();
    if !spec.track_host_clients {
        for (ip, n) in [("ip", "4"), ("ip6", "6")] {
            out.push(format!(
                "{ip} daddr . meta l4proto . th dport @backends{n} notrack"
            ));
        }
    }
    (pre, out)
}

/// The declarations of table `t`: every set and chain, empty (declaring what exists is a
/// no-op for nft).
fn declarations(t: &str, spec: &Spec) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet {t} {{");
    for (name, ty, _) in sets(spec) {
        let _ = writeln!(s, "  set {name} {{ type {ty}; }}");
    }
    for (n, ty) in [
        ("4", "ipv4_addr . inet_proto . inet_service"),
        ("6", "ipv6_addr . inet_proto . inet_service"),
    ] {
        let _ = writeln!(
            s,
            "  set natclients{n} {{ type {ty}; flags dynamic,timeout; timeout {NAT_CLIENT_TIMEOUT}; size {NAT_CLIENTS_MAX}; }}"
        );
    }
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "  chain {hook} {{ type filter hook {hook} priority raw; policy accept; }}"
        );
    }
    s.push_str("}\n");
    s
}

/// The nft script that makes table `t` exactly `spec`, atomically (`nft -f` runs a file as
/// one transaction): the table, its sets and chains declared (created where missing), then
/// the chains and the agent's sets flushed and filled. The connections recorded in
/// `natclients` (learnt by the packet path) survive every update.
pub fn script(t: &str, spec: &Spec) -> String {
    let mut s = declarations(t, spec);
    let (pre, out) = rules(spec);
    for chain in ["prerouting", "output"] {
        let _ = writeln!(s, "flush chain inet {t} {chain}");
    }
    for (name, _, items) in sets(spec) {
        let _ = writeln!(s, "flush set inet {t} {name}");
        if !items.is_empty() {
            let _ = writeln!(s, "add element inet {t} {name} {{ {} }}", items.join(", "));
        }
    }
    for (chain, rules) in [("prerouting", pre), ("output", out)] {
        for r in rules {
            let _ = writeln!(s, "add rule inet {t} {chain} {r}");
        }
    }
    s
}

/// The script that replaces table `t` whole with `spec` (when the table in place is not one
/// [`script`] can update: an earlier version's layout).
pub fn replace_script(t: &str, spec: &Spec) -> String {
    format!("table inet {t}\ndelete table inet {t}\n{}", script(t, spec))
}

/// Runs `program args` with `input` on its standard input: one transaction (`nft -f -`,
/// `iptables-restore`), all or nothing. Its error output becomes the error.
pub(crate) fn run_batch(program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {program}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} refused the batch (nothing was changed): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft(script: &str) -> Result<()> {
    run_batch("nft", &["-f", "-"], script)
}

/// The table as it is applied, so an unchanged spec costs nothing.
pub struct Notrack {
    table: String,
    applied: Option<Spec>,
}

impl Notrack {
    pub fn new(table: &str) -> Self {
        Self {
            table: table.to_string(),
            applied: None,
        }
    }

    /// What was applied last.
    pub fn applied(&self) -> Option<&Spec> {
        self.applied.as_ref()
    }

    /// Applies `spec` when it differs from what was applied last (or `force`).
    pub fn apply(&mut self, spec: &Spec, force: bool) -> Result<bool> {
        if !force && self.applied.as_ref() == Some(spec) {
            return Ok(false);
        }
        if let Err(e) = nft(&script(&self.table, spec)) {
            // An earlier version's table (other sets or types): replaced whole, once.
            tracing::info!(error = %format!("{e:#}"), table = %self.table, "replacing the table whole");
            nft(&replace_script(&self.table, spec))?;
        }
        self.applied = Some(spec.clone());
        Ok(true)
    }

    /// Removes the table (when the agent stops and its programs detach).
    pub fn remove(&mut self) -> Result<()> {
        self.applied = None;
        let t = &self.table;
        nft(&format!("table inet {t}\ndelete table inet {t}\n"))
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{PROTO_TCP, PROTO_UDP, v4_mapped};

    use super::*;

    fn ha(ip: &str, ifname: &str) -> HostAddr {
        HostAddr {
            ip: ip.parse().unwrap(),
            prefix_len: 24,
            ifname: ifname.into(),
        }
    }

    fn spec(track_host_clients: bool) -> Spec {
        let b = Backend {
            addr4: v4_mapped([172, 17, 0, 2]),
            addr6: "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            port_be: 80u16.to_be(),
            flags: 0,
            id: 0,
            net: 1,
            pad: 0,
        };
        let k1 = FrontendKey::new(dataplane_common::WILDCARD4, 8080, PROTO_TCP);
        let k2 = FrontendKey::new(dataplane_common::WILDCARD6, 8080, PROTO_TCP);
        let k3 = FrontendKey::new(dataplane_common::WILDCARD4, 5353, PROTO_UDP);
        Spec::new(
            [(&k1, &b), (&k2, &b), (&k3, &b)],
            &[
                ha("192.0.2.2", "eth0"),
                ha("172.17.0.1", "docker0"),
                ha("127.0.0.1", "lo"),
            ],
            ["172.17.0.3".parse().unwrap()],
            track_host_clients,
        )
    }

    #[test]
    fn spec_from_frontends_addresses_and_peers() {
        let spec = spec(false);
        let backends: Vec<String> = spec
            .backends
            .iter()
            .map(|b| format!("{}.{}.{}", b.addr, b.proto, b.port))
            .collect();
        assert_eq!(
            backends,
            vec![
                "172.17.0.2.6.80",
                "172.17.0.2.17.80",
                "fd00::2.6.80",
                "fd00::2.17.80"
            ]
        );
        let hosts: Vec<String> = spec.hosts.iter().map(ToString::to_string).collect();
        // Interface addresses, never loopback; no bridge network is a "client" by name.
        assert_eq!(hosts, vec!["172.17.0.1", "192.0.2.2"]);
        let s = script(TABLE, &spec);
        assert!(s.starts_with("table inet dataplane {\n"), "{s}");
        assert!(
            s.contains(
                "add element inet dataplane backends4 { 172.17.0.2 . 6 . 80, 172.17.0.2 . 17 . 80 }"
            ),
            "{s}"
        );
        assert!(s.contains("add element inet dataplane peers4 { 172.17.0.3 }"));
        // What the packet path learnt is never flushed.
        assert!(s.contains("flush set inet dataplane peers4\n"));
        assert!(!s.contains("flush set inet dataplane natclients"), "{s}");
        assert!(s.contains(
            "set natclients4 { type ipv4_addr . inet_proto . inet_service; flags dynamic,timeout;"
        ));
        assert!(
            replace_script(TABLE, &spec)
                .starts_with("table inet dataplane\ndelete table inet dataplane\n")
        );
        // Requests are untracked only from peers (bridged) or from the host (output);
        // replies only to peers, or to a host socket connected to the backend.
        assert!(
            s.contains("ip saddr @peers4 ip daddr . meta l4proto . th dport @backends4 notrack")
        );
        assert!(
            s.contains("ip daddr @peers4 ip saddr . meta l4proto . th sport @backends4 notrack")
        );
        assert!(s.contains("@backends4 socket wildcard 0 notrack"), "{s}");
        assert!(s.contains("type filter hook output priority raw"));
        assert!(s.contains(
            "add rule inet dataplane output ip daddr . meta l4proto . th dport @backends4 notrack"
        ));
        for line in s.lines().filter(|l| l.contains("notrack")) {
            assert!(
                line.contains("@peers") || line.contains("socket ") || !line.contains("prerouting"),
                "a prerouting rule that matches any client: {line}"
            );
        }
        // A peer's connection through Docker's NAT is recorded before any notrack rule,
        // and its replies stay tracked.
        let pre: Vec<&str> = s.lines().filter(|l| l.contains("prerouting ")).collect();
        assert!(
            pre[1].contains("update @natclients4 { ip saddr . meta l4proto . th sport }"),
            "{pre:?}"
        );
        assert!(
            pre[2].contains("ip daddr . meta l4proto . th dport @natclients4 return"),
            "{pre:?}"
        );
    }

    #[test]
    fn a_stateful_input_policy_keeps_host_clients_tracked() {
        let s = script(TABLE, &spec(true));
        assert!(!s.contains("socket"), "{s}");
        assert!(!s.contains("add rule inet dataplane output"), "{s}");
        // Container clients stay untracked: their packets are forwarded, not INPUT.
        assert!(s.contains("ip saddr @peers4"));
    }

    #[test]
    fn replies_of_nat_carried_connections_stay_tracked() {
        let spec = spec(false);
        let dump = "tcp      6 431999 ESTABLISHED src=172.17.0.3 dst=172.17.0.1 sport=40000 dport=8080 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
                    tcp      6 431999 ESTABLISHED src=10.0.0.9 dst=192.0.2.2 sport=41000 dport=8080 \
                    src=172.17.0.2 dst=10.0.0.9 sport=80 dport=41000 [ASSURED] mark=0 use=1\n\
                    udp      17 29 src=172.17.0.3 dst=172.17.0.1 sport=5000 dport=5353 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=5000 mark=0 use=1\n\
                    tcp      6 119 TIME_WAIT src=172.17.0.3 dst=172.17.0.1 sport=40002 dport=8080 \
                    src=172.17.0.2 dst=172.17.0.3 sport=80 dport=40002 [ASSURED] mark=0 use=1\n\
                    conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n";
        let n = nat_replies(dump, &spec);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        // Only peers' connections (the routed client's reply is tracked anyway).
        assert_eq!(
            n,
            [
                (a("172.17.0.2"), 6, 80, a("172.17.0.3"), 40000),
                (a("172.17.0.2"), 17, 80, a("172.17.0.3"), 5000),
            ]
            .into()
        );
        let mut spec = spec;
        spec.nat_replies = n;
        let s = script(TABLE, &spec);
        assert!(
            s.contains("natreplies4 { 172.17.0.2 . 6 . 80 . 172.17.0.3 . 40000"),
            "{s}"
        );
        let first_notrack = s.lines().position(|l| l.ends_with("notrack")).unwrap();
        let natreplies = s
            .lines()
            .position(|l| l.ends_with("@natreplies4 return"))
            .unwrap();
        assert!(natreplies < first_notrack, "{s}");
    }

    #[test]
    fn empty_sets_have_no_elements_clause() {
        let s = script(TABLE, &Spec::default());
        assert!(!s.contains("add element"), "{s}");
        assert!(s.contains("set backends4 { type ipv4_addr . inet_proto . inet_service; }"));
    }
}
