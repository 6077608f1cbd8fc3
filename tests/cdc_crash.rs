//! Change capture across crashes, restarts and outages, against a real RabbitMQ on
//! 127.0.0.1:5672 (scripts/test.sh starts one); the broker is cut with a TCP proxy. The
//! guarantee under test: every change the log holds has one identity (node_id, shard, seq)
//! and reaches the exchange at least once, in per-shard seq order; an identity never names
//! two changes. flux-cdc-tail checks order and gaps per shard, and with
//! `--verify-duplicates` that a duplicate carries the same content as the first copy.
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::cdc::{unique, write_keys, Proxy, Tail, Tailed};
use common::{b, code, eventually, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R, Request, Response};
use flux_kv::wire;
use prost::Message;

/// Server arguments for change capture through `proxy` to `exchange`.
fn cdc_args<'a>(exchange: &'a str, proxy: &'a str, cores: &'a str, fsync: &'a str) -> Vec<&'a str> {
    vec![
        "--cores",
        cores,
        "--cdc-enabled",
        "true",
        "--cdc-exchange",
        exchange,
        "--cdc-amqp-url",
        proxy,
        "--cdc-reconnect-delay-max-ms",
        "200",
        "--persistence-fsync",
        fsync,
    ]
}

/// A consumer of `exchange` that checks duplicates and exits `idle` after the last event.
fn consumer(exchange: &str, idle: &str) -> Tail {
    Tail::start(&[
        "--exchange",
        exchange,
        "--json",
        "--verify-duplicates",
        "--idle-timeout",
        idle,
    ])
}

/// Key -> value of the last SET event of each key (events arrive deduplicated).
fn last_values(t: &Tailed) -> HashMap<String, String> {
    t.events
        .iter()
        .filter(|e| e["op"] == "SET")
        .map(|e| (e["key"].as_str().unwrap().into(), e["value"].as_str().unwrap().into()))
        .collect()
}

/// Binds a consumer, lets the broker back in, and returns what arrived (gap-free, no
/// identity with two contents).
fn restore_and_consume(exchange: &str, proxy: &Proxy) -> Tailed {
    let tail = consumer(exchange, "4s");
    proxy.restore();
    let got = tail.finish();
    assert!(got.success, "gaps or conflicts in the stream:\n{}", got.stderr);
    got
}

/// How many of the keys `<prefix>0 .. <prefix><n-1>` arrived as SET.
fn arrived(got: &Tailed, prefix: &str, n: usize) -> usize {
    let values = last_values(got);
    (0..n).filter(|i| values.contains_key(&format!("{prefix}{i}"))).count()
}

/// One request of a load: the op and a key it names (to remember what was acknowledged).
type Load = Vec<(Op, String, String)>;

/// Sends `load` pipelined in chunks of 200 on one connection until the server dies (or all
/// is answered); `acked` counts acknowledged requests. Returns the (key, value) of each
/// acknowledged request, in order.
fn send_until_dead(addr: std::net::SocketAddr, load: Load, acked: Arc<AtomicUsize>) -> Vec<(String, String)> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut done = Vec::new();
    let mut input = BytesMut::new();
    let mut id = 0u64;
    for chunk in load.chunks(200) {
        let mut bytes = Vec::new();
        for (op, _, _) in chunk {
            id += 1;
            wire::put_frame(
                &Request {
                    id,
                    op: Some(op.clone()),
                },
                &mut bytes,
            );
        }
        if stream.write_all(&bytes).is_err() {
            return done;
        }
        for (_, key, value) in chunk {
            let resp = loop {
                if let Some(payload) = wire::take_frame(&mut input, usize::MAX).unwrap() {
                    break Response::decode(payload).unwrap();
                }
                let mut buf = [0u8; 64 << 10];
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return done,
                    Ok(n) => input.extend_from_slice(&buf[..n]),
                }
            };
            assert!(code(&resp).is_none(), "write refused: {resp:?}");
            done.push((key.clone(), value.clone()));
            acked.fetch_add(1, Ordering::Relaxed);
        }
    }
    done
}

fn set(key: &str, value: &str) -> (Op, String, String) {
    let op = Op::Set(proto::SetRequest {
        key: b(key.as_bytes()),
        value: b(value.as_bytes()),
        ..Default::default()
    });
    (op, key.to_string(), value.to_string())
}

