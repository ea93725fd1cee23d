//! Starting the agent: what must hold first (one agent, a pin directory of its own), then
//! the programs loaded, Docker's state listed and the host's ruleset read, overlapped, with
//! each phase timed for `status`. Nothing is left half-installed on failure.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bollard::{Docker, models::ContainerInspectResponse};
use dataplane_common::{CFG_F_RESERVE_PORTS, Config};
use futures_util::StreamExt;
use tracing::{debug, info};

use crate::{
    bpf::{self, Loaded},
    docker::{self, NetInfo},
    features::Features,
    hostfw,
};

pub struct Options {
    pub docker_socket: String,
    /// Where a stopping agent leaves what it knew of the containers for the next start
    /// ([`crate::agent::cache`]); `None`: nowhere.
    pub cache_path: Option<PathBuf>,
    pub api_socket: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub resync_interval: Duration,
    /// Name of the nftables table (family inet) the agent owns.
    pub nft_table: String,
    /// Name of the iptables chain (jumped to from `DOCKER-USER`) that earlier versions kept;
    /// removed at start where found.
    pub fwd_chain: String,
    /// Where maps and links are pinned (they outlive the agent); `None`: not pinned, and
    /// everything is detached when the agent stops.
    pub pin_dir: Option<PathBuf>,
    /// Room for published bindings in the maps this start creates.
    pub max_frontends: u32,
    /// The config file's content (egress defaults and profiles).
    pub config: crate::config::Config,
    /// Where it was read from (read again on `SIGHUP`); `None`: not reloadable.
    pub config_path: Option<PathBuf>,
    /// Where runtime egress changes are kept (`None`: nowhere, they last as long as the
    /// process).
    pub state_dir: Option<PathBuf>,
    /// The packet layer's flags (taken with the config file's `[packet_layer]`).
    pub packet_flags: crate::packet::Flags,
    /// `--own-firewall` (or the config file's `[own_firewall] enabled`).
    pub own_firewall: bool,
}

impl Options {
    /// The packet layer's settings from the config and the flags (`None`: off).
    pub fn packet(&self) -> Result<Option<crate::packet::Settings>, String> {
        crate::packet::settings(&self.config.packet_layer, &self.packet_flags)
    }

    /// Room for published bindings, and for the packet layer's flows when it is on.
    fn sizes(&self) -> (u32, Option<u32>) {
        let flows = self.packet().ok().flatten().map(|s| s.flows);
        (self.max_frontends, flows)
    }
}

/// The phases of the start, timed: logged at debug level and reported in `status`.
pub struct Startup {
    pub start: Instant,
    pub phases: Vec<dataplane_api::Phase>,
}

impl Default for Startup {
    fn default() -> Self {
        Self::new()
    }
}

impl Startup {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            phases: Vec::new(),
        }
    }

    pub fn record(&mut self, name: &str, took: Duration) {
        let p = dataplane_api::Phase {
            name: name.to_string(),
            took_ms: took.as_secs_f64() * 1e3,
            total_ms: self.start.elapsed().as_secs_f64() * 1e3,
        };
        debug!(
            phase = name,
            took_ms = p.took_ms,
            total_ms = p.total_ms,
            "init phase done"
        );
        self.phases.push(p);
    }
}

pub type Inspected = Vec<(String, Result<Option<ContainerInspectResponse>>)>;

/// Inspects in flight at once: enough to overlap Docker's answers, few enough that a host
/// with thousands of containers never runs the agent (or dockerd) out of descriptors.
const INSPECT_CONCURRENCY: usize = 32;

/// Inspects each container once, a bounded number at a time.
pub async fn inspect_all(docker: &Docker, ids: impl IntoIterator<Item = String>) -> Inspected {
    futures_util::stream::iter(ids)
        .map(|id| async move {
            let r = docker::inspect(docker, &id).await;
            (id, r)
        })
        .buffer_unordered(INSPECT_CONCURRENCY)
        .collect()
        .await
}

/// Why the agent could not start; each has its own exit code, for supervisors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No cgroup2 or bpffs mount, an old kernel, no root.
    #[error("{0:#}")]
    Environment(anyhow::Error),
    /// The kernel refused to load or attach a program.
    #[error("{0:#}")]
    Kernel(anyhow::Error),
    /// Docker's API could not be reached.
    #[error("{0:#}")]
    Docker(anyhow::Error),
    /// Another agent's programs are installed.
    #[error("{0:#}")]
    AlreadyInstalled(anyhow::Error),
    /// The own-firewall mode and Docker's settings disagree.
    #[error("{0:#}")]
    Mode(anyhow::Error),
    /// Anything else.
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Other(_) => 1,
            Self::AlreadyInstalled(_) => 3,
            Self::Environment(_) => 4,
            Self::Kernel(_) => 5,
            Self::Docker(_) => 6,
            Self::Mode(_) => 7,
        }
    }
}

