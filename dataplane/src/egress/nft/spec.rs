//! What the egress table holds: the policed containers' chains, the admitted addresses, the
//! guard of the bridge ports.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::egress::{guard::Guard, policy::Net};

/// One resolved allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allowed {
    pub nets: BTreeSet<Net>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
}

/// One policed container, as its chains enforce it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chains {
    /// Its addresses: the keys it is found by.
    pub addrs: BTreeSet<IpAddr>,
    pub internet: bool,
    pub host: bool,
    /// Its resolvers (DNS to them stays allowed).
    pub dns: BTreeSet<IpAddr>,
    pub allow: Vec<Allowed>,
}

/// The whole table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// Docker's bridge interfaces.
    pub bridges: BTreeSet<String>,
    /// The host default closes the internet (host): a container the agent has not admitted
    /// sends nothing out of the host (nothing at all).
    pub closed_internet: bool,
    pub closed_host: bool,
    /// Addresses of every container the agent has seen (with a closed default, or while
    /// any container is policed).
    pub admitted: BTreeSet<IpAddr>,
    /// Policed containers by key (a prefix of the container ID).
    pub containers: BTreeMap<String, Chains>,
    /// Their bridge ports and what may pass them (the `bridge` table of the same name).
    pub guard: Guard,
}

/// The key a container's chains are named by.
pub fn key_of(id: &str) -> String {
    id.chars().take(16).collect()
}

/// The name of a container's drop counter.
pub fn counter_name(k: &str) -> String {
    format!("d_{k}")
}
