//! One `Config` for the whole node, layered: defaults < TOML file (`--config FILE`) <
//! `FLUX_*` environment < command-line flags.
//!
//! One naming rule everywhere: config key `section.key` is the flag `--section-key` and the
//! variable `FLUX_SECTION_KEY`; top-level keys have no section (`listen`, `--listen`,
//! `FLUX_LISTEN`). Flags and variables are derived from the default config itself, so a new
//! field is settable in all three places with no extra code, and [`KEY_DOCS`] (checked by a
//! test to cover every key) gives each one its help line. Every flag takes a value, booleans
//! too (`--persistence-enabled false`), so a flag means the same thing as its variable.

use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";
pub const DEFAULT_SHARDS: u32 = 256;
/// Loopback only by default: metrics tell a lot about the data (key counts, error rates).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9379";
pub const DEFAULT_DATA_DIR: &str = "./data";
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_FRAME_BYTES_MAX: usize = 16 << 20;
pub const DEFAULT_KEY_BYTES_MAX: usize = 64 << 10;
pub const DEFAULT_VALUE_BYTES_MAX: usize = 8 << 20;
pub const DEFAULT_CONNECTIONS_PER_CORE_MAX: usize = 10_000;
pub const DEFAULT_REQUESTS_IN_FLIGHT_MAX: usize = 1_024;
pub const DEFAULT_WRITE_BUFFER_BYTES_MAX: usize = 1 << 20;
pub const DEFAULT_MESH_MESSAGES_MAX: usize = 256;
/// Keys in one MGET or MSET. A request is decoded whole before it is planned, so this
/// bounds the work and memory one frame can cost before the core yields (10,000 one-byte
/// keys decode in well under a millisecond); the key count is read from the frame without
/// decoding it, so an oversized request is refused for almost nothing.
pub const DEFAULT_BATCH_KEYS_MAX: usize = 10_000;
/// A frame must arrive whole within this long of its first byte (30 s: 16 MiB at 560 KB/s).
pub const DEFAULT_FRAME_READ_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_RING_ENTRIES: u32 = 4_096;
/// Small on purpose: sockets use the per-core network ring, not glommio's registered
/// buffers, and RLIMIT_MEMLOCK is often only 8 MiB for the whole process.
pub const DEFAULT_IO_MEMORY_BYTES: usize = 1 << 20;
/// A core busy with its own sockets notices messages from other cores (forwarded keys,
/// replies) only when glommio's preempt timer fires; glommio's default of 100 ms showed up
/// as 100 ms stalls at p99.9 under load. 1 ms bounds them at no measured throughput cost.
pub const DEFAULT_PREEMPT_TIMER_US: u64 = 1_000;

/// Normal priority by default. A control core sharing a shard core's CPU preempts it on its
/// wake-ups and measured 0.6-0.9 us of CPU per write with change capture on; at niceness 19
/// it runs in the shard core's idle time, in larger runs, and measured 0.24-0.28 us
/// (bench/results/README.md). But then change capture only runs when that CPU has time to
/// spare: under load from anything else on the CPU it lags, and the retention bound, which
/// the control core measures, is enforced late. An operator who co-locates may choose that.
pub const DEFAULT_CONTROL_NICE: i32 = 0;

