//! The agent's config file (`/etc/dataplane/dataplane.toml`): its sections, how it is read
//! and validated (a file that does not validate is refused whole, with the line and the
//! reason).

use std::net::IpAddr;

use serde::Deserialize;

use crate::egress::policy::{Allow, EgressConfig};

/// The `[pause]` section of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseConfig {
    /// What `dataplane.on-pause` means for a container without the label (`keep`).
    #[serde(default)]
    pub default: crate::model::desired::OnPause,
}

/// The config file (`/etc/dataplane/dataplane.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub egress: EgressConfig,
    #[serde(default)]
    pub pause: PauseConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub packet_layer: PacketConfig,
    #[serde(default)]
    pub own_firewall: OwnFirewallConfig,
}

/// `[own_firewall]`: the agent writes the rules Docker's `iptables` would (off by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnFirewallConfig {
    /// As `dataplane run --own-firewall` (applies at the agent's start).
    #[serde(default)]
    pub enabled: bool,
}

/// `[packet_layer]`: external clients translated on the host's interfaces (off by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacketConfig {
    /// As `dataplane run --packet-layer`.
    #[serde(default)]
    pub enabled: bool,
    /// Client prefixes translated (`192.0.2.0/24`, `2001:db8::/32`, an address alone);
    /// every other client keeps Docker's DNAT.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The uplinks by name (default: every interface with an address that is not Docker's).
    pub interfaces: Option<Vec<String>>,
    /// Room in the flow map (applies at the agent's start).
    pub flows: Option<u32>,
}

/// `[metrics]`: where Prometheus metrics are served (nowhere by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `address:port` to serve `GET /metrics` on, e.g. `127.0.0.1:9477`.
    pub listen: Option<String>,
}

impl MetricsConfig {
    /// The address to listen on, if any.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        self.listen
            .as_deref()
            .map(|l| {
                l.parse::<std::net::SocketAddr>().map_err(|_| {
                    format!("[metrics] listen: not an address:port (like 127.0.0.1:9477): {l:?}")
                })
            })
            .transpose()
    }
}

/// Why a config file was refused. The agent's start exits with its own code for these, and
/// a reload keeps the running config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (other than missing: that is the defaults).
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or a section or key the agent does not know.
    #[error("{0}")]
    Syntax(String),
    /// A value that parses but means nothing (with its line where it can be found).
    #[error("{0}")]
    Invalid(String),
    /// One of the above, in the named file.
    #[error("{}: {source}", path.display())]
    In {
        path: std::path::PathBuf,
        source: Box<ConfigError>,
    },
}

/// Where the agent reads its config by default.
pub const DEFAULT_CONFIG: &str = "/etc/dataplane/dataplane.toml";

impl Config {
    /// Parses and validates the file's text: every allow entry and the resolver must
    /// parse. An error names the line and the reason.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        c.validate(text).map_err(ConfigError::Invalid)?;
        Ok(c)
    }

    /// What [`Config::parse`] checks beyond the syntax.
    fn validate(&self, text: &str) -> Result<(), String> {
        let c = self;
        // Values that parse as TOML but mean nothing: named with the line they are on.
        let at = |value: &str, e: String| match line_of(text, value) {
            Some(n) => format!("line {n}: {e}"),
            None => e,
        };
        for a in &c.egress.allow {
            a.parse::<Allow>()
                .map_err(|e| at(a, format!("[egress] allow: {e}")))?;
        }
        for (name, p) in &c.egress.profiles {
            for a in p.allow.iter().flatten() {
                a.parse::<Allow>()
                    .map_err(|e| at(a, format!("[egress.profiles.{name}] allow: {e}")))?;
            }
        }
        if let Some(r) = &c.egress.resolver {
            resolver_addr(r).map_err(|e| at(r, format!("[egress] resolver: {e}")))?;
        }
        for a in &c.packet_layer.allow {
            a.parse::<crate::addr::Prefix>()
                .map_err(|e| at(a, format!("[packet_layer] allow: {e}")))?;
        }
        if c.packet_layer.flows == Some(0) {
            return Err("[packet_layer] flows: must be at least 1".to_string());
        }
        if let Err(e) = c.metrics.addr() {
            return Err(at(c.metrics.listen.as_deref().unwrap_or_default(), e));
        }
        Ok(())
    }

    /// Reads `path`; a missing file is the defaults.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t).map_err(|e| ConfigError::In {
                path: path.to_path_buf(),
                source: Box::new(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Whether a container the agent has not seen yet must send nothing out (the host
    /// default turns the internet off).
    pub fn default_closed(&self) -> bool {
        self.egress.internet == Some(false) || self.egress.host == Some(false)
    }
}

/// The first line (1-based) where `value` appears as a quoted string.
fn line_of(text: &str, value: &str) -> Option<usize> {
    let quoted = [format!("\"{value}\""), format!("'{value}'")];
    text.lines()
        .position(|l| quoted.iter().any(|q| l.contains(q.as_str())))
        .map(|i| i + 1)
}

/// `IP` or `IP:port` / `[IPv6]:port` (port 53 by default).
pub fn resolver_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| format!("not an address or address:port: {s:?}"))
}
