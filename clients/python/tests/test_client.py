"""The Python client against a running node: `FLUX_ADDR=host:port python3 test_client.py`.
With FLUX_SHARD_AWARE=1 the node must announce core ports (core_port_base); the test then
checks that keys went straight to their owner cores."""
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flux_kv import Client, FluxError  # noqa: E402

HOST, PORT = os.environ.get("FLUX_ADDR", "127.0.0.1:7379").rsplit(":", 1)
PORT = int(PORT)


def unique(name):
    return ("py:%s:%d:%s" % (name, os.getpid(), time.time_ns())).encode()


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.kv = Client(HOST, PORT)

    def tearDown(self):
        self.kv.close()

    # Goal: every operation round-trips its values and reports what Redis-like callers expect.
    def test_operations(self):
        kv, k = self.kv, unique("ops")
        self.assertEqual(kv.ping(b"hi"), b"hi")
        self.assertIsNone(kv.get(k))
        self.assertTrue(kv.set(k, b"v1"))
        self.assertEqual(kv.get(k), b"v1")
        self.assertFalse(kv.set(k, b"v2", nx=True))
        self.assertTrue(kv.set(k, b"v3", xx=True))
        self.assertFalse(kv.set(unique("absent"), b"x", xx=True))
        self.assertTrue(kv.exists(k))
        self.assertEqual(kv.ttl(k), -1)
        self.assertTrue(kv.expire(k, 60_000))
        self.assertTrue(0 < kv.ttl(k) <= 60_000)
        self.assertTrue(kv.set(k, b"v4", keep_ttl=True))
        self.assertTrue(0 < kv.ttl(k) <= 60_000)
        self.assertTrue(kv.persist(k))
        self.assertEqual(kv.ttl(k), -1)
        self.assertTrue(kv.set(k, b"short", ttl_ms=1))
        time.sleep(0.01)
        self.assertIsNone(kv.get(k))
        self.assertEqual(kv.ttl(k), -2)
        n = unique("counter")
        self.assertEqual(kv.incr(n), 1)
        self.assertEqual(kv.incr(n, -11), -10)
        self.assertEqual(kv.append(n, b"5"), 4)
        self.assertEqual(kv.get(n), b"-105")
        a, b = unique("a"), unique("b")
        self.assertTrue(kv.mset({a: b"1", b: b"2"}))
        self.assertEqual(kv.mget([a, unique("none"), b]), [b"1", None, b"2"])
        self.assertTrue(kv.delete(a))
        self.assertFalse(kv.delete(a))
        self.assertFalse(kv.exists(a))
        stats = kv.stats()
        self.assertEqual(len(stats.cores), kv.hello.cores)
        self.assertGreater(sum(c.keys for c in stats.cores), 0)

    # Goal: errors arrive typed, with the server's code and message, and the connection
    # stays usable.
    def test_typed_errors(self):
        kv = self.kv
        with self.assertRaises(FluxError) as e:
            kv.set(b"k" * (1 << 20), b"v")
        self.assertEqual(e.exception.code, "KEY_TOO_LARGE")
        self.assertIn("limits.key_bytes_max", e.exception.message)
        s = unique("text")
        kv.set(s, b"abc")
        with self.assertRaises(FluxError) as e:
            kv.incr(s)
        self.assertEqual(e.exception.code, "NOT_AN_INTEGER")
        self.assertEqual(kv.ping(), b"")

    # Goal: a pipeline of many requests is sent at once and every reply matched to its
    # request by id, errors in place.
    def test_pipelining(self):
        kv, prefix = self.kv, unique("pipe")
        with kv.pipeline() as p:
            for i in range(2000):
                p.set(prefix + b"%d" % i, b"%d" % i)
        self.assertEqual(p.results, [True] * 2000)
        p = kv.pipeline()
        for i in range(2000):
            p.get(prefix + b"%d" % i)
        p.incr(prefix + b"0", 1)
        p.set(b"k" * (1 << 20), b"v")
        p.incr(prefix + b"1", 1)
        results = p.execute()
        self.assertEqual(results[:2000], [b"%d" % i for i in range(2000)])
        self.assertEqual(results[2000], 1)
        self.assertIsInstance(results[2001], FluxError)
        self.assertEqual(results[2002], 2)

    # Goal: with shard-aware routing every key goes straight to its owner core, so no core
    # forwards any of them to another.
    @unittest.skipUnless(os.environ.get("FLUX_SHARD_AWARE") == "1", "needs a node with core ports")
    def test_shard_aware_routing(self):
        kv = Client(HOST, PORT, shard_aware=True)
        self.assertTrue(kv.route is not None, "the node announces core ports")
        before = sum(c.forwarded_out for c in kv.stats().cores)
        prefix = unique("route")
        with kv.pipeline() as p:
            for i in range(500):
                p.set(prefix + b"%d" % i, b"v")
        for i in range(500):
            self.assertEqual(kv.get(prefix + b"%d" % i), b"v")
        after = sum(c.forwarded_out for c in kv.stats().cores)
        self.assertEqual(after, before, "keys were forwarded between cores")
        self.assertEqual(len(kv.cores), kv.hello.cores, "one connection per core")
        kv.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
