// The encoder of the kvpool codec's payload mode 4 (kvpool_rows.cc documents the format),
// shared by the reference and the fast CPU path, which differ only in their kernels (the
// sample's conversion: EncodeKernels::load; classes from key elements: FastKernels; the basis
// search and the rows: RowKernels).
//
// Per segment:
//   1. A sample of at most 64 tokens (every s-th): the means per channel (column sums / n,
//      stored as the dtype), the energy, the centred rows and their variance per channel.
//   2. Per head, from the sample (kvpool_rows_plan.cc): the low-rank basis, kept direction by
//      direction while the bits it saves in the residual exceed its own; int8 basis codes; the
//      outlier channels (residual variance above 4x the median, the 32 largest at most), their
//      extra planes E; the head's unit u (the regular channels' rms); the coefficient step.
//   3. The step search on the sample, projected as the full pass will: each row takes the b
//      that minimises b * D + mu * w * err(b) (err from a Gaussian model of its spread, w its
//      token class's weight 2^(k/2)); mu is bisected until the sample's predicted error, scaled
//      to all rows, is kRowsAim of the allowed one.
//   4. The full pass, head after head, kRowBlock rows at a time: project (coefficients, prediction,
//      spread), choose b and j, quantise, append the rows' planes. When the measured error
//      exceeds the budget, mu is solved again from the model scaled by its miss (StepModel) and
//      the pass repeats (at most kRowsPasses, then the segment is stored raw).
// Key segments compute their token classes in the same pass, from their distance to the
// means, with the per-head scale estimated on the sample; their payload carries them for the
// value segment, which takes them as they are (or, without it, from the keys' elements).
//
// With a PlanCache (codec.h), steps 1 to 3 are a RowPlan made once for several segments of a
// stream; a segment reusing it starts from mu = Solve(aim * the last segment's allowed error /
// its error over the model's prediction), and when its first pass misses, it makes a plan of
// its own (steps 1 to 3) and passes again: step 4 never runs with a plan that missed twice.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>

#include "common/status_macros.h"
#include "kernels/kvpool_rows_plan.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

constexpr double kRowsAim = 0.95;     // Aim this fraction of the allowed squared error.
// A PlanCache's reused plans: the aim after a miss and after a hit, and its least.
constexpr double kReuseMissBackoff = 0.92, kReuseHitCreep = 1.005, kReuseAimFloor = 0.6;
constexpr int kRowsPasses = 6;        // Full passes before storing raw.
constexpr uint32_t kSampleRows = 64;  // Tokens sampled for the basis and the step search.

// What the full pass's ChooseFn needs to decide a row.
struct Choice {
  const HeadPlan* head;
  RowRule rule;
  float steps[256];  // RowHalfStep of every meta byte.
  bool key_classes;  // Key segments' classes: ClassOf(dist, head->per_z); else given[i].
  uint8_t given[kRowBlock];
  uint8_t chosen[kRowBlock];  // Out: the rows' classes.
};

uint8_t ChooseRow(void* ctx, uint32_t i, const RowStats& st, float* hs) {
  Choice* c = static_cast<Choice*>(ctx);
  c->chosen[i] = c->key_classes ? ClassOf(double(st.dist), c->head->per_z) : c->given[i];
  const uint8_t meta = ChooseMeta(c->rule, st, c->chosen[i]);
  *hs = c->steps[meta];
  return meta;
}

// Steps 1 to 3 but mu: what a segment's pass needs from its sample. Immutable once made, so
// that the segments of one stream may share it (PlanCache).
struct RowPlan {
  RowPlan() = default;
  RowPlan(const RowPlan&) = delete;
  RowPlan& operator=(const RowPlan&) = delete;

  SegmentShape shape;
  double target = 0;             // TargetError
  bool key_classes = false;      // Keys computing their classes
  std::vector<uint16_t> stored;  // The means as the dtype, and as floats (heads' view.means).
  std::vector<float> means;
  std::vector<HeadPlan> heads;
  std::optional<StepModel> model;  // Over `heads`: a RowPlan is never moved once made.

