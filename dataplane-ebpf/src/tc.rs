//! The packet layer: external clients' packets to a published `host_ip:port`, delivered
//! straight into the container without netfilter (so without DNAT and without a conntrack
//! entry), and the container's replies sent back as from `host_ip:port`.
//!
//! - `dp_tc_uplink_in` (TC ingress of a host uplink): an IPv4 TCP or UDP packet from an
//!   allowed client to a frontend on a host address, while an agent vouches for the maps,
//!   whose backend has a known endpoint: the flow is recorded (at a TCP SYN or any UDP
//!   datagram; a TCP packet of a flow the programs did not see start is Docker's), the
//!   destination rewritten (checksums updated, TTL decremented), the MACs set as the
//!   bridge would, and the packet redirected into the container's namespace.
//! - `dp_tc_veth_in` (TC ingress of a container's host-side veth): a packet of a recorded
//!   flow gets its source rewritten back to the dialled address and port and is redirected
//!   out of the interface the client's packets came in on (route and neighbour resolved
//!   by the kernel).
//!
//! Anything else (other protocols, fragments, IPv6 for now, a flow the programs do not
//! know) goes on untouched: Docker's own path serves it.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_redirect_neigh, bpf_redirect_peer},
    },
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use dataplane_common::{
    Addr, PROTO_TCP, PROTO_UDP,
    pkt::{FLOW_F_CLOSING, Flow, FlowKey, TC_ACT_OK},
    v4_mapped, v4_part,
    xlate::{frontend_for, target_v4},
};

use crate::maps::{FLOWS, FRONTENDS, LOCAL_ADDRS, PKT_ALLOW, PKT_EP, agent_running};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_TTL: usize = ETH_HLEN + 8;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the programs read of an IPv4 TCP or UDP packet.
struct Pkt4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    /// Offset of the transport header.
    l4: usize,
    sport_be: u16,
    dport_be: u16,
    tcp_flags: u8,
    ttl: u8,
}

impl Pkt4 {
    /// Offset of the transport checksum.
    const fn csum(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    const fn closing(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// An unfragmented IPv4 TCP or UDP packet behind an Ethernet header.
#[inline(always)]
fn parse4(ctx: &TcContext) -> Option<Pkt4> {
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    // Any fragment (more to come, or not the first): Docker's path, which reassembles.
    if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?) & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    Some(Pkt4 {
        src: ctx.load(IP_SRC).ok()?,
        dst: ctx.load(IP_DST).ok()?,
        proto,
        l4,
        sport_be: ctx.load(l4).ok()?,
        dport_be: ctx.load(l4 + 2).ok()?,
        tcp_flags: if proto == PROTO_TCP {
            ctx.load(l4 + 13).ok()?
        } else {
            0
        },
        ttl: ctx.load(IP_TTL).ok()?,
    })
}

/// Rewrites the address at `addr_off` (source or destination) and the port at `port_off`,
/// with the IP and transport checksums, and decrements the TTL (as forwarding would).
/// `None` when the TTL is spent (the stack answers that) or the packet cannot be written.
#[inline(always)]
fn rewrite4(
    ctx: &TcContext,
    p: &Pkt4,
    (addr_off, old, new): (usize, [u8; 4], [u8; 4]),
    (port_off, old_port_be, new_port_be): (usize, u16, u16),
) -> Option<()> {
    let ttl_proto: u16 = ctx.load(IP_TTL).ok()?;
    let ttl = ttl_proto.to_ne_bytes()[0];
    if ttl <= 1 {
        return None;
    }
    let new_ttl_proto = u16::from_ne_bytes([ttl - 1, p.proto]);
    let (old_a, new_a) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    // A UDP datagram without a checksum stays without one.
    let udp = p.proto == PROTO_UDP;
    if !udp || ctx.load::<u16>(p.csum()).ok()? != 0 {
        let mangled = if udp {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
        ctx.l4_csum_replace(p.csum(), u64::from(old_a), u64::from(new_a), pseudo)
            .ok()?;
        ctx.l4_csum_replace(
            p.csum(),
            u64::from(old_port_be),
            u64::from(new_port_be),
            mangled | 2,
        )
        .ok()?;
    }
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_a), u64::from(new_a), 4)
        .ok()?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(ttl_proto), u64::from(new_ttl_proto), 2)
        .ok()?;
    ctx.store(addr_off, &new, 0).ok()?;
    ctx.store(port_off, &new_port_be, 0).ok()?;
    ctx.store(IP_TTL, &new_ttl_proto, 0).ok()
}

