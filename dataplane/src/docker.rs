//! Docker as the source of desired state: list, inspect and the events stream (bollard).

use std::collections::HashMap;

use anyhow::{Context, Result};
use bollard::{
    API_DEFAULT_VERSION, ClientVersion, Docker,
    models::Network,
    models::{ContainerInspectResponse, EventMessage},
    query_parameters::{EventsOptions, ListContainersOptions},
};

/// Connects to the engine's Unix socket and agrees on an API version it speaks. Returns the
/// engine's version too (from `/_ping`'s `Server` header: a ping costs Docker far less than
/// `/version`, which asks containerd and the runtimes).
pub async fn connect(socket: &str) -> Result<(Docker, String)> {
    if !std::path::Path::new(socket).exists() {
        anyhow::bail!(
            "no Docker socket at {socket}: is dockerd running? (`cargo xtask run` starts one)"
        );
    }
    let ping = ping(socket)
        .await
        .with_context(|| format!("talking to Docker at {socket} (permission denied needs root)"))?;
    let default = (
        API_DEFAULT_VERSION.major_version,
        API_DEFAULT_VERSION.minor_version,
    );
    let (major_version, minor_version) = ping.api.filter(|v| *v < default).unwrap_or(default);
    let version = ClientVersion {
        major_version,
        minor_version,
    };
    let docker = Docker::connect_with_unix(socket, 30, &version)
        .with_context(|| format!("connecting to Docker at {socket}"))?;
    if ping.api.is_some() {
        return Ok((docker, ping.engine));
    }
    // No API version in the ping's answer: agreed the long way.
    let docker = docker
        .negotiate_version()
        .await
        .with_context(|| format!("talking to Docker at {socket}"))?;
    let engine = docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_default();
    Ok((docker, engine))
}

/// What `/_ping` says: the API version, and the engine's version.
#[derive(Debug, PartialEq, Eq)]
pub struct Ping {
    pub api: Option<(usize, usize)>,
    pub engine: String,
}

async fn ping(socket: &str) -> std::io::Result<Ping> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.take(16 * 1024).read_to_end(&mut head),
    )
    .await
    .map_err(|_| std::io::Error::other("no answer to /_ping"))??;
    let text = String::from_utf8_lossy(&head);
    if !text.starts_with("HTTP/1.") || text.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!(
            "unexpected answer to /_ping: {}",
            text.lines().next().unwrap_or("")
        )));
    }
    Ok(parse_ping(&text))
}

