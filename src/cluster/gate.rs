//! What this node may do with each slot, as the shard cores see it.
//!
//! One byte per slot, read with a relaxed load on every key operation (no lock on the data
//! path). The control core writes it when it applies a slot table; the core that owns a
//! slot's shard writes it too, to hold the slot's writes at the end of a migration. The
//! two never fight: a table that still lists the slot's migration leaves a hold in place,
//! and one that no longer does decides the slot either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::slots::{slot_of, Table};

/// A slot's state on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotState {
    /// No slot table loaded yet: nothing is served (CLUSTER_DOWN).
    Unknown = 0,
    /// Owned: served.
    Owned = 1,
    /// Owned and being copied to another node: served, and its writes noted for the copy.
    Migrating = 2,
    /// Owned, and its writes held (TRY_AGAIN) while ownership flips. Reads are served.
    Held = 3,
    /// Owned by another node that is copying it here: clients get MOVED; SLOT_IMPORT writes.
    Importing = 4,
    /// Owned by another node: MOVED.
    Elsewhere = 5,
}

impl SlotState {
    fn from_u8(v: u8) -> SlotState {
        match v {
            1 => SlotState::Owned,
            2 => SlotState::Migrating,
            3 => SlotState::Held,
            4 => SlotState::Importing,
            5 => SlotState::Elsewhere,
            _ => SlotState::Unknown,
        }
    }

    /// Whether this node serves the slot's keys to clients.
    pub fn serves(self) -> bool {
        matches!(self, SlotState::Owned | SlotState::Migrating | SlotState::Held)
    }
}

/// The table as applied, with the nodes' addresses, for MOVED replies and HELLO.
#[derive(Default)]
pub struct View {
    pub table: Option<Table>,
    /// node_id -> host:port, from the registrations.
    pub addrs: HashMap<String, String>,
    /// Why this node does not serve the cluster (a `cluster.slots` mismatch), if so.
    pub refused: Option<String>,
}

pub struct SlotGate {
    slots: u32,
    node_id: String,
    states: Box<[AtomicU8]>,
    /// When each held slot's hold began (Unix ms; 0: not held): a hold whose importer
    /// vanished is ended by the follower (see `follower::release_stale_holds`).
    held_at_ms: Box<[std::sync::atomic::AtomicU64]>,
    /// The oldest table version that may still be applied: the version of this node's own
    /// last flip, which it serves before the watch delivers it.
    floor: std::sync::atomic::AtomicU64,
    view: ArcSwap<View>,
}

