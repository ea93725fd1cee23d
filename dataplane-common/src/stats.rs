//! The kernel programs' counters: one index per event or reason, one name each (what the
//! agent reports in `status`, and later as metrics), and the reasons a socket is left to
//! Docker's own path.

/// Indices of the per-CPU stats array.
pub const STAT_CONNECT: u32 = 0;
pub const STAT_SENDMSG: u32 = 1;
pub const STAT_RECVMSG: u32 = 2;
pub const STAT_GETPEERNAME: u32 = 3;
pub const STAT_BIND_REFUSED: u32 = 4;
pub const STAT_SKSTORE_FULL: u32 = 5;
/// A frontend was dialled from a socket bound to a source address: left to Docker's path.
pub const STAT_SKIP_BOUND: u32 = 6;
/// A frontend was dialled from a namespace that is not the host's nor a container on the
/// backend's network: left to Docker's path.
pub const STAT_SKIP_NETWORK: u32 = 7;
/// A frontend was dialled over IPv6 by an IPv6-only socket and the backend has IPv4 only:
/// left to Docker's path.
pub const STAT_SKIP_V6ONLY: u32 = 8;
/// A frontend was dialled (or its port bound) while no agent was running to vouch for it:
/// left to Docker's path.
pub const STAT_SKIP_NO_AGENT: u32 = 9;
/// A `connect()` to the frontend of a paused container that asked for `on-pause=reset` was
/// refused (`ECONNREFUSED`).
pub const STAT_REFUSED_PAUSED: u32 = 10;
/// Entries of the stats map.
pub const STATS_LEN: u32 = 16;
/// Names of the counters, by index, as the agent reports them.
pub const STAT_NAMES: [&str; 11] = [
    "connect",
    "sendmsg",
    "recvmsg",
    "getpeername",
    "bind_refused",
    "sock_storage_full",
    "skipped_bound_source",
    "skipped_other_network",
    "skipped_v6only",
    "skipped_no_agent",
    "refused_paused",
];

/// Why a socket was not translated. The hooks count the reasons an operator can act on
/// ([`Reason::stat`]); an ordinary destination (no frontend) is not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not TCP or UDP.
    NotTcpOrUdp,
    /// Not a frontend: an ordinary destination.
    NoFrontend,
    /// A frontend without a backend address of the socket's family.
    NoTarget,
    /// A frontend, but the client is in a container namespace that is not on the backend's
    /// network (or not a known Docker container at all): Docker's own path decides.
    OtherNetwork,
    /// No agent runs to vouch for the maps.
    NoAgent,
    /// The socket (or this message) chose a source address.
    BoundSource,
    /// An IPv6-only socket, and the backend has IPv4 only.
    V6Only,
    /// Unconnected IPv6 UDP to an IPv4-only backend (the kernel refuses a v4-mapped rewrite
    /// in `sendmsg`).
    MappedSendmsg,
}

impl Reason {
    /// The counter this reason is counted in, if any.
    pub const fn stat(self) -> Option<u32> {
        match self {
            Self::OtherNetwork => Some(STAT_SKIP_NETWORK),
            Self::NoAgent => Some(STAT_SKIP_NO_AGENT),
            Self::BoundSource => Some(STAT_SKIP_BOUND),
            Self::V6Only => Some(STAT_SKIP_V6ONLY),
            Self::NotTcpOrUdp | Self::NoFrontend | Self::NoTarget | Self::MappedSendmsg => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counted_reason_has_a_named_counter() {
        use Reason::*;
        for r in [
            NotTcpOrUdp,
            NoFrontend,
            NoTarget,
            OtherNetwork,
            NoAgent,
            BoundSource,
            V6Only,
            MappedSendmsg,
        ] {
            if let Some(i) = r.stat() {
                assert!((i as usize) < STAT_NAMES.len(), "{r:?}");
                assert!(STAT_NAMES[i as usize].starts_with("skipped_"), "{r:?}");
            }
        }
        // An ordinary destination is not a reason anyone acts on: not counted.
        assert_eq!(NoFrontend.stat(), None);
        assert!(STAT_NAMES.len() <= STATS_LEN as usize);
    }
}
