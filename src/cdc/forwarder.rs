//! The control core's change forwarder: drains every shard core's change queue (reading
//! from the write-ahead log whatever the queue could not hold), packs the events into
//! batches bounded by count, bytes and time, publishes them to RabbitMQ with publisher
//! confirms, and keeps per shard the highest confirmed seq in the checkpoint.
//!
//! Order and delivery: per shard, events are taken in seq order, first from the logs of
//! earlier runs (everything after the checkpoint), then from this run. Batches are
//! published in the order they were closed and confirmed by delivery tag (1, 2, ... per
//! channel). A nack, or a lost connection, puts every unconfirmed batch back at the front
//! of the outbox, in order, to be published again: a consumer may see a batch twice (it
//! dedupes by node_id + shard + seq), never out of order after dedupe, and never misses one.
//!
//! Bounds: at most `cdc.confirms_pending_max` batches are closed-but-unconfirmed; past that
//! the forwarder stops taking events. With the log on, the shard cores then drop events
//! from memory and the forwarder reads them back from the log later; what the log holds for
//! unconfirmed changes is bounded by `cdc.retention_bytes_max` (`cdc.overflow`: hold
//! writers, or give the oldest up). Without the log, the shard cores' queues fill and hold
//! writers back (`block`) or drop (`drop`). Nothing waits on the broker anywhere else.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return, DELIVERY_MODE_PERSISTENT};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use super::capture::EventReader;
use super::replay::{OldLogs, RunLog};
use super::{checkpoint, encode, CdcCounters, CoreLink};
use crate::change::{now_ms, Event};
use crate::config::{Cdc, CdcFormat, Overflow};
use crate::keyspace::Keyspace;
use crate::wal::record;

/// The old service's exchange, for `cdc.format = "json"`.
pub const JSON_EXCHANGE: &str = "flux_kv_events";
/// How often the forwarder drains the queues and closes due batches. Each tick wakes the
/// control thread, which often shares a CPU with a shard core: a wake-up a millisecond
/// cost that core measurably more than one every 5 ms, and 5 ms is far below the 50 ms a
/// batch waits to fill. The queues hold well over a tick of writes.
const TICK: Duration = Duration::from_millis(5);
/// Events taken per core (from its queue or its log) per tick, so one busy core cannot
/// starve the rest or the confirms.
const DRAIN_EVENTS_MAX: usize = 16_384;
/// Buffers of confirmed batches kept for reuse: one per shard is enough for steady load.
const SPARE_MAX: usize = 256;
/// Bytes of log read at a time.
const READ_BYTES: usize = 1 << 20;
/// How often retention is measured (and writers held or released).
const RETENTION_INTERVAL: Duration = Duration::from_millis(20);
/// How often the checkpoint is written when it moved.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// First pause before reconnecting; doubles up to `cdc.reconnect_delay_max_ms`.
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
/// Heartbeat so a silently dead broker connection is noticed.
const HEARTBEAT_S: u16 = 10;
/// On shutdown, how long the forwarder keeps trying to get everything confirmed, at most
/// (and at most half the node's `shutdown_timeout_ms`). What is left stays in the log and
/// goes out after the next start.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two reports of the same log read error.
const ERROR_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Where the events of a batch came from, for the checkpoint and log retention.
#[derive(Clone, Copy, Default)]
struct Origin {
    /// Per-shard seq of its first event (the checkpoint stays below it until confirmed).
    first_seq: u64,
    /// Holds a change read from a log of an earlier run.
    old: bool,
    /// Offset in this run's log of the first record of this run it holds.
    log_start: Option<u64>,
    /// When its first event was applied (Unix ms); for one read back from a log, which
    /// keeps no apply time, when it was taken.
    first_ms: u64,
}

impl Origin {
    fn add(&mut self, e: &Event, old: bool) {
        if self.first_seq == 0 {
            self.first_seq = e.fields.seq;
            self.first_ms = match e.timestamp_ms {
                0 => now_ms(),
                t => t,
            };
        }
        self.old |= old;
        if e.log_end != 0 && self.log_start.is_none() {
            self.log_start = Some(log_start(e));
        }
    }
}

/// Where `e`'s record starts in its core's log of this run.
fn log_start(e: &Event) -> u64 {
    e.log_end - record::encoded_len(e.fields.key.len(), e.fields.value.len()) as u64
}

