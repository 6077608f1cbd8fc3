//! The per-core log writer task (glommio direct I/O).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use glommio::io::DmaFile;

use super::Recorder;
use crate::cdc::replay::segment_name;
use crate::config::Fsync;

const EVERYSEC: Duration = Duration::from_secs(1);

/// A closed segment of this run: its file, where it starts in the run's log, its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub path: PathBuf,
    pub start: u64,
    pub bytes: u64,
}

impl Closed {
    /// Offset in the run's log just past its last record.
    pub fn end(&self) -> u64 {
        self.start + self.bytes
    }
}

/// What the core's other tasks see of its log.
pub struct WalState {
    pub fsync: Fsync,
    /// Records known durable (fsync = always) or handed to the file (otherwise).
    durable: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    closing: Cell<bool>,
    /// Bytes written since start (Stats).
    pub bytes: Cell<u64>,
    failed: Cell<bool>,
    /// Where this core's segments go and how they are named: `<run_ms>-core<i>-<start>.log`
    /// (see `cdc::replay`).
    dir: PathBuf,
    name: String,
    /// Bytes in the segment being written.
    segment_bytes: Cell<u64>,
    /// Segments of this run that are closed and not yet covered by a snapshot.
    closed: RefCell<Vec<Closed>>,
    /// With change capture on and fsync everysec or no: sync at least this often while
    /// records are unsynced, because their events wait for it.
    capture_sync: Option<Duration>,
    /// A snapshot asked for a new segment; its waker is woken once the writer switched.
    rotate: Cell<bool>,
    rotated: RefCell<Option<Waker>>,
}

impl WalState {
    /// `name` is unique to this core and run; segments are `<name>-<start>.log` in `dir`.
    /// `capture_sync` is how often change capture needs the log synced (None: capture off).
    pub fn new(fsync: Fsync, dir: PathBuf, name: String, capture_sync: Option<Duration>) -> Rc<WalState> {
        Rc::new(WalState {
            fsync,
            durable: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            closing: Cell::new(false),
            bytes: Cell::new(0),
            failed: Cell::new(false),
            dir,
            name,
            segment_bytes: Cell::new(0),
            closed: RefCell::new(Vec::new()),
            capture_sync: capture_sync.filter(|_| fsync != Fsync::Always),
            rotate: Cell::new(false),
            rotated: RefCell::new(None),
        })
    }

    fn segment_path(&self, start: u64) -> PathBuf {
        self.dir.join(segment_name(&self.name, start))
    }

    /// True once a write failed: nothing more reaches the log.
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Bytes in this core's log files of this run (what a snapshot would let go).
    pub fn log_bytes(&self) -> u64 {
        self.segment_bytes.get() + self.closed.borrow().iter().map(|c| c.bytes).sum::<u64>()
    }

