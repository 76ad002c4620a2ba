// The daemon's Prometheus metrics, named by the Prometheus conventions (kvpool_ prefix, base
// units, _total counters). Served by prometheus-cpp's pull Exposer at /metrics.
// Thread-safe: prometheus-cpp metrics are atomic.
#ifndef KVPOOL_SERVER_METRICS_H_
#define KVPOOL_SERVER_METRICS_H_

#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/status.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvpool::server {

class Metrics {
 public:
  Metrics();

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Per-key lookup results.
  void AddLookups(uint64_t hits, uint64_t misses);
  void AddPut(uint64_t blocks, uint64_t bytes);
  void AddGet(uint64_t blocks, uint64_t bytes);
  void AddEvictions(uint64_t blocks, uint64_t bytes);
  void AddDeletes(uint64_t blocks);
  void AddChecksumFailure();
  // gRPC calls whose handler has started and not yet finished (a drain waits for them).
  void SetCallsInFlight(int calls);

  // One finished RPC: kvpool_requests_total{method,code} and the latency histogram.
  void ObserveRequest(absl::string_view method, grpc::StatusCode code, double seconds);

  // Segments stored per codec, what they decode to and what they occupy; also sets
  // kvpool_compression_ratio{codec} (logical / stored; 0 when nothing is stored).
  void SetCodecState(absl::string_view codec, uint64_t segments, uint64_t logical_bytes,
                     uint64_t stored_bytes);

  // Content-addressed segments and fusion: distinct segments, segment references of the stored
  // blocks, references to fusion representatives, indexed representatives; also sets
  // kvpool_fusion_ratio (references / distinct segments; 0 when nothing is stored).
  void SetFusionState(uint64_t segments, uint64_t segment_refs, uint64_t fused_refs,
                      uint64_t representatives);

  // kvpool segments coded through the daemon's plan caches (kernels::BlockPlans)
  // since start, by kernels::PlanCache::Outcome: totals, of which the counters
  // kvpool_codec_plan_segments_total{outcome="planned"|"reused"|"replaced"} take what is new.
  void SetPlanCounts(uint64_t planned, uint64_t reused, uint64_t replaced);
  // kvpool_codec_plan_cache_bytes: the plans those caches hold now.
  void SetPlanCacheBytes(uint64_t bytes);

  // Current state of the host tier.
  void SetStoreState(uint64_t blocks, uint64_t logical_bytes, uint64_t stored_bytes,
                     uint64_t capacity_bytes);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Counter* lookup_hits_;
  prometheus::Counter* lookup_misses_;
  prometheus::Counter* blocks_put_;
  prometheus::Counter* bytes_put_;
  prometheus::Counter* blocks_got_;
  prometheus::Counter* bytes_got_;
  prometheus::Counter* evictions_;
  prometheus::Counter* evicted_bytes_;
  prometheus::Counter* deletes_;
  prometheus::Counter* checksum_failures_;
  prometheus::Gauge* calls_in_flight_;
  prometheus::Gauge* blocks_;
  prometheus::Gauge* logical_bytes_;
  prometheus::Gauge* stored_bytes_;
  prometheus::Gauge* capacity_bytes_;
  prometheus::Gauge* segments_;
  prometheus::Gauge* segment_refs_;
  prometheus::Gauge* fused_segments_;
  prometheus::Gauge* representatives_;
  prometheus::Gauge* fusion_ratio_;
  prometheus::Family<prometheus::Gauge>* codec_segments_;
  prometheus::Family<prometheus::Gauge>* codec_logical_bytes_;
  prometheus::Family<prometheus::Gauge>* codec_stored_bytes_;
  prometheus::Family<prometheus::Gauge>* compression_ratio_;
  prometheus::Counter* plan_segments_[3];  // By outcome.
  prometheus::Gauge* plan_cache_bytes_;
  absl::Mutex plan_mu_;
  uint64_t plan_seen_[3] ABSL_GUARDED_BY(plan_mu_) = {0, 0, 0};
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* latency_;
};

}  // namespace kvpool::server

#endif  // KVPOOL_SERVER_METRICS_H_
