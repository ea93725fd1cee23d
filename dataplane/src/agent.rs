//! The agent loop: Docker events and netlink changes -> desired state -> diff -> maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use bollard::{Docker, models::ContainerInspectResponse};
use dataplane_common::{
    CFG_F_BINDV6ONLY, CFG_F_PEERS, CFG_F_RESERVE_PORTS, Config, FrontendKey, PeerNet, PeerNetKey,
    STAT_NAMES, net_id,
};
use futures_util::StreamExt;
use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    api::{self, FrontendRow, Shared},
    bpf::{self, Loaded},
    desired::{self, Frontend, Peer},
    docker::{self, Effect, NetInfo},
    hostfw::{self, HostFirewall},
    netlink::{self, HostAddr},
    netns, nfwatch,
    notrack::{self, Notrack},
    reconcile::KvStore,
    reconcile::reconcile,
    sockets,
};

pub struct Options {
    pub docker_socket: String,
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
}

struct Agent {
    loaded: Loaded,
    docker: Docker,
    nl: rtnetlink::Handle,
    /// Frontends per container id, from the last inspect of each.
    containers: HashMap<String, Vec<Frontend>>,
    shared: Shared,
    binding_errors: BTreeMap<String, Vec<String>>,
    host_addrs: Vec<HostAddr>,
    netfilter: Netfilter,
    /// When the frontends map was last written (sync latency is measured to here).
    frontends_written: SystemTime,
    /// Backends in the maps after the last apply, with the container each belongs to: the
    /// translated sockets of one that disappears with its address get destroyed.
    backends: BTreeMap<sockets::Gone, String>,
    /// Re-apply the nftables table even if unchanged (after a full resync: repairs drift).
    force_notrack: bool,
    /// Docker's networks by network ID.
    networks: HashMap<String, NetInfo>,
    /// Running containers as clients, with their network namespace cookie once known.
    peers: HashMap<String, (Peer, Option<u64>)>,
    /// The host's own ruleset as last read, and what it means for the agent.
    fw_snapshot: hostfw::Snapshot,
    firewall: HostFirewall,
    nft_table: String,
    /// The config map's content as last written.
    config: Config,
    /// Containers whose network namespace cookie is still to be read.
    pending_cookies: Vec<String>,
}

/// The phases of the start, timed: logged at debug level and reported in `status`.
struct Startup {
    start: Instant,
    phases: Vec<dataplane_api::Phase>,
}

impl Startup {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            phases: Vec::new(),
        }
    }

    fn record(&mut self, name: &str, took: Duration) {
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The nftables table is written by child processes (`nft`, and `conntrack` to read the
/// connections Docker's NAT carries: tens to hundreds of milliseconds on a busy host), so it
/// is applied off the event loop, after the maps: a new frontend answers at once, its
/// notrack rules follow. Requests coalesce and run in order; the latest wins. The event loop
/// only ever takes the small `want` lock; the runner lock is held while the commands run.
#[derive(Clone)]
struct Netfilter {
    want: Arc<Mutex<Want>>,
    runner: Arc<Mutex<Notrack>>,
}

#[derive(Default)]
struct Want {
    spec: Option<notrack::Spec>,
    force: bool,
    closed: bool,
}

impl Netfilter {
    fn new(notrack: Notrack) -> Self {
        Self {
            want: Arc::default(),
            runner: Arc::new(Mutex::new(notrack)),
        }
    }

    fn schedule(&self, spec: notrack::Spec, force: bool) {
        {
            let mut g = self.want.lock().expect("netfilter lock");
            g.spec = Some(spec);
            g.force |= force;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.run());
    }

    fn run(&self) {
        let mut nt = self.runner.lock().expect("netfilter runner lock");
        let (mut spec, force) = {
            let mut g = self.want.lock().expect("netfilter lock");
            if g.closed {
                return;
            }
            let Some(spec) = g.spec.take() else {
                return;
            };
            (spec, std::mem::take(&mut g.force))
        };
        // New peers or backends (or a full resync): the connections Docker's NAT carries
        // between them must keep their NAT. Otherwise the known ones, while they apply.
        let grew = nt.applied().is_none_or(|a| {
            !spec.peers.is_subset(&a.peers) || !spec.backends.is_subset(&a.backends)
        });
        if grew || force {
            spec.nat_replies = notrack::nat_replies(&notrack::dump_dnat(), &spec);
            if !spec.nat_replies.is_empty() {
                info!(
                    connections = spec.nat_replies.len(),
                    "connections carried by Docker's NAT keep being tracked until they end"
                );
            }
        } else if let Some(a) = nt.applied() {
            spec.nat_replies = a
                .nat_replies
                .iter()
                .filter(|(b, proto, bport, c, _)| {
                    spec.backends.contains(&(*b, *proto, *bport)) && spec.peers.contains(c)
                })
                .copied()
                .collect();
        }
        match nt.apply(&spec, force) {
            Ok(true) => debug!(
                backends = spec.backends.len(),
                "nftables notrack table applied"
            ),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "updating the nftables notrack table failed");
            }
        }
    }

    /// No more updates; removes the table (after any running update).
    fn close_and_remove(&self) {
        {
            let mut g = self.want.lock().expect("netfilter lock");
            g.closed = true;
            g.spec = None;
        }
        let mut nt = self.runner.lock().expect("netfilter runner lock");
        if let Err(e) = nt.remove() {
            warn!(error = %format!("{e:#}"), "removing the nftables table failed");
        }
    }
}

