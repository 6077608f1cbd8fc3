//! The node's registration in etcd, run on the control core.
//!
//! Grant a lease, create `<prefix>/nodes/<node_id>` with it (only if no live node holds that
//! key: two live nodes with one node_id is a configuration error, refused and logged), and
//! keep the lease alive at a third of its TTL. etcd unreachable, at start or later: the node
//! serves anyway and retries with backoff; a lost lease (etcd away longer than the TTL) is
//! replaced and the key written again. On leave (SIGTERM) the lease is revoked first, so the
//! node drops out of the cluster at once, before the cores drain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::mpsc;

use super::{node_key, NodeInfo};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Every etcd call is bounded, so a hung etcd cannot stall the control core.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A request to leave the cluster now; answered once the lease is revoked (or that failed).
pub type LeaveRequest = std::sync::mpsc::Sender<()>;

/// What the registration is doing, for metrics and readiness (read from any thread).
#[derive(Default)]
pub struct RegistrationState {
    /// The node's key is in etcd under a live lease.
    pub registered: AtomicBool,
    /// Lease keep-alives etcd acknowledged.
    pub renewals: std::sync::atomic::AtomicU64,
}

pub struct Registration {
    pub state: Arc<RegistrationState>,
    endpoints: Vec<String>,
    access: super::EtcdAccess,
    key: String,
    info: NodeInfo,
    ttl_s: i64,
    leave: mpsc::UnboundedReceiver<LeaveRequest>,
    /// Becomes true once every core accepts connections: only then is the node announced.
    serving: tokio::sync::watch::Receiver<bool>,
    /// The lease of our last registration: a key still held by it is ours, not a rival's
    /// (etcd restarted before that lease expired).
    last_lease: Option<i64>,
}

/// How one registered session ended.
enum End {
    /// Asked to leave (lease revoked): stop for good.
    Left,
    /// The connection or the lease was lost: register again.
    Lost(String),
}

impl Registration {
    pub fn new(
        endpoints: Vec<String>,
        access: super::EtcdAccess,
        prefix: &str,
        info: NodeInfo,
        lease_ttl_ms: u64,
        serving: tokio::sync::watch::Receiver<bool>,
    ) -> (Registration, mpsc::UnboundedSender<LeaveRequest>) {
        let (tx, leave) = mpsc::unbounded_channel();
        let key = node_key(prefix, &info.node_id);
        let ttl_s = lease_ttl_ms.div_ceil(1000).max(1) as i64;
        (
            Registration {
                state: Arc::default(),
                endpoints,
                access,
                key,
                info,
                ttl_s,
                leave,
                serving,
                last_lease: None,
            },
            tx,
        )
    }

    /// Registers and stays registered until asked to leave or `stop` is set.
    pub async fn run(mut self, stop: Arc<AtomicBool>) {
        if self.serving.wait_for(|s| *s).await.is_err() {
            return; // the server never came up
        }
        let mut retry = RETRY_MIN;
        while !stop.load(Ordering::Acquire) {
            let ended = self.session(&stop).await;
            self.state.registered.store(false, Ordering::Relaxed);
            match ended {
                Ok(End::Left) => return,
                Ok(End::Lost(why)) => {
                    tracing::warn!(reason = %why, "cluster: registration lost; registering again");
                    retry = RETRY_MIN;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "cluster: cannot register in etcd");
                }
            }
            // Wait before the next attempt, but answer a leave request at once.
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                req = self.leave.recv() => {
                    if let Some(done) = req { let _ = done.send(()); }
                    return;
                }
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// One registration: lease, create the key, keep alive until something ends it.
    async fn session(&mut self, stop: &AtomicBool) -> Result<End, String> {
        let options = self.access.options(CALL_TIMEOUT, CALL_TIMEOUT)?;
        let mut client = bounded(Client::connect(&self.endpoints, Some(options))).await?;
        let lease = bounded(client.lease_grant(self.ttl_s, None)).await?.id();
        let value = serde_json::to_string(&self.info).map_err(|e| e.to_string())?;
        let put = || {
            TxnOp::put(
                self.key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let create = Txn::new()
            .when([Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)])
            .and_then([put()]);
        let mut registered = bounded(client.txn(create)).await?.succeeded();
        if let (false, Some(old)) = (registered, self.last_lease) {
            // The key may still hold our own previous lease: take it over.
            let ours = Txn::new()
                .when([Compare::lease(self.key.clone(), CompareOp::Equal, old)])
                .and_then([put()]);
            registered = bounded(client.txn(ours)).await?.succeeded();
            if registered {
                let _ = bounded(client.lease_revoke(old)).await;
            }
        }
        if !registered {
            let _ = bounded(client.lease_revoke(lease)).await;
            let holder = bounded(client.get(self.key.clone(), None))
                .await
                .ok()
                .and_then(|r| {
                    r.kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                })
                .unwrap_or_default();
            tracing::error!(
                key = %self.key,
                holder = %holder,
                "cluster: another live node is registered with this node_id; not registering (set a distinct cluster.node_id)"
            );
            return Err("node_id taken by another live node".into());
        }
        self.last_lease = Some(lease);
        tracing::info!(key = %self.key, addr = %self.info.addr, lease_ttl_s = self.ttl_s, "cluster: registered in etcd");
        self.state.registered.store(true, Ordering::Relaxed);
        let (mut keeper, mut acks) = bounded(client.lease_keep_alive(lease)).await?;
        let mut tick = tokio::time::interval(Duration::from_millis((self.ttl_s as u64 * 1000 / 3).max(100)));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if stop.load(Ordering::Acquire) {
                        let _ = bounded(client.lease_revoke(lease)).await;
                        return Ok(End::Left);
                    }
                    if let Err(e) = bounded(keeper.keep_alive()).await {
                        return Ok(End::Lost(e));
                    }
                }
                ack = acks.message() => match ack {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        self.state.renewals.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) => return Ok(End::Lost("lease expired".into())),
                    Ok(None) => return Ok(End::Lost("keep-alive stream closed".into())),
                    Err(e) => return Ok(End::Lost(e.to_string())),
                },
                req = self.leave.recv() => {
                    let revoked = bounded(client.lease_revoke(lease)).await;
                    match &revoked {
                        Ok(_) => tracing::info!(key = %self.key, "cluster: left (lease revoked)"),
                        Err(e) => tracing::warn!(error = %e, "cluster: could not revoke the lease; it expires by itself"),
                    }
                    if let Some(done) = req {
                        let _ = done.send(());
                    }
                    return Ok(End::Left);
                }
            }
        }
    }
}

async fn bounded<T, E: std::fmt::Display>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
    super::bounded(CALL_TIMEOUT, f).await
}

/// The address clients reach this node at: `cluster.advertise_addr`, else `FLUX_POD_IP`
/// with the listen port (compatibility with the old service), else the listen address
/// unless it is a wildcard, else the first non-loopback interface address.
pub fn advertise_addr(configured: &str, listen: std::net::SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    if let Ok(ip) = std::env::var("FLUX_POD_IP") {
        if !ip.trim().is_empty() {
            return std::net::SocketAddr::new(ip.trim().parse().unwrap_or(listen.ip()), listen.port()).to_string();
        }
    }
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    first_interface_ip().map_or(listen.to_string(), |ip| {
        std::net::SocketAddr::new(ip, listen.port()).to_string()
    })
}

fn first_interface_ip() -> Option<std::net::IpAddr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: family AF_INET means the address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() {
                found = Some(std::net::IpAddr::V4(ip));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list obtained above.
    unsafe { libc::freeifaddrs(addrs) };
    found
}
