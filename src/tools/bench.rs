//! flux-bench: a load generator with the old benchmark's flags and workload, latency
//! histograms, and per-core figures from the server's Stats.
//!
//! Each connection runs a tight loop: claim up to `--pipeline` requests from a shared
//! counter, write them in one write, read their replies, record the batch latency for each
//! request (as redis-benchmark does). `--protocol resp` speaks Redis' protocol with the same
//! loop, so Flux-KV and Redis can be compared with one and the same client.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Client, ClientConfig, Stream};
use crate::cluster::slots::{slot_of, Table};
use crate::keyspace::Keyspace;
use crate::proto::{self, request::Op, CoreStats, Request, Response};
use crate::wire;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "flux-bench",
    version,
    about = "Load generator for Flux-KV (and Redis, with --protocol resp)"
)]
pub struct Args {
    /// Connections.
    #[arg(short = 'c', long = "connections", default_value_t = 100)]
    pub connections: usize,
    /// Total requests (ignored with --duration).
    #[arg(short = 'n', long = "requests", default_value_t = 100_000)]
    pub requests: u64,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7379")]
    pub addr: SocketAddr,
    /// SET:GET ratio, e.g. 1:0 (only SET, the default), 1:9.
    #[arg(long, default_value = "1:0", value_parser = parse_ratio)]
    pub ratio: (u32, u32),
    /// Requests each connection sends before reading replies.
    #[arg(short = 'P', long, default_value_t = 1)]
    pub pipeline: usize,
    /// Fixed value size; default: the old workload's values `value_<0..999>`.
    #[arg(long)]
    pub value_bytes: Option<usize>,
    /// Key space: random keys `key:<0..N>`; default: the old workload's `user_<conn>_<i>`.
    #[arg(long)]
    pub keys: Option<u64>,
    /// Requests per second over all connections (paced per connection); 0 = as fast as the
    /// server answers. For latency at a given load, such as change capture's
    /// write-to-confirm delay.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Run for this long instead of a request count (10s, 1m).
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Send each key straight to its owner core's port (needs the server's core_port_base).
    #[arg(long)]
    pub shard_aware: bool,
    /// Find the nodes through etcd (comma-separated endpoints) instead of --addr, and send
    /// each key to the node owning its slot.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd key prefix the nodes register under (with --etcd).
    #[arg(long, default_value = "/flux")]
    pub prefix: String,
    /// With --etcd and --duration: send every request through the cluster client, which
    /// follows slots as they move (MOVED, TRY_AGAIN), one request at a time per
    /// connection, and report a timeline of throughput and slowest request per interval:
    /// the load for measuring a rebalance.
    #[arg(long, requires = "etcd", requires = "duration")]
    pub follow_slots: bool,
    /// The timeline's interval, in ms (with --follow-slots).
    #[arg(long, default_value_t = 100)]
    pub timeline_ms: u64,
    /// One JSON object on stdout instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Client threads (tokio workers); 1 = a single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Wire protocol: flux (protobuf frames) or resp (Redis, for side-by-side runs).
    #[arg(long, value_enum, default_value_t = Protocol::Flux)]
    pub protocol: Protocol,
    /// TLS (`--tls`, `--tls-ca`, ...) and `--token-file`: every connection is opened as a
    /// secured client would (handshake and Auth are outside the measured time).
    #[command(flatten)]
    pub security: super::SecurityArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Flux,
    Resp,
}

fn parse_ratio(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once(':').ok_or("ratio is SET:GET, e.g. 1:9")?;
    let a: u32 = a.trim().parse().map_err(|_| "ratio is SET:GET, e.g. 1:9")?;
    let b: u32 = b.trim().parse().map_err(|_| "ratio is SET:GET, e.g. 1:9")?;
    if a + b == 0 {
        return Err("ratio must not be 0:0".into());
    }
    Ok((a, b))
}

/// Limits that keep the tool itself bounded.
const CONNECTIONS_MAX: usize = 10_000;
const PIPELINE_MAX: usize = 10_000;
const REPLY_FRAME_BYTES_MAX: usize = 64 << 20;

pub fn main() -> ExitCode {
    let args = Args::parse();
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        eprintln!("flux-bench: -c must be between 1 and {CONNECTIONS_MAX}");
        return ExitCode::from(2);
    }
    if args.pipeline == 0 || args.pipeline > PIPELINE_MAX {
        eprintln!("flux-bench: --pipeline must be between 1 and {PIPELINE_MAX}");
        return ExitCode::from(2);
    }
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flux-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flux-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where each request goes when there is more than one place to send it.
enum Routing {
    /// One connection per core port; the key's owner core.
    Cores(Keyspace, Vec<SocketAddr>),
    /// One connection per cluster node; the owner of the key's slot in the table read at
    /// the start (a run during a slot migration counts MOVED answers as errors).
    Nodes(Table, Vec<String>, Vec<SocketAddr>),
}

