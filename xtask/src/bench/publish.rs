//! What publishing costs Docker as a host fills up: `docker run -d` of a container with 32
//! published ports when 0, 50 and 100 such containers already run, with Docker's own rules
//! (its iptables or, on 29, nftables backend) and in the own-firewall mode (Docker's rules
//! off, the agent publishing). Docker 29's nftables backend rewrites its ruleset per
//! published port (moby#53466), so the cost of its own rules grows with the host; the mode
//! is worth having where it does not. Userland proxy off in every variant.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{Agent, agent::OWN_FIREWALL, docker, sh};

/// Published ports per container.
const PORTS: u16 = 32;
/// The host ports of the fillers start here (`PORTS` each), the measured container's at
/// `MEASURED`.
const FILL_FIRST: u16 = 20000;
const MEASURED: u16 = 29000;
/// Containers already running when a `docker run` is measured.
const LEVELS: [u16; 3] = [0, 50, 100];
/// The time per variant for starting the fillers: past it, the levels not reached are left
/// out (and said); each measured `docker run` is bounded by 120 s besides.
const BUDGET: Duration = Duration::from_mins(12);

/// `-p` for `PORTS` host ports from `first` to distinct container ports (Docker 29's
/// nftables backend refuses one container port published twice).
fn publish(first: u16) -> String {
    format!("{first}-{}:8000-{}", first + PORTS - 1, 8000 + PORTS - 1)
}

fn run(image: &str, name: &str, first: u16) -> Result<f64> {
    let t = Instant::now();
    // Bounded: a daemon that hangs ends the section with an error, not the bench.
    let out = Command::new("timeout")
        .args([
            "120",
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "-p",
            &publish(first),
            image,
        ])
        .args(["sleep", "100000"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "docker run of {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

fn remove_fillers() {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", "name=dpb-fill-"])
        .output();
    let ids: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .status();
    }
    let _ = sh(&["docker", "rm", "-f", "dpb-measured"]);
}

/// One variant's rows: for each level, the fillers up to it, then `rounds` measured runs.
fn variant(image: &str, label: &str, rounds: usize, md: &mut String) -> Result<()> {
    let started = Instant::now();
    let mut fillers = 0u16;
    let mut at_zero = f64::NAN;
    for level in LEVELS {
        while fillers < level {
            if started.elapsed() > BUDGET {
                let _ = writeln!(
                    md,
                    "| {label} | {level} | not reached: {fillers} containers in {} s (the \
                     section's budget) |||",
                    started.elapsed().as_secs()
                );
                return Ok(());
            }
            run(
                image,
                &format!("dpb-fill-{fillers}"),
                FILL_FIRST + fillers * PORTS,
            )?;
            fillers += 1;
        }
        println!("bench: publish section, {label}, {level} containers running");
        let mut runs = Vec::new();
        for _ in 0..rounds {
            runs.push(run(image, "dpb-measured", MEASURED)?);
            sh(&["docker", "rm", "-f", "dpb-measured"])?;
        }
        runs.sort_by(f64::total_cmp);
        let med = testkit::percentile(&runs, 0.5).unwrap_or(f64::NAN);
        let max = runs.last().copied().unwrap_or(f64::NAN);
        if level == 0 {
            at_zero = med;
        }
        let _ = writeln!(
            md,
            "| {label} | {level} | {med:.2} | {max:.2} | {:.2} |",
            med / at_zero
        );
    }
    Ok(())
}

/// The section. Leaves Docker running with its own rules (userland proxy off).
pub(super) fn publish_section(
    image: &str,
    engine: crate::engines::Engine,
    quick: bool,
) -> Result<String> {
    let rounds = if quick { 3 } else { 5 };
    let mut rows = String::new();
    docker::restart_engine(engine, false)?;
    remove_fillers();
    let r = variant(image, "Docker's rules", rounds, &mut rows);
    remove_fillers();
    r?;
    docker::restart_engine_with(engine, false, &["--iptables=false", "--ip6tables=false"])?;
    // Docker's own share with its rules off (nothing is reachable without the agent).
    let r = variant(image, "Docker, rules off, no agent", rounds, &mut rows);
    remove_fillers();
    r?;
    OWN_FIREWALL.store(true, Ordering::Relaxed);
    let r = (|| {
        let _agent = Agent::start()?;
        variant(image, "own-firewall mode", rounds, &mut rows)
    })();
    remove_fillers();
    OWN_FIREWALL.store(false, Ordering::Relaxed);
    docker::restart_engine(engine, false)?;
    r?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Publishing on a full host ({})\n\n`docker run -d` of a container publishing \
         {PORTS} ports while N such containers run; median and max of {rounds} runs (s); x0 \
         = median against N = 0 in the same mode; at most {} min per mode\n",
        engine.tag(),
        BUDGET.as_secs() / 60
    );
    let _ = writeln!(md, "| mode | N | run median s | max s | x0 |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    md += &rows;
    Ok(md)
}
