//! One client connection: read frames, execute them as a batch, write the replies in order
//! with one send per batch.
//!
//! The loop is strictly read -> execute -> write. A connection therefore never has more than
//! `limits.requests_in_flight_max` requests being worked on, and while it writes it does not
//! read: a client that sends faster than it reads is held back by TCP itself (backpressure),
//! and no request is ever dropped.
//!
//! Shutdown: frames already read are answered normally; data read after shutdown began gets
//! SHUTTING_DOWN replies; the connection closes once it has been idle for `DRAIN_IDLE`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{select, Either};
use glommio::timer::sleep;

use super::core::{Core, Counters};
use super::dispatch;
use super::uring::set_nodelay;
use crate::proto::{ErrorCode, Response};
use crate::wire;

/// Read buffer size, and its smallest growth step (a large frame grows it by doubling).
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Buffers grown past this by one large frame or reply go back to the default size after.
const BUFFER_SHRINK_BYTES: usize = 1 << 20;
/// During shutdown, a connection with no new data for this long is closed.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// Serves one accepted connection until the peer closes it, it misbehaves, or shutdown.
pub async fn serve(core: Rc<Core>, fd: OwnedFd) {
    if let Err(e) = set_nodelay(&fd) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
    let open = &core.counters.connections_open;
    Counters::add(open, 1);
    let mut conn = Connection {
        core: core.clone(),
        fd,
        input: BytesMut::with_capacity(READ_CHUNK_BYTES),
        output: Vec::with_capacity(READ_CHUNK_BYTES),
        frame_started: None,
    };
    match conn.run().await {
        Ok(()) => {}
        // A peer that resets or vanishes is normal life for a server, not an error.
        Err(e) => tracing::debug!(core = core.index, error = %e, "connection closed"),
    }
    open.set(open.get() - 1);
}

struct Connection {
    core: Rc<Core>,
    fd: OwnedFd,
    input: BytesMut,
    output: Vec<u8>,
    /// When the first byte of the frame being read was seen (None between frames).
    frame_started: Option<Instant>,
}

/// What one read brought.
enum Input {
    Data,
    /// The peer closed, or shutdown found the connection idle.
    Closed,
    IdleTimeout,
    FrameTimeout,
}

impl Connection {
    async fn run(&mut self) -> io::Result<()> {
        let limits = &self.core.config.limits;
        let (frames_max, frame_bytes_max) = (limits.requests_in_flight_max, limits.frame_bytes_max);
        let mut frames: Vec<Bytes> = Vec::with_capacity(frames_max.min(1024));
        let mut draining = false;
        loop {
            let mut too_large = None;
            while frames.len() < frames_max {
                match wire::take_frame(&mut self.input, frame_bytes_max) {
                    Ok(Some(payload)) => {
                        frames.push(payload);
                        self.frame_started = None;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        too_large = Some(e);
                        break;
                    }
                }
            }
            let batch_full = frames.len() == frames_max;
            if !frames.is_empty() {
                Counters::add(&self.core.counters.requests, frames.len() as u64);
                let responses = if draining {
                    dispatch::refuse_all(frames.drain(..))
                } else {
                    dispatch::execute(&self.core, frames.drain(..)).await
                };
                self.write(responses).await?;
            }
            if let Some(e) = too_large {
                // The stream cannot be resynchronised without reading the whole frame.
                self.write(vec![dispatch::error(0, ErrorCode::FrameTooLarge, e.to_string())])
                    .await?;
                return Ok(());
            }
            if batch_full {
                continue;
            }
            match self.read(&mut draining).await? {
                Input::Data => {}
                Input::Closed => {
                    if !self.input.is_empty() {
                        tracing::debug!(
                            core = self.core.index,
                            bytes = self.input.len(),
                            "peer closed mid-frame"
                        );
                    }
                    return Ok(());
                }
                Input::IdleTimeout => {
                    Counters::add(&self.core.counters.connections_timed_out, 1);
                    return Ok(());
                }
                Input::FrameTimeout => {
                    Counters::add(&self.core.counters.connections_timed_out, 1);
                    let limit = self.core.config.limits.frame_read_timeout_ms;
                    let why = format!("the frame did not arrive within limits.frame_read_timeout_ms ({limit} ms)");
                    self.write(vec![dispatch::error(0, ErrorCode::TimedOut, why)]).await?;
                    return Ok(());
                }
            }
        }
    }

    /// Reads more input, unless the peer closes, shutdown finds the connection idle, or a
    /// timeout passes: `limits.idle_timeout_ms` between frames, `limits.frame_read_timeout_ms`
    /// from a frame's first byte to its last.
    async fn read(&mut self, draining: &mut bool) -> io::Result<Input> {
        if self.input.is_empty() && self.input.capacity() > BUFFER_SHRINK_BYTES {
            self.input = BytesMut::with_capacity(READ_CHUNK_BYTES);
        }
        let limits = &self.core.config.limits;
        let partial = !self.input.is_empty();
        let timeout = if partial {
            let since = *self.frame_started.get_or_insert_with(Instant::now);
            (limits.frame_read_timeout_ms > 0)
                .then(|| Duration::from_millis(limits.frame_read_timeout_ms).saturating_sub(since.elapsed()))
        } else {
            self.frame_started = None;
            (limits.idle_timeout_ms > 0).then(|| Duration::from_millis(limits.idle_timeout_ms))
        };
        // Room for at least a chunk (many small pipelined frames per read), and for a large
        // frame growth by at most what has arrived (doubling), never by what a header
        // claims: a peer must send the bytes before the server holds memory for them.
        let missing = wire::bytes_needed(&self.input).saturating_sub(self.input.len());
        self.input.reserve(READ_CHUNK_BYTES.max(missing.min(self.input.len())));
        let input = std::mem::take(&mut self.input);
        // The read stays in flight across the shutdown notice, so no byte the kernel already
        // handed over is lost; only an idle drained connection cancels it.
        let mut read = pin!(self.core.ring.recv(self.fd.as_raw_fd(), input));
        let mut expired = pin!(async move {
            match timeout {
                Some(t) => sleep(t).await,
                None => std::future::pending().await,
            }
        });
        let (res, input) = loop {
            if *draining {
                match select(read.as_mut(), pin!(sleep(DRAIN_IDLE))).await {
                    Either::Left((r, _)) => break r,
                    Either::Right(_) => return Ok(Input::Closed),
                }
            }
            let stop = pin!(self.core.shutting_down());
            match select(read.as_mut(), select(stop, expired.as_mut())).await {
                Either::Left((r, _)) => break r,
                Either::Right((Either::Left(_), _)) => *draining = true,
                Either::Right((Either::Right(_), _)) if partial => return Ok(Input::FrameTimeout),
                Either::Right((Either::Right(_), _)) => return Ok(Input::IdleTimeout),
            }
        };
        self.input = input;
        Ok(if res? == 0 { Input::Closed } else { Input::Data })
    }

    /// Encodes `responses` in order and sends them, in as few sends as the buffer limit allows.
    async fn write(&mut self, responses: Vec<Response>) -> io::Result<()> {
        let flush_at = self.core.config.limits.write_buffer_bytes_max;
        for r in &responses {
            wire::put_frame(r, &mut self.output);
            if self.output.len() >= flush_at {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.output);
        let (res, mut out) = self.core.ring.send_all(self.fd.as_raw_fd(), out).await;
        out.clear();
        if out.capacity() > BUFFER_SHRINK_BYTES {
            out = Vec::with_capacity(READ_CHUNK_BYTES);
        }
        self.output = out;
        res
    }
}
