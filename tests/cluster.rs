//! Registration and the slot table in a real etcd (Debian's etcd-server, one per test on
//! free ports), slot migration, and the cluster-aware client, with several server
//! processes on 127.0.0.1.
mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, TestServer};
use flux_kv::client::{ClientConfig, Cluster};
use flux_kv::cluster::slots::Table;
use flux_kv::cluster::NodeInfo;

/// One etcd member with its own ports and data dir; restartable on the same ports.
struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        e.restart();
        e
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn restart(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed");
        self.child = Some(child);
        let port = self.client_port;
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "etcd did not start"
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The slot table, read straight from etcd.
    fn table(&self, rt: &tokio::runtime::Runtime) -> Option<Table> {
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([self.endpoint()], None).await.ok()?;
            let r = c.get("/flux/slots", None).await.ok()?;
            Some(Table::decode(r.kvs().first()?.value()).unwrap())
        })
    }

    /// The registered nodes, read straight from etcd.
    fn nodes(&self, rt: &tokio::runtime::Runtime) -> Vec<NodeInfo> {
        rt.block_on(async {
            let Ok(mut c) = etcd_client::Client::connect([self.endpoint()], None).await else {
                return Vec::new();
            };
            let opts = etcd_client::GetOptions::new().with_prefix();
            let Ok(r) = c.get("/flux/nodes/", Some(opts)).await else {
                return Vec::new();
            };
            r.kvs()
                .iter()
                .map(|kv| serde_json::from_slice(kv.value()).unwrap())
                .collect()
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn node(etcd: &Etcd, id: &str) -> TestServer {
    let ep = etcd.endpoint();
    TestServer::start(&[
        "--cores",
        "2",
        "--cluster-etcd-endpoints",
        &ep,
        "--cluster-node-id",
        id,
        "--cluster-lease-ttl-ms",
        "2000",
    ])
}

fn ids(nodes: &[NodeInfo]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
    v.sort();
    v
}

/// Runs flux-cli against the cluster; panics with its stderr unless it succeeds.
fn cli(etcd: &Etcd, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--etcd", &etcd.endpoint(), "--timeout", "10s"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flux-cli {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Keys held by a node (all cores).
fn held(s: &TestServer) -> u64 {
    s.stats().iter().map(|c| c.keys).sum()
}

/// The node owning `key`'s slot in `table`.
fn owner(table: &Table, key: &[u8]) -> String {
    let slot = flux_kv::cluster::slots::slot_of(flux_kv::keyspace::Keyspace::hash(key), table.slots());
    table.owner(slot).to_string()
}

/// Starts the first node (which creates the slot table and owns every slot), then the
/// others, and waits until all are registered.
fn cluster_of(etcd: &Etcd, rt: &tokio::runtime::Runtime, ids_: &[&str]) -> Vec<TestServer> {
    let mut servers = vec![node(etcd, ids_[0])];
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(rt).len() == 1));
    for id in &ids_[1..] {
        servers.push(node(etcd, id));
    }
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(rt).len() == ids_.len()));
    servers
}

