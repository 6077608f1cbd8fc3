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
}

impl CoreListeners {
    /// Starts accepting connections into the kernel's backlog.
    pub fn listen(&self) -> io::Result<()> {
        for fd in std::iter::once(&self.shared).chain(self.own.as_ref()) {
            socket2::SockRef::from(fd).listen(BACKLOG)?;
        }
        Ok(())
    }
}

/// Binds `cores` SO_REUSEPORT sockets on `addr` and, when `core_port_base` is non-zero,
/// one exclusive socket per core. Returns them per core with the shared address; they
/// accept nothing until [`CoreListeners::listen`].
pub fn bind_all(addr: SocketAddr, cores: usize, core_port_base: u16) -> io::Result<(Vec<CoreListeners>, SocketAddr)> {
    if addr.port() != 0 {
        refuse_if_in_use(addr)?;
    }
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
            Some(listener(own_addr, false).map_err(|e| annotate(e, own_addr))?.into())
        };
        out.push(CoreListeners { shared: s.into(), own });
    }
    Ok((out, bound))
}

/// SO_REUSEPORT lets any process of the same user join a port silently; bind the address
/// once without it first, so a second server on a busy port fails instead of sharing it.
fn refuse_if_in_use(addr: SocketAddr) -> io::Result<()> {
    let probe = listener(addr, false).map_err(|e| annotate(e, addr))?;
    // A bound socket alone does not claim a port against SO_REUSEPORT sockets.
    probe.listen(1).map_err(|e| annotate(e, addr))
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
