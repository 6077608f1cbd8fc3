//! Key -> shard -> core: the routing rule, and nothing else.
//!
//! These are the pure functions the protocol documents (proto/flux.proto, "KEYS, SHARDS AND
//! CORES"), so a client in any language can compute the same answer. Every place in the
//! server that needs to know where a key lives calls into this module; there is no second
//! copy of the rule.

use xxhash_rust::xxh3::xxh3_64;

/// The name of the key hash, as announced in `HelloResponse.key_hash`.
pub const KEY_HASH_NAME: &str = "xxh3_64";

/// The shard layout of a node: how many shards, and how many cores own them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keyspace {
    shards: u32,
    cores: u32,
}

impl Keyspace {
    /// `shards` must be a power of two (the rule masks the hash) and there must be at least
    /// one core and no more cores than shards (a core without shards would serve nothing).
    pub fn new(shards: u32, cores: u32) -> Result<Self, String> {
        if shards == 0 || !shards.is_power_of_two() {
            return Err(format!("shards must be a power of two, got {shards}"));
        }
        if cores == 0 || cores > shards {
            return Err(format!("cores must be between 1 and shards ({shards}), got {cores}"));
        }
        Ok(Self { shards, cores })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn cores(&self) -> u32 {
        self.cores
    }

    /// The routing hash of a key: `xxh3_64(key, seed 0)`. Computed once per key operation
    /// and carried along, so the owner core does not hash the key again.
    #[inline]
    pub fn hash(key: &[u8]) -> u64 {
        xxh3_64(key)
    }

    /// `xxh3_64(key, seed 0) & (shards - 1)`.
    #[inline]
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        self.shard_of_hash(Self::hash(key))
    }

    #[inline]
    pub fn shard_of_hash(&self, hash: u64) -> u32 {
        (hash & u64::from(self.shards - 1)) as u32
    }

    /// Shard `s` is owned by core `s % cores`.
    #[inline]
    pub fn core_of_shard(&self, shard: u32) -> u32 {
        shard % self.cores
    }

    #[inline]
    pub fn core_of(&self, key: &[u8]) -> u32 {
        self.core_of_shard(self.shard_of(key))
    }

    /// The shards owned by `core`, in increasing order.
    pub fn shards_of_core(&self, core: u32) -> impl Iterator<Item = u32> {
        (core..self.shards).step_by(self.cores as usize)
    }

    /// Position of `shard` among the shards of its owner core (dense per-core indexing).
    #[inline]
    pub fn local_index(&self, shard: u32) -> usize {
        (shard / self.cores) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the rule matches the documented formula, so other-language clients can rely on it.
    #[test]
    fn routing_follows_the_documented_formula() {
        let ks = Keyspace::new(256, 2).unwrap();
        // xxh3_64("") with seed 0 is a published test vector.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(ks.shard_of(b""), (0x2D06_8005_38D3_94C2u64 & 255) as u32);
        for key in [&b"a"[..], b"user_1_2", b"\x00\xff"] {
            let shard = ks.shard_of(key);
            assert_eq!(shard as u64, xxh3_64(key) % 256);
            assert_eq!(ks.core_of(key), shard % 2);
        }
    }

    // Goal: every shard belongs to exactly one core, and local indices are dense.
    #[test]
    fn shards_partition_across_cores() {
        let ks = Keyspace::new(16, 3).unwrap();
        let mut seen = [false; 16];
        for core in 0..3 {
            for (i, shard) in ks.shards_of_core(core).enumerate() {
                assert_eq!(ks.core_of_shard(shard), core);
                assert_eq!(ks.local_index(shard), i);
                assert!(!seen[shard as usize]);
                seen[shard as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    // Goal: invalid layouts are refused with a reason instead of misrouting keys.
    #[test]
    fn rejects_bad_layouts() {
        assert!(Keyspace::new(100, 2).is_err());
        assert!(Keyspace::new(0, 1).is_err());
        assert!(Keyspace::new(4, 0).is_err());
        assert!(Keyspace::new(4, 8).is_err());
    }
}