/// Help line for every config key, in the order `--help` and the README show them.
pub const KEY_DOCS: &[(&str, &str)] = &[
    ("listen", "address all shard cores listen on together (SO_REUSEPORT); port 0 picks a free port"),
    ("cores", "shard cores (one pinned executor each); 0 = every online CPU"),
    ("cpus", "CPU ids the shard executors are pinned to, comma-separated; empty = the first `cores` online CPUs"),
    ("shards", "shards per node, a power of two; stored with the data"),
    ("core_port_base", "when non-zero, core i also listens alone on this port + i (announced in Hello.core_ports)"),
    ("data_dir", "directory for the node id, the write-ahead logs, snapshots and the change-capture checkpoint"),
    ("log_level", "tracing filter: error, warn, info, debug, trace, or a directive list (target=level,...); one that does not parse stops the start"),
    ("log_format", "text, or json (one JSON object per line); under systemd, text lines carry journald priorities"),
    ("shutdown_timeout_ms", "on SIGTERM/SIGINT, the longest wait for in-flight work before exiting"),
    ("limits.frame_bytes_max", "largest request frame; larger ones get FRAME_TOO_LARGE and the connection closes"),
    ("limits.key_bytes_max", "largest key; larger ones get KEY_TOO_LARGE"),
    ("limits.value_bytes_max", "largest value; larger ones get VALUE_TOO_LARGE"),
    ("limits.memory_bytes_max", "memory for keys and values per node, split evenly over the cores; 0 = unlimited; what a write that would exceed it does is limits.eviction"),
    ("limits.eviction", "at limits.memory_bytes_max: none = writes that need memory get OUT_OF_MEMORY; lru = they evict the least recently used keys (approximate LRU, sampled), each eviction logged and published as EVICTED"),
    ("limits.connections_per_core_max", "open connections per core; further connections are closed at once"),
    ("limits.requests_in_flight_max", "unanswered requests per connection before the server stops reading from it"),
    ("limits.write_buffer_bytes_max", "encoded replies buffered per connection before they are sent"),
    ("limits.mesh_messages_max", "messages queued from one core to another before the sender waits"),
    ("limits.batch_keys_max", "keys in one MGET or MSET; more get BATCH_TOO_LARGE (nothing applied). Batches are applied in slices, but one request is decoded and encoded whole: raising this raises the longest stall one request can cause"),
    ("limits.idle_timeout_ms", "a connection with no request for this long is closed; 0 = never (like Redis' timeout)"),
    ("limits.frame_read_timeout_ms", "longest from a frame's first byte to its last; a slower frame gets TIMED_OUT and the connection closes; 0 = no limit"),
    ("protected_mode", "with no users file (auth off) and a listen address that is not loopback, serve only loopback peers and tell the others why (as Redis does); false turns this off"),
    ("auth.users_file", "TOML file of users (name, role, token hash, key prefixes); when set, every request but HELLO and PING needs an Auth first. Reloaded on SIGHUP"),
    ("auth.failures_max", "failed Auth requests after which the server closes the connection"),
    ("tls.cert_file", "PEM certificate chain for the client port; when set, the port speaks TLS only. Reloaded on SIGHUP"),
    ("tls.key_file", "PEM private key of tls.cert_file"),
    ("tls.client_ca_file", "PEM CA certificates; when set, clients must present a certificate it signed (mutual TLS); one whose common name is a user's cert_common_name is authenticated as that user"),
    ("runtime.ring_entries", "submission queue entries of each core's network io_uring"),
    ("runtime.io_memory_bytes", "glommio registered I/O memory per core (counts against RLIMIT_MEMLOCK)"),
    ("runtime.preempt_timer_us", "longest a busy core runs before it looks at other cores' messages"),
    ("control_cpu", "CPU the control core (change capture forwarder) is pinned to; -1 = the CPU after the shard cores, or the last one"),
    ("control_nice", "scheduling niceness (0..19) of the control core when it shares a CPU with a shard core: higher lets the shard core's requests come first, and change capture (and the retention bound it enforces) lags when that CPU is busy"),
    ("cluster.node_id", "node identity; empty = a random id created on first start and kept in data_dir/node_id"),
    ("cluster.etcd_endpoints", "etcd endpoints, comma-separated (host:port); empty = standalone, no registration"),
    ("cluster.prefix", "etcd key prefix; the node registers at <prefix>/nodes/<node_id>"),
    ("cluster.advertise_addr", "address clients use to reach this node; empty = FLUX_POD_IP, else the listen address unless it is a wildcard, else the first non-loopback interface address"),
    ("cluster.lease_ttl_ms", "registration lease; a node that stops renewing it leaves the cluster after this long"),
    ("cluster.etcd_tls_ca_file", "PEM CA that signed etcd's certificate; set it (and use https:// endpoints) to reach etcd over TLS"),
    ("cluster.etcd_tls_cert_file", "PEM client certificate for etcd (its --client-cert-auth)"),
    ("cluster.etcd_tls_key_file", "PEM private key of cluster.etcd_tls_cert_file"),
    ("cluster.etcd_user", "etcd user name when etcd has authentication on; empty = none"),
    ("cluster.etcd_password_file", "file holding the etcd user's password (e.g. a systemd credential: %d/etcd-password)"),
    ("cluster.slots", "slots the cluster divides keys into (a power of two, at least shards); fixed when the first node creates the cluster, and a node with another value refuses to join"),
    ("cluster.peer_token_file", "token file (user:secret) of an admin user this node authenticates with when it copies a slot from another node (needed when the nodes have auth on)"),
    ("cluster.auto_rebalance", "move slots without being asked: the nodes elect a leader in etcd, which evens out the slots over the registered nodes once membership has been stable for 2 s (a few slots at a time); off = only flux-cli cluster commands move slots"),
    ("cluster.migration_dirty_keys_max", "most distinct keys written to a slot while it is being copied out; beyond it the copy starts again"),
    ("persistence.enabled", "write every change to a per-core write-ahead log under data_dir/wal and replay it at start"),
    ("persistence.fsync", "always (acknowledge once durable; one disk write per executor round), everysec, or no"),
    ("persistence.snapshot_log_bytes_min", "a core snapshots its shards (and deletes the log they cover) once its log exceeds both this and its last snapshot's size"),
    ("persistence.log_retry_interval_ms", "after a failed log write (a full disk), how often the core tries again; it refuses writes with STORAGE_UNAVAILABLE until one succeeds"),
    ("cdc.enabled", "publish every change to RabbitMQ"),
    ("cdc.amqp_url", "broker address, amqp://user:password@host:port/vhost, or amqps:// for TLS"),
    ("cdc.amqp_url_file", "file holding cdc.amqp_url, so the password stays out of the config and the process list (e.g. a systemd credential: %d/amqp-url)"),
    ("cdc.tls_ca_file", "PEM CA that signed the broker's certificate (amqps://); empty = the public web PKI roots"),
    ("cdc.tls_cert_file", "PEM client certificate for the broker (amqps:// with client authentication)"),
    ("cdc.tls_key_file", "PEM private key of cdc.tls_cert_file"),
    ("cdc.exchange", "durable topic exchange for protobuf batches (routing key <node_id>.<shard>)"),
    ("cdc.format", "protobuf (ChangeBatch per shard, topic exchange) or json (the old service's messages, fanout exchange flux_kv_events)"),
    ("cdc.batch_events_max", "events in one published batch"),
    ("cdc.batch_bytes_max", "encoded bytes in one published batch"),
    ("cdc.batch_delay_ms", "longest an event waits for its batch to fill; longer = fewer, larger broker messages (each publish is a syscall and a confirm: the control core's main cost), shorter = a lower write-to-confirm delay"),
    ("cdc.queue_bytes_max", "change events queued per shard core for the control core, in bytes (an event takes 45 bytes plus its key and value); with persistence on, what does not fit is read back from the log"),
    ("cdc.confirms_pending_max", "published batches awaiting the broker's confirm before the forwarder stops taking more"),
    ("cdc.retention_bytes_max", "write-ahead log kept for changes the broker has not confirmed (the log is the spool); at this bound cdc.overflow applies"),
    ("cdc.overflow", "at cdc.retention_bytes_max (or, persistence off, a full queue): block (writers wait, nothing lost) or drop (the oldest unconfirmed changes are given up, counted in Stats, a visible seq gap)"),
    ("cdc.log_sync_interval_ms", "with fsync everysec or no, how often the log is synced while changes wait for it (an event is published only once its record is synced)"),
    ("cdc.blocked_ms_max", "change capture without a broker connection for longer than this makes the node not ready (/readyz 503), though it keeps serving"),
    ("resp.listen", "address of the Redis protocol (RESP2) port, served by every core like the protobuf port (SO_REUSEPORT), with the same limits, log, change capture, auth and TLS; empty = off"),
    ("metrics.listen", "HTTP address of /metrics (Prometheus), /healthz and /readyz, served by the control core; empty = off"),
    ("cdc.reconnect_delay_max_ms", "longest pause between reconnection attempts to the broker"),
];

