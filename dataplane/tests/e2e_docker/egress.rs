//! Egress policy end to end: a "remote" network behind a veth that acts as the host's
//! uplink (a namespace with web servers and a DNS server, `dnsmasq`, serving test names),
//! containers with each label combination, real clients (busybox `nc`, `ping`, curl).

use super::*;

#[path = "egress_escape.rs"]
mod escape;

/// The remote side: a namespace behind a veth routed from the host (a non-Docker
/// interface: "the internet" for containers), web servers on `.2:8080`, `.2:9090` and
/// `.3:8080`, and `dnsmasq` on `.53` answering `remote.test` and `moving.test`.
struct Remote {
    // Field order is drop order: processes, then the veth, then the namespace.
    _servers: Vec<Proc>,
    dns: Proc,
    _veth: Veth,
    ns: NetNs,
    dir: PathBuf,
    net: String,
    /// The remote's IPv6 prefix (`fd00:dbe:N:`): `::1` the host, `::2` the remote.
    net6: String,
}

impl Remote {
    fn new() -> Self {
        let pid = std::process::id();
        let net = format!("10.102.{}", pid % 200);
        let ns = NetNs::new(&format!("dpe2e-{pid}-remote"));
        let host_if = format!("dpr{}", pid % 100_000);
        let veth = Veth::new(
            &ns,
            &host_if,
            &format!("{net}.1/24"),
            &format!("{net}.2/24"),
        );
        let peer = format!("{host_if}p");
        let in_ns = |args: &[&str]| {
            let mut all = vec!["ip", "-n", ns.name.as_str()];
            all.extend_from_slice(args);
            sh(&all);
        };
        for a in [3, 53] {
            in_ns(&["addr", "add", &format!("{net}.{a}/24"), "dev", &peer]);
        }
        in_ns(&["route", "add", "default", "via", &format!("{net}.1")]);
        // IPv6 too: the host's side ::1, the remote's ::2.
        let net6 = format!("fd00:dbe:{:x}:", pid % 0xffff);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{net6}:1/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        in_ns(&[
            "addr",
            "add",
            &format!("{net6}:2/64"),
            "dev",
            &peer,
            "nodad",
        ]);
        in_ns(&["-6", "route", "add", "default", "via", &format!("{net6}:1")]);
        let dir = PathBuf::from(format!("/run/dataplane-e2e-{pid}-remote"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut servers = Vec::new();
        for (host, port) in [(2, 8080), (2, 9090), (3, 8080), (6, 8080)] {
            let root = dir.join(format!("www-{host}-{port}"));
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(
                root.join("index.html"),
                format!("remote {net}.{host}:{port}\n"),
            )
            .unwrap();
            let listen = if host == 6 {
                format!("[{net6}:2]:{port}")
            } else {
                format!("{net}.{host}:{port}")
            };
            servers.push(Proc(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "busybox", "httpd", "-f", "-p"])
                    .arg(listen)
                    .arg("-h")
                    .arg(&root)
                    .spawn()
                    .expect("busybox httpd"),
            ));
        }
        std::fs::write(
            dir.join("hosts"),
            format!("{net}.2 remote.test\n{net}.2 moving.test\n"),
        )
        .unwrap();
        let dns = Proc(
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
                .args(["--no-resolv", "--no-hosts", "--user=root", "--local-ttl=1"])
                .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
                .arg(format!("--listen-address={net}.53"))
                .args(["--bind-interfaces", "--pid-file="])
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (apt install dnsmasq-base; cargo xtask setup does)"),
        );
        let r = Self {
            _servers: servers,
            dns,
            _veth: veth,
            ns,
            dir,
            net,
            net6,
        };
        for (host, port) in [(2, 8080), (2, 9090), (3, 8080)] {
            let url = format!("http://{}:{port}/", r.ip(host));
            wait_until("the remote web servers", Duration::from_secs(10), || {
                cmd(&["curl", "-sf", "--max-time", "1", &url])
                    .status
                    .success()
            });
        }
        r
    }

    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
    }

    /// The remote's IPv6 address (a web server on 8080).
    fn ip6(&self) -> String {
        format!("{}:2", self.net6)
    }

    /// The config line that makes the agent resolve with this DNS server.
    fn resolver(&self) -> String {
        format!("resolver = \"{}\"\n", self.ip(53))
    }

    /// Points `name` at `.host` (dnsmasq rereads its hosts file on SIGHUP).
    fn point(&self, name: &str, host: u8) {
        let text = std::fs::read_to_string(self.dir.join("hosts")).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.ends_with(&format!(" {name}")))
            .map(String::from)
            .collect();
        lines.push(format!("{} {name}", self.ip(host)));
        std::fs::write(self.dir.join("hosts"), lines.join("\n") + "\n").unwrap();
        let pid = i32::try_from(self.dns.0.id()).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether container `c` can open a TCP connection to `ip:port` and get an HTTP answer.
