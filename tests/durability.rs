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
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "2", "--persistence-fsync", "always"];
    let mut server = TestServer::start_in(dir.path(), &args);
    let mut c = server.connect();
    let total = 50_000u64;
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

    let server = TestServer::start_in(dir.path(), &args);
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
    assert!(server.log_text().contains("write-ahead log replayed"));
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
    copy_dir(dir.path(), torn.path());
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

fn copy_dir(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dest).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
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