/// Runs `load` against `server` and kills it with SIGKILL once `kill_at` requests are
/// acknowledged (after `at_half`, run once half of them are). Returns what was acknowledged.
fn load_and_kill(
    server: &mut TestServer,
    load: Load,
    kill_at: usize,
    at_half: impl FnOnce(&TestServer),
) -> Vec<(String, String)> {
    let acked = Arc::new(AtomicUsize::new(0));
    let (addr, count) = (server.addr, acked.clone());
    let writer = std::thread::spawn(move || send_until_dead(addr, load, count));
    assert!(eventually(Duration::from_secs(30), || acked.load(Ordering::Relaxed) >= kill_at / 2));
    at_half(server);
    assert!(eventually(Duration::from_secs(30), || acked.load(Ordering::Relaxed) >= kill_at));
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).expect("killed");
    writer.join().unwrap()
}

/// Tests 1 and 2: kill -9 in the middle of pipelined writes (fsync = always), with the
/// broker cut from the start or reachable throughout, a snapshot round taken mid-load (its
/// compaction must keep what is unconfirmed), then a restart and some more writes.
fn crash_mid_load(broker_cut: bool) {
    let exchange = unique(if broker_cut { "test.crash.cut" } else { "test.crash.up" });
    let proxy = Proxy::start(broker_cut);
    let url = proxy.url();
    let mut args = cdc_args(&exchange, &url, "2", "always");
    args.extend(["--persistence-snapshot-log-bytes-min", "65536"]);
    // Reachable: the consumer is bound before anything is published.
    let early = (!broker_cut).then(|| consumer(&exchange, "8s"));
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), &args);
    let load: Load = (0..20_000).map(|i| set(&format!("k{i}"), &format!("v{i}"))).collect();
    let acked = load_and_kill(&mut server, load, 12_000, |s| {
        let r = s.connect().call(Op::Snapshot(proto::SnapshotRequest {}));
        assert!(code(&r).is_none(), "snapshot: {r:?}");
    });
    drop(server);

    let server = TestServer::start_in(dir.path(), &args);
    let tail = early.unwrap_or_else(|| consumer(&exchange, "4s"));
    proxy.restore();
    // New changes after the restart continue each shard's seq: a reused seq would show
    // as a conflict (same identity, other content).
    let mut c = server.connect();
    write_keys(&mut c, "after", 0..500);
    let got = tail.finish();
    assert!(got.success, "gaps or conflicts in the stream:\n{}", got.stderr);
    assert_eq!(got.summary("conflicts"), 0);
    let values = last_values(&got);
    for (key, value) in &acked {
        assert_eq!(
            values.get(key),
            Some(value),
            "acknowledged write of {key} never arrived"
        );
    }
    assert!(acked.len() >= 12_000);
    assert_eq!(
        (0..500).filter(|i| values.contains_key(&format!("after{i}"))).count(),
        500
    );
    if broker_cut {
        // Nothing was confirmed before the crash: all of it came back from the log.
        let cdc = server.stats_response().cdc.unwrap();
        assert!(
            cdc.events_from_log >= acked.len() as u64,
            "the restart must read back from the log: {cdc:?}"
        );
    }
}

// Goal (test 1): kill -9 mid-load while the broker is cut; after a restart and the broker's
// return, every acknowledged write's event arrives, gap-free per shard, no identity twice
// with different content, and compaction kept every unconfirmed change.
#[test]
fn kill9_with_broker_cut_delivers_every_acknowledged_write() {
    crash_mid_load(true);
}

// Goal (test 2): the same with the broker reachable throughout (events published before
// the crash are not published under another identity after it).
#[test]
fn kill9_with_broker_up_delivers_every_acknowledged_write() {
    crash_mid_load(false);
}

// Goal (test 3): SIGTERM while the broker is cut: the node stops (it does not wait for the
// broker for ever) and the events arrive after a restart.
#[test]
fn sigterm_with_broker_cut_delivers_after_restart() {
    let exchange = unique("test.sigterm.cut");
    let proxy = Proxy::start(true);
    let url = proxy.url();
    let args = cdc_args(&exchange, &url, "2", "everysec");
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), &args);
    write_keys(&mut server.connect(), "term", 0..5_000);
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("stops while the broker is away");
    assert!(status.success(), "{}", server.log_text());
    drop(server);
    let _server = TestServer::start_in(dir.path(), &args);
    let got = restore_and_consume(&exchange, &proxy);
    assert_eq!(arrived(&got, "term", 5_000), 5_000);
}

