//! systemd's notification protocol (sd_notify(3)), in a few lines over a datagram socket
//! instead of libsystemd: READY, STATUS, EXTEND_TIMEOUT_USEC, STOPPING and WATCHDOG.
//!
//! Everything is a no-op when the process was not started by systemd with
//! `Type=notify` (no `NOTIFY_SOCKET`), so the node, the tests and the benchmarks run the
//! same code either way.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where notifications go, resolved once from `NOTIFY_SOCKET`.
fn target() -> Option<&'static (UnixDatagram, SocketAddr)> {
    static TARGET: OnceLock<Option<(UnixDatagram, SocketAddr)>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty())?;
            // A leading '@' names a socket in the abstract namespace.
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, addr))
        })
        .as_ref()
}

/// Sends one notification (`KEY=value` lines). Errors are ignored: systemd going away must
/// not take the node down.
pub fn notify(state: &str) {
    if let Some((socket, addr)) = target() {
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::debug!(error = %e, "systemd notification failed");
        }
    }
}

/// How long each recovery progress message extends systemd's start timeout.
const RECOVERY_EXTEND: Duration = Duration::from_secs(30);
/// Recovery reports progress at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Recovery progress: a STATUS line with the keys restored so far, and more start time
/// (EXTEND_TIMEOUT_USEC), so a recovery that takes longer than TimeoutStartSec is not
/// killed while it makes progress. Rate-limited; call it as often as convenient.
pub fn recovery_progress(keys: u64, force: bool) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    if target().is_none() {
        return;
    }
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if !force && last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
        return;
    }
    *last = Some(Instant::now());
    notify(&format!(
        "STATUS=recovering: {keys} keys restored so far\nEXTEND_TIMEOUT_USEC={}",
        RECOVERY_EXTEND.as_micros()
    ));
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
