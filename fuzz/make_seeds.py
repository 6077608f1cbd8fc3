#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): a few valid inputs per target,
encoded by hand from proto/flux.proto and the file formats in src/wal and src/cdc."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num: int, value) -> bytes:
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    return varint(num << 3 | 2) + varint(len(value)) + value


def frame(msg: bytes) -> bytes:
    return struct.pack(">I", len(msg)) + msg


def request(rid: int, op_field: int, body: bytes) -> bytes:
    return frame(field(1, rid) + field(op_field, body))


def record(shard, seq, op, expire, key, value) -> bytes:
    body = struct.pack("<IQBQI", shard, seq, op, expire, len(key)) + key + value
    return struct.pack("<II", len(body), crc32c(body)) + body


def write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


get = request(1, 10, field(1, b"key"))
set_ = request(2, 11, field(1, b"key") + field(2, b"value") + field(3, 5000) + field(4, 1))
mget = request(3, 16, field(1, b"a") + field(1, b"b") + field(1, b"c"))
kv = lambda k, v: field(1, field(1, k) + field(2, v))
mset = request(4, 17, kv(b"a", b"1") + kv(b"b", b"2"))
ping = request(5, 18, field(1, b"hi"))
stats = request(6, 19, b"")
write("request_frames", "get", get)
write("request_frames", "set", set_)
write("request_frames", "mget", mget)
write("request_frames", "mset", mset)
write("request_frames", "pipeline", get + set_ + mget + mset + ping + stats)
write("request_frames", "oversized", struct.pack(">I", 1 << 30) + b"\x08\x01")

get_ok = frame(field(1, 1) + field(10, field(1, 1) + field(2, b"value")))
error = frame(field(1, 2) + field(2, field(1, 10) + field(2, b"storage unavailable")))
event = field(1, field(1, b"node") + field(2, 3) + field(3, 7) + field(4, 1767225600000) + field(5, 1) + field(6, b"k") + field(7, b"v"))
write("response_frames", "get", get_ok)
write("response_frames", "error", error)
write("response_frames", "change_batch", frame(event))

records = record(1, 1, 0, 0, b"key", b"value") + record(1, 2, 1, 0, b"key", b"") + record(2, 9, 1, 1767225600000, b"k2", b"v" * 40)
write("log_records", "three", records)
write("log_records", "padded", records + bytes(4096 - len(records)))

header = b"FLUXSNP1" + struct.pack("<IIQQQ", 1, 256, 2, 2, 1767225600000)
header += struct.pack("<I", crc32c(header))
write("snapshot", "two_keys", header + record(1, 2, 0, 0, b"a", b"1") + record(1, 2, 0, 0, b"b", b"2"))

body = b"FLUXCKP1" + struct.pack("<IQ", 4, 1767225600000) + b"".join(struct.pack("<Q", s) for s in (1, 2, 3, 4))
write("checkpoint", "four_shards", body + struct.pack("<I", crc32c(body)))

write("resp_commands", "pipeline", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n")
write("resp_commands", "inline", b"SET \"a b\" 'c\\'d' \"\\x41\\n\"\r\nMSET x 1 y 2\r\n")
write("resp_commands", "replies", b"+OK\r\n-ERR no\r\n:5\r\n$1\r\nv\r\n$-1\r\n*2\r\n$1\r\na\r\n$-1\r\n")
