//! The Python client (clients/python) against real nodes: its own unittest suite, run with
//! Debian's python3 and python3-protobuf (scripts/test.sh installs them, and python3-xxhash
//! for routing).
mod common;

use std::path::Path;
use std::process::Command;

use common::TestServer;

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs clients/python/tests/test_client.py against `addr`; panics with its output on failure.
fn run_suite(addr: std::net::SocketAddr, shard_aware: bool) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let generate = Command::new(format!("{root}/clients/python/generate.sh"))
        .output()
        .unwrap();
    assert!(
        generate.status.success(),
        "generate.sh: {}",
        String::from_utf8_lossy(&generate.stderr)
    );
    let out = Command::new(python())
        .arg(format!("{root}/clients/python/tests/test_client.py"))
        .env("FLUX_ADDR", addr.to_string())
        .env("FLUX_SHARD_AWARE", if shard_aware { "1" } else { "0" })
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python client's tests failed:\n{text}");
    text
}

// Goal: the Python package does every operation, pipelines, raises typed errors and routes
// keys to their owner cores, against a real 2-core node with per-core ports.
#[test]
fn python_client_suite() {
    let base = common::free_port_pair().to_string();
    let server = TestServer::start(&["--cores", "2", "--core-port-base", &base]);
    let text = run_suite(server.addr, true);
    let routing = text.lines().find(|l| l.starts_with("test_shard_aware_routing"));
    assert!(
        routing.is_some_and(|l| l.ends_with("... ok")),
        "routing ran and passed:\n{text}"
    );
    assert!(text.lines().any(|l| l == "OK"), "{text}");
}