/// The effective configuration of a node. Field names are the config keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub cores: u32,
    pub cpus: Vec<usize>,
    pub shards: u32,
    pub core_port_base: u16,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub shutdown_timeout_ms: u64,
    pub control_cpu: i64,
    pub control_nice: i32,
    pub protected_mode: bool,
    pub limits: Limits,
    pub runtime: Runtime,
    pub cluster: Cluster,
    pub persistence: Persistence,
    pub cdc: Cdc,
    pub auth: Auth,
    pub tls: Tls,
    pub metrics: Metrics,
    pub resp: Resp,
}

/// The Redis protocol front end (src/server/resp.rs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resp {
    /// Empty = off.
    pub listen: String,
}

/// The HTTP endpoint for Prometheus and health checks (src/metrics.rs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Empty = off.
    pub listen: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

/// Client authentication: who may connect and what each user may do (src/auth.rs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Empty = auth off.
    pub users_file: String,
    pub failures_max: u32,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            users_file: String::new(),
            failures_max: 3,
        }
    }
}

impl Auth {
    pub fn enabled(&self) -> bool {
        !self.users_file.is_empty()
    }
}

/// TLS on the client port (src/tls.rs). Empty `cert_file` = plaintext.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: String,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// Reads a secret from a file (a systemd credential, a mounted secret): the whole file,
/// without surrounding whitespace.
pub fn read_secret(setting: &str, path: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{setting}: cannot read {path}: {e}"))
}

/// The write-ahead log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Persistence {
    pub enabled: bool,
    pub fsync: Fsync,
    pub snapshot_log_bytes_min: u64,
    pub log_retry_interval_ms: u64,
}

impl Default for Persistence {
    fn default() -> Self {
        Self {
            enabled: true,
            fsync: Fsync::Everysec,
            snapshot_log_bytes_min: 64 << 20,
            log_retry_interval_ms: 1_000,
        }
    }
}

