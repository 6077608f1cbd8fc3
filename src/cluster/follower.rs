//! The node's side of the slot table, run on the control core: load it (creating it when
//! this node is the cluster's first), apply every change to the [`SlotGate`], drop the keys
//! of slots that moved away, and import the slots migrating to this node.
//!
//! # Migrating a slot to this node
//! The table lists the migration (`flux-cli cluster move|rebalance|drain` put it there);
//! the source then notes every write to the slot. This node (the target):
//! 1. drops whatever it holds of the slot (an interrupted earlier copy);
//! 2. pulls the slot from the source with SLOT_EXPORT (its keys, then the keys written
//!    since, each with its value at the time) and writes it into itself with SLOT_IMPORT,
//!    acknowledged once its log holds it;
//! 3. once little is left, asks the source to hold the slot's writes, pulls the rest, and
//!    flips the owner in etcd with a transaction that also checks the migration's epoch
//!    (one transaction for every slot of this node ready to flip: `Flips`);
//! 4. serves the slot at once. The source sees the new table, answers MOVED, and drops its
//!    copy.
//!
//! Killed anywhere, nothing is lost and no slot gets two owners: until the flip the source
//! owns the slot and has every acknowledged write (a held write was refused, not
//! acknowledged); the flip is one compare-and-swap; a restarted target starts the copy
//! again from step 1; a restarted source bumps the epoch before it serves the slot again,
//! so a copy completed before its restart can no longer flip (it may lack writes the
//! restarted source accepted) and is started again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client as Etcd, EventType, GetOptions, WatchOptions};
use tokio::task::JoinHandle;

use super::gate::{SlotGate, SlotState};
use super::slots::{self, Decision, Migration, Table};
use super::{EtcdAccess, NodeInfo};
use crate::client::{Client, ClientConfig};
use crate::proto::SlotExportRequest;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the watch loop looks at the stop flag (and at stale holds).
const STOP_POLL: Duration = Duration::from_millis(100);
/// A slot whose writes this node has held for this long has lost its importer (it died
/// between its hold and its flip): the hold ends, after the migration's epoch is bumped so
/// that importer can no longer flip (it would lack the writes accepted from then on).
const HOLD_MS_MAX: u64 = 5_000;
/// Keys left to copy at which the target asks the source to hold the slot's writes: a few
/// milliseconds of copying, the longest a write to the slot then waits.
const HOLD_AT_KEYS: u64 = 2_000;
/// Copy rounds after which the hold is asked for whatever is left: a slot written faster
/// than it copies still moves, with a longer pause.
const ROUNDS_BEFORE_HOLD: u32 = 64;
/// Keys one SLOT_PURGE step drops.
const PURGE_STEP: u32 = 2_000;

/// What the follower needs; built by the server at start.
pub struct Follower {
    pub endpoints: Vec<String>,
    pub access: EtcdAccess,
    pub prefix: String,
    pub gate: Arc<SlotGate>,
    /// This node's protobuf port, on loopback when it listens on a wildcard address.
    pub local: SocketAddr,
    /// How to reach nodes' ports (credentials from `cluster.peer_token_file`).
    pub peer: ClientConfig,
    /// Set once the table is applied: only then does the node register.
    pub joined: tokio::sync::watch::Sender<bool>,
    pub serving: tokio::sync::watch::Receiver<bool>,
    /// `cluster.auto_rebalance`: stand in the election, and rebalance while leader.
    pub auto_rebalance: bool,
}

/// Slots the automatic rebalancer moves at once: gentle, since nobody asked for it now.
const AUTO_PARALLEL: usize = 4;
/// How long membership must stay unchanged before the leader rebalances: a node that is
/// restarting, or several joining one after another, cause one rebalance, not several.
const AUTO_SETTLE: Duration = Duration::from_secs(2);
/// How often the leader looks at the table.
const AUTO_TICK: Duration = Duration::from_millis(500);
/// Lease of the leader's election key: another node takes over this long after the
/// leader dies.
const LEADER_LEASE_S: i64 = 5;

