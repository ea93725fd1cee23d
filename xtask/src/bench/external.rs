//! The external path: a client in a network namespace of its own, behind a veth that stands
//! for the host's uplink (its default route goes through the host), reaching the published
//! ports at the host's address on that veth. Three configurations: Docker's DNAT (userland
//! proxy off, no agent), the dataplane's packet layer (`[packet_layer]` on for the client's
//! prefix, on that veth only), and direct routed to the container's own address. Paired
//! rounds with intervals, as for the local paths; then what each connection leaves behind,
//! what the programs cost traffic they do not translate, and a soak at the full connection
//! rate with a conntrack table small enough to fill.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, Result, bail};

use super::{
    Env, P_HTTP, P_IPERF,
    agent::Agent,
    clients::{iperf_args, pinned, run_iperf, run_json},
    conntrack_count,
    paired::{Placement, pairs, row},
    project_root, sh,
};

const NS: &str = "dpb-ext";
const HOST_IF: &str = "dpbx0";
const HOST_IP: &str = "10.254.0.1";
const CLIENT_IP: &str = "10.254.0.2";

/// The packet layer's config for the bench's client, on its veth only.
fn packet_config() -> String {
    format!(
        "[packet_layer]\nenabled = true\nallow = [\"10.254.0.0/24\"]\ninterfaces = [\"{HOST_IF}\"]\n"
    )
}

/// A port nothing publishes, served by the host itself.
const P_UNPUBLISHED: u16 = 25202;

/// An `iperf3 -s` of the host's own; stopped on drop.
struct HostServer(std::process::Child);

