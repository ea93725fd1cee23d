//! Everything the agent does with netfilter: what its own nftables tables have in common
//! ([`table`]: written from a spec, read back, repaired; [`nft`]: running `nft`;
//! [`listing`]: a ruleset read with the `nftables` crate's schema), its notrack table
//! ([`notrack`]), the removal of an earlier version's iptables chain ([`legacy`]), and
//! change notifications ([`changes`]).
//!
//! The notrack table's writer: one background task that applies the latest requested
//! [`notrack::Spec`] (a `watch` channel: requests coalesce, the newest wins), off the event
//! loop, after the maps: a new frontend answers at once, its notrack rules follow. The table
//! is written by child processes (`nft`, and `conntrack` to read the connections Docker's
//! NAT carries: tens to hundreds of milliseconds on a busy host), in a blocking task. A
//! failed write is retried with backoff until it succeeds or a newer request replaces it.
//! Each transaction's outcome goes to the [`Report`] the task was started with.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

pub mod changes;
pub mod legacy;
pub mod listing;
pub mod nft;
pub mod notrack;
pub mod ruleset;
pub mod table;

use crate::retry::Backoff;
use notrack::Notrack;

#[derive(Clone, Debug, Default)]
struct Want {
    spec: Option<notrack::Spec>,
    /// Bumped by each request to re-apply even an unchanged table.
    force: u64,
    /// Bumped by each request to read the table back and repair drift.
    check: u64,
}

/// Where the writer reports each transaction it runs on the table: how long it took, and
/// whether it succeeded (called from the writer's blocking task).
pub type Report = Arc<dyn Fn(Duration, bool) + Send + Sync>;

pub struct NetfilterTask {
    tx: watch::Sender<Want>,
    task: JoinHandle<Option<Notrack>>,
}

impl NetfilterTask {
    /// Starts the task for `notrack`'s table; the outcome of each transaction goes to
    /// `report`.
    pub fn start(mut notrack: Notrack, report: Report) -> Self {
        let (tx, mut rx) = watch::channel(Want::default());
        let task = tokio::spawn(async move {
            let (mut forced, mut checked) = (0, 0);
            let mut backoff = Backoff::new();
            let mut retry = None;
            loop {
                // A new request, or (after a failure) the time to try the latest again.
                let go = match retry {
                    None => rx.changed().await.is_ok(),
                    Some(wait) => tokio::select! {
                        r = rx.changed() => r.is_ok(),
                        () = tokio::time::sleep(wait) => true,
                    },
                };
                if !go {
                    break;
                }
                let want = rx.borrow_and_update().clone();
                let Some(spec) = want.spec else { continue };
                let force = want.force != forced;
                let check = want.check != checked;
                checked = want.check;
                let report = Arc::clone(&report);
                let (n, ok) = match tokio::task::spawn_blocking(move || {
                    let mut ok = write(&mut notrack, spec, force, &*report);
                    if ok && check {
                        ok = repair(&mut notrack);
                    }
                    (notrack, ok)
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "the nftables writer failed");
                        return None;
                    }
                };
                notrack = n;
                if ok {
                    forced = want.force;
                    backoff.succeeded();
                    retry = None;
                } else {
                    retry = Some(backoff.failed());
                }
            }
            Some(notrack)
        });
        Self { tx, task }
    }

    /// No more updates: waits for what was asked to be written (the table stays, for the
    /// next agent; when the agent stops with its programs pinned).
    pub async fn close(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            warn!(error = %e, "the nftables writer failed");
        }
    }

    /// No more updates: waits for the one running, then removes the table (when the agent
    /// stops and its programs detach).
    pub async fn close_and_remove(self) {
        drop(self.tx);
        match self.task.await {
            Ok(Some(mut nt)) => {
                let r = tokio::task::spawn_blocking(move || nt.remove()).await;
                if let Ok(Err(e)) = r {
                    warn!(error = %format!("{e:#}"), "removing the nftables table failed");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "the nftables writer failed"),
        }
    }
}

impl NetfilterTask {
    /// Reads the table back soon and restores what was applied if it drifted (a rule or
    /// element deleted by hand, the table deleted).
    pub fn check(&self) {
        self.tx.send_modify(|w| w.check += 1);
    }
}

impl NetfilterTask {
    /// Asks for `spec` to be written (re-applied even if unchanged when `force`).
    pub fn schedule(&self, spec: notrack::Spec, force: bool) {
        self.tx.send_modify(|w| {
            w.spec = Some(spec);
            if force {
                w.force += 1;
            }
        });
    }
}

/// Repairs drift of the table; whether it is in place.
fn repair(nt: &mut Notrack) -> bool {
    match nt.repair() {
        Ok(true) => {
            warn!("the nftables notrack table had been changed by hand: restored");
            true
        }
        Ok(false) => true,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "repairing the nftables notrack table failed; retrying");
            false
        }
    }
}

/// Applies `spec`, with the replies of connections Docker's NAT carries kept tracked, and
/// reports the transaction (if one ran) to `report`. Whether it is in place (a failure is
/// logged and retried with backoff).
fn write(
    nt: &mut Notrack,
    mut spec: notrack::Spec,
    force: bool,
    report: &dyn Fn(Duration, bool),
) -> bool {
    // New peers or backends (or a full resync): the connections Docker's NAT carries
    // between them must keep their NAT. Otherwise the known ones, while they apply.
    let grew = nt
        .applied()
        .is_none_or(|a| !spec.peers.is_subset(&a.peers) || !spec.backends.is_subset(&a.backends));
    if grew || force {
        spec.nat_replies = notrack::nat_replies(&notrack::dump_dnat(), &spec);
        if !spec.nat_replies.is_empty() {
            info!(
                connections = spec.nat_replies.len(),
                "connections carried by Docker's NAT keep being tracked until they end"
            );
        }
    } else if let Some(a) = nt.applied() {
        spec.nat_replies = a
            .nat_replies
            .iter()
            .filter(|(b, proto, bport, c, _)| {
                spec.backends
                    .contains(&crate::addr::Service::new(*b, *proto, *bport))
                    && spec.peers.contains(c)
            })
            .copied()
            .collect();
    }
    let t = Instant::now();
    let r = nt.apply(&spec, force);
    if !matches!(r, Ok(false)) {
        report(t.elapsed(), r.is_ok());
    }
    match r {
        Ok(applied) => {
            if applied {
                debug!(
                    backends = spec.backends.len(),
                    "nftables notrack table applied"
                );
            }
            true
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "updating the nftables notrack table failed; retrying");
            false
        }
    }
}
