//! Loading the programs and attaching the socket hooks, or taking this build's pinned ones
//! as they are; the agent's vouching for the maps; the kernel's translation decision on a
//! test request.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, TestRun, TestRunOptions,
        links::FdLink,
    },
};
use dataplane_common::{
    FRONTENDS_MAX, MAP_AGENT, MAP_FE_STATS, MAP_FRONTENDS, MAP_PORTS, TEST_REQ_OFFSET, TestAnswer,
    TestRequest,
};

use super::{
    object::{MAPS, OBJECT, SOCKOPT_HOOK, attached_hooks, hooks, sock_programs},
    pins::{
        adopt, check_bpffs, marker_path, migrate_maps, pin_marker, remove_markers,
        remove_stale_map_pins, remove_unused_link_pins, secure_pin_dir,
    },
    pkt, sys,
};
use crate::features::Features;

/// The programs loaded and attached. Without a pin directory, dropping it detaches them;
/// with one, maps and links stay pinned and keep working without the agent.
pub struct Loaded {
    /// The object this start loaded (it holds unpinned links: dropping it detaches them);
    /// `None` when the pinned programs of this build were taken as they were.
    ebpf: Option<Ebpf>,
    /// Every map of [`MAPS`], by name.
    pub(super) maps: BTreeMap<&'static str, aya::maps::Map>,
    pin_dir: Option<PathBuf>,
    /// `<program>@<cgroup>` and how it got there (attached, or adopted from a pin).
    pub attached: Vec<String>,
    /// Whether this start found this very build's programs pinned and attached, and took
    /// them as they were: nothing loaded, nothing verified, nothing swapped.
    pub reused: bool,
    /// What the kernel offers (the programs were chosen for it).
    pub features: Features,
    /// The socket in the agent map while this agent vouches for the maps' content (see
    /// [`Loaded::vouch`]); it closes with the process, however the process ends.
    vouching: Option<std::net::UdpSocket>,
    /// The packet layer's programs, when it is on.
    packet: Option<pkt::Programs>,
    /// Links made outside aya (dropped last: they detach then, unless pinned).
    _own_links: Vec<std::os::fd::OwnedFd>,
}

/// After the socket hooks are attached: what earlier layouts left under the pin directory
/// is carried over or removed, the packet layer's programs are loaded (or an earlier agent's
/// unpinned when it is off), and the build marker says the pins carry this build.
fn finish_load(
    ebpf: &mut Ebpf,
    pin_dir: Option<&Path>,
    features: &Features,
    packet_flows: Option<u32>,
) -> Result<()> {
    if let Some(dir) = pin_dir {
        for (old, n) in migrate_maps(dir, ebpf) {
            tracing::info!(map = %old, entries = n, "carried the counters of an earlier map layout over");
        }
        for name in remove_stale_map_pins(dir) {
            tracing::info!(map = %name, "removed the pin of an earlier map layout");
        }
        for hook in remove_unused_link_pins(dir, features) {
            tracing::info!(hook, "detached a hook this kernel's programs do without");
        }
    }
    if packet_flows.is_some() {
        pkt::load_programs(ebpf, pin_dir)?;
    } else if let Some(dir) = pin_dir {
        for pin in pkt::remove_pins(dir) {
            tracing::info!(pin = %pin, "packet layer off: removed the pin of an earlier agent's");
        }
    }
    if let Some(dir) = pin_dir {
        pin_marker(dir, features, packet_flows)?;
    }
    Ok(())
}

/// Loads the `setsockopt` hook and attaches it to `cg` (or swaps it into its pinned link).
fn attach_sockopt(
    ebpf: &mut Ebpf,
    cg: &File,
    cgroup: &Path,
    pin_dir: Option<&Path>,
    own_links: &mut Vec<std::os::fd::OwnedFd>,
) -> Result<String> {
    let name = SOCKOPT_HOOK;
    let prog: &mut CgroupSockopt = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sockopt program"))?;
    prog.load()
        .with_context(|| format!("loading {name} (the verifier refused it)"))?;
    let link_pin = pin_dir.map(|d| d.join(format!("link_{name}")));
    if let Some(pin) = link_pin.as_ref().filter(|p| p.exists()) {
        return adopt(pin, prog.fd()?.as_fd(), name, cgroup);
    }
    let prog_fd = prog.fd()?;
    let link = sys::link_create(prog_fd.as_fd(), cg.as_fd(), sys::ATTACH_CGROUP_SETSOCKOPT)
        .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
    if let Some(pin) = link_pin {
        sys::obj_pin(link.as_fd(), &pin)
            .with_context(|| format!("pinning {name} at {}", pin.display()))?;
    }
    own_links.push(link);
    Ok(format!("{name}@{}", cgroup.display()))
}

