//! The agent's event loop. Docker events, netlink and ruleset changes update the
//! [`State`]; each change is planned ([`plan::plan`], pure) and applied ([`apply::apply`]:
//! maps, then the notrack table and socket destruction); a failed apply is retried with
//! backoff. The status `bridge-ctl` reads is published from here.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use bollard::Docker;
use dataplane_common::{BACKEND_F_PAUSED, STAT_NAMES};
use futures_util::StreamExt;
use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, info, warn};

pub use crate::start::{Options, StartError};
use crate::{
    addr::Service,
    api::{self, Shared},
    apply::{self, Backoff},
    bpf::Loaded,
    docker::{self, Effect},
    egress::{self, Egress},
    features::{Feature, Features},
    hostfw, metrics,
    netfilter::NetfilterTask,
    netfilter::changes as nfwatch,
    netfilter::notrack::Notrack,
    netlink, netns, notify, plan,
    reconcile::reconcile,
    sockets::Destroyer,
    start::{Inspected, Started, Startup, inspect_all, load_and_list, preflight},
    state::State,
};

/// A container Docker connected to a network (`network connect`): the network, the
/// container, its addresses there (from the network's inspect).
type Connected = (String, String, Vec<std::net::IpAddr>);

/// A host name's lookup: its addresses and when to look again, or why it failed.
type Lookup = (
    String,
    Result<(BTreeSet<std::net::IpAddr>, Instant), String>,
);

struct Agent {
    loaded: Loaded,
    docker: Docker,
    nl: rtnetlink::Handle,
    state: State,
    shared: Shared,
    netfilter: NetfilterTask,
    sockets: Destroyer,
    /// Backends the maps served after the last apply, with their containers.
    owners: BTreeMap<Service, String>,
    host_netns_cookie: u64,
    /// When the frontends map was last written (sync latency is measured to here).
    frontends_written: SystemTime,
    /// Re-apply the nftables table even if unchanged (after a full resync: repairs drift).
    force_notrack: bool,
    /// The host's own ruleset as last read.
    fw_snapshot: hostfw::Snapshot,
    /// Ruleset changes noticed and not handled yet.
    fw_changes: Arc<Mutex<nfwatch::Changes>>,
    nft_table: String,
    /// Containers whose network namespace cookie is still to be read.
    pending_cookies: Vec<String>,
    /// When to retry a failed apply, and how long the next wait is.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Egress policies and their table.
    egress: Egress,
    resolver: Option<egress::dns::Resolver>,
    dns_tx: mpsc::Sender<Lookup>,
    /// When to read the egress table back (it changed).
    egress_check_at: Option<Instant>,
    /// Backends of paused containers that asked for `on-pause=reset` (their sockets are
    /// destroyed when they enter this set).
    paused: BTreeSet<Service>,
    /// Docker's `pause` events not handled yet: container id to the event's time (ns).
    pause_events: BTreeMap<String, i64>,
    /// The config in force, and where it is read again from on `SIGHUP`.
    config: egress::policy::Config,
    config_path: Option<std::path::PathBuf>,
    /// What a metrics scrape reads, and the server when one listens.
    scrape: metrics::Scrape,
    metrics_server: Option<MetricsServer>,
    /// `SIGHUP`, taken over from the start (its default action would end the process).
    sighup: Option<tokio::signal::unix::Signal>,
    /// `SIGTERM` and `SIGINT`, likewise: one during the start stops the agent as any other
    /// (their default action would end the process before it leaves anything for the next
    /// start; an inherited ignored `SIGINT` would not stop it at all).
    sigterm: Option<StopSignals>,
    /// Containers created and not started yet, as inspected then (for their frontends at
    /// `network connect`, before Docker's start completes), arriving through `early_tx`.
    early: BTreeMap<String, bollard::models::ContainerInspectResponse>,
    early_tx: mpsc::Sender<(String, bollard::models::ContainerInspectResponse)>,
    early_rx: Option<mpsc::Receiver<(String, bollard::models::ContainerInspectResponse)>>,
    /// When containers' early frontends were written, until their start event.
    early_written: BTreeMap<String, SystemTime>,
    /// The last inspect of each container (left for the next start, see [`crate::cache`]).
    inspected: BTreeMap<String, bollard::models::ContainerInspectResponse>,
    cache_path: Option<std::path::PathBuf>,
    /// The egress table is written after the maps, once (the first sync: a restart
    /// translates again without waiting for it; the table in the kernel stays meanwhile).
    defer_egress: bool,
    /// Docker's data root (from `info`), where it keeps each container's configuration.
    docker_root: Option<std::path::PathBuf>,
    /// A full resync is due as soon as events are served (the start took inspects from the
    /// last agent's cache).
    resync_now: bool,
    packet: PacketSide,
    /// The own-firewall mode's table, when that mode is on.
    own_fw: Option<OwnSide>,
    docker_socket: String,
}

/// What the loop serves besides Docker's events: netlink and ruleset changes, bridge-ctl's
/// requests, host name lookups.
type Inputs = (
    mpsc::Receiver<()>,
    mpsc::Receiver<()>,
    mpsc::Receiver<api::Forwarded>,
    mpsc::Receiver<Lookup>,
);

/// The own-firewall mode in the agent's loop.
struct OwnSide {
    fw: crate::ownfw::Firewall,
    /// Docker's iptables leftovers removed at the start.
    removed: usize,
}

/// The packet layer in the agent's loop.
struct PacketSide {
    /// The layer, when it is on.
    layer: Option<crate::packet::Layer>,
    /// Its flags (taken again with the config at a reload).
    flags: crate::packet::Flags,
    /// Its endpoints and links are to be synced (after an apply).
    dirty: bool,
    /// Flows in the flow map, as last counted.
    flows: usize,
}

impl PacketSide {
    fn new(opts: &Options, loaded: &Loaded) -> Result<Self, StartError> {
        let layer = opts
            .packet()
            .map_err(|e| StartError::Environment(anyhow::anyhow!(e)))?
            .filter(|_| loaded.packet_layer())
            .map(|s| crate::packet::Layer::new(s, opts.pin_dir.clone()));
        Ok(Self {
            layer,
            flags: opts.packet_flags.clone(),
            dirty: true,
            flows: 0,
        })
    }
}

/// Leaves the inspects and the firewall's evaluation for the next start ([`crate::cache`]).
fn leave_cache(
    path: Option<&std::path::Path>,
    inspected: &BTreeMap<String, bollard::models::ContainerInspectResponse>,
    firewall: &hostfw::HostFirewall,
) {
    let Some(path) = path else { return };
    match crate::cache::save(path, inspected, firewall) {
        Ok(n) => debug!(containers = n, path = %path.display(), "inspects left for the next start"),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "could not leave the inspects for the next start");
        }
    }
}

/// The file, beside the control socket, where a stopping agent leaves its inspects.
pub const CACHE_FILE: &str = "containers.json";

