//! The per-core network ring: all socket I/O of a core goes through this module.
//!
//! glommio's `TcpStream` costs about twice the CPU per request of a plain io_uring loop on
//! this kind of machine (it re-arms a one-shot POLL_ADD through its ring after every short
//! read). So each shard core owns a second io_uring, used only for sockets:
//!
//! - created in the executor thread with SINGLE_ISSUER + DEFER_TASKRUN where the kernel has
//!   them (6.1+), so completions are processed only when this thread asks for them; older
//!   kernels get a plain ring and the start-up log says which one is in use;
//! - an eventfd registered on the ring is signalled when completions are pending; when there
//!   is nothing to do the driver task awaits an 8-byte read of that eventfd through glommio's
//!   own ring, so the executor parks normally and other tasks (mesh, timers) keep running;
//! - operations are futures that own their buffer while the kernel may write to it (the
//!   completion-based model of tokio-uring): a future dropped early hands its buffer to the
//!   ring, which cancels the operation and frees the buffer only after the kernel is done.
//!
//! The rest of the server sees only `accept`, `recv`, `send` and `Ring::drive`.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use glommio::io::BufferedFile;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

/// `user_data` of AsyncCancel requests, whose completions carry no information we need.
const CANCEL_USER_DATA: u64 = u64::MAX;
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Which kind of ring the core got, for the start-up log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1+): the fast path.
    DeferTaskrun,
    /// A plain ring for older kernels: same code, more kernel work per completion.
    Plain,
}

/// Most bytes one receive copies: the copy runs on the core's thread (the ring defers its
/// task work to it), so a peer with a large frame and a full socket buffer gets its bytes
/// in slices, with other connections served in between.
const RECV_BYTES_MAX: usize = 1 << 20;

/// A core's network ring. Lives in one executor thread (it is `!Send`).
pub struct Ring {
    inner: RefCell<Inner>,
    kind: RingKind,
    /// The pending read of the ring's eventfd the driver parks on; kept across parks so a
    /// wake-up by a new submission does not cancel and re-issue it.
    park_read: RefCell<Option<Pin<Box<dyn Future<Output = ()>>>>>,
    eventfd: Rc<BufferedFile>,
}

struct Inner {
    uring: IoUring,
    ops: Slab<Slot>,
    /// The driver's waker while it is parked; a new submission wakes it.
    parked: Option<Waker>,
}

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
    /// The future was dropped before completion. The buffer stays here until the kernel
    /// reports the operation finished; `closes_fd` marks an accept whose socket, if the
    /// accept still succeeded, nobody will own.
    Orphaned {
        _buf: Option<Box<dyn Any>>,
        closes_fd: bool,
    },
}

impl Ring {
    /// Creates the ring in the calling executor thread.
    pub fn new(entries: u32) -> io::Result<Rc<Ring>> {
        let (uring, kind) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
        {
            Ok(r) => (r, RingKind::DeferTaskrun),
            Err(_) => (IoUring::new(entries)?, RingKind::Plain),
        };
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a valid descriptor nobody else owns; BufferedFile closes it on drop.
        let eventfd = Rc::new(unsafe { BufferedFile::from_raw_fd(efd) });
        uring.submitter().register_eventfd(efd)?;
        Ok(Rc::new(Ring {
            inner: RefCell::new(Inner {
                uring,
                ops: Slab::with_capacity(256),
                parked: None,
            }),
            kind,
            park_read: RefCell::new(None),
            eventfd,
        }))
    }

    pub fn kind(&self) -> RingKind {
        self.kind
    }

