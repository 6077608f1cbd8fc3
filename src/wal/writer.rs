//! The per-core log writer task (glommio direct I/O).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use futures::io::AsyncWriteExt;
use glommio::io::{DmaFile, DmaStreamWriterBuilder};

use crate::config::Fsync;
use crate::shard::CoreStore;

/// Buffer of the direct-I/O stream writer; four of them write behind.
const WRITER_BUFFER_BYTES: usize = 128 << 10;
const EVERYSEC: Duration = Duration::from_secs(1);

/// What the core's other tasks see of its log.
pub struct WalState {
    pub fsync: Fsync,
    /// Records known durable (fsync = always) or handed to the file (otherwise).
    durable: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    closing: Cell<bool>,
    pub bytes: Cell<u64>,
    failed: Cell<bool>,
}

impl WalState {
    pub fn new(fsync: Fsync) -> Rc<WalState> {
        Rc::new(WalState {
            fsync,
            durable: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            closing: Cell::new(false),
            bytes: Cell::new(0),
            failed: Cell::new(false),
        })
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

/// Writes the core's log until closed. `store` holds the pending records.
pub async fn run(state: Rc<WalState>, store: &RefCell<CoreStore>, path: PathBuf) {
    if let Err(e) = write_loop(&state, store, &path).await {
        tracing::error!(file = %path.display(), error = %e, "write-ahead log failed; writes are no longer acknowledged as durable");
        state.failed.set(true);
        for w in state.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

async fn write_loop(state: &WalState, store: &RefCell<CoreStore>, path: &PathBuf) -> std::io::Result<()> {
    let file = DmaFile::create(path).await?;
    let mut writer = DmaStreamWriterBuilder::new(file)
        .with_buffer_size(WRITER_BUFFER_BYTES)
        .build();
    let mut spare = Vec::new();
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    loop {
        // Wait for records, or for the next everysec sync.
        let wait = std::pin::pin!(std::future::poll_fn(|cx| {
            let mut s = store.borrow_mut();
            match s.wal_mut() {
                Some(buf) if buf.pending.is_empty() && !state.closing.get() => {
                    buf.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        }));
        if state.fsync == Fsync::Everysec && unsynced {
            // Written but not yet synced: wake for the sync even if no record comes.
            let due = EVERYSEC
                .saturating_sub(last_sync.elapsed())
                .max(Duration::from_millis(1));
            let tick = std::pin::pin!(glommio::timer::sleep(due));
            if let Either::Right(_) = select(wait, tick).await {
                if let Some(buf) = store.borrow_mut().wal_mut() {
                    buf.writer = None;
                }
            }
        } else {
            wait.await;
        }
        let (data, generation) = {
            let mut s = store.borrow_mut();
            let Some(buf) = s.wal_mut() else { return Ok(()) };
            std::mem::swap(&mut buf.pending, &mut spare);
            (std::mem::take(&mut spare), buf.appended)
        };
        if !data.is_empty() {
            writer.write_all(&data).await?;
            state.bytes.set(state.bytes.get() + data.len() as u64);
            unsynced = true;
        }
        spare = data;
        spare.clear();
        let sync_now = match state.fsync {
            Fsync::Always => unsynced,
            Fsync::Everysec => unsynced && last_sync.elapsed() >= EVERYSEC,
            Fsync::No => false,
        };
        if sync_now || (state.closing.get() && unsynced) {
            writer.sync().await?;
            last_sync = Instant::now();
            unsynced = false;
        }
        state.advance(generation);
        let drained = store.borrow_mut().wal_mut().is_none_or(|b| b.pending.is_empty());
        if state.closing.get() && drained && !unsynced {
            writer.close().await?;
            return Ok(());
        }
    }
}