/// When a write is acknowledged relative to the log reaching the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After its record is on disk (group commit: one fdatasync per executor round).
    Always,
    /// At once; the log is synced every second.
    Everysec,
    /// At once; the kernel writes the log back when it likes.
    No,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Change data capture: every write forwarded to RabbitMQ by the control core.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cdc {
    pub enabled: bool,
    pub amqp_url: String,
    pub amqp_url_file: String,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub exchange: String,
    pub format: CdcFormat,
    pub batch_events_max: usize,
    pub batch_bytes_max: usize,
    pub batch_delay_ms: u64,
    pub queue_bytes_max: usize,
    pub confirms_pending_max: usize,
    pub retention_bytes_max: u64,
    pub overflow: Overflow,
    pub reconnect_delay_max_ms: u64,
    pub log_sync_interval_ms: u64,
    pub blocked_ms_max: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CdcFormat {
    Protobuf,
    Json,
}

/// What change capture does when the log holds `cdc.retention_bytes_max` of unconfirmed
/// changes (with persistence off: when a core's queue is full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Writers wait until the broker confirms enough: nothing is lost. Reads, Stats,
    /// cross-core traffic and shutdown go on.
    Block,
    /// Writers go on; the oldest unconfirmed changes are given up, counted in Stats and the
    /// log, and consumers see the gap in seq.
    Drop,
}

impl Default for Cdc {
    fn default() -> Self {
        Self {
            enabled: false,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_url_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            exchange: "flux.cdc".into(),
            format: CdcFormat::Protobuf,
            batch_events_max: 1_024,
            batch_bytes_max: 1 << 20,
            batch_delay_ms: 100,
            queue_bytes_max: 8 << 20,
            confirms_pending_max: 4_096,
            retention_bytes_max: 1 << 30,
            overflow: Overflow::Block,
            reconnect_delay_max_ms: 5_000,
            log_sync_interval_ms: 10,
            blocked_ms_max: 10_000,
        }
    }
}

/// Every limit of the data path. Units are in the names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub frame_bytes_max: usize,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub memory_bytes_max: u64,
    pub eviction: Eviction,
    pub connections_per_core_max: usize,
    pub requests_in_flight_max: usize,
    pub write_buffer_bytes_max: usize,
    pub mesh_messages_max: usize,
    pub batch_keys_max: usize,
    pub idle_timeout_ms: u64,
    pub frame_read_timeout_ms: u64,
}

/// What a write does when the node holds `limits.memory_bytes_max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Eviction {
    /// It is refused with OUT_OF_MEMORY; nothing is removed that a client did not remove.
    None,
    /// It evicts the least recently read or written keys until it fits (approximate LRU:
    /// the oldest of a few random samples and the best candidates kept from earlier ones,
    /// as Redis' allkeys-lru). Each evicted key is a log record and an EVICTED change.
    Lru,
}

/// Executor and ring settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runtime {
    pub ring_entries: u32,
    pub io_memory_bytes: usize,
    pub preempt_timer_us: u64,
}

/// Cluster identity and registration in etcd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    pub node_id: String,
    pub etcd_endpoints: Vec<String>,
    pub prefix: String,
    pub advertise_addr: String,
    pub lease_ttl_ms: u64,
    pub etcd_tls_ca_file: String,
    pub etcd_tls_cert_file: String,
    pub etcd_tls_key_file: String,
    pub etcd_user: String,
    pub etcd_password_file: String,
    pub slots: u32,
    pub peer_token_file: String,
    pub migration_dirty_keys_max: usize,
    pub auto_rebalance: bool,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            etcd_endpoints: Vec::new(),
            prefix: "/flux".into(),
            advertise_addr: String::new(),
            lease_ttl_ms: 10_000,
            etcd_tls_ca_file: String::new(),
            etcd_tls_cert_file: String::new(),
            etcd_tls_key_file: String::new(),
            etcd_user: String::new(),
            etcd_password_file: String::new(),
            slots: crate::cluster::slots::SLOTS_DEFAULT,
            peer_token_file: String::new(),
            migration_dirty_keys_max: 1_000_000,
            auto_rebalance: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            cores: 0,
            cpus: Vec::new(),
            shards: DEFAULT_SHARDS,
            core_port_base: 0,
            data_dir: DEFAULT_DATA_DIR.into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            limits: Limits::default(),
            control_cpu: -1,
            control_nice: DEFAULT_CONTROL_NICE,
            protected_mode: true,
            runtime: Runtime::default(),
            cluster: Cluster::default(),
            persistence: Persistence::default(),
            cdc: Cdc::default(),
            auth: Auth::default(),
            tls: Tls::default(),
            metrics: Metrics::default(),
            resp: Resp::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame_bytes_max: DEFAULT_FRAME_BYTES_MAX,
            key_bytes_max: DEFAULT_KEY_BYTES_MAX,
            value_bytes_max: DEFAULT_VALUE_BYTES_MAX,
            memory_bytes_max: 0,
            eviction: Eviction::None,
            connections_per_core_max: DEFAULT_CONNECTIONS_PER_CORE_MAX,
            requests_in_flight_max: DEFAULT_REQUESTS_IN_FLIGHT_MAX,
            write_buffer_bytes_max: DEFAULT_WRITE_BUFFER_BYTES_MAX,
            mesh_messages_max: DEFAULT_MESH_MESSAGES_MAX,
            batch_keys_max: DEFAULT_BATCH_KEYS_MAX,
            idle_timeout_ms: 0,
            frame_read_timeout_ms: DEFAULT_FRAME_READ_TIMEOUT_MS,
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            ring_entries: DEFAULT_RING_ENTRIES,
            io_memory_bytes: DEFAULT_IO_MEMORY_BYTES,
            preempt_timer_us: DEFAULT_PREEMPT_TIMER_US,
        }
    }
}

