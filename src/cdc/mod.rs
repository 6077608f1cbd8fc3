//! Change data capture: every applied write becomes a change event; a dedicated control
//! core publishes the events to RabbitMQ with publisher confirms and forgets a batch only
//! once the broker has confirmed it.
//!
//! ```text
//!  shard core 0 --rtrb queue--+
//!  shard core 1 --rtrb queue--+--> control core (one thread, tokio current_thread, pinned)
//!                                    drain -> per-shard batches -> publish -> confirm
//! ```
//!
//! - `capture.rs`: the shard core's bounded, lock-free queue and its overflow policy.
//! - `forwarder.rs`: the control core: batching, publishing, confirms, reconnects.
//! - `spool.rs`: the disk spool for batches that pile up while the broker is away.
//! - `encode.rs`: events as protobuf `ChangeBatch` or as the old service's JSON.

pub mod capture;
pub mod encode;
pub mod forwarder;
pub mod spool;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use amqprs::connection::OpenConnectionArguments;

/// Connection arguments from an `amqp://user:password@host:port/vhost` URL. The vhost is
/// percent-decoded as the AMQP URI spec says (`%2f` is `/`, the default vhost), which
/// amqprs' own parser leaves encoded.
pub fn amqp_args(url: &str) -> Result<OpenConnectionArguments, String> {
    let mut args: OpenConnectionArguments = url.try_into().map_err(|e| format!("bad AMQP URL {url:?}: {e}"))?;
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
    pub spool_bytes: AtomicU64,
    pub events_dropped: AtomicU64,
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
            spool_bytes: self.spool_bytes.load(r),
            events_dropped: self.events_dropped.load(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the default URL's %2f vhost means "/", and other vhosts pass through decoded.
    #[test]
    fn vhost_is_percent_decoded() {
        let a = amqp_args("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(a.get_virtual_host(), "/");
        assert_eq!(amqp_args("amqp://u:p@h:1/").unwrap().get_virtual_host(), "/");
        assert_eq!(
            amqp_args("amqp://u:p@h:1/prod%2Deu").unwrap().get_virtual_host(),
            "prod-eu"
        );
        assert_eq!(amqp_args("amqp://u:p@h:1/plain").unwrap().get_virtual_host(), "plain");
    }
}
