//! The own-firewall mode end to end: the harness's engine restarted with its iptables rules
//! off, the agent writing published ports, masquerade and isolation into its own table,
//! real clients (curl from the host and from a "remote" namespace behind a veth, socat in
//! containers), and the refusal when Docker's settings disagree.

use std::time::Instant;

use super::*;

/// Restarts the harness's engine with Docker's rules on again when dropped.
struct RulesOn<'a>(&'a str, &'a str);

impl Drop for RulesOn<'_> {
    fn drop(&mut self) {
        restart_dockerd(self.0, self.1, None);
    }
}

/// A namespace behind a veth from the host, with a TCP server on `:9000` that answers with
/// the address it sees the client as.
struct Remote {
    _server: Proc,
    client: ExtClient,
}

impl Remote {
    fn new(tag: u16) -> Self {
        let client = ExtClient::new(tag);
        let server = Command::new("ip")
            .args(["netns", "exec", &client.ns.name, "socat"])
            .args([
                "TCP-LISTEN:9000,fork,reuseaddr",
                "SYSTEM:echo $SOCAT_PEERADDR",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat in the remote namespace");
        wait_until("the remote server", Duration::from_secs(5), || {
            String::from_utf8_lossy(&client.run(&["ss", "-ltnH"]).stdout).contains(":9000")
        });
        Self {
            _server: Proc(server),
            client,
        }
    }

    /// The remote routes `net`'s subnet to the host (as a router in front of a host with
    /// routed networks would).
    fn route_to(&self, net: &Network) {
        let subnet = subnet_of(net);
        let via = &self.client.host_ip;
        sh(&[
            "ip",
            "-n",
            &self.client.ns.name,
            "route",
            "add",
            &subnet,
            "via",
            via,
        ]);
    }

    /// Who the remote sees `c` as (empty: `c` did not get through).
    fn seen_from(&self, c: &Container) -> String {
        c.exec(&format!(
            "socat -T 2 - TCP:{}:9000,connect-timeout=2 </dev/null 2>/dev/null",
            self.client.ip
        ))
    }
}

/// The first subnet of a network.
fn subnet_of(net: &Network) -> String {
    sh(&[
        "docker",
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        &net.0,
    ])
    .trim()
    .to_string()
}

/// `container` fetches `url` with a plain HTTP/1.0 request; the last line of the answer.
fn fetch(c: &Container, addr: &str, port: u16, path: &str) -> String {
    c.exec(&format!(
        "printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} {port} | tail -n 1"
    ))
}

/// An agent started with `--own-firewall` against the engine (as it runs now): its exit
/// status and its error output, or `None` if it did not exit within 30 s.
fn own_firewall_agent_exit() -> Option<(Option<i32>, String)> {
    let dir = PathBuf::from(format!("/run/dataplane-e2e-{}-refuse", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let id = format!("{}_refuse", std::process::id());
    let mut child = Command::new(bin("dataplane"))
        .args(["run", "--own-firewall", "--no-pin", "--socket"])
        .arg(dir.join("ctl.sock"))
        .args(["--nft-table", &format!("dataplane_e2e_{id}")])
        .args(["--fwd-chain", &format!("DPFWD-{id}")])
        .args(["--config", "/nonexistent/dataplane.toml", "--state-dir"])
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = std::fs::remove_dir_all(&dir);
    status.map(|s| (s.code(), err))
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
#[expect(
    clippy::too_many_lines,
    reason = "one engine restart for the whole mode: every check here"
)]
fn own_firewall_mode_publishes_masquerades_and_isolates() {
    let Some((pidfile, log)) = restartable_engine(
        "own_firewall_mode_publishes_masquerades_and_isolates",
        &["iptables", "ip6tables"],
    ) else {
        return;
    };
    // With Docker's rules on, the mode is refused, saying why, before it changes anything.
    let (code, err) = own_firewall_agent_exit().expect("the agent to refuse, not to run");
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("\"iptables\" is on"), "{err}");

    restart_dockerd_with(
        &pidfile,
        &log,
        None,
        &["--iptables=false", "--ip6tables=false"],
    );
    let _restore = RulesOn(&pidfile, &log);
    let p = port(60);
    let a = Network::create("fwa");
    let b = Network::create("fwb");
    let internal = Network::create_with("fwi", &["--internal"]);
    let no_masq = Network::create_with(
        "fwm",
        &["-o", "com.docker.network.bridge.enable_ip_masquerade=false"],
    );
    let no_icc = Network::create_with("fwn", &["-o", "com.docker.network.bridge.enable_icc=false"]);
    let web = httpd_on("fw-web", &a, &format!("{p}:80"));
    let on = |name: &str, net: &Network| client_container_on(name, net);
    let (ca, cb, ci, cm) = (
        on("fw-a", &a),
        on("fw-b", &b),
        on("fw-i", &internal),
        on("fw-m", &no_masq),
    );
    let (cn1, cn2) = (on("fw-n1", &no_icc), on("fw-n2", &no_icc));
    // An egress policy applies in this mode as in the other.
    let policed = Container::run(
        "fw-policed",
        &[
            "--network",
            &a.0,
            "--label",
            "dataplane.egress.internet=false",
            &image(),
            "sleep",
            "600",
        ],
    );
    let remote = Remote::new(61);
    // Back to containers that are not masqueraded: the remote routes Docker's subnets to
    // the host, as a router in front of a host with routed networks would.
    remote.route_to(&no_masq);
    let agent = Agent::start_with("ownfw", &["--own-firewall"]);
    let st = agent.status();
    assert_eq!(st.mode, "own-firewall");
    let fw = st.own_firewall.clone().expect("the own-firewall status");
    // Docker's rules from its earlier run are gone, the operator's DOCKER-USER stays.
    let filter = sh(&["iptables", "-w", "-S"]);
    assert!(!filter.contains("DOCKER-ISOLATION"), "{filter}");
    assert!(!filter.contains("-P FORWARD DROP"), "{filter}");
    let table = fw.table.clone();

    // Published: from the host (the socket layer), from a remote client (the agent's DNAT:
    // the backend sees the client's own address), from a container on the same network.
    wait_http("the published port", p, Duration::from_secs(10));
    let ext = remote.client.ip.clone();
    let seen = remote
        .client
        .curl(&format!("http://{}:{p}/cgi-bin/ip", remote.client.host_ip))
        .expect("the remote client to reach the published port");
    // (The backend's CGI answers `[address] hostname`.)
    assert!(seen.contains(&format!(":{ext}]")), "the backend saw {seen}");
    let seen = fetch(&ca, &remote.client.host_ip, p, "/cgi-bin/ip");
    assert!(
        seen.contains(&format!(":{}]", ca.ip())),
        "the backend saw {seen}"
    );
    // Nothing else of the container is reachable from outside.
    let direct = remote.client.curl(&format!("http://{}:80/", web.ip()));
    assert!(direct.is_none(), "reached the container's address directly");

    // Masquerade per network, as its option says.
    assert_eq!(remote.seen_from(&ca), remote.client.host_ip);
    assert_eq!(remote.seen_from(&cn1), remote.client.host_ip);
    assert_eq!(
        remote.seen_from(&cm),
        cm.ip(),
        "no masquerade on this network"
    );
    assert_eq!(
        remote.seen_from(&policed),
        "",
        "the egress policy let it out"
    );
    // An internal network stays internal; networks stay apart (directly, and through a
    // port published on the host); inter-container communication off holds.
    assert_eq!(remote.seen_from(&ci), "");
    assert_eq!(fetch(&cb, &web.ip(), 80, "/"), "");
    assert_eq!(fetch(&cb, &remote.client.host_ip, p, "/"), "");
    assert_eq!(fetch(&cn1, &cn2.ip(), 80, "/"), "");
    assert!(fetch(&ca, &web.ip(), 80, "/").contains("dataplane test backend"));

    // The operator's chain comes first: a drop there holds for external clients.
    sh(&[
        "nft", "add", "rule", "inet", &table, "operator", "ip", "saddr", &ext, "drop",
    ]);
    wait_until(
        "status to count the operator's rule",
        Duration::from_secs(5),
        || {
            agent
                .status()
                .own_firewall
                .is_some_and(|f| f.operator_rules == 1)
        },
    );
    assert!(
        remote
            .client
            .curl(&format!("http://{}:{p}/", remote.client.host_ip))
            .is_none()
    );
    // Container clients now take the DNAT path, where the chain applies: a container of the
    // backend's network still gets there (hairpin, masqueraded), another network's does not.
    wait_until(
        "container clients on the DNAT path",
        Duration::from_secs(5),
        || agent.status().container_clients_off.is_some(),
    );
    let seen = fetch(&ca, &remote.client.host_ip, p, "/cgi-bin/ip");
    assert!(
        seen.contains('['),
        "hairpin through the agent's DNAT: {seen:?}"
    );
    assert_eq!(fetch(&cb, &remote.client.host_ip, p, "/"), "");
    sh(&["nft", "flush", "chain", "inet", &table, "operator"]);
    assert!(
        remote
            .client
            .curl(&format!("http://{}:{p}/", remote.client.host_ip))
            .is_some()
    );

    // Fail closed: a network created while no agent runs forwards nothing beyond its bridge
    // until an agent has written its rules; then it is served as the others.
    let mut agent = agent;
    agent.terminate();
    let late = Network::create("fwlate");
    let cl = on("fw-late", &late);
    assert_eq!(
        remote.seen_from(&cl),
        "",
        "a new network forwarded with no agent"
    );
    assert_eq!(
        remote.seen_from(&ca),
        remote.client.host_ip,
        "a known network stopped"
    );
    agent.spawn();
    wait_until("the new network's rules", Duration::from_secs(10), || {
        remote.seen_from(&cl) == remote.client.host_ip
    });
    // Docker restarted under the running agent: containers that come back with it are
    // published again.
    let p2 = port(62);
    let back = httpd_with(
        "fw-back",
        &[
            "--network",
            &a.0,
            "--restart",
            "always",
            "-p",
            &format!("{p2}:80"),
        ],
    );
    wait_http("the second published port", p2, Duration::from_secs(10));
    restart_dockerd_with(
        &pidfile,
        &log,
        None,
        &["--iptables=false", "--ip6tables=false"],
    );
    wait_until(
        "the remote client to reach it again",
        Duration::from_secs(30),
        || {
            remote
                .client
                .curl(&format!("http://{}:{p2}/", remote.client.host_ip))
                .is_some()
        },
    );
    assert_eq!(agent.status().mode, "own-firewall");
    if engine_major() >= 27 {
        gateway_modes(&remote);
    }
    drop(agent);
    drop((ca, cb, ci, cm, cn1, cn2, cl, web, back, policed));
}

/// A container to run clients in on `net`, serving httpd on 80 (nothing published).
fn client_container_on(name: &str, net: &Network) -> Container {
    let img = image();
    Container::run(
        name,
        &[
            "--network",
            &net.0,
            &img,
            "sh",
            "-c",
            "httpd -p 80 -h /www && exec sleep 600",
        ],
    )
}

/// Docker 27+'s gateway modes: `routed` (published container ports, at the container's own
/// address, no masquerade) and `nat-unprotected` (every port at the container's address,
/// masqueraded out).
fn gateway_modes(remote: &Remote) {
    let routed = Network::create_with(
        "fwr",
        &["-o", "com.docker.network.bridge.gateway_mode_ipv4=routed"],
    );
    let unprotected = Network::create_with(
        "fwu",
        &[
            "-o",
            "com.docker.network.bridge.gateway_mode_ipv4=nat-unprotected",
        ],
    );
    let two_ports = |name: &str, net: &Network, publish: &str| {
        Container::run(
            name,
            &[
                "--network",
                &net.0,
                "-p",
                publish,
                &image(),
                "sh",
                "-c",
                "httpd -p 80 -h /www && exec httpd -f -p 81 -h /www",
            ],
        )
    };
    let r = two_ports("fw-routed", &routed, "80");
    let u = two_ports("fw-unprot", &unprotected, &format!("{}:80", port(63)));
    remote.route_to(&routed);
    remote.route_to(&unprotected);
    let at = |c: &Container, port: u16| {
        remote
            .client
            .curl(&format!("http://{}:{port}/cgi-bin/ip", c.ip()))
    };
    wait_until(
        "the routed container's published port",
        Duration::from_secs(10),
        || at(&r, 80).is_some(),
    );
    let seen = at(&r, 80).unwrap_or_default();
    assert!(
        seen.contains(&format!(":{}]", remote.client.ip)),
        "routed: the backend saw {seen}"
    );
    assert!(
        at(&r, 81).is_none(),
        "routed: an unpublished port was reached"
    );
    assert_eq!(remote.seen_from(&r), r.ip(), "routed: masqueraded");
    assert!(
        at(&u, 81).is_some(),
        "nat-unprotected: a port at the container's address"
    );
    assert_eq!(remote.seen_from(&u), remote.client.host_ip);
}