/// The host's firewall at the start.
pub enum Firewall {
    /// The ruleset, as read.
    Read(hostfw::Snapshot),
    /// What the last agent found it to do, at the same ruleset generation: the ruleset is
    /// to be read after the start.
    Known(hostfw::HostFirewall),
}

/// What the start-up finds, overlapped: the programs loaded, Docker's state, the host's
/// ruleset.
pub struct Started {
    pub loaded: Loaded,
    pub docker: Docker,
    pub inspected: Inspected,
    pub networks: HashMap<String, NetInfo>,
    /// Docker's version.
    pub docker_version: String,
    pub fw: Firewall,
    /// Every container, running or not: id, name, labels.
    pub listed: Vec<docker::Named>,
    /// How many of `inspected` came from the last agent's cache.
    pub cached: usize,
    /// Docker's firewall settings, or why they could not be read.
    pub docker_settings: Result<crate::ownfw::docker_conf::Settings, String>,
}

/// What Docker says at the start.
struct DockerState {
    docker: Docker,
    inspected: Inspected,
    networks: HashMap<String, NetInfo>,
    version: String,
    listed: Vec<docker::Named>,
    /// How many inspects came from the last agent's cache.
    cached: usize,
    settings: Result<crate::ownfw::docker_conf::Settings, String>,
}

/// Removes an earlier version's chain, then reads the host's ruleset (unless `read` is
/// false: the last agent's evaluation stands); with how long each took.
fn read_ruleset(
    opts: &Options,
    read: bool,
) -> tokio::task::JoinHandle<Option<(hostfw::Snapshot, Duration, Duration)>> {
    let fwd_chain = opts.fwd_chain.clone();
    let own_table = opts.nft_table.clone();
    tokio::task::spawn_blocking(move || {
        read.then(|| {
            let t = Instant::now();
            if crate::netfilter::legacy::remove_legacy(&fwd_chain) {
                info!(chain = %fwd_chain, "removed the DOCKER-USER chain of an earlier version");
            }
            let legacy = t.elapsed();
            (hostfw::capture(&own_table), legacy, t.elapsed())
        })
    })
}

/// The own-firewall mode needs Docker's rules off (and says so when they are not, or when
/// it cannot tell).
fn check_mode(
    own_firewall: bool,
    settings: &Result<crate::ownfw::docker_conf::Settings, String>,
) -> Result<(), StartError> {
    if !own_firewall {
        return Ok(());
    }
    settings
        .as_ref()
        .map_err(|e| {
            format!("--own-firewall: cannot tell whether Docker's iptables rules are off: {e}")
        })
        .and_then(|s| crate::ownfw::docker_conf::check(true, s))
        .map_err(|e| StartError::Mode(anyhow::anyhow!(e)))
}

/// Connects to Docker, lists containers and networks, and inspects the running containers
/// the last agent's cache (`left`) does not vouch for.
async fn docker_state(socket: &str, left: &mut crate::agent::cache::Left) -> Result<DockerState> {
    let t = Instant::now();
    let (docker, version) = docker::connect(socket).await?;
    let settings = crate::ownfw::docker_conf::of_daemon(socket);
    debug!(took_us = t.elapsed().as_micros(), "connected to Docker");
    let (listed, networks) = tokio::join!(docker::list_all(&docker), docker::networks(&docker));
    let listed = listed?;
    debug!(
        took_us = t.elapsed().as_micros(),
        "listed containers and networks"
    );
    let running: Vec<(String, String)> = listed
        .iter()
        .filter(|c| docker::is_running(c))
        .filter_map(|c| Some((c.id.clone()?, crate::agent::cache::of_summary(c))))
        .collect();
    // What the last agent knew and still holds is not asked again.
    let cached = left.containers(&running);
    let ask = running
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !cached.contains_key(id));
    let mut inspected = inspect_all(&docker, ask).await;
    let n = cached.len();
    inspected.extend(cached.into_iter().map(|(id, c)| (id, Ok(Some(c)))));
    Ok(DockerState {
        docker,
        inspected,
        networks: networks?,
        version,
        listed: docker::named(listed),
        cached: n,
        settings,
    })
}

/// This build's programs pinned and attached: taken as they are (a restart); otherwise
/// loaded, and attached or swapped in.
/// `(max_frontends, packet_flows)`: room for published bindings, and for the packet
/// layer's flows when it is on.
fn load(
    cgroup: &Path,
    pin_dir: Option<&Path>,
    (max_frontends, packet_flows): (u32, Option<u32>),
    features: &Features,
) -> Result<Loaded> {
    if let Some(l) = pin_dir
        .map(|d| Loaded::reuse_pinned(d, cgroup, features, packet_flows))
        .transpose()?
        .flatten()
    {
        return Ok(l);
    }
    Loaded::load_and_attach_sized(cgroup, pin_dir, max_frontends, features, packet_flows)
}

