//! One shard's data: the key map, expiry, and memory accounting.
//!
//! A shard is owned by exactly one core and touched only from that core's thread, so it has
//! no locks. Commands arrive already routed (see `keyspace`); a shard never checks where a key
//! belongs, the caller asserts it.
//!
//! Expiry is exact and cheap: an entry with a TTL is also filed in a `BTreeSet` ordered by
//! deadline, so the active sweep pops only keys that are due, with a bound on work per call,
//! and a read of an expired key removes it on the spot (lazy expiry).

mod store;

pub use store::CoreStore;

use std::collections::BTreeSet;

use bytes::Bytes;
use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes charged per entry on top of key and value: the table slot, the `Bytes` handles and
/// allocator rounding, measured roughly. Keeps `memory_bytes_max` honest for small values.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Seed for the in-shard table hash. It must differ from the routing hash (seed 0): every key
/// of a shard shares the routing hash's low bits, which would pile them into the same buckets.
const TABLE_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

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
}

impl Command {
    pub fn key(&self) -> &Bytes {
        match self {
            Command::Get { key }
            | Command::Set { key, .. }
            | Command::Del { key }
            | Command::Exists { key }
            | Command::Expire { key, .. }
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
    /// A write that would grow memory past the limit was refused.
    OutOfMemory,
}

struct Entry {
    key: Bytes,
    value: Bytes,
    /// Absolute deadline in Unix ms; 0 = no expiry. Absolute so it survives restarts.
    expire_at_ms: u64,
}

impl Entry {
    fn charge(&self) -> u64 {
        charge(self.key.len(), self.value.len())
    }

    fn live(&self, now_ms: u64) -> bool {
        self.expire_at_ms == 0 || self.expire_at_ms > now_ms
    }
}

fn charge(key_len: usize, value_len: usize) -> u64 {
    (key_len + value_len) as u64 + ENTRY_OVERHEAD_BYTES
}

fn hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, TABLE_SEED)
}

/// The keys of one shard.
#[derive(Default)]
pub struct Shard {
    table: HashTable<Entry>,
    /// (deadline, key) for every entry with an expiry.
    deadlines: BTreeSet<(u64, Bytes)>,
    memory_bytes: u64,
}

impl Shard {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Applies one command at time `now_ms`. A write may grow this shard's memory by at most
    /// `room_bytes` (what is left of its core's share of `limits.memory_bytes_max`).
    pub fn apply(&mut self, cmd: Command, now_ms: u64, room_bytes: u64) -> Outcome {
        match cmd {
            Command::Get { key } => Outcome::Value(self.live_entry(&key, now_ms).map(|e| e.value.clone())),
            Command::Exists { key } => Outcome::Applied(self.live_entry(&key, now_ms).is_some()),
            Command::Ttl { key } => Outcome::Ttl(match self.live_entry(&key, now_ms) {
                None => -2,
                Some(e) if e.expire_at_ms == 0 => -1,
                Some(e) => (e.expire_at_ms - now_ms).min(i64::MAX as u64) as i64,
            }),
            Command::Del { key } => Outcome::Applied(self.remove(&key, now_ms)),
            Command::Expire { key, ttl_ms } => {
                let deadline = deadline(now_ms, ttl_ms);
                let Some(e) = self.live_entry(&key, now_ms) else {
                    return Outcome::Applied(false);
                };
                let (k, old) = (e.key.clone(), e.expire_at_ms);
                self.set_deadline(&k, old, deadline);
                Outcome::Applied(true)
            }
            Command::Set {
                key,
                value,
                ttl_ms,
                condition,
            } => self.set(key, value, deadline(now_ms, ttl_ms), condition, now_ms, room_bytes),
        }
    }

    fn set(
        &mut self,
        key: Bytes,
        value: Bytes,
        expire_at_ms: u64,
        condition: Condition,
        now_ms: u64,
        room_bytes: u64,
    ) -> Outcome {
        let exists = self.live_entry(&key, now_ms).is_some();
        match (condition, exists) {
            (Condition::IfAbsent, true) | (Condition::IfPresent, false) => return Outcome::Applied(false),
            _ => {}
        }
        let h = hash(&key);
        if let Some(e) = self.table.find_mut(h, |e| e.key == key) {
            let (old_charge, new_charge) = (e.charge(), charge(e.key.len(), value.len()));
            if new_charge.saturating_sub(old_charge) > room_bytes {
                return Outcome::OutOfMemory;
            }
            // Copy: the request frame's buffer must not be pinned by a stored value.
            e.value = Bytes::copy_from_slice(&value);
            let (k, old) = (e.key.clone(), e.expire_at_ms);
            self.memory_bytes = self.memory_bytes - old_charge + new_charge;
            self.set_deadline(&k, old, expire_at_ms);
        } else {
            let new_charge = charge(key.len(), value.len());
            if new_charge > room_bytes {
                return Outcome::OutOfMemory;
            }
            let key = Bytes::copy_from_slice(&key);
            let entry = Entry {
                key: key.clone(),
                value: Bytes::copy_from_slice(&value),
                expire_at_ms: 0,
            };
            self.table.insert_unique(h, entry, |e| hash(&e.key));
            self.memory_bytes += new_charge;
            self.set_deadline(&key, 0, expire_at_ms);
        }
        Outcome::Applied(true)
    }

