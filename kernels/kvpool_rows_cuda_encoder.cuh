// The kvpool codec's CUDA encoder of payload mode 4 (kvpool_rows.cc defines the format), the
// default profile's. Kept in a header so that tests/kernels/kvpool_rows_cuda_encoder_test.cc
// runs it on the host under tests/util/cuda_emulation.h in every build; kvpool.cu instantiates
// it with CUDA's launcher and memory. Not a public API. Thread-compatible (one encode per
// DeviceRowsPass).
//
// The work is split as the host encoder's (kvpool_rows_encoder.cc) already is:
//   - planning stays on the host (EncodeRowsWith): the sampled tokens (at most 64) are copied
//     from the device, and the plan (means, basis, outlier channels, rate model) and mu are
//     made exactly as the CPU makes them, or taken from a PlanCache;
//   - every full pass runs on the device (RowsPassKernel, a 16-lane group per row: project onto
//     the basis, the row's statistics, its meta byte from the plan's thresholds, quantise,
//     pack its planes into a slot of its own); the host reads back the rows' metas, classes,
//     coefficient codes, errors and energies (a few bytes a row), sums the errors in the CPU's
//     order and decides as the CPU does (another pass, a fresh plan, or raw);
//   - the accepted pass's rows are packed into the payload on the device (RowsCompactKernel),
//     the host writes the rest (fixed sections, metas, head entries, coefficient planes).
// Every row's arithmetic is the reference's (kvpool_rows.cc's ProjectRowRef and
// QuantizeRowRef): per channel lane d % 16 the same fma chains, the lanes combined as Tree16
// by shuffles; so a plan and mu give the CPU's bytes, and the GPU writes the payload EncodeRef
// writes. The price is a round trip to the host per pass (one synchronisation, a few bytes a
// row each way): correct before fast; not yet timed on a GPU.
#ifndef KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_ENCODER_CUH_
#define KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_ENCODER_CUH_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/status_macros.h"
#include "kernels/kvpool_kernels.cuh"
#include "kernels/kvpool_rows_plan.h"

// A kernel's dynamic shared memory (tests/util/cuda_emulation.h defines its own).
#ifndef KVPOOL_DYNAMIC_SHARED
#define KVPOOL_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint32_t kPassRows = 8;  // Rows per block of the pass kernels, 16 lanes each.
inline constexpr uint32_t kPassThreads = 16 * kPassRows;
inline constexpr uint8_t kNotOutlier = 0xff;

// One head's plan as the pass kernel reads it: RowHead's arrays, and MakeRowRule's thresholds
// and RowHalfStep of every meta byte at the pass's mu.
struct RowsHeadPlanDev {
  const float* means;         // [D]
  const float* basis;         // [rank][D]
  const float* inv_step;      // [rank]
  const int8_t* codes;        // [rank][D]
  const uint8_t* outlier_of;  // [D]: k for the head's k-th outlier channel, else kNotOutlier.
  const uint16_t* outlier;    // [outliers] the outlier channels, increasing.
  uint32_t D, rank, outliers, extra, cap;
  float lr_scale;
  double per_z;
  float planes[kClasses][kRuleSlots], scale[kRuleSlots], outlier_scale[kRuleSlots];
  float steps[256];
};

struct RowsPassArgs {
  const uint16_t* in;  // The segment, [T][H][D].
  uint32_t T, H, bf16, key_classes;
  const RowsHeadPlanDev* heads;  // [H]
  const uint8_t* given;          // [T][H] value rows' classes, or null (all 0).
  uint8_t* metas;                // [H][T]
  uint8_t* classes;              // [H][T] the class each row took.
  int16_t* coefs;                // [H][kMaxRank][T], j < rank written.
  float* err;                    // [H][T] squared error of the decoded row.
  float* energy;                 // [H][T] sum of squares of the row.
  uint8_t* slots;                // Row (h, t)'s planes at slots + (h * T + t) * slot_bytes.
  uint64_t slot_bytes;
};

// The bytes a row's slot holds at most: b + E <= 15 planes, none wider than ceil(D / 8).
KVPOOL_HD uint64_t RowSlotBytes(uint32_t D) { return kMaxPlanes * PlaneBytes(D); }
// The pass kernel's dynamic shared memory: each row's prediction and codes; within a block's
// default 48 KiB up to kMaxDeviceRowsDim channels.
KVPOOL_HD constexpr uint64_t PassSharedBytes(uint32_t D) {
  return uint64_t{kPassRows} * D * (4 + 2);
}
inline constexpr uint32_t kMaxDeviceRowsDim = 1024;
static_assert(PassSharedBytes(kMaxDeviceRowsDim) <= 48 * 1024, "the default shared memory");

