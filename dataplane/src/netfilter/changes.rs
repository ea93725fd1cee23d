//! Notices ruleset changes (nftables, which iptables-nft goes through too) as they happen:
//! an operator's rule added after the agent started is taken into account within
//! milliseconds, not at the next periodic resync. Each notification says which table and
//! chain changed, so that Docker's own per-container rules (a container start changes
//! `nat DOCKER`, `filter DOCKER`, and on 28 `raw PREROUTING`) do not make the agent re-read
//! the whole ruleset each time: on a host with many containers that read grows with every
//! container.

use std::{
    collections::BTreeSet,
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use tokio::sync::mpsc;

/// `NFNLGRP_NFTABLES`: the multicast group of nftables ruleset changes.
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES`, the high byte of a message's type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_*` (low byte): rule changes name their table and chain.
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
/// The generation notice that ends a transaction: says nothing of what changed.
const NFT_MSG_NEWGEN: u16 = 15;
/// `NFTA_RULE_TABLE`, `NFTA_RULE_CHAIN`; every other object's table is attribute 1 too.
const NFTA_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG_LEN: usize = 4;

/// (family, table, chain), as `nft` names them (`ip`, `filter`, `FORWARD`).
pub type ChainId = (String, String, String);

/// What a burst of ruleset notifications touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Anything may have changed: a notification was lost (`ENOBUFS`) or not understood.
    pub anything: bool,
    /// (family, table) of every change understood.
    pub tables: BTreeSet<(String, String)>,
    /// (family, table) of tables whose shape changed: the table, a chain, a set or an
    /// object was added or removed.
    pub reshaped: BTreeSet<(String, String)>,
    /// The chains whose rules changed.
    pub chains: BTreeSet<ChainId>,
}

impl Changes {
    pub fn merge(&mut self, other: Changes) {
        self.anything |= other.anything;
        self.tables.extend(other.tables);
        self.reshaped.extend(other.reshaped);
        self.chains.extend(other.chains);
    }

    pub fn is_empty(&self) -> bool {
        !self.anything
            && self.tables.is_empty()
            && self.reshaped.is_empty()
            && self.chains.is_empty()
    }

    /// Whether table `family table` may have changed.
    pub fn touches_table(&self, family: &str, table: &str) -> bool {
        self.anything || self.tables.iter().any(|(f, t)| f == family && t == table)
    }

    /// Whether a rule of one of `chains` may have changed, or the shape of a table other
    /// than the agent's own ([`is_own_table`]).
    pub fn touches_any(&self, chains: &BTreeSet<ChainId>, own_table: &str) -> bool {
        self.anything
            || self
                .reshaped
                .iter()
                .any(|(f, t)| !is_own_table(f, t, own_table))
            || self.chains.iter().any(|c| chains.contains(c))
    }
}

/// The agent's egress table beside its notrack table `own_table`.
pub fn egress_table(own_table: &str) -> String {
    format!("{own_table}_egress")
}

/// Whether `family table` is one of the agent's own tables (the notrack table
/// `own_table` and its egress table): never an operator's rules.
pub fn is_own_table(family: &str, table: &str, own_table: &str) -> bool {
    let rest = table.strip_prefix(own_table);
    family == "inet" && (table == own_table || rest.is_some_and(|r| r == "_egress" || r == "_fw"))
}

fn family_name(f: u8) -> Option<&'static str> {
    Some(match f {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        _ => return None,
    })
}

/// A NUL-terminated string attribute.
fn attr_str(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// The attributes (type, payload) of a message's body.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
    out
}

/// Adds what the messages in `buf` (one `recv`) changed to `into`.
pub fn parse(buf: &[u8], into: &mut Changes) {
    let mut b = buf;
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            into.anything = true;
            return;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let body = &b[NLMSG_HDRLEN..len];
        parse_one(kind, body, into);
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
}

