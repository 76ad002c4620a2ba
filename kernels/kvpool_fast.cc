// The kvpool codec's fast profile (CodecParams::flags kFlagFast): the definition of its encoder
// (plain loops) and the encoder itself, shared by the reference and the fast CPU path, which
// differ only in their FastKernels (kvpool_avx512.cc).
//
// The profile trades about a third of the default mode's ratio for speed: it writes mode 1
// (kvpool_ref.cc documents the payload) with rank 0 for every head, so a decoder needs no
// low-rank prediction and no entropy decoding, only bit planes, one multiply and one add per
// element. What it keeps of the default:
//   - means per channel (stored as the dtype: m = to_dtype(column sum / n) over a sample of n
//     tokens, MeanStride);
//   - token classes (keys from their own elements, values from their layer's keys when the
//     caller passes them): the class map of mode 1, step * 2^(-k/4) per token and head;
//   - the budget: the relative L2 error is measured on the decoded values and the step shrunk
//     until it holds, else the segment is stored raw.
// The step: s0 from the classes' weights such that uniform rounding (error s^2 / 12 per
// element) would spend the budget of the sampled energy, refined by one pass over a sample of
// the groups of 16 tokens (error taken as proportional to s^2, aiming at kFastAim of the budget
// on the same groups' energy), then full passes until the error fits the budget of the energy
// both measure. The full pass is the only one that reads every element of a value segment
// (a key segment's distances read it once more); it also finds non-finite elements (their
// codes fail), which then go raw.
// Distances for the classes are float sums (FastKernels::distances), not TokenClasses' doubles.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/codec.h"
#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {
namespace {

bool StatsRef(DType dtype, const uint16_t* in, uint32_t T, uint64_t HD, uint32_t stride,
              float* sums, float* sq) {
  std::fill(sums, sums + HD, 0.f);
  std::fill(sq, sq + HD, 0.f);
  for (uint32_t g = 0; g < Groups(T); g += stride)
    for (uint32_t t = g * kPack; t < std::min(T, (g + 1) * kPack); ++t)
      for (uint64_t c = 0; c < HD; ++c) {
        const float x = ToFloat(dtype, in[t * HD + c]);
        if (!std::isfinite(x)) return false;
        sums[c] = sums[c] + x;
        sq[c] = sq[c] + x * x;
      }
  return true;
}

void MeansRef(DType dtype, const float* sums, uint32_t n, uint64_t HD, uint16_t* stored, float* m) {
  for (uint64_t c = 0; c < HD; ++c) {
    stored[c] = FromFloat(dtype, sums[c] / float(n));
    m[c] = ToFloat(dtype, stored[c]);
  }
}

void DistancesRef(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                  const float* m, float* dist) {
  const uint64_t HD = uint64_t{H} * D;
  for (uint32_t t = 0; t < T; ++t)
    for (uint32_t h = 0; h < H; ++h) {
      float l[16] = {};
      for (uint32_t d = 0; d < D; ++d) {
        const float v = ToFloat(dtype, in[t * HD + h * D + d]) - m[h * D + d];
        l[d % 16] = l[d % 16] + v * v;
      }
      dist[uint64_t{t} * H + h] = Tree16(l);
    }
}

uint64_t QuantizeRef(DType dtype, const uint16_t* in, uint32_t T, uint32_t H, uint32_t D,
                     const float* m, const float* steps, uint32_t stride, uint8_t* out, double* err,
                     double* energy) {
  const uint32_t G = Groups(T);
  const uint64_t HD = uint64_t{H} * D, packs = uint64_t{G} * HD;
  uint8_t* widths = out;
  uint8_t* data = out == nullptr ? nullptr : out + (packs + 1) / 2;
  if (out != nullptr) std::memset(widths, 0, (packs + 1) / 2);
  for (uint32_t g = 0; g < G; g += stride) {
    float a[4][16] = {}, b[4][16] = {};
    for (uint64_t c = 0; c < HD; ++c) {
      const uint64_t h = c / D;
      uint32_t u[kPack] = {}, all = 0;
      for (uint32_t i = 0; i < kPack && g * kPack + i < T; ++i) {
        const uint64_t t = uint64_t{g} * kPack + i;
        const float s = steps[(uint64_t{g} * H + h) * kPack + i], inv = 1.f / s;
        const float x = ToFloat(dtype, in[t * HD + c]);
        const float q = std::nearbyint((x - m[c]) * inv);
        if (!(std::fabs(q) <= kMaxCode)) return kQuantizeFailed;
        const float e = ToFloat(dtype, FromFloat(dtype, m[c] + q * s)) - x;
        a[c % 4][i] = std::fma(e, e, a[c % 4][i]);
        b[c % 4][i] = std::fma(x, x, b[c % 4][i]);
        u[i] = ZigZag(int32_t(q));
        all |= u[i];
      }
      if (out == nullptr) continue;
      uint32_t w = 0;
      while ((all >> w) != 0) ++w;
      const uint64_t k = uint64_t{g} * HD + c;
      widths[k / 2] |= uint8_t(w << (4 * (k & 1)));
      for (uint32_t b = 0; b < w; ++b) {
        uint32_t plane = 0;
        for (uint32_t i = 0; i < kPack; ++i) plane |= ((u[i] >> b) & 1u) << i;
        *data++ = uint8_t(plane);
        *data++ = uint8_t(plane >> 8);
      }
    }
    float l[16], v[16];
    for (int i = 0; i < 16; ++i) {
      l[i] = (a[0][i] + a[1][i]) + (a[2][i] + a[3][i]);
      v[i] = (b[0][i] + b[1][i]) + (b[2][i] + b[3][i]);
    }
    *err += double(Tree16(l));
    *energy += double(Tree16(v));
  }
  return out == nullptr ? 0 : uint64_t(data - out);
}

struct Scratch {
  std::vector<float> sums, sq, m, km, dist, steps, scale;
  std::vector<uint16_t> stored, kstored;
  std::vector<uint8_t> classes, buffer;
};

}  // namespace

