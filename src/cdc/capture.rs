//! The shard core's side of change data capture: a bounded, lock-free single-producer byte
//! queue per core (rtrb), drained by the control core.
//!
//! An event goes into the queue as a copy of its fields (below), not as a handle to the
//! stored key and value: a handle would cost the shard core an allocation and atomic
//! reference counts per write, and the control core frees of memory the shard core
//! allocated. Copying a few dozen bytes is cheaper, and the control core encodes the batch
//! straight from the queue's bytes without allocating per event.
//!
//! ```text
//! u32 bytes after this field | u64 log_end | u64 timestamp_ms | the log record's body
//! (u32 shard | u64 seq | u8 op | u64 expire_at_ms | u32 key bytes | key | value)
//! ```
//! Little-endian; the body is `wal::record`'s, encoded and decoded by the same code.
//!
//! With the write-ahead log on, the log is the spool and memory is only the fast path:
//! - an event waits on the core until the log has synced its record (`release`), so
//!   nothing reaches the broker that a crash could take back, and after a crash no seq is
//!   reused for another change;
//! - an event that finds the queue (or the wait list) full is simply dropped from memory:
//!   its record is in the log, and the control core reads it back from there (it notices
//!   the gap by log offset, or by the `overflowed` flag for a gap at the tail).
//!
//!   Writers are held back only when the control core says the log holds
//!   `cdc.retention_bytes_max` of unconfirmed changes and `cdc.overflow = block`.
//!
//! Without a log, memory is all there is: a full queue either holds writers back while a
//! small backlog drains (`block`, nothing lost while the process runs) or counts the event
//! as dropped (`drop`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use super::CoreLink;
use crate::change::{Event, Fields};
use crate::config::Overflow;
use crate::wal::record;

/// Bytes of an event in the queue before its record body.
const HEADER_BYTES: usize = 4 + 8 + 8;

/// Bytes `f` takes in the queue.
fn encoded_len(f: &Fields) -> usize {
    HEADER_BYTES + record::body_len(f)
}

/// Appends `e` in the queue's format.
fn encode(e: &Event, out: &mut Vec<u8>) {
    let len = encoded_len(&e.fields);
    out.reserve(len);
    out.extend_from_slice(&((len - 4) as u32).to_le_bytes());
    out.extend_from_slice(&e.log_end.to_le_bytes());
    out.extend_from_slice(&e.timestamp_ms.to_le_bytes());
    record::encode_body(&e.fields, out);
}

/// Bytes of the event at the start of `data`, if its length field is complete.
fn event_len(data: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    Some(4 + len as usize)
}

/// The log end of the event at the start of `data` (a complete event).
fn log_end_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[4..12].try_into().expect("8 bytes"))
}

/// The event `data` holds exactly (written by [`encode`] on this node's own shard core; a
/// malformed one is a bug, caught here).
fn decode(data: &[u8]) -> Event<'_> {
    debug_assert_eq!(event_len(data), Some(data.len()));
    let fields = record::decode_body(&data[HEADER_BYTES..])
        .unwrap_or_else(|why| panic!("malformed change event in the capture queue: {why}"));
    Event {
        log_end: log_end_of(data),
        timestamp_ms: u64::from_le_bytes(data[12..20].try_into().expect("8 bytes")),
        fields,
    }
}

/// Creates one core's queue of `bytes_max` bytes: the producer for the core, the reader for
/// the control core. `logged`: the write-ahead log is on (it is the spool).
pub fn queue(bytes_max: usize, overflow: Overflow, link: Arc<CoreLink>, logged: bool) -> (CaptureQueue, EventReader) {
    let (producer, consumer) = RingBuffer::new(bytes_max);
    (
        CaptureQueue {
            producer,
            waiting: Vec::new(),
            waiting_events: 0,
            bytes_max,
            dropped_end: 0,
            logged,
            link: link.clone(),
            backlog: Vec::new(),
            backlog_events: 0,
            pushed: 0,
            overflow,
            dropped: 0,
            scratch: Vec::new(),
        },
        EventReader {
            consumer,
            link,
            scratch: Vec::new(),
        },
    )
}

pub struct CaptureQueue {
    producer: Producer<u8>,
    /// Log on: encoded events whose records the log has not synced yet, in log order.
    waiting: Vec<u8>,
    waiting_events: usize,
    bytes_max: usize,
    /// Log on: the log end of the newest event dropped from `waiting` and not yet covered by
    /// a sync (0: none); once synced, the control core is told to read the log's tail.
    dropped_end: u64,
    logged: bool,
    link: Arc<CoreLink>,
    /// Log off, `block`: encoded events that did not fit, in order, ahead of anything newer.
    backlog: Vec<u8>,
    backlog_events: usize,
    /// Events handed to the queue so far (the control core counts what it took).
    pushed: u64,
    overflow: Overflow,
    /// Log off, `drop`: events lost.
    dropped: u64,
    scratch: Vec<u8>,
}

