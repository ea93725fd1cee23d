//! Integration: the real programs attached to a child cgroup, a backend in its own network
//! namespace behind a veth (laid out like a Docker bridge), real sockets. Root only:
//! `cargo xtask test` runs these with `--ignored --test-threads=1`.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpListener, UdpSocket},
    process::Command,
};

use common::{Cgroup, NetNs, PY_CLIENT, Veth};
use dataplane::{
    bpf::{self, Loaded},
    desired::ip_to_addr,
    reconcile::KvStore,
};
use dataplane_common::{
    Backend, CFG_F_RESERVE_PORTS, Config, FrontendKey, LOCAL_HOST, LocalAddr, PROTO_TCP, PROTO_UDP,
    WILDCARD4, WILDCARD6,
};

struct Lab {
    // Field order is drop order: programs first, then the cgroup, the veth, the namespace.
    loaded: Loaded,
    cg: Cgroup,
    _veth: Veth,
    ns: NetNs,
    host_ip: String,
    backend_ip: String,
}

/// Backend servers in the namespace answer `backend <client address>`.
fn serve(ns: &NetNs, ip: &str) {
    let tcp_addr = format!("{ip}:8080");
    let udp_addr = format!("{ip}:8081");
    let (tcp, udp) = ns.run(move || {
        (
            TcpListener::bind(&tcp_addr).unwrap(),
            UdpSocket::bind(&udp_addr).unwrap(),
        )
    });
    std::thread::spawn(move || {
        for s in tcp.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            // One write: the client reads one segment.
            let _ = s.write_all(format!("backend {}\n", peer.ip()).as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("backend {}", peer.ip()).as_bytes(), peer);
        }
    });
}

fn lab(test: u32) -> Lab {
    let id = (std::process::id() % 10_000) * 10 + test;
    let net = 1 + ((std::process::id() * 10 + test) % 250);
    let host_ip = format!("10.200.{net}.1");
    let backend_ip = format!("10.200.{net}.2");
    let ns = NetNs::new(&format!("dpit-{id}"));
    let veth = Veth::new(
        &ns,
        &format!("dpit{id}"),
        &format!("{host_ip}/24"),
        &format!("{backend_ip}/24"),
    );
    serve(&ns, &backend_ip);
    let cg = Cgroup::new(&format!("dataplane-it-{id}"));
    let mut loaded = Loaded::load_and_attach(&cg.path).expect("load and attach");
    loaded
        .set_config(Config {
            host_netns_cookie: bpf::netns_cookie().unwrap(),
            flags: CFG_F_RESERVE_PORTS,
        })
        .unwrap();
    let b: IpAddr = backend_ip.parse().unwrap();
    let h: IpAddr = host_ip.parse().unwrap();
    let mut fe = loaded.frontends().unwrap();
    for (port, bport, proto) in [(18080, 8080, PROTO_TCP), (18081, 8081, PROTO_UDP)] {
        for wild in [WILDCARD4, WILDCARD6] {
            fe.put(
                &FrontendKey::new(wild, port, proto),
                &Backend {
                    addr4: ip_to_addr(b),
                    addr6: [0; 16],
                    port_be: u16::to_be(bport),
                    flags: 0,
                    id: 1,
                },
            )
            .unwrap();
        }
    }
    loaded
        .local_addrs()
        .unwrap()
        .put(&ip_to_addr(h), &LocalAddr { kind: LOCAL_HOST })
        .unwrap();
    Lab {
        loaded,
        cg,
        _veth: veth,
        ns,
        host_ip,
        backend_ip,
    }
}

fn client(mut c: Command, kind: &str, host: &str, port: u16) -> String {
    let out = c
        .args(["-c", PY_CLIENT, kind, host, &port.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn socket_layer_in_a_child_cgroup() {
    let lab = lab(1);
    let in_cg = || lab.cg.command("python3");
    let (h, b) = (&lab.host_ip, &lab.backend_ip);

    // TCP to loopback: connected straight to the backend, which sees the real client
    // address; getpeername() shows what was dialled.
    assert_eq!(
        client(in_cg(), "tcp", "127.0.0.1", 18080),
        format!("ok backend {h} 127.0.0.1 18080")
    );
    // A host address (from the local-address map) works the same.
    assert_eq!(
        client(in_cg(), "tcp", h, 18080),
        format!("ok backend {h} {h} 18080")
    );
    // IPv6 loopback on a dual-stack socket reaches the IPv4 backend.
    assert_eq!(
        client(in_cg(), "tcp", "::1", 18080),
        format!("ok backend {h} ::1 18080")
    );
    // UDP, connected and not: replies appear to come from the dialled address.
    assert_eq!(
        client(in_cg(), "udpc", "127.0.0.1", 18081),
        format!("ok backend {h} 127.0.0.1 18081")
    );
    assert_eq!(
        client(in_cg(), "udp", "127.0.0.1", 18081),
        format!("ok backend {h} 127.0.0.1 18081")
    );

    // Outside the cgroup nothing is translated: nothing listens on 127.0.0.1:18080.
    assert_eq!(
        client(Command::new("python3"), "tcp", "127.0.0.1", 18080),
        "error 111"
    );

    // In another network namespace, loopback is that namespace's own...
    let mut c = lab.cg.command("ip");
    c.args(["netns", "exec", &lab.ns.name, "python3"]);
    assert_eq!(client(c, "tcp", "127.0.0.1", 18080), "error 111");
    // ...but host addresses are translated from there too (hairpin).
    let mut c = lab.cg.command("ip");
    c.args(["netns", "exec", &lab.ns.name, "python3"]);
    assert_eq!(
        client(c, "tcp", h, 18080),
        format!("ok backend {b} {h} 18080")
    );

    let stats = lab.loaded.stats().unwrap();
    assert!(
        stats[dataplane_common::STAT_CONNECT as usize] >= 5,
        "{stats:?}"
    );
    assert!(
        stats[dataplane_common::STAT_SENDMSG as usize] >= 1,
        "{stats:?}"
    );
    assert!(
        stats[dataplane_common::STAT_RECVMSG as usize] >= 1,
        "{stats:?}"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn udp_connect_to_port_zero_and_unknown_ports_pass_through() {
    let lab = lab(2);
    // glibc's source-address discovery: connect(UDP, 127.0.0.1:0) must just work.
    let out = lab
        .cg
        .command("python3")
        .args([
            "-c",
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.connect(('127.0.0.1', 0)); print(s.getsockname()[0])",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "127.0.0.1");
    // A port that is not published is left alone.
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18089),
        "error 111"
    );
    let stats = lab.loaded.stats().unwrap();
    assert_eq!(
        stats[dataplane_common::STAT_CONNECT as usize],
        0,
        "{stats:?}"
    );
}