impl Loaded {
    /// Loads every program and attaches the socket hooks to `cgroup`. On any failure
    /// nothing new stays attached (what was attached is dropped with the object).
    ///
    /// With `pin_dir`, maps already pinned there are adopted as they are (their content
    /// keeps serving), links pinned there get the new programs swapped in atomically
    /// (`BPF_LINK_UPDATE`), and what is new is pinned, so it all outlives the agent.
    pub fn load_and_attach(cgroup: &Path, pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_and_attach_sized(cgroup, pin_dir, FRONTENDS_MAX, &Features::probe(), None)
    }

    /// As [`Loaded::load_and_attach`], with room for `max_frontends` published bindings in
    /// maps created now (a pinned map keeps the size it was created with), and the programs
    /// for a kernel with `features` ([`sock_programs`]). With `packet_flows`, the packet
    /// layer's programs are loaded too (and pinned, attached nowhere yet: see
    /// [`crate::packet`]) with room for that many flows; without, pinned ones of an earlier
    /// agent are removed (which detaches them where they were linked).
    pub fn load_and_attach_sized(
        cgroup: &Path,
        pin_dir: Option<&Path>,
        max_frontends: u32,
        features: &Features,
        packet_flows: Option<u32>,
    ) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this dataplane binary was built without its eBPF object; build it with \
                 `cargo xtask build` (needs the BPF toolchain that `cargo xtask setup` installs)"
            );
        }
        let mut loader = EbpfLoader::new();
        for map in [MAP_FRONTENDS, MAP_PORTS, MAP_FE_STATS] {
            loader.map_max_entries(map, max_frontends.max(1));
        }
        // Without the packet layer its flow map (an LRU map, all preallocated) takes no room.
        let flows = packet_flows.unwrap_or(1).max(1);
        loader.map_max_entries(dataplane_common::pkt::MAP_FLOWS, flows);
        let map_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                check_bpffs(dir)?;
                secure_pin_dir(dir, true)?;
                pkt::resize_flows(dir, flows)?;
                MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object (is this a kernel with BTF and BPF enabled?)")?;
        if let Some(dir) = pin_dir {
            remove_markers(dir)?;
        }
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut attached = Vec::new();
        let mut own_links = Vec::new();
        attached.push(attach_sockopt(
            &mut ebpf,
            &cg,
            cgroup,
            pin_dir,
            &mut own_links,
        )?);
        for (hook, name) in sock_programs(features) {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
            prog.load()
                .with_context(|| format!("loading {name} (the verifier refused it)"))?;
            let link_pin = pin_dir.map(|d| d.join(format!("link_{hook}")));
            if let Some(pin) = link_pin.as_ref().filter(|p| p.exists()) {
                attached.push(adopt(pin, prog.fd()?.as_fd(), name, cgroup)?);
                continue;
            }
            // Links always coexist with other programs on the cgroup: the mode must be
            // Single (0).
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "attaching {name} to {} (needs CONFIG_CGROUP_BPF and root)",
                        cgroup.display()
                    )
                })?;
            if let Some(pin) = link_pin {
                let link: FdLink = prog.take_link(id)?.try_into()?;
                link.pin(&pin)
                    .with_context(|| format!("pinning {name} at {}", pin.display()))?;
            }
            attached.push(format!("{name}@{}", cgroup.display()));
        }
        finish_load(&mut ebpf, pin_dir, features, packet_flows)?;
        let mut maps = BTreeMap::new();
        for name in MAPS {
            let m = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            maps.insert(*name, m);
        }
        Ok(Self {
            ebpf: Some(ebpf),
            maps,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attached,
            reused: false,
            features: features.clone(),
            vouching: None,
            packet: packet_flows.map(|_| pkt::Programs::Loaded),
            _own_links: own_links,
        })
    }

    /// Takes this build's programs as they are pinned under `dir` and attached: no load, no
    /// verifier, no swap. Only when this build's marker is there (pinned after the last
    /// link carried its programs) and every link and map is pinned; `None` otherwise (then
    /// [`Loaded::load_and_attach_sized`] loads and swaps).
    pub fn reuse_pinned(
        dir: &Path,
        cgroup: &Path,
        features: &Features,
        packet_flows: Option<u32>,
    ) -> Result<Option<Self>> {
        if OBJECT.is_empty()
            || !secure_pin_dir(dir, false)?
            || !marker_path(dir, features, packet_flows).exists()
        {
            return Ok(None);
        }
        let packet = match packet_flows {
            Some(_) => match pkt::from_pins(dir)? {
                Some(p) => Some(p),
                None => return Ok(None),
            },
            None => None,
        };
        let wanted = attached_hooks(features);
        if !hooks().all(|n| dir.join(format!("link_{n}")).exists() == wanted.contains(&n))
            || !MAPS.iter().all(|m| dir.join(m).exists())
        {
            return Ok(None);
        }
        let mut maps = BTreeMap::new();
        for name in MAPS {
            let pin = dir.join(name);
            let data = MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned map {}", pin.display()))?;
            maps.insert(*name, aya::maps::Map::from_map_data(data)?);
        }
        Ok(Some(Self {
            ebpf: None,
            maps,
            pin_dir: Some(dir.to_path_buf()),
            attached: wanted
                .iter()
                .map(|n| format!("{n}@{} (pinned, this build)", cgroup.display()))
                .collect(),
            reused: true,
            features: features.clone(),
            vouching: None,
            packet,
            _own_links: Vec::new(),
        }))
    }

    /// From now on the programs translate (and reserve published ports): the maps hold what
    /// this agent has synced. Puts a socket of this process (UDP, bound to an ephemeral
    /// loopback port, never read) in the agent map; the kernel takes it out when the socket
    /// closes, which it does when the process ends, `kill -9` included. Until an agent
    /// vouches again every socket takes Docker's own path, so frontends left by an agent
    /// that stopped can never send a client to an address Docker has given to another
    /// container meanwhile.
    pub fn vouch(&mut self) -> Result<()> {
        if self.vouching.is_some() {
            return Ok(());
        }
        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)))
            .context("binding the agent's own socket on loopback")?;
        let mut map: SockMap<&mut MapData> = SockMap::try_from(self.map_mut(MAP_AGENT)?)?;
        map.set(0, &sock, 0)
            .context("putting the agent's socket in the agent map")?;
        self.vouching = Some(sock);
        Ok(())
    }

    /// Whether this agent vouches for the maps now.
    pub fn vouching(&self) -> bool {
        self.vouching.is_some()
    }

    /// The programs stop translating (as when the agent ends) until [`Loaded::vouch`].
    pub fn withdraw(&mut self) {
        // Closing the socket empties the map's slot.
        self.vouching = None;
    }

    /// The packet layer's program `name` ([`pkt::FORWARD`] or [`pkt::REPLY`]), when it is on.
    pub fn tc_program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        match &mut self.packet {
            None => bail!("the packet layer is off"),
            Some(pkt::Programs::Loaded) => self
                .ebpf
                .as_mut()
                .and_then(|e| e.program_mut(name))
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name} is not a TC program")),
            Some(pkt::Programs::Pinned(progs)) => match name {
                pkt::FORWARD => Ok(&mut progs[0]),
                pkt::REPLY => Ok(&mut progs[1]),
                _ => bail!("no packet program {name}"),
            },
        }
    }

    /// Whether the packet layer's programs are loaded.
    pub fn packet_layer(&self) -> bool {
        self.packet.is_some()
    }

    /// Runs the translation decision in the kernel on `req` through the test classifier
    /// (`BPF_PROG_TEST_RUN`), against the maps as they are. Returns the program's return
    /// value (1 translated, 0 not) and its answer.
    pub fn test_xlate(&mut self, req: &TestRequest) -> Result<(u32, TestAnswer)> {
        if self.ebpf.is_none() {
            // Programs taken as pinned: load the object once more, its maps the pinned ones.
            let dir = self.pin_dir.clone().context("no pin directory")?;
            let mut loader = EbpfLoader::new();
            for name in MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
            self.ebpf = Some(loader.load(OBJECT).context("loading the eBPF object")?);
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .as_mut()
            .context("no eBPF object")?
            .program_mut("dp_test_xlate")
            .context("program dp_test_xlate missing")?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().context("loading dp_test_xlate")?;
        }
        let mut data = vec![0u8; TEST_REQ_OFFSET + size_of::<TestRequest>()];
        // SAFETY: TestRequest is plain old data of exactly this size.
        let raw = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(req).cast::<u8>(),
                size_of::<TestRequest>(),
            )
        };
        data[TEST_REQ_OFFSET..].copy_from_slice(raw);
        let mut out = vec![0u8; data.len()];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&data),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of dp_test_xlate")?;
        // SAFETY: TestAnswer is plain old data and `out` holds one after the header.
        let answer = unsafe {
            std::ptr::read_unaligned(out[TEST_REQ_OFFSET..].as_ptr().cast::<TestAnswer>())
        };
        Ok((r.return_value, answer))
    }
}
