//! The packet layer's map types: what the TC programs on the host's uplinks (external
//! clients' packets to published ports) and on the containers' host-side veths (their
//! replies) read and write.

use crate::Addr;

/// Container address -> where the forward program delivers ([`PktEndpoint`]).
pub const MAP_PKT_EP: &str = "DP_PKTEP_V1";
/// Translated flows, keyed as their replies come from the container ([`FlowKey`]).
pub const MAP_FLOWS: &str = "DP_FLOWS_V1";
/// Client prefixes the packet layer may translate (an LPM trie of [`Addr`]s, IPv4
/// v4-mapped with 96 added to the prefix length); others keep Docker's own path.
pub const MAP_PKT_ALLOW: &str = "DP_PKTALLOW_V1";

/// Capacity of [`MAP_PKT_EP`].
pub const PKT_EP_MAX: u32 = 16_384;
/// Capacity of [`MAP_PKT_ALLOW`].
pub const PKT_ALLOW_MAX: u32 = 1_024;

/// `TC_ACT_UNSPEC` (TCX's `TCX_NEXT`): not the program's packet; the next program on the
/// interface sees it, then the stack, as if this one had not. (`TC_ACT_OK` would end the
/// interface's programs there: one attached after ours would never see the packet.)
pub const TC_ACT_UNSPEC: i32 = -1;
/// `TC_ACT_REDIRECT`: a redirect helper took the packet.
pub const TC_ACT_REDIRECT: i32 = 7;

/// A container address the forward program delivers to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PktEndpoint {
    /// The host-side veth of the container's interface.
    pub ifindex: u32,
    /// The container interface's MAC.
    pub mac: [u8; 6],
    /// The bridge's MAC: the source of the frames the bridge would have delivered.
    pub gw_mac: [u8; 6],
}

/// A translated flow as its replies come from the container.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// The container's address (the backend).
    pub ctr: Addr,
    /// The client's address.
    pub client: Addr,
    /// Network byte order.
    pub ctr_port_be: u16,
    /// Network byte order.
    pub client_port_be: u16,
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

impl FlowKey {
    /// The key of the flow between the container's `ctr`:`ctr_port_be` and the client's
    /// `client`:`client_port_be` over `proto`.
    #[inline(always)]
    pub const fn new(
        ctr: Addr,
        client: Addr,
        ctr_port_be: u16,
        client_port_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            ctr,
            client,
            ctr_port_be,
            client_port_be,
            proto,
            pad: [0; 3],
        }
    }
}

/// What the reply program needs to send a flow's replies back as the client expects them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The address the client dialled (a host address).
    pub front: Addr,
    /// The port the client dialled, network byte order.
    pub front_port_be: u16,
    /// `FLOW_F_*` bits.
    pub flags: u16,
    /// The interface the client's packets come in on; replies go out there.
    pub in_ifindex: u32,
    /// `bpf_ktime_get_ns()` of the flow's last packet, either way.
    pub last_seen_ns: u64,
}

/// A FIN or RST was seen: the flow is closing (a shorter timeout applies).
pub const FLOW_F_CLOSING: u16 = 1;
