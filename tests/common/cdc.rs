//! Change-capture helpers: flux-cdc-tail as a consumer, a TCP proxy that cuts the broker,
//! pipelined writes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use flux_kv::proto::{self, request::Op};
use flux_kv::wire;

use super::{b, code, Client};

/// A name no other test (or earlier run) uses: exchanges are per test.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}.{}.{nanos}", std::process::id())
}

/// A running flux-cdc-tail whose stderr (its `gap:`, `conflict:` and summary lines) is kept.
pub struct Tail {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// What a finished flux-cdc-tail printed.
pub struct Tailed {
    pub success: bool,
    /// One JSON object per distinct event, in arrival order.
    pub events: Vec<serde_json::Value>,
    pub stderr: String,
}

impl Tail {
    /// Starts flux-cdc-tail with `args` and waits until its queue is bound.
    pub fn start(args: &[&str]) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flux-cdc-tail"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "flux-cdc-tail did not get ready: {line}");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        // Keep draining stderr so the child never blocks on it; echo it for failing tests.
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                eprintln!("flux-cdc-tail: {l}");
                sink.lock().unwrap().push(l);
            }
        });
        Tail { child, stderr }
    }

    /// Waits for it to exit (count reached or idle) and parses its JSON lines.
    pub fn finish(self) -> Tailed {
        let out = self.child.wait_with_output().unwrap();
        let events = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        Tailed {
            success: out.status.success(),
            events,
            stderr: self.stderr.lock().unwrap().join("\n"),
        }
    }

    /// The plain process, for tests that read its output themselves.
    pub fn into_child(self) -> Child {
        self.child
    }
}

impl Tailed {
    /// The number after `name ` in the summary line (`events 5, duplicates 0, gaps 0, ...`).
    pub fn summary(&self, name: &str) -> u64 {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("events "))
            .unwrap_or_else(|| panic!("no summary from flux-cdc-tail:\n{}", self.stderr));
        line.split(", ")
            .find_map(|part| part.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    }
}

/// flux-cdc-tail printing JSON lines for `exchange`, exiting after `count` events or when idle.
pub fn tail_json(exchange: &str, count: usize, idle: &str) -> Child {
    tail(&[
        "--exchange",
        exchange,
        "--json",
        "--count",
        &count.to_string(),
        "--idle-timeout",
        idle,
    ])
}

/// flux-cdc-tail bound and ready (it prints `ready` once its queue is bound).
pub fn tail(args: &[&str]) -> Child {
    Tail::start(args).into_child()
}

/// A TCP proxy in front of RabbitMQ that the test can cut and restore.
pub struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(cut_at_start: bool) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(cut_at_start));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, list) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the broker is "down"
                }
                let Ok(upstream) = std::net::TcpStream::connect("127.0.0.1:5672") else {
                    continue;
                };
                let mut l = list.lock().unwrap();
                l.push(client.try_clone().unwrap());
                l.push(upstream.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, cut, conns }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Writes `n` SETs of keys `prefix<i>` in pipelined chunks; returns when all are acknowledged.
pub fn write_keys(c: &mut Client, prefix: &str, range: std::ops::Range<usize>) {
    for chunk in range.collect::<Vec<_>>().chunks(500) {
        let mut bytes = Vec::new();
        for i in chunk {
            let op = Op::Set(proto::SetRequest {
                key: b(format!("{prefix}{i}").as_bytes()),
                value: b(b"v"),
                ..Default::default()
            });
            wire::put_frame(&c.request(op), &mut bytes);
        }
        c.send_raw(&bytes);
        for _ in chunk {
            assert!(code(&c.recv().unwrap()).is_none());
        }
    }
}
