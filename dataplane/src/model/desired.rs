//! Docker's view of a container, turned into the frontends it should have. Pure: no I/O.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use bollard::models::ContainerInspectResponse;
use dataplane_common::{
    Addr, BACKEND_F_PAUSED, BACKEND_F_RESET_ON_PAUSE, Backend, FrontendKey, PORT_F_V4, PORT_F_V6,
    PROTO_TCP, PROTO_UDP, PortFamilies, PortKey, WILDCARD4, WILDCARD6, is_v4_mapped, net_id,
    v4_mapped,
};
use serde::Serialize;

/// One published binding of one container, as the maps will hold it, plus who it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub backend: Backend,
    pub container_id: String,
    pub container_name: String,
}

/// What went wrong with one binding; the container's other bindings still apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("container {container}: port key {port_key:?} is not <port>/<proto>")]
    PortKey { container: String, port_key: String },
    #[error("container {container}: host IP {host_ip:?} of {port_key} is not an IP address")]
    HostIp {
        container: String,
        port_key: String,
        host_ip: String,
    },
    #[error("container {container}: host port {host_port:?} of {port_key} is not a port")]
    HostPort {
        container: String,
        port_key: String,
        host_port: String,
    },
    #[error("container {container} publishes {port_key} but has no address on a network")]
    NoAddress { container: String, port_key: String },
    #[error(
        "container {container}: label {LABEL_ON_PAUSE}={value:?} is not keep or reset (kept: \
         its connections wait while it is paused)"
    )]
    OnPause { container: String, value: String },
}

/// The label by which a container asks what happens to its clients while it is paused.
pub const LABEL_ON_PAUSE: &str = "dataplane.on-pause";

/// What a paused container's clients get (`dataplane.on-pause`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPause {
    /// Connections wait for it (Docker's behaviour).
    #[default]
    Keep,
    /// Its translated connections are reset and new ones refused while it is paused.
    Reset,
}

/// The container's `dataplane.on-pause` (`default` without the label); a malformed value
/// is `keep` (Docker's behaviour) and an error.
pub fn on_pause_of(
    c: &ContainerInspectResponse,
    default: OnPause,
    errors: &mut Vec<BindingError>,
) -> OnPause {
    let label = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.labels.as_ref())
        .and_then(|l| l.get(LABEL_ON_PAUSE));
    match label.map(|v| v.trim()) {
        None => default,
        Some("keep") => OnPause::Keep,
        Some("reset") => OnPause::Reset,
        Some(v) => {
            errors.push(BindingError::OnPause {
                container: c
                    .name
                    .as_deref()
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                value: v.to_string(),
            });
            OnPause::Keep
        }
    }
}

/// Marks `fs` (one container's frontends) with its pause policy and, when it is paused and
/// asked for it, as refusing new connections.
pub fn mark_pause(fs: &mut [Frontend], on_pause: OnPause, paused: bool) {
    for f in fs {
        if on_pause == OnPause::Reset {
            f.backend.flags |= BACKEND_F_RESET_ON_PAUSE;
            if paused {
                f.backend.flags |= BACKEND_F_PAUSED;
            }
        }
    }
}

/// Protocols the socket layer translates.
fn proto_of(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        _ => None,
    }
}

pub use crate::addr::{addr_to_ip, ip_to_addr, proto_name};

