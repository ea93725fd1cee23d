//! The packet layer: external clients' packets to a published `host_ip:port`, delivered
//! straight into the container without netfilter (so without DNAT and without a conntrack
//! entry), and the container's replies sent back as from `host_ip:port`.
//!
//! - `dp_tc_uplink_in` (TC ingress of a host uplink): a TCP or UDP packet from an
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
//!   An ICMP or ICMPv6 error about a recorded flow's reply (fragmentation needed, packet
//!   too big, unreachable, time exceeded), sent by a router toward the client, is
//!   translated for the container too (its destination and the quoted packet's source),
//!   so path MTU discovery works; and the container's own errors about a client's packet
//!   (a UDP port unreachable) for the client.
//!
//! Anything else (other protocols, IPv4 fragments, IPv6 extension headers, an IPv6 client
//! of an IPv4-only container, a flow the programs do not know) goes on untouched:
//! Docker's own path serves it.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_check_mtu, bpf_csum_diff, bpf_redirect_neigh, bpf_redirect_peer},
    },
    macros::{classifier, map},
    maps::{PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use dataplane_common::{
    Addr, PROTO_TCP, PROTO_UDP, PortKey, is_v4_mapped,
    pkt::{FLOW_F_CLOSING, Flow, FlowKey, TC_ACT_UNSPEC},
    v4_mapped, v4_part,
    xlate::{frontend_for, target_v4, target_v6},
};

use crate::maps::{FLOWS, FRONTENDS, LOCAL_ADDRS, PKT_ALLOW, PKT_EP, PORTS, agent_running};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_TTL: usize = ETH_HLEN + 8;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
const IP6_NEXT: usize = ETH_HLEN + 6;
const IP6_HOPS: usize = ETH_HLEN + 7;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
const IP6_HLEN: usize = 40;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMP6: u8 = 58;

/// What the programs read of an IPv4 or IPv6 TCP or UDP packet, or of an ICMP error about
/// one (then as the client's packet the error is about would read: its source the client,
/// its destination the dialled address and port).
pub struct Pkt {
    v6: bool,
    /// An ICMP error (destination unreachable, fragmentation needed or packet too big,
    /// time exceeded) about a packet from a published port to a client: `inner` is the
    /// offset of the IP header it quotes, `inner_l4` of that packet's transport header.
    icmp: bool,
    inner: usize,
    inner_l4: usize,
    /// IPv4 addresses v4-mapped.
    src: Addr,
    dst: Addr,
    proto: u8,
    /// Offset of the transport header.
    l4: usize,
    sport_be: u16,
    dport_be: u16,
    tcp_flags: u8,
    /// TTL or hop limit.
    ttl: u8,
}

impl Pkt {
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

/// The transport part of a packet whose transport header starts at `l4`.
#[inline(always)]
fn ports(ctx: &TcContext, proto: u8, l4: usize) -> Option<(u16, u16, u8)> {
    let flags = if proto == PROTO_TCP {
        ctx.load(l4 + 13).ok()?
    } else {
        0
    };
    Some((ctx.load(l4).ok()?, ctx.load(l4 + 2).ok()?, flags))
}

/// Where a packet's parsed fields live while a program runs: per CPU (a program runs to
/// its end on one CPU), not on the 512-byte stack, which the rest of the work needs.
#[map(name = "DP_PKTSCRATCH")]
static SCRATCH: PerCpuArray<Pkt> = PerCpuArray::with_max_entries(1, 0);

/// An unfragmented IPv4, or an IPv6 packet without extension headers, carrying TCP or
/// UDP behind an Ethernet header.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<&'static Pkt> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's one entry, used by this program run only.
    let p = unsafe { &mut *p };
    match u16::from_be(ctx.load::<u16>(12).ok()?) {
        ETH_P_IP => parse4(ctx, p)?,
        ETH_P_IPV6 => parse6(ctx, p)?,
        _ => return None,
    }
    Some(p)
}

#[inline(always)]
fn parse4(ctx: &TcContext, p: &mut Pkt) -> Option<()> {
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
    p.l4 = ETH_HLEN + ihl;
    p.v6 = false;
    p.ttl = ctx.load(IP_TTL).ok()?;
    if proto == PROTO_ICMP {
        return parse_icmp4(ctx, p);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    p.icmp = false;
    (p.sport_be, p.dport_be, p.tcp_flags) = ports(ctx, proto, p.l4)?;
    p.src = v4_mapped(ctx.load(IP_SRC).ok()?);
    p.dst = v4_mapped(ctx.load(IP_DST).ok()?);
    p.proto = proto;
    Some(())
}

/// An ICMP error (type 3, destination unreachable, fragmentation needed among them; type
/// 11, time exceeded) sent to the address a TCP or UDP packet came from: read as that
/// packet's reverse (its destination the client).
#[inline(always)]
fn parse_icmp4(ctx: &TcContext, p: &mut Pkt) -> Option<()> {
    let kind: u8 = ctx.load(p.l4).ok()?;
    if kind != 3 && kind != 11 {
        return None;
    }
    p.inner = p.l4 + 8;
    let vihl: u8 = ctx.load(p.inner).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto: u8 = ctx.load(p.inner + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    p.inner_l4 = p.inner + ihl;
    let (from_be, to_be, _) = ports(ctx, PROTO_UDP, p.inner_l4)?;
    let from: [u8; 4] = ctx.load(p.inner + 12).ok()?;
    // Sent to the address the quoted packet came from.
    if ctx.load::<[u8; 4]>(IP_DST).ok()? != from {
        return None;
    }
    p.icmp = true;
    p.src = v4_mapped(ctx.load(p.inner + 16).ok()?);
    p.dst = v4_mapped(from);
    (p.sport_be, p.dport_be, p.tcp_flags) = (to_be, from_be, 0);
    p.proto = proto;
    Some(())
}

#[inline(always)]
fn parse6(ctx: &TcContext, p: &mut Pkt) -> Option<()> {
    let ver: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver >> 4 != 6 {
        return None;
    }
    // Extension headers (fragments among them): Docker's path.
    let proto: u8 = ctx.load(IP6_NEXT).ok()?;
    p.l4 = ETH_HLEN + IP6_HLEN;
    p.v6 = true;
    p.ttl = ctx.load(IP6_HOPS).ok()?;
    if proto == PROTO_ICMP6 {
        return parse_icmp6(ctx, p);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    p.icmp = false;
    (p.sport_be, p.dport_be, p.tcp_flags) = ports(ctx, proto, p.l4)?;
    p.src = ctx.load(IP6_SRC).ok()?;
    p.dst = ctx.load(IP6_DST).ok()?;
    p.proto = proto;
    Some(())
}

/// An ICMPv6 error (type 1, destination unreachable; 2, packet too big; 3, time exceeded)
/// about a TCP or UDP packet without extension headers, as [`parse_icmp4`].
#[inline(always)]
fn parse_icmp6(ctx: &TcContext, p: &mut Pkt) -> Option<()> {
    let kind: u8 = ctx.load(p.l4).ok()?;
    if !(1..=3).contains(&kind) {
        return None;
    }
    p.inner = p.l4 + 8;
    if ctx.load::<u8>(p.inner).ok()? >> 4 != 6 {
        return None;
    }
    let proto: u8 = ctx.load(p.inner + 6).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    p.inner_l4 = p.inner + IP6_HLEN;
    let (from_be, to_be, _) = ports(ctx, PROTO_UDP, p.inner_l4)?;
    p.dst = ctx.load(p.inner + 8).ok()?;
    let sent_to: Addr = ctx.load(IP6_DST).ok()?;
    if sent_to != p.dst {
        return None;
    }
    p.icmp = true;
    p.src = ctx.load(p.inner + 24).ok()?;
    (p.sport_be, p.dport_be, p.tcp_flags) = (to_be, from_be, 0);
    p.proto = proto;
    Some(())
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

/// Rewrites the address and port of `end` to `addr`:`port_be` with the checksums, and
/// decrements the TTL or hop limit (as forwarding would). `None` when the TTL is spent
/// (the stack answers that) or the packet cannot be written.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Pkt, end: End, addr: &Addr, port_be: u16) -> Option<()> {
    if p.ttl <= 1 {
        return None;
    }
    let (old, old_port_be, port_off) = match end {
        End::Src => (&p.src, p.sport_be, p.l4),
        End::Dst => (&p.dst, p.dport_be, p.l4 + 2),
    };
    let udp = p.proto == PROTO_UDP;
    let mangled = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if p.v6 {
        // SAFETY: both are 16 bytes; the helper only reads them.
        let diff = unsafe {
            bpf_csum_diff(
                old.as_ptr().cast_mut().cast(),
                16,
                addr.as_ptr().cast_mut().cast(),
                16,
                0,
            )
        };
        ctx.l4_csum_replace(
            p.csum(),
            0,
            diff.cast_unsigned(),
            u64::from(BPF_F_PSEUDO_HDR) | mangled,
        )
        .ok()?;
        rewrite_port(ctx, p, (port_off, old_port_be, port_be), Some(mangled))?;
        let off = if end == End::Src { IP6_SRC } else { IP6_DST };
        ctx.store(off, addr, 0).ok()?;
        return ctx.store(IP6_HOPS, &(p.ttl - 1), 0).ok();
    }
    let (old4, new4) = (v4_part(old), v4_part(addr));
    let (old_a, new_a) = (u32::from_ne_bytes(old4), u32::from_ne_bytes(new4));
    // A UDP datagram without a checksum stays without one.
    let csum = !udp || ctx.load::<u16>(p.csum()).ok()? != 0;
    if csum {
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
        ctx.l4_csum_replace(p.csum(), u64::from(old_a), u64::from(new_a), pseudo)
            .ok()?;
    }
    rewrite_port(
        ctx,
        p,
        (port_off, old_port_be, port_be),
        csum.then_some(mangled),
    )?;
    let ttl_proto = u16::from_ne_bytes([p.ttl, p.proto]);
    let new_ttl_proto = u16::from_ne_bytes([p.ttl - 1, p.proto]);
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_a), u64::from(new_a), 4)
        .ok()?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(ttl_proto), u64::from(new_ttl_proto), 2)
        .ok()?;
    let off = if end == End::Src { IP_SRC } else { IP_DST };
    ctx.store(off, &new4, 0).ok()?;
    ctx.store(IP_TTL, &new_ttl_proto, 0).ok()
}

/// Rewrites an ICMP error about a translated flow's packet, parsed as the packet it quotes
/// would read reversed. `End::Dst`: an error from a router toward the client about a
/// reply, for the container: its destination (the dialled address), and the quoted
/// packet's source address and port, become the container's `addr` and `port_be`.
/// `End::Src`: an error from the container about a client's packet, for the client: its
/// source, and the quoted packet's destination, become the dialled `addr` and `port_be`.
/// With the checksums: the IPv4 header's and the quoted one's, the ICMP message's
/// (ICMPv6's with its pseudo-header). The quoted transport checksum is left as it is (a
/// receiver does not check it in an error). TTL or hop limit decremented.
#[inline(always)]
fn rewrite_icmp(ctx: &TcContext, p: &Pkt, end: End, addr: &Addr, port_be: u16) -> Option<()> {
    if p.ttl <= 1 {
        return None;
    }
    let icsum = p.l4 + 2;
    let (old, old_port_be) = match end {
        End::Dst => (&p.dst, p.dport_be),
        End::Src => (&p.src, p.sport_be),
    };
    let (old_port, new_port) = (u64::from(old_port_be), u64::from(port_be));
    let quoted_port = match end {
        End::Dst => p.inner_l4,
        End::Src => p.inner_l4 + 2,
    };
    if p.v6 {
        // SAFETY: both are 16 bytes; the helper only reads them.
        let diff = unsafe {
            bpf_csum_diff(
                old.as_ptr().cast_mut().cast(),
                16,
                addr.as_ptr().cast_mut().cast(),
                16,
                0,
            )
        }
        .cast_unsigned();
        // The outer address, in ICMPv6's pseudo-header; the quoted one, in the message.
        ctx.l4_csum_replace(icsum, 0, diff, u64::from(BPF_F_PSEUDO_HDR))
            .ok()?;
        ctx.l4_csum_replace(icsum, 0, diff, 0).ok()?;
        ctx.l4_csum_replace(icsum, old_port, new_port, 2).ok()?;
        ctx.store(quoted_port, &port_be, 0).ok()?;
        let (outer, quoted) = match end {
            End::Dst => (IP6_DST, p.inner + 8),
            End::Src => (IP6_SRC, p.inner + 24),
        };
        ctx.store(quoted, addr, 0).ok()?;
        ctx.store(outer, addr, 0).ok()?;
        return ctx.store(IP6_HOPS, &(p.ttl - 1), 0).ok();
    }
    let (old4, new4) = (v4_part(old), v4_part(addr));
    let (old_a, new_a) = (
        u64::from(u32::from_ne_bytes(old4)),
        u64::from(u32::from_ne_bytes(new4)),
    );
    let (outer, quoted) = match end {
        End::Dst => (IP_DST, p.inner + 12),
        End::Src => (IP_SRC, p.inner + 16),
    };
    // The quoted header's address and checksum are data of the ICMP message.
    let quoted_csum = p.inner + 10;
    let before: u16 = ctx.load(quoted_csum).ok()?;
    ctx.l3_csum_replace(quoted_csum, old_a, new_a, 4).ok()?;
    let after: u16 = ctx.load(quoted_csum).ok()?;
    ctx.l4_csum_replace(icsum, u64::from(before), u64::from(after), 2)
        .ok()?;
    ctx.l4_csum_replace(icsum, old_a, new_a, 4).ok()?;
    ctx.store(quoted, &new4, 0).ok()?;
    ctx.l4_csum_replace(icsum, old_port, new_port, 2).ok()?;
    ctx.store(quoted_port, &port_be, 0).ok()?;
    let ttl_proto = u16::from_ne_bytes([p.ttl, PROTO_ICMP]);
    let new_ttl_proto = u16::from_ne_bytes([p.ttl - 1, PROTO_ICMP]);
    ctx.l3_csum_replace(IP_CSUM, old_a, new_a, 4).ok()?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(ttl_proto), u64::from(new_ttl_proto), 2)
        .ok()?;
    ctx.store(outer, &new4, 0).ok()?;
    ctx.store(IP_TTL, &new_ttl_proto, 0).ok()
}

