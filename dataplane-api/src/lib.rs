//! The agent's control protocol, one definition for everyone who speaks it: the agent,
//! `bridge-ctl`, the end-to-end tests and the bench. A request is one line naming a
//! [`Request`]; the answer is one line of JSON: a [`Status`], a list of [`Frontend`]s, or an
//! [`ErrorReply`]. Wire types hold only what an operator may see.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use dataplane_common::STAT_NAMES;

/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/run/dataplane/ctl.sock";
/// The longest request line the agent reads.
pub const MAX_REQUEST_BYTES: u64 = 65_536;
/// How long either side may take to send its line.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What can be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Answered with a [`Status`].
    Status,
    /// Answered with a `Vec<Frontend>`.
    Frontends,
    /// Answered with a `Vec<Egress>`: every container the agent knows, or the one named
    /// (name or ID prefix).
    EgressShow(Option<String>),
    /// Answered with the container's [`Egress`] once the kernel enforces the change.
    EgressSet(EgressChange),
}

impl Request {
    /// The request as its line on the wire.
    pub fn to_line(&self) -> String {
        match self {
            Self::Status => "status".into(),
            Self::Frontends => "frontends".into(),
            Self::EgressShow(None) => "egress-show".into(),
            Self::EgressShow(Some(c)) => format!("egress-show {c}"),
            Self::EgressSet(c) => format!(
                "egress-set {}",
                serde_json::to_string(c).unwrap_or_default()
            ),
        }
    }

    /// A request line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim();
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match (verb, rest.is_empty()) {
            ("status", true) => Ok(Self::Status),
            ("frontends", true) => Ok(Self::Frontends),
            ("egress-show", true) => Ok(Self::EgressShow(None)),
            ("egress-show", false) => Ok(Self::EgressShow(Some(rest.to_string()))),
            ("egress-set", false) => serde_json::from_str(rest)
                .map(Self::EgressSet)
                .map_err(|e| format!("malformed egress change: {e}")),
            _ => Err(format!("unknown request {line:?}")),
        }
    }
}

/// A runtime change of a container's egress policy (`bridge-ctl egress set`). Each field
/// that is set replaces what the labels say, for the container's life (until it is
/// removed), across agent restarts; `reset` drops earlier runtime changes first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressChange {
    /// Name or ID (prefix) of the container.
    pub container: String,
    #[serde(default)]
    pub reset: bool,
    #[serde(default)]
    pub internet: Option<bool>,
    #[serde(default)]
    pub host: Option<bool>,
    /// Replaces the labels' allow-list (the host's and the profile's entries stay).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

/// One container's egress policy as the agent enforces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub container: String,
    /// The first 12 characters of the container ID.
    pub container_id: String,
    pub internet: bool,
    pub host: bool,
    /// The allow-list as written (normalised).
    pub allow: Vec<String>,
    /// What each host name and container name in it resolves to now (`name -> addresses`,
    /// or `name -> error: ...`).
    pub resolved: BTreeMap<String, String>,
    /// The container's addresses the policy is enforced for.
    pub addresses: Vec<String>,
    /// Whether a runtime change (`bridge-ctl egress set`) is in force.
    pub runtime_change: bool,
    /// Why the fail-closed policy applies (a malformed label or config entry).
    pub error: Option<String>,
    /// Packets dropped by its policy (connections it tried to open).
    pub dropped_packets: u64,
    /// Unix time (µs) its policy was first in the kernel for its current addresses (0:
    /// not enforced: it restricts nothing, or it is not running).
    #[serde(default)]
    pub enforced_unix_us: u64,
    /// Packets dropped at its bridge ports because their source (MAC or address) was not
    /// its own.
    #[serde(default)]
    pub spoofed_packets: u64,
    /// The host-side veths its frames are judged by.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Why its labels cannot be enforced (`--network host`, macvlan, ipvlan).
    #[serde(default)]
    pub not_enforceable: Option<String>,
    /// `--network container:X`: the container whose policy applies to it.
    #[serde(default)]
    pub policy_of: Option<String>,
}

/// How long one start phase took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// Milliseconds the phase took.
    pub took_ms: f64,
    /// Milliseconds from the start of `dataplane run` to the end of the phase.
    pub total_ms: f64,
}

