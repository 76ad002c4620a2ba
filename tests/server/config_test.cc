// Tests for server/config.h: the embedded defaults, overrides, and rejection of bad documents
// with nothing applied.
#include "server/config.h"

#include <stdlib.h>

#include <filesystem>
#include <string>

#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool::server {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

// Options with every field away from its default, to see what a document changes.
DaemonOptions Sentinel() {
  DaemonOptions o;
  o.listen = "sentinel:1";
  o.metrics_listen = "sentinel:2";
  o.host_memory = 12345;
  o.data_dir = "/sentinel";
  o.log_level = "error";
  o.max_message_bytes = 777;
  o.service.max_keys_per_request = 3;
  o.service.max_request_bytes = 888;
  o.service.chunk_bytes = 999;
  o.service.gpu_encode_policy = server::GpuEncode::kNever;
  o.service.plan_reuse = 5;
  return o;
}

void ExpectSame(const DaemonOptions& a, const DaemonOptions& b) {
  EXPECT_EQ(a.listen, b.listen);
  EXPECT_EQ(a.metrics_listen, b.metrics_listen);
  EXPECT_EQ(a.host_memory, b.host_memory);
  EXPECT_EQ(a.data_dir, b.data_dir);
  EXPECT_EQ(a.log_level, b.log_level);
  EXPECT_EQ(a.max_message_bytes, b.max_message_bytes);
  EXPECT_EQ(a.service.max_keys_per_request, b.service.max_keys_per_request);
  EXPECT_EQ(a.service.max_request_bytes, b.service.max_request_bytes);
  EXPECT_EQ(a.service.chunk_bytes, b.service.chunk_bytes);
  EXPECT_EQ(a.service.gpu_encode_policy, b.service.gpu_encode_policy);
  EXPECT_EQ(a.service.plan_reuse, b.service.plan_reuse);
}

// `yaml` is refused with InvalidArgument naming `key`, and the options stay as they were.
void ExpectRefusedNaming(const std::string& yaml, const std::string& key) {
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigYaml(yaml, &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(key)))
      << yaml;
  ExpectSame(o, Sentinel());
}

TEST(ConfigTest, StructDefaultsAreTheDocumentedOnes) {
  const DaemonOptions o;
  EXPECT_EQ(o.listen, "127.0.0.1:7470");
  EXPECT_EQ(o.metrics_listen, "127.0.0.1:7471");
  EXPECT_EQ(o.host_memory, 1 * kGiB);
  EXPECT_EQ(o.data_dir, "kvpool-data");
  EXPECT_EQ(o.log_level, "info");
  EXPECT_EQ(o.max_message_bytes, 8 * kMiB);
  EXPECT_EQ(o.service.max_keys_per_request, 4096u);
  EXPECT_EQ(o.service.max_request_bytes, 1 * kGiB);
  EXPECT_EQ(o.service.chunk_bytes, 1 * kMiB);
  EXPECT_EQ(o.service.gpu_encode_policy, GpuEncode::kAuto);
  EXPECT_EQ(o.service.plan_reuse, 32u);
}

TEST(ConfigTest, DefaultYamlAppliesCleanlyAndSetsEveryDefault) {
  DaemonOptions o = Sentinel();
  ASSERT_THAT(ApplyConfigYaml(DefaultConfigYaml(), &o), IsOk());
  ExpectSame(o, DaemonOptions());
}

TEST(ConfigTest, DefaultYamlMentionsEveryKey) {
  const std::string yaml(DefaultConfigYaml());
  for (const char* key : {"listen:", "metrics_listen:", "host_memory:", "data_dir:", "log_level:",
                          "limits:", "max_keys_per_request:", "max_request_bytes:",
                          "max_message_bytes:", "chunk_bytes:", "gpu_encode:", "plan_reuse:"}) {
    EXPECT_THAT(yaml, HasSubstr(key));
  }
}

