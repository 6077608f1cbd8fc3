//! Who may connect, and what each user may do.
//!
//! A node with `auth.users_file` requires every connection to authenticate (an Auth request
//! with a user's token, or a TLS client certificate that maps to a user) before anything but
//! HELLO and PING. Each user has a role and, optionally, key prefixes:
//!
//! ```toml
//! [[users]]
//! name = "orders"                 # no ':' or whitespace: a token file holds "name:secret"
//! role = "write"                  # read | write | admin
//! token_sha256 = "9f86d0..."      # SHA-256 of the secret, hex; the secret itself is never stored
//! key_prefixes = ["orders:"]      # optional: the only keys this user may name
//! cert_common_name = "orders-svc" # optional: a verified client certificate with this CN is this user
//! ```
//!
//! Tokens are 256 random bits (`flux-cli token new`), so one SHA-256 is enough to store them:
//! a slow password hash guards guessable secrets, and a random token is not guessable. That
//! also keeps the check cheap enough for a shard core (about a microsecond). The stored and
//! computed hashes are compared in constant time, and an unknown user costs the same hash and
//! comparison as a known one, so timing tells an attacker neither.
//!
//! The table is immutable; a SIGHUP loads a new one and swaps it in for new Auth requests.
//! A connection keeps the [`Grant`] it authenticated with until it closes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use subtle::ConstantTimeEq;

/// What a user may do. Ordered: each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET, EXISTS, TTL, MGET, PING, HELLO.
    Read,
    /// Read, plus SET, DEL, EXPIRE, MSET.
    Write,
    /// Everything, including STATS and SNAPSHOT.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an authenticated connection may do. Shared by every connection of one user.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    pub role: Role,
    /// Empty = every key.
    pub key_prefixes: Vec<Bytes>,
}

impl Grant {
    /// Everything: what a connection gets when auth is off (one shared grant, so a new
    /// connection costs no allocation for it).
    pub fn unrestricted() -> Arc<Grant> {
        static UNRESTRICTED: std::sync::LazyLock<Arc<Grant>> = std::sync::LazyLock::new(|| {
            Arc::new(Grant {
                user: String::new(),
                role: Role::Admin,
                key_prefixes: Vec::new(),
            })
        });
        UNRESTRICTED.clone()
    }

    pub fn allows(&self, needed: Role) -> bool {
        self.role >= needed
    }

    pub fn allows_key(&self, key: &[u8]) -> bool {
        self.key_prefixes.is_empty() || self.key_prefixes.iter().any(|p| key.starts_with(p))
    }
}

/// Length of a token's secret in bytes (256 bits).
pub const TOKEN_BYTES: usize = 32;

struct Entry {
    token_sha256: Option<[u8; 32]>,
    grant: Arc<Grant>,
}

/// Names only: the hashes stay out of logs and panics.
impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

/// The users file, loaded.
#[derive(Default)]
pub struct Users {
    by_name: HashMap<String, Entry>,
    by_common_name: HashMap<String, Arc<Grant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    role: Role,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    key_prefixes: Vec<String>,
    #[serde(default)]
    cert_common_name: Option<String>,
}

