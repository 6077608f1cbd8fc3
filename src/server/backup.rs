//! The server's side of a backup (see BACKUP in proto/flux.proto): stage every core's part
//! in `data_dir/backups/<backup_id>`, serve the staged files in bounded reads, remove them.
//!
//! ```text
//!  Backup ──> every core: snapshot round, then hard links to its snapshots and its
//!             active log segment (with the bytes written so far) in the staging directory
//!  BackupRead ──> a part of one staged file (direct I/O read on the asking core)
//!  BackupEnd ──> the staging directory is removed
//! ```

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use glommio::channels::channel_mesh::Senders;

use super::core::{Core, MeshRequest};
use crate::change::now_ms;
use crate::proto::{self, ErrorCode};
use crate::wal::snapshot::{BackupPart, Staged};

/// The directory under `data_dir` where backups are staged.
pub const STAGING_DIR: &str = "backups";
/// Largest part of a staged file one BackupRead returns.
pub const READ_BYTES_MAX: u32 = 1 << 20;
/// The longest every core holds its writes while a backup takes its cut (normally a few
/// mesh round trips).
const HOLD_MAX: Duration = Duration::from_secs(2);
/// A staged backup not ended after this long is removed by the next Backup (a client that
/// died half way must not hold log space for ever).
const STAGE_TTL: Duration = Duration::from_secs(3600);

/// A backup request, as planned by dispatch.
pub enum Op {
    Begin,
    Read(proto::BackupReadRequest),
    End(proto::BackupEndRequest),
}

/// Handles one backup request on `core`; the error is the code and message to send.
pub async fn handle(
    core: &Rc<Core>,
    senders: Option<&Senders<MeshRequest>>,
    op: Op,
) -> Result<proto::response::Result, (ErrorCode, String)> {
    use proto::response::Result as R;
    if core.snapshots.is_none() {
        return Err((
            ErrorCode::InvalidRequest,
            "persistence is off: there is nothing to back up".into(),
        ));
    }
    let root = core.config.data_dir.join(STAGING_DIR);
    match op {
        Op::Begin => begin(core, senders, &root)
            .await
            .map(R::Backup)
            .map_err(|e| (ErrorCode::Internal, e)),
        Op::Read(r) => read(&root, r).await.map(R::BackupRead),
        Op::End(r) => {
            let dir = staged_dir(&root, &r.backup_id)?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(R::BackupEnd(proto::BackupEndResponse {})),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((
                    ErrorCode::InvalidRequest,
                    format!("no backup {} is staged", r.backup_id),
                )),
                Err(e) => Err((ErrorCode::Internal, format!("cannot remove {}: {e}", dir.display()))),
            }
        }
    }
}