impl HostServer {
    fn start(port: u16) -> Result<Self> {
        let child = std::process::Command::new("iperf3")
            .args(["-s", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting iperf3 -s on the host")?;
        let s = Self(child);
        let t = std::time::Instant::now();
        while !sh(&["ss", "-tlnH", &format!("sport = :{port}")]).is_ok_and(|o| !o.trim().is_empty())
        {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("iperf3 -s on port {port} did not listen");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client's namespace and veth; removed on drop.
struct Outside;

impl Outside {
    fn create() -> Result<Self> {
        drop(Self);
        let o = Self;
        super::probe::namespace_behind_veth(NS, (HOST_IF, "dpbx1"), HOST_IP, CLIENT_IP)?;
        Ok(o)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", NS]);
        let _ = sh(&["ip", "link", "del", HOST_IF]);
    }
}

fn in_ns(args: &[String]) -> Vec<String> {
    let mut v = vec!["ip".to_string(), "netns".into(), "exec".into(), NS.into()];
    v.extend_from_slice(args);
    v
}

#[derive(Clone, Copy)]
enum Metric {
    Tcp1,
    Tcp4,
    Tcp4Reverse,
    Udp,
    ConnPerS,
}

impl Metric {
    const ALL: [Self; 5] = [
        Self::Tcp1,
        Self::Tcp4,
        Self::Tcp4Reverse,
        Self::Udp,
        Self::ConnPerS,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Tcp1 => "tcp 1 stream",
            Self::Tcp4 => "tcp 4 streams",
            Self::Tcp4Reverse => "tcp 4 streams, reverse",
            Self::Udp => "udp 1 stream (2 Gbit/s offered)",
            Self::ConnPerS => "conn/s c=16",
        }
    }
}

/// iperf3 from the namespace: received Gbit/s.
fn ext_iperf(
    host: &str,
    port: u16,
    streams: u32,
    reverse: bool,
    udp: bool,
    secs: u32,
) -> Result<f64> {
    let args = in_ns(&iperf_args(host, port, streams, reverse, udp, secs));
    run_iperf(&args)
        .map(|r| r.0)
        .with_context(|| format!("iperf3 from {NS} to {host}:{port}"))
}

/// dp-churn from the namespace (`--for SECS` when `secs` is given, else `n` connections).
fn ext_churn(
    host: &str,
    port: u16,
    n: usize,
    conc: usize,
    secs: Option<u64>,
) -> Result<testkit::ChurnReport> {
    let bin = project_root().join("target/release/dp-churn");
    let mut args = vec![bin.display().to_string()];
    if let Some(s) = secs {
        args.extend(["--for".into(), s.to_string()]);
    }
    args.extend([host.to_string(), port.to_string()]);
    if secs.is_none() {
        args.push(n.to_string());
    }
    args.push(conc.to_string());
    let text = run_json(&in_ns(&args))?;
    serde_json::from_str(text.trim()).with_context(|| format!("dp-churn's report: {}", text.trim()))
}

fn measure(env: &Env, m: Metric, direct: bool, cpu: Option<&str>) -> Result<f64> {
    let secs = if env.quick { 2 } else { 3 };
    let (iperf_host, iperf_port) = if direct {
        (env.srv_ip.as_str(), 5201)
    } else {
        (HOST_IP, P_IPERF)
    };
    let (http_host, http_port) = if direct {
        (env.http_ip.as_str(), 80)
    } else {
        (HOST_IP, P_HTTP)
    };
    pinned(cpu, || match m {
        Metric::Tcp1 => ext_iperf(iperf_host, iperf_port, 1, false, false, secs),
        Metric::Tcp4 => ext_iperf(iperf_host, iperf_port, 4, false, false, secs),
        Metric::Tcp4Reverse => ext_iperf(iperf_host, iperf_port, 4, true, false, secs),
        Metric::Udp => ext_iperf(iperf_host, iperf_port, 1, false, true, secs),
        Metric::ConnPerS => {
            let r = ext_churn(http_host, http_port, env.churn_n / 2, 16, None)?;
            if r.errors > 0 {
                bail!(
                    "{} connections from {NS} to {http_host}:{http_port} failed",
                    r.errors
                );
            }
            Ok(r.conn_per_s)
        }
    })
}

/// Conntrack entries from the bench's client.
fn tracked_from_client() -> usize {
    sh(&["conntrack", "-L", "-s", CLIENT_IP]).map_or(0, |s| s.lines().count())
}

fn forget_client() {
    let _ = sh(&["conntrack", "-D", "-s", CLIENT_IP]);
}

/// One request from the namespace to the published HTTP port, and whether the host tracked
/// it: proves which path carried it.
fn tracked_request() -> Result<bool> {
    forget_client();
    let r = ext_churn(HOST_IP, P_HTTP, 1, 1, None)?;
    if r.errors > 0 {
        bail!("the external client could not reach {HOST_IP}:{P_HTTP}");
    }
    Ok(tracked_from_client() > 0)
}

/// The agent with the packet layer on, checked to carry the client (untracked).
fn packet_agent() -> Result<Agent> {
    let agent = Agent::start_with(&packet_config())?;
    let t = std::time::Instant::now();
    loop {
        let ready = Agent::status()
            .and_then(|s| s.packet_layer)
            .is_some_and(|p| p.uplinks == [HOST_IF] && p.endpoints >= 2);
        if ready && !tracked_request()? {
            return Ok(agent);
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!(
                "the packet layer does not carry the external client\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The external section of the report. Docker runs with the userland proxy off.
pub(super) fn external(env: &Env, rounds: usize) -> Result<String> {
    let _outside = Outside::create()?;
    let place = Placement::pin();
    let cpu = place.client();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### External clients ({rounds} rounds after a warm-up, order alternating): a client \
         in its own namespace behind a veth standing for the uplink, to `{HOST_IP}:P`; \
         direct = routed to the container's address; mean ratio [95% confidence interval]\n"
    );
    let _ = writeln!(md, "| comparison | metric | ratio | rounds | verdict |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    if tracked_request()? {
        // Docker's DNAT, as expected without the agent.
    } else {
        bail!("without the agent the external client's connection was not tracked: is DNAT off?");
    }
    {
        let _agent = packet_agent()?;
        for m in Metric::ALL {
            println!("bench: external, dataplane / direct, {}", m.name());
            let ratios = pairs(
                rounds,
                || measure(env, m, true, cpu),
                || measure(env, m, false, cpu),
            )?;
            row(
                &mut md,
                "dataplane / direct routed, external",
                m.name(),
                &ratios,
            );
        }
    }
    let agent: std::cell::RefCell<Option<Agent>> = std::cell::RefCell::new(None);
    for m in Metric::ALL {
        println!("bench: external, dataplane / DNAT, {}", m.name());
        let ratios = pairs(
            rounds,
            || {
                agent.replace(None);
                measure(env, m, false, cpu)
            },
            || {
                if agent.borrow().is_none() {
                    agent.replace(Some(packet_agent()?));
                }
                measure(env, m, false, cpu)
            },
        )?;
        row(
            &mut md,
            "dataplane / Docker's DNAT, external",
            m.name(),
            &ratios,
        );
    }
    // Traffic the programs do not translate (to a port nothing publishes: an iperf3 server
    // of the host's own) pays the forward program's published-port lookup per packet.
    {
        let _server = HostServer::start(P_UNPUBLISHED)?;
        println!("bench: external, cost for traffic to an unpublished port");
        let secs = if env.quick { 2 } else { 3 };
        let run = || {
            pinned(cpu, || {
                ext_iperf(HOST_IP, P_UNPUBLISHED, 4, false, false, secs)
            })
        };
        let ratios = pairs(
            rounds,
            || {
                agent.replace(None);
                run()
            },
            || {
                if agent.borrow().is_none() {
                    agent.replace(Some(packet_agent()?));
                }
                run()
            },
        )?;
        row(
            &mut md,
            "to an unpublished port of the host, packet programs attached / not",
            Metric::Tcp4.name(),
            &ratios,
        );
    }
    agent.replace(None);
    md += &per_connection(env)?;
    md += &soak(env)?;
    drop(place);
    Ok(md)
}

/// What one connection leaves on the host: conntrack entries, and flow-map entries (the
/// agent counts them every 10 s, before aging).
fn per_connection(env: &Env) -> Result<String> {
    let n = env.churn_n / 2;
    let mut md = format!(
        "\n#### What each external connection leaves ({n} connections, c=16)\n\n| path | conntrack entries per connection | flow-map entries per connection |\n|---|---|---|\n"
    );
    #[expect(clippy::cast_precision_loss, reason = "counts")]
    let per = |x: u64| x as f64 / n as f64;
    forget_client();
    let ct0 = conntrack_count();
    let r = ext_churn(HOST_IP, P_HTTP, n, 16, None)?;
    let ct1 = conntrack_count();
    let _ = writeln!(
        md,
        "| Docker's DNAT | {:.2} | - |",
        per(ct1.saturating_sub(ct0))
    );
    if r.errors > 0 {
        bail!("{} DNAT connections failed", r.errors);
    }
    let _agent = packet_agent()?;
    forget_client();
    let ct0 = conntrack_count();
    let r = ext_churn(HOST_IP, P_HTTP, n, 16, None)?;
    let ct1 = conntrack_count();
    let ended = now_ms();
    if r.errors > 0 {
        bail!("{} dataplane connections failed", r.errors);
    }
    let t = std::time::Instant::now();
    let flows = loop {
        let p = Agent::status().and_then(|s| s.packet_layer);
        if let Some(p) = p.filter(|p| p.flows_counted_unix_ms > ended) {
            break p.flows;
        }
        if t.elapsed() > Duration::from_secs(15) {
            bail!("the agent did not count its flows");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = writeln!(
        md,
        "| dataplane | {:.2} | {:.2} |",
        per(ct1.saturating_sub(ct0)),
        per(u64::try_from(flows).unwrap_or(0))
    );
    Ok(md)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Conntrack's drop counters summed over CPUs: `(drop, insert_failed, early_drop)`.
fn conntrack_drops() -> (u64, u64, u64) {
    let text = sh(&["conntrack", "-S"]).unwrap_or_default();
    let mut out = (0, 0, 0);
    for w in text.split_whitespace() {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "drop" => out.0 += v,
            "insert_failed" => out.1 += v,
            "early_drop" => out.2 += v,
            _ => {}
        }
    }
    out
}

/// The soak: connections at the full rate (c=64) for long enough to fill a conntrack table
/// lowered to [`SOAK_CT_MAX`] with DNAT's entries (120 s in `TIME_WAIT` each), then the same
/// through the packet layer; failed connections and conntrack's drops on both.
fn soak(env: &Env) -> Result<String> {
    let secs: u64 = if env.quick { 10 } else { 20 };
    let max_path = "/proc/sys/net/netfilter/nf_conntrack_max";
    let saved = std::fs::read_to_string(max_path)?.trim().to_string();
    let mut md = format!(
        "\n#### Soak: {secs} s of connections at the full rate (c=64) from the external client, nf_conntrack_max lowered from {saved} to {SOAK_CT_MAX} for the run\n\n| path | connections | conn/s | failed | conntrack drops (drop / insert_failed / early_drop) | conntrack entries at the end |\n|---|---|---|---|---|---|\n"
    );
    std::fs::write(max_path, SOAK_CT_MAX.to_string())?;
    let r = (|| -> Result<()> {
        for dataplane in [false, true] {
            println!(
                "bench: external soak, {}",
                if dataplane { "dataplane" } else { "DNAT" }
            );
            let agent = if dataplane {
                Some(packet_agent()?)
            } else {
                None
            };
            forget_client();
            let d0 = conntrack_drops();
            let r = ext_churn(HOST_IP, P_HTTP, 0, 64, Some(secs))?;
            let d1 = conntrack_drops();
            let left = tracked_from_client();
            drop(agent);
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} / {} / {} | {left} |",
                if dataplane {
                    "dataplane"
                } else {
                    "Docker's DNAT"
                },
                r.ok + r.errors,
                r.conn_per_s,
                r.errors,
                d1.0.saturating_sub(d0.0),
                d1.1.saturating_sub(d0.1),
                d1.2.saturating_sub(d0.2),
            );
        }
        Ok(())
    })();
    forget_client();
    let _ = std::fs::write(max_path, &saved);
    r.map(|()| md)
}

/// The conntrack table's size during the soak: below the client's ephemeral port range
/// (28,232 ports), since one client's connections to one address reuse their tuples and
/// conntrack reopens an entry in `TIME_WAIT` for the same tuple: a larger table never fills
/// from one client, whatever the rate (with many clients it does, at the default size).
const SOAK_CT_MAX: u32 = 8_192;
