//! Egress policy per container: what it may initiate ([`policy`]), compiled into the
//! agent's own nftables table ([`nft`]), with allow-list host names resolved by the agent
//! ([`dns`]).
//!
//! The table follows Docker: a container's chains are written as soon as Docker connects it
//! to a network (the `network connect` event, before its process starts; its address comes
//! from the network, which answers while the container is still starting), and removed
//! when it stops, in one transaction each. Runtime changes (`bridge-ctl egress set`) are
//! kept in files under the state directory, so they outlive an agent restart, until the
//! container is removed.
//!
//! The drop counters are read back with the table (when the agent checks it after a
//! change, writes it whole, or shows it) and, while metrics are served, every
//! [`COUNTERS_INTERVAL`]; each reading goes to an [`EgressCountersHandle`] the metrics read.

pub mod dns;
pub mod guard;
pub mod nft;
pub mod policy;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bollard::models::ContainerInspectResponse;
use tracing::{info, warn};

use crate::netfilter::table::{Applied, Table};
use policy::{Allow, Config, Layer, Policy, Target};

use crate::status::EgressCountersHandle;

/// What the agent knows of one container, for its policy.
#[derive(Clone, Debug, Default)]
pub struct Container {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub runtime: Option<Layer>,
    /// Its addresses per Docker network.
    pub addrs: BTreeMap<String, Vec<IpAddr>>,
    /// Resolvers Docker gives it (`--dns`, from its inspect; else the daemon's and the
    /// host's: see [`dns::docker_resolvers`]).
    pub dns: BTreeSet<IpAddr>,
    /// Its network namespace (`NetworkSettings.SandboxKey`, or found at `network connect`).
    pub netns: Option<PathBuf>,
    /// The bridge ports behind its veths, and the addresses they were found for.
    pub ports: Vec<crate::endpoint::Port>,
    pub ports_for: BTreeSet<IpAddr>,
    /// Why its ports could not be found (its frames are not guarded then), and since when
    /// they are looked for (at `network connect` Docker may not have moved its veth into
    /// its namespace yet).
    pub ports_error: Option<String>,
    pub ports_missing_since: Option<Instant>,
    /// What `--network` says when it cannot be policed here (`host`, a driver other than
    /// `bridge`), or `container:X`.
    pub network_mode: Option<String>,
    /// When Docker connected it to a network and it was not running yet.
    pub starting_since: Option<Instant>,
    /// The last error logged for its labels (logged once).
    pub logged_error: Option<String>,
    /// When its policy was first in the kernel for its current addresses.
    pub enforced_at: Option<std::time::SystemTime>,
    /// Since when Docker may be starting it (its `create`, or its stop: a restart policy
    /// starts it again) with no `network connect` seen yet.
    pub pending_since: Option<Instant>,
}

impl Container {
    fn addresses(&self) -> BTreeSet<IpAddr> {
        self.addrs.values().flatten().copied().collect()
    }
}

/// A resolved host name.
#[derive(Clone, Debug)]
pub struct Name {
    pub addrs: BTreeSet<IpAddr>,
    pub refresh_at: Instant,
    pub error: Option<String>,
    /// A lookup is running.
    pub in_flight: bool,
}

/// How long a container Docker is starting keeps the addresses its `network connect`
/// gave, before the start completes (a start that takes longer is resynced).
const STARTING_GRACE: Duration = Duration::from_mins(2);

/// How long the veths of a container Docker connected are looked for before the agent
/// waits for its next event (its start).
const PORTS_LOOKUP: Duration = Duration::from_secs(2);

/// How often the agent reads the drop counters back while metrics are served (a scrape
/// reports the latest reading, so they are at most this old, or a table check's age).
pub const COUNTERS_INTERVAL: Duration = Duration::from_secs(10);

pub struct Egress {
    table: String,
    pub config: Config,
    state_dir: Option<PathBuf>,
    pub containers: BTreeMap<String, Container>,
    pub names: BTreeMap<String, Name>,
    /// The table as written.
    written: Table<nft::Spec>,
    /// Docker's bridge interfaces (set by the agent before each apply).
    pub bridges: BTreeSet<String>,
    /// Whether bridged traffic is known to pass the IP hooks (`br_netfilter`).
    bridge_netfilter: bool,
    /// The daemon's own `dns` setting (its command line and config file).
    daemon_dns: Vec<IpAddr>,
    /// Where Docker keeps its containers' network namespaces (`<exec-root>/netns`).
    netns_dir: PathBuf,
    /// Veths that are no container's: on other bridges than Docker's, or Docker's own
    /// (its namespaces not named by a sandbox ID: Swarm's ingress, load balancers).
    outside_ports: BTreeSet<String>,
    /// Where each reading of the drop counters goes.
    counters: EgressCountersHandle,
    /// The reading [`Egress::refresh_counters`] started, while it runs.
    counters_read: Option<tokio::task::JoinHandle<()>>,
}

/// The namespace in `dir` (Docker's) that no other container claims and whose veths hold
/// `addrs`, with its ports.
fn find_netns(
    dir: &std::path::Path,
    host: &crate::endpoint::HostLinks,
    claimed: &BTreeSet<PathBuf>,
    addrs: &BTreeSet<IpAddr>,
) -> Result<(PathBuf, Vec<crate::endpoint::Port>)> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in rd.flatten() {
        let path = e.path();
        if claimed.contains(&path) || is_host_netns(&path) {
            continue;
        }
        let Ok(ports) = crate::endpoint::ports(&path, host) else {
            continue;
        };
        if ports
            .iter()
            .any(|p| p.addrs.iter().any(|a| addrs.contains(a)))
        {
            return Ok((path, ports));
        }
    }
    anyhow::bail!("no namespace under {} holds its addresses", dir.display())
}

/// Whether the namespace file at `path` is the host's (the agent's own) namespace.
fn is_host_netns(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(path).is_none_or(|a| Some(a) == id(std::path::Path::new("/proc/self/ns/net")))
}

