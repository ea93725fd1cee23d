//! The egress policy tried as an attacker in a container would: it has `CAP_NET_RAW` (raw
//! and packet sockets: `dp-spoof` in the test image) and owns its `resolv.conf`. Each
//! escape is tried by a policed container and, where Docker allows it, by an unpoliced one
//! as the control (the agent takes nothing away from unpoliced containers).

use super::*;

/// A UDP listener in the remote's namespace on `ip:port`, appending what it receives to a
/// file.
struct Sink {
    _proc: Proc,
    file: PathBuf,
}

impl Sink {
    fn new(remote: &Remote, ip: &str, port: u16) -> Self {
        let file = remote.dir.join(format!("udp-{port}.txt"));
        let _ = std::fs::remove_file(&file);
        let proc = Proc(
            Command::new("ip")
                .args(["netns", "exec", &remote.ns.name, "socat", "-u"])
                .arg(format!("UDP-RECVFROM:{port},bind={ip},fork"))
                .arg(format!("OPEN:{},creat,append", file.display()))
                .stderr(Stdio::null())
                .spawn()
                .expect("socat"),
        );
        std::thread::sleep(Duration::from_millis(300));
        Self { _proc: proc, file }
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }
}

/// `ip` with its last IPv4 octet replaced: an address of the same subnet no container has.
fn unused_beside(ip: &str, last: u8) -> String {
    let (net, _) = ip.rsplit_once('.').expect("an IPv4 address");
    format!("{net}.{last}")
}

/// The MAC of a host interface.
fn mac_of(ifname: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap_or_else(|e| panic!("{ifname}: {e}"))
        .trim()
        .to_string()
}

/// The host bridge of a user-defined network.
fn bridge_of(net: &Network) -> String {
    let id = sh(&["docker", "network", "inspect", "-f", "{{.Id}}", &net.0]);
    format!("br-{}", &id.trim()[..12])
}