/// What the command line asked for besides config values.
#[derive(Debug)]
pub struct Invocation {
    pub config: Config,
    pub print_config: bool,
    /// Cut damaged logs at the first bad record instead of refusing to start.
    pub repair: bool,
    /// Check the backup in this directory and exit.
    pub verify_data: Option<std::path::PathBuf>,
    /// Seed the (empty) data directory from the backup in this directory, then start.
    pub restore_from: Option<std::path::PathBuf>,
}

impl Config {
    /// Builds the config from all layers for `args` (including the program name).
    pub fn load(args: impl IntoIterator<Item = String>) -> Result<Invocation, ConfigError> {
        Self::load_with_env(args, |name| std::env::var(name).ok())
    }

    /// As [`Config::load`], with the environment passed in (tests use a map).
    pub fn load_with_env(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Invocation, ConfigError> {
        let defaults = default_table();
        let keys = leaf_keys(&defaults);
        let matches = command(&keys).try_get_matches_from(args).map_err(ConfigError::Usage)?;

        let mut table = defaults.clone();
        if let Some(path) = matches.get_one::<String>("config") {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Invalid(format!("cannot read config file {path}: {e}")))?;
            let file: Table =
                toml::from_str(&text).map_err(|e| ConfigError::Invalid(format!("config file {path}: {e}")))?;
            merge(&mut table, file);
        }
        for (key, default) in &keys {
            let var = env_name(key);
            if let Some(raw) = env(&var) {
                set(
                    &mut table,
                    key,
                    parse_like(default, &raw).map_err(|e| invalid(&var, e))?,
                );
            }
        }
        for (key, default) in &keys {
            if let Some(raw) = matches.get_one::<String>(key) {
                let flag = format!("--{}", flag_name(key));
                set(
                    &mut table,
                    key,
                    parse_like(default, raw).map_err(|e| invalid(&flag, e))?,
                );
            }
        }
        let config: Config = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(Invocation {
            config,
            print_config: matches.get_flag("print-config"),
            repair: matches.get_flag("repair"),
            verify_data: matches.get_one::<String>("verify-data").map(Into::into),
            restore_from: matches.get_one::<String>("restore-from").map(Into::into),
        })
    }

