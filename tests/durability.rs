//! The write-ahead log: nothing acknowledged is lost across kill -9, restarts with another
//! core count, and damaged logs are handled as documented.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{b, code, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R};
use flux_kv::wire;

fn logs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

// Goal: with fsync = always, kill -9 in the middle of a pipelined write load: every write
// whose response the client received is there after the restart, with its value and (for
// the keys written with a TTL) a remaining TTL no longer than the one set.
#[test]
fn acknowledged_writes_survive_kill_9() {
    kill_9_mid_load(&["--cores", "2", "--persistence-fsync", "always"], 50_000);
}

// Goal: the same while snapshot rounds run all through a longer load (tiny threshold): log
// rotation, snapshot writes and log deletion never lose an acknowledged write, and the
// restart starts from the snapshots.
#[test]
fn acknowledged_writes_survive_kill_9_during_snapshots() {
    let log = kill_9_mid_load(
        &[
            "--cores",
            "2",
            "--persistence-fsync",
            "always",
            "--persistence-snapshot-log-bytes-min",
            "65536",
        ],
        200_000,
    );
    assert!(log.contains("snapshots=") && !log.contains("snapshots=0 "), "{log}");
}

/// Pipelines `total` SETs, kills the server with SIGKILL about halfway through the
/// acknowledgements, restarts it and checks every acknowledged write. Returns the restarted
/// server's log.
fn kill_9_mid_load(args: &[&str], total: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), args);
    let mut c = server.connect();
    let mut bytes = Vec::new();
    let mut ids = Vec::new();
    for i in 0..total {
        let ttl_ms = if i % 10 == 0 { 600_000 } else { 0 };
        let op = Op::Set(proto::SetRequest {
            key: b(format!("d{i}").as_bytes()),
            value: b(format!("v{i}").as_bytes()),
            ttl_ms,
            ..Default::default()
        });
        let req = c.request(op);
        wire::put_frame(&req, &mut bytes);
        ids.push(req.id);
    }
    let mut writer = c.stream.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    });
    // Read acknowledgements until about half are in, then kill the server mid-load.
    let mut acked = 0u64;
    while acked < total / 2 {
        let r = c.recv().expect("response");
        assert!(code(&r).is_none());
        assert_eq!(r.id, ids[acked as usize]);
        acked += 1;
    }
    server.signal(libc::SIGKILL);
    // Responses already on their way count as acknowledged too.
    while let Some(r) = c.recv() {
        if r.id != ids[acked as usize] || code(&r).is_some() {
            break;
        }
        acked += 1;
    }
    server.wait_exit(Duration::from_secs(5));
    let _ = w.join();
    assert!(acked < total, "the kill came too late to test anything");

    let server = TestServer::start_in(dir.path(), args);
    let mut c = server.connect();
    for i in 0..acked {
        let key = format!("d{i}");
        assert_eq!(
            c.get(key.as_bytes()),
            Some(format!("v{i}").into_bytes()),
            "acknowledged {key} lost"
        );
        if i % 10 == 0 {
            let ttl = c.ttl(key.as_bytes());
            assert!(ttl > 0 && ttl <= 600_000, "{key}: ttl {ttl}");
        }
    }
    let log = server.log_text();
    assert!(log.contains("recovered from snapshots and the write-ahead log"));
    log
}

/// Writes `n` keys, stops the server gracefully, and returns the directory.
fn write_then_stop(dir: &Path, cores: &str, n: usize) {
    let mut server = TestServer::start_in(dir, &["--cores", cores, "--shards", "64"]);
    let mut c = server.connect();
    for i in 0..n {
        assert!(c.set(format!("r{i}").as_bytes(), format!("{i}").as_bytes()));
    }
    assert!(c.del(b"r0"));
    c.set_with(b"gone", b"x", 1, proto::SetCondition::Always);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).unwrap().success());
}

fn check_all(server: &TestServer, n: usize) {
    let mut c = server.connect();
    assert_eq!(c.get(b"r0"), None, "a delete is replayed too");
    assert_eq!(c.get(b"gone"), None, "an expired key stays gone");
    for i in 1..n {
        assert_eq!(c.get(format!("r{i}").as_bytes()), Some(format!("{i}").into_bytes()));
    }
    let keys: u64 = server.stats().iter().map(|s| s.keys).sum();
    assert_eq!(keys, n as u64 - 1);
    let p = server.stats_response().persistence.unwrap();
    assert!(p.enabled && p.fsync == "everysec", "{p:?}");
    assert!(
        p.keys_recovered >= n as u64 - 1 && p.log_files_replayed >= 1 && p.log_bytes_replayed > 0,
        "{p:?}"
    );
}

