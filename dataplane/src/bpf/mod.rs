//! Loading and attaching the kernel programs, and the maps as [`KvStore`]s.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, TestRun, TestRunOptions,
        links::FdLink,
    },
};
use dataplane_common::{
    Addr, Backend, Config, FRONTENDS_MAX, FrontendKey, LocalAddr, MAP_AGENT, MAP_CONFIG,
    MAP_FE_STATS, MAP_FRONTENDS, MAP_LOCAL_ADDRS, MAP_PEER_NETS, MAP_PORTS, MAP_SOCK_OPT,
    MAP_SOCK_REV, MAP_STATS, PeerNet, PeerNetKey, PortFamilies, PortKey, STATS_LEN,
    TEST_REQ_OFFSET, TestAnswer, TestRequest,
};

use crate::{
    features::{Feature, Features},
    reconcile::KvStore,
};

/// The compiled eBPF object, embedded at build time (see `build.rs`). Empty when the agent
/// was built without the BPF toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// The socket hooks, by program name, in attach order. Reverse translation
/// (getpeername, recvmsg) goes first so no translated socket is ever seen without it.
pub const SOCK_HOOKS: &[&str] = &[
    "dp_getpeername4",
    "dp_getpeername6",
    "dp_recvmsg4",
    "dp_recvmsg6",
    "dp_connect4",
    "dp_connect6",
    "dp_sendmsg4",
    "dp_sendmsg6",
    "dp_bind4",
    "dp_bind6",
];

/// The `setsockopt` hook (records `IPV6_V6ONLY`); attached before the socket hooks, so
/// every socket they see has its options recorded from then on.
pub const SOCKOPT_HOOK: &str = "dp_setsockopt";

/// Every map, pinned under the pin directory by its kernel name when pinning is on (the
/// agent map too, so a restart of the same build can take everything as it is pinned).
pub const MAPS: &[&str] = &[
    MAP_AGENT,
    MAP_FRONTENDS,
    MAP_LOCAL_ADDRS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_SOCK_REV,
    MAP_PORTS,
    MAP_FE_STATS,
    MAP_PEER_NETS,
    MAP_SOCK_OPT,
    dataplane_common::pkt::MAP_PKT_EP,
    dataplane_common::pkt::MAP_FLOWS,
    dataplane_common::pkt::MAP_PKT_ALLOW,
];

/// Every hook, by program name.
fn hooks() -> impl Iterator<Item = &'static str> {
    std::iter::once(SOCKOPT_HOOK).chain(SOCK_HOOKS.iter().copied())
}

/// The socket hooks attached on a kernel with `features`, as `(hook, program)` in attach
/// order: a hook's link is pinned by the hook's name, whichever program it carries. Without
/// `bpf_set_retval` the programs that call it cannot load: no `bind` hooks (no port
/// reservation), and `connect` programs that refuse with the hooks' own `EPERM`.
pub fn sock_programs(features: &Features) -> Vec<(&'static str, &'static str)> {
    let retval = features.has(Feature::SetRetval);
    SOCK_HOOKS
        .iter()
        .filter_map(|&h| match h {
            "dp_bind4" | "dp_bind6" if !retval => None,
            "dp_connect4" if !retval => Some((h, "dp_connect4_eperm")),
            "dp_connect6" if !retval => Some((h, "dp_connect6_eperm")),
            _ => Some((h, h)),
        })
        .collect()
}

/// Every hook attached on a kernel with `features`.
fn attached_hooks(features: &Features) -> Vec<&'static str> {
    std::iter::once(SOCKOPT_HOOK)
        .chain(sock_programs(features).into_iter().map(|(h, _)| h))
        .collect()
}

/// Whether programs of an agent are pinned (and so attached) under `dir`.
pub fn has_pinned_links(dir: &Path) -> bool {
    hooks().any(|name| dir.join(format!("link_{name}")).exists())
}

/// This build's programs, named: a hash (64-bit FNV-1a) of the embedded object.
pub fn build_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What marks the pinned links as carrying this build's programs, every one of them: pinned
/// after the last swap, removed before the first.
const MARKER_PREFIX: &str = "build_";

fn marker_path(dir: &Path, features: &Features, packet: Option<u32>) -> PathBuf {
    // The programs differ where the kernel lacks `bpf_set_retval`.
    let variant = if features.has(Feature::SetRetval) {
        ""
    } else {
        "_eperm"
    };
    // With the packet layer, its programs are pinned too, and the flow map has its size.
    let packet = packet.map(|n| format!("_pkt{n}")).unwrap_or_default();
    dir.join(format!("{MARKER_PREFIX}{}{variant}{packet}", build_id()))
}