/// A stable id for a binding (FNV-1a over its key), used to label counters.
pub fn frontend_id(key: &FrontendKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let port = key.port_be.to_ne_bytes();
    for b in key.addr.iter().chain(port.iter()).chain([key.proto].iter()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The container's default routes as its own network namespace has them: the gateway
/// Docker chose for it. Docker maps published ports through that same endpoint (the
/// sandbox's "gateway endpoint", whatever the engine's rule for choosing it: network names,
/// `--gw-priority`, internal networks), so the backend is the container's address there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultRoutes {
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// The container's addresses that published ports lead to, and the network they are on.
///
/// Docker publishes through one endpoint: the one whose gateway is the container's default
/// route (`routes`; the IPv4 one decides, else the IPv6 one). None when the container has
/// routes but none through a Docker network (only internal networks: Docker maps nothing).
/// Without `routes` (the namespace could not be read), the first network by name on which
/// the container has an IPv4 address (what Docker 20.10 picks among equals).
fn container_addrs(
    c: &ContainerInspectResponse,
    routes: Option<&DefaultRoutes>,
) -> Option<(Addr, Addr, String)> {
    let nets = c.network_settings.as_ref()?.networks.as_ref()?;
    let mut names: Vec<&String> = nets.keys().collect();
    names.sort();
    let parse = |s: Option<&String>| -> Option<IpAddr> {
        s.filter(|s| !s.is_empty()).and_then(|s| s.parse().ok())
    };
    if let Some(r) = routes {
        let by_gw = |ep: &&bollard::models::EndpointSettings| {
            r.v4.is_some_and(|g| parse(ep.gateway.as_ref()) == Some(IpAddr::V4(g)))
        };
        let by_gw6 = |ep: &&bollard::models::EndpointSettings| {
            r.v6.is_some_and(|g| parse(ep.ipv6_gateway.as_ref()) == Some(IpAddr::V6(g)))
        };
        let ep = names
            .iter()
            .map(|n| &nets[*n])
            .find(by_gw)
            .or_else(|| names.iter().map(|n| &nets[*n]).find(by_gw6))?;
        let a4 = match parse(ep.ip_address.as_ref()) {
            Some(IpAddr::V4(v4)) => v4_mapped(v4.octets()),
            _ => [0; 16],
        };
        let a6 = match parse(ep.global_ipv6_address.as_ref()) {
            Some(IpAddr::V6(v6)) => v6.octets(),
            _ => [0; 16],
        };
        if a4 == [0; 16] && a6 == [0; 16] {
            return None;
        }
        return Some((a4, a6, ep.network_id.clone().unwrap_or_default()));
    }
    let mut fallback6 = None;
    for name in names {
        let ep = &nets[name];
        let v4 = parse(ep.ip_address.as_ref());
        let v6 = parse(ep.global_ipv6_address.as_ref());
        let net = ep.network_id.clone().unwrap_or_default();
        if let Some(IpAddr::V4(v4)) = v4 {
            let a6 = match v6 {
                Some(IpAddr::V6(v6)) => v6.octets(),
                _ => [0; 16],
            };
            return Some((v4_mapped(v4.octets()), a6, net));
        }
        if let (None, Some(IpAddr::V6(v6))) = (&fallback6, v6) {
            fallback6 = Some((v6.octets(), net));
        }
    }
    fallback6.map(|(a6, net)| ([0; 16], a6, net))
}

/// A running container as a client: its network namespace and its addresses per network.
/// Only such clients (and the host) are translated; Docker's own path serves the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The network namespace Docker keeps for it (`NetworkSettings.SandboxKey`).
    pub sandbox: Option<String>,
    pub pid: Option<i64>,
    /// (Docker network ID, the container's addresses on it).
    pub endpoints: Vec<(String, Vec<IpAddr>)>,
}

/// The container as a client, when it has a network namespace of its own on Docker
/// networks (not `--network host` or `container:`, whose namespace belongs to another).
pub fn peer_of(c: &ContainerInspectResponse) -> Option<Peer> {
    if !is_live(c) {
        return None;
    }
    let ns = c.network_settings.as_ref()?;
    let nets = ns.networks.as_ref()?;
    let mut endpoints = Vec::new();
    for ep in nets.values() {
        let Some(net) = ep.network_id.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let addrs: Vec<IpAddr> = [ep.ip_address.as_ref(), ep.global_ipv6_address.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.parse().ok())
            .collect();
        if !addrs.is_empty() {
            endpoints.push((net, addrs));
        }
    }
    if endpoints.is_empty() {
        return None;
    }
    endpoints.sort();
    Some(Peer {
        sandbox: ns.sandbox_key.clone().filter(|s| !s.is_empty()),
        pid: c.state.as_ref().and_then(|s| s.pid).filter(|p| *p > 0),
        endpoints,
    })
}

fn is_live(c: &ContainerInspectResponse) -> bool {
    // A paused container keeps its frontends: its connections resume when it does.
    c.state
        .as_ref()
        .is_some_and(|s| s.running.unwrap_or(false) || s.paused.unwrap_or(false))
        && !c
            .state
            .as_ref()
            .is_some_and(|s| s.restarting.unwrap_or(false))
}

/// The published addresses a Docker binding stands for.
///
/// Docker writes `-p P:C` ("every address") as host IP `""` in `HostConfig.PortBindings` and
/// as `0.0.0.0` (and, on newer engines, also `::`) in `NetworkSettings.Ports`. Every address
/// means both families, as docker-proxy serves `[::1]:P` too; an explicit `0.0.0.0` or `::`
/// is that family only.
fn published_addrs(host_ip: &str, requested_any: bool) -> Result<Vec<Addr>, ()> {
    match host_ip {
        "" => Ok(vec![WILDCARD4, WILDCARD6]),
        "0.0.0.0" if requested_any => Ok(vec![WILDCARD4, WILDCARD6]),
        "0.0.0.0" => Ok(vec![WILDCARD4]),
        "::" => Ok(vec![WILDCARD6]),
        other => other
            .parse::<IpAddr>()
            .map(|ip| vec![ip_to_addr(ip)])
            .map_err(|_| ()),
    }
}

/// Whether a requested host port (`""` for any, `"8080"`, or a range `"8000-8010"`) covers
/// `port`.
fn port_in(requested: &str, port: u16) -> bool {
    if requested.is_empty() {
        return true;
    }
    match requested.split_once('-') {
        Some((lo, hi)) => match (lo.parse::<u16>(), hi.parse::<u16>()) {
            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
            _ => false,
        },
        None => requested.parse::<u16>() == Ok(port),
    }
}

/// The families (IPv4, IPv6) Docker publishes no host port for: a binding on that family's
/// wildcard without a host port (a `routed` or `isolated` gateway mode, Docker 28+).
fn unpublished_families(bindings: &[bollard::models::PortBinding]) -> (bool, bool) {
    let unpublished = |wildcard: &str| {
        bindings.iter().any(|b| {
            b.host_ip.as_deref() == Some(wildcard)
                && b.host_port.as_deref().unwrap_or("").is_empty()
        })
    };
    (unpublished("0.0.0.0"), unpublished("::"))
}

/// Whether the user asked for every address (`-p P:C`, no host IP) for host port `port`.
fn requested_any_address(requested: &[bollard::models::PortBinding], port: u16) -> bool {
    requested.iter().any(|rb| {
        rb.host_ip.as_deref().unwrap_or("").is_empty()
            && port_in(rb.host_port.as_deref().unwrap_or(""), port)
    })
}

/// A container's ID and name (without Docker's leading `/`).
fn identity(c: &ContainerInspectResponse) -> (String, String) {
    let name = c.name.as_deref().unwrap_or_default();
    (
        c.id.clone().unwrap_or_default(),
        name.trim_start_matches('/').to_string(),
    )
}

/// Adds the frontend `key` -> the container's `addrs` (IPv4-mapped, IPv6) at `cport` on
/// network `net` ([`net_id`], 0 unknown), unless `out` has that key already.
fn push_frontend(
    out: &mut Vec<Frontend>,
    key: FrontendKey,
    addrs: (Addr, Addr),
    cport: u16,
    net: u32,
    (id, name): (&str, &str),
) {
    if out.iter().any(|o| o.key == key) {
        return;
    }
    out.push(Frontend {
        key,
        backend: Backend {
            addr4: addrs.0,
            addr6: addrs.1,
            port_be: cport.to_be(),
            flags: 0,
            id: frontend_id(&key),
            net,
            pad: 0,
        },
        container_id: id.to_string(),
        container_name: name.to_string(),
    });
}

/// Frontends of one container, through the endpoint its default `routes` name (see
/// [`DefaultRoutes`]). Bindings that cannot be understood are reported in `errors` and
/// skipped; the rest apply.
pub fn frontends_of(
    c: &ContainerInspectResponse,
    routes: Option<&DefaultRoutes>,
    errors: &mut Vec<BindingError>,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    if !is_live(c) {
        return out;
    }
    let (id, name) = identity(c);
    let Some(ports) = c.network_settings.as_ref().and_then(|n| n.ports.as_ref()) else {
        return out;
    };
    let requested = c
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref());
    let endpoint = container_addrs(c, routes);
    let mut port_keys: Vec<&String> = ports.keys().collect();
    port_keys.sort();
    for port_key in port_keys {
        let Some(bindings) = ports[port_key].as_ref().filter(|b| !b.is_empty()) else {
            continue; // exposed, not published
        };
        let parsed = port_key
            .split_once('/')
            .and_then(|(p, proto)| Some((p.parse::<u16>().ok()?, proto)));
        let Some((cport, proto_s)) = parsed else {
            errors.push(BindingError::PortKey {
                container: name.clone(),
                port_key: port_key.clone(),
            });
            continue;
        };
        let Some(proto) = proto_of(proto_s) else {
            continue; // sctp: not translated by the socket layer
        };
        let Some((addr4, addr6, net)) = endpoint.as_ref() else {
            errors.push(BindingError::NoAddress {
                container: name.clone(),
                port_key: port_key.clone(),
            });
            continue;
        };
        let requested = requested
            .and_then(|r| r.get(port_key))
            .and_then(Option::as_ref);
        let (unpublished4, unpublished6) = unpublished_families(bindings);
        for b in bindings {
            let host_ip = b.host_ip.as_deref().unwrap_or("");
            let host_port = b.host_port.as_deref().unwrap_or("");
            if host_port.is_empty() && matches!(host_ip, "0.0.0.0" | "::") {
                continue;
            }
            let Ok(hport) = host_port.parse::<u16>() else {
                errors.push(BindingError::HostPort {
                    container: name.clone(),
                    port_key: port_key.clone(),
                    host_port: host_port.to_string(),
                });
                continue;
            };
            let requested_any = requested.is_some_and(|r| requested_any_address(r, hport));
            let Ok(paddrs) = published_addrs(host_ip, requested_any) else {
                errors.push(BindingError::HostIp {
                    container: name.clone(),
                    port_key: port_key.clone(),
                    host_ip: host_ip.to_string(),
                });
                continue;
            };
            for addr in paddrs {
                if (addr == WILDCARD4 && unpublished4) || (addr == WILDCARD6 && unpublished6) {
                    continue;
                }
                let net = if net.is_empty() { 0 } else { net_id(net) };
                let key = FrontendKey::new(addr, hport, proto);
                push_frontend(&mut out, key, (*addr4, *addr6), cport, net, (&id, &name));
            }
        }
    }
    out
}

