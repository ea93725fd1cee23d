//! Integration: the real programs attached to a child cgroup, a backend in its own network
//! namespace behind a veth (laid out like a Docker bridge), real sockets. Root only:
//! `cargo xtask test` runs these with `--ignored --test-threads=1`.

mod common;

use std::{io::Write, net::IpAddr, process::Command};

use common::{Cgroup, NetNs, PY_CLIENT, Veth, serve};
use dataplane::{
    apply::reconcile::KvStore,
    bpf::{self, Loaded, sys},
    features::{Feature, Features},
    model::desired::{addr_to_ip, ip_to_addr, ports_of},
    netfilter::notrack::{Notrack, Spec},
};
use dataplane_common::{
    BACKEND_F_PAUSED, Backend, CFG_F_PEERS, CFG_F_RESERVE_PORTS, Config, FRONTENDS_MAX,
    FrontendKey, LOCAL_HOST, LocalAddr, PROTO_TCP, PROTO_UDP, PeerNet, PeerNetKey,
    TEST_F_HOST_NETNS, TEST_F_SOCK6, TestRequest, WILDCARD4, WILDCARD6,
};

/// A made-up network namespace cookie standing for a container's.
const CONTAINER_NS: u64 = 0x00dd_0000_0000_0042;

struct Lab {
    // Field order is drop order: programs first, then the cgroup, the veth, the namespace.
    loaded: Loaded,
    cg: Cgroup,
    _veth: Veth,
    ns: NetNs,
    host_ip: String,
    backend_ip: String,
}

/// The network id the lab's backend is on.
const NET: u32 = 5;

fn lab(test: u32) -> Lab {
    lab_with(test, &Features::probe())
}

