//! Turns a batch of request frames into responses, in order.
//!
//! The connection's task is the coordinator (Dragonfly's model): every key operation is
//! routed by `keyspace`; those for this core run inline, those for other cores are grouped
//! per target core and sent as one mesh message per core per batch. Each request becomes a
//! `Plan` that says how to build its response from the outcomes once they are all in.
//!
//! Each request kind has the same shape: check limits, plan its key operations, build the
//! response from their outcomes.

use std::ops::Range;
use std::rc::Rc;

use bytes::Bytes;
use futures::channel::oneshot;
use prost::Message;

use super::access::Session;
use super::backup;
use super::core::{Core, Counters, MeshRequest, SlotResult};
use super::forward;
use crate::change::now_ms;
use crate::cluster::gate::SlotGate;
use crate::keyspace::Keyspace;
use crate::metrics::OP_INVALID;
use crate::proto::{self, request::Op, response::Result as R, CoreStats, ErrorCode, GetResponse, Request, Response};
use crate::shard::{Command, Condition, Outcome};
use crate::wire;

/// How to build one response once outcomes are known.
enum Plan {
    Ready(Response),
    Keys { id: u64, kind: Kind, ops: Range<usize> },
    Stats { id: u64 },
    Snapshot { id: u64 },
    Backup { id: u64, op: backup::Op },
    SlotExport { id: u64, req: proto::SlotExportRequest },
    SlotPurge { id: u64, req: proto::SlotPurgeRequest },
}

#[derive(Clone, Copy)]
enum Kind {
    Get,
    Set,
    Del,
    Exists,
    Expire,
    Ttl,
    MGet,
    MSet,
    Incr,
    Append,
    Persist,
    SlotImport,
}

/// Key operations bound for one other core: (routing hash, command) in apply order, and the
/// outcome slot each one fills.
#[derive(Default)]
struct Forward {
    ops: Vec<(u64, Command)>,
    slots: Vec<usize>,
}

/// One batch in flight on one connection.
struct Batch<'a> {
    core: &'a Rc<Core>,
    now_ms: u64,
    plans: Vec<Plan>,
    /// One per key operation; `None` until a remote core answers (stays `None` if it cannot).
    outcomes: Vec<Option<Outcome>>,
    /// Per target core: the operations to send, and where their outcomes go.
    remote: Vec<Forward>,
    wants_stats: bool,
    /// Plans (by index) with a write applied on this core: their acknowledgement waits for
    /// this core's log.
    local_writes: Vec<usize>,
    /// The connection's authentication: checked before each request is planned, changed by
    /// Auth requests (so a pipelined Auth applies to the requests after it).
    session: &'a mut Session,
}

/// Executes the requests in `frames` (payloads of complete frames) and returns one response
/// per frame, in the same order.
///
/// A write is acknowledged only once the log holds it: when the log fails first, its
/// response becomes STORAGE_UNAVAILABLE (reads in the same batch are answered normally).
pub async fn execute(core: &Rc<Core>, session: &mut Session, frames: impl Iterator<Item = Bytes>) -> Vec<Response> {
    let batch_keys_max = core.config.limits.batch_keys_max;
    let requests: Vec<_> = frames.map(|p| decode(p, batch_keys_max)).collect();
    execute_requests(core, session, requests).await
}

/// [`execute`] for requests already decoded (or refused while decoding): the Redis front
/// end builds them from commands.
pub async fn execute_requests(
    core: &Rc<Core>,
    session: &mut Session,
    requests: Vec<Result<Request, Box<Response>>>,
) -> Vec<Response> {
    let decoded = std::time::Instant::now();
    let kinds: Vec<u8> = requests
        .iter()
        .map(|r| r.as_ref().map_or(OP_INVALID, |r| op_kind(r.op.as_ref())) as u8)
        .collect();
    // Change capture (or a backup's cut) may hold writers back; reads, Stats and the rest
    // never wait for it. From here to the end of planning, where local writes are applied,
    // the batch counts as applying: a backup's cut waits for it.
    let has_writes = requests.iter().any(|r| r.as_ref().is_ok_and(writes));
    if has_writes && !core.writes_ready() {
        core.cdc_room().await;
    }
    let applying = has_writes.then(|| core.applying());
    let cores = core.keyspace.cores() as usize;
    let mut batch = Batch {
        core,
        now_ms: now_ms(),
        plans: Vec::new(),
        outcomes: Vec::new(),
        remote: (0..cores).map(|_| Forward::default()).collect(),
        wants_stats: false,
        local_writes: Vec::new(),
        session,
    };
    prefetch(core, &requests);
    for request in requests {
        let plan = match request {
            Ok(req) => batch.plan(req).await,
            Err(refusal) => Plan::Ready(*refusal),
        };
        batch.plans.push(plan);
        glommio::yield_if_needed().await;
    }
    drop(applying);
    let local_writes = std::mem::take(&mut batch.local_writes);
    let mut responses = batch.finish().await;
    // Acknowledge only what the log holds (waits only with fsync = always; every
    // connection of the round shares one fdatasync). Reads wait too, so no reply shows a
    // change before it is durable. Other cores answer for their own logs.
    if !core.wal_durable().await {
        for i in local_writes {
            let r = &mut responses[i];
            if changed(r) {
                *r = error(r.id, ErrorCode::StorageUnavailable, NOT_DURABLE.into());
            }
        }
    }
    observe(core, &kinds, &responses, decoded.elapsed().as_micros() as u64);
    responses
}

