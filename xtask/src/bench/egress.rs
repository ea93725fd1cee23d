//! Egress policy costs: `docker run` to an enforced policy (and how far ahead of the
//! container's process), what one change costs with 1000 policed containers in the table,
//! what the egress chains cost per packet (iperf3 from a policed container to a "remote"
//! namespace, against an unpoliced one), and what the gate (new veths held while a policed
//! container exists) costs an unpoliced container's first connection.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

use super::{AGENT_SOCKET, Agent, project_root, sh};

/// A namespace behind a veth routed from the host (a non-Docker interface: "the internet"
/// for containers) running `iperf3 -s`; removed on drop.
struct Remote;

const REMOTE_NS: &str = "dpb-remote";
const REMOTE_IF: &str = "dpb-up";
const REMOTE_HOST: &str = "10.104.0.1";
pub(super) const REMOTE: &str = "10.104.0.2";

impl Remote {
    fn new() -> Result<Self> {
        drop(Self);
        let r = Self;
        super::probe::namespace_behind_veth(REMOTE_NS, (REMOTE_IF, "eth0"), REMOTE_HOST, REMOTE)?;
        sh(&[
            "ip", "netns", "exec", REMOTE_NS, "iperf3", "-s", "-D", "-B", REMOTE,
        ])?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(r)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "pids", REMOTE_NS]).map(|pids| {
            for p in pids.split_whitespace() {
                let _ = sh(&["kill", p]);
            }
        });
        let _ = sh(&["ip", "link", "del", REMOTE_IF]);
        let _ = sh(&["ip", "netns", "del", REMOTE_NS]);
    }
}

fn now_us() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
    )
    .unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    testkit::percentile(&s, p).unwrap_or(f64::NAN)
}

/// A `/proc/uptime` reading as unix µs (to its 10 ms resolution).
fn uptime_to_unix_us(text: &str) -> Option<i64> {
    let read = |t: &str| t.split_whitespace().next()?.parse::<f64>().ok();
    let then = read(text)?;
    let now = read(&std::fs::read_to_string("/proc/uptime").ok()?)?;
    #[expect(clippy::cast_possible_truncation, reason = "microseconds")]
    Some(now_us() - ((now - then) * 1e6) as i64)
}

