//! What the agent's loop receives: one typed [`Input`] per thing that happened. Docker's
//! events are mapped by a pure function here ([`docker_event`]), and nothing outside this
//! module reads a raw one; netlink and nftables notifications are parsed where they arrive
//! (`netlink`, `netfilter::changes`) and reach the loop as [`Input::Addresses`] and
//! [`Input::Ruleset`].

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};

use crate::model::ContainerId;

/// One thing the loop serves.
#[derive(Debug)]
pub enum Input {
    /// Docker's events, in order (a burst arrives as one batch: it costs one apply).
    Docker(Vec<DockerEvent>),
    /// Docker's events stream failed or ended: what Docker does meanwhile is unseen.
    EventsLost(String),
    /// The stream is open again: a full resync catches up.
    EventsBack,
    /// A container's inspect as created (asked for at its `create`).
    Created(ContainerId, Box<ContainerInspectResponse>),
    /// The host's addresses or links changed (netlink).
    Addresses,
    /// The host's ruleset changed (nftables notifications).
    Ruleset,
    /// A request from `bridge-ctl`, and where its answer goes.
    Control(dataplane_api::Request, tokio::sync::oneshot::Sender<String>),
    /// A host name's lookup for the egress allow-lists finished.
    Lookup(String, LookupResult),
    /// A timer that was due.
    Timer(Timer),
    /// `SIGHUP`: read the config file again.
    Reload,
    /// `SIGTERM` or `SIGINT`: stop (which one).
    Stop(&'static str),
}

/// A host name's addresses and when to look again, or why the lookup failed.
pub type LookupResult = Result<(std::collections::BTreeSet<IpAddr>, Instant), String>;

/// The loop's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A failed apply is tried again.
    Retry,
    /// Allow-list names are due for a lookup.
    Lookups,
    /// A new container's veths are looked for again (egress).
    EgressPorts,
    /// The egress table is read back (it changed).
    EgressCheck,
    /// The own-firewall table is read back (it changed).
    OwnFirewallCheck,
    /// Everything is read from Docker again (repairs any drift).
    Resync,
    /// The packet layer's idle flows are removed.
    Flows,
    /// The egress table's drop counters are read (for the metrics).
    EgressCounters,
}

/// A Docker event, as the agent understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerEvent {
    /// `container create`: its name and `dataplane.*` labels (its egress policy is ready
    /// before it starts).
    Created {
        id: ContainerId,
        name: String,
        labels: BTreeMap<String, String>,
    },
    /// `container start`, with Docker's time for it (ns).
    Started { id: ContainerId, at_ns: Option<i64> },
    /// `container pause`, with Docker's time for it (ns).
    Paused { id: ContainerId, at_ns: Option<i64> },
    /// `container die`: not running any more (a restart policy may start it again).
    Died { id: ContainerId },
    /// Another change its inspect tells: restart, stop, kill, unpause, rename, oom, update
    /// (Docker's verb).
    Changed { id: ContainerId, action: String },
    /// `container destroy`: gone, without asking Docker.
    Destroyed { id: ContainerId },
    /// `network connect`: Docker connected the container to the network (before its start
    /// completes, when it is being started).
    Connected {
        network: String,
        container: ContainerId,
    },
    /// `network disconnect`.
    Disconnected {
        network: String,
        container: ContainerId,
    },
    /// Networks were created, removed or updated (Docker's verb): list them again.
    Networks { action: String },
    /// Anything else (exec, health checks, attach...): counted, nothing to do.
    Other { typ: String, action: String },
}

impl DockerEvent {
    /// The container whose inspect changes with this event, if any.
    pub fn refreshes(&self) -> Option<&ContainerId> {
        match self {
            Self::Started { id, .. }
            | Self::Paused { id, .. }
            | Self::Died { id }
            | Self::Changed { id, .. } => Some(id),
            Self::Connected { container, .. } | Self::Disconnected { container, .. } => {
                Some(container)
            }
            Self::Created { .. }
            | Self::Destroyed { .. }
            | Self::Networks { .. }
            | Self::Other { .. } => None,
        }
    }

