// Fusion math, reference path (plain loops, double sums) and the path-independent parts.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "common/half.h"
#include "kernels/fusion.h"
#include "kernels/fusion_internal.h"

namespace kvpool::kernels {
namespace internal {

const std::vector<float>& SketchProjections() {
  // kSketchBits x kSketchSamples standard normal values from splitmix64 and Box-Muller: fixed,
  // independent of the C++ library's distributions.
  static const std::vector<float>* const projections = [] {
    auto* p = new std::vector<float>(uint64_t{kSketchBits} * kSketchSamples);
    uint64_t state = 0x6b767030'6b767030ull;
    auto next = [&state] {
      uint64_t z = (state += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      return z ^ (z >> 31);
    };
    for (size_t i = 0; i < p->size(); i += 2) {
      const double u1 = (double(next() >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
      const double u2 = double(next() >> 11) / 9007199254740992.0;
      const double r = std::sqrt(-2.0 * std::log(u1));
      (*p)[i] = static_cast<float>(r * std::cos(2 * M_PI * u2));
      if (i + 1 < p->size()) (*p)[i + 1] = static_cast<float>(r * std::sin(2 * M_PI * u2));
    }
    return p;
  }();
  return *projections;
}

uint64_t SampleCount(uint64_t n) { return std::min<uint64_t>(n, kSketchSamples); }
uint64_t SamplePosition(uint64_t k, uint64_t n, uint64_t count) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(k) * n) / count);
}

Sketch SketchRef(DType dtype, absl::Span<const uint16_t> x) {
  const std::vector<float> sample = SampleSegment(dtype, x);
  const std::vector<float>& g = SketchProjections();
  Sketch s;
  for (uint32_t b = 0; b < kSketchBits; ++b) {
    double y = 0;
    for (size_t k = 0; k < sample.size(); ++k) {
      y += double(g[uint64_t{b} * kSketchSamples + k]) * sample[k];
    }
    if (y > 0) s.bits[b / 64] |= uint64_t{1} << (b % 64);
  }
  return s;
}

Sums SumsRef(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r) {
  Sums s;
  for (size_t i = 0; i < x.size(); ++i) {
    const double a = ElementToFloat(dtype, x[i]), b = ElementToFloat(dtype, r[i]);
    s.xr += a * b;
    s.rr += b * b;
    s.xx += a * a;
    s.rmax = std::max(s.rmax, std::abs(b));
  }
  return s;
}

bool FitFromSums(double xr, double rr, double xx, Fit* fit) {
  *fit = Fit{};
  if (!std::isfinite(xr) || !std::isfinite(rr) || !std::isfinite(xx) || xx == 0 || rr == 0) {
    return false;
  }
  fit->cosine = xr / std::sqrt(xx * rr);
  fit->scale = static_cast<float>(xr / rr);
  if (!std::isfinite(fit->scale)) {
    fit->scale = 0;
    return false;
  }
  return true;
}

double RelError(double err, double xx) { return std::isfinite(err) ? std::sqrt(err / xx) : INFINITY; }

Fit FinishFit(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r, double xr,
              double rr, double xx, bool fast) {
  Fit fit;
  if (!FitFromSums(xr, rr, xx, &fit)) return fit;
  const double err = fast ? ScaledErrorCpu(dtype, x, r, fit.scale) : ScaledErrorRef(dtype, x, r,
                                                                                   fit.scale);
  fit.rel_error = RelError(err, xx);
  return fit;
}

double ScaledErrorRef(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
                      float scale) {
  double err = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float y = ElementToFloat(dtype, FloatToElement(dtype, scale * ElementToFloat(dtype, r[i])));
    const double d = double(y) - ElementToFloat(dtype, x[i]);
    err += d * d;
  }
  return err;
}

void ScaleRef(DType dtype, absl::Span<uint16_t> x, float scale) {
  for (uint16_t& h : x) h = FloatToElement(dtype, scale * ElementToFloat(dtype, h));
}

}  // namespace internal

int HammingDistance(const Sketch& a, const Sketch& b) {
  return __builtin_popcountll(a.bits[0] ^ b.bits[0]) + __builtin_popcountll(a.bits[1] ^ b.bits[1]);
}

int SketchRadius(double threshold) {
  const double c = std::clamp(threshold, -1.0, 1.0);
  const double p = std::acos(c) / M_PI;  // Chance that one bit differs.
  const double radius = kSketchBits * p + 4 * std::sqrt(kSketchBits * p * (1 - p)) + 1;
  return static_cast<int>(std::min<double>(kSketchBits, std::ceil(radius)));
}

std::vector<float> SampleSegment(DType dtype, absl::Span<const uint16_t> x) {
  const uint64_t count = internal::SampleCount(x.size());
  std::vector<float> sample(count);
  for (uint64_t k = 0; k < count; ++k) {
    sample[k] = ElementToFloat(dtype, x[internal::SamplePosition(k, x.size(), count)]);
  }
  return sample;
}

