//! The Rust client and flux-cli against a real server.
mod common;

use std::process::Command;
use std::time::Duration;

use common::TestServer;
use flux_kv::client::{Client, ClientConfig, Condition, Error, SetOptions, Ttl};
use flux_kv::proto::ErrorCode;

// Goal: typed results: a missing key is None (an empty value is Some(empty)), TTLs and
// conditions map to their types, server errors keep their code and message.
#[test]
fn typed_results_and_errors() {
    let server = TestServer::start(&["--limits-value-bytes-max", "10"]);
    common::rt().block_on(async {
        let c = Client::connect(&server.addr.to_string(), ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(c.get("nope").await.unwrap(), None);
        c.set("empty", "").await.unwrap();
        assert_eq!(c.get("empty").await.unwrap().as_deref(), Some(&b""[..]));
        assert!(!c
            .set_with(
                "empty",
                "x",
                SetOptions {
                    condition: Condition::IfAbsent,
                    ..Default::default()
                }
            )
            .await
            .unwrap());
        assert_eq!(c.ttl("empty").await.unwrap(), Ttl::Persistent);
        assert_eq!(c.ttl("nope").await.unwrap(), Ttl::Missing);
        assert!(c.expire("empty", Some(Duration::from_secs(60))).await.unwrap());
        assert!(matches!(c.ttl("empty").await.unwrap(), Ttl::Expires(d) if d > Duration::from_secs(59)));
        assert!(c.del("empty").await.unwrap());
        assert!(!c.exists("empty").await.unwrap());
        assert_eq!(c.ping("p").await.unwrap(), "p");

        let err = c.set("k", "01234567890").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ValueTooLarge), "{err}");
        assert!(err.to_string().contains("limits.value_bytes_max"), "{err}");
    });
}

// Goal: one connection carries many requests at once: 2,000 concurrent calls through a
// client with a single connection all complete with their own answers.
#[test]
fn pipelining_over_one_connection() {
    let server = TestServer::start(&["--cores", "2"]);
    common::rt().block_on(async {
        let config = ClientConfig {
            connections_per_endpoint: 1,
            shard_aware: false,
            ..Default::default()
        };
        let c = std::sync::Arc::new(Client::connect(&server.addr.to_string(), config).await.unwrap());
        let tasks: Vec<_> = (0..2_000)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.set(format!("k{i}"), format!("v{i}")).await.unwrap();
                    assert_eq!(c.get(format!("k{i}")).await.unwrap().unwrap(), format!("v{i}"));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let stats = server.stats();
    // The client's one connection plus the stats connection: no connection per request.
    assert!(
        stats.iter().map(|s| s.connections_accepted).sum::<u64>() <= 3,
        "{stats:?}"
    );
}

// Goal: shard-aware routing sends every key to its owner core's port, proved by the
// server's forwarded counters staying at zero; MGET/MSET split per core and keep order.
#[test]
fn shard_aware_routing_never_forwards() {
    let base = common::free_port_pair();
    let server = TestServer::start(&["--cores", "2", "--core-port-base", &base.to_string()]);
    common::rt().block_on(async {
        let c = Client::connect(&server.addr.to_string(), ClientConfig::default())
            .await
            .unwrap();
        assert!(c.is_shard_aware());
        for i in 0..500 {
            c.set(format!("sa{i}"), format!("{i}")).await.unwrap();
        }
        c.mset((0..200).map(|i| (format!("ms{i}"), format!("{i}"))))
            .await
            .unwrap();
        let keys: Vec<String> = (0..200)
            .rev()
            .map(|i| format!("ms{i}"))
            .chain(["none".to_string()])
            .collect();
        let values = c.mget(keys).await.unwrap();
        for (pos, v) in values[..200].iter().enumerate() {
            assert_eq!(v.as_deref(), Some(format!("{}", 199 - pos).as_bytes()));
        }
        assert_eq!(values[200], None);
        for i in 0..500 {
            assert_eq!(c.get(format!("sa{i}")).await.unwrap().unwrap(), format!("{i}"));
        }
        let stats = c.stats().await.unwrap();
        assert!(
            stats.iter().all(|s| s.forwarded_out == 0 && s.forwarded_in == 0),
            "{stats:?}"
        );
        assert!(stats.iter().all(|s| s.keys > 0), "both cores own keys: {stats:?}");
    });
}

// Goal: timeouts bound every wait: a server that accepts but never answers makes a request
// fail with Timeout, and an unreachable address fails to connect instead of hanging.
#[test]
fn timeouts() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    common::rt().block_on(async {
        let config = ClientConfig {
            request_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let err = Client::connect_addr(addr, config.clone())
            .await
            .err()
            .expect("no answer to Hello");
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));

        drop(silent);
        let err = Client::connect_addr(addr, config).await.err().expect("nobody listens");
        assert!(matches!(err, Error::Connect(..)), "{err}");
    });
}

