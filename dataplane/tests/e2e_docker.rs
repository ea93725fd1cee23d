//! End-to-end: a real Docker engine, the test image built from a tarball, the agent binary
//! attached at the cgroup2 root, and real clients. `cargo xtask test` provides the engine,
//! the image (`DATAPLANE_TEST_IMAGE`) and the binaries (`DATAPLANE_BIN_DIR`).

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Proc, cmd, sh, wait_until};

fn image() -> String {
    std::env::var("DATAPLANE_TEST_IMAGE").expect("DATAPLANE_TEST_IMAGE (run via cargo xtask test)")
}

fn bin(name: &str) -> PathBuf {
    PathBuf::from(std::env::var("DATAPLANE_BIN_DIR").expect("DATAPLANE_BIN_DIR")).join(name)
}

/// A port unlikely to be in use, distinct per test.
fn port(test: u16) -> u16 {
    let pid = u16::try_from(std::process::id() % 1000).unwrap();
    20_000 + pid * 10 + test
}

/// The agent, running until dropped, with its own control socket.
struct Agent {
    _proc: Proc,
    dir: PathBuf,
}

impl Agent {
    fn start(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/run/dataplane-e2e-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(bin("dataplane"))
            .arg("run")
            .arg("--socket")
            .arg(dir.join("ctl.sock"))
            .env("RUST_LOG", "info,dataplane=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        let agent = Self {
            _proc: Proc(child),
            dir,
        };
        wait_until("the agent to be ready", Duration::from_secs(30), || {
            agent.ctl(&["status"]).status.success()
        });
        agent
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("bridge-ctl"))
            .arg("--socket")
            .arg(self.dir.join("ctl.sock"))
            .args(args)
            .output()
            .expect("bridge-ctl")
    }

    fn frontends(&self) -> String {
        String::from_utf8_lossy(&self.ctl(&["frontends"]).stdout).into_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn run(name: &str, args: &[&str]) -> Self {
        let name = format!("dpe2e-{}-{name}", std::process::id());
        let _ = cmd(&["docker", "rm", "-f", &name]);
        let mut all = vec![
            "docker",
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "dataplane.test=1",
        ];
        all.extend_from_slice(args);
        sh(&all);
        Self { name }
    }

    fn ip(&self) -> String {
        sh(&[
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.name,
        ])
        .trim()
        .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = cmd(&["docker", "rm", "-f", &self.name]);
    }
}

fn httpd(name: &str, publish: &str) -> Container {
    let img = image();
    Container::run(
        name,
        &["-p", publish, &img, "httpd", "-f", "-p", "80", "-h", "/www"],
    )
}

fn curl(url: &str) -> String {
    let out = cmd(&["curl", "-sS", "--max-time", "5", url]);
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel's view of a connected socket (`ss`), not what `getpeername()` says.
fn kernel_peer(s: &TcpStream) -> String {
    let local = s.local_addr().unwrap();
    let out = sh(&[
        "ss",
        "-tnH",
        "state",
        "established",
        "src",
        &local.to_string(),
    ]);
    out.split_whitespace().last().unwrap_or("").to_string()
}

fn no_docker_proxy_for(port: u16) {
    let out = cmd(&["pgrep", "-af", "docker-proxy"]);
    let procs = String::from_utf8_lossy(&out.stdout);
    assert!(
        !procs.contains(&format!("-host-port {port}")),
        "a docker-proxy serves port {port}: {procs}"
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn published_port_is_served_from_the_kernel() {
    let p = port(1);
    let c = httpd("web", &format!("{p}:80"));
    let cip = c.ip();
    let agent = Agent::start("a");
    assert!(
        agent.frontends().contains(&format!("0.0.0.0:{p}/tcp")),
        "{}",
        agent.frontends()
    );

    // A real client.
    assert_eq!(
        curl(&format!("http://127.0.0.1:{p}/")),
        "dataplane test backend\n"
    );

    // The socket is connected straight to the container: no proxy, no DNAT in between.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_eq!(kernel_peer(&s), format!("{cip}:80"));
    assert_eq!(s.peer_addr().unwrap().to_string(), format!("127.0.0.1:{p}"));
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.ends_with("dataplane test backend\n"), "{body}");
    no_docker_proxy_for(p);

    let status = agent.ctl(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("state:        ready"), "{text}");
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn containers_started_and_stopped_under_a_running_agent() {
    let p = port(2);
    let agent = Agent::start("b");
    let c = httpd("late", &format!("127.0.0.1:{p}:80"));
    wait_until("the frontend to appear", Duration::from_secs(10), || {
        agent.frontends().contains(&format!("127.0.0.1:{p}/tcp"))
    });
    let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_eq!(kernel_peer(&s), format!("{}:80", c.ip()));
    drop(s);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{p}/")),
        "dataplane test backend\n"
    );

    sh(&["docker", "stop", "-t", "1", &c.name]);
    wait_until("the frontend to go", Duration::from_secs(10), || {
        !agent.frontends().contains(&format!("127.0.0.1:{p}/tcp"))
    });
    let json = agent.ctl(&["frontends", "--json"]);
    assert!(json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|f| f["container"] != c.name.as_str())
    );
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn bridge_ctl_without_an_agent_fails_clearly() {
    let out = Command::new(bin("bridge-ctl"))
        .args(["--socket", "/run/dataplane-e2e-none/ctl.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent is not running"), "{err}");
}
