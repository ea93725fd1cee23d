//! The Docker engines the project is tested against, besides the host's own: Debian's
//! `docker.io` from newer suites, fetched once through a private apt configuration (no
//! system change: `apt-get download`, `dpkg-deb -x`) and cached under `target/engines/`;
//! and Docker 29, which no Debian suite has, built once from the sources in
//! `../shared/engines` (moby and runc, vendored) with Debian sid's Go, beside sid's
//! `containerd` and `docker-cli`. Each runs with its own data root and exec root, its
//! binaries first in `PATH` (29 with its own `runc`; the others the host's).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    apt::PrivateApt,
    util::{project_root, run},
};

/// Docker 29's sources (`../shared/engines/README.md` says what they are).
const MOBY_SRC: &str = "moby-29.7.2-src.tar.xz";
const MOBY_VERSION: &str = "29.7.2";
const RUNC_SRC: &str = "runc-1.3.6-src.tar.xz";
const RUNC_VERSION: &str = "1.3.6";
const MOBY_COMMIT: &str = "6a43e3d5afdd";
/// The tarballs and their sha256 (`../shared/engines/README.md`).
const SOURCES: [(&str, &str); 2] = [
    (
        MOBY_SRC,
        "d3cfc77b824df915c87e11e0933bb662156fd34605294cdcd9da917b1f57696e",
    ),
    (
        RUNC_SRC,
        "2b9278d26ef692926c3d4dd9f0d1ab86a24678d53f07d5ac9cf45d7bad1258ca",
    ),
];
/// Debian sid's Go that the moby tag needs (>= 1.26.3).
const GO_PACKAGES: &[&str] = &["golang-1.26-go", "golang-1.26-src"];

/// An engine to test against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Whatever answers on the default socket, or the host's `dockerd` (Debian 12: 20.10).
    Host,
    /// Debian 12's 20.10 (the host's package, as `host` here).
    #[value(name = "20")]
    V20,
    /// Debian 13 (trixie): 26.1.
    #[value(name = "26")]
    V26,
    /// Debian unstable (sid): 28.5.
    #[value(name = "28")]
    V28,
    /// Docker 29.7 built from `../shared/engines`, its default iptables firewall backend.
    #[value(name = "29")]
    V29,
    /// Docker 29.7 with `firewall-backend: nftables` (its own `ip docker-bridges` tables,
    /// no `DOCKER-USER`).
    #[value(name = "29-nft")]
    V29Nft,
}

