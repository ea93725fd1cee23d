//! `cargo xtask`: the single entry for setup, build, run, test and bench.

mod apt;
mod bench;
mod deb;
mod docker;
mod engines;
mod kernels;
mod leftovers;
mod setup;
mod util;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    engines::Engine,
    util::{project_root, run, run_status},
};

#[derive(Parser)]
#[command(about = "Setup, build, run and test the dataplane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (Debian packages, bpf-linker, Docker),
    /// mount bpffs. Idempotent; fast when everything is there.
    Setup,
    /// Build the eBPF object and the release binaries (dataplane, bridge-ctl).
    Build,
    /// Set up, build, make sure a Docker engine runs, and run the agent in the foreground.
    Run {
        /// The Docker engine to start when none runs: the host's, Debian's 20.10, 26.1
        /// or 28.5 (fetched once into target/engines), or 29.7 (`29`: iptables backend;
        /// `29-nft`: nftables backend; built once from ../shared/engines).
        #[arg(long, value_enum, default_value = "host")]
        engine: Engine,
        /// Run the binaries already built (no setup, no build).
        #[arg(long)]
        no_build: bool,
        /// Extra arguments for `dataplane run` (`cargo xtask run --own-firewall`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/deb/dataplane_<version>_<arch>.deb): the agent,
    /// bridge-ctl, the systemd unit, the config file, man pages and completions.
    Deb {
        /// Package the binaries of this commit instead of the working tree (built in a tree
        /// of its own under target/deb), e.g. to test an upgrade from it.
        #[arg(long)]
        rev: Option<String>,
    },
    /// Fetch or build a Docker engine into target/engines (the other commands do it when
    /// first needed): Debian's 26.1 or 28.5, or 29.7 built from ../shared/engines.
    Engine {
        #[arg(value_enum)]
        engine: Engine,
    },
    /// Build the test image (busybox, iperf3, socat, haproxy) as `dataplane-test:latest`
    /// and keep it, for trying things by hand.
    Image,
    /// Measure the dataplane against direct, docker-proxy and iptables NAT, in one run;
    /// writes bench/results/latest.md and latest.svg. Restarts xtask's own dockerd.
    Bench {
        /// A few minutes instead of about half an hour: fewer metrics, shorter runs.
        #[arg(long)]
        quick: bool,
        /// The Docker engine to measure with: the host's, Debian's 20.10, 26.1 or
        /// 28.5, or 29.7 (`29`: iptables backend; `29-nft`: nftables backend; built once from
        /// ../shared/engines).
        #[arg(long, value_enum, default_value = "host")]
        engine: Engine,
        /// Run one section only (for work on it): the paired comparisons, the extras
        /// (per-port cost, sync, egress, pause, stateful INPUT, start times), or the start
        /// times alone. The report then holds that section only.
        #[arg(long, value_enum)]
        only: Option<bench::Section>,
        /// Interleaved rounds of the paired comparisons (more rounds, narrower ranges).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Every test layer: lint, unit, netns integration, end-to-end with Docker.
    Test {
        /// The Docker engine for the end-to-end tests: the host's (or the running one),
        /// Debian's 20.10, 26.1 or 28.5 (fetched once into target/engines), or 29.7 (`29`:
        /// iptables backend; `29-nft`: nftables backend; built once from ../shared/engines).
        #[arg(long, value_enum, default_value = "host")]
        engine: Engine,
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only these layers (unit, integration, e2e); default all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Run the kernel-dependent layers (netns integration, an end-to-end smoke) in a
        /// VM booting Debian's 5.10, 6.1 or 6.12 kernel instead of on the host's (fetched once
        /// into target/kernels; software emulation: minutes).
        #[arg(long, value_enum)]
        kernel: Option<kernels::Kernel>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build => {
            setup::setup()?;
            build()
        }
        Cmd::Run {
            engine,
            no_build,
            args,
        } => {
            engines::preflight(engine)?;
            if !no_build {
                setup::setup()?;
                build()?;
            }
            run_agent(engine, &args)
        }
        Cmd::Deb { rev } => {
            setup::setup()?;
            deb::deb(rev.as_deref()).map(|_| ())
        }
        Cmd::Engine { engine } => {
            setup::setup()?;
            engine
                .fetch()
                .map(|root| println!("xtask: {}", root.display()))
        }
        Cmd::Image => {
            setup::setup()?;
            docker::ensure_running(Engine::Host, false)?;
            let image = docker::TestImage::build_named("dataplane-test:latest")?;
            std::mem::forget(image);
            Ok(())
        }
        Cmd::Bench {
            quick,
            engine,
            only,
            rounds,
        } => {
            setup::setup()?;
            build()?;
            bench::bench(quick, engine, only, rounds.max(1))
        }
        Cmd::Test {
            engine,
            no_lint,
            only,
            kernel: Some(kernel),
        } => {
            util::become_subreaper();
            setup::setup()?;
            test_in_vm(kernel, engine, no_lint, &only)
        }
        Cmd::Test {
            engine,
            no_lint,
            only,
            kernel: None,
        } => {
            util::become_subreaper();
            setup::setup()?;
            test(engine, no_lint, &only)
        }
    }
}

/// The eBPF object's path after `build_ebpf`.
pub fn ebpf_object() -> PathBuf {
    project_root().join("target/ebpf/bpfel-unknown-none/release/dataplane-ebpf")
}

/// Builds the eBPF crate with Debian's rustc (which has `core` for bpfel-unknown-none) and
/// bpf-linker; rustup's toolchain builds everything else.
fn build_ebpf() -> Result<()> {
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(project_root())
        .args([
            "build",
            "--package",
            "dataplane-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
            "target/ebpf",
        ])
        .env("RUSTC", "/usr/bin/rustc")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        // aya-ebpf needs `asm_experimental_arch` on this stable compiler; allowed for it only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\" -Cdebuginfo=2 -Clink-arg=--btf",
        )
        .env("PATH", util::path_with_cargo_bin());
    run(&mut cmd).context("building the eBPF object")
}

