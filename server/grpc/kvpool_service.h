// KvPoolService: the kvpool.v1.KvPool gRPC service on the callback API. Unary calls (Lookup,
// Delete, Stats) finish inline; Put and Get stream through reactors (put_reactor.cc,
// get_reactor.cc). No callback blocks: the work is index lookups and memcpy of host memory.
//
// Every request is validated before it touches the store, and a failing request changes
// nothing: Put commits its blocks only after the last byte arrived and matched the header.
//
// Thread-safe. The store and metrics must outlive the service.
#ifndef KVPOOL_SERVER_GRPC_KVPOOL_SERVICE_H_
#define KVPOOL_SERVER_GRPC_KVPOOL_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/container/flat_hash_map.h"
#include "common/block_key.h"
#include "common/encoded_segment.h"
#include "common/executor.h"
#include "kvpool/v1/kvpool.grpc.pb.h"
#include "server/metrics.h"
#include "server/model_policy.h"
#include "server/store/block_store.h"
#include "server/store/fuser.h"

namespace kvpool::server {

// Which codec stores a model's segments when a put does not say.
using CodecPolicy = PerModel<CodecParams>;

// Which puts the daemon encodes on its GPU (config key gpu_encode), when it has one whose
// kernels passed their self-check.
enum class GpuEncode {
  kAuto,    // kernels::CudaEncoderKeepsProfile: all but kvpool's default and entropy profiles.
  kAlways,  // Every codec with a CUDA encoder (kvpool's default profile as mode 4, untimed;
            // its entropy profile as mode 1).
  kNever,   // None: puts encode and fuse on the CPU.
};

struct ServiceOptions {
  CodecPolicy codecs;
  FusionPolicy fusion;
  GpuEncode gpu_encode_policy = GpuEncode::kAuto;
  bool gpu_encode = false;  // A usable GPU under a policy other than kNever (set by the daemon).
  uint32_t max_keys_per_request = 4096;             // More keys: INVALID_ARGUMENT.
  uint64_t max_request_bytes = uint64_t{1} << 30;   // Larger puts: RESOURCE_EXHAUSTED.
  uint64_t chunk_bytes = uint64_t{1} << 20;         // Data bytes per Get stream message.
  // Segments per kvpool plan in a stream (a model's layer and kind; kernels::PlanCache); 1:
  // every segment planned afresh.
  uint64_t plan_reuse = kernels::PlanCache::kReplanEvery;
};

class KvPoolService final : public v1::KvPool::CallbackService {
 public:
  // `codec_executor` runs put encodes and server-side decodes, off gRPC's callback threads;
  // store, metrics and the executor must outlive the service.
  KvPoolService(const ServiceOptions& options, BlockStore* store, Metrics* metrics,
                Executor* codec_executor);

  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* context,
                                   const v1::LookupRequest* request,
                                   v1::LookupResponse* response) override;
  grpc::ServerReadReactor<v1::PutRequest>* Put(grpc::CallbackServerContext* context,
                                               v1::PutResponse* response) override;
  grpc::ServerWriteReactor<v1::GetResponse>* Get(grpc::CallbackServerContext* context,
                                                 const v1::GetRequest* request) override;
  grpc::ServerUnaryReactor* Delete(grpc::CallbackServerContext* context,
                                   const v1::DeleteRequest* request,
                                   v1::DeleteResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;

  // Shared by the reactors.
  const ServiceOptions& options() const { return options_; }
  BlockStore* store() const { return store_; }
  Metrics* metrics() const { return metrics_; }
  Executor* codec_executor() const { return codec_executor_; }

  // Checks a key count against [1, max_keys_per_request] and parses the keys.
  absl::StatusOr<std::vector<BlockKey>> ParseKeys(
      const google::protobuf::RepeatedPtrField<std::string>& keys) const;

  // Validates a namespace's model id and block size; InvalidArgument naming the field.
  absl::Status ValidateNamespace(const v1::Namespace& ns) const;

  // Pushes the store's current sizes (and the plan caches' counts) into the gauges.
  void PublishStoreState() const;

  // The plan caches of `spec`'s model and block size for puts with `codec` (its budget and
  // flags: a plan fits one budget), made on first use (again when the layer count changes);
  // null when options().plan_reuse is 1 or less or the codec plans nothing (kvpool's default
  // profile alone does). At most kMaxPlanSets are kept, the least recently used dropped.
  std::shared_ptr<kernels::BlockPlans> PlansFor(const KvSpec& spec, const CodecParams& codec);
  static constexpr size_t kMaxPlanSets = 64;

  // Records one finished request (counter by code + latency).
  void Observe(absl::string_view method, absl::Time start, const grpc::Status& status) const;

  // In-flight accounting for draining: every call is counted from its handler's start until its
  // reactor's OnDone (after the status reached gRPC's wire). Thread-safe.
  void CallStarted();
  void CallDone();
  // Blocks until no call is in flight or `deadline` passes; true when idle.
  bool WaitUntilIdle(absl::Time deadline);

 private:
  const ServiceOptions options_;
  BlockStore* const store_;
  Metrics* const metrics_;
  Executor* const codec_executor_;
  absl::Mutex inflight_mu_;
  int inflight_ ABSL_GUARDED_BY(inflight_mu_) = 0;
  struct PlanSet {
    std::shared_ptr<kernels::BlockPlans> plans;
    uint64_t last_use = 0;
  };
  absl::Mutex plans_mu_;
  absl::flat_hash_map<std::string, PlanSet> plans_ ABSL_GUARDED_BY(plans_mu_);
  uint64_t plan_uses_ ABSL_GUARDED_BY(plans_mu_) = 0;
  // Segments coded by outcome, over every plan set ever made (for /metrics).
  const std::shared_ptr<kernels::PlanCache::Counts> plan_counts_ =
      std::make_shared<kernels::PlanCache::Counts>();
  std::atomic<uint64_t> lookup_hits_{0};
  std::atomic<uint64_t> lookup_misses_{0};
};

// Reactors, defined in put_reactor.cc and get_reactor.cc.
grpc::ServerReadReactor<v1::PutRequest>* NewPutReactor(KvPoolService* service,
                                                       v1::PutResponse* response);
grpc::ServerWriteReactor<v1::GetResponse>* NewGetReactor(KvPoolService* service,
                                                         const v1::GetRequest* request);

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_GRPC_KVPOOL_SERVICE_H_
