//! The log record: one applied change, framed and checksummed.
//!
//! ```text
//! u32 body bytes | u32 crc32c(body) | body = u32 shard | u64 seq | u8 op | u64 expire_at_ms
//!                                            | u32 key bytes | key | value
//! ```
//! Little-endian. A zero length ends the log: direct-I/O writes pad the last block with
//! zeros, so everything after the last record reads as zeros.

pub use crate::change::Fields;
use crate::change::{Change, ChangeOp};

const FRAME_BYTES: usize = 8;
/// Bytes of a record body before its key and value.
pub const FIXED_BODY_BYTES: usize = 4 + 8 + 1 + 8 + 4;

/// Bytes one record of a change with this key and value takes in the log. Change capture
/// uses it to find where a change's record starts from where it ends.
#[inline]
pub fn encoded_len(key_bytes: usize, value_bytes: usize) -> usize {
    FRAME_BYTES + FIXED_BODY_BYTES + key_bytes + value_bytes
}

/// Appends one record; returns its size in bytes.
pub fn encode_fields(f: &Fields, out: &mut Vec<u8>) -> usize {
    let body_len = FIXED_BODY_BYTES + f.key.len() + f.value.len();
    out.reserve(FRAME_BYTES + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    encode_body(f, out);
    let crc = crc32c::crc32c(&out[body_at..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    FRAME_BYTES + body_len
}

/// Bytes of a record body with this key and value (change capture's queue carries bodies).
pub fn body_len(f: &Fields) -> usize {
    FIXED_BODY_BYTES + f.key.len() + f.value.len()
}

/// Appends the body of `f`'s record, without length and checksum.
pub fn encode_body(f: &Fields, out: &mut Vec<u8>) {
    out.extend_from_slice(&f.shard.to_le_bytes());
    out.extend_from_slice(&f.seq.to_le_bytes());
    out.push(op_code(f.op));
    out.extend_from_slice(&f.expire_at_ms.to_le_bytes());
    out.extend_from_slice(&(f.key.len() as u32).to_le_bytes());
    out.extend_from_slice(f.key);
    out.extend_from_slice(f.value);
}

/// The fields a record body holds, borrowed from it; the error says what is wrong.
pub fn decode_body(body: &[u8]) -> Result<Fields<'_>, String> {
    if body.len() < FIXED_BODY_BYTES {
        return Err("record shorter than its fixed fields".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let key_len = u32_at(21) as usize;
    let op = op_from(body[12]).ok_or_else(|| format!("unknown op {}", body[12]))?;
    let Some(key) = body.get(FIXED_BODY_BYTES..FIXED_BODY_BYTES + key_len) else {
        return Err("key runs past the record".into());
    };
    Ok(Fields {
        shard: u32_at(0),
        seq: u64_at(4),
        op,
        expire_at_ms: u64_at(13),
        key,
        value: &body[FIXED_BODY_BYTES + key_len..],
    })
}

/// What reading one record at an offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Record(Change, usize),
    /// A zero length, or the end of the data: the log ends here.
    End,
    /// The record at this offset is incomplete or does not match its checksum.
    Bad(String),
}

/// Reads the record at the start of `data`. `Record` carries the bytes it took.
pub fn decode(data: &[u8], body_bytes_max: usize) -> Read {
    if data.len() < FRAME_BYTES {
        return if data.iter().all(|b| *b == 0) {
            Read::End
        } else {
            Read::Bad("truncated header".into())
        };
    }
    let len = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Read::End;
    }
    if !(FIXED_BODY_BYTES..=body_bytes_max).contains(&len) {
        return Read::Bad(format!("record length {len} is impossible"));
    }
    let Some(body) = data.get(FRAME_BYTES..FRAME_BYTES + len) else {
        return Read::Bad("record runs past the end of the file".into());
    };
    let crc = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Read::Bad("checksum mismatch".into());
    }
    let change = match decode_body(body) {
        Ok(f) => Change::new(&f, 0, 0),
        Err(why) => return Read::Bad(why),
    };
    Read::Record(change, FRAME_BYTES + len)
}

fn op_code(op: ChangeOp) -> u8 {
    match op {
        ChangeOp::Set => 0,
        ChangeOp::Del => 1,
        ChangeOp::Expire => 2,
        ChangeOp::Expired => 3,
        ChangeOp::Evicted => 4,
        ChangeOp::MigrationSet => 5,
        ChangeOp::MigrationDel => 6,
    }
}

fn op_from(b: u8) -> Option<ChangeOp> {
    Some(match b {
        0 => ChangeOp::Set,
        1 => ChangeOp::Del,
        2 => ChangeOp::Expire,
        3 => ChangeOp::Expired,
        4 => ChangeOp::Evicted,
        5 => ChangeOp::MigrationSet,
        6 => ChangeOp::MigrationDel,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn encode(c: &Change, out: &mut Vec<u8>) {
        let n = encode_fields(&c.fields(), out);
        assert_eq!(n, encoded_len(c.key.len(), c.value.len()));
    }

    fn change(seq: u64, key: &str, value: &str) -> Change {
        Change {
            shard: 5,
            seq,
            timestamp_ms: 0,
            op: ChangeOp::Set,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            expire_at_ms: 42,
            log_end: 0,
        }
    }

    // Goal: records round-trip; zeros end the log; a flipped byte or a cut record is Bad.
    #[test]
    fn round_trip_end_and_damage() {
        let mut log = Vec::new();
        encode(&change(1, "k", "v"), &mut log);
        encode(&change(2, "key2", &"x".repeat(10_000)), &mut log);
        let first_len = match decode(&log, 1 << 20) {
            Read::Record(c, n) => {
                assert_eq!(c, change(1, "k", "v"));
                n
            }
            other => panic!("{other:?}"),
        };
        assert!(matches!(decode(&log[first_len..], 1 << 20), Read::Record(ref c, _) if c.seq == 2));
        assert_eq!(decode(&[0u8; 4096], 1 << 20), Read::End);
        assert_eq!(decode(&[], 1 << 20), Read::End);
        let mut flipped = log.clone();
        flipped[first_len + 30] ^= 1;
        assert!(matches!(decode(&flipped[first_len..], 1 << 20), Read::Bad(_)));
        assert!(matches!(decode(&log[first_len..log.len() - 10], 1 << 20), Read::Bad(_)));
    }

    // Goal: every op keeps its frozen code (the log outlives the binary that wrote it) and
    // reads back as itself; an unknown code is damage, not a guess.
    #[test]
    fn ops_keep_their_codes() {
        let ops = [
            ChangeOp::Set,
            ChangeOp::Del,
            ChangeOp::Expire,
            ChangeOp::Expired,
            ChangeOp::Evicted,
            ChangeOp::MigrationSet,
            ChangeOp::MigrationDel,
        ];
        for (code, op) in ops.into_iter().enumerate() {
            assert_eq!(op_code(op), code as u8);
            assert_eq!(op_from(code as u8), Some(op));
        }
        assert_eq!(op_from(ops.len() as u8), None);
    }
}
