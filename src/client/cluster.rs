//! A client for a cluster of nodes found through etcd.
//!
//! It reads `<prefix>/` once, the members (`<prefix>/nodes/`) and the slot table
//! (`<prefix>/slots`), then watches the prefix from the next revision, so no change between
//! the read and the watch is missed. Each key goes to the owner of its slot
//! (`xxh3_64(key) & (slots - 1)`, see proto/flux.proto), then the node's shard-aware client
//! picks the core.
//!
//! While slots move, the table a client holds may be stale for a moment: a node that does
//! not own the slot answers MOVED with the owner, which the client adopts for that slot and
//! resends to; a slot whose ownership is flipping answers TRY_AGAIN, which the client
//! resends after a short pause. Callers see neither, only the result or, past
//! `request_timeout`, the last error.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{Client, ClientConfig, Error, SetOptions};
use crate::cluster::slots::{slot_of, table_key, Table};
use crate::cluster::NodeInfo;
use crate::keyspace::Keyspace;
use crate::proto::ErrorCode;

struct Member {
    info: NodeInfo,
    /// Connected lazily; dropped when the node leaves or its connection fails.
    client: Option<Arc<Client>>,
}

struct Shared {
    members: RwLock<HashMap<String, Member>>,
    /// The slot table as last read or watched, with MOVED answers applied on top.
    table: RwLock<Option<Table>>,
    config: ClientConfig,
}

/// A cluster-aware client: every key goes to the node that owns its slot.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    _watch: Arc<WatchTask>,
}

const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);
/// First pause before resending after TRY_AGAIN or CLUSTER_DOWN; doubles up to the max.
const RESEND_PAUSE_MIN: Duration = Duration::from_millis(1);
const RESEND_PAUSE_MAX: Duration = Duration::from_millis(100);

/// Stops following the cluster when the last `Cluster` clone goes.
struct WatchTask(tokio::task::JoinHandle<()>);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the members and the table are read from.
struct Source {
    endpoints: Vec<String>,
    access: crate::cluster::EtcdAccess,
    /// `<prefix>/`
    dir: String,
    timeout: Duration,
    request_timeout: Duration,
}

/// What one read of `<prefix>/` found.
struct Listing {
    members: HashMap<String, NodeInfo>,
    table: Option<Table>,
    revision: i64,
}

impl Source {
    fn nodes_dir(&self) -> String {
        format!("{}nodes/", self.dir)
    }

    fn table_key(&self) -> String {
        table_key(self.dir.trim_end_matches('/'))
    }

    /// Connects and reads every member and the table; returns the revision the read saw.
    async fn list(&self) -> Result<(etcd_client::Client, Listing), Error> {
        let etcd = |e: etcd_client::Error| Error::Cluster(e.to_string());
        let options = self
            .access
            .options(self.timeout, self.request_timeout)
            .map_err(Error::Cluster)?;
        let mut client = tokio::time::timeout(
            self.timeout,
            etcd_client::Client::connect(&self.endpoints, Some(options)),
        )
        .await
        .map_err(|_| Error::Timeout(format!("connecting to etcd at {:?}", self.endpoints)))?
        .map_err(etcd)?;
        let listing = client
            .get(self.dir.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let (nodes_dir, table_key) = (self.nodes_dir(), self.table_key());
        let mut found = Listing {
            members: HashMap::new(),
            table: None,
            revision,
        };
        for kv in listing.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if key == table_key {
                found.table = Some(Table::decode(kv.value()).map_err(Error::Cluster)?);
            } else if key.starts_with(&nodes_dir) {
                if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                    found.members.insert(info.node_id.clone(), info);
                }
            }
        }
        Ok((client, found))
    }

    /// Applies changes from the revision after `revision` until the watch ends.
    async fn follow(&self, shared: &Shared, mut client: etcd_client::Client, revision: i64) {
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let Ok(mut stream) = client.watch(self.dir.clone(), Some(options)).await else {
            return;
        };
        let (nodes_dir, table_key) = (self.nodes_dir(), self.table_key());
        while let Ok(Some(resp)) = stream.message().await {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if key == table_key {
                    if let Ok(t) = Table::decode(kv.value()) {
                        *shared.table.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
                    }
                    continue;
                }
                let Some(node_id) = key.strip_prefix(&nodes_dir) else {
                    continue;
                };
                let mut members = shared.members.write().unwrap_or_else(|p| p.into_inner());
                match event.event_type() {
                    EventType::Put => {
                        if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                            members.insert(node_id.to_string(), Member { info, client: None });
                        }
                    }
                    // A delete carries the key only.
                    EventType::Delete => {
                        members.remove(node_id);
                    }
                }
            }
        }
    }
}

