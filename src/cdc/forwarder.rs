//! The control core's change forwarder: drains every shard core's change queue, packs the
//! events into batches bounded by count, bytes and time, publishes them to RabbitMQ with
//! publisher confirms, and forgets a batch only when the broker has confirmed it.
//!
//! Order and delivery: batches are published in the order they were closed and confirmed
//! by delivery tag (1, 2, ... per channel). A nack, or a lost connection, puts every
//! unconfirmed batch back at the front of the outbox, in order, to be published again: a
//! consumer may see a batch twice (it dedupes by node_id + shard + seq), never out of order
//! after dedupe, and never miss one.
//!
//! Bounds: at most `cdc.confirms_pending_max` batches are closed-but-unconfirmed; past that
//! the forwarder stops draining the shard cores' queues, which fill, which holds writers
//! back (`cdc.overflow = block`). Nothing waits on the broker anywhere else.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return, DELIVERY_MODE_PERSISTENT};
use hdrhistogram::Histogram;
use rtrb::Consumer;
use tokio::sync::mpsc;

use super::spool::Spool;
use super::{encode, CdcCounters};
use crate::config::{Cdc, CdcFormat, Overflow};
use crate::shard::{now_ms, Change};

/// The old service's exchange, for `cdc.format = "json"`.
pub const JSON_EXCHANGE: &str = "flux_kv_events";
/// How often the forwarder drains the queues and closes due batches.
const TICK: Duration = Duration::from_millis(1);
/// Events taken from one core's queue per tick, so one busy core cannot starve the rest.
const DRAIN_EVENTS_MAX: usize = 16_384;
/// First pause before reconnecting; doubles up to `cdc.reconnect_delay_max_ms`.
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
/// Heartbeat so a silently dead broker connection is noticed.
const HEARTBEAT_S: u16 = 10;
/// On shutdown, how long the forwarder keeps trying to get everything confirmed.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A closed batch, ready to publish (or published and awaiting its confirm).
struct Ready {
    exchange_is_json: bool,
    routing_key: String,
    body: Vec<u8>,
    events: u32,
    /// Apply times of its events, for the write-to-confirm delay (not kept when spooled).
    timestamps_ms: Vec<u64>,
    /// The spool segment it was read from, released when the broker confirms it.
    spool_segment: Option<u64>,
}

/// A batch still collecting events of one shard, already encoded as a `ChangeBatch`.
struct Building {
    body: Vec<u8>,
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

/// The forwarder's state (lives on the control thread).
pub struct Forwarder {
    config: Cdc,
    node_id: String,
    queues: Vec<Consumer<Change>>,
    counters: Arc<CdcCounters>,
    building: HashMap<u32, Building>,
    /// Closed batches in publish order; older than anything in `spool`.
    outbox: VecDeque<Ready>,
    /// Where closed batches go, in order, while the broker is away and `outbox` is full.
    spool: Option<Spool>,
    unconfirmed: BTreeMap<u64, Ready>,
    delay_ms: Histogram<u64>,
    link: Option<Link>,
    reconnect_at: Instant,
    reconnect_delay: Duration,
}

impl Forwarder {
    /// `spool_dir` holds the disk spool (`<data_dir>/cdc-spool`).
    pub fn new(
        config: Cdc,
        node_id: String,
        queues: Vec<Consumer<Change>>,
        counters: Arc<CdcCounters>,
        spool_dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let spool = Some(Spool::open(spool_dir, config.spool_bytes_max)?);
        Ok(Forwarder {
            config,
            node_id,
            queues,
            counters,
            building: HashMap::new(),
            outbox: VecDeque::new(),
            spool,
            unconfirmed: BTreeMap::new(),
            delay_ms: Histogram::new_with_bounds(1, 3_600_000, 2).expect("static histogram bounds"),
            link: None,
            reconnect_at: Instant::now(),
            reconnect_delay: RECONNECT_DELAY_MIN,
        })
    }