/// Shared by the follower's tasks.
struct Ctx {
    prefix: String,
    gate: Arc<SlotGate>,
    local: SocketAddr,
    peer: ClientConfig,
    etcd: tokio::sync::Mutex<Option<Etcd>>,
    endpoints: Vec<String>,
    access: EtcdAccess,
    /// Held slots waiting for their flip, committed together (see [`Flips`]).
    flips: std::sync::Mutex<Flips>,
    /// Connections to this node and to sources, by address, shared by every importer and
    /// clean-up (each carries many requests at once); dropped when one fails.
    clients: std::sync::Mutex<HashMap<String, Arc<Client>>>,
}

impl Ctx {
    async fn etcd(&self) -> Result<Etcd, String> {
        let mut held = self.etcd.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let options = self.access.options(CALL_TIMEOUT, CALL_TIMEOUT)?;
        let c = bounded(Etcd::connect(&self.endpoints, Some(options))).await?;
        *held = Some(c.clone());
        Ok(c)
    }

    async fn forget_etcd(&self) {
        *self.etcd.lock().await = None;
    }

    async fn me(&self) -> Result<Arc<Client>, String> {
        self.client(&self.local.to_string())
            .await
            .map_err(|e| format!("this node's own port: {e}"))
    }

    /// A connection to the node at `addr`: the shared one, or a new one.
    async fn client(&self, addr: &str) -> Result<Arc<Client>, String> {
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).get(addr) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            Client::connect(addr, self.peer.clone())
                .await
                .map_err(|e| format!("{addr}: {e}"))?,
        );
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// After a failure on the connection to `addr`: the next use connects again.
    fn forget_client(&self, addr: &str) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }
}

impl Follower {
    pub async fn run(mut self, stop: Arc<AtomicBool>) {
        if self.serving.wait_for(|s| *s).await.is_err() {
            return;
        }
        let ctx = Arc::new(Ctx {
            prefix: self.prefix.clone(),
            gate: self.gate.clone(),
            local: self.local,
            peer: self.peer.clone(),
            etcd: tokio::sync::Mutex::new(None),
            endpoints: self.endpoints.clone(),
            access: self.access.clone(),
            flips: Default::default(),
            clients: Default::default(),
        });
        let leader = self
            .auto_rebalance
            .then(|| tokio::spawn(lead(ctx.clone(), stop.clone(), self.joined.subscribe())));
        let mut importers: HashMap<u32, (Migration, JoinHandle<()>)> = HashMap::new();
        let mut fenced = false;
        let mut first = true;
        let mut retry = RETRY_MIN;
        while !stop.load(Ordering::Acquire) {
            match self.session(&ctx, &stop, &mut importers, &mut fenced, &mut first).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "cluster: slot table not followed; retrying");
                    ctx.forget_etcd().await;
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
        for (_, (_, task)) in importers.drain() {
            task.abort();
        }
        if let Some(l) = leader {
            let _ = l.await;
        }
    }