Sketch SketchSegment(DType dtype, absl::Span<const uint16_t> x, Path path) {
  return path == Path::kRef ? internal::SketchRef(dtype, x) : internal::SketchCpu(dtype, x);
}

Fit FitScaled(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
              Path path) {
  if (x.size() != r.size()) return Fit{};
  const bool ref = path == Path::kRef;
  const internal::Sums s = ref ? internal::SumsRef(dtype, x, r) : internal::SumsCpu(dtype, x, r);
  return internal::FinishFit(dtype, x, r, s.xr, s.rr, s.xx, /*fast=*/!ref);
}

Fit FitWithin(DType dtype, absl::Span<const uint16_t> x, absl::Span<const uint16_t> r,
              double budget, Path path) {
  if (x.size() != r.size()) return Fit{};
  const bool ref = path == Path::kRef;
  const internal::Sums s = ref ? internal::SumsRef(dtype, x, r) : internal::SumsCpu(dtype, x, r);
  Fit fit;
  if (!internal::FitFromSums(s.xr, s.rr, s.xx, &fit)) return fit;
  const double scale = fit.scale;
  const bool bf16 = dtype == DType::kBf16;
  // |scale * r| stays below the largest finite element (no infinity), with room for the
  // float product's rounding: the bound below holds element by element.
  const double max_finite = bf16 ? 3.3895313892515355e38 : 65504.0;
  if (std::abs(scale) * s.rmax < max_finite * (1 - 1e-6)) {
    // Reader's value y = to_dtype(float(scale * r)) against p = scale * r, exactly:
    // |y - p| <= u |p| + a, with u the float product's and the element's rounding (half an
    // ulp, relative) and a the element's subnormal spacing. So | |y - x| - |p - x| | <= B.
    const double u = (bf16 ? 0x1p-8 : 0x1p-11) + 0x1p-24 + 0x1p-30;
    const double a = bf16 ? 0x1p-130 : 0x1p-24;
    const double n = static_cast<double>(x.size());
    // |p - x|^2 from the sums; its rounding (far below 1e-9 <x, x>) is covered by the slack.
    const double d2 = s.xx - 2 * scale * s.xr + scale * scale * s.rr;
    const double d = std::sqrt(std::max(0.0, d2));
    const double bound = u * std::abs(scale) * std::sqrt(s.rr) + a * std::sqrt(n) +
                         std::sqrt(1e-9 * s.xx);
    const double norm = std::sqrt(s.xx);
    const double hi = (d + bound) / norm, lo = std::max(0.0, d - bound) / norm;
    if (hi <= budget) {
      fit.rel_error = hi;
      return fit;
    }
    if (lo > budget) {
      fit.rel_error = lo;
      return fit;
    }
  }
  const double err = ref ? internal::ScaledErrorRef(dtype, x, r, fit.scale)
                         : internal::ScaledErrorCpu(dtype, x, r, fit.scale);
  fit.rel_error = internal::RelError(err, s.xx);
  return fit;
}

std::vector<Sketch> SketchSegments(DType dtype,
                                   absl::Span<const absl::Span<const uint16_t>> segments,
                                   Path path) {
  std::vector<Sketch> out(segments.size());
  if (path == Path::kRef) {
    for (size_t i = 0; i < segments.size(); ++i) out[i] = internal::SketchRef(dtype, segments[i]);
  } else {
    internal::SketchManyCpu(dtype, segments, out.data());
  }
  return out;
}

void ScaleElements(DType dtype, absl::Span<uint16_t> x, float scale, Path path) {
  if (scale == 1.f) return;  // to_dtype(1 * v) == v for every finite and infinite v.
  if (path == Path::kRef) {
    internal::ScaleRef(dtype, x, scale);
  } else {
    internal::ScaleCpu(dtype, x, scale);
  }
}