/// The metrics endpoint: its address, and the task serving it (stopped when dropped).
struct MetricsServer {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The metrics endpoint at start, and what the status says of the agent from the start.
async fn start_metrics(
    opts: &Options,
    loaded: &Loaded,
    docker_version: String,
    shared: &Shared,
) -> Result<(metrics::Scrape, Option<MetricsServer>), StartError> {
    let scrape = metrics::Scrape {
        shared: shared.clone(),
        kernel: Arc::new(metrics::KernelMaps::of(loaded).map_err(StartError::Kernel)?),
        egress_table: crate::netfilter::changes::egress_table(&opts.nft_table),
    };
    let server = metrics_server(&opts.config, &scrape)
        .await
        .map_err(StartError::Environment)?;
    let mut st = shared.lock().expect("status lock");
    st.kernel = Some(Arc::clone(&scrape.kernel));
    let s = &mut st.status;
    s.version = env!("CARGO_PKG_VERSION").to_string();
    s.docker_version = docker_version;
    s.attach_points.clone_from(&loaded.attached);
    s.kernel.clone_from(&loaded.features.kernel);
    s.features = loaded.features.states();
    s.metrics = server
        .as_ref()
        .map(|m| format!("http://{}/metrics", m.addr));
    s.config_file = opts
        .config_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    s.config_loaded_unix_ms = now_ms();
    Ok((scrape, server))
}

/// Starts serving metrics on the config's address, if it names one.
async fn metrics_server(
    config: &egress::policy::Config,
    scrape: &metrics::Scrape,
) -> Result<Option<MetricsServer>> {
    let Some(addr) = config.metrics.addr().map_err(|e| anyhow::anyhow!(e))? else {
        return Ok(None);
    };
    let task = metrics::serve(addr, scrape.clone()).await?;
    info!(url = %format!("http://{addr}/metrics"), "serving metrics");
    Ok(Some(MetricsServer { addr, task }))
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What ends the translated sockets of removed backends (where the kernel can).
fn destroyer(loaded: &crate::bpf::Loaded) -> Result<Destroyer, StartError> {
    Ok(Destroyer::new(
        loaded.translations_fd().map_err(StartError::Kernel)?,
        loaded.features.has(Feature::SockDestroy),
    ))
}

/// How often the packet layer's idle flows are removed.
const FLOWS_GC_INTERVAL: Duration = Duration::from_secs(10);

pub async fn run(opts: Options) -> Result<(), StartError> {
    let mut startup = Startup::new();
    let (mut sigterm, sighup) = signals()?;
    // Before Docker is first asked anything: the events stream starts from here.
    let events_since = unix_secs();
    let checked = preflight(&opts)?;
    let host_cookie = checked.1;
    let Some(Started {
        loaded,
        docker,
        inspected,
        networks,
        docker_version,
        fw,
        listed,
        cached,
        docker_settings,
    }) = start_or_stop(&opts, checked, &mut startup, &mut sigterm).await?
    else {
        return Ok(());
    };
    let shared: Shared = Shared::default();
    let (api_tx, api_rx) = mpsc::channel(8);
    let _api = api::serve(&opts.api_socket, shared.clone(), api_tx)?;
    let resolver = resolver(&opts.config)?;
    let (dns_tx, dns_rx) = mpsc::channel(64);
    let (nl, nl_rx) = netlink::connect_and_watch()?;
    let (fw_tx, fw_rx) = mpsc::channel(1);
    let fw_changes = Arc::default();
    nfwatch::watch(fw_tx.clone(), Arc::clone(&fw_changes))?;
    let sockets = destroyer(&loaded)?;
    let (scrape, metrics_server) = start_metrics(&opts, &loaded, docker_version, &shared).await?;
    let (early_tx, early_rx) = mpsc::channel(64);
    let packet = PacketSide::new(&opts, &loaded)?;
    let own_fw = own_side(&opts, &shared, docker_settings.as_ref()).await;
    let egress = new_egress(&opts, docker_settings.as_ref().ok());

    let mut agent = Agent {
        loaded,
        docker,
        nl,
        state: State {
            networks,
            on_pause_default: opts.config.pause.default,
            ..State::default()
        },
        shared,
        netfilter: NetfilterTask::start(Notrack::new(&opts.nft_table)),
        sockets,
        owners: BTreeMap::new(),
        host_netns_cookie: host_cookie,
        frontends_written: SystemTime::now(),
        force_notrack: true,
        fw_snapshot: hostfw::Snapshot::default(),
        fw_changes,
        nft_table: opts.nft_table.clone(),
        pending_cookies: Vec::new(),
        retry_at: None,
        backoff: Backoff::new(),
        egress,
        resolver,
        dns_tx,
        egress_check_at: None,
        paused: BTreeSet::new(),
        pause_events: BTreeMap::new(),
        config: opts.config.clone(),
        config_path: opts.config_path.clone(),
        scrape,
        metrics_server,
        sighup: Some(sighup),
        sigterm: Some(sigterm),
        early: BTreeMap::new(),
        early_tx,
        early_rx: Some(early_rx),
        early_written: BTreeMap::new(),
        inspected: BTreeMap::new(),
        cache_path: opts.cache_path.clone(),
        defer_egress: true,
        resync_now: false,
        docker_root: None,
        packet,
        own_fw,
        docker_socket: opts.docker_socket.clone(),
    };
    let fw_later = agent
        .first_sync(fw, fw_tx, inspected, listed, startup)
        .await?;
    agent.after_ready(fw_later, cached).await;
    agent.resync_now = cached > 0;

    let inputs = (nl_rx, fw_rx, api_rx, dns_rx);
    let r = agent
        .serve_events(opts.resync_interval, events_since, inputs)
        .await
        .map_err(StartError::Other);
    agent.stop(opts.pin_dir.is_some()).await;
    r
}

/// The egress side, with what Docker's daemon says of resolvers and where it keeps its
/// containers' namespaces.
fn new_egress(opts: &Options, docker: Option<&crate::ownfw::docker_conf::Settings>) -> Egress {
    let exec_root = docker.map_or_else(
        || std::path::PathBuf::from(crate::ownfw::docker_conf::DEFAULT_EXEC_ROOT),
        |s| s.exec_root.clone(),
    );
    Egress::new(
        &crate::netfilter::changes::egress_table(&opts.nft_table),
        opts.config.clone(),
        opts.state_dir.clone(),
        docker.map(|s| s.dns.clone()).unwrap_or_default(),
        &exec_root,
    )
}

/// The own-firewall mode at the start (Docker's settings already checked): Docker's iptables
/// leftovers go, and `status` says which mode is active; in the default mode, a warning
/// when Docker's rules are off.
async fn own_side(
    opts: &Options,
    shared: &Shared,
    settings: Result<&crate::ownfw::docker_conf::Settings, &String>,
) -> Option<OwnSide> {
    if !opts.own_firewall {
        let mut st = shared.lock().expect("status lock");
        st.status.mode = "docker".into();
        if let Ok(s) = settings
            && !s.iptables
        {
            let w = rules_off_warning(s);
            warn!("{w}");
            st.status.docker_settings_warning = Some(w);
        }
        return None;
    }
    shared.lock().expect("status lock").status.mode = "own-firewall".into();
    let removed = tokio::task::spawn_blocking(crate::ownfw::leftovers::remove)
        .await
        .unwrap_or_default();
    for r in &removed {
        info!(done = %r, "removed Docker's iptables leftover (its rules are off)");
    }
    if crate::ownfw::leftovers::forward_policy_drops() {
        warn!(
            "the iptables FORWARD policy is DROP: containers' traffic beyond their bridge is \
             dropped before the agent's table sees it (accept it for Docker's bridges, or set \
             the policy to ACCEPT)"
        );
    }
    Some(OwnSide {
        fw: crate::ownfw::Firewall::new(&opts.nft_table),
        removed: removed.len(),
    })
}

/// What the default mode says when Docker's rules are off.
fn rules_off_warning(s: &crate::ownfw::docker_conf::Settings) -> String {
    format!(
        "Docker's iptables rules are off ({}): nothing publishes ports to external clients, \
         masquerades or isolates networks; run the agent with --own-firewall",
        s.source
    )
}

/// [`load_and_list`], unless asked to stop meanwhile (waiting for Docker or the kernel):
/// then `None`, and nothing is serving yet.
async fn start_or_stop(
    opts: &Options,
    (cgroup, host_cookie, features): (std::path::PathBuf, u64, Features),
    startup: &mut Startup,
    sigterm: &mut StopSignals,
) -> Result<Option<Started>, StartError> {
    tokio::select! {
        r = load_and_list(opts, cgroup, host_cookie, features, startup) => r.map(Some),
        _ = sigterm.recv() => {
            info!("terminated during the start");
            Ok(None)
        }
    }
}

/// `SIGTERM` and `SIGINT` (Ctrl-C): either stops the agent. Handled from the start on, so
/// no stop is lost between two turns of the loop.
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop; which signal it was.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "terminated",
            _ = self.int.recv() => "interrupted",
        }
    }
}

