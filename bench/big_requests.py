#!/usr/bin/env python3
"""PING latency on one connection while HOGS other connections each send huge MGETs.

usage: big_requests.py PORT HOGS KEYS ROUNDS  -> one JSON line: ping p50/p99/max (ms),
pings, the hogs' replies by kind, and how long the hogs ran.
The MGET frame is encoded by hand (proto/flux.proto: Request.id = 1, Request.mget = 16,
MGetRequest.keys = 1), as tests/faults.rs does."""
import json
import socket
import struct
import sys
import threading
import time


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mget_frame(rid, keys):
    body = bytes(b for i in range(keys) for b in (0x0A, 1, i % 251))
    req = b"\x08" + varint(rid) + b"\x82\x01" + varint(len(body)) + body
    return struct.pack(">I", len(req)) + req


def recv_frame(sock, buf):
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    n = 4 + struct.unpack(">I", buf[:4])[0]
    frame = bytes(buf[4:n])
    del buf[:n]
    return frame


def kind(payload):
    # Response.error = 2 (length-delimited): the error's code is its field 1.
    i = 0
    while i < len(payload):
        tag = payload[i]
        if tag == 0x08:  # id
            i += 1
            while payload[i] & 0x80:
                i += 1
            i += 1
        elif tag == 0x12:
            return "error code %d" % payload[i + 3] if payload[i + 2] == 0x08 else "error"
        else:
            return "ok"
    return "ok"


def main():
    port, hogs, keys, rounds = (int(a) for a in sys.argv[1:5])
    frame = mget_frame(77, keys) if hogs else b""
    results, lock = {}, threading.Lock()
    done = threading.Event()

    def hog():
        s = socket.create_connection(("127.0.0.1", port))
        buf = bytearray()
        for _ in range(rounds):
            s.sendall(frame)
            k = kind(recv_frame(s, buf))
            with lock:
                results[k] = results.get(k, 0) + 1
        s.close()

    ping = struct.pack(">I", 5) + b"\x08\x01\x92\x01\x00"  # Request{id: 1, ping: {}} (field 18)
    p = socket.create_connection(("127.0.0.1", port))
    p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pbuf = bytearray()
    threads = [threading.Thread(target=hog) for _ in range(hogs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    rtts = []
    while any(t.is_alive() for t in threads) or len(rtts) < 500:
        t = time.perf_counter()
        p.sendall(ping)
        recv_frame(p, pbuf)
        rtts.append((time.perf_counter() - t) * 1000)
        time.sleep(0.001)
    hog_s = time.perf_counter() - t0
    for t in threads:
        t.join()
    rtts.sort()
    pct = lambda q: rtts[min(len(rtts) - 1, int(len(rtts) * q))]
    print(json.dumps({"pings": len(rtts), "p50_ms": round(pct(0.5), 3), "p99_ms": round(pct(0.99), 3),
                      "max_ms": round(rtts[-1], 3), "replies": results, "seconds": round(hog_s, 2)}))


main()