impl CaptureQueue {
    #[inline]
    pub fn push(&mut self, e: &Event) {
        if self.logged {
            if self.waiting.len() + encoded_len(&e.fields) <= self.bytes_max {
                encode(e, &mut self.waiting);
                self.waiting_events += 1;
            } else {
                self.dropped_end = e.log_end;
            }
            return;
        }
        if self.backlog.is_empty() {
            let mut buf = std::mem::take(&mut self.scratch);
            buf.clear();
            encode(e, &mut buf);
            let sent = self.send(&buf, 1);
            self.scratch = buf;
            if sent {
                return;
            }
        }
        match self.overflow {
            Overflow::Block => {
                encode(e, &mut self.backlog);
                self.backlog_events += 1;
            }
            Overflow::Drop => {
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = self.dropped,
                        "change queue full and no write-ahead log to read back from: events dropped (cdc.overflow = drop)"
                    );
                }
            }
        }
    }

    /// Copies `events` whole encoded events into the queue if they all fit.
    fn send(&mut self, bytes: &[u8], events: usize) -> bool {
        if self.producer.push_entire_slice(bytes).is_err() {
            return false;
        }
        self.pushed += events as u64;
        true
    }

    /// The log has synced everything before `synced_end`: hand those events to the control
    /// core. What does not fit is dropped from memory; the control core reads it back.
    pub fn release(&mut self, synced_end: u64) {
        if !self.logged {
            return;
        }
        self.link.synced_end.store(synced_end, Ordering::Release);
        let mut overflowed = self.dropped_end != 0 && self.dropped_end <= synced_end;
        if overflowed {
            self.dropped_end = 0;
        }
        // The prefix of events covered by the sync, and the part of it that fits the queue.
        let (mut covered, mut fits, mut fitting_events, mut events) = (0, 0, 0, 0);
        let room = self.producer.slots();
        while let Some(len) = self.waiting.get(covered..).and_then(event_len) {
            if log_end_of(&self.waiting[covered..]) > synced_end {
                break;
            }
            covered += len;
            events += 1;
            if covered <= room {
                fits = covered;
                fitting_events = events;
            }
        }
        if covered == 0 {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        let sent = self.send(&waiting[..fits], fitting_events);
        debug_assert!(sent, "the queue had room for {fits} bytes");
        overflowed |= fits < covered;
        self.waiting = waiting;
        self.waiting.drain(..covered);
        self.waiting_events -= events;
        if overflowed {
            // After `synced_end` is stored: the control core reads at least up to here.
            self.link.overflowed.store(true, Ordering::Release);
        }
    }

    /// True when new writes may go ahead: the control core does not hold writers back
    /// (log on), or nothing waits in the backlog (log off).
    pub fn ready(&mut self) -> bool {
        if self.logged {
            return !self.link.hold.load(Ordering::Relaxed);
        }
        self.pump()
    }

    /// Moves backlog into the queue as space allows; true when the backlog is empty.
    fn pump(&mut self) -> bool {
        if self.backlog.is_empty() {
            return true;
        }
        let room = self.producer.slots();
        let (mut fits, mut events) = (0, 0);
        while let Some(len) = self.backlog.get(fits..).and_then(event_len) {
            if fits + len > room {
                break;
            }
            fits += len;
            events += 1;
        }
        if fits > 0 {
            let backlog = std::mem::take(&mut self.backlog);
            self.send(&backlog[..fits], events);
            self.backlog = backlog;
            self.backlog.drain(..fits);
            self.backlog_events -= events;
        }
        self.backlog.is_empty()
    }

    /// Events held on this core for the control core: queued, waiting for the log, or in
    /// the backlog.
    pub fn depth(&self) -> u64 {
        let queued = self
            .pushed
            .saturating_sub(self.link.taken_events.load(Ordering::Relaxed));
        queued + (self.waiting_events + self.backlog_events) as u64
    }

    /// Events lost for good (log off, `drop`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// How many more changes the core may make before capture has to hold writers or drop
    /// (bounds the expiry sweep): unbounded with a log (it can always be read back), else
    /// what the queue has room for (at the smallest event size).
    pub fn room(&self) -> usize {
        match (self.logged, self.backlog.is_empty()) {
            (true, _) => usize::MAX,
            (false, true) => self.producer.slots() / (HEADER_BYTES + record::FIXED_BODY_BYTES),
            (false, false) => 0,
        }
    }
}

/// The control core's end of one core's queue.
pub struct EventReader {
    consumer: Consumer<u8>,
    link: Arc<CoreLink>,
    /// An event that wraps around the ring's end, copied whole.
    scratch: Vec<u8>,
}

impl EventReader {
    pub fn is_empty(&self) -> bool {
        self.consumer.is_empty()
    }