/// The stop signals and `SIGHUP`, taken from the start on: a reload asked for during the
/// start is served once ready, and a stop asked for while waiting for Docker or the kernel
/// ends the start, one asked for later is served like any other (their default actions
/// would end the process before it leaves anything for the next start).
fn signals() -> Result<(StopSignals, tokio::signal::unix::Signal), StartError> {
    let hup = tokio::signal::unix::signal(SignalKind::hangup())
        .map_err(|e| StartError::Environment(e.into()))?;
    let stop = StopSignals::new().map_err(|e| StartError::Environment(e.into()))?;
    Ok((stop, hup))
}

/// The resolver allow-list names are looked up with: the config's, or the host's.
fn resolver(config: &egress::policy::Config) -> Result<Option<egress::dns::Resolver>, StartError> {
    let server = config
        .egress
        .resolver
        .as_deref()
        .map(egress::policy::resolver_addr)
        .transpose()
        .map_err(|e| StartError::Other(anyhow::anyhow!("[egress] resolver: {e}")))?;
    Ok(match egress::dns::Resolver::new(server) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "no resolver: allow-list host names stay unresolved");
            None
        }
    })
}

impl Agent {
    /// Says so: in the status, the log, and to systemd.
    /// The first sync: the firewall as the start found it, local addresses, the containers,
    /// the maps; then the agent vouches. Returns where to ask for the ruleset to be read
    /// when the start took the last agent's evaluation of it.
    async fn first_sync(
        &mut self,
        fw: crate::start::Firewall,
        fw_tx: mpsc::Sender<()>,
        inspected: crate::start::Inspected,
        listed: Vec<docker::Named>,
        mut startup: Startup,
    ) -> Result<Option<mpsc::Sender<()>>, StartError> {
        let fw_later = match fw {
            crate::start::Firewall::Read(snapshot) => {
                self.fw_snapshot = snapshot;
                self.evaluate_firewall();
                None
            }
            crate::start::Firewall::Known(known) => {
                self.state.firewall = known;
                Some(fw_tx)
            }
        };
        let t = Instant::now();
        self.sync_local_addrs().await?;
        startup.record("sync_local_addrs", t.elapsed());
        let t = Instant::now();
        self.ingest(inspected)?;
        startup.record("ingest", t.elapsed());
        let t = Instant::now();
        self.learn(listed);
        startup.record("learn", t.elapsed());
        let t = Instant::now();
        self.resolve_pending();
        startup.record("netns_cookies", t.elapsed());
        let t = Instant::now();
        self.apply()?;
        startup.record("first_apply", t.elapsed());
        // The maps now hold what Docker says: from here on the programs translate.
        let t = Instant::now();
        self.loaded.vouch().map_err(StartError::Kernel)?;
        startup.record("ready", t.elapsed());
        self.ready(startup);
        Ok(fw_later)
    }

    /// What the start left for after ready: the ruleset read (if the start took the last
    /// agent's evaluation of it), Docker's firewall backend (`info` costs Docker more than
    /// the rest), the egress table.
    async fn after_ready(&mut self, fw_later: Option<mpsc::Sender<()>>, cached: usize) {
        if cached > 0 {
            info!(
                containers = cached,
                "took the last agent's inspects of containers unchanged since; a full resync follows"
            );
        }
        if let Some(tx) = fw_later {
            let _ = tx.try_send(());
        }
        if let Ok(info) = self.docker.info().await {
            self.docker_root = info.docker_root_dir.as_ref().map(std::path::PathBuf::from);
            self.shared
                .lock()
                .expect("status lock")
                .status
                .docker_firewall_backend = crate::engine::firewall_backend(&info);
        }
        if let Err(e) = self.apply_egress() {
            warn!(error = %format!("{e:#}"), "writing the egress table failed; retrying");
            self.retry_at = Some(Instant::now() + self.backoff.failed());
        }
        self.sync_packets().await;
    }

    fn ready(&self, startup: Startup) {
        let s = &mut self.shared.lock().expect("status lock").status;
        s.ready = true;
        s.startup = startup.phases;
        info!(
            took_ms = startup.start.elapsed().as_secs_f64() * 1e3,
            frontends = s.frontends,
            "ready"
        );
        notify::notify("READY=1\nSTATUS=translating");
    }

    /// What stays when the agent stops: with pins, everything (the next agent adopts it);
    /// without, nothing.
    async fn stop(mut self, pinned: bool) {
        notify::notify("STOPPING=1");
        self.metrics_server = None;
        if pinned {
            // The table writes asked for land first: the ruleset generation left for the
            // next start is the one they leave.
            self.netfilter.close().await;
            leave_cache(
                self.cache_path.as_deref(),
                &self.inspected,
                &self.state.firewall,
            );
            // Containers started while no agent runs are not held back (they are policed
            // when the next agent starts; only a crash leaves the gate closed).
            if let Err(e) = self.egress.open_gate() {
                warn!(error = %format!("{e:#}"), "opening the egress gate failed");
            }
            info!(
                "pinned programs, maps and rules stay in place: connections made stay as they are, \
                 new ones take Docker's own path until an agent runs again, egress policies stay \
                 enforced; `dataplane uninstall` removes them"
            );
        } else {
            leave_cache(
                self.cache_path.as_deref(),
                &self.inspected,
                &self.state.firewall,
            );
            // Nothing outlives the agent: the programs detach when `loaded` drops, and the
            // notrack rules must go with them, or Docker's own NAT path would lose conntrack
            // for local clients.
            self.netfilter.close_and_remove().await;
            if let Err(e) = self.egress.remove() {
                warn!(error = %format!("{e:#}"), "removing the egress table failed");
            }
            if self.own_fw.is_some()
                && let Err(e) = crate::ownfw::remove(&self.nft_table)
            {
                warn!(error = %format!("{e:#}"), "removing the own-firewall table failed");
            }
        }
    }

