//! Bad input and limits: each gets its documented error, never a crash, and never disturbs
//! other connections.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{b, code, Client, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R, ErrorCode, Request};
use flux_kv::wire;

/// After each bad input: a normal request on a fresh connection succeeds.
fn healthy(server: &TestServer) {
    let mut c = server.connect();
    assert!(c.set(b"health", b"ok"));
    assert_eq!(c.get(b"health").as_deref(), Some(&b"ok"[..]));
}

// Goal: a frame over the limit gets FRAME_TOO_LARGE, then the connection closes; the
// server allocates nothing for it and keeps serving.
#[test]
fn oversized_frame_is_refused_and_closed() {
    let server = TestServer::start(&["--limits-frame-bytes-max", "1024"]);
    let mut c = server.connect();
    // Announce 1 GiB; send only the header.
    c.send_raw(&(1u32 << 30).to_be_bytes());
    let r = c.recv().expect("an error reply before the close");
    assert_eq!(code(&r), Some(ErrorCode::FrameTooLarge));
    assert!(c.recv().is_none(), "connection must close after FRAME_TOO_LARGE");
    healthy(&server);
}

// Goal: bytes that do not decode, and a Request with no op, get INVALID_REQUEST and the
// connection stays usable (the frame boundary is intact).
#[test]
fn undecodable_and_empty_requests() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x01];
    let mut frame = (garbage.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&garbage);
    c.send_raw(&frame);
    let r = c.recv().unwrap();
    assert_eq!(code(&r), Some(ErrorCode::InvalidRequest), "{r:?}");

    c.send(&Request { id: 42, op: None });
    let r = c.recv().unwrap();
    assert_eq!((r.id, code(&r)), (42, Some(ErrorCode::InvalidRequest)));
    // A zero-length frame is an all-defaults Request: no op.
    c.send_raw(&[0, 0, 0, 0]);
    assert_eq!(code(&c.recv().unwrap()), Some(ErrorCode::InvalidRequest));

    assert!(c.set(b"after", b"garbage"), "same connection still works");
    healthy(&server);
}

// Goal: oversized keys and values get their own codes, nothing is stored, and the
// connection stays usable; MGET/MSET are checked as a whole before anything applies.
#[test]
fn oversized_keys_and_values() {
    let server = TestServer::start(&["--limits-key-bytes-max", "8", "--limits-value-bytes-max", "16"]);
    let mut c = server.connect();
    let long_key = b(b"123456789");
    let r = c.call(Op::Set(proto::SetRequest {
        key: long_key.clone(),
        value: b(b"v"),
        ..Default::default()
    }));
    assert_eq!(code(&r), Some(ErrorCode::KeyTooLarge));
    let r = c.call(Op::Get(proto::GetRequest { key: long_key.clone() }));
    assert_eq!(code(&r), Some(ErrorCode::KeyTooLarge));
    let r = c.call(Op::Set(proto::SetRequest {
        key: b(b"k"),
        value: b(&[0u8; 17]),
        ..Default::default()
    }));
    assert_eq!(code(&r), Some(ErrorCode::ValueTooLarge));
    assert_eq!(c.get(b"k"), None);

    let entries = vec![
        proto::KeyValue {
            key: b(b"ok1"),
            value: b(b"v"),
        },
        proto::KeyValue {
            key: b(b"ok2"),
            value: b(&[1u8; 17]),
        },
    ];
    let r = c.call(Op::Mset(proto::MSetRequest { entries }));
    assert_eq!(code(&r), Some(ErrorCode::ValueTooLarge));
    assert_eq!(c.get(b"ok1"), None, "MSET with a bad entry applies nothing");
    let r = c.call(Op::Mget(proto::MGetRequest {
        keys: vec![b(b"a"), long_key],
    }));
    assert_eq!(code(&r), Some(ErrorCode::KeyTooLarge));

    // Exactly at the limits is fine.
    assert!(c.set(b"12345678", &[9u8; 16]));
    healthy(&server);
}