fn parse_one(kind: u16, body: &[u8], into: &mut Changes) {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES || body.len() < NFGENMSG_LEN {
        into.anything = true;
        return;
    }
    let msg = kind & 0xff;
    if msg == NFT_MSG_NEWGEN {
        return;
    }
    let Some(family) = family_name(body[0]) else {
        into.anything = true;
        return;
    };
    let a = attrs(&body[NFGENMSG_LEN..]);
    let get = |t: u16| a.iter().find(|(k, _)| *k == t).map(|(_, d)| attr_str(d));
    let Some(table) = get(NFTA_TABLE) else {
        into.anything = true;
        return;
    };
    into.tables.insert((family.to_string(), table.clone()));
    if msg == NFT_MSG_NEWRULE || msg == NFT_MSG_DELRULE {
        match get(NFTA_RULE_CHAIN) {
            Some(chain) => {
                into.chains.insert((family.to_string(), table, chain));
            }
            None => into.anything = true,
        }
    } else if !matches!(msg, 12 | 14) {
        // Tables, chains, sets, objects, flowtables: the shape changed. (Set elements,
        // 12 and 14, change only their table's content.)
        into.reshaped.insert((family.to_string(), table));
    }
}

/// A netfilter netlink socket.
fn nfnl_socket() -> Result<std::os::fd::OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .context("opening a netfilter netlink socket")
}

