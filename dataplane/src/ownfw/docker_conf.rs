//! What Docker's daemon was started with, as far as this mode cares: `iptables`,
//! `ip6tables` and `userland-proxy`, from the command line of the process behind the API
//! socket (its peer credentials name it) and the config file it reads (`daemon.json`).

use std::{
    io::Read,
    os::unix::{io::AsRawFd, net::UnixStream},
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Where dockerd reads its config without `--config-file`.
pub const DEFAULT_DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// Docker's firewall settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `iptables` (default true).
    pub iptables: bool,
    /// `ip6tables`, when set (its default differs between versions).
    pub ip6tables: Option<bool>,
    /// `userland-proxy` (default true).
    pub userland_proxy: bool,
    /// Where they were read: the process and its config file.
    pub source: String,
    /// The config file changed after the daemon started (what it runs with may differ).
    pub file_changed_since_start: bool,
    /// `dns`: the resolvers Docker gives containers without `--dns` of their own.
    pub dns: Vec<std::net::IpAddr>,
    /// `exec-root`: where Docker keeps its containers' network namespaces (`netns/`).
    pub exec_root: PathBuf,
}

/// Docker's default `exec-root`.
pub const DEFAULT_EXEC_ROOT: &str = "/var/run/docker";

/// The settings of the daemon answering on `socket`.
pub fn of_daemon(socket: &str) -> Result<Settings, String> {
    let pid = peer_pid(socket)?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("reading dockerd's command line (pid {pid}): {e}"))?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The config file is read in dockerd's mount namespace: through its root.
    let file = config_file(&args);
    let in_root =
        Path::new(&format!("/proc/{pid}/root")).join(file.strip_prefix("/").unwrap_or(&file));
    let started = process_start(pid);
    let mut changed = false;
    let text = match std::fs::File::open(&in_root) {
        Ok(mut f) => {
            if let (Some(start), Ok(m)) = (started, f.metadata().and_then(|m| m.modified())) {
                // The boot time is in whole seconds: a file written just before the
                // daemon started is not taken as changed after it.
                changed = m > start + std::time::Duration::from_secs(2);
            }
            let mut s = String::new();
            f.read_to_string(&mut s)
                .map_err(|e| format!("reading {}: {e}", file.display()))?;
            Some(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    };
    let mut s = parse(&args, text.as_deref()).map_err(|e| format!("{}: {e}", file.display()))?;
    s.source = format!("dockerd (pid {pid}) and {}", file.display());
    s.file_changed_since_start = changed;
    Ok(s)
}

/// When process `pid` started (its start time after boot, plus the boot time).
fn process_start(pid: u32) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime, in clock ticks): the 20th after the command's closing paren.
    let ticks: u64 = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(btime)
            + std::time::Duration::from_millis(ticks * 1000 / hz),
    )
}

/// The pid of the process listening on the Unix socket `path`.
fn peer_pid(path: &str) -> Result<u32, String> {
    let path = path.strip_prefix("unix://").unwrap_or(path);
    let s = UnixStream::connect(path).map_err(|e| format!("connecting to {path}: {e}"))?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if r != 0 || cred.pid <= 0 {
        return Err(format!(
            "reading the peer of {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    u32::try_from(cred.pid).map_err(|_| format!("peer of {path}: pid {}", cred.pid))
}

/// The config file dockerd reads (`--config-file`).
pub fn config_file(args: &[String]) -> PathBuf {
    flag(args, "config-file").map_or_else(|| PathBuf::from(DEFAULT_DAEMON_JSON), PathBuf::from)
}

/// A flag's value: `--name=value`, `--name value`, or `--name` alone (`"true"`).
fn flag(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    let mut found = None;
    let mut it = args.iter().skip(1).peekable();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            found = Some(v.to_string());
        } else if *a == long {
            // Boolean flags take no separate value; others do.
            found = Some(match it.peek() {
                Some(v) if !v.starts_with('-') && name == "config-file" => {
                    it.next().cloned().unwrap_or_default()
                }
                _ => "true".into(),
            });
        }
    }
    found
}

fn bool_flag(args: &[String], name: &str) -> Result<Option<bool>, String> {
    flag(args, name)
        .map(|v| match v.as_str() {
            "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
            "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
            other => Err(format!("--{name}={other}: not a boolean")),
        })
        .transpose()
}

/// Settings from dockerd's arguments and its config file's text (absent: none).
pub fn parse(args: &[String], daemon_json: Option<&str>) -> Result<Settings, String> {
    let json: Value = match daemon_json.map(str::trim) {
        None | Some("") => Value::Object(serde_json::Map::new()),
        Some(t) => serde_json::from_str(t).map_err(|e| format!("not JSON: {e}"))?,
    };
    let key = |k: &str| -> Result<Option<bool>, String> {
        match json.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("\"{k}\": {v} is not true or false")),
        }
    };
    let pick =
        |name: &str| -> Result<Option<bool>, String> { Ok(bool_flag(args, name)?.or(key(name)?)) };
    Ok(Settings {
        iptables: pick("iptables")?.unwrap_or(true),
        ip6tables: pick("ip6tables")?,
        userland_proxy: pick("userland-proxy")?.unwrap_or(true),
        source: String::new(),
        file_changed_since_start: false,
        dns: dns_of(args, &json),
        exec_root: exec_root_of(args, &json),
    })
}