fn on(net: &Network, name: &str, labels: &[&str], cmdline: &[&str]) -> Container {
    let img = image();
    let mut args = vec!["--network", net.0.as_str()];
    for l in labels {
        args.push("--label");
        args.push(l);
    }
    args.push(&img);
    args.extend_from_slice(cmdline);
    Container::run(name, &args)
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_policed_container_cannot_send_as_another_address_or_mac() {
    let remote = Remote::new();
    let agent = Agent::start("escape1");
    let net = Network::create("escape1");
    let sink = Sink::new(&remote, &remote.ip(2), 5555);
    let r2 = remote.ip(2);
    let spoofer = on(
        &net,
        "escape1-spoofer",
        &["dataplane.egress.internet=false"],
        &["sleep", "600"],
    );
    let control = on(&net, "escape1-control", &[], &["sleep", "600"]);
    let gw_mac = mac_of(&bridge_of(&net));
    let own = spoofer.ip();
    let tries = [
        // An address no container has: policy was dispatched by source address.
        format!(
            "dp-spoof ip {} {r2} 5555 spoof-unused",
            unused_beside(&own, 250)
        ),
        // A neighbour's address (unpoliced: it may leave).
        format!("dp-spoof ip {} {r2} 5555 spoof-neighbour", control.ip()),
        // Its own address behind a MAC that is not its own.
        format!("dp-spoof frame eth0 02:42:de:ad:be:ef {gw_mac} {own} {r2} 5555 spoof-mac"),
        // Its own address and MAC: its policy drops it.
        format!("dp-spoof ip {own} {r2} 5555 spoof-own"),
    ];
    // Double-tagged (the checks of untagged frames do not see inside), from an unused
    // address and from its own MAC: the host strips the tags and would route it.
    let own_mac = spoofer.exec("cat /sys/class/net/eth0/address");
    let tagged = format!(
        "dp-spoof qinq eth0 {own_mac} {gw_mac} {} {r2} 5555 spoof-tagged",
        unused_beside(&own, 249)
    );
    for t in tries.iter().chain([&tagged]) {
        spoofer.exec(t);
    }
    // The control: Docker lets any container send from an unused address of its subnet,
    // and the agent takes nothing away from an unpoliced one.
    control.exec(&format!(
        "dp-spoof ip {} {r2} 5555 control-unused",
        unused_beside(&own, 251)
    ));
    wait_until("the control's datagram", Duration::from_secs(5), || {
        sink.received().contains("control-unused")
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = sink.received();
    assert!(
        !got.contains("spoof-"),
        "a policed container escaped: {got}"
    );
    let e = egress_of(&agent, &spoofer);
    assert!(e.spoofed_packets >= 4, "spoofed frames counted: {e:?}");
    assert!(
        e.dropped_packets >= 1,
        "its own datagram, by its policy: {e:?}"
    );
    assert!(!e.ports.is_empty() && e.ports.iter().all(|p| p.starts_with("veth")));
    assert_eq!(egress_of(&agent, &control).spoofed_packets, 0);
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_resolver_the_container_writes_into_its_resolv_conf_opens_nothing() {
    let remote = Remote::new();
    let mut agent = Agent::start("escape2");
    let r53 = remote.ip(53);
    let nodns = labelled("escape2-policed", &["dataplane.egress.internet=false"]);
    let control = labelled("escape2-control", &[]);
    let img = image();
    // A resolver given by Docker (`--dns`) stays reachable.
    let given = Container::run(
        "escape2-given",
        &[
            "--dns",
            &r53,
            "--label",
            "dataplane.egress.internet=false",
            &img,
            "sleep",
            "600",
        ],
    );
    for c in [&nodns, &control] {
        c.exec(&format!("echo 'nameserver {r53}' >> /etc/resolv.conf"));
    }
    // The agent reads every container again (a restart inspects them all).
    agent.kill9();
    agent.spawn();
    assert!(asks(&control, &r53), "the control reaches the server");
    assert!(
        !asks(&nodns, &r53),
        "a resolver the container wrote for itself"
    );
    assert!(asks(&given, &r53), "the resolver Docker gave it");
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_host_denied_container_reaches_nothing_over_link_local() {
    let remote = Remote::new();
    let agent = Agent::start("escape3");
    let subnet = format!("fd00:d7:{:x}::/64", std::process::id() % 0xffff);
    let net = Network::create_with("escape3", &["--ipv6", "--subnet", &subnet]);
    let bridge = bridge_of(&net);
    let denied = on(
        &net,
        "escape3-denied",
        &["dataplane.egress.host=false"],
        &["sleep", "600"],
    );
    let open = on(
        &net,
        "escape3-open",
        &[],
        &["sh", "-c", "httpd -p [::]:80 -h /www && exec sleep 600"],
    );
    // A service of the host's on every address, the bridge's link-local one included.
    let hp = port(21);
    let www = remote.dir.clone();
    let _host_web = Proc(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("[::]:{hp}"), "-h"])
            .arg(&www)
            .spawn()
            .unwrap(),
    );
    let link_local = |ifname: &str, inside: Option<&Container>| -> String {
        let text = match inside {
            None => sh(&["ip", "-6", "addr", "show", "dev", ifname, "scope", "link"]),
            Some(c) => c.exec(&format!("ip -6 addr show dev {ifname} scope link")),
        };
        text.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .expect("a link-local address")
            .to_string()
    };
    let bridge_ll = link_local(&bridge, None);
    let open_ll = link_local("eth0", Some(&open));
    let get = |c: &Container, addr: &str, port: u16| {
        c.exec(&format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | socat -T2 - 'TCP6:[{addr}%eth0]:{port},connect-timeout=2' 2>/dev/null | head -c 8"
        ))
        .starts_with("HTTP/1.")
    };
    wait_until(
        "the host's service at the bridge's link-local address",
        Duration::from_secs(10),
        || get(&open, &bridge_ll, hp),
    );
    assert!(!get(&denied, &bridge_ll, hp), "the host over link-local");
    assert!(!get(&denied, &open_ll, 80), "a neighbour over link-local");
    assert!(
        get(&open, &open_ll, 80),
        "the control reaches its own service"
    );
    // Neighbour discovery still works: the remote over IPv6 (the internet is open to it)
    // needs the gateway's MAC.
    let r6 = remote.ip6();
    wait_until(
        "IPv6 to the remote through the gateway",
        Duration::from_secs(10),
        || reaches(&denied, &r6, 8080),
    );
    assert!(
        denied.exec("ip -6 neigh").contains("router"),
        "the gateway was found by neighbour discovery"
    );
    assert!(egress_of(&agent, &denied).dropped_packets >= 2);
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_policed_containers_published_port_is_no_way_out() {
    let _agent = Agent::start("escape4");
    let net = Network::create("escape4");
    let peer = on(
        &net,
        "escape4-peer",
        &[],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    let (p1, p2) = (port(22), port(23));
    let img = image();
    // Published ports with nothing listening: the container dials out from them.
    let denied = Container::run(
        "escape4-denied",
        &[
            "--network",
            &net.0,
            "-p",
            &format!("{p1}:9999"),
            "-p",
            &format!("{p1}:9999/udp"),
            "--label",
            "dataplane.egress.host=false",
            &img,
            "sleep",
            "600",
        ],
    );
    let control = Container::run(
        "escape4-control",
        &[
            "--network",
            &net.0,
            "-p",
            &format!("{p2}:9999"),
            &img,
            "sleep",
            "600",
        ],
    );
    let from_port = |c: &Container, ip: &str| {
        c.exec(&format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 -p 9999 {ip} 80 2>/dev/null | head -c 8"
        ))
        .starts_with("HTTP/1.")
    };
    let gw = gateway_of(&peer);
    let hp = port(24);
    let _host_web = Proc(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("{gw}:{hp}"), "-h", "/tmp"])
            .spawn()
            .unwrap(),
    );
    wait_until("the peer's web server", Duration::from_secs(10), || {
        from_port(&control, &peer.ip())
    });
    assert!(
        !from_port(&denied, &peer.ip()),
        "to a peer from its published port"
    );
    let host = |c: &Container| {
        c.exec(&format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 -p 9999 {gw} {hp} 2>/dev/null | head -c 8"
        ))
        .starts_with("HTTP/1.")
    };
    assert!(!host(&denied), "to the host from its published port");
    // UDP from its published UDP port to the peer (nothing answers: the datagram must not
    // arrive; the peer counts what reaches its port 5353).
    let sink = peer.exec("(timeout 3 socat -u UDP-RECV:5353 - > /tmp/got &) ; sleep 0.3; echo ok");
    assert_eq!(sink.trim(), "ok");
    denied.exec(&format!(
        "echo from-published | socat - UDP:{}:5353,sourceport=9999",
        peer.ip()
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !peer.exec("cat /tmp/got").contains("from-published"),
        "UDP from its published port"
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn every_start_of_a_policed_container_is_policed_however_old_it_is() {
    let remote = Remote::new();
    let mut agent = Agent::start("escape5");
    let img = image();
    let r2 = remote.ip(2);
    // At its first instruction: the allowed port answers (its veth was seen, its policy is
    // in place), the other one does not.
    let first = format!(
        "a=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {r2} 8080 | head -c 8); \
         d=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {r2} 9090 | head -c 8); \
         echo \"allowed:${{a:-none}} denied:${{d:-none}}\""
    );
    let labels = [
        "--label",
        "dataplane.test=1",
        "--label",
        "dataplane.egress.internet=false",
        "--label",
    ];
    let allow = format!("dataplane.egress.allow={r2}:8080/tcp");
    let expected = "allowed:HTTP/1.1 denied:none";
    // Created while no agent ran: no `create` event, and older than any start window.
    agent.kill9();
    let old = Container {
        name: format!("dpe2e-{}-escape5-old", std::process::id()),
    };
    let mut create = vec!["docker", "create", "--name", &old.name];
    create.extend_from_slice(&labels);
    create.extend_from_slice(&[&allow, &img, "sh", "-c", &first]);
    sh(&create);
    agent.spawn();
    for i in 0..10 {
        let out = sh(&["docker", "start", "-a", &old.name]);
        assert_eq!(out.trim(), expected, "start {i}");
    }
    // Restarted by Docker's restart policy: each run connects at its first instruction.
    let looping = Container {
        name: format!("dpe2e-{}-escape5-loop", std::process::id()),
    };
    let script = format!("{first}; exit 1");
    let mut run = vec![
        "docker",
        "run",
        "-d",
        "--name",
        &looping.name,
        "--restart",
        "on-failure:5",
    ];
    run.extend_from_slice(&labels);
    run.extend_from_slice(&[&allow, &img, "sh", "-c", &script]);
    sh(&run);
    wait_until("five restarts", Duration::from_mins(1), || {
        sh(&[
            "docker",
            "inspect",
            "-f",
            "{{.State.Status}}",
            &looping.name,
        ])
        .trim()
            == "exited"
    });
    let logs = sh(&["docker", "logs", &looping.name]);
    assert_eq!(logs.lines().filter(|l| *l == expected).count(), 6, "{logs}");
    // Meanwhile an unpoliced container still gets out at its first instruction.
    let out = sh(&[
        "docker",
        "run",
        "--rm",
        "--label",
        "dataplane.test=1",
        &img,
        "sh",
        "-c",
        &first,
    ]);
    assert_eq!(out.trim(), "allowed:HTTP/1.1 denied:HTTP/1.1");
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_restarted_container_that_keeps_its_address_is_found_again() {
    let remote = Remote::new();
    let _agent = Agent::start("escape7");
    let img = image();
    let r2 = remote.ip(2);
    let allow = format!("dataplane.egress.allow={r2}:8080/tcp");
    // `docker restart` keeping its address (`--ip`), a policed one and an unpoliced one:
    // the new veth is found again.
    let net = Network::create_with("escape7", &["--subnet", "172.31.250.0/24"]);
    let policed = Container::run(
        "escape7-fixed",
        &[
            "--network",
            &net.0,
            "--ip",
            "172.31.250.10",
            "--label",
            "dataplane.egress.internet=false",
            "--label",
            &allow,
            &img,
            "sleep",
            "600",
        ],
    );
    let open = Container::run(
        "escape7-open",
        &[
            "--network",
            &net.0,
            "--ip",
            "172.31.250.11",
            &img,
            "sleep",
            "600",
        ],
    );
    for i in 0..3 {
        sh(&["docker", "restart", "-t", "0", &policed.name, &open.name]);
        wait_until("the restarted containers", Duration::from_secs(10), || {
            reaches(&open, &r2, 9090) && reaches(&policed, &r2, 8080)
        });
        assert!(!reaches(&policed, &r2, 9090), "restart {i}");
    }
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn labels_the_agent_cannot_enforce_are_shown_so() {
    let agent = Agent::start("escape6");
    let img = image();
    let hosted = Container::run(
        "escape6-host",
        &[
            "--network",
            "host",
            "--label",
            "dataplane.egress.internet=false",
            &img,
            "sleep",
            "600",
        ],
    );
    let base = labelled("escape6-base", &["dataplane.egress.internet=false"]);
    let shared = Container::run(
        "escape6-shared",
        &[
            "--network",
            &format!("container:{}", base.name),
            &img,
            "sleep",
            "600",
        ],
    );
    let e = egress_of(&agent, &hosted);
    assert!(
        e.not_enforceable
            .as_deref()
            .is_some_and(|w| w.contains("host")),
        "{e:?}"
    );
    let e = egress_of(&agent, &shared);
    assert_eq!(e.policy_of.as_deref(), Some(base.name.as_str()), "{e:?}");
    assert_eq!(egress_of(&agent, &base).not_enforceable, None);
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_stopped_agent_holds_nothing_back_and_polices_on_its_return() {
    let remote = Remote::new();
    let mut agent = Agent::start("escape8");
    let r2 = remote.ip(2);
    // A policed container exists: new veths are held until the agent has seen them.
    let _policed = labelled("escape8-policed", &["dataplane.egress.internet=false"]);
    // Stopped as systemd stops it: the gate opens, the policies stay.
    agent.terminate();
    let late = labelled("escape8-late", &["dataplane.egress.internet=false"]);
    let open = labelled("escape8-open", &[]);
    assert!(
        reaches(&open, &r2, 8080),
        "an unpoliced container is not held"
    );
    assert!(
        reaches(&late, &r2, 8080),
        "a labelled one started meanwhile runs unpoliced until the agent returns"
    );
    agent.spawn();
    wait_until(
        "the late container policed",
        Duration::from_secs(10),
        || !reaches(&late, &r2, 8080),
    );
    assert!(reaches(&open, &r2, 8080));
}
