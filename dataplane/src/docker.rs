//! Docker as the source of desired state: list, inspect and the events stream (bollard).

use std::collections::HashMap;

use anyhow::{Context, Result};
use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum},
    query_parameters::{EventsOptions, ListContainersOptions},
};

/// Connects to the engine's Unix socket and agrees on an API version it speaks.
pub async fn connect(socket: &str) -> Result<Docker> {
    if !std::path::Path::new(socket).exists() {
        anyhow::bail!(
            "no Docker socket at {socket}: is dockerd running? (`cargo xtask run` starts one)"
        );
    }
    let docker = Docker::connect_with_unix(socket, 30, API_DEFAULT_VERSION)
        .with_context(|| format!("connecting to Docker at {socket}"))?;
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("talking to Docker at {socket} (permission denied needs root)"))
}

/// Ids of the running (and paused) containers.
pub async fn running_ids(docker: &Docker) -> Result<Vec<String>> {
    let mut filters = HashMap::new();
    filters.insert(
        "status".to_string(),
        vec!["running".to_string(), "paused".to_string()],
    );
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .context("listing containers")?;
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

/// The events the agent listens to.
pub fn events(
    docker: &Docker,
) -> impl futures_util::Stream<Item = Result<EventMessage, bollard::errors::Error>> + use<> {
    let mut filters = HashMap::new();
    filters.insert(
        "type".to_string(),
        vec!["container".to_string(), "network".to_string()],
    );
    docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }))
}

/// What an event means for the frontends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Inspect this container again and replace its frontends.
    Refresh(String),
    /// The container is gone: drop its frontends without asking Docker.
    Remove(String),
    /// Nothing to do.
    Ignore,
}

/// Maps one Docker event to its effect. One inspect per changed container, never a full
/// list: the agent must not slow Docker down.
pub fn effect(ev: &EventMessage) -> Effect {
    let action = ev.action.as_deref().unwrap_or("");
    // Health checks and execs arrive as "exec_start: sh -c ..." and "health_status: ...".
    let verb = action.split(':').next().unwrap_or("").trim();
    let actor = ev.actor.as_ref();
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let Some(id) = actor.and_then(|a| a.id.clone()) else {
                return Effect::Ignore;
            };
            match verb {
                "start" | "restart" | "die" | "stop" | "kill" | "pause" | "unpause" | "rename"
                | "oom" | "update" => Effect::Refresh(id),
                "destroy" => Effect::Remove(id),
                _ => Effect::Ignore,
            }
        }
        Some(EventMessageTypeEnum::NETWORK) => match verb {
            "connect" | "disconnect" => actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|attrs| attrs.get("container"))
                .map_or(Effect::Ignore, |id| Effect::Refresh(id.clone())),
            _ => Effect::Ignore,
        },
        _ => Effect::Ignore,
    }
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
            ..Default::default()
        }
    }

    #[test]
    fn container_lifecycle_events() {
        use EventMessageTypeEnum::CONTAINER as C;
        for a in [
            "start", "die", "stop", "kill", "pause", "unpause", "rename", "restart",
        ] {
            assert_eq!(
                effect(&ev(C, a, "abc", &[])),
                Effect::Refresh("abc".into()),
                "{a}"
            );
        }
        assert_eq!(
            effect(&ev(C, "destroy", "abc", &[])),
            Effect::Remove("abc".into())
        );
        assert_eq!(
            effect(&ev(C, "exec_start: sh -c true", "abc", &[])),
            Effect::Ignore
        );
        assert_eq!(
            effect(&ev(C, "health_status: healthy", "abc", &[])),
            Effect::Ignore
        );
        assert_eq!(effect(&ev(C, "create", "abc", &[])), Effect::Ignore);
    }

    #[test]
    fn network_events_name_the_container() {
        use EventMessageTypeEnum::NETWORK as N;
        let e = ev(
            N,
            "connect",
            "netid",
            &[("container", "abc"), ("name", "net-a")],
        );
        assert_eq!(effect(&e), Effect::Refresh("abc".into()));
        let e = ev(N, "disconnect", "netid", &[("container", "abc")]);
        assert_eq!(effect(&e), Effect::Refresh("abc".into()));
        assert_eq!(effect(&ev(N, "create", "netid", &[])), Effect::Ignore);
        assert_eq!(effect(&ev(N, "connect", "netid", &[])), Effect::Ignore);
    }

    #[test]
    fn recorded_event_json_parses() {
        // As dockerd 20.10 sends it on /events.
        let raw = r#"{"status":"start","id":"c787","from":"dptest:latest","Type":"container","Action":"start","Actor":{"ID":"c787","Attributes":{"image":"dptest:latest","name":"t1"}},"scope":"local","time":1763900000,"timeNano":1763900000000000000}"#;
        let e: EventMessage = serde_json::from_str(raw).unwrap();
        assert_eq!(effect(&e), Effect::Refresh("c787".into()));
    }
}
