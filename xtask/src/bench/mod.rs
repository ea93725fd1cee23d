//! `cargo xtask bench`: the dataplane against direct, docker-proxy and iptables NAT, in one
//! run, interleaved and repeated, reported as ratios to the direct path of the same run.

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

mod agent;
mod clients;
mod containers;
mod egress;
mod external;
mod extras;
mod ownfw;
mod paired;
mod pause;
mod probe;
mod profile;
mod publish;
mod report;
mod svg;

use agent::{AGENT_SOCKET, Agent};
use clients::{churn, iperf};
use containers::{Containers, run_containers, wait_running};
use extras::extras;
use probe::{
    conntrack_count, cpu_ticks, docker_proxy_for, docker_proxy_pids, host_ipv4, inspect, ip_of,
    rss_kib, sh, time_wait_count,
};
use report::write_report;
use svg::svg;

use crate::{
    docker::{self, TestImage},
    util::{output, project_root},
};

const P_IPERF: u16 = 25201;
const P_HTTP: u16 = 25280;
const P_SYNC: u16 = 25290;
const P_STATEFUL: u16 = 25299;
const P_PAUSE: u16 = 25298;
const P_RANGE: u16 = 26000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Proxy,
    Nat,
    Dataplane,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    Localhost,
    HostIp,
    Hairpin,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Localhost => "host -> 127.0.0.1:P",
            Self::HostIp => "host -> host IP:P",
            Self::Hairpin => "container -> gateway:P",
        }
    }
}

/// Samples by (path, metric, variant).
type Samples = BTreeMap<(Path, String, Variant), Vec<f64>>;

struct Env {
    quick: bool,
    secs: u32,
    host_ip: Option<String>,
    gateway: String,
    srv_ip: String,
    http_ip: String,
    churn_n: usize,
    samples: Samples,
    proxy_cpu: BTreeMap<(Path, String), Vec<f64>>,
}

impl Env {
    fn push(&mut self, path: Path, metric: &str, variant: Variant, v: f64) {
        self.samples
            .entry((path, metric.to_string(), variant))
            .or_default()
            .push(v);
    }

    /// Where a path's client connects for a variant.
    fn target(
        &self,
        path: Path,
        variant: Variant,
        direct_ip: &str,
        direct_port: u16,
        published: u16,
    ) -> Option<(String, u16)> {
        Some(match (variant, path) {
            (Variant::Direct, _) => (direct_ip.to_string(), direct_port),
            (_, Path::Localhost) => ("127.0.0.1".to_string(), published),
            (_, Path::HostIp) => (self.host_ip.clone()?, published),
            (_, Path::Hairpin) => (self.gateway.clone(), published),
        })
    }

    fn paths(&self, variant: Variant) -> Vec<Path> {
        match variant {
            // The direct reference is the same for both host paths.
            Variant::Direct => vec![Path::Localhost, Path::Hairpin],
            _ if self.host_ip.is_some() => vec![Path::Localhost, Path::HostIp, Path::Hairpin],
            _ => vec![Path::Localhost, Path::Hairpin],
        }
    }

