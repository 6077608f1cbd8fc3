//! Eviction against the real binary, with change capture to a real RabbitMQ on
//! 127.0.0.1:5672 (scripts/test.sh starts one).
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::cdc::{tail, unique};
use common::{b, code, TestServer};
use flux_kv::proto::{self, request::Op};
use flux_kv::wire;

const LIMIT_BYTES: u64 = 64 << 20;
const VALUE_BYTES: usize = 4 << 10;
/// 200 MB of values: about three times the limit.
const KEYS: usize = 200_000_000 / VALUE_BYTES;
/// Keys 0..HOT are read again every READ_EVERY writes; HOT..2*HOT, written alongside them,
/// never are.
const HOT: usize = 1_000;
const READ_EVERY: usize = 1_000;
const PIPELINE: usize = 100;

fn key(i: usize) -> Vec<u8> {
    format!("key_{i}").into_bytes()
}

/// Sends `ops` pipelined and returns the replies in order.
fn pipelined(c: &mut common::Client, ops: impl Iterator<Item = Op>) -> Vec<proto::Response> {
    let mut bytes = Vec::new();
    let mut n = 0;
    for op in ops {
        wire::put_frame(&c.request(op), &mut bytes);
        n += 1;
    }
    c.send_raw(&bytes);
    (0..n).map(|_| c.recv().expect("a reply")).collect()
}

fn memory_bytes(server: &TestServer) -> u64 {
    server.stats().iter().map(|c| c.memory_bytes).sum()
}

// Goal: with limits.memory_bytes_max = 64 MiB, limits.eviction = lru and 200 MB written,
// no write is refused and memory_bytes never exceeds the limit; keys read recently survive
// far more often than keys written with them and never read; every key that is gone has an
// EVICTED event on the stream and every EVICTED event names a key that is gone, as many as
// Stats counts; and after a restart the evicted keys are still gone.
#[test]
fn lru_eviction_holds_the_limit_and_tells_the_stream() {
    let exchange = unique("test.evict");
    let mut consumer = tail(&["--exchange", &exchange, "--json", "--idle-timeout", "3s"]);
    // Read the stream while writing: 200 MB of events must not wait in a pipe. Only the
    // short lines (no value) are parsed.
    let stdout = consumer.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut sets, mut evicted) = (0usize, Vec::new());
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(r#""op":"SET""#) {
                sets += 1;
            } else {
                let e: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(e["op"], "EVICTED", "only writes and evictions happen: {line}");
                evicted.push(e["key"].as_str().unwrap().to_string());
            }
        }
        (sets, evicted)
    });
    let dir = tempfile::tempdir().unwrap();
    let limit = LIMIT_BYTES.to_string();
    let args = [
        "--cores",
        "2",
        "--limits-memory-bytes-max",
        &limit,
        "--limits-eviction",
        "lru",
        "--cdc-enabled",
        "true",
        "--cdc-exchange",
        &exchange,
    ];
    let server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    let value = b(&vec![b'v'; VALUE_BYTES]);
    let mut peak = 0;
    for start in (0..KEYS).step_by(PIPELINE) {
        let sets = (start..(start + PIPELINE).min(KEYS)).map(|i| {
            Op::Set(proto::SetRequest {
                key: b(&key(i)),
                value: value.clone(),
                ..Default::default()
            })
        });
        for r in pipelined(&mut c, sets) {
            assert!(code(&r).is_none(), "write refused at key {start}: {r:?}");
        }
        if start % READ_EVERY == 0 && start >= 2 * HOT {
            let gets = (0..HOT).map(|i| Op::Get(proto::GetRequest { key: b(&key(i)) }));
            for r in pipelined(&mut c, gets) {
                assert!(code(&r).is_none(), "{r:?}");
            }
        }
        if start % (20 * PIPELINE) == 0 {
            peak = peak.max(memory_bytes(&server));
        }
    }
    let stats = server.stats();
    let evictions: u64 = stats.iter().map(|c| c.keys_evicted).sum();
    let held: u64 = stats.iter().map(|c| c.keys).sum();
    peak = peak.max(memory_bytes(&server));
    assert!(peak <= LIMIT_BYTES, "memory_bytes reached {peak}");
    assert!(peak > LIMIT_BYTES * 9 / 10, "the limit was used: {peak}");
    assert_eq!(held + evictions, KEYS as u64, "every key is held or was evicted");
    // At the limit with eviction on the node is ready, and metrics count the evictions.
    let metrics = server.metrics.expect("metrics endpoint");
    assert_eq!(common::http_get(metrics, "/readyz").0, 200);
    let (_, text) = common::http_get(metrics, "/metrics");
    let exported: u64 = text
        .lines()
        .filter(|l| l.starts_with("flux_core_evicted_keys_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(exported, evictions);
    assert!(text.contains("flux_eviction_enabled 1"));

    let present = |c: &mut common::Client, range: std::ops::Range<usize>| -> HashSet<usize> {
        let ops = range
            .clone()
            .map(|i| Op::Exists(proto::ExistsRequest { key: b(&key(i)) }));
        let replies = pipelined(c, ops);
        range
            .zip(replies)
            .filter(|(_, r)| matches!(&r.result, Some(proto::response::Result::Exists(e)) if e.exists))
            .map(|(i, _)| i)
            .collect()
    };
    let gone: HashSet<usize> = {
        let mut gone = HashSet::new();
        for start in (0..KEYS).step_by(10_000) {
            let range = start..(start + 10_000).min(KEYS);
            let here = present(&mut c, range.clone());
            gone.extend(range.filter(|i| !here.contains(i)));
        }
        gone
    };
    assert_eq!(gone.len() as u64, evictions);
    let hot_kept = (0..HOT).filter(|i| !gone.contains(i)).count();
    let cold_kept = (HOT..2 * HOT).filter(|i| !gone.contains(i)).count();
    eprintln!("kept: {hot_kept} of {HOT} keys read again, {cold_kept} of {HOT} never read");
    assert!(hot_kept >= HOT * 9 / 10, "read keys kept: {hot_kept}");
    assert!(cold_kept <= HOT / 10, "unread keys kept: {cold_kept}");

    // The stream: every write, and one EVICTED event for each key that is gone.
    let confirmed = common::eventually(Duration::from_secs(60), || {
        let cdc = server.stats_response().cdc.unwrap_or_default();
        cdc.events_published >= KEYS as u64 + evictions
    });
    assert!(confirmed, "the broker confirmed every change");
    let out = consumer.wait_with_output().unwrap();
    assert!(out.status.success(), "flux-cdc-tail saw gaps or conflicts");
    let (sets, evicted) = reader.join().unwrap();
    assert_eq!(sets, KEYS);
    let evicted_keys: HashSet<usize> = evicted
        .iter()
        .map(|k| k.strip_prefix("key_").unwrap().parse().unwrap())
        .collect();
    assert_eq!(evicted.len(), evicted_keys.len(), "one EVICTED event per key");
    assert_eq!(evicted_keys, gone, "the stream names exactly the keys that are gone");

    // The log holds the evictions: after a restart the same keys are gone.
    drop(c);
    let mut server = server;
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    drop(server);
    let server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    let sample: Vec<usize> = gone.iter().copied().take(2_000).collect();
    let back = sample
        .iter()
        .filter(|&&i| present(&mut c, i..i + 1).contains(&i))
        .count();
    assert_eq!(back, 0, "evicted keys came back after a restart");
    assert_eq!(server.stats().iter().map(|c| c.keys).sum::<u64>(), held);
}
