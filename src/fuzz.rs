//! One entry point per parser of bytes from a peer or a file, run the way the node (or the
//! client) runs it. The fuzz targets under `fuzz/` and the property tests drive these: each
//! must return, whatever the bytes, without panicking, and what decodes must round-trip.
//!
//! Checksummed formats are entered twice: as given (the checksum stops almost everything,
//! which is what a reader of damaged files sees), and with the checksums made right, so
//! the fuzzer reaches the decoding behind them.

use bytes::BytesMut;
use prost::Message;

use crate::cdc::checkpoint;
use crate::proto::{cdc::ChangeBatch, request::Op, Request, Response};
use crate::wal::record::{self, Read};
use crate::wal::snapshot::{Header, HEADER_BYTES};
use crate::wire;

/// Limits as small as the node allows, so that the fuzzer reaches them.
const FRAME_BYTES_MAX: usize = 1 << 16;
const BATCH_KEYS_MAX: usize = 64;
const RECORD_BODY_BYTES_MAX: usize = 1 << 16;

/// The Redis port's read path: commands taken off a stream that arrives in pieces (the
/// split point comes from the data), then the replies a client would read. Every command
/// must respect the limits, and a stream fed whole must yield what it yields in pieces.
pub fn resp_stream(data: &[u8]) {
    let limits = crate::resp::Limits {
        args_max: 2 * BATCH_KEYS_MAX + 1,
        command_bytes_max: FRAME_BYTES_MAX,
    };
    let take_all = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut parser = crate::resp::Parser::default();
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match parser.take(&mut buf, limits) {
                    Ok(Some(args)) => {
                        assert!(args.len() <= limits.args_max);
                        assert!(args.iter().map(|a| a.len()).sum::<usize>() <= FRAME_BYTES_MAX);
                        commands.push(args);
                    }
                    Ok(None) => break,
                    Err(e) => return (commands, Some(e)),
                }
            }
        }
        (commands, None)
    };
    let whole = take_all(&mut std::iter::once(data));
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let pieces = take_all(&mut data.chunks(step));
    assert_eq!(whole, pieces, "the same stream in pieces of {step} parses differently");
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = crate::resp::take_reply(&mut buf) {}
}

/// The server's read path: frames, the batch-size scan, then the Request decoder.
pub fn request_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(payload)) = wire::take_frame(&mut buf, FRAME_BYTES_MAX) {
        let scanned = wire::batch_keys(&payload, BATCH_KEYS_MAX);
        let _ = wire::request_id(&payload);
        let Ok(req) = Request::decode(payload) else { continue };
        // The scan that guards the limit never counts fewer keys than the decoder yields.
        let decoded = match &req.op {
            Some(Op::Mget(m)) => m.keys.len(),
            Some(Op::Mset(m)) => m.entries.len(),
            _ => 0,
        };
        assert!(
            scanned >= decoded.min(BATCH_KEYS_MAX + 1),
            "scan {scanned} < decoded {decoded}"
        );
        let again = Request::decode(wire::frame(&req)[wire::HEADER_BYTES..].as_ref()).expect("re-encoded decodes");
        assert_eq!(again, req);
    }
}

/// The client's read path (responses) and a change-capture consumer's (ChangeBatch).
pub fn response_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(payload)) = wire::take_frame(&mut buf, FRAME_BYTES_MAX) {
        if let Ok(r) = Response::decode(payload.clone()) {
            assert_eq!(Response::decode(r.encode_to_vec().as_slice()).as_ref(), Ok(&r));
        }
        if let Ok(b) = ChangeBatch::decode(payload) {
            assert_eq!(ChangeBatch::decode(b.encode_to_vec().as_slice()).as_ref(), Ok(&b));
        }
    }
}

/// Log records as recovery reads them: one after the other until the end or damage.
pub fn log_records(data: &[u8]) {
    read_records(data);
    // The same bytes as record bodies ([u16 length][body]...) behind right checksums.
    let mut log = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let body = &rest[2..2 + len];
        log.extend_from_slice(&(body.len() as u32).to_le_bytes());
        log.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        log.extend_from_slice(body);
        rest = &rest[2 + len..];
    }
    read_records(&log);
}

/// Decodes records from the start of `data`; each one re-encodes to the bytes it came from.
fn read_records(data: &[u8]) {
    let mut at = 0;
    while let Read::Record(c, n) = record::decode(&data[at..], RECORD_BODY_BYTES_MAX) {
        let mut again = Vec::new();
        assert_eq!(record::encode_fields(&c.fields(), &mut again), n);
        assert_eq!(again, &data[at..at + n]);
        at += n;
    }
}

/// A snapshot file as recovery reads it: the header, then the records it announces.
pub fn snapshot(data: &[u8]) {
    read_snapshot(data);
    // With the header's magic and checksum made right, so the records behind it are read.
    if data.len() >= HEADER_BYTES {
        let mut fixed = data.to_vec();
        let h = Header {
            shard: u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")),
            shards: u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes")),
            keys: u64::from_le_bytes(fixed[24..32].try_into().expect("8 bytes")),
            written_at_ms: u64::from_le_bytes(fixed[32..40].try_into().expect("8 bytes")),
        };
        let mut header = Vec::new();
        h.encode(&mut header);
        fixed[..HEADER_BYTES].copy_from_slice(&header);
        assert_eq!(Header::decode(&fixed), Ok(h));
        read_snapshot(&fixed);
    }
}

fn read_snapshot(data: &[u8]) {
    let Ok(header) = Header::decode(data) else { return };
    let mut at = HEADER_BYTES;
    let mut keys = 0;
    while keys < header.keys {
        let Read::Record(_, n) = record::decode(&data[at..], RECORD_BODY_BYTES_MAX) else {
            return;
        };
        at += n;
        keys += 1;
    }
}

/// The change-capture checkpoint file, for the shard count its header claims and for 256.
pub fn checkpoint(data: &[u8]) {
    let claimed = data
        .get(8..12)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    for shards in [claimed, 256] {
        let _ = checkpoint::decode(data, shards);
    }
    // With the checksum made right.
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 4;
        let crc = crc32c::crc32c(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_le_bytes());
        if let Ok(seqs) = checkpoint::decode(&fixed, claimed) {
            assert_eq!(seqs.len(), claimed as usize);
        }
    }
}