// Goal: three nodes register with correct JSON; the first creates the slot table with
// every slot, `cluster rebalance` spreads them; a client writes 10,000 keys through the
// cluster and reads them all back, each stored on the node that owns its slot (checked
// with per-node Stats); kill -9 of a node removes its key within TTL + 2 s, and its keys
// then fail fast with an error naming it; SIGTERM removes a node's key at once.
#[test]
fn three_nodes_route_keys_and_leave() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let mut servers = cluster_of(&etcd, &rt, &["n1", "n2", "n3"]);
    for info in etcd.nodes(&rt) {
        let i: usize = info.node_id[1..].parse().unwrap();
        let s = &servers[i - 1];
        assert_eq!(info.addr, s.addr.to_string());
        assert_eq!(
            (info.cores, info.shards, info.version.as_str()),
            (2, 256, env!("CARGO_PKG_VERSION"))
        );
        assert!(info.core_ports.is_empty());
        assert!(info.started_at_ms > 0);
    }
    let table = etcd.table(&rt).expect("the first node created the table");
    assert_eq!((table.slots(), table.slots_of("n1").len()), (4096, 4096));
    cli(&etcd, &["cluster", "rebalance"]);
    let table = etcd.table(&rt).unwrap();
    for id in ["n1", "n2", "n3"] {
        assert!((1365..=1366).contains(&table.slots_of(id).len()), "{id}");
    }

    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    assert_eq!(ids(&cluster.nodes()), ["n1", "n2", "n3"]);
    let keys: Vec<String> = (0..10_000).map(|i| format!("ck{i}")).collect();
    rt.block_on(async {
        for k in &keys {
            cluster.set(k.clone(), k.clone()).await.unwrap();
        }
        for k in &keys {
            assert_eq!(cluster.get(k.clone()).await.unwrap().unwrap(), k.as_bytes());
        }
    });
    for (i, s) in servers.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let expected = keys.iter().filter(|k| owner(&table, k.as_bytes()) == id).count();
        assert_eq!(held(s), expected as u64, "{id} holds the keys of its slots");
        assert!(expected > 2_500, "{id}: {expected}");
    }

    // kill -9: the lease is not renewed; the key goes within TTL + 2 s.
    servers[2].signal(libc::SIGKILL);
    let killed = Instant::now();
    servers[2].wait_exit(Duration::from_secs(5));
    // n3 still owns its slots: its keys fail fast with an error naming it.
    let n3_key = keys.iter().find(|k| owner(&table, k.as_bytes()) == "n3").unwrap();
    let started = Instant::now();
    let err = rt.block_on(cluster.get(n3_key.clone())).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("n3"), "the error names the node: {err}");
    assert!(eventually(Duration::from_secs(4), || ids(&etcd.nodes(&rt)) == ["n1", "n2"]));
    assert!(killed.elapsed() < Duration::from_secs(4));
    assert!(rt.block_on(cluster.wait_for(Duration::from_secs(2), |n| n.len() == 2)));
    let err = rt.block_on(cluster.get(n3_key.clone())).unwrap_err();
    assert!(err.to_string().contains("n3"), "{err}");
    let status = cli(&etcd, &["cluster", "status"]);
    assert!(
        status.contains("node n3 slots 136") && status.contains("NOT REGISTERED"),
        "{status}"
    );

    // SIGTERM: the lease is revoked first, so the key disappears at once.
    servers[1].signal(libc::SIGTERM);
    let termed = Instant::now();
    assert!(eventually(Duration::from_secs(2), || ids(&etcd.nodes(&rt)) == ["n1"]));
    assert!(
        termed.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        termed.elapsed()
    );
    assert!(servers[1].wait_exit(Duration::from_secs(10)).unwrap().success());
    servers.truncate(1);
}

// Goal: etcd away for longer than the lease TTL, then back: a registered node registers
// again by itself; a node started while etcd was down serves no key (CLUSTER_DOWN, since
// it cannot know which slots are its) and joins once etcd is up; a client that was
// following the members sees both.
#[test]
fn registration_survives_etcd_outage() {
    let rt = common::rt();
    let mut etcd = Etcd::start();
    let _a = node(&etcd, "a");
    assert!(eventually(Duration::from_secs(10), || ids(&etcd.nodes(&rt)) == ["a"]));
    // A client following the members must catch up after the outage as well.
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    assert_eq!(ids(&cluster.nodes()), ["a"]);
    etcd.stop();
    let b = node(&etcd, "b"); // starts without etcd
    let r = b
        .connect()
        .call(flux_kv::proto::request::Op::Set(flux_kv::proto::SetRequest {
            key: common::b(b"k"),
            value: common::b(b"v"),
            ..Default::default()
        }));
    assert_eq!(common::code(&r), Some(flux_kv::proto::ErrorCode::ClusterDown), "{r:?}");
    std::thread::sleep(Duration::from_millis(3_000)); // longer than the 2 s TTL
    etcd.restart();
    assert!(
        eventually(Duration::from_secs(15), || ids(&etcd.nodes(&rt)) == ["a", "b"]),
        "registered: {:?}",
        ids(&etcd.nodes(&rt))
    );
    assert!(
        rt.block_on(cluster.wait_for(Duration::from_secs(15), |n| n.len() == 2)),
        "the client sees {:?}",
        ids(&cluster.nodes())
    );
    // b owns nothing yet: the key goes to a, through either node.
    rt.block_on(cluster.set("k", "v")).unwrap();
    let r = b
        .connect()
        .call(flux_kv::proto::request::Op::Get(flux_kv::proto::GetRequest {
            key: common::b(b"k"),
        }));
    let e = r.error.expect("b does not own the slot");
    assert_eq!((e.code(), e.node_id.as_str()), (flux_kv::proto::ErrorCode::Moved, "a"));
}

