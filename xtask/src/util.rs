//! Small process helpers shared by the xtask commands.

use std::{
    env,
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// The cargo that runs this xtask (rustup's), in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(project_root());
    c
}

/// `$CARGO_HOME/bin` (where bpf-linker is installed) first in PATH.
pub fn path_with_cargo_bin() -> OsString {
    let mut parts = vec![cargo_bin()];
    if let Some(p) = env::var_os("PATH") {
        parts.extend(env::split_paths(&p));
    }
    env::join_paths(parts).expect("PATH entries contain no separator")
}

pub fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; an error if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    if run_status(cmd)? {
        Ok(())
    } else {
        bail!("`{}` failed", describe(cmd))
    }
}

/// Runs a command with inherited stdio; whether it succeeded.
pub fn run_status(cmd: &mut Command) -> Result<bool> {
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    Ok(status.success())
}

/// Runs a command quietly; its stdout when it succeeded.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} must run as root (BPF programs, cgroups, namespaces and Docker)");
    }
    Ok(())
}

/// Lets Ctrl-C go to a foreground child only: xtask waits for it to exit.
pub fn ignore_sigint() {
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// Times a step and prints how long it took (`setup` reports each step's cost).
pub fn timed<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f();
    println!("xtask: {name}: {:.1}s", t.elapsed().as_secs_f64());
    r
}

/// Makes this process the reaper of its orphaned descendants (a dockerd that a test
/// restarted detached, containerd), so none is left behind as a zombie.
pub fn become_subreaper() {
    // SAFETY: prctl with these arguments only changes this process's own attribute.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reaps every exited child without blocking.
pub fn reap() {
    loop {
        // SAFETY: waitpid with WNOHANG on any child; no memory is passed.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

/// Reaps children until none is left (or `timeout`): containerd outlives dockerd briefly.
pub fn reap_all(timeout: std::time::Duration) {
    let t = Instant::now();
    while t.elapsed() < timeout {
        // SAFETY: as in `reap`.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r < 0 {
            return; // ECHILD: no children left
        }
        if r == 0 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