/// Removes the build markers under `dir`: from here until [`pin_marker`] the links may carry
/// programs of more than one build.
fn remove_markers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(MARKER_PREFIX) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing the build marker {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Says that every pinned link under `dir` carries this build's programs.
fn pin_marker(dir: &Path, features: &Features, packet: Option<u32>) -> Result<()> {
    let path = marker_path(dir, features, packet);
    let fd = sys::marker_create("dp_build").context("creating the build marker")?;
    sys::obj_pin(fd.as_fd(), &path)
        .with_context(|| format!("pinning the build marker at {}", path.display()))
}

/// Removes the pinned links of hooks a kernel with `features` does without (an agent
/// pinned them before): unpinned, they detach.
fn remove_unused_link_pins(dir: &Path, features: &Features) -> Vec<&'static str> {
    let wanted = attached_hooks(features);
    hooks()
        .filter(|h| !wanted.contains(h))
        .filter(|h| std::fs::remove_file(dir.join(format!("link_{h}"))).is_ok())
        .collect()
}

/// Removes pinned maps of ours (`DP_*`) whose name is not in [`MAPS`]: an earlier layout,
/// which no program of this build uses any more.
fn remove_stale_map_pins(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("DP_")
            && !MAPS.contains(&name.as_str())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

/// Carries the content of pinned maps of an earlier layout ([`MAP_MIGRATIONS`]) into this
/// build's maps: per-CPU counters keyed by frontend id, summed into what the new map has.
/// Returns each old map carried over and how many entries it had.
fn migrate_maps(dir: &Path, ebpf: &mut Ebpf) -> Vec<(String, usize)> {
    let mut done = Vec::new();
    for (old, new) in dataplane_common::MAP_MIGRATIONS {
        let pin = dir.join(old);
        if !pin.exists() || MAPS.contains(old) {
            continue;
        }
        let r = (|| -> Result<usize> {
            let data = MapData::from_pin(&pin)?;
            let from: PerCpuHashMap<MapData, u32, u64> =
                PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
            let mut to: PerCpuHashMap<&mut MapData, u32, u64> =
                PerCpuHashMap::try_from(ebpf.map_mut(new).context("migration target")?)?;
            let mut n = 0;
            for entry in &from {
                let (k, v) = entry?;
                let sum: Vec<u64> = match to.get(&k, 0) {
                    Ok(have) => v.iter().zip(have.iter()).map(|(a, b)| a + b).collect(),
                    Err(_) => v.iter().copied().collect(),
                };
                to.insert(k, PerCpuValues::try_from(sum)?, 0)?;
                n += 1;
            }
            Ok(n)
        })();
        match r {
            Ok(n) => done.push(((*old).to_string(), n)),
            Err(e) => {
                tracing::warn!(map = %old, error = %format!("{e:#}"), "could not carry an earlier map's counters over");
            }
        }
    }
    done
}

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dataplane";

/// The programs loaded and attached. Without a pin directory, dropping it detaches them;
/// with one, maps and links stay pinned and keep working without the agent.
pub struct Loaded {
    /// The object this start loaded (it holds unpinned links: dropping it detaches them);
    /// `None` when the pinned programs of this build were taken as they were.
    ebpf: Option<Ebpf>,
    /// Every map of [`MAPS`], by name.
    maps: BTreeMap<&'static str, aya::maps::Map>,
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

/// Fails clearly unless `dir`'s parent is on a bpffs.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    let parent = dir.parent().unwrap_or(dir);
    let st = statfs(parent).with_context(|| {
        format!(
            "pin directory {}: its parent is not on a bpffs",
            dir.display()
        )
    })?;
    if st.filesystem_type() != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf` \
             (`cargo xtask setup` does)",
            parent.display()
        );
    }
    Ok(())
}

/// Makes sure the pin directory is the agent's own before anything is pinned in, adopted
/// from or removed from it: created root-owned with mode 0700 when absent; when present, a
/// real directory (not a symlink) owned by root that nobody else can write. bpffs is often
/// mounted world-writable (1777), so an unprivileged user could create the directory first
/// (then delete the pins, detaching the programs) or put a symlink there (then `uninstall`
/// would delete files elsewhere as root): both are refused, with what to do.
pub fn secure_pin_dir(dir: &Path, create: bool) -> Result<bool> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok(false);
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            std::fs::symlink_metadata(dir)
                .with_context(|| format!("pin directory {}", dir.display()))?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("pin directory {}", dir.display()));
        }
    };
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!(
            "pin directory {} is not a directory of the agent's (a symlink or a file): refusing \
             to use it; look at who made it, then remove it",
            dir.display()
        );
    }
    if meta.uid() != 0 {
        bail!(
            "pin directory {} belongs to uid {}, not root: someone else created it, and could \
             delete the pins in it; refusing to use it. Look at it, then remove it \
             (`rm -r {}`) and start again",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        // Root's own directory from an earlier version (0755): tighten it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    }
    Ok(true)
}

pub mod pkt;
pub mod sys;

pub use sys::count_keys;

/// A short name of this build's map layout (the maps' names and sizes of their keys and
/// values): two builds with the same id can share pinned maps.
pub fn layout_id() -> String {
    let names = MAPS.join(",");
    format!("{:08x}", dataplane_common::net_id(&names))
}

/// The map behind a [`Map`] of the kinds the programs use.
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

/// Swaps `prog` into the link pinned at `pin` (atomically: no moment without a program) and
/// says so for the status.
fn adopt(
    pin: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    name: &str,
    cgroup: &Path,
) -> Result<String> {
    let link =
        sys::obj_get(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
    sys::link_update(link.as_fd(), prog)
        .with_context(|| format!("swapping {name} into {}", pin.display()))?;
    Ok(format!("{name}@{} (adopted)", cgroup.display()))
}

/// Removes everything pinned under `dir` (links first: that detaches the programs), then
/// `dir`. Returns what it removed.
pub fn unpin_all(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if !secure_pin_dir(dir, false)? {
        return Ok(removed);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    // Links before maps.
    names.sort_by_key(|n| (!n.starts_with("link_"), n.clone()));
    for n in names {
        let p = dir.join(&n);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        removed.push(p.display().to_string());
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    removed.push(dir.display().to_string());
    Ok(removed)
}

/// Finds the cgroup v2 mount in `/proc/mounts` text: `/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(mnt.replace("\\040", " ")))
    })
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    cgroup2_mount_in(&mounts).context(
        "no cgroup2 filesystem is mounted (looked in /proc/mounts); mount one, for example \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`",
    )
}

