//! Clusters through etcd: nodes register under `<prefix>/nodes/<node_id>` with a lease,
//! and the slot table at `<prefix>/slots` says which node owns each slot of keys. Clients
//! read and watch both and send each key to its slot's owner (then to the owner core
//! inside the node).
//!
//! - `registration.rs`: a node's membership, on the control core.
//! - `slots.rs`: the table, its format, its transactional updates and rebalance plans.
//! - `gate.rs`: what a node may do with each slot, checked on every key operation.
//! - `follower.rs`: a node following the table, and importing slots that move to it.

pub mod follower;
pub mod gate;
pub mod registration;
pub mod slots;

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::tls::ClientFiles;

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

/// An etcd call bounded by `timeout`, its error as text: a hung etcd must not stall the
/// control core.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("etcd did not answer in time".into()),
    }
}

/// The key under which `node_id` registers.
pub fn node_key(prefix: &str, node_id: &str) -> String {
    format!("{}/nodes/{node_id}", prefix.trim_end_matches('/'))
}
