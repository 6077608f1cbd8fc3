//! Durability: each shard core appends every applied change to its own write-ahead log
//! with glommio's direct-I/O stream writer; at start the logs are replayed before any port
//! opens.
//!
//! - `record.rs`: the record format (length, CRC32C, shard, seq, op, expiry, key, value).
//! - `writer.rs`: the per-core writer and the fsync policies (`always` groups every write
//!   of an executor round into one fdatasync before the replies go out; `everysec`; `no`).
//! - `recovery.rs`: replay, torn-tail handling, `--repair`.
//!
//! Not yet: snapshots and log compaction (logs of earlier runs are replayed and kept).

pub mod record;
pub mod recovery;
pub mod writer;

/// Changes encoded on the shard core, waiting for its writer task. Plain data (`Send`), so
/// a core's store can be built and recovered before its executor starts.
#[derive(Default)]
pub struct WalBuffer {
    pub pending: Vec<u8>,
    /// Records appended so far (the generation a writer must reach to cover them).
    pub appended: u64,
    /// The writer task, parked while there is nothing to write.
    pub writer: Option<std::task::Waker>,
}

impl WalBuffer {
    pub fn append(&mut self, c: &crate::shard::Change) {
        record::encode(c, &mut self.pending);
        self.appended += 1;
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}
