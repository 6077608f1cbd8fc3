//! Reading changes back from the write-ahead log, on the control core: the records a
//! shard core dropped from memory (its queue was full), and at start every record of an
//! earlier run that the checkpoint does not cover.
//!
//! A shard core's log of one run is a series of segments named
//! `<run>-core<i>-<start>.log`, where `start` is the offset in that run's log of the
//! segment's first byte; a change event carries the offset just past its record, so the
//! control core can always find a record from its event, and read what lies between two
//! events. Only bytes below the core's `synced_end` are read: they are durable and no
//! longer rewritten.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::change::Change;
use crate::wal::record::{decode, Read};

/// The name of the segment of a core's log of one run that starts at `start`.
pub fn segment_name(run: &str, start: u64) -> String {
    format!("{run}-{start:020}.log")
}

/// Smallest read, so a run of small records is not read a few bytes at a time.
const READ_BYTES_MIN: usize = 64 << 10;

/// What one read got.
pub struct Chunk {
    pub changes: Vec<Change>,
    /// Where the next read starts.
    pub next: u64,
    /// The file (old logs) or the asked range (run logs) is read to its end.
    pub done: bool,
}

/// Reads whole records from `file` starting at byte `at`, up to `end` (exclusive) or the
/// file's end, taking about `bytes_max` bytes. `base` is added to offsets to make each
/// change's `log_end` (0 keeps it 0: a log of an earlier run).
fn read_records(
    file: &File,
    at: u64,
    end: Option<u64>,
    bytes_max: usize,
    record_bytes_max: usize,
    base: Option<u64>,
) -> Result<Chunk, String> {
    let mut want = bytes_max.max(READ_BYTES_MIN);
    if let Some(end) = end {
        want = want.min(end.saturating_sub(at) as usize);
    }
    loop {
        let mut buf = vec![0u8; want];
        let got = read_full(file, &mut buf, at).map_err(|e| format!("read at {at}: {e}"))?;
        buf.truncate(got);
        let short = got < want; // the file ends inside the window
        let mut changes = Vec::new();
        let mut i = 0;
        loop {
            let rest = &buf[i..];
            if rest.len() < 8 {
                break;
            }
            let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                // Zero padding: the end of what this segment holds.
                return Ok(Chunk {
                    changes,
                    next: at + i as u64,
                    done: true,
                });
            }
            if len > record_bytes_max {
                return Err(format!("record length {len} at {} is impossible", at + i as u64));
            }
            if 8 + len > rest.len() {
                if short && i == 0 {
                    return Err(format!("a record at {at} runs past the end of the file"));
                }
                break; // read again from here (a record larger than the window: whole)
            }
            match decode(rest, record_bytes_max) {
                Read::Record(mut c, n) => {
                    i += n;
                    if let Some(base) = base {
                        c.log_end = base + at + i as u64;
                    }
                    changes.push(c);
                }
                Read::End => {
                    return Ok(Chunk {
                        changes,
                        next: at + i as u64,
                        done: true,
                    })
                }
                Read::Bad(why) => return Err(format!("damaged record at {}: {why}", at + i as u64)),
            }
        }
        if i == 0 && !short && buf.len() >= 8 {
            let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
            want = 8 + len;
            continue;
        }
        let next = at + i as u64;
        let done = short && i == buf.len() || end.is_some_and(|e| next >= e);
        return Ok(Chunk { changes, next, done });
    }
}