type Inspected = Vec<(String, Result<Option<ContainerInspectResponse>>)>;

/// Inspects in flight at once: enough to overlap Docker's answers, few enough that a host
/// with thousands of containers never runs the agent (or dockerd) out of descriptors.
const INSPECT_CONCURRENCY: usize = 32;

/// Inspects each container once, a bounded number at a time.
async fn inspect_all(docker: &Docker, ids: impl IntoIterator<Item = String>) -> Inspected {
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
        }
    }
}

/// What the start-up finds, overlapped: the programs loaded, Docker's state, the host's
/// ruleset.
struct Started {
    loaded: Loaded,
    docker: Docker,
    inspected: Inspected,
    networks: HashMap<String, NetInfo>,
    docker_version: String,
    fw_snapshot: hostfw::Snapshot,
}

/// Loads and attaches the programs, asks Docker for its containers and networks, and reads
/// the host's ruleset, overlapped. On failure, a pin directory this start created is removed
/// again: nothing is left half-installed. An existing one (an earlier agent's) is adopted
/// and kept.
async fn load_and_list(
    opts: &Options,
    cgroup: PathBuf,
    host_cookie: u64,
    startup: &mut Startup,
) -> Result<Started, StartError> {
    let fresh_pins = opts.pin_dir.as_ref().filter(|d| !d.exists()).cloned();
    let undo = |e: StartError| {
        if let Some(dir) = &fresh_pins {
            let _ = bpf::unpin_all(dir);
        }
        e
    };
    // Loading and Docker's first answer are independent: overlap them.
    let docker_fut = async {
        let d = docker::connect(&opts.docker_socket).await?;
        let ids = docker::running_ids(&d).await?;
        let (inspected, networks) = tokio::join!(inspect_all(&d, ids), docker::networks(&d));
        let version = d
            .version()
            .await
            .ok()
            .and_then(|v| v.version)
            .unwrap_or_default();
        anyhow::Ok((d, inspected, networks?, version))
    };
    // An earlier version's DOCKER-USER chain goes; then the host's ruleset is read.
    let fwd_chain = opts.fwd_chain.clone();
    let fw_fut = tokio::task::spawn_blocking(move || {
        if crate::forward::remove_legacy(&fwd_chain) {
            info!(chain = %fwd_chain, "removed the DOCKER-USER chain of an earlier version");
        }
        hostfw::capture()
    });
    let pin_dir = opts.pin_dir.clone();
    let max_frontends = opts.max_frontends;
    let load_fut = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let r = Loaded::load_and_attach_sized(&cgroup, pin_dir.as_deref(), max_frontends);
        (r, t.elapsed())
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
    let fw_snapshot = fw_res.context("firewall task")?;
    let (load_res, load_took) = load_res.context("load task")?;
    let mut loaded = match load_res {
        Ok(l) => l,
        Err(e) => return Err(undo(StartError::Kernel(e))),
    };
    startup.record("load_attach", load_took);
    startup.record("docker_list_inspect", docker_took);
    let (docker, inspected, networks, docker_version) = match docker_res {
        Ok(d) => d,
        Err(e) => {
            drop(loaded);
            return Err(undo(StartError::Docker(e)));
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
        fw_snapshot,
    })
}

