//! One shard's data: the key map, expiry, and memory accounting.
//!
//! A shard is owned by exactly one core and touched only from that core's thread, so it has
//! no locks. Commands arrive already routed (see `keyspace`); a shard never checks where a key
//! belongs, the caller asserts it.
//!
//! Each key, its value and its deadline live in one allocation, an [`Item`], behind an
//! 8-byte table slot (`item.rs`). Memory is accounted from the allocator's size class of
//! each item, the table's capacity and the deadline index, so `limits.memory_bytes_max`
//! follows the process' real use.
//!
//! Expiry is exact and cheap: an entry with a TTL is also filed in a `BTreeSet` ordered by
//! deadline (16 bytes each: the deadline and the item's handle), so the active sweep pops
//! only keys that are due, with a bound on work per call, and a read of an expired key
//! removes it on the spot (lazy expiry).
//!
//! Eviction (`limits.eviction = lru`) is approximate LRU, as Redis does it: each item
//! carries the tick it was last read or written, an eviction samples a few random table
//! buckets, keeps the least recently used it has seen in a small pool, and removes the
//! oldest of the pool. No list threads the items, so LRU costs no memory per key; the pool
//! carries good candidates over from one eviction to the next, which makes a handful of
//! samples behave like many.

mod item;
mod store;

pub use item::Item;

use item::tick;
pub use store::CoreStore;

use std::collections::BTreeSet;

use bytes::Bytes;
use hashbrown::HashTable;

use crate::change::Fields;
pub use crate::change::{now_ms, Change, ChangeOp, ChangeSink};

/// The in-shard table hash, derived from the routing hash so a key is hashed once. Every
/// key of a shard shares the routing hash's low bits (they chose the shard), and hashbrown
/// indexes buckets by the low bits, so the high half is folded down before multiplying.
#[inline]
pub fn table_hash(route_hash: u64) -> u64 {
    (route_hash ^ (route_hash >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// When a SET applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    Always,
    IfAbsent,
    IfPresent,
}

/// A single-key operation, routed to the shard that owns the key. `Send`, so it can travel
/// to another core; keys and values still point into the request frame, and are copied only
/// when stored.
#[derive(Clone, Debug)]
pub enum Command {
    Get {
        key: Bytes,
    },
    Set {
        key: Bytes,
        value: Bytes,
        ttl_ms: u64,
        condition: Condition,
        /// Keep the key's current expiry (`ttl_ms` is then ignored).
        keep_ttl: bool,
        /// Answer with the value the key held before ([`Outcome::Old`]).
        return_old: bool,
    },
    /// Adds `by` to the key's value read as a decimal i64 (a missing key is 0); the result
    /// is stored as decimal text, with the key's expiry kept. A SET change like any other.
    Incr {
        key: Bytes,
        by: i64,
    },
    /// Appends to the key's value (a missing key is empty), keeping its expiry; the result
    /// may be at most `value_bytes_max` long.
    Append {
        key: Bytes,
        value: Bytes,
        value_bytes_max: usize,
    },
    /// Removes the key's expiry; applies only when it had one.
    Persist {
        key: Bytes,
    },
    Del {
        key: Bytes,
    },
    Exists {
        key: Bytes,
    },
    Expire {
        key: Bytes,
        ttl_ms: u64,
    },
    Ttl {
        key: Bytes,
    },
    /// A slot migration's copy of a key from its source node: value and absolute expiry as
    /// they were there (a MIGRATION_SET change).
    Import {
        key: Bytes,
        value: Bytes,
        expire_at_ms: u64,
    },
    /// A slot migration's removal of a key the source no longer holds (MIGRATION_DEL).
    Unimport {
        key: Bytes,
    },
}

impl Command {
    /// Whether it may change the key (reads only ever remove an expired one). Every
    /// command is named, without a catch-all, so a new one must be classified here.
    pub fn writes(&self) -> bool {
        match self {
            Command::Set { .. }
            | Command::Del { .. }
            | Command::Expire { .. }
            | Command::Incr { .. }
            | Command::Append { .. }
            | Command::Persist { .. }
            | Command::Import { .. }
            | Command::Unimport { .. } => true,
            Command::Get { .. } | Command::Exists { .. } | Command::Ttl { .. } => false,
        }
    }

    pub fn key(&self) -> &Bytes {
        match self {
            Command::Get { key }
            | Command::Set { key, .. }
            | Command::Del { key }
            | Command::Exists { key }
            | Command::Expire { key, .. }
            | Command::Incr { key, .. }
            | Command::Append { key, .. }
            | Command::Persist { key }
            | Command::Import { key, .. }
            | Command::Unimport { key }
            | Command::Ttl { key } => key,
        }
    }
}

/// The result of one [`Command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// GET: the value, or `None` for a missing or expired key.
    Value(Option<Bytes>),
    /// SET, DEL, EXISTS, EXPIRE: whether it applied / existed.
    Applied(bool),
    /// TTL: remaining ms, -1 for no expiry, -2 for no such key.
    Ttl(i64),
    /// INCR: the new value; APPEND: the new length.
    Int(i64),
    /// SET with `return_old`: whether it applied, and the value before (None: no key).
    Old { applied: bool, old: Option<Bytes> },
    /// INCR of a value that is not a decimal i64.
    NotInteger,
    /// INCR whose result would not fit an i64.
    Overflow,
    /// APPEND whose result would exceed `limits.value_bytes_max`.
    TooLarge,
    /// A write that would grow memory past the limit was refused.
    OutOfMemory,
    /// A write refused, before it was applied, because the core cannot write its log.
    StorageUnavailable,
    /// In a cluster: another node owns the key's slot (MOVED).
    Moved(u32),
    /// In a cluster: the key's slot changes owner right now; its writes are held.
    TryAgain(u32),
    /// In a cluster: the slot table is not loaded.
    ClusterDown,
    /// A migration's write to a slot this node is not importing.
    NotImporting(u32),
}

/// A shard's live entries at change `seq`: (item, expire_at_ms). The items are shared
/// with the shard (counted handles), not copied.
pub struct SnapshotEntries {
    pub seq: u64,
    pub entries: Vec<(Item, u64)>,
}

/// A table slot: the item's pointer, 8 bytes.
type Entry = Item;

fn rehash(e: &Item) -> u64 {
    table_hash(crate::keyspace::Keyspace::hash(e.key()))
}

/// A place in the deadline index: the deadline, then the item, ordered by its block's
/// address (two keys may share a deadline). 16 bytes, instead of a copy of the key.
#[derive(Clone, Debug)]
struct Due(u64, Item);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1.same(&other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1.address()).cmp(&(other.0, other.1.address()))
    }
}

