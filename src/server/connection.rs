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
//!
//! On a TLS port the connection first completes the handshake (within
//! `limits.frame_read_timeout_ms`), then runs the same loop over rustls: received bytes are
//! decrypted into the same input buffer the plaintext path reads into, and each batch of
//! replies is encrypted into one buffer and sent with one write. Everything else (framing,
//! dispatch, limits) cannot tell the two apart.
//!
//! The same loop serves the Redis port ([`Front::Resp`]): only taking requests off the
//! input and writing replies differ (`super::resp`); batching, backpressure, timeouts,
//! shutdown, TLS and authentication are shared.

use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{select, Either};
use glommio::timer::sleep;
use rustls::ServerConnection;

use super::access::{self, Session};
use super::core::{Core, Counters};
use super::dispatch;
use super::resp as redis;
use super::uring::{set_nodelay, Ring};
use crate::proto::{ErrorCode, Response};
use crate::{resp, wire};

/// The protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// Length-prefixed protobuf (proto/flux.proto).
    Protobuf,
    /// Redis' RESP2 (`resp.listen`).
    Resp,
}

/// Read buffer size, and its smallest growth step (a large frame grows it by doubling).
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Buffers grown past this by one large frame or reply go back to the default size after.
const BUFFER_SHRINK_BYTES: usize = 1 << 20;
/// During shutdown, a connection with no new data for this long is closed.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// Serves one accepted connection until the peer closes it, it misbehaves, or shutdown.
pub async fn serve(core: Rc<Core>, fd: OwnedFd, front: Front) {
    if let Err(e) = set_nodelay(&fd) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
    let open = &core.counters.connections_open;
    Counters::add(open, 1);
    let access = core.access.load();
    // The peer's address: for protected mode and for logging failed logins.
    let peer = (core.protected || access.users.is_some())
        .then(|| socket2::SockRef::from(&fd).peer_addr().ok().and_then(|a| a.as_socket()))
        .flatten();
    let tls = match &access.tls {
        Some(config) => match ServerConnection::new(config.clone()) {
            Ok(mut c) => {
                // Replies are already bounded by limits.write_buffer_bytes_max per send.
                c.set_buffer_limit(None);
                Some(Box::new(Tls {
                    conn: c,
                    cipher_in: BytesMut::with_capacity(TLS_RECV_BYTES),
                    cipher_out: Vec::new(),
                }))
            }
            Err(e) => {
                tracing::warn!(core = core.index, error = %e, "cannot start a TLS session");
                open.set(open.get() - 1);
                return;
            }
        },
        None => None,
    };
    let session = Session::new(access.users.is_some(), peer);
    drop(access);
    let mut conn = Connection {
        core: core.clone(),
        fd,
        input: BytesMut::with_capacity(READ_CHUNK_BYTES),
        output: Vec::with_capacity(READ_CHUNK_BYTES),
        frame_started: None,
        session,
        tls,
        front,
        parser: resp::Parser::default(),
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
    session: Session,
    /// The TLS session, on a TLS port.
    tls: Option<Box<Tls>>,
    front: Front,
    /// The command being read, on the Redis port.
    parser: resp::Parser,
}

/// Ciphertext read per receive on a TLS connection: one TLS record at most is 16 KiB plus
/// its overhead, and rustls holds at most 16 KiB of decrypted data at a time.
const TLS_RECV_BYTES: usize = 17 << 10;

/// A connection's TLS state: rustls (sans-IO) fed from, and flushed to, the core's ring.
struct Tls {
    conn: ServerConnection,
    /// Received ciphertext on its way into rustls.
    cipher_in: BytesMut,
    /// Encrypted records on their way out.
    cipher_out: Vec<u8>,
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
        if self.tls.is_some() && !self.handshake().await? {
            return Ok(());
        }
        if self.core.protected && !self.session.peer.is_some_and(|p| access::is_loopback(p.ip())) {
            Counters::add(&self.core.counters.connections_refused_protected, 1);
            if let Some(refused) = self.core.protected_log.borrow_mut().note() {
                tracing::warn!(
                    core = self.core.index,
                    peer = ?self.session.peer,
                    refused,
                    "protected mode refused a non-loopback client (logged at most every 10 s per core)"
                );
            }
            let why = access::PROTECTED_MODE.to_string();
            self.refuse(ErrorCode::PermissionDenied, why).await?;
            return self.close().await;
        }
        if self.front == Front::Resp {
            return self.run_resp().await;
        }
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
                    dispatch::refuse_all(&self.core, frames.drain(..))
                } else {
                    dispatch::execute(&self.core, &mut self.session, frames.drain(..)).await
                };
                self.write(responses).await?;
                if self.session.close {
                    // auth.failures_max failed Auth requests: the replies say why.
                    return self.close().await;
                }
            }
            if let Some(e) = too_large {
                // The stream cannot be resynchronised without reading the whole frame.
                self.refuse(ErrorCode::FrameTooLarge, e.to_string()).await?;
                return Ok(());
            }
            if batch_full {
                continue;
            }
            if !self.read_more(&mut draining).await? {
                return Ok(());
            }
        }
    }

    /// The loop of [`Connection::run`] on the Redis port: commands instead of frames.
    async fn run_resp(&mut self) -> io::Result<()> {
        let limits = &self.core.config.limits;
        let commands_max = limits.requests_in_flight_max;
        let parse_limits = resp::Limits {
            // MSET of batch_keys_max pairs, with its name.
            args_max: limits.batch_keys_max.saturating_mul(2).saturating_add(1),
            command_bytes_max: limits.frame_bytes_max,
        };
        let mut draining = false;
        loop {
            let mut batch = redis::Batch::new();
            let mut commands = 0;
            let mut bad = None;
            while commands < commands_max {
                match self.parser.take(&mut self.input, parse_limits) {
                    Ok(Some(args)) => {
                        commands += 1;
                        self.frame_started = None;
                        if draining {
                            resp::error(&mut self.output, "ERR the server is shutting down");
                        } else {
                            batch.push(&self.core, args);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
            if commands > 0 {
                Counters::add(&self.core.counters.requests, commands as u64);
                let quit = batch.quit;
                if !batch.is_empty() {
                    let mut replies = batch.run(&self.core, &mut self.session).await;
                    let flush_at = self.core.config.limits.write_buffer_bytes_max;
                    while replies.next_into(&self.core, &mut self.output) {
                        if self.output.len() >= flush_at {
                            self.flush().await?;
                        }
                    }
                }
                self.flush().await?;
                if quit || self.session.close {
                    return self.close().await;
                }
            }
            if let Some(e) = bad {
                // Redis replies and closes: the stream cannot be trusted past the error.
                self.refuse(ErrorCode::InvalidRequest, e.to_string()).await?;
                return self.close().await;
            }
            if commands == commands_max {
                continue;
            }
            if !self.read_more(&mut draining).await? {
                return Ok(());
            }
        }
    }

    /// Reads more input; false when the connection should end (closed, or a timeout, which
    /// is answered first).
    async fn read_more(&mut self, draining: &mut bool) -> io::Result<bool> {
        match self.read(draining).await? {
            Input::Data => Ok(true),
            Input::Closed => {
                if !self.input.is_empty() {
                    tracing::debug!(
                        core = self.core.index,
                        bytes = self.input.len(),
                        "peer closed mid-frame"
                    );
                }
                Ok(false)
            }
            Input::IdleTimeout => {
                Counters::add(&self.core.counters.connections_timed_out, 1);
                Ok(false)
            }
            Input::FrameTimeout => {
                Counters::add(&self.core.counters.connections_timed_out, 1);
                let limit = self.core.config.limits.frame_read_timeout_ms;
                let why = format!("the frame did not arrive within limits.frame_read_timeout_ms ({limit} ms)");
                self.refuse(ErrorCode::TimedOut, why).await?;
                Ok(false)
            }
        }
    }

    /// Sends a connection-level error in the port's protocol.
    async fn refuse(&mut self, code: ErrorCode, why: String) -> io::Result<()> {
        match self.front {
            Front::Protobuf => self.write(vec![dispatch::error(0, code, why)]).await,
            Front::Resp => {
                let text = match code {
                    ErrorCode::PermissionDenied => format!("DENIED {why}"),
                    _ => format!("ERR {why}"),
                };
                resp::error(&mut self.output, &text);
                self.flush().await
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
        let needed = match self.front {
            Front::Protobuf => wire::bytes_needed(&self.input),
            Front::Resp => self.parser.bytes_needed(),
        };
        let missing = needed.saturating_sub(self.input.len());
        self.input.reserve(READ_CHUNK_BYTES.max(missing.min(self.input.len())));
        let input = std::mem::take(&mut self.input);
        // The read stays in flight across the shutdown notice, so no byte the kernel already
        // handed over is lost; only an idle drained connection cancels it.
        let mut read = pin!(receive(
            &self.core.ring,
            self.fd.as_raw_fd(),
            self.tls.as_deref_mut(),
            input
        ));
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
        if let Some(tls) = self.tls.as_deref_mut() {
            // Encrypt the batch into records (rustls splits at 16 KiB) and send them at once.
            tls.conn.writer().write_all(&self.output)?;
            self.output.clear();
            if self.output.capacity() > BUFFER_SHRINK_BYTES {
                self.output = Vec::with_capacity(READ_CHUNK_BYTES);
            }
            return tls.send(&self.core.ring, self.fd.as_raw_fd()).await;
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

    /// Closes on the server's initiative: on TLS, with a close_notify first, so the peer
    /// reads a clean end rather than a truncation.
    async fn close(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.conn.send_close_notify();
            tls.send(&self.core.ring, self.fd.as_raw_fd()).await?;
        }
        Ok(())
    }

    /// Completes the TLS handshake within `limits.frame_read_timeout_ms`. Returns false
    /// when the connection should just close (timed out, shutting down, peer gone); a peer
    /// that does not speak TLS gets an alert and an error.
    async fn handshake(&mut self) -> io::Result<bool> {
        let limit = self.core.config.limits.frame_read_timeout_ms;
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(true);
        };
        let ring = &self.core.ring;
        let fd = self.fd.as_raw_fd();
        let outcome = {
            let work = pin!(tls.handshake(ring, fd));
            let stop = pin!(self.core.shutting_down());
            let expired = pin!(async move {
                match limit {
                    0 => std::future::pending().await,
                    ms => sleep(Duration::from_millis(ms)).await,
                }
            });
            match select(work, select(stop, expired)).await {
                Either::Left((res, _)) => res,
                Either::Right((Either::Left(_), _)) => Ok(false),
                Either::Right((Either::Right(_), _)) => {
                    Counters::add(&self.core.counters.connections_timed_out, 1);
                    Ok(false)
                }
            }
        };
        if !outcome? {
            return Ok(false);
        }
        // A verified client certificate whose common name is a user's authenticates the
        // connection as that user.
        let tls = self.tls.as_deref().expect("checked above");
        if self.session.grant.is_none() {
            let cn = tls
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(crate::tls::common_name);
            if let Some(cn) = cn {
                let access = self.core.access.load();
                self.session.grant = access.users.as_ref().and_then(|u| u.by_common_name(&cn));
            }
        }
        Ok(true)
    }
}

/// Receives into `input`: straight from the socket, or decrypted through TLS.
async fn receive(
    ring: &Rc<Ring>,
    fd: RawFd,
    tls: Option<&mut Tls>,
    mut input: BytesMut,
) -> (io::Result<usize>, BytesMut) {
    match tls {
        None => ring.recv(fd, input).await,
        Some(tls) => {
            let res = tls.recv(ring, fd, &mut input).await;
            (res, input)
        }
    }
}

impl Tls {
    /// Runs the handshake to its end. Ok(false): the peer closed first.
    async fn handshake(&mut self, ring: &Rc<Ring>, fd: RawFd) -> io::Result<bool> {
        while self.conn.is_handshaking() {
            if self.conn.wants_write() {
                self.send(ring, fd).await?;
                continue;
            }
            if self.receive_records(ring, fd, None).await? == 0 {
                return Ok(false);
            }
        }
        // TLS 1.3 session tickets follow the handshake.
        self.send(ring, fd).await?;
        Ok(true)
    }

    /// Reads decrypted bytes into `input` (growing it as needed); Ok(0) at the end of the
    /// stream.
    async fn recv(&mut self, ring: &Rc<Ring>, fd: RawFd, input: &mut BytesMut) -> io::Result<usize> {
        loop {
            if let Some(n) = drain_plaintext(&mut self.conn, input)? {
                return Ok(n);
            }
            let before = input.len();
            if self.receive_records(ring, fd, Some(input)).await? == 0 {
                return Ok(0);
            }
            if input.len() > before {
                return Ok(input.len() - before);
            }
        }
    }

    /// One receive of ciphertext, fed through rustls; decrypted bytes go to `input` as
    /// they come (rustls holds at most 16 KiB of them). Returns the ciphertext bytes read,
    /// 0 at end of stream. A peer that does not speak TLS (or breaks it) gets an alert.
    async fn receive_records(
        &mut self,
        ring: &Rc<Ring>,
        fd: RawFd,
        mut input: Option<&mut BytesMut>,
    ) -> io::Result<usize> {
        let mut cipher = std::mem::take(&mut self.cipher_in);
        cipher.clear();
        cipher.reserve(TLS_RECV_BYTES);
        let (res, cipher) = ring.recv(fd, cipher).await;
        let n = res?;
        let mut rest = &cipher[..];
        let mut failed = None;
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                Ok(0) => break, // close_notify seen: nothing after it counts
                Ok(_) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if let Err(e) = self.conn.process_new_packets() {
                failed = Some(io::Error::new(io::ErrorKind::InvalidData, e));
                break;
            }
            if let Some(input) = input.as_deref_mut() {
                drain_plaintext(&mut self.conn, input)?;
            }
        }
        self.cipher_in = cipher;
        if let Some(e) = failed {
            // process_new_packets queued an alert for the peer: send it, then close.
            let _ = self.send(ring, fd).await;
            return Err(e);
        }
        if self.conn.wants_write() && !self.conn.is_handshaking() {
            self.send(ring, fd).await?;
        }
        Ok(n)
    }

    /// Sends every record rustls has queued, with one write.
    async fn send(&mut self, ring: &Rc<Ring>, fd: RawFd) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.cipher_out);
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out)?;
        }
        let (res, mut out) = ring.send_all(fd, out).await;
        out.clear();
        if out.capacity() > BUFFER_SHRINK_BYTES {
            out = Vec::new();
        }
        self.cipher_out = out;
        res
    }
}

/// Moves decrypted bytes from rustls into `input`: Some(n) when n > 0 bytes moved, Some(0)
/// after the peer's close_notify, None when nothing is there yet.
fn drain_plaintext(conn: &mut ServerConnection, input: &mut BytesMut) -> io::Result<Option<usize>> {
    let mut moved = 0;
    let mut reader = conn.reader();
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(Some(moved)),
            Ok(chunk) => {
                let n = chunk.len();
                input.extend_from_slice(chunk);
                reader.consume(n);
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((moved > 0).then_some(moved)),
            Err(e) => return Err(e),
        }
    }
}
