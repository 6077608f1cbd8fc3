//! One shard core: its state, its start-up inside the executor, and its tasks (accept loops,
//! the mesh service, the expiry sweep).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either, Shared};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::sync::{Gate, Semaphore};
use glommio::{spawn_local, timer::sleep};

use super::access::{AccessControl, Throttle};
use super::connection::{self, Front};
use super::dispatch::{slice_point, SLICE_KEYS};
use super::forward::Outboxes;
use super::listener::CoreListeners;
use super::uring::{Ring, RingKind};
use super::wake::Starting;
use crate::cdc::capture::CaptureQueue;
use crate::cdc::{CdcCounters, CoreLink};
use crate::change::now_ms;
use crate::cluster::gate::{SlotGate, SlotState};
use crate::config::Config;
use crate::keyspace::Keyspace;
use crate::proto::{CoreStats, HelloResponse};
use crate::shard::{Command, CoreStore, Outcome};
use crate::wal::snapshot::{self, CaptureHold, Loaded, OldLogs, Report, Snapshots};
use crate::wal::writer::{self, WalState};
use crate::wal::{Recorder, WalBuffer};

/// How often each core looks for expired keys, and the most it removes per look: small
/// enough to never stall requests, frequent enough that an expired key is gone in ~1 s.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
pub const SWEEP_KEYS_MAX: usize = 2_000;

/// How often a writer held back by change capture looks again. The control core drains the
/// queues every millisecond and measures retention every 20.
const CDC_ROOM_POLL: Duration = Duration::from_millis(1);

/// How often an executor wakes while it starts (joining the mesh, opening its log).
const START_TICK: Duration = Duration::from_millis(1);

/// Back-off after an accept error such as EMFILE, so a full descriptor table does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// What one core asks another. Replies travel on a oneshot channel, never on the request
/// mesh, so a core serving requests never waits to send: no cross-core deadlock.
pub enum MeshRequest {
    /// Key operations for shards the receiving core owns, in the order to apply them.
    Commands {
        ops: Vec<(u64, Command)>,
        reply: oneshot::Sender<Vec<Outcome>>,
    },
    Stats {
        reply: oneshot::Sender<CoreStats>,
    },
    /// Snapshot every shard of the receiving core; the reply comes when it is done.
    Snapshot {
        reply: oneshot::Sender<Result<Report, String>>,
    },
    /// Snapshot every shard of the receiving core, then stage its part of a backup.
    Backup {
        part: snapshot::BackupPart,
    },
    /// Hold writes for a backup's cut until the Unix ms given (or `Release`); the reply is
    /// where the core's log ends once nothing applies any more.
    HoldWrites {
        until_ms: u64,
        reply: oneshot::Sender<u64>,
    },
    ReleaseWrites,
    /// Answered at once: core 0 asks every core, and the node counts as alive (systemd's
    /// watchdog) only while all of them answer.
    Heartbeat {
        reply: oneshot::Sender<()>,
    },
    /// The next part of a migrating slot this core owns (see [`Core::export`]).
    Export {
        req: crate::proto::SlotExportRequest,
        reply: oneshot::Sender<SlotResult<crate::proto::SlotExportResponse>>,
    },
    /// Drops keys of a slot this node no longer owns (see [`Core::purge`]).
    Purge {
        slot: u32,
        keys_max: u32,
        importing: bool,
        reply: oneshot::Sender<SlotResult<crate::proto::SlotPurgeResponse>>,
    },
}

/// A slot operation's result, or the error code and message to answer with.
pub type SlotResult<T> = Result<T, (crate::proto::ErrorCode, String)>;

/// Most keys one SLOT_PURGE removes: a bounded step, like the expiry sweep's.
const PURGE_KEYS_MAX: usize = 2_000;

/// Default and largest SLOT_EXPORT reply, in key and value bytes.
const EXPORT_BYTES_DEFAULT: u64 = 1 << 20;

/// A migrating slot's copy in progress on its owner core: the keys listed when it started
/// and not yet sent, and the keys written since (sent again with their value at the time).
struct Export {
    id: u64,
    pending: Vec<bytes::Bytes>,
    dirty: std::collections::HashSet<bytes::Bytes>,
    /// More keys were written during the copy than `cluster.migration_dirty_keys_max`: the
    /// importer has to start again.
    overflowed: bool,
}

impl MeshRequest {
    /// Whether applying it makes changes (change capture may hold it back).
    fn writes(&self) -> bool {
        match self {
            MeshRequest::Commands { ops, .. } => ops.iter().any(|(_, c)| c.writes()),
            MeshRequest::Purge { .. } => true,
            MeshRequest::Stats { .. }
            | MeshRequest::Export { .. }
            | MeshRequest::Snapshot { .. }
            | MeshRequest::Backup { .. }
            | MeshRequest::HoldWrites { .. }
            | MeshRequest::ReleaseWrites
            | MeshRequest::Heartbeat { .. } => false,
        }
    }
}

pub type MeshBuilderFull = MeshBuilder<MeshRequest, Full>;

