//! What a container may initiate: its egress [`Policy`], from the host's defaults and
//! named profiles ([`EgressConfig`], the `[egress]` section of the config file), its labels
//! (`dataplane.egress.*`) and runtime changes (`bridge-ctl egress set`), in that order of
//! precedence. Pure: parsing and merging only.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// The label prefix; every label under it must be one the agent knows.
pub const LABEL_PREFIX: &str = "dataplane.egress.";
pub const LABEL_INTERNET: &str = "dataplane.egress.internet";
pub const LABEL_HOST: &str = "dataplane.egress.host";
pub const LABEL_ALLOW: &str = "dataplane.egress.allow";
pub const LABEL_PROFILE: &str = "dataplane.egress.profile";

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// An address block: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: IpAddr,
    pub len: u8,
}

impl Net {
    /// The block, with the host bits cleared.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { addr, len })
    }

    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                Some(
                    l.parse::<u8>()
                        .map_err(|_| format!("bad prefix length in {s:?}"))?,
                ),
            ),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("not an address: {a:?}"))?;
        let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Self::new(addr, len).ok_or_else(|| format!("prefix length too long in {s:?}"))
    }
}

/// What an allow-list entry names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Net(Net),
    /// A DNS name, resolved by the agent.
    Name(String),
    /// Another container, by name: its addresses on every network.
    Container(String),
}

/// One exception: a destination, and optionally a port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allow {
    pub target: Target,
    pub port: Option<u16>,
    /// A protocol number; `None`: TCP and UDP with a port, anything without.
    pub proto: Option<u8>,
}

fn proto_number(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "icmp" => Some(PROTO_ICMP),
        _ => None,
    }
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP | PROTO_ICMPV6 => "icmp",
        _ => "?",
    }
}

fn port(s: &str, entry: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {s:?} in {entry:?}")),
    }
}

/// Whether `s` is a host name the agent may resolve.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Container names as Docker accepts them.
fn valid_container(s: &str) -> bool {
    let s = s.strip_prefix('/').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl FromStr for Allow {
    type Err = String;

    /// `CIDR`, `CIDR:port[/proto]`, `[IPv6-CIDR]:port[/proto]`, `hostname[:port][/proto]`,
    /// `container:NAME[:port][/proto]`.
    fn from_str(entry: &str) -> Result<Self, String> {
        let e = entry.trim();
        if e.is_empty() {
            return Err("empty entry".into());
        }
        // A trailing `/tcp` (never a prefix length, which is a number).
        let (rest, proto) = match e.rsplit_once('/') {
            Some((_, p))
                if p.contains(':')
                    && p.split(':').next().is_some_and(|l| l.parse::<u8>().is_ok()) =>
            {
                return Err(format!(
                    "an IPv6 destination with a port is written [addr]:port: {entry:?}"
                ));
            }
            Some((r, p)) if p.parse::<u8>().is_err() => (
                r,
                Some(proto_number(p).ok_or_else(|| {
                    format!("unknown protocol {p:?} in {entry:?} (tcp, udp or icmp)")
                })?),
            ),
            _ => (e, None),
        };
        let (target, port) = if let Some(name) = rest.strip_prefix("container:") {
            let (n, p) = match name.split_once(':') {
                Some((n, p)) => (n, Some(port(p, entry)?)),
                None => (name, None),
            };
            if !valid_container(n) {
                return Err(format!("bad container name {n:?} in {entry:?}"));
            }
            (Target::Container(n.trim_start_matches('/').to_string()), p)
        } else if let Some(v6) = rest.strip_prefix('[') {
            let (net, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("missing ']' in {entry:?}"))?;
            let net: Net = net.parse().map_err(|e| format!("{e} in {entry:?}"))?;
            let p = match after {
                "" => None,
                a => Some(port(
                    a.strip_prefix(':')
                        .ok_or_else(|| format!("expected ':port' after ']' in {entry:?}"))?,
                    entry,
                )?),
            };
            (Target::Net(net), p)
        } else if let Ok(net) = rest.parse::<Net>() {
            // A bare address or block (IPv6 ones too, when no port follows).
            (Target::Net(net), None)
        } else {
            let (host, p) = match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(port(p, entry)?)),
                None => (rest, None),
            };
            if host.contains('/') {
                // Meant as a block.
                let net: Net = host.parse().map_err(|e| format!("{e} in {entry:?}"))?;
                if !net.is_v4() {
                    return Err(format!(
                        "an IPv6 destination with a port is written [addr]:port: {entry:?}"
                    ));
                }
                (Target::Net(net), p)
            } else if let Ok(net) = host.parse::<Net>() {
                if !net.is_v4() {
                    return Err(format!(
                        "an IPv6 destination with a port is written [addr]:port: {entry:?}"
                    ));
                }
                (Target::Net(net), p)
            } else if valid_name(host) {
                (Target::Name(host.to_ascii_lowercase()), p)
            } else {
                return Err(format!("not an address, block or host name: {entry:?}"));
            }
        };
        if proto == Some(PROTO_ICMP) && port.is_some() {
            return Err(format!("icmp has no ports: {entry:?}"));
        }
        Ok(Self {
            target,
            port,
            proto,
        })
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.target, self.port) {
            (Target::Net(n), Some(_)) if !n.is_v4() => write!(f, "[{n}]")?,
            (Target::Net(n), _) => write!(f, "{n}")?,
            (Target::Name(n), _) => write!(f, "{n}")?,
            (Target::Container(n), _) => write!(f, "container:{n}")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(p) = self.proto {
            write!(f, "/{}", proto_name(p))?;
        }
        Ok(())
    }
}

