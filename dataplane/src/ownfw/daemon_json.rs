//! `dataplane docker-config`: the `daemon.json` change the own-firewall mode needs
//! (`"iptables": false`, `"ip6tables": false`, `"userland-proxy": false`), shown as a diff,
//! made with `--apply` (the file before it kept beside it), undone with `--undo`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

/// The keys the mode sets, and to what.
pub const KEYS: [&str; 3] = ["iptables", "ip6tables", "userland-proxy"];

/// Where the file before `--apply` is kept.
pub fn backup_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".before-dataplane");
    PathBuf::from(p)
}

/// The file's object (a missing or empty file is `{}`).
pub fn parse(text: Option<&str>) -> Result<Map<String, Value>, String> {
    match text.map(str::trim) {
        None | Some("") => Ok(Map::new()),
        Some(t) => match serde_json::from_str(t) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("not a JSON object".into()),
            Err(e) => Err(format!("not JSON: {e}")),
        },
    }
}

/// The object with the mode's keys set; and the changes, one line each (empty: nothing to
/// change).
pub fn with_own_firewall(old: &Map<String, Value>) -> (Map<String, Value>, Vec<String>) {
    let mut new = old.clone();
    let mut changes = Vec::new();
    for k in KEYS {
        match old.get(k) {
            Some(Value::Bool(false)) => {}
            Some(v) => changes.push(format!("-  \"{k}\": {v}\n+  \"{k}\": false")),
            None => changes.push(format!("+  \"{k}\": false")),
        }
        new.insert(k.to_string(), Value::Bool(false));
    }
    (new, changes)
}

/// Pretty JSON with a final newline.
pub fn render(m: &Map<String, Value>) -> String {
    let mut s = serde_json::to_string_pretty(&Value::Object(m.clone())).unwrap_or_default();
    s.push('\n');
    s
}

fn read(file: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(file) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

fn write_atomic(file: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = file.with_extension("json.dataplane-tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, file).map_err(|e| format!("{}: {e}", file.display()))
}

const RESTART: &str = "Restart Docker for it to take effect (`systemctl restart docker`, or \
stop and start dockerd), then run the agent with --own-firewall. Containers with a restart \
policy come back with Docker; the agent removes the rules Docker's iptables mode left behind.";

/// Shows the change, or makes it (`apply`), or undoes the last one (`undo`). Returns what to
/// print.
pub fn run(file: &Path, apply: bool, undo: bool) -> Result<String, String> {
    let backup = backup_path(file);
    if undo {
        let Some(before) = read(&backup)? else {
            return Err(format!(
                "nothing to undo: {} is not there (no --apply made it)",
                backup.display()
            ));
        };
        // A backup holding `null` means there was no file.
        if before.trim() == "null" {
            std::fs::remove_file(file).map_err(|e| format!("{}: {e}", file.display()))?;
        } else {
            write_atomic(file, &before)?;
        }
        std::fs::remove_file(&backup).map_err(|e| format!("{}: {e}", backup.display()))?;
        return Ok(format!(
            "restored {} as it was before --apply. Stop the agent's own-firewall mode (run it \
             without --own-firewall), then restart Docker: its own rules come back with it.\n",
            file.display()
        ));
    }
    let text = read(file)?;
    let old = parse(text.as_deref()).map_err(|e| format!("{}: {e}", file.display()))?;
    let (new, changes) = with_own_firewall(&old);
    let mut out = format!(
        "--- {}\n+++ {} (own-firewall mode)\n",
        file.display(),
        file.display()
    );
    if changes.is_empty() {
        out.push_str("(no change: Docker is already configured for the own-firewall mode)\n");
        return Ok(out);
    }
    for c in &changes {
        out.push_str(c);
        out.push('\n');
    }
    if !apply {
        out.push_str("\nNothing written: run again with --apply to write it.\n");
        return Ok(out);
    }
    if read(&backup)?.is_none() {
        std::fs::write(&backup, text.as_deref().unwrap_or("null"))
            .map_err(|e| format!("{}: {e}", backup.display()))?;
    }
    write_atomic(file, &render(&new))?;
    let _ = write!(
        out,
        "\nWritten; the file before is kept as {} (`dataplane docker-config --undo` puts it \
         back).\n{RESTART}\n",
        backup.display()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_three_keys_and_keeps_the_rest() {
        let old = parse(Some(
            r#"{"log-level": "info", "iptables": true, "userland-proxy": false}"#,
        ))
        .unwrap();
        let (new, changes) = with_own_firewall(&old);
        assert_eq!(new["log-level"], "info");
        assert!(KEYS.iter().all(|k| new[*k] == Value::Bool(false)));
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].contains("-  \"iptables\": true"));
        let (_, none) = with_own_firewall(&new);
        assert!(none.is_empty());
        assert!(parse(Some("[1]")).is_err());
        assert!(parse(None).unwrap().is_empty());
    }

    #[test]
    fn apply_then_undo_restores_the_file() {
        let dir = std::env::temp_dir().join(format!("dp-daemon-json-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("daemon.json");
        // No file at first: apply creates it, undo removes it.
        let shown = run(&f, false, false).unwrap();
        assert!(
            shown.contains("+  \"iptables\": false") && !f.exists(),
            "{shown}"
        );
        run(&f, true, false).unwrap();
        assert_eq!(
            parse(std::fs::read_to_string(&f).ok().as_deref()).unwrap()["iptables"],
            false
        );
        run(&f, false, true).unwrap();
        assert!(!f.exists() && !backup_path(&f).exists());
        // A file: kept content restored byte for byte.
        std::fs::write(&f, "{ \"debug\": true }\n").unwrap();
        run(&f, true, false).unwrap();
        run(&f, true, false).unwrap();
        run(&f, false, true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "{ \"debug\": true }\n"
        );
        assert!(run(&f, false, true).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