    /// Loads the table and follows it until the watch fails (Err) or the node stops (Ok).
    async fn session(
        &mut self,
        ctx: &Arc<Ctx>,
        stop: &AtomicBool,
        importers: &mut HashMap<u32, (Migration, JoinHandle<()>)>,
        fenced: &mut bool,
        first: &mut bool,
    ) -> Result<(), String> {
        let mut etcd = ctx.etcd().await?;
        let node_id = self.gate.node_id().to_string();
        if bounded(slots::load(&mut etcd, &self.prefix)).await?.is_none() {
            let (t, _) = bounded(slots::create(&mut etcd, &self.prefix, self.gate.slots(), &node_id)).await?;
            if t.owner(0) == node_id && t.version == 1 {
                tracing::info!(
                    slots = t.slots(),
                    "cluster: created the slot table; this node owns every slot"
                );
            }
        }
        if !*fenced {
            // A restarted source: no copy made before the restart may flip (see the module
            // comment). Until this is done the node serves nothing.
            let me = node_id.clone();
            let bumped = bounded(slots::update(&mut etcd, &self.prefix, |t| {
                let mut n = 0;
                for m in t.migrations.values_mut().filter(|m| m.from == me) {
                    m.epoch += 1;
                    n += 1;
                }
                Ok(if n > 0 { Decision::Write(n) } else { Decision::Keep(0) })
            }))
            .await?;
            if bumped > 0 {
                tracing::info!(
                    migrations = bumped,
                    "cluster: restarted during migrations from this node; their copies start again"
                );
            }
            *fenced = true;
        }
        let dir = format!("{}/", self.prefix.trim_end_matches('/'));
        let listing = bounded(etcd.get(dir.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let table_key = slots::table_key(&self.prefix);
        let nodes_dir = format!("{dir}nodes/");
        let mut table = None;
        let mut addrs = HashMap::new();
        for kv in listing.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if key == table_key {
                table = Some(Table::decode(kv.value())?);
            } else if key.starts_with(&nodes_dir) {
                if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                    addrs.insert(info.node_id, info.addr);
                }
            }
        }
        let table = table.ok_or("the slot table vanished")?;
        if table.slots() != self.gate.slots() {
            let why = format!(
                "cluster.slots is {} but the cluster at {} has {} slots; this node does not join (set cluster.slots = {})",
                self.gate.slots(),
                table_key,
                table.slots(),
                table.slots()
            );
            tracing::error!("{why}");
            self.gate.refuse(why);
            return Ok(());
        }
        // A table older than one this node wrote itself (its own flip) is not applied.
        let lost = self.gate.apply(table.clone(), addrs.clone()).unwrap_or_default();
        if *first {
            // Whatever this node holds of slots it does not serve is left from before (a
            // slot that moved while it was down): dropped in the background.
            let stale: Vec<u32> = (0..self.gate.slots())
                .filter(|&s| self.gate.state(s) == SlotState::Elsewhere)
                .collect();
            spawn_purge(ctx.clone(), stale, true);
            *first = false;
            let _ = self.joined.send(true);
            tracing::info!(
                version = table.version,
                owned = table.slots_of(&node_id).len(),
                "cluster: slot table applied"
            );
        } else {
            spawn_purge(ctx.clone(), lost, false);
        }
        sync_importers(ctx, &table, importers);

        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = bounded(etcd.watch(dir.clone(), Some(options))).await?;
        let mut current = table;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep(STOP_POLL) => {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    release_stale_holds(ctx, &mut etcd).await?;
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Err("the etcd watch ended".into()),
                Err(e) => return Err(format!("etcd watch: {e}")),
            };
            let mut changed_table = None;
            let mut changed_addrs = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if key == table_key && event.event_type() == EventType::Put {
                    match Table::decode(kv.value()) {
                        Ok(t) => changed_table = Some(t),
                        Err(e) => tracing::error!(error = %e, "cluster: ignoring a damaged slot table"),
                    }
                } else if let Some(id) = key.strip_prefix(&nodes_dir) {
                    changed_addrs = true;
                    match event.event_type() {
                        EventType::Put => {
                            if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                                addrs.insert(info.node_id, info.addr);
                            }
                        }
                        EventType::Delete => {
                            addrs.remove(id);
                        }
                    }
                }
            }
            // Events the watch had on their way when this node flipped a slot carry tables
            // older than that flip: applying one would make the slot Importing again and
            // start a new copy, whose first step drops the keys just imported.
            if let Some(lost) = changed_table
                .as_ref()
                .and_then(|t| self.gate.apply(t.clone(), addrs.clone()))
            {
                let t = changed_table.expect("applied above");
                spawn_purge(ctx.clone(), lost, false);
                sync_importers(ctx, &t, importers);
                current = t;
            } else if changed_addrs {
                self.gate.set_addrs(addrs.clone());
                // A source that was unreachable may have come back at a new address.
                sync_importers(ctx, &current, importers);
            }
        }
    }
}

