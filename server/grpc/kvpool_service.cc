#include "server/grpc/kvpool_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/kv_spec.h"
#include "common/status_util.h"
#include "proto/convert.h"

namespace kvpool::server {

KvPoolService::KvPoolService(const ServiceOptions& options, BlockStore* store, Metrics* metrics,
                             Executor* codec_executor)
    : options_(options), store_(store), metrics_(metrics), codec_executor_(codec_executor) {
  PublishStoreState();
}

absl::StatusOr<std::vector<BlockKey>> KvPoolService::ParseKeys(
    const google::protobuf::RepeatedPtrField<std::string>& keys) const {
  if (keys.empty()) return absl::InvalidArgumentError("no keys given");
  if (static_cast<uint64_t>(keys.size()) > options_.max_keys_per_request) {
    return absl::InvalidArgumentError(absl::StrCat(
        keys.size(), " keys exceed the limit of ", options_.max_keys_per_request, " per request"));
  }
  return KeysFromProto(keys);
}

absl::Status KvPoolService::ValidateNamespace(const v1::Namespace& ns) const {
  if (absl::Status s = ValidateModelId(ns.model_id()); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("ns.", s.message()));
  }
  if (ns.tokens_per_block() == 0 || ns.tokens_per_block() > kMaxTokensPerBlock) {
    return absl::InvalidArgumentError(absl::StrCat("ns.tokens_per_block = ", ns.tokens_per_block(),
                                                   " is out of range [1, ", kMaxTokensPerBlock,
                                                   "]"));
  }
  return absl::OkStatus();
}

void KvPoolService::PublishStoreState() const {
  const BlockStore::Stats s = store_->GetStats();
  metrics_->SetStoreState(s.blocks, s.logical_bytes, s.stored_bytes, s.capacity_bytes);
  metrics_->SetFusionState(s.segments, s.segment_refs, s.fused_refs, s.representatives);
  for (int c = 0; c < kNumCodecs; ++c) {
    metrics_->SetCodecState(CodecName(static_cast<CodecId>(c)), s.codecs[c].segments,
                            s.codecs[c].logical_bytes, s.codecs[c].stored_bytes);
  }
  metrics_->SetPlanCounts(plan_counts_->planned.load(std::memory_order_relaxed),
                          plan_counts_->reused.load(std::memory_order_relaxed),
                          plan_counts_->replaced.load(std::memory_order_relaxed));
  metrics_->SetPlanCacheBytes(
      uint64_t(std::max<int64_t>(0, plan_counts_->plan_bytes.load(std::memory_order_relaxed))));
}

std::shared_ptr<kernels::BlockPlans> KvPoolService::PlansFor(const KvSpec& spec, const CodecParams& codec) {
  if (options_.plan_reuse <= 1 || !kernels::CodecPlansFromSamples(codec)) return nullptr;
  const std::string key =
      absl::StrCat(spec.model_id, "/", spec.tokens_per_block, "/", codec.budget, "/", codec.flags);
  absl::MutexLock lock(&plans_mu_);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    if (plans_.size() >= kMaxPlanSets) {
      auto oldest = plans_.begin();
      for (auto i = plans_.begin(); i != plans_.end(); ++i) {
        if (i->second.last_use < oldest->second.last_use) oldest = i;
      }
      plans_.erase(oldest);  // Puts holding it keep it until they finish.
    }
    it = plans_.emplace(key, PlanSet{}).first;
  }
  PlanSet& set = it->second;
  if (!set.plans || set.plans->segments() != spec.SegmentsPerBlock()) {
    set.plans =
        std::make_shared<kernels::BlockPlans>(spec.SegmentsPerBlock(), options_.plan_reuse, plan_counts_);
  }
  set.last_use = ++plan_uses_;
  return set.plans;
}

void KvPoolService::Observe(absl::string_view method, absl::Time start,
                            const grpc::Status& status) const {
  metrics_->ObserveRequest(method, status.error_code(),
                           absl::ToDoubleSeconds(absl::Now() - start));
}

namespace {

// A unary reactor that tells the service when the call is fully done.
class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryReactor(KvPoolService* service) : service_(service) {}
  void OnDone() override {
    service_->CallDone();
    delete this;
  }

 private:
  KvPoolService* const service_;
};

}  // namespace

void KvPoolService::CallStarted() {
  absl::MutexLock lock(&inflight_mu_);
  metrics_->SetCallsInFlight(++inflight_);
}

void KvPoolService::CallDone() {
  absl::MutexLock lock(&inflight_mu_);
  metrics_->SetCallsInFlight(--inflight_);
}

