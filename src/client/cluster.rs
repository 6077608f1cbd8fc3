//! A client for a cluster of nodes found through etcd.
//!
//! Membership: read `<prefix>/nodes/`, then watch from the next revision, so no change
//! between the read and the watch is missed; puts add or update a node, deletes (which
//! carry only the key) remove it. Routing: rendezvous hashing over node_ids
//! ([`crate::cluster::rendezvous`]) picks the node, then the node's shard-aware client picks
//! the core.
//!
//! What happens to keys when membership changes: nothing moves. A key is read from and
//! written to the node that rendezvous hashing picks for the current membership; when a
//! node joins, the keys it now wins are read from it (where they do not exist yet), and when
//! a node leaves, the keys it held are gone from the cluster's view until it comes back.
//! Moving data between nodes is not done by this client.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{Client, ClientConfig, Error, SetOptions};
use crate::cluster::{rendezvous, NodeInfo};

struct Member {
    info: NodeInfo,
    /// Connected lazily; dropped when the node leaves or its connection fails.
    client: Option<Arc<Client>>,
}

struct Shared {
    members: RwLock<HashMap<String, Member>>,
    config: ClientConfig,
}

/// A cluster-aware client: every key goes to the node rendezvous hashing picks.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    _watch: Arc<WatchTask>,
}

const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Stops following membership when the last `Cluster` clone goes.
struct WatchTask(tokio::task::JoinHandle<()>);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the members are read from.
struct Source {
    endpoints: Vec<String>,
    access: crate::cluster::EtcdAccess,
    dir: String,
    timeout: Duration,
    request_timeout: Duration,
}

impl Source {
    /// Connects and reads every member; returns the revision the read saw.
    async fn list(&self) -> Result<(etcd_client::Client, HashMap<String, NodeInfo>, i64), Error> {
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
        let members = listing
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NodeInfo>(kv.value()).ok())
            .map(|info| (info.node_id.clone(), info))
            .collect();
        Ok((client, members, revision))
    }

    /// Applies changes from the revision after `revision` until the watch ends.
    async fn follow(&self, shared: &Shared, mut client: etcd_client::Client, revision: i64) {
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let Ok(mut stream) = client.watch(self.dir.clone(), Some(options)).await else {
            return;
        };
        while let Ok(Some(resp)) = stream.message().await {
            let mut members = shared.members.write().unwrap_or_else(|p| p.into_inner());
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let node_id = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(&self.dir)
                    .to_string();
                match event.event_type() {
                    EventType::Put => {
                        if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                            members.insert(node_id, Member { info, client: None });
                        }
                    }
                    // A delete carries the key only.
                    EventType::Delete => {
                        members.remove(&node_id);
                    }
                }
            }
        }
    }
}

impl Shared {
    /// Replaces the members, keeping the connection of a node whose address is unchanged.
    fn replace(&self, fresh: HashMap<String, NodeInfo>) {
        let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(fresh.len());
        for (id, info) in fresh {
            let client = members
                .remove(&id)
                .filter(|m| m.info.addr == info.addr)
                .and_then(|m| m.client);
            next.insert(id, Member { info, client });
        }
        *members = next;
    }
}

impl Cluster {
    /// Reads the members from etcd (`endpoints`, `prefix` as the nodes use) and keeps
    /// watching them.
    pub async fn connect(endpoints: &[String], prefix: &str, config: ClientConfig) -> Result<Cluster, Error> {
        let source = Source {
            endpoints: endpoints.to_vec(),
            access: crate::cluster::EtcdAccess {
                tls: config.etcd_tls.clone(),
                user: None,
            },
            dir: format!("{}/nodes/", prefix.trim_end_matches('/')),
            timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
        };
        let (client, members, revision) = source.list().await?;
        let shared = Arc::new(Shared {
            members: RwLock::new(HashMap::new()),
            config,
        });
        shared.replace(members);
        let watched = shared.clone();
        let task = tokio::spawn(async move {
            let mut current = Some((client, revision));
            let mut retry = WATCH_RETRY_MIN;
            loop {
                if let Some((client, revision)) = current.take() {
                    source.follow(&watched, client, revision).await;
                    tracing::warn!("cluster: the etcd watch ended; reading the members again");
                }
                tokio::time::sleep(retry).await;
                match source.list().await {
                    Ok((client, members, revision)) => {
                        // A full read: whatever changed while the watch was down is caught up.
                        watched.replace(members);
                        current = Some((client, revision));
                        retry = WATCH_RETRY_MIN;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: etcd unreachable; membership not updated");
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

    /// The node_id that owns `key` under the current membership.
    pub fn node_for(&self, key: &[u8]) -> Option<String> {
        let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner());
        rendezvous(members.keys().map(String::as_str), key).map(str::to_string)
    }

    /// The client of the node that owns `key`, connected on first use. A node that is gone
    /// fails fast (its connection is refused) until membership changes.
    pub async fn client_for(&self, key: &[u8]) -> Result<(String, Arc<Client>), Error> {
        let node_id = self
            .node_for(key)
            .ok_or_else(|| Error::Cluster("no nodes are registered".into()))?;
        self.client_of(&node_id).await.map(|c| (node_id, c))
    }

    /// The client of one member, connected on first use.
    pub async fn client_of(&self, node_id: &str) -> Result<Arc<Client>, Error> {
        let (node_id, addr, existing) = {
            let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner());
            let m = members
                .get(node_id)
                .ok_or_else(|| Error::Cluster(format!("{node_id} is not a member")))?;
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
    /// reconnects (or goes elsewhere once membership changed), and name the node in the
    /// error. Server errors pass through unchanged.
    fn failed(&self, node_id: &str, err: Error) -> Error {
        if matches!(err, Error::Server { .. }) {
            return err;
        }
        let mut members = self.shared.members.write().unwrap_or_else(|p| p.into_inner());
        let addr = members.get(node_id).map(|m| m.info.addr.clone()).unwrap_or_default();
        if let Some(m) = members.get_mut(node_id) {
            m.client = None;
        }
        Error::Cluster(format!("node {node_id} ({addr}) is unreachable: {err}"))
    }

    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        let key = key.into();
        let (node, c) = self.client_for(&key).await?;
        c.get(key).await.map_err(|e| self.failed(&node, e))
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
        let key = key.into();
        let (node, c) = self.client_for(&key).await?;
        c.set_with(key, value, opts).await.map_err(|e| self.failed(&node, e))
    }

    pub async fn del(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key = key.into();
        let (node, c) = self.client_for(&key).await?;
        c.del(key).await.map_err(|e| self.failed(&node, e))
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
