//! flux-server: parse the configuration, start the node, stop it gracefully on SIGTERM or
//! SIGINT, snapshot on SIGUSR1, reload the users file and TLS certificates on SIGHUP.

use std::process::ExitCode;
use std::time::Duration;

use flux_kv::config::{Config, ConfigError};
use flux_kv::server::{RingKind, Server};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

/// jemalloc, and glibc for huge blocks (see `flux_kv::alloc`); the store accounts items by
/// the same rules (`shard/item.rs`).
#[global_allocator]
static ALLOCATOR: flux_kv::alloc::ServerAllocator = flux_kv::alloc::ServerAllocator;

fn main() -> ExitCode {
    flux_kv::alloc::init();
    let invocation = match Config::load(std::env::args()) {
        Ok(i) => i,
        Err(ConfigError::Usage(e)) => e.exit(),
        Err(e) => {
            eprintln!("flux-server: {e}");
            return ExitCode::from(2);
        }
    };
    let config = invocation.config;
    if invocation.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = &invocation.verify_data {
        return match flux_kv::backup::verify(dir) {
            Ok((m, c)) => {
                println!(
                    "{}: backup of {} ({} shards, version {}) is sound: {} files, {} bytes, {} keys in snapshots, {} changes after them",
                    dir.display(),
                    m.node_id,
                    m.shards,
                    m.version,
                    m.files.len(),
                    c.bytes,
                    c.snapshot_keys,
                    c.log_records
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flux-server: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = flux_kv::logging::init(&config.log_level, config.log_format) {
        eprintln!("flux-server: {e}");
        return ExitCode::from(2);
    }
    if let Some(dir) = &invocation.restore_from {
        if !config.persistence.enabled {
            tracing::error!("cannot restore: persistence is off, so the node would not read the backup");
            return ExitCode::from(2);
        }
        match flux_kv::backup::restore(dir, &config.data_dir, config.shards) {
            Ok(c) => tracing::info!(
                backup = %dir.display(),
                data_dir = %config.data_dir.display(),
                keys_in_snapshots = c.snapshot_keys,
                changes_after = c.log_records,
                "data directory seeded from the backup"
            ),
            Err(e) => {
                tracing::error!(backup = %dir.display(), "cannot restore: {e}");
                return ExitCode::from(2);
            }
        }
    }

    // Registered before the cores start, so an early signal still means a clean stop.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let shutdown_timeout = Duration::from_millis(config.shutdown_timeout_ms);
    let shards = config.shards;
    let server = match Server::start_with(config, invocation.repair) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let net = match server.ring_kind() {
        RingKind::DeferTaskrun => "io_uring (single issuer, deferred task run)",
        RingKind::Plain => "io_uring (plain ring: kernel older than 6.1)",
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node_id = server.node_id(),
        cores = server.cores(),
        shards,
        listen = %server.local_addr(),
        port = server.local_addr().port(),
        core_ports = ?server.core_ports(),
        resp = %server.resp_addr().map_or("off".to_string(), |a| a.to_string()),
        metrics = %server.metrics_addr().map_or("off".to_string(), |a| a.to_string()),
        net,
        "flux-server ready"
    );

    // systemd (Type=notify): ready only now, with every core accepting connections.
    flux_kv::systemd::notify(&format!(
        "READY=1\nSTATUS=serving on {} with {} cores",
        server.local_addr(),
        server.cores()
    ));
    if let Some(interval) = flux_kv::systemd::watchdog_interval() {
        spawn_watchdog(server.liveness(), interval);
    }

    // SIGUSR1 asks for snapshots, SIGHUP reloads users and certificates (on this thread,
    // never on a shard core). The first SIGTERM/SIGINT starts the drain; past the timeout
    // the process exits anyway, with status 1.
    let shutdown = server.shutdown_handle();
    let snapshots = server.snapshot_trigger();
    let access = server.access_control();
    std::thread::spawn(move || {
        let mut stop = signals.forever().filter(|s| match *s {
            SIGUSR1 => {
                tracing::info!("SIGUSR1: snapshotting every shard");
                snapshots.request();
                false
            }
            SIGHUP => {
                if let Err(e) = access.reload() {
                    tracing::error!("SIGHUP: reload failed, the previous users and certificates stay in use: {e}");
                }
                false
            }
            _ => true,
        });
        if stop.next().is_some() {
            tracing::info!(
                timeout_ms = shutdown_timeout.as_millis() as u64,
                "signal received, shutting down"
            );
            flux_kv::systemd::notify("STOPPING=1\nSTATUS=draining connections");
            shutdown.shutdown();
            std::thread::sleep(shutdown_timeout);
            // Non-zero, so a service manager records that the stop gave up on work.
            tracing::error!("shutdown_timeout_ms reached with work in flight; exiting with status 1");
            std::process::exit(1);
        }
    });
    match server.wait(Duration::MAX) {
        Some(Ok(())) | None => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            tracing::error!("stopped: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Pings systemd's watchdog at half its interval, but only while every shard core answers
/// core 0's heartbeat over the mesh: a core stuck in a loop (or a stuck mesh) stops the
/// pings, and systemd restarts the node after WatchdogSec.
fn spawn_watchdog(liveness: flux_kv::server::Liveness, interval: Duration) {
    let every = interval / 2;
    // Heartbeats run every 200 ms; allow a few to be late under load.
    let fresh = Duration::from_millis(600).max(every);
    let spawned = std::thread::Builder::new()
        .name("flux-watchdog".into())
        .spawn(move || {
            let mut quiet = false;
            loop {
                std::thread::sleep(every);
                match liveness.since_all_answered() {
                    Some(age) if age <= fresh => {
                        flux_kv::systemd::notify("WATCHDOG=1");
                        quiet = false;
                    }
                    age => {
                        if !quiet {
                            tracing::error!(
                                last_answer_ms = age.map(|a| a.as_millis() as u64),
                                "a shard core does not answer heartbeats: watchdog pings stop (systemd restarts the node after WatchdogSec)"
                            );
                            quiet = true;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread: systemd will restart the node after WatchdogSec");
    }
}
