//! The shards one core owns, and that core's share of the memory limit.
//!
//! With `limits.eviction = lru`, a write that does not fit evicts before it applies: first
//! from its own shard (its table is in cache, and keys spread evenly over shards), then
//! from the core's others, until what the write lacks is free. So a write evicts work in
//! proportion to its own size. Memory above the share for another reason (a restart with a
//! lower limit or more cores) is brought down in the background, in bounded steps
//! ([`CoreStore::evict_over`]).

use super::{table_hash, Change, ChangeSink, Command, Outcome, Shard};
use crate::config::Eviction;
use crate::keyspace::Keyspace;

/// All shards owned by one core. Lives in that core's thread only.
pub struct CoreStore {
    keyspace: Keyspace,
    core: u32,
    /// Indexed by `Keyspace::local_index`.
    shards: Vec<Shard>,
    /// This core's share of `limits.memory_bytes_max`; `u64::MAX` when unlimited.
    memory_bytes_max: u64,
    memory_bytes: u64,
    /// Where the next sweep starts, so a bounded sweep visits every shard in turn.
    sweep_cursor: usize,
    eviction: Eviction,
    /// Where the next eviction from another shard than the write's starts.
    evict_cursor: usize,
    /// Chooses the buckets eviction samples; seeded per core, no system entropy needed.
    rng: fastrand::Rng,
}