/// Whether the client may be translated (the operator's allow-list).
#[inline(always)]
fn allowed(client: &Addr) -> bool {
    PKT_ALLOW.get(Key::new(128, *client)).is_some()
}

/// The interface the packet came in on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context's skb is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Records (or refreshes) the flow of a client packet; `None`: not one to translate.
#[inline(always)]
fn track(ctx: &TcContext, p: &Pkt4, key: &FlowKey, front: &Addr) -> Option<()> {
    // SAFETY: reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let starts = p.proto == PROTO_UDP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a value pointer of this map, valid for the program's run.
        let f = unsafe { &mut *f };
        if f.front == *front && f.front_port_be == p.dport_be {
            f.last_seen_ns = now;
            if p.closing() {
                f.flags |= FLOW_F_CLOSING;
            }
            return Some(());
        }
        if !starts {
            return None;
        }
    } else if !starts {
        // A connection the programs did not see start (from before the agent, or its
        // entry evicted): Docker's DNAT keeps serving it.
        return None;
    }
    let flow = Flow {
        front: *front,
        front_port_be: p.dport_be,
        flags: 0,
        in_ifindex: ifindex(ctx),
        last_seen_ns: now,
    };
    FLOWS.insert(key, flow, 0).ok()
}

#[classifier]
pub fn dp_tc_uplink_in(ctx: TcContext) -> i32 {
    forward(&ctx).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn forward(ctx: &TcContext) -> Option<i32> {
    let p = parse4(ctx)?;
    // A spent TTL is the stack's to answer (ICMP time exceeded), before any flow exists.
    if p.ttl <= 1 {
        return None;
    }
    let client = v4_mapped(p.src);
    let front = v4_mapped(p.dst);
    if !allowed(&client) {
        return None;
    }
    let b = frontend_for(
        &front,
        p.dport_be,
        p.proto,
        false,
        // SAFETY: entries are written whole by the agent.
        |k| unsafe { FRONTENDS.get(k) }.copied(),
        |a| LOCAL_ADDRS.get_ptr(a).is_some(),
        // Not loopback (a packet from outside never is), and any network: Docker
        // publishes to every client that reaches the host.
        |_| true,
    )
    .ok()?;
    let t = target_v4(&b)?;
    // SAFETY: entries are written whole by the agent.
    let ep = unsafe { PKT_EP.get(t.addr) }.copied()?;
    if !agent_running() {
        return None;
    }
    let key = FlowKey {
        ctr: t.addr,
        client,
        ctr_port_be: t.port_be,
        client_port_be: p.sport_be,
        proto: p.proto,
        pad: [0; 3],
    };
    track(ctx, &p, &key, &front)?;
    rewrite4(
        ctx,
        &p,
        (IP_DST, p.dst, v4_part(&t.addr)),
        (p.l4 + 2, p.dport_be, t.port_be),
    )?;
    ctx.store(0, &ep.mac, 0).ok()?;
    ctx.store(6, &ep.gw_mac, 0).ok()?;
    // SAFETY: only sets where the packet goes once the program returns.
    let r = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    i32::try_from(r).ok()
}

#[classifier]
pub fn dp_tc_veth_in(ctx: TcContext) -> i32 {
    reply(&ctx).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn reply(ctx: &TcContext) -> Option<i32> {
    let p = parse4(ctx)?;
    let key = FlowKey {
        ctr: v4_mapped(p.src),
        client: v4_mapped(p.dst),
        ctr_port_be: p.sport_be,
        client_port_be: p.dport_be,
        proto: p.proto,
        pad: [0; 3],
    };
    let f = FLOWS.get_ptr_mut(key)?;
    // SAFETY: a value pointer of this map, valid for the program's run.
    let f = unsafe { &mut *f };
    // SAFETY: reads the clock.
    f.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if p.closing() {
        f.flags |= FLOW_F_CLOSING;
    }
    let (front, front_port_be, out) = (v4_part(&f.front), f.front_port_be, f.in_ifindex);
    rewrite4(
        ctx,
        &p,
        (IP_SRC, p.src, front),
        (p.l4, p.sport_be, front_port_be),
    )?;
    // SAFETY: only sets where the packet goes once the program returns; the kernel
    // resolves the route and the neighbour.
    let r = unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) };
    i32::try_from(r).ok()
}
