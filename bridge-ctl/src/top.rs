//! `bridge-ctl top`: a live view of the agent, refreshed in place, for an operator on the
//! host without Prometheus. `q` (or Ctrl-C) quits and restores the terminal.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use dataplane_api::{Frontend, Status};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The terminal in the mode `top` needs (keys without Enter, no echo, the alternate
/// screen), restored when dropped.
struct Terminal {
    saved: Option<libc::termios>,
    screen: bool,
}

impl Terminal {
    fn enter() -> Self {
        let mut saved = None;
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios buffer of the right type.
        unsafe {
            if libc::isatty(0) == 1 {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(0, &raw mut t) == 0 {
                    saved = Some(t);
                    t.c_lflag &= !(libc::ICANON | libc::ECHO);
                    t.c_cc[libc::VMIN] = 0;
                    t.c_cc[libc::VTIME] = 0;
                    libc::tcsetattr(0, libc::TCSANOW, &raw const t);
                }
            }
        }
        // SAFETY: isatty has no preconditions.
        let screen = unsafe { libc::isatty(1) } == 1;
        if screen {
            // The alternate screen, cursor hidden.
            print!("\x1b[?1049h\x1b[?25l");
        }
        Self { saved, screen }
    }

    /// Rows of the terminal (24 when unknown).
    fn rows() -> usize {
        // SAFETY: TIOCGWINSZ fills a winsize.
        unsafe {
            let mut w: libc::winsize = std::mem::zeroed();
            if libc::ioctl(1, libc::TIOCGWINSZ, &raw mut w) == 0 && w.ws_row > 0 {
                return usize::from(w.ws_row);
            }
        }
        24
    }

    /// Waits up to `d` for a key; whether it was `q` (or an interrupt came).
    fn quit_within(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.saved.is_none() {
                std::thread::sleep(left.min(Duration::from_millis(100)));
                continue;
            }
            let mut fds = libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().min(100)).unwrap_or(100);
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&raw mut fds, 1, ms) };
            if n > 0 {
                let mut b = [0u8; 16];
                // SAFETY: reading into a buffer of the size passed.
                let r = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
                let r = usize::try_from(r).unwrap_or(0);
                if b[..r].iter().any(|c| matches!(c, b'q' | b'Q')) {
                    return true;
                }
                if r == 0 {
                    // End of input: nothing more will come; wait out the interval.
                    std::thread::sleep(left.min(Duration::from_millis(100)));
                }
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.screen {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
        }
        if let Some(t) = &self.saved {
            // SAFETY: restoring the attributes read at entry.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, t);
            }
        }
    }
}

/// What the previous refresh saw, for rates.
struct Seen {
    at: Instant,
    frontends: BTreeMap<(String, String), u64>,
    counters: BTreeMap<String, u64>,
}

