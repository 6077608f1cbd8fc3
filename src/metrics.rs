//! The HTTP endpoint operators and Prometheus read, served by the control core (tokio):
//!
//! - `/metrics`: every Stats figure in the Prometheus text format (encoded by the
//!   `prometheus` crate, the format `promtool check metrics` reads), labelled by core
//!   where it is per core;
//! - `/healthz`: 200 while the process runs;
//! - `/readyz`: 200 only when recovery is done, every core serves and the node is not
//!   degraded; 503 otherwise, with a JSON body that says why.
//!
//! ```text
//!  scrape -> control core --(bounded channel per core)--> shard core: its CoreStats
//!                         <--------- oneshot reply --------
//! ```
//!
//! Shard cores keep their plain per-core counters; nothing they count is shared between
//! threads. The control core asks each core for a copy at scrape time and merges them; a
//! core that does not answer within [`CORE_ANSWER_TIMEOUT`] makes the node not ready.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::channel::{mpsc, oneshot};
use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::cdc::CdcCounters;
use crate::change::now_ms;
use crate::cluster::registration::RegistrationState;
use crate::proto::{CoreStats, PersistenceStats};

/// A scrape asks a shard core for its figures with one of these.
pub type ScrapeRequest = oneshot::Sender<CoreFigures>;

/// What a core answers a scrape with: its Stats figures and its request figures.
#[derive(Clone, Debug, Default)]
pub struct CoreFigures {
    pub stats: CoreStats,
    pub requests: RequestSnapshot,
    /// How long each write-ahead log sync took (the O_DSYNC write with fsync = always, the
    /// fdatasync otherwise); None with persistence off.
    pub log_sync: Option<(Vec<u64>, u64)>,
}

/// Request kinds the per-core figures are kept for (index = position).
pub const OPS: [&str; 19] = [
    "get", "set", "del", "exists", "expire", "ttl", "mget", "mset", "ping", "stats", "hello", "snapshot", "auth",
    "backup", "incr", "append", "persist", "slot", "invalid",
];
/// The kind of a request that did not decode (or had no op).
pub const OP_INVALID: usize = OPS.len() - 1;
/// Upper bounds of the latency buckets, in microseconds (one more bucket: +Inf).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 262_144, 1_048_576,
];
const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;
/// Error codes counted (ErrorCode values 0..=12).
const ERROR_CODES: usize = 13;

/// A latency histogram in plain cells that only its core touches: an observation costs a
/// bucket search and two additions, and no atomic is shared between cores. A scrape copies
/// it out.
#[derive(Default)]
pub struct LatencyCells {
    buckets: [Cell<u64>; BUCKETS],
    sum_us: Cell<u64>,
}

impl LatencyCells {
    pub fn observe(&self, elapsed_us: u64) {
        let bucket = LATENCY_BUCKETS_US.partition_point(|&upper| upper < elapsed_us);
        bump(&self.buckets[bucket], 1);
        bump(&self.sum_us, elapsed_us);
    }

    /// The count in each bucket (not cumulative) and the sum in microseconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        (self.buckets.iter().map(Cell::get).collect(), self.sum_us.get())
    }
}

/// One core's request figures (see [`LatencyCells`]); a scrape copies them out
/// ([`RequestFigures::snapshot`]).
#[derive(Default)]
pub struct RequestFigures {
    latency: [LatencyCells; OPS.len()],
    errors: [Cell<u64>; ERROR_CODES],
    hits: Cell<u64>,
    misses: Cell<u64>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

impl RequestFigures {
    /// One request of kind `op` answered `elapsed_us` after its batch was decoded.
    pub fn observe(&self, op: usize, elapsed_us: u64) {
        self.latency[op.min(OP_INVALID)].observe(elapsed_us);
    }

    pub fn error(&self, code: i32) {
        if let Some(c) = usize::try_from(code).ok().and_then(|i| self.errors.get(i)) {
            bump(c, 1);
        }
    }

    /// A key read found (`true`) or not.
    pub fn read(&self, found: bool) {
        bump(if found { &self.hits } else { &self.misses }, 1);
    }

