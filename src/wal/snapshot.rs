//! Per-shard snapshots and log compaction.
//!
//! A snapshot holds one shard's live keys as of one change seq, in the log's record format
//! behind a small header:
//!
//! ```text
//! "FLUXSNP1" | u32 shard | u32 shards | u64 seq | u64 keys | u64 written_at_ms | u32 crc32c
//! then `keys` SET records (record.rs), each carrying the snapshot's seq
//! ```
//!
//! Each core snapshots its own shards in the background when its log outgrows both
//! `persistence.snapshot_log_bytes_min` and its last snapshot (so rewriting stays within a
//! constant factor of the writes), and on request (Snapshot request, SIGUSR1). A round:
//! 1. the log writer starts a new segment; every record before that point is in the closed
//!    segments;
//! 2. shard by shard, a consistent copy of the entries (shared handles, no value copies) is
//!    written to `shard-<id>.snap.tmp`, synced, and renamed over the previous snapshot;
//! 3. the directory is synced, then the closed segments are deleted: every record in them
//!    has a seq at or below its shard's new snapshot. With change capture on, a segment
//!    that still holds changes the broker has not confirmed (per the checkpoint on disk) is
//!    kept until they are: the log is capture's spool.
//!
//! Logs of earlier runs (which may hold any core's shards after a core-count change) go
//! once every core has finished its first round and change capture has them confirmed. A
//! crash at any point leaves either the old snapshot or the new one, and every log record a
//! snapshot or the checkpoint does not cover.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::io::AsyncWriteExt;
use glommio::io::{DmaFile, DmaStreamWriterBuilder};

use super::record::{self, Fields};
use super::writer::{Closed, WalState};
use super::Recorder;
use crate::cdc::{CdcCounters, CoreLink};
use crate::change::{now_ms, ChangeOp};
use crate::shard::CoreStore;

const MAGIC: &[u8; 8] = b"FLUXSNP1";
pub const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 8 + 4;
/// Encoded bytes handed to the file at a time, so a large shard never needs its whole
/// snapshot in memory twice.
const CHUNK_BYTES: usize = 1 << 20;
const WRITER_BUFFER_BYTES: usize = 512 << 10;
/// How often each core checks whether its log has grown enough for a snapshot.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The fixed part of a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub shard: u32,
    /// The node's shard count when written: a snapshot is only valid for the same count.
    pub shards: u32,
    /// Every change of the shard up to this seq is in the snapshot.
    pub seq: u64,
    pub keys: u64,
    pub written_at_ms: u64,
}

impl Header {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.shards.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.keys.to_le_bytes());
        out.extend_from_slice(&self.written_at_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[at..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(data: &[u8]) -> Result<Header, String> {
        let Some(h) = data.get(..HEADER_BYTES) else {
            return Err("shorter than a snapshot header".into());
        };
        if &h[..8] != MAGIC {
            return Err("not a snapshot (bad magic)".into());
        }
        let crc = u32::from_le_bytes(h[HEADER_BYTES - 4..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&h[..HEADER_BYTES - 4]) != crc {
            return Err("header checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            shard: u32_at(8),
            shards: u32_at(12),
            seq: u64_at(16),
            keys: u64_at(24),
            written_at_ms: u64_at(32),
        })
    }
}

/// The file holding `shard`'s snapshot.
pub fn file_name(shard: u32) -> String {
    format!("shard-{shard:05}.snap")
}

/// Logs of earlier runs, deleted once every core has written its first snapshot round and
/// change capture (when on) has every change in them confirmed.
pub struct OldLogs {
    files: Vec<PathBuf>,
    /// Cores that have not finished their first round yet.
    cores_left: AtomicUsize,
    deleted: std::sync::atomic::AtomicBool,
    /// Each core's share of their bytes, counted towards its first snapshot trigger, so old
    /// logs never pile up across restarts.
    pub bytes_per_core: u64,
}

impl OldLogs {
    pub fn new(files: Vec<PathBuf>, bytes: u64, cores: u32) -> Arc<OldLogs> {
        Arc::new(OldLogs {
            files,
            cores_left: AtomicUsize::new(cores as usize),
            deleted: std::sync::atomic::AtomicBool::new(false),
            bytes_per_core: bytes / u64::from(cores.max(1)),
        })
    }

    /// Called once by each core after its first round.
    fn core_done(&self) {
        self.cores_left.fetch_sub(1, Ordering::AcqRel);
    }

    /// Deletes the files once every core has snapshotted and `confirmed` (change capture
    /// needs nothing in them any more); returns their bytes the one time it does.
    fn delete_when_done(&self, core: u32, confirmed: bool) -> u64 {
        if !confirmed || self.cores_left.load(Ordering::Acquire) != 0 || self.deleted.swap(true, Ordering::AcqRel) {
            return 0;
        }
        let mut released = 0;
        for f in &self.files {
            let bytes = std::fs::metadata(f).map_or(0, |m| m.len());
            match std::fs::remove_file(f) {
                Ok(()) => released += bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(core, file = %f.display(), error = %e, "cannot delete an old log"),
            }
        }
        if !self.files.is_empty() {
            tracing::info!(core, files = self.files.len(), "logs of earlier runs deleted");
        }
        released
    }
}

/// A shard's snapshot as recovery found it (all zero: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Loaded {
    pub seq: u64,
    pub bytes: u64,
    pub written_at_ms: u64,
}

/// What one snapshot round wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub shards: u64,
    pub keys: u64,
    pub bytes: u64,
    pub millis: u64,
    /// Log bytes deleted after the round.
    pub log_bytes_released: u64,
}

