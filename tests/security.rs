//! Security over real sockets: tokens and roles (checked with an independent Python client
//! built from proto/flux.proto), TLS and mutual TLS on the client port, certificate and
//! users-file reloads on SIGHUP, protected mode, and TLS to RabbitMQ and etcd.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::cdc::{unique, Tail};
use common::pki::Ca;
use common::{eventually, TestServer};
use flux_kv::client::{Client, ClientConfig, ClientFiles, Credentials, Security};
use flux_kv::proto::{self, request::Op, ErrorCode};

/// The Python classes protoc makes from proto/flux.proto, generated once per test run.
fn python_protos() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flux-pb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = env!("CARGO_MANIFEST_DIR");
        // Debian's protoc, which matches Debian's python3-protobuf (the build's own protoc,
        // scripts/protoc, is newer than that runtime accepts).
        let protoc = if Path::new("/usr/bin/protoc").exists() {
            "/usr/bin/protoc"
        } else {
            "protoc"
        };
        let status = Command::new(protoc)
            .arg(format!("--python_out={}", dir.display()))
            .arg(format!("-I{root}/proto"))
            .arg(format!("{root}/proto/flux.proto"))
            .status()
            .expect("protoc (Debian protobuf-compiler) must be installed");
        assert!(status.success(), "protoc failed");
        dir
    })
}

