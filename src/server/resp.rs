//! The Redis front end: RESP2 commands become the same requests the protobuf port takes,
//! run through the same dispatch (routing, limits, log, change capture, authentication),
//! and their responses are written back as Redis would answer.
//!
//! A batch of pipelined commands becomes one batch of requests, so pipelining over RESP
//! costs what it costs over protobuf. Commands that need no key (PING, ECHO, SELECT,
//! COMMAND, CONFIG GET, CLIENT, HELLO) are answered here; DBSIZE and INFO read Stats.

use std::ops::Range;
use std::rc::Rc;

use bytes::Bytes;

use super::access::Session;
use super::core::Core;
use super::dispatch;
use crate::config::Eviction;
use crate::proto::{self, request::Op, response::Result as R, ErrorCode, Request, Response};
use crate::resp;

/// The Redis version whose commands and replies this front end follows, for INFO and
/// HELLO: clients read it to choose what to send.
pub const REDIS_VERSION: &str = "7.0.0";

/// How a command's responses become its reply.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Get,
    Strlen,
    /// SET: +OK, or nil when its condition failed.
    Set,
    /// SET ... GET: the old value.
    SetGet,
    /// DEL, EXISTS: how many of its requests applied.
    Count,
    /// EXPIRE, PERSIST: 1 or 0.
    Flag,
    Ttl {
        ms: bool,
    },
    MGet,
    Ok,
    Integer,
    Auth,
    DbSize,
    Info,
}

/// One command's place in a batch.
enum Step {
    /// Answered without the engine.
    Reply(Vec<u8>),
    /// Answered from the responses to these requests.
    Run {
        shape: Shape,
        requests: Range<usize>,
        /// INFO: the sections asked for (lowercase; empty = the default set).
        sections: Vec<String>,
    },
}

/// A batch of commands on its way to the engine.
pub struct Batch {
    requests: Vec<Result<Request, Box<Response>>>,
    steps: Vec<Step>,
    /// QUIT was among the commands: the connection closes after the replies.
    pub quit: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            requests: Vec::new(),
            steps: Vec::new(),
            quit: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Adds one command. After QUIT nothing more is taken.
    pub fn push(&mut self, core: &Core, args: Vec<Bytes>) {
        if self.quit {
            return;
        }
        if args.first().is_some_and(|n| n.eq_ignore_ascii_case(b"quit")) {
            self.quit = true;
        }
        let step = match plan(core, args, &mut self.requests) {
            Ok(step) => step,
            Err(text) => {
                let mut out = Vec::new();
                resp::error(&mut out, &text);
                Step::Reply(out)
            }
        };
        self.steps.push(step);
    }

    /// Runs the requests; the replies are then written one by one ([`Replies::next_into`]),
    /// so the connection can send them in bounded pieces.
    pub async fn run(self, core: &Rc<Core>, session: &mut Session) -> Replies {
        let responses = if self.requests.is_empty() {
            Vec::new()
        } else {
            dispatch::execute_requests(core, session, self.requests).await
        };
        Replies {
            steps: self.steps.into_iter(),
            responses,
        }
    }
}

/// A batch's answers, in command order, not yet encoded.
pub struct Replies {
    steps: std::vec::IntoIter<Step>,
    responses: Vec<Response>,
}