/// A table bucket: its slot and its control byte.
const BUCKET_BYTES: u64 = std::mem::size_of::<Entry>() as u64 + 1;
/// Control bytes hashbrown adds after the last bucket (one SIMD group).
const TABLE_TRAILER_BYTES: u64 = 16;

/// What a table of `buckets` buckets costs in the heap (0 buckets: nothing allocated).
fn table_allocation(buckets: u64) -> u64 {
    match buckets {
        0 => 0,
        b => item::allocation_bytes((b * BUCKET_BYTES + TABLE_TRAILER_BYTES) as usize),
    }
}

/// Bytes the deadline index costs per entry with a TTL: its 16-byte element, with the
/// B-tree's nodes about two thirds full.
const DEADLINE_BYTES: u64 = 24;

/// What a new item of `key_len + value_len` bytes will cost in the heap, before it exists
/// (for the memory limit): its allocator size class, as [`Item::heap_bytes`] reports it.
pub fn item_estimate(key_len: usize, value_len: usize) -> u64 {
    item::estimate(key_len, value_len)
}

/// Random buckets one eviction looks at before it chooses (Redis' maxmemory-samples).
const EVICTION_SAMPLES: usize = 5;
/// Candidates a shard keeps between evictions, the least recently used it has sampled.
const EVICTION_POOL: usize = 16;
/// Buckets a sample scans from its random start for an occupied one: a sparse table (many
/// keys deleted; it does not shrink) costs a bounded scan, not a walk of the table.
const SAMPLE_SCAN_MAX: usize = 64;

/// An item an eviction sampled: where it sat and when it was touched, so that an item
/// moved (the table grew), replaced or touched since is recognised and passed over. No
/// reference is held: a candidate never keeps a deleted value alive.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    bucket: usize,
    address: usize,
    touched: u32,
}

/// The value of a change that has none (DEL, EXPIRE, EXPIRED, EVICTED).
const NO_VALUE: &[u8] = &[];

/// One shard's change sequence: gap-free from 1, counted even when nothing records.
struct ChangeLog {
    shard: u32,
    seq: u64,
}

impl ChangeLog {
    /// Records one change with the next sequence number.
    #[inline]
    fn record(
        &mut self,
        out: &mut impl ChangeSink,
        op: ChangeOp,
        key: &[u8],
        value: &[u8],
        expire_at_ms: u64,
        now_ms: u64,
    ) {
        self.seq += 1;
        let fields = Fields {
            shard: self.shard,
            seq: self.seq,
            op,
            expire_at_ms,
            key,
            value,
        };
        out.record(&fields, now_ms);
    }
}

/// The keys of one shard.
pub struct Shard {
    table: HashTable<Entry>,
    /// Every entry with an expiry, by deadline.
    deadlines: BTreeSet<Due>,
    /// Heap bytes of the items in the table, as the allocator counts them.
    items_bytes: u64,
    /// The table's allocation for the capacity it had when last asked (its size class
    /// comes from the allocator, so it is worked out only when the capacity changes).
    table_cost: std::cell::Cell<(usize, u64)>,
    log: ChangeLog,
    /// Expired keys removed because a request touched them (lazy expiry), since start.
    expired_lazy: u64,
    /// Keys evicted since start.
    evicted: u64,
    /// Eviction candidates, at most [`EVICTION_POOL`].
    pool: Vec<Candidate>,
    /// What the last write refused with `OutOfMemory` lacked, in bytes: what eviction must
    /// free for it to fit.
    shortfall_bytes: u64,
}

impl Shard {
    pub fn new(id: u32) -> Self {
        Shard {
            table: HashTable::new(),
            deadlines: BTreeSet::new(),
            items_bytes: 0,
            table_cost: std::cell::Cell::new((0, 0)),
            log: ChangeLog { shard: id, seq: 0 },
            expired_lazy: 0,
            evicted: 0,
            pool: Vec::new(),
            shortfall_bytes: 0,
        }
    }

