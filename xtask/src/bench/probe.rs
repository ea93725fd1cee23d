//! Facts about the host and the engine the bench reads: addresses, processes, CPU, memory,
//! conntrack and `TIME_WAIT` counts.

use std::{fs, process::Command};

use anyhow::Result;

use super::output;

pub(super) fn sh(args: &[&str]) -> Result<String> {
    output(Command::new(args[0]).args(&args[1..]))
}

/// A network namespace `ns` behind the veth `host_if` (its peer `peer` inside), the host at
/// `gateway`/24 on it and the namespace at `inside_ip`/24, its default route through the host.
pub(super) fn namespace_behind_veth(
    ns: &str,
    (host_if, peer): (&str, &str),
    gateway: &str,
    inside_ip: &str,
) -> Result<()> {
    sh(&["ip", "netns", "add", ns])?;
    sh(&[
        "ip", "link", "add", host_if, "type", "veth", "peer", "name", peer, "netns", ns,
    ])?;
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{gateway}/24"),
        "dev",
        host_if,
    ])?;
    sh(&["ip", "link", "set", host_if, "up"])?;
    let inside = |args: &[&str]| {
        let mut a = vec!["ip", "-n", ns];
        a.extend_from_slice(args);
        sh(&a)
    };
    inside(&["addr", "add", &format!("{inside_ip}/24"), "dev", peer])?;
    inside(&["link", "set", peer, "up"])?;
    inside(&["link", "set", "lo", "up"])?;
    inside(&["route", "add", "default", "via", gateway])?;
    Ok(())
}

pub(super) fn inspect(name: &str, fmt: &str) -> Result<String> {
    Ok(sh(&["docker", "inspect", "-f", fmt, name])?
        .trim()
        .to_string())
}

pub(super) fn ip_of(name: &str) -> Result<String> {
    inspect(
        name,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    )
}

pub(super) fn host_ipv4() -> Option<String> {
    let out = sh(&["ip", "-4", "-o", "addr", "show", "scope", "global"]).ok()?;
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ifname = *f.get(1)?;
        if ifname == "docker0" || ifname.starts_with("br-") || ifname.starts_with("veth") {
            return None;
        }
        Some(f.get(3)?.split('/').next()?.to_string())
    })
}

pub(super) fn docker_proxy_pids() -> Vec<u32> {
    sh(&["pgrep", "-x", "docker-proxy"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub(super) fn docker_proxy_for(port: u16) -> bool {
    sh(&["pgrep", "-af", "docker-proxy"])
        .unwrap_or_default()
        .contains(&format!("-host-port {port}"))
}

/// CPU ticks (user + system) of the given processes.
pub(super) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|st| {
            let rest = st.rsplit(')').next()?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

pub(super) fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(super) fn conntrack_count() -> u64 {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .map_or(0, |s| s.trim().parse().unwrap_or(0))
}

pub(super) fn time_wait_count() -> u64 {
    sh(&["ss", "-tanH", "state", "time-wait"]).map_or(0, |s| s.lines().count() as u64)
}