/// Everything the executors share at start-up (built on the main thread).
pub struct Boot {
    pub config: Config,
    pub keyspace: Keyspace,
    pub hello: HelloResponse,
    /// Pre-bound listeners, taken by core index.
    pub listeners: Mutex<Vec<Option<CoreListeners>>>,
    /// Resolves (or is cancelled) when the node must stop.
    pub shutdown: Shared<oneshot::Receiver<()>>,
    /// Each core's store (recovered from the log), taken by core index.
    pub stores: Mutex<Vec<Option<CoreStore>>>,
    /// Each core's change-capture queue, when capture is on, taken by core index.
    pub captures: Mutex<Vec<Option<CaptureQueue>>>,
    /// Each core's shared state with the control core, when capture is on.
    pub links: Vec<Arc<CoreLink>>,
    /// Where the cores write their logs, when persistence is on.
    pub wal_dir: Option<std::path::PathBuf>,
    /// Names this run's log files.
    pub started_ms: u64,
    /// Where the cores write their shard snapshots.
    pub snap_dir: std::path::PathBuf,
    /// Logs of earlier runs, deleted once every core has snapshotted its shards.
    pub old_logs: Arc<OldLogs>,
    /// Per shard: the snapshot recovery loaded (empty when persistence is off).
    pub shard_snapshots: Vec<Loaded>,
    /// Bumped for each SIGUSR1: every core snapshots its shards.
    pub snapshot_requests: Arc<std::sync::atomic::AtomicU64>,
    /// When every core last answered core 0's heartbeat (milliseconds since the epoch).
    pub alive_at_ms: Arc<std::sync::atomic::AtomicU64>,
    /// What recovery did at start (for Stats).
    pub persistence: crate::proto::PersistenceStats,
    pub cdc: Arc<CdcCounters>,
    /// Users and TLS configuration, swapped whole on SIGHUP.
    pub access: AccessControl,
    /// Each core's end of the metrics scrape channel, taken by core index.
    pub scrapes: Mutex<Vec<Option<crate::metrics::ScrapeReceiver>>>,
    /// The node's slots, in a cluster.
    pub slots: Option<Arc<SlotGate>>,
}

/// Counters behind `CoreStats`.
#[derive(Default)]
pub struct Counters {
    pub connections_accepted: Cell<u64>,
    pub connections_open: Cell<u64>,
    pub requests: Cell<u64>,
    pub forwarded_out: Cell<u64>,
    pub forwarded_in: Cell<u64>,
    pub connections_refused: Cell<u64>,
    pub connections_timed_out: Cell<u64>,
    pub writes_refused_storage: Cell<u64>,
    pub auth_failures: Cell<u64>,
    pub requests_denied: Cell<u64>,
    pub connections_refused_protected: Cell<u64>,
    pub expired_swept: Cell<u64>,
}

impl Counters {
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }
}

/// The state of one shard core, shared by its tasks (single thread, never across `.await`
/// while borrowed).
pub struct Core {
    pub index: u32,
    pub config: Config,
    pub keyspace: Keyspace,
    pub hello: HelloResponse,
    pub store: RefCell<CoreStore>,
    /// Where the shards' changes go: the log buffer and change capture.
    pub recorder: RefCell<Recorder>,
    /// Mesh messages with writes that change capture holds back, in arrival order.
    held: RefCell<VecDeque<MeshRequest>>,
    pub counters: Counters,
    pub ring: Rc<Ring>,
    /// Work queued for other cores, sent once per executor round (see `forward.rs`).
    pub outboxes: Outboxes,
    /// Senders to the other cores; taken at shutdown so their mesh services can end.
    pub mesh: RefCell<Option<Rc<Senders<MeshRequest>>>>,
    /// Closed (never signalled) at shutdown: a broadcast every task can await.
    pub shutdown: Rc<Semaphore>,
    /// Accept loops and connections; shutdown waits for it to empty.
    pub tasks: Gate,
    /// The control core's change-capture counters (for Stats).
    pub cdc: Arc<CdcCounters>,
    /// The write-ahead log, when persistence is on, and its writer task.
    pub wal: Option<Rc<WalState>>,
    pub persistence: crate::proto::PersistenceStats,
    pub wal_task: RefCell<Option<glommio::Task<()>>>,
    /// Snapshots of this core's shards (with persistence on), and the task writing them.
    pub snapshots: Option<Rc<Snapshots>>,
    pub snapshot_task: RefCell<Option<glommio::Task<()>>>,
    /// Users and TLS configuration of the moment (loaded at each accept and Auth).
    pub access: AccessControl,
    /// Protected mode applies: only loopback peers are served (see `access::protected`).
    pub protected: bool,
    pub auth_failures_log: RefCell<Throttle>,
    pub protected_log: RefCell<Throttle>,
    /// Requests by kind, latency, errors by code, hits and misses (for metrics), kept only
    /// while the metrics endpoint is on (`figures_on`).
    pub figures: crate::metrics::RequestFigures,
    pub figures_on: bool,
    /// While a backup takes its cut, writes are held until this Unix ms (0: not held). A
    /// deadline rather than a flag, so a coordinator that vanishes cannot hold them for ever.
    writes_held_until_ms: Cell<u64>,
    /// Batches between their writes check and the end of their local applies: a backup's
    /// cut waits for them (see [`Core::hold_writes`]).
    applying: Cell<u32>,
    /// In a cluster: what this node may do with each slot.
    pub slots: Option<Arc<SlotGate>>,
    /// Copies of this core's migrating slots in progress, by slot.
    exports: RefCell<HashMap<u32, Export>>,
}

/// Counts a batch as applying on its core until dropped.
pub struct Applying<'a>(&'a Core);

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        self.0.applying.set(self.0.applying.get() - 1);
    }
}

