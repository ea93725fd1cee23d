//! Integration: the packet layer's TC programs run on synthetic frames with
//! `BPF_PROG_TEST_RUN` (nothing attached anywhere). Every rewrite is checked against a
//! software recomputation of the IPv4 and transport checksums. Root only: `cargo xtask
//! test` runs these with `--ignored --test-threads=1`.

mod common;

use std::{net::IpAddr, process::Command};

use common::{NetNs, PY_CLIENT, Veth, cmd, serve, sh};

use dataplane::{
    apply::reconcile::KvStore,
    bpf::pkt::{FORWARD, PacketPrograms, REPLY, Timeouts, monotonic_ns},
};
use dataplane_common::{
    Addr, Backend, FrontendKey, LOCAL_HOST, LocalAddr, PROTO_TCP, PROTO_UDP, WILDCARD4, WILDCARD6,
    pkt::{FlowKey, PktEndpoint, TC_ACT_REDIRECT, TC_ACT_UNSPEC},
    v4_mapped,
};

const HOST: [u8; 4] = [192, 0, 2, 10];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const CTR: [u8; 4] = [172, 31, 0, 2];
const CTR_MAC: [u8; 6] = [2, 0x42, 0xac, 0x1f, 0, 2];
const BR_MAC: [u8; 6] = [2, 0x42, 0x11, 0x22, 0x33, 0x44];
/// The container's host-side veth in the synthetic tests: loopback, an interface that
/// exists (the programs check the packet against its MTU).
const VETH: u32 = 1;
const HOST6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const CTR6: [u8; 16] = [0xfd, 0, 0, 0xd0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !u16::try_from(acc).expect("folded to 16 bits")
}