// Goal: recovery does not depend on the core count: written with 2 cores, restarted with
// 1, then with 2 again, every key is found.
#[test]
fn restart_with_another_core_count() {
    let dir = tempfile::tempdir().unwrap();
    write_then_stop(dir.path(), "2", 2_000);
    let mut one = TestServer::start_in(dir.path(), &["--cores", "1", "--shards", "64"]);
    check_all(&one, 2_000);
    // Writes made with 1 core join the same history.
    assert!(one.connect().set(b"r1", b"1"));
    one.signal(libc::SIGTERM);
    one.wait_exit(Duration::from_secs(10));
    let two = TestServer::start_in(dir.path(), &["--cores", "2", "--shards", "64"]);
    check_all(&two, 2_000);
}

// Goal: a log cut in the middle of its last record (a crash mid-write) recovers everything
// before it, with a warning; a flipped byte in the middle refuses to start, naming the file
// and offset, and --repair starts by cutting the log there.
#[test]
fn damaged_logs() {
    let dir = tempfile::tempdir().unwrap();
    write_then_stop(dir.path(), "1", 500);
    let log = logs(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&log).unwrap().len();

    // Torn tail: cut 5 bytes off the last record.
    let torn = tempfile::tempdir().unwrap();
    common::copy_dir(dir.path(), torn.path());
    let torn_log = logs(torn.path()).pop().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn_log)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let server = TestServer::start_in(torn.path(), &["--cores", "1", "--shards", "64"]);
    assert!(
        server.log_text().contains("cutting the log at a damaged record"),
        "{}",
        server.log_text()
    );
    let mut c = server.connect();
    assert_eq!(c.get(b"r499"), Some(b"499".to_vec()));
    drop(server);

    // A flipped byte in the middle of the log.
    let mut data = std::fs::read(&log).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x5a;
    std::fs::write(&log, &data).unwrap();
    let (code, err) = TestServer::fail_in(dir.path(), &["--cores", "1", "--shards", "64"]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains(&log.display().to_string()) && err.contains("offset"),
        "{err}"
    );
    let repaired = TestServer::start_in(dir.path(), &["--cores", "1", "--shards", "64", "--repair"]);
    assert!(
        repaired.log_text().contains("cutting the log"),
        "{}",
        repaired.log_text()
    );
    let mut c = repaired.connect();
    assert_eq!(c.get(b"r1"), Some(b"1".to_vec()), "records before the damage are kept");
}

// Goal: values of any allowed size recover, up to the 8 MiB value limit (the old service
// lost its whole data set once one value passed 64 KB).
#[test]
fn values_of_any_allowed_size_recover() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "1", "--limits-value-bytes-max", "8388608"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let big = vec![0xabu8; 8 << 20];
    let mut c = server.connect();
    assert!(c.set(b"big", &big));
    let r = c.call(Op::Ping(proto::PingRequest::default()));
    assert!(matches!(r.result, Some(R::Ping(_))));
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10));
    let server = TestServer::start_in(dir.path(), &args);
    assert_eq!(server.connect().get(b"big"), Some(big));
}

