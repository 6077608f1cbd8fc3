//! Cluster membership through etcd: nodes register themselves under
//! `<prefix>/nodes/<node_id>` with a lease; clients read and watch that prefix and route
//! each key to a node by rendezvous hashing (then to the owner core inside the node).
//!
//! - `registration.rs`: the node side, on the control core.
//! - [`rendezvous`]: the routing rule, shared by every client.

pub mod registration;

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::tls::ClientFiles;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// What a node publishes about itself at `<prefix>/nodes/<node_id>` (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    /// host:port of the shared port.
    pub addr: String,
    /// One port per core where that core alone listens (empty when off).
    pub core_ports: Vec<u16>,
    pub cores: u32,
    pub shards: u32,
    pub version: String,
    pub started_at_ms: u64,
}

/// How to reach etcd: TLS (with `https://` endpoints) and an optional user, for the node's
/// registration and the cluster client alike.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    pub tls: ClientFiles,
    /// (user, password) when etcd has authentication on.
    pub user: Option<(String, String)>,
}

impl EtcdAccess {
    /// From the node's `cluster.*` settings; reads the password file now.
    pub fn from_config(c: &crate::config::Cluster) -> Result<EtcdAccess, String> {
        let user = if c.etcd_user.is_empty() {
            None
        } else {
            let password = if c.etcd_password_file.is_empty() {
                String::new()
            } else {
                crate::config::read_secret("cluster.etcd_password_file", &c.etcd_password_file)?
            };
            Some((c.etcd_user.clone(), password))
        };
        Ok(EtcdAccess {
            tls: ClientFiles::new(&c.etcd_tls_ca_file, &c.etcd_tls_cert_file, &c.etcd_tls_key_file),
            user,
        })
    }

    /// etcd-client options with these settings and the given timeouts. Certificate files
    /// are read here, so a renewed certificate is used from the next connection on.
    pub fn options(&self, connect: Duration, request: Duration) -> Result<ConnectOptions, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(connect)
            .with_timeout(request);
        if !self.tls.is_empty() {
            let read = |what: &str, path: &str| std::fs::read(path).map_err(|e| format!("etcd TLS {what} {path}: {e}"));
            let mut tls = TlsOptions::new();
            if !self.tls.ca_file.is_empty() {
                tls = tls.ca_certificate(Certificate::from_pem(read("CA", &self.tls.ca_file)?));
            }
            if !self.tls.cert_file.is_empty() {
                tls = tls.identity(Identity::from_pem(
                    read("certificate", &self.tls.cert_file)?,
                    read("key", &self.tls.key_file)?,
                ));
            }
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        Ok(options)
    }
}

/// The key under which `node_id` registers.
pub fn node_key(prefix: &str, node_id: &str) -> String {
    format!("{}/nodes/{node_id}", prefix.trim_end_matches('/'))
}

/// Rendezvous (highest random weight) hashing: the node that owns `key` is the one with the
/// highest `score(node_id, key) = xxh3_64(key, seed = xxh3_64(node_id))`, ties going to the
/// greater node_id. Adding or removing a node moves only the keys that node wins or owned.
/// Clients in any language compute the same with any xxh3 implementation.
pub fn rendezvous<'a>(node_ids: impl IntoIterator<Item = &'a str>, key: &[u8]) -> Option<&'a str> {
    node_ids.into_iter().max_by_key(|id| (score(id, key), *id))
}

pub fn score(node_id: &str, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, xxh3_64(node_id.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: rendezvous hashing spreads keys over nodes and moves only the removed node's
    // keys when a node leaves.
    #[test]
    fn rendezvous_is_stable_and_spreads() {
        let nodes = ["n1", "n2", "n3"];
        let keys: Vec<Vec<u8>> = (0..3000).map(|i| format!("k{i}").into_bytes()).collect();
        let owner: Vec<&str> = keys.iter().map(|k| rendezvous(nodes, k).unwrap()).collect();
        for n in nodes {
            let share = owner.iter().filter(|o| **o == n).count();
            assert!((800..1200).contains(&share), "{n}: {share}");
        }
        let after: Vec<&str> = keys.iter().map(|k| rendezvous(["n1", "n3"], k).unwrap()).collect();
        for (before, after) in owner.iter().zip(&after) {
            if *before != "n2" {
                assert_eq!(before, after, "a key not on the removed node moved");
            }
        }
        assert_eq!(rendezvous([], b"k"), None);
    }
}