/// A closed batch, ready to publish (or published and awaiting its confirm).
struct Ready {
    shard: u32,
    origin: Origin,
    exchange_is_json: bool,
    routing_key: String,
    body: Vec<u8>,
    events: u32,
    /// Apply times of its events taken from memory, for the write-to-confirm delay.
    timestamps_ms: Vec<u64>,
}

/// A batch still collecting events of one shard, already encoded as a `ChangeBatch`.
struct Building {
    origin: Origin,
    body: Vec<u8>,
    events: u32,
    timestamps_ms: Vec<u64>,
    opened: Instant,
}

enum Confirm {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
}

/// Sends the broker's confirms from amqprs' callback into the forwarder loop.
struct ConfirmCallback(mpsc::UnboundedSender<Confirm>);

#[async_trait::async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        tracing::warn!(reason = %close, "broker closed the change-capture channel");
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Confirm::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Confirm::Nack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// An open connection with a channel in confirm mode.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Delivery tag the next publish gets (confirm mode numbers publishes from 1).
    next_tag: u64,
    /// Bounded by `unconfirmed` (at most one confirm per published batch is in flight).
    confirms: mpsc::UnboundedReceiver<Confirm>,
}

/// What the forwarder needs to use the write-ahead log as its spool.
pub struct LogSpool {
    /// Where the shard cores write their logs.
    pub wal_dir: PathBuf,
    /// This run's log name prefix (`<run>`; core i's segments are `<run>-core<i>-*.log`).
    pub run: String,
    /// Log files of earlier runs, oldest first.
    pub old_files: Vec<PathBuf>,
    /// Per shard: the highest seq confirmed before this start.
    pub confirmed: Vec<u64>,
    pub checkpoint_path: PathBuf,
    /// Bounds one record read back.
    pub record_bytes_max: usize,
}

/// The forwarder's log state.
struct Spool {
    old: OldLogs,
    runs: Vec<RunLog>,
    /// Per core: once its queue is empty, read its log up to here (a gap at the tail).
    tail_target: Vec<u64>,
    checkpoint_path: PathBuf,
    /// The confirmed seqs last written to the checkpoint.
    written: Vec<u64>,
    record_bytes_max: usize,
    last_error: Option<Instant>,
}

/// The forwarder's state (lives on the control thread).
pub struct Forwarder {
    config: Cdc,
    node_id: String,
    keyspace: Keyspace,
    /// Each core's queue; out of its slot only while it is being drained.
    queues: Vec<Option<EventReader>>,
    links: Vec<Arc<CoreLink>>,
    counters: Arc<CdcCounters>,
    spool: Option<Spool>,
    /// Per shard: seq of the last event taken; anything at or below it is a duplicate.
    taken_seq: Vec<u64>,
    /// Per core: offset in this run's log just past the last event taken from that core.
    taken_end: Vec<u64>,
    /// Per core: since when (Unix ms) it has had changes the forwarder could not take yet
    /// (its queue not empty, or its log read short of the tail); 0 while caught up.
    waiting_since_ms: Vec<u64>,
    /// When the forwarder started: the changes of earlier runs' logs are older than this.
    started_ms: u64,
    /// Per shard: the batch filling up, if any.
    building: Vec<Option<Building>>,
    /// Buffers of confirmed batches, reused for new ones (at most `SPARE_MAX`).
    spare: Vec<(Vec<u8>, Vec<u64>)>,
    /// Closed batches in publish order.
    outbox: VecDeque<Ready>,
    unconfirmed: BTreeMap<u64, Ready>,
    /// Retention is full with `cdc.overflow = drop`: log bytes of the oldest events still to
    /// give up (counted, not published) as they are taken.
    drop_bytes: u64,
    /// When a drop was last logged (at most one line per second).
    drop_logged: Option<Instant>,
    delay_ms: Histogram<u64>,
    link: Option<Link>,
    reconnect_at: Instant,
    reconnect_delay: Duration,
    retention_at: Instant,
    checkpoint_at: Instant,
    flush_timeout: Duration,
}

