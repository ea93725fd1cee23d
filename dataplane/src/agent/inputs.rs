//! Where the loop's inputs come from: Docker's events stream (reopened with backoff when it
//! fails), netlink and ruleset notifications, `bridge-ctl`'s requests, lookups, created
//! containers' inspects, timers and signals, each turned into one [`Input`].

use std::{pin::Pin, time::Duration};

use bollard::{Docker, models::EventMessage};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::{sync::mpsc, time::Instant};
use tracing::warn;

use crate::{
    docker,
    input::{self, Input, LookupResult, Timer},
    model::ContainerId,
    report::api,
    retry::Backoff,
};
use tokio::signal::unix::SignalKind;

/// How often the packet layer's idle flows are removed.
const FLOWS_GC_INTERVAL: Duration = Duration::from_secs(10);

type Events = Pin<Box<dyn Stream<Item = Result<EventMessage, bollard::errors::Error>> + Send>>;

/// What the loop's timers wait for (from the model and the appliers).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Deadlines {
    pub retry: Option<std::time::Instant>,
    pub lookups: Option<std::time::Instant>,
    pub egress_ports: Option<std::time::Instant>,
    pub egress_check: Option<std::time::Instant>,
    pub own_check: Option<std::time::Instant>,
    /// The packet layer is on: its flows are aged.
    pub flows: bool,
    /// Metrics are served: the egress table's counters are read on a timer.
    pub egress_counters: bool,
}

/// The sources, as the start made them.
pub(super) struct Inputs {
    pub docker: Docker,
    /// Unix seconds: Docker's events from here on.
    pub since: i64,
    pub resync_interval: Duration,
    pub resync_now: bool,
    pub addresses: mpsc::Receiver<()>,
    pub ruleset: mpsc::Receiver<()>,
    pub control: mpsc::Receiver<api::Forwarded>,
    pub lookups: mpsc::Receiver<(String, LookupResult)>,
    pub created: mpsc::Receiver<(ContainerId, Box<bollard::models::ContainerInspectResponse>)>,
    pub stop: StopSignals,
    pub reload: tokio::signal::unix::Signal,
}

/// The sources while the loop runs.
pub(super) struct Open {
    src: Inputs,
    events: Option<Events>,
    /// When to open the events stream again (it failed), and the wait after that.
    reopen_at: Option<Instant>,
    backoff: Backoff,
    resync: tokio::time::Interval,
    flows: tokio::time::Interval,
    egress_counters: tokio::time::Interval,
}

impl Inputs {
    /// Opens Docker's events stream and starts the timers.
    pub fn open(self) -> Open {
        let mut resync =
            tokio::time::interval_at(Instant::now() + self.resync_interval, self.resync_interval);
        if self.resync_now {
            resync.reset_immediately();
        }
        let events = Some(stream(&self.docker, self.since));
        Open {
            src: self,
            events,
            reopen_at: None,
            backoff: Backoff::new(),
            resync,
            flows: tokio::time::interval(FLOWS_GC_INTERVAL),
            egress_counters: tokio::time::interval(crate::egress::COUNTERS_INTERVAL),
        }
    }
}

fn stream(docker: &Docker, since: i64) -> Events {
    Box::pin(docker::events(docker, since))
}

/// Waits until `at`, or forever when there is nothing to wait for.
async fn until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Open {
    /// The next input.
    pub async fn next(&mut self, d: Deadlines) -> Input {
        enum Got {
            Input(Input),
            Event(Option<Result<EventMessage, bollard::errors::Error>>),
            Reopen,
        }
        let stream_now = &mut self.events;
        let events = async move {
            match stream_now.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        let reopen = until(self.reopen_at.map(Instant::into_std));
        let s = &mut self.src;
        let got = tokio::select! {
            why = s.stop.recv() => Got::Input(Input::Stop(why)),
            Some((id, c)) = s.created.recv() => Got::Input(Input::Created(id, c)),
            Some((req, reply)) = s.control.recv() => Got::Input(Input::Control(req, reply)),
            Some((name, r)) = s.lookups.recv() => Got::Input(Input::Lookup(name, r)),
            () = until(d.lookups) => Got::Input(Input::Timer(Timer::Lookups)),
            () = until(d.egress_ports) => Got::Input(Input::Timer(Timer::EgressPorts)),
            () = until(d.egress_check) => Got::Input(Input::Timer(Timer::EgressCheck)),
            () = until(d.own_check) => Got::Input(Input::Timer(Timer::OwnFirewallCheck)),
            ev = events => Got::Event(ev),
            () = reopen => Got::Reopen,
            Some(()) = s.addresses.recv() => Got::Input(Input::Addresses),
            Some(()) = s.ruleset.recv() => Got::Input(Input::Ruleset),
            () = until(d.retry) => Got::Input(Input::Timer(Timer::Retry)),
            _ = self.resync.tick() => Got::Input(Input::Timer(Timer::Resync)),
            _ = self.flows.tick(), if d.flows => Got::Input(Input::Timer(Timer::Flows)),
            _ = self.egress_counters.tick(), if d.egress_counters => Got::Input(Input::Timer(Timer::EgressCounters)),
            _ = s.reload.recv() => Got::Input(Input::Reload),
        };
        match got {
            Got::Input(i) => i,
            Got::Event(ev) => self.on_event(ev),
            Got::Reopen => {
                self.reopen_at = None;
                self.events = Some(stream(&self.src.docker, self.src.since));
                Input::EventsBack
            }
        }
    }

    /// An item of Docker's events stream: the event with whatever else already arrived (a
    /// burst costs one apply), or the stream's loss.
    fn on_event(&mut self, ev: Option<Result<EventMessage, bollard::errors::Error>>) -> Input {
        let why = match ev {
            Some(Ok(ev)) => {
                let mut raw = vec![ev];
                if let Some(s) = self.events.as_mut() {
                    while let Some(Some(Ok(more))) = s.next().now_or_never() {
                        raw.push(more);
                    }
                }
                self.src.since = input::latest_time(self.src.since, &raw);
                self.backoff.succeeded();
                return Input::Docker(raw.iter().map(input::docker_event).collect());
            }
            Some(Err(e)) => format!("Docker events stream failed: {e}"),
            None => "Docker events stream ended".to_string(),
        };
        warn!("{why}");
        // Reopened after a backoff (dockerd restarting?); the loop resyncs then.
        self.events = None;
        self.reopen_at = Some(Instant::now() + self.backoff.failed());
        Input::EventsLost(why)
    }
}

/// `SIGTERM` and `SIGINT` (Ctrl-C): either stops the agent. Handled from the start on, so
/// no stop is lost between two turns of the loop.
pub(super) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop; which signal it was.
    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "terminated",
            _ = self.int.recv() => "interrupted",
        }
    }
}
