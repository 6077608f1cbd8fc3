//! The Redis protocol port against clients nobody here wrote: redis-py (Debian's
//! python3-redis) beside a real Redis, redis-benchmark and redis-cli (redis-tools).
mod common;

use common::pki::Ca;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use common::TestServer;
use flux_kv::resp::{take_reply, Reply};

fn flux(args: &[&str]) -> (TestServer, SocketAddr) {
    let mut all = vec!["--cores", "2", "--resp-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let server = TestServer::start(&all);
    let resp = server.resp.expect("the ready line names the Redis port");
    (server, resp)
}

/// A local redis-server on a free port, without persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let port = common::fixed_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        assert!(
            common::eventually(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "redis-server did not start"
        );
        Redis { child, port, _dir: dir }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command script both servers run through redis-py: every reply is printed as the
/// Python value redis-py returns (errors as their class and text).
const SCRIPT: &str = r#"
import sys, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), decode_responses=False)
def run(*args):
    try:
        v = r.execute_command(*args)
    except redis.exceptions.ResponseError as e:
        v = ("error", str(e))
    # A millisecond may pass between a write and the PTTL that reads it.
    if args[0] == "PTTL" and isinstance(v, int) and v > 0:
        v = round(v / 1000)
    print(repr(args), "->", repr(v))
run("FLUSHALL") if sys.argv[2] == "redis" else None
for cmd in [
    ("PING",), ("PING", "hi"), ("ECHO", "echo"),
    ("SET", "k", "v"), ("GET", "k"), ("GET", "missing"),
    ("SET", "k", "v2", "NX"), ("SET", "k", "v3", "XX"), ("SET", "new", "x", "XX"),
    ("SET", "k", "v4", "GET"), ("SET", "absent", "a", "GET"), ("SET", "k", "v5", "NX", "GET"),
    ("SET", "k", "v", "EX", "100"), ("TTL", "k"), ("SET", "k", "w", "KEEPTTL"), ("TTL", "k"),
    ("SET", "k", "v", "PX", "100000"), ("PTTL", "k") , ("PERSIST", "k"), ("PERSIST", "k"), ("TTL", "k"),
    ("SET", "k", "v", "EX", "0"), ("SET", "k", "v", "EX", "x"), ("SET", "k", "v", "NX", "XX"),
    ("SET", "k", "v", "EX", "1", "PX", "1"), ("SET", "k", "v", "KEEPTTL", "EX", "1"), ("SET", "k"),
    ("EXPIRE", "k", "100"), ("TTL", "k"), ("PEXPIRE", "k", "200000"), ("TTL", "k"), ("EXPIRE", "nope", "10"),
    ("TTL", "nope"), ("EXPIRE", "k", "x"), ("EXPIRE", "k", "-1"), ("EXISTS", "k"),
    ("MSET", "a", "1", "b", "2", "c", "3"), ("MGET", "a", "b", "nope", "c"), ("MSET", "a"),
    ("EXISTS", "a", "b", "nope", "a"), ("DEL", "a", "b", "nope"), ("EXISTS", "a", "b", "c"),
    ("INCR", "n"), ("INCR", "n"), ("INCRBY", "n", "10"), ("DECR", "n"), ("DECRBY", "n", "5"),
    ("INCRBY", "n", "x"), ("SET", "s", "abc"), ("INCR", "s"), ("SET", "big", "9223372036854775807"),
    ("INCR", "big"), ("SET", "lead", "007"), ("INCR", "lead"), ("SET", "plus", "+1"), ("INCR", "plus"),
    ("APPEND", "s", "def"), ("APPEND", "fresh", "xy"), ("STRLEN", "s"), ("STRLEN", "nope"), ("GET", "s"),
    ("SELECT", "0"), ("DBSIZE",), ("GET",), ("DEL",), ("NOSUCHCOMMAND", "a", "b"),
    ("TTL", "s"), ("PTTL", "nope"), ("EXPIRE", "s", "100"), ("PERSIST", "s"), ("INCR", "s"),
]:
    run(*cmd)