/// Frontends of a container Docker is starting, written before its start completes (and
/// so, usually, before its process runs): from the bindings it was created with
/// (`HostConfig.PortBindings`, from an inspect taken while it was still only created) and
/// its addresses on the network Docker has just connected it to (`network connect`).
///
/// Only the plain case, where those say exactly what Docker will publish: the container's
/// one network is `net` (a Docker `bridge` network), every binding names its host port
/// (not a range, not "any"), and the family's gateway mode is NAT. Anything else gives
/// nothing, and the container's frontends come from its inspect after the start, as
/// always; that inspect replaces these in any case.
pub fn early_frontends(
    c: &ContainerInspectResponse,
    net: &crate::docker::NetInfo,
    on_net_addrs: &[IpAddr],
) -> Vec<Frontend> {
    let mut out = Vec::new();
    let Some(hc) = c.host_config.as_ref() else {
        return out;
    };
    let mode = hc.network_mode.as_deref().unwrap_or("default");
    let on_net = match mode {
        "default" | "bridge" => net.name == "bridge",
        "host" | "none" => false,
        m if m.starts_with("container:") => false,
        m => net.name == m || net.id == m || (m.len() >= 12 && net.id.starts_with(m)),
    };
    let one_network = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .is_none_or(|n| n.len() <= 1);
    if !on_net || !one_network || net.bridge.is_none() {
        return out;
    }
    let backend4 = on_net_addrs.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(v4_mapped(v4.octets())),
        IpAddr::V6(_) => None,
    });
    let backend6 = on_net_addrs.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(v6.octets()),
        IpAddr::V4(_) => None,
    });
    if backend4.is_none() && backend6.is_none() {
        return out;
    }
    let (id, name) = identity(c);
    let Some(bindings) = hc.port_bindings.as_ref() else {
        return out;
    };
    let mut port_keys: Vec<&String> = bindings.keys().collect();
    port_keys.sort();
    for port_key in port_keys {
        let Some(list) = bindings[port_key].as_ref() else {
            continue;
        };
        let Some((cport, proto)) = port_key
            .split_once('/')
            .and_then(|(p, proto)| Some((p.parse::<u16>().ok()?, proto_of(proto)?)))
        else {
            continue;
        };
        for b in list {
            let Ok(hport) = b.host_port.as_deref().unwrap_or("").parse::<u16>() else {
                // Any port, or a range: Docker picks it at the start.
                return Vec::new();
            };
            if hport == 0 {
                return Vec::new();
            }
            // "" (every address) is both families; an explicit wildcard its own.
            let Ok(paddrs) = published_addrs(b.host_ip.as_deref().unwrap_or(""), false) else {
                return Vec::new();
            };
            for addr in paddrs {
                let v4 = is_v4_mapped(&addr);
                if (v4 && !net.nat4) || (!v4 && !net.nat6) {
                    continue;
                }
                let key = FrontendKey::new(addr, hport, proto);
                let addrs = (backend4.unwrap_or([0; 16]), backend6.unwrap_or([0; 16]));
                push_frontend(&mut out, key, addrs, cport, net_id(&net.id), (&id, &name));
            }
        }
    }
    out
}

