//! The change-capture checkpoint: per shard, the highest seq whose change (and every
//! change before it) the broker has confirmed. Everything in the log after it is published
//! again after a restart.
//!
//! ```text
//! "FLUXCKP1" | u32 shards | u64 written_at_ms | shards x u64 seq | u32 crc32c(all before)
//! ```
//! Little-endian, written to a temporary file, synced and renamed over the old one, so a
//! crash leaves the old checkpoint or the new one. An older checkpoint only means more
//! duplicates, never a loss.

use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FLUXCKP1";
const HEADER_BYTES: usize = 8 + 4 + 8;

/// The checkpoint file under `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("cdc-checkpoint")
}

/// Reads the checkpoint; `Ok(None)` when there is none. A damaged file or one written for
/// another shard count is an error: starting over from zero would republish the whole log,
/// and guessing would lose changes.
pub fn load(path: &Path, shards: u32) -> Result<Option<Vec<u64>>, String> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    decode(&data, shards).map(Some).map_err(|why| {
        format!(
            "{}: {why}; move it away to start change capture from the log's current state",
            path.display()
        )
    })
}

pub(crate) fn decode(data: &[u8], shards: u32) -> Result<Vec<u64>, String> {
    if data.len() < HEADER_BYTES + 4 || &data[..8] != MAGIC {
        return Err("not a change-capture checkpoint".into());
    }
    let (body, crc) = data.split_at(data.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    let written_for = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    if written_for != shards {
        return Err(format!("written for shards = {written_for}, this node has {shards}"));
    }
    let seqs = &body[HEADER_BYTES..];
    if seqs.len() != shards as usize * 8 {
        return Err("wrong length".into());
    }
    Ok(seqs
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn encode(seqs: &[u64], written_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + seqs.len() * 8 + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    out.extend_from_slice(&written_at_ms.to_le_bytes());
    for s in seqs {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Writes the checkpoint durably (temporary file, fsync, rename, directory fsync).
pub fn store(path: &Path, seqs: &[u64], written_at_ms: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&encode(seqs, written_at_ms))?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a checkpoint round-trips; damage, truncation and another shard count are errors.
    #[test]
    fn round_trip_and_damage() {
        let seqs: Vec<u64> = (0..16).map(|i| i * 1000 + 7).collect();
        let data = encode(&seqs, 1_700_000_000_000);
        assert_eq!(decode(&data, 16), Ok(seqs));
        assert!(decode(&data, 8).is_err());
        assert!(decode(&data[..data.len() - 1], 16).is_err());
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 1;
            assert!(decode(&bad, 16).is_err(), "flip at {i} not caught");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(load(&p, 16), Ok(None));
        store(&p, &[1, 2, 3, 4], 5).unwrap();
        assert_eq!(load(&p, 4), Ok(Some(vec![1, 2, 3, 4])));
    }

    proptest::proptest! {
        // Goal: a checkpoint of any seqs and time decodes to the same seqs.
        #[test]
        fn any_checkpoint_round_trips(seqs in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..300), at in proptest::prelude::any::<u64>()) {
            let data = encode(&seqs, at);
            proptest::prop_assert_eq!(decode(&data, seqs.len() as u32), Ok(seqs));
        }
    }
}
