//! Paired measurements: two configurations measured back to back in each round, the order
//! alternating between rounds (ABBA), after a warm-up round that is discarded, with the
//! client and the server on CPUs of their own. Each round gives one ratio; the report is
//! the mean ratio with a 95% confidence interval (Student's t over the rounds), so a 3%
//! difference can be told from noise: an interval that contains 1.0 means "no difference
//! measured".

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    Env, P_HTTP, P_IPERF, Path,
    agent::Agent,
    clients::{churn, iperf},
    sh,
};

/// Two-sided 95% quantiles of Student's t for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Mean of `v` and the half-width of its 95% confidence interval (NaN below 2 samples).
pub(super) fn mean_ci(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    #[expect(clippy::cast_precision_loss, reason = "a few rounds")]
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let t = T95[(v.len() - 2).min(T95.len() - 1)];
    (mean, t * (var / n).sqrt())
}

/// What an interval says about a ratio.
pub(super) fn verdict(mean: f64, half: f64) -> String {
    if !half.is_finite() {
        return "one round: no interval".into();
    }
    let (lo, hi) = (mean - half, mean + half);
    if lo <= 1.0 && 1.0 <= hi {
        "no difference measured (the interval holds 1.0)".into()
    } else if lo > 1.0 {
        format!("higher by {:.1}%", (lo - 1.0) * 100.0)
    } else {
        format!("lower by at least {:.1}%", (1.0 - hi) * 100.0)
    }
}

/// Where the bench's clients and servers run: the client on CPU 0, the servers on CPU 1
/// (two CPUs or more); undone on drop.
pub(super) struct Placement {
    pinned: bool,
    all: String,
}

impl Placement {
    pub(super) fn pin() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let all = format!("0-{}", cpus.saturating_sub(1));
        if cpus < 2 {
            return Self { pinned: false, all };
        }
        let ok = sh(&[
            "docker",
            "update",
            "--cpuset-cpus",
            "1",
            "dpb-srv",
            "dpb-http",
        ])
        .is_ok()
            && sh(&["docker", "update", "--cpuset-cpus", "0", "dpb-client"]).is_ok();
        Self { pinned: ok, all }
    }

    /// The command prefix that puts a host client on its CPU.
    pub(super) fn client(&self) -> Option<&'static str> {
        self.pinned.then_some("0")
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let _ = sh(&[
            "docker",
            "update",
            "--cpuset-cpus",
            &self.all,
            "dpb-srv",
            "dpb-http",
            "dpb-client",
        ]);
    }
}

/// One measurement: throughput (Gbit/s, iperf3 -P4) or connections per second (c=16).
#[derive(Clone, Copy)]
enum Metric {
    Tcp4,
    ConnPerS,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp4 => "tcp 4 streams",
            Self::ConnPerS => "conn/s c=16",
        }
    }
}

fn measure(env: &Env, path: Path, metric: Metric, direct: bool, cpu: Option<&str>) -> Result<f64> {
    let (ip, dport, published) = match metric {
        Metric::Tcp4 => (env.srv_ip.clone(), 5201, P_IPERF),
        Metric::ConnPerS => (env.http_ip.clone(), 80, P_HTTP),
    };
    let (host, port) = if direct {
        (ip, dport)
    } else {
        match path {
            Path::Hairpin => (env.gateway.clone(), published),
            _ => ("127.0.0.1".to_string(), published),
        }
    };
    let cpu = if path == Path::Hairpin { None } else { cpu };
    let secs = if env.quick { 2 } else { 3 };
    Ok(match metric {
        Metric::Tcp4 => super::clients::pinned(cpu, || {
            iperf(path, &host, port, 4, false, false, secs).map(|r| r.0)
        })?,
        Metric::ConnPerS => super::clients::pinned(cpu, || {
            churn(path, &host, port, env.churn_n / 2, 16).map(|r| r.conn_per_s)
        })?,
    })
}