    /// The event's type and Docker's verb, for the metrics.
    pub fn kind(&self) -> (&str, &str) {
        match self {
            Self::Created { .. } => ("container", "create"),
            Self::Started { .. } => ("container", "start"),
            Self::Paused { .. } => ("container", "pause"),
            Self::Died { .. } => ("container", "die"),
            Self::Changed { action, .. } => ("container", action),
            Self::Destroyed { .. } => ("container", "destroy"),
            Self::Connected { .. } => ("network", "connect"),
            Self::Disconnected { .. } => ("network", "disconnect"),
            Self::Networks { action } => ("network", action),
            Self::Other { typ, action } => (typ, action),
        }
    }

    /// The network this event names, if it is a network's event about a container.
    pub fn network(&self) -> Option<&str> {
        match self {
            Self::Connected { network, .. } | Self::Disconnected { network, .. } => Some(network),
            _ => None,
        }
    }
}

/// What one raw Docker event means. One inspect per changed container, never a full
/// list: the agent must not slow Docker down.
pub fn docker_event(ev: &EventMessage) -> DockerEvent {
    let action = ev.action.as_deref().unwrap_or("");
    // Health checks and execs arrive as "exec_start: sh -c ..." and "health_status: ...".
    let verb = action.split(':').next().unwrap_or("").trim();
    let actor = ev.actor.as_ref();
    let id = actor.and_then(|a| a.id.as_deref()).map(ContainerId::from);
    let attr = |k: &str| {
        actor
            .and_then(|a| a.attributes.as_ref())
            .and_then(|attrs| attrs.get(k))
            .cloned()
    };
    let other = || DockerEvent::Other {
        typ: ev
            .typ
            .map_or_else(|| "unknown".to_string(), |t| t.to_string()),
        action: verb.to_string(),
    };
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let Some(id) = id else { return other() };
            match verb {
                "create" => DockerEvent::Created {
                    name: attr("name").unwrap_or_default(),
                    labels: actor
                        .and_then(|a| a.attributes.as_ref())
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| k.starts_with("dataplane."))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    id,
                },
                "start" => DockerEvent::Started {
                    id,
                    at_ns: ev.time_nano,
                },
                "pause" => DockerEvent::Paused {
                    id,
                    at_ns: ev.time_nano,
                },
                "die" => DockerEvent::Died { id },
                "restart" | "stop" | "kill" | "unpause" | "rename" | "oom" | "update" => {
                    DockerEvent::Changed {
                        id,
                        action: verb.to_string(),
                    }
                }
                "destroy" => DockerEvent::Destroyed { id },
                _ => other(),
            }
        }
        Some(EventMessageTypeEnum::NETWORK) => {
            let net = actor.and_then(|a| a.id.clone());
            match (verb, net, attr("container")) {
                ("connect", Some(network), Some(c)) => DockerEvent::Connected {
                    network,
                    container: c.into(),
                },
                ("disconnect", Some(network), Some(c)) => DockerEvent::Disconnected {
                    network,
                    container: c.into(),
                },
                ("create" | "destroy" | "remove" | "update", _, _) => DockerEvent::Networks {
                    action: verb.to_string(),
                },
                _ => other(),
            }
        }
        _ => other(),
    }
}

/// The latest event time (unix seconds) of a batch, from `since` on: where a new events
/// stream starts, so nothing is missed while it was down.
pub fn latest_time(since: i64, batch: &[EventMessage]) -> i64 {
    batch.iter().filter_map(|e| e.time).fold(since, i64::max)
}

#[cfg(test)]
mod tests {
    use bollard::models::EventActor;

    use super::*;