impl Engine {
    /// The Debian suite its packages come from; `None`: the host's own.
    const fn suite(self) -> Option<&'static str> {
        match self {
            Self::Host | Self::V20 => None,
            Self::V26 => Some("trixie"),
            Self::V28 | Self::V29 | Self::V29Nft => Some("sid"),
        }
    }

    /// Whether it is built from source (29) rather than fetched whole.
    const fn built(self) -> bool {
        matches!(self, Self::V29 | Self::V29Nft)
    }

    /// Options its dockerd takes besides the data and exec roots.
    pub fn daemon_options(self) -> &'static [&'static str] {
        match self {
            Self::V29Nft => &["--firewall-backend=nftables"],
            _ => &[],
        }
    }

    /// The version prefix its server reports (`None`: any).
    pub const fn version_prefix(self) -> Option<&'static str> {
        match self {
            Self::Host => None,
            Self::V20 => Some("20."),
            Self::V26 => Some("26."),
            Self::V28 => Some("28."),
            Self::V29 | Self::V29Nft => Some("29."),
        }
    }

    /// A short name for paths.
    pub const fn tag(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::V20 => "20",
            Self::V26 => "26",
            Self::V28 => "28",
            Self::V29 => "29",
            Self::V29Nft => "29-nft",
        }
    }

    /// Where its binaries live (29's two backends share one build, named by its version).
    fn root(self) -> PathBuf {
        let engines = project_root().join("target/engines");
        if self.built() {
            engines.join("29").join(format!("root-{MOBY_VERSION}"))
        } else {
            engines.join(self.tag()).join("root")
        }
    }

    /// Its own state directories, so engines never share containers or images.
    pub fn data_root(self) -> Option<String> {
        self.suite()
            .map(|_| format!("/var/lib/dataplane-docker-{}", self.tag()))
    }

    pub fn exec_root(self) -> Option<String> {
        self.suite()
            .map(|_| format!("/run/dataplane-docker-{}", self.tag()))
    }

    /// `PATH` with its binaries first (the host's for `host` and `20`).
    pub fn path_env(self) -> Result<Option<String>> {
        if self.suite().is_none() {
            return Ok(None);
        }
        let root = self.fetch()?;
        let path = std::env::var("PATH").unwrap_or_default();
        Ok(Some(format!(
            "{}:{}:{path}",
            root.join("usr/sbin").display(),
            root.join("usr/bin").display()
        )))
    }

    /// Fetches and unpacks its packages once; returns where they are.
    pub fn fetch(self) -> Result<PathBuf> {
        let root = self.root();
        let Some(suite) = self.suite() else {
            return Ok(root);
        };
        if root.join("usr/sbin/dockerd").exists() {
            return Ok(root);
        }
        if self.built() {
            crate::util::timed("Docker 29: build from ../shared/engines", || {
                build_29(&root)
            })?;
            return Ok(root);
        }
        let base = root.parent().expect("a root has a parent").to_path_buf();
        println!(
            "xtask: fetching Docker from Debian {suite} (once; cached in {})",
            base.display()
        );
        let apt = PrivateApt::update(
            &base.join("apt"),
            &format!("deb http://deb.debian.org/debian {suite} main\n"),
            &format!("Debian {suite}"),
        )?;
        let tmp = base.join("root.partial");
        apt.download_and_unpack(&["docker.io", "containerd", "docker-cli"], &tmp)?;
        if !tmp.join("usr/sbin/dockerd").exists() {
            bail!("no dockerd in the packages from Debian {suite}");
        }
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root)?;
        Ok(root)
    }
}

