// SIGTERM drains: a Put in flight when the signal arrives completes and is acknowledged, new
// connections are refused meanwhile, and the daemon exits 0.
#include <signal.h>

#include "absl/time/clock.h"
#include "common/block_key.h"
#include "common/npy.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "proto/convert.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;

TEST(DrainTest, InFlightPutCompletesAfterSigterm) {
  auto daemon = RunningDaemon::Start();
  ASSERT_THAT(daemon, IsOk());
  const KvSpec spec{"drain-model", 4, 2, 64, DType::kFp16, 16};
  auto channel =
      grpc::CreateChannel((*daemon)->grpc_address(), grpc::InsecureChannelCredentials());
  auto stub = v1::KvPool::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::PutResponse response;
  auto writer = stub->Put(&context, &response);
  v1::PutRequest m;
  SpecToProto(spec, m.mutable_header()->mutable_spec());
  std::vector<uint32_t> tokens(16, 5);
  const BlockKey key = ChainBlockKey(RootBlockKey(), tokens);
  m.mutable_header()->add_keys(std::string(key.AsStringView()));
  ASSERT_TRUE(writer->Write(m));
  const std::string half(spec.BlockBytes() / 2, 'h');
  m.set_data(half);
  ASSERT_TRUE(writer->Write(m));

  // The put must have reached its handler before the signal (gRPC cancels calls still waiting
  // for one when it shuts down): /metrics counts handled calls. Bounded poll, as below.
  bool handling = false;
  for (int i = 0; i < 400 && !handling; ++i) {
    auto metrics = testing::HttpGet((*daemon)->metrics_address(), "/metrics");
    handling = metrics.ok() && metrics->find("kvpool_grpc_calls_in_flight 1") != std::string::npos;
    if (!handling) absl::SleepFor(absl::Milliseconds(25));
  }
  ASSERT_TRUE(handling) << "the put never reached its handler";
  ASSERT_THAT((*daemon)->process().Signal(SIGTERM), IsOk());
  // Wait until the daemon stopped accepting: a fresh connection's call fails. Bounded; this
  // polls an external process, which offers nothing to block on.
  bool refusing = false;
  for (int i = 0; i < 200 && !refusing; ++i) {
    auto fresh = v1::KvPool::NewStub(grpc::CreateChannel(
        (*daemon)->grpc_address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    v1::StatsResponse stats;
    refusing = !fresh->Stats(&c, v1::StatsRequest(), &stats).ok();
    if (!refusing) absl::SleepFor(absl::Milliseconds(25));
  }
  EXPECT_TRUE(refusing) << "daemon still accepted new calls after SIGTERM";
  EXPECT_TRUE((*daemon)->process().Running()) << "daemon exited before the put finished";

  ASSERT_TRUE(writer->Write(m));  // The second half.
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.blocks_stored(), 1u);
  auto code = (*daemon)->process().Wait(absl::Seconds(30));
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0) << (*daemon)->Log();
  EXPECT_NE((*daemon)->Log().find("draining"), std::string::npos);
}

TEST(DrainTest, IdleDaemonExitsZeroOnSigint) {
  auto daemon = RunningDaemon::Start();
  ASSERT_THAT(daemon, IsOk());
  ASSERT_THAT((*daemon)->process().Signal(SIGINT), IsOk());
  auto code = (*daemon)->process().Wait(absl::Seconds(30));
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 0);
}

TEST(DrainTest, StartFailuresExitOneWithAReason) {
  std::string out;
  auto code = RunCommand({testing::KvpooldPath(), "--host-memory=lots"}, absl::Seconds(30), &out);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 1);
  EXPECT_NE(out.find("--host-memory"), std::string::npos) << out;
  code = RunCommand({testing::KvpooldPath(), "--listen=nonsense"}, absl::Seconds(30), &out);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 1);
  EXPECT_NE(out.find("HOST:PORT"), std::string::npos) << out;
  testing::TempDir dir;
  ASSERT_THAT(WriteStringToFile(dir.path() + "/c.yaml", "listen: 127.0.0.1:0\nbogus: 1\n"), IsOk());
  code = RunCommand({testing::KvpooldPath(), "--config=" + dir.path() + "/c.yaml"},
                    absl::Seconds(30), &out);
  ASSERT_THAT(code, IsOk());
  EXPECT_EQ(*code, 1);
  EXPECT_NE(out.find("unknown config key 'bogus'"), std::string::npos) << out;
}

}  // namespace
}  // namespace kvpool