/// Runs the Python client (tests/py/flux_probe.py) with `args` and `steps`; one output line
/// per step. Debian's python3 with python3-protobuf, whatever else is first on PATH.
fn probe(addr: &str, args: &[&str], steps: &[&str]) -> Vec<String> {
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/flux_probe.py"))
        .arg("--pb")
        .arg(python_protos())
        .args(["--addr", addr])
        .args(args)
        .args(steps)
        .output()
        .expect("python3 must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "python client failed: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A users file with tokens for `reader` (read), `writer` (write, keys under app:) and
/// `admin`; returns the token file of each.
struct Users {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Users {
    fn new(users: &[(&str, &str, &[&str])]) -> Users {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users.toml");
        let u = Users { dir, file };
        u.write(users);
        u
    }

    /// (Re)writes the users file, making a new token for each user.
    fn write(&self, users: &[(&str, &str, &[&str])]) {
        let mut entries = String::new();
        for (name, role, prefixes) in users {
            let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
                .args(["token", "new", "--user", name, "--role", role])
                .args(prefixes.iter().flat_map(|p| ["--key-prefix", p]))
                .output()
                .unwrap();
            assert!(out.status.success());
            let text = String::from_utf8(out.stdout).unwrap();
            let mut lines = text.lines().filter(|l| !l.starts_with('#'));
            std::fs::write(self.token_file(name), lines.next().unwrap()).unwrap();
            for l in lines {
                entries.push_str(l);
                entries.push('\n');
            }
        }
        std::fs::write(&self.file, entries).unwrap();
    }

    fn token_file(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("{user}.token"))
    }

    fn token(&self, user: &str) -> String {
        format!("auth-file:{}", self.token_file(user).display())
    }

    fn path(&self) -> &str {
        self.file.to_str().unwrap()
    }
}

fn standard_users() -> Users {
    Users::new(&[
        ("reader", "read", &[]),
        ("writer", "write", &["app:"]),
        ("admin", "admin", &[]),
    ])
}

fn addr(s: &TestServer) -> String {
    s.addr.to_string()
}

// Goal: with a users file, an independent client gets UNAUTHENTICATED before Auth (HELLO
// and PING stay open), each role may do exactly its requests, key prefixes hold for single
// keys and MGET, and the third failed Auth closes the connection (logged with the peer).
#[test]
fn tokens_roles_and_prefixes_hold_for_an_independent_client() {
    let users = standard_users();
    let s = TestServer::start(&["--cores", "2", "--auth-users-file", users.path()]);
    let a = addr(&s);
    assert_eq!(
        probe(&a, &[], &["hello", "ping", "get:app:1", "set:app:1:v", "stats"]),
        [
            "ok hello auth_required=true",
            "ok ping",
            "err UNAUTHENTICATED",
            "err UNAUTHENTICATED",
            "err UNAUTHENTICATED"
        ]
    );
    assert_eq!(
        probe(&a, &[], &["auth:writer:0123", "get:app:1"]),
        ["err UNAUTHENTICATED", "err UNAUTHENTICATED"],
        "a wrong token authenticates nothing"
    );
    let writer = users.token("writer");
    assert_eq!(
        probe(
            &a,
            &[],
            &[
                &writer,
                "set:app:1:v1",
                "get:app:1",
                "set:other:v",
                "mget:app:1,other",
                "del:app:1",
                "stats",
                "snapshot"
            ]
        ),
        [
            "ok auth writer write",
            "ok set",
            "ok get v1",
            "err PERMISSION_DENIED",
            "err PERMISSION_DENIED",
            "ok del",
            "err PERMISSION_DENIED",
            "err PERMISSION_DENIED"
        ]
    );
    let reader = users.token("reader");
    assert_eq!(
        probe(
            &a,
            &[],
            &[&reader, "get:app:1", "mget:app:1,x", "set:app:2:v", "del:x", "stats"]
        ),
        [
            "ok auth reader read",
            "ok get (nil)",
            "ok mget",
            "err PERMISSION_DENIED",
            "err PERMISSION_DENIED",
            "err PERMISSION_DENIED"
        ]
    );
    let admin = users.token("admin");
    assert_eq!(
        probe(&a, &[], &[&admin, "set:any:v", "get:any", "stats", "del:any"]),
        ["ok auth admin admin", "ok set", "ok get v", "ok stats", "ok del"]
    );
    // Three failures close the connection, even after a success.
    assert_eq!(
        probe(
            &a,
            &[],
            &[&reader, "auth:reader:x", "auth:nobody:y", "auth:writer:z", "ping"]
        ),
        [
            "ok auth reader read",
            "err UNAUTHENTICATED",
            "err UNAUTHENTICATED",
            "err UNAUTHENTICATED",
            "closed"
        ]
    );
    let failures: u64 = s
        .stats_as(&users.token_file("admin"))
        .iter()
        .map(|c| c.auth_failures)
        .sum();
    assert!(failures >= 4, "Stats counts failed Auth requests: {failures}");
    let log = s.log_text();
    assert!(
        log.contains("authentication failed") && log.contains("127.0.0.1"),
        "failures are logged with the peer address:\n{log}"
    );

    // The Rust client authenticates with a token file too.
    let rt = common::rt();
    rt.block_on(async {
        let config = |token: Option<&Path>| ClientConfig {
            security: Security {
                credentials: token.map(|t| Credentials::from_file(t.to_str().unwrap()).unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Client::connect(&a, config(Some(&users.token_file("writer"))))
            .await
            .unwrap();
        c.set("app:rust", "1").await.unwrap();
        let e = c.set("other", "1").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
        // A backup copies every key: only admins may take one.
        let e = c.backup().await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
        let anonymous = Client::connect(&a, config(None)).await.unwrap();
        let e = anonymous.get("app:rust").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{e}");
    });
}

// Goal: SIGHUP reloads the users file: a removed token no longer authenticates new
// connections, while a connection that authenticated before keeps its role until it closes.
#[test]
fn sighup_reload_revokes_a_token_for_new_connections() {
    let users = standard_users();
    let s = TestServer::start(&["--cores", "1", "--auth-users-file", users.path()]);
    let mut old = s.connect();
    let token = std::fs::read_to_string(users.token_file("writer")).unwrap();
    let (user, secret) = token.split_once(':').unwrap();
    let r = old.call(Op::Auth(proto::AuthRequest {
        user: user.into(),
        token: secret.as_bytes().to_vec().into(),
    }));
    assert!(r.error.is_none(), "{r:?}");
    let writer = users.token("writer");
    let writer_file = users.token_file("writer");
    let saved = std::fs::read(&writer_file).unwrap();

    users.write(&[("reader", "read", &[]), ("admin", "admin", &[])]);
    std::fs::write(&writer_file, saved).unwrap(); // the old token, still on the client side
    s.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || probe(&addr(&s), &[], &[&writer])
            == ["err UNAUTHENTICATED"]),
        "the removed token still authenticates after SIGHUP; log:\n{}",
        s.log_text()
    );
    assert!(old.set(b"app:still", b"1"), "the open connection keeps its role");
    assert!(s.log_text().contains("reloaded the users file"));

    // A users file with a mistake keeps the previous table.
    std::fs::write(users.path(), "[[users]]\nname = 'x'\nrole = 'root'\n").unwrap();
    s.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(10), || s
        .log_text()
        .contains("reload failed")));
    assert_eq!(probe(&addr(&s), &[], &[&users.token("admin")]), ["ok auth admin admin"]);
}

/// TLS files for one server: a CA and a certificate for localhost / 127.0.0.1.
struct Tls {
    dir: tempfile::TempDir,
    ca: Ca,
    server: common::pki::Pair,
}

fn tls_files() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let server = ca.server("server");
    Tls { dir, ca, server }
}

