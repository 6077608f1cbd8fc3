//! One multiplexed connection: many requests in flight, replies matched by id.
//!
//! Callers hand requests to a writer task, which writes everything queued at that moment
//! with one `write_all` (natural batching under load); a reader task decodes replies and
//! completes each caller's oneshot by `Response.id`. When the connection fails, every
//! waiting caller gets the error at once instead of hanging until its timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::transport::{self, Security, Stream};
use super::Error;
use crate::proto::{request::Op, Request, Response};
use crate::wire;

/// Requests queued to the writer before callers wait (backpressure on the caller).
const QUEUE_REQUESTS_MAX: usize = 4096;
/// Requests one write may carry.
const WRITE_BATCH_MAX: usize = 256;
/// Largest reply frame accepted from a server.
pub const REPLY_FRAME_BYTES_MAX: usize = 64 << 20;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Response, Error>>>>>;

/// A connection to one endpoint (a node's shared port, or one core's own port).
pub struct Connection {
    queue: mpsc::Sender<(Request, oneshot::Sender<Result<Response, Error>>)>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

impl Connection {
    /// Connects (with TLS and Auth as `security` says) and starts the reader and writer.
    pub async fn connect(addr: SocketAddr, security: &Security, timeout: Duration) -> Result<Connection, Error> {
        let stream = transport::open(addr, security, timeout).await?;
        let (read, write) = tokio::io::split(stream);
        let (queue, rx) = mpsc::channel(QUEUE_REQUESTS_MAX);
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(write_loop(write, rx, pending.clone(), alive.clone()));
        tokio::spawn(read_loop(read, pending, alive.clone()));
        Ok(Connection {
            queue,
            next_id: AtomicU64::new(1),
            alive,
            addr,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && !self.queue.is_closed()
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    pub async fn call(&self, op: Op, timeout: Duration) -> Result<Response, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let fut = async {
            self.queue
                .send((Request { id, op: Some(op) }, tx))
                .await
                .map_err(|_| Error::Closed)?;
            rx.await.map_err(|_| Error::Closed)?
        };
        let resp = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout(format!("request {id} to {}", self.addr)))??;
        debug_assert_eq!(resp.id, id);
        Ok(resp)
    }
}

async fn write_loop(
    mut write: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<(Request, oneshot::Sender<Result<Response, Error>>)>,
    pending: Pending,
    alive: Arc<AtomicBool>,
) {
    let mut buf = Vec::with_capacity(16 << 10);
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    while rx.recv_many(&mut batch, WRITE_BATCH_MAX).await > 0 {
        if !alive.load(Ordering::Relaxed) {
            // The reader already failed everyone pending; fail these too, do not park them.
            for (_, tx) in batch.drain(..) {
                let _ = tx.send(Err(Error::Disconnected("connection lost".into())));
            }
            continue;
        }
        {
            let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
            for (req, tx) in batch.drain(..) {
                wire::put_frame(&req, &mut buf);
                map.insert(req.id, tx);
            }
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    alive.store(false, Ordering::Relaxed);
    fail_all(&pending, "connection closed while writing");
    // The connection was dropped (or failed): say so to the node, whose close then ends
    // the reader and frees the socket. Without it a dropped client's socket stayed open.
    let _ = write.shutdown().await;
}

async fn read_loop(mut read: ReadHalf<Stream>, pending: Pending, alive: Arc<AtomicBool>) {
    let mut input = BytesMut::with_capacity(16 << 10);
    let reason = loop {
        match wire::take_frame(&mut input, REPLY_FRAME_BYTES_MAX) {
            Ok(Some(payload)) => {
                let resp = match Response::decode(payload) {
                    Ok(r) => r,
                    Err(e) => break format!("reply does not decode: {e}"),
                };
                let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&resp.id);
                if let Some(tx) = waiter {
                    // The caller may have timed out and gone; nothing to do then.
                    let _ = tx.send(Ok(resp));
                }
                continue;
            }
            Ok(None) => {}
            // A TLS alert record (content type 21, version 3.x) where a frame should be.
            Err(_) if input.starts_with(&[0x15, 0x03]) => {
                break "the node answered with a TLS alert: it speaks TLS only (use --tls / --tls-ca)".into()
            }
            Err(e) => break e.to_string(),
        }
        input.reserve(wire::bytes_needed(&input).saturating_sub(input.len()).max(16 << 10));
        match read.read_buf(&mut input).await {
            Ok(0) => break "server closed the connection".into(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    alive.store(false, Ordering::Relaxed);
    fail_all(&pending, &reason);
}

fn fail_all(pending: &Pending, reason: &str) {
    let waiters: Vec<_> = pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (_, tx) in waiters {
        let _ = tx.send(Err(Error::Disconnected(reason.to_string())));
    }
}