// Goal: a second live node with the same node_id refuses to register and says why.
#[test]
fn duplicate_node_id_is_refused() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let first = node(&etcd, "dup");
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 1));
    let second = node(&etcd, "dup");
    assert!(
        eventually(Duration::from_secs(5), || second
            .log_text()
            .contains("another live node is registered")),
        "{}",
        second.log_text()
    );
    let nodes = etcd.nodes(&rt);
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].addr,
        first.addr.to_string(),
        "the first node keeps its registration"
    );
}

// Goal: flux-cli and flux-bench find the nodes through --etcd: `nodes` lists the members,
// keys go to the node owning their slot, and a bench run spreads over both nodes.
#[test]
fn cli_and_bench_through_etcd() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let servers = cluster_of(&etcd, &rt, &["c1", "c2"]);
    cli(&etcd, &["cluster", "rebalance"]);
    let nodes = cli(&etcd, &["nodes"]);
    assert!(
        nodes.contains(&format!("c1 {}", servers[0].addr)) && nodes.contains(&format!("c2 {}", servers[1].addr)),
        "{nodes}"
    );
    assert_eq!(cli(&etcd, &["set", "routed", "yes"]), "OK\n");
    assert_eq!(cli(&etcd, &["get", "routed"]), "\"yes\"\n");
    let i = if owner(&etcd.table(&rt).unwrap(), b"routed") == "c1" {
        0
    } else {
        1
    };
    assert_eq!(servers[i].connect().get(b"routed").as_deref(), Some(&b"yes"[..]));

    let out = Command::new(env!("CARGO_BIN_EXE_flux-bench"))
        .args(["--etcd", &etcd.endpoint(), "-c", "4", "-n", "2000", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["requests"].as_u64(), v["errors"].as_u64(), v["nodes"].as_u64()),
        (Some(2000), Some(0), Some(2))
    );
    let held: Vec<u64> = servers.iter().map(held).collect();
    assert_eq!(held.iter().sum::<u64>(), 2001, "2,000 bench keys and `routed`");
    assert!(held.iter().all(|h| *h > 500), "{held:?}");
}

