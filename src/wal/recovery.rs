//! Recovery at start, before any port opens: load each shard's snapshot, then read every
//! log file, check every record, and re-apply the records each snapshot does not cover, per
//! shard in seq order, to the core that owns the shard now. Keys whose deadline passed
//! while the node was down come back too, so that their removal is logged and published
//! as EXPIRED changes once the node runs. Snapshots and records carry
//! their shard, so a restart with another core count finds every key.
//!
//! A damaged record at the end of a log file (a crash in the middle of a write) is cut off
//! with a warning. A damaged record anywhere else, or a damaged snapshot, stops the start
//! with the file and offset, unless `--repair` is given, which keeps what precedes the
//! damage (cutting a log there) and goes on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::record::{decode, Read};
use super::snapshot::{self, Header, Loaded, HEADER_BYTES};
use crate::change::{Change, ChangeOp};
use crate::keyspace::Keyspace;
use crate::shard::CoreStore;

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
    pub snapshots: u64,
    pub snapshot_bytes: u64,
    /// Per shard: the snapshot loaded for it.
    pub shard_snapshots: Vec<Loaded>,
    /// The log files read: all of them belong to earlier runs.
    pub log_files: Vec<PathBuf>,
}

/// The files in `dir` whose names end with `suffix`, sorted by name.
fn files_ending(dir: &Path, suffix: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files)
}

/// The log files in `dir`, oldest first (names start with the start time).
pub fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    files_ending(dir, ".log")
}

/// Checks that a recovered key belongs to the shard its record names (a different `shards`
/// setting than the data was written with would put keys where no request finds them) and
/// returns the key's routing hash, so the key is hashed once.
fn check_shard(keyspace: &Keyspace, c: &Change, path: &Path, at: usize) -> Result<u64, String> {
    let hash = Keyspace::hash(&c.key);
    if c.shard < keyspace.shards() && keyspace.shard_of_hash(hash) == c.shard {
        return Ok(hash);
    }
    Err(format!(
        "{}: the record at offset {at} belongs to shard {} but its key maps to shard {} of {}: \
         the data was written with another `shards` setting",
        path.display(),
        c.shard,
        keyspace.shard_of(&c.key),
        keyspace.shards()
    ))
}

/// Records restored between two looks at the clock for progress reports (systemd STATUS).
const PROGRESS_RECORDS: u64 = 16_384;

