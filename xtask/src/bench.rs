//! `cargo xtask bench`: the dataplane against direct, docker-proxy and iptables NAT, in one
//! run, interleaved and repeated, reported as ratios to the direct path of the same run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    docker::{self, TestImage},
    util::{output, project_root},
};

const P_IPERF: u16 = 25201;
const P_HTTP: u16 = 25280;
const P_SYNC: u16 = 25290;
const P_STATEFUL: u16 = 25299;
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

fn sh(args: &[&str]) -> Result<String> {
    output(Command::new(args[0]).args(&args[1..]))
}

fn inspect(name: &str, fmt: &str) -> Result<String> {
    Ok(sh(&["docker", "inspect", "-f", fmt, name])?
        .trim()
        .to_string())
}

fn ip_of(name: &str) -> Result<String> {
    inspect(
        name,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    )
}

fn host_ipv4() -> Option<String> {
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

fn docker_proxy_pids() -> Vec<u32> {
    sh(&["pgrep", "-x", "docker-proxy"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn docker_proxy_for(port: u16) -> bool {
    sh(&["pgrep", "-af", "docker-proxy"])
        .unwrap_or_default()
        .contains(&format!("-host-port {port}"))
}

/// CPU ticks (user + system) of the given processes.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|st| {
            let rest = st.rsplit(')').next()?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn conntrack_count() -> u64 {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .map_or(0, |s| s.trim().parse().unwrap_or(0))
}

fn time_wait_count() -> u64 {
    sh(&["ss", "-tanH", "state", "time-wait"]).map_or(0, |s| s.lines().count() as u64)
}

/// The agent, run for a variant and stopped after it (nothing pinned: stopping detaches).
struct Agent {
    child: Child,
    log: PathBuf,
}

const AGENT_SOCKET: &str = "/run/dataplane-bench/ctl.sock";

impl Agent {
    fn start() -> Result<Self> {
        let log = PathBuf::from("/run/dataplane-bench/agent.log");
        fs::create_dir_all("/run/dataplane-bench")?;
        let f = fs::File::create(&log)?;
        let child = Command::new(project_root().join("target/release/dataplane"))
            .args(["run", "--no-pin", "--socket", AGENT_SOCKET])
            .args([
                "--nft-table",
                "dataplane_bench",
                "--fwd-chain",
                "DATAPLANE-BENCH",
            ])
            .env("RUST_LOG", "info,dataplane=debug")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting the agent")?;
        let a = Self { child, log };
        let t = Instant::now();
        while !Self::ctl_ok() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the agent did not become ready; see {}", a.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(a)
    }

    fn ctl_ok() -> bool {
        Self::status().is_some_and(|s| s.ready)
    }

    /// What the agent says of itself, when it answers.
    fn status() -> Option<dataplane_api::Status> {
        dataplane_api::status(std::path::Path::new(AGENT_SOCKET)).ok()
    }

    /// Sockets the programs translated at `connect()`.
    fn connects() -> u64 {
        Self::status().map_or(0, |s| s.counter(dataplane_common::STAT_CONNECT))
    }

    /// Whether the agent has the frontend `address:port/proto`.
    fn has_frontend(key: &str) -> bool {
        dataplane_api::frontends(std::path::Path::new(AGENT_SOCKET))
            .is_ok_and(|fs| fs.iter().any(|f| f.frontend == key))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

fn iperf_args(
    host: &str,
    port: u16,
    streams: u32,
    reverse: bool,
    udp: bool,
    secs: u32,
) -> Vec<String> {
    let mut a = vec![
        "iperf3".to_string(),
        "-c".into(),
        host.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        secs.to_string(),
        "-P".into(),
        streams.to_string(),
        "-J".into(),
    ];
    if reverse {
        a.push("-R".into());
    }
    if udp {
        a.extend([
            "-u".into(),
            "-b".into(),
            "2G".into(),
            "-l".into(),
            "1400".into(),
        ]);
    }
    a
}

fn in_client(args: &[String]) -> Vec<String> {
    let mut v = vec!["docker".to_string(), "exec".into(), "dpb-client".into()];
    v.extend_from_slice(args);
    v
}

fn run_json(args: &[String]) -> Result<String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(&a)
}

/// Gbit/s (and loss % for UDP).
fn iperf(
    path: Path,
    host: &str,
    port: u16,
    streams: u32,
    reverse: bool,
    udp: bool,
    secs: u32,
) -> Result<(f64, f64)> {
    let args = iperf_args(host, port, streams, reverse, udp, secs);
    let args = if path == Path::Hairpin {
        in_client(&args)
    } else {
        args
    };
    // The iperf3 server takes one test at a time; a retry covers a server still finishing.
    let mut last = String::new();
    for _ in 0..3 {
        match run_json(&args) {
            Ok(text) => {
                let report = testkit::IperfReport::parse(text.as_bytes()).ok();
                if let Some((bps, loss)) = report
                    .as_ref()
                    .and_then(|r| Some((r.received_bps()?, r.lost_percent())))
                {
                    return Ok((bps / 1e9, loss));
                }
                last = text.chars().take(300).collect();
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("iperf3 to {host}:{port} failed: {last}")
}

struct Churn {
    conn_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    conntrack_per_conn: f64,
    time_wait_per_conn: f64,
}

fn churn(path: Path, host: &str, port: u16, n: usize, conc: usize) -> Result<Churn> {
    let bin = project_root().join("target/release/dp-churn");
    let mut args = vec![
        bin.display().to_string(),
        host.to_string(),
        port.to_string(),
        n.to_string(),
        conc.to_string(),
    ];
    if path == Path::Hairpin {
        args[0] = "/bin/dp-churn".into();
        args = in_client(&args);
    }
    let (ct0, tw0) = (conntrack_count(), time_wait_count());
    let text = run_json(&args)?;
    let (ct1, tw1) = (conntrack_count(), time_wait_count());
    let report: testkit::ChurnReport = serde_json::from_str(text.trim())
        .with_context(|| format!("dp-churn's report: {}", text.trim()))?;
    if report.errors > 0 {
        bail!(
            "{} of {n} connections to {host}:{port} failed",
            report.errors
        );
    }
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n as f64;
    Ok(Churn {
        conn_per_s: report.conn_per_s,
        #[allow(clippy::cast_precision_loss, reason = "microseconds")]
        p50_us: report.p50_us as f64,
        #[allow(clippy::cast_precision_loss, reason = "microseconds")]
        p99_us: report.p99_us as f64,
        conntrack_per_conn: per(ct0, ct1),
        time_wait_per_conn: per(tw0, tw1),
    })
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
        #[allow(clippy::cast_precision_loss, reason = "ticks and Hz are small")]
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

/// Removes every container the bench made, also when it fails.
struct Containers;

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = sh(&["docker", "ps", "-aq", "--filter", "name=^dpb-"]).unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = sh(&["docker", "rm", "-f", id]);
        }
    }
}

fn run_containers(image: &str) -> Result<()> {
    for n in ["dpb-srv", "dpb-http", "dpb-client"] {
        let _ = sh(&["docker", "rm", "-f", n]);
    }
    let haproxy_cfg = "global\\n  maxconn 4000\\ndefaults\\n  mode http\\n  timeout connect 2s\\n  timeout client 5s\\n  timeout server 5s\\nfrontend f\\n  bind :80\\n  http-request return status 200 content-type text/plain string ok\\n";
    sh(&[
        "docker",
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "dpb-srv",
        "-p",
        &format!("{P_IPERF}:5201"),
        "-p",
        &format!("{P_IPERF}:5201/udp"),
        image,
        "iperf3",
        "-s",
    ])?;
    sh(&[
        "docker",
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "dpb-http",
        // A bounded server-side TIME_WAIT: with thousands of them, new connections that
        // reuse a 4-tuple stall for milliseconds, so a variant measured later in a round
        // would pay for the ones before it.
        "--sysctl",
        "net.ipv4.tcp_max_tw_buckets=256",
        "-p",
        &format!("{P_HTTP}:80"),
        image,
        "sh",
        "-c",
        &format!("printf '{haproxy_cfg}' > /tmp/h.cfg && exec haproxy -f /tmp/h.cfg"),
    ])?;
    sh(&[
        "docker",
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "dpb-client",
        image,
        "sleep",
        "100000",
    ])?;
    let churn = project_root().join("target/release/dp-churn");
    sh(&[
        "docker",
        "cp",
        &churn.display().to_string(),
        "dpb-client:/bin/dp-churn",
    ])?;
    Ok(())
}

fn wait_running(names: &[&str]) -> Result<()> {
    let t = Instant::now();
    loop {
        let ok = names
            .iter()
            .all(|n| inspect(n, "{{.State.Running}}").is_ok_and(|s| s == "true"));
        if ok {
            // iperf3 and haproxy listen a moment after the process starts.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        if t.elapsed() > Duration::from_mins(1) {
            bail!("bench containers did not come back after the engine restart");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per-port cost: `docker run` / `docker stop` of a container publishing `n` ports.
fn per_port(
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
    let t = Instant::now();
    sh(&["docker", "stop", "-t", "0", "dpb-ports"])?;
    let stop_s = t.elapsed().as_secs_f64();
    sh(&["docker", "rm", "-f", "dpb-ports"])?;
    let procs = pids.len().saturating_sub(procs0);
    let mem = if with_agent.is_some() {
        format!(
            "agent RSS {:+} KiB",
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
fn map_memory_kib() -> u64 {
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

/// Agent cold start to ready, with the bench's 3 containers and with more.
fn cold_starts(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let cold = |label: &str, extra: &mut String| -> Result<()> {
        let mut v = Vec::new();
        for _ in 0..3 {
            let a = Agent::start()?;
            let ready = Agent::status().and_then(|s| s.ready_ms());
            drop(a);
            v.extend(ready);
        }
        let (m, lo, hi) = stats(&v);
        let _ = writeln!(extra, "| {label} | {m:.1} | {lo:.1} | {hi:.1} |");
        Ok(())
    };
    let _ = writeln!(
        extra,
        "\n### Agent cold start to ready (ms)\n\n| running containers | median | min | max |\n|---|---|---|---|"
    );
    cold("3", extra)?;
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
    cold(&format!("{}", many + 3), extra)?;
    for i in 0..many {
        let _ = sh(&["docker", "rm", "-f", &format!("dpb-many-{i}")]);
    }
    Ok(())
}

/// Per-port cost, sync latency and cold start, with the engine as `cargo xtask run` has it
/// (userland proxy off) at the end.
fn extras(image: &str, quick: bool, names: &[&str]) -> Result<String> {
    let mut extra = String::new();
    let _ = writeln!(extra, "\n### Per published port\n");
    let _ = writeln!(
        extra,
        "| variant | ports | docker run s | docker stop s | processes added | memory |"
    );
    let _ = writeln!(extra, "|---|---|---|---|---|---|");
    let counts: &[u16] = if quick { &[1, 100] } else { &[1, 100, 1000] };
    docker::restart_engine(true)?;
    for n in counts {
        per_port(image, *n, None, &mut extra, "docker-proxy")?;
    }
    docker::restart_engine(false)?;
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
        "\nMaps of the agent (fixed, preallocated): {} KiB.",
        map_memory_kib()
    );

    // Sync latency: start event -> frontend in the map, as the agent measures it.
    let starts = if quick { 20 } else { 100 };
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
    #[allow(clippy::cast_precision_loss, reason = "microseconds")]
    let lat: Vec<f64> = Agent::status()
        .map(|s| s.start_sync_us)
        .unwrap_or_default()
        .into_iter()
        .map(|us| us as f64)
        .collect();
    drop(agent);
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| testkit::percentile(&sorted, p).map_or(f64::NAN, |us| us / 1000.0);
    let _ = writeln!(
        extra,
        "\n### Sync latency\n\nDocker `start` event to the frontend in the map, {} starts: p50 {:.2} ms, p99 {:.2} ms.",
        lat.len(),
        pct(0.5),
        pct(0.99)
    );

    stateful_input_cost(image, quick, &mut extra)?;
    cold_starts(image, quick, &mut extra)?;
    Ok(extra)
}

/// Conntrack entries whose original destination is `addr:80/tcp`.
fn tracked_to_port_80(addr: &str) -> usize {
    sh(&["conntrack", "-L", "-p", "tcp", "-d", addr, "--dport", "80"])
        .map_or(0, |s| s.lines().count())
}

/// `n` short HTTP/1.0 requests to `127.0.0.1:port`, one connection each.
fn http_requests(port: u16, n: usize) -> Result<()> {
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
fn stateful_input_cost(image: &str, quick: bool, extra: &mut String) -> Result<()> {
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
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
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

pub fn bench(quick: bool) -> Result<()> {
    crate::util::require_root("cargo xtask bench")?;
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
    docker::restart_engine(false)?;
    let image = TestImage::build()?;
    let _containers = Containers;
    run_containers(&image.name)?;
    let rounds = 3;
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
    for round in 0..rounds {
        for proxy_mode in [true, false] {
            println!(
                "bench: round {}/{rounds}, userland-proxy {proxy_mode}",
                round + 1
            );
            docker::restart_engine(proxy_mode)?;
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
                    // The agent publishes its counters every 250 ms.
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
    let extra = extras(&image.name, quick, &names)?;
    for n in names {
        let _ = sh(&["docker", "rm", "-f", n]);
    }
    drop(image);
    let _ = fs::remove_dir_all("/run/dataplane-bench");
    write_report(&env, &extra, started.elapsed(), quick)?;
    if owned.is_none() {
        docker::stop_owned_engine();
    }
    Ok(())
}

/// The ratio table, appended to `md`; returns the chart's rows.
fn table(env: &Env, md: &mut String) -> Vec<(String, [f64; 3])> {
    let _ = writeln!(
        *md,
        "| path | metric | direct | docker-proxy | iptables NAT | dataplane |"
    );
    let _ = writeln!(*md, "|---|---|---|---|---|---|");
    let mut chart: Vec<(String, [f64; 3])> = Vec::new();
    let mut keys: Vec<(Path, String)> = env
        .samples
        .keys()
        .filter(|(_, _, v)| *v != Variant::Direct)
        .map(|(p, m, _)| (*p, m.clone()))
        .collect();
    keys.dedup();
    for (path, metric) in keys {
        let direct_path = if path == Path::HostIp {
            Path::Localhost
        } else {
            path
        };
        let d = env
            .samples
            .get(&(direct_path, metric.clone(), Variant::Direct))
            .map_or((f64::NAN, 0.0, 0.0), |v| stats(v));
        let ratio_metric = !(metric.starts_with("conntrack")
            || metric.starts_with("TIME_WAIT")
            || metric.starts_with("udp loss"));
        let mut cells = Vec::new();
        let mut ratios = [f64::NAN; 3];
        for (i, v) in [Variant::Proxy, Variant::Nat, Variant::Dataplane]
            .iter()
            .enumerate()
        {
            let Some(s) = env.samples.get(&(path, metric.clone(), *v)) else {
                cells.push("-".to_string());
                continue;
            };
            let (m, lo, hi) = stats(s);
            if ratio_metric {
                ratios[i] = m / d.0;
                cells.push(
                    format!("{:.2} ({m:.4}) [{:.2}-{:.2}]", m / d.0, lo / d.0, hi / d.0)
                        .replace("(0.0000)", "(0)"),
                );
            } else {
                cells.push(format!("{m:.2} [{lo:.2}-{hi:.2}]"));
            }
        }
        let _ = writeln!(
            *md,
            "| {} | {metric} | {:.4} | {} | {} | {} |",
            path.name(),
            d.0,
            cells[0],
            cells[1],
            cells[2]
        );
        if ratio_metric && !metric.starts_with('p') {
            chart.push((format!("{} {metric}", path.name()), ratios));
        }
    }
    chart
}

fn write_report(env: &Env, extra: &str, took: Duration, quick: bool) -> Result<()> {
    let dir = project_root().join("bench/results");
    fs::create_dir_all(&dir)?;
    let kernel = sh(&["uname", "-r"]).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let docker_v =
        sh(&["docker", "version", "--format", "{{.Server.Version}}"]).unwrap_or_default();
    let iperf_v = sh(&["iperf3", "--version"]).unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Benchmark{}\n\nKernel {}, {cpus} CPUs, Docker {}, {}, dataplane {}; {} rounds, \
         variants interleaved; {:.0} s in all. Ratios are the median of the variant over the \
         median of the direct path (client straight to the container address) measured in \
         the same run; [min-max] of the samples.\n",
        if quick { " (--quick)" } else { "" },
        kernel.trim(),
        docker_v.trim(),
        iperf_v.lines().next().unwrap_or("").trim(),
        env!("CARGO_PKG_VERSION"),
        3,
        took.as_secs_f64()
    );
    let chart = table(env, &mut md);
    let _ = writeln!(
        md,
        "\nThroughput in Gbit/s, connections per second, latency in microseconds. For latencies a ratio above 1 is slower."
    );
    if !env.proxy_cpu.is_empty() {
        let _ = writeln!(
            md,
            "\ndocker-proxy CPU while it carried the traffic (% of one core): {}",
            env.proxy_cpu
                .iter()
                .map(|((p, m), v)| format!("{} {m}: {:.0}%", p.name(), stats(v).0))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    md.push_str(extra);
    md.push_str("\nThe external-client path (a client in its own network namespace to `<host_ip>:P`) needs the packet layer, which is not built yet: not measured.\n");
    fs::write(dir.join("latest.md"), &md)?;
    fs::write(dir.join("latest.svg"), svg(&chart))?;
    println!("{md}");
    println!("bench: wrote bench/results/latest.md and bench/results/latest.svg");
    Ok(())
}

/// A horizontal grouped bar chart of the ratios to direct (1.0 marked).
fn svg(rows: &[(String, [f64; 3])]) -> String {
    let colors = ["#d62728", "#ff7f0e", "#2ca02c"];
    let names = ["docker-proxy", "iptables NAT", "dataplane"];
    let (left, bar, gap, width) = (330.0, 9.0, 10.0, 420.0);
    let row_h = bar * 3.0 + gap;
    #[allow(clippy::cast_precision_loss, reason = "a few rows")]
    let height = 40.0 + row_h * rows.len() as f64 + 30.0;
    let scale = width / 1.2;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        left + width + 60.0
    );
    for (i, n) in names.iter().enumerate() {
        #[allow(clippy::cast_precision_loss, reason = "three legend entries")]
        let x = left + i as f64 * 130.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"8\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"17\">{n}</text>",
            colors[i],
            x + 14.0
        );
    }
    for (r, (label, ratios)) in rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss, reason = "a few rows")]
        let y = 30.0 + row_h * r as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + bar * 2.0,
            label.replace('>', "&gt;")
        );
        for (i, v) in ratios.iter().enumerate() {
            if v.is_nan() {
                continue;
            }
            #[allow(clippy::cast_precision_loss, reason = "three bars")]
            let by = y + bar * i as f64;
            let w = (v.min(1.2) * scale).max(1.0);
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{by}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{v:.2}</text>",
                bar - 1.0,
                colors[i],
                left + w + 3.0,
                by + bar - 1.5
            );
        }
    }
    let x1 = left + scale;
    let _ = writeln!(
        s,
        "<line x1=\"{x1}\" y1=\"25\" x2=\"{x1}\" y2=\"{}\" stroke=\"black\" stroke-dasharray=\"3,3\"/><text x=\"{x1}\" y=\"{}\" text-anchor=\"middle\">1.0 = direct</text>",
        height - 25.0,
        height - 10.0
    );
    s.push_str("</svg>\n");
    s
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
