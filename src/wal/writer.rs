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
    /// How long each sync took: the O_DSYNC write with fsync = always, the fdatasync
    /// otherwise (metrics).
    pub sync_latency: crate::metrics::LatencyCells,
    /// The last error while the log cannot be written (the core refuses writes meanwhile);
    /// cleared by the first write that succeeds again.
    error: RefCell<Option<String>>,
    retry_interval: Duration,
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
    /// `retry_interval` is how often a failed log operation is tried again.
    pub fn new(
        fsync: Fsync,
        dir: PathBuf,
        name: String,
        capture_sync: Option<Duration>,
        retry_interval: Duration,
    ) -> Rc<WalState> {
        Rc::new(WalState {
            fsync,
            durable: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            closing: Cell::new(false),
            bytes: Cell::new(0),
            sync_latency: Default::default(),
            error: RefCell::new(None),
            retry_interval,
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

    /// True while the log cannot be written: the core refuses writes until it can.
    pub fn failed(&self) -> bool {
        self.error.borrow().is_some()
    }

    /// The error that made the log fail, while it is failed.
    pub fn error(&self) -> Option<String> {
        self.error.borrow().clone()
    }

    /// A log operation failed: refuse writes from now on, fail whoever waits for
    /// durability, then wait before the next try. Gives up (returns the error) only when
    /// the log is closing, since nobody will wait for it any more.
    async fn failed_attempt(&self, what: &str, e: std::io::Error) -> std::io::Result<()> {
        if !self.failed() {
            tracing::error!(
                dir = %self.dir.display(),
                log = %self.name,
                error = %e,
                retry_interval_ms = self.retry_interval.as_millis() as u64,
                "write-ahead log failed to {what}; the core is read-only (writes get STORAGE_UNAVAILABLE) until the log can be written again"
            );
        }
        *self.error.borrow_mut() = Some(format!("cannot {what}: {e}"));
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
        if let Some(w) = self.rotated.borrow_mut().take() {
            w.wake();
        }
        if self.closing.get() {
            return Err(e);
        }
        glommio::timer::sleep(self.retry_interval).await;
        Ok(())
    }

    /// A log operation succeeded: if the log had failed, it is writable again.
    fn succeeded(&self) {
        if self.error.borrow_mut().take().is_some() {
            tracing::info!(dir = %self.dir.display(), log = %self.name, "write-ahead log writable again; the core accepts writes");
        }
    }

    /// The segment being written and the bytes written to it so far (the bytes of the
    /// run's log written before it are in earlier segments).
    pub fn active_segment(&self) -> (PathBuf, u64) {
        let bytes = self.segment_bytes.get();
        (self.segment_path(self.bytes.get() - bytes), bytes)
    }

    /// Bytes in this core's log files of this run (what a snapshot would let go).
    pub fn log_bytes(&self) -> u64 {
        self.segment_bytes.get() + self.closed.borrow().iter().map(|c| c.bytes).sum::<u64>()
    }

    /// Closes the current segment and starts a new one. Every record appended before the
    /// call is in the segments returned (all closed segments not yet released), which a
    /// snapshot of every shard taken afterwards covers.
    pub async fn rotate(&self, recorder: &RefCell<Recorder>) -> std::io::Result<Vec<Closed>> {
        if self.failed() {
            return Err(std::io::Error::other("the write-ahead log is failing"));
        }
        self.rotate.set(true);
        recorder.borrow_mut().wake_writer();
        std::future::poll_fn(|cx| {
            if self.failed() || self.closing.get() {
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
    /// waits; the other policies acknowledge at once). Returns false if the log is failing
    /// before they are: the caller must not acknowledge them (the writer still logs them
    /// once it can).
    pub async fn durable(&self, generation: u64) -> bool {
        if self.fsync != Fsync::Always {
            return !self.failed();
        }
        std::future::poll_fn(|cx| {
            if self.durable.get() >= generation {
                return Poll::Ready(true);
            }
            if self.failed() {
                return Poll::Ready(false);
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

/// Retries a log operation (`$op`, an expression giving `io::Result`) until it succeeds:
/// while it fails the core is read-only. Returns from the enclosing function only when the
/// log is closing.
macro_rules! retry {
    ($state:expr, $what:expr, $op:expr) => {
        loop {
            match $op {
                Ok(v) => {
                    $state.succeeded();
                    break v;
                }
                Err(e) => $state.failed_attempt($what, e).await?,
            }
        }
    };
}

/// Creates this core's first segment. Called before the core reports ready, so a log that
/// cannot even be opened (no permission, no space, no O_DIRECT) stops the start, naming
/// the file and the cause.
pub async fn open(state: &WalState) -> Result<Segment, String> {
    let path = state.segment_path(0);
    Segment::create(&path, state.fsync == Fsync::Always)
        .await
        .map_err(|e| format!("cannot open the write-ahead log {}: {e}", path.display()))
}

/// Writes the core's log until closed, starting in `first` (from [`open`]). `recorder`
/// holds the pending records, and the change events waiting for them to be synced.
///
/// A failed write or sync (a full disk, an I/O error) does not end the log: the core
/// refuses writes, and the writer keeps the records it could not write and tries again
/// every `retry_interval`. Records applied before the failure are therefore logged once
/// the log recovers, in order, never rolled back: memory and disk agree after a restart,
/// and their change events go out only once they are logged.
pub async fn run(state: Rc<WalState>, recorder: &RefCell<Recorder>, first: Segment) {
    if let Err(e) = write_loop(&state, recorder, first).await {
        let unwritten = recorder.borrow().log.as_ref().map_or(0, |b| b.pending.len());
        tracing::error!(dir = %state.dir.display(), log = %state.name, error = %e, unwritten, "write-ahead log closed while failing: the records it could not write are lost");
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
pub struct Segment {
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

    /// Writes `data[*done..]`, advancing `done` past each piece on disk, so a failed call
    /// can be retried with the same `data` and `done`.
    async fn append(&mut self, data: &[u8], done: &mut usize) -> std::io::Result<()> {
        while *done < data.len() {
            let take = (data.len() - *done).min(WRITE_BYTES_MAX);
            let len = self.tail.len() + take;
            let padded = len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            let mut buf = self.file.alloc_dma_buffer(padded);
            let b = buf.as_bytes_mut();
            b[..self.tail.len()].copy_from_slice(&self.tail);
            b[self.tail.len()..len].copy_from_slice(&data[*done..*done + take]);
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
            *done += take;
        }
        Ok(())
    }

    async fn sync(&self) -> std::io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    /// Syncs and cuts the zero padding off (retried on failure, then [`Segment::close`]).
    async fn finish(&self) -> std::io::Result<()> {
        self.file.fdatasync().await?;
        self.file.truncate(self.tail_at + self.tail.len() as u64).await?;
        Ok(())
    }

    /// Closes a finished segment: its records are synced, so a failure here loses nothing.
    async fn close(self) {
        if let Err(e) = self.file.close().await {
            tracing::warn!(error = %e, "closing a finished log segment failed");
        }
    }
}

async fn write_loop(state: &WalState, recorder: &RefCell<Recorder>, first: Segment) -> std::io::Result<()> {
    let dsync = state.fsync == Fsync::Always;
    // Offset in this run's log of the next byte written, and of the segment's first.
    let mut written = 0u64;
    let mut path = state.segment_path(written);
    let mut writer = first;
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
            let mut done = 0;
            let started = Instant::now();
            retry!(state, "write", writer.append(&data, &mut done).await);
            if dsync {
                state.sync_latency.observe(started.elapsed().as_micros() as u64);
            }
            written += data.len() as u64;
            state.bytes.set(state.bytes.get() + data.len() as u64);
            state.segment_bytes.set(state.segment_bytes.get() + data.len() as u64);
            unsynced = !dsync;
        }
        spare = data;
        spare.clear();
        let sync_now = unsynced && sync_every.is_some_and(|every| last_sync.elapsed() >= every);
        if sync_now || (state.closing.get() && unsynced) {
            let started = Instant::now();
            retry!(state, "sync", writer.sync().await);
            state.sync_latency.observe(started.elapsed().as_micros() as u64);
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
            // Everything taken so far is written; finish (which syncs) and start the next. A
            // segment with nothing in it stays open: every record is already in the closed
            // ones, and its successor would have its name (segments are named by offset).
            if state.segment_bytes.get() > 0 {
                retry!(state, "finish a segment", writer.finish().await);
                let next = state.segment_path(written);
                let fresh = retry!(state, "create a segment", Segment::create(&next, dsync).await);
                std::mem::replace(&mut writer, fresh).close().await;
                let bytes = state.segment_bytes.replace(0);
                state.closed.borrow_mut().push(Closed {
                    path: std::mem::replace(&mut path, next),
                    start: written - bytes,
                    bytes,
                });
                if let Some(q) = recorder.borrow_mut().capture.as_mut() {
                    q.release(written);
                }
                unsynced = false;
            }
            state.rotate.set(false);
            if let Some(w) = state.rotated.borrow_mut().take() {
                w.wake();
            }
        }
        let drained = recorder.borrow().log.as_ref().is_none_or(|b| b.pending.is_empty());
        if state.closing.get() && drained && !unsynced {
            retry!(state, "finish a segment", writer.finish().await);
            writer.close().await;
            return Ok(());
        }
    }
}
