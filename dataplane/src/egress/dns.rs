//! Resolving allow-list host names: the host's resolver (`/etc/resolv.conf`) or the one the
//! config names, with no cache of its own, so each lookup sees the record as it is now and
//! its TTL says when to look again.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
};

/// Looked up again this long before the TTL runs out (a fifth of it, at least 1 s).
pub fn refresh_after(ttl: Duration) -> Duration {
    let ttl = ttl.max(Duration::from_secs(1));
    ttl.saturating_sub(ttl / 5)
        .clamp(Duration::from_millis(800), Duration::from_hours(1))
}

/// After a failed lookup, the next try.
pub const RETRY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// The host's resolver, or `server`.
    pub fn new(server: Option<SocketAddr>) -> anyhow::Result<Self> {
        let (config, mut opts) = match server {
            Some(addr) => (
                ResolverConfig::from_parts(
                    None,
                    Vec::new(),
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                ),
                ResolverOpts::default(),
            ),
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| anyhow::anyhow!("reading /etc/resolv.conf: {e}"))?,
        };
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let inner = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        Ok(Self { inner })
    }

    /// The name's addresses and when to look again.
    pub async fn resolve(&self, name: &str) -> Result<(BTreeSet<IpAddr>, Instant), String> {
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(l) => {
                let addrs: BTreeSet<IpAddr> = l.iter().collect();
                let ttl = l.valid_until().saturating_duration_since(Instant::now());
                if addrs.is_empty() {
                    Err("no addresses".into())
                } else {
                    Ok((addrs, Instant::now() + refresh_after(ttl)))
                }
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Nameservers of a `resolv.conf` text.
pub fn nameservers(text: &str) -> BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next())?
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// The most of a file the agent reads when a container or anyone else may have written it.
pub const READ_LIMIT: u64 = 64 * 1024;

/// The first [`READ_LIMIT`] bytes of `path` as text.
pub fn read_bounded(path: &str) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(READ_LIMIT)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The host's resolvers as Docker reads them: `/etc/resolv.conf`, or systemd-resolved's
/// upstreams where that file names only its local stub. Loopback ones are left out (Docker
/// leaves them out of what it gives containers).
pub fn host_resolvers() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Some(t) = read_bounded(path) {
            out.extend(nameservers(&t));
        }
    }
    out.retain(|a| !a.is_loopback() && !a.is_unspecified());
    out
}

/// Docker's fallback when the host names no resolver a container can use.
const DOCKER_DEFAULT_DNS: [&str; 4] = [
    "8.8.8.8",
    "8.8.4.4",
    "2001:4860:4860::8888",
    "2001:4860:4860::8844",
];

/// The resolvers Docker gives a container, as Docker chooses them: its own `--dns`, else
/// the daemon's `dns`, else the host's, else Docker's defaults. Docker's embedded resolver
/// (user-defined networks) forwards to the same ones from the container's namespace; on
/// the default bridge they are what Docker wrote into its `resolv.conf`. Never read from
/// that file: the container can write it.
pub fn docker_resolvers(
    container: &BTreeSet<IpAddr>,
    daemon: &[IpAddr],
    host: &BTreeSet<IpAddr>,
) -> BTreeSet<IpAddr> {
    let pick: BTreeSet<IpAddr> = if !container.is_empty() {
        container.clone()
    } else if !daemon.is_empty() {
        daemon.iter().copied().collect()
    } else if !host.is_empty() {
        host.clone()
    } else {
        DOCKER_DEFAULT_DNS
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    };
    pick.into_iter()
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_before_the_ttl_runs_out() {
        assert_eq!(
            refresh_after(Duration::from_secs(10)),
            Duration::from_secs(8)
        );
        assert_eq!(refresh_after(Duration::ZERO), Duration::from_millis(800));
        assert_eq!(
            refresh_after(Duration::from_hours(24)),
            Duration::from_hours(1)
        );
    }

    #[test]
    fn resolvers_are_the_ones_docker_gives() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let host: BTreeSet<IpAddr> = [ip("192.0.2.53")].into();
        let own: BTreeSet<IpAddr> = [ip("198.51.100.1"), ip("127.0.0.1")].into();
        assert_eq!(
            docker_resolvers(&own, &[ip("203.0.113.9")], &host),
            [ip("198.51.100.1")].into()
        );
        assert_eq!(
            docker_resolvers(&BTreeSet::new(), &[ip("203.0.113.9")], &host),
            [ip("203.0.113.9")].into()
        );
        assert_eq!(docker_resolvers(&BTreeSet::new(), &[], &host), host);
        assert!(docker_resolvers(&BTreeSet::new(), &[], &BTreeSet::new()).contains(&ip("8.8.8.8")));
    }

    #[test]
    fn a_huge_file_is_read_only_so_far() {
        let dir = std::env::temp_dir().join(format!("dp-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("resolv.conf");
        std::fs::write(&p, "nameserver 192.0.2.1\n".repeat(100_000)).unwrap();
        let t = read_bounded(p.to_str().unwrap()).unwrap();
        assert_eq!(t.len() as u64, READ_LIMIT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nameservers_of_a_resolv_conf() {
        let t = "# generated\nsearch example\nnameserver 127.0.0.11\nnameserver 192.0.2.53\n\
                 nameserver fe80::1%eth0\noptions ndots:0\n";
        let n = nameservers(t);
        assert!(n.contains(&"192.0.2.53".parse::<IpAddr>().unwrap()));
        assert!(n.contains(&"fe80::1".parse::<IpAddr>().unwrap()));
        assert_eq!(n.len(), 3);
    }
}
