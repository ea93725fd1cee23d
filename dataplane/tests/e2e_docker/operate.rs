//! Operating the agent: Prometheus metrics during real traffic (checked by `promtool`), a
//! config reload on `SIGHUP` taken whole or rejected, and `bridge-ctl top` in a terminal
//! (tmux).

use std::{os::unix::process::CommandExt, time::Instant};

use super::*;

/// `GET /metrics` from `addr`: the response head and body.
fn scrape(addr: &str, openmetrics: bool) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = if openmetrics {
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n"
    } else {
        ""
    };
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// The (integer) value of the sample whose line starts with `name` and contains every one
/// of `labels` (`key="value"`); 0 when absent.
fn sample(body: &str, name: &str, labels: &[&str]) -> u64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn promtool_accepts(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `cargo xtask setup` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
#[expect(
    clippy::too_many_lines,
    reason = "one scrape's every family, checked in turn"
)]
fn metrics_follow_real_traffic_and_promtool_accepts_them() {
    let (m, p) = (port(56), port(57));
    let addr = format!("127.0.0.1:{m}");
    let agent = Agent::start_configured("met", &format!("[metrics]\nlisten = \"{addr}\"\n"), &[]);
    assert_eq!(
        agent.status().metrics.as_deref(),
        Some(format!("http://{addr}/metrics").as_str())
    );
    let web = httpd("mweb", &format!("{p}:80"));
    wait_http("the published port", p, Duration::from_secs(10));
    // A container denied the host, knocking on it: its drops are counted per container.
    let img = image();
    let knock = format!(
        "while true; do nc -w 1 {} {p} </dev/null; sleep 0.2; done",
        gateway_of(&web)
    );
    let policed = Container::run(
        "mpol",
        &[
            "--label",
            "dataplane.egress.host=false",
            &img,
            "sh",
            "-c",
            &knock,
        ],
    );

    let n: u64 = 7;
    let frontend = format!("frontend=\"0.0.0.0:{p}/tcp\"");
    let (_, before) = scrape(&addr, false);
    let translated = |body: &str| {
        sample(
            body,
            "dataplane_translated_connections_total",
            &[&frontend, &format!("container=\"{}\"", web.name)],
        )
    };
    let connects = |body: &str| {
        sample(
            body,
            "dataplane_socket_translations_total",
            &["hook=\"connect\""],
        )
    };
    for _ in 0..n {
        assert!(http_get(p).contains("dataplane test backend"));
    }
    // Read from the kernel at the scrape: no waiting for a copy.
    let (head, after) = scrape(&addr, false);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "a scraper that did not ask for OpenMetrics gets the text format: {head}"
    );
    assert_eq!(translated(&after) - translated(&before), n, "{after}");
    assert!(connects(&after) - connects(&before) >= n);
    promtool_accepts(&after);
    for name in [
        "dataplane_build_info",
        "dataplane_map_capacity",
        "dataplane_map_entries",
        "dataplane_fallbacks_total",
        "dataplane_bind_refusals_total",
        "dataplane_reconcile_duration_seconds_count",
        "dataplane_netfilter_apply_duration_seconds_count",
    ] {
        assert!(after.contains(name), "{name} missing:\n{after}");
    }
    // The published container's start: frontends written from its start event, or before
    // it (at its network connect).
    assert!(
        sample(&after, "dataplane_event_to_map_seconds_count", &[])
            + sample(&after, "dataplane_frontend_lead_seconds_count", &[])
            >= 1,
        "{after}"
    );
    // Both containers' start events (the second may still be on its way to the agent).
    wait_until("two start events counted", Duration::from_secs(10), || {
        let (_, body) = scrape(&addr, false);
        sample(
            &body,
            "dataplane_docker_events_total",
            &["type=\"container\"", "action=\"start\""],
        ) >= 2
    });
    assert!(sample(&after, "dataplane_map_entries", &["map=\"DP_FE_V3\""]) >= 2);
    // This kernel has every feature the agent uses.
    assert_eq!(
        sample(
            &after,
            "dataplane_kernel_feature",
            &["feature=\"bpf_set_retval\""]
        ),
        1,
        "{after}"
    );
    assert_eq!(
        sample(&after, "dataplane_map_capacity", &["map=\"DP_FE_V3\""]),
        u64::from(dataplane_common::FRONTENDS_MAX)
    );
    // The policed container's drops, per container.
    let policed_name = format!("container=\"{}\"", policed.name);
    wait_until(
        "egress drops in the metrics",
        Duration::from_secs(10),
        || {
            let (_, body) = scrape(&addr, false);
            sample(
                &body,
                "dataplane_egress_dropped_packets_total",
                &[&policed_name],
            ) >= 1
        },
    );
    // OpenMetrics for a scraper that asks for it.
    let (head, om) = scrape(&addr, true);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.contains("# TYPE dataplane_translated_connections counter"));
    // Anything but GET /metrics is answered, and nothing else.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"DELETE /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
}