// Tree16 over the 16 lanes of a row's group (lane l holding l[l]): lane i adds lane i + k's for
// k = 8, 4, 2, 1, as Tree16 does; every lane of the group gets the sum. Every lane of the warp
// calls it.
__device__ inline float GroupTree16(float v) {
  for (int k = 8; k > 0; k >>= 1) v = v + __shfl_down_sync(0xffffffffu, v, k);
  return __shfl_sync(0xffffffffu, v, 0, 16);
}

// CountAtMost's count: thresholds t[p] (p < kRuleSlots) with x >= t[p].
__device__ inline uint32_t CountAtMostDev(const float* t, float x) {
  uint32_t n = 0;
  for (uint32_t p = 0; p < kRuleSlots; ++p) n += x >= t[p] ? 1 : 0;
  return n;
}

// std::min and std::max as the reference calls them (a NaN second operand gives the first).
__device__ inline float MinAs(float a, float b) { return b < a ? b : a; }
__device__ inline float MaxAs(float a, float b) { return a < b ? b : a; }

// Grid: ceil(T / kPassRows) * H blocks of kPassThreads; row t = group g of block x's tokens.
static __global__ void __launch_bounds__(kPassThreads) RowsPassKernel(RowsPassArgs a) {
  KVPOOL_DYNAMIC_SHARED(float, rows_shared);
  const uint32_t groups = (a.T + kPassRows - 1) / kPassRows;
  const uint32_t h = blockIdx.x / groups, g = threadIdx.x / 16, lane = threadIdx.x % 16;
  const uint32_t t = (blockIdx.x % groups) * kPassRows + g;
  const bool live = t < a.T;
  const RowsHeadPlanDev& hp = a.heads[h];
  const uint32_t D = hp.D, rank = hp.rank;
  float* z = rows_shared + uint64_t{g} * D;
  uint16_t* code =
      reinterpret_cast<uint16_t*>(rows_shared + uint64_t{kPassRows} * D) + uint64_t{g} * D;
  const uint16_t* x = a.in + (uint64_t{live ? t : 0} * a.H + h) * D;
  // Project (ProjectRowRef): lane l takes channels l, l + 16, .. in order.
  // The rank-indexed arrays stay in registers: loops over kMaxRank, unrolled, guarded.
  float dot[kMaxRank] = {}, dist = 0, en = 0, reg = 0, out = 0;
  for (uint32_t d = lane; live && d < D; d += 16) {
    const float v = ToFloatDev(a.bf16, x[d]);
    const float xc = v - hp.means[d];
#pragma unroll
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      if (j < rank) dot[j] = __fmaf_rn(xc, hp.basis[uint64_t{j} * D + d], dot[j]);
    }
    dist = __fmaf_rn(xc, xc, dist);
    en = __fmaf_rn(v, v, en);
  }
  int16_t c[kMaxRank] = {};