fn build() -> Result<()> {
    build_ebpf()?;
    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "dataplane",
        "--package",
        "bridge-ctl",
        "--package",
        "xtask",
        "--bin",
        "dp-churn",
        "--bin",
        "dp-spoof",
        "--bin",
        "dataplane",
        "--bin",
        "bridge-ctl",
        "--example",
        "egress_apply",
    ])
    .env("DATAPLANE_EBPF_OBJECT", ebpf_object());
    run(&mut cmd).context("building the agent and bridge-ctl")
}

fn run_agent(engine: Engine, args: &[String]) -> Result<()> {
    util::require_root("cargo xtask run")?;
    // Its agent's state goes when it stops: it must not be another agent's (the package's
    // service, stopped with its state kept, would lose it).
    leftovers::refuse_beside_an_agent().context(
        "`cargo xtask run` removes what its agent leaves when it stops; to adopt this state \
         instead, run the agent itself: target/release/dataplane run",
    )?;
    let own_firewall = args.iter().any(|a| a == "--own-firewall");
    let started = docker::ensure_running(engine, own_firewall)?;
    if started {
        println!(
            "xtask: started dockerd (userland-proxy off{}); it keeps running after the agent stops",
            if own_firewall { ", iptables off" } else { "" }
        );
    }
    let agent = project_root().join("target/release/dataplane");
    let mut cmd = Command::new(&agent);
    cmd.arg("run").args(args);
    // Runtime egress changes of its own, removed with the rest.
    let mut extra = Vec::new();
    if !args.iter().any(|a| a.starts_with("--state-dir")) {
        extra = vec!["--state-dir".to_string(), XTASK_STATE.to_string()];
        cmd.args(&extra);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    // Ctrl-C reaches the agent (same process group); wait for it to detach and exit.
    util::ignore_sigint();
    let status = cmd.status().context("starting the agent")?;
    // A foreground trial leaves nothing behind: its pins, tables and runtime egress changes
    // go, and the host is back on Docker's own path (the package's service keeps them
    // across restarts instead).
    println!("xtask: removing what the agent left (`dataplane uninstall`)");
    let mut all = args.to_vec();
    all.extend(extra);
    let removed = util::run(
        Command::new(&agent)
            .arg("uninstall")
            .args(uninstall_args(&all)),
    );
    if own_firewall {
        if started {
            // With its rules off and no agent, it would isolate and publish nothing.
            println!("xtask: stopping the dockerd it started with its rules off");
            docker::stop_owned_engine();
        } else {
            println!(
                "xtask: Docker runs with its rules off and no agent: nothing isolates its \
                 networks or publishes their ports until an agent runs or its rules are back \
                 (`dataplane docker-config --undo`, then restart Docker)"
            );
        }
    }
    if !status.success() && status.code() != Some(130) {
        bail!("the agent exited with {status}");
    }
    removed
}

/// Where `cargo xtask run`'s agent keeps runtime egress changes (not the service's).
const XTASK_STATE: &str = "/run/dataplane-xtask/state";

/// This binary's path, for the test of the README's two commands (a rebuild while it runs
/// leaves `/proc/self/exe` naming the old, deleted file).
fn xtask_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(text
        .strip_suffix(" (deleted)")
        .map_or_else(|| exe.clone(), PathBuf::from))
}

