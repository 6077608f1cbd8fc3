//! Change data capture: every applied write becomes a change event; a dedicated control
//! core publishes the events to RabbitMQ with publisher confirms and forgets a batch only
//! once the broker has confirmed it.
//!
//! ```text
//!  shard core 0: apply -> log record -> (synced) --rtrb queue--+
//!  shard core 1: apply -> log record -> (synced) --rtrb queue--+--> control core
//!                     |                                        |    drain -> per-shard batches
//!                     +---- write-ahead log (the spool) -------+    -> publish -> confirm
//!                                                                   -> checkpoint (per shard)
//! ```
//!
//! The guarantee (with persistence on): every change the log holds has exactly one
//! identity (node_id, shard, seq) and reaches the exchange at least once, in per-shard seq
//! order, across crashes, broker outages and restarts with another core count. Memory is
//! only the fast path; the log is the spool:
//! - an event leaves its shard core only once the log has synced its record, so nothing is
//!   published that a crash could take back;
//! - the control core keeps, per shard, the highest seq the broker confirmed in
//!   `data_dir/cdc-checkpoint`; at start, every logged change after it is read back and
//!   published before that shard's new changes;
//! - compaction keeps every log segment that still holds unconfirmed changes, up to
//!   `cdc.retention_bytes_max`; past it `cdc.overflow` holds writers back (`block`) or
//!   gives the oldest changes up, counted, leaving a visible seq gap (`drop`).
//!
//! - `capture.rs`: the shard core's bounded, lock-free queue.
//! - `forwarder.rs`: the control core: batching, publishing, confirms, reconnects,
//!   retention.
//! - `replay.rs`: reading changes back from the log.
//! - `checkpoint.rs`: the per-shard confirmed seqs on disk.
//! - `encode.rs`: events as protobuf `ChangeBatch` or as the old service's JSON.

pub mod capture;
pub mod checkpoint;
pub mod encode;
pub mod forwarder;
pub mod replay;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What one shard core and the control core share about that core's changes (plain
/// atomics, touched once per log sync or checkpoint, never per write).
#[derive(Debug, Default)]
pub struct CoreLink {
    /// Offset in the core's log of this run up to which every record is synced: the control
    /// core may read the log up to here.
    pub synced_end: AtomicU64,
    /// Set by the core when it dropped events from memory because the queue was full; the
    /// control core then reads the log's tail.
    pub overflowed: AtomicBool,
    /// Set by the control core while the log holds `cdc.retention_bytes_max` of unconfirmed
    /// changes and `cdc.overflow = block`: the core holds writers back.
    pub hold: AtomicBool,
    /// Offset in the core's log of this run below which every change is confirmed and in
    /// the checkpoint on disk: compaction may delete segments that end at or before it.
    pub release_below: AtomicU64,
    /// Events the control core has taken from the core's queue (for the queue depth).
    pub taken_events: AtomicU64,
}

use amqprs::connection::OpenConnectionArguments;
use amqprs::tls::TlsAdaptor;

