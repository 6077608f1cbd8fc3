//! The command-line tools behind the thin binaries in `src/bin/`.

pub mod bench;
pub mod cdc_tail;
pub mod cli;

/// Parses durations such as `10s`, `250ms`, `2m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (try 10s, 250ms, 2m): {e}"))
}