impl Forwarder {
    /// `queues` and `links` are indexed by shard core. Without `spool` (persistence off)
    /// change capture is lossless only while the process runs.
    pub fn new(
        config: Cdc,
        node_id: String,
        keyspace: Keyspace,
        queues: Vec<EventReader>,
        links: Vec<Arc<CoreLink>>,
        counters: Arc<CdcCounters>,
        spool: Option<LogSpool>,
    ) -> Self {
        let cores = keyspace.cores() as usize;
        let taken_seq = spool
            .as_ref()
            .map_or_else(|| vec![0; keyspace.shards() as usize], |s| s.confirmed.clone());
        let spool = spool.map(|s| Spool {
            old: OldLogs::new(s.old_files),
            runs: (0..cores)
                .map(|i| RunLog::new(&s.wal_dir, format!("{}-core{i}", s.run)))
                .collect(),
            tail_target: vec![0; cores],
            checkpoint_path: s.checkpoint_path,
            written: s.confirmed,
            record_bytes_max: s.record_bytes_max,
            last_error: None,
        });
        if spool.is_none() {
            counters.old_logs_released.store(true, Ordering::Release);
        }
        Forwarder {
            config,
            node_id,
            keyspace,
            queues: queues.into_iter().map(Some).collect(),
            links,
            counters,
            spool,
            taken_seq,
            taken_end: vec![0; cores],
            waiting_since_ms: vec![0; cores],
            started_ms: now_ms(),
            building: (0..keyspace.shards()).map(|_| None).collect(),
            spare: Vec::new(),
            outbox: VecDeque::new(),
            unconfirmed: BTreeMap::new(),
            drop_bytes: 0,
            drop_logged: None,
            delay_ms: Histogram::new_with_bounds(1, 3_600_000, 2).expect("static histogram bounds"),
            link: None,
            reconnect_at: Instant::now(),
            reconnect_delay: RECONNECT_DELAY_MIN,
            retention_at: Instant::now(),
            checkpoint_at: Instant::now(),
            flush_timeout: FLUSH_TIMEOUT,
        }
    }

    /// Gives up flushing at shutdown after `timeout` (capped at [`FLUSH_TIMEOUT`]), so the
    /// last checkpoint is written before the node's own shutdown timeout ends the process.
    pub fn flush_within(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout.min(FLUSH_TIMEOUT);
        self
    }

    /// Runs until `stop` is set and everything the cores produced is confirmed (or the
    /// flush timeout passes, which is logged with what is left: it stays in the log).
    pub async fn run(mut self, stop: Arc<AtomicBool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping_since: Option<Instant> = None;
        loop {
            tick.tick().await;
            if self.link.is_none() && Instant::now() >= self.reconnect_at {
                self.connect().await;
            }
            let stopping = stop.load(Ordering::Acquire);
            self.drain(stopping);
            self.publish().await;
            self.take_confirms();
            if self.retention_at.elapsed() >= RETENTION_INTERVAL {
                self.bookkeeping(false);
            }
            if stopping {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if self.idle() {
                    break;
                }
                if since.elapsed() > self.flush_timeout {
                    let left: usize = self.outbox.len() + self.unconfirmed.len();
                    tracing::warn!(
                        batches = left,
                        "shutdown: change batches not confirmed by the broker in time; they stay in the log and are published after the next start"
                    );
                    break;
                }
            }
        }
        self.bookkeeping(true);
        if let Some(link) = self.link.take() {
            let _ = link.connection.close().await;
        }
    }

    /// Everything taken is confirmed and nothing is left to take.
    fn idle(&self) -> bool {
        let logs_read = self.spool.as_ref().is_none_or(|s| {
            s.old.is_done()
                && (0..self.links.len()).all(|c| self.taken_end[c] >= self.links[c].synced_end.load(Ordering::Acquire))
        });
        self.unconfirmed.is_empty()
            && self.outbox.is_empty()
            && self.building.iter().all(Option::is_none)
            && self.queues.iter().flatten().all(EventReader::is_empty)
            && logs_read
    }