// Goal: a client vanishing mid-frame is normal: no error log, others unaffected.
#[test]
fn client_vanishing_mid_frame() {
    let server = TestServer::start(&[]);
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let req = Request {
            id: 1,
            op: Some(Op::Set(proto::SetRequest {
                key: b(b"k"),
                value: b(&[0u8; 1000]),
                ..Default::default()
            })),
        };
        let frame = wire::frame(&req);
        s.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(s);
    }
    healthy(&server);
    assert!(!server.log_text().contains("ERROR"), "{}", server.log_text());
    assert!(!server.log_text().contains("WARN"), "{}", server.log_text());
}

// Goal: over the node memory limit, writes get OUT_OF_MEMORY while reads, deletes and
// shrinking writes keep working.
#[test]
fn memory_limit_refuses_writes_only() {
    let server = TestServer::start(&["--cores", "1", "--limits-memory-bytes-max", "200000"]);
    let mut c = server.connect();
    let value = vec![1u8; 1000];
    let mut stored = 0;
    let mut refused = None;
    for i in 0..1000 {
        let r = c.call(Op::Set(proto::SetRequest {
            key: b(format!("m{i}").as_bytes()),
            value: b(&value),
            ..Default::default()
        }));
        match code(&r) {
            None => stored += 1,
            Some(ErrorCode::OutOfMemory) => {
                refused = Some(i);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(refused.is_some(), "the limit was never reached");
    assert!(
        (150..=200).contains(&stored),
        "stored {stored} values of 1000 bytes under 200000"
    );
    assert_eq!(c.get(b"m0"), Some(value.clone()), "reads keep working");
    assert!(c.set(b"m1", b"small"), "a shrinking write is allowed");
    assert!(c.del(b"m2"));
    assert!(c.set(b"m2", &value), "room freed by delete is usable again");
    let stats = server.stats();
    assert!(stats[0].memory_bytes <= 200_000, "{stats:?}");
}

// Goal: past connections_per_core_max, new connections are closed at once and existing
// ones keep working.
#[test]
fn connection_limit() {
    let server = TestServer::start(&["--cores", "1", "--limits-connections-per-core-max", "3"]);
    let mut open: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for c in &mut open {
        assert!(c.set(b"k", b"v"));
    }
    let mut extra = TcpStream::connect(server.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(&wire::frame(&Request {
        id: 1,
        op: Some(Op::Ping(Default::default())),
    }));
    let mut buf = [0u8; 16];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "the extra connection must be closed"
    );
    assert!(open[0].exists(b"k"));
    drop(open.pop());
    // The freed slot is usable once the server has seen the close.
    assert!(common::eventually(Duration::from_secs(5), || {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&wire::frame(&Request {
            id: 9,
            op: Some(Op::Ping(Default::default())),
        }))
        .is_ok()
            && s.read(&mut buf).map(|n| n > 0).unwrap_or(false)
    }));
}

// Goal: an MGET whose reply would exceed the frame limit is refused with a clear error and
// the connection stays usable.
#[test]
fn oversized_mget_reply_is_refused() {
    let server = TestServer::start(&["--limits-frame-bytes-max", "4096", "--limits-value-bytes-max", "2048"]);
    let mut c = server.connect();
    c.set(b"v", &[0u8; 2000]);
    let r = c.call(Op::Mget(proto::MGetRequest {
        keys: vec![b(b"v"), b(b"v"), b(b"v")],
    }));
    assert_eq!(code(&r), Some(ErrorCode::FrameTooLarge));
    let r = c.call(Op::Mget(proto::MGetRequest { keys: vec![b(b"v")] }));
    assert!(matches!(r.result, Some(R::Mget(_))));
}

// Goal: configuration errors stop the start with a message naming the setting, and a
// busy port is refused instead of silently shared.
#[test]
fn start_up_errors_are_clear() {
    let bin = env!("CARGO_BIN_EXE_flux-server");
    let out = std::process::Command::new(bin)
        .args(["--shards", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shards"));

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on") && err.contains(&addr), "{err}");
}

// Goal: --print-config shows the effective layered config as TOML.
#[test]
fn print_config_shows_layers() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-server"))
        .args(["--print-config", "--limits-key-bytes-max", "100"])
        .env("FLUX_SHARDS", "512")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let config: flux_kv::config::Config = toml::from_str(&text).unwrap();
    assert_eq!((config.shards, config.limits.key_bytes_max), (512, 100));
    assert_eq!(config.listen, "127.0.0.1:7379");
}