impl Routing {
    fn addrs(&self) -> &[SocketAddr] {
        match self {
            Routing::Cores(_, a) | Routing::Nodes(_, _, a) => a,
        }
    }

    fn target(&self, key: &[u8]) -> usize {
        match self {
            Routing::Cores(ks, _) => ks.core_of(key) as usize,
            Routing::Nodes(table, ids, _) => {
                let owner = table.owner(slot_of(Keyspace::hash(key), table.slots()));
                ids.iter().position(|id| id == owner).unwrap_or(0)
            }
        }
    }
}

/// What every connection needs to build its requests.
struct Plan {
    args: Args,
    /// TLS and credentials for every connection.
    client: ClientConfig,
    routing: Option<Routing>,
    issued: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    deadline: Option<Instant>,
    /// The values requests use, built once: `value_<0..999>`, or one fixed-size value.
    values: Vec<Bytes>,
}

impl Plan {
    /// Claims up to `want` requests; 0 when the run is over.
    fn claim(&self, want: usize) -> usize {
        if let Some(d) = self.deadline {
            return if Instant::now() < d { want } else { 0 };
        }
        let start = self.issued.fetch_add(want as u64, Ordering::Relaxed);
        self.args.requests.saturating_sub(start).min(want as u64) as usize
    }

    /// The i-th request of connection `conn`: (is_set, key, value). Cheap on purpose: the
    /// load generator must not be what limits the measurement.
    fn request(&self, conn: usize, i: u64, key: &mut Vec<u8>) -> (bool, Bytes, Bytes) {
        let (sets, gets) = self.args.ratio;
        let is_set = (i % u64::from(sets + gets)) < u64::from(sets);
        let mut num = itoa::Buffer::new();
        key.clear();
        match self.args.keys {
            Some(n) => {
                key.extend_from_slice(b"key:");
                key.extend_from_slice(num.format(fastrand::u64(0..n.max(1))).as_bytes());
            }
            None => {
                key.extend_from_slice(b"user_");
                key.extend_from_slice(num.format(conn).as_bytes());
                key.push(b'_');
                key.extend_from_slice(num.format(i).as_bytes());
            }
        }
        let value = self.values[(i % self.values.len() as u64) as usize].clone();
        (is_set, Bytes::copy_from_slice(key), value)
    }
}