/// A file of a backup as one core staged it: its path relative to the backup directory
/// and the bytes of it that belong to the backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub name: String,
    pub bytes: u64,
}

/// One core's part of a backup (see `server/backup.rs`). After a round its snapshots are
/// staged and reported; then, once every core holds its writes, the coordinator sends
/// where this core's log is cut, and the log up to there is staged and reported.
pub struct BackupPart {
    pub dir: PathBuf,
    pub snapshots: oneshot::Sender<Result<Vec<Staged>, String>>,
    /// Offset in this run's log to cut at; dropped when the backup is abandoned.
    pub cut: oneshot::Receiver<u64>,
    pub log: oneshot::Sender<Result<Vec<Staged>, String>>,
}

/// Who waits for the next round: a Snapshot request, or a backup's part.
enum Waiting {
    Round(oneshot::Sender<Result<Report, String>>),
    Backup(BackupPart),
}

/// What change capture still needs from the log (absent: capture is off).
pub struct CaptureHold {
    pub link: Arc<CoreLink>,
    pub counters: Arc<CdcCounters>,
}

/// One core's snapshot state, shared by its tasks.
pub struct Snapshots {
    dir: PathBuf,
    log_bytes_min: u64,
    old: Arc<OldLogs>,
    capture: Option<CaptureHold>,
    /// Segments a snapshot covers that still hold changes the broker has not confirmed.
    covered: RefCell<Vec<Closed>>,
    first_done: Cell<bool>,
    requests: RefCell<Vec<Waiting>>,
    waker: RefCell<Option<Waker>>,
    /// Set at shutdown: the task stops between two shards, never inside a file's write
    /// (glommio's stream writer panics when dropped while it closes).
    closing: Cell<bool>,
    /// Unix ms of the oldest shard snapshot this core relies on (0: none).
    pub taken_at_ms: Cell<u64>,
    /// Per shard of this core (local index): (seq, bytes) of its current snapshot. A shard
    /// whose seq has not moved since is not written again.
    shards: RefCell<Vec<(u64, u64)>>,
    /// Size of this core's snapshots.
    pub bytes: Cell<u64>,
    /// Rounds completed since start.
    pub rounds: Cell<u64>,
}

impl Snapshots {
    /// `loaded` is what recovery found for this core's shards, in local order.
    pub fn new(
        dir: PathBuf,
        log_bytes_min: u64,
        old: Arc<OldLogs>,
        capture: Option<CaptureHold>,
        loaded: Vec<Loaded>,
    ) -> Rc<Snapshots> {
        let taken_at_ms = loaded
            .iter()
            .map(|l| l.written_at_ms)
            .filter(|t| *t > 0)
            .min()
            .unwrap_or(0);
        let bytes = loaded.iter().map(|l| l.bytes).sum();
        Rc::new(Snapshots {
            dir,
            log_bytes_min,
            old,
            capture,
            covered: RefCell::new(Vec::new()),
            first_done: Cell::new(false),
            requests: RefCell::new(Vec::new()),
            waker: RefCell::new(None),
            closing: Cell::new(false),
            taken_at_ms: Cell::new(taken_at_ms),
            shards: RefCell::new(loaded.iter().map(|l| (l.seq, l.bytes)).collect()),
            bytes: Cell::new(bytes),
            rounds: Cell::new(0),
        })
    }

    /// Asks for a round now; the reply comes when a round that started after the call ends.
    pub fn request(&self) -> oneshot::Receiver<Result<Report, String>> {
        let (tx, rx) = oneshot::channel();
        self.ask(Waiting::Round(tx));
        rx
    }