/// The options of `dataplane run` that `dataplane uninstall` takes too (where the state
/// is), with their values.
fn uninstall_args(args: &[String]) -> Vec<String> {
    const SHARED: &[&str] = &[
        "--pin-dir",
        "--nft-table",
        "--fwd-chain",
        "--socket",
        "--config",
        "--state-dir",
    ];
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let flag = a.split('=').next().unwrap_or(a);
        if !SHARED.contains(&flag) {
            continue;
        }
        out.push(a.clone());
        if !a.contains('=')
            && let Some(v) = it.next()
        {
            out.push(v.clone());
        }
    }
    out
}

fn test(engine: Engine, no_lint: bool, only: &[String]) -> Result<()> {
    let want = |layer: &str| only.is_empty() || only.iter().any(|o| o == layer);
    if want("e2e") {
        // Before minutes of building: the engine's sources, and an agent of the host's own
        // (which would change what the end-to-end tests see).
        engines::preflight(engine)?;
        if util::is_root() {
            leftovers::refuse_beside_an_agent()?;
        }
    }
    build()?;
    if !no_lint {
        lint()?;
    }
    if want("unit") {
        println!("== unit tests (no root, no kernel)");
        run(util::cargo()
            .args(["test", "--workspace", "--exclude", "dataplane-ebpf"])
            .env("DATAPLANE_REQUIRE_EBPF_OBJECT", "1"))?;
    }
    let privileged = want("integration") || want("e2e");
    if privileged {
        util::require_root("the integration and end-to-end tests")?;
    }
    if want("integration") {
        println!("== integration tests (network namespaces, a child cgroup, real programs)");
        run(&mut privileged_tests("netns"))?;
        println!("== packet programs (synthetic frames with BPF_PROG_TEST_RUN, real traffic)");
        run(&mut privileged_tests("packets"))?;
    }
    if want("e2e") {
        println!("== end-to-end tests (real Docker engine, the agent, curl)");
        let packages = test_packages();
        let engine = docker::TestEngine::start(engine)?;
        let image = docker::TestImage::build()?;
        let skipped =
            std::env::temp_dir().join(format!("dataplane-skipped-{}", std::process::id()));
        let _ = std::fs::remove_file(&skipped);
        let r = run(privileged_tests("e2e_docker")
            .envs(engine.env()?)
            .env("DATAPLANE_TEST_IMAGE", &image.name)
            .env("DATAPLANE_TEST_SKIPPED", &skipped)
            .env("DATAPLANE_BIN_DIR", project_root().join("target/release"))
            .env("DATAPLANE_XTASK", xtask_exe()?)
            .envs(packages));
        drop(image);
        drop(engine);
        if let Ok(text) = std::fs::read_to_string(&skipped) {
            for line in text.lines() {
                println!("xtask: SKIPPED (did not run, not passed): {line}");
            }
            let _ = std::fs::remove_file(&skipped);
        }
        r?;
    }
    println!("xtask: all requested test layers passed");
    Ok(())
}

