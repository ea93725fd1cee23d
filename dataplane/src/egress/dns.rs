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

/// The resolvers a container may always reach: those in its own `resolv.conf` and, for
/// Docker's embedded resolver (which forwards from the container's namespace), the host's.
/// Loopback ones are inside the container and never pass the host's hooks.
pub fn container_resolvers(container_resolv_conf: Option<&str>) -> BTreeSet<IpAddr> {
    let mut out: BTreeSet<IpAddr> = container_resolv_conf.map(nameservers).unwrap_or_default();
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Ok(t) = std::fs::read_to_string(path) {
            out.extend(nameservers(&t));
        }
    }
    out.retain(|a| !a.is_loopback() && !a.is_unspecified());
    out
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
    fn nameservers_of_a_resolv_conf() {
        let t = "# generated\nsearch example\nnameserver 127.0.0.11\nnameserver 192.0.2.53\n\
                 nameserver fe80::1%eth0\noptions ndots:0\n";
        let n = nameservers(t);
        assert!(n.contains(&"192.0.2.53".parse::<IpAddr>().unwrap()));
        assert!(n.contains(&"fe80::1".parse::<IpAddr>().unwrap()));
        assert_eq!(n.len(), 3);
    }
}
