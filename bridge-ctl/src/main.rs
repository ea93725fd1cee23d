//! `bridge-ctl`: asks the dataplane agent what it is doing, over its root-only socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, default_value = "/run/dataplane/ctl.sock")]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Whether the agent is ready, what it attached, when it last synced, counts.
    /// Exits 0 only when the agent is ready.
    Status,
    /// Published address:port/proto -> container and backend address.
    Frontends,
}

/// Exit code when the agent cannot be reached, distinct from "reached but not ready".
const EXIT_NO_AGENT: u8 = 2;
const EXIT_NOT_READY: u8 = 1;

fn main() -> ExitCode {
    // `bridge-ctl frontends | head` ends quietly, as a Unix filter should, instead of
    // panicking on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let request = match cli.cmd {
        Cmd::Status => "status",
        Cmd::Frontends => "frontends",
    };
    let v = match ask(&cli.socket, request) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bridge-ctl: {e:#}");
            return ExitCode::from(EXIT_NO_AGENT);
        }
    };
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        eprintln!("bridge-ctl: the agent answered: {err}");
        return ExitCode::FAILURE;
    }
    if cli.json {
        println!("{v}");
    } else {
        match cli.cmd {
            Cmd::Status => print_status(&v),
            Cmd::Frontends => print_frontends(&v),
        }
    }
    if matches!(cli.cmd, Cmd::Status) && v["ready"] != Value::Bool(true) {
        return ExitCode::from(EXIT_NOT_READY);
    }
    ExitCode::SUCCESS
}

fn ask(socket: &Path, request: &str) -> Result<Value> {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the dataplane agent is not running (no socket at {}); start it with \
             `cargo xtask run` or `dataplane run`",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
            "the dataplane agent is not running (stale socket at {})",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied on {}: the control socket is root-only",
            socket.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("reading the agent's answer")?;
    serde_json::from_str(&line).context("the agent's answer is not JSON")
}

fn print_status(v: &Value) {
    let ready = v["ready"] == Value::Bool(true);
    println!("state:        {}", if ready { "ready" } else { "starting" });
    println!("agent:        {}", v["version"].as_str().unwrap_or("?"));
    println!(
        "docker:       {}",
        v["docker_version"].as_str().unwrap_or("?")
    );
    println!(
        "last sync:    {}",
        v["last_sync_unix_ms"]
            .as_u64()
            .filter(|t| *t > 0)
            .map_or_else(|| "never".to_string(), ago)
    );
    println!("containers:   {}", v["containers"]);
    println!("frontends:    {}", v["frontends"]);
    println!("local addrs:  {}", v["local_addresses"]);
    if let Some(why) = v["translation_off"].as_str() {
        println!("translation:  off, every client takes Docker's own path: {why}");
    }
    match v["container_clients_off"].as_str() {
        Some(why) => println!("container clients: Docker's own path: {why}"),
        None => println!(
            "container clients: translated ({} network namespaces, to backends on their networks)",
            v["container_clients"]
        ),
    }
    match v["host_clients_tracked"].as_str() {
        Some(why) => println!("host clients: translated, tracked by conntrack: {why}"),
        None => println!("host clients: translated, untracked"),
    }
    println!("attached:");
    for a in v["attach_points"].as_array().into_iter().flatten() {
        println!("  {}", a.as_str().unwrap_or("?"));
    }
    if let Some(c) = v["counters"].as_object() {
        println!("counters:");
        for (k, n) in c {
            println!("  {k:<22} {n}");
        }
    }
    let errors = v["errors"].as_array().map_or(&[][..], Vec::as_slice);
    if !errors.is_empty() {
        println!("errors:");
        for e in errors {
            println!("  {}", e.as_str().unwrap_or("?"));
        }
    }
}

fn ago(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let secs = now.saturating_sub(unix_ms) / 1000;
    format!("{secs}s ago")
}

fn print_frontends(v: &Value) {
    let rows: Vec<[String; 4]> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or("").to_string();
            [
                s("frontend"),
                s("container"),
                s("backend"),
                f["connections"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    let head = ["FRONTEND", "CONTAINER", "BACKEND", "CONNECTIONS"];
    let w: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: [&str; 4]| {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
}
