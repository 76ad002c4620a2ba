#include "kernels/codec.h"

#include <cpuid.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/internal/resize_uninitialized.h"
#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "kernels/codec_staging.h"
#include "kernels/device.h"
#include "kernels/kivi.h"
#include "kernels/kvpool.h"
#include "kernels/packkv.h"
#include "kernels/raw.h"

namespace kvpool::kernels {
namespace {

#if KVPOOL_HAVE_CUDA
#define KVPOOL_CUDA_OP(ns, fn) &ns::fn
// One segment through a codec's batch launchers: a batch of one.
#define KVPOOL_CUDA_ONE_OF_BATCH(ns, fn) &fn##One<&ns::fn##BatchCuda>

template <auto kEncodeBatch>
absl::Status EncodeOne(const SegmentShape& shape, const CodecParams& params, const uint16_t* d_in,
                       uint8_t* d_out, uint64_t capacity, uint64_t* d_size, cudaStream_t stream) {
  return kEncodeBatch(shape, params, 1, d_in, shape.Elements(), d_out, capacity, d_size, stream);
}

template <auto kDecodeBatch>
absl::Status DecodeOne(const SegmentShape& shape, const CodecParams& params,
                       const uint8_t* d_payload, uint64_t size, uint16_t* d_out,
                       cudaStream_t stream) {
  return kDecodeBatch(shape, params, 1, d_payload, size, &size, d_out, shape.Elements(), stream);
}
#else
#define KVPOOL_CUDA_OP(ns, fn) nullptr
#define KVPOOL_CUDA_ONE_OF_BATCH(ns, fn) nullptr
#endif

const CodecOps kOps[kNumCodecs] = {
    {&raw::MaxPayloadBytes, &raw::Encode, &raw::Decode, &raw::Encode, &raw::Decode,
     KVPOOL_CUDA_ONE_OF_BATCH(raw, Encode), KVPOOL_CUDA_ONE_OF_BATCH(raw, Decode), nullptr, nullptr,
     KVPOOL_CUDA_OP(raw, EncodeBatchCuda), KVPOOL_CUDA_OP(raw, DecodeBatchCuda)},
    {&kivi::MaxPayloadBytes, &kivi::EncodeRef, &kivi::DecodeRef, &kivi::EncodeCpu, &kivi::DecodeCpu,
     KVPOOL_CUDA_ONE_OF_BATCH(kivi, Encode), KVPOOL_CUDA_ONE_OF_BATCH(kivi, Decode), nullptr,
     nullptr, KVPOOL_CUDA_OP(kivi, EncodeBatchCuda), KVPOOL_CUDA_OP(kivi, DecodeBatchCuda)},
    {&packkv::MaxPayloadBytes, &packkv::EncodeRef, &packkv::DecodeRef, &packkv::EncodeCpu,
     &packkv::DecodeCpu, KVPOOL_CUDA_ONE_OF_BATCH(packkv, Encode),
     KVPOOL_CUDA_ONE_OF_BATCH(packkv, Decode), nullptr, nullptr,
     KVPOOL_CUDA_OP(packkv, EncodeBatchCuda), KVPOOL_CUDA_OP(packkv, DecodeBatchCuda)},
    {&kvpool::MaxPayloadBytes, &kvpool::EncodeRef, &kvpool::DecodeRef, &kvpool::EncodeCpu,
     &kvpool::DecodeCpu, KVPOOL_CUDA_ONE_OF_BATCH(kvpool, Encode),
     KVPOOL_CUDA_ONE_OF_BATCH(kvpool, Decode), &kvpool::EncodeRef, &kvpool::EncodeCpu,
     KVPOOL_CUDA_OP(kvpool, EncodeBatchCuda), KVPOOL_CUDA_OP(kvpool, DecodeBatchCuda)},
};

}  // namespace

absl::Status CheckPayloadSizes(absl::string_view codec, const uint64_t* sizes, uint32_t count,
                               uint64_t need) {
  for (uint32_t i = 0; i < count; ++i) {
    if (sizes[i] != need) {
      return absl::DataLossError(absl::StrCat(codec, " payload is ", sizes[i],
                                              " bytes, the shape and parameters need ", need));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckVariablePayloadSizes(absl::string_view codec, const uint64_t* sizes,
                                       uint32_t count, uint64_t least, uint64_t stride) {
  for (uint32_t i = 0; i < count; ++i) {
    if (sizes[i] < least) {
      return absl::DataLossError(absl::StrCat(codec, " payload ", i, " of ", sizes[i],
                                              " bytes is shorter than its fixed part, ", least));
    }
    if (count > 1 && sizes[i] > stride) {
      return absl::InvalidArgumentError(
          absl::StrCat(codec, ": payload ", i, " is longer than the batch's stride, ", stride));
    }
  }
  return absl::OkStatus();
}

absl::string_view PathName(Path path) {
  switch (path) {
    case Path::kRef:
      return "ref";
    case Path::kCpu:
      return "cpu";
    case Path::kCuda:
      return "cuda";
  }
  return "?";
}

const CodecOps& GetCodecOps(CodecId codec) { return kOps[static_cast<int>(codec)]; }

bool HasNonFinite(DType dtype, absl::Span<const uint16_t> elements) {
  // Not finite: every exponent bit set, i.e. a magnitude (x & 0x7fff) >= the exponent mask.
  // A running maximum per block of 4096 (no early exit inside: the compiler vectorises it).
  const int16_t exponent = dtype == DType::kBf16 ? 0x7f80 : 0x7c00;
  const uint16_t* p = elements.data();
  for (size_t i = 0; i < elements.size(); i += 4096) {
    const size_t end = std::min(elements.size(), i + 4096);
    int16_t top = 0;
    for (size_t j = i; j < end; ++j) top = std::max(top, int16_t(p[j] & 0x7fff));
    if (top >= exponent) return true;
  }
  return false;
}

bool EncoderDetectsNonFinite(const CodecParams& params) {
  return IsKvpoolFastProfile(params) || IsKvpoolRowsMode(params);
}

bool CodecPlansFromSamples(const CodecParams& params) { return IsKvpoolRowsMode(params); }

bool EncoderWritesEveryByte(const CodecParams& params) {
  return params.codec == CodecId::kRaw || params.codec == CodecId::kKivi ||
         IsKvpoolFastProfile(params) || IsKvpoolRowsMode(params);
}

namespace {

// KVPOOL_MAX_ISA's cap: 2 (no limit, also when unset), 1 (avx2: no AVX-512), 0 (sse2: neither).
int MaxIsa() {
  static const int level = [] {
    const char* v = std::getenv("KVPOOL_MAX_ISA");
    if (v == nullptr || *v == 0 || std::strcmp(v, "avx512") == 0) return 2;
    if (std::strcmp(v, "avx2") == 0) return 1;
    if (std::strcmp(v, "sse2") == 0) return 0;
    std::fprintf(stderr, "kvpool: ignoring KVPOOL_MAX_ISA=%s (avx512, avx2 or sse2)\n", v);
    return 2;
  }();
  return level;
}

}  // namespace

bool CpuHasAvx2() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (MaxIsa() < 1 || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = c & bit_FMA, f16c = c & bit_F16C, osxsave = c & bit_OSXSAVE;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return fma && f16c && osxsave && (b & bit_AVX2);
  }();
  return has;
}

bool CpuHasAvx512() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (MaxIsa() < 2 || !CpuHasAvx2() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool isa = (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL) &&
                     (b & bit_AVX512DQ) && (b & bit_BMI2) && (c & bit_AVX512VBMI) && (c & bit_GFNI);
    if (!isa || !__get_cpuid(0x80000001, &a, &b, &c, &d) || !(c & bit_LZCNT)) return false;
    uint32_t lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6;  // XMM, YMM, opmask and ZMM state enabled by the OS.
  }();
  return has;
}

bool CpuHasAvx512Vnni() {
  static const bool has = [] {
    unsigned a, b, c, d;
    return CpuHasAvx512() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & bit_AVX512VNNI);
  }();
  return has;
}

namespace {
thread_local bool streaming_output = false;  // The innermost StreamingOutput's, on this thread.
}  // namespace

StreamingOutput::StreamingOutput(bool enable) : previous_(streaming_output) {
  streaming_output = enable;
}
StreamingOutput::~StreamingOutput() { streaming_output = previous_; }
bool StreamingOutput::Wanted() { return streaming_output; }

absl::StatusOr<CodecParams> NormalizeParams(CodecParams p) {
  switch (p.codec) {
    case CodecId::kRaw:
      return CodecParams{CodecId::kRaw};
    case CodecId::kKivi:
      if (p.bits == 0) p.bits = 4;
      if (p.group == 0) p.group = 32;
      if (p.bits != 2 && p.bits != 4 && p.bits != 8) {
        return absl::InvalidArgumentError(
            absl::StrCat("kivi bits must be 2, 4 or 8, got ", p.bits));
      }
      p.budget = 0;
      return p;
    case CodecId::kPackKv:
      if (p.budget == 0) p.budget = 0.02f;
      if (p.group == 0) p.group = 16;
      if (p.bits == 0) p.bits = 8;
      if (p.bits < 2 || p.bits > 16) {
        return absl::InvalidArgumentError(
            absl::StrCat("packkv max bits must be in [2, 16], got ", p.bits));
      }
      break;
    case CodecId::kKvpool:
      if (p.budget == 0) p.budget = 0.05f;
      // Keys' share of the budget, in 1/64 (kvpool_ref.cc): key errors move the attention
      // output more than value errors; 24/64 gave the highest ratio at a given attention error
      // on `kvpool gen` data (README, Quality).
      if ((p.extra & 0xff) == 0) p.extra = (p.extra & ~uint64_t{0xff}) | 24;
      break;
  }
  if (!(p.budget > 0 && p.budget < 1) || std::isnan(p.budget)) {
    return absl::InvalidArgumentError(
        absl::StrCat("error budget must be in (0, 1), got ", p.budget));
  }
  if (p.group == 0 && p.codec == CodecId::kPackKv) {
    return absl::InvalidArgumentError("group must be positive");
  }
  return p;
}

namespace {

// The payload of `encoded_keys` when it is the key segment for a value segment of `shape` and
// this codec with these parameters wrote it; else empty.
absl::Span<const uint8_t> KeyPayload(absl::string_view encoded_keys, const CodecParams& params,
                                     const SegmentShape& shape) {
  if (encoded_keys.empty()) return {};
  absl::string_view payload;
  auto header = ParseSegmentUnverified(encoded_keys, &payload);
  if (!header.ok() || !(header->params == params)) return {};
  const SegmentShape& k = header->shape;
  if (k.kind != SegmentKind::kKey || k.tokens != shape.tokens || k.kv_heads != shape.kv_heads ||
      k.head_dim != shape.head_dim || k.dtype != shape.dtype) {
    return {};
  }
  return {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()};
}

}  // namespace

absl::StatusOr<std::string> EncodeSegment(const CodecParams& params, const SegmentShape& shape,
                                          absl::Span<const uint16_t> elements, Path path,
                                          absl::Span<const uint16_t> keys,
                                          absl::string_view encoded_keys, PlanCache* plans) {
  if (elements.size() != shape.Elements()) {
    return absl::InvalidArgumentError(absl::StrCat("segment has ", elements.size(),
                                                   " elements, the shape needs ",
                                                   shape.Elements()));
  }
  if (!keys.empty() && keys.size() != elements.size()) {
    return absl::InvalidArgumentError(absl::StrCat("keys have ", keys.size(),
                                                   " elements, the segment has ", elements.size()));
  }
  auto normalized = NormalizeParams(params);
  if (!normalized.ok()) return normalized.status();
  // Lossy codecs quantise finite values; a segment holding NaN or Inf is stored raw (found
  // here, or by the encoders that read every element anyway, which then return
  // InvalidArgument: see below).
  const bool encoder_checks = path != Path::kCuda && EncoderDetectsNonFinite(*normalized);
  if (normalized->codec != CodecId::kRaw && !encoder_checks &&
      HasNonFinite(shape.dtype, elements)) {
    normalized = CodecParams{CodecId::kRaw};
  }
  const CodecOps& ops = GetCodecOps(normalized->codec);
  const uint64_t capacity = ops.max_payload_bytes(shape, *normalized);
  // A value segment's keys, for the codecs whose host encoders use them.
  LayerKeys layer_keys;
  if (shape.kind == SegmentKind::kValue && path != Path::kCuda && ops.encode_cpu_keyed != nullptr) {
    if (!keys.empty()) layer_keys.elements = keys.data();
    layer_keys.payload = KeyPayload(encoded_keys, *normalized, shape);
  }
  if (path != Path::kCuda) layer_keys.plans = plans;
  const bool keyed =
      layer_keys.elements != nullptr || !layer_keys.payload.empty() || layer_keys.plans != nullptr;
  // Raw is written in place into a string of its exact size (it is the hot default). Other
  // codecs write into a per-thread scratch of their worst case, zeroed for the encoders that
  // OR bits into zeroed bytes, and the segment is copied out at its exact size: the store
  // accounts a segment's size(), and a string keeping the worst case's capacity would hold
  // about ratio times the memory it is counted for.
  std::string segment;
  thread_local std::vector<uint8_t> scratch;
  std::vector<uint8_t> large;  // Beyond kKeepScratch: not kept by the thread.
  constexpr uint64_t kKeepScratch = uint64_t{64} << 20;
  uint8_t* out;
  if (normalized->codec == CodecId::kRaw) {
    absl::strings_internal::STLStringResizeUninitialized(&segment, kSegmentHeaderBytes + capacity);
    out = reinterpret_cast<uint8_t*>(segment.data()) + kSegmentHeaderBytes;
  } else {
    const uint64_t need = kSegmentHeaderBytes + capacity;
    std::vector<uint8_t>& buf = need <= kKeepScratch ? scratch : large;
    if (buf.size() < need) buf.resize(need);
    if (!EncoderWritesEveryByte(*normalized)) std::memset(buf.data(), 0, need);
    out = buf.data() + kSegmentHeaderBytes;
  }
  absl::StatusOr<uint64_t> size;
  switch (path) {
    case Path::kRef:
      size =
          keyed && ops.encode_ref_keyed != nullptr
              ? ops.encode_ref_keyed(shape, *normalized, elements.data(), layer_keys, out, capacity)
              : ops.encode_ref(shape, *normalized, elements.data(), out, capacity);
      break;
    case Path::kCpu:
      size =
          keyed && ops.encode_cpu_keyed != nullptr
              ? ops.encode_cpu_keyed(shape, *normalized, elements.data(), layer_keys, out, capacity)
              : ops.encode_cpu(shape, *normalized, elements.data(), out, capacity);
      break;
    case Path::kCuda:
      size = EncodeOnDevice(ops, shape, *normalized, elements.data(), out, capacity);
      break;
  }
  if (!size.ok()) {
    // A lossy codec that cannot represent these values (e.g. bf16 beyond fp16's range for
    // KIVI's fp16 scales) stores the segment raw, as for NaN/Inf.
    if (absl::IsInvalidArgument(size.status()) && normalized->codec != CodecId::kRaw) {
      return EncodeSegment(CodecParams{CodecId::kRaw}, shape, elements, path);
    }
    return size.status();
  }
  if (normalized->codec == CodecId::kRaw) {
    segment.resize(kSegmentHeaderBytes + *size);
  } else {
    segment.assign(reinterpret_cast<const char*>(out - kSegmentHeaderBytes),
                   kSegmentHeaderBytes + *size);
  }
  SegmentHeader header;
  header.params = *normalized;
  header.shape = shape;
  FinishSegmentInPlace(header, &segment);
  return segment;
}

absl::Status DecodeSegment(absl::string_view encoded, absl::Span<uint16_t> out, Path path,
                           const SegmentShape* expected) {
  absl::string_view payload;
  auto header = ParseSegment(encoded, &payload);
  if (!header.ok()) return header.status();
  const SegmentShape& shape = header->shape;
  if (expected != nullptr &&
      (shape.tokens != expected->tokens || shape.kv_heads != expected->kv_heads ||
       shape.head_dim != expected->head_dim || shape.dtype != expected->dtype ||
       shape.kind != expected->kind)) {
    return absl::DataLossError("encoded segment's shape differs from the expected one");
  }
  if (out.size() != shape.Elements()) {
    return absl::InvalidArgumentError(absl::StrCat("output has ", out.size(),
                                                   " elements, the segment has ",
                                                   shape.Elements()));
  }
  const CodecOps& ops = GetCodecOps(header->params.codec);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(payload.data());
  switch (path) {
    case Path::kRef:
      return ops.decode_ref(shape, header->params, p, payload.size(), out.data());
    case Path::kCpu:
      return ops.decode_cpu(shape, header->params, p, payload.size(), out.data());
    case Path::kCuda:
      return DecodeOnDevice(ops, shape, header->params, p, payload.size(), out.data());
  }
  return absl::InternalError("unknown path");
}

namespace {

double RelL2(DType dtype, absl::Span<const uint16_t> got, absl::Span<const uint16_t> want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double a = ElementToFloat(dtype, got[i]), b = ElementToFloat(dtype, want[i]);
    err += (a - b) * (a - b);
    ref += b * b;
  }
  return ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
}

// The self-checks' segment: 64 tokens x 2 heads x 64 dims, Gaussian with one large channel (a
// key outlier).
std::vector<uint16_t> CheckSegment(const SegmentShape& shape) {
  std::vector<uint16_t> x(shape.Elements());
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = FloatToElement(shape.dtype, normal(rng) * (i % shape.head_dim == 5 ? 20.f : 1.f));
  }
  return x;
}