absl::Status NonFinite() {
  return absl::InvalidArgumentError("kvpool: elements not finite (stored raw)");
}

bool DecodedMeans(const SegmentShape& shape, const uint16_t* in, const FastKernels& kn,
                  std::vector<float>* sums, std::vector<float>* sq, std::vector<float>* m,
                  std::vector<uint16_t>* stored, double* energy) {
  const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
  const uint32_t T = shape.tokens, stride = MeanStride(Groups(T));
  sums->resize(HD);
  sq->resize(HD);
  m->resize(HD);
  stored->resize(HD);
  if (!kn.stats(shape.dtype, in, T, HD, stride, sums->data(), sq->data())) return false;
  uint32_t n = 0;
  for (uint32_t g = 0; g < Groups(T); g += stride) n += std::min(kPack, T - g * kPack);
  kn.means(shape.dtype, sums->data(), n, HD, stored->data(), m->data());
  double e = 0;
  for (uint64_t c = 0; c < HD; ++c) e += double((*sq)[c]);
  *energy = e * T / n;
  return true;
}

void FastClasses(const SegmentShape& shape, const uint16_t* keys, const float* km,
                 const FastKernels& kn, std::vector<float>* dist, std::vector<uint8_t>* classes) {
  const uint32_t T = shape.tokens, H = shape.kv_heads;
  classes->clear();
  if (T < 2) return;
  dist->resize(uint64_t{T} * H);
  kn.distances(shape.dtype, keys, T, H, shape.head_dim, km, dist->data());
  classes->assign(uint64_t{T} * H, 0);
  bool varied = false;
  for (uint32_t h = 0; h < H; ++h) {
    double total = 0;
    for (uint32_t t = 0; t < T; ++t) total += double((*dist)[uint64_t{t} * H + h]);
    if (!(total > 0) || !std::isfinite(total)) continue;
    const double per_z = 2 * kTokenWeighting / std::log(2.0) * T / total;
    for (uint32_t t = 0; t < T; ++t) {
      const uint64_t i = uint64_t{t} * H + h;
      (*classes)[i] = ClassOf(double((*dist)[i]), per_z);
      varied = varied || (*classes)[i] != (*classes)[0];
    }
  }
  if (!varied) classes->clear();
}

const FastKernels& FastRefKernels() {
  static const FastKernels k = {&StatsRef, &MeansRef, &DistancesRef, &QuantizeRef};
  return k;
}

