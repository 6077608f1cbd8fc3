//! Semantics of every operation in proto/flux.proto, over real TCP against the real binary.
mod common;

use std::time::Duration;

use common::{b, code, eventually, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R, ErrorCode, SetCondition};

// Goal: GET/SET/DEL/EXISTS behave as documented, including the empty key and binary data.
#[test]
fn get_set_del_exists() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.get(b"missing"), None);
    assert!(!c.exists(b"missing"));
    assert!(!c.del(b"missing"));

    assert!(c.set(b"k", b"v1"));
    assert_eq!(c.get(b"k").as_deref(), Some(&b"v1"[..]));
    assert!(c.set(b"k", b"v2"));
    assert_eq!(c.get(b"k").as_deref(), Some(&b"v2"[..]));
    assert!(c.exists(b"k"));
    assert!(c.del(b"k"));
    assert!(!c.exists(b"k"));
    assert_eq!(c.get(b"k"), None);

    // The empty key is a key; an empty value is a value (found, not missing).
    assert!(c.set(b"", b"empty-key"));
    assert_eq!(c.get(b"").as_deref(), Some(&b"empty-key"[..]));
    assert!(c.set(b"ev", b""));
    assert_eq!(c.get(b"ev").as_deref(), Some(&b""[..]));
    let binary: Vec<u8> = (0..=255u8).collect();
    assert!(c.set(&binary, &binary));
    assert_eq!(c.get(&binary), Some(binary));
}

// Goal: SET conditions apply only when their condition holds and report it.
#[test]
fn set_conditions() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    assert!(!c.set_with(b"c", b"x", 0, SetCondition::IfPresent));
    assert_eq!(c.get(b"c"), None);
    assert!(c.set_with(b"c", b"first", 0, SetCondition::IfAbsent));
    assert!(!c.set_with(b"c", b"second", 0, SetCondition::IfAbsent));
    assert_eq!(c.get(b"c").as_deref(), Some(&b"first"[..]));
    assert!(c.set_with(b"c", b"third", 0, SetCondition::IfPresent));
    assert_eq!(c.get(b"c").as_deref(), Some(&b"third"[..]));

    // An unknown condition value is refused, not treated as ALWAYS.
    let op = Op::Set(proto::SetRequest {
        key: b(b"c"),
        value: b(b"x"),
        ttl_ms: 0,
        condition: 9,
        ..Default::default()
    });
    assert_eq!(code(&c.call(op)), Some(ErrorCode::InvalidRequest));
    assert_eq!(c.get(b"c").as_deref(), Some(&b"third"[..]));
}

// Goal: TTL edge cases: -1/-2, EXPIRE on missing keys, ttl 0 persists, SET clears the TTL,
// expired keys behave as missing (also for IF_ABSENT), and TTL counts down.
#[test]
fn ttl_and_expire() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.ttl(b"none"), -2);
    assert!(!c.expire(b"none", 1000));
    assert!(!c.expire(b"none", 0));

    c.set(b"p", b"v");
    assert_eq!(c.ttl(b"p"), -1);
    assert!(c.expire(b"p", 60_000));
    let t = c.ttl(b"p");
    assert!(t > 59_000 && t <= 60_000, "ttl {t}");
    assert!(c.expire(b"p", 0), "ttl 0 removes the expiry");
    assert_eq!(c.ttl(b"p"), -1);

    c.set_with(b"s", b"v", 60_000, SetCondition::Always);
    assert!(c.ttl(b"s") > 0);
    c.set(b"s", b"v2");
    assert_eq!(c.ttl(b"s"), -1, "a SET without ttl leaves the key persistent");

    c.set_with(b"short", b"v", 50, SetCondition::Always);
    assert!(eventually(Duration::from_secs(2), || c.get(b"short").is_none()));
    assert_eq!(c.ttl(b"short"), -2);
    assert!(!c.exists(b"short"));
    assert!(!c.expire(b"short", 1000), "an expired key cannot get a new expiry");
    assert!(!c.del(b"short"));
    c.set_with(b"short2", b"old", 50, SetCondition::Always);
    assert!(eventually(Duration::from_secs(2), || c.ttl(b"short2") == -2));
    assert!(
        c.set_with(b"short2", b"new", 0, SetCondition::IfAbsent),
        "expired counts as absent"
    );
    assert_eq!(c.get(b"short2").as_deref(), Some(&b"new"[..]));
    assert!(!c.set_with(b"gone", b"x", 0, SetCondition::IfPresent));
}

