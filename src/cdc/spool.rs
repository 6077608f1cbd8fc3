//! The disk spool: where closed change batches wait, in order, while the broker is away and
//! more of them pile up than the forwarder keeps in memory.
//!
//! Files `spool-<n>.log` under `<data_dir>/cdc-spool/`, each a run of records
//! `[u32 body bytes][u32 events][u8 json][u16 routing-key bytes][routing key][body]`
//! (little-endian). Records are appended at the tail segment and read from the head
//! segment; a segment is deleted once it has been read completely and every batch read from
//! it was confirmed by the broker. Leftover files of an earlier run are removed at start:
//! the write-ahead log, not the spool, is what survives a crash.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 8 << 20;
const HEADER_BYTES: usize = 4 + 4 + 1 + 2;

/// One spooled batch.
pub struct Record {
    pub json: bool,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub events: u32,
    /// The segment it was read from, to release once the broker confirms it.
    pub segment: u64,
}

struct Segment {
    id: u64,
    path: PathBuf,
    bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    writer: Option<(u64, BufWriter<File>)>,
    reader: Option<(u64, BufReader<File>)>,
    /// Batches read from each segment and not yet confirmed.
    unconfirmed: BTreeMap<u64, u64>,
    /// Segments read to their end (deleted once their batches are confirmed).
    read_done: Vec<u64>,
    /// Records written and not yet read.
    pending: u64,
    bytes: u64,
    bytes_max: u64,
    next_id: u64,
}