    /// The entry for `key` if it exists and has not expired; an expired one is removed now.
    fn live_entry(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        let h = hash(key);
        let live = self.table.find(h, |e| e.key == key)?.live(now_ms);
        if !live {
            self.remove_entry(key, h);
            return None;
        }
        self.table.find_mut(h, |e| e.key == key)
    }

    /// Removes `key`; true when it existed and was live.
    fn remove(&mut self, key: &[u8], now_ms: u64) -> bool {
        match self.remove_entry(key, hash(key)) {
            Some(e) => e.live(now_ms),
            None => false,
        }
    }

    fn remove_entry(&mut self, key: &[u8], h: u64) -> Option<Entry> {
        let (entry, _) = self.table.find_entry(h, |e| e.key == key).ok()?.remove();
        self.memory_bytes -= entry.charge();
        if entry.expire_at_ms != 0 {
            self.deadlines.remove(&(entry.expire_at_ms, entry.key.clone()));
        }
        Some(entry)
    }

    fn set_deadline(&mut self, key: &Bytes, old: u64, new: u64) {
        if old == new {
            return;
        }
        if old != 0 {
            self.deadlines.remove(&(old, key.clone()));
        }
        if new != 0 {
            self.deadlines.insert((new, key.clone()));
        }
        if let Some(e) = self.table.find_mut(hash(key), |e| e.key == *key) {
            e.expire_at_ms = new;
        }
    }

    /// Removes up to `max_keys` keys whose deadline has passed; returns how many were removed.
    /// Bounded so one core's sweep never stalls its requests.
    pub fn sweep(&mut self, now_ms: u64, max_keys: usize) -> usize {
        let mut removed = 0;
        while removed < max_keys {
            let Some((deadline, key)) = self.deadlines.first().cloned() else {
                break;
            };
            if deadline > now_ms {
                break;
            }
            self.remove_entry(&key, hash(&key));
            removed += 1;
        }
        removed
    }

    /// The earliest deadline in this shard, if any key has one.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }
}

/// Absolute deadline for a relative TTL; 0 (no expiry) stays 0.
fn deadline(now_ms: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now_ms.saturating_add(ttl_ms)
    }
}

/// Wall-clock time in Unix milliseconds: deadlines are absolute so they survive restarts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        }
    }
    fn get(k: &str) -> Command {
        Command::Get { key: b(k) }
    }

    // Goal: memory accounting returns to zero when every key is gone, whichever way it went.
    #[test]
    fn memory_accounting_balances() {
        let mut s = Shard::default();
        s.apply(set("a", "1", 0, Condition::Always), 0, u64::MAX);
        s.apply(set("a", "12345", 0, Condition::Always), 0, u64::MAX);
        s.apply(set("b", "x", 5, Condition::Always), 0, u64::MAX);
        assert_eq!(s.memory_bytes(), charge(1, 5) + charge(1, 1));
        assert_eq!(
            s.apply(Command::Del { key: b("a") }, 0, u64::MAX),
            Outcome::Applied(true)
        );
        assert_eq!(s.sweep(10, 100), 1);
        assert_eq!((s.memory_bytes(), s.len(), s.deadlines.len()), (0, 0, 0));
    }

    // Goal: the room limit refuses growth past the limit but allows shrinking writes and deletes.
    #[test]
    fn memory_room_refuses_growth_only() {
        let mut s = Shard::default();
        // Room for exactly one entry of a 1-byte key and a 10-byte value.
        let room = charge(1, 10);
        assert_eq!(
            s.apply(set("a", "0123456789", 0, Condition::Always), 0, room),
            Outcome::Applied(true)
        );
        assert_eq!(s.apply(set("b", "1", 0, Condition::Always), 0, 0), Outcome::OutOfMemory);
        assert_eq!(
            s.apply(set("a", "0123456789a", 0, Condition::Always), 0, 0),
            Outcome::OutOfMemory
        );
        assert_eq!(
            s.apply(set("a", "01", 0, Condition::Always), 0, 0),
            Outcome::Applied(true)
        );
        assert_eq!(s.apply(get("a"), 0, u64::MAX), Outcome::Value(Some(b("01"))));
    }

    // Goal: re-setting or persisting a key keeps exactly one deadline entry for it.
    #[test]
    fn deadlines_follow_the_entry() {
        let mut s = Shard::default();
        s.apply(set("k", "v", 100, Condition::Always), 0, u64::MAX);
        s.apply(
            Command::Expire {
                key: b("k"),
                ttl_ms: 200,
            },
            0,
            u64::MAX,
        );
        assert_eq!(s.next_deadline_ms(), Some(200));
        s.apply(Command::Expire { key: b("k"), ttl_ms: 0 }, 0, u64::MAX);
        assert_eq!(s.next_deadline_ms(), None);
        assert_eq!(s.apply(Command::Ttl { key: b("k") }, 300, u64::MAX), Outcome::Ttl(-1));
        s.apply(set("k", "v", 50, Condition::Always), 0, u64::MAX);
        s.apply(set("k", "v", 0, Condition::Always), 0, u64::MAX);
        assert_eq!(s.deadlines.len(), 0);
    }
}
