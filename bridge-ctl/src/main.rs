//! `bridge-ctl`: asks the dataplane agent what it is doing, over its root-only socket.

mod top;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use dataplane_api::{AskError, Egress, EgressChange, Frontend, Status, Versioned, VersionedList};

const EXIT_CODES: &str = "\
Exit codes:
  0  done (for `status`: the agent is ready and translating)
  1  the agent answered, but is not ready (`status`) or refused the request (a malformed
     egress change, an unknown container)
  2  no agent could be reached: no socket, a stale socket, or not root
  64 wrong usage (an unknown flag or command)

With --json every command prints one JSON object with \"api_version\" (1) and \"kind\" beside its
fields (status, egress set) or beside \"items\" (frontends, egress show). Within a version
fields are only added; see the dataplane-api crate for the types.";

#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
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
    Frontends {
        /// Only this container's (name or ID prefix).
        #[arg(long)]
        container: Option<String>,
        /// Only bindings of this published port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// A live view: frontends with connection rates, the kernel counters and their rates,
    /// sync latency. Refreshes until `q` or Ctrl-C.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Shell completions for bridge-ctl, printed to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff), printed to stdout.
    #[command(hide = true)]
    Man,
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
const EXIT_USAGE: u8 = 64;

fn print_json<T: serde::Serialize>(kind: &str, data: T) {
    println!(
        "{}",
        serde_json::to_string(&Versioned::new(kind, data)).unwrap_or_default()
    );
}

fn print_json_list<T: serde::Serialize>(kind: &str, items: Vec<T>) {
    println!(
        "{}",
        serde_json::to_string(&VersionedList::new(kind, items)).unwrap_or_default()
    );
}

/// Whether a frontend passes `--container` (name or ID prefix) and `--port`.
fn selected(f: &Frontend, container: Option<&str>, port: Option<u16>) -> bool {
    let by_container = container.is_none_or(|c| {
        let c = c.trim_start_matches('/');
        f.container == c || (c.len() >= 3 && f.container_id.starts_with(c))
    });
    let by_port = port.is_none_or(|p| {
        f.frontend
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|n| n.parse::<u16>().ok())
            == Some(p)
    });
    by_container && by_port
}

fn main() -> ExitCode {
    // `bridge-ctl frontends | head` ends quietly, as a Unix filter should, instead of
    // panicking on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
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
                    print_json("status", &s);
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
        Cmd::Frontends { container, port } => match dataplane_api::frontends(&cli.socket) {
            Ok(mut f) => {
                f.retain(|f| selected(f, container.as_deref(), port));
                if cli.json {
                    print_json_list("frontends", f);
                } else {
                    print_frontends(&f);
                }
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        },
        Cmd::Top { interval } => top::run(&cli.socket, interval),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bridge-ctl",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Cmd::Man => match man_page(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Cmd::Egress(cmd) => egress(&cli.socket, cli.json, cmd, failed),
    }
}

