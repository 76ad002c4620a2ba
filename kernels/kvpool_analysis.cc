// The kvpool codec's encoder analysis (the definition; kvpool_ref.cc documents the payload):
// channel means, a low-rank basis per head found by a sketched subspace iteration and a small
// eigen-decomposition, their quantisation, and the prediction every decoder will form. Shared
// by the reference and the fast CPU encoder, which differ only in their EncodeKernels.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kvpool_format.h"

namespace kvpool::kernels::kvpool::internal {

void Jacobi(int k, std::vector<double>* a, std::vector<double>* v, double tolerance) {
  v->assign(k * k, 0);
  for (int i = 0; i < k; ++i) (*v)[i * k + i] = 1;
  double* m = a->data();
  for (int sweep = 0; sweep < 30; ++sweep) {
    double off = 0, diag = 0;
    for (int p = 0; p < k; ++p) {
      diag += m[p * k + p] * m[p * k + p];
      for (int q = p + 1; q < k; ++q) off += m[p * k + q] * m[p * k + q];
    }
    if (off < 1e-30 || off <= tolerance * diag) break;
    for (int p = 0; p < k; ++p) {
      for (int q = p + 1; q < k; ++q) {
        if (std::fabs(m[p * k + q]) < 1e-300) continue;
        const double theta = (m[q * k + q] - m[p * k + p]) / (2 * m[p * k + q]);
        const double t = (theta >= 0 ? 1 : -1) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int r = 0; r < k; ++r) {  // columns p, q
          const double x = m[r * k + p], y = m[r * k + q];
          m[r * k + p] = c * x - s * y;
          m[r * k + q] = s * x + c * y;
        }
        for (int r = 0; r < k; ++r) {  // rows p, q
          const double x = m[p * k + r], y = m[q * k + r];
          m[p * k + r] = c * x - s * y;
          m[q * k + r] = s * x + c * y;
        }
        for (int r = 0; r < k; ++r) {
          const double x = (*v)[r * k + p], y = (*v)[r * k + q];
          (*v)[r * k + p] = c * x - s * y;
          (*v)[r * k + q] = s * x + c * y;
        }
      }
    }
  }
}

double Omega(uint32_t t, uint32_t j) {
  uint32_t h = t * 0x9E3779B1u ^ (j + 1) * 0x85EBCA77u;
  h ^= h >> 15;
  h *= 0x2C1B3C6Du;
  h ^= h >> 12;
  return (h & 1) ? 1.0 : -1.0;
}