impl Core {
    pub fn stats(&self) -> CoreStats {
        let store = self.store.borrow();
        let c = &self.counters;
        let (cdc_queue_events, cdc_events_dropped) = self
            .recorder
            .borrow()
            .capture
            .as_ref()
            .map_or((0, 0), |q| (q.depth(), q.dropped()));
        CoreStats {
            core: self.index,
            connections_accepted: c.connections_accepted.get(),
            connections_open: c.connections_open.get(),
            requests: c.requests.get(),
            forwarded_out: c.forwarded_out.get(),
            forwarded_in: c.forwarded_in.get(),
            keys: store.keys(),
            memory_bytes: store.memory_bytes(),
            keys_evicted: store.evicted(),
            cdc_queue_events,
            cdc_events_dropped,
            wal_bytes: self.wal.as_ref().map_or(0, |w| w.bytes.get()),
            log_bytes: self.wal.as_ref().map_or(0, |w| w.log_bytes())
                + self.snapshots.as_ref().map_or(0, |s| s.held_bytes()),
            snapshot_age_ms: self.snapshots.as_ref().map_or(-1, |s| s.age_ms()),
            snapshot_bytes: self.snapshots.as_ref().map_or(0, |s| s.bytes.get()),
            snapshots: self.snapshots.as_ref().map_or(0, |s| s.rounds.get()),
            log_failed: self.wal.as_ref().is_some_and(|w| w.failed()),
            log_error: self.wal.as_ref().and_then(|w| w.error()).unwrap_or_default(),
            writes_refused_storage: c.writes_refused_storage.get(),
            connections_refused: c.connections_refused.get(),
            connections_timed_out: c.connections_timed_out.get(),
            auth_failures: c.auth_failures.get(),
            requests_denied: c.requests_denied.get(),
            connections_refused_protected: c.connections_refused_protected.get(),
        }
    }

    /// Stats and request figures, for a metrics scrape.
    pub fn figures(&self) -> crate::metrics::CoreFigures {
        let lazy = self.store.borrow().expired_lazy();
        crate::metrics::CoreFigures {
            stats: self.stats(),
            requests: self.figures.snapshot(lazy, self.counters.expired_swept.get()),
            log_sync: self.wal.as_ref().map(|w| w.sync_latency.snapshot()),
        }
    }

    /// Waits until this core's log covers everything applied so far (fsync = always);
    /// false if the log failed and writes must not be acknowledged.
    pub async fn wal_durable(&self) -> bool {
        let Some(wal) = &self.wal else { return true };
        // Read the generation first: a borrow must never live across an await.
        let appended = self.recorder.borrow().appended();
        wal.durable(appended).await
    }

