//! flux-cdc-tail: consume Flux-KV's change events from RabbitMQ, print them, and check that
//! every shard's sequence numbers arrive without gaps.
//!
//! It binds its own queue to the exchange (declaring the exchange the same way the server
//! does, so it may start first) and says `ready` on stderr once bound: events published
//! before that are not routed to it. Duplicates (at-least-once delivery) are dropped by
//! (node_id, shard, seq) and counted; a seq that skips ahead is a gap, reported at once.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use amqprs::callbacks::{DefaultChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{BasicConsumeArguments, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments};
use amqprs::connection::Connection;
use clap::Parser;
use prost::Message;

use crate::config::CdcFormat;
use crate::proto::cdc::{ChangeBatch, ChangeEvent, Op};

#[derive(Parser, Debug)]
#[command(
    name = "flux-cdc-tail",
    version,
    about = "Print Flux-KV change events and check per-shard seq continuity"
)]
pub struct Args {
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "FLUX_CDC_AMQP_URL"
    )]
    pub amqp_url: String,
    /// Exchange to bind to (protobuf format); the JSON format always uses flux_kv_events.
    #[arg(long, default_value = "flux.cdc")]
    pub exchange: String,
    #[arg(long, value_enum, default_value = "protobuf")]
    pub format: CdcFormat,
    /// Topic binding, e.g. `#` for everything or `<node_id>.*`.
    #[arg(long, default_value = "#")]
    pub binding: String,
    /// One JSON object per event on stdout instead of a text line.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many distinct events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit when no message arrived for this long (10s, 500ms).
    #[arg(long, value_parser = super::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// File holding the broker password, which replaces the one in --amqp-url (so the
    /// secret is not on the command line or in the process list).
    #[arg(long)]
    pub token_file: Option<String>,
    /// PEM CA certificate the broker's certificate must chain to (amqps:// URLs); default:
    /// the public web PKI roots.
    #[arg(long)]
    pub tls_ca: Option<String>,
    /// PEM client certificate for the broker (amqps:// with client authentication).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// Remember what each identity carried and report a duplicate whose content differs (an
    /// identity that names two changes). Costs memory per event: for checks, not for tails
    /// that run for ever.
    #[arg(long)]
    pub verify_duplicates: bool,
}

/// Per-shard continuity check over (node_id, shard, seq).
#[derive(Default)]
pub struct Continuity {
    next: HashMap<(String, u32), u64>,
    /// With `--verify-duplicates`: a digest of each identity's content.
    digests: Option<HashMap<(String, u32, u64), u64>>,
    pub events: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Duplicates whose content differs from the first copy.
    pub conflicts: u64,
}

/// What an event says, apart from its identity and apply time.
fn digest(e: &ChangeEvent) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&e.op.to_le_bytes());
    h.update(&e.expire_at_ms.to_le_bytes());
    h.update(&(e.key.len() as u64).to_le_bytes());
    h.update(&e.key);
    h.update(&e.value);
    h.digest()
}

impl Continuity {
    pub fn verifying() -> Continuity {
        Continuity {
            digests: Some(HashMap::new()),
            ..Continuity::default()
        }
    }

