//! A private apt configuration: its own sources, lists and cache under one directory, so
//! packages of another Debian release (an engine, a kernel) are downloaded and unpacked
//! with `dpkg-deb -x` without anything of the system's apt state changing, and nothing is
//! installed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::util::run;

pub struct PrivateApt {
    dir: PathBuf,
    opts: Vec<String>,
}

impl PrivateApt {
    /// The configuration in `dir`, with `sources` (sources.list lines) as its only
    /// sources, and its index updated (`what` names them in errors).
    pub fn update(dir: &Path, sources: &str, what: &str) -> Result<Self> {
        for d in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let list = dir.join("sources.list");
        fs::write(&list, sources)?;
        let apt = Self {
            dir: dir.to_path_buf(),
            opts: apt_opts(dir, &list),
        };
        run(Command::new("apt-get")
            .args(&apt.opts)
            .args(["-q", "update"]))
        .with_context(|| format!("apt-get update for {what}"))?;
        Ok(apt)
    }

    /// `apt-cache <args>`'s output.
    pub fn cache(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("apt-cache")
            .args(&self.opts)
            .args(args)
            .output()
            .with_context(|| format!("apt-cache {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads `packages` (replacing earlier downloads) and unpacks every one into a new
    /// directory `into` (emptied first).
    pub fn download_and_unpack(&self, packages: &[&str], into: &Path) -> Result<()> {
        let debs = self.dir.join("debs");
        for old in fs::read_dir(&debs)? {
            fs::remove_file(old?.path())?;
        }
        run(Command::new("apt-get")
            .args(&self.opts)
            .args(["-q", "download"])
            .args(packages)
            .current_dir(&debs))
        .with_context(|| format!("downloading {}", packages.join(", ")))?;
        let _ = fs::remove_dir_all(into);
        fs::create_dir_all(into)?;
        for deb in fs::read_dir(&debs)? {
            let deb = deb?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into))
                    .with_context(|| format!("unpacking {}", deb.display()))?;
            }
        }
        Ok(())
    }
}

/// apt options that use only `dir` and `sources`: nothing of the system's apt state changes.
fn apt_opts(dir: &Path, sources: &Path) -> Vec<String> {
    vec![
        format!("-oDir::Etc::SourceList={}", sources.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Get::List-Cleanup=0".into(),
        "-oAcquire::Languages=none".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_stays_private() {
        let o = apt_opts(Path::new("/x"), Path::new("/x/s.list"));
        assert!(
            o.iter()
                .any(|a| a == "-oDir::Etc::SourceParts=/nonexistent")
        );
        assert!(o.iter().all(|a| !a.contains("/etc/apt")));
    }
}
