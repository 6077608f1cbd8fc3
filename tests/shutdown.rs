//! Graceful shutdown on SIGTERM/SIGINT with requests in flight.
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{b, code, TestServer};
use flux_kv::proto::{self, request::Op, response::Result as R, ErrorCode};
use flux_kv::wire;

// Goal: on SIGTERM with a deep pipeline in flight, every request read before the signal is
// answered normally, later ones get SHUTTING_DOWN, replies stay in order with their ids,
// nothing is answered twice or skipped, and the process exits 0 within the bound.
#[test]
fn sigterm_with_requests_in_flight() {
    let mut server = TestServer::start(&["--cores", "2", "--shutdown-timeout-ms", "5000"]);
    let mut c = server.connect();
    let mut idle = server.connect();
    assert!(idle.set(b"idle", b"v"));

    let n = 200_000u64;
    let mut bytes = Vec::new();
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            let key = b(format!("sd{i}").as_bytes());
            let req = c.request(Op::Set(proto::SetRequest {
                key,
                value: b(b"v"),
                ..Default::default()
            }));
            wire::put_frame(&req, &mut bytes);
            req.id
        })
        .collect();
    let mut writer = c.stream.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        // Ignore errors: the server may close after draining while we still write.
        let _ = writer.write_all(&bytes);
    });
    // Signal once the server is demonstrably working through the pipeline.
    let first = c.recv().unwrap();
    assert_eq!(first.id, ids[0]);
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);

    let (mut normal, mut refused) = (1u64, 0u64);
    let mut next = 1;
    while let Some(r) = c.recv() {
        assert_eq!(r.id, ids[next], "reply out of order");
        next += 1;
        match (code(&r), &r.result) {
            (None, Some(R::Set(s))) if s.applied => {
                assert_eq!(refused, 0, "a normal reply after SHUTTING_DOWN");
                normal += 1;
            }
            (Some(ErrorCode::ShuttingDown), None) => refused += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    w.join().unwrap();
    let status = server.wait_exit(Duration::from_secs(10)).expect("server exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "took {:?}",
        signalled.elapsed()
    );
    eprintln!(
        "normal replies: {normal}, SHUTTING_DOWN replies: {refused}, unanswered: {}",
        n - normal - refused
    );
    assert!(normal >= 1);
    assert!(refused >= 1, "requests written after the signal must get SHUTTING_DOWN");
    assert!(normal + refused <= n);
    // The idle connection was closed, not left hanging.
    assert!(idle.recv().is_none());
    let log = server.log_text();
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
}

// Goal: SIGINT also stops the server cleanly, and refuses connections afterwards.
#[test]
fn sigint_stops_cleanly() {
    let mut server = TestServer::start(&[]);
    let addr = server.addr;
    server.connect().set(b"k", b"v");
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(10)).expect("server exits");
    assert!(status.success(), "{status:?}; log:\n{}", server.log_text());
    assert!(std::net::TcpStream::connect(addr).is_err());
}

// Goal: a server whose stderr has gone away (its log pipe closed) still stops on SIGTERM:
// logging must not take down the thread that handles signals.
#[test]
fn sigterm_with_stderr_closed() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flux-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--data-dir",
        ])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("flux-server ready") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before ready");
    }
    drop(err);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server ignored SIGTERM once stderr was closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