    /// Shows the queued events in order to `visit`, at most `max` of them, consuming each
    /// one `visit` returns true for and stopping (without consuming) at the first it
    /// returns false for. Returns how many were consumed.
    pub fn drain(&mut self, max: usize, mut visit: impl FnMut(&Event) -> bool) -> usize {
        let available = self.consumer.slots();
        if available == 0 || max == 0 {
            return 0;
        }
        let Ok(chunk) = self.consumer.read_chunk(available) else {
            return 0;
        };
        let (a, b) = chunk.as_slices();
        let (mut at, mut events) = (0, 0);
        while events < max {
            // The event at `at` of a ++ b.
            let head = |n: usize| -> Option<&[u8]> {
                if at + n <= a.len() {
                    Some(&a[at..at + n])
                } else {
                    None
                }
            };
            let len = match head(4) {
                Some(h) => event_len(h),
                None if at >= a.len() => b.get(at - a.len()..).and_then(event_len),
                None => {
                    let mut h = [0u8; 4];
                    let split = a.len() - at;
                    h[..split].copy_from_slice(&a[at..]);
                    h[split..].copy_from_slice(&b[..4 - split]);
                    event_len(&h)
                }
            };
            let Some(len) = len else { break };
            let bytes: &[u8] = if at + len <= a.len() {
                &a[at..at + len]
            } else if at >= a.len() {
                &b[at - a.len()..at - a.len() + len]
            } else {
                self.scratch.clear();
                self.scratch.extend_from_slice(&a[at..]);
                self.scratch.extend_from_slice(&b[..len - (a.len() - at)]);
                &self.scratch
            };
            if !visit(&decode(bytes)) {
                break;
            }
            at += len;
            events += 1;
        }
        chunk.commit(at);
        self.link.taken_events.fetch_add(events as u64, Ordering::Relaxed);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::ChangeOp;

    fn event<'a>(seq: u64, key: &'a [u8], value: &'a [u8], log_end: u64) -> Event<'a> {
        Event {
            fields: Fields {
                shard: 3,
                seq,
                op: ChangeOp::Set,
                expire_at_ms: seq * 10,
                key,
                value,
            },
            timestamp_ms: 1_700_000_000_000 + seq,
            log_end,
        }
    }

    // Goal: events round-trip through the queue in order, across the ring's wrap-around
    // (a 300-byte ring, events of 52-54 bytes), and a visit that says stop leaves the event
    // queued; a backlog (block, no log) holds writers until it drained.
    #[test]
    fn events_round_trip_across_the_wrap() {
        let link = Arc::new(CoreLink::default());
        let (mut q, mut rx) = queue(300, Overflow::Block, link, false);
        let value = vec![b'v'; 3];
        let mut seen = Vec::new();
        let mut refused = false;
        let mut visit = |e: &Event| {
            if e.fields.seq == 50 && !refused {
                refused = true; // must come again, first
                return false;
            }
            let want_key = format!("key-{}", e.fields.seq);
            assert_eq!(e.fields.key, want_key.as_bytes());
            assert_eq!(e.fields.value, &value[..]);
            assert_eq!(e.fields.expire_at_ms, e.fields.seq * 10);
            assert_eq!(e.timestamp_ms, 1_700_000_000_000 + e.fields.seq);
            seen.push(e.fields.seq);
            true
        };
        for seq in 1..=200u64 {
            let key = format!("key-{seq}");
            q.push(&event(seq, key.as_bytes(), &value, 0));
            if seq % 7 == 0 {
                assert!(!q.ready(), "the backlog holds writers");
                while !q.ready() {
                    rx.drain(3, &mut visit);
                }
            }
        }
        while q.depth() > 0 {
            q.ready();
            rx.drain(usize::MAX, &mut visit);
        }
        assert_eq!(seen, (1..=200).collect::<Vec<_>>());
    }

    // Goal: with the log on, nothing reaches the queue before the log has synced its record,
    // and events that do not fit are dropped from memory with the overflow flag raised.
    #[test]
    fn logged_events_wait_for_the_sync() {
        let link = Arc::new(CoreLink::default());
        let (mut q, mut rx) = queue(200, Overflow::Block, link.clone(), true); // events: 47 bytes
        for seq in 1..=3u64 {
            q.push(&event(seq, b"k", b"v", seq * 100));
        }
        assert_eq!(rx.drain(usize::MAX, |_| true), 0, "nothing is synced yet");
        q.release(200);
        assert_eq!(link.synced_end.load(Ordering::Acquire), 200);
        for seq in 4..=5u64 {
            q.push(&event(seq, b"k", b"v", seq * 100));
        }
        q.release(500); // 3 events for the 106 bytes left: the last is dropped
        assert!(
            link.overflowed.load(Ordering::Acquire),
            "event 5 was dropped from memory"
        );
        let mut got = Vec::new();
        rx.drain(usize::MAX, |e| {
            got.push((e.fields.seq, e.log_end));
            true
        });
        assert_eq!(got, [(1, 100), (2, 200), (3, 300), (4, 400)]);
        assert_eq!(q.depth(), 0);
    }
}
