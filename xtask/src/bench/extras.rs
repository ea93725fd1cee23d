//! What the bench measures besides the paths: per-port cost, map memory, sync latency,
//! cold start, and the cost of a stateful INPUT policy.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Agent, P_RANGE, P_STATEFUL, P_SYNC, docker, docker_proxy_pids, ip_of, rss_kib, sh, stats,
    wait_running,
};

/// Per-port cost: `docker run` / `docker stop` of a container publishing `n` ports.
pub(super) fn per_port(
    image: &str,
    n: u16,
    with_agent: Option<&Agent>,
    out: &mut String,
    label: &str,
) -> Result<()> {
    let range = format!(
        "{P_RANGE}-{}:{P_RANGE}-{}",
        P_RANGE + n - 1,
        P_RANGE + n - 1
    );
    let procs0 = docker_proxy_pids().len();
    let agent_rss0 = with_agent.map_or(0, |a| rss_kib(a.pid()));
    let maps0 = map_memory_kib();
    let t = Instant::now();
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        "dpb-ports",
        "-p",
        &range,
        image,
        "sleep",
        "100000",
    ])?;
    let run_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let pids = docker_proxy_pids();
    let proxy_rss: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let agent_rss1 = with_agent.map_or(0, |a| rss_kib(a.pid()));
    // What an operator's tools pay with this many bindings: a metrics scrape, the
    // frontends list.
    let tools = if with_agent.is_some() {
        let (took, bytes) = Agent::scrape()?;
        let t = Instant::now();
        let listed = dataplane_api::frontends(std::path::Path::new(super::AGENT_SOCKET))
            .map_or(0, |f| f.len());
        format!(
            ", maps {:+} KiB; scrape {:.1} ms ({} KiB), frontends list {:.1} ms ({listed})",
            i64::try_from(map_memory_kib()).unwrap_or(0) - i64::try_from(maps0).unwrap_or(0),
            took.as_secs_f64() * 1e3,
            bytes / 1024,
            t.elapsed().as_secs_f64() * 1e3
        )
    } else {
        String::new()
    };
    let t = Instant::now();
    sh(&["docker", "stop", "-t", "0", "dpb-ports"])?;
    let stop_s = t.elapsed().as_secs_f64();
    sh(&["docker", "rm", "-f", "dpb-ports"])?;
    let procs = pids.len().saturating_sub(procs0);
    let mem = if with_agent.is_some() {
        format!(
            "agent RSS {:+} KiB{tools}",
            i64::try_from(agent_rss1).unwrap_or(0) - i64::try_from(agent_rss0).unwrap_or(0)
        )
    } else if proxy_rss == 0 {
        "-".to_string()
    } else {
        format!("docker-proxy RSS {proxy_rss} KiB")
    };
    let _ = writeln!(
        out,
        "| {label} | {n} | {run_s:.2} | {stop_s:.2} | {procs} | {mem} |"
    );
    Ok(())
}

