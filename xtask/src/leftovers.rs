//! What the tests must not run beside: an agent of the host's own (the package's service, a
//! `cargo xtask run` in another terminal, a `dataplane run` by hand), running or stopped with
//! its state left in place. The tests' agents attach at the cgroup2 root with tables of their
//! own; another agent's programs there, its notrack rules for addresses Docker has since
//! given to the tests' containers, or its egress table's input drops would change what the
//! tests measure. The harness refuses, and says what to run.

use std::{fs, path::Path, process::Command};

use anyhow::{Result, bail};

/// The agent's defaults (`dataplane run --help`).
const PIN_DIR: &str = "/sys/fs/bpf/dataplane";
const TABLES: &[&str] = &["dataplane", "dataplane_egress", "dataplane_fw"];

/// Processes that run `dataplane run`: (pid, command line).
fn running_agents() -> Vec<(u32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let raw = fs::read(e.path().join("cmdline")).ok()?;
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            is_agent(&argv).then(|| (pid, argv.join(" ")))
        })
        .collect()
}

/// Whether a command line is an agent's: `dataplane run ...`.
fn is_agent(argv: &[String]) -> bool {
    argv.first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "dataplane")
        && argv.get(1).is_some_and(|a| a == "run")
}

/// The agent's default tables that exist now (`family name`).
fn default_tables() -> Vec<String> {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return Vec::new();
    };
    tables_named(&String::from_utf8_lossy(&out.stdout))
}

fn tables_named(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("table")).then_some(())?;
            let (family, name) = (w.next()?, w.next()?);
            TABLES.contains(&name).then(|| format!("{family} {name}"))
        })
        .collect()
}

/// Refuses (with what to run) while an agent runs on the host or a stopped one left its
/// pins or tables.
pub fn refuse_beside_an_agent() -> Result<()> {
    if let Some((pid, cmd)) = running_agents().into_iter().next() {
        bail!(
            "an agent runs on this host (pid {pid}: {cmd}); the tests run their own agents at \
             the cgroup2 root and cannot run beside it. Stop it first: Ctrl-C in `cargo xtask \
             run`, or `systemctl stop dataplane && dataplane uninstall` for the package's \
             service (a stopped agent keeps its state)."
        );
    }
    let tables = default_tables();
    let pins = Path::new(PIN_DIR).exists();
    if pins || !tables.is_empty() {
        let mut what = Vec::new();
        if pins {
            what.push(format!("pins in {PIN_DIR}"));
        }
        what.extend(tables.iter().map(|t| format!("table {t}")));
        bail!(
            "a stopped agent left its state on this host ({}): its programs and rules would \
             act on the tests' containers. Remove it with `target/release/dataplane \
             uninstall` (the package's: `dataplane uninstall`; add the --pin-dir/--nft-table \
             it ran with), then run the tests again.",
            what.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_agents_and_their_tables_only() {
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(is_agent(&argv("/usr/sbin/dataplane run --own-firewall")));
        assert!(is_agent(&argv("target/release/dataplane run")));
        assert!(!is_agent(&argv("dataplane uninstall")));
        assert!(!is_agent(&argv("/usr/bin/bridge-ctl run")));
        let listing = "table inet dataplane\ntable bridge dataplane_egress\n\
                       table inet dataplane_e2e_12\ntable ip docker-bridges\n";
        assert_eq!(
            tables_named(listing),
            ["inet dataplane", "bridge dataplane_egress"]
        );
    }
}
