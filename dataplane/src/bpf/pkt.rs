//! The packet layer's programs ([`PacketPrograms`]): loaded from the same object as the
//! socket hooks, with maps of their own instance, and run on synthetic packets with
//! `BPF_PROG_TEST_RUN`. Nothing here attaches them to an interface yet.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, SockMap, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use dataplane_common::{
    Addr, Backend, FrontendKey, LocalAddr, MAP_AGENT, MAP_FRONTENDS, MAP_LOCAL_ADDRS, MAP_PORTS,
    PortFamilies, PortKey,
    pkt::{Flow, FlowKey, MAP_FLOWS, MAP_PKT_ALLOW, MAP_PKT_EP, PktEndpoint},
};

use super::{kv::BpfHash, object::OBJECT};
use crate::apply::reconcile::KvStore;

/// The forward program (TC ingress of a host uplink) and the reply program (TC ingress of a
/// container's host-side veth).
pub const FORWARD: &str = "dp_tc_uplink_in";
pub const REPLY: &str = "dp_tc_veth_in";

/// The agent's packet programs: in the object it loaded, or opened from their pins (a
/// restart that took this build's programs as they were).
pub enum Programs {
    Loaded,
    Pinned(Box<[SchedClassifier; 2]>),
}

/// Where program `name` is pinned under the pin directory.
fn prog_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("prog_{name}"))
}

/// What pins of the packet layer start with: its programs, and its links
/// (`link_tc_<ifindex>_<program>`, see [`crate::packet`]).
pub const LINK_PREFIX: &str = "link_tc_";

/// Removes the pinned flow map under `dir` when it was made for another number of flows
/// than `flows` (a pinned map keeps its size): the flows it held go to Docker's path.
pub fn resize_flows(dir: &Path, flows: u32) -> Result<()> {
    let pin = dir.join(MAP_FLOWS);
    if !pin.exists() {
        return Ok(());
    }
    let have = MapData::from_pin(&pin)
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .with_context(|| format!("reading the pinned map {}", pin.display()))?;
    if have != flows {
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        tracing::info!(
            from = have,
            to = flows,
            "flow map resized: flows it held continue on Docker's path"
        );
    }
    Ok(())
}

/// Loads both packet programs in `ebpf` (so they share its maps) and, with `pin_dir`, pins
/// them (replacing earlier pins) for a restart of the same build to take.
pub fn load_programs(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<()> {
    for name in [FORWARD, REPLY] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (the verifier refused it)"))?;
        if let Some(dir) = pin_dir {
            let pin = prog_pin(dir, name);
            let _ = std::fs::remove_file(&pin);
            prog.pin(&pin)
                .with_context(|| format!("pinning {name} at {}", pin.display()))?;
        }
    }
    Ok(())
}

/// This build's packet programs as pinned under `dir`; `None` when one is not.
pub fn from_pins(dir: &Path) -> Result<Option<Programs>> {
    let (f, r) = (prog_pin(dir, FORWARD), prog_pin(dir, REPLY));
    if !f.exists() || !r.exists() {
        return Ok(None);
    }
    let open =
        |p: &Path| SchedClassifier::from_pin(p).with_context(|| format!("opening {}", p.display()));
    Ok(Some(Programs::Pinned(Box::new([open(&f)?, open(&r)?]))))
}

/// Removes every pin of the packet layer under `dir` (its links first: unpinned, they
/// detach). Returns what it removed.
pub fn remove_pins(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with(LINK_PREFIX)
                || n == &format!("prog_{FORWARD}")
                || n == &format!("prog_{REPLY}")
        })
        .collect();
    names.sort_by_key(|n| !n.starts_with(LINK_PREFIX));
    names
        .into_iter()
        .filter(|n| std::fs::remove_file(dir.join(n)).is_ok())
        .collect()
}

/// The packet programs and their maps, loaded, attached nowhere.
pub struct PacketPrograms {
    ebpf: Ebpf,
    vouching: Option<std::net::UdpSocket>,
}

