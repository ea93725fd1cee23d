//! Network namespace cookies of Docker's containers: the socket hooks know a client only by
//! `bpf_get_netns_cookie`, so the agent reads each container's cookie (`SO_NETNS_COOKIE` on a
//! socket made inside its namespace) and writes it to the peer-networks map.

use std::{fs::File, path::PathBuf};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// The cookie of the network namespace at each path (`/var/run/docker/netns/<id>`, or
/// `/proc/<pid>/ns/net`), in order. One short-lived thread enters them one after another,
/// so no thread of the agent's runtime ever leaves the host namespace.
pub fn cookies(paths: Vec<PathBuf>) -> Vec<Result<u64>> {
    if paths.is_empty() {
        return Vec::new();
    }
    let n = paths.len();
    std::thread::Builder::new()
        .name("netns-cookies".into())
        .spawn(move || paths.iter().map(cookie_at).collect())
        .map_err(anyhow::Error::from)
        .and_then(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("the netns-cookie thread panicked"))
        })
        .unwrap_or_else(|e| {
            let msg = format!("{e:#}");
            (0..n).map(|_| Err(anyhow::anyhow!("{msg}"))).collect()
        })
}

fn cookie_at(path: &PathBuf) -> Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {}", path.display()))?;
    crate::bpf::netns_cookie()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_an_error_not_a_cookie() {
        let r = cookies(vec![PathBuf::from("/nonexistent/netns")]);
        assert_eq!(r.len(), 1);
        assert!(r[0].is_err());
        assert!(cookies(Vec::new()).is_empty());
    }
}
