//! The shards one core owns, and that core's share of the memory limit.

use super::{table_hash, Change, ChangeSink, Command, Outcome, Shard};
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
}

impl CoreStore {
    /// `node_memory_bytes_max` is the node-wide limit (0 = unlimited); each core gets an equal
    /// share so no core has to ask another before a write.
    pub fn new(keyspace: Keyspace, core: u32, node_memory_bytes_max: u64) -> Self {
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
        let room = self.memory_bytes_max.saturating_sub(self.memory_bytes);
        let s = &mut self.shards[self.keyspace.local_index(shard)];
        let before = s.memory_bytes();
        let outcome = s.apply(table_hash(hash), cmd, now_ms, room, out);
        self.memory_bytes = self.memory_bytes - before + s.memory_bytes();
        outcome
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
        s.restore(table_hash(hash), c);
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
        let mut store = CoreStore::new(ks, 1, 2 * share);
        let mut applied = 0u64;
        for key in key_on_core(&ks, 1, 50) {
            let hash = Keyspace::hash(&key);
            let set = Command::Set {
                key,
                value: Bytes::from_static(b"v"),
                ttl_ms: 0,
                condition: Condition::Always,
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
        let mut store = CoreStore::new(ks, 0, 0);
        for key in key_on_core(&ks, 0, 50) {
            store.apply(
                Keyspace::hash(&key),
                Command::Set {
                    key,
                    value: Bytes::new(),
                    ttl_ms: 10,
                    condition: Condition::Always,
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
        let mut store = CoreStore::new(ks, 0, 0);
        let key = key_on_core(&ks, 1, 1).remove(0);
        store.apply(Keyspace::hash(&key), Command::Get { key }, 0, &mut ());
    }
}