absl::Status CheckOneCodec(CodecId codec, DType dtype) {
  const SegmentShape shape{64, 2, 64, dtype, SegmentKind::kKey};
  const std::vector<uint16_t> x = CheckSegment(shape);
  const std::string what = absl::StrCat("codec ", CodecName(codec), " ", DTypeName(dtype), ": ");
  const CodecParams params{codec};
  auto host = EncodeSegment(params, shape, x, Path::kCpu);
  if (!host.ok()) return absl::InternalError(what + host.status().ToString());
  std::vector<uint16_t> host_decoded(x.size()), device_decoded(x.size());
  KVPOOL_RETURN_IF_ERROR(DecodeSegment(*host, absl::MakeSpan(host_decoded), Path::kCpu, &shape));
  absl::Status s = DecodeSegment(*host, absl::MakeSpan(device_decoded), Path::kCuda, &shape);
  if (!s.ok()) return absl::InternalError(what + "CUDA decode: " + s.ToString());
  if (device_decoded != host_decoded) {
    return absl::InternalError(what + "CUDA decode differs from the CPU's");
  }
  // kvpool's GPU encoder is checked with the fast profile (payload mode 1, what it writes for
  // every profile but the default, ignoring the flags) against the host's default profile, as
  // before mode 4 had a GPU encoder; that one is SelfCheckCudaRowsEncoder's, so that a
  // disagreement gives it up alone.
  CodecParams encode_params = params;
  if (codec == CodecId::kKvpool) encode_params.flags = kKvpoolFastProfile;
  auto device = EncodeSegment(encode_params, shape, x, Path::kCuda);
  if (!device.ok()) return absl::InternalError(what + "CUDA encode: " + device.status().ToString());
  s = DecodeSegment(*device, absl::MakeSpan(device_decoded), Path::kCpu, &shape);
  if (!s.ok()) return absl::InternalError(what + "CUDA-encoded segment: " + s.ToString());
  const double host_err = RelL2(dtype, host_decoded, x);
  const double device_err = RelL2(dtype, device_decoded, x);
  if (!(device_err <= 1.05 * host_err + 1e-6)) {
    return absl::InternalError(absl::StrCat(what, "CUDA encode error ", device_err,
                                            " against the CPU's ", host_err));
  }
  return absl::OkStatus();
}

}  // namespace

