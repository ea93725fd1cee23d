//! What the agent reads from containers' network namespaces: their cookies (the socket
//! hooks know a client only by `bpf_get_netns_cookie`, so the agent reads each container's
//! cookie with `SO_NETNS_COOKIE` on a socket made inside its namespace and writes it to the
//! peer-networks map) and their default routes (which endpoint Docker publishes through).

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

use crate::model::desired::DefaultRoutes;

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

/// The default routes of the network namespace of `pid` (`/proc/<pid>/net/route` and
/// `ipv6_route`, read without entering it). None when they cannot be read (the process is
/// gone).
pub fn default_routes(pid: i64) -> Option<DefaultRoutes> {
    // Bounded: a container with CAP_NET_ADMIN writes its own routes.
    let read = |p: String| crate::egress::dns::read_bounded(&p);
    let v4 = read(format!("/proc/{pid}/net/route"))?;
    let v6 = read(format!("/proc/{pid}/net/ipv6_route")).unwrap_or_default();
    Some(DefaultRoutes {
        v4: default_v4(&v4),
        v6: default_v6(&v6),
    })
}

/// The gateway of the default route with the lowest metric in `/proc/net/route` text
/// (addresses as hex of the in-memory, network-order word).
fn default_v4(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(f.get(i)?, 16).ok();
            let (dest, gw, flags, metric, mask) = (hex(1)?, hex(2)?, hex(3)?, f.get(6)?, hex(7)?);
            let up_gw = flags & 0x3 == 0x3;
            (dest == 0 && mask == 0 && gw != 0 && up_gw)
                .then(|| {
                    Some((
                        metric.parse::<u32>().ok()?,
                        Ipv4Addr::from(gw.to_ne_bytes()),
                    ))
                })
                .flatten()
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, gw)| gw)
}

/// The next hop of the default route with the lowest metric in `/proc/net/ipv6_route` text.
fn default_v6(text: &str) -> Option<Ipv6Addr> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, plen, hop, metric) = (f.first()?, f.get(1)?, f.get(4)?, f.get(5)?);
            if dest.chars().any(|c| c != '0') || *plen != "00" {
                return None;
            }
            let hop = u128::from_str_radix(hop, 16).ok().filter(|h| *h != 0)?;
            Some((u32::from_str_radix(metric, 16).ok()?, Ipv6Addr::from(hop)))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, hop)| hop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_from_proc_text() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth1\t00000000\t01001FAC\t0003\t0\t0\t10\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(default_v4(v4), Some(Ipv4Addr::new(172, 17, 0, 1)));
        assert_eq!(default_v4("Iface\tDestination\n"), None);
        let v6 = "fd00deadbeef00000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd00deadbeef00000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_v6(v6), Some("fd00:dead:beef::1".parse().unwrap()));
        assert_eq!(default_v6(""), None);
    }

    #[test]
    fn a_missing_namespace_is_an_error_not_a_cookie() {
        let r = cookies(vec![PathBuf::from("/nonexistent/netns")]);
        assert_eq!(r.len(), 1);
        assert!(r[0].is_err());
        assert!(cookies(Vec::new()).is_empty());
    }
}
