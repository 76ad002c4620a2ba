// Put: a client stream of one header and then data chunks. Bytes gather into a block buffer;
// each complete block is encoded into its segments (one per layer and K/V) with the put's
// codec. The blocks enter the store only when the stream ends with exactly the announced
// number of bytes, so a failed put changes nothing.
//
// Encoding runs on the service's encoder executor, never on gRPC's callback threads: each block
// is handed over as soon as its last byte arrived, so the blocks of one put encode in parallel
// while the rest streams in (with online fusion, each block also searches the fusion index;
// server/store/fuser.h). With batch fusion the blocks are kept until the stream ended and the
// whole put is encoded in one executor task, which then commits. The reactor finishes once the stream has ended and no encode is
// pending; whichever thread sees that last calls Finish as its final action, so nothing touches
// the reactor after Finish (OnDone may delete it at once).
#include <algorithm>
#include <cstring>
#include <memory>

#include "absl/synchronization/mutex.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_util.h"
#include "kernels/codec.h"
#include "proto/convert.h"
#include "server/grpc/kvpool_service.h"

namespace kvpool::server {
namespace {

class PutReactor final : public grpc::ServerReadReactor<v1::PutRequest> {
 public:
  PutReactor(KvPoolService* service, v1::PutResponse* response)
      : service_(service), response_(response), start_(absl::Now()) {
    service_->CallStarted();
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    absl::Status status = ok ? Consume() : absl::OkStatus();
    if (ok && status.ok()) {
      StartRead(&request_);
      return;
    }
    // The client half-closed (or the call was cancelled), or its data was bad: no more reads.
    bool finish_now;
    {
      absl::MutexLock lock(&mu_);
      if (!status.ok() && error_.ok()) error_ = status;
      stream_done_ = true;
      finish_now = pending_ == 0;
    }
    if (finish_now) Complete();
  }

  void OnDone() override {
    service_->CallDone();
    delete this;
  }

 private:
  // Called when the stream is over and every encode is done: commit or report the error. With
  // batch fusion, the first call hands the whole put to the executor, whose task calls again.
  void Complete() {
    absl::Status error;
    {
      absl::MutexLock lock(&mu_);
      error = error_;
    }
    if (error.ok() && batch() && !batch_encoded_ && have_header_ && received_ == expected_bytes_) {
      batch_encoded_ = true;
      service_->codec_executor()->Schedule([this] {
        std::vector<absl::Span<const uint16_t>> views;
        const uint64_t n = spec_.BlockBytes() / 2;
        for (const auto& b : batch_buffers_) views.push_back({b.get(), n});
        auto blocks = EncodeBatch(Context(), views);
        batch_buffers_.clear();
        if (!blocks.ok()) {
          FinishWith(Annotate(blocks.status(), "batch fusion"));
          return;
        }
        blocks_ = std::move(*blocks);
        Complete();  // Last action.
      });
      return;
    }
    FinishWith(error.ok() ? Commit() : error);
  }

  bool batch() const { return fusion_.mode == FusionOptions::Mode::kBatch; }

  EncodeContext Context() const {
    EncodeContext c{spec_, codec_, fusion_, kernels::Path::kCpu};
    c.device = service_->options().gpu_encode;
    c.device_any_profile = service_->options().gpu_encode_policy == GpuEncode::kAlways;
    c.plans = plans_;
    return c;
  }

  void FinishWith(const absl::Status& status) {
    final_status_ = ToGrpcStatus(status);
    // Observed before Finish, as the unary calls are, so that a scrape made after the client
    // has its status counts the call.
    service_->Observe("Put", start_, final_status_);
    blocks_.clear();  // Release memory now, not when the client acknowledges.
    batch_buffers_.clear();
    Finish(final_status_);
  }

  absl::Status Consume() {
    if (request_.has_header()) return ConsumeHeader(request_.header());
    if (!have_header_) {
      return absl::InvalidArgumentError("the first Put message must be a header");
    }
    if (request_.msg_case() != v1::PutRequest::kData) {
      return absl::InvalidArgumentError("Put message has neither header nor data");
    }
    return ConsumeData(request_.data());
  }

  absl::Status ConsumeHeader(const v1::PutHeader& header) {
    if (have_header_) return absl::InvalidArgumentError("Put stream has a second header");
    have_header_ = true;
    auto spec = SpecFromProto(header.spec());
    if (!spec.ok()) return spec.status();
    spec_ = *spec;
    absl::StatusOr<CodecParams> codec = CodecFromProto(header.codec());
    if (absl::IsNotFound(codec.status())) {
      codec = service_->options().codecs.For(spec_.model_id);
    }
    if (!codec.ok()) return codec.status();
    codec = kernels::NormalizeParams(*codec);
    if (!codec.ok()) return Annotate(codec.status(), "codec");
    codec_ = *codec;
    fusion_ = service_->options().fusion.For(spec_.model_id);
    auto keys = service_->ParseKeys(header.keys());
    if (!keys.ok()) return keys.status();
    keys_ = std::move(*keys);
    expected_bytes_ = keys_.size() * spec_.BlockBytes();
    if (expected_bytes_ > service_->options().max_request_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("put of ", keys_.size(), " blocks x ", spec_.BlockBytes(), " bytes = ",
                       expected_bytes_, " bytes exceeds the request limit of ",
                       service_->options().max_request_bytes, " bytes"));
    }
    // Fail fast on a shape conflict; Commit checks again under the store's lock.
    if (auto ns = service_->store()->FindNamespace(spec_.model_id, spec_.tokens_per_block)) {
      if (ns->second != spec_) {
        return absl::InvalidArgumentError(
            absl::StrCat("spec {", spec_.DebugString(), "} conflicts with the registered spec {",
                         ns->second.DebugString(), "} of this model and block size"));
      }
    }
    blocks_.resize(keys_.size());
    plans_ = service_->PlansFor(spec_, codec_);
    return absl::OkStatus();
  }

