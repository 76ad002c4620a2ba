#include "client/client.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/internal/resize_uninitialized.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "common/status_util.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "kernels/codec.h"
#include "kernels/fusion.h"
#include "kernels/device_codec.h"
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

// The scales of the segments (GetHeader.segment_scales): empty, or one finite value per
// segment. DataLoss otherwise.
absl::StatusOr<std::vector<float>> SegmentScales(const v1::GetHeader& header) {
  std::vector<float> scales(header.segment_bytes_size(), 1.f);
  if (header.segment_scales_size() == 0) return scales;
  if (header.segment_scales_size() != header.segment_bytes_size()) {
    return absl::DataLossError("Get: segment scales do not match the segments");
  }
  for (int i = 0; i < header.segment_scales_size(); ++i) {
    scales[i] = header.segment_scales(i);
    if (!std::isfinite(scales[i])) return absl::DataLossError("Get: a segment scale is not finite");
  }
  return scales;
}

// Decodes `blocks` blocks of encoded segments (sizes in `sizes`) into canonical block bytes,
// multiplying each segment's values by its scale; with `streaming`, segments not scaled after
// are written under a kernels::StreamingOutput.
absl::StatusOr<std::string> DecodeBlocks(const KvSpec& spec, uint64_t blocks,
                                         const google::protobuf::RepeatedField<uint64_t>& sizes,
                                         const std::vector<float>& scales, absl::string_view wire,
                                         bool streaming) {
  const uint64_t segments = spec.SegmentsPerBlock();
  if (static_cast<uint64_t>(sizes.size()) != blocks * segments) {
    return absl::DataLossError("Get: segment table does not match the blocks");
  }
  SegmentShape shape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim, spec.dtype};
  const uint64_t elements = shape.Elements();
  std::string out;  // Every byte is written by a segment's decode.
  absl::strings_internal::STLStringResizeUninitialized(&out, blocks * spec.BlockBytes());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data());
  uint64_t offset = 0;
  for (uint64_t i = 0; i < blocks * segments; ++i) {
    const uint64_t n = sizes.Get(static_cast<int>(i));
    if (n > wire.size() - offset) return absl::DataLossError("Get: segment sizes exceed the data");
    shape.kind = i % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue;
    absl::Span<uint16_t> out_segment(dst + i * elements, elements);
    const kernels::StreamingOutput stores(streaming && scales[i] == 1.f);
    absl::Status s = kernels::DecodeSegment(wire.substr(offset, n), out_segment,
                                            kernels::Path::kCpu, &shape);
    if (!s.ok()) return Annotate(s, absl::StrCat("Get: segment ", i));
    kernels::ScaleElements(spec.dtype, out_segment, scales[i], kernels::Path::kCpu);
    offset += n;
  }
  if (offset != wire.size()) return absl::DataLossError("Get: trailing bytes after the segments");
  return out;
}