/// Two containers claiming one published address:port/proto (Docker refuses this, so it
/// only happens with stale data): the first by container id wins, the other is reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub frontend: String,
    pub kept: String,
    pub dropped: String,
}

/// Merges per-container frontends into the map's desired content.
pub fn merge<'a>(
    per_container: impl IntoIterator<Item = &'a Frontend>,
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<FrontendKey, Frontend> {
    let mut all: Vec<&Frontend> = per_container.into_iter().collect();
    all.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    let mut out: BTreeMap<FrontendKey, Frontend> = BTreeMap::new();
    for f in all {
        if let Some(existing) = out.get(&f.key) {
            if existing.container_id != f.container_id {
                conflicts.push(Conflict {
                    frontend: describe_key(&f.key),
                    kept: existing.container_name.clone(),
                    dropped: f.container_name.clone(),
                });
            }
            continue;
        }
        out.insert(f.key, f.clone());
    }
    out
}

/// The published-ports map's desired content: which families each port/proto is
/// published on (a `bind()` there is refused).
pub fn ports_of<'a>(
    keys: impl IntoIterator<Item = &'a FrontendKey>,
) -> BTreeMap<PortKey, PortFamilies> {
    let mut out: BTreeMap<PortKey, PortFamilies> = BTreeMap::new();
    for k in keys {
        let bit = if is_v4_mapped(&k.addr) {
            PORT_F_V4
        } else {
            PORT_F_V6
        };
        out.entry(PortKey {
            port_be: k.port_be,
            proto: k.proto,
            pad: 0,
        })
        .or_insert(PortFamilies { bits: 0 })
        .bits |= bit;
    }
    out
}

