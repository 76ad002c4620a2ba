#include "client/client.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_util.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "proto/convert.h"

namespace kvpool::client {

struct Client::Impl {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::KvPool::Stub> stub;

  void SetDeadline(grpc::ClientContext* context) const {
    context->set_deadline(absl::ToChronoTime(absl::Now() + options.deadline));
  }
};

namespace {

void NamespaceToProto(const Namespace& ns, v1::Namespace* out) {
  out->set_model_id(ns.model_id);
  out->set_tokens_per_block(ns.tokens_per_block);
}

absl::Status CallStatus(const grpc::Status& status, absl::string_view method) {
  return Annotate(FromGrpcStatus(status), method);
}

}  // namespace

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const ClientOptions& options) {
  if (options.server.empty()) return absl::InvalidArgumentError("server address is empty");
  if (options.max_keys_per_call == 0 || options.chunk_bytes == 0) {
    return absl::InvalidArgumentError("max_keys_per_call and chunk_bytes must be positive");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  impl->channel =
      grpc::CreateCustomChannel(options.server, grpc::InsecureChannelCredentials(), args);
  impl->stub = v1::KvPool::NewStub(impl->channel);
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

absl::Status Client::WaitUntilReady(absl::Duration timeout) {
  if (impl_->channel->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout))) {
    return absl::OkStatus();
  }
  return absl::UnavailableError(absl::StrCat("kvpoold at ", impl_->options.server,
                                             " not reachable within ",
                                             absl::FormatDuration(timeout)));
}

absl::StatusOr<LookupResult> Client::Lookup(const Namespace& ns, absl::Span<const BlockKey> keys) {
  LookupResult result;
  bool prefix_open = true;
  for (size_t start = 0; start < keys.size() || start == 0;
       start += impl_->options.max_keys_per_call) {
    const auto batch = keys.subspan(start, impl_->options.max_keys_per_call);
    v1::LookupRequest request;
    NamespaceToProto(ns, request.mutable_ns());
    KeysToProto({batch.begin(), batch.end()}, request.mutable_keys());
    v1::LookupResponse response;
    grpc::ClientContext context;
    impl_->SetDeadline(&context);
    if (grpc::Status s = impl_->stub->Lookup(&context, request, &response); !s.ok()) {
      return CallStatus(s, "Lookup");
    }
    for (bool p : response.present()) {
      result.present.push_back(p);
      prefix_open = prefix_open && p;
      result.hit_prefix_blocks += prefix_open;
    }
    if (keys.empty()) break;
  }
  return result;
}

absl::StatusOr<PutResult> Client::Put(const KvSpec& spec, absl::Span<const BlockKey> keys,
                                      absl::Span<const uint8_t> data) {
  if (absl::Status s = ValidateSpec(spec); !s.ok()) return s;
  const uint64_t block_bytes = spec.BlockBytes();
  if (data.size() != keys.size() * block_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("data is ", data.size(), " bytes, ",
                                                   keys.size(), " blocks of this spec need ",
                                                   keys.size() * block_bytes));
  }
  const uint64_t per_call = std::max<uint64_t>(
      1, std::min<uint64_t>(impl_->options.max_keys_per_call,
                            impl_->options.max_put_bytes / block_bytes));
  PutResult total;
  for (size_t start = 0; start < keys.size() || start == 0; start += per_call) {
    const size_t n = std::min<uint64_t>(per_call, keys.size() - start);
    auto r = PutOne(spec, keys.subspan(start, n), data.subspan(start * block_bytes, n * block_bytes));
    if (!r.ok()) return r.status();
    total.blocks_stored += r->blocks_stored;
    total.blocks_already_present += r->blocks_already_present;
    total.blocks_evicted += r->blocks_evicted;
    total.bytes_sent += r->bytes_sent;
    if (keys.empty()) break;
  }
  return total;
}

absl::StatusOr<PutResult> Client::PutOne(const KvSpec& spec, absl::Span<const BlockKey> keys,
                                         absl::Span<const uint8_t> data) {
  grpc::ClientContext context;
  impl_->SetDeadline(&context);
  v1::PutResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer =
      impl_->stub->Put(&context, &response);
  v1::PutRequest message;
  v1::PutHeader* header = message.mutable_header();
  SpecToProto(spec, header->mutable_spec());
  KeysToProto({keys.begin(), keys.end()}, header->mutable_keys());
  header->set_codec("raw");
  bool ok = writer->Write(message);
  for (size_t pos = 0; ok && pos < data.size(); pos += impl_->options.chunk_bytes) {
    const size_t n = std::min<uint64_t>(impl_->options.chunk_bytes, data.size() - pos);
    message.set_data(reinterpret_cast<const char*>(data.data()) + pos, n);
    ok = writer->Write(message);
  }
  // A failed Write means the daemon finished early (with an error): Finish reports it.
  writer->WritesDone();
  if (grpc::Status s = writer->Finish(); !s.ok()) return CallStatus(s, "Put");
  PutResult result;
  result.blocks_stored = response.blocks_stored();
  result.blocks_already_present = response.blocks_already_present();
  result.blocks_evicted = response.blocks_evicted();
  result.bytes_sent = response.bytes_received();
  return result;
}