TEST(ConfigTest, OverridesEveryField) {
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigYaml(R"(
listen: 0.0.0.0:0
metrics_listen: "[::1]:9100"
host_memory: 4GiB
data_dir: /var/lib/kvpool
log_level: debug
limits:
  max_keys_per_request: 100
  max_request_bytes: 64MiB
  max_message_bytes: 16MiB
  chunk_bytes: 256KiB
)",
                              &o),
              IsOk());
  EXPECT_EQ(o.listen, "0.0.0.0:0");
  EXPECT_EQ(o.metrics_listen, "[::1]:9100");
  EXPECT_EQ(o.host_memory, 4 * kGiB);
  EXPECT_EQ(o.data_dir, "/var/lib/kvpool");
  EXPECT_EQ(o.log_level, "debug");
  EXPECT_EQ(o.service.max_keys_per_request, 100u);
  EXPECT_EQ(o.service.max_request_bytes, 64 * kMiB);
  EXPECT_EQ(o.max_message_bytes, 16 * kMiB);
  EXPECT_EQ(o.service.chunk_bytes, 256 * kKiB);
}

TEST(ConfigTest, PartialDocumentChangesOnlyItsKeys) {
  DaemonOptions o = Sentinel();
  ASSERT_THAT(ApplyConfigYaml("host_memory: 512MiB\nlimits:\n  chunk_bytes: 64KiB\n", &o), IsOk());
  DaemonOptions want = Sentinel();
  want.host_memory = 512 * kMiB;
  want.service.chunk_bytes = 64 * kKiB;
  ExpectSame(o, want);
}

TEST(ConfigTest, GpuEncodeTakesItsThreePoliciesAndNamesABadOne) {
  const std::pair<const char*, GpuEncode> cases[] = {
      {"auto", GpuEncode::kAuto}, {"always", GpuEncode::kAlways}, {"never", GpuEncode::kNever}};
  for (const auto& [text, policy] : cases) {
    DaemonOptions o = Sentinel();
    o.service.gpu_encode_policy = policy == GpuEncode::kAuto ? GpuEncode::kNever : GpuEncode::kAuto;
    ASSERT_THAT(ApplyConfigYaml(std::string("gpu_encode: ") + text, &o), IsOk()) << text;
    EXPECT_EQ(o.service.gpu_encode_policy, policy) << text;
  }
  for (const char* bad : {"gpu_encode: yes", "gpu_encode: [auto]", "gpu_encode: AUTO"}) {
    ExpectRefusedNaming(bad, "gpu_encode");
  }
}

TEST(ConfigTest, PlanReuseTakesACountAndNamesABadOne) {
  for (int n : {1, 8, 4096}) {
    DaemonOptions o = Sentinel();
    ASSERT_THAT(ApplyConfigYaml("plan_reuse: " + std::to_string(n), &o), IsOk()) << n;
    EXPECT_EQ(o.service.plan_reuse, uint64_t(n));
  }
  for (const char* bad : {"plan_reuse: 0", "plan_reuse: -3", "plan_reuse: 4097", "plan_reuse: x",
                          "plan_reuse: [2]"}) {
    ExpectRefusedNaming(bad, "plan_reuse");
  }
}

TEST(ConfigTest, SizesAcceptPlainNumbersAndDecimalUnits) {
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigYaml("host_memory: 65536\nlimits:\n  max_request_bytes: 1.5GB\n", &o),
              IsOk());
  EXPECT_EQ(o.host_memory, 65536u);
  EXPECT_EQ(o.service.max_request_bytes, 1500000000u);
}

TEST(ConfigTest, EmptyMetricsListenDisablesMetrics) {
  for (const char* yaml : {"metrics_listen: \"\"", "metrics_listen:", "metrics_listen: ~"}) {
    DaemonOptions o;
    ASSERT_THAT(ApplyConfigYaml(yaml, &o), IsOk()) << yaml;
    EXPECT_EQ(o.metrics_listen, "") << yaml;
  }
}