/// Runs a snapshot round on every core, each staging its part; lists what they staged.
async fn begin(
    core: &Rc<Core>,
    senders: Option<&Senders<MeshRequest>>,
    root: &Path,
) -> Result<proto::BackupResponse, String> {
    remove_expired(root);
    let mut salt = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no randomness for a backup id".to_string())?;
    let backup_id = format!("{}-{:08x}", now_ms(), u32::from_le_bytes(salt));
    let dir = root.join(&backup_id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let staged = stage_all(core, senders, &dir).await;
    let files = match staged {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    tracing::info!(backup_id, files = files.len(), "backup staged");
    Ok(proto::BackupResponse {
        backup_id,
        node_id: core.hello.node_id.clone(),
        shards: core.keyspace.shards(),
        version: core.hello.version.clone(),
        created_at_ms: now_ms(),
        files: files
            .into_iter()
            .map(|s| proto::BackupFile {
                name: s.name,
                bytes: s.bytes,
            })
            .collect(),
    })
}

/// Stages every core's part: (1) each core runs a snapshot round and stages its snapshots;
/// (2) every core holds its writes at once and says where its log ends; (3) each stages
/// its log up to there. The cut is one moment for the whole node: a write acknowledged
/// before another began is never missing while the other is in.
async fn stage_all(core: &Rc<Core>, senders: Option<&Senders<MeshRequest>>, dir: &Path) -> Result<Vec<Staged>, String> {
    let mut snapshots = Vec::new();
    let mut cuts = Vec::new();
    for target in 0..core.keyspace.cores() {
        let (snapshots_tx, snapshots_rx) = oneshot::channel();
        let (cut_tx, cut_rx) = oneshot::channel();
        let (log_tx, log_rx) = oneshot::channel();
        let part = BackupPart {
            dir: dir.to_path_buf(),
            snapshots: snapshots_tx,
            cut: cut_rx,
            log: log_tx,
        };
        if target == core.index {
            core.stage_backup(part);
        } else {
            send(senders, target, MeshRequest::Backup { part }).await?;
        }
        snapshots.push(snapshots_rx);
        cuts.push((cut_tx, log_rx));
    }
    // Returning early drops the cut senders: every core abandons its part.
    let mut files = Vec::new();
    for rx in snapshots {
        files.extend(rx.await.unwrap_or_else(|_| Err(STOPPING.into()))?);
    }
    let ends = hold_all(core, senders).await?;
    let mut logs = Vec::new();
    for ((cut_tx, log_rx), end) in cuts.into_iter().zip(ends) {
        let _ = cut_tx.send(end);
        logs.push(log_rx);
    }
    for rx in logs {
        files.extend(rx.await.unwrap_or_else(|_| Err(STOPPING.into()))?);
    }
    Ok(files)
}

const STOPPING: &str = "a core is shutting down";

async fn send(senders: Option<&Senders<MeshRequest>>, target: u32, msg: MeshRequest) -> Result<(), String> {
    senders
        .ok_or_else(|| format!("no mesh to reach core {target}"))?
        .send_to(target as usize, msg)
        .await
        .map_err(|_| format!("core {target} is shutting down"))
}

/// Holds every core's writes at once and returns where each core's log ends (by core),
/// then releases them. The holds lapse by themselves after [`HOLD_MAX`]; a cut that took
/// longer than that is refused, since a core may have resumed before another one cut.
async fn hold_all(core: &Rc<Core>, senders: Option<&Senders<MeshRequest>>) -> Result<Vec<u64>, String> {
    let started = Instant::now();
    let until_ms = now_ms() + HOLD_MAX.as_millis() as u64;
    let cores = core.keyspace.cores();
    let mut replies = Vec::new();
    let mut sent = Ok(());
    for target in (0..cores).filter(|c| *c != core.index) {
        let (reply, rx) = oneshot::channel();
        sent = send(senders, target, MeshRequest::HoldWrites { until_ms, reply }).await;
        if sent.is_err() {
            break;
        }
        replies.push((target, rx));
    }
    let mut ends = vec![0; cores as usize];
    ends[core.index as usize] = core.hold_writes(until_ms).await;
    let mut answered = sent;
    for (target, rx) in replies {
        match rx.await {
            Ok(end) => ends[target as usize] = end,
            Err(_) => answered = Err(format!("core {target} is shutting down")),
        }
    }
    let held_ms = started.elapsed().as_millis() as u64;
    for target in (0..cores).filter(|c| *c != core.index) {
        let _ = send(senders, target, MeshRequest::ReleaseWrites).await;
    }
    core.release_writes();
    answered?;
    if started.elapsed() >= HOLD_MAX {
        return Err(format!(
            "the cores could not hold their writes together in time ({held_ms} ms); try again"
        ));
    }
    tracing::debug!(held_ms, "backup cut taken");
    Ok(ends)
}

/// Reads a part of a staged file with direct I/O (the asking core never blocks on disk).
async fn read(root: &Path, r: proto::BackupReadRequest) -> Result<proto::BackupReadResponse, (ErrorCode, String)> {
    let dir = staged_dir(root, &r.backup_id)?;
    let name = staged_name(&r.name)?;
    if r.length > READ_BYTES_MAX {
        return Err((
            ErrorCode::InvalidRequest,
            format!(
                "length {} is over the BackupRead limit of {READ_BYTES_MAX} bytes",
                r.length
            ),
        ));
    }
    let path = dir.join(name);
    let io = |e: glommio::GlommioError<()>| {
        let code = match &e {
            glommio::GlommioError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound => {
                ErrorCode::InvalidRequest
            }
            _ => ErrorCode::Internal,
        };
        (code, format!("cannot read {}: {e}", r.name))
    };
    let file = glommio::io::DmaFile::open(&path).await.map_err(io)?;
    let data = file.read_at(r.offset, r.length as usize).await.map_err(io);
    let _ = file.close().await;
    Ok(proto::BackupReadResponse {
        data: bytes::Bytes::copy_from_slice(&data?),
    })
}

/// The staging directory of `id`, which must look like one this module made.
fn staged_dir(root: &Path, id: &str) -> Result<PathBuf, (ErrorCode, String)> {
    let valid = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !valid {
        return Err((ErrorCode::InvalidRequest, format!("{id:?} is not a backup id")));
    }
    let dir = root.join(id);
    if !dir.is_dir() {
        return Err((ErrorCode::InvalidRequest, format!("no backup {id} is staged")));
    }
    Ok(dir)
}

/// A file name of a staged backup: `snapshots/<file>` or `wal/<file>`, nothing else.
fn staged_name(name: &str) -> Result<&str, (ErrorCode, String)> {
    let ok = match name.split_once('/') {
        Some(("snapshots" | "wal", file)) => {
            !file.is_empty() && !file.starts_with('.') && !file.contains(['/', '\\', '\0'])
        }
        _ => false,
    };
    if ok {
        Ok(name)
    } else {
        Err((ErrorCode::InvalidRequest, format!("{name:?} is not a file of a backup")))
    }
}

/// Removes staged backups older than [`STAGE_TTL`] (their id starts with their Unix ms).
fn remove_expired(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let now = now_ms();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(made_ms) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|ms| ms.parse::<u64>().ok())
        else {
            continue;
        };
        if now.saturating_sub(made_ms) >= STAGE_TTL.as_millis() as u64 {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::warn!(backup = %e.path().display(), "removed a staged backup that was never ended"),
                Err(err) => {
                    tracing::warn!(backup = %e.path().display(), error = %err, "cannot remove an expired staged backup")
                }
            }
        }
    }
}

/// Removes every staged backup: at start, none can be in progress.
pub fn remove_all(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(data_dir.join(STAGING_DIR)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a BackupRead names only files of the staging directory it was given.
    #[test]
    fn only_staged_names_are_read() {
        for good in ["snapshots/shard-00001.snap", "wal/1700000000000-core0-0.log"] {
            assert!(staged_name(good).is_ok(), "{good}");
        }
        for bad in [
            "../node_id",
            "snapshots/../../node_id",
            "snapshots/",
            "wal/.hidden",
            "cdc-checkpoint",
            "/etc/passwd",
            "other/file",
        ] {
            assert!(staged_name(bad).is_err(), "{bad}");
        }
        let root = tempfile::tempdir().unwrap();
        assert!(staged_dir(root.path(), "../x").is_err());
        assert!(staged_dir(root.path(), "123-abc").is_err(), "not staged");
        std::fs::create_dir(root.path().join("123-abc")).unwrap();
        assert!(staged_dir(root.path(), "123-abc").is_ok());
    }
}
