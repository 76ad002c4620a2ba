#!/usr/bin/env python3
"""kvpoold seen by a client that no one in the project wrote.

The project ships no Python stubs: this test generates them from the .proto with
grpc_tools.protoc, starts kvpoold on ephemeral ports, and talks to it with stock grpcio,
grpcio-health-checking, grpcio-reflection and urllib (plus promtool when it is on PATH).

    build/venv/bin/python tests/python/foreign_client_test.py \
        --kvpoold build/bin/kvpoold --proto-dir proto [unittest options, e.g. -v or -k lookup]

scripts/setup-python.sh creates build/venv. Exits non-zero on any failure.
"""

import argparse
import atexit
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

# Keep grpc core quiet unless something is really wrong (must be set before importing grpc).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0
SERVICE = "kvpool.v1.KvPool"

# The namespace and shape used throughout.
MODEL = "py-model"
TOKENS_PER_BLOCK = 16
NUM_LAYERS = 2
NUM_KV_HEADS = 2
HEAD_DIM = 8
FP16_BYTES = 2
BLOCK_BYTES = NUM_LAYERS * 2 * TOKENS_PER_BLOCK * NUM_KV_HEADS * HEAD_DIM * FP16_BYTES  # 2048

CONFIG = {}  # Filled by main(): kvpoold, proto_dir.


def block_keys(token_blocks, extra=b""):
    """Chained block keys: key_i = SHA256(key_{i-1} || LE uint32 tokens || extra), key_-1 = 0^32."""
    keys = []
    prev = bytes(32)
    for tokens in token_blocks:
        h = hashlib.sha256()
        h.update(prev)
        h.update(struct.pack("<%dI" % len(tokens), *tokens))
        h.update(extra)
        prev = h.digest()
        keys.append(prev)
    return keys