    pub fn snapshot(&self, expired_lazy: u64, expired_swept: u64) -> RequestSnapshot {
        RequestSnapshot {
            latency: self.latency.iter().map(LatencyCells::snapshot).collect(),
            errors: self.errors.iter().map(Cell::get).collect(),
            hits: self.hits.get(),
            misses: self.misses.get(),
            expired_lazy,
            expired_swept,
        }
    }
}

/// A copy of [`RequestFigures`] that can cross threads.
#[derive(Clone, Debug, Default)]
pub struct RequestSnapshot {
    /// Per op: the count in each latency bucket (not cumulative), and the sum in us.
    pub latency: Vec<(Vec<u64>, u64)>,
    /// Per error code (ErrorCode value).
    pub errors: Vec<u64>,
    pub hits: u64,
    pub misses: u64,
    /// Expired keys removed when a request touched them, and by the sweep.
    pub expired_lazy: u64,
    pub expired_swept: u64,
}

impl RequestSnapshot {
    /// Requests observed, over every kind.
    pub fn requests(&self) -> u64 {
        self.latency.iter().map(|(b, _)| b.iter().sum::<u64>()).sum()
    }
}
pub type ScrapeReceiver = mpsc::Receiver<ScrapeRequest>;

/// Scrapes queued per core: more than a few means nobody is answering anyway.
const SCRAPES_QUEUED_MAX: usize = 4;
/// Longest a scrape waits for one core.
const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Every core must have answered core 0's heartbeat this recently to count as serving.
const HEARTBEAT_FRESH_MS: u64 = 2_000;

/// One channel per core: the senders stay with the control core, each receiver goes to its
/// core.
pub fn scrape_channels(cores: u32) -> (Vec<mpsc::Sender<ScrapeRequest>>, Vec<ScrapeReceiver>) {
    (0..cores).map(|_| mpsc::channel(SCRAPES_QUEUED_MAX)).unzip()
}

/// What the endpoint reads about the node.
pub struct Node {
    pub cores: Vec<mpsc::Sender<ScrapeRequest>>,
    pub cdc: Arc<CdcCounters>,
    pub cdc_enabled: bool,
    pub cdc_blocked_ms_max: u64,
    pub persistence: PersistenceStats,
    /// When every core last answered core 0's heartbeat (Unix ms; 0 = never).
    pub alive_at_ms: Arc<AtomicU64>,
    /// Set once every core accepts connections (after recovery).
    pub serving: Arc<AtomicBool>,
    pub registration: Option<Arc<RegistrationState>>,
    /// limits.memory_bytes_max split over the cores; 0 = unlimited.
    pub memory_per_core_max: u64,
    /// limits.eviction = lru: a core at its share evicts instead of refusing writes, so
    /// being there is normal, not a reason to be unready.
    pub evicting: bool,
}

impl Node {
    /// Every core's figures; `None` for a core that did not answer in time.
    async fn gather(&self) -> Vec<Option<CoreFigures>> {
        let asks = self.cores.iter().map(|tx| async move {
            let (reply, rx) = oneshot::channel();
            tx.clone().try_send(reply).ok()?;
            tokio::time::timeout(CORE_ANSWER_TIMEOUT, rx).await.ok()?.ok()
        });
        futures::future::join_all(asks).await
    }

