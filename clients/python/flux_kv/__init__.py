"""A Python client of Flux-KV's protobuf contract (proto/flux.proto).

It shows what a client in any language needs: the classes protoc generates from the
contract, 4-byte big-endian length framing, request ids to match pipelined replies, and
(optionally) routing each key to the core that owns it.

    from flux_kv import Client
    with Client("127.0.0.1", 7379) as kv:
        kv.set(b"greeting", b"hello", ttl_ms=60_000)
        print(kv.get(b"greeting"))            # b'hello'
        with kv.pipeline() as p:
            for i in range(100):
                p.set(b"k%d" % i, b"v")
        print(p.results[:3])                  # [True, True, True]

The generated module (flux_pb2) is made by `generate.sh` next to this package.
"""
import socket
import struct

try:
    from . import flux_pb2 as pb
except ImportError as e:  # pragma: no cover - a setup step, not a runtime path
    raise ImportError("flux_kv needs flux_pb2: run clients/python/generate.sh (protoc) first") from e

__all__ = ["Client", "Pipeline", "FluxError", "ConnectionClosed"]

_HEADER = struct.Struct(">I")
# Replies larger than this are refused rather than buffered (the server's default
# limits.frame_bytes_max is 16 MiB).
FRAME_BYTES_MAX = 64 << 20


class FluxError(Exception):
    """An error the server answered with. `code` is the ErrorCode name (KEY_TOO_LARGE,
    OUT_OF_MEMORY, UNAUTHENTICATED, ...), `message` the server's explanation."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The server closed the connection (shutdown, a protocol error, too many failed logins)."""


def _error(err):
    return FluxError(pb.ErrorCode.Name(err.code), err.message)


class _Conn:
    """One socket: frames out, frames in, in order."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, requests):
        self.sock.sendall(b"".join(_frame(r) for r in requests))

    def recv(self):
        while True:
            if len(self.buf) >= 4:
                (n,) = _HEADER.unpack_from(self.buf)
                if n > FRAME_BYTES_MAX:
                    raise ConnectionClosed("reply frame of %d bytes exceeds %d" % (n, FRAME_BYTES_MAX))
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    resp = pb.Response()
                    resp.ParseFromString(body)
                    return resp
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionClosed("the server closed the connection")
            self.buf += chunk

    def close(self):
        self.sock.close()


def _frame(msg):
    body = msg.SerializeToString()
    return _HEADER.pack(len(body)) + body


# How each operation's reply becomes a Python value.
def _value(resp):
    kind = resp.WhichOneof("result")
    r = getattr(resp, kind)
    if kind == "get":
        return r.value if r.found else None
    if kind == "set":
        return r.applied
    if kind == "del":
        return r.existed
    if kind == "exists":
        return r.exists
    if kind in ("expire", "persist"):
        return r.applied
    if kind == "ttl":
        return r.ttl_ms
    if kind == "mget":
        return [v.value if v.found else None for v in r.values]
    if kind == "mset":
        return True
    if kind == "incr":
        return r.value
    if kind == "append":
        return r.length
    if kind == "ping":
        return r.payload
    return r


class _Ops:
    """The operations, each building one Request; `_run` sends it (now, or in a pipeline)."""

    def get(self, key):
        return self._run(key, get=pb.GetRequest(key=key))

    def set(self, key, value, ttl_ms=0, nx=False, xx=False, keep_ttl=False):
        """True when written; False when nx (only if absent) or xx (only if present) failed."""
        if nx and xx:
            raise ValueError("nx and xx exclude each other")
        cond = pb.IF_ABSENT if nx else pb.IF_PRESENT if xx else pb.ALWAYS
        return self._run(key, set=pb.SetRequest(key=key, value=value, ttl_ms=ttl_ms, condition=cond, keep_ttl=keep_ttl))

    def delete(self, key):
        return self._run(key, **{"del": pb.DelRequest(key=key)})

    def exists(self, key):
        return self._run(key, exists=pb.ExistsRequest(key=key))

    def expire(self, key, ttl_ms):
        """Sets the time to live; 0 removes it. False when the key does not exist."""
        return self._run(key, expire=pb.ExpireRequest(key=key, ttl_ms=ttl_ms))

    def ttl(self, key):
        """Milliseconds left; -1 without expiry, -2 for no such key."""
        return self._run(key, ttl=pb.TtlRequest(key=key))

    def incr(self, key, by=1):
        return self._run(key, incr=pb.IncrRequest(key=key, by=by))

    def append(self, key, value):
        return self._run(key, append=pb.AppendRequest(key=key, value=value))

    def persist(self, key):
        return self._run(key, persist=pb.PersistRequest(key=key))

    def mget(self, keys):
        return self._run(None, mget=pb.MGetRequest(keys=list(keys)))

    def mset(self, pairs):
        entries = [pb.KeyValue(key=k, value=v) for k, v in dict(pairs).items()]
        return self._run(None, mset=pb.MSetRequest(entries=entries))

    def ping(self, payload=b""):
        return self._run(None, ping=pb.PingRequest(payload=payload))

    def stats(self):
        """The node's StatsResponse (per-core counters, change capture, persistence)."""
        return self._run(None, stats=pb.StatsRequest())