/// The transport checksum over `pseudo` (the pseudo-header) and the transport part `l4`
/// (its checksum field taken as zero), as it should be.
fn l4_sum(pseudo: &[u8], l4: &[u8], proto: u8) -> u16 {
    let mut zeroed = l4.to_vec();
    let at = if proto == PROTO_TCP { 16 } else { 6 };
    zeroed[at] = 0;
    zeroed[at + 1] = 0;
    let c = fold(sum16(&zeroed, sum16(pseudo, 0)));
    if proto == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The transport checksum of an IPv4 packet (`ip`: from the IP header on).
fn l4_csum(ip: &[u8], proto: u8) -> u16 {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4 = &ip[ihl..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    l4_sum(&pseudo, l4, proto)
}

/// The transport checksum of an IPv6 packet without extension headers.
fn l4_csum6(ip: &[u8], proto: u8) -> u16 {
    let l4 = &ip[40..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&u32::try_from(l4.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    l4_sum(&pseudo, l4, proto)
}

fn ip_csum(ip: &[u8]) -> u16 {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let mut h = ip[..ihl].to_vec();
    h[10] = 0;
    h[11] = 0;
    fold(sum16(&h, 0))
}

struct Frame {
    /// 4 bytes (IPv4) or 16 (IPv6).
    src: Vec<u8>,
    dst: Vec<u8>,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    ttl: u8,
    udp_no_csum: bool,
    /// Zero bytes after the payload.
    pad: usize,
}

impl Frame {
    fn tcp(
        src: impl AsRef<[u8]>,
        sport: u16,
        dst: impl AsRef<[u8]>,
        dport: u16,
        flags: u8,
    ) -> Self {
        Self {
            src: src.as_ref().to_vec(),
            dst: dst.as_ref().to_vec(),
            sport,
            dport,
            proto: PROTO_TCP,
            tcp_flags: flags,
            ttl: 64,
            udp_no_csum: false,
            pad: 0,
        }
    }

    fn udp(src: impl AsRef<[u8]>, sport: u16, dst: impl AsRef<[u8]>, dport: u16) -> Self {
        Self {
            proto: PROTO_UDP,
            tcp_flags: 0,
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    /// An Ethernet frame with valid checksums and a payload.
    fn bytes(&self) -> Vec<u8> {
        let mut payload = b"dataplane packet layer test payload, odd length!".to_vec();
        payload.resize(payload.len() + self.pad, 0);
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend_from_slice(&1000u32.to_be_bytes());
            l4.extend_from_slice(&0u32.to_be_bytes());
            l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            let len = u16::try_from(8 + payload.len()).unwrap();
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&payload);
        if self.src.len() == 16 {
            return self.bytes6(&l4);
        }
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&u16::try_from(20 + l4.len()).unwrap().to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, self.ttl, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src);
        ip.extend_from_slice(&self.dst);
        ip.extend_from_slice(&l4);
        let c = ip_csum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        if !self.udp_no_csum {
            let c = l4_csum(&ip, self.proto);
            let at = 20 + if self.proto == PROTO_TCP { 16 } else { 6 };
            ip[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        ether(0x0800, &ip)
    }

    fn bytes6(&self, l4: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
        ip.extend_from_slice(&[self.proto, self.ttl]);
        ip.extend_from_slice(&self.src);
        ip.extend_from_slice(&self.dst);
        ip.extend_from_slice(l4);
        let c = l4_csum6(&ip, self.proto);
        let at = 40 + if self.proto == PROTO_TCP { 16 } else { 6 };
        ip[at..at + 2].copy_from_slice(&c.to_be_bytes());
        ether(0x86dd, &ip)
    }
}

fn ether(ethertype: u16, ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0xaa; 6];
    f.extend_from_slice(&[0xbb; 6]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// What a frame says, once its checksums are verified.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    dmac: [u8; 6],
    smac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    ttl: u8,
}

fn seen(f: &[u8]) -> Seen {
    let ip = &f[14..];
    let v6 = u16::from_be_bytes([f[12], f[13]]) == 0x86dd;
    let (proto, l4, csum) = if v6 {
        (ip[6], 40, l4_csum6(ip, ip[6]))
    } else {
        assert_eq!(
            u16::from_be_bytes([ip[10], ip[11]]),
            ip_csum(ip),
            "IPv4 header checksum"
        );
        (ip[9], 20, l4_csum(ip, ip[9]))
    };
    let at = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    let have = u16::from_be_bytes([ip[at], ip[at + 1]]);
    if v6 || !(proto == PROTO_UDP && have == 0) {
        assert_eq!(have, csum, "transport checksum");
    }
    let addr = |r: std::ops::Range<usize>| {
        if v6 {
            IpAddr::from(<[u8; 16]>::try_from(&ip[r]).unwrap())
        } else {
            IpAddr::from(<[u8; 4]>::try_from(&ip[r]).unwrap())
        }
    };
    let (src, dst) = if v6 {
        (addr(8..24), addr(24..40))
    } else {
        (addr(12..16), addr(16..20))
    };
    Seen {
        dmac: f[0..6].try_into().unwrap(),
        smac: f[6..12].try_into().unwrap(),
        src,
        dst,
        sport: u16::from_be_bytes([ip[l4], ip[l4 + 1]]),
        dport: u16::from_be_bytes([ip[l4 + 2], ip[l4 + 3]]),
        ttl: ip[if v6 { 7 } else { 8 }],
    }
}

/// The programs with one published port (`HOST:8080/tcp` and `*:5353/udp` to the
/// container's 80 and 53), the container's endpoint, and clients in 198.51.100.0/24
/// allowed.
fn programs() -> PacketPrograms {
    let mut p = unvouched();
    p.vouch().unwrap();
    p
}

/// [`programs`], with no agent vouching for the maps.
fn unvouched() -> PacketPrograms {
    let mut p = PacketPrograms::load(1024).expect("load the packet programs");
    let backend = |port: u16, id| Backend {
        addr4: v4_mapped(CTR),
        addr6: CTR6,
        port_be: port.to_be(),
        flags: 0,
        id,
        net: 1,
        pad: 0,
    };
    // An IPv4-only container published on IPv6 too (as Docker does with docker-proxy).
    let v4_only = Backend {
        addr6: [0; 16],
        ..backend(80, 5)
    };
    let mut fe = p.frontends().unwrap();
    for (addr, port, proto, b) in [
        (v4_mapped(HOST), 8080, PROTO_TCP, backend(80, 1)),
        (WILDCARD4, 5353, PROTO_UDP, backend(53, 2)),
        (HOST6, 8080, PROTO_TCP, backend(80, 3)),
        (WILDCARD6, 5353, PROTO_UDP, backend(53, 4)),
        (HOST6, 9090, PROTO_TCP, v4_only),
    ] {
        fe.put(&FrontendKey::new(addr, port, proto), &b).unwrap();
    }
    p.sync_ports().unwrap();
    for host in [v4_mapped(HOST), HOST6] {
        p.local_addrs()
            .unwrap()
            .put(&host, &LocalAddr { kind: LOCAL_HOST })
            .unwrap();
    }
    for ctr in [v4_mapped(CTR), CTR6] {
        p.endpoints()
            .unwrap()
            .put(
                &ctr,
                &PktEndpoint {
                    ifindex: VETH,
                    mac: CTR_MAC,
                    gw_mac: BR_MAC,
                },
            )
            .unwrap();
    }
    p.allow(v4_mapped([198, 51, 100, 0]), 96 + 24).unwrap();
    p.allow(
        [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        48,
    )
    .unwrap();
    p
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn a_tcp_flow_is_translated_both_ways_with_valid_checksums() {
    let mut p = programs();
    let (rc, out) = p
        .run(FORWARD, &Frame::tcp(CLIENT, 40000, HOST, 8080, SYN).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        seen(&out),
        Seen {
            dmac: CTR_MAC,
            smac: BR_MAC,
            src: IpAddr::from(CLIENT),
            dst: IpAddr::from(CTR),
            sport: 40000,
            dport: 80,
            ttl: 63,
        }
    );
    let flows = p.flows().unwrap();
    let key = FlowKey::new(
        v4_mapped(CTR),
        v4_mapped(CLIENT),
        80u16.to_be(),
        40000u16.to_be(),
        PROTO_TCP,
    );
    let flow = flows
        .get(&key)
        .expect("the flow is recorded by its reply tuple");
    assert_eq!(flow.front, v4_mapped(HOST));
    assert_eq!(u16::from_be(flow.front_port_be), 8080);
    // The container's SYN-ACK goes back as from the dialled address and port.
    let (rc, out) = p
        .run(
            REPLY,
            &Frame::tcp(CTR, 80, CLIENT, 40000, SYN | ACK).bytes(),
        )
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let back = seen(&out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport, back.ttl),
        (IpAddr::from(HOST), 8080, IpAddr::from(CLIENT), 40000, 63)
    );
    // The rest of the connection follows the flow; a FIN marks it closing.
    let (rc, out) = p
        .run(
            FORWARD,
            &Frame::tcp(CLIENT, 40000, HOST, 8080, ACK | FIN).bytes(),
        )
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(seen(&out).dport, 80);
    assert_eq!(p.flows().unwrap()[&key].flags, 1);
    // Aged by the agent's clock (the programs'): a closing flow goes after 10 s idle.
    let t = Timeouts::default();
    let now = monotonic_ns();
    assert_eq!(p.age_flows(now, &t).unwrap(), 0);
    assert_eq!(p.age_flows(now + 11_000_000_000, &t).unwrap(), 1);
    assert!(p.flows().unwrap().is_empty());
    // Its next packet is no longer translated: Docker's path.
    let input = Frame::tcp(CLIENT, 40000, HOST, 8080, ACK).bytes();
    assert_eq!(p.run(FORWARD, &input).unwrap(), (TC_ACT_UNSPEC, input));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn ipv6_flows_are_translated_both_ways_and_an_ipv4_only_backend_is_left_to_docker() {
    let mut p = programs();
    for (proto, port, ctr_port) in [(PROTO_TCP, 8080, 80), (PROTO_UDP, 5353, 53)] {
        let frame = |src: [u8; 16], sport, dst: [u8; 16], dport| {
            if proto == PROTO_TCP {
                let flags = if src == CLIENT6 { SYN } else { SYN | ACK };
                Frame::tcp(src, sport, dst, dport, flags)
            } else {
                Frame::udp(src, sport, dst, dport)
            }
        };
        let (rc, out) = p
            .run(FORWARD, &frame(CLIENT6, 41000, HOST6, port).bytes())
            .unwrap();
        assert_eq!(rc, TC_ACT_REDIRECT, "{proto}");
        let s = seen(&out);
        assert_eq!(
            (s.dst, s.dport, s.ttl, s.dmac),
            (IpAddr::from(CTR6), ctr_port, 63, CTR_MAC)
        );
        let (rc, out) = p
            .run(REPLY, &frame(CTR6, ctr_port, CLIENT6, 41000).bytes())
            .unwrap();
        assert_eq!(rc, TC_ACT_REDIRECT, "{proto}");
        let s = seen(&out);
        assert_eq!((s.src, s.sport), (IpAddr::from(HOST6), port));
    }
    let input = Frame::tcp(CLIENT6, 41001, HOST6, 9090, SYN).bytes();
    let (rc, out) = p.run(FORWARD, &input).unwrap();
    assert_eq!((rc, out), (TC_ACT_UNSPEC, input));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn udp_with_and_without_a_checksum_through_a_wildcard_frontend() {
    let mut p = programs();
    let (rc, out) = p
        .run(FORWARD, &Frame::udp(CLIENT, 5000, HOST, 5353).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let s = seen(&out);
    assert_eq!((s.dst, s.dport), (IpAddr::from(CTR), 53));
    let (rc, out) = p
        .run(REPLY, &Frame::udp(CTR, 53, CLIENT, 5000).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let s = seen(&out);
    assert_eq!((s.src, s.sport), (IpAddr::from(HOST), 5353));
    // A datagram without a checksum stays without one.
    let mut f = Frame::udp(CLIENT, 5001, HOST, 5353);
    f.udp_no_csum = true;
    let (rc, out) = p.run(FORWARD, &f.bytes()).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(&out[14 + 26..14 + 28], &[0, 0]);
    assert_eq!(seen(&out).dport, 53);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn what_the_programs_do_not_know_is_left_to_dockers_path_untouched() {
    let mut p = programs();
    let untouched = |p: &mut PacketPrograms, prog: &str, f: &Frame| {
        let input = f.bytes();
        let (rc, out) = p.run(prog, &input).unwrap();
        assert_eq!(rc, TC_ACT_UNSPEC);
        assert_eq!(out, input, "a packet left alone is not changed");
    };
    // A TCP packet of a connection the programs did not see start (Docker's DNAT has it).
    untouched(&mut p, FORWARD, &Frame::tcp(CLIENT, 40001, HOST, 8080, ACK));
    // A client outside the allow-list.
    untouched(
        &mut p,
        FORWARD,
        &Frame::tcp([203, 0, 113, 9], 40002, HOST, 8080, SYN),
    );
    // An unpublished port, a published port on another protocol, an address that is not
    // the host's.
    untouched(&mut p, FORWARD, &Frame::tcp(CLIENT, 40003, HOST, 8081, SYN));
    untouched(&mut p, FORWARD, &Frame::udp(CLIENT, 40004, HOST, 8080));
    untouched(
        &mut p,
        FORWARD,
        &Frame::tcp(CLIENT, 40005, [192, 0, 2, 99], 8080, SYN),
    );
    // A spent TTL is the stack's to answer.
    let mut f = Frame::tcp(CLIENT, 40006, HOST, 8080, SYN);
    f.ttl = 1;
    untouched(&mut p, FORWARD, &f);
    // A reply of no recorded flow.
    untouched(
        &mut p,
        REPLY,
        &Frame::tcp(CTR, 80, CLIENT, 40007, SYN | ACK),
    );
    assert!(p.flows().unwrap().is_empty());
    // Without an agent vouching for the maps, nothing is translated.
    let mut fresh = unvouched();
    untouched(
        &mut fresh,
        FORWARD,
        &Frame::tcp(CLIENT, 40008, HOST, 8080, SYN),
    );
}

/// Links a test made, deleted on drop (a veth's peer goes with it).
#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn a_direct_connection_on_a_translated_flows_tuple_takes_its_place() {
    let mut p = programs();
    let (rc, _) = p
        .run(FORWARD, &Frame::tcp(CLIENT, 40100, HOST, 8080, SYN).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(p.flows().unwrap().len(), 1);
    // The same client port, routed to the container's own address: not translated, and
    // the translated flow's entry goes, so this connection's replies are left alone.
    let direct = Frame::tcp(CLIENT, 40100, CTR, 80, SYN).bytes();
    assert_eq!(p.run(FORWARD, &direct).unwrap(), (TC_ACT_UNSPEC, direct));
    assert!(p.flows().unwrap().is_empty());
    let reply = Frame::tcp(CTR, 80, CLIENT, 40100, SYN | ACK).bytes();
    assert_eq!(p.run(REPLY, &reply).unwrap(), (TC_ACT_UNSPEC, reply));
    // Packets of a direct connection that are not its SYN cost no flow lookup, and touch
    // nothing.
    let (rc, _) = p
        .run(FORWARD, &Frame::tcp(CLIENT, 40101, HOST, 8080, SYN).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let ack = Frame::tcp(CLIENT, 40101, CTR, 80, ACK).bytes();
    assert_eq!(p.run(FORWARD, &ack).unwrap(), (TC_ACT_UNSPEC, ack));
    assert_eq!(p.flows().unwrap().len(), 1);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn a_packet_too_big_for_the_containers_link_is_left_to_the_stack() {
    let mut p = programs();
    let name = format!("dpmtu{}", std::process::id() % 100_000);
    let _links = Links(vec![name.clone()]);
    sh(&[
        "ip",
        "link",
        "add",
        &name,
        "mtu",
        "1280",
        "type",
        "veth",
        "peer",
        "name",
        &format!("{name}p"),
    ]);
    p.endpoints()
        .unwrap()
        .put(
            &v4_mapped(CTR),
            &PktEndpoint {
                ifindex: ifindex(&name),
                mac: CTR_MAC,
                gw_mac: BR_MAC,
            },
        )
        .unwrap();
    // 1400 bytes of IP: the redirect would drop it; the stack answers (fragmentation
    // needed) through Docker's path. No flow starts.
    let mut big = Frame::udp(CLIENT, 5001, HOST, 5353);
    big.pad = 1400 - 20 - 8 - 48;
    let input = big.bytes();
    assert_eq!(p.run(FORWARD, &input).unwrap(), (TC_ACT_UNSPEC, input));
    assert!(p.flows().unwrap().is_empty());
    // What fits goes through.
    big.pad = 1280 - 20 - 8 - 48;
    let (rc, _) = p.run(FORWARD, &big.bytes()).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
}

/// An ICMP or ICMPv6 error message: `kind`, `code`, a zero checksum, `word` (the
/// next-hop MTU of fragmentation needed, the MTU of packet too big), then `quoted`.
fn icmp_message((kind, code, word): (u8, u8, u32), quoted: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&word.to_be_bytes());
    msg.extend_from_slice(quoted);
    msg
}

/// An ICMP error (`kind`, `code`, then `word`: the next-hop MTU of fragmentation needed)
/// from `router` to `to`, quoting `quoted` (an IPv4 packet's start), with valid checksums.
fn icmp4(
    router: [u8; 4],
    to: [u8; 4],
    (kind, code, word): (u8, u8, u32),
    quoted: &[u8],
) -> Vec<u8> {
    let mut msg = icmp_message((kind, code, word), quoted);
    let c = fold(sum16(&msg, 0));
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&u16::try_from(20 + msg.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&router);
    ip.extend_from_slice(&to);
    ip.extend_from_slice(&msg);
    let c = ip_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ether(0x0800, &ip)
}

/// An ICMPv6 error from `router` to `to`, quoting `quoted`, with a valid checksum.
fn icmp6(
    router: [u8; 16],
    to: [u8; 16],
    (kind, code, word): (u8, u8, u32),
    quoted: &[u8],
) -> Vec<u8> {
    let msg = icmp_message((kind, code, word), quoted);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(msg.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[58, 64]);
    ip.extend_from_slice(&router);
    ip.extend_from_slice(&to);
    ip.extend_from_slice(&msg);
    let c = icmp6_sum(&ip);
    ip[42..44].copy_from_slice(&c.to_be_bytes());
    ether(0x86dd, &ip)
}

/// The ICMPv6 checksum of `ip` (an IPv6 packet carrying ICMPv6), as it should be.
fn icmp6_sum(ip: &[u8]) -> u16 {
    let mut msg = ip[40..].to_vec();
    msg[2] = 0;
    msg[3] = 0;
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    fold(sum16(&msg, sum16(&pseudo, 0)))
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn icmp_errors_about_a_flows_replies_reach_the_container_translated() {
    let mut p = programs();
    let router = [203, 0, 113, 1];
    // A router on the way to the client says the container's reply was too big.
    let reply = Frame::tcp(HOST, 8080, CLIENT, 40300, ACK).bytes();
    let quoted = &reply[14..14 + 20 + 8];
    let error = icmp4(router, HOST, (3, 4, 1400), quoted);
    // No flow yet: Docker's path.
    assert_eq!(
        p.run(FORWARD, &error).unwrap(),
        (TC_ACT_UNSPEC, error.clone())
    );
    let (rc, _) = p
        .run(FORWARD, &Frame::tcp(CLIENT, 40300, HOST, 8080, SYN).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let (rc, out) = p.run(FORWARD, &error).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[..12], [CTR_MAC, BR_MAC].concat());
    let ip = &out[14..];
    assert_eq!(
        u16::from_be_bytes([ip[10], ip[11]]),
        ip_csum(ip),
        "IPv4 header checksum"
    );
    assert_eq!(
        (&ip[12..16], &ip[16..20], ip[8]),
        (&router[..], &CTR[..], 63)
    );
    let msg = &ip[20..];
    assert_eq!(fold(sum16(msg, 0)), 0, "ICMP checksum");
    assert_eq!(&msg[..8], &[3, 4, msg[2], msg[3], 0, 0, 0x05, 0x78]);
    let inner = &msg[8..];
    assert_eq!(
        u16::from_be_bytes([inner[10], inner[11]]),
        ip_csum(inner),
        "quoted IPv4 header checksum"
    );
    // The quoted packet is now the container's reply as it sent it.
    assert_eq!((&inner[12..16], &inner[16..20]), (&CTR[..], &CLIENT[..]));
    assert_eq!(
        (
            u16::from_be_bytes([inner[20], inner[21]]),
            u16::from_be_bytes([inner[22], inner[23]])
        ),
        (80, 40300)
    );
    // An error quoting another client port is no flow's: untouched.
    let other = Frame::tcp(HOST, 8080, CLIENT, 40301, ACK).bytes();
    let stray = icmp4(router, HOST, (3, 4, 1400), &other[14..14 + 28]);
    assert_eq!(p.run(FORWARD, &stray).unwrap(), (TC_ACT_UNSPEC, stray));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn icmpv6_packet_too_big_about_a_flows_replies_reaches_the_container_translated() {
    let mut p = programs();
    let router = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let (rc, _) = p
        .run(
            FORWARD,
            &Frame::tcp(CLIENT6, 41300, HOST6, 8080, SYN).bytes(),
        )
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let reply = Frame::tcp(HOST6, 8080, CLIENT6, 41300, ACK).bytes();
    let error = icmp6(router, HOST6, (2, 0, 1280), &reply[14..14 + 40 + 8]);
    let (rc, out) = p.run(FORWARD, &error).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let ip = &out[14..];
    assert_eq!(
        (&ip[8..24], &ip[24..40], ip[7]),
        (&router[..], &CTR6[..], 63)
    );
    assert_eq!(
        u16::from_be_bytes([ip[42], ip[43]]),
        icmp6_sum(ip),
        "ICMPv6 checksum"
    );
    let inner = &ip[48..];
    assert_eq!((&inner[8..24], &inner[24..40]), (&CTR6[..], &CLIENT6[..]));
    assert_eq!(
        (
            u16::from_be_bytes([inner[40], inner[41]]),
            u16::from_be_bytes([inner[42], inner[43]])
        ),
        (80, 41300)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn the_containers_port_unreachable_reaches_the_client_as_from_the_dialled_port() {
    let mut p = programs();
    let (rc, _) = p
        .run(FORWARD, &Frame::udp(CLIENT, 5002, HOST, 5353).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    // The container has nothing on its port 53: it says so about the datagram it got.
    let got = Frame::udp(CLIENT, 5002, CTR, 53).bytes();
    let error = icmp4(CTR, CLIENT, (3, 3, 0), &got[14..14 + 28]);
    let (rc, out) = p.run(REPLY, &error).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let ip = &out[14..];
    assert_eq!(
        u16::from_be_bytes([ip[10], ip[11]]),
        ip_csum(ip),
        "IPv4 header checksum"
    );
    assert_eq!((&ip[12..16], &ip[16..20]), (&HOST[..], &CLIENT[..]));
    let msg = &ip[20..];
    assert_eq!(fold(sum16(msg, 0)), 0, "ICMP checksum");
    let inner = &msg[8..];
    assert_eq!(
        u16::from_be_bytes([inner[10], inner[11]]),
        ip_csum(inner),
        "quoted IPv4 header checksum"
    );
    // The quoted datagram is the client's as it sent it: to the dialled address and port.
    assert_eq!((&inner[12..16], &inner[16..20]), (&CLIENT[..], &HOST[..]));
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 5353);
    // And over IPv6.
    let (rc, _) = p
        .run(FORWARD, &Frame::udp(CLIENT6, 5003, HOST6, 5353).bytes())
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let got = Frame::udp(CLIENT6, 5003, CTR6, 53).bytes();
    let error = icmp6(CTR6, CLIENT6, (1, 4, 0), &got[14..14 + 48]);
    let (rc, out) = p.run(REPLY, &error).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let ip = &out[14..];
    assert_eq!((&ip[8..24], &ip[24..40]), (&HOST6[..], &CLIENT6[..]));
    assert_eq!(
        u16::from_be_bytes([ip[42], ip[43]]),
        icmp6_sum(ip),
        "ICMPv6 checksum"
    );
    let inner = &ip[48..];
    assert_eq!((&inner[8..24], &inner[24..40]), (&CLIENT6[..], &HOST6[..]));
    assert_eq!(u16::from_be_bytes([inner[42], inner[43]]), 5353);
}

struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = cmd(&["ip", "link", "del", l]);
        }
    }
}

/// An nftables table that makes the host's namespace track every connection it sees (as
/// Docker's rules do); deleted on drop.
struct Tracking(String);

impl Tracking {
    fn new(name: &str) -> Self {
        let script = format!(
            "table inet {name} {{ chain pre {{ type filter hook prerouting priority 0; ct state new counter; }}; \
             chain out {{ type filter hook output priority 0; ct state new counter; }}; }}"
        );
        sh(&["nft", &script]);
        Self(name.into())
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        let _ = cmd(&["nft", "delete", "table", "inet", &self.0]);
    }
}

fn mac(ns: Option<&NetNs>, ifname: &str) -> [u8; 6] {
    let mut c = vec!["ip", "-o", "link", "show", ifname];
    if let Some(ns) = ns {
        c.splice(0..0, ["ip", "netns", "exec", ns.name.as_str()]);
    }
    let out = sh(&c);
    let text = out
        .split("link/ether ")
        .nth(1)
        .expect("an Ethernet address")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let b: Vec<u8> = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    b.try_into().unwrap()
}

fn ifindex(ifname: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Entries of the host's connection tracking with `addr` as source or destination.
fn tracked(addr: &str) -> usize {
    let family = if addr.contains(':') { "ipv6" } else { "ipv4" };
    ["-s", "-d"]
        .iter()
        .map(|dir| {
            let out = cmd(&["conntrack", "-L", "-f", family, dir, addr]);
            String::from_utf8_lossy(&out.stdout).lines().count()
        })
        .sum()
}

fn client(ns: &NetNs, kind: &str, host: &str, port: u16) -> String {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "python3", "-c", PY_CLIENT, kind, host,
        ])
        .arg(port.to_string())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An outside client behind a veth that is the host's uplink (the host is 198.51.100.1,
/// the client 198.51.100.7), and a container on a bridge laid out as Docker does (the
/// bridge 172.31.250.1, the container 172.31.250.2); all removed on drop.
struct Wire {
    up: String,
    vh: String,
    br: String,
    _links: Links,
    _up: Veth,
    outside: NetNs,
    ctr: NetNs,
}

fn wire() -> Wire {
    let id = std::process::id() % 10_000;
    // The client, behind a veth that is the host's uplink (the host is 198.51.100.1).
    let outside = NetNs::new(&format!("dppc-{id}"));
    let up = format!("dpup{id}");
    let up_veth = Veth::new(&outside, &up, "198.51.100.1/24", "198.51.100.7/24");
    sh(&[
        "ip",
        "-n",
        &outside.name,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
    ]);
    // A bridge and a container on it, laid out as Docker does.
    let ctr = NetNs::new(&format!("dppk-{id}"));
    let (br, vh) = (format!("dpbr{id}"), format!("dpvh{id}"));
    let links = Links(vec![vh.clone(), br.clone()]);
    sh(&["ip", "link", "add", &br, "type", "bridge"]);
    sh(&["ip", "addr", "add", "172.31.250.1/24", "dev", &br]);
    sh(&["ip", "link", "set", &br, "up"]);
    sh(&[
        "ip", "link", "add", &vh, "type", "veth", "peer", "name", "eth0", "netns", &ctr.name,
    ]);
    sh(&["ip", "link", "set", &vh, "master", &br, "up"]);
    sh(&[
        "ip",
        "-n",
        &ctr.name,
        "addr",
        "add",
        "172.31.250.2/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &ctr.name, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        &ctr.name,
        "route",
        "add",
        "default",
        "via",
        "172.31.250.1",
    ]);
    // IPv6 beside it (no duplicate address detection: usable at once).
    let (o, c, peer) = (outside.name.as_str(), ctr.name.as_str(), format!("{up}p"));
    for args in [
        &["addr", "add", "2001:db8:77::1/64", "dev", &up, "nodad"][..],
        &[
            "-n",
            o,
            "addr",
            "add",
            "2001:db8:77::7/64",
            "dev",
            &peer,
            "nodad",
        ],
        &["-n", o, "route", "add", "default", "via", "2001:db8:77::1"],
        &["addr", "add", "fd00:77::1/64", "dev", &br, "nodad"],
        &[
            "-n",
            c,
            "addr",
            "add",
            "fd00:77::2/64",
            "dev",
            "eth0",
            "nodad",
        ],
        &["-n", c, "route", "add", "default", "via", "fd00:77::1"],
    ] {
        let mut a = vec!["ip"];
        a.extend_from_slice(args);
        sh(&a);
    }
    Wire {
        up,
        vh,
        br,
        _links: links,
        _up: up_veth,
        outside,
        ctr,
    }
}

/// Where to deliver each of the container's `addrs`, as the agent finds it (from inside the
/// container's namespace, the bridge's MAC from the host's), checked and written.
fn deliver_to(p: &mut PacketPrograms, ctr: &NetNs, vh: &str, br: &str, addrs: [(Addr, &str); 2]) {
    let want = PktEndpoint {
        ifindex: ifindex(vh),
        mac: mac(Some(ctr), "eth0"),
        gw_mac: mac(None, br),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (addr, text) in addrs {
        let ep = rt
            .block_on(dataplane::endpoint::of(&ctr.path(), text.parse().unwrap()))
            .unwrap();
        assert_eq!(ep, want, "{text}");
        p.endpoints().unwrap().put(&addr, &ep).unwrap();
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn an_outside_client_reaches_the_container_through_the_programs_untracked() {
    let w = wire();
    let (outside, ctr, up, vh, br) = (&w.outside, &w.ctr, &w.up, &w.vh, &w.br);
    serve(ctr, "172.31.250.2");
    serve(ctr, "[fd00:77::2]");
    let _tracking = Tracking::new(&format!("dpp_track_{}", std::process::id()));
    // Nothing on the host serves the ports: without the programs the client is refused,
    // and the host tracks its attempts (a refused TCP attempt's entry goes at once, a UDP
    // one stays for its timeout).
    assert_eq!(client(outside, "tcp", "198.51.100.1", 18080), "error 111");
    assert_eq!(client(outside, "udpc", "198.51.100.1", 18081), "error 111");
    let tracked_before = tracked("198.51.100.7");
    assert!(tracked_before >= 1, "the host does not track connections");

    assert_eq!(client(outside, "tcp", "2001:db8:77::1", 18080), "error 111");
    assert_eq!(
        client(outside, "udpc", "2001:db8:77::1", 18081),
        "error 111"
    );
    let v6_before = tracked("2001:db8:77::7");
    assert!(v6_before >= 1, "the host does not track IPv6 connections");

    let mut p = PacketPrograms::load(1024).unwrap();
    let ctr_addr = v4_mapped([172, 31, 250, 2]);
    let ctr6: Addr = "fd00:77::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let host6: Addr = "2001:db8:77::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let backend = |port: u16| Backend {
        addr4: ctr_addr,
        addr6: ctr6,
        port_be: port.to_be(),
        flags: 0,
        id: u32::from(port),
        net: 1,
        pad: 0,
    };
    let host = v4_mapped([198, 51, 100, 1]);
    let mut fe = p.frontends().unwrap();
    fe.put(&FrontendKey::new(host, 18080, PROTO_TCP), &backend(8080))
        .unwrap();
    fe.put(
        &FrontendKey::new(WILDCARD4, 18081, PROTO_UDP),
        &backend(8081),
    )
    .unwrap();
    // Nothing listens on the container's 8082: its port unreachable must reach the client.
    fe.put(
        &FrontendKey::new(WILDCARD4, 18082, PROTO_UDP),
        &backend(8082),
    )
    .unwrap();
    p.local_addrs()
        .unwrap()
        .put(&host, &LocalAddr { kind: LOCAL_HOST })
        .unwrap();
    p.local_addrs()
        .unwrap()
        .put(&host6, &LocalAddr { kind: LOCAL_HOST })
        .unwrap();
    p.frontends()
        .unwrap()
        .put(
            &FrontendKey::new(WILDCARD6, 18080, PROTO_TCP),
            &backend(8080),
        )
        .unwrap();
    deliver_to(
        &mut p,
        ctr,
        vh,
        br,
        [(ctr_addr, "172.31.250.2"), (ctr6, "fd00:77::2")],
    );
    p.allow(v4_mapped([198, 51, 100, 0]), 96 + 24).unwrap();
    p.allow(host6, 64).unwrap();
    p.sync_ports().unwrap();
    p.vouch().unwrap();
    p.attach(FORWARD, up).unwrap();
    p.attach(REPLY, vh).unwrap();

    // The backend sees the client's own address; the client sees the address it dialled.
    for _ in 0..3 {
        assert_eq!(
            client(outside, "tcp", "198.51.100.1", 18080),
            "ok backend 198.51.100.7 198.51.100.1 18080"
        );
        assert_eq!(
            client(outside, "udpc", "198.51.100.1", 18081),
            "ok backend 198.51.100.7 198.51.100.1 18081"
        );
    }
    assert_eq!(p.flows().unwrap().len(), 6);
    assert_eq!(client(outside, "udpc", "198.51.100.1", 18082), "error 111");
    // And over IPv6.
    for _ in 0..3 {
        assert_eq!(
            client(outside, "tcp", "2001:db8:77::1", 18080),
            "ok backend 2001:db8:77::7 2001:db8:77::1 18080"
        );
    }
    assert_eq!(p.flows().unwrap().len(), 10);
    // No netfilter hook of the host saw them: nothing new is tracked.
    assert!(tracked("198.51.100.7") <= tracked_before);
    assert!(tracked("2001:db8:77::7") <= v6_before);
    assert_eq!(tracked("172.31.250.2"), 0);
    assert_eq!(tracked("fd00:77::2"), 0);
    // Once no agent vouches, new connections are Docker's (here: refused by the host).
    drop(p);
    assert_eq!(client(outside, "tcp", "198.51.100.1", 18080), "error 111");
}
