// The kvpool CLI against a real kvpoold: gen -> put -> lookup -> get is byte-exact, the hit
// prefix after a partial put, delete, stats --json, and one-line errors with non-zero exits.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;
using ::kvpool::testing::TempDir;
using ::testing::HasSubstr;

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = RunningDaemon::Start();
    ASSERT_THAT(d, IsOk());
    daemon_ = std::move(*d);
  }
  void TearDown() override {
    if (daemon_) EXPECT_EQ(*daemon_->Stop(), 0);
  }
  // Runs `kvpool --server=<daemon> args...`; returns the exit code, output in *out.
  int Kvpool(std::vector<std::string> args, std::string* out) {
    std::vector<std::string> argv = {testing::KvpoolCliPath(),
                                     "--server=" + daemon_->grpc_address()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto code = RunCommand(argv, absl::Seconds(60), out);
    EXPECT_THAT(code, IsOk());
    return code.ok() ? *code : -1;
  }
  std::string P(const std::string& name) { return tmp_.path() + "/" + name; }

  std::unique_ptr<RunningDaemon> daemon_;
  TempDir tmp_;
};

TEST_F(CliTest, GenPutLookupGetRoundTripIsByteExact) {
  std::string out;
  ASSERT_EQ(Kvpool({"gen", "--out", P("kv.npy"), "--token-ids", P("ids.npy"), "--layers=3",
                    "--kv-heads=2", "--head-dim=32", "--tokens=96", "--dtype=bf16"},
                   &out),
            0)
      << out;
  const std::vector<std::string> ns = {"--model=cli-model", "--tokens-per-block=16",
                                       "--token-ids=" + P("ids.npy")};
  auto with = [&](std::vector<std::string> a, std::vector<std::string> b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  ASSERT_EQ(Kvpool(with({"lookup"}, ns), &out), 0) << out;
  EXPECT_EQ(out, "0\n");
  ASSERT_EQ(Kvpool(with({"put", "--codec=raw", "--in", P("kv.npy")}, ns), &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("put 6 blocks (6 new"));
  ASSERT_EQ(Kvpool(with({"lookup"}, ns), &out), 0) << out;
  EXPECT_EQ(out, "96\n");
  ASSERT_EQ(Kvpool(with({"get", "--out", P("back.npy")}, ns), &out), 0) << out;
  EXPECT_EQ(*ReadFileToString(P("back.npy")), *ReadFileToString(P("kv.npy")));
  ASSERT_EQ(Kvpool({"stats", "--json"}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("\"blocks\": 6")) << out;
  EXPECT_THAT(out, HasSubstr("\"logical_bytes\": 73728"));  // 6 blocks x 3*2*16*2*32*2 bytes.
  // Stored raw (--codec raw): plus 6 blocks x 6 segments x 64 header bytes.
  EXPECT_THAT(out, HasSubstr("\"stored_bytes\": 76032"));
  EXPECT_THAT(out, HasSubstr("\"capacity_bytes\": 1073741824"));
  ASSERT_EQ(Kvpool(with({"delete"}, ns), &out), 0) << out;
  EXPECT_EQ(out, "deleted 6 of 6 blocks\n");
  EXPECT_EQ(Kvpool(with({"get", "--out", P("miss.npy")}, ns), &out), 1);
  EXPECT_THAT(out, HasSubstr("miss"));
}

TEST_F(CliTest, PartialPutGivesTheHitPrefix) {
  std::string out;
  ASSERT_EQ(Kvpool({"gen", "--out", P("kv.npy"), "--token-ids", P("ids.npy"), "--tokens=64"},
                   &out),
            0);
  // Put only the first 32 tokens: write a shorter ids/kv pair from the generated one.
  NpyArray kv = *ReadNpy(P("kv.npy"));
  NpyArray ids = *ReadNpy(P("ids.npy"));
  NpyArray kv_half = kv;
  kv_half.shape[2] = 32;
  kv_half.data.clear();
  const uint64_t token_bytes = kv.shape[3] * kv.shape[4] * 2;
  for (uint64_t s = 0; s < kv.shape[0] * 2; ++s) {
    kv_half.data += kv.data.substr(s * 64 * token_bytes, 32 * token_bytes);
  }
  NpyArray ids_half = ids;
  ids_half.shape = {32};
  ids_half.data.resize(32 * 4);
  ASSERT_THAT(WriteNpy(P("kv32.npy"), kv_half), IsOk());
  ASSERT_THAT(WriteNpy(P("ids32.npy"), ids_half), IsOk());
  ASSERT_EQ(Kvpool({"put", "--codec=raw", "--model=m", "--tokens-per-block=16",
                    "--token-ids=" + P("ids32.npy"),
                    "--in=" + P("kv32.npy")},
                   &out),
            0)
      << out;
  ASSERT_EQ(Kvpool({"lookup", "--model=m", "--tokens-per-block=16",
                    "--token-ids=" + P("ids.npy"), "--json"},
                   &out),
            0);
  EXPECT_THAT(out, HasSubstr("\"hit_prefix_tokens\": 32"));
  // get of the full ids writes only the 32-token hit prefix, equal to what was put.
  ASSERT_EQ(Kvpool({"get", "--model=m", "--tokens-per-block=16", "--token-ids=" + P("ids.npy"),
                    "--out=" + P("back.npy")},
                   &out),
            0);
  EXPECT_EQ(*ReadFileToString(P("back.npy")), *ReadFileToString(P("kv32.npy")));
}

TEST_F(CliTest, CodecEncodeDecodeEval) {
  std::string out;
  ASSERT_EQ(Kvpool({"gen", "--out", P("kv.npy"), "--layers=2", "--kv-heads=2", "--head-dim=64",
                    "--tokens=128"},
                   &out),
            0);
  // Raw round trip is exact.
  ASSERT_EQ(Kvpool({"codec", "encode", "--codec=raw", "--in", P("kv.npy"), "--out", P("raw.kvz")},
                   &out),
            0)
      << out;
  ASSERT_EQ(Kvpool({"codec", "decode", "--in", P("raw.kvz"), "--out", P("raw.npy")}, &out), 0)
      << out;
  EXPECT_EQ(*ReadFileToString(P("raw.npy")), *ReadFileToString(P("kv.npy")));
  // kvpool with a budget: smaller, and decodes to the original shape.
  ASSERT_EQ(Kvpool({"codec", "encode", "--codec=kvpool", "--budget=0.05", "--in", P("kv.npy"),
                    "--out", P("kv.kvz")},
                   &out),
            0)
      << out;
  EXPECT_THAT(out, HasSubstr("kvpool e=0.05"));
  EXPECT_LT(ReadFileToString(P("kv.kvz"))->size(), ReadFileToString(P("kv.npy"))->size() / 2);
  ASSERT_EQ(Kvpool({"codec", "decode", "--in", P("kv.kvz"), "--out", P("back.npy")}, &out), 0);
  EXPECT_EQ(ReadNpy(P("back.npy"))->shape, ReadNpy(P("kv.npy"))->shape);
  // The fast profile: the same budget in more bytes (no low-rank part, no entropy coding).
  ASSERT_EQ(Kvpool({"codec", "encode", "--codec=kvpool", "--fast", "--budget=0.05", "--in",
                    P("kv.npy"), "--out", P("fast.kvz")},
                   &out),
            0)
      << out;
  EXPECT_THAT(out, HasSubstr("kvpool-fast e=0.05"));
  EXPECT_GT(ReadFileToString(P("fast.kvz"))->size(), ReadFileToString(P("kv.kvz"))->size());
  EXPECT_LT(ReadFileToString(P("fast.kvz"))->size(), ReadFileToString(P("kv.npy"))->size() / 2);
  ASSERT_EQ(Kvpool({"codec", "decode", "--in", P("fast.kvz"), "--out", P("fast.npy")}, &out), 0);
  EXPECT_EQ(ReadNpy(P("fast.npy"))->shape, ReadNpy(P("kv.npy"))->shape);
  EXPECT_EQ(Kvpool({"codec", "encode", "--codec=kivi", "--fast", "--in", P("kv.npy"), "--out",
                    P("x.kvz")},
                   &out),
            1);
  EXPECT_THAT(out, HasSubstr("--fast is a kvpool profile"));
  // The entropy profile (mode 3) and an unknown one.
  ASSERT_EQ(Kvpool({"codec", "encode", "--codec=kvpool", "--profile=entropy", "--budget=0.05",
                    "--in", P("kv.npy"), "--out", P("entropy.kvz")},
                   &out),
            0)
      << out;
  EXPECT_THAT(out, HasSubstr("kvpool-entropy e=0.05"));
  EXPECT_EQ(Kvpool({"codec", "encode", "--codec=kvpool", "--profile=fastest", "--in", P("kv.npy"),
                    "--out", P("x.kvz")},
                   &out),
            1);
  EXPECT_THAT(out, HasSubstr("'default', 'fast' or 'entropy'"));
  // A corrupted file is refused with one line.
  std::string bytes = *ReadFileToString(P("kv.kvz"));
  bytes[bytes.size() / 2] ^= 0x40;
  ASSERT_THAT(WriteStringToFile(P("bad.kvz"), bytes), IsOk());
  EXPECT_EQ(Kvpool({"codec", "decode", "--in", P("bad.kvz"), "--out", P("x.npy")}, &out), 1);
  EXPECT_THAT(out, HasSubstr("checksum"));
  // eval --json: every row has the fields, raw is exact, kvpool meets its budget.
  ASSERT_EQ(Kvpool({"codec", "eval", "--in", P("kv.npy"), "--json", "--budgets=0.05"}, &out), 0)
      << out;
  // Raw: exact; its ratio is just under 1 (64-byte segment headers).
  EXPECT_THAT(out, HasSubstr("\"name\": \"raw\", \"bits\": 0, \"group\": 0, \"budget\": 0, "
                             "\"ratio\": 0.99"));
  EXPECT_THAT(out, HasSubstr("\"rel_l2\": 0, \"key_rel_l2\": 0, \"value_rel_l2\": 0, "
                             "\"max_abs\": 0, \"attn_rel_l2\": 0}"));
  EXPECT_THAT(out, HasSubstr("\"attn_rel_l2\""));
  EXPECT_THAT(out, HasSubstr("\"name\": \"kvpool e=0.05\""));
  ASSERT_EQ(Kvpool({"codec", "eval", "--in", P("kv.npy"), "--codec=kvpool", "--budget=0.05"},
                   &out),
            0);
  EXPECT_THAT(out, HasSubstr("attn_err"));
}

// KVPOOL_MAX_ISA=avx2 / sse2 make this CPU run the AVX2 and the reference paths of every codec:
// codec eval (which encodes and decodes every segment) gives the same figures to the last digit,
// as every path writes and decodes the same bytes; an unknown value is named and ignored.
TEST_F(CliTest, IsaCapGivesTheSameCodecResults) {
  std::string out;
  ASSERT_EQ(Kvpool({"gen", "--out", P("kv.npy"), "--layers=2", "--kv-heads=2", "--head-dim=64",
                    "--tokens=256", "--seed=4"},
                   &out),
            0)
      << out;
  const std::vector<std::string> eval = {testing::KvpoolCliPath(), "codec", "eval", "--in",
                                         P("kv.npy"), "--json", "--budgets=0.02,0.2"};
  const auto run = [&](const std::string& isa) {
    std::vector<std::string> argv = {"/usr/bin/env", "KVPOOL_MAX_ISA=" + isa};
    argv.insert(argv.end(), eval.begin(), eval.end());
    std::string text;
    auto code = RunCommand(argv, absl::Seconds(120), &text);
    EXPECT_THAT(code, IsOk());
    EXPECT_EQ(code.ok() ? *code : -1, 0) << isa << ": " << text;
    return text;
  };
  const std::string all = run("avx512");
  EXPECT_THAT(all, HasSubstr("\"name\": \"kvpool e=0.2\""));
  EXPECT_EQ(run("avx2"), all);
  EXPECT_EQ(run("sse2"), all);
  const std::string bogus = run("avx1024");
  EXPECT_THAT(bogus, HasSubstr("ignoring KVPOOL_MAX_ISA=avx1024 (avx512, avx2 or sse2)"));
  EXPECT_THAT(bogus, HasSubstr(all));
}

TEST_F(CliTest, FailuresExitNonZeroWithOneLine) {
  std::string out;
  ASSERT_EQ(Kvpool({"gen", "--out", P("kv.npy"), "--token-ids", P("ids.npy"), "--tokens=40"},
                   &out),
            0);
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"put", "--model=m", "--tokens-per-block=16", "--token-ids=" + P("ids.npy"),
        "--in=" + P("kv.npy")},
       "not a multiple"},
      {{"lookup", "--model=m", "--token-ids=" + P("ids.npy")}, "--tokens-per-block"},
      {{"lookup", "--model=m", "--tokens-per-block=8", "--token-ids=" + P("nope.npy")},
       "cannot open"},
      {{"put", "--model=m", "--tokens-per-block=8", "--token-ids=" + P("ids.npy"),
        "--in=" + P("ids.npy")},
       "must have shape"},
      {{"put", "--model=bad model", "--tokens-per-block=8", "--token-ids=" + P("ids.npy"),
        "--in=" + P("kv.npy")},
       "model_id"},
      {{"codec", "eval", "--in=" + P("kv.npy"), "--plan-reuse=0"}, "--plan-reuse"},
      {{"codec", "encode", "--in=" + P("kv.npy"), "--out=" + P("x.kvz"), "--plan-reuse=0"},
       "--plan-reuse"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Kvpool(c.args, &out), 1) << c.args[0] << ": " << out;
    EXPECT_THAT(out, HasSubstr(c.message));
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  }
  EXPECT_EQ(Kvpool({"frobnicate"}, &out), 2);
  // A daemon that is not there: Unavailable, one line, exit 1.
  auto code = RunCommand({testing::KvpoolCliPath(), "--server=127.0.0.1:1", "--deadline=5",
                          "stats"},
                         absl::Seconds(30), &out);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 1);
  EXPECT_THAT(out, HasSubstr("kvpool stats: "));
}

}  // namespace
}  // namespace kvpool