"#;

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 (scripts/test.sh installs python3-redis)");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// Goal: the same script of commands through redis-py gets the same reply from Flux-KV as
// from a local Redis, for every command: values, counts, TTLs, nil, OK and every error text.
#[test]
fn redis_py_sees_what_redis_answers() {
    let (_server, resp) = flux(&[]);
    let redis = Redis::start();
    let ours = python(SCRIPT, &[&resp.port().to_string(), "flux"]);
    let theirs = python(SCRIPT, &[&redis.port.to_string(), "redis"]);
    let theirs: Vec<&str> = theirs.lines().skip(1).collect();
    let ours: Vec<&str> = ours.lines().collect();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o, t, "Flux-KV answered differently from Redis");
    }
}

/// Runs redis-benchmark; returns what it printed.
fn benchmark(port: u16, extra: &[&str]) -> String {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get,incr,mset", "-n", "100000", "-q"])
        .args(extra)
        .output()
        .expect("redis-benchmark (scripts/test.sh installs redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {text}");
    text
}

// Goal: redis-benchmark runs SET, GET, INCR and MSET to completion with no error and no
// warning, with and without pipelining, and its keys are there afterwards.
#[test]
fn redis_benchmark_completes() {
    let (server, resp) = flux(&["--persistence-enabled", "false"]);
    for extra in [&[][..], &["-P", "32"]] {
        let text = benchmark(resp.port(), extra);
        let finals: Vec<&str> = text
            .split(['\r', '\n'])
            .filter(|l| l.contains("requests per second"))
            .collect();
        assert_eq!(finals.len(), 4, "{text}");
        for bad in ["ERR", "Error", "WARN", "error"] {
            assert!(!text.contains(bad), "{extra:?}: {text}");
        }
    }
    let keys: u64 = server.stats().iter().map(|c| c.keys).sum();
    assert_eq!(keys, 2, "key:__rand_int__ (SET, MSET) and counter:__rand_int__ (INCR)");
}

// Goal: redis-cli works: with -x (the value read from stdin), and interactively through a
// pseudo-terminal, where it shows replies as it does to a person.
#[test]
fn redis_cli_works() {
    let (_server, resp) = flux(&[]);
    let port = resp.port().to_string();
    let cli = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(cli(&["-x", "set", "file"], b"line one\nline two\n"), "OK\n");
    assert_eq!(cli(&["get", "file"], b""), "line one\nline two\n\n");
    assert_eq!(cli(&["strlen", "file"], b""), "18\n");

    // Interactive: a pty, so redis-cli believes a person types.
    let session = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("redis-cli", ["redis-cli", "-p", sys.argv[1]])
seen, at = b"", 0
def expect(text, timeout=10):
    # Waits for `text` after what earlier calls matched; answers the cursor queries of
    # redis-cli's line editor (linenoise) as an 80-column terminal would.
    global seen, at
    end = time.time() + timeout
    while text.encode() not in seen[at:]:
        left = end - time.time()
        if left <= 0:
            sys.exit("timed out waiting for %r; saw %r" % (text, seen[at:]))
        if not select.select([fd], [], [], left)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if b"\x1b[6n" in chunk:
            os.write(fd, b"\x1b[1;80R")
        seen += chunk
    at = seen.index(text.encode(), at) + len(text)
def command(line, reply):
    # Type only at a prompt: typed-ahead keys would be read as the terminal's answer.
    expect("> ")
    os.write(fd, line.encode() + b"\r")
    expect(reply)
command("set greeting hello", "OK")
command("get greeting", '"hello"')
command("incr greeting", "(error) ERR value is not an integer or out of range")
command("dbsize", "(integer) 2")
expect("> ")
os.write(fd, b"quit\r")
os.waitpid(pid, 0)
print("ok")
"#;
    assert_eq!(python(session, &[&port]).trim(), "ok");
    // One keyspace: SELECT 0 is all there is.
    assert_eq!(cli(&["select", "1"], b"").trim(), "ERR DB index is out of range");
}

/// Sends `bytes` on a new connection and reads until the server closes it (or 5 s).
fn send_and_read(addr: SocketAddr, bytes: &[u8]) -> (Vec<Reply>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    let mut replies = Vec::new();
    while let Ok(Some(r)) = take_reply(&mut buf) {
        replies.push(r);
    }
    (replies, closed)
}

