//! Prometheus metrics, served over HTTP on the address the config file names (off by
//! default). What the agent's loop observes (Docker events, sync latency, apply durations
//! and errors) is recorded as it happens in [`Metrics`]; what the kernel counts in the
//! programs' maps (per-CPU counters, per-frontend connections, map occupancy) is read at
//! scrape time. The egress drop counters are the agent's latest reading of its nftables
//! table ([`EgressCounters`], refreshed every [`crate::egress::COUNTERS_INTERVAL`] while
//! metrics are served): a scrape runs no process.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, LazyLock},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use dataplane_common::{STAT_NAMES, STATS_LEN};
use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

pub use crate::report::status::EgressCounters;
use crate::report::status::{EgressCountersHandle, FrontendRow, Shared};

pub mod server;

type Labels = Vec<(String, String)>;

fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// What the agent records as it works (one per process).
pub struct Metrics {
    docker_events: Family<Labels, Counter>,
    event_to_map: Histogram,
    early_lead: Histogram,
    reconcile: Histogram,
    reconcile_errors: Counter,
    netfilter_apply: Family<Labels, Histogram>,
    netfilter_errors: Family<Labels, Counter>,
    config_reloads: Family<Labels, Counter>,
    pause_resets: Counter,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    docker_events: Family::default(),
    event_to_map: latency_histogram(),
    early_lead: latency_histogram(),
    reconcile: latency_histogram(),
    reconcile_errors: Counter::default(),
    netfilter_apply: Family::new_with_constructor(latency_histogram),
    netfilter_errors: Family::default(),
    config_reloads: Family::default(),
    pause_resets: Counter::default(),
});

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// A Docker event seen, by type (`container`, `network`, ...) and action.
    pub fn docker_event(&self, typ: &str, action: &str) {
        // Exec events carry the command in the action (`exec_start: sh -c ...`): the verb
        // only, so label values stay few.
        let action = action.split(':').next().unwrap_or(action).trim();
        self.docker_events
            .get_or_create(&labels([("type", typ), ("action", action)]))
            .inc();
    }

    /// A container's `start` event to its frontends in the map.
    pub fn event_to_map(&self, took: Duration) {
        self.event_to_map.observe(took.as_secs_f64());
    }

    /// A container's frontends were in the map this long before its `start` event (written
    /// at `network connect`).
    pub fn early_lead(&self, lead: Duration) {
        self.early_lead.observe(lead.as_secs_f64());
    }

    /// One reconcile (plan and apply of the maps and rules), and whether it failed.
    pub fn reconcile(&self, took: Duration, ok: bool) {
        self.reconcile.observe(took.as_secs_f64());
        if !ok {
            self.reconcile_errors.inc();
        }
    }

    /// One write of an nftables table of the agent's (`notrack` or `egress`).
    pub fn netfilter_apply(&self, table: &str, took: Duration, ok: bool) {
        let l = labels([("table", table)]);
        self.netfilter_apply
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        // The series exists from the first write, at zero.
        let errors = self.netfilter_errors.get_or_create(&l);
        if !ok {
            errors.inc();
        }
    }

    /// A `SIGHUP` reload, taken (`ok`) or rejected (the running config stays).
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .get_or_create(&labels([(
                "result",
                if ok { "applied" } else { "rejected" },
            )]))
            .inc();
    }

    /// Translated sockets reset because their container was paused (`on-pause=reset`).
    pub fn pause_resets(&self, sockets: usize) {
        self.pause_resets.inc_by(sockets as u64);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "dataplane_docker_events",
            "Docker events received, by type and action",
            self.docker_events.clone(),
        );
        r.register_with_unit(
            "dataplane_event_to_map",
            "From a container's start event (Docker's timestamp) to its frontends in the map",
            Unit::Seconds,
            self.event_to_map.clone(),
        );
        r.register_with_unit(
            "dataplane_frontend_lead",
            "How long before a container's start event its frontends were in the map \
             (written when Docker connected it to its network)",
            Unit::Seconds,
            self.early_lead.clone(),
        );
        r.register_with_unit(
            "dataplane_reconcile_duration",
            "Duration of one reconcile: plan, map updates, notrack and egress table writes",
            Unit::Seconds,
            self.reconcile.clone(),
        );
        r.register(
            "dataplane_reconcile_errors",
            "Reconciles that failed (retried with backoff)",
            self.reconcile_errors.clone(),
        );
        r.register_with_unit(
            "dataplane_netfilter_apply_duration",
            "Duration of one nftables transaction on a table of the agent's",
            Unit::Seconds,
            self.netfilter_apply.clone(),
        );
        r.register(
            "dataplane_netfilter_apply_errors",
            "nftables transactions of the agent's that failed (retried)",
            self.netfilter_errors.clone(),
        );
        r.register(
            "dataplane_config_reloads",
            "Config file reloads on SIGHUP, applied or rejected",
            self.config_reloads.clone(),
        );
        r.register(
            "dataplane_pause_reset_sockets",
            "Translated sockets reset because their container was paused (on-pause=reset)",
            self.pause_resets.clone(),
        );
    }
}

