#!/usr/bin/env python3
"""scripts/plot-codecs.py end to end on a small `kvpool gen` input: both figures and their data,
the data's figures consistent with the evals and the bench JSON given, and clear errors (no
figure) for bad input.

    build/venv/bin/python tests/python/plot_codecs_test.py --script scripts/plot-codecs.py \
        --kvpool build/bin/kvpool [unittest options]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import unittest

CONFIG = {}  # main(): script, kvpool.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A kvpool-bench codec --json run, trimmed: two CPU rows and a CUDA row (not drawn).
BENCH = {
    "memcpy_gbps": 6.0, "d2d_copy_gbps": 0.0,
    "results": [
        {"codec": "kivi", "name": "kivi-4", "path": "cpu", "encode_gbps": 3.0,
         "decode_gbps": 6.0, "encode_anchor_gbps": 6.0, "decode_anchor_gbps": 5.0},
        {"codec": "kvpool", "name": "kvpool e=0.2", "path": "cpu", "encode_gbps": 0.8,
         "decode_gbps": 3.5, "encode_anchor_gbps": 6.4, "decode_anchor_gbps": 6.2},
        {"codec": "kvpool", "name": "kvpool e=0.2", "path": "cuda", "encode_gbps": 100.0,
         "decode_gbps": 200.0, "encode_anchor_gbps": 1000.0, "decode_anchor_gbps": 1000.0},
    ],
}


class PlotCodecs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.kv = os.path.join(cls.tmp.name, "kv.npy")
        subprocess.run([CONFIG["kvpool"], "gen", "--out", cls.kv, "--layers", "1", "--kv_heads",
                        "2", "--head_dim", "64", "--tokens", "256", "--seed", "3"], check=True,
                       capture_output=True)
        cls.bench = os.path.join(cls.tmp.name, "bench.json")
        with open(cls.bench, "w") as f:
            json.dump(BENCH, f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def plot(self, out, *args):
        return subprocess.run(
            [sys.executable, CONFIG["script"], "--kvpool", CONFIG["kvpool"], "--out", out] +
            list(args), capture_output=True, text=True, timeout=300)

    def test_figures_and_their_data(self):
        out = os.path.join(self.tmp.name, "ok")
        p = self.plot(out, "--in", self.kv, "--budgets", "0.05,0.3", "--packkv-budgets",
                      "0.02,0.1", "--speed-json", self.bench)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("[1/5] codec eval: kvpool default profile", p.stderr)  # Progress lines.
        for name in ("codecs-quality.png", "codecs-speed.png"):
            with open(os.path.join(out, name), "rb") as f:
                png = f.read()
            self.assertEqual(png[:8], PNG_MAGIC, name)
            self.assertGreater(len(png), 10000, name)
        with open(os.path.join(out, "codecs-quality.json")) as f:
            q = json.load(f)
        self.assertEqual(sorted(q["series"]),
                         ["kvpool", "kvpool-entropy", "kvpool-fast", "packkv"])
        for name, points in q["series"].items():
            self.assertEqual([p["budget"] for p in points],
                             [0.02, 0.1] if name == "packkv" else [0.05, 0.3], name)
            for pt in points:
                self.assertGreater(pt["ratio"], 1.0, name)
                self.assertGreaterEqual(pt["attn_err"], 0.0, name)
        rows = q["series"]["kvpool"]
        self.assertGreater(rows[1]["ratio"], rows[0]["ratio"])  # A larger budget, fewer bytes.
        self.assertEqual(sorted(q["kivi"]), ["kivi-2", "kivi-4", "kivi-8"])
        self.assertGreater(q["kivi"]["kivi-2"]["ratio"], q["kivi"]["kivi-4"]["ratio"])
        self.assertEqual([t["anchor"] for t in q["targets"]], ["kivi-4", "kivi-2"])
        for t in q["targets"]:
            k = q["kivi"][t["anchor"]]
            self.assertAlmostEqual(t["ratio"], t["factor"] * k["ratio"])
            within = [p["ratio"] for p in rows if p["attn_err"] <= k["attn_err"]]
            self.assertEqual(t["kvpool_best"], max(within) if within else None)
            self.assertEqual(t["met"], bool(within) and max(within) >= t["ratio"])
            self.assertIn(f"target {t['factor']:g}x {t['anchor']}", p.stdout)
        with open(os.path.join(out, "codecs-speed.json")) as f:
            s = json.load(f)
        self.assertAlmostEqual(s["results"][1]["encode_x"], 0.8 / 6.4)
        self.assertAlmostEqual(s["results"][0]["decode_x"], 6.0 / 5.0)
        self.assertAlmostEqual(s["results"][2]["encode_x"], 0.1)  # CUDA: against its d2d copy.

    def assert_fails(self, out, message, *args):
        p = self.plot(out, *args)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(message, p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "codecs-quality.png")))

    def test_bad_input_is_a_clear_error_and_draws_nothing(self):
        out = os.path.join(self.tmp.name, "bad")
        self.assert_fails(out, "no such file", "--in", os.path.join(self.tmp.name, "none.npy"),
                          "--no-speed")
        self.assert_fails(out, "budgets must lie in (0, 1)", "--in", self.kv, "--budgets",
                          "0.1,2", "--no-speed")
        broken = os.path.join(self.tmp.name, "broken.json")
        with open(broken, "w") as f:
            json.dump({"memcpy_gbps": 6.0}, f)
        self.assert_fails(out, "no 'results' list", "--in", self.kv, "--speed-json", broken)
        not_npy = os.path.join(self.tmp.name, "not.npy")
        with open(not_npy, "w") as f:
            f.write("not a numpy file")
        self.assert_fails(out, "codec eval", "--in", not_npy, "--no-speed")
        p = subprocess.run([sys.executable, CONFIG["script"], "--kvpool",
                            os.path.join(self.tmp.name, "no-kvpool"), "--out", out, "--no-speed"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot run", p.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", required=True, help="scripts/plot-codecs.py")
    parser.add_argument("--kvpool", required=True, help="the kvpool CLI")
    args, rest = parser.parse_known_args()
    CONFIG.update(script=os.path.abspath(args.script), kvpool=os.path.abspath(args.kvpool))
    prog = unittest.main(module=__name__, argv=[sys.argv[0]] + rest, exit=False)
    return 0 if prog.result.wasSuccessful() and prog.result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
