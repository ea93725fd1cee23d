//! Notices ruleset changes (nftables, which iptables-nft goes through too) as they happen:
//! an operator's rule added after the agent started is taken into account within
//! milliseconds, not at the next periodic resync.

use std::{io, os::fd::AsRawFd, time::Duration};

use anyhow::{Context, Result};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use tokio::sync::mpsc;

/// `NFNLGRP_NFTABLES`: the multicast group of nftables ruleset changes.
const NFNLGRP_NFTABLES: u32 = 7;

/// Sends a tick on `tx` (coalesced) whenever the ruleset changes. Runs on a thread of its
/// own for the agent's lifetime.
pub fn watch(tx: mpsc::Sender<()>) -> Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .context("opening a netfilter netlink socket")?;
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
                match nix::unistd::read(&fd, &mut buf) {
                    Ok(0) => return,
                    // ENOBUFS: changes were lost, which still means "something changed".
                    Ok(_) | Err(nix::errno::Errno::ENOBUFS) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %io::Error::from(e), "watching ruleset changes stopped");
                        return;
                    }
                }
                // A transaction arrives as a burst of messages: let it finish, take it all.
                std::thread::sleep(Duration::from_millis(20));
                while nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                    .is_ok_and(|n| n > 0)
                {}
                if tx.is_closed() {
                    return;
                }
                let _ = tx.try_send(());
            }
        })
        .context("starting the ruleset watcher")?;
    Ok(())
}
