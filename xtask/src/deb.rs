//! `cargo xtask deb`: the Debian package (`target/deb/dataplane_<version>_<arch>.deb`),
//! staged from the release binaries and `packaging/`, with dependencies from
//! `dpkg-shlibdeps`, built by `dpkg-deb`. `--rev` packages the binaries of an earlier commit
//! instead (built in a tree of their own), for upgrade tests.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::util::{output, project_root, run};

const NAME: &str = "dataplane";
const MAINTAINER: &str = "The dataplane developers <dataplane@example.org>";
const DESCRIPTION: &str = "\
Docker's published ports served from the kernel
 A per-host agent that publishes Docker container ports with eBPF cgroup
 socket hooks instead of docker-proxy or iptables NAT: local clients
 (127.0.0.1, host addresses, bridge gateways) connect straight to the
 container, with no proxy process and no conntrack entry, and the container
 sees the real client address. It only adds a faster path for what Docker
 already allows; anything it cannot vouch for takes Docker's own path.
 .
 It also enforces per-container egress policy with nftables, resets the
 connections of paused containers on request, and serves Prometheus metrics.
 bridge-ctl shows what it does.";

/// Where packages are written.
pub fn out_dir() -> PathBuf {
    project_root().join("target/deb")
}

/// Builds the package of the working tree (or of commit `rev`) and returns its path.
pub fn deb(rev: Option<&str>) -> Result<PathBuf> {
    let (bins, version) = match rev {
        None => {
            crate::build()?;
            (
                project_root().join("target/release"),
                workspace_version(&project_root())?,
            )
        }
        Some(rev) => build_rev(rev)?,
    };
    let path = package(&bins, &version)?;
    println!("xtask: built {}", path.display());
    Ok(path)
}

/// The `[workspace.package] version` of the tree at `root`.
fn workspace_version(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let v: toml::Value = toml::from_str(&text).context("parsing Cargo.toml")?;
    v.get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(toml::Value::as_str)
        .map(String::from)
        .context("no [workspace.package] version in Cargo.toml")
}

/// Builds commit `rev` in a tree of its own (`target/deb/src-<rev>`, its own target
/// directory) with its own `cargo xtask build`; returns its binaries and version.
fn build_rev(rev: &str) -> Result<(PathBuf, String)> {
    let root = project_root();
    let sha = output(Command::new("git").current_dir(&root).args([
        "rev-parse",
        "--short=12",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("{rev} is not a commit of this repository"))?;
    let sha = sha.trim();
    let src = out_dir().join(format!("src-{sha}"));
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&src)?;
        let archive = Command::new("git")
            .current_dir(&root)
            .args(["archive", "--format=tar", sha])
            .stdout(Stdio::piped())
            .spawn()
            .context("git archive")?;
        run(Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(archive.stdout.context("git archive output")?))
        .with_context(|| format!("unpacking {sha}"))?;
    }
    println!("xtask: building {sha} in {}", src.display());
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&src)
            .args(["xtask", "build"])
            .env_remove("CARGO_TARGET_DIR"),
    )
    .with_context(|| format!("building {sha}"))?;
    Ok((src.join("target/release"), workspace_version(&src)?))
}

fn arch() -> Result<String> {
    Ok(output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string())
}

/// Copies `from` to `to` (created with its parents) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` of `bytes` (no name, no timestamp: reproducible).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("gzip")?;
    child.stdin.take().context("gzip stdin")?.write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// What a binary prints for `args`, if it knows the subcommand (an earlier build may not).