/// The daemon's `exec-root`: its flag, else the config file's, else Docker's default.
fn exec_root_of(args: &[String], json: &Value) -> PathBuf {
    let mut found = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--exec-root=") {
            found = Some(v.to_string());
        } else if a == "--exec-root" {
            found = it.next().cloned();
        }
    }
    found
        .or_else(|| json.get("exec-root")?.as_str().map(str::to_string))
        .map_or_else(|| PathBuf::from(DEFAULT_EXEC_ROOT), PathBuf::from)
}

/// The daemon's `dns`: every `--dns` flag, else the config file's list.
fn dns_of(args: &[String], json: &Value) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let v = match a.strip_prefix("--dns=") {
            Some(v) => Some(v.to_string()),
            None if a == "--dns" => it.next().cloned(),
            None => None,
        };
        out.extend(v.and_then(|v| v.parse::<std::net::IpAddr>().ok()));
    }
    if out.is_empty() {
        out = json
            .get("dns")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
    }
    out
}

/// Whether the agent may run in the mode asked for against these settings: the mode
/// needs Docker's rules off (and the userland proxy, which would hold the ports); the
/// default mode with Docker's rules off is allowed, with a warning the caller gives.
pub fn check(own_firewall: bool, s: &Settings) -> Result<(), String> {
    if !own_firewall {
        return Ok(());
    }
    let mut wrong = Vec::new();
    if s.iptables {
        wrong.push("\"iptables\" is on (it must be false: Docker would write its rules too)");
    }
    if s.ip6tables == Some(true) {
        wrong.push("\"ip6tables\" is on (it must be false)");
    }
    if s.userland_proxy {
        wrong
            .push("\"userland-proxy\" is on (it must be false: docker-proxy would hold the ports)");
    }
    if wrong.is_empty() && s.file_changed_since_start {
        return Err(format!(
            "--own-firewall: Docker's config file changed after the daemon started ({}): \
             restart Docker so that it runs with what the file says, then start the agent",
            s.source
        ));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(format!(
        "--own-firewall: Docker's settings disagree with this mode ({}): {}. Set \
         \"iptables\": false, \"ip6tables\": false and \"userland-proxy\": false in \
         daemon.json (`dataplane docker-config --own-firewall` shows the change, `--apply` \
         makes it) and restart Docker, or run the agent without --own-firewall",
        s.source,
        wrong.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_and_exec_root_from_flags_then_the_file() {
        let args: Vec<String> = [
            "dockerd",
            "--dns",
            "192.0.2.1",
            "--dns=192.0.2.2",
            "--exec-root",
            "/run/x",
        ]
        .map(String::from)
        .to_vec();
        let s = parse(
            &args,
            Some(r#"{"dns": ["198.51.100.1"], "exec-root": "/run/y"}"#),
        )
        .unwrap();
        assert_eq!(s.dns.len(), 2);
        assert_eq!(s.exec_root, PathBuf::from("/run/x"));
        let s = parse(
            &["dockerd".to_string()],
            Some(r#"{"dns": ["198.51.100.1"], "exec-root": "/run/y"}"#),
        )
        .unwrap();
        assert_eq!(
            s.dns,
            vec!["198.51.100.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(s.exec_root, PathBuf::from("/run/y"));
        let s = parse(&["dockerd".to_string()], None).unwrap();
        assert_eq!(s.exec_root, PathBuf::from(DEFAULT_EXEC_ROOT));
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn flags_and_file() {
        let s = parse(&args(&["dockerd"]), None).unwrap();
        assert!(s.iptables && s.userland_proxy && s.ip6tables.is_none());
        let s = parse(
            &args(&["dockerd", "--iptables=false", "--userland-proxy=false"]),
            None,
        )
        .unwrap();
        assert!(!s.iptables && !s.userland_proxy);
        let s = parse(
            &args(&["dockerd"]),
            Some(r#"{"iptables": false, "ip6tables": false, "userland-proxy": false}"#),
        )
        .unwrap();
        assert!(!s.iptables && !s.userland_proxy && s.ip6tables == Some(false));
        assert!(check(true, &s).is_ok());
        let s = parse(&args(&["dockerd", "--ip6tables"]), Some("{}")).unwrap();
        assert_eq!(s.ip6tables, Some(true));
        assert!(parse(&args(&["dockerd"]), Some(r#"{"iptables": "no"}"#)).is_err());
        assert!(parse(&args(&["dockerd", "--iptables=maybe"]), None).is_err());
        assert!(parse(&args(&["dockerd"]), Some("{")).is_err());
    }

    #[test]
    fn config_file_flag() {
        assert_eq!(
            config_file(&args(&["dockerd"])),
            PathBuf::from(DEFAULT_DAEMON_JSON)
        );
        assert_eq!(
            config_file(&args(&["dockerd", "--config-file", "/x/d.json"])),
            PathBuf::from("/x/d.json")
        );
        assert_eq!(
            config_file(&args(&["dockerd", "--config-file=/y.json", "--debug"])),
            PathBuf::from("/y.json")
        );
    }

    #[test]
    fn refusal_names_what_disagrees() {
        let s = parse(&args(&["dockerd"]), None).unwrap();
        let e = check(true, &s).unwrap_err();
        assert!(
            e.contains("\"iptables\" is on") && e.contains("userland-proxy"),
            "{e}"
        );
        assert!(check(false, &s).is_ok());
    }
}
