//! Listening sockets, made with socket2 before the executors start.
//!
//! Every shard core gets its own listener on the shared address (SO_REUSEPORT): the kernel
//! spreads incoming connections over them, so no core hands sockets to another. They are
//! bound up front, in order, so that port 0 works: the first socket binds port 0 and the
//! others bind the port it got. Optionally each core also gets a port of its own
//! (`core_port_base + core`) for clients that route keys to their owner core themselves.
//!
//! Binding and listening are two steps: the sockets are bound before recovery (so the
//! port is known and a busy port fails fast) and listen only once recovery is done, so a
//! client connecting meanwhile is refused instead of waiting in a backlog.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections per listener before the kernel refuses more.
pub const BACKLOG: i32 = 1024;

/// The listeners of one core.
pub struct CoreListeners {
    pub shared: OwnedFd,
    pub own: Option<OwnedFd>,
    /// This core's socket on the Redis port (`resp.listen`), shared like `shared`.
    pub resp: Option<OwnedFd>,
}

impl CoreListeners {
    /// Starts accepting connections into the kernel's backlog.
    pub fn listen(&self) -> io::Result<()> {
        for fd in std::iter::once(&self.shared)
            .chain(self.own.as_ref())
            .chain(self.resp.as_ref())
        {
            socket2::SockRef::from(fd).listen(BACKLOG)?;
        }
        Ok(())
    }
}

/// Binds `cores` SO_REUSEPORT sockets on `addr` and, when `core_port_base` is non-zero,
/// one exclusive socket per core. Returns them per core with the shared address; they
/// accept nothing until [`CoreListeners::listen`].
///
/// The flag says the port was held by an exited process's listeners (call
/// [`wait_for_orphans`] before listening).
pub fn bind_all(
    addr: SocketAddr,
    cores: usize,
    core_port_base: u16,
) -> io::Result<(Vec<CoreListeners>, SocketAddr, bool)> {
    let orphans = addr.port() != 0 && refuse_if_in_use(addr)?;
    let first = reuseport_listener(addr)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
    let mut shared = vec![first];
    for _ in 1..cores {
        shared.push(reuseport_listener(bound)?);
    }
    let mut out = Vec::with_capacity(cores);
    for (core, s) in shared.into_iter().enumerate() {
        let own = if core_port_base == 0 {
            None
        } else {
            let port = u16::try_from(usize::from(core_port_base) + core).map_err(|_| {
                io::Error::other(format!("core_port_base {core_port_base} + core {core} exceeds 65535"))
            })?;
            let own_addr = SocketAddr::new(bound.ip(), port);
            Some(exclusive_listener(own_addr)?.into())
        };
        out.push(CoreListeners {
            shared: s.into(),
            own,
            resp: None,
        });
    }
    Ok((out, bound, orphans))
}

/// Binds `resp_addr` for every core, as [`bind_all`] binds the main address, and hands each
/// core its socket; returns the address bound (its port, when 0 was asked).
pub fn bind_resp(resp_addr: SocketAddr, listeners: &mut [CoreListeners]) -> io::Result<SocketAddr> {
    if resp_addr.port() != 0 {
        refuse_if_in_use(resp_addr)?;
    }
    let first = reuseport_listener(resp_addr)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
    let mut next = Some(first);
    for l in listeners.iter_mut() {
        let s = match next.take() {
            Some(s) => s,
            None => reuseport_listener(bound)?,
        };
        l.resp = Some(s.into());
    }
    Ok(bound)
}

/// SO_REUSEPORT lets any process of the same user join a port silently; bind the address
/// once without it first, so a second server on a busy port fails instead of sharing it.
///
/// A process killed with live io_uring requests leaves its listeners behind for about a
/// second, until the kernel has cancelled them: the port looks busy though no process holds
/// it. Such orphans are told from a live listener by looking for a process that holds one
/// of the port's listening sockets; with none, the start goes on (and waits for the orphans
/// to go before it listens, see [`wait_for_orphans`]).
fn refuse_if_in_use(addr: SocketAddr) -> io::Result<bool> {
    match probe(addr) {
        Ok(()) => Ok(false),
        Err(e) => {
            only_orphans(addr, e)?;
            tracing::warn!(%addr, "port held by the listeners of an exited process; starting anyway");
            Ok(true)
        }
    }
}

/// For a bind or listen on `addr` that failed with `e`: `Ok` when the port is busy only
/// with listeners no live process holds, else the error to report (naming the holders).
fn only_orphans(addr: SocketAddr, e: io::Error) -> io::Result<()> {
    if e.raw_os_error() != Some(libc::EADDRINUSE) {
        return Err(annotate(e, addr));
    }
    match listening_pids(addr.port()) {
        Some(pids) if pids.is_empty() => Ok(()),
        Some(pids) => Err(io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e} (held by pid {pids:?})"),
        )),
        None => Err(annotate(e, addr)),
    }
}

/// Binds and listens on `addr` without SO_REUSEPORT, then closes the socket again.
fn probe(addr: SocketAddr) -> io::Result<()> {
    // A bound socket alone does not claim a port against SO_REUSEPORT sockets.
    listener(addr, false)?.listen(1)
}

/// Longest wait for an exited process's listeners to go before listening anyway.
const ORPHANS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (bounded) until the orphaned listeners found by [`refuse_if_in_use`] are gone, so
/// the kernel hands no connection to a listener nobody will accept from. Runs after
/// recovery, which usually outlasts them.
pub fn wait_for_orphans(addr: SocketAddr) {
    let started = std::time::Instant::now();
    while probe(addr).is_err() {
        if started.elapsed() > ORPHANS_WAIT {
            tracing::warn!(%addr, "an exited process's listeners are still there; listening beside them");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Starts every core's listeners on `addr`. A killed instance's listeners can still be
/// there when they were not seen at bind time (they go within about a second, as the
/// kernel cancels the dead process's io_uring requests): a listen refused with
/// EADDRINUSE while no live process holds the port is tried again, for at most
/// [`ORPHANS_WAIT`]. A port a live process holds is refused at once, naming it.
pub fn listen_all(listeners: &[CoreListeners], addr: SocketAddr) -> io::Result<()> {
    let started = std::time::Instant::now();
    for l in listeners {
        loop {
            match l.listen() {
                Ok(()) => break,
                Err(e) => {
                    only_orphans(addr, e)?;
                    if started.elapsed() > ORPHANS_WAIT {
                        return Err(io::Error::other(format!(
                            "cannot listen on {addr}: an exited process's listeners did not go within {ORPHANS_WAIT:?}"
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
    Ok(())
}

/// Pids of the processes that hold a listening TCP socket on `port` (any address), read
/// from /proc; `None` when /proc cannot tell.
fn listening_pids(port: u16) -> Option<Vec<u32>> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (the 10th field)
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let mut pids = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()));
        if holds {
            pids.push(pid);
        }
    }
    Some(pids)
}

/// A socket of its own on `addr` (a core's port); an exited process's orphaned listener
/// there is waited out (bounded), a live one is an error.
fn exclusive_listener(addr: SocketAddr) -> io::Result<Socket> {
    let started = std::time::Instant::now();
    loop {
        match listener(addr, false) {
            Ok(s) => return Ok(s),
            Err(e) if started.elapsed() < ORPHANS_WAIT => {
                only_orphans(addr, e)?;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(annotate(e, addr)),
        }
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<Socket> {
    listener(addr, true).map_err(|e| annotate(e, addr))
}

fn listener(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn annotate(e: io::Error, addr: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}