    /// Measures every metric of every path for one variant; `check` runs after each
    /// measurement and fails the run if the variant was not in effect.
    fn measure(&mut self, variant: Variant, check: &dyn Fn() -> Result<()>) -> Result<()> {
        let tcp: Vec<(&str, u32, bool)> = if self.quick {
            vec![("tcp 1 stream", 1, false), ("tcp 4 streams", 4, false)]
        } else {
            vec![
                ("tcp 1 stream", 1, false),
                ("tcp 1 stream reverse", 1, true),
                ("tcp 4 streams", 4, false),
                ("tcp 4 streams reverse", 4, true),
            ]
        };
        for path in self.paths(variant) {
            let (srv_ip, http_ip) = (self.srv_ip.clone(), self.http_ip.clone());
            let Some((host, port)) = self.target(path, variant, &srv_ip, 5201, P_IPERF) else {
                continue;
            };
            for (metric, streams, reverse) in &tcp {
                let ticks = cpu_ticks(&docker_proxy_pids());
                let began = Instant::now();
                let (gbps, _) = iperf(path, &host, port, *streams, *reverse, false, self.secs)?;
                check()?;
                self.record_proxy_cpu(variant, path, metric, ticks, began);
                self.push(path, metric, variant, gbps);
            }
            if !self.quick {
                let (gbps, loss) = iperf(path, &host, port, 1, false, true, self.secs)?;
                check()?;
                self.push(path, "udp 2G offered", variant, gbps);
                self.push(path, "udp loss %", variant, loss);
            }
            let Some((host, port)) = self.target(path, variant, &http_ip, 80, P_HTTP) else {
                continue;
            };
            let concs: &[usize] = if self.quick { &[16] } else { &[1, 16] };
            for conc in concs {
                let ticks = cpu_ticks(&docker_proxy_pids());
                let began = Instant::now();
                let result = churn(path, &host, port, self.churn_n, *conc)?;
                check()?;
                let m = format!("conn/s c={conc}");
                self.record_proxy_cpu(variant, path, &m, ticks, began);
                self.push(path, &m, variant, result.conn_per_s);
                self.push(path, &format!("p50 us c={conc}"), variant, result.p50_us);
                self.push(path, &format!("p99 us c={conc}"), variant, result.p99_us);
                self.push(
                    path,
                    &format!("conntrack/conn c={conc}"),
                    variant,
                    result.conntrack_per_conn,
                );
                self.push(
                    path,
                    &format!("TIME_WAIT/conn c={conc}"),
                    variant,
                    result.time_wait_per_conn,
                );
            }
        }
        Ok(())
    }

    fn record_proxy_cpu(
        &mut self,
        variant: Variant,
        path: Path,
        metric: &str,
        ticks0: u64,
        t: Instant,
    ) {
        if variant != Variant::Proxy {
            return;
        }
        let ticks = cpu_ticks(&docker_proxy_pids()).saturating_sub(ticks0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        #[expect(clippy::cast_precision_loss, reason = "ticks and Hz are small")]
        let pct = ticks as f64 / hz as f64 / t.elapsed().as_secs_f64() * 100.0;
        self.proxy_cpu
            .entry((path, metric.to_string()))
            .or_default()
            .push(pct);
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        f64::midpoint(s[s.len() / 2 - 1], s[s.len() / 2])
    };
    (
        med,
        *s.first().unwrap_or(&f64::NAN),
        *s.last().unwrap_or(&f64::NAN),
    )
}

/// The local paths against direct, paired round by round, with intervals (userland proxy
/// off).
fn paired_section(env: &mut Env, engine: crate::engines::Engine, names: &[&str]) -> Result<String> {
    docker::restart_engine(engine, false)?;
    wait_running(names)?;
    env.srv_ip = ip_of("dpb-srv")?;
    env.http_ip = ip_of("dpb-http")?;
    let mut md = paired::paired(env, if env.quick { 5 } else { 9 })?;
    md += &profile::profile(env)?;
    Ok(md)
}

/// The sections after the interleaved rounds, or the one asked for.
fn later_sections(
    env: &mut Env,
    image: &str,
    engine: crate::engines::Engine,
    names: &[&str],
    only: Option<Section>,
) -> Result<String> {
    let mut extra = String::new();
    if matches!(only, None | Some(Section::Paired)) {
        extra += &paired_section(env, engine, names)?;
    }
    if matches!(only, None | Some(Section::External)) {
        docker::restart_engine(engine, false)?;
        wait_running(names)?;
        env.srv_ip = ip_of("dpb-srv")?;
        env.http_ip = ip_of("dpb-http")?;
        extra += &external::external(env, if env.quick { 3 } else { 5 })?;
    }
    if matches!(only, None | Some(Section::Extras)) {
        extra += &extras(image, env.quick, names, engine)?;
    }
    if matches!(only, None | Some(Section::OwnFirewall)) {
        extra += &ownfw::own_firewall(env, image, engine, names)?;
    }
    if only == Some(Section::Egress) {
        egress::egress(image, env.quick, &mut extra)?;
    }
    if only == Some(Section::Publish) {
        extra += &publish::publish_section(image, engine, env.quick)?;
    }
    if only == Some(Section::Starts) {
        docker::restart_engine(engine, false)?;
        wait_running(names)?;
        extras::cold_starts(image, env.quick, &mut extra)?;
    }
    Ok(extra)
}

/// A section of the bench that can run alone (`--only`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Section {
    Paired,
    /// External clients: the packet layer against Docker's DNAT and direct routing.
    External,
    Extras,
    /// The egress policy's costs alone (part of `extras`).
    Egress,
    Starts,
    /// The own-firewall mode against Docker's own rules: per-port start/stop cost, start
    /// latency under contention, local path ratios.
    OwnFirewall,
    /// `docker run` of a container with 32 published ports while 0, 50 and 100 such run:
    /// Docker's own rules against the own-firewall mode (for Docker 29's nftables backend).
    Publish,
}

