//! Paused containers (`dataplane.on-pause`): pooled clients learn at once instead of hanging.
//! The backend is a line echo server (socat), so a client keeps one connection open across
//! requests, as a pooled HTTP client does.

use std::time::Instant;

use super::*;

/// A keep-alive client on the host: connects to `127.0.0.1:port`, sends a line and reads it
/// back, waits for `go` (a file) to appear, then uses the same connection again. Prints
/// `first=<ok>`, then `second=<ok|error:...>` and the seconds the second use took, then
/// what a new connection got (`new=<ok|refused|error:...>`).
const POOLED: &str = r#"
import os, socket, sys, time
port, go, limit = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port), timeout=limit)
s.sendall(b"one\n"); print("first=" + ("ok" if s.recv(64) == b"one\n" else "bad"), flush=True)
while not os.path.exists(go): time.sleep(0.02)
t = time.monotonic()
try:
    s.sendall(b"two\n"); got = s.recv(64)
    r = "ok" if got == b"two\n" else "closed"
except OSError as e:
    r = "error:" + type(e).__name__
print("second=%s %.2f" % (r, time.monotonic() - t), flush=True)
try:
    n = socket.create_connection(("127.0.0.1", port), timeout=limit)
    n.sendall(b"three\n"); n.recv(64); r = "ok"
except ConnectionRefusedError:
    r = "refused"
except OSError as e:
    r = "error:" + type(e).__name__
print("new=" + r, flush=True)
"#;

fn echo_backend(name: &str, publish: &str, on_pause: Option<&str>) -> Container {
    let img = image();
    let label = on_pause.map(|v| format!("dataplane.on-pause={v}"));
    let mut args = vec!["-p", publish];
    if let Some(l) = &label {
        args.extend_from_slice(&["--label", l]);
    }
    args.extend_from_slice(&[&img, "socat", "TCP-LISTEN:80,fork,reuseaddr", "EXEC:cat"]);
    Container::run(name, &args)
}