/// Writes `keys` as `key -> value` through the cluster client, 16 at a time.
fn write_all(rt: &tokio::runtime::Runtime, cluster: &Cluster, keys: &[(String, String)]) {
    rt.block_on(async {
        let mut tasks = Vec::new();
        for chunk in keys.chunks(keys.len().div_ceil(16)) {
            let (cluster, chunk) = (cluster.clone(), chunk.to_vec());
            tasks.push(tokio::spawn(async move {
                for (k, v) in chunk {
                    cluster.set(k, v).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// The values each key may hold: one, or after writes that failed (and so may or may not
/// have been applied, as with any store), the last acknowledged one and those attempts.
type Expect = std::collections::HashMap<String, Vec<String>>;

fn exactly(values: impl IntoIterator<Item = (String, String)>) -> Expect {
    values.into_iter().map(|(k, v)| (k, vec![v])).collect()
}

/// Records writes in the order they were made: an acknowledged one replaces what the key
/// may hold, a failed one adds a possibility.
fn record(expect: &mut Expect, writes: Vec<(String, String, bool)>) {
    for (k, v, acked) in writes {
        let may = expect.entry(k).or_default();
        if acked {
            may.clear();
        }
        may.push(v);
    }
}

/// Every key reads back as one of its expected values through a fresh cluster client;
/// returns how many did not.
fn missing(rt: &tokio::runtime::Runtime, etcd: &Etcd, expect: &Expect) -> usize {
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    let expect: Vec<(String, Vec<String>)> = expect.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for chunk in expect.chunks(expect.len().div_ceil(16).max(1)) {
            let (cluster, chunk) = (cluster.clone(), chunk.to_vec());
            tasks.push(tokio::spawn(async move {
                let mut bad = 0;
                for (k, v) in chunk {
                    match cluster.get(k.clone()).await {
                        Ok(Some(got)) if v.iter().any(|v| got == v.as_bytes()) => {}
                        other => {
                            if bad < 3 {
                                eprintln!("{k}: expected one of {v:?}, got {other:?}");
                            }
                            bad += 1;
                        }
                    }
                }
                bad
            }));
        }
        let mut bad = 0;
        for t in tasks {
            bad += t.await.unwrap();
        }
        bad
    })
}

/// The table has no migration left and every slot belongs to one of `live`; each sampled
/// key is served (answered without MOVED) by exactly one node.
fn consistent(rt: &tokio::runtime::Runtime, etcd: &Etcd, servers: &[&TestServer], live: &[&str], keys: &[String]) {
    let table = etcd.table(rt).unwrap();
    assert!(table.migrations.is_empty(), "{:?}", table.migrations);
    for (node, _) in table.counts() {
        assert!(live.contains(&node.as_str()), "{node} owns slots but is not live");
    }
    let mut clients: Vec<common::Client> = servers.iter().map(|s| s.connect()).collect();
    for k in keys.iter().step_by((keys.len() / 300).max(1)) {
        let mut serving = 0;
        for c in clients.iter_mut() {
            let r = c.call(flux_kv::proto::request::Op::Get(flux_kv::proto::GetRequest {
                key: common::b(k.as_bytes()),
            }));
            serving += usize::from(r.error.is_none());
        }
        assert_eq!(serving, 1, "{k} is served by {serving} nodes");
    }
}

// Goal (the first test): 3 nodes hold 20,000 keys each; a fourth joins and
// `flux-cli cluster rebalance` runs while a client keeps writing and reading through the
// cluster client. The client sees no error (MOVED and TRY_AGAIN are followed inside it),
// every acknowledged write reads back afterwards, and each node ends with 20-30 % of the
// keys.
#[test]
fn rebalance_under_load_loses_nothing() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let mut servers = cluster_of(&etcd, &rt, &["r1", "r2", "r3"]);
    cli(&etcd, &["cluster", "rebalance"]);
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    let keys: Vec<(String, String)> = (0..60_000).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
    write_all(&rt, &cluster, &keys);
    for s in &servers {
        assert!((18_000..=22_000).contains(&held(s)), "{}", held(s));
    }
    servers.push(node(&etcd, "r4"));
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 4));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        rt.spawn(async move {
            let mut acked = std::collections::HashMap::new();
            let (mut errors, mut ops) = (Vec::new(), 0u64);
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                for j in 0..64u64 {
                    // Overwrites spread over every slot, and reads of what was written.
                    let k = format!("k{}", (round * 64 + j) * 7919 % 60_000);
                    let v = format!("w{round}-{j}");
                    match cluster.set(k.clone(), v.clone()).await {
                        Ok(()) => {
                            acked.insert(k.clone(), v.clone());
                        }
                        Err(e) => errors.push(format!("set {k}: {e}")),
                    }
                    match cluster.get(k.clone()).await {
                        Ok(Some(got)) if got == v.as_bytes() => {}
                        other => errors.push(format!("get {k}: {other:?}")),
                    }
                    ops += 2;
                }
            }
            (acked, errors, ops)
        })
    };
    let rebalance = Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--etcd", &etcd.endpoint(), "cluster", "rebalance"])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, errors, ops) = rt.block_on(load).unwrap();
    assert!(
        rebalance.status.success(),
        "{}",
        String::from_utf8_lossy(&rebalance.stderr)
    );
    println!("{}", String::from_utf8_lossy(&rebalance.stdout));
    assert!(
        errors.is_empty(),
        "{} errors in {ops} operations: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ops > 1_000, "the load ran during the rebalance: {ops} operations");

    let mut expect = exactly(keys);
    expect.extend(exactly(acked));
    assert_eq!(missing(&rt, &etcd, &expect), 0);
    let names: Vec<String> = expect.keys().cloned().collect();
    consistent(
        &rt,
        &etcd,
        &servers.iter().collect::<Vec<_>>(),
        &["r1", "r2", "r3", "r4"],
        &names,
    );
    // Sources drop what they copied away in the background.
    assert!(
        eventually(Duration::from_secs(20), || servers.iter().map(held).sum::<u64>()
            == 60_000),
        "{:?}",
        servers.iter().map(held).collect::<Vec<_>>()
    );
    for s in &servers {
        let share = held(s) as f64 / 60_000.0;
        assert!((0.20..=0.30).contains(&share), "{share}");
    }
}

// Goal: `cluster drain` moves every key off a node, which can then stop without losing
// any.
#[test]
fn drain_moves_every_key_off_a_node() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let mut servers = cluster_of(&etcd, &rt, &["d1", "d2", "d3"]);
    cli(&etcd, &["cluster", "rebalance"]);
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    let keys: Vec<(String, String)> = (0..9_000).map(|i| (format!("dk{i}"), format!("dv{i}"))).collect();
    write_all(&rt, &cluster, &keys);
    assert!(held(&servers[1]) > 2_000);
    let out = cli(&etcd, &["cluster", "drain", "d2"]);
    assert!(out.contains("d2 owns no slots"), "{out}");
    assert!(etcd.table(&rt).unwrap().slots_of("d2").is_empty());
    assert!(
        eventually(Duration::from_secs(20), || held(&servers[1]) == 0),
        "{}",
        held(&servers[1])
    );
    servers[1].signal(libc::SIGTERM);
    assert!(servers[1].wait_exit(Duration::from_secs(10)).unwrap().success());
    let expect = exactly(keys);
    assert_eq!(missing(&rt, &etcd, &expect), 0);
}

/// A node with its own port and data directory, restartable after kill -9.
struct Durable {
    id: &'static str,
    port: u16,
    dir: tempfile::TempDir,
    server: Option<TestServer>,
}

impl Durable {
    fn new(id: &'static str) -> Durable {
        Durable {
            id,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            server: None,
        }
    }

    fn start(&mut self, etcd: &Etcd) {
        let listen = format!("127.0.0.1:{}", self.port);
        let ep = etcd.endpoint();
        self.server = Some(TestServer::start_in(
            self.dir.path(),
            &[
                "--listen",
                &listen,
                "--cores",
                "2",
                "--cluster-slots",
                "256",
                "--persistence-fsync",
                "always",
                "--cluster-etcd-endpoints",
                &ep,
                "--cluster-node-id",
                self.id,
                "--cluster-lease-ttl-ms",
                "2000",
            ],
        ));
    }

    fn kill(&mut self) {
        let mut s = self.server.take().unwrap();
        s.signal(libc::SIGKILL);
        s.wait_exit(Duration::from_secs(5));
    }

    fn s(&self) -> &TestServer {
        self.server.as_ref().unwrap()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `id` is registered by an instance started at or after `since_ms`.
fn registered_since(etcd: &Etcd, rt: &tokio::runtime::Runtime, id: &str, since_ms: u64) -> bool {
    etcd.nodes(rt)
        .iter()
        .any(|n| n.node_id == id && n.started_at_ms >= since_ms)
}

/// Spawns flux-cli with `args` against the cluster, output discarded.
fn spawn_cli(etcd: &Etcd, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flux-cli"))
        .args(["--etcd", &etcd.endpoint()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

// Goal: kill -9 of the source mid-migration, then of the target, then of the driving CLI;
// each time, after restarts and a re-run of the command, no key is lost (including writes
// acknowledged during the migration), no slot has two owners, and the table holds no
// migration and only live owners.
#[test]
fn kill_nine_mid_migration_loses_nothing() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let mut nodes = [Durable::new("m1"), Durable::new("m2"), Durable::new("m3")];
    nodes[0].start(&etcd);
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 1));
    nodes[1].start(&etcd);
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 2));
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    let keys: Vec<(String, String)> = (0..20_000).map(|i| (format!("mk{i}"), format!("mv{i}"))).collect();
    write_all(&rt, &cluster, &keys);
    let mut expect = exactly(keys);
    let names: Vec<String> = expect.keys().cloned().collect();
    let slots_of = |id: &str| etcd.table(&rt).map_or(0, |t| t.slots_of(id).len());

    // A writer during each round: acknowledged writes must read back; a failed one may or
    // may not have been applied (the node can apply it and die before answering).
    let writer = |round: u32| {
        let cluster = cluster.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = rt.spawn(async move {
            let mut writes = Vec::new();
            let mut i = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let k = format!("mk{}", i * 7919 % 20_000);
                let v = format!("r{round}-{i}");
                let acked = cluster.set(k.clone(), v.clone()).await.is_ok();
                writes.push((k, v, acked));
                if !acked {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            writes
        });
        (stop, task)
    };

    // 1. The source dies mid-migration.
    let (stop, task) = writer(1);
    let mut run = spawn_cli(&etcd, &["cluster", "rebalance", "--parallel", "4"]);
    assert!(
        eventually(Duration::from_secs(60), || slots_of("m2") >= 10),
        "no slot moved"
    );
    nodes[0].kill();
    let _ = run.kill();
    let _ = run.wait();
    assert!(
        slots_of("m2") < 128,
        "the source was killed after the rebalance, not during it"
    );
    let restarted = now_ms();
    nodes[0].start(&etcd);
    // It registers once its old lease (2 s) has expired.
    assert!(eventually(Duration::from_secs(15), || registered_since(
        &etcd, &rt, "m1", restarted
    )));
    cli(&etcd, &["cluster", "rebalance"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    record(&mut expect, rt.block_on(task).unwrap());
    assert_eq!((slots_of("m1"), slots_of("m2")), (128, 128));
    assert_eq!(missing(&rt, &etcd, &expect), 0, "after the source's kill -9");
    consistent(&rt, &etcd, &[nodes[0].s(), nodes[1].s()], &["m1", "m2"], &names);

    // 2. The target dies mid-migration.
    nodes[2].start(&etcd);
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 3));
    let (stop, task) = writer(2);
    let mut run = spawn_cli(&etcd, &["cluster", "rebalance", "--parallel", "4"]);
    assert!(
        eventually(Duration::from_secs(60), || slots_of("m3") >= 5),
        "no slot moved"
    );
    nodes[2].kill();
    let _ = run.kill();
    let _ = run.wait();
    assert!(
        slots_of("m3") < 85,
        "the target was killed after the rebalance, not during it"
    );
    let restarted = now_ms();
    nodes[2].start(&etcd);
    assert!(eventually(Duration::from_secs(15), || registered_since(
        &etcd, &rt, "m3", restarted
    )));
    cli(&etcd, &["cluster", "rebalance"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    record(&mut expect, rt.block_on(task).unwrap());
    assert!((85..=86).contains(&slots_of("m3")), "{}", slots_of("m3"));
    assert_eq!(missing(&rt, &etcd, &expect), 0, "after the target's kill -9");
    let all = [nodes[0].s(), nodes[1].s(), nodes[2].s()];
    consistent(&rt, &etcd, &all, &["m1", "m2", "m3"], &names);

    // 3. The CLI driving a drain dies; run again, it finishes.
    let mut run = spawn_cli(&etcd, &["cluster", "drain", "m3", "--parallel", "2"]);
    assert!(
        eventually(Duration::from_secs(60), || slots_of("m3") <= 80),
        "no slot moved"
    );
    run.kill().unwrap();
    let _ = run.wait();
    assert!(slots_of("m3") > 0, "the CLI was killed after the drain, not during it");
    let out = cli(&etcd, &["cluster", "drain", "m3"]);
    assert!(out.contains("m3 owns no slots"), "{out}");
    assert_eq!(missing(&rt, &etcd, &expect), 0, "after the CLI's kill -9");
    consistent(&rt, &etcd, &all, &["m1", "m2"], &names);
    assert!(eventually(Duration::from_secs(20), || held(nodes[2].s()) == 0));
    let total: u64 = nodes.iter().map(|n| held(n.s())).sum();
    assert_eq!(total, 20_000, "each key is held once");
}

// Goal: a client whose view is stale is redirected and follows: a node that does not own
// a key answers MOVED naming the owner and its address, where the key is served; HELLO
// reports the slot count and the table version; a node whose cluster.slots disagrees with
// the cluster's refuses to join and says why.
#[test]
fn stale_clients_are_redirected() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let servers = cluster_of(&etcd, &rt, &["s1", "s2"]);
    let before = etcd.table(&rt).unwrap().version;
    cli(&etcd, &["cluster", "move", "7", "s2"]);
    let table = etcd.table(&rt).unwrap();
    assert!(table.version > before);
    assert_eq!(table.owner(7), "s2");
    // A key of slot 7, written to its owner.
    let key = (0..)
        .map(|i| format!("stale{i}"))
        .find(|k| owner(&table, k.as_bytes()) == "s2")
        .unwrap();
    let mut s1 = servers[0].connect();
    let r = s1.call(flux_kv::proto::request::Op::Set(flux_kv::proto::SetRequest {
        key: common::b(key.as_bytes()),
        value: common::b(b"here"),
        ..Default::default()
    }));
    let e = r.error.expect("s1 no longer owns the slot");
    assert_eq!(e.code(), flux_kv::proto::ErrorCode::Moved);
    assert_eq!(
        (e.node_id.as_str(), e.addr.as_str()),
        ("s2", servers[1].addr.to_string().as_str())
    );
    let mut s2 = common::Client::connect(e.addr.parse().unwrap());
    assert!(s2.set(key.as_bytes(), b"here"));
    assert_eq!(s2.get(key.as_bytes()).as_deref(), Some(&b"here"[..]));
    let hello = match s2.call(flux_kv::proto::request::Op::Hello(Default::default())).result {
        Some(flux_kv::proto::response::Result::Hello(h)) => h,
        other => panic!("{other:?}"),
    };
    assert!(eventually(Duration::from_secs(5), || {
        match servers[1]
            .connect()
            .call(flux_kv::proto::request::Op::Hello(Default::default()))
            .result
        {
            Some(flux_kv::proto::response::Result::Hello(h)) => h.slot_table_version >= table.version,
            _ => false,
        }
    }));
    assert_eq!(hello.slots, 4096);
    // The Rust cluster client reads it wherever it believes the slot is.
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    assert_eq!(
        rt.block_on(cluster.get(key.clone())).unwrap().as_deref(),
        Some(&b"here"[..])
    );

    // cluster.slots must match the cluster's.
    let odd = TestServer::start(&[
        "--cores",
        "1",
        "--cluster-etcd-endpoints",
        &etcd.endpoint(),
        "--cluster-node-id",
        "odd",
        "--cluster-slots",
        "1024",
    ]);
    assert!(
        eventually(Duration::from_secs(10), || odd.log_text().contains("does not join")),
        "{}",
        odd.log_text()
    );
    let r = odd
        .connect()
        .call(flux_kv::proto::request::Op::Get(flux_kv::proto::GetRequest {
            key: common::b(b"x"),
        }));
    let e = r.error.expect("refused");
    assert_eq!(e.code(), flux_kv::proto::ErrorCode::ClusterDown);
    assert!(e.message.contains("cluster.slots"), "{}", e.message);
    assert_eq!(ids(&etcd.nodes(&rt)), ["s1", "s2"], "the odd node did not register");
}

// Goal: with cluster.auto_rebalance on, nobody runs a command: the nodes elect a leader in
// etcd, and after a node joins the leader evens the slots out by itself, with the keys.
#[test]
fn auto_rebalance_moves_slots_after_a_join() {
    let rt = common::rt();
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let auto = |id: &str| {
        TestServer::start(&[
            "--cores",
            "1",
            "--cluster-etcd-endpoints",
            &ep,
            "--cluster-node-id",
            id,
            "--cluster-slots",
            "256",
            "--cluster-auto-rebalance",
            "true",
        ])
    };
    let first = auto("a1");
    assert!(eventually(Duration::from_secs(10), || etcd.nodes(&rt).len() == 1));
    let cluster = rt
        .block_on(Cluster::connect(&[etcd.endpoint()], "/flux", ClientConfig::default()))
        .unwrap();
    let keys: Vec<(String, String)> = (0..3_000).map(|i| (format!("ak{i}"), format!("av{i}"))).collect();
    write_all(&rt, &cluster, &keys);
    let second = auto("a2");
    assert!(
        eventually(Duration::from_secs(60), || {
            etcd.table(&rt)
                .is_some_and(|t| t.slots_of("a2").len() == 128 && t.migrations.is_empty())
        }),
        "{:?}",
        etcd.table(&rt).map(|t| t.counts())
    );
    let leader = [&first, &second]
        .iter()
        .filter(|s| s.log_text().contains("leads automatic rebalancing"))
        .count();
    assert_eq!(leader, 1, "one leader");
    let expect = exactly(keys);
    assert_eq!(missing(&rt, &etcd, &expect), 0);
    assert!(eventually(Duration::from_secs(20), || held(&first) + held(&second) == 3_000));
    assert!(held(&second) > 1_000, "{}", held(&second));
}
