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

    /// Where its binaries live (29's two backends share one build).
    fn root(self) -> PathBuf {
        let dir = if self.built() { "29" } else { self.tag() };
        project_root().join("target/engines").join(dir).join("root")
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
/// the project's folder.
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
    for f in [MOBY_SRC, RUNC_SRC] {
        if !dir.join(f).is_file() {
            bail!(
                "Docker 29 is built from {f}, not found in {} (set DATAPLANE_ENGINE_SOURCES to \
                 the folder that holds {MOBY_SRC} and {RUNC_SRC})",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Builds Docker 29 into `root` (`usr/sbin/dockerd`, `docker-proxy`, `runc`), with sid's
/// `containerd` and `docker-cli` beside it. Go's caches stay under `target/engines/29` so
/// a rebuild takes seconds.
fn build_29(root: &Path) -> Result<()> {
    let sources = sources_dir()?;
    let base = root.parent().expect("a root has a parent").to_path_buf();
    for tool in ["pkg-config", "xz"] {
        if !crate::util::run_status(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .unwrap_or(false)
        {
            bail!("building Docker 29 needs `{tool}`: run `cargo xtask setup` as root");
        }
    }
    if !Path::new("/usr/include/seccomp.h").exists() {
        bail!("building runc needs libseccomp-dev: run `cargo xtask setup` as root");
    }
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
    let go_root = base.join("go");
    if !go_root.join("usr/lib/go-1.26/bin/go").exists() {
        apt.download_and_unpack(GO_PACKAGES, &go_root)
            .context("fetching Go 1.26 from Debian sid")?;
    }
    let go = go_root.join("usr/lib/go-1.26/bin/go");
    let tmp = base.join("root.partial");
    apt.download_and_unpack(&["containerd", "docker-cli"], &tmp)
        .context("fetching containerd and docker-cli from Debian sid")?;
    let bin = tmp.join("usr/sbin");
    fs::create_dir_all(&bin)?;
    let src = base.join("src");
    for (tarball, dir) in [(MOBY_SRC, "moby"), (RUNC_SRC, "runc")] {
        let d = src.join(dir);
        if !d.join("go.mod").exists() {
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d)?;
            run(Command::new("tar")
                .arg("-xJf")
                .arg(sources.join(tarball))
                .arg("-C")
                .arg(&d))
            .with_context(|| format!("unpacking {tarball}"))?;
        }
    }
    let go_cmd = |dir: &Path, cgo: bool| {
        let mut c = Command::new(&go);
        c.current_dir(dir)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=vendor")
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", if cgo { "1" } else { "0" })
            .env("GOCACHE", base.join("gocache"))
            .env("GOPATH", base.join("gopath"))
            .env("GOROOT", go_root.join("usr/lib/go-1.26"));
        c
    };
    let moby = src.join("moby");
    run(go_cmd(&moby, false)
        .args(["build", "-tags", "netgo osusergo static_build", "-ldflags"])
        .arg(format!(
            "-s -w -X github.com/moby/moby/v2/dockerversion.Version={MOBY_VERSION}"
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
    run(go_cmd(&src.join("runc"), true)
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
