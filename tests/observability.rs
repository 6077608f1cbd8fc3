//! What an operator sees: log formats (JSON lines, journald priorities).
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;

/// Runs flux-server with `args` and `stderr`, reads its stderr lines until one contains
/// "flux-server ready" (or the deadline), then stops it. Returns every line read.
fn lines_until_ready(mut cmd: Command, stderr: Stdio, read: impl std::io::Read + Send + 'static) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child: Child = cmd.arg("--data-dir").arg(dir.path()).stderr(stderr).spawn().unwrap();
    drop(cmd); // the parent's copy of the write end must go, or the read never ends
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(read).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + common::START_TIMEOUT;
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let ready = line.contains("flux-server ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("flux-server ready")),
        "no ready line:\n{}",
        lines.join("\n")
    );
    lines
}

fn server() -> Command {
    server_on("127.0.0.1:0")
}

fn server_on(listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flux-server"));
    cmd.args(["--listen", listen, "--cores", "1"])
        .env("FLUX_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null());
    cmd
}

// Goal: with log_format = json every line is one JSON object with a level and a message.
#[test]
fn json_log_lines_parse() {
    let mut cmd = server();
    cmd.args(["--log-format", "json"]);
    let (read, write) = pipe();
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
}

// Goal: when stderr is the journal's stream (JOURNAL_STREAM names it), each line starts with
// its syslog priority, so `journalctl -p warning` selects warnings: the protected-mode
// warning is <4>, the ready line <6>.
#[test]
fn journald_lines_carry_priorities() {
    let (read, write) = pipe();
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the struct for a descriptor we own.
    assert_eq!(unsafe { libc::fstat(write.as_raw_fd(), st.as_mut_ptr()) }, 0);
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    let mut cmd = server_on("0.0.0.0:0");
    cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    assert!(lines.iter().all(|l| l.starts_with('<')), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("protected mode")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("flux-server ready")),
        "{lines:#?}"
    );

    // The same variable with a stderr that is not that stream: plain lines.
    let (read, write) = pipe();
    let mut cmd = server();
    cmd.env("JOURNAL_STREAM", "1:1");
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    assert!(lines.iter().all(|l| !l.starts_with('<')), "{lines:#?}");
}