/// A server whose port speaks TLS with `t`'s certificate.
fn start_tls(t: &Tls, args: &[&str]) -> TestServer {
    let tls = ["--tls-cert-file", t.server.cert(), "--tls-key-file", t.server.key()];
    TestServer::start(&[args, &tls[..]].concat())
}

/// Whether the Python client's only line says the connection was refused (during the
/// handshake, or at the first read: TLS 1.3 reports a refused client certificate there).
fn refused(out: &[String]) -> bool {
    out.len() == 1 && (out[0].starts_with("tls-error") || out[0] == "closed")
}

fn tls_client(ca: &str, credentials: Option<Credentials>) -> ClientConfig {
    ClientConfig {
        security: Security {
            tls: Some(ClientFiles::new(ca, "", "").client_config("test").unwrap()),
            server_name: None,
            credentials,
        },
        ..Default::default()
    }
}

// Goal: on a TLS port the handshake and requests work for Python's ssl module and the Rust
// client, and a plaintext client is closed promptly instead of left hanging.
#[test]
fn tls_port_serves_tls_and_refuses_plaintext() {
    let t = tls_files();
    let s = start_tls(&t, &["--cores", "2"]);
    let a = addr(&s);
    assert_eq!(
        probe(&a, &["--tls-ca", t.ca.cert()], &["ping", "set:k:v", "get:k", "hello"]),
        ["ok ping", "ok set", "ok get v", "ok hello auth_required=false"]
    );
    common::rt().block_on(async {
        let c = Client::connect(&format!("localhost:{}", s.addr.port()), tls_client(t.ca.cert(), None))
            .await
            .unwrap();
        c.set("rust", vec![7u8; 100_000]).await.unwrap();
        assert_eq!(c.get("rust").await.unwrap().unwrap().len(), 100_000);
        let keys: Vec<String> = (0..2000).map(|i| format!("m{i}")).collect();
        assert_eq!(c.mget(keys).await.unwrap().len(), 2000);
    });

    let mut plain = s.connect();
    let started = std::time::Instant::now();
    let req = plain.request(Op::Ping(proto::PingRequest::default()));
    plain.send(&req);
    assert!(plain.recv().is_none(), "a plaintext client gets no frame, only a close");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed promptly, not by a timeout"
    );
}