    /// Asks this core's snapshot task for a round; resolves with what it wrote.
    pub fn snapshot(&self) -> impl std::future::Future<Output = Result<Report, String>> + 'static {
        let rx = self.snapshots.as_ref().map(|s| s.request());
        async move {
            match rx {
                None => Err("persistence is off".to_string()),
                Some(rx) => rx.await.unwrap_or_else(|_| Err("the core is shutting down".into())),
            }
        }
    }

    /// Hands this core's part of a backup to its snapshot task (dropped with persistence
    /// off: the coordinator then sees the part fail).
    pub fn stage_backup(&self, part: snapshot::BackupPart) {
        if let Some(s) = &self.snapshots {
            s.request_backup(part);
        }
    }

    /// True when writes may go ahead now: change capture has room, and no backup holds
    /// them for its cut.
    pub fn writes_ready(&self) -> bool {
        let held = match self.writes_held_until_ms.get() {
            0 => false,
            until => now_ms() < until,
        };
        !held && self.recorder.borrow_mut().writes_ready()
    }

    /// Marks a batch that passed the writes check as applying (see [`Core::hold_writes`]).
    pub fn applying(&self) -> Applying<'_> {
        self.applying.set(self.applying.get() + 1);
        Applying(self)
    }

    /// Holds new writes on this core until `until_ms` (or [`Core::release_writes`]), waits
    /// for the batches already applying, and returns where this core's log ends: no change
    /// after that point is applied until the hold ends. Every core held at once gives a
    /// cut that no acknowledged write can cross.
    pub async fn hold_writes(&self, until_ms: u64) -> u64 {
        self.writes_held_until_ms.set(until_ms);
        while self.applying.get() > 0 {
            glommio::executor().yield_task_queue_now().await;
        }
        self.recorder.borrow().log.as_ref().map_or(0, |l| l.end)
    }

    pub fn release_writes(&self) {
        self.writes_held_until_ms.set(0);
    }

    /// Waits until change capture can take this core's next writes (`cdc.overflow = block`
    /// at the retention bound, or a full queue without a log); returns at once when capture
    /// is off or has room, and when shutdown begins (what is in flight is finished).
    pub async fn cdc_room(&self) {
        while !self.writes_ready() && !self.stopping() {
            sleep(CDC_ROOM_POLL).await;
        }
    }

    /// Applies one key operation owned by this core; its changes go to the recorder.
    ///
    /// While the log is failing, a write that would change something is refused before it
    /// touches memory: memory, log and change stream never disagree.
    pub fn apply(&self, hash: u64, cmd: Command, now_ms: u64) -> Outcome {
        if let Some(refused) = self.slots.as_ref().and_then(|gate| self.admit(gate, hash, &cmd)) {
            return refused;
        }
        if cmd.writes() && self.log_failed() && self.would_change(hash, &cmd, now_ms) {
            Counters::add(&self.counters.writes_refused_storage, 1);
            return Outcome::StorageUnavailable;
        }
        self.store
            .borrow_mut()
            .apply(hash, cmd, now_ms, &mut *self.recorder.borrow_mut())
    }

    /// In a cluster: whether this node may apply `cmd` to its key's slot now (None), or
    /// what to answer instead. A write to a migrating slot is noted for the copy here,
    /// on the core that applies it, so no write can slip between the note and the apply.
    fn admit(&self, gate: &SlotGate, hash: u64, cmd: &Command) -> Option<Outcome> {
        let slot = gate.slot(hash);
        let import = matches!(cmd, Command::Import { .. } | Command::Unimport { .. });
        match (gate.state(slot), import) {
            (SlotState::Importing, true) | (SlotState::Owned, false) => None,
            (_, true) => Some(Outcome::NotImporting(slot)),
            (SlotState::Migrating, false) => {
                if cmd.writes() {
                    self.note_written(slot, cmd.key());
                }
                None
            }
            (SlotState::Held, false) => cmd.writes().then_some(Outcome::TryAgain(slot)),
            (SlotState::Importing | SlotState::Elsewhere, false) => Some(Outcome::Moved(slot)),
            (SlotState::Unknown, false) => Some(Outcome::ClusterDown),
        }
    }

    fn note_written(&self, slot: u32, key: &[u8]) {
        let mut exports = self.exports.borrow_mut();
        let Some(e) = exports.get_mut(&slot) else {
            return; // no copy started yet: its listing will see this write
        };
        if e.overflowed {
            return;
        }
        if e.dirty.len() >= self.config.cluster.migration_dirty_keys_max {
            e.overflowed = true;
            e.dirty = Default::default();
            e.pending = Vec::new();
            tracing::warn!(
                slot,
                keys = self.config.cluster.migration_dirty_keys_max,
                "slot migration: more keys written during the copy than cluster.migration_dirty_keys_max; the copy starts again"
            );
            return;
        }
        if !e.dirty.contains(key) {
            e.dirty.insert(bytes::Bytes::copy_from_slice(key));
        }
    }

    /// SLOT_EXPORT on the core owning the slot's shard: starts a copy (listing the slot's
    /// keys), holds the slot's writes when asked, and answers the next keys with their
    /// current values: listed keys first, then those written since.
    pub fn export(&self, req: &crate::proto::SlotExportRequest) -> SlotResult<crate::proto::SlotExportResponse> {
        use crate::proto::{ErrorCode, SlotEntry, SlotExportResponse};
        let gate = self.slot_gate()?;
        let slot = req.slot;
        if !matches!(gate.state(slot), SlotState::Migrating | SlotState::Held) {
            return Err((
                ErrorCode::InvalidRequest,
                format!("slot {slot} is not migrating from this node"),
            ));
        }
        let mask = u64::from(gate.slots() - 1);
        let mut exports = self.exports.borrow_mut();
        if req.start {
            gate.unhold(slot);
            let pending = self.store.borrow().keys_in_slot(mask, u64::from(slot));
            tracing::info!(slot, keys = pending.len(), "slot migration: copy started");
            exports.insert(
                slot,
                Export {
                    id: req.migration_id,
                    pending,
                    dirty: Default::default(),
                    overflowed: false,
                },
            );
        }
        let Some(e) = exports
            .get_mut(&slot)
            .filter(|e| e.id == req.migration_id && !e.overflowed)
        else {
            return Ok(SlotExportResponse {
                reset: true,
                ..Default::default()
            });
        };
        if req.hold {
            gate.hold(slot);
        }
        let bytes_max = match req.bytes_max {
            0 => EXPORT_BYTES_DEFAULT,
            n => n.min(self.config.limits.frame_bytes_max as u64 / 2),
        };
        let store = self.store.borrow();
        let now = now_ms();
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        while bytes < bytes_max {
            if e.pending.is_empty() {
                e.pending.extend(e.dirty.drain());
            }
            let Some(key) = e.pending.pop() else { break };
            let entry = match store.peek(Keyspace::hash(&key), &key, now) {
                Some((value, expire_at_ms)) => SlotEntry {
                    key,
                    found: true,
                    value,
                    expire_at_ms,
                },
                None => SlotEntry {
                    key,
                    ..Default::default()
                },
            };
            bytes += (entry.key.len() + entry.value.len() + 16) as u64;
            entries.push(entry);
        }
        Ok(SlotExportResponse {
            entries,
            remaining: (e.pending.len() + e.dirty.len()) as u64,
            held: gate.state(slot) == SlotState::Held,
            reset: false,
            epoch: gate.epoch(slot),
        })
    }

    /// SLOT_PURGE on the core owning the slot's shard: drops up to `keys_max` keys of a
    /// slot this node does not serve, as MIGRATION_DEL changes; how many it dropped.
    /// `importing` says which kind of slot the caller means (see SlotPurgeRequest).
    pub fn purge(&self, slot: u32, keys_max: u32, importing: bool) -> SlotResult<crate::proto::SlotPurgeResponse> {
        use crate::proto::ErrorCode;
        let gate = self.slot_gate()?;
        let expected = if importing {
            SlotState::Importing
        } else {
            SlotState::Elsewhere
        };
        if gate.state(slot) != expected {
            return Err((
                ErrorCode::InvalidRequest,
                format!(
                    "slot {slot} is {:?} here, not {expected:?}: its keys are not dropped",
                    gate.state(slot)
                ),
            ));
        }
        if !self.writes_ready() || self.log_failed() {
            return Err((ErrorCode::StorageUnavailable, "cannot log the removals now".into()));
        }
        let mut recorder = self.recorder.borrow_mut();
        let room = recorder.capture.as_ref().map_or(PURGE_KEYS_MAX, |q| q.room());
        let max = (keys_max as usize).clamp(1, PURGE_KEYS_MAX).min(room);
        let mask = u64::from(gate.slots() - 1);
        let n = self
            .store
            .borrow_mut()
            .drop_slot(mask, u64::from(slot), max, now_ms(), &mut *recorder);
        // Fewer than it might drop: it walked the whole slot.
        Ok(crate::proto::SlotPurgeResponse {
            removed: n as u64,
            more: n == max,
        })
    }

    fn slot_gate(&self) -> SlotResult<&SlotGate> {
        self.slots.as_deref().ok_or((
            crate::proto::ErrorCode::InvalidRequest,
            "this node is not in a cluster".into(),
        ))
    }

    /// Forgets copies of slots that stopped migrating (moved, or the migration cancelled).
    fn prune_exports(&self) {
        if let Some(gate) = &self.slots {
            self.exports
                .borrow_mut()
                .retain(|slot, _| matches!(gate.state(*slot), SlotState::Migrating | SlotState::Held));
        }
    }

    /// True while this core's log cannot be written (the core is read-only).
    pub fn log_failed(&self) -> bool {
        self.wal.as_ref().is_some_and(|w| w.failed())
    }

    /// Whether a write changes anything: a SET always does; a DEL or EXPIRE only of a key
    /// that exists (deleting nothing keeps working on a read-only core).
    fn would_change(&self, hash: u64, cmd: &Command, now_ms: u64) -> bool {
        match cmd {
            Command::Del { key } | Command::Expire { key, .. } | Command::Persist { key } => {
                let exists = Command::Exists { key: key.clone() };
                let outcome = self
                    .store
                    .borrow_mut()
                    .apply(hash, exists, now_ms, &mut *self.recorder.borrow_mut());
                matches!(outcome, Outcome::Applied(true))
            }
            _ => true,
        }
    }

    /// Serves a message from another core, unless it writes while change capture holds
    /// writers back: then it waits, in arrival order, and everything else goes on.
    fn serve_mesh(self: &Rc<Self>, msg: MeshRequest) {
        if msg.writes() && (!self.held.borrow().is_empty() || !self.writes_ready()) {
            let first = self.held.borrow().is_empty();
            self.held.borrow_mut().push_back(msg);
            if first {
                spawn_local(drain_held(self.clone())).detach();
            }
            return;
        }
        self.handle_mesh(msg);
    }

    /// Sends another core the outcomes of its commands (`wrote`: which were writes) once
    /// this core's log covers them (fsync = always), or at once.
    fn answer(&self, reply: oneshot::Sender<Vec<Outcome>>, outcomes: Vec<Outcome>, wrote: Vec<bool>) {
        let logged = self.recorder.borrow().appended();
        // The requester may have gone (connection closed); nothing to do then.
        match &self.wal {
            // fsync = always: answer once these writes are on disk, without holding up the
            // next message from that core.
            Some(wal) if wal.fsync == crate::config::Fsync::Always => {
                let wal = wal.clone();
                spawn_local(async move {
                    let outcomes = if wal.durable(logged).await {
                        outcomes
                    } else {
                        not_durable(outcomes, &wrote)
                    };
                    let _ = reply.send(outcomes);
                })
                .detach();
            }
            _ => {
                let _ = reply.send(outcomes);
            }
        }
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        // The semaphore never has permits; acquiring fails only once it is closed.
        self.shutdown.try_acquire(1).is_err()
    }

    /// Resolves once shutdown has begun.
    pub async fn shutting_down(&self) {
        // The semaphore has no permits and is only ever closed, so this returns at shutdown.
        let _ = self.shutdown.acquire(1).await;
    }

    pub(super) fn handle_mesh(self: &Rc<Self>, msg: MeshRequest) {
        match msg {
            MeshRequest::Commands { ops, reply } => {
                Counters::add(&self.counters.forwarded_in, ops.len() as u64);
                if ops.len() <= SLICE_KEYS {
                    let now = now_ms();
                    let wrote: Vec<bool> = ops.iter().map(|(_, c)| c.writes()).collect();
                    let outcomes = ops.into_iter().map(|(hash, cmd)| self.apply(hash, cmd, now)).collect();
                    self.answer(reply, outcomes, wrote);
                } else {
                    // A large batch is applied in slices, so this core's own connections
                    // are served between them.
                    let core = self.clone();
                    spawn_local(async move {
                        let wrote: Vec<bool> = ops.iter().map(|(_, c)| c.writes()).collect();
                        let mut outcomes = Vec::with_capacity(ops.len());
                        for (i, (hash, cmd)) in ops.into_iter().enumerate() {
                            slice_point(i).await;
                            outcomes.push(core.apply(hash, cmd, now_ms()));
                        }
                        core.answer(reply, outcomes, wrote);
                    })
                    .detach();
                }
            }
            MeshRequest::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            MeshRequest::Heartbeat { reply } => {
                let _ = reply.send(());
            }
            MeshRequest::Snapshot { reply } => {
                let done = self.snapshot();
                spawn_local(async move {
                    let _ = reply.send(done.await);
                })
                .detach();
            }
            MeshRequest::Backup { part } => self.stage_backup(part),
            MeshRequest::HoldWrites { until_ms, reply } => {
                let core = self.clone();
                spawn_local(async move {
                    let _ = reply.send(core.hold_writes(until_ms).await);
                })
                .detach();
            }
            MeshRequest::ReleaseWrites => self.release_writes(),
            MeshRequest::Export { req, reply } => {
                let _ = reply.send(self.export(&req));
            }
            MeshRequest::Purge {
                slot,
                keys_max,
                importing,
                reply,
            } => {
                let _ = reply.send(self.purge(slot, keys_max, importing));
            }
        }
    }
}

