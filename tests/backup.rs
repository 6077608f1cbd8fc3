//! Backup and restore over real sockets against the real binaries: `flux-cli backup`,
//! `flux-server --verify-data` and `flux-server --restore-from`.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Client, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R, SetCondition};

const PRELOADED: usize = 10_000;
const WRITERS: usize = 2;

fn pre_key(i: usize) -> String {
    format!("pre-{i:05}")
}

fn live_key(writer: usize, n: u64) -> String {
    format!("live-{writer}-{n:08}")
}

/// What a digest compares per key: the value (None: absent) and the TTL in whole minutes
/// (rounded, so the seconds between two readings do not count; -1: none).
type Digest = BTreeMap<String, (Option<Vec<u8>>, i64)>;

fn digest(c: &mut Client, keys: impl Iterator<Item = String>) -> Digest {
    keys.map(|k| {
        let value = c.get(k.as_bytes());
        let ttl = match c.ttl(k.as_bytes()) {
            ms if ms >= 0 => (ms + 30_000) / 60_000,
            other => other,
        };
        (k, (value, ttl))
    })
    .collect()
}

fn node_id(server: &TestServer) -> String {
    match server.connect().call(Op::Hello(proto::HelloRequest {})).result {
        Some(R::Hello(h)) => h.node_id,
        other => panic!("hello: {other:?}"),
    }
}

fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flux-server"))
        .arg("--verify-data")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Copies a backup and flips one byte of `name` in the copy.
fn damaged_copy(backup: &Path, name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    common::copy_dir(backup, copy.path());
    let path = copy.path().join(name);
    let mut data = std::fs::read(&path).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x01;
    std::fs::write(&path, data).unwrap();
    copy
}

// Goal: a backup taken while writers run is consistent and complete. It passes the offline
// check; restored on another core count after the node's data is wiped, it holds the same
// digest over every key, value and TTL that existed before it began (deletes included), and
// of each writer's sequence exactly a prefix: at least what was acknowledged before the
// backup began, nothing that was never acknowledged, no holes. A flipped byte in any file
// fails the check, naming the file.
#[test]
fn backup_under_load_restores_on_another_core_count() {
    let source = TestServer::start(&["--cores", "2"]);
    let mut c = source.connect();
    for i in 0..PRELOADED {
        let value = format!("value-{i}-{}", "x".repeat(i % 50));
        let ttl_ms = [0, 3_600_000, 7_200_000][i % 3];
        assert!(c.set_with(pre_key(i).as_bytes(), value.as_bytes(), ttl_ms, SetCondition::Always));
    }
    for i in (0..PRELOADED).step_by(97) {
        assert!(c.del(pre_key(i).as_bytes()));
    }
    let expected = digest(&mut c, (0..PRELOADED).map(pre_key));

    // Writers run before, during and after the backup; each counts what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (stop, acked, addr) = (stop.clone(), acked.clone(), source.addr);
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    assert!(c.set(live_key(w, n).as_bytes(), format!("{w}:{n}").as_bytes()));
                    n += 1;
                    acked[w].store(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(common::eventually(Duration::from_secs(10), || acked
        .iter()
        .all(|a| a.load(Ordering::Relaxed) >= 200)));
    let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let backup = tempfile::tempdir().unwrap();
    let dir = backup.path().join("b");
    let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--addr", &source.addr.to_string(), "--timeout", "60s", "backup"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let after: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    assert!(
        after.iter().zip(&before).all(|(a, b)| a > b),
        "the writers kept writing during the backup"
    );
    // The node removed its staged copy once the backup ended.
    assert!(!source
        .dir
        .join("backups")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));

    let (ok, text) = verify(&dir);
    assert!(ok, "{text}");
    let manifest = flux_kv::backup::read_manifest(&dir).unwrap();
    assert_eq!(manifest.shards, 256);
    assert_eq!(manifest.node_id, node_id(&source));
    let logs: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .filter(|n| n.starts_with("wal/"))
        .collect();
    assert!(
        !logs.is_empty(),
        "writes during the round leave a log tail: {manifest:?}"
    );

    // Wipe the node, restore on one core.
    let source_dir = source.dir.clone();
    drop(source); // kills the node and removes its data directory
    assert!(!source_dir.exists());
    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("data");
    let restored = TestServer::start_in(&data, &["--cores", "1", "--restore-from", dir.to_str().unwrap()]);
    let mut r = restored.connect();
    let got = digest(&mut r, (0..PRELOADED).map(pre_key));
    let differing: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(differing.is_empty(), "restored keys differ, e.g. {differing:?}");
    for w in 0..WRITERS {
        let mut present = 0;
        while r.get(live_key(w, present).as_bytes()).is_some() {
            present += 1;
        }
        assert!(
            (before[w]..=after[w]).contains(&present),
            "writer {w}: {present} writes restored; {} were acknowledged before the backup and {} in all",
            before[w],
            after[w]
        );
        for n in present..after[w] {
            assert_eq!(r.get(live_key(w, n).as_bytes()), None, "writer {w}: a hole before {n}");
        }
    }
    assert_ne!(node_id(&restored), manifest.node_id, "a restored node is a new member");

    // A flipped byte in a snapshot or in a log fails the check and names the file.
    let snapshot = manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .find(|n| n.starts_with("snapshots/"))
        .unwrap();
    for name in [snapshot, logs[0]] {
        let copy = damaged_copy(&dir, name);
        let (ok, text) = verify(copy.path());
        assert!(!ok && text.contains(name), "{name}: {text}");
    }
}

// Goal: restore refuses a data directory that holds anything, and a node whose shard count
// differs from the backup's, saying what to do; the data directory is left as it was.
#[test]
fn restore_refuses_a_used_data_dir_or_other_shards() {
    let source = TestServer::start(&["--cores", "1"]);
    let mut c = source.connect();
    assert!(c.set(b"k", b"v"));
    let backup = tempfile::tempdir().unwrap();
    let dir = backup.path().join("b");
    let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--addr", &source.addr.to_string(), "backup"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let used = tempfile::tempdir().unwrap();
    std::fs::write(used.path().join("node_id"), "flux-other\n").unwrap();
    let (code, log) = TestServer::fail_in(used.path(), &["--restore-from", dir.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("is not empty"), "{log}");
    assert_eq!(std::fs::read_dir(used.path()).unwrap().count(), 1);

    let empty = tempfile::tempdir().unwrap();
    let (code, log) = TestServer::fail_in(
        empty.path(),
        &["--shards", "64", "--restore-from", dir.to_str().unwrap()],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--shards 256"), "{log}");
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}
