//! Backups as files: what `flux-cli backup DIR` writes, what `flux-server --verify-data DIR`
//! checks and what `flux-server --restore-from DIR` seeds a data directory from.
//!
//! ```text
//! DIR/manifest.json        node_id, shards, version, per-shard seq, every file's SHA-256
//! DIR/snapshots/shard-NNNNN.snap   the node's snapshots (see wal::snapshot)
//! DIR/wal/<run>-core<i>-<offset>.log   each core's log since its last snapshot round
//! ```
//!
//! The manifest is written last: a directory without one is an unfinished backup. The
//! snapshots plus the logs replay, exactly as recovery does at start, to the node's state
//! when the backup's snapshot round ended; per shard, the log's records continue the
//! snapshot's seq without a gap, up to the manifest's seq.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::change::ChangeOp;
use crate::wal::record::{self, Read};
use crate::wal::snapshot::{self, Header, HEADER_BYTES};

/// Names the manifest's layout; a reader refuses any other.
pub const FORMAT: &str = "flux-kv-backup/1";
pub const MANIFEST: &str = "manifest.json";
/// Largest record body the checker accepts (the server's frame limit can be raised, so
/// this is generous; a bad length is caught by the checksum first).
const RECORD_BYTES_MAX: usize = 1 << 30;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub node_id: String,
    pub version: String,
    pub shards: u32,
    /// When the node's snapshot round for this backup ended (Unix ms).
    pub created_at_ms: u64,
    /// Per shard (index = shard): the seq of its last change in the backup (0: none).
    pub shard_seqs: Vec<u64>,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the backup directory: `snapshots/...` or `wal/...`.
    pub name: String,
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// What a backup holds, from reading all of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// Per shard: the seq of its last change.
    pub shard_seqs: Vec<u64>,
    /// Keys in the snapshots, and log records replayed on top of them.
    pub snapshot_keys: u64,
    pub log_records: u64,
    pub bytes: u64,
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and checks a backup's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (a backup without a manifest is unfinished)", path.display()))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    if m.format != FORMAT {
        return Err(format!("{MANIFEST}: format {:?}, expected {FORMAT:?}", m.format));
    }
    if m.shard_seqs.len() != m.shards as usize {
        return Err(format!(
            "{MANIFEST}: {} shard seqs for {} shards",
            m.shard_seqs.len(),
            m.shards
        ));
    }
    for f in &m.files {
        if !valid_name(&f.name) {
            return Err(format!("{MANIFEST}: {:?} is not a file of a backup", f.name));
        }
    }
    Ok(m)
}

/// `snapshots/<file>.snap` or `wal/<file>.log`, nothing that leaves the directory.
fn valid_name(name: &str) -> bool {
    match name.split_once('/') {
        Some(("snapshots", f)) => f.ends_with(".snap") && !f.starts_with('.') && !f.contains(['/', '\\']),
        Some(("wal", f)) => f.ends_with(".log") && !f.starts_with('.') && !f.contains(['/', '\\']),
        _ => false,
    }
}

/// Checks a backup offline: the manifest, every file's size and SHA-256, every snapshot
/// header and record checksum, and per shard that the log continues its snapshot's seq
/// without a gap up to the manifest's seq. The error names the first problem and its file.
pub fn verify(dir: &Path) -> Result<(Manifest, Contents), String> {
    let m = read_manifest(dir)?;
    let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    let contents = contents(m.shards, &names, |name| {
        let f = m.files.iter().find(|f| f.name == name).expect("listed above");
        let data = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        if data.len() as u64 != f.bytes {
            return Err(format!("{name}: {} bytes, the manifest says {}", data.len(), f.bytes));
        }
        if sha256_hex(&data) != f.sha256 {
            return Err(format!(
                "{name}: SHA-256 does not match the manifest (the file is damaged)"
            ));
        }
        Ok(data)
    })?;
    for (shard, (found, listed)) in contents.shard_seqs.iter().zip(&m.shard_seqs).enumerate() {
        if found != listed {
            return Err(format!(
                "shard {shard}: the files end at seq {found}, the manifest says {listed}"
            ));
        }
    }
    Ok((m, contents))
}

