//! The agent: its start, and its loop. The loop receives one [`Input`] at a time
//! ([`inputs`]), updates the [`Model`] ([`handle`]), plans and applies what changed
//! ([`sync`]: [`crate::plan`], then [`crate::apply`] and the tables' appliers), and reports
//! ([`report`]: the status `bridge-ctl` reads, the metrics). A failed apply is retried with
//! backoff.

pub mod cache;
mod handle;
mod inputs;
mod lifecycle;
mod parts;
mod report;
pub mod start;
mod sync;

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::ControlFlow,
    sync::Arc,
    time::SystemTime,
};

use tokio::sync::mpsc;
use tracing::info;

pub use start::{Options, StartError};
use {
    inputs::{Deadlines, Inputs},
    lifecycle::{destroyer, new_egress, own_side, resolver, signals, start_metrics, start_or_stop},
    parts::{Agent, PacketSide},
    start::{Started, Startup, preflight},
};

use crate::{
    egress::records::Policies,
    hostfw,
    input::Input,
    model::Model,
    netfilter::{NetfilterTask, changes as nfwatch, notrack::Notrack},
    netlink,
    report::api::{self, Shared},
    report::metrics,
    retry::Backoff,
};

/// The file, beside the control socket, where a stopping agent leaves its inspects.
pub const CACHE_FILE: &str = "containers.json";

/// Starts the agent and serves until `SIGTERM` or `SIGINT`.
pub async fn run(opts: Options) -> Result<(), StartError> {
    let mut startup = Startup::new();
    let (mut sigterm, sighup) = signals()?;
    // Before Docker is first asked anything: the events stream starts from here.
    let events_since = report::unix_secs();
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
    let egress = new_egress(&opts, docker_settings.as_ref().ok())
        .with_counters(scrape.egress_counters_handle());

    let mut agent = Agent {
        loaded,
        docker: docker.clone(),
        nl,
        model: Model {
            networks,
            on_pause_default: opts.config.pause.default,
            ..Model::default()
        },
        shared,
        netfilter: NetfilterTask::start(
            Notrack::new(&opts.nft_table),
            Arc::new(|took, ok| metrics::get().netfilter_apply("notrack", took, ok)),
        ),
        sockets,
        owners: BTreeMap::new(),
        host_netns_cookie: host_cookie,
        frontends_written: SystemTime::now(),
        force_notrack: true,
        fw_snapshot: hostfw::Snapshot::default(),
        fw_changes,
        nft_table: opts.nft_table.clone(),
        retry_at: None,
        backoff: Backoff::new(),
        egress,
        resolver,
        dns_tx,
        early_tx,
        egress_check_at: None,
        own_check_at: None,
        events_open: true,
        paused: BTreeSet::new(),
        config: opts.config.clone(),
        config_path: opts.config_path.clone(),
        scrape,
        metrics_server,
        cache_path: opts.cache_path.clone(),
        defer_egress: true,
        docker_root: None,
        packet,
        own_fw,
        docker_socket: opts.docker_socket.clone(),
    };
    let fw_later = agent
        .first_sync(fw, fw_tx, inspected, listed, startup)
        .await?;
    agent.after_ready(fw_later, cached).await;

    let inputs = Inputs {
        docker,
        since: events_since,
        resync_interval: opts.resync_interval,
        // The start took inspects from the last agent's cache: a full resync at once.
        resync_now: cached > 0,
        addresses: nl_rx,
        ruleset: fw_rx,
        control: api_rx,
        lookups: dns_rx,
        created: early_rx,
        stop: sigterm,
        reload: sighup,
    };
    serve(agent, inputs, opts.pin_dir.is_some()).await;
    Ok(())
}

/// The loop: one input at a time, until a stop; then the agent stops (`pinned`: what it
/// installed stays for the next agent).
async fn serve(mut agent: Agent, inputs: Inputs, pinned: bool) {
    let mut inputs = inputs.open();
    loop {
        let input = inputs.next(agent.deadlines()).await;
        if agent.handle(input).await.is_break() {
            break;
        }
    }
    agent.stop(pinned).await;
}

impl Agent {
    /// Serves one input: the model takes it, and what it changes is planned, applied and
    /// reported. `Break` when the agent is to stop.
    async fn handle(&mut self, input: Input) -> ControlFlow<()> {
        match input {
            Input::Docker(batch) => self.on_events(&batch).await,
            Input::EventsLost(why) => self.events_lost(&why),
            Input::EventsBack => self.events_back().await,
            Input::Created(id, c) => self.on_created(&id, *c),
            Input::Addresses => self.on_addresses().await,
            Input::Ruleset => self.on_ruleset_change().await,
            Input::Control(req, reply) => {
                let answer = self.on_request(req).await;
                let _ = reply.send(answer);
            }
            Input::Lookup(name, r) => {
                if self.egress.resolved(&name, r) {
                    self.apply_or_retry("allow-list name resolved");
                }
            }
            Input::Timer(t) => self.on_timer(t).await,
            Input::Reload => self.reload().await,
            Input::Stop(why) => {
                info!("{why}");
                return ControlFlow::Break(());
            }
        }
        if self.packet.dirty {
            self.sync_packets().await;
        }
        ControlFlow::Continue(())
    }

    /// When the loop's timers are due.
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            retry: self.retry_at,
            lookups: self.egress.next_lookup(),
            egress_ports: self.egress.ports_retry_at(Policies(&self.model.containers)),
            egress_check: self.egress_check_at,
            own_check: self.own_check_at,
            flows: self.packet.layer.is_some(),
            egress_counters: self.metrics_server.is_some(),
        }
    }
}