/// The log failed before these outcomes' writes were durable: every write among them that
/// changed something is reported as refused (it is not acknowledged; the writer logs it
/// once it can).
fn not_durable(outcomes: Vec<Outcome>, wrote: &[bool]) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .zip(wrote)
        .map(|(o, &w)| match o {
            // A write that changed nothing has no record to wait for.
            Outcome::Applied(true) | Outcome::Int(_) | Outcome::Old { applied: true, .. } if w => {
                Outcome::StorageUnavailable
            }
            o => o,
        })
        .collect()
}

/// The life of one core, run inside its executor: join the mesh, take its listeners, serve
/// until shutdown, then drain connections and leave the mesh.
pub async fn run(boot: Arc<Boot>, mesh: Option<MeshBuilderFull>, mut report: StartReport) -> Result<(), String> {
    tracing::debug!(mesh = mesh.is_some(), "core executor running");
    report.enter();
    let (senders, mut receivers) = match mesh {
        // A core that failed to start never joins: start-up then stops the rest this way.
        Some(m) => match select(std::pin::pin!(join_mesh(m)), boot.shutdown.clone()).await {
            Either::Left((Ok((s, r)), _)) => (Some(s), Some(r)),
            Either::Left((Err(e), _)) => {
                report.send(Err(e.clone()));
                return Err(e);
            }
            Either::Right(_) => {
                let e = "stopped before every core joined the mesh".to_string();
                report.send(Err(e.clone()));
                return Err(e);
            }
        },
        None => (None, None),
    };
    let index = senders.as_ref().map_or(0, |s| s.peer_id()) as u32;
    report.index = Some(index);
    tracing::debug!(core = index, "joined the core mesh");
    let started = start_core(&boot, index, senders).await;
    let core = match started {
        Ok(core) => core,
        Err(e) => {
            report.send(Err(format!("core {index}: {e}")));
            return Err(e);
        }
    };
    let peers: Vec<_> = receivers
        .as_mut()
        .map(|r| r.streams())
        .unwrap_or_default()
        .into_iter()
        .map(|(_, rx)| spawn_local(serve_peer(core.clone(), rx)))
        .collect();
    report.send(Ok((index, core.ring.kind())));

    // Until shutdown: accept loops and connections run in `core.tasks`.
    let _ = boot.shutdown.clone().await;
    core.shutdown.close();
    let _ = core.tasks.close().await;
    // Our connections are done: drop our senders so the other cores' services for us end,
    // and keep serving theirs until they are done too.
    core.mesh.borrow_mut().take();
    futures::future::join_all(peers).await;
    // The snapshot task stops between two shards (a round cut short leaves at most a
    // temporary file; the log still has it all). Dropping it instead could stop glommio's
    // stream writer inside its close, which panics.
    if let Some(s) = &core.snapshots {
        s.close();
    }
    let task = core.snapshot_task.borrow_mut().take();
    if let Some(task) = task {
        task.await;
    }
    // Nothing more will be written: flush and sync the log, then close it.
    if let Some(wal) = &core.wal {
        wal.close();
        core.recorder.borrow_mut().wake_writer();
        let task = core.wal_task.borrow_mut().take();
        if let Some(task) = task {
            task.await;
        }
    }
    Ok(())
}