/// The kernel-dependent layers in a VM booting `kernel`: the netns integration tests (the
/// same binary as on the host) and, unless `only` leaves it out, the end-to-end smoke.
fn test_in_vm(
    kernel: kernels::Kernel,
    engine: Engine,
    no_lint: bool,
    only: &[String],
) -> Result<()> {
    let want = |layer: &str| only.is_empty() || only.iter().any(|o| o == layer);
    util::require_root("the tests in a VM")?;
    if engine != Engine::Host {
        bail!("--kernel runs the host's Debian Docker engine in the VM; --engine does not apply");
    }
    build()?;
    if !no_lint {
        lint()?;
    }
    if kernel == kernels::Kernel::V5_10 {
        // Older than the agent needs: what is tested is that it refuses cleanly.
        println!("== the agent's refusal in a VM with Debian's 5.10 kernel");
        let script = "echo \"kernel: $(uname -r)\"; bash xtask/src/vm-refuse.sh";
        kernels::run_in_vm(kernel, script, std::time::Duration::from_mins(10))?;
        println!("xtask: the agent refused cleanly in the 5.10 VM");
        return Ok(());
    }
    if want("integration") {
        println!(
            "== integration tests in a VM with Debian's {} kernel",
            kernel.tag()
        );
        let bin = test_binary("netns")?;
        let packets = test_binary("packets")?;
        let script = format!(
            "echo \"kernel: $(uname -r)\"; mount -t bpf bpf /sys/fs/bpf 2>/dev/null; \
             target/release/dataplane features; \
             export DATAPLANE_EBPF_OBJECT={obj}; \
             {bin} --ignored --test-threads=1 --color=never && \
             {packets} --ignored --test-threads=1 --color=never",
            obj = ebpf_object().display(),
            bin = bin.display(),
            packets = packets.display()
        );
        kernels::run_in_vm(kernel, &script, std::time::Duration::from_mins(30))?;
    }
    if want("e2e") {
        println!(
            "== end-to-end smoke in a VM with Debian's {} kernel",
            kernel.tag()
        );
        let dir = project_root().join("target/vm");
        std::fs::create_dir_all(&dir)?;
        docker::TestImage::write_rootfs_tar(&dir.join("rootfs.tar"))?;
        let script = "echo \"kernel: $(uname -r)\"; bash xtask/src/vm-smoke.sh";
        kernels::run_in_vm(kernel, script, std::time::Duration::from_mins(30))?;
    }
    println!(
        "xtask: the requested layers passed in the {} VM",
        kernel.tag()
    );
    Ok(())
}

/// The path of the release test binary `name` of the dataplane crate (built if needed).
fn test_binary(name: &str) -> Result<PathBuf> {
    let out = util::cargo()
        .args([
            "test",
            "--release",
            "--package",
            "dataplane",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .env("DATAPLANE_EBPF_OBJECT", ebpf_object())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the test binary")?;
    if !out.status.success() {
        bail!("building the {name} test binary failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("no executable for the {name} tests"))
}

/// The build the package test upgrades from: the last commit before the map layout
/// changed (hash maps allocated on demand).
const PREVIOUS_RELEASE: &str = "963301e8c3d14a4aab8af5fdeb8b3942539a687e";

/// This tree's package and the previous release's, for the package test (which is skipped,
/// and says so, when one cannot be built: a shallow clone lacks the previous commit).
fn test_packages() -> Vec<(&'static str, PathBuf)> {
    let mut env = Vec::new();
    match deb::deb(None) {
        Ok(p) => env.push(("DATAPLANE_TEST_DEB", p)),
        Err(e) => println!("xtask: no package of this tree: {e:#}"),
    }
    match deb::deb(Some(PREVIOUS_RELEASE)) {
        Ok(p) => env.push(("DATAPLANE_TEST_DEB_PREVIOUS", p)),
        Err(e) => println!("xtask: no package of the previous release: {e:#}"),
    }
    env
}

/// `cargo test` of one privileged test file: release build (the programs load faster),
/// ignored tests included, one at a time.
fn privileged_tests(file: &str) -> std::process::Command {
    let mut c = util::cargo();
    c.args([
        "test",
        "--release",
        "--package",
        "dataplane",
        "--test",
        file,
        "--",
        "--ignored",
        "--test-threads=1",
    ])
    .env("DATAPLANE_EBPF_OBJECT", ebpf_object());
    c
}

fn lint() -> Result<()> {
    println!("== lint: rustfmt and clippy (every crate, the eBPF crate included)");
    run(util::cargo().args(["fmt", "--all", "--", "--check"]))
        .context("cargo fmt --check failed: run `cargo fmt --all`")?;
    let ok = run_status(util::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "dataplane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    if !ok {
        bail!("clippy found warnings in the userspace crates");
    }
    // The eBPF crate is linted on its own, for the host (Debian's rustc has no clippy):
    // together with the agent, feature unification would hand it dataplane-common's `user`
    // feature (aya, std); a no_std binary on the host needs panic=abort.
    let ok = run_status(
        util::cargo()
            .args([
                "clippy",
                "--package",
                "dataplane-ebpf",
                "--target-dir",
                "target/clippy-ebpf",
                "--",
                "-D",
                "warnings",
            ])
            .env("RUSTFLAGS", "-C panic=abort"),
    )?;
    if !ok {
        bail!("clippy found warnings in dataplane-ebpf");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_takes_where_the_state_is_and_nothing_else() {
        let args: Vec<String> = [
            "--own-firewall",
            "--nft-table",
            "mine",
            "--pin-dir=/sys/fs/bpf/x",
            "--packet-allow",
            "10.0.0.0/8",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            uninstall_args(&args),
            ["--nft-table", "mine", "--pin-dir=/sys/fs/bpf/x"]
        );
    }
}
