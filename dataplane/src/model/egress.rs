//! What the agent knows of one container for its egress policy (part of its record).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::Instant,
};

use crate::egress::policy::Layer;

/// What the agent knows of one container, for its policy: its labels and runtime change,
/// its addresses, resolvers, namespace and bridge ports.
#[derive(Clone, Debug, Default)]
pub struct EgressRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub runtime: Option<Layer>,
    /// Its addresses per Docker network.
    pub addrs: BTreeMap<String, Vec<IpAddr>>,
    /// Resolvers Docker gives it (`--dns`, from its inspect; else the daemon's and the
    /// host's: see `egress::dns::docker_resolvers`).
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

impl EgressRecord {
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.addrs.values().flatten().copied().collect()
    }
}
