//! Memory accounting against the real binary: Stats' memory_bytes (what
//! limits.memory_bytes_max is enforced on) beside the process' resident memory.
mod common;

use common::{b, code, TestServer};
use flux_kv::proto::{self, request::Op};

/// Writes `keys` distinct keys `user_<i>` with values of `value_bytes(i, round)` bytes,
/// `rounds` times over, in MSETs of 500.
fn write(server: &TestServer, keys: usize, rounds: usize, value_bytes: impl Fn(usize, usize) -> usize) {
    let mut c = server.connect();
    for round in 0..rounds {
        for start in (0..keys).step_by(500) {
            let entries = (start..(start + 500).min(keys))
                .map(|i| proto::KeyValue {
                    key: b(format!("user_{i}").as_bytes()),
                    value: b(&vec![b'v'; value_bytes(i, round)]),
                })
                .collect();
            let r = c.call(Op::Mset(proto::MSetRequest { entries }));
            assert!(code(&r).is_none(), "{r:?}");
        }
    }
}

/// The server's anonymous resident memory, in bytes: its heap and stacks. The binary's own
/// pages (RssFile) are left out: they grow by half a megabyte as the debug build first runs
/// the write path's code, which is neither the store's nor bounded by
/// limits.memory_bytes_max.
fn resident_bytes(server: &TestServer) -> u64 {
    server.status_kib("RssAnon") * 1024
}

/// memory_bytes and the RSS growth since the empty start after `workload`, once they are
/// within 10 % of each other, or as they stand after 5 s: the allocator returns pages
/// freed during the writes (old tables, request buffers) within about a second.
fn accounted_and_rss(workload: impl FnOnce(&TestServer)) -> (u64, u64) {
    let server = TestServer::start(&["--cores", "1", "--persistence-enabled", "false"]);
    let before = resident_bytes(&server);
    workload(&server);
    let accounted = server.stats()[0].memory_bytes;
    let grown = || (resident_bytes(&server)).saturating_sub(before);
    common::eventually(std::time::Duration::from_secs(5), || {
        (0.9..=1.1).contains(&(accounted as f64 / grown() as f64))
    });
    (accounted, grown())
}

// Goal: memory_bytes stays within 10 % of the process' RSS growth over an empty start, for
// small, medium and large values and after an overwrite-heavy run (each key written five
// times with sizes that vary), so limits.memory_bytes_max means what it says.
#[test]
fn accounting_tracks_resident_memory() {
    type Workload = Box<dyn FnOnce(&TestServer)>;
    let workloads: [(&str, Workload); 4] = [
        (
            "200,000 keys, 16 B values",
            Box::new(|s| write(s, 200_000, 1, |_, _| 16)),
        ),
        (
            "200,000 keys, 64 B values",
            Box::new(|s| write(s, 200_000, 1, |_, _| 64)),
        ),
        (
            "60,000 keys, 1 KiB values",
            Box::new(|s| write(s, 60_000, 1, |_, _| 1024)),
        ),
        (
            "50,000 keys written 5 times, 10 to 1,000 B",
            Box::new(|s| write(s, 50_000, 5, |i, round| 10 + (i * 7 + round * 331) % 990)),
        ),
    ];
    for (name, workload) in workloads {
        let (accounted, grown) = accounted_and_rss(workload);
        let ratio = accounted as f64 / grown as f64;
        println!("{name}: memory_bytes {accounted}, RSS growth {grown}, ratio {ratio:.3}");
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{name}: memory_bytes {accounted} vs RSS growth {grown} ({ratio:.3})"
        );
    }
}

// Goal: overwrites leave no garbage: the same 100,000 keys written 20 times take no more
// than 1.5 times the memory of one copy, by Stats and by resident memory.
#[test]
fn overwrites_leave_no_garbage() {
    let server = TestServer::start(&["--cores", "1", "--persistence-enabled", "false"]);
    let before = resident_bytes(&server);
    write(&server, 100_000, 1, |_, _| 100);
    let one_copy = server.stats()[0].memory_bytes;
    let one_copy_rss = (resident_bytes(&server)).saturating_sub(before);
    write(&server, 100_000, 19, |i, round| 60 + (i + round) % 80);
    let after = server.stats()[0].memory_bytes;
    assert!(
        after as f64 <= 1.5 * one_copy as f64,
        "memory_bytes {after} vs {one_copy} for one copy"
    );
    let settled = common::eventually(std::time::Duration::from_secs(5), || {
        let rss = (resident_bytes(&server)).saturating_sub(before);
        rss as f64 <= 1.5 * one_copy_rss as f64
    });
    assert!(
        settled,
        "RSS growth {} vs {one_copy_rss} for one copy",
        (resident_bytes(&server)).saturating_sub(before)
    );
}