namespace {

// Orthonormalises the k rows of s (k x D, double, Gram-Schmidt twice) into q (float); returns
// the number kept.
uint32_t Orthonormalise(std::vector<double>* s, uint32_t k, uint32_t D, std::vector<float>* q) {
  uint32_t kept = 0;
  for (uint32_t j = 0; j < k; ++j) {
    double* row = &(*s)[j * D];
    double norm0 = 0;
    for (uint32_t d = 0; d < D; ++d) norm0 += row[d] * row[d];
    for (int pass = 0; pass < 2; ++pass)
      for (uint32_t i = 0; i < kept; ++i) {
        double dot = 0;
        for (uint32_t d = 0; d < D; ++d) dot += row[d] * (*s)[i * D + d];
        for (uint32_t d = 0; d < D; ++d) row[d] -= dot * (*s)[i * D + d];
      }
    double norm = 0;
    for (uint32_t d = 0; d < D; ++d) norm += row[d] * row[d];
    if (!(norm > 1e-20 * norm0) || !(norm > 0) || !std::isfinite(norm)) continue;
    norm = std::sqrt(norm);
    for (uint32_t d = 0; d < D; ++d) (*s)[kept * D + d] = row[d] / norm;
    ++kept;
  }
  q->resize(kept * D);
  for (uint32_t i = 0; i < kept * D; ++i) (*q)[i] = float((*s)[i]);
  return kept;
}

// Orthonormal directions of the head's centred rows xc[t][d] (T x D) that hold more than
// `threshold` variance per token, strongest first: rows of `dirs` (r x D). A sketched subspace
// iteration on a subsample of the tokens (every `stride`-th), then the eigen-decomposition of
// the subsample's Gram matrix in that subspace. Returns r.
uint32_t LowRankDirections(const EncodeKernels& kn, const std::vector<float>& xc, uint32_t T,
                           uint32_t D, uint32_t kmax, double threshold, std::vector<float>* dirs) {
  const uint32_t stride = std::max(1u, T / 64), count = (T + stride - 1) / stride;
  std::vector<float> w(uint64_t{count} * kmax), s(kmax * D, 0.f), s2(kmax * D, 0.f);
  for (uint32_t n = 0; n < count; ++n)
    for (uint32_t j = 0; j < kmax; ++j) w[n * kmax + j] = Omega(n * stride, j);
  kn.accumulate(xc.data(), D, count, stride, w.data(), kmax, D, s.data());
  kn.dot(xc.data(), D, count, stride, s.data(), kmax, D, w.data());  // One power iteration.
  kn.accumulate(xc.data(), D, count, stride, w.data(), kmax, D, s2.data());
  std::vector<double> sd(s2.begin(), s2.end());
  std::vector<float> q;
  const uint32_t k = Orthonormalise(&sd, kmax, D, &q);
  if (k == 0) return 0;
  std::vector<float> c(uint64_t{count} * k);
  kn.dot(xc.data(), D, count, stride, q.data(), k, D, c.data());
  std::vector<double> gram(k * k, 0), v;
  for (uint32_t n = 0; n < count; ++n)
    for (uint32_t a = 0; a < k; ++a)
      for (uint32_t b = 0; b < k; ++b) gram[a * k + b] += double(c[n * k + a]) * c[n * k + b];
  Jacobi(k, &gram, &v);
  std::vector<uint32_t> order(k);
  for (uint32_t i = 0; i < k; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return gram[a * k + a] > gram[b * k + b]; });
  uint32_t r = 0;
  while (r < k && gram[order[r] * k + order[r]] / count > threshold) ++r;
  dirs->assign(r * D, 0.f);
  for (uint32_t j = 0; j < r; ++j)
    for (uint32_t d = 0; d < D; ++d) {
      double acc = 0;
      for (uint32_t i = 0; i < k; ++i) acc += v[i * k + order[j]] * double(q[i * D + d]);
      (*dirs)[j * D + d] = float(acc);
    }
  return r;
}

