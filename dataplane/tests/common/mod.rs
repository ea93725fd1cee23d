//! Helpers for the privileged tests: guards that clean up on drop, also when a test fails.
#![expect(dead_code, reason = "each test file uses a different subset")]

use std::{
    fs,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Runs a command; panics with its stderr when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = cmd(args);
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn cmd(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", args[0]))
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    dataplane::bpf::cgroup2_mount_in(&mounts).expect("a cgroup2 mount")
}

/// A child cgroup of the cgroup2 root, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        let _ = fs::remove_dir(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A command whose process joins this cgroup before it execs.
    pub fn command(&self, program: &str) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut c = Command::new(program);
        // SAFETY: only async-signal-safe work between fork and exec: open, write, close.
        unsafe {
            c.pre_exec(move || {
                let mut f = fs::OpenOptions::new().write(true).open(&procs)?;
                f.write_all(b"0")
            });
        }
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes we put here have exited by now; retry briefly while the kernel reaps.
        let t = Instant::now();
        while fs::remove_dir(&self.path).is_err() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A network namespace, deleted (with its veth peer) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Self {
        let _ = cmd(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Self { name: name.into() }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay in it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = cmd(&["ip", "netns", "del", &self.name]);
    }
}

/// A host-side veth into `ns`: host gets `host_cidr`, the namespace `ns_cidr`. Deleted
/// on drop.
pub struct Veth(String);

impl Veth {
    pub fn new(ns: &NetNs, host_if: &str, host_cidr: &str, ns_cidr: &str) -> Self {
        let _ = cmd(&["ip", "link", "del", host_if]);
        veth(ns, host_if, host_cidr, ns_cidr);
        Self(host_if.into())
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = cmd(&["ip", "link", "del", &self.0]);
    }
}

fn veth(ns: &NetNs, host_if: &str, host_cidr: &str, ns_cidr: &str) {
    let peer = format!("{host_if}p");
    sh(&[
        "ip", "link", "add", host_if, "type", "veth", "peer", "name", &peer, "netns", &ns.name,
    ]);
    sh(&["ip", "addr", "add", host_cidr, "dev", host_if]);
    sh(&["ip", "link", "set", host_if, "up"]);
    sh(&["ip", "-n", &ns.name, "addr", "add", ns_cidr, "dev", &peer]);
    sh(&["ip", "-n", &ns.name, "link", "set", &peer, "up"]);
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Number of `nf_conntrack` entries in the host namespace. Unreadable is a failure, never
/// a zero that would make a "no growth" check pass.
pub fn conntrack_count() -> u64 {
    let text = fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .expect("reading nf_conntrack_count (is nf_conntrack loaded?)");
    text.trim().parse().expect("nf_conntrack_count is a number")
}

/// A Python client script run with `python3 -c`, printing one line per result.
pub const PY_CLIENT: &str = r"
import socket, sys
def tcp(host, port, src=None, v6only=False):
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    if v6only:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if src:
        s.bind((src, 0))
    try:
        s.connect((host, port))
    except OSError as e:
        print('error', e.errno); return
    s.sendall(b'ping\n')
    data = s.recv(100).decode().strip()
    print('ok', data, s.getpeername()[0], s.getpeername()[1])
    s.close()
def udp(host, port, connected):
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    if connected:
        s.connect((host, port)); s.send(b'ping')
        data = s.recv(100); src = s.getpeername()
    else:
        s.sendto(b'ping', (host, port))
        data, src = s.recvfrom(100)
    print('ok', data.decode().strip(), src[0], src[1])
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == 'tcp': tcp(host, port)
    elif kind == 'tcp-from-loopback': tcp(host, port, src='::1' if ':' in host else '127.0.0.1')
    elif kind == 'tcp-v6only': tcp(host, port, v6only=True)
    else: udp(host, port, kind == 'udpc')
except OSError as e:
    print('error', e.errno)
";

/// Backend servers in the namespace answer `backend <client address>`.
pub fn serve(ns: &NetNs, ip: &str) {
    use std::io::BufRead;
    let tcp_addr = format!("{ip}:8080");
    let udp_addr = format!("{ip}:8081");
    let (tcp, udp) = ns.run(move || {
        (
            std::net::TcpListener::bind(&tcp_addr).unwrap(),
            std::net::UdpSocket::bind(&udp_addr).unwrap(),
        )
    });
    std::thread::spawn(move || {
        for s in tcp.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().unwrap();
            let mut line = String::new();
            let _ = std::io::BufReader::new(&s).read_line(&mut line);
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