/// What must hold before anything is loaded: the cgroup, the host namespace cookie, a pin
/// directory that is the agent's own, no other agent's pinned programs beside an unpinned
/// start.
fn preflight(opts: &Options) -> Result<(PathBuf, u64), StartError> {
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
    Ok((cgroup, host_cookie))
}

pub async fn run(opts: Options) -> Result<(), StartError> {
    let mut startup = Startup::new();
    // Before Docker is first asked anything: the events stream starts from here.
    let events_since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let (cgroup, host_cookie) = preflight(&opts)?;
    let Started {
        loaded,
        docker,
        inspected,
        networks,
        docker_version,
        fw_snapshot,
    } = load_and_list(&opts, cgroup, host_cookie, &mut startup).await?;
    let shared: Shared = Shared::default();
    {
        let s = &mut shared.lock().expect("status lock").status;
        s.version = env!("CARGO_PKG_VERSION").to_string();
        s.docker_version = docker_version;
        s.attach_points.clone_from(&loaded.attached);
    }
    let _api = api::serve(&opts.api_socket, shared.clone())?;
    let nl = netlink::connect()?;
    let (nl_tx, nl_rx) = mpsc::channel(1);
    netlink::watch(nl_tx)?;
    let (fw_tx, fw_rx) = mpsc::channel(1);
    nfwatch::watch(fw_tx)?;

    let mut agent = Agent {
        loaded,
        docker,
        nl,
        containers: HashMap::new(),
        shared,
        binding_errors: BTreeMap::new(),
        host_addrs: Vec::new(),
        netfilter: Netfilter::new(Notrack::new(&opts.nft_table)),
        frontends_written: SystemTime::now(),
        backends: BTreeMap::new(),
        force_notrack: true,
        networks,
        peers: HashMap::new(),
        fw_snapshot,
        firewall: HostFirewall::default(),
        nft_table: opts.nft_table.clone(),
        config: Config {
            host_netns_cookie: host_cookie,
            flags: CFG_F_RESERVE_PORTS,
        },
        pending_cookies: Vec::new(),
    };
    agent.evaluate_firewall();
    let t = Instant::now();
    agent.sync_local_addrs().await?;
    agent.ingest(inspected)?;
    agent.resolve_pending();
    agent.apply()?;
    startup.record("first_sync", t.elapsed());
    // The maps now hold what Docker says: from here on the programs translate.
    let t = Instant::now();
    agent.loaded.vouch().map_err(StartError::Kernel)?;
    startup.record("ready", t.elapsed());
    {
        let s = &mut agent.shared.lock().expect("status lock").status;
        s.ready = true;
        s.startup = startup.phases;
        info!(
            took_ms = startup.start.elapsed().as_secs_f64() * 1e3,
            frontends = s.frontends,
            "ready"
        );
    }

    let r = agent
        .serve_events(opts.resync_interval, events_since, nl_rx, fw_rx)
        .await
        .map_err(StartError::Other);
    if opts.pin_dir.is_none() {
        // Nothing outlives the agent: the programs detach when `loaded` drops, and the
        // notrack rules and forwarding exceptions must go with them, or Docker's own NAT
        // path would lose conntrack for local clients.
        agent.netfilter.close_and_remove();
    } else {
        info!(
            "pinned programs, maps and rules stay in place: connections made stay as they are, \
             new ones take Docker's own path until an agent runs again; `dataplane uninstall` \
             removes them"
        );
    }
    r
}