// Quantises the r directions of one head (basis `dirs`, r x D; coefficients coef[t][j], T x r)
// and appends them to `dirs_out`: the steps, then (mode 1) the int8 basis codes; basis codes
// bcodes[j][d], coefficient codes codes[t][kept] (G * 16 rows), the decoder's basis
// bhat[j][d] and coefficients cf[j][G * 16]. Returns the number kept.
// Mode 1 stores the basis as int8 over its range. Mode 3 entropy-codes it, so its step is
// chosen for the residual: rounding the basis adds about E[c_j^2] * bs^2 / 12 to the variance
// of every residual element, and the step that balances that against the basis' own bits is
// bs^2 = 12 s^2 / (T E[c_j^2]), s^2 the residual's variance (kSideVariance first steps^2 / 12).
uint32_t QuantizeDirections(const std::vector<float>& dirs, const std::vector<float>& coef,
                            uint32_t T, uint32_t D, uint32_t r, double step0, bool side,
                            std::vector<uint8_t>* dirs_out, std::vector<int32_t>* bcodes,
                            std::vector<int32_t>* codes, std::vector<float>* bhat,
                            std::vector<float>* cf) {
  const uint64_t rows = uint64_t{Groups(T)} * kPack;
  bhat->assign(r * D, 0.f);
  bcodes->assign(r * D, 0);
  cf->assign(r * rows, 0.f);
  std::vector<int32_t> q(r * rows, 0);
  uint32_t kept = 0;
  for (uint32_t j = 0; j < r; ++j) {
    float bmax = 0, cmax = 0;
    double c2 = 0;
    for (uint32_t d = 0; d < D; ++d) bmax = std::max(bmax, std::fabs(dirs[j * D + d]));
    for (uint32_t t = 0; t < T; ++t) {
      const float c = coef[uint64_t{t} * r + j];
      cmax = std::max(cmax, std::fabs(c));
      c2 += double(c) * c;
    }
    float bs = bmax / 127.f, limit = 127.f;
    if (side) {
      const double fit = step0 * std::sqrt(kSideVariance / c2);
      bs = float(std::min(double(bmax) / 8, std::max(fit, double(bmax) / kMaxCode)));
      limit = kMaxCode;
    }
    const float cs = float(std::max(double(kCoefStepFactor) * step0, double(cmax) / 16000.0));
    if (!(bs > 1e-30f) || !std::isfinite(bs) || !std::isfinite(cs) || !(cs > 1e-30f)) break;
    PutF32(dirs_out, cs);
    PutF32(dirs_out, bs);
    for (uint32_t d = 0; d < D; ++d) {
      const int code = int(std::max(-limit, std::min(limit, std::nearbyint(dirs[j * D + d] / bs))));
      if (!side) dirs_out->push_back(uint8_t(int8_t(code)));
      (*bcodes)[kept * D + d] = code;
      (*bhat)[kept * D + d] = float(code) * bs;
    }
    for (uint32_t t = 0; t < T; ++t) {
      const int32_t c = int32_t(std::nearbyint(coef[uint64_t{t} * r + j] / cs));
      q[j * rows + t] = c;
      (*cf)[j * rows + t] = float(c) * cs;
    }
    ++kept;
  }
  bcodes->resize(kept * D);
  codes->assign(rows * kept, 0);
  for (uint64_t t = 0; t < rows; ++t)
    for (uint32_t j = 0; j < kept; ++j) (*codes)[t * kept + j] = q[j * rows + t];
  return kept;
}

// Means per channel (column sums in float, token by token). Mode 1 stores them as the dtype;
// mode 3 as codes of one step, mean_codes[c] (chosen like the basis step: rounding a mean adds
// step^2 / 12 to its column's T elements, against the mean's bits).
void Means(const SegmentShape& shape, const std::vector<float>& x, double step0, bool side,
           std::vector<uint8_t>* bytes, std::vector<int32_t>* mean_codes, std::vector<float>* m) {
  const uint64_t HD = uint64_t{shape.kv_heads} * shape.head_dim;
  std::vector<float> sum(HD, 0.f);
  for (uint32_t t = 0; t < shape.tokens; ++t)
    for (uint64_t c = 0; c < HD; ++c) sum[c] = sum[c] + x[t * HD + c];
  m->resize(HD);
  if (side) {
    float top = 0;
    for (uint64_t c = 0; c < HD; ++c) top = std::max(top, std::fabs(sum[c] / float(shape.tokens)));
    const float ms = float(std::max(step0 * std::sqrt(kSideVariance / shape.tokens),
                                    double(top) / kMaxCode));
    bytes->resize(4);
    std::memcpy(bytes->data(), &ms, 4);
    mean_codes->resize(HD);
    for (uint64_t c = 0; c < HD; ++c) {
      (*mean_codes)[c] = int32_t(std::nearbyint(sum[c] / float(shape.tokens) / ms));
      (*m)[c] = float((*mean_codes)[c]) * ms;
    }
    return;
  }
  bytes->resize(HD * 2);
  for (uint64_t c = 0; c < HD; ++c) {
    const uint16_t e = FromFloat(shape.dtype, sum[c] / float(shape.tokens));
    (*bytes)[2 * c] = uint8_t(e);
    (*bytes)[2 * c + 1] = uint8_t(e >> 8);
    (*m)[c] = ToFloat(shape.dtype, e);
  }
}