/// Reads a backup's files as recovery would, one at a time (`load` gives a file's bytes),
/// checking every record and the per-shard seq continuity; returns what they hold.
/// Snapshots are read first, then the logs in name order (the order the node wrote them).
pub fn contents(
    shards: u32,
    names: &[&str],
    load: impl Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<Contents, String> {
    let mut out = Contents {
        shard_seqs: vec![0; shards as usize],
        ..Contents::default()
    };
    let (logs, snaps): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.starts_with("wal/"));
    for name in snaps {
        let data = load(name)?;
        out.bytes += data.len() as u64;
        let h = Header::decode(&data).map_err(|why| format!("{name}: {why}"))?;
        if h.shards != shards || h.shard >= shards || name != format!("snapshots/{}", snapshot::file_name(h.shard)) {
            return Err(format!(
                "{name}: holds shard {} of {}, not what its name and the manifest say",
                h.shard, h.shards
            ));
        }
        let mut at = HEADER_BYTES;
        for i in 0..h.keys {
            match record::decode(&data[at..], RECORD_BYTES_MAX) {
                Read::Record(c, n) if c.shard == h.shard && c.seq == h.seq && c.op == ChangeOp::Set => at += n,
                Read::Record(..) => return Err(format!("{name}: offset {at}: a record of another shard or seq")),
                Read::End => return Err(format!("{name}: ends after {i} of {} keys", h.keys)),
                Read::Bad(why) => return Err(format!("{name}: offset {at}: {why}")),
            }
        }
        if at != data.len() {
            return Err(format!("{name}: {} bytes after its last key", data.len() - at));
        }
        out.snapshot_keys += h.keys;
        out.shard_seqs[h.shard as usize] = h.seq;
    }
    let logs: BTreeSet<&str> = logs.into_iter().collect();
    for name in logs {
        let data = load(name)?;
        out.bytes += data.len() as u64;
        let mut at = 0;
        while at < data.len() {
            match record::decode(&data[at..], RECORD_BYTES_MAX) {
                Read::Record(c, n) => {
                    let Some(seq) = out.shard_seqs.get_mut(c.shard as usize) else {
                        return Err(format!("{name}: offset {at}: shard {} of {shards}", c.shard));
                    };
                    // Records the snapshot already holds are skipped, as recovery does.
                    if c.seq > *seq {
                        if c.seq != *seq + 1 {
                            return Err(format!(
                                "{name}: offset {at}: shard {} jumps from seq {} to {} (changes are missing)",
                                c.shard, *seq, c.seq
                            ));
                        }
                        *seq = c.seq;
                        out.log_records += 1;
                    }
                    at += n;
                }
                Read::End => return Err(format!("{name}: offset {at}: zeros where records should be")),
                Read::Bad(why) => return Err(format!("{name}: offset {at}: {why}")),
            }
        }
    }
    Ok(out)
}

/// Seeds the empty (or absent) `data_dir` from a verified backup, for a node with `shards`
/// shards. The copies are synced before the function returns, so the node that starts on
/// them next cannot lose them. The node id is not copied: the restored node is a new
/// member, and its change events must not collide with the old node's.
pub fn restore(dir: &Path, data_dir: &Path, shards: u32) -> Result<Contents, String> {
    let (m, contents) = verify(dir)?;
    if m.shards != shards {
        return Err(format!(
            "the backup was taken with shards = {}, this node has shards = {shards}; start with --shards {}",
            m.shards, m.shards
        ));
    }
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if let Some(Ok(e)) = entries.next() {
            return Err(format!(
                "{} is not empty (it holds {}): a restore only seeds an empty data directory",
                data_dir.display(),
                e.file_name().to_string_lossy()
            ));
        }
    }
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut dirs: Vec<PathBuf> = vec![data_dir.to_path_buf()];
    for f in &m.files {
        let to = data_dir.join(&f.name);
        let parent = to.parent().expect("backup names have a directory");
        if !dirs.iter().any(|d| d == parent) {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            dirs.push(parent.to_path_buf());
        }
        std::fs::copy(dir.join(&f.name), &to).map_err(|e| io(&to, e))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&to, e))?;
    }
    for d in dirs.iter().rev() {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(d, e))?;
    }
    Ok(contents)
}