    pub fn expired_lazy(&self) -> u64 {
        self.expired_lazy
    }

    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// What the last write refused with [`Outcome::OutOfMemory`] lacked, in bytes.
    pub fn shortfall_bytes(&self) -> u64 {
        self.shortfall_bytes
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// What the shard holds in memory: its items as the allocator counts them, its table
    /// at its current capacity (slots and control bytes; the table does not shrink), and
    /// its deadline index.
    pub fn memory_bytes(&self) -> u64 {
        self.items_bytes + self.table_bytes() + self.deadlines.len() as u64 * DEADLINE_BYTES
    }

    /// The table's allocation: hashbrown keeps `capacity` at 7/8 of its buckets (all but
    /// one below 8 buckets), each a slot and a control byte, plus one group of control
    /// bytes; the allocator rounds it up to its size class.
    pub(crate) fn table_bytes(&self) -> u64 {
        let capacity = self.table.capacity();
        match self.table_cost.get() {
            (c, bytes) if c == capacity => bytes,
            _ => {
                let bytes = table_allocation(self.buckets());
                self.table_cost.set((capacity, bytes));
                bytes
            }
        }
    }

    fn buckets(&self) -> u64 {
        self.table.num_buckets() as u64
    }

    /// What inserting one more entry costs beyond its item: nothing while the table has
    /// room, its growth when it is full (hashbrown doubles its buckets, from 4).
    fn insert_growth(&self) -> u64 {
        if self.table.len() < self.table.capacity() {
            return 0;
        }
        table_allocation((self.buckets() * 2).max(4)) - self.table_bytes()
    }

    /// Applies one command at time `now_ms`. `h` is [`table_hash`] of the key's routing hash.
    /// A write may grow this shard's memory by at most `room_bytes` (what is left of its
    /// core's share of `limits.memory_bytes_max`). Changes go to `out`.
    pub fn apply(&mut self, h: u64, cmd: &Command, now_ms: u64, room_bytes: u64, out: &mut impl ChangeSink) -> Outcome {
        match cmd {
            Command::Get { key } => Outcome::Value(self.live_entry(h, key, now_ms, out).map(|e| e.value_bytes())),
            Command::Exists { key } => Outcome::Applied(self.live_entry(h, key, now_ms, out).is_some()),
            Command::Ttl { key } => Outcome::Ttl(match self.live_entry(h, key, now_ms, out) {
                None => -2,
                Some(e) if e.expire_at_ms() == 0 => -1,
                Some(e) => (e.expire_at_ms() - now_ms).min(i64::MAX as u64) as i64,
            }),
            Command::Del { key } => Outcome::Applied(self.remove(h, key, ChangeOp::Del, now_ms, out)),
            Command::Unimport { key } => Outcome::Applied(self.remove(h, key, ChangeOp::MigrationDel, now_ms, out)),
            Command::Import {
                key,
                value,
                expire_at_ms,
            } => {
                let how = SetHow {
                    op: ChangeOp::MigrationSet,
                    ..SetHow::ALWAYS
                };
                self.set(h, key, value, Some(*expire_at_ms), how, now_ms, room_bytes, out)
            }
            Command::Expire { key, ttl_ms } => {
                let new = deadline(now_ms, *ttl_ms);
                let Some(e) = self.live_entry(h, key, now_ms, out) else {
                    return Outcome::Applied(false);
                };
                let old = e.expire_at_ms();
                e.set_expire_at_ms(new);
                let item = e.clone();
                move_deadline(&mut self.deadlines, &item, old, &item, new);
                self.log
                    .record(out, ChangeOp::Expire, item.key(), NO_VALUE, new, now_ms);
                Outcome::Applied(true)
            }
            Command::Set {
                key,
                value,
                ttl_ms,
                condition,
                keep_ttl,
                return_old,
            } => {
                let expire_at_ms = (!keep_ttl).then(|| deadline(now_ms, *ttl_ms));
                let how = SetHow {
                    condition: *condition,
                    return_old: *return_old,
                    op: ChangeOp::Set,
                };
                self.set(h, key, value, expire_at_ms, how, now_ms, room_bytes, out)
            }
            Command::Incr { key, by } => {
                let current = match self.live_entry(h, key, now_ms, out) {
                    None => 0,
                    Some(e) => match parse_i64(e.value()) {
                        Some(n) => n,
                        None => return Outcome::NotInteger,
                    },
                };
                let Some(n) = current.checked_add(*by) else {
                    return Outcome::Overflow;
                };
                let digits = n.to_string();
                match self.set(h, key, digits.as_bytes(), None, SetHow::ALWAYS, now_ms, room_bytes, out) {
                    Outcome::Applied(true) => Outcome::Int(n),
                    other => other,
                }
            }
            Command::Append {
                key,
                value,
                value_bytes_max,
            } => {
                let joined = match self.live_entry(h, key, now_ms, out) {
                    None => value.to_vec(),
                    Some(e) if e.value().len() + value.len() > *value_bytes_max => return Outcome::TooLarge,
                    Some(e) => [e.value(), value].concat(),
                };
                if joined.len() > *value_bytes_max {
                    return Outcome::TooLarge;
                }
                match self.set(h, key, &joined, None, SetHow::ALWAYS, now_ms, room_bytes, out) {
                    Outcome::Applied(true) => Outcome::Int(joined.len() as i64),
                    other => other,
                }
            }
            Command::Persist { key } => {
                let Some(e) = self.live_entry(h, key, now_ms, out) else {
                    return Outcome::Applied(false);
                };
                let old = e.expire_at_ms();
                if old == 0 {
                    return Outcome::Applied(false);
                }
                e.set_expire_at_ms(0);
                let item = e.clone();
                move_deadline(&mut self.deadlines, &item, old, &item, 0);
                self.log.record(out, ChangeOp::Expire, item.key(), NO_VALUE, 0, now_ms);
                Outcome::Applied(true)
            }
        }
    }

    /// Removes `key` with an `op` change (an expired key with EXPIRED); whether it was live.
    fn remove(&mut self, h: u64, key: &[u8], op: ChangeOp, now_ms: u64, out: &mut impl ChangeSink) -> bool {
        match self.table.find_entry(h, |e| e.key() == key) {
            Ok(occ) => {
                let (entry, _) = occ.remove();
                self.forget(&entry);
                let live = entry.live(now_ms);
                let op = if live { op } else { ChangeOp::Expired };
                self.log.record(out, op, entry.key(), NO_VALUE, 0, now_ms);
                live
            }
            Err(_) => false,
        }
    }

    /// The keys of slot `slot` (routing hash & `slot_mask`), copied: what a slot migration
    /// sends first. Walks the whole shard, a few ns per key.
    pub fn keys_in_slot(&self, slot_mask: u64, slot: u64) -> Vec<Bytes> {
        self.slot_keys(slot_mask, slot).collect()
    }

    /// Copies of the keys of slot `slot`, walking the whole shard.
    fn slot_keys(&self, slot_mask: u64, slot: u64) -> impl Iterator<Item = Bytes> + '_ {
        self.table
            .iter()
            .filter(move |e| crate::keyspace::Keyspace::hash(e.key()) & slot_mask == slot)
            .map(|e| Bytes::copy_from_slice(e.key()))
    }

