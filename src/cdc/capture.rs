//! The shard core's side of change data capture: a bounded, lock-free single-producer
//! queue per core (rtrb), drained by the control core. Pushing an event is a memory write:
//! no serialization, no syscall, no lock.
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

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rtrb::{Consumer, Producer, PushError, RingBuffer};

use super::CoreLink;
use crate::change::Change;
use crate::config::Overflow;

/// Creates one core's queue: the producer for the core, the consumer for the control core.
/// `link` is the core's shared state with the control core when the log is on.
pub fn queue(events_max: usize, overflow: Overflow, link: Option<Arc<CoreLink>>) -> (CaptureQueue, Consumer<Change>) {
    let (producer, consumer) = RingBuffer::new(events_max);
    (
        CaptureQueue {
            producer,
            waiting: VecDeque::new(),
            waiting_max: events_max,
            dropped_end: 0,
            link,
            backlog: VecDeque::new(),
            overflow,
            dropped: 0,
        },
        consumer,
    )
}

pub struct CaptureQueue {
    producer: Producer<Change>,
    /// Log on: events whose records the log has not synced yet, in log order.
    waiting: VecDeque<Change>,
    waiting_max: usize,
    /// Log on: the log end of the newest event dropped from `waiting` and not yet covered by
    /// a sync (0: none); once synced, the control core is told to read the log's tail.
    dropped_end: u64,
    link: Option<Arc<CoreLink>>,
    /// Log off, `block`: events that did not fit, in order, ahead of anything newer.
    backlog: VecDeque<Change>,
    overflow: Overflow,
    /// Log off, `drop`: events lost.
    dropped: u64,
}

impl CaptureQueue {
    #[inline]
    pub fn push(&mut self, change: Change) {
        if self.link.is_some() {
            if self.waiting.len() < self.waiting_max {
                self.waiting.push_back(change);
            } else {
                self.dropped_end = change.log_end;
            }
            return;
        }
        let change = if self.backlog.is_empty() {
            match self.producer.push(change) {
                Ok(()) => return,
                Err(PushError::Full(c)) => c,
            }
        } else {
            change
        };
        match self.overflow {
            Overflow::Block => self.backlog.push_back(change),
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

    /// The log has synced everything before `synced_end`: hand those events to the control
    /// core. What does not fit is dropped from memory; the control core reads it back.
    pub fn release(&mut self, synced_end: u64) {
        let Some(link) = &self.link else { return };
        link.synced_end.store(synced_end, Ordering::Release);
        let mut overflowed = self.dropped_end != 0 && self.dropped_end <= synced_end;
        if overflowed {
            self.dropped_end = 0;
        }
        while self.waiting.front().is_some_and(|c| c.log_end <= synced_end) {
            let Some(c) = self.waiting.pop_front() else { break };
            if self.producer.push(c).is_err() {
                overflowed = true;
            }
        }
        if overflowed {
            // After `synced_end` is stored: the control core reads at least up to here.
            link.overflowed.store(true, Ordering::Release);
        }
    }

    /// True when new writes may go ahead: the control core does not hold writers back
    /// (log on), or nothing waits in the backlog (log off).
    pub fn ready(&mut self) -> bool {
        match &self.link {
            Some(link) => !link.hold.load(Ordering::Relaxed),
            None => self.pump(),
        }
    }

    /// Moves backlog into the queue as space allows; true when the backlog is empty.
    fn pump(&mut self) -> bool {
        while let Some(c) = self.backlog.pop_front() {
            if let Err(PushError::Full(c)) = self.producer.push(c) {
                self.backlog.push_front(c);
                return false;
            }
        }
        true
    }

    /// Events held on this core for the control core: queued, waiting for the log, or in
    /// the backlog.
    pub fn depth(&self) -> u64 {
        let queued = self.producer.buffer().capacity() - self.producer.slots();
        (queued + self.waiting.len() + self.backlog.len()) as u64
    }

    /// Events lost for good (log off, `drop`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// How many more changes the core may make before capture has to hold writers or drop
    /// (bounds the expiry sweep). Unbounded with a log: it can always be read back.
    pub fn room(&self) -> usize {
        match (&self.link, self.backlog.is_empty()) {
            (Some(_), _) => usize::MAX,
            (None, true) => self.producer.slots(),
            (None, false) => 0,
        }
    }
}