/// What the agent reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    pub version: String,
    pub docker_version: String,
    /// Docker's firewall backend (`iptables`, or `nftables` from 29.0 on).
    pub docker_firewall_backend: String,
    /// `<program>@<cgroup>`, and `(adopted)` when taken over from a pin.
    pub attach_points: Vec<String>,
    /// Unix time (ms) of the last completed sync with Docker.
    pub last_sync_unix_ms: u64,
    pub syncs: u64,
    pub containers: usize,
    pub frontends: usize,
    pub local_addresses: usize,
    /// Counters of the kernel programs by name ([`STAT_NAMES`]).
    pub counters: BTreeMap<String, u64>,
    /// Unix time (ms) the counters were read (when the status was asked for).
    pub counters_unix_ms: u64,
    /// Bindings that could not be applied, and why.
    pub errors: Vec<String>,
    /// Container network namespaces whose clients are translated (to backends on their
    /// own networks).
    pub container_clients: usize,
    /// Why container clients are left to Docker's own path, when they are.
    pub container_clients_off: Option<String>,
    /// Why host clients' connections stay tracked by conntrack, when they do.
    pub host_clients_tracked: Option<String>,
    /// Why nothing is translated now (every client takes Docker's own path), when so.
    pub translation_off: Option<String>,
    /// The phases of this agent's start, in order; the last is `ready`.
    pub startup: Vec<Phase>,
    /// Microseconds from each of the latest Docker `start` events (up to
    /// [`SYNC_LATENCIES_KEPT`]) to its frontends in the map, oldest first.
    pub start_sync_us: Vec<u64>,
    /// For each of the latest pauses of a container with `on-pause=reset`: microseconds from
    /// Docker's `pause` event to its translated sockets destroyed, and how many there were.
    #[serde(default)]
    pub pause_resets: Vec<(u64, usize)>,
    /// For each of the latest starts whose frontends were written before Docker's `start`
    /// event (at its `network connect`, from the bindings it was created with): how many
    /// microseconds before that event (negative: after it). Starts written from the start
    /// event are in [`Status::start_sync_us`].
    #[serde(default)]
    pub early_lead_us: Vec<i64>,
    /// For each of the latest containers whose frontends went into the map (early, or from
    /// the start event): its id and the unix time in microseconds they first did, oldest
    /// first (to compare with when the container's process started).
    #[serde(default)]
    pub frontends_written_us: Vec<(String, u64)>,
    /// The metrics endpoint's URL (`http://address:port/metrics`), when one is configured.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The config file the agent read (and reads again on `SIGHUP`).
    #[serde(default)]
    pub config_file: String,
    /// Unix time (ms) the config in force was loaded.
    #[serde(default)]
    pub config_loaded_unix_ms: u64,
    /// Why the last reload was rejected (the config loaded before stays in force).
    #[serde(default)]
    pub config_error: Option<String>,
    /// The kernel's release (`uname -r`).
    #[serde(default)]
    pub kernel: String,
    /// Each kernel feature the agent uses, and whether it is active.
    #[serde(default)]
    pub features: Vec<FeatureState>,
    /// The packet layer (external clients translated on the host's interfaces), when it is
    /// on; off, external clients take Docker's DNAT.
    #[serde(default)]
    pub packet_layer: Option<PacketStatus>,
    /// Which firewall publishes, masquerades and isolates: `docker` (Docker's own rules,
    /// the default mode) or `own-firewall` (the agent's table, Docker's rules off).
    #[serde(default)]
    pub mode: String,
    /// The own-firewall mode's table, when that mode is active.
    #[serde(default)]
    pub own_firewall: Option<OwnFirewallStatus>,
    /// A warning about Docker's settings (its rules off while the agent runs in the
    /// default mode, or a daemon that changed them since the agent started).
    #[serde(default)]
    pub docker_settings_warning: Option<String>,
}

/// The own-firewall mode's table, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnFirewallStatus {
    /// `inet <table>`.
    pub table: String,
    /// Bridge networks it writes rules for, and published bindings it holds.
    pub networks: usize,
    pub published: usize,
    /// Rules in the operator's chain (`operator`), evaluated before the agent's.
    pub operator_rules: usize,
    /// Docker's iptables leftovers removed at this agent's start.
    pub removed_leftovers: usize,
    /// Why the last write failed, when it did (the table in the kernel stays as it was).
    pub error: Option<String>,
    /// Unix time (ms) of the last write.
    pub written_unix_ms: u64,
}