// Goal (test 4): a consumer that applies the stream (deduplicating by identity) ends with
// exactly the key space the node serves after kill -9 and a restart under fsync = everysec
// (writes acknowledged but not yet logged are gone from both), compared key by key.
#[test]
fn mirror_matches_the_node_after_a_crash() {
    let exchange = unique("test.mirror");
    let proxy = Proxy::start(false);
    let url = proxy.url();
    let args = cdc_args(&exchange, &url, "2", "everysec");
    let tail = consumer(&exchange, "6s");
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), &args);
    let keys = 1_000;
    let mut rng = fastrand::Rng::with_seed(7);
    let load: Load = (0..40_000)
        .map(|i| {
            let key = format!("m{}", rng.usize(..keys));
            let k = b(key.as_bytes());
            let op = match rng.u8(..10) {
                0 => Op::Del(proto::DelRequest { key: k }),
                1 => Op::Expire(proto::ExpireRequest {
                    key: k,
                    ttl_ms: 600_000,
                }),
                2 => Op::Expire(proto::ExpireRequest { key: k, ttl_ms: 0 }),
                _ => Op::Set(proto::SetRequest {
                    key: k,
                    value: b(format!("{i}").as_bytes()),
                    ..Default::default()
                }),
            };
            (op, key, String::new())
        })
        .collect();
    load_and_kill(&mut server, load, 25_000, |_| {});
    drop(server);
    let server = TestServer::start_in(dir.path(), &args);
    let got = tail.finish();
    assert!(got.success, "{}", got.stderr);

    let mut mirror: HashMap<String, String> = HashMap::new();
    for e in &got.events {
        let key = e["key"].as_str().unwrap().to_string();
        match e["op"].as_str().unwrap() {
            "SET" => {
                mirror.insert(key, e["value"].as_str().unwrap().into());
            }
            "DEL" | "EXPIRED" => {
                mirror.remove(&key);
            }
            _ => {}
        }
    }
    let names: Vec<String> = (0..keys).map(|i| format!("m{i}")).collect();
    let op = Op::Mget(proto::MGetRequest {
        keys: names.iter().map(|k| b(k.as_bytes())).collect(),
    });
    let Some(R::Mget(m)) = server.connect().call(op).result else {
        panic!("mget")
    };
    let mut differ = Vec::new();
    for (name, v) in names.iter().zip(&m.values) {
        let node = v.found.then(|| String::from_utf8(v.value.to_vec()).unwrap());
        if node.as_ref() != mirror.get(name) {
            differ.push((name, node, mirror.get(name).cloned()));
        }
    }
    assert!(
        differ.is_empty(),
        "mirror differs from the node: {:?}",
        &differ[..differ.len().min(10)]
    );
    assert!(!mirror.is_empty());
}

// Goal (test 5): keys whose TTL passes while the node is down come out as EXPIRED events
// after the restart (and read as gone).
#[test]
fn keys_expired_while_down_are_published() {
    let exchange = unique("test.expired.down");
    let proxy = Proxy::start(false);
    let url = proxy.url();
    let args = cdc_args(&exchange, &url, "2", "everysec");
    let tail = Tail::start(&[
        "--exchange",
        &exchange,
        "--json",
        "--count",
        "150",
        "--idle-timeout",
        "20s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    let set_at = std::time::Instant::now();
    for i in 0..50 {
        c.set_with(format!("ttl{i}").as_bytes(), b"x", 1_500, proto::SetCondition::Always);
        c.set(format!("keep{i}").as_bytes(), b"y");
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).unwrap().success());
    drop(server);
    std::thread::sleep(Duration::from_millis(1_600).saturating_sub(set_at.elapsed()));
    let server = TestServer::start_in(dir.path(), &args);
    let got = tail.finish();
    assert!(got.success, "{}", got.stderr);
    let expired: HashSet<&str> = got
        .events
        .iter()
        .filter(|e| e["op"] == "EXPIRED")
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    let want: HashSet<String> = (0..50).map(|i| format!("ttl{i}")).collect();
    assert_eq!(expired, want.iter().map(String::as_str).collect());
    let mut c = server.connect();
    assert_eq!(c.get(b"ttl0"), None);
    assert_eq!(c.get(b"keep0"), Some(b"y".to_vec()));
}

// Goal (test 6): undelivered events written by 2 cores, a crash, and a restart with 1 core:
// all are delivered, in order per shard.
#[test]
fn two_cores_to_one_across_a_crash() {
    let exchange = unique("test.cores.2to1");
    let proxy = Proxy::start(true);
    let url = proxy.url();
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), &cdc_args(&exchange, &url, "2", "always"));
    write_keys(&mut server.connect(), "c", 0..10_000);
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).unwrap();
    drop(server);
    let server = TestServer::start_in(dir.path(), &cdc_args(&exchange, &url, "1", "always"));
    let got = restore_and_consume(&exchange, &proxy);
    assert_eq!(arrived(&got, "c", 10_000), 10_000);
    // Order per shard: flux-cdc-tail reports any seq that skips ahead as a gap; none did,
    // and each shard's seqs arrived as 1, 2, 3, ...
    let mut per_shard: HashMap<u64, Vec<u64>> = HashMap::new();
    for e in &got.events {
        per_shard
            .entry(e["shard"].as_u64().unwrap())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    for (shard, seqs) in per_shard {
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "shard {shard}: {seqs:?}");
    }
    assert_eq!(server.stats().len(), 1);
}

