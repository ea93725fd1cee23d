//! Pausing a container that asked for `dataplane.on-pause=reset`: from Docker's `pause`
//! event to every translated connection to it destroyed, with many of them open.

use std::{
    fmt::Write as _,
    io::Read,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Agent, P_PAUSE, sh};

pub(super) fn pause_reset(image: &str, quick: bool, extra: &mut String) -> Result<()> {
    let name = "dpb-pause";
    let _ = sh(&["docker", "rm", "-f", name]);
    // A listener that serves one connection at a time (it stops accepting, not listening:
    // the rest wait, established, in its backlog; what is measured is the clients' side).
    sh(&[
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "dataplane.on-pause=reset",
        "-p",
        &format!("{P_PAUSE}:80"),
        image,
        "socat",
        "TCP-LISTEN:80,fork,max-children=1,backlog=4096,reuseaddr",
        "EXEC:cat",
    ])?;
    let r = (|| -> Result<String> {
        let agent = Agent::start()?;
        let n = 1000;
        let rounds = if quick { 3 } else { 5 };
        let mut lines = Vec::new();
        for _ in 0..rounds {
            let mut conns = Vec::with_capacity(n);
            // The listener is back (after the last round's connections ended).
            let t = Instant::now();
            while TcpStream::connect(("127.0.0.1", P_PAUSE))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_millis(300)))?;
                    std::io::Write::write_all(&mut c, b"x\n")?;
                    let mut b = [0u8; 2];
                    c.read_exact(&mut b)
                })
                .is_err()
            {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("the echo listener did not come back");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // The probe took the one accepted connection: the listener opens again.
            std::thread::sleep(Duration::from_millis(300));
            for _ in 0..n {
                // A refusal: the listener between two of its lives; tried again.
                let mut tries = 0;
                let c = loop {
                    match TcpStream::connect(("127.0.0.1", P_PAUSE)) {
                        Ok(c) => break c,
                        Err(e) if tries < 100 => {
                            tries += 1;
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            return Err(e).context("connecting to the paused-container bench");
                        }
                    }
                };
                conns.push(c);
            }
            let before = Agent::status().map_or(0, |s| s.pause_resets.len());
            let t = Instant::now();
            sh(&["docker", "pause", name])?;
            let pause_cmd = t.elapsed();
            while Agent::status().map_or(0, |s| s.pause_resets.len()) <= before {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("no reset within 10 s of the pause\n{}", agent.log_text());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let (us, destroyed) = Agent::status()
                .and_then(|s| s.pause_resets.last().copied())
                .unwrap_or_default();
            // Every client sees its connection gone.
            let mut ended = 0;
            for c in &mut conns {
                c.set_read_timeout(Some(Duration::from_millis(200)))?;
                let mut b = [0u8; 1];
                if matches!(c.read(&mut b), Ok(0) | Err(_)) {
                    ended += 1;
                }
            }
            sh(&["docker", "unpause", name])?;
            #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
            lines.push(format!(
                "{:.1} ms ({destroyed} destroyed, {ended} of {n} clients saw their connection end; \
                 `docker pause` itself {:.0} ms)",
                us as f64 / 1000.0,
                pause_cmd.as_secs_f64() * 1000.0
            ));
        }
        drop(agent);
        Ok(lines.join("; "))
    })();
    let _ = sh(&["docker", "rm", "-f", name]);
    let _ = writeln!(
        extra,
        "\n### Paused containers\n\n`docker pause` of a container with `dataplane.on-pause=reset` \
         and 1000 translated connections from the host, Docker's `pause` event to every one \
         of them destroyed: {}.",
        r?
    );
    Ok(())
}