async fn run(args: Args) -> Result<u64, String> {
    let mut client_config = ClientConfig::default();
    args.security.apply(&mut client_config)?;
    if args.follow_slots {
        return follow_slots(args, client_config).await;
    }
    let routing = if !args.etcd.is_empty() {
        let cluster = crate::client::Cluster::connect(&args.etcd, &args.prefix, client_config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let nodes = cluster.nodes();
        let table = cluster.table();
        let (false, Some(table)) = (nodes.is_empty(), table) else {
            return Err("no nodes are registered in etcd".into());
        };
        let addrs = nodes
            .iter()
            .map(|n| {
                n.addr
                    .parse()
                    .map_err(|_| format!("node {} has a bad address {:?}", n.node_id, n.addr))
            })
            .collect::<Result<Vec<SocketAddr>, String>>()?;
        Some(Routing::Nodes(
            table,
            nodes.into_iter().map(|n| n.node_id).collect(),
            addrs,
        ))
    } else if args.shard_aware && args.protocol == Protocol::Flux {
        let client = Client::connect_addr(
            args.addr,
            ClientConfig {
                shard_aware: true,
                ..client_config.clone()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let h = client.hello();
        if h.core_ports.is_empty() {
            return Err("--shard-aware needs a server started with --core-port-base".into());
        }
        let ports = h
            .core_ports
            .iter()
            .map(|p| SocketAddr::new(args.addr.ip(), *p as u16))
            .collect();
        Some(Routing::Cores(*client.keyspace(), ports))
    } else {
        None
    };
    let before = stats(&args, &client_config).await;
    let plan = Arc::new(Plan {
        values: match args.value_bytes {
            // Distinct, incompressible values, so servers that compress (Redis RDB) are
            // measured on realistic data.
            Some(n) => {
                let mut rng = fastrand::Rng::with_seed(n as u64);
                (0..1000)
                    .map(|_| Bytes::from((0..n).map(|_| rng.alphanumeric() as u8).collect::<Vec<u8>>()))
                    .collect()
            }
            None => (0..1000).map(|i| Bytes::from(format!("value_{i}"))).collect(),
        },
        deadline: args.duration.map(|d| Instant::now() + d),
        args,
        client: client_config,
        routing,
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let progress = progress_bar(&plan);
    let cpu_before = cpu_time();
    let started = Instant::now();
    let workers: Vec<_> = (0..plan.args.connections)
        .map(|conn| tokio::spawn(worker(plan.clone(), conn)))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    for w in workers {
        match w.await {
            Ok(Ok(h)) => hist.add(&h).map_err(|e| e.to_string())?,
            Ok(Err(e)) => {
                eprintln!("flux-bench: connection failed: {e}");
            }
            Err(e) => eprintln!("flux-bench: worker panicked: {e}"),
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let after = stats(&plan.args, &plan.client).await;
    report(&plan, &hist, wall, cpu, before.as_deref(), after.as_deref());
    Ok(plan.errors.load(Ordering::Relaxed))
}

/// One connection (or one per core, shard-aware) running its request loop.
async fn worker(plan: Arc<Plan>, conn: usize) -> Result<Histogram<u64>, String> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let addrs: Vec<SocketAddr> = match &plan.routing {
        Some(r) => r.addrs().to_vec(),
        None => vec![plan.args.addr],
    };
    let mut streams = Vec::with_capacity(addrs.len());
    for a in &addrs {
        let c = &plan.client;
        let s = crate::client::open(*a, &c.security, c.connect_timeout)
            .await
            .map_err(|e| format!("connect {a}: {e}"))?;
        streams.push(s);
    }
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); streams.len()];
    let mut expected: Vec<usize> = vec![0; streams.len()];
    let mut input: Vec<BytesMut> = (0..streams.len()).map(|_| BytesMut::with_capacity(64 << 10)).collect();
    let mut i: u64 = 0;
    let mut id: u64 = 0;
    let mut key = Vec::with_capacity(64);
    // With --rate, this connection's batches start on a fixed schedule, offset per
    // connection so the load is spread over each interval.
    let a = &plan.args;
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64((a.pipeline * a.connections) as f64 / a.rate as f64));
    let began = tokio::time::Instant::now()
        + interval.map_or(Duration::ZERO, |t| t.mul_f64(conn as f64 / a.connections as f64));
    let mut batches: u32 = 0;
    loop {
        if let Some(t) = interval {
            tokio::time::sleep_until(began + t * batches).await;
            batches += 1;
        }
        let k = plan.claim(plan.args.pipeline);
        if k == 0 {
            break;
        }
        for _ in 0..k {
            let (is_set, key, value) = plan.request(conn, i, &mut key);
            i += 1;
            let target = plan.routing.as_ref().map_or(0, |r| r.target(&key));
            id += 1;
            encode(plan.args.protocol, id, is_set, key, value, &mut out[target]);
            expected[target] += 1;
        }
        let start = Instant::now();
        for (s, buf) in streams.iter_mut().zip(out.iter_mut()) {
            if !buf.is_empty() {
                if let Err(e) = s.write_all(buf).await {
                    plan.errors.fetch_add(k as u64, Ordering::Relaxed);
                    return Err(e.to_string());
                }
                buf.clear();
            }
        }
        let mut errors = 0;
        for t in 0..streams.len() {
            while expected[t] > 0 {
                match next_reply(plan.args.protocol, &mut streams[t], &mut input[t]).await {
                    Ok(ok) => errors += u64::from(!ok),
                    Err(e) => {
                        plan.errors.fetch_add(k as u64, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                expected[t] -= 1;
            }
        }
        let us = start.elapsed().as_micros().max(1) as u64;
        let _ = hist.record_n(us.min(60_000_000), k as u64);
        plan.errors.fetch_add(errors, Ordering::Relaxed);
        plan.completed.fetch_add(k as u64, Ordering::Relaxed);
    }
    Ok(hist)
}

fn encode(protocol: Protocol, id: u64, is_set: bool, key: Bytes, value: Bytes, out: &mut Vec<u8>) {
    match protocol {
        Protocol::Flux => {
            let op = if is_set {
                Op::Set(proto::SetRequest {
                    key,
                    value,
                    ..Default::default()
                })
            } else {
                Op::Get(proto::GetRequest { key })
            };
            wire::put_frame(&Request { id, op: Some(op) }, out);
        }
        Protocol::Resp => {
            let parts: &[&[u8]] = if is_set {
                &[b"SET", &key, &value]
            } else {
                &[b"GET", &key]
            };
            out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
            for p in parts {
                out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
                out.extend_from_slice(p);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Reads one reply; Ok(false) for an error reply.
async fn next_reply(protocol: Protocol, s: &mut Stream, input: &mut BytesMut) -> Result<bool, String> {
    loop {
        let parsed = match protocol {
            Protocol::Flux => match wire::take_frame(input, REPLY_FRAME_BYTES_MAX) {
                Ok(Some(p)) => Some(Response::decode(p).map_err(|e| e.to_string())?.error.is_none()),
                Ok(None) => None,
                Err(e) => return Err(e.to_string()),
            },
            Protocol::Resp => take_resp(input)?,
        };
        if let Some(ok) = parsed {
            return Ok(ok);
        }
        input.reserve(64 << 10);
        match s.read_buf(input).await {
            Ok(0) => return Err("server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One RESP reply (+OK, -ERR, :n, $-1, $n bulk) off the front of `input`.
fn take_resp(input: &mut BytesMut) -> Result<Option<bool>, String> {
    let Some(eol) = input.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line_len = eol + 2;
    match input.first() {
        Some(b'+') | Some(b':') => {
            input.advance(line_len);
            Ok(Some(true))
        }
        Some(b'-') => {
            input.advance(line_len);
            Ok(Some(false))
        }
        Some(b'$') => {
            let n: i64 = std::str::from_utf8(&input[1..eol])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad bulk length")?;
            let total = if n < 0 { line_len } else { line_len + n as usize + 2 };
            if input.len() < total {
                return Ok(None);
            }
            input.advance(total);
            Ok(Some(true))
        }
        other => Err(format!("unexpected RESP reply starting with {other:?}")),
    }
}

async fn stats(args: &Args, config: &ClientConfig) -> Option<Vec<CoreStats>> {
    // Per-core figures are per node; with --etcd there are several nodes: left out.
    if args.protocol != Protocol::Flux || !args.etcd.is_empty() {
        return None;
    }
    let client = Client::connect_addr(
        args.addr,
        ClientConfig {
            shard_aware: false,
            ..config.clone()
        },
    )
    .await
    .ok()?;
    client.stats().await.ok()
}

/// `--follow-slots`: C tasks each send one request at a time through the cluster client
/// until the duration ends; JSON with totals, latency and the timeline
/// `[[requests, errors, slowest_us], ...]` per `--timeline-ms`.
async fn follow_slots(args: Args, client_config: ClientConfig) -> Result<u64, String> {
    let duration = args.duration.ok_or("--follow-slots needs --duration")?;
    let cluster = crate::client::Cluster::connect(&args.etcd, &args.prefix, client_config)
        .await
        .map_err(|e| e.to_string())?;
    let tick = Duration::from_millis(args.timeline_ms.max(1));
    let buckets = (duration.as_millis() / tick.as_millis()) as usize + 2;
    type Bucket = (AtomicU64, AtomicU64, AtomicU64);
    let timeline: Arc<Vec<Bucket>> = Arc::new((0..buckets).map(|_| Bucket::default()).collect());
    let value = Bytes::from(vec![b'v'; args.value_bytes.unwrap_or(100)]);
    let started = Instant::now();
    let deadline = started + duration;
    let cpu_before = cpu_time();
    let tasks: Vec<_> = (0..args.connections)
        .map(|conn| {
            let (cluster, timeline, value, args) = (cluster.clone(), timeline.clone(), value.clone(), args.clone());
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let mut rng = fastrand::Rng::with_seed(conn as u64);
                let (sets, gets) = args.ratio;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    i += 1;
                    let key = match args.keys {
                        Some(n) => format!("key:{}", rng.u64(0..n.max(1))),
                        None => format!("user_{conn}_{i}"),
                    };
                    let t0 = Instant::now();
                    let ok = if rng.u32(0..sets + gets) < sets {
                        cluster.set(key, value.clone()).await.is_ok()
                    } else {
                        cluster.get(key).await.is_ok()
                    };
                    let us = t0.elapsed().as_micros() as u64;
                    hist.saturating_record(us.max(1));
                    let b = &timeline[((t0 - started).as_millis() / tick.as_millis()) as usize % buckets];
                    b.0.fetch_add(1, Ordering::Relaxed);
                    b.1.fetch_add(u64::from(!ok), Ordering::Relaxed);
                    b.2.fetch_max(us, Ordering::Relaxed);
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    for t in tasks {
        hist.add(&t.await.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let line: Vec<[u64; 3]> = timeline
        .iter()
        .map(|b| {
            [
                b.0.load(Ordering::Relaxed),
                b.1.load(Ordering::Relaxed),
                b.2.load(Ordering::Relaxed),
            ]
        })
        .collect();
    let requests: u64 = line.iter().map(|b| b[0]).sum();
    let errors: u64 = line.iter().map(|b| b[1]).sum();
    let out = json!({
        "requests": requests,
        "errors": errors,
        "qps": (requests as f64 / wall).round(),
        "client_cpu_percent": (1000.0 * cpu.as_secs_f64() / wall).round() / 10.0,
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p99": hist.value_at_quantile(0.99),
            "max": hist.max(),
        },
        "timeline_ms": tick.as_millis() as u64,
        "timeline": line,
    });
    println!("{out}");
    Ok(errors)
}

/// Process CPU time (user + system) so the report can show the client's own load.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn progress_bar(plan: &Arc<Plan>) -> Option<indicatif::ProgressBar> {
    if plan.args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = match plan.args.duration {
        Some(d) => indicatif::ProgressBar::new(d.as_secs().max(1)),
        None => indicatif::ProgressBar::new(plan.args.requests),
    };
    let p = plan.clone();
    let b = bar.clone();
    let started = Instant::now();
    std::thread::spawn(move || {
        while !b.is_finished() {
            match p.args.duration {
                Some(_) => b.set_position(started.elapsed().as_secs()),
                None => b.set_position(p.completed.load(Ordering::Relaxed)),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    Some(bar)
}

fn report(
    plan: &Plan,
    hist: &Histogram<u64>,
    wall: Duration,
    cpu: Duration,
    before: Option<&[CoreStats]>,
    after: Option<&[CoreStats]>,
) {
    let requests = plan.completed.load(Ordering::Relaxed);
    let errors = plan.errors.load(Ordering::Relaxed);
    let secs = wall.as_secs_f64().max(1e-9);
    let qps = requests as f64 / secs;
    let per_core: Vec<serde_json::Value> = match (before, after) {
        (Some(b), Some(a)) => a
            .iter()
            .map(|a| {
                let b = b.iter().find(|b| b.core == a.core).cloned().unwrap_or_default();
                let reqs = a.requests.saturating_sub(b.requests);
                let fwd = a.forwarded_out.saturating_sub(b.forwarded_out);
                json!({
                    "core": a.core,
                    "requests": reqs,
                    "qps": (reqs as f64 / secs).round(),
                    "forwarded_out": fwd,
                    "forwarded_share": if reqs > 0 { fwd as f64 / reqs as f64 } else { 0.0 },
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    let cpu_percent = 100.0 * cpu.as_secs_f64() / secs;
    let lat = json!({
        "p50": hist.value_at_quantile(0.50),
        "p90": hist.value_at_quantile(0.90),
        "p99": hist.value_at_quantile(0.99),
        "p999": hist.value_at_quantile(0.999),
        "max": hist.max(),
    });
    let a = &plan.args;
    if a.json {
        let out = json!({
            "qps": qps.round(),
            "requests": requests,
            "errors": errors,
            "wall_s": secs,
            "latency_us": lat,
            "per_core": per_core,
            "client_cpu_percent": (cpu_percent * 10.0).round() / 10.0,
            "connections": a.connections,
            "pipeline": a.pipeline,
            "ratio": format!("{}:{}", a.ratio.0, a.ratio.1),
            "protocol": format!("{:?}", a.protocol).to_lowercase(),
            "shard_aware": matches!(plan.routing, Some(Routing::Cores(..))),
            "nodes": match &plan.routing { Some(Routing::Nodes(_, ids, _)) => ids.len(), _ => 1 },
        });
        println!("{out}");
        return;
    }
    println!("====== flux-bench ({:?}) ======", a.protocol);
    println!(
        "  {requests} requests in {secs:.2} s, {} connections, pipeline {}",
        a.connections, a.pipeline
    );
    println!(
        "  SET:GET {}:{}, shard-aware: {}",
        a.ratio.0,
        a.ratio.1,
        matches!(plan.routing, Some(Routing::Cores(..)))
    );
    println!("  throughput: {qps:.0} requests/s, errors: {errors}");
    println!(
        "  latency (us): p50 {} p90 {} p99 {} p99.9 {} max {}",
        lat["p50"], lat["p90"], lat["p99"], lat["p999"], lat["max"]
    );
    println!("  flux-bench CPU: {cpu_percent:.0} % of one core");
    if !per_core.is_empty() {
        println!("  {:>4} {:>12} {:>12} {:>10}", "core", "requests", "qps", "forwarded");
        for c in &per_core {
            println!(
                "  {:>4} {:>12} {:>12} {:>9.1}%",
                c["core"],
                c["requests"],
                c["qps"],
                c["forwarded_share"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
    }
}