  // Heap bytes of the plan: itself and its arrays by their capacities (the step model's
  // sorted rows included).
  uint64_t Bytes() const {
    const auto bytes = [](const auto& v) { return uint64_t{v.capacity()} * sizeof(v[0]); };
    uint64_t n = sizeof(*this) + bytes(stored) + bytes(means) + bytes(heads);
    for (const HeadPlan& hp : heads) {
      n += bytes(hp.basis) + bytes(hp.inv_step) + bytes(hp.chunks) + bytes(hp.codes) +
           bytes(hp.pairs) + bytes(hp.is_outlier) + bytes(hp.outlier) + bytes(hp.masks) +
           bytes(hp.model);
    }
    return n + (model ? model->Bytes() : 0);
  }

  bool Fits(const SegmentShape& s, double t, bool k) const {
    return s.tokens == shape.tokens && s.kv_heads == shape.kv_heads &&
           s.head_dim == shape.head_dim && s.dtype == shape.dtype && s.kind == shape.kind &&
           t == target && k == key_classes;
  }
};

// Per thread: buffers of one encode.
struct Scratch {
  Sample sample;
  std::vector<float> sums, sq, km, dist, z;
  std::vector<uint16_t> kstored;
  std::vector<uint8_t> classes, buffer;
  std::vector<int16_t> coefs;     // [H][kMaxRank][T]
  // The plans made here without a PlanCache: never shared beyond one call, so reused as they
  // are (a plan for a cache is a new one, as other threads may go on reading it).
  std::shared_ptr<RowPlan> plan;
};

// The payload's layout: fixed sections, then rows from rows_at, coefficients last.
struct Layout {
  uint64_t class_bytes, metas_at, rows_at, bound;
};

// Bytes the encoder's buffer needs past a payload's bound: a row's stores beyond its own data.
uint64_t StoreRoom(const SegmentShape& shape) {
  return uint64_t{kRowStoreRoom} * PlaneBytes(shape.head_dim);
}

// The layout of a payload whose heads hold `basis` basis codes and `outliers` outlier channels
// in all.
Layout LayoutFor(const SegmentShape& shape, uint64_t basis, uint64_t outliers, bool key_classes) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  Layout l;
  l.class_bytes = key_classes ? (uint64_t{T} * H + 1) / 2 : 0;
  l.metas_at = kHeaderBytes + uint64_t{H} * kRowHeadBytes + 2 * uint64_t{H} * D + basis + outliers +
               l.class_bytes;
  l.rows_at = l.metas_at + uint64_t{T} * H;
  l.bound = l.rows_at + uint64_t{T} * H * kMaxPlanes * (PlaneBytes(D) + 4) +
            uint64_t{H} * kMaxRank * kMaxCoefWidth * PlaneBytes(T);
  return l;
}

Layout PayloadLayout(const SegmentShape& shape, const std::vector<HeadPlan>& heads,
                     bool key_classes) {
  uint64_t basis = 0, outliers = 0;
  for (const HeadPlan& hp : heads) {
    basis += uint64_t{hp.view.rank} * shape.head_dim;
    outliers += 2 * uint64_t{hp.view.outliers};
  }
  return LayoutFor(shape, basis, outliers, key_classes);
}

// Header, means, basis codes and outlier channels (head entries come last, with the widths).
void WriteFixedSections(const SegmentShape& shape, const RowPlan& s, bool key_classes,
                        const Layout& l, uint8_t* dst) {
  const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
  std::memset(dst, 0, l.rows_at);
  dst[0] = kModeRows;
  dst[1] = key_classes ? kHeadClasses : 0;
  uint64_t at = kHeaderBytes + uint64_t{shape.kv_heads} * kRowHeadBytes;
  for (uint64_t c = 0; c < HD; ++c, at += 2) {
    dst[at] = uint8_t(s.stored[c]);
    dst[at + 1] = uint8_t(s.stored[c] >> 8);
  }
  for (const HeadPlan& hp : s.heads) {
    std::memcpy(dst + at, hp.codes.data(), hp.codes.size());
    at += hp.codes.size();
  }
  for (const HeadPlan& hp : s.heads)
    for (uint32_t d : hp.outlier) {
      dst[at++] = uint8_t(d);
      dst[at++] = uint8_t(d >> 8);
    }
}

