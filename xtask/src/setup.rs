//! `cargo xtask setup`: everything a fresh Debian 12 machine needs, installed only when
//! missing.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{cargo_bin, is_root, output, run, timed};

/// Debian packages: the BPF toolchain (Debian's rustc with prebuilt `core` for
/// bpfel-unknown-none, LLVM 22 for bpf-linker), kernel and network tools, Docker, and the
/// clients the tests use.
pub const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "nftables",
    "iptables",
    "conntrack",
    "iperf3",
    "curl",
    "docker.io",
    "busybox-static",
    // Docker 29 from source (`--engine 29`): runc links libseccomp.
    "libseccomp-dev",
    "pkg-config",
    "xz-utils",
    "python3",
    "socat",
    "haproxy",
    "dnsmasq-base",
    // The bench's CPU profile (`perf record -a`).
    "linux-perf",
    // Other kernels in VMs (`cargo xtask test --kernel`: virtme-ng from PyPI in a venv).
    "qemu-system-x86",
    "python3-venv",
    "kmod",
    // Packaging and operating: dpkg-shlibdeps, lintian, `promtool check metrics`,
    // `bridge-ctl top` under tmux, `systemd-analyze verify` (man pages it checks).
    "dpkg-dev",
    "lintian",
    "prometheus",
    "tmux",
    "man-db",
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    timed("setup: Debian packages", install_packages)?;
    timed("setup: bpf-linker", install_bpf_linker)?;
    timed("setup: mounts", mounts)?;
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all; packages it does not know are not printed at all.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(PACKAGES)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !text.lines().any(|l| {
                let mut f = l.split_whitespace();
                f.next() == Some(p) && f.next().is_some_and(|s| s.starts_with("ii"))
            })
        })
        .collect())
}

fn install_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    println!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install")?;
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let bin = cargo_bin().join("bpf-linker");
    if let Ok(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    // Its build script otherwise follows /usr/bin/llvm-config (LLVM 14) and fails.
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")
}

fn mounted(mounts: &str, fstype: &str) -> Option<String> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&fstype)).then(|| f[1].to_string())
    })
}

fn mounts() -> Result<()> {
    let m = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounted(&m, "bpf").is_none() {
        if !is_root() {
            bail!("bpffs is not mounted: run `cargo xtask setup` as root");
        }
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    if mounted(&m, "cgroup2").is_none() {
        // A hybrid host without the unified hierarchy mounted: mount it where systemd would.
        let dir = Path::new("/sys/fs/cgroup/unified");
        if !is_root() {
            bail!("no cgroup2 mount: run `cargo xtask setup` as root");
        }
        std::fs::create_dir_all(dir).context("creating /sys/fs/cgroup/unified")?;
        run(Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(dir))
        .context("mounting cgroup2")?;
    }
    Ok(())
}
