//! Map keys, values and constants shared by the eBPF programs and the agent, and the pure
//! translation decision both sides (and the unit tests) use.
//!
//! Every map value is `#[repr(C)]` with explicit padding and no `bool`, `Option` or enum, so
//! the kernel and userspace agree on every byte. Byte order is stated per field.
#![no_std]

pub mod pkt;
pub mod stats;
pub mod xlate;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Kernel names of the maps. A new layout gets a new name (the `_vN` suffix) so an
/// upgrade can tell old pinned maps from new ones. (The hash maps' V3/V2 layouts are
/// allocated on demand, [`BPF_F_NO_PREALLOC`]; the one before preallocated every entry.)
pub const MAP_FRONTENDS: &str = "DP_FE_V3";
pub const MAP_LOCAL_ADDRS: &str = "DP_LOCAL_V2";
pub const MAP_CONFIG: &str = "DP_CFG_V1";
pub const MAP_STATS: &str = "DP_STATS_V2";
pub const MAP_SOCK_REV: &str = "DP_SKREV_V1";
pub const MAP_PORTS: &str = "DP_PORTS_V2";
pub const MAP_FE_STATS: &str = "DP_FESTATS_V2";
pub const MAP_PEER_NETS: &str = "DP_PEERNET_V2";
/// Earlier names of maps whose content the agent cannot rebuild from Docker (counters):
/// carried over into the current map when an upgrade finds them pinned. Every other map
/// is filled from Docker's state before the programs translate.
pub const MAP_MIGRATIONS: &[(&str, &str)] = &[("DP_FESTATS_V1", MAP_FE_STATS)];

/// `BPF_F_NO_PREALLOC`: a hash map whose entries are allocated as they are added, so an
/// idle host pays for the entries it uses, not the capacity.
pub const BPF_F_NO_PREALLOC: u32 = 1;
pub const MAP_SOCK_OPT: &str = "DP_SKOPT_V1";
/// The running agent's own socket (a `SOCKMAP` of one entry, never pinned): the kernel
/// empties it when the agent's process ends, however it ends, and the programs translate
/// nothing while it is empty.
pub const MAP_AGENT: &str = "DP_AGENT_V1";

/// Capacity of the frontends map (published address:port/proto entries).
pub const FRONTENDS_MAX: u32 = 65_536;
/// Capacity of the local-address map.
pub const LOCAL_ADDRS_MAX: u32 = 4_096;
/// Capacity of the peer-networks map: (container network namespace, network) pairs.
pub const PEER_NETS_MAX: u32 = 65_536;

/// An address as the maps hold it: 16 bytes in network order. IPv6 as is; IPv4 as an
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one key type serves both families.
pub type Addr = [u8; 16];

/// The IPv6 wildcard `::`: a frontend published on every IPv6 address of the host.
pub const WILDCARD6: Addr = [0; 16];
/// The IPv4 wildcard `0.0.0.0` (as `::ffff:0.0.0.0`): a frontend on every IPv4 address.
pub const WILDCARD4: Addr = v4_mapped([0, 0, 0, 0]);

/// IPv4 bytes (network order) as an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn v4_mapped(ip: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

/// Whether `addr` is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub fn is_v4_mapped(addr: &Addr) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

/// The IPv4 part of an IPv4-mapped address.
#[inline(always)]
pub fn v4_part(addr: &Addr) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// Whether `addr` is all zero (an absent backend address).
#[inline(always)]
pub fn is_zero(addr: &Addr) -> bool {
    addr.iter().all(|b| *b == 0)
}

/// Whether `addr` is a loopback address: `127.0.0.0/8` (mapped) or `::1`.
#[inline(always)]
pub fn is_loopback(addr: &Addr) -> bool {
    if is_v4_mapped(addr) {
        return addr[12] == 127;
    }
    addr[..15].iter().all(|b| *b == 0) && addr[15] == 1
}

/// Key of the frontends map: a published address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Published address (see [`Addr`]); [`WILDCARD4`] or [`WILDCARD6`] for `-p P:C`.
    pub addr: Addr,
    /// Published port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

impl FrontendKey {
    /// A key; `port` in host byte order.
    #[inline(always)]
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            proto,
            pad: 0,
        }
    }

    /// The published port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// [`Backend::flags`]: the container is paused and asked (`dataplane.on-pause=reset`) that
