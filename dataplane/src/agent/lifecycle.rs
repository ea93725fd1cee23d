//! The agent's start after the kernel and Docker are reached (the first sync, what follows
//! ready), its stop, and `SIGHUP`'s reload.

use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use std::sync::Arc;

use tokio::signal::unix::SignalKind;

use super::{
    inputs::StopSignals,
    parts::{Agent, MetricsServer, OwnSide, PacketSide},
    report::now_ms,
};
use crate::{
    agent::start::{Options, StartError, Started, Startup, load_and_list},
    apply::sockets::Destroyer,
    bpf::Loaded,
    docker,
    egress::{self, Egress},
    features::{Feature, Features},
    model::Model,
    report::api::Shared,
    report::metrics,
    report::notify,
};

impl PacketSide {
    pub(super) fn new(opts: &Options, loaded: &Loaded) -> Result<Self, StartError> {
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

/// Leaves the inspects and the firewall's evaluation for the next start ([`crate::agent::cache`]).
pub(super) fn leave_cache(path: Option<&std::path::Path>, model: &Model) {
    let Some(path) = path else { return };
    let inspects = model.inspects().map(|(id, c)| (id.as_str(), c));
    match crate::agent::cache::save(path, inspects, &model.firewall) {
        Ok(n) => debug!(containers = n, path = %path.display(), "inspects left for the next start"),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "could not leave the inspects for the next start");
        }
    }
}

/// The metrics endpoint at start, and what the status says of the agent from the start.
pub(super) async fn start_metrics(
    opts: &Options,
    loaded: &Loaded,
    docker_version: String,
    shared: &Shared,
) -> Result<(metrics::Scrape, Option<MetricsServer>), StartError> {
    let scrape = metrics::Scrape {
        shared: shared.clone(),
        kernel: Arc::new(metrics::KernelMaps::of(loaded).map_err(StartError::Kernel)?),
        egress_counters: Arc::default(),
    };
    let server = metrics_server(&opts.config, &scrape)
        .await
        .map_err(StartError::Environment)?;
    let mut st = shared.lock().expect("status lock");
    st.kernel = Some(scrape.kernel.clone());
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
pub(super) async fn metrics_server(
    config: &crate::config::Config,
    scrape: &metrics::Scrape,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(addr) = config.metrics.addr().map_err(|e| anyhow::anyhow!(e))? else {
        return Ok(None);
    };
    let task = metrics::server::serve(addr, scrape.clone()).await?;
    info!(url = %format!("http://{addr}/metrics"), "serving metrics");
    Ok(Some(MetricsServer { addr, task }))
}

/// What ends the translated sockets of removed backends (where the kernel can).
pub(super) fn destroyer(loaded: &crate::bpf::Loaded) -> Result<Destroyer, StartError> {
    Ok(Destroyer::new(
        loaded.translations_fd().map_err(StartError::Kernel)?,
        loaded.features.has(Feature::SockDestroy),
    ))
}

/// The egress side, with what Docker's daemon says of resolvers and where it keeps its
/// containers' namespaces.
pub(super) fn new_egress(
    opts: &Options,
    docker: Option<&crate::ownfw::docker_conf::Settings>,
) -> Egress {
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
pub(super) async fn own_side(
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
pub(super) fn rules_off_warning(s: &crate::ownfw::docker_conf::Settings) -> String {
    format!(
        "Docker's iptables rules are off ({}): nothing publishes ports to external clients, \
         masquerades or isolates networks; run the agent with --own-firewall",
        s.source
    )
}

/// [`load_and_list`], unless asked to stop meanwhile (waiting for Docker or the kernel):
/// then `None`, and nothing is serving yet.
pub(super) async fn start_or_stop(
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

/// The stop signals and `SIGHUP`, taken from the start on: a reload asked for during the
/// start is served once ready, and a stop asked for while waiting for Docker or the kernel
/// ends the start, one asked for later is served like any other (their default actions
/// would end the process before it leaves anything for the next start).
pub(super) fn signals() -> Result<(StopSignals, tokio::signal::unix::Signal), StartError> {
    let hup = tokio::signal::unix::signal(SignalKind::hangup())
        .map_err(|e| StartError::Environment(e.into()))?;
    let stop = StopSignals::new().map_err(|e| StartError::Environment(e.into()))?;
    Ok((stop, hup))
}

/// The resolver allow-list names are looked up with: the config's, or the host's.
pub(super) fn resolver(
    config: &crate::config::Config,
) -> Result<Option<egress::dns::Resolver>, StartError> {
    let server = config
        .egress
        .resolver
        .as_deref()
        .map(crate::config::resolver_addr)
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
    /// The first sync: the firewall as the start found it, local addresses, the containers,
    /// the maps; then the agent vouches. Returns where to ask for the ruleset to be read
    /// when the start took the last agent's evaluation of it.
    pub(super) async fn first_sync(
        &mut self,
        fw: crate::agent::start::Firewall,
        fw_tx: mpsc::Sender<()>,
        inspected: crate::agent::start::Inspected,
        listed: Vec<docker::Named>,
        mut startup: Startup,
    ) -> Result<Option<mpsc::Sender<()>>, StartError> {
        let fw_later = match fw {
            crate::agent::start::Firewall::Read(snapshot) => {
                self.fw_snapshot = snapshot;
                self.evaluate_firewall();
                None
            }
            crate::agent::start::Firewall::Known(known) => {
                self.model.firewall = known;
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
    pub(super) async fn after_ready(&mut self, fw_later: Option<mpsc::Sender<()>>, cached: usize) {
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

    /// What stays when the agent stops: with pins, everything (the next agent adopts it);
    /// without, nothing.
    pub(super) async fn stop(mut self, pinned: bool) {
        notify::notify("STOPPING=1");
        self.metrics_server = None;
        if pinned {
            // The table writes asked for land first: the ruleset generation left for the
            // next start is the one they leave.
            self.netfilter.close().await;
            leave_cache(self.cache_path.as_deref(), &self.model);
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
            leave_cache(self.cache_path.as_deref(), &self.model);
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
    pub(super) async fn reload(&mut self) {
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

    pub(super) async fn try_reload(&mut self, path: &std::path::Path) -> Result<(), String> {
        let new = crate::config::Config::load(path).map_err(|e| e.to_string())?;
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
        self.model.on_pause_default = new.pause.default;
        self.config = new;
        // Labels are read again with the new defaults, and every table written.
        self.full_resync().await;
        Ok(())
    }

    /// The packet layer's part of a reload: its allow-list and uplinks change now; turning
    /// it on or off, or another flow map size, at the next start (said so).
    pub(super) fn reload_packet(&mut self, new: &crate::config::Config) -> Result<(), String> {
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
}