// Goal: requests in flight when the server goes away fail fast with a clear error instead
// of waiting for their timeout.
#[test]
fn lost_connection_fails_pending_requests() {
    let mut server = TestServer::start(&[]);
    common::rt().block_on(async {
        let config = ClientConfig {
            request_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let c = Client::connect(&server.addr.to_string(), config).await.unwrap();
        c.set("k", "v").await.unwrap();
        server.signal(libc::SIGKILL);
        let started = std::time::Instant::now();
        let err = c.get("k").await.unwrap_err();
        assert!(
            matches!(err, Error::Disconnected(_) | Error::Closed | Error::Connect(..)),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    });
    server.wait_exit(Duration::from_secs(5));
}

fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .arg("--addr")
        .arg(server.addr.to_string())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Goal: every one-shot command works, output is escaped by default and raw with --raw,
// and errors exit non-zero with the server's message.
#[test]
fn cli_one_shot_commands() {
    let server = TestServer::start(&["--limits-key-bytes-max", "16"]);
    assert_eq!(cli(&server, &["set", "k", "v\u{1}x", "--ttl", "10s"]).1, "OK\n");
    assert_eq!(cli(&server, &["get", "k"]).1, "\"v\\x01x\"\n");
    assert_eq!(cli(&server, &["--raw", "get", "k"]).1.as_bytes(), b"v\x01x\n");
    let ttl: i64 = cli(&server, &["ttl", "k"]).1.trim().parse().unwrap();
    assert!(ttl > 9_000 && ttl <= 10_000, "{ttl}");
    assert_eq!(cli(&server, &["expire", "k", "0"]).1, "1\n");
    assert_eq!(cli(&server, &["ttl", "k"]).1, "-1\n");
    assert_eq!(cli(&server, &["set", "k", "w", "--nx"]).1, "(not applied)\n");
    assert_eq!(cli(&server, &["exists", "k"]).1, "1\n");
    assert_eq!(cli(&server, &["del", "k"]).1, "1\n");
    assert_eq!(cli(&server, &["get", "k"]).1, "(nil)\n");
    assert_eq!(cli(&server, &["mset", "a", "1", "b", "2"]).1, "OK\n");
    assert_eq!(cli(&server, &["mget", "b", "zz", "a"]).1, "\"2\"\n(nil)\n\"1\"\n");
    assert_eq!(cli(&server, &["ping"]).1, "PONG\n");
    let (ok, stats, _) = cli(&server, &["stats"]);
    assert!(
        ok && stats.contains("requests") && stats.lines().count() >= 2,
        "{stats}"
    );
    let (ok, hello, _) = cli(&server, &["hello"]);
    assert!(ok && hello.contains("key_hash:   xxh3_64"), "{hello}");

    let (ok, _, err) = cli(&server, &["set", "this-key-is-too-long", "v"]);
    assert!(!ok);
    assert!(
        err.contains("KeyTooLarge") && err.contains("limits.key_bytes_max"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--addr", "127.0.0.1:1", "ping"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

// Goal: the interactive prompt runs commands typed on its input, one per line.
#[test]
fn cli_prompt() {
    use std::io::Write;
    let server = TestServer::start(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--addr", &server.addr.to_string()])
        .env("HOME", &server.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"set 'a b' \"c d\"\nget 'a b'\nbogus\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("OK") && text.contains("\"c d\""), "{text}");
    assert!(text.contains("unrecognized subcommand"), "{text}");
}

// Goal: flux-bench runs the old workload and reports the documented JSON fields, with
// per-core figures from Stats.
#[test]
fn bench_json_report() {
    let server = TestServer::start(&["--cores", "2"]);
    let out = Command::new(env!("CARGO_BIN_EXE_flux-bench"))
        .args(["--addr", &server.addr.to_string(), "-c", "4", "-n", "2000", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 2000);
    assert_eq!(v["errors"], 0);
    assert!(v["qps"].as_f64().unwrap() > 0.0);
    for k in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][k].as_u64().unwrap() > 0, "{k}");
    }
    let per_core = v["per_core"].as_array().unwrap();
    assert_eq!(per_core.len(), 2);
    let total: u64 = per_core.iter().map(|c| c["requests"].as_u64().unwrap()).sum();
    // The 2,000 SETs plus the report's own Stats request.
    assert!((2000..=2002).contains(&total), "{total}");
    assert!(per_core
        .iter()
        .all(|c| c["forwarded_out"].is_u64() && c["qps"].is_number()));
    // The default workload wrote user_<conn>_<i> keys with value_<i % 1000>.
    let mut c = server.connect();
    assert_eq!(c.get(b"user_3_7").as_deref(), Some(&b"value_7"[..]));
}
