//! Cross-core forwarding with one mesh message per target core per executor round.
//!
//! Every connection task that has keys owned by another core adds them to that core's
//! outbox; the first addition in a round spawns a flush task. glommio runs tasks in FIFO
//! order, so the flush runs after every connection woken in the same round has added its
//! work: the target core gets one message (one wake-up, one reply) for many connections
//! instead of one per connection. The cross-core wake-up is the expensive part of a hop
//! (an eventfd write and a sleeping executor), so this is where a hop's cost is paid down.
//!
//! Order: entries are concatenated in the order connections added them, and the target
//! applies a message's operations in order, so writes to one key keep their order.
//! Bounds: a connection waits for its reply before adding more, so an outbox never holds
//! more than `connections x requests_in_flight_max` operations.

use std::cell::RefCell;
use std::rc::Rc;

use futures::channel::oneshot;

use super::core::{Core, Counters, MeshRequest};
use crate::shard::{Command, Outcome};

/// Work queued for one target core, not yet sent.
#[derive(Default)]
pub struct Outbox {
    ops: Vec<(u64, Command)>,
    /// For each contributing batch: how many operations it added, and where its outcomes go.
    waiters: Vec<(usize, oneshot::Sender<Vec<Outcome>>)>,
}

/// One outbox per core (the own core's stays unused: its keys run inline).
pub struct Outboxes(Vec<RefCell<Outbox>>);

impl Outboxes {
    pub fn new(cores: usize) -> Self {
        Outboxes((0..cores).map(|_| RefCell::default()).collect())
    }
}

/// Queues `ops` for `target` and returns where their outcomes will arrive, in order. The
/// receiver is cancelled if the target cannot be reached (it is shutting down).
pub fn forward(core: &Rc<Core>, target: usize, ops: Vec<(u64, Command)>) -> oneshot::Receiver<Vec<Outcome>> {
    let (tx, rx) = oneshot::channel();
    let mut outbox = core.outboxes.0[target].borrow_mut();
    let first = outbox.waiters.is_empty();
    outbox.waiters.push((ops.len(), tx));
    outbox.ops.extend(ops);
    drop(outbox);
    if first {
        glommio::spawn_local(flush(core.clone(), target)).detach();
    }
    rx
}

/// Sends everything queued for `target` as one message and hands each batch its outcomes.
async fn flush(core: Rc<Core>, target: usize) {
    let Outbox { ops, waiters } = std::mem::take(&mut *core.outboxes.0[target].borrow_mut());
    if ops.is_empty() {
        return;
    }
    // Dropping the waiters (below, on failure) cancels them: SHUTTING_DOWN for their keys.
    let Some(senders) = core.mesh.borrow().clone() else {
        return;
    };
    Counters::add(&core.counters.forwarded_out, ops.len() as u64);
    let (reply, rx) = oneshot::channel();
    // Waits only while the target's queue is full: that is the backpressure. The target
    // never waits on us to drain anything, so this cannot deadlock.
    if senders
        .send_to(target, MeshRequest::Commands { ops, reply })
        .await
        .is_err()
    {
        return;
    }
    drop(senders);
    let Ok(outcomes) = rx.await else { return };
    let mut outcomes = outcomes.into_iter();
    for (n, tx) in waiters {
        // A waiter whose connection went away is simply skipped.
        let _ = tx.send(outcomes.by_ref().take(n).collect());
    }
}