/// Replays `snap_dir` and `wal_dir` into `stores` (indexed by core). `record_bytes_max`
/// bounds one record.
pub fn recover(
    wal_dir: &Path,
    snap_dir: &Path,
    keyspace: &Keyspace,
    stores: &mut [CoreStore],
    repair: bool,
    record_bytes_max: usize,
) -> Result<Recovered, String> {
    let started = Instant::now();
    crate::systemd::recovery_progress(0, true);
    let mut restored: u64 = 0;
    let mut out = Recovered {
        shard_snapshots: vec![Loaded::default(); keyspace.shards() as usize],
        ..Recovered::default()
    };
    // Snapshots first: what each covers (by seq) is skipped in the logs.
    let mut covered = vec![0u64; keyspace.shards() as usize];
    snapshot::remove_unfinished(snap_dir).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(format!("cannot clean {}: {e}", snap_dir.display())),
    })?;
    for path in files_ending(snap_dir, ".snap").map_err(|e| format!("cannot list {}: {e}", snap_dir.display()))? {
        let data = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let header = match Header::decode(&data) {
            Ok(h) => h,
            Err(why) if repair => {
                tracing::warn!(file = %path.display(), reason = %why, "skipping a damaged snapshot (--repair)");
                continue;
            }
            Err(why) => {
                return Err(format!(
                    "{}: damaged snapshot header at offset 0 ({why}); start with --repair to skip it",
                    path.display()
                ))
            }
        };
        if header.shards != keyspace.shards() {
            return Err(format!(
                "{}: written with shards = {}, but this node has shards = {}; start with --shards {}",
                path.display(),
                header.shards,
                keyspace.shards(),
                header.shards
            ));
        }
        if path
            .file_name()
            .is_none_or(|n| *n != *snapshot::file_name(header.shard))
        {
            return Err(format!(
                "{}: holds shard {}, which does not match its name",
                path.display(),
                header.shard
            ));
        }
        let core = keyspace.core_of_shard(header.shard) as usize;
        let mut at = HEADER_BYTES;
        let mut keys = 0;
        while keys < header.keys {
            let why = match decode(&data[at..], record_bytes_max) {
                Read::Record(c, n) if c.shard == header.shard && c.op == ChangeOp::Set && c.seq == header.seq => {
                    let hash = check_shard(keyspace, &c, &path, at)?;
                    stores[core].restore(&c, hash);
                    at += n;
                    keys += 1;
                    restored += 1;
                    if restored.is_multiple_of(PROGRESS_RECORDS) {
                        crate::systemd::recovery_progress(restored, false);
                    }
                    continue;
                }
                Read::Record(..) => "a record that does not belong to this snapshot".to_string(),
                Read::End => format!("it ends after {keys} of {} keys", header.keys),
                Read::Bad(why) => why,
            };
            if !repair {
                return Err(format!(
                    "{}: damaged snapshot at offset {at} ({why}); start with --repair to keep the keys before it",
                    path.display()
                ));
            }
            tracing::warn!(file = %path.display(), offset = at, reason = %why, "keeping the keys before a damaged snapshot record (--repair)");
            break;
        }
        stores[core].restore_seq(header.shard, header.seq);
        covered[header.shard as usize] = header.seq;
        out.shard_snapshots[header.shard as usize] = Loaded {
            seq: header.seq,
            bytes: data.len() as u64,
            written_at_ms: header.written_at_ms,
        };
        out.snapshots += 1;
        out.snapshot_bytes += data.len() as u64;
    }

    // Logs are streamed through a bounded window and applied as they are read: peak memory
    // is the recovered data plus one window, not the logs. File order (run, core, offset) is
    // per-shard seq order: within a run a shard lives on one core, whose segments follow its
    // apply order, and a later run continues the seqs of earlier ones. A record at or below
    // what its shard already has (covered by a snapshot, or seen) is skipped.
    let mut applied = covered;
    for path in log_files(wal_dir).map_err(|e| format!("cannot list {}: {e}", wal_dir.display()))? {
        let mut reader = LogReader::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.files += 1;
        out.bytes += reader.len;
        loop {
            let (at, read) = reader
                .next(record_bytes_max)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            match read {
                Read::Record(c, _) => {
                    let hash = check_shard(keyspace, &c, &path, at as usize)?;
                    let last = &mut applied[c.shard as usize];
                    if c.seq > *last {
                        *last = c.seq;
                        stores[keyspace.core_of_shard(c.shard) as usize].restore(&c, hash);
                        out.records += 1;
                        restored += 1;
                        if restored.is_multiple_of(PROGRESS_RECORDS) {
                            crate::systemd::recovery_progress(restored, false);
                        }
                    }
                }
                Read::End => break,
                Read::Bad(why) => {
                    let rest = reader
                        .rest()
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let tail = is_tail(&rest, 0);
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
                        .map_err(|e| format!("cannot open {} to cut it: {e}", path.display()))?;
                    f.set_len(at)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| format!("cannot cut {}: {e}", path.display()))?;
                    out.truncated.push((path.clone(), at, why));
                    break;
                }
            }
        }
        out.log_files.push(path);
    }
    out.keys = stores.iter().map(CoreStore::keys).sum();
    out.millis = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// Bytes of a log file recovery holds at once (more only for a larger record).
const WINDOW_BYTES: usize = 4 << 20;

/// Reads a log file's records in order through a window of about [`WINDOW_BYTES`].
struct LogReader {
    file: std::fs::File,
    /// The file's size when opened.
    len: u64,
    window: Vec<u8>,
    /// Bytes of `window` already returned as records.
    used: usize,
    /// File offset of `window[0]`.
    window_at: u64,
    eof: bool,
}

impl LogReader {
    fn open(path: &Path) -> std::io::Result<LogReader> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(LogReader {
            file,
            len,
            window: Vec::new(),
            used: 0,
            window_at: 0,
            eof: false,
        })
    }

    /// The next record, the end, or damage, with its file offset.
    fn next(&mut self, record_bytes_max: usize) -> std::io::Result<(u64, Read)> {
        loop {
            let rest = &self.window[self.used..];
            let need = match rest.get(..4) {
                // A claimed length above the limit is damage: decode says so from the header.
                Some(len) => 8 + (u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize).min(record_bytes_max),
                None => 8,
            };
            if rest.len() < need && !self.eof {
                self.fill(need)?;
                continue;
            }
            let at = self.window_at + self.used as u64;
            let read = decode(rest, record_bytes_max);
            if let Read::Record(_, n) = &read {
                self.used += n;
            }
            return Ok((at, read));
        }
    }

    /// Drops what was used and reads until the window holds at least `need` bytes (and
    /// about a window's worth) or the file ends.
    fn fill(&mut self, need: usize) -> std::io::Result<()> {
        use std::io::Read as _;
        self.window.drain(..self.used);
        self.window_at += self.used as u64;
        self.used = 0;
        let missing = need.max(WINDOW_BYTES).saturating_sub(self.window.len());
        let got = (&self.file).take(missing as u64).read_to_end(&mut self.window)?;
        self.eof = got < missing;
        Ok(())
    }

    /// Everything from the current position to the end of the file (only to judge damage).
    fn rest(&mut self) -> std::io::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut rest = self.window[self.used..].to_vec();
        self.file.read_to_end(&mut rest)?;
        Ok(rest)
    }
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