impl Shared {
    /// Replaces the members and the table, keeping the connection of a node whose address
    /// is unchanged.
    fn replace(&self, fresh: Listing) {
        let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(fresh.members.len());
        for (id, info) in fresh.members {
            let client = members
                .remove(&id)
                .filter(|m| m.info.addr == info.addr)
                .and_then(|m| m.client);
            next.insert(id, Member { info, client });
        }
        *members = next;
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = fresh.table;
    }
}

impl Cluster {
    /// Reads the members and the slot table from etcd (`endpoints`, `prefix` as the nodes
    /// use) and keeps watching them.
    pub async fn connect(endpoints: &[String], prefix: &str, config: ClientConfig) -> Result<Cluster, Error> {
        let source = Source {
            endpoints: endpoints.to_vec(),
            access: crate::cluster::EtcdAccess {
                tls: config.etcd_tls.clone(),
                user: None,
            },
            dir: format!("{}/", prefix.trim_end_matches('/')),
            timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
        };
        let (client, listing) = source.list().await?;
        let revision = listing.revision;
        let shared = Arc::new(Shared {
            members: RwLock::new(HashMap::new()),
            table: RwLock::new(None),
            config,
        });
        shared.replace(listing);
        let watched = shared.clone();
        let task = tokio::spawn(async move {
            let mut current = Some((client, revision));
            let mut retry = WATCH_RETRY_MIN;
            loop {
                if let Some((client, revision)) = current.take() {
                    source.follow(&watched, client, revision).await;
                    tracing::warn!("cluster: the etcd watch ended; reading the cluster again");
                }
                tokio::time::sleep(retry).await;
                match source.list().await {
                    Ok((client, listing)) => {
                        // A full read: whatever changed while the watch was down is caught up.
                        let revision = listing.revision;
                        watched.replace(listing);
                        current = Some((client, revision));
                        retry = WATCH_RETRY_MIN;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: etcd unreachable; membership and slots not updated");
                        retry = (retry * 2).min(WATCH_RETRY_MAX);
                    }
                }
            }
        });
        Ok(Cluster {
            shared,
            _watch: Arc::new(WatchTask(task)),
        })
    }