// Goal: a log_level that does not parse stops the start with a message naming it.
#[test]
fn bad_log_level_is_a_start_error() {
    let out = server().args(["--log-level", "warning"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_level") && err.contains("warning"), "{err}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new descriptors nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET: every notification with the
/// time it arrived.
struct NotifySocket {
    path: std::path::PathBuf,
    received: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// `on_message` runs on the receiving thread for each message, before it is stored.
    fn bind(on_message: impl Fn(&str) + Send + 'static) -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                on_message(&text);
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            path,
            received,
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap().clone()
    }

    fn contains(&self, what: &str) -> bool {
        self.messages().iter().any(|(_, m)| m.contains(what))
    }
}

// Goal: under systemd's Type=notify, READY=1 arrives only once the port answers, even
// with 1,000,000 keys to recover, and STATUS lines with recovery progress (and more start
// time) come before it; SIGTERM sends STOPPING=1. The node runs with fsync = always, the
// mode in which kill -9 loses no acknowledged write, so all 1,000,000 keys must come back
// (with everysec the writes of the last moments may be lost, as documented).
#[test]
fn ready_comes_after_recovery_and_the_port() {
    use flux_kv::proto::{self, request::Op};
    let dir = tempfile::tempdir().unwrap();
    let port = common::fixed_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--cores",
        "2",
        "--listen",
        listen.as_str(),
        "--persistence-fsync",
        "always",
    ];
    {
        let s = TestServer::start_in(dir.path(), &args);
        let mut c = s.connect();
        const BATCH: usize = 1000;
        const IN_FLIGHT: usize = 32;
        let mut sent = 0;
        for round in 0..(1_000_000 / BATCH / IN_FLIGHT + 1) {
            let mut ids = Vec::new();
            for b in 0..IN_FLIGHT {
                let first = (round * IN_FLIGHT + b) * BATCH;
                if first >= 1_000_000 {
                    break;
                }
                let entries = (first..first + BATCH)
                    .map(|i| proto::KeyValue {
                        key: format!("key:{i}").into_bytes().into(),
                        value: b"0123456789".to_vec().into(),
                    })
                    .collect();
                let req = c.request(Op::Mset(proto::MSetRequest { entries }));
                c.send(&req);
                ids.push(req.id);
                sent += BATCH;
            }
            for id in ids {
                let r = c.recv().expect("reply");
                assert!(r.id == id && r.error.is_none(), "{r:?}");
            }
        }
        assert_eq!(sent, 1_000_000);
        let keys: u64 = s.stats().iter().map(|c| c.keys).sum();
        assert_eq!(keys, 1_000_000);
    } // killed here: the next start replays the log

    let answered_at_ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = answered_at_ready.clone();
    let notify = NotifySocket::bind(move |m| {
        if m.contains("READY=1") {
            // What a client would see the moment systemd calls the node started.
            if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
                let mut c = common::Client::from_stream(stream);
                let pong = c.call(Op::Ping(proto::PingRequest::default()));
                flag.store(pong.error.is_none(), std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let s = TestServer::start_in_env(dir.path(), &args, &[("NOTIFY_SOCKET", notify.path())]);
    assert!(
        common::eventually(common::TIMEOUT, || notify.contains("READY=1")),
        "no READY=1: {:?}",
        notify.messages()
    );
    assert!(
        answered_at_ready.load(std::sync::atomic::Ordering::SeqCst),
        "the port answered a PING when READY=1 arrived"
    );
    let messages = notify.messages();
    let ready = messages.iter().position(|(_, m)| m.contains("READY=1")).unwrap();
    let progress: Vec<&String> = messages[..ready]
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m.contains("STATUS=recovering") && m.contains("EXTEND_TIMEOUT_USEC="))
        .collect();
    assert!(progress.len() >= 2, "recovery progress before READY: {messages:?}");
    assert!(
        progress.last().unwrap().contains("keys restored so far") && !progress.last().unwrap().contains(": 0 keys"),
        "{progress:?}"
    );
    let keys: u64 = s.stats().iter().map(|c| c.keys).sum();
    assert_eq!(keys, 1_000_000);

    s.signal(libc::SIGTERM);
    assert!(
        common::eventually(common::TIMEOUT, || notify.contains("STOPPING=1")),
        "{:?}",
        notify.messages()
    );
}

// Goal: with WatchdogSec set (WATCHDOG_USEC), WATCHDOG=1 arrives at half the interval while
// every core answers, and stops once one shard core is stuck in a loop (the test-only
// FLUX_TEST_HOLD_CORE switch), so systemd would restart the node.
#[test]
fn watchdog_pings_stop_when_a_core_is_held() {
    let notify = NotifySocket::bind(|_| {});
    let hold_after_ms = 3_000;
    let hold = format!("1:{hold_after_ms}");
    let s = TestServer::start_env(
        &["--cores", "2", "--persistence-enabled", "false"],
        &[
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "400000"),
            ("FLUX_TEST_HOLD_CORE", hold.as_str()),
        ],
    );
    let started = Instant::now();
    assert!(common::eventually(Duration::from_secs(20), || s
        .log_text()
        .contains("this core now spins")));
    let held_at = Instant::now();
    std::thread::sleep(Duration::from_millis(2_500));
    let pings: Vec<Instant> = notify
        .messages()
        .into_iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| t)
        .collect();
    let before: Vec<&Instant> = pings.iter().filter(|t| **t < held_at).collect();
    assert!(
        before.len() >= 5,
        "pings every 200 ms before the hold ({} in {:?})",
        before.len(),
        held_at - started
    );
    let gaps: Vec<Duration> = before.windows(2).map(|w| *w[1] - *w[0]).collect();
    let mut sorted = gaps.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    assert!(
        (Duration::from_millis(150)..Duration::from_millis(400)).contains(&median),
        "median gap {median:?}: {gaps:?}"
    );
    let late = pings
        .iter()
        .filter(|t| **t > held_at + Duration::from_millis(1_000))
        .count();
    assert_eq!(late, 0, "no pings once a core is held: {pings:?}");
    assert!(s.log_text().contains("does not answer heartbeats"));
}

// Goal: `flux-cli stats --json` prints every Stats figure as one JSON object, for scripts.
#[test]
fn cli_prints_stats_as_json() {
    let s = TestServer::start(&["--cores", "2"]);
    let mut c = s.connect();
    for i in 0..100 {
        assert!(c.set(format!("k{i}").as_bytes(), b"v"));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--addr", &s.addr.to_string(), "stats", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cores = v["cores"].as_array().unwrap();
    assert_eq!(cores.len(), 2);
    assert_eq!(cores.iter().map(|c| c["keys"].as_u64().unwrap()).sum::<u64>(), 100);
    assert_eq!(v["persistence"]["fsync"], "everysec");
    assert_eq!(v["cdc"]["enabled"], false);
}

// Goal: a scrape of /metrics passes `promtool check metrics`, carries every core's figures
// (the request counters equal Stats'), and /healthz answers.
#[test]
fn metrics_scrape_passes_promtool() {
    let s = TestServer::start(&["--cores", "2"]);
    let metrics = s.metrics.expect("metrics endpoint on by default");
    let mut c = s.connect();
    for i in 0..500 {
        assert!(c.set(format!("k{i}").as_bytes(), b"v"));
    }
    let (status, text) = common::http_get(metrics, "/metrics");
    assert_eq!(status, 200, "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = s.stats();
    for core in &stats {
        let line = format!("flux_core_requests_total{{core=\"{}\"}} ", core.core);
        let value: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line}in\n{text}"))
            .trim()
            .parse()
            .unwrap();
        // The Stats call itself is one more request on the core that served it.
        assert!(
            value == core.requests || value + 1 == core.requests,
            "{line}{value} vs Stats {}",
            core.requests
        );
    }
    let keys: u64 = text
        .lines()
        .filter(|l| l.starts_with("flux_core_keys{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(keys, 500);
    assert_eq!(common::http_get(metrics, "/healthz"), (200, "ok\n".to_string()));
}

// Goal: /readyz answers 200 on a healthy node, turns 503 (saying why) while change capture
// cannot reach RabbitMQ for longer than cdc.blocked_ms_max under overflow = block, and 200
// again once the broker is back.
#[test]
fn readyz_follows_the_broker() {
    let proxy = common::cdc::Proxy::start(false);
    let url = proxy.url();
    let exchange = common::cdc::unique("flux.ready");
    let s = TestServer::start(&[
        "--cores",
        "2",
        "--cdc-enabled",
        "true",
        "--cdc-amqp-url",
        &url,
        "--cdc-exchange",
        &exchange,
        "--cdc-blocked-ms-max",
        "500",
        "--cdc-reconnect-delay-max-ms",
        "200",
    ]);
    let metrics = s.metrics.unwrap();
    let ready = || common::http_get(metrics, "/readyz");
    assert!(
        common::eventually(common::TIMEOUT, || ready().0 == 200),
        "{:?}",
        ready()
    );
    proxy.cut();
    let mut c = s.connect();
    assert!(c.set(b"during", b"outage"), "writes go on while the broker is away");
    assert!(
        common::eventually(common::TIMEOUT, || ready().0 == 503),
        "{:?}",
        ready()
    );
    let (_, body) = ready();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert!(body.contains("no broker connection"), "{body}");
    let (_, text) = common::http_get(metrics, "/metrics");
    assert!(text.contains("flux_ready 0"), "{text}");
    proxy.restore();
    assert!(
        common::eventually(common::TIMEOUT, || ready().0 == 200),
        "{:?}",
        ready()
    );
}

// Goal: after 10,000 requests of several kinds (pipelined, over both cores), each core's
// latency histogram counts every request it read: its counts, summed over operations,
// equal its request counter in the same scrape; hits, misses and error codes are counted.
#[test]
fn latency_histograms_count_every_request() {
    use flux_kv::proto::{self, request::Op};
    let s = TestServer::start(&["--cores", "2"]);
    let mut clients = [s.connect(), s.connect(), s.connect(), s.connect()];
    let mut sent = 0;
    while sent < 10_000 {
        for c in clients.iter_mut() {
            let mut ids = Vec::new();
            for i in 0..50 {
                let key = format!("k{}", (sent + i) % 700).into_bytes();
                let op = match i % 5 {
                    0 | 1 => Op::Set(proto::SetRequest {
                        key: key.into(),
                        value: b"v".to_vec().into(),
                        ..Default::default()
                    }),
                    2 => Op::Get(proto::GetRequest { key: key.into() }),
                    3 => Op::Get(proto::GetRequest {
                        key: b"never-set".to_vec().into(),
                    }),
                    _ => Op::Set(proto::SetRequest {
                        key: vec![b'x'; 70_000].into(), // over limits.key_bytes_max
                        ..Default::default()
                    }),
                };
                let req = c.request(op);
                c.send(&req);
                ids.push(req.id);
            }
            for id in ids {
                assert_eq!(c.recv().expect("reply").id, id);
            }
            sent += 50;
        }
    }
    let (status, text) = common::http_get(s.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200);
    // The sum of every sample whose line starts with `prefix` and contains `label`.
    let sum = |prefix: &str, label: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(label))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let mut total = 0.0;
    for core in 0..2 {
        let requests = sum(&format!("flux_core_requests_total{{core=\"{core}\"}}"), "");
        let counted = sum(
            &format!("flux_core_request_duration_seconds_count{{core=\"{core}\""),
            "",
        );
        assert_eq!(counted, requests, "core {core}\n{text}");
        total += requests;
    }
    assert_eq!(total, 10_000.0);
    assert_eq!(sum("flux_core_errors_total{", "code=\"KEY_TOO_LARGE\""), 2_000.0);
    let misses = sum("flux_core_reads_total{", "result=\"miss\"");
    assert!(misses >= 2_000.0, "{misses}");
}

// Goal: with fsync = always every acknowledged write went through a timed log sync, and the
// histogram of those syncs is on /metrics for each core that wrote.
#[test]
fn log_sync_latency_is_a_histogram() {
    let s = TestServer::start(&["--cores", "1", "--persistence-fsync", "always"]);
    let mut c = s.connect();
    for i in 0..50 {
        assert!(c.set(format!("k{i}").as_bytes(), b"v"));
    }
    let (status, text) = common::http_get(s.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200);
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("flux_core_log_sync_duration_seconds_count{core=\"0\"} "))
        .unwrap_or_else(|| panic!("no sync histogram:\n{text}"))
        .parse()
        .unwrap();
    // One client writing one key at a time: each write is its own round, its own sync.
    assert!(count >= 50, "{count} syncs for 50 acknowledged writes");
    assert!(text.contains("flux_core_log_sync_duration_seconds_bucket{core=\"0\",le=\"+Inf\"}"));
}
