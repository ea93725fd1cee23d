//! The own-firewall mode against Docker's own rules (both with the agent running): what a
//! `docker run` and `docker stop` cost with 0, 100 and 1000 published ports, start latency
//! with 16 clients starting and removing containers at once, the agent's event-to-map
//! latency meanwhile, and the local paths' ratios in the mode.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{Agent, Env, P_HTTP, P_RANGE, agent::OWN_FIREWALL, docker, ip_of, sh, wait_running};

/// Ports the contention clients publish (one each).
const P_CONTENTION: u16 = 27100;
const CLIENTS: u16 = 16;

/// `docker run -d` of a container publishing `n` ports, then `docker stop` and `rm`: the
/// seconds each of the first two took.
fn run_stop(image: &str, n: u16) -> Result<(f64, f64)> {
    let range = format!(
        "{P_RANGE}-{}:{P_RANGE}-{}",
        P_RANGE + n.max(1) - 1,
        P_RANGE + n.max(1) - 1
    );
    let mut args = vec!["docker", "run", "-d", "--name", "dpb-ports"];
    if n > 0 {
        args.extend(["-p", &range]);
    }
    args.extend([image, "sleep", "100000"]);
    let t = Instant::now();
    sh(&args)?;
    let run_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sh(&["docker", "stop", "-t", "0", "dpb-ports"])?;
    let stop_s = t.elapsed().as_secs_f64();
    sh(&["docker", "rm", "-f", "dpb-ports"])?;
    Ok((run_s, stop_s))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    testkit::percentile(v, 0.5).unwrap_or(f64::NAN)
}

/// What 16 clients starting and removing containers for a while saw.
struct Contention {
    starts_s: Vec<f64>,
    failures: usize,
    first_failure: Option<String>,
    /// Event-to-map latencies (ms) the agent measured meanwhile (mostly the probe's: a
    /// client's container is often removed before the agent handles its start), and how
    /// many starts had their frontends written before Docker's start event.
    sync_ms: Vec<f64>,
    early: usize,
    /// CPU seconds the agent used.
    agent_cpu_s: f64,
}

/// CPU seconds (user and system) process `pid` has used.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the command.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "clock ticks")]
    let s = ticks as f64 / 100.0;
    s
}

/// `docker run -d` then `docker rm -f` of container `name` publishing `ports` from `first`,
/// in a loop until `stop_at`; `linger` between them. Start seconds, and failures.
fn start_loop(
    image: &str,
    name: &str,
    first: u16,
    ports: u16,
    linger: Duration,
    stop_at: Instant,
) -> (Vec<f64>, Vec<String>) {
    let publish = if ports == 1 {
        format!("{first}:80")
    } else {
        format!("{first}-{}:8000-{}", first + ports - 1, 8000 + ports - 1)
    };
    let mut starts = Vec::new();
    let mut failed = Vec::new();
    let _ = sh(&["docker", "rm", "-f", name]);
    while Instant::now() < stop_at {
        let t = Instant::now();
        let out = Command::new("docker")
            .args(["run", "-d", "--name", name, "-p", &publish, image])
            .args(["sleep", "100000"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => starts.push(t.elapsed().as_secs_f64()),
            Ok(o) => failed.push(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => failed.push(e.to_string()),
        }
        std::thread::sleep(linger);
        let _ = sh(&["docker", "rm", "-f", name]);
    }
    (starts, failed)
}

/// [`CLIENTS`] threads each publishing `ports` ports, for `secs`; beside them a probe that
/// starts a container every so often and keeps it 1.5 s, so the agent measures its
/// event-to-map latency under the load.
fn contention(image: &str, secs: u64, ports: u16, agent_pid: u32) -> Contention {
    let before = Agent::status().unwrap_or_default();
    let cpu0 = cpu_s(agent_pid);
    let stop_at = Instant::now() + Duration::from_secs(secs);
    let probe = {
        let image = image.to_string();
        std::thread::spawn(move || {
            start_loop(
                &image,
                "dpb-cont-probe",
                P_CONTENTION - 1,
                1,
                Duration::from_millis(1500),
                stop_at,
            )
        })
    };
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let image = image.to_string();
            std::thread::spawn(move || {
                start_loop(
                    &image,
                    &format!("dpb-cont-{i}"),
                    P_CONTENTION + i * 20,
                    ports,
                    Duration::ZERO,
                    stop_at,
                )
            })
        })
        .collect();
    let mut c = Contention {
        starts_s: Vec::new(),
        failures: 0,
        first_failure: None,
        sync_ms: Vec::new(),
        early: 0,
        agent_cpu_s: 0.0,
    };
    for t in threads {
        if let Ok((s, f)) = t.join() {
            c.starts_s.extend(s);
            c.failures += f.len();
            if c.first_failure.is_none() {
                c.first_failure = f.into_iter().next();
            }
        }
    }
    let _ = probe.join();
    c.agent_cpu_s = cpu_s(agent_pid) - cpu0;
    let after = Agent::status().unwrap_or_default();
    // The status keeps the latest 1024 of each: what was added during the run.
    let new_since = |b: usize, a: usize| a.saturating_sub(b.min(a));
    let n = new_since(before.start_sync_us.len(), after.start_sync_us.len());
    #[expect(clippy::cast_precision_loss, reason = "microseconds")]
    c.sync_ms.extend(
        after.start_sync_us[after.start_sync_us.len() - n..]
            .iter()
            .map(|us| *us as f64 / 1000.0),
    );
    c.early = new_since(before.early_lead_us.len(), after.early_lead_us.len());
    c
}