fn egress(
    socket: &std::path::Path,
    json: bool,
    cmd: EgressCmd,
    failed: impl Fn(&AskError) -> ExitCode,
) -> ExitCode {
    match cmd {
        EgressCmd::Show { container } => {
            match dataplane_api::egress_show(socket, container.as_deref()) {
                Ok(list) => {
                    if json {
                        print_json_list("egress", list);
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
        EgressCmd::Set {
            container,
            internet,
            host,
            allow,
            reset,
        } => {
            let change = EgressChange {
                container,
                reset,
                internet,
                host,
                allow,
            };
            match dataplane_api::egress_set(socket, change) {
                Ok(e) => {
                    if json {
                        print_json("egress", &e);
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
    if let Some(why) = &e.not_enforceable {
        println!("  NOT ENFORCEABLE: {why}");
    }
    if let Some(x) = &e.policy_of {
        println!("  policy:    that of {x} (it shares its network namespace)");
    }
    if !e.ports.is_empty() {
        println!(
            "  ports:     {} (judged by these bridge ports)",
            e.ports.join(" ")
        );
    }
    println!("  dropped:   {} packets", e.dropped_packets);
    if !e.ports.is_empty() || e.spoofed_packets > 0 {
        println!(
            "  spoofed:   {} packets (a source not its own, dropped)",
            e.spoofed_packets
        );
    }
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
    println!(
        "metrics:      {}",
        s.metrics
            .as_deref()
            .unwrap_or("off (set [metrics] listen in the config file)")
    );
    if !s.config_file.is_empty() {
        println!(
            "config:       {} (loaded {})",
            s.config_file,
            ago(s.config_loaded_unix_ms)
        );
    }
    if let Some(e) = &s.config_error {
        println!("config reload rejected, the loaded config stays: {e}");
    }
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
    print_mode(s);
    print_packet_layer(s);
    if !s.kernel.is_empty() {
        let degraded: Vec<_> = s.features.iter().filter(|f| f.state != "active").collect();
        println!(
            "kernel:       {} ({} of {} features active)",
            s.kernel,
            s.features.len() - degraded.len(),
            s.features.len()
        );
        for f in degraded {
            println!(
                "  {}: {} (needs {}): {}",
                f.state, f.name, f.since, f.effect
            );
        }
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

fn print_mode(s: &Status) {
    match &s.own_firewall {
        Some(f) => {
            println!(
                "mode:         own-firewall (Docker's iptables rules off; the agent's table inet {} publishes, masquerades and isolates)",
                f.table
            );
            println!(
                "  {} networks, {} published bindings, {} operator rules (chain operator), written {}",
                f.networks,
                f.published,
                f.operator_rules,
                ago(f.written_unix_ms)
            );
            if let Some(e) = &f.error {
                println!("  last write failed (the table stays as it was): {e}");
            }
        }
        None if s.mode.is_empty() => {}
        None => println!(
            "mode:         {} (Docker's own rules publish, masquerade and isolate)",
            s.mode
        ),
    }
    if let Some(w) = &s.docker_settings_warning {
        println!("  warning: {w}");
    }
}

fn print_packet_layer(s: &Status) {
    let dnat = if s.own_firewall.is_some() {
        "the agent's DNAT"
    } else {
        "Docker's DNAT"
    };
    match &s.packet_layer {
        None => println!("external clients: {dnat} (packet layer off)"),
        Some(p) if p.standing_back.is_some() => println!(
            "external clients: {dnat} (the packet layer stands back: the host's \
             firewall has rules for forwarded traffic, at {})",
            p.standing_back.as_deref().unwrap_or_default()
        ),
        Some(p) => {
            println!(
                "external clients: translated on {} ({}), for {}; their packets skip the \
                 host's firewall rules",
                if p.uplinks.is_empty() {
                    "no interface yet".to_string()
                } else {
                    p.uplinks.join(", ")
                },
                p.attach,
                p.allow.join(", ")
            );
            println!(
                "  {} container addresses, {} container veths, {} of {} flows",
                p.endpoints, p.container_veths, p.flows, p.flow_capacity
            );
            for e in &p.errors {
                println!("  not attached: {e}");
            }
        }
    }
}

pub(crate) fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
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

/// The manual page: the command's own, then one per subcommand (`bridge-ctl-<sub>`), in one
/// roff document, so `man bridge-ctl` says everything `--help` does.
fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    clap_mangen::Man::new(cmd.clone())
        .section("1")
        .render(out)?;
    subcommand_pages(&cmd, "bridge-ctl", out)
}

fn subcommand_pages(
    cmd: &clap::Command,
    prefix: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{prefix}-{}", sub.get_name());
        clap_mangen::Man::new(sub.clone().name(name.clone()))
            .section("1")
            .render(out)?;
        subcommand_pages(sub, &name, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fe(frontend: &str, container: &str, id: &str) -> Frontend {
        Frontend {
            frontend: frontend.into(),
            container: container.into(),
            container_id: id.into(),
            ..Frontend::default()
        }
    }

    #[test]
    fn frontends_are_filtered_by_container_and_port() {
        let a = fe("0.0.0.0:8080/tcp", "web", "0123456789ab");
        let b = fe("[::]:53/udp", "dns", "fedcba987654");
        assert!(selected(&a, None, None));
        assert!(selected(&a, Some("web"), Some(8080)));
        assert!(selected(&a, Some("0123"), None));
        assert!(!selected(&a, Some("01"), None), "too short a prefix");
        assert!(!selected(&a, Some("dns"), None));
        assert!(!selected(&a, None, Some(80)));
        assert!(selected(&b, None, Some(53)));
        assert!(selected(&b, Some("/dns"), Some(53)));
    }

    #[test]
    fn the_cli_is_well_formed_and_usage_errors_are_64() {
        Cli::command().debug_assert();
        let e = Cli::try_parse_from(["bridge-ctl", "frontends", "--bogus"])
            .err()
            .unwrap();
        assert!(e.use_stderr());
        let json = serde_json::to_string(&VersionedList::new("frontends", vec![fe("a", "b", "c")]))
            .unwrap();
        assert!(
            json.starts_with("{\"api_version\":1,\"kind\":\"frontends\",\"items\":["),
            "{json}"
        );
        let st = Status {
            metrics: Some("http://127.0.0.1:9477/metrics".into()),
            ..Status::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&Versioned::new("status", &st)).unwrap())
                .unwrap();
        assert_eq!(v["api_version"], 1);
        assert_eq!(v["kind"], "status");
        assert_eq!(v["metrics"], "http://127.0.0.1:9477/metrics");
        let back: Versioned<Status> = serde_json::from_value(v).unwrap();
        assert_eq!(back.data, st);
    }
}