// The CPU's full pass (RowsPass): head after head, kRowBlock rows at a time through the row
// kernels, the planes appended at `rows`.
class CpuRowsPass final : public RowsPass {
 public:
  CpuRowsPass(const SegmentShape& shape, const uint16_t* in, const RowKernels& rk)
      : shape_(shape), in_(in), rk_(rk) {}

  absl::Status Run(const std::vector<HeadPlan>& heads, double mu, bool key_classes,
                   const std::vector<uint8_t>& given, uint8_t* classes, uint8_t* metas,
                   int16_t* coefs, uint8_t* rows, PassResult* res) override {
    const uint32_t T = shape_.tokens, H = shape_.kv_heads, D = shape_.head_dim;
    if (key_classes) std::memset(classes, 0, (uint64_t{T} * H + 1) / 2);
    *res = PassResult{};
    Choice choice{};
    choice.key_classes = key_classes;
    for (uint32_t h = 0; h < H; ++h) {
      const HeadPlan& hp = heads[h];
      choice.head = &hp;
      MakeRowRule(hp, mu, &choice.rule);
      for (uint32_t m = 0; m < 256; ++m) choice.steps[m] = RowHalfStep(hp.unit, uint8_t(m));
      for (uint32_t t = 0; t < T; t += kRowBlock) {
        const uint32_t n = std::min(kRowBlock, T - t);
        const uint16_t* x[kRowBlock];
        for (uint32_t i = 0; i < n; ++i) {
          x[i] = in_ + (uint64_t{t + i} * H + h) * D;
          choice.given[i] = given.empty() ? 0 : given[uint64_t{t + i} * H + h];
        }
        // Rows of one head lie H * D elements apart: prefetch the next block's.
        for (uint32_t i = t + kRowBlock; i < std::min(T, t + 2 * kRowBlock); ++i) {
          const char* ahead = reinterpret_cast<const char*>(in_ + (uint64_t{i} * H + h) * D);
          for (uint64_t b = 0; b < 2 * uint64_t{D}; b += 64) __builtin_prefetch(ahead + b);
        }
        RowStats st[kRowBlock];
        int16_t c[kRowBlock * kMaxRank];
        uint8_t meta[kRowBlock];
        float err[kRowBlock];
        if (!rk_.encode(hp.view, shape_.dtype, x, n, c, &ChooseRow, &choice, rows + res->rows_bytes,
                        st, meta, err)) {
          res->finite = false;
          return absl::OkStatus();
        }
        for (uint32_t i = 0; i < n; ++i) {
          for (uint32_t j = 0; j < hp.view.rank; ++j) {
            coefs[(uint64_t{h} * kMaxRank + j) * T + t + i] = c[i * kMaxRank + j];
          }
          const uint64_t k = uint64_t{t + i} * H + h;  // Class map nibble.
          if (key_classes) classes[k / 2] |= uint8_t(choice.chosen[i] << (4 * (k & 1)));
          metas[uint64_t{h} * T + t + i] = meta[i];
          res->err += err[i];
          res->energy += st[i].energy;
          res->rows_bytes += RowBytesOf(hp.view, meta[i]);
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  const SegmentShape shape_;
  const uint16_t* const in_;
  const RowKernels& rk_;
};

// The head entries and the coefficient planes after the rows (from `size`); the payload's
// size, or 0 when it would pass `bound`.
uint64_t FinishPayload(const SegmentShape& shape, const RowKernels& rk, const RowPlan& plan,
                       const Scratch& s, uint64_t size, uint64_t bound, uint8_t* dst) {
  const uint32_t T = shape.tokens;
  for (uint32_t h = 0; h < shape.kv_heads; ++h) {
    const RowHead& v = plan.heads[h].view;
    uint8_t* e = dst + kHeaderBytes + uint64_t{h} * kRowHeadBytes;
    e[0] = uint8_t(v.rank);
    e[1] = uint8_t(v.outliers);
    e[2] = uint8_t(v.extra);
    std::memcpy(e + 4, &plan.heads[h].unit, 4);
    std::memcpy(e + 8, &v.lr_scale, 4);
    for (uint32_t j = 0; j < v.rank; ++j) {
      const int16_t* codes = &s.coefs[(uint64_t{h} * kMaxRank + j) * T];
      int32_t lo = 0, hi = 0;
      for (uint32_t t = 0; t < T; ++t) {
        lo = std::min<int32_t>(lo, codes[t]);
        hi = std::max<int32_t>(hi, codes[t]);
      }
      uint32_t width = 0;  // The fewest bits holding [lo, hi] as c + 2^(width - 1).
      while ((width == 0 && (lo | hi) != 0) ||
             (width > 0 && (lo < -(1 << (width - 1)) || hi > (1 << (width - 1)) - 1))) {
        ++width;
      }
      e[12 + j / 2] |= uint8_t(width << (4 * (j & 1)));
      if (size + uint64_t{width} * PlaneBytes(T) > bound) return 0;
      if (width > 0) rk.planes(codes, T, width, dst + size);
      size += width * PlaneBytes(T);
    }
  }
  return size;
}

// Values' token classes: from their keys' payload, else from the keys' elements; none for
// keys (the pass computes theirs) or when tokens are weighted equally.
void ValueClasses(const SegmentShape& shape, const LayerKeys& keys, const FastKernels& fast,
                  bool weighted, Scratch* s) {
  s->classes.clear();
  if (!weighted || shape.kind != SegmentKind::kValue) return;
  if (KeyClasses(shape, keys.payload, &s->classes) || keys.elements == nullptr) return;
  double unused;
  if (DecodedMeans(shape, keys.elements, fast, &s->sums, &s->sq, &s->km, &s->kstored, &unused)) {
    FastClasses(shape, keys.elements, s->km.data(), fast, &s->dist, &s->classes);
  }
}

// Plans a segment (steps 1 to 3 but mu) into `plan`; false when a sampled element is not finite.
// `*allowed_estimate`: the segment's allowed squared error as its sample estimates it.
bool MakePlan(const SegmentShape& shape, const uint16_t* in, const FastKernels& fast,
              const RowKernels& rk, double target, bool key_classes, Scratch* s, RowPlan* plan,
              double* allowed_estimate) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  uint32_t stride, count;
  SampleTokens(T, &stride, &count);
  if (!LoadSample(shape, rk, fast, in, stride, count, &s->sample)) return false;
  plan->shape = shape;
  plan->target = target;
  plan->key_classes = key_classes;
  plan->stored = s->sample.stored;
  plan->means = s->sample.means;
  *allowed_estimate = target * target * s->sample.energy;
  plan->heads.resize(H);
  const SampleClasses classes{key_classes, &s->classes};
  for (uint32_t h = 0; h < H; ++h) {
    PlanHead(shape, rk, s->sample, h, *allowed_estimate / double(shape.Elements()), classes,
             &plan->heads[h]);
    plan->heads[h].view.means = &plan->means[uint64_t{h} * D];  // The plan's, not the sample's.
  }
  plan->model.emplace(plan->heads, double(T) / count);
  return true;
}

}  // namespace
}  // namespace kvpool::kernels::kvpool::internal

namespace kvpool::kernels {

// What a PlanCache holds for kvpool: the plan; what the last segment coded with it measured
// (its allowed error, and its error over the model's prediction at its mu), from which the
// next segment's mu is solved; the fraction of the allowed error reused plans aim at (the
// stream's, kept across plans); whether a segment is making the next plan.
struct PlanCache::State {
  std::shared_ptr<const kvpool::internal::RowPlan> plan;
  double allowed = 0, ratio = 1;
  double aim = kvpool::internal::kRowsAim;
  uint64_t since_plan = 0;  // Segments that reused `plan` since it was made.
  bool planning = false;
  // Segments still to plan afresh without trying the stream's plan: set when reused plans
  // keep missing at the lowest aim (segments too small or too varied for one plan to fit).
  uint64_t skip = 0;
};

PlanCache::PlanCache(uint64_t replan_every, std::shared_ptr<Counts> shared)
    : replan_every_(std::max<uint64_t>(1, replan_every)), shared_(std::move(shared)) {}
PlanCache::~PlanCache() { HoldPlanBytes(0); }

void PlanCache::HoldPlanBytes(uint64_t bytes) {
  const int64_t delta = int64_t(bytes) - own_.plan_bytes.exchange(int64_t(bytes));
  if (shared_) shared_->plan_bytes.fetch_add(delta, std::memory_order_relaxed);
}

void PlanCache::With(absl::FunctionRef<void(std::unique_ptr<State>&)> fn) {
  absl::MutexLock lock(&mu_);
  fn(state_);
}

void PlanCache::Counts::Add(Outcome o) {
  std::atomic<uint64_t>& n = o == Outcome::kPlanned  ? planned
                             : o == Outcome::kReused ? reused
                                                     : replaced;
  n.fetch_add(1, std::memory_order_relaxed);
}

void PlanCache::Record(Outcome outcome) {
  own_.Add(outcome);
  if (shared_) shared_->Add(outcome);
}

uint64_t BlockPlans::plan_bytes() const {
  uint64_t n = 0;
  for (const auto& c : caches_) n += c->plan_bytes();
  return n;
}

BlockPlans::BlockPlans(uint64_t segments, uint64_t replan_every,
                       std::shared_ptr<PlanCache::Counts> counts) {
  for (uint64_t s = 0; s < segments; ++s) {
    caches_.push_back(std::make_unique<PlanCache>(replan_every, counts));
  }
}

}  // namespace kvpool::kernels

namespace kvpool::kernels::kvpool::internal {
namespace {

// What a segment takes from its stream's cache: the stream's plan (null: plan here) with what
// its last segment measured, and whether this segment claimed the stream's next plan.
struct Taken {
  std::shared_ptr<const RowPlan> plan;
  double aim = kRowsAim, allowed = 0, ratio = 1;
  bool claimed = false;
};

// The stream's plan when it fits this segment and is not due to be made again (or another
// segment is making the next one); else nothing, with the claim on the next plan when nobody
// else holds it.
Taken TakePlan(PlanCache* cache, const SegmentShape& shape, double target, bool key_classes) {
  Taken t;
  cache->With([&](std::unique_ptr<PlanCache::State>& st) {
    if (!st) st = std::make_unique<PlanCache::State>();
    if (st->skip > 0) {
      --st->skip;
      return;
    }
    const bool fits = st->plan && st->allowed > 0 && st->plan->Fits(shape, target, key_classes);
    const bool due = st->since_plan + 1 >= cache->replan_every();
    if (fits && (!due || st->planning)) {
      t.plan = st->plan;
      t.aim = st->aim;
      t.allowed = st->allowed;
      t.ratio = st->ratio;
      ++st->since_plan;
    } else if (!st->planning) {
      st->planning = t.claimed = true;
    }
  });
  return t;
}

// Releases a claim on a stream's next plan however the encode ends, unless Publish did.
struct Claim {
  PlanCache* cache;
  bool held;
  ~Claim() {
    if (held) cache->With([](std::unique_ptr<PlanCache::State>& st) { st->planning = false; });
  }
};

// What a coded segment tells its stream: the plan it ended with, whether it started from the
// stream's (`took`) and kept it (`kept`), whether its first pass missed, and its last pass's
// allowed error and error over the model's prediction (`measured`: worth steering by).
struct Coded {
  std::shared_ptr<const RowPlan> plan;
  bool took = false, kept = false, first_missed = false, measured = false;
  double allowed = 0, ratio = 1;
};

void Publish(PlanCache* cache, const Coded& c, Claim* claim) {
  cache->With([&](std::unique_ptr<PlanCache::State>& st) {
    if (!c.kept) {
      if (c.measured) {
        st->plan = c.plan;
        st->since_plan = 0;
        cache->HoldPlanBytes(c.plan->Bytes());
      }
      if (claim->held) st->planning = claim->held = false;
    }
    if (st->plan == c.plan && c.measured) {
      st->allowed = c.allowed;
      st->ratio = c.ratio;
    }
    // Reused plans aim lower after a miss (a second pass costs more than the bits) and creep
    // back after hits: about one miss in twenty at equilibrium. At the lowest aim, a miss stops
    // reuse for replan_every segments.
    if (c.took) {
      if (c.first_missed && st->aim <= kReuseAimFloor) st->skip = cache->replan_every();
      st->aim = c.first_missed ? std::max(kReuseAimFloor, st->aim * kReuseMissBackoff)
                               : std::min(kRowsAim, st->aim * kReuseHitCreep);
    }
  });
  cache->Record(c.kept   ? PlanCache::Outcome::kReused
                : c.took ? PlanCache::Outcome::kReplaced
                         : PlanCache::Outcome::kPlanned);
}

}  // namespace

const RowKernels& CpuRowKernels(uint32_t head_dim) {
  const RowKernels* rows = RowKernelsAvx512(head_dim);
  if (rows == nullptr) rows = RowKernelsAvx2(head_dim);
  return rows ? *rows : RowKernelsRef();
}

uint64_t RowsBufferBytes(const SegmentShape& shape) {
  // The bound with every head at rank kMaxRank, the most outlier channels and the class map.
  const uint64_t H = shape.kv_heads, D = shape.head_dim;
  return LayoutFor(shape, H * kMaxRank * D, 2 * H * std::min<uint64_t>(D, kMaxOutliers), true)
             .bound +
         StoreRoom(shape);
}

void SampleTokens(uint32_t tokens, uint32_t* stride, uint32_t* count) {
  *stride = std::max(1u, tokens / kSampleRows);
  *count = (tokens + *stride - 1) / *stride;
}

absl::StatusOr<uint64_t> EncodeRowsWith(const SegmentShape& shape, const CodecParams& params,
                                        const uint16_t* in, const LayerKeys& keys,
                                        const FastKernels& fast, const RowKernels& rk,
                                        RowsPass& pass, uint8_t* out, uint64_t capacity,
                                        RowsSpan* span) {
  const uint32_t T = shape.tokens, H = shape.kv_heads;
  if (shape.Elements() == 0) return 0;
  thread_local Scratch s;
  const bool weighted = !(params.flags & kFlagEqualTokens) && T >= 2;
  const bool key_classes = weighted && shape.kind == SegmentKind::kKey;
  ValueClasses(shape, keys, fast, weighted, &s);
  const double target = TargetError(shape, params);
  PlanCache* const cache = keys.plans;
  const Taken taken = cache ? TakePlan(cache, shape, target, key_classes) : Taken{};
  Claim claim{cache, taken.claimed};
  Coded coded;
  coded.plan = taken.plan;
  coded.took = coded.kept = taken.plan != nullptr;
  // Plans this segment afresh: `coded.plan`, and mu from its own sample.
  double mu = 0;
  const auto plan_here = [&]() -> bool {
    std::shared_ptr<RowPlan> fresh;
    if (cache == nullptr) {
      if (!s.plan) s.plan = std::make_shared<RowPlan>();
      fresh = s.plan;
    } else {
      fresh = std::make_shared<RowPlan>();
    }
    double allowed_estimate = 0;
    if (!MakePlan(shape, in, fast, rk, target, key_classes, &s, fresh.get(), &allowed_estimate)) {
      return false;
    }
    coded.plan = std::move(fresh);
    mu = coded.plan->model->Solve(kRowsAim * allowed_estimate);
    return true;
  };
  if (coded.took) {
    mu = coded.plan->model->Solve(taken.aim * taken.allowed / taken.ratio);
  } else if (!plan_here()) {
    return NonFinite();
  }
  s.coefs.resize(uint64_t{H} * kMaxRank * T);  // The pass writes every code FinishPayload reads.
  Layout l;
  uint8_t* dst = nullptr;
  const auto lay_out = [&] {
    l = PayloadLayout(shape, coded.plan->heads, key_classes);
    // In place where `out` holds the worst case (RowsBufferBytes), else through the scratch.
    const uint64_t room = l.bound + StoreRoom(shape);
    if (capacity >= room) {
      dst = out;
    } else {
      s.buffer.resize(room);
      dst = s.buffer.data();
    }
    WriteFixedSections(shape, *coded.plan, key_classes, l, dst);
  };
  lay_out();
  uint64_t size = 0;
  double predicted = 0;  // The last pass's, with coded.allowed and coded.ratio.
  for (int attempt = 0; attempt < kRowsPasses; ++attempt) {
    const RowPlan& plan = *coded.plan;
    PassResult r;
    KVPOOL_RETURN_IF_ERROR(pass.Run(plan.heads, mu, key_classes, s.classes,
                                    dst + l.metas_at - l.class_bytes, dst + l.metas_at,
                                    s.coefs.data(), dst + l.rows_at, &r));
    if (!r.finite || !std::isfinite(r.err) || !std::isfinite(r.energy)) return NonFinite();
    coded.allowed = target * target * r.energy;
    // The model scaled by its miss at this mu.
    predicted = plan.model->Predicted(mu);
    coded.ratio = predicted > 0 && r.err > 0 ? r.err / predicted : 1;
    if (r.err <= coded.allowed) {
      size = l.rows_at + r.rows_bytes;
      break;
    }
    if (attempt == 0) coded.first_missed = true;
    if (coded.kept) {
      // The stream's plan missed this segment: plan it afresh and code it again.
      coded.kept = false;
      if (!plan_here()) return NonFinite();
      lay_out();
      continue;
    }
    // Missed: again from that mu; at least 10% more (the miss grows with mu where the model's
    // shape is off).
    const double next = plan.model->Solve(kRowsAim * coded.allowed / std::max(1.0, coded.ratio) *
                                          std::pow(0.9, attempt));
    mu = std::max(mu * 1.1, next);
  }
  if (cache != nullptr) {
    // A plan is worth steering by when its segment met the budget and its model predicts a
    // nonzero error (a constant segment's does not).
    coded.measured = size > 0 && coded.allowed > 0 && std::isfinite(coded.allowed) &&
                     predicted > 0 && std::isfinite(coded.ratio) && coded.ratio > 0;
    Publish(cache, coded, &claim);
  }
  const uint64_t rows_end = size;
  if (size > 0) size = FinishPayload(shape, rk, *coded.plan, s, size, l.bound, dst);
  if (size == 0 || size >= RawPayloadBytes(shape)) return 0;
  if (capacity < size) return absl::InvalidArgumentError("kvpool: output too small");
  if (dst != out) std::memcpy(out, dst, size);
  *span = RowsSpan{l.rows_at, rows_end};
  return size;
}

std::unique_ptr<RowsPass> MakeCpuRowsPass(const SegmentShape& shape, const uint16_t* in,
                                          const RowKernels& rk) {
  return std::make_unique<CpuRowsPass>(shape, in, rk);
}

absl::StatusOr<uint64_t> EncodeRows(const SegmentShape& shape, const CodecParams& params,
                                    const uint16_t* in, const LayerKeys& keys,
                                    const FastKernels& fast, const RowKernels& rk, uint8_t* out,
                                    uint64_t capacity) {
  CpuRowsPass pass(shape, in, rk);
  RowsSpan span;
  KVPOOL_ASSIGN_OR_RETURN(const uint64_t size, EncodeRowsWith(shape, params, in, keys, fast, rk,
                                                              pass, out, capacity, &span));
  return size > 0 ? size : WriteRawPayload(shape, in, out, capacity);
}

}  // namespace kvpool::kernels::kvpool::internal