// Goal: under mutual TLS a certificate from the right CA is accepted (and its common name
// authenticates it as the matching user), while no certificate, one from another CA and an
// expired one are refused; a client that does not trust the server's CA refuses it too.
#[test]
fn mutual_tls_refuses_missing_foreign_and_expired_client_certificates() {
    let t = tls_files();
    let good = t.ca.client("good", "app-service");
    let expired = t.ca.expired_client("expired", "app-service");
    let other = Ca::new(t.dir.path(), "other");
    let foreign = other.client("foreign", "app-service");
    let users = Users::new(&[("admin", "admin", &[])]);
    let mut entries = std::fs::read_to_string(users.path()).unwrap();
    entries.push_str("[[users]]\nname = \"service\"\nrole = \"write\"\ncert_common_name = \"app-service\"\n");
    std::fs::write(users.path(), entries).unwrap();
    let s = start_tls(
        &t,
        &[
            "--cores",
            "1",
            "--tls-client-ca-file",
            t.ca.cert(),
            "--auth-users-file",
            users.path(),
        ],
    );
    let a = addr(&s);
    let ca = t.ca.cert();
    assert_eq!(
        probe(
            &a,
            &["--tls-ca", ca, "--cert", good.cert(), "--key", good.key()],
            &["set:k:v", "stats"]
        ),
        ["ok set", "err PERMISSION_DENIED"],
        "the certificate's common name authenticates it as user service (write)"
    );
    for (what, cert) in [("foreign CA", &foreign), ("expired", &expired)] {
        let out = probe(
            &a,
            &["--tls-ca", ca, "--cert", cert.cert(), "--key", cert.key()],
            &["ping"],
        );
        assert!(refused(&out), "{what}: {out:?}");
    }
    let out = probe(&a, &["--tls-ca", ca], &["ping"]);
    assert!(refused(&out), "no client certificate: {out:?}");
    let out = probe(
        &a,
        &["--tls-ca", other.cert(), "--cert", good.cert(), "--key", good.key()],
        &["ping"],
    );
    assert!(
        out.len() == 1 && out[0].starts_with("tls-error"),
        "a client with the wrong CA refuses the server: {out:?}"
    );
}

// Goal: SIGHUP loads a new certificate for new connections without dropping the open ones.
#[test]
fn certificate_reload_keeps_open_connections() {
    let t = tls_files();
    let s = start_tls(&t, &["--cores", "2"]);
    let a = addr(&s);
    let rt = common::rt();
    let open = rt
        .block_on(Client::connect(
            &format!("localhost:{}", s.addr.port()),
            ClientConfig {
                connections_per_endpoint: 1,
                ..tls_client(t.ca.cert(), None)
            },
        ))
        .unwrap();
    rt.block_on(open.set("before", "1")).unwrap();

    let renewed = Ca::new(t.dir.path(), "renewed");
    let next = renewed.server("server-next");
    std::fs::copy(&next.cert, &t.server.cert).unwrap();
    std::fs::copy(&next.key, &t.server.key).unwrap();
    s.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || probe(
            &a,
            &["--tls-ca", renewed.cert()],
            &["ping"]
        ) == ["ok ping"]),
        "new connections get the new certificate; log:\n{}",
        s.log_text()
    );
    let out = probe(&a, &["--tls-ca", t.ca.cert()], &["ping"]);
    assert!(out[0].starts_with("tls-error"), "the old certificate is gone: {out:?}");
    rt.block_on(async {
        open.set("after", "2").await.unwrap();
        assert_eq!(open.get("before").await.unwrap().as_deref(), Some(&b"1"[..]));
    });
}

/// A non-loopback address the test adds to this machine, removed on drop: on a dummy
/// interface the test creates, or where the kernel has no dummy driver, as a /32 on `lo`
/// (the address still is not a loopback address, which is what protected mode looks at).
struct TestAddress {
    /// The dummy interface, when one was made.
    link: Option<String>,
    pub ip: String,
}