/// Descriptors of the programs' maps, to read at scrape time. The default has none (every
/// read gives nothing).
#[derive(Debug, Default)]
pub struct KernelMaps {
    /// Name, descriptor, capacity, key size, and whether it is a hash map (entries can be
    /// counted).
    maps: Vec<(String, OwnedFd, u32, u32, bool)>,
    stats: Option<OwnedFd>,
    fe_stats: Option<OwnedFd>,
}

impl KernelMaps {
    /// Duplicates the descriptors of every map of `loaded`.
    pub fn of(loaded: &crate::bpf::Loaded) -> Result<Self> {
        let mut maps = Vec::new();
        let (mut stats, mut fe_stats) = (None, None);
        for (name, fd) in loaded.map_fds()? {
            let data = MapData::from_fd(fd.try_clone().context("duplicating a map descriptor")?)
                .with_context(|| format!("map {name}"))?;
            let info = data.info().with_context(|| format!("map {name} info"))?;
            let hash = matches!(
                info.map_type(),
                Ok(aya::maps::MapType::Hash
                    | aya::maps::MapType::PerCpuHash
                    | aya::maps::MapType::LruHash)
            );
            if name == dataplane_common::MAP_STATS {
                stats = Some(fd.try_clone()?);
            }
            if name == dataplane_common::MAP_FE_STATS {
                fe_stats = Some(fd.try_clone()?);
            }
            maps.push((name, fd, info.max_entries(), info.key_size(), hash));
        }
        Ok(Self {
            maps,
            stats,
            fe_stats,
        })
    }

    /// The programs' counters summed over CPUs, by `STAT_*` index (empty if unreadable).
    pub fn stats(&self) -> Vec<u64> {
        let Some(fd) = &self.stats else {
            return Vec::new();
        };
        let read = || -> Result<Vec<u64>> {
            let data = MapData::from_fd(fd.try_clone()?)?;
            let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
            (0..STATS_LEN)
                .map(|i| Ok(arr.get(&i, 0)?.iter().sum()))
                .collect()
        };
        read().unwrap_or_default()
    }

    /// Each frontend id's translated sockets, summed over CPUs.
    pub fn frontend_counters(&self) -> BTreeMap<u32, u64> {
        let Some(fd) = &self.fe_stats else {
            return BTreeMap::new();
        };
        let read = || -> Result<BTreeMap<u32, u64>> {
            let data = MapData::from_fd(fd.try_clone()?)?;
            let m: PerCpuHashMap<MapData, u32, u64> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
            let mut out = BTreeMap::new();
            for r in &m {
                let (k, v) = r?;
                out.insert(k, v.iter().sum());
            }
            Ok(out)
        };
        read().unwrap_or_default()
    }
}