/// Tells start-up how a core's start ended, once. It travels inside the closure glommio
/// runs on each executor thread (glommio clones that closure once per thread; each clone is
/// armed, the original is not). Dropped armed without having told, it reports a failure, so
/// start-up never waits for a core that is gone:
/// - when an executor cannot be built (RLIMIT_NOFILE or RLIMIT_MEMLOCK too low, io_uring
///   refused), glommio drops the closure without running it and says why only once every
///   thread is joined, which never happens while the other cores wait in the mesh;
/// - when a panic unwinds through a core's start.
pub struct StartReport {
    ready: Option<mpsc::Sender<Result<(u32, RingKind), String>>>,
    armed: bool,
    /// Known once the core joined the mesh.
    index: Option<u32>,
    /// Where this executor thread is listed while it starts, so start-up can wake it.
    starting: Arc<Starting>,
    thread: Option<libc::pid_t>,
}

impl StartReport {
    pub fn new(ready: mpsc::Sender<Result<(u32, RingKind), String>>, starting: Arc<Starting>) -> StartReport {
        StartReport {
            ready: Some(ready),
            armed: false,
            index: None,
            starting,
            thread: None,
        }
    }

    /// Lists the calling executor thread as starting.
    fn enter(&mut self) {
        self.thread = Some(self.starting.enter());
    }

    fn send(&mut self, r: Result<(u32, RingKind), String>) {
        if let Some(tid) = self.thread.take() {
            self.starting.leave(tid);
        }
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(r);
        }
    }
}

impl Clone for StartReport {
    fn clone(&self) -> Self {
        StartReport {
            ready: self.ready.clone(),
            armed: true,
            index: None,
            starting: self.starting.clone(),
            thread: None,
        }
    }
}

impl Drop for StartReport {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let why = match self.index {
            Some(i) => format!("core {i} stopped while starting (it panicked; see the log)"),
            None => "a core's executor could not be created, or it stopped while starting".to_string(),
        };
        self.send(Err(why));
    }
}

/// Joins the core mesh (see [`nudged`]: glommio wakes a channel end waiting for its peer
/// only when its own executor happens to wake up; start-up's wake signal, `super::wake`,
/// makes sure it does).
async fn join_mesh(
    mesh: MeshBuilderFull,
) -> Result<
    (
        Senders<MeshRequest>,
        glommio::channels::channel_mesh::Receivers<MeshRequest>,
    ),
    String,
> {
    nudged("joining the core mesh", mesh.join())
        .await
        .map_err(|e| format!("cannot join the core mesh: {e}"))
}

/// Awaits a start-up step while a short timer keeps the executor waking, polling the step
/// again on each tick, and warns about every second it takes. On an executor with nothing
/// else to do yet, glommio can miss the wake-up a step waits for: the mesh join (the
/// notice that every core has registered) and a core's first log open were both seen
/// waiting for ever, in up to one start in ten under load. A pending timer gives the
/// executor another chance to notice; when even the timer is missed, start-up's wake
/// signal ends the sleep (see [`super::wake`]).
async fn nudged<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let started = std::time::Instant::now();
    let mut ticks = 0u64;
    loop {
        if let Either::Left((out, _)) = select(fut.as_mut(), std::pin::pin!(sleep(START_TICK))).await {
            return out;
        }
        ticks += 1;
        if ticks.is_multiple_of(1000) {
            tracing::warn!(waited_ms = started.elapsed().as_millis() as u64, "still {what}");
        }
    }
}