def generate_stubs(proto_dir, out_dir):
    """Runs grpc_tools.protoc on kvpool/v1/kvpool.proto into out_dir; returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc

    try:
        import importlib.resources as resources

        well_known = str(resources.files("grpc_tools") / "_proto")
    except (ImportError, AttributeError, TypeError):
        import pkg_resources

        well_known = pkg_resources.resource_filename("grpc_tools", "_proto")
    proto_file = os.path.join(proto_dir, "kvpool", "v1", "kvpool.proto")
    if not os.path.isfile(proto_file):
        raise RuntimeError("no %s" % proto_file)
    os.makedirs(out_dir, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        "-I" + proto_dir,
        "-I" + well_known,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
        proto_file,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError("grpc_tools.protoc exited %d for %s" % (rc, proto_file))
    # The generated kvpool_pb2_grpc imports "kvpool.v1.kvpool_pb2"; the temp dir holds the
    # kvpool/v1/ tree as namespace packages, so it goes first on sys.path.
    sys.path.insert(0, out_dir)
    importlib.invalidate_caches()
    pb2 = importlib.import_module("kvpool.v1.kvpool_pb2")
    pb2_grpc = importlib.import_module("kvpool.v1.kvpool_pb2_grpc")
    if not os.path.realpath(pb2.__file__).startswith(os.path.realpath(out_dir)):
        raise RuntimeError("imported kvpool_pb2 from %s, not the generated stubs" % pb2.__file__)
    return pb2, pb2_grpc


def parse_metrics(text):
    """Prometheus text format samples: list of (name, {label: value}, float)."""
    sample_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = sample_re.match(line)
        if not m:
            continue
        labels = dict(label_re.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        samples.append((m.group(1), labels, value))
    return samples


class ForeignClientTest(unittest.TestCase):
    """Methods run in name order (unittest sorts them); b must run before c (empty daemon)."""

    proc = None
    channel = None

    # ---------------------------------------------------------------- fixture

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kvpool-foreign-client-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.expected_hits = 0
        cls.expected_misses = 0
        try:
            cls.pb2, cls.pb2_grpc = generate_stubs(CONFIG["proto_dir"], os.path.join(cls.tmp, "stubs"))
            cls._start_daemon()
            cls.channel = grpc.insecure_channel(cls.ready["grpc"])
            try:
                grpc.channel_ready_future(cls.channel).result(timeout=RPC_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise RuntimeError(
                    "could not connect to kvpoold at %s within %.0f s%s"
                    % (cls.ready["grpc"], RPC_TIMEOUT_S, cls._log_tail())
                )
            cls.stub = cls.pb2_grpc.KvPoolStub(cls.channel)
        except BaseException:
            cls._stop_daemon(check=False)
            raise

    @classmethod
    def tearDownClass(cls):
        cls._stop_daemon(check=True)

    @classmethod
    def _start_daemon(cls):
        data_dir = os.path.join(cls.tmp, "data")
        os.mkdir(data_dir)
        ready_file = os.path.join(cls.tmp, "ready.json")
        cls.log_path = os.path.join(cls.tmp, "kvpoold.log")
        cmd = [
            CONFIG["kvpoold"],
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--host-memory", "64MiB",
            "--data-dir", data_dir,
            "--ready-file", ready_file,
        ]
        with open(cls.log_path, "wb") as log:
            cls.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(cls._kill_if_running, cls.proc)

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            rc = cls.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    "kvpoold exited with status %d before writing the ready file%s" % (rc, cls._log_tail())
                )
            if os.path.exists(ready_file):
                try:
                    with open(ready_file) as f:
                        cls.ready = json.load(f)
                    break
                except ValueError as e:  # Written atomically, so this should not happen.
                    last_error = e
                    if time.monotonic() > deadline:
                        raise RuntimeError("ready file %s is not JSON: %s" % (ready_file, last_error))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "kvpoold wrote no ready file %s within %.0f s%s"
                    % (ready_file, READY_TIMEOUT_S, cls._log_tail())
                )
            time.sleep(0.05)
        for field in ("grpc", "metrics"):
            if not isinstance(cls.ready.get(field), str) or ":" not in cls.ready[field]:
                raise RuntimeError("ready file has no usable %r address: %r" % (field, cls.ready))

    @classmethod
    def _stop_daemon(cls, check):
        if cls.channel is not None:
            cls.channel.close()
            cls.channel = None
        proc = cls.proc
        if proc is None:
            return
        cls.proc = None
        if proc.poll() is not None:
            if check:
                raise AssertionError(
                    "kvpoold died during the test with status %d%s" % (proc.returncode, cls._log_tail())
                )
            return
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if check:
                raise AssertionError(
                    "kvpoold did not exit within %.0f s of SIGTERM; killed it with SIGKILL%s"
                    % (EXIT_TIMEOUT_S, cls._log_tail())
                )
            return
        if check and rc != 0:
            raise AssertionError("kvpoold exited with status %d after SIGTERM, want 0%s" % (rc, cls._log_tail()))

    @staticmethod
    def _kill_if_running(proc):
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    @classmethod
    def _log_tail(cls, lines=20):
        try:
            with open(cls.log_path, "rb") as f:
                tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
        except (OSError, AttributeError):
            return ""
        if not tail:
            return " (kvpoold printed nothing)"
        return "\n--- last kvpoold output ---\n" + "\n".join(tail)

    # ---------------------------------------------------------------- helpers

    def namespace(self):
        return self.pb2.Namespace(model_id=MODEL, tokens_per_block=TOKENS_PER_BLOCK)

    def spec(self):
        return self.pb2.KvSpec(
            model_id=MODEL,
            num_layers=NUM_LAYERS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            dtype=self.pb2.DTYPE_FP16,
            tokens_per_block=TOKENS_PER_BLOCK,
        )

    @staticmethod
    def keys3():
        return block_keys([list(range(i * TOKENS_PER_BLOCK, (i + 1) * TOKENS_PER_BLOCK)) for i in range(3)])

    @staticmethod
    def payload(blocks):
        return random.Random(20240601).randbytes(blocks * BLOCK_BYTES)

    def lookup(self, keys):
        resp = self.stub.Lookup(self.pb2.LookupRequest(ns=self.namespace(), keys=keys), timeout=RPC_TIMEOUT_S)
        hits = sum(1 for p in resp.present if p)
        type(self).expected_hits += hits
        type(self).expected_misses += len(resp.present) - hits
        return resp

    def scrape(self):
        url = "http://%s/metrics" % self.ready["metrics"]
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as r:
            self.assertEqual(r.status, 200, url)
            return r.read().decode("utf-8")

    # ---------------------------------------------------------------- tests

    def test_a0_ready_file(self):
        """The ready file names the daemon's own pid."""
        self.assertEqual(self.ready.get("pid"), self.proc.pid, "ready file: %r" % (self.ready,))

    def test_a1_health(self):
        """grpc.health.v1 reports SERVING overall and for kvpool.v1.KvPool."""
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", SERVICE):
            with self.subTest(service=service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
                self.assertEqual(
                    resp.status,
                    health_pb2.HealthCheckResponse.SERVING,
                    "health of %r: %s" % (service, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)),
                )

    def test_b_lookup_empty(self):
        """Lookup of 3 keys on an empty daemon: nothing present, no prefix."""
        resp = self.lookup(self.keys3())
        self.assertEqual(list(resp.present), [False, False, False])
        self.assertEqual(resp.hit_prefix_blocks, 0)
        self.assertEqual(resp.tokens_per_block, TOKENS_PER_BLOCK)

    def test_c1_put_lookup_get(self):
        """Put 2 blocks (header, then unaligned data chunks), Lookup 3 keys, Get them back."""
        keys = self.keys3()
        data = self.payload(2)
        chunk = 1000  # Deliberately not a divisor of BLOCK_BYTES.

        def requests():
            yield self.pb2.PutRequest(header=self.pb2.PutHeader(
                spec=self.spec(), keys=keys[:2], codec=self.pb2.CodecSpec(codec="raw")))
            for off in range(0, len(data), chunk):
                yield self.pb2.PutRequest(data=data[off:off + chunk])

        put = self.stub.Put(requests(), timeout=RPC_TIMEOUT_S)
        self.assertEqual(put.blocks_stored, 2, put)
        self.assertEqual(put.blocks_already_present, 0, put)
        self.assertEqual(put.bytes_received, len(data), put)
        self.assertEqual(put.blocks_evicted, 0, put)

        resp = self.lookup(keys)
        self.assertEqual(list(resp.present), [True, True, False])
        self.assertEqual(resp.hit_prefix_blocks, 2)
        self.assertEqual(resp.tokens_per_block, TOKENS_PER_BLOCK)

        stream = self.stub.Get(self.pb2.GetRequest(server_decode=True, ns=self.namespace(), keys=keys), timeout=RPC_TIMEOUT_S)
        header = None
        got = bytearray()
        for i, msg in enumerate(stream):
            kind = msg.WhichOneof("msg")
            if i == 0:
                self.assertEqual(kind, "header", "first Get message must be the header")
                header = msg.header
            else:
                self.assertEqual(kind, "data", "Get message %d after the header is not data" % i)
                got += msg.data
        self.assertIsNotNone(header, "Get stream was empty")
        self.assertEqual(list(header.found), [True, True, False])
        self.assertEqual(header.block_bytes, BLOCK_BYTES)
        self.assertEqual(header.hit_prefix_blocks, 2)
        self.assertEqual(header.spec, self.spec())
        self.assertEqual(len(got), len(data))
        self.assertTrue(bytes(got) == data, "Get returned different bytes than were put")

    def test_c2_stats(self):
        """Stats agrees with the put."""
        stats = self.stub.Stats(self.pb2.StatsRequest(), timeout=RPC_TIMEOUT_S)
        self.assertEqual(stats.blocks, 2, stats)
        self.assertEqual(stats.logical_bytes, 2 * BLOCK_BYTES, stats)
        self.assertEqual(stats.namespaces, 1, stats)
        self.assertTrue(stats.version, "Stats.version is empty")

    def test_d_short_key(self):
        """A 31-byte key is INVALID_ARGUMENT, and the message names the field."""
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.Lookup(self.pb2.LookupRequest(ns=self.namespace(), keys=[bytes(31)]), timeout=RPC_TIMEOUT_S)
        err = cm.exception
        self.assertEqual(err.code(), grpc.StatusCode.INVALID_ARGUMENT, err.details())
        self.assertIn("key", (err.details() or "").lower(), "error message does not name the field")

    def test_e_reflection(self):
        """v1alpha server reflection lists kvpool.v1.KvPool and serves its descriptor."""
        refl = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        resps = list(refl.ServerReflectionInfo(iter(reqs), timeout=RPC_TIMEOUT_S))
        self.assertEqual(len(resps), 2, resps)
        for r in resps:
            self.assertFalse(r.HasField("error_response"), r.error_response)

        services = [s.name for s in resps[0].list_services_response.service]
        self.assertIn(SERVICE, services)

        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in resps[1].file_descriptor_response.file_descriptor_proto]
        methods = None
        for f in files:
            for s in f.service:
                if f.package + "." + s.name == SERVICE:
                    methods = sorted(m.name for m in s.method)
        self.assertEqual(methods, ["Delete", "Get", "Lookup", "Put", "Stats"],
                         "descriptor for %s: files %s" % (SERVICE, [f.name for f in files]))

    def test_f_metrics(self):
        """/metrics has kvpool_lookups_total, counting at least the lookups made here."""
        self.lookup(block_keys([[7] * TOKENS_PER_BLOCK], extra=b"metrics-miss"))  # One sure miss.
        text = self.scrape()
        samples = [(labels, value) for name, labels, value in parse_metrics(text) if name == "kvpool_lookups_total"]
        self.assertTrue(samples, "no kvpool_lookups_total sample in /metrics")
        by_result = {}
        for labels, value in samples:
            by_result[labels.get("result")] = by_result.get(labels.get("result"), 0.0) + value
        self.assertGreaterEqual(by_result.get("miss", 0.0), self.expected_misses, by_result)
        self.assertGreaterEqual(by_result.get("hit", 0.0), self.expected_hits, by_result)

    def test_g_promtool(self):
        """`promtool check metrics` accepts /metrics (skipped without promtool)."""
        promtool = shutil.which("promtool")
        if not promtool:
            self.skipTest("promtool not on PATH; metrics lint not checked")
        text = self.scrape()
        r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=RPC_TIMEOUT_S)
        self.assertEqual(r.returncode, 0, "promtool check metrics:\n" + r.stdout.decode("utf-8", "replace"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvpoold", required=True, help="path to the kvpoold binary")
    parser.add_argument("--proto-dir", required=True, help="directory holding kvpool/v1/kvpool.proto")
    args, rest = parser.parse_known_args()
    kvpoold = os.path.abspath(args.kvpoold)
    if not (os.path.isfile(kvpoold) and os.access(kvpoold, os.X_OK)):
        print("foreign_client_test: %s is not an executable file" % kvpoold, file=sys.stderr)
        return 2
    proto_dir = os.path.abspath(args.proto_dir)
    if not os.path.isdir(proto_dir):
        print("foreign_client_test: %s is not a directory" % proto_dir, file=sys.stderr)
        return 2
    CONFIG.update(kvpoold=kvpoold, proto_dir=proto_dir)
    prog = unittest.main(module=__name__, argv=[sys.argv[0]] + rest, exit=False)
    for test, reason in prog.result.skipped:
        print("skipped %s: %s" % (test.id().rsplit(".", 1)[-1], reason), file=sys.stderr)
    return 0 if prog.result.wasSuccessful() and prog.result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
