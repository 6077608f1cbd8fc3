//! The node: one pinned glommio executor per shard core, a bounded channel mesh between
//! them, and their listeners.
//!
//! ```text
//!  main thread: config, listeners (bound in order so port 0 works), signals, join
//!     |
//!     +-- core 0: executor pinned to cpus[0]  --+-- network ring (uring.rs): accept, recv, send
//!     |                                         +-- connections (connection.rs -> dispatch.rs)
//!     |                                         +-- mesh service: applies other cores' batches
//!     |                                         +-- expiry sweep
//!     +-- core 1: the same, pinned to cpus[1]
//! ```
//!
//! Socket I/O lives in `uring.rs` only; the rest of the server never sees which I/O path
//! is used.

mod access;
mod backup;
mod connection;
mod control;
mod core;
mod dispatch;
mod forward;
mod listener;
pub mod lock;
mod resp;
mod uring;
mod wake;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::FutureExt;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

pub use self::access::AccessControl;
pub use self::backup::READ_BYTES_MAX as BACKUP_READ_BYTES_MAX;
pub use self::uring::RingKind;
use crate::cdc::forwarder::{Forwarder, LogSpool};
use crate::cdc::{capture, checkpoint, CdcCounters, CoreLink};
use crate::cluster::registration::{advertise_addr, LeaveRequest, Registration};
use crate::cluster::NodeInfo;
use crate::config::Config;
use crate::keyspace::{Keyspace, KEY_HASH_NAME};
use crate::proto::HelloResponse;
use crate::shard::CoreStore;
use crate::wal::snapshot::OldLogs;

/// How long start-up waits for every core to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// After a core failed to start, how long start-up waits for the others to stop so it can
/// report every cause.
const FAILED_START_WAIT: Duration = Duration::from_millis(1_500);

/// A running node.
pub struct Server {
    local_addr: SocketAddr,
    resp_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    core_ports: Vec<u16>,
    node_id: String,
    cores: u32,
    ring: RingKind,
    shutdown: ShutdownHandle,
    snapshots: SnapshotTrigger,
    access: AccessControl,
    liveness: Liveness,
    exited: mpsc::Receiver<Result<(), String>>,
}

/// Whether every shard core answers over the mesh right now (core 0 asks them all every
/// 200 ms); readable from any thread, for systemd's watchdog.
#[derive(Clone)]
pub struct Liveness(Arc<AtomicU64>);

impl Liveness {
    /// How long ago every core last answered; `None` before the first round.
    pub fn since_all_answered(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(crate::change::now_ms().saturating_sub(at))),
        }
    }
}

/// Asks every core for a snapshot round from any thread (SIGUSR1); the cores pick it up
/// within 100 ms. A client waits for the result with a Snapshot request instead.
#[derive(Clone)]
pub struct SnapshotTrigger(Arc<AtomicU64>);