    /// The live value and expiry of `key`, without touching it or recording anything.
    pub fn peek(&self, h: u64, key: &[u8], now_ms: u64) -> Option<(Bytes, u64)> {
        self.table
            .find(h, |e| e.key() == key)
            .filter(|e| e.live(now_ms))
            .map(|e| (e.value_bytes(), e.expire_at_ms()))
    }

    /// Removes up to `max_keys` keys of slot `slot` with MIGRATION_DEL changes; how many.
    pub fn drop_slot(
        &mut self,
        slot_mask: u64,
        slot: u64,
        max_keys: usize,
        now_ms: u64,
        out: &mut impl ChangeSink,
    ) -> usize {
        let keys: Vec<Bytes> = self.slot_keys(slot_mask, slot).take(max_keys).collect();
        for key in &keys {
            let h = table_hash(crate::keyspace::Keyspace::hash(key));
            self.remove(h, key, ChangeOp::MigrationDel, now_ms, out);
        }
        keys.len()
    }

    /// One probe for every case: overwrite in place (live or expired), or insert. The key
    /// and value are copied once, into the new item. `expire_at_ms` None keeps the live
    /// key's expiry (none for a new key).
    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        h: u64,
        key: &[u8],
        value: &[u8],
        expire_at_ms: Option<u64>,
        how: SetHow,
        now_ms: u64,
        room_bytes: u64,
        out: &mut impl ChangeSink,
    ) -> Outcome {
        let table_growth = self.insert_growth();
        let answer = |applied: bool, old: Option<Bytes>| match how.return_old {
            true => Outcome::Old { applied, old },
            false => Outcome::Applied(applied),
        };
        let mut old = None;
        match self.table.find_entry(h, |e| e.key() == key) {
            Ok(mut occ) => {
                let live = occ.get().live(now_ms);
                if live && how.return_old {
                    old = Some(occ.get().value_bytes());
                }
                let blocked = match how.condition {
                    Condition::Always => false,
                    Condition::IfAbsent => live,
                    Condition::IfPresent => !live,
                };
                if blocked {
                    if !live {
                        let (entry, _) = occ.remove();
                        self.forget(&entry);
                        self.log
                            .record(out, ChangeOp::Expired, entry.key(), NO_VALUE, 0, now_ms);
                    }
                    return answer(false, old);
                }
                let kept = if live { occ.get().expire_at_ms() } else { 0 };
                let expire_at_ms = expire_at_ms.unwrap_or(kept);
                let e = occ.get_mut();
                let old_bytes = e.heap_bytes();
                let deadline_growth = u64::from(e.expire_at_ms() == 0 && expire_at_ms != 0) * DEADLINE_BYTES;
                let growth = item_estimate(key.len(), value.len()) + deadline_growth;
                if growth.saturating_sub(old_bytes) > room_bytes {
                    self.shortfall_bytes = growth - old_bytes - room_bytes;
                    return Outcome::OutOfMemory;
                }
                let old_item = std::mem::replace(e, Item::new(key, value, expire_at_ms, tick(now_ms)));
                let old_deadline = old_item.expire_at_ms();
                let item = e.clone();
                self.items_bytes = self.items_bytes - old_bytes + item.heap_bytes();
                move_deadline(&mut self.deadlines, &old_item, old_deadline, &item, expire_at_ms);
                self.log
                    .record(out, how.op, item.key(), item.value(), expire_at_ms, now_ms);
            }
            Err(absent) => {
                if how.condition == Condition::IfPresent {
                    return answer(false, None);
                }
                let expire_at_ms = expire_at_ms.unwrap_or(0);
                let deadline_bytes = u64::from(expire_at_ms != 0) * DEADLINE_BYTES;
                let growth = item_estimate(key.len(), value.len()) + table_growth + deadline_bytes;
                if growth > room_bytes {
                    self.shortfall_bytes = growth - room_bytes;
                    return Outcome::OutOfMemory;
                }
                let item = Item::new(key, value, expire_at_ms, tick(now_ms));
                if expire_at_ms != 0 {
                    self.deadlines.insert(Due(expire_at_ms, item.clone()));
                }
                self.log
                    .record(out, how.op, item.key(), item.value(), expire_at_ms, now_ms);
                self.items_bytes += item.heap_bytes();
                absent.into_table().insert_unique(h, item, rehash);
            }
        }
        answer(true, old)
    }

    /// Loads the table group a key with table hash `h` probes first, and asks the CPU to
    /// fetch every item whose tag matches, without waiting for them: a later operation on
    /// the key then finds both in cache. Reads nothing the result depends on.
    pub fn prefetch(&self, h: u64) {
        self.table.find(h, |e| {
            item::prefetch(e);
            false
        });
    }

    /// The entry for `key` if it exists and has not expired; an expired one is removed now.
    fn live_entry(&mut self, h: u64, key: &[u8], now_ms: u64, out: &mut impl ChangeSink) -> Option<&mut Entry> {
        let occ = self.table.find_entry(h, |e| e.key() == key).ok()?;
        if occ.get().live(now_ms) {
            let e = occ.into_mut();
            e.touch(tick(now_ms));
            return Some(e);
        }
        let (entry, _) = occ.remove();
        self.expired_lazy += 1;
        // Fields, not `self.forget`: the returned entry above keeps `self.table` borrowed.
        self.items_bytes -= entry.heap_bytes();
        if entry.expire_at_ms() != 0 {
            self.deadlines.remove(&Due(entry.expire_at_ms(), entry.clone()));
        }
        self.log
            .record(out, ChangeOp::Expired, entry.key(), NO_VALUE, 0, now_ms);
        None
    }

    /// Accounts for an entry that left the table.
    fn forget(&mut self, entry: &Entry) {
        self.items_bytes -= entry.heap_bytes();
        if entry.expire_at_ms() != 0 {
            self.deadlines.remove(&Due(entry.expire_at_ms(), entry.clone()));
        }
    }

    /// Removes the least recently used of the entries sampled now and kept from earlier
    /// samples, recording an EVICTED change; returns the bytes it freed, or `None` when the
    /// shard is empty.
    pub fn evict(&mut self, now_ms: u64, rng: &mut fastrand::Rng, out: &mut impl ChangeSink) -> Option<u64> {
        if self.table.is_empty() {
            self.pool.clear();
            return None;
        }
        let now = tick(now_ms);
        loop {
            self.sample(now, rng);
            // Sampling a non-empty table finds at least one entry, unless the table is so
            // sparse that no scan met one: then take the first entry there is.
            if self.pool.is_empty() {
                let bucket = self.table.iter_buckets().next()?;
                let e = self.table.get_bucket(bucket)?;
                self.pool.push(Candidate {
                    bucket,
                    address: e.address(),
                    touched: e.touched(),
                });
            }
            let oldest = (0..self.pool.len()).max_by_key(|&i| now.wrapping_sub(self.pool[i].touched))?;
            let c = self.pool.swap_remove(oldest);
            // Still the same item, untouched since it was sampled?
            let current = self
                .table
                .get_bucket(c.bucket)
                .is_some_and(|e| e.address() == c.address && e.touched() == c.touched);
            if !current {
                continue;
            }
            let before = self.memory_bytes();
            let Ok(occ) = self.table.get_bucket_entry(c.bucket) else {
                continue;
            };
            let (entry, _) = occ.remove();
            self.forget(&entry);
            // A key past its deadline that no sweep reached yet expired; it was not evicted.
            let op = if entry.live(now_ms) {
                self.evicted += 1;
                ChangeOp::Evicted
            } else {
                ChangeOp::Expired
            };
            self.log.record(out, op, entry.key(), NO_VALUE, 0, now_ms);
            return Some(before - self.memory_bytes());
        }
    }

    /// Adds [`EVICTION_SAMPLES`] random entries to the pool, keeping it to the
    /// [`EVICTION_POOL`] least recently used.
    ///
    /// The samples are found first (table reads only), then their ticks are read together:
    /// each read is a cache miss on an item somewhere in the heap, and with no branch
    /// between them that depends on one, the CPU waits for all at once rather than in turn.
    fn sample(&mut self, now: u32, rng: &mut fastrand::Rng) {
        let buckets = self.table.num_buckets();
        // hashbrown's bucket counts are powers of two.
        debug_assert!(buckets.is_power_of_two());
        let mut found: [Option<(usize, &Item)>; EVICTION_SAMPLES] = [None; EVICTION_SAMPLES];
        for slot in &mut found {
            let start = rng.usize(..buckets);
            *slot = (0..SAMPLE_SCAN_MAX.min(buckets))
                .map(|i| (start + i) & (buckets - 1))
                .find_map(|b| self.table.get_bucket(b).map(|e| (b, e)));
        }
        let sampled = found.map(|hit| {
            hit.map(|(bucket, e)| Candidate {
                bucket,
                address: e.address(),
                touched: e.touched(),
            })
        });
        let idle = |c: &Candidate| now.wrapping_sub(c.touched);
        for c in sampled.into_iter().flatten() {
            if self.pool.iter().any(|p| p.address == c.address) {
                continue;
            }
            if self.pool.len() < EVICTION_POOL {
                self.pool.push(c);
                continue;
            }
            let youngest = (0..self.pool.len())
                .min_by_key(|&i| idle(&self.pool[i]))
                .expect("the pool is full");
            if idle(&c) > idle(&self.pool[youngest]) {
                self.pool[youngest] = c;
            }
        }
    }

    /// Re-applies a logged change during recovery: no change is recorded, no limit applies
    /// (what was acknowledged comes back), and the shard's seq continues from the record's.
    /// A key whose deadline passed while the node was down is restored all the same: the
    /// sweep (or the first read) then removes it with an EXPIRED change, so the log and the
    /// change stream say it went. Restored items count as touched at `now_ms`.
    pub fn restore(&mut self, h: u64, c: &Change, now_ms: u64) {
        let touched = tick(now_ms);
        self.log.seq = self.log.seq.max(c.seq);
        match c.op {
            ChangeOp::Set | ChangeOp::MigrationSet => match self.table.find_entry(h, |e| e.key() == &c.key[..]) {
                Ok(mut occ) => {
                    let e = occ.get_mut();
                    let old_item = std::mem::replace(e, Item::new(&c.key, &c.value, c.expire_at_ms, touched));
                    let old_deadline = old_item.expire_at_ms();
                    let item = e.clone();
                    self.items_bytes = self.items_bytes - old_item.heap_bytes() + item.heap_bytes();
                    move_deadline(&mut self.deadlines, &old_item, old_deadline, &item, c.expire_at_ms);
                }
                Err(absent) => {
                    let item = Item::new(&c.key, &c.value, c.expire_at_ms, touched);
                    if c.expire_at_ms != 0 {
                        self.deadlines.insert(Due(c.expire_at_ms, item.clone()));
                    }
                    self.items_bytes += item.heap_bytes();
                    absent.into_table().insert_unique(h, item, rehash);
                }
            },
            ChangeOp::Expire => {
                if let Some(e) = self.table.find_mut(h, |e| e.key() == &c.key[..]) {
                    let old = e.expire_at_ms();
                    e.set_expire_at_ms(c.expire_at_ms);
                    let item = e.clone();
                    move_deadline(&mut self.deadlines, &item, old, &item, c.expire_at_ms);
                }
            }
            ChangeOp::Del | ChangeOp::Expired | ChangeOp::Evicted | ChangeOp::MigrationDel => {
                if let Ok(occ) = self.table.find_entry(h, |e| e.key() == &c.key[..]) {
                    let (entry, _) = occ.remove();
                    self.forget(&entry);
                }
            }
        }
    }

    /// Sequence number of the shard's last change.
    pub fn seq(&self) -> u64 {
        self.log.seq
    }

    /// Continues the sequence after `seq` (recovery from a snapshot, which may hold no keys).
    pub fn restore_seq(&mut self, seq: u64) {
        self.log.seq = self.log.seq.max(seq);
    }

    /// A consistent copy of the entries as of change `seq()`: counted handles to the items
    /// (nothing is copied), so taking it holds the core for microseconds per thousand keys
    /// and the snapshot is written from it in the background. Entries past their deadline
    /// but not yet removed are kept: their EXPIRED change is still to come, and a snapshot
    /// without them would let a crash erase the key without one.
    pub fn entries(&self) -> SnapshotEntries {
        SnapshotEntries {
            seq: self.log.seq,
            entries: self.table.iter().map(|e| (e.clone(), e.expire_at_ms())).collect(),
        }
    }

    /// Removes up to `max_keys` keys whose deadline has passed; returns how many were removed.
    /// Bounded so one core's sweep never stalls its requests.
    pub fn sweep(&mut self, now_ms: u64, max_keys: usize, out: &mut impl ChangeSink) -> usize {
        let mut removed = 0;
        while removed < max_keys {
            if self.deadlines.first().is_none_or(|d| d.0 > now_ms) {
                break;
            }
            let Some(Due(_, item)) = self.deadlines.pop_first() else {
                break;
            };
            let h = table_hash(crate::keyspace::Keyspace::hash(item.key()));
            if let Ok(occ) = self.table.find_entry(h, |e| e.same(&item)) {
                let (entry, _) = occ.remove();
                self.items_bytes -= entry.heap_bytes();
                self.log
                    .record(out, ChangeOp::Expired, entry.key(), NO_VALUE, 0, now_ms);
            }
            removed += 1;
        }
        removed
    }

    /// The earliest deadline in this shard, if any key has one.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|d| d.0)
    }
}