fn hup(agent: &Agent) {
    sh(&["kill", "-HUP", &agent.pid().to_string()]);
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn a_config_reload_is_taken_whole_or_rejected_with_the_line() {
    let (m1, m2, p) = (port(58), port(59), port(60));
    let first = format!("[metrics]\nlisten = \"127.0.0.1:{m1}\"\n");
    let agent = Agent::start_configured("rl", &first, &[]);
    let web = httpd("rweb", &format!("{p}:80"));
    wait_until("the frontend", Duration::from_secs(10), || {
        agent.frontend(&format!("0.0.0.0:{p}/tcp")).is_some()
    });
    assert_eq!(
        agent
            .frontend(&format!("0.0.0.0:{p}/tcp"))
            .unwrap()
            .on_pause,
        "keep"
    );
    let config = agent.dir.join("dataplane.toml");
    // A file with one bad line changes nothing, not even its good lines.
    std::fs::write(
        &config,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{m2}\"\n[pause]\ndefault = \"reset\"\n\
             [egress]\nallow = [\"10.0.0.0/40\"]\n"
        ),
    )
    .unwrap();
    hup(&agent);
    wait_until("the reload to be rejected", Duration::from_secs(10), || {
        agent.status().config_error.is_some()
    });
    let st = agent.status();
    let err = st.config_error.clone().unwrap();
    assert!(
        err.contains("line 6") && err.contains("10.0.0.0/40"),
        "{err}"
    );
    assert_eq!(
        st.metrics.as_deref(),
        Some(format!("http://127.0.0.1:{m1}/metrics").as_str())
    );
    let (_, body) = scrape(&format!("127.0.0.1:{m1}"), false);
    assert_eq!(
        sample(
            &body,
            "dataplane_config_reloads_total",
            &["result=\"rejected\""]
        ),
        1
    );
    assert_eq!(
        sample(&body, "dataplane_config_last_reload_successful", &[]),
        0
    );
    assert!(TcpStream::connect(("127.0.0.1", m2)).is_err());
    assert_eq!(
        agent
            .frontend(&format!("0.0.0.0:{p}/tcp"))
            .unwrap()
            .on_pause,
        "keep"
    );
    let out = agent.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config reload rejected"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // `dataplane check-config` says the same before anyone reloads.
    let check = Command::new(bin("dataplane"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("line 6"));

    // A good file is taken whole: the metrics move, the pause default applies.
    std::fs::write(
        &config,
        format!("[metrics]\nlisten = \"127.0.0.1:{m2}\"\n[pause]\ndefault = \"reset\"\n"),
    )
    .unwrap();
    hup(&agent);
    wait_until("the reload to be taken", Duration::from_secs(10), || {
        let st = agent.status();
        st.config_error.is_none()
            && st.metrics.as_deref() == Some(format!("http://127.0.0.1:{m2}/metrics").as_str())
    });
    wait_until("the new pause default", Duration::from_secs(10), || {
        agent
            .frontend(&format!("0.0.0.0:{p}/tcp"))
            .is_some_and(|f| f.on_pause == "reset")
    });
    let (_, body) = scrape(&format!("127.0.0.1:{m2}"), false);
    assert_eq!(
        sample(
            &body,
            "dataplane_config_reloads_total",
            &["result=\"applied\""]
        ),
        1
    );
    assert!(TcpStream::connect(("127.0.0.1", m1)).is_err());
    // Translation went on throughout.
    assert!(http_get(p).contains("dataplane test backend"));
    drop(web);
}

/// A tmux session, killed on drop.
struct Tmux(String);

impl Tmux {
    fn capture(&self) -> String {
        String::from_utf8_lossy(&cmd(&["tmux", "capture-pane", "-p", "-t", &self.0]).stdout)
            .into_owned()
    }

    fn alive(&self) -> bool {
        cmd(&["tmux", "has-session", "-t", &self.0])
            .status
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = cmd(&["tmux", "kill-session", "-t", &self.0]);
    }
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn bridge_ctl_top_shows_frontends_and_rates_live() {
    let p = port(61);
    let agent = Agent::start("top");
    let web = httpd("tweb", &format!("{p}:80"));
    wait_http("the published port", p, Duration::from_secs(10));
    let session = Tmux(format!("dpe2e-top-{}", std::process::id()));
    let top = format!(
        "{} --socket {} top --interval 0.3",
        bin("bridge-ctl").display(),
        agent.dir.join("ctl.sock").display()
    );
    sh(&[
        "tmux",
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "200",
        "-y",
        "50",
        &top,
    ]);
    wait_until("top to show the frontend", Duration::from_secs(10), || {
        session.capture().contains(&format!("0.0.0.0:{p}/tcp"))
    });
    let screen = session.capture();
    assert!(screen.contains("translating"), "{screen}");
    assert!(screen.contains("KERNEL COUNTER"), "{screen}");
    assert!(screen.contains(&web.name), "{screen}");
    // Connections show up in the frontend's row, with a rate while they come.
    let row = |screen: &str| {
        screen
            .lines()
            .find(|l| l.starts_with(&format!("0.0.0.0:{p}/tcp")))
            .map(str::to_string)
            .unwrap_or_default()
    };
    let connections = |screen: &str| -> Option<u64> {
        row(screen)
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse().ok())
    };
    let before = connections(&screen).expect("a connections column");
    for _ in 0..5 {
        assert!(http_get(p).contains("dataplane test backend"));
    }
    wait_until("the connections in top", Duration::from_secs(10), || {
        connections(&session.capture()) == Some(before + 5)
    });
    let mut saw_rate = false;
    for _ in 0..40 {
        let _ = http_get(p);
        let r = row(&session.capture());
        if r.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
        {
            saw_rate = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(saw_rate, "no rate shown: {}", session.capture());
    // `q` quits and gives the terminal back.
    sh(&["tmux", "send-keys", "-t", &session.0, "q"]);
    wait_until("top to quit", Duration::from_secs(5), || !session.alive());
}

/// The agent's default state (`dataplane run` with no flags): what `cargo xtask run` uses.
fn default_state_left() -> Vec<String> {
    let mut left = Vec::new();
    if std::path::Path::new("/sys/fs/bpf/dataplane").exists() {
        left.push("/sys/fs/bpf/dataplane".to_string());
    }
    let tables = sh(&["nft", "list", "tables"]);
    for l in tables.lines() {
        let name = l.split_whitespace().nth(2).unwrap_or("");
        if ["dataplane", "dataplane_egress", "dataplane_fw"].contains(&name) {
            left.push(l.to_string());
        }
    }
    left
}

/// `cargo xtask <args>` beside another agent (`DATAPLANE_XTASK`: the harness's own
/// binary): its output, which must be a refusal. Bounded: a harness that did not refuse
/// would run the whole layer (and this test).
fn xtask_refuses(args: &[&str], what: &str) -> String {
    let xtask = std::env::var("DATAPLANE_XTASK").expect("run by `cargo xtask test`");
    let out = Command::new("timeout")
        .args(["-s", "KILL", "120", &xtask])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "xtask {args:?} ran beside {what}: {text}"
    );
    text
}

fn harness_beside(what: &str) -> String {
    xtask_refuses(&["test", "--only", "e2e", "--no-lint"], what)
}

/// A process group this test started, stopped on drop as a terminal's Ctrl-C would stop it
/// (then killed), with the agent's default state removed after it: also when the test fails.
struct Foreground(std::process::Child);

impl Foreground {
    /// Ctrl-C, then a bounded wait; `None` when it had to be killed.
    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let pgid = i32::try_from(self.0.id()).unwrap();
        // SAFETY: signalling the process group this test started.
        unsafe { libc::kill(-pgid, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Some(st) = self.0.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.0.wait();
        None
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.interrupt();
        }
        let _ = Command::new(bin("dataplane")).arg("uninstall").output();
    }
}

/// The README's two commands in either order: `cargo xtask run` (its agent with the
/// defaults, Ctrl-C) leaves nothing that `cargo xtask test` would meet; the harness refuses,
/// saying what to run, beside a running agent and beside a stopped one's pins and tables.
#[test]
#[ignore = "needs root and Docker; run by `cargo xtask test`"]
fn the_readmes_two_commands_in_either_order() {
    assert_eq!(
        default_state_left(),
        Vec::<String>::new(),
        "state before the test"
    );
    let p = port(26);
    let web = httpd("sequence", &format!("{p}:80"));
    let xtask = std::env::var("DATAPLANE_XTASK").expect("run by `cargo xtask test`");
    let log = std::env::temp_dir().join(format!("dpe2e-xtask-run-{}.log", std::process::id()));
    // `cargo xtask run` as a user runs it (the binaries the harness built), in a process
    // group of its own so that Ctrl-C reaches it and the agent as a terminal's would.
    let out = std::fs::File::create(&log).unwrap();
    let mut run = Foreground(
        Command::new(&xtask)
            .args(["run", "--no-build"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let ready = || {
        Command::new(bin("bridge-ctl"))
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_until(
        "the agent of `cargo xtask run`",
        Duration::from_mins(1),
        ready,
    );
    assert!(http_get(p).contains("dataplane test backend"));
    let running = harness_beside("a running agent");
    assert!(
        running.contains("an agent runs on this host") && running.contains("Ctrl-C"),
        "{running}"
    );
    // Ctrl-C: the agent stops, xtask removes what it left.
    let status = run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(
        status.is_some_and(|s| s.success()),
        "cargo xtask run after Ctrl-C: {status:?}: {text}"
    );
    assert_eq!(
        default_state_left(),
        Vec::<String>::new(),
        "left by xtask run"
    );
    assert!(
        http_get(p).contains("dataplane test backend"),
        "Docker's path"
    );
    // A stopped agent that keeps its state (the package's service, or `dataplane run` by
    // hand, stopped): refused, with the command that removes it.
    let mut agent = Foreground(
        Command::new(bin("dataplane"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    wait_until("the hand-run agent", Duration::from_mins(1), ready);
    assert!(
        agent.interrupt().is_some(),
        "the hand-run agent did not stop"
    );
    let left = default_state_left();
    let stopped = harness_beside("a stopped agent's state");
    // `cargo xtask run` would take that state and remove it: refused too.
    let run_beside = harness_run_beside();
    drop(agent);
    assert!(!left.is_empty(), "a stopped agent keeps its pins");
    assert!(
        stopped.contains("dataplane uninstall") && stopped.contains("/sys/fs/bpf/dataplane"),
        "{stopped}"
    );
    assert!(run_beside.contains("dataplane run"), "{run_beside}");
    assert_eq!(
        default_state_left(),
        Vec::<String>::new(),
        "after uninstall"
    );
    drop(web);
}

/// `cargo xtask run` beside a stopped agent's state: its output (it must refuse).
fn harness_run_beside() -> String {
    xtask_refuses(&["run", "--no-build"], "a stopped agent's state")
}
