//! The clients the bench measures with: iperf3 (throughput) and dp-churn (connections per
//! second and latency), on the host or in the client container.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Path, conntrack_count, project_root, sh, time_wait_count};

pub(super) fn iperf_args(
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

pub(super) fn in_client(args: &[String]) -> Vec<String> {
    let mut v = vec!["docker".to_string(), "exec".into(), "dpb-client".into()];
    v.extend_from_slice(args);
    v
}

pub(super) fn run_json(args: &[String]) -> Result<String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(&a)
}

/// Gbit/s (and loss % for UDP).
pub(super) fn iperf(
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
    run_iperf(&args).with_context(|| format!("iperf3 to {host}:{port}"))
}

/// Runs the iperf3 client command `args`: Gbit/s received (and loss % for UDP).
pub(super) fn run_iperf(args: &[String]) -> Result<(f64, f64)> {
    // The iperf3 server takes one test at a time; a retry covers a server still finishing.
    let mut last = String::new();
    for _ in 0..3 {
        match run_json(args) {
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
    bail!("failed: {last}")
}

pub(super) struct Churn {
    pub(super) conn_per_s: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) conntrack_per_conn: f64,
    pub(super) time_wait_per_conn: f64,
}

pub(super) fn churn(path: Path, host: &str, port: u16, n: usize, conc: usize) -> Result<Churn> {
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
    #[expect(clippy::cast_precision_loss, reason = "counts")]
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n as f64;
    Ok(Churn {
        conn_per_s: report.conn_per_s,
        #[expect(clippy::cast_precision_loss, reason = "microseconds")]
        p50_us: report.p50_us as f64,
        #[expect(clippy::cast_precision_loss, reason = "microseconds")]
        p99_us: report.p99_us as f64,
        conntrack_per_conn: per(ct0, ct1),
        time_wait_per_conn: per(tw0, tw1),
    })
}

/// Runs `f` with this thread (and so the clients it starts) on CPU `cpu`, when given.
pub(super) fn pinned<T>(cpu: Option<&str>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(cpu) = cpu.and_then(|c| c.parse::<usize>().ok()) else {
        return f();
    };
    // SAFETY: cpu_set_t is plain data; sched_{get,set}affinity on the calling thread with
    // a set of the right size.
    unsafe {
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let had = libc::sched_getaffinity(0, size, &raw mut saved) == 0;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        libc::sched_setaffinity(0, size, &raw const one);
        let r = f();
        if had {
            libc::sched_setaffinity(0, size, &raw const saved);
        }
        r
    }
}
