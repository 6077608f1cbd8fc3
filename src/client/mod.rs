//! Async Rust client for Flux-KV (tokio).
//!
//! - One connection carries many requests at once (pipelined, matched by id), and each
//!   endpoint has a small pool of connections.
//! - Shard-aware: after `Hello` the client knows the node's `shards` and `cores`; when the
//!   node offers per-core ports it sends every key straight to the core that owns it, so no
//!   request takes a cross-core hop inside the server. Otherwise it uses the shared port.
//! - MGET and MSET are split per owning core and reassembled in order.
//! - A missing key is `None`, never an empty value; server errors keep their code and text.
//! - [`Cluster`] finds the nodes through etcd and routes each key to its node by
//!   the slot table (see `cluster.rs` for the rule and how moving slots are followed).
//!
//! A complete program is in `examples/quickstart.rs` (`cargo run --example quickstart`).
//!
//! ```no_run
//! use std::time::Duration;
//! use flux_kv::client::{Client, ClientConfig, SetOptions};
//!
//! # async fn demo() -> Result<(), flux_kv::client::Error> {
//! let client = Client::connect("127.0.0.1:7379", ClientConfig::default()).await?;
//! client.set("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! assert_eq!(client.get("missing").await?, None);
//! client.set_with("session", "x", SetOptions::ttl(Duration::from_secs(30))).await?;
//! let values = client.mget(["greeting", "missing"]).await?;
//! assert_eq!(values[1], None);
//! # Ok(()) }
//! ```

mod cluster;
mod connection;
mod transport;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

pub use self::cluster::Cluster;
pub use self::connection::Connection;
pub use self::transport::{open, Security, Stream};
pub use crate::auth::Credentials;
use crate::keyspace::{Keyspace, KEY_HASH_NAME};
use crate::proto::{self, request::Op, response::Result as R, CoreStats, ErrorCode, HelloResponse, Response};
pub use crate::tls::ClientFiles;

/// Client settings. Every wait has a bound.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Connections per endpoint (the shared port, or each core port).
    pub connections_per_endpoint: usize,
    /// Use per-core ports when the node offers them.
    pub shard_aware: bool,
    /// TLS and credentials for every connection to a node.
    pub security: Security,
    /// TLS to etcd (the cluster client's membership), which has its own CA and certificate.
    pub etcd_tls: ClientFiles,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            connections_per_endpoint: 2,
            shard_aware: true,
            security: Security::default(),
            etcd_tls: ClientFiles::default(),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// TLS could not be set up (certificate files, handshake, the server's certificate).
    #[error("tls: {0}")]
    Tls(String),
    /// The server refused the request; `code` is the protocol's error code.
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The server answered something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Membership could not be read from etcd, or no node is registered.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The node does not own the key's slot: `node_id` at `addr` does (MOVED).
    #[error("slot {slot} moved to {node_id} at {addr}")]
    Moved { slot: u32, node_id: String, addr: String },
}

impl Error {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Moved { .. } => Some(ErrorCode::Moved),
            _ => None,
        }
    }
}

/// SET options: expiry and condition.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetOptions {
    /// Time to live; `None` = no expiry.
    pub ttl: Option<Duration>,
    pub condition: Condition,
}

impl SetOptions {
    pub fn ttl(ttl: Duration) -> Self {
        SetOptions {
            ttl: Some(ttl),
            ..Default::default()
        }
    }
}

/// When a SET applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Condition {
    #[default]
    Always,
    IfAbsent,
    IfPresent,
}

/// The remaining life of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    Missing,
    Persistent,
    Expires(Duration),
}

/// A pool of connections to one address, created lazily and replaced when they die.
struct Endpoint {
    addr: SocketAddr,
    slots: Vec<Mutex<Option<Arc<Connection>>>>,
    next: AtomicUsize,
}