impl Replies {
    /// Appends the next command's reply to `out`; false when there is none left.
    pub fn next_into(&mut self, core: &Core, out: &mut Vec<u8>) -> bool {
        match self.steps.next() {
            None => false,
            Some(Step::Reply(bytes)) => {
                out.extend_from_slice(&bytes);
                true
            }
            Some(Step::Run {
                shape,
                requests,
                sections,
            }) => {
                render(core, shape, &self.responses[requests], &sections, out);
                true
            }
        }
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

fn wrong_args(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";

fn int_arg(b: &[u8]) -> Result<i64, String> {
    crate::shard::parse_i64(b).ok_or_else(|| NOT_AN_INTEGER.to_string())
}

/// Builds the requests for one command (appended to `requests`) and how to answer it, or
/// the error reply's text.
fn plan(core: &Core, args: Vec<Bytes>, requests: &mut Vec<Result<Request, Box<Response>>>) -> Result<Step, String> {
    let Some(first) = args.first() else {
        return Err("ERR empty command".into());
    };
    let name = String::from_utf8_lossy(first).to_ascii_lowercase();
    let start = requests.len();
    let mut add = |op: Op| {
        requests.push(Ok(Request {
            id: requests.len() as u64,
            op: Some(op),
        }))
    };
    let arity = |ok: bool| if ok { Ok(()) } else { Err(wrong_args(&name)) };
    let a = &args[1..];
    let mut sections = Vec::new();
    let shape = match name.as_str() {
        "get" | "strlen" => {
            arity(a.len() == 1)?;
            add(Op::Get(proto::GetRequest { key: a[0].clone() }));
            if name == "get" {
                Shape::Get
            } else {
                Shape::Strlen
            }
        }
        "set" => {
            arity(a.len() >= 2)?;
            let (set, shape) = set_options(&a[0], &a[1], &a[2..])?;
            add(Op::Set(set));
            shape
        }
        "del" | "unlink" | "exists" => {
            arity(!a.is_empty())?;
            for key in a {
                add(if name == "exists" {
                    Op::Exists(proto::ExistsRequest { key: key.clone() })
                } else {
                    Op::Del(proto::DelRequest { key: key.clone() })
                });
            }
            Shape::Count
        }
        "expire" | "pexpire" => {
            arity(a.len() == 2)?;
            let n = int_arg(&a[1])?;
            let ms = if name == "expire" { n.checked_mul(1000) } else { Some(n) };
            let Some(ms) = ms else {
                return Err(format!("ERR invalid expire time in '{name}' command"));
            };
            // A deadline already passed deletes the key, as Redis does.
            if ms <= 0 {
                add(Op::Del(proto::DelRequest { key: a[0].clone() }));
            } else {
                add(Op::Expire(proto::ExpireRequest {
                    key: a[0].clone(),
                    ttl_ms: ms as u64,
                }));
            }
            Shape::Flag
        }
        "persist" => {
            arity(a.len() == 1)?;
            add(Op::Persist(proto::PersistRequest { key: a[0].clone() }));
            Shape::Flag
        }
        "ttl" | "pttl" => {
            arity(a.len() == 1)?;
            add(Op::Ttl(proto::TtlRequest { key: a[0].clone() }));
            Shape::Ttl { ms: name == "pttl" }
        }
        "mget" => {
            arity(!a.is_empty())?;
            add(Op::Mget(proto::MGetRequest { keys: a.to_vec() }));
            Shape::MGet
        }
        "mset" => {
            arity(!a.is_empty() && a.len().is_multiple_of(2))?;
            let entries = a
                .chunks(2)
                .map(|kv| proto::KeyValue {
                    key: kv[0].clone(),
                    value: kv[1].clone(),
                })
                .collect();
            add(Op::Mset(proto::MSetRequest { entries }));
            Shape::Ok
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let by = match name.as_str() {
                "incr" | "decr" => {
                    arity(a.len() == 1)?;
                    1
                }
                _ => {
                    arity(a.len() == 2)?;
                    int_arg(&a[1])?
                }
            };
            let by = if name.starts_with("decr") {
                by.checked_neg().ok_or("ERR decrement would overflow")?
            } else {
                by
            };
            add(Op::Incr(proto::IncrRequest { key: a[0].clone(), by }));
            Shape::Integer
        }
        "append" => {
            arity(a.len() == 2)?;
            add(Op::Append(proto::AppendRequest {
                key: a[0].clone(),
                value: a[1].clone(),
            }));
            Shape::Integer
        }
        "auth" => {
            let (user, token) = match a {
                [token] => (Bytes::from_static(b"default"), token),
                [user, token] => (user.clone(), token),
                _ => return Err(wrong_args(&name)),
            };
            add(Op::Auth(proto::AuthRequest {
                user: String::from_utf8_lossy(&user).into_owned(),
                token: token.clone(),
            }));
            Shape::Auth
        }
        "dbsize" => {
            arity(a.is_empty())?;
            add(Op::Stats(proto::StatsRequest {}));
            Shape::DbSize
        }
        "info" => {
            sections = a
                .iter()
                .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
                .collect();
            add(Op::Stats(proto::StatsRequest {}));
            Shape::Info
        }
        _ => return immediate(core, &name, &args).map(Step::Reply),
    };
    Ok(Step::Run {
        shape,
        requests: start..requests.len(),
        sections,
    })
}

/// SET's options, as Redis parses them: NX|XX, GET, and one of EX|PX|KEEPTTL.
fn set_options(key: &Bytes, value: &Bytes, opts: &[Bytes]) -> Result<(proto::SetRequest, Shape), String> {
    let mut set = proto::SetRequest {
        key: key.clone(),
        value: value.clone(),
        ..Default::default()
    };
    let mut shape = Shape::Set;
    let mut expiry = false;
    let mut i = 0;
    while i < opts.len() {
        let opt = opts[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"NX" | b"XX" if set.condition == 0 => {
                set.condition = if opt == b"NX" {
                    proto::SetCondition::IfAbsent
                } else {
                    proto::SetCondition::IfPresent
                } as i32;
            }
            b"GET" if matches!(shape, Shape::Set) => {
                set.return_old = true;
                shape = Shape::SetGet;
            }
            b"KEEPTTL" if !expiry => {
                set.keep_ttl = true;
                expiry = true;
            }
            b"EX" | b"PX" if !expiry && i + 1 < opts.len() => {
                let n = int_arg(&opts[i + 1])?;
                let ms = if opt == b"EX" { n.checked_mul(1000) } else { Some(n) };
                match ms {
                    Some(ms) if ms > 0 => set.ttl_ms = ms as u64,
                    _ => return Err("ERR invalid expire time in 'set' command".into()),
                }
                expiry = true;
                i += 1;
            }
            _ => return Err(SYNTAX.into()),
        }
        i += 1;
    }
    Ok((set, shape))
}

/// Commands answered without the engine.
fn immediate(core: &Core, name: &str, args: &[Bytes]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let a = &args[1..];
    let arity = |ok: bool| if ok { Ok(()) } else { Err(wrong_args(name)) };
    match name {
        "ping" => match a {
            [] => resp::simple(&mut out, "PONG"),
            [msg] => resp::bulk(&mut out, msg),
            _ => return Err(wrong_args(name)),
        },
        "echo" => {
            arity(a.len() == 1)?;
            resp::bulk(&mut out, &a[0]);
        }
        "quit" => resp::simple(&mut out, "OK"),
        "select" => {
            arity(a.len() == 1)?;
            if int_arg(&a[0])? != 0 {
                return Err("ERR DB index is out of range".into());
            }
            resp::simple(&mut out, "OK");
        }
        "command" => match a.first().map(|s| s.to_ascii_lowercase()).as_deref() {
            // No command table: clients then use their own (redis-cli's built-in help).
            None | Some(b"docs" | b"info" | b"list") => resp::array_header(&mut out, 0),
            Some(b"count") => resp::integer(&mut out, 0),
            Some(_) => return Err(unknown_subcommand(&a[0], "COMMAND")),
        },
        "config" => match a.first().map(|s| s.to_ascii_lowercase()).as_deref() {
            Some(b"get") => {
                arity(a.len() >= 2)?;
                let mut pairs = Vec::new();
                for pattern in &a[1..] {
                    let pattern = String::from_utf8_lossy(pattern).to_ascii_lowercase();
                    for (k, v) in config_values(core) {
                        if glob(&pattern, k) && !pairs.iter().any(|(p, _)| *p == k) {
                            pairs.push((k, v));
                        }
                    }
                }
                resp::array_header(&mut out, pairs.len() * 2);
                for (k, v) in pairs {
                    resp::bulk(&mut out, k.as_bytes());
                    resp::bulk(&mut out, v.as_bytes());
                }
            }
            Some(_) => return Err(
                "ERR CONFIG supports only GET here: the node is configured by its flags, environment and config file"
                    .into(),
            ),
            None => return Err(wrong_args(name)),
        },
        "client" => match a.first().map(|s| s.to_ascii_lowercase()).as_deref() {
            Some(b"setname" | b"setinfo") => resp::simple(&mut out, "OK"),
            Some(b"getname") => resp::nil(&mut out),
            Some(b"id") => resp::integer(&mut out, core.counters.connections_accepted.get() as i64),
            Some(_) => return Err(unknown_subcommand(&a[0], "CLIENT")),
            None => return Err(wrong_args(name)),
        },
        "hello" => {
            if let Some(v) = a.first() {
                if int_arg(v).map_err(|_| "ERR Protocol version is not an integer or out of range")? != 2 {
                    return Err("NOPROTO sorry, this protocol version is not supported".into());
                }
                if a.len() > 1 {
                    return Err("ERR HELLO takes only the protocol version here: authenticate with AUTH".into());
                }
            }
            let hello = &core.hello;
            resp::array_header(&mut out, 14);
            for (k, v) in [
                ("server", "redis"),
                ("version", REDIS_VERSION),
                ("flux_version", hello.version.as_str()),
            ] {
                resp::bulk(&mut out, k.as_bytes());
                resp::bulk(&mut out, v.as_bytes());
            }
            resp::bulk(&mut out, b"proto");
            resp::integer(&mut out, 2);
            for (k, v) in [("mode", "standalone"), ("role", "master")] {
                resp::bulk(&mut out, k.as_bytes());
                resp::bulk(&mut out, v.as_bytes());
            }
            resp::bulk(&mut out, b"modules");
            resp::array_header(&mut out, 0);
        }
        _ => {
            let mut text = format!(
                "ERR unknown command '{}', with args beginning with: ",
                String::from_utf8_lossy(&args[0]).chars().take(128).collect::<String>()
            );
            for arg in a {
                if text.len() >= 200 {
                    break;
                }
                text.push_str(&format!(
                    "'{}' ",
                    String::from_utf8_lossy(arg).chars().take(64).collect::<String>()
                ));
            }
            return Err(text);
        }
    }
    Ok(out)
}

fn unknown_subcommand(sub: &[u8], command: &str) -> String {
    format!(
        "ERR unknown subcommand '{}'. Try {command} HELP.",
        String::from_utf8_lossy(sub).chars().take(64).collect::<String>()
    )
}

/// What CONFIG GET shows: the settings clients and redis-benchmark ask about.
fn config_values(core: &Core) -> Vec<(&'static str, String)> {
    let c = &core.config;
    let persistent = c.persistence.enabled;
    vec![
        ("save", String::new()),
        ("appendonly", if persistent { "yes" } else { "no" }.into()),
        ("maxmemory", c.limits.memory_bytes_max.to_string()),
        ("maxmemory-policy", policy(c.limits.eviction).into()),
        ("databases", "1".into()),
        ("proto-max-bulk-len", c.limits.value_bytes_max.to_string()),
        ("timeout", (c.limits.idle_timeout_ms / 1000).to_string()),
    ]
}

fn policy(e: Eviction) -> &'static str {
    match e {
        Eviction::None => "noeviction",
        Eviction::Lru => "allkeys-lru",
    }
}

/// Redis' glob for CONFIG GET: `*` and `?` only.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Writes one command's reply from its responses.
fn render(core: &Core, shape: Shape, responses: &[Response], sections: &[String], out: &mut Vec<u8>) {
    if let Some(e) = responses.iter().find_map(|r| r.error.as_ref()) {
        resp::error(out, &error_text(shape, e));
        return;
    }
    let one = responses.first().and_then(|r| r.result.as_ref());
    match (shape, one) {
        (Shape::Get, Some(R::Get(g))) if g.found => resp::bulk(out, &g.value),
        (Shape::Get, _) => resp::nil(out),
        (Shape::Strlen, Some(R::Get(g))) => resp::integer(out, g.value.len() as i64),
        (Shape::Set, Some(R::Set(s))) if s.applied => resp::simple(out, "OK"),
        (Shape::Set, _) => resp::nil(out),
        (Shape::SetGet, Some(R::Set(s))) if s.old_found => resp::bulk(out, &s.old_value),
        (Shape::SetGet, _) => resp::nil(out),
        (Shape::Count, _) => {
            let n = responses
                .iter()
                .filter(|r| match &r.result {
                    Some(R::Del(d)) => d.existed,
                    Some(R::Exists(e)) => e.exists,
                    _ => false,
                })
                .count();
            resp::integer(out, n as i64);
        }
        (Shape::Flag, Some(R::Expire(e))) => resp::integer(out, i64::from(e.applied)),
        (Shape::Flag, Some(R::Persist(p))) => resp::integer(out, i64::from(p.applied)),
        (Shape::Flag, Some(R::Del(d))) => resp::integer(out, i64::from(d.existed)),
        (Shape::Ttl { ms }, Some(R::Ttl(t))) => resp::integer(
            out,
            match t.ttl_ms {
                n if n < 0 => n,
                n if ms => n,
                // Redis rounds to the nearest second.
                n => (n + 500) / 1000,
            },
        ),
        (Shape::MGet, Some(R::Mget(m))) => {
            resp::array_header(out, m.values.len());
            for v in &m.values {
                if v.found {
                    resp::bulk(out, &v.value);
                } else {
                    resp::nil(out);
                }
            }
        }
        (Shape::Integer, Some(R::Incr(i))) => resp::integer(out, i.value),
        (Shape::Integer, Some(R::Append(a))) => resp::integer(out, a.length as i64),
        (Shape::Ok | Shape::Auth, Some(_)) => resp::simple(out, "OK"),
        (Shape::DbSize, Some(R::Stats(s))) => resp::integer(out, s.cores.iter().map(|c| c.keys as i64).sum()),
        (Shape::Info, Some(R::Stats(s))) => resp::bulk(out, info(core, s, sections).as_bytes()),
        _ => resp::error(out, "ERR internal error: unexpected response"),
    }
}

/// Redis' error for a failed request: its code word first, as clients match on it.
fn error_text(shape: Shape, e: &proto::Error) -> String {
    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unknown);
    match code {
        ErrorCode::OutOfMemory => "OOM command not allowed when used memory > 'maxmemory'.".into(),
        ErrorCode::Unauthenticated if matches!(shape, Shape::Auth) => {
            "WRONGPASS invalid username-password pair or user is disabled.".into()
        }
        ErrorCode::Unauthenticated => "NOAUTH Authentication required.".into(),
        ErrorCode::PermissionDenied => format!("NOPERM {}", e.message),
        ErrorCode::StorageUnavailable => format!("MISCONF {}", e.message),
        ErrorCode::NotAnInteger => format!("ERR {}", e.message),
        // Not Redis Cluster's `MOVED slot host:port`: the owner's address is its protobuf
        // port, which a Redis client cannot follow.
        ErrorCode::Moved => format!("ERR MOVED {}", e.message),
        ErrorCode::TryAgain => format!("TRYAGAIN {}", e.message),
        ErrorCode::ClusterDown => format!("CLUSTERDOWN {}", e.message),
        _ => format!("ERR {}", e.message),
    }
}

/// INFO's text: Redis' section layout (`# Name`, then `field:value` lines).
fn info(core: &Core, stats: &proto::StatsResponse, sections: &[String]) -> String {
    let wanted = |s: &str| {
        sections.is_empty()
            || sections
                .iter()
                .any(|w| w == s || w == "all" || w == "everything" || (w == "default" && s != "cores"))
    };
    let cores = &stats.cores;
    let sum = |f: fn(&proto::CoreStats) -> u64| cores.iter().map(f).sum::<u64>();
    let c = &core.config;
    let mut text = String::new();
    let mut section = |name: &str, lines: Vec<(String, String)>| {
        if wanted(&name.to_ascii_lowercase()) {
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            text.push_str(&format!("# {name}\r\n"));
            for (k, v) in lines {
                text.push_str(&format!("{k}:{v}\r\n"));
            }
        }
    };
    let kv = |k: &str, v: String| (k.to_string(), v);
    section(
        "Server",
        vec![
            kv("redis_version", REDIS_VERSION.into()),
            kv("flux_version", core.hello.version.clone()),
            kv("redis_mode", "standalone".into()),
            kv("run_id", core.hello.node_id.clone()),
            kv("process_id", std::process::id().to_string()),
            kv("arch_bits", "64".into()),
            kv("cores", core.hello.cores.to_string()),
            kv("shards", core.hello.shards.to_string()),
        ],
    );
    section(
        "Clients",
        vec![kv("connected_clients", sum(|c| c.connections_open).to_string())],
    );
    section(
        "Memory",
        vec![
            kv("used_memory", sum(|c| c.memory_bytes).to_string()),
            kv("maxmemory", c.limits.memory_bytes_max.to_string()),
            kv("maxmemory_policy", policy(c.limits.eviction).into()),
        ],
    );
    section(
        "Stats",
        vec![
            kv(
                "total_connections_received",
                sum(|c| c.connections_accepted).to_string(),
            ),
            kv("total_commands_processed", sum(|c| c.requests).to_string()),
            kv("rejected_connections", sum(|c| c.connections_refused).to_string()),
            kv("evicted_keys", sum(|c| c.keys_evicted).to_string()),
        ],
    );
    section("Keyspace", vec![kv("db0", format!("keys={}", sum(|c| c.keys)))]);
    section(
        "Cores",
        cores
            .iter()
            .map(|s| {
                kv(
                    &format!("core{}", s.core),
                    format!(
                        "keys={},memory_bytes={},connections={},requests={},evicted={}",
                        s.keys, s.memory_bytes, s.connections_open, s.requests, s.keys_evicted
                    ),
                )
            })
            .collect(),
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: CONFIG GET patterns match as Redis' glob does.
    #[test]
    fn config_glob() {
        assert!(glob("*", "save"));
        assert!(glob("max*", "maxmemory-policy"));
        assert!(glob("s?ve", "save"));
        assert!(!glob("save?", "save"));
        assert!(!glob("app", "appendonly"));
    }

    // Goal: SET's options parse as Redis' do, and contradictions are syntax errors.
    #[test]
    fn set_options_parse() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let opts = |v: &[&str]| v.iter().map(|s| b(s)).collect::<Vec<_>>();
        let (set, _) = set_options(&b("k"), &b("v"), &opts(&["nx", "EX", "10"])).unwrap();
        assert_eq!(
            (set.condition, set.ttl_ms),
            (proto::SetCondition::IfAbsent as i32, 10_000)
        );
        let (set, shape) = set_options(&b("k"), &b("v"), &opts(&["KEEPTTL", "GET", "xx"])).unwrap();
        assert!(set.keep_ttl && set.return_old && matches!(shape, Shape::SetGet));
        for bad in [
            &["NX", "XX"][..],
            &["EX", "1", "PX", "2"],
            &["EX"],
            &["KEEPTTL", "EX", "1"],
            &["FOO"],
        ] {
            assert_eq!(
                set_options(&b("k"), &b("v"), &opts(bad)).unwrap_err(),
                SYNTAX,
                "{bad:?}"
            );
        }
        assert_eq!(
            set_options(&b("k"), &b("v"), &opts(&["EX", "0"])).unwrap_err(),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            set_options(&b("k"), &b("v"), &opts(&["PX", "x"])).unwrap_err(),
            NOT_AN_INTEGER
        );
    }
}
