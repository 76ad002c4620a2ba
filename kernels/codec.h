// Codecs: turn one segment ([tokens][kv_heads][head_dim] fp16/bf16 elements) into an encoded
// segment (common/encoded_segment.h) and back. Every codec has three paths that read and write
// the same payload format:
//   kRef  - the CPU reference: plain loops, the definition of the format (<codec>_ref.cc);
//   kCpu  - the fast CPU path (<codec>_cpu.cc): AVX2/F16C when the CPU has them, at run time;
//   kCuda - the CUDA kernels and their launchers (<codec>.cu), device memory in and out.
// Decoding a payload gives the same values on every path (bit-exact). Encoders may round
// differently in rare ties; every path's output decodes on every other path.
//
// Payload functions (one set per codec, in kernels/<codec>.h):
//   MaxPayloadBytes(shape, params) - an upper bound for EncodePayload.
//   Encode(shape, params, in, out, capacity) -> payload size; in: Elements() elements.
//   Decode(shape, params, payload, size, out) -> OK; never reads or writes out of bounds:
//     DataLoss for a payload inconsistent with the shape, InvalidArgument for bad params.
// CUDA launchers take device pointers and a stream, enqueue work, never synchronise the
// device, and write the payload size to a device uint64 (*d_size).
//
// Thread-safe (stateless but for a PlanCache, which is thread-safe, and a thread's own
// StreamingOutput setting).
#ifndef KVPOOL_KERNELS_CODEC_H_
#define KVPOOL_KERNELS_CODEC_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/encoded_segment.h"

