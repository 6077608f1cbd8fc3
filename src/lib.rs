//! Flux-KV: a thread-per-core key-value server for bare-metal Linux.
//!
//! ```text
//!         one port, SO_REUSEPORT: the kernel hands each connection to one core
//!   +----------- core 0 ------------+      +----------- core 1 ------------+
//!   | glommio executor (pinned)     |      | glommio executor (pinned)     |
//!   |  own io_uring for sockets     |<---->|  own io_uring for sockets     |  bounded channel mesh
//!   |  listener -> connections      |      |  listener -> connections      |
//!   |  shards 0,2,4,...             |      |  shards 1,3,5,...             |
//!   +-------------------------------+      +-------------------------------+
//! ```
//!
//! A connection's task is the coordinator for its requests: keys owned by its own core are
//! applied inline, keys owned by other cores are grouped per core and sent as one message
//! over the mesh, and all replies go back in request order with one write per batch.
//!
//! Layout (one concept per file):
//! - [`config`]: one `Config` from defaults < TOML < `FLUX_*` env < flags.
//! - [`alloc`]: the server's allocator (jemalloc, and glibc for huge blocks).
//! - [`change`]: the shared vocabulary of writes (a change, its op, record fields, the clock);
//!   a leaf every other data module depends on.
//! - [`wire`]: the frame codec shared by server and clients; [`proto`]: the generated messages.
//! - [`keyspace`]: key -> shard -> core, the routing rule the protocol documents.
//! - [`shard`]: one shard's map, expiry and memory accounting; a core's set of shards.
//! - [`auth`]: users, roles, tokens: who may connect and what each user may do.
//! - [`logging`]: text or JSON log lines, journald priorities under systemd.
//! - [`metrics`]: the control core's HTTP endpoint: Prometheus metrics, health, readiness.
//! - [`systemd`]: readiness, status, stopping and watchdog notifications (sd_notify).
//! - [`tls`]: PEM loading and rustls configurations for every TLS connection, in and out.
//! - [`client`]: async (tokio) client: pipelined connections, shard-aware routing.
//! - [`cdc`]: change capture: per-core lock-free queues, the control core's forwarder, the
//!   checkpoint; the write-ahead log is its spool.
//! - [`cluster`]: etcd registration, the slot table and slot migration (node side), and
//!   slot routing (client side).
//! - [`wal`]: the per-core write-ahead log and recovery.
//! - [`backup`]: backups as files: the manifest, the offline checker, restore.
//! - [`server`]: executors, pinning, mesh, listeners, connections, dispatch. glommio and
//!   io_uring stay behind this module.
//! - `fuzz` (hidden): one entry point per parser of untrusted bytes, for `fuzz/` and the
//!   property tests.
//! - `src/bin/`: thin binaries: `flux-server`, `flux-cli`, `flux-bench`, `flux-cdc-tail`
//!   (the tools themselves live in `tools`).

pub mod alloc;
pub mod auth;
pub mod backup;
pub mod cdc;
pub mod change;
pub mod client;
pub mod cluster;
pub mod config;
#[doc(hidden)]
pub mod fuzz;
pub mod keyspace;
pub mod logging;
pub mod metrics;
pub mod resp;
pub mod server;
pub mod shard;
pub mod systemd;
pub mod tls;
pub mod tools;
pub mod wal;
pub mod wire;

/// Messages of the client protocol, generated from proto/flux.proto (package `flux.v1`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/flux.v1.rs"));

    /// Change events published to RabbitMQ, from proto/cdc.proto (package `flux.cdc.v1`).
    pub mod cdc {
        include!(concat!(env!("OUT_DIR"), "/flux.cdc.v1.rs"));
    }
}