    fn ev(
        typ: EventMessageTypeEnum,
        action: &str,
        id: &str,
        attrs: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                        .collect(),
                ),
            }),
            time: Some(1_763_900_000),
            time_nano: Some(1_763_900_000_000_000_123),
            ..Default::default()
        }
    }

    #[test]
    fn container_lifecycle_events() {
        use EventMessageTypeEnum::CONTAINER as C;
        let id = ContainerId::from("abc");
        for a in [
            "restart", "stop", "kill", "unpause", "rename", "oom", "update",
        ] {
            let e = docker_event(&ev(C, a, "abc", &[]));
            assert_eq!(
                e,
                DockerEvent::Changed {
                    id: id.clone(),
                    action: a.to_string()
                },
                "{a}"
            );
            assert_eq!(e.refreshes(), Some(&id));
            assert_eq!(e.kind(), ("container", a), "the metrics keep Docker's verb");
        }
        let start = docker_event(&ev(C, "start", "abc", &[]));
        assert_eq!(
            start,
            DockerEvent::Started {
                id: id.clone(),
                at_ns: Some(1_763_900_000_000_000_123)
            }
        );
        assert_eq!(start.refreshes(), Some(&id));
        assert!(matches!(
            docker_event(&ev(C, "pause", "abc", &[])),
            DockerEvent::Paused { at_ns: Some(_), .. }
        ));
        assert_eq!(
            docker_event(&ev(C, "die", "abc", &[])),
            DockerEvent::Died { id: id.clone() }
        );
        let gone = docker_event(&ev(C, "destroy", "abc", &[]));
        assert_eq!(gone, DockerEvent::Destroyed { id: id.clone() });
        assert_eq!(
            gone.refreshes(),
            None,
            "a destroyed container is not inspected"
        );
        for a in ["exec_start: sh -c true", "health_status: healthy", "attach"] {
            let e = docker_event(&ev(C, a, "abc", &[]));
            assert!(matches!(e, DockerEvent::Other { .. }), "{a}");
            assert_eq!(e.refreshes(), None);
        }
        assert_eq!(
            docker_event(&ev(C, "health_status: healthy", "abc", &[])).kind(),
            ("container", "health_status")
        );
    }

    #[test]
    fn create_carries_name_and_only_the_agents_labels() {
        let e = docker_event(&ev(
            EventMessageTypeEnum::CONTAINER,
            "create",
            "abc",
            &[
                ("name", "web"),
                ("image", "x"),
                ("dataplane.egress", "deny"),
                ("com.example", "y"),
            ],
        ));
        let DockerEvent::Created { id, name, labels } = e else {
            panic!("{e:?}")
        };
        assert_eq!((id.as_str(), name.as_str()), ("abc", "web"));
        assert_eq!(labels.len(), 1);
        assert_eq!(labels["dataplane.egress"], "deny");
    }

    #[test]
    fn network_events_name_the_container() {
        use EventMessageTypeEnum::NETWORK as N;
        let e = docker_event(&ev(
            N,
            "connect",
            "netid",
            &[("container", "abc"), ("name", "net-a")],
        ));
        assert_eq!(
            e,
            DockerEvent::Connected {
                network: "netid".into(),
                container: "abc".into()
            }
        );
        assert_eq!(e.refreshes(), Some(&ContainerId::from("abc")));
        assert_eq!(e.network(), Some("netid"));
        let e = docker_event(&ev(N, "disconnect", "netid", &[("container", "abc")]));
        assert_eq!(e.refreshes(), Some(&ContainerId::from("abc")));
        for a in ["create", "destroy", "remove", "update"] {
            let e = docker_event(&ev(N, a, "netid", &[]));
            assert_eq!(
                e,
                DockerEvent::Networks {
                    action: a.to_string()
                }
            );
            assert_eq!(e.kind(), ("network", a));
        }
        // A connect that names no container: nothing to do.
        assert!(matches!(
            docker_event(&ev(N, "connect", "netid", &[])),
            DockerEvent::Other { .. }
        ));
    }

    #[test]
    fn recorded_event_json_parses() {
        // As dockerd 20.10 sends it on /events.
        let raw = r#"{"status":"start","id":"c787","from":"dptest:latest","Type":"container","Action":"start","Actor":{"ID":"c787","Attributes":{"image":"dptest:latest","name":"t1"}},"scope":"local","time":1763900000,"timeNano":1763900000000000000}"#;
        let e: EventMessage = serde_json::from_str(raw).unwrap();
        assert_eq!(
            docker_event(&e),
            DockerEvent::Started {
                id: "c787".into(),
                at_ns: Some(1_763_900_000_000_000_000)
            }
        );
        assert_eq!(latest_time(5, &[e]), 1_763_900_000);
        assert_eq!(latest_time(1_763_900_001, &[]), 1_763_900_001);
    }
}
