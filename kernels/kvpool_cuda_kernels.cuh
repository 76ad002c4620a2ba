// The kvpool codec's CUDA decoding kernels and what both directions share (launched by
// kvpool.cu; the encoder's are in kvpool_cuda_encoder.cuh), for batches of segments of one
// shape: blockIdx.y is the segment, each with its own payload, output and scratch (the *Batch
// and *ScratchSet structs say where). Kept in a header so that tests/kernels/
// kvpool_cuda_kernels_test.cc runs them on the host under tests/util/cuda_emulation.h in every
// build; the GPU itself runs them in KvpoolCodec.Cuda* (label gpu). Not a public API.
// Thread-safe (stateless).
//
// Decoding. The launcher has only device pointers to the payloads, so validation runs on the
// device, before any read that depends on a payload's contents:
//   1. ParseKernel (one block per segment) checks the header, ranks, basis steps and both pack
//      streams against the payload's size exactly as ParsePayload does, and writes a
//      DecodeLayout (ok flag and section offsets) plus the per-group byte offsets of both pack
//      streams to the segment's scratch. Mode 3 (entropy-coded): thread 0 checks the three
//      streams (means and basis, coefficients, residual) with the host's CheckStream;
//      EntropyTablesKernel builds their tables and EntropyLanesKernel decodes a lane per thread
//      with the host's DecodeLane into code scratch (a corrupt lane clears ok).
//   2. DecodeKernel (a block per 16-token group and segment) reads the layout; when it is not
//      ok it writes the sentinel kInvalidOutput (0xffff, a NaN in fp16 and bf16) to every
//      output element and reads nothing else, else it decodes the coefficients of its group,
//      then its residual packs, and forms the elements with DecodeRef's operation order (mode 3
//      with a token class map: each token and head's step is step * ClassScale(class), as on
//      the host).
// So a payload that DecodeRef rejects with DataLoss leaves every element of its segment 0xffff
// (the launcher itself returns OK: it cannot see the verdict without synchronising).
#ifndef KVPOOL_KERNELS_KVPOOL_CUDA_KERNELS_CUH_
#define KVPOOL_KERNELS_KVPOOL_CUDA_KERNELS_CUH_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/carver.h"
#include "kernels/host_device.h"
#include "kernels/kvpool_entropy.h"
#include "kernels/kvpool_format.h"
#include "kernels/kvpool_kernels.cuh"
#include "kernels/kvpool_rows_cuda.cuh"