    /// Asks for a round now, after which the core's part of a backup is staged (see
    /// [`BackupPart`]). No other round runs on this core until the part is done, so the
    /// log segment the round began is still the one being written at the cut.
    pub fn request_backup(&self, part: BackupPart) {
        self.ask(Waiting::Backup(part));
    }

    fn ask(&self, w: Waiting) {
        self.requests.borrow_mut().push(w);
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Asks the task to stop: at once when idle, after the shard being written otherwise
    /// (the round then fails and the log keeps everything). Await the task after this.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake();
    }

    /// Resolves once [`Snapshots::close`] was called.
    async fn closed(&self) {
        std::future::poll_fn(|cx| {
            if self.closing.get() {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Milliseconds since the oldest snapshot this core relies on; -1 when there is none.
    pub fn age_ms(&self) -> i64 {
        match self.taken_at_ms.get() {
            0 => -1,
            t => now_ms().saturating_sub(t) as i64,
        }
    }

    /// Deletes covered segments (and old logs) change capture no longer needs; returns the
    /// bytes released.
    async fn release_confirmed(&self, core: u32) -> u64 {
        let below = self
            .capture
            .as_ref()
            .map_or(u64::MAX, |c| c.link.release_below.load(Ordering::Acquire));
        let done: Vec<Closed> = {
            let mut covered = self.covered.borrow_mut();
            let (done, keep) = covered.drain(..).partition(|c| c.end() <= below);
            *covered = keep;
            done
        };
        let mut released = 0;
        for c in done {
            match glommio::io::remove(&c.path).await {
                Ok(()) => released += c.bytes,
                Err(e) => tracing::warn!(core, file = %c.path.display(), error = %e, "cannot delete a log segment"),
            }
        }
        let confirmed = self
            .capture
            .as_ref()
            .is_none_or(|c| c.counters.old_logs_released.load(Ordering::Acquire));
        released + self.old.delete_when_done(core, confirmed)
    }

    /// Log bytes kept only because change capture has not had them confirmed.
    pub fn held_bytes(&self) -> u64 {
        self.covered.borrow().iter().map(|c| c.bytes).sum()
    }

    fn due(&self, wal: &WalState) -> bool {
        let old = if self.first_done.get() {
            0
        } else {
            self.old.bytes_per_core
        };
        // A failed log grows no more; its error is reported once, not by a round a second.
        !wal.failed() && wal.log_bytes() + old >= self.log_bytes_min.max(self.bytes.get())
    }
}

/// Snapshots the core's shards whenever its log has grown enough or a round was requested.
/// Runs until the core drops it at shutdown (an unfinished round leaves only a `.tmp`).
pub async fn run(
    snaps: Rc<Snapshots>,
    wal: Rc<WalState>,
    store: &RefCell<CoreStore>,
    recorder: &RefCell<Recorder>,
    signals: Arc<AtomicU64>,
) {
    let mut seen_signals = signals.load(Ordering::Acquire);
    let core = store.borrow().core();
    loop {
        snaps.release_confirmed(core).await;
        // Wait for a request, or look at the log size now and then.
        let tick = std::pin::pin!(glommio::timer::sleep(CHECK_INTERVAL));
        let asked = std::future::poll_fn(|cx| {
            if !snaps.requests.borrow().is_empty() || snaps.closing.get() {
                return Poll::Ready(());
            }
            *snaps.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        futures::future::select(tick, std::pin::pin!(asked)).await;
        if snaps.closing.get() {
            // Waiting requests get an error; backup parts are dropped (their coordinator
            // sees the core stopping).
            for w in std::mem::take(&mut *snaps.requests.borrow_mut()) {
                if let Waiting::Round(tx) = w {
                    let _ = tx.send(Err("the core is shutting down".into()));
                }
            }
            return;
        }
        // `signals` counts SIGUSR1s for the whole node.
        let now_signals = signals.load(Ordering::Acquire);
        let signalled = std::mem::replace(&mut seen_signals, now_signals) != now_signals;
        if snaps.requests.borrow().is_empty() && !signalled && !snaps.due(&wal) {
            continue;
        }
        let waiting = std::mem::take(&mut *snaps.requests.borrow_mut());
        let result = round(&snaps, &wal, store, recorder).await;
        match &result {
            Ok(r) => tracing::info!(
                core = store.borrow().core(),
                shards = r.shards,
                keys = r.keys,
                bytes = r.bytes,
                millis = r.millis,
                log_bytes_released = r.log_bytes_released,
                "snapshot written"
            ),
            Err(e) => tracing::error!(core = store.borrow().core(), error = %e, "snapshot failed; the log is kept"),
        }
        for w in waiting {
            match w {
                Waiting::Round(tx) => {
                    let _ = tx.send(result.clone());
                }
                Waiting::Backup(part) => backup_part(&snaps, &wal, store, result.clone(), part).await,
            }
        }
        if result.is_err() {
            // Do not retry in a tight loop on a persistent error (disk full).
            glommio::timer::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn round(
    snaps: &Snapshots,
    wal: &WalState,
    store: &RefCell<CoreStore>,
    recorder: &RefCell<Recorder>,
) -> Result<Report, String> {
    let started = Instant::now();
    let segments = wal
        .rotate(recorder)
        .await
        .map_err(|e| format!("cannot start a new log segment: {e}"))?;
    let (keyspace, core) = {
        let s = store.borrow();
        (*s.keyspace(), s.core())
    };
    let mut report = Report::default();
    let round_at = now_ms();
    for (i, shard) in keyspace.shards_of_core(core).enumerate() {
        if snaps.closing.get() {
            return Err("the core is shutting down; the log keeps everything".into());
        }
        let (last_seq, _) = snaps.shards.borrow()[i];
        if store.borrow().shard_seq(shard) == last_seq {
            continue; // unchanged since its snapshot (or never written to)
        }
        let taken_at = now_ms();
        let snap = store.borrow().entries(shard);
        let header = Header {
            shard,
            shards: keyspace.shards(),
            seq: snap.seq,
            keys: snap.entries.len() as u64,
            written_at_ms: taken_at,
        };
        let bytes = write_shard(&snaps.dir, &header, &snap.entries).await.map_err(|e| {
            format!(
                "cannot write the snapshot of shard {shard} in {}: {e}",
                snaps.dir.display()
            )
        })?;
        snaps.shards.borrow_mut()[i] = (header.seq, bytes);
        report.bytes += bytes;
        report.keys += header.keys;
        report.shards += 1;
    }
    sync_dir(&snaps.dir)
        .await
        .map_err(|e| format!("cannot sync {}: {e}", snaps.dir.display()))?;
    // The snapshots are durable: the segments closed before the round are covered; they
    // go as soon as change capture has their changes confirmed (at once when it is off).
    wal.release(&segments);
    snaps.covered.borrow_mut().extend(segments);
    if !snaps.first_done.replace(true) {
        snaps.old.core_done();
    }
    report.log_bytes_released += snaps.release_confirmed(core).await;
    snaps.taken_at_ms.set(round_at);
    snaps.bytes.set(snaps.shards.borrow().iter().map(|(_, b)| b).sum());
    snaps.rounds.set(snaps.rounds.get() + 1);
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// How long a backup's part waits for the log writer to reach the cut.
const CUT_WRITE_WAIT: Duration = Duration::from_secs(30);

/// Stages this core's part of a backup after `round`: its snapshots, then its log up to
/// the cut the coordinator sends.
async fn backup_part(
    snaps: &Snapshots,
    wal: &WalState,
    store: &RefCell<CoreStore>,
    round: Result<Report, String>,
    part: BackupPart,
) {
    let dir = &part.dir;
    let failed = |e: std::io::Error| format!("cannot stage the backup in {}: {e}", dir.display());
    let snapshots = round.and_then(|_| {
        let s = store.borrow();
        stage_snapshots(&snaps.dir, s.keyspace(), s.core(), dir).map_err(failed)
    });
    let staged = snapshots.is_ok();
    let _ = part.snapshots.send(snapshots);
    if !staged {
        return;
    }
    // Dropped: another core failed, or the client went away; or the core stops.
    let cut = match futures::future::select(part.cut, std::pin::pin!(snaps.closed())).await {
        futures::future::Either::Left((Ok(cut), _)) => cut,
        _ => return,
    };
    let started = Instant::now();
    while wal.bytes.get() < cut {
        if wal.failed() || started.elapsed() > CUT_WRITE_WAIT {
            let _ = part.log.send(Err(format!(
                "the write-ahead log did not reach the backup's cut: {}",
                wal.error().unwrap_or_else(|| "too slow".into())
            )));
            return;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let _ = part.log.send(stage_log(wal, cut, dir).map_err(failed));
}

/// Stages hard links to core `core`'s shards' snapshots in `dir/snapshots`, right after a
/// round (a later round renames a new file over the name, never writes into the linked
/// one, and a link keeps the file when compaction deletes the name).
fn stage_snapshots(
    snap_dir: &Path,
    keyspace: &crate::keyspace::Keyspace,
    core: u32,
    dir: &Path,
) -> std::io::Result<Vec<Staged>> {
    let snap_out = dir.join("snapshots");
    std::fs::create_dir_all(&snap_out)?;
    let mut staged = Vec::new();
    for shard in keyspace.shards_of_core(core) {
        let name = file_name(shard);
        let to = snap_out.join(&name);
        match std::fs::hard_link(snap_dir.join(&name), &to) {
            Ok(()) => {}
            // A shard never written to has no snapshot, and nothing in the log.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        staged.push(Staged {
            name: format!("snapshots/{name}"),
            bytes: std::fs::metadata(&to)?.len(),
        });
    }
    Ok(staged)
}

/// Stages a hard link to the active log segment in `dir/wal`, with its bytes up to `cut`
/// (an offset in this run's log the writer has reached). The segment began with the round
/// before, so with the snapshots it holds every change up to the cut; the writer only
/// adds bytes past what it wrote (it rewrites its last block with the same leading bytes).
fn stage_log(wal: &WalState, cut: u64, dir: &Path) -> std::io::Result<Vec<Staged>> {
    let (segment, written) = wal.active_segment();
    let start = wal.bytes.get() - written;
    if cut < start {
        return Err(std::io::Error::other(format!(
            "the cut at {cut} lies before the active segment, which starts at {start}"
        )));
    }
    if cut == start {
        return Ok(Vec::new());
    }
    let wal_out = dir.join("wal");
    std::fs::create_dir_all(&wal_out)?;
    let name = segment
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("log segment {} has no file name", segment.display())))?;
    std::fs::hard_link(&segment, wal_out.join(name))?;
    Ok(vec![Staged {
        name: format!("wal/{name}"),
        bytes: cut - start,
    }])
}

/// Writes one shard's snapshot next to the old one, then renames it into place. A failed
/// write (a full disk) removes its temporary file: it would hold space the node needs.
async fn write_shard(dir: &Path, header: &Header, entries: &[(crate::shard::Item, u64)]) -> std::io::Result<u64> {
    let path = dir.join(file_name(header.shard));
    let tmp = path.with_extension("snap.tmp");
    let written = write_tmp(&tmp, header, entries).await;
    match written {
        Ok(total) => {
            glommio::io::rename(&tmp, &path).await?;
            Ok(total)
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_file(&tmp) {
                tracing::warn!(file = %tmp.display(), error = %rm, "cannot remove an unfinished snapshot");
            }
            Err(e)
        }
    }
}

/// Writes and syncs a shard's snapshot to `tmp`; returns its bytes.
async fn write_tmp(tmp: &Path, header: &Header, entries: &[(crate::shard::Item, u64)]) -> std::io::Result<u64> {
    let file = DmaFile::create(tmp).await?;
    let mut w = DmaStreamWriterBuilder::new(file)
        .with_buffer_size(WRITER_BUFFER_BYTES)
        .build();
    let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
    header.encode(&mut buf);
    let mut total = 0u64;
    for (item, expire_at_ms) in entries {
        let fields = Fields {
            shard: header.shard,
            seq: header.seq,
            op: ChangeOp::Set,
            expire_at_ms: *expire_at_ms,
            key: item.key(),
            value: item.value(),
        };
        record::encode_fields(&fields, &mut buf);
        if buf.len() >= CHUNK_BYTES {
            w.write_all(&buf).await?;
            total += buf.len() as u64;
            buf.clear();
        }
    }
    w.write_all(&buf).await?;
    total += buf.len() as u64;
    // close() syncs the data before it returns. A failed close leaves glommio's writer
    // without its file but still meaning to truncate it, and its drop then panics (the
    // core with it): leak the writer instead. It is rare (a full disk or an I/O error at
    // the final flush), and the round is retried later.
    if let Err(e) = w.close().await {
        std::mem::forget(w);
        return Err(e);
    }
    Ok(total)
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    glommio::io::Directory::open(dir).await?.sync().await?;
    Ok(())
}

/// Deletes snapshots a crash left half-written.
pub fn remove_unfinished(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.to_string_lossy().ends_with(".snap.tmp") {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the header round-trips and any flipped bit in it is caught.
    #[test]
    fn header_round_trip_and_damage() {
        let h = Header {
            shard: 7,
            shards: 256,
            seq: 1 << 40,
            keys: 12345,
            written_at_ms: 1_700_000_000_000,
        };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        assert_eq!(buf.len(), HEADER_BYTES);
        assert_eq!(Header::decode(&buf), Ok(h));
        for i in 0..HEADER_BYTES {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {i} not caught");
        }
        assert!(Header::decode(&buf[..HEADER_BYTES - 1]).is_err());
    }
}