  absl::Status ConsumeData(const std::string& data) {
    if (received_ + data.size() > expected_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "put sends more than the ", expected_bytes_, " bytes its header announced (",
          keys_.size(), " blocks x ", spec_.BlockBytes(), " bytes)"));
    }
    const uint64_t block_bytes = spec_.BlockBytes();
    size_t pos = 0;
    while (pos < data.size()) {
      const uint64_t offset_in_block = received_ % block_bytes;
      // A fresh buffer per block (uninitialised: every byte is written before it is read): the
      // previous one went to the encoder.
      if (offset_in_block == 0) buffer_ = std::shared_ptr<uint16_t[]>(new uint16_t[block_bytes / 2]);
      const size_t n = std::min<uint64_t>(data.size() - pos, block_bytes - offset_in_block);
      std::memcpy(reinterpret_cast<char*>(buffer_.get()) + offset_in_block, data.data() + pos, n);
      pos += n;
      received_ += n;
      if (received_ % block_bytes == 0) ScheduleEncode(received_ / block_bytes - 1);
    }
    return absl::OkStatus();
  }

  // Hands the complete block in buffer_ to the encoder executor as blocks_[index] (batch
  // fusion: keeps it for the batch).
  void ScheduleEncode(uint64_t index) {
    if (batch()) {
      batch_buffers_.push_back(std::move(buffer_));
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      ++pending_;
    }
    std::shared_ptr<uint16_t[]> data = std::move(buffer_);
    service_->codec_executor()->Schedule([this, index, data] {
      absl::StatusOr<std::shared_ptr<StoredBlock>> block =
          EncodeOne({data.get(), static_cast<size_t>(spec_.BlockBytes() / 2)});
      bool finish_now;
      {
        absl::MutexLock lock(&mu_);
        if (block.ok()) {
          blocks_[index] = std::move(*block);
        } else if (error_.ok()) {
          error_ = block.status();
        }
        finish_now = --pending_ == 0 && stream_done_;
      }
      if (finish_now) Complete();  // Last action: the reactor may be gone after this.
    });
  }

  // Encodes one block into its 2 * layers segments, with online fusion when configured: on the
  // GPU when the daemon has one (sketches and checks when their kernels passed their self-check,
  // encodes when the codec has a CUDA encoder), else on the fast CPU path. Runs on the encoder
  // executor.
  absl::StatusOr<std::shared_ptr<StoredBlock>> EncodeOne(absl::Span<const uint16_t> buffer) const {
    if (fusion_.mode != FusionOptions::Mode::kOnline) {
      return EncodeBlock(Context(), nullptr, std::nullopt, buffer);
    }
    std::optional<NamespaceId> ns;
    if (auto found = service_->store()->FindNamespace(spec_.model_id, spec_.tokens_per_block)) {
      ns = found->first;
    }
    return EncodeBlock(Context(), service_->store(), ns, buffer);
  }

  absl::Status Commit() {
    if (!have_header_) return absl::InvalidArgumentError("Put stream ended without a header");
    if (received_ != expected_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat("put ended after ", received_, " of the ",
                                                     expected_bytes_, " announced bytes"));
    }
    auto ns = service_->store()->RegisterNamespace(spec_);
    if (!ns.ok()) return ns.status();
    auto result = service_->store()->Insert(*ns, keys_, std::move(blocks_));
    if (!result.ok()) return result.status();
    response_->set_blocks_stored(result->stored);
    response_->set_blocks_already_present(result->already_present);
    response_->set_bytes_received(received_);
    response_->set_blocks_evicted(result->evicted);
    Metrics* m = service_->metrics();
    m->AddPut(keys_.size(), received_);
    m->AddEvictions(result->evicted, result->evicted_bytes);
    service_->PublishStoreState();
    return absl::OkStatus();
  }

  KvPoolService* const service_;
  v1::PutResponse* const response_;
  const absl::Time start_;
  v1::PutRequest request_;
  bool have_header_ = false;
  KvSpec spec_;
  std::vector<BlockKey> keys_;
  uint64_t expected_bytes_ = 0;
  uint64_t received_ = 0;
  CodecParams codec_;
  std::shared_ptr<uint16_t[]> buffer_;  // The block being received (elements of spec_.dtype).
  std::vector<std::shared_ptr<StoredBlock>> blocks_;  // Filled by the encodes, one per key.
  FusionOptions fusion_;
  std::shared_ptr<kernels::BlockPlans> plans_;  // The model's plan caches, or null.
  std::vector<std::shared_ptr<uint16_t[]>> batch_buffers_;  // Batch fusion: the put's blocks.
  bool batch_encoded_ = false;  // Batch fusion: the put was handed to the encoder.
  absl::Mutex mu_;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;      // Encodes scheduled and not yet done.
  bool stream_done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);   // First error of the data or an encode.
  grpc::Status final_status_;
};

}  // namespace

grpc::ServerReadReactor<v1::PutRequest>* NewPutReactor(KvPoolService* service,
                                                       v1::PutResponse* response) {
  return new PutReactor(service, response);
}

}  // namespace kvpool::server