/// Bytes on disk under the log and snapshot directories.
fn disk_bytes(dir: &Path) -> u64 {
    ["wal", "snapshots"]
        .iter()
        .filter(|d| dir.join(d).exists())
        .flat_map(|d| common::walk(&dir.join(d)))
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

fn files_in(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    common::walk(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect()
}

fn mset(c: &mut common::Client, entries: Vec<(Vec<u8>, Vec<u8>)>) {
    let entries = entries
        .into_iter()
        .map(|(k, v)| proto::KeyValue {
            key: b(&k),
            value: b(&v),
        })
        .collect();
    let r = c.call(Op::Mset(proto::MSetRequest { entries }));
    assert!(code(&r).is_none(), "{r:?}");
}

/// `n` entries `<prefix><i>` = `v<i>`.
fn numbered(prefix: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{prefix}{i}").into_bytes(), format!("v{i}").into_bytes()))
        .collect()
}

fn snapshot(c: &mut common::Client) -> proto::SnapshotResponse {
    match c.call(Op::Snapshot(proto::SnapshotRequest {})) {
        proto::Response {
            result: Some(R::Snapshot(s)),
            ..
        } => s,
        other => panic!("snapshot: {other:?}"),
    }
}

// Goal: snapshots and log compaction keep disk use bounded for a bounded key set: after the
// same 10,000 keys are rewritten 20 times, the logs and snapshots on disk stay within 4x one
// copy of the data, and a restart with another core count finds every key's last value.
#[test]
fn compaction_bounds_disk_use() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "2", "--persistence-snapshot-log-bytes-min", "1048576"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    let (keys, rounds) = (10_000, 20);
    let value = |round: usize, i: usize| format!("{round:03}-{i:06}-{}", "x".repeat(90)).into_bytes();
    let mut one_copy = 0u64;
    for round in 0..rounds {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(500) {
            let entries: Vec<_> = chunk
                .iter()
                .map(|&i| (format!("c{i}").into_bytes(), value(round, i)))
                .collect();
            if round == 0 {
                one_copy += entries.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
            }
            mset(&mut c, entries);
        }
    }
    let written: u64 = server.stats().iter().map(|s| s.wal_bytes).sum();
    assert!(
        written > 15 * one_copy,
        "the test wrote too little: {written} log bytes"
    );
    let bounded = common::eventually(Duration::from_secs(20), || disk_bytes(dir.path()) <= 4 * one_copy);
    if !bounded {
        let files: Vec<_> = common::walk(dir.path())
            .into_iter()
            .map(|p| (std::fs::metadata(&p).map_or(0, |m| m.len()), p))
            .filter(|(n, _)| *n > 0)
            .collect();
        panic!(
            "disk use {} bytes for {one_copy} bytes of data ({written} bytes logged)\nfiles: {files:?}\nstats: {:?}\nlog: {}",
            disk_bytes(dir.path()),
            server.stats(),
            server.log_text()
        );
    }
    for s in server.stats() {
        assert!(
            s.snapshots >= 1 && s.snapshot_age_ms >= 0 && s.snapshot_bytes > 0,
            "{s:?}"
        );
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).unwrap().success());

    let server = TestServer::start_in(dir.path(), &["--cores", "1"]);
    let mut c = server.connect();
    for i in 0..keys {
        assert_eq!(c.get(format!("c{i}").as_bytes()), Some(value(rounds - 1, i)), "c{i}");
    }
    let p = server.stats_response().persistence.unwrap();
    assert!(p.snapshots_loaded > 0 && p.keys_recovered == keys as u64, "{p:?}");
}

// Goal: a Snapshot request writes every shard and deletes the log it covers; SIGUSR1 starts
// a round too; after kill -9, the snapshots plus the log written after them restore every
// key, delete and TTL (fsync = always, so every acknowledged write counts).
#[test]
fn snapshot_on_request_and_signal_then_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "2", "--persistence-fsync", "always"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    mset(&mut c, numbered("s", 1000));
    c.set_with(b"ttl", b"t", 600_000, proto::SetCondition::Always);
    let r = snapshot(&mut c);
    assert_eq!(r.keys, 1001, "{r:?}");
    assert!(r.shards >= 1 && r.bytes > 0 && r.log_bytes_released > 0, "{r:?}");
    let log_bytes: u64 = files_in(&dir.path().join("wal"), ".log")
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(log_bytes, 0, "the snapshot covers every log record written before it");
    assert!(!files_in(&dir.path().join("snapshots"), ".snap").is_empty());

    // Changes after the first snapshot, then a round started by SIGUSR1.
    assert!(c.del(b"s0"));
    assert!(c.set(b"s1", b"new"));
    assert!(c.expire(b"s2", 600_000));
    let rounds = |s: &TestServer| s.stats().iter().map(|c| c.snapshots).sum::<u64>();
    let before = rounds(&server);
    server.signal(libc::SIGUSR1);
    assert!(common::eventually(Duration::from_secs(10), || rounds(&server) > before));
    // And changes after that, in the log only.
    assert!(c.set(b"s3", b"after"));
    assert!(c.del(b"s4"));
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5));

    let server = TestServer::start_in(dir.path(), &["--cores", "1"]);
    let mut c = server.connect();
    assert_eq!(c.get(b"s0"), None);
    assert_eq!(c.get(b"s1"), Some(b"new".to_vec()));
    assert!((1..=600_000).contains(&c.ttl(b"s2")));
    assert_eq!(c.get(b"s3"), Some(b"after".to_vec()));
    assert_eq!(c.get(b"s4"), None);
    for i in 5..1000 {
        assert_eq!(c.get(format!("s{i}").as_bytes()), Some(format!("v{i}").into_bytes()));
    }
    assert!((1..=600_000).contains(&c.ttl(b"ttl")));
    let p = server.stats_response().persistence.unwrap();
    assert!(p.snapshots_loaded > 0, "{p:?}");
    assert!(server.stats()[0].snapshot_age_ms >= 0);
}