class Client(_Ops):
    """A connection to one node.

    token: (user, secret) to authenticate with when the node requires it.
    shard_aware: send each key straight to the core that owns it, over that core's own
    port (the node's core_port_base), instead of letting the node forward it. Needs the
    `xxhash` module; ignored when the node announces no core ports.
    """

    def __init__(self, host="127.0.0.1", port=7379, timeout=5.0, token=None, shard_aware=False):
        self.host, self.timeout, self.token = host, timeout, token
        self.next_id = 1
        self.main = self._open(port)
        self.hello = self._call(self.main, hello=pb.HelloRequest())
        self.cores = {}
        self.route = None
        if shard_aware and self.hello.core_ports:
            import xxhash  # routing only: xxh3_64 with seed 0, as proto/flux.proto says

            shards, ports = self.hello.shards, list(self.hello.core_ports)
            self.route = lambda key: ports[(xxhash.xxh3_64_intdigest(key) & (shards - 1)) % len(ports)]

    def _open(self, port):
        conn = _Conn(self.host, port, self.timeout)
        if self.token is not None:
            user, secret = self.token
            token = secret.encode() if isinstance(secret, str) else secret
            self._call(conn, auth=pb.AuthRequest(user=user, token=token))
        return conn

    def _conn_for(self, key):
        if self.route is None or key is None:
            return self.main
        port = self.route(key)
        if port not in self.cores:
            self.cores[port] = self._open(port)
        return self.cores[port]

    def _request(self, **op):
        rid, self.next_id = self.next_id, self.next_id + 1
        return pb.Request(id=rid, **op)

    def _exchange(self, conn, **op):
        """One request on `conn`, answered: its Response, or the server's error raised."""
        req = self._request(**op)
        conn.send([req])
        resp = conn.recv()
        if resp.id != req.id:
            raise ConnectionClosed("reply %d answers no request in flight (expected %d)" % (resp.id, req.id))
        if resp.HasField("error"):
            raise _error(resp.error)
        return resp

    def _call(self, conn, **op):
        """The result message itself (HelloResponse, AuthResponse), for set-up requests."""
        resp = self._exchange(conn, **op)
        return getattr(resp, resp.WhichOneof("result"))

    def _run(self, key, **op):
        return _value(self._exchange(self._conn_for(key), **op))

    def pipeline(self):
        """Requests queued and sent together; `execute()` (or leaving the `with` block)
        sends them and returns the results in order. A failed request's result is its
        FluxError (raised only if `raise_on_error`)."""
        return Pipeline(self)

    def close(self):
        for conn in [self.main, *self.cores.values()]:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Pipeline(_Ops):
    def __init__(self, client, raise_on_error=False):
        self.client, self.raise_on_error = client, raise_on_error
        self.queued = []  # (connection, request)
        self.results = None

    def _run(self, key, **op):
        self.queued.append((self.client._conn_for(key), self.client._request(**op)))
        return self

    def execute(self):
        by_conn = {}
        for conn, req in self.queued:
            by_conn.setdefault(conn, []).append(req)
        for conn, reqs in by_conn.items():
            conn.send(reqs)
        answers = {}
        for conn, reqs in by_conn.items():
            # Replies come back in request order on each connection; ids confirm it.
            for req in reqs:
                resp = conn.recv()
                if resp.id != req.id:
                    raise ConnectionClosed("reply %d out of order (expected %d)" % (resp.id, req.id))
                answers[req.id] = _error(resp.error) if resp.HasField("error") else _value(resp)
        self.results = [answers[req.id] for _, req in self.queued]
        self.queued = []
        if self.raise_on_error:
            for r in self.results:
                if isinstance(r, FluxError):
                    raise r
        return self.results

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.execute()
