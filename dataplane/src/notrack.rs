//! Keeps translated connections out of `nf_conntrack`: one nftables table of our own,
//! `inet dataplane`, with `notrack` rules at raw priority for traffic to and from the
//! published backends, replaced as one atomic batch whenever the set of backends or local
//! client networks changes.
//!
//! Why rules are needed at all: the socket layer translates at `connect()`, so the packets
//! are ordinary host-to-container (or container-to-container) traffic; on a host where
//! Docker's iptables rules keep conntrack active, each would get a conntrack entry.
//! What is untracked: packets to a backend `addr.proto.port` (from the host or bridged from
//! a container), and packets from it to a local client (a host address or a Docker bridge
//! network). Replies to external clients, whose connections iptables DNAT carries, stay
//! tracked so their NAT is undone.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use dataplane_common::{Backend, FrontendKey, is_zero};

use crate::{desired::addr_to_ip, netlink::HostAddr};

/// The default table name (`inet dataplane`).
pub const TABLE: &str = "dataplane";

/// What the rules are built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// (backend address, protocol number, backend port).
    pub backends: BTreeSet<(IpAddr, u8, u16)>,
    /// Networks of local clients: host addresses (/32, /128) and Docker bridge networks.
    pub clients: BTreeSet<(IpAddr, u8)>,
}

impl Spec {
    pub fn new<'a>(
        frontends: impl IntoIterator<Item = (&'a FrontendKey, &'a Backend)>,
        addrs: &[HostAddr],
    ) -> Self {
        let mut spec = Self::default();
        for (k, b) in frontends {
            for a in [b.addr4, b.addr6] {
                if !is_zero(&a) {
                    spec.backends.insert((addr_to_ip(&a), k.proto, b.port()));
                }
            }
        }
        for a in addrs {
            let full = if a.ip.is_ipv4() { 32 } else { 128 };
            spec.clients.insert((a.ip, full));
            if crate::netlink::is_docker_bridge(&a.ifname) {
                spec.clients
                    .insert((network(a.ip, a.prefix_len), a.prefix_len));
            }
        }
        spec
    }
}

fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

fn elements(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}; ", items.join(", "))
    }
}

/// The nft script that makes table `t` exactly `spec`, atomically (`nft -f` runs a file as
/// one transaction): create-if-missing, delete, create with content.
pub fn script(t: &str, spec: &Spec) -> String {
    let mut b4 = Vec::new();
    let mut b6 = Vec::new();
    for (ip, proto, port) in &spec.backends {
        match ip {
            IpAddr::V4(_) => b4.push(format!("{ip} . {proto} . {port}")),
            IpAddr::V6(_) => b6.push(format!("{ip} . {proto} . {port}")),
        }
    }
    let mut c4 = Vec::new();
    let mut c6 = Vec::new();
    for (ip, len) in &spec.clients {
        match ip {
            IpAddr::V4(_) => c4.push(format!("{ip}/{len}")),
            IpAddr::V6(_) => c6.push(format!("{ip}/{len}")),
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "table inet {t}");
    let _ = writeln!(s, "delete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");
    let _ = writeln!(
        s,
        "  set backends4 {{ type ipv4_addr . inet_proto . inet_service; {}}}",
        elements(&b4)
    );
    let _ = writeln!(
        s,
        "  set backends6 {{ type ipv6_addr . inet_proto . inet_service; {}}}",
        elements(&b6)
    );
    let _ = writeln!(
        s,
        "  set clients4 {{ type ipv4_addr; flags interval; auto-merge; {}}}",
        elements(&c4)
    );
    let _ = writeln!(
        s,
        "  set clients6 {{ type ipv6_addr; flags interval; auto-merge; {}}}",
        elements(&c6)
    );
    s.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority raw; policy accept;\n    \
         ip daddr . meta l4proto . th dport @backends4 notrack\n    \
         ip saddr . meta l4proto . th sport @backends4 ip daddr @clients4 notrack\n    \
         ip6 daddr . meta l4proto . th dport @backends6 notrack\n    \
         ip6 saddr . meta l4proto . th sport @backends6 ip6 daddr @clients6 notrack\n  }\n",
    );
    s.push_str(
        "  chain output {\n    type filter hook output priority raw; policy accept;\n    \
         ip daddr . meta l4proto . th dport @backends4 notrack\n    \
         ip6 daddr . meta l4proto . th dport @backends6 notrack\n  }\n",
    );
    s.push_str("}\n");
    s
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

    /// Applies `spec` when it differs from what was applied last (or `force`).
    pub fn apply(&mut self, spec: &Spec, force: bool) -> Result<bool> {
        if !force && self.applied.as_ref() == Some(spec) {
            return Ok(false);
        }
        nft(&script(&self.table, spec))?;
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

    fn ha(ip: &str, prefix_len: u8, ifname: &str) -> HostAddr {
        HostAddr {
            ip: ip.parse().unwrap(),
            prefix_len,
            ifname: ifname.into(),
        }
    }

    #[test]
    fn spec_from_frontends_and_addresses() {
        let b = Backend {
            addr4: v4_mapped([172, 17, 0, 2]),
            addr6: "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            port_be: 80u16.to_be(),
            flags: 0,
            id: 0,
        };
        let k1 = FrontendKey::new(dataplane_common::WILDCARD4, 8080, PROTO_TCP);
        let k2 = FrontendKey::new(dataplane_common::WILDCARD6, 8080, PROTO_TCP);
        let k3 = FrontendKey::new(dataplane_common::WILDCARD4, 5353, PROTO_UDP);
        let spec = Spec::new(
            [(&k1, &b), (&k2, &b), (&k3, &b)],
            &[ha("192.0.2.2", 24, "eth0"), ha("172.17.0.1", 16, "docker0")],
        );
        let backends: Vec<String> = spec
            .backends
            .iter()
            .map(|(ip, p, port)| format!("{ip}.{p}.{port}"))
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
        let clients: Vec<String> = spec
            .clients
            .iter()
            .map(|(ip, l)| format!("{ip}/{l}"))
            .collect();
        // The uplink's own address only; the bridge's address and its whole network.
        assert_eq!(
            clients,
            vec!["172.17.0.0/16", "172.17.0.1/32", "192.0.2.2/32"]
        );
        let s = script(TABLE, &spec);
        assert!(
            s.starts_with("table inet dataplane\ndelete table inet dataplane\n"),
            "{s}"
        );
        assert!(
            s.contains("elements = { 172.17.0.2 . 6 . 80, 172.17.0.2 . 17 . 80 }"),
            "{s}"
        );
        assert!(
            s.contains("elements = { fd00::2 . 6 . 80, fd00::2 . 17 . 80 }"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr . meta l4proto . th sport @backends4 ip daddr @clients4 notrack")
        );
        assert!(s.contains("type filter hook output priority raw"));
    }

    #[test]
    fn empty_sets_have_no_elements_clause() {
        let s = script(TABLE, &Spec::default());
        assert!(!s.contains("elements"), "{s}");
        assert!(s.contains("set backends4 { type ipv4_addr . inet_proto . inet_service; }"));
    }

    #[test]
    fn networks_are_masked() {
        assert_eq!(
            network("172.18.3.1".parse().unwrap(), 16).to_string(),
            "172.18.0.0"
        );
        assert_eq!(
            network("fd00:1::5".parse().unwrap(), 64).to_string(),
            "fd00:1::"
        );
        assert_eq!(
            network("10.0.0.1".parse().unwrap(), 0).to_string(),
            "0.0.0.0"
        );
    }
}