/// new connections be refused meanwhile: `connect()` fails with `ECONNREFUSED`.
pub const BACKEND_F_PAUSED: u16 = 1;
/// [`Backend::flags`]: the container asked (`dataplane.on-pause=reset`) that its
/// connections be reset when it is paused. Informational: the programs read only
/// [`BACKEND_F_PAUSED`].
pub const BACKEND_F_RESET_ON_PAUSE: u16 = 2;

/// Value of the frontends map: where a published port leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The container's IPv4 address, IPv4-mapped; all zero when it has none.
    pub addr4: Addr,
    /// The container's IPv6 address; all zero when it has none.
    pub addr6: Addr,
    /// Container port, network byte order.
    pub port_be: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u16,
    /// Frontend id chosen by the agent (stable per published binding), for counters.
    pub id: u32,
    /// The Docker network the backend is reached on ([`net_id`] of its network ID); a
    /// container client is translated only when its namespace is on this network
    /// ([`PeerNetKey`]). Zero: unknown, host clients only.
    pub net: u32,
    /// Always zero.
    pub pad: u32,
}

impl Backend {
    /// The container port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// Key of the peer-networks map: "the network namespace with this cookie is a Docker
/// container attached to this network, and may be translated to backends on it". The host
/// network namespace is not in the map (it is known from [`Config`]); a namespace that is in
/// neither (`ip netns`, podman, a test runner) is an external client and takes Docker's path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerNetKey {
    /// `SO_NETNS_COOKIE` of the container's network namespace.
    pub netns_cookie: u64,
    /// [`net_id`] of the Docker network.
    pub net: u32,
    /// Always zero.
    pub pad: u32,
}

/// Value of the peer-networks map (presence is what counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerNet {
    /// Always zero for now.
    pub flags: u32,
}

/// A 32-bit id for a Docker network ID (FNV-1a, never zero). A collision between two
/// networks can only make the straight path be tried where Docker's isolation then drops it;
/// no rule of the agent's lets traffic between networks.
pub fn net_id(docker_network_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in docker_network_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    if h == 0 { 1 } else { h }
}

/// Per-socket options the `setsockopt` hook records (socket storage): what the
/// translation must respect but the `sock_addr` context does not show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOpt {
    /// `SOCKOPT_F_*` bits.
    pub flags: u32,
}

/// `IPV6_V6ONLY` was set on the socket: it cannot reach an IPv4 backend through a
/// v4-mapped address.
pub const SOCKOPT_F_V6ONLY: u32 = 1;
/// `IPV6_V6ONLY` was explicitly cleared (overrides a `bindv6only=1` default).
pub const SOCKOPT_F_V6ONLY_OFF: u32 = 2;

/// Key of the published-ports map: which ports `bind()` must leave to Docker.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Published port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

/// Value of the published-ports map: `PORT_F_*` bits, the families published on the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortFamilies {
    pub bits: u32,
}

/// Published on an IPv4 address (or the IPv4 wildcard).
pub const PORT_F_V4: u32 = 1;
/// Published on an IPv6 address (or the IPv6 wildcard).
pub const PORT_F_V6: u32 = 2;

/// Where a [`TestRequest`] sits in the test classifier's input (after an Ethernet header,
/// which test runs of skb programs need), and its [`TestAnswer`] in the output.
pub const TEST_REQ_OFFSET: usize = 14;

/// A request to the test classifier `dp_test_xlate` (`BPF_PROG_TEST_RUN` only), placed
/// after a 14-byte Ethernet header; the answer overwrites it as a [`TestAnswer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRequest {
    /// The dialled address (see [`Addr`]).
    pub addr: Addr,
    /// The dialled port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    /// `TEST_F_*` bits.
    pub flags: u8,
    /// Always zero.
    pub pad: u32,
    /// The client's network namespace cookie (outside the host's, see [`PeerNetKey`]).
    pub netns_cookie: u64,
}

/// The answer of `dp_test_xlate`: the rewritten destination (zero when not translated).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestAnswer {
    pub addr: Addr,
    pub port_be: u16,
    pub pad: u16,
}