/// A comma-separated allow-list; every entry must parse.
pub fn parse_allow_list(s: &str) -> Result<Vec<Allow>, String> {
    let mut out = Vec::new();
    for e in s.split(',') {
        if e.trim().is_empty() {
            continue;
        }
        out.push(e.parse()?);
    }
    Ok(out)
}

/// What a container may initiate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Connections out of the host through a non-Docker interface.
    pub internet: bool,
    /// Connections to the host and to other containers.
    pub host: bool,
    /// Exceptions to both.
    pub allow: Vec<Allow>,
    /// Why this is the fail-closed policy (a malformed label, a config error).
    pub error: Option<String>,
}

impl Policy {
    pub const OPEN: Self = Self {
        internet: true,
        host: true,
        allow: Vec::new(),
        error: None,
    };

    /// Nothing out, nothing allowed: what a container with a policy the agent cannot read
    /// gets.
    pub fn closed(why: String) -> Self {
        Self {
            internet: false,
            host: false,
            allow: Vec::new(),
            error: Some(why),
        }
    }

    /// Whether the agent restricts anything for this container.
    pub fn restricts(&self) -> bool {
        !self.internet || !self.host
    }
}

/// A policy's settable parts, as a profile or a runtime change carries them: each one that
/// is set replaces what the layer below says (`allow` adds to it; a runtime change's
/// replaces it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub internet: Option<bool>,
    pub host: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

/// The `[egress]` section of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Defaults for containers whose labels say nothing.
    #[serde(default)]
    pub internet: Option<bool>,
    #[serde(default)]
    pub host: Option<bool>,
    /// Exceptions every policed container gets.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The DNS server the agent resolves allow-list names with (`IP` or `IP:port`);
    /// default: the host's `/etc/resolv.conf`.
    #[serde(default)]
    pub resolver: Option<String>,
    /// Named profiles a container refers to with `dataplane.egress.profile`.
    #[serde(default)]
    pub profiles: BTreeMap<String, Layer>,
}

/// The container's policy: the host defaults, its profile, its labels, then a runtime
/// change. A malformed label, an unknown profile or an unknown `dataplane.egress.*` label
/// gives the fail-closed policy, saying why.
pub fn policy_of(
    config: &EgressConfig,
    labels: &BTreeMap<String, String>,
    runtime: Option<&Layer>,
) -> Policy {
    match merge(config, labels, runtime) {
        Ok(p) => p,
        Err(why) => Policy::closed(why),
    }
}

fn bool_label(labels: &BTreeMap<String, String>, key: &str) -> Result<Option<bool>, String> {
    match labels.get(key).map(|v| v.trim()) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(v) => Err(format!("label {key}={v:?}: expected true or false")),
    }
}