impl Spool {
    pub fn open(dir: &Path, bytes_max: u64) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            unconfirmed: BTreeMap::new(),
            read_done: Vec::new(),
            pending: 0,
            bytes: 0,
            bytes_max,
            next_id: 0,
        })
    }

    /// Records waiting to be read.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Bytes on disk (what Stats shows as spool bytes).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a record of `body_len` bytes fits under `cdc.spool_bytes_max`.
    pub fn has_room(&self, body_len: usize) -> bool {
        self.bytes + (HEADER_BYTES + body_len) as u64 + 256 <= self.bytes_max
    }

    pub fn append(&mut self, json: bool, routing_key: &str, body: &[u8], events: u32) -> io::Result<()> {
        let rotate = match (&self.writer, self.segments.back()) {
            (Some((w, _)), Some(last)) => last.id != *w || last.bytes >= SEGMENT_BYTES,
            _ => true,
        };
        if rotate {
            if let Some((_, mut w)) = self.writer.take() {
                w.flush()?;
            }
            let id = self.next_id;
            self.next_id += 1;
            let path = self.dir.join(format!("spool-{id:020}.log"));
            let file = OpenOptions::new().create_new(true).write(true).open(&path)?;
            self.segments.push_back(Segment { id, path, bytes: 0 });
            self.writer = Some((id, BufWriter::new(file)));
        }
        let (_, w) = self.writer.as_mut().expect("a segment is open for writing");
        let rk = routing_key.as_bytes();
        let rk_len = u16::try_from(rk.len()).map_err(|_| io::Error::other("routing key too long"))?;
        let body_len = u32::try_from(body.len()).map_err(|_| io::Error::other("batch too large to spool"))?;
        w.write_all(&body_len.to_le_bytes())?;
        w.write_all(&events.to_le_bytes())?;
        w.write_all(&[u8::from(json)])?;
        w.write_all(&rk_len.to_le_bytes())?;
        w.write_all(rk)?;
        w.write_all(body)?;
        let n = (HEADER_BYTES + rk.len() + body.len()) as u64;
        if let Some(last) = self.segments.back_mut() {
            last.bytes += n;
        }
        self.bytes += n;
        self.pending += 1;
        Ok(())
    }

    /// The oldest unread record.
    pub fn read(&mut self) -> io::Result<Option<Record>> {
        loop {
            if self.pending == 0 {
                self.retire_tail();
                return Ok(None);
            }
            if self.reader.is_none() {
                let Some(next) = self.segments.iter().find(|s| !self.read_done.contains(&s.id)) else {
                    return Ok(None);
                };
                let (id, path) = (next.id, next.path.clone());
                self.reader = Some((id, BufReader::new(File::open(path)?)));
            }
            let (id, _) = self.reader.as_ref().expect("reader opened above");
            let id = *id;
            // The reader must see whole records: flush what the writer buffered.
            if let Some((w, writer)) = self.writer.as_mut() {
                if *w == id {
                    writer.flush()?;
                }
            }
            let (_, r) = self.reader.as_mut().expect("reader opened above");
            let mut header = [0u8; HEADER_BYTES];
            match r.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    if self.writer.as_ref().is_some_and(|(w, _)| *w == id) {
                        return Ok(None); // nothing more written yet
                    }
                    self.reader = None;
                    self.read_done.push(id);
                    self.collect();
                    continue;
                }
                Err(e) => return Err(e),
            }
            let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
            let events = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let json = header[8] == 1;
            let rk_len = u16::from_le_bytes(header[9..11].try_into().expect("2 bytes")) as usize;
            let mut rk = vec![0u8; rk_len];
            r.read_exact(&mut rk)?;
            let mut body = vec![0u8; body_len];
            r.read_exact(&mut body)?;
            self.pending -= 1;
            *self.unconfirmed.entry(id).or_default() += 1;
            let routing_key = String::from_utf8(rk).map_err(|_| io::Error::other("spool: bad routing key"))?;
            return Ok(Some(Record {
                json,
                routing_key,
                body,
                events,
                segment: id,
            }));
        }
    }

    /// Everything written has been read: close the segment being written, so it can be
    /// deleted once confirmed (the next append starts a new one).
    fn retire_tail(&mut self) {
        let Some((id, _)) = self.reader.take() else { return };
        if self.writer.as_ref().is_some_and(|(w, _)| *w == id) {
            self.writer = None;
        }
        self.read_done.push(id);
        self.collect();
    }

    /// The broker confirmed a batch read from `segment`.
    pub fn confirmed(&mut self, segment: u64) {
        if let Some(n) = self.unconfirmed.get_mut(&segment) {
            *n = n.saturating_sub(1);
        }
        self.collect();
    }

    /// Deletes segments that are read completely and fully confirmed.
    fn collect(&mut self) {
        while let Some(front) = self.segments.front() {
            let id = front.id;
            let read = self.read_done.contains(&id);
            let open = self.unconfirmed.get(&id).copied().unwrap_or(0);
            if !read || open > 0 {
                break;
            }
            let seg = self.segments.pop_front().expect("front exists");
            self.bytes -= seg.bytes;
            self.unconfirmed.remove(&id);
            self.read_done.retain(|s| *s != id);
            if let Err(e) = std::fs::remove_file(&seg.path) {
                tracing::warn!(path = %seg.path.display(), error = %e, "cannot remove a spool segment");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: records come back in the order written, across segments, and segments are
    // deleted only once read and confirmed, returning the spool to zero bytes.
    #[test]
    fn fifo_across_segments_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let body = vec![7u8; 2 << 20];
        for i in 0..20u32 {
            spool
                .append(i % 2 == 0, &format!("n.{i}"), &body[..(i as usize + 1) * 100_000], i)
                .unwrap();
        }
        assert!(spool.bytes() > 0 && !spool.is_empty());
        let mut got = Vec::new();
        while let Some(r) = spool.read().unwrap() {
            assert_eq!(r.body.len(), (r.events as usize + 1) * 100_000);
            assert_eq!(r.json, r.events % 2 == 0);
            assert_eq!(r.routing_key, format!("n.{}", r.events));
            got.push((r.events, r.segment));
        }
        assert_eq!(
            got.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
        assert!(
            got.last().unwrap().1 >= 2,
            "21 MB of records span several 8 MiB segments"
        );
        // Appending after reading everything continues the order.
        spool.append(false, "n.20", b"x", 20).unwrap();
        let last = spool.read().unwrap().unwrap();
        assert_eq!(last.events, 20);
        got.push((20, last.segment));
        for (_, seg) in got {
            spool.confirmed(seg);
        }
        assert!(spool.read().unwrap().is_none());
        assert_eq!(
            (spool.segments.len(), spool.bytes()),
            (0, 0),
            "every segment read and confirmed is deleted"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    // Goal: the size limit is checked before a write.
    #[test]
    fn room_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10_000).unwrap();
        assert!(spool.has_room(5_000));
        spool.append(false, "k", &[0u8; 5_000], 1).unwrap();
        assert!(!spool.has_room(5_000));
    }
}