impl TestAddress {
    /// None (with the reason printed) where the test may not add addresses.
    fn create() -> Option<TestAddress> {
        let id = std::process::id();
        let ip = format!("10.{}.{}.1", 200 + (id % 50), (id / 50) % 250);
        let run = |args: &[&str]| Command::new("ip").args(args).output();
        let name = format!("fluxt{}", id % 100_000);
        let link = match run(&["link", "add", &name, "type", "dummy"]) {
            Ok(o) if o.status.success() => Some(name),
            Ok(o) => {
                eprintln!(
                    "no dummy interface ({}); adding the address to lo instead",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: the ip command (iproute2) is not available: {e}");
                return None;
            }
        };
        let dev = link.clone().unwrap_or_else(|| "lo".into());
        let added = run(&["addr", "add", &format!("{ip}/32"), "dev", &dev]);
        let address = TestAddress { link, ip };
        match added {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot add an address (needs root and CAP_NET_ADMIN): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => panic!("ip addr add: {e}"),
        }
        if let Some(link) = &address.link {
            assert!(run(&["link", "set", link, "up"]).is_ok_and(|o| o.status.success()));
        }
        Some(address)
    }
}

impl Drop for TestAddress {
    fn drop(&mut self) {
        let _ = match &self.link {
            Some(link) => Command::new("ip").args(["link", "del", link]).output(),
            None => Command::new("ip")
                .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
                .output(),
        };
    }
}

// Goal: with auth off and a wildcard listen address, a peer from a non-loopback address is
// refused with PERMISSION_DENIED and a reason, loopback peers are served, and
// --protected-mode false serves everyone.
#[test]
fn protected_mode_refuses_non_loopback_peers() {
    let Some(iface) = TestAddress::create() else {
        return;
    };
    let s = TestServer::start(&["--cores", "1", "--listen", "0.0.0.0:0"]);
    let remote = format!("{}:{}", iface.ip, s.addr.port());
    assert_eq!(
        probe(&remote, &["--source-ip", &iface.ip], &["ping", "ping"]),
        ["err PERMISSION_DENIED", "closed"]
    );
    assert_eq!(
        probe(&format!("127.0.0.1:{}", s.addr.port()), &[], &["ping"]),
        ["ok ping"]
    );
    assert!(s.log_text().contains("protected mode"));
    let refused: u64 = s.stats().iter().map(|c| c.connections_refused_protected).sum();
    assert_eq!(refused, 1);

    let open = TestServer::start(&["--cores", "1", "--listen", "0.0.0.0:0", "--protected-mode", "false"]);
    let remote = format!("{}:{}", iface.ip, open.addr.port());
    assert_eq!(probe(&remote, &["--source-ip", &iface.ip], &["ping"]), ["ok ping"]);

    let users = standard_users();
    let authed = TestServer::start(&[
        "--cores",
        "1",
        "--listen",
        "0.0.0.0:0",
        "--auth-users-file",
        users.path(),
    ]);
    let remote = format!("{}:{}", iface.ip, authed.addr.port());
    assert_eq!(
        probe(&remote, &["--source-ip", &iface.ip], &[&users.token("reader"), "get:x"]),
        ["ok auth reader read", "ok get (nil)"],
        "with auth on, protected mode does not apply"
    );
}

/// A helper process (stunnel, etcd), ready once its port accepts connections; killed on drop.
struct Background(Child);

impl Background {
    fn start(mut cmd: Command, port: u16, what: &str) -> Background {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what} must be installed: {e}"));
        let process = Background(child);
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "{what} did not start"
        );
        process
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// stunnel (Debian stunnel4) terminating TLS in front of the local RabbitMQ.
struct Stunnel {
    _process: Background,
    port: u16,
}

impl Stunnel {
    fn start(dir: &Path, cert: &common::pki::Pair) -> Stunnel {
        let port = common::fixed_port();
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:5672\ncert = {}\nkey = {}\n",
                cert.cert(),
                cert.key()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("stunnel");
        cmd.arg(&conf);
        Stunnel {
            _process: Background::start(cmd, port, "stunnel (Debian stunnel4)"),
            port,
        }
    }
}

// Goal: change capture publishes over amqps:// (TLS to the broker, verified against the
// test's CA), with the URL and its password read from a file, and --print-config masks the
// password. flux-cdc-tail consumes over TLS as well, its password from --token-file.
#[test]
fn change_capture_over_amqps_with_the_url_from_a_file() {
    let t = tls_files();
    let tunnel = Stunnel::start(t.dir.path(), &t.server);
    let url_file = t.dir.path().join("amqp-url");
    std::fs::write(
        &url_file,
        format!("amqps://guest:guest@localhost:{}/%2f\n", tunnel.port),
    )
    .unwrap();
    let password_file = t.dir.path().join("amqp-password");
    std::fs::write(&password_file, "guest").unwrap();
    let exchange = unique("flux.tls");
    let tail_url = format!("amqps://guest:wrong@localhost:{}/%2f", tunnel.port);
    let tail = Tail::start(&[
        "--amqp-url",
        &tail_url,
        "--token-file",
        password_file.to_str().unwrap(),
        "--tls-ca",
        t.ca.cert(),
        "--exchange",
        &exchange,
        "--json",
        "--count",
        "50",
        "--idle-timeout",
        "30s",
    ]);
    let args = [
        "--cores",
        "2",
        "--cdc-enabled",
        "true",
        "--cdc-exchange",
        &exchange,
        "--cdc-amqp-url-file",
        url_file.to_str().unwrap(),
        "--cdc-tls-ca-file",
        t.ca.cert(),
        "--cdc-batch-delay-ms",
        "5",
    ];
    let s = TestServer::start(&args);
    let mut c = s.connect();
    for i in 0..50 {
        assert!(c.set(format!("k{i}").as_bytes(), b"v"));
    }
    let done = tail.finish();
    assert!(done.success, "{}", done.stderr);
    assert_eq!(done.events.len(), 50, "every change arrived over TLS");
    assert!(eventually(Duration::from_secs(10), || {
        s.stats_response()
            .cdc
            .is_some_and(|c| c.connected && c.events_published >= 50)
    }));

    let shown = Command::new(env!("CARGO_BIN_EXE_flux-server"))
        .args(["--cdc-amqp-url", "amqps://flux:hunter2@mq:5671/%2f", "--print-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(!text.contains("hunter2") && text.contains("flux:****@mq"), "{text}");
}

/// An etcd that serves only TLS and requires client certificates from `ca`.
struct TlsEtcd {
    _process: Background,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsEtcd {
    fn start(ca: &Ca, server: &common::pki::Pair) -> TlsEtcd {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port_pair();
        let peer = port + 1;
        let client = format!("https://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--cert-file", server.cert(), "--key-file", server.key()])
            .args(["--client-cert-auth", "--trusted-ca-file", ca.cert()]);
        TlsEtcd {
            _process: Background::start(cmd, port, "etcd (Debian etcd-server)"),
            port,
            _dir: dir,
        }
    }
}

// Goal: a node registers in an etcd that requires TLS and client certificates, and the
// cluster client finds it there (its own etcd TLS settings) and talks to it over TLS with a
// token (the node's TLS and auth settings).
#[test]
fn registration_and_routing_through_etcd_with_mutual_tls() {
    let t = tls_files();
    let etcd_client = t.ca.client("etcd-client", "flux");
    let etcd = TlsEtcd::start(&t.ca, &t.server);
    let endpoint = format!("https://127.0.0.1:{}", etcd.port);
    let users = standard_users();
    let s = TestServer::start(&[
        "--cores",
        "2",
        "--cluster-etcd-endpoints",
        &endpoint,
        "--cluster-node-id",
        "tls-node",
        "--cluster-etcd-tls-ca-file",
        t.ca.cert(),
        "--cluster-etcd-tls-cert-file",
        etcd_client.cert(),
        "--cluster-etcd-tls-key-file",
        etcd_client.key(),
        "--tls-cert-file",
        t.server.cert(),
        "--tls-key-file",
        t.server.key(),
        "--auth-users-file",
        users.path(),
    ]);
    let rt = common::rt();
    let config = ClientConfig {
        etcd_tls: ClientFiles::new(t.ca.cert(), etcd_client.cert(), etcd_client.key()),
        ..tls_client(
            t.ca.cert(),
            Some(Credentials::from_file(users.token_file("writer").to_str().unwrap()).unwrap()),
        )
    };
    rt.block_on(async {
        let cluster = flux_kv::client::Cluster::connect(std::slice::from_ref(&endpoint), "/flux", config)
            .await
            .unwrap();
        assert!(
            cluster
                .wait_for(Duration::from_secs(15), |n| n.iter().any(|n| n.node_id == "tls-node"))
                .await,
            "the node registered over TLS; log:\n{}",
            s.log_text()
        );
        cluster.set("app:via-etcd", "1").await.unwrap();
        assert_eq!(cluster.get("app:via-etcd").await.unwrap().as_deref(), Some(&b"1"[..]));
    });
    // Without a client certificate etcd refuses the connection.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &endpoint,
            "--cacert",
            t.ca.cert(),
            "--dial-timeout",
            "2s",
        ])
        .args(["get", "--prefix", "/flux/"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "etcd requires client certificates");
}