impl CoreStore {
    /// `node_memory_bytes_max` is the node-wide limit (0 = unlimited); each core gets an equal
    /// share so no core has to ask another before a write. `eviction` says what a write
    /// that does not fit does: fail with `OutOfMemory`, or evict.
    pub fn new(keyspace: Keyspace, core: u32, node_memory_bytes_max: u64, eviction: Eviction) -> Self {
        let shards = keyspace.shards_of_core(core).map(Shard::new).collect();
        let memory_bytes_max = match node_memory_bytes_max {
            0 => u64::MAX,
            n => (n / u64::from(keyspace.cores())).max(1),
        };
        Self {
            keyspace,
            core,
            shards,
            memory_bytes_max,
            memory_bytes: 0,
            sweep_cursor: 0,
            eviction,
            evict_cursor: 0,
            rng: fastrand::Rng::with_seed(u64::from(core) ^ 0x5DEE_CE66_D1CE_4E5B),
        }
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    pub fn core(&self) -> u32 {
        self.core
    }

    /// Applies `cmd`, whose key has routing hash `hash` (`Keyspace::hash`); this core must
    /// own the key's shard. Its changes go to `out`, in order.
    pub fn apply(&mut self, hash: u64, cmd: Command, now_ms: u64, out: &mut impl ChangeSink) -> Outcome {
        debug_assert_eq!(Keyspace::hash(cmd.key()), hash);
        let shard = self.keyspace.shard_of_hash(hash);
        assert_eq!(
            self.keyspace.core_of_shard(shard),
            self.core,
            "shard {shard} routed to the wrong core"
        );
        let index = self.keyspace.local_index(shard);
        let h = table_hash(hash);
        loop {
            let room = self.memory_bytes_max.saturating_sub(self.memory_bytes);
            let s = &mut self.shards[index];
            let before = s.memory_bytes();
            let outcome = s.apply(h, &cmd, now_ms, room, out);
            self.memory_bytes = self.memory_bytes - before + s.memory_bytes();
            if outcome != Outcome::OutOfMemory || self.eviction == Eviction::None {
                return outcome;
            }
            // Each round frees what the write lacked, so it fits on the next unless the
            // eviction took the key it overwrites (then it needs its whole size).
            let lacking = self.shards[index].shortfall_bytes();
            if self.evict(index, lacking, now_ms, out) == 0 {
                return outcome;
            }
        }
    }

    /// Evicts until `bytes` are free, from shard `first` and then the others in turn;
    /// returns the bytes freed (less than asked only when the core holds nothing more).
    fn evict(&mut self, first: usize, bytes: u64, now_ms: u64, out: &mut impl ChangeSink) -> u64 {
        let mut freed = 0;
        let mut shard = first;
        let mut empty = 0;
        // `first`, then every shard from the cursor on: all of them, whatever `first` was.
        while freed < bytes && empty <= self.shards.len() {
            match self.shards[shard].evict(now_ms, &mut self.rng, out) {
                Some(n) => {
                    freed += n;
                    empty = 0;
                }
                None => {
                    empty += 1;
                    self.evict_cursor = (self.evict_cursor + 1) % self.shards.len();
                    shard = self.evict_cursor;
                }
            }
        }
        self.memory_bytes -= freed;
        freed
    }

    /// With eviction on, evicts at most `max_keys` keys while the core holds more than its
    /// share (after a restart with a lower limit or more cores); returns how many it
    /// evicted. Bounded, like the sweep, so it never stalls requests.
    pub fn evict_over(&mut self, now_ms: u64, max_keys: usize, out: &mut impl ChangeSink) -> usize {
        if self.eviction == Eviction::None || self.shards.is_empty() {
            return 0;
        }
        let mut evicted = 0;
        while evicted < max_keys && self.memory_bytes > self.memory_bytes_max {
            self.evict_cursor = (self.evict_cursor + 1) % self.shards.len();
            // One byte: exactly one key.
            if self.evict(self.evict_cursor, 1, now_ms, out) == 0 {
                break;
            }
            evicted += 1;
        }
        evicted
    }

    /// Starts loading what an operation on the key with routing hash `hash` will touch
    /// (`Shard::prefetch`); this core must own the key.
    pub fn prefetch(&self, hash: u64) {
        let shard = self.keyspace.shard_of_hash(hash);
        self.shards[self.keyspace.local_index(shard)].prefetch(table_hash(hash));
    }

    /// Removes at most `max_keys` expired keys across this core's shards. Returns how many
    /// were removed; equal to `max_keys` means more may be due.
    pub fn sweep(&mut self, now_ms: u64, max_keys: usize, out: &mut impl ChangeSink) -> usize {
        let n = self.shards.len();
        let mut removed = 0;
        for step in 0..n {
            if removed == max_keys {
                break;
            }
            let i = (self.sweep_cursor + step) % n;
            let s = &mut self.shards[i];
            let before = s.memory_bytes();
            removed += s.sweep(now_ms, max_keys - removed, out);
            self.memory_bytes = self.memory_bytes - before + s.memory_bytes();
        }
        self.sweep_cursor = (self.sweep_cursor + 1) % n.max(1);
        removed
    }

    /// The shard slot `slot` lies in (slots and shards are powers of two, slots >= shards).
    fn slot_shard(&self, slot: u64) -> usize {
        let shard = self.keyspace.shard_of_hash(slot);
        debug_assert_eq!(self.keyspace.core_of_shard(shard), self.core, "slot of another core");
        self.keyspace.local_index(shard)
    }

    /// The keys of slot `slot` (`hash & slot_mask`), copied; this core must own its shard.
    pub fn keys_in_slot(&self, slot_mask: u64, slot: u64) -> Vec<bytes::Bytes> {
        self.shards[self.slot_shard(slot)].keys_in_slot(slot_mask, slot)
    }

    /// The live value and expiry of the key with routing hash `hash`, read without effects.
    pub fn peek(&self, hash: u64, key: &[u8], now_ms: u64) -> Option<(bytes::Bytes, u64)> {
        let shard = self.keyspace.shard_of_hash(hash);
        self.shards[self.keyspace.local_index(shard)].peek(table_hash(hash), key, now_ms)
    }

    /// Removes up to `max_keys` keys of slot `slot` (MIGRATION_DEL); returns how many.
    pub fn drop_slot(
        &mut self,
        slot_mask: u64,
        slot: u64,
        max_keys: usize,
        now_ms: u64,
        out: &mut impl ChangeSink,
    ) -> usize {
        let index = self.slot_shard(slot);
        let s = &mut self.shards[index];
        let before = s.memory_bytes();
        let n = s.drop_slot(slot_mask, slot, max_keys, now_ms, out);
        self.memory_bytes = self.memory_bytes - before + s.memory_bytes();
        n
    }

    /// Re-applies a logged change at start-up (see `Shard::restore`).
    /// `hash` is the key's routing hash (`Keyspace::hash`).
    pub fn restore(&mut self, c: &Change, hash: u64) {
        assert_eq!(
            self.keyspace.core_of_shard(c.shard),
            self.core,
            "record for another core's shard"
        );
        debug_assert_eq!(Keyspace::hash(&c.key), hash);
        debug_assert_eq!(self.keyspace.shard_of_hash(hash), c.shard);
        let s = &mut self.shards[self.keyspace.local_index(c.shard)];
        let before = s.memory_bytes();
        s.restore(table_hash(hash), c, super::now_ms());
        self.memory_bytes = self.memory_bytes - before + s.memory_bytes();
    }

    /// Continues `shard`'s change sequence after `seq` (recovery from its snapshot).
    pub fn restore_seq(&mut self, shard: u32, seq: u64) {
        let i = self.keyspace.local_index(shard);
        self.shards[i].restore_seq(seq);
    }

    /// Sequence number of `shard`'s last change.
    pub fn shard_seq(&self, shard: u32) -> u64 {
        self.shards[self.keyspace.local_index(shard)].seq()
    }

    /// `shard`'s live entries as of now (see `Shard::entries`); this core must own it.
    pub fn entries(&self, shard: u32) -> super::SnapshotEntries {
        assert_eq!(
            self.keyspace.core_of_shard(shard),
            self.core,
            "snapshot of another core's shard"
        );
        self.shards[self.keyspace.local_index(shard)].entries()
    }

    pub fn keys(&self) -> u64 {
        self.shards.iter().map(|s| s.len() as u64).sum()
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Expired keys removed when a request touched them, over this core's shards.
    pub fn expired_lazy(&self) -> u64 {
        self.shards.iter().map(Shard::expired_lazy).sum()
    }

    /// Keys evicted since start, over this core's shards.
    pub fn evicted(&self) -> u64 {
        self.shards.iter().map(Shard::evicted).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Condition;
    use bytes::Bytes;

    fn key_on_core(ks: &Keyspace, core: u32, n: usize) -> Vec<Bytes> {
        (0..)
            .map(|i| Bytes::from(format!("k{i}")))
            .filter(|k| ks.core_of(k) == core)
            .take(n)
            .collect()
    }

    // Goal: the node memory limit is split per core and enforced across that core's shards.
    #[test]
    fn memory_share_is_enforced_across_shards() {
        let ks = Keyspace::new(8, 2).unwrap();
        let share = 600;
        let mut store = CoreStore::new(ks, 1, 2 * share, Eviction::None);
        let mut applied = 0u64;
        for key in key_on_core(&ks, 1, 50) {
            let hash = Keyspace::hash(&key);
            let set = Command::Set {
                key,
                value: Bytes::from_static(b"v"),
                ttl_ms: 0,
                condition: Condition::Always,
                keep_ttl: false,
                return_old: false,
            };
            if store.apply(hash, set, 0, &mut ()) == Outcome::Applied(true) {
                applied += 1;
            }
        }
        // Each shard's first key also allocates its table: a few keys fit, not fifty.
        assert!((1..50).contains(&applied), "{applied}");
        assert_eq!(store.keys(), applied);
        assert!(store.memory_bytes() <= share, "{}", store.memory_bytes());
    }

    // Goal: a bounded sweep removes no more than asked and the rest on later calls.
    #[test]
    fn sweep_is_bounded() {
        let ks = Keyspace::new(8, 1).unwrap();
        let mut store = CoreStore::new(ks, 0, 0, Eviction::None);
        for key in key_on_core(&ks, 0, 50) {
            store.apply(
                Keyspace::hash(&key),
                Command::Set {
                    key,
                    value: Bytes::new(),
                    ttl_ms: 10,
                    condition: Condition::Always,
                    keep_ttl: false,
                    return_old: false,
                },
                0,
                &mut (),
            );
        }
        assert_eq!(store.sweep(5, 100, &mut ()), 0);
        assert_eq!(store.sweep(20, 30, &mut ()), 30);
        assert_eq!(store.sweep(20, 30, &mut ()), 20);
        assert_eq!(store.keys(), 0);
        let tables: u64 = store.shards.iter().map(|s| s.table_bytes()).sum();
        assert_eq!(store.memory_bytes(), tables, "only the tables' capacity is left");
    }

    // Goal: a command for a shard this core does not own is a bug caught at the boundary.
    #[test]
    #[should_panic(expected = "routed to the wrong core")]
    fn wrong_core_is_caught() {
        let ks = Keyspace::new(8, 2).unwrap();
        let mut store = CoreStore::new(ks, 0, 0, Eviction::None);
        let key = key_on_core(&ks, 1, 1).remove(0);
        store.apply(Keyspace::hash(&key), Command::Get { key }, 0, &mut ());
    }

    fn set(key: Bytes, value: &[u8]) -> Command {
        Command::Set {
            key,
            value: Bytes::copy_from_slice(value),
            ttl_ms: 0,
            condition: Condition::Always,
            keep_ttl: false,
            return_old: false,
        }
    }

    // Goal: with eviction on, writes past the share are never refused: each evicts what it
    // lacks (a large value many small keys), memory stays within the share, and every
    // eviction is a recorded EVICTED change. With eviction off the same write is refused.
    #[test]
    fn eviction_makes_room_within_the_share() {
        let ks = Keyspace::new(8, 1).unwrap();
        let share = 1 << 20;
        let mut store = CoreStore::new(ks, 0, share, Eviction::Lru);
        let mut out: Vec<Change> = Vec::new();
        for (i, key) in key_on_core(&ks, 0, 20_000).into_iter().enumerate() {
            let outcome = store.apply(Keyspace::hash(&key), set(key, &[1u8; 100]), i as u64, &mut out);
            assert_eq!(outcome, Outcome::Applied(true));
            assert!(store.memory_bytes() <= share, "{}", store.memory_bytes());
        }
        let big = Bytes::from_static(b"big");
        let before = store.evicted();
        let outcome = store.apply(
            Keyspace::hash(&big),
            set(big.clone(), &[2u8; 300_000]),
            30_000,
            &mut out,
        );
        assert_eq!(outcome, Outcome::Applied(true));
        assert!(store.evicted() - before > 1_000, "a large value evicts many small keys");
        assert!(store.memory_bytes() <= share);
        let evictions = out.iter().filter(|c| c.op == crate::change::ChangeOp::Evicted).count() as u64;
        assert_eq!(evictions, store.evicted());
        assert_eq!(store.keys() + store.evicted(), 20_001);

        let too_big = Bytes::from_static(b"too big");
        let outcome = store.apply(Keyspace::hash(&too_big), set(too_big, &vec![0u8; 2 << 20]), 0, &mut out);
        assert_eq!(outcome, Outcome::OutOfMemory, "larger than the whole share");

        let mut refusing = CoreStore::new(ks, 0, share, Eviction::None);
        let refused = key_on_core(&ks, 0, 20_000)
            .into_iter()
            .map(|key| refusing.apply(Keyspace::hash(&key), set(key, &[1u8; 100]), 0, &mut ()))
            .filter(|o| *o == Outcome::OutOfMemory)
            .count();
        assert!(refused > 10_000, "{refused}");
        assert_eq!(refusing.evicted(), 0);
    }

    // Goal: memory over the share that no write caused (a restart with a lower limit) is
    // evicted in bounded steps, until the core is within its share.
    #[test]
    fn excess_is_evicted_in_bounded_steps() {
        let ks = Keyspace::new(8, 1).unwrap();
        let mut store = CoreStore::new(ks, 0, 1 << 20, Eviction::Lru);
        for key in key_on_core(&ks, 0, 30_000) {
            let c = Change {
                shard: ks.shard_of_hash(Keyspace::hash(&key)),
                seq: 1,
                timestamp_ms: 0,
                op: crate::change::ChangeOp::Set,
                key: key.clone(),
                value: Bytes::from_static(&[0u8; 100]),
                expire_at_ms: 0,
                log_end: 0,
            };
            store.restore(&c, Keyspace::hash(&key));
        }
        assert!(store.memory_bytes() > 2 << 20, "recovery ignores the limit");
        assert_eq!(store.evict_over(0, 1_000, &mut ()), 1_000);
        while store.evict_over(0, 1_000, &mut ()) == 1_000 {}
        assert!(store.memory_bytes() <= 1 << 20);
        assert_eq!(store.evict_over(0, 1_000, &mut ()), 0);
        assert_eq!(CoreStore::new(ks, 0, 1, Eviction::None).evict_over(0, 10, &mut ()), 0);
    }
}