/// Runs `a` and `b` (closures measuring one configuration each) for `rounds` rounds after
/// a warm-up, alternating which goes first; returns the ratios b/a per round.
pub(super) fn pairs(
    rounds: usize,
    mut a: impl FnMut() -> Result<f64>,
    mut b: impl FnMut() -> Result<f64>,
) -> Result<Vec<f64>> {
    a()?;
    b()?;
    let mut ratios = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let (x, y) = if r % 2 == 0 {
            let x = a()?;
            (x, b()?)
        } else {
            let y = b()?;
            (a()?, y)
        };
        ratios.push(y / x);
    }
    Ok(ratios)
}

pub(super) fn row(md: &mut String, what: &str, metric: &str, ratios: &[f64]) {
    let (m, h) = mean_ci(ratios);
    let _ = writeln!(
        md,
        "| {what} | {metric} | {m:.3} [{:.3}-{:.3}] | {} | {} |",
        m - h,
        m + h,
        ratios.len(),
        verdict(m, h)
    );
}

/// The local paths through the dataplane against direct, and the cost of the agent for
/// traffic it does not translate (direct, agent running against agent stopped: the
/// `connect()` hooks' lookups and the notrack table's rules, evaluated in both
/// directions). Docker must run with the userland proxy off and no agent. Returns the
/// report's section.
pub(super) fn paired(env: &Env, rounds: usize) -> Result<String> {
    let place = Placement::pin();
    let cpu = place.client();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Paired with direct ({rounds} rounds after a warm-up, order alternating, client \
         and server on CPUs of their own: {}); mean ratio [95% confidence interval]\n",
        if place.pinned { "yes" } else { "no, one CPU" }
    );
    let _ = writeln!(md, "| comparison | metric | ratio | rounds | verdict |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    {
        let _agent = Agent::start()?;
        for path in [Path::Localhost, Path::Hairpin] {
            for metric in [Metric::Tcp4, Metric::ConnPerS] {
                println!("bench: paired, {} {}", path.name(), metric.name());
                let ratios = pairs(
                    rounds,
                    || measure(env, path, metric, true, cpu),
                    || measure(env, path, metric, false, cpu),
                )?;
                row(
                    &mut md,
                    &format!("dataplane / direct, {}", path.name()),
                    metric.name(),
                    &ratios,
                );
            }
        }
    }
    // Direct traffic with the agent running (hooks attached, notrack table in place) over
    // the same with no agent.
    for metric in [Metric::Tcp4, Metric::ConnPerS] {
        println!("bench: paired, agent cost for direct {}", metric.name());
        let agent: std::cell::RefCell<Option<Agent>> = std::cell::RefCell::new(None);
        let ratios = pairs(
            rounds,
            || {
                // Stopping an unpinned agent detaches its programs and removes its table.
                agent.replace(None);
                measure(env, Path::Localhost, metric, true, cpu)
            },
            || {
                if agent.borrow().is_none() {
                    agent.replace(Some(Agent::start()?));
                }
                measure(env, Path::Localhost, metric, true, cpu)
            },
        )?;
        drop(agent);
        row(
            &mut md,
            "direct with the agent running / without (hooks and notrack table)",
            metric.name(),
            &ratios,
        );
    }
    notrack_table(env, rounds, cpu, &mut md)?;
    drop(place);
    Ok(md)
}