    /// Closes the current segment and starts a new one. Every record appended before the
    /// call is in the segments returned (all closed segments not yet released), which a
    /// snapshot of every shard taken afterwards covers.
    pub async fn rotate(&self, recorder: &RefCell<Recorder>) -> std::io::Result<Vec<Closed>> {
        self.rotate.set(true);
        recorder.borrow_mut().wake_writer();
        std::future::poll_fn(|cx| {
            if self.failed.get() || self.closing.get() {
                return Poll::Ready(Err(std::io::Error::other("the write-ahead log is closed or failed")));
            }
            if !self.rotate.get() {
                return Poll::Ready(Ok(()));
            }
            *self.rotated.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await?;
        Ok(self.closed.borrow().clone())
    }

    /// Forgets segments a snapshot now covers (the caller deletes them, or keeps them for
    /// change capture until it has them confirmed).
    pub fn release(&self, segments: &[Closed]) {
        self.closed.borrow_mut().retain(|s| !segments.contains(s));
    }

    /// Resolves once the first `generation` records are durable (only `fsync = always`
    /// waits; the other policies acknowledge at once). Returns false if the log failed:
    /// the caller must not acknowledge.
    pub async fn durable(&self, generation: u64) -> bool {
        if self.fsync != Fsync::Always {
            return !self.failed.get();
        }
        std::future::poll_fn(|cx| {
            if self.failed.get() {
                return Poll::Ready(false);
            }
            if self.durable.get() >= generation {
                return Poll::Ready(true);
            }
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn advance(&self, generation: u64) {
        self.durable.set(generation);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Asks the writer to write and sync what is left, then stop.
    pub fn close(&self) {
        self.closing.set(true);
    }
}

/// Writes the core's log until closed. `recorder` holds the pending records, and the
/// change events waiting for them to be synced.
pub async fn run(state: Rc<WalState>, recorder: &RefCell<Recorder>) {
    if let Err(e) = write_loop(&state, recorder).await {
        tracing::error!(dir = %state.dir.display(), log = %state.name, error = %e, "write-ahead log failed; writes are no longer acknowledged as durable");
        state.failed.set(true);
        for w in state.waiters.borrow_mut().drain(..) {
            w.wake();
        }
        if let Some(w) = state.rotated.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Direct-I/O block size: every write starts and ends on it.
const BLOCK_BYTES: usize = 4096;
/// Largest single write; a bigger round is written in pieces of this size.
const WRITE_BYTES_MAX: usize = 1 << 20;

/// One log segment, written with direct I/O in whole blocks: each write covers the
/// unfinished last block again plus the new records, zero-padded to the block size, so
/// whatever lies past the last record on disk is zeros (recovery's end marker) and a sync
/// costs one small write. (glommio's DmaStreamWriter pads a sync with its whole buffer,
/// 128 KiB here, and the padding is not zeroed.)
struct Segment {
    file: DmaFile,
    /// File offset of `tail`'s first byte (block-aligned); everything before is written.
    tail_at: u64,
    /// Records in the unfinished last block.
    tail: Vec<u8>,
}

impl Segment {
    /// `fsync = always` opens the file O_DSYNC: a write completes once it is durable, so
    /// no separate fdatasync is needed.
    async fn create(path: &std::path::Path, dsync: bool) -> std::io::Result<Segment> {
        let file = glommio::io::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(if dsync { libc::O_DSYNC } else { 0 })
            .dma_open(path)
            .await?;
        Ok(Segment {
            file,
            tail_at: 0,
            tail: Vec::with_capacity(BLOCK_BYTES),
        })
    }

    async fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let take = data.len().min(WRITE_BYTES_MAX);
            let len = self.tail.len() + take;
            let padded = len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            let mut buf = self.file.alloc_dma_buffer(padded);
            let b = buf.as_bytes_mut();
            b[..self.tail.len()].copy_from_slice(&self.tail);
            b[self.tail.len()..len].copy_from_slice(&data[..take]);
            b[len..].fill(0);
            // The unfinished last block is written again, with more, next time.
            let full = len / BLOCK_BYTES * BLOCK_BYTES;
            let next_tail = b[full..len].to_vec();
            let written = self.file.write_at(buf, self.tail_at).await?;
            if written != padded {
                return Err(std::io::Error::other(format!(
                    "short write: {written} of {padded} bytes at offset {}",
                    self.tail_at
                )));
            }
            self.tail = next_tail;
            self.tail_at += full as u64;
            data = &data[take..];
        }
        Ok(())
    }

    async fn sync(&self) -> std::io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    /// Syncs, cuts the zero padding off, and closes.
    async fn close(self) -> std::io::Result<()> {
        self.file.fdatasync().await?;
        self.file.truncate(self.tail_at + self.tail.len() as u64).await?;
        self.file.close().await?;
        Ok(())
    }
}

async fn write_loop(state: &WalState, recorder: &RefCell<Recorder>) -> std::io::Result<()> {
    let dsync = state.fsync == Fsync::Always;
    // Offset in this run's log of the next byte written, and of the segment's first.
    let mut written = 0u64;
    let mut path = state.segment_path(written);
    let mut writer = Segment::create(&path, dsync).await?;
    let mut spare = Vec::new();
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    let sync_every = match (state.fsync, state.capture_sync) {
        (Fsync::Always, _) => None,
        (_, Some(capture)) => Some(capture.min(EVERYSEC)),
        (Fsync::Everysec, None) => Some(EVERYSEC),
        (Fsync::No, None) => None,
    };
    loop {
        // Wait for records, or for the next timed sync.
        let wait = std::pin::pin!(std::future::poll_fn(|cx| {
            let mut r = recorder.borrow_mut();
            match r.log.as_mut() {
                Some(buf) if buf.pending.is_empty() && !state.closing.get() && !state.rotate.get() => {
                    buf.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        }));
        match sync_every {
            Some(every) if unsynced => {
                // Written but not yet synced: wake for the sync even if no record comes.
                let due = every.saturating_sub(last_sync.elapsed()).max(Duration::from_millis(1));
                let tick = std::pin::pin!(glommio::timer::sleep(due));
                if let Either::Right(_) = select(wait, tick).await {
                    if let Some(buf) = recorder.borrow_mut().log.as_mut() {
                        buf.writer = None;
                    }
                }
            }
            _ => wait.await,
        }
        let (data, generation) = {
            let mut r = recorder.borrow_mut();
            let Some(buf) = r.log.as_mut() else { return Ok(()) };
            std::mem::swap(&mut buf.pending, &mut spare);
            (std::mem::take(&mut spare), buf.appended)
        };
        // Every round is written at once, whatever the policy, so a process crash loses
        // at most the last round; the policy only decides when the device must persist it.
        if !data.is_empty() {
            writer.append(&data).await?;
            written += data.len() as u64;
            state.bytes.set(state.bytes.get() + data.len() as u64);
            state.segment_bytes.set(state.segment_bytes.get() + data.len() as u64);
            unsynced = !dsync;
        }
        spare = data;
        spare.clear();
        let sync_now = unsynced && sync_every.is_some_and(|every| last_sync.elapsed() >= every);
        if sync_now || (state.closing.get() && unsynced) {
            writer.sync().await?;
            last_sync = Instant::now();
            unsynced = false;
        }
        state.advance(generation);
        if !unsynced {
            // Every record written so far is durable: its change event may go out.
            if let Some(q) = recorder.borrow_mut().capture.as_mut() {
                q.release(written);
            }
        }
        if state.rotate.get() && !state.closing.get() {
            // Everything taken so far is written; close (which syncs) and start the next. A
            // segment with nothing in it stays open: every record is already in the closed
            // ones, and its successor would have its name (segments are named by offset).
            if state.segment_bytes.get() > 0 {
                writer.close().await?;
                let bytes = state.segment_bytes.replace(0);
                state.closed.borrow_mut().push(Closed {
                    path,
                    start: written - bytes,
                    bytes,
                });
                if let Some(q) = recorder.borrow_mut().capture.as_mut() {
                    q.release(written);
                }
                path = state.segment_path(written);
                writer = Segment::create(&path, dsync).await?;
                unsynced = false;
            }
            state.rotate.set(false);
            if let Some(w) = state.rotated.borrow_mut().take() {
                w.wake();
            }
        }
        let drained = recorder.borrow().log.as_ref().is_none_or(|b| b.pending.is_empty());
        if state.closing.get() && drained && !unsynced {
            writer.close().await?;
            return Ok(());
        }
    }
}
