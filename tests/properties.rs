//! Property tests for every codec of bytes from a peer or a file: what is encoded decodes
//! to the same thing, and arbitrary bytes never panic a decoder (the same entry points the
//! fuzz targets under fuzz/ drive, here for a few thousand cases on every test run).

use bytes::{Bytes, BytesMut};
use flux_kv::change::{ChangeOp, Fields};
use flux_kv::proto::{self, request::Op, Request};
use flux_kv::wal::record::{self, Read};
use flux_kv::wal::snapshot::Header;
use flux_kv::{fuzz, wire};
use proptest::prelude::*;
use prost::Message;

fn key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}

/// A request of any kind the protocol has, with arbitrary keys, values and numbers.
fn request() -> impl Strategy<Value = Request> {
    let op = prop_oneof![
        key().prop_map(|k| Op::Get(proto::GetRequest { key: k.into() })),
        (key(), key(), any::<u64>(), 0..3i32).prop_map(|(k, v, ttl_ms, condition)| Op::Set(proto::SetRequest {
            key: k.into(),
            value: v.into(),
            ttl_ms,
            condition,
            ..Default::default()
        })),
        key().prop_map(|k| Op::Del(proto::DelRequest { key: k.into() })),
        proptest::collection::vec(key(), 0..20).prop_map(|keys| Op::Mget(proto::MGetRequest {
            keys: keys.into_iter().map(Bytes::from).collect(),
        })),
        proptest::collection::vec((key(), key()), 0..20).prop_map(|kvs| Op::Mset(proto::MSetRequest {
            entries: kvs
                .into_iter()
                .map(|(k, v)| proto::KeyValue {
                    key: k.into(),
                    value: v.into(),
                })
                .collect(),
        })),
        key().prop_map(|p| Op::Ping(proto::PingRequest { payload: p.into() })),
    ];
    (any::<u64>(), op).prop_map(|(id, op)| Request { id, op: Some(op) })
}

fn fields_strategy() -> impl Strategy<Value = (u32, u64, u8, u64, Vec<u8>, Vec<u8>)> {
    (any::<u32>(), any::<u64>(), 0..4u8, any::<u64>(), key(), key())
}

fn op(n: u8) -> ChangeOp {
    [ChangeOp::Set, ChangeOp::Del, ChangeOp::Expire, ChangeOp::Expired][n as usize]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    // Goal: frames of any requests, cut into reads at any point, decode back to the same
    // requests, and the batch scan counts exactly the keys of an MGET or MSET.
    #[test]
    fn request_frames_round_trip(reqs in proptest::collection::vec(request(), 1..8), cut in any::<prop::sample::Index>()) {
        let mut stream = Vec::new();
        for r in &reqs {
            wire::put_frame(r, &mut stream);
        }
        let cut = cut.index(stream.len() + 1);
        let mut buf = BytesMut::from(&stream[..cut]);
        let mut got = Vec::new();
        while let Some(p) = wire::take_frame(&mut buf, 1 << 20).unwrap() {
            got.push(p);
        }
        buf.extend_from_slice(&stream[cut..]);
        while let Some(p) = wire::take_frame(&mut buf, 1 << 20).unwrap() {
            got.push(p);
        }
        prop_assert_eq!(got.len(), reqs.len());
        for (p, r) in got.into_iter().zip(&reqs) {
            let keys = match &r.op {
                Some(Op::Mget(m)) => m.keys.len(),
                Some(Op::Mset(m)) => m.entries.len(),
                _ => 0,
            };
            prop_assert_eq!(wire::batch_keys(&p, usize::MAX - 1), keys);
            prop_assert_eq!(wire::request_id(&p), (r.id != 0).then_some(r.id));
            prop_assert_eq!(&Request::decode(p).unwrap(), r);
        }
    }

    // Goal: a log record of any fields decodes to those fields and takes the bytes it said.
    #[test]
    fn log_records_round_trip((shard, seq, o, expire_at_ms, k, v) in fields_strategy()) {
        let f = Fields { shard, seq, op: op(o), expire_at_ms, key: &k, value: &v };
        let mut out = Vec::new();
        let n = record::encode_fields(&f, &mut out);
        out.extend_from_slice(&[0; 16]);
        match record::decode(&out, 1 << 20) {
            Read::Record(c, used) => {
                prop_assert_eq!(used, n);
                prop_assert_eq!(c.fields(), f);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert!(matches!(record::decode(&out[n..], 1 << 20), Read::End));
    }

    // Goal: a snapshot header of any values decodes to the same header.
    #[test]
    fn snapshot_headers_round_trip(shard in any::<u32>(), shards in any::<u32>(), seq in any::<u64>(), keys in any::<u64>(), at in any::<u64>()) {
        let h = Header { shard, shards, seq, keys, written_at_ms: at };
        let mut out = Vec::new();
        h.encode(&mut out);
        prop_assert_eq!(Header::decode(&out), Ok(h));
    }

    // Goal: arbitrary bytes never panic a decoder (frames, requests, responses, change
    // batches, log records, snapshots, checkpoints).
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz::request_stream(&data);
        fuzz::response_stream(&data);
        fuzz::log_records(&data);
        fuzz::snapshot(&data);
        fuzz::checkpoint(&data);
        fuzz::resp_stream(&data);
    }

    // Goal: valid Redis commands with random bytes flipped, fed in pieces, never panic the
    // Redis port's parser and parse the same as fed whole.
    #[test]
    fn mutated_resp_never_panics(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let mut stream = format!("*{}\r\n", args.len()).into_bytes();
        for a in &args {
            stream.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            stream.extend_from_slice(a);
            stream.extend_from_slice(b"\r\n");
        }
        stream.extend_from_slice(b"PING \"inline\" 'x'\r\n");
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] ^= byte;
        }
        fuzz::resp_stream(&stream);
    }

    // Goal: valid frames with random bytes flipped never panic the server's read path.
    #[test]
    fn mutated_frames_never_panic(reqs in proptest::collection::vec(request(), 1..4), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut stream = Vec::new();
        for r in &reqs {
            wire::put_frame(r, &mut stream);
        }
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] ^= byte;
        }
        fuzz::request_stream(&stream);
    }
}
