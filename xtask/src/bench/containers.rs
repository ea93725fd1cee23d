//! The bench's containers: servers, the haproxy in front of them, the client.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{P_HTTP, P_IPERF, inspect, project_root, sh};

/// Removes every container the bench made, also when it fails.
pub(super) struct Containers;

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = sh(&["docker", "ps", "-aq", "--filter", "name=^dpb-"]).unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = sh(&["docker", "rm", "-f", id]);
        }
    }
}

pub(super) fn run_containers(image: &str) -> Result<()> {
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

pub(super) fn wait_running(names: &[&str]) -> Result<()> {
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