    async fn connect(&mut self) {
        match open(&self.config).await {
            Ok(link) => {
                if self.counters.reconnects.load(Ordering::Relaxed) > 0 || !self.unconfirmed.is_empty() {
                    tracing::info!("change capture: connected to the broker again");
                } else {
                    tracing::info!("change capture: connected to the broker");
                }
                self.link = Some(link);
                self.counters.connected.store(true, Ordering::Relaxed);
                self.counters.disconnected_since_ms.store(0, Ordering::Relaxed);
                self.reconnect_delay = RECONNECT_DELAY_MIN;
            }
            Err(e) => {
                let _ = self.counters.disconnected_since_ms.compare_exchange(
                    0,
                    crate::change::now_ms(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                tracing::warn!(error = %e, retry_ms = self.reconnect_delay.as_millis() as u64, "change capture: broker unreachable");
                self.reconnect_at = Instant::now() + self.reconnect_delay;
                let max = Duration::from_millis(self.config.reconnect_delay_max_ms);
                self.reconnect_delay = (self.reconnect_delay * 2).min(max);
            }
        }
    }

    /// Takes events into per-shard batches, and closes the batches that are full or old
    /// enough (all of them when stopping): first the logs of earlier runs, then each core's
    /// queue, reading from its log whatever the queue skipped.
    fn drain(&mut self, stopping: bool) {
        if self.drain_old_logs() {
            for core in 0..self.queues.len() {
                self.drain_core(core);
            }
        }
        let delay = Duration::from_millis(self.config.batch_delay_ms);
        for shard in 0..self.building.len() {
            if self.building[shard]
                .as_ref()
                .is_some_and(|b| stopping || b.opened.elapsed() >= delay)
            {
                self.close(shard as u32);
            }
        }
    }

    /// Reads the logs of earlier runs; true once they are all read (nothing of this run may
    /// go out before them).
    fn drain_old_logs(&mut self) -> bool {
        let mut taken = 0;
        while taken < DRAIN_EVENTS_MAX && self.has_room() {
            let Some(spool) = self.spool.as_mut() else { return true };
            if spool.old.is_done() {
                return true;
            }
            let read = spool.old.read(READ_BYTES, spool.record_bytes_max);
            match read {
                Ok(changes) => {
                    taken += changes.len().max(1);
                    self.counters
                        .events_from_log
                        .fetch_add(changes.len() as u64, Ordering::Relaxed);
                    for c in changes {
                        self.take(&c.event(), true);
                    }
                }
                Err(e) => {
                    self.log_read_error("a log of an earlier run", &e);
                    return false;
                }
            }
        }
        self.spool.as_ref().is_none_or(|s| s.old.is_done())
    }

    /// Takes one core's events in log order: from its queue while the queue is continuous,
    /// from its log where the queue has a gap.
    fn drain_core(&mut self, core: usize) {
        let Some(mut queue) = self.queues[core].take() else {
            return;
        };
        let mut taken = 0;
        while taken < DRAIN_EVENTS_MAX && self.has_room() {
            let mut gap_at = None;
            taken += queue.drain(DRAIN_EVENTS_MAX - taken, |e| {
                if !self.has_room() {
                    return false;
                }
                if e.log_end != 0 {
                    if e.log_end <= self.taken_end[core] {
                        return true; // already read from the log
                    }
                    if log_start(e) > self.taken_end[core] {
                        gap_at = Some(log_start(e));
                        return false;
                    }
                }
                self.take(e, false);
                true
            });
            let Some(start) = gap_at else { break };
            match self.read_log(core, start) {
                0 => break,
                n => taken += n,
            }
        }
        let empty = queue.is_empty();
        self.queues[core] = Some(queue);
        self.drain_log_tail(core, empty, taken);
        let target = self.spool.as_ref().map_or(0, |s| s.tail_target[core]);
        let waiting = !empty || self.taken_end[core] < target;
        let since = &mut self.waiting_since_ms[core];
        *since = match (waiting, *since) {
            (false, _) => 0,
            (true, 0) => now_ms(),
            (true, t) => t,
        };
    }

    /// Reads what core `core`'s queue skipped from its log, once the queue is `empty`.
    fn drain_log_tail(&mut self, core: usize, empty: bool, mut taken: usize) {
        let Some(spool) = self.spool.as_mut() else { return };
        if empty && self.links[core].overflowed.swap(false, Ordering::Acquire) {
            let synced = self.links[core].synced_end.load(Ordering::Acquire);
            spool.tail_target[core] = spool.tail_target[core].max(synced);
        }
        while taken < DRAIN_EVENTS_MAX && self.has_room() {
            let target = self.spool.as_ref().map_or(0, |s| s.tail_target[core]);
            if self.taken_end[core] >= target {
                break;
            }
            match self.read_log(core, target) {
                0 => break,
                n => taken += n,
            }
        }
    }

    /// Reads core `core`'s log from where it was last taken up to `to` (one chunk); returns
    /// how many events it took (0: an error, reported).
    fn read_log(&mut self, core: usize, to: u64) -> usize {
        let Some(spool) = self.spool.as_mut() else { return 0 };
        let from = self.taken_end[core];
        match spool.runs[core].read(from, to, READ_BYTES, spool.record_bytes_max) {
            Ok(chunk) => {
                let n = chunk.changes.len();
                self.counters.events_from_log.fetch_add(n as u64, Ordering::Relaxed);
                for c in chunk.changes {
                    self.take(&c.event(), false);
                }
                self.taken_end[core] = self.taken_end[core].max(chunk.next);
                n
            }
            Err(e) => {
                self.log_read_error("this run's log", &e);
                0
            }
        }
    }

    fn log_read_error(&mut self, what: &str, e: &str) {
        let Some(spool) = self.spool.as_mut() else { return };
        if spool.last_error.is_none_or(|t| t.elapsed() >= ERROR_REPORT_INTERVAL) {
            spool.last_error = Some(Instant::now());
            tracing::error!(error = %e, "change capture: cannot read {what}; retrying (events wait in the log)");
        }
    }

    /// Whether closed batches can still be taken in; when not, events wait (in the log, or
    /// in the cores' queues).
    fn has_room(&self) -> bool {
        self.outbox.len() + self.unconfirmed.len() < self.config.confirms_pending_max
    }

    /// One event in per-shard seq order: duplicates (read from the log and the queue both)
    /// are skipped; with retention full under `drop`, the event is counted and given up.
    fn take(&mut self, e: &Event, old: bool) {
        let f = &e.fields;
        let shard = f.shard as usize;
        if e.log_end != 0 {
            let core = self.keyspace.core_of_shard(f.shard) as usize;
            self.taken_end[core] = self.taken_end[core].max(e.log_end);
        }
        let last = self.taken_seq[shard];
        if f.seq <= last {
            return;
        }
        if last != 0 && f.seq != last + 1 && self.spool.is_some() {
            // The log is continuous per shard: a skip here means lost records.
            tracing::error!(
                shard,
                expected = last + 1,
                got = f.seq,
                "change capture: seq gap in the log"
            );
        }
        self.taken_seq[shard] = f.seq;
        if self.drop_bytes > 0 {
            let bytes = record::encoded_len(f.key.len(), f.value.len()) as u64;
            self.drop_bytes = self.drop_bytes.saturating_sub(bytes);
            self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.add(e, old);
    }

    fn add(&mut self, e: &Event, old: bool) {
        // Events read back from a log have no apply time; they do not count in the delay.
        let timestamp = (e.timestamp_ms != 0).then_some(e.timestamp_ms);
        let shard = e.fields.shard;
        if self.config.format == CdcFormat::Json {
            if let Some(body) = encode::json(&e.fields) {
                let mut origin = Origin::default();
                origin.add(e, old);
                self.outbox.push_back(Ready {
                    shard,
                    origin,
                    exchange_is_json: true,
                    routing_key: String::new(),
                    body,
                    events: 1,
                    timestamps_ms: timestamp.into_iter().collect(),
                });
            }
            return;
        }
        let spare = &mut self.spare;
        let b = self.building[shard as usize].get_or_insert_with(|| {
            let (body, timestamps_ms) = spare.pop().unwrap_or_default();
            Building {
                origin: Origin::default(),
                body,
                events: 0,
                timestamps_ms,
                opened: Instant::now(),
            }
        });
        encode::put_event(&self.node_id, e, &mut b.body);
        b.origin.add(e, old);
        b.events += 1;
        b.timestamps_ms.extend(timestamp);
        if b.events as usize >= self.config.batch_events_max || b.body.len() >= self.config.batch_bytes_max {
            self.close(shard);
        }
    }

    fn close(&mut self, shard: u32) {
        let Some(b) = self.building[shard as usize].take() else {
            return;
        };
        self.outbox.push_back(Ready {
            shard,
            origin: b.origin,
            exchange_is_json: false,
            routing_key: format!("{}.{shard}", self.node_id),
            body: b.body,
            events: b.events,
            timestamps_ms: b.timestamps_ms,
        });
    }

    /// Publishes when the oldest change not yet confirmed was applied: the first event of
    /// every batch not confirmed yet, the cores with changes still to take, and the logs of
    /// earlier runs while any is left to read.
    fn measure_oldest(&self) {
        let batches = self
            .building
            .iter()
            .flatten()
            .map(|b| b.origin.first_ms)
            .chain(self.outbox.iter().map(|r| r.origin.first_ms))
            .chain(self.unconfirmed.values().map(|r| r.origin.first_ms));
        let old_logs = self
            .spool
            .as_ref()
            .filter(|s| !s.old.is_done())
            .map(|_| self.started_ms);
        let oldest = batches
            .chain(self.waiting_since_ms.iter().copied())
            .chain(old_logs)
            .filter(|&t| t != 0)
            .min()
            .unwrap_or(0);
        self.counters.oldest_unconfirmed_ms.store(oldest, Ordering::Relaxed);
    }

    /// Measures what the log holds for unconfirmed changes, applies `cdc.overflow` at the
    /// bound, and writes the checkpoint when it moved (always when `force`), then lets
    /// compaction release what the checkpoint covers.
    fn bookkeeping(&mut self, force: bool) {
        self.retention_at = Instant::now();
        self.measure_oldest();
        let Some(spool) = self.spool.as_ref() else { return };
        let cores = self.links.len();
        let mut confirmed = self.taken_seq.clone();
        let mut release = self.taken_end.clone();
        let mut old_pending = !spool.old.is_done();
        let pending = self
            .building
            .iter()
            .enumerate()
            .filter_map(|(s, b)| Some((s as u32, &b.as_ref()?.origin)))
            .chain(self.outbox.iter().map(|r| (r.shard, &r.origin)))
            .chain(self.unconfirmed.values().map(|r| (r.shard, &r.origin)));
        for (shard, origin) in pending {
            let c = &mut confirmed[shard as usize];
            *c = (*c).min(origin.first_seq - 1);
            if let Some(start) = origin.log_start {
                let core = self.keyspace.core_of_shard(shard) as usize;
                release[core] = release[core].min(start);
            }
            old_pending |= origin.old;
        }
        let synced: Vec<u64> = self
            .links
            .iter()
            .map(|l| l.synced_end.load(Ordering::Acquire))
            .collect();
        let retained: u64 = (0..cores).map(|c| synced[c].saturating_sub(release[c])).sum::<u64>()
            + if old_pending { spool.old.bytes } else { 0 };
        self.counters.retained_bytes.store(retained, Ordering::Relaxed);
        self.apply_retention(retained);

        let spool = self.spool.as_mut().expect("checked above");
        let due = force || self.checkpoint_at.elapsed() >= CHECKPOINT_INTERVAL;
        if !due || (confirmed == spool.written && !force) {
            return;
        }
        self.checkpoint_at = Instant::now();
        let at = now_ms();
        if let Err(e) = checkpoint::store(&spool.checkpoint_path, &confirmed, at) {
            tracing::error!(file = %spool.checkpoint_path.display(), error = %e, "change capture: cannot write the checkpoint; the log is kept");
            return;
        }
        spool.written = confirmed;
        self.counters.checkpoint_at_ms.store(at, Ordering::Relaxed);
        for (link, r) in self.links.iter().zip(release) {
            link.release_below.fetch_max(r, Ordering::Release);
        }
        if !old_pending {
            self.counters.old_logs_released.store(true, Ordering::Release);
        }
    }

    /// At `cdc.retention_bytes_max`: hold writers (`block`), or give up the oldest events
    /// not yet published (`drop`) until the log holds a quarter less than the bound.
    fn apply_retention(&mut self, retained: u64) {
        let max = self.config.retention_bytes_max;
        let over = retained > max;
        match self.config.overflow {
            Overflow::Block => {
                let was = self.counters.writers_held.swap(over, Ordering::Relaxed);
                for l in &self.links {
                    l.hold.store(over, Ordering::Relaxed);
                }
                if over != was {
                    if over {
                        tracing::warn!(retained_bytes = retained, limit = max, "change capture: the log holds cdc.retention_bytes_max of unconfirmed changes; writers are held back (cdc.overflow = block)");
                    } else {
                        tracing::info!(
                            retained_bytes = retained,
                            "change capture: below cdc.retention_bytes_max again; writers go on"
                        );
                    }
                }
            }
            Overflow::Drop => {
                if !over || self.drop_bytes > 0 {
                    return;
                }
                let (given_up, left) = self.give_up_oldest(retained, max / 4 * 3);
                // What is still over the target lies ahead in the queues and the log: the next
                // events taken are given up too.
                self.drop_bytes = left;
                let dropped = self.counters.events_dropped.fetch_add(given_up, Ordering::Relaxed) + given_up;
                if self.drop_logged.is_some_and(|t| t.elapsed() < ERROR_REPORT_INTERVAL) {
                    return;
                }
                self.drop_logged = Some(Instant::now());
                tracing::error!(retained_bytes = retained, limit = max, events_dropped = dropped, "change capture: the log holds cdc.retention_bytes_max of unconfirmed changes; giving up the oldest (cdc.overflow = drop): consumers will see a gap in seq");
            }
        }
    }

    /// Gives up unpublished batches in the order of where they start in the log, oldest
    /// first, until the log holds at most `target` bytes of unconfirmed changes (a batch
    /// spans up to `cdc.batch_delay_ms` of writes, so the oldest start, not the count of
    /// bytes given up, is what frees the log). Returns the events given up and the bytes
    /// still over `target`.
    fn give_up_oldest(&mut self, mut retained: u64, target: u64) -> (u64, u64) {
        #[derive(Clone, Copy)]
        enum At {
            Outbox(usize),
            Building(usize),
        }
        let core_of = |shard: u32| self.keyspace.core_of_shard(shard) as usize;
        let mut pending: Vec<(u64, usize, At)> = (self.outbox.iter().enumerate())
            .filter_map(|(i, r)| Some((r.origin.log_start?, core_of(r.shard), At::Outbox(i))))
            .chain(
                self.building
                    .iter()
                    .enumerate()
                    .filter_map(|(s, b)| Some((b.as_ref()?.origin.log_start?, core_of(s as u32), At::Building(s)))),
            )
            .collect();
        pending.sort_unstable_by_key(|p| p.0);
        // What pins each core's log once the oldest are gone: published batches (left to
        // their confirms) and, past every pending batch, what has been taken.
        let mut floor = self.taken_end.clone();
        for r in self.unconfirmed.values() {
            if let Some(start) = r.origin.log_start {
                let c = core_of(r.shard);
                floor[c] = floor[c].min(start);
            }
        }
        let mut give_up = vec![false; pending.len()];
        for i in 0..pending.len() {
            if retained <= target {
                break;
            }
            let (start, core, _) = pending[i];
            give_up[i] = true;
            // The core's log now starts at its next pending batch, or at its floor.
            let next = pending[i + 1..]
                .iter()
                .find(|p| p.1 == core)
                .map_or(floor[core], |p| p.0.min(floor[core]));
            retained = retained.saturating_sub(next.saturating_sub(start));
        }
        let mut drop_outbox = vec![false; self.outbox.len()];
        let mut given_up = 0u64;
        for (p, _) in pending.iter().zip(&give_up).filter(|(_, g)| **g) {
            match p.2 {
                At::Outbox(i) => drop_outbox[i] = true,
                At::Building(s) => {
                    if let Some(b) = self.building[s].take() {
                        given_up += u64::from(b.events);
                    }
                }
            }
        }
        let mut i = 0;
        self.outbox.retain(|r| {
            let keep = !drop_outbox[i];
            i += 1;
            if !keep {
                given_up += u64::from(r.events);
            }
            keep
        });
        (given_up, retained.saturating_sub(target))
    }

    /// Publishes the outbox in order while the confirm window has room.
    async fn publish(&mut self) {
        while self.unconfirmed.len() < self.config.confirms_pending_max {
            if self.link.is_none() {
                return;
            }
            let Some(ready) = self.outbox.pop_front() else { return };
            let Some(link) = self.link.as_mut() else { return };
            let exchange = if ready.exchange_is_json {
                JSON_EXCHANGE
            } else {
                self.config.exchange.as_str()
            };
            let args = BasicPublishArguments::new(exchange, &ready.routing_key);
            let content_type = if ready.exchange_is_json {
                "application/json"
            } else {
                "application/x-protobuf"
            };
            let props = BasicProperties::default()
                .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                .with_content_type(content_type)
                .finish();
            match link.channel.basic_publish(props, ready.body.clone(), args).await {
                Ok(()) => {
                    let tag = link.next_tag;
                    link.next_tag += 1;
                    self.unconfirmed.insert(tag, ready);
                }
                Err(e) => {
                    self.outbox.push_front(ready);
                    self.lose_link(&e.to_string());
                    return;
                }
            }
        }
        self.counters
            .confirms_pending
            .store(self.unconfirmed.len() as u64, Ordering::Relaxed);
    }

    /// Applies the confirms that arrived; notices a dead connection.
    fn take_confirms(&mut self) {
        let Some(link) = self.link.as_mut() else { return };
        let mut nacked = false;
        let now = now_ms();
        while let Ok(confirm) = link.confirms.try_recv() {
            let (tag, multiple, ack) = match confirm {
                Confirm::Ack { tag, multiple } => (tag, multiple, true),
                Confirm::Nack { tag, multiple } => (tag, multiple, false),
            };
            let tags: Vec<u64> = if multiple {
                self.unconfirmed.range(..=tag).map(|(t, _)| *t).collect()
            } else {
                vec![tag]
            };
            if !ack {
                nacked = true;
                tracing::warn!(tag, multiple, "broker nacked a change batch; publishing it again");
                continue;
            }
            for t in tags {
                if let Some(mut done) = self.unconfirmed.remove(&t) {
                    self.counters.batches_published.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .events_published
                        .fetch_add(u64::from(done.events), Ordering::Relaxed);
                    for ts in &done.timestamps_ms {
                        let _ = self.delay_ms.record(now.saturating_sub(*ts).max(1));
                    }
                    if self.spare.len() < SPARE_MAX {
                        done.body.clear();
                        done.timestamps_ms.clear();
                        self.spare.push((done.body, done.timestamps_ms));
                    }
                }
            }
        }
        let dead = !link.connection.is_open() || !link.channel.is_open();
        if nacked {
            // Everything not yet confirmed goes again, in order (consumers dedupe by seq).
            self.requeue_unconfirmed();
        }
        if dead {
            self.lose_link("connection closed");
        }
        self.counters
            .confirms_pending
            .store(self.unconfirmed.len() as u64, Ordering::Relaxed);
        self.counters
            .delay_p50_ms
            .store(self.delay_ms.value_at_quantile(0.5), Ordering::Relaxed);
        self.counters
            .delay_p99_ms
            .store(self.delay_ms.value_at_quantile(0.99), Ordering::Relaxed);
    }

    fn requeue_unconfirmed(&mut self) {
        let n = self.unconfirmed.len() as u64;
        for (_, ready) in std::mem::take(&mut self.unconfirmed).into_iter().rev() {
            self.outbox.push_front(ready);
        }
        self.counters.republished_batches.fetch_add(n, Ordering::Relaxed);
    }

    fn lose_link(&mut self, why: &str) {
        tracing::warn!(
            reason = why,
            unconfirmed = self.unconfirmed.len(),
            "change capture: lost the broker connection"
        );
        self.requeue_unconfirmed();
        self.link = None;
        self.counters.connected.store(false, Ordering::Relaxed);
        self.counters
            .disconnected_since_ms
            .store(crate::change::now_ms(), Ordering::Relaxed);
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        self.reconnect_at = Instant::now() + self.reconnect_delay;
    }
}

/// Opens a connection and a confirm-mode channel, and declares the exchange.
async fn open(config: &Cdc) -> Result<Link, String> {
    let mut args = super::amqp_args(&config.url()?, &config.tls_files())?;
    args.heartbeat(HEARTBEAT_S).connection_name("flux-kv-cdc");
    let connect = Connection::open(&args);
    let connection = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    connection
        .register_callback(DefaultConnectionCallback)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection.open_channel(None).await.map_err(|e| e.to_string())?;
    let (tx, confirms) = mpsc::unbounded_channel();
    channel
        .register_callback(ConfirmCallback(tx))
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .map_err(|e| e.to_string())?;
    let (name, kind) = match config.format {
        CdcFormat::Protobuf => (config.exchange.as_str(), "topic"),
        CdcFormat::Json => (JSON_EXCHANGE, "fanout"),
    };
    let mut declare = ExchangeDeclareArguments::new(name, kind);
    declare.durable = true;
    channel.exchange_declare(declare).await.map_err(|e| e.to_string())?;
    Ok(Link {
        connection,
        channel,
        next_tag: 1,
        confirms,
    })
}