    /// True when the event is new; duplicates are counted and skipped; a skip ahead is a gap.
    pub fn accept(&mut self, e: &ChangeEvent) -> bool {
        if let Some(digests) = &mut self.digests {
            let d = digest(e);
            let first = *digests.entry((e.node_id.clone(), e.shard, e.seq)).or_insert(d);
            if first != d {
                self.conflicts += 1;
                eprintln!(
                    "conflict: node {} shard {} seq {} came with two different contents",
                    e.node_id, e.shard, e.seq
                );
            }
        }
        let next = self.next.entry((e.node_id.clone(), e.shard)).or_insert(1);
        if e.seq < *next {
            self.duplicates += 1;
            return false;
        }
        if e.seq > *next {
            self.gaps += 1;
            eprintln!(
                "gap: node {} shard {} expected seq {} got {}",
                e.node_id, e.shard, *next, e.seq
            );
        }
        *next = e.seq + 1;
        self.events += 1;
        true
    }
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flux-cdc-tail: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flux-cdc-tail: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns Ok(true) when no gap (and, verifying, no conflict) was seen.
async fn run(args: Args) -> Result<bool, String> {
    let tls = crate::tls::ClientFiles::from_flags(&args.tls_ca, &args.tls_cert, &args.tls_key);
    let mut conn_args = crate::cdc::amqp_args(&args.amqp_url, &tls)?;
    if let Some(file) = &args.token_file {
        let password = crate::config::read_secret("--token-file", file)?;
        let user = crate::config::url_user(&args.amqp_url).unwrap_or_else(|| "guest".into());
        conn_args.credentials(amqprs::security::SecurityCredentials::new_plain(&user, &password));
    }
    let conn = Connection::open(&conn_args).await.map_err(|e| e.to_string())?;
    conn.register_callback(DefaultConnectionCallback)
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.open_channel(None).await.map_err(|e| e.to_string())?;
    channel
        .register_callback(DefaultChannelCallback)
        .await
        .map_err(|e| e.to_string())?;
    let (exchange, kind, binding) = match args.format {
        CdcFormat::Protobuf => (args.exchange.clone(), "topic", args.binding.clone()),
        CdcFormat::Json => (
            crate::cdc::forwarder::JSON_EXCHANGE.to_string(),
            "fanout",
            String::new(),
        ),
    };
    let mut declare = ExchangeDeclareArguments::new(&exchange, kind);
    declare.durable = true;
    channel.exchange_declare(declare).await.map_err(|e| e.to_string())?;
    let (queue, _, _) = channel
        .queue_declare(QueueDeclareArguments::exclusive_server_named())
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no queue name from the broker")?;
    channel
        .queue_bind(QueueBindArguments::new(&queue, &exchange, &binding))
        .await
        .map_err(|e| e.to_string())?;
    let mut consume = BasicConsumeArguments::new(&queue, "flux-cdc-tail");
    consume.manual_ack(false);
    let (_, mut rx) = channel
        .basic_consume_rx(consume.finish())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("ready: queue {queue} bound to {exchange} ({binding})");

    let mut seen = if args.verify_duplicates {
        Continuity::verifying()
    } else {
        Continuity::default()
    };
    let mut out = std::io::stdout().lock();
    loop {
        let msg = match args.idle_timeout {
            Some(t) => match tokio::time::timeout(t, rx.recv()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => rx.recv().await,
        };
        let Some(msg) = msg else { break };
        let body = msg.content.unwrap_or_default();
        match args.format {
            CdcFormat::Json => {
                seen.events += 1;
                let _ = out.write_all(&body);
                let _ = writeln!(out);
            }
            CdcFormat::Protobuf => {
                let batch = ChangeBatch::decode(&body[..]).map_err(|e| format!("message is not a ChangeBatch: {e}"))?;
                for e in batch.events.iter().filter(|e| seen.accept(e)) {
                    let _ = print_event(&mut out, e, args.json);
                }
            }
        }
        let _ = out.flush();
        if args.count.is_some_and(|n| seen.events >= n) {
            break;
        }
    }
    eprintln!(
        "events {}, duplicates {}, gaps {}, conflicts {}",
        seen.events, seen.duplicates, seen.gaps, seen.conflicts
    );
    let _ = conn.close().await;
    Ok(seen.gaps == 0 && seen.conflicts == 0)
}

fn print_event(out: &mut impl Write, e: &ChangeEvent, json: bool) -> std::io::Result<()> {
    let op = match Op::try_from(e.op) {
        Ok(Op::Set) => "SET",
        Ok(Op::Del) => "DEL",
        Ok(Op::Expire) => "EXPIRE",
        Ok(Op::Expired) => "EXPIRED",
        Ok(Op::Evicted) => "EVICTED",
        Ok(Op::MigrationSet) => "MIGRATION_SET",
        Ok(Op::MigrationDel) => "MIGRATION_DEL",
        Err(_) => "UNKNOWN",
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if json {
        let v = serde_json::json!({
            "node_id": e.node_id, "shard": e.shard, "seq": e.seq, "timestamp_ms": e.timestamp_ms,
            "op": op, "key": text(&e.key), "value": text(&e.value), "expire_at_ms": e.expire_at_ms,
        });
        writeln!(out, "{v}")
    } else {
        writeln!(
            out,
            "{} shard {} seq {} {op} {:?} {:?} expire_at_ms {}",
            e.node_id,
            e.shard,
            e.seq,
            e.key.escape_ascii().to_string(),
            e.value.escape_ascii().to_string(),
            e.expire_at_ms
        )
    }
}