#pragma unroll
  for (uint32_t j = 0; j < kMaxRank; ++j) {
    if (j < rank) {  // The same for the whole block: every lane shuffles.
      const float q = rintf(GroupTree16(dot[j]) * hp.inv_step[j]);
      c[j] = int16_t(MinAs(float(kMaxCoefCode), MaxAs(-float(kMaxCoefCode), q)));
    }
  }
  for (uint32_t d = lane; live && d < D; d += 16) {
    int32_t P = 0;
#pragma unroll
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      if (j < rank) P += int32_t(c[j]) * hp.codes[uint64_t{j} * D + d];
    }
    z[d] = __fmaf_rn(hp.lr_scale, float(P), hp.means[d]);
    const float r = ToFloatDev(a.bf16, x[d]) - z[d];
    if (hp.outlier_of[d] != kNotOutlier) {
      out = __fmaf_rn(r, r, out);
    } else {
      reg = __fmaf_rn(r, r, reg);
    }
  }
  dist = GroupTree16(dist);
  en = GroupTree16(en);
  reg = GroupTree16(reg);
  out = GroupTree16(out);
  // The row's class and meta byte (ChooseRow, ChooseMeta).
  const uint8_t cls = a.key_classes     ? ClassOf(double(dist), hp.per_z)
                      : a.given && live ? a.given[uint64_t{t} * a.H + h]
                                        : 0;
  uint32_t b = CountAtMostDev(hp.planes[cls], reg);
  b = b < hp.cap ? b : hp.cap;
  const uint32_t js = b > 0 ? CountAtMostDev(hp.scale, reg) : CountAtMostDev(hp.outlier_scale, out);
  const uint8_t meta = uint8_t(b | (js << 4));
  // Quantise (QuantizeRowRef).
  const float hs = hp.steps[meta];
  const float inv = 1.f / (2.f * hs);
  float err = 0;
  for (uint32_t d = lane; live && d < D; d += 16) {
    const float v = ToFloatDev(a.bf16, x[d]);
    const uint32_t planes = hp.outlier_of[d] != kNotOutlier ? b + hp.extra : b;
    float n = 0, u = 0;
    if (planes > 0) {
      const float top = float((1u << planes) - 1);
      u = floorf((v - z[d]) * inv) + float(1u << (planes - 1));
      u = MinAs(top, MaxAs(0.f, u));
      n = 2.f * u - top;
    }
    const float y = ToFloatDev(a.bf16, FromFloatDev(a.bf16, __fmaf_rn(hs, n, z[d])));
    const float e = y - v;
    err = __fmaf_rn(e, e, err);
    code[d] = uint16_t(u);
  }
  err = GroupTree16(err);
  __syncthreads();
  if (!live) return;
  // The row's planes into its slot: b of D bits, then E of the outlier channels'.
  uint8_t* slot = a.slots + (uint64_t{h} * a.T + t) * a.slot_bytes;
  const uint64_t regular = b * PlaneBytes(D);
  const uint64_t bytes = RowDataBytes(D, hp.outliers, hp.extra, b);
  for (uint64_t i = lane; i < bytes; i += 16) {
    uint32_t v = 0;
    if (i < regular) {
      const uint32_t p = uint32_t(i / PlaneBytes(D)), base = uint32_t(i % PlaneBytes(D)) * 8;
      for (uint32_t k = 0; k < 8 && base + k < D; ++k) v |= ((code[base + k] >> p) & 1u) << k;
    } else {
      const uint64_t e = i - regular;
      const uint32_t q = uint32_t(e / PlaneBytes(hp.outliers));
      const uint32_t base = uint32_t(e % PlaneBytes(hp.outliers)) * 8;
      for (uint32_t k = 0; k < 8 && base + k < hp.outliers; ++k) {
        v |= ((code[hp.outlier[base + k]] >> (b + q)) & 1u) << k;
      }
    }
    slot[i] = uint8_t(v);
  }
  if (lane == 0) {
    const uint64_t r = uint64_t{h} * a.T + t;
    a.metas[r] = meta;
    a.classes[r] = cls;
    a.err[r] = err;
    a.energy[r] = en;
#pragma unroll
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      if (j < rank) a.coefs[(uint64_t{h} * kMaxRank + j) * a.T + t] = c[j];
    }
  }
}

struct RowsCompactArgs {
  const uint8_t* slots;
  uint64_t slot_bytes;
  const uint64_t* offsets;  // [rows + 1] each row's offset in the rows section.
  uint64_t rows;
  uint8_t* out;  // The payload's rows section.
};

// Grid: ceil(rows / kPassRows) blocks of kPassThreads; 16 lanes copy a row.
static __global__ void __launch_bounds__(kPassThreads) RowsCompactKernel(RowsCompactArgs a) {
  const uint64_t r = uint64_t{blockIdx.x} * kPassRows + threadIdx.x / 16;
  if (r >= a.rows) return;
  const uint8_t* slot = a.slots + r * a.slot_bytes;
  const uint64_t at = a.offsets[r], bytes = a.offsets[r + 1] - at;
  for (uint64_t i = threadIdx.x % 16; i < bytes; i += 16) a.out[at + i] = slot[i];
}

