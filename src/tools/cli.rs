//! flux-cli: one-shot commands and an interactive prompt, over the Rust client.
//!
//! The one-shot command line and each line typed at the prompt go through the same parser,
//! so `flux-cli set k v --ttl 10s` and `set k v --ttl 10s` at the prompt mean the same.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};

use crate::backup::{FileEntry, FileWriter, Manifest};
use crate::client::{Client, ClientConfig, Cluster, Condition, SetOptions, Ttl};
use crate::proto::HelloResponse;

#[derive(Parser, Debug)]
#[command(
    name = "flux-cli",
    version,
    about = "Command-line client for Flux-KV; no command starts a prompt"
)]
pub struct Args {
    /// Node address (host:port).
    #[arg(long, default_value = "127.0.0.1:7379", env = "FLUX_ADDR")]
    pub addr: String,
    /// Timeout for connecting and for each request (10s, 500ms, ...).
    #[arg(long, default_value = "5s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Print values as raw bytes instead of escaped, quoted strings.
    #[arg(long)]
    pub raw: bool,
    /// Find the nodes through etcd (comma-separated endpoints) instead of --addr; keys go
    /// to the node that owns their slot.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd key prefix the nodes register under (with --etcd).
    #[arg(long, default_value = "/flux")]
    pub prefix: String,
    #[command(flatten)]
    pub security: super::SecurityArgs,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Cmd {
    /// Read a key.
    Get { key: String },
    /// Write a key.
    Set {
        key: String,
        value: String,
        /// Time to live (10s, 500ms, 1h).
        #[arg(long, value_parser = super::parse_duration)]
        ttl: Option<Duration>,
        /// Only if the key does not exist.
        #[arg(long, conflicts_with = "xx")]
        nx: bool,
        /// Only if the key exists.
        #[arg(long)]
        xx: bool,
    },
    /// Remove a key.
    Del { key: String },
    /// Does the key exist?
    Exists { key: String },
    /// Set a key's time to live; 0 removes the expiry.
    Expire {
        key: String,
        #[arg(value_parser = super::parse_duration)]
        ttl: Duration,
    },
    /// Remaining time to live in ms (-1: no expiry, -2: no such key).
    Ttl { key: String },
    /// Read many keys.
    Mget {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Write many keys: KEY VALUE [KEY VALUE ...].
    Mset {
        #[arg(required = true, num_args = 2.., value_names = ["KEY", "VALUE"])]
        pairs: Vec<String>,
    },
    /// Round trip check.
    Ping { payload: Option<String> },
    /// Per-core counters of the node.
    Stats {
        /// One JSON object (every Stats field, for scripts) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Node identity and routing parameters.
    Hello,
    /// Snapshot every shard now and delete the log files the snapshots cover (waits until
    /// done: raise --timeout for large data sets).
    Snapshot,
    /// Take a consistent backup of the node into DIR (created; must be empty): a snapshot
    /// round, then the snapshots and the log written since, copied over the connection,
    /// and manifest.json with every file's SHA-256. Check it with
    /// `flux-server --verify-data DIR`; restore it with `flux-server --restore-from DIR`.
    Backup { dir: std::path::PathBuf },
    /// The cluster's members (needs --etcd).
    Nodes,
    /// The cluster's slots: status, and moving them between nodes (needs --etcd).
    Cluster {
        #[command(subcommand)]
        action: super::cluster::ClusterCmd,
    },
    /// Make a token for a user (no node needed).
    Token {
        #[command(subcommand)]
        action: TokenCmd,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenCmd {
    /// Print a new random token (256 bits) once, and the users-file entry that holds its
    /// hash. Store the token in a file for --token-file; the node never sees it stored.
    New {
        #[arg(long)]
        user: String,
        /// read, write or admin.
        #[arg(long, value_parser = ["read", "write", "admin"])]
        role: String,
        /// Limit the user to keys with this prefix (repeat for several).
        #[arg(long = "key-prefix")]
        key_prefixes: Vec<String>,
    },
}

/// `backup DIR`: stages a backup on the node, copies its files in bounded reads (checking
/// their SHA-256 as they arrive and every record once they are all here), ends it on the
/// node whatever happened, and writes the manifest last.
async fn backup(
    client: &Client,
    dir: &std::path::Path,
) -> Result<(crate::backup::Manifest, crate::backup::Contents), String> {
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{} is not empty", dir.display()));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let staged = client.backup().await.map_err(|e| e.to_string())?;
    let copied = copy_staged(client, &staged, dir).await;
    let ended = client.backup_end(&staged.backup_id).await;
    let files = copied?;
    ended.map_err(|e| format!("the backup is complete, but the node kept its staged copy: {e}"))?;
    let names: Vec<&str> = files.iter().map(|f: &FileEntry| f.name.as_str()).collect();
    let contents = crate::backup::contents(staged.shards, &names, |name| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))
    })?;
    let manifest = Manifest {
        format: crate::backup::FORMAT.into(),
        node_id: staged.node_id,
        version: staged.version,
        shards: staged.shards,
        created_at_ms: staged.created_at_ms,
        shard_seqs: contents.shard_seqs.clone(),
        files,
    };
    crate::backup::write_manifest(dir, &manifest)?;
    Ok((manifest, contents))
}

/// Copies every staged file of a backup into `dir`; lists them with their SHA-256.
async fn copy_staged(
    client: &Client,
    staged: &crate::proto::BackupResponse,
    dir: &std::path::Path,
) -> Result<Vec<FileEntry>, String> {
    let mut files = Vec::with_capacity(staged.files.len());
    for f in &staged.files {
        let mut w = FileWriter::create(dir, &f.name)?;
        while w.bytes() < f.bytes {
            let length = (f.bytes - w.bytes()).min(u64::from(crate::server::BACKUP_READ_BYTES_MAX)) as u32;
            let part = client
                .backup_read(&staged.backup_id, &f.name, w.bytes(), length)
                .await
                .map_err(|e| format!("{}: {e}", f.name))?;
            if part.is_empty() {
                return Err(format!(
                    "{}: ends at {} of {} bytes on the node",
                    f.name,
                    w.bytes(),
                    f.bytes
                ));
            }
            w.write(&part)?;
        }
        files.push(FileEntry {
            name: f.name.clone(),
            bytes: f.bytes,
            sha256: w.finish()?,
        });
    }
    Ok(files)
}

/// `token new`: the credentials line and the users-file entry.
fn new_token(user: &str, role: &str, key_prefixes: &[String], out: &mut impl Write) -> Result<(), String> {
    let role = crate::auth::Role::parse(role).ok_or("role is read, write or admin")?;
    let t = crate::auth::new_token(user, role, key_prefixes)?;
    let io = |e: std::io::Error| e.to_string();
    writeln!(
        out,
        "# Token for {user} (shown only now): put this line alone in a file for --token-file"
    )
    .map_err(io)?;
    writeln!(out, "{}", t.credentials).map_err(io)?;
    writeln!(
        out,
        "# Append to the node's users file (auth.users_file), then send the node SIGHUP:"
    )
    .map_err(io)?;
    write!(out, "{}", t.entry).map_err(io)
}

impl Cmd {
    /// The key a single-key command routes by, in cluster mode.
    fn key(&self) -> Option<&str> {
        match self {
            Cmd::Get { key } | Cmd::Set { key, .. } | Cmd::Del { key } | Cmd::Exists { key } => Some(key),
            Cmd::Expire { key, .. } | Cmd::Ttl { key } => Some(key),
            _ => None,
        }
    }
}

/// Runs flux-cli with the process arguments.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flux-cli: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    if let Some(Cmd::Token {
        action: TokenCmd::New {
            user,
            role,
            key_prefixes,
        },
    }) = &args.command
    {
        return match new_token(user, role, key_prefixes, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("(error) {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut config = ClientConfig {
        connect_timeout: args.timeout,
        request_timeout: args.timeout,
        ..Default::default()
    };
    if let Err(e) = args.security.apply(&mut config) {
        eprintln!("(error) {e}");
        return ExitCode::FAILURE;
    }
    if !args.etcd.is_empty() {
        return match run_cluster(&args, config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("(error) {e}");
                ExitCode::FAILURE
            }
        };
    }
    let client = match Client::connect(&args.addr, config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("(error) {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match args.command {
        Some(cmd) => match execute(&client, cmd, args.raw, &mut out).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = out.flush();
                eprintln!("(error) {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            drop(out);
            prompt(&client, &args.addr, args.raw).await
        }
    }
}

/// One command against a cluster found through etcd: single-key commands go to the key's
/// node; MGET/MSET go key by key; the rest run on every member.
async fn run_cluster(args: &Args, config: ClientConfig) -> Result<(), String> {
    let cluster = Cluster::connect(&args.etcd, &args.prefix, config)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    let Some(cmd) = args.command.clone() else {
        return Err("with --etcd, give a command (the prompt needs --addr)".into());
    };
    match cmd {
        Cmd::Cluster { action } => {
            let access = crate::cluster::EtcdAccess {
                tls: crate::tls::ClientFiles::from_flags(
                    &args.security.etcd_tls_ca,
                    &args.security.etcd_tls_cert,
                    &args.security.etcd_tls_key,
                ),
                user: None,
            };
            super::cluster::run(
                action,
                &args.etcd,
                &args.prefix,
                &cluster,
                access,
                args.timeout,
                &mut out,
            )
            .await
        }
        Cmd::Nodes => {
            for n in cluster.nodes() {
                writeln!(
                    out,
                    "{} {} cores {} shards {} core_ports {:?} version {}",
                    n.node_id, n.addr, n.cores, n.shards, n.core_ports, n.version
                )
                .map_err(io)?;
            }
            Ok(())
        }
        Cmd::Mget { keys } => {
            for key in keys {
                execute_on_owner(&cluster, Cmd::Get { key: key.clone() }, &key, args.raw, &mut out).await?;
            }
            Ok(())
        }
        Cmd::Mset { pairs } => {
            if pairs.len() % 2 != 0 {
                return Err("mset takes KEY VALUE pairs".into());
            }
            for p in pairs.chunks(2) {
                let set = Cmd::Set {
                    key: p[0].clone(),
                    value: p[1].clone(),
                    ttl: None,
                    nx: false,
                    xx: false,
                };
                execute_on_owner(&cluster, set, &p[0], args.raw, &mut std::io::sink()).await?;
            }
            writeln!(out, "OK").map_err(io)
        }
        cmd => match cmd.key().map(str::to_string) {
            Some(key) => execute_on_owner(&cluster, cmd, &key, args.raw, &mut out).await,
            None => {
                for n in cluster.nodes() {
                    writeln!(out, "# {} {}", n.node_id, n.addr).map_err(io)?;
                    let client = cluster.client_of(&n.node_id).await.map_err(|e| e.to_string())?;
                    execute(&client, cmd.clone(), args.raw, &mut out).await?;
                }
                Ok(())
            }
        },
    }
}

async fn execute_on_owner(
    cluster: &Cluster,
    cmd: Cmd,
    key: &str,
    raw: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let (_, client) = cluster.client_for(key.as_bytes()).await.map_err(|e| e.to_string())?;
    execute(&client, cmd, raw, out).await
}

/// The interactive prompt: line editing and history (rustyline).
async fn prompt(client: &Client, addr: &str, raw: bool) -> ExitCode {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flux-cli: no line editor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let history = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".flux_cli_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let prompt = format!("flux {addr}> ");
    loop {
        let line = match editor.readline(&prompt) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if matches!(line, "quit" | "exit") {
            break;
        }
        let Some(words) = shlex::split(line) else {
            println!("(error) unbalanced quotes");
            continue;
        };
        let parsed = Args::try_parse_from(std::iter::once("flux-cli".to_string()).chain(words));
        match parsed {
            Ok(Args { command: Some(cmd), .. }) => {
                let mut out = std::io::stdout().lock();
                if let Err(e) = execute(client, cmd, raw, &mut out).await {
                    let _ = writeln!(out, "(error) {e}");
                }
            }
            Ok(_) => println!("(error) type a command, `help`, or `quit`"),
            Err(e) => println!("{e}"),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}

/// Executes one command and prints its result.
pub async fn execute(client: &Client, cmd: Cmd, raw: bool, out: &mut impl Write) -> Result<(), String> {
    let e = |e: crate::client::Error| e.to_string();
    let io = |e: std::io::Error| e.to_string();
    match cmd {
        Cmd::Get { key } => {
            let v = client.get(key).await.map_err(e)?;
            write_value(out, v.as_ref(), raw).map_err(io)
        }
        Cmd::Set {
            key,
            value,
            ttl,
            nx,
            xx,
        } => {
            let condition = match (nx, xx) {
                (true, _) => Condition::IfAbsent,
                (_, true) => Condition::IfPresent,
                _ => Condition::Always,
            };
            let applied = client
                .set_with(key, value, SetOptions { ttl, condition })
                .await
                .map_err(e)?;
            writeln!(out, "{}", if applied { "OK" } else { "(not applied)" }).map_err(io)
        }
        Cmd::Del { key } => writeln!(out, "{}", client.del(key).await.map_err(e)? as u8).map_err(io),
        Cmd::Exists { key } => writeln!(out, "{}", client.exists(key).await.map_err(e)? as u8).map_err(io),
        Cmd::Expire { key, ttl } => {
            let ttl = (!ttl.is_zero()).then_some(ttl);
            writeln!(out, "{}", client.expire(key, ttl).await.map_err(e)? as u8).map_err(io)
        }
        Cmd::Ttl { key } => {
            let ms = match client.ttl(key).await.map_err(e)? {
                Ttl::Missing => -2,
                Ttl::Persistent => -1,
                Ttl::Expires(d) => d.as_millis() as i64,
            };
            writeln!(out, "{ms}").map_err(io)
        }
        Cmd::Mget { keys } => {
            for v in client.mget(keys).await.map_err(e)? {
                write_value(out, v.as_ref(), raw).map_err(io)?;
            }
            Ok(())
        }
        Cmd::Mset { pairs } => {
            if pairs.len() % 2 != 0 {
                return Err("mset takes KEY VALUE pairs".into());
            }
            let entries: Vec<(String, String)> = pairs.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            client.mset(entries).await.map_err(e)?;
            writeln!(out, "OK").map_err(io)
        }
        Cmd::Ping { payload } => {
            let p = client.ping(payload.unwrap_or_default()).await.map_err(e)?;
            if p.is_empty() {
                writeln!(out, "PONG").map_err(io)
            } else {
                write_value(out, Some(&p), raw).map_err(io)
            }
        }
        Cmd::Stats { json } => {
            let stats = client.stats_response().await.map_err(e)?;
            if json {
                serde_json::to_writer(&mut *out, &stats).map_err(|e| e.to_string())?;
                return writeln!(out).map_err(io);
            }
            write_stats(out, &stats.cores).map_err(io)?;
            if let Some(p) = &stats.persistence {
                if p.enabled {
                    writeln!(
                        out,
                        "persistence: fsync {}, log bytes this run {}, recovered {} keys from {} files ({} bytes) in {} ms",
                        p.fsync,
                        stats.cores.iter().map(|c| c.wal_bytes).sum::<u64>(),
                        p.keys_recovered,
                        p.log_files_replayed,
                        p.log_bytes_replayed,
                        p.recovery_ms
                    )
                    .map_err(io)?;
                    let oldest = stats.cores.iter().map(|c| c.snapshot_age_ms).max().unwrap_or(-1);
                    let none = stats.cores.iter().any(|c| c.snapshot_age_ms < 0);
                    writeln!(
                        out,
                        "snapshots: oldest age {}, bytes {}, log bytes not yet covered {}, rounds this run {}, loaded at start {} ({} bytes)",
                        if none { "none yet".to_string() } else { format!("{oldest} ms") },
                        stats.cores.iter().map(|c| c.snapshot_bytes).sum::<u64>(),
                        stats.cores.iter().map(|c| c.log_bytes).sum::<u64>(),
                        stats.cores.iter().map(|c| c.snapshots).sum::<u64>(),
                        p.snapshots_loaded,
                        p.snapshot_bytes_loaded,
                    )
                    .map_err(io)?;
                    for c in stats.cores.iter().filter(|c| c.log_failed) {
                        writeln!(
                            out,
                            "DEGRADED: core {} cannot write its log ({}); its writes are refused with STORAGE_UNAVAILABLE until it can",
                            c.core, c.log_error
                        )
                        .map_err(io)?;
                    }
                } else {
                    writeln!(out, "persistence: off").map_err(io)?;
                }
            }
            writeln!(
                out,
                "connections: refused at the limit {}, closed by timeouts {}; writes refused for storage {}",
                stats.cores.iter().map(|c| c.connections_refused).sum::<u64>(),
                stats.cores.iter().map(|c| c.connections_timed_out).sum::<u64>(),
                stats.cores.iter().map(|c| c.writes_refused_storage).sum::<u64>(),
            )
            .map_err(io)?;
            writeln!(
                out,
                "access: failed Auth {}, requests denied {}, refused by protected mode {}",
                stats.cores.iter().map(|c| c.auth_failures).sum::<u64>(),
                stats.cores.iter().map(|c| c.requests_denied).sum::<u64>(),
                stats.cores.iter().map(|c| c.connections_refused_protected).sum::<u64>(),
            )
            .map_err(io)?;
            match stats.cdc {
                Some(c) if c.enabled => writeln!(
                    out,
                    "cdc: connected {}, events published {}, batches {}, confirms pending {}, reconnects {}, republished {}, write-to-confirm p50 {} ms p99 {} ms, oldest unconfirmed {} ms, queued {}, retained log bytes {}, read from log {}, writers held {}, checkpoint age {} ms, dropped {}",
                    c.connected,
                    c.events_published,
                    c.batches_published,
                    c.confirms_pending,
                    c.reconnects,
                    c.republished_batches,
                    c.confirm_delay_p50_ms,
                    c.confirm_delay_p99_ms,
                    c.oldest_unconfirmed_age_ms,
                    stats.cores.iter().map(|c| c.cdc_queue_events).sum::<u64>(),
                    c.retained_bytes,
                    c.events_from_log,
                    c.writers_held,
                    c.checkpoint_age_ms,
                    stats.cores.iter().map(|c| c.cdc_events_dropped).sum::<u64>() + c.events_dropped,
                )
                .map_err(io),
                _ => writeln!(out, "cdc: off").map_err(io),
            }
        }
        Cmd::Hello => write_hello(out, client.hello()).map_err(io),
        Cmd::Snapshot => {
            let r = client.snapshot().await.map_err(e)?;
            writeln!(
                out,
                "snapshot: {} shards, {} keys, {} bytes in {} ms; {} log bytes released",
                r.shards, r.keys, r.bytes, r.millis, r.log_bytes_released
            )
            .map_err(io)
        }
        Cmd::Backup { dir } => {
            let started = std::time::Instant::now();
            let (m, c) = backup(client, &dir).await?;
            writeln!(
                out,
                "backup of {} in {}: {} files, {} bytes, {} keys in snapshots and {} changes after them, {} ms",
                m.node_id,
                dir.display(),
                m.files.len(),
                c.bytes,
                c.snapshot_keys,
                c.log_records,
                started.elapsed().as_millis()
            )
            .map_err(io)
        }
        Cmd::Nodes => Err("nodes needs --etcd".into()),
        Cmd::Cluster { .. } => Err("cluster needs --etcd".into()),
        Cmd::Token {
            action:
                TokenCmd::New {
                    user,
                    role,
                    key_prefixes,
                },
        } => new_token(&user, &role, &key_prefixes, out),
    }
}

/// Prints a value: escaped and quoted by default, raw bytes with `--raw`; `(nil)` if missing.
fn write_value(out: &mut impl Write, v: Option<&Bytes>, raw: bool) -> std::io::Result<()> {
    match (v, raw) {
        (None, _) => writeln!(out, "(nil)"),
        (Some(v), true) => {
            out.write_all(v)?;
            writeln!(out)
        }
        (Some(v), false) => writeln!(out, "\"{}\"", v.escape_ascii()),
    }
}

fn write_stats(out: &mut impl Write, cores: &[crate::proto::CoreStats]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>4} {:>10} {:>8} {:>14} {:>12} {:>12} {:>12} {:>14} {:>12}",
        "core", "accepted", "open", "requests", "fwd_out", "fwd_in", "keys", "memory_bytes", "evicted"
    )?;
    for c in cores {
        writeln!(
            out,
            "{:>4} {:>10} {:>8} {:>14} {:>12} {:>12} {:>12} {:>14} {:>12}",
            c.core,
            c.connections_accepted,
            c.connections_open,
            c.requests,
            c.forwarded_out,
            c.forwarded_in,
            c.keys,
            c.memory_bytes,
            c.keys_evicted
        )?;
    }
    Ok(())
}

fn write_hello(out: &mut impl Write, h: &HelloResponse) -> std::io::Result<()> {
    writeln!(out, "node_id:    {}", h.node_id)?;
    writeln!(out, "version:    {}", h.version)?;
    writeln!(out, "cores:      {}", h.cores)?;
    writeln!(out, "shards:     {}", h.shards)?;
    writeln!(out, "core_ports: {:?}", h.core_ports)?;
    writeln!(out, "key_hash:   {}", h.key_hash)?;
    writeln!(out, "auth:       {}", if h.auth_required { "required" } else { "off" })
}