fn reaches(c: &Container, ip: &str, port: u16) -> bool {
    c.exec(&format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port} 2>/dev/null | head -c 8"
    ))
    .starts_with("HTTP/1.")
}

/// Whether container `c` gets an answer to one ping of `ip`.
fn pings(c: &Container, ip: &str) -> bool {
    let out = cmd(&["docker", "exec", &c.name, "ping", "-c", "1", "-W", "2", ip]);
    out.status.success()
}

/// Whether container `c` gets an answer from the DNS server at `server` (UDP).
fn asks(c: &Container, server: &str) -> bool {
    c.exec(&format!(
        "timeout 4 nslookup remote.test {server} 2>/dev/null"
    ))
    .contains("Name:")
}

/// A container that sleeps, with `labels`.
fn labelled(name: &str, labels: &[&str]) -> Container {
    let img = image();
    let mut args = Vec::new();
    for l in labels {
        args.push("--label");
        args.push(l);
    }
    args.extend_from_slice(&[&img, "sh", "-c", "httpd -p 80 -h /www && exec sleep 600"]);
    Container::run(name, &args)
}

fn egress_of(agent: &Agent, c: &Container) -> dataplane_api::Egress {
    let socket = agent.dir.join("ctl.sock");
    dataplane_api::egress_show(&socket, Some(&c.name))
        .unwrap_or_else(|e| panic!("egress show {}: {e}", c.name))
        .remove(0)
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn egress_labels_decide_what_a_container_may_open() {
    let remote = Remote::new();
    let agent = Agent::start_configured("egress", &format!("[egress]\n{}", remote.resolver()), &[]);
    let p = port(40);
    let (r2, r3) = (remote.ip(2), remote.ip(3));
    let db = httpd("egress-db", &format!("{p}:80"));
    let other = httpd_with("egress-other", &[]);
    let open = labelled("egress-open", &[]);
    let no_net = labelled(
        "egress-nonet",
        &[
            "dataplane.egress.internet=false",
            "dataplane.egress.allow=remote.test:8080/tcp,10.102.0.0/16/icmp,nosuch.test:80",
        ],
    );
    let db_name = db.name.clone();
    let only_db = labelled(
        "egress-onlydb",
        &[
            "dataplane.egress.host=false",
            &format!("dataplane.egress.allow=container:{db_name}:80"),
        ],
    );
    let broken = labelled("egress-broken", &["dataplane.egress.internet=nope"]);
    wait_until(
        "the allow-list name to resolve",
        Duration::from_secs(10),
        || {
            egress_of(&agent, &no_net)
                .resolved
                .get("remote.test")
                .is_some_and(|r| r.contains(&r2))
        },
    );

    // No labels, no config: everything as Docker has it.
    assert!(reaches(&open, &r2, 9090));
    assert!(reaches(&open, &db.ip(), 80));
    assert!(egress_of(&agent, &open).internet);

    // Internet off: only the allowed name:port leaves the host; the host and other
    // containers stay reachable.
    assert!(reaches(&no_net, &r2, 8080), "allowed by name and port");
    assert!(
        !reaches(&no_net, &r2, 9090),
        "another port of the allowed name"
    );
    assert!(!reaches(&no_net, &r3, 8080), "another address");
    assert!(reaches(&no_net, &db.ip(), 80), "another container");
    assert!(reaches(&no_net, &gateway_of(&db), p), "a published port");
    assert!(pings(&no_net, &r3), "ICMP allowed by the allow-list");
    // UDP: a DNS query to the remote's server is not its own resolver.
    let r53 = remote.ip(53);
    assert!(asks(&open, &r53), "UDP without a policy");
    assert!(!asks(&no_net, &r53), "UDP with internet off");
    // A name that does not resolve is reported; the rest of the list works (above).
    let e = egress_of(&agent, &no_net);
    assert!(
        e.resolved
            .get("nosuch.test")
            .is_some_and(|r| r.starts_with("error")),
        "{e:?}"
    );

    // Host off: only the allowed container (straight and through its published port);
    // the internet stays open.
    assert!(reaches(&only_db, &db.ip(), 80));
    assert!(
        reaches(&only_db, &gateway_of(&db), p),
        "db through the gateway"
    );
    assert!(!reaches(&only_db, &other.ip(), 80), "another container");
    assert!(!reaches(&only_db, &open.ip(), 80), "another container");
    // A service of the host's own, on the bridge's gateway address.
    let gw = gateway_of(&db);
    let hp = port(42);
    let _host_web = Proc(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("{gw}:{hp}"), "-h"])
            .arg(&remote.dir)
            .spawn()
            .unwrap(),
    );
    wait_until("the host's web server", Duration::from_secs(5), || {
        reaches(&open, &gw, hp)
    });
    assert!(!reaches(&only_db, &gw, hp), "the host");
    assert!(
        reaches(&no_net, &gw, hp),
        "the host, for a container with host access"
    );
    assert!(reaches(&only_db, &r2, 9090), "internet on");
    assert!(asks(&only_db, &r53), "UDP out of the host, internet on");

    // A malformed label: nothing at all, said by show and the log.
    let e = egress_of(&agent, &broken);
    assert!(!e.internet && !e.host);
    assert!(
        e.error
            .as_deref()
            .unwrap()
            .contains("dataplane.egress.internet")
    );
    assert!(!reaches(&broken, &r2, 8080));
    assert!(!reaches(&broken, &db.ip(), 80));
    assert!(
        agent.log().contains(&broken.name),
        "the log names the container"
    );

    // Drops are counted per container.
    assert!(egress_of(&agent, &no_net).dropped_packets >= 2);
    assert!(egress_of(&agent, &only_db).dropped_packets >= 2);
    assert_eq!(egress_of(&agent, &open).dropped_packets, 0);
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_policed_containers_own_clients_get_their_replies() {
    let remote = Remote::new();
    let _agent = Agent::start("egress5");
    let open = labelled("egress-open2", &[]);
    // Replies to a policed container's own clients are never affected: from the host,
    // from another container, and from the remote network through the host's address.
    let served = Container::run(
        "egress-served",
        &[
            "-p",
            &format!("{}:80", port(41)),
            "--label",
            "dataplane.egress.internet=false",
            "--label",
            "dataplane.egress.host=false",
            &image(),
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    );
    wait_http("served", port(41), Duration::from_secs(10));
    assert!(curl(&format!("http://127.0.0.1:{}/", port(41))).contains("dataplane test backend"));
    assert!(reaches(&open, &served.ip(), 80));
    let out = cmd(&[
        "ip",
        "netns",
        "exec",
        &remote.ns.name,
        "curl",
        "-sf",
        "--max-time",
        "3",
        &format!("http://{}:{}/", remote.ip(1), port(41)),
    ]);
    assert!(
        out.status.success(),
        "the remote client reaches the policed container"
    );
    assert!(!reaches(&served, &remote.ip(2), 8080));
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn egress_follows_a_changed_record_a_runtime_change_and_survives_a_restart() {
    let remote = Remote::new();
    let mut agent =
        Agent::start_configured("egress2", &format!("[egress]\n{}", remote.resolver()), &[]);
    let (r2, r3) = (remote.ip(2), remote.ip(3));
    let c = labelled(
        "egress-moving",
        &[
            "dataplane.egress.internet=false",
            "dataplane.egress.allow=moving.test:8080",
        ],
    );
    wait_until("moving.test to be allowed", Duration::from_secs(10), || {
        reaches(&c, &r2, 8080)
    });
    assert!(!reaches(&c, &r3, 8080));
    // The record changes (TTL 1 s): the policy follows.
    remote.point("moving.test", 3);
    wait_until(
        "the policy to follow the record",
        Duration::from_secs(15),
        || reaches(&c, &r3, 8080),
    );
    assert!(
        !reaches(&c, &r2, 8080),
        "the old address is no longer allowed"
    );

    // A client retrying while the policy is changed at runtime.
    let retry = format!(
        "i=0; while [ $i -lt 100 ]; do \
           if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {r2} 9090 2>/dev/null | grep -q HTTP; \
           then echo reached; exit 0; fi; i=$((i+1)); sleep 0.2; done; echo never"
    );
    let client = Command::new("docker")
        .args(["exec", &c.name, "sh", "-c", &retry])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let out = agent.ctl(&[
        "egress",
        "set",
        &c.name,
        "--allow",
        &format!("{r2}:9090/tcp"),
        "--allow",
        "moving.test:8080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Enforced when the command returns.
    assert!(reaches(&c, &r2, 9090));
    let got = client.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "reached");
    assert!(egress_of(&agent, &c).runtime_change);
    // A malformed change changes nothing.
    let out = agent.ctl(&["egress", "set", &c.name, "--allow", "no such thing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such thing"));
    assert!(reaches(&c, &r2, 9090));

    // The agent restarted (pinned: the table stays meanwhile): the runtime change lasts.
    agent.kill9();
    assert!(!reaches(&c, &r2, 8080), "still policed while no agent runs");
    agent.spawn();
    let e = egress_of(&agent, &c);
    assert!(e.runtime_change && !e.internet, "{e:?}");
    assert!(reaches(&c, &r2, 9090));
    assert!(!reaches(&c, &r2, 8080));
    // Reset: back to the labels.
    let out = agent.ctl(&["egress", "set", &c.name, "--reset"]);
    assert!(out.status.success());
    assert!(!reaches(&c, &r2, 9090));
    // Removal leaves nothing of the container in the table.
    let key: String = e.container_id.clone();
    drop(c);
    wait_until(
        "the container's chains to go",
        Duration::from_secs(10),
        || {
            let t = sh(&[
                "nft",
                "list",
                "table",
                "inet",
                &format!("dataplane_e2e_{}_egress2_egress", std::process::id()),
            ]);
            !t.contains(&key)
        },
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_container_that_connects_at_its_first_instruction_is_already_policed() {
    let remote = Remote::new();
    let mut agent = Agent::start("egress3");
    let img = image();
    let first = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 8080 | head -c 8 | grep -q HTTP && echo leaked || echo blocked",
        remote.ip(2)
    );
    for i in 0..10 {
        let out = sh(&[
            "docker",
            "run",
            "--rm",
            "--label",
            "dataplane.test=1",
            "--label",
            "dataplane.egress.internet=false",
            &img,
            "sh",
            "-c",
            &first,
        ]);
        assert_eq!(out.trim(), "blocked", "run {i}");
    }
    // The same without the label leaves.
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
    assert_eq!(out.trim(), "leaked");
    // Created before the agent started, started after it, and started again: no `create`
    // event to learn its labels from; the agent knows them from Docker's list.
    agent.kill9();
    let c = Container {
        name: format!("dpe2e-{}-first", std::process::id()),
    };
    sh(&[
        "docker",
        "create",
        "--name",
        &c.name,
        "--label",
        "dataplane.test=1",
        "--label",
        "dataplane.egress.internet=false",
        &img,
        "sh",
        "-c",
        &first,
    ]);
    agent.spawn();
    for i in 0..2 {
        let out = sh(&["docker", "start", "-a", &c.name]);
        assert_eq!(out.trim(), "blocked", "start {i}");
    }
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_closed_host_default_keeps_unadmitted_containers_in_even_while_no_agent_runs() {
    let remote = Remote::new();
    let config = format!(
        "[egress]\ninternet = false\n{}\n[egress.profiles.web]\ninternet = true\n",
        remote.resolver()
    );
    let mut agent = Agent::start_configured("egress4", &config, &[]);
    let r2 = remote.ip(2);
    let plain = labelled("egress-default", &[]);
    let web = labelled("egress-profile", &["dataplane.egress.profile=web"]);
    let bad = labelled("egress-noprofile", &["dataplane.egress.profile=nope"]);
    assert!(!reaches(&plain, &r2, 8080), "the host default");
    assert!(reaches(&plain, &web.ip(), 80), "host access stays");
    assert!(reaches(&web, &r2, 8080), "its profile opens the internet");
    assert!(egress_of(&agent, &bad).error.unwrap().contains("nope"));
    assert!(
        !reaches(&bad, &web.ip(), 80),
        "an unknown profile fails closed"
    );

    // No agent: a container started meanwhile has never been admitted: nothing leaves.
    agent.kill9();
    let late = labelled("egress-late", &["dataplane.egress.internet=true"]);
    assert!(!reaches(&late, &r2, 8080), "unadmitted while no agent runs");
    assert!(reaches(&web, &r2, 8080), "admitted ones keep their policy");
    agent.spawn();
    wait_until(
        "the late container to be admitted",
        Duration::from_secs(10),
        || reaches(&late, &r2, 8080),
    );
    assert!(!reaches(&plain, &r2, 8080));
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn egress_holds_for_a_containers_ipv6_address_too() {
    let remote = Remote::new();
    let agent = Agent::start("egress6");
    let subnet = format!("fd00:d6:{:x}::/64", std::process::id() % 0xffff);
    let net = Network::create_with("egress6", &["--ipv6", "--subnet", &subnet]);
    let img = image();
    let r6 = remote.ip6();
    let open = Container::run("egress6-open", &["--network", &net.0, &img, "sleep", "600"]);
    let closed = Container::run(
        "egress6-closed",
        &[
            "--network",
            &net.0,
            "--label",
            "dataplane.egress.internet=false",
            &img,
            "sleep",
            "600",
        ],
    );
    let (closed6, gw6) = ipv6_of(&closed);
    assert!(!closed6.is_empty(), "no IPv6 address on {}", net.0);
    // A new container's IPv6 takes a moment (neighbour discovery): wait for it.
    wait_until(
        "IPv6 to the remote without a policy",
        Duration::from_secs(10),
        || reaches(&open, &r6, 8080),
    );
    wait_until(
        "the policed container's IPv6 to the host",
        Duration::from_secs(10),
        || pings(&closed, &gw6),
    );
    assert!(
        !reaches(&closed, &r6, 8080),
        "IPv6 to the remote with internet off"
    );
    assert!(
        egress_of(&agent, &closed).addresses.contains(&closed6),
        "its IPv6 address is policed"
    );
    // An IPv6 exception at runtime.
    let out = agent.ctl(&[
        "egress",
        "set",
        &closed.name,
        "--allow",
        &format!("[{r6}]:8080/tcp"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reaches(&closed, &r6, 8080));
    assert!(!reaches(&closed, &remote.ip(2), 8080), "IPv4 stays closed");
}
