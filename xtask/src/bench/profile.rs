//! Where the CPU goes: a system-wide `perf record -a -g` during a few workloads, reporting
//! the share of all CPU samples spent under the functions that are the agent's cost (its
//! nftables tables, its socket hooks, the socket storage they free) and under conntrack
//! (what untracking saves). A share of samples does not move with the machine's speed
//! from one round to the next, as throughput does, so it attributes a few percent that a
//! paired ratio cannot tell from noise.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use super::{Env, P_HTTP, P_IPERF, agent::Agent, clients::iperf_args, project_root, sh};

/// Connections per churn workload (a few seconds at this machine's rate).
const CONNS: usize = 40_000;

/// The functions reported, as `perf report` names them, and what each stands for.
const FUNCS: [(&str, &str); 5] = [
    ("nft_do_chain_inet", "agent's nft tables"),
    ("nf_conntrack_in", "conntrack"),
    ("__cgroup_bpf_run_filter_sock_addr", "socket hooks"),
    ("__cgroup_bpf_run_filter_setsockopt", "setsockopt hook"),
    ("bpf_sk_storage_free", "socket storage freed"),
];

/// The share (percent, children included) of each of [`FUNCS`] in `perf report` output.
pub(super) fn shares(report: &str) -> Vec<f64> {
    FUNCS
        .iter()
        .map(|(f, _)| {
            report
                .lines()
                .find(|l| l.trim_end().ends_with(&format!("] {f}")))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|p| p.trim_end_matches('%').parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .collect()
}

/// Runs `cmd` under a system-wide profile; the shares of [`FUNCS`].
fn profiled(cmd: &[String]) -> Result<Vec<f64>> {
    let data = "/run/dataplane-bench/profile.data";
    let mut args = vec![
        "perf".to_string(),
        "record".into(),
        "-q".into(),
        "-a".into(),
        "-g".into(),
        "-o".into(),
        data.into(),
        "--".into(),
        "taskset".into(),
        "-c".into(),
        "0".into(),
    ];
    args.extend(cmd.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(&refs).context("perf record (Debian's linux-perf)")?;
    let report = sh(&[
        "perf",
        "report",
        "-i",
        data,
        "--children",
        "--sort",
        "sym",
        "--stdio",
        "-g",
        "none",
    ])?;
    let _ = std::fs::remove_file(data);
    Ok(shares(&report))
}

/// The profile section: iperf3 -P4 and connection churn from the host, straight to the
/// container (an unpublished port, then a backend's port) and through `127.0.0.1:P`, with
/// the agent running; the direct ones again with no agent.
pub(super) fn profile(env: &Env) -> Result<String> {
    if sh(&["perf", "--version"]).is_err() {
        return Ok("\nProfile: `perf` is not installed (Debian's linux-perf): skipped.\n".into());
    }
    let secs = if env.quick { 3 } else { 5 };
    let iperf = |host: &str, port: u16| iperf_args(host, port, 4, false, false, secs);
    let churn = |host: &str, port: u16| {
        vec![
            project_root()
                .join("target/release/dp-churn")
                .display()
                .to_string(),
            host.to_string(),
            port.to_string(),
            CONNS.to_string(),
            "16".into(),
        ]
    };
    let _server = super::paired::ExtraServer::start(5203)?;
    let runs: Vec<(&str, Vec<String>)> = vec![
        (
            "iperf3 -P4, host -> container, unpublished port",
            iperf(&env.srv_ip, 5203),
        ),
        (
            "iperf3 -P4, host -> container, backend's port",
            iperf(&env.srv_ip, 5201),
        ),
        (
            "iperf3 -P4, host -> 127.0.0.1:P (translated)",
            iperf("127.0.0.1", P_IPERF),
        ),
        (
            "conn/s c=16, host -> container, backend's port",
            churn(&env.http_ip, 80),
        ),
        (
            "conn/s c=16, host -> 127.0.0.1:P (translated)",
            churn("127.0.0.1", P_HTTP),
        ),
    ];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Where the CPU goes (`perf record -a -g`, {secs} s or {CONNS} connections each; \
         share of all CPU samples under each function, callees included)\n"
    );
    let _ = writeln!(
        md,
        "| workload | agent | {} |",
        FUNCS.map(|(_, what)| what).join(" | ")
    );
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(FUNCS.len()));
    let r = (|| -> Result<()> {
        let mut row = |what: &str, agent: &str, cmd: &[String]| -> Result<()> {
            println!("bench: profile, {what} ({agent})");
            let s = profiled(cmd)?;
            let cells: Vec<String> = s.iter().map(|v| format!("{v:.2}%")).collect();
            let _ = writeln!(md, "| {what} | {agent} | {} |", cells.join(" | "));
            Ok(())
        };
        {
            let _agent = Agent::start()?;
            for (what, cmd) in &runs {
                row(what, "running", cmd)?;
            }
        }
        for (what, cmd) in runs.iter().filter(|(w, _)| !w.contains("translated")) {
            row(what, "none", cmd)?;
        }
        Ok(())
    })();
    r?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_read_from_the_children_column() {
        let report = "# Overhead\n\
                      \x20    10.00%     0.62%  [k] nf_hook_slow\n\
                      \x20     3.71%     0.22%  [k] nft_do_chain_inet\n\
                      \x20     3.56%     1.74%  [k] nft_do_chain\n\
                      \x20     1.69%     0.23%  [k] __cgroup_bpf_run_filter_sock_addr\n";
        let s = shares(report);
        assert_eq!(s, vec![3.71, 0.0, 1.69, 0.0, 0.0]);
    }
}