// The same, decoded by the CUDA kernels into device memory.
absl::Status DecodeBlocksToDevice(const KvSpec& spec, uint64_t blocks,
                                  const google::protobuf::RepeatedField<uint64_t>& sizes,
                                  const std::vector<float>& scales, absl::string_view wire,
                                  uint16_t* d_out) {
  const uint64_t segments = spec.SegmentsPerBlock();
  if (static_cast<uint64_t>(sizes.size()) != blocks * segments) {
    return absl::DataLossError("Get: segment table does not match the blocks");
  }
  std::vector<absl::string_view> encoded;
  std::vector<SegmentShape> shapes;
  uint64_t offset = 0;
  for (uint64_t i = 0; i < blocks * segments; ++i) {
    const uint64_t n = sizes.Get(static_cast<int>(i));
    if (n > wire.size() - offset) return absl::DataLossError("Get: segment sizes exceed the data");
    encoded.push_back(wire.substr(offset, n));
    shapes.push_back(SegmentShape{spec.tokens_per_block, spec.num_kv_heads, spec.head_dim,
                                  spec.dtype,
                                  i % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue});
    offset += n;
  }
  if (offset != wire.size()) return absl::DataLossError("Get: trailing bytes after the segments");
  if (absl::Status check = kernels::SelfCheckCudaCodecs(); !check.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "decoding into device memory: the CUDA codecs failed their self-check (", check.message(),
        "); pass a host buffer"));
  }
  return kernels::DecodeSegmentsToDevice(encoded, shapes, d_out, scales);
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
                                      absl::Span<const uint8_t> data, const PutOptions& options) {
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
    auto r = PutOne(spec, keys.subspan(start, n), data.subspan(start * block_bytes, n * block_bytes),
                    options);
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
                                         absl::Span<const uint8_t> data,
                                         const PutOptions& options) {
  grpc::ClientContext context;
  impl_->SetDeadline(&context);
  v1::PutResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer =
      impl_->stub->Put(&context, &response);
  v1::PutRequest message;
  v1::PutHeader* header = message.mutable_header();
  SpecToProto(spec, header->mutable_spec());
  KeysToProto({keys.begin(), keys.end()}, header->mutable_keys());
  if (options.codec.has_value()) CodecToProto(*options.codec, header->mutable_codec());
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

absl::StatusOr<GetResult> Client::Get(const Namespace& ns, absl::Span<const BlockKey> keys,
                                      const GetOptions& options) {
  if (options.device_dst != nullptr && options.server_decode) {
    return absl::InvalidArgumentError("device_dst needs client-side decoding (no server_decode)");
  }
  GetResult total;
  GetOptions batch_options = options;
  bool prefix_open = true;
  for (size_t start = 0; start < keys.size() || start == 0;
       start += impl_->options.max_keys_per_call) {
    auto r = GetOne(ns, keys.subspan(start, impl_->options.max_keys_per_call), batch_options,
                    keys.size() <= impl_->options.max_keys_per_call);
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
    total.wire_bytes += r->wire_bytes;
    if (batch_options.device_dst != nullptr) {  // The next batch continues after these blocks.
      const uint64_t used =
          std::count(r->found.begin(), r->found.end(), true) * r->block_bytes;
      batch_options.device_dst = static_cast<char*>(batch_options.device_dst) + used;
      batch_options.device_dst_bytes -= std::min(used, batch_options.device_dst_bytes);
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

absl::StatusOr<GetResult> Client::GetOne(const Namespace& ns, absl::Span<const BlockKey> keys,
                                         const GetOptions& options, bool whole) {
  v1::GetRequest request;
  NamespaceToProto(ns, request.mutable_ns());
  KeysToProto({keys.begin(), keys.end()}, request.mutable_keys());
  request.set_server_decode(options.server_decode);
  request.set_accept_segment_scales(true);
  grpc::ClientContext context;
  impl_->SetDeadline(&context);
  std::unique_ptr<grpc::ClientReader<v1::GetResponse>> reader =
      impl_->stub->Get(&context, request);
  GetResult result;
  v1::GetResponse message;
  v1::GetHeader header;
  bool have_header = false;
  std::string wire;
  while (reader->Read(&message)) {
    if (message.has_header()) {
      header = message.header();
      have_header = true;
      uint64_t expected = 0;
      for (uint64_t n : header.segment_bytes()) expected += n;
      if (!header.encoded()) {
        expected = std::count(header.found().begin(), header.found().end(), true) *
                   header.block_bytes();
      }
      wire.reserve(expected);
    } else {
      wire += message.data();
    }
  }
  if (grpc::Status s = reader->Finish(); !s.ok()) return CallStatus(s, "Get");
  if (!have_header || header.found_size() != static_cast<int>(keys.size())) {
    return absl::DataLossError("Get: the daemon's reply has no valid header");
  }
  result.found.assign(header.found().begin(), header.found().end());
  result.hit_prefix_blocks = header.hit_prefix_blocks();
  result.block_bytes = header.block_bytes();
  result.wire_bytes = wire.size();
  const uint64_t hits = std::count(result.found.begin(), result.found.end(), true);
  if (hits == 0) return result;
  auto spec = SpecFromProto(header.spec());
  if (!spec.ok()) return Annotate(spec.status(), "Get: daemon sent a bad spec");
  result.spec = *spec;
  if (result.block_bytes != spec->BlockBytes()) {
    return absl::DataLossError("Get: block size does not match the spec");
  }
  if (!header.encoded()) {
    if (wire.size() != hits * result.block_bytes) {
      return absl::DataLossError(absl::StrCat("Get: daemon sent ", wire.size(), " bytes for ",
                                              hits, " blocks of ", result.block_bytes, " bytes"));
    }
    result.data = std::move(wire);
    return result;
  }
  KVPOOL_ASSIGN_OR_RETURN(std::vector<float> scales, SegmentScales(header));
  if (options.device_dst != nullptr) {
    if (options.device_dst_bytes < hits * result.block_bytes) {
      return absl::InvalidArgumentError("device_dst is too small for the found blocks");
    }
    KVPOOL_RETURN_IF_ERROR(DecodeBlocksToDevice(*spec, hits, header.segment_bytes(), scales,
                                                wire, static_cast<uint16_t*>(options.device_dst)));
    return result;
  }
  // A whole get's bytes go to the caller; one of several is appended to the others (read).
  const uint64_t from = impl_->options.stream_decoded_gets_from;
  const bool streaming = whole && from > 0 && hits * result.block_bytes >= from;
  KVPOOL_ASSIGN_OR_RETURN(
      result.data, DecodeBlocks(*spec, hits, header.segment_bytes(), scales, wire, streaming));
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
  for (const v1::CodecStats& c : response.codecs()) {
    stats.codecs.push_back({c.codec(), c.segments(), c.logical_bytes(), c.stored_bytes()});
  }
  stats.segments = response.segments();
  stats.segment_refs = response.segment_refs();
  stats.fused_segments = response.fused_segments();
  stats.representatives = response.representatives();
  return stats;
}

}  // namespace kvpool::client
