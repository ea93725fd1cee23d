//! Other kernels to test on, in virtual machines: Debian's generic kernels, 6.1 (bookworm)
//! and 6.12 (trixie), fetched once through a private apt configuration (as the engines are:
//! `apt-get download`, `dpkg-deb -x`, nothing installed) and unpacked under
//! `target/kernels/`. They boot with `virtme-ng` (from the Python package index, in a
//! virtualenv under `target/vm`) on Debian's `qemu-system-x86`, under software emulation
//! (nested KVM does not work on this machine kind), over a copy-on-write view of the
//! host's own root filesystem: the guest sees the built binaries and the eBPF object where
//! the host has them, and nothing it writes reaches the host.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    apt::PrivateApt,
    util::{project_root, run},
};

/// A kernel to test on in a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 11 (bullseye): 5.10, older than several features the agent uses; it starts
    /// with those degraded.
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm): 6.1.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13 (trixie): 6.12.
    #[value(name = "6.12")]
    V6_12,
}

/// The virtme-ng release the VMs are booted with.
const VIRTME_NG: &str = "virtme-ng==1.42";

impl Kernel {
    pub const fn tag(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The apt sources its package comes from (the point releases and security updates).
    const fn sources(self) -> &'static str {
        match self {
            Self::V5_10 => {
                "deb http://deb.debian.org/debian bullseye main\n\
                 deb http://deb.debian.org/debian-security bullseye-security main\n"
            }
            Self::V6_1 => {
                "deb http://deb.debian.org/debian bookworm main\n\
                 deb http://deb.debian.org/debian-security bookworm-security main\n"
            }
            Self::V6_12 => {
                "deb http://deb.debian.org/debian trixie main\n\
                 deb http://deb.debian.org/debian-security trixie-security main\n"
            }
        }
    }

    fn dir(self) -> PathBuf {
        project_root().join("target/kernels").join(self.tag())
    }

    /// The unpacked kernel image, fetched and unpacked once.
    pub fn fetch(self) -> Result<PathBuf> {
        let root = self.dir().join("root");
        if let Some(img) = vmlinuz_in(&root) {
            return Ok(img);
        }
        println!(
            "xtask: fetching Debian's {} kernel (once; cached in {})",
            self.tag(),
            self.dir().display()
        );
        let apt = PrivateApt::update(
            &self.dir().join("apt"),
            self.sources(),
            "the kernel's suite",
        )?;
        // The generic flavour's current package, as the metapackage names it.
        let package = image_package(&apt.cache(&["depends", "linux-image-amd64"])?)
            .context("no linux-image package named by linux-image-amd64")?;
        let tmp = self.dir().join("root.partial");
        apt.download_and_unpack(&[&package], &tmp)?;
        let Some(img) = vmlinuz_in(&tmp) else {
            bail!("{package} holds no /boot/vmlinuz-*");
        };
        let version = img
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("a vmlinuz-<version> name")?
            .to_string();
        // Trixie's packages hold the modules under /usr (merged /usr).
        let base = if tmp.join("lib/modules").exists() {
            tmp.clone()
        } else {
            tmp.join("usr")
        };
        run(Command::new("depmod").arg("-b").arg(&base).arg(&version))
            .context("depmod for the unpacked modules")?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root)?;
        vmlinuz_in(&root).context("the unpacked kernel image")
    }
}

/// `linux-image-<version>-amd64` from `apt-cache depends linux-image-amd64`.
fn image_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(ToString::to_string)
}

fn vmlinuz_in(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// virtme-ng's `vng`, installed once into a virtualenv of its own (qemu and python3-venv
/// come with the setup's Debian packages).
fn vng() -> Result<PathBuf> {
    let venv = project_root().join("target/vm/venv");
    let vng = venv.join("bin/vng");
    if vng.exists() {
        return Ok(vng);
    }
    println!(
        "xtask: installing {VIRTME_NG} from PyPI into {}",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("python3 -m venv (Debian's python3-venv)")?;
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", VIRTME_NG]))
        .context("installing virtme-ng from PyPI")?;
    Ok(vng)
}

/// Boots `kernel` and runs `script` (bash) in it as root; its output is the VM's. Fails
/// when the VM cannot boot, when the script fails, or after `timeout`; never runs anything
/// on the host's kernel instead. The script sees the host's root filesystem (copy on
/// write) and starts in the project's root.
pub fn run_in_vm(kernel: Kernel, script: &str, timeout: Duration) -> Result<()> {
    let img = kernel.fetch()?;
    let vng = vng()?;
    // The script's last line tells the VM's own verdict apart from the boot's.
    let marker = "dataplane-vm-script-exit";
    let wrapped = format!(
        "cd {root}; ( {script} ); echo \"{marker}=$?\"",
        root = project_root().display()
    );
    let t = Instant::now();
    let path = format!(
        "{}:{}",
        vng.parent().expect("a venv bin directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // `--verbose`: the console is where the script's output shows when the VM has no
    // script I/O port (its kernel messages too, from warnings up). AppArmor off: Debian's
    // kernels enable it, and Docker then wants the host's `apparmor_parser`.
    let mut child = Command::new(&vng)
        .arg("--run")
        .arg(&img)
        .args([
            "--verbose",
            "--append",
            "loglevel=4 apparmor=0",
            "--disable-kvm",
            // One CPU: with two, the emulator once let a CPU run kernel text another was
            // patching (a static key flipped at the first memory cgroup: an int3 Oops in
            // the 6.12 guest, before the agent ran). The tests need no parallelism.
            "--cpus",
            "1",
            "--memory",
            "4G",
            "--exec",
            &wrapped,
        ])
        .current_dir(project_root())
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting vng")?;
    // The script's output comes on stdout or, through the console, on stderr.
    let readers = [
        scan(child.stdout.take().expect("piped stdout"), marker),
        scan(child.stderr.take().expect("piped stderr"), marker),
    ];
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the {} VM did not finish within {} s",
                kernel.tag(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Both joined, so everything the VM said is printed.
    let codes: Vec<Option<i32>> = readers
        .into_iter()
        .map(|r| r.join().ok().flatten())
        .collect();
    let code = codes.into_iter().flatten().next();
    match code {
        Some(0) => Ok(()),
        Some(c) => bail!("the script failed in the {} VM (exit {c})", kernel.tag()),
        None => bail!(
            "the {} VM ended without running the script to its end (did it boot?)",
            kernel.tag()
        ),
    }
}

/// Prints what the VM says, line by line; the exit code after `marker=`, if it came.
fn scan(
    from: impl std::io::Read + Send + 'static,
    marker: &'static str,
) -> std::thread::JoinHandle<Option<i32>> {
    std::thread::spawn(move || {
        use std::io::{BufRead as _, BufReader};
        let mut code = None;
        for line in BufReader::new(from).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            println!("vm: {line}");
            if let Some(c) = line.trim().strip_prefix(&format!("{marker}=")) {
                code = c.parse::<i32>().ok();
            }
        }
        code
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generic_flavour_is_taken_from_the_metapackage() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            image_package(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(image_package("linux-image-amd64\n"), None);
        assert_eq!(Kernel::V6_12.tag(), "6.12");
        assert!(Kernel::V6_1.sources().contains("bookworm-security"));
    }
}
