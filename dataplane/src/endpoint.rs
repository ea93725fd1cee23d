//! Where the packet layer delivers to a container ([`PktEndpoint`]): the host-side veth of
//! the container's interface that holds an address, that interface's MAC (both read from
//! inside the container's network namespace, by one short-lived thread: no thread of the
//! agent's runtime ever leaves the host's), and the MAC of the bridge the veth is on.

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use dataplane_common::pkt::PktEndpoint;
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{address::AddressAttribute, link::LinkAttribute},
};

/// What a link dump says of one interface.
#[derive(Clone, Debug, Default)]
struct Link {
    mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: a veth's peer index (in the peer's namespace).
    peer: Option<u32>,
    /// `IFLA_MASTER`: the bridge it is a port of.
    master: Option<u32>,
}

async fn links(handle: &Handle) -> Result<HashMap<u32, Link>> {
    let mut out = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(l) = dump.try_next().await.context("netlink link dump")? {
        let mut link = Link::default();
        for attr in &l.attributes {
            match attr {
                LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Link(i) => link.peer = Some(*i),
                LinkAttribute::Controller(i) => link.master = Some(*i),
                _ => {}
            }
        }
        out.insert(l.header.index, link);
    }
    Ok(out)
}

/// The index of the interface holding `addr`.
async fn index_of(handle: &Handle, addr: IpAddr) -> Result<Option<u32>> {
    let mut dump = handle.address().get().execute();
    while let Some(m) = dump.try_next().await.context("netlink address dump")? {
        let has = m.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == addr)
        });
        if has {
            return Ok(Some(m.header.index));
        }
    }
    Ok(None)
}

/// Runs `f` with an rtnetlink handle of the calling thread's namespace.
async fn with_handle<T>(f: impl AsyncFnOnce(&Handle) -> Result<T>) -> Result<T> {
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
    let task = tokio::spawn(conn);
    let r = f(&handle).await;
    task.abort();
    r
}

/// Runs `f` with an rtnetlink handle of the namespace at `netns`, on a short-lived thread
/// of its own (no thread of the agent's runtime ever leaves the host's namespace).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    name: &str,
    f: impl AsyncFnOnce(&Handle) -> Result<T> + Send + 'static,
) -> Result<T> {
    let netns = netns.to_path_buf();
    let run = move || -> Result<T> {
        let file =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", netns.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(with_handle(f))
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .context("spawning a thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread panicked"))?
}

/// The interface in the namespace at `netns` holding `addr`: its MAC and its veth peer's
/// index in the host.
fn inside(netns: &Path, addr: IpAddr) -> Result<([u8; 6], u32)> {
    in_netns(netns, "endpoint", async move |h: &Handle| {
        let Some(index) = index_of(h, addr).await? else {
            bail!("no interface holds {addr}");
        };
        let link = links(h).await?.remove(&index).unwrap_or_default();
        match (link.mac, link.peer) {
            (Some(mac), Some(peer)) if peer != index => Ok((mac, peer)),
            _ => bail!("the interface holding {addr} is not a veth"),
        }
    })
}

/// Where to deliver to `addr` in the namespace at `netns` (a container's), its veth's peer
/// being a port of a bridge in the calling thread's namespace (the host's).
pub async fn of(netns: &Path, addr: IpAddr) -> Result<PktEndpoint> {
    let path = netns.to_path_buf();
    let (mac, ifindex) = tokio::task::spawn_blocking(move || inside(&path, addr))
        .await
        .context("the endpoint task")??;
    let host = with_handle(async |h: &Handle| links(h).await).await?;
    let bridge = host
        .get(&ifindex)
        .and_then(|l| l.master)
        .with_context(|| format!("the host-side veth {ifindex} of {addr} is on no bridge"))?;
    let gw_mac = host
        .get(&bridge)
        .and_then(|l| l.mac)
        .with_context(|| format!("bridge {bridge} has no MAC"))?;
    Ok(PktEndpoint {
        ifindex,
        mac,
        gw_mac,
    })
}

/// One interface of a container's namespace whose veth peer is a bridge port in the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// The host-side veth's name.
    pub host_ifname: String,
    /// The container-side interface's MAC and addresses, as the kernel has them.
    pub mac: [u8; 6],
    pub addrs: Vec<IpAddr>,
}

/// A veth inside a namespace: its MAC, its addresses, its peer's index, its own index.
type Inside = ([u8; 6], Vec<IpAddr>, u32, u32);

/// Every veth of the namespace at `netns`.
fn veths_inside(netns: &Path) -> Result<Vec<Inside>> {
    in_netns(netns, "ports", async |h: &Handle| {
        let links = links(h).await?;
        let mut addrs: HashMap<u32, Vec<IpAddr>> = HashMap::new();
        let mut dump = h.address().get().execute();
        while let Some(m) = dump.try_next().await.context("netlink address dump")? {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    addrs.entry(m.header.index).or_default().push(*ip);
                }
            }
        }
        Ok(links
            .into_iter()
            .filter_map(|(index, l)| match (l.mac, l.peer) {
                (Some(mac), Some(peer)) if peer != index && peer != 0 => {
                    Some((mac, addrs.remove(&index).unwrap_or_default(), peer, index))
                }
                _ => None,
            })
            .collect())
    })
}

/// A host interface: its name, the bridge it is a port of, its veth peer's index (in the
/// peer's namespace).
#[derive(Clone, Debug, Default)]
pub struct HostLink {
    pub name: String,
    pub master: Option<u32>,
    pub peer: Option<u32>,
}

/// The host's interfaces by index.
pub type HostLinks = HashMap<u32, HostLink>;

/// The host's interfaces (one link dump). Blocking (its own thread and runtime).
pub fn host_links() -> Result<HostLinks> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<HostLinks> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(with_handle(async |h: &Handle| links_named(h).await))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread panicked"))?
    })
}

/// The bridge ports in the host (`host`: its interfaces) behind the veths of the
/// namespace at `netns` (a container's). Blocking: enters the namespace on a thread of its
/// own.
pub fn ports(netns: &Path, host: &HostLinks) -> Result<Vec<Port>> {
    let inside = veths_inside(netns)?;
    Ok(inside
        .into_iter()
        .filter_map(|(mac, addrs, peer, index)| {
            let h = host.get(&peer)?;
            // Indexes are per namespace: the host-side veth must name this one as its
            // peer too (a pair the container made itself, or one into another namespace,
            // would point at an unrelated host interface).
            (h.master.is_some() && h.peer == Some(index)).then(|| Port {
                host_ifname: h.name.clone(),
                mac,
                addrs,
            })
        })
        .collect())
}

/// Every interface's name, bridge and veth peer.
async fn links_named(handle: &Handle) -> Result<HostLinks> {
    let mut out = HashMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(l) = dump.try_next().await.context("netlink link dump")? {
        let mut link = HostLink::default();
        for attr in &l.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Controller(i) => link.master = Some(*i),
                LinkAttribute::Link(i) => link.peer = Some(*i),
                _ => {}
            }
        }
        out.insert(l.header.index, link);
    }
    Ok(out)
}

/// Every veth of the host (`host`), with the name of the bridge it is a port of.
pub fn host_veths(host: &HostLinks) -> Vec<(String, Option<String>)> {
    host.values()
        .filter(|l| l.name.starts_with("veth"))
        .map(|l| {
            let bridge = l.master.and_then(|m| host.get(&m)).map(|b| b.name.clone());
            (l.name.clone(), bridge)
        })
        .collect()
}
