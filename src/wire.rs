//! Frame codec shared by the server and every client: a 4-byte big-endian payload length,
//! then one protobuf message (proto/flux.proto, "FRAMING").
//!
//! The length is checked against the limit before any buffer grows, so a hostile peer cannot
//! make the server allocate more than `frame_bytes_max` for one frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes in the length prefix.
pub const HEADER_BYTES: usize = 4;

/// A frame announced a payload larger than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the limit of {max} bytes")]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

/// Splits the next complete frame payload off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame; [`bytes_needed`] tells how much
/// to read. The payload shares `buf`'s allocation (no copy).
pub fn take_frame(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<Bytes>, FrameTooLarge> {
    let Some(len) = peek_len(buf) else {
        return Ok(None);
    };
    if len > frame_bytes_max {
        return Err(FrameTooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    if buf.len() < HEADER_BYTES + len {
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    Ok(Some(buf.split_to(len).freeze()))
}

/// How many bytes `buf` must hold before the frame at its front is complete (at least the
/// header). Used to size the read buffer for a large frame once, instead of growing it
/// step by step.
pub fn bytes_needed(buf: &[u8]) -> usize {
    match peek_len(buf) {
        Some(len) => HEADER_BYTES + len,
        None => HEADER_BYTES,
    }
}

fn peek_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; HEADER_BYTES] = buf.get(..HEADER_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(header) as usize)
}

/// Appends `msg` as one frame to `out`.
pub fn put_frame(msg: &impl Message, out: &mut impl BufMut) {
    let len = msg.encoded_len();
    // Messages are bounded by frame_bytes_max (<= u32::MAX, enforced by config validation).
    debug_assert!(u32::try_from(len).is_ok());
    out.put_u32(len as u32);
    msg.encode_raw(out);
}

/// Encodes `msg` as one frame into a new buffer.
pub fn frame(msg: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + msg.encoded_len());
    put_frame(msg, &mut out);
    out
}

/// The encoded size of `msg` as a frame.
pub fn frame_len(msg: &impl Message) -> usize {
    HEADER_BYTES + msg.encoded_len()
}

// A cheap look into an encoded Request, without decoding it: what the server must know
// about a frame before it lets prost allocate for it.

/// Request fields (proto/flux.proto) the scan below reads.
const REQUEST_ID: u32 = 1;
const REQUEST_MGET: u32 = 16;
const REQUEST_MSET: u32 = 17;

/// How many keys an encoded Request's MGET or MSET names (the repeated field 1 of either,
/// over every occurrence, as protobuf merges them), counting no further than `stop_after`
/// + 1. Malformed input counts what it can: the decoder then reports it.
pub fn batch_keys(payload: &[u8], stop_after: usize) -> usize {
    let mut count = 0;
    let _ = each_field(payload, |field, value| {
        if let (REQUEST_MGET | REQUEST_MSET, FieldValue::Bytes(body)) = (field, value) {
            let _ = each_field(body, |inner, _| {
                if inner == 1 {
                    count += 1;
                }
                count <= stop_after
            });
        }
        count <= stop_after
    });
    count
}

/// The id of an encoded Request, if it can be read.
pub fn request_id(payload: &[u8]) -> Option<u64> {
    let mut id = None;
    let _ = each_field(payload, |field, value| {
        if let (REQUEST_ID, FieldValue::Varint(v)) = (field, value) {
            id = Some(v);
        }
        true
    });
    id
}

/// One protobuf field's value, as far as the scan needs it.
enum FieldValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Walks the top-level fields of an encoded message, calling `visit(field, value)` until it
/// returns false. `Err` on malformed input (the walk stops there).
fn each_field<'a>(mut buf: &'a [u8], mut visit: impl FnMut(u32, FieldValue<'a>) -> bool) -> Result<(), ()> {
    use prost::encoding::decode_varint;
    while !buf.is_empty() {
        let key = decode_varint(&mut buf).map_err(|_| ())?;
        let field = u32::try_from(key >> 3).map_err(|_| ())?;
        let value = match key & 7 {
            0 => FieldValue::Varint(decode_varint(&mut buf).map_err(|_| ())?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or(())?;
                FieldValue::Fixed
            }
            2 => {
                let len = usize::try_from(decode_varint(&mut buf).map_err(|_| ())?).map_err(|_| ())?;
                let body = buf.get(..len).ok_or(())?;
                buf = &buf[len..];
                FieldValue::Bytes(body)
            }
            _ => return Err(()),
        };
        if !visit(field, value) {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{request, GetRequest, Request};

    fn get(id: u64, key: &'static [u8]) -> Request {
        Request {
            id,
            op: Some(request::Op::Get(GetRequest {
                key: Bytes::from_static(key),
            })),
        }
    }

    // Goal: encode then decode round-trips, across frames split at every byte boundary.
    #[test]
    fn round_trip_across_partial_reads() {
        let mut stream = Vec::new();
        for id in 0..3 {
            put_frame(&get(id, b"key"), &mut stream);
        }
        for split in 0..stream.len() {
            let mut buf = BytesMut::from(&stream[..split]);
            let mut got = Vec::new();
            while let Some(p) = take_frame(&mut buf, 1024).unwrap() {
                got.push(Request::decode(p).unwrap());
            }
            assert!(bytes_needed(&buf) > buf.len());
            buf.extend_from_slice(&stream[split..]);
            while let Some(p) = take_frame(&mut buf, 1024).unwrap() {
                got.push(Request::decode(p).unwrap());
            }
            assert_eq!(got, (0..3).map(|id| get(id, b"key")).collect::<Vec<_>>());
            assert!(buf.is_empty());
        }
    }

    // Goal: an oversized length is refused from the header alone, before any payload arrives.
    #[test]
    fn oversized_frame_is_refused_from_the_header() {
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]);
        assert_eq!(take_frame(&mut buf, 1024), Err(FrameTooLarge { len: 1025, max: 1024 }));
    }

    // Goal: an empty payload is a valid frame (an all-defaults message).
    #[test]
    fn empty_payload_is_a_frame() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(take_frame(&mut buf, 16).unwrap(), Some(Bytes::new()));
    }
}
