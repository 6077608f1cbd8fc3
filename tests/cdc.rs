//! Change data capture against a real RabbitMQ on 127.0.0.1:5672 (scripts/test.sh starts
//! one). Every test uses its own exchange, and flux-cdc-tail binds its own queue.
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::cdc::{tail, tail_json, unique, write_keys, Proxy};
use common::{b, code, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R};
use flux_kv::wire;

// Goal: 100,000 writes across all shards of 2 cores arrive on the exchange; after dedupe
// every per-shard seq is present exactly once (1..n, no gap) and the writes to each key
// arrive in the order they were applied.
#[test]
fn hundred_thousand_writes_arrive_complete_and_in_order() {
    let exchange = unique("test.cdc");
    let tail = tail_json(&exchange, 100000, "30s");
    let server = TestServer::start(&["--cores", "2", "--cdc-enabled", "true", "--cdc-exchange", &exchange]);

    // 50,000 keys written twice: v1 then v2, pipelined on two connections.
    let keys = 50_000;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let mut c = server.connect();
            std::thread::spawn(move || {
                for round in ["v1", "v2"] {
                    let mut bytes = Vec::new();
                    let mut n = 0;
                    for i in (w..keys).step_by(2) {
                        let op = Op::Set(proto::SetRequest {
                            key: b(format!("k{i}").as_bytes()),
                            value: b(round.as_bytes()),
                            ..Default::default()
                        });
                        wire::put_frame(&c.request(op), &mut bytes);
                        n += 1;
                    }
                    c.send_raw(&bytes);
                    for _ in 0..n {
                        assert!(code(&c.recv().unwrap()).is_none());
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }

    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success(), "flux-cdc-tail reported gaps or failed");
    let mut per_shard: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["op"], "SET");
        per_shard
            .entry(e["shard"].as_u64().unwrap())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
        per_key
            .entry(e["key"].as_str().unwrap().to_string())
            .or_default()
            .push(e["value"].as_str().unwrap().into());
    }
    assert_eq!(per_shard.values().map(Vec::len).sum::<usize>(), 100_000);
    assert!(per_shard.len() > 200, "writes should cover (nearly) all 256 shards");
    for (shard, seqs) in &per_shard {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &expected, "shard {shard}: seqs out of order or missing");
    }
    assert_eq!(per_key.len(), keys);
    for (key, values) in &per_key {
        assert_eq!(values, &["v1", "v2"], "key {key}");
    }
    // The broker confirmed them all, and Stats says so.
    assert!(common::eventually(Duration::from_secs(10), || {
        let mut c = server.connect();
        match c.call(Op::Stats(proto::StatsRequest {})).result {
            Some(R::Stats(s)) => s
                .cdc
                .is_some_and(|c| c.enabled && c.connected && c.events_published == 100_000),
            _ => false,
        }
    }));
}