    /// The current members, by node_id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner());
        let mut nodes: Vec<NodeInfo> = members.values().map(|m| m.info.clone()).collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    /// The slot table as this client holds it (None before any node created one).
    pub fn table(&self) -> Option<Table> {
        self.shared.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The node_id that owns `key`'s slot in the table this client holds.
    pub fn node_for(&self, key: &[u8]) -> Option<String> {
        let table = self.shared.table.read().unwrap_or_else(|p| p.into_inner());
        let t = table.as_ref()?;
        Some(t.owner(slot_of(Keyspace::hash(key), t.slots())).to_string())
    }

    /// The client of the node that owns `key`, connected on first use. A node that is gone
    /// fails fast (its connection is refused) until the table changes.
    pub async fn client_for(&self, key: &[u8]) -> Result<(String, Arc<Client>), Error> {
        let node_id = self
            .node_for(key)
            .ok_or_else(|| Error::Cluster("no slot table yet: no node has started".into()))?;
        self.client_of(&node_id).await.map(|c| (node_id, c))
    }

    /// The client of one member, connected on first use.
    pub async fn client_of(&self, node_id: &str) -> Result<Arc<Client>, Error> {
        let (node_id, addr, existing) = {
            let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner());
            let m = members
                .get(node_id)
                .ok_or_else(|| Error::Cluster(format!("{node_id} owns the slot but is not a member")))?;
            (node_id.to_string(), m.info.addr.clone(), m.client.clone())
        };
        if let Some(c) = existing {
            return Ok(c);
        }
        let client = match Client::connect(&addr, self.shared.config.clone()).await {
            Ok(c) => Arc::new(c),
            Err(e) => return Err(self.failed(&node_id, e)),
        };
        if let Some(m) = self
            .shared
            .members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&node_id)
        {
            m.client = Some(client.clone());
        }
        Ok(client)
    }

    /// After a transport error: forget the node's connection, so the next request
    /// reconnects (or goes elsewhere once the table changed), and name the node in the
    /// error. Server errors pass through unchanged.
    fn failed(&self, node_id: &str, err: Error) -> Error {
        if matches!(err, Error::Server { .. } | Error::Moved { .. }) {
            return err;
        }
        let mut members = self.shared.members.write().unwrap_or_else(|p| p.into_inner());
        let addr = members.get(node_id).map(|m| m.info.addr.clone()).unwrap_or_default();
        if let Some(m) = members.get_mut(node_id) {
            m.client = None;
        }
        Error::Cluster(format!("node {node_id} ({addr}) is unreachable: {err}"))
    }

    /// A MOVED answer: `slot` is `node_id`'s, reachable at `addr`, until the table says
    /// more.
    fn redirect(&self, slot: u32, node_id: &str, addr: &str) {
        if let Some(t) = self.shared.table.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
            if slot < t.slots() {
                t.set_owner(slot, node_id);
            }
        }
        let mut members = self.shared.members.write().unwrap_or_else(|p| p.into_inner());
        if !addr.is_empty() && members.get(node_id).is_none_or(|m| m.info.addr != addr) {
            let info = NodeInfo {
                node_id: node_id.to_string(),
                addr: addr.to_string(),
                core_ports: Vec::new(),
                cores: 0,
                shards: 0,
                version: String::new(),
                started_at_ms: 0,
            };
            members.insert(node_id.to_string(), Member { info, client: None });
        }
    }

    /// Runs `op` on the owner of `key`'s slot, following MOVED and resending after
    /// TRY_AGAIN or CLUSTER_DOWN until `request_timeout`.
    async fn routed<T, F, Fut>(&self, key: &Bytes, op: F) -> Result<T, Error>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.shared.config.request_timeout;
        let mut pause = RESEND_PAUSE_MIN;
        loop {
            let (node, c) = self.client_for(key).await?;
            let err = match op(c).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(self.failed(&node, err));
            }
            match &err {
                Error::Moved { slot, node_id, addr } if *node_id != node => {
                    self.redirect(*slot, node_id, addr);
                    continue;
                }
                // Redirected to itself (its table is behind ours) or held: wait a little.
                Error::Moved { .. } => {}
                Error::Server {
                    code: ErrorCode::TryAgain | ErrorCode::ClusterDown,
                    ..
                } => {}
                _ => return Err(self.failed(&node, err)),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESEND_PAUSE_MAX);
        }
    }

    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        let key = key.into();
        self.routed(&key, |c| {
            let key = key.clone();
            async move { c.get(key).await }
        })
        .await
    }

    pub async fn set(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<(), Error> {
        self.set_with(key, value, SetOptions::default()).await.map(drop)
    }

    pub async fn set_with(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        opts: SetOptions,
    ) -> Result<bool, Error> {
        let (key, value) = (key.into(), value.into());
        self.routed(&key, |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.set_with(key, value, opts).await }
        })
        .await
    }

    pub async fn del(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key = key.into();
        self.routed(&key, |c| {
            let key = key.clone();
            async move { c.del(key).await }
        })
        .await
    }

    /// Waits until the membership satisfies `f` (for tools and tests), at most `timeout`.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&[NodeInfo]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if f(&self.nodes()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