/// Runs the python `script` with `port`, a go-file and `extra`; pauses `c` once the
/// script has its first answer, lets it go on (the go-file appears) once `paused()` holds,
/// and unpauses `c` `unpause_after` later. Returns the script's lines.
fn across_a_pause(
    script: &str,
    port: u16,
    extra: &[&str],
    c: &Container,
    paused: impl Fn() -> bool,
    unpause_after: Duration,
) -> Vec<String> {
    let go = std::env::temp_dir().join(format!("dpe2e-go-{}-{port}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let client = Command::new("python3")
        .args(["-c", script, &port.to_string(), &go.display().to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The first request answered, then the pause.
    std::thread::sleep(Duration::from_millis(500));
    sh(&["docker", "pause", &c.name]);
    wait_until("the pause to be seen", Duration::from_secs(5), &paused);
    std::fs::write(&go, "").unwrap();
    std::thread::sleep(unpause_after);
    sh(&["docker", "unpause", &c.name]);
    let out = client.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&go);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// The pooled TCP client across a pause of `c`.
fn pooled_across_a_pause(c: &Container, port: u16, unpause_after: Duration) -> Vec<String> {
    across_a_pause(POOLED, port, &["8"], c, || true, unpause_after)
}

/// Seconds a `second=` line says the second use took.
fn took(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn on_pause_reset_fails_pooled_and_new_connections_at_once() {
    let published = port(44);
    let backend = echo_backend("pause-reset", &format!("{published}:80"), Some("reset"));
    let agent = Agent::start("pause");
    wait_until("the frontend", Duration::from_secs(10), || {
        agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .is_some()
    });
    let fe = agent.frontend(&format!("0.0.0.0:{published}/tcp")).unwrap();
    assert_eq!(fe.on_pause, "reset");
    assert!(!fe.paused);
    let lines = pooled_across_a_pause(&backend, published, Duration::from_secs(4));
    assert_eq!(lines[0], "first=ok", "{lines:?}");
    // The pooled connection fails at once (not after the 8 s timeout, nor at the unpause).
    assert!(lines[1].starts_with("second=error"), "{lines:?}");
    assert!(took(&lines[1]) < 2.0, "{lines:?}");
    assert_eq!(lines[2], "new=refused", "{lines:?}");
    assert!(agent.settled_counter(STAT_REFUSED_PAUSED) >= 1);
    let resets = agent.status().pause_resets;
    assert!(
        resets.iter().any(|(us, n)| *n >= 1 && *us < 1_000_000),
        "{resets:?}"
    );
    // Unpaused: once the agent has Docker's event (milliseconds after `docker unpause`
    // returns), new connections are translated again at once.
    wait_until("the unpause to be seen", Duration::from_secs(2), || {
        agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .is_some_and(|f| !f.paused)
    });
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", published)).unwrap();
    stream.write_all(b"again\n").unwrap();
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again\n");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(kernel_peer(&stream), format!("{}:80", backend.ip()));
    assert!(
        !agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .unwrap()
            .paused
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn while_paused_frontends_say_so_and_a_container_client_is_reset_too() {
    let published = port(45);
    let backend = echo_backend("pause-gw", &format!("{published}:80"), Some("reset"));
    let agent = Agent::start("pause2");
    let img = image();
    let cli = Container::run("pause-client", &[&img, "sleep", "600"]);
    let gw = gateway_of(&backend);
    wait_until("the frontend", Duration::from_secs(10), || {
        agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .is_some()
    });
    // A pooled client in another container, through the gateway: one line, a pause, then
    // the same connection again.
    let script = format!(
        "(printf 'one\\n'; sleep 2; printf 'two\\n'; sleep 6) | socat -t 8 - TCP:{gw}:{published}; echo rc=$?"
    );
    let client = Command::new("docker")
        .args(["exec", &cli.name, "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    sh(&["docker", "pause", &backend.name]);
    wait_until(
        "the frontend to show paused",
        Duration::from_secs(5),
        || {
            agent
                .frontend(&format!("0.0.0.0:{published}/tcp"))
                .is_some_and(|f| f.paused)
        },
    );
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // It saw its first answer, then an error well before its 8 s: never "two".
    assert!(text.contains("one"), "{text}");
    assert!(!text.contains("two"), "{text}");
    assert!(!text.contains("rc=0"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A new connection from the container is refused at once.
    let refused = cli.exec(&format!(
        "socat -T2 - TCP:{gw}:{published} </dev/null 2>&1; echo rc=$?"
    ));
    assert!(refused.contains("refused"), "{refused}");
    let ctl = agent.ctl(&["frontends"]);
    assert!(String::from_utf8_lossy(&ctl.stdout).contains("paused"));
    sh(&["docker", "unpause", &backend.name]);
    let again = cli.exec(&format!("echo hi | socat -t 2 - TCP:{gw}:{published}"));
    assert_eq!(again, "hi");
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn on_pause_keep_waits_and_completes_after_the_unpause() {
    let published = port(46);
    let backend = echo_backend("pause-keep", &format!("{published}:80"), None);
    let agent = Agent::start("pause3");
    wait_until("the frontend", Duration::from_secs(10), || {
        agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .is_some()
    });
    assert_eq!(
        agent
            .frontend(&format!("0.0.0.0:{published}/tcp"))
            .unwrap()
            .on_pause,
        "keep"
    );
    let lines = pooled_across_a_pause(&backend, published, Duration::from_secs(2));
    assert_eq!(lines[0], "first=ok", "{lines:?}");
    // It waited for the unpause (about 2 s) and completed.
    assert!(lines[1].starts_with("second=ok"), "{lines:?}");
    assert!(took(&lines[1]) >= 1.5, "{lines:?}");
    assert_eq!(lines[2], "new=ok", "{lines:?}");
    assert_eq!(agent.settled_counter(STAT_REFUSED_PAUSED), 0);
}

/// A connected UDP client on the host: one datagram answered, then (once `go` exists) the
/// same socket again, then a new `connect()`.
const CONNECTED_UDP: &str = r#"
import os, socket, sys, time
port, go = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.connect(("127.0.0.1", port)); s.send(b"one\n")
print("first=" + ("ok" if s.recv(64) == b"one\n" else "bad"), flush=True)
while not os.path.exists(go): time.sleep(0.02)
try:
    s.send(b"two\n"); s.recv(64); r = "ok"
except socket.timeout:
    r = "timeout"
except OSError as e:
    r = "error:" + type(e).__name__
print("second=" + r, flush=True)
n = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    n.connect(("127.0.0.1", port)); r = "connected"
except ConnectionRefusedError:
    r = "refused"
print("new=" + r, flush=True)
"#;

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn on_pause_reset_gives_connected_udp_an_error_too() {
    let published = port(47);
    let img = image();
    let backend = Container::run(
        "pause-udp",
        &[
            "-p",
            &format!("{published}:53/udp"),
            "--label",
            "dataplane.on-pause=reset",
            &img,
            "socat",
            "UDP-LISTEN:53,fork",
            "EXEC:cat",
        ],
    );
    let agent = Agent::start("pause4");
    wait_until("the frontend", Duration::from_secs(10), || {
        agent
            .frontend(&format!("0.0.0.0:{published}/udp"))
            .is_some()
    });
    let lines = across_a_pause(
        CONNECTED_UDP,
        published,
        &[],
        &backend,
        || {
            agent
                .frontend(&format!("0.0.0.0:{published}/udp"))
                .is_some_and(|f| f.paused)
        },
        Duration::from_secs(3),
    );
    assert_eq!(lines[0], "first=ok", "{lines:?}");
    assert!(lines[1].starts_with("second=error"), "{lines:?}");
    assert_eq!(lines[2], "new=refused", "{lines:?}");
}
