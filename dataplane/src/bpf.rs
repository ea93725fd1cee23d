//! Loading and attaching the kernel programs, and the maps as [`KvStore`]s.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TestRun, TestRunOptions},
};
use dataplane_common::{
    Addr, Backend, Config, FrontendKey, LocalAddr, MAP_CONFIG, MAP_FRONTENDS, MAP_LOCAL_ADDRS,
    MAP_PORTS, MAP_STATS, PortFamilies, PortKey, STATS_LEN, TestAnswer, TestRequest,
};

use crate::reconcile::KvStore;

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

/// The programs loaded and attached; dropping it detaches them.
pub struct Loaded {
    ebpf: Ebpf,
    pub attached: Vec<String>,
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

impl Loaded {
    /// Loads every program and attaches the socket hooks to `cgroup`. On any failure
    /// nothing stays attached (what was attached is dropped with the object).
    pub fn load_and_attach(cgroup: &Path) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this dataplane binary was built without its eBPF object; build it with \
                 `cargo xtask build` (needs the BPF toolchain that `cargo xtask setup` installs)"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .context("loading the eBPF object (is this a kernel with BTF and BPF enabled?)")?;
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut attached = Vec::new();
        for name in SOCK_HOOKS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
            prog.load()
                .with_context(|| format!("loading {name} (the verifier refused it)"))?;
            // Links always coexist with other programs on the cgroup: the mode must be Single (0).
            prog.attach(&cg, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "attaching {name} to {} (needs CONFIG_CGROUP_BPF and root)",
                        cgroup.display()
                    )
                })?;
            attached.push(format!("{name}@{}", cgroup.display()));
        }
        Ok(Self { ebpf, attached })
    }

    pub fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut arr: Array<&mut MapData, Config> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).context("config map")?)?;
        arr.set(0, cfg, 0).context("writing the config map")?;
        Ok(())
    }

    pub fn frontends(&mut self) -> Result<BpfHash<'_, FrontendKey, Backend>> {
        let map = self.ebpf.map_mut(MAP_FRONTENDS).context("frontends map")?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    pub fn local_addrs(&mut self) -> Result<BpfHash<'_, Addr, LocalAddr>> {
        let map = self
            .ebpf
            .map_mut(MAP_LOCAL_ADDRS)
            .context("local-address map")?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    pub fn ports(&mut self) -> Result<BpfHash<'_, PortKey, PortFamilies>> {
        let map = self
            .ebpf
            .map_mut(MAP_PORTS)
            .context("published-ports map")?;
        Ok(BpfHash(HashMap::try_from(map)?))
    }

    /// Runs the translation decision in the kernel on `req` through the test classifier
    /// (`BPF_PROG_TEST_RUN`), against the maps as they are. Returns the program's return
    /// value (1 translated, 0 not) and its answer.
    pub fn test_xlate(&mut self, req: &TestRequest) -> Result<(u32, TestAnswer)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut("dp_test_xlate")
            .context("program dp_test_xlate missing")?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().context("loading dp_test_xlate")?;
        }
        let mut data = vec![0u8; 14 + size_of::<TestRequest>()];
        // SAFETY: TestRequest is plain old data of exactly this size.
        let raw = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(req).cast::<u8>(),
                size_of::<TestRequest>(),
            )
        };
        data[14..].copy_from_slice(raw);
        let mut out = vec![0u8; data.len()];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&data),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of dp_test_xlate")?;
        // SAFETY: TestAnswer is plain old data and `out` holds one after the header.
        let answer = unsafe { std::ptr::read_unaligned(out[14..].as_ptr().cast::<TestAnswer>()) };
        Ok((r.return_value, answer))
    }

    /// The stats counters summed over CPUs, indexed by `STAT_*`.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_STATS).context("stats map")?)?;
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