fn merge(
    d: &EgressConfig,
    labels: &BTreeMap<String, String>,
    runtime: Option<&Layer>,
) -> Result<Policy, String> {
    for k in labels.keys() {
        if k.starts_with(LABEL_PREFIX)
            && ![LABEL_INTERNET, LABEL_HOST, LABEL_ALLOW, LABEL_PROFILE].contains(&k.as_str())
        {
            return Err(format!(
                "unknown label {k} (known: {LABEL_INTERNET}, {LABEL_HOST}, {LABEL_ALLOW}, \
                 {LABEL_PROFILE})"
            ));
        }
    }
    let mut p = Policy {
        internet: d.internet.unwrap_or(true),
        host: d.host.unwrap_or(true),
        allow: Vec::new(),
        error: None,
    };
    let mut allow: Vec<String> = d.allow.clone();
    if let Some(name) = labels.get(LABEL_PROFILE).map(|s| s.trim()) {
        let prof = d.profiles.get(name).ok_or_else(|| {
            format!("label {LABEL_PROFILE}={name:?}: no such profile in the config")
        })?;
        p.internet = prof.internet.unwrap_or(p.internet);
        p.host = prof.host.unwrap_or(p.host);
        allow.extend(prof.allow.iter().flatten().cloned());
    }
    p.internet = bool_label(labels, LABEL_INTERNET)?.unwrap_or(p.internet);
    p.host = bool_label(labels, LABEL_HOST)?.unwrap_or(p.host);
    if let Some(r) = runtime {
        p.internet = r.internet.unwrap_or(p.internet);
        p.host = r.host.unwrap_or(p.host);
    }
    // A runtime allow-list replaces the label's (which is then not read at all).
    let label_allow = match (
        runtime.and_then(|r| r.allow.as_ref()),
        labels.get(LABEL_ALLOW),
    ) {
        (Some(a), _) => a
            .iter()
            .map(|e| e.parse::<Allow>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("runtime allow-list: {e}"))?,
        (None, Some(v)) => parse_allow_list(v).map_err(|e| format!("label {LABEL_ALLOW}: {e}"))?,
        (None, None) => Vec::new(),
    };
    for a in &allow {
        // Validated when the config was read.
        if let Ok(a) = a.parse::<Allow>() {
            p.allow.push(a);
        }
    }
    p.allow.extend(label_allow);
    p.allow.sort();
    p.allow.dedup();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, resolver_addr};

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn a(s: &str) -> Allow {
        s.parse().unwrap()
    }

    #[test]
    fn allow_entries_of_every_form() {
        let e = a("10.0.0.0/8");
        assert_eq!(e.target, Target::Net("10.0.0.0/8".parse().unwrap()));
        assert_eq!((e.port, e.proto), (None, None));
        let e = a("10.1.2.3/16:5432/tcp");
        assert_eq!(e.target, Target::Net("10.1.0.0/16".parse().unwrap()));
        assert_eq!((e.port, e.proto), (Some(5432), Some(PROTO_TCP)));
        let e = a("192.0.2.7:53");
        assert_eq!(e.target, Target::Net("192.0.2.7/32".parse().unwrap()));
        assert_eq!((e.port, e.proto), (Some(53), None));
        let e = a("fd00::/64");
        assert_eq!(e.target, Target::Net("fd00::/64".parse().unwrap()));
        let e = a("[fd00::1]:443/udp");
        assert_eq!(e.target, Target::Net("fd00::1/128".parse().unwrap()));
        assert_eq!((e.port, e.proto), (Some(443), Some(PROTO_UDP)));
        let e = a("Pypi.Org:443");
        assert_eq!(e.target, Target::Name("pypi.org".into()));
        assert_eq!(e.port, Some(443));
        let e = a("db.internal/udp");
        assert_eq!((e.port, e.proto), (None, Some(PROTO_UDP)));
        let e = a("container:db:5432/tcp");
        assert_eq!(e.target, Target::Container("db".into()));
        assert_eq!((e.port, e.proto), (Some(5432), Some(PROTO_TCP)));
        assert_eq!(a("container:cache").port, None);
        assert_eq!(a("10.0.0.0/8/icmp").proto, Some(PROTO_ICMP));
        // Shown as written (normalised).
        for s in [
            "10.0.0.0/8",
            "10.0.0.1/32:80/tcp",
            "[fd00::1/128]:443/udp",
            "example.com:443",
            "container:db:5432/tcp",
        ] {
            assert_eq!(a(s).to_string(), s);
        }
    }

    #[test]
    fn malformed_entries_say_what_is_wrong() {
        for (s, want) in [
            ("10.0.0.0/33", "prefix"),
            ("10.0.0.1:0", "bad port"),
            ("10.0.0.1:99999", "bad port"),
            ("example.com:http", "bad port"),
            ("10.0.0.1:80/sctp", "unknown protocol"),
            ("[fd00::1:443", "missing ']'"),
            ("fd00::/64:443", "[addr]:port"),
            ("container:", "bad container name"),
            ("container:a b", "bad container name"),
            ("exa mple.com", "not an address"),
            ("10.0.0.1/icmp:1", "unknown protocol"),
            ("host.example:22/icmp", "icmp has no ports"),
            ("*.example.com", "not an address"),
        ] {
            let e = s.parse::<Allow>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        let e = parse_allow_list("10.0.0.0/8, ,example.com:443,bad entry").unwrap_err();
        assert!(e.contains("bad entry"), "{e}");
        assert_eq!(parse_allow_list("10.0.0.0/8,").unwrap().len(), 1);
    }

    #[test]
    fn labels_over_profile_over_host_defaults() {
        let config = Config::parse(
            r#"
            [egress]
            internet = false
            allow = ["10.9.0.0/16:3128/tcp"]
            [egress.profiles.ci]
            host = false
            allow = ["pypi.org:443"]
            [egress.profiles.open]
            internet = true
            "#,
        )
        .unwrap();
        assert!(config.default_closed());
        // No labels: the host default.
        let p = policy_of(&config.egress, &labels(&[]), None);
        assert!(!p.internet && p.host && p.error.is_none());
        assert_eq!(p.allow, vec![a("10.9.0.0/16:3128/tcp")]);
        // A profile, then a label over it; allow-lists add up.
        let p = policy_of(
            &config.egress,
            &labels(&[
                (LABEL_PROFILE, "ci"),
                (LABEL_HOST, "true"),
                (LABEL_ALLOW, "container:db:5432"),
            ]),
            None,
        );
        assert!(!p.internet && p.host);
        assert_eq!(p.allow.len(), 3);
        let p = policy_of(&config.egress, &labels(&[(LABEL_PROFILE, "open")]), None);
        assert!(!p.restricts());
        // A runtime change wins, and its allow-list replaces the labels'.
        let rt = Layer {
            internet: Some(true),
            host: Some(false),
            allow: Some(vec!["192.0.2.9:80".into()]),
        };
        let p = policy_of(
            &config.egress,
            &labels(&[(LABEL_ALLOW, "container:db")]),
            Some(&rt),
        );
        assert!(p.internet && !p.host);
        assert_eq!(p.allow, vec![a("10.9.0.0/16:3128/tcp"), a("192.0.2.9:80")]);
        // No config: everything open.
        assert_eq!(
            policy_of(&Config::default().egress, &labels(&[]), None),
            Policy::OPEN
        );
    }

    #[test]
    fn a_malformed_label_closes_everything_and_says_why() {
        let c = Config::default();
        for (kv, want) in [
            ((LABEL_INTERNET, "no"), "expected true or false"),
            ((LABEL_ALLOW, "10.0.0.0/8,nope nope"), LABEL_ALLOW),
            ((LABEL_PROFILE, "ci"), "no such profile"),
            (("dataplane.egress.interent", "false"), "unknown label"),
        ] {
            let p = policy_of(&c.egress, &labels(&[kv]), None);
            assert!(!p.internet && !p.host && p.allow.is_empty(), "{kv:?}");
            assert!(p.error.as_deref().unwrap().contains(want), "{p:?}");
        }
        // Labels of other tools are none of the agent's business.
        let p = policy_of(
            &c.egress,
            &labels(&[("dataplane.other", "x"), ("x", "y")]),
            None,
        );
        assert_eq!(p, Policy::OPEN);
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults_and_every_example_in_it_is_valid() {
        let shipped = include_str!("../../../packaging/dataplane.toml");
        assert_eq!(Config::parse(shipped).unwrap(), Config::default());
        // Uncommenting every example setting (and its section) gives a valid file.
        let mut examples = String::new();
        for l in shipped.lines().filter_map(|l| l.strip_prefix('#')) {
            if l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) {
                examples.push_str(l);
                examples.push('\n');
            }
        }
        let c = Config::parse(&examples).unwrap_or_else(|e| panic!("{e}\n{examples}"));
        assert!(c.metrics.listen.is_some() && c.egress.resolver.is_some());
        assert!(c.egress.profiles.contains_key("ci"));
        assert!(c.packet_layer.enabled && c.packet_layer.allow.len() == 2);
    }

    #[test]
    fn config_errors_name_the_line() {
        let e = Config::parse("[egress]\ninternet = false\nallow = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.0/40") && e.starts_with("line 3:"), "{e}");
        let e = Config::parse("[metrics]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2: [metrics] listen"), "{e}");
        let c = Config::parse("[metrics]\nlisten = \"[::1]:9477\"\n").unwrap();
        assert_eq!(c.metrics.addr().unwrap().unwrap().port(), 9477);
        let e = Config::parse("[egress]\ninternet = \"no\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = Config::parse("[egress]\nintrenet = false\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("intrenet"), "{e}");
        let e = Config::parse("[egress]\nresolver = \"dns.example\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("resolver"), "{e}");
        assert_eq!(
            resolver_addr("192.0.2.53").unwrap().to_string(),
            "192.0.2.53:53"
        );
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse("[pause]\ndefault = \"reset\"\n").unwrap();
        assert_eq!(c.pause.default, crate::model::desired::OnPause::Reset);
        let e = Config::parse("[pause]\ndefault = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes") || e.contains("variant"), "{e}");
        let missing = Config::load(std::path::Path::new("/nonexistent/dataplane.toml"));
        assert_eq!(missing.unwrap(), Config::default());
    }
}