// Goal: the active sweep removes expired keys that are never read again, within about a
// second of their deadline.
#[test]
fn expired_keys_are_swept_without_reads() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    let ttl = Duration::from_millis(1000);
    // One pipelined write, so all 500 keys get their TTL at nearly the same moment.
    let mut bytes = Vec::new();
    for i in 0..500 {
        let op = Op::Set(proto::SetRequest {
            key: b(format!("sweep{i}").as_bytes()),
            value: b(b"v"),
            ttl_ms: ttl.as_millis() as u64,
            ..Default::default()
        });
        flux_kv::wire::put_frame(&c.request(op), &mut bytes);
    }
    let written = std::time::Instant::now();
    c.send_raw(&bytes);
    for _ in 0..500 {
        assert!(code(&c.recv().unwrap()).is_none());
    }
    c.set(b"stays", b"v");
    let keys = |s: &TestServer| s.stats().iter().map(|s| s.keys).sum::<u64>();
    let before = keys(&server);
    if written.elapsed() < ttl {
        assert_eq!(before, 501);
    }
    let deadline = ttl + Duration::from_millis(1500) - written.elapsed().min(ttl);
    assert!(
        eventually(deadline, || keys(&server) == 1),
        "keys left: {}",
        keys(&server)
    );
}

// Goal: MGET/MSET span shards and cores, keep order, and report missing keys as not found.
#[test]
fn mget_mset() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    let entries: Vec<proto::KeyValue> = (0..100)
        .map(|i| proto::KeyValue {
            key: b(format!("m{i}").as_bytes()),
            value: b(format!("v{i}").as_bytes()),
        })
        .collect();
    let r = c.call(Op::Mset(proto::MSetRequest { entries }));
    assert!(matches!(r.result, Some(R::Mset(_))), "{r:?}");

    let mut keys: Vec<_> = (0..100).rev().map(|i| b(format!("m{i}").as_bytes())).collect();
    keys.insert(50, b(b"absent"));
    let r = c.call(Op::Mget(proto::MGetRequest { keys }));
    let Some(R::Mget(m)) = r.result else { panic!("{r:?}") };
    assert_eq!(m.values.len(), 101);
    for (pos, v) in m.values.iter().enumerate() {
        if pos == 50 {
            assert!(!v.found && v.value.is_empty());
            continue;
        }
        let i = if pos < 50 { 99 - pos } else { 100 - pos };
        assert!(v.found);
        assert_eq!(v.value, format!("v{i}").as_bytes());
    }
    let r = c.call(Op::Mget(proto::MGetRequest { keys: vec![] }));
    assert!(matches!(r.result, Some(R::Mget(ref m)) if m.values.is_empty()), "{r:?}");
}

// Goal: PING echoes, HELLO describes the node with the documented routing parameters.
#[test]
fn ping_and_hello() {
    let server = TestServer::start(&["--cores", "2", "--shards", "64", "--core-port-base", "0"]);
    let mut c = server.connect();
    let r = c.call(Op::Ping(proto::PingRequest {
        payload: b(b"\x00hello"),
    }));
    assert!(
        matches!(r.result, Some(R::Ping(ref p)) if p.payload == b"\x00hello"[..]),
        "{r:?}"
    );
    let r = c.call(Op::Hello(proto::HelloRequest {}));
    let Some(R::Hello(h)) = r.result else { panic!("{r:?}") };
    assert_eq!((h.cores, h.shards, h.key_hash.as_str()), (2, 64, "xxh3_64"));
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert!(h.node_id.starts_with("flux-"));
    assert!(h.core_ports.is_empty());
    // The node id is kept in the data dir.
    let stored = std::fs::read_to_string(server.dir.join("node_id")).unwrap();
    assert_eq!(stored.trim(), h.node_id);
}

// Goal: with core_port_base, each core listens alone on its port and Hello lists them.
#[test]
fn core_ports_reach_their_core() {
    let base = common::free_port_pair();
    let server = TestServer::start(&["--cores", "2", "--core-port-base", &base.to_string()]);
    assert_eq!(server.core_ports, vec![base, base + 1]);
    for (core, port) in server.core_ports.iter().enumerate() {
        let mut c = common::Client::connect(([127, 0, 0, 1], *port).into());
        assert!(c.set(b"x", b"y"));
        let stats = server.stats();
        assert!(stats[core].connections_accepted >= 1, "core {core}: {stats:?}");
    }
    let r = server.connect().call(Op::Hello(proto::HelloRequest {}));
    let Some(R::Hello(h)) = r.result else { panic!("{r:?}") };
    assert_eq!(h.core_ports, vec![u32::from(base), u32::from(base) + 1]);
}