bool CudaEncoderKeepsProfile(const CodecParams& params) {
  return params.codec != CodecId::kKvpool || IsKvpoolFastProfile(params);
}

absl::Status SelfCheckCudaRowsEncoder() {
  static const absl::Status* const result = [] {
    if (DeviceCount() == 0) return new absl::Status(absl::UnavailableError(DescribeDevices()));
    if (GetCodecOps(CodecId::kKvpool).encode_cuda == nullptr) {
      return new absl::Status(absl::UnavailableError("kvpool: no CUDA encoder in this build"));
    }
    const CodecParams params{CodecId::kKvpool};
    for (DType dtype : {DType::kFp16, DType::kBf16}) {
      for (SegmentKind kind : {SegmentKind::kKey, SegmentKind::kValue}) {
        const SegmentShape shape{64, 2, 64, dtype, kind};
        const std::vector<uint16_t> x = CheckSegment(shape);
        auto host = EncodeSegment(params, shape, x, Path::kCpu);
        auto device = EncodeSegment(params, shape, x, Path::kCuda);
        const std::string what = absl::StrCat("kvpool mode 4 ", DTypeName(dtype), ": ");
        if (!host.ok() || !device.ok()) {
          return new absl::Status(
              absl::InternalError(what + (host.ok() ? device.status() : host.status()).ToString()));
        }
        if (*device != *host) {
          return new absl::Status(
              absl::InternalError(what + "the GPU's segment differs from the CPU's"));
        }
      }
    }
    return new absl::Status();
  }();
  return *result;
}

absl::Status SelfCheckCudaCodecs() {
  static const absl::Status* const result = [] {
    if (DeviceCount() == 0) return new absl::Status(absl::UnavailableError(DescribeDevices()));
    for (CodecId codec : {CodecId::kRaw, CodecId::kKivi, CodecId::kPackKv, CodecId::kKvpool}) {
      if (GetCodecOps(codec).decode_cuda == nullptr || GetCodecOps(codec).encode_cuda == nullptr) {
        continue;
      }
      for (DType dtype : {DType::kFp16, DType::kBf16}) {
        absl::Status s = CheckOneCodec(codec, dtype);
        if (!s.ok()) return new absl::Status(std::move(s));
      }
    }
    return new absl::Status();
  }();
  return *result;
}

}  // namespace kvpool::kernels
