//! What a stopping agent knew of Docker's containers, for the next start: each running
//! container's inspect, with what says it still holds. A restart then lists the containers
//! (one request) and inspects only those that changed, instead of every one.
//!
//! An entry is taken only while three things are as they were: the container's state
//! (running or paused), its endpoint on each network (Docker makes a new endpoint at every
//! start and connect, so a restart, a connect or a disconnect changes it) with its addresses,
//! and its network namespace (the inode behind `/proc/<pid>/ns/net`: a container whose
//! process was replaced has a new one). The file is read once and removed; a full resync
//! follows the start and replaces every entry with a fresh inspect.
//!
//! It also keeps what the host's firewall was found to do, with the nftables ruleset
//! generation it was found at: while the generation is the same (and no legacy iptables
//! table is in use), the ruleset is the same, and the start need not wait for `nft` to list
//! it (it is read again right after).

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
};

use anyhow::{Context, Result};
use bollard::models::{ContainerInspectResponse, ContainerSummary, EndpointSettings};
use serde::{Deserialize, Serialize};

use crate::hostfw::HostFirewall;

/// What a container's inspect is valid for: its state, and per network (by name) the
/// network, the endpoint and the addresses.
pub fn fingerprint<'a>(
    state: &str,
    networks: impl IntoIterator<Item = (&'a String, &'a EndpointSettings)>,
) -> String {
    let mut nets: Vec<String> = networks
        .into_iter()
        .map(|(name, e)| {
            format!(
                "{name}={}/{}/{}/{}/{}",
                e.network_id.as_deref().unwrap_or(""),
                e.endpoint_id.as_deref().unwrap_or(""),
                e.ip_address.as_deref().unwrap_or(""),
                e.global_ipv6_address.as_deref().unwrap_or(""),
                e.mac_address.as_deref().unwrap_or(""),
            )
        })
        .collect();
    nets.sort();
    format!("{state};{}", nets.join(";"))
}

/// The fingerprint of a container as Docker lists it.
pub fn of_summary(c: &ContainerSummary) -> String {
    fingerprint(
        &c.state.map(|s| s.to_string()).unwrap_or_default(),
        c.network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .into_iter()
            .flatten(),
    )
}

/// The fingerprint of a container as Docker inspects it.
pub fn of_inspect(c: &ContainerInspectResponse) -> String {
    fingerprint(
        &c.state
            .as_ref()
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default(),
        c.network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .into_iter()
            .flatten(),
    )
}

/// The inode of the network namespace of `pid`.
fn netns_ino(pid: i64) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

fn pid_of(c: &ContainerInspectResponse) -> Option<i64> {
    c.state.as_ref().and_then(|s| s.pid).filter(|p| *p > 0)
}

#[derive(Serialize, Deserialize)]
struct Entry {
    fingerprint: String,
    netns_ino: u64,
    inspect: ContainerInspectResponse,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    /// The agent version that wrote it: another version's file is not read.
    version: String,
    containers: BTreeMap<String, Entry>,
    /// The ruleset generation and what the firewall was found to do at it.
    firewall: Option<(u32, HostFirewall)>,
}

/// What the last agent left, read once.
#[derive(Default)]
pub struct Left {
    containers: BTreeMap<String, Entry>,
    firewall: Option<(u32, HostFirewall)>,
}

impl Left {
    /// The inspects still valid for the containers as Docker lists them now (`listed`: id
    /// and fingerprint).
    pub fn containers(
        &mut self,
        listed: &[(String, String)],
    ) -> BTreeMap<String, ContainerInspectResponse> {
        let mut out = BTreeMap::new();
        for (id, fp) in listed {
            let Some(e) = self.containers.remove(id) else {
                continue;
            };
            if &e.fingerprint == fp && pid_of(&e.inspect).and_then(netns_ino) == Some(e.netns_ino) {
                out.insert(id.clone(), e.inspect);
            }
        }
        out
    }

    /// What the firewall was found to do, if the ruleset is still the one it was found in.
    pub fn firewall(&self) -> Option<HostFirewall> {
        let (generation, fw) = self.firewall.as_ref()?;
        (!crate::hostfw::legacy_filter_in_use()
            && crate::netfilter::changes::generation().ok() == Some(*generation))
        .then(|| fw.clone())
    }
}