    /// `SIGHUP`: reads the config file again and takes it whole, or not at all. A file that
    /// does not parse or validate (or names a metrics address that cannot be bound) is
    /// rejected with the line and the reason, and the running config stays.
    async fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            info!("SIGHUP: no config file to reload");
            return;
        };
        notify::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            notify::monotonic_usec()
        ));
        let r = self.try_reload(&path).await;
        let ok = r.is_ok();
        metrics::get().config_reload(ok);
        {
            let mut st = self.shared.lock().expect("status lock");
            st.config_rejected = !ok;
            let s = &mut st.status;
            match &r {
                Ok(()) => {
                    s.config_error = None;
                    s.config_loaded_unix_ms = now_ms();
                    s.metrics = self
                        .metrics_server
                        .as_ref()
                        .map(|m| format!("http://{}/metrics", m.addr));
                }
                Err(e) => s.config_error = Some(e.clone()),
            }
        }
        match r {
            Ok(()) => info!(config = %path.display(), "config reloaded"),
            Err(e) => warn!(error = %e, "config reload rejected: the running config stays"),
        }
        notify::notify("READY=1\nSTATUS=translating");
    }

    async fn try_reload(&mut self, path: &std::path::Path) -> Result<(), String> {
        let new = egress::policy::Config::load(path)?;
        if new == self.config {
            return Ok(());
        }
        let resolver = if new.egress.resolver == self.config.egress.resolver {
            self.resolver.clone()
        } else {
            resolver(&new).map_err(|e| e.to_string())?
        };
        // A new metrics address is bound before anything changes: if it cannot be, nothing
        // does.
        let new_addr = new.metrics.addr()?;
        let server_changes = new_addr != self.metrics_server.as_ref().map(|m| m.addr);
        if server_changes {
            // The old listener goes first: the same port may be named on another address.
            self.metrics_server = None;
            match metrics_server(&new, &self.scrape).await {
                Ok(m) => self.metrics_server = m,
                Err(e) => {
                    // Back to the running config's endpoint.
                    self.metrics_server = metrics_server(&self.config, &self.scrape)
                        .await
                        .ok()
                        .flatten();
                    return Err(format!("{e:#}"));
                }
            }
        }
        self.reload_packet(&new)?;
        self.resolver = resolver;
        self.egress.config = new.clone();
        self.state.on_pause_default = new.pause.default;
        self.config = new;
        // Labels are read again with the new defaults, and every table written.
        self.full_resync().await;
        Ok(())
    }

    /// The packet layer's part of a reload: its allow-list and uplinks change now; turning
    /// it on or off, or another flow map size, at the next start (said so).
    fn reload_packet(&mut self, new: &egress::policy::Config) -> Result<(), String> {
        let settings = crate::packet::settings(&new.packet_layer, &self.packet.flags)?;
        match (&mut self.packet.layer, settings) {
            (Some(layer), Some(s)) => {
                if s.flows != layer.settings.flows {
                    warn!(
                        flows = s.flows,
                        "a new flow map size takes effect at the agent's next start"
                    );
                }
                layer.settings.allow = s.allow;
                layer.settings.interfaces = s.interfaces;
                self.packet.dirty = true;
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                warn!("turning the packet layer on or off takes effect at the agent's next start");
            }
        }
        Ok(())
    }

    /// Follows Docker events (from `since`, unix seconds taken before the first list),
    /// netlink and ruleset changes, the resync timer and retries until a signal.
    async fn serve_events(
        &mut self,
        resync_interval: Duration,
        mut since: i64,
        inputs: Inputs,
    ) -> Result<()> {
        let (mut nl_rx, mut fw_rx, mut api_rx, mut dns_rx) = inputs;
        let mut sigterm = match self.sigterm.take() {
            Some(s) => s,
            None => StopSignals::new()?,
        };
        let mut sighup = match self.sighup.take() {
            Some(s) => s,
            None => tokio::signal::unix::signal(SignalKind::hangup())?,
        };
        let mut early_rx = self.early_rx.take().unwrap_or_else(|| mpsc::channel(1).1);
        let mut resync = tokio::time::interval(resync_interval);
        resync.tick().await;
        if self.resync_now {
            resync.reset_immediately();
        }
        let mut backoff = Duration::from_millis(100);
        let mut flows_gc = tokio::time::interval(FLOWS_GC_INTERVAL);
        loop {
            let mut events = Box::pin(docker::events(&self.docker, since));
            loop {
                if self.packet.dirty {
                    self.sync_packets().await;
                }
                let retry_at = self.retry_at.unwrap_or_else(Instant::now);
                let lookup_at = self.egress.next_lookup();
                let check_at = self.egress_check_at;
                let ports_at = self.egress.ports_retry_at();
                tokio::select! {
                    Some((id, c)) = early_rx.recv() => {
                        self.early.insert(id, c);
                    }
                    Some((req, reply)) = api_rx.recv() => {
                        let answer = self.on_request(req).await;
                        let _ = reply.send(answer);
                    }
                    Some((name, r)) = dns_rx.recv() => {
                        if self.egress.resolved(&name, r) {
                            self.apply_or_retry("allow-list name resolved");
                        }
                    }
                    () = tokio::time::sleep_until(lookup_at.unwrap_or_else(Instant::now).into()), if lookup_at.is_some() => {
                        self.lookup_due();
                    }
                    () = tokio::time::sleep_until(ports_at.unwrap_or_else(Instant::now).into()), if ports_at.is_some() => {
                        self.apply_or_retry("egress: a new container's veths");
                    }
                    () = tokio::time::sleep_until(check_at.unwrap_or_else(Instant::now).into()), if check_at.is_some() => {
                        self.egress_check_at = None;
                        if self.egress.drifted() {
                            warn!(table = %self.egress.table(), "the egress table had been changed by hand: restoring it");
                            self.apply_or_retry("egress table drift");
                        }
                    }
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
                        if let Err(e) = self.sync_local_addrs().await {
                            warn!(error = %format!("{e:#}"), "local address sync failed");
                        }
                        self.apply_or_retry("local addresses");
                    }
                    Some(()) = fw_rx.recv() => self.on_ruleset_change().await,
                    () = tokio::time::sleep_until(retry_at.into()), if self.retry_at.is_some() => {
                        self.apply_or_retry("retry");
                    }
                    _ = resync.tick() => self.full_resync().await,
                    _ = flows_gc.tick(), if self.packet.layer.is_some() => self.age_flows(),
                    why = sigterm.recv() => { info!("{why}"); return Ok(()); }
                    _ = sighup.recv() => self.reload().await,
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
                _ = sigterm.recv() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            self.full_resync().await;
        }
    }

    async fn on_events(&mut self, batch: &[bollard::models::EventMessage]) {
        // Egress first: a container being started is policed before its process runs.
        let connected = self.egress_events(batch).await;
        // Then its frontends, from what it was created with, before Docker's start ends.
        self.early_events(batch, &connected);
        let mut refresh = BTreeSet::new();
        let mut networks = false;
        for ev in batch {
            let typ = ev
                .typ
                .map_or_else(|| "unknown".to_string(), |t| t.to_string());
            metrics::get().docker_event(&typ, ev.action.as_deref().unwrap_or(""));
            if ev.action.as_deref() == Some("pause")
                && let Some(id) = ev.actor.as_ref().and_then(|a| a.id.clone())
            {
                self.pause_events.insert(id, ev.time_nano.unwrap_or(0));
            }
            match docker::effect(ev) {
                Effect::Networks => networks = true,
                Effect::Refresh(id) => {
                    refresh.insert(id);
                }
                Effect::Remove(id) => {
                    refresh.remove(&id);
                    self.state.forget(&id);
                    self.egress.destroyed(&id);
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
        let unknown_net = batch.iter().any(|ev| {
            ev.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK)
                && ev
                    .actor
                    .as_ref()
                    .and_then(|a| a.id.as_ref())
                    .is_some_and(|id| !self.state.networks.contains_key(id))
        });
        if networks || unknown_net {
            self.refresh_networks().await;
        }
        if let Err(e) = self.refresh(refresh).await {
            warn!(error = %format!("{e:#}"), "refresh after events failed; resyncing in full");
            self.full_resync().await;
            return;
        }
        if !self.apply_or_retry("events") {
            return;
        }
        self.record_start_latencies(batch);
        // Then the new containers as clients.
        if self.resolve_pending() {
            self.apply_or_retry("container clients");
        }
    }

    /// Containers created: inspected now, in the background (their bindings, for their
    /// frontends at `network connect`). Containers Docker connects to a network while
    /// starting them (`connected`, with their address there, read once for egress and this):
    /// frontends from that inspect and that address, written at once (the container's own
    /// inspect waits until Docker has started it).
    fn early_events(&mut self, batch: &[bollard::models::EventMessage], connected: &[Connected]) {
        use bollard::models::EventMessageTypeEnum as T;
        let mut done = Vec::new();
        for ev in batch {
            let Some(actor) = ev.actor.as_ref() else {
                continue;
            };
            let action = ev.action.as_deref().unwrap_or("");
            match (ev.typ, action) {
                (Some(T::CONTAINER), "create") => {
                    if let Some(id) = actor.id.clone() {
                        let (docker, tx) = (self.docker.clone(), self.early_tx.clone());
                        tokio::spawn(async move {
                            // Answered at once unless the start has begun (then it waits for
                            // the start, and the start event serves).
                            if let Ok(Some(c)) = docker::inspect(&docker, &id).await
                                && c.state.as_ref().and_then(|s| s.status)
                                    == Some(bollard::models::ContainerStateStatusEnum::CREATED)
                            {
                                let _ = tx.send((id, c)).await;
                            }
                        });
                    }
                }
                (Some(T::CONTAINER), "start" | "die" | "destroy") => {
                    if let Some(id) = actor.id.clone() {
                        done.push((id, action == "start"));
                    }
                }
                _ => {}
            }
        }
        let mut written = Vec::new();
        for (net, id, addrs) in connected {
            // The create-time inspect not back yet: Docker's own files say the same.
            if !self.early.contains_key(id)
                && !self.state.containers.contains_key(id)
                && let Some(c) = self
                    .docker_root
                    .as_deref()
                    .and_then(|root| docker::created_on_disk(root, id))
            {
                self.early.insert(id.clone(), c);
            }
            let (Some(info), Some(c)) = (self.state.networks.get(net), self.early.get(id)) else {
                continue;
            };
            let info = info.clone();
            if self.state.early(id, c, &info, addrs) {
                written.push(id.clone());
            }
        }
        if !written.is_empty() && self.apply_or_retry("early frontends") {
            for id in written {
                debug!(container = %id.chars().take(12).collect::<String>(), "frontends written before the start completed");
                self.note_written(&id);
                self.early_written.insert(id, self.frontends_written);
            }
        }
        for (id, started) in done {
            self.early.remove(&id);
            // The start event reads the time written (`record_start_latencies`); a
            // container that died first keeps none.
            if !started {
                self.early_written.remove(&id);
            }
        }
    }

    /// How long each start event took to become a frontend in the map (in `status`).
    /// Records when container `id`'s frontends went into the map (the last write's time).
    fn note_written(&self, id: &str) {
        let at = self
            .frontends_written
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let s = &mut self.shared.lock().expect("status lock").status;
        if s.frontends_written_us.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
            s.frontends_written_us.remove(0);
        }
        s.frontends_written_us.push((id.to_string(), at));
    }

    fn record_start_latencies(&mut self, batch: &[bollard::models::EventMessage]) {
        let now_ns = self
            .frontends_written
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        for ev in batch {
            let id = ev
                .actor
                .as_ref()
                .and_then(|a| a.id.as_deref())
                .unwrap_or("");
            let (Some("start"), Some(t)) = (ev.action.as_deref(), ev.time_nano) else {
                continue;
            };
            if !self.state.containers.contains_key(id) {
                continue;
            }
            if let Some(at) = self.early_written.remove(id) {
                // Written before the start event: how long before.
                let at_ns = at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
                let lead_us = (t - at_ns) / 1000;
                metrics::get()
                    .early_lead(Duration::from_micros(u64::try_from(lead_us).unwrap_or(0)));
                debug!(container = %id.chars().take(12).collect::<String>(), lead_us, "frontends were in the map before the start event");
                let s = &mut self.shared.lock().expect("status lock").status;
                if s.early_lead_us.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
                    s.early_lead_us.remove(0);
                }
                s.early_lead_us.push(lead_us);
                continue;
            }
            let us = u64::try_from((now_ns - t) / 1000).unwrap_or(0);
            self.note_written(id);
            metrics::get().event_to_map(Duration::from_micros(us));
            debug!(container = %id.chars().take(12).collect::<String>(), latency_us = us, "start event synced");
            let s = &mut self.shared.lock().expect("status lock").status;
            if s.start_sync_us.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
                s.start_sync_us.remove(0);
            }
            s.start_sync_us.push(us);
        }
    }

    async fn full_resync(&mut self) {
        let r = async {
            let live: BTreeSet<String> = docker::running_ids(&self.docker)
                .await?
                .into_iter()
                .collect();
            self.state.retain(&live);
            self.egress.retain(&live);
            self.inspected.retain(|id, _| live.contains(id));
            if !self.loaded.vouching() {
                // Events were lost: the egress table is written whole again.
                self.egress.force();
            }
            self.check_docker_settings();
            if let Some(o) = &mut self.own_fw {
                o.fw.force();
            }
            self.state.networks = docker::networks(&self.docker).await?;
            let table = self.nft_table.clone();
            self.fw_snapshot = tokio::task::spawn_blocking(move || hostfw::capture(&table)).await?;
            self.evaluate_firewall();
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

    /// Inspects each container once (a few at a time) and replaces what is known of it.
    async fn refresh(&mut self, ids: BTreeSet<String>) -> Result<()> {
        let results = inspect_all(&self.docker, ids).await;
        self.ingest(results)
    }

    /// Replaces each inspected container's frontends (none when it is gone) and its view as
    /// a client; its default routes (which endpoint Docker publishes through) are read from
    /// its namespace.
    fn ingest(&mut self, results: Inspected) -> Result<()> {
        for (id, r) in results {
            let c = r?;
            let routes = c
                .as_ref()
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.pid)
                .filter(|p| *p > 0)
                .and_then(netns::default_routes);
            self.egress.inspected(&id, c.as_ref());
            // Networks of a driver other than `bridge` (macvlan, ipvlan): not policed here.
            let unbridged: Vec<String> = c
                .as_ref()
                .and_then(|c| c.network_settings.as_ref())
                .and_then(|n| n.networks.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|(name, ep)| {
                    let net = self.state.networks.get(ep.network_id.as_deref()?)?;
                    net.bridge
                        .is_none()
                        .then(|| format!("{name} (not a bridge network)"))
                })
                .collect();
            self.egress.set_drivers(&id, &unbridged);
            let (errors, new_ns) = self.state.ingest(&id, c.as_ref(), routes.as_ref());
            match c {
                Some(c) => {
                    self.inspected.insert(id.clone(), c);
                }
                None => {
                    self.inspected.remove(&id);
                }
            }
            for e in &errors {
                warn!(error = %e, "binding skipped");
            }
            if new_ns {
                self.pending_cookies.push(id);
            }
        }
        Ok(())
    }

    /// Reads the namespace cookies of containers seen since the last call (after the
    /// frontends are written: host clients are served first). Whether there were any.
    fn resolve_pending(&mut self) -> bool {
        let ids = std::mem::take(&mut self.pending_cookies);
        if ids.is_empty() {
            return false;
        }
        let paths: Vec<(String, std::path::PathBuf)> = ids
            .iter()
            .filter_map(|id| Some((id.clone(), self.state.netns_path(id)?)))
            .collect();
        let cookies = netns::cookies(paths.iter().map(|(_, p)| p.clone()).collect());
        for ((id, path), r) in paths.into_iter().zip(cookies) {
            match r {
                Ok(c) => self.state.set_cookie(&id, c),
                // Gone meanwhile, most likely: its clients take Docker's path.
                Err(e) => {
                    debug!(container = %id.chars().take(12).collect::<String>(), path = %path.display(), error = %format!("{e:#}"), "no network namespace cookie");
                }
            }
        }
        true
    }

    async fn refresh_networks(&mut self) {
        match docker::networks(&self.docker).await {
            Ok(n) => {
                self.state.networks = n;
                self.evaluate_firewall();
            }
            Err(e) => warn!(error = %format!("{e:#}"), "listing Docker networks failed"),
        }
    }

    /// What the last ruleset snapshot means, logged when it changes.
    fn evaluate_firewall(&mut self) {
        let mut fw = self
            .fw_snapshot
            .evaluate(&self.state.bridges(), &self.nft_table);
        // In the own-firewall mode, the operator's chain is where `DOCKER-USER` was: rules
        // there concern container and external clients' forwarded traffic alike.
        if self.own_fw.is_some() {
            let n = crate::ownfw::operator_rules(&self.nft_table).unwrap_or(0);
            if n > 0 {
                let at = format!("inet {}_fw operator ({n} rules)", self.nft_table);
                fw.forward_rules.get_or_insert_with(|| at.clone());
                fw.external_rules.get_or_insert(at);
            }
            let mut st = self.shared.lock().expect("status lock");
            st.status
                .own_firewall
                .get_or_insert_with(Default::default)
                .operator_rules = n;
        }
        if fw != self.state.firewall {
            if let Some(w) = &fw.stateful_input {
                info!(where_ = %w, "stateful INPUT policy: host clients' connections stay tracked");
            } else {
                info!("no stateful INPUT policy: host clients' connections are untracked");
            }
            if self.packet.layer.is_some()
                && let Some(w) = &fw.external_rules
            {
                info!(where_ = %w, "operator forwarding rules: external clients take Docker's DNAT");
            }
            if let Some(w) = &fw.forward_rules {
                info!(where_ = %w, "operator forwarding rules: container clients take Docker's own path");
            } else {
                info!("no operator rules for container traffic: container clients are translated");
            }
            self.state.firewall = fw;
        }
    }

    async fn on_ruleset_change(&mut self) {
        let changes = std::mem::take(&mut *self.fw_changes.lock().expect("ruleset changes lock"));
        // Ours among the tables that changed: read back, repaired if it drifted.
        if changes.touches_table("inet", &self.nft_table) {
            self.netfilter.check();
        }
        // The egress table changed (by the agent itself, mostly): read back within a second
        // (at most once a second), and written whole again if it drifted.
        if (changes.touches_table("inet", self.egress.table())
            || changes.touches_table("bridge", self.egress.table()))
            && self.egress_check_at.is_none()
        {
            self.egress_check_at = Some(Instant::now() + Duration::from_secs(1));
        }
        // The own-firewall table: the operator's chain may have changed.
        let own_changed = self.own_fw.is_some()
            && changes.touches_table("inet", &format!("{}_fw", self.nft_table));
        // Read back, and restored if it drifted from what was written.
        if own_changed && let Some(o) = self.own_fw.as_mut() {
            match tokio::task::block_in_place(|| o.fw.repair()) {
                Ok(true) => {
                    warn!(table = %o.fw.table(), "the own-firewall table had been changed by hand: restored");
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "restoring the own-firewall table failed; it is written whole at the next apply");
                }
            }
        }
        // Docker's own per-container rules change nothing the evaluation reads; a write to
        // the own-firewall table (the agent's, mostly) only if the operator's chain changed.
        if !self.fw_snapshot.concerned_by(&changes) {
            if own_changed && self.operator_rules_changed() {
                let before = self.state.firewall.clone();
                self.evaluate_firewall();
                if before != self.state.firewall {
                    self.apply_or_retry("operator rules");
                }
            }
            return;
        }
        let table = self.nft_table.clone();
        match tokio::task::spawn_blocking(move || hostfw::capture(&table)).await {
            Ok(snap) => self.fw_snapshot = snap,
            Err(e) => {
                warn!(error = %e, "reading the ruleset failed");
                return;
            }
        }
        let before = self.state.firewall.clone();
        self.evaluate_firewall();
        if before != self.state.firewall {
            self.apply_or_retry("ruleset change");
        }
    }

    /// Whether the operator's chain holds another number of rules than `status` says.
    fn operator_rules_changed(&self) -> bool {
        let n = crate::ownfw::operator_rules(&self.nft_table).unwrap_or(0);
        let st = self.shared.lock().expect("status lock");
        st.status.own_firewall.as_ref().map(|o| o.operator_rules) != Some(n)
    }

    /// The packet layer after an apply: its allow-list, where each served container is
    /// delivered to, and the programs on the uplinks and the containers' veths.
    async fn sync_packets(&mut self) {
        self.packet.dirty = false;
        let Some(layer) = self.packet.layer.as_mut() else {
            return;
        };
        let mut want = BTreeMap::new();
        for (svc, id) in &self.owners {
            if let Some(netns) = self.state.netns_path(id) {
                want.insert(
                    svc.addr,
                    crate::packet::Wanted {
                        container: id.clone(),
                        netns,
                    },
                );
            }
        }
        layer.stand_back(self.state.firewall.external_rules.clone());
        if let Err(e) = layer.sync_allow(&mut self.loaded) {
            warn!(error = %format!("{e:#}"), "writing the packet layer's allow-list failed");
        }
        if let Err(e) = layer.sync_endpoints(&mut self.loaded, &want).await {
            warn!(error = %format!("{e:#}"), "writing the packet layer's endpoints failed");
        }
        let uplinks = crate::packet::uplinks(
            &self.state.host_addrs,
            &self.state.bridges(),
            layer.settings.interfaces.as_deref(),
        );
        layer.sync_links(&mut self.loaded, &uplinks);
        let mut status = layer.status(self.packet.flows);
        let mut shared = self.shared.lock().expect("status lock");
        let before = shared.status.packet_layer.as_ref();
        status.flows_counted_unix_ms = before.map_or(0, |p| p.flows_counted_unix_ms);
        shared.status.packet_layer = Some(status);
    }

    /// Removes the packet layer's idle flows, and counts the rest for `status`; endpoints
    /// that could not be read are asked for again once due.
    fn age_flows(&mut self) {
        let Some(layer) = self.packet.layer.as_ref() else {
            return;
        };
        if layer.next_retry().is_some_and(|t| t <= Instant::now()) {
            self.packet.dirty = true;
        }
        match layer.age_flows(&mut self.loaded) {
            Ok(n) => {
                self.packet.flows = n;
                if let Some(p) = &mut self.shared.lock().expect("status lock").status.packet_layer {
                    p.flows = n;
                    p.flows_counted_unix_ms = now_ms();
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "aging the packet layer's flows failed"),
        }
    }

    async fn sync_local_addrs(&mut self) -> Result<()> {
        let addrs = netlink::dump(&self.nl).await?;
        let want = netlink::local_map(&addrs, &self.state.bridges());
        self.state.host_addrs = addrs;
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

    /// [`Agent::apply`]; on failure, logged and retried after a backoff. Whether it applied.
    fn apply_or_retry(&mut self, after: &str) -> bool {
        let t = Instant::now();
        let r = self.apply();
        metrics::get().reconcile(t.elapsed(), r.is_ok());
        match r {
            Ok(()) => {
                self.backoff.succeeded();
                self.retry_at = None;
                true
            }
            Err(e) => {
                let wait = self.backoff.failed();
                warn!(after, error = %format!("{e:#}"), retry_in_ms = wait.as_millis(), "applying failed; retrying");
                self.retry_at = Some(Instant::now() + wait);
                false
            }
        }
    }

    /// Plans from the state, applies the plan, publishes the status.
    fn apply(&mut self) -> Result<()> {
        let env = plan::Env {
            host_netns_cookie: self.host_netns_cookie,
            bindv6only: std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
                .is_ok_and(|s| s.trim() == "1"),
        };
        // The egress table first (a policy never waits for the maps, except at the first
        // sync: see `defer_egress`), then the plan, which leaves containers denied the host
        // to Docker's path.
        let egress = if std::mem::take(&mut self.defer_egress) {
            Ok(())
        } else {
            self.apply_egress()
        };
        let egress = egress.and(self.apply_own_firewall());
        self.state.host_denied = self.egress.host_denied();
        self.state.policed = self.egress.policed_addrs();
        let plan = plan::plan(&self.state, &env);
        for c in &plan.conflicts {
            warn!(frontend = %c.frontend, kept = %c.kept, dropped = %c.dropped, "frontend conflict");
        }
        let out = apply::apply(
            &plan,
            &self.state,
            &self.owners,
            &mut self.loaded,
            &self.netfilter,
            &self.sockets,
            self.force_notrack,
        )?;
        self.force_notrack = false;
        self.frontends_written = SystemTime::now();
        for e in &out.map_errors {
            warn!(error = %e, "a map could not hold everything");
        }
        if out.frontends.changed() {
            info!(
                added = out.frontends.added,
                updated = out.frontends.updated,
                removed = out.frontends.removed,
                total = out.served.frontends.len(),
                "frontends updated"
            );
        }
        let mut state = self.shared.lock().expect("status lock");
        let s = &mut state.status;
        s.last_sync_unix_ms = now_ms();
        s.syncs += 1;
        s.containers = self.state.containers.len();
        s.frontends = out.served.frontends.len();
        s.errors.clone_from(&plan.errors);
        s.errors.extend(out.map_errors);
        s.container_clients = plan
            .peer_nets
            .keys()
            .map(|k| k.netns_cookie)
            .collect::<BTreeSet<_>>()
            .len();
        s.container_clients_off = plan.container_clients_off;
        s.host_clients_tracked = plan.host_clients_tracked;
        state.frontends = out.served.rows;
        state.egress_counters = self.egress.counter_names();
        drop(state);
        self.owners = out.served.owners;
        self.packet.dirty = self.packet.layer.is_some();
        self.reset_paused();
        self.publish_counters();
        egress
    }

    /// The own-firewall mode's table, written when what it holds changed.
    fn apply_own_firewall(&mut self) -> Result<()> {
        let Some(own) = self.own_fw.as_mut() else {
            return Ok(());
        };
        let mut spec = crate::ownfw::Spec::new(
            self.state.networks.values(),
            crate::ownfw::published(&self.state.containers),
        );
        spec.routed = crate::ownfw::routed_ports(self.inspected.values(), &self.state.networks);
        let r = own.fw.apply(&spec);
        let (networks, published) = own.fw.counts();
        let mut st = self.shared.lock().expect("status lock");
        let prev = st.status.own_firewall.take().unwrap_or_default();
        st.status.own_firewall = Some(dataplane_api::OwnFirewallStatus {
            table: own.fw.table(),
            networks,
            published,
            // Counted when the ruleset changes (`evaluate_firewall`).
            operator_rules: prev.operator_rules,
            removed_leftovers: own.removed,
            error: r.as_ref().err().map(|e| format!("{e:#}")),
            written_unix_ms: match &r {
                Ok(true) => now_ms(),
                _ => prev.written_unix_ms,
            },
        });
        drop(st);
        if let Ok(true) = r {
            debug!(networks, published, "own-firewall table written");
        }
        r.map(|_| ())
    }

    /// Docker's settings read again (a restarted daemon may have changed them): a
    /// disagreement with the mode is logged and shown by `status`.
    fn check_docker_settings(&mut self) {
        let own = self.own_fw.is_some();
        let w = match crate::ownfw::docker_conf::of_daemon(&self.docker_socket) {
            Err(_) => return,
            Ok(s) if own => crate::ownfw::docker_conf::check(true, &s).err(),
            Ok(s) if !s.iptables => Some(rules_off_warning(&s)),
            Ok(_) => None,
        };
        let mut st = self.shared.lock().expect("status lock");
        if w != st.status.docker_settings_warning {
            if let Some(w) = &w {
                warn!("{w}");
            }
            st.status.docker_settings_warning = w;
        }
    }

    /// Destroys the translated sockets of containers just paused that asked for it
    /// (`on-pause=reset`): the maps already refuse new connections to them.
    fn reset_paused(&mut self) {
        let mut now = BTreeSet::new();
        let mut paused_ids = BTreeSet::new();
        for (id, fs) in &self.state.containers {
            for f in fs
                .iter()
                .filter(|f| f.backend.flags & BACKEND_F_PAUSED != 0)
            {
                paused_ids.insert(id.clone());
                for a in [f.backend.addr4, f.backend.addr6] {
                    if !dataplane_common::is_zero(&a) {
                        now.insert(Service::new(
                            crate::addr::addr_to_ip(&a),
                            f.key.proto,
                            f.backend.port(),
                        ));
                    }
                }
            }
        }
        let fresh: Vec<Service> = now.difference(&self.paused).copied().collect();
        self.paused = now;
        self.pause_events
            .retain(|id, _| self.state.containers.contains_key(id));
        if fresh.is_empty() {
            return;
        }
        let (n, errors) = self
            .sockets
            .destroy_now(&fresh, self.state.client_namespaces());
        for e in &errors {
            warn!(error = %e, "resetting the connections of a paused container");
        }
        metrics::get().pause_resets(n);
        let done_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        for id in paused_ids {
            let Some(t) = self.pause_events.remove(&id) else {
                continue;
            };
            let us = u64::try_from((done_ns - t) / 1000).unwrap_or(0);
            info!(container = %id.chars().take(12).collect::<String>(), sockets = n, latency_us = us, "paused (on-pause=reset): its translated connections were reset, new ones are refused");
            let s = &mut self.shared.lock().expect("status lock").status;
            if s.pause_resets.len() >= dataplane_api::SYNC_LATENCIES_KEPT {
                s.pause_resets.remove(0);
            }
            s.pause_resets.push((us, n));
        }
    }

    /// Writes the egress table if it changed, and starts lookups of new host names.
    fn apply_egress(&mut self) -> Result<()> {
        self.egress.bridges = self.state.bridges();
        let t = Instant::now();
        let r = self.egress.apply();
        if !matches!(r, Ok(false)) {
            metrics::get().netfilter_apply("egress", t.elapsed(), r.is_ok());
        }
        if let Ok(true) = r {
            debug!(took_us = t.elapsed().as_micros(), "egress table written");
        }
        self.lookup_due();
        r.map(|_| ())
    }

    /// Starts the lookups that are due, each in a task of its own; results come back
    /// through `dns_tx`.
    fn lookup_due(&mut self) {
        let due = self.egress.due_names();
        for name in due {
            let tx = self.dns_tx.clone();
            let resolver = self.resolver.clone();
            tokio::spawn(async move {
                let r = match resolver {
                    Some(r) => r.resolve(&name).await,
                    None => Err("no resolver configured".into()),
                };
                let _ = tx.send((name, r)).await;
            });
        }
    }

    /// Looks up the names that are due now, waiting at most `limit`; what does not answer
    /// in time is looked up in the background.
    async fn resolve_now(&mut self, limit: Duration) {
        let due = self.egress.due_names();
        if due.is_empty() {
            return;
        }
        let Some(resolver) = self.resolver.clone() else {
            for n in due {
                self.egress
                    .resolved(&n, Err("no resolver configured".into()));
            }
            return;
        };
        let lookups = futures_util::future::join_all(due.iter().map(|n| {
            let r = resolver.clone();
            async move { (n.clone(), r.resolve(n).await) }
        }));
        match tokio::time::timeout(limit, lookups).await {
            Ok(results) => {
                for (n, r) in results {
                    self.egress.resolved(&n, r);
                }
            }
            Err(_) => {
                for n in due {
                    self.egress.retry_soon(&n);
                }
            }
        }
    }

    /// Every container's labels (created, stopped: not running), so its policy is ready at
    /// its next `network connect`; runtime changes of containers that no longer exist go.
    /// Every container's egress policy ready (from its labels), whenever it starts.
    fn learn(&mut self, list: Vec<docker::Named>) {
        let ids = list.iter().map(|(id, _, _)| id.clone()).collect();
        for (id, name, labels) in list {
            if !self.egress.knows(&id) {
                self.egress
                    .created(&id, &name, labels.into_iter().collect(), false);
            }
        }
        self.egress.sweep_runtime(&ids);
    }

    /// What the events mean for egress: labels at `create`; at `network connect`, the
    /// container's address on that network (asked of the network: the container's own
    /// inspect waits until Docker has started it), and its policy written at once. Returns
    /// the connects read (also those of containers with early frontends to write).
    async fn egress_events(&mut self, batch: &[bollard::models::EventMessage]) -> Vec<Connected> {
        use bollard::models::EventMessageTypeEnum as T;
        let mut connects = Vec::new();
        for ev in batch {
            let Some(actor) = ev.actor.as_ref() else {
                continue;
            };
            let attrs = actor.attributes.clone().unwrap_or_default();
            let action = ev.action.as_deref().unwrap_or("");
            match (ev.typ, action) {
                (Some(T::CONTAINER), "create") => {
                    if let Some(id) = &actor.id {
                        let name = attrs.get("name").cloned().unwrap_or_default();
                        self.egress
                            .created(id, &name, egress::labels_of_event(&attrs), true);
                        // Its names are looked up while Docker starts it.
                        self.lookup_due();
                    }
                }
                (Some(T::NETWORK), "connect") => {
                    if let (Some(net), Some(id)) = (&actor.id, attrs.get("container"))
                        && (self.egress.knows(id) || self.early.contains_key(id))
                    {
                        connects.push((net.clone(), id.clone()));
                    }
                }
                _ => {}
            }
        }
        if connects.is_empty() {
            return Vec::new();
        }
        let t = Instant::now();
        let docker = &self.docker;
        let found = futures_util::future::join_all(connects.iter().map(|(net, id)| async move {
            (net, id, docker::addresses_on(docker, net, id).await)
        }))
        .await;
        let inspected_us = t.elapsed().as_micros();
        let mut connected = Vec::new();
        for (net, id, r) in found {
            match r {
                Ok(addrs) => connected.push((net.clone(), id.clone(), addrs)),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "reading a new endpoint's address failed");
                }
            }
        }
        let mut policed = false;
        for (net, id, addrs) in &connected {
            if self.egress.knows(id) {
                self.egress.connected(id, net, addrs.clone());
                policed = true;
            }
        }
        if !policed {
            return connected;
        }
        self.egress.bridges = self.state.bridges();
        let applied = Instant::now();
        let r = self.egress.apply();
        if !matches!(r, Ok(false)) {
            metrics::get().netfilter_apply("egress", applied.elapsed(), r.is_ok());
        }
        match r {
            Ok(written) => debug!(
                took_us = t.elapsed().as_micros(),
                network_inspect_us = inspected_us,
                written,
                "egress applied at network connect"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "writing the egress table failed; retrying"),
        }
        self.lookup_due();
        connected
    }

    /// An egress request from `bridge-ctl`, answered as JSON text.
    async fn on_request(&mut self, req: dataplane_api::Request) -> String {
        use dataplane_api::Request;
        let json =
            |r: serde_json::Result<String>| r.unwrap_or_else(|e| api::error_reply(e.to_string()));
        match req {
            Request::EgressShow(None) => json(serde_json::to_string(&self.egress.views(None))),
            Request::EgressShow(Some(k)) => match self.egress.find(&k) {
                Ok(id) => json(serde_json::to_string(&self.egress.views(Some(&id)))),
                Err(e) => api::error_reply(e),
            },
            Request::EgressSet(change) => {
                let id = match self.egress.find(&change.container) {
                    Ok(id) => id,
                    Err(e) => return api::error_reply(e),
                };
                if let Err(e) = self.egress.change(&id, &change) {
                    return api::error_reply(e);
                }
                info!(container = %change.container, "egress policy changed at runtime");
                // Names new to the agent are looked up first (briefly), so the answer
                // describes what the kernel enforces.
                self.resolve_now(Duration::from_millis(1500)).await;
                if let Err(e) = self.apply() {
                    self.retry_at = Some(Instant::now() + self.backoff.failed());
                    return api::error_reply(format!("{e:#}"));
                }
                match self.egress.views(Some(&id)).into_iter().next() {
                    Some(v) => json(serde_json::to_string(&v)),
                    None => api::error_reply("the container went away"),
                }
            }
            _ => api::error_reply("not an egress request"),
        }
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