impl crate::report::status::KernelCounters for KernelMaps {
    fn stats(&self) -> Vec<u64> {
        KernelMaps::stats(self)
    }

    fn frontend_counters(&self) -> BTreeMap<u32, u64> {
        KernelMaps::frontend_counters(self)
    }
}

/// Everything a scrape reads.
#[derive(Clone)]
pub struct Scrape {
    pub shared: Shared,
    pub kernel: Arc<KernelMaps>,
    /// The egress drop counters as the agent last read them back.
    pub egress_counters: EgressCountersHandle,
}

impl Scrape {
    /// Where the egress side puts each reading of its drop counters.
    pub fn egress_counters_handle(&self) -> EgressCountersHandle {
        Arc::clone(&self.egress_counters)
    }

    /// The exposition: `OpenMetrics` text, or (for scrapers that did not ask for it) the
    /// Prometheus text format 0.0.4.
    pub async fn render(&self, openmetrics: bool) -> String {
        // Drops of the policy (both tables) by key, spoofed frames by their counter's name.
        let drops = self
            .egress_counters
            .lock()
            .expect("egress counters lock")
            .drops()
            .clone();
        let kernel = Arc::clone(&self.kernel);
        let shared = self.shared.clone();
        let text = tokio::task::spawn_blocking(move || render(&kernel, &shared, &drops))
            .await
            .unwrap_or_default();
        if openmetrics {
            text
        } else {
            to_prometheus_text(&text)
        }
    }
}

fn render(kernel: &KernelMaps, shared: &Shared, drops: &BTreeMap<String, u64>) -> String {
    let mut r = Registry::default();
    get().register(&mut r);

    let (frontends, status, egress_names, rejected) = {
        let st = shared.lock().expect("status lock");
        (
            st.frontends.clone(),
            st.status.clone(),
            st.egress_counters.clone(),
            st.config_rejected,
        )
    };
    let build: Family<Labels, Gauge> = Family::default();
    build
        .get_or_create(&labels([
            ("version", env!("CARGO_PKG_VERSION")),
            ("map_layout", &crate::bpf::layout_id()),
        ]))
        .set(1);
    r.register(
        "dataplane_build_info",
        "The agent's version and map layout (always 1)",
        build,
    );
    let features: Family<Labels, Gauge> = Family::default();
    for f in &status.features {
        features
            .get_or_create(&labels([
                ("feature", f.name.as_str()),
                ("kernel", &status.kernel),
            ]))
            .set(i64::from(f.state == "active"));
    }
    r.register(
        "dataplane_kernel_feature",
        "1 for each kernel feature the agent uses that the kernel has, 0 where it runs degraded",
        features,
    );
    let ready: Gauge = Gauge::default();
    ready.set(i64::from(status.ready && status.translation_off.is_none()));
    r.register(
        "dataplane_translating",
        "1 while the agent vouches for the maps and the programs translate",
        ready,
    );
    let config: Gauge = Gauge::default();
    config.set(i64::from(!rejected));
    r.register(
        "dataplane_config_last_reload_successful",
        "0 when the last config reload was rejected (the running config stays)",
        config,
    );
    let containers: Gauge = Gauge::default();
    containers.set(i64::try_from(status.containers).unwrap_or(i64::MAX));
    r.register(
        "dataplane_containers",
        "Running containers the agent knows",
        containers,
    );

    kernel_counters(&mut r, kernel);
    frontend_counters(&mut r, kernel, &frontends);
    map_gauges(&mut r, kernel);
    egress_drops(&mut r, &egress_names, drops);

    let mut out = String::new();
    if encode_registry(&mut out, &r).is_err() || encode_eof(&mut out).is_err() {
        return String::new();
    }
    out
}

