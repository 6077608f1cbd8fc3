//! The words every subsystem that handles writes shares: a change, its op, the borrowed
//! fields of a log record, where a shard sends its changes, and the clock.
//!
//! A leaf module: it imports nothing from the crate, so `shard`, `wal` and `cdc` all depend
//! on it and never on each other for this vocabulary.

use bytes::Bytes;

/// What a change did (the `Op` of proto/cdc.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOp {
    Set,
    Del,
    Expire,
    Expired,
    /// Removed to make room under `limits.eviction`.
    Evicted,
    /// Copied in by a slot migration (the key's value and expiry at its source node): not a
    /// client's write, which the source node already reported.
    MigrationSet,
    /// Removed by a slot migration: the copy a node drops once its slot has moved away, or
    /// a stale copy an importing node clears. Not a client's delete.
    MigrationDel,
}

/// One change's fields, borrowed from wherever they live (a shard entry, a snapshot copy, a
/// decoded record, change capture's queue), so the log and the change stream encode
/// straight from them and nothing is cloned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields<'a> {
    pub shard: u32,
    /// Per-shard sequence number, gap-free from 1.
    pub seq: u64,
    pub op: ChangeOp,
    /// The key's expiry after the change; 0 = none.
    pub expire_at_ms: u64,
    pub key: &'a [u8],
    /// The new value (SET only; empty otherwise).
    pub value: &'a [u8],
}

/// A change as change capture sees it: its fields, when it was applied, and where its record
/// ends in its core's log of this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub fields: Fields<'a>,
    /// Unix ms the write was applied; 0 for a change read back from a log.
    pub timestamp_ms: u64,
    /// Offset just past its record in its core's log of this run; 0 when there is no log
    /// or it was read from a log of an earlier run.
    pub log_end: u64,
}

/// One applied change, owned: a log record decoded at recovery or read back by change
/// capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub shard: u32,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub op: ChangeOp,
    pub key: Bytes,
    pub value: Bytes,
    pub expire_at_ms: u64,
    /// Offset in its core's log of this run just past the change's record; 0 when there is
    /// no log (persistence off) or the change was read back from a log.
    pub log_end: u64,
}

impl Change {
    pub fn new(f: &Fields, timestamp_ms: u64, log_end: u64) -> Change {
        Change {
            shard: f.shard,
            seq: f.seq,
            timestamp_ms,
            op: f.op,
            key: Bytes::copy_from_slice(f.key),
            value: Bytes::copy_from_slice(f.value),
            expire_at_ms: f.expire_at_ms,
            log_end,
        }
    }

    pub fn event(&self) -> Event<'_> {
        Event {
            fields: self.fields(),
            timestamp_ms: self.timestamp_ms,
            log_end: self.log_end,
        }
    }

    pub fn fields(&self) -> Fields<'_> {
        Fields {
            shard: self.shard,
            seq: self.seq,
            op: self.op,
            expire_at_ms: self.expire_at_ms,
            key: &self.key,
            value: &self.value,
        }
    }
}

/// Where a shard sends each change it applies, in apply order (the core's log and change
/// capture in the server; nothing, or a list, in tests and recovery).
pub trait ChangeSink {
    fn record(&mut self, f: &Fields, now_ms: u64);
}

/// Discards changes (recovery re-applies what is already logged).
impl ChangeSink for () {
    fn record(&mut self, _: &Fields, _: u64) {}
}

/// Collects changes (tests).
impl ChangeSink for Vec<Change> {
    fn record(&mut self, f: &Fields, now_ms: u64) {
        self.push(Change::new(f, now_ms, 0));
    }
}

/// Wall-clock time in Unix milliseconds: deadlines are absolute so they survive restarts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