/// Keys of one batch whose table slots and items are loaded ahead: about 200 bytes of
/// cache each, so the batch's share stays well inside L2 and the first keys' lines are
/// still there when their turn comes.
const PREFETCH_KEYS_MAX: usize = 512;

/// Starts loading, for the keys of a batch that this core owns (pipelined requests, or an
/// MGET's or MSET's keys), the table slots and items they will touch. Each key costs two
/// dependent cache misses (its table group, then its item); taken one key after another
/// they are paid in turn, while issued here for the whole batch first they overlap
/// (bench/results/store-throughput.md). A lone single-key request gains nothing from it.
fn prefetch(core: &Core, requests: &[Result<Request, Box<Response>>]) {
    let single = |r: &Result<Request, Box<Response>>| {
        !matches!(r.as_ref().map(|r| r.op.as_ref()), Ok(Some(Op::Mget(_) | Op::Mset(_))))
    };
    if requests.len() == 1 && single(&requests[0]) {
        return;
    }
    let store = core.store.borrow();
    let mut budget = PREFETCH_KEYS_MAX;
    let mut ahead = |key: &Bytes| {
        if budget == 0 {
            return false;
        }
        budget -= 1;
        let hash = Keyspace::hash(key);
        if core.keyspace.core_of_shard(core.keyspace.shard_of_hash(hash)) == core.index {
            store.prefetch(hash);
        }
        true
    };
    for r in requests.iter().flatten() {
        let more = match &r.op {
            Some(Op::Get(r)) => ahead(&r.key),
            Some(Op::Set(r)) => ahead(&r.key),
            Some(Op::Del(r)) => ahead(&r.key),
            Some(Op::Exists(r)) => ahead(&r.key),
            Some(Op::Incr(r)) => ahead(&r.key),
            Some(Op::Mget(r)) => r.keys.iter().all(&mut ahead),
            Some(Op::Mset(r)) => r.entries.iter().all(|e| ahead(&e.key)),
            _ => true,
        };
        if !more {
            return;
        }
    }
}

/// Counts each answered request in the core's figures: its kind and latency (from the
/// batch's decode to its replies being ready), its error code, and GET/MGET hits.
fn observe(core: &Core, kinds: &[u8], responses: &[Response], elapsed_us: u64) {
    // Only /metrics shows them: with the endpoint off, requests cost nothing extra.
    if !core.figures_on {
        return;
    }
    let f = &core.figures;
    for (kind, r) in kinds.iter().zip(responses) {
        f.observe(usize::from(*kind), elapsed_us);
        if let Some(e) = &r.error {
            f.error(e.code);
        }
        match &r.result {
            Some(R::Get(g)) => f.read(g.found),
            Some(R::Mget(m)) => m.values.iter().for_each(|v| f.read(v.found)),
            _ => {}
        }
    }
}

/// The index of a request's kind in `metrics::OPS`.
fn op_kind(op: Option<&Op>) -> usize {
    match op {
        Some(Op::Get(_)) => 0,
        Some(Op::Set(_)) => 1,
        Some(Op::Del(_)) => 2,
        Some(Op::Exists(_)) => 3,
        Some(Op::Expire(_)) => 4,
        Some(Op::Ttl(_)) => 5,
        Some(Op::Mget(_)) => 6,
        Some(Op::Mset(_)) => 7,
        Some(Op::Ping(_)) => 8,
        Some(Op::Stats(_)) => 9,
        Some(Op::Hello(_)) => 10,
        Some(Op::Snapshot(_)) => 11,
        Some(Op::Auth(_)) => 12,
        Some(Op::Backup(_) | Op::BackupRead(_) | Op::BackupEnd(_)) => 13,
        Some(Op::Incr(_)) => 14,
        Some(Op::Append(_)) => 15,
        Some(Op::Persist(_)) => 16,
        Some(Op::SlotExport(_) | Op::SlotImport(_) | Op::SlotPurge(_)) => 17,
        None => OP_INVALID,
    }
}