/// `docker0`, or `br-` and 12 hex digits.
fn docker_named(bridge: &str) -> bool {
    bridge == "docker0"
        || bridge
            .strip_prefix("br-")
            .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Veths of the host (`host`) that are not a container's (see [`Egress::outside_ports`]).
fn outside_ports(
    bridges: &BTreeSet<String>,
    host: &crate::endpoint::HostLinks,
    netns_dir: &std::path::Path,
) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = crate::endpoint::host_veths(host)
        .into_iter()
        // A veth on no bridge passes no bridge hook; one Docker is setting up may be on
        // none yet. Bridges named the way Docker names them count as Docker's (a network
        // the agent has not heard of yet).
        .filter(|(_, bridge)| {
            bridge
                .as_ref()
                .is_some_and(|b| !bridges.contains(b) && !docker_named(b))
        })
        .map(|(name, _)| name)
        .collect();
    let sandbox = |n: &str| n.len() == 12 && n.bytes().all(|b| b.is_ascii_hexdigit());
    for e in std::fs::read_dir(netns_dir).into_iter().flatten().flatten() {
        // Docker's `default` is the host's own namespace: its veths' peers are containers'.
        if !sandbox(&e.file_name().to_string_lossy()) && !is_host_netns(&e.path()) {
            for p in crate::endpoint::ports(&e.path(), host).unwrap_or_default() {
                out.insert(p.host_ifname);
            }
        }
    }
    out
}

/// Why a container on network mode `mode` (or networks of `drivers`) cannot be policed
/// here; `container:X` is kept as it is (X's policy applies).
fn unenforceable(mode: &str, drivers: &[String]) -> Option<String> {
    if mode == "host" {
        return Some("--network host: it shares the host's network namespace".into());
    }
    if mode.starts_with("container:") {
        return Some(mode.to_string());
    }
    drivers
        .iter()
        .find(|d| !matches!(d.as_str(), "bridge" | "null"))
        .map(|d| format!("network {d}: its traffic does not pass a bridge of the host's"))
}

/// Makes traffic between containers on one bridge pass the IP netfilter hooks
/// (`br_netfilter`, as Docker itself does for `icc=false` and `userland-proxy=false`):
/// without it, a container denied the host would still reach its neighbours on the same
/// bridge unseen. Whether it is on.
fn enable_bridge_netfilter() -> bool {
    let knobs = [
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
    ];
    if !std::path::Path::new(knobs[0]).exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status();
    }
    let mut on = true;
    for k in knobs {
        if std::fs::read_to_string(k).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match std::fs::write(k, "1") {
            Ok(()) => info!(
                knob = k,
                "enabled bridge netfilter: containers denied the host are policed on their own bridge too"
            ),
            Err(e) => {
                warn!(knob = k, error = %e, "cannot enable bridge netfilter: containers denied the host still reach containers on their own bridge");
                on = false;
            }
        }
    }
    on
}

impl Egress {
    /// `daemon_dns`: the daemon's `dns` setting; `exec_root`: its `exec-root`.
    pub fn new(
        table: &str,
        config: Config,
        state_dir: Option<PathBuf>,
        daemon_dns: Vec<IpAddr>,
        exec_root: &std::path::Path,
    ) -> Self {
        Self {
            table: table.to_string(),
            config,
            state_dir,
            containers: BTreeMap::new(),
            names: BTreeMap::new(),
            written: Table::new(table),
            bridges: BTreeSet::new(),
            bridge_netfilter: false,
            daemon_dns,
            netns_dir: exec_root.join("netns"),
            outside_ports: BTreeSet::new(),
            counters: EgressCountersHandle::default(),
            counters_read: None,
        }
    }

    /// Puts each reading of the drop counters into `counters` (the metrics').
    #[must_use]
    pub fn with_counters(mut self, counters: EgressCountersHandle) -> Self {
        self.counters = counters;
        self
    }

    /// Stores the drop counters of a reading of both tables that started at `at` (`None`:
    /// the table was not there, or not readable).
    fn store_counters(
        &self,
        at: Instant,
        inet: Option<&BTreeMap<String, u64>>,
        bridge: Option<&BTreeMap<String, u64>>,
    ) {
        self.counters
            .lock()
            .expect("egress counters lock")
            .update(at, drop_counters(inet, bridge));
    }

