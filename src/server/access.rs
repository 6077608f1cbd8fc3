//! Access control on the client port: the reloadable users table and TLS configuration,
//! protected mode, and each connection's authentication state.
//!
//! ```text
//!  SIGHUP (signal thread) --load users file + certificates--> Arc<Access> --swap--+
//!                                                                               |
//!  core: accept -> access.load() (one atomic load) -> TLS handshake with its config
//!        Auth request -> its users table -> Grant kept by the connection until it closes
//! ```
//!
//! Files are read on the thread that handles the signal, never on a shard core, and a
//! file with a mistake leaves the running table in place (the error is logged). Cores see
//! the new table at their next accept or Auth: one atomic load, no lock.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::auth::{Grant, Role, Users};
use crate::config::Config;
use crate::proto::{self, request::Op, ErrorCode};

/// What the node allows right now.
pub struct Access {
    /// None = auth off.
    pub users: Option<Users>,
    /// None = plaintext port.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Access {
    fn load(config: &Config) -> Result<Access, String> {
        let users = if config.auth.enabled() {
            Some(Users::load(&config.auth.users_file)?)
        } else {
            None
        };
        let tls = if config.tls.enabled() {
            Some(crate::tls::server_config(&config.tls)?)
        } else {
            None
        };
        Ok(Access { users, tls })
    }
}

/// The node's current [`Access`], shared by every core and swapped whole on reload.
#[derive(Clone)]
pub struct AccessControl {
    current: Arc<ArcSwap<Access>>,
    config: Arc<Config>,
}