fn read_full(file: &File, buf: &mut [u8], mut at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The log files of earlier runs, read one after the other from the start (oldest first, as
/// recovery sorts them: per shard, that is seq order).
pub struct OldLogs {
    files: Vec<PathBuf>,
    index: usize,
    offset: u64,
    open: Option<File>,
    /// Bytes in all of them (retention counts them until every change in them is confirmed).
    pub bytes: u64,
}

impl OldLogs {
    pub fn new(files: Vec<PathBuf>) -> OldLogs {
        let bytes = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
        OldLogs {
            files,
            index: 0,
            offset: 0,
            open: None,
            bytes,
        }
    }

    pub fn is_done(&self) -> bool {
        self.index >= self.files.len()
    }

    /// The next changes, about `bytes_max` of them; empty once every file is read.
    pub fn read(&mut self, bytes_max: usize, record_bytes_max: usize) -> Result<Vec<Change>, String> {
        while let Some(path) = self.files.get(self.index) {
            if self.open.is_none() {
                self.open = Some(File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?);
                self.offset = 0;
            }
            let file = self.open.as_ref().expect("opened above");
            let chunk = read_records(file, self.offset, None, bytes_max, record_bytes_max, None)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            self.offset = chunk.next;
            if chunk.done {
                self.index += 1;
                self.open = None;
            }
            if !chunk.changes.is_empty() {
                return Ok(chunk.changes);
            }
        }
        Ok(Vec::new())
    }
}

/// One shard core's log of the current run, read by offset.
pub struct RunLog {
    dir: PathBuf,
    /// `<run>-core<i>`.
    run: String,
    /// Known segments, by start offset.
    segments: Vec<u64>,
    open: Option<(u64, File)>,
}

impl RunLog {
    pub fn new(dir: &Path, run: String) -> RunLog {
        RunLog {
            dir: dir.to_path_buf(),
            run,
            segments: Vec::new(),
            open: None,
        }
    }

    fn refresh(&mut self) -> Result<(), String> {
        let prefix = format!("{}-", self.run);
        let mut starts: Vec<u64> = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("cannot list {}: {e}", self.dir.display()))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        starts.sort_unstable();
        self.segments = starts;
        Ok(())
    }

    /// The segment holding offset `at`: the last one starting at or before it.
    fn segment(&mut self, at: u64, fresh: bool) -> Result<u64, String> {
        if fresh || self.segments.is_empty() {
            self.refresh()?;
        }
        let start = match self.segments.partition_point(|s| *s <= at) {
            0 => return Err(format!("no segment of {} holds offset {at}", self.run)),
            i => self.segments[i - 1],
        };
        if self.open.as_ref().is_none_or(|(s, _)| *s != start) {
            let path = self.dir.join(segment_name(&self.run, start));
            let f = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            self.open = Some((start, f));
        }
        Ok(start)
    }

    /// Reads the records between offsets `from` and `to` of this run's log, about
    /// `bytes_max` of them. Every change gets its `log_end`.
    pub fn read(&mut self, from: u64, to: u64, bytes_max: usize, record_bytes_max: usize) -> Result<Chunk, String> {
        let mut at = from;
        let mut changes = Vec::new();
        let mut fresh = false;
        while at < to && changes.is_empty() {
            let start = self.segment(at, fresh)?;
            let (_, file) = self.open.as_ref().expect("opened by segment()");
            let chunk = read_records(
                file,
                at - start,
                Some(to - start),
                bytes_max,
                record_bytes_max,
                Some(start),
            )
            .map_err(|e| format!("{}: {e}", segment_name(&self.run, start)))?;
            let next = start + chunk.next;
            if next == at && chunk.changes.is_empty() {
                // This segment ends here: the next one must start exactly here.
                if fresh {
                    return Err(format!("{}: the log ends at {at}, before {to}", self.run));
                }
                fresh = true;
                continue;
            }
            fresh = false;
            at = next;
            changes = chunk.changes;
        }
        Ok(Chunk {
            changes,
            next: at,
            done: at >= to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeOp, Fields};
    use crate::wal::record::encode_fields;
    use bytes::Bytes;

    fn record(seq: u64, value_len: usize, out: &mut Vec<u8>) -> u64 {
        let (k, v) = (Bytes::from(format!("k{seq}")), Bytes::from(vec![b'v'; value_len]));
        let f = Fields {
            shard: 1,
            seq,
            op: ChangeOp::Set,
            expire_at_ms: 0,
            key: &k,
            value: &v,
        };
        encode_fields(&f, out) as u64
    }

    // Goal: a run's log split over segments (one with direct-I/O zero padding) reads back
    // every record between two offsets, in order, with the right log_end, whatever the
    // read size; a record bigger than the read window comes back whole.
    #[test]
    fn run_log_reads_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let run = "00000000000000000001-core0".to_string();
        let mut ends = Vec::new();
        let mut at = 0u64;
        for (seg, seqs) in [(0, 1..=50u64), (1, 51..=120)] {
            let start = at;
            let mut data = Vec::new();
            for seq in seqs {
                at += record(seq, if seq == 60 { 300_000 } else { 10 }, &mut data);
                ends.push(at);
            }
            if seg == 0 {
                data.resize(data.len().div_ceil(4096) * 4096, 0);
            }
            std::fs::write(dir.path().join(segment_name(&run, start)), data).unwrap();
        }
        for bytes_max in [1, 1000, 1 << 20] {
            let mut log = RunLog::new(dir.path(), run.clone());
            let (mut from, mut got) = (ends[9], Vec::new());
            while from < at {
                let chunk = log.read(from, at, bytes_max, 1 << 20).unwrap();
                assert!(chunk.next > from, "no progress at {from}");
                got.extend(chunk.changes.iter().map(|c| (c.seq, c.log_end)));
                from = chunk.next;
            }
            let want: Vec<(u64, u64)> = (11..=120).map(|s| (s, ends[s as usize - 1])).collect();
            assert_eq!(got, want, "bytes_max {bytes_max}");
        }
    }

    // Goal: old logs are read file after file to their end (zero padding included).
    #[test]
    fn old_logs_read_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for f in 0..3u64 {
            let mut data = Vec::new();
            for seq in f * 10 + 1..=f * 10 + 10 {
                record(seq, 5, &mut data);
            }
            data.resize(8192, 0);
            let p = dir.path().join(format!("{f}.log"));
            std::fs::write(&p, data).unwrap();
            files.push(p);
        }
        let mut old = OldLogs::new(files);
        let mut seqs = Vec::new();
        loop {
            let changes = old.read(100, 1 << 20).unwrap();
            if changes.is_empty() {
                break;
            }
            seqs.extend(changes.iter().map(|c| c.seq));
        }
        assert!(old.is_done());
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    }
}
