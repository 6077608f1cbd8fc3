//! Durability: each shard core appends every applied change to its own write-ahead log
//! with direct I/O, snapshots its shards in the background so the log can be deleted, and
//! at start the snapshots and logs are replayed before any port opens.
//!
//! The log is also change capture's spool: an event is handed to the control core only
//! once the log has synced its record, and whatever the control core has not had confirmed
//! by the broker is read back from the log (after an overflow, an outage or a crash).
//!
//! - `record.rs`: the record format (length, CRC32C, shard, seq, op, expiry, key, value).
//! - `writer.rs`: the per-core writer, its segments, and the fsync policies (`always`
//!   groups every write of an executor round into one fdatasync before the replies go out;
//!   `everysec`; `no`).
//! - `snapshot.rs`: per-shard snapshots and log compaction.
//! - `recovery.rs`: replay, torn-tail handling, `--repair`.

pub mod record;
pub mod recovery;
pub mod snapshot;
pub mod writer;

use crate::cdc::capture::CaptureQueue;
use crate::change::{ChangeSink, Event, Fields};

/// Changes encoded on the shard core, waiting for its writer task.
#[derive(Default)]
pub struct WalBuffer {
    pub pending: Vec<u8>,
    /// Records appended so far (the generation a writer must reach to cover them).
    pub appended: u64,
    /// Bytes appended so far in this run: the log offset just past the last record.
    pub end: u64,
    /// The writer task, parked while there is nothing to write.
    pub writer: Option<std::task::Waker>,
}

impl WalBuffer {
    /// Appends one record; returns the log offset just past it.
    #[inline]
    pub fn append(&mut self, f: &Fields) -> u64 {
        self.end += record::encode_fields(f, &mut self.pending) as u64;
        self.appended += 1;
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        self.end
    }
}

/// Where a shard core's applied changes go, in apply order: its log (encoded on the spot
/// from the entry, nothing cloned) and change capture. Lives beside the core's store, not
/// in it, so the log writer reaches what it needs without borrowing the shards.
#[derive(Default)]
pub struct Recorder {
    pub log: Option<WalBuffer>,
    pub capture: Option<CaptureQueue>,
}

impl ChangeSink for Recorder {
    #[inline]
    fn record(&mut self, f: &Fields, now_ms: u64) {
        let log_end = match &mut self.log {
            Some(log) => log.append(f),
            None => 0,
        };
        if let Some(q) = &mut self.capture {
            q.push(&Event {
                fields: *f,
                timestamp_ms: now_ms,
                log_end,
            });
        }
    }
}

impl Recorder {
    /// Records appended to the log so far.
    pub fn appended(&self) -> u64 {
        self.log.as_ref().map_or(0, |w| w.appended)
    }

    /// True when writes may be applied now (see `CaptureQueue::ready`).
    pub fn writes_ready(&mut self) -> bool {
        self.capture.as_mut().is_none_or(CaptureQueue::ready)
    }

    /// Wakes the writer task (rotation, shutdown).
    pub fn wake_writer(&mut self) {
        if let Some(w) = self.log.as_mut().and_then(|b| b.writer.take()) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::ChangeOp;
    use bytes::Bytes;

    // Goal: the log gets exactly the changes capture gets, in the same order, and each
    // event knows where its record ends in the log.
    #[test]
    fn log_and_capture_see_the_same_changes() {
        let link = std::sync::Arc::new(crate::cdc::CoreLink::default());
        let (q, mut rx) = crate::cdc::capture::queue(4096, crate::config::Overflow::Block, link, true);
        let mut rec = Recorder {
            log: Some(WalBuffer::default()),
            capture: Some(q),
        };
        let (k, v) = (Bytes::from_static(b"key"), Bytes::from_static(b"value"));
        for seq in 1..=3 {
            let f = Fields {
                shard: 2,
                seq,
                op: ChangeOp::Set,
                expire_at_ms: 0,
                key: &k,
                value: &v,
            };
            rec.record(&f, 7);
        }
        let end = rec.log.as_ref().unwrap().end;
        rec.capture.as_mut().unwrap().release(end);
        let log = rec.log.take().unwrap();
        assert_eq!((log.appended, log.end as usize), (3, log.pending.len()));
        let mut at = 0;
        let taken = rx.drain(usize::MAX, |e| {
            match record::decode(&log.pending[at..], 1 << 20) {
                record::Read::Record(logged, n) => {
                    at += n;
                    assert_eq!(logged.fields(), e.fields);
                    assert_eq!(e.log_end, at as u64);
                }
                other => panic!("{other:?}"),
            }
            true
        });
        assert_eq!((taken, at), (3, log.pending.len()));
    }
}
