//! The bridge ports behind each policed container's veths (read from its namespace and the host's links), which the guard chains key on.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tracing::warn;

use super::{
    Egress, PORTS_LOOKUP,
    records::{Policies, PoliciesMut, Records},
};

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
pub(super) fn docker_named(bridge: &str) -> bool {
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

impl Egress {
    /// Finds the bridge ports of every policed container whose addresses changed since
    /// they were last found: in its namespace (from its inspect), or, at `network connect`
    /// before its inspect answers, in the one of Docker's namespaces that holds its
    /// addresses.
    pub fn find_ports(&mut self, cs: &mut Records) {
        let mut containers = PoliciesMut(cs);
        let gating = self.gating(containers.read());
        if !gating && !containers.values().any(|c| self.policy(c).restricts()) {
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
        let want: Vec<String> = containers
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
            .map(|(id, _)| id.to_string())
            .collect();
        if want.is_empty() {
            return;
        }
        let claimed: BTreeSet<PathBuf> = containers
            .values()
            .filter_map(|c| c.netns.clone())
            .collect();
        for id in want {
            let c = containers.get_mut(&id).expect("listed above");
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
        self.early_ports(containers.0, &host);
    }

    /// An unpoliced container Docker has connected but not started: its veth pair is still
    /// all in the host (Docker moves one end into its namespace at the start, and its
    /// process runs right after). When exactly one such container waits and exactly one
    /// such pair is on a Docker bridge, that pair is its own: its veth is let through at
    /// once instead of at its start. A policed container's never is (its frames wait for
    /// its port's chain).
    pub(super) fn early_ports(&mut self, cs: &mut Records, host: &crate::endpoint::HostLinks) {
        let mut containers = PoliciesMut(cs);
        let waiting: Vec<String> = containers
            .iter()
            .filter(|(_, c)| {
                c.ports.is_empty()
                    && c.ports_missing_since.is_some()
                    && !c.addresses().is_empty()
                    && !self.policy(c).restricts()
            })
            .map(|(id, _)| id.to_string())
            .collect();
        let [id] = waiting.as_slice() else {
            return;
        };
        let attributed: BTreeSet<&str> = containers
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
            let c = containers.get_mut(id).expect("listed above");
            c.ports = vec![crate::endpoint::Port {
                host_ifname: name,
                mac: [0; 6],
                addrs: Vec::new(),
            }];
        }
    }

    /// When to look again for the veths of a container Docker is still setting up: every
    /// few milliseconds for [`PORTS_LOOKUP`] after the first try (its frames wait meanwhile
    /// while the gate holds).
    pub fn ports_retry_at(&self, containers: Policies<'_>) -> Option<Instant> {
        containers
            .values()
            .filter(|c| !c.addresses().is_empty())
            .filter_map(|c| c.ports_missing_since)
            .filter(|t| t.elapsed() < PORTS_LOOKUP)
            .map(|_| Instant::now() + Duration::from_millis(5))
            .min()
    }
}