/// Writes a file of the backup, computing its SHA-256 as the parts arrive.
pub struct FileWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    digest: ring::digest::Context,
    bytes: u64,
}

impl FileWriter {
    pub fn create(dir: &Path, name: &str) -> Result<FileWriter, String> {
        if !valid_name(name) {
            return Err(format!("the node offered {name:?}, which is not a file of a backup"));
        }
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(FileWriter {
            file: std::io::BufWriter::new(file),
            path,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        })
    }

    pub fn write(&mut self, part: &[u8]) -> Result<(), String> {
        self.digest.update(part);
        self.bytes += part.len() as u64;
        self.file
            .write_all(part)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and syncs the file; returns its hex SHA-256.
    pub fn finish(self) -> Result<String, String> {
        let path = self.path;
        let file = self.file.into_inner().map_err(|e| format!("{}: {e}", path.display()))?;
        file.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(hex(self.digest.finish().as_ref()))
    }
}

/// Writes the manifest last, atomically, and syncs the directory: from then on the backup
/// is complete.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), String> {
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let text = serde_json::to_string_pretty(m).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io)?;
    for d in [dir.to_path_buf(), dir.join("snapshots"), dir.join("wal")] {
        if d.is_dir() {
            std::fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("{}: {e}", d.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::Fields;

    fn record(shard: u32, seq: u64, key: &[u8], out: &mut Vec<u8>) {
        record::encode_fields(
            &Fields {
                shard,
                seq,
                op: ChangeOp::Set,
                expire_at_ms: 0,
                key,
                value: b"v",
            },
            out,
        );
    }

    fn snapshot_file(shard: u32, shards: u32, seq: u64, keys: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        Header {
            shard,
            shards,
            seq,
            keys: keys.len() as u64,
            written_at_ms: 1,
        }
        .encode(&mut out);
        for k in keys {
            record(shard, seq, k, &mut out);
        }
        out
    }

    // Goal: the checker follows recovery's rules: log records a snapshot covers are
    // skipped, the rest must continue its seq, and a gap names the file and offset.
    #[test]
    fn seq_continuity_is_checked_per_shard() {
        let snap = snapshot_file(1, 4, 5, &[b"a", b"b"]);
        let mut log = Vec::new();
        for seq in 4..=7 {
            record(1, seq, b"a", &mut log);
        }
        record(2, 1, b"c", &mut log);
        let files = |log: Vec<u8>| {
            let snap = snap.clone();
            move |name: &str| match name {
                "snapshots/shard-00001.snap" => Ok(snap.clone()),
                _ => Ok(log.clone()),
            }
        };
        let names = ["wal/1-core0-0.log", "snapshots/shard-00001.snap"];
        let c = contents(4, &names, files(log)).unwrap();
        assert_eq!(c.shard_seqs, vec![0, 7, 1, 0]);
        assert_eq!((c.snapshot_keys, c.log_records), (2, 3));

        let mut gap = Vec::new();
        record(1, 6, b"a", &mut gap);
        record(1, 8, b"a", &mut gap);
        let e = contents(4, &names, files(gap)).unwrap_err();
        assert!(
            e.contains("wal/1-core0-0.log") && e.contains("jumps from seq 6 to 8"),
            "{e}"
        );
    }

    // Goal: names that would leave the backup directory are refused.
    #[test]
    fn names_stay_inside_the_backup() {
        assert!(valid_name("snapshots/shard-00001.snap") && valid_name("wal/1-core0-0.log"));
        for bad in [
            "../x.log",
            "wal/../x.log",
            "snapshots/a/b.snap",
            "manifest.json",
            "wal/x.snap",
            "/wal/x.log",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
