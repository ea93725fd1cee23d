//! The agent as the bench runs it: started per variant, asked through its control
//! protocol, stopped after.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::project_root;

/// The agent, run for a variant and stopped after it (nothing pinned: stopping detaches).
pub(super) struct Agent {
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

/// Whether the bench's agents run in the own-firewall mode (set while Docker runs with its
/// iptables rules off).
pub(super) static OWN_FIREWALL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(super) const AGENT_SOCKET: &str = "/run/dataplane-bench/ctl.sock";
/// Where the bench's agent serves its metrics.
pub(super) const METRICS: &str = "127.0.0.1:25296";

impl Agent {
    pub(super) fn start() -> Result<Self> {
        Self::start_with("")
    }

    /// An agent whose config file has `config` after its metrics endpoint.
    pub(super) fn start_with(config: &str) -> Result<Self> {
        let log = PathBuf::from("/run/dataplane-bench/agent.log");
        fs::create_dir_all("/run/dataplane-bench")?;
        fs::write(
            "/run/dataplane-bench/dataplane.toml",
            format!("[metrics]\nlisten = \"{METRICS}\"\n{config}"),
        )?;
        let f = fs::File::create(&log)?;
        let child = Command::new(project_root().join("target/release/dataplane"))
            .args(["run", "--no-pin", "--socket", AGENT_SOCKET])
            .args([
                "--nft-table",
                "dataplane_bench",
                "--fwd-chain",
                "DATAPLANE-BENCH",
                "--config",
                "/run/dataplane-bench/dataplane.toml",
                "--state-dir",
                "/run/dataplane-bench/state",
            ])
            .args(
                OWN_FIREWALL
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then_some("--own-firewall"),
            )
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

    pub(super) fn ctl_ok() -> bool {
        Self::status().is_some_and(|s| s.ready)
    }

    /// What the agent says of itself, when it answers.
    pub(super) fn status() -> Option<dataplane_api::Status> {
        dataplane_api::status(std::path::Path::new(AGENT_SOCKET)).ok()
    }

    /// Sockets the programs translated at `connect()`.
    pub(super) fn connects() -> u64 {
        Self::status().map_or(0, |s| s.counter(dataplane_common::STAT_CONNECT))
    }

    /// Whether the agent has the frontend `address:port/proto`.
    pub(super) fn has_frontend(key: &str) -> bool {
        dataplane_api::frontends(std::path::Path::new(AGENT_SOCKET))
            .is_ok_and(|fs| fs.iter().any(|f| f.frontend == key))
    }

    /// How long one metrics scrape takes (the whole exposition read), and its size.
    pub(super) fn scrape() -> Result<(Duration, usize)> {
        use std::io::{Read, Write};
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(METRICS).context("connecting to the metrics")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        Ok((t.elapsed(), body.len()))
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn log_text(&self) -> String {
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
