//! The control socket `bridge-ctl` talks to: root-only, one request line, one JSON answer.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

pub use dataplane_api::DEFAULT_SOCKET;
use dataplane_api::{ErrorReply, MAX_REQUEST_BYTES, Request, TIMEOUT};

pub use crate::report::status::{FrontendRow, Shared, State};

/// A request only the agent loop can answer (egress: it changes or reads the kernel's
/// state), with where its answer (JSON text) goes.
pub type Forwarded = (Request, tokio::sync::oneshot::Sender<String>);

/// Removes the socket file when dropped.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket (mode 0600) and serves requests until the task is dropped.
pub fn serve(
    path: &Path,
    shared: Shared,
    forward: tokio::sync::mpsc::Sender<Forwarded>,
) -> Result<SocketGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed agent: the lock in `main` proved no agent owns it.
    let _ = std::fs::remove_file(path);
    // Created 0600 (no window in which another user could connect), then checked.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            let forward = forward.clone();
            tokio::spawn(async move {
                // Root only, whatever the socket's mode: the peer's credentials decide.
                if !stream.peer_cred().is_ok_and(|c| c.uid() == 0) {
                    return;
                }
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                // One short request line, read within a bound time: a slow or flooding
                // client costs one small task, never the agent.
                let mut reader = BufReader::new(r.take(MAX_REQUEST_BYTES));
                let read = reader.read_line(&mut line);
                if !matches!(tokio::time::timeout(TIMEOUT, read).await, Ok(Ok(_))) {
                    return;
                }
                let answer = match Request::parse(&line) {
                    Ok(r @ (Request::EgressShow(_) | Request::EgressSet(_))) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        if forward.send((r, tx)).await.is_err() {
                            return;
                        }
                        match tokio::time::timeout(TIMEOUT, rx).await {
                            Ok(Ok(a)) => a,
                            _ => error_reply("the agent did not answer in time"),
                        }
                    }
                    _ => answer(&line, &shared),
                };
                let write = async {
                    w.write_all(answer.as_bytes()).await?;
                    w.write_all(b"\n").await
                };
                let _ = tokio::time::timeout(TIMEOUT, write).await;
            });
        }
    });
    Ok(SocketGuard(path.to_path_buf()))
}

fn answer(line: &str, shared: &Shared) -> String {
    let (status, frontends, kernel) = {
        let st = shared.lock().expect("status lock");
        match Request::parse(line) {
            Ok(Request::Status) => (Some(st.status.clone()), None, st.kernel.clone()),
            Ok(Request::Frontends) => (None, Some(st.frontends.clone()), st.kernel.clone()),
            _ => (None, None, None),
        }
    };
    let text = match (status, frontends) {
        (Some(mut s), _) => {
            // The counters as the kernel has them now.
            if let Some(k) = &kernel {
                s.counters = dataplane_common::STAT_NAMES
                    .iter()
                    .zip(k.stats())
                    .map(|(n, v)| ((*n).to_string(), v))
                    .collect();
                s.counters_unix_ms = crate::report::status::now_ms();
            }
            serde_json::to_string(&s)
        }
        (None, Some(rows)) => {
            let per = kernel.map(|k| k.frontend_counters());
            let views: Vec<dataplane_api::Frontend> = rows
                .into_iter()
                .map(|mut f| {
                    if let Some(c) = per.as_ref().and_then(|p| p.get(&f.id)) {
                        f.view.connections = *c;
                    }
                    f.view
                })
                .collect();
            serde_json::to_string(&views)
        }
        (None, None) => match Request::parse(line) {
            Err(error) => serde_json::to_string(&ErrorReply { error }),
            Ok(_) => serde_json::to_string(&ErrorReply {
                error: "not served here".into(),
            }),
        },
    };
    text.unwrap_or_else(|e| {
        serde_json::to_string(&ErrorReply {
            error: e.to_string(),
        })
        .unwrap_or_default()
    })
}

/// An [`ErrorReply`] as its line.
pub fn error_reply(error: impl Into<String>) -> String {
    serde_json::to_string(&ErrorReply {
        error: error.into(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn answers_status_frontends_and_unknown() {
        let shared: Shared = Arc::default();
        {
            let mut s = shared.lock().unwrap();
            s.status.ready = true;
            s.frontends.push(FrontendRow {
                view: dataplane_api::Frontend {
                    frontend: "0.0.0.0:8080/tcp".into(),
                    container: "web".into(),
                    container_id: "abc".into(),
                    backend: "172.17.0.2:80".into(),
                    connections: 3,
                    on_pause: "reset".into(),
                    paused: true,
                },
                id: 7,
            });
        }
        let st: dataplane_api::Status = serde_json::from_str(&answer("status\n", &shared)).unwrap();
        assert!(st.ready);
        let v: serde_json::Value = serde_json::from_str(&answer("status", &shared)).unwrap();
        assert!(v.get("frontends_list").is_none() && v.get("id").is_none());
        let fs: Vec<dataplane_api::Frontend> =
            serde_json::from_str(&answer("frontends", &shared)).unwrap();
        assert_eq!(fs[0].container, "web");
        assert_eq!(fs[0].connections, 3);
        assert!(fs[0].paused && fs[0].on_pause == "reset");
        let v: serde_json::Value = serde_json::from_str(&answer("frontends", &shared)).unwrap();
        assert!(v[0].get("id").is_none());
        let e: ErrorReply = serde_json::from_str(&answer("bogus", &shared)).unwrap();
        assert!(e.error.contains("bogus"));
    }

    /// Counters a test sets: the programs' by `STAT_*` index, and per frontend id.
    #[derive(Debug)]
    struct Counters(Vec<u64>, std::collections::BTreeMap<u32, u64>);

    impl crate::report::status::KernelCounters for Counters {
        fn stats(&self) -> Vec<u64> {
            self.0.clone()
        }

        fn frontend_counters(&self) -> std::collections::BTreeMap<u32, u64> {
            self.1.clone()
        }
    }

    #[test]
    fn counters_are_the_kernels_at_the_time_of_asking() {
        let shared: Shared = Arc::default();
        let stats: Vec<u64> = (1..=dataplane_common::STAT_NAMES.len() as u64).collect();
        {
            let mut s = shared.lock().unwrap();
            s.frontends.push(FrontendRow {
                view: dataplane_api::Frontend {
                    frontend: "0.0.0.0:8080/tcp".into(),
                    connections: 3,
                    ..Default::default()
                },
                id: 7,
            });
            s.kernel = Some(Arc::new(Counters(stats, [(7, 42)].into())));
        }
        let st: dataplane_api::Status = serde_json::from_str(&answer("status", &shared)).unwrap();
        let first = dataplane_common::STAT_NAMES[0];
        assert_eq!(st.counters.get(first), Some(&1), "{:?}", st.counters);
        assert_eq!(st.counters.len(), dataplane_common::STAT_NAMES.len());
        assert!(st.counters_unix_ms > 0);
        let fs: Vec<dataplane_api::Frontend> =
            serde_json::from_str(&answer("frontends", &shared)).unwrap();
        assert_eq!(fs[0].connections, 42);
    }
}