impl SnapshotTrigger {
    pub fn request(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Starts a graceful shutdown from any thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct ShutdownHandle {
    cores: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    /// Asks the control core to leave the cluster (revoke the etcd lease).
    leave: Option<tokio::sync::mpsc::UnboundedSender<LeaveRequest>>,
}

/// How long shutdown waits for the etcd lease to be revoked before draining anyway.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

impl ShutdownHandle {
    /// Leave the cluster first (clients stop routing here at once), then stop accepting,
    /// answer what was read, refuse the rest. Idempotent.
    pub fn shutdown(&self) {
        if let Some(leave) = &self.leave {
            let (done, wait) = mpsc::channel();
            if leave.send(done).is_ok() {
                let _ = wait.recv_timeout(LEAVE_TIMEOUT);
            }
        }
        if let Some(tx) = self.cores.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a core failed to start: {0}")]
    Core(String),
}

impl Server {
    /// Starts a node and returns once every core accepts connections.
    pub fn start(config: Config) -> Result<Server, StartError> {
        Self::start_with(config, false)
    }

    /// As [`Server::start`]; `repair` cuts a damaged log at its first bad record instead of
    /// refusing to start.
    pub fn start_with(config: Config, repair: bool) -> Result<Server, StartError> {
        let cpus = pick_cpus(&config)?;
        let cores = cpus.len() as u32;
        let keyspace = Keyspace::new(config.shards, cores).map_err(StartError::Invalid)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StartError::Invalid(format!("cannot create data_dir {}: {e}", config.data_dir.display())))?;
        // Held until the cores and the control core are done with the directory.
        let dir_lock = lock::lock(&config.data_dir).map_err(StartError::Invalid)?;
        let node_id = node_id(&config)?;
        let listen: SocketAddr = config
            .listen
            .parse()
            .map_err(|_| StartError::Invalid(format!("bad listen address {}", config.listen)))?;
        let (mut listeners, local_addr, orphans) = listener::bind_all(listen, cpus.len(), config.core_port_base)?;
        let resp_addr = match config.resp.listen.as_str() {
            "" => None,
            addr => {
                let addr: SocketAddr = addr
                    .parse()
                    .map_err(|_| StartError::Invalid(format!("bad resp.listen address {addr}")))?;
                Some(listener::bind_resp(addr, &mut listeners)?)
            }
        };
        let core_ports: Vec<u16> = match config.core_port_base {
            0 => Vec::new(),
            base => (0..cores as u16).map(|i| base + i).collect(),
        };
        let hello = HelloResponse {
            node_id: node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            cores,
            shards: config.shards,
            core_ports: core_ports.iter().map(|p| u32::from(*p)).collect(),
            key_hash: KEY_HASH_NAME.into(),
            auth_required: config.auth.enabled(),
            // Filled in per request from the slot table applied.
            slots: 0,
            slot_table_version: 0,
        };
        // Users, certificates and secrets are read before the port opens: a mistake stops
        // the start instead of showing up at the first client or broker connection.
        let access = AccessControl::new(&config).map_err(StartError::Invalid)?;
        if config.cdc.enabled {
            let c = &config.cdc;
            crate::cdc::amqp_args(&c.url().map_err(StartError::Invalid)?, &c.tls_files())
                .map_err(StartError::Invalid)?;
        }
        if access::protected(&config) {
            tracing::warn!(
                listen = %config.listen,
                "protected mode: no users file and a non-loopback listen address, so only loopback clients are served (set auth.users_file, or --protected-mode false)"
            );
        }

        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let placement = PoolPlacement::Custom(
            cpus.iter()
                .map(|&cpu| CpuSet::online().map(|s| s.filter(|l| l.cpu == cpu)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StartError::Invalid(format!("cannot read the CPU topology: {e}")))?,
        );
        // Change capture: one queue per core, drained by the control core; with the log on,
        // the log is its spool.
        let persistent = config.persistence.enabled;
        let cdc = Arc::new(CdcCounters::default());
        let links: Vec<Arc<CoreLink>> = if config.cdc.enabled {
            (0..cores).map(|_| Arc::new(CoreLink::default())).collect()
        } else {
            Vec::new()
        };
        let (captures, consumers): (Vec<_>, Vec<_>) = links
            .iter()
            .map(|link| {
                let (q, rx) = capture::queue(
                    config.cdc.queue_bytes_max,
                    config.cdc.overflow,
                    link.clone(),
                    persistent,
                );
                (Some(q), rx)
            })
            .unzip();
        if config.cdc.enabled && !persistent {
            tracing::warn!("change capture is on without persistence: events not yet confirmed by the broker are lost if the process stops or crashes (turn persistence on to make the log the spool)");
        }
        // Each core's store, built here so the logs can be replayed before any port opens.
        let mut stores: Vec<CoreStore> = (0..cores)
            .map(|i| CoreStore::new(keyspace, i, config.limits.memory_bytes_max, config.limits.eviction))
            .collect();
        let started_ms = crate::change::now_ms();
        let wal_dir = config.data_dir.join("wal");
        let snap_dir = config.data_dir.join("snapshots");
        let mut old_logs = OldLogs::new(Vec::new(), 0, cores);
        let mut spool = None;
        let mut shard_snapshots = Vec::new();
        let mut persistence = crate::proto::PersistenceStats {
            enabled: persistent,
            fsync: format!("{:?}", config.persistence.fsync).to_lowercase(),
            ..Default::default()
        };
        if persistent {
            for dir in [&wal_dir, &snap_dir] {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StartError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
            }
            // A backup staged by an earlier run was never ended: its client is gone.
            backup::remove_all(&config.data_dir)
                .map_err(|e| StartError::Invalid(format!("cannot remove the staged backups of an earlier run: {e}")))?;
            let record_max = config.limits.frame_bytes_max + 64;
            let r = crate::wal::recovery::recover(&wal_dir, &snap_dir, &keyspace, &mut stores, repair, record_max)
                .map_err(StartError::Invalid)?;
            tracing::info!(
                snapshots = r.snapshots,
                snapshot_bytes = r.snapshot_bytes,
                log_files = r.files,
                log_bytes = r.bytes,
                records_replayed = r.records,
                keys_recovered = r.keys,
                recovery_ms = r.millis,
                truncated = r.truncated.len(),
                "recovered from snapshots and the write-ahead log"
            );
            persistence.log_files_replayed = r.files as u64;
            persistence.log_bytes_replayed = r.bytes;
            persistence.keys_recovered = r.keys;
            persistence.recovery_ms = r.millis;
            persistence.snapshots_loaded = r.snapshots;
            persistence.snapshot_bytes_loaded = r.snapshot_bytes;
            old_logs = OldLogs::new(r.log_files.clone(), r.bytes, cores);
            shard_snapshots = r.shard_snapshots;
            spool = Some(capture_checkpoint(
                &config,
                &keyspace,
                &mut stores,
                r.log_files,
                started_ms,
            )?);
        }
        let forwarder = config.cdc.enabled.then(|| {
            Forwarder::new(
                config.cdc.clone(),
                node_id.clone(),
                keyspace,
                consumers,
                links.clone(),
                cdc.clone(),
                spool.flatten(),
            )
            .flush_within(Duration::from_millis(config.shutdown_timeout_ms / 2))
        });
        let snapshot_requests = Arc::new(AtomicU64::new(0));
        let alive_at_ms = Arc::new(AtomicU64::new(0));
        let control_cpu = control_cpu(&config, &cpus)?;
        let control_nice = config.control_nice;
        let (serving_tx, serving) = tokio::sync::watch::channel(false);
        let slot_gate = (!config.cluster.etcd_endpoints.is_empty())
            .then(|| crate::cluster::gate::SlotGate::new(config.cluster.slots, &node_id));
        let (registration, leave, follower) = if config.cluster.etcd_endpoints.is_empty() {
            (None, None, None)
        } else {
            let info = NodeInfo {
                node_id: node_id.clone(),
                addr: advertise_addr(&config.cluster.advertise_addr, local_addr),
                core_ports: core_ports.clone(),
                cores,
                shards: config.shards,
                version: env!("CARGO_PKG_VERSION").into(),
                started_at_ms: crate::change::now_ms(),
            };
            let endpoints = config.cluster.etcd_endpoints.clone();
            let ttl = config.cluster.lease_ttl_ms;
            let access = crate::cluster::EtcdAccess::from_config(&config.cluster).map_err(StartError::Invalid)?;
            // The node registers once it has applied the slot table: a node that cannot
            // (its cluster.slots disagrees) never shows up as a member.
            let (joined_tx, joined) = tokio::sync::watch::channel(false);
            let peer = crate::client::ClientConfig {
                connections_per_endpoint: 1,
                shard_aware: false,
                security: crate::client::Security::from_files(
                    Some(config.cluster.peer_token_file.as_str()).filter(|f| !f.is_empty()),
                    false,
                    &Default::default(),
                )
                .map_err(|e| StartError::Invalid(format!("cluster.peer_token_file: {e}")))?,
                ..Default::default()
            };
            let local = match local_addr.ip().is_unspecified() {
                true => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local_addr.port()),
                false => local_addr,
            };
            let follower = crate::cluster::follower::Follower {
                endpoints: endpoints.clone(),
                access: access.clone(),
                prefix: config.cluster.prefix.clone(),
                gate: slot_gate.clone().expect("made above in a cluster"),
                local,
                peer,
                joined: joined_tx,
                serving: serving.clone(),
                auto_rebalance: config.cluster.auto_rebalance,
            };
            let (r, leave) = Registration::new(endpoints, access, &config.cluster.prefix, info, ttl, joined);
            (Some(r), Some(leave), Some(follower))
        };
        let (scrape_senders, scrape_receivers) = crate::metrics::scrape_channels(cores);
        let serving_flag = Arc::new(AtomicBool::new(false));
        let metrics_listen = config.metrics.listen.clone();
        let metrics_node = (!metrics_listen.is_empty()).then(|| {
            let node = crate::metrics::Node {
                cores: scrape_senders,
                cdc: cdc.clone(),
                cdc_enabled: config.cdc.enabled,
                cdc_blocked_ms_max: config.cdc.blocked_ms_max,
                persistence: persistence.clone(),
                alive_at_ms: alive_at_ms.clone(),
                serving: serving_flag.clone(),
                registration: registration.as_ref().map(|r| r.state.clone()),
                memory_per_core_max: config.limits.memory_bytes_max / u64::from(cores),
                evicting: config.limits.eviction != crate::config::Eviction::None,
            };
            Arc::new(node)
        });
        let io_memory = config.runtime.io_memory_bytes;
        let preempt = Duration::from_micros(config.runtime.preempt_timer_us);
        let mesh_depth = config.limits.mesh_messages_max;
        // Recovery is done: only now may clients connect.
        if orphans {
            listener::wait_for_orphans(local_addr);
        }
        // Its errors name the address.
        listener::listen_all(&listeners, local_addr).map_err(|e| StartError::Invalid(e.to_string()))?;
        let boot = Arc::new(core::Boot {
            config,
            keyspace,
            hello,
            listeners: Mutex::new(listeners.into_iter().map(Some).collect()),
            shutdown: shutdown_rx.shared(),
            stores: Mutex::new(stores.into_iter().map(Some).collect()),
            captures: Mutex::new(captures),
            links,
            wal_dir: persistent.then_some(wal_dir),
            snap_dir,
            old_logs,
            shard_snapshots,
            snapshot_requests: snapshot_requests.clone(),
            alive_at_ms: alive_at_ms.clone(),
            persistence,
            started_ms,
            cdc,
            access: access.clone(),
            scrapes: Mutex::new(scrape_receivers.into_iter().map(Some).collect()),
            slots: slot_gate.clone(),
        });
        // glommio's MeshBuilder keeps its peer list in an `Rc` yet is `Send`: clones made or
        // dropped on several executor threads at once race on the reference count, and a
        // lost increment frees the list while cores still read it (heap corruption, about
        // one start in ten under AddressSanitizer). So every clone is made here, on one
        // thread, before the executors exist; each core takes one and only drops it (racing
        // decrements can only leak the list, never free it early).
        let meshes: Arc<Mutex<Vec<core::MeshBuilderFull>>> = Arc::new(Mutex::new(if cores > 1 {
            let mesh = MeshBuilder::full(cores as usize, mesh_depth);
            (0..cores).map(|_| mesh.clone()).collect()
        } else {
            Vec::new()
        }));
        let starting = Arc::new(wake::Starting::default());
        let report = core::StartReport::new(ready_tx, starting.clone());
        let handles = LocalExecutorPoolBuilder::new(placement)
            .name("flux-core")
            .io_memory(io_memory)
            .preempt_timer(preempt)
            .on_all_shards(move || {
                let boot = boot.clone();
                let mesh = meshes.lock().ok().and_then(|mut m| m.pop());
                async move { core::run(boot, mesh, report).await }
            })
            .map_err(|e| StartError::Core(e.to_string()))?;

        // The metrics port is taken once the executors run: taken before, its descriptor
        // moved where a too-low RLIMIT_NOFILE hits glommio's executor start, which then never
        // returns (a failed executor does not release the others waiting for it). A busy
        // port still stops the start, with the cores stopped.
        let metrics = match metrics_node {
            Some(node) => match std::net::TcpListener::bind(&metrics_listen) {
                Ok(l) => Some((l, node)),
                Err(e) => {
                    let _ = shutdown_tx.send(());
                    let _ = handles.join_all();
                    return Err(StartError::Invalid(format!(
                        "metrics.listen: cannot listen on {metrics_listen}: {e}"
                    )));
                }
            },
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|(l, _)| l.local_addr().ok());
        let stop_control = Arc::new(AtomicBool::new(false));
        let shared = control_cpu.is_some_and(|c| cpus.contains(&c));
        let placement = control::Placement {
            cpu: control_cpu,
            shared_nice: (shared && control_nice > 0).then_some(control_nice),
        };
        let control = control::spawn(
            forwarder,
            registration,
            follower,
            metrics,
            placement,
            stop_control.clone(),
        )?;
        let (exit_tx, exited) = mpsc::channel();
        std::thread::Builder::new().name("flux-join".into()).spawn(move || {
            let failures: Vec<String> = handles
                .join_all()
                .into_iter()
                .filter_map(|r| match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) => Some(format!("cannot run a core's executor: {e}")),
                })
                .collect();
            // The cores are gone, so no more changes: let the control core flush and stop.
            stop_control.store(true, Ordering::Release);
            if let Some(control) = control {
                let _ = control.join();
            }
            drop(dir_lock);
            let _ = exit_tx.send(if failures.is_empty() {
                Ok(())
            } else {
                Err(failures.join("; "))
            });
        })?;

        let mut ring = RingKind::DeferTaskrun;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut reported = 0;
        let mut woken = 0;
        while reported < cores {
            match ready_rx.recv_timeout(wake::WAKE_INTERVAL) {
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    woken += starting.wake();
                    continue;
                }
                Ok(Ok((_, kind))) => {
                    reported += 1;
                    if kind == RingKind::Plain {
                        ring = kind;
                    }
                }
                Ok(Err(e)) => {
                    // Stop the cores that did start (those still joining the mesh too), and
                    // take the pool's account of the failure: an executor that could not be
                    // built says why only there.
                    let _ = shutdown_tx.send(());
                    let mut cause = match exited.recv_timeout(FAILED_START_WAIT) {
                        Ok(Err(why)) => why,
                        _ => e,
                    };
                    if let Some(hint) = descriptor_limit_hint(cores) {
                        cause = format!("{cause}; {hint}");
                    }
                    return Err(StartError::Core(cause));
                }
                Err(_) => return Err(StartError::Core("cores did not report ready in time".into())),
            }
        }
        if woken > 0 {
            tracing::debug!(signals = woken, "start-up woke cores still starting");
        }
        // Every core accepts connections: the node may now be announced in etcd.
        let _ = serving_tx.send(true);
        serving_flag.store(true, Ordering::Relaxed);
        Ok(Server {
            local_addr,
            resp_addr,
            metrics_addr,
            core_ports,
            node_id,
            cores,
            ring,
            shutdown: ShutdownHandle {
                cores: Arc::new(Mutex::new(Some(shutdown_tx))),
                leave,
            },
            snapshots: SnapshotTrigger(snapshot_requests),
            liveness: Liveness(alive_at_ms),
            access,
            exited,
        })
    }

    /// The shared address every core listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the Redis protocol is served (`resp.listen`), when on.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// Where /metrics, /healthz and /readyz are served (`metrics.listen`), when on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Per-core ports, when `core_port_base` is set.
    pub fn core_ports(&self) -> &[u16] {
        &self.core_ports
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn cores(&self) -> u32 {
        self.cores
    }

    /// Which network ring the cores use (the fast path needs Linux 6.1+).
    pub fn ring_kind(&self) -> RingKind {
        self.ring
    }

    /// A handle that begins a graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// A handle that reloads the users file and the TLS certificates (SIGHUP) from any
    /// thread: new connections and Auth requests see them; open connections keep theirs.
    pub fn access_control(&self) -> AccessControl {
        self.access.clone()
    }

    /// A handle that tells whether every core still answers (for the watchdog).
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// A handle that asks every core for a snapshot round.
    pub fn snapshot_trigger(&self) -> SnapshotTrigger {
        self.snapshots.clone()
    }

    /// Waits until every core has stopped, at most `timeout`. `None` means still running.
    pub fn wait(&self, timeout: Duration) -> Option<Result<(), String>> {
        match self.exited.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err("core join thread vanished".into())),
        }
    }
}