impl Endpoint {
    fn new(addr: SocketAddr, size: usize) -> Self {
        Endpoint {
            addr,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    async fn connection(&self, config: &ClientConfig) -> Result<Arc<Connection>, Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some(c) = self.slots[i].lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let fresh = Arc::new(Connection::connect(self.addr, &config.security, config.connect_timeout).await?);
        *self.slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }
}

/// A client for one Flux-KV node.
pub struct Client {
    config: ClientConfig,
    hello: HelloResponse,
    keyspace: Keyspace,
    shared: Endpoint,
    /// One endpoint per core when the node has core ports and `shard_aware` is on.
    cores: Vec<Endpoint>,
}

impl Client {
    /// Connects to `addr` (host:port), says Hello and prepares routing.
    /// With TLS, the node's certificate must name the host part of `addr` (unless
    /// `config.security.server_name` says otherwise).
    pub async fn connect(addr: &str, mut config: ClientConfig) -> Result<Client, Error> {
        if config.security.tls.is_some() && config.security.server_name.is_none() {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            config.security.server_name = Some(host.trim_matches(['[', ']']).to_string());
        }
        let resolved = addr
            .to_socket_addrs()
            .map_err(|_| Error::Resolve(addr.to_string()))?
            .next()
            .ok_or_else(|| Error::Resolve(addr.to_string()))?;
        Self::connect_addr(resolved, config).await
    }

    pub async fn connect_addr(addr: SocketAddr, config: ClientConfig) -> Result<Client, Error> {
        let shared = Endpoint::new(addr, config.connections_per_endpoint);
        let conn = shared.connection(&config).await?;
        let hello = match ok(conn
            .call(Op::Hello(proto::HelloRequest {}), config.request_timeout)
            .await?)?
        {
            R::Hello(h) => h,
            other => return Err(unexpected("Hello", &other)),
        };
        if hello.key_hash != KEY_HASH_NAME {
            return Err(Error::Protocol(format!("unknown key hash {:?}", hello.key_hash)));
        }
        let keyspace = Keyspace::new(hello.shards, hello.cores).map_err(Error::Protocol)?;
        let cores = if config.shard_aware && hello.core_ports.len() == hello.cores as usize {
            hello
                .core_ports
                .iter()
                .map(|p| Endpoint::new(SocketAddr::new(addr.ip(), *p as u16), config.connections_per_endpoint))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Client {
            config,
            hello,
            keyspace,
            shared,
            cores,
        })
    }

    /// What the node said about itself.
    pub fn hello(&self) -> &HelloResponse {
        &self.hello
    }

    /// True when keys go straight to their owner core's port.
    pub fn is_shard_aware(&self) -> bool {
        !self.cores.is_empty()
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// Sends any request to the endpoint for `core` (or the shared port) and returns the
    /// response, with server errors turned into `Error::Server`.
    pub async fn call_on(&self, core: Option<u32>, op: Op) -> Result<R, Error> {
        let endpoint = match core {
            Some(c) if !self.cores.is_empty() => &self.cores[c as usize],
            _ => &self.shared,
        };
        let conn = endpoint.connection(&self.config).await?;
        ok(conn.call(op, self.config.request_timeout).await?)
    }

    async fn call_key(&self, key: &[u8], op: Op) -> Result<R, Error> {
        self.call_on(Some(self.keyspace.core_of(key)), op).await
    }

    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        let key = key.into();
        match self.call_key(&key.clone(), Op::Get(proto::GetRequest { key })).await? {
            R::Get(g) => Ok(g.found.then_some(g.value)),
            other => Err(unexpected("Get", &other)),
        }
    }

