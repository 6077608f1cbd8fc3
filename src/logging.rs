//! The node's log: tracing to stderr, as text (the default) or JSON lines, and under
//! systemd with journald's priority prefixes so `journalctl -p warning` filters by level.
//!
//! systemd connects a service's stderr to the journal and says so in `JOURNAL_STREAM`
//! (`device:inode` of that stream). A line that starts with `<N>` is stored with syslog
//! priority N; without it every line would be "info". The prefix is added only when stderr
//! really is that stream, so a redirected stderr keeps plain lines.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter for `log_level`: glommio logs a failed iopoll probe as an error on devices
/// without polled I/O and then simply does not use it, so that target is off unless
/// `log_level` names it.
///
/// A bare word must be a level: tracing would take `warning` or `verbose` as the name of a
/// target and log nothing else, which is never what was meant.
pub fn filter(log_level: &str) -> Result<EnvFilter, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if let Some(word) = log_level.split(',').map(str::trim).find(|d| {
        !d.is_empty() && !d.contains('=') && !d.contains('[') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
    }) {
        return Err(format!(
            "log_level: {word:?} is not a level (off, error, warn, info, debug, trace); for one target write target=level"
        ));
    }
    EnvFilter::try_new(format!("glommio::reactor=off,{log_level}"))
        .map_err(|e| format!("log_level: {log_level:?} is not a tracing filter (error, warn, info, debug, trace, or target=level,...): {e}"))
}

/// Installs the process' subscriber. Call once, before anything logs.
pub fn init(log_level: &str, format: LogFormat) -> Result<(), String> {
    let filter = filter(log_level)?;
    let journald = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a log pipe gone) must not panic the thread that logs: the signal
        // thread would die before starting the shutdown.
        .log_internal_errors(false);
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text if journald => builder
            .with_ansi(false)
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM=dev:ino`).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        v.split_once(':')
            .map(|(d, i)| (d.parse::<u64>().ok(), i.parse::<u64>().ok()))
    }) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes the struct it is given; fd 2 may be closed, then it fails.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    dev == Some(st.st_dev) && ino == Some(st.st_ino)
}

/// syslog priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The text format with `<priority>` in front; the journal adds its own timestamp.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}