/// Descriptors a core needs to start (glommio's rings and eventfds, the network ring, its
/// listeners, the log; a 2-core node started with 24 here), and the process's own.
const CORE_START_DESCRIPTORS: u64 = 8;
const PROCESS_DESCRIPTORS: u64 = 16;

/// After a core failed to start: names a file-descriptor limit too low to start `cores`
/// cores. Some such failures reach us only as a glommio panic whose message blames the
/// kernel's age (its io_uring probe needs a descriptor), so the cause is said here.
fn descriptor_limit_hint(cores: u32) -> Option<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let need = PROCESS_DESCRIPTORS + CORE_START_DESCRIPTORS * u64::from(cores);
    (limit.rlim_cur < need).then(|| {
        format!(
            "likely cause: Too many open files (RLIMIT_NOFILE is {}; {cores} cores need about {need} descriptors to start, plus one per connection)",
            limit.rlim_cur
        )
    })
}

/// Loads (or, on the first start with change capture, creates) the change-capture
/// checkpoint, and says what the forwarder reads back from the logs of earlier runs. With
/// capture off, a leftover checkpoint is removed (saying how many changes were never
/// delivered), so a later start with capture on begins at the current state.
fn capture_checkpoint(
    config: &Config,
    keyspace: &Keyspace,
    stores: &mut [CoreStore],
    old_files: Vec<std::path::PathBuf>,
    started_ms: u64,
) -> Result<Option<LogSpool>, StartError> {
    let path = checkpoint::path(&config.data_dir);
    let recovered: Vec<u64> = (0..keyspace.shards())
        .map(|s| stores[keyspace.core_of_shard(s) as usize].shard_seq(s))
        .collect();
    let saved = checkpoint::load(&path, keyspace.shards()).map_err(StartError::Invalid)?;
    if !config.cdc.enabled {
        if let Some(saved) = saved {
            let undelivered: u64 = recovered.iter().zip(&saved).map(|(r, c)| r.saturating_sub(*c)).sum();
            if undelivered > 0 {
                tracing::warn!(undelivered, file = %path.display(), "change capture is off: changes that were never delivered are given up");
            }
            std::fs::remove_file(&path)
                .map_err(|e| StartError::Invalid(format!("cannot remove {}: {e}", path.display())))?;
        }
        return Ok(None);
    }
    let confirmed = match saved {
        Some(saved) => saved,
        None => {
            checkpoint::store(&path, &recovered, crate::change::now_ms())
                .map_err(|e| StartError::Invalid(format!("cannot write {}: {e}", path.display())))?;
            recovered.clone()
        }
    };
    for (shard, (&c, &r)) in confirmed.iter().zip(&recovered).enumerate() {
        if c > r {
            // The log lost changes that were published (fsync = no and a power loss):
            // continue after the published seq, so no identity names two changes.
            tracing::error!(
                shard,
                confirmed = c,
                logged = r,
                "the log ends before changes the broker confirmed; continuing after them"
            );
            stores[keyspace.core_of_shard(shard as u32) as usize].restore_seq(shard as u32, c);
        }
    }
    let pending: u64 = recovered
        .iter()
        .zip(&confirmed)
        .map(|(r, c)| r.saturating_sub(*c))
        .sum();
    if pending > 0 {
        tracing::info!(
            changes = pending,
            "change capture: publishing the changes the broker had not confirmed before the restart"
        );
    }
    Ok(Some(LogSpool {
        wal_dir: config.data_dir.join("wal"),
        run: core::run_name(started_ms),
        old_files,
        confirmed,
        checkpoint_path: path,
        record_bytes_max: config.limits.frame_bytes_max + 64,
    }))
}