absl::StatusOr<GetResult> Client::Get(const Namespace& ns, absl::Span<const BlockKey> keys) {
  GetResult total;
  bool prefix_open = true;
  for (size_t start = 0; start < keys.size() || start == 0;
       start += impl_->options.max_keys_per_call) {
    auto r = GetOne(ns, keys.subspan(start, impl_->options.max_keys_per_call));
    if (!r.ok()) return r.status();
    if (total.spec.model_id.empty()) {
      total.spec = r->spec;
      total.block_bytes = r->block_bytes;
    }
    for (bool f : r->found) {
      total.found.push_back(f);
      prefix_open = prefix_open && f;
      total.hit_prefix_blocks += prefix_open;
    }
    if (total.data.empty()) {
      total.data = std::move(r->data);
    } else {
      total.data += r->data;
    }
    if (keys.empty()) break;
  }
  return total;
}

absl::StatusOr<GetResult> Client::GetOne(const Namespace& ns, absl::Span<const BlockKey> keys) {
  v1::GetRequest request;
  NamespaceToProto(ns, request.mutable_ns());
  KeysToProto({keys.begin(), keys.end()}, request.mutable_keys());
  grpc::ClientContext context;
  impl_->SetDeadline(&context);
  std::unique_ptr<grpc::ClientReader<v1::GetResponse>> reader =
      impl_->stub->Get(&context, request);
  GetResult result;
  v1::GetResponse message;
  bool have_header = false;
  while (reader->Read(&message)) {
    if (message.has_header()) {
      const v1::GetHeader& h = message.header();
      if (h.has_spec()) {
        auto spec = SpecFromProto(h.spec());
        if (!spec.ok()) return Annotate(spec.status(), "Get: daemon sent a bad spec");
        result.spec = *spec;
      }
      result.found.assign(h.found().begin(), h.found().end());
      result.hit_prefix_blocks = h.hit_prefix_blocks();
      result.block_bytes = h.block_bytes();
      const uint64_t hits = std::count(result.found.begin(), result.found.end(), true);
      result.data.reserve(hits * result.block_bytes);
      have_header = true;
    } else {
      result.data += message.data();
    }
  }
  if (grpc::Status s = reader->Finish(); !s.ok()) return CallStatus(s, "Get");
  const uint64_t hits = std::count(result.found.begin(), result.found.end(), true);
  if (!have_header || result.found.size() != keys.size() ||
      result.data.size() != hits * result.block_bytes) {
    return absl::DataLossError(absl::StrCat("Get: daemon sent ", result.data.size(),
                                            " bytes for ", hits, " blocks of ",
                                            result.block_bytes, " bytes"));
  }
  return result;
}

absl::StatusOr<uint32_t> Client::Delete(const Namespace& ns, absl::Span<const BlockKey> keys) {
  uint32_t deleted = 0;
  for (size_t start = 0; start < keys.size() || start == 0;
       start += impl_->options.max_keys_per_call) {
    const auto batch = keys.subspan(start, impl_->options.max_keys_per_call);
    v1::DeleteRequest request;
    NamespaceToProto(ns, request.mutable_ns());
    KeysToProto({batch.begin(), batch.end()}, request.mutable_keys());
    v1::DeleteResponse response;
    grpc::ClientContext context;
    impl_->SetDeadline(&context);
    if (grpc::Status s = impl_->stub->Delete(&context, request, &response); !s.ok()) {
      return CallStatus(s, "Delete");
    }
    deleted += response.blocks_deleted();
    if (keys.empty()) break;
  }
  return deleted;
}

absl::StatusOr<PoolStats> Client::Stats() {
  v1::StatsResponse response;
  grpc::ClientContext context;
  impl_->SetDeadline(&context);
  if (grpc::Status s = impl_->stub->Stats(&context, v1::StatsRequest(), &response); !s.ok()) {
    return CallStatus(s, "Stats");
  }
  PoolStats stats;
  stats.blocks = response.blocks();
  stats.logical_bytes = response.logical_bytes();
  stats.stored_bytes = response.stored_bytes();
  stats.capacity_bytes = response.capacity_bytes();
  stats.evictions = response.evictions();
  stats.lookup_hits = response.lookup_hits();
  stats.lookup_misses = response.lookup_misses();
  stats.namespaces = response.namespaces();
  stats.version = response.version();
  return stats;
}

}  // namespace kvpool::client