/// Map memory of the agent's maps, from bpftool.
pub(super) fn map_memory_kib() -> u64 {
    let text = sh(&["bpftool", "map", "show"]).unwrap_or_default();
    let mut total = 0;
    let mut ours = false;
    for line in text.lines() {
        if line.contains(" name ") {
            ours = line.contains("name DP_");
        }
        if ours && let Some(i) = line.find("memlock ") {
            let n: String = line[i + 8..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            total += n.parse::<u64>().unwrap_or(0);
            ours = false;
        }
    }
    total / 1024
}

/// A pinned agent for the start and restart timings (its own pin directory, socket and
/// tables), as an operator runs it.
struct Timed;

const TIMED_PINS: &str = "/sys/fs/bpf/dataplane-bench";
const TIMED_SOCKET: &str = "/run/dataplane-bench/timed.sock";

impl Timed {
    fn args(sub: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            sub,
            "--pin-dir",
            TIMED_PINS,
            "--socket",
            TIMED_SOCKET,
            "--nft-table",
            "dataplane_bench",
            "--fwd-chain",
            "DATAPLANE-BENCH",
            "--state-dir",
            "/run/dataplane-bench/state",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        if sub == "run" {
            a.extend(["--config".into(), "/run/dataplane-bench/empty.toml".into()]);
        }
        a
    }

    /// Starts `dataplane run` and asks `bridge-ctl status` every millisecond until it exits
    /// 0: milliseconds from the exec to that exit, as an operator would time it.
    fn start() -> Result<(std::process::Child, f64)> {
        let root = crate::util::project_root().join("target/release");
        std::fs::create_dir_all("/run/dataplane-bench")?;
        std::fs::write("/run/dataplane-bench/empty.toml", "")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/run/dataplane-bench/timed.log")?;
        let t = Instant::now();
        let mut child = Command::new(root.join("dataplane"))
            .args(Self::args("run"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        loop {
            let ok = Command::new(root.join("bridge-ctl"))
                .args(["--socket", TIMED_SOCKET, "status"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok((child, t.elapsed().as_secs_f64() * 1e3));
            }
            if t.elapsed() > Duration::from_secs(30) {
                // Not left running: the caller uninstalls the pins.
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent did not become ready; see /run/dataplane-bench/timed.log");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the agent as systemd would (SIGTERM; pinned programs stay).
    fn stop(mut child: std::process::Child) {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = child.wait();
    }

    /// Stops it at once (`kill -9`: nothing left for the next start but the pins).
    fn kill(mut child: std::process::Child) {
        let _ = child.kill();
        let _ = child.wait();
    }

    fn uninstall() {
        let root = crate::util::project_root().join("target/release");
        let _ = Command::new(root.join("dataplane"))
            .args(Self::args("uninstall"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The timings of [`cold_starts`] for one number of running containers.
fn timings(rounds: usize, label: &str, extra: &mut String) -> Result<()> {
    let (mut first, mut restart, mut killed) = (Vec::new(), Vec::new(), Vec::new());
    Timed::uninstall();
    for _ in 0..rounds {
        let (c, ms) = Timed::start()?;
        first.push(ms);
        Timed::stop(c);
        Timed::uninstall();
    }
    let (c, _) = Timed::start()?;
    Timed::stop(c);
    for _ in 0..rounds {
        let (c, ms) = Timed::start()?;
        restart.push(ms);
        Timed::stop(c);
    }
    for _ in 0..rounds {
        let (c, ms) = Timed::start()?;
        Timed::kill(c);
        killed.push(ms);
    }
    let (c, ms) = Timed::start()?;
    killed.push(ms);
    killed.remove(0);
    Timed::stop(c);
    Timed::uninstall();
    for (what, v) in [
        ("first start (no pins)", &first),
        ("restart (SIGTERM, then start)", &restart),
        ("restart after `kill -9`", &killed),
    ] {
        let (m, lo, hi) = stats(v);
        let _ = writeln!(extra, "| {label} | {what} | {m:.1} | {lo:.1} | {hi:.1} |");
    }
    Ok(())
}

/// First start (no pins: everything loaded and attached), restart of the same build (pins
/// in place: SIGTERM then start, and `kill -9` then start), as an operator times them (exec
/// of `dataplane run` to `bridge-ctl status` exiting 0), with the bench's 3 containers and
/// with 100 more; median of 5.
pub(super) fn cold_starts(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let rounds = 5;
    let measure = |label: &str, extra: &mut String| -> Result<()> {
        let r = timings(rounds, label, extra);
        if r.is_err() {
            // A start that failed midway leaves no agent (see `Timed::start`) but its pins.
            Timed::uninstall();
        }
        r
    };
    let _ = writeln!(
        extra,
        "\n### Agent start to ready, as an operator times it (ms)\n\nFrom the exec of \
         `dataplane run` to `bridge-ctl status` exiting 0 (asked every millisecond), median of \
         {rounds}. A restart of the same build takes its pinned programs as they are (nothing \
         loaded or verified), and the inspects the last agent left for the containers that did \
         not change since (after a `kill -9` there are none: every container is inspected).\n\n\
         | running containers | start | median | min | max |\n|---|---|---|---|---|"
    );
    measure("3", extra)?;
    let many = if quick { 20 } else { 100 };
    for i in 0..many {
        sh(&[
            "docker",
            "run",
            "-d",
            "--name",
            &format!("dpb-many-{i}"),
            "-p",
            &format!("{}:80", P_RANGE + 2000 + i),
            image,
            "sleep",
            "100000",
        ])?;
    }
    let r = measure(&format!("{}", many + 3), extra);
    for i in 0..many {
        let _ = sh(&["docker", "rm", "-f", &format!("dpb-many-{i}")]);
    }
    r
}

/// Per-port cost, sync latency and cold start, with the engine as `cargo xtask run` has it
/// (userland proxy off) at the end.
pub(super) fn extras(
    image: &str,
    quick: bool,
    names: &[&str],
    engine: crate::engines::Engine,
) -> Result<String> {
    let mut extra = String::new();
    let _ = writeln!(extra, "\n### Per published port\n");
    let _ = writeln!(
        extra,
        "| variant | ports | docker run s | docker stop s | processes added | memory |"
    );
    let _ = writeln!(extra, "|---|---|---|---|---|---|");
    let counts: &[u16] = if quick { &[1, 100] } else { &[1, 100, 1000] };
    docker::restart_engine(engine, true)?;
    for n in counts {
        per_port(image, *n, None, &mut extra, "docker-proxy")?;
    }
    docker::restart_engine(engine, false)?;
    wait_running(names)?;
    for n in counts {
        per_port(image, *n, None, &mut extra, "iptables NAT")?;
    }
    let agent = Agent::start()?;
    for n in counts {
        per_port(image, *n, Some(&agent), &mut extra, "dataplane")?;
    }
    let _ = writeln!(
        extra,
        "\nMaps of the agent (bpftool's memlock; the hash maps allocate entries as they are \
         added, so a published port costs what `maps` says above): {} KiB fixed, with the \
         bench's own 3 containers published.",
        map_memory_kib()
    );

    // Sync latency: start event -> frontend in the map, as the agent measures it.
    let starts = if quick { 20 } else { 100 };
    // Only this loop's starts count (the per-port runs before started containers too).
    let before = Agent::status().unwrap_or_default();
    let (synced_before, early_before) = (before.start_sync_us.len(), before.early_lead_us.len());
    for i in 0..starts {
        let name = format!("dpb-sync-{i}");
        sh(&[
            "docker",
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            &format!("{}:80", P_SYNC + (i % 5)),
            image,
            "sleep",
            "100000",
        ])?;
        let want = format!("0.0.0.0:{}/tcp", P_SYNC + (i % 5));
        let t = Instant::now();
        while !Agent::has_frontend(&want) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        sh(&["docker", "rm", "-f", &name])?;
    }
    let status = Agent::status().unwrap_or_default();
    #[expect(clippy::cast_precision_loss, reason = "microseconds")]
    let lat: Vec<f64> = status.start_sync_us[synced_before.min(status.start_sync_us.len())..]
        .iter()
        .map(|us| *us as f64)
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "microseconds")]
    let mut leads: Vec<f64> = status.early_lead_us[early_before.min(status.early_lead_us.len())..]
        .iter()
        .map(|us| *us as f64)
        .collect();
    leads.sort_by(f64::total_cmp);
    let mut first = String::new();
    ready_before_process(image, starts, &mut first)?;
    drop(agent);
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| testkit::percentile(&sorted, p).map_or(f64::NAN, |us| us / 1000.0);
    let _ = writeln!(
        extra,
        "\n### Sync latency\n\nOf {starts} `docker run -d`, {} had their frontends written at \
         `network connect`, before Docker's start event (by p50 {:.2} ms; from the create-time \
         inspect, or Docker's own files when it had not answered yet); the other {} from the \
         start event: p50 {:.2} ms, p99 {:.2} ms after it.",
        leads.len(),
        testkit::percentile(&leads, 0.5).map_or(f64::NAN, |us| us / 1000.0),
        lat.len(),
        pct(0.5),
        pct(0.99)
    );
    extra.push_str(&first);

    super::egress::egress(image, quick, &mut extra)?;
    super::pause::pause_reset(image, quick, &mut extra)?;
    stateful_input_cost(image, quick, &mut extra)?;
    cold_starts(image, quick, &mut extra)?;
    Ok(extra)
}

/// The unix time in microseconds `busybox adjtimex` printed (`time.tv_usec` holds
/// nanoseconds when the status has `STA_NANO`, 0x2000).
pub(super) fn adjtimex_unix_us(out: &str) -> Option<i64> {
    let field = |name: &str| {
        out.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().trim_start_matches("-o").trim() == name)
                .then(|| v.split_whitespace().next()?.parse::<i64>().ok())?
        })
    };
    let (sec, sub, status) = (
        field("time.tv_sec")?,
        field("time.tv_usec")?,
        field("status")?,
    );
    let us = if status & 0x2000 != 0 {
        sub / 1000
    } else {
        sub
    };
    Some(sec * 1_000_000 + us)
}

/// Frontends in the map relative to the container's process start: each container's first
/// process (`busybox adjtimex`, the container's PID 1) prints the time it started; the agent
/// says when the container's frontends first went into the map.
fn ready_before_process(image: &str, starts: u16, extra: &mut String) -> Result<()> {
    let mut started = Vec::new();
    for i in 0..starts {
        let name = format!("dpb-first-{i}");
        let id = sh(&[
            "docker",
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            &format!("{}:80", P_SYNC + (i % 5)),
            "--entrypoint",
            "/bin/busybox",
            image,
            "adjtimex",
        ])?;
        let _ = sh(&["docker", "wait", &name]);
        let at = adjtimex_unix_us(&sh(&["docker", "logs", &name])?);
        sh(&["docker", "rm", "-f", &name])?;
        started.push((id.trim().to_string(), at));
    }
    let written: std::collections::BTreeMap<String, u64> = Agent::status()
        .unwrap_or_default()
        .frontends_written_us
        .into_iter()
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "microseconds")]
    let mut rel: Vec<f64> = started
        .iter()
        .filter_map(|(id, at)| {
            let w = i64::try_from(*written.get(id)?).ok()?;
            Some((w - (*at)?) as f64 / 1000.0)
        })
        .collect();
    rel.sort_by(f64::total_cmp);
    let before = rel.iter().filter(|ms| **ms < 0.0).count();
    let pct = |p: f64| testkit::percentile(&rel, p).unwrap_or(f64::NAN);
    let _ = writeln!(
        extra,
        "\nFrontends in the map relative to the container's process start (its PID 1, `busybox \
         adjtimex`, prints the time; negative: before), {starts} `docker run -d`: {before} of \
         {starts} before ({:.1}%); p50 {:.2} ms, p99 {:.2} ms, latest {:.2} ms{}.",
        f64::from(u32::try_from(before).unwrap_or(0)) * 100.0 / f64::from(starts),
        pct(0.5),
        pct(0.99),
        rel.last().copied().unwrap_or(f64::NAN),
        if rel.len() < usize::from(starts) {
            format!(
                "; {} never written (the container had exited before its start event was handled)",
                usize::from(starts) - rel.len()
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Conntrack entries whose original destination is `addr:80/tcp`.
pub(super) fn tracked_to_port_80(addr: &str) -> usize {
    sh(&["conntrack", "-L", "-p", "tcp", "-d", addr, "--dport", "80"])
        .map_or(0, |s| s.lines().count())
}

/// `n` short HTTP/1.0 requests to `127.0.0.1:port`, one connection each.
pub(super) fn http_requests(port: u16, n: usize) -> Result<()> {
    use std::io::{Read, Write};
    for _ in 0..n {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut sink = Vec::new();
        s.read_to_end(&mut sink)?;
    }
    Ok(())
}

/// On a host with a stateful INPUT policy (an operator's `ct state established` accept then
/// drop), host clients' translated connections stay tracked: how many entries that costs
/// per connection, against the same clients without the policy.
pub(super) fn stateful_input_cost(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let name = "dpb-stateful";
    let table = "dataplane_bench_operator";
    let _ = sh(&["docker", "rm", "-f", name]);
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "-p",
        &format!("{P_STATEFUL}:80"),
        image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    let r = (|| -> Result<(f64, f64, usize)> {
        let cip = ip_of(name)?;
        let agent = Agent::start()?;
        let n = if quick { 300 } else { 1000 };
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let per_conn = |n: usize| -> Result<f64> {
            let before = tracked_to_port_80(&cip);
            http_requests(P_STATEFUL, n)?;
            Ok(tracked_to_port_80(&cip).saturating_sub(before) as f64 / n as f64)
        };
        let without = per_conn(n)?;
        let bridge = sh(&[
            "docker",
            "network",
            "inspect",
            "-f",
            "{{index .Options \"com.docker.network.bridge.name\"}}",
            "bridge",
        ])?;
        let script = format!(
            "table inet {table} {{ chain input {{ type filter hook input priority 0; policy accept;\n\
             ct state established,related accept\n iifname \"{}\" drop\n }}\n}}\n",
            bridge.trim()
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(
            &mut child.stdin.take().context("nft stdin")?,
            script.as_bytes(),
        )?;
        if !child.wait()?.success() {
            bail!("nft refused the operator's table");
        }
        let t = Instant::now();
        while Agent::status().is_none_or(|s| s.host_clients_tracked.is_none()) {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the agent did not notice the stateful INPUT policy");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let with = per_conn(n)?;
        drop(agent);
        Ok((without, with, n))
    })();
    let _ = sh(&["nft", "delete", "table", "inet", table]);
    let _ = sh(&["docker", "rm", "-f", name]);
    let (without, with, n) = match r {
        Ok(v) => v,
        Err(e) => {
            // The rest of the report stands; say what could not be measured.
            let _ = writeln!(
                extra,
                "\n### Hosts with a stateful INPUT policy\n\nNot measured: {e:#}"
            );
            return Ok(());
        }
    };
    let _ = writeln!(
        extra,
        "\n### Hosts with a stateful INPUT policy\n\n\
         Conntrack entries per translated host connection ({n} connections to 127.0.0.1:P): \
         {without:.2} without an operator's stateful INPUT policy, {with:.2} with one (the \
         agent then keeps host clients' connections tracked, as on the direct path, so that \
         their replies pass the policy). Container clients stay untracked either way."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn adjtimex_time_in_nanoseconds_or_microseconds() {
        let out = "    status:       8256 (UNSYNC)\n    time.tv_sec:  1796200343\n    time.tv_usec: 167731262\n";
        assert_eq!(super::adjtimex_unix_us(out), Some(1_796_200_343_167_731));
        let us = "    status:       64 (UNSYNC)\n    time.tv_sec:  10\n    time.tv_usec: 5\n";
        assert_eq!(super::adjtimex_unix_us(us), Some(10_000_005));
        assert_eq!(super::adjtimex_unix_us("nothing"), None);
    }
}