bool KvPoolService::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&inflight_mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(inflight_mu_) { return inflight_ == 0; };
  return inflight_mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

grpc::ServerUnaryReactor* KvPoolService::Lookup(grpc::CallbackServerContext* context,
                                                const v1::LookupRequest* request,
                                                v1::LookupResponse* response) {
  const absl::Time start = absl::Now();
  CallStarted();
  auto run = [&]() -> absl::Status {
    if (absl::Status s = ValidateNamespace(request->ns()); !s.ok()) return s;
    auto keys = ParseKeys(request->keys());
    if (!keys.ok()) return keys.status();
    std::vector<bool> present(keys->size(), false);
    if (auto ns = store_->FindNamespace(request->ns().model_id(),
                                        request->ns().tokens_per_block())) {
      present = store_->Contains(ns->first, *keys);
    }
    uint32_t prefix = 0;
    while (prefix < present.size() && present[prefix]) ++prefix;
    uint64_t hits = 0;
    for (bool p : present) {
      response->add_present(p);
      hits += p;
    }
    response->set_hit_prefix_blocks(prefix);
    response->set_tokens_per_block(request->ns().tokens_per_block());
    lookup_hits_ += hits;
    lookup_misses_ += present.size() - hits;
    metrics_->AddLookups(hits, present.size() - hits);
    return absl::OkStatus();
  };
  const grpc::Status status = ToGrpcStatus(run());
  Observe("Lookup", start, status);
  auto* reactor = new UnaryReactor(this);
  reactor->Finish(status);
  return reactor;
}

grpc::ServerReadReactor<v1::PutRequest>* KvPoolService::Put(grpc::CallbackServerContext* context,
                                                            v1::PutResponse* response) {
  return NewPutReactor(this, response);
}

grpc::ServerWriteReactor<v1::GetResponse>* KvPoolService::Get(grpc::CallbackServerContext* context,
                                                              const v1::GetRequest* request) {
  return NewGetReactor(this, request);
}

grpc::ServerUnaryReactor* KvPoolService::Delete(grpc::CallbackServerContext* context,
                                                const v1::DeleteRequest* request,
                                                v1::DeleteResponse* response) {
  const absl::Time start = absl::Now();
  CallStarted();
  auto run = [&]() -> absl::Status {
    if (absl::Status s = ValidateNamespace(request->ns()); !s.ok()) return s;
    auto keys = ParseKeys(request->keys());
    if (!keys.ok()) return keys.status();
    uint32_t deleted = 0;
    if (auto ns = store_->FindNamespace(request->ns().model_id(),
                                        request->ns().tokens_per_block())) {
      deleted = store_->Delete(ns->first, *keys);
    }
    response->set_blocks_deleted(deleted);
    metrics_->AddDeletes(deleted);
    PublishStoreState();
    return absl::OkStatus();
  };
  const grpc::Status status = ToGrpcStatus(run());
  Observe("Delete", start, status);
  auto* reactor = new UnaryReactor(this);
  reactor->Finish(status);
  return reactor;
}

grpc::ServerUnaryReactor* KvPoolService::Stats(grpc::CallbackServerContext* context,
                                               const v1::StatsRequest* request,
                                               v1::StatsResponse* response) {
  const absl::Time start = absl::Now();
  CallStarted();
  const BlockStore::Stats s = store_->GetStats();
  response->set_blocks(s.blocks);
  response->set_logical_bytes(s.logical_bytes);
  response->set_stored_bytes(s.stored_bytes);
  response->set_capacity_bytes(s.capacity_bytes);
  response->set_evictions(s.evictions);
  response->set_lookup_hits(lookup_hits_.load());
  response->set_lookup_misses(lookup_misses_.load());
  response->set_namespaces(s.namespaces);
  response->set_version(KVPOOL_VERSION);
  response->set_segments(s.segments);
  response->set_segment_refs(s.segment_refs);
  response->set_fused_segments(s.fused_refs);
  response->set_representatives(s.representatives);
  for (int c = 0; c < kNumCodecs; ++c) {
    if (s.codecs[c].segments == 0) continue;
    v1::CodecStats* cs = response->add_codecs();
    cs->set_codec(std::string(CodecName(static_cast<CodecId>(c))));
    cs->set_segments(s.codecs[c].segments);
    cs->set_logical_bytes(s.codecs[c].logical_bytes);
    cs->set_stored_bytes(s.codecs[c].stored_bytes);
  }
  Observe("Stats", start, grpc::Status::OK);
  auto* reactor = new UnaryReactor(this);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvpool::server