impl SlotGate {
    pub fn new(slots: u32, node_id: &str) -> Arc<SlotGate> {
        Arc::new(SlotGate {
            slots,
            node_id: node_id.to_string(),
            states: (0..slots).map(|_| AtomicU8::new(SlotState::Unknown as u8)).collect(),
            held_at_ms: (0..slots).map(|_| Default::default()).collect(),
            floor: Default::default(),
            view: ArcSwap::from_pointee(View::default()),
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    #[inline]
    pub fn slot(&self, hash: u64) -> u32 {
        slot_of(hash, self.slots)
    }

    #[inline]
    pub fn state(&self, slot: u32) -> SlotState {
        SlotState::from_u8(self.states[slot as usize].load(Ordering::Acquire))
    }

    /// Holds the slot's writes; true if it was migrating (or already held).
    pub fn hold(&self, slot: u32) -> bool {
        let cell = &self.states[slot as usize];
        let began = cell
            .compare_exchange(
                SlotState::Migrating as u8,
                SlotState::Held as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if began {
            self.held_at_ms[slot as usize].store(crate::change::now_ms(), Ordering::Release);
        }
        began || cell.load(Ordering::Acquire) == SlotState::Held as u8
    }

    /// Slots held since before `before_ms`.
    pub fn held_since(&self, before_ms: u64) -> Vec<u32> {
        (0..self.slots)
            .filter(|&s| self.state(s) == SlotState::Held)
            .filter(|&s| {
                let at = self.held_at_ms[s as usize].load(Ordering::Acquire);
                at != 0 && at < before_ms
            })
            .collect()
    }

    /// Ends a hold while the migration goes on (a copy that starts again).
    pub fn unhold(&self, slot: u32) {
        let _ = self.states[slot as usize].compare_exchange(
            SlotState::Held as u8,
            SlotState::Migrating as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The importer flipped the slot to this node with table `version`: serve it now,
    /// before the table's watch event arrives, and apply no older table from then on.
    pub fn own(&self, slot: u32, version: u64) {
        self.floor.fetch_max(version, Ordering::AcqRel);
        self.states[slot as usize].store(SlotState::Owned as u8, Ordering::Release);
    }

    /// Applies a table: every slot's state follows from it, except that a held slot whose
    /// migration is still listed stays held. Returns the slots that this node served before
    /// and no longer owns (their keys are to be dropped), or None for a table older than
    /// this node's own last flip, which is not applied.
    pub fn apply(&self, table: Table, addrs: HashMap<String, String>) -> Option<Vec<u32>> {
        if table.version < self.floor.load(Ordering::Acquire) {
            return None;
        }
        let mut lost = Vec::new();
        // A rebalance writes thousands of versions that each change a slot or two: only
        // the slots whose owner or migration changed are looked at again.
        let view = self.view.load();
        let changed: Vec<u32> = match &view.table {
            Some(prev) if prev.slots() == table.slots() => {
                let mut v: Vec<u32> = (0..self.slots).filter(|&s| prev.owner(s) != table.owner(s)).collect();
                v.extend(prev.migrations.keys().chain(table.migrations.keys()));
                v.sort_unstable();
                v.dedup();
                v
            }
            _ => (0..self.slots).collect(),
        };
        drop(view);
        for slot in changed {
            let migration = table.migrations.get(&slot);
            let want = if table.owner(slot) == self.node_id {
                if migration.is_some() {
                    SlotState::Migrating
                } else {
                    SlotState::Owned
                }
            } else if migration.is_some_and(|m| m.to == self.node_id) {
                SlotState::Importing
            } else {
                SlotState::Elsewhere
            };
            let cell = &self.states[slot as usize];
            let before = SlotState::from_u8(
                cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                    (!(now == SlotState::Held as u8 && want == SlotState::Migrating)).then_some(want as u8)
                })
                .unwrap_or_else(|v| v),
            );
            if before.serves() && !want.serves() {
                lost.push(slot);
            }
        }
        self.view.store(Arc::new(View {
            table: Some(table),
            addrs,
            refused: None,
        }));
        Some(lost)
    }

    /// Updates the nodes' addresses only.
    pub fn set_addrs(&self, addrs: HashMap<String, String>) {
        let old = self.view.load();
        self.view.store(Arc::new(View {
            table: old.table.clone(),
            addrs,
            refused: old.refused.clone(),
        }));
    }

    /// This node must not serve: every key gets CLUSTER_DOWN with `why`.
    pub fn refuse(&self, why: String) {
        for cell in self.states.iter() {
            cell.store(SlotState::Unknown as u8, Ordering::Release);
        }
        self.view.store(Arc::new(View {
            refused: Some(why),
            ..View::default()
        }));
    }

    pub fn view(&self) -> arc_swap::Guard<Arc<View>> {
        self.view.load()
    }

    /// The table version applied (0: none yet).
    pub fn version(&self) -> u64 {
        self.view.load().table.as_ref().map_or(0, |t| t.version)
    }

    /// The owner of `slot` and its address, for a MOVED reply.
    pub fn owner_of(&self, slot: u32) -> (String, String) {
        let view = self.view.load();
        match &view.table {
            Some(t) => {
                let owner = t.owner(slot).to_string();
                let addr = view.addrs.get(&owner).cloned().unwrap_or_default();
                (owner, addr)
            }
            None => (String::new(), String::new()),
        }
    }

    /// The migration epoch of `slot` in the applied table.
    pub fn epoch(&self, slot: u32) -> u64 {
        self.view
            .load()
            .table
            .as_ref()
            .and_then(|t| t.migrations.get(&slot).map(|m| m.epoch))
            .unwrap_or(0)
    }

    /// Why the node does not serve: a refusal, or no table yet.
    pub fn down_reason(&self) -> String {
        match &self.view.load().refused {
            Some(why) => why.clone(),
            None => "the slot table is not loaded yet (etcd unreachable since the node started)".into(),
        }
    }
}