TEST(ConfigTest, EmptyAndCommentOnlyDocumentsChangeNothing) {
  for (const char* yaml : {"", "# just a comment\n", "\n\n"}) {
    DaemonOptions o = Sentinel();
    ASSERT_THAT(ApplyConfigYaml(yaml, &o), IsOk()) << "'" << yaml << "'";
    ExpectSame(o, Sentinel());
  }
}

TEST(ConfigTest, UnknownTopLevelKeyIsNamed) {
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigYaml("listen: 1.2.3.4:5\nhostmemory: 4GiB\n", &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'hostmemory'")));
  ExpectSame(o, Sentinel());
}

TEST(ConfigTest, UnknownKeyUnderLimitsIsNamed) {
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigYaml("listen: 1.2.3.4:5\nlimits:\n  chunk_size: 1MiB\n", &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'limits.chunk_size'")));
  ExpectSame(o, Sentinel());
}

TEST(ConfigTest, LimitsKeysAreNotTopLevelKeys) {
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigYaml("chunk_bytes: 1MiB\n", &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'chunk_bytes'")));
  ExpectSame(o, Sentinel());
}

TEST(ConfigTest, BadSizeIsNamedAndNothingApplied) {
  struct Case {
    const char* yaml;
    const char* key;
  };
  for (const Case& c : {
           Case{"listen: 1.2.3.4:5\nhost_memory: lots\n", "host_memory"},
           Case{"host_memory: -1GiB\n", "host_memory"},
           Case{"host_memory: 4XB\n", "host_memory"},
           Case{"host_memory: \"\"\n", "host_memory"},
           Case{"limits:\n  chunk_bytes: 64KiB\n  max_request_bytes: 1QB\n",
                "limits.max_request_bytes"},
           Case{"limits:\n  max_message_bytes: big\n", "limits.max_message_bytes"},
           Case{"limits:\n  chunk_bytes: 99999999999TB\n", "limits.chunk_bytes"},
       }) {
    ExpectRefusedNaming(c.yaml, c.key);
  }
}

TEST(ConfigTest, MalformedYamlIsInvalidArgumentAndNothingApplied) {
  for (const char* yaml : {
           "listen: [unclosed\n",
           "{listen: 1.2.3.4:5\n",
           "listen: 1.2.3.4:5\n  host_memory: 1GiB\n",  // Bad indentation.
           "listen: a\nlisten: b: c\n",
           "\t- tab\n",
       }) {
    DaemonOptions o = Sentinel();
    EXPECT_THAT(ApplyConfigYaml(yaml, &o), StatusIs(absl::StatusCode::kInvalidArgument)) << yaml;
    ExpectSame(o, Sentinel());
  }
}

TEST(ConfigTest, NonMapDocumentsAreInvalidArgument) {
  for (const char* yaml : {"just a string\n", "- a\n- b\n", "42\n"}) {
    DaemonOptions o = Sentinel();
    EXPECT_THAT(ApplyConfigYaml(yaml, &o), StatusIs(absl::StatusCode::kInvalidArgument)) << yaml;
    ExpectSame(o, Sentinel());
  }
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigYaml("limits: 5\n", &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("limits")));
  ExpectSame(o, Sentinel());
}

TEST(ConfigTest, WrongTypesAreInvalidArgumentAndNothingApplied) {
  for (const char* yaml : {
           "listen: 1.2.3.4:5\nlimits:\n  max_keys_per_request: lots\n",
           "limits:\n  max_keys_per_request: -1\n",
           "limits:\n  max_keys_per_request: 4294967296\n",
           "listen: [a, b]\n",
           "host_memory: {a: 1}\n",
           "data_dir:\n  - x\n",
       }) {
    DaemonOptions o = Sentinel();
    EXPECT_THAT(ApplyConfigYaml(yaml, &o), StatusIs(absl::StatusCode::kInvalidArgument)) << yaml;
    ExpectSame(o, Sentinel());
  }
}

// Regression: a value of the wrong type names its key (it used to surface as yaml-cpp's bare
// "bad conversion").
TEST(ConfigTest, WrongTypesNameTheKey) {
  struct Case {
    const char* yaml;
    const char* key;
  };
  for (const Case& c : {
           Case{"listen: 1.2.3.4:5\nlimits:\n  max_keys_per_request: lots\n",
                "max_keys_per_request"},
           Case{"limits:\n  max_keys_per_request: -1\n", "max_keys_per_request"},
           Case{"listen: [a, b]\n", "listen"},
           Case{"host_memory: {a: 1}\n", "host_memory"},
           Case{"data_dir:\n  - x\n", "data_dir"},
           Case{"limits:\n  chunk_bytes: [1]\n", "chunk_bytes"},
       }) {
    DaemonOptions o;
    EXPECT_THAT(ApplyConfigYaml(c.yaml, &o),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.key)))
        << c.yaml;
  }
}

class ConfigFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/config_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(ConfigFileTest, AppliesAFile) {
  const std::string path = dir_ + "/kvpoold.yaml";
  ASSERT_THAT(WriteStringToFile(path, "host_memory: 2GiB\nlog_level: warning\n"), IsOk());
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigFile(path, &o), IsOk());
  EXPECT_EQ(o.host_memory, 2 * kGiB);
  EXPECT_EQ(o.log_level, "warning");
}

TEST_F(ConfigFileTest, MissingFileIsNotFound) {
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigFile(dir_ + "/missing.yaml", &o), StatusIs(absl::StatusCode::kNotFound));
  ExpectSame(o, Sentinel());
}

TEST_F(ConfigFileTest, ErrorsNameTheFile) {
  const std::string path = dir_ + "/bad.yaml";
  ASSERT_THAT(WriteStringToFile(path, "colour: blue\n"), IsOk());
  DaemonOptions o = Sentinel();
  EXPECT_THAT(ApplyConfigFile(path, &o),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr(path), HasSubstr("'colour'"))));
  ExpectSame(o, Sentinel());
}

}  // namespace
namespace codec_config {

TEST(ConfigCodecTest, EmbeddedDefaultIsKvpoolWithASmallBudget) {
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigYaml(DefaultConfigYaml(), &o), IsOk());
  const CodecParams& c = o.service.codecs.For("any-model");
  EXPECT_EQ(c.codec, CodecId::kKvpool);
  EXPECT_FLOAT_EQ(c.budget, 0.02f);
  EXPECT_EQ(c.extra & 0xff, 24u);  // Normalised: keys get 24/64 of the budget.
  EXPECT_EQ(o.encode_threads, 0);
}

TEST(ConfigCodecTest, PerModelCodecsOverrideTheDefault) {
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigYaml(R"(
codec: {codec: raw}
model_codecs:
  llama: {codec: kivi, bits: 2}
  qwen: {codec: packkv, budget: 0.05, group: 8}
  mistral: {codec: kvpool, budget: 0.05, profile: fast}
  gemma: {codec: kvpool, profile: entropy}
encode_threads: 3
)",
                              &o),
              IsOk());
  EXPECT_EQ(o.service.codecs.For("other").codec, CodecId::kRaw);
  const CodecParams& llama = o.service.codecs.For("llama");
  EXPECT_EQ(llama.codec, CodecId::kKivi);
  EXPECT_EQ(llama.bits, 2);
  EXPECT_EQ(llama.group, 32);  // Default filled in.
  const CodecParams& qwen = o.service.codecs.For("qwen");
  EXPECT_EQ(qwen.codec, CodecId::kPackKv);
  EXPECT_FLOAT_EQ(qwen.budget, 0.05f);
  EXPECT_EQ(qwen.group, 8);
  const CodecParams& mistral = o.service.codecs.For("mistral");
  EXPECT_EQ(mistral.codec, CodecId::kKvpool);
  EXPECT_NE(mistral.flags & kKvpoolFastProfile, 0);
  EXPECT_EQ(o.service.codecs.For("llama").flags & kKvpoolFastProfile, 0);
  EXPECT_EQ(o.service.codecs.For("gemma").flags, kKvpoolEntropyProfile);
  EXPECT_EQ(o.encode_threads, 3);
}

