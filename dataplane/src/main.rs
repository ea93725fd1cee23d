//! `dataplane`: publishes Docker container ports from the kernel, without docker-proxy.

use std::{
    fs::File,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use dataplane::{agent, report::api};
use tracing_subscriber::EnvFilter;

const EXIT_CODES: &str = "\
Exit codes of `dataplane run` (for supervisors):
  0  stopped by SIGINT or SIGTERM
  1  any other failure
  2  the config file is invalid (the line and the reason are printed)
  3  another agent is running (or another agent's programs are pinned and attached)
  4  the environment: no cgroup2 or bpffs mount, not root, a pin directory that is not root's
  5  the kernel refused to load or attach a program
  6  Docker's API could not be reached
  7  --own-firewall, and Docker's settings disagree (its iptables rules or userland proxy on)
`dataplane uninstall`: 0 done, 1 something could not be removed, 3 an agent is running.

Signals: SIGHUP reloads the config file (a file that does not validate is rejected and the
running config stays); SIGTERM and SIGINT stop the agent (pinned programs stay, translating
nothing new until an agent runs again).";

#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the kernel programs, sync with Docker, serve bridge-ctl; runs in the
    /// foreground until SIGINT or SIGTERM. Translation stops with the process (new
    /// connections take Docker's own path until an agent runs again); connections made
    /// stay as they are.
    Run {
        /// Docker engine socket.
        #[arg(long, default_value = "/var/run/docker.sock")]
        docker_socket: String,
        /// Control socket for bridge-ctl (created with mode 0600).
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// cgroup v2 directory to attach to (default: the cgroup2 mount's root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Seconds between full resyncs with Docker (repairs any drift).
        #[arg(long, default_value_t = 60)]
        resync_interval: u64,
        /// nftables table (family inet) for the notrack rules; removed when an unpinned agent
        /// stops.
        #[arg(long, default_value = dataplane::netfilter::notrack::TABLE)]
        nft_table: String,
        /// iptables chain that earlier versions jumped to from Docker's DOCKER-USER; removed
        /// at start where it is found (nothing is added to Docker's chains any more).
        #[arg(long, default_value = dataplane::netfilter::legacy::CHAIN)]
        fwd_chain: String,
        /// bpffs directory for the pinned maps and links: they stay attached while the agent
        /// is stopped or restarting (translating nothing new until an agent runs and vouches
        /// for them again), and the next agent adopts them.
        #[arg(long, default_value = dataplane::bpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pin nothing: everything is detached and removed when the agent stops.
        #[arg(long)]
        no_pin: bool,
        /// Published bindings (address:port/proto) the maps hold; beyond that, bindings
        /// are left to Docker's own path and `bridge-ctl status` says how many. Applies to
        /// maps created by this start (pinned maps keep their size until `uninstall`).
        #[arg(long, default_value_t = dataplane_common::FRONTENDS_MAX)]
        max_frontends: u32,
        /// Config file (egress defaults and profiles, the on-pause default); a missing file
        /// means the defaults.
        #[arg(long, default_value = dataplane::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where runtime egress changes are kept across agent restarts.
        #[arg(long, default_value = "/var/lib/dataplane")]
        state_dir: PathBuf,
        /// Translate external clients' packets to published ports on the host's interfaces
        /// (no DNAT, no conntrack), for the clients --packet-allow names. Their packets skip
        /// the host's iptables/nftables rules: see docs/security.md. Also
        /// `[packet_layer] enabled` in the config file.
        #[arg(long)]
        packet_layer: bool,
        /// A client prefix the packet layer translates (repeatable; added to the config
        /// file's `[packet_layer] allow`); every other client keeps Docker's DNAT.
        #[arg(long, value_name = "PREFIX")]
        packet_allow: Vec<String>,
        /// Flows the packet layer's flow map holds (default 65536); beyond that, the least
        /// recently used flows are dropped from it and continue on Docker's path.
        #[arg(long, value_name = "N")]
        packet_flows: Option<u32>,
        /// The own-firewall mode: Docker runs with its iptables rules off (`dataplane
        /// docker-config`) and the agent publishes ports, masquerades and isolates networks
        /// from its own nftables table (`inet <nft-table>_fw`, with the chain `operator` for
        /// the operator's own rules). Also `[own_firewall] enabled` in the config file.
        #[arg(long)]
        own_firewall: bool,
    },
    /// Shows the daemon.json change the own-firewall mode needs ("iptables", "ip6tables" and
    /// "userland-proxy" false); --apply writes it (keeping the file as it was), --undo puts
    /// the file back. Docker must be restarted for either to take effect.
    DockerConfig {
        /// Docker's config file.
        #[arg(long, default_value = dataplane::ownfw::docker_conf::DEFAULT_DAEMON_JSON)]
        file: PathBuf,
        /// Write the change (the file before it is kept as <file>.before-dataplane).
        #[arg(long, conflicts_with = "undo")]
        apply: bool,
        /// Put back the file as it was before --apply.
        #[arg(long)]
        undo: bool,
    },
    /// Remove everything the agent installed: pinned links (detaching the programs) and
    /// maps, the nftables table, the iptables chain. Run it with the agent stopped.
    Uninstall {
        #[arg(long, default_value = dataplane::bpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = dataplane::netfilter::notrack::TABLE)]
        nft_table: String,
        #[arg(long, default_value = dataplane::netfilter::legacy::CHAIN)]
        fwd_chain: String,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Accepted so `uninstall` takes the flags `run` took; not read.
        #[arg(long, default_value = dataplane::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Runtime egress changes kept here are removed.
        #[arg(long, default_value = "/var/lib/dataplane")]
        state_dir: PathBuf,
    },
    /// Checks a config file as `run` and `SIGHUP` would, and says what is wrong (line and
    /// reason). Exits 0 when it is valid, 2 when not.
    CheckConfig {
        #[arg(default_value = dataplane::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Probes the running kernel for every feature the agent uses (as `run` does at its
    /// start) and lists each: active, degraded (what is lost), or missing. Exits 0 when the
    /// agent can run here, 5 when a feature it needs is missing, 4 when not run as root.
    Features,
    /// Shell completions for dataplane, printed to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff), printed to stdout.
    #[command(hide = true)]
    Man,
}

/// Exit codes a supervisor can act on (see also `agent::StartError::exit_code`: 4 the
/// environment, 5 the kernel, 6 Docker).
const EXIT_FAILURE: u8 = 1;
const EXIT_ALREADY_RUNNING: u8 = 3;
const EXIT_CONFIG: u8 = 2;
const EXIT_ENV: u8 = 4;
const EXIT_KERNEL: u8 = 5;

/// One agent per host, whatever its flags (socket, pin directory, `--no-pin`): it holds this
/// lock for its lifetime; `uninstall` takes it too.
const LOCK: &str = "/run/dataplane.lock";

/// glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps
/// what it frees there: the agent's short bursts on many threads (inspects, namespace
/// reads, ruleset reads) left it three to four times its live heap: 97-119 MB of RSS after
/// 300 container starts (heaptrack: a live heap under 32 MB), 60 MB with two arenas, 37 MB
/// with one. Its threads allocate little at a time: one arena.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(target_env = "gnu"))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => check_config(&config),
        Cmd::Features => features(),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "dataplane",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Cmd::Man => match man_page(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Cmd::Uninstall {
            pin_dir,
            nft_table,
            fwd_chain,
            socket,
            config: _,
            state_dir,
        } => uninstall(&pin_dir, &nft_table, &fwd_chain, &socket, &state_dir),
        Cmd::DockerConfig { file, apply, undo } => {
            match dataplane::ownfw::daemon_json::run(&file, apply, undo) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dataplane docker-config: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Cmd::Run {
            docker_socket,
            socket,
            cgroup,
            resync_interval,
            nft_table,
            fwd_chain,
            pin_dir,
            no_pin,
            max_frontends,
            config,
            state_dir,
            packet_layer,
            packet_allow,
            packet_flows,
            own_firewall,
        } => {
            let config_path = config;
            let packet_flags = dataplane::packet::Flags {
                on: packet_layer,
                allow: packet_allow,
                flows: packet_flows,
            };
            let config = match run_config(&config_path, &packet_flags) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("dataplane: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let own_firewall = own_firewall || config.own_firewall.enabled;
            let opts = agent::Options {
                own_firewall,
                docker_socket,
                cache_path: Some(socket.with_file_name(agent::CACHE_FILE)),
                api_socket: socket,
                cgroup,
                resync_interval: Duration::from_secs(resync_interval.max(1)),
                nft_table,
                fwd_chain,
                pin_dir: (!no_pin).then_some(pin_dir),
                max_frontends,
                config,
                config_path: Some(config_path),
                state_dir: Some(state_dir),
                packet_flags,
            };
            run_agent(opts)
        }
    }
}

/// Runs the agent, holding the one-agent lock, until it ends.
fn run_agent(opts: agent::Options) -> ExitCode {
    let _lock = match lock(Path::new(LOCK)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            return ExitCode::from(EXIT_ALREADY_RUNNING);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dataplane: starting the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(agent::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The config file `run` starts with, checked with the packet layer's flags.
fn run_config(
    path: &Path,
    packet: &dataplane::packet::Flags,
) -> Result<dataplane::config::Config, String> {
    let config = dataplane::config::Config::load(path).map_err(|e| format!("config: {e}"))?;
    dataplane::packet::settings(&config.packet_layer, packet)?;
    Ok(config)
}

fn features() -> ExitCode {
    let f = dataplane::features::Features::probe();
    println!("kernel: {}", f.kernel);
    for s in f.states() {
        println!("{:<9} {} (needs {})", s.state, s.name, s.since);
        if !s.effect.is_empty() {
            println!("          {}", s.effect);
        }
    }
    match f.check() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            ExitCode::from(if f.denied() { EXIT_ENV } else { EXIT_KERNEL })
        }
    }
}

fn check_config(config: &Path) -> ExitCode {
    match dataplane::config::Config::load(config) {
        Ok(_) => {
            println!("{}: valid", config.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dataplane: config: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn uninstall(
    pin_dir: &Path,
    nft_table: &str,
    fwd_chain: &str,
    socket: &Path,
    state_dir: &Path,
) -> ExitCode {
    let lock_path = Path::new(LOCK);
    let Ok(_lock) = lock(lock_path) else {
        eprintln!(
            "dataplane: stop the running agent first (it holds {})",
            lock_path.display()
        );
        return ExitCode::from(EXIT_ALREADY_RUNNING);
    };
    let mut failed = false;
    match dataplane::bpf::unpin_all(pin_dir) {
        Ok(removed) => {
            for r in removed {
                println!("removed {r}");
            }
        }
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            failed = true;
        }
    }
    for f in dataplane::packet::remove_filters() {
        println!("removed the packet layer's filter {f}");
    }
    match dataplane::netfilter::notrack::Notrack::new(nft_table).remove() {
        Ok(()) => println!("removed nftables table inet {nft_table}"),
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            failed = true;
        }
    }
    let egress_table = dataplane::netfilter::changes::egress_table(nft_table);
    match dataplane::netfilter::table::Table::<dataplane::egress::nft::Spec>::new(&egress_table)
        .remove()
    {
        Ok(()) => {
            println!("removed nftables tables inet and bridge {egress_table} (egress policies)");
        }
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            failed = true;
        }
    }
    match dataplane::ownfw::remove(nft_table) {
        Ok(()) => println!(
            "removed nftables table inet {nft_table}_fw (own-firewall mode), if it was there"
        ),
        Err(e) => {
            eprintln!("dataplane: {e:#}");
            failed = true;
        }
    }
    if dataplane::netfilter::legacy::remove_legacy(fwd_chain) {
        println!("removed iptables chain {fwd_chain} and its DOCKER-USER jump");
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(socket.with_file_name(agent::CACHE_FILE));
    let changes = state_dir.join("egress");
    if changes.exists() {
        match std::fs::remove_dir_all(&changes) {
            Ok(()) => println!("removed runtime egress changes in {}", changes.display()),
            Err(e) => {
                eprintln!("dataplane: removing {}: {e}", changes.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Holds an exclusive lock for the agent's lifetime: a second agent fails fast.
fn lock(path: &std::path::Path) -> Result<nix::fcntl::Flock<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .with_context(|| format!("opening {} (run as root)", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another dataplane agent is already running (it holds {})",
            path.display()
        )
    })
}

/// The manual page: the command's own, then one per subcommand (`dataplane-<sub>`), in one
/// roff document, so `man dataplane` says everything `--help` does.
fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(out)?;
    subcommand_pages(&cmd, "dataplane", out)
}

fn subcommand_pages(
    cmd: &clap::Command,
    prefix: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{prefix}-{}", sub.get_name());
        clap_mangen::Man::new(sub.clone().name(name.clone()))
            .section("8")
            .render(out)?;
        subcommand_pages(sub, &name, out)?;
    }
    Ok(())
}
