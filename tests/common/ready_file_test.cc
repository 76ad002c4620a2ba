// Tests for common/ready_file.h: write then read, atomic replacement, malformed files.
#include "common/ready_file.h"

#include <stdlib.h>

#include <filesystem>
#include <string>

#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::StatusIs;
using ::testing::HasSubstr;

class ReadyFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/ready_file_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/ready.json";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;
  std::string path_;
};

TEST_F(ReadyFileTest, WriteThenRead) {
  ReadyInfo info;
  info.grpc = "127.0.0.1:41234";
  info.metrics = "127.0.0.1:41235";
  info.pid = 123;
  ASSERT_THAT(WriteReadyFile(path_, info), IsOk());
  auto back = ReadReadyFile(path_);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->grpc, "127.0.0.1:41234");
  EXPECT_EQ(back->metrics, "127.0.0.1:41235");
  EXPECT_EQ(back->pid, 123);
}

TEST_F(ReadyFileTest, WritesTheDocumentedJson) {
  ASSERT_THAT(WriteReadyFile(path_, {"127.0.0.1:41234", "127.0.0.1:41235", 123}), IsOk());
  auto text = ReadFileToString(path_);
  ASSERT_THAT(text, IsOk());
  EXPECT_THAT(*text, HasSubstr("\"grpc\": \"127.0.0.1:41234\""));
  EXPECT_THAT(*text, HasSubstr("\"metrics\": \"127.0.0.1:41235\""));
  EXPECT_THAT(*text, HasSubstr("\"pid\": 123"));
  // Nothing temporary is left next to it.
  EXPECT_FALSE(std::filesystem::exists(path_ + ".tmp"));
}

TEST_F(ReadyFileTest, MetricsMayBeEmpty) {
  ASSERT_THAT(WriteReadyFile(path_, {"[::1]:7470", "", 99999}), IsOk());
  auto back = ReadReadyFile(path_);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->grpc, "[::1]:7470");
  EXPECT_EQ(back->metrics, "");
  EXPECT_EQ(back->pid, 99999);
}

TEST_F(ReadyFileTest, RewriteReplacesTheOldContents) {
  ASSERT_THAT(WriteReadyFile(path_, {"127.0.0.1:1", "127.0.0.1:2", 1}), IsOk());
  ASSERT_THAT(WriteReadyFile(path_, {"127.0.0.1:3", "", 2}), IsOk());
  auto back = ReadReadyFile(path_);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->grpc, "127.0.0.1:3");
  EXPECT_EQ(back->metrics, "");
  EXPECT_EQ(back->pid, 2);
}

TEST_F(ReadyFileTest, ReadsHandWrittenJson) {
  ASSERT_THAT(WriteStringToFile(path_, "{\"pid\":7,\"metrics\":\"m:1\",\"grpc\":\"g:2\"}"), IsOk());
  auto back = ReadReadyFile(path_);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(back->grpc, "g:2");
  EXPECT_EQ(back->metrics, "m:1");
  EXPECT_EQ(back->pid, 7);
}

TEST_F(ReadyFileTest, MissingFileIsNotFound) {
  EXPECT_THAT(ReadReadyFile(path_), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(ReadyFileTest, MalformedFilesAreInvalidArgument) {
  for (const char* text : {
           "", "garbage", "{}",
           "{\"metrics\": \"m:1\", \"pid\": 5}",                  // No grpc.
           "{\"grpc\": \"\", \"metrics\": \"m:1\", \"pid\": 5}",  // Empty grpc.
           "{\"grpc\": \"g:1\", \"metrics\": \"m:1\"}",           // No pid.
           "{\"grpc\": \"g:1\", \"metrics\": \"\", \"pid\": \"x\"}",
           "{\"grpc\": \"g:1\", \"metrics\": \"\", \"pid\": 12ab}",
           "{\"grpc\": \"g:1\", \"metrics\": \"\", \"pid\": }",
           "{\"grpc\": \"g:1\", \"metrics\": \"\", \"pid\": 99999999999}",  // Not an int.
           "{\"grpc\": \"g:1",                                              // Truncated.
       }) {
    ASSERT_THAT(WriteStringToFile(path_, text), IsOk());
    EXPECT_THAT(ReadReadyFile(path_),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(path_)))
        << text;
  }
}

TEST_F(ReadyFileTest, WriteIntoMissingFolderFails) {
  EXPECT_THAT(WriteReadyFile(dir_ + "/no/such/ready.json", {"g:1", "", 1}),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvpool
