// Get: a server stream of one header and then data chunks. The reactor takes references to the
// blocks up front (so an eviction meanwhile cannot free them), verifies every segment checksum
// before sending anything, then streams in chunk_bytes pieces, one write in flight: the encoded
// segments as stored (the client decodes and applies each segment's scale), or with
// server_decode each block decoded to its canonical bytes (also when the block uses fused
// segments and the client did not say it applies scales). Decoding runs on the service's codec executor, one block at a time between
// writes (no write is in flight while a decode is), and the decode task continues the stream
// itself, so no gRPC callback thread decodes.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_util.h"
#include "kernels/codec.h"
#include "kernels/fusion.h"
#include "proto/convert.h"
#include "server/grpc/kvpool_service.h"

namespace kvpool::server {
namespace {

class GetReactor final : public grpc::ServerWriteReactor<v1::GetResponse> {
 public:
  GetReactor(KvPoolService* service, const v1::GetRequest* request)
      : service_(service), start_(absl::Now()) {
    service_->CallStarted();
    if (absl::Status s = Prepare(*request); !s.ok()) {
      FinishWith(ToGrpcStatus(s));
      return;
    }
    StartWrite(&message_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "client stopped reading"));
      return;
    }
    if (server_decode_ && block_index_ < blocks_.size() && decoded_index_ != block_index_) {
      // The next block must be decoded first: off this thread. The task continues the stream
      // and must be the reactor's last user until its StartWrite or Finish.
      service_->codec_executor()->Schedule([this] {
        absl::Status s = DecodeBlock(block_index_);
        if (!s.ok()) {
          FinishWith(ToGrpcStatus(s));
          return;
        }
        WriteNext();
      });
      return;
    }
    WriteNext();
  }

  // Sends the next chunk, or finishes when everything was sent.
  void WriteNext() {
    absl::StatusOr<bool> more = NextChunk();
    if (!more.ok()) {
      FinishWith(ToGrpcStatus(more.status()));
      return;
    }
    if (!*more) {
      service_->metrics()->AddGet(blocks_.size(), sent_);
      FinishWith(grpc::Status::OK);
      return;
    }
    StartWrite(&message_);
  }

  void OnDone() override {
    service_->CallDone();
    delete this;
  }

 private:
  void FinishWith(const grpc::Status& status) {
    final_status_ = status;
    // Observed before Finish, as the unary calls are, so that a scrape made after the client
    // has its status counts the call.
    service_->Observe("Get", start_, final_status_);
    blocks_.clear();
    Finish(status);
  }

  // Validates, takes the blocks, verifies them and fills message_ with the header.
  absl::Status Prepare(const v1::GetRequest& request) {
    if (absl::Status s = service_->ValidateNamespace(request.ns()); !s.ok()) return s;
    auto keys = service_->ParseKeys(request.keys());
    if (!keys.ok()) return keys.status();
    v1::GetHeader* header = message_.mutable_header();
    auto ns = service_->store()->FindNamespace(request.ns().model_id(),
                                               request.ns().tokens_per_block());
    if (!ns.has_value()) {
      for (size_t i = 0; i < keys->size(); ++i) header->add_found(false);
      return absl::OkStatus();
    }
    std::vector<StoredBlockPtr> found = service_->store()->Get(ns->first, *keys);
    for (size_t i = 0; i < found.size(); ++i) {
      if (found[i] == nullptr) continue;
      if (absl::Status s = found[i]->Verify(); !s.ok()) {
        service_->store()->Drop(ns->first, (*keys)[i], found[i].get());
        service_->metrics()->AddChecksumFailure();
        service_->PublishStoreState();
        return absl::DataLossError(absl::StrCat("block keys[", i, "]: ", s.message()));
      }
    }
    uint32_t prefix = 0;
    while (prefix < found.size() && found[prefix] != nullptr) ++prefix;
    spec_ = ns->second;
    // A client that cannot apply scales gets fused blocks decoded here, never wrong values.
    server_decode_ = request.server_decode();
    bool any_scaled = false;
    for (const StoredBlockPtr& block : found) any_scaled = any_scaled || (block && block->scaled());
    if (any_scaled && !request.accept_segment_scales()) server_decode_ = true;
    SpecToProto(spec_, header->mutable_spec());
    header->set_block_bytes(spec_.BlockBytes());
    header->set_hit_prefix_blocks(prefix);
    header->set_encoded(!server_decode_);
    for (StoredBlockPtr& block : found) {
      header->add_found(block != nullptr);
      if (block == nullptr) continue;
      if (!server_decode_) {
        for (size_t s = 0; s < block->num_segments(); ++s) {
          header->add_segment_bytes(block->segment(s).size());
          if (any_scaled) header->add_segment_scales(block->scale(s));
        }
      }
      blocks_.push_back(std::move(block));
    }
    return absl::OkStatus();
  }