// The pass on the device (RowsPass), through `launch` (launch(grid_x, 1, threads, shared_bytes,
// kernel, args...)) and `mem`, which provides
//   absl::StatusOr<uint8_t*> Allocate(uint64_t bytes)   device memory, freed with `mem`;
//   absl::Status ToDevice(void* d, const void* h, uint64_t n), ToHost(void* h, const void* d,
//                uint64_t n)   copies complete on return (after the launches before them);
//   absl::Status ToHostRows(void* h, const void* d, uint64_t pitch, uint64_t width,
//                uint64_t rows)   the same for `rows` of `width` bytes, `pitch` apart on both;
//   absl::Status OnDevice(void* d, const void* s, uint64_t n)   device to device, in order.
template <typename Launcher, typename Memory>
class DeviceRowsPass final : public RowsPass {
 public:
  DeviceRowsPass(const SegmentShape& shape, const uint16_t* d_in, const Launcher& launch,
                 Memory* mem)
      : shape_(shape), d_in_(d_in), launch_(launch), mem_(mem) {}

  absl::Status Run(const std::vector<HeadPlan>& heads, double mu, bool key_classes,
                   const std::vector<uint8_t>& given, uint8_t* classes, uint8_t* metas,
                   int16_t* coefs, uint8_t*, PassResult* res) override {
    const uint32_t T = shape_.tokens, H = shape_.kv_heads, D = shape_.head_dim;
    const uint64_t rows = uint64_t{T} * H;
    KVPOOL_RETURN_IF_ERROR(Allocate());
    KVPOOL_RETURN_IF_ERROR(UploadPlan(heads, mu));
    const bool has_given = !given.empty();
    if (has_given) KVPOOL_RETURN_IF_ERROR(mem_->ToDevice(d_given_, given.data(), rows));
    const RowsPassArgs args{d_in_,
                            T,
                            H,
                            shape_.dtype == DType::kBf16,
                            key_classes,
                            d_heads_,
                            has_given ? d_given_ : nullptr,
                            d_metas_,
                            d_classes_,
                            d_coefs_,
                            d_err_,
                            d_energy_,
                            d_slots_,
                            RowSlotBytes(D)};
    const uint32_t groups = (T + kPassRows - 1) / kPassRows;
    launch_(groups * H, 1, kPassThreads, PassSharedBytes(D), RowsPassKernel, args);
    // What the host decides by, in one copy (errors, energies, coefficients, metas and classes
    // lie in that order, back to back).
    const uint64_t results = rows * (4 + 4 + 2 * kMaxRank + 1 + 1);
    h_results_.resize(results);
    KVPOOL_RETURN_IF_ERROR(mem_->ToHost(h_results_.data(), d_err_, results));
    const uint8_t* got = h_results_.data();
    const auto row_float = [&](uint64_t at) {
      float f;
      std::memcpy(&f, got + at, 4);
      return f;
    };
    std::memcpy(coefs, got + rows * 8, rows * kMaxRank * 2);
    std::memcpy(metas, got + rows * (8 + 2 * kMaxRank), rows);
    const uint8_t* row_classes = got + rows * (9 + 2 * kMaxRank);
    // The CPU pass's sums and class map, in its order (head after head, token after token).
    *res = PassResult{};
    if (key_classes) std::memset(classes, 0, (rows + 1) / 2);
    offsets_.assign(rows + 1, 0);
    for (uint32_t h = 0; h < H; ++h) {
      for (uint32_t t = 0; t < T; ++t) {
        const uint64_t r = uint64_t{h} * T + t, k = uint64_t{t} * H + h;
        const float err = row_float(4 * r), energy = row_float(4 * (rows + r));
        if (!std::isfinite(energy)) {
          res->finite = false;
          return absl::OkStatus();
        }
        if (key_classes) classes[k / 2] |= uint8_t(row_classes[r] << (4 * (k & 1)));
        res->err += err;
        res->energy += energy;
        offsets_[r] = res->rows_bytes;
        res->rows_bytes += RowBytesOf(heads[h].view, metas[r]);
      }
    }
    offsets_[rows] = res->rows_bytes;
    return absl::OkStatus();
  }

  // The last pass's rows, packed at d_rows (the payload's rows section).
  absl::Status WriteRows(uint8_t* d_rows) {
    const uint64_t rows = uint64_t{shape_.tokens} * shape_.kv_heads;
    KVPOOL_RETURN_IF_ERROR(mem_->ToDevice(d_offsets_, offsets_.data(), (rows + 1) * 8));
    const RowsCompactArgs args{d_slots_, RowSlotBytes(shape_.head_dim), d_offsets_, rows, d_rows};
    launch_(uint32_t((rows + kPassRows - 1) / kPassRows), 1, kPassThreads, 0, RowsCompactKernel,
            args);
    return absl::OkStatus();
  }