    /// SET with no expiry, always applied.
    pub async fn set(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<(), Error> {
        self.set_with(key, value, SetOptions::default()).await.map(drop)
    }

    /// SET with options; returns false when the condition did not hold.
    pub async fn set_with(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        opts: SetOptions,
    ) -> Result<bool, Error> {
        let key = key.into();
        let condition = match opts.condition {
            Condition::Always => proto::SetCondition::Always,
            Condition::IfAbsent => proto::SetCondition::IfAbsent,
            Condition::IfPresent => proto::SetCondition::IfPresent,
        } as i32;
        let ttl_ms = opts.ttl.map_or(0, |t| (t.as_millis() as u64).max(1));
        let op = Op::Set(proto::SetRequest {
            key: key.clone(),
            value: value.into(),
            ttl_ms,
            condition,
            ..Default::default()
        });
        match self.call_key(&key, op).await? {
            R::Set(s) => Ok(s.applied),
            other => Err(unexpected("Set", &other)),
        }
    }

    /// Removes a key; true when it existed.
    pub async fn del(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key = key.into();
        match self.call_key(&key.clone(), Op::Del(proto::DelRequest { key })).await? {
            R::Del(d) => Ok(d.existed),
            other => Err(unexpected("Del", &other)),
        }
    }

    pub async fn exists(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key = key.into();
        match self
            .call_key(&key.clone(), Op::Exists(proto::ExistsRequest { key }))
            .await?
        {
            R::Exists(e) => Ok(e.exists),
            other => Err(unexpected("Exists", &other)),
        }
    }

    /// Sets the expiry of an existing key (`None` removes it); false when there is no key.
    pub async fn expire(&self, key: impl Into<Bytes>, ttl: Option<Duration>) -> Result<bool, Error> {
        let key = key.into();
        let ttl_ms = ttl.map_or(0, |t| (t.as_millis() as u64).max(1));
        match self
            .call_key(&key.clone(), Op::Expire(proto::ExpireRequest { key, ttl_ms }))
            .await?
        {
            R::Expire(e) => Ok(e.applied),
            other => Err(unexpected("Expire", &other)),
        }
    }

    pub async fn ttl(&self, key: impl Into<Bytes>) -> Result<Ttl, Error> {
        let key = key.into();
        match self.call_key(&key.clone(), Op::Ttl(proto::TtlRequest { key })).await? {
            R::Ttl(t) => Ok(match t.ttl_ms {
                -2 => Ttl::Missing,
                -1 => Ttl::Persistent,
                ms => Ttl::Expires(Duration::from_millis(ms.max(0) as u64)),
            }),
            other => Err(unexpected("Ttl", &other)),
        }
    }

    /// Reads many keys; one request per owning core, answers in the order of `keys`.
    pub async fn mget<K: Into<Bytes>>(&self, keys: impl IntoIterator<Item = K>) -> Result<Vec<Option<Bytes>>, Error> {
        let keys: Vec<Bytes> = keys.into_iter().map(Into::into).collect();
        let groups = self.group_by_core(keys.iter().cloned());
        let calls = groups.into_iter().map(|(core, positions, keys)| async move {
            match self.call_on(core, Op::Mget(proto::MGetRequest { keys })).await? {
                R::Mget(m) if m.values.len() == positions.len() => Ok((positions, m.values)),
                other => Err(unexpected("MGet", &other)),
            }
        });
        let mut out = vec![None; keys.len()];
        for result in futures::future::join_all(calls).await {
            let (positions, values) = result?;
            for (pos, v) in positions.into_iter().zip(values) {
                out[pos] = v.found.then_some(v.value);
            }
        }
        Ok(out)
    }

    /// Writes many keys; one request per owning core (not atomic across cores).
    pub async fn mset<K: Into<Bytes>, V: Into<Bytes>>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), Error> {
        let entries: Vec<proto::KeyValue> = entries
            .into_iter()
            .map(|(k, v)| proto::KeyValue {
                key: k.into(),
                value: v.into(),
            })
            .collect();
        let mut per_core: Vec<(Option<u32>, Vec<proto::KeyValue>)> = Vec::new();
        for e in entries {
            let core = self.route_core(&e.key);
            match per_core.iter_mut().find(|(c, _)| *c == core) {
                Some((_, list)) => list.push(e),
                None => per_core.push((core, vec![e])),
            }
        }
        let calls = per_core
            .into_iter()
            .map(|(core, entries)| self.call_on(core, Op::Mset(proto::MSetRequest { entries })));
        for r in futures::future::join_all(calls).await {
            match r? {
                R::Mset(_) => {}
                other => return Err(unexpected("MSet", &other)),
            }
        }
        Ok(())
    }

    pub async fn ping(&self, payload: impl Into<Bytes>) -> Result<Bytes, Error> {
        match self
            .call_on(
                None,
                Op::Ping(proto::PingRequest {
                    payload: payload.into(),
                }),
            )
            .await?
        {
            R::Ping(p) => Ok(p.payload),
            other => Err(unexpected("Ping", &other)),
        }
    }

    /// Per-core counters of the whole node.
    pub async fn stats(&self) -> Result<Vec<CoreStats>, Error> {
        Ok(self.stats_response().await?.cores)
    }

    /// Per-core counters and the change-capture forwarder's counters.
    pub async fn stats_response(&self) -> Result<proto::StatsResponse, Error> {
        match self.call_on(None, Op::Stats(proto::StatsRequest {})).await? {
            R::Stats(s) => Ok(s),
            other => Err(unexpected("Stats", &other)),
        }
    }

    /// Snapshots every shard of the node and deletes the log the snapshots cover; returns
    /// when every core is done.
    pub async fn snapshot(&self) -> Result<proto::SnapshotResponse, Error> {
        match self.call_on(None, Op::Snapshot(proto::SnapshotRequest {})).await? {
            R::Snapshot(s) => Ok(s),
            other => Err(unexpected("Snapshot", &other)),
        }
    }