    /// Checks what serde cannot: relations between values and their ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if !self.resp.listen.is_empty() && self.resp.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!("resp.listen: {:?} is not an IP:port address", self.resp.listen));
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!(
                "metrics.listen: {:?} is not an IP:port address",
                self.metrics.listen
            ));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!("listen: {:?} is not an IP:port address", self.listen));
        }
        crate::logging::filter(&self.log_level).map_err(ConfigError::Invalid)?;
        if self.shards == 0 || !self.shards.is_power_of_two() {
            return fail(format!("shards: {} is not a power of two", self.shards));
        }
        if self.cores > self.shards {
            return fail(format!("cores: {} is more than shards ({})", self.cores, self.shards));
        }
        if !self.cpus.is_empty() && self.cores != 0 && self.cpus.len() != self.cores as usize {
            return fail(format!("cpus: {} ids given for {} cores", self.cpus.len(), self.cores));
        }
        let l = &self.limits;
        if l.frame_bytes_max < 64 || l.frame_bytes_max > u32::MAX as usize {
            return fail(format!(
                "limits.frame_bytes_max: {} is outside 64..=4294967295",
                l.frame_bytes_max
            ));
        }
        for (name, v) in [
            ("limits.key_bytes_max", l.key_bytes_max),
            ("limits.value_bytes_max", l.value_bytes_max),
            ("limits.connections_per_core_max", l.connections_per_core_max),
            ("limits.requests_in_flight_max", l.requests_in_flight_max),
            ("limits.write_buffer_bytes_max", l.write_buffer_bytes_max),
            ("limits.mesh_messages_max", l.mesh_messages_max),
            ("limits.batch_keys_max", l.batch_keys_max),
        ] {
            if v == 0 {
                return fail(format!("{name} must be at least 1"));
            }
        }
        if l.eviction != Eviction::None && l.memory_bytes_max == 0 {
            return fail(
                "limits.eviction = lru needs limits.memory_bytes_max (0 = unlimited: nothing would ever be evicted)"
                    .into(),
            );
        }
        if self.persistence.log_retry_interval_ms == 0 {
            return fail("persistence.log_retry_interval_ms must be at least 1".into());
        }
        if self.persistence.snapshot_log_bytes_min < 64 << 10 {
            return fail(format!(
                "persistence.snapshot_log_bytes_min: {} is below 65536 (snapshots would never stop)",
                self.persistence.snapshot_log_bytes_min
            ));
        }
        let slots = self.cluster.slots;
        if !slots.is_power_of_two() || slots < self.shards || slots > crate::cluster::slots::SLOTS_MAX {
            return fail(format!(
                "cluster.slots: {slots} must be a power of two between shards ({}) and {}",
                self.shards,
                crate::cluster::slots::SLOTS_MAX
            ));
        }
        if self.cluster.migration_dirty_keys_max == 0 {
            return fail("cluster.migration_dirty_keys_max must be at least 1".into());
        }
        if self.cluster.lease_ttl_ms < 1_000 {
            return fail(format!(
                "cluster.lease_ttl_ms: {} is below 1000 (etcd leases count whole seconds)",
                self.cluster.lease_ttl_ms
            ));
        }
        let c = &self.cdc;
        for (name, v) in [
            ("cdc.batch_events_max", c.batch_events_max),
            ("cdc.batch_bytes_max", c.batch_bytes_max),
            ("cdc.queue_bytes_max", c.queue_bytes_max),
            ("cdc.confirms_pending_max", c.confirms_pending_max),
            ("cdc.batch_delay_ms", c.batch_delay_ms as usize),
            ("cdc.log_sync_interval_ms", c.log_sync_interval_ms as usize),
        ] {
            if v == 0 {
                return fail(format!("{name} must be at least 1"));
            }
        }
        if !(0..=19).contains(&self.control_nice) {
            return fail(format!("control_nice: {} is outside 0..=19", self.control_nice));
        }
        if c.retention_bytes_max < 1 << 20 {
            return fail(format!(
                "cdc.retention_bytes_max: {} is below 1048576 (one log read)",
                c.retention_bytes_max
            ));
        }
        if c.enabled && c.amqp_url_file.is_empty() {
            check_amqp_url(&c.amqp_url).map_err(ConfigError::Invalid)?;
        }
        if self.auth.failures_max == 0 {
            return fail("auth.failures_max must be at least 1".into());
        }
        for (what, cert, key) in [
            ("tls", &self.tls.cert_file, &self.tls.key_file),
            ("cdc.tls", &c.tls_cert_file, &c.tls_key_file),
            (
                "cluster.etcd_tls",
                &self.cluster.etcd_tls_cert_file,
                &self.cluster.etcd_tls_key_file,
            ),
        ] {
            if cert.is_empty() != key.is_empty() {
                return fail(format!(
                    "{what}: a certificate file needs its key file, and the other way round"
                ));
            }
        }
        if !self.tls.client_ca_file.is_empty() && !self.tls.enabled() {
            return fail("tls.client_ca_file needs tls.cert_file (client certificates are part of TLS)".into());
        }
        if !(50..=1_000_000).contains(&self.runtime.preempt_timer_us) {
            return fail(format!(
                "runtime.preempt_timer_us: {} is outside 50..=1000000",
                self.runtime.preempt_timer_us
            ));
        }
        if !self.runtime.ring_entries.is_power_of_two() || self.runtime.ring_entries < 8 {
            return fail(format!(
                "runtime.ring_entries: {} is not a power of two >= 8",
                self.runtime.ring_entries
            ));
        }
        Ok(())
    }

    /// The effective config as TOML (what `--print-config` shows), secrets masked: the
    /// output ends up in terminals, tickets and logs.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.cdc.amqp_url = mask_password(&shown.cdc.amqp_url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl Cdc {
    /// The broker's TLS settings (used with an `amqps://` URL).
    pub fn tls_files(&self) -> crate::tls::ClientFiles {
        crate::tls::ClientFiles::new(&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file)
    }

    /// The broker URL: from `amqp_url_file` when set (read now, so a rotated secret is
    /// picked up at the next connection), else `amqp_url`.
    pub fn url(&self) -> Result<String, String> {
        let url = if self.amqp_url_file.is_empty() {
            self.amqp_url.clone()
        } else {
            read_secret("cdc.amqp_url_file", &self.amqp_url_file)?
        };
        check_amqp_url(&url)?;
        Ok(url)
    }
}

