//! The pin directory: its checks, the build markers, what earlier layouts left there, the
//! pinned links new programs are swapped into, and removing it all.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap, PerCpuValues},
};

use super::{
    object::{MAPS, attached_hooks, build_id, hooks},
    sys,
};
use crate::features::{Feature, Features};

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dataplane";

/// Whether programs of an agent are pinned (and so attached) under `dir`.
pub fn has_pinned_links(dir: &Path) -> bool {
    hooks().any(|name| dir.join(format!("link_{name}")).exists())
}

/// What marks the pinned links as carrying this build's programs, every one of them: pinned
/// after the last swap, removed before the first.
const MARKER_PREFIX: &str = "build_";

pub(super) fn marker_path(dir: &Path, features: &Features, packet: Option<u32>) -> PathBuf {
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
pub(super) fn remove_markers(dir: &Path) -> Result<()> {
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
pub(super) fn pin_marker(dir: &Path, features: &Features, packet: Option<u32>) -> Result<()> {
    let path = marker_path(dir, features, packet);
    let fd = sys::marker_create("dp_build").context("creating the build marker")?;
    sys::obj_pin(fd.as_fd(), &path)
        .with_context(|| format!("pinning the build marker at {}", path.display()))
}

/// Removes the pinned links of hooks a kernel with `features` does without (an agent
/// pinned them before): unpinned, they detach.
pub(super) fn remove_unused_link_pins(dir: &Path, features: &Features) -> Vec<&'static str> {
    let wanted = attached_hooks(features);
    hooks()
        .filter(|h| !wanted.contains(h))
        .filter(|h| std::fs::remove_file(dir.join(format!("link_{h}"))).is_ok())
        .collect()
}

/// Removes pinned maps of ours (`DP_*`) whose name is not in [`MAPS`]: an earlier layout,
/// which no program of this build uses any more.
pub(super) fn remove_stale_map_pins(dir: &Path) -> Vec<String> {
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
///
/// [`MAP_MIGRATIONS`]: dataplane_common::MAP_MIGRATIONS
pub(super) fn migrate_maps(dir: &Path, ebpf: &mut Ebpf) -> Vec<(String, usize)> {
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

/// Swaps `prog` into the link pinned at `pin` (atomically: no moment without a program) and
/// says so for the status.
pub(super) fn adopt(
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
