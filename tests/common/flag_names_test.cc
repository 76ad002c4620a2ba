// Tests for common/flag_names.h: dashes in flag names become underscores, nothing else changes.
#include "common/flag_names.h"

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvpool {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

// Runs NormalizeFlagNames on a copy of `args` held in writable buffers, as argv would be.
std::vector<std::string> Normalize(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return NormalizeFlagNames(static_cast<int>(argv.size()), argv.data());
}

TEST(FlagNamesTest, RewritesDashesInLongFlagNames) {
  EXPECT_THAT(Normalize({"kvpoold", "--metrics-listen=127.0.0.1:0", "--host-memory", "4GiB"}),
              ElementsAre("kvpoold", "--metrics_listen=127.0.0.1:0", "--host_memory", "4GiB"));
}

TEST(FlagNamesTest, LeavesValuesAfterEqualsAlone) {
  EXPECT_THAT(Normalize({"p", "--data-dir=/tmp/a-b-c", "--model=meta-llama/Llama-3-8B"}),
              ElementsAre("p", "--data_dir=/tmp/a-b-c", "--model=meta-llama/Llama-3-8B"));
}

TEST(FlagNamesTest, UnderscoresAndPlainFlagsUnchanged) {
  EXPECT_THAT(Normalize({"p", "--metrics_listen=x", "--v=1", "--help", "-v"}),
              ElementsAre("p", "--metrics_listen=x", "--v=1", "--help", "-v"));
}

TEST(FlagNamesTest, SingleDashFlagsAreRewrittenToo) {
  EXPECT_THAT(Normalize({"p", "-log-level=debug"}), ElementsAre("p", "-log_level=debug"));
}

TEST(FlagNamesTest, PositionalArgumentsUnchanged) {
  EXPECT_THAT(Normalize({"p", "put", "my-file.npy", "a-b"}),
              ElementsAre("p", "put", "my-file.npy", "a-b"));
}

TEST(FlagNamesTest, StopsAtDoubleDash) {
  EXPECT_THAT(Normalize({"p", "--log-level=info", "--", "--not-a-flag", "x-y"}),
              ElementsAre("p", "--log_level=info", "--", "--not-a-flag", "x-y"));
}

TEST(FlagNamesTest, ProgramNameUnchanged) {
  EXPECT_THAT(Normalize({"--weird-program-name", "--a-b"}),
              ElementsAre("--weird-program-name", "--a_b"));
}

TEST(FlagNamesTest, EmptyAndOnlyProgram) {
  EXPECT_THAT(Normalize({}), ElementsAre());
  EXPECT_THAT(Normalize({"p"}), ElementsAre("p"));
}

TEST(FlagNamesTest, ArgvPointersPointIntoTheStringsAndEndWithNull) {
  std::vector<std::string> args = Normalize({"p", "--a-b=1", "x"});
  std::vector<char*> argv = ArgvPointers(args);
  ASSERT_EQ(argv.size(), 4u);
  EXPECT_EQ(argv[3], nullptr);
  for (size_t i = 0; i < args.size(); ++i) {
    EXPECT_EQ(argv[i], args[i].data());
    EXPECT_STREQ(argv[i], args[i].c_str());
  }
  std::vector<std::string> none;
  EXPECT_THAT(ArgvPointers(none), ElementsAreArray(std::vector<char*>{nullptr}));
}

}  // namespace
}  // namespace kvpool