/// What the agent's notrack table costs per packet, alone (no agent, no hooks): a copy of a
/// running agent's table loaded or not, iperf3 -P4 from the host straight to the container,
/// (1) to a port that is in none of its sets (an unpublished `iperf3 -s` on 5202 in the same
/// container: the rules are evaluated on every packet, both directions, and match nothing)
/// and (2) to the published server's own port (in its sets: the table untracks the flow, so
/// conntrack's cost goes away and the rules' cost stays).
fn notrack_table(env: &Env, rounds: usize, cpu: Option<&str>, md: &mut String) -> Result<()> {
    const TABLE: &str = "dataplane_bench";
    let copy = {
        let _agent = Agent::start()?;
        // The agent writes its table right after it is ready.
        let t = std::time::Instant::now();
        loop {
            match sh(&["nft", "list", "table", "inet", TABLE]) {
                Ok(c) if c.contains("backends4") => break c,
                _ if t.elapsed() > std::time::Duration::from_secs(10) => {
                    anyhow::bail!("the agent's notrack table did not appear")
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    };
    let file = "/run/dataplane-bench/notrack-copy.nft";
    std::fs::write(file, &copy)?;
    let _server = ExtraServer::start(5202)?;
    let loaded = std::cell::Cell::new(false);
    let set = |on: bool| -> Result<()> {
        if on != loaded.get() {
            if on {
                sh(&["nft", "-f", file])?;
            } else {
                sh(&["nft", "delete", "table", "inet", TABLE])?;
            }
            loaded.set(on);
        }
        Ok(())
    };
    let run = |port: u16| {
        super::clients::pinned(cpu, || {
            iperf(
                Path::Localhost,
                &env.srv_ip,
                port,
                4,
                false,
                false,
                if env.quick { 2 } else { 3 },
            )
            .map(|r| r.0)
        })
    };
    let r = (|| -> Result<()> {
        for (what, port) in [
            ("a port in none of its sets", 5202),
            ("the published server's port (untracked by it)", 5201),
        ] {
            println!("bench: paired, notrack table, {what}");
            let ratios = pairs(
                rounds,
                || {
                    set(false)?;
                    run(port)
                },
                || {
                    set(true)?;
                    run(port)
                },
            )?;
            row(
                md,
                &format!("direct with the notrack table / without (no agent), to {what}"),
                Metric::Tcp4.name(),
                &ratios,
            );
        }
        Ok(())
    })();
    let _ = set(false);
    r
}

/// A second `iperf3 -s` in the bench's server container, on a port nothing publishes;
/// stopped on drop.
pub(super) struct ExtraServer(u16);

impl ExtraServer {
    pub(super) fn start(port: u16) -> Result<Self> {
        sh(&[
            "docker",
            "exec",
            "-d",
            "dpb-srv",
            "sh",
            "-c",
            &format!("echo $$ > /tmp/iperf-{port}.pid; exec iperf3 -s -p {port}"),
        ])?;
        Ok(Self(port))
    }
}

impl Drop for ExtraServer {
    fn drop(&mut self) {
        let _ = sh(&[
            "docker",
            "exec",
            "dpb-srv",
            "sh",
            "-c",
            &format!("kill $(cat /tmp/iperf-{}.pid)", self.0),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_verdicts() {
        let (m, h) = mean_ci(&[1.0, 1.0, 1.0]);
        assert!((m - 1.0).abs() < 1e-12 && h.abs() < 1e-12);
        let (m, h) = mean_ci(&[0.98, 1.02, 0.99, 1.01]);
        assert!((m - 1.0).abs() < 1e-9);
        // sd 0.0183, se 0.00913, t(3) 3.182: half-width 0.029.
        assert!((h - 0.029).abs() < 0.001, "{h}");
        assert!(verdict(m, h).starts_with("no difference"));
        assert!(verdict(0.95, 0.01).starts_with("lower by at least 4.0%"));
        assert!(verdict(1.05, 0.01).starts_with("higher by 4.0%"));
        assert!(mean_ci(&[1.0]).1.is_nan());
    }

    #[test]
    fn rounds_alternate_and_warm_up_is_discarded() {
        let order = std::cell::RefCell::new(Vec::new());
        let ratios = pairs(
            3,
            || {
                order.borrow_mut().push('a');
                Ok(2.0)
            },
            || {
                order.borrow_mut().push('b');
                Ok(1.0)
            },
        )
        .unwrap();
        assert_eq!(ratios, vec![0.5, 0.5, 0.5]);
        assert_eq!(
            order.into_inner(),
            vec!['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']
        );
    }
}
