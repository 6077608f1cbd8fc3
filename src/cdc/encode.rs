//! Change events on the wire: protobuf `ChangeBatch` (proto/cdc.proto), or the old
//! service's JSON messages for existing consumers.

use prost::Message;

use crate::proto::cdc::{ChangeBatch, ChangeEvent, Op};
use crate::shard::{Change, ChangeOp};

pub fn event(node_id: &str, c: &Change) -> ChangeEvent {
    ChangeEvent {
        node_id: node_id.to_string(),
        shard: c.shard,
        seq: c.seq,
        timestamp_ms: c.timestamp_ms,
        op: op(c.op) as i32,
        key: c.key.clone(),
        value: c.value.clone(),
        expire_at_ms: c.expire_at_ms,
    }
}

fn op(op: ChangeOp) -> Op {
    match op {
        ChangeOp::Set => Op::Set,
        ChangeOp::Del => Op::Del,
        ChangeOp::Expire => Op::Expire,
        ChangeOp::Expired => Op::Expired,
    }
}

/// One protobuf message for a batch of events of one shard.
pub fn batch(events: Vec<ChangeEvent>) -> Vec<u8> {
    ChangeBatch { events }.encode_to_vec()
}

/// The old service's message for one event: `{"type":0|1,"key":"..","value":..}` with 0 =
/// SET and 1 = DEL (value null). A key removed by expiry is a delete to those consumers;
/// an expiry change has no equivalent there and yields no message.
pub fn json(c: &Change) -> Option<Vec<u8>> {
    // Field order as the old service wrote them; serde_json escapes the strings.
    let string = |b: &[u8]| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()).to_string();
    let (kind, value) = match c.op {
        ChangeOp::Set => (0, string(&c.value)),
        ChangeOp::Del | ChangeOp::Expired => (1, "null".to_string()),
        ChangeOp::Expire => return None,
    };
    Some(format!(r#"{{"type":{kind},"key":{},"value":{value}}}"#, string(&c.key)).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    // Goal: the JSON compatibility shape is exactly the old service's.
    #[test]
    fn json_matches_the_old_shape() {
        assert_eq!(
            json(&change(ChangeOp::Set)).unwrap(),
            br#"{"type":0,"key":"k","value":"v"}"#
        );
        assert_eq!(
            json(&change(ChangeOp::Del)).unwrap(),
            br#"{"type":1,"key":"k","value":null}"#
        );
        assert_eq!(
            json(&change(ChangeOp::Expired)).unwrap(),
            br#"{"type":1,"key":"k","value":null}"#
        );
        assert!(json(&change(ChangeOp::Expire)).is_none());
    }

    // Goal: a batch decodes back into the same events.
    #[test]
    fn batch_round_trips() {
        let events = vec![event("n1", &change(ChangeOp::Set)), event("n1", &change(ChangeOp::Del))];
        let decoded = ChangeBatch::decode(&batch(events.clone())[..]).unwrap();
        assert_eq!(decoded.events, events);
        assert_eq!(decoded.events[0].node_id, "n1");
    }
}