/// [`lab`], with the programs for a kernel with `features`.
fn lab_with(test: u32, features: &Features) -> Lab {
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
    let mut loaded = Loaded::load_and_attach_sized(&cg.path, None, FRONTENDS_MAX, features, None)
        .expect("load and attach");
    loaded
        .set_config(Config {
            host_netns_cookie: bpf::netns_cookie().unwrap(),
            flags: CFG_F_RESERVE_PORTS,
        })
        .unwrap();
    loaded.vouch().expect("vouch");
    let b: IpAddr = backend_ip.parse().unwrap();
    let h: IpAddr = host_ip.parse().unwrap();
    let mut fe = loaded.frontends_map().unwrap();
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
                    net: NET,
                    pad: 0,
                },
            )
            .unwrap();
        }
    }
    let keys: Vec<FrontendKey> = loaded
        .frontends_map()
        .unwrap()
        .entries()
        .unwrap()
        .into_keys()
        .collect();
    for (k, v) in ports_of(keys.iter()) {
        loaded.ports_map().unwrap().put(&k, &v).unwrap();
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
    // ...and a namespace that is not a known container's is an external client: Docker's
    // path (here: nothing listens on the host address).
    let mut c = lab.cg.command("ip");
    c.args(["netns", "exec", &lab.ns.name, "python3"]);
    assert_eq!(client(c, "tcp", h, 18080), "error 111");
    let _ = b;

    // A socket bound to a loopback source is left alone (it could not reach the backend).
    assert_eq!(
        client(in_cg(), "tcp-from-loopback", "127.0.0.1", 18080),
        "error 111"
    );
    // An IPv6-only socket cannot use the IPv4 backend: left alone, never ENETUNREACH.
    assert_eq!(client(in_cg(), "tcp-v6only", "::1", 18080), "error 111");

    let stats = lab.loaded.stats().unwrap();
    assert!(
        stats[dataplane_common::STAT_CONNECT as usize] >= 4,
        "{stats:?}"
    );
    assert_eq!(
        stats[dataplane_common::STAT_SKIP_BOUND as usize],
        1,
        "{stats:?}"
    );
    assert_eq!(
        stats[dataplane_common::STAT_SKIP_V6ONLY as usize],
        1,
        "{stats:?}"
    );
    assert_eq!(
        stats[dataplane_common::STAT_SKIP_NETWORK as usize],
        1,
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

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn xlate_decision_runs_in_the_kernel() {
    let mut lab = lab(3);
    let b: IpAddr = lab.backend_ip.parse().unwrap();
    let h: IpAddr = lab.host_ip.parse().unwrap();
    let run = |loaded: &mut Loaded, addr: IpAddr, port: u16, proto: u8, flags: u8| {
        let req = TestRequest {
            addr: ip_to_addr(addr),
            port_be: port.to_be(),
            proto,
            flags,
            pad: 0,
            netns_cookie: CONTAINER_NS,
        };
        let (rc, answer) = loaded.test_xlate(&req).unwrap();
        (rc, addr_to_ip(&answer.addr), u16::from_be(answer.port_be))
    };
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let lo6: IpAddr = "::1".parse().unwrap();
    let other: IpAddr = "192.0.2.99".parse().unwrap();
    let host = TEST_F_HOST_NETNS;
    assert_eq!(
        run(&mut lab.loaded, lo, 18080, PROTO_TCP, host),
        (1, b, 8080)
    );
    assert_eq!(
        run(&mut lab.loaded, lo, 18081, PROTO_UDP, host),
        (1, b, 8081)
    );
    // Loopback outside the host namespace, unknown ports, wrong protocol, other hosts: no.
    assert_eq!(run(&mut lab.loaded, lo, 18080, PROTO_TCP, 0).0, 0);
    assert_eq!(run(&mut lab.loaded, lo, 18082, PROTO_TCP, host).0, 0);
    assert_eq!(run(&mut lab.loaded, lo, 18080, PROTO_UDP, host).0, 0);
    assert_eq!(run(&mut lab.loaded, other, 18080, PROTO_TCP, host).0, 0);
    assert_eq!(run(&mut lab.loaded, lo, 0, PROTO_UDP, host).0, 0);
    // Host addresses from another namespace (hairpin): only a Docker container's, on the
    // backend's network, with container clients on.
    assert_eq!(
        run(&mut lab.loaded, h, 18080, PROTO_TCP, host),
        (1, b, 8080)
    );
    assert_eq!(
        run(&mut lab.loaded, h, 18080, PROTO_TCP, 0).0,
        0,
        "an unknown namespace"
    );
    let peer = PeerNetKey {
        netns_cookie: CONTAINER_NS,
        net: NET,
        pad: 0,
    };
    lab.loaded
        .peer_nets()
        .unwrap()
        .put(&peer, &PeerNet { flags: 0 })
        .unwrap();
    assert_eq!(
        run(&mut lab.loaded, h, 18080, PROTO_TCP, 0).0,
        0,
        "container clients are off"
    );
    let cfg = Config {
        host_netns_cookie: bpf::netns_cookie().unwrap(),
        flags: CFG_F_RESERVE_PORTS | CFG_F_PEERS,
    };
    lab.loaded.set_config(cfg).unwrap();
    assert_eq!(run(&mut lab.loaded, h, 18080, PROTO_TCP, 0), (1, b, 8080));
    // The same container dialling its own 0.0.0.0 or loopback reaches its own services.
    let any: IpAddr = "0.0.0.0".parse().unwrap();
    assert_eq!(run(&mut lab.loaded, any, 18080, PROTO_TCP, 0).0, 0);
    assert_eq!(
        run(&mut lab.loaded, any, 18080, PROTO_TCP, host),
        (1, b, 8080)
    );
    // Another network's container: Docker's path.
    lab.loaded.peer_nets().unwrap().remove(&peer).unwrap();
    assert_eq!(run(&mut lab.loaded, h, 18080, PROTO_TCP, 0).0, 0);
    let stats = lab.loaded.stats().unwrap();
    assert!(
        stats[dataplane_common::STAT_SKIP_NETWORK as usize] >= 3,
        "{stats:?}"
    );
    // An IPv6 socket dialling ::1 gets the IPv4 backend, mapped.
    let (rc, addr, port) = run(&mut lab.loaded, lo6, 18080, PROTO_TCP, host | TEST_F_SOCK6);
    assert_eq!((rc, port), (1, 8080));
    assert_eq!(addr, b);
}

/// `bind()` of a TCP socket to `addr`:`port` by `c` (python3): `bound`, or the errno.
fn bind(mut c: Command, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns = socket.socket()\ntry:\n  s.bind(('{addr}', {port})); print('bound')\n\
         except OSError as e:\n  print(e.errno)\n"
    );
    let out = c.args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn bind_of_a_published_port_is_refused_in_the_host_namespace_only() {
    let lab = lab(4);
    assert_eq!(bind(lab.cg.command("python3"), "0.0.0.0", 18080), "98");
    assert_eq!(bind(lab.cg.command("python3"), "127.0.0.1", 18080), "98");
    assert_eq!(bind(lab.cg.command("python3"), &lab.host_ip, 18080), "98");
    assert_eq!(bind(lab.cg.command("python3"), "127.0.0.1", 18089), "bound");
    // Outside the cgroup the programs do not run.
    assert_eq!(bind(Command::new("python3"), "127.0.0.1", 18080), "bound");
    // Another network namespace has ports of its own.
    let mut c = lab.cg.command("ip");
    c.args(["netns", "exec", &lab.ns.name, "python3"]);
    assert_eq!(bind(c, "0.0.0.0", 18080), "bound");
    let stats = lab.loaded.stats().unwrap();
    assert_eq!(stats[dataplane_common::STAT_BIND_REFUSED as usize], 3);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn the_probes_tell_what_the_kernel_lacks_from_what_it_has() {
    const SOCK_ADDR: u32 = 18;
    const CONNECT4: u32 = 10;
    // Helpers: one every socket hook has, one no kernel has.
    assert!(sys::probe_helper(SOCK_ADDR, CONNECT4, 15).unwrap());
    assert!(!sys::probe_helper(SOCK_ADDR, CONNECT4, 9999).unwrap());
    // bpf_skb_store_bytes is for packet programs only.
    assert!(!sys::probe_helper(SOCK_ADDR, CONNECT4, 9).unwrap());
    assert!(sys::probe_attach_type(SOCK_ADDR, CONNECT4).unwrap());
    assert!(!sys::probe_attach_type(SOCK_ADDR, 250).unwrap());
    let f = Features::probe();
    f.check()
        .expect("the kernel the tests run on has what the agent needs");
    println!("{}: {:?}", f.kernel, f.states());
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn without_bpf_set_retval_nothing_is_reserved_and_a_paused_backend_refuses_with_eperm() {
    let mut lab = lab_with(7, &Features::probe().without(&[Feature::SetRetval]));
    assert!(
        !lab.loaded.attached.iter().any(|a| a.starts_with("dp_bind")),
        "{:?}",
        lab.loaded.attached
    );
    let h = lab.host_ip.clone();
    assert_eq!(bind(lab.cg.command("python3"), "127.0.0.1", 18080), "bound");
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080),
        format!("ok backend {h} 127.0.0.1 18080")
    );
    let mut fe = lab.loaded.frontends_map().unwrap();
    let key = FrontendKey::new(WILDCARD4, 18080, PROTO_TCP);
    let mut b = fe.entries().unwrap()[&key];
    b.flags |= BACKEND_F_PAUSED;
    fe.put(&key, &b).unwrap();
    // Refused at once, with the hooks' own error (EPERM) where ECONNREFUSED cannot be set.
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080),
        "error 1"
    );
    let stats = lab.loaded.stats().unwrap();
    assert_eq!(stats[dataplane_common::STAT_REFUSED_PAUSED as usize], 1);
    assert_eq!(stats[dataplane_common::STAT_BIND_REFUSED as usize], 0);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn without_a_running_agent_nothing_is_translated_or_reserved() {
    let mut lab = lab(6);
    let h = lab.host_ip.clone();
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080),
        format!("ok backend {h} 127.0.0.1 18080")
    );
    // The agent's socket closes (as when its process ends): the maps are as they were,
    // but nobody vouches for them, so every socket takes the path it would take without
    // the programs (here nothing listens on loopback), and no port is reserved.
    lab.loaded.withdraw();
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080),
        "error 111"
    );
    assert_eq!(
        client(lab.cg.command("python3"), "udpc", "127.0.0.1", 18081),
        "error 111"
    );
    assert_eq!(bind(lab.cg.command("python3"), "127.0.0.1", 18080), "bound");
    let stats = lab.loaded.stats().unwrap();
    assert!(
        stats[dataplane_common::STAT_SKIP_NO_AGENT as usize] >= 3,
        "{stats:?}"
    );
    // Vouched for again: translated again.
    lab.loaded.vouch().unwrap();
    assert_eq!(
        client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080),
        format!("ok backend {h} 127.0.0.1 18080")
    );
}