    /// Starts a backup: every core snapshots, then stages its part on the node (see BACKUP
    /// in proto/flux.proto); returns the staged files. Pair with [`Client::backup_end`].
    pub async fn backup(&self) -> Result<proto::BackupResponse, Error> {
        match self.call_on(None, Op::Backup(proto::BackupRequest {})).await? {
            R::Backup(b) => Ok(b),
            other => Err(unexpected("Backup", &other)),
        }
    }

    /// Reads `length` bytes at `offset` of a staged backup file.
    pub async fn backup_read(&self, backup_id: &str, name: &str, offset: u64, length: u32) -> Result<Bytes, Error> {
        let op = Op::BackupRead(proto::BackupReadRequest {
            backup_id: backup_id.into(),
            name: name.into(),
            offset,
            length,
        });
        match self.call_on(None, op).await? {
            R::BackupRead(r) => Ok(r.data),
            other => Err(unexpected("BackupRead", &other)),
        }
    }

    /// The next part of a migrating slot (admin; see SLOT_EXPORT in proto/flux.proto).
    pub async fn slot_export(&self, req: proto::SlotExportRequest) -> Result<proto::SlotExportResponse, Error> {
        match self.call_on(None, Op::SlotExport(req)).await? {
            R::SlotExport(r) => Ok(r),
            other => Err(unexpected("SlotExport", &other)),
        }
    }

    /// Writes entries of a slot this node imports (admin); returns how many it applied.
    pub async fn slot_import(&self, slot: u32, entries: Vec<proto::SlotEntry>) -> Result<u64, Error> {
        match self
            .call_on(None, Op::SlotImport(proto::SlotImportRequest { slot, entries }))
            .await?
        {
            R::SlotImport(r) => Ok(r.applied),
            other => Err(unexpected("SlotImport", &other)),
        }
    }

    /// Drops up to `keys_max` keys of a slot the node does not serve (admin): one it is
    /// importing when `importing`, else one owned elsewhere.
    pub async fn slot_purge(
        &self,
        slot: u32,
        keys_max: u32,
        importing: bool,
    ) -> Result<proto::SlotPurgeResponse, Error> {
        let req = proto::SlotPurgeRequest {
            slot,
            keys_max,
            importing,
        };
        match self.call_on(None, Op::SlotPurge(req)).await? {
            R::SlotPurge(r) => Ok(r),
            other => Err(unexpected("SlotPurge", &other)),
        }
    }

    /// Removes a staged backup from the node.
    pub async fn backup_end(&self, backup_id: &str) -> Result<(), Error> {
        let op = Op::BackupEnd(proto::BackupEndRequest {
            backup_id: backup_id.into(),
        });
        match self.call_on(None, op).await? {
            R::BackupEnd(_) => Ok(()),
            other => Err(unexpected("BackupEnd", &other)),
        }
    }

    /// The core a key's requests go to directly, or `None` for the shared port.
    fn route_core(&self, key: &[u8]) -> Option<u32> {
        (!self.cores.is_empty()).then(|| self.keyspace.core_of(key))
    }

    /// Groups keys by the endpoint they go to: (core, original positions, keys).
    fn group_by_core(&self, keys: impl Iterator<Item = Bytes>) -> Vec<(Option<u32>, Vec<usize>, Vec<Bytes>)> {
        let mut groups: Vec<(Option<u32>, Vec<usize>, Vec<Bytes>)> = Vec::new();
        for (pos, key) in keys.enumerate() {
            let core = self.route_core(&key);
            match groups.iter_mut().find(|(c, _, _)| *c == core) {
                Some((_, positions, keys)) => {
                    positions.push(pos);
                    keys.push(key);
                }
                None => groups.push((core, vec![pos], vec![key])),
            }
        }
        groups
    }
}

/// The result of a response, or its error as `Error::Server`.
fn ok(resp: Response) -> Result<R, Error> {
    if let Some(e) = resp.error {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unknown);
        if code == ErrorCode::Moved {
            return Err(Error::Moved {
                slot: e.slot,
                node_id: e.node_id,
                addr: e.addr,
            });
        }
        return Err(Error::Server {
            code,
            message: e.message,
        });
    }
    resp.result
        .ok_or_else(|| Error::Protocol(format!("response {} has neither result nor error", resp.id)))
}

fn unexpected(what: &str, got: &R) -> Error {
    Error::Protocol(format!("expected a {what} reply, got {got:?}"))
}