/// The CPUs the shard executors are pinned to: `cpus` if given, else the first `cores`
/// online CPUs (`cores = 0`: all of them).
fn pick_cpus(config: &Config) -> Result<Vec<usize>, StartError> {
    let online: Vec<usize> = {
        let mut v: Vec<usize> = CpuSet::online()
            .map_err(|e| StartError::Invalid(format!("cannot list online CPUs: {e}")))?
            .into_iter()
            .map(|l| l.cpu)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    if !config.cpus.is_empty() {
        if let Some(bad) = config.cpus.iter().find(|c| !online.contains(c)) {
            return Err(StartError::Invalid(format!(
                "cpus: CPU {bad} is not online (online: {online:?})"
            )));
        }
        return Ok(config.cpus.clone());
    }
    let cores = match config.cores as usize {
        0 => online.len(),
        n => n,
    };
    if cores > online.len() {
        return Err(StartError::Invalid(format!(
            "cores: {cores} asked but only {} CPUs are online; pinning one executor per CPU",
            online.len()
        )));
    }
    Ok(online[..cores].to_vec())
}

/// The control core's CPU: `control_cpu` if set, else the first online CPU no shard core
/// uses, else the last shard core's (shared: fine while the control core has little to do).
fn control_cpu(config: &Config, shard_cpus: &[usize]) -> Result<Option<usize>, StartError> {
    if config.control_cpu >= 0 {
        return Ok(Some(config.control_cpu as usize));
    }
    let online: Vec<usize> = CpuSet::online()
        .map_err(|e| StartError::Invalid(format!("cannot list online CPUs: {e}")))?
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    Ok(online
        .iter()
        .copied()
        .find(|c| !shard_cpus.contains(c))
        .or(shard_cpus.last().copied()))
}

/// The node id: configured, or created once and kept in `data_dir/node_id`.
fn node_id(config: &Config) -> Result<String, StartError> {
    if !config.cluster.node_id.is_empty() {
        return Ok(config.cluster.node_id.clone());
    }
    let path = config.data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StartError::Invalid(format!("cannot read {}: {e}", path.display()))),
    }
    let id = new_node_id();
    write_atomically(&path, format!("{id}\n").as_bytes())
        .map_err(|e| StartError::Invalid(format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

/// 64 bits from the clock, pid and address-space layout: unique enough for node names.
fn new_node_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stack = &nanos as *const _ as usize;
    let seed = format!("{nanos}-{}-{stack}", std::process::id());
    format!("flux-{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()))
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}