// Goal: malformed RESP (bad lengths, huge counts, a missing CRLF, a nested array, an
// unbalanced quote) gets Redis' protocol error and the connection closes, after the
// commands before it were answered; the server and other connections are unaffected, and
// a huge announced length allocates nothing (the server's memory stays put).
#[test]
fn malformed_resp_is_refused() {
    let (server, resp) = flux(&["--limits-frame-bytes-max", "1048576"]);
    let mut other = TcpStream::connect(resp).unwrap();
    let rss_before = server.status_kib("VmRSS");
    for (input, error) in [
        (
            &b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*x\r\n"[..],
            "ERR Protocol error: invalid length line",
        ),
        (b"*2147483647\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*-5\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\r\n$2147483647\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$-3\r\n", "ERR Protocol error: invalid bulk length"),
        (
            b"*2\r\n$3\r\nGET\r\n$1\r\nkXX",
            "ERR Protocol error: expected CRLF after a bulk string",
        ),
        (
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            "ERR Protocol error: expected '$', got '*'",
        ),
        (b"SET \"a b\r\n", "ERR Protocol error: unbalanced quotes in request"),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n",
            "ERR Protocol error: command exceeds limits.frame_bytes_max (1048576)",
        ),
    ] {
        let (replies, closed) = send_and_read(resp, input);
        let last = replies.last().cloned();
        assert_eq!(last, Some(Reply::Error(error.into())), "{input:?}: {replies:?}");
        assert!(closed, "{input:?}: the connection closes after a protocol error");
        if input.ends_with(b"*x\r\n") {
            assert_eq!(
                replies[0],
                Reply::Bulk(None),
                "the command before the error was answered"
            );
        }
    }
    let (replies, _) = send_and_read(resp, &vec![b'x'; 70_000]);
    assert_eq!(
        replies,
        vec![Reply::Error("ERR Protocol error: too big inline request".into())]
    );
    other.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    other.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let grown_kib = server.status_kib("VmRSS").saturating_sub(rss_before);
    assert!(
        grown_kib < 16 << 10,
        "announced lengths made the server allocate: {grown_kib} KiB"
    );
}

// Goal: authentication applies on the Redis port: commands get NOAUTH until AUTH user
// token succeeds, a wrong token gets WRONGPASS, and a read-only user gets NOPERM on writes.
#[test]
fn auth_over_resp() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let mut entries = String::new();
    let mut mint = |user: &str, role: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
            .args(["token", "new", "--user", user, "--role", role])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let token = lines
            .next()
            .unwrap()
            .split_once(':')
            .expect("user:secret")
            .1
            .to_string();
        for l in lines {
            entries.push_str(l);
            entries.push('\n');
        }
        token
    };
    let writer = mint("writer", "write");
    let reader = mint("reader", "read");
    std::fs::write(&users, entries).unwrap();
    let (_server, resp) = flux(&["--auth-users-file", users.to_str().unwrap()]);
    let script = format!(
        "*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$4\r\nAUTH\r\n$6\r\nwriter\r\n$5\r\nwrong\r\n\
         AUTH writer {writer}\r\nSET k v\r\nGET k\r\nAUTH reader {reader}\r\nGET k\r\nSET k w\r\nQUIT\r\n"
    );
    let (replies, closed) = send_and_read(resp, script.as_bytes());
    let text = |r: &Reply| format!("{r:?}");
    assert!(closed, "QUIT closes");
    assert_eq!(replies[0], Reply::Simple("PONG".into()), "PING needs no login");
    assert_eq!(replies[1], Reply::Error("NOAUTH Authentication required.".into()));
    assert_eq!(
        replies[2],
        Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    );
    assert_eq!(replies[3], Reply::Simple("OK".into()));
    assert_eq!(replies[4], Reply::Simple("OK".into()));
    assert_eq!(replies[5], Reply::Bulk(Some(bytes::Bytes::from_static(b"v"))));
    assert_eq!(replies[6], Reply::Simple("OK".into()));
    assert_eq!(replies[7], Reply::Bulk(Some(bytes::Bytes::from_static(b"v"))));
    assert!(text(&replies[8]).contains("NOPERM"), "{:?}", replies[8]);
    assert_eq!(replies[9], Reply::Simple("OK".into()));
}

