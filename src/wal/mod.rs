//! Durability: each shard core appends every applied change to its own write-ahead log
//! with glommio's direct-I/O stream writer, snapshots its shards in the background so the
//! log can be deleted, and at start the snapshots and logs are replayed before any port
//! opens.
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
    pub fn append(&mut self, f: &record::Fields) {
        record::encode_fields(f, &mut self.pending);
        self.appended += 1;
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}