// Centres head h into xc (T x D) and returns its mean variance per element.
double Centre(const SegmentShape& shape, const std::vector<float>& x, const float* m, uint32_t h,
              std::vector<float>* xc) {
  const uint32_t T = shape.tokens, D = shape.head_dim;
  const uint64_t HD = uint64_t{shape.kv_heads} * D;
  xc->resize(uint64_t{T} * D);
  std::vector<float> sq(D, 0.f);
  for (uint32_t t = 0; t < T; ++t)
    for (uint32_t d = 0; d < D; ++d) {
      const float v = x[t * HD + h * D + d] - m[d];
      (*xc)[uint64_t{t} * D + d] = v;
      sq[d] = sq[d] + v * v;
    }
  double var = 0;
  for (uint32_t d = 0; d < D; ++d) var += sq[d];
  return var / (double(T) * D);
}

}  // namespace

std::vector<uint8_t> TokenClasses(const SegmentShape& shape, const float* keys) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim;
  const uint64_t HD = uint64_t{H} * D;
  if (T < 2 || D == 0) return {};
  std::vector<uint8_t> classes(uint64_t{T} * H, 0);
  std::vector<double> mean(D), dist(T);
  bool varied = false;
  for (uint32_t h = 0; h < H; ++h) {
    std::fill(mean.begin(), mean.end(), 0.0);
    for (uint32_t t = 0; t < T; ++t)
      for (uint32_t d = 0; d < D; ++d) mean[d] += keys[t * HD + h * D + d];
    for (double& m : mean) m /= T;
    double total = 0;
    for (uint32_t t = 0; t < T; ++t) {
      double sq = 0;
      for (uint32_t d = 0; d < D; ++d) {
        const double v = keys[t * HD + h * D + d] - mean[d];
        sq += v * v;
      }
      dist[t] = sq;
      total += sq;
    }
    if (!(total > 0) || !std::isfinite(total)) continue;  // This head's tokens stay class 0.
    // Logits q.k of random queries spread by |k - mean|: a token z times the mean squared
    // distance out draws exp(~z)-fold attention; its error counts that much more.
    const double per_z = 2 * kTokenWeighting / std::log(2.0) * T / total;
    for (uint32_t t = 0; t < T; ++t) {
      classes[uint64_t{t} * H + h] = ClassOf(dist[t], per_z);
      varied = varied || classes[uint64_t{t} * H + h] != classes[0];
    }
  }
  if (!varied) return {};
  return classes;
}

