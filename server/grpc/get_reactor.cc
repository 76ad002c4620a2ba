// Get: a server stream of one header and then data chunks. The reactor takes references to the
// blocks up front (so an eviction meanwhile cannot free them), verifies every segment checksum
// before sending anything, then streams the bytes in chunk_bytes pieces, one write in flight.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_util.h"
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
    if (!NextChunk()) {
      service_->metrics()->AddGet(blocks_.size(), sent_);
      FinishWith(grpc::Status::OK);
      return;
    }
    StartWrite(&message_);
  }

  void OnDone() override {
    service_->Observe("Get", start_, final_status_);
    service_->CallDone();
    delete this;
  }

 private:
  void FinishWith(const grpc::Status& status) {
    final_status_ = status;
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
    SpecToProto(ns->second, header->mutable_spec());
    header->set_block_bytes(ns->second.BlockBytes());
    header->set_hit_prefix_blocks(prefix);
    for (StoredBlockPtr& block : found) {
      header->add_found(block != nullptr);
      if (block != nullptr) blocks_.push_back(std::move(block));
    }
    return absl::OkStatus();
  }

  // Fills message_ with the next data chunk; false when everything was sent.
  bool NextChunk() {
    const uint64_t chunk = service_->options().chunk_bytes;
    std::string* data = message_.mutable_data();
    data->clear();
    while (block_index_ < blocks_.size() && data->size() < chunk) {
      const StoredBlock& block = *blocks_[block_index_];
      const uint64_t n = std::min<uint64_t>(chunk - data->size(), block.size() - block_offset_);
      data->append(reinterpret_cast<const char*>(block.data()) + block_offset_, n);
      block_offset_ += n;
      if (block_offset_ == block.size()) {
        ++block_index_;
        block_offset_ = 0;
      }
    }
    sent_ += data->size();
    return !data->empty();
  }

  KvPoolService* const service_;
  const absl::Time start_;
  v1::GetResponse message_;
  std::vector<StoredBlockPtr> blocks_;
  size_t block_index_ = 0;
  uint64_t block_offset_ = 0;
  uint64_t sent_ = 0;
  grpc::Status final_status_;
};

}  // namespace

grpc::ServerWriteReactor<v1::GetResponse>* NewGetReactor(KvPoolService* service,
                                                         const v1::GetRequest* request) {
  return new GetReactor(service, request);
}

}  // namespace kvpool::server