    /// Reads the drop counters back, off the loop, unless a reading is still running or
    /// started less than half a [`COUNTERS_INTERVAL`] ago, or there is nothing to read:
    /// nothing written yet (the first write reads them), or no container in the table (then
    /// there are no counters, and that is stored without reading).
    pub fn refresh_counters(&mut self) {
        if self
            .counters_read
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            return;
        }
        let last = self
            .counters
            .lock()
            .expect("egress counters lock")
            .read_at();
        if last.is_some_and(|t| t.elapsed() < COUNTERS_INTERVAL / 2) {
            return;
        }
        let Some(applied) = self.written.applied() else {
            return;
        };
        let at = Instant::now();
        if applied.containers.is_empty() && applied.guard.senders.is_empty() {
            self.store_counters(at, None, None);
            return;
        }
        let (table, counters) = (self.table.clone(), self.counters.clone());
        self.counters_read = Some(tokio::task::spawn_blocking(move || {
            let (inet, bridge) = (nft::read_back(&table), guard::read_back(&table));
            let drops = drop_counters(
                inet.as_ref().map(|(_, c)| c),
                bridge.as_ref().map(|(_, c)| c),
            );
            counters
                .lock()
                .expect("egress counters lock")
                .update(at, drops);
        }));
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn runtime_path(&self, id: &str) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("egress").join(format!("{id}.json")))
    }

    fn load_runtime(&self, id: &str) -> Option<Layer> {
        let p = self.runtime_path(id)?;
        let text = std::fs::read_to_string(&p).ok()?;
        match serde_json::from_str(&text) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(path = %p.display(), error = %e, "ignoring an unreadable runtime egress change");
                None
            }
        }
    }

    fn store_runtime(&self, id: &str, layer: Option<&Layer>) -> Result<()> {
        let Some(p) = self.runtime_path(id) else {
            return Ok(());
        };
        match layer {
            None => match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", p.display()))
                }
                _ => Ok(()),
            },
            Some(l) => {
                let dir = p.parent().expect("a file in a directory");
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(l)?)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
            }
        }
    }

    /// Removes stored runtime changes of containers that no longer exist (`exists` says).
    pub fn sweep_runtime(&self, exists: &BTreeSet<String>) {
        let Some(dir) = self.state_dir.as_ref().map(|d| d.join("egress")) else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".json")
                && !exists.contains(id)
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The container as its `create` event (labels, name) shows it, before it starts
    /// (`starting`: Docker may start it any moment).
    pub fn created(
        &mut self,
        id: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        starting: bool,
    ) {
        let runtime = self.load_runtime(id);
        let c = self.containers.entry(id.to_string()).or_default();
        if starting {
            c.pending_since = Some(Instant::now());
        }
        c.name = name.trim_start_matches('/').to_string();
        c.labels = labels;
        if c.runtime.is_none() {
            c.runtime = runtime;
        }
    }

    /// Whether the agent knows the container's labels already.
    pub fn knows(&self, id: &str) -> bool {
        self.containers.contains_key(id)
    }

    /// Docker connected the container to network `net` with `addrs` (while starting).
    pub fn connected(&mut self, id: &str, net: &str, addrs: Vec<IpAddr>) {
        if let Some(c) = self.containers.get_mut(id) {
            c.addrs.insert(net.to_string(), addrs);
            // A new endpoint: a new veth, found again.
            c.ports_for.clear();
            c.ports_missing_since = None;
            c.starting_since.get_or_insert_with(Instant::now);
            c.pending_since = None;
        }
    }

    /// What the container's inspect says (`None`: it no longer exists).
    pub fn inspected(&mut self, id: &str, c: Option<&ContainerInspectResponse>) {
        use bollard::models::ContainerStateStatusEnum as S;
        let Some(c) = c else {
            self.containers.remove(id);
            return;
        };
        let labels: BTreeMap<String, String> = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.labels.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let name = c.name.clone().unwrap_or_default();
        if !self.knows(id) {
            self.created(id, &name, labels.clone(), false);
        }
        let status = c.state.as_ref().and_then(|s| s.status);
        let live = crate::desired::peer_of(c);
        let entry = self.containers.get_mut(id).expect("just inserted");
        entry.labels = labels;
        entry.name = name.trim_start_matches('/').to_string();
        match (live, status) {
            (Some(p), _) => {
                entry.addrs = p.endpoints.into_iter().collect();
                entry.starting_since = None;
                entry.pending_since = None;
            }
            // Docker is still starting it: the addresses its network gave stay.
            (None, Some(S::CREATED | S::RESTARTING))
                if entry
                    .starting_since
                    .is_some_and(|t| t.elapsed() < STARTING_GRACE) => {}
            (None, _) => {
                // Stopped: a restart policy may start it again at once.
                if !entry.addrs.is_empty() {
                    entry.pending_since = Some(Instant::now());
                }
                entry.addrs.clear();
                entry.starting_since = None;
                // Its next start makes a namespace and veths anew.
                entry.netns = None;
                entry.ports.clear();
                entry.ports_for.clear();
            }
        }
        // Never from its resolv.conf: the container can write that file.
        entry.dns = c
            .host_config
            .as_ref()
            .and_then(|h| h.dns.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| a.split('%').next()?.parse().ok())
            .collect();
        let netns = c
            .network_settings
            .as_ref()
            .and_then(|n| n.sandbox_key.clone())
            .filter(|k| !k.is_empty())
            .map(PathBuf::from);
        if netns.is_some() && netns != entry.netns {
            // Another namespace (found at `network connect`, or an earlier run's): its
            // veths are found again in Docker's.
            entry.ports_for.clear();
            entry.netns = netns;
        }
        let mode = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        entry.network_mode = unenforceable(&mode, &[]);
    }

    /// The container's networks that cannot be policed here (not of the `bridge` driver).
    pub fn set_drivers(&mut self, id: &str, drivers: &[String]) {
        if let Some(c) = self.containers.get_mut(id)
            && c.network_mode.is_none()
        {
            c.network_mode = unenforceable("", drivers);
        }
    }

    /// The container was removed: its runtime change goes too.
    pub fn destroyed(&mut self, id: &str) {
        self.containers.remove(id);
        if let Err(e) = self.store_runtime(id, None) {
            warn!(error = %format!("{e:#}"), "removing a runtime egress change");
        }
    }

    /// Containers not in `live` (running or paused) and not starting have no addresses any
    /// more; their labels stay known for their next start (until Docker removes them).
    pub fn retain(&mut self, live: &BTreeSet<String>) {
        for (id, c) in &mut self.containers {
            let starting = c
                .starting_since
                .is_some_and(|t| t.elapsed() < STARTING_GRACE);
            if !live.contains(id) && !starting {
                c.addrs.clear();
                c.starting_since = None;
                c.netns = None;
                c.ports.clear();
                c.ports_for.clear();
            }
        }
    }

    pub fn policy(&self, c: &Container) -> Policy {
        policy::policy_of(&self.config, &c.labels, c.runtime.as_ref())
    }

    /// Containers that may not reach the host or other containers: the socket layer must
    /// not connect them straight to a backend (Docker's path, where their policy applies).
    pub fn host_denied(&self) -> BTreeSet<String> {
        self.containers
            .iter()
            .filter(|(_, c)| !self.policy(c).host)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Addresses of the containers whose policy restricts anything.
    pub fn policed_addrs(&self) -> BTreeSet<IpAddr> {
        self.containers
            .values()
            .filter(|c| self.policy(c).restricts())
            .flat_map(Container::addresses)
            .collect()
    }

    /// Host names the policies name.
    fn wanted_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for c in self.containers.values() {
            for a in self.policy(c).allow {
                if let Target::Name(n) = a.target {
                    out.insert(n);
                }
            }
        }
        out
    }

    /// Names to look up now (new ones, or due); marked in flight. Names no policy uses any
    /// more are forgotten.
    pub fn due_names(&mut self) -> Vec<String> {
        let wanted = self.wanted_names();
        self.names.retain(|n, _| wanted.contains(n));
        let now = Instant::now();
        let mut due = Vec::new();
        for n in wanted {
            let e = self.names.entry(n.clone()).or_insert(Name {
                addrs: BTreeSet::new(),
                refresh_at: now,
                error: None,
                in_flight: false,
            });
            if !e.in_flight && e.refresh_at <= now {
                e.in_flight = true;
                due.push(n);
            }
        }
        due
    }

    /// A lookup given up on: tried again at once, in the background.
    pub fn retry_soon(&mut self, name: &str) {
        if let Some(e) = self.names.get_mut(name) {
            e.in_flight = false;
            e.refresh_at = Instant::now();
        }
    }

    /// When the next lookup is due.
    pub fn next_lookup(&self) -> Option<Instant> {
        self.names
            .values()
            .filter(|n| !n.in_flight)
            .map(|n| n.refresh_at)
            .min()
    }

    /// A lookup's result. Whether the addresses changed. A failure keeps the last addresses
    /// (and says so).
    pub fn resolved(&mut self, name: &str, r: Result<(BTreeSet<IpAddr>, Instant), String>) -> bool {
        let Some(e) = self.names.get_mut(name) else {
            return false;
        };
        e.in_flight = false;
        match r {
            Ok((addrs, at)) => {
                e.refresh_at = at;
                e.error = None;
                if e.addrs != addrs {
                    info!(name, addresses = ?addrs, "allow-list name resolved");
                    e.addrs = addrs;
                    return true;
                }
                false
            }
            Err(err) => {
                if e.error.as_deref() != Some(err.as_str()) {
                    warn!(name, error = %err, "cannot resolve an allow-list name; the rest of the allow-list applies");
                }
                e.error = Some(err);
                e.refresh_at = Instant::now() + dns::RETRY;
                false
            }
        }
    }

    /// Addresses of containers by name (for `container:NAME`).
    fn by_name(&self, name: &str) -> BTreeSet<IpAddr> {
        self.containers
            .values()
            .filter(|c| c.name == name)
            .flat_map(Container::addresses)
            .collect()
    }

    fn resolve_allow(&self, a: &Allow) -> BTreeSet<policy::Net> {
        match &a.target {
            Target::Net(n) => [*n].into(),
            Target::Name(n) => self
                .names
                .get(n)
                .map(|e| e.addrs.iter().map(|a| policy::Net::host(*a)).collect())
                .unwrap_or_default(),
            Target::Container(n) => self.by_name(n).into_iter().map(policy::Net::host).collect(),
        }
    }

    /// The table as the policies and Docker's state make it now.
    pub fn spec(&mut self) -> nft::Spec {
        let mut spec = nft::Spec {
            bridges: self.bridges.clone(),
            closed_internet: self.config.egress.internet == Some(false),
            closed_host: self.config.egress.host == Some(false),
            ..nft::Spec::default()
        };
        let host_dns = dns::host_resolvers();
        let mut errors = Vec::new();
        let mut admit = spec.closed_internet || spec.closed_host;
        spec.guard.gated = self.gating();
        spec.guard.known.clone_from(&self.outside_ports);
        for (id, c) in &self.containers {
            let addrs = c.addresses();
            spec.admitted.extend(addrs.iter().copied());
            if !addrs.is_empty() {
                spec.guard
                    .known
                    .extend(c.ports.iter().map(|p| p.host_ifname.clone()));
            }
            let p = self.policy(c);
            if let Some(e) = &p.error
                && c.logged_error.as_ref() != Some(e)
            {
                errors.push((id.clone(), e.clone()));
            }
            if !p.restricts() {
                continue;
            }
            // Its chains exist as long as the container does: a start or a stop only
            // changes the map elements that lead to them.
            admit = true;
            let allow = p
                .allow
                .iter()
                .map(|a| nft::Allowed {
                    nets: self.resolve_allow(a),
                    port: a.port,
                    proto: a.proto,
                })
                .filter(|a| !a.nets.is_empty())
                .collect();
            // A policy that cannot be read allows nothing, DNS included.
            let mut dns = BTreeSet::new();
            if p.error.is_none() {
                dns = dns::docker_resolvers(&c.dns, &self.daemon_dns, &host_dns);
            }
            if !c.ports.is_empty() && !addrs.is_empty() {
                let k = nft::key_of(id);
                for port in &c.ports {
                    spec.guard.ports.insert(port.host_ifname.clone(), k.clone());
                }
                spec.guard.senders.insert(
                    k,
                    guard::Sender {
                        macs: c.ports.iter().map(|p| p.mac).collect(),
                        addrs: addrs.clone(),
                        link_local: c
                            .ports
                            .iter()
                            .flat_map(|p| {
                                let own = p.addrs.iter().filter_map(|a| match a {
                                    IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(*v6),
                                    _ => None,
                                });
                                own.chain([guard::eui64_link_local(p.mac)])
                            })
                            .collect(),
                        host: p.host,
                    },
                );
            }
            spec.containers.insert(
                nft::key_of(id),
                nft::Chains {
                    addrs,
                    internet: p.internet,
                    host: p.host,
                    dns,
                    allow,
                },
            );
        }
        for (id, e) in errors {
            let c = self.containers.get_mut(&id).expect("listed above");
            warn!(container = %c.name, id = %nft::key_of(&id), error = %e, "egress policy cannot be read: the container gets no egress at all (fail closed)");
            c.logged_error = Some(e);
        }
        if !admit {
            spec.admitted.clear();
        }
        spec
    }

    /// When to look again for the veths of a container Docker is still setting up: every
    /// few milliseconds for [`PORTS_LOOKUP`] after the first try (its frames wait meanwhile
    /// while the gate holds).
    pub fn ports_retry_at(&self) -> Option<Instant> {
        self.containers
            .values()
            .filter(|c| !c.addresses().is_empty())
            .filter_map(|c| c.ports_missing_since)
            .filter(|t| t.elapsed() < PORTS_LOOKUP)
            .map(|_| Instant::now() + Duration::from_millis(5))
            .min()
    }

    /// Whether new veths wait until the agent has seen them: while a policed container
    /// exists (Docker may start it, restart it or connect it to a network at any time,
    /// however long after its `create`), or the host default closes.
    pub fn gating(&self) -> bool {
        self.config.egress.internet == Some(false)
            || self.config.egress.host == Some(false)
            || self
                .containers
                .values()
                .any(|c| c.network_mode.is_none() && self.policy(c).restricts())
    }

    /// Finds the bridge ports of every policed container whose addresses changed since
    /// they were last found: in its namespace (from its inspect), or, at `network connect`
    /// before its inspect answers, in the one of Docker's namespaces that holds its
    /// addresses.
    pub fn find_ports(&mut self) {
        let gating = self.gating();
        if !gating && !self.containers.values().any(|c| self.policy(c).restricts()) {
            return;
        }
        let host = match crate::endpoint::host_links() {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot list the host's interfaces");
                return;
            }
        };
        if gating {
            self.outside_ports = outside_ports(&self.bridges, &host, &self.netns_dir);
        }
        let names: BTreeSet<&str> = host.values().map(|l| l.name.as_str()).collect();
        // Found again: new addresses, or a veth that went (a restart that kept them).
        let want: Vec<String> = self
            .containers
            .iter()
            .filter(|(_, c)| {
                let a = c.addresses();
                !a.is_empty()
                    && (a != c.ports_for
                        || c.ports
                            .iter()
                            .any(|p| !names.contains(p.host_ifname.as_str())))
                    && (gating || self.policy(c).restricts())
            })
            .map(|(id, _)| id.clone())
            .collect();
        if want.is_empty() {
            return;
        }
        let claimed: BTreeSet<PathBuf> = self
            .containers
            .values()
            .filter_map(|c| c.netns.clone())
            .collect();
        for id in want {
            let c = self.containers.get_mut(&id).expect("listed above");
            let addrs = c.addresses();
            let found = match &c.netns {
                Some(ns) => crate::endpoint::ports(ns, &host).map(|p| (ns.clone(), p)),
                None => find_netns(&self.netns_dir, &host, &claimed, &addrs),
            };
            let error = match found {
                Ok((ns, ports)) if !ports.is_empty() => {
                    c.netns = Some(ns);
                    c.ports = ports;
                    c.ports_for = addrs;
                    None
                }
                Ok(_) => Some("no bridge port found for its addresses".to_string()),
                Err(e) => Some(format!("{e:#}")),
            };
            c.ports_missing_since = match &error {
                None => None,
                Some(_) => Some(c.ports_missing_since.unwrap_or_else(Instant::now)),
            };
            // Looked for again shortly (see `ports_retry_at`): said only once given up.
            let given_up = c
                .ports_missing_since
                .is_some_and(|t| t.elapsed() >= PORTS_LOOKUP);
            if let Some(e) = &error
                && given_up
                && c.ports_error.as_ref() != Some(e)
            {
                warn!(container = %c.name, error = %e, "cannot find a container's bridge ports: while a policy holds new veths back, its frames wait");
            }
            if error.is_none() || given_up {
                c.ports_error = error;
            }
        }
        self.early_ports(&host);
    }

    /// An unpoliced container Docker has connected but not started: its veth pair is still
    /// all in the host (Docker moves one end into its namespace at the start, and its
    /// process runs right after). When exactly one such container waits and exactly one
    /// such pair is on a Docker bridge, that pair is its own: its veth is let through at
    /// once instead of at its start. A policed container's never is (its frames wait for
    /// its port's chain).
    fn early_ports(&mut self, host: &crate::endpoint::HostLinks) {
        let waiting: Vec<String> = self
            .containers
            .iter()
            .filter(|(_, c)| {
                c.ports.is_empty()
                    && c.ports_missing_since.is_some()
                    && !c.addresses().is_empty()
                    && !self.policy(c).restricts()
            })
            .map(|(id, _)| id.clone())
            .collect();
        let [id] = waiting.as_slice() else {
            return;
        };
        let attributed: BTreeSet<&str> = self
            .containers
            .values()
            .flat_map(|c| c.ports.iter().map(|p| p.host_ifname.as_str()))
            .collect();
        let pairs: Vec<&str> = host
            .iter()
            .filter(|(index, l)| {
                l.name.starts_with("veth")
                    && !attributed.contains(l.name.as_str())
                    && l.master
                        .and_then(|m| host.get(&m))
                        .is_some_and(|b| self.bridges.contains(&b.name) || docker_named(&b.name))
                    && l.peer
                        .and_then(|p| host.get(&p))
                        .is_some_and(|peer| peer.peer == Some(**index) && peer.master.is_none())
            })
            .map(|(_, l)| l.name.as_str())
            .collect();
        if let [name] = pairs.as_slice() {
            let name = (*name).to_string();
            let c = self.containers.get_mut(id).expect("listed above");
            c.ports = vec![crate::endpoint::Port {
                host_ifname: name,
                mac: [0; 6],
                addrs: Vec::new(),
            }];
        }
    }

    /// Writes the table as [`Egress::spec`] says: only what changed, or the whole table in
    /// place the first time (and after a failure). Whether anything was written.
    pub fn apply(&mut self) -> Result<bool> {
        tokio::task::block_in_place(|| self.find_ports());
        let spec = self.spec();
        if !self.bridge_netfilter && spec.containers.values().any(|c| !c.host) {
            self.bridge_netfilter = enable_bridge_netfilter();
        }
        match tokio::task::block_in_place(|| self.written.apply(&spec, false))? {
            Applied::Unchanged => Ok(false),
            Applied::Written => {
                self.mark_enforced(&spec);
                Ok(true)
            }
        }
    }

    /// Notes when each container's policy came into force for its current addresses.
    fn mark_enforced(&mut self, spec: &nft::Spec) {
        let now = std::time::SystemTime::now();
        for (id, c) in &mut self.containers {
            if spec
                .containers
                .get(&nft::key_of(id))
                .is_some_and(|ch| !ch.addrs.is_empty())
            {
                c.enforced_at.get_or_insert(now);
            } else {
                c.enforced_at = None;
            }
        }
    }

    /// Whether the tables lost or gained a container's chains, or went, since they were
    /// written: then they are written whole again (or, if that fails, at the next apply).
    pub fn drifted(&mut self) -> bool {
        let r = tokio::task::block_in_place(|| self.written.repair());
        // The check follows a change: the drop counters are read with it.
        self.refresh_counters();
        match r {
            Ok(drifted) => drifted,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "restoring the egress table failed");
                self.written.forget();
                true
            }
        }
    }

    /// Forget what was applied: the next apply rewrites the table in place (repair).
    pub fn force(&mut self) {
        self.written.forget();
    }

    /// Lets new veths through while no agent runs (a stop, not a crash).
    pub fn open_gate(&mut self) -> Result<()> {
        if guard::read_back(&self.table).is_none() {
            return Ok(());
        }
        self.written.forget();
        Ok(crate::netfilter::nft::run(guard::open_gate(&self.table))?)
    }

    /// Removes the table.
    pub fn remove(&mut self) -> Result<()> {
        self.written.remove()
    }

    /// The container `key` names: an exact name or ID, else a unique ID prefix.
    pub fn find(&self, key: &str) -> Result<String, String> {
        let key = key.trim_start_matches('/');
        if let Some((id, _)) = self
            .containers
            .iter()
            .find(|(id, c)| c.name == key || *id == key)
        {
            return Ok(id.clone());
        }
        let hits: Vec<&String> = self
            .containers
            .keys()
            .filter(|id| !key.is_empty() && id.starts_with(key))
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("no running container {key:?} known to the agent")),
            _ => Err(format!("{key:?} names more than one container")),
        }
    }

    /// Applies a runtime change to container `id`: validated first (a bad entry changes
    /// nothing), stored, then enforced.
    pub fn change(&mut self, id: &str, ch: &dataplane_api::EgressChange) -> Result<(), String> {
        let c = self
            .containers
            .get(id)
            .ok_or_else(|| format!("no container {id}"))?;
        let mut layer = if ch.reset {
            Layer::default()
        } else {
            c.runtime.clone().unwrap_or_default()
        };
        if let Some(v) = ch.internet {
            layer.internet = Some(v);
        }
        if let Some(v) = ch.host {
            layer.host = Some(v);
        }
        if let Some(a) = &ch.allow {
            let mut list = Vec::new();
            for e in a.iter().flat_map(|e| e.split(',')) {
                if e.trim().is_empty() {
                    continue;
                }
                let parsed: Allow = e.parse().map_err(|err| format!("allow: {err}"))?;
                list.push(parsed.to_string());
            }
            layer.allow = Some(list);
        }
        let layer = (layer != Layer::default()).then_some(layer);
        self.store_runtime(id, layer.as_ref())
            .map_err(|e| format!("{e:#}"))?;
        self.containers.get_mut(id).expect("checked").runtime = layer;
        Ok(())
    }

    /// Each known container's drop-counter key (in the table) and name, for the metrics.
    pub fn counter_names(&self) -> BTreeMap<String, String> {
        self.containers
            .iter()
            .map(|(id, c)| {
                let name = if c.name.is_empty() {
                    id.chars().take(12).collect()
                } else {
                    c.name.trim_start_matches('/').to_string()
                };
                (nft::key_of(id), name)
            })
            .collect()
    }

    /// What `bridge-ctl egress show` shows, with the drop counters read from the kernel.
    pub fn views(&self, only: Option<&str>) -> Vec<dataplane_api::Egress> {
        let at = Instant::now();
        let (counters, l2) = tokio::task::block_in_place(|| {
            (nft::read_back(&self.table), guard::read_back(&self.table))
        });
        self.store_counters(
            at,
            counters.as_ref().map(|(_, c)| c),
            l2.as_ref().map(|(_, c)| c),
        );
        let counters = counters.map(|(_, c)| c).unwrap_or_default();
        let l2 = l2.map(|(_, c)| c).unwrap_or_default();
        let l2_of = |name: String| l2.get(&name).copied().unwrap_or(0);
        let mut out = Vec::new();
        for (id, c) in &self.containers {
            if only.is_some_and(|o| o != id) {
                continue;
            }
            let p = self.policy(c);
            let mut resolved = BTreeMap::new();
            for a in &p.allow {
                let (key, text) = match &a.target {
                    Target::Net(_) => continue,
                    Target::Name(n) => (
                        n.clone(),
                        match self.names.get(n) {
                            Some(e) if !e.addrs.is_empty() => {
                                let mut t = join(&e.addrs);
                                if let Some(err) = &e.error {
                                    let _ = write!(t, " (stale: {err})");
                                }
                                t
                            }
                            Some(Name {
                                error: Some(err), ..
                            }) => format!("error: {err}"),
                            _ => "resolving".into(),
                        },
                    ),
                    Target::Container(n) => {
                        let addrs = self.by_name(n);
                        (
                            format!("container:{n}"),
                            if addrs.is_empty() {
                                "error: no such running container".into()
                            } else {
                                join(&addrs)
                            },
                        )
                    }
                };
                resolved.insert(key, text);
            }
            out.push(dataplane_api::Egress {
                container: c.name.clone(),
                container_id: id.chars().take(12).collect(),
                internet: p.internet,
                host: p.host,
                allow: p.allow.iter().map(ToString::to_string).collect(),
                resolved,
                addresses: c.addresses().iter().map(ToString::to_string).collect(),
                runtime_change: c.runtime.is_some(),
                error: p.error.clone(),
                dropped_packets: counters.get(&nft::key_of(id)).copied().unwrap_or(0)
                    + l2_of(guard::l2_counter(&nft::key_of(id))),
                spoofed_packets: l2_of(guard::spoof_counter(&nft::key_of(id))),
                ports: if p.restricts() {
                    c.ports.iter().map(|p| p.host_ifname.clone()).collect()
                } else {
                    Vec::new()
                },
                not_enforceable: c
                    .network_mode
                    .clone()
                    .filter(|m| !m.starts_with("container:")),
                policy_of: c
                    .network_mode
                    .as_deref()
                    .and_then(|m| m.strip_prefix("container:"))
                    .map(|x| match self.containers.get(x) {
                        Some(o) if !o.name.is_empty() => o.name.clone(),
                        _ => x.to_string(),
                    }),
                enforced_unix_us: c
                    .enforced_at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0)),
            });
        }
        out
    }
}

