//! Lets translated traffic cross between Docker bridge networks.
//!
//! docker-proxy reaches a published port from the host, so a container on one bridge
//! network can use `<its gateway>:<published>` to reach a container on another. The socket
//! layer connects the client straight to the backend instead, and that packet crosses
//! bridges through `FORWARD`, where Docker's isolation chains drop it. Docker's documented
//! place for an operator's own forwarding rules is the `DOCKER-USER` chain, which `FORWARD`
//! runs first: the agent keeps a chain of its own, `DATAPLANE-FWD`, jumped to from there,
//! that accepts traffic to and from published backends (what publishing a port already
//! allows from anywhere). It is rewritten in one `iptables-restore` transaction.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

pub const CHAIN: &str = "DATAPLANE-FWD";

/// The `iptables-restore --noflush` input that makes `chain` hold exactly the rules for
/// `backends` of one family: declaring the chain flushes it in the same transaction.
pub fn restore_input(chain: &str, backends: &BTreeSet<(IpAddr, u8, u16)>, v6: bool) -> String {
    let mut s = String::from("*filter\n");
    let _ = writeln!(s, ":{chain} - [0:0]");
    let host = if v6 { 128 } else { 32 };
    for (ip, proto, port) in backends {
        if ip.is_ipv6() != v6 {
            continue;
        }
        let p = match proto {
            6 => "tcp",
            17 => "udp",
            _ => continue,
        };
        let _ = writeln!(
            s,
            "-A {chain} -d {ip}/{host} -p {p} -m {p} --dport {port} -j ACCEPT"
        );
        let _ = writeln!(
            s,
            "-A {chain} -s {ip}/{host} -p {p} -m {p} --sport {port} -j ACCEPT"
        );
    }
    s.push_str("COMMIT\n");
    s
}

fn tool(v6: bool, name: &str) -> String {
    if v6 {
        name.replacen("iptables", "ip6tables", 1)
    } else {
        name.to_string()
    }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether Docker's `DOCKER-USER` chain exists for this family (it does not when Docker
/// runs with `iptables: false`, or for IPv6 without `ip6tables: true`).
fn docker_user_exists(v6: bool) -> bool {
    quiet(Command::new(tool(v6, "iptables")).args(["-w", "-S", "DOCKER-USER"]))
}

fn restore(v6: bool, input: &str) -> Result<()> {
    crate::notrack::run_batch(&tool(v6, "iptables-restore"), &["-w", "--noflush"], input)
}

/// The forwarding exceptions as applied, so unchanged backends cost nothing.
pub struct Forward {
    chain: String,
    applied: Option<BTreeSet<(IpAddr, u8, u16)>>,
}

impl Forward {
    pub fn new(chain: &str) -> Self {
        Self {
            chain: chain.to_string(),
            applied: None,
        }
    }

    /// Makes the chain hold the rules for `backends`, and `DOCKER-USER` jump to it.
    pub fn apply(&mut self, backends: &BTreeSet<(IpAddr, u8, u16)>, force: bool) -> Result<bool> {
        if !force && self.applied.as_ref() == Some(backends) {
            return Ok(false);
        }
        for v6 in [false, true] {
            if !docker_user_exists(v6) {
                continue;
            }
            restore(v6, &restore_input(&self.chain, backends, v6))?;
            let ipt = tool(v6, "iptables");
            let jump = ["DOCKER-USER", "-j", self.chain.as_str()];
            if !quiet(Command::new(&ipt).args(["-w", "-C"]).args(jump)) {
                let ok = quiet(Command::new(&ipt).args(["-w", "-I"]).args(jump));
                if !ok {
                    bail!("{ipt} -I DOCKER-USER -j {} failed", self.chain);
                }
            }
        }
        self.applied = Some(backends.clone());
        Ok(true)
    }

    /// Removes the jump and the chain.
    pub fn remove(&mut self) {
        self.applied = None;
        for v6 in [false, true] {
            let ipt = tool(v6, "iptables");
            while quiet(Command::new(&ipt).args(["-w", "-D", "DOCKER-USER", "-j", &self.chain])) {}
            quiet(Command::new(&ipt).args(["-w", "-F", &self.chain]));
            quiet(Command::new(&ipt).args(["-w", "-X", &self.chain]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_per_family_in_one_transaction() {
        let backends: BTreeSet<(IpAddr, u8, u16)> = [
            ("172.17.0.2".parse().unwrap(), 6, 80),
            ("172.17.0.2".parse().unwrap(), 17, 53),
            ("fd00::2".parse().unwrap(), 6, 80),
        ]
        .into();
        let v4 = restore_input(CHAIN, &backends, false);
        assert_eq!(
            v4,
            "*filter\n:DATAPLANE-FWD - [0:0]\n\
             -A DATAPLANE-FWD -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT\n\
             -A DATAPLANE-FWD -s 172.17.0.2/32 -p tcp -m tcp --sport 80 -j ACCEPT\n\
             -A DATAPLANE-FWD -d 172.17.0.2/32 -p udp -m udp --dport 53 -j ACCEPT\n\
             -A DATAPLANE-FWD -s 172.17.0.2/32 -p udp -m udp --sport 53 -j ACCEPT\n\
             COMMIT\n"
        );
        let v6 = restore_input(CHAIN, &backends, true);
        assert!(v6.contains("-d fd00::2/128 -p tcp -m tcp --dport 80 -j ACCEPT"));
        assert!(!v6.contains("172.17.0.2"));
        assert_eq!(
            restore_input(CHAIN, &BTreeSet::new(), false),
            "*filter\n:DATAPLANE-FWD - [0:0]\nCOMMIT\n"
        );
        assert_eq!(tool(true, "iptables-restore"), "ip6tables-restore");
    }
}