TEST(ConfigCodecTest, BadCodecsNameTheKeyAndChangeNothing) {
  struct Case {
    std::string yaml;
    std::string message;
  };
  const Case cases[] = {
      {"codec: {codec: zstd}", "codec.codec"},
      {"codec: {budget: 0.1}", "codec.codec is required"},
      {"codec: {codec: kvpool, budget: 2}", "error budget must be in (0, 1)"},
      {"codec: {codec: kivi, bits: 3}", "kivi bits must be 2, 4 or 8"},
      {"codec: {codec: kivi, colour: red}", "unknown config key 'codec.colour'"},
      {"codec: {codec: kivi, profile: fast}", "only for codec kvpool"},
      {"codec: {codec: kvpool, profile: fastest}", "codec.profile must be 'default', 'fast' or 'entropy'"},
      {"model_codecs: {m: {codec: kivi, bits: 5}}", "model_codecs.m"},
      {"model_codecs: [a, b]", "'model_codecs' must be a map"},
      {"encode_threads: -1", "encode_threads"},
      {"encode_threads: lots", "encode_threads"},
  };
  for (const Case& c : cases) {
    DaemonOptions o;
    o.service.codecs.default_value = CodecParams{CodecId::kKivi, 8, 0, 16};
    EXPECT_THAT(ApplyConfigYaml(c.yaml, &o),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr(c.message)))
        << c.yaml;
    EXPECT_EQ(o.service.codecs.default_value.codec, CodecId::kKivi) << c.yaml;
    EXPECT_TRUE(o.service.codecs.per_model.empty()) << c.yaml;
  }
}

}  // namespace codec_config
}  // namespace kvpool::server

namespace kvpool::server {
namespace {

TEST(FusionConfigTest, FusionAndPerModelFusion) {
  DaemonOptions o;
  ASSERT_THAT(ApplyConfigYaml(DefaultConfigYaml(), &o), ::kvpool::testing::IsOk());
  EXPECT_EQ(o.service.fusion.default_value.mode, FusionOptions::Mode::kOff);  // YAML "off".
  EXPECT_THAT(o.service.fusion.default_value.skip_layers, ::testing::ElementsAre(0, 1, -2, -1));
  ASSERT_THAT(ApplyConfigYaml(R"(
fusion: {mode: online, threshold: 0.9, budget: 0.03, skip_layers: [0]}
model_fusion:
  llama: {mode: batch}
)",
                              &o),
              ::kvpool::testing::IsOk());
  const FusionOptions& d = o.service.fusion.For("other");
  EXPECT_EQ(d.mode, FusionOptions::Mode::kOnline);
  EXPECT_DOUBLE_EQ(d.threshold, 0.9);
  EXPECT_DOUBLE_EQ(d.budget, 0.03);
  EXPECT_THAT(d.skip_layers, ::testing::ElementsAre(0));
  const FusionOptions& llama = o.service.fusion.For("llama");
  EXPECT_EQ(llama.mode, FusionOptions::Mode::kBatch);
  EXPECT_DOUBLE_EQ(llama.budget, 0.03);  // Inherits the fusion section.
}

TEST(FusionConfigTest, BadFusionValuesAreRefusedAndChangeNothing) {
  for (const char* yaml : {"fusion: {mode: sometimes}", "fusion: {budget: 0}",
                           "fusion: {budget: 1.5}", "fusion: {threshold: 2}",
                           "fusion: {skip_layers: 3}", "fusion: {colour: red}",
                           "model_fusion: [a]", "model_fusion: {m: {mode: never}}"}) {
    DaemonOptions o;
    EXPECT_THAT(ApplyConfigYaml(yaml, &o),
                ::kvpool::testing::StatusIs(absl::StatusCode::kInvalidArgument))
        << yaml;
    EXPECT_EQ(o.service.fusion.default_value.mode, FusionOptions::Mode::kOff) << yaml;
    EXPECT_TRUE(o.service.fusion.per_model.empty()) << yaml;
  }
}

}  // namespace
}  // namespace kvpool::server