/// Ends holds whose importer has not flipped within [`HOLD_MS_MAX`]: bumps their
/// migrations' epoch (so that importer's flip fails), then lets the slots' writes in again.
async fn release_stale_holds(ctx: &Ctx, etcd: &mut Etcd) -> Result<(), String> {
    let stale = ctx.gate.held_since(crate::change::now_ms().saturating_sub(HOLD_MS_MAX));
    if stale.is_empty() {
        return Ok(());
    }
    let me = ctx.gate.node_id().to_string();
    bounded(slots::update(etcd, &ctx.prefix, |t| {
        let mut n = 0;
        for slot in &stale {
            if let Some(m) = t.migrations.get_mut(slot).filter(|m| m.from == me) {
                m.epoch += 1;
                n += 1;
            }
        }
        Ok(if n > 0 { Decision::Write(()) } else { Decision::Keep(()) })
    }))
    .await?;
    for slot in stale {
        ctx.gate.unhold(slot);
        tracing::warn!(slot, held_ms = HOLD_MS_MAX, "slot migration: the importer did not flip a held slot in time; its writes are let in again and its copy must start over");
    }
    Ok(())
}

/// `cluster.auto_rebalance`: every node stands in an etcd election
/// (`<prefix>/rebalance-leader`); the leader evens out the slots over the registered nodes
/// whenever membership has been stable for [`AUTO_SETTLE`] and every slot's owner is
/// registered (a restarting node's slots wait for it), a few slots at a time. It only
/// writes migrations, like `flux-cli cluster rebalance`: a leader that dies leaves nothing
/// half-done, and the next one carries on.
async fn lead(ctx: Arc<Ctx>, stop: Arc<AtomicBool>, mut joined: tokio::sync::watch::Receiver<bool>) {
    if joined.wait_for(|j| *j).await.is_err() {
        return;
    }
    let mut retry = RETRY_MIN;
    while !stop.load(Ordering::Acquire) {
        match lead_once(&ctx, &stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: automatic rebalancing stopped; standing again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn lead_once(ctx: &Ctx, stop: &AtomicBool) -> Result<(), String> {
    let options = ctx.access.options(CALL_TIMEOUT, CALL_TIMEOUT)?;
    let mut etcd = bounded(Etcd::connect(&ctx.endpoints, Some(options))).await?;
    let lease = bounded(etcd.lease_grant(LEADER_LEASE_S, None)).await?.id();
    let (mut keeper, _acks) = bounded(etcd.lease_keep_alive(lease)).await?;
    let name = format!("{}/rebalance-leader", ctx.prefix.trim_end_matches('/'));
    let me = ctx.gate.node_id().to_string();
    // Campaigning blocks while another node leads; the lease is kept alive meanwhile.
    let mut elections = etcd.clone();
    let mut campaign = std::pin::pin!(elections.campaign(name, me, lease));
    let mut tick = tokio::time::interval(Duration::from_millis(LEADER_LEASE_S as u64 * 1000 / 3));
    loop {
        tokio::select! {
            won = &mut campaign => {
                won.map_err(|e| format!("etcd election: {e}"))?;
                break;
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Acquire) {
                    let _ = bounded(etcd.lease_revoke(lease)).await;
                    return Ok(());
                }
                bounded(keeper.keep_alive()).await?;
            }
        }
    }
    tracing::info!("cluster: this node leads automatic rebalancing");
    let mut seen: Vec<String> = Vec::new();
    let mut stable_since = tokio::time::Instant::now();
    let mut since_keepalive = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(AUTO_TICK).await;
        if stop.load(Ordering::Acquire) {
            let _ = bounded(etcd.lease_revoke(lease)).await;
            return Ok(());
        }
        if since_keepalive.elapsed() >= Duration::from_millis(LEADER_LEASE_S as u64 * 1000 / 3) {
            bounded(keeper.keep_alive()).await?;
            since_keepalive = tokio::time::Instant::now();
        }
        let live: std::collections::BTreeSet<String> = ctx.gate.view().addrs.keys().cloned().collect();
        let now: Vec<String> = live.iter().cloned().collect();
        if now != seen {
            seen = now;
            stable_since = tokio::time::Instant::now();
            continue;
        }
        if stable_since.elapsed() < AUTO_SETTLE || live.is_empty() {
            continue;
        }
        let nodes: Vec<String> = live.iter().cloned().collect();
        let started = bounded(slots::update(&mut etcd, &ctx.prefix, |t| {
            if t.counts().keys().any(|n| !live.contains(n)) {
                return Ok(Decision::Keep(0));
            }
            let moves = slots::plan(t, &nodes);
            let (started, cancelled) = slots::start_moves(t, &moves, &live, AUTO_PARALLEL);
            Ok(if started.is_empty() && cancelled == 0 {
                Decision::Keep(0)
            } else {
                Decision::Write(started.len())
            })
        }))
        .await?;
        if started > 0 {
            tracing::debug!(slots = started, "cluster: automatic rebalancing started moves");
        }
    }
}

/// Starts an importer for each migration to this node that has none, and stops those whose
/// migration is gone from the table.
fn sync_importers(ctx: &Arc<Ctx>, table: &Table, importers: &mut HashMap<u32, (Migration, JoinHandle<()>)>) {
    let me = ctx.gate.node_id();
    importers.retain(|slot, (m, task)| {
        let keep = table
            .migrations
            .get(slot)
            .is_some_and(|now| now.to == me && now.from == m.from)
            && !task.is_finished();
        if !keep {
            task.abort();
        }
        keep
    });
    for m in table.migrations.values().filter(|m| m.to == me) {
        if let std::collections::hash_map::Entry::Vacant(e) = importers.entry(m.slot) {
            e.insert((m.clone(), tokio::spawn(import(ctx.clone(), m.clone()))));
        }
    }
}

/// Imports one slot until it is this node's or its migration is gone, retrying failures.
async fn import(ctx: Arc<Ctx>, m: Migration) {
    let mut retry = RETRY_MIN;
    loop {
        match import_once(&ctx, &m).await {
            Ok(true) => return,
            Ok(false) => {
                // Not flipped: the table changed under the copy; look again at once.
                retry = RETRY_MIN;
            }
            Err(e) => {
                // Either connection may be the broken one.
                if let Some(addr) = ctx.gate.view().addrs.get(&m.from) {
                    ctx.forget_client(addr);
                }
                ctx.forget_client(&ctx.local.to_string());
                tracing::warn!(slot = m.slot, from = %m.from, error = %e, retry_ms = retry.as_millis() as u64, "slot migration: copy failed; starting again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
        let view = ctx.gate.view();
        let still = view
            .table
            .as_ref()
            .and_then(|t| t.migrations.get(&m.slot))
            .is_some_and(|now| now.from == m.from && now.to == m.to);
        if !still {
            return;
        }
    }
}

/// One copy of the slot from its source, then the flip. Ok(true): flipped to this node;
/// Ok(false): the table no longer allowed it (the migration changed or is gone).
async fn import_once(ctx: &Arc<Ctx>, m: &Migration) -> Result<bool, String> {
    let slot = m.slot;
    let addr = ctx
        .gate
        .view()
        .addrs
        .get(&m.from)
        .cloned()
        .ok_or_else(|| format!("the source {} is not registered", m.from))?;
    let me = ctx.me().await?;
    let source = ctx.client(&addr).await.map_err(|e| format!("source {}: {e}", m.from))?;
    // 1. Whatever an earlier, interrupted copy left here goes.
    // A step that drops less than it may has walked the whole slot: done.
    while me
        .slot_purge(slot, PURGE_STEP, true)
        .await
        .map_err(|e| e.to_string())?
        .more
    {}
    // 2. Copy until little is left, then 3. hold the slot's writes and copy the rest.
    let migration_id = fastrand::u64(1..);
    let started = std::time::Instant::now();
    let mut copy = Copy {
        source: &source,
        me: &me,
        slot,
        migration_id,
        start: true,
        keys: 0,
        bytes: 0,
    };
    copy.until(false, HOLD_AT_KEYS).await?;
    let held_at = std::time::Instant::now();
    let epoch = copy.until(true, 0).await?;
    // 4. Flip, only if the migration is still the one this copy completed.
    Flips::flip(
        ctx,
        Flip {
            migration: m.clone(),
            epoch,
            keys: copy.keys,
            bytes: copy.bytes,
            started,
            held_at,
        },
    )
    .await
}

/// This node's held slots waiting for their flip. One etcd transaction flips every slot
/// whose copy completed while the previous transaction was in flight (group commit): a
/// slot waits for its writes at most about two transactions, and a node importing many
/// slots at once writes the table, and wakes every node and client watching it, once per
/// batch rather than once per slot. One committer per node also keeps its flips from
/// racing one another for the table key.
#[derive(Default)]
struct Flips {
    waiting: Vec<(Flip, tokio::sync::oneshot::Sender<Result<bool, String>>)>,
    /// A committer task runs (it takes `waiting` until it finds it empty).
    committing: bool,
}

/// A completed copy waiting for its flip.
struct Flip {
    migration: Migration,
    /// The migration epoch the completed copy saw: the flip happens only while it holds.
    epoch: u64,
    /// What the copy moved, and when it started and its hold began (logged at the flip by
    /// the committer, which outlives an importer aborted once the table shows the flip).
    keys: u64,
    bytes: u64,
    started: std::time::Instant,
    held_at: std::time::Instant,
}

impl Flips {
    /// Flips the slot of `flip`, whose copy is complete and held by the source, to this
    /// node: true once flipped (the gate serves it here), false when the table no longer
    /// allows it (the migration changed, or its epoch moved past the copy's, or it is gone).
    async fn flip(ctx: &Arc<Ctx>, flip: Flip) -> Result<bool, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut f = ctx.flips.lock().unwrap_or_else(|p| p.into_inner());
            f.waiting.push((flip, tx));
            !std::mem::replace(&mut f.committing, true)
        };
        if start {
            // A task of its own: an importer aborted while it waits must not strand the
            // others' flips.
            tokio::spawn(Flips::commit(ctx.clone()));
        }
        rx.await.map_err(|_| "the flip was abandoned".to_string())?
    }

    /// Commits batches until none waits.
    async fn commit(ctx: Arc<Ctx>) {
        loop {
            let batch = {
                let mut f = ctx.flips.lock().unwrap_or_else(|p| p.into_inner());
                if f.waiting.is_empty() {
                    f.committing = false;
                    return;
                }
                std::mem::take(&mut f.waiting)
            };
            let (flips, senders): (Vec<Flip>, Vec<_>) = batch.into_iter().unzip();
            let result = Flips::commit_batch(&ctx, &flips).await;
            if result.is_err() {
                ctx.forget_etcd().await;
            }
            for (f, tx) in flips.iter().zip(senders) {
                let flipped = result.as_ref().map(|done| done.contains(&f.migration.slot));
                if flipped == Ok(true) {
                    tracing::info!(
                        slot = f.migration.slot,
                        from = %f.migration.from,
                        keys = f.keys,
                        bytes = f.bytes,
                        copy_ms = f.started.elapsed().as_millis() as u64,
                        held_ms = f.held_at.elapsed().as_millis() as u64,
                        batch = flips.len(),
                        "slot migration: slot now owned here"
                    );
                }
                let _ = tx.send(flipped.map_err(Clone::clone));
            }
        }
    }

    /// One transaction flipping every slot of `batch` whose migration is still the one its
    /// copy completed; returns the slots flipped, which the gate serves from then on.
    async fn commit_batch(ctx: &Ctx, batch: &[Flip]) -> Result<Vec<u32>, String> {
        let mut etcd = ctx.etcd().await?;
        let committed = bounded(slots::update(&mut etcd, &ctx.prefix, |t| {
            let mut flipped = Vec::new();
            for f in batch {
                let m = &f.migration;
                let current = t.migrations.get(&m.slot);
                if current.is_some_and(|c| c.from == m.from && c.to == m.to && c.epoch == f.epoch)
                    && t.owner(m.slot) == m.from
                {
                    t.set_owner(m.slot, &m.to);
                    t.migrations.remove(&m.slot);
                    flipped.push(m.slot);
                }
            }
            // `update` bumps the version as it writes.
            Ok(if flipped.is_empty() {
                Decision::Keep((flipped, 0))
            } else {
                Decision::Write((flipped, t.version + 1))
            })
        }))
        .await?;
        let (flipped, version) = committed;
        for &slot in &flipped {
            ctx.gate.own(slot, version);
        }
        Ok(flipped)
    }
}

/// One copy of a slot in progress: pulls from the source, writes into this node.
struct Copy<'a> {
    source: &'a Client,
    me: &'a Client,
    slot: u32,
    migration_id: u64,
    /// The next pull starts the copy.
    start: bool,
    /// Keys and key-and-value bytes copied so far (a key written during the copy counts
    /// each time it is sent).
    keys: u64,
    bytes: u64,
}

impl Copy<'_> {
    /// Pulls (holding the slot's writes if `hold`) until at most `left` keys remain to send
    /// (or `ROUNDS_BEFORE_HOLD` rounds passed, for a slot written faster than it copies);
    /// with `hold`, until the source holds the slot and nothing is left. Returns the
    /// migration epoch the source reported last.
    async fn until(&mut self, hold: bool, left: u64) -> Result<u64, String> {
        let mut rounds = 0u32;
        loop {
            let req = SlotExportRequest {
                slot: self.slot,
                migration_id: self.migration_id,
                start: self.start,
                hold,
                bytes_max: 0,
            };
            let r = self.source.slot_export(req).await.map_err(|e| e.to_string())?;
            if r.reset {
                return Err("the source lost the copy (it restarted, or too many keys were written during it)".into());
            }
            self.start = false;
            self.keys += r.entries.len() as u64;
            self.bytes += r
                .entries
                .iter()
                .map(|e| (e.key.len() + e.value.len()) as u64)
                .sum::<u64>();
            if !r.entries.is_empty() {
                self.me
                    .slot_import(self.slot, r.entries)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            rounds += 1;
            let done = if hold {
                r.held && r.remaining == 0
            } else {
                r.remaining <= left || rounds >= ROUNDS_BEFORE_HOLD
            };
            if done {
                return Ok(r.epoch);
            }
        }
    }
}

/// Drops this node's keys of `slots` (which it no longer serves) in the background; with
/// `unless_empty`, only if the node holds any key at all (a new node's first table lists
/// every slot but its own).
fn spawn_purge(ctx: Arc<Ctx>, slots: Vec<u32>, unless_empty: bool) {
    if slots.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut retry = RETRY_MIN;
        let mut left = slots.into_iter().peekable();
        let mut me: Option<Arc<Client>> = None;
        if unless_empty {
            if let Ok(c) = ctx.me().await {
                if c.stats().await.is_ok_and(|cores| cores.iter().all(|c| c.keys == 0)) {
                    return;
                }
                me = Some(c);
            }
        }
        while let Some(&slot) = left.peek() {
            let step = async {
                if me.is_none() {
                    me = Some(ctx.me().await?);
                }
                let me = me.as_ref().expect("connected above");
                let mut dropped = 0;
                loop {
                    let r = me
                        .slot_purge(slot, PURGE_STEP, false)
                        .await
                        .map_err(|e| e.to_string())?;
                    dropped += r.removed;
                    if !r.more {
                        return Ok::<u64, String>(dropped);
                    }
                }
            };
            match step.await {
                Ok(dropped) => {
                    if dropped > 0 {
                        tracing::info!(
                            slot,
                            keys = dropped,
                            "slot migration: dropped the copy of a slot that moved away"
                        );
                    }
                    left.next();
                    retry = RETRY_MIN;
                }
                // The slot is no longer owned elsewhere (it moves back here): not dropped.
                Err(e) if e.contains("its keys are not dropped") => {
                    left.next();
                }
                Err(e) => {
                    me = None;
                    ctx.forget_client(&ctx.local.to_string());
                    tracing::warn!(slot, error = %e, "slot migration: cannot drop a moved slot's keys yet");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    });
}

async fn bounded<T, E: std::fmt::Display>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
    super::bounded(CALL_TIMEOUT, f).await
}
