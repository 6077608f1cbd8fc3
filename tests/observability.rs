//! What an operator sees: log formats (JSON lines, journald priorities).
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// Runs flux-server with `args` and `stderr`, reads its stderr lines until one contains
/// "flux-server ready" (or the deadline), then stops it. Returns every line read.
fn lines_until_ready(mut cmd: Command, stderr: Stdio, read: impl std::io::Read + Send + 'static) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child: Child = cmd.arg("--data-dir").arg(dir.path()).stderr(stderr).spawn().unwrap();
    drop(cmd); // the parent's copy of the write end must go, or the read never ends
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(read).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + common::START_TIMEOUT;
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let ready = line.contains("flux-server ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("flux-server ready")),
        "no ready line:\n{}",
        lines.join("\n")
    );
    lines
}

fn server() -> Command {
    server_on("127.0.0.1:0")
}

fn server_on(listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flux-server"));
    cmd.args(["--listen", listen, "--cores", "1"]).stdout(Stdio::null());
    cmd
}

// Goal: with log_format = json every line is one JSON object with a level and a message.
#[test]
fn json_log_lines_parse() {
    let mut cmd = server();
    cmd.args(["--log-format", "json"]);
    let (read, write) = pipe();
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
}

// Goal: when stderr is the journal's stream (JOURNAL_STREAM names it), each line starts with
// its syslog priority, so `journalctl -p warning` selects warnings: the protected-mode
// warning is <4>, the ready line <6>.
#[test]
fn journald_lines_carry_priorities() {
    let (read, write) = pipe();
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the struct for a descriptor we own.
    assert_eq!(unsafe { libc::fstat(write.as_raw_fd(), st.as_mut_ptr()) }, 0);
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    let mut cmd = server_on("0.0.0.0:0");
    cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    assert!(lines.iter().all(|l| l.starts_with('<')), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("protected mode")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("flux-server ready")),
        "{lines:#?}"
    );

    // The same variable with a stderr that is not that stream: plain lines.
    let (read, write) = pipe();
    let mut cmd = server();
    cmd.env("JOURNAL_STREAM", "1:1");
    let lines = lines_until_ready(cmd, Stdio::from(write), std::fs::File::from(read));
    assert!(lines.iter().all(|l| !l.starts_with('<')), "{lines:#?}");
}

// Goal: a log_level that does not parse stops the start with a message naming it.
#[test]
fn bad_log_level_is_a_start_error() {
    let out = server().args(["--log-level", "warning"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_level") && err.contains("warning"), "{err}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new descriptors nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