    /// Accepts one connection on `listener`.
    pub async fn accept(self: &Rc<Self>, listener: RawFd) -> io::Result<OwnedFd> {
        let entry = opcode::Accept::new(types::Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        let (res, ()) = self.submit(entry, (), true).await;
        // SAFETY: a non-negative accept result is a new descriptor that we now own.
        result(res).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// Receives into the spare capacity of `buf` (the caller reserves it); returns the bytes
    /// read, 0 at end of stream.
    /// Receives into `buf`'s spare capacity, at most [`RECV_BYTES_MAX`] at once.
    pub async fn recv(self: &Rc<Self>, fd: RawFd, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let spare = buf.spare_capacity_mut();
        let entry = opcode::Recv::new(
            types::Fd(fd),
            spare.as_mut_ptr().cast(),
            spare.len().min(RECV_BYTES_MAX) as u32,
        )
        .build();
        let (res, mut buf) = self.submit(entry, buf, false).await;
        let res = result(res).map(|n| n as usize);
        if let Ok(n) = res {
            // SAFETY: the kernel initialised n bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
        }
        (res, buf)
    }

    /// Sends `buf[from..]`; returns how many bytes went out (possibly fewer than asked).
    pub async fn send(self: &Rc<Self>, fd: RawFd, buf: Vec<u8>, from: usize) -> (io::Result<usize>, Vec<u8>) {
        let rest = &buf[from..];
        let entry = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len().min(u32::MAX as usize) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        let (res, buf) = self.submit(entry, buf, false).await;
        (result(res).map(|n| n as usize), buf)
    }

    /// Sends all of `buf`, looping over partial sends.
    pub async fn send_all(self: &Rc<Self>, fd: RawFd, mut buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut sent = 0;
        while sent < buf.len() {
            let (res, b) = self.send(fd, buf, sent).await;
            buf = b;
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => sent += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn submit<B: 'static>(self: &Rc<Self>, entry: squeue::Entry, buf: B, closes_fd: bool) -> Op<B> {
        let mut inner = self.inner.borrow_mut();
        let key = inner.ops.insert(Slot::Waiting(None));
        inner.push(entry.user_data(key as u64));
        if let Some(w) = inner.parked.take() {
            w.wake();
        }
        Op {
            ring: self.clone(),
            key,
            buf: Some(buf),
            closes_fd,
        }
    }

    /// Runs the ring for the life of the executor: submits what tasks queued, hands
    /// completions to their futures, and parks on the eventfd when there is nothing to do.
    pub async fn drive(self: Rc<Self>) {
        let mut wakers = Vec::with_capacity(64);
        loop {
            self.submit_and_reap(&mut wakers);
            if wakers.is_empty() {
                self.park().await;
                continue;
            }
            for w in wakers.drain(..) {
                w.wake();
            }
            // Let the woken tasks run (and queue their next operations) before the next
            // submit, so one io_uring_enter carries the work of many connections. While this
            // loop keeps the run queue busy, glommio looks at other cores' messages only when
            // its preempt timer fires: `runtime.preempt_timer_us` bounds that wait.
            glommio::executor().yield_now().await;
        }
    }

    /// One io_uring_enter: submit queued entries and run deferred completions without
    /// waiting, then collect the wakers of finished operations.
    fn submit_and_reap(&self, wakers: &mut Vec<Waker>) {
        let mut inner = self.inner.borrow_mut();
        let to_submit = inner.uring.submission().len() as u32;
        // SAFETY: no sigset is passed; GETEVENTS with min_complete 0 never blocks. Errors
        // (EINTR, EBUSY when the completion queue is backed up) are retried on the next pass.
        let _ = unsafe {
            inner
                .uring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
        };
        // Disjoint borrows: walk the completion queue while updating the slots (no copy).
        let Inner { uring, ops, .. } = &mut *inner;
        for cqe in uring.completion() {
            let (user_data, res) = (cqe.user_data(), cqe.result());
            if user_data == CANCEL_USER_DATA {
                continue;
            }
            let key = user_data as usize;
            match ops.get_mut(key) {
                Some(slot @ Slot::Waiting(_)) => {
                    if let Slot::Waiting(Some(w)) = std::mem::replace(slot, Slot::Done(res)) {
                        wakers.push(w);
                    }
                }
                Some(Slot::Orphaned { closes_fd, .. }) => {
                    if *closes_fd && res >= 0 {
                        // SAFETY: an accept nobody awaits any more produced this descriptor.
                        unsafe { libc::close(res) };
                    }
                    ops.remove(key);
                }
                Some(Slot::Done(_)) | None => debug_assert!(false, "completion for unknown op {key}"),
            }
        }
    }

    /// Waits until the eventfd says completions are pending or a task queued a submission.
    async fn park(&self) {
        std::future::poll_fn(|cx| {
            let mut inner = self.inner.borrow_mut();
            if !inner.uring.submission().is_empty() {
                return Poll::Ready(());
            }
            inner.parked = Some(cx.waker().clone());
            drop(inner);
            let mut slot = self.park_read.borrow_mut();
            let read = slot.get_or_insert_with(|| {
                let file = self.eventfd.clone();
                Box::pin(async move {
                    // The value is a count we do not need; errors just end this park.
                    let _ = file.read_at(0, 8).await;
                })
            });
            if read.as_mut().poll(cx).is_ready() {
                *slot = None;
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        self.inner.borrow_mut().parked = None;
    }
}

impl Inner {
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY (all pushes): every buffer an entry points at is owned by its `Op` or, once
        // orphaned, by its slot, until the completion arrives.
        while unsafe { self.uring.submission().push(&entry) }.is_err() {
            // Submission queue full: hand what is queued to the kernel and retry.
            if let Err(e) = self.uring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "network ring submit failed");
                }
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the ring cancels what is in flight asynchronously; buffers the kernel may
        // still write to are leaked rather than freed under it. Happens only at core exit.
        for slot in self.ops.drain() {
            if let Slot::Orphaned { _buf, .. } = slot {
                std::mem::forget(_buf);
            }
        }
    }
}

/// One submitted operation; resolves to the raw result and the buffer given back.
struct Op<B: 'static> {
    ring: Rc<Ring>,
    key: usize,
    buf: Option<B>,
    closes_fd: bool,
}

impl<B: 'static + Unpin> Future for Op<B> {
    type Output = (i32, B);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.ring.inner.borrow_mut();
        match inner.ops.get_mut(self.key) {
            Some(Slot::Done(res)) => {
                let res = *res;
                inner.ops.remove(self.key);
                drop(inner);
                let buf = self.buf.take().expect("op polled after completion");
                Poll::Ready((res, buf))
            }
            Some(Slot::Waiting(w)) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => unreachable!("op slot vanished while its future was alive"),
        }
    }
}

impl<B: 'static> Drop for Op<B> {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut inner = self.ring.inner.borrow_mut();
        match inner.ops.get_mut(self.key) {
            Some(Slot::Done(res)) => {
                if self.closes_fd && *res >= 0 {
                    // SAFETY: a finished accept nobody will collect; we own its descriptor.
                    unsafe { libc::close(*res) };
                }
                inner.ops.remove(self.key);
            }
            Some(slot @ Slot::Waiting(_)) => {
                *slot = Slot::Orphaned {
                    _buf: Some(Box::new(buf)),
                    closes_fd: self.closes_fd,
                };
                let cancel = opcode::AsyncCancel::new(self.key as u64)
                    .build()
                    .user_data(CANCEL_USER_DATA);
                inner.push(cancel);
                if let Some(w) = inner.parked.take() {
                    w.wake();
                }
            }
            _ => {}
        }
    }
}

fn result(res: i32) -> io::Result<i32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
    }
}

/// Sets TCP_NODELAY: replies are already batched into one send per request batch, so
/// Nagle's algorithm would only add latency.
pub fn set_nodelay(fd: &OwnedFd) -> io::Result<()> {
    socket2::SockRef::from(fd).set_tcp_nodelay(true)
}
