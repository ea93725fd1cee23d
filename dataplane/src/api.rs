//! The control socket `bridge-ctl` talks to: root-only, one request line, one JSON answer.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

pub const DEFAULT_SOCKET: &str = "/run/dataplane/ctl.sock";

/// The longest request line read.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request and to read the answer.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One published binding, as `bridge-ctl frontends` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    pub frontend: String,
    pub container: String,
    pub container_id: String,
    pub backend: String,
    /// Sockets translated through this frontend since it was created.
    pub connections: u64,
    #[serde(skip)]
    pub id: u32,
}

/// What the agent reports; written by the agent loop, read by the API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    pub version: String,
    pub docker_version: String,
    pub attach_points: Vec<String>,
    /// Unix time (ms) of the last completed sync with Docker.
    pub last_sync_unix_ms: u64,
    pub syncs: u64,
    pub containers: usize,
    pub frontends: usize,
    pub local_addresses: usize,
    /// Counters from the kernel programs.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Unix time (ms) the counters were read (every 250 ms).
    pub counters_unix_ms: u64,
    /// Bindings that could not be applied, and why.
    pub errors: Vec<String>,
    /// Container network namespaces whose clients are translated (to backends on their
    /// own networks).
    pub container_clients: usize,
    /// Why container clients are left to Docker's own path, when they are.
    pub container_clients_off: Option<String>,
    /// Why nothing is translated now (every client takes Docker's own path), when that is
    /// so: the agent cannot vouch for the maps (it lost Docker's events and has not resynced
    /// yet).
    pub translation_off: Option<String>,
    /// Why host clients' connections stay tracked by conntrack, when they do.
    pub host_clients_tracked: Option<String>,
    #[serde(skip)]
    pub frontend_list: Vec<FrontendView>,
}

pub type Shared = Arc<Mutex<Status>>;

/// Removes the socket file when dropped.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket (mode 0600) and serves requests until the task is dropped.
pub fn serve(path: &Path, shared: Shared) -> Result<SocketGuard> {
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
            tokio::spawn(async move {
                // Root only, whatever the socket's mode: the peer's credentials decide.
                if !stream.peer_cred().is_ok_and(|c| c.uid() == 0) {
                    return;
                }
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                // One short request line, read within a bound time: a slow or flooding
                // client costs one small task, never the agent.
                let mut reader = BufReader::new(r.take(MAX_REQUEST));
                let read = reader.read_line(&mut line);
                if !matches!(tokio::time::timeout(REQUEST_TIMEOUT, read).await, Ok(Ok(_))) {
                    return;
                }
                let answer = answer(line.trim(), &shared);
                let write = async {
                    w.write_all(answer.as_bytes()).await?;
                    w.write_all(b"\n").await
                };
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, write).await;
            });
        }
    });
    Ok(SocketGuard(path.to_path_buf()))
}

fn answer(request: &str, shared: &Shared) -> String {
    let st = shared.lock().expect("status lock").clone();
    let v = match request {
        "status" => serde_json::to_value(&st),
        "frontends" => serde_json::to_value(&st.frontend_list),
        other => Ok(serde_json::json!({ "error": format!("unknown request {other:?}") })),
    };
    v.map_or_else(
        |e| serde_json::json!({ "error": e.to_string() }).to_string(),
        |v| v.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_status_frontends_and_unknown() {
        let shared: Shared = Arc::default();
        {
            let mut s = shared.lock().unwrap();
            s.ready = true;
            s.frontend_list.push(FrontendView {
                frontend: "0.0.0.0:8080/tcp".into(),
                container: "web".into(),
                container_id: "abc".into(),
                backend: "172.17.0.2:80".into(),
                connections: 3,
                id: 7,
            });
        }
        let v: serde_json::Value = serde_json::from_str(&answer("status", &shared)).unwrap();
        assert_eq!(v["ready"], true);
        assert!(v.get("frontend_list").is_none());
        let v: serde_json::Value = serde_json::from_str(&answer("frontends", &shared)).unwrap();
        assert_eq!(v[0]["container"], "web");
        assert_eq!(v[0]["connections"], 3);
        assert!(v[0].get("id").is_none());
        let v: serde_json::Value = serde_json::from_str(&answer("bogus", &shared)).unwrap();
        assert!(v["error"].as_str().unwrap().contains("bogus"));
    }
}
