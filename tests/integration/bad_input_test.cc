// Each kind of bad input gets a clear gRPC status naming the problem, changes nothing stored,
// and leaves the daemon serving: wrong shapes, byte counts that do not match the spec, unknown
// dtype, zero or too many keys, oversized requests and messages, malformed streams,
// unparseable messages, and garbage bytes on the port.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <optional>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/synchronization/notification.h"
#include "absl/strings/str_cat.h"
#include "common/block_key.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "proto/convert.h"
#include "tests/integration/daemon_fixture.h"
#include "tests/util/status_matchers.h"

namespace kvpool {
namespace {

using ::kvpool::testing::IsOk;
using ::kvpool::testing::RunningDaemon;
using ::testing::HasSubstr;

const KvSpec kSpec{"bad-input-model", 2, 2, 16, DType::kFp16, 4};  // 1024-byte blocks.

std::string Key(int i) {
  std::vector<uint32_t> tokens(4, static_cast<uint32_t>(i));
  return std::string(ChainBlockKey(RootBlockKey(), tokens).AsStringView());
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = RunningDaemon::Start();
    ASSERT_THAT(d, IsOk());
    daemon_ = std::move(*d);
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);  // Let the client send what the daemon must refuse.
    channel_ = grpc::CreateCustomChannel(daemon_->grpc_address(),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::KvPool::NewStub(channel_);
    // One good block, so that "changes nothing" has something to compare against.
    v1::PutHeader header = Header(1);
    ASSERT_TRUE(Put(header, {std::string(kSpec.BlockBytes(), 'x')}).ok());
  }
  void TearDown() override {
    if (daemon_) EXPECT_EQ(*daemon_->Stop(), 0) << daemon_->Log();
  }

  v1::PutHeader Header(int blocks, int first_key = 0) const {
    v1::PutHeader header;
    SpecToProto(kSpec, header.mutable_spec());
    header.mutable_codec()->set_codec("raw");
    for (int i = 0; i < blocks; ++i) header.add_keys(Key(first_key + i));
    return header;
  }

  // Sends the messages of one Put stream: the header (if given) and data chunks.
  grpc::Status Put(const std::optional<v1::PutHeader>& header, std::vector<std::string> chunks,
                   bool header_again = false) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::PutResponse response;
    auto writer = stub_->Put(&context, &response);
    v1::PutRequest m;
    if (header) {
      *m.mutable_header() = *header;
      writer->Write(m);
    }
    for (const std::string& c : chunks) {
      m.set_data(c);
      if (!writer->Write(m)) break;
    }
    if (header && header_again) {  // Header, data, then the header again.
      *m.mutable_header() = *header;
      writer->Write(m);
    }
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Lookup(const v1::LookupRequest& request, v1::LookupResponse* response = nullptr) {
    grpc::ClientContext context;
    v1::LookupResponse ignored;
    return stub_->Lookup(&context, request, response ? response : &ignored);
  }

  v1::LookupRequest GoodLookup() const {
    v1::LookupRequest r;
    r.mutable_ns()->set_model_id(kSpec.model_id);
    r.mutable_ns()->set_tokens_per_block(kSpec.tokens_per_block);
    r.add_keys(Key(0));
    return r;
  }

  // The store still holds exactly the one good block, and the daemon still answers.
  void ExpectUnchangedAndServing() {
    v1::LookupResponse response;
    ASSERT_TRUE(Lookup(GoodLookup(), &response).ok());
    EXPECT_EQ(response.hit_prefix_blocks(), 1u);
    grpc::ClientContext context;
    v1::StatsResponse stats;
    ASSERT_TRUE(stub_->Stats(&context, v1::StatsRequest(), &stats).ok());
    EXPECT_EQ(stats.blocks(), 1u);
    EXPECT_EQ(stats.namespaces(), 1u);
    EXPECT_EQ(stats.logical_bytes(), kSpec.BlockBytes());
  }

  void ExpectStatus(const grpc::Status& s, grpc::StatusCode code, const std::string& text) {
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(text));
    ExpectUnchangedAndServing();
  }

  std::unique_ptr<RunningDaemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvPool::Stub> stub_;
};

TEST_F(BadInputTest, WrongShape) {
  v1::PutHeader h = Header(1, 10);
  h.mutable_spec()->set_head_dim(0);
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT, "head_dim");
  h = Header(1, 10);
  h.mutable_spec()->set_num_layers(5000);
  ExpectStatus(Put(h, {}), grpc::StatusCode::INVALID_ARGUMENT, "num_layers");
}