impl AccessControl {
    pub fn new(config: &Config) -> Result<AccessControl, String> {
        Ok(AccessControl {
            current: Arc::new(ArcSwap::from_pointee(Access::load(config)?)),
            config: Arc::new(config.clone()),
        })
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Access>> {
        self.current.load()
    }

    /// Reads the users file and the certificates again. On an error the running table and
    /// certificates stay in place. Connections already open keep what they have.
    pub fn reload(&self) -> Result<(), String> {
        let next = Access::load(&self.config)?;
        let users = next.users.as_ref().map_or(0, Users::len);
        self.current.store(Arc::new(next));
        tracing::info!(users, "reloaded the users file and TLS certificates");
        Ok(())
    }
}

/// Whether protected mode applies: auth off, protected_mode on, and a listen address other
/// than loopback. Then only loopback peers are served (Redis' protected mode): a node set up
/// without credentials is not opened to the network by accident.
pub fn protected(config: &Config) -> bool {
    let ip = config.listen.parse::<SocketAddr>().map(|a| a.ip());
    config.protected_mode && !config.auth.enabled() && !ip.is_ok_and(|ip| ip.is_loopback())
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// What a peer refused by protected mode is told.
pub const PROTECTED_MODE: &str = "the node runs in protected mode: no users file (auth.users_file) is set and it listens on a non-loopback address, so only loopback clients are served. Either set auth.users_file (see the README's Security section), listen on 127.0.0.1, or start with --protected-mode false to accept every client without authentication";

/// One connection's authentication: its grant (None until it authenticates, when auth is
/// on) and its failed attempts.
pub struct Session {
    pub grant: Option<Arc<Grant>>,
    pub failures: u32,
    pub peer: Option<SocketAddr>,
    /// Set after too many failures: the connection closes once its replies are written.
    pub close: bool,
}

impl Session {
    pub fn new(auth_on: bool, peer: Option<SocketAddr>) -> Session {
        Session {
            grant: (!auth_on).then(Grant::unrestricted),
            failures: 0,
            peer,
            close: false,
        }
    }

    /// Whether this connection may run `op`: UNAUTHENTICATED before a successful Auth,
    /// PERMISSION_DENIED for a role or key prefix that does not allow it.
    pub fn authorize(&self, op: &Op) -> Result<(), proto::Error> {
        if self.close {
            return Err(err(
                ErrorCode::Unauthenticated,
                "too many failed Auth requests: the connection is closing".into(),
            ));
        }
        let Some(needed) = needed_role(op) else {
            return Ok(());
        };
        let Some(grant) = &self.grant else {
            return Err(err(
                ErrorCode::Unauthenticated,
                "authentication required: send an Auth request first (HELLO and PING are open)".into(),
            ));
        };
        if !grant.allows(needed) {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "user {:?} has role {} and this request needs {needed}",
                    grant.user, grant.role
                ),
            ));
        }
        if !grant.key_prefixes.is_empty() {
            if let Some(key) = keys(op).find(|k| !grant.allows_key(k)) {
                return Err(err(
                    ErrorCode::PermissionDenied,
                    format!(
                        "user {:?} may not use key {:?} (outside its key prefixes)",
                        grant.user,
                        String::from_utf8_lossy(&key[..key.len().min(64)])
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The role a request needs; None for those open to everyone (HELLO, PING, AUTH).
fn needed_role(op: &Op) -> Option<Role> {
    match op {
        Op::Ping(_) | Op::Hello(_) | Op::Auth(_) => None,
        Op::Get(_) | Op::Exists(_) | Op::Ttl(_) | Op::Mget(_) => Some(Role::Read),
        Op::Set(_) | Op::Del(_) | Op::Expire(_) | Op::Mset(_) | Op::Incr(_) | Op::Append(_) | Op::Persist(_) => {
            Some(Role::Write)
        }
        Op::Stats(_)
        | Op::Snapshot(_)
        | Op::Backup(_)
        | Op::BackupRead(_)
        | Op::BackupEnd(_)
        | Op::SlotExport(_)
        | Op::SlotImport(_)
        | Op::SlotPurge(_) => Some(Role::Admin),
    }
}

/// Every key a request names.
fn keys(op: &Op) -> Box<dyn Iterator<Item = &Bytes> + '_> {
    match op {
        Op::Get(r) => Box::new(std::iter::once(&r.key)),
        Op::Set(r) => Box::new(std::iter::once(&r.key)),
        Op::Del(r) => Box::new(std::iter::once(&r.key)),
        Op::Exists(r) => Box::new(std::iter::once(&r.key)),
        Op::Expire(r) => Box::new(std::iter::once(&r.key)),
        Op::Ttl(r) => Box::new(std::iter::once(&r.key)),
        Op::Mget(r) => Box::new(r.keys.iter()),
        Op::Mset(r) => Box::new(r.entries.iter().map(|e| &e.key)),
        Op::Incr(r) => Box::new(std::iter::once(&r.key)),
        Op::Append(r) => Box::new(std::iter::once(&r.key)),
        Op::Persist(r) => Box::new(std::iter::once(&r.key)),
        Op::SlotImport(r) => Box::new(r.entries.iter().map(|e| &e.key)),
        Op::Ping(_)
        | Op::Stats(_)
        | Op::Hello(_)
        | Op::Snapshot(_)
        | Op::Auth(_)
        | Op::Backup(_)
        | Op::BackupRead(_)
        | Op::BackupEnd(_)
        | Op::SlotExport(_)
        | Op::SlotPurge(_) => Box::new(std::iter::empty()),
    }
}

fn err(code: ErrorCode, message: String) -> proto::Error {
    proto::Error {
        code: code as i32,
        message,
        ..Default::default()
    }
}

/// How often, at most, a core logs one kind of refusal.
const THROTTLE_INTERVAL: Duration = Duration::from_secs(10);

/// Logs a kind of event at most once per [`THROTTLE_INTERVAL`], with how many there were
/// since: a flood of refused connections or failed logins must not become a flood of log
/// lines (Stats counts them all).
#[derive(Default)]
pub struct Throttle {
    since_log: u64,
    logged_at: Option<Instant>,
}

impl Throttle {
    /// Counts one event; returns how many to report when it is time to log.
    pub fn note(&mut self) -> Option<u64> {
        self.since_log += 1;
        if self.logged_at.is_some_and(|t| t.elapsed() < THROTTLE_INTERVAL) {
            return None;
        }
        self.logged_at = Some(Instant::now());
        Some(std::mem::take(&mut self.since_log))
    }
}