    /// Why the node is not ready; empty when it is.
    fn not_ready(&self, cores: &[Option<CoreFigures>]) -> Vec<String> {
        let mut why = Vec::new();
        if !self.serving.load(Ordering::Relaxed) {
            why.push("starting: recovery or core start-up is not finished".to_string());
        }
        let alive_at = self.alive_at_ms.load(Ordering::Relaxed);
        if alive_at == 0 || now_ms().saturating_sub(alive_at) > HEARTBEAT_FRESH_MS {
            why.push("a shard core does not answer heartbeats over the core mesh".into());
        }
        for (i, c) in cores.iter().enumerate() {
            match c.as_ref().map(|f| &f.stats) {
                None => why.push(format!("core {i} did not answer the scrape within 1 s")),
                Some(c) if c.log_failed => why.push(format!(
                    "core {i}: the write-ahead log cannot be written ({}); writes are refused",
                    c.log_error
                )),
                Some(c)
                    if self.memory_per_core_max > 0 && !self.evicting && c.memory_bytes >= self.memory_per_core_max =>
                {
                    why.push(format!(
                        "core {i}: at its share of limits.memory_bytes_max; writes that grow memory are refused"
                    ))
                }
                Some(_) => {}
            }
        }
        if self.cdc_enabled {
            let since = self.cdc.disconnected_since_ms.load(Ordering::Relaxed);
            let down_ms = if since == 0 { 0 } else { now_ms().saturating_sub(since) };
            if down_ms > self.cdc_blocked_ms_max {
                why.push(format!(
                    "change capture has had no broker connection for {down_ms} ms (cdc.blocked_ms_max {})",
                    self.cdc_blocked_ms_max
                ));
            }
            if self.cdc.writers_held.load(Ordering::Relaxed) {
                why.push("change capture holds writers back: cdc.retention_bytes_max reached".into());
            }
        }
        if let Some(r) = &self.registration {
            if !r.registered.load(Ordering::Relaxed) {
                why.push("not registered in etcd (the lease is lost or etcd is unreachable)".into());
            }
        }
        why
    }