TEST_F(BadInputTest, ShapeConflictingWithTheRegisteredSpec) {
  v1::PutHeader h = Header(1, 10);
  h.mutable_spec()->set_num_kv_heads(4);
  ExpectStatus(Put(h, {std::string(2048, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "conflicts with the registered spec");
}

TEST_F(BadInputTest, ByteCountNotMatchingTheSpec) {
  ExpectStatus(Put(Header(2, 10), {std::string(1500, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "put ended after 1500 of the 2048 announced bytes");
  ExpectStatus(Put(Header(1, 10), {std::string(1000, 'a'), std::string(100, 'b')}),
               grpc::StatusCode::INVALID_ARGUMENT, "more than the 1024 bytes");
}

TEST_F(BadInputTest, UnknownDtypeAndCodec) {
  v1::PutHeader h = Header(1, 10);
  h.mutable_spec()->set_dtype(static_cast<v1::DType>(7));
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT, "dtype");
  h = Header(1, 10);
  h.mutable_spec()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT, "dtype");
  h = Header(1, 10);
  h.mutable_codec()->set_codec("zip");
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "unknown codec 'zip'");
  h = Header(1, 10);
  h.mutable_codec()->set_codec("kivi");
  h.mutable_codec()->set_bits(3);
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "kivi bits must be 2, 4 or 8");
  h = Header(1, 10);
  h.mutable_codec()->set_codec("kvpool");
  h.mutable_codec()->set_budget(1.5f);
  ExpectStatus(Put(h, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "error budget must be in (0, 1)");
}

TEST_F(BadInputTest, ZeroTooManyAndMalformedKeys) {
  v1::LookupRequest r = GoodLookup();
  r.clear_keys();
  ExpectStatus(Lookup(r), grpc::StatusCode::INVALID_ARGUMENT, "no keys");
  for (int i = 0; i < 5000; ++i) r.add_keys(Key(i));
  ExpectStatus(Lookup(r), grpc::StatusCode::INVALID_ARGUMENT, "5000 keys exceed the limit of 4096");
  r = GoodLookup();
  r.add_keys(std::string(31, 'k'));
  ExpectStatus(Lookup(r), grpc::StatusCode::INVALID_ARGUMENT, "keys[1] is 31 bytes");
  ExpectStatus(Put(Header(0), {}), grpc::StatusCode::INVALID_ARGUMENT, "no keys");
  r = GoodLookup();
  r.mutable_ns()->set_tokens_per_block(0);
  ExpectStatus(Lookup(r), grpc::StatusCode::INVALID_ARGUMENT, "tokens_per_block");
  r = GoodLookup();
  r.mutable_ns()->set_model_id("");
  ExpectStatus(Lookup(r), grpc::StatusCode::INVALID_ARGUMENT, "model_id");
}

TEST_F(BadInputTest, OversizedRequestAndMessage) {
  // 4096 blocks of a 1 MiB spec announce 4 GiB, over the 1 GiB request limit.
  v1::PutHeader h = Header(0);
  h.mutable_spec()->set_model_id("big-model");
  h.mutable_spec()->set_num_layers(16);
  h.mutable_spec()->set_num_kv_heads(8);
  h.mutable_spec()->set_head_dim(128);
  h.mutable_spec()->set_tokens_per_block(16);
  for (int i = 0; i < 4096; ++i) h.add_keys(Key(i));
  ExpectStatus(Put(h, {}), grpc::StatusCode::RESOURCE_EXHAUSTED, "exceeds the request limit");
  // One 9 MiB message, over the 8 MiB message limit.
  v1::PutHeader h2 = Header(9 * 1024, 10);
  h2.mutable_keys()->DeleteSubrange(4096, h2.keys_size() - 4096);
  ExpectStatus(Put(h2, {std::string(9 << 20, 'a')}), grpc::StatusCode::RESOURCE_EXHAUSTED, "");
}

TEST_F(BadInputTest, MalformedStreams) {
  ExpectStatus(Put(std::nullopt, {std::string(1024, 'a')}), grpc::StatusCode::INVALID_ARGUMENT,
               "first Put message must be a header");
  ExpectStatus(Put(std::nullopt, {}), grpc::StatusCode::INVALID_ARGUMENT, "without a header");
  ExpectStatus(Put(Header(1, 10), {std::string(1024, 'a')}, /*header_again=*/true),
               grpc::StatusCode::INVALID_ARGUMENT, "second header");
  // A message with neither header nor data.
  grpc::ClientContext context;
  v1::PutResponse response;
  auto writer = stub_->Put(&context, &response);
  v1::PutRequest m;
  *m.mutable_header() = Header(1, 10);
  writer->Write(m);
  writer->Write(v1::PutRequest());
  writer->WritesDone();
  ExpectStatus(writer->Finish(), grpc::StatusCode::INVALID_ARGUMENT, "neither header nor data");
}

TEST_F(BadInputTest, UnparseableMessageIsRefusedByGrpc) {
  grpc::GenericStub generic(channel_);
  grpc::ClientContext context;
  const std::string garbage = "\xff\xff\xff\xff\x0f garbage that is not protobuf";
  grpc::Slice slice(garbage);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  absl::Notification done;
  grpc::Status status;
  generic.UnaryCall(&context, "/kvpool.v1.KvPool/Lookup", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      status = s;
                      done.Notify();
                    });
  done.WaitForNotification();
  // gRPC (1.51) refuses a request it cannot parse before any kvpool code runs; it answers
  // UNIMPLEMENTED without a message. What matters here: refused, nothing changed, still serving.
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();
  ExpectUnchangedAndServing();
}

TEST_F(BadInputTest, GarbageBytesOnThePort) {
  const std::string address = daemon_->grpc_address();
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(address.substr(address.rfind(':') + 1), &port));
  std::mt19937 rng(7);
  for (int attempt = 0; attempt < 5; ++attempt) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::string junk(4096 * (attempt + 1), '\0');
    for (char& c : junk) c = static_cast<char>(rng());
    if (attempt == 0) junk.replace(0, 16, "GET / HTTP/1.1\r\n");
    ::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    ::shutdown(fd, SHUT_WR);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char buf[4096];
    while (::recv(fd, buf, sizeof(buf), 0) > 0) {
    }
    ::close(fd);
  }
  ExpectUnchangedAndServing();
}

}  // namespace
}  // namespace kvpool