void Analyze(const SegmentShape& shape, const CodecParams& params, const uint16_t* in,
             const LayerKeys& keys, const EncodeKernels& kn, Analysis* a) {
  const uint32_t T = shape.tokens, H = shape.kv_heads, D = shape.head_dim, G = Groups(T);
  const uint64_t HD = uint64_t{H} * D, N = shape.Elements();
  const bool side = !(params.flags & kFlagPacked);
  a->x.resize(N);
  a->finite = N > 0 && kn.load(shape.dtype, in, N, a->x.data(), &a->energy) &&
              std::isfinite(a->energy);
  a->classes.clear();
  if (side && !(params.flags & kFlagEqualTokens) && a->finite) {
    if (shape.kind == SegmentKind::kKey) {
      a->classes = TokenClasses(shape, a->x.data());
    } else if (!KeyClasses(shape, keys.payload, &a->classes) && keys.elements != nullptr) {
      double unused;
      a->kx.resize(N);
      kn.load(shape.dtype, keys.elements, N, a->kx.data(), &unused);
      a->classes = TokenClasses(shape, a->kx.data());
    }
  }
  a->head_dim = D;
  a->scale.assign(uint64_t{G} * H * kPack, 1.f);
  for (uint64_t i = 0; i < a->classes.size(); ++i) {
    const uint64_t t = i / H, h = i % H;
    a->scale[((t / kPack) * H + h) * kPack + t % kPack] = ClassScale(a->classes[i]);
  }
  if (!a->finite) return;
  double step0 = std::sqrt(12.0 * a->energy / double(N)) * TargetError(shape, params);
  if (!(step0 >= 1e-30) || !std::isfinite(step0)) step0 = 1.0;
  a->first_step = float(step0);
  std::vector<uint8_t> ranks(H, 0), means, dirs;
  std::vector<int32_t> mean_codes;
  std::vector<float> m;
  Means(shape, a->x, step0, side, &means, &mean_codes, &m);
  std::vector<std::vector<int32_t>> head_codes(H), basis_codes(H);  // [t][j], [j][d] per head
  a->prediction.resize(uint64_t{G} * kPack * HD);
  std::vector<float> xc, basis, coef, bhat, cf;
  for (uint32_t h = 0; h < H; ++h) {
    const double var = Centre(shape, a->x, &m[h * D], h, &xc);
    const uint32_t kmax = (T >= 2 * kPack && D >= 4) ? std::min(kMaxRank, D / 2) : 0;
    const double threshold = std::max(kRankThreshold * var, 4 * step0 * step0);
    const uint32_t r = kmax ? LowRankDirections(kn, xc, T, D, kmax, threshold, &basis) : 0;
    coef.resize(uint64_t{T} * r);
    if (r > 0) kn.dot(xc.data(), D, T, 1, basis.data(), r, D, coef.data());
    ranks[h] = uint8_t(QuantizeDirections(basis, coef, T, D, r, step0, side, &dirs,
                                          &basis_codes[h], &head_codes[h], &bhat, &cf));
    kn.predict(T, HD, D, ranks[h], &m[h * D], cf.data(), bhat.data(),
               &a->prediction[uint64_t{h} * D * kPack]);
  }
  a->xp.resize(a->prediction.size());
  kn.to_packs(a->x.data(), T, HD, a->xp.data());
  uint32_t R = 0;
  for (uint32_t h = 0; h < H; ++h) R += ranks[h];
  std::vector<int32_t> all(uint64_t{G} * kPack * R, 0);
  for (uint32_t h = 0, col = 0; h < H; col += ranks[h], ++h)
    for (uint64_t t = 0; t < uint64_t{G} * kPack; ++t)
      for (uint32_t j = 0; j < ranks[h]; ++j) all[t * R + col + j] = head_codes[h][t * ranks[h] + j];
  a->head = ranks;
  a->head.insert(a->head.end(), means.begin(), means.end());
  a->head.insert(a->head.end(), dirs.begin(), dirs.end());
  if (!a->classes.empty()) {  // Nibble t * H + h, low nibble first.
    const uint64_t at = a->head.size();
    a->head.resize(at + (a->classes.size() + 1) / 2, 0);
    for (uint64_t i = 0; i < a->classes.size(); ++i) {
      a->head[at + i / 2] |= uint8_t(a->classes[i] << (4 * (i & 1)));
    }
  }
  if (side) {  // [D][H + R]: column h the means of head h, column H + col the basis codes.
    const uint32_t cols = H + R;
    std::vector<uint16_t> zz(uint64_t{D} * cols);
    for (uint32_t d = 0; d < D; ++d) {
      for (uint32_t h = 0; h < H; ++h) zz[d * cols + h] = uint16_t(ZigZag(mean_codes[h * D + d]));
      for (uint32_t h = 0, col = H; h < H; ++h)
        for (uint32_t j = 0; j < ranks[h]; ++j, ++col) {
          zz[d * cols + col] = uint16_t(ZigZag(basis_codes[h][j * D + d]));
        }
    }
    AppendStream(zz.data(), D, cols, &a->head);
  }
  a->coef_codes.swap(all);
  a->coef_cols = R;
}

}  // namespace kvpool::kernels::kvpool::internal
