//! One request must not stall a core. Alone in its test binary (cargo runs test binaries
//! one after another), so that no other test's load is in its latency figures.
mod common;

use std::time::{Duration, Instant};

use common::{b, code, Client, TestServer};
use flux_kv::proto::{self, request::Op, ErrorCode};

/// An MGET frame of `keys` one-byte keys, encoded by hand: building millions of `Bytes`
/// would take the test longer than the server.
fn huge_mget(id: u64, keys: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(keys * 3);
    for i in 0..keys {
        body.extend_from_slice(&[0x0a, 1, (i % 251) as u8]);
    }
    let mut req = Vec::new();
    req.push(0x08); // id, varint
    prost::encoding::encode_varint(id, &mut req);
    req.extend_from_slice(&[0x82, 0x01]); // field 16 (mget), length-delimited
    prost::encoding::encode_varint(body.len() as u64, &mut req);
    req.extend_from_slice(&body);
    let mut frame = (req.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&req);
    frame
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

// Goal (one request must not stall a core): four clients each send an MGET of 5.5 million
// one-byte keys (a 16 MiB frame) at once; they get BATCH_TOO_LARGE, a PING on another connection
// keeps a p99 under 10 ms meanwhile, and the server's memory stays far from what decoding
// them would take.
#[test]
fn huge_batches_do_not_stall_the_core() {
    let server = TestServer::start(&["--cores", "1"]);
    let frame = std::sync::Arc::new(huge_mget(77, 5_500_000));
    assert!(frame.len() < 16 << 20);
    let mut pinger = server.connect();
    let hogs: Vec<_> = (0..4)
        .map(|_| {
            let (frame, addr) = (frame.clone(), server.addr);
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for _ in 0..3 {
                    c.send_raw(&frame);
                    let r = c.recv().expect("reply");
                    assert_eq!((r.id, code(&r)), (77, Some(ErrorCode::BatchTooLarge)), "{:?}", r.error);
                }
            })
        })
        .collect();
    let mut rtts = Vec::new();
    while !hogs.iter().all(|h| h.is_finished()) || rtts.len() < 200 {
        let t = Instant::now();
        let r = pinger.call(Op::Ping(proto::PingRequest { payload: b(b"x") }));
        rtts.push(t.elapsed());
        assert!(code(&r).is_none());
        std::thread::sleep(Duration::from_millis(1));
    }
    for h in hogs {
        h.join().unwrap();
    }
    let p = p99(rtts);
    assert!(p < Duration::from_millis(10), "PING p99 {p:?} while huge MGETs ran");
    // Four 16 MiB frames in flight at once, and nothing decoded from them.
    let peak_mib = server.status_kib("VmHWM") >> 10;
    assert!(peak_mib < 200, "peak RSS {peak_mib} MiB");
}
