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
use etcd_client::{ConnectOptions, EventType, GetOptions, WatchOptions};

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
    _watch: Arc<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// Reads the members from etcd (`endpoints`, `prefix` as the nodes use) and keeps
    /// watching them.
    pub async fn connect(endpoints: &[String], prefix: &str, config: ClientConfig) -> Result<Cluster, Error> {
        let timeout = config.connect_timeout;
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(config.request_timeout);
        let etcd = |e: etcd_client::Error| Error::Cluster(e.to_string());
        let mut etcd_client = tokio::time::timeout(timeout, etcd_client::Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| Error::Timeout(format!("connecting to etcd at {endpoints:?}")))?
            .map_err(etcd)?;
        let dir = format!("{}/nodes/", prefix.trim_end_matches('/'));
        let listing = etcd_client
            .get(dir.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let mut members = HashMap::new();
        for kv in listing.kvs() {
            if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                members.insert(info.node_id.clone(), Member { info, client: None });
            }
        }
        let shared = Arc::new(Shared {
            members: RwLock::new(members),
            config,
        });
        let mut stream = etcd_client
            .watch(
                dir.clone(),
                Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
            )
            .await
            .map_err(etcd)?;
        let watched = shared.clone();
        let watch = tokio::spawn(async move {
            // Keeps the etcd client (and so the watch) alive for the life of the task.
            let _etcd = etcd_client;
            while let Ok(Some(resp)) = stream.message().await {
                let mut members = watched.members.write().unwrap_or_else(|p| p.into_inner());
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let node_id = String::from_utf8_lossy(kv.key()).trim_start_matches(&dir).to_string();
                    match event.event_type() {
                        EventType::Put => {
                            if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                                members.insert(node_id, Member { info, client: None });
                            }
                        }
                        EventType::Delete => {
                            members.remove(&node_id);
                        }
                    }
                }
            }
            tracing::warn!("cluster: the etcd watch ended; membership is no longer updated");
        });
        Ok(Cluster {
            shared,
            _watch: Arc::new(watch),
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