/// Connection arguments from an `amqp://user:password@host:port/vhost` URL. The vhost is
/// percent-decoded as the AMQP URI spec says (`%2f` is `/`, the default vhost), which
/// amqprs' own parser leaves encoded.
///
/// An `amqps://` URL gets TLS with `tls`' CA (the public web PKI roots when empty) and,
/// when given, its client certificate; the broker's certificate must name the URL's host.
pub fn amqp_args(url: &str, tls: &crate::tls::ClientFiles) -> Result<OpenConnectionArguments, String> {
    let shown = crate::config::mask_password(url);
    let mut args: OpenConnectionArguments = url.try_into().map_err(|e| format!("bad AMQP URL {shown:?}: {e}"))?;
    if url.starts_with("amqps://") {
        let config = tls.client_config("broker TLS")?;
        let host = args.get_host().to_string();
        args.tls_adaptor(TlsAdaptor::new(tokio_rustls::TlsConnector::from(config), host));
    } else if !tls.is_empty() {
        return Err(format!(
            "TLS files are set for the broker but {shown:?} is not an amqps:// URL"
        ));
    }
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let vhost = rest.split_once('/').map_or("", |(_, v)| v);
    let vhost = vhost.split(['?', '#']).next().unwrap_or("");
    let vhost = if vhost.is_empty() {
        "/".to_string()
    } else {
        percent_decode(vhost)
    };
    args.virtual_host(&vhost);
    Ok(args)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counters the control core keeps and any core reads for Stats.
#[derive(Default, Debug)]
pub struct CdcCounters {
    pub connected: AtomicBool,
    pub events_published: AtomicU64,
    pub batches_published: AtomicU64,
    pub confirms_pending: AtomicU64,
    pub reconnects: AtomicU64,
    pub republished_batches: AtomicU64,
    pub delay_p50_ms: AtomicU64,
    pub delay_p99_ms: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Log bytes held for changes the broker has not confirmed yet.
    pub retained_bytes: AtomicU64,
    /// Events read back from the log rather than taken from memory.
    pub events_from_log: AtomicU64,
    pub writers_held: AtomicBool,
    /// Since when (Unix ms) the forwarder has had no broker connection; 0 while connected
    /// or before the first attempt.
    pub disconnected_since_ms: AtomicU64,
    /// When the checkpoint was last written (Unix ms; 0: never).
    pub checkpoint_at_ms: AtomicU64,
    /// When the oldest change not yet confirmed was applied (Unix ms; 0: none pending).
    pub oldest_unconfirmed_ms: AtomicU64,
    /// Logs of earlier runs hold no unconfirmed change any more (or CDC keeps none): they
    /// may be deleted once snapshots cover them.
    pub old_logs_released: AtomicBool,
}

impl CdcCounters {
    pub fn snapshot(&self, enabled: bool) -> crate::proto::CdcStats {
        let r = Ordering::Relaxed;
        crate::proto::CdcStats {
            enabled,
            connected: self.connected.load(r),
            events_published: self.events_published.load(r),
            batches_published: self.batches_published.load(r),
            confirms_pending: self.confirms_pending.load(r),
            reconnects: self.reconnects.load(r),
            republished_batches: self.republished_batches.load(r),
            confirm_delay_p50_ms: self.delay_p50_ms.load(r),
            confirm_delay_p99_ms: self.delay_p99_ms.load(r),
            events_dropped: self.events_dropped.load(r),
            retained_bytes: self.retained_bytes.load(r),
            events_from_log: self.events_from_log.load(r),
            writers_held: self.writers_held.load(r),
            checkpoint_age_ms: match self.checkpoint_at_ms.load(r) {
                0 => -1,
                t => crate::change::now_ms().saturating_sub(t) as i64,
            },
            oldest_unconfirmed_age_ms: match self.oldest_unconfirmed_ms.load(r) {
                0 => 0,
                t => crate::change::now_ms().saturating_sub(t),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the default URL's %2f vhost means "/", and other vhosts pass through decoded.
    #[test]
    fn vhost_is_percent_decoded() {
        let a = amqp_args("amqp://guest:guest@127.0.0.1:5672/%2f", &Default::default()).unwrap();
        assert_eq!(a.get_virtual_host(), "/");
        assert_eq!(
            amqp_args("amqp://u:p@h:1/", &Default::default())
                .unwrap()
                .get_virtual_host(),
            "/"
        );
        assert_eq!(
            amqp_args("amqp://u:p@h:1/prod%2Deu", &Default::default())
                .unwrap()
                .get_virtual_host(),
            "prod-eu"
        );
        assert_eq!(
            amqp_args("amqp://u:p@h:1/plain", &Default::default())
                .unwrap()
                .get_virtual_host(),
            "plain"
        );
    }
}
