//! Recovery at start, before any port opens: read every log file, check every record, and
//! re-apply the records of each shard in seq order to the core that owns the shard now.
//! Records carry their shard, so a restart with another core count finds every key.
//!
//! A damaged record at the end of a file (a crash in the middle of a write) is cut off with
//! a warning. A damaged record anywhere else stops the start with the file and offset,
//! unless `--repair` is given, which cuts the file there instead (losing what follows).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::record::{decode, Read};
use crate::keyspace::Keyspace;
use crate::shard::{now_ms, Change, CoreStore};

/// What recovery did, for the start-up log and Stats.
#[derive(Debug, Default)]
pub struct Recovered {
    pub files: usize,
    pub bytes: u64,
    pub records: u64,
    pub keys: u64,
    pub millis: u64,
    /// Files cut short: (file, offset, why).
    pub truncated: Vec<(PathBuf, u64, String)>,
}

/// The log files in `dir`, oldest first (names start with the start time).
pub fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files)
}

/// Replays `dir` into `stores` (indexed by core). `record_bytes_max` bounds one record.
pub fn recover(
    dir: &Path,
    keyspace: &Keyspace,
    stores: &mut [CoreStore],
    repair: bool,
    record_bytes_max: usize,
) -> Result<Recovered, String> {
    let started = Instant::now();
    let mut out = Recovered::default();
    let mut changes: Vec<Change> = Vec::new();
    for path in log_files(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
        let data = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.files += 1;
        out.bytes += data.len() as u64;
        let mut at = 0;
        loop {
            match decode(&data[at..], record_bytes_max) {
                Read::Record(c, n) => {
                    changes.push(c);
                    at += n;
                }
                Read::End => break,
                Read::Bad(why) => {
                    let tail = is_tail(&data, at);
                    if !tail && !repair {
                        return Err(format!(
                            "{}: damaged record at offset {at} ({why}); start with --repair to cut the log there",
                            path.display()
                        ));
                    }
                    tracing::warn!(file = %path.display(), offset = at, reason = %why, tail, "cutting the log at a damaged record");
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| e.to_string())?;
                    f.set_len(at as u64)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| e.to_string())?;
                    out.truncated.push((path.clone(), at as u64, why));
                    break;
                }
            }
        }
    }
    out.records = changes.len() as u64;
    // Per shard, in the order the shard applied them (a file per core and run, so one
    // shard's records may span files after a core-count change).
    changes.sort_by_key(|c| (c.shard, c.seq));
    let now = now_ms();
    for c in &changes {
        let core = keyspace.core_of_shard(c.shard) as usize;
        stores[core].restore(c, now);
    }
    out.keys = stores.iter().map(CoreStore::keys).sum();
    out.millis = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// True when nothing valid can follow the damaged record at `at`: it runs past the end of
/// the file, or only zeros come after what it claims to span.
fn is_tail(data: &[u8], at: usize) -> bool {
    let rest = &data[at..];
    if rest.len() < 8 {
        return true;
    }
    let claimed = 8 + u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if claimed < rest.len() {
        return rest[claimed..].iter().all(|b| *b == 0);
    }
    // The length itself may be what is damaged: a valid record further on means this is
    // the middle of the log, not its torn end.
    (at + 1..data.len()).all(|off| !matches!(decode(&data[off..], usize::MAX), Read::Record(..)))
}
