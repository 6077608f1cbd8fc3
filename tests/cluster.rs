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
