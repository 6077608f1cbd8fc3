#!/usr/bin/env python3
"""An independent Flux-KV client for the tests: Python's socket and ssl modules, the
protobuf classes protoc generates from proto/flux.proto, and a small framing helper.

    flux_probe.py --pb DIR --addr HOST:PORT [--tls-ca F] [--cert F --key F]
                  [--server-name NAME] [--source-ip IP] STEP...

STEP is one of: ping, hello, stats, snapshot, auth:USER:TOKEN, auth-file:PATH,
get:KEY, set:KEY:VALUE (the value after the last ':'), del:KEY, mget:K1,K2,...  Each step sends one request and prints
one line: "ok <field> [detail]", "err <ERROR_CODE>" or "closed" (the server closed the
connection; remaining steps are skipped). A failed TLS handshake prints
"tls-error <reason>"; a connection that fails prints "connect-error <reason>".
"""
import argparse
import socket
import ssl
import struct
import sys


def frame(msg):
    body = msg.SerializeToString()
    return struct.pack(">I", len(body)) + body


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def read_frame(sock, pb):
    head = read_exact(sock, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    body = read_exact(sock, n)
    if body is None:
        return None
    resp = pb.Response()
    resp.ParseFromString(body)
    return resp


def request(pb, rid, step):
    kind, _, rest = step.partition(":")
    req = pb.Request(id=rid)
    if kind == "ping":
        req.ping.payload = b"p"
    elif kind == "hello":
        req.hello.SetInParent()
    elif kind == "stats":
        req.stats.SetInParent()
    elif kind == "snapshot":
        req.snapshot.SetInParent()
    elif kind == "auth":
        user, _, token = rest.partition(":")
        req.auth.user, req.auth.token = user, token.encode()
    elif kind == "auth-file":
        user, _, token = open(rest).read().strip().partition(":")
        req.auth.user, req.auth.token = user, token.encode()
    elif kind == "get":
        req.get.key = rest.encode()
    elif kind == "set":
        key, _, value = rest.rpartition(":")
        req.set.key, req.set.value = key.encode(), value.encode()
    elif kind == "del":
        # "del" is a Python keyword: reach the field by name.
        getattr(req, "del").key = rest.encode()
    elif kind == "mget":
        req.mget.keys.extend(k.encode() for k in rest.split(","))
    else:
        raise SystemExit("unknown step " + step)
    return req


def describe(pb, resp):
    if resp.HasField("error"):
        return "err " + pb.ErrorCode.Name(resp.error.code)
    which = resp.WhichOneof("result")
    detail = ""
    if which == "get":
        detail = resp.get.value.decode(errors="replace") if resp.get.found else "(nil)"
    elif which == "auth":
        detail = resp.auth.user + " " + resp.auth.role
    elif which == "hello":
        detail = "auth_required=" + str(resp.hello.auth_required).lower()
    return ("ok " + str(which) + " " + detail).rstrip()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pb", required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--tls-ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--source-ip")
    p.add_argument("steps", nargs="*")
    a = p.parse_args()
    sys.path.insert(0, a.pb)
    import flux_pb2 as pb

    host, port = a.addr.rsplit(":", 1)
    try:
        sock = socket.create_connection(
            (host, int(port)), timeout=10, source_address=(a.source_ip, 0) if a.source_ip else None
        )
    except OSError as e:
        print("connect-error", e)
        return 2
    if a.tls_ca:
        ctx = ssl.create_default_context(cafile=a.tls_ca)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
        try:
            sock = ctx.wrap_socket(sock, server_hostname=a.server_name)
        except (ssl.SSLError, OSError) as e:
            print("tls-error", getattr(e, "reason", None) or e)
            return 3
    for rid, step in enumerate(a.steps, start=1):
        try:
            sock.sendall(frame(request(pb, rid, step)))
            resp = read_frame(sock, pb)
        except ssl.SSLError as e:
            # TLS 1.3 reports a refused client certificate on the first read after the handshake.
            print("tls-error", getattr(e, "reason", None) or e)
            return 3
        except OSError:
            # Reset, broken pipe, abort: the server closed the connection.
            resp = None
        if resp is None:
            print("closed")
            return 0
        print(describe(pb, resp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
