//! The slot table: which node owns each slot, and the migrations in flight.
//!
//! It is one etcd key, `<prefix>/slots`, holding JSON (the format proto/flux.proto
//! documents for clients in other languages). Every change is a transaction that compares
//! the key's mod revision with the one the change was computed from ([`update`]), so two
//! changes made at once never both win: the loser reads again and recomputes.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

/// `cluster.slots` unless set: as many slots as a rebalance can spread evenly over up to a
/// few hundred nodes, and a table of a few kilobytes.
pub const SLOTS_DEFAULT: u32 = 4096;

/// Most slots a cluster may have: the table must stay well inside etcd's value limit.
pub const SLOTS_MAX: u32 = 65_536;

/// A key's slot: `xxh3_64(key, seed 0) & (slots - 1)`, from its routing hash.
#[inline]
pub fn slot_of(hash: u64, slots: u32) -> u32 {
    (hash & u64::from(slots - 1)) as u32
}

/// The etcd key of the table.
pub fn table_key(prefix: &str) -> String {
    format!("{}/slots", prefix.trim_end_matches('/'))
}

/// A slot on its way from one node to another. `epoch` changes when the source restarts:
/// the copy the target made before that may lack writes the restarted source accepted,
/// so a flip must see the epoch its copy was completed under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub slot: u32,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct Range {
    first: u32,
    last: u32,
    node: String,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    slots: u32,
    version: u64,
    ranges: Vec<Range>,
    #[serde(default)]
    migrations: Vec<Migration>,
}

/// The table in memory: an owner per slot (an index into `nodes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    slots: u32,
    pub version: u64,
    nodes: Vec<String>,
    owner: Vec<u16>,
    pub migrations: BTreeMap<u32, Migration>,
}

impl Table {
    /// A new cluster's table: `node` owns every slot.
    pub fn new(slots: u32, node: &str) -> Table {
        Table {
            slots,
            version: 1,
            nodes: vec![node.to_string()],
            owner: vec![0; slots as usize],
            migrations: BTreeMap::new(),
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn owner(&self, slot: u32) -> &str {
        &self.nodes[self.owner[slot as usize] as usize]
    }

    pub fn set_owner(&mut self, slot: u32, node: &str) {
        self.owner[slot as usize] = self.node_index(node);
    }

    fn node_index(&mut self, node: &str) -> u16 {
        match self.nodes.iter().position(|n| n == node) {
            Some(i) => i as u16,
            None => {
                self.nodes.push(node.to_string());
                (self.nodes.len() - 1) as u16
            }
        }
    }

    /// Slots per owner (owners of at least one slot only).
    pub fn counts(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for &o in &self.owner {
            *counts.entry(self.nodes[o as usize].clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The slots `node` owns, in order.
    pub fn slots_of(&self, node: &str) -> Vec<u32> {
        (0..self.slots).filter(|&s| self.owner(s) == node).collect()
    }

    pub fn encode(&self) -> String {
        let mut ranges: Vec<Range> = Vec::new();
        for slot in 0..self.slots {
            let node = self.owner(slot);
            match ranges.last_mut() {
                Some(r) if r.node == node => r.last = slot,
                _ => ranges.push(Range {
                    first: slot,
                    last: slot,
                    node: node.to_string(),
                }),
            }
        }
        let wire = Wire {
            slots: self.slots,
            version: self.version,
            ranges,
            migrations: self.migrations.values().cloned().collect(),
        };
        serde_json::to_string(&wire).expect("the table serializes")
    }

    /// Reads and checks a table: a power-of-two slot count, ranges that cover every slot
    /// once and in order, migrations of existing slots away from their owner.
    pub fn decode(bytes: &[u8]) -> Result<Table, String> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| format!("slot table: {e}"))?;
        if !wire.slots.is_power_of_two() || wire.slots > SLOTS_MAX {
            return Err(format!(
                "slot table: {} slots is not a power of two up to {SLOTS_MAX}",
                wire.slots
            ));
        }
        let mut table = Table {
            slots: wire.slots,
            version: wire.version,
            nodes: Vec::new(),
            owner: Vec::with_capacity(wire.slots as usize),
            migrations: BTreeMap::new(),
        };
        let mut next = 0u32;
        for r in &wire.ranges {
            if r.first != next || r.last < r.first || r.last >= wire.slots {
                return Err(format!(
                    "slot table: range {}..={} does not continue at slot {next}",
                    r.first, r.last
                ));
            }
            let index = table.node_index(&r.node);
            table.owner.resize(r.last as usize + 1, index);
            next = r.last + 1;
        }
        if next != wire.slots {
            return Err(format!("slot table: ranges end at slot {next} of {}", wire.slots));
        }
        for m in wire.migrations {
            if m.slot >= wire.slots || table.owner(m.slot) != m.from || m.from == m.to {
                return Err(format!(
                    "slot table: migration of slot {} from {} is not from its owner",
                    m.slot, m.from
                ));
            }
            table.migrations.insert(m.slot, m);
        }
        Ok(table)
    }
}

/// What a plan does: move `slot` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub slot: u32,
    pub to: String,
}

/// The moves that leave every node in `nodes` with `slots / nodes` slots, give or take one,
/// taking from the fullest first and moving as few slots as that needs. Slots owned by a
/// node not in `nodes` (gone, or being drained) all move. Slots already migrating count
/// where they are going.
pub fn plan(table: &Table, nodes: &[String]) -> Vec<Move> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut nodes = nodes.to_vec();
    nodes.sort();
    nodes.dedup();
    let destination = |slot: u32| {
        table
            .migrations
            .get(&slot)
            .map_or(table.owner(slot), |m| m.to.as_str())
            .to_string()
    };
    let mut held: BTreeMap<String, Vec<u32>> = nodes.iter().map(|n| (n.clone(), Vec::new())).collect();
    let mut homeless = Vec::new();
    for slot in 0..table.slots {
        match held.get_mut(&destination(slot)) {
            Some(v) => v.push(slot),
            None => homeless.push(slot),
        }
    }
    let base = table.slots / nodes.len() as u32;
    let extra = (table.slots % nodes.len() as u32) as usize;
    // The nodes holding most keep the extra slots: fewer moves.
    let mut order: Vec<String> = nodes.clone();
    order.sort_by_key(|n| std::cmp::Reverse(held[n].len()));
    let target: BTreeMap<String, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), (base as usize) + usize::from(i < extra)))
        .collect();
    for n in &order {
        let v = held.get_mut(n).expect("every node has an entry");
        while v.len() > target[n] {
            // Highest slots first, so a node keeps contiguous ranges.
            homeless.push(v.pop().expect("non-empty"));
        }
    }
    homeless.sort_unstable();
    let mut moves = Vec::new();
    let mut giving = homeless.into_iter();
    for n in &nodes {
        let have = held[n].len();
        for _ in have..target[n] {
            if let Some(slot) = giving.next() {
                // A slot migrating elsewhere is redirected only once it lands.
                if !table.migrations.contains_key(&slot) {
                    moves.push(Move { slot, to: n.clone() });
                }
            }
        }
    }
    moves
}