 private:
  // The plan's device image: RowsHeadPlanDev[H], then each head's arrays at their widest.
  uint64_t HeadArrayBytes() const {
    const uint64_t D = shape_.head_dim;
    return (D * 4 + kMaxRank * D * 4 + kMaxRank * 4 + kMaxRank * D + D + 1 + 2 * kMaxOutliers +
            15) /
           16 * 16;
  }

  absl::Status Allocate() {
    if (d_heads_ != nullptr) return absl::OkStatus();
    const uint64_t rows = uint64_t{shape_.tokens} * shape_.kv_heads;
    const uint64_t H = shape_.kv_heads;
    const uint64_t heads = (H * sizeof(RowsHeadPlanDev) + 15) / 16 * 16;
    plan_bytes_ = heads + H * HeadArrayBytes();
    const uint64_t bytes = plan_bytes_ + rows * (8 + 2 * 4 + 3) + 8 + rows * kMaxRank * 2 +
                           rows * RowSlotBytes(shape_.head_dim) + 64;
    KVPOOL_ASSIGN_OR_RETURN(uint8_t * base, mem_->Allocate(bytes));
    // Carved widest first, so that each array keeps its alignment.
    d_plan_ = base;
    d_heads_ = reinterpret_cast<RowsHeadPlanDev*>(base);
    uint8_t* p = base + plan_bytes_;
    d_offsets_ = reinterpret_cast<uint64_t*>(p);
    p += (rows + 1) * 8;
    d_err_ = reinterpret_cast<float*>(p);
    p += rows * 4;
    d_energy_ = reinterpret_cast<float*>(p);
    p += rows * 4;
    d_coefs_ = reinterpret_cast<int16_t*>(p);
    p += rows * kMaxRank * 2;
    d_metas_ = p;
    p += rows;
    d_classes_ = p;
    p += rows;
    d_given_ = p;
    p += rows;
    d_slots_ = p;
    h_plan_.resize(plan_bytes_);
    return absl::OkStatus();
  }

  absl::Status UploadPlan(const std::vector<HeadPlan>& heads, double mu) {
    const uint32_t H = shape_.kv_heads, D = shape_.head_dim;
    std::fill(h_plan_.begin(), h_plan_.end(), 0);
    uint64_t at = (uint64_t{H} * sizeof(RowsHeadPlanDev) + 15) / 16 * 16;
    RowRule rule;
    for (uint32_t h = 0; h < H; ++h) {
      const HeadPlan& hp = heads[h];
      const RowHead& v = hp.view;
      RowsHeadPlanDev e{};
      uint64_t a = at;
      const auto put = [&](const void* src, uint64_t n) {
        if (n > 0) std::memcpy(h_plan_.data() + a, src, n);
        const uint8_t* device = d_plan_ + a;
        a += n;
        return device;
      };
      e.means = reinterpret_cast<const float*>(put(v.means, uint64_t{D} * 4));
      e.basis = reinterpret_cast<const float*>(put(v.basis, uint64_t{v.rank} * D * 4));
      e.inv_step = reinterpret_cast<const float*>(put(v.inv_step, uint64_t{v.rank} * 4));
      e.codes = reinterpret_cast<const int8_t*>(put(v.codes, uint64_t{v.rank} * D));
      uint8_t outlier_of[4096];
      uint16_t outlier[kMaxOutliers];
      std::memset(outlier_of, kNotOutlier, D);
      for (uint32_t k = 0; k < v.outliers; ++k) {
        outlier_of[v.outlier[k]] = uint8_t(k);
        outlier[k] = uint16_t(v.outlier[k]);
      }
      e.outlier_of = put(outlier_of, D);
      a = (a + 1) / 2 * 2;
      e.outlier = reinterpret_cast<const uint16_t*>(put(outlier, uint64_t{v.outliers} * 2));
      at += HeadArrayBytes();
      e.D = D;
      e.rank = v.rank;
      e.outliers = v.outliers;
      e.extra = v.extra;
      e.lr_scale = v.lr_scale;
      e.per_z = hp.per_z;
      MakeRowRule(hp, mu, &rule);
      std::memcpy(e.planes, rule.planes, sizeof(e.planes));
      std::memcpy(e.scale, rule.scale, sizeof(e.scale));
      std::memcpy(e.outlier_scale, rule.outlier_scale, sizeof(e.outlier_scale));
      e.cap = rule.cap;
      for (uint32_t m = 0; m < 256; ++m) e.steps[m] = RowHalfStep(hp.unit, uint8_t(m));
      std::memcpy(h_plan_.data() + uint64_t{h} * sizeof(RowsHeadPlanDev), &e, sizeof(e));
    }
    return mem_->ToDevice(d_plan_, h_plan_.data(), plan_bytes_);
  }