/// One mode's run/stop rows, per port count.
fn port_rows(image: &str, quick: bool, label: &str, ports: &mut String) -> Result<()> {
    let counts: &[u16] = if quick { &[0, 100] } else { &[0, 100, 1000] };
    let mut zero = (f64::NAN, f64::NAN);
    for &n in counts {
        // Docker's rules with 1000 ports take minutes a round: one round there.
        let rounds = if label.starts_with("Docker's rules") {
            if n >= 1000 { 1 } else { 3 }
        } else {
            5
        };
        let (mut run, mut stop) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            println!("bench: own-firewall section, {label}, {n} ports");
            let (r, s) = run_stop(image, n)?;
            run.push(r);
            stop.push(s);
        }
        let (r, s) = (median(&mut run), median(&mut stop));
        if n == 0 {
            zero = (r, s);
        }
        let _ = writeln!(
            ports,
            "| {label} | {n} | {r:.2} | {s:.2} | {:.2} | {:.2} | {rounds} |",
            r / zero.0,
            s / zero.1
        );
    }
    Ok(())
}

/// One mode's rows: run/stop per port count, and the contention runs.
fn mode_rows(
    image: &str,
    agent: &Agent,
    quick: bool,
    label: &str,
    ports: &mut String,
    starts: &mut String,
) -> Result<()> {
    port_rows(image, quick, label, ports)?;
    let secs = if quick { 15 } else { 40 };
    for ports in [1, 10] {
        println!(
            "bench: own-firewall section, {label}, {CLIENTS} clients with {ports} ports for {secs} s"
        );
        let mut c = contention(image, secs, ports, agent.pid());
        let n = c.starts_s.len();
        let p = |v: &mut Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            testkit::percentile(v, q).unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            starts,
            "| {label} | {ports} | {n} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} | {:.2} |",
            c.failures,
            p(&mut c.starts_s, 0.5),
            p(&mut c.starts_s, 0.99),
            c.starts_s.last().copied().unwrap_or(f64::NAN),
            p(&mut c.sync_ms, 0.5),
            p(&mut c.sync_ms, 0.99),
            c.sync_ms.len(),
            c.early,
            c.agent_cpu_s
        );
        if let Some(f) = c.first_failure {
            let _ = writeln!(
                starts,
                "|  | first failure: {} ||||||||||",
                f.replace('|', "/")
            );
        }
    }
    Ok(())
}

/// The section. Leaves Docker running with its own rules (userland proxy off).
pub(super) fn own_firewall(
    env: &mut Env,
    image: &str,
    engine: crate::engines::Engine,
    names: &[&str],
) -> Result<String> {
    let mut ports = String::new();
    let mut starts = String::new();
    docker::restart_engine(engine, false)?;
    wait_running(names)?;
    {
        let agent = Agent::start()?;
        mode_rows(
            image,
            &agent,
            env.quick,
            "Docker's rules + agent",
            &mut ports,
            &mut starts,
        )?;
    }
    docker::restart_engine_with(engine, false, &["--iptables=false", "--ip6tables=false"])?;
    OWN_FIREWALL.store(true, Ordering::Relaxed);
    let r = (|| -> Result<String> {
        wait_running(names)?;
        env.srv_ip = ip_of("dpb-srv")?;
        env.http_ip = ip_of("dpb-http")?;
        // What Docker itself costs with its rules off (no agent: nothing is reachable).
        port_rows(image, env.quick, "Docker, rules off, no agent", &mut ports)?;
        {
            let agent = Agent::start()?;
            let url = format!("http://127.0.0.1:{P_HTTP}/");
            if sh(&["curl", "-sS", "--max-time", "3", "-o", "/dev/null", &url]).is_err() {
                bail!("own-firewall mode: the published port {P_HTTP} does not answer");
            }
            mode_rows(
                image,
                &agent,
                env.quick,
                "own-firewall",
                &mut ports,
                &mut starts,
            )?;
        }
        super::paired::paired(env, if env.quick { 3 } else { 5 })
    })();
    OWN_FIREWALL.store(false, Ordering::Relaxed);
    docker::restart_engine(engine, false)?;
    wait_running(names)?;
    env.srv_ip = ip_of("dpb-srv")?;
    env.http_ip = ip_of("dpb-http")?;
    let paired = r?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Own-firewall mode against Docker's own rules\n\n`docker run -d` and `docker \
         stop` of a container publishing N ports (a range), median of the rounds; x0 = against \
         0 ports in the same mode\n"
    );
    let _ = writeln!(
        md,
        "| mode | ports | docker run s | docker stop s | run x0 | stop x0 | rounds |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    md += &ports;
    let _ = writeln!(
        md,
        "\n{CLIENTS} clients at once, each `docker run -d` publishing 1 or 10 ports then \
         `docker rm -f`, in a loop; start = `docker run` seconds; event-to-map = the agent's \
         own measure, from Docker's start event to the frontends in the map (ms; samples: \
         mostly a probe container started beside them and kept 1.5 s, since a client's \
         container is often gone before the agent handles its start), early = starts whose \
         frontends were in the map before Docker's start event; agent CPU = seconds of CPU \
         the agent used during the run\n"
    );
    let _ = writeln!(
        md,
        "| mode | ports each | starts | failures | start p50 s | p99 s | max s | event-to-map p50 ms | p99 ms | samples | early | agent CPU s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    md += &starts;
    let _ = writeln!(md, "\nLocal paths in the own-firewall mode:");
    md += &paired;
    Ok(md)
}
