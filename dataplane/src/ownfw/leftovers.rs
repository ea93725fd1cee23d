//! What Docker leaves in iptables after a run with `"iptables": true`: its chains (`DOCKER`,
//! `DOCKER-ISOLATION-STAGE-*`, `DOCKER-FORWARD`, ...), the rules in the built-in chains that
//! jump to them or name its bridges (raw-table drops, masquerade), and the `FORWARD` policy
//! it set to `DROP`. A later start with `"iptables": false` removes none of it, and the
//! stale rules would translate and drop traffic for addresses Docker now gives to other
//! containers. In the own-firewall mode (Docker's rules off, checked first) the agent
//! removes them; `DOCKER-USER` (the operator's) stays, with its jump.

use std::process::Command;

use crate::ownfw::docker_bridge_name;

/// A Docker chain of the agent to remove (not the operator's `DOCKER-USER`).
fn docker_chain(name: &str) -> bool {
    name.starts_with("DOCKER") && name != "DOCKER-USER"
}

fn is_docker_iface(name: &str) -> bool {
    name == "docker0" || docker_bridge_name(name)
}

/// Splits an `iptables -S` line into arguments (double quotes as the tool writes them).
fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// What to do in one table, from its `-S` listing: the rules to delete (as `-D` argument
/// lists, built-in chains first), the chains to flush and delete, and whether the `FORWARD`
/// policy is `DROP`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub delete: Vec<Vec<String>>,
    pub chains: Vec<String>,
    pub forward_drop: bool,
}

pub fn scan(listing: &str) -> Found {
    let mut f = Found::default();
    for line in listing.lines() {
        let a = split(line);
        match a.first().map(String::as_str) {
            Some("-P") if a.get(1).is_some_and(|c| c == "FORWARD") => {
                f.forward_drop = a.get(2).is_some_and(|p| p == "DROP");
            }
            Some("-N") => {
                if let Some(c) = a.get(1).filter(|c| docker_chain(c)) {
                    f.chains.push(c.clone());
                }
            }
            Some("-A") => {
                let Some(chain) = a.get(1) else { continue };
                if docker_chain(chain) {
                    continue; // goes with its chain
                }
                let jumps = a
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && docker_chain(&w[1]));
                let names_bridge = a
                    .windows(2)
                    .any(|w| (w[0] == "-i" || w[0] == "-o") && is_docker_iface(&w[1]));
                if jumps || (names_bridge && chain != "DOCKER-USER") {
                    let mut d = a.clone();
                    d[0] = "-D".into();
                    f.delete.push(d);
                }
            }
            _ => {}
        }
    }
    f
}

/// Removes Docker's leftovers from every iptables table it writes; returns what was done,
/// one line each (empty: nothing was there).
pub fn remove() -> Vec<String> {
    let mut done = Vec::new();
    let mut had_docker = false;
    let mut forward_drop = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for table in ["raw", "nat", "filter"] {
            let Some(listing) = Command::new(tool)
                .args(["-w", "-t", table, "-S"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            else {
                continue;
            };
            let f = scan(&listing);
            had_docker |= !f.chains.is_empty() || !f.delete.is_empty();
            if f.forward_drop && table == "filter" {
                forward_drop.push(tool);
            }
            let run = |args: &[String]| {
                Command::new(tool)
                    .args(["-w", "-t", table])
                    .args(args)
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            for d in &f.delete {
                if run(d) {
                    done.push(format!("{tool} -t {table} {}", d.join(" ")));
                }
            }
            for c in &f.chains {
                run(&["-F".into(), c.clone()]);
            }
            for c in &f.chains {
                if run(&["-X".into(), c.clone()]) {
                    done.push(format!("{tool} -t {table} -X {c}"));
                }
            }
        }
    }
    // Docker set the policy when it enabled forwarding; with its chains gone it would drop
    // every container's outbound traffic before the agent's table sees it. Only restored
    // where Docker's chains show it was Docker's doing.
    if had_docker {
        for tool in forward_drop {
            let ok = Command::new(tool)
                .args(["-w", "-t", "filter", "-P", "FORWARD", "ACCEPT"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                done.push(format!("{tool} -P FORWARD ACCEPT (Docker had set DROP)"));
            }
        }
    }
    done
}

/// Whether the host's `FORWARD` policy drops (then containers' traffic beyond their bridge
/// is dropped before the agent's table sees it).
pub fn forward_policy_drops() -> bool {
    Command::new("iptables")
        .args(["-w", "-t", "filter", "-S", "FORWARD"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("-P FORWARD DROP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILTER: &str = "-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i eth0 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -i eth0 -m comment --comment \"operator rule\" -j DROP
-A DOCKER-USER -j RETURN";

    #[test]
    fn docker_rules_go_the_operators_stay() {
        let f = scan(FILTER);
        assert!(f.forward_drop);
        assert_eq!(f.chains, vec!["DOCKER", "DOCKER-ISOLATION-STAGE-1"]);
        let d: Vec<String> = f.delete.iter().map(|d| d.join(" ")).collect();
        assert_eq!(
            d,
            vec![
                "-D FORWARD -j DOCKER-ISOLATION-STAGE-1",
                "-D FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-D FORWARD -i docker0 ! -o docker0 -j ACCEPT",
            ]
        );
    }

    #[test]
    fn raw_drops_and_masquerade_of_docker_bridges() {
        let raw = "-P PREROUTING ACCEPT
-A PREROUTING -d 172.18.0.2/32 ! -i br-0123456789ab -j DROP
-A PREROUTING -d 10.9.0.2/32 ! -i br-lan -j DROP";
        assert_eq!(scan(raw).delete.len(), 1);
        let nat = "-N DOCKER
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE";
        let f = scan(nat);
        assert_eq!(f.delete.len(), 2);
        assert_eq!(f.chains, vec!["DOCKER"]);
        assert!(!f.forward_drop);
    }

    #[test]
    fn quoted_arguments() {
        assert_eq!(
            split("-A X -m comment --comment \"a b\" -j DROP"),
            vec!["-A", "X", "-m", "comment", "--comment", "a b", "-j", "DROP"]
        );
    }
}