/// The `SO_NETNS_COOKIE` of the calling thread's network namespace.
pub fn netns_cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("socket for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("u64 size fits");
    // SAFETY: a valid socket, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE): the kernel must be 5.14 or newer");
    }
    Ok(cookie)
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

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.maps
            .get(name)
            .with_context(|| format!("map {name} missing"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.maps
            .get_mut(name)
            .with_context(|| format!("map {name} missing"))
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

    /// A descriptor of the socket-storage map where the programs record each translated
    /// socket's backend (for `sock_diag`, see [`crate::sockets`]).
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

/// A BPF hash map as a [`KvStore`].
pub struct BpfHash<'a, K, V>(HashMap<&'a mut MapData, K, V>);

impl<K: aya::Pod + Ord + Clone, V: aya::Pod> KvStore<K, V> for BpfHash<'_, K, V> {
    type Error = MapError;

    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.0.iter().collect()
    }

    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.0.insert(key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        self.0.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether program `name` of the embedded object calls helper `id` (itself, or any
    /// function it may call).
    fn calls_helper(obj: &aya_obj::Object, name: &str, id: i32) -> bool {
        let prog = &obj.programs[name];
        let own = &obj.functions[&prog.function_key()];
        let calls = |f: &aya_obj::Function| {
            f.instructions
                .iter()
                .any(|i| i.code == 0x85 && i.src_reg() == 0 && i.imm == id)
        };
        let bpf_to_bpf = own
            .instructions
            .iter()
            .any(|i| i.code == 0x85 && i.src_reg() == 1);
        // A called function is no program's entry; which one is called is not followed.
        let entries: Vec<_> = obj
            .programs
            .values()
            .map(aya_obj::Program::function_key)
            .collect();
        calls(own)
            || (bpf_to_bpf
                && obj
                    .functions
                    .iter()
                    .any(|(k, f)| !entries.contains(k) && calls(f)))
    }

    #[test]
    #[cfg_attr(
        no_ebpf_object,
        ignore = "built without the eBPF object: `cargo xtask build` makes it"
    )]
    fn the_programs_for_kernels_without_set_retval_never_call_it() {
        const SET_RETVAL: i32 = 187;
        assert!(!OBJECT.is_empty(), "built without the eBPF object");
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let old = Features::all("5.15").without(&[Feature::SetRetval]);
        let programs = sock_programs(&old);
        assert!(!programs.iter().any(|(h, _)| h.starts_with("dp_bind")));
        assert!(programs.contains(&("dp_connect4", "dp_connect4_eperm")));
        for (_, p) in &programs {
            assert!(
                !calls_helper(&obj, p, SET_RETVAL),
                "{p} calls bpf_set_retval"
            );
        }
        assert!(!calls_helper(&obj, SOCKOPT_HOOK, SET_RETVAL));
        // The full set does (so the check above can tell).
        for p in ["dp_bind4", "dp_bind6", "dp_connect4", "dp_connect6"] {
            assert!(calls_helper(&obj, p, SET_RETVAL), "{p}");
        }
        assert_eq!(
            sock_programs(&Features::all("6.18")).len(),
            SOCK_HOOKS.len()
        );
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }
}