/// Writes the inspects of the running containers among `inspected` to `path` (mode 0600,
/// replaced atomically), with what the firewall was found to do (`firewall`) at the
/// ruleset's generation now.
pub fn save<'a>(
    path: &Path,
    inspected: impl IntoIterator<Item = (&'a str, &'a ContainerInspectResponse)>,
    firewall: &HostFirewall,
) -> Result<usize> {
    let firewall = if crate::hostfw::legacy_filter_in_use() {
        None
    } else {
        crate::netfilter::changes::generation()
            .ok()
            .map(|g| (g, firewall.clone()))
    };
    let mut file = File {
        version: env!("CARGO_PKG_VERSION").to_string(),
        containers: BTreeMap::new(),
        firewall,
    };
    for (id, c) in inspected {
        let fp = of_inspect(c);
        if !(fp.starts_with("running;") || fp.starts_with("paused;")) {
            continue;
        }
        let Some(ino) = pid_of(c).and_then(netns_ino) else {
            continue;
        };
        file.containers.insert(
            id.to_string(),
            Entry {
                fingerprint: fp,
                netns_ino: ino,
                inspect: c.clone(),
            },
        );
    }
    let tmp = path.with_extension("tmp");
    // A new file, never through a link someone left at that name.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    serde_json::to_writer(&mut f, &file).context("encoding the container cache")?;
    f.flush()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(file.containers.len())
}

/// Reads and removes the file at `path`. A file that is missing, not the agent's own
/// (owned by another user, or writable by others) or of another version gives nothing.
pub fn take(path: &Path) -> Left {
    let out = Left::default();
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return out;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let trusted = meta.is_file() && meta.uid() == me && meta.mode() & 0o022 == 0;
    let data = std::fs::read(path);
    let _ = std::fs::remove_file(path);
    if !trusted {
        tracing::warn!(path = %path.display(), "container cache not the agent's own: ignored");
        return out;
    }
    let Ok(file) = data
        .ok()
        .and_then(|d| serde_json::from_slice::<File>(&d).ok())
        .ok_or(())
    else {
        return out;
    };
    if file.version != env!("CARGO_PKG_VERSION") {
        return out;
    }
    Left {
        containers: file.containers,
        firewall: file.firewall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerState, ContainerStateStatusEnum, NetworkSettings};

    fn inspect(
        pid: i64,
        endpoint: &str,
        status: ContainerStateStatusEnum,
    ) -> ContainerInspectResponse {
        let mut nets = std::collections::HashMap::new();
        nets.insert(
            "bridge".to_string(),
            EndpointSettings {
                network_id: Some("n1".into()),
                endpoint_id: Some(endpoint.into()),
                ip_address: Some("172.17.0.2".into()),
                ..Default::default()
            },
        );
        ContainerInspectResponse {
            id: Some("c1".into()),
            state: Some(ContainerState {
                status: Some(status),
                pid: Some(pid),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(nets),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn entries_hold_while_state_endpoint_and_namespace_hold() {
        let dir = std::env::temp_dir().join(format!("dp-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("containers.json");
        // Our own process stands in for the container: its namespace is real.
        let me = i64::from(std::process::id());
        let c = inspect(me, "e1", ContainerStateStatusEnum::RUNNING);
        let fp = of_inspect(&c);
        let mut all = BTreeMap::new();
        all.insert("c1".to_string(), c.clone());
        all.insert(
            "dead".to_string(),
            inspect(me, "e9", ContainerStateStatusEnum::EXITED),
        );
        assert_eq!(
            save(
                &path,
                all.iter().map(|(k, v)| (k.as_str(), v)),
                &HostFirewall::default()
            )
            .unwrap(),
            1,
            "only running ones are kept"
        );
        let got = take(&path).containers(&[("c1".into(), fp.clone())]);
        assert_eq!(got.len(), 1);
        assert!(!path.exists(), "read once");

        // A new endpoint (a restart), a pause, or the file gone: nothing.
        save(
            &path,
            all.iter().map(|(k, v)| (k.as_str(), v)),
            &HostFirewall::default(),
        )
        .unwrap();
        let restarted = of_inspect(&inspect(me, "e2", ContainerStateStatusEnum::RUNNING));
        assert!(
            take(&path)
                .containers(&[("c1".into(), restarted)])
                .is_empty()
        );
        save(
            &path,
            all.iter().map(|(k, v)| (k.as_str(), v)),
            &HostFirewall::default(),
        )
        .unwrap();
        let paused = of_inspect(&inspect(me, "e1", ContainerStateStatusEnum::PAUSED));
        assert!(take(&path).containers(&[("c1".into(), paused)]).is_empty());
        assert!(
            take(&path)
                .containers(&[("c1".into(), fp.clone())])
                .is_empty()
        );

        // Writable by others: not trusted.
        save(
            &path,
            all.iter().map(|(k, v)| (k.as_str(), v)),
            &HostFirewall::default(),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        assert!(take(&path).containers(&[("c1".into(), fp)]).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn list_and_inspect_agree() {
        let c = inspect(1, "e1", ContainerStateStatusEnum::RUNNING);
        let s = ContainerSummary {
            state: Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
            network_settings: Some(bollard::models::ContainerSummaryNetworkSettings {
                networks: c.network_settings.as_ref().unwrap().networks.clone(),
            }),
            ..Default::default()
        };
        assert_eq!(of_summary(&s), of_inspect(&c));
        assert!(of_summary(&s).starts_with("running;bridge=n1/e1/172.17.0.2"));
    }
}