/// The drop counters of one reading of the inet table's (`inet`, by key) and the bridge
/// table's (`bridge`, by counter name): a container's drops of both under its key, its
/// spoofed frames under [`guard::spoof_counter`].
fn drop_counters(
    inet: Option<&BTreeMap<String, u64>>,
    bridge: Option<&BTreeMap<String, u64>>,
) -> BTreeMap<String, u64> {
    let mut c = inet.cloned().unwrap_or_default();
    for (name, n) in bridge.into_iter().flatten() {
        if let Some(k) = name.strip_prefix("l_") {
            *c.entry(k.to_string()).or_default() += n;
        } else {
            c.insert(name.clone(), *n);
        }
    }
    c
}

fn join(a: &BTreeSet<IpAddr>) -> String {
    a.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Labels from an event's attributes (Docker puts a container's labels there, beside
/// `image` and `name`).
pub fn labels_of_event<S: std::hash::BuildHasher>(
    attrs: &std::collections::HashMap<String, String, S>,
) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter(|(k, _)| k.starts_with("dataplane."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(config: &str) -> Egress {
        Egress::new(
            "t",
            Config::parse(config).unwrap(),
            None,
            Vec::new(),
            std::path::Path::new("/nonexistent"),
        )
    }

    #[test]
    fn drops_of_both_tables_add_up_by_key_and_spoofed_frames_stay_apart() {
        let inet: BTreeMap<String, u64> = [("k".into(), 3), ("m".into(), 1)].into();
        let bridge: BTreeMap<String, u64> = [
            (guard::l2_counter("k"), 2),
            (guard::spoof_counter("k"), 5),
            (guard::l2_counter("j"), 4),
        ]
        .into();
        let c = drop_counters(Some(&inet), Some(&bridge));
        assert_eq!(c.get("k"), Some(&5));
        assert_eq!(c.get("m"), Some(&1));
        assert_eq!(c.get("j"), Some(&4));
        assert_eq!(c.get(&guard::spoof_counter("k")), Some(&5));
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(drop_counters(None, Some(&bridge)).get("k"), Some(&2));
        assert!(drop_counters(None, None).is_empty());
    }

    #[test]
    fn a_counters_refresh_stores_none_for_an_empty_table_and_waits_after_a_reading() {
        let handle = crate::status::EgressCountersHandle::default();
        let old = Instant::now().checked_sub(COUNTERS_INTERVAL).unwrap();
        handle.lock().unwrap().update(old, [("k".into(), 9)].into());
        let mut e = egress("").with_counters(handle.clone());
        // Nothing written yet: the last reading stays.
        e.refresh_counters();
        assert_eq!(handle.lock().unwrap().read_at(), Some(old));
        // Written with no container: no counters, stored without a reading of the kernel.
        e.written.assume_applied(nft::Spec::default());
        e.refresh_counters();
        assert!(handle.lock().unwrap().drops().is_empty());
        assert!(handle.lock().unwrap().read_at() > Some(old));
        // A reading taken just now (a table check): the next refresh waits.
        let now = Instant::now();
        handle
            .lock()
            .unwrap()
            .update(now, [("k".into(), 10)].into());
        e.refresh_counters();
        assert_eq!(handle.lock().unwrap().read_at(), Some(now));
        assert_eq!(handle.lock().unwrap().drops().get("k"), Some(&10));
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_policed_container_is_in_the_table_from_its_network_connect() {
        let mut e = egress("");
        e.bridges = ["docker0".to_string()].into();
        e.created(
            "aaaa1111",
            "/web",
            labels(&[
                ("dataplane.egress.internet", "false"),
                ("dataplane.egress.allow", "container:db:5432,remote.test:80"),
            ]),
            true,
        );
        e.created("bbbb2222", "db", labels(&[]), true);
        // Known, not connected yet: its chains are ready, reached by no address yet, and
        // the bridges are gated until it is.
        let spec = e.spec();
        assert!(spec.containers["aaaa1111"].addrs.is_empty());
        assert!(spec.guard.gated);
        e.connected("aaaa1111", "net1", vec![ip("172.18.0.2")]);
        e.connected("bbbb2222", "net1", vec![ip("172.18.0.3")]);
        let spec = e.spec();
        // Only the policed one gets chains; the unpoliced one is admitted.
        assert_eq!(spec.containers.len(), 1);
        assert!(
            spec.guard.gated,
            "gated as long as a policed container exists: it may restart or connect anew"
        );
        assert_eq!(spec.admitted.len(), 2);
        let c = &spec.containers["aaaa1111"];
        assert!(!c.internet && c.host);
        // The container name resolves to its address; the host name is not resolved yet
        // (nothing allowed for it, the rest is).
        assert_eq!(c.allow.len(), 1);
        assert!(
            c.allow[0]
                .nets
                .contains(&policy::Net::host(ip("172.18.0.3")))
        );
        assert_eq!(e.due_names(), vec!["remote.test".to_string()]);
        assert!(e.due_names().is_empty(), "in flight");
        let at = Instant::now() + Duration::from_secs(8);
        assert!(e.resolved("remote.test", Ok(([ip("198.51.100.2")].into(), at))));
        let c = e.spec().containers["aaaa1111"].clone();
        assert_eq!(c.allow.len(), 2);
        // A changed record changes the policy; a failed lookup keeps the last one.
        assert!(e.resolved("remote.test", Ok(([ip("198.51.100.3")].into(), at))));
        assert!(!e.resolved("remote.test", Err("timed out".into())));
        let c = e.spec().containers["aaaa1111"].clone();
        assert!(
            c.allow
                .iter()
                .any(|a| a.nets.contains(&policy::Net::host(ip("198.51.100.3"))))
        );
        assert!(e.views(None)[0].resolved["remote.test"].contains("stale"));
        // Stopped: gone from the table.
        e.retain(&BTreeSet::new());
        assert_eq!(e.spec().containers.len(), 1, "still starting: kept");
        e.containers.get_mut("aaaa1111").unwrap().starting_since = None;
        e.retain(&BTreeSet::new());
        let spec = e.spec();
        assert!(
            spec.containers["aaaa1111"].addrs.is_empty(),
            "no address leads to it"
        );
        assert!(
            e.knows("aaaa1111"),
            "its labels stay known for its next start"
        );
        e.destroyed("aaaa1111");
        assert!(e.spec().containers.is_empty(), "removed: its chains go");
    }

    #[test]
    fn docker_bridges_by_name_and_what_cannot_be_policed() {
        assert!(docker_named("docker0") && docker_named("br-0123456789ab"));
        assert!(!docker_named("br-lan") && !docker_named("lxcbr0"));
        assert!(unenforceable("host", &[]).is_some_and(|m| m.contains("host")));
        assert_eq!(
            unenforceable("container:db", &[]).as_deref(),
            Some("container:db")
        );
        assert!(unenforceable("", &["macvlan".into()]).is_some_and(|m| m.contains("macvlan")));
        assert_eq!(unenforceable("bridge", &["bridge".into()]), None);
    }

    #[test]
    fn gated_while_any_policed_container_exists_and_not_otherwise() {
        let mut e = egress("");
        e.created("aaaa", "a", labels(&[]), false);
        assert!(
            !e.gating() && !e.spec().guard.gated,
            "nothing policed: nothing held"
        );
        e.created(
            "bbbb",
            "b",
            labels(&[("dataplane.egress.host", "false")]),
            false,
        );
        assert!(
            e.gating(),
            "a stopped policed container holds new veths back"
        );
        e.destroyed("bbbb");
        assert!(!e.gating());
        let closed = egress("[egress]\ninternet = false\n");
        assert!(closed.gating());
    }

    #[test]
    fn host_off_keeps_it_from_the_socket_layer_and_a_closed_default_admits() {
        let mut e = egress("[egress]\ninternet = false\n");
        e.created(
            "aaaa",
            "a",
            labels(&[("dataplane.egress.host", "false")]),
            true,
        );
        e.created(
            "bbbb",
            "b",
            labels(&[("dataplane.egress.internet", "true")]),
            true,
        );
        e.connected("aaaa", "n", vec![ip("172.17.0.2")]);
        e.connected("bbbb", "n", vec![ip("172.17.0.3")]);
        assert_eq!(e.host_denied(), ["aaaa".to_string()].into());
        let spec = e.spec();
        assert!(spec.closed_internet);
        assert_eq!(spec.admitted.len(), 2);
        assert_eq!(spec.containers.len(), 1, "b is open by its label");
    }

    #[test]
    fn a_malformed_label_fails_closed_and_a_bad_change_changes_nothing() {
        let mut e = egress("");
        e.created(
            "aaaa",
            "a",
            labels(&[("dataplane.egress.allow", "10.0.0.0/99")]),
            true,
        );
        e.connected("aaaa", "n", vec![ip("172.17.0.2")]);
        let c = e.spec().containers["aaaa"].clone();
        assert!(!c.internet && !c.host && c.allow.is_empty());
        assert!(
            e.views(None)[0]
                .error
                .as_deref()
                .unwrap()
                .contains("10.0.0.0/99")
        );
        let bad = dataplane_api::EgressChange {
            container: "a".into(),
            internet: Some(true),
            allow: Some(vec!["nope nope".into()]),
            ..Default::default()
        };
        assert!(e.change("aaaa", &bad).unwrap_err().contains("nope"));
        assert!(e.containers["aaaa"].runtime.is_none());
        // A runtime allow-list replaces the malformed label's.
        let good = dataplane_api::EgressChange {
            container: "a".into(),
            internet: Some(false),
            host: Some(true),
            allow: Some(vec!["10.0.0.0/8,192.0.2.1:53/udp".into()]),
            ..Default::default()
        };
        e.change("aaaa", &good).unwrap();
        let v = &e.views(None)[0];
        assert!(v.error.is_none() && v.runtime_change && v.host && !v.internet);
        assert_eq!(v.allow.len(), 2);
        assert_eq!(e.find("a").unwrap(), "aaaa");
        assert_eq!(e.find("aa").unwrap(), "aaaa");
        assert!(e.find("zz").is_err());
    }
}
