//! The report: the table of ratios to the direct path, the markdown file and its chart.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::Result;

use super::{Env, Path, Variant, project_root, sh, stats, svg};

/// The ratio table, appended to `md`; returns the chart's rows.
pub(super) fn table(env: &Env, md: &mut String) -> Vec<(String, [f64; 3])> {
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

pub(super) fn write_report(
    env: &Env,
    extra: &str,
    took: Duration,
    quick: bool,
    rounds: usize,
) -> Result<()> {
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
        rounds,
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
    fs::write(dir.join("latest.md"), &md)?;
    fs::write(dir.join("latest.svg"), svg(&chart))?;
    println!("{md}");
    println!("bench: wrote bench/results/latest.md and bench/results/latest.svg");
    Ok(())
}