/// Writes the port at `port_off` (from `old_port_be` to `port_be`), with its share of the
/// transport checksum unless `csum_flags` is `None` (a UDP datagram without one).
#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    p: &Pkt,
    (port_off, old_port_be, port_be): (usize, u16, u16),
    csum_flags: Option<u64>,
) -> Option<()> {
    if let Some(flags) = csum_flags {
        ctx.l4_csum_replace(
            p.csum(),
            u64::from(old_port_be),
            u64::from(port_be),
            flags | 2,
        )
        .ok()?;
    }
    ctx.store(port_off, &port_be, 0).ok()
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
fn track(ctx: &TcContext, p: &Pkt, key: &FlowKey, front: &Addr) -> Option<()> {
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
            } else if starts && p.proto == PROTO_TCP {
                // The client's new connection on the tuple of one that closed.
                f.flags = 0;
                f.in_ifindex = ifindex(ctx);
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
    forward(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn forward(ctx: &TcContext) -> Option<i32> {
    let p = parse(ctx)?;
    let r = translate(ctx, p);
    if r.is_none() && p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A connection the programs do not translate (routed to a container's own
        // address, say) whose replies would carry the reply tuple of a translated flow
        // the client had (the same client port: a client reuses it once that one
        // closed, or for another destination): that flow's entry goes, or its replies
        // would be rewritten. One lookup per new connection, none per packet.
        let _ = FLOWS.remove(FlowKey::new(p.dst, p.src, p.dport_be, p.sport_be, p.proto));
    }
    r
}

#[inline(always)]
fn translate(ctx: &TcContext, p: &Pkt) -> Option<i32> {
    // Traffic to a port nothing publishes (nearly all of it) pays this one lookup.
    let port = PortKey {
        port_be: p.dport_be,
        proto: p.proto,
        pad: 0,
    };
    PORTS.get_ptr(port)?;
    // A spent TTL is the stack's to answer (ICMP time exceeded), before any flow exists.
    if p.ttl <= 1 || !allowed(&p.src) {
        return None;
    }
    let b = frontend_for(
        &p.dst,
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
    let t = if p.v6 {
        // An IPv6 client of an IPv4-only container needs a proxy (Docker's), not a
        // rewrite.
        target_v6(&p.dst, &b).filter(|t| !is_v4_mapped(&t.addr))?
    } else {
        target_v4(&b)?
    };
    // SAFETY: entries are written whole by the agent.
    let ep = unsafe { PKT_EP.get(t.addr) }?;
    // A packet too big for the container's link would be dropped by the redirect: the
    // stack's path answers it (fragmentation needed, or fragments).
    let mut mtu: u32 = 0;
    // SAFETY: the context's skb, and a u32 the helper writes the MTU to.
    if unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ep.ifindex, &raw mut mtu, 0, 0) } != 0 {
        return None;
    }
    let key = FlowKey::new(t.addr, p.src, t.port_be, p.sport_be, p.proto);
    // Without an agent vouching for the maps no flow starts; flows that did continue (as
    // connections the socket layer made do).
    if !agent_running() && FLOWS.get_ptr(key).is_none() {
        return None;
    }
    if p.icmp {
        // An error about a flow's reply: only for a flow there is.
        let f = FLOWS.get_ptr(key)?;
        // SAFETY: a value pointer of this map, valid for the program's run.
        let f = unsafe { &*f };
        if f.front != p.dst || f.front_port_be != p.dport_be {
            return None;
        }
        rewrite_icmp(ctx, p, End::Dst, &t.addr, t.port_be)?;
    } else {
        track(ctx, p, &key, &p.dst)?;
        rewrite(ctx, p, End::Dst, &t.addr, t.port_be)?;
    }
    ctx.store(0, &ep.mac, 0).ok()?;
    ctx.store(6, &ep.gw_mac, 0).ok()?;
    // SAFETY: only sets where the packet goes once the program returns.
    let r = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    i32::try_from(r).ok()
}

#[classifier]
pub fn dp_tc_veth_in(ctx: TcContext) -> i32 {
    reply(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn reply(ctx: &TcContext) -> Option<i32> {
    let p = parse(ctx)?;
    let key = FlowKey::new(p.src, p.dst, p.sport_be, p.dport_be, p.proto);
    let f = FLOWS.get_ptr_mut(key)?;
    // SAFETY: a value pointer of this map, valid for the program's run.
    let f = unsafe { &mut *f };
    // SAFETY: reads the clock.
    f.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if p.closing() {
        f.flags |= FLOW_F_CLOSING;
    }
    let (front, front_port_be, out) = (f.front, f.front_port_be, f.in_ifindex);
    if p.icmp {
        // The container's error about a client's packet (a UDP port unreachable, say).
        rewrite_icmp(ctx, p, End::Src, &front, front_port_be)?;
    } else {
        rewrite(ctx, p, End::Src, &front, front_port_be)?;
    }
    // SAFETY: only sets where the packet goes once the program returns; the kernel
    // resolves the route and the neighbour.
    let r = unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) };
    i32::try_from(r).ok()
}