  // Decodes block i into decoded_ (on the codec executor).
  absl::Status DecodeBlock(size_t i) {
    const StoredBlock& block = *blocks_[i];
    SegmentShape shape{spec_.tokens_per_block, spec_.num_kv_heads, spec_.head_dim, spec_.dtype};
    const uint64_t elements = shape.Elements();
    decoded_.resize(spec_.BlockBytes() / 2);
    for (size_t s = 0; s < block.num_segments(); ++s) {
      shape.kind = s % 2 == 0 ? SegmentKind::kKey : SegmentKind::kValue;
      absl::Span<uint16_t> out(decoded_.data() + s * elements, elements);
      absl::Status st = kernels::DecodeSegment(block.segment(s), out, kernels::Path::kCpu, &shape);
      if (!st.ok()) return st;
      kernels::ScaleElements(spec_.dtype, out, block.scale(s), kernels::Path::kCpu);
    }
    decoded_index_ = i;
    return absl::OkStatus();
  }

  // The bytes of block i as sent: its segments back to back, or the decoded block.
  // REQUIRES: with server_decode, DecodeBlock(i) ran.
  absl::StatusOr<absl::string_view> BlockBytes(size_t i, size_t segment) {
    if (!server_decode_) return blocks_[i]->segment(segment);
    if (decoded_index_ != i) return absl::InternalError("Get: block not decoded yet");
    return absl::string_view(reinterpret_cast<const char*>(decoded_.data()), spec_.BlockBytes());
  }

  // Fills message_ with the next data chunk; false when everything was sent.
  absl::StatusOr<bool> NextChunk() {
    const uint64_t chunk = service_->options().chunk_bytes;
    std::string* data = message_.mutable_data();
    data->clear();
    while (block_index_ < blocks_.size() && data->size() < chunk) {
      // Decoded blocks: a chunk ends where a block not yet decoded starts (OnWriteDone decodes).
      if (server_decode_ && decoded_index_ != block_index_) break;
      auto piece = BlockBytes(block_index_, segment_index_);
      if (!piece.ok()) return piece.status();
      const uint64_t n = std::min<uint64_t>(chunk - data->size(), piece->size() - offset_);
      data->append(piece->data() + offset_, n);
      offset_ += n;
      if (offset_ == piece->size()) {
        offset_ = 0;
        // Encoded: next segment of the block; decoded: the whole block was one piece.
        if (!server_decode_ && ++segment_index_ < blocks_[block_index_]->num_segments()) {
          continue;
        }
        segment_index_ = 0;
        ++block_index_;
      }
    }
    sent_ += data->size();
    return !data->empty();
  }

  KvPoolService* const service_;
  const absl::Time start_;
  v1::GetResponse message_;
  std::vector<StoredBlockPtr> blocks_;
  KvSpec spec_;
  bool server_decode_ = false;
  size_t block_index_ = 0;
  size_t segment_index_ = 0;
  uint64_t offset_ = 0;  // Within the current piece (segment, or decoded block).
  std::vector<uint16_t> decoded_;
  size_t decoded_index_ = SIZE_MAX;
  uint64_t sent_ = 0;
  grpc::Status final_status_;
};

}  // namespace

grpc::ServerWriteReactor<v1::GetResponse>* NewGetReactor(KvPoolService* service,
                                                         const v1::GetRequest* request) {
  return new GetReactor(service, request);
}

}  // namespace kvpool::server