/// Puts moves into `t` as migrations, at most `parallel` in flight in all, skipping moves
/// already done or under way and those to nodes not in `live`; cancels migrations to nodes
/// not in `live` first (their slots stay with their owners). Returns the slots started
/// and the number cancelled. The one rule the CLI and the automatic rebalancer share.
pub fn start_moves(
    t: &mut Table,
    moves: &[Move],
    live: &std::collections::BTreeSet<String>,
    parallel: usize,
) -> (Vec<u32>, usize) {
    let gone: Vec<u32> = t
        .migrations
        .values()
        .filter(|m| !live.contains(&m.to))
        .map(|m| m.slot)
        .collect();
    for slot in &gone {
        t.migrations.remove(slot);
    }
    let mut started = Vec::new();
    let mut room = parallel.max(1).saturating_sub(t.migrations.len());
    for m in moves {
        if room == 0 {
            break;
        }
        if t.owner(m.slot) == m.to || t.migrations.contains_key(&m.slot) || !live.contains(&m.to) {
            continue;
        }
        let from = t.owner(m.slot).to_string();
        t.migrations.insert(
            m.slot,
            Migration {
                slot: m.slot,
                from,
                to: m.to.clone(),
                epoch: 0,
            },
        );
        started.push(m.slot);
        room -= 1;
    }
    (started, gone.len())
}

/// Reads the table and its mod revision; `None` when the cluster has none yet.
pub async fn load(client: &mut Client, prefix: &str) -> Result<Option<(Table, i64)>, String> {
    let got = client
        .get(table_key(prefix), None)
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    match got.kvs().first() {
        None => Ok(None),
        Some(kv) => Ok(Some((Table::decode(kv.value())?, kv.mod_revision()))),
    }
}

/// What [`update`]'s closure decided.
pub enum Decision<T> {
    /// Write the changed table (its version is bumped) and return `T`.
    Write(T),
    /// Leave the table as it is and return `T`.
    Keep(T),
}