    /// The exposition text of one scrape (Prometheus text format 0.0.4).
    fn exposition(&self, cores: &[Option<CoreFigures>], ready: bool) -> prometheus::Result<String> {
        let registry = Registry::new();
        per_core(&registry, cores)?;
        let gauge = |name: &str, help: &str, v: f64| -> prometheus::Result<()> {
            let g = Gauge::new(name, help)?;
            g.set(v);
            registry.register(Box::new(g))
        };
        let counter = |name: &str, help: &str, v: u64| -> prometheus::Result<()> {
            let c = IntCounter::new(name, help)?;
            c.inc_by(v);
            registry.register(Box::new(c))
        };
        let seconds = |ms: u64| ms as f64 / 1000.0;
        gauge("flux_ready", "1 when /readyz answers 200", f64::from(u8::from(ready)))?;
        gauge(
            "flux_core_memory_limit_bytes",
            "Each core's share of limits.memory_bytes_max (0: no limit)",
            self.memory_per_core_max as f64,
        )?;
        gauge(
            "flux_eviction_enabled",
            "1 when limits.eviction = lru: at the memory limit, writes evict instead of failing",
            f64::from(u8::from(self.evicting)),
        )?;
        let p = &self.persistence;
        gauge(
            "flux_recovered_keys",
            "Keys restored by the last start",
            p.keys_recovered as f64,
        )?;
        gauge(
            "flux_recovery_seconds",
            "How long the last start's recovery took",
            seconds(p.recovery_ms),
        )?;
        let cdc = self.cdc.snapshot(self.cdc_enabled);
        let r = Ordering::Relaxed;
        gauge(
            "flux_cdc_enabled",
            "Change capture is on",
            f64::from(u8::from(cdc.enabled)),
        )?;
        gauge(
            "flux_cdc_connected",
            "Connected to the broker",
            f64::from(u8::from(cdc.connected)),
        )?;
        counter(
            "flux_cdc_events_published_total",
            "Events the broker confirmed",
            cdc.events_published,
        )?;
        counter(
            "flux_cdc_batches_published_total",
            "Batches the broker confirmed",
            cdc.batches_published,
        )?;
        gauge(
            "flux_cdc_confirms_pending",
            "Batches published and not yet confirmed",
            cdc.confirms_pending as f64,
        )?;
        counter(
            "flux_cdc_reconnects_total",
            "Broker connections re-established",
            cdc.reconnects,
        )?;
        counter(
            "flux_cdc_republished_batches_total",
            "Batches published again (at-least-once)",
            cdc.republished_batches,
        )?;
        counter(
            "flux_cdc_events_dropped_total",
            "Changes given up (cdc.overflow = drop)",
            cdc.events_dropped,
        )?;
        gauge(
            "flux_cdc_retained_bytes",
            "Log bytes held for unconfirmed changes",
            cdc.retained_bytes as f64,
        )?;
        counter(
            "flux_cdc_events_from_log_total",
            "Events read back from the log",
            cdc.events_from_log,
        )?;
        gauge(
            "flux_cdc_writers_held",
            "Writers held back at cdc.retention_bytes_max",
            f64::from(u8::from(cdc.writers_held)),
        )?;
        gauge(
            "flux_cdc_confirm_delay_p50_seconds",
            "Write-to-confirm delay, median",
            seconds(cdc.confirm_delay_p50_ms),
        )?;
        gauge(
            "flux_cdc_confirm_delay_p99_seconds",
            "Write-to-confirm delay, 99th percentile",
            seconds(cdc.confirm_delay_p99_ms),
        )?;
        gauge(
            "flux_cdc_oldest_unconfirmed_age_seconds",
            "Age of the oldest change the broker has not confirmed (0: none)",
            seconds(cdc.oldest_unconfirmed_age_ms),
        )?;
        let since = self.cdc.disconnected_since_ms.load(r);
        gauge(
            "flux_cdc_disconnected_seconds",
            "How long change capture has had no broker connection (0 when connected)",
            if since == 0 {
                0.0
            } else {
                seconds(now_ms().saturating_sub(since))
            },
        )?;
        if let Some(reg) = &self.registration {
            gauge(
                "flux_etcd_registered",
                "The node's key is in etcd under a live lease",
                f64::from(u8::from(reg.registered.load(r))),
            )?;
            counter(
                "flux_etcd_lease_renewals_total",
                "Lease keep-alives etcd acknowledged",
                reg.renewals.load(r),
            )?;
        }
        // The histogram family is built from the cores' buckets, then encoded with the rest.
        let mut families = registry.gather();
        let figures = || cores.iter().flatten();
        families.push(histogram_family(
            "flux_core_request_duration_seconds",
            "Time from a batch's decode to its replies being queued, per request",
            "op",
            figures().flat_map(|f| {
                OPS.iter()
                    .zip(&f.requests.latency)
                    .map(|(op, l)| (f.stats.core, *op, l))
            }),
        ));
        if figures().any(|f| f.log_sync.is_some()) {
            families.push(histogram_family(
                "flux_core_log_sync_duration_seconds",
                "How long each write-ahead log sync took (the O_DSYNC write with fsync = always, fdatasync otherwise)",
                "",
                figures().filter_map(|f| Some((f.stats.core, "", f.log_sync.as_ref()?))),
            ));
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// How a per-core figure is exposed.
enum Kind {
    Counter,
    Gauge,
    /// A millisecond figure, exposed in seconds (Prometheus' base unit).
    Seconds,
}

/// Every per-core Stats figure: (name, help, kind, value).
#[allow(clippy::type_complexity)]
const CORE_FIGURES: &[(&str, &str, Kind, fn(&CoreStats) -> i64)] = &[
    (
        "flux_core_connections_accepted_total",
        "Connections accepted",
        Kind::Counter,
        |c| c.connections_accepted as i64,
    ),
    ("flux_core_connections_open", "Connections open", Kind::Gauge, |c| {
        c.connections_open as i64
    }),
    (
        "flux_core_connections_refused_total",
        "Connections refused at limits.connections_per_core_max",
        Kind::Counter,
        |c| c.connections_refused as i64,
    ),
    (
        "flux_core_connections_timed_out_total",
        "Connections closed by a timeout",
        Kind::Counter,
        |c| c.connections_timed_out as i64,
    ),
    (
        "flux_core_connections_refused_protected_total",
        "Connections refused by protected mode",
        Kind::Counter,
        |c| c.connections_refused_protected as i64,
    ),
    ("flux_core_requests_total", "Requests read", Kind::Counter, |c| {
        c.requests as i64
    }),
    (
        "flux_core_forwarded_out_total",
        "Key operations sent to other cores",
        Kind::Counter,
        |c| c.forwarded_out as i64,
    ),
    (
        "flux_core_forwarded_in_total",
        "Key operations received from other cores",
        Kind::Counter,
        |c| c.forwarded_in as i64,
    ),
    (
        "flux_core_keys",
        "Keys held (expired but unswept included)",
        Kind::Gauge,
        |c| c.keys as i64,
    ),
    (
        "flux_core_memory_bytes",
        "Bytes accounted to the core's shards",
        Kind::Gauge,
        |c| c.memory_bytes as i64,
    ),
    (
        "flux_core_evicted_keys_total",
        "Keys evicted to make room (limits.eviction = lru)",
        Kind::Counter,
        |c| c.keys_evicted as i64,
    ),
    (
        "flux_core_cdc_queue_events",
        "Change events queued for the control core",
        Kind::Gauge,
        |c| c.cdc_queue_events as i64,
    ),
    (
        "flux_core_cdc_events_dropped_total",
        "Change events dropped at a full queue",
        Kind::Counter,
        |c| c.cdc_events_dropped as i64,
    ),
    (
        "flux_core_wal_written_bytes_total",
        "Bytes written to the write-ahead log",
        Kind::Counter,
        |c| c.wal_bytes as i64,
    ),
    (
        "flux_core_log_bytes",
        "Log bytes not yet covered by snapshots",
        Kind::Gauge,
        |c| c.log_bytes as i64,
    ),
    (
        "flux_core_snapshot_bytes",
        "Bytes of the current snapshots",
        Kind::Gauge,
        |c| c.snapshot_bytes as i64,
    ),
    (
        "flux_core_snapshot_age_seconds",
        "Age of the oldest snapshot (-1: none yet)",
        Kind::Seconds,
        |c| c.snapshot_age_ms,
    ),
    (
        "flux_core_snapshots_total",
        "Snapshot rounds completed",
        Kind::Counter,
        |c| c.snapshots as i64,
    ),
    (
        "flux_core_log_failed",
        "1 while the log cannot be written",
        Kind::Gauge,
        |c| i64::from(c.log_failed),
    ),
    (
        "flux_core_writes_refused_storage_total",
        "Writes refused with STORAGE_UNAVAILABLE",
        Kind::Counter,
        |c| c.writes_refused_storage as i64,
    ),
    (
        "flux_core_auth_failures_total",
        "Failed Auth requests",
        Kind::Counter,
        |c| c.auth_failures as i64,
    ),
    (
        "flux_core_requests_denied_total",
        "Requests refused for authentication or permission",
        Kind::Counter,
        |c| c.requests_denied as i64,
    ),
];

fn per_core(registry: &Registry, cores: &[Option<CoreFigures>]) -> prometheus::Result<()> {
    let up = IntGaugeVec::new(
        Opts::new("flux_core_up", "1 when the core answered this scrape"),
        &["core"],
    )?;
    for (i, c) in cores.iter().enumerate() {
        up.with_label_values(&[&i.to_string()]).set(i64::from(c.is_some()));
    }
    registry.register(Box::new(up))?;
    let figures: Vec<&CoreFigures> = cores.iter().flatten().collect();
    let label = |f: &CoreFigures| f.stats.core.to_string();
    let ops = IntCounterVec::new(
        Opts::new("flux_core_op_requests_total", "Requests by operation"),
        &["core", "op"],
    )?;
    let errors = IntCounterVec::new(
        Opts::new("flux_core_errors_total", "Error replies by code"),
        &["core", "code"],
    )?;
    let reads = IntCounterVec::new(
        Opts::new("flux_core_reads_total", "Key reads (GET and each MGET key) by result"),
        &["core", "result"],
    )?;
    let expired = IntCounterVec::new(
        Opts::new(
            "flux_core_expired_keys_total",
            "Expired keys removed, when a request touched them (lazy) or by the sweep",
        ),
        &["core", "how"],
    )?;
    for f in &figures {
        let core = label(f);
        let r = &f.requests;
        for (op, (buckets, _)) in OPS.iter().zip(&r.latency) {
            ops.with_label_values(&[core.as_str(), op]).inc_by(buckets.iter().sum());
        }
        for (code, n) in r.errors.iter().enumerate().filter(|(_, n)| **n > 0) {
            let name = crate::proto::ErrorCode::try_from(code as i32).map_or("UNKNOWN", |c| c.as_str_name());
            errors.with_label_values(&[core.as_str(), name]).inc_by(*n);
        }
        reads.with_label_values(&[core.as_str(), "hit"]).inc_by(r.hits);
        reads.with_label_values(&[core.as_str(), "miss"]).inc_by(r.misses);
        expired
            .with_label_values(&[core.as_str(), "lazy"])
            .inc_by(r.expired_lazy);
        expired
            .with_label_values(&[core.as_str(), "swept"])
            .inc_by(r.expired_swept);
    }
    for family in [ops, errors, reads, expired] {
        registry.register(Box::new(family))?;
    }
    for (name, help, kind, value) in CORE_FIGURES {
        let opts = Opts::new(*name, *help);
        match kind {
            Kind::Counter => {
                let family = IntCounterVec::new(opts, &["core"])?;
                for c in figures.iter().map(|f| &f.stats) {
                    family
                        .with_label_values(&[&c.core.to_string()])
                        .inc_by(value(c).max(0) as u64);
                }
                registry.register(Box::new(family))?;
            }
            Kind::Gauge => {
                let family = IntGaugeVec::new(opts, &["core"])?;
                for c in figures.iter().map(|f| &f.stats) {
                    family.with_label_values(&[&c.core.to_string()]).set(value(c));
                }
                registry.register(Box::new(family))?;
            }
            Kind::Seconds => {
                let family = GaugeVec::new(opts, &["core"])?;
                for c in figures.iter().map(|f| &f.stats) {
                    let ms = value(c);
                    let seconds = if ms < 0 { -1.0 } else { ms as f64 / 1000.0 };
                    family.with_label_values(&[&c.core.to_string()]).set(seconds);
                }
                registry.register(Box::new(family))?;
            }
        }
    }
    Ok(())
}

/// A histogram family from the cores' fixed buckets: one series per (core, label value)
/// that `series` yields. The `prometheus` crate's own histograms cannot be filled from
/// counts, so the family is built from its data model and encoded with the rest.
fn histogram_family<'a>(
    name: &str,
    help: &str,
    label: &str,
    series: impl Iterator<Item = (u32, &'a str, &'a (Vec<u64>, u64))>,
) -> prometheus::proto::MetricFamily {
    use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
    let pair = |name: &str, value: &str| {
        let mut l = LabelPair::default();
        l.set_name(name.to_string());
        l.set_value(value.to_string());
        l
    };
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(MetricType::HISTOGRAM);
    let mut metrics = Vec::new();
    for (core, value, (buckets, sum_us)) in series {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS_US.len());
        for (upper, n) in LATENCY_BUCKETS_US.iter().zip(buckets) {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(*upper as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            out.push(b);
        }
        h.set_bucket(out);
        h.set_sample_count(buckets.iter().sum());
        h.set_sample_sum(*sum_us as f64 / 1e6);
        let mut m = Metric::default();
        let mut labels = vec![pair("core", &core.to_string())];
        if !label.is_empty() {
            labels.push(pair(label, value));
        }
        m.set_label(labels);
        m.set_histogram(h);
        metrics.push(m);
    }
    family.set_metric(metrics);
    family
}

/// Serves the endpoint on `listener` until `stop` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    node: Arc<Node>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot serve the listener");
            return;
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(node);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(error = %e, "metrics: the endpoint stopped");
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let cores = node.gather().await;
    let ready = node.not_ready(&cores).is_empty();
    match node.exposition(&cores, ready) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response(),
    }
}

async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let cores = node.gather().await;
    let reasons = node.not_ready(&cores);
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}