fn check_amqp_url(url: &str) -> Result<(), String> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        Ok(())
    } else {
        Err(format!(
            "cdc.amqp_url: {:?} is not an amqp:// or amqps:// URL",
            mask_password(url)
        ))
    }
}

/// The user of `scheme://user[:secret]@host/..`, if the URL names one.
pub fn url_user(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next().unwrap_or(rest);
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split(':').next().unwrap_or(userinfo).to_string())
}

/// `scheme://user:secret@host/..` -> `scheme://user:****@host/..`; anything else unchanged.
pub fn mask_password(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_string();
    };
    match url[start..at].find(':') {
        Some(colon) => format!("{}****{}", &url[..start + colon + 1], &url[at..]),
        None => url.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help`, `--version` or a malformed command line; clap renders it.
    #[error("{0}")]
    Usage(clap::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn invalid(source: &str, e: String) -> ConfigError {
    ConfigError::Invalid(format!("{source}: {e}"))
}

/// `limits.frame_bytes_max` -> `limits-frame-bytes-max`.
pub fn flag_name(key: &str) -> String {
    key.replace(['.', '_'], "-")
}

/// `limits.frame_bytes_max` -> `FLUX_LIMITS_FRAME_BYTES_MAX`.
pub fn env_name(key: &str) -> String {
    format!("FLUX_{}", key.replace('.', "_").to_uppercase())
}

fn default_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(t)) => t,
        other => unreachable!("Config serializes to a table, got {other:?}"),
    }
}

/// Every leaf of the default config as (`section.key`, default value).
fn leaf_keys(table: &Table) -> Vec<(String, Value)> {
    fn walk(prefix: &str, table: &Table, out: &mut Vec<(String, Value)>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(t) => walk(&key, t, out),
                leaf => out.push((key, leaf.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out.sort_by_key(|(k, _)| KEY_DOCS.iter().position(|(d, _)| d == k).unwrap_or(usize::MAX));
    out
}

fn command(keys: &[(String, Value)]) -> Command {
    let mut cmd = Command::new("flux-server")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Flux-KV: thread-per-core key-value server")
        .after_help("Every flag is also a FLUX_* variable and a TOML key: --limits-frame-bytes-max = FLUX_LIMITS_FRAME_BYTES_MAX = limits.frame_bytes_max")
        .arg(Arg::new("config").long("config").value_name("FILE").help("TOML config file"))
        .arg(
            Arg::new("repair")
                .long("repair")
                .action(ArgAction::SetTrue)
                .help("cut a damaged write-ahead log at its first bad record instead of refusing to start"),
        )
        .arg(
            Arg::new("verify-data")
                .long("verify-data")
                .value_name("DIR")
                .conflicts_with("restore-from")
                .help("check the backup in DIR (checksums, records, seq continuity), name the first problem, and exit"),
        )
        .arg(
            Arg::new("restore-from")
                .long("restore-from")
                .value_name("DIR")
                .help("seed the empty data_dir from the backup in DIR (checked first), then start; any core count works"),
        )
        .arg(
            Arg::new("print-config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("print the effective config as TOML and exit"),
        );
    for (key, default) in keys {
        let doc = KEY_DOCS.iter().find(|(k, _)| k == key).map(|(_, d)| *d).unwrap_or("");
        cmd = cmd.arg(
            Arg::new(key.clone())
                .long(flag_name(key))
                .value_name(value_name(default))
                .help(format!("{doc} [default: {}] [env: {}]", render(default), env_name(key))),
        );
    }
    cmd
}

fn value_name(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) => "N",
        Value::Boolean(_) => "true|false",
        Value::Array(_) => "LIST",
        _ => "VALUE",
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => a.iter().map(render).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Parses a flag or variable into the TOML type of the key's default.
fn parse_like(default: &Value, raw: &str) -> Result<Value, String> {
    let int = |s: &str| -> Result<i64, String> {
        s.trim()
            .replace('_', "")
            .parse::<i64>()
            .map_err(|_| format!("{s:?} is not a whole number"))
    };
    Ok(match default {
        Value::Integer(_) => Value::Integer(int(raw)?),
        Value::Boolean(_) => match raw.trim() {
            "true" | "1" | "yes" | "on" => Value::Boolean(true),
            "false" | "0" | "no" | "off" => Value::Boolean(false),
            other => return Err(format!("{other:?} is not true or false")),
        },
        Value::Array(_) => {
            let items: Vec<&str> = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            // Lists of numbers (cpus) stay numbers; anything else is a list of strings.
            match items.iter().map(|s| int(s)).collect::<Result<Vec<_>, _>>() {
                Ok(nums) => Value::Array(nums.into_iter().map(Value::Integer).collect()),
                Err(_) => Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect()),
            }
        }
        Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| format!("{raw:?} is not a number"))?),
        _ => Value::String(raw.to_string()),
    })
}

fn set(table: &mut Table, key: &str, value: Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut t = table;
    for p in parts {
        let entry = t.entry(p).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(inner) = entry else {
            unreachable!("made a table above")
        };
        t = inner;
    }
    t.insert(last.to_string(), value);
}

/// Deep-merges `over` into `base`; unknown keys are kept so deserialization names them.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = std::iter::once("flux-server".to_string()).chain(args.iter().map(|s| s.to_string()));
        Config::load_with_env(args, |k| env.get(k).cloned()).map(|i| i.config)
    }

    // Goal: every config key has a help line, and no help line names a key that does not exist.
    #[test]
    fn every_key_is_documented() {
        let keys: Vec<String> = leaf_keys(&default_table()).into_iter().map(|(k, _)| k).collect();
        let docs: Vec<String> = KEY_DOCS.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, docs);
    }

    // Goal: defaults < file < environment < flags, with the documented names.
    #[test]
    fn layers_override_in_order() {
        let dir = std::env::temp_dir().join(format!("flux-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("flux.toml");
        std::fs::write(
            &file,
            "shards = 64\ncores = 1\n[limits]\nkey_bytes_max = 10\nvalue_bytes_max = 20\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();

        let c = load(&["--config", f], &[]).unwrap();
        assert_eq!(
            (c.shards, c.cores, c.limits.key_bytes_max, c.limits.value_bytes_max),
            (64, 1, 10, 20)
        );
        assert_eq!(c.limits.frame_bytes_max, DEFAULT_FRAME_BYTES_MAX);

        let env = [("FLUX_LIMITS_KEY_BYTES_MAX", "11"), ("FLUX_SHARDS", "128")];
        let c = load(&["--config", f, "--limits-key-bytes-max", "12", "--cpus", "1"], &env).unwrap();
        assert_eq!((c.shards, c.limits.key_bytes_max, c.cpus.clone()), (128, 12, vec![1]));
    }

    // Goal: bad values are refused with the name of the setting at fault.
    #[test]
    fn bad_values_name_the_setting() {
        let e = load(&["--shards", "100"], &[]).unwrap_err().to_string();
        assert!(e.contains("shards"), "{e}");
        let e = load(&[], &[("FLUX_LIMITS_FRAME_BYTES_MAX", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLUX_LIMITS_FRAME_BYTES_MAX"), "{e}");
        let e = load(&["--listen", "nowhere"], &[]).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        for bad in ["verbose", "info,warning", "flux_kv=loud"] {
            let e = load(&["--log-level", bad], &[]).unwrap_err().to_string();
            assert!(e.contains("log_level"), "{bad}: {e}");
        }
        assert!(load(&["--log-level", "warn,flux_kv::cdc=debug"], &[]).is_ok());
        let e = load(&["--log-format", "xml"], &[]).unwrap_err().to_string();
        assert!(e.contains("xml"), "{e}");
        assert!(load(&["--no-such-flag", "1"], &[]).is_err());
    }

    // Goal: --print-config never shows the broker password, and masking leaves the rest.
    #[test]
    fn printed_config_masks_secrets() {
        let c = load(&["--cdc-amqp-url", "amqps://flux:s3cret@mq.example:5671/%2f"], &[]).unwrap();
        let text = c.to_toml();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("amqps://flux:****@mq.example:5671/%2f"), "{text}");
        assert_eq!(mask_password("amqp://host:5672/v"), "amqp://host:5672/v");
        assert_eq!(mask_password("amqp://u@host/v"), "amqp://u@host/v");
    }

    // Goal: the printed config reads back as the same config, except that the broker
    // password is masked (it is the one secret a config value holds).
    #[test]
    fn printed_config_round_trips() {
        let c = load(&["--cores", "2", "--cpus", "0,1", "--cluster-node-id", "n1"], &[]).unwrap();
        let mut back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.cdc.amqp_url, mask_password(&c.cdc.amqp_url));
        assert_ne!(
            back.cdc.amqp_url, c.cdc.amqp_url,
            "the default URL's password is masked"
        );
        back.cdc.amqp_url = c.cdc.amqp_url.clone();
        assert_eq!(back, c);
    }
}