/// Changes the table with `change`, atomically: `change` sees the current table and either
/// edits it or leaves it; the write happens only if nobody changed the table meanwhile
/// (else it is read again and `change` runs again, at most `ATTEMPTS` times).
pub async fn update<T>(
    client: &mut Client,
    prefix: &str,
    mut change: impl FnMut(&mut Table) -> Result<Decision<T>, String>,
) -> Result<T, String> {
    const ATTEMPTS: usize = 64;
    for _ in 0..ATTEMPTS {
        let Some((mut table, revision)) = load(client, prefix).await? else {
            return Err("the cluster has no slot table yet (no node has started)".into());
        };
        match change(&mut table)? {
            Decision::Keep(t) => return Ok(t),
            Decision::Write(t) => {
                table.version += 1;
                let key = table_key(prefix);
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
                    .and_then([TxnOp::put(key, table.encode(), None)]);
                if client.txn(txn).await.map_err(|e| format!("etcd: {e}"))?.succeeded() {
                    return Ok(t);
                }
            }
        }
    }
    Err("the slot table kept changing; try again".into())
}

/// Creates the table with every slot owned by `node` unless one exists; returns the table
/// that is in etcd afterwards and its revision.
pub async fn create(client: &mut Client, prefix: &str, slots: u32, node: &str) -> Result<(Table, i64), String> {
    let key = table_key(prefix);
    let table = Table::new(slots, node);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, table.encode(), None)]);
    client.txn(txn).await.map_err(|e| format!("etcd: {e}"))?;
    load(client, prefix)
        .await?
        .ok_or_else(|| "the slot table vanished right after it was written".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the table round-trips through its documented JSON, and a damaged one (a gap, a
    // migration not from the owner, a slot count that is not a power of two) is refused.
    #[test]
    fn table_round_trips_and_rejects_damage() {
        let mut t = Table::new(16, "a");
        for s in 8..16 {
            t.set_owner(s, "b");
        }
        t.migrations.insert(
            3,
            Migration {
                slot: 3,
                from: "a".into(),
                to: "b".into(),
                epoch: 2,
            },
        );
        let json = t.encode();
        assert!(json.contains(r#"{"first":0,"last":7,"node":"a"}"#), "{json}");
        assert_eq!(Table::decode(json.as_bytes()).unwrap(), t);
        assert_eq!(
            t.counts().into_iter().collect::<Vec<_>>(),
            [("a".into(), 8), ("b".into(), 8)]
        );
        for bad in [
            r#"{"slots":16,"version":1,"ranges":[{"first":0,"last":6,"node":"a"},{"first":8,"last":15,"node":"b"}]}"#,
            r#"{"slots":16,"version":1,"ranges":[{"first":0,"last":14,"node":"a"}]}"#,
            r#"{"slots":12,"version":1,"ranges":[{"first":0,"last":11,"node":"a"}]}"#,
            r#"{"slots":16,"version":1,"ranges":[{"first":0,"last":15,"node":"a"}],"migrations":[{"slot":1,"from":"b","to":"a"}]}"#,
        ] {
            assert!(Table::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    // Goal: a plan evens slots out over the given nodes with as few moves as that takes,
    // moves every slot of a node left out (drain), and never re-plans a migrating slot.
    #[test]
    fn plans_even_out_and_drain() {
        let mut t = Table::new(4096, "n1");
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let moves = plan(&t, &nodes);
        assert_eq!(moves.len(), 4096 - 1366);
        for m in &moves {
            t.set_owner(m.slot, &m.to);
        }
        let counts = t.counts();
        assert!(counts.values().all(|&c| (1365..=1366).contains(&c)), "{counts:?}");
        assert!(plan(&t, &nodes).is_empty(), "balanced: nothing to move");
        let four: Vec<String> = ["n1", "n2", "n3", "n4"].map(String::from).to_vec();
        let moves = plan(&t, &four);
        assert_eq!(moves.len(), 1024);
        assert!(moves.iter().all(|m| m.to == "n4"));
        // Drain n2: its slots go to the others; nobody else's move.
        let without: Vec<String> = ["n1", "n3"].map(String::from).to_vec();
        let moves = plan(&t, &without);
        let n2 = t.slots_of("n2");
        assert_eq!(moves.len(), n2.len());
        assert!(moves.iter().all(|m| n2.contains(&m.slot) && m.to != "n2"));
        t.migrations.insert(
            n2[0],
            Migration {
                slot: n2[0],
                from: "n2".into(),
                to: "n1".into(),
                epoch: 0,
            },
        );
        assert!(plan(&t, &without).iter().all(|m| m.slot != n2[0]));
    }
}