/// The programs' counters, summed over CPUs now.
fn kernel_counters(r: &mut Registry, kernel: &KernelMaps) {
    let stats = kernel.stats();
    let stat = |name: &str| {
        STAT_NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| stats.get(i))
            .copied()
            .unwrap_or(0)
    };
    let hooks: Family<Labels, Counter> = Family::default();
    for h in ["connect", "sendmsg", "recvmsg", "getpeername"] {
        hooks.get_or_create(&labels([("hook", h)])).inc_by(stat(h));
    }
    r.register(
        "dataplane_socket_translations",
        "Socket operations translated by the kernel programs, by hook",
        hooks,
    );
    let fallbacks: Family<Labels, Counter> = Family::default();
    for (reason, name) in [
        ("bound_source", "skipped_bound_source"),
        ("other_network", "skipped_other_network"),
        ("v6only", "skipped_v6only"),
        ("no_agent", "skipped_no_agent"),
    ] {
        fallbacks
            .get_or_create(&labels([("reason", reason)]))
            .inc_by(stat(name));
    }
    r.register(
        "dataplane_fallbacks",
        "Sockets that dialled a published port and were left to Docker's own path, by reason",
        fallbacks,
    );
    for (metric, name, help) in [
        (
            "dataplane_bind_refusals",
            "bind_refused",
            "bind() calls refused because the port is published (port reservation)",
        ),
        (
            "dataplane_socket_storage_full",
            "sock_storage_full",
            "Translations not recorded because socket storage was full",
        ),
        (
            "dataplane_paused_refusals",
            "refused_paused",
            "connect() calls refused because the container is paused (on-pause=reset)",
        ),
    ] {
        let c: Counter = Counter::default();
        c.inc_by(stat(name));
        r.register(metric, help, c);
    }
}

fn frontend_counters(r: &mut Registry, kernel: &KernelMaps, frontends: &[FrontendRow]) {
    let per_fe = kernel.frontend_counters();
    let translated: Family<Labels, Counter> = Family::default();
    for f in frontends {
        translated
            .get_or_create(&labels([
                ("frontend", &f.view.frontend),
                ("container", &f.view.container),
            ]))
            .inc_by(per_fe.get(&f.id).copied().unwrap_or(0));
    }
    r.register(
        "dataplane_translated_connections",
        "Sockets translated through each published binding since it was created",
        translated,
    );
}