impl Agent {
    /// Follows Docker events (from `since`, unix seconds taken before the first list),
    /// netlink and ruleset changes and the resync timer until a signal.
    async fn serve_events(
        &mut self,
        resync_interval: Duration,
        mut since: i64,
        mut nl_rx: mpsc::Receiver<()>,
        mut fw_rx: mpsc::Receiver<()>,
    ) -> Result<()> {
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut resync = tokio::time::interval(resync_interval);
        resync.tick().await;
        let mut counters = tokio::time::interval(Duration::from_millis(250));
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut events = Box::pin(docker::events(&self.docker, since));
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(ev)) => {
                            since = since.max(ev.time.unwrap_or(since));
                            backoff = Duration::from_millis(100);
                            let mut batch = vec![ev];
                            // Take whatever else already arrived, so a burst costs one apply.
                            while let Some(Some(Ok(more))) = futures_util::FutureExt::now_or_never(events.next()) {
                                batch.push(more);
                            }
                            self.on_events(&batch).await;
                        }
                        Some(Err(e)) => { warn!(error = %e, "Docker events stream failed"); break; }
                        None => { warn!("Docker events stream ended"); break; }
                    },
                    Some(()) = nl_rx.recv() => {
                        if let Err(e) = self.sync_local_addrs().await.and_then(|()| self.apply()) {
                            warn!(error = %format!("{e:#}"), "local address sync failed");
                        }
                    }
                    Some(()) = fw_rx.recv() => self.on_ruleset_change().await,
                    _ = resync.tick() => self.full_resync().await,
                    _ = counters.tick() => self.publish_counters(),
                    _ = tokio::signal::ctrl_c() => { info!("interrupted, detaching"); return Ok(()); }
                    _ = sigterm.recv() => { info!("terminated, detaching"); return Ok(()); }
                }
            }
            // Stream lost (dockerd restarting?): what Docker does meanwhile is unseen, so
            // nothing is translated until a full resync has caught up; back off, resync.
            self.loaded.withdraw();
            self.shared
                .lock()
                .expect("status lock")
                .status
                .translation_off = Some("Docker's events were lost; resyncing".into());
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            self.full_resync().await;
        }
    }

    async fn on_events(&mut self, batch: &[bollard::models::EventMessage]) {
        let mut refresh = BTreeSet::new();
        let mut networks = false;
        for ev in batch {
            match docker::effect(ev) {
                Effect::Networks => networks = true,
                Effect::Refresh(id) => {
                    refresh.insert(id);
                }
                Effect::Remove(id) => {
                    refresh.remove(&id);
                    self.containers.remove(&id);
                    self.binding_errors.remove(&id);
                    self.peers.remove(&id);
                }
                Effect::Ignore => {}
            }
        }
        debug!(
            events = batch.len(),
            refresh = refresh.len(),
            "docker events"
        );
        // A container connected to a network that was just created: list them first.
        let unknown_net = |agent: &Self| {
            batch.iter().any(|ev| {
                ev.actor
                    .as_ref()
                    .and_then(|a| a.id.as_ref())
                    .is_some_and(|id| {
                        ev.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK)
                            && !agent.networks.contains_key(id)
                    })
            })
        };
        if networks || unknown_net(self) {
            self.refresh_networks().await;
        }
        if let Err(e) = self.refresh(refresh).await {
            warn!(error = %format!("{e:#}"), "refresh after events failed; resyncing in full");
            self.full_resync().await;
            return;
        }
        if let Err(e) = self.apply() {
            warn!(error = %format!("{e:#}"), "applying frontends failed");
            return;
        }
        // How long a start event took to become a frontend in the map (in `status`).
        let now_ns = self
            .frontends_written
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        for ev in batch {
            if ev.action.as_deref() == Some("start")
                && let Some(t) = ev.time_nano
            {
                let id = ev
                    .actor
                    .as_ref()
                    .and_then(|a| a.id.as_deref())
                    .unwrap_or("");
                if self.containers.contains_key(id) {
                    let us = u64::try_from((now_ns - t) / 1000).unwrap_or(0);
                    debug!(container = %id.chars().take(12).collect::<String>(), latency_us = us, "start event synced");
                    let s = &mut self.shared.lock().expect("status lock").status;
                    if s.start_sync_us.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
                        s.start_sync_us.remove(0);
                    }
                    s.start_sync_us.push(us);
                }
            }
        }
        // Then the new containers as clients.
        if self.resolve_pending()
            && let Err(e) = self.apply()
        {
            warn!(error = %format!("{e:#}"), "applying container clients failed");
        }
    }

    async fn full_resync(&mut self) {
        let r = async {
            let ids = docker::running_ids(&self.docker).await?;
            let live: BTreeSet<String> = ids.into_iter().collect();
            self.containers.retain(|id, _| live.contains(id));
            self.peers.retain(|id, _| live.contains(id));
            self.networks = docker::networks(&self.docker).await?;
            self.fw_snapshot = tokio::task::spawn_blocking(hostfw::capture).await?;
            self.evaluate_firewall();
            self.binding_errors.retain(|id, _| live.contains(id));
            self.refresh(live).await?;
            self.resolve_pending();
            self.sync_local_addrs().await?;
            self.force_notrack = true;
            self.apply()
        }
        .await;
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), "full resync failed");
            return;
        }
        if !self.loaded.vouching() {
            match self.loaded.vouch() {
                Ok(()) => {
                    info!("resynced with Docker: translating again");
                    self.shared
                        .lock()
                        .expect("status lock")
                        .status
                        .translation_off = None;
                }
                Err(e) => warn!(error = %format!("{e:#}"), "cannot vouch for the maps"),
            }
        }
    }

    /// Inspects each container once (a few at a time) and replaces its frontends.
    async fn refresh(&mut self, ids: BTreeSet<String>) -> Result<()> {
        let results = inspect_all(&self.docker, ids).await;
        self.ingest(results)
    }

    /// Replaces each inspected container's frontends (none when it is gone) and its view as
    /// a client.
    fn ingest(&mut self, results: Inspected) -> Result<()> {
        let mut new_sandboxes = Vec::new();
        for (id, r) in results {
            if let Some(c) = r? {
                match desired::peer_of(&c) {
                    Some(p) => {
                        let same_ns = self.peers.get(&id).is_some_and(|(old, cookie)| {
                            old.sandbox == p.sandbox && old.pid == p.pid && cookie.is_some()
                        });
                        if same_ns {
                            let cookie = self.peers[&id].1;
                            self.peers.insert(id.clone(), (p, cookie));
                        } else {
                            new_sandboxes.push(id.clone());
                            self.peers.insert(id.clone(), (p, None));
                        }
                    }
                    None => {
                        self.peers.remove(&id);
                    }
                }
                let mut errs = Vec::new();
                let routes = c
                    .state
                    .as_ref()
                    .and_then(|s| s.pid)
                    .filter(|p| *p > 0)
                    .and_then(netns::default_routes);
                let fs = desired::frontends_of(&c, routes.as_ref(), &mut errs);
                for e in &errs {
                    warn!(error = %e, "binding skipped");
                }
                if errs.is_empty() {
                    self.binding_errors.remove(&id);
                } else {
                    self.binding_errors
                        .insert(id.clone(), errs.iter().map(ToString::to_string).collect());
                }
                if fs.is_empty() {
                    self.containers.remove(&id);
                } else {
                    self.containers.insert(id, fs);
                }
            } else {
                self.containers.remove(&id);
                self.binding_errors.remove(&id);
                self.peers.remove(&id);
            }
        }
        self.pending_cookies.extend(new_sandboxes);
        Ok(())
    }

    /// Reads the namespace cookies of containers seen since the last call (after the
    /// frontends are written: host clients are served first). Whether there were any.
    fn resolve_pending(&mut self) -> bool {
        let ids = std::mem::take(&mut self.pending_cookies);
        if ids.is_empty() {
            return false;
        }
        self.resolve_cookies(&ids);
        true
    }

    /// Reads the network namespace cookie of each container in `ids`.
    fn resolve_cookies(&mut self, ids: &[String]) {
        let paths: Vec<(String, PathBuf)> = ids
            .iter()
            .filter_map(|id| {
                let (p, _) = self.peers.get(id)?;
                let path = p.sandbox.clone().map(PathBuf::from).or_else(|| {
                    p.pid
                        .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
                })?;
                Some((id.clone(), path))
            })
            .collect();
        let cookies = netns::cookies(paths.iter().map(|(_, p)| p.clone()).collect());
        for ((id, path), r) in paths.into_iter().zip(cookies) {
            match r {
                Ok(c) => {
                    if let Some(e) = self.peers.get_mut(&id) {
                        e.1 = Some(c);
                    }
                }
                // Gone meanwhile, most likely: its clients take Docker's path.
                Err(e) => {
                    debug!(container = %id.chars().take(12).collect::<String>(), path = %path.display(), error = %format!("{e:#}"), "no network namespace cookie");
                }
            }
        }
    }

    async fn refresh_networks(&mut self) {
        match docker::networks(&self.docker).await {
            Ok(n) => {
                self.networks = n;
                self.evaluate_firewall();
            }
            Err(e) => warn!(error = %format!("{e:#}"), "listing Docker networks failed"),
        }
    }

    /// Docker's bridge interfaces, from its network list (never from interface names).
    fn bridges(&self) -> BTreeSet<String> {
        self.networks
            .values()
            .filter_map(|n| n.bridge.clone())
            .collect()
    }

    /// What the last ruleset snapshot means, logged when it changes.
    fn evaluate_firewall(&mut self) {
        let fw = self.fw_snapshot.evaluate(&self.bridges(), &self.nft_table);
        if fw != self.firewall {
            if let Some(w) = &fw.stateful_input {
                info!(where_ = %w, "stateful INPUT policy: host clients' connections stay tracked");
            } else {
                info!("no stateful INPUT policy: host clients' connections are untracked");
            }
            if let Some(w) = &fw.forward_rules {
                info!(where_ = %w, "operator forwarding rules: container clients take Docker's own path");
            } else {
                info!("no operator rules for container traffic: container clients are translated");
            }
            self.firewall = fw;
        }
    }

    async fn on_ruleset_change(&mut self) {
        match tokio::task::spawn_blocking(hostfw::capture).await {
            Ok(snap) => self.fw_snapshot = snap,
            Err(e) => {
                warn!(error = %e, "reading the ruleset failed");
                return;
            }
        }
        let before = self.firewall.clone();
        self.evaluate_firewall();
        if before != self.firewall
            && let Err(e) = self.apply()
        {
            warn!(error = %format!("{e:#}"), "applying after a ruleset change failed");
        }
    }

    async fn sync_local_addrs(&mut self) -> Result<()> {
        let addrs = netlink::dump(&self.nl).await?;
        let want = netlink::local_map(&addrs, &self.bridges());
        self.host_addrs = addrs;
        let applied = reconcile(&mut self.loaded.local_addrs()?, &want)
            .context("updating the local-address map")?;
        if applied.changed() {
            info!(
                added = applied.added,
                removed = applied.removed,
                total = want.len(),
                "local addresses updated"
            );
        }
        self.shared
            .lock()
            .expect("status lock")
            .status
            .local_addresses = want.len();
        Ok(())
    }

    /// Writes the merged desired frontends to the map and publishes the status.
    fn apply(&mut self) -> Result<()> {
        let mut conflicts = Vec::new();
        let merged = desired::merge(self.containers.values().flatten(), &mut conflicts);
        for c in &conflicts {
            warn!(frontend = %c.frontend, kept = %c.kept, dropped = %c.dropped, "frontend conflict");
        }
        let mut want: BTreeMap<FrontendKey, _> =
            merged.iter().map(|(k, f)| (*k, f.backend)).collect();
        let (peer_map, peer_addrs) = self.desired_peers();
        self.write_config()?;
        reconcile(&mut self.loaded.peer_nets()?, &peer_map)
            .context("updating the peer-networks map")?;
        let (applied, map_errors) = self.write_frontends(&mut want)?;
        for e in &map_errors {
            warn!(error = %e, "a map could not hold everything");
        }
        self.frontends_written = SystemTime::now();
        let spec = notrack::Spec::new(
            want.iter(),
            &self.host_addrs,
            peer_addrs,
            self.firewall.stateful_input.is_some(),
        );
        self.netfilter.schedule(spec.clone(), self.force_notrack);
        self.force_notrack = false;
        self.end_sockets_of_gone_backends(&merged, &want);
        if applied.changed() {
            info!(
                added = applied.added,
                updated = applied.updated,
                removed = applied.removed,
                total = want.len(),
                "frontends updated"
            );
        }
        let mut state = self.shared.lock().expect("status lock");
        state.frontends = merged
            .values()
            .filter(|f| want.contains_key(&f.key))
            .map(|f| FrontendRow {
                view: dataplane_api::Frontend {
                    frontend: desired::describe_key(&f.key),
                    container: f.container_name.clone(),
                    container_id: f.container_id.chars().take(12).collect(),
                    backend: desired::describe_backend(&f.backend),
                    connections: 0,
                },
                id: f.backend.id,
            })
            .collect();
        let s = &mut state.status;
        s.last_sync_unix_ms = now_ms();
        s.syncs += 1;
        s.containers = self.containers.len();
        s.frontends = want.len();
        s.errors = self.binding_errors.values().flatten().cloned().collect();
        s.errors.extend(map_errors);
        s.container_clients = peer_map
            .keys()
            .map(|k| k.netns_cookie)
            .collect::<BTreeSet<_>>()
            .len();
        s.container_clients_off = self
            .firewall
            .forward_rules
            .as_ref()
            .map(|w| format!("operator forwarding rules ({w})"));
        s.host_clients_tracked = self
            .firewall
            .stateful_input
            .as_ref()
            .map(|w| format!("stateful INPUT policy ({w})"));
        s.errors.extend(
            conflicts
                .iter()
                .map(|c| format!("{} claimed by {} and {}", c.frontend, c.kept, c.dropped)),
        );
        drop(state);
        self.publish_counters();
        Ok(())
    }

    /// Destroys, off the loop, the translated sockets of backends that left the maps with
    /// their address: a frontend that moved to another address of the same container (it
    /// joined a network Docker now maps the port through) leaves its connections alone, as
    /// they still reach it.
    fn end_sockets_of_gone_backends(
        &mut self,
        merged: &BTreeMap<FrontendKey, Frontend>,
        want: &BTreeMap<FrontendKey, dataplane_common::Backend>,
    ) {
        let mut now: BTreeMap<sockets::Gone, String> = BTreeMap::new();
        for (k, f) in merged.iter().filter(|(k, _)| want.contains_key(k)) {
            for a in [f.backend.addr4, f.backend.addr6] {
                if !dataplane_common::is_zero(&a) {
                    now.insert(
                        (desired::addr_to_ip(&a), k.proto, f.backend.port()),
                        f.container_id.clone(),
                    );
                }
            }
        }
        let still_has = |id: &str, ip: &std::net::IpAddr| {
            self.peers
                .get(id)
                .is_some_and(|(p, _)| p.endpoints.iter().any(|(_, addrs)| addrs.contains(ip)))
        };
        let gone: Vec<sockets::Gone> = self
            .backends
            .iter()
            .filter(|(b, id)| !now.contains_key(*b) && !still_has(id, &b.0))
            .map(|(b, _)| *b)
            .collect();
        self.backends = now;
        if gone.is_empty() {
            return;
        }
        let map_fd = match self.loaded.translations_fd() {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot end the sockets of removed backends");
                return;
            }
        };
        // Containers that may hold translated sockets: those the programs know as clients.
        let namespaces: Vec<PathBuf> = self
            .peers
            .values()
            .filter(|(_, cookie)| cookie.is_some())
            .filter_map(|(p, _)| {
                p.sandbox.clone().map(PathBuf::from).or_else(|| {
                    p.pid
                        .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let (n, errors) = sockets::destroy_translated(&gone, map_fd, namespaces);
            for e in &errors {
                warn!(error = %e, "ending the sockets of removed backends");
            }
            info!(
                backends = gone.len(),
                sockets = n,
                "destroyed sockets of removed backends"
            );
        });
    }

    /// Writes the published ports and the frontends. A map that cannot hold everything is
    /// not an error of the sync: what is in it is served, `want` is narrowed to that, and
    /// the rest is left to Docker's own path and reported.
    fn write_frontends(
        &mut self,
        want: &mut BTreeMap<FrontendKey, dataplane_common::Backend>,
    ) -> Result<(crate::reconcile::Applied, Vec<String>)> {
        // Ports first: a port is reserved before its frontend answers, and stays reserved
        // until its frontend is gone.
        let ports = desired::ports_of(want.keys());
        let mut all_ports = self.loaded.ports()?.entries()?;
        all_ports.extend(ports.iter().map(|(k, v)| (*k, *v)));
        let mut map_errors = Vec::new();
        if let Err(e) = reconcile(&mut self.loaded.ports()?, &all_ports) {
            map_errors.push(format!("published-ports map: {e}"));
        }
        let applied = match reconcile(&mut self.loaded.frontends()?, want) {
            Ok(a) => a,
            Err(e) => {
                // A full map: what is in it is served, the rest takes Docker's own path, and
                // everything below (notrack rules, status) follows what is in the map.
                let in_map = self.loaded.frontends()?.entries()?;
                let total = want.len();
                want.retain(|k, v| in_map.get(k) == Some(v));
                map_errors.push(format!(
                    "frontends map: {e}: {} of {total} published bindings are left to Docker's \
                     own path (`--max-frontends`)",
                    total - want.len()
                ));
                crate::reconcile::Applied::default()
            }
        };
        if let Err(e) = reconcile(&mut self.loaded.ports()?, &ports) {
            map_errors.push(format!("published-ports map: {e}"));
        }
        Ok((applied, map_errors))
    }

    /// Container clients: which namespaces may be translated to backends on which network
    /// (only networks where Docker itself connects containers straight to each other), and
    /// their addresses there.
    fn desired_peers(&self) -> (BTreeMap<PeerNetKey, PeerNet>, BTreeSet<std::net::IpAddr>) {
        let mut peer_map = BTreeMap::new();
        let mut peer_addrs = BTreeSet::new();
        if self.firewall.forward_rules.is_some() {
            return (peer_map, peer_addrs);
        }
        for (p, cookie) in self.peers.values() {
            let Some(cookie) = cookie else { continue };
            for (net, addrs) in &p.endpoints {
                if !self.networks.get(net).is_some_and(|n| n.peers_direct) {
                    continue;
                }
                let key = PeerNetKey {
                    netns_cookie: *cookie,
                    net: net_id(net),
                    pad: 0,
                };
                peer_map.insert(key, PeerNet { flags: 0 });
                peer_addrs.extend(addrs.iter().copied());
            }
        }
        (peer_map, peer_addrs)
    }

    /// Writes the config map's flags when they change.
    fn write_config(&mut self) -> Result<()> {
        let mut flags = CFG_F_RESERVE_PORTS;
        if self.firewall.forward_rules.is_none() {
            flags |= CFG_F_PEERS;
        }
        if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1") {
            flags |= CFG_F_BINDV6ONLY;
        }
        let config = Config {
            flags,
            ..self.config
        };
        if config != self.config {
            self.loaded.set_config(config)?;
            self.config = config;
        }
        Ok(())
    }

    /// Copies the kernel programs' counters into the status.
    fn publish_counters(&mut self) {
        let ids: BTreeSet<u32> = self
            .shared
            .lock()
            .expect("status lock")
            .frontends
            .iter()
            .map(|f| f.id)
            .collect();
        let per_frontend = match self.loaded.frontend_counters(&ids) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading frontend counters failed");
                BTreeMap::new()
            }
        };
        let counters = self.loaded.stats().unwrap_or_default();
        let mut state = self.shared.lock().expect("status lock");
        for f in &mut state.frontends {
            f.view.connections = per_frontend.get(&f.id).copied().unwrap_or(0);
        }
        let s = &mut state.status;
        s.counters = STAT_NAMES
            .iter()
            .zip(counters)
            .map(|(n, v)| ((*n).to_string(), v))
            .collect();
        s.counters_unix_ms = now_ms();
    }
}