    /// Runs until `stop` is set and everything taken from the queues is confirmed (or the
    /// flush timeout passes, which is logged with what is left).
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
            if stopping {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                let idle = self.unconfirmed.is_empty()
                    && self.outbox.is_empty()
                    && self.building.is_empty()
                    && self.spool.as_ref().is_none_or(Spool::is_empty);
                if idle && self.queues.iter().all(|q| q.is_empty()) {
                    break;
                }
                if since.elapsed() > FLUSH_TIMEOUT {
                    let left: usize = self.outbox.len() + self.unconfirmed.len();
                    tracing::error!(
                        batches = left,
                        "shutdown: change batches not confirmed by the broker in time"
                    );
                    break;
                }
            }
        }
        if let Some(link) = self.link.take() {
            let _ = link.connection.close().await;
        }
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
                self.reconnect_delay = RECONNECT_DELAY_MIN;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = self.reconnect_delay.as_millis() as u64, "change capture: broker unreachable");
                self.reconnect_at = Instant::now() + self.reconnect_delay;
                let max = Duration::from_millis(self.config.reconnect_delay_max_ms);
                self.reconnect_delay = (self.reconnect_delay * 2).min(max);
            }
        }
    }

    /// Takes events from the shard cores' queues into per-shard batches, and closes the
    /// batches that are full or old enough (all of them when stopping).
    fn drain(&mut self, stopping: bool) {
        for q in 0..self.queues.len() {
            let mut taken = 0;
            while taken < DRAIN_EVENTS_MAX && self.has_room() {
                let Ok(change) = self.queues[q].pop() else { break };
                taken += 1;
                self.add(change);
            }
        }
        let delay = Duration::from_millis(self.config.batch_delay_ms);
        let due: Vec<u32> = self
            .building
            .iter()
            .filter(|(_, b)| stopping || b.opened.elapsed() >= delay)
            .map(|(s, _)| *s)
            .collect();
        for shard in due {
            self.close(shard);
        }
    }

    /// Whether closed batches can still be taken in: memory for them, or room in the spool
    /// for a full batch. When not, the shard cores' queues fill and hold writers back
    /// (`cdc.overflow = block`); with `drop`, batches the spool cannot take are dropped.
    fn has_room(&self) -> bool {
        let in_memory = self.spool.as_ref().is_none_or(Spool::is_empty)
            && self.outbox.len() + self.unconfirmed.len() < self.config.confirms_pending_max;
        in_memory
            || self.config.overflow == Overflow::Drop
            || self
                .spool
                .as_ref()
                .is_some_and(|s| s.has_room(self.config.batch_bytes_max))
    }

    /// Queues a closed batch behind everything older: in memory while there is room and
    /// nothing is spooled, else at the end of the spool.
    fn enqueue(&mut self, ready: Ready) {
        let spooled = self.spool.as_ref().is_some_and(|s| !s.is_empty());
        if !spooled && self.outbox.len() + self.unconfirmed.len() < self.config.confirms_pending_max {
            self.outbox.push_back(ready);
            return;
        }
        let Some(spool) = self.spool.as_mut() else {
            self.outbox.push_back(ready);
            return;
        };
        if !spool.has_room(ready.body.len()) {
            self.counters
                .events_dropped
                .fetch_add(u64::from(ready.events), Ordering::Relaxed);
            tracing::warn!(
                events = ready.events,
                "change spool full: batch dropped (cdc.overflow = drop)"
            );
            return;
        }
        if let Err(e) = spool.append(ready.exchange_is_json, &ready.routing_key, &ready.body, ready.events) {
            // A spool that cannot be written is a disk problem; keep the batch in memory.
            tracing::error!(error = %e, "cannot write the change spool");
            self.outbox.push_back(ready);
            return;
        }
        self.counters.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
    }

    fn add(&mut self, change: Change) {
        if self.config.format == CdcFormat::Json {
            if let Some(body) = encode::json(&change) {
                let ready = Ready {
                    exchange_is_json: true,
                    routing_key: String::new(),
                    body,
                    events: 1,
                    timestamps_ms: vec![change.timestamp_ms],
                    spool_segment: None,
                };
                self.enqueue(ready);
            }
            return;
        }
        let b = self.building.entry(change.shard).or_insert_with(|| Building {
            body: Vec::with_capacity(4096),
            timestamps_ms: Vec::new(),
            opened: Instant::now(),
        });
        encode::put_event(&self.node_id, &change, &mut b.body);
        b.timestamps_ms.push(change.timestamp_ms);
        if b.timestamps_ms.len() >= self.config.batch_events_max || b.body.len() >= self.config.batch_bytes_max {
            self.close(change.shard);
        }
    }

    fn close(&mut self, shard: u32) {
        let Some(b) = self.building.remove(&shard) else { return };
        self.enqueue(Ready {
            exchange_is_json: false,
            routing_key: format!("{}.{shard}", self.node_id),
            body: b.body,
            events: b.timestamps_ms.len() as u32,
            timestamps_ms: b.timestamps_ms,
            spool_segment: None,
        });
    }

    /// Publishes the outbox in order while the confirm window has room.
    async fn publish(&mut self) {
        while self.unconfirmed.len() < self.config.confirms_pending_max {
            if self.link.is_none() {
                return;
            }
            let Some(ready) = self.next_to_publish() else { return };
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

    /// The oldest batch not yet published: from memory, else from the spool.
    fn next_to_publish(&mut self) -> Option<Ready> {
        if let Some(r) = self.outbox.pop_front() {
            return Some(r);
        }
        let spool = self.spool.as_mut()?;
        let read = spool.read();
        self.counters.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
        let record = match read {
            Ok(r) => r?,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the change spool");
                return None;
            }
        };
        Some(Ready {
            exchange_is_json: record.json,
            routing_key: record.routing_key,
            body: record.body,
            events: record.events,
            timestamps_ms: Vec::new(),
            spool_segment: Some(record.segment),
        })
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
                if let Some(done) = self.unconfirmed.remove(&t) {
                    self.counters.batches_published.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .events_published
                        .fetch_add(u64::from(done.events), Ordering::Relaxed);
                    for ts in done.timestamps_ms {
                        let _ = self.delay_ms.record(now.saturating_sub(ts).max(1));
                    }
                    if let (Some(seg), Some(spool)) = (done.spool_segment, self.spool.as_mut()) {
                        spool.confirmed(seg);
                        self.counters.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
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
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        self.reconnect_at = Instant::now() + self.reconnect_delay;
    }
}

/// Opens a connection and a confirm-mode channel, and declares the exchange.
async fn open(config: &Cdc) -> Result<Link, String> {
    let mut args = super::amqp_args(&config.amqp_url)?;
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