pub fn bench(
    quick: bool,
    engine: crate::engines::Engine,
    only: Option<Section>,
    rounds: usize,
) -> Result<()> {
    crate::util::require_root("cargo xtask bench")?;
    crate::leftovers::refuse_beside_an_agent()?;
    crate::engines::preflight(engine)?;
    crate::util::become_subreaper();
    let started = Instant::now();
    let owned = docker::owned_engine_pid();
    if docker::engine_up() && owned.is_none() {
        bail!(
            "cargo xtask bench restarts dockerd with the userland proxy on and off; a Docker \
             engine it did not start is running. Stop it first (the bench leaves an engine \
             running with userland-proxy off when it ends)."
        );
    }
    docker::restart_engine(engine, false)?;
    let image = TestImage::build()?;
    let _containers = Containers;
    run_containers(&image.name)?;
    let mut env = Env {
        quick,
        secs: if quick { 2 } else { 5 },
        host_ip: host_ipv4(),
        gateway: inspect(
            "dpb-client",
            "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
        )?,
        srv_ip: String::new(),
        http_ip: String::new(),
        churn_n: if quick { 3000 } else { 10000 },
        samples: BTreeMap::new(),
        proxy_cpu: BTreeMap::new(),
    };
    let names = ["dpb-srv", "dpb-http", "dpb-client"];
    for round in 0..if only.is_some() { 0 } else { rounds } {
        for proxy_mode in [true, false] {
            println!(
                "bench: round {}/{rounds}, userland-proxy {proxy_mode}",
                round + 1
            );
            docker::restart_engine(engine, proxy_mode)?;
            wait_running(&names)?;
            env.srv_ip = ip_of("dpb-srv")?;
            env.http_ip = ip_of("dpb-http")?;
            env.measure(Variant::Direct, &|| Ok(()))?;
            if proxy_mode {
                env.measure(Variant::Proxy, &|| {
                    if docker_proxy_for(P_IPERF) && docker_proxy_for(P_HTTP) {
                        Ok(())
                    } else {
                        bail!("docker-proxy variant not in effect: no docker-proxy for the bench ports")
                    }
                })?;
            } else {
                let none = || {
                    if docker_proxy_pids().is_empty() {
                        Ok(())
                    } else {
                        bail!("a docker-proxy runs with userland-proxy off")
                    }
                };
                env.measure(Variant::Nat, &none)?;
                let agent = Agent::start()?;
                let before = std::cell::Cell::new(Agent::connects());
                env.measure(Variant::Dataplane, &|| {
                    none()?;
                    // The counters are read from the kernel when asked.
                    let t = Instant::now();
                    let mut now = Agent::connects();
                    while now <= before.get() && t.elapsed() < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_millis(50));
                        now = Agent::connects();
                    }
                    if now <= before.get() {
                        let status = Command::new(project_root().join("target/release/bridge-ctl"))
                            .args(["--socket", AGENT_SOCKET, "status"])
                            .output()
                            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default();
                        bail!(
                            "dataplane variant not in effect: the agent translated nothing\n{status}\n{}",
                            agent.log_text()
                        );
                    }
                    before.set(now);
                    Ok(())
                })?;
            }
        }
    }
    let extra = later_sections(&mut env, &image.name, engine, &names, only)?;
    for n in names {
        let _ = sh(&["docker", "rm", "-f", n]);
    }
    drop(image);
    let _ = fs::remove_dir_all("/run/dataplane-bench");
    write_report(&env, &extra, started.elapsed(), quick, rounds)?;
    if owned.is_none() {
        docker::stop_owned_engine();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn chart_has_a_bar_per_value() {
        let s = svg(&[
            ("a".into(), [0.5, 0.8, 1.0]),
            ("b".into(), [f64::NAN, 0.9, 0.99]),
        ]);
        // Bars are 8 high; the legend's swatches 10.
        assert_eq!(s.matches("height=\"8\"").count(), 5);
        assert!(s.contains("1.0 = direct"));
    }
}
