//! The Docker engine and the test image, for `run`, `test` and `bench`.

use std::{
    fs,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{engines::Engine, util::output};

const SOCKET: &str = "/var/run/docker.sock";
const LOG: &str = "/var/log/dataplane-dockerd.log";
const PIDFILE: &str = "/run/dataplane-dockerd.pid";
/// The configuration file of the engine the bench starts (instead of the operator's).
const BENCH_CONFIG: &str = "/run/dataplane-bench-dockerd/daemon.json";

/// Whether an engine answers on the default socket.
pub fn engine_up() -> bool {
    Path::new(SOCKET).exists()
        && Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// The version of the engine that answers on the default socket.
fn server_version() -> Option<String> {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Arguments for `dockerd` of `engine` besides the userland-proxy switch: its own data and
/// exec roots, the pidfile.
pub fn dockerd_args(engine: Engine) -> Vec<String> {
    let mut args = Vec::new();
    if let (Some(data), Some(exec)) = (engine.data_root(), engine.exec_root()) {
        args.extend(["--data-root".into(), data, "--exec-root".into(), exec]);
    }
    args.extend(engine.daemon_options().iter().map(ToString::to_string));
    args.extend(["--pidfile".into(), PIDFILE.into()]);
    args
}

/// Starts `engine`'s dockerd with `userland-proxy: false` unless an engine already runs (a
/// running one must be that engine when a version was asked for). Returns the pid of the
/// engine it started. `rules_off`: Docker's iptables rules off (for the agent's
/// own-firewall mode).
fn start_dockerd(engine: Engine, rules_off: bool) -> Result<Option<u32>> {
    if engine_up() {
        let running = server_version().unwrap_or_default();
        if let Some(w) = engine.version_prefix().filter(|w| !running.starts_with(w)) {
            bail!("Docker {running} already answers on {SOCKET}; stop it to test against {w}x");
        }
        check_backend(engine)?;
        return Ok(None);
    }
    prepare_host(engine)?;
    // A flag that daemon.json also sets makes dockerd refuse to start: respect the file.
    let conf = fs::read_to_string("/etc/docker/daemon.json").unwrap_or_default();
    if engine.version_prefix() == Some("29.") && conf.contains("firewall-backend") {
        bail!(
            "/etc/docker/daemon.json sets \"firewall-backend\"; --engine {} sets it on \
             dockerd's command line: remove it from the file",
            engine.tag()
        );
    }
    let mut cmd = Command::new("dockerd");
    if let Some(path) = engine.path_env()? {
        cmd.env("PATH", path);
    }
    if !conf.contains("userland-proxy") {
        cmd.arg("--userland-proxy=false");
    }
    if rules_off && !conf.contains("\"iptables\"") {
        cmd.arg("--iptables=false");
    }
    if rules_off && !conf.contains("ip6tables") {
        cmd.arg("--ip6tables=false");
    }
    cmd.args(dockerd_args(engine));
    let log = fs::File::create(LOG).with_context(|| format!("creating {LOG}"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting dockerd (is docker.io installed? `cargo xtask setup`)")?;
    let pid = child.id();
    let t = Instant::now();
    while !engine_up() {
        if t.elapsed() > Duration::from_mins(1) {
            bail!("dockerd did not answer within 60 s; see {LOG}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check_backend(engine)?;
    Ok(Some(pid))
}

/// The firewall backend the engine on the default socket reports (`/info`), if it says.
fn firewall_backend() -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket", SOCKET])
        .arg("http://docker/info")
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["FirewallBackend"]["Driver"].as_str().map(str::to_string)
}

/// A running 29 must have the backend asked for (`29` and `29-nft` report the same version).
fn check_backend(engine: Engine) -> Result<()> {
    let want = match engine {
        Engine::V29 => "iptables",
        Engine::V29Nft => "nftables",
        _ => return Ok(()),
    };
    let got = firewall_backend().unwrap_or_default();
    if got != want {
        bail!(
            "the Docker 29 on {SOCKET} runs the {got} firewall backend; --engine {} wants \
             {want}: stop it first",
            engine.tag()
        );
    }
    Ok(())
}

/// Whether any dockerd runs (on any socket, starting or stopping).
fn any_dockerd() -> bool {
    fs::read_dir("/proc").is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
                && fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "dockerd")
        })
    })
}

/// The host as an engine about to start needs it: another engine's leftover tables gone,
/// and for 29's nftables backend, forwarding that its chains decide.
fn prepare_host(engine: Engine) -> Result<()> {
    if !any_dockerd() {
        remove_stale_docker_tables();
    }
    if engine == Engine::V29Nft {
        forwarding_for_nftables()?;
    }
    Ok(())
}

/// Docker 29's nftables backend leaves its tables when its daemon stops; an engine started
/// afterwards (another version, or 29 with iptables) would meet their masquerade and drops
/// for addresses it now gives out. With no engine running they are nobody's: removed before
/// an engine starts (29 with nftables writes its own again).
fn remove_stale_docker_tables() {
    for family in ["ip", "ip6"] {
        let exists = Command::new("nft")
            .args(["list", "table", family, "docker-bridges"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if exists {
            println!("xtask: removing {family} docker-bridges, left by a stopped Docker 29");
            let _ = Command::new("nft")
                .args(["delete", "table", family, "docker-bridges"])
                .status();
        }
    }
}

/// xtask's own forwarding guard for Docker 29's nftables backend: forwarding that neither
/// enters nor leaves a Docker bridge is dropped, as the `FORWARD` drop policy of Docker's
/// iptables backend drops it; the rest is left to Docker's chains (and the operator's).
const FORWARD_GUARD: &str = "table inet dataplane_xtask_forward {
    chain forward {
        type filter hook forward priority filter + 10; policy drop;
        ct state established,related accept
        iifname \"docker0\" accept
        iifname \"br-*\" accept
        oifname \"docker0\" accept
        oifname \"br-*\" accept
    }
}
";

/// Docker 29's nftables backend neither turns IP forwarding on (it would have to secure
/// the host's forwarding in tables not its own, moby#50646; it refuses networks without
/// it) nor clears the `FORWARD` drop policy an iptables engine left, which drops what its
/// own chains accept (it warns of it and leaves it to the host). xtask puts its own guard in
/// place of that policy ([`FORWARD_GUARD`]), then sets the policy to accept and turns
/// forwarding on where it is off. The guard stays: it drops no more than the policy did.
fn forwarding_for_nftables() -> Result<()> {
    let have = Command::new("nft")
        .args(["list", "table", "inet", "dataplane_xtask_forward"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        println!(
            "xtask: Docker 29's nftables backend: forwarding that is not a Docker bridge's is \
             dropped by table inet dataplane_xtask_forward (in place of the iptables FORWARD \
             drop policy)"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(FORWARD_GUARD.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft refused xtask's forwarding guard");
        }
    }
    for (tool, sysctls) in [
        ("iptables", &["/proc/sys/net/ipv4/ip_forward"][..]),
        (
            "ip6tables",
            &[
                "/proc/sys/net/ipv6/conf/all/forwarding",
                "/proc/sys/net/ipv6/conf/default/forwarding",
            ][..],
        ),
    ] {
        let rules = crate::util::output(Command::new(tool).args(["-w", "-S", "FORWARD"]))
            .unwrap_or_default();
        if rules.lines().any(|l| l == "-P FORWARD DROP") {
            println!("xtask: {tool} -P FORWARD ACCEPT (left DROP by an iptables engine)");
            crate::util::run(Command::new(tool).args(["-w", "-P", "FORWARD", "ACCEPT"]))?;
        }
        for p in sysctls {
            if fs::read_to_string(p).is_ok_and(|v| v.trim() == "0") {
                println!("xtask: {p} = 1 (Docker 29's nftables backend needs it)");
                fs::write(p, "1").with_context(|| format!("writing {p}"))?;
            }
        }
    }
    Ok(())
}

/// For `cargo xtask run`: an engine runs afterwards (one this call starts has its iptables
/// rules off when `rules_off`). True when this call started it.
pub fn ensure_running(engine: Engine, rules_off: bool) -> Result<bool> {
    Ok(start_dockerd(engine, rules_off)?.is_some())
}

/// An engine for the tests: reused when one runs, else started and stopped on drop.
pub struct TestEngine {
    started: Option<u32>,
    engine: Engine,
}

impl TestEngine {
    pub fn start(engine: Engine) -> Result<Self> {
        // An engine `cargo xtask run` left running (perhaps with its rules off for the
        // own-firewall mode) is xtask's: the tests start their own, which they may restart.
        if owned_engine_pid().is_some() {
            println!("xtask: stopping the dockerd an earlier xtask command left running");
            stop_owned_engine();
        }
        let started = start_dockerd(engine, false)?;
        let version = server_version().unwrap_or_default();
        if started.is_some() {
            println!("xtask: started dockerd {version} for the tests (stopped when they finish)");
        } else {
            println!("xtask: testing against the running Docker {version}");
        }
        Ok(Self { started, engine })
    }
}

impl TestEngine {
    /// Environment for the tests: whether they may restart the engine (only one that the
    /// harness started itself), and how.
    pub fn env(&self) -> Result<Vec<(&'static str, String)>> {
        let mut env = Vec::new();
        // The engine's own CLI and binaries first, for the tests as for the engine.
        if let Some(path) = self.engine.path_env()? {
            env.push(("PATH", path));
        }
        if self.started.is_some() {
            env.push(("DATAPLANE_TEST_DOCKERD_PIDFILE", PIDFILE.to_string()));
            env.push(("DATAPLANE_TEST_DOCKERD_LOG", LOG.to_string()));
            env.push((
                "DATAPLANE_TEST_DOCKERD_ARGS",
                dockerd_args(self.engine)
                    .into_iter()
                    .filter(|a| a != "--pidfile" && a != PIDFILE)
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        Ok(env)
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let Some(first) = self.started else { return };
        // A test may have restarted it: the pidfile names the one running now.
        let pid = fs::read_to_string(PIDFILE)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(first);
        terminate_engine(pid);
        println!("xtask: stopped the dockerd the tests started");
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        !st.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// A test image built locally from a tarball (no registry is reachable): busybox for a
/// shell, httpd (with a CGI that prints the client address the backend sees) and nc, plus
/// iperf3, socat and haproxy with the libraries they link.
pub struct TestImage {
    pub name: String,
}

fn ldd_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

fn copy_into(root: &Path, src: &Path) -> Result<()> {
    let real = fs::canonicalize(src).with_context(|| format!("resolving {}", src.display()))?;
    let dst = root.join(src.strip_prefix("/").unwrap_or(src));
    fs::create_dir_all(dst.parent().expect("absolute path has a parent"))?;
    fs::copy(&real, &dst).with_context(|| format!("copying {}", real.display()))?;
    Ok(())
}

impl TestImage {
    /// A test image with a name of its own, removed on drop.
    pub fn build() -> Result<Self> {
        Self::build_named(&format!("dataplane-test:{}", std::process::id()))
    }

    pub fn build_named(name: &str) -> Result<Self> {
        let name = name.to_string();
        let root = std::env::temp_dir().join(format!("dataplane-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let r = Self::populate(&root).and_then(|()| {
            let mut tar = Command::new("tar")
                .arg("-C")
                .arg(&root)
                .args(["-cf", "-", "."])
                .stdout(Stdio::piped())
                .spawn()
                .context("tar")?;
            let out = Command::new("docker")
                .args(["import", "-", &name])
                .stdin(tar.stdout.take().expect("piped"))
                .stdout(Stdio::null())
                .status()
                .context("docker import")?;
            let tar_ok = tar.wait()?.success();
            if !out.success() || !tar_ok {
                bail!("building the test image {name} failed");
            }
            Ok(())
        });
        let _ = fs::remove_dir_all(&root);
        r?;
        println!("xtask: built test image {name}");
        Ok(Self { name })
    }

    /// The image's root filesystem as a tar file (for `docker import` where the image
    /// cannot be built: in a VM).
    pub fn write_rootfs_tar(out: &Path) -> Result<()> {
        let root = std::env::temp_dir().join(format!("dataplane-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let r = Self::populate(&root).and_then(|()| {
            crate::util::run(
                Command::new("tar")
                    .arg("-C")
                    .arg(&root)
                    .arg("-cf")
                    .arg(out)
                    .arg("."),
            )
        });
        let _ = fs::remove_dir_all(&root);
        r
    }

    fn populate(root: &Path) -> Result<()> {
        for d in ["bin", "tmp", "www", "etc"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("copying /bin/busybox (busybox-static)")?;
        for applet in [
            "sh", "httpd", "nc", "sleep", "cat", "echo", "ip", "ls", "kill", "true", "hostname",
            "printf", "seq", "ping", "wget", "nslookup",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        for bin in ["/usr/bin/iperf3", "/usr/bin/socat", "/usr/sbin/haproxy"] {
            let bin = Path::new(bin);
            copy_into(root, bin)?;
            for lib in ldd_libs(bin)? {
                copy_into(root, &lib)?;
            }
        }
        // The attacker's tool of the egress tests (built by `cargo xtask build`).
        let spoof = crate::util::project_root().join("target/release/dp-spoof");
        if spoof.exists() {
            fs::copy(&spoof, root.join("bin/dp-spoof")).context("copying dp-spoof")?;
            for lib in ldd_libs(&spoof)? {
                copy_into(root, &lib)?;
            }
        }
        fs::File::create(root.join("www/index.html"))?.write_all(b"dataplane test backend\n")?;
        fs::create_dir_all(root.join("www/cgi-bin"))?;
        let cgi = root.join("www/cgi-bin/ip");
        fs::write(
            &cgi,
            "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"$REMOTE_ADDR $(hostname)\"\n",
        )?;
        fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
        Ok(())
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The pid of the running dockerd that xtask started (from its pidfile), if any.
pub fn owned_engine_pid() -> Option<u32> {
    let pid = fs::read_to_string(PIDFILE)
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    (alive(pid)
        && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "dockerd"))
    .then_some(pid)
}

/// Stops the dockerd that xtask started, if one runs.
pub fn stop_owned_engine() {
    if let Some(pid) = owned_engine_pid() {
        terminate_engine(pid);
    }
}

/// SIGTERM to a dockerd xtask started, then waits for it (and reaps what it leaves).
fn terminate_engine(pid: u32) {
    let Ok(pid_i) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: signalling the dockerd we started (its pidfile names it).
    unsafe { libc::kill(pid_i, libc::SIGTERM) };
    let t = Instant::now();
    while alive(pid) && t.elapsed() < Duration::from_secs(30) {
        crate::util::reap();
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::util::reap_all(Duration::from_secs(15));
}

/// (Re)starts xtask's own dockerd of `engine` with the userland proxy on or off, detached,
/// and waits until it answers. Containers with `--restart always` come back with it.
pub fn restart_engine(engine: Engine, userland_proxy: bool) -> Result<()> {
    restart_engine_with(engine, userland_proxy, &[])
}

/// As [`restart_engine`], with `extra` options for dockerd (`--iptables=false`).
pub fn restart_engine_with(engine: Engine, userland_proxy: bool, extra: &[&str]) -> Result<()> {
    // The engine's own configuration: the operator's /etc/docker/daemon.json (which may set
    // the userland proxy, as docs/install.md suggests) is neither read nor touched.
    let conf = std::path::Path::new(BENCH_CONFIG);
    if let Some(dir) = conf.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(conf, "{}\n").with_context(|| format!("writing {BENCH_CONFIG}"))?;
    stop_owned_engine();
    if engine_up() {
        bail!("a Docker engine that xtask did not start answers on {SOCKET}");
    }
    prepare_host(engine)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .with_context(|| format!("opening {LOG}"))?;
    let mut cmd = Command::new("setsid");
    if let Some(path) = engine.path_env()? {
        cmd.env("PATH", path);
    }
    let ok = cmd
        .args([
            "--fork",
            "dockerd",
            "--config-file",
            BENCH_CONFIG,
            &format!("--userland-proxy={userland_proxy}"),
        ])
        .args(extra)
        .args(dockerd_args(engine))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("starting dockerd")?
        .success();
    if !ok {
        bail!("starting dockerd failed; see {LOG}");
    }
    let t = Instant::now();
    while !engine_up() {
        if t.elapsed() > Duration::from_mins(1) {
            bail!("dockerd did not answer within 60 s; see {LOG}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
