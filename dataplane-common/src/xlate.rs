//! The socket-layer translation decision, as plain functions over plain values.
//!
//! The cgroup hooks call these with closures over their maps; the unit tests call them with
//! closures over arrays. Everything is `#[inline(always)]` so the eBPF build has no calls.

use crate::{
    Addr, BACKEND_F_PAUSED, Backend, FrontendKey, PORT_F_V4, PORT_F_V6, PortFamilies, Reason,
    WILDCARD4, WILDCARD6, is_loopback, is_v4_mapped, is_zero,
};

/// Where a socket's destination is rewritten to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Backend address: IPv4-mapped when the socket talks IPv4 on the wire.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// The frontend's id, for counters.
    pub id: u32,
    /// The backend is paused and asked that new connections be refused meanwhile.
    pub paused: bool,
}

/// Whether the hook refuses the socket (`connect()` fails with `ECONNREFUSED`) instead of
/// translating it: only a `connect()` to a paused backend that asked for it; an unconnected
/// UDP datagram goes on to the frozen container (no answer, as without the agent).
#[inline(always)]
pub const fn refuses(t: &Target, is_connect: bool) -> bool {
    is_connect && t.paused
}

/// Finds the frontend a destination hits, if any.
///
/// - `dst` is what the application dialled (IPv4 as mapped), `port_be` in network order.
/// - A port of 0 is never a frontend (UDP `connect()` to port 0 is glibc's source-address
///   discovery and must not create state).
/// - Loopback destinations, and the unspecified address (which the kernel turns into a
///   loopback one), are frontends only inside the host network namespace: a container's
///   own `127.0.0.1` and `0.0.0.0` stay its own.
/// - A frontend applies only while its destination is this host's: loopback (host netns)
///   or a local address (host addresses and bridge gateways, from any namespace: hairpin).
///   An exact `addr:port` entry (`-p IP:P:C`) wins over the wildcard of the destination's
///   family (`-p P:C`); an exact entry whose address stopped being local (a VIP that failed
///   over) is left alone.
/// - Outside the host network namespace, `peer_on(net)` must say that the client's
///   namespace is a Docker container on the backend's network: other namespaces, and
///   containers on other networks, take Docker's own path (which applies Docker's network
///   isolation and the operator's rules).
#[inline(always)]
pub fn frontend_for<F, L, P>(
    dst: &Addr,
    port_be: u16,
    proto: u8,
    in_host_netns: bool,
    lookup: F,
    is_local: L,
    peer_on: P,
) -> Result<Backend, Reason>
where
    F: Fn(&FrontendKey) -> Option<Backend>,
    L: Fn(&Addr) -> bool,
    P: Fn(u32) -> bool,
{
    if port_be == 0 {
        return Err(Reason::NoFrontend);
    }
    let unspecified = is_zero(dst) || *dst == WILDCARD4;
    let loopback = unspecified || is_loopback(dst);
    if loopback && !in_host_netns {
        return Err(Reason::NoFrontend);
    }
    if !(loopback || is_local(dst)) {
        return Err(Reason::NoFrontend);
    }
    let mut key = FrontendKey {
        addr: *dst,
        port_be,
        proto,
        pad: 0,
    };
    let exact = if unspecified { None } else { lookup(&key) };
    let b = if let Some(b) = exact {
        b
    } else {
        key.addr = if is_v4_mapped(dst) {
            WILDCARD4
        } else {
            WILDCARD6
        };
        lookup(&key).ok_or(Reason::NoFrontend)?
    };
    if !in_host_netns && !peer_on(b.net) {
        return Err(Reason::OtherNetwork);
    }
    Ok(b)
}

/// The target for an IPv4 socket (`connect4`, `sendmsg4`): the backend's IPv4 address.
#[inline(always)]
pub fn target_v4(b: &Backend) -> Option<Target> {
    if is_zero(&b.addr4) {
        return None;
    }
    Some(Target {
        addr: b.addr4,
        port_be: b.port_be,
        id: b.id,
        paused: b.flags & BACKEND_F_PAUSED != 0,
    })
}