/// An nftables table whose only job is to make the host track connections, as Docker's
/// iptables rules do; deleted on drop.
struct ConntrackOn(String);

impl ConntrackOn {
    fn new(name: &str) -> Self {
        let script = format!(
            "table inet {name} {{ chain out {{ type filter hook output priority 0; ct state new counter\n }}\n }}\n"
        );
        let out = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn();
        let mut child = out.unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        Self(name.into())
    }
}

impl Drop for ConntrackOn {
    fn drop(&mut self) {
        let _ = common::cmd(&["nft", "delete", "table", "inet", &self.0]);
    }
}

fn tracked_to(backend: &str, port: u16) -> usize {
    let out = common::cmd(&[
        "conntrack",
        "-L",
        "-p",
        "tcp",
        "-d",
        backend,
        "--dport",
        &port.to_string(),
    ]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn the_notrack_table_keeps_translated_connections_out_of_conntrack() {
    let lab = lab(5);
    let id = std::process::id();
    let _ct = ConntrackOn::new(&format!("dataplane_it_ct_{id}"));
    let connect = |n: usize| {
        for _ in 0..n {
            let r = client(lab.cg.command("python3"), "tcp", "127.0.0.1", 18080);
            assert!(r.starts_with("ok backend"), "{r}");
        }
    };
    // Without the table, each translated connection is tracked: the check can fail.
    let before = tracked_to(&lab.backend_ip, 8080);
    connect(5);
    assert!(tracked_to(&lab.backend_ip, 8080) >= before + 5);

    let mut nt = Notrack::new(&format!("dataplane_it_nt_{id}"));
    let b: IpAddr = lab.backend_ip.parse().unwrap();
    let h: IpAddr = lab.host_ip.parse().unwrap();
    let spec = Spec {
        backends: [dataplane::addr::Service::new(b, PROTO_TCP, 8080)].into(),
        hosts: [h].into(),
        peers: std::collections::BTreeSet::new(),
        published: [(PROTO_TCP, 18080)].into(),
        track_host_clients: false,
        nat_replies: std::collections::BTreeSet::new(),
    };
    assert!(nt.apply(&spec, false).unwrap());
    assert!(
        !nt.apply(&spec, false).unwrap(),
        "an unchanged spec is not re-applied"
    );
    // Updated in place (the table exists): nft takes the same batch again.
    assert!(nt.apply(&spec, true).unwrap());
    // Read back, it is what was applied; a rule deleted by hand is restored.
    assert!(!nt.repair().unwrap(), "no drift right after applying");
    let table = format!("dataplane_it_nt_{id}");
    let listed = common::sh(&["nft", "-a", "list", "chain", "inet", &table, "output"]);
    let handle = listed
        .lines()
        .filter(|l| l.contains("notrack"))
        .find_map(|l| l.split("# handle ").nth(1))
        .expect("a rule with a handle")
        .trim()
        .to_string();
    common::sh(&[
        "nft", "delete", "rule", "inet", &table, "output", "handle", &handle,
    ]);
    assert!(nt.repair().unwrap(), "a deleted rule is seen");
    assert!(!nt.repair().unwrap(), "and restored");
    let before = tracked_to(&lab.backend_ip, 8080);
    connect(20);
    let after = tracked_to(&lab.backend_ip, 8080);
    nt.remove().unwrap();
    assert_eq!(after, before, "translated connections were tracked");
}