/// Reads `API-Version: 1.41` and `Server: Docker/20.10.24+dfsg1 (linux)` from a ping's head.
pub fn parse_ping(head: &str) -> Ping {
    let header = |name: &str| {
        head.lines().take_while(|l| !l.is_empty()).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let api = header("API-Version").and_then(|v| {
        let (a, b) = v.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let engine = header("Server")
        .and_then(|v| {
            v.strip_prefix("Docker/")
                .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    Ping { api, engine }
}

/// Containers in any of `statuses` (every one with none), as Docker lists them.
async fn list(
    docker: &Docker,
    statuses: &[&str],
) -> Result<Vec<bollard::models::ContainerSummary>> {
    let mut filters = HashMap::new();
    if !statuses.is_empty() {
        filters.insert(
            "status".to_string(),
            statuses.iter().map(ToString::to_string).collect(),
        );
    }
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .context("listing containers")
}

/// Ids of the running (and paused) containers.
pub async fn running_ids(docker: &Docker) -> Result<Vec<String>> {
    let list = list(docker, &["running", "paused"]).await?;
    Ok(list.into_iter().filter_map(|c| c.id).collect())
}

/// One container's inspect data; `None` when it no longer exists.
pub async fn inspect(docker: &Docker, id: &str) -> Result<Option<ContainerInspectResponse>> {
    match docker.inspect_container(id, None).await {
        Ok(c) => Ok(Some(c)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("inspecting container {id}")),
    }
}

/// Container `id`'s addresses on network `net`, from the network's inspect: answered while
/// Docker is still starting the container (its own inspect waits for the start).
pub async fn addresses_on(docker: &Docker, net: &str, id: &str) -> Result<Vec<std::net::IpAddr>> {
    let n = docker
        .inspect_network(
            net,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .with_context(|| format!("inspecting network {net}"))?;
    Ok(n.containers
        .unwrap_or_default()
        .get(id)
        .map(|ep| endpoint_addresses(ep.ipv4_address.as_deref(), ep.ipv6_address.as_deref()))
        .unwrap_or_default())
}

/// Addresses written `addr/prefix` (empty ones skipped).
pub fn endpoint_addresses(v4: Option<&str>, v6: Option<&str>) -> Vec<std::net::IpAddr> {
    [v4, v6]
        .into_iter()
        .flatten()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// A container's id, name and labels.
pub type Named = (String, String, HashMap<String, String>);

/// Every container, running or not, as Docker lists it.
pub async fn list_all(docker: &Docker) -> Result<Vec<bollard::models::ContainerSummary>> {
    list(docker, &[]).await
}

/// Whether a listed container runs (paused ones too).
pub fn is_running(c: &bollard::models::ContainerSummary) -> bool {
    use bollard::models::ContainerSummaryStateEnum as S;
    matches!(c.state, Some(S::RUNNING | S::PAUSED))
}

/// Id, name and labels of listed containers.
pub fn named(list: Vec<bollard::models::ContainerSummary>) -> Vec<Named> {
    list.into_iter()
        .filter_map(|c| {
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or_default();
            Some((c.id?, name, c.labels.unwrap_or_default()))
        })
        .collect()
}

/// A container Docker has created and not started yet, as it keeps it on disk
/// (`<root>/containers/<id>/config.v2.json` and `hostconfig.json`, written at the create):
/// what early frontends need (id, name, labels, networks, port bindings, network mode) when
/// the create-time inspect has not answered yet (`docker run` starts the container right
/// after creating it, and an inspect then waits for the start). `None` when the files are not
/// there (Docker's root not visible here), not of that container, or it already runs.
pub fn created_on_disk(root: &std::path::Path, id: &str) -> Option<ContainerInspectResponse> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let dir = root.join("containers").join(id);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.v2.json")).ok()?).ok()?;
    let host: bollard::models::HostConfig =
        serde_json::from_slice(&std::fs::read(dir.join("hostconfig.json")).ok()?).ok()?;
    if config.get("ID")?.as_str()? != id || config.pointer("/State/Running")?.as_bool()? {
        return None;
    }
    let labels = config
        .pointer("/Config/Labels")
        .and_then(|l| serde_json::from_value::<HashMap<String, String>>(l.clone()).ok());
    let networks = config
        .pointer("/NetworkSettings/Networks")
        .and_then(serde_json::Value::as_object)
        .map(|n| {
            n.keys()
                .map(|k| (k.clone(), bollard::models::EndpointSettings::default()))
                .collect()
        });
    Some(ContainerInspectResponse {
        id: Some(id.to_string()),
        name: config
            .get("Name")
            .and_then(|n| n.as_str())
            .map(String::from),
        config: Some(bollard::models::ContainerConfig {
            labels,
            ..Default::default()
        }),
        host_config: Some(host),
        network_settings: Some(bollard::models::NetworkSettings {
            networks,
            ..Default::default()
        }),
        state: Some(bollard::models::ContainerState {
            status: Some(bollard::models::ContainerStateStatusEnum::CREATED),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A Docker network as the agent needs it: which host interface is its bridge, and whether
/// Docker lets its containers reach published ports straight through that bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInfo {
    pub id: String,
    pub name: String,
    /// The host bridge interface (`bridge` driver only).
    pub bridge: Option<String>,
    /// Whether a container on it may be connected straight to a backend on it: a `bridge`
    /// network with inter-container communication on and not `internal`.
    pub peers_direct: bool,
    /// Whether Docker publishes its containers' IPv4 (IPv6) ports through NAT (its gateway
    /// mode, see `engine`).
    pub nat4: bool,
    pub nat6: bool,
    /// What the own-firewall mode's rules need of it.
    pub fw: FwInfo,
}

/// A bridge network's settings as Docker's rules apply them (the own-firewall mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FwInfo {
    /// Its subnets (address, prefix length).
    pub subnets: Vec<(std::net::IpAddr, u8)>,
    pub internal: bool,
    /// `com.docker.network.bridge.enable_icc` (default on).
    pub icc: bool,
    /// `com.docker.network.bridge.enable_ip_masquerade` (default on).
    pub masquerade: bool,
    /// The gateway modes' options as given (`None`: the default, `nat`).
    pub gw4: Option<String>,
    pub gw6: Option<String>,
}

impl NetInfo {
    /// From Docker's network list entry.
    pub fn from_network(n: &Network) -> Option<Self> {
        let id = n.id.clone()?;
        let name = n.name.clone().unwrap_or_default();
        let opts = n.options.clone().unwrap_or_default();
        let is_bridge = n.driver.as_deref() == Some("bridge");
        let bridge = is_bridge.then(|| {
            opts.get("com.docker.network.bridge.name")
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| format!("br-{}", id.chars().take(12).collect::<String>()))
        });
        let icc = opts
            .get("com.docker.network.bridge.enable_icc")
            .is_none_or(|v| v != "false");
        let internal = n.internal.unwrap_or(false);
        let (nat4, nat6) = crate::engine::nat_families(&opts);
        let subnets = n
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let (a, l) = c.subnet.as_deref()?.split_once('/')?;
                Some((a.parse().ok()?, l.parse().ok()?))
            })
            .collect();
        let fw = FwInfo {
            subnets,
            internal,
            icc,
            masquerade: opts
                .get("com.docker.network.bridge.enable_ip_masquerade")
                .is_none_or(|v| v != "false"),
            gw4: opts.get(crate::engine::GATEWAY_MODE_V4).cloned(),
            gw6: opts.get(crate::engine::GATEWAY_MODE_V6).cloned(),
        };
        Some(Self {
            id,
            name,
            bridge,
            peers_direct: is_bridge && icc && !internal,
            nat4,
            nat6,
            fw,
        })
    }
}

/// Docker's networks, by network ID.
pub async fn networks(docker: &Docker) -> Result<HashMap<String, NetInfo>> {
    let list = docker
        .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
        .await
        .context("listing networks")?;
    Ok(list
        .iter()
        .filter_map(NetInfo::from_network)
        .map(|n| (n.id.clone(), n))
        .collect())
}

/// The events the agent listens to.
/// The events the agent listens to, from `since` (unix seconds) on: Docker replays what
/// happened since then, so nothing that changed between a list and this subscription, or
/// while the stream was down, is missed (an event seen twice only costs an inspect).
pub fn events(
    docker: &Docker,
    since: i64,
) -> impl futures_util::Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
    let mut filters = HashMap::new();
    filters.insert(
        "type".to_string(),
        vec!["container".to_string(), "network".to_string()],
    );
    docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(filters),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_created_container_is_read_from_dockers_files() {
        let root = std::env::temp_dir().join(format!("dp-docker-root-{}", std::process::id()));
        let id = "07ed91b021f427542fc6f3854295a6e968635423cdc941c1bacdd1de19010604";
        let dir = root.join("containers").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let config = |running: bool| {
            format!(
                r#"{{"ID":"{id}","Name":"/web","State":{{"Running":{running}}},
                "Config":{{"Labels":{{"dataplane.on-pause":"reset"}}}},
                "NetworkSettings":{{"Networks":{{"bridge":{{"IPAddress":""}}}}}}}}"#
            )
        };
        std::fs::write(dir.join("config.v2.json"), config(false)).unwrap();
        std::fs::write(
            dir.join("hostconfig.json"),
            r#"{"NetworkMode":"bridge","PortBindings":{"80/tcp":[{"HostIp":"","HostPort":"8080"}]}}"#,
        )
        .unwrap();
        let c = super::created_on_disk(&root, id).unwrap();
        assert_eq!(c.name.as_deref(), Some("/web"));
        let hc = c.host_config.unwrap();
        assert_eq!(hc.network_mode.as_deref(), Some("bridge"));
        let b = &hc.port_bindings.unwrap()["80/tcp"].clone().unwrap()[0];
        assert_eq!(b.host_port.as_deref(), Some("8080"));
        assert_eq!(
            c.config.unwrap().labels.unwrap()["dataplane.on-pause"],
            "reset"
        );
        assert!(
            c.network_settings
                .unwrap()
                .networks
                .unwrap()
                .contains_key("bridge")
        );
        // Running already, another container's files, or a name that is not an id: nothing.
        std::fs::write(dir.join("config.v2.json"), config(true)).unwrap();
        assert!(super::created_on_disk(&root, id).is_none());
        assert!(super::created_on_disk(&root, &id.replace('0', "1")).is_none());
        assert!(super::created_on_disk(&root, "../../etc").is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ping_gives_api_and_engine_versions() {
        let head = "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nServer: Docker/20.10.24+dfsg1 (linux)\r\n\r\nOK";
        assert_eq!(
            super::parse_ping(head),
            super::Ping {
                api: Some((1, 41)),
                engine: "20.10.24+dfsg1".into()
            }
        );
        let none = super::parse_ping("HTTP/1.0 200 OK\r\n\r\nServer: Docker/1 (x)");
        assert_eq!(none.api, None);
        assert_eq!(none.engine, "", "headers end at the blank line");
    }

    use super::*;

    #[test]
    fn endpoint_addresses_drop_the_prefix() {
        let a = endpoint_addresses(Some("172.18.0.2/16"), Some("fd00::2/64"));
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].to_string(), "172.18.0.2");
        assert!(endpoint_addresses(Some(""), None).is_empty());
    }

    #[test]
    fn networks_from_dockers_list() {
        let raw = r#"[
          {"Name":"bridge","Id":"aaaa1111bbbb2222","Driver":"bridge","Internal":false,
           "Options":{"com.docker.network.bridge.name":"docker0"}},
          {"Name":"lan","Id":"cccc3333dddd4444eeee","Driver":"bridge","Internal":false,"Options":{}},
          {"Name":"noicc","Id":"ffff","Driver":"bridge","Internal":false,
           "Options":{"com.docker.network.bridge.enable_icc":"false"}},
          {"Name":"inner","Id":"9999","Driver":"bridge","Internal":true,"Options":{}},
          {"Name":"host","Id":"hhhh","Driver":"host","Options":{}}
        ]"#;
        let list: Vec<Network> = serde_json::from_str(raw).unwrap();
        let nets: Vec<NetInfo> = list.iter().filter_map(NetInfo::from_network).collect();
        assert_eq!(nets[0].bridge.as_deref(), Some("docker0"));
        assert!(nets[0].peers_direct);
        assert_eq!(nets[1].bridge.as_deref(), Some("br-cccc3333dddd"));
        assert!(!nets[2].peers_direct, "icc off");
        assert!(!nets[3].peers_direct, "internal");
        assert_eq!(nets[4].bridge, None);
        assert!(!nets[4].peers_direct);
    }
}
