//! Pipelining, ordering, cross-core routing and backpressure, over real TCP.
mod common;

use std::io::Write;

use common::{b, Client, TestServer};
use flux_kv::keyspace::Keyspace;
use flux_kv::proto::{self, request::Op, response::Result as R};
use flux_kv::wire;

// Goal: 10,000 pipelined requests written in one go come back complete, in order, with
// matching ids, and each reply is right for its request.
#[test]
fn ten_thousand_pipelined_requests_in_order() {
    let server = TestServer::start(&["--cores", "2"]);
    let mut c = server.connect();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for i in 0..10_000u64 {
        let key = b(format!("p{}", i / 2).as_bytes());
        // Alternate SET k=i and GET k: each GET must see the SET just before it.
        let op = if i % 2 == 0 {
            Op::Set(proto::SetRequest {
                key,
                value: b(i.to_string().as_bytes()),
                ..Default::default()
            })
        } else {
            Op::Get(proto::GetRequest { key })
        };
        let req = c.request(op);
        wire::put_frame(&req, &mut bytes);
        expected.push(req.id);
    }
    // Write everything from another thread: a client that writes 10,000 requests before
    // reading anything is exactly what pipelining allows.
    let mut writer = c.stream.try_clone().unwrap();
    let w = std::thread::spawn(move || writer.write_all(&bytes).unwrap());
    for (n, id) in expected.iter().enumerate() {
        let r = c.recv().expect("response");
        assert_eq!(r.id, *id, "response {n} out of order");
        match r.result {
            Some(R::Set(s)) => assert!(s.applied),
            Some(R::Get(g)) => assert_eq!(g.value, (n as u64 - 1).to_string().as_bytes()),
            other => panic!("{other:?}"),
        }
    }
    w.join().unwrap();
}

// Goal: with 2 cores, keys owned by either core are reachable from connections on either
// core; Stats proves both cores accepted connections and both forwarded work. Each core's
// own port (core_port_base) places one connection on each core for certain; connections on
// the shared port land wherever the kernel puts them and must work the same.
#[test]
fn keys_of_both_cores_reachable_from_both_cores() {
    let base = common::free_port_pair();
    let server = TestServer::start(&["--cores", "2", "--shards", "256", "--core-port-base", &base.to_string()]);
    let ks = Keyspace::new(256, 2).unwrap();
    let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("route{i}").into_bytes()).collect();
    assert!(keys.iter().any(|k| ks.core_of(k) == 0) && keys.iter().any(|k| ks.core_of(k) == 1));

    let mut conns: Vec<Client> = server
        .core_ports
        .iter()
        .map(|p| Client::connect(([127, 0, 0, 1], *p).into()))
        .collect();
    conns.extend((0..8).map(|_| server.connect()));
    for (n, c) in conns.iter_mut().enumerate() {
        for k in &keys {
            assert!(c.set(k, format!("{n}").as_bytes()));
            assert_eq!(c.get(k), Some(format!("{n}").into_bytes()));
        }
    }
    let stats = server.stats();
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert!(s.connections_accepted > 0, "{stats:?}");
        assert!(
            s.forwarded_out > 0 && s.forwarded_in > 0,
            "core {} did not forward: {stats:?}",
            s.core
        );
        assert_eq!(s.keys, keys.iter().filter(|k| ks.core_of(k) == s.core).count() as u64);
    }
}

// Goal: with requests_in_flight_max = 1 the server still answers a deep pipeline
// completely and in order (it reads one request at a time instead of dropping any).
#[test]
fn tiny_in_flight_limit_keeps_every_request() {
    let server = TestServer::start(&["--limits-requests-in-flight-max", "1"]);
    let mut c = server.connect();
    let mut bytes = Vec::new();
    let ids: Vec<u64> = (0..500)
        .map(|i| {
            let req = c.request(Op::Ping(proto::PingRequest {
                payload: b(format!("{i}").as_bytes()),
            }));
            wire::put_frame(&req, &mut bytes);
            req.id
        })
        .collect();
    c.send_raw(&bytes);
    for (i, id) in ids.iter().enumerate() {
        let r = c.recv().unwrap();
        assert_eq!(r.id, *id);
        assert!(matches!(r.result, Some(R::Ping(ref p)) if p.payload == format!("{i}").as_bytes()));
    }
}

// Goal: a client that writes without reading is held back by TCP (the server stops reading
// from it) instead of the server buffering without bound; the server keeps serving others,
// and once the client reads, every reply arrives.
#[test]
fn slow_reader_gets_backpressure_not_drops() {
    let server = TestServer::start(&["--cores", "1"]);
    let mut slow = server.connect();
    let value = vec![7u8; 64 * 1024];
    slow.set(b"big", &value);
    // 2,000 GETs of 64 KiB = 128 MiB of replies: far more than socket buffers hold.
    let mut bytes = Vec::new();
    let ids: Vec<u64> = (0..2_000)
        .map(|_| {
            let req = slow.request(Op::Get(proto::GetRequest { key: b(b"big") }));
            wire::put_frame(&req, &mut bytes);
            req.id
        })
        .collect();
    let mut writer = slow.stream.try_clone().unwrap();
    let w = std::thread::spawn(move || writer.write_all(&bytes).unwrap());
    // Meanwhile another connection on the same core is served normally.
    let mut other = Client::connect(server.addr);
    for i in 0..100 {
        assert!(other.set(format!("o{i}").as_bytes(), b"v"));
    }
    for id in ids {
        let r = slow.recv().unwrap();
        assert_eq!(r.id, id);
        assert!(matches!(r.result, Some(R::Get(ref g)) if g.value.len() == value.len()));
    }
    w.join().unwrap();
}
