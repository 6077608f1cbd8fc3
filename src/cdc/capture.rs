//! The shard core's side of change data capture: a bounded, lock-free single-producer
//! queue per core (rtrb), drained by the control core. Pushing an event is a memory write:
//! no serialization, no syscall, no lock.
//!
//! When the queue is full the `overflow` policy decides: `block` keeps the events in order
//! in a small local backlog and holds new writes back until the backlog has drained (the
//! writer waits, nothing is lost); `drop` counts the event as dropped (visible in Stats and
//! the log).

use std::collections::VecDeque;

use rtrb::{Consumer, Producer, PushError, RingBuffer};

use crate::config::Overflow;
use crate::shard::Change;

/// Creates one core's queue: the producer for the core, the consumer for the control core.
pub fn queue(events_max: usize, overflow: Overflow) -> (CaptureQueue, Consumer<Change>) {
    let (producer, consumer) = RingBuffer::new(events_max);
    (
        CaptureQueue {
            producer,
            backlog: VecDeque::new(),
            overflow,
            dropped: 0,
        },
        consumer,
    )
}

pub struct CaptureQueue {
    producer: Producer<Change>,
    /// Events that did not fit, in order, ahead of anything newer (block policy only).
    backlog: VecDeque<Change>,
    overflow: Overflow,
    dropped: u64,
}

impl CaptureQueue {
    pub fn push(&mut self, change: Change) {
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
                        "change queue full: events dropped (cdc.overflow = drop)"
                    );
                }
            }
        }
    }

    /// Moves backlog into the queue as space allows; true when the backlog is empty.
    pub fn pump(&mut self) -> bool {
        while let Some(c) = self.backlog.pop_front() {
            if let Err(PushError::Full(c)) = self.producer.push(c) {
                self.backlog.push_front(c);
                return false;
            }
        }
        true
    }

    /// True when new writes may go ahead (nothing waits in the backlog).
    pub fn ready(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Events queued for the control core, backlog included.
    pub fn depth(&self) -> u64 {
        (self.producer.buffer().capacity() - self.producer.slots() + self.backlog.len()) as u64
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Free slots in the queue (bounds how much the expiry sweep may remove at once).
    pub fn room(&self) -> usize {
        if self.backlog.is_empty() {
            self.producer.slots()
        } else {
            0
        }
    }
}