/// Moves an entry's place in the deadline index from (`old`, `old_deadline`) to (`new`,
/// `new_deadline`); a deadline of 0 means none. `old` and `new` are the same item unless a
/// write replaced it.
fn move_deadline(deadlines: &mut BTreeSet<Due>, old: &Item, old_deadline: u64, new: &Item, new_deadline: u64) {
    if old_deadline == new_deadline && old.same(new) {
        return;
    }
    if old_deadline != 0 {
        deadlines.remove(&Due(old_deadline, old.clone()));
    }
    if new_deadline != 0 {
        deadlines.insert(Due(new_deadline, new.clone()));
    }
}

/// When a SET applies, and whether it answers with the value before.
#[derive(Clone, Copy)]
struct SetHow {
    condition: Condition,
    return_old: bool,
    /// The change it records: SET, or MIGRATION_SET for a slot migration's copy.
    op: ChangeOp,
}

impl SetHow {
    const ALWAYS: SetHow = SetHow {
        condition: Condition::Always,
        return_old: false,
        op: ChangeOp::Set,
    };
}

/// A value as INCR reads it, exactly as Redis does: optional '-', then digits without a
/// leading zero (or "0" alone), fitting an i64. No sign '+', no spaces.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let canonical = match digits {
        [b'0'] => digits.len() == b.len(),
        [first, ..] => (b'1'..=b'9').contains(first) && digits.len() <= 19,
        [] => false,
    };
    if !canonical || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Absolute deadline for a relative TTL; 0 (no expiry) stays 0.