absl::StatusOr<uint64_t> FastEncode(const SegmentShape& shape, const CodecParams& params,
                                    const uint16_t* in, const LayerKeys& keys,
                                    const FastKernels& kn, uint8_t* out, uint64_t capacity) {
  const uint64_t raw_bytes = RawPayloadBytes(shape);
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim, G = Groups(T);
  const uint64_t HD = uint64_t{H} * D, packs = uint64_t{G} * HD;
  thread_local Scratch s;
  double energy = 0, key_energy = 0;
  if (shape.Elements() == 0) return WriteRawPayload(shape, in, out, capacity);
  if (!DecodedMeans(shape, in, kn, &s.sums, &s.sq, &s.m, &s.stored, &energy)) {
    return NonFinite();
  }
  s.classes.clear();
  if (!(params.flags & kFlagEqualTokens)) {
    if (shape.kind == SegmentKind::kKey) {
      FastClasses(shape, in, s.m.data(), kn, &s.dist, &s.classes);
    } else if (!KeyClasses(shape, keys.payload, &s.classes) && keys.elements != nullptr &&
               DecodedMeans(shape, keys.elements, kn, &s.sums, &s.sq, &s.km, &s.kstored,
                            &key_energy)) {
      FastClasses(shape, keys.elements, s.km.data(), kn, &s.dist, &s.classes);
    }
  }
  // Step multipliers [G][H][16] (tokens >= T: 1) and their weight sum(scale^2) * D.
  s.scale.assign(packs / D * kPack, 1.f);
  double weight = double(T) * HD;
  if (!s.classes.empty()) {
    weight = 0;
    float by_class[kClasses];
    for (uint32_t k = 0; k < kClasses; ++k) by_class[k] = ClassScale(k);
    for (uint32_t t = 0; t < T; ++t) {
      float* row = s.scale.data() + uint64_t{t / kPack} * H * kPack + t % kPack;
      const uint8_t* k = s.classes.data() + uint64_t{t} * H;
      for (uint32_t h = 0; h < H; ++h) {
        const float f = by_class[k[h]];
        row[h * kPack] = f;
        weight += double(f) * f * D;
      }
    }
  }
  // The allowed squared error is target^2 times the energy; the energy is estimated from the
  // sampled groups until the output pass measures it.
  const double target = TargetError(shape, params), share = target * target;
  double step = std::sqrt(12.0 * share * energy / weight);
  if (!(step >= 1e-30) || !std::isfinite(step)) step = 1.0;  // All zeros: any step is exact.
  s.steps.resize(s.scale.size());
  auto quantize = [&](float at, uint32_t stride, uint8_t* dst, double* err, double* en) {
    for (uint64_t i = 0; i < s.scale.size(); ++i) s.steps[i] = at * s.scale[i];
    *err = 0;
    *en = 0;
    return kn.quantize(shape.dtype, in, T, H, D, s.m.data(), s.steps.data(), stride, dst, err, en);
  };
  const uint32_t stride = EstimateStride(G);
  if (G >= 2 * stride && energy > 0) {
    double err = 0, en = 0;
    if (quantize(float(step), stride, nullptr, &err, &en) != kQuantizeFailed && err > 0) {
      const double factor = std::sqrt(kFastAim * share * en / err);
      step *= std::min(4.0, std::max(0.25, factor));
    }
  }
  // The payload up to the residual stream: header, ranks (0), means, class map.
  const uint64_t head = kHeaderBytes + H + 2 * HD + (s.classes.size() + 1) / 2;
  uint8_t* dst = out;
  if (capacity < head + PackBound(packs)) {
    s.buffer.resize(head + PackBound(packs));
    dst = s.buffer.data();
  }
  std::memset(dst, 0, head);
  dst[0] = kModeCoded;
  dst[1] = s.classes.empty() ? 0 : kHeadClasses;
  for (uint64_t c = 0; c < HD; ++c) {
    dst[kHeaderBytes + H + 2 * c] = uint8_t(s.stored[c]);
    dst[kHeaderBytes + H + 2 * c + 1] = uint8_t(s.stored[c] >> 8);
  }
  for (uint64_t i = 0; i < s.classes.size(); ++i) {
    dst[kHeaderBytes + H + 2 * HD + i / 2] |= uint8_t(s.classes[i] << (4 * (i & 1)));
  }
  uint64_t size = 0;
  for (int it = 0; it < kMaxSearch; ++it) {
    const float at = float(step);
    if (!(at > 0) || !std::isfinite(at)) break;
    double err = 0, en = 0;
    const uint64_t n = quantize(at, 1, dst + head, &err, &en);
    if (n == kQuantizeFailed) {
      // An element not finite, or codes too wide (finer steps only widen them).
      if (HasNonFinite(shape.dtype, {in, shape.Elements()})) return NonFinite();
      break;
    }
    const double allowed = share * en;
    if (err <= allowed) {
      std::memcpy(dst + 4, &at, 4);
      size = head + n;
      break;
    }
    step *= std::max(0.25, std::min(0.995, std::sqrt(kFastAim * allowed / err)));
  }
  if (size == 0 || size >= raw_bytes) return WriteRawPayload(shape, in, out, capacity);
  if (capacity < size) return absl::InvalidArgumentError("kvpool: output too small");
  if (dst != out) std::memcpy(out, dst, size);
  return size;
}

}  // namespace kvpool::kernels::kvpool::internal