// Goal: INCR and APPEND are logged as ordinary SETs of their results, so after a restart
// the values are what the last reply said.
#[test]
fn read_modify_writes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--cores", "2", "--resp-listen", "127.0.0.1:0"];
    let server = TestServer::start_in(dir.path(), &args);
    let resp = server.resp.unwrap();
    let (replies, _) = send_and_read(
        resp,
        b"INCRBY n 41\r\nINCR n\r\nAPPEND s ab\r\nAPPEND s cd\r\nSET t v EX 1000\r\nINCR t2\r\nQUIT\r\n",
    );
    assert_eq!(replies[1], Reply::Integer(42));
    assert_eq!(replies[3], Reply::Integer(4));
    let mut server = server;
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(30));
    drop(server);
    let server = TestServer::start_in(dir.path(), &args);
    let (replies, _) = send_and_read(server.resp.unwrap(), b"GET n\r\nGET s\r\nTTL t\r\nQUIT\r\n");
    assert_eq!(replies[0], Reply::Bulk(Some(bytes::Bytes::from_static(b"42"))));
    assert_eq!(replies[1], Reply::Bulk(Some(bytes::Bytes::from_static(b"abcd"))));
    assert!(matches!(replies[2], Reply::Integer(t) if (990..=1000).contains(&t)));
}

// Goal: the Redis port speaks TLS with the node's certificate, like the protobuf port:
// redis-cli --tls with the CA gets its replies, and a plaintext client gets none.
#[test]
fn tls_on_the_redis_port() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "resp");
    let pair = ca.server("server");
    let (_server, resp) = flux(&["--tls-cert-file", pair.cert(), "--tls-key-file", pair.key()]);
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &resp.port().to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(cli(&["--tls", "--cacert", ca.cert(), "set", "k", "v"]).trim(), "OK");
    assert_eq!(cli(&["--tls", "--cacert", ca.cert(), "get", "k"]).trim(), "v");
    let (replies, _) = send_and_read(resp, b"PING\r\n");
    assert!(
        replies.is_empty(),
        "plaintext got a RESP reply from a TLS port: {replies:?}"
    );
}

// Goal: INCR, APPEND and a Redis SET reach the change stream (real RabbitMQ) as ordinary SET
// events carrying the resulting values, PERSIST as an EXPIRE to 0, in the order applied.
#[test]
fn read_modify_writes_are_set_events() {
    let exchange = common::cdc::unique("test.resp");
    let tail = common::cdc::Tail::start(&[
        "--exchange",
        &exchange,
        "--json",
        "--count",
        "6",
        "--idle-timeout",
        "30s",
    ]);
    let (_server, resp) = flux(&["--cdc-enabled", "true", "--cdc-exchange", &exchange]);
    let (replies, _) = send_and_read(
        resp,
        b"INCR n\r\nINCRBY n 41\r\nAPPEND s ab\r\nAPPEND s cd\r\nSET t v EX 100\r\nPERSIST t\r\nQUIT\r\n",
    );
    assert_eq!(replies[1], Reply::Integer(42));
    let out = tail.finish();
    assert!(out.success, "{}", out.stderr);
    let events: Vec<(String, String, String)> = out
        .events
        .iter()
        .map(|e| {
            let s = |f: &str| e[f].as_str().unwrap().to_string();
            (s("op"), s("key"), s("value"))
        })
        .collect();
    let of = |key: &str| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|e| e.1 == key)
            .map(|e| (e.0.clone(), e.2.clone()))
            .collect()
    };
    let pair = |op: &str, v: &str| (op.to_string(), v.to_string());
    assert_eq!(of("n"), vec![pair("SET", "1"), pair("SET", "42")]);
    assert_eq!(of("s"), vec![pair("SET", "ab"), pair("SET", "abcd")]);
    assert_eq!(of("t"), vec![pair("SET", "v"), pair("EXPIRE", "")]);
}
