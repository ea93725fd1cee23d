//! The metrics endpoint: `GET /metrics` over HTTP, with bounded connections and time, and
//! a backoff when descriptors or memory run out.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{info, warn};

use super::Scrape;

/// The longest request head read.
pub(super) const MAX_HEAD: usize = 8192;

/// The most connections served at once. A further one is not accepted until one of them
/// ends: it waits in the listen backlog, holding none of the agent's descriptors.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send its request head: a client that sends nothing holds a
/// connection slot this long at most.
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client has to take the answer.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first pause after an accept that failed for want of descriptors or memory; each
/// further failure in a row doubles it, up to [`ACCEPT_BACKOFF_MAX`].
pub(super) const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest pause of that backoff.
pub(super) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The pause after an accept that failed otherwise.
pub(super) const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How the server bounds what its clients hold.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Connections served at once.
    pub(super) connections: usize,
    /// Time to send the request head.
    pub(super) head_timeout: Duration,
}

impl Limits {
    /// The limits the agent serves with.
    pub(super) const SERVED: Self = Self {
        connections: MAX_CONNECTIONS,
        head_timeout: HEAD_TIMEOUT,
    };
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted: at most
/// [`MAX_CONNECTIONS`] at once, each bounded in time; when descriptors or memory run out,
/// accepting backs off instead of spinning.
pub async fn serve(addr: SocketAddr, scrape: Scrape) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics: listening on {addr}"))?;
    Ok(serve_on(listener, scrape, Limits::SERVED))
}

/// Serves on `listener` within `limits`.
pub(super) fn serve_on(
    listener: TcpListener,
    scrape: Scrape,
    limits: Limits,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(limits.connections));
    tokio::spawn(accept_loop(listener, slots, move |stream, slot| {
        let scrape = scrape.clone();
        tokio::spawn(async move {
            answer(stream, &scrape, limits.head_timeout).await;
            drop(slot);
        });
    }))
}

/// Answers the one request of `stream`.
pub(super) async fn answer(mut stream: TcpStream, scrape: &Scrape, head_timeout: Duration) {
    let head = tokio::time::timeout(head_timeout, read_head(&mut stream));
    let Ok(Some(head)) = head.await else {
        return;
    };
    let (status, ctype, body) = respond(&head, scrape).await;
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// Where the accept loop takes connections from, and how it pauses after a failed accept:
/// the listener and tokio's clock when serving.
pub(super) trait Incoming {
    type Conn;

    fn accept(&mut self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;

    fn pause(&mut self, d: Duration) -> impl Future<Output = ()> + Send;
}

impl Incoming for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> std::io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }

    async fn pause(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// Accepts connections while a slot of `slots` is free, and hands each with its slot to
/// `handle`; pauses after a failed accept as [`AcceptBackoff`] says. Runs until aborted.
pub(super) async fn accept_loop<I>(
    mut incoming: I,
    slots: Arc<Semaphore>,
    mut handle: impl FnMut(I::Conn, OwnedSemaphorePermit) + Send,
) where
    I: Incoming + Send,
{
    let mut backoff = AcceptBackoff::default();
    loop {
        // A free slot first: a connection beyond the limit is left in the backlog.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match incoming.accept().await {
            Ok(conn) => {
                if let Some(failed) = backoff.succeeded() {
                    info!(failed, "metrics: accepting connections again");
                }
                handle(conn, slot);
            }
            Err(e) => {
                drop(slot);
                let kind = AcceptError::of(&e);
                let (pause, log) = backoff.failed(kind);
                if log {
                    match kind {
                        AcceptError::Exhausted => warn!(
                            error = %e,
                            longest_pause = ?ACCEPT_BACKOFF_MAX,
                            "metrics: out of descriptors or memory: accepting again with backoff"
                        ),
                        AcceptError::Other => {
                            warn!(error = %e, "metrics: accepting a connection failed; retrying");
                        }
                    }
                }
                incoming.pause(pause).await;
            }
        }
    }
}

/// What a failed accept means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AcceptError {
    /// The process or the system ran out of descriptors or memory: accepting again at once
    /// would fail again, so the loop backs off.
    Exhausted,
    /// Anything else: the loop accepts again after a short pause.
    Other,
}

impl AcceptError {
    pub(super) fn of(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Self::Exhausted,
            _ => Self::Other,
        }
    }
}

/// The pause after the `failures`-th accept in a row that found descriptors or memory
/// exhausted: [`ACCEPT_BACKOFF_FIRST`], doubling each time, at most [`ACCEPT_BACKOFF_MAX`].
pub(super) fn backoff_after(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    ACCEPT_BACKOFF_FIRST
        .saturating_mul(factor)
        .min(ACCEPT_BACKOFF_MAX)
}

/// The accept loop's run of failures: how long to pause after each, and which to log (the
/// first of a run, and the first of another kind within it).
#[derive(Debug, Default)]
pub(super) struct AcceptBackoff {
    /// While accepts fail: the kind of the latest failure, how many in a row were of that
    /// kind, and how many failed since the last success.
    run: Option<(AcceptError, u32, u32)>,
}

impl AcceptBackoff {
    /// An accept failed with `kind`: how long to pause, and whether to log it.
    pub(super) fn failed(&mut self, kind: AcceptError) -> (Duration, bool) {
        let (same, total, log) = match self.run {
            Some((k, n, total)) if k == kind => (n + 1, total + 1, false),
            Some((_, _, total)) => (1, total + 1, true),
            None => (1, 1, true),
        };
        self.run = Some((kind, same, total));
        let pause = match kind {
            AcceptError::Exhausted => backoff_after(same),
            AcceptError::Other => ACCEPT_RETRY_PAUSE,
        };
        (pause, log)
    }

    /// An accept succeeded: how many failed before it, if any did.
    pub(super) fn succeeded(&mut self) -> Option<u32> {
        self.run.take().map(|(_, _, total)| total)
    }
}

pub(super) async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub(super) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The answer to one request head: status line, content type, body.
pub(super) async fn respond(head: &str, scrape: &Scrape) -> (&'static str, &'static str, String) {
    let mut lines = head.lines();
    let request = lines.next().unwrap_or("");
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let body = scrape.render(openmetrics).await;
            (
                "200 OK",
                if openmetrics {
                    OPENMETRICS
                } else {
                    PROMETHEUS_TEXT
                },
                body,
            )
        }
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "dataplane agent: metrics at /metrics\n".into(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", String::new()),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            String::new(),
        ),
    }
}
