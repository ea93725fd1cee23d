//! The Docker engines the project is tested against, besides the host's own: Debian's
//! `docker.io` from newer suites, fetched once through a private apt configuration (no
//! system change: `apt-get download`, `dpkg-deb -x`) and cached under `target/engines/`.
//! Each runs with its own data root and exec root, its binaries first in `PATH`, the host's
//! `runc`.

use std::{fs, path::PathBuf};

use anyhow::{Result, bail};

use crate::{apt::PrivateApt, util::project_root};

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
}

impl Engine {
    /// The Debian suite its packages come from; `None`: the host's own.
    const fn suite(self) -> Option<&'static str> {
        match self {
            Self::Host | Self::V20 => None,
            Self::V26 => Some("trixie"),
            Self::V28 => Some("sid"),
        }
    }

    /// A short name for paths.
    pub const fn tag(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::V20 => "20",
            Self::V26 => "26",
            Self::V28 => "28",
        }
    }

    /// Where its unpacked packages live.
    fn root(self) -> PathBuf {
        project_root()
            .join("target/engines")
            .join(self.tag())
            .join("root")
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