  const SegmentShape shape_;
  const uint16_t* const d_in_;
  const Launcher launch_;
  Memory* const mem_;
  uint64_t plan_bytes_ = 0;
  uint8_t* d_plan_ = nullptr;
  RowsHeadPlanDev* d_heads_ = nullptr;
  uint64_t* d_offsets_ = nullptr;
  float *d_err_ = nullptr, *d_energy_ = nullptr;
  int16_t* d_coefs_ = nullptr;
  uint8_t *d_metas_ = nullptr, *d_classes_ = nullptr, *d_given_ = nullptr, *d_slots_ = nullptr;
  std::vector<uint8_t> h_plan_, h_results_;
  std::vector<uint64_t> offsets_;
};

// Encodes one segment of the default profile (payload mode 4) at d_in into d_out (device
// memory, `capacity` bytes) with the pass on the device: planning from the sampled tokens on
// the host with `fast` and `rk` (as the CPU path with these kernels, so the same bytes), `keys`
// as the host encoders take them (host memory; its PlanCache shared with them). Segments that
// coding does not make smaller are stored raw (mode 0) as the host encoders store them; so are
// segments whose elements are not finite or whose squares overflow a float (bf16 beyond about
// 1.8e19), which the host encoders refuse instead (EncodeSegment then stores them with the raw
// codec): the one case where the bytes differ, the elements the same. Returns the payload's size;
// the device work is stream-ordered after the last copy, which `mem` completes.
template <typename Launcher, typename Memory>
absl::StatusOr<uint64_t> EncodeRowsOnDevice(const SegmentShape& shape, const CodecParams& params,
                                            const uint16_t* d_in, const LayerKeys& keys,
                                            const FastKernels& fast, const RowKernels& rk,
                                            const Launcher& launch, Memory* mem, uint8_t* d_out,
                                            uint64_t capacity) {
  const uint64_t raw = RawPayloadBytes(shape), HD = uint64_t{shape.kv_heads} * shape.head_dim;
  if (capacity < raw) return absl::InvalidArgumentError("kvpool: output too small");
  if (shape.head_dim > kMaxDeviceRowsDim) {
    return absl::UnimplementedError("kvpool: mode 4 on the GPU takes head_dim up to 1024");
  }
  uint64_t size = 0;
  if (shape.Elements() > 0) {
    // The sampled tokens, at their places in a host image of the segment.
    uint32_t stride, count;
    SampleTokens(shape.tokens, &stride, &count);
    thread_local std::vector<uint16_t> sample;  // Only the sampled tokens are read.
    sample.resize(shape.Elements());
    KVPOOL_RETURN_IF_ERROR(
        mem->ToHostRows(sample.data(), d_in, uint64_t{stride} * HD * 2, HD * 2, count));
    DeviceRowsPass<Launcher, Memory> pass(shape, d_in, launch, mem);
    std::vector<uint8_t> host(raw);
    RowsSpan span;
    const absl::StatusOr<uint64_t> coded =
        EncodeRowsWith(shape, params, sample.data(), keys, fast, rk, pass, host.data(), raw, &span);
    if (!coded.ok() && coded.status() != NonFinite()) return coded.status();
    if (coded.ok() && *coded > 0) {
      size = *coded;
      KVPOOL_RETURN_IF_ERROR(mem->ToDevice(d_out, host.data(), span.rows_at));
      KVPOOL_RETURN_IF_ERROR(pass.WriteRows(d_out + span.rows_at));
      KVPOOL_RETURN_IF_ERROR(
          mem->ToDevice(d_out + span.rows_end, host.data() + span.rows_end, size - span.rows_end));
      return size;
    }
  }
  // Raw: the header's zeros, then the elements as they are (little-endian, as the device's).
  const uint8_t header[kHeaderBytes] = {};
  KVPOOL_RETURN_IF_ERROR(mem->ToDevice(d_out, header, kHeaderBytes));
  if (shape.Elements() > 0) {
    KVPOOL_RETURN_IF_ERROR(mem->OnDevice(d_out + kHeaderBytes, d_in, shape.Elements() * 2));
  }
  return raw;
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_ROWS_CUDA_ENCODER_CUH_
