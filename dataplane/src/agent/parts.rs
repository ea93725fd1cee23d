//! What the agent holds between two inputs: the model, and the handles its appliers and
//! reports use.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use bollard::Docker;
use tokio::sync::mpsc;

use crate::{
    addr::Service,
    apply::sockets::Destroyer,
    bpf::Loaded,
    egress::{self, Egress},
    hostfw,
    input::LookupResult,
    model::{ContainerId, Model},
    netfilter::{NetfilterTask, changes as nfwatch},
    report::{api::Shared, metrics},
    retry::Backoff,
};

/// The agent between two inputs: the model, and the handles its appliers and reports use.
pub(super) struct Agent {
    pub(super) loaded: Loaded,
    pub(super) docker: Docker,
    pub(super) nl: rtnetlink::Handle,
    /// What the agent knows (one record per container).
    pub(super) model: Model,
    pub(super) shared: Shared,
    pub(super) netfilter: NetfilterTask,
    pub(super) sockets: Destroyer,
    /// Backends the maps served after the last apply, with their containers.
    pub(super) owners: BTreeMap<Service, String>,
    pub(super) host_netns_cookie: u64,
    /// When the frontends map was last written (sync latency is measured to here).
    pub(super) frontends_written: SystemTime,
    /// Re-apply the nftables table even if unchanged (after a full resync: repairs drift).
    pub(super) force_notrack: bool,
    /// The host's own ruleset as last read.
    pub(super) fw_snapshot: hostfw::Snapshot,
    /// Ruleset changes noticed and not handled yet.
    pub(super) fw_changes: Arc<Mutex<nfwatch::Changes>>,
    pub(super) nft_table: String,
    /// When to retry a failed apply, and how long the next wait is.
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: Backoff,
    /// Egress policies and their table.
    pub(super) egress: Egress,
    pub(super) resolver: Option<egress::dns::Resolver>,
    /// Where lookups and created containers' inspects, made in tasks of their own, report.
    pub(super) dns_tx: mpsc::Sender<(String, LookupResult)>,
    pub(super) early_tx:
        mpsc::Sender<(ContainerId, Box<bollard::models::ContainerInspectResponse>)>,
    /// When to read the egress table back (it changed).
    pub(super) egress_check_at: Option<Instant>,
    /// When to read the own-firewall table back (it changed).
    pub(super) own_check_at: Option<Instant>,
    /// Docker's events stream is open (the maps are vouched for only then).
    pub(super) events_open: bool,
    /// Backends of paused containers that asked for `on-pause=reset` (their sockets are
    /// destroyed when they enter this set).
    pub(super) paused: BTreeSet<Service>,
    /// The config in force, and where it is read again from on `SIGHUP`.
    pub(super) config: crate::config::Config,
    pub(super) config_path: Option<std::path::PathBuf>,
    /// What a metrics scrape reads, and the server when one listens.
    pub(super) scrape: metrics::Scrape,
    pub(super) metrics_server: Option<MetricsServer>,
    pub(super) cache_path: Option<std::path::PathBuf>,
    /// The egress table is written after the maps, once (the first sync: a restart
    /// translates again without waiting for it; the table in the kernel stays meanwhile).
    pub(super) defer_egress: bool,
    /// Docker's data root (from `info`), where it keeps each container's configuration.
    pub(super) docker_root: Option<std::path::PathBuf>,
    pub(super) packet: PacketSide,
    /// The own-firewall mode's table, when that mode is on.
    pub(super) own_fw: Option<OwnSide>,
    pub(super) docker_socket: String,
}

/// The own-firewall mode in the agent's loop.
pub(super) struct OwnSide {
    pub(super) fw: crate::ownfw::Firewall,
    /// Docker's iptables leftovers removed at the start.
    pub(super) removed: usize,
}

/// The packet layer in the agent's loop.
pub(super) struct PacketSide {
    /// The layer, when it is on.
    pub(super) layer: Option<crate::packet::Layer>,
    /// Its flags (taken again with the config at a reload).
    pub(super) flags: crate::packet::Flags,
    /// Its endpoints and links are to be synced (after an apply).
    pub(super) dirty: bool,
    /// Flows in the flow map, as last counted.
    pub(super) flows: usize,
}

/// The metrics endpoint: its address, and the task serving it (stopped when dropped).
pub(super) struct MetricsServer {
    pub(super) addr: std::net::SocketAddr,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