std::vector<std::vector<uint32_t>> GroupByCosine(absl::Span<const std::vector<float>> samples,
                                                 double threshold) {
  const size_t n = samples.size();
  // Unit vectors; a zero or non-finite sample stays alone.
  std::vector<std::vector<double>> unit(n);
  std::vector<bool> usable(n, false);
  for (size_t i = 0; i < n; ++i) {
    double norm = 0;
    for (float v : samples[i]) norm += double(v) * v;
    if (!(norm > 0) || !std::isfinite(norm)) continue;
    usable[i] = true;
    unit[i].resize(samples[i].size());
    const double inv = 1 / std::sqrt(norm);
    for (size_t k = 0; k < samples[i].size(); ++k) unit[i][k] = samples[i][k] * inv;
  }
  std::vector<std::vector<uint32_t>> groups(n);
  std::vector<std::vector<double>> sum = unit;  // Sum of members' unit vectors per group.
  for (size_t i = 0; i < n; ++i) groups[i] = {static_cast<uint32_t>(i)};
  auto cosine = [&](size_t a, size_t b) {
    double ab = 0, aa = 0, bb = 0;
    for (size_t k = 0; k < sum[a].size(); ++k) {
      ab += sum[a][k] * sum[b][k];
      aa += sum[a][k] * sum[a][k];
      bb += sum[b][k] * sum[b][k];
    }
    return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : -1.0;
  };
  std::vector<bool> alive = usable;
  std::vector<std::vector<double>> cos(n, std::vector<double>(n, -2));
  for (size_t a = 0; a < n; ++a) {
    for (size_t b = a + 1; b < n; ++b) {
      if (alive[a] && alive[b] && samples[a].size() == samples[b].size()) cos[a][b] = cosine(a, b);
    }
  }
  while (true) {
    size_t best_a = n, best_b = n;
    double best = threshold;
    for (size_t a = 0; a < n; ++a) {
      if (!alive[a]) continue;
      for (size_t b = a + 1; b < n; ++b) {
        if (alive[b] && cos[a][b] >= best) {
          best = cos[a][b];
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_a == n) break;
    // Merge b into a; a's cosines to the others are recomputed.
    for (size_t k = 0; k < sum[best_a].size(); ++k) sum[best_a][k] += sum[best_b][k];
    groups[best_a].insert(groups[best_a].end(), groups[best_b].begin(), groups[best_b].end());
    groups[best_b].clear();
    alive[best_b] = false;
    for (size_t o = 0; o < n; ++o) {
      if (o == best_a || !alive[o] || samples[o].size() != samples[best_a].size()) continue;
      const double c = cosine(best_a, o);
      if (o < best_a) {
        cos[o][best_a] = c;
      } else {
        cos[best_a][o] = c;
      }
    }
  }
  std::vector<std::vector<uint32_t>> out;
  for (auto& g : groups) {
    if (g.empty()) continue;
    std::sort(g.begin(), g.end());
    out.push_back(std::move(g));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a[0] < b[0]; });
  return out;
}

void Representative(DType dtype, absl::Span<const absl::Span<const uint16_t>> members,
                    absl::Span<uint16_t> out) {
  std::vector<double> sum(out.size(), 0.0);
  double norm_sum = 0;
  uint32_t count = 0;
  for (absl::Span<const uint16_t> m : members) {
    double norm = 0;
    for (uint16_t h : m) {
      const double v = ElementToFloat(dtype, h);
      norm += v * v;
    }
    if (!(norm > 0) || !std::isfinite(norm)) continue;
    norm = std::sqrt(norm);
    for (size_t i = 0; i < out.size(); ++i) sum[i] += ElementToFloat(dtype, m[i]) / norm;
    norm_sum += norm;
    ++count;
  }
  double sum_norm = 0;
  for (double v : sum) sum_norm += v * v;
  sum_norm = std::sqrt(sum_norm);
  const double target = count > 0 ? norm_sum / count : 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double v = sum_norm > 0 ? sum[i] / sum_norm * target : 0;
    out[i] = FloatToElement(dtype, static_cast<float>(v));
  }
}

absl::Status SelfCheckCudaFusion() {
  static const absl::Status* const result = [] {
    absl::Status codecs = SelfCheckCudaCodecs();
    if (!codecs.ok()) return new absl::Status(std::move(codecs));
    // x and a representative r = 0.5 x + a little: a fit well inside any budget.
    const SegmentShape shape{16, 2, 64, DType::kFp16, SegmentKind::kKey};
    std::vector<uint16_t> x(shape.Elements()), r(shape.Elements());
    std::mt19937_64 rng(23);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (size_t i = 0; i < x.size(); ++i) {
      const float a = normal(rng);
      x[i] = FloatToElement(DType::kFp16, a);
      r[i] = FloatToElement(DType::kFp16, 0.5f * a + (i % 7 == 0 ? 0.01f : 0.f));
    }
    auto encoded = EncodeSegment(CodecParams{CodecId::kRaw}, shape, r, Path::kRef);
    if (!encoded.ok()) return new absl::Status(encoded.status());
    const absl::Span<const uint16_t> segments[] = {x};
    auto sketches = SketchSegmentsOnDevice(DType::kFp16, segments);
    const FitRequest request{x, *encoded, shape};
    auto fits = FitEncodedOnDevice({&request, 1});
    if (!sketches.ok()) return new absl::Status(sketches.status());
    if (!fits.ok()) return new absl::Status(fits.status());
    if (!((*sketches)[0] == SketchSegment(DType::kFp16, x, Path::kRef))) {
      return new absl::Status(absl::InternalError("CUDA sketch differs from the reference"));
    }
    const Fit want = FitScaled(DType::kFp16, x, r, Path::kRef);
    const Fit& got = (*fits)[0];
    if (!(std::abs(got.cosine - want.cosine) < 1e-9 &&
          std::abs(got.scale - want.scale) <= 1e-6f * std::abs(want.scale) &&
          std::abs(got.rel_error - want.rel_error) <= 1e-6 * want.rel_error + 1e-12)) {
      return new absl::Status(absl::InternalError("CUDA fit differs from the reference"));
    }
    return new absl::Status();
  }();
  return *result;
}

}  // namespace kvpool::kernels