/// Where Docker 29's sources are: `DATAPLANE_ENGINE_SOURCES`, else `shared/engines` beside
/// the project's folder. Each tarball is checked against the digest its README gives.
fn sources_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("DATAPLANE_ENGINE_SOURCES").map_or_else(
        || {
            project_root()
                .parent()
                .map(|p| p.join("shared/engines"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    for (f, _) in SOURCES {
        if !dir.join(f).is_file() {
            bail!(
                "Docker 29 is built from {f}, not found in {} (the tarballs are not in this \
                 repository: set DATAPLANE_ENGINE_SOURCES to the folder that holds {MOBY_SRC} \
                 and {RUNC_SRC})",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Checks the tarballs' digests (once per build).
fn check_sources(dir: &Path) -> Result<()> {
    for (f, sha) in SOURCES {
        let out = crate::util::output(Command::new("sha256sum").arg(dir.join(f)))?;
        if out.split_whitespace().next() != Some(sha) {
            bail!(
                "{} is not the expected source (sha256 {sha})",
                dir.join(f).display()
            );
        }
    }
    Ok(())
}

/// Checks, before anything else runs, that `engine` can be had: fetched or built already,
/// or its sources (29) and build tools present.
pub fn preflight(engine: Engine) -> Result<()> {
    if !engine.built() || engine.root().join("usr/sbin/dockerd").exists() {
        return Ok(());
    }
    sources_dir()?;
    for tool in ["pkg-config", "xz", "sha256sum"] {
        if !crate::util::run_status(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .unwrap_or(false)
        {
            bail!("building Docker 29 needs `{tool}`: run `cargo xtask setup` as root");
        }
    }
    if !Path::new("/usr/include/seccomp.h").exists() {
        bail!("building runc needs libseccomp-dev: run `cargo xtask setup` as root");
    }
    Ok(())
}

/// Unpacks `tarball` into `dir` unless a complete unpack is there: into `<dir>.partial`
/// first, renamed when whole, so an interrupted unpack is never taken for one.
fn unpack(tarball: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(tarball)
        .arg("-C")
        .arg(&partial))
    .with_context(|| format!("unpacking {}", tarball.display()))?;
    fs::rename(&partial, dir)?;
    Ok(())
}

/// Builds Docker 29 into `root` (`usr/sbin/dockerd`, `docker-proxy`, `runc`), with sid's
/// `containerd` and `docker-cli` beside it. The sources and Go's caches stay under
/// `target/engines/29`, named by version, so a rebuild takes seconds and a new version
/// builds anew.
fn build_29(root: &Path) -> Result<()> {
    preflight(Engine::V29)?;
    let sources = sources_dir()?;
    check_sources(&sources)?;
    let base = root.parent().expect("a root has a parent").to_path_buf();
    println!(
        "xtask: building Docker {MOBY_VERSION} and runc {RUNC_VERSION} from {} (once: 3-10 \
         minutes on 2 cores; cached in {})",
        sources.display(),
        base.display()
    );
    let apt = PrivateApt::update(
        &base.join("apt"),
        "deb http://deb.debian.org/debian sid main\n",
        "Debian sid",
    )?;
    let go_root = base.join("go-1.26");
    if !go_root.exists() {
        let partial = base.join("go-1.26.partial");
        apt.download_and_unpack(GO_PACKAGES, &partial)
            .context("fetching Go 1.26 from Debian sid")?;
        fs::rename(&partial, &go_root)?;
    }
    let go = go_root.join("usr/lib/go-1.26/bin/go");
    let tmp = base.join("root.partial");
    apt.download_and_unpack(&["containerd", "docker-cli"], &tmp)
        .context("fetching containerd and docker-cli from Debian sid")?;
    let bin = tmp.join("usr/sbin");
    fs::create_dir_all(&bin)?;
    let moby = base.join(format!("src/moby-{MOBY_VERSION}"));
    let runc = base.join(format!("src/runc-{RUNC_VERSION}"));
    fs::create_dir_all(base.join("src"))?;
    unpack(&sources.join(MOBY_SRC), &moby)?;
    unpack(&sources.join(RUNC_SRC), &runc)?;
    // Nothing of the caller's Go setup (GOOS, GOWORK, CC, CGO_* ...) reaches the build.
    let go_cmd = |dir: &Path, cgo: bool| {
        let mut c = Command::new(&go);
        c.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &base)
            .env("GOTOOLCHAIN", "local")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-mod=vendor -buildvcs=false")
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", if cgo { "1" } else { "0" })
            .env("GOCACHE", base.join("gocache"))
            .env("GOPATH", base.join("gopath"))
            .env("GOROOT", go_root.join("usr/lib/go-1.26"));
        c
    };
    run(go_cmd(&moby, false)
        .args(["build", "-tags", "netgo osusergo static_build", "-ldflags"])
        .arg(format!(
            "-s -w -X github.com/moby/moby/v2/dockerversion.Version={MOBY_VERSION} \
             -X github.com/moby/moby/v2/dockerversion.GitCommit={MOBY_COMMIT}"
        ))
        .arg("-o")
        .arg(bin.join("dockerd"))
        .arg("./cmd/dockerd"))
    .context("building dockerd")?;
    run(go_cmd(&moby, false)
        .args(["build", "-ldflags", "-s -w", "-o"])
        .arg(bin.join("docker-proxy"))
        .arg("./cmd/docker-proxy"))
    .context("building docker-proxy")?;
    run(go_cmd(&runc, true)
        .args([
            "build",
            "-trimpath",
            "-tags",
            "seccomp urfave_cli_no_docs",
            "-ldflags",
        ])
        .arg(format!(
            "-X main.version={RUNC_VERSION} -extldflags -static"
        ))
        .arg("-o")
        .arg(bin.join("runc"))
        .arg("."))
    .context("building runc")?;
    let _ = fs::remove_dir_all(root);
    fs::rename(&tmp, root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_keep_their_state_apart() {
        assert_eq!(Engine::Host.data_root(), None);
        assert_eq!(
            Engine::V28.data_root().as_deref(),
            Some("/var/lib/dataplane-docker-28")
        );
        assert_ne!(Engine::V26.exec_root(), Engine::V28.exec_root());
    }
}
