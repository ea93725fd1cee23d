//! The Debian package as an operator uses it: install the previous build, run the unit's
//! command lines as systemd would (systemd is not PID 1 here: its `ExecStartPre`/`ExecStart`
//! with the unit's capability bounding set and `NoNewPrivileges`, `SIGTERM` to stop),
//! upgrade to this build (a new map layout) while a client opens connections in a loop,
//! then remove and purge. `cargo xtask test` builds both packages (`DATAPLANE_TEST_DEB`,
//! `DATAPLANE_TEST_DEB_PREVIOUS`).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::*;

const UNIT: &str = "/lib/systemd/system/dataplane.service";
const SOCKET: &str = "/run/dataplane/ctl.sock";

/// The unit's `Key=value` settings in order (every occurrence).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// An `Exec*` line as systemd runs it: `+` lifts the sandbox; otherwise the unit's
/// capability bounding set and `NoNewPrivileges` apply (through `setpriv`).
fn exec(line: &str, settings: &[(String, String)]) -> Command {
    if let Some(full) = line.strip_prefix('+') {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", full]);
        return c;
    }
    let caps: Vec<String> = setting(settings, "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut c = Command::new("setpriv");
    if !caps.is_empty() {
        c.arg(format!("--bounding-set=-all,{}", caps.join(",")));
    }
    if setting(settings, "NoNewPrivileges").contains(&"yes") {
        c.arg("--no-new-privs");
    }
    c.arg("--");
    c.args(line.split_whitespace());
    c
}

/// The agent as the installed unit starts it (its log in `log`).
fn start_unit(log: &Path) -> Proc {
    let settings = unit_settings(&std::fs::read_to_string(UNIT).expect("the installed unit"));
    for pre in setting(&settings, "ExecStartPre") {
        let out = exec(pre, &settings).output().unwrap();
        assert!(out.status.success(), "ExecStartPre {pre}: {out:?}");
    }
    let start = setting(&settings, "ExecStart");
    assert_eq!(start.len(), 1, "{start:?}");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = exec(start[0], &settings)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("the unit's ExecStart");
    let p = Proc(child);
    wait_until(
        "the packaged agent to be ready",
        Duration::from_secs(30),
        || {
            Command::new("bridge-ctl")
                .arg("status")
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
    p
}

/// Stops the agent as systemd does (`SIGTERM`, then waits for it).
fn stop_unit(p: Proc) {
    drop(p);
}

fn dpkg(args: &[&str]) -> std::process::Output {
    let out = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", "dataplane"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("ii"))
}

/// Purges the package and whatever an interrupted test left, on drop.
struct Cleanup {
    agent: Option<Proc>,
    log: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- packaged agent log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if let Some(p) = self.agent.take() {
            drop(p);
        }
        let _ = Command::new("dpkg").args(["-P", "dataplane"]).output();
        // If the package's prerm could not run, the test build removes what is left.
        let _ = Command::new(bin("dataplane")).arg("uninstall").output();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// New connections to `127.0.0.1:port` in a loop until stopped: how many got the page, and
/// every failure.
struct Loop {
    stop: Arc<AtomicBool>,
    ok: Arc<Mutex<(u64, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new((0, Vec::new())));
        let (stopping, tally) = (Arc::clone(&stop), Arc::clone(&ok));
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let answer = (|| -> std::io::Result<String> {
                    let mut c = TcpStream::connect_timeout(
                        &([127, 0, 0, 1], port).into(),
                        Duration::from_secs(2),
                    )?;
                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut text = String::new();
                    c.read_to_string(&mut text)?;
                    Ok(text)
                })();
                let mut seen = tally.lock().unwrap();
                match answer {
                    Ok(t) if t.contains("dataplane test backend") => seen.0 += 1,
                    Ok(t) => seen.1.push(format!("unexpected answer: {t:?}")),
                    Err(e) => seen.1.push(e.to_string()),
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            ok,
            thread: Some(thread),
        }
    }

    fn served(&self) -> u64 {
        self.ok.lock().unwrap().0
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.ok.lock().unwrap().clone()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn nft_tables() -> Vec<String> {
    sh(&["nft", "list", "tables"])
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
#[expect(clippy::too_many_lines, reason = "one operator's story, step by step")]
fn the_package_installs_upgrades_without_a_failed_connection_and_removes_cleanly() {
    let test = "the_package_installs_upgrades_without_a_failed_connection_and_removes_cleanly";
    let (Ok(deb), Ok(previous)) = (
        std::env::var("DATAPLANE_TEST_DEB"),
        std::env::var("DATAPLANE_TEST_DEB_PREVIOUS"),
    ) else {
        skipped(test, "no packages built (cargo xtask test builds them)");
        return;
    };
    if installed() {
        skipped(
            test,
            "a dataplane package is installed on this host: not touching it",
        );
        return;
    }
    let p = port(62);
    let mut cleanup = Cleanup {
        agent: None,
        log: std::env::temp_dir().join(format!("dpe2e-pkg-{}.log", std::process::id())),
    };

    // The previous build, installed and started as its unit says.
    dpkg(&["-i", &previous]);
    for f in [
        "/usr/sbin/dataplane",
        "/usr/bin/bridge-ctl",
        UNIT,
        "/etc/dataplane/dataplane.toml",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let web = httpd("pkg", &format!("{p}:80"));
    cleanup.agent = Some(start_unit(&cleanup.log));
    let st = dataplane_api::status(Path::new(SOCKET)).unwrap();
    let old_version = st.version.clone();
    wait_until("the frontend", Duration::from_secs(10), || {
        dataplane_api::frontends(Path::new(SOCKET))
            .unwrap_or_default()
            .iter()
            .any(|f| f.frontend == format!("0.0.0.0:{p}/tcp"))
    });
    let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_eq!(kernel_peer(&s), format!("{}:80", web.ip()));
    drop(s);

    // Upgrade under a client that opens a new connection every few milliseconds.
    let clients = Loop::start(p);
    wait_until("clients served", Duration::from_secs(10), || {
        clients.served() >= 20
    });
    // (The previous build copies its counters every 250 ms.)
    let counted = || {
        dataplane_api::frontends(Path::new(SOCKET))
            .unwrap_or_default()
            .into_iter()
            .find(|f| f.frontend == format!("0.0.0.0:{p}/tcp"))
            .map_or(0, |f| f.connections)
    };
    wait_until(
        "the previous build to count",
        Duration::from_secs(5),
        || counted() >= 20,
    );
    let counted_before = counted();
    dpkg(&["-i", &deb]);
    // What `deb-systemd-invoke restart` does under systemd.
    let restart = std::time::Instant::now();
    stop_unit(cleanup.agent.take().unwrap());
    cleanup.agent = Some(start_unit(&cleanup.log));
    let restart = restart.elapsed();
    let at_ready = clients.served();
    wait_until(
        "clients served by the new agent",
        Duration::from_secs(10),
        || clients.served() >= at_ready + 50,
    );
    let (served, failures) = clients.finish();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed during the upgrade: {:?}",
        failures.len(),
        served + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    let st = dataplane_api::status(Path::new(SOCKET)).unwrap();
    eprintln!(
        "upgrade: {served} connections served, none failed; stop to ready {restart:?}; \
         {} took Docker's path meanwhile",
        st.counter(STAT_SKIP_NO_AGENT)
    );
    assert_ne!(st.version, old_version, "{st:?}");
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        adopted(&st),
        dataplane::bpf::SOCK_HOOKS.len() + 1,
        "the new agent adopts the pinned links: {st:?}"
    );
    let log = std::fs::read_to_string(&cleanup.log).unwrap();
    assert!(
        log.contains("carried the counters of an earlier map layout over"),
        "{log}"
    );
    // The counters of the earlier layout were carried over, and count on.
    let fe = dataplane_api::frontends(Path::new(SOCKET))
        .unwrap()
        .into_iter()
        .find(|f| f.frontend == format!("0.0.0.0:{p}/tcp"))
        .unwrap();
    assert!(
        fe.connections > counted_before,
        "{fe:?} vs {counted_before}"
    );
    let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_eq!(kernel_peer(&s), format!("{}:80", web.ip()));
    drop(s);
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf/dataplane")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for m in dataplane::bpf::MAPS {
        assert!(pins.iter().any(|p| p == m), "{m} not pinned: {pins:?}");
    }
    assert!(
        pins.iter().all(|p| p.starts_with("link_")
            || p.starts_with("build_")
            || dataplane::bpf::MAPS.contains(&p.as_str())),
        "pins of the earlier layout left: {pins:?}"
    );

    // The unit and the package pass their checkers.
    let verify = cmd(&["systemd-analyze", "verify", UNIT]);
    assert!(verify.status.success(), "{verify:?}");
    let lintian = cmd(&["lintian", "--fail-on", "error,warning", &deb]);
    assert!(
        lintian.status.success(),
        "lintian: {}",
        String::from_utf8_lossy(&lintian.stdout)
    );

    // Remove: the agent stopped (as prerm has systemd do), its kernel state gone, Docker's
    // own path serving; the config stays until purge.
    stop_unit(cleanup.agent.take().unwrap());
    dpkg(&["-r", "dataplane"]);
    assert!(!Path::new("/sys/fs/bpf/dataplane").exists());
    let tables = nft_tables();
    assert!(
        !tables.contains(&"table inet dataplane".to_string())
            && !tables.contains(&"table inet dataplane_egress".to_string()),
        "{tables:?}"
    );
    for gone in [
        "/usr/sbin/dataplane",
        "/usr/bin/bridge-ctl",
        UNIT,
        "/run/dataplane",
        "/run/dataplane.lock",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after remove");
    }
    assert!(Path::new("/etc/dataplane/dataplane.toml").exists());
    let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_ne!(kernel_peer(&s), format!("{}:80", web.ip()));
    drop(s);
    assert!(http_get(p).contains("dataplane test backend"));

    dpkg(&["-P", "dataplane"]);
    for gone in ["/etc/dataplane", "/var/lib/dataplane"] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(!installed());
}