/// The packet layer, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketStatus {
    /// Interfaces whose ingress carries the forward program.
    pub uplinks: Vec<String>,
    /// Containers' host-side veths carrying the reply program.
    pub container_veths: usize,
    /// Container addresses the forward program delivers to.
    pub endpoints: usize,
    /// Flows in the flow map, as last counted (every 10 s, when idle flows are aged), and
    /// its room.
    pub flows: usize,
    /// Unix time (ms) the flows were counted.
    #[serde(default)]
    pub flows_counted_unix_ms: u64,
    pub flow_capacity: u32,
    /// Client prefixes translated (others keep Docker's DNAT).
    pub allow: Vec<String>,
    /// How the programs attach: `tcx` (Linux 6.6+) or `clsact`.
    pub attach: String,
    /// Interfaces that could not be attached, and why.
    pub errors: Vec<String>,
    /// Why no client is translated now: the host's firewall has rules that external
    /// clients' traffic to containers may meet (their packets would skip them).
    #[serde(default)]
    pub standing_back: Option<String>,
}

/// A kernel feature the agent uses, as probed at its start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureState {
    pub name: String,
    /// The Linux version (or build option) it needs.
    pub since: String,
    /// `active`, or `degraded` (the agent runs without it, see `effect`).
    pub state: String,
    /// What is lost while it is degraded.
    pub effect: String,
}

/// How many start-to-map latencies [`Status::start_sync_us`] keeps.
pub const SYNC_LATENCIES_KEPT: usize = 1024;

impl Status {
    /// The kernel counter `index` (`dataplane_common::STAT_*`).
    pub fn counter(&self, index: u32) -> u64 {
        STAT_NAMES
            .get(index as usize)
            .and_then(|n| self.counters.get(*n))
            .copied()
            .unwrap_or(0)
    }

    /// How long the start took to `ready`, in milliseconds.
    pub fn ready_ms(&self) -> Option<f64> {
        self.startup
            .iter()
            .find(|p| p.name == "ready")
            .map(|p| p.total_ms)
    }
}

/// One published binding, as `bridge-ctl frontends` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frontend {
    /// `address:port/proto`.
    pub frontend: String,
    pub container: String,
    /// The first 12 characters of the container ID.
    pub container_id: String,
    /// `address:port`, the IPv6 one after it when the container has one.
    pub backend: String,
    /// Sockets translated through this frontend since it was created.
    pub connections: u64,
    /// What the container's clients get while it is paused (`dataplane.on-pause`): `keep`
    /// (they wait) or `reset`.
    #[serde(default)]
    pub on_pause: String,
    /// Paused with `on-pause=reset`: new connections are refused, translated ones were
    /// reset.
    #[serde(default)]
    pub paused: bool,
}

/// Version of the JSON that `bridge-ctl --json` prints: one object per command, with
/// `api_version` and `kind` beside the fields ([`Versioned`]), or beside `items` for lists
/// ([`VersionedList`]). Within a version fields are only ever added; a removal or a change
/// of meaning makes a new version.
pub const JSON_VERSION: u32 = 1;

/// One object as `bridge-ctl --json` prints it: `{"api_version": 1, "kind": "status", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub api_version: u32,
    /// `status` or `egress`.
    pub kind: String,
    #[serde(flatten)]
    pub data: T,
}

impl<T> Versioned<T> {
    pub fn new(kind: &str, data: T) -> Self {
        Self {
            api_version: JSON_VERSION,
            kind: kind.to_string(),
            data,
        }
    }
}

/// A list as `bridge-ctl --json` prints it: `{"api_version": 1, "kind": "frontends", "items":
/// [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedList<T> {
    pub api_version: u32,
    /// `frontends` or `egress`.
    pub kind: String,
    pub items: Vec<T>,
}

impl<T> VersionedList<T> {
    pub fn new(kind: &str, items: Vec<T>) -> Self {
        Self {
            api_version: JSON_VERSION,
            kind: kind.to_string(),
            items,
        }
    }
}