// Goal: a damaged snapshot refuses to start with the file and offset in the error, --repair
// starts keeping the keys before the damage; data written with another `shards` setting is
// refused with what to do; a Snapshot request without persistence is INVALID_REQUEST.
#[test]
fn damaged_snapshot_and_wrong_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "1", "--shards", "64"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    mset(&mut c, numbered("w", 5000));
    snapshot(&mut c);
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10));

    let (code_, err) = TestServer::fail_in(dir.path(), &["--cores", "1", "--shards", "128"]);
    assert_ne!(code_, Some(0));
    assert!(err.contains("shards = 64") && err.contains("--shards 64"), "{err}");

    let snap = files_in(&dir.path().join("snapshots"), ".snap").remove(0);
    let mut data = std::fs::read(&snap).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x5a;
    std::fs::write(&snap, &data).unwrap();
    let (code_, err) = TestServer::fail_in(dir.path(), &args);
    assert_ne!(code_, Some(0));
    assert!(
        err.contains(&snap.display().to_string()) && err.contains("offset"),
        "{err}"
    );
    let repaired = TestServer::start_in(dir.path(), &["--cores", "1", "--shards", "64", "--repair"]);
    assert!(
        repaired.log_text().contains("damaged snapshot"),
        "{}",
        repaired.log_text()
    );
    let keys: u64 = repaired.stats().iter().map(|s| s.keys).sum();
    assert!(keys > 4000 && keys < 5000, "{keys} keys after repair");

    let off = TestServer::start(&["--persistence-enabled", "false"]);
    let r = off.connect().call(Op::Snapshot(proto::SnapshotRequest {}));
    assert_eq!(code(&r), Some(proto::ErrorCode::InvalidRequest));
}

// Goal: snapshots taken while every key is being overwritten as fast as the client can go
// restore exactly: after a stop, the node comes back from those snapshots (and the log
// after them) with every key's last value.
#[test]
fn snapshots_during_heavy_overwrites_restore_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "2"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let keys = 20_000;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds_done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, addr, done) = (stop.clone(), server.addr, rounds_done.clone());
        std::thread::spawn(move || {
            let mut c = common::Client::connect(addr);
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for chunk in (0..keys).collect::<Vec<_>>().chunks(500) {
                    let entries = chunk
                        .iter()
                        .map(|&i| {
                            (
                                format!("ow{i}").into_bytes(),
                                format!("{round}-{i}-{}", "x".repeat(i % 64)).into_bytes(),
                            )
                        })
                        .collect();
                    mset(&mut c, entries);
                }
                round += 1;
                done.store(round, std::sync::atomic::Ordering::Relaxed);
            }
            round
        })
    };
    let mut admin = server.connect();
    // At least three snapshots, and more until the writer has overwritten every key twice
    // (on a busy machine three snapshots can finish first), for at most a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut snapshots = 0;
    while snapshots < 3
        || (rounds_done.load(std::sync::atomic::Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline)
    {
        let r = admin.call(Op::Snapshot(proto::SnapshotRequest {}));
        assert!(code(&r).is_none(), "{r:?}");
        snapshots += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(rounds >= 2, "the writer overwrote every key during the snapshots");
    let mut c = server.connect();
    let before: Vec<Option<Vec<u8>>> = (0..keys).map(|i| c.get(format!("ow{i}").as_bytes())).collect();
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).unwrap().success());

    let server = TestServer::start_in(dir.path(), &["--cores", "1"]);
    let log = server.log_text();
    assert!(!log.contains("snapshots=0 "), "recovery used the snapshots: {log}");
    let mut c = server.connect();
    for (i, value) in before.iter().enumerate() {
        assert_eq!(&c.get(format!("ow{i}").as_bytes()), value, "ow{i}");
    }
}