/// Takes core `index`'s item out of a table the main thread filled before the executors.
fn take_slot<T>(table: &Mutex<Vec<Option<T>>>, index: u32, what: &str) -> Result<T, String> {
    table
        .lock()
        .map_err(|_| format!("{what} table poisoned"))?
        .get_mut(index as usize)
        .and_then(Option::take)
        .ok_or_else(|| format!("no {what} for core {index}"))
}

async fn start_core(boot: &Boot, index: u32, senders: Option<Senders<MeshRequest>>) -> Result<Rc<Core>, String> {
    let listeners = take_slot(&boot.listeners, index, "listener")?;
    let store = take_slot(&boot.stores, index, "store")?;
    let capture = boot
        .config
        .cdc
        .enabled
        .then(|| take_slot(&boot.captures, index, "capture queue"))
        .transpose()?;
    let link = boot.links.get(index as usize).cloned();
    let capture_sync = capture
        .is_some()
        .then(|| Duration::from_millis(boot.config.cdc.log_sync_interval_ms));
    let ring =
        Ring::new(boot.config.runtime.ring_entries).map_err(|e| format!("cannot create the network ring: {e}"))?;
    spawn_local(ring.clone().drive()).detach();
    let core = Rc::new(Core {
        index,
        config: boot.config.clone(),
        keyspace: boot.keyspace,
        hello: boot.hello.clone(),
        store: RefCell::new(store),
        recorder: RefCell::new(Recorder {
            log: boot.wal_dir.as_ref().map(|_| WalBuffer::default()),
            capture,
        }),
        held: RefCell::new(VecDeque::new()),
        writes_held_until_ms: Cell::new(0),
        applying: Cell::new(0),
        slots: boot.slots.clone(),
        exports: RefCell::default(),
        wal: boot.wal_dir.as_ref().map(|dir| {
            let name = format!("{}-core{index}", run_name(boot.started_ms));
            let retry = Duration::from_millis(boot.config.persistence.log_retry_interval_ms);
            WalState::new(boot.config.persistence.fsync, dir.clone(), name, capture_sync, retry)
        }),
        wal_task: RefCell::new(None),
        snapshots: boot.wal_dir.as_ref().map(|_| {
            let loaded = boot
                .keyspace
                .shards_of_core(index)
                .map(|s| boot.shard_snapshots.get(s as usize).copied().unwrap_or_default())
                .collect();
            let min = boot.config.persistence.snapshot_log_bytes_min;
            let hold = link.clone().map(|link| CaptureHold {
                link,
                counters: boot.cdc.clone(),
            });
            Snapshots::new(boot.snap_dir.clone(), min, boot.old_logs.clone(), hold, loaded)
        }),
        snapshot_task: RefCell::new(None),
        persistence: boot.persistence.clone(),
        counters: Counters::default(),
        ring,
        outboxes: Outboxes::new(boot.keyspace.cores() as usize),
        mesh: RefCell::new(senders.map(Rc::new)),
        shutdown: Rc::new(Semaphore::new(0)),
        tasks: Gate::new(),
        cdc: boot.cdc.clone(),
        access: boot.access.clone(),
        protected: super::access::protected(&boot.config),
        auth_failures_log: RefCell::default(),
        protected_log: RefCell::default(),
        figures: Default::default(),
        figures_on: !boot.config.metrics.listen.is_empty(),
    });
    if let (Some(wal), Some(snaps)) = (&core.wal, &core.snapshots) {
        tracing::debug!(core = index, "opening the write-ahead log");
        let first = nudged("opening the write-ahead log", writer::open(wal)).await?;
        tracing::debug!(core = index, "write-ahead log open");
        let (state, c) = (wal.clone(), core.clone());
        *core.wal_task.borrow_mut() = Some(spawn_local(async move { writer::run(state, &c.recorder, first).await }));
        let (wal, snaps, c, signals) = (wal.clone(), snaps.clone(), core.clone(), boot.snapshot_requests.clone());
        *core.snapshot_task.borrow_mut() = Some(spawn_local(async move {
            snapshot::run(snaps, wal, &c.store, &c.recorder, signals).await;
        }));
    }
    spawn_local(sweep(core.clone())).detach();
    let scrapes = boot
        .scrapes
        .lock()
        .ok()
        .and_then(|mut s| s.get_mut(index as usize)?.take());
    if let Some(mut scrapes) = scrapes {
        let c = core.clone();
        // Metrics scrapes from the control core: a copy of this core's counters.
        spawn_local(async move {
            while let Some(reply) = futures::StreamExt::next(&mut scrapes).await {
                let _ = reply.send(c.figures());
            }
        })
        .detach();
    }
    if index == 0 {
        spawn_local(heartbeat(core.clone(), boot.alive_at_ms.clone())).detach();
    }
    if let Some(after) = held_after(index) {
        spawn_local(async move {
            sleep(after).await;
            tracing::warn!(
                core = index,
                "FLUX_TEST_HOLD_CORE: this core now spins without yielding"
            );
            loop {
                std::hint::spin_loop();
            }
        })
        .detach();
    }
    let CoreListeners { shared, own, resp } = listeners;
    let ports = std::iter::once(shared).chain(own).map(|l| (l, Front::Protobuf));
    for (listener, front) in ports.chain(resp.map(|l| (l, Front::Resp))) {
        core.tasks
            .spawn(accept_loop(core.clone(), listener, front))
            .map_err(|e| e.to_string())?
            .detach();
    }
    Ok(core)
}