/// The answer to a request the agent could not serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// Why asking the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(
        "the dataplane agent is not running (no socket at {0}); start it with `cargo xtask run` \
         or `dataplane run`"
    )]
    NotRunning(String),
    #[error("the dataplane agent is not running (stale socket at {0})")]
    Stale(String),
    #[error("permission denied on {0}: the control socket is root-only")]
    PermissionDenied(String),
    #[error("talking to the agent at {0}: {1}")]
    Io(String, std::io::Error),
    #[error("the agent answered: {0}")]
    Refused(String),
    #[error("the agent's answer is not what was asked for: {0}")]
    Malformed(String),
}

impl AskError {
    /// Whether no agent could be reached at all (as opposed to an agent that answered).
    pub const fn unreachable(&self) -> bool {
        matches!(
            self,
            Self::NotRunning(_) | Self::Stale(_) | Self::PermissionDenied(_) | Self::Io(..)
        )
    }
}

/// Sends `request` to the agent at `socket` and reads its answer as JSON text.
pub fn ask_raw(socket: &Path, request: &Request) -> Result<String, AskError> {
    let at = socket.display().to_string();
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AskError::NotRunning(at.clone()),
        std::io::ErrorKind::ConnectionRefused => AskError::Stale(at.clone()),
        std::io::ErrorKind::PermissionDenied => AskError::PermissionDenied(at.clone()),
        _ => AskError::Io(at.clone(), e),
    })?;
    let io = |e| AskError::Io(at.clone(), e);
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    s.write_all(format!("{}\n", request.to_line()).as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(io)?;
    if let Ok(e) = serde_json::from_str::<ErrorReply>(&line) {
        return Err(AskError::Refused(e.error));
    }
    Ok(line)
}

fn ask<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T, AskError> {
    let text = ask_raw(socket, request)?;
    serde_json::from_str(&text).map_err(|e| AskError::Malformed(e.to_string()))
}

/// The agent's [`Status`].
pub fn status(socket: &Path) -> Result<Status, AskError> {
    ask(socket, &Request::Status)
}

/// The agent's frontends.
pub fn frontends(socket: &Path) -> Result<Vec<Frontend>, AskError> {
    ask(socket, &Request::Frontends)
}

/// The egress policies of every container the agent knows, or of the one named.
pub fn egress_show(socket: &Path, container: Option<&str>) -> Result<Vec<Egress>, AskError> {
    ask(socket, &Request::EgressShow(container.map(String::from)))
}

/// Applies a runtime change; answers when the kernel enforces it.
pub fn egress_set(socket: &Path, change: EgressChange) -> Result<Egress, AskError> {
    ask(socket, &Request::EgressSet(change))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_named() {
        let change = EgressChange {
            container: "web".into(),
            internet: Some(false),
            allow: Some(vec!["10.0.0.0/8".into(), "example.com:443".into()]),
            ..EgressChange::default()
        };
        for r in [
            Request::Status,
            Request::Frontends,
            Request::EgressShow(None),
            Request::EgressShow(Some("web".into())),
            Request::EgressSet(change),
        ] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
        assert!(
            Request::parse("egress-set {")
                .unwrap_err()
                .contains("malformed")
        );
        assert!(Request::parse("status now").is_err());
        assert_eq!(Request::parse(" status\n"), Ok(Request::Status));
        assert!(Request::parse("bogus").unwrap_err().contains("bogus"));
    }

    #[test]
    fn counters_by_index_and_the_ready_phase() {
        let mut s = Status::default();
        s.counters.insert("skipped_no_agent".into(), 4);
        assert_eq!(s.counter(dataplane_common::STAT_SKIP_NO_AGENT), 4);
        assert_eq!(s.counter(dataplane_common::STAT_CONNECT), 0);
        assert_eq!(s.counter(999), 0);
        s.startup.push(Phase {
            name: "ready".into(),
            took_ms: 1.0,
            total_ms: 42.5,
        });
        assert_eq!(s.ready_ms(), Some(42.5));
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn an_absent_agent_is_unreachable_with_what_to_do() {
        let e = status(Path::new("/nonexistent/ctl.sock")).unwrap_err();
        assert!(e.unreachable());
        assert!(e.to_string().contains("dataplane run"), "{e}");
    }
}