fn generated(bin: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new(bin).args(args).output().ok()?;
    (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
}

/// The changelog's entries from `version` down (an earlier build's package says nothing of
/// later versions).
fn changelog_from(text: &str, version: &str) -> String {
    let head = format!("{NAME} ({version})");
    match text.find(&head) {
        Some(i) => text[i..].to_string(),
        None => text.to_string(),
    }
}

/// Stages and builds the package from the binaries in `bins`.
fn package(bins: &Path, version: &str) -> Result<PathBuf> {
    let root = project_root();
    let pkg = root.join("packaging");
    let stage = out_dir().join(format!("stage-{version}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let sbin = stage.join("usr/sbin/dataplane");
    let bin = stage.join("usr/bin/bridge-ctl");
    install(&bins.join("dataplane"), &sbin, 0o755)?;
    install(&bins.join("bridge-ctl"), &bin, 0o755)?;
    run(Command::new("strip")
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
        ])
        .arg(&sbin)
        .arg(&bin))?;
    install(
        &pkg.join("dataplane.service"),
        &stage.join("lib/systemd/system/dataplane.service"),
        0o644,
    )?;
    install(
        &pkg.join("dataplane.toml"),
        &stage.join("etc/dataplane/dataplane.toml"),
        0o644,
    )?;
    let doc = stage.join("usr/share/doc").join(NAME);
    install(&pkg.join("copyright"), &doc.join("copyright"), 0o644)?;
    let changelog = std::fs::read_to_string(pkg.join("changelog"))?;
    write(
        &doc.join("changelog.gz"),
        &gzip(changelog_from(&changelog, version).as_bytes())?,
        0o644,
    )?;
    for (binary, name, section) in [(&sbin, "dataplane", "8"), (&bin, "bridge-ctl", "1")] {
        if let Some(page) = generated(binary, &["man"]) {
            write(
                &stage.join(format!("usr/share/man/man{section}/{name}.{section}.gz")),
                &gzip(&page)?,
                0o644,
            )?;
        }
        for (shell, path) in [
            (
                "bash",
                format!("usr/share/bash-completion/completions/{name}"),
            ),
            ("zsh", format!("usr/share/zsh/vendor-completions/_{name}")),
            (
                "fish",
                format!("usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            if let Some(text) = generated(binary, &["completions", shell]) {
                write(&stage.join(path), &text, 0o644)?;
            }
        }
    }
    let control = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&pkg.join(script), &control.join(script), 0o755)?;
    }
    write(
        &control.join("conffiles"),
        b"/etc/dataplane/dataplane.toml\n",
        0o644,
    )?;
    write(&control.join("md5sums"), md5sums(&stage)?.as_bytes(), 0o644)?;
    let depends = format!("{}, nftables, iptables", shlib_depends(&sbin, &bin)?);
    let size = installed_size_kib(&stage)?;
    let arch = arch()?;
    let mut text = String::new();
    let _ = write!(
        text,
        "Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {size}\nDepends: {depends}\nRecommends: docker.io | docker-ce\n\
         Section: net\nPriority: optional\nDescription: {DESCRIPTION}\n"
    );
    write(&control.join("control"), text.as_bytes(), 0o644)?;
    let path = out_dir().join(format!("{NAME}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&path))?;
    Ok(path)
}

/// `md5sums` of every file under `stage` but `DEBIAN`, as dpkg wants it.
fn md5sums(stage: &Path) -> Result<String> {
    let out = output(Command::new("sh").current_dir(stage).args([
        "-c",
        "find . -type f ! -path './DEBIAN/*' -printf '%P\\0' | LC_ALL=C sort -z | xargs -0r md5sum",
    ]))?;
    Ok(out)
}

fn installed_size_kib(stage: &Path) -> Result<u64> {
    let out = output(
        Command::new("du")
            .args(["-sk", "--apparent-size", "--exclude=DEBIAN"])
            .arg(stage),
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du output")
}

/// The shared-library dependencies of the binaries, from `dpkg-shlibdeps`.
fn shlib_depends(sbin: &Path, bin: &Path) -> Result<String> {
    let dir = out_dir().join("shlibdeps");
    std::fs::create_dir_all(dir.join("debian"))?;
    std::fs::write(
        dir.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("-O")
            .arg(format!("-e{}", sbin.display()))
            .arg(format!("-e{}", bin.display()))
            .stderr(Stdio::null()),
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(String::from)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_version_gets_only_its_own_changelog_entries() {
        let text = "dataplane (0.2.0) unstable; urgency=medium\n\n  * b\n\n -- x  date\n\n\
                    dataplane (0.1.0) unstable; urgency=medium\n\n  * a\n\n -- x  date\n";
        assert!(changelog_from(text, "0.1.0").starts_with("dataplane (0.1.0)"));
        assert_eq!(changelog_from(text, "0.2.0"), text);
    }

    #[test]
    fn the_packaging_files_are_there() {
        let pkg = project_root().join("packaging");
        for f in [
            "dataplane.service",
            "dataplane.toml",
            "copyright",
            "changelog",
            "postinst",
            "prerm",
            "postrm",
        ] {
            assert!(pkg.join(f).is_file(), "{f}");
        }
        let version = workspace_version(&project_root()).unwrap();
        let changelog = std::fs::read_to_string(pkg.join("changelog")).unwrap();
        assert!(
            changelog.starts_with(&format!("{NAME} ({version})")),
            "packaging/changelog must start with the workspace version {version}"
        );
    }
}