/// When the agent first enforced `name`'s policy (unix µs), waiting up to 2 s.
fn enforced_us(name: &str) -> Option<i64> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if let Ok(v) = dataplane_api::egress_show(std::path::Path::new(AGENT_SOCKET), Some(name))
            && let Some(e) = v.first().filter(|e| e.enforced_unix_us > 0)
        {
            return i64::try_from(e.enforced_unix_us).ok();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn iperf_from(container: &str, secs: u32) -> Result<f64> {
    let out = sh(&[
        "docker",
        "exec",
        container,
        "iperf3",
        "-c",
        REMOTE,
        "-t",
        &secs.to_string(),
        "-P",
        "4",
        "-J",
    ])?;
    let r = testkit::IperfReport::parse(out.as_bytes()).context("iperf3 report")?;
    r.received_bps()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

pub(super) fn egress(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let _ = writeln!(extra, "\n### Egress policy\n");
    apply_cost(quick, extra)?;
    let _remote = Remote::new()?;
    let agent = Agent::start()?;
    run_to_enforced(image, quick, &agent, extra)?;
    gate_delay(image, quick, extra)?;
    let r = per_packet(image, quick, extra);
    drop(agent);
    r
}

fn apply_cost(quick: bool, extra: &mut String) -> Result<()> {
    // One change with 1000 policed containers in the table: the agent's own table code.
    let changes = if quick { "20" } else { "100" };
    let out = Command::new(project_root().join("target/release/examples/egress_apply"))
        .args(["1000", changes])
        .output()
        .context("running egress_apply (cargo xtask build builds it)")?;
    if !out.status.success() {
        bail!("egress_apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        extra,
        "With 1000 policed containers in the table (one `nft` transaction each, {changes} of \
         each): one container's allow-list changed p50 {:.1} ms / p99 {:.1} ms; one \
         container started p50 {:.1} / p99 {:.1} ms; one stopped p50 {:.1} / p99 {:.1} ms; \
         the whole table written {:.0} ms.",
        f("change_p50_ms"),
        f("change_p99_ms"),
        f("start_p50_ms"),
        f("start_p99_ms"),
        f("stop_p50_ms"),
        f("stop_p99_ms"),
        f("full_ms"),
    );
    Ok(())
}

/// `docker run` to the policy in the kernel, and its lead over the process's start.
fn run_to_enforced(image: &str, quick: bool, agent: &Agent, extra: &mut String) -> Result<()> {
    let n = if quick { 20 } else { 100 };
    let (mut run_to, mut lead) = (Vec::new(), Vec::new());
    let mut leaked = 0;
    for i in 0..n {
        let name = format!("dpb-egress-{i}");
        let t0 = now_us();
        sh(&[
            "docker",
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "dataplane.egress.internet=false",
            image,
            "sh",
            "-c",
            &format!(
                "cat /proc/uptime > /tmp/started; \
                 nc -w 1 {REMOTE} 5201 </dev/null 2>/dev/null && echo leaked > /tmp/leaked; \
                 exec sleep 100000"
            ),
        ])?;
        let enforced = enforced_us(&name);
        // The container's own first instruction noted the time (the boot clock, 10 ms).
        let started = sh(&["docker", "exec", &name, "cat", "/tmp/started"])
            .ok()
            .and_then(|up| uptime_to_unix_us(&up));
        // Its first instruction dialled the remote, which its policy closes.
        std::thread::sleep(Duration::from_millis(1200));
        if sh(&["docker", "exec", &name, "cat", "/tmp/leaked"]).is_ok() {
            leaked += 1;
        }
        sh(&["docker", "rm", "-f", &name])?;
        let (Some(e), Some(s)) = (enforced, started) else {
            bail!(
                "{name}: no enforced policy within 2 s\n{}",
                agent.log_text()
            );
        };
        #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
        {
            run_to.push((e - t0) as f64 / 1000.0);
            lead.push((s - e) as f64 / 1000.0);
        }
    }
    let _ = writeln!(
        extra,
        "\n`docker run` of a policed container to its policy in the kernel, {n} runs: p50 {:.1} \
         ms, p99 {:.1} ms. The policy was in place before the container's first instruction \
         ran by p50 {:.1} ms (smallest lead {:.1} ms, to /proc/uptime's 10 ms; negative: the \
         bridge gate held its first packets until then). Each dialled the remote at its first \
         instruction, which its policy closes: {leaked} of {n} got through.",
        pct(&run_to, 0.5),
        pct(&run_to, 0.99),
        pct(&lead, 0.5),
        lead.iter().copied().fold(f64::INFINITY, f64::min),
    );
    Ok(())
}

/// How long an unpoliced container's first connection (at its first instruction, to a
/// closed port of the remote: answered at once by a reset) takes, in `n` `docker run`s.
fn first_connects(image: &str, n: usize) -> Result<Vec<f64>> {
    let script =
        format!("busybox adjtimex; echo --; nc -w 5 {REMOTE} 9 </dev/null; busybox adjtimex");
    let mut out = Vec::new();
    for _ in 0..n {
        let text = sh(&["docker", "run", "--rm", image, "sh", "-c", &script])?;
        let (before, after) = text.split_once("--").context("the container's clock")?;
        let (Some(b), Some(a)) = (
            super::extras::adjtimex_unix_us(before),
            super::extras::adjtimex_unix_us(after),
        ) else {
            bail!("the container's clock: {text}");
        };
        #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
        out.push((a - b) as f64 / 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// The gate's cost: unpoliced containers' first connection with no policed container, and
/// while a policed one is restarted in a loop (the gate holds new veths until the agent has
/// seen them).
fn gate_delay(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let n = if quick { 10 } else { 30 };
    let without = first_connects(image, n)?;
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        "dpb-egress-looper",
        "--label",
        "dataplane.egress.internet=false",
        image,
        "sleep",
        "100000",
    ])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restarts = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if sh(&["docker", "restart", "-t", "0", "dpb-egress-looper"]).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let with = first_connects(image, n);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let restarted = restarts.join().unwrap_or(0);
    let _ = sh(&["docker", "rm", "-f", "dpb-egress-looper"]);
    let with = with?;
    let slow = |v: &[f64]| v.iter().filter(|ms| **ms > 500.0).count();
    let _ = writeln!(
        extra,
        "\nThe gate's cost to unpoliced containers: the first connection at a container's \
         first instruction (to a closed port of the remote: one round trip), {n} `docker run \
         --rm` each. No policed container: p50 {:.1} ms, max {:.1} ms, {} of {n} retried (> \
         500 ms). A policed container restarted in a loop meanwhile ({restarted} restarts): \
         p50 {:.1} ms, max {:.1} ms, {} of {n} retried (TCP's 1 s retransmission: its veth \
         was held until the agent had seen it).",
        testkit::percentile(&without, 0.5).unwrap_or(f64::NAN),
        without.last().copied().unwrap_or(f64::NAN),
        slow(&without),
        testkit::percentile(&with, 0.5).unwrap_or(f64::NAN),
        with.last().copied().unwrap_or(f64::NAN),
        slow(&with),
    );
    Ok(())
}

/// Per-packet cost: iperf3 -P4 to the remote namespace, policed against unpoliced,
/// alternating which goes first.
fn per_packet(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        "dpb-egress-open",
        image,
        "sleep",
        "100000",
    ])?;
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        "dpb-egress-policed",
        "--label",
        "dataplane.egress.internet=false",
        "--label",
        &format!("dataplane.egress.allow={REMOTE}:5201/tcp"),
        image,
        "sleep",
        "100000",
    ])?;
    let secs = if quick { 2 } else { 5 };
    let rounds = if quick { 3 } else { 5 };
    let (mut open, mut policed) = (Vec::new(), Vec::new());
    let r = (|| -> Result<()> {
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                ["dpb-egress-open", "dpb-egress-policed"]
            } else {
                ["dpb-egress-policed", "dpb-egress-open"]
            };
            for c in order {
                let g = iperf_from(c, secs)?;
                if c.ends_with("open") {
                    open.push(g);
                } else {
                    policed.push(g);
                }
            }
        }
        Ok(())
    })();
    let _ = sh(&[
        "docker",
        "rm",
        "-f",
        "dpb-egress-open",
        "dpb-egress-policed",
    ]);
    r?;
    let (unpoliced, with_policy) = (pct(&open, 0.5), pct(&policed, 0.5));
    let ratios: Vec<f64> = policed.iter().zip(&open).map(|(p, o)| p / o).collect();
    let (mean, half) = super::paired::mean_ci(&ratios);
    let _ = writeln!(
        extra,
        "\niperf3 -P4 from a container to a remote namespace through the host ({rounds} rounds \
         of {secs} s, alternating): unpoliced {unpoliced:.2} Gbit/s, policed (internet off, \
         the remote allowed) {with_policy:.2} Gbit/s: ratio per round {mean:.3} [{:.3}-{:.3}] \
         ({}). Every frame of the policed container passes its port's chain in the bridge \
         table (its own MAC and address); only a connection's first packet reaches its \
         policy chain, the rest match `ct state established` in the base chain.",
        mean - half,
        mean + half,
        super::paired::verdict(mean, half),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_readings_in_unix_time() {
        let now = std::fs::read_to_string("/proc/uptime").unwrap();
        let t = uptime_to_unix_us(&now).unwrap();
        assert!((t - now_us()).abs() < 100_000, "{t}");
        assert_eq!(uptime_to_unix_us("garbage"), None);
    }
}