/// Whether a successful write response says it changed something (and so has a record).
/// Named in full, like [`writes`], so a new response must be classified here.
fn changed(r: &Response) -> bool {
    let Some(result) = &r.result else { return false };
    match result {
        R::Set(s) => s.applied,
        R::Del(d) => d.existed,
        R::Expire(e) => e.applied,
        R::Mset(_) | R::Incr(_) | R::Append(_) => true,
        R::SlotImport(i) => i.applied > 0,
        R::Persist(p) => p.applied,
        R::Get(_)
        | R::Exists(_)
        | R::Ttl(_)
        | R::Mget(_)
        | R::Ping(_)
        | R::Stats(_)
        | R::Hello(_)
        | R::Snapshot(_)
        | R::Auth(_)
        | R::Backup(_)
        | R::BackupRead(_)
        | R::BackupEnd(_)
        | R::SlotExport(_)
        | R::SlotPurge(_) => false,
    }
}

/// Why a write applied just before the log failed is not acknowledged.
const NOT_DURABLE: &str = "the write-ahead log failed before this write was durable: it is not acknowledged (the node logs it if its log recovers before it stops)";

/// Why a write is refused while the log is failing.
const STORAGE_UNAVAILABLE: &str = "the write-ahead log cannot be written (see Stats: persistence.degraded, log_error): writes are refused until it can; reads keep working";

/// Largest names a request may carry: an Auth's user name plus token (tokens are 64
/// characters; the token is hashed on the shard core), a backup request's id plus file
/// name. Bounded well below a key's size.
const NAMES_BYTES_MAX: usize = 1024;

/// Keys (or entries) a core handles between two chances to yield; a batch larger than
/// this is planned, applied and answered in slices so one request cannot stall the core.
pub const SLICE_KEYS: usize = 256;

/// Called before handling item `i` of a batch: at each slice boundary, yields if the
/// executor has other work waiting (glommio's preempt timer says so).
pub async fn slice_point(i: usize) {
    if i > 0 && i.is_multiple_of(SLICE_KEYS) {
        glommio::yield_if_needed().await;
    }
}

/// Decodes one request frame, refusing an MGET or MSET of more than `batch_keys_max` keys
/// from a count taken without decoding (so an oversized request costs a scan, not its
/// allocations). The scan never counts fewer keys than prost decodes (`tests/properties.rs`
/// and the `request_frames` fuzz target check it), so this is the limit's only check. The
/// `Err` is the response to send.
fn decode(payload: Bytes, batch_keys_max: usize) -> Result<Request, Box<Response>> {
    if wire::batch_keys(&payload, batch_keys_max) > batch_keys_max {
        let id = wire::request_id(&payload).unwrap_or(0);
        return Err(Box::new(error(
            id,
            ErrorCode::BatchTooLarge,
            too_many_keys(batch_keys_max),
        )));
    }
    Request::decode(payload).map_err(|e| {
        Box::new(error(
            0,
            ErrorCode::InvalidRequest,
            format!("request does not decode: {e}"),
        ))
    })
}

fn too_many_keys(max: usize) -> String {
    format!("more than limits.batch_keys_max ({max}) keys in one request; split it")
}

/// Whether a request changes keys. Every op is named, without a catch-all, so a new op
/// must be classified here (one that slipped past as a read would bypass change
/// capture's back-pressure and a backup's cut).
fn writes(r: &Request) -> bool {
    let Some(op) = &r.op else { return false };
    match op {
        Op::Set(_)
        | Op::Del(_)
        | Op::Expire(_)
        | Op::Mset(_)
        | Op::Incr(_)
        | Op::Append(_)
        | Op::Persist(_)
        | Op::SlotImport(_) => true,
        Op::Get(_)
        | Op::Exists(_)
        | Op::Ttl(_)
        | Op::Mget(_)
        | Op::Ping(_)
        | Op::Hello(_)
        | Op::Auth(_)
        | Op::Stats(_)
        | Op::Snapshot(_)
        | Op::Backup(_)
        | Op::BackupRead(_)
        | Op::BackupEnd(_)
        | Op::SlotExport(_)
        | Op::SlotPurge(_) => false,
    }
}

/// One `SHUTTING_DOWN` response per frame, keeping ids where the frame decodes.
pub fn refuse_all(core: &Core, frames: impl Iterator<Item = Bytes>) -> Vec<Response> {
    let (kinds, responses): (Vec<u8>, Vec<Response>) = frames
        .map(|p| {
            let (id, kind) = Request::decode(p).map_or((0, OP_INVALID), |r| (r.id, op_kind(r.op.as_ref())));
            let r = error(id, ErrorCode::ShuttingDown, "the server is shutting down".into());
            (kind as u8, r)
        })
        .unzip();
    observe(core, &kinds, &responses, 0);
    responses
}