// Goal: every kind of change is captured with the documented fields: SET with its value
// and expiry, EXPIRE (and PERSIST as EXPIRE with 0), DEL, and EXPIRED when a TTL passes
// without any read.
#[test]
fn every_kind_of_change_is_captured() {
    let exchange = unique("test.cdc.kinds");
    let tail = tail_json(&exchange, 6, "20s");
    let server = TestServer::start(&["--cores", "1", "--cdc-enabled", "true", "--cdc-exchange", &exchange]);
    let mut c = server.connect();
    c.set(b"a", b"1");
    assert!(c.expire(b"a", 60_000));
    assert!(c.expire(b"a", 0));
    assert!(c.del(b"a"));
    c.set_with(b"t", b"2", 100, proto::SetCondition::Always);
    // Nobody reads "t": the sweep removes it and says so.
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Order is promised per key (shard), not across keys.
    let of = |key: &str| -> Vec<&serde_json::Value> { events.iter().filter(|e| e["key"] == key).collect() };
    let ops = |evs: &[&serde_json::Value]| -> Vec<String> {
        evs.iter().map(|e| e["op"].as_str().unwrap().to_string()).collect()
    };
    let (a, t) = (of("a"), of("t"));
    assert_eq!(ops(&a), ["SET", "EXPIRE", "EXPIRE", "DEL"]);
    assert_eq!(ops(&t), ["SET", "EXPIRED"]);
    assert_eq!(a[0]["value"], "1");
    assert!(a[1]["expire_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(a[2]["expire_at_ms"], 0, "PERSIST is EXPIRE with expire_at_ms 0");
    assert!(t[0]["expire_at_ms"].as_u64().unwrap() > 0);
    let node_id = &events[0]["node_id"];
    assert!(events
        .iter()
        .all(|e| &e["node_id"] == node_id && e["timestamp_ms"].as_u64().unwrap() > 0));
}

// Goal: the JSON compatibility mode publishes exactly the old service's message shape to
// the fanout exchange flux_kv_events: {"type":0,"key":..,"value":..} and value null on DEL.
#[test]
fn json_compatibility_mode() {
    let tail = tail(&["--format", "json", "--idle-timeout", "3s"]);
    let server = TestServer::start(&["--cores", "1", "--cdc-enabled", "true", "--cdc-format", "json"]);
    let key = unique("json-key");
    let mut c = server.connect();
    c.set(key.as_bytes(), b"hello \"quoted\"");
    assert!(c.del(key.as_bytes()));
    let out = tail.wait_with_output().unwrap();
    // Other tests may share flux_kv_events; keep this test's messages.
    let mine: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&key))
        .map(String::from)
        .collect();
    assert_eq!(
        mine,
        [
            format!(r#"{{"type":0,"key":"{key}","value":"hello \"quoted\""}}"#),
            format!(r#"{{"type":1,"key":"{key}","value":null}}"#),
        ]
    );
}

// Goal: the broker connection is cut for several seconds in the middle of a write load:
// the write path keeps serving during the cut, events beyond the in-memory window stay in
// the write-ahead log and are read back from it, and afterwards every event arrives, with
// no per-shard gap (duplicates from republishing are allowed and dropped by seq) and the
// log holds nothing unconfirmed any more.
#[test]
fn broker_outage_loses_nothing() {
    let exchange = unique("test.cdc.outage");
    let proxy = Proxy::start(false);
    let total = 30_000;
    let tail = tail_json(&exchange, total, "30s");
    let server = TestServer::start(&[
        "--cores",
        "2",
        "--cdc-enabled",
        "true",
        "--cdc-exchange",
        &exchange,
        "--cdc-amqp-url",
        &proxy.url(),
        "--cdc-reconnect-delay-max-ms",
        "500",
        // A small in-memory window, queue and short batches, so the cut overflows memory
        // and events are read back from the log.
        "--cdc-confirms-pending-max",
        "16",
        "--cdc-queue-bytes-max",
        "65536",
        "--cdc-batch-delay-ms",
        "5",
    ]);
    // The cut must interrupt an established connection, not the first handshake.
    assert!(
        common::eventually(Duration::from_secs(10), || server
            .stats_response()
            .cdc
            .unwrap()
            .connected),
        "never connected to the broker through the proxy"
    );
    let mut c = server.connect();
    write_keys(&mut c, "before", 0..10_000);
    proxy.cut();
    let cut_at = std::time::Instant::now();
    write_keys(&mut c, "during", 0..10_000);
    let during = cut_at.elapsed();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(during));
    assert!(
        during < Duration::from_secs(3),
        "writes stalled while the broker was away: {during:?}"
    );
    let cdc = server.stats_response().cdc.unwrap();
    assert!(!cdc.connected, "the cut was not noticed");
    assert!(
        cdc.retained_bytes > 0,
        "the log should hold the unconfirmed changes: {cdc:?}"
    );
    // Every "during" change was applied at most `during` after the cut, 3 s ago.
    let waited_at_least = Duration::from_secs(3).saturating_sub(during).as_millis() as u64;
    assert!(
        cdc.oldest_unconfirmed_age_ms >= waited_at_least && cdc.oldest_unconfirmed_age_ms < 60_000,
        "the oldest unconfirmed change waits since the cut: {cdc:?}, at least {waited_at_least} ms"
    );
    proxy.restore();
    write_keys(&mut c, "after", 0..10_000);

    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success(), "gaps in the change stream");
    let lines = String::from_utf8(out.stdout).unwrap();
    assert_eq!(lines.lines().count(), total);
    for prefix in ["before", "during", "after"] {
        assert_eq!(
            lines.matches(&format!("\"key\":\"{prefix}")).count(),
            10_000,
            "{prefix}"
        );
    }
    let cdc = server.stats_response().cdc.unwrap();
    assert!(cdc.reconnects >= 1 && cdc.connected, "{cdc:?}");
    assert!(
        cdc.events_from_log > 0,
        "memory overflowed, so events came from the log: {cdc:?}"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || server
            .stats_response()
            .cdc
            .unwrap()
            .retained_bytes
            == 0),
        "nothing unconfirmed may stay in the log once everything is confirmed"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || server
            .stats_response()
            .cdc
            .unwrap()
            .oldest_unconfirmed_age_ms
            == 0),
        "with everything confirmed, no change waits"
    );
}

// Goal: a broker that is absent when the server starts and appears later: the server serves
// meanwhile, and the events written before the broker came are delivered once it does.
#[test]
fn broker_absent_at_start() {
    let exchange = unique("test.cdc.absent");
    let proxy = Proxy::start(true);
    let tail = tail_json(&exchange, 5000, "30s");
    let server = TestServer::start(&[
        "--cdc-enabled",
        "true",
        "--cdc-exchange",
        &exchange,
        "--cdc-amqp-url",
        &proxy.url(),
        "--cdc-reconnect-delay-max-ms",
        "300",
    ]);
    let mut c = server.connect();
    write_keys(&mut c, "early", 0..5_000);
    let cdc = server.stats_response().cdc.unwrap();
    assert!(!cdc.connected && cdc.events_published == 0, "{cdc:?}");
    proxy.restore();
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 5_000);
}

// Goal: with persistence on, the per-shard seq continues across a restart, so the change
// stream stays gap-free and consumers do not mistake new events for duplicates.
#[test]
fn seq_continues_across_restart() {
    let exchange = unique("test.cdc.restart");
    let tail = tail_json(&exchange, 20, "20s");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "1", "--cdc-enabled", "true", "--cdc-exchange", &exchange];
    for round in 0..2 {
        let mut server = TestServer::start_in(dir.path(), &args);
        let mut c = server.connect();
        for i in 0..10 {
            assert!(c.set(b"same-key", format!("{round}-{i}").as_bytes()));
        }
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(10)).unwrap().success());
    }
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success(), "gaps in the stream");
    let seqs: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
}