/// The name every log segment of this run starts with (before `-core<i>`): the start time,
/// zero-padded so names sort by run.
pub fn run_name(started_ms: u64) -> String {
    format!("{started_ms:020}")
}

async fn serve_peer(core: Rc<Core>, rx: ConnectedReceiver<MeshRequest>) {
    while let Some(msg) = rx.recv().await {
        core.serve_mesh(msg);
    }
}

/// Applies held mesh messages in order as change capture makes room.
async fn drain_held(core: Rc<Core>) {
    loop {
        core.cdc_room().await;
        let Some(msg) = core.held.borrow_mut().pop_front() else {
            return;
        };
        core.handle_mesh(msg);
    }
}

async fn accept_loop(core: Rc<Core>, listener: OwnedFd, front: Front) {
    let max = core.config.limits.connections_per_core_max as u64;
    let mut refusals = Throttle::default();
    loop {
        let accept = std::pin::pin!(core.ring.accept(listener.as_raw_fd()));
        let stop = std::pin::pin!(core.shutting_down());
        let fd = match select(accept, stop).await {
            Either::Left((Ok(fd), _)) => fd,
            Either::Left((Err(e), _)) => {
                if !matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN)) {
                    tracing::warn!(core = core.index, error = %e, "accept failed");
                    sleep(ACCEPT_ERROR_BACKOFF).await;
                }
                continue;
            }
            Either::Right(_) => return,
        };
        Counters::add(&core.counters.connections_accepted, 1);
        if core.counters.connections_open.get() >= max {
            Counters::add(&core.counters.connections_refused, 1);
            if let Some(refused) = refusals.note() {
                tracing::warn!(
                    core = core.index,
                    limit = max,
                    refused,
                    "connections refused: limits.connections_per_core_max reached (logged at most every 10 s; Stats counts them all)"
                );
            }
            continue; // dropping fd closes it
        }
        match core.tasks.spawn(connection::serve(core.clone(), fd, front)) {
            Ok(task) => task.detach(),
            Err(_) => return, // the gate closed: shutting down
        };
    }
}

/// How often core 0 checks that every core answers over the mesh.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// A core that has not answered within this long is not alive.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Core 0's liveness probe: every [`HEARTBEAT_INTERVAL`] it sends every other core a
/// Heartbeat over the request mesh and, once all have answered, records the time. A core
/// stuck in a loop (or a mesh that no longer moves) stops the record, and with it systemd's
/// watchdog pings. Core 0 answers for itself by running this task.
async fn heartbeat(core: Rc<Core>, alive_at_ms: Arc<std::sync::atomic::AtomicU64>) {
    loop {
        let senders = core.mesh.borrow().clone();
        let mut waiting = Vec::new();
        if let Some(senders) = senders.as_deref() {
            for target in (1..core.keyspace.cores()).map(|c| c as usize) {
                let (reply, rx) = oneshot::channel();
                if senders.send_to(target, MeshRequest::Heartbeat { reply }).await.is_ok() {
                    waiting.push(rx);
                }
            }
        }
        let all = futures::future::join_all(waiting);
        let answered = match select(std::pin::pin!(all), std::pin::pin!(sleep(HEARTBEAT_TIMEOUT))).await {
            Either::Left((replies, _)) => replies.iter().all(Result::is_ok),
            Either::Right(_) => false,
        };
        if answered {
            alive_at_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
        let stop = std::pin::pin!(core.shutting_down());
        if let Either::Left(_) = select(stop, std::pin::pin!(sleep(HEARTBEAT_INTERVAL))).await {
            return;
        }
    }
}

/// Test-only fault switch: `FLUX_TEST_HOLD_CORE=INDEX:AFTER_MS` makes core INDEX spin
/// without yielding AFTER_MS after it starts, as a core stuck in a loop would (the watchdog
/// tests use it). Read once per core at start; unset in any real deployment.
fn held_after(index: u32) -> Option<Duration> {
    let spec = std::env::var("FLUX_TEST_HOLD_CORE").ok()?;
    let (core, after) = spec.split_once(':')?;
    (core.parse::<u32>().ok()? == index).then_some(Duration::from_millis(after.parse().ok()?))
}

/// Active expiry: remove due keys in bounded steps; when a step hit its bound, go again
/// right away (after yielding) instead of waiting a full interval. With eviction on, the
/// same steps bring a core that holds more than its memory share (after a restart with a
/// lower limit) back under it, so no single write has to evict all of the excess.
async fn sweep(core: Rc<Core>) {
    loop {
        core.prune_exports();
        // Removals are writes: none while capture holds writers or the log is failing.
        if !core.writes_ready() || core.log_failed() {
            sleep(SWEEP_INTERVAL).await;
            continue;
        }
        let removed = {
            let mut recorder = core.recorder.borrow_mut();
            // Each removal is a change event: never more than capture can take now.
            let max = recorder
                .capture
                .as_ref()
                .map_or(SWEEP_KEYS_MAX, |q| q.room().min(SWEEP_KEYS_MAX));
            let mut store = core.store.borrow_mut();
            let now = now_ms();
            let expired = store.sweep(now, max, &mut *recorder);
            Counters::add(&core.counters.expired_swept, expired as u64);
            expired + store.evict_over(now, max - expired, &mut *recorder)
        };
        if removed == SWEEP_KEYS_MAX {
            glommio::executor().yield_now().await;
        } else {
            sleep(SWEEP_INTERVAL).await;
        }
    }
}
