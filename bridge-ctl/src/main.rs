//! `bridge-ctl`: asks the dataplane agent what it is doing, over its root-only socket.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use dataplane_api::{AskError, Egress, EgressChange, Frontend, Status};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, default_value = dataplane_api::DEFAULT_SOCKET)]
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
    /// Per-container egress policy: what a container may initiate.
    #[command(subcommand)]
    Egress(EgressCmd),
}

#[derive(Subcommand)]
enum EgressCmd {
    /// The policy of every container the agent knows (or of one): internet and host
    /// access, the allow-list and what its names resolve to, dropped packets.
    Show {
        /// Container name or ID (prefix).
        container: Option<String>,
    },
    /// Changes a container's policy now, for its life (until it is removed), across agent
    /// restarts. Returns once the kernel enforces it; a malformed entry changes nothing.
    Set {
        /// Container name or ID (prefix).
        container: String,
        /// Whether it may open connections out of the host.
        #[arg(long)]
        internet: Option<bool>,
        /// Whether it may open connections to the host and other containers.
        #[arg(long)]
        host: Option<bool>,
        /// Allow-list entries (replacing the labels'), comma-separated or repeated:
        /// CIDR, CIDR:port[/proto], [IPv6]:port[/proto], hostname[:port][/proto],
        /// container:NAME[:port][/proto]. An empty value clears it.
        #[arg(long)]
        allow: Option<Vec<String>>,
        /// Drop earlier runtime changes first (back to the labels and the config).
        #[arg(long)]
        reset: bool,
    },
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
    let failed = |e: &AskError| {
        eprintln!("bridge-ctl: {e}");
        if e.unreachable() {
            ExitCode::from(EXIT_NO_AGENT)
        } else {
            ExitCode::FAILURE
        }
    };
    match cli.cmd {
        Cmd::Status => match dataplane_api::status(&cli.socket) {
            Ok(s) => {
                if cli.json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    print_status(&s);
                }
                if s.ready {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_NOT_READY)
                }
            }
            Err(e) => failed(&e),
        },
        Cmd::Frontends => match dataplane_api::frontends(&cli.socket) {
            Ok(f) => {
                if cli.json {
                    println!("{}", serde_json::to_string(&f).unwrap_or_default());
                } else {
                    print_frontends(&f);
                }
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        },
        Cmd::Egress(EgressCmd::Show { container }) => {
            match dataplane_api::egress_show(&cli.socket, container.as_deref()) {
                Ok(list) => {
                    if cli.json {
                        println!("{}", serde_json::to_string(&list).unwrap_or_default());
                    } else {
                        for e in &list {
                            print_egress(e);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e),
            }
        }
        Cmd::Egress(EgressCmd::Set {
            container,
            internet,
            host,
            allow,
            reset,
        }) => {
            let change = EgressChange {
                container,
                reset,
                internet,
                host,
                allow,
            };
            match dataplane_api::egress_set(&cli.socket, change) {
                Ok(e) => {
                    if cli.json {
                        println!("{}", serde_json::to_string(&e).unwrap_or_default());
                    } else {
                        print_egress(&e);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e),
            }
        }
    }
}

fn print_egress(e: &Egress) {
    let yes_no = |b: bool| if b { "allowed" } else { "denied" };
    println!("{} ({})", e.container, e.container_id);
    println!("  internet:  {}", yes_no(e.internet));
    println!(
        "  host:      {} (the host and other containers)",
        yes_no(e.host)
    );
    if let Some(err) = &e.error {
        println!("  error:     {err} (nothing allowed: fail closed)");
    }
    if e.allow.is_empty() {
        println!("  allow:     -");
    } else {
        println!("  allow:     {}", e.allow.join(", "));
    }
    for (name, r) in &e.resolved {
        println!("    {name} -> {r}");
    }
    println!(
        "  addresses: {}",
        if e.addresses.is_empty() {
            "- (not running)".to_string()
        } else {
            e.addresses.join(" ")
        }
    );
    if e.runtime_change {
        println!("  runtime change in force (bridge-ctl egress set --reset drops it)");
    }
    println!("  dropped:   {} packets", e.dropped_packets);
}

fn print_status(s: &Status) {
    println!(
        "state:        {}",
        if s.ready { "ready" } else { "starting" }
    );
    println!("agent:        {}", s.version);
    println!(
        "docker:       {} (firewall backend: {})",
        s.docker_version, s.docker_firewall_backend
    );
    println!(
        "last sync:    {}",
        if s.last_sync_unix_ms > 0 {
            ago(s.last_sync_unix_ms)
        } else {
            "never".into()
        }
    );
    if let Some(ms) = s.ready_ms() {
        println!("started in:   {ms:.1} ms");
    }
    println!("containers:   {}", s.containers);
    println!("frontends:    {}", s.frontends);
    println!("local addrs:  {}", s.local_addresses);
    if let Some(why) = &s.translation_off {
        println!("translation:  off, every client takes Docker's own path: {why}");
    }
    match &s.container_clients_off {
        Some(why) => println!("container clients: Docker's own path: {why}"),
        None => println!(
            "container clients: translated ({} network namespaces, to backends on their networks)",
            s.container_clients
        ),
    }
    match &s.host_clients_tracked {
        Some(why) => println!("host clients: translated, tracked by conntrack: {why}"),
        None => println!("host clients: translated, untracked"),
    }
    println!("attached:");
    for a in &s.attach_points {
        println!("  {a}");
    }
    println!("counters:");
    for (k, n) in &s.counters {
        println!("  {k:<22} {n}");
    }
    if !s.errors.is_empty() {
        println!("errors:");
        for e in &s.errors {
            println!("  {e}");
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

fn print_frontends(fs: &[Frontend]) {
    let rows: Vec<[String; 5]> = fs
        .iter()
        .map(|f| {
            let pause = match (f.on_pause.as_str(), f.paused) {
                ("reset", true) => "reset (paused: refusing)".to_string(),
                (p, _) => p.to_string(),
            };
            [
                f.frontend.clone(),
                f.container.clone(),
                f.backend.clone(),
                f.connections.to_string(),
                pause,
            ]
        })
        .collect();
    let head = [
        "FRONTEND",
        "CONTAINER",
        "BACKEND",
        "CONNECTIONS",
        "ON PAUSE",
    ];
    let w: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: [&str; 5]| {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
}
