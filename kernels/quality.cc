#include "kernels/quality.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace kvpool::kernels {
namespace {

// softmax(q K^T * scale) V for one query; K, V are [tokens][stride] starting at the head.
void Attend(const float* q, const float* k, const float* v, uint32_t tokens, uint64_t stride,
            uint32_t d, double scale, std::vector<double>* logits, std::vector<double>* out) {
  double max_logit = -INFINITY;
  for (uint32_t t = 0; t < tokens; ++t) {
    double s = 0;
    for (uint32_t i = 0; i < d; ++i) s += double(q[i]) * k[t * stride + i];
    (*logits)[t] = s * scale;
    max_logit = std::max(max_logit, (*logits)[t]);
  }
  double z = 0;
  for (uint32_t t = 0; t < tokens; ++t) z += ((*logits)[t] = std::exp((*logits)[t] - max_logit));
  std::fill(out->begin(), out->end(), 0.0);
  for (uint32_t t = 0; t < tokens; ++t) {
    const double w = (*logits)[t] / z;
    for (uint32_t i = 0; i < d; ++i) (*out)[i] += w * v[t * stride + i];
  }
}

}  // namespace

Quality MeasureQuality(absl::Span<const float> original, absl::Span<const float> decoded,
                       uint32_t layers, uint32_t tokens, uint32_t heads, uint32_t d,
                       const QualityOptions& options) {
  Quality q;
  const uint64_t per_kind = uint64_t{tokens} * heads * d;
  double err[2] = {0, 0}, ref[2] = {0, 0};
  for (uint64_t i = 0; i < original.size(); ++i) {
    const int kind = static_cast<int>((i / per_kind) % 2);
    const double diff = double(decoded[i]) - original[i];
    err[kind] += diff * diff;
    ref[kind] += double(original[i]) * original[i];
    q.max_abs = std::max(q.max_abs, std::abs(diff));
  }
  auto ratio = [](double e, double r) { return r > 0 ? std::sqrt(e / r) : (e > 0 ? INFINITY : 0); };
  q.rel_l2 = ratio(err[0] + err[1], ref[0] + ref[1]);
  q.key_rel_l2 = ratio(err[0], ref[0]);
  q.value_rel_l2 = ratio(err[1], ref[1]);
  if (tokens == 0 || d == 0) return q;

  std::mt19937_64 rng(options.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> query(d);
  std::vector<double> logits(tokens), out_ref(d), out_dec(d);
  double attn_err = 0, attn_ref = 0;
  const uint64_t stride = uint64_t{heads} * d;
  for (uint32_t l = 0; l < layers; ++l) {
    const uint64_t k_off = uint64_t{l} * 2 * per_kind;
    const uint64_t v_off = k_off + per_kind;
    for (uint32_t h = 0; h < heads; ++h) {
      const float* k0 = original.data() + k_off + uint64_t{h} * d;
      const float* v0 = original.data() + v_off + uint64_t{h} * d;
      const float* k1 = decoded.data() + k_off + uint64_t{h} * d;
      const float* v1 = decoded.data() + v_off + uint64_t{h} * d;
      for (uint32_t n = 0; n < options.queries_per_head; ++n) {
        for (float& x : query) x = normal(rng);
        // Calibrate: logits' standard deviation over tokens equals logit_std.
        double sum = 0, sum2 = 0;
        for (uint32_t t = 0; t < tokens; ++t) {
          double s = 0;
          for (uint32_t i = 0; i < d; ++i) s += double(query[i]) * k0[t * stride + i];
          sum += s;
          sum2 += s * s;
        }
        const double var = sum2 / tokens - (sum / tokens) * (sum / tokens);
        const double scale = var > 0 ? options.logit_std / std::sqrt(var) : 1.0;
        Attend(query.data(), k0, v0, tokens, stride, d, scale, &logits, &out_ref);
        Attend(query.data(), k1, v1, tokens, stride, d, scale, &logits, &out_dec);
        for (uint32_t i = 0; i < d; ++i) {
          attn_err += (out_dec[i] - out_ref[i]) * (out_dec[i] - out_ref[i]);
          attn_ref += out_ref[i] * out_ref[i];
        }
      }
    }
  }
  q.attn_rel_l2 = ratio(attn_err, attn_ref);
  return q;
}

}  // namespace kvpool::kernels