/// The nftables ruleset's generation: the kernel counts every committed transaction, so an
/// unchanged number means an unchanged ruleset (iptables-nft's rules included; legacy
/// iptables tables are not nftables and not counted).
pub fn generation() -> Result<u32> {
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    let fd = nfnl_socket()?;
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
    let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN).expect("small");
    req.extend(len.to_ne_bytes());
    req.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    req.extend(
        u16::try_from(libc::NLM_F_REQUEST)
            .unwrap_or(1)
            .to_ne_bytes(),
    );
    req.extend(1u32.to_ne_bytes());
    req.extend(0u32.to_ne_bytes());
    req.extend([0u8, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, resource 0
    nix::sys::socket::sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .context("asking for the ruleset generation")?;
    let mut buf = vec![0u8; 4096];
    let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .context("reading the ruleset generation")?;
    let b = &buf[..n];
    anyhow::ensure!(
        b.len() >= NLMSG_HDRLEN + NFGENMSG_LEN
            && u16::from_ne_bytes([b[4], b[5]]) == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
        "no generation in the kernel's answer"
    );
    let end = (u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize).min(b.len());
    attrs(&b[NLMSG_HDRLEN + NFGENMSG_LEN..end])
        .into_iter()
        .find(|(k, d)| *k == NFTA_GEN_ID && d.len() == 4)
        .map(|(_, d)| u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
        .context("no generation in the kernel's answer")
}

/// Sends a tick on `tx` (coalesced) whenever the ruleset changes, with what changed merged
/// into `changes`. Runs on a thread of its own for the agent's lifetime.
pub fn watch(tx: mpsc::Sender<()>, changes: Arc<Mutex<Changes>>) -> Result<()> {
    let fd = nfnl_socket()?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)),
    )
    .context("subscribing to nftables ruleset changes")?;
    std::thread::Builder::new()
        .name("nfwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let mut burst = Changes::default();
                match nix::unistd::read(&fd, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => parse(&buf[..n], &mut burst),
                    // ENOBUFS: changes were lost, which still means "something changed".
                    Err(nix::errno::Errno::ENOBUFS) => burst.anything = true,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %io::Error::from(e), "watching ruleset changes stopped");
                        return;
                    }
                }
                // A transaction arrives as a burst of messages: let it finish, take it all.
                std::thread::sleep(Duration::from_millis(20));
                loop {
                    match nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                    {
                        Ok(n) if n > 0 => parse(&buf[..n], &mut burst),
                        Err(nix::errno::Errno::ENOBUFS) => burst.anything = true,
                        _ => break,
                    }
                }
                if tx.is_closed() {
                    return;
                }
                if burst.is_empty() {
                    continue;
                }
                changes.lock().expect("ruleset changes lock").merge(burst);
                let _ = tx.try_send(());
            }
        })
        .context("starting the ruleset watcher")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, s: &str) -> Vec<u8> {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        let len = u16::try_from(4 + d.len()).unwrap();
        let mut out = [len.to_ne_bytes(), kind.to_ne_bytes()].concat();
        out.extend(d);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn msg(msg: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for a in attrs {
            body.extend(a);
        }
        let len = u32::try_from(NLMSG_HDRLEN + body.len()).unwrap();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        let mut out = len.to_ne_bytes().to_vec();
        out.extend(kind.to_ne_bytes());
        out.extend([0u8; 10]);
        out.extend(body);
        out
    }

    fn chain(f: &str, t: &str, c: &str) -> ChainId {
        (f.into(), t.into(), c.into())
    }

    #[test]
    fn a_container_start_touches_dockers_chains_only() {
        // iptables-nft as Docker runs it for `docker run -p`: rules in nat and filter DOCKER,
        // then the generation notice.
        let mut buf = msg(
            NFT_MSG_NEWRULE,
            2,
            &[attr(NFTA_TABLE, "nat"), attr(NFTA_RULE_CHAIN, "DOCKER")],
        );
        buf.extend(msg(
            NFT_MSG_NEWRULE,
            2,
            &[attr(NFTA_TABLE, "filter"), attr(NFTA_RULE_CHAIN, "DOCKER")],
        ));
        buf.extend(msg(NFT_MSG_NEWGEN, 0, &[]));
        let mut ch = Changes::default();
        parse(&buf, &mut ch);
        assert!(!ch.anything);
        assert_eq!(
            ch.chains,
            [
                chain("ip", "filter", "DOCKER"),
                chain("ip", "nat", "DOCKER")
            ]
            .into()
        );
        let watched: BTreeSet<ChainId> = [
            chain("ip", "filter", "INPUT"),
            chain("ip", "filter", "DOCKER-USER"),
        ]
        .into();
        assert!(!ch.touches_any(&watched, "dataplane"));
        assert!(ch.touches_table("ip", "nat"));
        assert!(!ch.touches_table("inet", "dataplane"));

        // An operator's rule in DOCKER-USER is seen.
        let mut ch = Changes::default();
        parse(
            &msg(
                NFT_MSG_DELRULE,
                2,
                &[
                    attr(NFTA_TABLE, "filter"),
                    attr(NFTA_RULE_CHAIN, "DOCKER-USER"),
                ],
            ),
            &mut ch,
        );
        assert!(ch.touches_any(&watched, "dataplane"));
    }

    #[test]
    fn new_tables_chains_and_what_is_not_understood_mean_anything() {
        let none = BTreeSet::new();
        for m in [0, 2, 3, 5, 9, 11] {
            let mut ch = Changes::default();
            parse(&msg(m, 1, &[attr(NFTA_TABLE, "operator")]), &mut ch);
            assert!(ch.touches_any(&none, "dataplane"), "message {m}");
            // The agent's own table, rewritten: not a change of the host's firewall.
            let mut ch = Changes::default();
            parse(&msg(m, 1, &[attr(NFTA_TABLE, "dataplane")]), &mut ch);
            assert!(!ch.touches_any(&none, "dataplane"), "message {m}");
            assert!(ch.touches_table("inet", "dataplane"), "message {m}");
        }
        // Set elements change their table only.
        let mut ch = Changes::default();
        parse(&msg(12, 1, &[attr(NFTA_TABLE, "dataplane")]), &mut ch);
        assert!(!ch.anything && ch.touches_table("inet", "dataplane"));
        // A rule without its chain, a truncated message.
        let mut ch = Changes::default();
        parse(
            &msg(NFT_MSG_NEWRULE, 2, &[attr(NFTA_TABLE, "filter")]),
            &mut ch,
        );
        assert!(ch.anything);
        let mut ch = Changes::default();
        let m = msg(NFT_MSG_NEWRULE, 2, &[attr(NFTA_TABLE, "filter")]);
        parse(&m[..m.len() - 3], &mut ch);
        assert!(ch.anything);
    }
}
