//! The maps: a handle on each for the agent, and the per-frontend and global counters.

use std::{collections::BTreeMap, os::fd::AsFd};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use dataplane_common::{
    Addr, Backend, Config, FrontendKey, LocalAddr, MAP_CONFIG, MAP_FE_STATS, MAP_FRONTENDS,
    MAP_LOCAL_ADDRS, MAP_PEER_NETS, MAP_PORTS, MAP_SOCK_REV, MAP_STATS, PeerNet, PeerNetKey,
    PortFamilies, PortKey, STATS_LEN,
};

use super::{Loaded, kv::BpfHash};

/// The map behind an [`aya::maps::Map`] of the kinds the programs use.
fn map_data(m: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map as M;
    match m {
        M::Array(d)
        | M::HashMap(d)
        | M::LruHashMap(d)
        | M::PerCpuArray(d)
        | M::PerCpuHashMap(d)
        | M::SkStorage(d)
        | M::SockMap(d) => Some(d),
        _ => None,
    }
}

impl Loaded {
    /// The map named `name`, one of [`MAPS`](super::MAPS).
    pub(super) fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.maps
            .get(name)
            .with_context(|| format!("map {name} missing"))
    }

    /// The map named `name`, to write to.
    pub(super) fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.maps
            .get_mut(name)
            .with_context(|| format!("map {name} missing"))
    }

    /// A descriptor of the socket-storage map where the programs record each translated
    /// socket's backend (for `sock_diag`, see [`crate::apply::sockets`]).
    pub fn translations_fd(&self) -> Result<std::os::fd::OwnedFd> {
        match self.maps.get(MAP_SOCK_REV) {
            Some(aya::maps::Map::SkStorage(m)) => Ok(m
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the translations map's descriptor")?),
            _ => bail!("the translations map {MAP_SOCK_REV} is missing or not socket storage"),
        }
    }

    /// A duplicate descriptor of every map of the object, by name (for reading at scrape
    /// time, beside the agent's own handles).
    pub fn map_fds(&self) -> Result<Vec<(String, std::os::fd::OwnedFd)>> {
        let mut out = Vec::new();
        for (name, m) in &self.maps {
            if let Some(d) = map_data(m) {
                out.push((
                    name.to_string(),
                    d.fd()
                        .as_fd()
                        .try_clone_to_owned()
                        .with_context(|| format!("duplicating the descriptor of {name}"))?,
                ));
            }
        }
        Ok(out)
    }

    pub fn pkt_endpoints(
        &mut self,
    ) -> Result<BpfHash<'_, Addr, dataplane_common::pkt::PktEndpoint>> {
        Ok(BpfHash(HashMap::try_from(
            self.map_mut(dataplane_common::pkt::MAP_PKT_EP)?,
        )?))
    }

    /// The packet layer's client allow-list.
    pub fn pkt_allow(&mut self) -> Result<aya::maps::LpmTrie<&mut MapData, Addr, u8>> {
        Ok(aya::maps::LpmTrie::try_from(
            self.map_mut(dataplane_common::pkt::MAP_PKT_ALLOW)?,
        )?)
    }

    /// The packet layer's flows.
    pub fn pkt_flows(
        &mut self,
    ) -> Result<HashMap<&mut MapData, dataplane_common::pkt::FlowKey, dataplane_common::pkt::Flow>>
    {
        Ok(HashMap::try_from(
            self.map_mut(dataplane_common::pkt::MAP_FLOWS)?,
        )?)
    }

    pub fn peer_nets(&mut self) -> Result<BpfHash<'_, PeerNetKey, PeerNet>> {
        let map = self.map_mut(MAP_PEER_NETS)?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut arr: Array<&mut MapData, Config> = Array::try_from(self.map_mut(MAP_CONFIG)?)?;
        arr.set(0, cfg, 0).context("writing the config map")?;
        Ok(())
    }

    pub fn frontends_map(&mut self) -> Result<BpfHash<'_, FrontendKey, Backend>> {
        let map = self.map_mut(MAP_FRONTENDS)?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    pub fn local_addrs(&mut self) -> Result<BpfHash<'_, Addr, LocalAddr>> {
        let map = self.map_mut(MAP_LOCAL_ADDRS)?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    pub fn ports_map(&mut self) -> Result<BpfHash<'_, PortKey, PortFamilies>> {
        let map = self.map_mut(MAP_PORTS)?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    /// Makes the per-frontend counters exist for exactly `ids` (new ones at zero, existing
    /// ones kept), and returns each one's total over CPUs.
    pub fn frontend_counters(
        &mut self,
        ids: &std::collections::BTreeSet<u32>,
    ) -> Result<BTreeMap<u32, u64>> {
        let map = self.map_mut(MAP_FE_STATS)?;
        let mut m: PerCpuHashMap<&mut MapData, u32, u64> = PerCpuHashMap::try_from(map)?;
        let have: std::collections::BTreeSet<u32> = m.keys().collect::<Result<_, _>>()?;
        for id in &have {
            if !ids.contains(id) {
                m.remove(id)?;
            }
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut out = BTreeMap::new();
        for id in ids {
            if !have.contains(id) {
                m.insert(id, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
            }
            out.insert(*id, m.get(id, 0)?.iter().sum());
        }
        Ok(out)
    }

    /// The stats counters summed over CPUs, indexed by `STAT_*`.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_STATS)?)?;
        (0..STATS_LEN)
            .map(|i| Ok(arr.get(&i, 0)?.iter().sum()))
            .collect()
    }
}