impl Users {
    /// Reads and checks a users file; the error names the file and the entry at fault.
    pub fn load(path: &str) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("users file {path}: {e}"))?;
        Users::parse(&text).map_err(|e| format!("users file {path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Users, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut users = Users::default();
        for u in file.users {
            check_name(&u.name)?;
            let token_sha256 = match &u.token_sha256 {
                Some(hex) => {
                    Some(parse_hash(hex).ok_or_else(|| format!("user {}: token_sha256 is not 64 hex digits", u.name))?)
                }
                None => None,
            };
            if token_sha256.is_none() && u.cert_common_name.is_none() {
                return Err(format!(
                    "user {}: needs token_sha256 or cert_common_name (it could never authenticate)",
                    u.name
                ));
            }
            let grant = Arc::new(Grant {
                user: u.name.clone(),
                role: u.role,
                key_prefixes: u.key_prefixes.into_iter().map(Bytes::from).collect(),
            });
            if let Some(cn) = u.cert_common_name {
                if users.by_common_name.insert(cn.clone(), grant.clone()).is_some() {
                    return Err(format!("cert_common_name {cn:?} is given to two users"));
                }
            }
            let entry = Entry { token_sha256, grant };
            if users.by_name.insert(u.name.clone(), entry).is_some() {
                return Err(format!("user {} appears twice", u.name));
            }
        }
        Ok(users)
    }

    /// The grant for `user` if `token` is its secret. Costs one SHA-256 and a constant-time
    /// comparison whether or not the user exists.
    pub fn verify(&self, user: &str, token: &[u8]) -> Option<Arc<Grant>> {
        let presented = sha256(token);
        let entry = self.by_name.get(user);
        let stored = entry.and_then(|e| e.token_sha256).unwrap_or([0xff; 32]);
        let equal: bool = presented.ct_eq(&stored).into();
        entry
            .filter(|e| equal && e.token_sha256.is_some())
            .map(|e| e.grant.clone())
    }

    /// The user a verified client certificate's common name maps to.
    pub fn by_common_name(&self, cn: &str) -> Option<Arc<Grant>> {
        self.by_common_name.get(cn).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "user name {name:?} must be 1-256 characters without ':' or whitespace"
        ));
    }
    Ok(())
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token for `user`: the secret (hex of 256 random bits) and its users-file entry.
pub struct NewToken {
    /// `user:secret`, the content of a token file.
    pub credentials: String,
    /// The `[[users]]` entry to append to the users file.
    pub entry: String,
}

pub fn new_token(user: &str, role: Role, key_prefixes: &[String]) -> Result<NewToken, String> {
    check_name(user)?;
    let mut secret = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| "the system random source failed".to_string())?;
    let secret = to_hex(&secret);
    let mut entry = format!(
        "[[users]]\nname = {user:?}\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n",
        to_hex(&sha256(secret.as_bytes()))
    );
    if !key_prefixes.is_empty() {
        entry.push_str(&format!("key_prefixes = {key_prefixes:?}\n"));
    }
    Ok(NewToken {
        credentials: format!("{user}:{secret}"),
        entry,
    })
}

/// Credentials a client presents: from a token file holding `user:secret`.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub token: Bytes,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("token", &"****")
            .finish()
    }
}

impl Credentials {
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let (user, secret) = text
            .trim()
            .split_once(':')
            .ok_or("a token file holds user:secret (as printed by flux-cli token new)")?;
        check_name(user)?;
        Ok(Credentials {
            user: user.to_string(),
            token: Bytes::copy_from_slice(secret.as_bytes()),
        })
    }

    pub fn from_file(path: &str) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("token file {path}: {e}"))?;
        Credentials::parse(&text).map_err(|e| format!("token file {path}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a new token verifies against its own entry, and nothing else does.
    #[test]
    fn new_token_round_trips_through_the_users_file() {
        let t = new_token("app", Role::Write, &["app:".into()]).unwrap();
        let users = Users::parse(&t.entry).unwrap();
        let creds = Credentials::parse(&t.credentials).unwrap();
        assert_eq!(creds.token.len(), 2 * TOKEN_BYTES);
        let grant = users.verify(&creds.user, &creds.token).expect("own token verifies");
        assert_eq!((grant.role, grant.user.as_str()), (Role::Write, "app"));
        assert!(grant.allows_key(b"app:1") && !grant.allows_key(b"other"));
        assert!(users.verify("app", b"wrong").is_none());
        assert!(users.verify("nobody", &creds.token).is_none());
        assert!(!t.entry.contains(&String::from_utf8_lossy(&creds.token).to_string()));
    }

    // Goal: a users file with a mistake is refused with the reason, not half-loaded.
    #[test]
    fn bad_users_files_are_refused() {
        let dup = "[[users]]\nname='a'\nrole='read'\ntoken_sha256='".to_string() + &"0".repeat(64) + "'\n";
        assert!(Users::parse(&(dup.clone() + &dup)).unwrap_err().contains("twice"));
        assert!(Users::parse("[[users]]\nname='a'\nrole='root'\n").is_err());
        assert!(Users::parse("[[users]]\nname='a'\nrole='read'\ntoken_sha256='zz'\n")
            .unwrap_err()
            .contains("hex"));
        assert!(Users::parse("[[users]]\nname='a:b'\nrole='read'\ncert_common_name='x'\n").is_err());
        assert!(Users::parse("[[users]]\nname='a'\nrole='read'\n")
            .unwrap_err()
            .contains("never"));
    }
}