/// `127.0.0.1:8080/tcp`, `[::]:8080/tcp`, `*:8080/tcp` style text for a key.
pub fn describe_key(k: &FrontendKey) -> String {
    let addr = match k.addr {
        a if a == WILDCARD4 => "0.0.0.0".to_string(),
        a if a == WILDCARD6 => "[::]".to_string(),
        a => match addr_to_ip(&a) {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        },
    };
    format!("{addr}:{}/{}", k.port(), proto_name(k.proto))
}

/// `172.17.0.2:80` (and the IPv6 address when there is one) for a backend.
pub fn describe_backend(b: &Backend) -> String {
    let mut parts = Vec::new();
    if b.addr4 != [0; 16] {
        parts.push(format!("{}:{}", addr_to_ip(&b.addr4), b.port()));
    }
    if b.addr6 != [0; 16] {
        parts.push(format!("[{}]:{}", addr_to_ip(&b.addr6), b.port()));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> ContainerInspectResponse {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // `docker inspect` prints an array; the API returns one object.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let obj = match v {
            serde_json::Value::Array(mut a) => a.remove(0),
            o => o,
        };
        serde_json::from_value(obj).unwrap()
    }

    fn keys(fs: &[Frontend]) -> Vec<String> {
        let mut k: Vec<String> = fs.iter().map(|f| describe_key(&f.key)).collect();
        k.sort();
        k
    }

    #[test]
    fn a_family_without_a_host_port_is_not_published() {
        // Docker 28, `-p 8080:80` on a network whose IPv6 (then IPv4) gateway mode is
        // `routed`: the binding for that family has no host port.
        let mut c = fixture("inspect-ports.json");
        let binding = |ip: &str, port: &str| bollard::models::PortBinding {
            host_ip: Some(ip.into()),
            host_port: Some(port.into()),
        };
        let ports = c
            .network_settings
            .as_mut()
            .and_then(|n| n.ports.as_mut())
            .unwrap();
        ports.retain(|k, _| k == "80/tcp");
        ports.insert(
            "80/tcp".into(),
            Some(vec![binding("0.0.0.0", "8080"), binding("::", "")]),
        );
        let mut errs = Vec::new();
        assert_eq!(
            keys(&frontends_of(&c, None, &mut errs)),
            vec!["0.0.0.0:8080/tcp"]
        );
        let ports = c
            .network_settings
            .as_mut()
            .and_then(|n| n.ports.as_mut())
            .unwrap();
        ports.insert("80/tcp".into(), Some(vec![binding("0.0.0.0", "")]));
        assert!(frontends_of(&c, None, &mut errs).is_empty());
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn publish_all_addresses_range_udp_and_ip_bound() {
        // docker run -p 8080:80 -p 127.0.0.1:9090:90 -p 7000-7001:7000-7001/udp
        let c = fixture("inspect-ports.json");
        let mut errs = Vec::new();
        let fs = frontends_of(&c, None, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            keys(&fs),
            vec![
                "0.0.0.0:7000/udp",
                "0.0.0.0:7001/udp",
                "0.0.0.0:8080/tcp",
                "127.0.0.1:9090/tcp",
                "[::]:7000/udp",
                "[::]:7001/udp",
                "[::]:8080/tcp",
            ]
        );
        let web = fs.iter().find(|f| f.key.port() == 8080).unwrap();
        assert_eq!(describe_backend(&web.backend), "172.17.0.2:80");
        assert_eq!(web.container_name, "t1");
        let udp = fs.iter().find(|f| f.key.port() == 7001).unwrap();
        assert_eq!(udp.key.proto, PROTO_UDP);
        assert_eq!(udp.backend.port(), 7001);
    }

    #[test]
    fn explicit_family_wildcards_and_same_port_twice() {
        // docker run -p 0.0.0.0:8081:80 -p 8082:80 --network net-b (also on net-a, IPv6)
        let c = fixture("inspect-multinet.json");
        let mut errs = Vec::new();
        let fs = frontends_of(&c, None, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            keys(&fs),
            vec!["0.0.0.0:8081/tcp", "0.0.0.0:8082/tcp", "[::]:8082/tcp"]
        );
        for f in &fs {
            assert_eq!(f.backend.port(), 80);
            // net-a sorts before net-b: its addresses are the backend.
            assert_eq!(
                describe_backend(&f.backend),
                "172.30.0.2:80 [fd00:dead:beef::2]:80"
            );
        }
    }

    #[test]
    fn the_backend_is_on_the_network_of_the_default_route() {
        let c = fixture("inspect-multinet.json");
        let describe = |r: &DefaultRoutes| {
            let fs = frontends_of(&c, Some(r), &mut Vec::new());
            fs.iter()
                .map(|f| describe_backend(&f.backend))
                .collect::<std::collections::BTreeSet<_>>()
        };
        // Docker's gateway endpoint on net-b (sorting second: a priority, or the order it
        // was connected in): the backend is there, never where names would put it.
        let via_b = DefaultRoutes {
            v4: Some("172.31.0.1".parse().unwrap()),
            v6: None,
        };
        assert_eq!(describe(&via_b), ["172.31.0.2:80".to_string()].into());
        let via_a = DefaultRoutes {
            v4: Some("172.30.0.1".parse().unwrap()),
            v6: Some("fd00:dead:beef::1".parse().unwrap()),
        };
        assert_eq!(
            describe(&via_a),
            ["172.30.0.2:80 [fd00:dead:beef::2]:80".to_string()].into()
        );
        // Only an IPv6 default route: it decides.
        let v6_only = DefaultRoutes {
            v4: None,
            v6: Some("fd00:dead:beef::1".parse().unwrap()),
        };
        assert_eq!(
            describe(&v6_only),
            ["172.30.0.2:80 [fd00:dead:beef::2]:80".to_string()].into()
        );
        // No default route through any of its networks (internal networks only): Docker
        // maps nothing, and neither do we.
        let mut errs = Vec::new();
        assert!(frontends_of(&c, Some(&DefaultRoutes::default()), &mut errs).is_empty());
        assert!(!errs.is_empty());
    }

    #[test]
    fn stopped_container_has_no_frontends_paused_keeps_them() {
        let mut c = fixture("inspect-ports.json");
        let mut errs = Vec::new();
        c.state.as_mut().unwrap().running = Some(false);
        assert!(frontends_of(&c, None, &mut errs).is_empty());
        c.state.as_mut().unwrap().paused = Some(true);
        assert_eq!(frontends_of(&c, None, &mut errs).len(), 7);
    }

    #[test]
    fn on_pause_reset_marks_a_paused_containers_frontends() {
        let mut c = fixture("inspect-ports.json");
        let mut errs = Vec::new();
        let label = |c: &mut ContainerInspectResponse, v: &str| {
            c.config
                .get_or_insert_with(Default::default)
                .labels
                .get_or_insert_with(Default::default)
                .insert(LABEL_ON_PAUSE.into(), v.into());
        };
        // No label: the host default.
        assert_eq!(on_pause_of(&c, OnPause::Keep, &mut errs), OnPause::Keep);
        assert_eq!(on_pause_of(&c, OnPause::Reset, &mut errs), OnPause::Reset);
        label(&mut c, "reset");
        assert_eq!(on_pause_of(&c, OnPause::Keep, &mut errs), OnPause::Reset);
        assert!(errs.is_empty());
        label(&mut c, "sometimes");
        assert_eq!(on_pause_of(&c, OnPause::Reset, &mut errs), OnPause::Keep);
        assert!(errs[0].to_string().contains("sometimes"), "{}", errs[0]);
        let mut fs = frontends_of(&c, None, &mut errs);
        mark_pause(&mut fs, OnPause::Reset, false);
        assert!(
            fs.iter()
                .all(|f| f.backend.flags == BACKEND_F_RESET_ON_PAUSE)
        );
        mark_pause(&mut fs, OnPause::Reset, true);
        assert!(fs.iter().all(|f| f.backend.flags & BACKEND_F_PAUSED != 0));
        let mut kept = frontends_of(&c, None, &mut errs);
        mark_pause(&mut kept, OnPause::Keep, true);
        assert!(
            kept.iter().all(|f| f.backend.flags == 0),
            "keep: paused is nothing"
        );
    }

    #[test]
    fn malformed_bindings_are_reported_not_applied() {
        let mut c = fixture("inspect-ports.json");
        let ports = c.network_settings.as_mut().unwrap().ports.as_mut().unwrap();
        let mut b = ports["80/tcp"].clone().unwrap();
        b[0].host_ip = Some("not-an-ip".into());
        ports.insert("80/tcp".into(), Some(b));
        let mut b = ports["90/tcp"].clone().unwrap();
        b[0].host_port = Some("99999".into());
        ports.insert("90/tcp".into(), Some(b));
        ports.insert("x/tcp".into(), ports["7000/udp"].clone());
        let mut errs = Vec::new();
        let fs = frontends_of(&c, None, &mut errs);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(fs.len(), 4);
        let text = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("\"not-an-ip\""), "{text}");
        assert!(text.contains("\"99999\""), "{text}");
        assert!(text.contains("\"x/tcp\""), "{text}");
    }

    #[test]
    fn container_without_address_is_an_error() {
        let mut c = fixture("inspect-ports.json");
        c.network_settings.as_mut().unwrap().networks = None;
        let mut errs = Vec::new();
        assert!(frontends_of(&c, None, &mut errs).is_empty());
        assert!(matches!(errs[0], BindingError::NoAddress { .. }));
    }

    #[test]
    fn merge_reports_conflicts_deterministically() {
        let c = fixture("inspect-ports.json");
        let mut errs = Vec::new();
        let a = frontends_of(&c, None, &mut errs);
        let mut b = a.clone();
        for f in &mut b {
            f.container_id = "zzz".into();
            f.container_name = "other".into();
        }
        let mut conflicts = Vec::new();
        let merged = merge(b.iter().chain(a.iter()), &mut conflicts);
        assert_eq!(merged.len(), 7);
        assert!(merged.values().all(|f| f.container_name == "t1"));
        assert_eq!(conflicts.len(), 7);
        assert_eq!(conflicts[0].dropped, "other");
    }

    #[test]
    fn published_ports_by_family() {
        let c = fixture("inspect-ports.json");
        let fs = frontends_of(&c, None, &mut Vec::new());
        let ports = ports_of(fs.iter().map(|f| &f.key));
        let get = |p: u16, proto| {
            ports
                .get(&PortKey {
                    port_be: p.to_be(),
                    proto,
                    pad: 0,
                })
                .map(|f| f.bits)
        };
        assert_eq!(get(8080, PROTO_TCP), Some(PORT_F_V4 | PORT_F_V6));
        assert_eq!(get(9090, PROTO_TCP), Some(PORT_F_V4));
        assert_eq!(get(7000, PROTO_UDP), Some(PORT_F_V4 | PORT_F_V6));
        assert_eq!(get(7000, PROTO_TCP), None);
        assert_eq!(ports.len(), 4);
    }

    #[test]
    fn requested_port_ranges() {
        assert!(port_in("", 1));
        assert!(port_in("8080", 8080));
        assert!(!port_in("8080", 8081));
        assert!(port_in("8000-8010", 8005));
        assert!(!port_in("8000-8010", 8011));
        assert!(!port_in("x-y", 1));
    }

    fn created(network_mode: &str, bindings: &serde_json::Value) -> ContainerInspectResponse {
        serde_json::from_value(serde_json::json!({
            "Id": "0123456789abcdef",
            "Name": "/web",
            "State": {"Status": "created", "Running": false},
            "HostConfig": {"NetworkMode": network_mode, "PortBindings": bindings},
            "NetworkSettings": {"Networks": {"bridge": {}}}
        }))
        .unwrap()
    }

    fn bridge_net(name: &str, nat4: bool, nat6: bool) -> crate::docker::NetInfo {
        crate::docker::NetInfo {
            id: format!("{name}-id-0123456789"),
            name: name.into(),
            bridge: Some("docker0".into()),
            peers_direct: true,
            nat4,
            nat6,
            fw: crate::docker::FwInfo::default(),
        }
    }

    #[test]
    fn early_frontends_only_where_the_creation_says_what_docker_publishes() {
        let addrs: Vec<IpAddr> = vec!["172.17.0.5".parse().unwrap()];
        let net = bridge_net("bridge", true, true);
        let c = created(
            "default",
            &serde_json::json!({
                "80/tcp": [{"HostIp": "", "HostPort": "8080"}],
                "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}]
            }),
        );
        let fs = early_frontends(&c, &net, &addrs);
        assert_eq!(
            keys(&fs),
            vec!["0.0.0.0:8080/tcp", "127.0.0.1:5353/udp", "[::]:8080/tcp"]
        );
        assert!(fs.iter().all(|f| f.backend.net == net_id(&net.id)
            && f.container_name == "web"
            && f.backend.addr4 == v4_mapped([172, 17, 0, 5])));
        // An explicit family wildcard is that family only.
        let c = created(
            "bridge",
            &serde_json::json!({"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}),
        );
        assert_eq!(
            keys(&early_frontends(&c, &net, &addrs)),
            vec!["0.0.0.0:8080/tcp"]
        );
        // A family Docker routes without NAT publishes nothing.
        let routed6 = bridge_net("bridge", true, false);
        let c = created(
            "default",
            &serde_json::json!({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
        );
        assert_eq!(
            keys(&early_frontends(&c, &routed6, &addrs)),
            vec!["0.0.0.0:8080/tcp"]
        );
        // Docker picks the port at the start: nothing early.
        for port in ["", "0", "8000-8010"] {
            let c = created(
                "default",
                &serde_json::json!({"80/tcp": [{"HostIp": "", "HostPort": port}]}),
            );
            assert!(early_frontends(&c, &net, &addrs).is_empty(), "{port}");
        }
        // Another network than the one connected, the host's, or no address: nothing.
        let c = created(
            "mynet",
            &serde_json::json!({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
        );
        assert!(early_frontends(&c, &net, &addrs).is_empty());
        assert_eq!(
            early_frontends(&c, &bridge_net("mynet", true, true), &addrs).len(),
            2
        );
        let c = created(
            "host",
            &serde_json::json!({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
        );
        assert!(early_frontends(&c, &net, &addrs).is_empty());
        let c = created(
            "default",
            &serde_json::json!({"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
        );
        assert!(early_frontends(&c, &net, &[]).is_empty());
        // Two networks: which one Docker publishes through is decided at the start.
        let mut two = c.clone();
        two.network_settings
            .as_mut()
            .unwrap()
            .networks
            .as_mut()
            .unwrap()
            .insert("other".into(), bollard::models::EndpointSettings::default());
        assert!(early_frontends(&two, &net, &addrs).is_empty());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = FrontendKey::new(WILDCARD4, 8080, PROTO_TCP);
        let b = FrontendKey::new(WILDCARD6, 8080, PROTO_TCP);
        assert_eq!(frontend_id(&a), frontend_id(&a));
        assert_ne!(frontend_id(&a), frontend_id(&b));
    }
}