/// Writes `n` 1 KiB values pipelined from a thread while the broker is cut; returns the
/// thread and the count of acknowledged writes.
fn writer_1k(server: &TestServer, n: usize) -> (std::thread::JoinHandle<Vec<(String, String)>>, Arc<AtomicUsize>) {
    let value = "x".repeat(1024);
    let load: Load = (0..n).map(|i| set(&format!("r{i}"), &value)).collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let (addr, count) = (server.addr, acked.clone());
    (std::thread::spawn(move || send_until_dead(addr, load, count)), acked)
}

/// A 2-core node whose broker is cut from the start, with a 1 MiB retention bound and
/// `overflow`: (exchange, proxy, data dir, server).
fn at_retention_bound(overflow: &str) -> (String, Proxy, tempfile::TempDir, TestServer) {
    let exchange = unique(&format!("test.retention.{overflow}"));
    let proxy = Proxy::start(true);
    let url = proxy.url();
    let mut args = cdc_args(&exchange, &url, "2", "everysec");
    args.extend(["--cdc-retention-bytes-max", "1048576", "--cdc-overflow", overflow]);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &args);
    (exchange, proxy, dir, server)
}

// Goal (test 7, block): with the log holding cdc.retention_bytes_max of unconfirmed changes,
// writers wait while reads and Stats go on; once the broker is back everything arrives.
#[test]
fn retention_bound_blocks_writers_only() {
    let (exchange, proxy, _dir, server) = at_retention_bound("block");
    let mut reader = server.connect();
    reader.set(b"readable", b"yes");
    let n = 4_000;
    let (writer, acked) = writer_1k(&server, n);
    assert!(
        eventually(Duration::from_secs(20), || server
            .stats_response()
            .cdc
            .unwrap()
            .writers_held),
        "writers were never held"
    );
    let held_at = acked.load(Ordering::Relaxed);
    assert!(held_at < n, "every write went through: retention was not enforced");
    let started = std::time::Instant::now();
    assert_eq!(reader.get(b"readable"), Some(b"yes".to_vec()));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a read waited behind held writers"
    );
    let cdc = server.stats_response().cdc.unwrap();
    assert!(cdc.retained_bytes >= 1 << 20, "{cdc:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(acked.load(Ordering::Relaxed) < n, "writes went on while held");

    let tail = consumer(&exchange, "4s");
    proxy.restore();
    let done = writer.join().unwrap();
    assert_eq!(done.len(), n);
    let got = tail.finish();
    assert!(got.success, "{}", got.stderr);
    let values = last_values(&got);
    assert_eq!((0..n).filter(|i| values.contains_key(&format!("r{i}"))).count(), n);
    assert!(!server.stats_response().cdc.unwrap().writers_held);
}

// Goal (test 7, drop): at the bound with `drop`, writers go on; the oldest unconfirmed
// changes are given up and counted, and consumers see the gap in seq; what is published
// plus what is counted is every change.
#[test]
fn retention_bound_drops_counted_with_a_visible_gap() {
    let (exchange, proxy, _dir, server) = at_retention_bound("drop");
    let n = 4_000;
    let (writer, _) = writer_1k(&server, n);
    assert_eq!(writer.join().unwrap().len(), n, "writers must not wait under drop");
    assert!(
        eventually(Duration::from_secs(10), || server
            .stats_response()
            .cdc
            .unwrap()
            .events_dropped
            > 0),
        "nothing was dropped: {:?}",
        server.stats_response().cdc
    );
    let tail = consumer(&exchange, "4s");
    proxy.restore();
    let got = tail.finish();
    assert!(
        !got.success && got.summary("gaps") > 0,
        "the drop must show as a gap: {}\nstats: {:?}\nserver log:\n{}",
        got.stderr,
        server.stats_response().cdc,
        server.log_text()
    );
    assert_eq!(got.summary("conflicts"), 0);
    // Only the oldest go: about the bound's worth of the newest changes is still published.
    assert!(got.summary("events") > 0, "every change was given up");
    let dropped = server.stats_response().cdc.unwrap().events_dropped;
    assert_eq!(
        got.summary("events") + dropped,
        n as u64,
        "published + dropped = written"
    );
    assert!(server.log_text().contains("giving up the oldest"), "the drop is logged");
}
