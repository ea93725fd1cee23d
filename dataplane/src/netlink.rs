//! Host and bridge-gateway addresses from rtnetlink, dumped and then watched.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::{Context, Result};
use dataplane_common::{Addr, LOCAL_GATEWAY, LOCAL_HOST, LocalAddr};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, MulticastGroup,
    packet_route::{address::AddressAttribute, link::LinkAttribute},
};
use tokio::sync::mpsc;

use crate::model::desired::ip_to_addr;

/// An address configured on a host interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub ifname: String,
}

/// The local-address map's desired content.
///
/// Loopback addresses are left out on purpose: loopback is recognised by range and only in
/// the host network namespace, while this map applies in every namespace. IPv6 link-local
/// addresses are left out too: they are only meaningful with an interface scope.
/// `bridges` are Docker's bridge interfaces (from its network list): their addresses are
/// gateways, every other one a host address (the kind is informational).
pub fn local_map(addrs: &[HostAddr], bridges: &BTreeSet<String>) -> BTreeMap<Addr, LocalAddr> {
    let mut out = BTreeMap::new();
    for a in addrs {
        let skip = match a.ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_unicast_link_local(),
        };
        if skip {
            continue;
        }
        let kind = if bridges.contains(&a.ifname) {
            LOCAL_GATEWAY
        } else {
            LOCAL_HOST
        };
        out.insert(ip_to_addr(a.ip), LocalAddr { kind });
    }
    out
}

/// Every address on every interface of this network namespace.
pub async fn dump(handle: &Handle) -> Result<Vec<HostAddr>> {
    let mut names = HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.context("netlink link dump")? {
        for attr in &l.attributes {
            if let LinkAttribute::IfName(n) = attr {
                names.insert(l.header.index, n.clone());
            }
        }
    }
    let mut out = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Some(m) = addrs.try_next().await.context("netlink address dump")? {
        let ifname = names.get(&m.header.index).cloned().unwrap_or_default();
        // IFA_LOCAL is the interface's own address on point-to-point links, IFA_ADDRESS
        // otherwise; take both.
        for attr in &m.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                let h = HostAddr {
                    ip: *ip,
                    prefix_len: m.header.prefix_len,
                    ifname: ifname.clone(),
                };
                if !out.contains(&h) {
                    out.push(h);
                }
            }
        }
    }
    Ok(out)
}

/// A netlink connection for dumps.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection for dumps, and ticks whenever a link or address changes.
pub fn connect_and_watch() -> Result<(Handle, mpsc::Receiver<()>)> {
    let handle = connect()?;
    let (tx, rx) = mpsc::channel(1);
    watch(tx)?;
    Ok((handle, rx))
}

/// Sends a tick on `tx` whenever a link or address changes.
pub fn watch(tx: mpsc::Sender<()>) -> Result<()> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .context("subscribing to rtnetlink link and address changes")?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while messages.next().await.is_some() {
            // A full channel already holds a pending tick: the resync will see this change.
            let _ = tx.try_send(());
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use dataplane_common::v4_mapped;

    use super::*;

    fn a(ip: &str, ifname: &str) -> HostAddr {
        HostAddr {
            ip: ip.parse().unwrap(),
            prefix_len: 24,
            ifname: ifname.into(),
        }
    }

    #[test]
    fn local_map_kinds_and_exclusions() {
        let bridges: BTreeSet<String> = ["docker0".into(), "br-0123456789ab".into()].into();
        let m = local_map(
            &[
                a("127.0.0.1", "lo"),
                a("::1", "lo"),
                a("192.0.2.2", "eth0"),
                a("fd00::2", "eth0"),
                a("fe80::1", "eth0"),
                a("172.17.0.1", "docker0"),
                a("172.18.0.1", "br-0123456789ab"),
                a("192.168.50.1", "br-lan"),
            ],
            &bridges,
        );
        assert_eq!(m.len(), 5);
        // A LAN bridge named like Docker's is not Docker's.
        assert_eq!(m[&v4_mapped([192, 168, 50, 1])].kind, LOCAL_HOST);
        assert_eq!(m[&v4_mapped([192, 0, 2, 2])].kind, LOCAL_HOST);
        assert_eq!(m[&v4_mapped([172, 17, 0, 1])].kind, LOCAL_GATEWAY);
        assert_eq!(m[&v4_mapped([172, 18, 0, 1])].kind, LOCAL_GATEWAY);
        let fd: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(m[&ip_to_addr(fd)].kind, LOCAL_HOST);
        assert!(!m.contains_key(&v4_mapped([127, 0, 0, 1])));
    }
}