/// The request is made from the host network namespace.
pub const TEST_F_HOST_NETNS: u8 = 1;
/// The request comes from an IPv6 socket (`connect6`).
pub const TEST_F_SOCK6: u8 = 2;

/// Value of the local-address map: why an address counts as this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddr {
    /// One of the `LOCAL_*` kinds.
    pub kind: u32,
}

/// An address configured on a host interface.
pub const LOCAL_HOST: u32 = 1;
/// The gateway address of a Docker bridge network.
pub const LOCAL_GATEWAY: u32 = 2;

/// The single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `SO_NETNS_COOKIE` of the host network namespace; loopback frontends apply only there.
    /// Zero until the agent has written it (then loopback is never translated).
    pub host_netns_cookie: u64,
    /// `CFG_F_*` bits.
    pub flags: u64,
}

/// Refuse `bind()` of a published port by other processes.
pub const CFG_F_RESERVE_PORTS: u64 = 1;
/// Container clients (namespaces in the peer-networks map) are translated. Off when the
/// operator's forwarding rules could treat their traffic differently from Docker's path.
pub const CFG_F_PEERS: u64 = 2;
/// The host network namespace has `net.ipv6.bindv6only=1`: IPv6 sockets are IPv6-only
/// unless they cleared `IPV6_V6ONLY`.
pub const CFG_F_BINDV6ONLY: u64 = 4;

/// Per-socket state kept in socket-local storage: what the application dialled and where it
/// was sent, so `getpeername()` and UDP `recvmsg()` can show the dialled address for
/// traffic of that backend. It dies with the socket; nothing to evict, nothing stale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    /// The address the application dialled (see [`Addr`]).
    pub orig_addr: Addr,
    /// The backend the socket was sent to (see [`Addr`]).
    pub backend_addr: Addr,
    /// The port the application dialled, network byte order.
    pub orig_port_be: u16,
    /// The backend port, network byte order.
    pub backend_port_be: u16,
    /// Always zero.
    pub pad: u32,
}

pub use stats::*;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with every padding byte an explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::LocalAddr {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SockRev {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::PortFamilies {}
    unsafe impl aya::Pod for super::PeerNetKey {}
    unsafe impl aya::Pod for super::PeerNet {}
    unsafe impl aya::Pod for super::SockOpt {}
    unsafe impl aya::Pod for super::pkt::PktEndpoint {}
    unsafe impl aya::Pod for super::pkt::FlowKey {}
    unsafe impl aya::Pod for super::pkt::Flow {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FrontendKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<Backend>(), 16 + 16 + 2 + 2 + 4 + 4 + 4);
        assert_eq!(size_of::<PeerNetKey>(), 16);
        assert_eq!(size_of::<PeerNet>(), 4);
        assert_eq!(size_of::<SockOpt>(), 4);
        assert_eq!(size_of::<LocalAddr>(), 4);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<SockRev>(), 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<PortKey>(), 4);
        assert_eq!(size_of::<PortFamilies>(), 4);
        assert_eq!(size_of::<TestRequest>(), 32);
        assert_eq!(size_of::<TestAnswer>(), 20);
    }

    #[test]
    fn key_encoding_is_network_order() {
        let k = FrontendKey::new(v4_mapped([127, 0, 0, 1]), 8080, PROTO_TCP);
        // The port's bytes in memory are big-endian whatever the host order is.
        let bytes: [u8; 2] = k.port_be.to_ne_bytes();
        assert_eq!(bytes, [0x1f, 0x90]);
        assert_eq!(k.port(), 8080);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!(k.pad, 0);
    }

    #[test]
    fn address_classes() {
        assert!(is_loopback(&v4_mapped([127, 0, 0, 1])));
        assert!(is_loopback(&v4_mapped([127, 1, 2, 3])));
        assert!(!is_loopback(&v4_mapped([10, 0, 0, 1])));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback(&one));
        assert!(!is_loopback(&WILDCARD6));
        assert!(is_v4_mapped(&WILDCARD4));
        assert!(!is_v4_mapped(&WILDCARD6));
        assert!(!is_v4_mapped(&one));
        assert_eq!(v4_part(&v4_mapped([172, 17, 0, 2])), [172, 17, 0, 2]);
    }
}
