//! `flux-cli --etcd E cluster status|move|rebalance|drain`: the operator's view of the
//! slot table and the commands that move slots.
//!
//! These commands only write migrations into the table (one etcd transaction each) and
//! watch them complete: the nodes do the copying. So a command that is interrupted, or
//! whose process is killed, leaves nothing half-done that needs it: migrations it started
//! finish by themselves, and running it again plans from the table as it then is.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::client::Cluster;
use crate::cluster::slots::{self, Decision, Move, Table};

/// How often a waiting command reads the table when it cannot watch it.
const POLL: Duration = Duration::from_millis(50);
/// Longest a waiting command goes without reading the table while it watches it (nodes
/// that left are noticed on a read).
const WATCH_QUIET_MAX: Duration = Duration::from_secs(1);
/// How long a migration's source may be unregistered (restarting) before the command
/// gives up waiting for it.
const SOURCE_GONE_MAX: Duration = Duration::from_secs(10);

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCmd {
    /// Nodes, slots per node, and migrations in flight.
    Status,
    /// Move SLOT to NODE_ID, and wait until it is there.
    Move { slot: u32, node_id: String },
    /// Even out the slots over the live nodes (each ends with slots/nodes, give or take
    /// one), moving as few as that takes; waits until done.
    Rebalance {
        /// Slots moving at once: more move faster and slow clients down more while they do
        /// (bench/results/rebalance.md).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// Move every slot off NODE_ID to the other live nodes, evenly; waits until done. The
    /// node can then be stopped without losing a key.
    Drain {
        node_id: String,
        /// Slots moving at once (as for rebalance).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
}

pub async fn run(
    cmd: ClusterCmd,
    endpoints: &[String],
    prefix: &str,
    cluster: &Cluster,
    access: crate::cluster::EtcdAccess,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<(), String> {
    let options = access.options(timeout, timeout)?;
    let mut etcd = etcd_client::Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| format!("etcd at {endpoints:?}: {e}"))?;
    let io = |e: std::io::Error| e.to_string();
    match cmd {
        ClusterCmd::Status => {
            let (table, _) = load(&mut etcd, prefix).await?;
            status(&table, &live(cluster), out).map_err(io)
        }
        ClusterCmd::Move { slot, node_id } => {
            let (table, _) = load(&mut etcd, prefix).await?;
            if slot >= table.slots() {
                return Err(format!(
                    "slot {slot} does not exist (the cluster has {})",
                    table.slots()
                ));
            }
            if !live(cluster).contains(&node_id) {
                return Err(format!("{node_id} is not a live member"));
            }
            let moves = [Move {
                slot,
                to: node_id.clone(),
            }];
            drive(&mut etcd, prefix, cluster, &moves, 1, false, out).await?;
            writeln!(out, "slot {slot} is owned by {node_id}").map_err(io)
        }
        ClusterCmd::Rebalance { parallel } => {
            let nodes: Vec<String> = live(cluster).into_iter().collect();
            if nodes.is_empty() {
                return Err("no live members to rebalance over".into());
            }
            rebalance(&mut etcd, prefix, cluster, &nodes, parallel, out).await
        }
        ClusterCmd::Drain { node_id, parallel } => {
            let nodes: Vec<String> = live(cluster).into_iter().filter(|n| *n != node_id).collect();
            if nodes.is_empty() {
                return Err(format!("no other live member to move {node_id}'s slots to"));
            }
            rebalance(&mut etcd, prefix, cluster, &nodes, parallel, out).await?;
            let (table, _) = load(&mut etcd, prefix).await?;
            let left = table.slots_of(&node_id).len();
            if left > 0 {
                return Err(format!("{node_id} still owns {left} slots"));
            }
            writeln!(out, "{node_id} owns no slots: it can be stopped").map_err(io)
        }
    }
}

/// Registered node ids.
fn live(cluster: &Cluster) -> BTreeSet<String> {
    cluster.nodes().into_iter().map(|n| n.node_id).collect()
}

async fn load(etcd: &mut etcd_client::Client, prefix: &str) -> Result<(Table, i64), String> {
    slots::load(etcd, prefix)
        .await?
        .ok_or_else(|| format!("no slot table at {}: no node has started", slots::table_key(prefix)))
}

fn status(table: &Table, live: &BTreeSet<String>, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "slot table version {}, {} slots", table.version, table.slots())?;
    let counts = table.counts();
    let mut nodes: BTreeMap<&str, u32> = live.iter().map(|n| (n.as_str(), 0)).collect();
    for (n, c) in &counts {
        nodes.insert(n, *c);
    }
    for (n, c) in nodes {
        let state = if live.contains(n) { "live" } else { "NOT REGISTERED" };
        writeln!(out, "node {n} slots {c} {state}")?;
    }
    writeln!(out, "migrations {}", table.migrations.len())?;
    for m in table.migrations.values() {
        writeln!(out, "  slot {} {} -> {} epoch {}", m.slot, m.from, m.to, m.epoch)?;
    }
    Ok(())
}

/// Moves slots until the plan over `nodes` is empty.
async fn rebalance(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    cluster: &Cluster,
    nodes: &[String],
    parallel: usize,
    out: &mut impl Write,
) -> Result<(), String> {
    let started = Instant::now();
    let (table, _) = load(etcd, prefix).await?;
    // A node that owns slots but is not registered (restarting, or gone for good) holds
    // keys no other node has: moving its slots would need it running.
    let live = live(cluster);
    if let Some(absent) = table.counts().keys().find(|n| !live.contains(*n)) {
        return Err(format!(
            "{absent} owns slots but is not registered: start it (or wait until it has registered) and run this again"
        ));
    }
    let moves = slots::plan(&table, nodes);
    let in_flight = table.migrations.len();
    if moves.is_empty() && in_flight == 0 {
        writeln!(out, "balanced: nothing to move").map_err(|e| e.to_string())?;
    } else {
        drive(etcd, prefix, cluster, &moves, parallel, true, out).await?;
    }
    let (table, _) = load(etcd, prefix).await?;
    let counts: Vec<String> = table.counts().into_iter().map(|(n, c)| format!("{n}={c}")).collect();
    writeln!(
        out,
        "moved {} slots in {:.1} s; slots per node: {}",
        moves.len(),
        started.elapsed().as_secs_f64(),
        counts.join(" ")
    )
    .map_err(|e| e.to_string())
}

/// Starts `moves` (at most `parallel` migrations in flight, counting those already in the
/// table) and waits until every one has landed and, with `all`, every other migration in
/// the table too. A migration to a node that is no longer registered is cancelled (the
/// slot stays with its owner) and its move planned again.
async fn drive(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    cluster: &Cluster,
    moves: &[Move],
    parallel: usize,
    all: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let parallel = parallel.max(1);
    let bar = indicatif::ProgressBar::new(moves.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} slots moved, {elapsed} {msg}")
            .map_err(|e| e.to_string())?,
    );
    let mut waiting: Vec<Move> = moves.to_vec();
    let mut source_gone_since: Option<Instant> = None;
    // Watched, the next moves start the moment a flip lands, not at the next poll.
    let mut watch = etcd.watch(slots::table_key(prefix), None).await.ok();
    loop {
        let live = live(cluster);
        // One read of the table per round: count what landed, start what fits, cancel
        // migrations to nodes that are gone.
        let (in_flight, source_gone) = slots::update(etcd, prefix, |t| {
            waiting.retain(|m| t.owner(m.slot) != m.to);
            let (started, cancelled) = slots::start_moves(t, &waiting, &live, parallel);
            let source_gone = t
                .migrations
                .values()
                .find(|m| !live.contains(&m.from))
                .map(|m| (m.from.clone(), m.slot));
            let seen = (t.migrations.len(), source_gone);
            Ok(if cancelled == 0 && started.is_empty() {
                Decision::Keep(seen)
            } else {
                Decision::Write(seen)
            })
        })
        .await?;
        bar.set_position((moves.len() - waiting.len()) as u64);
        bar.set_message(format!("{in_flight} in flight"));
        let others = all && in_flight > 0;
        if waiting.is_empty() && !others {
            break;
        }
        if waiting.iter().any(|m| !live.contains(&m.to)) {
            return Err("a node the slots were moving to left the cluster; run the command again".into());
        }
        match source_gone {
            Some((from, slot)) if source_gone_since.is_some_and(|t| t.elapsed() > SOURCE_GONE_MAX) => {
                return Err(format!(
                    "{from} (the source of slot {slot}) is not registered: its slots cannot move until it runs again"
                ));
            }
            Some(_) => {
                source_gone_since.get_or_insert_with(Instant::now);
            }
            None => source_gone_since = None,
        }
        changed(&mut watch).await;
    }
    bar.finish_and_clear();
    let _ = out.flush();
    Ok(())
}

/// Waits until the table changed (or [`WATCH_QUIET_MAX`] passed); polls once the watch is
/// broken.
async fn changed(watch: &mut Option<etcd_client::WatchStream>) {
    let Some(stream) = watch else {
        tokio::time::sleep(POLL).await;
        return;
    };
    match tokio::time::timeout(WATCH_QUIET_MAX, stream.message()).await {
        Ok(Ok(Some(_))) | Err(_) => {}
        Ok(_) => *watch = None,
    }
}