impl Batch<'_> {
    async fn plan(&mut self, req: Request) -> Plan {
        let id = req.id;
        let Some(op) = req.op else {
            return Plan::Ready(error(id, ErrorCode::InvalidRequest, "request has no op".into()));
        };
        if let Err(e) = self.session.authorize(&op) {
            Counters::add(&self.core.counters.requests_denied, 1);
            return Plan::Ready(Response {
                id,
                error: Some(e),
                result: None,
            });
        }
        if let Err(e) = self.check(&op) {
            return Plan::Ready(Response {
                id,
                error: Some(e),
                result: None,
            });
        }
        let start = self.outcomes.len();
        let kind = match op {
            Op::Get(r) => self.route(Kind::Get, Command::Get { key: r.key }),
            Op::Del(r) => self.route(Kind::Del, Command::Del { key: r.key }),
            Op::Exists(r) => self.route(Kind::Exists, Command::Exists { key: r.key }),
            Op::Ttl(r) => self.route(Kind::Ttl, Command::Ttl { key: r.key }),
            Op::Expire(r) => self.route(
                Kind::Expire,
                Command::Expire {
                    key: r.key,
                    ttl_ms: r.ttl_ms,
                },
            ),
            Op::Set(r) => {
                let condition = match r.condition() {
                    proto::SetCondition::Always => Condition::Always,
                    proto::SetCondition::IfAbsent => Condition::IfAbsent,
                    proto::SetCondition::IfPresent => Condition::IfPresent,
                };
                self.route(
                    Kind::Set,
                    Command::Set {
                        key: r.key,
                        value: r.value,
                        ttl_ms: r.ttl_ms,
                        condition,
                        keep_ttl: r.keep_ttl,
                        return_old: r.return_old,
                    },
                )
            }
            Op::Incr(r) => self.route(Kind::Incr, Command::Incr { key: r.key, by: r.by }),
            Op::Append(r) => {
                let value_bytes_max = self.core.config.limits.value_bytes_max;
                let cmd = Command::Append {
                    key: r.key,
                    value: r.value,
                    value_bytes_max,
                };
                self.route(Kind::Append, cmd)
            }
            Op::Persist(r) => self.route(Kind::Persist, Command::Persist { key: r.key }),
            // Applied in slices: other connections' requests may run between two slices,
            // so a large MSET is not isolated (it never was across cores).
            Op::Mget(r) => {
                for (i, key) in r.keys.into_iter().enumerate() {
                    slice_point(i).await;
                    self.route(Kind::MGet, Command::Get { key });
                }
                Kind::MGet
            }
            Op::Mset(r) => {
                for (i, e) in r.entries.into_iter().enumerate() {
                    slice_point(i).await;
                    let cmd = Command::Set {
                        key: e.key,
                        value: e.value,
                        ttl_ms: 0,
                        condition: Condition::Always,
                        keep_ttl: false,
                        return_old: false,
                    };
                    self.route(Kind::MSet, cmd);
                }
                Kind::MSet
            }
            Op::Ping(r) => return Plan::Ready(ok(id, R::Ping(proto::PingResponse { payload: r.payload }))),
            Op::Hello(_) => {
                let mut hello = self.core.hello.clone();
                if let Some(gate) = &self.core.slots {
                    hello.slots = gate.slots();
                    hello.slot_table_version = gate.version();
                }
                return Plan::Ready(ok(id, R::Hello(hello)));
            }
            Op::SlotImport(r) => {
                for (i, e) in r.entries.into_iter().enumerate() {
                    slice_point(i).await;
                    let cmd = if e.found {
                        Command::Import {
                            key: e.key,
                            value: e.value,
                            expire_at_ms: e.expire_at_ms,
                        }
                    } else {
                        Command::Unimport { key: e.key }
                    };
                    self.route(Kind::SlotImport, cmd);
                }
                Kind::SlotImport
            }
            Op::SlotExport(r) => return self.slot_op(id, r.slot, Plan::SlotExport { id, req: r }),
            Op::SlotPurge(r) => {
                let slot = r.slot;
                return self.slot_op(id, slot, Plan::SlotPurge { id, req: r });
            }
            Op::Auth(r) => return Plan::Ready(self.authenticate(id, r)),
            Op::Stats(_) => {
                self.wants_stats = true;
                return Plan::Stats { id };
            }
            Op::Snapshot(_) => {
                if self.core.snapshots.is_none() {
                    return Plan::Ready(error(
                        id,
                        ErrorCode::InvalidRequest,
                        "persistence is off: there is nothing to snapshot".into(),
                    ));
                }
                return Plan::Snapshot { id };
            }
            Op::Backup(_) => {
                return Plan::Backup {
                    id,
                    op: backup::Op::Begin,
                }
            }
            Op::BackupRead(r) => {
                return Plan::Backup {
                    id,
                    op: backup::Op::Read(r),
                }
            }
            Op::BackupEnd(r) => {
                return Plan::Backup {
                    id,
                    op: backup::Op::End(r),
                }
            }
        };
        Plan::Keys {
            id,
            kind,
            ops: start..self.outcomes.len(),
        }
    }

    /// Limits are checked for the whole request before any part of it is applied.
    fn check(&self, op: &Op) -> Result<(), proto::Error> {
        let limits = &self.core.config.limits;
        let key = |k: &Bytes| {
            within(
                k.len(),
                limits.key_bytes_max,
                ErrorCode::KeyTooLarge,
                "key",
                "limits.key_bytes_max",
            )
        };
        let value = |v: &Bytes| {
            within(
                v.len(),
                limits.value_bytes_max,
                ErrorCode::ValueTooLarge,
                "value",
                "limits.value_bytes_max",
            )
        };
        let names = |len: usize, what: &str| {
            within(
                len,
                NAMES_BYTES_MAX,
                ErrorCode::InvalidRequest,
                what,
                "the limit on names",
            )
        };
        match op {
            Op::Get(r) => key(&r.key),
            Op::Del(r) => key(&r.key),
            Op::Exists(r) => key(&r.key),
            Op::Ttl(r) => key(&r.key),
            Op::Expire(r) => key(&r.key),
            Op::Incr(r) => key(&r.key),
            Op::Persist(r) => key(&r.key),
            Op::Append(r) => key(&r.key).and_then(|()| value(&r.value)),
            Op::Set(r) if r.keep_ttl && r.ttl_ms != 0 => Err(err(
                ErrorCode::InvalidRequest,
                "keep_ttl and ttl_ms together: choose one".into(),
            )),
            Op::Set(r) => {
                if proto::SetCondition::try_from(r.condition).is_err() {
                    return Err(err(
                        ErrorCode::InvalidRequest,
                        format!("unknown set condition {}", r.condition),
                    ));
                }
                key(&r.key).and_then(|()| value(&r.value))
            }
            // The key count was checked from the frame, before decoding (see `decode`).
            Op::Mget(r) => r.keys.iter().try_for_each(key),
            Op::Mset(r) => r
                .entries
                .iter()
                .try_for_each(|e| key(&e.key).and_then(|()| value(&e.value))),
            Op::Auth(r) => names(r.user.len() + r.token.len(), "user and token"),
            Op::BackupRead(r) => names(r.backup_id.len() + r.name.len(), "backup id and file name"),
            Op::BackupEnd(r) => names(r.backup_id.len(), "backup id"),
            Op::SlotImport(r) => {
                within(
                    r.entries.len(),
                    limits.batch_keys_max,
                    ErrorCode::BatchTooLarge,
                    "slot import",
                    "limits.batch_keys_max",
                )?;
                r.entries
                    .iter()
                    .try_for_each(|e| key(&e.key).and_then(|()| value(&e.value)))
            }
            Op::Ping(_)
            | Op::Hello(_)
            | Op::Stats(_)
            | Op::Snapshot(_)
            | Op::Backup(_)
            | Op::SlotExport(_)
            | Op::SlotPurge(_) => Ok(()),
        }
    }

    /// A slot operation goes ahead only on a node in a cluster, for a slot that exists.
    fn slot_op(&self, id: u64, slot: u32, plan: Plan) -> Plan {
        match &self.core.slots {
            None => Plan::Ready(error(
                id,
                ErrorCode::InvalidRequest,
                "this node is not in a cluster".into(),
            )),
            Some(gate) if slot >= gate.slots() => Plan::Ready(error(
                id,
                ErrorCode::InvalidRequest,
                format!("slot {slot} does not exist (the cluster has {})", gate.slots()),
            )),
            Some(_) => plan,
        }
    }

    /// Checks an Auth request against the users table of the moment. With auth off every
    /// connection may do everything already, so any Auth succeeds (clients can be given
    /// tokens before a node starts requiring them).
    fn authenticate(&mut self, id: u64, r: proto::AuthRequest) -> Response {
        let access = self.core.access.load();
        let Some(users) = &access.users else {
            let role = crate::auth::Role::Admin.as_str().to_string();
            return ok(id, R::Auth(proto::AuthResponse { user: r.user, role }));
        };
        if let Some(grant) = users.verify(&r.user, &r.token) {
            let reply = proto::AuthResponse {
                user: grant.user.clone(),
                role: grant.role.as_str().to_string(),
            };
            self.session.grant = Some(grant);
            return ok(id, R::Auth(reply));
        }
        let session = &mut *self.session;
        session.failures += 1;
        let max = self.core.config.auth.failures_max;
        session.close = session.failures >= max;
        Counters::add(&self.core.counters.auth_failures, 1);
        if let Some(failures) = self.core.auth_failures_log.borrow_mut().note() {
            tracing::warn!(
                core = self.core.index,
                peer = ?session.peer,
                user = %r.user.chars().take(64).collect::<String>(),
                failures,
                "authentication failed (logged at most every 10 s per core; Stats counts every one)"
            );
        }
        error(
            id,
            ErrorCode::Unauthenticated,
            if session.close {
                format!("unknown user or wrong token; {max} failures (auth.failures_max): closing the connection")
            } else {
                "unknown user or wrong token".into()
            },
        )
    }

    /// Applies `cmd` now if this core owns its key, else queues it for the owner core.
    fn route(&mut self, kind: Kind, cmd: Command) -> Kind {
        let ks = &self.core.keyspace;
        let hash = Keyspace::hash(cmd.key());
        let owner = ks.core_of_shard(ks.shard_of_hash(hash));
        if owner == self.core.index {
            // The plan being built is pushed once planned: its index is the count so far.
            let plan = self.plans.len();
            if cmd.writes() && self.local_writes.last() != Some(&plan) {
                self.local_writes.push(plan);
            }
            let outcome = self.core.apply(hash, cmd, self.now_ms);
            self.outcomes.push(Some(outcome));
        } else {
            let forward = &mut self.remote[owner as usize];
            forward.ops.push((hash, cmd));
            forward.slots.push(self.outcomes.len());
            self.outcomes.push(None);
        }
        kind
    }

    async fn finish(mut self) -> Vec<Response> {
        let mut waiting = Vec::new();
        for (target, Forward { ops, slots }) in std::mem::take(&mut self.remote).into_iter().enumerate() {
            if !ops.is_empty() {
                waiting.push((forward::forward(self.core, target, ops), slots));
            }
        }
        let senders = self.core.mesh.borrow().clone();
        let stats = if self.wants_stats {
            Some(self.gather_stats(senders.as_deref()).await)
        } else {
            None
        };
        for (rx, slots) in waiting {
            // A cancelled reply means the owner core is stopping: those slots stay None.
            if let Ok(outcomes) = rx.await {
                debug_assert_eq!(outcomes.len(), slots.len());
                for (slot, outcome) in slots.into_iter().zip(outcomes) {
                    self.outcomes[slot] = Some(outcome);
                }
            }
        }
        // Rare and slow (seconds for large data): one round serves every Snapshot request
        // of the batch.
        let snapshot = if self.plans.iter().any(|p| matches!(p, Plan::Snapshot { .. })) {
            Some(snapshot_all(self.core, senders.as_deref()).await)
        } else {
            None
        };
        let frame_bytes_max = self.core.config.limits.frame_bytes_max;
        let mut responses = Vec::with_capacity(self.plans.len());
        for plan in std::mem::take(&mut self.plans) {
            let r = match plan {
                Plan::Snapshot { id } => match snapshot.clone().expect("gathered above") {
                    Ok(r) => ok(id, R::Snapshot(r)),
                    Err(e) => error(id, ErrorCode::Internal, e),
                },
                Plan::Ready(r) => r,
                Plan::SlotExport { id, req } => {
                    let slot = req.slot;
                    let asked = self.on_slot_core(slot, senders.as_deref(), |reply| MeshRequest::Export { req, reply });
                    match asked.await {
                        Ok(r) => ok(id, R::SlotExport(r)),
                        Err((code, e)) => error(id, code, e),
                    }
                }
                Plan::SlotPurge { id, req } => {
                    let asked = self.on_slot_core(req.slot, senders.as_deref(), |reply| MeshRequest::Purge {
                        slot: req.slot,
                        keys_max: req.keys_max,
                        importing: req.importing,
                        reply,
                    });
                    match asked.await {
                        Ok(r) => ok(id, R::SlotPurge(r)),
                        Err((code, e)) => error(id, code, e),
                    }
                }
                Plan::Backup { id, op } => match backup::handle(self.core, senders.as_deref(), op).await {
                    Ok(r) => ok(id, r),
                    Err((code, e)) => error(id, code, e),
                },
                Plan::Stats { id } => {
                    let cores = stats.clone().unwrap_or_default();
                    let persistence = proto::PersistenceStats {
                        degraded: cores.iter().any(|c| c.log_failed),
                        ..self.core.persistence.clone()
                    };
                    ok(
                        id,
                        R::Stats(proto::StatsResponse {
                            cores,
                            cdc: Some(Box::new(self.core.cdc.snapshot(self.core.config.cdc.enabled))),
                            persistence: Some(Box::new(persistence)),
                        }),
                    )
                }
                Plan::Keys { id, kind, ops } => {
                    let r = respond(id, kind, self.core.slots.as_deref(), &mut self.outcomes[ops]);
                    if matches!(kind, Kind::MGet) && wire::frame_len(&r) > frame_bytes_max {
                        error(
                            id,
                            ErrorCode::FrameTooLarge,
                            format!("reply would exceed limits.frame_bytes_max ({frame_bytes_max}); split the MGET"),
                        )
                    } else {
                        r
                    }
                }
            };
            responses.push(r);
            glommio::yield_if_needed().await;
        }
        responses
    }

    /// Runs a slot operation on the core that owns the slot's shard (here, or sent there)
    /// and waits for its answer; `msg` builds the request around its reply channel.
    async fn on_slot_core<T>(
        &self,
        slot: u32,
        senders: Option<&glommio::channels::channel_mesh::Senders<MeshRequest>>,
        msg: impl FnOnce(oneshot::Sender<SlotResult<T>>) -> MeshRequest,
    ) -> SlotResult<T> {
        let stopping = || (ErrorCode::ShuttingDown, STOPPING.to_string());
        let (reply, rx) = oneshot::channel();
        let msg = msg(reply);
        let ks = &self.core.keyspace;
        let owner = ks.core_of_shard(ks.shard_of_hash(u64::from(slot)));
        if owner == self.core.index {
            self.core.handle_mesh(msg);
        } else {
            let senders = senders.ok_or_else(stopping)?;
            senders.send_to(owner as usize, msg).await.map_err(|_| stopping())?;
        }
        rx.await.map_err(|_| stopping())?
    }

    async fn gather_stats(
        &self,
        senders: Option<&glommio::channels::channel_mesh::Senders<MeshRequest>>,
    ) -> Vec<CoreStats> {
        let cores = self.core.keyspace.cores();
        let mut all = vec![None; cores as usize];
        all[self.core.index as usize] = Some(self.core.stats());
        if let Some(senders) = senders {
            let mut waiting = Vec::new();
            for target in (0..cores).filter(|c| *c != self.core.index) {
                let (reply, rx) = oneshot::channel();
                if senders
                    .send_to(target as usize, MeshRequest::Stats { reply })
                    .await
                    .is_ok()
                {
                    waiting.push((target, rx));
                }
            }
            for (target, rx) in waiting {
                all[target as usize] = rx.await.ok();
            }
        }
        // A core that could not answer (stopping) still gets its row, with only its index.
        all.into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.unwrap_or(CoreStats {
                    core: i as u32,
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// Runs a snapshot round on every core at once and sums what they wrote.
async fn snapshot_all(
    core: &Rc<Core>,
    senders: Option<&glommio::channels::channel_mesh::Senders<MeshRequest>>,
) -> Result<proto::SnapshotResponse, String> {
    let mut waiting = vec![futures::future::Either::Left(core.snapshot())];
    if let Some(senders) = senders {
        for target in (0..core.keyspace.cores()).filter(|c| *c != core.index) {
            let (reply, rx) = oneshot::channel();
            senders
                .send_to(target as usize, MeshRequest::Snapshot { reply })
                .await
                .map_err(|_| format!("core {target} is shutting down"))?;
            waiting.push(futures::future::Either::Right(async move {
                rx.await.unwrap_or_else(|_| Err("a core is shutting down".into()))
            }));
        }
    }
    let mut total = proto::SnapshotResponse::default();
    for r in futures::future::join_all(waiting).await {
        let r = r?;
        total.shards += r.shards;
        total.keys += r.keys;
        total.bytes += r.bytes;
        total.millis = total.millis.max(r.millis);
        total.log_bytes_released += r.log_bytes_released;
    }
    Ok(total)
}

/// What a request answered while a core stops.
const STOPPING: &str = "a core is shutting down";

/// In a cluster: the answer for a request one of whose keys this node may not apply now
/// (the first such key decides), else None.
fn slot_refusal(id: u64, gate: Option<&SlotGate>, outcomes: &[Option<Outcome>]) -> Option<Response> {
    let gate = gate?;
    outcomes.iter().find_map(|o| match o {
        Some(Outcome::Moved(slot)) => {
            let (node_id, addr) = gate.owner_of(*slot);
            let mut r = error(
                id,
                ErrorCode::Moved,
                format!("slot {slot} is owned by {node_id} at {addr}"),
            );
            if let Some(e) = &mut r.error {
                (e.slot, e.node_id, e.addr) = (*slot, node_id, addr);
            }
            Some(r)
        }
        Some(Outcome::TryAgain(slot)) => Some(error(
            id,
            ErrorCode::TryAgain,
            format!("slot {slot} is changing owner; resend shortly"),
        )),
        Some(Outcome::ClusterDown) => Some(error(id, ErrorCode::ClusterDown, gate.down_reason())),
        Some(Outcome::NotImporting(slot)) => Some(error(
            id,
            ErrorCode::InvalidRequest,
            format!("slot {slot} is not being imported by this node"),
        )),
        _ => None,
    })
}

/// Builds the response of a key request from its outcomes.
fn respond(id: u64, kind: Kind, gate: Option<&SlotGate>, outcomes: &mut [Option<Outcome>]) -> Response {
    if outcomes.iter().any(Option::is_none) {
        return error(
            id,
            ErrorCode::ShuttingDown,
            "a core owning one of the keys is shutting down".into(),
        );
    }
    if let Some(refused) = slot_refusal(id, gate, outcomes) {
        return refused;
    }
    if outcomes.iter().any(|o| matches!(o, Some(Outcome::StorageUnavailable))) {
        return error(id, ErrorCode::StorageUnavailable, STORAGE_UNAVAILABLE.into());
    }
    if outcomes.iter().any(|o| matches!(o, Some(Outcome::OutOfMemory))) {
        return error(
            id,
            ErrorCode::OutOfMemory,
            "limits.memory_bytes_max reached: the write does not fit (limits.eviction = none, or it needs more than the core can evict)".into(),
        );
    }
    match outcomes.first() {
        Some(Some(Outcome::NotInteger)) => {
            return error(
                id,
                ErrorCode::NotAnInteger,
                "value is not an integer or out of range".into(),
            )
        }
        Some(Some(Outcome::Overflow)) => {
            return error(
                id,
                ErrorCode::NotAnInteger,
                "increment or decrement would overflow".into(),
            )
        }
        Some(Some(Outcome::TooLarge)) => {
            return error(
                id,
                ErrorCode::ValueTooLarge,
                "the appended value would exceed limits.value_bytes_max".into(),
            )
        }
        _ => {}
    }
    let mut it = outcomes.iter_mut().map(|o| o.take().unwrap_or(Outcome::Applied(false)));
    let mut one = || it.next().unwrap_or(Outcome::Applied(false));
    let applied = |o: Outcome| matches!(o, Outcome::Applied(true));
    let result = match kind {
        Kind::Get => R::Get(get_response(one())),
        Kind::Set => R::Set(match one() {
            Outcome::Old { applied, old } => proto::SetResponse {
                applied,
                old_found: old.is_some(),
                old_value: old.unwrap_or_default(),
            },
            o => proto::SetResponse {
                applied: applied(o),
                ..Default::default()
            },
        }),
        Kind::Incr => R::Incr(proto::IncrResponse {
            value: match one() {
                Outcome::Int(n) => n,
                _ => 0,
            },
        }),
        Kind::Append => R::Append(proto::AppendResponse {
            length: match one() {
                Outcome::Int(n) => n as u64,
                _ => 0,
            },
        }),
        Kind::Persist => R::Persist(proto::PersistResponse {
            applied: applied(one()),
        }),
        Kind::Del => R::Del(proto::DelResponse {
            existed: applied(one()),
        }),
        Kind::Exists => R::Exists(proto::ExistsResponse { exists: applied(one()) }),
        Kind::Expire => R::Expire(proto::ExpireResponse {
            applied: applied(one()),
        }),
        Kind::Ttl => R::Ttl(proto::TtlResponse {
            ttl_ms: match one() {
                Outcome::Ttl(t) => t,
                _ => -2,
            },
        }),
        Kind::MGet => R::Mget(proto::MGetResponse {
            values: it.map(get_response).collect(),
        }),
        Kind::MSet => R::Mset(proto::MSetResponse {}),
        Kind::SlotImport => R::SlotImport(proto::SlotImportResponse {
            applied: it.count() as u64,
        }),
    };
    ok(id, result)
}

fn get_response(o: Outcome) -> GetResponse {
    match o {
        Outcome::Value(Some(value)) => GetResponse { found: true, value },
        _ => GetResponse {
            found: false,
            value: Bytes::new(),
        },
    }
}

/// `Ok` when `len <= max`, else the error `code` naming the limit.
fn within(len: usize, max: usize, code: ErrorCode, what: &str, limit: &str) -> Result<(), proto::Error> {
    if len > max {
        return Err(err(code, format!("{what} of {len} bytes exceeds {limit} ({max})")));
    }
    Ok(())
}

fn ok(id: u64, result: R) -> Response {
    Response {
        id,
        error: None,
        result: Some(result),
    }
}

fn err(code: ErrorCode, message: String) -> proto::Error {
    proto::Error {
        code: code as i32,
        message,
        ..Default::default()
    }
}

/// An error response.
pub fn error(id: u64, code: ErrorCode, message: String) -> Response {
    Response {
        id,
        error: Some(err(code, message)),
        result: None,
    }
}