fn map_gauges(r: &mut Registry, kernel: &KernelMaps) {
    let entries: Family<Labels, Gauge> = Family::default();
    let capacity: Family<Labels, Gauge> = Family::default();
    for (name, fd, max, key_size, hash) in &kernel.maps {
        let l = labels([("map", name)]);
        if *max > 0 {
            capacity.get_or_create(&l).set(i64::from(*max));
        }
        if *hash {
            let n = crate::bpf::count_keys(fd.as_fd(), *key_size).unwrap_or(0);
            entries
                .get_or_create(&l)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "dataplane_map_entries",
        "Entries in each hash map of the programs",
        entries,
    );
    r.register(
        "dataplane_map_capacity",
        "Capacity (max entries) of each map of the programs",
        capacity,
    );
}

fn egress_drops(r: &mut Registry, names: &BTreeMap<String, String>, drops: &BTreeMap<String, u64>) {
    let egress: Family<Labels, Counter> = Family::default();
    for (key, name) in names {
        // Containers whose policy restricts something have a counter.
        if let Some(n) = drops.get(key) {
            egress
                .get_or_create(&labels([("container", name)]))
                .inc_by(*n);
        }
    }
    r.register(
        "dataplane_egress_dropped_packets",
        "Packets a container's egress policy dropped",
        egress,
    );
    let spoofed: Family<Labels, Counter> = Family::default();
    for (key, name) in names {
        if let Some(n) = drops.get(&crate::egress::guard::spoof_counter(key)) {
            spoofed
                .get_or_create(&labels([("container", name)]))
                .inc_by(*n);
        }
    }
    r.register(
        "dataplane_egress_spoofed_packets",
        "Packets from a policed container with a source (MAC or address) not its own, dropped at its bridge port",
        spoofed,
    );
}

/// `OpenMetrics` text as the Prometheus text format 0.0.4: counter families are named with
/// their `_total` suffix, `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len() + 256);
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, typ) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if typ == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {typ}");
            continue;
        }
        if let Some((name, text)) = help.take() {
            let _ = writeln!(out, "# HELP {name} {text}");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::Semaphore,
    };

    use super::{server::*, *};

    #[test]
    fn counters_get_their_total_suffix_in_the_prometheus_format() {
        let om = "# HELP dataplane_fallbacks Left to Docker.\n# TYPE dataplane_fallbacks counter\n\
                  dataplane_fallbacks_total{reason=\"v6only\"} 2\n\
                  # HELP dataplane_event_to_map_seconds Latency.\n\
                  # TYPE dataplane_event_to_map_seconds histogram\n\
                  # UNIT dataplane_event_to_map_seconds seconds\n\
                  dataplane_event_to_map_seconds_sum 0.5\n# EOF\n";
        let text = to_prometheus_text(om);
        assert!(text.contains("# HELP dataplane_fallbacks_total Left to Docker.\n"));
        assert!(text.contains("# TYPE dataplane_fallbacks_total counter\n"));
        assert!(text.contains("dataplane_fallbacks_total{reason=\"v6only\"} 2\n"));
        assert!(text.contains("# TYPE dataplane_event_to_map_seconds histogram\n"));
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"));
    }

    #[tokio::test]
    async fn a_scrape_reports_the_egress_counters_as_last_read() {
        let shared = Shared::default();
        shared
            .lock()
            .unwrap()
            .egress_counters
            .insert("abc".into(), "web".into());
        let scrape = Scrape {
            shared,
            kernel: Arc::default(),
            egress_counters: EgressCountersHandle::default(),
        };
        scrape.egress_counters_handle().lock().unwrap().update(
            std::time::Instant::now(),
            [
                ("abc".into(), 5),
                (crate::egress::guard::spoof_counter("abc"), 2),
                ("gone".into(), 7),
            ]
            .into(),
        );
        let text = scrape.render(true).await;
        assert!(
            text.contains("dataplane_egress_dropped_packets_total{container=\"web\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("dataplane_egress_spoofed_packets_total{container=\"web\"} 2\n"),
            "{text}"
        );
        // Counters of keys no container has are not shown.
        let egress_lines = text
            .lines()
            .filter(|l| l.starts_with("dataplane_egress_dropped_packets_total"))
            .count();
        assert_eq!(egress_lines, 1, "{text}");
    }

    fn idle_scrape() -> Scrape {
        Scrape {
            shared: Shared::default(),
            kernel: Arc::default(),
            egress_counters: EgressCountersHandle::default(),
        }
    }

    /// Asks `addr` for `/` on a new connection.
    async fn ask(addr: SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        c
    }

    async fn reply(c: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_waits_until_one_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            connections: 2,
            head_timeout: Duration::from_mins(1),
        };
        let server = serve_on(listener, idle_scrape(), limits);
        let idle = TcpStream::connect(addr).await.unwrap();
        let _idle = TcpStream::connect(addr).await.unwrap();
        let mut third = ask(addr).await;
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
        assert!(early.is_err(), "served beyond the limit: {early:?}");
        drop(idle);
        let text = reply(&mut third).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("metrics at /metrics\n"), "{text}");
        server.abort();
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_loses_its_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            connections: 1,
            head_timeout: Duration::from_millis(200),
        };
        let server = serve_on(listener, idle_scrape(), limits);
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut next = ask(addr).await;
        let text = reply(&mut next).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        // The silent one was closed unanswered.
        assert_eq!(reply(&mut idle).await, "");
        server.abort();
    }

    #[test]
    fn the_backoff_doubles_from_10_ms_to_at_most_1_s() {
        let pauses: Vec<u128> = (1..=9).map(|n| backoff_after(n).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(backoff_after(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_run_of_failures_is_logged_once_per_kind_and_ends_at_a_success() {
        use AcceptError::{Exhausted, Other};
        let mut b = AcceptBackoff::default();
        assert_eq!(b.succeeded(), None);
        let ms = Duration::from_millis;
        assert_eq!(b.failed(Exhausted), (ms(10), true));
        assert_eq!(b.failed(Exhausted), (ms(20), false));
        assert_eq!(b.failed(Exhausted), (ms(40), false));
        assert_eq!(b.failed(Other), (ACCEPT_RETRY_PAUSE, true));
        assert_eq!(b.failed(Other), (ACCEPT_RETRY_PAUSE, false));
        // Exhausted again within the same run: logged, and its backoff starts over.
        assert_eq!(b.failed(Exhausted), (ms(10), true));
        assert_eq!(b.succeeded(), Some(6));
        assert_eq!(b.succeeded(), None);
        assert_eq!(b.failed(Exhausted), (ms(10), true));
    }

    #[test]
    fn running_out_of_descriptors_or_memory_is_told_from_other_accept_errors() {
        let err = std::io::Error::from_raw_os_error;
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(AcceptError::of(&err(e)), AcceptError::Exhausted, "{e}");
        }
        for e in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINVAL] {
            assert_eq!(AcceptError::of(&err(e)), AcceptError::Other, "{e}");
        }
        let custom = std::io::Error::other("no descriptor");
        assert_eq!(AcceptError::of(&custom), AcceptError::Other);
    }

    /// Accept results in order, then nothing more (`done` says so); records the pauses.
    struct Script {
        results: std::collections::VecDeque<std::io::Result<u32>>,
        pauses: Arc<std::sync::Mutex<Vec<Duration>>>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Incoming for Script {
        type Conn = u32;

        async fn accept(&mut self) -> std::io::Result<u32> {
            if let Some(r) = self.results.pop_front() {
                return r;
            }
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
            std::future::pending().await
        }

        async fn pause(&mut self, d: Duration) {
            self.pauses.lock().unwrap().push(d);
        }
    }

    #[tokio::test]
    async fn the_accept_loop_pauses_after_failures_and_serves_what_it_accepts() {
        let err = |e| Err(std::io::Error::from_raw_os_error(e));
        let (done, finished) = tokio::sync::oneshot::channel();
        let pauses = Arc::default();
        let script = Script {
            results: [
                err(libc::EMFILE),
                err(libc::EMFILE),
                err(libc::ENFILE),
                Ok(1),
                err(libc::EMFILE),
                err(libc::ECONNABORTED),
                Ok(2),
                Ok(3),
            ]
            .into(),
            pauses: Arc::clone(&pauses),
            done: Some(done),
        };
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let slots = Arc::new(Semaphore::new(1));
        let handle = {
            let served = Arc::clone(&served);
            move |conn, _slot| served.lock().unwrap().push(conn)
        };
        let task = tokio::spawn(accept_loop(script, Arc::clone(&slots), handle));
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let ms = Duration::from_millis;
        assert_eq!(
            *pauses.lock().unwrap(),
            [ms(10), ms(20), ms(40), ms(10), ACCEPT_RETRY_PAUSE]
        );
        assert_eq!(*served.lock().unwrap(), [1, 2, 3]);
        // Every slot came back once the loop ended (the failed accepts' too).
        assert_eq!(slots.available_permits(), 1);
    }

    #[test]
    fn exec_actions_are_labelled_by_their_verb() {
        let m = get();
        m.docker_event("container", "exec_start: sh -c echo secret");
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        encode_registry(&mut out, &r).unwrap();
        assert!(out.contains("action=\"exec_start\""), "{out}");
        assert!(!out.contains("secret"));
    }
}
