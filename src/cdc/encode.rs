//! Change events on the wire: protobuf `ChangeBatch` (proto/cdc.proto), or the old
//! service's JSON messages for existing consumers.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::change::{ChangeOp, Event, Fields};
use crate::proto::cdc::{ChangeEvent, Op};

/// Appends `e` to `batch` as one `ChangeBatch.events` entry (field 1), written with prost's
/// field encoders straight from the event's borrowed fields (the capture queue's bytes): no
/// intermediate message, nothing allocated per event. The bytes equal prost's own encoding
/// of the same `ChangeBatch` (checked by a test), proto3 defaults omitted.
pub fn put_event(node_id: &str, e: &Event, batch: &mut Vec<u8>) {
    let c = &e.fields;
    let op = op(c.op) as u64;
    let len = len_delimited(1, node_id.len())
        + varint_field(2, u64::from(c.shard))
        + varint_field(3, c.seq)
        + varint_field(4, e.timestamp_ms)
        + varint_field(5, op)
        + len_delimited(6, c.key.len())
        + len_delimited(7, c.value.len())
        + varint_field(8, c.expire_at_ms);
    batch.reserve(1 + encoded_len_varint(len as u64) + len);
    encode_key(1, WireType::LengthDelimited, batch);
    encode_varint(len as u64, batch);
    put_bytes(1, node_id.as_bytes(), batch);
    put_varint(2, u64::from(c.shard), batch);
    put_varint(3, c.seq, batch);
    put_varint(4, e.timestamp_ms, batch);
    put_varint(5, op, batch);
    put_bytes(6, c.key, batch);
    put_bytes(7, c.value, batch);
    put_varint(8, c.expire_at_ms, batch);
}

fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn put_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    if !b.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(b.len() as u64, buf);
        buf.extend_from_slice(b);
    }
}

fn varint_field(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn len_delimited(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

/// The event as a message (for tools and tests; the forwarder uses [`put_event`]).
pub fn event(node_id: &str, e: &Event) -> ChangeEvent {
    let c = &e.fields;
    ChangeEvent {
        node_id: node_id.to_string(),
        shard: c.shard,
        seq: c.seq,
        timestamp_ms: e.timestamp_ms,
        op: op(c.op) as i32,
        key: bytes::Bytes::copy_from_slice(c.key),
        value: bytes::Bytes::copy_from_slice(c.value),
        expire_at_ms: c.expire_at_ms,
    }
}

fn op(op: ChangeOp) -> Op {
    match op {
        ChangeOp::Set => Op::Set,
        ChangeOp::Del => Op::Del,
        ChangeOp::Expire => Op::Expire,
        ChangeOp::Expired => Op::Expired,
        ChangeOp::Evicted => Op::Evicted,
        ChangeOp::MigrationSet => Op::MigrationSet,
        ChangeOp::MigrationDel => Op::MigrationDel,
    }
}

/// The old service's message for one event: `{"type":0|1,"key":"..","value":..}` with 0 =
/// SET and 1 = DEL (value null). A key removed by expiry or eviction is a delete to those
/// consumers; an expiry change has no equivalent there and yields no message, nor does a
/// slot migration's copy or drop (the key's value did not change).
pub fn json(c: &Fields) -> Option<Vec<u8>> {
    // Field order as the old service wrote them; serde_json escapes the strings.
    let string = |b: &[u8]| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()).to_string();
    let (kind, value) = match c.op {
        ChangeOp::Set => (0, string(c.value)),
        ChangeOp::Del | ChangeOp::Expired | ChangeOp::Evicted => (1, "null".to_string()),
        ChangeOp::Expire | ChangeOp::MigrationSet | ChangeOp::MigrationDel => return None,
    };
    Some(format!(r#"{{"type":{kind},"key":{},"value":{value}}}"#, string(c.key)).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Change;
    use bytes::Bytes;

    fn change(op: ChangeOp) -> Change {
        Change {
            shard: 3,
            seq: 9,
            timestamp_ms: 1,
            op,
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            expire_at_ms: 0,
            log_end: 0,
        }
    }

    // Goal: the JSON compatibility shape is exactly the old service's.
    #[test]
    fn json_matches_the_old_shape() {
        assert_eq!(
            json(&change(ChangeOp::Set).fields()).unwrap(),
            br#"{"type":0,"key":"k","value":"v"}"#
        );
        assert_eq!(
            json(&change(ChangeOp::Del).fields()).unwrap(),
            br#"{"type":1,"key":"k","value":null}"#
        );
        assert_eq!(
            json(&change(ChangeOp::Expired).fields()).unwrap(),
            br#"{"type":1,"key":"k","value":null}"#
        );
        assert_eq!(
            json(&change(ChangeOp::Evicted).fields()).unwrap(),
            br#"{"type":1,"key":"k","value":null}"#
        );
        assert!(json(&change(ChangeOp::Expire).fields()).is_none());
    }

    // Goal: the direct encoding is byte for byte prost's encoding of the same ChangeBatch,
    // defaults (empty value, zero expiry, op SET = 0) included.
    #[test]
    fn direct_encoding_equals_prost() {
        use crate::proto::cdc::ChangeBatch;
        use prost::Message;
        let mut changes = vec![change(ChangeOp::Set), change(ChangeOp::Del), change(ChangeOp::Expire)];
        changes[1].value = Bytes::new();
        changes[2].expire_at_ms = 1_795_000_000_000;
        changes[2].key = Bytes::from(vec![0xAB; 300]);
        let mut direct = Vec::new();
        for c in &changes {
            put_event("node-1", &c.event(), &mut direct);
        }
        let events: Vec<ChangeEvent> = changes.iter().map(|c| event("node-1", &c.event())).collect();
        assert_eq!(direct, ChangeBatch { events: events.clone() }.encode_to_vec());
        assert_eq!(ChangeBatch::decode(&direct[..]).unwrap().events, events);
    }
}