fn deadline(now_ms: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now_ms.saturating_add(ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }
    fn set(k: &str, v: &str, ttl_ms: u64, condition: Condition) -> Command {
        Command::Set {
            key: b(k),
            value: b(v),
            ttl_ms,
            condition,
            keep_ttl: false,
            return_old: false,
        }
    }
    fn get(k: &str) -> Command {
        Command::Get { key: b(k) }
    }
    fn apply(s: &mut Shard, cmd: Command, now_ms: u64, room: u64) -> Outcome {
        let h = table_hash(crate::keyspace::Keyspace::hash(cmd.key()));
        s.apply(h, &cmd, now_ms, room, &mut ())
    }

    // Goal: memory accounting follows the items as the allocator counts them, the table
    // and the deadline index, and the items' share returns to zero when every key is gone,
    // whichever way it went (the table keeps its capacity, and is still counted).
    #[test]
    fn memory_accounting_balances() {
        let mut s = Shard::new(0);
        apply(&mut s, set("a", "1", 0, Condition::Always), 0, u64::MAX);
        apply(&mut s, set("a", "12345", 0, Condition::Always), 0, u64::MAX);
        apply(&mut s, set("b", "x", 5, Condition::Always), 0, u64::MAX);
        let items = Item::new(b"a", b"12345", 0, 0).heap_bytes() + Item::new(b"b", b"x", 5, 0).heap_bytes();
        assert_eq!(s.items_bytes, items);
        assert_eq!(s.memory_bytes(), items + s.table_bytes() + DEADLINE_BYTES);
        assert!(s.table_bytes() > 0);
        assert_eq!(
            apply(&mut s, Command::Del { key: b("a") }, 0, u64::MAX),
            Outcome::Applied(true)
        );
        assert_eq!(s.sweep(10, 100, &mut ()), 1);
        assert_eq!((s.items_bytes, s.len(), s.deadlines.len()), (0, 0, 0));
        assert_eq!(s.memory_bytes(), s.table_bytes());
    }

    // Goal: the table's growth is known before an insert makes it, so a limit holds even
    // when the insert doubles the table.
    #[test]
    fn table_growth_is_foreseen() {
        let mut s = Shard::new(0);
        for i in 0..100 {
            let before = s.table_bytes();
            let growth = s.insert_growth();
            apply(&mut s, set(&format!("k{i}"), "v", 0, Condition::Always), 0, u64::MAX);
            assert_eq!(s.table_bytes() - before, growth, "insert {i}");
        }
    }

    // Goal: the room limit refuses growth past the limit but allows shrinking writes and deletes.
    #[test]
    fn memory_room_refuses_growth_only() {
        let mut s = Shard::new(0);
        // Room for exactly one entry of a 1-byte key and a 10-byte value.
        let room = item_estimate(1, 10) + s.insert_growth();
        assert_eq!(
            apply(&mut s, set("a", "0123456789", 0, Condition::Always), 0, room),
            Outcome::Applied(true)
        );
        assert_eq!(
            apply(&mut s, set("b", "1", 0, Condition::Always), 0, 0),
            Outcome::OutOfMemory
        );
        assert_eq!(
            apply(&mut s, set("a", &"x".repeat(40), 0, Condition::Always), 0, 0),
            Outcome::OutOfMemory
        );
        assert_eq!(
            apply(&mut s, set("a", "01", 0, Condition::Always), 0, 0),
            Outcome::Applied(true)
        );
        assert_eq!(apply(&mut s, get("a"), 0, u64::MAX), Outcome::Value(Some(b("01"))));
    }

    // Goal: re-setting or persisting a key keeps exactly one deadline entry for it.
    #[test]
    fn deadlines_follow_the_entry() {
        let mut s = Shard::new(0);
        apply(&mut s, set("k", "v", 100, Condition::Always), 0, u64::MAX);
        apply(
            &mut s,
            Command::Expire {
                key: b("k"),
                ttl_ms: 200,
            },
            0,
            u64::MAX,
        );
        assert_eq!(s.next_deadline_ms(), Some(200));
        apply(&mut s, Command::Expire { key: b("k"), ttl_ms: 0 }, 0, u64::MAX);
        assert_eq!(s.next_deadline_ms(), None);
        assert_eq!(
            apply(&mut s, Command::Ttl { key: b("k") }, 300, u64::MAX),
            Outcome::Ttl(-1)
        );
        apply(&mut s, set("k", "v", 50, Condition::Always), 0, u64::MAX);
        apply(&mut s, set("k", "v", 0, Condition::Always), 0, u64::MAX);
        assert_eq!(s.deadlines.len(), 0);
    }

    // Goal: every applied write records one change with a gap-free per-shard seq, in apply
    // order; refused writes and reads of live keys record nothing.
    #[test]
    fn changes_are_recorded_in_order() {
        let mut s = Shard::new(7);
        let mut out: Vec<Change> = Vec::new();
        let mut apply = |cmd: Command, now_ms: u64| {
            let h = table_hash(crate::keyspace::Keyspace::hash(cmd.key()));
            s.apply(h, &cmd, now_ms, u64::MAX, &mut out)
        };
        apply(set("a", "1", 0, Condition::Always), 10);
        apply(set("a", "x", 0, Condition::IfAbsent), 11);
        apply(get("a"), 12);
        apply(Command::Expire { key: b("a"), ttl_ms: 5 }, 13);
        apply(set("b", "2", 0, Condition::Always), 14);
        apply(Command::Del { key: b("b") }, 15);
        apply(get("a"), 100); // a expired at 18: removed on access

        let got: Vec<(u64, ChangeOp, Bytes, u64)> = out
            .drain(..)
            .map(|c| {
                assert_eq!(c.shard, 7);
                (c.seq, c.op, c.key, c.expire_at_ms)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, ChangeOp::Set, b("a"), 0),
                (2, ChangeOp::Expire, b("a"), 18),
                (3, ChangeOp::Set, b("b"), 0),
                (4, ChangeOp::Del, b("b"), 0),
                (5, ChangeOp::Expired, b("a"), 0),
            ]
        );
    }

    // Goal: eviction removes the least recently used: of 2,000 keys written in order, the
    // 200 read since survive 1,000 evictions, and the evicted are far more often the oldest
    // written than chance would make them. Each eviction is one EVICTED change, the accounting follows, and an evicted
    // key comes back from the log as gone.
    #[test]
    fn eviction_takes_the_least_recently_used() {
        let mut s = Shard::new(0);
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..2_000u64 {
            apply(
                &mut s,
                set(&format!("k{i}"), "v", 0, Condition::Always),
                i * 20,
                u64::MAX,
            );
        }
        let later = 2_000 * 20;
        for i in (0..2_000).step_by(10) {
            assert!(matches!(
                apply(&mut s, get(&format!("k{i}")), later, u64::MAX),
                Outcome::Value(Some(_))
            ));
        }
        let mut out: Vec<Change> = Vec::new();
        for _ in 0..1_000 {
            let before = s.memory_bytes();
            let freed = s.evict(later, &mut rng, &mut out).expect("keys are left");
            assert_eq!(before - s.memory_bytes(), freed);
        }
        assert_eq!((s.len(), s.evicted(), out.len()), (1_000, 1_000, 1_000));
        let read_survived = (0..2_000)
            .step_by(10)
            .filter(|i| s.table.iter().any(|e| e.key() == format!("k{i}").as_bytes()))
            .count();
        assert_eq!(read_survived, 200, "keys read recently were all kept");
        let evicted_index = |c: &Change| -> u64 { std::str::from_utf8(&c.key[1..]).unwrap().parse().unwrap() };
        let old_half = out.iter().filter(|c| evicted_index(c) < 1_100).count();
        // Exact LRU would take all 1,000 from the 1,100 oldest unread, random choice about
        // 611 (1,100 of the 1,800 unread); five samples and the pool take about 850.
        assert!(old_half > 800, "{old_half} of 1,000 evicted from the 1,100 oldest");
        assert!(out.iter().all(|c| c.op == ChangeOp::Evicted && c.value.is_empty()));
        let seqs: Vec<u64> = out.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (2_001..=3_000).collect::<Vec<_>>(), "gap-free after the writes");

        let mut restored = Shard::new(0);
        let c = &out[0];
        let h = table_hash(crate::keyspace::Keyspace::hash(&c.key));
        restored.restore(
            h,
            &Change {
                op: ChangeOp::Set,
                ..c.clone()
            },
            0,
        );
        restored.restore(h, c, 0);
        assert!(restored.is_empty(), "EVICTED replays as a removal");
    }

    // Goal: a key past its deadline that eviction picks is reported EXPIRED, not EVICTED;
    // an empty shard has nothing to evict.
    #[test]
    fn eviction_of_an_expired_key_is_expiry() {
        let mut s = Shard::new(0);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut out: Vec<Change> = Vec::new();
        assert_eq!(s.evict(0, &mut rng, &mut out), None);
        apply(&mut s, set("k", "v", 5, Condition::Always), 0, u64::MAX);
        assert!(s.evict(10, &mut rng, &mut out).is_some());
        assert_eq!((out[0].op, s.evicted(), s.deadlines.len()), (ChangeOp::Expired, 0, 0));
    }

    // Goal: INCR, APPEND, PERSIST and SET's KEEPTTL/GET behave as Redis' do, atomically in
    // the shard: INCR and APPEND keep the key's expiry and record an ordinary SET of the
    // result; a value that is not a canonical integer or an overflow changes nothing.
    #[test]
    fn read_modify_writes() {
        let mut s = Shard::new(0);
        let mut out: Vec<Change> = Vec::new();
        let mut run = |s: &mut Shard, cmd: Command, now_ms: u64| {
            let h = table_hash(crate::keyspace::Keyspace::hash(cmd.key()));
            s.apply(h, &cmd, now_ms, u64::MAX, &mut out)
        };
        let incr = |k: &str, by: i64| Command::Incr { key: b(k), by };
        assert_eq!(run(&mut s, incr("n", 5), 0), Outcome::Int(5));
        assert_eq!(run(&mut s, incr("n", -7), 0), Outcome::Int(-2));
        run(
            &mut s,
            Command::Expire {
                key: b("n"),
                ttl_ms: 100,
            },
            0,
        );
        assert_eq!(run(&mut s, incr("n", 1), 10), Outcome::Int(-1));
        assert_eq!(
            run(&mut s, Command::Ttl { key: b("n") }, 10),
            Outcome::Ttl(90),
            "INCR keeps the TTL"
        );
        run(&mut s, set("big", &i64::MAX.to_string(), 0, Condition::Always), 10);
        assert_eq!(run(&mut s, incr("big", 1), 10), Outcome::Overflow);
        for bad in ["x", "+1", "01", "-0", " 1", "1 ", "", "99999999999999999999"] {
            run(&mut s, set("bad", bad, 0, Condition::Always), 10);
            assert_eq!(run(&mut s, incr("bad", 1), 10), Outcome::NotInteger, "{bad:?}");
        }
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));

        let append = |k: &str, v: &str| Command::Append {
            key: b(k),
            value: b(v),
            value_bytes_max: 8,
        };
        assert_eq!(run(&mut s, append("a", "abc"), 10), Outcome::Int(3));
        assert_eq!(run(&mut s, append("a", "de"), 10), Outcome::Int(5));
        assert_eq!(run(&mut s, append("a", "fghi"), 10), Outcome::TooLarge);
        assert_eq!(run(&mut s, get("a"), 10), Outcome::Value(Some(b("abcde"))));

        assert_eq!(
            run(&mut s, Command::Persist { key: b("a") }, 10),
            Outcome::Applied(false)
        );
        assert_eq!(
            run(&mut s, Command::Persist { key: b("n") }, 10),
            Outcome::Applied(true)
        );
        assert_eq!(run(&mut s, Command::Ttl { key: b("n") }, 10), Outcome::Ttl(-1));

        let set_with = |k: &str, v: &str, ttl_ms: u64, keep_ttl: bool, condition: Condition| Command::Set {
            key: b(k),
            value: b(v),
            ttl_ms,
            condition,
            keep_ttl,
            return_old: true,
        };
        assert_eq!(
            run(&mut s, set_with("t", "1", 50, false, Condition::Always), 10),
            Outcome::Old {
                applied: true,
                old: None
            }
        );
        assert_eq!(
            run(&mut s, set_with("t", "2", 0, true, Condition::Always), 20),
            Outcome::Old {
                applied: true,
                old: Some(b("1"))
            }
        );
        assert_eq!(
            run(&mut s, Command::Ttl { key: b("t") }, 20),
            Outcome::Ttl(40),
            "KEEPTTL"
        );
        assert_eq!(
            run(&mut s, set_with("t", "3", 0, false, Condition::IfAbsent), 20),
            Outcome::Old {
                applied: false,
                old: Some(b("2"))
            }
        );

        // Every change is an ordinary op: INCR and APPEND are SETs of the result.
        let ops: Vec<(ChangeOp, Bytes)> = out.iter().map(|c| (c.op, c.value.clone())).collect();
        assert_eq!(&ops[..2], &[(ChangeOp::Set, b("5")), (ChangeOp::Set, b("-2"))]);
        assert!(ops.contains(&(ChangeOp::Set, b("abcde"))));
        assert!(!ops.iter().any(|(_, v)| v == &b("abcdefghi")));
    }

    // Goal: a prefetch is only a hint: on an empty table, for absent and present keys, it
    // changes nothing a later operation sees.
    #[test]
    fn prefetch_changes_nothing() {
        let mut s = Shard::new(0);
        let h = |k: &str| table_hash(crate::keyspace::Keyspace::hash(k.as_bytes()));
        s.prefetch(h("k"));
        apply(&mut s, set("k", "v", 0, Condition::Always), 0, u64::MAX);
        let before = (s.len(), s.memory_bytes(), s.seq());
        s.prefetch(h("k"));
        s.prefetch(h("absent"));
        assert_eq!((s.len(), s.memory_bytes(), s.seq()), before);
        assert_eq!(apply(&mut s, get("k"), 0, u64::MAX), Outcome::Value(Some(b("v"))));
    }
}