/// The target for an IPv6 socket (`connect6`, `sendmsg6`) that dialled `dst`.
///
/// An IPv4-mapped destination means the socket talks IPv4 on the wire: only the backend's
/// IPv4 address (mapped) will do. A real IPv6 destination prefers the backend's IPv6
/// address and falls back to its IPv4 address, mapped: on a dual-stack socket that reaches
/// an IPv4-only container, which is what docker-proxy offers for `[::1]:P` today.
#[inline(always)]
pub fn target_v6(dst: &Addr, b: &Backend) -> Option<Target> {
    let addr = if is_v4_mapped(dst) || is_zero(&b.addr6) {
        b.addr4
    } else {
        b.addr6
    };
    if is_zero(&addr) {
        return None;
    }
    Some(Target {
        addr,
        port_be: b.port_be,
        id: b.id,
        paused: b.flags & BACKEND_F_PAUSED != 0,
    })
}

/// Whether `bind(dst:port)` in the host network namespace would take a published port.
///
/// A wildcard bind takes the port on every address of its family (`::` on a dual-stack
/// socket, both families); a specific address conflicts where a frontend would answer.
#[inline(always)]
pub fn bind_conflicts<P, F, L>(
    dst: &Addr,
    port_be: u16,
    proto: u8,
    dual_stack: bool,
    published: P,
    lookup: F,
    is_local: L,
) -> bool
where
    P: Fn(u16, u8) -> Option<PortFamilies>,
    F: Fn(&FrontendKey) -> Option<Backend>,
    L: Fn(&Addr) -> bool,
{
    if port_be == 0 {
        return false;
    }
    let Some(fams) = published(port_be, proto) else {
        return false;
    };
    if *dst == WILDCARD4 {
        return fams.bits & PORT_F_V4 != 0;
    }
    if *dst == WILDCARD6 {
        let want = if dual_stack {
            PORT_F_V4 | PORT_F_V6
        } else {
            PORT_F_V6
        };
        return fams.bits & want != 0;
    }
    frontend_for(dst, port_be, proto, true, lookup, is_local, |_| true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PROTO_TCP, PROTO_UDP, v4_mapped};

    const GW: [u8; 4] = [172, 17, 0, 1];
    const HOST: [u8; 4] = [10, 9, 8, 7];
    const CT: [u8; 4] = [172, 17, 0, 2];
    const NET_A: u32 = 7;

    fn backend(port: u16, id: u32) -> Backend {
        Backend {
            addr4: v4_mapped(CT),
            addr6: [0; 16],
            port_be: port.to_be(),
            flags: 0,
            id,
            net: NET_A,
            pad: 0,
        }
    }

    /// A small frontend table: `-p 8080:80` (both wildcards), `-p 127.0.0.1:9090:90`,
    /// `-p 5353:53/udp` on IPv4 only.
    fn table(k: &FrontendKey) -> Option<Backend> {
        let entries = [
            (FrontendKey::new(WILDCARD4, 8080, PROTO_TCP), backend(80, 1)),
            (FrontendKey::new(WILDCARD6, 8080, PROTO_TCP), backend(80, 2)),
            (
                FrontendKey::new(v4_mapped([127, 0, 0, 1]), 9090, PROTO_TCP),
                backend(90, 3),
            ),
            (FrontendKey::new(WILDCARD4, 5353, PROTO_UDP), backend(53, 4)),
        ];
        entries.iter().find(|(ek, _)| ek == k).map(|(_, b)| *b)
    }

    fn local(a: &Addr) -> bool {
        *a == v4_mapped(GW) || *a == v4_mapped(HOST)
    }

    /// A client in the host namespace, or in a container on network `NET_A`.
    fn hit(dst: Addr, port: u16, proto: u8, host_ns: bool) -> Option<u32> {
        frontend_for(&dst, port.to_be(), proto, host_ns, table, local, |n| {
            n == NET_A
        })
        .ok()
        .map(|b| b.id)
    }

    /// A client in a namespace that is on no network of the backend's.
    fn hit_from_elsewhere(dst: Addr, port: u16) -> Result<u32, Reason> {
        frontend_for(&dst, port.to_be(), PROTO_TCP, false, table, local, |_| {
            false
        })
        .map(|b| b.id)
    }

    #[test]
    fn other_namespaces_and_networks_take_dockers_path() {
        assert_eq!(
            hit_from_elsewhere(v4_mapped(GW), 8080),
            Err(Reason::OtherNetwork)
        );
        assert_eq!(
            hit_from_elsewhere(v4_mapped(HOST), 8080),
            Err(Reason::OtherNetwork)
        );
        assert_eq!(
            hit_from_elsewhere(v4_mapped(HOST), 8081),
            Err(Reason::NoFrontend)
        );
    }

    #[test]
    fn the_unspecified_address_is_loopback_of_the_callers_namespace() {
        // Host netns: 0.0.0.0:P is this host, as Docker serves it.
        assert_eq!(hit(WILDCARD4, 8080, PROTO_TCP, true), Some(1));
        assert_eq!(hit(WILDCARD6, 8080, PROTO_TCP, true), Some(2));
        // A container's 0.0.0.0:P and [::]:P are its own services.
        assert_eq!(hit(WILDCARD4, 8080, PROTO_TCP, false), None);
        assert_eq!(hit(WILDCARD6, 8080, PROTO_TCP, false), None);
    }

    #[test]
    fn exact_frontends_only_while_their_address_is_local() {
        let vip = [10, 9, 8, 200];
        let table_vip = |k: &FrontendKey| {
            (*k == FrontendKey::new(v4_mapped(vip), 7070, PROTO_TCP)).then(|| backend(70, 9))
        };
        let with = |a: &Addr| *a == v4_mapped(vip);
        let without = |_: &Addr| false;
        let dst = v4_mapped(vip);
        let p = 7070u16.to_be();
        assert!(frontend_for(&dst, p, PROTO_TCP, true, table_vip, with, |_| true).is_ok());
        assert_eq!(
            frontend_for(&dst, p, PROTO_TCP, true, table_vip, without, |_| true),
            Err(Reason::NoFrontend)
        );
    }

    #[test]
    fn loopback_only_in_host_netns() {
        assert_eq!(
            hit(v4_mapped([127, 0, 0, 1]), 8080, PROTO_TCP, true),
            Some(1)
        );
        assert_eq!(
            hit(v4_mapped([127, 0, 0, 5]), 8080, PROTO_TCP, true),
            Some(1)
        );
        assert_eq!(hit(v4_mapped([127, 0, 0, 1]), 8080, PROTO_TCP, false), None);
        assert_eq!(hit(v4_mapped([127, 0, 0, 1]), 9090, PROTO_TCP, false), None);
    }

    #[test]
    fn exact_binding_only_on_its_address() {
        assert_eq!(
            hit(v4_mapped([127, 0, 0, 1]), 9090, PROTO_TCP, true),
            Some(3)
        );
        assert_eq!(hit(v4_mapped([127, 0, 0, 2]), 9090, PROTO_TCP, true), None);
        assert_eq!(hit(v4_mapped(HOST), 9090, PROTO_TCP, true), None);
    }

    #[test]
    fn local_addresses_and_hairpin_from_any_netns() {
        assert_eq!(hit(v4_mapped(HOST), 8080, PROTO_TCP, true), Some(1));
        assert_eq!(hit(v4_mapped(GW), 8080, PROTO_TCP, false), Some(1));
        assert_eq!(hit(v4_mapped([8, 8, 8, 8]), 8080, PROTO_TCP, true), None);
    }

    #[test]
    fn protocol_and_family_are_part_of_the_key() {
        assert_eq!(hit(v4_mapped(GW), 8080, PROTO_UDP, false), None);
        assert_eq!(hit(v4_mapped(GW), 5353, PROTO_UDP, false), Some(4));
        let mut v6_lo = [0u8; 16];
        v6_lo[15] = 1;
        assert_eq!(hit(v6_lo, 8080, PROTO_TCP, true), Some(2));
        // 5353/udp was published on IPv4 only.
        assert_eq!(hit(v6_lo, 5353, PROTO_UDP, true), None);
    }

    #[test]
    fn port_zero_never_translates() {
        assert_eq!(hit(v4_mapped([127, 0, 0, 1]), 0, PROTO_UDP, true), None);
    }

    fn published(port_be: u16, proto: u8) -> Option<PortFamilies> {
        match (u16::from_be(port_be), proto) {
            (8080, PROTO_TCP) => Some(PortFamilies {
                bits: PORT_F_V4 | PORT_F_V6,
            }),
            (9090, PROTO_TCP) | (5353, PROTO_UDP) => Some(PortFamilies { bits: PORT_F_V4 }),
            _ => None,
        }
    }

    fn conflicts(dst: Addr, port: u16, proto: u8, dual: bool) -> bool {
        bind_conflicts(&dst, port.to_be(), proto, dual, published, table, local)
    }

    #[test]
    fn bind_of_published_ports() {
        let lo = v4_mapped([127, 0, 0, 1]);
        assert!(conflicts(WILDCARD4, 8080, PROTO_TCP, false));
        assert!(conflicts(WILDCARD6, 8080, PROTO_TCP, false));
        assert!(conflicts(lo, 8080, PROTO_TCP, false));
        assert!(conflicts(v4_mapped(HOST), 8080, PROTO_TCP, false));
        // Published on 127.0.0.1 only: the wildcard and that address conflict, others not.
        assert!(conflicts(WILDCARD4, 9090, PROTO_TCP, false));
        assert!(conflicts(lo, 9090, PROTO_TCP, false));
        assert!(!conflicts(v4_mapped(HOST), 9090, PROTO_TCP, false));
        assert!(!conflicts(
            v4_mapped([127, 0, 0, 2]),
            9090,
            PROTO_TCP,
            false
        ));
        // An IPv6-only socket on :: does not take an IPv4-only port; a dual-stack one does.
        assert!(!conflicts(WILDCARD6, 5353, PROTO_UDP, false));
        assert!(conflicts(WILDCARD6, 5353, PROTO_UDP, true));
        // Other ports, the other protocol, and port 0 are free.
        assert!(!conflicts(WILDCARD4, 8081, PROTO_TCP, false));
        assert!(!conflicts(WILDCARD4, 8080, PROTO_UDP, false));
        assert!(!conflicts(WILDCARD4, 0, PROTO_TCP, false));
    }

    #[test]
    fn v6_targets() {
        let b = backend(80, 1);
        let mut v6_lo = [0u8; 16];
        v6_lo[15] = 1;
        // IPv4-only container reached from ::1: mapped IPv4 backend.
        assert_eq!(target_v6(&v6_lo, &b).unwrap().addr, v4_mapped(CT));
        let mut b6 = b;
        b6.addr6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(target_v6(&v6_lo, &b6).unwrap().addr, b6.addr6);
        // A mapped destination stays IPv4 on the wire.
        assert_eq!(
            target_v6(&v4_mapped([127, 0, 0, 1]), &b6).unwrap().addr,
            v4_mapped(CT)
        );
        let none = Backend {
            addr4: [0; 16],
            ..b6
        };
        assert!(target_v4(&none).is_none());
        assert!(target_v6(&v4_mapped([127, 0, 0, 1]), &none).is_none());
    }

    #[test]
    fn a_paused_backend_refuses_connects_only() {
        let mut b = backend(80, 1);
        let t = target_v4(&b).unwrap();
        assert!(!t.paused && !refuses(&t, true));
        b.flags = BACKEND_F_PAUSED;
        let t = target_v4(&b).unwrap();
        assert!(refuses(&t, true), "connect() is refused");
        assert!(
            !refuses(&t, false),
            "an unconnected datagram goes on, unanswered"
        );
        let mut v6_lo = [0u8; 16];
        v6_lo[15] = 1;
        assert!(refuses(&target_v6(&v6_lo, &b).unwrap(), true));
    }
}