namespace kvpool::kernels::kvpool::internal {

inline constexpr uint16_t kInvalidOutput = 0xffff;  // Every element of a failed payload.

struct Dims {
  uint32_t T, H, D, G;
  uint64_t HD, N;
  bool bf16;
  // The encoder's samples: the means' groups (MeanStride) and tokens, the estimate pass's
  // groups (EstimateStride; 0: no estimate pass, too few groups).
  uint32_t mean_stride, mean_tokens, estimate_stride;
};

inline Dims MakeDims(const SegmentShape& s) {
  Dims dm{s.tokens,
          s.kv_heads,
          s.head_dim,
          Groups(s.tokens),
          uint64_t{s.kv_heads} * s.head_dim,
          s.Elements(),
          s.dtype == DType::kBf16,
          MeanStride(Groups(s.tokens)),
          0,
          0};
  for (uint32_t g = 0; g < dm.G; g += dm.mean_stride)
    dm.mean_tokens += std::min(kPack, dm.T - g * kPack);
  const uint32_t stride = EstimateStride(dm.G);
  dm.estimate_stride = dm.G >= 2 * stride ? stride : 0;
  return dm;
}

// ---- Decoding ---------------------------------------------------------------------------

struct DecodeLayout {
  uint32_t ok;  // 1 when the payload passed every check (and, mode 3, every lane decoded).
  uint32_t mode;
  uint32_t coef_cols;
  float step;
  float mean_step;      // Mode 3.
  uint64_t dir_stride;  // Bytes per direction entry.
  uint64_t means, directions, coef_widths, coef_data, res_widths, res_data;  // Offsets.
  uint64_t classes;   // Offset of the token class nibbles, 0 when there are none.
  Stream streams[3];  // Mode 3: means and basis, coefficients, residual.
  RowsLayout rows;    // Mode 4.
};

// One segment's decoding scratch.
struct DecodeScratch {
  DecodeLayout* layout;
  uint32_t* first_col;   // [H + 1]
  uint64_t* coef_group;  // [G + 1] byte offset of group g's packs in the coefficient data
  uint64_t* res_group;   // [G + 1] the same for the residual data
  float* coefficients;   // [G * 16][coef_cols], room for coef_cols = 8 * H
  DecodeTable* tables;   // Mode 3: [3][kMaxTables], one row per stream
  int32_t* side_codes;   // Mode 3: [D][H + coef_cols], room for coef_cols = 8 * H
  int32_t* coef_codes;   // Mode 3: [G * 16][coef_cols], room for coef_cols = 8 * H
  int32_t* res_codes;    // Mode 3: [G * 16][HD]
  RowsHeadDev* rows_heads;  // Mode 4: [H]
  uint64_t* row_off;               // Mode 4: [H * T + 1] data offset of row h * T + t
};

// A batch's decoding scratch: each array of DecodeScratch repeated for segments 0, 1, ..
// (carved by CarveDecodeScratch).
struct DecodeScratchSet {
  DecodeScratch first;
  uint32_t H, D, G;
  uint64_t HD;
  KVPOOL_HD uint64_t CoefCount() const { return uint64_t{G} * kPack * kMaxRank * H; }
  KVPOOL_HD DecodeScratch At(uint32_t y) const {
    DecodeScratch s;
    s.layout = first.layout + y;
    s.first_col = first.first_col + uint64_t{y} * (H + 1);
    s.coef_group = first.coef_group + uint64_t{y} * (G + 1);
    s.res_group = first.res_group + uint64_t{y} * (G + 1);
    s.coefficients = first.coefficients + y * CoefCount();
    s.tables = first.tables + uint64_t{y} * 3 * kMaxTables;
    s.side_codes = first.side_codes + uint64_t{y} * D * (kMaxRank + 1) * H;
    s.coef_codes = first.coef_codes + y * CoefCount();
    s.res_codes = first.res_codes + uint64_t{y} * G * kPack * HD;
    s.rows_heads = first.rows_heads + uint64_t{y} * H;
    s.row_off = first.row_off + uint64_t{y} * (uint64_t{G} * kPack * H + 1);
    return s;
  }
};

// Where segment y of a decoding batch lies: its payload (sizes[y] bytes, on the device) at
// payload + y * payload_stride, its elements at out + y * out_stride.
struct DecodeBatch {
  const uint8_t* payload;
  uint64_t payload_stride;
  const uint64_t* sizes;
  uint16_t* out;
  uint64_t out_stride;
};

// Mode 3: where stream k's lanes decode to, and their row pitch.
__device__ inline void StreamTarget(const DecodeLayout& L, const Dims& dm, const DecodeScratch& s,
                                    uint32_t k, int32_t** codes, uint64_t* ld) {
  if (k == 0) {
    *codes = s.side_codes;
    *ld = dm.H + L.coef_cols;
  } else if (k == 1) {
    *codes = s.coef_codes;
    *ld = L.coef_cols;
  } else {
    *codes = s.res_codes;
    *ld = dm.HD;
  }
}

// Thread 0: the header up to the coefficient widths. Returns 0 invalid, 1 go on, 2 done (raw).
__device__ inline int ParseHead(const uint8_t* p, uint64_t size, const Dims& dm, DecodeScratch s,
                                uint64_t* pos, uint32_t* cols) {
  DecodeLayout* L = s.layout;
  if (size < kHeaderBytes || (p[2] | p[3]) != 0) return 0;
  if ((p[1] & ~(p[0] == kModeRaw ? 0 : kHeadClasses)) != 0) return 0;
  L->mode = p[0];
  L->classes = 0;
  L->step = LoadF32Dev(p + 4);
  if (p[0] == kModeRaw) {
    L->ok = size == kHeaderBytes + 2 * dm.N;
    return 2;
  }
  if (p[0] == kModeRows) return RowsHeads(p, size, dm.T, dm.H, dm.D, s.rows_heads, &L->rows) ? 3 : 0;
  if ((p[0] != kModeCoded && p[0] != kModeEntropy) || !isfinite(L->step) || !(L->step > 0)) {
    return 0;
  }
  const bool side = p[0] == kModeEntropy;
  const uint64_t means_bytes = side ? 4 : 2 * dm.HD;
  if (size - kHeaderBytes < dm.H + means_bytes) return 0;
  uint32_t R = 0;
  for (uint32_t h = 0; h < dm.H; ++h) {
    const uint32_t r = p[kHeaderBytes + h];
    if (r > kMaxRank) return 0;
    s.first_col[h] = R;
    R += r;
  }
  s.first_col[dm.H] = R;
  L->coef_cols = R;
  L->means = kHeaderBytes + dm.H;
  L->mean_step = side ? LoadF32Dev(p + L->means) : 0.f;
  if (side && (!isfinite(L->mean_step) || !(L->mean_step > 0))) return 0;
  uint64_t at = L->means + means_bytes;
  L->dir_stride = side ? kDirectionBytes : kDirectionBytes + dm.D;
  const uint64_t dir_bytes = uint64_t{R} * L->dir_stride;
  if (size - at < dir_bytes) return 0;
  L->directions = at;
  for (uint32_t j = 0; j < R; ++j) {
    const uint8_t* q = p + at + uint64_t{j} * L->dir_stride;
    if (!isfinite(LoadF32Dev(q)) || !isfinite(LoadF32Dev(q + 4))) return 0;
  }
  at += dir_bytes;
  if (p[1] & kHeadClasses) {
    const uint64_t n = uint64_t{dm.T} * dm.H, bytes = (n + 1) / 2;
    if (size - at < bytes || ((n & 1) && (p[at + bytes - 1] >> 4) != 0)) return 0;
    L->classes = at;
    at += bytes;
  }
  if (side) {  // The three streams checked here; their lanes decode later.
    L->ok = CheckStream(p, size, dm.D, dm.H + R, &at, &L->streams[0]) == StreamError::kOk &&
            CheckStream(p, size, dm.T, R, &at, &L->streams[1]) == StreamError::kOk &&
            CheckStream(p, size, dm.T, uint32_t(dm.HD), &at, &L->streams[2]) == StreamError::kOk &&
            at == size;
    return 2;
  }
  const uint64_t width_bytes = (uint64_t{dm.G} * R + 1) / 2;
  if (size - at < width_bytes) return 0;
  L->coef_widths = at;
  *pos = at + width_bytes;
  *cols = R;
  return 1;
}

// All threads: sums[g + 1] = bytes of group g's packs (2 * width each), a warp per group.
__device__ inline void GroupBytes(const uint8_t* widths, uint32_t groups, uint64_t cols,
                                  uint64_t* sums) {
  const int lane = threadIdx.x & 31;
  for (uint32_t g = threadIdx.x >> 5; g < groups; g += kThreads / 32) {
    uint64_t sum = 0;
    for (uint64_t c = lane; c < cols; c += 32) sum += 2 * NibbleDev(widths, g * cols + c);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if (lane == 0) sums[g + 1] = sum;
  }
}

// Thread 0: turns sums[1..G] into offsets, checks that the stream's data fits after *pos and
// advances *pos past it.
__device__ inline bool PrefixAndFit(uint64_t* sums, uint32_t groups, uint64_t size, uint64_t* pos) {
  sums[0] = 0;
  for (uint32_t g = 1; g <= groups; ++g) sums[g] += sums[g - 1];
  if (size - *pos < sums[groups]) return false;
  *pos += sums[groups];
  return true;
}

static __global__ void __launch_bounds__(kThreads)
    ParseKernel(DecodeBatch b, Dims dm, DecodeScratchSet set) {
  const uint8_t* p = b.payload + blockIdx.y * b.payload_stride;
  const uint64_t size = b.sizes[blockIdx.y];
  const DecodeScratch s = set.At(blockIdx.y);
  __shared__ int state;
  __shared__ uint64_t pos, widths_at;
  __shared__ uint32_t cols;
  if (threadIdx.x == 0) {
    s.layout->ok = 0;
    state = ParseHead(p, size, dm, s, &pos, &cols);
    widths_at = s.layout->coef_widths;
  }
  __syncthreads();
  if (state == 3) {
    __shared__ uint32_t warp_sums[kThreads / 32];
    RowsParse(p, size, dm.T, dm.H, dm.D, dm.bf16, s.rows_heads, s.row_off, &s.layout->rows,
              &s.layout->ok, warp_sums);
    return;
  }
  if (state != 1) return;
  GroupBytes(p + widths_at, dm.G, cols, s.coef_group);
  __syncthreads();
  if (threadIdx.x == 0) {
    state = 0;
    if (PrefixAndFit(s.coef_group, dm.G, size, &pos)) {
      s.layout->coef_data = pos - s.coef_group[dm.G];
      const uint64_t width_bytes = (dm.G * dm.HD + 1) / 2;
      if (size - pos >= width_bytes) {
        widths_at = s.layout->res_widths = pos;
        pos += width_bytes;
        state = 1;
      }
    }
  }
  __syncthreads();
  if (state != 1) return;
  GroupBytes(p + widths_at, dm.G, dm.HD, s.res_group);
  __syncthreads();
  if (threadIdx.x == 0 && PrefixAndFit(s.res_group, dm.G, size, &pos)) {
    s.layout->res_data = pos - s.res_group[dm.G];
    s.layout->ok = pos == size;
  }
}

// Group g's coefficients: coefficients[(16 g + i) * R + col] = code * coefficient step.
__device__ inline void DecodeCoefficients(const uint8_t* p, const DecodeLayout& L, const Dims& dm,
                                          DecodeScratch s, uint32_t g, uint32_t* warp_sums) {
  const uint32_t R = L.coef_cols;
  const uint8_t* data = p + L.coef_data + s.coef_group[g];
  float* coef = s.coefficients + uint64_t{g} * kPack * R;
  uint32_t carry = 0;
  for (uint32_t base = 0; base < R; base += kThreads) {
    const uint32_t c = base + threadIdx.x;
    const uint32_t w = c < R ? NibbleDev(p + L.coef_widths, uint64_t{g} * R + c) : 0;
    uint32_t total;
    const uint32_t off = carry + BlockExclusiveScan<uint32_t>(2 * w, warp_sums, &total);
    carry += total;
    if (c >= R) continue;
    uint32_t u[kPack];
    UnpackPlanes(data + off, w, u);
    const float cs = LoadF32Dev(p + L.directions + uint64_t{c} * L.dir_stride);
#pragma unroll
    for (uint32_t i = 0; i < kPack; ++i) coef[i * R + c] = Mul(float(UnZigZagDev(u[i])), cs);
  }
}

// One residual column c of group g (n tokens) with residual codes q.
__device__ inline void DecodeColumn(const uint8_t* p, const DecodeLayout& L, const Dims& dm,
                                    DecodeScratch s, uint32_t g, uint32_t n, uint64_t c,
                                    const int32_t* q, uint16_t* out) {
  const uint32_t h = uint32_t(c / dm.D), d = uint32_t(c - uint64_t{h} * dm.D);
  const uint32_t r = p[kHeaderBytes + h], first = s.first_col[h], R = L.coef_cols;
  const bool side = L.mode == kModeEntropy;
  const int32_t* side_row = s.side_codes + uint64_t{d} * (dm.H + R);  // Mode 3.
  float basis[kMaxRank];
#pragma unroll
  for (uint32_t j = 0; j < kMaxRank; ++j) {
    basis[j] = 0.f;
    if (j < r) {
      const uint8_t* q = p + L.directions + uint64_t{first + j} * L.dir_stride;
      const int32_t code =
          side ? side_row[dm.H + first + j] : int32_t(int8_t(q[kDirectionBytes + d]));
      basis[j] = Mul(float(code), LoadF32Dev(q + 4));
    }
  }
  const float mean = side ? Mul(float(side_row[h]), L.mean_step)
                          : ToFloatDev(dm.bf16, Load16Dev(p + L.means + 2 * c));
  const float* coef = s.coefficients + uint64_t{g} * kPack * R + first;
#pragma unroll
  for (uint32_t i = 0; i < kPack; ++i) {
    if (i >= n) break;
    float v = mean;
#pragma unroll
    for (uint32_t j = 0; j < kMaxRank; ++j) {
      if (j < r) v = Add(v, Mul(coef[i * R + j], basis[j]));
    }
    const uint64_t t = uint64_t{g} * kPack + i;
    const float step =
        L.classes ? Mul(L.step, ClassScale(NibbleDev(p + L.classes, t * dm.H + h))) : L.step;
    const float y = Add(v, Mul(float(q[i]), step));
    out[t * dm.HD + c] = FromFloatDev(dm.bf16, y);
  }
}

static __global__ void __launch_bounds__(kThreads)
    DecodeKernel(DecodeBatch b, Dims dm, DecodeScratchSet set) {
  __shared__ uint32_t warp_sums[kThreads / 32];
  const uint8_t* p = b.payload + blockIdx.y * b.payload_stride;
  uint16_t* out = b.out + blockIdx.y * b.out_stride;
  const DecodeScratch s = set.At(blockIdx.y);
  const DecodeLayout L = *s.layout;
  const uint32_t g = blockIdx.x, n = min(kPack, dm.T - g * kPack);
  const uint64_t first = uint64_t{g} * kPack * dm.HD, count = uint64_t{n} * dm.HD;
  if (!L.ok) {
    for (uint64_t i = threadIdx.x; i < count; i += kThreads) out[first + i] = kInvalidOutput;
    return;
  }
  if (L.mode == kModeRaw) {
    for (uint64_t i = threadIdx.x; i < count; i += kThreads) {
      out[first + i] = Load16Dev(p + kHeaderBytes + 2 * (first + i));
    }
    return;
  }
  if (L.mode == kModeRows) {
    RowsDecodeGroup(p, L.rows, dm.T, dm.H, dm.D, dm.bf16, s.rows_heads, s.row_off, g, n, out);
    return;
  }
  if (L.mode == kModeEntropy) {  // Codes from EntropyLanesKernel.
    const uint32_t R = L.coef_cols;
    float* coef = s.coefficients + uint64_t{g} * kPack * R;
    for (uint32_t k = threadIdx.x; k < n * R; k += kThreads) {
      const uint32_t i = k / R, c = k - i * R;
      const float cs = LoadF32Dev(p + L.directions + uint64_t{c} * L.dir_stride);
      coef[i * R + c] = Mul(float(s.coef_codes[(uint64_t{g} * kPack + i) * R + c]), cs);
    }
    __syncthreads();  // The group's coefficients are in scratch.
    for (uint64_t c = threadIdx.x; c < dm.HD; c += kThreads) {
      int32_t q[kPack];
#pragma unroll
      for (uint32_t i = 0; i < kPack; ++i) {
        q[i] = i < n ? s.res_codes[(uint64_t{g} * kPack + i) * dm.HD + c] : 0;
      }
      DecodeColumn(p, L, dm, s, g, n, c, q, out);
    }
    return;
  }
  DecodeCoefficients(p, L, dm, s, g, warp_sums);
  __syncthreads();  // The group's coefficients are in scratch.
  const uint8_t* data = p + L.res_data + s.res_group[g];
  uint32_t carry = 0;
  for (uint64_t base = 0; base < dm.HD; base += kThreads) {
    const uint64_t c = base + threadIdx.x;
    const uint32_t w = c < dm.HD ? NibbleDev(p + L.res_widths, g * dm.HD + c) : 0;
    uint32_t total;
    const uint32_t off = carry + BlockExclusiveScan<uint32_t>(2 * w, warp_sums, &total);
    carry += total;
    if (c < dm.HD) {
      uint32_t u[kPack];
      UnpackPlanes(data + off, w, u);
      int32_t q[kPack];
#pragma unroll
      for (uint32_t i = 0; i < kPack; ++i) q[i] = UnZigZagDev(u[i]);
      DecodeColumn(p, L, dm, s, g, n, c, q, out);
    }
  }
}

// Mode 3: block (b, y) builds table b % kMaxTables of stream b / kMaxTables of segment y when its
// payload passed its checks and the table exists.
static __global__ void EntropyTablesKernel(DecodeScratchSet set) {
  const DecodeScratch s = set.At(blockIdx.y);
  const DecodeLayout& L = *s.layout;
  if (!L.ok || L.mode != kModeEntropy || threadIdx.x != 0) return;
  const Stream& st = L.streams[blockIdx.x / kMaxTables];
  const uint32_t k = blockIdx.x % kMaxTables;
  if (k < st.tables) BuildTable(st, k, &s.tables[blockIdx.x]);
}

// Mode 3: a thread per lane (the three streams' lanes in order) decodes its codes into scratch
// with the host decoders' DecodeLane; a corrupt lane clears layout->ok, so DecodeKernel writes
// the sentinel.
static __global__ void EntropyLanesKernel(Dims dm, DecodeScratchSet set) {
  const DecodeScratch s = set.At(blockIdx.y);
  const DecodeLayout& L = *s.layout;
  if (!L.ok || L.mode != kModeEntropy) return;
  uint32_t lane = blockIdx.x * blockDim.x + threadIdx.x, k = 0;
  while (k < 3 && lane >= L.streams[k].lanes) lane -= L.streams[k++].lanes;
  if (k == 3) return;
  const Stream& st = L.streams[k];
  int32_t* codes;
  uint64_t ld;
  StreamTarget(L, dm, s, k, &codes, &ld);
  const uint8_t* e = st.lane_dir + uint64_t{lane} * kLaneEntryBytes;
  if (!DecodeLane(s.tables + k * kMaxTables, st.column_tables, st.rows, st.cols, lane, LoadU32(e),
                  st.data + LaneOffset(st, lane), LoadU32(e + 4), codes, ld)) {
    atomicExch(&s.layout->ok, 0u);
  }
}

// ---- Host-side halves of the launchers (shared with the emulated kernel tests) -----------

// The decoding scratch of `count` segments, carved by `c` (on nullptr: counts the bytes).
inline DecodeScratchSet CarveDecodeScratch(Carver* c, const Dims& dm, uint32_t count) {
  DecodeScratchSet set;
  set.H = dm.H;
  set.D = dm.D;
  set.G = dm.G;
  set.HD = dm.HD;
  const uint64_t n = count;
  set.first.layout = c->Take<DecodeLayout>(n);
  set.first.first_col = c->Take<uint32_t>(n * (dm.H + 1));
  set.first.coef_group = c->Take<uint64_t>(n * (dm.G + 1));
  set.first.res_group = c->Take<uint64_t>(n * (dm.G + 1));
  set.first.coefficients = c->Take<float>(n * set.CoefCount());
  set.first.tables = c->Take<DecodeTable>(n * 3 * kMaxTables);
  set.first.side_codes = c->Take<int32_t>(n * dm.D * (kMaxRank + 1) * dm.H);
  set.first.coef_codes = c->Take<int32_t>(n * set.CoefCount());
  set.first.res_codes = c->Take<int32_t>(n * dm.G * kPack * dm.HD);
  set.first.rows_heads = c->Take<RowsHeadDev>(n * dm.H);
  set.first.row_off = c->Take<uint64_t>(n * (uint64_t{dm.G} * kPack * dm.H + 1));
  return set;
}

inline uint64_t DecodeScratchBytes(const Dims& dm, uint32_t count) {
  return CarvedBytes(CarveDecodeScratch, dm, count);
}

// Mode 3 lanes of one segment, at most: the means and basis stream's (9 H columns), the
// coefficient stream's (R <= 8 H columns) and the residual's.
inline uint32_t MaxLanes(const Dims& dm) {
  return uint32_t(((kMaxRank + 1) * dm.H + kLaneCols - 1) / kLaneCols +
                  (kMaxRank * dm.H + kLaneCols - 1) / kLaneCols +
                  (dm.HD + kLaneCols - 1) / kLaneCols);
}

// The decoder's launches for `n` segments, in order, through
// launch(grid_x, n, threads, shared_bytes, kernel, args...): kvpool.cu launches them on its
// stream, the emulated tests run them on the host.
template <typename Launcher>
void LaunchDecodeKernels(const Launcher& launch, const DecodeBatch& b, const Dims& dm,
                         const DecodeScratchSet& set, uint32_t n) {
  launch(1, n, kThreads, 0, ParseKernel, b, dm, set);
  launch(3 * kMaxTables, n, 32, 0, EntropyTablesKernel, set);
  launch((MaxLanes(dm) + 63) / 64, n, 64, 0, EntropyLanesKernel, dm, set);
  launch(dm.G, n, kThreads, 0, DecodeKernel, b, dm, set);
}

}  // namespace kvpool::kernels::kvpool::internal

#endif  // KVPOOL_KERNELS_KVPOOL_CUDA_KERNELS_CUH_