pub fn run(socket: &Path, interval: f64) -> ExitCode {
    let interval = Duration::from_secs_f64(if interval.is_finite() {
        interval.clamp(0.1, 3600.0)
    } else {
        1.0
    });
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let term = Terminal::enter();
    let mut seen: Option<Seen> = None;
    let mut failures = 0u32;
    loop {
        let frame = match (
            dataplane_api::status(socket),
            dataplane_api::frontends(socket),
        ) {
            (Ok(s), Ok(f)) => {
                failures = 0;
                let now = Instant::now();
                let frame = render(&s, &f, seen.as_ref(), now, Terminal::rows(), interval);
                seen = Some(Seen {
                    at: now,
                    frontends: f.iter().map(|f| (key(f), f.connections)).collect(),
                    counters: s.counters.clone(),
                });
                frame
            }
            (Err(e), _) | (_, Err(e)) => {
                failures += 1;
                seen = None;
                format!("bridge-ctl top: {e}\nretrying every {interval:?} (q quits)\n")
            }
        };
        // Home, the frame, and clear what the previous frame left below it.
        print!("\x1b[H{}\x1b[J", frame.replace('\n', "\x1b[K\n"));
        let _ = std::io::stdout().flush();
        if term.quit_within(interval) {
            break;
        }
    }
    drop(term);
    if failures > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn key(f: &Frontend) -> (String, String) {
    (f.frontend.clone(), f.container_id.clone())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[expect(clippy::cast_precision_loss, reason = "rates for display")]
fn rate(now: u64, before: Option<u64>, secs: f64) -> String {
    match before {
        Some(b) if secs > 0.0 => format!("{:.1}", now.saturating_sub(b) as f64 / secs),
        _ => "-".into(),
    }
}

/// The lines above the tables: versions, state, counts, sync latency.
fn header(s: &Status, interval: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dataplane {} | docker {} | {} | every {:.1}s, q quits",
        s.version,
        s.docker_version,
        match (&s.translation_off, s.ready) {
            (Some(_), _) => "NOT translating",
            (None, true) => "translating",
            (None, false) => "starting",
        },
        interval.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "containers {}  frontends {}  local addresses {}  container clients {}  last sync {}",
        s.containers,
        s.frontends,
        s.local_addresses,
        s.container_clients,
        crate::ago(s.last_sync_unix_ms)
    );
    let recent: Vec<u64> = {
        let n = s.start_sync_us.len();
        let mut v = s.start_sync_us[n.saturating_sub(100)..].to_vec();
        v.sort_unstable();
        v
    };
    #[expect(clippy::cast_precision_loss, reason = "latencies for display")]
    let ms = |us: u64| us as f64 / 1e3;
    if !s.early_lead_us.is_empty() {
        let n = s.early_lead_us.len();
        let mut leads: Vec<u64> = s.early_lead_us[n.saturating_sub(100)..]
            .iter()
            .map(|l| u64::try_from(*l).unwrap_or(0))
            .collect();
        leads.sort_unstable();
        let _ = writeln!(
            out,
            "frontends before the start event (written at network connect, last {}): lead p50 {:.1} ms",
            leads.len(),
            ms(percentile(&leads, 0.5))
        );
    }
    if recent.is_empty() {
        let _ = writeln!(out, "sync latency (start event -> map): no starts seen yet");
    } else {
        let _ = writeln!(
            out,
            "sync latency (start event -> map, last {}): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            recent.len(),
            ms(percentile(&recent, 0.5)),
            ms(percentile(&recent, 0.99)),
            ms(*recent.last().unwrap_or(&0))
        );
    }
    if let Some(why) = &s.translation_off {
        let _ = writeln!(out, "translation off: {why}");
    }
    out
}

/// One screen of the view.
fn render(
    s: &Status,
    fs: &[Frontend],
    seen: Option<&Seen>,
    now: Instant,
    rows: usize,
    interval: Duration,
) -> String {
    let secs = seen.map_or(0.0, |p| now.duration_since(p.at).as_secs_f64());
    let mut out = header(s, interval);
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<24} {:>12} {:>10}",
        "KERNEL COUNTER", "TOTAL", "PER SEC"
    );
    for (k, v) in &s.counters {
        let before = seen.and_then(|p| p.counters.get(k).copied());
        let _ = writeln!(out, "{k:<24} {v:>12} {:>10}", rate(*v, before, secs));
    }
    out.push('\n');
    let mut list: Vec<(&Frontend, String, f64)> = fs
        .iter()
        .map(|f| {
            let before = seen.and_then(|p| p.frontends.get(&key(f)).copied());
            let r = rate(f.connections, before, secs);
            let sort = r.parse::<f64>().unwrap_or(-1.0);
            (f, r, sort)
        })
        .collect();
    list.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.0.connections.cmp(&a.0.connections))
            .then(a.0.frontend.cmp(&b.0.frontend))
    });
    let wf = list
        .iter()
        .map(|(f, _, _)| f.frontend.len())
        .chain([8])
        .max()
        .unwrap_or(8);
    let wc = list
        .iter()
        .map(|(f, _, _)| f.container.len())
        .chain([9])
        .max()
        .unwrap_or(9);
    let _ = writeln!(
        out,
        "{:<wf$}  {:<wc$}  {:>10}  {:>12}  BACKEND",
        "FRONTEND", "CONTAINER", "CONN/S", "CONNECTIONS"
    );
    let used = out.lines().count() + 1;
    let room = rows.saturating_sub(used).max(1);
    for (f, r, _) in list.iter().take(room) {
        let _ = writeln!(
            out,
            "{:<wf$}  {:<wc$}  {:>10}  {:>12}  {}{}",
            f.frontend,
            f.container,
            r,
            f.connections,
            f.backend,
            if f.paused { " (paused)" } else { "" }
        );
    }
    if list.len() > room {
        let _ = writeln!(out, "... {} more", list.len() - room);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_previous_refresh_and_busy_frontends_go_first() {
        let mut s = Status {
            ready: true,
            version: "0.1.0".into(),
            ..Status::default()
        };
        s.counters.insert("connect".into(), 150);
        s.start_sync_us = vec![1000, 2000, 30_000];
        let fs = vec![
            Frontend {
                frontend: "0.0.0.0:80/tcp".into(),
                container: "quiet".into(),
                container_id: "a".into(),
                connections: 100,
                ..Frontend::default()
            },
            Frontend {
                frontend: "0.0.0.0:81/tcp".into(),
                container: "busy".into(),
                container_id: "b".into(),
                connections: 50,
                ..Frontend::default()
            },
        ];
        let t0 = Instant::now();
        let seen = Seen {
            at: t0,
            frontends: [
                (("0.0.0.0:80/tcp".into(), "a".into()), 100),
                (("0.0.0.0:81/tcp".into(), "b".into()), 30),
            ]
            .into_iter()
            .collect(),
            counters: [("connect".to_string(), 130)].into_iter().collect(),
        };
        let text = render(
            &s,
            &fs,
            Some(&seen),
            t0 + Duration::from_secs(2),
            40,
            Duration::from_secs(2),
        );
        let busy = text.find("busy").unwrap();
        let quiet = text.find("quiet").unwrap();
        assert!(busy < quiet, "{text}");
        assert!(text.contains("10.0"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("connect") && l.ends_with("10.0")),
            "{text}"
        );
        assert!(text.contains("p50 2.0 ms"), "{text}");
        // Without a previous refresh there is no rate yet.
        let first = render(&s, &fs, None, t0, 40, Duration::from_secs(1));
        assert!(first.contains(" - "), "{first}");
        // A short terminal shows what fits and says how many are left out.
        let short = render(&s, &fs, None, t0, 9, Duration::from_secs(1));
        assert!(short.contains("more"), "{short}");
    }
}