/// Loads and attaches the programs, asks Docker for its containers and networks, and reads
/// the host's ruleset, overlapped. On failure, a pin directory this start created is removed
/// again: nothing is left half-installed. An existing one (an earlier agent's) is adopted
/// and kept.
pub async fn load_and_list(
    opts: &Options,
    cgroup: PathBuf,
    host_cookie: u64,
    features: Features,
    startup: &mut Startup,
) -> Result<Started, StartError> {
    let fresh_pins = opts.pin_dir.as_ref().filter(|d| !d.exists()).cloned();
    let undo = |e: StartError| {
        if let Some(dir) = &fresh_pins {
            let _ = bpf::unpin_all(dir);
        }
        e
    };
    // What the last agent left: inspects, and the firewall's evaluation if the ruleset has
    // not changed since (then `nft` is not waited for: it lists the ruleset after ready).
    let mut left = opts
        .cache_path
        .as_deref()
        .map(crate::agent::cache::take)
        .unwrap_or_default();
    let fw_known = left.firewall();
    // Loading and Docker's first answer are independent: overlap them.
    let docker_fut = docker_state(&opts.docker_socket, &mut left);
    // An earlier version's DOCKER-USER chain goes; then the host's ruleset is read.
    let fw_fut = read_ruleset(opts, fw_known.is_none());
    let pin_dir = opts.pin_dir.clone();
    let sizes = opts.sizes();
    let load_fut = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        (
            load(&cgroup, pin_dir.as_deref(), sizes, &features),
            t.elapsed(),
        )
    });
    let (docker_res, load_res, fw_res) = tokio::join!(
        async {
            let t = Instant::now();
            (docker_fut.await, t.elapsed())
        },
        load_fut,
        fw_fut
    );
    let (docker_res, docker_took) = docker_res;
    let fw = match fw_res.context("firewall task")? {
        Some((snapshot, legacy_took, fw_took)) => {
            startup.record("legacy_chain_check", legacy_took);
            startup.record("ruleset_read", fw_took);
            Firewall::Read(snapshot)
        }
        None => Firewall::Known(fw_known.unwrap_or_default()),
    };
    let (load_res, load_took) = load_res.context("load task")?;
    let mut loaded = match load_res {
        Ok(l) => l,
        Err(e) => return Err(undo(StartError::Kernel(e))),
    };
    startup.record(
        if loaded.reused {
            "reuse_pinned"
        } else {
            "load_attach"
        },
        load_took,
    );
    startup.record("docker_list_inspect", docker_took);
    let DockerState {
        docker,
        inspected,
        networks,
        version: docker_version,
        listed,
        cached,
        settings,
    } = match docker_res
        .map_err(StartError::Docker)
        .and_then(|d| check_mode(opts.own_firewall, &d.settings).map(|()| d))
    {
        Ok(d) => d,
        Err(e) => {
            drop(loaded);
            return Err(undo(e));
        }
    };
    // Container clients stay off until the first sync has read the host's ruleset.
    if let Err(e) = loaded.set_config(Config {
        host_netns_cookie: host_cookie,
        flags: CFG_F_RESERVE_PORTS,
    }) {
        drop(loaded);
        return Err(undo(StartError::Kernel(e)));
    }

    Ok(Started {
        loaded,
        docker,
        inspected,
        networks,
        docker_version,
        fw,
        listed,
        cached,
        docker_settings: settings,
    })
}

/// What must hold before anything is loaded: the kernel's features, the cgroup, the host
/// namespace cookie, a pin directory that is the agent's own, no other agent's pinned
/// programs beside an unpinned start.
pub fn preflight(opts: &Options) -> Result<(PathBuf, u64, Features), StartError> {
    let t = Instant::now();
    let features = Features::probe();
    features.log();
    tracing::debug!(took_us = t.elapsed().as_micros(), "features probed");
    features.check().map_err(if features.denied() {
        StartError::Environment
    } else {
        StartError::Kernel
    })?;
    let cgroup = match &opts.cgroup {
        Some(p) => p.clone(),
        None => bpf::cgroup2_mount().map_err(StartError::Environment)?,
    };
    let host_cookie = bpf::netns_cookie().map_err(StartError::Environment)?;
    if !cgroup.is_dir() {
        return Err(StartError::Environment(anyhow::anyhow!(
            "cgroup {} does not exist",
            cgroup.display()
        )));
    }
    if let Some(dir) = &opts.pin_dir {
        bpf::check_bpffs(dir).map_err(StartError::Environment)?;
        bpf::secure_pin_dir(dir, false).map_err(StartError::Environment)?;
    } else if bpf::has_pinned_links(std::path::Path::new(bpf::DEFAULT_PIN_DIR)) {
        // A pinned agent's programs are attached: a second, unpinned set would translate
        // beside them and leave when this one stops.
        return Err(StartError::AlreadyInstalled(anyhow::anyhow!(
            "an agent's programs are pinned at {} and attached; run without --no-pin to adopt \
             them, or `dataplane uninstall` first",
            bpf::DEFAULT_PIN_DIR
        )));
    }
    Ok((cgroup, host_cookie, features))
}
