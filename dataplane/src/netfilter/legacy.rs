//! The `DATAPLANE-FWD` chain that earlier versions kept, jumped to from Docker's
//! `DOCKER-USER`: it accepted any forwarded packet to or from a published backend, ahead of
//! the operator's rules and Docker's network isolation. It is no longer created (a
//! container client on another network takes Docker's own path, which decides with
//! Docker's and the operator's rules); the agent and `dataplane uninstall` remove it where
//! an earlier version left it.

use std::process::{Command, Stdio};

pub const CHAIN: &str = "DATAPLANE-FWD";

fn tool(v6: bool) -> &'static str {
    if v6 { "ip6tables" } else { "iptables" }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes the jump from `DOCKER-USER` and the chain, for both families. Returns whether
/// anything was there.
pub fn remove_legacy(chain: &str) -> bool {
    let mut found = false;
    for v6 in [false, true] {
        let ipt = tool(v6);
        if !quiet(Command::new(ipt).args(["-w", "-S", chain])) {
            continue;
        }
        found = true;
        while quiet(Command::new(ipt).args(["-w", "-D", "DOCKER-USER", "-j", chain])) {}
        quiet(Command::new(ipt).args(["-w", "-F", chain]));
        quiet(Command::new(ipt).args(["-w", "-X", chain]));
    }
    found
}