// The CUDA runtime's own declaration, so that this header needs no CUDA headers.
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace kvpool::kernels {

enum class Path : uint8_t { kRef = 0, kCpu = 1, kCuda = 2 };
absl::string_view PathName(Path path);  // "ref", "cpu", "cuda"

// What an encoder keeps between the segments of one stream: one model's layer and kind (K or V),
// whose statistics change slowly from block to block. kvpool's default profile plans each
// segment from a sample (means, basis, outlier channels, step model: about 40 % of its encode);
// given a cache it plans one segment in replan_every and reuses that plan for the others, the
// step solved from the error the stream's last segment measured against the plan's model
// (aiming lower after misses). A reused plan that misses a segment's budget is replaced at
// once: that segment plans afresh and is coded again (one pass more). A payload stays
// self-describing and every segment's error is measured, so a stale plan costs ratio and
// time, never the budget; the bytes then depend on the order of encodes. 80-120 KiB per stream
// for 8 heads of 128 (the plan's means, basis and model rows). Thread-safe: a stream's
// encoders may run at once, and only one of them makes the next plan while the others reuse
// the last. One per stream: one shared by layers would replan at every layer and gain little.
class PlanCache {
 public:
  struct State;  // The codec's (kvpool_rows_encoder.cc); With() and Record() are for it alone.
  static constexpr uint64_t kReplanEvery = 32;
  // How a segment was coded: with a plan of its own; with its stream's; or its stream's plan
  // missed its budget and it was planned afresh (a pass more).
  enum class Outcome { kPlanned, kReused, kReplaced };
  // Counts by outcome, and the bytes of the plans the caches hold (over caches: a daemon's,
  // for /metrics).
  struct Counts {
    std::atomic<uint64_t> planned{0}, reused{0}, replaced{0};
    std::atomic<int64_t> plan_bytes{0};
    void Add(Outcome o);
  };

  // `replan_every`: segments per plan at most (1: each plans afresh, as without a cache);
  // `shared`: counts this cache adds to besides its own (may be null).
  explicit PlanCache(uint64_t replan_every = kReplanEvery,
                     std::shared_ptr<Counts> shared = nullptr);
  ~PlanCache();
  PlanCache(const PlanCache&) = delete;
  PlanCache& operator=(const PlanCache&) = delete;

  uint64_t replan_every() const { return replan_every_; }
  // Segments coded by each Outcome.
  uint64_t planned() const { return own_.planned.load(std::memory_order_relaxed); }
  uint64_t reused() const { return own_.reused.load(std::memory_order_relaxed); }
  uint64_t replaced() const { return own_.replaced.load(std::memory_order_relaxed); }
  // Heap bytes of the plan the cache holds (its arrays, counted by their capacities; 0 before
  // the first). Plans a segment still codes with after the cache moved on are not counted.
  uint64_t plan_bytes() const { return uint64_t(own_.plan_bytes.load(std::memory_order_relaxed)); }

  // The state (null until the codec makes one), under the cache's lock.
  void With(absl::FunctionRef<void(std::unique_ptr<State>&)> fn);
  // One segment coded.
  void Record(Outcome outcome);
  // The cache now holds a plan of `bytes` (in place of the one before).
  void HoldPlanBytes(uint64_t bytes);

 private:
  const uint64_t replan_every_;
  const std::shared_ptr<Counts> shared_;
  Counts own_;
  absl::Mutex mu_;
  std::unique_ptr<State> state_ ABSL_GUARDED_BY(mu_);
};

// A PlanCache per segment of a model's blocks (segment s: layer s / 2's K when s is even, its
// V when odd), each the stream of that segment across blocks: what the daemon keeps per model,
// and what EncodeKv and the bench keep for a sequence. Thread-safe.
class BlockPlans {
 public:
  // `segments`: 2 * layers; `replan_every` and `counts`: each PlanCache's.
  explicit BlockPlans(uint64_t segments, uint64_t replan_every = PlanCache::kReplanEvery,
                      std::shared_ptr<PlanCache::Counts> counts = nullptr);
  uint64_t segments() const { return caches_.size(); }
  // Segment s's cache, null past segments().
  PlanCache* For(uint64_t s) const { return s < caches_.size() ? caches_[s].get() : nullptr; }
  // The plans' bytes over the caches (PlanCache::plan_bytes).
  uint64_t plan_bytes() const;

 private:
  std::vector<std::unique_ptr<PlanCache>> caches_;
};

// What a value segment's encoder may use of its layer's key segment of the same tokens (codecs
// that spend more bits on the tokens queries are likely to attend to, by their keys: kvpool).
// Either or both: the key segment's elements, and the payload the same codec with the same
// parameters wrote for them, from which kvpool takes the keys' token classes instead of
// computing them again (a hint: a payload without them, or not of this codec, is ignored).
//
// `plans` (optional, any segment): the PlanCache of the segment's stream, for the codecs whose
// encoders plan from a sample (kvpool's default profile).
struct LayerKeys {
  const uint16_t* elements = nullptr;
  absl::Span<const uint8_t> payload;
  PlanCache* plans = nullptr;
};

// CUDA launchers for `count` segments of one shape in one set of launches, stream-ordered,
// device pointers. Segment i reads d_in + i * in_stride elements, writes its payload at
// d_out + i * out_stride (bytes, at least max_payload_bytes) and its size to d_sizes[i];
// decoding reads the payload (sizes[i] bytes, `sizes` a host array of `count`) at
// d_payload + i * payload_stride and writes d_out + i * out_stride elements. Codecs declare
// theirs with these types (`CudaEncodeBatchFn EncodeBatchCuda;`); one segment is a batch of one.
using CudaEncodeBatchFn = absl::Status(const SegmentShape& shape, const CodecParams& params,
                                       uint32_t count, const uint16_t* d_in, uint64_t in_stride,
                                       uint8_t* d_out, uint64_t out_stride, uint64_t* d_sizes,
                                       cudaStream_t stream);
using CudaDecodeBatchFn = absl::Status(const SegmentShape& shape, const CodecParams& params,
                                       uint32_t count, const uint8_t* d_payload,
                                       uint64_t payload_stride, const uint64_t* sizes,
                                       uint16_t* d_out, uint64_t out_stride, cudaStream_t stream);

// DataLoss naming the first of `count` payload sizes that is not `need` (fixed-size formats'
// batch decoders check every segment with it).
absl::Status CheckPayloadSizes(absl::string_view codec, const uint64_t* sizes, uint32_t count,
                               uint64_t need);
// The same for variable-size formats: DataLoss for a size below `least` (the payload's fixed
// part), InvalidArgument for one above the batch's `stride` (a batch of one has no stride).
absl::Status CheckVariablePayloadSizes(absl::string_view codec, const uint64_t* sizes,
                                       uint32_t count, uint64_t least, uint64_t stride);

// The payload functions of one codec (host paths) and its CUDA launchers (null when the build
// has no CUDA or the codec has no kernel).
struct CodecOps {
  uint64_t (*max_payload_bytes)(const SegmentShape&, const CodecParams&);
  absl::StatusOr<uint64_t> (*encode_ref)(const SegmentShape&, const CodecParams&, const uint16_t* in,
                                         uint8_t* out, uint64_t capacity);
  absl::Status (*decode_ref)(const SegmentShape&, const CodecParams&, const uint8_t* payload,
                             uint64_t size, uint16_t* out);
  absl::StatusOr<uint64_t> (*encode_cpu)(const SegmentShape&, const CodecParams&, const uint16_t* in,
                                         uint8_t* out, uint64_t capacity);
  absl::Status (*decode_cpu)(const SegmentShape&, const CodecParams&, const uint8_t* payload,
                             uint64_t size, uint16_t* out);
  absl::Status (*encode_cuda)(const SegmentShape&, const CodecParams&, const uint16_t* d_in,
                              uint8_t* d_out, uint64_t capacity, uint64_t* d_size,
                              cudaStream_t stream);
  absl::Status (*decode_cuda)(const SegmentShape&, const CodecParams&, const uint8_t* d_payload,
                              uint64_t size, uint16_t* d_out, cudaStream_t stream);
  // The host encoders given, for a value segment, its layer's keys (LayerKeys); null for
  // codecs that do not use them.
  absl::StatusOr<uint64_t> (*encode_ref_keyed)(const SegmentShape&, const CodecParams&,
                                               const uint16_t* in, const LayerKeys& keys,
                                               uint8_t* out, uint64_t capacity);
  absl::StatusOr<uint64_t> (*encode_cpu_keyed)(const SegmentShape&, const CodecParams&,
                                               const uint16_t* in, const LayerKeys& keys,
                                               uint8_t* out, uint64_t capacity);
  // Batch launchers (CudaEncodeBatchFn, CudaDecodeBatchFn); null: the codec has none, and
  // callers launch encode_cuda / decode_cuda per segment.
  CudaEncodeBatchFn* encode_cuda_batch;
  CudaDecodeBatchFn* decode_cuda_batch;
};

const CodecOps& GetCodecOps(CodecId codec);

// Fills in defaults for unset fields (kivi: 4 bits, group 32; packkv: budget 0.02, pack 16,
// 8 max bits; kvpool: budget 0.05, keys held to 24/64 of it) and checks the rest. InvalidArgument naming the field.
absl::StatusOr<CodecParams> NormalizeParams(CodecParams params);

// Encodes `elements` (shape.Elements() elements of shape.dtype) into a whole encoded segment on
// a host path (kRef or kCpu; kCuda stages through device memory and synchronises: tools and
// tests only). A lossy codec given NaN or Inf elements, or values its format cannot represent,
// stores the segment raw instead (the header says which codec was used). InvalidArgument for a
// size mismatch or bad params.
//
// `keys` (optional, value segments): the key segment of the same layer and tokens, which
// kvpool uses to spend more bits on the tokens queries are likely to attend to; ignored for
// key segments, other codecs and kCuda. InvalidArgument when its size differs from elements'.
//
// `encoded_keys` (optional, value segments): those keys' encoded segment; when this codec with
// the same parameters wrote it, kvpool takes the keys' token classes from it (the same classes,
// without reading the keys again; the checksum is not verified: the classes only move bits
// between tokens, the value's encoder measures its own error). Else it is ignored.
//
// `plans` (optional, any segment; host paths): the PlanCache of the segment's stream (its
// model's layer and kind), for the codecs that plan from a sample.
absl::StatusOr<std::string> EncodeSegment(const CodecParams& params, const SegmentShape& shape,
                                          absl::Span<const uint16_t> elements, Path path,
                                          absl::Span<const uint16_t> keys = {},
                                          absl::string_view encoded_keys = {},
                                          PlanCache* plans = nullptr);

// Parses, verifies and decodes a whole encoded segment into `out` (exactly Elements() elements).
// DataLoss / InvalidArgument from ParseSegment and the codec; InvalidArgument when `out` has
// the wrong size or the segment's shape differs from `expected` (if given).
absl::Status DecodeSegment(absl::string_view encoded, absl::Span<uint16_t> out, Path path,
                           const SegmentShape* expected = nullptr);

// Checks this process's CUDA codec kernels against the host paths once, on a fixed segment per
// codec and dtype: decoding on the GPU must give the CPU's values bit for bit, and a GPU-encoded
// segment decoded on the CPU must be as close to the input as the CPU's own encoding (within 5%
// of its error; kvpool's GPU encoder with the fast profile, payload mode 1, against the CPU's
// default profile). The first call runs the check (blocks: tens of milliseconds) and later calls
// return its result. OK when they agree; Unavailable without CUDA or a device; Internal naming
// the codec, dtype and disagreement otherwise (callers then keep to the host paths or refuse).
absl::Status SelfCheckCudaCodecs();
// The same for kvpool's default profile's GPU encoder (payload mode 4), apart so that a
// disagreement gives up that encoder alone: its segments (a key and a value per dtype) must be
// the CPU's byte for byte.
absl::Status SelfCheckCudaRowsEncoder();

// True when the daemon's `gpu_encode: auto` encodes segments with these parameters on the GPU:
// every codec but kvpool's default and entropy profiles. For the entropy profile the GPU writes
// payload mode 1 (the fast profile's, without token classes; README: CUDA), about half the
// ratio at the same error. For the default profile it writes the host's payload mode 4, the
// host's bytes for the same segment (kvpool_rows_cuda_encoder.cuh), but planned on the host
// and synchronising per pass, not yet timed on a GPU, and without the daemon's plan caches and
// its values' key classes: the CPU stays the default until a GPU run says otherwise. For the
// fast profile the GPU's payload lacks the token classes (about 1.15x KIVI-4's ratio at its
// error against the host's 1.22x).
bool CudaEncoderKeepsProfile(const CodecParams& params);

// True when any element is NaN or Inf (such segments are stored raw by lossy codecs).
bool HasNonFinite(DType dtype, absl::Span<const uint16_t> elements);

// True when the codec's host encoders (ref and cpu) return InvalidArgument for NaN or Inf
// elements themselves, so that EncodeSegment need not scan for them first (it then stores the
// segment raw either way).
bool EncoderDetectsNonFinite(const CodecParams& params);

// True when the codec's host encoders (ref and cpu) write every byte of the payload they
// return, so that EncodeSegment need not zero their output buffer first (the others OR bits
// into zeroed bytes). tests/kernels/codec_test.cc checks it against buffers of garbage.
bool EncoderWritesEveryByte(const CodecParams& params);

// True when the codec's host encoder plans from a sample and so takes a PlanCache (kvpool's
// default profile, payload mode 4).
bool CodecPlansFromSamples(const CodecParams& params);

// The environment variable KVPOOL_MAX_ISA caps what the next three report, read once per
// process: avx2 (no AVX-512), sse2 (neither AVX2 nor AVX-512) or avx512 (no cap, as unset), so
// that a CPU with more runs the paths of one with less (tests, benchmarks, a suspect kernel).

// True when the CPU has AVX2, FMA and F16C (the fast CPU paths use them).
bool CpuHasAvx2();

// True when the CPU and OS support AVX-512 F, BW, VL, DQ and VBMI, GFNI, BMI2 and LZCNT besides
// AVX2 (the kvpool codec's fast profile uses them; without, it runs the reference kernels).
bool CpuHasAvx512();

// True when CpuHasAvx512() and the CPU has AVX-512 VNNI (kvpool's mode 4 decoder has a build
// for it).
bool CpuHasAvx512Vnni();

// Sets, for its lifetime, whether decodes on this thread may write their output with streaming
// (non-temporal) stores, which do not first read each output line into the cache; the
// innermost one alive wins, and without one they may not. Only the AVX2 and AVX-512 decoders
// of kvpool's default profile (Path::kCpu) have such stores; they use them for an output
// aligned to 16 bytes and fence before returning, so the output may go to another thread or a
// DMA at once. For outputs written once and not read back by this CPU soon, such as a client's
// large get handed to its caller: decoding into 128 MiB they ran 14-15 % faster, into 16 MiB
// 3-5 %, into a buffer that stays in cache as fast (README: Speed); a caller that reads the
// output right away reads it from memory. Confined to its thread: construct and destroy it on
// the thread whose decodes it governs, as a named local (an unnamed temporary ends at once).
class StreamingOutput {
 public:
  explicit StreamingOutput(bool enable = true);
  ~StreamingOutput();
  StreamingOutput(const StreamingOutput&) = delete;
  StreamingOutput& operator=(const StreamingOutput&) = delete;

  // The innermost StreamingOutput's `enable` on this thread; false without one.
  static bool Wanted();

 private:
  const bool previous_;  // This thread's setting before this one, restored after.
};

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CODEC_H_