impl PacketPrograms {
    /// Loads the object with room for `flows` flows, and both programs.
    pub fn load(flows: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this binary was built without its eBPF object");
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS, flows.max(1))
            .load(OBJECT)
            .context("loading the eBPF object")?;
        load_programs(&mut ebpf, None)?;
        Ok(Self {
            ebpf,
            vouching: None,
        })
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))
    }

    /// From now on the programs translate (as while an agent runs).
    pub fn vouch(&mut self) -> Result<()> {
        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .context("binding a socket on loopback")?;
        let mut map: SockMap<&mut MapData> = SockMap::try_from(self.map_mut(MAP_AGENT)?)?;
        map.set(0, &sock, 0)?;
        self.vouching = Some(sock);
        Ok(())
    }

    pub fn frontends(&mut self) -> Result<BpfHash<'_, FrontendKey, Backend>> {
        Ok(BpfHash(HashMap::try_from(self.map_mut(MAP_FRONTENDS)?)?))
    }

    /// Writes the published ports of the frontends as they are now (as the agent keeps
    /// them: [`crate::model::desired::ports_of`]).
    pub fn sync_ports(&mut self) -> Result<()> {
        let keys: Vec<FrontendKey> = self.frontends()?.entries()?.into_keys().collect();
        let mut ports: BpfHash<'_, PortKey, PortFamilies> =
            BpfHash(HashMap::try_from(self.map_mut(MAP_PORTS)?)?);
        for (k, v) in crate::model::desired::ports_of(keys.iter()) {
            ports.put(&k, &v)?;
        }
        Ok(())
    }

    pub fn local_addrs(&mut self) -> Result<BpfHash<'_, Addr, LocalAddr>> {
        Ok(BpfHash(HashMap::try_from(self.map_mut(MAP_LOCAL_ADDRS)?)?))
    }

    pub fn endpoints(&mut self) -> Result<BpfHash<'_, Addr, PktEndpoint>> {
        Ok(BpfHash(HashMap::try_from(self.map_mut(MAP_PKT_EP)?)?))
    }

    /// Allows clients in `addr/prefix_len` (an [`Addr`]: IPv4 v4-mapped, its prefix length
    /// plus 96).
    pub fn allow(&mut self, addr: Addr, prefix_len: u32) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, Addr, u8> =
            LpmTrie::try_from(self.map_mut(MAP_PKT_ALLOW)?)?;
        trie.insert(&Key::new(prefix_len, addr), 1, 0)?;
        Ok(())
    }

    /// Every flow the programs recorded.
    pub fn flows(&mut self) -> Result<BTreeMap<FlowKey, Flow>> {
        let map: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.map_mut(MAP_FLOWS)?)?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    /// Runs `program` on `packet` (an Ethernet frame): its verdict and the frame as the
    /// program left it.
    pub fn run(&mut self, program: &str, packet: &[u8]) -> Result<(i32, Vec<u8>)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((i32::from_ne_bytes(r.return_value.to_ne_bytes()), out))
    }
}

impl PacketPrograms {
    /// Attaches `program` to the ingress of `iface` (TCX from Linux 6.6, a `clsact` qdisc's
    /// filter before), for as long as `self` lives.
    pub fn attach(&mut self, program: &str, iface: &str) -> Result<()> {
        // aya attaches with TCX from 6.6 on, by the same reading of the version.
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Already there is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        prog.attach(iface, aya::programs::TcAttachType::Ingress)
            .with_context(|| format!("attaching {program} to {iface}"))?;
        Ok(())
    }
}

/// How long a flow may go without a packet before the agent removes it (the programs
/// then leave its packets to Docker's path), as Cilium's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: std::time::Duration,
    /// After a FIN or RST.
    pub tcp_closing: std::time::Duration,
    pub udp: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp: std::time::Duration::from_hours(6),
            tcp_closing: std::time::Duration::from_secs(10),
            udp: std::time::Duration::from_mins(1),
        }
    }
}

/// Whether `flow` (of `proto`) has been idle past its timeout at `now_ns`
/// (`CLOCK_MONOTONIC`, as `bpf_ktime_get_ns`).
pub fn expired(key: &FlowKey, flow: &Flow, now_ns: u64, t: &Timeouts) -> bool {
    let limit = if key.proto == dataplane_common::PROTO_UDP {
        t.udp
    } else if flow.flags & dataplane_common::pkt::FLOW_F_CLOSING != 0 {
        t.tcp_closing
    } else {
        t.tcp
    };
    let limit = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    now_ns.saturating_sub(flow.last_seen_ns) > limit
}

/// `CLOCK_MONOTONIC` in nanoseconds: the programs' clock.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

impl PacketPrograms {
    /// Removes the flows idle past their timeout at `now_ns`; returns how many.
    pub fn age_flows(&mut self, now_ns: u64, t: &Timeouts) -> Result<usize> {
        let mut map: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.map_mut(MAP_FLOWS)?)?;
        let old: Vec<FlowKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, f)| expired(k, f, now_ns, t))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in &old {
            // Gone meanwhile (evicted, or aged by another) is fine.
            if map.remove(k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_age_by_protocol_and_state() {
        let t = Timeouts::default();
        let key = |proto| FlowKey {
            proto,
            ..FlowKey::default()
        };
        let flow = |flags| Flow {
            flags,
            last_seen_ns: 1_000_000_000,
            ..Flow::default()
        };
        let at = |secs: u64| 1_000_000_000 + secs * 1_000_000_000;
        let tcp = key(dataplane_common::PROTO_TCP);
        let udp = key(dataplane_common::PROTO_UDP);
        assert!(!expired(&tcp, &flow(0), at(3600), &t));
        assert!(expired(&tcp, &flow(0), at(6 * 3600 + 1), &t));
        assert!(!expired(&tcp, &flow(1), at(9), &t));
        assert!(expired(&tcp, &flow(1), at(11), &t));
        assert!(!expired(&udp, &flow(0), at(59), &t));
        assert!(expired(&udp, &flow(0), at(61), &t));
        // A flow seen after `now` was read is not old.
        assert!(!expired(&tcp, &flow(1), 0, &t));
    }
}
